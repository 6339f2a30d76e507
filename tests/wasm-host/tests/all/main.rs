//! Integration tests of the wasm host: one binary (see the modules).

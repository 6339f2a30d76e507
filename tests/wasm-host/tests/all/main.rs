//! Integration tests of the wasm host, as one binary: `abi` checks the host's ABI with
//! hand-written WAT guests; `filter` runs scenarios against the real fulcrum filter;
//! `untrusted_input` sends it hostile headers and properties.

mod abi;
mod filter;
mod test_support;
mod untrusted_input;

//! Integration tests of the wasm host, as one binary: `abi` checks the host's ABI with
//! hand-written WAT guests; `filter` runs scenarios against the real fulcrum filter.

mod abi;
mod filter;
mod test_support;

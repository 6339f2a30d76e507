//! Integration tests of the wasm host, as one binary: `abi` checks the host's ABI with
//! hand-written WAT guests; `filter` runs scenarios against the real fulcrum filter; `snapshots` how it takes control-plane
//! snapshots and charges outcomes.

mod abi;
mod filter;
mod snapshots;
mod test_support;

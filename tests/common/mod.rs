//! Shared helpers for the root integration tests; each `tests/*.rs` file says `mod common;`.
//!
//! Not here: test topologies and assertions, which live in the test files themselves.

pub(crate) mod docker;
pub(crate) mod lab;

//! Thin wrappers over the kernel's network configuration: rtnetlink links and addresses,
//! network namespaces, and container attachment (veth into a namespace, host end on the bridge).
//!
//! Not here: the TAP device (`dataplane/tap.rs`), VXLAN and its FDB (`dataplane/vxlan.rs`), and any
//! policy about what should exist; callers decide, these modules apply.
//!
//! Invariants: the product never runs `ip`; everything goes through rtnetlink or nix. No tokio
//! runtime thread ever calls `setns`: namespace work runs on a dedicated std thread
//! ([`netns::run_in`]) with its own current-thread runtime.

pub mod attach;
pub(crate) mod firewall;
pub mod netlink;
pub mod netns;
pub(crate) mod nft;

//! The data plane: how Ethernet frames move between the local bridge and other peers.
//!
//! `forwarding` is the snapshot the control loop publishes, `sleeve` the userspace UDP overlay,
//! `tap` the TAP device it reads and writes.

pub mod forwarding;
pub mod sleeve;
pub mod tap;

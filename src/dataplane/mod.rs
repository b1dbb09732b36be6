//! The data plane: how Ethernet frames move between the local bridge and other peers.
//!
//! `forwarding` is the snapshot the control loop publishes, `sleeve` the userspace UDP overlay,
//! `tap` the TAP device it reads and writes, `vxlan` the kernel fast path and `overlay` the
//! per-peer choice between the two.

pub mod forwarding;
pub mod overlay;
pub mod sleeve;
pub mod tap;
pub mod vxlan;

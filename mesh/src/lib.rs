//! `mesh`: the sans-IO control plane of meshctl: peer identity, topology gossip, routes and
//! the connection maker policy.
//!
//! # Layers
//! - [`peer`]: names and identity ([`PeerName`], [`Identity`], [`ConnId`]).
//! - [`topology`]: who is connected to whom; [`Topology::apply`] merges gossip and returns the
//!   delta; [`Topology::gc`] drops unreachable peers.
//! - [`routes`]: pure functions from a topology to unicast next hops and broadcast trees.
//! - [`gossip`]: the [`gossip::Channel`] trait, random fan-out, periodic timer.
//! - [`wire`]: message framing, `[PROTOCOL_VERSION][postcard(Message)]`.
//! - [`connect`]: whom to dial and when (targets, backoff, discovery).
//! - [`dns`]: container name records gossiped with tombstones (carried by the router as
//!   [`Message::Dns`]).
//! - [`ipam`]: address allocation: rings of ranges owned by peers, bootstrap votes,
//!   allocation, donations and quorum-agreed reclaims.
//! - [`router`]: composes the above; the only `handle_*` / `poll_*` surface.
//!
//! This crate does no IO: no sockets, no clock, no unseeded randomness. The daemon owns one
//! [`Router`] and drives it.
//!
//! # Call order
//! 1. `Router::new(config, name, seed, now)`, then `add_targets(now, addrs)`.
//! 2. Feed each input through one `handle_*` method: `handle_connected`, `handle_message`,
//!    `handle_disconnected`, `handle_dial_failed`, `handle_timeout`.
//! 3. After every input drain `poll_transmit` and `poll_event` until both return `None`.
//! 4. Sleep until `poll_timeout()`, then call `handle_timeout(now)`.
//!
//! # Glossary
//! | Noun | Meaning |
//! |---|---|
//! | peer | a router instance |
//! | connection | the control-plane link between two peers |
//! | topology | who is connected to whom |
//! | route | next hop to a peer |
//! | target | an address we want a connection to |
//! | sleeve | userspace UDP overlay (in the daemon) |
//! | vxlan | kernel overlay (Weave called it "fastdp") |
//! | overlay | the per-peer choice between the two |
//! | range / space / ring | IPAM: addresses a peer owns / all it owns / who owns what |
#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod connect;
pub mod dns;
pub mod gossip;
pub mod ipam;
pub mod peer;
pub mod router;
pub mod routes;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod topology;
pub mod wire;

pub use connect::{TargetKind, TargetState, TargetStatus};
pub use peer::{ConnId, Identity, IdentityError, PeerName, PeerNameError};
pub use router::{ConnectionStatus, Event, Router, RouterConfig, Transmit, CONN_LIMIT_DEFAULT};
pub use routes::Routes;
pub use topology::{ConnectionInfo, Peer, Topology, TopologyUpdate, Version};
pub use wire::{decode, encode, DecodeError, Message, PROTOCOL_VERSION};

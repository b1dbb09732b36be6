//! The embedded name server for container names (issue 7): `wire` parses queries and emits answers,
//! `server` answers for the mesh's domain from a zone snapshot and forwards other names upstream.
//! The records themselves are `mesh::dns::Records`, gossiped by the router.
//!
//! Not yet wired into the daemon: that needs a bridge address for containers to reach (`meshctl
//! expose`) and the router to carry the records.
#![cfg_attr(not(test), allow(dead_code))]

pub(crate) mod server;
pub(crate) mod wire;

//! Control connections between routers: the QUIC endpoint and the password handshake run on it.

pub(crate) mod handshake;
pub(crate) mod quic;

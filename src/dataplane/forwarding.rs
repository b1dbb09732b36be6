//! The forwarding snapshot that the control loop publishes to the data plane.
//!
//! `ForwardingTable` is immutable once published: the control loop builds a new one whenever
//! routes or sessions change and sends it as an `Arc` through a `tokio::sync::watch` channel. The
//! data plane reads the newest snapshot and never waits on the control loop.
//!
//! Not here: route computation (`mesh::routes`), session key negotiation (the control
//! connection) and per-session mutable state such as send counters and replay windows, which the
//! sleeve task owns by value.
//!
//! Invariants: every `SessionParams::local_index` in one table is unique; `sessions` is keyed by
//! `SessionParams::peer`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use mesh::PeerName;

use super::sleeve::crypto::Cipher;

/// What the data plane needs to exchange sleeve datagrams with one neighbour.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// The neighbour this session reaches.
    pub peer: PeerName,
    /// Where the neighbour's sleeve socket listens.
    pub remote_addr: SocketAddr,
    /// Index the neighbour puts in `receiver_index` when it sends to us.
    pub local_index: u32,
    /// Index we put in `receiver_index` when we send to the neighbour.
    pub remote_index: u32,
    /// Key for datagrams we send.
    pub send_key: [u8; 32],
    /// Key for datagrams we receive.
    pub recv_key: [u8; 32],
    /// The AEAD both ends agreed on in the handshake.
    pub cipher: Cipher,
    /// The neighbour joins super-frame segments and announced it in the handshake; without it,
    /// super-frames are sent to it as finished TCP frames.
    pub offload: bool,
    /// Datagrams per key epoch as a power of two (`crypto::epoch_of`), agreed in the handshake.
    pub epoch_shift: u8,
    /// Sleeve datagrams and bytes exchanged with this neighbour in this session, bumped by the
    /// sleeve threads and read by the status API.
    pub traffic: Traffic,
}

/// Per-session sleeve counters, shared between the data plane (writes) and the control loop
/// (reads). Counted per datagram on the wire, so relayed traffic through the neighbour is
/// included; datagrams that fail authentication are not.
#[derive(Clone, Default)]
pub struct Traffic(Arc<TrafficCounters>);

/// The counters behind [`Traffic`].
#[derive(Debug, Default)]
pub struct TrafficCounters {
    /// Datagrams received and accepted.
    pub rx_packets: AtomicU64,
    /// Bytes of those datagrams (UDP payload).
    pub rx_bytes: AtomicU64,
    /// Datagrams sealed and handed to the socket.
    pub tx_packets: AtomicU64,
    /// Bytes of those datagrams (UDP payload).
    pub tx_bytes: AtomicU64,
    /// Datagrams with this session's index dropped, by reason (also counted in the sleeve's
    /// per-router `Counters`): replayed,
    pub drop_replayed: AtomicU64,
    /// failed authentication,
    pub drop_auth_failed: AtomicU64,
    /// plain while a password is set.
    pub drop_plain_when_sealed: AtomicU64,
    /// When our sending key last moved to a new epoch (`None`: still the handshake's key).
    /// Written once per epoch (millions of datagrams), so a lock costs nothing.
    pub send_key_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// Largest Ethernet frame one sleeve datagram to this neighbour carries over the current
    /// path (0: not measured yet, no limit). Set by the control loop from the kernel's route MTU.
    pub max_frame: AtomicUsize,
}

/// Why a datagram of a known session was dropped; names as in the sleeve's `Counters::drops`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionDrop {
    /// A sealed datagram failed authentication.
    AuthFailed,
    /// A plain datagram while a password is set.
    PlainWhenSealed,
    /// A counter seen before or too old.
    Replayed,
}

impl Traffic {
    /// Counts one received datagram of `bytes`.
    // HOT PATH
    pub fn received(&self, bytes: usize) {
        self.received_many(1, bytes as u64);
    }

    /// Notes that the sending key just moved to a new epoch.
    pub fn key_rotated(&self) {
        if let Ok(mut since) = self.0.send_key_since.lock() {
            *since = Some(std::time::Instant::now());
        }
    }

    /// When the sending key last rotated, if it has.
    pub fn key_since(&self) -> Option<std::time::Instant> {
        self.0.send_key_since.lock().ok().and_then(|s| *s)
    }

    /// Counts one sent datagram of `bytes`.
    // HOT PATH
    pub fn sent(&self, bytes: usize) {
        self.sent_many(1, bytes as u64);
    }

    /// Counts `packets` received together, `bytes` in all.
    // HOT PATH
    pub fn received_many(&self, packets: u64, bytes: u64) {
        self.0.rx_packets.fetch_add(packets, Ordering::Relaxed);
        self.0.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts `packets` sent together, `bytes` in all.
    // HOT PATH
    pub fn sent_many(&self, packets: u64, bytes: u64) {
        self.0.tx_packets.fetch_add(packets, Ordering::Relaxed);
        self.0.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one datagram from this neighbour dropped for `why`.
    pub fn dropped(&self, why: SessionDrop) {
        let counter = match why {
            SessionDrop::AuthFailed => &self.0.drop_auth_failed,
            SessionDrop::PlainWhenSealed => &self.0.drop_plain_when_sealed,
            SessionDrop::Replayed => &self.0.drop_replayed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Largest frame the path to this neighbour carries (0: no limit known).
    // HOT PATH
    pub fn max_frame(&self) -> usize {
        self.0.max_frame.load(Ordering::Relaxed)
    }

    /// Sets [`Traffic::max_frame`]; returns the previous value.
    pub fn set_max_frame(&self, bytes: usize) -> usize {
        self.0.max_frame.swap(bytes, Ordering::Relaxed)
    }

    /// Drops by reason (`auth_failed`, `plain_when_sealed`, `replayed`).
    pub fn drops(&self) -> [(&'static str, u64); 3] {
        let c = &self.0;
        [
            ("auth_failed", c.drop_auth_failed.load(Ordering::Relaxed)),
            (
                "plain_when_sealed",
                c.drop_plain_when_sealed.load(Ordering::Relaxed),
            ),
            ("replayed", c.drop_replayed.load(Ordering::Relaxed)),
        ]
    }

    /// The current counts: (rx packets, rx bytes, tx packets, tx bytes).
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        let c = &self.0;
        (
            c.rx_packets.load(Ordering::Relaxed),
            c.rx_bytes.load(Ordering::Relaxed),
            c.tx_packets.load(Ordering::Relaxed),
            c.tx_bytes.load(Ordering::Relaxed),
        )
    }
}

// Counters are not part of a session's identity: two tables with the same sessions are equal
// when they share the counters.
impl PartialEq for Traffic {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Traffic {}

impl fmt::Debug for Traffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// Keys never reach logs.
impl fmt::Debug for SessionParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionParams")
            .field("peer", &self.peer)
            .field("remote_addr", &self.remote_addr)
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("cipher", &self.cipher)
            .field("offload", &self.offload)
            .finish_non_exhaustive()
    }
}

/// One immutable view of routes and sessions, as the control loop last computed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardingTable {
    /// Our own peer name.
    pub me: PeerName,
    /// A mesh password is set: seal everything and drop plain datagrams.
    pub sealed: bool,
    /// Destination peer -> next hop (from `mesh::routes`).
    pub unicast: BTreeMap<PeerName, PeerName>,
    /// Broadcast source -> our children in that source's broadcast tree.
    pub broadcast: BTreeMap<PeerName, Vec<PeerName>>,
    /// Neighbours with an established control connection.
    pub sessions: BTreeMap<PeerName, Arc<SessionParams>>,
    /// Peers reached over kernel VXLAN (their VXLAN endpoint): the kernel floods our
    /// broadcasts to them, so the sleeve sends them our own broadcasts only for relaying
    /// (`FLAG_RELAY_ONLY`). Always a subset of our children in our own broadcast tree; that is
    /// what keeps every broadcast exactly-once: the tree holds each peer once, so no peer below
    /// a VXLAN peer is itself one.
    pub vxlan: BTreeMap<PeerName, SocketAddrV4>,
    /// Frames exchanged end to end with each known peer over the sleeve, whatever the next hop:
    /// counted where they enter or leave the mesh (our TAP), not where they are relayed. The
    /// control loop keeps one counter per peer across tables.
    pub peer_traffic: BTreeMap<PeerName, Traffic>,
}

impl ForwardingTable {
    /// A table with no routes and no sessions: the data plane drops everything it can't deliver
    /// locally.
    pub fn empty(me: PeerName, sealed: bool) -> Self {
        Self {
            me,
            sealed,
            unicast: BTreeMap::new(),
            broadcast: BTreeMap::new(),
            sessions: BTreeMap::new(),
            vxlan: BTreeMap::new(),
            peer_traffic: BTreeMap::new(),
        }
    }
}

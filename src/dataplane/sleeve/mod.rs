//! The sleeve: a userspace UDP overlay that carries Ethernet frames between peers.
//!
//! Two threads move the bytes, one per direction, so that both cores work at full speed:
//! - `tx` reads frames from the TAP (TCP super-frames of up to 64 KiB with their virtio-net
//!   header), cuts super-frames into one sealed datagram per TCP segment for peers that support
//!   offloads (or into finished TCP frames for those that don't), packs small frames several to a
//!   datagram, and sends datagrams of equal size with one UDP GSO `sendmsg` (or one `sendmmsg`
//!   where GSO is missing or switched off, see `udp.rs`).
//! - `rx` receives GRO batches (or `recvmmsg` batches), opens each datagram, joins the segments
//!   of a super-frame back together and writes it into the TAP with its virtio-net header, and
//!   relays what is not for us along the routes.
//!
//! The async [`run`] task owns neither: it adopts each new [`ForwardingTable`] into a [`Snapshot`]
//! (keeping the send counters of sessions whose keys did not change) and publishes it through an
//! `ArcSwap` that both threads read once per packet batch; the sleeve never waits on the control
//! loop. Once both threads have taken the new snapshot (or are idle, and take it before their next
//! packet), `run` reports the table live, so that the FDB reconciler can reset the bridge's
//! learned MACs knowing that no frame is handled under the old table any more. Per-session send
//! counters are atomics shared by both threads (both may send to the same neighbour: `tx`
//! originates, `rx` relays); replay windows and the MAC table belong to `rx`, which tells `tx`
//! about every newly learned MAC through a channel.
//!
//! Peers on the kernel VXLAN fast path (`ForwardingTable::vxlan`) keep their sleeve sessions but
//! get only our own broadcasts from it, flagged relay-only, so that they relay them to their
//! subtrees (each container then sees each broadcast exactly once); both threads forget the MACs
//! of peers that move to VXLAN, `tx` never unicasts to one, and `rx` writes nothing from one into
//! the TAP, so the bridge never learns a VXLAN peer's MACs behind the TAP either.
//!
//! Not here: the wire format (`frame.rs`), sealing (`crypto.rs`), replay windows (`replay.rs`),
//! offload arithmetic (`offload.rs`), the socket's GSO/GRO (`udp.rs`), opening the TAP
//! (`dataplane::tap`), computing routes or keys (control plane).
//!
//! Invariants: a session's counter is used at most once per key (one atomic per session, shared
//! by both threads); MACs are learned only from authenticated datagrams, never from frames our own
//! TAP gave us; every dropped frame or datagram is counted in [`Counters`]. Weave equivalent:
//! `router/sleeve.go`.

pub mod crypto;
pub mod frame;
pub mod icmp;
pub mod offload;
pub mod replay;
mod rx;
mod tx;
pub mod udp;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use mesh::PeerName;
use tokio::sync::{mpsc, watch};

use self::crypto::{SendKeys, TAG_LEN};
use self::frame::{Header, Kind, HEADER_LEN};
use self::udp::{Batching, Offload, Udp, SEND_MAX_BYTES};
use super::forwarding::{ForwardingTable, SessionParams};
use super::tap::Tap;

/// Hop limit of bodies we originate.
pub const HOP_LIMIT: u8 = 16;

/// The most a sleeve datagram adds to the frame it carries: a sealed segment (header, body
/// header, segment metadata, tag). A path that carries `frame + DATAGRAM_OVERHEAD_MAX` bytes of
/// UDP payload carries the frame whatever the session and the framing.
pub const DATAGRAM_OVERHEAD_MAX: usize =
    frame::HEADER_LEN + frame::BODY_HEADER_LEN + frame::SEGMENT_META_LEN + crypto::TAG_LEN;

/// Learned MACs beyond this many are not recorded (bounds memory a misbehaving peer can use).
const MACS_MAX: usize = 65_536;
/// Send counters stop here; the control plane must rotate keys before.
const COUNTER_MAX: u64 = u64::MAX - (1 << 16);
/// How often the threads look at the stop flag when idle.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// The longest [`run`] waits for both threads to take a new snapshot before it reports the table
/// live anyway (they take it before their next packet, so only a stuck thread makes it wait).
const ADOPT_MAX: Duration = Duration::from_secs(1);
/// Index of each thread in [`Shared::adopted`].
const TX: usize = 0;
const RX: usize = 1;
/// In [`Shared::adopted`]: the thread is idle and takes the newest snapshot before its next packet.
const IDLE: u64 = u64::MAX;

/// Packet and drop counts, shared with the status API.
///
/// Drops count what was dropped: a datagram for receive-side reasons, a frame for `no_route`,
/// `tap_write` and `from_vxlan_peer`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received on the UDP socket.
    pub rx_datagrams: AtomicU64,
    /// Datagrams sent on the UDP socket.
    pub tx_datagrams: AtomicU64,
    /// Frames (or super-frame segments) received in accepted datagrams.
    pub rx_frames: AtomicU64,
    /// Frames (or super-frame segments) sent (once per datagram that carried them).
    pub tx_frames: AtomicU64,
    /// Bytes of received datagrams.
    pub rx_bytes: AtomicU64,
    /// Bytes of sent datagrams.
    pub tx_bytes: AtomicU64,
    /// Frames relayed to another peer on the way to their destination.
    pub relayed_frames: AtomicU64,
    /// Sending keys that rotated to a new epoch (`crypto::epoch_of`), over all sessions.
    pub key_rotations: AtomicU64,
    /// Datagrams with an unknown kind or an invalid body.
    pub drop_malformed: AtomicU64,
    /// Datagrams shorter than their structure says.
    pub drop_truncated: AtomicU64,
    /// Datagrams whose receiver index names no session.
    pub drop_unknown_session: AtomicU64,
    /// Sealed datagrams with a counter seen before or too old.
    pub drop_replayed: AtomicU64,
    /// Sealed datagrams that failed authentication.
    pub drop_auth_failed: AtomicU64,
    /// Plain datagrams while a password is set.
    pub drop_plain_when_sealed: AtomicU64,
    /// Datagrams that should be relayed but have no hops left.
    pub drop_hop_limit: AtomicU64,
    /// Frames with no route or no session to their next hop.
    pub drop_no_route: AtomicU64,
    /// Frames the TAP refused.
    pub drop_tap_write: AtomicU64,
    /// Frames from our TAP whose offload metadata we can't use.
    pub drop_bad_tap_frame: AtomicU64,
    /// Frames from our TAP too big for the path to their next hop (answered with ICMP "too
    /// big" when the sender set DF or used IPv6; see `icmp.rs`).
    pub drop_too_big: AtomicU64,
    /// Frames for us from a peer that is on VXLAN with us but sent them over the sleeve (it has
    /// not switched yet): not written into the TAP (see `rx.rs`).
    pub drop_from_vxlan_peer: AtomicU64,
    /// How the socket batches datagrams ([`Batching::code`]); 0 until the sleeve has set it up.
    /// Not a counter: left out of [`Counters::snapshot`].
    pub batching: AtomicU8,
}

impl Counters {
    /// All counters by name, for the status JSON. Drop counters are named by reason alone
    /// ("malformed", "truncated", ...).
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let all: [(&'static str, &AtomicU64); 20] = [
            ("rx_datagrams", &self.rx_datagrams),
            ("tx_datagrams", &self.tx_datagrams),
            ("rx_frames", &self.rx_frames),
            ("tx_frames", &self.tx_frames),
            ("rx_bytes", &self.rx_bytes),
            ("tx_bytes", &self.tx_bytes),
            ("relayed_frames", &self.relayed_frames),
            ("key_rotations", &self.key_rotations),
            ("malformed", &self.drop_malformed),
            ("truncated", &self.drop_truncated),
            ("unknown_session", &self.drop_unknown_session),
            ("replayed", &self.drop_replayed),
            ("auth_failed", &self.drop_auth_failed),
            ("plain_when_sealed", &self.drop_plain_when_sealed),
            ("hop_limit", &self.drop_hop_limit),
            ("no_route", &self.drop_no_route),
            ("tap_write", &self.drop_tap_write),
            ("bad_tap_frame", &self.drop_bad_tap_frame),
            ("too_big", &self.drop_too_big),
            ("from_vxlan_peer", &self.drop_from_vxlan_peer),
        ];
        all.iter()
            .map(|(name, c)| (*name, c.load(Ordering::Relaxed)))
            .collect()
    }

    /// How the socket batches datagrams, once the sleeve has set it up.
    pub fn batching(&self) -> Option<Batching> {
        Batching::from_code(self.batching.load(Ordering::Relaxed))
    }

    fn set_batching(&self, batching: Batching) {
        self.batching.store(batching.code(), Ordering::Relaxed);
    }

    /// Only the drop counters, by reason.
    pub fn drops(&self) -> BTreeMap<&'static str, u64> {
        let mut all = self.snapshot();
        all.retain(|name, _| !TRAFFIC.contains(name));
        all
    }
}

/// Names in [`Counters::snapshot`] that count traffic rather than drops.
const TRAFFIC: [&str; 8] = [
    "rx_datagrams",
    "tx_datagrams",
    "rx_frames",
    "tx_frames",
    "rx_bytes",
    "tx_bytes",
    "relayed_frames",
    "key_rotations",
];

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The sending half of a session, shared by both threads.
struct TxSession {
    params: Arc<SessionParams>,
    sealing: SendKeys,
    /// Next counter to use; shared so that a counter is never used twice under one key.
    counter: AtomicU64,
}

impl TxSession {
    fn new(params: Arc<SessionParams>) -> Self {
        Self {
            sealing: SendKeys::new(params.cipher, &params.send_key, params.epoch_shift),
            counter: AtomicU64::new(0),
            params,
        }
    }
}

/// Whether two session parameter sets share keys, so that counters and replay windows carry over.
fn same_keys(a: &SessionParams, b: &SessionParams) -> bool {
    a.local_index == b.local_index
        && a.send_key == b.send_key
        && a.recv_key == b.recv_key
        && a.cipher == b.cipher
        && a.epoch_shift == b.epoch_shift
}

/// What both threads read: the routes, and the sending halves of the sessions.
struct Snapshot {
    table: Arc<ForwardingTable>,
    sessions: BTreeMap<PeerName, Arc<TxSession>>,
    /// Counts the snapshots `run` published, so that the threads can say which one they use.
    generation: u64,
}

impl Snapshot {
    /// Adopts `table`, keeping the sending state of sessions whose keys did not change.
    fn adopt(&self, table: Arc<ForwardingTable>) -> Snapshot {
        let sessions = table
            .sessions
            .iter()
            .map(|(peer, params)| {
                let session = match self.sessions.get(peer) {
                    Some(s) if same_keys(&s.params, params) => s.clone(),
                    _ => Arc::new(TxSession::new(params.clone())),
                };
                (*peer, session)
            })
            .collect();
        Snapshot {
            table,
            sessions,
            generation: self.generation + 1,
        }
    }
}

/// What the threads share.
struct Shared {
    snapshot: ArcSwap<Snapshot>,
    /// The generation of the snapshot each thread ([`TX`], [`RX`]) handles packets with, or
    /// [`IDLE`]. SeqCst, like `snapshot`'s own operations: a thread that leaves `IDLE` loads the
    /// snapshot afterwards, so `run`, which stores first and reads these second, never sees
    /// `IDLE` from a thread that is about to handle a packet under an older snapshot.
    adopted: [AtomicU64; 2],
    stop: AtomicBool,
    counters: Arc<Counters>,
    udp: Udp,
    tap: Tap,
}

impl Shared {
    /// Thread `thread` handles packets with snapshot `generation` from now on ([`IDLE`]: none).
    fn adopted(&self, thread: usize, generation: u64) {
        self.adopted[thread].store(generation, Ordering::SeqCst);
    }

    /// Whether no packet will be handled under a snapshot older than `generation` any more.
    fn adopted_by_all(&self, generation: u64) -> bool {
        self.adopted
            .iter()
            .all(|a| a.load(Ordering::SeqCst) >= generation)
    }
}

/// Sets the stop flag when the [`run`] future ends or is dropped (the daemon aborts it).
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs the sleeve until the forwarding table's sender is dropped (then returns `Ok`) or the TAP
/// or UDP socket fails. `offload` says whether the socket may use UDP GSO/GRO. Each table from
/// `table` goes to `live` once both threads work with it.
pub async fn run(
    tap: Tap,
    udp: std::net::UdpSocket,
    offload: Offload,
    mut table: watch::Receiver<Arc<ForwardingTable>>,
    live: watch::Sender<Arc<ForwardingTable>>,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let first = table.borrow_and_update().clone();
    let empty = Snapshot {
        table: Arc::new(ForwardingTable::empty(first.me, first.sealed)),
        sessions: BTreeMap::new(),
        generation: 0,
    };
    let udp = Udp::new(udp, offload).context("set up sleeve socket (GSO/GRO)")?;
    counters.set_batching(udp.batching());
    tracing::info!(batching = udp.batching().name(), "sleeve socket ready");
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(empty.adopt(first.clone())),
        adopted: [AtomicU64::new(0), AtomicU64::new(0)],
        stop: AtomicBool::new(false),
        counters,
        udp,
        tap,
    });
    let _stop = StopOnDrop(shared.clone());
    live.send_replace(first);
    let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<anyhow::Error>();
    let (macs_tx, macs_rx) = std::sync::mpsc::channel();
    let spawn = |name: &str, body: Box<dyn FnOnce() -> anyhow::Result<()> + Send>| {
        let failed = failed_tx.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Err(e) = body() {
                    let _ = failed.send(e);
                }
            })
            .with_context(|| format!("start thread {name}"))
    };
    let tx_shared = shared.clone();
    let rx_shared = shared.clone();
    let threads = [
        spawn("sleeve-tx", Box::new(move || tx::run(&tx_shared, macs_rx)))?,
        spawn("sleeve-rx", Box::new(move || rx::run(&rx_shared, macs_tx)))?,
    ];
    let result = loop {
        tokio::select! {
            changed = table.changed() => {
                if changed.is_err() {
                    break Ok(());
                }
                let next = table.borrow_and_update().clone();
                let adopted = shared.snapshot.load().adopt(next.clone());
                let generation = adopted.generation;
                shared.snapshot.store(Arc::new(adopted));
                let deadline = tokio::time::Instant::now() + ADOPT_MAX;
                while !shared.adopted_by_all(generation) {
                    if tokio::time::Instant::now() >= deadline {
                        tracing::debug!(generation, "sleeve threads did not take the table in time");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                live.send_replace(next);
            }
            Some(e) = failed_rx.recv() => break Err(e),
        }
    };
    shared.stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await
    .context("join sleeve threads")?;
    result
}

/// Where a body goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    Broadcast,
    Peer(PeerName),
}

/// Seals datagrams into one buffer and sends runs of equal-sized datagrams to one address with
/// a single GSO `sendmsg` or `sendmmsg`. Each thread has its own.
struct Sender {
    shared: Arc<Shared>,
    /// Datagrams sealed but not yet sent, back to back.
    out: Vec<u8>,
    to: Option<SocketAddr>,
    /// Size of every datagram in `out` but maybe the last.
    segment: usize,
    segments: usize,
    /// A datagram shorter than `segment` ended the run.
    closed: bool,
    frames: u64,
}

impl Sender {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            out: Vec::with_capacity(SEND_MAX_BYTES + 2048),
            to: None,
            segment: 0,
            segments: 0,
            closed: false,
            frames: 0,
        }
    }

    /// Seals the body made of `parts` for `session` and queues it; sends what was queued first
    /// if the new datagram can't join the run. `frames` is how many frames the body holds.
    // HOT PATH
    fn queue(
        &mut self,
        session: &TxSession,
        sealed: bool,
        flags: u8,
        parts: &[&[u8]],
        frames: u64,
    ) {
        let counter = session.counter.fetch_add(1, Ordering::Relaxed);
        if counter >= COUNTER_MAX {
            tracing::debug!(peer = %session.params.peer, "send counter exhausted; waiting for new keys");
            return bump(&self.shared.counters.drop_no_route, frames);
        }
        let body_len: usize = parts.iter().map(|p| p.len()).sum();
        let len = HEADER_LEN + body_len + if sealed { TAG_LEN } else { 0 };
        let to = session.params.remote_addr;
        let joins = self.to == Some(to)
            && !self.closed
            && len <= self.segment
            && self.segments < self.shared.udp.max_segments()
            && self.out.len() + len <= SEND_MAX_BYTES;
        if !joins {
            self.flush();
            self.to = Some(to);
            self.segment = len;
        }
        self.closed = len < self.segment;
        session.params.traffic.sent(len);
        let header = Header {
            kind: if sealed { Kind::Sealed } else { Kind::Plain },
            flags,
            receiver_index: session.params.remote_index,
            counter,
        };
        let mut head = [0u8; HEADER_LEN];
        header.emit(&mut head);
        let start = self.out.len();
        self.out.extend_from_slice(&head);
        for part in parts {
            self.out.extend_from_slice(part);
        }
        if sealed {
            if counter > 0
                && crypto::epoch_of(counter - 1, session.params.epoch_shift)
                    != crypto::epoch_of(counter, session.params.epoch_shift)
            {
                bump(&self.shared.counters.key_rotations, 1);
                session.params.traffic.key_rotated();
            }
            let tag =
                session
                    .sealing
                    .seal_detached(&head, counter, &mut self.out[start + HEADER_LEN..]);
            self.out.extend_from_slice(&tag);
        }
        self.segments += 1;
        self.frames += frames;
    }

    /// Sends everything queued.
    fn flush(&mut self) {
        let Some(to) = self.to.take() else {
            return;
        };
        let segment = (self.segments > 1).then_some(self.segment);
        let c = &self.shared.counters;
        match self.shared.udp.send(to, &self.out, segment) {
            Ok(()) => {
                bump(&c.tx_datagrams, self.segments as u64);
                bump(&c.tx_frames, self.frames);
                bump(&c.tx_bytes, self.out.len() as u64);
            }
            // Not counted as a drop reason of its own: the path is broken, the control plane
            // will notice through its own connection.
            Err(e) => {
                tracing::debug!(%to, error = %e, "send sleeve datagrams");
                // The kernel may have refused GSO, and `udp` stopped using it.
                c.set_batching(self.shared.udp.batching());
            }
        }
        self.out.clear();
        self.segments = 0;
        self.frames = 0;
        self.closed = false;
    }
}

#[cfg(test)]
mod tests {
    //! Two peers in their own network namespaces, joined by a veth, each running the sleeve
    //! between a TAP and the veth:
    //!
    //! ```text
    //!  netns A                                   netns B
    //!  tap 10.77.0.1/24 <-> run() 192.168.77.1 --veth-- 192.168.77.2 run() <-> tap 10.77.0.2/24
    //! ```
    //! Needs root (CAP_NET_ADMIN) and `ping`; skips with a printed reason otherwise.

    use super::*;
    use crate::dataplane::sleeve::crypto::{derive_keys, SealingKey};
    use crate::dataplane::sleeve::frame::BodyHeader;
    use std::process::Command;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    const PEER_A: PeerName = PeerName(0x0a);
    const PEER_B: PeerName = PeerName(0x0b);
    const INDEX_A: u32 = 100;
    const INDEX_B: u32 = 200;
    const TAP: &str = "stap0";

    fn ip(args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("run ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Two namespaces joined by a veth; deleted on drop.
    struct Netns {
        names: [String; 2],
    }

    impl Netns {
        fn new() -> Result<Self, String> {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(2, Ordering::Relaxed);
            let pid = std::process::id();
            let names = [format!("st{pid}{n}"), format!("st{pid}{}", n + 1)];
            let mut guard = Self {
                names: [String::new(), String::new()],
            };
            for (slot, name) in guard.names.iter_mut().zip(names) {
                ip(&["netns", "add", &name])?;
                *slot = name;
            }
            let [a, b] = &guard.names;
            ip(&[
                "link", "add", "veth0", "netns", a, "type", "veth", "peer", "name", "veth0",
                "netns", b,
            ])?;
            for (ns, addr) in [(a, "192.168.77.1/24"), (b, "192.168.77.2/24")] {
                ip(&["-n", ns, "addr", "add", addr, "dev", "veth0"])?;
                ip(&["-n", ns, "link", "set", "veth0", "up"])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            Ok(guard)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            for name in self.names.iter().filter(|n| !n.is_empty()) {
                if let Err(e) = ip(&["netns", "del", name]) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
    }

    /// Runs `f` on a new thread inside netns `ns`.
    fn in_netns<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("netns file exists while the guard lives");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns as root");
            f()
        })
    }

    fn table(me: PeerName, peer: PeerName, local: u32, remote: u32, addr: &str) -> ForwardingTable {
        let keys = derive_keys(b"test secret", PEER_A, PEER_B);
        let (send_key, recv_key) = if me == PEER_A {
            (keys.initiator_to_responder, keys.responder_to_initiator)
        } else {
            (keys.responder_to_initiator, keys.initiator_to_responder)
        };
        let mut t = ForwardingTable::empty(me, true);
        t.unicast.insert(peer, peer);
        t.broadcast.insert(me, vec![peer]);
        t.broadcast.insert(peer, vec![]);
        let params = SessionParams {
            peer,
            remote_addr: addr.parse().expect("literal address"),
            local_index: local,
            remote_index: remote,
            send_key,
            recv_key,
            cipher: crypto::Cipher::ChaCha20Poly1305,
            offload: true,
            // Rotate keys every 256 datagrams, so the tests cross many epochs.
            epoch_shift: crypto::EPOCH_SHIFT_MIN,
            traffic: Default::default(),
        };
        t.sessions.insert(peer, Arc::new(params));
        t.peer_traffic.insert(peer, Default::default());
        t
    }

    /// One running `run`.
    struct Node {
        /// Its tables; drop to stop it.
        tables: watch::Sender<Arc<ForwardingTable>>,
        handle: std::thread::JoinHandle<anyhow::Result<()>>,
        /// The tables it reports live.
        live: watch::Receiver<Arc<ForwardingTable>>,
    }

    impl Node {
        fn stop(self) {
            drop(self.tables);
            self.handle
                .join()
                .expect("sleeve thread")
                .expect("sleeve ran cleanly");
        }
    }

    /// Starts `run` in netns `ns`; returns once the TAP exists.
    fn start_node(ns: &str, t: ForwardingTable, counters: Arc<Counters>) -> Node {
        let (tx, rx) = watch::channel(Arc::new(t));
        let (live, live_rx) = watch::channel(tx.borrow().clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = in_netns(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let tap = crate::dataplane::tap::open_tap(TAP, 1376)?;
                let udp =
                    std::net::UdpSocket::bind("0.0.0.0:6784").context("bind sleeve socket")?;
                let _ = ready_tx.send(());
                run(tap, udp, Offload::Auto, rx, live, counters).await
            })
        });
        // If the thread failed before signalling, the error shows when it is joined.
        let _ = ready_rx.recv_timeout(Duration::from_secs(10));
        Node {
            tables: tx,
            handle,
            live: live_rx,
        }
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a namespace test must skip: it needs root and `ping`. Says why.
    fn skip_without_root_and_ping() -> bool {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for network namespaces");
            return true;
        }
        if Command::new("ping").arg("-V").output().is_err() {
            eprintln!("skipped: ping (iputils-ping) is not installed");
            return true;
        }
        false
    }

    /// The daemon spawns `run` on a multi-threaded runtime, so its future must be `Send`.
    #[test]
    fn run_future_is_send() {
        fn is_send<T: Send>(_: T) {}
        let _ =
            |tap, udp, rx, live| is_send(run(tap, udp, Offload::Auto, rx, live, Arc::default()));
    }

    #[test]
    fn ping_crosses_the_sleeve_and_bad_datagrams_are_counted() {
        if skip_without_root_and_ping() {
            return;
        }
        let netns = Netns::new().expect("create namespaces");
        let [a, b] = netns.names.clone();
        let (counters_a, counters_b) =
            (Arc::new(Counters::default()), Arc::new(Counters::default()));
        let table_a = table(PEER_A, PEER_B, INDEX_A, INDEX_B, "192.168.77.2:6784");
        let table_b = table(PEER_B, PEER_A, INDEX_B, INDEX_A, "192.168.77.1:6784");
        let b_to_a_key = table_b.sessions[&PEER_A].send_key;
        let (a_with_b, b_with_a) = (
            table_a.peer_traffic[&PEER_B].clone(),
            table_b.peer_traffic[&PEER_A].clone(),
        );
        let node_a = start_node(&a, table_a, counters_a.clone());
        let node_b = start_node(&b, table_b, counters_b.clone());
        for (ns, addr) in [(&a, "10.77.0.1/24"), (&b, "10.77.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", TAP]).expect("address tap");
            ip(&["-n", ns, "link", "set", TAP, "up"]).expect("set tap up");
        }

        let ping = Command::new("ip")
            .args([
                "netns",
                "exec",
                &a,
                "ping",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "2",
                "10.77.0.2",
            ])
            .output()
            .expect("run ping");
        assert!(
            ping.status.success(),
            "ping failed: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
        for (name, c) in [("a", &counters_a), ("b", &counters_b)] {
            let snap = c.snapshot();
            assert!(
                snap["tx_datagrams"] >= 3 && snap["rx_datagrams"] >= 3,
                "{name}: {snap:?}"
            );
            assert!(
                snap["tx_frames"] >= 3 && snap["rx_frames"] >= 3,
                "{name}: {snap:?}"
            );
        }
        // Each end counts the echo frames it exchanged with the other, by peer: 3 each way, 98
        // bytes of Ethernet frame each (ARP and anything else only add to that).
        for (name, traffic) in [("a", &a_with_b), ("b", &b_with_a)] {
            let (rx_packets, rx_bytes, tx_packets, tx_bytes) = traffic.snapshot();
            assert!(
                rx_packets >= 3 && tx_packets >= 3 && rx_bytes >= 3 * 98 && tx_bytes >= 3 * 98,
                "{name}: per-peer traffic {:?}",
                traffic.snapshot()
            );
        }
        let before = counters_a.snapshot();

        // Forged, truncated and replayed datagrams from B's side at A's sleeve port.
        let forger = in_netns(&b, move || {
            let sock = std::net::UdpSocket::bind("192.168.77.2:0").expect("bind forger");
            let send = |d: &[u8]| sock.send_to(d, "192.168.77.1:6784").expect("send forged");
            let header = |kind: Kind, index: u32, counter: u64| {
                let mut h = [0u8; HEADER_LEN];
                Header {
                    kind,
                    flags: 0,
                    receiver_index: index,
                    counter,
                }
                .emit(&mut h);
                h
            };
            let mut body = Vec::new();
            BodyHeader {
                src: PEER_B,
                dst: Some(PEER_A),
                hop_limit: 1,
                frame_count: 1,
            }
            .emit(&mut body);
            frame::push_frame(&mut body, &[0x02; 60]);

            send(&[1, 0, 0]); // truncated header
            let mut unknown_kind = header(Kind::Sealed, INDEX_A, 1);
            unknown_kind[0] = 9;
            send(&unknown_kind); // malformed
            send(&[header(Kind::Sealed, 77, 1).as_slice(), &body].concat()); // unknown session
            let forged = header(Kind::Sealed, INDEX_A, 1 << 40);
            send(&[forged.as_slice(), &body, &[0; 16]].concat()); // auth failed
            send(&[header(Kind::Plain, INDEX_A, 1 << 41).as_slice(), &body].concat()); // plain
                                                                                       // Authentic but replayed: counter 0 was used by real traffic during the ping.
            let head = header(Kind::Sealed, INDEX_A, 0);
            let mut sealed = body.clone();
            SealingKey::new(&b_to_a_key).seal(&head, 0, &mut sealed);
            send(&[head.as_slice(), &sealed].concat());
            // Authentic, fresh, but its body is cut short: truncated after opening. Sealed under
            // the key of its counter's epoch.
            let head = header(Kind::Sealed, INDEX_A, 1 << 42);
            let mut short = body[..body.len() - 1].to_vec();
            let epoch = crypto::epoch_of(1 << 42, crypto::EPOCH_SHIFT_MIN);
            SealingKey::new(&crypto::epoch_key(&b_to_a_key, epoch)).seal(
                &head,
                1 << 42,
                &mut short,
            );
            send(&[head.as_slice(), &short].concat());
        });
        forger.join().expect("forger thread");

        let expect = [
            ("truncated", 2),
            ("malformed", 1),
            ("unknown_session", 1),
            ("auth_failed", 1),
            ("plain_when_sealed", 1),
            ("replayed", 1),
        ];
        wait_for("drop counters", || {
            let now = counters_a.snapshot();
            expect.iter().all(|(k, n)| now[k] >= before[k] + n)
        });
        let now = counters_a.snapshot();
        for (k, n) in expect {
            assert_eq!(now[k] - before[k], n, "{k}: {now:?}");
        }

        node_a.stop();
        node_b.stop();
    }

    /// Packets the kernel received on `TAP` in `ns`, i.e. frames the sleeve wrote into it.
    fn tap_rx_packets(ns: &str) -> u64 {
        let out = Command::new("ip")
            .args(["-n", ns, "-s", "-j", "link", "show", TAP])
            .output()
            .expect("run ip");
        let links: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
        links[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .expect("ip -s -j shows rx packets")
    }

    /// B still sends over the sleeve to A, which already has B on VXLAN (each end switches on its
    /// own probes): A writes none of it into its TAP, or its bridge would learn B's MACs there.
    #[test]
    fn frames_from_a_peer_on_vxlan_never_reach_the_tap() {
        if skip_without_root_and_ping() {
            return;
        }
        let netns = Netns::new().expect("create namespaces");
        let [a, b] = netns.names.clone();
        let counters_a = Arc::new(Counters::default());
        let on_sleeve = table(PEER_A, PEER_B, INDEX_A, INDEX_B, "192.168.77.2:6784");
        let mut on_vxlan = on_sleeve.clone();
        on_vxlan.vxlan.insert(
            PEER_B,
            "192.168.77.2:6785".parse().expect("literal address"),
        );
        let table_b = table(PEER_B, PEER_A, INDEX_B, INDEX_A, "192.168.77.1:6784");
        let node_a = start_node(&a, on_vxlan, counters_a.clone());
        let node_b = start_node(&b, table_b, Arc::default());
        for (ns, addr) in [(&a, "10.77.0.1/24"), (&b, "10.77.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", TAP]).expect("address tap");
            ip(&["-n", ns, "link", "set", TAP, "up"]).expect("set tap up");
        }
        let ping = |count: &str| {
            Command::new("ip")
                .args([
                    "netns", "exec", &b, "ping", "-c", count, "-i", "0.2", "-W", "1",
                ])
                .arg("10.77.0.1")
                .output()
                .expect("run ping")
                .status
                .success()
        };

        assert!(!ping("3"), "B reached A's TAP over the sleeve");
        let drops = counters_a.snapshot()["from_vxlan_peer"];
        assert!(drops >= 1, "B's ARP requests were not counted: {drops}");
        assert_eq!(
            tap_rx_packets(&a),
            0,
            "the sleeve wrote B's frames into A's TAP"
        );

        // Once A has B on the sleeve again, the same frames go through. Both threads are idle
        // and take the table before their next packet, so it is live at once, not after
        // ADOPT_MAX.
        let on_sleeve = Arc::new(on_sleeve);
        let sent = Instant::now();
        node_a.tables.send_replace(on_sleeve.clone());
        wait_for("the table to be live", || {
            Arc::ptr_eq(&node_a.live.borrow(), &on_sleeve)
        });
        assert!(
            sent.elapsed() < ADOPT_MAX / 2,
            "live after {:?}",
            sent.elapsed()
        );
        wait_for("a ping over the sleeve", || ping("1"));
        assert!(tap_rx_packets(&a) > 0);

        node_a.stop();
        node_b.stop();
    }
}

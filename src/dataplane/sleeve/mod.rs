//! The sleeve: a userspace UDP overlay that carries Ethernet frames between peers.
//!
//! One task ([`run`]) owns everything that changes per packet: the MAC table (which peer owns a
//! MAC), and per session the send counter and the replay window. It selects over TAP reads, UDP
//! reads and new forwarding tables, so no locks are needed. Routes and keys come from the
//! [`ForwardingTable`] the control loop publishes; the sleeve never waits on the control loop.
//!
//! Not here: the wire format (`frame.rs`), sealing (`crypto.rs`), replay windows (`replay.rs`),
//! opening the TAP (`dataplane::tap`), computing routes or keys (control plane).
//!
//! Invariants: a session's send counter only grows while its keys stay the same; MACs are learned
//! only from authenticated datagrams, never from frames our own TAP gave us; every dropped frame or
//! datagram is counted in [`Counters`]. Weave equivalent: `router/sleeve.go`.

pub mod crypto;
pub mod frame;
pub mod replay;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use mesh::PeerName;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use self::crypto::{OpeningKey, SealingKey, TAG_LEN};
use self::frame::{
    BodyHeader, FrameError, Header, Kind, ETHERNET_HEADER_LEN, FLAG_RELAY_ONLY, FRAME_COUNT_OFFSET,
    HEADER_LEN,
};
use self::replay::ReplayWindow;
use super::forwarding::{ForwardingTable, SessionParams};

/// Hop limit of bodies we originate.
pub const HOP_LIMIT: u8 = 16;

/// Frames read from the TAP in one burst are packed into one datagram while its body stays under
/// this many bytes (a first frame always goes, whatever its size).
const BATCH_BODY_MAX: usize = 1400;
/// At most this many TAP frames are read per wakeup, so UDP input is not starved.
const BURST_FRAMES_MAX: usize = 64;
/// Largest datagram or frame we read.
const BUF_LEN: usize = u16::MAX as usize;
/// Learned MACs beyond this many are not recorded (bounds memory a misbehaving peer can use).
const MACS_MAX: usize = 65_536;
/// Send counters stop here; the control plane must rotate keys before.
const COUNTER_MAX: u64 = u64::MAX - (1 << 16);

/// Packet and drop counts, shared with the status API.
///
/// Drops count what was dropped: a datagram for receive-side reasons, a frame for `no_route` and
/// `tap_write`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received on the UDP socket.
    pub rx_datagrams: AtomicU64,
    /// Datagrams sent on the UDP socket.
    pub tx_datagrams: AtomicU64,
    /// Frames received in accepted datagrams.
    pub rx_frames: AtomicU64,
    /// Frames sent (once per datagram that carried them).
    pub tx_frames: AtomicU64,
    /// Bytes of received datagrams.
    pub rx_bytes: AtomicU64,
    /// Bytes of sent datagrams.
    pub tx_bytes: AtomicU64,
    /// Frames relayed to another peer on the way to their destination.
    pub relayed_frames: AtomicU64,
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
}

impl Counters {
    /// All counters by name, for the status JSON. Drop counters are named by reason alone
    /// ("malformed", "truncated", ...).
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let all: [(&'static str, &AtomicU64); 16] = [
            ("rx_datagrams", &self.rx_datagrams),
            ("tx_datagrams", &self.tx_datagrams),
            ("rx_frames", &self.rx_frames),
            ("tx_frames", &self.tx_frames),
            ("rx_bytes", &self.rx_bytes),
            ("tx_bytes", &self.tx_bytes),
            ("relayed_frames", &self.relayed_frames),
            ("malformed", &self.drop_malformed),
            ("truncated", &self.drop_truncated),
            ("unknown_session", &self.drop_unknown_session),
            ("replayed", &self.drop_replayed),
            ("auth_failed", &self.drop_auth_failed),
            ("plain_when_sealed", &self.drop_plain_when_sealed),
            ("hop_limit", &self.drop_hop_limit),
            ("no_route", &self.drop_no_route),
            ("tap_write", &self.drop_tap_write),
        ];
        all.iter()
            .map(|(name, c)| (*name, c.load(Ordering::Relaxed)))
            .collect()
    }

    /// Only the drop counters, by reason.
    pub fn drops(&self) -> BTreeMap<&'static str, u64> {
        let mut all = self.snapshot();
        all.retain(|name, _| !TRAFFIC.contains(name));
        all
    }
}

/// Names in [`Counters::snapshot`] that count traffic rather than drops.
const TRAFFIC: [&str; 7] = [
    "rx_datagrams",
    "tx_datagrams",
    "rx_frames",
    "tx_frames",
    "rx_bytes",
    "tx_bytes",
    "relayed_frames",
];

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Runs the sleeve until the forwarding table's sender is dropped (then returns `Ok`) or the TAP
/// or UDP socket fails.
pub async fn run(
    tap: tun_rs::AsyncDevice,
    udp: UdpSocket,
    mut table: watch::Receiver<Arc<ForwardingTable>>,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let first = table.borrow_and_update().clone();
    let mut sleeve = Sleeve::new(first, udp, tap, counters);
    let mut udp_buf = vec![0u8; BUF_LEN];
    let mut tap_buf = vec![0u8; BUF_LEN];
    let mut batch = Batch::default();
    loop {
        tokio::select! {
            read = sleeve.tap.recv(&mut tap_buf) => {
                let len = read.context("read frame from tap")?;
                sleeve.handle_tap_burst(&mut tap_buf, len, &mut batch).await?;
            }
            read = sleeve.udp.recv_from(&mut udp_buf) => match read {
                Ok((len, from)) => sleeve.handle_datagram(&mut udp_buf[..len], from).await,
                // ICMP errors reported by the kernel for earlier sends; not fatal.
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset) => {
                    tracing::debug!(error = %e, "sleeve socket reported an error");
                }
                Err(e) => return Err(e).context("receive datagram on sleeve socket"),
            },
            changed = table.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let next = table.borrow_and_update().clone();
                sleeve.apply_table(next);
            }
        }
    }
}

/// Per-session state the sleeve task owns.
struct Session {
    params: Arc<SessionParams>,
    sealing: SealingKey,
    opening: OpeningKey,
    send_counter: u64,
    replay: ReplayWindow,
}

impl Session {
    fn new(params: Arc<SessionParams>) -> Self {
        Self {
            sealing: SealingKey::new(&params.send_key),
            opening: OpeningKey::new(&params.recv_key),
            send_counter: 0,
            replay: ReplayWindow::new(),
            params,
        }
    }

    fn same_keys(&self, other: &SessionParams) -> bool {
        self.params.local_index == other.local_index
            && self.params.send_key == other.send_key
            && self.params.recv_key == other.recv_key
    }
}

/// Where a body goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    Broadcast,
    Peer(PeerName),
}

/// Plaintext body being filled with frames from the TAP, all for one destination.
#[derive(Default)]
struct Batch {
    dest: Option<Dest>,
    body: Vec<u8>,
    frames: u8,
}

struct Sleeve {
    table: Arc<ForwardingTable>,
    sessions: BTreeMap<PeerName, Session>,
    by_index: HashMap<u32, PeerName>,
    macs: HashMap<[u8; 6], PeerName>,
    counters: Arc<Counters>,
    /// Outgoing datagram, reused.
    out: Vec<u8>,
    udp: UdpSocket,
    tap: tun_rs::AsyncDevice,
}

impl Sleeve {
    fn new(
        table: Arc<ForwardingTable>,
        udp: UdpSocket,
        tap: tun_rs::AsyncDevice,
        counters: Arc<Counters>,
    ) -> Self {
        let mut sleeve = Self {
            table: Arc::new(ForwardingTable::empty(table.me, table.sealed)),
            sessions: BTreeMap::new(),
            by_index: HashMap::new(),
            macs: HashMap::new(),
            counters,
            out: Vec::with_capacity(BUF_LEN + TAG_LEN),
            udp,
            tap,
        };
        sleeve.apply_table(table);
        sleeve
    }

    /// Adopts a new table: sessions with unchanged index and keys keep their counters and replay
    /// windows, changed ones start over, vanished ones are dropped.
    fn apply_table(&mut self, table: Arc<ForwardingTable>) {
        let mut old = std::mem::take(&mut self.sessions);
        for (peer, params) in &table.sessions {
            let session = match old.remove(peer) {
                Some(mut s) if s.same_keys(params) => {
                    s.params = params.clone();
                    s
                }
                _ => Session::new(params.clone()),
            };
            self.sessions.insert(*peer, session);
        }
        self.by_index = self
            .sessions
            .iter()
            .map(|(p, s)| (s.params.local_index, *p))
            .collect();
        // A peer on VXLAN is reached through the bridge's own learning; a MAC we still mapped to
        // it would send a flooded frame a second time over the sleeve.
        self.macs.retain(|_, owner| {
            table.unicast.contains_key(owner) && !table.vxlan.contains_key(owner)
        });
        self.table = table;
    }

    /// Reads what the TAP has ready (the first frame is already in `buf`) and sends it, packing
    /// consecutive frames for the same destination into one datagram.
    // HOT PATH
    async fn handle_tap_burst(
        &mut self,
        buf: &mut [u8],
        first_len: usize,
        batch: &mut Batch,
    ) -> anyhow::Result<()> {
        let mut len = first_len;
        for _ in 0..BURST_FRAMES_MAX {
            self.handle_tap_frame(&buf[..len], batch).await;
            len = match self.tap.try_recv(buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("read frame from tap"),
            };
        }
        self.flush(batch).await;
        Ok(())
    }

    // HOT PATH
    async fn handle_tap_frame(&mut self, frame: &[u8], batch: &mut Batch) {
        let Some(dst_mac) = frame
            .first_chunk::<6>()
            .filter(|_| frame.len() >= ETHERNET_HEADER_LEN)
        else {
            tracing::debug!(
                len = frame.len(),
                "tap gave a frame shorter than an ethernet header"
            );
            return;
        };
        let dest = match self.macs.get(dst_mac) {
            Some(owner) if dst_mac[0] & 1 == 0 => Dest::Peer(*owner),
            _ => Dest::Broadcast,
        };
        let fits = batch.body.len() + frame::FRAME_PREFIX_LEN + frame.len() <= BATCH_BODY_MAX;
        if batch.dest != Some(dest) || !fits || batch.frames == u8::MAX {
            self.flush(batch).await;
        }
        if batch.dest.is_none() {
            batch.dest = Some(dest);
            batch.body.clear();
            batch.frames = 0;
            let dst = match dest {
                Dest::Broadcast => None,
                Dest::Peer(p) => Some(p),
            };
            BodyHeader {
                src: self.table.me,
                dst,
                hop_limit: HOP_LIMIT,
                frame_count: 0,
            }
            .emit(&mut batch.body);
        }
        frame::push_frame(&mut batch.body, frame);
        batch.frames += 1;
    }

    /// Sends the batch (if any) and empties it.
    async fn flush(&mut self, batch: &mut Batch) {
        let Some(dest) = batch.dest.take() else {
            return;
        };
        batch.body[FRAME_COUNT_OFFSET] = batch.frames;
        let frames = u64::from(batch.frames);
        match dest {
            Dest::Broadcast => {
                let table = self.table.clone();
                for child in table.broadcast.get(&table.me).into_iter().flatten() {
                    // The bridge also flooded this frame to the VXLAN port, which delivered it
                    // to the peers on VXLAN; they still relay it to their subtrees.
                    let flags = if table.vxlan.contains_key(child) {
                        FLAG_RELAY_ONLY
                    } else {
                        0
                    };
                    self.send_to_neighbour(*child, &batch.body, frames, flags)
                        .await;
                }
            }
            Dest::Peer(peer) => match self.table.unicast.get(&peer).copied() {
                Some(hop) => self.send_to_neighbour(hop, &batch.body, frames, 0).await,
                None => {
                    tracing::debug!(%peer, "no route to peer; dropping frames");
                    bump(&self.counters.drop_no_route, frames);
                }
            },
        }
    }

    /// Seals `body` for `hop` and sends it. `frames` is how many frames the body holds.
    // HOT PATH
    async fn send_to_neighbour(&mut self, hop: PeerName, body: &[u8], frames: u64, flags: u8) {
        let sealed = self.table.sealed;
        let Some(session) = self.sessions.get_mut(&hop) else {
            tracing::debug!(%hop, "no session to next hop; dropping frames");
            bump(&self.counters.drop_no_route, frames);
            return;
        };
        if session.send_counter >= COUNTER_MAX {
            tracing::debug!(%hop, "send counter exhausted; waiting for new keys");
            bump(&self.counters.drop_no_route, frames);
            return;
        }
        let counter = session.send_counter;
        session.send_counter += 1;
        let kind = if sealed { Kind::Sealed } else { Kind::Plain };
        let header = Header {
            kind,
            flags,
            receiver_index: session.params.remote_index,
            counter,
        };
        let mut head = [0u8; HEADER_LEN];
        header.emit(&mut head);
        self.out.clear();
        self.out.extend_from_slice(&head);
        self.out.extend_from_slice(body);
        if sealed {
            let tag = session
                .sealing
                .seal_detached(&head, counter, &mut self.out[HEADER_LEN..]);
            self.out.extend_from_slice(&tag);
        }
        let addr = session.params.remote_addr;
        match self.udp.send_to(&self.out, addr).await {
            Ok(sent) => {
                bump(&self.counters.tx_datagrams, 1);
                bump(&self.counters.tx_frames, frames);
                bump(&self.counters.tx_bytes, sent as u64);
            }
            // Not counted as a drop reason of its own: the path is broken, the control plane
            // will notice through its own connection.
            Err(e) => tracing::debug!(%hop, %addr, error = %e, "send sleeve datagram"),
        }
    }

    /// Authenticates, checks and delivers or relays one datagram. Never fails: every problem is
    /// a counted drop.
    // HOT PATH
    async fn handle_datagram(&mut self, buf: &mut [u8], from: SocketAddr) {
        bump(&self.counters.rx_datagrams, 1);
        bump(&self.counters.rx_bytes, buf.len() as u64);
        let (header, _) = match Header::parse(buf) {
            Ok(parsed) => parsed,
            Err(e) => return self.drop_bad_frame(e, from),
        };
        let Some((peer, session)) = self
            .by_index
            .get(&header.receiver_index)
            .and_then(|peer| Some((*peer, self.sessions.get_mut(peer)?)))
        else {
            tracing::debug!(%from, index = header.receiver_index, "datagram for unknown session");
            return bump(&self.counters.drop_unknown_session, 1);
        };
        let (head, rest) = buf.split_at_mut(HEADER_LEN);
        let head: &[u8; HEADER_LEN] = (&*head).try_into().expect("split at HEADER_LEN");
        let body_len = match header.kind {
            Kind::Plain if self.table.sealed => {
                tracing::debug!(%from, %peer, "plain datagram while sealed");
                return bump(&self.counters.drop_plain_when_sealed, 1);
            }
            Kind::Plain => rest.len(),
            Kind::Sealed => {
                if !session.replay.would_accept(header.counter) {
                    tracing::debug!(%from, %peer, counter = header.counter, "replayed datagram");
                    return bump(&self.counters.drop_replayed, 1);
                }
                let len = match session.opening.open(head, header.counter, rest) {
                    Ok(plain) => plain.len(),
                    Err(e) => {
                        tracing::debug!(%from, %peer, error = %e, "dropping datagram");
                        return bump(&self.counters.drop_auth_failed, 1);
                    }
                };
                if !session.replay.accept(header.counter) {
                    tracing::debug!(%from, %peer, counter = header.counter, "replayed datagram");
                    return bump(&self.counters.drop_replayed, 1);
                }
                len
            }
        };
        let relay_only = header.flags & FLAG_RELAY_ONLY != 0;
        self.handle_body(&mut rest[..body_len], peer, from, relay_only)
            .await;
    }

    /// Delivers and relays an authenticated body that came from neighbour `via`. A `relay_only`
    /// body reached us over VXLAN already: it is relayed, not delivered, and teaches no MACs.
    // HOT PATH
    async fn handle_body(
        &mut self,
        body: &mut [u8],
        via: PeerName,
        from: SocketAddr,
        relay_only: bool,
    ) {
        let (head, frames) = match BodyHeader::parse(body) {
            Ok(parsed) => parsed,
            Err(e) => return self.drop_bad_frame(e, from),
        };
        let me = self.table.me;
        if head.src == me {
            tracing::debug!(%from, "our own frames came back; dropping");
            return bump(&self.counters.drop_malformed, 1);
        }
        let frame_count = u64::from(head.frame_count);
        bump(&self.counters.rx_frames, frame_count);
        if !relay_only {
            for frame in frames.clone() {
                let src_mac: [u8; 6] = frame[6..12]
                    .try_into()
                    .expect("frames hold an ethernet header");
                self.learn(src_mac, head.src);
            }
        }
        if !relay_only && (head.dst.is_none() || head.dst == Some(me)) {
            for frame in frames {
                if let Err(e) = self.tap.send(frame).await {
                    tracing::debug!(error = %e, "write frame to tap");
                    bump(&self.counters.drop_tap_write, 1);
                }
            }
        }
        if head.dst == Some(me) {
            return;
        }
        if head.hop_limit == 0 {
            tracing::debug!(%from, src = %head.src, "hop limit reached; not relaying");
            return bump(&self.counters.drop_hop_limit, 1);
        }
        body[frame::HOP_LIMIT_OFFSET] = head.hop_limit - 1;
        let table = self.table.clone();
        match head.dst {
            None => {
                for child in table.broadcast.get(&head.src).into_iter().flatten() {
                    if *child != via {
                        self.send_to_neighbour(*child, body, frame_count, 0).await;
                    }
                }
            }
            Some(dst) => match table.unicast.get(&dst) {
                Some(hop) => {
                    bump(&self.counters.relayed_frames, frame_count);
                    self.send_to_neighbour(*hop, body, frame_count, 0).await;
                }
                None => {
                    tracing::debug!(%dst, "no route to relay to");
                    bump(&self.counters.drop_no_route, frame_count);
                }
            },
        }
    }

    fn learn(&mut self, mac: [u8; 6], owner: PeerName) {
        // Group addresses are never a frame's source; don't let one steer unicast.
        if mac[0] & 1 != 0 {
            return;
        }
        if self.macs.len() < MACS_MAX || self.macs.contains_key(&mac) {
            self.macs.insert(mac, owner);
        }
    }

    fn drop_bad_frame(&self, e: FrameError, from: SocketAddr) {
        tracing::debug!(%from, error = %e, "dropping datagram");
        match e {
            FrameError::Truncated => bump(&self.counters.drop_truncated, 1),
            _ => bump(&self.counters.drop_malformed, 1),
        }
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
    use crate::dataplane::sleeve::crypto::derive_keys;
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
        };
        t.sessions.insert(peer, Arc::new(params));
        t
    }

    /// Starts `run` in netns `ns`; returns once the TAP exists. Drop the sender to stop it.
    fn start_node(
        ns: &str,
        t: ForwardingTable,
        counters: Arc<Counters>,
    ) -> (
        watch::Sender<Arc<ForwardingTable>>,
        std::thread::JoinHandle<anyhow::Result<()>>,
    ) {
        let (tx, rx) = watch::channel(Arc::new(t));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = in_netns(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let tap = tun_rs::DeviceBuilder::new()
                    .name(TAP)
                    .layer(tun_rs::Layer::L2)
                    .build_async()
                    .context("create tap")?;
                let udp = UdpSocket::bind("0.0.0.0:6784")
                    .await
                    .context("bind sleeve socket")?;
                let _ = ready_tx.send(());
                run(tap, udp, rx, counters).await
            })
        });
        // If the thread failed before signalling, the error shows when it is joined.
        let _ = ready_rx.recv_timeout(Duration::from_secs(10));
        (tx, handle)
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon spawns `run` on a multi-threaded runtime, so its future must be `Send`.
    #[test]
    fn run_future_is_send() {
        fn is_send<T: Send>(_: T) {}
        let _ = |tap, udp, rx| is_send(run(tap, udp, rx, Arc::default()));
    }

    #[test]
    fn ping_crosses_the_sleeve_and_bad_datagrams_are_counted() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for network namespaces");
            return;
        }
        if Command::new("ping").arg("-V").output().is_err() {
            eprintln!("skipped: ping (iputils-ping) is not installed");
            return;
        }
        let netns = Netns::new().expect("create namespaces");
        let [a, b] = netns.names.clone();
        let (counters_a, counters_b) =
            (Arc::new(Counters::default()), Arc::new(Counters::default()));
        let table_a = table(PEER_A, PEER_B, INDEX_A, INDEX_B, "192.168.77.2:6784");
        let table_b = table(PEER_B, PEER_A, INDEX_B, INDEX_A, "192.168.77.1:6784");
        let b_to_a_key = table_b.sessions[&PEER_A].send_key;
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
            // Authentic, fresh, but its body is cut short: truncated after opening.
            let head = header(Kind::Sealed, INDEX_A, 1 << 42);
            let mut short = body[..body.len() - 1].to_vec();
            SealingKey::new(&b_to_a_key).seal(&head, 1 << 42, &mut short);
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

        for (tx, handle) in [node_a, node_b] {
            drop(tx);
            handle
                .join()
                .expect("sleeve thread")
                .expect("sleeve ran cleanly");
        }
    }
}

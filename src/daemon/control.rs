//! The control loop: the only owner of the mesh [`Router`] and the only caller of its `handle_*` and
//! `poll_*` methods, and the only place in the control plane that reads the clock.
//!
//! It selects over: inputs from connection tasks (handshakes done or failed, messages, closes), calls
//! from the local API, the router's next deadline, and termination signals. After every input it drains
//! the router's transmits and events, and when routes or sessions changed it publishes a new
//! [`ForwardingTable`] for the data plane, which never waits on this loop.
//!
//! Each QUIC connection gets a reader task (frames -> [`Input::Message`]) and a writer task (an unbounded
//! queue -> frames); dials and accepts run the password handshake in their own tasks.
//!
//! The fast path: every [`PROBE_INTERVAL`] it probes the VXLAN path to each candidate peer (through
//! the prober task in `dataplane::vxlan`), answers the peers' probes, and feeds the answers to
//! `dataplane::overlay`, whose choice decides `ForwardingTable::vxlan`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use mesh::{ConnId, Event, Identity, PeerName, Router, RouterConfig, TargetKind, TargetState};
use tokio::sync::{mpsc, watch};

use crate::api::server::Call;
use crate::api::types::{
    ConnectionStatus, GossipStatus, IpamAllocation, IpamOwner, IpamStatus, IpamSubnet, LinkStatus,
    PeerStatus, PeerTraffic, SleeveStatus, Status, TargetStatus, TrafficCounts,
};
use crate::dataplane::forwarding::{ForwardingTable, SessionParams, Traffic};
use crate::dataplane::overlay::{self, Choice, PeerFacts, ProbeState, PROBE_INTERVAL};
use crate::dataplane::sleeve::crypto::{agree_epoch_shift, derive_keys, Cipher};
use crate::dataplane::sleeve::{udp, Counters, DATAGRAM_OVERHEAD_MAX};
use crate::dataplane::vxlan::{self, Probe, ProbeEvent, ProbeSend};
use crate::transport::handshake::{self, HandshakeError, Hello, HelloExt, VxlanHello};
use crate::transport::quic::SERVER_NAME;

mod names;

/// How long a dial or an accepted connection may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long stopping waits for queued control messages to reach the peers.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// How many refused inbound attempts status remembers, and for how long.
const REFUSALS_MAX: usize = 32;
const REFUSAL_TTL: Duration = Duration::from_secs(600);

/// File in the state directory listing the user targets, one `IP:PORT` per line.
const TARGETS_FILE: &str = "targets";

/// Reads the targets saved by a previous run; none if the file does not exist.
pub(super) fn load_targets(state_dir: &std::path::Path) -> Result<Vec<SocketAddr>> {
    let path = state_dir.join(TARGETS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context(format!("read saved targets {}", path.display()))
            )
        }
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse().map_err(|_| {
                anyhow::anyhow!(
                    "{}: {l:?} is not IP:PORT; fix or delete the file (launch rewrites it)",
                    path.display()
                )
            })
        })
        .collect()
}

/// Everything the loop needs from the composition root.
pub(super) struct Settings {
    pub(super) identity: Identity,
    pub(super) nickname: String,
    pub(super) password: Option<String>,
    /// `--cipher`: the sleeve cipher to insist on, if any.
    pub(super) cipher: Option<Cipher>,
    /// Datagrams per sleeve key as a power of two (`--sleeve-rekey-shift`).
    pub(super) epoch_shift: u8,
    pub(super) discovery: bool,
    pub(super) conn_limit: usize,
    /// Where the user targets are saved (`targets`, one address per line) for `launch --resume`.
    pub(super) state_dir: std::path::PathBuf,
    pub(super) port: u16,
    pub(super) bridge: String,
    pub(super) mtu: u32,
    pub(super) incarnation: u64,
    pub(super) endpoint: quinn::Endpoint,
    pub(super) table: watch::Sender<Arc<ForwardingTable>>,
    pub(super) counters: Arc<Counters>,
    /// The kernel fast path; `None` with `--no-fastpath`.
    pub(super) fastpath: Option<FastPath>,
    /// `--trusted-subnets`: traffic between two addresses inside these needs no encryption.
    pub(super) trusted_subnets: Vec<ipnet::IpNet>,
    pub(super) ipam: mesh::ipam::IpamConfig,
    pub(super) ipam_store: Option<super::ipam_store::Store>,
    pub(super) ipam_restored: Option<mesh::ipam::Persisted>,
    /// The name service: the loop publishes the router's names to it.
    pub(super) dns: Arc<crate::dns::Service>,
}

/// The fast path's device and the channels to its prober task.
pub(super) struct FastPath {
    pub(super) device: vxlan::Device,
    pub(super) probes: mpsc::UnboundedSender<ProbeSend>,
    pub(super) events: mpsc::UnboundedReceiver<ProbeEvent>,
}

/// An allocation that waits (for the bootstrap, or for space from peers).
struct PendingAlloc {
    key: String,
    subnet: Option<mesh::ipam::Cidr>,
    deadline: Instant,
    wait: Duration,
    reply: tokio::sync::oneshot::Sender<Result<(std::net::Ipv4Addr, u8), String>>,
}

type AllocReply = (
    tokio::sync::oneshot::Sender<Result<(std::net::Ipv4Addr, u8), String>>,
    Result<(std::net::Ipv4Addr, u8), String>,
);

/// What connection tasks report to the loop.
enum Input {
    Established(Box<NewConnection>),
    DialFailed {
        addr: SocketAddr,
        error: HandshakeError,
    },
    InboundFailed {
        addr: SocketAddr,
        error: HandshakeError,
    },
    Message {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    Closed {
        conn: ConnId,
        reason: String,
    },
}

struct NewConnection {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    established: handshake::Established,
    local_index: u32,
    outbound: bool,
    /// The address we dialed, or the remote address of an inbound connection.
    addr: SocketAddr,
}

/// What this router says about itself in every handshake.
struct Local {
    name: PeerName,
    nickname: String,
    password: Option<String>,
    data_port: u16,
    vxlan: Option<VxlanHello>,
    /// Source of unique sleeve receiver indices.
    next_index: AtomicU32,
    /// What our sleeve can do, sent in every `Hello`.
    ext: HelloExt,
    /// Datagrams per sleeve key as a power of two.
    epoch_shift: u8,
}

impl Local {
    fn hello(&self) -> Hello {
        Hello {
            name: self.name,
            nickname: self.nickname.clone(),
            sealed: self.password.is_some(),
            data_port: self.data_port,
            session_index: self.next_index.fetch_add(1, Ordering::Relaxed),
            ext: self.ext.clone(),
            epoch_shift: Some(self.epoch_shift),
            vxlan: self.vxlan,
        }
    }
}

struct Conn {
    peer: PeerName,
    nickname: String,
    addr: SocketAddr,
    outbound: bool,
    connection: quinn::Connection,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// The task writing `tx`'s messages to the stream; it ends once `tx` is dropped and the
    /// peer has read everything.
    writer: tokio::task::JoinHandle<()>,
    session: Arc<SessionParams>,
    /// What the peer offers for the fast path.
    vxlan: Option<VxlanHello>,
    /// Our address on this connection, for `--trusted-subnets`.
    local_ip: Option<IpAddr>,
    /// When the handshake completed (monotonic, and wall clock for the report).
    established_at: Instant,
    established_wall: SystemTime,
}

struct Refusal {
    addr: SocketAddr,
    error: String,
    at: Instant,
}

pub(super) struct Control {
    router: Router,
    local: Arc<Local>,
    settings: Settings,
    conns: HashMap<ConnId, Conn>,
    next_conn: u64,
    dialing: HashSet<SocketAddr>,
    refusals: VecDeque<Refusal>,
    /// Control-plane messages and their bytes, all connections together.
    gossip: GossipStatus,
    inputs_tx: mpsc::UnboundedSender<Input>,
    inputs_rx: mpsc::UnboundedReceiver<Input>,
    table_dirty: bool,
    ipam_store: Option<super::ipam_store::Store>,
    pending: Vec<PendingAlloc>,
    /// Allocation answers, sent only after the state that holds them is saved.
    replies: Vec<AllocReply>,
    /// `meshctl reset`: remove the IPAM state once stopped.
    reset: bool,
    /// Probe history per fast-path candidate.
    probes: HashMap<PeerName, ProbeState>,
    /// The overlay chosen for every known peer at the last evaluation.
    choices: BTreeMap<PeerName, Choice>,
    probe_events: Option<mpsc::UnboundedReceiver<ProbeEvent>>,
    /// `Records::generation` last published to the name service.
    dns_published: Option<u64>,
    /// Sleeve frames exchanged with each peer in the topology, kept across forwarding tables.
    peer_traffic: BTreeMap<PeerName, Traffic>,
}

impl Control {
    pub(super) fn new(mut settings: Settings) -> Result<Control> {
        let now = Instant::now();
        let name = settings.identity.name();
        let config = RouterConfig {
            nickname: settings.nickname.clone(),
            incarnation: settings.incarnation,
            discovery: settings.discovery,
            conn_limit: settings.conn_limit,
            ipam: settings.ipam.clone(),
            ..RouterConfig::default()
        };
        let mut router = Router::new(config, name, random_u64(), now);
        if let Some(p) = settings.ipam_restored.take() {
            let owned = p.allocator.all().count();
            router
                .ipam_restore(now, p)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!(allocations = owned, "restored IPAM state");
        }
        let ipam_store = settings.ipam_store.take();
        let local = Arc::new(Local {
            name,
            nickname: settings.nickname.clone(),
            password: settings.password.clone(),
            data_port: settings.port + 1,
            vxlan: settings.fastpath.as_ref().map(|f| VxlanHello {
                port: f.device.port,
                vni: vxlan::VNI,
                mac: f.device.mac,
            }),
            next_index: AtomicU32::new(random_u64() as u32),
            ext: HelloExt {
                offload: true,
                aes_fast: Cipher::aes_is_fast(),
                cipher: settings.cipher.map(Cipher::code),
            },
            epoch_shift: settings.epoch_shift,
        });
        let (inputs_tx, inputs_rx) = mpsc::unbounded_channel();
        let probe_events = settings.fastpath.as_mut().map(|f| {
            let (_, closed) = mpsc::unbounded_channel();
            std::mem::replace(&mut f.events, closed)
        });
        Ok(Control {
            ipam_store,
            pending: Vec::new(),
            replies: Vec::new(),
            reset: false,
            router,
            local,
            settings,
            conns: HashMap::new(),
            next_conn: 1,
            dialing: HashSet::new(),
            refusals: VecDeque::new(),
            gossip: GossipStatus::default(),
            inputs_tx,
            inputs_rx,
            table_dirty: true,
            probes: HashMap::new(),
            choices: BTreeMap::new(),
            probe_events,
            dns_published: None,
            peer_traffic: BTreeMap::new(),
        })
    }

    /// Runs until `meshctl stop`, SIGTERM or SIGINT.
    pub(super) async fn run(
        mut self,
        targets: Vec<SocketAddr>,
        mut calls: mpsc::Receiver<Call>,
    ) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let accept = tokio::spawn(accept_loop(
            self.settings.endpoint.clone(),
            self.local.clone(),
            self.inputs_tx.clone(),
        ));
        self.router.add_targets(Instant::now(), &targets);
        self.save_targets();
        self.drain();
        let mut probe_tick = tokio::time::interval(PROBE_INTERVAL);
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe_events = self.probe_events.take();
        loop {
            let pending = self.pending.iter().map(|p| p.deadline).min();
            let deadline = [self.router.poll_timeout(), pending]
                .into_iter()
                .flatten()
                .min()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                Some(input) = self.inputs_rx.recv() => self.handle_input(input),
                call = calls.recv() => match call {
                    Some(Call::Stop(reply)) => {
                        let _ = reply.send(());
                        tracing::info!("stopping: asked through the API");
                        break;
                    }
                    Some(Call::Reset(reply)) => {
                        let answer = self.reset();
                        let _ = reply.send(answer);
                        break;
                    }
                    Some(call) => self.handle_call(call),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => self.router.handle_timeout(Instant::now()),
                _ = probe_tick.tick() => {
                    self.measure_paths();
                    self.probe_round(Instant::now());
                }
                Some(event) = next_probe_event(&mut probe_events) => self.handle_probe(Instant::now(), event),
                _ = sigterm.recv() => { tracing::info!("stopping: SIGTERM"); break; }
                _ = sigint.recv() => { tracing::info!("stopping: SIGINT"); break; }
            }
            self.drain();
        }
        accept.abort();
        // Let each writer send what is queued (after `meshctl reset`, the hand-over of our
        // space) before the connections close: closing discards unsent data. Bounded, for
        // peers that no longer read.
        // Dropping each `Conn` drops its queue's sender, which lets its writer finish.
        let mut conns: Vec<(quinn::Connection, tokio::task::JoinHandle<()>)> = self
            .conns
            .drain()
            .map(|(_, c)| (c.connection, c.writer))
            .collect();
        let flushed = async {
            for (_, writer) in &mut conns {
                let _ = writer.await;
            }
        };
        let _ = tokio::time::timeout(FLUSH_WAIT, flushed).await;
        for (connection, _) in &conns {
            connection.close(0u32.into(), b"router stopping");
        }
        self.settings
            .endpoint
            .close(0u32.into(), b"router stopping");
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.settings.endpoint.wait_idle()).await;
        if self.reset {
            drop(self.ipam_store.take());
            // The identity goes too: the mesh now names this peer's successor for good, so a
            // later launch must join as a new peer.
            for file in [super::ipam_store::FILE, super::IDENTITY_FILE] {
                let path = self.settings.state_dir.join(file);
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::info!("reset: removed {}", path.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("reset: remove {}: {e}", path.display()),
                }
            }
        }
        Ok(())
    }

    fn handle_input(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Established(new) => self.handle_established(now, *new),
            Input::DialFailed { addr, error } => {
                self.dialing.remove(&addr);
                tracing::warn!(%addr, "connection to peer failed: {error}");
                self.router.handle_dial_failed(now, addr, error.to_string());
            }
            Input::InboundFailed { addr, error } => {
                tracing::warn!(%addr, "refused inbound connection: {error}");
                if !matches!(error, HandshakeError::Transport { .. }) {
                    self.refusals.retain(|r| r.addr != addr);
                    self.refusals.push_back(Refusal {
                        addr,
                        error: error.to_string(),
                        at: now,
                    });
                    while self.refusals.len() > REFUSALS_MAX {
                        self.refusals.pop_front();
                    }
                }
            }
            Input::Message { conn, bytes } => {
                self.gossip.rx_messages += 1;
                self.gossip.rx_bytes += bytes.len() as u64;
                if let Err(e) = self.router.handle_message(now, conn, &bytes) {
                    tracing::warn!(conn = conn.0, "closing connection: {e}");
                    self.close(conn, &e.to_string());
                    self.router.handle_disconnected(now, conn, e.to_string());
                }
            }
            Input::Closed { conn, reason } => {
                if let Some(c) = self.conns.remove(&conn) {
                    tracing::info!(peer = %c.peer, nickname = %c.nickname, addr = %c.addr, "connection closed: {reason}");
                    self.table_dirty = true;
                }
                self.router.handle_disconnected(now, conn, reason);
            }
        }
    }

    fn handle_established(&mut self, now: Instant, new: NewConnection) {
        if new.outbound {
            self.dialing.remove(&new.addr);
        }
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        let remote = new.established.remote.clone();
        let me = self.local.name;
        let (initiator, responder) = if new.established.initiator {
            (me, remote.name)
        } else {
            (remote.name, me)
        };
        let keys = derive_keys(&new.established.sleeve_secret, initiator, responder);
        let (send_key, recv_key) = if new.established.initiator {
            (keys.initiator_to_responder, keys.responder_to_initiator)
        } else {
            (keys.responder_to_initiator, keys.initiator_to_responder)
        };
        let session = Arc::new(SessionParams {
            peer: remote.name,
            remote_addr: SocketAddr::new(new.connection.remote_address().ip(), remote.data_port),
            local_index: new.local_index,
            remote_index: remote.session_index,
            send_key,
            recv_key,
            cipher: Cipher::negotiate(
                (
                    self.local.ext.aes_fast,
                    self.local.ext.cipher.and_then(Cipher::from_code),
                ),
                (
                    remote.ext.aes_fast,
                    remote.ext.cipher.and_then(Cipher::from_code),
                ),
            ),
            offload: remote.ext.offload,
            epoch_shift: agree_epoch_shift(Some(self.local.epoch_shift), remote.epoch_shift),
            traffic: Default::default(),
        });
        // quinn knows the local address only from packet info, which dialed connections may
        // lack; the route to the peer names it as well.
        let local_ip = new.connection.local_ip().or_else(|| {
            let probe = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).ok()?;
            probe.connect(new.connection.remote_address()).ok()?;
            probe.local_addr().ok().map(|a| a.ip())
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(writer(new.send, rx));
        tokio::spawn(reader(
            id,
            new.connection.clone(),
            new.recv,
            self.inputs_tx.clone(),
        ));
        tracing::info!(
            peer = %remote.name, nickname = %remote.nickname, addr = %new.addr,
            direction = if new.outbound { "outbound" } else { "inbound" }, "connection established"
        );
        self.conns.insert(
            id,
            Conn {
                peer: remote.name,
                nickname: remote.nickname.clone(),
                addr: new.addr,
                outbound: new.outbound,
                connection: new.connection,
                tx,
                writer,
                session,
                vxlan: remote.vxlan,
                local_ip,
                established_at: now,
                established_wall: SystemTime::now(),
            },
        );
        self.measure_paths();
        self.table_dirty = true;
        self.router.handle_connected(
            now,
            id,
            remote.name,
            remote.nickname,
            new.addr,
            new.outbound,
        );
    }

    fn handle_call(&mut self, call: Call) {
        let now = Instant::now();
        match call {
            Call::Status(reply) => {
                let _ = reply.send(self.status(now));
            }
            Call::Connect(addrs, reply) => {
                self.router.add_targets(now, &addrs);
                self.save_targets();
                let _ = reply.send(());
            }
            Call::Forget(addrs, reply) => {
                self.router.forget_targets(&addrs);
                self.save_targets();
                let _ = reply.send(());
            }
            Call::Stop(reply) => {
                let _ = reply.send(());
            }
            Call::Reset(reply) => {
                let _ = reply.send(self.reset());
            }
            Call::Allocate {
                key,
                subnet,
                wait,
                reply,
            } => self.pending.push(PendingAlloc {
                key,
                subnet,
                deadline: now + wait,
                wait,
                reply,
            }),
            Call::Release(key, reply) => {
                self.pending.retain(|p| p.key != key);
                let n = self.router.ipam_release(now, &key);
                tracing::info!(container = %key, released = n, "released addresses");
                let _ = reply.send(n);
            }
            Call::Ipam(reply) => {
                let _ = reply.send(self.ipam_status());
            }
            Call::RmPeer(name, reply) => {
                let answer = self.rmpeer(now, &name);
                let _ = reply.send(answer);
            }
            Call::DnsAdd { name, addrs, reply } => {
                let _ = reply.send(self.dns_add(&name, &addrs));
            }
            Call::DnsRemove { name, addr, reply } => {
                let _ = reply.send(self.dns_remove(now, &name, addr));
            }
        }
    }

    /// Hands our address space to a live peer (it must reach it before we stop).
    fn reset(&mut self) -> String {
        self.reset = true;
        let answer = match self.router.ipam_hand_over() {
            Some(to) => {
                let nick = self.nickname_of(to);
                tracing::info!(peer = %to, "reset: handed our address space over");
                format!("handed this router's address space to {to}{nick}; router stopped, its IPAM state and identity removed (a later launch joins as a new peer)")
            }
            None => "no live peer to hand address space to (this router owned none, or is alone); router stopped, its IPAM state and identity removed (a later launch joins as a new peer)".to_string(),
        };
        self.drain();
        answer
    }

    fn nickname_of(&self, peer: PeerName) -> String {
        self.router
            .topology()
            .peers()
            .find(|p| p.name == peer)
            .map(|p| format!(" ({})", p.nickname))
            .unwrap_or_default()
    }

    fn rmpeer(&mut self, now: Instant, name: &str) -> Result<String, String> {
        let peer = self
            .router
            .topology()
            .peers()
            .find(|p| p.name.to_string() == name || p.nickname == name)
            .map(|p| p.name)
            .or_else(|| name.parse::<PeerName>().ok())
            .ok_or_else(|| {
                format!("no peer named {name:?}; give a name or nickname from `meshctl ipam`")
            })?;
        self.router.ipam_remove_peer(now, peer)?;
        // Our own vote is in already: say how far the claim got.
        let progress = self
            .router
            .ipam()
            .status()
            .claims
            .into_iter()
            .find(|c| c.contains(&format!(" claims {peer} ")))
            .unwrap_or_default();
        Ok(format!(
            "reclaim of {peer}{} started: its space moves once routers owning more than half of the address range agree (see `meshctl ipam`); now: {progress}",
            self.nickname_of(peer)
        ))
    }

    /// Retries waiting allocations; answers those done, refused or out of time.
    fn retry_allocations(&mut self, now: Instant) {
        let mut still = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            if p.reply.is_closed() {
                continue;
            }
            match self.router.ipam_allocate(now, &p.key, p.subnet) {
                Ok(addr) => {
                    tracing::info!(container = %p.key, address = %addr.0, "allocated");
                    self.replies.push((p.reply, Ok(addr)));
                }
                Err(mesh::ipam::AllocError::Waiting { reason }) if now < p.deadline => {
                    let _ = reason;
                    still.push(p);
                }
                Err(mesh::ipam::AllocError::Waiting { reason }) => {
                    let e = format!("no address after waiting {}s: {reason}", p.wait.as_secs());
                    self.replies.push((p.reply, Err(e)));
                }
                Err(e) => self.replies.push((p.reply, Err(e.to_string()))),
            }
        }
        self.pending = still;
    }

    /// Saves the IPAM state if it changed. Called before anything that depends on it leaves.
    fn save_ipam(&mut self) {
        if !self.router.ipam_take_dirty() {
            return;
        }
        if let Some(store) = &self.ipam_store {
            if let Err(e) = store.save(&self.router.ipam().persisted()) {
                // Without a durable copy we must not hand out what we cannot remember.
                tracing::error!("{e:#}");
                for (reply, _) in self.replies.drain(..) {
                    let _ = reply.send(Err(format!("cannot save IPAM state: {e:#}")));
                }
            }
        }
    }

    fn ipam_status(&self) -> IpamStatus {
        let s = self.router.ipam().status();
        let nick = |p: PeerName| {
            self.router
                .topology()
                .peers()
                .find(|x| x.name == p)
                .map(|x| x.nickname.clone())
        };
        let mut unreachable = std::collections::BTreeSet::new();
        let subnets = s
            .subnets
            .iter()
            .map(|sub| IpamSubnet {
                subnet: sub.subnet.to_string(),
                owners: sub
                    .owners
                    .iter()
                    .map(|o| {
                        if !o.reachable {
                            unreachable.insert(o.peer.to_string());
                        }
                        IpamOwner {
                            peer: o.peer.to_string(),
                            nickname: nick(o.peer),
                            owned: o.owned,
                            used: o.owned.saturating_sub(o.free),
                            free: o.free,
                            reachable: o.reachable,
                        }
                    })
                    .collect(),
            })
            .collect();
        IpamStatus {
            state: s.state.to_string(),
            waiting: s.waiting,
            conflict: s.conflict,
            range: s.universe.to_string(),
            bootstrap_members: s.genesis.map(|g| g.iter().map(|p| p.to_string()).collect()),
            subnets,
            unreachable_owners: unreachable.into_iter().collect(),
            reachable_percent: s
                .reachable_share
                .map(|(reach, all)| (reach as f64 * 1000.0 / all.max(1) as f64).round() / 10.0),
            allocations: s
                .allocations
                .into_iter()
                .map(|(subnet, container, addr, releasing)| IpamAllocation {
                    subnet: subnet.to_string(),
                    container,
                    address: addr.to_string(),
                    releasing,
                })
                .collect(),
            reclaims: s.claims,
        }
    }

    /// Drains the router's outputs until it has nothing more to say, then publishes the forwarding table
    /// if anything it depends on changed.
    fn drain(&mut self) {
        let now = Instant::now();
        self.retry_allocations(now);
        loop {
            self.save_ipam();
            for (reply, answer) in self.replies.drain(..) {
                let _ = reply.send(answer);
            }
            while let Some(e) = self.router.poll_ipam_event() {
                match e {
                    mesh::ipam::IpamEvent::Lost { .. }
                    | mesh::ipam::IpamEvent::Conflict { .. }
                    | mesh::ipam::IpamEvent::TakenTwice { .. } => tracing::warn!("ipam: {e:?}"),
                    _ => tracing::info!("ipam: {e:?}"),
                }
            }
            let mut progress = false;
            while let Some(t) = self.router.poll_transmit() {
                progress = true;
                if let Some(c) = self.conns.get(&t.conn) {
                    let bytes = t.encode();
                    self.gossip.tx_messages += 1;
                    self.gossip.tx_bytes += bytes.len() as u64;
                    let _ = c.tx.send(bytes);
                }
            }
            while let Some(event) = self.router.poll_event() {
                progress = true;
                match event {
                    Event::Dial { addr } => self.dial(addr),
                    Event::Close { conn, reason } => {
                        tracing::info!(conn = conn.0, "closing connection: {reason}");
                        self.close(conn, &reason);
                    }
                    Event::RoutesChanged => self.table_dirty = true,
                }
            }
            if !progress {
                break;
            }
        }
        self.publish_names();
        if self.table_dirty {
            // Routes or connections changed: who may be on VXLAN may have changed too.
            self.evaluate_overlays(Instant::now());
            self.table_dirty = false;
            self.publish_table();
        }
    }

    /// A live connection to `peer`, if any.
    fn conn_to(&self, peer: PeerName) -> Option<&Conn> {
        let live: HashSet<ConnId> = self.router.connections().iter().map(|c| c.conn).collect();
        self.conns
            .iter()
            .find(|(id, c)| c.peer == peer && live.contains(id))
            .map(|(_, c)| c)
    }

    /// Whether traffic with the peer behind `conn` must be encrypted.
    fn encryption_required(&self, conn: &Conn) -> bool {
        if self.local.password.is_none() {
            return false;
        }
        let trusted = |ip: IpAddr| {
            self.settings
                .trusted_subnets
                .iter()
                .any(|net| net.contains(&ip))
        };
        !(conn.local_ip.is_some_and(trusted) && trusted(conn.session.remote_addr.ip()))
    }

    /// The facts about `peer` that do not come from probes.
    /// Our children in our own broadcast tree: the peers [`Control::facts`] may put on VXLAN.
    /// Computed once per evaluation, not once per peer.
    fn own_children(&self) -> Vec<PeerName> {
        let me = self.local.name;
        mesh::routes::broadcast(self.router.topology(), me, me)
    }

    fn facts(&self, peer: PeerName, children: &[PeerName]) -> PeerFacts {
        let routes = self.router.routes();
        let conn = self.conn_to(peer);
        let direct =
            conn.is_some() && routes.unicast.get(&peer) == Some(&peer) && children.contains(&peer);
        let ours = self.settings.fastpath.as_ref().map(|f| f.device.port);
        let theirs = conn.and_then(|c| c.vxlan).map(|v| v.port);
        PeerFacts {
            fastpath: self.settings.fastpath.is_some(),
            encryption_required: conn.is_some_and(|c| self.encryption_required(c))
                || (conn.is_none() && self.local.password.is_some()),
            direct,
            supports_vxlan: conn
                .and_then(|c| c.vxlan)
                .is_some_and(|v| v.vni == vxlan::VNI)
                && conn.is_some_and(|c| c.session.remote_addr.is_ipv4()),
            port_mismatch: match (ours, theirs) {
                (Some(o), Some(t)) if o != t => Some((o, t)),
                _ => None,
            },
            path: None,
        }
    }

    /// Every peer in the topology but us.
    fn other_peers(&self) -> Vec<PeerName> {
        let me = self.local.name;
        self.router
            .topology()
            .peers()
            .map(|p| p.name)
            .filter(|p| *p != me)
            .collect()
    }

    /// Recomputes the overlay of every peer; marks the table dirty if the VXLAN set changed.
    fn evaluate_overlays(&mut self, now: Instant) {
        let peers = self.other_peers();
        let mut choices = BTreeMap::new();
        let children = self.own_children();
        for peer in peers {
            let mut facts = self.facts(peer, &children);
            if overlay::wants_probes(&facts) {
                facts.path = self.probes.get_mut(&peer).map(|p| p.evaluate(now));
            } else {
                self.probes.remove(&peer);
            }
            choices.insert(peer, overlay::choose(&facts));
        }
        self.probes.retain(|p, _| choices.contains_key(p));
        let on_vxlan = |c: &BTreeMap<PeerName, Choice>| -> Vec<PeerName> {
            c.iter()
                .filter(|(_, c)| **c == Choice::Vxlan)
                .map(|(p, _)| *p)
                .collect()
        };
        if on_vxlan(&choices) != on_vxlan(&self.choices) {
            self.table_dirty = true;
        }
        self.choices = choices;
    }

    /// Reads the kernel's route MTU to every neighbour's sleeve address and tells the sleeve how
    /// big a frame one datagram there carries, so that it answers bigger ones with ICMP "too
    /// big" instead of sending what the path can't carry.
    fn measure_paths(&self) {
        for c in self.conns.values() {
            let to = c.session.remote_addr;
            let Some(mtu) = udp::route_mtu(to) else {
                continue;
            };
            let ip_udp = if to.is_ipv4() { 28 } else { 48 };
            let frame = mtu.saturating_sub(ip_udp + DATAGRAM_OVERHEAD_MAX).max(1);
            let before = c.session.traffic.set_max_frame(frame);
            if before != frame && before != 0 {
                tracing::info!(
                    peer = %c.peer, nickname = %c.nickname, route_mtu = mtu,
                    "sleeve path to the peer now carries frames up to {frame} bytes (was {before})"
                );
            }
        }
    }

    /// Sends this round's probes (full MTU and small) to every candidate, then re-evaluates.
    fn probe_round(&mut self, now: Instant) {
        let Some(fast) = &self.settings.fastpath else {
            return;
        };
        let peers: Vec<PeerName> = self.choices.keys().copied().collect();
        let children = self.own_children();
        for peer in peers {
            let facts = self.facts(peer, &children);
            if !overlay::wants_probes(&facts) {
                continue;
            }
            let Some((to, dst_mac)) = self.conn_to(peer).and_then(vxlan_endpoint) else {
                continue;
            };
            let state = self
                .probes
                .entry(peer)
                .or_insert_with(|| ProbeState::new(now));
            for (full, frame_len) in [
                (true, self.settings.mtu as usize + 14),
                (false, vxlan::SMALL_PROBE_FRAME),
            ] {
                let probe = Probe {
                    answer: false,
                    declined: false,
                    full,
                    from: self.local.name,
                    seq: state.next_seq(),
                    reply_mac: fast.device.mac,
                };
                let _ = fast.probes.send(ProbeSend {
                    to,
                    dst_mac,
                    probe,
                    frame_len,
                });
            }
        }
        self.evaluate_overlays(now);
        if self.table_dirty {
            self.table_dirty = false;
            self.publish_table();
        }
    }

    /// Answers a peer's probe, or records the answer to one of ours.
    fn handle_probe(&mut self, now: Instant, event: ProbeEvent) {
        let ProbeEvent::Received(probe) = event;
        let Some(fast) = &self.settings.fastpath else {
            return;
        };
        if !probe.answer {
            let Some((to, _)) = self.conn_to(probe.from).and_then(vxlan_endpoint) else {
                return;
            };
            // Answer only where our own policy allows VXLAN with the prober: trust must be
            // mutual, so a peer that trusts our subnet can't put plaintext on our wire alone.
            let facts = self.facts(probe.from, &self.own_children());
            let declined = facts.encryption_required;
            if !declined && !overlay::wants_probes(&facts) {
                return;
            }
            let frame_len = if probe.full && !declined {
                self.settings.mtu as usize + 14
            } else {
                vxlan::SMALL_PROBE_FRAME
            };
            let _ = fast.probes.send(ProbeSend {
                to,
                dst_mac: probe.reply_mac,
                probe: Probe {
                    answer: true,
                    declined,
                    full: probe.full,
                    from: self.local.name,
                    seq: probe.seq,
                    reply_mac: fast.device.mac,
                },
                frame_len,
            });
            return;
        }
        match self.probes.get_mut(&probe.from) {
            Some(state) if state.sent(probe.seq) && probe.declined => state.on_declined(now),
            Some(state) if state.sent(probe.seq) => state.on_answer(now, probe.full),
            _ => return,
        }
        self.evaluate_overlays(now);
        if self.table_dirty {
            self.table_dirty = false;
            self.publish_table();
        }
    }

    /// Saves the user targets to `STATE_DIR/targets` (atomically), for `launch --resume`.
    fn save_targets(&self) {
        let text: String = self
            .router
            .user_targets()
            .iter()
            .map(|a| format!("{a}\n"))
            .collect();
        let path = self.settings.state_dir.join(TARGETS_FILE);
        let tmp = self.settings.state_dir.join("targets.tmp");
        let result = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            tracing::warn!("save targets to {}: {e}", path.display());
        }
    }

    fn close(&mut self, conn: ConnId, reason: &str) {
        if let Some(c) = self.conns.remove(&conn) {
            c.connection.close(0u32.into(), reason.as_bytes());
            self.table_dirty = true;
        }
    }

    fn publish_table(&mut self) {
        let routes = self.router.routes();
        let live: HashSet<ConnId> = self.router.connections().iter().map(|c| c.conn).collect();
        let sessions: BTreeMap<PeerName, Arc<SessionParams>> = self
            .conns
            .iter()
            .filter(|(id, _)| live.contains(id))
            .map(|(_, c)| (c.peer, c.session.clone()))
            .collect();
        let vxlan = self
            .choices
            .iter()
            .filter(|(_, c)| **c == Choice::Vxlan)
            .filter_map(|(peer, _)| {
                let (addr, _) = self.conn_to(*peer).and_then(vxlan_endpoint)?;
                Some((*peer, addr))
            })
            .collect();
        let me = self.local.name;
        let known: HashSet<PeerName> = self.other_peers().into_iter().collect();
        self.peer_traffic.retain(|p, _| known.contains(p));
        for peer in known {
            self.peer_traffic.entry(peer).or_default();
        }
        let table = ForwardingTable {
            me,
            sealed: self.local.password.is_some(),
            unicast: routes.unicast.clone(),
            broadcast: self.router.broadcast_all(),
            sessions,
            vxlan,
            peer_traffic: self.peer_traffic.clone(),
        };
        self.settings.table.send_replace(Arc::new(table));
    }

    fn dial(&mut self, addr: SocketAddr) {
        if !self.dialing.insert(addr) {
            return;
        }
        let endpoint = self.settings.endpoint.clone();
        let local = self.local.clone();
        let inputs = self.inputs_tx.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                let connection = endpoint
                    .connect(addr, SERVER_NAME)
                    .map_err(|e| transport(e.to_string()))?
                    .await
                    .map_err(|e| transport(e.to_string()))?;
                let (mut send, mut recv) = connection
                    .open_bi()
                    .await
                    .map_err(|e| transport(e.to_string()))?;
                let hello = local.hello();
                let local_index = hello.session_index;
                match handshake::initiate(
                    &connection,
                    &mut send,
                    &mut recv,
                    &hello,
                    local.password.as_deref(),
                )
                .await
                {
                    Ok(established) => Ok(NewConnection {
                        connection,
                        send,
                        recv,
                        established,
                        local_index,
                        outbound: true,
                        addr,
                    }),
                    Err(e) => {
                        connection.close(1u32.into(), e.to_string().as_bytes());
                        Err(e)
                    }
                }
            })
            .await
            .unwrap_or_else(|_| {
                Err(transport(format!(
                    "no answer within {}s",
                    HANDSHAKE_TIMEOUT.as_secs()
                )))
            });
            let _ = inputs.send(match result {
                Ok(new) => Input::Established(Box::new(new)),
                Err(error) => Input::DialFailed { addr, error },
            });
        });
    }

    fn status(&mut self, now: Instant) -> Status {
        self.evaluate_overlays(now);
        let routes = self.router.routes();
        let me = self.local.name;
        let sealed = self.local.password.is_some();
        let mtu = self.settings.mtu;
        let peers = self
            .router
            .topology()
            .peers()
            .filter(|p| p.name != me)
            .map(|p| {
                let next_hop = routes.unicast.get(&p.name).copied();
                let choice = self.choices.get(&p.name).copied();
                let (overlay, overlay_reason) = match (next_hop, choice) {
                    (None, _) | (_, None) => (None, "unreachable: no route".to_string()),
                    (Some(_), Some(choice)) => {
                        let (o, r) = overlay::describe(choice, mtu, |t| time_of_day(now, t));
                        (Some(o), r)
                    }
                };
                // Traffic on VXLAN is never sealed; on the sleeve it is sealed with the cipher
                // of the session to the next hop.
                let cipher = next_hop.and_then(|hop| {
                    let session = self.conns.values().find(|c| c.peer == hop)?;
                    let vxlan = overlay.as_deref() == Some("vxlan");
                    Some(
                        if sealed && !vxlan {
                            session.session.cipher.name()
                        } else {
                            "none"
                        }
                        .to_string(),
                    )
                });
                let relayed_via = next_hop.filter(|hop| *hop != p.name).map(|h| h.to_string());
                let link = self
                    .conn_to(p.name)
                    .map(|c| link_status(now, c, overlay.as_deref() == Some("vxlan")));
                let vxlan_endpoint = self.settings.fastpath.as_ref().and_then(|_| {
                    let (addr, _) = self.conn_to(p.name).and_then(vxlan_endpoint)?;
                    Some(addr.to_string())
                });
                let sleeve = self.peer_traffic.get(&p.name).map(Traffic::snapshot);
                let (rx_packets, rx_bytes, tx_packets, tx_bytes) = sleeve.unwrap_or_default();
                PeerStatus {
                    vxlan_endpoint,
                    traffic: PeerTraffic {
                        sleeve: TrafficCounts {
                            rx_packets,
                            rx_bytes,
                            tx_packets,
                            tx_bytes,
                        },
                        vxlan: None,
                    },
                    relayed_via,
                    link,
                    cipher,
                    name: p.name.to_string(),
                    nickname: p.nickname.clone(),
                    reachable: next_hop.is_some(),
                    next_hop: next_hop.map(|n| n.to_string()),
                    overlay,
                    overlay_reason,
                    mtu: next_hop.map(|_| mtu),
                    connections: p.connections.len(),
                }
            })
            .collect();

        let mut connections: Vec<ConnectionStatus> = self
            .conns
            .values()
            .map(|c| ConnectionStatus {
                address: c.addr.to_string(),
                direction: if c.outbound { "outbound" } else { "inbound" }.to_string(),
                state: "established".to_string(),
                peer: Some(c.peer.to_string()),
                nickname: Some(c.nickname.clone()),
                error: None,
            })
            .collect();
        for t in self.router.targets() {
            let state = match t.state {
                TargetState::Connected => continue,
                TargetState::Connecting => "connecting",
                TargetState::Waiting { .. } if t.last_error.is_some() => "failed",
                TargetState::Waiting { .. } => "connecting",
            };
            connections.push(ConnectionStatus {
                address: t.addr.to_string(),
                direction: "outbound".to_string(),
                state: state.to_string(),
                peer: None,
                nickname: None,
                error: t.last_error.clone(),
            });
        }
        self.refusals
            .retain(|r| now.duration_since(r.at) < REFUSAL_TTL);
        connections.extend(self.refusals.iter().map(|r| ConnectionStatus {
            address: r.addr.to_string(),
            direction: "inbound".to_string(),
            state: "refused".to_string(),
            peer: None,
            nickname: None,
            error: Some(r.error.clone()),
        }));

        let targets = self
            .router
            .targets()
            .into_iter()
            .map(|t| TargetStatus {
                address: t.addr.to_string(),
                source: match t.kind {
                    TargetKind::User => "user",
                    TargetKind::Discovered => "discovered",
                }
                .to_string(),
                state: match t.state {
                    TargetState::Connected => "connected",
                    TargetState::Connecting => "connecting",
                    TargetState::Waiting { .. } if t.last_error.is_some() => "failed",
                    TargetState::Waiting { .. } => "waiting",
                }
                .to_string(),
                retry_in_secs: match t.state {
                    TargetState::Waiting { next_attempt } => {
                        Some(next_attempt.saturating_duration_since(now).as_secs())
                    }
                    _ => None,
                },
                attempts: t.attempts,
                last_error: t.last_error,
            })
            .collect();
        let snapshot = self.settings.counters.snapshot();
        let get = |k: &str| snapshot.get(k).copied().unwrap_or(0);
        let drops = self
            .settings
            .counters
            .drops()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        Status {
            name: me.to_string(),
            nickname: self.local.nickname.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            encryption: sealed,
            targets,
            gossip: self.gossip.clone(),
            port: self.settings.port,
            bridge: self.settings.bridge.clone(),
            mtu: self.settings.mtu,
            peers,
            connections,
            ipam: Some(self.ipam_status()),
            dns: Some(self.dns_status()),
            // Filled in by the API from the kernel's counters (`kernel::nft`).
            vxlan_counting: String::new(),
            sleeve: SleeveStatus {
                cipher: match (sealed, self.local.ext.cipher.and_then(Cipher::from_code)) {
                    (false, _) => "none".to_string(),
                    (true, Some(forced)) => forced.name().to_string(),
                    (true, None) if self.local.ext.aes_fast => {
                        "AES-256-GCM where the peer has AES instructions, else ChaCha20-Poly1305"
                            .to_string()
                    }
                    (true, None) => "ChaCha20-Poly1305".to_string(),
                },
                rx_datagrams: get("rx_datagrams"),
                tx_datagrams: get("tx_datagrams"),
                rx_frames: get("rx_frames"),
                tx_frames: get("tx_frames"),
                relayed_frames: get("relayed_frames"),
                key_rotations: get("key_rotations"),
                rx_bytes: get("rx_bytes"),
                tx_bytes: get("tx_bytes"),
                drops,
                batching: self
                    .settings
                    .counters
                    .batching()
                    .map(|b| b.name().to_string()),
            },
        }
    }
}

/// What we measure on the direct connection `c`. Sleeve counters are left out while the peer
/// is on VXLAN: the kernel counts per device, not per remote.
fn link_status(now: Instant, c: &Conn, on_vxlan: bool) -> LinkStatus {
    let stats = c.connection.stats();
    let path = &stats.path;
    let age = now.saturating_duration_since(c.established_at).as_secs();
    let (rx_packets, rx_bytes, tx_packets, tx_bytes) = c.session.traffic.snapshot();
    let sleeve = |v: u64| (!on_vxlan).then_some(v);
    LinkStatus {
        rtt_ms: c.connection.rtt().as_secs_f64() * 1000.0,
        lost_packets: path.lost_packets,
        sent_packets: path.sent_packets,
        loss_ratio: if path.sent_packets == 0 {
            0.0
        } else {
            path.lost_packets as f64 / path.sent_packets as f64
        },
        path_mtu_bytes: u32::from(path.current_mtu),
        handshake_unix_secs: c
            .established_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        handshake_age_secs: age,
        key_age_secs: c
            .session
            .traffic
            .key_since()
            .map_or(age, |since| since.elapsed().as_secs()),
        rx_packets: sleeve(rx_packets),
        rx_bytes: sleeve(rx_bytes),
        tx_packets: sleeve(tx_packets),
        tx_bytes: sleeve(tx_bytes),
        drops: c
            .session
            .traffic
            .drops()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    local: Arc<Local>,
    inputs: mpsc::UnboundedSender<Input>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let local = local.clone();
        let inputs = inputs.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                let connection = incoming.await.map_err(|e| transport(e.to_string()))?;
                let (mut send, mut recv) = connection
                    .accept_bi()
                    .await
                    .map_err(|e| transport(e.to_string()))?;
                let hello = local.hello();
                let local_index = hello.session_index;
                match handshake::respond(
                    &connection,
                    &mut send,
                    &mut recv,
                    &hello,
                    local.password.as_deref(),
                )
                .await
                {
                    Ok(established) => Ok(NewConnection {
                        connection,
                        send,
                        recv,
                        established,
                        local_index,
                        outbound: false,
                        addr,
                    }),
                    Err(e) => {
                        connection.close(1u32.into(), e.to_string().as_bytes());
                        Err(e)
                    }
                }
            })
            .await
            .unwrap_or_else(|_| {
                Err(transport(format!(
                    "no handshake within {}s",
                    HANDSHAKE_TIMEOUT.as_secs()
                )))
            });
            let _ = inputs.send(match result {
                Ok(new) => Input::Established(Box::new(new)),
                Err(error) => Input::InboundFailed { addr, error },
            });
        });
    }
}

async fn writer(mut send: quinn::SendStream, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(bytes) = rx.recv().await {
        if handshake::write_frame(&mut send, &bytes).await.is_err() {
            return;
        }
    }
    // Our side is done: end the stream and wait until the peer has read it all.
    if send.finish().is_ok() {
        let _ = send.stopped().await;
    }
}

async fn reader(
    conn: ConnId,
    connection: quinn::Connection,
    mut recv: quinn::RecvStream,
    inputs: mpsc::UnboundedSender<Input>,
) {
    let reason = loop {
        match handshake::read_frame(&mut recv).await {
            Ok(bytes) => {
                if inputs.send(Input::Message { conn, bytes }).is_err() {
                    return;
                }
            }
            Err(e) => {
                break match connection.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                        format!("peer closed: {}", String::from_utf8_lossy(&c.reason))
                    }
                    Some(quinn::ConnectionError::TimedOut) => "peer silent: timed out".to_string(),
                    Some(other) => other.to_string(),
                    None => e.to_string(),
                };
            }
        }
    };
    let _ = inputs.send(Input::Closed { conn, reason });
}

/// Where the VXLAN device of the peer behind `conn` listens, and its MAC.
fn vxlan_endpoint(conn: &Conn) -> Option<(SocketAddrV4, [u8; 6])> {
    let v = conn.vxlan?;
    match conn.session.remote_addr.ip() {
        IpAddr::V4(ip) => Some((SocketAddrV4::new(ip, v.port), v.mac)),
        IpAddr::V6(_) => None,
    }
}

async fn next_probe_event(
    rx: &mut Option<mpsc::UnboundedReceiver<ProbeEvent>>,
) -> Option<ProbeEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `HH:MM:SS UTC` of the instant `t`, read against the wall clock at `now`.
fn time_of_day(now: Instant, t: Instant) -> String {
    let wall = SystemTime::now()
        .checked_sub(now.saturating_duration_since(t))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let secs = wall
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn transport(reason: String) -> HandshakeError {
    HandshakeError::Transport { reason }
}

fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("invariant: the OS random source works");
    u64::from_le_bytes(b)
}

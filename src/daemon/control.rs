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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use mesh::{ConnId, Event, Identity, PeerName, Router, RouterConfig, TargetState};
use tokio::sync::{mpsc, watch};

use crate::api::server::Call;
use crate::api::types::{ConnectionStatus, PeerStatus, SleeveStatus, Status};
use crate::dataplane::forwarding::{ForwardingTable, SessionParams};
use crate::dataplane::sleeve::crypto::{derive_keys, Cipher};
use crate::dataplane::sleeve::Counters;
use crate::transport::handshake::{self, HandshakeError, Hello, HelloExt};
use crate::transport::quic::SERVER_NAME;

/// How long a dial or an accepted connection may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many refused inbound attempts status remembers, and for how long.
const REFUSALS_MAX: usize = 32;
const REFUSAL_TTL: Duration = Duration::from_secs(600);

/// Everything the loop needs from the composition root.
pub(super) struct Settings {
    pub(super) identity: Identity,
    pub(super) nickname: String,
    pub(super) password: Option<String>,
    /// `--cipher`: the sleeve cipher to insist on, if any.
    pub(super) cipher: Option<Cipher>,
    pub(super) discovery: bool,
    pub(super) port: u16,
    pub(super) bridge: String,
    pub(super) mtu: u32,
    pub(super) incarnation: u64,
    pub(super) endpoint: quinn::Endpoint,
    pub(super) table: watch::Sender<Arc<ForwardingTable>>,
    pub(super) counters: Arc<Counters>,
}

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
    /// Source of unique sleeve receiver indices.
    next_index: AtomicU32,
    /// What our sleeve can do, sent in every `Hello`.
    ext: HelloExt,
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
    session: Arc<SessionParams>,
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
    inputs_tx: mpsc::UnboundedSender<Input>,
    inputs_rx: mpsc::UnboundedReceiver<Input>,
    table_dirty: bool,
}

impl Control {
    pub(super) fn new(settings: Settings) -> Control {
        let now = Instant::now();
        let name = settings.identity.name();
        let config = RouterConfig {
            nickname: settings.nickname.clone(),
            incarnation: settings.incarnation,
            discovery: settings.discovery,
            ..RouterConfig::default()
        };
        let router = Router::new(config, name, random_u64(), now);
        let local = Arc::new(Local {
            name,
            nickname: settings.nickname.clone(),
            password: settings.password.clone(),
            data_port: settings.port + 1,
            next_index: AtomicU32::new(random_u64() as u32),
            ext: HelloExt {
                offload: true,
                aes_fast: Cipher::aes_is_fast(),
                cipher: settings.cipher.map(Cipher::code),
            },
        });
        let (inputs_tx, inputs_rx) = mpsc::unbounded_channel();
        Control {
            router,
            local,
            settings,
            conns: HashMap::new(),
            next_conn: 1,
            dialing: HashSet::new(),
            refusals: VecDeque::new(),
            inputs_tx,
            inputs_rx,
            table_dirty: true,
        }
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
        self.drain();
        loop {
            let deadline = self
                .router
                .poll_timeout()
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
                    Some(call) => self.handle_call(call),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => self.router.handle_timeout(Instant::now()),
                _ = sigterm.recv() => { tracing::info!("stopping: SIGTERM"); break; }
                _ = sigint.recv() => { tracing::info!("stopping: SIGINT"); break; }
            }
            self.drain();
        }
        accept.abort();
        for conn in self.conns.values() {
            conn.connection.close(0u32.into(), b"router stopping");
        }
        self.settings
            .endpoint
            .close(0u32.into(), b"router stopping");
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.settings.endpoint.wait_idle()).await;
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
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(new.send, rx));
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
                session,
            },
        );
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
                let _ = reply.send(());
            }
            Call::Forget(addrs, reply) => {
                self.router.forget_targets(&addrs);
                let _ = reply.send(());
            }
            Call::Stop(reply) => {
                let _ = reply.send(());
            }
        }
    }

    /// Drains the router's outputs until it has nothing more to say, then publishes the forwarding table
    /// if anything it depends on changed.
    fn drain(&mut self) {
        loop {
            let mut progress = false;
            while let Some(t) = self.router.poll_transmit() {
                progress = true;
                if let Some(c) = self.conns.get(&t.conn) {
                    let _ = c.tx.send(t.bytes);
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
        if self.table_dirty {
            self.table_dirty = false;
            self.publish_table();
        }
    }

    fn close(&mut self, conn: ConnId, reason: &str) {
        if let Some(c) = self.conns.remove(&conn) {
            c.connection.close(0u32.into(), reason.as_bytes());
            self.table_dirty = true;
        }
    }

    fn publish_table(&self) {
        let routes = self.router.routes();
        let live: HashSet<ConnId> = self.router.connections().iter().map(|c| c.conn).collect();
        let sessions: BTreeMap<PeerName, Arc<SessionParams>> = self
            .conns
            .iter()
            .filter(|(id, _)| live.contains(id))
            .map(|(_, c)| (c.peer, c.session.clone()))
            .collect();
        let table = ForwardingTable {
            me: self.local.name,
            sealed: self.local.password.is_some(),
            unicast: routes.unicast.clone(),
            broadcast: routes.broadcast.clone(),
            sessions,
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
        let routes = self.router.routes();
        let me = self.local.name;
        let sealed = self.local.password.is_some();
        let peers = self
            .router
            .topology()
            .peers()
            .filter(|p| p.name != me)
            .map(|p| {
                let next_hop = routes.unicast.get(&p.name).copied();
                let cipher = next_hop.and_then(|hop| {
                    let session = self.conns.values().find(|c| c.peer == hop)?;
                    Some(
                        if sealed {
                            session.session.cipher.name()
                        } else {
                            "none"
                        }
                        .to_string(),
                    )
                });
                PeerStatus {
                    cipher,
                    name: p.name.to_string(),
                    nickname: p.nickname.clone(),
                    reachable: next_hop.is_some(),
                    next_hop: next_hop.map(|n| n.to_string()),
                    overlay: next_hop.map(|_| "sleeve".to_string()),
                    overlay_reason: match (next_hop, sealed) {
                        (None, _) => "unreachable: no route".to_string(),
                        (Some(_), true) => "encrypted".to_string(),
                        (Some(_), false) => "not encrypted: no mesh password".to_string(),
                    },
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
            port: self.settings.port,
            bridge: self.settings.bridge.clone(),
            mtu: self.settings.mtu,
            peers,
            connections,
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
                drops,
            },
        }
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
            break;
        }
    }
    let _ = send.finish();
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

//! The router: composes topology, gossip, routes and the connection maker behind the only
//! `handle_*` / `poll_*` surface of the crate.
//!
//! Call order (as in quinn's `Connection`): feed one input through a `handle_*` method, then
//! drain [`Router::poll_transmit`] and [`Router::poll_event`] until both return `None`, then
//! sleep until [`Router::poll_timeout`] and call [`Router::handle_timeout`].
//!
//! What happens on each input:
//! - connected: keep one connection per peer (the one dialed by the smaller name; if both were
//!   dialed by the same side, the newer), update our entry, send our full topology to the new
//!   neighbour (a restarted peer learns everything at once, cf. weaveworks/weave#2085) and the
//!   delta to the others.
//! - message: merge; pass the delta on to everyone but the sender (to the sender as well when
//!   the delta holds our own entry, which happens when the sender held a stale copy of us).
//! - disconnected: drop the connection from our entry and gossip the delta.
//! - timeout: full state to [`gossip::FANOUT`] random neighbours every `gossip_interval`, and due
//!   dials.
//!
//! After every topology change the routes are recomputed, unreachable peers are collected (and
//! never passed on), discovered targets are refreshed, and `Event::RoutesChanged` is queued.
//!
//! Not here: sockets, the handshake and authentication (the daemon), the clock (callers pass
//! `now`). Invariants: at most one connection per remote peer; our topology entry lists exactly
//! our connections; randomness only from the RNG seeded in [`Router::new`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::connect::{ConnectionMaker, Policy, TargetStatus};
use crate::gossip::{self, Channel, Periodic};
use crate::ipam::{AllocError, Ipam, IpamConfig, IpamEvent, Persisted, RestoreError};
use crate::peer::{ConnId, PeerName};
use crate::routes::Routes;
use crate::topology::{ConnectionInfo, Topology, TopologyUpdate};
use crate::wire::{self, DecodeError, Message};

/// Settings for one router, fixed for its life.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Human-readable name announced with our entry (hostname by default).
    pub nickname: String,
    /// Grows across restarts: the daemon passes unix seconds at start, a simulator a counter.
    pub incarnation: u64,
    /// Connect to peers our peers announce.
    pub discovery: bool,
    /// At most this many connections, established plus dials in flight.
    pub conn_limit: usize,
    /// How often we send our full state to a few random neighbours.
    pub gossip_interval: Duration,
    /// First reconnect delay.
    pub reconnect_delay_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_delay_max: Duration,
    /// Consecutive failures after which we stop dialing a discovered address.
    pub discovered_attempts_max: u32,
    /// IPAM: universe, bootstrap mode, grace and reclaim times.
    pub ipam: IpamConfig,
}

impl Default for RouterConfig {
    fn default() -> RouterConfig {
        RouterConfig {
            nickname: String::new(),
            incarnation: 0,
            discovery: true,
            conn_limit: 64,
            gossip_interval: Duration::from_secs(10),
            reconnect_delay_min: Duration::from_secs(1),
            reconnect_delay_max: Duration::from_secs(60),
            discovered_attempts_max: 10,
            ipam: IpamConfig::default(),
        }
    }
}

/// Bytes to send on one control connection (one whole message).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Transmit {
    /// The connection to send on.
    pub conn: ConnId,
    /// One encoded message ([`wire::encode`]).
    pub bytes: Vec<u8>,
}

/// Something the daemon must do or know.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Event {
    /// Open a control connection to `addr`; report back with `handle_connected` or
    /// `handle_dial_failed`.
    Dial {
        /// Where to dial.
        addr: SocketAddr,
    },
    /// Close this connection (duplicate, connected to ourselves, over the limit). The router
    /// has already forgotten it; a later `handle_disconnected` for it is ignored.
    Close {
        /// The connection to close.
        conn: ConnId,
        /// Why, for logs and the remote.
        reason: String,
    },
    /// `routes()` / `topology()` changed; re-read them.
    RoutesChanged,
}

/// One established connection, as shown by `meshctl status`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ConnectionStatus {
    /// The daemon's id for it.
    pub conn: ConnId,
    /// The peer at the other end.
    pub peer: PeerName,
    /// That peer's nickname, from the handshake.
    pub nickname: String,
    /// Its address.
    pub addr: SocketAddr,
    /// Whether we dialed it.
    pub outbound: bool,
}

#[derive(Clone, Debug)]
struct Connection {
    peer: PeerName,
    nickname: String,
    addr: SocketAddr,
    outbound: bool,
}

/// The mesh control plane of one peer. See the module docs for the call order.
#[derive(Debug)]
pub struct Router {
    config: RouterConfig,
    name: PeerName,
    rng: SmallRng,
    topology: Topology,
    routes: Routes,
    maker: ConnectionMaker,
    conns: BTreeMap<ConnId, Connection>,
    periodic: Periodic,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    ipam: Ipam,
}

impl Router {
    /// A router that knows only itself. All randomness derives from `seed`.
    pub fn new(config: RouterConfig, name: PeerName, seed: u64, now: Instant) -> Router {
        let topology = Topology::new(name, config.nickname.clone(), config.incarnation);
        let routes = Routes::compute(&topology, name);
        let policy = Policy {
            discovery: config.discovery,
            conn_limit: config.conn_limit,
            reconnect_delay_min: config.reconnect_delay_min,
            reconnect_delay_max: config.reconnect_delay_max,
            discovered_attempts_max: config.discovered_attempts_max,
        };
        Router {
            ipam: Ipam::new(config.ipam.clone(), name, seed ^ 0x1fa3_5eed, now),
            periodic: Periodic::new(now, config.gossip_interval),
            maker: ConnectionMaker::new(policy, seed ^ 0x9e37_79b9_7f4a_7c15),
            rng: SmallRng::seed_from_u64(seed),
            config,
            name,
            topology,
            routes,
            conns: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Our peer name.
    pub fn name(&self) -> PeerName {
        self.name
    }

    /// Adds user targets (`meshctl launch PEER`, `meshctl connect`); they are dialed soon.
    pub fn add_targets(&mut self, now: Instant, addrs: &[SocketAddr]) {
        self.maker.add_user(now, addrs);
        self.dial_due(now);
    }

    /// Stops dialing `addrs` (`meshctl forget`); existing connections stay.
    pub fn forget_targets(&mut self, addrs: &[SocketAddr]) {
        self.maker.forget(addrs);
    }

    /// A dial we asked for failed: back off and record the reason.
    pub fn handle_dial_failed(&mut self, now: Instant, addr: SocketAddr, reason: String) {
        self.maker.dial_failed(now, addr, reason);
        self.dial_due(now);
    }

    /// A control connection finished its handshake (the daemon authenticated it).
    pub fn handle_connected(
        &mut self,
        now: Instant,
        conn: ConnId,
        remote: PeerName,
        nickname: String,
        addr: SocketAddr,
        outbound: bool,
    ) {
        if remote == self.name {
            self.close(conn, "connected to ourselves".to_owned());
            self.maker.reached_ourselves(addr);
            self.dial_due(now);
            return;
        }
        if outbound {
            // The dial itself succeeded, whatever we decide about the connection.
            self.maker.connected(now, addr);
        }
        if !self.resolve_duplicate(conn, remote, outbound) {
            self.dial_due(now);
            return;
        }
        if !outbound && self.conns.len() >= self.config.conn_limit {
            let limit = self.config.conn_limit;
            self.close(conn, format!("connection limit of {limit} reached"));
            return;
        }
        self.conns.insert(
            conn,
            Connection {
                peer: remote,
                nickname,
                addr,
                outbound,
            },
        );
        let delta = self.update_own_entry();
        self.send(conn, Message::Gossip(self.topology.full_state()));
        self.send(conn, Message::Ipam(Box::new(self.ipam.full_state())));
        if let Some(delta) = delta {
            self.send_to_all_except(Some(conn), &delta);
        }
        self.after_topology_change(now);
    }

    /// Decides between a new connection `conn` and an existing one to the same peer. Closes
    /// the loser; returns whether `conn` is kept. Both ends decide the same way: prefer the
    /// connection dialed by the smaller name; if one side dialed both, prefer the newer one
    /// (the older is likely dead without that side having noticed yet).
    fn resolve_duplicate(&mut self, conn: ConnId, remote: PeerName, outbound: bool) -> bool {
        let Some((&old, old_conn)) = self.conns.iter().find(|(_, c)| c.peer == remote) else {
            return true;
        };
        let initiator = |outbound: bool| if outbound { self.name } else { remote };
        let (old_by, new_by) = (initiator(old_conn.outbound), initiator(outbound));
        let keep_new = old_by == new_by || new_by == self.name.min(remote);
        let reason = format!("duplicate connection to {remote}");
        if keep_new {
            self.conns.remove(&old);
            self.close(old, reason);
        } else {
            self.close(conn, reason);
        }
        keep_new
    }

    /// A control connection ended (either side closed it, or it timed out).
    pub fn handle_disconnected(&mut self, now: Instant, conn: ConnId, reason: String) {
        let Some(gone) = self.conns.remove(&conn) else {
            return;
        };
        self.maker.disconnected(now, gone.addr, reason);
        if let Some(delta) = self.update_own_entry() {
            self.send_to_all_except(None, &delta);
        }
        self.after_topology_change(now);
    }

    /// Bytes arrived on a control connection: one whole message.
    ///
    /// A decode error leaves the router unchanged; the daemon should log it and close the
    /// connection. Messages on connections we don't know (e.g. just closed) are ignored.
    pub fn handle_message(
        &mut self,
        now: Instant,
        conn: ConnId,
        bytes: &[u8],
    ) -> Result<(), DecodeError> {
        let message = wire::decode(bytes)?;
        let Some(from) = self.conns.get(&conn).map(|c| c.peer) else {
            return Ok(());
        };
        match message {
            Message::Gossip(update) => {
                let Some(mut delta) = self.topology.merge(now, from, update) else {
                    return Ok(());
                };
                let removed: BTreeSet<PeerName> =
                    self.after_topology_change(now).into_iter().collect();
                // Never pass on what we just collected: unreachable entries would otherwise
                // circle the mesh, collected and re-learned at every hop.
                delta.peers.retain(|p| !removed.contains(&p.name));
                let includes_us = delta.peers.iter().any(|p| p.name == self.name);
                if !delta.is_empty() {
                    let except = if includes_us { None } else { Some(conn) };
                    self.send_to_all_except(except, &delta);
                }
            }
            Message::Ipam(update) => {
                self.ipam.merge(now, *update);
                self.flush_ipam();
            }
        }
        Ok(())
    }

    /// Time passed: periodic gossip and due dials.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.periodic.fire(now) {
            let conns: Vec<ConnId> = self.conns.keys().copied().collect();
            let chosen = gossip::fan_out(&mut self.rng, &conns, gossip::FANOUT);
            for conn in chosen {
                self.send(conn, Message::Gossip(self.topology.full_state()));
                if self.ipam.in_use() {
                    self.send(conn, Message::Ipam(Box::new(self.ipam.full_state())));
                }
            }
        }
        if now >= self.ipam.poll_timeout() {
            self.ipam.handle_timeout(now);
        }
        self.flush_ipam();
        self.dial_due(now);
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call `handle_timeout` next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let dial = self.maker.next_timeout(&self.covered_addrs());
        let gossip = self.periodic.deadline();
        let next = gossip.min(self.ipam.poll_timeout());
        Some(dial.map_or(next, |d| d.min(next)))
    }

    /// Our view of the mesh.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Our current routes.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// All targets with their state, sorted by address.
    pub fn targets(&self) -> Vec<TargetStatus> {
        self.maker.status(&self.covered_addrs())
    }

    /// All established connections, sorted by id.
    pub fn connections(&self) -> Vec<ConnectionStatus> {
        self.conns
            .iter()
            .map(|(&conn, c)| ConnectionStatus {
                conn,
                peer: c.peer,
                nickname: c.nickname.clone(),
                addr: c.addr,
                outbound: c.outbound,
            })
            .collect()
    }

    /// Our IPAM state (status, allocations, rings).
    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// Restores IPAM state persisted before a restart.
    pub fn ipam_restore(&mut self, now: Instant, p: Persisted) -> Result<(), RestoreError> {
        self.ipam.restore(now, p)?;
        self.flush_ipam();
        Ok(())
    }

    /// Allocates an address for container `id` (see [`Ipam::allocate`]). On
    /// [`AllocError::Waiting`] retry after the next input.
    pub fn ipam_allocate(
        &mut self,
        now: Instant,
        id: &str,
        subnet: Option<crate::ipam::Cidr>,
    ) -> Result<(std::net::Ipv4Addr, u8), AllocError> {
        let r = self.ipam.allocate(now, id, subnet);
        self.flush_ipam();
        r
    }

    /// Releases container `id`'s addresses after the grace period; returns how many.
    pub fn ipam_release(&mut self, now: Instant, id: &str) -> usize {
        let n = self.ipam.release(now, id);
        self.flush_ipam();
        n
    }

    /// Hands all our space to the reachable peer with the smallest name (`meshctl reset`).
    /// Returns that peer, or `None` if no peer is reachable or we own nothing.
    pub fn ipam_hand_over(&mut self) -> Option<PeerName> {
        let to = self
            .routes
            .unicast
            .keys()
            .copied()
            .find(|p| *p != self.name)?;
        let moved = self.ipam.hand_over(to);
        self.flush_ipam();
        (moved > 0).then_some(to)
    }

    /// Asks for a quorum-agreed reclaim of `peer` now (`meshctl rmpeer`).
    pub fn ipam_remove_peer(&mut self, now: Instant, peer: PeerName) -> Result<(), String> {
        let r = self.ipam.remove_peer(now, peer);
        self.flush_ipam();
        r
    }

    /// True once after IPAM state changed: persist it before sending the queued transmits.
    pub fn ipam_take_dirty(&mut self) -> bool {
        self.ipam.take_dirty()
    }

    /// The next IPAM event (for logs), if any.
    pub fn poll_ipam_event(&mut self) -> Option<IpamEvent> {
        self.ipam.poll_event()
    }

    /// Sends our full IPAM state to every neighbour if it changed.
    fn flush_ipam(&mut self) {
        if self.ipam.take_changed() {
            let bytes = wire::encode(&Message::Ipam(Box::new(self.ipam.full_state())));
            for &conn in self.conns.keys() {
                self.transmits.push_back(Transmit {
                    conn,
                    bytes: bytes.clone(),
                });
            }
        }
    }

    fn close(&mut self, conn: ConnId, reason: String) {
        self.events.push_back(Event::Close { conn, reason });
    }

    fn send(&mut self, conn: ConnId, message: Message) {
        self.transmits.push_back(Transmit {
            conn,
            bytes: wire::encode(&message),
        });
    }

    fn send_to_all_except(&mut self, except: Option<ConnId>, update: &TopologyUpdate) {
        let bytes = wire::encode(&Message::Gossip(update.clone()));
        for &conn in self.conns.keys() {
            if Some(conn) != except {
                self.transmits.push_back(Transmit {
                    conn,
                    bytes: bytes.clone(),
                });
            }
        }
    }

    /// Makes our topology entry list exactly our connections; returns the delta if it changed.
    fn update_own_entry(&mut self) -> Option<TopologyUpdate> {
        let connections = self
            .conns
            .values()
            .map(|c| ConnectionInfo {
                peer: c.peer,
                addr: Some(c.addr),
                outbound: c.outbound,
            })
            .collect();
        self.topology.set_own_connections(connections)
    }

    /// Collects unreachable peers, recomputes routes, refreshes discovery, queues
    /// `RoutesChanged`. Returns the collected peers.
    fn after_topology_change(&mut self, now: Instant) -> Vec<PeerName> {
        let removed = self.topology.gc(self.name);
        self.routes = Routes::compute(&self.topology, self.name);
        let reachable = self.routes.unicast.keys().copied().collect();
        self.ipam.set_reachable(now, reachable);
        self.flush_ipam();
        if !self.events.contains(&Event::RoutesChanged) {
            self.events.push_back(Event::RoutesChanged);
        }
        let candidates = self.discovery_candidates();
        self.maker.set_discovered(now, &candidates);
        self.dial_due(now);
        removed
    }

    fn dial_due(&mut self, now: Instant) {
        let covered = self.covered_addrs();
        for addr in self.maker.poll_dials(now, &covered, self.conns.len()) {
            self.events.push_back(Event::Dial { addr });
        }
    }

    /// Addresses we must not dial: those of our connections, those others announce for peers
    /// we are connected to, and our own.
    fn covered_addrs(&self) -> BTreeSet<SocketAddr> {
        let connected: BTreeSet<PeerName> = self.conns.values().map(|c| c.peer).collect();
        let mut covered: BTreeSet<SocketAddr> = self.conns.values().map(|c| c.addr).collect();
        for peer in self.topology.peers() {
            for c in &peer.connections {
                if let Some(addr) = c.addr {
                    if c.peer == self.name || connected.contains(&c.peer) {
                        covered.insert(addr);
                    }
                }
            }
        }
        covered
    }

    /// Addresses announced for known peers we are not connected to.
    fn discovery_candidates(&self) -> BTreeSet<SocketAddr> {
        if !self.config.discovery {
            return BTreeSet::new();
        }
        let covered = self.covered_addrs();
        self.topology
            .peers()
            .flat_map(|p| p.connections.iter())
            .filter(|c| c.peer != self.name && self.topology.peer(c.peer).is_some())
            .filter_map(|c| c.addr)
            .filter(|addr| !covered.contains(addr))
            .collect()
    }
}

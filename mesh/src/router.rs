//! The router: composes topology, gossip, routes and the connection maker behind the only
//! `handle_*` / `poll_*` surface of the crate.
//!
//! Call order (as in quinn's `Connection`): feed one input through a `handle_*` method, then
//! drain [`Router::poll_transmit`] and [`Router::poll_event`] until both return `None`, then
//! sleep until [`Router::poll_timeout`] and call [`Router::handle_timeout`].
//!
//! What happens on each input:
//! - connected: keep one connection per peer (the one dialed by the smaller name; if both were
//!   dialed by the same side, the newer). An inbound connection we accept is announced at
//!   once: update our entry, send our full topology to the new neighbour (a restarted peer
//!   learns everything at once, cf. weaveworks/weave#2085) and the delta to the others. An
//!   outbound one waits for the remote's first message, which is its acceptance: a dial that
//!   a peer at its connection limit refuses never touches the topology, so it costs no gossip.
//! - message: merge; pass the delta on to everyone but the sender (to the sender as well when
//!   the delta holds our own entry, which happens when the sender held a stale copy of us),
//!   leaving out entries a neighbour itself sent us recently (duplicate suppression). A digest
//!   that differs from ours is answered with the versions we hold (in a mesh of more than 64
//!   peers, first with per-bucket digests, then the versions of the buckets that differ), and the
//!   two sides then send each other only the entries the other lacks (see [`Message::Versions`],
//!   [`Message::Buckets`]).
//! - disconnected: drop the connection from our entry and gossip the delta.
//! - timeout: our digest to [`gossip::FANOUT`] random neighbours every `gossip_interval`, the
//!   delayed route computation, collection of peers unreachable for `gc_grace`, due dials.
//!
//! Container names ([`crate::dns::Records`]) travel like the topology: a delta to every
//! neighbour when a name is added or removed here or arrives new from elsewhere, our full set to
//! a new neighbour and with each periodic digest (only while there are records, so a mesh
//! without names sends no [`Message::Dns`] at all). Tombstones are dropped after
//! [`DNS_TOMBSTONE_GRACE`], records of peers collected from the topology with them.
//!
//! After a topology change (at once, or `route_delay` later so that a burst of changes costs one
//! computation) the unicast routes are recomputed, peers without a path are marked unreachable,
//! discovered targets are refreshed, and `Event::RoutesChanged` is queued. Broadcast children
//! are computed per source on demand ([`Router::broadcast_children`]).
//!
//! Failure detection: the transport (QUIC keep-alives in the daemon) reports a silent neighbour
//! as `handle_disconnected`; a silent peer further away disappears from its neighbours'
//! announced connections, so it becomes unreachable here, routes avoid it at once, and it is
//! collected after `gc_grace`.
//!
//! Not here: sockets, the handshake and authentication (the daemon), the clock (callers pass
//! `now`). Invariants: at most one connection per remote peer; our topology entry lists exactly
//! our connections; randomness only from the RNG seeded in [`Router::new`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::IteratorRandom;
use rand::SeedableRng;

use crate::connect::{ConnectionMaker, Policy, TargetStatus};
use crate::dns::{Records, RecordsUpdate};
use crate::gossip::{self, Channel, Periodic};
use crate::ipam::{AllocError, Ipam, IpamConfig, IpamEvent, Persisted, RestoreError};
use crate::peer::{ConnId, PeerName};
use crate::routes::{self, Routes};
use crate::topology::{
    BucketMask, ConnectionInfo, NameMap, Topology, TopologyUpdate, Version, ALL_BUCKETS,
};
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
    /// How long an unreachable peer stays in the topology (shown as unreachable) before it is
    /// collected.
    pub gc_grace: Duration,
    /// How long after a topology change the routes are recomputed; changes within that window
    /// share one computation. Zero recomputes after every change.
    pub route_delay: Duration,
}

/// Default [`RouterConfig::conn_limit`]: a random mesh where every peer keeps this many
/// connections stays connected with a diameter of 3 to 4 hops up to thousands of peers, and
/// every topology entry (one connection list) stays below about 1 KiB.
pub const CONN_LIMIT_DEFAULT: usize = 16;

/// How long a removed container name is remembered (as a tombstone) so that a stale copy
/// arriving later can't bring it back; every peer must have heard of the removal by then.
pub const DNS_TOMBSTONE_GRACE: Duration = Duration::from_secs(600);

/// Entries of small updates remembered per connection for duplicate suppression.
const HEARD_MAX: usize = 256;
/// A differing digest is answered with the whole version list up to this many reachable
/// entries (about 1 kB), and with the 64 bucket digests (515 bytes) above it, which then cost
/// only the lists of the buckets that differ.
const WHOLE_VERSIONS_MAX: usize = 64;
/// Updates with more entries than this (full states) are not remembered per connection.
const HEARD_UPDATE_MAX: usize = 16;

impl Default for RouterConfig {
    fn default() -> RouterConfig {
        RouterConfig {
            nickname: String::new(),
            incarnation: 0,
            discovery: true,
            conn_limit: CONN_LIMIT_DEFAULT,
            gossip_interval: Duration::from_secs(10),
            reconnect_delay_min: Duration::from_secs(1),
            reconnect_delay_max: Duration::from_secs(60),
            discovered_attempts_max: 10,
            ipam: IpamConfig::default(),
            gc_grace: Duration::from_secs(30),
            route_delay: Duration::ZERO,
        }
    }
}

/// One message to send on one control connection.
///
/// The message is shared (`Arc`) between the transmits of one gossip round; in-process
/// transports (the simulator) hand it to [`Router::handle_decoded`] without encoding.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Transmit {
    /// The connection to send on.
    pub conn: ConnId,
    /// The message.
    pub message: Arc<Message>,
}

impl Transmit {
    /// The bytes to send ([`wire::encode`]).
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(&self.message)
    }
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
    /// The remote has accepted the connection: it sent us a message. Until then an outbound
    /// connection is not announced in our entry and gets no gossip, so a dial the remote
    /// refuses (at its connection limit) changes nothing anyone else sees.
    accepted: bool,
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
    /// Container names of the whole mesh.
    dns: Records,
    /// When the delayed route computation is due, if a change is pending.
    dirty: Option<Instant>,
    /// Target addresses that others announce for peers we are connected to (refreshed with
    /// the routes); together with our connections' addresses these are never dialed.
    covered: BTreeSet<SocketAddr>,
    /// Broadcast children per source, valid until the next route computation.
    broadcast_cache: NameMap<Vec<PeerName>>,
    /// Per connection: entries (and versions) the neighbour sent us in small updates.
    heard: BTreeMap<ConnId, NameMap<Version>>,
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
            // Versions of an earlier life stay below this one's (at most 2^20 changes per
            // second of incarnation); `Records::merge` also moves past any it sees.
            dns: Records::new(name, config.incarnation.saturating_mul(1 << 20)),
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
            dirty: None,
            covered: BTreeSet::new(),
            broadcast_cache: NameMap::default(),
            heard: BTreeMap::new(),
        }
    }

    /// Our peer name.
    pub fn name(&self) -> PeerName {
        self.name
    }

    /// Adds user targets (`meshctl launch PEER`, `meshctl connect`); they are dialed soon.
    pub fn add_targets(&mut self, now: Instant, addrs: &[SocketAddr]) {
        self.maker.add_user(now, addrs);
        self.refresh_covered();
        self.dial_due(now);
    }

    /// The user targets (to persist across restarts), sorted by address.
    pub fn user_targets(&self) -> Vec<SocketAddr> {
        self.maker.user_targets()
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
        // The limit counts peers: a second connection to a peer we have replaces or loses to
        // the first, so it is not refused here.
        let replacing = self.conns.values().any(|c| c.peer == remote);
        if !outbound && !replacing && !self.accepts_inbound(remote) {
            let limit = self.config.conn_limit;
            self.close(conn, format!("connection limit of {limit} reached"));
            return;
        }
        if !self.resolve_duplicate(conn, remote, outbound) {
            self.dial_due(now);
            return;
        }
        self.conns.insert(
            conn,
            Connection {
                peer: remote,
                nickname,
                addr,
                outbound,
                accepted: !outbound,
            },
        );
        if outbound {
            // Wait for the remote's first message: it may still refuse us (see `accepted`).
            self.dial_due(now);
            return;
        }
        self.start_gossip(now, conn);
    }

    /// The connection `conn` is accepted by both ends: announce it and send the remote our
    /// full state (a restarted peer learns everything at once, cf. weaveworks/weave#2085).
    fn start_gossip(&mut self, now: Instant, conn: ConnId) {
        let delta = self.update_own_entry();
        self.send(conn, Message::Gossip(self.topology.full_state()));
        self.send(conn, Message::Ipam(Box::new(self.ipam.full_state())));
        if let Some(names) = self.dns_full_state() {
            self.send(conn, names);
        }
        if let Some(delta) = delta {
            self.send_to_all_except(Some(conn), &delta);
        }
        self.topology_changed(now);
    }

    /// Inbound connections are accepted below the limit; above it only from peers we can't
    /// reach yet (newcomers, the other side of a partition): refusing them could leave them
    /// outside the mesh for good, e.g. when everyone names the same full seed. Peers that are
    /// already in the mesh are refused and find room elsewhere through discovery.
    fn accepts_inbound(&self, remote: PeerName) -> bool {
        self.conns.len() < self.config.conn_limit || !self.routes.reaches(self.name, remote)
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
        self.heard.remove(&conn);
        self.maker.disconnected(now, gone.addr, reason);
        if let Some(delta) = self.update_own_entry() {
            self.send_to_all_except(None, &delta);
        }
        self.topology_changed(now);
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
        self.handle_decoded(now, conn, message);
        Ok(())
    }

    /// A message arrived already decoded (in-process transports such as the simulator).
    pub fn handle_decoded(&mut self, now: Instant, conn: ConnId, message: Message) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let from = c.peer;
        if !c.accepted {
            c.accepted = true;
            self.start_gossip(now, conn);
        }
        match message {
            Message::Gossip(update) => {
                if update.peers.len() <= HEARD_UPDATE_MAX {
                    let heard = self.heard.entry(conn).or_default();
                    if heard.len() + update.peers.len() > HEARD_MAX {
                        heard.clear();
                    }
                    for p in &update.peers {
                        let v = heard.entry(p.name).or_insert(p.version);
                        *v = (*v).max(p.version);
                    }
                }
                let Some(delta) = self.topology.merge(now, from, update) else {
                    return;
                };
                let includes_us = delta.peers.iter().any(|p| p.name == self.name);
                let except = if includes_us { None } else { Some(conn) };
                self.send_to_all_except(except, &delta);
                self.topology_changed(now);
            }
            Message::Digest { digest, .. } => {
                if digest != self.topology.digest() {
                    let entries = self.topology.versions(ALL_BUCKETS);
                    let answer = if entries.len() <= WHOLE_VERSIONS_MAX {
                        Message::Versions {
                            entries,
                            reply: true,
                        }
                    } else {
                        Message::Buckets {
                            digests: self.topology.bucket_digests(),
                        }
                    };
                    self.send(conn, answer);
                }
            }
            Message::Buckets { digests } => {
                let buckets = self.topology.differing_buckets(&digests);
                if buckets != 0 {
                    let entries = self.topology.versions(buckets);
                    self.send(
                        conn,
                        Message::BucketVersions {
                            buckets,
                            entries,
                            reply: true,
                        },
                    );
                }
            }
            Message::Versions { entries, reply } => {
                self.answer_versions(conn, ALL_BUCKETS, &entries, reply);
            }
            Message::BucketVersions {
                buckets,
                entries,
                reply,
            } => {
                self.answer_versions(conn, buckets, &entries, reply);
            }
            Message::Ipam(update) => {
                self.ipam.merge(now, *update);
                self.flush_ipam();
            }
            Message::Dns(update) => {
                if let Some(delta) = self.dns.merge(now, update) {
                    self.send_dns(Some(conn), delta);
                }
            }
        }
    }

    /// Answers a version list of the buckets `buckets`: the entries there that its sender
    /// lacks, and, if `reply` and it lists something we lack, our own list of those buckets.
    fn answer_versions(
        &mut self,
        conn: ConnId,
        buckets: BucketMask,
        entries: &[(PeerName, Version)],
        reply: bool,
    ) {
        let theirs_lack = self.topology.newer_than(entries, buckets);
        if !theirs_lack.is_empty() {
            self.send(conn, Message::Gossip(theirs_lack));
        }
        if reply && self.topology.lacks_any(entries) {
            let entries = self.topology.versions(buckets);
            let list = if buckets == ALL_BUCKETS {
                Message::Versions {
                    entries,
                    reply: false,
                }
            } else {
                Message::BucketVersions {
                    buckets,
                    entries,
                    reply: false,
                }
            };
            self.send(conn, list);
        }
    }

    /// Our whole name set as a message, unless it is empty.
    fn dns_full_state(&self) -> Option<Message> {
        let full = self.dns.full_state();
        (!full.records.is_empty()).then_some(Message::Dns(full))
    }

    /// Sends a name delta to every connection but `except`.
    fn send_dns(&mut self, except: Option<ConnId>, delta: RecordsUpdate) {
        let message = Arc::new(Message::Dns(delta));
        for &conn in self.conns.keys() {
            if Some(conn) != except {
                self.transmits.push_back(Transmit {
                    conn,
                    message: message.clone(),
                });
            }
        }
    }

    /// Registers `name -> addr` as one of our containers' names and gossips it. Returns false
    /// if it was registered already.
    pub fn dns_add(&mut self, name: &str, addr: std::net::IpAddr) -> bool {
        match self.dns.add(name, addr) {
            Some(delta) => {
                self.send_dns(None, delta);
                true
            }
            None => false,
        }
    }

    /// Removes our records for `name` (only `addr` if given), leaving tombstones that are
    /// gossiped. Returns how many records were removed.
    pub fn dns_remove(
        &mut self,
        now: Instant,
        name: &str,
        addr: Option<std::net::IpAddr>,
    ) -> usize {
        match self.dns.remove(now, name, addr) {
            Some(delta) => {
                let n = delta.records.len();
                self.send_dns(None, delta);
                n
            }
            None => 0,
        }
    }

    /// The mesh's container names as this peer knows them.
    pub fn dns(&self) -> &Records {
        &self.dns
    }

    fn digest_message(&self, reply: bool) -> Message {
        let reachable = self.routes.unicast.len() + 1;
        Message::Digest {
            digest: self.topology.digest(),
            peers: u32::try_from(reachable).unwrap_or(u32::MAX),
            reply,
        }
    }

    /// Time passed: periodic gossip and due dials.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.dirty.is_some_and(|due| due <= now) {
            self.recompute(now);
        }
        let grace = self.config.gc_grace;
        if self.topology.next_expiry(grace).is_some_and(|t| t <= now)
            && !self.topology.gc(now, grace).is_empty()
        {
            self.queue_routes_changed();
        }
        if self.periodic.fire(now) {
            let conns: Vec<ConnId> = self.accepted_conns().collect();
            let chosen = gossip::fan_out(&mut self.rng, &conns, gossip::FANOUT);
            let message = Arc::new(self.digest_message(true));
            for conn in chosen {
                self.transmits.push_back(Transmit {
                    conn,
                    message: message.clone(),
                });
                if self.ipam.in_use() {
                    self.send(conn, Message::Ipam(Box::new(self.ipam.full_state())));
                }
                if let Some(names) = self.dns_full_state() {
                    self.send(conn, names);
                }
            }
            let topology = &self.topology;
            self.dns.gc(now, DNS_TOMBSTONE_GRACE, |origin| {
                !topology.peers().any(|p| p.name == origin)
            });
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
        let expiry = self.topology.next_expiry(self.config.gc_grace);
        let gossip = self.periodic.deadline();
        let earliest = [dial, expiry, self.dirty].into_iter().flatten().min();
        let next = gossip.min(self.ipam.poll_timeout());
        Some(earliest.map_or(next, |e| e.min(next)))
    }

    /// Our view of the mesh.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Our current routes.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The neighbours we forward a broadcast from `source` to (our children in its tree),
    /// computed on first use after each route computation.
    pub fn broadcast_children(&mut self, source: PeerName) -> &[PeerName] {
        let (topology, me) = (&self.topology, self.name);
        self.broadcast_cache
            .entry(source)
            .or_insert_with(|| routes::broadcast(topology, me, source))
    }

    /// Broadcast children for every reachable source, for a forwarding table
    /// ([`routes::broadcast_all`]: one search per source).
    pub fn broadcast_all(&self) -> BTreeMap<PeerName, Vec<PeerName>> {
        routes::broadcast_all(&self.topology, self.name)
    }

    /// Whether a delayed route computation is pending (routes may lag the topology).
    pub fn routes_pending(&self) -> bool {
        self.dirty.is_some()
    }

    /// The configuration this router was built with.
    pub fn config(&self) -> &RouterConfig {
        &self.config
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

    /// Hands all our space to a reachable peer, the one owning the least (`meshctl reset`).
    /// Returns that peer, or `None` if no peer is reachable or we own nothing.
    pub fn ipam_hand_over(&mut self) -> Option<PeerName> {
        let to = self.ipam.heir()?;
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

    /// Sends what changed in our IPAM state to every neighbour (a delta; see
    /// [`Ipam::take_delta`]).
    fn flush_ipam(&mut self) {
        if let Some(delta) = self.ipam.take_delta() {
            let message = Arc::new(Message::Ipam(Box::new(delta)));
            let conns: Vec<ConnId> = self.accepted_conns().collect();
            for conn in conns {
                self.transmits.push_back(Transmit {
                    conn,
                    message: message.clone(),
                });
            }
        }
    }

    /// Connections the remote has accepted (see `Connection::accepted`).
    fn accepted_conns(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.conns
            .iter()
            .filter(|(_, c)| c.accepted)
            .map(|(&conn, _)| conn)
    }

    fn close(&mut self, conn: ConnId, reason: String) {
        self.events.push_back(Event::Close { conn, reason });
    }

    fn send(&mut self, conn: ConnId, message: Message) {
        self.transmits.push_back(Transmit {
            conn,
            message: Arc::new(message),
        });
    }

    /// Sends `update` to every connection but `except`, leaving out for each neighbour the
    /// entries it sent us itself (at that version or newer): it has them already.
    fn send_to_all_except(&mut self, except: Option<ConnId>, update: &TopologyUpdate) {
        let whole = Arc::new(Message::Gossip(update.clone()));
        let conns: Vec<ConnId> = self.accepted_conns().collect();
        for conn in conns {
            if Some(conn) == except {
                continue;
            }
            let heard = self.heard.get(&conn);
            let known = |p: &crate::topology::Peer| {
                heard.is_some_and(|h| h.get(&p.name).is_some_and(|&v| v >= p.version))
            };
            let message = if update.peers.iter().any(|p| known(p)) {
                let peers: Vec<_> = update.peers.iter().filter(|p| !known(p)).cloned().collect();
                if peers.is_empty() {
                    continue;
                }
                Arc::new(Message::Gossip(TopologyUpdate { peers }))
            } else {
                whole.clone()
            };
            self.transmits.push_back(Transmit { conn, message });
        }
    }

    /// Makes our topology entry list exactly our connections; returns the delta if it changed.
    fn update_own_entry(&mut self) -> Option<TopologyUpdate> {
        let connections = self
            .conns
            .values()
            .filter(|c| c.accepted)
            .map(|c| ConnectionInfo {
                peer: c.peer,
                addr: Some(c.addr),
                outbound: c.outbound,
            })
            .collect();
        self.topology.set_own_connections(connections)
    }

    /// Recomputes the routes now, or schedules that `route_delay` from now.
    fn topology_changed(&mut self, now: Instant) {
        if self.config.route_delay.is_zero() {
            self.recompute(now);
        } else if self.dirty.is_none() {
            self.dirty = Some(now + self.config.route_delay);
        }
    }

    /// Recomputes routes, marks unreachable peers, refreshes discovery, queues
    /// `RoutesChanged`.
    fn recompute(&mut self, now: Instant) {
        self.dirty = None;
        self.routes = Routes::compute(&self.topology, self.name);
        self.broadcast_cache.clear();
        let (routes, me) = (&self.routes, self.name);
        self.topology.mark_reachable(now, |p| routes.reaches(me, p));
        let reachable = self.routes.unicast.keys().copied().collect();
        self.ipam.set_reachable(now, reachable);
        self.flush_ipam();
        self.queue_routes_changed();
        self.refresh_covered();
        let candidates = self.discovery_candidates();
        self.maker.set_discovered(now, &candidates);
        self.dial_due(now);
    }

    fn queue_routes_changed(&mut self) {
        if !self.events.contains(&Event::RoutesChanged) {
            self.events.push_back(Event::RoutesChanged);
        }
    }

    fn dial_due(&mut self, now: Instant) {
        let covered = self.covered_addrs();
        for addr in self.maker.poll_dials(now, &covered, self.conns.len()) {
            self.events.push_back(Event::Dial { addr });
        }
    }

    /// Addresses we must not dial: those of our connections, those others announce for peers
    /// we are connected to (cached in `covered`), and our own.
    fn covered_addrs(&self) -> BTreeSet<SocketAddr> {
        let mut covered = self.covered.clone();
        covered.extend(self.conns.values().map(|c| c.addr));
        covered
    }

    /// Refreshes `covered`: one pass over all announced connections, keeping only addresses
    /// that are targets, so it stays as small as the target list.
    fn refresh_covered(&mut self) {
        let targets: BTreeSet<SocketAddr> = self.maker.addrs().collect();
        let connected: BTreeSet<PeerName> = self.conns.values().map(|c| c.peer).collect();
        self.covered.clear();
        if targets.is_empty() {
            return;
        }
        for peer in self.topology.peers() {
            for c in &peer.connections {
                if let Some(addr) = c.addr {
                    if (c.peer == self.name || connected.contains(&c.peer))
                        && targets.contains(&addr)
                    {
                        self.covered.insert(addr);
                    }
                }
            }
        }
    }

    /// Addresses to dial for discovery: the current discovered targets that are still
    /// announced for reachable peers we are not connected to, topped up with a random sample
    /// of other such addresses while we are below the connection limit. Bounded by the
    /// limit, so a router in a mesh of thousands holds a handful of targets, not thousands.
    fn discovery_candidates(&mut self) -> BTreeSet<SocketAddr> {
        if !self.config.discovery {
            return BTreeSet::new();
        }
        let in_use = self.conns.len() + self.maker.connecting();
        let room = self.config.conn_limit.saturating_sub(in_use);
        let current = self.maker.discovered();
        // At the limit with nothing discovered to keep: no need to scan every announced
        // connection (N times the limit of them) after each change.
        if room == 0 && current.is_empty() {
            return BTreeSet::new();
        }
        let connected: BTreeSet<PeerName> = self.conns.values().map(|c| c.peer).collect();
        let own: BTreeSet<SocketAddr> = self.conns.values().map(|c| c.addr).collect();
        let (me, routes) = (self.name, &self.routes);
        let wanted = |c: &ConnectionInfo| {
            c.peer != me && !connected.contains(&c.peer) && routes.reaches(me, c.peer)
        };
        let announced = self
            .topology
            .peers()
            .flat_map(|p| p.connections.iter())
            .filter(|c| wanted(c))
            .filter_map(|c| c.addr)
            .filter(|addr| !own.contains(addr) && !self.covered.contains(addr));
        let mut keep = BTreeSet::new();
        let mut others = BTreeSet::new();
        for addr in announced {
            if current.contains(&addr) {
                keep.insert(addr);
            } else if room > 0 {
                others.insert(addr);
            }
        }
        let fresh = room.saturating_sub(keep.len());
        keep.extend(others.into_iter().choose_multiple(&mut self.rng, fresh));
        keep
    }
}

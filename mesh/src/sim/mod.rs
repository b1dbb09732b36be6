//! A deterministic simulator of many routers (feature `sim`, and this crate's own tests).
//!
//! It plays the daemon for N [`Router`]s in one process: dials become connections after a
//! delay, transmits become deliveries, and virtual time jumps straight to the earliest pending
//! event or router deadline, so an hour of gossip among 50 peers runs in well under a second.
//! Every random choice comes from one RNG seeded with [`SimOptions::seed`]: the same options
//! replay the same run, event for event (`MESH_SIM_SEED=N` in `tests/sim_random.rs`).
//!
//! Faults ([`SimOptions`]): one-way delay, loss, duplication and reordering of messages, random
//! or scripted partitions (links across break after the transport's idle timeout and dials
//! fail), and restarts (a peer loses its memory, keeps its name and address, and comes back
//! with a higher incarnation).
//!
//! Checkers ([`check`]) run after every step when [`SimOptions::check`] is set: each peer's
//! routes use only its own connections and cover exactly what it can reach; versions never go
//! backwards; no message exceeds [`SimOptions::message_bytes_max`]; a frame relayed along the
//! routers' current (possibly disagreeing) routes always ends, by delivery, a missing route or
//! its hop limit. The liveness phase ([`Sim::run`]) heals everything and requires convergence
//! within [`SimOptions::convergence_max`], then loop-free forwarding between every pair.
//!
//! Not here: sockets, handshakes, the data plane. The simulator drives only the public API.
//! Ancestors: TigerBeetle's VOPR and `PacketSimulator`, smoltcp's netsim, quinn's `Pair`.

pub mod check;
mod net;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::peer::{ConnId, PeerName};
use crate::router::{Event, Router, RouterConfig};
use crate::topology::TopologyUpdate;
use crate::wire::Message;

pub use check::Checker;

/// How random partitions split the peers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PartitionMode {
    /// Never partition at random (scripted partitions still work).
    None,
    /// Each peer lands on either side with equal probability.
    UniformSize,
    /// One random peer is cut off from all others.
    IsolateSingle,
}

/// How the simulated peers find each other at the start.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Bootstrap {
    /// Peer `i > 0` is given one random earlier peer as its user target; discovery does the
    /// rest (the way users launch: name any router already in the mesh).
    RandomTree,
    /// Every peer is given peer 0 as its only user target (one seed address).
    SingleSeed,
    /// A connected mesh is built directly: every peer has exactly `degree` random links (a ring
    /// among them, for connectivity) and already knows the full topology; for benchmarks at
    /// large N.
    Warm {
        /// Links each peer opens.
        degree: usize,
    },
}

/// Everything a simulation run is made of; [`SimOptions::default`] has no faults.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Number of peers at the start.
    pub peers: usize,
    /// Seeds every random choice of the run.
    pub seed: u64,
    /// Shortest one-way delay of a message.
    pub one_way_delay_min: Duration,
    /// Mean one-way delay (exponential above the minimum).
    pub one_way_delay_mean: Duration,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Probability that a message is held back long enough to be overtaken.
    pub reorder: f64,
    /// How random partitions split the peers.
    pub partition_mode: PartitionMode,
    /// Probability per tick that a random partition starts (when none is active).
    pub partition_probability: f64,
    /// Probability per tick that an active random partition heals.
    pub unpartition_probability: f64,
    /// Probability per tick that one random peer restarts (crash, down for a while, back).
    pub restart_probability: f64,
    /// How long a restarted peer stays down.
    pub restart_down_time: Duration,
    /// How long a silent connection takes to be declared dead (QUIC idle timeout).
    pub idle_timeout: Duration,
    /// How long a dial to an unreachable address takes to fail.
    pub dial_timeout: Duration,
    /// Granularity of random fault decisions.
    pub tick: Duration,
    /// Length of the fault phase of [`Sim::run`].
    pub fault_time: Duration,
    /// Deadline for convergence in the liveness phase of [`Sim::run`].
    pub convergence_max: Duration,
    /// Hop limit of simulated data frames.
    pub hop_limit: u8,
    /// No message may be larger (checked on every transmit).
    pub message_bytes_max: usize,
    /// Run the safety checkers after every step (costs O(N) per step).
    pub check: bool,
    /// How peers find each other at the start.
    pub bootstrap: Bootstrap,
    /// Template for every router (nickname and incarnation are set per peer).
    pub router: RouterConfig,
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions {
            peers: 8,
            seed: 0,
            one_way_delay_min: Duration::from_millis(1),
            one_way_delay_mean: Duration::from_millis(10),
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            partition_mode: PartitionMode::None,
            partition_probability: 0.0,
            unpartition_probability: 0.0,
            restart_probability: 0.0,
            restart_down_time: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(6),
            dial_timeout: Duration::from_secs(3),
            tick: Duration::from_secs(1),
            fault_time: Duration::from_secs(120),
            convergence_max: Duration::from_secs(300),
            hop_limit: 64,
            message_bytes_max: 0,
            check: true,
            bootstrap: Bootstrap::RandomTree,
            router: RouterConfig::default(),
        }
    }
}

impl SimOptions {
    /// Random faults drawn from `seed`: some loss, duplication, reordering, partitions of
    /// both kinds and restarts, for `peers` peers. What `tests/sim_random.rs` runs.
    pub fn random(seed: u64, peers: usize) -> SimOptions {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
        let mode = match rng.gen_range(0..3) {
            0 => PartitionMode::None,
            1 => PartitionMode::UniformSize,
            _ => PartitionMode::IsolateSingle,
        };
        SimOptions {
            peers,
            seed,
            one_way_delay_min: Duration::from_millis(rng.gen_range(0..5)),
            one_way_delay_mean: Duration::from_millis(rng.gen_range(5..100)),
            loss: rng.gen_range(0.0..0.1),
            duplicate: rng.gen_range(0.0..0.05),
            reorder: rng.gen_range(0.0..0.1),
            partition_mode: mode,
            partition_probability: rng.gen_range(0.0..0.05),
            unpartition_probability: rng.gen_range(0.05..0.3),
            restart_probability: rng.gen_range(0.0..0.05),
            bootstrap: if rng.gen_bool(0.5) {
                Bootstrap::RandomTree
            } else {
                Bootstrap::SingleSeed
            },
            router: RouterConfig {
                conn_limit: rng.gen_range(2..8),
                route_delay: Duration::from_millis(rng.gen_range(0..3) * 50),
                ..RouterConfig::default()
            },
            ..SimOptions::default()
        }
    }

    /// The message size bound in effect: the option, or one derived from the peer count.
    fn bytes_max(&self, peers: usize) -> usize {
        if self.message_bytes_max > 0 {
            return self.message_bytes_max;
        }
        // An entry: name, version, nickname, and at most twice the limit of connections.
        let entry = 64 + 2 * self.router.conn_limit * 40;
        1024 + peers * entry
    }
}

/// Why a run failed: the seed, what broke, and one line per peer.
#[derive(Debug)]
pub struct Failure {
    /// The seed to replay with.
    pub seed: u64,
    /// Virtual time since the start.
    pub at: Duration,
    /// What broke.
    pub what: String,
    /// One line per peer.
    pub peers: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "simulation failed: seed {} at {:.3}s: {}",
            self.seed,
            self.at.as_secs_f64(),
            self.what
        )?;
        writeln!(
            f,
            "replay: MESH_SIM_SEED={} cargo test -p mesh --test sim_random",
            self.seed
        )?;
        write!(f, "{}", self.peers)
    }
}

impl std::error::Error for Failure {}

/// Counters of one run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Messages handed to the network.
    pub messages: u64,
    /// Their encoded bytes.
    pub bytes: u64,
    /// Largest message seen.
    pub message_bytes_largest: usize,
    /// Messages lost by the fault model or on broken links.
    pub dropped: u64,
    /// Messages duplicated by the fault model.
    pub duplicated: u64,
    /// Connections established.
    pub connections: u64,
    /// Restarts.
    pub restarts: u64,
    /// Random partitions started.
    pub partitions: u64,
    /// Simulated frames that hit their hop limit (a transient loop, cut short).
    pub frames_hop_limited: u64,
    /// Simulated frames traced.
    pub frames_traced: u64,
    /// Steps taken.
    pub steps: u64,
    /// Encoded bytes by kind of message: `gossip (full)` (an update holding more than half of
    /// the peers the sender knows), `gossip (delta)`, `digest` (with version lists), `ipam`, `dns`.
    pub bytes_by_kind: BTreeMap<&'static str, u64>,
}

/// One simulated peer.
pub(crate) struct Node {
    name: PeerName,
    addr: SocketAddr,
    incarnation: u64,
    targets: Vec<SocketAddr>,
    router: Option<Router>,
    /// The deadline we have queued a timer event for.
    timer: Option<Instant>,
}

/// N routers, a network between them, virtual time.
pub struct Sim {
    options: SimOptions,
    rng: SmallRng,
    start: Instant,
    now: Instant,
    nodes: Vec<Node>,
    net: net::Net,
    checker: Checker,
    stats: Stats,
}

impl Sim {
    /// A simulation starting at `start` (any instant; time is virtual from there).
    pub fn new(options: SimOptions, start: Instant) -> Sim {
        let mut rng = SmallRng::seed_from_u64(options.seed);
        let mut sim = Sim {
            net: net::Net::default(),
            checker: Checker::default(),
            stats: Stats::default(),
            rng: SmallRng::seed_from_u64(rng.gen()),
            start,
            now: start,
            nodes: Vec::new(),
            options,
        };
        for _ in 0..sim.options.peers {
            sim.add_node();
        }
        match sim.options.bootstrap {
            Bootstrap::RandomTree => {
                for i in 1..sim.nodes.len() {
                    let j = sim.rng.gen_range(0..i);
                    sim.add_target(i, j);
                }
            }
            Bootstrap::SingleSeed => {
                for i in 1..sim.nodes.len() {
                    sim.add_target(i, 0);
                }
            }
            Bootstrap::Warm { degree } => sim.warm_start(degree),
        }
        sim
    }

    fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let name = PeerName(self.rng.gen::<u64>() & ((1 << 48) - 1));
        let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 6783));
        self.nodes.push(Node {
            name,
            addr,
            incarnation: 1,
            targets: Vec::new(),
            router: None,
            timer: None,
        });
        self.boot(i);
        i
    }

    fn boot(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let config = RouterConfig {
            nickname: format!("p{i}"),
            incarnation: node.incarnation,
            ..self.options.router.clone()
        };
        let seed = self.rng.gen();
        let mut router = Router::new(config, node.name, seed, self.now);
        if !node.targets.is_empty() {
            router.add_targets(self.now, &node.targets);
        }
        node.router = Some(router);
        self.checker.forget_node(i);
        self.drain(i);
    }

    /// Adds a peer with `targets` (indices of existing peers) as its user targets; returns it.
    pub fn add_peer(&mut self, targets: &[usize]) -> usize {
        let i = self.add_node();
        for &j in targets {
            self.add_target(i, j);
        }
        i
    }

    /// Gives peer `i` the address of peer `j` as a user target.
    pub fn add_target(&mut self, i: usize, j: usize) {
        let addr = self.nodes[j].addr;
        self.nodes[i].targets.push(addr);
        let now = self.now;
        if let Some(r) = self.nodes[i].router.as_mut() {
            r.add_targets(now, &[addr]);
        }
        self.drain(i);
    }

    /// Builds a connected mesh directly, every router told of every entry at once; messages of
    /// the build-up are discarded. Every peer gets exactly `degree` links (all of them when
    /// there are fewer peers), so no one is left below its connection limit, dialing: a
    /// settled mesh, quiet from the first step. The links: a ring (which keeps it connected)
    /// and each peer's next `degree/2 - 1` peers along it, then randomized by swapping the ends
    /// of non-ring links (which keeps every degree), so paths are as short as in a random mesh.
    fn warm_start(&mut self, degree: usize) {
        let n = self.nodes.len();
        let mut pairs = BTreeSet::new();
        if n <= degree + 1 {
            for a in 0..n {
                for b in a + 1..n {
                    pairs.insert((a, b));
                }
            }
        } else {
            let mut ring = Vec::new();
            let mut chords = Vec::new();
            for i in 0..n {
                for step in 1..=(degree / 2).max(1) {
                    let j = (i + step) % n;
                    let pair = (i.min(j), i.max(j));
                    if step == 1 {
                        ring.push(pair);
                    } else {
                        chords.push(pair);
                    }
                }
            }
            let mut present: std::collections::HashSet<(usize, usize)> =
                ring.iter().chain(&chords).copied().collect();
            for _ in 0..chords.len() * 10 {
                let (x, y) = (
                    self.rng.gen_range(0..chords.len()),
                    self.rng.gen_range(0..chords.len()),
                );
                let ((a, b), (c, d)) = (chords[x], chords[y]);
                let (a_d, c_b) = ((a.min(d), a.max(d)), (c.min(b), c.max(b)));
                let distinct = a != c && a != d && b != c && b != d;
                if !distinct || present.contains(&a_d) || present.contains(&c_b) {
                    continue;
                }
                present.remove(&chords[x]);
                present.remove(&chords[y]);
                present.insert(a_d);
                present.insert(c_b);
                chords[x] = a_d;
                chords[y] = c_b;
            }
            pairs.extend(ring);
            pairs.extend(chords);
        }
        for &(a, b) in &pairs {
            if a != b {
                self.link(a, b);
            }
        }
        // Each dialer takes the first message on its connection as the acceptance; an empty
        // update stands in for the full state the accepting side sent.
        let now = self.now;
        let accept = Message::Gossip(TopologyUpdate { peers: Vec::new() });
        for node in &mut self.nodes {
            if let Some(r) = node.router.as_mut() {
                let outbound: Vec<ConnId> = r
                    .connections()
                    .iter()
                    .filter(|c| c.outbound)
                    .map(|c| c.conn)
                    .collect();
                for conn in outbound {
                    r.handle_decoded(now, conn, accept.clone());
                    while r.poll_transmit().is_some() {}
                }
            }
        }
        self.net.clear_messages();
        let all = TopologyUpdate {
            peers: self
                .nodes
                .iter()
                .filter_map(|node| node.router.as_ref())
                .map(|r| Arc::new(r.topology().own().clone()))
                .collect(),
        };
        let all = Message::Gossip(all);
        for i in 0..n {
            let Some(r) = self.nodes[i].router.as_mut() else {
                continue;
            };
            if let Some(conn) = r.connections().first().map(|c| c.conn) {
                r.handle_decoded(now, conn, all.clone());
            }
            while r.poll_transmit().is_some() {}
            self.drain(i);
        }
    }

    /// Events waiting in the network queue (deliveries, timers, dials), for benchmarks.
    pub fn queued(&self) -> usize {
        self.net.len()
    }

    /// Current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Number of peers (up or down).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True with no peers.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Peer `i`'s router, if it is up.
    pub fn router(&self, i: usize) -> Option<&Router> {
        self.nodes[i].router.as_ref()
    }

    /// Peer `i`'s name.
    pub fn name(&self, i: usize) -> PeerName {
        self.nodes[i].name
    }

    /// Indices of the peers that are up.
    pub fn up(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].router.is_some())
            .collect()
    }

    /// The run's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The options of this run.
    pub fn options(&self) -> &SimOptions {
        &self.options
    }

    /// Sets the message fault rates (e.g. to zero for a liveness phase).
    pub fn set_faults(&mut self, loss: f64, duplicate: f64, reorder: f64) {
        self.options.loss = loss;
        self.options.duplicate = duplicate;
        self.options.reorder = reorder;
    }

    /// Scripted partition: links between `left` and everyone else break (after the idle
    /// timeout), and dials across fail, until [`Sim::heal`].
    pub fn partition(&mut self, left: &[usize]) {
        let left: BTreeSet<usize> = left.iter().copied().collect();
        let side = (0..self.nodes.len()).map(|i| left.contains(&i)).collect();
        self.net.partition = Some(side);
        self.schedule_cut_links();
    }

    /// Ends every partition.
    pub fn heal(&mut self) {
        self.net.partition = None;
    }

    /// Peer `i` crashes: it stops at once; its neighbours notice after the idle timeout.
    pub fn crash(&mut self, i: usize) {
        if self.nodes[i].router.take().is_none() {
            return;
        }
        self.nodes[i].timer = None;
        let idle = self.options.idle_timeout;
        for (far, far_conn) in self.net.unlink_all(i) {
            let at = self.now + idle;
            self.net.push(
                at,
                net::Ev::Disconnected {
                    to: far,
                    conn: far_conn,
                    reason: "peer silent: timed out".into(),
                },
            );
        }
    }

    /// Peer `i` starts again with empty memory, its name, address and user targets, and a
    /// higher incarnation.
    pub fn restart(&mut self, i: usize) {
        self.crash(i);
        self.nodes[i].incarnation += 1;
        self.stats.restarts += 1;
        self.boot(i);
    }

    /// Crash now, start again after `down`.
    pub fn crash_then_restart(&mut self, i: usize, down: Duration) {
        self.crash(i);
        self.stats.restarts += 1;
        let at = self.now + down;
        self.net.push(at, net::Ev::Boot { node: i });
    }

    /// Runs events until virtual time reaches `until`.
    pub fn run_until(&mut self, until: Instant) -> Result<(), Box<Failure>> {
        while let Some(at) = self.net.next_at() {
            if at > until {
                break;
            }
            self.step()?;
        }
        self.now = self.now.max(until);
        Ok(())
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) -> Result<(), Box<Failure>> {
        self.run_until(self.now + d)
    }

    /// Runs until `done(self)` holds (checked after every step) or `max` passes; returns how
    /// long it took, or `None` on timeout.
    pub fn run_until_true(
        &mut self,
        max: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Result<Option<Duration>, Box<Failure>> {
        let t0 = self.now;
        let deadline = t0 + max;
        loop {
            if done(self) {
                return Ok(Some(self.now - t0));
            }
            match self.net.next_at() {
                Some(at) if at <= deadline => self.step()?,
                _ => {
                    self.now = deadline;
                    return Ok(None);
                }
            }
        }
    }

    /// The whole randomized run: faults for `fault_time`, then the liveness phase.
    pub fn run(&mut self) -> Result<Stats, Box<Failure>> {
        let end = self.now + self.options.fault_time;
        let first_tick = self.now + self.options.tick;
        self.net.ticking = true;
        self.net.push(first_tick, net::Ev::Tick);
        self.run_until(end)?;
        self.liveness()?;
        Ok(self.stats.clone())
    }

    /// Heals everything and requires convergence within `convergence_max`, then loop-free
    /// forwarding between every pair of peers.
    pub fn liveness(&mut self) -> Result<Duration, Box<Failure>> {
        self.heal();
        self.set_faults(0.0, 0.0, 0.0);
        self.net.ticking = false;
        for i in 0..self.nodes.len() {
            if self.nodes[i].router.is_none() {
                self.boot(i);
            }
        }
        let max = self.options.convergence_max;
        let Some(took) = self.run_until_true(max, |s| s.converged())? else {
            return Err(self.failure(format!(
                "no convergence within {}s of healing",
                max.as_secs()
            )));
        };
        if let Err(what) = check::forwarding_loop_free(self) {
            return Err(self.failure(what));
        }
        Ok(took)
    }

    /// Every peer up, all holding the same entries at the same versions, each with a route to
    /// every other.
    pub fn converged(&self) -> bool {
        let routers: Vec<&Router> = self
            .nodes
            .iter()
            .filter_map(|n| n.router.as_ref())
            .collect();
        if routers.len() != self.nodes.len() {
            return false;
        }
        let first = routers[0].topology();
        let n = self.nodes.len();
        routers.iter().all(|r| {
            let t = r.topology();
            t.len() == n
                && !r.routes_pending()
                && r.routes().unicast.len() == n - 1
                && t.digest() == first.digest()
                && t.peers()
                    .zip(first.peers())
                    .all(|(a, b)| a.name == b.name && a.version == b.version)
        })
    }

    /// One line per peer: index, name, up/down, incarnation, connections, known/reachable
    /// peers, own version, digest.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let line = match &node.router {
                None => format!("{i:>4} {} down inc={}", node.name, node.incarnation),
                Some(r) => {
                    let t = r.topology();
                    let conns: Vec<String> = r
                        .connections()
                        .iter()
                        .map(|c| self.index_of(c.peer).map_or("?".into(), |j| j.to_string()))
                        .collect();
                    format!(
                        "{i:>4} {} up inc={} v={} conns=[{}] known={} reach={} digest={:016x} targets=[{}]",
                        node.name,
                        node.incarnation,
                        t.own().version.counter,
                        conns.join(","),
                        t.len(),
                        r.routes().unicast.len() + 1,
                        t.digest(),
                        r.targets()
                            .iter()
                            .map(|t| format!("{}:{:?}:{:?}:{}", t.addr.ip(), t.kind, match t.state { crate::connect::TargetState::Waiting { next_attempt } => format!("wait {:?}", next_attempt.saturating_duration_since(self.now)), s => format!("{s:?}") }, t.last_error.as_deref().unwrap_or("-")))
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                }
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// The index of the peer named `name`.
    pub fn index_of(&self, name: PeerName) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn failure(&self, what: String) -> Box<Failure> {
        Box::new(Failure {
            seed: self.options.seed,
            at: self.elapsed(),
            what,
            peers: self.report(),
        })
    }

    /// Processes the earliest event.
    pub fn step(&mut self) -> Result<(), Box<Failure>> {
        let Some((at, ev)) = self.net.pop() else {
            return Ok(());
        };
        self.now = self.now.max(at);
        self.stats.steps += 1;
        let now = self.now;
        let touched = match ev {
            net::Ev::Timer { node } => {
                if self.nodes[node].timer != Some(at) {
                    return Ok(());
                }
                self.nodes[node].timer = None;
                match self.nodes[node].router.as_mut() {
                    Some(r) => r.handle_timeout(now),
                    None => return Ok(()),
                }
                Some(node)
            }
            net::Ev::Deliver { to, conn, message } => {
                if !self.net.linked(to, conn) {
                    self.stats.dropped += 1;
                    return Ok(());
                }
                let Some(r) = self.nodes[to].router.as_mut() else {
                    return Ok(());
                };
                r.handle_decoded(now, conn, (*message).clone());
                Some(to)
            }
            net::Ev::Disconnected { to, conn, reason } => {
                self.net.unlink(to, conn);
                let Some(r) = self.nodes[to].router.as_mut() else {
                    return Ok(());
                };
                r.handle_disconnected(now, conn, reason);
                Some(to)
            }
            net::Ev::Dialed { from, addr } => {
                let far = self.nodes.iter().position(|n| n.addr == addr);
                match far {
                    Some(far)
                        if self.nodes[far].router.is_some() && self.net.can_reach(from, far) =>
                    {
                        if self.nodes[from].router.is_some() {
                            self.link(from, far);
                        }
                    }
                    _ => {
                        if let Some(r) = self.nodes[from].router.as_mut() {
                            r.handle_dial_failed(now, addr, "no answer".into());
                        }
                    }
                }
                Some(from)
            }
            net::Ev::CheckLink { a, conn } => {
                if let Some((b, b_conn)) = self.net.far(a, conn) {
                    if !self.net.can_reach(a, b) {
                        self.net.unlink(a, conn);
                        for (x, c) in [(a, conn), (b, b_conn)] {
                            if let Some(r) = self.nodes[x].router.as_mut() {
                                r.handle_disconnected(now, c, "peer silent: timed out".into());
                            }
                            self.drain(x);
                        }
                    }
                }
                None
            }
            net::Ev::Boot { node } => {
                if self.nodes[node].router.is_none() {
                    self.nodes[node].incarnation += 1;
                    self.boot(node);
                }
                None
            }
            net::Ev::Tick => {
                if !self.net.ticking {
                    return Ok(());
                }
                self.random_faults();
                if self.net.ticking {
                    let next = now + self.options.tick;
                    self.net.push(next, net::Ev::Tick);
                }
                None
            }
        };
        if let Some(i) = touched {
            self.drain(i);
            if self.options.check {
                if let Err(what) = check::after_step(self, i) {
                    return Err(self.failure(what));
                }
            }
        }
        if let Some(what) = self.net.oversized.take() {
            return Err(self.failure(what));
        }
        Ok(())
    }

    /// Establishes a connection between `a` (dialing) and `b` at once.
    fn link(&mut self, a: usize, b: usize) {
        let (ca, cb) = self.net.link(a, b);
        self.stats.connections += 1;
        let now = self.now;
        let (name_a, name_b) = (self.nodes[a].name, self.nodes[b].name);
        let (addr_a, addr_b) = (self.nodes[a].addr, self.nodes[b].addr);
        if let Some(r) = self.nodes[a].router.as_mut() {
            r.handle_connected(now, ca, name_b, format!("p{b}"), addr_b, true);
        }
        if let Some(r) = self.nodes[b].router.as_mut() {
            r.handle_connected(now, cb, name_a, format!("p{a}"), addr_a, false);
        }
        self.drain(a);
        self.drain(b);
    }

    /// Turns peer `i`'s outputs into network events and re-arms its timer.
    fn drain(&mut self, i: usize) {
        let now = self.now;
        let bytes_max = self.options.bytes_max(self.nodes.len());
        loop {
            let Some(r) = self.nodes[i].router.as_mut() else {
                return;
            };
            let mut progress = false;
            let mut events = Vec::new();
            let mut transmits = Vec::new();
            let known = r.topology().len();
            while let Some(t) = r.poll_transmit() {
                transmits.push(t);
            }
            while let Some(e) = r.poll_event() {
                events.push(e);
            }
            for t in transmits {
                progress = true;
                let len = t.message.encoded_len();
                self.stats.messages += 1;
                self.stats.bytes += len as u64;
                let kind = match &*t.message {
                    // Full states leave out unreachable entries; more than half is one.
                    Message::Gossip(u) if u.peers.len() * 2 > known => "gossip (full)",
                    Message::Gossip(_) => "gossip (delta)",
                    Message::Digest { .. } => "digest",
                    Message::Versions { .. } => "versions",
                    Message::Buckets { .. } | Message::BucketVersions { .. } => "buckets",
                    Message::Ipam(_) => "ipam",
                    Message::Dns(_) => "dns",
                };
                *self.stats.bytes_by_kind.entry(kind).or_default() += len as u64;
                self.stats.message_bytes_largest = self.stats.message_bytes_largest.max(len);
                if len > bytes_max {
                    self.net.oversized = Some(format!(
                        "peer {i} sent a message of {len} bytes, over the bound of {bytes_max}"
                    ));
                }
                self.send(i, t.conn, t.message);
            }
            for e in events {
                progress = true;
                self.handle_event(i, e);
            }
            if !progress {
                break;
            }
        }
        let deadline = self.nodes[i].router.as_ref().and_then(|r| r.poll_timeout());
        if let Some(at) = deadline {
            let at = at.max(now);
            if self.nodes[i].timer != Some(at) {
                self.nodes[i].timer = Some(at);
                self.net.push(at, net::Ev::Timer { node: i });
            }
        }
    }

    fn handle_event(&mut self, i: usize, event: Event) {
        match event {
            Event::Dial { addr } => {
                let far = self.nodes.iter().position(|n| n.addr == addr);
                let reachable =
                    far.is_some_and(|f| self.nodes[f].router.is_some() && self.net.can_reach(i, f));
                // A handshake takes a round trip; a dial into the void takes the timeout.
                let delay = if reachable {
                    self.delay() * 2
                } else {
                    self.options.dial_timeout
                };
                let at = self.now + delay;
                self.net.push(at, net::Ev::Dialed { from: i, addr });
            }
            Event::Close { conn, reason } => {
                if let Some((far, far_conn)) = self.net.unlink(i, conn) {
                    let at = self.now + self.delay();
                    self.net.push(
                        at,
                        net::Ev::Disconnected {
                            to: far,
                            conn: far_conn,
                            reason: format!("closed by peer: {reason}"),
                        },
                    );
                }
            }
            Event::RoutesChanged => {}
        }
    }

    fn send(&mut self, from: usize, conn: ConnId, message: Arc<Message>) {
        let Some((to, to_conn)) = self.net.far(from, conn) else {
            self.stats.dropped += 1;
            return;
        };
        if !self.net.can_reach(from, to) || self.rng.gen_bool(self.options.loss.clamp(0.0, 1.0)) {
            self.stats.dropped += 1;
            return;
        }
        let copies = if self.rng.gen_bool(self.options.duplicate.clamp(0.0, 1.0)) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = self.delay();
            if self.rng.gen_bool(self.options.reorder.clamp(0.0, 1.0)) {
                delay += self.delay() * 4;
            }
            let at = self.now + delay;
            self.net.push(
                at,
                net::Ev::Deliver {
                    to,
                    conn: to_conn,
                    message: message.clone(),
                },
            );
        }
    }

    /// One-way delay: the minimum plus an exponential with the configured mean.
    fn delay(&mut self) -> Duration {
        let min = self.options.one_way_delay_min;
        let extra = self.options.one_way_delay_mean.saturating_sub(min);
        let u: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        min + extra.mul_f64((-u.ln()).min(20.0))
    }

    fn random_faults(&mut self) {
        let o = self.options.clone();
        let n = self.nodes.len();
        if n == 0 {
            return;
        }
        if self.net.partition.is_some() {
            if self.rng.gen_bool(o.unpartition_probability.clamp(0.0, 1.0)) {
                self.heal();
            }
        } else if o.partition_mode != PartitionMode::None
            && self.rng.gen_bool(o.partition_probability.clamp(0.0, 1.0))
        {
            let left: Vec<usize> = match o.partition_mode {
                PartitionMode::IsolateSingle => vec![self.rng.gen_range(0..n)],
                _ => (0..n).filter(|_| self.rng.gen_bool(0.5)).collect(),
            };
            self.stats.partitions += 1;
            self.partition(&left);
        }
        if self.rng.gen_bool(o.restart_probability.clamp(0.0, 1.0)) {
            let i = self.rng.gen_range(0..n);
            if self.nodes[i].router.is_some() {
                let down = o.restart_down_time.mul_f64(self.rng.gen_range(0.0..2.0));
                self.crash_then_restart(i, down);
            }
        }
    }

    /// Queues a liveness check of every link after the idle timeout.
    fn schedule_cut_links(&mut self) {
        let at = self.now + self.options.idle_timeout;
        for (a, conn) in self.net.links() {
            self.net.push(at, net::Ev::CheckLink { a, conn });
        }
    }

    /// Routers that are up, with their index (for checkers and benchmarks).
    pub fn routers(&self) -> impl Iterator<Item = (usize, &Router)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.router.as_ref().map(|r| (i, r)))
    }

    /// Mutable access to peer `i`'s router (e.g. to ask for broadcast children).
    pub fn router_mut(&mut self, i: usize) -> Option<&mut Router> {
        self.nodes[i].router.as_mut()
    }

    /// Names of all peers, by index.
    pub fn names(&self) -> BTreeMap<PeerName, usize> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name, i))
            .collect()
    }

    pub(crate) fn checker_mut(&mut self) -> (&mut Checker, &[Node], &mut SmallRng, &mut Stats) {
        (
            &mut self.checker,
            &self.nodes,
            &mut self.rng,
            &mut self.stats,
        )
    }
}

/// Read access to a node for the checkers.
impl Node {
    pub(crate) fn router(&self) -> Option<&Router> {
        self.router.as_ref()
    }
}

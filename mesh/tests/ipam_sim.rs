//! Seeded simulation of IPAM across real `Router`s: joins, partitions, connection drops,
//! restarts from persisted state, departures (vanished for good, or `reset` hand-over), and
//! thousands of allocations and releases.
//!
//! Goal: no address is ever held by two containers, no address is ever owned by two peers (in
//! their own views, including the persisted view of a peer that is down), a restarted router
//! gives its containers their old addresses, and after healing every peer holds the same rings.
//! Newcomers during a split join either side, so both sides gain owners; splits stay shorter
//! than `reclaim_after` (a longer one makes live peers look vanished, and the side with most of
//! the space takes them over by design); peers that vanish without reset hold less than half of
//! the universe (reclaims need the votes of more than half).
//! Method: a small deterministic harness (time jumps, seeded RNG, in-flight queue); checkers run
//! after every step. CI runs a fixed subset of seeds; `MESH_SIM_SEED=N` replays one,
//! `MESH_SIM_SEEDS=A..B` runs a range, and the ignored `proof_two_thousand_runs` runs 2,000.
//! `MESH_IPAM_TRACE=1` prints IPAM events, departures and partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mesh::ipam::{Cidr, Init, IpamConfig, IpamEvent, Persisted};
use mesh::{ConnId, Message, PeerName, Router, RouterConfig};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// After how long unreachable a peer counts as vanished and is reclaimed.
const RECLAIM_AFTER: Duration = Duration::from_secs(120);
/// The longest split of the mesh.
const SPLIT_MAX: Duration = Duration::from_secs(40);
/// The shortest time between a heal and the next split.
const HEAL_MIN: Duration = Duration::from_secs(30);

struct SimPeer {
    name: PeerName,
    init: Init,
    router: Option<Router>,
    persisted: Option<Persisted>,
    gone: bool,
    /// Handed its space over (`meshctl reset`); its allocations go with it.
    leaving: bool,
    down_since: Option<Instant>,
    /// How often it started: its incarnation, so that peers take its new topology entry.
    starts: u64,
    /// Container id -> (subnet, address).
    containers: BTreeMap<String, (Option<Cidr>, Ipv4Addr)>,
    pending: Vec<(String, Option<Cidr>)>,
}

struct InFlight {
    to: usize,
    conn: ConnId,
    bytes: Vec<u8>,
}

struct Sim {
    seed: u64,
    rng: SmallRng,
    now: Instant,
    peers: Vec<SimPeer>,
    /// Wanted links (the graph); a link is up when both ends run and no partition cuts it.
    graph: BTreeSet<(usize, usize)>,
    /// Up links: (i, j) -> (conn at i, conn at j).
    up: BTreeMap<(usize, usize), (ConnId, ConnId)>,
    side: Vec<bool>,
    /// Since when the mesh is split in two, if it is.
    partitioned: bool,
    partitioned_at: Instant,
    /// Messages on the wire by (arrival, sequence): the first is delivered next, ties in send
    /// order.
    inflight: BTreeMap<(Instant, u64), InFlight>,
    next_message: u64,
    next_conn: u64,
    next_container: u64,
    config: IpamConfig,
    subnets: Vec<Option<Cidr>>,
    stats: Stats,
    /// Per peer, the ranges it owns in its own view (running) or persisted state (stopped), as
    /// of the last change of that state; `None` once it changed.
    owned: Vec<Option<Vec<(Cidr, u64, u64)>>>,
}

/// What one or more runs did, for the report of the long proof.
#[derive(Default, Debug)]
struct Stats {
    runs: u64,
    peers: u64,
    peers_max: usize,
    allocations: u64,
    releases: u64,
    checks: u64,
    ipam_messages: u64,
    ipam_bytes: u64,
    all_bytes: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.runs += o.runs;
        self.peers += o.peers;
        self.peers_max = self.peers_max.max(o.peers_max);
        self.allocations += o.allocations;
        self.releases += o.releases;
        self.checks += o.checks;
        self.ipam_messages += o.ipam_messages;
        self.ipam_bytes += o.ipam_bytes;
        self.all_bytes += o.all_bytes;
    }
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, (i % 250) as u8 + 1], 6783 + (i / 250) as u16))
}

impl Sim {
    fn new(seed: u64, initial: usize) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let config = IpamConfig {
            universe: "10.32.0.0/22".parse().unwrap(),
            init: Init::Consensus(initial),
            grace: Duration::from_secs(2),
            reclaim_after: Some(RECLAIM_AFTER),
            tick: Duration::from_secs(1),
        };
        let seeded = rng.gen_bool(0.3);
        let names: Vec<PeerName> = (0..initial)
            .map(|_| PeerName(rng.gen::<u64>() & ((1 << 48) - 1)))
            .collect();
        let mut sim = Sim {
            seed,
            rng,
            now: Instant::now(),
            peers: Vec::new(),
            graph: BTreeSet::new(),
            up: BTreeMap::new(),
            side: Vec::new(),
            partitioned: false,
            partitioned_at: Instant::now(),
            inflight: BTreeMap::new(),
            next_message: 0,
            next_conn: 1,
            next_container: 0,
            config,
            subnets: vec![None, Some("10.2.1.0/24".parse().unwrap())],
            stats: Stats::default(),
            owned: Vec::new(),
        };
        for name in names.iter().copied() {
            let init = if seeded {
                Init::Seed(names.clone())
            } else {
                Init::Consensus(initial)
            };
            sim.add_peer(name, init);
        }
        sim
    }

    fn add_peer(&mut self, name: PeerName, init: Init) -> usize {
        let i = self.peers.len();
        if std::env::var("MESH_IPAM_TRACE").is_ok() {
            eprintln!("peer {i} is {name}");
        }
        self.peers.push(SimPeer {
            name,
            init,
            router: None,
            persisted: None,
            gone: false,
            leaving: false,
            down_since: None,
            starts: 0,
            containers: BTreeMap::new(),
            pending: Vec::new(),
        });
        // During a split a newcomer joins one side and links to routers there, so both sides
        // gain owners (the case where counting a majority of peers let both sides reclaim).
        let side = self.partitioned && self.rng.gen_bool(0.5);
        self.side.push(side);
        let live: Vec<usize> = (0..i)
            .filter(|&j| !self.peers[j].gone && (!self.partitioned || self.side[j] == side))
            .collect();
        let links = self.rng.gen_range(1..=3usize);
        for _ in 0..links {
            if let Some(&j) = live.get(self.rng.gen_range(0..live.len().max(1))) {
                self.graph.insert((j, i));
            }
        }
        self.start(i);
        i
    }

    fn start(&mut self, i: usize) {
        let p = &mut self.peers[i];
        p.starts += 1;
        let config = RouterConfig {
            incarnation: p.starts,
            discovery: false,
            ipam: IpamConfig {
                init: p.init.clone(),
                ..self.config.clone()
            },
            ..RouterConfig::default()
        };
        let mut router = Router::new(config, p.name, self.seed ^ i as u64, self.now);
        if let Some(state) = p.persisted.clone() {
            router.ipam_restore(self.now, state).expect("restore");
        }
        p.router = Some(router);
        p.down_since = None;
        self.forget_owned(i);
        self.drain(i);
        self.reconcile_links();
    }

    fn stop(&mut self, i: usize) {
        self.peers[i].router = None;
        self.forget_owned(i);
        self.peers[i].down_since = Some(self.now);
        self.reconcile_links();
    }

    fn link_allowed(&self, a: usize, b: usize) -> bool {
        let running = |k: usize| self.peers[k].router.is_some();
        running(a) && running(b) && (!self.partitioned || self.side[a] == self.side[b])
    }

    fn reconcile_links(&mut self) {
        let graph: Vec<(usize, usize)> = self.graph.iter().copied().collect();
        for (a, b) in graph {
            let allowed = self.link_allowed(a, b);
            let is_up = self.up.contains_key(&(a, b));
            if allowed && !is_up {
                let (ca, cb) = (ConnId(self.next_conn), ConnId(self.next_conn + 1));
                self.next_conn += 2;
                self.up.insert((a, b), (ca, cb));
                let (na, nb) = (self.peers[a].name, self.peers[b].name);
                let now = self.now;
                self.router(a)
                    .handle_connected(now, ca, nb, String::new(), addr(b), true);
                self.drain(a);
                self.router(b)
                    .handle_connected(now, cb, na, String::new(), addr(a), false);
                self.drain(b);
            } else if !allowed && is_up {
                let (ca, cb) = self.up.remove(&(a, b)).unwrap();
                self.inflight
                    .retain(|_, m| !((m.to == a && m.conn == ca) || (m.to == b && m.conn == cb)));
                let now = self.now;
                for (k, c) in [(a, ca), (b, cb)] {
                    if let Some(r) = self.peers[k].router.as_mut() {
                        r.handle_disconnected(now, c, "sim".into());
                        self.drain(k);
                    }
                }
            }
        }
    }

    fn router(&mut self, i: usize) -> &mut Router {
        self.peers[i].router.as_mut().expect("running")
    }

    /// Persists (before anything is sent, like the daemon) and queues transmits.
    fn drain(&mut self, i: usize) {
        let Some(router) = self.peers[i].router.as_mut() else {
            return;
        };
        let persisted = router.ipam_take_dirty().then(|| router.ipam().persisted());
        let mut out = Vec::new();
        while let Some(t) = router.poll_transmit() {
            out.push(t);
        }
        while router.poll_event().is_some() {}
        let mut lost = Vec::new();
        while let Some(e) = router.poll_ipam_event() {
            match e {
                IpamEvent::Lost { allocations } => lost.extend(allocations),
                other if std::env::var("MESH_IPAM_TRACE").is_ok() => {
                    eprintln!("peer {i}: {other:?}")
                }
                _ => {}
            }
        }
        if persisted.is_some() {
            self.peers[i].persisted = persisted;
            self.forget_owned(i);
        }
        assert!(
            lost.is_empty() || self.peers[i].leaving,
            "seed {}: peer {i} lost allocations {lost:?}",
            self.seed
        );
        for t in out {
            let Some((&(a, b), &(ca, cb))) = self.up.iter().find(|((a, b), (ca, cb))| {
                (*a == i && *ca == t.conn) || (*b == i && *cb == t.conn)
            }) else {
                continue;
            };
            let (to, conn) = if a == i { (b, cb) } else { (a, ca) };
            let bytes = t.encode();
            self.stats.all_bytes += bytes.len() as u64;
            if matches!(*t.message, Message::Ipam(_)) {
                self.stats.ipam_messages += 1;
                self.stats.ipam_bytes += bytes.len() as u64;
            }
            let delay = Duration::from_millis(self.rng.gen_range(1..40));
            let at = self.now + delay;
            self.next_message += 1;
            self.inflight
                .insert((at, self.next_message), InFlight { to, conn, bytes });
        }
    }

    fn running(&self) -> Vec<usize> {
        (0..self.peers.len())
            .filter(|&i| self.peers[i].router.is_some())
            .collect()
    }

    /// Advances time by `dt`: delivers messages and fires timers in order.
    fn advance(&mut self, dt: Duration) {
        let end = self.now + dt;
        loop {
            let msg_at = self.inflight.first_key_value().map(|((at, _), _)| *at);
            let timer_at = self
                .running()
                .into_iter()
                .filter_map(|i| self.peers[i].router.as_ref().unwrap().poll_timeout())
                .min();
            let next = [msg_at, timer_at].into_iter().flatten().min();
            let Some(next) = next.filter(|t| *t <= end) else {
                break;
            };
            self.now = self.now.max(next);
            // Only a router that handled something can now place a waiting allocation.
            let mut touched = Vec::new();
            if msg_at == Some(next) {
                let (_, m) = self.inflight.pop_first().expect("a message is due");
                let now = self.now;
                if let Some(r) = self.peers[m.to].router.as_mut() {
                    r.handle_message(now, m.conn, &m.bytes).expect("decodes");
                    self.drain(m.to);
                    touched.push(m.to);
                }
            } else {
                for i in self.running() {
                    let now = self.now;
                    let r = self.router(i);
                    if r.poll_timeout().is_some_and(|t| t <= now) {
                        r.handle_timeout(now);
                        self.drain(i);
                        touched.push(i);
                    }
                }
            }
            self.retry_pending(&touched);
            self.check_owned();
        }
        self.now = end;
    }

    fn allocate(&mut self, i: usize, id: String, subnet: Option<Cidr>) -> bool {
        let now = self.now;
        match self.router(i).ipam_allocate(now, &id, subnet) {
            Ok((a, _)) => {
                self.drain(i);
                self.stats.allocations += 1;
                self.peers[i].containers.insert(id, (subnet, a));
                self.check();
                true
            }
            Err(mesh::ipam::AllocError::Waiting { .. }) => {
                self.drain(i);
                false
            }
            Err(e) => panic!("seed {}: allocation failed: {e}", self.seed),
        }
    }

    fn retry_pending(&mut self, peers: &[usize]) {
        for &i in peers {
            if self.peers[i].router.is_none() {
                continue;
            }
            let pending = std::mem::take(&mut self.peers[i].pending);
            for (id, subnet) in pending {
                if !self.allocate(i, id.clone(), subnet) {
                    self.peers[i].pending.push((id, subnet));
                }
            }
        }
    }

    /// Safety: no address held twice; no address owned by two peers.
    fn check(&mut self) {
        self.check_held();
        self.check_owned();
    }

    /// No address held by two containers. Only an allocation gives a container an address, so
    /// this runs after each (a step without one can't break it).
    fn check_held(&mut self) {
        let mut held: std::collections::HashMap<(Option<Cidr>, Ipv4Addr), (&str, usize)> =
            std::collections::HashMap::new();
        for (i, p) in self.peers.iter().enumerate() {
            for (id, (subnet, a)) in &p.containers {
                if let Some((other, j)) = held.insert((*subnet, *a), (id, i)) {
                    for k in [i, j] {
                        let q = &self.peers[k];
                        let Some(r) = q.router.as_ref() else {
                            eprintln!("peer {k} down");
                            continue;
                        };
                        let cidr = subnet.unwrap_or(self.config.universe);
                        let ring = r.ipam().ring(cidr).unwrap();
                        eprintln!(
                            "peer {k} ({}): owner of {a} in its view: {:?}; allocations {:?}; ring {:?}",
                            q.name,
                            ring.owner_of(u32::from(*a) as u64),
                            r.ipam().allocator().all().filter(|x| x.2.addr == u32::from(*a) as u64).collect::<Vec<_>>(),
                            ring.entries().take(6).collect::<Vec<_>>()
                        );
                    }
                    panic!(
                        "seed {}: {a} held by {other} (peer {j}) and {id} (peer {i}, leaving {})",
                        self.seed, p.leaving
                    );
                }
            }
        }
    }

    /// No address owned by two peers (running, or in the persisted state of a stopped one),
    /// after every step.
    fn check_owned(&mut self) {
        self.stats.checks += 1;
        self.owned.resize(self.peers.len(), None);
        let mut claims: BTreeMap<Cidr, Vec<(u64, u64, usize)>> = BTreeMap::new();
        for (i, p) in self.peers.iter().enumerate() {
            if p.gone {
                continue;
            }
            let owned = self.owned[i].get_or_insert_with(|| {
                let rings = match &p.router {
                    Some(r) => r.ipam().rings(),
                    None => match &p.persisted {
                        Some(v) => &v.state.rings[..],
                        None => &[],
                    },
                };
                rings
                    .iter()
                    .flat_map(|ring| {
                        let subnet = ring.subnet();
                        ring.owned(p.name)
                            .into_iter()
                            .map(move |r| (subnet, r.start, r.end))
                    })
                    .collect()
            });
            for &(subnet, start, end) in owned.iter() {
                claims.entry(subnet).or_default().push((start, end, i));
            }
        }
        for (subnet, mut ranges) in claims {
            ranges.sort();
            for w in ranges.windows(2) {
                assert!(
                    w[0].1 <= w[1].0,
                    "seed {}: {subnet}: peers {} and {} both own {}",
                    self.seed,
                    w[0].2,
                    w[1].2,
                    mesh::ipam::ip(w[1].0)
                );
            }
        }
    }

    /// Peer `i`'s rings or persisted state changed: its owned ranges are read again.
    fn forget_owned(&mut self, i: usize) {
        if let Some(o) = self.owned.get_mut(i) {
            *o = None;
        }
    }

    fn heal(&mut self) {
        self.partitioned = false;
        self.partitioned_at = self.now;
        self.trace(format_args!("healed at {:?}", self.now));
        self.reconcile_links();
    }

    fn trace(&self, what: std::fmt::Arguments) {
        if std::env::var("MESH_IPAM_TRACE").is_ok() {
            eprintln!("{what}");
        }
    }

    /// Containers that hold or wait for an address in `subnet`.
    fn live(&self, subnet: Option<Cidr>) -> usize {
        self.peers
            .iter()
            .map(|p| {
                p.containers.values().filter(|c| c.0 == subnet).count()
                    + p.pending.iter().filter(|c| c.1 == subnet).count()
            })
            .sum()
    }

    /// How many containers a subnet may hold at once: half its addresses, so that a peer that
    /// runs out always finds a donor and `Full` means a bug.
    fn capacity(&self, subnet: Option<Cidr>) -> usize {
        let cidr = subnet.unwrap_or(self.config.universe);
        (cidr.hosts().len() / 2) as usize
    }

    fn random_event(&mut self) {
        let running = self.running();
        let roll = self.rng.gen_range(0..100);
        match roll {
            0..=49 if !running.is_empty() => {
                // A batch of containers starts on one host.
                let i = running[self.rng.gen_range(0..running.len())];
                let subnet = self.subnets[self.rng.gen_range(0..10) / 8];
                let batch = self.rng.gen_range(1..=16);
                for _ in 0..batch {
                    if self.live(subnet) >= self.capacity(subnet) {
                        break;
                    }
                    let id = format!("c{}", self.next_container);
                    self.next_container += 1;
                    if !self.allocate(i, id.clone(), subnet) {
                        self.peers[i].pending.push((id, subnet));
                    }
                }
            }
            50..=74 if !running.is_empty() => {
                // A batch of containers exits on one host.
                let i = running[self.rng.gen_range(0..running.len())];
                let batch = self.rng.gen_range(1..=16);
                for _ in 0..batch {
                    let ids: Vec<String> = self.peers[i].containers.keys().cloned().collect();
                    if ids.is_empty() {
                        break;
                    }
                    let id = ids[self.rng.gen_range(0..ids.len())].clone();
                    let now = self.now;
                    self.router(i).ipam_release(now, &id);
                    self.drain(i);
                    self.stats.releases += 1;
                    self.peers[i].containers.remove(&id);
                }
            }
            75..=79 => {
                // Split the mesh in two, or heal it. A heal lasts long enough for routes to
                // come back before the next split (see `run` for the longest split).
                if self.partitioned {
                    self.heal();
                } else if self.now >= self.partitioned_at + HEAL_MIN {
                    for s in self.side.iter_mut() {
                        *s = self.rng.gen_bool(0.5);
                    }
                    self.partitioned = true;
                    self.partitioned_at = self.now;
                    self.trace(format_args!("partitioned at {:?}", self.now));
                    self.reconcile_links();
                }
            }
            80..=84 if !running.is_empty() => {
                // Drop one connection (messages in flight are lost); it comes back after the
                // step.
                let ups: Vec<(usize, usize)> = self.up.keys().copied().collect();
                if let Some(&(a, b)) = ups.get(self.rng.gen_range(0..ups.len().max(1))) {
                    self.graph.remove(&(a, b));
                    self.reconcile_links();
                    self.graph.insert((a, b));
                }
            }
            85..=89 => {
                // Restart (kill -9 and start): containers keep their addresses.
                if let Some(&i) = running.get(self.rng.gen_range(0..running.len().max(1))) {
                    self.stop(i);
                    let down = Duration::from_secs(self.rng.gen_range(1..20));
                    self.advance(down);
                    self.start(i);
                    for (id, (subnet, a)) in self.peers[i].containers.clone() {
                        let now = self.now;
                        let got = self.router(i).ipam_allocate(now, &id, subnet);
                        assert_eq!(
                            got.map(|g| g.0),
                            Ok(a),
                            "seed {}: restarted peer changed {id}'s address",
                            self.seed
                        );
                        self.drain(i);
                    }
                }
            }
            90..=92 if self.peers.len() < 50 => {
                let name = PeerName(self.rng.gen::<u64>() & ((1 << 48) - 1));
                self.add_peer(name, Init::Observer);
            }
            93..=94 if running.len() > 2 => {
                // Departure: vanish for good (host and containers gone), or reset first.
                let i = running[self.rng.gen_range(0..running.len())];
                // Reclaims need the votes of more than half of the universe's addresses: a mesh
                // whose vanished peers hold half of it stays stuck by design. Keep them below.
                // Before the first ring, the initial peers' vote needs a quorum of them: a mesh
                // that loses more stays waiting by design (status names the missing peers).
                if self.vanished_share_with(i) >= 0.45
                    || self.vanishing_loses_bootstrap_quorum(i)
                    || self.rng.gen_bool(0.5)
                {
                    // `meshctl reset` removes the host's containers, then hands its space over.
                    self.peers[i].leaving = true;
                    let gone_containers = std::mem::take(&mut self.peers[i].containers);
                    self.peers[i].pending.clear();
                    let handed = self.router(i).ipam_hand_over();
                    if std::env::var("MESH_IPAM_TRACE").is_ok() {
                        eprintln!("peer {i}: hands over to {handed:?}");
                    }
                    self.drain(i);
                    if handed.is_none() {
                        self.peers[i].leaving = false;
                        self.peers[i].containers = gone_containers;
                        return;
                    }
                    // Deliver the hand-over before leaving (reset waits for it).
                    self.advance(Duration::from_millis(100));
                }
                self.stop(i);
                self.peers[i].gone = true;
                self.peers[i].containers.clear();
                self.peers[i].pending.clear();
                self.repair_graph();
            }
            _ => {}
        }
    }

    /// The share of the universe held by peers that vanished (not reset) and are not taken over
    /// yet, with `i` among them, in `i`'s view.
    fn vanished_share_with(&self, i: usize) -> f64 {
        let Some(ring) = self.peers[i]
            .router
            .as_ref()
            .and_then(|r| r.ipam().ring(self.config.universe))
        else {
            return 0.0;
        };
        let held: u64 = ring
            .entries()
            .filter(|(_, owner)| {
                *owner == self.peers[i].name
                    || self
                        .peers
                        .iter()
                        .any(|p| p.name == *owner && p.gone && !p.leaving)
            })
            .map(|(r, _)| r.len())
            .sum();
        held as f64 / self.config.universe.range().len() as f64
    }

    /// Whether `i` vanishing before it knows the first ring leaves fewer initial peers than
    /// `--ipalloc-init consensus=N` needs to agree on it.
    fn vanishing_loses_bootstrap_quorum(&self, i: usize) -> bool {
        let Init::Consensus(n) = self.peers[i].init else {
            return false;
        };
        let agreed = self.peers[i]
            .router
            .as_ref()
            .is_some_and(|r| r.ipam().ring(self.config.universe).is_some());
        let founders_left = self
            .peers
            .iter()
            .enumerate()
            .filter(|(k, p)| *k != i && !p.gone && matches!(p.init, Init::Consensus(_)))
            .count();
        !agreed && founders_left < n / 2 + 1
    }

    /// Joins what a departure split off back to the rest (as operators re-peer hosts): a live
    /// peer cut off for good would look vanished and be reclaimed, which is right for a peer
    /// that is gone, not for one that is merely unreachable.
    fn repair_graph(&mut self) {
        let live: Vec<usize> = (0..self.peers.len())
            .filter(|&i| !self.peers[i].gone)
            .collect();
        let Some(&root) = live.first() else {
            return;
        };
        let mut seen = BTreeSet::from([root]);
        let mut todo = vec![root];
        loop {
            while let Some(a) = todo.pop() {
                for &(x, y) in &self.graph {
                    for (from, to) in [(x, y), (y, x)] {
                        if from == a && !self.peers[to].gone && seen.insert(to) {
                            todo.push(to);
                        }
                    }
                }
            }
            let Some(&cut) = live.iter().find(|i| !seen.contains(i)) else {
                break;
            };
            self.graph.insert((root, cut));
            seen.insert(cut);
            todo.push(cut);
        }
        self.reconcile_links();
    }

    /// Liveness: heal, let gossip settle, require identical rings everywhere.
    fn heal_and_converge(&mut self) {
        self.partitioned = false;
        for i in 0..self.peers.len() {
            if !self.peers[i].gone && self.peers[i].router.is_none() {
                self.start(i);
            }
        }
        // Departures may have split the graph: join what is left into a line.
        let running = self.running();
        for w in running.windows(2) {
            self.graph.insert((w[0], w[1]));
        }
        self.reconcile_links();
        self.advance(Duration::from_secs(200));
        let running = self.running();
        let rings = |i: usize| {
            self.peers[i]
                .router
                .as_ref()
                .unwrap()
                .ipam()
                .rings()
                .to_vec()
        };
        let reference = rings(running[0]);
        for &i in &running[1..] {
            // A peer that never used a subnet may lack its (still genesis) ring.
            let mine = rings(i);
            for r in &mine {
                if let Some(x) = reference.iter().find(|x| x.subnet() == r.subnet()) {
                    assert_eq!(x, r, "seed {}: peers disagree after healing", self.seed);
                }
            }
        }
        for &i in &running {
            if !self.peers[i].pending.is_empty() {
                let st = self.peers[i].router.as_ref().unwrap().ipam().status();
                for sn in &st.subnets {
                    eprintln!("{}: {:?}", sn.subnet, sn.owners);
                }
                eprintln!("claims: {:?}", st.claims);
                let gone: Vec<_> = self
                    .peers
                    .iter()
                    .filter(|p| p.gone)
                    .map(|p| p.name)
                    .collect();
                eprintln!("gone: {gone:?}");
            }
            assert!(
                self.peers[i].pending.is_empty(),
                "seed {}: peer {i} still waits for {:?}: {:?}",
                self.seed,
                self.peers[i].pending,
                self.peers[i]
                    .router
                    .as_ref()
                    .unwrap()
                    .ipam()
                    .status()
                    .waiting
            );
        }
    }
}

/// One seeded run: 3 to 5 initial peers grow to 5 to 50 while containers come and go.
fn run(seed: u64) -> Stats {
    let mut rng = SmallRng::seed_from_u64(seed);
    let initial = rng.gen_range(3..=5);
    let mut sim = Sim::new(seed, initial);
    let target = rng.gen_range(5..=50usize);
    let steps = rng.gen_range(300..600);
    for _ in 0..steps {
        if sim.peers.len() < target && sim.rng.gen_bool(0.2) {
            let name = PeerName(sim.rng.gen::<u64>() & ((1 << 48) - 1));
            sim.add_peer(name, Init::Observer);
        }
        sim.random_event();
        let dt = Duration::from_millis(sim.rng.gen_range(10..2000));
        sim.advance(dt);
        // A peer unreachable for `reclaim_after` counts as vanished for good, and its space is
        // reclaimed: keep splits (plus a restart and the time routes need after a heal) well
        // below that, so that only departed peers are reclaimed.
        if sim.partitioned && sim.now >= sim.partitioned_at + SPLIT_MAX {
            sim.heal();
        }
        // Dropped connections come back (the daemon redials within seconds).
        sim.reconcile_links();
    }
    sim.heal_and_converge();
    sim.stats.runs = 1;
    sim.stats.peers = sim.peers.len() as u64;
    sim.stats.peers_max = sim.peers.len();
    sim.stats
}

/// `MESH_SIM_SEED=N` replays one run; `MESH_SIM_SEEDS=A..B` runs a range; else `default`.
fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    if let Ok(s) = std::env::var("MESH_SIM_SEED") {
        return vec![s.trim().parse().expect("MESH_SIM_SEED must be a number")];
    }
    let Ok(s) = std::env::var("MESH_SIM_SEEDS") else {
        return default.collect();
    };
    let (a, b) = s
        .trim()
        .split_once("..")
        .expect("MESH_SIM_SEEDS must look like A..B");
    let a: u64 = a.parse().expect("MESH_SIM_SEEDS: A must be a number");
    let b: u64 = b.parse().expect("MESH_SIM_SEEDS: B must be a number");
    (a..b).collect()
}

fn run_all(seeds: &[u64]) -> Stats {
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    let mut failed = Vec::new();
    let progress = std::env::var("MESH_SIM_PROGRESS").is_ok();
    for &seed in seeds {
        let t = std::time::Instant::now();
        match std::panic::catch_unwind(|| run(seed)) {
            Ok(one) => {
                if progress {
                    println!(
                        "seed {seed}: ok, {} peers, {} allocations, {} releases, {} IPAM bytes, {:.1?}",
                        one.peers,
                        one.allocations,
                        one.releases,
                        one.ipam_bytes,
                        t.elapsed()
                    );
                }
                total.add(&one);
            }
            Err(_) => {
                println!("seed {seed}: FAILED");
                failed.push(seed);
            }
        }
    }
    println!(
        "{} runs ok (peers {} avg, {} max), {} allocations, {} releases, {} safety checks, \
         {} IPAM messages, {} IPAM bytes ({} per run), {} bytes in all, {:.1?}",
        total.runs,
        total.peers / total.runs.max(1),
        total.peers_max,
        total.allocations,
        total.releases,
        total.checks,
        total.ipam_messages,
        total.ipam_bytes,
        total.ipam_bytes / total.runs.max(1),
        total.all_bytes,
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "seeds {failed:?} failed; replay one: MESH_SIM_SEED=N cargo test -p mesh --test ipam_sim -- --include-ignored"
    );
    total
}

/// CI: a fixed subset of seeds, quick in debug builds.
#[test]
fn no_address_is_ever_given_out_twice() {
    run_all(&seeds(0..3));
}

/// Two of four initial peers vanish before anyone asked for an address: the other two can't
/// agree on the first ring (`consensus=4` needs three), and status says who is missing and what
/// to do instead of only listing the peers it heard from (proof seed 1992 once ended so).
#[test]
fn a_bootstrap_that_lost_its_quorum_names_the_missing_peers() {
    let mut sim = (0..)
        .map(|seed| Sim::new(seed, 4))
        .find(|s| matches!(s.peers[0].init, Init::Consensus(_)))
        .unwrap();
    sim.advance(Duration::from_secs(5));
    for i in [0, 3] {
        sim.stop(i);
        sim.peers[i].gone = true;
    }
    sim.repair_graph();
    assert!(
        !sim.allocate(1, "c0".into(), None),
        "allocated without a quorum"
    );
    sim.advance(Duration::from_secs(30));
    assert!(
        !sim.allocate(1, "c0".into(), None),
        "allocated without a quorum"
    );
    let waiting = sim.router(1).ipam().status().waiting.unwrap_or_default();
    let gone = format!(
        "unreachable now: {}, {}",
        sim.peers[0].name, sim.peers[3].name
    );
    let gone_swapped = format!(
        "unreachable now: {}, {}",
        sim.peers[3].name, sim.peers[0].name
    );
    assert!(
        waiting.contains(&gone) || waiting.contains(&gone_swapped),
        "{waiting}"
    );
    assert!(waiting.contains("missing 1 more peer"), "{waiting}");
    assert!(waiting.contains("lower consensus=N"), "{waiting}");
    // The fix it names: the two left reset (state and identity go) and launch again with
    // consensus=2.
    for i in [1, 2] {
        sim.stop(i);
        sim.peers[i].persisted = None;
        sim.peers[i].name = PeerName(sim.peers[i].name.0 ^ 1);
        sim.peers[i].init = Init::Consensus(2);
        sim.start(i);
    }
    sim.advance(Duration::from_secs(5));
    sim.allocate(1, "c0".into(), None);
    sim.advance(Duration::from_secs(10));
    assert!(
        sim.allocate(1, "c0".into(), None),
        "{:?}",
        sim.router(1).ipam().status().waiting
    );
    // Only the two that are here own space.
    let st = sim.router(1).ipam().status();
    let owners: Vec<PeerName> = st.subnets[0].owners.iter().map(|o| o.peer).collect();
    assert_eq!(owners.len(), 2, "{owners:?}");
    assert!(owners
        .iter()
        .all(|o| *o == sim.peers[1].name || *o == sim.peers[2].name));
}

/// Seeds the proof once failed on, each time a peer waiting for space in a small subnet after
/// healing, for good (runs of the model before newcomers joined either side of a split; they
/// take other paths now, and stay as runs that once found bugs):
/// - 1000, 1051: every owner there had one address left and kept it (donors gave only half of
///   their free space);
/// - 2139, 1076, 2202: the space sat with vanished peers whose reclaim stalled: votes split
///   between claimers with neither a majority (2139), and routers restarted or joined after a
///   peer vanished never counted it as gone, so they never voted; and the claimer that most
///   votes went to vanished for good before it could win, and was itself reclaimed (2327).
#[test]
fn seeds_where_a_peer_starved_of_space_after_healing() {
    if std::env::var_os("MESH_SIM_SEED").is_some() || std::env::var_os("MESH_SIM_SEEDS").is_some() {
        return;
    }
    run_all(&[1000, 1051, 1076, 2139, 2202, 2327]);
}

/// The proof: 2,000 runs. `cargo test -p mesh --release --test ipam_sim -- --ignored
/// --nocapture` (about N minutes here; see README).
#[test]
#[ignore = "long: 2,000 seeded runs; run by hand or in a scheduled job"]
fn proof_two_thousand_runs() {
    let stats = run_all(&seeds(1000..3000));
    assert!(
        stats.runs >= 2000
            || std::env::var("MESH_SIM_SEEDS").is_ok()
            || std::env::var("MESH_SIM_SEED").is_ok()
    );
}

//! IPAM: every container gets an address, and no address is ever handed out twice.
//!
//! The universe (`--ipalloc-range`, default 10.32.0.0/12) and every isolated subnet
//! (`net:CIDR`) is divided by a [`Ring`] of ranges owned by peers. A peer allocates only from
//! ranges it owns ([`Allocator`]), so allocation needs no coordination. Ownership changes only by
//! the owner (a donation to a peer that ran out, a hand-over before `meshctl reset`) or by a
//! quorum-agreed reclaim of a peer that vanished (`claims.rs`). A hand-over or a reclaim is
//! recorded in the rings' [`Register`], which every ring of ours holds in the same state
//! ([`Ipam::store_ring`]).
//!
//! Everything peers need from each other travels as one gossiped [`IpamUpdate`] that merges like
//! a CRDT: the bootstrap votes ([`Consensus`]), the agreed genesis member list, the rings, and
//! one [`Record`] per peer (free space, requests for space, reclaim claims and votes), each
//! written only by its peer. The router floods what changed ([`Ipam::take_delta`]: whole
//! rings and records, only those that differ from what we sent before) and sends the full
//! state to new neighbours and periodically, so copies converge.
//!
//! The first allocation in a new mesh needs a genesis: with `consensus=N` the initial peers vote
//! (`consensus.rs`); with `seed=` it is given; an `observer` waits for one. A blocked caller gets
//! [`AllocError::Waiting`], which says what we wait for and which peers are missing; the daemon
//! retries after every input until its deadline.
//!
//! Not here: persistence (the daemon stores [`Persisted`] in redb before it sends anything we
//! emitted, see [`Ipam::take_dirty`]), and kernel addresses. Callers pass `now`.
//! Invariants: we never allocate outside ranges our ring copy says we own; after a merge that
//! takes space from us, allocations there are dropped and reported.

mod allocator;
pub mod claims;
mod consensus;
mod register;
mod ring;
mod space;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use allocator::{Allocation, Allocator};
pub use claims::{Ack, Claim, Claims, Yield};
pub use consensus::{Ballot, Consensus, Node};
pub use register::{Register, Take};
pub use ring::{Entry, Ring, RingError, Vote};
pub use space::{ip, Cidr, CidrError, Range};

use crate::peer::PeerName;

/// How the first ring of a new mesh comes about (`--ipalloc-init`).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Init {
    /// The initial peers vote; a quorum of `N/2+1` of `N` must agree.
    Consensus(usize),
    /// The ring is split among exactly these peers, without a vote.
    Seed(Vec<PeerName>),
    /// Never own space at the start; wait for others' ring, then ask for space.
    Observer,
}

/// IPAM settings, fixed for the router's life.
#[derive(Clone, Debug)]
pub struct IpamConfig {
    /// The default subnet, divided among peers (`--ipalloc-range`).
    pub universe: Cidr,
    /// How the first ring comes about.
    pub init: Init,
    /// How long a released address stays reserved for its container.
    pub grace: Duration,
    /// After how long unreachable a peer's space may be reclaimed (with quorum); `None`: never
    /// automatically (only `meshctl rmpeer`).
    pub reclaim_after: Option<Duration>,
    /// Housekeeping period: free-space reports, grace expiry, retries.
    pub tick: Duration,
}

impl Default for IpamConfig {
    fn default() -> IpamConfig {
        IpamConfig {
            universe: "10.32.0.0/12".parse().expect("invariant: literal subnet"),
            init: Init::Consensus(1),
            grace: Duration::from_secs(5),
            reclaim_after: Some(Duration::from_secs(3600)),
            tick: Duration::from_secs(1),
        }
    }
}

/// One peer's own gossiped facts; only that peer writes it, with a growing version.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    /// Grows with every change.
    pub version: u64,
    /// Free addresses it owns, per subnet.
    pub free: BTreeMap<Cidr, u64>,
    /// Subnets it ran out of and asks space in.
    pub wants: BTreeSet<Cidr>,
    /// Reclaim claims and votes (`claims.rs`).
    pub claims: Claims,
}

/// Our whole IPAM state as gossiped: merges like a CRDT.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct IpamUpdate {
    /// The universe, so a mismatch is named instead of merged.
    pub universe: Option<Cidr>,
    /// Bootstrap votes (until a genesis exists).
    pub consensus: Consensus,
    /// The agreed initial members, from which every ring's first copy derives.
    pub genesis: Option<Vec<PeerName>>,
    /// The rings we hold.
    pub rings: Vec<Ring>,
    /// Every peer's record.
    pub records: BTreeMap<PeerName, Record>,
}

/// What the daemon stores (redb) and hands back to [`Ipam::restore`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Persisted {
    /// Our name, so a state dir copied to another identity is refused.
    pub me: PeerName,
    /// The gossiped state.
    pub state: IpamUpdate,
    /// Our allocations.
    pub allocator: Allocator,
}

/// Why an allocation did not (yet) succeed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum AllocError {
    /// Not possible yet; retry after the next input. The text says what we wait for.
    #[error("{reason}")]
    Waiting {
        /// What we wait for, and which peers are missing.
        reason: String,
    },
    /// The subnet overlaps another one in use.
    #[error("subnet {subnet} overlaps {other}, which is already in use; choose a separate subnet")]
    Overlap {
        /// The subnet asked for.
        subnet: Cidr,
        /// The one in use.
        other: Cidr,
    },
    /// No peer has free space left.
    #[error("subnet {subnet} is full: every address is allocated; release some or use a larger --ipalloc-range")]
    Full {
        /// The subnet.
        subnet: Cidr,
    },
    /// Our ring conflicts with a peer's.
    #[error("{reason}")]
    Conflict {
        /// What conflicts, and what to do.
        reason: String,
    },
}

/// Something the daemon should know (logs).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum IpamEvent {
    /// The first ring was agreed.
    Genesis {
        /// Its members.
        members: Vec<PeerName>,
    },
    /// We received space from `from`.
    Received {
        /// The subnet.
        subnet: Cidr,
        /// How many addresses we now own there.
        owned: u64,
    },
    /// We gave space to `to`.
    Donated {
        /// The subnet.
        subnet: Cidr,
        /// What we gave.
        range: Range,
        /// To whom.
        to: PeerName,
    },
    /// Allocations were dropped because our space was taken over (reclaimed while we were away).
    Lost {
        /// Container ids and addresses.
        allocations: Vec<(String, Ipv4Addr)>,
    },
    /// We took over a vanished peer's space with a quorum's agreement.
    Reclaimed {
        /// The vanished peer.
        peer: PeerName,
    },
    /// A peer's state conflicts with ours.
    Conflict {
        /// What and what to do.
        reason: String,
    },
    /// Two copies name different routers as holding a departed peer's space (two claimers
    /// won it: a broken invariant). The merge keeps one, the same everywhere.
    TakenTwice {
        /// The departed peer.
        peer: PeerName,
        /// Who holds it in our copy.
        ours: PeerName,
        /// Who holds it in the other copy.
        theirs: PeerName,
    },
}

/// One peer's share of one subnet, for `meshctl ipam`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct OwnerStatus {
    /// The peer.
    pub peer: PeerName,
    /// Addresses it owns.
    pub owned: u64,
    /// Free among them (its last report; exact for us).
    pub free: u64,
    /// Whether we have a route to it (always true for us).
    pub reachable: bool,
}

/// One subnet, for `meshctl ipam`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SubnetStatus {
    /// The subnet.
    pub subnet: Cidr,
    /// Its owners.
    pub owners: Vec<OwnerStatus>,
}

/// What `meshctl status ipam` shows.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IpamStatus {
    /// `ready`, `waiting` or `conflict`.
    pub state: &'static str,
    /// What we wait for, while waiting.
    pub waiting: Option<String>,
    /// A conflict with a peer, if any.
    pub conflict: Option<String>,
    /// The universe.
    pub universe: Cidr,
    /// The genesis members, once agreed.
    pub genesis: Option<Vec<PeerName>>,
    /// Per subnet.
    pub subnets: Vec<SubnetStatus>,
    /// Our allocations: (subnet, container id, address, releasing).
    pub allocations: Vec<(Cidr, String, Ipv4Addr, bool)>,
    /// Reclaims in progress or done, one line each.
    pub claims: Vec<String>,
    /// Addresses of the universe owned by us and the peers we reach, and the universe's size:
    /// reclaims need more than half. `None` before the genesis.
    pub reachable_share: Option<(u64, u64)>,
}

/// The IPAM state machine of one peer, owned by the [`crate::Router`].
#[derive(Debug)]
pub struct Ipam {
    me: PeerName,
    config: IpamConfig,
    state: IpamUpdate,
    allocator: Allocator,
    rng: SmallRng,
    ballot: Option<Ballot>,
    propose_at: Option<Instant>,
    wanting: bool,
    reachable: BTreeSet<PeerName>,
    unreachable_since: BTreeMap<PeerName, Instant>,
    requests_seen: BTreeMap<(PeerName, u64), Instant>,
    donated: BTreeSet<(PeerName, u64, Cidr)>,
    conflict: Option<String>,
    /// We handed our space over (`meshctl reset`): that our space is gone is no surprise.
    left: bool,
    next_tick: Instant,
    /// What our neighbours have heard from us so far (full states and deltas), so that a
    /// change sends only the rings and records that differ.
    sent: IpamUpdate,
    changed: bool,
    dirty: bool,
    events: VecDeque<IpamEvent>,
}

/// Why persisted state cannot be used.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum RestoreError {
    /// The state belongs to another identity.
    #[error("the IPAM state belongs to peer {found}, not to {me}; move the state directory's ipam.redb away")]
    OtherPeer {
        /// Ours.
        me: PeerName,
        /// The stored one.
        found: PeerName,
    },
    /// The state was made with another universe.
    #[error("the IPAM state was made with --ipalloc-range {found}, not {configured}; launch with --ipalloc-range {found}, or run `meshctl reset` to start over")]
    OtherUniverse {
        /// Configured now.
        configured: Cidr,
        /// Stored.
        found: Cidr,
    },
}

impl Ipam {
    /// A fresh IPAM state. With `seed=` the genesis is known at once.
    pub fn new(config: IpamConfig, me: PeerName, seed: u64, now: Instant) -> Ipam {
        let mut state = IpamUpdate {
            universe: Some(config.universe),
            ..IpamUpdate::default()
        };
        match &config.init {
            Init::Seed(members) => {
                let mut m = members.clone();
                m.sort();
                m.dedup();
                state.genesis = Some(m);
            }
            Init::Consensus(_) => {
                state.consensus.nodes.insert(me, Node::default());
            }
            Init::Observer => {}
        }
        state.records.insert(me, Record::default());
        Ipam {
            me,
            next_tick: now + config.tick,
            config,
            state,
            allocator: Allocator::default(),
            rng: SmallRng::seed_from_u64(seed),
            ballot: None,
            propose_at: None,
            wanting: false,
            reachable: BTreeSet::new(),
            unreachable_since: BTreeMap::new(),
            requests_seen: BTreeMap::new(),
            donated: BTreeSet::new(),
            conflict: None,
            left: false,
            sent: IpamUpdate::default(),
            changed: true,
            dirty: true,
            events: VecDeque::new(),
        }
    }

    /// Restores persisted state (after a restart or `kill -9`).
    pub fn restore(&mut self, now: Instant, p: Persisted) -> Result<(), RestoreError> {
        if p.me != self.me {
            return Err(RestoreError::OtherPeer {
                me: self.me,
                found: p.me,
            });
        }
        if let Some(found) = p.state.universe {
            if found != self.config.universe {
                return Err(RestoreError::OtherUniverse {
                    configured: self.config.universe,
                    found,
                });
            }
        }
        let keep_init_genesis = self.state.genesis.is_some() && p.state.genesis.is_none();
        let genesis = self.state.genesis.take();
        self.state = p.state;
        if keep_init_genesis {
            self.state.genesis = genesis;
        }
        self.state.records.entry(self.me).or_default();
        self.allocator = p.allocator;
        self.allocator.restart_grace(now + self.config.grace);
        self.changed = true;
        self.step(now);
        Ok(())
    }

    /// Our name.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// The configuration.
    pub fn config(&self) -> &IpamConfig {
        &self.config
    }

    /// Everything we hold, for gossip.
    pub fn full_state(&self) -> IpamUpdate {
        self.state.clone()
    }

    /// Whether there is anything worth periodic gossip: a mesh that never used IPAM stays
    /// silent about it.
    pub fn in_use(&self) -> bool {
        self.state.genesis.is_some()
            || self
                .state
                .consensus
                .nodes
                .values()
                .any(|n| *n != Node::default())
            || self.state.records.values().any(|r| r.version > 0)
    }

    /// What to persist.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            me: self.me,
            state: self.state.clone(),
            allocator: self.allocator.clone(),
        }
    }

    /// True once if the state changed since the last call: persist before sending anything.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Once after a change, what others have not heard from us yet: the universe and genesis
    /// (small, and needed to read rings), the bootstrap votes that changed, every ring that
    /// changed (whole: a ring is only safe to merge with every token its writer knew) and every
    /// record with a newer version. Merges like the full state; neighbours that connect later
    /// get the full state, and the periodic full state repairs anything lost.
    pub fn take_delta(&mut self) -> Option<IpamUpdate> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        let sent = std::mem::replace(&mut self.sent, self.state.clone());
        let delta = IpamUpdate {
            universe: self.state.universe,
            // Only the participants whose acceptor state moved: merging is per participant, and
            // sending all of them on every move made the bootstrap cost O(N) per change.
            consensus: Consensus {
                nodes: self
                    .state
                    .consensus
                    .nodes
                    .iter()
                    .filter(|(p, n)| sent.consensus.nodes.get(p) != Some(*n))
                    .map(|(p, n)| (*p, n.clone()))
                    .collect(),
            },
            genesis: self.state.genesis.clone(),
            rings: self
                .state
                .rings
                .iter()
                .filter(|r| !sent.rings.contains(r))
                .cloned()
                .collect(),
            records: self
                .state
                .records
                .iter()
                .filter(|(p, r)| match sent.records.get(p) {
                    Some(s) => s != *r,
                    None => **r != Record::default(),
                })
                .map(|(p, r)| (*p, r.clone()))
                .collect(),
        };
        let empty = delta.consensus == Consensus::default()
            && delta.rings.is_empty()
            && delta.records.is_empty()
            && delta.genesis == sent.genesis;
        (!empty).then_some(delta)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<IpamEvent> {
        self.events.pop_front()
    }

    /// Our allocations.
    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// The ring of `subnet`, if we have a genesis. A ring nobody changed yet is the genesis
    /// split, with the departures we know (a departed founder's share is its successor's).
    pub fn ring(&self, subnet: Cidr) -> Option<Ring> {
        let genesis = self.state.genesis.as_ref()?;
        if let Some(r) = self.state.rings.iter().find(|r| r.subnet() == subnet) {
            return Some(r.clone());
        }
        let mut ring = Ring::genesis(subnet, genesis);
        ring.adopt_register(self.register());
        Some(ring)
    }

    /// Departures and claim rounds: the register every stored ring holds alike.
    pub fn register(&self) -> &Register {
        static NONE: std::sync::OnceLock<Register> = std::sync::OnceLock::new();
        self.state
            .rings
            .first()
            .map_or_else(|| NONE.get_or_init(Register::default), |r| r.register())
    }

    /// All rings we hold.
    pub fn rings(&self) -> &[Ring] {
        &self.state.rings
    }

    /// Peers we have a route to (from the router after every topology change).
    pub fn set_reachable(&mut self, now: Instant, reachable: BTreeSet<PeerName>) {
        for p in &reachable {
            self.unreachable_since.remove(p);
        }
        for p in self.reachable.difference(&reachable) {
            self.unreachable_since.entry(*p).or_insert(now);
        }
        self.reachable = reachable;
        self.step(now);
    }

    /// Allocates an address for container `id` in `subnet` (default: the universe). Returns
    /// the same address for the same id until it is released and its grace period ends.
    pub fn allocate(
        &mut self,
        now: Instant,
        id: &str,
        subnet: Option<Cidr>,
    ) -> Result<(Ipv4Addr, u8), AllocError> {
        let subnet = subnet.unwrap_or(self.config.universe);
        self.check_overlap(subnet)?;
        if let Some(addr) = self.allocator.reclaim(subnet, id) {
            self.dirty = true;
            return Ok((ip(addr), subnet.prefix()));
        }
        if let Some(reason) = &self.conflict {
            return Err(AllocError::Conflict {
                reason: reason.clone(),
            });
        }
        if self.state.genesis.is_none() {
            self.wanting = true;
            self.step(now);
        }
        let Some(ring) = self.ring(subnet) else {
            return Err(AllocError::Waiting {
                reason: self.bootstrap_wait_reason(),
            });
        };
        let owned = ring.owned(self.me);
        if let Some(addr) = self.allocator.allocate(subnet, id, &owned) {
            self.dirty = true;
            return Ok((ip(addr), subnet.prefix()));
        }
        // Out of space: ask for some, and say from whom it may come.
        let record = self.state.records.entry(self.me).or_default();
        if record.wants.insert(subnet) {
            record.version += 1;
            self.changed = true;
            self.dirty = true;
        }
        let donors: Vec<String> = self
            .state
            .records
            .iter()
            .filter(|(p, r)| **p != self.me && r.free.get(&subnet).copied().unwrap_or(0) > 1)
            .map(|(p, r)| {
                let reach = if self.reachable.contains(p) {
                    "reachable"
                } else {
                    "unreachable"
                };
                format!("{p} ({} free, {reach})", r.free[&subnet])
            })
            .collect();
        let unknown_owners: Vec<String> = ring
            .owners()
            .into_iter()
            .filter(|p| *p != self.me && !self.state.records.contains_key(p))
            .map(|p| p.to_string())
            .collect();
        if donors.is_empty() && unknown_owners.is_empty() && !self.state.records.is_empty() {
            let anyone_free = self
                .state
                .records
                .iter()
                .any(|(p, r)| *p != self.me && r.free.get(&subnet).copied().unwrap_or(1) > 0);
            if !anyone_free && self.state.records.len() > 1 {
                return Err(AllocError::Full { subnet });
            }
        }
        let mut reason =
            format!("asking peers for space in {subnet}: we own no free address there");
        if !donors.is_empty() {
            reason += &format!("; peers with free space: {}", donors.join(", "));
        }
        if !unknown_owners.is_empty() {
            reason += &format!("; owners not heard from yet: {}", unknown_owners.join(", "));
        }
        Err(AllocError::Waiting { reason })
    }

    /// Starts the grace period of every address of `id`; returns how many.
    pub fn release(&mut self, now: Instant, id: &str) -> usize {
        let n = self.allocator.release(id, now + self.config.grace);
        if n > 0 {
            self.dirty = true;
        }
        n
    }

    /// Merges a peer's gossip; returns whether we learned something.
    pub fn merge(&mut self, now: Instant, update: IpamUpdate) -> bool {
        if let (Some(theirs), Some(ours)) = (update.universe, self.state.universe) {
            if theirs != ours {
                self.set_conflict(format!(
                    "a peer uses --ipalloc-range {theirs}, we use {ours}: launch every router with the same range"
                ));
                return false;
            }
        }
        let mut learned = false;
        match (&self.state.genesis, &update.genesis) {
            (None, Some(g)) => {
                self.adopt_genesis(g.clone());
                learned = true;
            }
            (Some(ours), Some(theirs)) if ours != theirs => {
                let reason = format!(
                    "our first ring was split among {} peer(s) ({}) but a peer's among {} ({}): two meshes \
                     bootstrapped separately; run `meshctl reset` on the hosts of one of them",
                    ours.len(),
                    names(ours),
                    theirs.len(),
                    names(theirs)
                );
                self.set_conflict(reason);
                return false;
            }
            _ => {}
        }
        if self.state.genesis.is_none() {
            learned |= self.state.consensus.merge(self.me, &update.consensus);
        }
        for theirs in &update.rings {
            if self.state.genesis.is_none() {
                break;
            }
            let subnet = theirs.subnet();
            if self.check_overlap(subnet).is_err() {
                continue;
            }
            let mut ours = self.ring(subnet).expect("invariant: genesis checked above");
            for (peer, a, b) in ours.register().disputes(theirs.register()) {
                self.events.push_back(IpamEvent::TakenTwice {
                    peer,
                    ours: a,
                    theirs: b,
                });
            }
            match ours.merge(theirs) {
                Ok(changed) => {
                    let known = self.state.rings.iter().any(|r| r.subnet() == subnet);
                    if changed || !known {
                        self.store_ring(ours);
                        learned = true;
                    }
                }
                Err(e) => {
                    self.set_conflict(format!(
                        "{e}; the peers disagree on ownership; run `meshctl reset` on one side"
                    ));
                }
            }
        }
        for (name, theirs) in update.records {
            let ours = self.state.records.entry(name).or_default();
            if theirs.version > ours.version {
                if name == self.me {
                    // Others hold a newer copy of our own record (we lost state): take it and
                    // move past it.
                    *ours = theirs;
                    ours.version += 1;
                    self.changed = true;
                } else {
                    *ours = theirs;
                }
                learned = true;
            }
        }
        if learned {
            self.dirty = true;
            self.changed = true;
            self.step(now);
        }
        learned
    }

    /// Housekeeping: grace expiry, free-space reports, bootstrap retries, reclaims.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.allocator.expire(now) {
            self.dirty = true;
        }
        if self.propose_at.is_some_and(|t| t <= now) {
            self.propose_at = None;
            self.ballot = None;
        }
        if now >= self.next_tick {
            self.next_tick = now + self.config.tick;
            self.report_free();
        }
        self.step(now);
    }

    /// When `handle_timeout` is due next.
    pub fn poll_timeout(&self) -> Instant {
        [
            Some(self.next_tick),
            self.allocator.next_expiry(),
            self.propose_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("invariant: next_tick is always set")
    }

    /// The peer to hand our space to before `meshctl reset`: the reachable peer that owns the
    /// least of the universe (reclaim votes weigh address space, so spreading it keeps any
    /// one peer from holding half), the smallest name among equals.
    pub fn heir(&self) -> Option<PeerName> {
        let universe = self.ring(self.config.universe);
        self.reachable
            .iter()
            .filter(|p| **p != self.me && !self.register().departed(**p))
            .min_by_key(|p| {
                let owned: u64 = universe
                    .as_ref()
                    .map(|u| u.owned(**p).iter().map(|r| r.len()).sum())
                    .unwrap_or(0);
                (owned, **p)
            })
            .copied()
    }

    /// Hands all our space to `to` (before `meshctl reset`): names `to` our successor in the
    /// register, so every ring, also one nobody has divided yet, passes our share to it.
    /// Returns how many ranges of ours moved, counting a founder's share of the subnets nobody
    /// divided yet as one (0: we held nothing, or have no genesis yet, and nothing changed).
    pub fn hand_over(&mut self, to: PeerName) -> usize {
        let Some(universe) = self.ring(self.config.universe) else {
            return 0;
        };
        let founder = self
            .state
            .genesis
            .as_ref()
            .is_some_and(|g| g.contains(&self.me));
        let moved: usize = self
            .state
            .rings
            .iter()
            .chain(
                (!self
                    .state
                    .rings
                    .iter()
                    .any(|r| r.subnet() == universe.subnet()))
                .then_some(&universe),
            )
            .map(|r| r.owned(self.me).len())
            .sum::<usize>()
            + usize::from(founder);
        if moved == 0 {
            return 0;
        }
        let mut universe = universe;
        universe.hand(self.me, to);
        self.left = true;
        self.store_ring(universe);
        self.changed = true;
        self.dirty = true;
        moved
    }

    /// Asks a quorum to reclaim `peer`'s space now (`meshctl rmpeer`), without waiting for
    /// `reclaim_after`. The peer must be unreachable for every voter.
    pub fn remove_peer(&mut self, now: Instant, peer: PeerName) -> Result<(), String> {
        if peer == self.me {
            return Err("cannot remove ourselves; use `meshctl reset` on this host".into());
        }
        if self.reachable.contains(&peer) {
            return Err(format!(
                "{peer} is reachable; stop its router (or run `meshctl reset` there) first"
            ));
        }
        if self.register().departed(peer) {
            return Err(format!(
                "{peer} has left already: its space went to {}",
                self.register().owner(peer)
            ));
        }
        if !self.owns_space(peer) {
            return Err(format!(
                "{peer} owns no address space in this router's view; nothing to reclaim"
            ));
        }
        let round = self.register().round(peer);
        let record = self.state.records.entry(self.me).or_default();
        if record.claims.claim(peer, true, round) {
            record.version += 1;
            self.changed = true;
            self.dirty = true;
        }
        self.step(now);
        Ok(())
    }

    fn check_overlap(&self, subnet: Cidr) -> Result<(), AllocError> {
        let r = subnet.range();
        let others = std::iter::once(self.config.universe)
            .chain(self.state.rings.iter().map(|x| x.subnet()));
        for other in others {
            if other != subnet && !other.range().intersect(&r).is_empty() {
                return Err(AllocError::Overlap { subnet, other });
            }
        }
        Ok(())
    }

    fn set_conflict(&mut self, reason: String) {
        if self.conflict.as_ref() != Some(&reason) {
            self.events.push_back(IpamEvent::Conflict {
                reason: reason.clone(),
            });
            self.conflict = Some(reason);
        }
    }

    fn adopt_genesis(&mut self, members: Vec<PeerName>) {
        self.state.genesis = Some(members.clone());
        self.state.consensus = Consensus::default();
        self.ballot = None;
        self.propose_at = None;
        self.changed = true;
        self.dirty = true;
        self.events.push_back(IpamEvent::Genesis { members });
    }

    /// Stores `ring` and gives every stored ring the same register (the merge of all: a
    /// departure or round learned with one ring holds for all).
    fn store_ring(&mut self, ring: Ring) {
        match self
            .state
            .rings
            .iter_mut()
            .find(|r| r.subnet() == ring.subnet())
        {
            Some(r) => *r = ring,
            None => self.state.rings.push(ring),
        }
        self.state.rings.sort_by_key(|r| r.subnet());
        let mut all = Register::default();
        for r in &self.state.rings {
            all.merge(r.register());
        }
        for r in &mut self.state.rings {
            r.adopt_register(&all);
        }
    }

    /// Runs every rule that reacts to state: bootstrap, space we lost or gained, donations,
    /// reclaims.
    fn step(&mut self, now: Instant) {
        self.bootstrap_step(now);
        if self.state.genesis.is_none() {
            return;
        }
        self.check_owned();
        self.donate_step(now);
        self.claims_step(now);
    }

    fn bootstrap_step(&mut self, now: Instant) {
        let Init::Consensus(n) = self.config.init else {
            return;
        };
        if self.state.genesis.is_some() {
            return;
        }
        let quorum = n / 2 + 1;
        let mut changed = self.state.consensus.accept_step(self.me);
        if self.wanting && self.ballot.is_none() {
            self.ballot = Some(self.state.consensus.propose(self.me));
            let jitter = self.rng.gen_range(1000..3000);
            self.propose_at = Some(now + Duration::from_millis(jitter));
            changed = true;
        }
        if let Some(b) = self.ballot {
            changed |= self.state.consensus.proposer_step(self.me, b, quorum);
        }
        if let Some(members) = self.state.consensus.decided(quorum) {
            self.adopt_genesis(members);
            return;
        }
        if changed {
            self.changed = true;
            self.dirty = true;
        }
    }

    fn bootstrap_wait_reason(&self) -> String {
        match &self.config.init {
            Init::Observer => {
                "observer (--ipalloc-init observer): waiting for a peer that owns space to share its ring; \
                 connect this router to the mesh"
                    .to_string()
            }
            Init::Seed(_) => unreachable!("invariant: seed mode has a genesis from the start"),
            Init::Consensus(n) => {
                let quorum = n / 2 + 1;
                let heard: Vec<PeerName> = self.state.consensus.nodes.keys().copied().collect();
                // Participants count only while they answer: one that vanished before the first
                // ring was agreed can't accept a ballot.
                let (present, away): (Vec<PeerName>, Vec<PeerName>) = heard
                    .iter()
                    .partition(|p| **p == self.me || self.reachable.contains(p));
                let silent: Vec<String> = self
                    .reachable
                    .iter()
                    .filter(|p| !heard.contains(p))
                    .map(|p| p.to_string())
                    .collect();
                // Nothing asked for an address yet: the peers agree on the ring at the first
                // allocation, anywhere in the mesh. Say so rather than look stuck.
                let idle = !self.wanting && self.ballot.is_none() && present.len() >= quorum;
                let mut s = if idle {
                    format!(
                        "no address asked for yet: the initial peers agree on the first ring at the first allocation \
                         (--ipalloc-init consensus={n}); enough of them are present, reachable: {}",
                        names(&present)
                    )
                } else {
                    format!(
                        "waiting for the initial peers to agree on the first ring (--ipalloc-init consensus={n}): \
                         {quorum} of {n} must take part; taking part and reachable: {}",
                        names(&present)
                    )
                };
                if !away.is_empty() {
                    s += &format!("; taking part but unreachable now: {}", names(&away));
                }
                if present.len() < quorum {
                    s += &format!(
                        "; missing {} more peer(s): launch or reconnect them (`meshctl connect`); if \
                         initial peers are gone for good, run `meshctl reset` on the remaining \
                         ones and launch them again with a lower consensus=N (the same N on each)",
                        quorum - present.len()
                    );
                }
                if !silent.is_empty() {
                    s += &format!(
                        "; reachable but not taking part (observers, or other settings): {}",
                        silent.join(", ")
                    );
                }
                s
            }
        }
    }

    /// Drops allocations in space we no longer own; clears requests once we have space.
    fn check_owned(&mut self) {
        if self.register().departed(self.me) && !self.left {
            let to = self.register().owner(self.me);
            let reason = format!(
                "this router's address space was taken over by {to} while this router was \
                 unreachable (for longer than --ipalloc-reclaim-after, or `meshctl rmpeer` ran \
                 elsewhere); the addresses it gave out may go to other containers now: run \
                 `meshctl reset` on this host, then launch again"
            );
            self.set_conflict(reason);
        }
        let subnets: BTreeSet<Cidr> = self.allocator.all().map(|(s, _, _)| s).collect();
        let mut lost = Vec::new();
        for subnet in subnets {
            let owned = self
                .ring(subnet)
                .map(|r| r.owned(self.me))
                .unwrap_or_default();
            lost.extend(
                self.allocator
                    .retain_owned(subnet, &owned)
                    .into_iter()
                    .map(|(id, a)| (id, ip(a))),
            );
        }
        if !lost.is_empty() {
            self.dirty = true;
            self.events.push_back(IpamEvent::Lost { allocations: lost });
        }
        let wants: Vec<Cidr> = self.state.records[&self.me].wants.iter().copied().collect();
        for subnet in wants {
            let owned = self
                .ring(subnet)
                .map(|r| r.owned(self.me))
                .unwrap_or_default();
            let free = self.allocator.free(subnet, &owned);
            if free > 0 {
                let record = self.state.records.get_mut(&self.me).expect("own record");
                record.wants.remove(&subnet);
                record.free.insert(subnet, free);
                record.version += 1;
                self.changed = true;
                self.dirty = true;
                let owned = owned.iter().map(|r| r.len()).sum();
                self.events.push_back(IpamEvent::Received { subnet, owned });
            }
        }
    }

    fn own_free(&self, subnet: Cidr) -> (u64, Vec<Range>) {
        let entries: Vec<Range> = self
            .ring(subnet)
            .map(|r| {
                r.entries()
                    .filter(|(_, owner)| *owner == self.me)
                    .map(|(r, _)| r)
                    .collect()
            })
            .unwrap_or_default();
        (self.allocator.free(subnet, &entries), entries)
    }

    /// Gives half of our largest free run (a single free address whole) to a reachable peer that
    /// asks, if we are the peer with the most free space in our view, or nobody else answered
    /// for a while.
    fn donate_step(&mut self, now: Instant) {
        let requests: Vec<(PeerName, u64, Cidr)> = self
            .state
            .records
            .iter()
            .filter(|(p, _)| **p != self.me && self.reachable.contains(p))
            .flat_map(|(p, r)| r.wants.iter().map(move |s| (*p, r.version, *s)))
            .collect();
        for (peer, version, subnet) in requests {
            if self.donated.contains(&(peer, version, subnet)) {
                continue;
            }
            // Our last free address goes too, unless we wait for space there ourselves: when
            // every owner has one left, keeping them would starve the asker for good.
            let (free, entries) = self.own_free(subnet);
            let we_want = self.state.records[&self.me].wants.contains(&subnet);
            if free == 0 || (free == 1 && we_want) {
                continue;
            }
            let first_seen = *self.requests_seen.entry((peer, version)).or_insert(now);
            let best_other = self
                .state
                .records
                .iter()
                .filter(|(p, _)| **p != self.me && **p != peer && self.reachable.contains(p))
                .map(|(p, r)| {
                    (
                        r.free.get(&subnet).copied().unwrap_or(0),
                        std::cmp::Reverse(*p),
                    )
                })
                .max();
            let mine = (free, std::cmp::Reverse(self.me));
            let patience = self.config.tick * 3;
            if best_other.is_some_and(|b| b > mine) && now < first_seen + patience {
                continue;
            }
            let Some(run) = self.allocator.largest_free_run(subnet, &entries) else {
                continue;
            };
            let range = Range {
                start: run.start + run.len() / 2,
                end: run.end,
            };
            let mut ring = self.ring(subnet).expect("invariant: genesis exists");
            if ring.donate(self.me, range, peer).is_err() {
                continue;
            }
            self.store_ring(ring);
            self.donated.insert((peer, version, subnet));
            self.changed = true;
            self.dirty = true;
            self.events.push_back(IpamEvent::Donated {
                subnet,
                range,
                to: peer,
            });
        }
        self.requests_seen.retain(|k, _| {
            self.state
                .records
                .get(&k.0)
                .is_some_and(|r| r.version == k.1)
        });
    }

    /// Publishes our free space per subnet when it changed.
    fn report_free(&mut self) {
        let mut subnets: BTreeSet<Cidr> = self.state.rings.iter().map(|r| r.subnet()).collect();
        if self.state.genesis.is_some() {
            subnets.insert(self.config.universe);
        }
        let free: BTreeMap<Cidr, u64> = subnets
            .into_iter()
            .map(|s| (s, self.own_free(s).0))
            .collect();
        let record = self.state.records.entry(self.me).or_default();
        if record.free != free {
            record.free = free;
            record.version += 1;
            self.changed = true;
            self.dirty = true;
        }
    }

    /// Status for `meshctl ipam` and `meshctl status`.
    pub fn status(&self) -> IpamStatus {
        let waiting = match (&self.state.genesis, self.wanting) {
            (None, _) => Some(self.bootstrap_wait_reason()),
            _ => {
                let wants = &self.state.records[&self.me].wants;
                (!wants.is_empty()).then(|| {
                    format!(
                        "asking peers for space in {}",
                        wants
                            .iter()
                            .map(|w| w.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
            }
        };
        let mut subnets = Vec::new();
        if self.state.genesis.is_some() {
            let mut all: BTreeSet<Cidr> = self.state.rings.iter().map(|r| r.subnet()).collect();
            all.insert(self.config.universe);
            for subnet in all {
                let ring = self.ring(subnet).expect("invariant: genesis exists");
                let mut owned: BTreeMap<PeerName, u64> = BTreeMap::new();
                for (r, owner) in ring.entries() {
                    *owned.entry(owner).or_default() += r.intersect(&subnet.hosts()).len();
                }
                let owners = owned
                    .into_iter()
                    .map(|(peer, owned)| OwnerStatus {
                        peer,
                        owned,
                        free: if peer == self.me {
                            self.own_free(subnet).0
                        } else {
                            self.state
                                .records
                                .get(&peer)
                                .and_then(|r| r.free.get(&subnet).copied())
                                .unwrap_or(0)
                        },
                        reachable: peer == self.me || self.reachable.contains(&peer),
                    })
                    .collect();
                subnets.push(SubnetStatus { subnet, owners });
            }
        }
        let state = if self.conflict.is_some() {
            "conflict"
        } else if self.state.genesis.is_none() {
            "waiting"
        } else {
            "ready"
        };
        IpamStatus {
            state,
            waiting,
            conflict: self.conflict.clone(),
            universe: self.config.universe,
            genesis: self.state.genesis.clone(),
            subnets,
            allocations: self
                .allocator
                .all()
                .map(|(s, id, a)| (s, id.to_owned(), ip(a.addr), a.releasing))
                .collect(),
            claims: self.claims_status(),
            reachable_share: self.ring(self.config.universe).map(|u| {
                let reach: u64 = u
                    .entries()
                    .filter(|(_, o)| *o == self.me || self.reachable.contains(o))
                    .map(|(r, _)| r.len())
                    .sum();
                (reach, u.subnet().range().len())
            }),
        }
    }
}

fn names(peers: &[PeerName]) -> String {
    if peers.is_empty() {
        return "none".into();
    }
    peers
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

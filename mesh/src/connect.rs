//! Whom to dial and when: the connection maker policy (Weave's `ConnectionMaker`).
//!
//! A target is an address we want a control connection to. User targets (from `meshctl launch
//! PEER` or `meshctl connect`) are retried forever; discovered targets (addresses that our peers
//! announce for peers we are not connected to, only with `RouterConfig::discovery`) are dropped
//! after `discovered_attempts_max` consecutive failures or when no peer announces them any more.
//! Retries back off exponentially from `reconnect_delay_min` to `reconnect_delay_max`, with
//! ±20% jitter from the seeded RNG so restarted meshes don't dial in lockstep.
//!
//! The connection limit: discovered targets are dialed only while established connections plus
//! dials in flight stay below `conn_limit`; user targets may go up to twice the limit (the
//! user asked for them, and they are what joins a new peer to the mesh). A discovered address
//! that was dropped after failing is not taken back until nobody announces it any more.
//!
//! Not here: which addresses are "covered" (we already have a connection with them) and the
//! connection limit's current count; the router passes both in. This module does no IO: it
//! hands back addresses, which the router turns into `Event::Dial`.
//!
//! Invariants: a covered address is never dialed; an address is never dialed while a dial to
//! it is in flight; an address that turned out to be ourselves is never dialed again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Where a target came from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum TargetKind {
    /// Given by the user; retried forever.
    User,
    /// Announced by a peer; dropped after repeated failures.
    Discovered,
}

/// What we are doing about a target right now.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum TargetState {
    /// We have a connection with this address (or with the peer known to live there).
    Connected,
    /// A dial is in flight.
    Connecting,
    /// The next dial is due at `next_attempt`.
    Waiting {
        /// When we dial again.
        next_attempt: Instant,
    },
}

/// A target as shown by `meshctl status`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TargetStatus {
    /// The address we dial.
    pub addr: SocketAddr,
    /// Where the target came from.
    pub kind: TargetKind,
    /// What we are doing about it.
    pub state: TargetState,
    /// Consecutive failed attempts since the last success.
    pub attempts: u32,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
}

/// Dial policy knobs, taken from `RouterConfig`.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Add discovered targets at all.
    pub discovery: bool,
    /// Never hold more connections (established plus dials in flight) than this.
    pub conn_limit: usize,
    /// First retry delay.
    pub reconnect_delay_min: Duration,
    /// Longest retry delay.
    pub reconnect_delay_max: Duration,
    /// Consecutive failures after which a discovered target is dropped.
    pub discovered_attempts_max: u32,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Connecting,
    Waiting { next_attempt: Instant },
}

#[derive(Clone, Debug)]
struct Target {
    kind: TargetKind,
    phase: Phase,
    attempts: u32,
    last_error: Option<String>,
    /// When the current connection to it was established.
    connected_at: Option<Instant>,
}

/// A connection that ends sooner than this after it was established counts as a failed
/// attempt for backoff (a peer that accepts and then refuses, e.g. at its connection limit,
/// must not be redialed every second).
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// The connection maker: targets, their backoff, and the dial decisions.
#[derive(Debug)]
pub struct ConnectionMaker {
    policy: Policy,
    targets: BTreeMap<SocketAddr, Target>,
    /// Addresses where we reached ourselves.
    own_addrs: BTreeSet<SocketAddr>,
    /// Discovered addresses dropped after failing too often, while still announced.
    given_up: BTreeSet<SocketAddr>,
    rng: SmallRng,
}

impl ConnectionMaker {
    /// A maker with no targets; jitter comes from an RNG seeded with `seed`.
    pub fn new(policy: Policy, seed: u64) -> ConnectionMaker {
        ConnectionMaker {
            policy,
            targets: BTreeMap::new(),
            own_addrs: BTreeSet::new(),
            given_up: BTreeSet::new(),
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// Adds user targets, due now. A discovered target at the same address becomes a user one.
    pub fn add_user(&mut self, now: Instant, addrs: &[SocketAddr]) {
        for &addr in addrs {
            self.own_addrs.remove(&addr);
            let target = self.targets.entry(addr).or_insert(Target {
                kind: TargetKind::User,
                phase: Phase::Waiting { next_attempt: now },
                attempts: 0,
                last_error: None,
                connected_at: None,
            });
            target.kind = TargetKind::User;
            if let Phase::Waiting { next_attempt } = &mut target.phase {
                *next_attempt = now.min(*next_attempt);
            }
        }
    }

    /// Stops targeting `addrs` (a dial in flight still completes).
    pub fn forget(&mut self, addrs: &[SocketAddr]) {
        for addr in addrs {
            self.targets.remove(addr);
        }
    }

    /// Replaces the set of discovered addresses: adds new ones (due now) and drops discovered
    /// targets nobody announces any more, unless a dial to them is in flight.
    pub fn set_discovered(&mut self, now: Instant, candidates: &BTreeSet<SocketAddr>) {
        if !self.policy.discovery {
            return;
        }
        self.targets.retain(|addr, t| {
            t.kind == TargetKind::User
                || candidates.contains(addr)
                || matches!(t.phase, Phase::Connecting)
        });
        self.given_up.retain(|addr| candidates.contains(addr));
        for &addr in candidates {
            if self.own_addrs.contains(&addr) || self.given_up.contains(&addr) {
                continue;
            }
            self.targets.entry(addr).or_insert(Target {
                kind: TargetKind::Discovered,
                phase: Phase::Waiting { next_attempt: now },
                attempts: 0,
                last_error: None,
                connected_at: None,
            });
        }
    }

    /// A dial to `addr` failed: back off, or drop a discovered target that failed too often.
    pub fn dial_failed(&mut self, now: Instant, addr: SocketAddr, reason: String) {
        let Some(target) = self.targets.get_mut(&addr) else {
            return;
        };
        target.attempts = target.attempts.saturating_add(1);
        target.last_error = Some(reason);
        if target.kind == TargetKind::Discovered
            && target.attempts >= self.policy.discovered_attempts_max
        {
            self.targets.remove(&addr);
            self.given_up.insert(addr);
            return;
        }
        let attempts = target.attempts;
        let delay = self.backoff(attempts);
        if let Some(target) = self.targets.get_mut(&addr) {
            target.phase = Phase::Waiting {
                next_attempt: now + delay,
            };
        }
    }

    /// A connection we dialed to `addr` was established: reset its backoff.
    pub fn connected(&mut self, now: Instant, addr: SocketAddr) {
        if let Some(target) = self.targets.get_mut(&addr) {
            target.last_error = None;
            target.connected_at = Some(now);
            target.phase = Phase::Waiting { next_attempt: now };
        }
    }

    /// A connection with `addr` ended: dial again after the first backoff step, or after the
    /// next one if the connection did not last (see `STABLE_AFTER`).
    pub fn disconnected(&mut self, now: Instant, addr: SocketAddr, reason: String) {
        let Some(target) = self.targets.get_mut(&addr) else {
            return;
        };
        let lasted = target
            .connected_at
            .take()
            .is_some_and(|at| now.saturating_duration_since(at) >= STABLE_AFTER);
        target.attempts = if lasted {
            0
        } else {
            target.attempts.saturating_add(1)
        };
        let attempts = target.attempts;
        if target.kind == TargetKind::Discovered && attempts >= self.policy.discovered_attempts_max
        {
            // It keeps closing on us (e.g. at its limit): leave it to others.
            self.targets.remove(&addr);
            self.given_up.insert(addr);
            return;
        }
        let delay = self.backoff(attempts);
        if let Some(target) = self.targets.get_mut(&addr) {
            target.last_error = Some(reason);
            if let Phase::Waiting { next_attempt } = &mut target.phase {
                *next_attempt = (*next_attempt).max(now + delay);
            }
        }
    }

    /// `addr` turned out to be ourselves: never dial it again.
    pub fn reached_ourselves(&mut self, addr: SocketAddr) {
        self.targets.remove(&addr);
        self.own_addrs.insert(addr);
    }

    /// Addresses to dial now. `covered` are addresses we already have a connection with;
    /// `connections` is the number of established connections.
    pub fn poll_dials(
        &mut self,
        now: Instant,
        covered: &BTreeSet<SocketAddr>,
        connections: usize,
    ) -> Vec<SocketAddr> {
        let mut in_use = connections
            + self
                .targets
                .values()
                .filter(|t| matches!(t.phase, Phase::Connecting))
                .count();
        let retry_at = now + self.policy.reconnect_delay_min;
        let mut dials = Vec::new();
        for (addr, target) in &mut self.targets {
            let Phase::Waiting { next_attempt } = target.phase else {
                continue;
            };
            if next_attempt > now || covered.contains(addr) {
                continue;
            }
            let limit = match target.kind {
                TargetKind::User => usize::MAX,
                TargetKind::Discovered => self.policy.conn_limit,
            };
            if in_use >= limit {
                // Look again later rather than spinning on a due timer.
                target.phase = Phase::Waiting {
                    next_attempt: retry_at,
                };
                target.last_error = Some("connection limit reached".to_owned());
                continue;
            }
            target.phase = Phase::Connecting;
            in_use += 1;
            dials.push(*addr);
        }
        dials
    }

    /// Dials in flight.
    pub fn connecting(&self) -> usize {
        self.targets
            .values()
            .filter(|t| matches!(t.phase, Phase::Connecting))
            .count()
    }

    /// Addresses of the current discovered targets.
    pub fn discovered(&self) -> BTreeSet<SocketAddr> {
        self.targets
            .iter()
            .filter(|(_, t)| t.kind == TargetKind::Discovered)
            .map(|(&addr, _)| addr)
            .collect()
    }

    /// Addresses of all targets (user and discovered).
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.targets.keys().copied()
    }

    /// Addresses of the user targets, to persist across restarts.
    pub fn user_targets(&self) -> Vec<SocketAddr> {
        self.targets
            .iter()
            .filter(|(_, t)| t.kind == TargetKind::User)
            .map(|(&addr, _)| addr)
            .collect()
    }

    /// When the next uncovered target is due, if any.
    pub fn next_timeout(&self, covered: &BTreeSet<SocketAddr>) -> Option<Instant> {
        self.targets
            .iter()
            .filter(|(addr, _)| !covered.contains(addr))
            .filter_map(|(_, t)| match t.phase {
                Phase::Waiting { next_attempt } => Some(next_attempt),
                Phase::Connecting => None,
            })
            .min()
    }

    /// All targets for status, sorted by address.
    pub fn status(&self, covered: &BTreeSet<SocketAddr>) -> Vec<TargetStatus> {
        self.targets
            .iter()
            .map(|(&addr, t)| TargetStatus {
                addr,
                kind: t.kind,
                state: match t.phase {
                    _ if covered.contains(&addr) => TargetState::Connected,
                    Phase::Connecting => TargetState::Connecting,
                    Phase::Waiting { next_attempt } => TargetState::Waiting { next_attempt },
                },
                attempts: t.attempts,
                last_error: t.last_error.clone(),
            })
            .collect()
    }

    /// Retry delay after `attempts` consecutive failures, jittered by ±20%, at most the maximum.
    fn backoff(&mut self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(20);
        let base = self
            .policy
            .reconnect_delay_min
            .saturating_mul(1 << doublings)
            .min(self.policy.reconnect_delay_max);
        let jittered = base.mul_f64(self.rng.gen_range(0.8..1.2));
        jittered.min(self.policy.reconnect_delay_max)
    }
}

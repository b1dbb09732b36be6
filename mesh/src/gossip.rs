//! Gossip mechanics shared by every replicated payload: the [`Channel`] trait, the random
//! fan-out for periodic full state, and the periodic timer.
//!
//! A payload (today the topology; later IPAM) implements [`Channel`]: it can hand out its full
//! state and merge an update, returning only what was new. The router sends that delta on to
//! its other neighbours, so the cost of one change is the delta, not the whole state; the
//! periodic full state to a few random neighbours repairs anything a delta missed.
//!
//! Not here: encoding (`wire.rs`), and which connection sends what (`router.rs`).
//! Invariants: `merge` is commutative, associative and idempotent; it returns `None` exactly
//! when nothing changed. Weave equivalent: `mesh/gossip.go` (`Gossiper`, `GossipData`).

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;

use crate::peer::PeerName;
use crate::topology::{Topology, TopologyUpdate};

/// How many random neighbours get our full state on each periodic gossip.
pub const FANOUT: usize = 2;

/// A replicated payload that merges like a CRDT.
pub trait Channel {
    /// What travels on the wire: a delta or a full state.
    type Update;
    /// Everything we hold, for a new neighbour or periodic gossip.
    fn full_state(&self) -> Self::Update;
    /// Merges `update` received from `from`; returns the part that was new to us, if any.
    fn merge(&mut self, now: Instant, from: PeerName, update: Self::Update)
        -> Option<Self::Update>;
}

impl Channel for Topology {
    type Update = TopologyUpdate;

    fn full_state(&self) -> TopologyUpdate {
        Topology::full_state(self)
    }

    fn merge(
        &mut self,
        _now: Instant,
        _from: PeerName,
        update: TopologyUpdate,
    ) -> Option<TopologyUpdate> {
        self.apply(update)
    }
}

/// Picks up to `count` distinct items at random (seeded), in random order.
pub fn fan_out<T: Copy>(rng: &mut SmallRng, items: &[T], count: usize) -> Vec<T> {
    items.choose_multiple(rng, count).copied().collect()
}

/// A timer that fires every `interval`.
#[derive(Clone, Copy, Debug)]
pub struct Periodic {
    interval: Duration,
    next: Instant,
}

impl Periodic {
    /// First fires at `now + interval`.
    pub fn new(now: Instant, interval: Duration) -> Periodic {
        Periodic {
            interval,
            next: now + interval,
        }
    }

    /// When it fires next.
    pub fn deadline(&self) -> Instant {
        self.next
    }

    /// True (and re-armed from `now`) if it is due at `now`.
    pub fn fire(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + self.interval;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn fan_out_is_seeded_distinct_and_bounded() {
        let items = [1, 2, 3, 4, 5];
        let a = fan_out(&mut SmallRng::seed_from_u64(9), &items, FANOUT);
        let b = fan_out(&mut SmallRng::seed_from_u64(9), &items, FANOUT);
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        assert_ne!(a[0], a[1]);
        assert_eq!(
            fan_out(&mut SmallRng::seed_from_u64(9), &items[..1], FANOUT),
            [1]
        );
    }
}

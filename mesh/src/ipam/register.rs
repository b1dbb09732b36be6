//! The register every ring carries: who holds the space of each departed peer, and which claim
//! round on each peer is current.
//!
//! A peer departs in one of two ways, kept apart because they are written by different peers:
//! `handed` by the peer itself (`meshctl reset` names an heir) and `taken` by the claimer that
//! won a reclaim of it (`claims.rs`). [`Register::owner`] follows these links to the peer that
//! holds a departed peer's space. A reclaim outranks a hand-over: a peer that reset on one side
//! of a split while the other side reclaimed it ends with the reclaimer.
//!
//! A won reclaim is pending until routers owning more than half of the universe have seen it;
//! then its winner settles it, and only then does the space move. Without this step a winner cut
//! off at the moment it won would count the space as its own (to vote with) while the routers
//! that never heard of the win still count it as the vanished peer's: the same addresses on two
//! sides. Once settled, any later majority includes addresses whose owner knew of it. A pending
//! reclaim whose peer speaks up first (starts a new round, below) is void. Known limit: voiding
//! is decided by the peer alone, settling by a majority, and nothing orders the two; a winner
//! that counts acknowledgements sent just before their senders heard the peer answer can settle
//! a reclaim the others hold void. That needs a live peer (one that vanished never answers) on
//! the far side of a split longer than `reclaim_after`; README lists it under what long splits
//! cost.
//!
//! Merges are deterministic for every input, so copies always converge and no disagreement
//! stops the mesh:
//! - two reclaims of one peer keep a settled one over a pending one, then the later round, then
//!   the smaller winner.
//!   Two happen without a bug when a winner is cut off before its win settles and is then
//!   reclaimed itself: its taker wins the same peer through the inherited claim, and settles.
//! - two heirs for one peer (a bug) keep the smaller name.
//! - hand-overs that form a cycle (two peers that reset at once, each naming the other) leave the
//!   cycle's space with its largest member, which is gone: it looks vanished, and its space is
//!   reclaimed by vote, which breaks the cycle.
//!
//! A round grows when its peer, alive, sees a claim on itself of the current round: every claim,
//! vote and yield on it of an earlier round is void from then on, so votes cast while it was
//! away (a split, a restart) can't take it over later. Votes live in the universe ring's
//! entries, next to this register, so a copy that drops a void vote also knows why.
//!
//! Not here: the entries and their votes (`ring.rs`), counting votes (`claims.rs`).
//! Invariants: `handed` and `taken` only grow; a round only grows; `merge` is commutative,
//! associative and idempotent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::peer::PeerName;

/// A won reclaim.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Take {
    /// The claimer that won.
    pub by: PeerName,
    /// The claim round it won in.
    pub round: u64,
    /// Routers owning more than half of the universe saw it, and the space moved.
    pub settled: bool,
}

impl Take {
    /// The merge order: settled over pending, then the later round (an earlier pending one is
    /// void once a later round exists, so it must not hide a later win), then the smaller
    /// winner.
    fn rank(&self) -> (bool, u64, std::cmp::Reverse<PeerName>) {
        (self.settled, self.round, std::cmp::Reverse(self.by))
    }
}

/// Departures and claim rounds. See the module documentation.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Register {
    /// Peers that left with `meshctl reset`, and the heir each named.
    handed: BTreeMap<PeerName, PeerName>,
    /// Peers reclaimed by a vote, and the reclaim.
    taken: BTreeMap<PeerName, Take>,
    /// The current claim round per peer (absent: 0).
    rounds: BTreeMap<PeerName, u64>,
}

impl Register {
    /// Who holds `peer`'s space: `peer` itself, or the end of its chain of departures.
    pub fn owner(&self, peer: PeerName) -> PeerName {
        let mut path: Vec<PeerName> = Vec::new();
        let mut p = peer;
        loop {
            let settled = self.taken.get(&p).filter(|t| t.settled).map(|t| t.by);
            let Some(next) = settled.or_else(|| self.handed.get(&p).copied()) else {
                return p;
            };
            path.push(p);
            if let Some(i) = path.iter().position(|q| *q == next) {
                return *path[i..]
                    .iter()
                    .max()
                    .expect("invariant: a cycle has a member");
            }
            p = next;
        }
    }

    /// Whether `peer` departed: its space is someone else's.
    pub fn departed(&self, peer: PeerName) -> bool {
        self.owner(peer) != peer
    }

    /// Peers that left with `meshctl reset`, with their heirs.
    pub fn handed(&self) -> &BTreeMap<PeerName, PeerName> {
        &self.handed
    }

    /// Reclaims won, settled or pending (also void ones).
    pub fn taken(&self) -> &BTreeMap<PeerName, Take> {
        &self.taken
    }

    /// The reclaim of `peer` that is won but not settled, unless `peer` spoke up since.
    pub fn pending(&self, peer: PeerName) -> Option<Take> {
        self.taken
            .get(&peer)
            .filter(|t| !t.settled && t.round >= self.round(peer))
            .copied()
    }

    /// Every pending reclaim (see [`Register::pending`]), by reclaimed peer.
    pub fn pending_all(&self) -> impl Iterator<Item = (PeerName, Take)> + '_ {
        self.taken
            .keys()
            .filter_map(|x| self.pending(*x).map(|t| (*x, t)))
    }

    /// Whether `peer` was reclaimed for good: its votes are settled.
    pub fn settled(&self, peer: PeerName) -> bool {
        self.taken.get(&peer).is_some_and(|t| t.settled)
    }

    /// Every peer that has a departure recorded (departed or not, see cycles).
    pub fn recorded(&self) -> impl Iterator<Item = PeerName> + '_ {
        self.handed.keys().chain(self.taken.keys()).copied()
    }

    /// The current claim round on `peer`.
    pub fn round(&self, peer: PeerName) -> u64 {
        self.rounds.get(&peer).copied().unwrap_or(0)
    }

    /// Records that `from` left and named `to` its heir. Returns whether it is new.
    pub fn hand(&mut self, from: PeerName, to: PeerName) -> bool {
        insert_smaller(&mut self.handed, from, to)
    }

    /// Records that `by` won the reclaim of `from` in `round` (pending). Returns whether it is
    /// new.
    pub fn take(&mut self, from: PeerName, by: PeerName, round: u64) -> bool {
        let t = Take {
            by,
            round,
            settled: false,
        };
        merge_take(&mut self.taken, from, t)
    }

    /// Settles `by`'s pending reclaim of `from` (only `by` calls this). Returns whether it is new.
    pub fn settle(&mut self, from: PeerName, by: PeerName) -> bool {
        match self.pending(from) {
            Some(t) if t.by == by => merge_take(&mut self.taken, from, Take { settled: true, ..t }),
            _ => false,
        }
    }

    /// Starts a new claim round on `peer` (only `peer` calls this); returns it.
    pub fn bump_round(&mut self, peer: PeerName) -> u64 {
        let r = self.rounds.entry(peer).or_insert(0);
        *r += 1;
        *r
    }

    /// Merges another copy; returns whether ours changed.
    pub fn merge(&mut self, other: &Register) -> bool {
        let mut changed = false;
        for (&from, &to) in &other.handed {
            changed |= insert_smaller(&mut self.handed, from, to);
        }
        for (&from, &t) in &other.taken {
            changed |= merge_take(&mut self.taken, from, t);
        }
        for (&p, &r) in &other.rounds {
            let ours = self.rounds.entry(p).or_insert(0);
            if r > *ours {
                *ours = r;
                changed = true;
            }
        }
        changed
    }

    /// Departed peers whose space `other` gives to another peer than we do (each such case means
    /// two claimers won the same peer: a broken invariant, worth a log line).
    pub fn disputes(&self, other: &Register) -> Vec<(PeerName, PeerName, PeerName)> {
        let mut merged = self.clone();
        merged.merge(other);
        let mut out = Vec::new();
        let takers = |r: &Register| -> BTreeMap<PeerName, PeerName> {
            let mut m: BTreeMap<PeerName, PeerName> = r.handed.clone();
            for (from, t) in &r.taken {
                if t.settled {
                    m.insert(*from, t.by);
                }
            }
            m
        };
        let (ours, theirs_all) = (takers(self), takers(other));
        for (from, to) in &ours {
            if let Some(theirs) = theirs_all.get(from) {
                let (a, b) = (merged.owner(*to), merged.owner(*theirs));
                if a != b && !out.iter().any(|(f, _, _)| f == from) {
                    out.push((*from, a, b));
                }
            }
        }
        out
    }
}

/// Inserts the reclaim `t` of `from`, keeping the higher ranked one. Returns whether the map
/// changed.
fn merge_take(map: &mut BTreeMap<PeerName, Take>, from: PeerName, t: Take) -> bool {
    match map.get(&from) {
        Some(ours) if ours.rank() >= t.rank() => false,
        _ => {
            map.insert(from, t);
            true
        }
    }
}

/// Inserts `from -> to`, keeping the smaller value if `from` is there already. Returns whether
/// the map changed.
fn insert_smaller(map: &mut BTreeMap<PeerName, PeerName>, from: PeerName, to: PeerName) -> bool {
    match map.get(&from) {
        Some(&ours) if ours <= to => false,
        _ => {
            map.insert(from, to);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(n: u64) -> PeerName {
        PeerName(n)
    }

    #[test]
    fn a_reclaim_outranks_a_hand_over_and_chains_are_followed() {
        let mut r = Register::default();
        r.hand(p(1), p(2));
        assert_eq!(r.owner(p(1)), p(2));
        r.take(p(2), p(3), 0);
        assert_eq!(r.owner(p(1)), p(2), "a pending reclaim moves nothing");
        assert!(r.settle(p(2), p(3)));
        assert_eq!(r.owner(p(1)), p(3), "1's heir was reclaimed by 3");
        r.take(p(1), p(4), 0);
        r.settle(p(1), p(4));
        assert_eq!(r.owner(p(1)), p(4), "1 was reclaimed while it reset");
        assert!(r.departed(p(1)) && !r.departed(p(4)));
    }

    #[test]
    fn two_peers_that_name_each_other_leave_their_space_to_the_larger_until_it_is_taken() {
        let mut r = Register::default();
        r.hand(p(1), p(2));
        r.hand(p(2), p(1));
        assert_eq!((r.owner(p(1)), r.owner(p(2))), (p(2), p(2)));
        assert!(
            !r.departed(p(2)),
            "the cycle's largest member holds the space"
        );
        r.take(p(2), p(7), 0);
        r.settle(p(2), p(7));
        assert_eq!((r.owner(p(1)), r.owner(p(2))), (p(7), p(7)));
    }

    #[test]
    fn a_second_winner_through_an_inherited_claim_is_no_dispute() {
        // 1 won 5 but was cut off before it settled; 2 reclaimed 1 and won 5 through 1's claim.
        let mut cut_off = Register::default();
        cut_off.take(p(5), p(1), 0);
        let mut rest = Register::default();
        for (from, by) in [(p(1), p(2)), (p(5), p(2))] {
            rest.take(from, by, 0);
            rest.settle(from, by);
        }
        assert!(cut_off.disputes(&rest).is_empty());
        let mut m = cut_off.clone();
        m.merge(&rest);
        assert_eq!(m.owner(p(5)), p(2));
        let mut settled_elsewhere = Register::default();
        settled_elsewhere.take(p(5), p(1), 0);
        settled_elsewhere.settle(p(5), p(1));
        let mut other = Register::default();
        other.take(p(5), p(3), 0);
        other.settle(p(5), p(3));
        assert_eq!(settled_elsewhere.disputes(&other), vec![(p(5), p(1), p(3))]);
    }

    #[test]
    fn a_pending_reclaim_is_void_once_its_peer_speaks_up_and_a_settled_one_is_not() {
        let mut r = Register::default();
        r.take(p(5), p(1), 0);
        assert!(r.pending(p(5)).is_some());
        r.bump_round(p(5));
        assert_eq!(r.pending(p(5)), None, "5 answered: the win is void");
        assert!(!r.settle(p(5), p(1)));
        assert_eq!(r.owner(p(5)), p(5));
        let mut s = Register::default();
        s.take(p(5), p(1), 0);
        s.settle(p(5), p(1));
        s.bump_round(p(5));
        assert_eq!(s.owner(p(5)), p(1));
    }

    fn arb_register() -> impl Strategy<Value = Register> {
        let link = (1u64..8, 1u64..8);
        (
            proptest::collection::vec(link.clone(), 0..5),
            proptest::collection::vec(link, 0..5),
            proptest::collection::vec((1u64..8, 0u64..4), 0..5),
        )
            .prop_map(|(h, t, rounds)| {
                let mut r = Register::default();
                for (a, b) in h {
                    r.hand(p(a), p(b));
                }
                for (i, (a, b)) in t.into_iter().enumerate() {
                    r.take(p(a), p(b), i as u64 % 2);
                    if i % 3 == 0 {
                        r.settle(p(a), p(b));
                    }
                }
                for (a, n) in rounds {
                    for _ in 0..n {
                        r.bump_round(p(a));
                    }
                }
                r
            })
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_idempotent(
            a in arb_register(), b in arb_register(), c in arb_register()
        ) {
            let merged = |x: &Register, y: &Register| { let mut m = x.clone(); m.merge(y); m };
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
            prop_assert_eq!(merged(&a, &a), a.clone());
            // Every chain ends, also through cycles.
            for n in 1..8 {
                let o = merged(&a, &b).owner(p(n));
                prop_assert!((1..8).contains(&o.0));
            }
        }
    }
}

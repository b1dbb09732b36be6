//! The ring: which peer owns which part of one subnet, as a CRDT that only owners change.
//!
//! A ring is a sorted set of tokens. The entry at token `t` says who owns the addresses from `t`
//! up to the next token (or the end of the subnet). Every peer holds a copy and merges the copies
//! of others: per token, the higher version wins. A token is never removed.
//!
//! Only the owner of an entry writes it, and always with a higher version: to give part of its
//! range away ([`Ring::donate`]) or to record a reclaim vote ([`Ring::stamp`]). Because the owner
//! of a range is the only one who may split it, and because rings travel whole, a view that holds
//! an entry also holds every token its writer knew, so two peers never both believe they own the
//! same address.
//!
//! A peer that leaves (`meshctl reset`) or is reclaimed (`claims.rs`) is not written out of the
//! entries. Instead the ring's [`Register`] records the departure, and every entry of a departed
//! peer belongs to whoever holds its space ([`Register::owner`]). So the departed peer's last
//! writes still merge by version as usual, even if a copy sees them after the departure, and
//! its share of a subnet that nobody has divided yet passes on too. Every ring of a peer holds
//! the same register (the IPAM state copies it across, see `Ipam::store_ring`).
//!
//! Reclaim votes live in the entries of the universe ring: how an entry's addresses voted on each
//! vanished peer, in the current claim round on it. A vote is set once, by the owner, and kept by
//! every later version of the entry and by both parts of a split, so an address votes at most
//! once per round on each peer, whoever owns it later. A vote is dropped once its round is over
//! or its peer was reclaimed; the register that says so travels in the same ring, so no copy that
//! dropped a vote can cast it again.
//!
//! Not here: which addresses are in use (`allocator.rs`), agreement on the first ring
//! (`consensus.rs`), counting votes (`claims.rs`). Invariants: `merge` is commutative,
//! associative and idempotent for rings that descend from the same genesis (property tests
//! below); tokens lie inside the subnet and the first token is the subnet's first address.
//! Weave equivalent: `ipam/ring/ring.go` (which had no register: its `rmpeer` rewrote the
//! entries, without a vote).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::register::Register;
use super::space::{Cidr, Range};
use crate::peer::PeerName;

/// How an entry's addresses voted on one vanished peer.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Vote {
    /// The claimer they voted for.
    pub claimer: PeerName,
    /// The claim round on the vanished peer the vote belongs to.
    pub round: u64,
}

/// Who owns the addresses from one token to the next, how often that changed, and how these
/// addresses voted.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Entry {
    /// The owner as written; if it departed, the space is its successor's ([`Ring::owner`]).
    pub owner: PeerName,
    /// Grows with every change; the higher version wins a merge.
    pub version: u64,
    /// Per vanished peer, how these addresses voted in its current round; set once.
    pub votes: BTreeMap<PeerName, Vote>,
}

/// The ownership of one subnet.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Ring {
    subnet: Cidr,
    entries: BTreeMap<u64, Entry>,
    /// Departures and claim rounds.
    register: Register,
}

/// Why a ring operation was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// Two copies disagree about one token at the same version: they come from different
    /// geneses, or an owner lost its state and reused a version.
    #[error(
        "ring conflict in {subnet} at {token}: {ours} and {theirs} both claim version {version}"
    )]
    Conflict {
        /// The subnet.
        subnet: Cidr,
        /// The address of the token.
        token: std::net::Ipv4Addr,
        /// Our owner for it.
        ours: PeerName,
        /// The other copy's owner.
        theirs: PeerName,
        /// The version both claim.
        version: u64,
    },
    /// The copies are of different subnets.
    #[error("cannot merge the ring of {theirs} into the ring of {ours}")]
    OtherSubnet {
        /// Our subnet.
        ours: Cidr,
        /// Theirs.
        theirs: Cidr,
    },
    /// A donation must lie inside one entry we own.
    #[error("range {range} is not inside one range owned by {me}")]
    NotOwned {
        /// The range.
        range: Range,
        /// Who tried.
        me: PeerName,
    },
}

impl Ring {
    /// The first ring of `subnet`, split evenly among `members` (sorted, deduplicated). Every
    /// peer that computes it from the same members gets the same ring, so a genesis needs
    /// agreement only on the member list.
    pub fn genesis(subnet: Cidr, members: &[PeerName]) -> Ring {
        let mut members = members.to_vec();
        members.sort();
        members.dedup();
        let range = subnet.range();
        let mut entries = BTreeMap::new();
        let n = members.len().max(1) as u64;
        for (i, owner) in members.iter().enumerate() {
            let token = range.start + range.len() * i as u64 / n;
            entries.insert(
                token,
                Entry {
                    owner: *owner,
                    version: 0,
                    votes: BTreeMap::new(),
                },
            );
        }
        Ring {
            subnet,
            entries,
            register: Register::default(),
        }
    }

    /// The subnet this ring divides.
    pub fn subnet(&self) -> Cidr {
        self.subnet
    }

    /// Who holds what `peer` owned: `peer` itself, or whoever holds a departed peer's space.
    pub fn owner(&self, peer: PeerName) -> PeerName {
        self.register.owner(peer)
    }

    /// Departures and claim rounds.
    pub fn register(&self) -> &Register {
        &self.register
    }

    /// Every entry with its range and its owner (after departures), in address order.
    pub fn slots(&self) -> impl Iterator<Item = (Range, PeerName, &Entry)> + '_ {
        let end = self.subnet.range().end;
        let mut it = self.entries.iter().peekable();
        std::iter::from_fn(move || {
            let (&start, entry) = it.next()?;
            let next = it.peek().map_or(end, |(&t, _)| t);
            Some((Range { start, end: next }, self.owner(entry.owner), entry))
        })
    }

    /// Every entry's range and owner (after departures), in address order.
    pub fn entries(&self) -> impl Iterator<Item = (Range, PeerName)> + '_ {
        self.slots().map(|(r, owner, _)| (r, owner))
    }

    /// The ranges `peer` owns, in address order, adjacent ones joined.
    pub fn owned(&self, peer: PeerName) -> Vec<Range> {
        let mut out: Vec<Range> = Vec::new();
        for (range, owner) in self.entries() {
            if owner != peer {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => out.push(range),
            }
        }
        out
    }

    /// The owner of `addr`, if the ring covers it.
    pub fn owner_of(&self, addr: u64) -> Option<PeerName> {
        if !self.subnet.range().contains(addr) {
            return None;
        }
        self.entries
            .range(..=addr)
            .next_back()
            .map(|(_, e)| self.owner(e.owner))
    }

    /// Every peer that owns some range.
    pub fn owners(&self) -> std::collections::BTreeSet<PeerName> {
        self.entries().map(|(_, owner)| owner).collect()
    }

    /// Gives `range` (inside one entry `me` owns) to `to`. Called only by the owner. Both parts
    /// keep the entry's votes: the addresses voted, whoever owns them next.
    pub fn donate(&mut self, me: PeerName, range: Range, to: PeerName) -> Result<(), RingError> {
        let not_owned = || RingError::NotOwned { range, me };
        let (entry_range, owner, entry) = self
            .slots()
            .find(|(r, _, _)| r.contains(range.start))
            .map(|(r, o, e)| (r, o, e.clone()))
            .ok_or_else(not_owned)?;
        if owner != me || range.is_empty() || range.end > entry_range.end {
            return Err(not_owned());
        }
        let version = entry.version + 1;
        if range.end < entry_range.end {
            // What follows the donated part stays ours: a new token.
            self.entries.insert(
                range.end,
                Entry {
                    owner: me,
                    version,
                    votes: entry.votes.clone(),
                },
            );
        }
        self.entries.insert(
            range.start,
            Entry {
                owner: to,
                version,
                votes: entry.votes,
            },
        );
        Ok(())
    }

    /// Records that `from` left with `meshctl reset` and named `to` its heir (called by
    /// `from`). Returns whether it is new.
    pub fn hand(&mut self, from: PeerName, to: PeerName) -> bool {
        let new = self.register.hand(from, to);
        self.forget_void_votes();
        new
    }

    /// Records that `by` won the reclaim of `from` in `round`, pending until it settles
    /// (called by `by`). Returns whether it is new.
    pub fn take(&mut self, from: PeerName, by: PeerName, round: u64) -> bool {
        self.register.take(from, by, round)
    }

    /// Settles `by`'s pending reclaim of `from`: the space moves to `by` (called by `by`).
    /// Returns whether it is new.
    pub fn settle(&mut self, from: PeerName, by: PeerName) -> bool {
        let new = self.register.settle(from, by);
        self.forget_void_votes();
        new
    }

    /// Starts a new claim round on `me` (called by `me`, alive, when it sees a claim on itself):
    /// every vote on it so far is void.
    pub fn bump_round(&mut self, me: PeerName) -> u64 {
        let r = self.register.bump_round(me);
        self.forget_void_votes();
        r
    }

    /// Records `me`'s vote for `claimer` on the vanished `gone` in every entry `me` owns whose
    /// addresses have not voted on `gone` yet. Returns whether anything changed.
    pub fn stamp(&mut self, me: PeerName, gone: PeerName, claimer: PeerName) -> bool {
        if self.register.departed(gone) {
            return false;
        }
        let vote = Vote {
            claimer,
            round: self.register.round(gone),
        };
        let tokens: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| self.owner(e.owner) == me && !e.votes.contains_key(&gone))
            .map(|(&t, _)| t)
            .collect();
        for t in &tokens {
            let e = self
                .entries
                .get_mut(t)
                .expect("invariant: token listed above");
            e.owner = me;
            e.version += 1;
            e.votes.insert(gone, vote);
        }
        !tokens.is_empty()
    }

    /// Merges another copy; returns whether ours changed. On a conflict nothing changes.
    pub fn merge(&mut self, other: &Ring) -> Result<bool, RingError> {
        if other.subnet != self.subnet {
            return Err(RingError::OtherSubnet {
                ours: self.subnet,
                theirs: other.subnet,
            });
        }
        for (token, theirs) in &other.entries {
            let Some(ours) = self.entries.get(token) else {
                continue;
            };
            let same_version_differs = ours.version == theirs.version
                && (ours.owner != theirs.owner
                    || ours
                        .votes
                        .iter()
                        .any(|(g, c)| theirs.votes.get(g).is_some_and(|t| t != c)));
            if same_version_differs {
                return Err(RingError::Conflict {
                    subnet: self.subnet,
                    token: super::space::ip(*token),
                    ours: ours.owner,
                    theirs: theirs.owner,
                    version: ours.version,
                });
            }
        }
        let mut changed = self.register.merge(&other.register);
        let range = self.subnet.range();
        for (token, theirs) in &other.entries {
            if !range.contains(*token) {
                continue;
            }
            match self.entries.get_mut(token) {
                Some(ours) if ours.version > theirs.version => {}
                Some(ours) if ours.version == theirs.version => {
                    // Equal versions differ only in votes that one copy dropped as void: take
                    // the union; void ones are dropped again below.
                    for (g, v) in &theirs.votes {
                        if !ours.votes.contains_key(g) {
                            ours.votes.insert(*g, *v);
                            changed = true;
                        }
                    }
                }
                _ => {
                    self.entries.insert(*token, theirs.clone());
                    changed = true;
                }
            }
        }
        self.forget_void_votes();
        Ok(changed)
    }

    /// Takes in departures and rounds from another ring of ours. Returns whether any was new.
    pub fn adopt_register(&mut self, register: &Register) -> bool {
        let changed = self.register.merge(register);
        if changed {
            self.forget_void_votes();
        }
        changed
    }

    /// Drops votes whose round is over or whose peer was reclaimed for good (no version change:
    /// every copy that knows it drops them alike, and equal versions merge by union). Votes on
    /// a peer that reset stay: should two resets name each other, the cycle's space is
    /// reclaimed, and votes cast before count then as they would have.
    fn forget_void_votes(&mut self) {
        let register = &self.register;
        for e in self.entries.values_mut() {
            e.votes
                .retain(|g, v| !register.settled(*g) && v.round >= register.round(*g));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn subnet() -> Cidr {
        "10.2.1.0/24".parse().unwrap()
    }

    fn upper_half(ring: &Ring, peer: PeerName) -> Range {
        let r = ring.owned(peer)[0];
        Range {
            start: r.start + r.len() / 2,
            end: r.end,
        }
    }

    #[test]
    fn genesis_splits_evenly_and_donation_splits_an_entry() {
        let (a, b, c) = (PeerName(1), PeerName(2), PeerName(3));
        let mut ring = Ring::genesis(subnet(), &[b, a]);
        assert_eq!(ring.owned(a)[0].len(), 128);
        let start = ring.owned(a)[0].start;
        ring.donate(
            a,
            Range {
                start: start + 64,
                end: start + 96,
            },
            c,
        )
        .unwrap();
        assert_eq!(ring.owned(c)[0].len(), 32);
        assert_eq!(ring.owned(a).iter().map(|r| r.len()).sum::<u64>(), 96);
        assert_eq!(ring.owner_of(start + 70), Some(c));
        assert!(ring
            .donate(
                a,
                Range {
                    start: start + 64,
                    end: start + 65
                },
                b
            )
            .is_err());
    }

    #[test]
    fn a_departed_peers_space_belongs_to_whoever_holds_it_now() {
        let (a, b, c) = (PeerName(1), PeerName(2), PeerName(3));
        let mut ring = Ring::genesis(subnet(), &[a, b, c]);
        assert!(ring.hand(a, b));
        assert!(!ring.hand(a, b), "the same departure twice is no change");
        assert!(ring.owned(a).is_empty());
        assert_eq!(ring.owned(b).iter().map(|r| r.len()).sum::<u64>(), 170);
        assert!(ring.take(b, c, 0));
        assert_eq!(ring.owner(b), b, "pending: nothing moved yet");
        assert!(ring.settle(b, c));
        assert_eq!(ring.owners(), [c].into());
        assert_eq!(ring.owner(a), c);
        // c may give away what it inherited; the donated part is written in c's name.
        let inherited = ring.entries().next().unwrap().0;
        let half = Range {
            start: inherited.start + 8,
            end: inherited.end,
        };
        ring.donate(c, half, a).unwrap();
        assert_eq!(
            ring.owner_of(half.start),
            Some(c),
            "a departed; the space is c's"
        );
    }

    #[test]
    fn an_address_votes_once_per_round_and_its_vote_goes_with_it_when_donated() {
        let (a, b, x, n) = (PeerName(1), PeerName(2), PeerName(3), PeerName(9));
        let mut ring = Ring::genesis(subnet(), &[a, b, x]);
        assert!(ring.stamp(a, x, a));
        assert!(
            !ring.stamp(a, x, b),
            "a second vote by the same addresses is ignored"
        );
        // a gives half of its space to a newcomer, which then votes for b: the donated
        // addresses already voted for a, and keep that vote.
        let half = upper_half(&ring, a);
        ring.donate(a, half, n).unwrap();
        assert!(!ring.stamp(n, x, b), "donated addresses voted again");
        let votes_for = |ring: &Ring, claimer: PeerName| -> u64 {
            ring.slots()
                .filter(|(_, _, e)| e.votes.get(&x).is_some_and(|v| v.claimer == claimer))
                .map(|(r, _, _)| r.len())
                .sum()
        };
        assert_eq!(votes_for(&ring, a), 85);
        assert_eq!(votes_for(&ring, b), 0);
        // x comes back and sees the claim: a new round, and the votes of the old one are void.
        assert_eq!(ring.bump_round(x), 1);
        assert!(ring.slots().all(|(_, _, e)| e.votes.is_empty()));
        assert!(ring.stamp(n, x, b), "a new round, a new vote");
        // Once x is reclaimed for good, the votes on it are settled and dropped.
        ring.take(x, b, 1);
        assert!(
            ring.slots().any(|(_, _, e)| !e.votes.is_empty()),
            "kept while pending"
        );
        ring.settle(x, b);
        assert!(ring.slots().all(|(_, _, e)| e.votes.is_empty()));
        assert!(!ring.stamp(a, x, a), "nobody votes on a reclaimed peer");
    }

    #[test]
    fn a_copy_that_knows_a_reclaim_merges_with_one_that_still_holds_its_votes() {
        let (a, b, x) = (PeerName(1), PeerName(2), PeerName(3));
        let mut voted = Ring::genesis(subnet(), &[a, b, x]);
        voted.stamp(a, x, a);
        voted.stamp(b, x, a);
        let mut settled = voted.clone();
        settled.take(x, a, 0);
        settled.settle(x, a);
        let mut m1 = voted.clone();
        m1.merge(&settled).unwrap();
        let mut m2 = settled.clone();
        m2.merge(&voted).unwrap();
        assert_eq!(m1, settled);
        assert_eq!(m2, settled);
    }

    #[test]
    fn different_geneses_conflict_instead_of_merging() {
        let mut x = Ring::genesis(subnet(), &[PeerName(1)]);
        let y = Ring::genesis(subnet(), &[PeerName(2)]);
        let before = x.clone();
        assert!(matches!(x.merge(&y), Err(RingError::Conflict { .. })));
        assert_eq!(x, before);
    }

    #[test]
    fn two_takers_of_one_peer_merge_alike_in_every_order() {
        let (a, b, x) = (PeerName(1), PeerName(2), PeerName(3));
        let mut one = Ring::genesis(subnet(), &[a, b, x]);
        let mut two = one.clone();
        one.take(x, a, 0);
        one.settle(x, a);
        two.take(x, b, 0);
        two.settle(x, b);
        let mut m1 = one.clone();
        m1.merge(&two).unwrap();
        let mut m2 = two.clone();
        m2.merge(&one).unwrap();
        assert_eq!(m1, m2);
        assert_eq!(m1.owner(x), a, "the smaller taker");
    }

    /// Builds copies the way peers do: each op is done by a peer on its own copy, after merging
    /// whatever copy it has heard of: give part of its first range away, vote on a peer (the
    /// same claimer every time, as a peer votes once per round), start a new claim round on
    /// itself, or leave for good, naming an heir.
    /// A peer that left does nothing more, but its last copy can still be heard. Returns every
    /// intermediate copy.
    fn history(ops: &[(u8, u8, u8, u8)]) -> Vec<Ring> {
        let peers: Vec<PeerName> = (1..=5).map(PeerName).collect();
        let mut copies: Vec<Ring> = vec![Ring::genesis(subnet(), &peers[..4]); 5];
        let mut left = [false; 5];
        let mut seen = Vec::new();
        for &(actor, hear, to, cut) in ops {
            let (actor, hear, to) = (actor as usize % 5, hear as usize % 5, to as usize % 5);
            if left[actor] {
                continue;
            }
            let heard = copies[hear].clone();
            copies[actor].merge(&heard).unwrap();
            let me = peers[actor];
            match cut % 8 {
                0 if to != actor && !left[to] => {
                    copies[actor].hand(me, peers[to]);
                    left[actor] = true;
                }
                3 => {
                    copies[actor].bump_round(me);
                }
                1 | 2 => {
                    let claimer = peers[(actor + to) % 5];
                    copies[actor].stamp(me, peers[to], claimer);
                }
                _ => {
                    let Some(r) = copies[actor].owned(me).first().copied() else {
                        seen.push(copies[actor].clone());
                        continue;
                    };
                    if r.len() >= 2 {
                        let mid = r.start + 1 + u64::from(cut) % (r.len() - 1);
                        let entry_end = copies[actor]
                            .entries()
                            .find(|(er, _)| er.contains(mid))
                            .map(|(er, _)| er.end)
                            .unwrap();
                        let range = Range {
                            start: mid,
                            end: r.end.min(entry_end),
                        };
                        copies[actor].donate(me, range, peers[to]).unwrap();
                    }
                }
            }
            seen.push(copies[actor].clone());
        }
        seen
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_idempotent(
            ops in proptest::collection::vec(any::<(u8, u8, u8, u8)>(), 1..60),
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 3),
        ) {
            let seen = history(&ops);
            prop_assume!(!seen.is_empty());
            let a = picks[0].get(&seen).clone();
            let b = picks[1].get(&seen).clone();
            let c = picks[2].get(&seen).clone();
            let merged = |x: &Ring, y: &Ring| { let mut m = x.clone(); m.merge(y).unwrap(); m };
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
            prop_assert_eq!(merged(&a, &a), a.clone());
        }

        /// Whatever the order copies meet in, every address has one owner per copy and the
        /// addresses that voted on a peer never vote for two claimers.
        #[test]
        fn an_address_never_holds_two_votes_on_one_peer(
            ops in proptest::collection::vec(any::<(u8, u8, u8, u8)>(), 1..60),
        ) {
            let seen = history(&ops);
            let mut all = Ring::genesis(subnet(), &(1..=4).map(PeerName).collect::<Vec<_>>());
            for r in &seen {
                all.merge(r).unwrap();
            }
            for r in &seen {
                for (range, _, e) in r.slots() {
                    for (gone, vote) in &e.votes {
                        for addr in [range.start, range.end - 1] {
                            let (_, _, later) = all.slots().find(|(x, _, _)| x.contains(addr)).unwrap();
                            let void = vote.round < all.register().round(*gone);
                            prop_assert!(void || later.votes.get(gone) == Some(vote));
                        }
                    }
                }
            }
        }
    }
}

//! Reclaiming the space of a peer that vanished: a claim, votes weighed by address space, and a
//! successor once more than half of all addresses agreed.
//!
//! A peer unreachable for `reclaim_after` (or named by `meshctl rmpeer`) may have its ranges
//! taken over. The smallest reachable peer claims it in its own [`Claims`]; every peer that
//! also finds it unreachable picks one claimer per vanished peer, once and for good (persisted
//! with its record), and stamps that vote into every universe entry it owns ([`Ring::stamp`]).
//! The vote belongs to the addresses, not to the peer: it is set once, and a range given away
//! later carries it along, so no address votes twice on one peer, whoever owns it.
//!
//! A claimer wins when the addresses that voted for it cover more than half of the universe, or
//! exactly half that includes the universe's first address ([`wins`]). It records the win in the
//! register, pending; every router that sees it acknowledges it in its record, and once the
//! acknowledging routers own more than half of the universe (the same rule) the winner settles
//! it, and with that holds every range the peer owned, in every subnet. Until then it neither
//! allocates from that space nor votes with it (see `register.rs` for why). Two claimers can't
//! both win: their voters are disjoint sets of addresses, and two disjoint sets can't both hold
//! more than half (nor both the first address).
//! The threshold counts the whole universe, the vanished peer's share too, because a claimer's
//! view of that share may be stale (the peer may have given space away just before it
//! vanished, to a router on the other side of a partition). The same argument covers splits:
//! only a side that holds more than half of the space can reclaim anybody, so two sides never
//! take each other's space. New routers change nothing: they own only space some owner gave
//! them, and that space voted (or not) as before.
//!
//! Votes and claims belong to a claim round on their peer (the register's rounds). A peer that is
//! alive and sees a claim on itself starts a new round, which voids every claim, vote and yield
//! of the earlier ones: votes cast while it was cut off, or while a router restarted and saw
//! nobody yet, can't take it over later. A claimer whose claim was voided starts the clock again:
//! the peer must be gone for `reclaim_after` once more (a `meshctl rmpeer` claim just ends).
//!
//! Votes can split: claims made on both sides of a partition each gather votes there, and after
//! healing none may reach a majority, so the space would stay with the vanished peer for good.
//! So a claimer that sees a smaller claimer for the same peer yields to it, once and for good
//! (`yielded`, also gossiped): from then on it never takes that peer over, and the votes it got
//! count for the claimer it yielded to (and on along further yields, always to smaller names,
//! so there are no cycles). A vote still counts for at most one winner: it counts for another
//! claimer only after the one it was cast for has given up winning, and a claimer that has won
//! (even pending) never yields.
//!
//! A claimer can itself depart (vanish and be reclaimed, or reset) after the votes went to it.
//! Its claims then pass to whoever holds its space, with the votes cast for it and the yields
//! made to it: that peer wins them as if it had been voted for. Yields and departures together
//! could lead in a circle (2 yields to 1, 1 resets to 11, 11 yields to 2): a claimer never
//! yields into a chain that leads back to itself, and a circle made by later events counts for
//! its smallest member still present. This rests on the assumption every
//! reclaim makes: a reclaimed peer does not come back with its old state (one that does is told
//! so and gives out no address, see `Ipam::check_owned`).
//!
//! Only peers that own space claim (one that owns none could vanish with its claim open and never
//! be reclaimed itself, so its claim would never pass on), and only peers that have not
//! departed: a router told it was taken over (it was cut off for too long) keeps running until
//! its operator resets it, and must not block claims meanwhile.
//! A `meshctl rmpeer` vote needs its peer unreachable for [`FORCED_SETTLE`] at the voter, so a
//! router that just restarted, and reaches nobody yet, doesn't vote on everyone at once.
//!
//! Liveness needs the reachable owners of more than half of the universe. A peer that holds half
//! or more can't be reclaimed without its return (in a mesh of two, the one without the first
//! address); `meshctl status ipam` shows each claim's share of votes. Weave equivalent:
//! `rmpeer`, which moved the space at once, without any vote.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Ipam, IpamEvent, Register, Ring, Take, Vote};
use crate::peer::PeerName;

/// How long a peer must be unreachable at a voter before it votes on a `meshctl rmpeer` claim.
pub const FORCED_SETTLE: Duration = Duration::from_secs(10);

/// A claim on a vanished peer.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Claim {
    /// Made by `meshctl rmpeer` (no wait for `reclaim_after`).
    pub forced: bool,
    /// The claim round on the peer it belongs to.
    pub round: u64,
}

/// A claimer's yield of its claim (and the votes it got) to a smaller claimer.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Yield {
    /// The claimer yielded to.
    pub to: PeerName,
    /// The claim round it belongs to.
    pub round: u64,
}

/// A router's acknowledgement that it saw a pending reclaim.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Ack {
    /// The winner.
    pub by: PeerName,
    /// The round it won in.
    pub round: u64,
}

impl From<Take> for Ack {
    fn from(t: Take) -> Ack {
        Ack {
            by: t.by,
            round: t.round,
        }
    }
}

/// One peer's claims and votes; part of its gossiped record. Entries of past rounds, or on peers
/// that departed, are void; their writer drops them.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Claims {
    /// Vanished peers this peer asks to take over.
    pub claims: BTreeMap<PeerName, Claim>,
    /// Per vanished peer, the claimer this peer voted for. Never changes within a round; stamped
    /// into the universe entries the peer owns, where it counts.
    pub votes: BTreeMap<PeerName, Vote>,
    /// Per vanished peer, the smaller claimer this peer yielded its claim to. Never changes
    /// within a round; a peer never takes over one it yielded.
    pub yielded: BTreeMap<PeerName, Yield>,
    /// Per vanished peer, the pending reclaim of it this peer has seen.
    pub seen: BTreeMap<PeerName, Ack>,
}

impl Claims {
    /// Adds a claim in `round`; returns whether it is new (or newly forced).
    pub fn claim(&mut self, peer: PeerName, forced: bool, round: u64) -> bool {
        match self.claims.get(&peer) {
            Some(c) if c.round > round || (c.round == round && (c.forced || !forced)) => false,
            _ => {
                self.claims.insert(peer, Claim { forced, round });
                true
            }
        }
    }
}

/// Whether addresses of the universe that voted for one claimer win: `voted` of `total`, with
/// `first` telling whether the universe's first address is among them. More than half wins;
/// exactly half wins only with the first address, so that of two disjoint halves one wins.
pub fn wins(voted: u64, total: u64, first: bool) -> bool {
    let (twice, total) = (u128::from(voted) * 2, u128::from(total));
    twice > total || (twice == total && first)
}

/// How the universe voted on one vanished peer for one claimer.
struct Tally {
    voted: u64,
    first: bool,
    total: u64,
}

impl Tally {
    fn wins(&self) -> bool {
        wins(self.voted, self.total, self.first)
    }

    fn percent(&self) -> f64 {
        self.voted as f64 * 100.0 / self.total.max(1) as f64
    }
}

/// Whether a claim, vote or yield of `round` on `peer` still counts.
fn live(register: &Register, peer: PeerName, round: u64) -> bool {
    !register.departed(peer) && round == register.round(peer)
}

impl Ipam {
    /// The claimer a vote for `claimer` on `gone` counts for: `claimer`, or where its yields
    /// (of the current round) and departures lead. A circle counts for its smallest member
    /// that has not departed.
    fn vote_goes_to(&self, register: &Register, gone: PeerName, claimer: PeerName) -> PeerName {
        let round = register.round(gone);
        let mut path: Vec<PeerName> = Vec::new();
        let mut c = claimer;
        loop {
            if let Some(i) = path.iter().position(|p| *p == c) {
                let circle = &path[i..];
                return circle
                    .iter()
                    .copied()
                    .filter(|p| !register.departed(*p))
                    .min()
                    .unwrap_or_else(|| *circle.iter().min().expect("invariant: not empty"));
            }
            path.push(c);
            if register.departed(c) {
                c = register.owner(c);
                continue;
            }
            let next = self
                .state
                .records
                .get(&c)
                .and_then(|r| r.claims.yielded.get(&gone))
                .filter(|y| y.round == round && y.to < c);
            match next {
                Some(y) => c = y.to,
                None => return c,
            }
        }
    }

    /// The universe's votes on `gone` (of its current round) that count for `claimer`.
    /// Addresses `gone` owns don't vote; they still count in the total.
    fn tally(&self, universe: &Ring, gone: PeerName, claimer: PeerName) -> Tally {
        let register = universe.register();
        let whole = universe.subnet().range();
        let round = register.round(gone);
        let mut leads: BTreeMap<PeerName, bool> = BTreeMap::new();
        let mut tally = Tally {
            voted: 0,
            first: false,
            total: whole.len(),
        };
        for (range, owner, entry) in universe.slots() {
            let Some(v) = entry.votes.get(&gone).filter(|v| v.round == round) else {
                continue;
            };
            let counts = *leads
                .entry(v.claimer)
                .or_insert_with(|| self.vote_goes_to(register, gone, v.claimer) == claimer);
            if counts && owner != gone {
                tally.voted += range.len();
                tally.first |= range.start == whole.start;
            }
        }
        tally
    }

    /// The universe's acknowledgements of the pending reclaim `take` of `gone`: the addresses
    /// of routers that saw it, and of the router that holds the winner's space.
    fn acks(&self, universe: &Ring, gone: PeerName, take: Take) -> Tally {
        let register = universe.register();
        let winner = register.owner(take.by);
        let whole = universe.subnet().range();
        let ack = Ack::from(take);
        let mut tally = Tally {
            voted: 0,
            first: false,
            total: whole.len(),
        };
        for (range, owner) in universe.entries() {
            let saw = owner == winner
                || self
                    .state
                    .records
                    .get(&owner)
                    .is_some_and(|r| r.claims.seen.get(&gone) == Some(&ack));
            if saw && owner != gone {
                tally.voted += range.len();
                tally.first |= range.start == whole.start;
            }
        }
        tally
    }

    /// Every peer that owns space in `universe` or another stored ring (departed peers own
    /// nothing; whoever holds their space does).
    fn owners_with(&self, universe: &Ring) -> BTreeSet<PeerName> {
        let mut e = universe.owners();
        for ring in &self.state.rings {
            if ring.subnet() != universe.subnet() {
                e.extend(ring.owners());
            }
        }
        e
    }

    pub(super) fn owns_space(&self, peer: PeerName) -> bool {
        self.ring(self.config.universe)
            .is_some_and(|u| self.owners_with(&u).contains(&peer))
    }

    fn unreachable_long_enough(&self, now: Instant, peer: PeerName, forced: bool) -> bool {
        if self.reachable.contains(&peer) || peer == self.me {
            return false;
        }
        let after = if forced {
            FORCED_SETTLE
        } else {
            let Some(after) = self.config.reclaim_after else {
                return false;
            };
            after
        };
        self.unreachable_since
            .get(&peer)
            .is_some_and(|since| now >= *since + after)
    }

    pub(super) fn claims_step(&mut self, now: Instant) {
        let Some(mut universe) = self.ring(self.config.universe) else {
            return;
        };
        if universe.register().departed(self.me) {
            // We left, or were taken over: we have no say (`check_owned` tells the user).
            return;
        }
        let mut ring_changed = false;
        // A claim on us in our current round means nothing: we are here. A new round says so.
        let round = universe.register().round(self.me);
        let claimed = self.state.records.values().any(|r| {
            r.claims
                .claims
                .get(&self.me)
                .is_some_and(|c| c.round == round)
        }) || universe
            .slots()
            .any(|(_, _, e)| e.votes.get(&self.me).is_some_and(|v| v.round == round));
        if claimed {
            universe.bump_round(self.me);
            ring_changed = true;
        }
        let mut changed = self.prune_own_claims(now, universe.register());
        let (owners, we_own) = {
            let mut o = self.owners_with(&universe);
            let we_own = o.remove(&self.me);
            (o, we_own)
        };
        // An owner we never saw reachable (we restarted, or joined, after it vanished) is
        // unreachable from the first time we look; else its space would wait for peers that
        // saw it leave, and after enough restarts and newcomers nobody would vote on it.
        for &x in &owners {
            if !self.reachable.contains(&x) {
                self.unreachable_since.entry(x).or_insert(now);
            }
        }
        // Claim: the smallest reachable peer that has not departed (or we) claims every owner
        // gone for long enough.
        let register = universe.register().clone();
        let smallest = self
            .reachable
            .iter()
            .copied()
            .filter(|p| !register.departed(*p) && owners.contains(p))
            .chain([self.me])
            .min();
        if smallest == Some(self.me) && we_own {
            for &x in &owners {
                if self.unreachable_long_enough(now, x, false) {
                    let rec = self.state.records.entry(self.me).or_default();
                    changed |= rec.claims.claim(x, false, register.round(x));
                }
            }
        }
        // Inherit: the claims of peers whose space came to us, with the votes they gathered.
        changed |= self.inherit_claims(&register);
        // Acknowledge the pending reclaims we see.
        for (x, t) in register.pending_all() {
            let rec = self.state.records.get_mut(&self.me).expect("own record");
            if rec.claims.seen.insert(x, Ack::from(t)) != Some(Ack::from(t)) {
                changed = true;
            }
        }
        // Vote: once per vanished peer and round, for the smallest claimer we see.
        let claimers = self.claimers(&register, &owners);
        for (&x, &(claimer, forced)) in &claimers {
            let voted = self.state.records[&self.me]
                .claims
                .votes
                .get(&x)
                .is_some_and(|v| live(&register, x, v.round));
            if voted || !self.unreachable_long_enough(now, x, forced) {
                continue;
            }
            let rec = self.state.records.get_mut(&self.me).expect("own record");
            let vote = Vote {
                claimer,
                round: register.round(x),
            };
            rec.claims.votes.insert(x, vote);
            changed = true;
        }
        // Our addresses carry our votes, also addresses we received or inherited since.
        for (&x, v) in &self.state.records[&self.me].claims.votes {
            if owners.contains(&x) && live(&register, x, v.round) {
                ring_changed |= universe.stamp(self.me, x, v.claimer);
            }
        }
        // Yield: to a smaller claimer of the same peer, unless its votes would lead back to us,
        // and never once the peer is won (pending): the votes that won it must not count for
        // anyone else.
        let mine: Vec<PeerName> = self.state.records[&self.me]
            .claims
            .claims
            .iter()
            .filter(|(x, c)| live(&register, **x, c.round))
            .map(|(x, _)| *x)
            .collect();
        for &x in &mine {
            let own = &self.state.records[&self.me].claims;
            if own.yielded.contains_key(&x) || universe.register().pending(x).is_some() {
                continue;
            }
            let Some(&(to, _)) = claimers.get(&x) else {
                continue;
            };
            if to < self.me && self.vote_goes_to(&register, x, to) != self.me {
                let rec = self.state.records.get_mut(&self.me).expect("own record");
                let round = register.round(x);
                rec.claims.yielded.insert(x, Yield { to, round });
                changed = true;
            }
        }
        // Win: once addresses covering more than half of the universe voted for us (directly
        // or through claimers that yielded to us or whose space we hold).
        for x in mine {
            ring_changed |= self.try_win(now, x, &mut universe);
        }
        // Settle our pending wins (and those of departed winners whose space we hold) that
        // routers owning more than half of the universe have seen.
        let pending: Vec<(PeerName, Take)> = universe
            .register()
            .pending_all()
            .filter(|(_, t)| universe.register().owner(t.by) == self.me)
            .collect();
        for (x, t) in pending {
            if self.acks(&universe, x, t).wins() && universe.settle(x, t.by) {
                ring_changed = true;
                self.events.push_back(IpamEvent::Reclaimed { peer: x });
                changed |= self.inherit_claims(&universe.register().clone());
            }
        }
        if ring_changed {
            self.store_ring(universe);
            self.changed = true;
            self.dirty = true;
        }
        if changed {
            let rec = self.state.records.get_mut(&self.me).expect("own record");
            rec.version += 1;
            self.changed = true;
            self.dirty = true;
        }
    }

    /// Per vanished peer, the smallest claimer (that owns space and has not departed) of its
    /// current round, and whether that claim is forced.
    fn claimers(
        &self,
        register: &Register,
        owners: &BTreeSet<PeerName>,
    ) -> BTreeMap<PeerName, (PeerName, bool)> {
        let mut claimers: BTreeMap<PeerName, (PeerName, bool)> = BTreeMap::new();
        for (c, r) in &self.state.records {
            if register.departed(*c) || (*c != self.me && !owners.contains(c)) {
                continue;
            }
            for (&x, claim) in &r.claims.claims {
                if !live(register, x, claim.round) {
                    continue;
                }
                let e = claimers.entry(x).or_insert((*c, claim.forced));
                if *c < e.0 {
                    *e = (*c, claim.forced);
                }
            }
        }
        claimers
    }

    /// Drops our claims, votes and yields that are void (a past round, or a peer that
    /// departed). A claim voided by a new round restarts the wait for its peer: it answered
    /// someone, so it must be gone for `reclaim_after` again. Returns whether our record changed.
    fn prune_own_claims(&mut self, now: Instant, register: &Register) -> bool {
        let own = &self.state.records[&self.me].claims;
        let restart: Vec<PeerName> = own
            .claims
            .iter()
            .filter(|(x, c)| !register.departed(**x) && c.round < register.round(**x))
            .map(|(x, _)| *x)
            .collect();
        let rec = self.state.records.get_mut(&self.me).expect("own record");
        let before = rec.claims.clone();
        rec.claims.claims.retain(|x, c| live(register, *x, c.round));
        rec.claims.votes.retain(|x, v| live(register, *x, v.round));
        rec.claims
            .yielded
            .retain(|x, y| live(register, *x, y.round));
        rec.claims
            .seen
            .retain(|x, a| register.pending(*x).map(Ack::from) == Some(*a));
        let changed = rec.claims != before;
        for x in restart {
            if !self.reachable.contains(&x) {
                self.unreachable_since.insert(x, now);
            }
        }
        changed
    }

    /// Adopts the live claims of every departed peer whose space we hold. Returns whether our
    /// record changed.
    fn inherit_claims(&mut self, register: &Register) -> bool {
        let inherited: Vec<(PeerName, Claim)> = register
            .recorded()
            .filter(|p| register.departed(*p) && register.owner(*p) == self.me)
            .filter_map(|p| self.state.records.get(&p))
            .flat_map(|r| r.claims.claims.iter())
            .filter(|(y, c)| **y != self.me && live(register, **y, c.round))
            .map(|(&y, &c)| (y, c))
            .collect();
        let rec = self.state.records.get_mut(&self.me).expect("own record");
        let mut changed = false;
        for (y, c) in inherited {
            changed |= rec.claims.claim(y, c.forced, c.round);
        }
        changed
    }

    /// Wins `x` (pending, in `universe`) if we may and enough of the universe voted for us.
    /// Returns whether it did.
    fn try_win(&mut self, now: Instant, x: PeerName, universe: &mut Ring) -> bool {
        let register = universe.register();
        if register.pending(x).is_some()
            || self.vote_goes_to(register, x, self.me) != self.me
            || !self.owners_with(universe).contains(&x)
        {
            return false;
        }
        // A claim wins only while its peer is still gone for us.
        let forced = self.state.records[&self.me].claims.claims[&x].forced;
        if !self.unreachable_long_enough(now, x, forced) {
            return false;
        }
        if !self.tally(universe, x, self.me).wins() {
            return false;
        }
        let round = universe.register().round(x);
        universe.take(x, self.me, round)
    }

    pub(super) fn claims_status(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Some(universe) = self.ring(self.config.universe) else {
            return out;
        };
        let register = universe.register();
        for (c, r) in &self.state.records {
            for (x, claim) in &r.claims.claims {
                if !live(register, *x, claim.round) {
                    continue;
                }
                let state = if register.departed(*c) {
                    format!("passed to {}, which holds {c}'s space", register.owner(*c))
                } else if let Some(y) = r.claims.yielded.get(x).filter(|y| y.round == claim.round) {
                    format!("yielded to {}", y.to)
                } else {
                    let t = self.tally(&universe, *x, *c);
                    format!(
                        "addresses voting for it: {:.1}% of {}, needs more than half{}",
                        t.percent(),
                        universe.subnet(),
                        if t.wins() { " (reached)" } else { "" }
                    )
                };
                let how = if claim.forced {
                    "rmpeer"
                } else {
                    "unreachable"
                };
                out.push(format!("{c} claims {x} ({how}): {state}"));
            }
        }
        for (x, t) in register.taken() {
            if t.settled {
                out.push(format!(
                    "{x} was reclaimed by {}: its space is {}'s",
                    t.by,
                    register.owner(*x)
                ));
            } else if register.pending(*x).is_some() {
                let a = self.acks(&universe, *x, *t);
                out.push(format!(
                    "{x} was won by {}, waiting until routers owning more than half of {} have \
                     seen it: {:.1}%",
                    t.by,
                    universe.subnet(),
                    a.percent()
                ));
            }
        }
        for x in register.handed().keys() {
            if register.departed(*x) {
                out.push(format!(
                    "{x} left (meshctl reset): its space is {}'s",
                    register.owner(*x)
                ));
            } else {
                out.push(format!(
                    "{x} left (meshctl reset) with routers that named each other heirs: \
                     their space waits to be reclaimed like a vanished router's"
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::wins;

    #[test]
    fn more_than_half_wins_and_of_two_halves_the_one_with_the_first_address() {
        assert!(wins(501, 1000, false));
        assert!(!wins(500, 1000, false));
        assert!(wins(500, 1000, true));
        assert!(!wins(499, 1000, true));
        assert!(!wins(0, 1, true));
        assert!(
            wins(1 << 32, 1 << 32, true),
            "no overflow at the whole IPv4 space"
        );
    }
}

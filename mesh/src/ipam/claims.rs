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
//! exactly half that includes the universe's first address ([`wins`]). It then names itself the
//! vanished peer's successor in the register of departures, and with that holds every range the
//! peer owned, in every subnet. Two claimers can't both win: their voters are disjoint sets of
//! addresses, and two disjoint sets can't both hold more than half (nor both the first address).
//! The threshold counts the whole universe, the vanished peer's share too, because a claimer's
//! view of that share may be stale (the peer may have given space away just before it
//! vanished, to a router on the other side of a partition). The same argument covers splits:
//! only a side that holds more than half of the space can reclaim anybody, so two sides never
//! take each other's space. New routers change nothing: they own only space some owner gave
//! them, and that space voted (or not) as before.
//!
//! Votes can split: claims made on both sides of a partition each gather votes there, and after
//! healing none may reach a majority, so the space would stay with the vanished peer for good.
//! So a claimer that sees a smaller claimer for the same peer yields to it, once and for good
//! (`yielded`, also gossiped): from then on it never takes that peer over, and the votes it got
//! count for the claimer it yielded to (and on along further yields, always to smaller names,
//! so there are no cycles). A vote still counts for at most one winner: it counts for another
//! claimer only after the one it was cast for has given up winning.
//!
//! A claimer can itself depart (vanish and be reclaimed, or reset) after the votes went to it.
//! Its claims then pass to its successor, with the votes cast for it and the yields made to it:
//! the successor wins them as if it had been voted for. This rests on the assumption every
//! reclaim makes: a reclaimed peer does not come back with its old state (one that does is told
//! so and gives out no address, see `Ipam::check_owned`).
//!
//! Liveness needs the reachable owners of more than half of the universe. A peer that holds half
//! or more can't be reclaimed without its return (in a mesh of two, the one without the first
//! address); `meshctl status ipam` shows each claim's share of votes. Weave equivalent:
//! `rmpeer`, which moved the space at once, without any vote.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{Ipam, IpamEvent, Ring};
use crate::peer::PeerName;

/// One peer's claims and votes; part of its gossiped record.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Claims {
    /// Vanished peers this peer asks to take over; `true` when forced by `meshctl rmpeer`.
    pub claims: BTreeMap<PeerName, bool>,
    /// Per vanished peer, the claimer this peer voted for. Never changes once set; stamped into
    /// the universe entries the peer owns, where it counts.
    pub votes: BTreeMap<PeerName, PeerName>,
    /// Per vanished peer, the smaller claimer this peer yielded its claim (and the votes it got)
    /// to. Never changes once set; a peer never takes over one it yielded.
    pub yielded: BTreeMap<PeerName, PeerName>,
}

impl Claims {
    /// Adds a claim; returns whether it is new (or newly forced).
    pub fn claim(&mut self, peer: PeerName, forced: bool) -> bool {
        match self.claims.get(&peer) {
            Some(&f) if f || !forced => false,
            _ => {
                self.claims.insert(peer, forced);
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

impl Ipam {
    /// The claimer a vote for `claimer` on `gone` counts for: `claimer`, or where its yields
    /// and departures lead. A claimer that departed (it vanished for good before it could win,
    /// or reset) passes its claims on to its successor, as it does its space.
    fn vote_goes_to(&self, gone: PeerName, mut claimer: PeerName) -> PeerName {
        let departed = self.departed();
        // Yields go to smaller names and the register has no cycles, so this ends; the bound
        // is for corrupt or contradictory records.
        for _ in 0..2 * (self.state.records.len() + departed.len()) + 2 {
            if let Some(&successor) = departed.get(&claimer) {
                claimer = successor;
                continue;
            }
            let next = self
                .state
                .records
                .get(&claimer)
                .and_then(|r| r.claims.yielded.get(&gone));
            match next {
                // A yield to a peer that departed since leads to its successor.
                Some(&to) if to < claimer && departed.get(&to) != Some(&claimer) => claimer = to,
                _ => break,
            }
        }
        claimer
    }

    /// The universe's votes on `gone` that count for `claimer`. Addresses `gone` owns don't
    /// vote; they still count in the total.
    fn tally(&self, universe: &Ring, gone: PeerName, claimer: PeerName) -> Tally {
        let whole = universe.subnet().range();
        let mut leads: BTreeMap<PeerName, bool> = BTreeMap::new();
        let mut tally = Tally {
            voted: 0,
            first: false,
            total: whole.len(),
        };
        for (range, owner, entry) in universe.slots() {
            let Some(&c) = entry.votes.get(&gone) else {
                continue;
            };
            let counts = *leads
                .entry(c)
                .or_insert_with(|| self.vote_goes_to(gone, c) == claimer);
            if counts && owner != gone {
                tally.voted += range.len();
                tally.first |= range.start == whole.start;
            }
        }
        tally
    }

    /// Every peer that owns space in our view (departed peers own nothing; their successors
    /// hold it).
    fn owners(&self) -> BTreeSet<PeerName> {
        let mut e: BTreeSet<PeerName> = BTreeSet::new();
        for ring in &self.state.rings {
            e.extend(ring.owners());
        }
        if let Some(universe) = self.ring(self.config.universe) {
            e.extend(universe.owners());
        }
        e
    }

    pub(super) fn owns_space(&self, peer: PeerName) -> bool {
        if self.departed().contains_key(&peer) {
            return false;
        }
        let stored = |r: &Ring| r.entries().any(|(_, owner)| owner == peer);
        if self.state.rings.iter().any(stored) {
            return true;
        }
        let universe_stored = self
            .state
            .rings
            .iter()
            .any(|r| r.subnet() == self.config.universe);
        !universe_stored
            && self
                .ring(self.config.universe)
                .is_some_and(|u| u.owners().contains(&peer))
    }

    fn unreachable_long_enough(&self, now: Instant, peer: PeerName, forced: bool) -> bool {
        if self.reachable.contains(&peer) || peer == self.me {
            return false;
        }
        if forced {
            return true;
        }
        let Some(after) = self.config.reclaim_after else {
            return false;
        };
        self.unreachable_since
            .get(&peer)
            .is_some_and(|since| now >= *since + after)
    }

    pub(super) fn claims_step(&mut self, now: Instant) {
        if self.departed().contains_key(&self.me) {
            // We left, or were taken over: we have no say (`check_owned` tells the user).
            return;
        }
        let mut changed = false;
        let owners = {
            let mut o = self.owners();
            o.remove(&self.me);
            o
        };
        // An owner we never saw reachable (we restarted, or joined, after it vanished) is
        // unreachable from the first time we look; else its space would wait for peers that
        // saw it leave, and after enough restarts and newcomers nobody would vote on it.
        for &x in &owners {
            if !self.reachable.contains(&x) {
                self.unreachable_since.entry(x).or_insert(now);
            }
        }
        // Claim: the smallest reachable peer (or us) claims every owner gone for long enough.
        let smallest = self.reachable.iter().copied().chain([self.me]).min();
        if smallest == Some(self.me) {
            for &x in &owners {
                if self.unreachable_long_enough(now, x, false) {
                    let rec = self.state.records.entry(self.me).or_default();
                    changed |= rec.claims.claim(x, false);
                }
            }
        }
        // Inherit: the claims of peers whose space came to us, with the votes they gathered.
        changed |= self.inherit_claims();
        // Vote: once per vanished peer, for the smallest claimer we see.
        let departed = self.departed().clone();
        let mut claimers: BTreeMap<PeerName, (PeerName, bool)> = BTreeMap::new();
        for (c, r) in &self.state.records {
            if departed.contains_key(c) {
                continue;
            }
            for (&x, &forced) in &r.claims.claims {
                if departed.contains_key(&x) {
                    continue;
                }
                let e = claimers.entry(x).or_insert((*c, forced));
                if *c < e.0 {
                    *e = (*c, forced);
                }
            }
        }
        for (x, (claimer, forced)) in claimers {
            let voted = self.state.records[&self.me].claims.votes.contains_key(&x);
            if voted || !self.unreachable_long_enough(now, x, forced) {
                continue;
            }
            let rec = self.state.records.get_mut(&self.me).expect("own record");
            rec.claims.votes.insert(x, claimer);
            changed = true;
        }
        // Our addresses carry our votes, also addresses we received or inherited since.
        self.stamp_votes();
        // Yield: to a smaller claimer of the same peer.
        let mine: Vec<PeerName> = self.state.records[&self.me]
            .claims
            .claims
            .keys()
            .copied()
            .filter(|x| !departed.contains_key(x))
            .collect();
        for &x in &mine {
            if self.state.records[&self.me].claims.yielded.contains_key(&x) {
                continue;
            }
            let smaller = self
                .state
                .records
                .iter()
                .filter(|(c, r)| {
                    **c < self.me && r.claims.claims.contains_key(&x) && !departed.contains_key(c)
                })
                .map(|(c, _)| *c)
                .min();
            if let Some(to) = smaller {
                let rec = self.state.records.get_mut(&self.me).expect("own record");
                rec.claims.yielded.insert(x, to);
                changed = true;
            }
        }
        // Win: once addresses covering more than half of the universe voted for us (directly
        // or through claimers that yielded to us or departed to us).
        for x in mine {
            changed |= self.try_win(now, x);
        }
        if changed {
            let rec = self.state.records.get_mut(&self.me).expect("own record");
            rec.version += 1;
            self.changed = true;
            self.dirty = true;
        }
    }

    /// Adopts the unfinished claims of every peer whose successor (at the end of the chain) we
    /// are. Returns whether our record changed.
    fn inherit_claims(&mut self) -> bool {
        let Some(universe) = self.ring(self.config.universe) else {
            return false;
        };
        let departed = self.departed();
        let inherited: Vec<(PeerName, bool)> = departed
            .keys()
            .filter(|p| universe.owner(**p) == self.me)
            .filter_map(|p| self.state.records.get(p))
            .flat_map(|r| r.claims.claims.iter())
            .filter(|(y, _)| **y != self.me && !departed.contains_key(y))
            .map(|(&y, &forced)| (y, forced))
            .collect();
        let rec = self.state.records.get_mut(&self.me).expect("own record");
        let mut changed = false;
        for (y, forced) in inherited {
            changed |= rec.claims.claim(y, forced);
        }
        changed
    }

    /// Writes our votes into the universe entries we own that have not voted on those peers.
    fn stamp_votes(&mut self) {
        let votes: Vec<(PeerName, PeerName)> = self.state.records[&self.me]
            .claims
            .votes
            .iter()
            .map(|(x, c)| (*x, *c))
            .collect();
        if votes.is_empty() {
            return;
        }
        let Some(mut universe) = self.ring(self.config.universe) else {
            return;
        };
        let mut stamped = false;
        for (x, c) in votes {
            if self.owns_space(x) {
                stamped |= universe.stamp(self.me, x, c);
            }
        }
        if stamped {
            self.store_ring(universe);
            self.changed = true;
            self.dirty = true;
        }
    }

    /// Takes `x` over if we may and enough of the universe voted for us. Returns whether our
    /// record changed.
    fn try_win(&mut self, now: Instant, x: PeerName) -> bool {
        if self.vote_goes_to(x, self.me) != self.me || !self.owns_space(x) {
            return false;
        }
        // Votes are for good, but a claim wins only while its peer is still gone for us: a
        // peer that came back keeps its space.
        let forced = self.state.records[&self.me].claims.claims[&x];
        if !self.unreachable_long_enough(now, x, forced) {
            return false;
        }
        let Some(mut universe) = self.ring(self.config.universe) else {
            return false;
        };
        if !self.tally(&universe, x, self.me).wins() {
            return false;
        }
        if let Err(e) = universe.depart(x, self.me) {
            self.set_conflict(format!("take over {x}: {e}"));
            return false;
        }
        self.store_ring(universe);
        self.changed = true;
        self.dirty = true;
        self.events.push_back(IpamEvent::Reclaimed { peer: x });
        // Claims `x` made and had not won pass to us, with the votes they got.
        self.inherit_claims()
    }

    pub(super) fn claims_status(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Some(universe) = self.ring(self.config.universe) else {
            return out;
        };
        let departed = self.departed();
        let mut claimed: BTreeSet<PeerName> = BTreeSet::new();
        for (c, r) in &self.state.records {
            for (x, forced) in &r.claims.claims {
                claimed.insert(*x);
                let state = if departed.get(x) == Some(c) {
                    "taken over".to_string()
                } else if departed.contains_key(c) {
                    format!("passed to {}, which took {c} over", universe.owner(*c))
                } else if let Some(to) = departed.get(x) {
                    format!("taken over by {to}")
                } else if let Some(to) = r.claims.yielded.get(x) {
                    format!("yielded to {to}")
                } else {
                    let t = self.tally(&universe, *x, *c);
                    format!(
                        "addresses voting for it: {:.1}% of {}, needs more than half{}",
                        t.percent(),
                        universe.subnet(),
                        if t.wins() { " (reached)" } else { "" }
                    )
                };
                let how = if *forced { "rmpeer" } else { "unreachable" };
                out.push(format!("{c} claims {x} ({how}): {state}"));
            }
        }
        for (x, to) in departed {
            if !claimed.contains(x) {
                out.push(format!("{x} left (meshctl reset): its space went to {to}"));
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

//! Reclaiming the space of a peer that vanished: a claim, votes, and the transfer once a
//! quorum agreed.
//!
//! A peer unreachable for `reclaim_after` (or named by `meshctl rmpeer`) may have its ranges
//! taken over. The smallest reachable peer claims it in its own [`Claims`]; every peer that
//! also finds it unreachable votes for one claimer per vanished peer, once and for good (the
//! vote is persisted with the record). The claimer takes over the ranges only when a strict
//! majority of the electorate (every owner in its rings, without the vanished peer) voted for
//! it. Two sides of a partition cannot both reach a majority of the
//! same electorate, because nobody votes twice.
//!
//! Votes can split: claims made on both sides of a partition each gather votes there, and after
//! healing none may reach a majority, so the space would stay with the vanished peer for good.
//! So a claimer that sees a smaller claimer for the same peer yields to it, once and for good
//! (`yielded`, also gossiped): from then on it never takes that peer over, and the votes it got
//! count for the claimer it yielded to (and on along further yields, always to smaller names,
//! so there are no cycles). A vote still counts for at most one winner: it counts for another
//! claimer only after the one it was cast for has given up winning.
//!
//! A claimer can itself vanish for good after the votes went to it. Once it is reclaimed in
//! turn, its claims pass to the peer that took it over, with the votes cast for it and the yields
//! made to it: that peer wins them as if it had been voted for. This rests on the same assumption
//! as any reclaim (the reclaimed peer never comes back with its old state); before, such claims
//! stayed stuck and the vanished peer's space with them.
//!
//! Known limit: the electorate is the claimer's view. If both sides of a long partition give
//! space to many new peers, their electorates differ and the majority argument weakens; the
//! simulator keeps new owners to one side at a time. Weave equivalent: `rmpeer`, without safety.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{Ipam, IpamEvent};
use crate::peer::PeerName;

/// One peer's claims and votes; part of its gossiped record.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Claims {
    /// Vanished peers this peer asks to take over; `true` when forced by `meshctl rmpeer`.
    pub claims: BTreeMap<PeerName, bool>,
    /// Per vanished peer, the claimer this peer voted for. Never changes once set.
    pub votes: BTreeMap<PeerName, PeerName>,
    /// Vanished peers this peer took over.
    pub done: BTreeSet<PeerName>,
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

impl Ipam {
    /// Who took over each peer that was reclaimed: the smallest taker, if records disagree.
    fn takers(&self) -> BTreeMap<PeerName, PeerName> {
        let mut takers = BTreeMap::new();
        for (&t, r) in &self.state.records {
            for &c in &r.claims.done {
                if c != t {
                    let e = takers.entry(c).or_insert(t);
                    *e = (*e).min(t);
                }
            }
        }
        takers
    }

    /// The claimer a vote for `claimer` on `gone` counts for: `claimer`, or where its yields
    /// lead. A claimer that was itself reclaimed (it vanished for good before it could win)
    /// passes its claims on to the peer that took it over, as it does its space.
    fn vote_goes_to(
        &self,
        gone: PeerName,
        mut claimer: PeerName,
        takers: &BTreeMap<PeerName, PeerName>,
    ) -> PeerName {
        // Yields go to smaller names and each takeover is of a peer that is gone, so this
        // ends; the bound is for corrupt or contradictory records.
        for _ in 0..2 * self.state.records.len() + 2 {
            if let Some(&taker) = takers.get(&claimer) {
                claimer = taker;
                continue;
            }
            let next = self
                .state
                .records
                .get(&claimer)
                .and_then(|r| r.claims.yielded.get(&gone));
            match next {
                // A yield to a peer that was taken over since leads to its taker.
                Some(&to) if to < claimer && takers.get(&to) != Some(&claimer) => claimer = to,
                _ => break,
            }
        }
        claimer
    }

    /// Votes of the electorate (without `gone`) on `gone` that count for `claimer`.
    fn votes_for(
        &self,
        gone: PeerName,
        claimer: PeerName,
        electorate: &BTreeSet<PeerName>,
        takers: &BTreeMap<PeerName, PeerName>,
    ) -> usize {
        electorate
            .iter()
            .filter(|v| {
                self.state
                    .records
                    .get(v)
                    .and_then(|r| r.claims.votes.get(&gone))
                    .is_some_and(|&c| self.vote_goes_to(gone, c, takers) == claimer)
            })
            .count()
    }

    /// Every peer that takes part in reclaim votes, in our view, without `gone`: the peers that
    /// own space. A founder that owns nothing any more (it handed everything over with `meshctl
    /// reset`) has no say: counting it would leave every later reclaim one vote short for good.
    fn electorate(&self, gone: PeerName) -> BTreeSet<PeerName> {
        let mut e: BTreeSet<PeerName> = BTreeSet::new();
        for ring in &self.state.rings {
            e.extend(ring.owners());
        }
        if let Some(universe) = self.ring(self.config.universe) {
            e.extend(universe.owners());
        }
        e.remove(&gone);
        e
    }

    fn owns_space(&self, peer: PeerName) -> bool {
        self.ring(self.config.universe)
            .into_iter()
            .chain(self.state.rings.iter().cloned())
            .any(|r| r.owners().contains(&peer))
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
        let mut changed = false;
        // An owner we never saw reachable (we restarted, or joined, after it vanished) is
        // unreachable from the first time we look; else its space would wait for peers that
        // saw it leave, and after enough restarts and newcomers nobody would vote on it.
        for x in self.electorate(self.me) {
            if !self.reachable.contains(&x) {
                self.unreachable_since.entry(x).or_insert(now);
            }
        }
        // Claim: the smallest reachable peer (or us) claims every owner gone for long enough.
        let smallest = self.reachable.iter().copied().chain([self.me]).min();
        if smallest == Some(self.me) {
            let owners: BTreeSet<PeerName> = self.electorate(self.me);
            for x in owners {
                if self.unreachable_long_enough(now, x, false) {
                    let rec = self.state.records.entry(self.me).or_default();
                    changed |= rec.claims.claim(x, false);
                }
            }
        }
        // Vote: once per vanished peer, for the smallest claimer we see.
        let mut claimers: BTreeMap<PeerName, (PeerName, bool)> = BTreeMap::new();
        for (c, r) in &self.state.records {
            for (&x, &forced) in &r.claims.claims {
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
        // Yield: to a smaller claimer of the same peer, unless we took it over already.
        let mine: Vec<PeerName> = self.state.records[&self.me]
            .claims
            .claims
            .keys()
            .copied()
            .collect();
        let takers = self.takers();
        for &x in &mine {
            let own = &self.state.records[&self.me].claims;
            if own.done.contains(&x) || own.yielded.contains_key(&x) {
                continue;
            }
            let smaller = self
                .state
                .records
                .iter()
                .filter(|(c, r)| {
                    **c < self.me && r.claims.claims.contains_key(&x) && !takers.contains_key(c)
                })
                .map(|(c, _)| *c)
                .min();
            if let Some(to) = smaller {
                let rec = self.state.records.get_mut(&self.me).expect("own record");
                rec.claims.yielded.insert(x, to);
                changed = true;
            }
        }
        // Win: take over once a majority of the electorate voted for us (directly or through
        // claimers that yielded to us).
        // No takeover happened since `takers` was read: yields don't make any.
        for x in mine {
            let own = &self.state.records[&self.me].claims;
            if own.done.contains(&x)
                || self.vote_goes_to(x, self.me, &takers) != self.me
                || !self.owns_space(x)
            {
                continue;
            }
            // Votes are for good, but a claim wins only while its peer is still gone for us: a
            // peer that came back keeps its space, however the electorate shrinks later.
            let forced = self.state.records[&self.me].claims.claims[&x];
            if !self.unreachable_long_enough(now, x, forced) {
                continue;
            }
            let electorate = self.electorate(x);
            let votes = self.votes_for(x, self.me, &electorate, &takers);
            if votes * 2 <= electorate.len() {
                continue;
            }
            let mut rings = std::mem::take(&mut self.state.rings);
            if let Some(u) = self.ring(self.config.universe) {
                if !rings.iter().any(|r| r.subnet() == u.subnet()) {
                    rings.push(u);
                }
            }
            for ring in &mut rings {
                ring.transfer(x, self.me);
            }
            rings.sort_by_key(|r| r.subnet());
            self.state.rings = rings;
            // Claims `x` made and had not won pass to us, with the votes they got (see
            // `vote_goes_to`).
            let inherited: Vec<(PeerName, bool)> = self
                .state
                .records
                .get(&x)
                .map(|r| {
                    r.claims
                        .claims
                        .iter()
                        .filter(|(y, _)| !r.claims.done.contains(y) && **y != self.me)
                        .map(|(&y, &forced)| (y, forced))
                        .collect()
                })
                .unwrap_or_default();
            let rec = self.state.records.get_mut(&self.me).expect("own record");
            rec.claims.done.insert(x);
            for (y, forced) in inherited {
                rec.claims.claim(y, forced);
            }
            changed = true;
            self.events.push_back(IpamEvent::Reclaimed { peer: x });
        }
        if changed {
            let rec = self.state.records.get_mut(&self.me).expect("own record");
            rec.version += 1;
            self.changed = true;
            self.dirty = true;
        }
    }

    pub(super) fn claims_status(&self) -> Vec<String> {
        let mut out = Vec::new();
        let takers = self.takers();
        for (c, r) in &self.state.records {
            for (x, forced) in &r.claims.claims {
                let electorate = self.electorate(*x);
                let votes = self.votes_for(*x, *c, &electorate, &takers);
                let state = if r.claims.done.contains(x) {
                    "taken over".to_string()
                } else if let Some(taker) = takers.get(c) {
                    format!("passed to {taker}, which took {c} over")
                } else if let Some(to) = r.claims.yielded.get(x) {
                    format!("yielded to {to}")
                } else {
                    format!(
                        "{votes} of {} votes, needs {}",
                        electorate.len(),
                        electorate.len() / 2 + 1
                    )
                };
                let how = if *forced { "rmpeer" } else { "unreachable" };
                out.push(format!("{c} claims {x} ({how}): {state}"));
            }
        }
        out
    }
}

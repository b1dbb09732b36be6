//! Agreement on the first ring: single-decree Paxos carried by gossip.
//!
//! Before any address is handed out, the initial peers must agree who splits the universe. With
//! `--ipalloc-init consensus=N` every participant gossips its acceptor state ([`Node`]); a peer
//! that wants an address proposes the set of participants it knows. Once a quorum (N/2+1) has
//! accepted one ballot, that member list is the genesis, and every peer derives the same rings
//! from it (`Ring::genesis`). `seed=` skips the vote (every peer is given the same list) and
//! `observer` never takes part: it waits for a genesis and then asks for space.
//!
//! Each node's state only moves forward (higher promise, higher accepted ballot), so merging
//! per node by that order is a CRDT, like the rest of IPAM's gossip. Not here: timers and the
//! decision when to propose (`mod.rs`). Weave equivalent: `ipam/paxos/paxos.go`.
//!
//! Safety needs every participant to use the same N: two quorums of N/2+1 out of more than N
//! participants need not intersect. Status names the participants so a mismatch shows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::peer::PeerName;

/// A proposal number: higher rounds win; ties go to the larger proposer name.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct Ballot {
    /// Grows with every attempt.
    pub round: u64,
    /// Who proposes.
    pub proposer: PeerName,
}

impl Default for Ballot {
    fn default() -> Ballot {
        Ballot {
            round: 0,
            proposer: PeerName(0),
        }
    }
}

/// One participant's acceptor state; only that participant writes it.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Node {
    /// The highest ballot it promised.
    pub promised: Ballot,
    /// The last ballot it accepted, with the member list proposed in it.
    pub accepted: Option<(Ballot, Vec<PeerName>)>,
}

impl Node {
    fn order(&self) -> (Ballot, Option<Ballot>) {
        (self.promised, self.accepted.as_ref().map(|(b, _)| *b))
    }
}

/// The acceptor states of all participants we heard of.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Consensus {
    /// Per participant.
    pub nodes: BTreeMap<PeerName, Node>,
}

impl Consensus {
    /// Merges another copy: per node, the one further along wins. Returns whether ours changed.
    /// Our own node is never taken from others (it only moves by our own steps).
    pub fn merge(&mut self, me: PeerName, other: &Consensus) -> bool {
        let mut changed = false;
        for (name, theirs) in &other.nodes {
            if *name == me {
                continue;
            }
            match self.nodes.get(name) {
                Some(ours) if ours.order() >= theirs.order() => {}
                _ => {
                    self.nodes.insert(*name, theirs.clone());
                    changed = true;
                }
            }
        }
        changed
    }

    /// Our acceptor step: promise the highest ballot seen, accept the highest accepted value
    /// whose ballot is at least our promise. Returns whether our node changed.
    pub fn accept_step(&mut self, me: PeerName) -> bool {
        let max_promise = self.nodes.values().map(|n| n.promised).max();
        let best_accept = self
            .nodes
            .values()
            .filter_map(|n| n.accepted.clone())
            .max_by_key(|(b, _)| *b);
        let node = self.nodes.entry(me).or_default();
        let before = node.clone();
        if let Some(p) = max_promise {
            node.promised = node.promised.max(p);
        }
        if let Some((b, v)) = best_accept {
            let newer = node.accepted.as_ref().is_none_or(|(ours, _)| *ours < b);
            if b >= node.promised && newer {
                node.accepted = Some((b, v));
                node.promised = b;
            }
        }
        *node != before
    }

    /// Starts a new ballot of ours, above every round seen.
    pub fn propose(&mut self, me: PeerName) -> Ballot {
        let round = self
            .nodes
            .values()
            .flat_map(|n| [Some(n.promised), n.accepted.as_ref().map(|(b, _)| *b)])
            .flatten()
            .map(|b| b.round)
            .max()
            .unwrap_or(0)
            + 1;
        let ballot = Ballot {
            round,
            proposer: me,
        };
        self.nodes.entry(me).or_default().promised = ballot;
        ballot
    }

    /// Our proposer step for `ballot`: once a quorum promised it, accept a value (the highest
    /// accepted among them, or all participants we know). Returns whether our node changed.
    pub fn proposer_step(&mut self, me: PeerName, ballot: Ballot, quorum: usize) -> bool {
        if self.nodes.get(&me).is_none_or(|n| n.promised != ballot) {
            return false;
        }
        if self
            .nodes
            .get(&me)
            .and_then(|n| n.accepted.as_ref())
            .map(|(b, _)| *b)
            == Some(ballot)
        {
            return false;
        }
        let promised: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| n.promised == ballot)
            .collect();
        if promised.len() < quorum {
            return false;
        }
        let value = promised
            .iter()
            .filter_map(|n| n.accepted.clone())
            .max_by_key(|(b, _)| *b)
            .map(|(_, v)| v)
            .unwrap_or_else(|| self.nodes.keys().copied().collect());
        let node = self.nodes.entry(me).or_default();
        node.accepted = Some((ballot, value));
        true
    }

    /// The member list a quorum accepted in one ballot, if any.
    pub fn decided(&self, quorum: usize) -> Option<Vec<PeerName>> {
        let mut counts: BTreeMap<Ballot, (usize, &Vec<PeerName>)> = BTreeMap::new();
        for n in self.nodes.values() {
            if let Some((b, v)) = &n.accepted {
                counts.entry(*b).or_insert((0, v)).0 += 1;
            }
        }
        counts
            .into_values()
            .find(|(count, _)| *count >= quorum)
            .map(|(_, v)| v.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs rounds of full gossip among `n` nodes where `proposers` propose; returns decisions.
    fn run(n: u64, proposers: &[u64], quorum: usize) -> Vec<Option<Vec<PeerName>>> {
        let names: Vec<PeerName> = (1..=n).map(PeerName).collect();
        let mut copies: Vec<Consensus> = vec![Consensus::default(); n as usize];
        for (i, c) in copies.iter_mut().enumerate() {
            c.nodes.insert(names[i], Node::default());
        }
        let mut ballots = BTreeMap::new();
        for &p in proposers {
            let i = (p - 1) as usize;
            ballots.insert(i, copies[i].propose(names[i]));
        }
        for _ in 0..10 {
            for i in 0..copies.len() {
                for j in 0..copies.len() {
                    let other = copies[j].clone();
                    copies[i].merge(names[i], &other);
                }
                copies[i].accept_step(names[i]);
                if let Some(b) = ballots.get(&i) {
                    copies[i].proposer_step(names[i], *b, quorum);
                }
            }
        }
        copies.iter().map(|c| c.decided(quorum)).collect()
    }

    #[test]
    fn competing_proposers_decide_one_member_list() {
        let decisions = run(5, &[1, 4, 5], 3);
        let first = decisions[0].clone().expect("decided");
        assert_eq!(first.len(), 5);
        assert!(decisions.iter().all(|d| d.as_ref() == Some(&first)));
    }

    #[test]
    fn a_lone_peer_decides_alone_with_quorum_one() {
        let mut c = Consensus::default();
        let me = PeerName(7);
        let b = c.propose(me);
        assert!(c.proposer_step(me, b, 1));
        assert_eq!(c.decided(1), Some(vec![me]));
    }
}

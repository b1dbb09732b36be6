//! The ring: which peer owns which part of one subnet, as a CRDT that only owners change.
//!
//! A ring is a sorted set of tokens. The entry at token `t` says who owns the addresses from `t`
//! up to the next token (or the end of the subnet). Every peer holds a copy and merges the copies
//! of others: per token, the higher version wins. A token is never removed.
//!
//! Only the owner of an entry writes it, and always with a higher version: to give part of its
//! range away ([`Ring::donate`]) or all of it ([`Ring::transfer`], also used by a quorum-agreed
//! reclaim, see `claims.rs`). Because the owner of a range is the only one who may split it, and
//! because rings travel whole, a view that holds an entry also holds every token its writer knew,
//! so two peers never both believe they own the same address.
//!
//! Not here: which addresses are in use (`allocator.rs`), agreement on the first ring
//! (`consensus.rs`). Invariants: `merge` is commutative, associative and idempotent for rings
//! that descend from the same genesis (property tests below); tokens lie inside the subnet and
//! the first token is the subnet's first address. Weave equivalent: `ipam/ring/ring.go`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::space::{Cidr, Range};
use crate::peer::PeerName;

/// Who owns the addresses from one token to the next, and how often that changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Entry {
    /// The owner.
    pub owner: PeerName,
    /// Grows with every change; the higher version wins a merge.
    pub version: u64,
}

/// The ownership of one subnet.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Ring {
    subnet: Cidr,
    entries: BTreeMap<u64, Entry>,
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
                },
            );
        }
        Ring { subnet, entries }
    }

    /// The subnet this ring divides.
    pub fn subnet(&self) -> Cidr {
        self.subnet
    }

    /// All entries with their ranges, in address order.
    pub fn entries(&self) -> impl Iterator<Item = (Range, Entry)> + '_ {
        let end = self.subnet.range().end;
        let mut it = self.entries.iter().peekable();
        std::iter::from_fn(move || {
            let (&start, &entry) = it.next()?;
            let next = it.peek().map_or(end, |(&t, _)| t);
            Some((Range { start, end: next }, entry))
        })
    }

    /// The ranges `peer` owns, in address order, adjacent ones joined.
    pub fn owned(&self, peer: PeerName) -> Vec<Range> {
        let mut out: Vec<Range> = Vec::new();
        for (range, entry) in self.entries() {
            if entry.owner != peer {
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
            .map(|(_, e)| e.owner)
    }

    /// Every peer that owns some range.
    pub fn owners(&self) -> std::collections::BTreeSet<PeerName> {
        self.entries.values().map(|e| e.owner).collect()
    }

    /// Gives `range` (inside one entry `me` owns) to `to`. Called only by the owner.
    pub fn donate(&mut self, me: PeerName, range: Range, to: PeerName) -> Result<(), RingError> {
        let not_owned = || RingError::NotOwned { range, me };
        let (entry_range, entry) = self
            .entries()
            .find(|(r, _)| r.contains(range.start))
            .ok_or_else(not_owned)?;
        if entry.owner != me || range.is_empty() || range.end > entry_range.end {
            return Err(not_owned());
        }
        if range.end < entry_range.end {
            // What follows the donated part stays ours: a new token.
            self.entries.insert(
                range.end,
                Entry {
                    owner: me,
                    version: entry.version + 1,
                },
            );
        }
        self.entries.insert(
            range.start,
            Entry {
                owner: to,
                version: entry.version + 1,
            },
        );
        Ok(())
    }

    /// Hands every entry of `from` to `to`, each with a higher version. Called by `from` itself
    /// (reset) or by a claimer that a quorum agreed on (reclaim). Returns how many changed.
    pub fn transfer(&mut self, from: PeerName, to: PeerName) -> usize {
        let mut changed = 0;
        for entry in self.entries.values_mut() {
            if entry.owner == from {
                entry.owner = to;
                entry.version += 1;
                changed += 1;
            }
        }
        changed
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
            if let Some(ours) = self.entries.get(token) {
                if ours.version == theirs.version && ours.owner != theirs.owner {
                    return Err(RingError::Conflict {
                        subnet: self.subnet,
                        token: super::space::ip(*token),
                        ours: ours.owner,
                        theirs: theirs.owner,
                        version: ours.version,
                    });
                }
            }
        }
        let mut changed = false;
        for (token, theirs) in &other.entries {
            let range = self.subnet.range();
            if !range.contains(*token) {
                continue;
            }
            match self.entries.get(token) {
                Some(ours) if ours.version >= theirs.version => {}
                _ => {
                    self.entries.insert(*token, *theirs);
                    changed = true;
                }
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn subnet() -> Cidr {
        "10.2.1.0/24".parse().unwrap()
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
        assert_eq!(ring.transfer(a, b), 2);
        assert!(ring.owned(a).is_empty());
    }

    #[test]
    fn different_geneses_conflict_instead_of_merging() {
        let mut x = Ring::genesis(subnet(), &[PeerName(1)]);
        let y = Ring::genesis(subnet(), &[PeerName(2)]);
        let before = x.clone();
        assert!(matches!(x.merge(&y), Err(RingError::Conflict { .. })));
        assert_eq!(x, before);
    }

    /// Builds copies the way peers do: each op is done by the owner on its own copy, after
    /// merging whatever copies it has heard of. Returns every intermediate copy.
    fn history(ops: &[(u8, u8, u8, u8)]) -> Vec<Ring> {
        let peers: Vec<PeerName> = (1..=4).map(PeerName).collect();
        let mut copies: Vec<Ring> = vec![Ring::genesis(subnet(), &peers); 4];
        let mut seen = Vec::new();
        for &(actor, hear, to, cut) in ops {
            let (actor, hear) = (actor as usize % 4, hear as usize % 4);
            let heard = copies[hear].clone();
            copies[actor].merge(&heard).unwrap();
            let me = peers[actor];
            if let Some(r) = copies[actor].owned(me).first().copied() {
                if r.len() >= 2 {
                    let mid = r.start + 1 + u64::from(cut) % (r.len() - 1);
                    let range = Range {
                        start: mid,
                        end: r.end,
                    };
                    let entry_end = copies[actor]
                        .entries()
                        .find(|(er, _)| er.contains(mid))
                        .map(|(er, _)| er.end)
                        .unwrap();
                    let range = Range {
                        end: range.end.min(entry_end),
                        ..range
                    };
                    copies[actor]
                        .donate(me, range, peers[to as usize % 4])
                        .unwrap();
                }
            }
            seen.push(copies[actor].clone());
        }
        seen
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_idempotent(
            ops in proptest::collection::vec(any::<(u8, u8, u8, u8)>(), 1..40),
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 3),
        ) {
            let seen = history(&ops);
            let a = picks[0].get(&seen).clone();
            let b = picks[1].get(&seen).clone();
            let c = picks[2].get(&seen).clone();
            let merged = |x: &Ring, y: &Ring| { let mut m = x.clone(); m.merge(y).unwrap(); m };
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
            prop_assert_eq!(merged(&a, &a), a.clone());
        }
    }
}

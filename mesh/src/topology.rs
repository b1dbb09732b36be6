//! The mesh's view of who is connected to whom.
//!
//! `Topology` holds one [`Peer`] per router we have heard of, with the connections it last
//! announced. Others' entries change only through [`Topology::apply`], which merges a gossiped
//! update and returns the part that was new to us: that delta is what we pass on, so gossip
//! converges and its per-change cost is the changed entries, not the whole topology.
//!
//! Not here: route computation (`routes.rs`, a pure function of `&Topology`), deciding when to
//! send what (`router.rs`), and anything that touches a socket or the clock.
//!
//! Invariants: our own peer is always present and only we change it (through
//! [`Topology::set_own_connections`], or by bumping its version when someone holds a copy at least
//! as new as ours); a peer's version only grows while the peer is held; unreachable peers leave
//! through [`Topology::gc`], never through `apply`. Weave equivalent: `mesh/peers.go`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::peer::PeerName;

/// Version of a peer's entry, ordered by `incarnation`, then `counter`.
///
/// The incarnation grows across restarts of the peer, so a restarted peer's new state always
/// beats copies of its previous life; the counter grows with every change within one life.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Version {
    /// Which life of the peer this is (the daemon uses its start time in unix seconds).
    pub incarnation: u64,
    /// Changes within this life.
    pub counter: u64,
}

/// One established connection, as announced by the peer at one end of it.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// The peer at the other end.
    pub peer: PeerName,
    /// The other end's address, if known (its listening address when we dialed it).
    pub addr: Option<SocketAddr>,
    /// Whether the announcing peer dialed this connection.
    pub outbound: bool,
}

/// What one peer announces about itself.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's name.
    pub name: PeerName,
    /// Human-readable name (hostname by default).
    pub nickname: String,
    /// Version of this entry; higher wins.
    pub version: Version,
    /// Established connections, sorted by peer name.
    pub connections: Vec<ConnectionInfo>,
}

impl Peer {
    /// Total order used by merge: version first, then content, so that two different entries
    /// with the same version (which a correct peer never produces) still merge deterministically.
    fn merge_cmp(&self, other: &Peer) -> Ordering {
        (self.version, &self.nickname, &self.connections).cmp(&(
            other.version,
            &other.nickname,
            &other.connections,
        ))
    }
}

/// A set of peer entries: a delta or a full state. Gossiped as [`crate::wire::Message::Gossip`].
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct TopologyUpdate {
    /// The entries, at most one per peer, sorted by name.
    pub peers: Vec<Peer>,
}

impl TopologyUpdate {
    /// True when the update carries no entries.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// Our view of the mesh: one entry per known peer, our own included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    me: PeerName,
    peers: BTreeMap<PeerName, Peer>,
}

impl Topology {
    /// A topology that knows only us, with no connections.
    pub fn new(me: PeerName, nickname: String, incarnation: u64) -> Topology {
        let own = Peer {
            name: me,
            nickname,
            version: Version {
                incarnation,
                counter: 0,
            },
            connections: Vec::new(),
        };
        Topology {
            me,
            peers: BTreeMap::from([(me, own)]),
        }
    }

    /// Our own name.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// Our own entry.
    pub fn own(&self) -> &Peer {
        self.peers
            .get(&self.me)
            .expect("invariant: our own entry is always present")
    }

    /// The entry for `name`, if we know it.
    pub fn peer(&self, name: PeerName) -> Option<&Peer> {
        self.peers.get(&name)
    }

    /// All known peers, sorted by name.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> + '_ {
        self.peers.values()
    }

    /// Number of known peers, us included.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Always false: we always know ourselves. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Everything we know, to send to a new neighbour or in periodic gossip.
    pub fn full_state(&self) -> TopologyUpdate {
        TopologyUpdate {
            peers: self.peers.values().cloned().collect(),
        }
    }

    /// Replaces our own connection list (sorted here) and bumps our version if it changed.
    /// Returns the delta to gossip, or `None` if nothing changed.
    pub fn set_own_connections(
        &mut self,
        mut connections: Vec<ConnectionInfo>,
    ) -> Option<TopologyUpdate> {
        connections.sort();
        connections.dedup_by_key(|c| c.peer);
        let me = self.me;
        let own = self
            .peers
            .get_mut(&me)
            .expect("invariant: our own entry is always present");
        if own.connections == connections {
            return None;
        }
        own.connections = connections;
        own.version.counter = own.version.counter.saturating_add(1);
        Some(TopologyUpdate {
            peers: vec![own.clone()],
        })
    }

    /// Merges a gossiped update; returns the entries that were new to us (the delta to pass on).
    ///
    /// Per peer the higher version wins. Our own entry is never replaced: if the update holds a
    /// copy of us at least as new as ours (we restarted within one incarnation, or our clock went
    /// back), we bump our version past it and include our entry in the delta, so ours wins.
    pub fn apply(&mut self, update: TopologyUpdate) -> Option<TopologyUpdate> {
        let mut changed = BTreeSet::new();
        for incoming in update.peers {
            if incoming.name == self.me {
                if self.outrank_copy_of_us(&incoming) {
                    changed.insert(self.me);
                }
                continue;
            }
            let newer = match self.peers.get(&incoming.name) {
                Some(held) => incoming.merge_cmp(held) == Ordering::Greater,
                None => true,
            };
            if newer {
                changed.insert(incoming.name);
                self.peers.insert(incoming.name, incoming);
            }
        }
        if changed.is_empty() {
            return None;
        }
        Some(TopologyUpdate {
            peers: changed
                .iter()
                .map(|name| self.peers[name].clone())
                .collect(),
        })
    }

    /// Bumps our own version above `copy` if `copy` is at least as new and not an exact echo of
    /// our entry. Returns whether it did.
    fn outrank_copy_of_us(&mut self, copy: &Peer) -> bool {
        let me = self.me;
        let own = self
            .peers
            .get_mut(&me)
            .expect("invariant: our own entry is always present");
        // An exact echo of our entry is not news; a different entry at our version, or any
        // higher version, comes from a previous life of ours and must be outranked.
        let echo = copy.version == own.version
            && copy.nickname == own.nickname
            && copy.connections == own.connections;
        if copy.version < own.version || echo {
            return false;
        }
        own.version = Version {
            incarnation: copy.version.incarnation,
            counter: copy.version.counter.saturating_add(1),
        };
        true
    }

    /// Whether `a` and `b` both announce a connection to each other.
    pub fn symmetric(&self, a: PeerName, b: PeerName) -> bool {
        let lists = |x: PeerName, y: PeerName| {
            self.peers
                .get(&x)
                .is_some_and(|p| p.connections.iter().any(|c| c.peer == y))
        };
        lists(a, b) && lists(b, a)
    }

    /// `name`'s neighbours over symmetric connections, sorted by name.
    pub fn neighbours(&self, name: PeerName) -> Vec<PeerName> {
        let Some(peer) = self.peers.get(&name) else {
            return Vec::new();
        };
        let mut out: Vec<PeerName> = peer
            .connections
            .iter()
            .map(|c| c.peer)
            .filter(|&other| other != name && self.symmetric(name, other))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Peers reachable from `from` over symmetric connections, `from` included if known.
    pub fn reachable(&self, from: PeerName) -> BTreeSet<PeerName> {
        let mut seen = BTreeSet::new();
        if !self.peers.contains_key(&from) {
            return seen;
        }
        let mut queue = VecDeque::from([from]);
        seen.insert(from);
        while let Some(name) = queue.pop_front() {
            for next in self.neighbours(name) {
                if seen.insert(next) {
                    queue.push_back(next);
                }
            }
        }
        seen
    }

    /// Removes peers not reachable from `me` over symmetric connections; returns their names.
    pub fn gc(&mut self, me: PeerName) -> Vec<PeerName> {
        let keep = self.reachable(me);
        let removed: Vec<PeerName> = self
            .peers
            .keys()
            .filter(|name| !keep.contains(name) && **name != self.me)
            .copied()
            .collect();
        for name in &removed {
            self.peers.remove(name);
        }
        removed
    }

    /// Addresses other peers announce for `name` (from their connection lists).
    pub fn addresses_of(&self, name: PeerName) -> BTreeSet<SocketAddr> {
        self.peers
            .values()
            .flat_map(|p| p.connections.iter())
            .filter(|c| c.peer == name)
            .filter_map(|c| c.addr)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(x: u64) -> PeerName {
        PeerName(x)
    }

    fn peer(name: u64, counter: u64, conns: &[u64]) -> Peer {
        Peer {
            name: n(name),
            nickname: format!("p{name}"),
            version: Version {
                incarnation: 1,
                counter,
            },
            connections: conns
                .iter()
                .map(|&c| ConnectionInfo {
                    peer: n(c),
                    addr: None,
                    outbound: name < c,
                })
                .collect(),
        }
    }

    fn update(peers: Vec<Peer>) -> TopologyUpdate {
        TopologyUpdate { peers }
    }

    #[test]
    fn apply_returns_only_what_was_new() {
        let mut t = Topology::new(n(1), "me".into(), 1);
        let delta = t.apply(update(vec![peer(2, 3, &[1]), peer(3, 1, &[])]));
        assert_eq!(delta.map(|d| d.peers.len()), Some(2));
        // Same again: nothing new.
        assert_eq!(t.apply(update(vec![peer(2, 3, &[1])])), None);
        // Older copy loses, newer copy wins and is the whole delta.
        assert_eq!(t.apply(update(vec![peer(2, 2, &[])])), None);
        let delta = t.apply(update(vec![peer(2, 4, &[]), peer(3, 1, &[])]));
        assert_eq!(delta, Some(update(vec![peer(2, 4, &[])])));
    }

    #[test]
    fn our_own_entry_wins_over_copies_of_us() {
        let mut t = Topology::new(n(1), "me".into(), 5);
        // A stale copy from our previous life is ignored.
        let stale = Peer {
            version: Version {
                incarnation: 4,
                counter: 99,
            },
            ..peer(1, 0, &[7])
        };
        assert_eq!(t.apply(update(vec![stale])), None);
        assert!(t.own().connections.is_empty());
        // A copy as new as ours (same incarnation) makes us bump past it.
        let same = Peer {
            version: Version {
                incarnation: 5,
                counter: 3,
            },
            ..peer(1, 0, &[7])
        };
        let delta = t
            .apply(update(vec![same]))
            .expect("our entry is in the delta");
        assert_eq!(delta.peers[0].name, n(1));
        assert!(delta.peers[0].connections.is_empty());
        // An exact echo of our entry is not news.
        let echo = t.own().clone();
        assert_eq!(t.apply(update(vec![echo])), None);
        assert_eq!(
            t.own().version,
            Version {
                incarnation: 5,
                counter: 4
            }
        );
    }

    #[test]
    fn set_own_connections_bumps_only_on_change() {
        let mut t = Topology::new(n(1), "me".into(), 1);
        let conns = peer(1, 0, &[2]).connections;
        assert!(t.set_own_connections(conns.clone()).is_some());
        assert_eq!(t.own().version.counter, 1);
        assert!(t.set_own_connections(conns).is_none());
        assert_eq!(t.own().version.counter, 1);
    }

    #[test]
    fn gc_removes_peers_without_symmetric_path() {
        let mut t = Topology::new(n(1), "me".into(), 1);
        t.set_own_connections(peer(1, 0, &[2]).connections);
        // 2 <-> 1 symmetric; 3 claims 2 but 2 doesn't list 3; 4 is isolated.
        t.apply(update(vec![
            peer(2, 1, &[1]),
            peer(3, 1, &[2]),
            peer(4, 1, &[]),
        ]));
        assert_eq!(t.gc(n(1)), vec![n(3), n(4)]);
        assert_eq!(t.peers().map(|p| p.name).collect::<Vec<_>>(), [n(1), n(2)]);
    }

    fn arb_peer() -> impl Strategy<Value = Peer> {
        (
            2u64..6,
            0u64..4,
            0u64..3,
            proptest::collection::vec(1u64..6, 0..4),
        )
            .prop_map(|(name, counter, nick, conns)| Peer {
                nickname: format!("n{nick}"),
                ..peer(name, counter, &conns)
            })
    }

    fn arb_update() -> impl Strategy<Value = TopologyUpdate> {
        proptest::collection::vec(arb_peer(), 0..5).prop_map(update)
    }

    fn merged(updates: &[&TopologyUpdate]) -> Topology {
        let mut t = Topology::new(n(1), "me".into(), 1);
        for u in updates {
            t.apply((*u).clone());
        }
        t
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in arb_update(), b in arb_update()) {
            prop_assert_eq!(merged(&[&a, &b]), merged(&[&b, &a]));
        }

        #[test]
        fn merge_is_associative(a in arb_update(), b in arb_update(), c in arb_update()) {
            // (a + b) + c == a + (b + c): merge b and c first into one update, then apply it.
            let mut bc = Topology::new(n(1), "me".into(), 1);
            bc.apply(b.clone());
            bc.apply(c.clone());
            let bc_update = TopologyUpdate {
                peers: bc.peers().filter(|p| p.name != n(1)).cloned().collect(),
            };
            prop_assert_eq!(merged(&[&a, &b, &c]), merged(&[&a, &bc_update]));
        }

        #[test]
        fn merge_is_idempotent(a in arb_update()) {
            let mut t = merged(&[&a]);
            let before = t.clone();
            prop_assert_eq!(t.apply(a.clone()), None);
            prop_assert_eq!(t, before);
        }

        #[test]
        fn delta_carries_everything_that_changed(a in arb_update(), b in arb_update()) {
            // Applying b's delta to a copy of the pre-b state yields the same result as applying b.
            let mut t = merged(&[&a]);
            let mut copy = t.clone();
            if let Some(delta) = t.apply(b.clone()) {
                copy.apply(delta);
            }
            prop_assert_eq!(t, copy);
        }
    }
}

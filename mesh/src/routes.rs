//! Routes: next hops and broadcast trees, as pure functions of a [`Topology`].
//!
//! Only symmetric connections count (A lists B and B lists A), so a half-announced connection
//! never carries traffic. All searches are breadth-first, visiting neighbours in ascending name
//! order, so every peer holding the same topology computes the same trees: each broadcast frame
//! then reaches every peer exactly once.
//!
//! Cost: one breadth-first search is O(N + E) over an index built for it (names to dense
//! numbers, so the inner loop does no tree lookups). Unicast routes take one search from us;
//! the broadcast children for one source take one search from that source, so the router
//! computes them only on demand ([`broadcast`]) instead of for every source after every change,
//! which would be O(N·(N + E)) and dominated everything at thousands of peers.
//!
//! Not here: the topology itself (`topology.rs`) and when to recompute (`router.rs`, shortly
//! after a topology change). No state, no locks. Weave equivalent: `mesh/routes.go`.

use std::collections::{BTreeMap, VecDeque};

use crate::peer::PeerName;
use crate::topology::{NameMap, Peer, Topology};

/// Dense numbering of a topology's peers, for searches.
struct Index<'a> {
    peers: Vec<&'a Peer>,
    names: Vec<PeerName>,
    number: NameMap<u32>,
}

impl<'a> Index<'a> {
    fn new(topo: &'a Topology) -> Index<'a> {
        let peers: Vec<&Peer> = topo.peers().collect();
        let names: Vec<PeerName> = peers.iter().map(|p| p.name).collect();
        let mut number = NameMap::default();
        number.reserve(names.len());
        for (i, &name) in names.iter().enumerate() {
            number.insert(name, i as u32);
        }
        Index {
            peers,
            names,
            number,
        }
    }

    /// Breadth-first search from `root` over symmetric connections, neighbours in ascending
    /// name order. Returns each peer's parent (`u32::MAX` for the root and unreached peers).
    fn parents(&self, root: PeerName) -> Vec<u32> {
        let mut parent = vec![u32::MAX; self.names.len()];
        let Some(&r) = self.number.get(&root) else {
            return parent;
        };
        let mut seen = vec![false; self.names.len()];
        seen[r as usize] = true;
        let mut queue = VecDeque::from([r]);
        // HOT PATH: runs over every connection of every reached peer.
        while let Some(x) = queue.pop_front() {
            let peer = self.peers[x as usize];
            let name = peer.name;
            for c in &peer.connections {
                let Some(&y) = self.number.get(&c.peer) else {
                    continue;
                };
                if seen[y as usize] || c.peer == name {
                    continue;
                }
                if self.peers[y as usize].lists(name) {
                    seen[y as usize] = true;
                    parent[y as usize] = x;
                    queue.push_back(y);
                }
            }
        }
        parent
    }
}

/// Next hop from `me` for every peer reachable from `me` (not including `me`).
pub fn unicast(topo: &Topology, me: PeerName) -> BTreeMap<PeerName, PeerName> {
    let index = Index::new(topo);
    let parent = index.parents(me);
    let Some(&root) = index.number.get(&me) else {
        return BTreeMap::new();
    };
    // First hop of each peer: itself if its parent is the root, else its parent's first hop.
    // Resolved with a memo so the whole pass stays linear.
    let mut hop = vec![u32::MAX; parent.len()];
    let mut out = BTreeMap::new();
    let mut chain = Vec::new();
    for dest in 0..parent.len() {
        if parent[dest] == u32::MAX {
            continue;
        }
        let mut x = dest as u32;
        while hop[x as usize] == u32::MAX {
            if parent[x as usize] == root {
                hop[x as usize] = x;
                break;
            }
            chain.push(x);
            x = parent[x as usize];
        }
        let first = hop[x as usize];
        for y in chain.drain(..) {
            hop[y as usize] = first;
        }
        out.insert(index.names[dest], index.names[first as usize]);
    }
    out
}

/// The neighbours `me` forwards a broadcast from `source` to: `me`'s children in the
/// shortest-path tree rooted at `source`, sorted by name. Empty if `me` is not in that tree.
pub fn broadcast(topo: &Topology, me: PeerName, source: PeerName) -> Vec<PeerName> {
    let index = Index::new(topo);
    let Some(&m) = index.number.get(&me) else {
        return Vec::new();
    };
    let mut children: Vec<PeerName> = index
        .parents(source)
        .iter()
        .enumerate()
        .filter(|&(_, &p)| p == m)
        .map(|(child, _)| index.names[child])
        .collect();
    children.sort();
    children
}

/// Broadcast children for every source reachable from `me`: O(N·(N + E)). For the daemon's
/// forwarding table at the sizes one machine sees (hundreds of peers); never on every change
/// inside the router.
pub fn broadcast_all(topo: &Topology, me: PeerName) -> BTreeMap<PeerName, Vec<PeerName>> {
    let mut sources: Vec<PeerName> = unicast(topo, me).into_keys().collect();
    sources.push(me);
    sources
        .into_iter()
        .map(|source| (source, broadcast(topo, me, source)))
        .collect()
}

/// The unicast routes of one peer, recomputed shortly after every topology change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    /// Next hop for every reachable peer.
    pub unicast: BTreeMap<PeerName, PeerName>,
}

impl Routes {
    /// Computes the unicast routes for `me`.
    pub fn compute(topo: &Topology, me: PeerName) -> Routes {
        Routes {
            unicast: unicast(topo, me),
        }
    }

    /// Whether `peer` is reachable (we are, trivially).
    pub fn reaches(&self, me: PeerName, peer: PeerName) -> bool {
        peer == me || self.unicast.contains_key(&peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{ConnectionInfo, Peer, TopologyUpdate, Version};
    use std::sync::Arc;

    fn n(x: u64) -> PeerName {
        PeerName(x)
    }

    /// Builds a topology seen from peer 1 where each `(peer, [neighbours])` lists its connections.
    fn topo(entries: &[(u64, &[u64])]) -> Topology {
        let mut t = Topology::new(n(1), "1".into(), 1);
        let peers = entries
            .iter()
            .map(|(name, conns)| Peer {
                name: n(*name),
                nickname: name.to_string(),
                version: Version {
                    incarnation: 1,
                    counter: 1,
                },
                connections: conns
                    .iter()
                    .map(|&c| ConnectionInfo {
                        peer: n(c),
                        addr: None,
                        outbound: true,
                    })
                    .collect(),
            })
            .map(Arc::new)
            .collect::<Vec<_>>();
        let own = peers.iter().find(|p| p.name == n(1)).cloned();
        if let Some(own) = own {
            t.set_own_connections(own.connections.clone());
        }
        t.apply(TopologyUpdate { peers });
        t
    }

    #[test]
    fn line_routes_through_the_middle() {
        // 1 - 2 - 3
        let t = topo(&[(1, &[2]), (2, &[1, 3]), (3, &[2])]);
        let u = unicast(&t, n(1));
        assert_eq!(u, BTreeMap::from([(n(2), n(2)), (n(3), n(2))]));
        assert_eq!(broadcast(&t, n(1), n(1)), [n(2)]);
        assert_eq!(broadcast(&t, n(2), n(1)), [n(3)]);
        assert_eq!(broadcast(&t, n(3), n(1)), Vec::<PeerName>::new());
        assert_eq!(broadcast(&t, n(2), n(3)), [n(1)]);
        let all = broadcast_all(&t, n(1));
        assert_eq!(all.len(), 3);
        assert_eq!(all[&n(3)], Vec::<PeerName>::new());
    }

    #[test]
    fn square_breaks_ties_by_name() {
        // 1 - 2
        // |   |
        // 4 - 3
        let t = topo(&[(1, &[2, 4]), (2, &[1, 3]), (3, &[2, 4]), (4, &[1, 3])]);
        assert_eq!(
            unicast(&t, n(1)),
            BTreeMap::from([(n(2), n(2)), (n(3), n(2)), (n(4), n(4))])
        );
        // Broadcast from 1: 1 -> {2, 4}; 3 is reached via 2 only (smaller name first).
        assert_eq!(broadcast(&t, n(1), n(1)), [n(2), n(4)]);
        assert_eq!(broadcast(&t, n(2), n(1)), [n(3)]);
        assert_eq!(broadcast(&t, n(4), n(1)), Vec::<PeerName>::new());
        // Every peer other than the source is some peer's child exactly once.
        for source in 1..=4 {
            let mut reached: Vec<PeerName> = (1..=4)
                .flat_map(|me| broadcast(&t, n(me), n(source)))
                .collect();
            reached.sort();
            let expected: Vec<PeerName> = (1..=4).filter(|&x| x != source).map(n).collect();
            assert_eq!(reached, expected, "source {source}");
        }
    }

    #[test]
    fn partition_leaves_other_side_unreachable() {
        // 1 - 2    3 - 4
        let t = topo(&[(1, &[2]), (2, &[1]), (3, &[4]), (4, &[3])]);
        assert_eq!(unicast(&t, n(1)), BTreeMap::from([(n(2), n(2))]));
        assert_eq!(
            broadcast_all(&t, n(1)).keys().copied().collect::<Vec<_>>(),
            [n(1), n(2)]
        );
    }

    #[test]
    fn asymmetric_connection_is_ignored() {
        // 2 lists 3, but 3 does not list 2.
        let t = topo(&[(1, &[2]), (2, &[1, 3]), (3, &[])]);
        assert_eq!(unicast(&t, n(1)), BTreeMap::from([(n(2), n(2))]));
        assert_eq!(broadcast(&t, n(2), n(1)), Vec::<PeerName>::new());
    }
}

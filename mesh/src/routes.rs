//! Routes: next hops and broadcast trees, as pure functions of a [`Topology`].
//!
//! Only symmetric connections count (A lists B and B lists A), so a half-announced connection
//! never carries traffic. All searches are breadth-first, visiting neighbours in ascending name
//! order, so every peer holding the same topology computes the same trees: each broadcast frame
//! then reaches every peer exactly once.
//!
//! Not here: the topology itself (`topology.rs`) and when to recompute (`router.rs`, after every
//! topology change). No state, no locks. Weave equivalent: `mesh/routes.go`.

use std::collections::{BTreeMap, VecDeque};

use crate::peer::PeerName;
use crate::topology::Topology;

/// Shortest-path tree rooted at `root`: each reached peer (except the root) mapped to its parent.
fn tree(topo: &Topology, root: PeerName) -> BTreeMap<PeerName, PeerName> {
    let mut parent = BTreeMap::new();
    if topo.peer(root).is_none() {
        return parent;
    }
    let mut queue = VecDeque::from([root]);
    while let Some(name) = queue.pop_front() {
        for next in topo.neighbours(name) {
            if next != root && !parent.contains_key(&next) {
                parent.insert(next, name);
                queue.push_back(next);
            }
        }
    }
    parent
}

/// Next hop from `me` for every peer reachable from `me` (not including `me`).
pub fn unicast(topo: &Topology, me: PeerName) -> BTreeMap<PeerName, PeerName> {
    let parent = tree(topo, me);
    let mut hops = BTreeMap::new();
    for &dest in parent.keys() {
        // Walk up to the child of `me`; depth is bounded by the number of peers.
        let mut hop = dest;
        while let Some(&up) = parent.get(&hop) {
            if up == me {
                break;
            }
            hop = up;
        }
        hops.insert(dest, hop);
    }
    hops
}

/// The neighbours `me` forwards a broadcast from `source` to: `me`'s children in the
/// shortest-path tree rooted at `source`, sorted by name. Empty if `me` is not in that tree.
pub fn broadcast(topo: &Topology, me: PeerName, source: PeerName) -> Vec<PeerName> {
    tree(topo, source)
        .into_iter()
        .filter(|&(_, parent)| parent == me)
        .map(|(child, _)| child)
        .collect()
}

/// All routes of one peer, recomputed after every topology change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    /// Next hop for every reachable peer.
    pub unicast: BTreeMap<PeerName, PeerName>,
    /// For every reachable source (us included): the neighbours we forward its broadcasts to.
    pub broadcast: BTreeMap<PeerName, Vec<PeerName>>,
}

impl Routes {
    /// Computes unicast and broadcast routes for `me`.
    pub fn compute(topo: &Topology, me: PeerName) -> Routes {
        let unicast = unicast(topo, me);
        let broadcast = topo
            .reachable(me)
            .into_iter()
            .map(|source| (source, broadcast(topo, me, source)))
            .collect();
        Routes { unicast, broadcast }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{ConnectionInfo, Peer, TopologyUpdate, Version};

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
            .collect::<Vec<_>>();
        let own = peers.iter().find(|p| p.name == n(1)).cloned();
        if let Some(own) = own {
            t.set_own_connections(own.connections);
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
        let r = Routes::compute(&t, n(1));
        assert_eq!(r.broadcast.len(), 3);
        assert_eq!(r.broadcast[&n(3)], Vec::<PeerName>::new());
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
        let r = Routes::compute(&t, n(1));
        assert_eq!(
            r.broadcast.keys().copied().collect::<Vec<_>>(),
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

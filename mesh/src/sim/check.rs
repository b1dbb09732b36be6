//! Safety checkers (after every step) and the loop-free forwarding check of the liveness phase.
//!
//! Safety, for the peer that just handled an input:
//! - its routes form a shortest-path tree of its own view: every next hop is a current
//!   connection and a symmetric neighbour, a direct neighbour is its own next hop, and the
//!   routes cover exactly the peers its view can reach (checked when no delayed route
//!   computation is pending; in between, routes are allowed to lag the view);
//! - versions never go backwards: per observer, a held entry's version never drops;
//! - a data frame from it to a random destination, relayed along every router's *current*
//!   routes (which may disagree while gossip spreads), ends: delivered, dropped for lack of a
//!   route, or dropped at its hop limit. Frames cut by the hop limit are counted.
//!
//! The message size bound is enforced where messages are sent (`Sim::drain`).

use rand::Rng;

use crate::peer::PeerName;
use crate::sim::Sim;
use crate::topology::{NameMap, Version};

/// Per-observer memory of the checkers.
#[derive(Default, Debug)]
pub struct Checker {
    /// Per peer index: the highest version seen for each entry it holds.
    versions: Vec<NameMap<Version>>,
}

impl Checker {
    /// Peer `i` lost its memory (restart): start its history afresh.
    pub(crate) fn forget_node(&mut self, i: usize) {
        if self.versions.len() <= i {
            self.versions.resize_with(i + 1, NameMap::default);
        }
        self.versions[i].clear();
    }
}

/// Safety checks for peer `i` after it handled an input.
pub(crate) fn after_step(sim: &mut Sim, i: usize) -> Result<(), String> {
    let names = sim.names();
    let hop_limit = sim.options().hop_limit;
    let (checker, nodes, rng, stats) = sim.checker_mut();
    let Some(r) = nodes[i].router() else {
        return Ok(());
    };
    let me = r.name();
    let t = r.topology();

    // Versions never go backwards (while held).
    if checker.versions.len() <= i {
        checker.versions.resize_with(i + 1, NameMap::default);
    }
    let seen = &mut checker.versions[i];
    seen.retain(|name, _| t.peer(*name).is_some());
    for p in t.peers() {
        let v = seen.entry(p.name).or_insert(p.version);
        if p.version < *v {
            return Err(format!(
                "peer {i}: version of {} went back from {:?} to {:?}",
                p.name, v, p.version
            ));
        }
        *v = p.version;
    }

    // Routes form a shortest-path tree of the peer's own view.
    if !r.routes_pending() {
        let conns: Vec<PeerName> = r.connections().iter().map(|c| c.peer).collect();
        let neighbours = t.neighbours(me);
        let reachable = t.reachable(me);
        let unicast = &r.routes().unicast;
        if unicast.len() + 1 != reachable.len() {
            return Err(format!(
                "peer {i}: routes to {} peers, but its view reaches {}",
                unicast.len(),
                reachable.len() - 1
            ));
        }
        for (&dest, &hop) in unicast {
            if dest == me || !reachable.contains(&dest) {
                return Err(format!("peer {i}: route to unreachable {dest}"));
            }
            if !conns.contains(&hop) || !neighbours.contains(&hop) {
                return Err(format!(
                    "peer {i}: next hop {hop} to {dest} is not a symmetric connection \
                     (connected: {}, neighbour in view: {}, own entry lists: {:?})",
                    conns.contains(&hop),
                    neighbours.contains(&hop),
                    t.own()
                        .connections
                        .iter()
                        .map(|c| c.peer)
                        .collect::<Vec<_>>()
                ));
            }
            if neighbours.contains(&dest) && hop != dest {
                return Err(format!(
                    "peer {i}: neighbour {dest} routed via {hop}, not directly"
                ));
            }
        }
    }

    // A frame relayed along everyone's current routes ends within its hop limit.
    if let Some(&dest) = {
        let keys: Vec<&PeerName> = r.routes().unicast.keys().collect();
        (!keys.is_empty()).then(|| keys[rng.gen_range(0..keys.len())])
    } {
        stats.frames_traced += 1;
        let mut at = me;
        let mut hops_left = hop_limit;
        loop {
            if at == dest {
                break;
            }
            if hops_left == 0 {
                stats.frames_hop_limited += 1;
                break;
            }
            hops_left -= 1;
            let Some(router) = names.get(&at).and_then(|&j| nodes[j].router()) else {
                break;
            };
            match router.routes().unicast.get(&dest) {
                Some(&next) => at = next,
                None => break,
            }
        }
    }
    Ok(())
}

/// After convergence: from every peer to every other, next hops lead to the destination
/// without visiting any peer twice.
pub fn forwarding_loop_free(sim: &Sim) -> Result<(), String> {
    let names = sim.names();
    let routers: Vec<_> = sim.routers().collect();
    for &(a, ra) in &routers {
        for &(b, rb) in &routers {
            if a == b {
                continue;
            }
            let dest = rb.name();
            let mut at = ra.name();
            let mut path = vec![a];
            while at != dest {
                let Some(&j) = names.get(&at) else {
                    return Err(format!("frame {a}->{b}: relay {at} unknown"));
                };
                let Some(r) = sim.router(j) else {
                    return Err(format!("frame {a}->{b}: relay {j} is down"));
                };
                let Some(&next) = r.routes().unicast.get(&dest) else {
                    return Err(format!("frame {a}->{b}: no route at {j} (path {path:?})"));
                };
                let nj = names[&next];
                if path.contains(&nj) {
                    return Err(format!("frame {a}->{b}: loop at {nj} (path {path:?})"));
                }
                path.push(nj);
                at = next;
            }
        }
    }
    Ok(())
}

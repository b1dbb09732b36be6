//! Reclaiming the space of routers that vanished, told as a story with five `Ipam`s and no
//! network: the harness passes full states between the routers that are still alive.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mesh::ipam::{Init, Ipam, IpamConfig};
use mesh::PeerName;

const RECLAIM_AFTER: Duration = Duration::from_secs(3600);

struct Mesh {
    now: Instant,
    ipams: Vec<Ipam>,
    alive: BTreeSet<usize>,
}

impl Mesh {
    /// Five routers that split the universe among themselves and know each other's state.
    fn new() -> Mesh {
        let now = Instant::now();
        let names: Vec<PeerName> = (1..=5).map(PeerName).collect();
        let config = IpamConfig {
            init: Init::Seed(names.clone()),
            reclaim_after: Some(RECLAIM_AFTER),
            ..IpamConfig::default()
        };
        let ipams = names
            .iter()
            .map(|&n| Ipam::new(config.clone(), n, n.0, now))
            .collect();
        let mut mesh = Mesh {
            now,
            ipams,
            alive: (0..5).collect(),
        };
        for i in 0..5 {
            mesh.ipams[i]
                .allocate(now, &format!("c{i}"), None)
                .expect("a seed owns space at once");
        }
        mesh.gossip();
        mesh
    }

    /// Alive routers exchange full states until nothing changes, then each sees the others
    /// alive as reachable.
    fn gossip(&mut self) {
        for _ in 0..20 {
            let states: Vec<_> = self
                .alive
                .iter()
                .map(|&i| self.ipams[i].full_state())
                .collect();
            let mut changed = false;
            for &i in &self.alive {
                for state in &states {
                    changed |= self.ipams[i].merge(self.now, state.clone());
                }
            }
            let reachable: BTreeSet<PeerName> =
                self.alive.iter().map(|&i| self.ipams[i].me()).collect();
            for &i in &self.alive {
                let mut others = reachable.clone();
                others.remove(&self.ipams[i].me());
                self.ipams[i].set_reachable(self.now, others);
                self.ipams[i].handle_timeout(self.now);
            }
            if !changed {
                return;
            }
        }
    }

    /// `i` stops for good: the others no longer hear it.
    fn vanish(&mut self, i: usize) {
        self.alive.remove(&i);
        self.gossip();
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.gossip();
    }

    /// The peers that own space in the universe, in `i`'s view.
    fn owners(&self, i: usize) -> BTreeSet<PeerName> {
        let ipam = &self.ipams[i];
        let ring = ipam.ring(ipam.config().universe).expect("universe ring");
        ring.owners().into_iter().collect()
    }
}

/// Goal: a vanished router's space is reclaimed even when the router that gathered the votes
/// for it vanishes for good before it could take it over. Its claims pass to the router that
/// reclaims it in turn, with their votes; before, that space stayed with the dead router.
/// Method: routers 1-5; 5 vanishes. After an hour, 1 (the smallest) claims 5 and the others
/// vote for 1, but 1 vanishes before it sees the votes. An hour later 2 claims 1, yielding its
/// own claim on 5 to the smaller 1; 2, 3 and 4 vote; 2 takes 1 over, and with it 1's claim on 5.
#[test]
fn a_claim_passes_to_whoever_reclaims_a_claimer_that_vanished() {
    let mut mesh = Mesh::new();
    assert_eq!(mesh.owners(1).len(), 5, "every seed owns space");
    let (one, two, five) = (PeerName(1), PeerName(2), PeerName(5));

    mesh.vanish(4);
    // 1 claims 5 first; then the others hear the claim and vote, while 1 hears nothing more.
    mesh.now += RECLAIM_AFTER + Duration::from_secs(1);
    mesh.ipams[0].handle_timeout(mesh.now);
    let claim = mesh.ipams[0].full_state();
    mesh.alive.remove(&0);
    for i in [1, 2, 3] {
        mesh.ipams[i].merge(mesh.now, claim.clone());
    }
    mesh.gossip();
    let claims = mesh.ipams[1].status().claims;
    assert!(
        claims
            .iter()
            .any(|c| c.starts_with(&format!("{one} claims {five}"))),
        "1's claim on 5 did not reach 2: {claims:?}"
    );
    assert!(mesh.owners(1).contains(&five), "5's space moved too soon");

    // 1 is gone as well: an hour later 2 reclaims it, and 1's claim on 5 with it.
    mesh.advance(RECLAIM_AFTER + Duration::from_secs(1));
    mesh.advance(Duration::from_secs(1));
    let owners = mesh.owners(1);
    assert_eq!(
        owners,
        BTreeSet::from([two, PeerName(3), PeerName(4)]),
        "2's view after the reclaims; claims: {:?}",
        mesh.ipams[1].status().claims
    );
    for i in [2, 3] {
        assert_eq!(mesh.owners(i), owners, "router {} disagrees", i + 1);
    }
    let claims = mesh.ipams[1].status().claims;
    assert!(
        claims.iter().any(|c| c
            == &format!(
                "{one} claims {five} (unreachable): passed to {two}, which took {one} over"
            )),
        "{claims:?}"
    );
}

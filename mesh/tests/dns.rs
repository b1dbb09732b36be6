//! Container name records (`mesh::dns`): merge, tombstones, restarts.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use mesh::dns::Records;
use mesh::PeerName;

const A: PeerName = PeerName(0xa);
const B: PeerName = PeerName(0xb);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn base() -> Instant {
    Instant::now()
}

#[test]
fn added_names_spread_and_removal_wins_over_stale_copies() {
    let now = base();
    let (mut a, mut b) = (Records::new(A, 0), Records::new(B, 0));
    let add = a.add("Web.meshctl.local.", ip("10.32.0.5")).unwrap();
    let stale = add.clone();
    assert!(b.merge(now, add).is_some());
    assert_eq!(b.lookup("web.meshctl.local"), vec![ip("10.32.0.5")]);
    let del = a.remove(now, "web.meshctl.local", None).unwrap();
    assert!(b.merge(now, del).is_some());
    assert!(
        b.merge(now, stale).is_none(),
        "a stale add must not resurrect the name"
    );
    assert!(b.lookup("web.meshctl.local").is_empty());
}

#[test]
fn merge_is_commutative_and_idempotent() {
    let now = base();
    let mut a = Records::new(A, 0);
    let mut b = Records::new(B, 0);
    let u1 = a.add("x", ip("10.0.0.1")).unwrap();
    let u2 = b.add("x", ip("10.0.0.2")).unwrap();
    let u3 = a.remove(now, "x", None).unwrap();
    let orders = [[&u1, &u2, &u3], [&u3, &u2, &u1], [&u2, &u3, &u1]];
    let views: Vec<Vec<IpAddr>> = orders
        .iter()
        .map(|order| {
            let mut r = Records::new(PeerName(0xc), 0);
            for u in order {
                r.merge(now, (*u).clone());
                r.merge(now, (*u).clone());
            }
            r.lookup("x")
        })
        .collect();
    assert!(
        views.iter().all(|v| *v == vec![ip("10.0.0.2")]),
        "{views:?}"
    );
}

#[test]
fn tombstones_are_collected_after_the_grace_period() {
    let now = base();
    let mut a = Records::new(A, 0);
    a.add("x", ip("10.0.0.1"));
    a.remove(now, "x", None);
    assert_eq!(
        a.gc(
            now + Duration::from_secs(1),
            Duration::from_secs(60),
            |_| false
        ),
        0
    );
    assert_eq!(
        a.gc(
            now + Duration::from_secs(61),
            Duration::from_secs(60),
            |_| false
        ),
        1
    );
}

#[test]
fn a_restarted_peer_moves_its_clock_past_its_old_records() {
    let now = base();
    let mut old = Records::new(A, 0);
    let before = old.add("x", ip("10.0.0.1")).unwrap();
    let mut restarted = Records::new(A, 0);
    restarted.merge(now, before);
    let del = restarted.remove(now, "x", None).unwrap();
    assert!(del.records[0].version > 1);
}

/// Goal: a name registered on one router reaches every router through gossip, and its removal
/// reaches them too. Method: a simulated mesh of six peers in a random tree with some loss; add
/// on peer 0, run, look up everywhere; remove, run, look up again.
#[test]
fn names_and_their_removal_spread_through_the_mesh() {
    use mesh::sim::{Sim, SimOptions};
    let options = SimOptions {
        peers: 6,
        seed: 7,
        loss: 0.05,
        ..SimOptions::default()
    };
    let mut sim = Sim::new(options, base());
    sim.run_for(Duration::from_secs(30)).unwrap();
    let now = sim.now();
    let r0 = sim.router_mut(0).unwrap();
    assert!(r0.dns_add("web.meshctl.local", ip("10.32.0.5")));
    assert!(
        !r0.dns_add("WEB.meshctl.local.", ip("10.32.0.5")),
        "added twice"
    );
    sim.run_for(Duration::from_secs(60)).unwrap();
    for (i, r) in sim.routers() {
        assert_eq!(
            r.dns().lookup("web.meshctl.local"),
            vec![ip("10.32.0.5")],
            "peer {i} lacks the name"
        );
    }
    assert_eq!(
        sim.router_mut(0)
            .unwrap()
            .dns_remove(now, "web.meshctl.local", None),
        1
    );
    sim.run_for(Duration::from_secs(60)).unwrap();
    for (i, r) in sim.routers() {
        assert!(
            r.dns().lookup("web.meshctl.local").is_empty(),
            "peer {i} still has the removed name"
        );
    }
}

//! IPAM gossip deltas: after a change, a peer sends only the rings and records that changed,
//! and a neighbour that merges the delta ends up with the same state as with the full state.
//! Method: two `Ipam`s with a seeded genesis exchange full states, then one hands its space
//! over (its successor is named in the rings); we compare the delta with the full state and the merged results.

use std::time::Instant;

use mesh::ipam::{Init, Ipam, IpamConfig};
use mesh::{Message, PeerName};

fn pair(now: Instant) -> (Ipam, Ipam) {
    let (a, b) = (PeerName(1), PeerName(2));
    let config = IpamConfig {
        init: Init::Seed(vec![a, b]),
        ..IpamConfig::default()
    };
    (
        Ipam::new(config.clone(), a, 1, now),
        Ipam::new(config, b, 2, now),
    )
}

#[test]
fn a_change_sends_only_what_changed_and_merges_like_the_full_state() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    let isolated = "10.2.1.0/24".parse().unwrap();
    // Both use the default universe and an isolated subnet, and hear each other in full.
    a.allocate(now, "x", None).unwrap();
    a.allocate(now, "y", Some(isolated)).unwrap();
    b.allocate(now, "z", None).unwrap();
    let (fa, fb) = (a.take_delta().unwrap(), b.take_delta().unwrap());
    b.merge(now, fa);
    a.merge(now, fb);
    while a.take_delta().is_some() || b.take_delta().is_some() {}
    assert_eq!(a.take_delta(), None, "nothing changed, nothing to send");

    // A peer that got only the earlier states, for comparison with the full state.
    let mut c = Ipam::new(b.config().clone(), PeerName(3), 3, now);
    c.merge(now, b.full_state());

    let moved = a.hand_over(PeerName(2));
    assert!(moved > 0);
    let delta = a.take_delta().expect("the hand-over is news");
    let full = a.full_state();
    // The hand-over names b a's successor in the register every stored ring carries; the
    // isolated subnet's ring, never divided, follows it without being stored.
    assert_eq!(
        delta.rings.len(),
        full.rings.len(),
        "every ring a holds carries the departure"
    );
    assert!(
        !delta.records.contains_key(&PeerName(2)),
        "b's record did not change: {:?}",
        delta.records
    );
    let size = |u: &mesh::ipam::IpamUpdate| Message::Ipam(Box::new(u.clone())).encoded_len();
    assert!(
        size(&delta) < size(&full),
        "{} >= {}",
        size(&delta),
        size(&full)
    );

    let mut c_full = Ipam::new(b.config().clone(), PeerName(3), 3, now);
    c_full.merge(now, b.full_state());
    c_full.merge(now, full);
    c.merge(now, delta);
    assert_eq!(c.rings(), c_full.rings());
    // Records differ at most by empty ones (a peer we heard of but that never wrote one).
    let written = |i: &Ipam| {
        let mut r = i.full_state().records;
        r.retain(|_, r| *r != mesh::ipam::Record::default());
        r
    };
    assert_eq!(written(&c), written(&c_full));
    assert!(c.ring(isolated).unwrap().owned(PeerName(1)).is_empty());
}

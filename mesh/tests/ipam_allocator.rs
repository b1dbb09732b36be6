//! Allocator behaviour through the public API: lowest free first, grace period on release.
//! (Here rather than in `src/` because it needs a real `Instant`.)

use std::time::{Duration, Instant};

use mesh::ipam::{Allocator, Cidr};

#[test]
fn allocates_lowest_free_and_frees_after_grace() {
    let subnet: Cidr = "10.2.1.0/24".parse().unwrap();
    let owned = [subnet.range()];
    let mut a = Allocator::default();
    let x = a.allocate(subnet, "x", &owned).unwrap();
    let y = a.allocate(subnet, "y", &owned).unwrap();
    assert_eq!((x, y), (subnet.hosts().start, subnet.hosts().start + 1));
    assert_eq!(a.free(subnet, &owned), 252);
    let now = Instant::now();
    assert_eq!(a.release("x", now + Duration::from_secs(5)), 1);
    assert!(!a.expire(now));
    assert_eq!(a.reclaim(subnet, "x"), Some(x));
    a.release("x", now);
    assert!(a.expire(now));
    assert_eq!(a.allocate(subnet, "z", &owned), Some(x));
    let run = a.largest_free_run(subnet, &owned).unwrap();
    assert_eq!(run.len(), 252);
}

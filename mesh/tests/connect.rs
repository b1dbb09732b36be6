//! Unit tests of the connection maker policy (`mesh::connect`).
//!
//! They live here rather than at the bottom of `connect.rs` because they need a real `Instant`
//! to start from, and `mesh/src` may not read the clock (see `tidy.rs`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh::connect::{ConnectionMaker, Policy, TargetState, TargetStatus};

fn policy() -> Policy {
    Policy {
        discovery: true,
        conn_limit: 2,
        reconnect_delay_min: Duration::from_secs(1),
        reconnect_delay_max: Duration::from_secs(60),
        discovered_attempts_max: 3,
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], port))
}

fn waiting_until(maker: &ConnectionMaker, a: SocketAddr) -> Instant {
    match maker.status(&BTreeSet::new()).iter().find(|t| t.addr == a) {
        Some(TargetStatus {
            state: TargetState::Waiting { next_attempt },
            ..
        }) => *next_attempt,
        other => panic!("expected a waiting target, got {other:?}"),
    }
}

#[test]
fn user_target_is_dialed_now_and_backs_off_exponentially() {
    let t0 = Instant::now();
    let mut m = ConnectionMaker::new(policy(), 7);
    m.add_user(t0, &[addr(1)]);
    assert_eq!(m.poll_dials(t0, &BTreeSet::new(), 0), [addr(1)]);
    // In flight: not dialed again.
    assert!(m.poll_dials(t0, &BTreeSet::new(), 0).is_empty());
    let mut delays = Vec::new();
    let mut now = t0;
    for _ in 0..10 {
        m.dial_failed(now, addr(1), "refused".into());
        let next = waiting_until(&m, addr(1));
        delays.push(next - now);
        now = next;
        assert_eq!(m.poll_dials(now, &BTreeSet::new(), 0), [addr(1)]);
    }
    // ~1 s, ~2 s, ~4 s ... capped at 60 s, each within ±20%.
    for (i, d) in delays.iter().enumerate() {
        let base = Duration::from_secs(1 << i.min(6)).min(Duration::from_secs(60));
        assert!(*d >= base.mul_f64(0.8), "attempt {i}: {d:?}");
        assert!(
            *d <= base.mul_f64(1.2).min(Duration::from_secs(60)),
            "attempt {i}: {d:?}"
        );
    }
    let status = m.status(&BTreeSet::new());
    assert_eq!(status[0].attempts, 10);
    assert_eq!(status[0].last_error.as_deref(), Some("refused"));
}

#[test]
fn covered_addresses_are_not_dialed() {
    let t0 = Instant::now();
    let mut m = ConnectionMaker::new(policy(), 1);
    m.add_user(t0, &[addr(1)]);
    let covered = BTreeSet::from([addr(1)]);
    assert!(m.poll_dials(t0, &covered, 1).is_empty());
    assert_eq!(m.next_timeout(&covered), None);
    assert_eq!(m.status(&covered)[0].state, TargetState::Connected);
}

#[test]
fn connection_limit_is_respected() {
    // Discovered targets stop at the limit (2); user targets are dialed regardless.
    let t0 = Instant::now();
    let mut m = ConnectionMaker::new(policy(), 1);
    m.set_discovered(t0, &BTreeSet::from([addr(7), addr(8)]));
    assert_eq!(m.poll_dials(t0, &BTreeSet::new(), 1), [addr(7)]);
    // The other is pushed into the future instead of staying due.
    assert!(m.next_timeout(&BTreeSet::new()) > Some(t0));
    m.add_user(t0, &[addr(1), addr(2), addr(3)]);
    assert_eq!(
        m.poll_dials(t0, &BTreeSet::new(), 1),
        [addr(1), addr(2), addr(3)]
    );
    assert_eq!(m.connecting(), 4);
}

#[test]
fn a_discovered_address_given_up_stays_dropped_while_announced() {
    let t0 = Instant::now();
    let mut m = ConnectionMaker::new(policy(), 1);
    let announced = BTreeSet::from([addr(5)]);
    m.set_discovered(t0, &announced);
    let mut now = t0;
    for _ in 0..3 {
        assert_eq!(m.poll_dials(now, &BTreeSet::new(), 0), [addr(5)]);
        m.dial_failed(now, addr(5), "timeout".into());
        now += Duration::from_secs(120);
    }
    m.set_discovered(now, &announced);
    assert!(m.status(&BTreeSet::new()).is_empty());
    // Once nobody announces it, a later announcement is a fresh start.
    m.set_discovered(now, &BTreeSet::new());
    m.set_discovered(now, &announced);
    assert_eq!(m.discovered(), announced);
}

#[test]
fn discovered_targets_are_dropped_after_repeated_failures() {
    let t0 = Instant::now();
    let mut m = ConnectionMaker::new(policy(), 1);
    m.set_discovered(t0, &BTreeSet::from([addr(5)]));
    let mut now = t0;
    for _ in 0..3 {
        assert_eq!(m.poll_dials(now, &BTreeSet::new(), 0), [addr(5)]);
        m.dial_failed(now, addr(5), "timeout".into());
        now += Duration::from_secs(120);
    }
    assert!(m.status(&BTreeSet::new()).is_empty());
}

#[test]
fn discovery_off_adds_nothing_and_self_is_never_dialed() {
    let t0 = Instant::now();
    let mut m = ConnectionMaker::new(
        Policy {
            discovery: false,
            ..policy()
        },
        1,
    );
    m.set_discovered(t0, &BTreeSet::from([addr(5)]));
    assert!(m.status(&BTreeSet::new()).is_empty());
    m.add_user(t0, &[addr(1)]);
    m.reached_ourselves(addr(1));
    assert!(m.poll_dials(t0, &BTreeSet::new(), 0).is_empty());
    let mut d = ConnectionMaker::new(policy(), 1);
    d.reached_ourselves(addr(5));
    d.set_discovered(t0, &BTreeSet::from([addr(5)]));
    assert!(d.status(&BTreeSet::new()).is_empty());
}

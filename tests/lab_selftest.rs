//! Proves the namespace lab itself, without meshctl.
//!
//! ```text
//!   a ──u1── b            (veth pair, 10.250.1.0/24)
//!   a ─┐
//!   b ─┼─ [s2: br0]       (switch, 10.250.2.0/24)
//!   c ─┘
//! ```
//! Hosts ping each other over a link and a switch, TCP and UDP capture work inside namespaces,
//! and after `Drop` no namespace or directory of the lab is left.

mod common;

use common::lab::{self, Lab, UdpCapture};
use std::net::{SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Goal: the lab's building blocks work and leave nothing behind.
/// Method: build a link and a switch, ping, move TCP bytes, capture UDP, drop, look for leftovers.
#[test]
fn hosts_ping_over_link_and_switch_and_nothing_is_left_after_drop() {
    if lab::skip_unless_root("hosts_ping_over_link_and_switch_and_nothing_is_left_after_drop") {
        return;
    }
    let lab = Lab::new();
    let prefix = lab.prefix().to_owned();
    let dir = lab.dir().to_path_buf();
    let a = lab.host("a");
    let b = lab.host("b");
    let c = lab.host("c");
    let (addr_a, addr_b) = lab.link(&a, &b);
    assert!(
        lab::wait_for(lab::WAIT_MAX, || lab::ping(&a.netns, addr_b)),
        "a cannot ping b over the link"
    );
    assert!(
        lab::wait_for(lab::WAIT_MAX, || lab::ping(&b.netns, addr_a)),
        "b cannot ping a over the link"
    );

    let sw = lab.switch(&[&a, &b, &c]);
    // A fresh bridge may take a moment to forward; wait with a deadline rather than one try.
    assert!(
        lab::wait_for(lab::WAIT_MAX, || lab::ping(&a.netns, sw[2])),
        "a cannot ping c over the switch"
    );
    assert!(
        lab::wait_for(lab::WAIT_MAX, || lab::ping(&c.netns, sw[1])),
        "c cannot ping b over the switch"
    );
    // No forwarding and no route: c cannot reach a's link address.
    assert!(!lab::ping(&c.netns, addr_b), "c reaches the a-b link");

    let transfer =
        lab::tcp_transfer(&a.netns, &b.netns, addr_b, 5001, 4 << 20).expect("tcp transfer");
    assert_eq!(transfer.received_bytes, 4 << 20);
    assert_eq!(transfer.sent_sha256, transfer.received_sha256);

    let capture = UdpCapture::start(&a.netns);
    let to = SocketAddr::from((addr_b, 6784));
    lab::send_udp(&a.netns, to, vec![1, 2, 3]);
    lab::send_udp(&a.netns, to, vec![7; 100]);
    let got = capture.next_payload(SocketAddrV4::new(addr_b, 6784), 50, Duration::from_secs(5));
    assert_eq!(got, Some(vec![7; 100]), "capture missed the datagram");

    let container = lab.container(&a);
    assert!(netns_list().contains(&container.netns));
    let pid = lab.spawn_in(&b.netns, "sleep", &["300"], "sleep.log");

    drop(lab);
    let left: Vec<String> = netns_list()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "namespaces left after drop: {left:?}");
    assert!(!dir.exists(), "lab dir {} left after drop", dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} left after drop"
    );
}

/// Goal: labs in one process never share names, so tests can run in parallel.
#[test]
fn two_labs_get_distinct_prefixes() {
    if lab::skip_unless_root("two_labs_get_distinct_prefixes") {
        return;
    }
    let one = Lab::new();
    let two = Lab::new();
    assert_ne!(one.prefix(), two.prefix());
    let a1 = one.host("a");
    let a2 = two.host("a");
    assert_ne!(a1.netns, a2.netns);
}

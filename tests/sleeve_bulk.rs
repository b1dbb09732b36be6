//! Bulk traffic through the encrypted sleeve, with both ciphers, checked end to end.
//!
//! ```text
//!   c1 10.43.0.1                          c2 10.43.0.2
//!     |  (meshctl attach)                   |  (meshctl attach)
//!   [ a ] 10.250.1.1 ----u1---- 10.250.1.2 [ b ]
//! ```
//! a: `launch --password pw [--cipher X]`; b: `launch --password pw A`. The bytes cross the
//! sleeve as TCP super-frames cut into sealed segments, joined again on the far side and written
//! into its TAP; SHA-256 on both ends proves nothing was lost, reordered or corrupted. In the
//! ChaCha20 test the keys rotate every 1,024 datagrams (hundreds of times during the transfer):
//! no datagram may fail to open across a rotation. The fallback test does the same with UDP
//! GSO/GRO switched off on both ends (`--udp-offload off`), so the datagrams go out through
//! `sendmmsg` and come in through `recvmmsg`.

mod common;

use common::lab::{self, Container, Host, Lab, WAIT_MAX};
use serde_json::Value;
use std::net::Ipv4Addr;

const C1_IP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 1);
const C2_IP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 2);

struct Pair {
    lab: Lab,
    a: Host,
    b: Host,
    c1: Container,
    c2: Container,
}

fn pair(args_a: &[&str], args_b: &[&str]) -> Pair {
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (a_ip, _) = lab.link(&a, &b);
    let mut full_a = vec!["--password", "pw"];
    full_a.extend_from_slice(args_a);
    a.launch(&full_a);
    let peer = a_ip.to_string();
    let mut full_b = vec!["--password", "pw", peer.as_str()];
    full_b.extend_from_slice(args_b);
    b.launch(&full_b);
    let c1 = lab.container(&a);
    a.attach(&c1, &format!("{C1_IP}/24"));
    let c2 = lab.container(&b);
    b.attach(&c2, &format!("{C2_IP}/24"));
    assert!(
        lab::wait_for(WAIT_MAX, || lab::ping(&c1.netns, C2_IP)),
        "c1 cannot ping c2 within {WAIT_MAX:?}:{}",
        lab.report()
    );
    Pair { lab, a, b, c1, c2 }
}

/// The cipher `host`'s status shows for its one peer.
fn peer_cipher(status: &Value) -> String {
    status["peers"][0]["cipher"]
        .as_str()
        .unwrap_or("?")
        .to_owned()
}

fn transfer(p: &Pair, from: &Container, to: &Container, to_ip: Ipv4Addr, bytes: u64) {
    let t = lab::tcp_transfer(&from.netns, &to.netns, to_ip, 5201, bytes)
        .unwrap_or_else(|e| panic!("TCP transfer failed: {e}{}", p.lab.report()));
    assert_eq!(t.received_bytes, bytes, "received a different byte count");
    assert_eq!(
        t.sent_sha256, t.received_sha256,
        "received different bytes than were sent"
    );
    eprintln!(
        "{bytes} bytes in {:?} ({:.0} Mbit/s)",
        t.elapsed,
        bytes as f64 * 8.0 / t.elapsed.as_secs_f64() / 1e6
    );
}

fn assert_no_security_drops(host: &Host) {
    let status = host.status_json();
    let drops = &status["sleeve"]["drops"];
    for reason in [
        "auth_failed",
        "replayed",
        "malformed",
        "truncated",
        "bad_tap_frame",
    ] {
        assert_eq!(
            drops[reason].as_u64(),
            Some(0),
            "host {}: drop counter {reason} moved: {drops}",
            host.name
        );
    }
}

#[test]
fn one_gigabyte_crosses_the_chacha20_sleeve_intact() {
    if lab::skip_unless_root("one_gigabyte_crosses_the_chacha20_sleeve_intact") {
        return;
    }
    // b keeps the default epoch; the session takes the shorter one, a's.
    let p = pair(
        &[
            "--cipher",
            "chacha20-poly1305",
            "--sleeve-rekey-shift",
            "10",
        ],
        &[],
    );
    for host in [&p.a, &p.b] {
        assert_eq!(peer_cipher(&host.status_json()), "ChaCha20-Poly1305");
    }
    transfer(&p, &p.c1, &p.c2, C2_IP, 1_000_000_000);
    assert_no_security_drops(&p.a);
    assert_no_security_drops(&p.b);
    let rotations = p.a.status_json()["sleeve"]["key_rotations"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        rotations >= 100,
        "a's sending keys rotated {rotations} times while sending 1 GB in epochs of 1,024 datagrams"
    );
    eprintln!("a's sending keys rotated {rotations} times, no datagram failed to open");
}

#[test]
fn forced_aes_is_used_by_both_ends_and_carries_bulk_both_ways() {
    if lab::skip_unless_root("forced_aes_is_used_by_both_ends_and_carries_bulk_both_ways") {
        return;
    }
    let p = pair(&[], &["--cipher", "aes-256-gcm"]);
    for host in [&p.a, &p.b] {
        assert_eq!(peer_cipher(&host.status_json()), "AES-256-GCM");
    }
    transfer(&p, &p.c1, &p.c2, C2_IP, 200_000_000);
    transfer(&p, &p.c2, &p.c1, C1_IP, 200_000_000);
    assert_no_security_drops(&p.a);
    assert_no_security_drops(&p.b);
}

/// Goal: with `--udp-offload off` the sleeve batches with `sendmmsg`/`recvmmsg`, says so in
/// status, and still carries bulk intact both ways.
/// Method: both routers forced to the fallback; 200 MB each way with SHA-256 on both ends.
#[test]
fn bulk_crosses_the_sleeve_intact_with_sendmmsg_and_recvmmsg() {
    if lab::skip_unless_root("bulk_crosses_the_sleeve_intact_with_sendmmsg_and_recvmmsg") {
        return;
    }
    let forced = ["--udp-offload", "off", "--cipher", "chacha20-poly1305"];
    let p = pair(&forced, &forced);
    for host in [&p.a, &p.b] {
        let status = host.status_json();
        assert_eq!(
            status["sleeve"]["batching"], "sendmmsg/recvmmsg",
            "host {}: {}",
            host.name, status["sleeve"]
        );
    }
    let before = p.b.status_json()["sleeve"]["rx_datagrams"]
        .as_u64()
        .unwrap_or(0);
    transfer(&p, &p.c1, &p.c2, C2_IP, 200_000_000);
    transfer(&p, &p.c2, &p.c1, C1_IP, 100_000_000);
    let after = p.b.status_json()["sleeve"]["rx_datagrams"]
        .as_u64()
        .unwrap_or(0);
    // 200 MB in datagrams of at most ~1,400 bytes of payload.
    assert!(
        after - before >= 140_000,
        "b received only {} datagrams for 200 MB",
        after - before
    );
    assert_no_security_drops(&p.a);
    assert_no_security_drops(&p.b);
    let (_, text, _) = p.a.meshctl(&["status"]);
    assert!(
        text.contains("batching sendmmsg/recvmmsg"),
        "`meshctl status` does not show the batching:\n{text}"
    );
}

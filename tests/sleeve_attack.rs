//! Replayed and forged datagrams at full rate, while bulk traffic crosses the encrypted sleeve.
//!
//! ```text
//!   c1 10.44.0.1                          c2 10.44.0.2
//!     |  (meshctl attach)                   |  (meshctl attach)
//!   [ a ] 10.250.1.1 ----u1---- 10.250.1.2 [ b ] 10.250.2.1 ----u2---- 10.250.2.2 [ x ]
//! ```
//! a and b run `launch --password pw`; x runs no router: it is an attacker on b's underlay that
//! knows only what crossed the wire (datagrams captured on a) and floods b's sleeve port with
//! them, replayed and tampered with, while c1 sends c2 two gigabytes over TCP.

mod common;

use common::lab::{self, Lab, UdpCapture, WAIT_MAX};
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

const C1_IP: Ipv4Addr = Ipv4Addr::new(10, 44, 0, 1);
const C2_IP: Ipv4Addr = Ipv4Addr::new(10, 44, 0, 2);
/// The sleeve's UDP port with the default `--port`.
const DATA_PORT: u16 = 6784;
/// Datagrams of each sort the attacker sends.
const PER_SORT: u64 = 10_000;
/// Bytes of the transfer under attack: enough to outlast the flood, which slows it down.
const BULK_BYTES: u64 = 2_000_000_000;
/// Distinct genuine datagrams captured for replay and tampering.
const CAPTURED: usize = 32;

/// What the attacker sends, by `i % 4`, and the drop reason each must land in.
const SORTS: [(&str, &str); 4] = [
    ("replayed", "replayed"),
    ("flipped", "auth_failed"),
    ("random", "auth_failed"),
    ("truncated", "truncated"),
];

/// Datagram `i` of the flood, made from the genuine datagrams in `captured`.
fn forge(i: u64, captured: &[Vec<u8>], out: &mut Vec<u8>) {
    let genuine = &captured[(i / 4) as usize % captured.len()];
    let mut rng = lab::TestRng::new(i.wrapping_mul(0x9e37_79b9));
    match SORTS[(i % 4) as usize].0 {
        "replayed" => out.extend_from_slice(genuine),
        "flipped" => {
            // A counter B has not seen (so the replay window lets it through to `open`), and
            // one body byte flipped.
            out.extend_from_slice(genuine);
            let counter = u64::from_be_bytes(genuine[8..16].try_into().expect("16-byte header"));
            let fresh = (counter | 1 << 62).wrapping_add(i);
            out[8..16].copy_from_slice(&fresh.to_be_bytes());
            let at = 16 + (rng.next_u64() as usize) % (out.len() - 16);
            out[at] ^= 1 << (rng.next_u64() % 8);
        }
        "random" => {
            // The header of a sealed datagram for B's session (kind, no flags, B's receiver
            // index), a random fresh counter, then random bytes as long as a real datagram.
            out.extend_from_slice(&genuine[..8]);
            out[1] = 0;
            out.extend_from_slice(&(rng.next_u64() | 1 << 63).to_be_bytes());
            out.resize(genuine.len(), 0);
            rng.fill(&mut out[16..]);
        }
        _ => out.extend_from_slice(&genuine[..12]),
    }
}

fn drops(status: &Value, reason: &str) -> u64 {
    status["sleeve"]["drops"][reason].as_u64().unwrap_or(0)
}

fn sleeve(status: &Value, counter: &str) -> u64 {
    status["sleeve"][counter].as_u64().unwrap_or(0)
}

/// Goal: an attacker on the underlay who floods a router's sleeve port with replayed and forged
/// datagrams at full speed gets none of them delivered, each one is dropped and counted under
/// its reason, and the bulk traffic crossing at the same time arrives intact.
/// Method: capture genuine datagrams a sends b during a warm-up transfer; start a 2 GB transfer
/// c1 -> c2; once it runs, x sends b 40,000 datagrams (replays, tampered copies, random bytes
/// with a valid header, truncated headers) back to back. Compare b's drop counters with what was
/// sent, less what the kernel dropped before the router could see it.
#[test]
fn replayed_and_forged_floods_are_dropped_and_counted_during_bulk() {
    if lab::skip_unless_root("replayed_and_forged_floods_are_dropped_and_counted_during_bulk") {
        return;
    }
    let lab = Lab::new();
    let (a, b, x) = (lab.host("a"), lab.host("b"), lab.host("x"));
    let (a_ip, b_ip) = lab.link(&a, &b);
    let (b_ip_x, _) = lab.link(&b, &x);
    a.launch(&["--password", "pw"]);
    b.launch(&["--password", "pw", &a_ip.to_string()]);
    let c1 = lab.container(&a);
    a.attach(&c1, &format!("{C1_IP}/24"));
    let c2 = lab.container(&b);
    b.attach(&c2, &format!("{C2_IP}/24"));
    assert!(
        lab::wait_for(WAIT_MAX, || lab::ping(&c1.netns, C2_IP)),
        "c1 cannot ping c2 within {WAIT_MAX:?}:{}",
        lab.report()
    );

    // Warm-up: big datagrams from a to b carry TCP segments; keep the first few distinct ones.
    let b_data = SocketAddrV4::new(b_ip, DATA_PORT);
    let capture = UdpCapture::start(&a.netns);
    let (n1, n2) = (c1.netns.clone(), c2.netns.clone());
    let warmup = std::thread::spawn(move || lab::tcp_transfer(&n1, &n2, C2_IP, 5202, 50_000_000));
    let mut captured: Vec<Vec<u8>> = Vec::new();
    while captured.len() < CAPTURED {
        let Some(d) = capture.next_payload(b_data, 1000, Duration::from_secs(5)) else {
            break;
        };
        if !captured.contains(&d) {
            captured.push(d);
        }
    }
    drop(capture);
    let t = warmup
        .join()
        .expect("warm-up thread")
        .unwrap_or_else(|e| panic!("warm-up transfer failed: {e}{}", lab.report()));
    assert_eq!(
        t.sent_sha256, t.received_sha256,
        "warm-up arrived corrupted"
    );
    assert_eq!(
        captured.len(),
        CAPTURED,
        "captured only {} datagrams from a to {b_data}:{}",
        captured.len(),
        lab.report()
    );
    assert!(
        captured.iter().all(|d| d[0] == 1),
        "captured datagrams are not sealed"
    );

    let before_b = b.status_json();
    let before_a = a.status_json();
    let lost_before = lab::udp_receive_errors(&b.netns)
        + lab::link_drops(&b.netns, "u2")
        + lab::link_drops(&x.netns, "u2");

    // The transfer under attack.
    let (n1, n2) = (c1.netns.clone(), c2.netns.clone());
    let started = Instant::now();
    let bulk = std::thread::spawn(move || lab::tcp_transfer(&n1, &n2, C2_IP, 5201, BULK_BYTES));
    // Flood only once the bulk flows, and its counters have left the captured ones far behind
    // (the replay window is 1,984 counters wide).
    let flowing = lab::wait_for(WAIT_MAX, || {
        sleeve(&b.status_json(), "rx_datagrams") > sleeve(&before_b, "rx_datagrams") + 20_000
            || bulk.is_finished()
    });
    assert!(
        flowing && !bulk.is_finished(),
        "the bulk transfer ended before the flood began"
    );
    let captured = Arc::new(captured);
    let templates = captured.clone();
    let flood_start = Instant::now();
    let flood = lab::flood_udp(
        &x.netns,
        SocketAddr::V4(SocketAddrV4::new(b_ip_x, DATA_PORT)),
        PER_SORT * 4,
        move |i, out| forge(i, &templates, out),
    );
    let sent = flood
        .join()
        .expect("flood thread")
        .unwrap_or_else(|e| panic!("flood failed: {e}"));
    let flood_time = flood_start.elapsed();
    let overlapped = !bulk.is_finished();
    let t = bulk
        .join()
        .expect("bulk thread")
        .unwrap_or_else(|e| panic!("bulk transfer failed under attack: {e}{}", lab.report()));
    let bulk_time = started.elapsed();
    assert_eq!(t.received_bytes, BULK_BYTES, "bulk lost bytes");
    assert_eq!(
        t.sent_sha256, t.received_sha256,
        "bulk arrived with different bytes"
    );
    assert_eq!(sent, PER_SORT * 4);
    assert!(
        overlapped,
        "the flood ({flood_time:?}) outlasted the bulk transfer ({bulk_time:?})"
    );

    // The router reads its socket behind the kernel: wait until every sort has been counted
    // (or the counts stop moving).
    let lost_kernel = || {
        lab::udp_receive_errors(&b.netns)
            + lab::link_drops(&b.netns, "u2")
            + lab::link_drops(&x.netns, "u2")
            - lost_before
    };
    let grew = |status: &Value, reason: &str| drops(status, reason) - drops(&before_b, reason);
    let expected = |reason: &str| -> u64 {
        SORTS.iter().filter(|(_, r)| *r == reason).count() as u64 * PER_SORT
    };
    let reasons = ["replayed", "auth_failed", "truncated"];
    let mut after_b = b.status_json();
    lab::wait_for(Duration::from_secs(10), || {
        after_b = b.status_json();
        let lost = lost_kernel();
        reasons
            .iter()
            .all(|r| grew(&after_b, r) + lost >= expected(r))
    });
    let after_a = a.status_json();
    let lost = lost_kernel();
    eprintln!(
        "flood: {sent} datagrams in {flood_time:?} ({:.0}/s) during a 2 GB transfer of {bulk_time:?}; \
         kernel dropped {lost} datagrams in b's netns",
        sent as f64 / flood_time.as_secs_f64()
    );
    for reason in reasons {
        let (counted, injected) = (grew(&after_b, reason), expected(reason));
        eprintln!("  {reason}: injected {injected}, counted {counted}");
        assert!(
            counted + lost >= injected,
            "b counted {counted} {reason} drops for {injected} injected ({lost} lost in the kernel):{}",
            lab.report()
        );
        // Nothing genuine is replayed, forged or cut short on a veth: every count is ours.
        assert!(
            counted <= injected,
            "b counted {counted} {reason} drops but only {injected} were injected"
        );
        assert!(
            counted * 2 >= injected,
            "b saw under half of the {injected} {reason} datagrams ({counted}); the flood did not \
             reach the router, so this test proves nothing"
        );
    }
    // Every frame b accepted, a sent (b's counter read first): nothing injected got through.
    let (rx_b, tx_a) = (sleeve(&after_b, "rx_frames"), sleeve(&after_a, "tx_frames"));
    assert!(
        rx_b <= tx_a,
        "b accepted {rx_b} frames but a sent only {tx_a}: injected datagrams were delivered"
    );
    eprintln!(
        "  b accepted {} frames during the attack, a sent {}",
        rx_b - sleeve(&before_b, "rx_frames"),
        tx_a - sleeve(&before_a, "tx_frames")
    );
    for reason in ["malformed", "unknown_session", "plain_when_sealed"] {
        assert_eq!(
            grew(&after_b, reason),
            0,
            "b dropped datagrams as {reason}: the attack's sorts were misclassified"
        );
    }
}

//! Three hosts in a line, so that A and C can talk only through the mesh relaying via B.
//!
//! ```text
//!   cA 10.40.0.1                                        cC 10.40.0.3
//!    |  (meshctl attach)                                  |  (meshctl attach)
//!  [ A ] 10.250.1.1 --u1-- 10.250.1.2 [ B ] 10.250.2.1 --u2-- 10.250.2.2 [ C ]
//!                                       10.250.3.2
//!                                         |
//!                                        u3      (only in the wrong-password test)
//!                                         |
//!                                       10.250.3.1 [ D ]
//! ```
//! A reaches only B, B only C (and D); no host forwards IP. A: `launch --password pw`;
//! B: `launch --password pw A`; C: `launch --password pw B`. Every assertion is on what a user
//! sees: `meshctl status --json`, ping and TCP between containers.

mod common;

use common::lab::{self, Container, Host, Lab, UdpCapture, WAIT_MAX};
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

const PASSWORD: &str = "pw";
const CONTROL_PORT: u16 = 6783;
const DATA_PORT: u16 = CONTROL_PORT + 1;
const CA_IP: Ipv4Addr = Ipv4Addr::new(10, 40, 0, 1);
const CC_IP: Ipv4Addr = Ipv4Addr::new(10, 40, 0, 3);

/// The A—B—C line with both containers attached.
struct Line {
    lab: Lab,
    a: Host,
    b: Host,
    c: Host,
    /// B's address on the A—B link.
    b_on_link1: Ipv4Addr,
    /// B's arguments to `launch`, kept to relaunch it unchanged.
    b_args: Vec<String>,
    ca: Container,
    cc: Container,
}

impl Line {
    fn build() -> Line {
        let lab = Lab::new();
        let a = lab.host("a");
        let b = lab.host("b");
        let c = lab.host("c");
        let (a_on_link1, b_on_link1) = lab.link(&a, &b);
        let (b_on_link2, _c_on_link2) = lab.link(&b, &c);
        a.launch(&["--password", PASSWORD]);
        let b_args = vec![
            "--password".to_owned(),
            PASSWORD.to_owned(),
            a_on_link1.to_string(),
        ];
        b.launch(&b_args.iter().map(String::as_str).collect::<Vec<_>>());
        c.launch(&["--password", PASSWORD, &b_on_link2.to_string()]);
        let ca = lab.container(&a);
        a.attach(&ca, &format!("{CA_IP}/24"));
        let cc = lab.container(&c);
        c.attach(&cc, &format!("{CC_IP}/24"));
        Line {
            lab,
            a,
            b,
            c,
            b_on_link1,
            b_args,
            ca,
            cc,
        }
    }

    /// Waits until A and C each list the two others as reachable peers.
    fn wait_converged(&self) {
        let converged = lab::wait_for(WAIT_MAX, || {
            reachable_nicknames(&self.a.status_json()) == ["b", "c"]
                && reachable_nicknames(&self.c.status_json()) == ["a", "b"]
        });
        assert!(
            converged,
            "A and C did not both show 2 reachable peers within {WAIT_MAX:?}:{}",
            self.lab.report()
        );
    }

    /// Waits until cA can ping cC.
    fn wait_ping(&self, why: &str) {
        assert!(
            lab::wait_for(WAIT_MAX, || lab::ping(&self.ca.netns, CC_IP)),
            "cA cannot ping cC within {WAIT_MAX:?} ({why}):{}",
            self.lab.report()
        );
    }
}

/// Sorted nicknames of the peers a status shows as reachable.
fn reachable_nicknames(status: &Value) -> Vec<String> {
    let mut names: Vec<String> = peers(status)
        .iter()
        .filter(|p| p["reachable"] == Value::Bool(true))
        .filter_map(|p| p["nickname"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

fn peers(status: &Value) -> Vec<Value> {
    status["peers"].as_array().cloned().unwrap_or_default()
}

fn connections(status: &Value) -> Vec<Value> {
    status["connections"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn error_mentions(conn: &Value, text: &str) -> bool {
    conn["error"].as_str().is_some_and(|e| e.contains(text))
}

/// `sleeve.drops.<reason>` (0 if the status is missing).
fn drops(host: &Host, reason: &str) -> u64 {
    host.status_json()["sleeve"]["drops"][reason]
        .as_u64()
        .unwrap_or(0)
}

/// Goal: a container on A reaches one on C through B's relay, and bulk data arrives intact.
/// Method: ping cA→cC, then 100 MB of pseudo-random bytes over TCP with SHA-256 at both ends.
#[test]
fn relayed_ping_and_100mb_tcp_intact() {
    if lab::skip_unless_root("relayed_ping_and_100mb_tcp_intact") {
        return;
    }
    let line = Line::build();
    line.wait_converged();
    line.wait_ping("after convergence");
    assert!(
        lab::ping(&line.cc.netns, CA_IP),
        "cC cannot ping cA back:{}",
        line.lab.report()
    );

    let bytes = 100 * 1000 * 1000;
    let transfer = lab::tcp_transfer(&line.ca.netns, &line.cc.netns, CC_IP, 5201, bytes)
        .unwrap_or_else(|e| panic!("TCP cA->cC failed: {e}{}", line.lab.report()));
    assert_eq!(
        transfer.received_bytes, bytes,
        "cC received a different byte count"
    );
    assert_eq!(
        transfer.sent_sha256, transfer.received_sha256,
        "cC received different bytes than cA sent"
    );
    eprintln!(
        "100 MB cA->cC via B in {:?} ({:.0} Mbit/s)",
        transfer.elapsed,
        bytes as f64 * 8.0 / transfer.elapsed.as_secs_f64() / 1e6
    );
    let relayed = line.b.status_json()["sleeve"]["relayed_frames"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        relayed > 0,
        "B's sleeve.relayed_frames is {relayed} after relaying:{}",
        line.lab.report()
    );
}

/// Goal: a peer with the wrong password never joins, and both ends tell the user why.
/// Method: D dials B with another password; both statuses show "password mismatch" and
/// neither lists the other as a peer, then or during the next few seconds.
#[test]
fn wrong_password_never_joins_and_both_sides_say_why() {
    if lab::skip_unless_root("wrong_password_never_joins_and_both_sides_say_why") {
        return;
    }
    let lab = Lab::new();
    let a = lab.host("a");
    let b = lab.host("b");
    let d = lab.host("d");
    let (a_on_link1, _) = lab.link(&a, &b);
    let (_, b_on_link3) = lab.link(&d, &b);
    a.launch(&["--password", PASSWORD]);
    b.launch(&["--password", PASSWORD, &a_on_link1.to_string()]);
    d.launch(&["--password", "wrong", &b_on_link3.to_string()]);

    let d_says_why = lab::wait_for(WAIT_MAX, || {
        connections(&d.status_json())
            .iter()
            .any(|c| error_mentions(c, "password mismatch"))
    });
    assert!(
        d_says_why,
        "D's status shows no connection with error \"password mismatch\" within {WAIT_MAX:?}:{}",
        lab.report()
    );
    let b_says_why = lab::wait_for(WAIT_MAX, || {
        connections(&b.status_json())
            .iter()
            .any(|c| c["direction"] == "inbound" && error_mentions(c, "password mismatch"))
    });
    assert!(
        b_says_why,
        "B's status shows no inbound connection with error \"password mismatch\" within {WAIT_MAX:?}:{}",
        lab.report()
    );

    let b_name = b.status_json()["name"].clone();
    let d_name = d.status_json()["name"].clone();
    let joined = |status: &Value, other_name: &Value, other_nick: &str| {
        peers(status)
            .iter()
            .any(|p| p["name"] == *other_name || p["nickname"] == other_nick)
    };
    let ever_joined = lab::wait_for(Duration::from_secs(3), || {
        joined(&d.status_json(), &b_name, "b") || joined(&b.status_json(), &d_name, "d")
    });
    assert!(
        !ever_joined,
        "B and D list each other as peers despite different passwords:{}",
        lab.report()
    );
    assert!(
        lab::wait_for(WAIT_MAX, || reachable_nicknames(&b.status_json()) == ["a"]),
        "B lost its good peer A:{}",
        lab.report()
    );
}

/// Goal: the relay is a real dependency, and a restarted relay restores the path by itself.
/// Method: kill -9 B's daemon, see cA→cC fail, relaunch B with the same state dir and
/// arguments, and see the ping come back without touching A or C.
#[test]
fn killed_relay_breaks_path_and_restart_restores_it() {
    if lab::skip_unless_root("killed_relay_breaks_path_and_restart_restores_it") {
        return;
    }
    let line = Line::build();
    line.wait_converged();
    line.wait_ping("before killing B");

    line.b.kill9();
    assert!(
        lab::wait_for(WAIT_MAX, || !lab::ping(&line.ca.netns, CC_IP)),
        "cA still pings cC with B's daemon dead:{}",
        line.lab.report()
    );

    let args: Vec<&str> = line.b_args.iter().map(String::as_str).collect();
    line.b.launch(&args);
    line.wait_ping("after relaunching B");
}

/// Goal: junk at the sleeve port is dropped and counted, and the mesh keeps working.
/// Method: from A's netns send B's data port random bytes, a truncated header, a replay of a
/// datagram A really sent, and that datagram with one byte flipped; watch B's drop counters.
#[test]
fn garbage_at_the_data_port_is_dropped_and_counted() {
    if lab::skip_unless_root("garbage_at_the_data_port_is_dropped_and_counted") {
        return;
    }
    let line = Line::build();
    line.wait_converged();
    line.wait_ping("before sending garbage");

    let b_data = SocketAddrV4::new(line.b_on_link1, DATA_PORT);
    // A ping through the mesh makes A send B a sealed datagram carrying an Ethernet frame
    // of 98 bytes; 100 bytes or more skips anything smaller (ARP, keepalives).
    let capture = UdpCapture::start(&line.a.netns);
    let captured = lab::wait_for(WAIT_MAX, || lab::ping(&line.ca.netns, CC_IP))
        .then(|| capture.next_payload(b_data, 100, Duration::from_secs(5)))
        .flatten()
        .unwrap_or_else(|| {
            panic!(
                "captured no datagram from A to {b_data} while pinging:{}",
                line.lab.report()
            )
        });
    drop(capture);

    let to = SocketAddr::V4(b_data);
    let check = |what: &str, reason: &str, datagram: Vec<u8>| {
        let before = drops(&line.b, reason);
        lab::send_udp(&line.a.netns, to, datagram);
        assert!(
            lab::wait_for(WAIT_MAX, || drops(&line.b, reason) > before),
            "{what}: B's sleeve.drops.{reason} stayed at {before}:{}",
            line.lab.report()
        );
    };

    // Random bytes whose first byte (the kind) is no kind at all.
    let mut random = vec![0u8; 64];
    lab::TestRng::new(7).fill(&mut random);
    random[0] = 0xee;
    check("random bytes", "malformed", random);
    // A sealed-data kind byte, then the 16-byte header breaks off.
    check("truncated header", "truncated", vec![1, 0, 0, 0, 0, 0, 0]);
    check("replayed datagram", "replayed", captured.clone());
    // Flip a byte of the counter's high end: the counter is then new to B's replay window, so
    // the datagram reaches `open`, which must fail (the header is authenticated).
    let mut flipped = captured;
    flipped[8] ^= 0x40;
    check("datagram with a flipped byte", "auth_failed", flipped);

    line.wait_ping("after the garbage");
}

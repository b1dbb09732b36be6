//! A path that carries less than the container MTU assumes: the sleeve tells the container so
//! (ICMP "fragmentation needed"), and TCP adapts instead of stalling on its first full segment.
//!
//! ```text
//!   c1 10.46.0.1 (mtu 1376)                                  c2 10.46.0.2 (mtu 1376)
//!    |                                                         |
//!  [ a ] 10.250.1.1 ----u1 (mtu 1400)---- 10.250.1.2 [ b ]     both with a password: sleeve
//! ```
//! A full 1376-byte packet needs 1376 + 14 + 64 + 28 = 1482 bytes on the underlay; 1400 carries
//! frames up to 1400 - 28 - 64 = 1308 bytes, so IP packets up to 1294.

mod common;

use common::lab::{self, Lab, WAIT_MAX};
use std::net::Ipv4Addr;
use std::process::Command;

const C1: Ipv4Addr = Ipv4Addr::new(10, 46, 0, 1);
const C2: Ipv4Addr = Ipv4Addr::new(10, 46, 0, 2);
/// The IP MTU the sleeve can carry over a 1400-byte underlay.
const PATH_MTU: u32 = 1294;

/// Goal: a container that sends a packet too big for the underlay path to a peer learns the
/// path MTU from an ICMP error, as it would from a router, and TCP between containers moves
/// data intact at once. Method: lower the underlay veth to 1400 on both hosts before launch;
/// `ping -M do -s 1348` (a 1376-byte packet) must report `mtu = 1294` and fail; small pings
/// pass; 8 MiB over TCP arrive intact; status counts the too-big frames.
#[test]
fn sleeve_answers_too_big_frames_with_the_path_mtu_and_tcp_adapts() {
    if lab::skip_unless_root("sleeve_answers_too_big_frames_with_the_path_mtu_and_tcp_adapts") {
        return;
    }
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (a_ip, _) = lab.link(&a, &b);
    for host in [&a, &b] {
        let (ok, out) = lab::run_cmd(
            "ip",
            &["-n", &host.netns, "link", "set", "u1", "mtu", "1400"],
        );
        assert!(ok, "set underlay mtu: {out}");
    }
    a.launch(&["--password", "pw"]);
    b.launch(&["--password", "pw", &a_ip.to_string()]);
    let (c1, c2) = (lab.container(&a), lab.container(&b));
    a.attach(&c1, &format!("{C1}/24"));
    b.attach(&c2, &format!("{C2}/24"));
    assert!(
        lab::wait_for(WAIT_MAX, || lab::ping(&c1.netns, C2)),
        "small pings don't pass:{}",
        lab.report()
    );

    let ping = Command::new("ip")
        .args(["netns", "exec", &c1.netns, "ping", "-M", "do", "-s", "1348"])
        .args(["-c", "3", "-i", "0.2", "-W", "1", &C2.to_string()])
        .output()
        .expect("run ping");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    assert!(
        !ping.status.success(),
        "a 1376-byte packet with DF crossed a 1400-byte underlay with the sleeve's overhead:\n{text}"
    );
    assert!(
        text.contains(&format!("mtu = {PATH_MTU}")) || text.contains(&format!("mtu={PATH_MTU}")),
        "ping was not told the path MTU {PATH_MTU}:\n{text}{}",
        lab.report()
    );
    // Packets that fit still pass with DF.
    let fits = Command::new("ip")
        .args(["netns", "exec", &c1.netns, "ping", "-M", "do"])
        .args(["-s", &(PATH_MTU - 28).to_string()])
        .args(["-c", "1", "-W", "2", &C2.to_string()])
        .output()
        .expect("run ping");
    assert!(
        fits.status.success(),
        "a {PATH_MTU}-byte packet with DF did not pass:\n{}",
        String::from_utf8_lossy(&fits.stdout)
    );

    // TCP from c2's side too, whose kernel has not been told anything yet.
    for (from, to_ns, to) in [(&c1.netns, &c2.netns, C2), (&c2.netns, &c1.netns, C1)] {
        let t = lab::tcp_transfer(from, to_ns, to, 5001, 8 << 20)
            .unwrap_or_else(|e| panic!("tcp transfer to {to}: {e}{}", lab.report()));
        assert_eq!(t.received_bytes, 8 << 20, "{t:?}");
        assert_eq!(t.sent_sha256, t.received_sha256, "data changed on the way");
    }
    let drops = &a.status_json()["sleeve"]["drops"]["too_big"];
    assert!(
        drops.as_u64().is_some_and(|n| n >= 1),
        "status counts no too-big frames on a: {drops}"
    );
}

//! The kernel VXLAN fast path, chosen per peer, in the namespace lab.
//!
//! Every assertion is on what a user sees: `meshctl status --json` (overlay and reason per peer),
//! ping, and UDP broadcasts counted in each container. Faults are nft rules that drop the VXLAN
//! port (UDP 6785) inside one host's namespace.

mod common;

use common::lab::{self, Container, Host, Lab, WAIT_MAX};
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VXLAN_PORT: u16 = 6785;

/// The peer with nickname `nick` in `host`'s status.
fn peer(host: &Host, nick: &str) -> Value {
    let status = host.status_json();
    status["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["nickname"] == nick).cloned())
        .unwrap_or(Value::Null)
}

/// `overlay` and `overlay_reason` of peer `nick` in `host`'s status, e.g. ("vxlan", "").
fn overlay(host: &Host, nick: &str) -> (String, String) {
    let p = peer(host, nick);
    (
        p["overlay"].as_str().unwrap_or("").to_owned(),
        p["overlay_reason"].as_str().unwrap_or("").to_owned(),
    )
}

fn wait_overlay(lab: &Lab, host: &Host, nick: &str, want: &str, reason_part: &str) {
    let ok = lab::wait_for(WAIT_MAX, || {
        let (o, r) = overlay(host, nick);
        o == want && r.contains(reason_part)
    });
    assert!(
        ok,
        "host {} never showed peer {nick} on {want} ({reason_part}); now {:?}{}",
        host.name,
        overlay(host, nick),
        lab.report()
    );
}

fn attach(lab: &Lab, host: &Host, ip: Ipv4Addr) -> Container {
    let c = lab.container(host);
    host.attach(&c, &format!("{ip}/24"));
    c
}

fn nft(netns: &str, args: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "nft"])
        .args(args.split(' '))
        .output()
        .expect("run nft");
    assert!(
        out.status.success(),
        "nft {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two hosts A—B without a password, one container each (`{subnet}.1` on A, `.2` on B), waiting
/// until A shows B on VXLAN. Returns the lab, both hosts, A's container and B's container address.
fn two_hosts_on_vxlan(third_octet: u8) -> (Lab, Host, Host, Container, Ipv4Addr) {
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (a_ip, _) = lab.link(&a, &b);
    a.launch(&[]);
    b.launch(&[&a_ip.to_string()]);
    let (ip1, ip2) = (
        Ipv4Addr::new(10, third_octet, 0, 1),
        Ipv4Addr::new(10, third_octet, 0, 2),
    );
    let c1 = attach(&lab, &a, ip1);
    let _c2 = attach(&lab, &b, ip2);
    wait_overlay(&lab, &a, "b", "vxlan", "");
    (lab, a, b, c1, ip2)
}

#[test]
fn two_hosts_without_password_use_vxlan_fall_back_within_5s_and_return_within_15s() {
    if lab::skip_unless_root("two_hosts_vxlan") {
        return;
    }
    let (lab, a, b, c1, ip2) = two_hosts_on_vxlan(45);
    wait_overlay(&lab, &b, "a", "vxlan", "");
    assert_eq!(peer(&a, "b")["mtu"], 1376);
    assert!(lab::wait_for(WAIT_MAX, || lab::ping(&c1.netns, ip2)));
    // The traffic really takes the kernel path: the sleeve carried no frames for it.
    let before = a.status_json()["sleeve"]["tx_frames"].as_u64().unwrap();
    for _ in 0..5 {
        assert!(lab::ping(&c1.netns, ip2), "{}", lab.report());
    }
    let after = a.status_json()["sleeve"]["tx_frames"].as_u64().unwrap();
    assert!(
        after - before < 5,
        "pings went over the sleeve: {before} -> {after}"
    );

    // Break the VXLAN port on b; keep pinging throughout.
    let pinger = {
        let ns = c1.netns.clone();
        std::thread::spawn(move || {
            let mut ok = 0;
            let end = Instant::now() + Duration::from_secs(25);
            while Instant::now() < end {
                if lab::ping(&ns, ip2) {
                    ok += 1;
                }
            }
            ok
        })
    };
    nft(&b.netns, "add table inet fastpath");
    nft(
        &b.netns,
        "add chain inet fastpath input { type filter hook input priority 0 ; }",
    );
    nft(
        &b.netns,
        &format!("add rule inet fastpath input udp dport {VXLAN_PORT} drop"),
    );
    let broken = Instant::now();
    wait_overlay(&lab, &a, "b", "sleeve", "vxlan probe lost since");
    let fallback = broken.elapsed();
    assert!(
        fallback < Duration::from_secs(5),
        "fallback took {fallback:?}"
    );
    assert!(
        lab::wait_for(Duration::from_secs(5), || lab::ping(&c1.netns, ip2)),
        "no traffic over the sleeve after fallback{}",
        lab.report()
    );

    nft(&b.netns, "delete table inet fastpath");
    let healed = Instant::now();
    wait_overlay(&lab, &a, "b", "vxlan", "");
    let back = healed.elapsed();
    assert!(back < Duration::from_secs(15), "return took {back:?}");
    // A switch of overlay may lose the frame in flight (never duplicate it), so the first ping
    // after it may go unanswered; traffic must flow again at once after that.
    assert!(
        lab::wait_for(Duration::from_secs(5), || lab::ping(&c1.netns, ip2)),
        "no traffic over vxlan after the return{}",
        lab.report()
    );
    let ok = pinger.join().expect("pinger");
    // One ping per ~second of 25 (each lost one waits 1 s): most must pass across both switches.
    assert!(
        ok >= 12,
        "only {ok} pings passed during fallback and return"
    );
    eprintln!("fallback after {fallback:?}, return after {back:?}, {ok} pings passed");
}

#[test]
fn three_hosts_with_password_use_vxlan_only_inside_trusted_subnets() {
    if lab::skip_unless_root("three_hosts_trusted") {
        return;
    }
    let lab = Lab::new();
    let (a, b, c) = (lab.host("a"), lab.host("b"), lab.host("c"));
    let addrs = lab.switch(&[&a, &b, &c]);
    let trusted = ["--password", "pw", "--trusted-subnets", "10.250.0.0/16"];
    a.launch(&trusted);
    b.launch(&[&trusted[..], &[addrs[0].to_string().as_str()]].concat());
    c.launch(&["--password", "pw", &addrs[0].to_string()]);
    let ips = [1, 2, 3].map(|i| Ipv4Addr::new(10, 46, 0, i));
    let ca = attach(&lab, &a, ips[0]);
    let _cb = attach(&lab, &b, ips[1]);
    let cc = attach(&lab, &c, ips[2]);
    wait_overlay(&lab, &a, "b", "vxlan", "");
    wait_overlay(&lab, &b, "a", "vxlan", "");
    wait_overlay(&lab, &a, "c", "sleeve", "encryption required");
    wait_overlay(&lab, &c, "a", "sleeve", "encryption required");
    wait_overlay(&lab, &c, "b", "sleeve", "encryption required");
    for (from, to) in [(&ca, ips[1]), (&ca, ips[2]), (&cc, ips[1])] {
        assert!(
            lab::wait_for(WAIT_MAX, || lab::ping(&from.netns, to)),
            "ping {to}{}",
            lab.report()
        );
    }
}

/// Counts UDP datagrams carrying `tag` that arrive in a container, until stopped.
struct Counter {
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const BCAST_PORT: u16 = 7777;

impl Counter {
    fn start(netns: &str) -> Counter {
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (count, stop) = (count.clone(), stop.clone());
            lab::spawn_in_netns(netns, move || {
                let socket = UdpSocket::bind(("0.0.0.0", BCAST_PORT)).expect("bind counter");
                socket
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("timeout");
                let _ = ready_tx.send(());
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        if &buf[..n] == b"exactly-once" {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(WAIT_MAX)
            .expect("counter socket ready");
        Counter {
            count,
            stop,
            thread: Some(thread),
        }
    }

    fn get(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn reset(&self) {
        self.count.store(0, Ordering::Relaxed);
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn send_broadcast(netns: &str, to: Ipv4Addr) {
    lab::in_netns(netns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind sender");
        socket.set_broadcast(true).expect("broadcast");
        socket
            .send_to(b"exactly-once", SocketAddr::from((to, BCAST_PORT)))
            .expect("send broadcast");
    });
}

/// ```text
///        switch s1 (10.250.1.0/24)
///   [A] ------ [B] ------ [C --no-fastpath]
///               |
///          link 10.250.2.0/24
///               |
///              [D]
/// ```
/// A-B and B-D on VXLAN; A-C and B-C on sleeve (C offers no fast path); A-D and C-D relayed
/// through B. A broadcast from A reaches B over VXLAN and D through B over the sleeve (B gets a
/// relay-only copy), C over the sleeve: each container must see each broadcast exactly once.
#[test]
fn mixed_mesh_delivers_each_broadcast_exactly_once() {
    if lab::skip_unless_root("mixed_mesh") {
        return;
    }
    let lab = Lab::new();
    let (a, b, c, d) = (lab.host("a"), lab.host("b"), lab.host("c"), lab.host("d"));
    let s1 = lab.switch(&[&a, &b, &c]);
    let (b_on_link, _) = lab.link(&b, &d);
    a.launch(&[]);
    b.launch(&[&s1[0].to_string()]);
    c.launch(&["--no-fastpath", &s1[0].to_string()]);
    d.launch(&[&b_on_link.to_string()]);
    let ips = [1, 2, 3, 4].map(|i| Ipv4Addr::new(10, 47, 0, i));
    let containers: Vec<Container> = [&a, &b, &c, &d]
        .iter()
        .zip(ips)
        .map(|(h, ip)| attach(&lab, h, ip))
        .collect();
    wait_overlay(&lab, &a, "b", "vxlan", "");
    wait_overlay(&lab, &b, "a", "vxlan", "");
    wait_overlay(&lab, &b, "d", "vxlan", "");
    wait_overlay(&lab, &d, "b", "vxlan", "");
    wait_overlay(&lab, &a, "c", "sleeve", "peer does not support vxlan");
    wait_overlay(&lab, &c, "a", "sleeve", "fast path disabled");
    wait_overlay(&lab, &a, "d", "sleeve", "relayed");
    wait_overlay(&lab, &d, "a", "sleeve", "relayed");
    wait_overlay(&lab, &d, "c", "sleeve", "relayed");
    for (i, from) in containers.iter().enumerate() {
        for (j, to) in ips.iter().enumerate() {
            if i != j {
                assert!(
                    lab::wait_for(WAIT_MAX, || lab::ping(&from.netns, *to)),
                    "ping {i} -> {to}{}",
                    lab.report()
                );
            }
        }
    }

    let counters: Vec<Counter> = containers
        .iter()
        .map(|c| Counter::start(&c.netns))
        .collect();
    let broadcast = Ipv4Addr::new(10, 47, 0, 255);
    for (origin, from) in containers.iter().enumerate() {
        for c in &counters {
            c.reset();
        }
        send_broadcast(&from.netns, broadcast);
        let others = |n: usize| {
            counters
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != origin)
                .all(|(_, c)| c.get() >= n)
        };
        assert!(
            lab::wait_for(Duration::from_secs(5), || others(1)),
            "broadcast from container {origin} did not reach all: {:?}{}",
            counters.iter().map(Counter::get).collect::<Vec<_>>(),
            lab.report()
        );
        // Give a duplicate time to show up (a bounded wait that should run out).
        let dup = lab::wait_for(Duration::from_millis(1500), || {
            counters.iter().any(|c| c.get() > 1)
        });
        let seen: Vec<usize> = counters.iter().map(Counter::get).collect();
        assert!(
            !dup,
            "broadcast from container {origin} seen {seen:?} times{}",
            lab.report()
        );
        // The origin hears its own broadcast once through loopback; a second copy would have
        // come back over the mesh.
        assert_eq!(seen, vec![1; 4], "broadcast from container {origin}");
    }
}

/// Goal: when the underlay's MTU shrinks below what VXLAN needs at the container MTU, the peer moves
/// to the sleeve with a reason naming the MTU, small traffic keeps flowing, and it returns once the
/// MTU is restored. Method: lower the MTU of the veth on both ends of the underlay link.
#[test]
fn a_shrunk_path_mtu_moves_the_peer_to_sleeve_and_back() {
    if lab::skip_unless_root("shrunk_path_mtu") {
        return;
    }
    let (lab, a, b, c1, ip2) = two_hosts_on_vxlan(48);
    let set_mtu = |mtu: &str| {
        for host in [&a, &b] {
            let out = Command::new("ip")
                .args(["-n", &host.netns, "link", "set", "u1", "mtu", mtu])
                .output()
                .expect("run ip");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    // 1376 + 50 bytes of VXLAN no longer fit.
    set_mtu("1400");
    let shrunk = Instant::now();
    wait_overlay(&lab, &a, "b", "sleeve", "mtu");
    assert!(
        shrunk.elapsed() < Duration::from_secs(5),
        "fallback took {:?}",
        shrunk.elapsed()
    );
    assert!(
        lab::wait_for(Duration::from_secs(5), || lab::ping(&c1.netns, ip2)),
        "no small traffic after the MTU fallback{}",
        lab.report()
    );
    set_mtu("1500");
    let restored = Instant::now();
    wait_overlay(&lab, &a, "b", "vxlan", "");
    assert!(
        restored.elapsed() < Duration::from_secs(15),
        "return took {:?}",
        restored.elapsed()
    );
}

//! Container names across the mesh: a container on host A resolves a container on host C by name
//! through A's name server (on A's exposed bridge address) and pings it by that name; names added
//! with `dns-add` appear everywhere; detach and `dns-remove` take names away everywhere; other
//! names go to the host's upstream resolver.
//!
//! ```text
//!   [ a ] --u1-- [ b ] --u2-- [ c ]        a exposes itself (address from the mesh IPAM)
//!    ca                         cc         containers attached without --ip, named after their netns
//!   fake upstream resolver on a's 127.0.0.1:53 (a's /etc/netns/A/resolv.conf points there)
//! ```

mod common;

use common::lab::{self, Host, Lab, WAIT_MAX};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Files in `/etc/netns/NS/` that `ip netns exec NS` mounts over `/etc`; removed on drop.
struct NetnsEtc(Vec<PathBuf>);

impl NetnsEtc {
    fn resolv_conf(&mut self, ns: &str, text: &str) {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).expect("create /etc/netns dir");
        std::fs::write(dir.join("resolv.conf"), text).expect("write netns resolv.conf");
        self.0.push(dir);
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A DNS query for `name` of type `qtype` (1 = A).
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// (rcode, IPv4 addresses) of an answer whose records point back to the question.
fn parse_answer(buf: &[u8]) -> Option<(u8, Vec<Ipv4Addr>)> {
    let rcode = buf.get(3)? & 0xf;
    let ancount = u16::from_be_bytes([*buf.get(6)?, *buf.get(7)?]);
    let mut pos = 12;
    while *buf.get(pos)? != 0 {
        pos += 1 + *buf.get(pos)? as usize;
    }
    pos += 5;
    let mut addrs = Vec::new();
    for _ in 0..ancount {
        let rtype = u16::from_be_bytes([*buf.get(pos + 2)?, *buf.get(pos + 3)?]);
        let len = u16::from_be_bytes([*buf.get(pos + 10)?, *buf.get(pos + 11)?]) as usize;
        if rtype == 1 && len == 4 {
            let d = buf.get(pos + 12..pos + 16)?;
            addrs.push(Ipv4Addr::new(d[0], d[1], d[2], d[3]));
        }
        pos += 12 + len;
    }
    Some((rcode, addrs))
}

/// Asks `server:53` over UDP from inside `ns`; None if nothing came back in 5 s.
fn ask_udp(ns: &str, server: Ipv4Addr, name: &str) -> Option<(u8, Vec<Ipv4Addr>)> {
    let name = name.to_string();
    lab::in_netns(ns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
        socket.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        socket
            .send_to(&query(0x5151, &name, 1), (server, 53))
            .ok()?;
        let mut buf = [0u8; 1500];
        let (len, _) = socket.recv_from(&mut buf).ok()?;
        parse_answer(&buf[..len])
    })
}

/// The same over TCP (two-byte length prefix).
fn ask_tcp(ns: &str, server: Ipv4Addr, name: &str) -> Option<(u8, Vec<Ipv4Addr>)> {
    let name = name.to_string();
    lab::in_netns(ns, move || {
        let to = SocketAddr::from((server, 53));
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let q = query(0x7272, &name, 1);
        stream.write_all(&(q.len() as u16).to_be_bytes()).ok()?;
        stream.write_all(&q).ok()?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).ok()?;
        let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
        stream.read_exact(&mut reply).ok()?;
        parse_answer(&reply)
    })
}

/// A fake upstream resolver on 127.0.0.1:53 inside `ns` that answers every name with
/// 192.0.2.53, until `stop` exists.
fn fake_upstream(ns: &str, stop: PathBuf) {
    let socket = lab::in_netns(ns, || {
        UdpSocket::bind("127.0.0.1:53").expect("bind fake upstream")
    });
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("set timeout");
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !stop.exists() {
            let Ok((len, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let q = &buf[..len];
            let mut r = q.to_vec();
            r[2] |= 0x80;
            r[7] = 1;
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 53]);
            let _ = socket.send_to(&r, from);
        }
    });
}

fn names_on(host: &Host) -> Vec<String> {
    host.status_json()["dns"]["records"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|r| r["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn container_ip(ns: &str) -> Ipv4Addr {
    let out = Command::new("ip")
        .args(["-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .expect("run ip");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address on eth0 in {ns}: {text}"))
}

fn ping_name(ns: &str, name: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-c", "1", "-W", "2", "-q", name,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn container_on_a_resolves_and_pings_container_on_c_by_name_until_detached() {
    if lab::skip_unless_root("container_on_a_resolves_and_pings_container_on_c_by_name") {
        return;
    }
    let lab = Lab::new();
    let (a, b, c) = (lab.host("a"), lab.host("b"), lab.host("c"));
    let (_, b_ip) = lab.link(&a, &b);
    let (b_ip2, _) = lab.link(&b, &c);
    let mut etc = NetnsEtc(Vec::new());
    etc.resolv_conf(&a.netns, "nameserver 127.0.0.1\n");
    let stop = lab.dir().join("upstream-stop");
    fake_upstream(&a.netns, stop.clone());
    struct Stop(PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::fs::write(&self.0, b"");
        }
    }
    let _stop = Stop(stop);

    let init = ["--ipalloc-init", "consensus=3"];
    a.launch(&[init[0], init[1], &b_ip.to_string()]);
    b.launch(&[init[0], init[1], "--no-dns"]);
    c.launch(&[init[0], init[1], &b_ip2.to_string()]);

    let (ca, cc) = (lab.container(&a), lab.container(&c));
    for (host, ctr) in [(&a, &ca), (&c, &cc)] {
        let (ok, out, err) = host.meshctl(&["attach", &ctr.netns]);
        assert!(
            ok.success(),
            "attach {}: {out}{err}\n{}",
            ctr.netns,
            lab.report()
        );
    }
    let cc_ip = container_ip(&cc.netns);
    let cc_name = format!("{}.meshctl.local", cc.netns);

    // The host's address on the mesh comes from IPAM, and stays the same on a second expose.
    let (ok, out, err) = a.meshctl(&["expose"]);
    assert!(ok.success(), "expose: {out}{err}");
    let exposed: Ipv4Addr = out
        .split_whitespace()
        .find_map(|w| w.trim_end_matches(',').split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("expose doesn't say the address: {out}"));
    assert!(
        u32::from(exposed) >> 20 == u32::from(Ipv4Addr::new(10, 32, 0, 0)) >> 20,
        "exposed address {exposed} is not from 10.32.0.0/12"
    );
    let (_, again, _) = a.meshctl(&["expose"]);
    assert_eq!(again, out, "a second expose changed the address");
    let dns = &a.status_json()["dns"];
    assert_eq!(dns["listening"][0], exposed.to_string(), "{dns}");
    assert_eq!(dns["upstream"], "127.0.0.1:53", "{dns}");

    // ca resolves cc's name through A's name server (UDP and TCP), once gossip brought it.
    assert!(
        lab::wait_for(WAIT_MAX, || ask_udp(&ca.netns, exposed, &cc_name)
            == Some((0, vec![cc_ip]))),
        "ca can't resolve {cc_name} to {cc_ip}: {:?}\n{}",
        ask_udp(&ca.netns, exposed, &cc_name),
        lab.report()
    );
    assert_eq!(
        ask_tcp(&ca.netns, exposed, &cc_name.to_uppercase()),
        Some((0, vec![cc_ip]))
    );
    // ... and pings it by name, with a resolv.conf naming A's server.
    etc.resolv_conf(&ca.netns, &format!("nameserver {exposed}\n"));
    assert!(
        lab::wait_for(WAIT_MAX, || ping_name(&ca.netns, &cc_name)),
        "ca can't ping {cc_name}\n{}",
        lab.report()
    );
    // Other names go to the host's upstream.
    assert_eq!(
        ask_udp(&ca.netns, exposed, "example.org"),
        Some((0, vec![Ipv4Addr::new(192, 0, 2, 53)]))
    );
    assert_eq!(
        ask_udp(&ca.netns, exposed, "nothing.meshctl.local"),
        Some((3, vec![])),
        "an unknown mesh name is not NXDOMAIN"
    );
    let (ok, out, _) = b.meshctl(&["dns-lookup", &cc.netns]);
    assert!(
        ok.success() && out.trim() == cc_ip.to_string(),
        "dns-lookup on b: {out}"
    );
    let queries = a.status_json()["dns"]["queries"].as_u64().unwrap_or(0);
    assert!(queries >= 5, "status counts {queries} queries");

    // Names added by hand appear everywhere; only their host removes them.
    let (ok, out, err) = b.meshctl(&["dns-add", "svc", "10.32.99.9"]);
    assert!(ok.success(), "dns-add: {out}{err}");
    assert!(
        lab::wait_for(WAIT_MAX, || ask_udp(
            &ca.netns,
            exposed,
            "svc.meshctl.local"
        ) == Some((
            0,
            vec![Ipv4Addr::new(10, 32, 99, 9)]
        ))),
        "svc added on b doesn't resolve on a"
    );
    let (ok, _, err) = a.meshctl(&["dns-remove", "svc"]);
    assert!(
        !ok.success() && err.contains("host that added"),
        "removing b's name on a: {err}"
    );
    let (ok, _, err) = b.meshctl(&["dns-add", "bad_name", "10.32.99.9"]);
    assert!(!ok.success() && err.contains("not a DNS name"), "{err}");
    let (ok, out, err) = b.meshctl(&["dns-remove", "svc", "10.32.99.9"]);
    assert!(ok.success(), "dns-remove: {out}{err}");

    // Detach: the name is gone everywhere (tombstones win over the periodic full states).
    let (ok, out, err) = c.meshctl(&["detach", &cc.netns]);
    assert!(ok.success(), "detach: {out}{err}");
    assert!(
        lab::wait_for(WAIT_MAX, || ask_udp(&ca.netns, exposed, &cc_name)
            == Some((3, vec![]))),
        "{cc_name} still resolves after detach: {:?}",
        ask_udp(&ca.netns, exposed, &cc_name)
    );
    for host in [&a, &b, &c] {
        assert!(
            lab::wait_for(WAIT_MAX, || {
                let names = names_on(host);
                !names.contains(&cc_name) && !names.iter().any(|n| n.starts_with("svc."))
            }),
            "host {} still lists removed names: {:?}",
            host.name,
            names_on(host)
        );
    }
    let (ok, _, err) = b.meshctl(&["dns-lookup", &cc_name]);
    assert!(!ok.success() && err.contains("not found"), "{err}");

    // A container that exits without a detach loses its name too (with its address).
    let gone = lab.container(&c);
    let (ok, out, err) = c.meshctl(&["attach", &gone.netns, "--name", "shortlived"]);
    assert!(ok.success(), "attach shortlived: {out}{err}");
    assert!(
        lab::wait_for(WAIT_MAX, || a
            .meshctl(&["dns-lookup", "shortlived"])
            .0
            .success()),
        "shortlived never resolved on a"
    );
    let (ok, err) = lab::run_cmd("ip", &["netns", "del", &gone.netns]);
    assert!(ok, "ip netns del {}: {err}", gone.netns);
    assert!(
        lab::wait_for(WAIT_MAX, || !a
            .meshctl(&["dns-lookup", "shortlived"])
            .0
            .success()),
        "the name of a container that exited still resolves on a"
    );

    // hide stops the server and gives the address back.
    let (ok, out, err) = a.meshctl(&["hide"]);
    assert!(ok.success(), "hide: {out}{err}");
    assert_eq!(a.status_json()["dns"]["listening"], serde_json::json!([]));
    assert_eq!(ask_udp(&ca.netns, exposed, &cc_name), None);
}

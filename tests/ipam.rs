//! IPAM on real routers: containers attached without `--ip` get unique addresses from the
//! range, keep them across `kill -9` of their router, and stay unique across a partition.
//! Isolated subnets (`--ip net:CIDR`) reach each other across hosts but not the default subnet.
//!
//! ```text
//!   [ a ]   [ b ]   [ c ]      each with containers attached by `meshctl attach NS`
//!     |       |       |
//!     +-------+-------+  one switch (10.250.1.0/24); c's port goes down for the partition
//! ```

mod common;

use common::lab::{self, Container, Host, Lab, WAIT_MAX};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Command;

/// The container's IPv4 addresses with prefix, read from the kernel (`ip -j addr`).
fn addrs_of(c: &Container) -> Vec<(Ipv4Addr, u8)> {
    let out = Command::new("ip")
        .args(["-n", &c.netns, "-j", "addr", "show", "dev", "eth0"])
        .output()
        .expect("run ip");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut found = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["family"] == "inet" {
                let ip = a["local"].as_str().and_then(|s| s.parse().ok());
                let p = a["prefixlen"].as_u64();
                if let (Some(ip), Some(p)) = (ip, p) {
                    found.push((ip, p as u8));
                }
            }
        }
    }
    found
}

fn in_range(a: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX << (32 - prefix);
    u32::from(a) & mask == u32::from(net) & mask
}

/// `meshctl attach NS [ARGS]`; returns (success, stdout + stderr).
fn attach(host: &Host, c: &Container, args: &[&str]) -> (bool, String) {
    let mut full = vec!["attach", c.netns.as_str()];
    full.extend_from_slice(args);
    let (status, out, err) = host.meshctl(&full);
    (status.success(), format!("{out}{err}"))
}

fn attach_ok(lab: &Lab, host: &Host, c: &Container, args: &[&str]) -> Ipv4Addr {
    let (ok, text) = attach(host, c, args);
    assert!(
        ok,
        "host {}: attach {} {args:?} failed: {text}{}",
        host.name,
        c.netns,
        lab.report()
    );
    let a = addrs_of(c);
    assert_eq!(a.len(), 1, "{}: {a:?}", c.netns);
    a[0].0
}

fn ipam_json(host: &Host) -> serde_json::Value {
    let (status, out, _) = host.meshctl(&["ipam", "--json"]);
    if !status.success() {
        return serde_json::Value::Null;
    }
    serde_json::from_str(&out).unwrap_or_default()
}

fn reachable_count(host: &Host) -> usize {
    host.status_json()["peers"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["reachable"] == true).count())
        .unwrap_or(0)
}

/// Every container's address; panics on a duplicate or an address outside 10.32.0.0/12.
fn assert_unique(lab: &Lab, all: &[(Host, Container)]) -> BTreeMap<Ipv4Addr, String> {
    let mut seen: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for (_, c) in all {
        for (a, p) in addrs_of(c) {
            assert!(
                in_range(a, Ipv4Addr::new(10, 32, 0, 0), 12) && p == 12,
                "{}: {a}/{p} is outside 10.32.0.0/12",
                c.netns
            );
            if let Some(other) = seen.insert(a, c.netns.clone()) {
                panic!("{a} given to both {other} and {}{}", c.netns, lab.report());
            }
        }
    }
    seen
}

/// a, b and c on one switch, founding the ring together (consensus=3; b and c join through a).
/// Also returns a joiner's launch arguments, to relaunch one.
fn three_founders(lab: &Lab) -> ([Host; 3], Vec<String>) {
    let hosts = [lab.host("a"), lab.host("b"), lab.host("c")];
    let addrs = lab.switch(&[&hosts[0], &hosts[1], &hosts[2]]);
    let init = ["--ipalloc-init", "consensus=3"];
    hosts[0].launch(&init);
    let joiner = vec![init[0].to_owned(), init[1].to_owned(), addrs[0].to_string()];
    let args: Vec<&str> = joiner.iter().map(String::as_str).collect();
    hosts[1].launch(&args);
    hosts[2].launch(&args);
    (hosts, joiner)
}

#[test]
fn sixty_containers_unique_through_kill9_and_partition() {
    if lab::skip_unless_root("sixty_containers_unique_through_kill9_and_partition") {
        return;
    }
    let lab = Lab::new();
    let (hosts, joiner) = three_founders(&lab);
    let joiner: Vec<&str> = joiner.iter().map(String::as_str).collect();

    let mut all: Vec<(Host, Container)> = Vec::new();
    for i in 0..60 {
        let h = &hosts[i % 3];
        let c = lab.container(h);
        attach_ok(&lab, h, &c, &[]);
        all.push((h.clone(), c));
    }
    let before = assert_unique(&lab, &all);
    assert_eq!(before.len(), 60);

    // Every router lists its own containers' addresses as allocations.
    let b_addrs: BTreeSet<String> = all
        .iter()
        .filter(|(h, _)| h.name == "b")
        .map(|(_, c)| addrs_of(c)[0].0.to_string())
        .collect();

    // kill -9 b and relaunch it with the same state dir.
    hosts[1].kill9();
    hosts[1].launch(&joiner);
    let listed: BTreeSet<String> = ipam_json(&hosts[1])["allocations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["address"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(listed, b_addrs, "b after kill -9 lists other allocations");
    // Attaching an attached container again names the address it has.
    let (h, c) = all
        .iter()
        .find(|(h, _)| h.name == "b")
        .expect("a b container");
    let (ok, text) = attach(h, c, &[]);
    let kept = addrs_of(c)[0].0.to_string();
    assert!(!ok && text.contains(&kept), "re-attach: {text}");
    // New allocations on the restarted b don't collide.
    for _ in 0..3 {
        let c = lab.container(&hosts[1]);
        attach_ok(&lab, &hosts[1], &c, &[]);
        all.push((hosts[1].clone(), c));
    }
    assert_unique(&lab, &all);
    assert!(
        lab::wait_for(WAIT_MAX, || reachable_count(&hosts[0]) == 2),
        "a does not reach b and c again{}",
        lab.report()
    );

    // Partition c, attach on both sides, heal.
    let down = |state: &str| {
        let ok = Command::new("ip")
            .args(["-n", &hosts[2].netns, "link", "set", "u1", state])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip link set u1 {state} in c");
    };
    down("down");
    for i in 0..10 {
        let h = if i % 2 == 0 { &hosts[2] } else { &hosts[0] };
        let c = lab.container(h);
        attach_ok(&lab, h, &c, &[]);
        all.push((h.clone(), c));
    }
    down("up");
    assert!(
        lab::wait_for(WAIT_MAX, || reachable_count(&hosts[2]) == 2
            && reachable_count(&hosts[0]) == 2),
        "c does not rejoin{}",
        lab.report()
    );
    for _ in 0..3 {
        let c = lab.container(&hosts[2]);
        attach_ok(&lab, &hosts[2], &c, &[]);
        all.push((hosts[2].clone(), c));
    }
    assert_eq!(assert_unique(&lab, &all).len(), all.len());
    for h in &hosts {
        let j = ipam_json(h);
        assert_eq!(j["state"], "ready", "{}: {j}", h.name);
    }
}

#[test]
fn isolated_subnet_reaches_across_hosts_but_not_the_default_subnet() {
    if lab::skip_unless_root("isolated_subnet_reaches_across_hosts_but_not_the_default_subnet") {
        return;
    }
    let lab = Lab::new();
    let a = lab.host("a");
    let b = lab.host("b");
    let (a_addr, _) = lab.link(&a, &b);
    a.launch(&["--ipalloc-init", "consensus=2"]);
    b.launch(&["--ipalloc-init", "consensus=2", &a_addr.to_string()]);
    let net = ["--ip", "net:10.2.1.0/24"];
    let ca = lab.container(&a);
    let ip_ca = attach_ok(&lab, &a, &ca, &net);
    let cb = lab.container(&b);
    let ip_cb = attach_ok(&lab, &b, &cb, &net);
    let cd = lab.container(&b);
    let ip_cd = attach_ok(&lab, &b, &cd, &[]);
    assert_ne!(ip_ca, ip_cb);
    for ip in [ip_ca, ip_cb] {
        assert!(in_range(ip, Ipv4Addr::new(10, 2, 1, 0), 24), "{ip}");
    }
    assert!(in_range(ip_cd, Ipv4Addr::new(10, 32, 0, 0), 12), "{ip_cd}");
    assert!(
        lab::wait_for(WAIT_MAX, || lab::ping(&ca.netns, ip_cb)),
        "{ip_ca} cannot ping {ip_cb} on the same isolated subnet{}",
        lab.report()
    );
    assert!(!lab::ping(&ca.netns, ip_cd), "{ip_ca} reaches {ip_cd}");
    assert!(!lab::ping(&cd.netns, ip_cb), "{ip_cd} reaches {ip_cb}");
}

#[test]
fn blocked_attach_says_what_it_waits_for() {
    if lab::skip_unless_root("blocked_attach_says_what_it_waits_for") {
        return;
    }
    let lab = Lab::new();
    let a = lab.host("a");
    a.launch(&["--ipalloc-init", "consensus=2"]);
    let c = lab.container(&a);
    let (ok, text) = attach(&a, &c, &["--wait", "1"]);
    assert!(!ok, "attach succeeded without a quorum: {text}");
    assert!(text.contains("after waiting 1s"), "{text}");
    let j = ipam_json(&a);
    assert_eq!(j["state"], "waiting", "{j}");
    let waiting = j["waiting"].as_str().unwrap_or_default().to_owned();
    assert!(
        !waiting.is_empty() && text.contains(&waiting),
        "{text}\n{j}"
    );
    // consensus=2 needs both initial routers; only this one is here.
    assert!(waiting.contains("missing 1 more peer"), "{waiting}");
    let (status, out, _) = a.meshctl(&["ipam"]);
    assert!(status.success() && out.contains("waiting:"), "{out}");
}

/// Owned addresses per owner (peer name) in the default subnet, from `host`'s `meshctl ipam --json`.
fn owners(host: &Host) -> BTreeMap<String, u64> {
    let j = ipam_json(host);
    let mut out = BTreeMap::new();
    for s in j["subnets"].as_array().into_iter().flatten() {
        if s["subnet"] != "10.32.0.0/12" {
            continue;
        }
        for o in s["owners"].as_array().into_iter().flatten() {
            let who = o["peer"].as_str().unwrap_or_default().to_owned();
            let owned = o["owned"].as_u64().unwrap_or(0);
            if owned > 0 {
                out.insert(who, owned);
            }
        }
    }
    out
}

/// Goal: space never stays with a router that is gone. `meshctl reset` hands a router's space
/// to a live peer before it stops, and the host comes back as a new peer; `meshctl rmpeer` gives
/// a router killed for good back to the others once routers owning more than half of the range
/// agree; containers keep getting unique addresses throughout.
/// Method: a, b, c found the ring together (consensus=3), each attaches a container; c resets:
/// its container is detached, and a's view shows a and b owning the whole range, the heir two
/// thirds of it. c launches again under a new name and attaches a container. The router without
/// c's space is killed with -9 and the heir runs `rmpeer`: the heir and the new c then own
/// everything, and a new container on the heir gets an address unique among the live ones.
#[test]
fn reset_hands_space_over_and_rmpeer_reclaims_a_dead_router() {
    if lab::skip_unless_root("reset_hands_space_over_and_rmpeer_reclaims_a_dead_router") {
        return;
    }
    // 10.32.0.0/12 without its network and broadcast addresses.
    const RANGE: u64 = (1 << 20) - 2;
    let lab = Lab::new();
    let (hosts, joiner) = three_founders(&lab);
    let mut all: Vec<(Host, Container)> = Vec::new();
    for h in &hosts {
        let c = lab.container(h);
        attach_ok(&lab, h, &c, &[]);
        all.push((h.clone(), c));
    }
    assert_unique(&lab, &all);
    let [a, b, c] = &hosts;
    // Owners are listed by nickname only while the topology still holds them: compare names.
    let status = a.status_json();
    let name_of = |nick: &str| -> String {
        status["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["nickname"] == nick)
            .and_then(|p| p["name"].as_str())
            .unwrap_or_else(|| panic!("a does not know {nick}: {status}"))
            .to_owned()
    };
    let (name_b, name_c) = (name_of("b"), name_of("c"));
    let name_a = status["name"].as_str().expect("a's name").to_owned();
    let mut seen = BTreeMap::new();
    let founded = lab::wait_for(WAIT_MAX, || {
        seen = owners(a);
        seen.len() == 3 && seen.values().sum::<u64>() == RANGE
    });
    assert!(founded, "a's view of the owners: {seen:?}{}", lab.report());

    let (status, out, err) = c.meshctl(&["reset"]);
    assert!(
        status.success()
            && out.contains("detached 1 container")
            && out.contains("handed this router's address space to")
            && out.contains("joins as a new peer"),
        "reset on c: {out}{err}{}",
        lab.report()
    );
    // c's container leaves with it: its address now belongs to another router.
    assert!(
        addrs_of(&all[2].1).is_empty(),
        "c's container kept {:?} after reset",
        addrs_of(&all[2].1)
    );
    all.pop();
    let handed = lab::wait_for(WAIT_MAX, || {
        seen = owners(a);
        !seen.contains_key(&name_c) && seen.len() == 2 && seen.values().sum::<u64>() == RANGE
    });
    assert!(
        handed,
        "after c's reset, a's view of the owners: {seen:?}{}",
        lab.report()
    );
    // The heir holds two thirds; the other router one third.
    let (heir, other) = if seen[&name_a] > seen[&name_b] {
        ((a, &name_a), (b, &name_b))
    } else {
        ((b, &name_b), (a, &name_a))
    };
    assert!(
        seen[heir.1] > RANGE / 2,
        "the heir {} holds {} of {RANGE}",
        heir.1,
        seen[heir.1]
    );

    // c comes back as a new peer and gets an address from the others' space.
    let args: Vec<&str> = joiner.iter().map(String::as_str).collect();
    c.launch(&args);
    let new_c = c.status_json()["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        !new_c.is_empty() && new_c != name_c,
        "c kept its name {name_c} after reset"
    );
    let c2 = lab.container(c);
    attach_ok(&lab, c, &c2, &[]);
    all.push((c.clone(), c2));
    assert_unique(&lab, &all);

    let (killed, killed_name) = other;
    killed.kill9();
    all.retain(|(h, _)| h.name != killed.name);
    let gone = lab::wait_for(WAIT_MAX, || reachable_count(heir.0) == 1);
    assert!(
        gone,
        "{} still reaches {killed_name} after kill -9{}",
        heir.1,
        lab.report()
    );
    let share = ipam_json(heir.0)["reachable_percent"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        share > 50.0,
        "{} reaches owners of only {share}% of the range after {killed_name} died",
        heir.1
    );
    let (status, out, err) = heir.0.meshctl(&["rmpeer", killed_name]);
    assert!(
        status.success() && out.contains("reclaim of") && out.contains("more than half"),
        "rmpeer {killed_name} on {}: {out}{err}",
        heir.1
    );
    let reclaimed = lab::wait_for(WAIT_MAX, || {
        seen = owners(heir.0);
        !seen.contains_key(killed_name.as_str()) && seen.values().sum::<u64>() == RANGE
    });
    assert!(
        reclaimed,
        "after rmpeer {killed_name}, {}'s view of the owners: {seen:?}\n{}{}",
        heir.1,
        ipam_json(heir.0),
        lab.report()
    );
    assert!(
        seen.keys().all(|o| *o == *heir.1 || *o == new_c),
        "owners after rmpeer: {seen:?}"
    );
    // The killed router's space is the heir's now: its container went with it, and its
    // address may be given again.
    let d = lab.container(heir.0);
    let ip = attach_ok(&lab, heir.0, &d, &[]);
    all.push((heir.0.clone(), d));
    let unique = assert_unique(&lab, &all);
    assert!(unique.contains_key(&ip));
}

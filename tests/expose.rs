//! `meshctl expose` gives a host an address on the mesh: the host reaches containers on other hosts and
//! they reach it; `hide` takes it away again, with its masquerading rule.
//!
//! ```text
//!   host A (exposes 10.40.0.254/24) 10.250.1.1 --u1-- 10.250.1.2 [ B ] -- cB 10.40.0.2
//! ```

mod common;

use common::lab::{self, Lab, WAIT_MAX};
use std::process::Command;

fn nat_rules(netns: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "iptables",
            "-w",
            "5",
            "-t",
            "nat",
            "-S",
            "POSTROUTING",
        ])
        .output()
        .expect("run iptables");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn exposed_host_reaches_containers_and_hide_takes_it_back() {
    if lab::skip_unless_root("exposed_host_reaches_containers_and_hide_takes_it_back") {
        return;
    }
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (a_ip, _) = lab.link(&a, &b);
    let cb = lab.container(&b);
    a.launch(&[]);
    b.launch(&[&a_ip.to_string()]);
    b.attach(&cb, "10.40.0.2/24");

    let (ok, out, err) = a.meshctl(&["expose", "10.40.0.254/24"]);
    assert!(ok.success(), "expose failed: {out}{err}");
    assert!(
        out.contains("10.40.0.254/24"),
        "expose doesn't say the address: {out}"
    );
    assert!(
        nat_rules(&a.netns).contains("meshctl expose mesh"),
        "no masquerading rule:\n{}",
        nat_rules(&a.netns)
    );
    let host = "10.40.0.254".parse().unwrap();
    let container = "10.40.0.2".parse().unwrap();
    assert!(
        lab::wait_for(WAIT_MAX, || lab::ping(&a.netns, container)),
        "host A can't reach cB through its exposed address:\n{}",
        lab.report()
    );
    assert!(
        lab::ping(&cb.netns, host),
        "cB can't reach host A's exposed address"
    );

    let (ok, out, err) = a.meshctl(&["hide"]);
    assert!(ok.success(), "hide failed: {out}{err}");
    assert!(
        out.contains("no address"),
        "hide doesn't say the result: {out}"
    );
    assert!(
        !nat_rules(&a.netns).contains("meshctl expose"),
        "masquerading rule left behind"
    );
    assert!(
        !lab::ping(&cb.netns, host),
        "cB still reaches host A after hide"
    );

    let (ok, _, err) = a.meshctl(&["hide", "10.40.0.9/24"]);
    assert!(
        !ok.success() && err.contains("not exposed"),
        "hiding an unknown address: {err}"
    );
    let (ok, _, err) = a.meshctl(&["expose", "10.40.0.254"]);
    assert!(
        !ok.success() && err.contains("ADDRESS/PREFIX"),
        "bad CIDR: {err}"
    );
}

/// The exposed address of host `h` as `meshctl ipam --json` lists it (key `host:expose`), with
/// whether it is being released.
fn expose_allocation(h: &lab::Host) -> Option<(String, bool)> {
    let (status, out, _) = h.meshctl(&["ipam", "--json"]);
    if !status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v["allocations"].as_array()?.iter().find_map(|a| {
        (a["container"] == "host:expose").then(|| {
            (
                a["address"].as_str().unwrap_or_default().to_string(),
                a["releasing"] == true,
            )
        })
    })
}

#[test]
fn expose_without_cidr_takes_a_stable_address_from_ipam_and_hide_releases_it() {
    if lab::skip_unless_root("expose_without_cidr_takes_a_stable_address_from_ipam") {
        return;
    }
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (a_ip, _) = lab.link(&a, &b);
    let cb = lab.container(&b);
    a.launch(&["--ipalloc-init", "consensus=2"]);
    b.launch(&["--ipalloc-init", "consensus=2", &a_ip.to_string()]);
    let (ok, out, err) = b.meshctl(&["attach", &cb.netns]);
    assert!(ok.success(), "attach: {out}{err}\n{}", lab.report());

    let (ok, out, err) = a.meshctl(&["expose"]);
    assert!(ok.success(), "expose failed: {out}{err}\n{}", lab.report());
    let cidr = out
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string();
    let (addr, prefix) = cidr.split_once('/').expect("expose prints ADDR/PREFIX");
    let host: std::net::Ipv4Addr = addr.parse().expect("an IPv4 address");
    assert_eq!(
        prefix, "12",
        "the host gets the default subnet's prefix: {out}"
    );
    assert_eq!(
        expose_allocation(&a),
        Some((addr.to_string(), false)),
        "the address is not an IPAM allocation of the host"
    );
    let (_, again, _) = a.meshctl(&["expose"]);
    assert_eq!(again, out, "re-expose gave another address");

    let container = {
        let out = Command::new("ip")
            .args(["-n", &cb.netns, "-4", "-o", "addr", "show", "dev", "eth0"])
            .output()
            .expect("run ip");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let word = text
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .map(str::to_string);
        word.and_then(|w| w.split('/').next()?.parse::<std::net::Ipv4Addr>().ok())
            .unwrap_or_else(|| panic!("no address on cb: {text}"))
    };
    assert_ne!(container, host, "IPAM gave one address twice");
    assert!(
        lab::wait_for(WAIT_MAX, || lab::ping(&a.netns, container)),
        "host A can't reach cB through its IPAM address:\n{}",
        lab.report()
    );
    assert!(lab::ping(&cb.netns, host), "cB can't reach host A");

    let (ok, out, err) = a.meshctl(&["hide"]);
    assert!(
        ok.success() && out.contains("no address"),
        "hide: {out}{err}"
    );
    assert_ne!(
        expose_allocation(&a),
        Some((addr.to_string(), false)),
        "hide kept the address allocated"
    );
    assert!(
        !lab::ping(&cb.netns, host),
        "cB still reaches host A after hide"
    );
}

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

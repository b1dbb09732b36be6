//! A host firewalled the way Docker leaves it (br_netfilter on, FORWARD policy DROP) still carries
//! mesh traffic: the router adds its one ACCEPT rule for the bridge, on whichever iptables backend
//! holds rules (nft on host a, legacy on host b), removes it on stop, and touches nothing else.
//!
//! ```text
//!   [ a: iptables (nft) FORWARD DROP ]  ==veth 10.250.K.0/24==  [ b: iptables-legacy FORWARD DROP ]
//!     cA 10.50.0.1/24                                              cB 10.50.0.2/24
//! ```
//! Everything lives in the lab's namespaces, whose firewalls go away with them.

mod common;

use common::lab::{self, Host, Lab, WAIT_MAX};

/// `PROGRAM ARGS` inside the host's namespace; (success, output).
fn fw(host: &Host, program: &str, args: &[&str]) -> (bool, String) {
    let mut full = vec!["netns", "exec", &host.netns, program, "-w", "5"];
    full.extend_from_slice(args);
    lab::run_cmd("ip", &full)
}

/// Docker's part: bridged traffic passes iptables, FORWARD drops by default, plus one rule of
/// someone else's that must survive.
fn firewall_like_docker(host: &Host, program: &str) {
    let (ok, out) = lab::run_cmd(
        "ip",
        &[
            "netns",
            "exec",
            &host.netns,
            "sysctl",
            "-qw",
            "net.bridge.bridge-nf-call-iptables=1",
        ],
    );
    assert!(ok, "enable bridge netfilter in {}: {out}", host.name);
    for args in [
        &["-P", "FORWARD", "DROP"][..],
        &["-A", "FORWARD", "-s", "192.0.2.99/32", "-j", "DROP"][..],
    ] {
        let (ok, out) = fw(host, program, args);
        assert!(ok, "{program} {args:?} in {}: {out}", host.name);
    }
}

fn mesh_rule_present(host: &Host, program: &str) -> bool {
    let comment = "meshctl bridge mesh";
    fw(
        host,
        program,
        &[
            "-C",
            "FORWARD",
            "-i",
            "mesh",
            "-o",
            "mesh",
            "-m",
            "comment",
            "--comment",
            comment,
            "-j",
            "ACCEPT",
        ],
    )
    .0
}

/// Packets the mesh rule accepted so far.
fn mesh_rule_packets(host: &Host, program: &str) -> u64 {
    let rules = fw(host, program, &["-v", "-S", "FORWARD"]).1;
    rules
        .lines()
        .find(|l| l.contains("meshctl bridge mesh"))
        .and_then(|l| l.split(" -c ").nth(1))
        .and_then(|c| c.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn stop(host: &Host) {
    let (status, out, err) = host.meshctl(&["stop"]);
    assert!(status.success(), "stop {}: {out}{err}", host.name);
    assert!(
        lab::wait_for(WAIT_MAX, || !host.daemon_alive()),
        "router on {} did not exit",
        host.name
    );
}

#[test]
fn mesh_works_through_forward_drop_on_nft_and_legacy_hosts_and_cleans_up() {
    if lab::skip_unless_root(
        "mesh_works_through_forward_drop_on_nft_and_legacy_hosts_and_cleans_up",
    ) {
        return;
    }
    let backends = [("a", "iptables"), ("b", "iptables-legacy")];
    for (_, program) in backends {
        if !lab::run_cmd(program, &["--version"]).0 {
            eprintln!("skipping firewall test: {program} is not installed");
            return;
        }
    }
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (ca, cb) = (lab.container(&a), lab.container(&b));
    let (a_ip, _) = lab.link(&a, &b);
    firewall_like_docker(&a, "iptables");
    firewall_like_docker(&b, "iptables-legacy");

    // Once over the sleeve (a password: the TAP port), once over kernel VXLAN.
    for (round, password) in [("sleeve", Some("pw")), ("vxlan", None)] {
        let mut args: Vec<String> = Vec::new();
        if let Some(p) = password {
            args.extend(["--password".to_string(), p.to_string()]);
        }
        let a_args: Vec<&str> = args.iter().map(String::as_str).collect();
        a.launch(&a_args);
        let mut b_args = a_args.clone();
        let peer = a_ip.to_string();
        b_args.push(&peer);
        b.launch(&b_args);
        if round == "sleeve" {
            a.attach(&ca, "10.50.0.1/24");
            b.attach(&cb, "10.50.0.2/24");
        }
        for (host, program) in [(&a, "iptables"), (&b, "iptables-legacy")] {
            assert!(
                mesh_rule_present(host, program),
                "{round}: no {program} rule on {}:\n{}",
                host.name,
                fw(host, program, &["-S", "FORWARD"]).1
            );
        }
        assert!(
            lab::wait_for(WAIT_MAX, || lab::ping(
                &ca.netns,
                "10.50.0.2".parse().unwrap()
            )),
            "{round}: cA could not ping cB through FORWARD DROP:\n{}",
            lab.report()
        );
        assert!(
            lab::ping(&cb.netns, "10.50.0.1".parse().unwrap()),
            "{round}: cB -> cA"
        );
        let t = lab::tcp_transfer(
            &ca.netns,
            &cb.netns,
            "10.50.0.2".parse().unwrap(),
            5002,
            1 << 20,
        )
        .expect("tcp transfer");
        assert_eq!(t.sent_sha256, t.received_sha256);
        // The traffic really passed FORWARD (and so needed the rule).
        for (host, program) in [(&a, "iptables"), (&b, "iptables-legacy")] {
            assert!(
                mesh_rule_packets(host, program) > 0,
                "{round}: no packet hit the rule on {}",
                host.name
            );
        }

        stop(&a);
        stop(&b);
        for (host, program) in [(&a, "iptables"), (&b, "iptables-legacy")] {
            let rules = fw(host, program, &["-S", "FORWARD"]).1;
            assert!(
                !mesh_rule_present(host, program),
                "{round}: rule left on {}: {rules}",
                host.name
            );
            assert!(
                rules.contains("-P FORWARD DROP"),
                "{round}: policy changed on {}: {rules}",
                host.name
            );
            assert!(
                rules.contains("-A FORWARD -s 192.0.2.99/32 -j DROP"),
                "{round}: someone else's rule is gone on {}: {rules}",
                host.name
            );
        }
        // The other backend on each host was never touched.
        let other_a = fw(&a, "iptables-legacy", &["-S", "FORWARD"]).1;
        assert!(!other_a.contains("meshctl"), "{other_a}");
        let other_b = fw(&b, "iptables", &["-S", "FORWARD"]).1;
        assert!(!other_b.contains("meshctl"), "{other_b}");
    }
}

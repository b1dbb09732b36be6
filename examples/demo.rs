//! A three-host mesh in network namespaces, end to end: `sudo cargo run --example demo`.
//!
//! ```text
//!   c1 10.40.0.1        c2 10.40.0.2        c3 10.40.0.3
//!     |                   |                   |
//!   [ a ] ----u1------- [ b ] ------u2----- [ c ]
//!        10.250.1.0/24       10.250.2.0/24
//! ```
//! a and c have no IP path to each other; the mesh relays through b. The demo launches meshctl
//! with a password on each host, attaches one container per host, pings every container from
//! every other, prints each host's `meshctl status`, and removes everything on exit.

#[path = "../tests/common/lab.rs"]
mod lab;

use lab::{Lab, WAIT_MAX};
use std::net::Ipv4Addr;
use std::process::ExitCode;

fn main() -> ExitCode {
    if lab::skip_unless_root("demo") {
        return ExitCode::FAILURE;
    }
    if let Err(e) = lab::ensure_meshctl_built() {
        eprintln!("demo: {e}");
        return ExitCode::FAILURE;
    }
    let lab = Lab::new();
    let hosts = [lab.host("a"), lab.host("b"), lab.host("c")];
    let (a_on_link1, _) = lab.link(&hosts[0], &hosts[1]);
    let (b_on_link2, _) = lab.link(&hosts[1], &hosts[2]);
    println!("underlay: a --10.250.1.0/24-- b --10.250.2.0/24-- c (no IP forwarding anywhere)");

    hosts[0].launch(&["--password", "demo"]);
    hosts[1].launch(&["--password", "demo", &a_on_link1.to_string()]);
    hosts[2].launch(&["--password", "demo", &b_on_link2.to_string()]);
    println!("launched meshctl on a, b (peer {a_on_link1}) and c (peer {b_on_link2})");

    let mut containers = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let container = lab.container(host);
        let ip = Ipv4Addr::new(10, 40, 0, i as u8 + 1);
        host.attach(&container, &format!("{ip}/24"));
        println!("attached {} on {} as {ip}", container.netns, host.name);
        containers.push((container, ip));
    }

    let converged = lab::wait_for(WAIT_MAX, || {
        hosts.iter().all(|h| {
            h.status_json()["peers"]
                .as_array()
                .is_some_and(|p| p.iter().filter(|p| p["reachable"] == true).count() == 2)
        })
    });
    println!(
        "mesh {}",
        if converged {
            "converged: every host sees 2 reachable peers"
        } else {
            "did NOT converge within 30 s"
        }
    );

    let mut all_ok = converged;
    for (from, from_ip) in &containers {
        for (_, to_ip) in &containers {
            if from_ip == to_ip {
                continue;
            }
            let ok = lab::wait_for(WAIT_MAX, || lab::ping(&from.netns, *to_ip));
            all_ok &= ok;
            println!(
                "ping {from_ip} -> {to_ip}: {}",
                if ok { "ok" } else { "FAILED" }
            );
        }
    }

    for host in &hosts {
        let (_, out, err) = host.meshctl(&["status"]);
        println!("\n$ meshctl status   # on host {}\n{out}{err}", host.name);
    }
    drop(lab);
    println!("cleaned up");
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

//! The router serves Prometheus metrics on its host's loopback, and the text passes `promtool check
//! metrics` (Debian's prometheus package; `.ci/run` installs it).
//!
//! ```text
//!   [ a ] 10.250.1.1 --u1-- 10.250.1.2 [ b ]     each scrapes its own loopback: a on the
//!                                                 default 127.0.0.1:6782, b on --metrics-addr
//! ```

mod common;

use common::lab::{self, in_netns, Lab, WAIT_MAX};
use std::io::{Read, Write};
use std::process::{Command, Stdio};

/// b serves its metrics elsewhere, to show the address is configurable.
const B_METRICS: &str = "127.0.0.1:16782";

fn scrape(netns: &str) -> Result<String, String> {
    scrape_at(netns, "127.0.0.1:6782")
}

fn scrape_at(netns: &str, addr: &'static str) -> Result<String, String> {
    in_netns(netns, move || {
        let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP body")?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(head.to_string());
        }
        Ok(body.to_string())
    })
}

/// The value of the first sample whose line starts with `prefix`.
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_pass_promtool_and_show_peers_and_traffic() {
    if lab::skip_unless_root("metrics_pass_promtool_and_show_peers_and_traffic") {
        return;
    }
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (a_ip, _) = lab.link(&a, &b);
    a.launch(&["--password", "pw"]);
    b.launch(&[
        "--password",
        "pw",
        "--metrics-addr",
        B_METRICS,
        &a_ip.to_string(),
    ]);
    let mut body = String::new();
    let seen = lab::wait_for(WAIT_MAX, || match scrape(&a.netns) {
        Ok(text) => {
            body = text;
            body.contains("meshctl_peer_reachable{peer=") && body.contains("} 1")
        }
        Err(_) => false,
    });
    assert!(
        seen,
        "a's metrics never showed b reachable:\n{body}\n{}",
        lab.report()
    );
    for family in [
        "meshctl_info",
        "meshctl_connections",
        "meshctl_sleeve_datagrams_total",
        "meshctl_sleeve_drops_total{reason=\"replayed\"}",
        "meshctl_peer_overlay{peer=",
        "meshctl_peer_path_mtu_bytes{peer=",
        "meshctl_peer_key_age_seconds{peer=",
        "meshctl_peer_control_packets_total{peer=",
        "meshctl_peer_sleeve_bytes_total{peer=",
        "meshctl_peer_sleeve_packets_total{peer=",
        "meshctl_sleeve_bytes_total{direction=\"rx\"}",
        "meshctl_ipam_addresses",
        "meshctl_dns_queries_total{outcome=\"answered\"}",
    ] {
        assert!(body.contains(family), "metrics lack {family}:\n{body}");
    }
    // What a user graphs: b's RTT is measured, and gossip has flowed both ways.
    let rtt = sample(&body, "meshctl_peer_rtt_seconds{peer=");
    assert!(rtt.is_some_and(|r| r > 0.0), "no RTT > 0 for b:\n{body}");
    for direction in ["rx", "tx"] {
        let family = format!("meshctl_gossip_bytes_total{{direction=\"{direction}\"}}");
        let bytes = sample(&body, &family);
        assert!(
            bytes.is_some_and(|b| b > 0.0),
            "{family} is not > 0:\n{body}"
        );
    }
    let b_body = scrape_at(&b.netns, B_METRICS)
        .unwrap_or_else(|e| panic!("b's metrics on {B_METRICS}: {e}{}", lab.report()));
    assert!(b_body.contains("meshctl_info{"), "{b_body}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed: .ci/run installs it");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

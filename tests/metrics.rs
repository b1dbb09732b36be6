//! The router serves Prometheus metrics on its host's loopback, and the text passes `promtool check
//! metrics` (Debian's prometheus package; `.ci/run` installs it).
//!
//! ```text
//!   [ a ] 10.250.1.1 --u1-- 10.250.1.2 [ b ]     a scrapes its own 127.0.0.1:6782
//! ```

mod common;

use common::lab::{self, in_netns, Lab, WAIT_MAX};
use std::io::{Read, Write};
use std::process::{Command, Stdio};

fn scrape(netns: &str) -> Result<String, String> {
    in_netns(netns, || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:6782").map_err(|e| e.to_string())?;
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

#[test]
fn metrics_pass_promtool_and_show_peers_and_traffic() {
    if lab::skip_unless_root("metrics_pass_promtool_and_show_peers_and_traffic") {
        return;
    }
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (a_ip, _) = lab.link(&a, &b);
    a.launch(&["--password", "pw"]);
    b.launch(&["--password", "pw", &a_ip.to_string()]);
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
    ] {
        assert!(body.contains(family), "metrics lack {family}:\n{body}");
    }
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

//! What `meshctl status [SECTION]` and `meshctl report` show a user about the mesh.
//!
//! ```text
//!   csta 10.41.0.1                                          cstc 10.41.0.3
//!    |  (meshctl attach)                                      |  (meshctl attach)
//!  [ sta ] 10.250.1.1 --u1-- 10.250.1.2 [ stb ] 10.250.2.1 --u2-- 10.250.2.2 [ stc ]
//! ```
//! sta reaches only stb, stb only stc, no host forwards IP, and all three have a password (so
//! everything goes over the sleeve): sta sees stb directly and stc relayed via stb. The report test
//! uses only sta and stb.

mod common;

use common::lab::{self, Container, Host, Lab, WAIT_MAX};
use serde_json::Value;
use std::net::Ipv4Addr;

const PASSWORD: &str = "pw";
const CA_IP: Ipv4Addr = Ipv4Addr::new(10, 41, 0, 1);
const CC_IP: Ipv4Addr = Ipv4Addr::new(10, 41, 0, 3);

/// The peer with this nickname in a status document.
fn peer<'a>(status: &'a Value, nickname: &str) -> Option<&'a Value> {
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["nickname"] == nickname)
}

/// `meshctl ARGS` on `host`; its stdout, or a panic with stderr and the lab report.
fn run(lab: &Lab, host: &Host, args: &[&str]) -> String {
    let (status, out, err) = host.meshctl(args);
    assert!(
        status.success(),
        "meshctl {} on {} failed ({status}): {err}{}",
        args.join(" "),
        host.name,
        lab.report()
    );
    out
}

/// Parses a table printed by meshctl (left-aligned columns under upper-case headers) into one
/// map per row, cutting each line at the header's column starts.
fn parse_table(text: &str, first_header: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(first_header));
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    // Column starts: a header name begins after two spaces (or at the first non-space).
    let bytes = header.as_bytes();
    let mut starts = Vec::new();
    for i in 0..bytes.len() {
        let begins = bytes[i] != b' ' && (i < 2 || (bytes[i - 1] == b' ' && bytes[i - 2] == b' '));
        if begins {
            starts.push(i);
        }
    }
    let cut = |line: &str, k: usize| -> String {
        let end = starts
            .get(k + 1)
            .copied()
            .unwrap_or(usize::MAX)
            .min(line.len());
        line.get(starts[k].min(line.len())..end)
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let names: Vec<String> = (0..starts.len()).map(|k| cut(header, k)).collect();
    lines
        .take_while(|l| l.starts_with("  ") && !l.trim().is_empty())
        .map(|l| {
            names
                .iter()
                .enumerate()
                .map(|(k, n)| (n.clone(), cut(l, k)))
                .collect()
        })
        .collect()
}

struct Line {
    lab: Lab,
    a: Host,
    c: Host,
    b_on_link2: Ipv4Addr,
    ca: Container,
}

impl Line {
    fn build() -> Line {
        let lab = Lab::new();
        let (a, b, c) = (lab.host("sta"), lab.host("stb"), lab.host("stc"));
        let (a_on_link1, _) = lab.link(&a, &b);
        let (b_on_link2, _) = lab.link(&b, &c);
        a.launch(&["--password", PASSWORD]);
        b.launch(&["--password", PASSWORD, &a_on_link1.to_string()]);
        c.launch(&["--password", PASSWORD, &b_on_link2.to_string()]);
        let ca = lab.container(&a);
        a.attach(&ca, &format!("{CA_IP}/24"));
        let cc = lab.container(&c);
        c.attach(&cc, &format!("{CC_IP}/24"));
        Line {
            lab,
            a,
            c,
            b_on_link2,
            ca,
        }
    }
}

/// Goal: `meshctl status peers` tells the user, per peer, the overlay, the path (direct or via
/// whom), a measured RTT and traffic counters that move when containers talk.
/// Method: on the sta—stb—stc line, wait for sta to reach both with an RTT to stb, read stb's
/// sleeve counters, ping csta→cstc (relayed by stb, so it crosses the sta—stb link), and require
/// both directions' counters to have grown; then read the same from the human table.
#[test]
fn status_peers_shows_overlay_path_rtt_and_traffic_that_grows_with_a_ping() {
    if lab::skip_unless_root(
        "status_peers_shows_overlay_path_rtt_and_traffic_that_grows_with_a_ping",
    ) {
        return;
    }
    let line = Line::build();
    let (lab, a) = (&line.lab, &line.a);
    let mut last = Value::Null;
    let ready = lab::wait_for(WAIT_MAX, || {
        last = a.status_json();
        let rtt = peer(&last, "stb").and_then(|p| p["link"]["rtt_ms"].as_f64());
        let c_via_b = peer(&last, "stc").is_some_and(|p| {
            p["reachable"] == true && p["relayed_via"] == peer(&last, "stb").unwrap()["name"]
        });
        rtt.is_some_and(|r| r > 0.0) && c_via_b
    });
    assert!(
        ready,
        "sta's status never showed stb with an RTT > 0 and stc relayed via stb:\n{last:#}{}",
        lab.report()
    );
    let b = peer(&last, "stb").unwrap().clone();
    assert_eq!(b["overlay"], "sleeve", "stb's overlay: {b:#}");
    assert_eq!(b["relayed_via"], Value::Null, "stb is direct: {b:#}");
    assert!(
        peer(&last, "stc").unwrap()["link"].is_null(),
        "stc is not directly connected, yet has link measurements:\n{last:#}"
    );
    let counters = |s: &Value| -> [u64; 4] {
        let link = &peer(s, "stb").map_or(&Value::Null, |p| &p["link"]);
        ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes"].map(|k| link[k].as_u64().unwrap_or(0))
    };
    // End to end, per peer: frames between our containers and stc's, though stb relays them.
    let to_c = |s: &Value| -> [u64; 4] {
        let sleeve = &peer(s, "stc").map_or(&Value::Null, |p| &p["traffic"]["sleeve"]);
        ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes"]
            .map(|k| sleeve[k].as_u64().unwrap_or(0))
    };
    let before = counters(&last);
    let before_c = to_c(&last);

    assert!(
        lab::wait_for(WAIT_MAX, || lab::ping(&line.ca.netns, CC_IP)),
        "csta cannot ping cstc through stb:{}",
        lab.report()
    );
    let (mut after, mut after_c) = (before, before_c);
    let grew = lab::wait_for(WAIT_MAX, || {
        let now = a.status_json();
        after = counters(&now);
        after_c = to_c(&now);
        after.iter().zip(&before).all(|(n, b)| n > b)
            && after_c.iter().zip(&before_c).all(|(n, b)| n > b)
    });
    assert!(
        grew,
        "after a ping, on sta: stb's link counters went {before:?} -> {after:?}, \
         stc's end-to-end traffic {before_c:?} -> {after_c:?} (all should grow){}",
        lab.report()
    );
    // An echo and its reply are 98-byte frames: at least one each way reached stc.
    assert!(
        after_c[1] - before_c[1] >= 98 && after_c[3] - before_c[3] >= 98,
        "stc's traffic bytes grew by less than one echo: {before_c:?} -> {after_c:?}"
    );

    let text = run(lab, a, &["status", "peers"]);
    eprintln!("meshctl status peers on sta:\n{text}");
    let rows = parse_table(&text, "NAME");
    let row = |nick: &str| {
        rows.iter()
            .find(|r| r.get("NICKNAME").map(String::as_str) == Some(nick))
            .unwrap_or_else(|| panic!("no row for {nick} in `meshctl status peers`:\n{text}"))
    };
    let rb = row("stb");
    assert_eq!(rb["OVERLAY"], "sleeve", "{text}");
    assert_eq!(rb["VIA"], "direct", "{text}");
    let rtt: f64 = rb["RTT"]
        .strip_suffix("ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RTT cell {:?} is not like 0.42ms:\n{text}", rb["RTT"]));
    assert!(rtt > 0.0, "RTT {rtt} in:\n{text}");
    assert!(rb["LOSS"].ends_with('%'), "{text}");
    assert_eq!(rb["MTU"], "1376", "{text}");
    assert!(
        rb["PATH MTU"].parse::<u32>().is_ok_and(|m| m >= 1200),
        "{text}"
    );
    for col in ["RX BYTES / PKTS", "TX BYTES / PKTS"] {
        assert!(
            rb[col].contains(" / "),
            "{col} of stb: {:?}\n{text}",
            rb[col]
        );
    }
    assert!(
        rb["KEY AGE"].ends_with('s') || rb["KEY AGE"].ends_with('m'),
        "{text}"
    );
    let rc = row("stc");
    assert_eq!(rc["VIA"], "stb", "{text}");
    assert_eq!(rc["OVERLAY"], "sleeve", "{text}");
    assert_eq!(rc["RTT"], "-", "{text}");
    for col in ["RX BYTES / PKTS", "TX BYTES / PKTS"] {
        let packets: u64 = rc[col]
            .rsplit(" / ")
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{col} of stc: {:?}\n{text}", rc[col]));
        assert!(packets >= 1, "{col} of relayed stc counts nothing:\n{text}");
    }

    // The other sections, one at a time and all together.
    let text = run(lab, &line.c, &["status", "targets"]);
    let targets = parse_table(&text, "ADDRESS");
    let to_b = format!("{}:6783", line.b_on_link2);
    assert!(
        targets
            .iter()
            .any(|t| t["ADDRESS"] == to_b && t["SOURCE"] == "user" && t["STATE"] == "connected"),
        "stc's targets lack {to_b} (user, connected):\n{text}"
    );
    let text = run(lab, a, &["status", "connections"]);
    let conns = parse_table(&text, "ADDRESS");
    assert!(
        conns
            .iter()
            .any(|c| c["STATE"] == "established" && c["PEER"].ends_with("(stb)")),
        "sta's connections lack an established one with stb:\n{text}"
    );
    let text = run(lab, a, &["status", "dns"]);
    assert!(
        text.starts_with("DNS not enabled") || text.starts_with("DNS: domain"),
        "{text}"
    );
    let text = run(lab, a, &["status", "ipam"]);
    assert!(text.starts_with("IPAM: "), "{text}");
    let all = run(lab, a, &["status"]);
    eprintln!("meshctl status on sta:\n{all}");
    for heading in [
        "Router ",
        "Peers (2):",
        "Connections (",
        "Targets (",
        "IPAM: ",
        "Sleeve (",
    ] {
        assert!(
            all.contains(heading),
            "`meshctl status` lacks {heading:?}:\n{all}"
        );
    }
    let json: Value = serde_json::from_str(&run(lab, a, &["status", "peers", "--json"]))
        .expect("status peers --json is JSON");
    assert_eq!(json.as_array().map(Vec::len), Some(2), "{json:#}");
}

/// The rows of docs/report.md's field tables: (dotted path with `[]` for arrays, type, checked).
fn documented_fields() -> Vec<(String, String, bool)> {
    let doc = include_str!("../docs/report.md");
    doc.lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let path = cells.get(1)?.trim_matches('`');
            // The metrics table names families, not fields.
            if path.starts_with("meshctl_") {
                return None;
            }
            Some((
                path.to_string(),
                cells.get(2)?.to_string(),
                cells.iter().rev().nth(1) == Some(&"test"),
            ))
        })
        .collect()
}

/// Every value at `path` (`a.b[].c`) in `doc`; arrays fan out, missing keys give nothing.
fn values_at<'a>(doc: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![doc];
    for part in path.split('.') {
        let (key, array) = match part.strip_suffix("[]") {
            Some(k) => (k, true),
            None => (part, false),
        };
        let mut next = Vec::new();
        for v in current {
            let Some(child) = v.as_object().and_then(|o| o.get(key)) else {
                continue;
            };
            match (array, child) {
                (true, Value::Array(items)) => next.extend(items.iter()),
                (true, _) => {}
                (false, c) => next.push(c),
            }
        }
        current = next;
    }
    current
}

/// Whether `v` has the documented type (`string`, `u64?`, `[peer]`, `{string: u64}`, ...).
fn has_type(v: &Value, ty: &str) -> bool {
    if let Some(inner) = ty.strip_suffix('?') {
        return v.is_null() || has_type(v, inner);
    }
    match ty {
        "string" => v.is_string(),
        "bool" => v.is_boolean(),
        "u32" | "u64" => v.is_u64(),
        "f64" => v.is_number(),
        t if t.starts_with('[') => v.is_array(),
        _ => v.is_object(),
    }
}

/// Goal: `meshctl report` is one JSON document with every field docs/report.md promises, with
/// the documented types, so scripts can rely on the schema.
/// Method: two routers with a password; once stb shows sta with link measurements, parse stb's
/// report and look up every documented field marked `test` (nullable ones may be null, but the
/// key must be there).
#[test]
fn report_is_json_with_every_documented_field() {
    if lab::skip_unless_root("report_is_json_with_every_documented_field") {
        return;
    }
    let lab = Lab::new();
    let (a, b) = (lab.host("sta"), lab.host("stb"));
    let (a_ip, _) = lab.link(&a, &b);
    a.launch(&["--password", PASSWORD]);
    b.launch(&["--password", PASSWORD, &a_ip.to_string()]);
    let linked = lab::wait_for(WAIT_MAX, || {
        peer(&b.status_json(), "sta").is_some_and(|p| p["link"].is_object())
    });
    assert!(
        linked,
        "stb never showed sta with link measurements:{}",
        lab.report()
    );

    // A reader that goes away (`meshctl report | head`) ends meshctl quietly, not in a panic.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let closed = std::process::Command::new("ip")
        .args(["netns", "exec", &b.netns])
        .arg(lab::meshctl_bin())
        .arg("--state-dir")
        .arg(&b.state_dir)
        .arg("report")
        .stdout(writer)
        .output()
        .expect("run meshctl report");
    let err = String::from_utf8_lossy(&closed.stderr);
    assert!(
        closed.status.success() && !err.contains("panicked"),
        "meshctl report into a closed pipe: {} {err}",
        closed.status
    );

    let text = run(&lab, &b, &["report"]);
    let report: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("`meshctl report` is not JSON ({e}):\n{text}"));
    assert_eq!(report["schema_version"], 1, "{report:#}");
    let fields = documented_fields();
    assert!(
        fields.len() > 50,
        "docs/report.md lists only {} fields",
        fields.len()
    );
    let mut missing = Vec::new();
    for (path, ty, checked) in &fields {
        if !checked {
            continue;
        }
        let values = values_at(&report, path);
        if values.is_empty() {
            missing.push(format!("{path} (absent)"));
        } else if let Some(bad) = values.iter().find(|v| !has_type(v, ty)) {
            missing.push(format!("{path}: {bad} is not {ty}"));
        }
    }
    assert!(
        missing.is_empty(),
        "`meshctl report` does not match docs/report.md:\n  {}\n{report:#}",
        missing.join("\n  ")
    );
}

/// Goal: for a peer on the kernel VXLAN fast path, status still measures the link (RTT, path
/// MTU, key age) and counts the traffic with that peer, although no frame of it passes through
/// the router. Method: sta and stb without a password (so they pick VXLAN), a container on each;
/// once stb is on `vxlan`, 20 pings between the containers must show up in sta's
/// `traffic.vxlan` for stb (nftables counters) in both directions and in the table's columns.
#[test]
fn status_on_vxlan_measures_the_link_and_counts_traffic_in_the_kernel() {
    if lab::skip_unless_root("status_on_vxlan_measures_the_link_and_counts_traffic_in_the_kernel") {
        return;
    }
    let lab = Lab::new();
    let (a, b) = (lab.host("sta"), lab.host("stb"));
    let (a_ip, _) = lab.link(&a, &b);
    a.launch(&[]);
    b.launch(&[&a_ip.to_string()]);
    let mut last = Value::Null;
    let on_vxlan = lab::wait_for(WAIT_MAX, || {
        last = a.status_json();
        peer(&last, "stb").is_some_and(|p| {
            p["overlay"] == "vxlan" && p["link"]["rtt_ms"].as_f64().is_some_and(|r| r > 0.0)
        })
    });
    assert!(
        on_vxlan,
        "sta never showed stb on vxlan with an RTT:\n{last:#}{}",
        lab.report()
    );
    let link = &peer(&last, "stb").unwrap()["link"];
    assert!(
        link["path_mtu_bytes"].as_u64().is_some_and(|m| m >= 1200),
        "{link:#}"
    );
    assert!(
        last["vxlan_counting"]
            .as_str()
            .is_some_and(|c| c.starts_with("nftables table ip ")),
        "vxlan_counting: {}",
        last["vxlan_counting"]
    );

    let (ca, cb) = (lab.container(&a), lab.container(&b));
    a.attach(&ca, &format!("{CA_IP}/24"));
    b.attach(&cb, &format!("{CC_IP}/24"));
    assert!(
        lab::wait_for(WAIT_MAX, || lab::ping(&ca.netns, CC_IP)),
        "csta cannot ping cstb over vxlan:{}",
        lab.report()
    );
    let vxlan = |s: &Value| -> [u64; 4] {
        let v = &peer(s, "stb").map_or(&Value::Null, |p| &p["traffic"]["vxlan"]);
        ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes"].map(|k| v[k].as_u64().unwrap_or(0))
    };
    let before = vxlan(&a.status_json());
    let ping = std::process::Command::new("ip")
        .args(["netns", "exec", &ca.netns, "ping", "-c", "20", "-i", "0.02"])
        .args(["-W", "1", "-q", &CC_IP.to_string()])
        .output()
        .expect("run ping");
    assert!(ping.status.success(), "20 pings csta -> cstb failed");
    let now = a.status_json();
    let after = vxlan(&now);
    assert_eq!(
        peer(&now, "stb").unwrap()["overlay"],
        "vxlan",
        "stb left vxlan during the pings:\n{now:#}"
    );
    let grew: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    // 20 echoes each way, 98 bytes of Ethernet frame each (encapsulation not counted).
    assert!(
        grew[0] >= 20 && grew[2] >= 20 && grew[1] >= 20 * 98 && grew[3] >= 20 * 98,
        "stb's traffic.vxlan on sta grew by {grew:?} (rx pkts, rx bytes, tx pkts, tx bytes) for 20 pings:\n{now:#}"
    );
    let text = run(&lab, &a, &["status", "peers"]);
    let rows = parse_table(&text, "NAME");
    let rb = rows
        .iter()
        .find(|r| r["NICKNAME"] == "stb")
        .unwrap_or_else(|| panic!("no stb row:\n{text}"));
    assert_eq!(rb["OVERLAY"], "vxlan", "{text}");
    for col in ["RX BYTES / PKTS", "TX BYTES / PKTS"] {
        let packets: u64 = rb[col]
            .rsplit(" / ")
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{col} of stb: {:?}\n{text}", rb[col]));
        assert!(packets >= 20, "{col} of stb on vxlan:\n{text}");
    }
    assert!(rb["RTT"].ends_with("ms"), "{text}");
}

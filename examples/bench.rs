//! Throughput and latency of the overlays against the bare underlay, run by hand:
//! `sudo cargo run --release --example bench` (set BENCH_SECONDS to shorten the 10 s runs).
//!
//! ```text
//!   c1 10.4x.0.1                          c2 10.4x.0.2
//!     |  veth / meshctl attach              |
//!   [ a ] 10.250.1.1 ----u1---- 10.250.1.2 [ b ]
//! ```
//! Each row gets a fresh lab: two hosts on a veth underlay and, except for "raw underlay", one
//! container per host. iperf3 (TCP, -J) measures throughput from c1 to c2 and `ping -c 20
//! -i 0.01` the mean round trip. Rows: raw underlay (host to host); kernel VXLAN, hand-built
//! here with `ip` (vxlan + bridge + veth); meshctl fast path (kernel VXLAN chosen by meshctl, no
//! password, `--mtu 1450` like the hand-built row); meshctl sleeve without password
//! (`--no-fastpath`); meshctl sleeve with password (ChaCha20-Poly1305). Ratios are against raw and
//! against kernel VXLAN; the last column is the round trip added over the hand-built VXLAN.

#[path = "../tests/common/lab.rs"]
mod lab;

use lab::{Container, Host, Lab, WAIT_MAX};
use std::net::Ipv4Addr;
use std::process::{Command, ExitCode};
use std::time::Duration;

/// A scenario: the row's name and how to build and measure it.
type Scenario = (&'static str, fn() -> Row);

/// One measured row.
struct Row {
    name: &'static str,
    gbit_per_s: Option<f64>,
    rtt_ms: Option<f64>,
    note: String,
}

fn seconds() -> u32 {
    std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

fn run_ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// iperf3 TCP from netns `client` to `server_ip` (server started in netns `server`), Gbit/s.
fn iperf(lab: &Lab, client: &str, server: &str, server_ip: Ipv4Addr) -> Result<f64, String> {
    lab.spawn_in(
        server,
        "iperf3",
        &["-s", "-B", &server_ip.to_string()],
        "iperf3-server.log",
    );
    let secs = seconds().to_string();
    let mut last_err = String::new();
    let mut result = None;
    // The server needs a moment to listen; the client fails fast until it does.
    lab::wait_for(Duration::from_secs(10), || {
        let out = Command::new("ip")
            .args(["netns", "exec", client, "iperf3", "-J", "-t", &secs, "-c"])
            .arg(server_ip.to_string())
            .output();
        match out {
            Ok(out) if out.status.success() => {
                result = Some(out.stdout);
                true
            }
            Ok(out) => {
                last_err = String::from_utf8_lossy(&out.stdout).into_owned();
                false
            }
            Err(e) => {
                last_err = e.to_string();
                false
            }
        }
    });
    let json = result.ok_or_else(|| format!("iperf3 failed: {last_err}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&json).map_err(|e| format!("iperf3 -J output: {e}"))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .ok_or_else(|| "iperf3 JSON has no end.sum_received.bits_per_second".to_owned())
}

/// Mean RTT in ms of `ping -c 20 -i 0.01` from netns `from`.
fn rtt(from: &str, to: Ipv4Addr) -> Result<f64, String> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", from, "ping", "-q", "-c", "20", "-i", "0.01",
        ])
        .arg(to.to_string())
        .output()
        .map_err(|e| format!("run ping: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "rtt min/avg/max/mdev = 0.030/0.045/0.080/0.010 ms"
    text.lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|avg| avg.parse().ok())
        .ok_or_else(|| format!("no rtt in ping output: {text}"))
}

fn measure(
    lab: &Lab,
    name: &'static str,
    from: &str,
    to_ns: &str,
    to: Ipv4Addr,
    note: String,
) -> Row {
    let rtt_ms = rtt(from, to).map_err(|e| eprintln!("{name}: {e}")).ok();
    let gbit_per_s = iperf(lab, from, to_ns, to)
        .map_err(|e| eprintln!("{name}: {e}"))
        .ok();
    Row {
        name,
        gbit_per_s,
        rtt_ms,
        note,
    }
}

fn raw() -> Row {
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (_, b_ip) = lab.link(&a, &b);
    measure(
        &lab,
        "raw underlay",
        &a.netns,
        &b.netns,
        b_ip,
        "host to host".into(),
    )
}

/// Kernel VXLAN VNI 42 between a and b, a bridge on each host, a container veth on each bridge.
fn kernel_vxlan() -> Row {
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (a_ip, b_ip) = lab.link(&a, &b);
    let mut containers = Vec::new();
    for (i, (host, local, remote)) in [(&a, a_ip, b_ip), (&b, b_ip, a_ip)].into_iter().enumerate() {
        let ns = host.netns.as_str();
        run_ip(&[
            "-n",
            ns,
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "42",
            "local",
            &local.to_string(),
            "remote",
            &remote.to_string(),
            "dstport",
            "4789",
            "dev",
            "u1",
        ]);
        run_ip(&["-n", ns, "link", "add", "br0", "type", "bridge"]);
        run_ip(&["-n", ns, "link", "set", "vx0", "master", "br0", "up"]);
        run_ip(&["-n", ns, "link", "set", "br0", "up"]);
        let c = lab.container(host);
        run_ip(&[
            "-n", ns, "link", "add", "vc0", "type", "veth", "peer", "name", "eth0", "netns",
            &c.netns,
        ]);
        run_ip(&["-n", ns, "link", "set", "vc0", "master", "br0", "up"]);
        let ip = Ipv4Addr::new(10, 41, 0, i as u8 + 1);
        // VXLAN over IPv4 costs 50 bytes of the 1500-byte underlay MTU.
        run_ip(&["-n", &c.netns, "link", "set", "eth0", "mtu", "1450", "up"]);
        run_ip(&[
            "-n",
            &c.netns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        containers.push((c, ip));
    }
    let (c1, c2) = (&containers[0], &containers[1]);
    lab::wait_for(WAIT_MAX, || lab::ping(&c1.0.netns, c2.1));
    measure(
        &lab,
        "kernel vxlan",
        &c1.0.netns,
        &c2.0.netns,
        c2.1,
        "ip link vxlan, mtu 1450".into(),
    )
}

fn meshctl(name: &'static str, password: Option<&str>, extra: &[&str]) -> Row {
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (a_ip, _) = lab.link(&a, &b);
    let mut args_a = extra.to_vec();
    if let Some(p) = password {
        args_a.extend(["--password", p]);
    }
    let mut args_b = args_a.clone();
    let peer = a_ip.to_string();
    args_b.push(&peer);
    a.launch(&args_a);
    b.launch(&args_b);
    let attach = |host: &Host, ip: Ipv4Addr| -> Container {
        let c = lab.container(host);
        host.attach(&c, &format!("{ip}/24"));
        c
    };
    let (ip1, ip2) = (Ipv4Addr::new(10, 42, 0, 1), Ipv4Addr::new(10, 42, 0, 2));
    let c1 = attach(&a, ip1);
    let c2 = attach(&b, ip2);
    if !extra.contains(&"--no-fastpath") && password.is_none() {
        // The fast path: wait until meshctl has chosen it.
        lab::wait_for(WAIT_MAX, || {
            a.status_json()["peers"][0]["overlay"] == "vxlan"
        });
    }
    if !lab::wait_for(WAIT_MAX, || lab::ping(&c1.netns, ip2)) {
        eprintln!("{name}: containers cannot ping:{}", lab.report());
        return Row {
            name,
            gbit_per_s: None,
            rtt_ms: None,
            note: "containers cannot ping, see above".to_owned(),
        };
    }
    let status = a.status_json();
    let peer = &status["peers"][0];
    let note = format!(
        "overlay {} ({}), encryption {}",
        peer["overlay"].as_str().unwrap_or("?"),
        peer["overlay_reason"].as_str().unwrap_or("?"),
        status["encryption"]
    );
    measure(&lab, name, &c1.netns, &c2.netns, ip2, note)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".to_owned(),
    }
}

fn main() -> ExitCode {
    if lab::skip_unless_root("bench") {
        return ExitCode::FAILURE;
    }
    if let Err(e) = lab::ensure_meshctl_built() {
        eprintln!("bench: {e}");
        return ExitCode::FAILURE;
    }
    let scenarios: [Scenario; 5] = [
        ("raw underlay", raw),
        ("kernel vxlan", kernel_vxlan),
        ("meshctl fast path", || {
            meshctl("meshctl fast path", None, &["--mtu", "1450"])
        }),
        ("meshctl sleeve plain", || {
            meshctl("meshctl sleeve plain", None, &["--no-fastpath"])
        }),
        ("meshctl sleeve encrypted", || {
            meshctl("meshctl sleeve encrypted", Some("bench"), &[])
        }),
    ];
    let mut rows = Vec::new();
    for (name, scenario) in scenarios {
        // A failed setup (its lab already cleaned up while unwinding) costs one row, not the table.
        let row = std::panic::catch_unwind(scenario).unwrap_or_else(|_| Row {
            name,
            gbit_per_s: None,
            rtt_ms: None,
            note: "setup failed, see above".to_owned(),
        });
        eprintln!(
            "measured {name}: {} Gbit/s, rtt {} ms",
            fmt(row.gbit_per_s, 2),
            fmt(row.rtt_ms, 3)
        );
        rows.push(row);
    }
    let (raw_bw, vx_bw, vx_rtt) = (rows[0].gbit_per_s, rows[1].gbit_per_s, rows[1].rtt_ms);
    println!(
        "\niperf3 TCP {} s, ping -c 20 -i 0.01, veth underlay with MTU 1500\n",
        seconds()
    );
    println!(
        "{:<26} {:>9} {:>9} {:>8} {:>8} {:>12}  note",
        "path", "Gbit/s", "rtt ms", "vs raw", "vs vxlan", "+rtt µs"
    );
    for row in &rows {
        let added_us = match (row.rtt_ms, vx_rtt) {
            (Some(r), Some(v)) => Some((r - v) * 1000.0),
            _ => None,
        };
        println!(
            "{:<26} {:>9} {:>9} {:>8} {:>8} {:>12}  {}",
            row.name,
            fmt(row.gbit_per_s, 2),
            fmt(row.rtt_ms, 3),
            ratio(row.gbit_per_s, raw_bw),
            ratio(row.gbit_per_s, vx_bw),
            fmt(added_us, 1),
            row.note
        );
    }
    ExitCode::SUCCESS
}

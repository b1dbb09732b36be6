//! Throughput, packet rate, latency and router CPU of the overlays against the bare underlay, run
//! by hand: `sudo cargo run --release --example bench` (BENCH_SECONDS shortens the 10 s runs,
//! BENCH_REPS changes the 3 repetitions, BENCH_ONLY=vxlan,chacha measures only the rows whose names
//! contain one of the words).
//!
//! ```text
//!   c1 10.4x.0.1                          c2 10.4x.0.2
//!     |  veth / meshctl attach              |
//!   [ a ] 10.250.1.1 ----u1---- 10.250.1.2 [ b ]
//! ```
//! Each row gets a fresh lab: two hosts on a veth underlay and, except for "raw underlay", one
//! container per host. In it, each repetition measures from c1 to c2: iperf3 TCP with 1 and 4
//! streams, iperf3 UDP with 64-byte datagrams (packets per second that arrived), `ping -c 500 -i
//! 0.002` (median round trip), and for meshctl rows the CPU both routers used during the 1-stream TCP
//! run (percent of one core, summed). The table shows the median and min..max of the
//! repetitions; the last column is the round trip added over the hand-built kernel VXLAN (medians).
//! Rows: raw underlay (host to host); kernel VXLAN hand-built with `ip` (vxlan + bridge + veth,
//! MTU 1450); meshctl fast path (kernel VXLAN chosen by meshctl, no password, `--mtu 1450` like
//! the hand-built row); the plain sleeve (`--no-fastpath`); the sleeve with ChaCha20-Poly1305 and
//! with AES-256-GCM (forced with `--cipher`), and with ChaCha20-Poly1305 batching through
//! `sendmmsg`/`recvmmsg` instead of UDP GSO/GRO (`--udp-offload off`). BENCH_LOSS=1% drops that
//! share of the datagrams host a sends on the underlay, in every row (`tc netem loss`, or an
//! nftables `numgen random` rule where the kernel lacks netem).

#[path = "../tests/common/lab.rs"]
mod lab;

use lab::{Container, Host, Lab, WAIT_MAX};
use std::net::Ipv4Addr;
use std::process::{Command, ExitCode};
use std::time::Duration;

/// A scenario: the row's name and how to build and measure it.
type Scenario = (&'static str, fn() -> Row);

/// One repetition's numbers.
#[derive(Clone, Copy, Default)]
struct Sample {
    tcp1: Option<f64>,
    tcp4: Option<f64>,
    kpps64: Option<f64>,
    rtt_us: Option<f64>,
    cpu_pct: Option<f64>,
}

/// One measured row: every repetition.
struct Row {
    name: &'static str,
    samples: Vec<Sample>,
    note: String,
}

fn seconds() -> u32 {
    std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

fn reps() -> usize {
    std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
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

/// Drops BENCH_LOSS (e.g. `1%`) of the datagrams leaving `host` on the underlay link: `tc netem
/// loss` where the kernel has netem, else an nftables rule with a random number per packet.
fn maybe_loss(host: &Host) {
    let Ok(loss) = std::env::var("BENCH_LOSS") else {
        return;
    };
    let netns = ["netns", "exec", host.netns.as_str()];
    let netem = Command::new("ip")
        .args(netns)
        .args([
            "tc", "qdisc", "add", "dev", "u1", "root", "netem", "loss", &loss,
        ])
        .output()
        .expect("run tc");
    if netem.status.success() {
        return;
    }
    let percent: u32 = loss
        .trim_end_matches('%')
        .parse()
        .unwrap_or_else(|_| panic!("BENCH_LOSS={loss:?}: write a whole percentage, e.g. 1%"));
    let script = format!(
        "add table inet benchloss\n\
         add chain inet benchloss out {{ type filter hook output priority 0; }}\n\
         add rule inet benchloss out oifname \"u1\" numgen random mod 100 < {percent} drop\n"
    );
    let mut nft = Command::new("ip")
        .args(netns)
        .args(["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run nft");
    use std::io::Write as _;
    nft.stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .expect("write nft script");
    let status = nft.wait().expect("wait for nft");
    assert!(
        status.success(),
        "neither tc netem ({}) nor nft could add loss",
        String::from_utf8_lossy(&netem.stderr).trim()
    );
}

/// Runs iperf3 with `args` from netns `client` to `server_ip` and picks the result out of its
/// JSON with `pick`. Retries for a while: the server needs a moment to listen, and it refuses a
/// new test ("the server is busy running a test") until it has finished the previous one, which
/// after a fast run can take longer than the client needs to start again. iperf3 reports such
/// failures in the JSON's `error` field, sometimes with exit status 0 and no results.
fn iperf(
    client: &str,
    server_ip: Ipv4Addr,
    args: &[&str],
    pick: fn(&serde_json::Value) -> Option<f64>,
) -> Result<f64, String> {
    let secs = seconds().to_string();
    let mut last_err = String::new();
    let mut result = None;
    lab::wait_for(Duration::from_secs(30), || {
        let out = match Command::new("ip")
            .args(["netns", "exec", client, "iperf3", "-J", "-t", &secs])
            .args(args)
            .arg("-c")
            .arg(server_ip.to_string())
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                last_err = format!("run iperf3: {e}");
                return false;
            }
        };
        let json: serde_json::Value = match serde_json::from_slice(&out.stdout) {
            Ok(v) => v,
            Err(e) => {
                last_err = format!(
                    "iperf3 -J output ({}) is not JSON: {e}; stderr: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return false;
            }
        };
        match pick(&json) {
            Some(v) if out.status.success() => {
                result = Some(v);
                true
            }
            _ => {
                last_err = format!(
                    "iperf3 ({}) gave no result; its error: {}",
                    out.status,
                    json["error"].as_str().unwrap_or("(none)")
                );
                eprintln!("  {last_err}; retrying");
                false
            }
        }
    });
    result.ok_or(last_err)
}

fn tcp_gbit(client: &str, server_ip: Ipv4Addr, streams: u32) -> Result<f64, String> {
    let bps = iperf(client, server_ip, &["-P", &streams.to_string()], |v| {
        v["end"]["sum_received"]["bits_per_second"].as_f64()
    })?;
    Ok(bps / 1e9)
}

/// Thousands of 64-byte UDP datagrams per second that arrived.
fn udp_kpps(client: &str, server_ip: Ipv4Addr) -> Result<f64, String> {
    iperf(client, server_ip, &["-u", "-l", "64", "-b", "0"], |v| {
        let sum = &v["end"]["sum"];
        let packets = sum["packets"].as_f64()?;
        let lost = sum["lost_packets"].as_f64()?;
        let secs = sum["seconds"].as_f64().filter(|s| *s > 0.0)?;
        Some((packets - lost) / secs / 1e3)
    })
}

/// Median RTT in µs of `ping -c 500 -i 0.002` from netns `from`. The median of many echoes,
/// not the mean of a few: one late wake-up of an idle core moves a mean by tens of µs.
fn rtt(from: &str, to: Ipv4Addr) -> Result<f64, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", from, "ping", "-c", "500", "-i", "0.002"])
        .arg(to.to_string())
        .output()
        .map_err(|e| format!("run ping: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "64 bytes from 10.41.0.2: icmp_seq=1 ttl=64 time=0.045 ms"
    let mut times: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim_end_matches(" ms").trim().parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    if times.is_empty() {
        return Err(format!("no rtt in ping output: {text}"));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// CPU time (user + system, seconds) a process has used so far.
fn cpu_seconds(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that ends the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn measure(
    lab: &Lab,
    name: &'static str,
    from: &str,
    to_ns: &str,
    to: Ipv4Addr,
    routers: &[i32],
    note: String,
) -> Row {
    lab.spawn_in(
        to_ns,
        "iperf3",
        &["-s", "-B", &to.to_string()],
        "iperf3-server.log",
    );
    let log = |what: &str, e: String| eprintln!("{name}: {what}: {e}");
    let mut samples = Vec::new();
    for _ in 0..reps() {
        let rtt_us = rtt(from, to).map_err(|e| log("ping", e)).ok();
        let cpu_before: Option<f64> = routers.iter().map(|p| cpu_seconds(*p)).sum();
        let start = std::time::Instant::now();
        let tcp1 = tcp_gbit(from, to, 1).map_err(|e| log("tcp 1", e)).ok();
        let elapsed = start.elapsed().as_secs_f64();
        let cpu_after: Option<f64> = routers.iter().map(|p| cpu_seconds(*p)).sum();
        let cpu_pct = match (cpu_before, cpu_after) {
            (Some(b), Some(a)) if !routers.is_empty() => Some((a - b) / elapsed * 100.0),
            _ => None,
        };
        let tcp4 = tcp_gbit(from, to, 4).map_err(|e| log("tcp 4", e)).ok();
        let kpps64 = udp_kpps(from, to).map_err(|e| log("udp 64", e)).ok();
        let s = Sample {
            tcp1,
            tcp4,
            kpps64,
            rtt_us,
            cpu_pct,
        };
        eprintln!(
            "  {name}: tcp1 {} tcp4 {} Gbit/s, udp64 {} kpps, rtt {} µs, cpu {} %",
            fmt(s.tcp1, 2),
            fmt(s.tcp4, 2),
            fmt(s.kpps64, 0),
            fmt(s.rtt_us, 0),
            fmt(s.cpu_pct, 0)
        );
        samples.push(s);
    }
    Row {
        name,
        samples,
        note,
    }
}

fn raw() -> Row {
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (_, b_ip) = lab.link(&a, &b);
    maybe_loss(&a);
    measure(
        &lab,
        "raw underlay",
        &a.netns,
        &b.netns,
        b_ip,
        &[],
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
    maybe_loss(&a);
    lab::wait_for(WAIT_MAX, || lab::ping(&c1.0.netns, c2.1));
    measure(
        &lab,
        "kernel vxlan",
        &c1.0.netns,
        &c2.0.netns,
        c2.1,
        &[],
        "ip link vxlan, mtu 1450".into(),
    )
}

fn meshctl(name: &'static str, extra: &[&str]) -> Row {
    let lab = Lab::new();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (a_ip, _) = lab.link(&a, &b);
    maybe_loss(&a);
    let args_a = extra.to_vec();
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
    if !extra.contains(&"--no-fastpath") && !extra.contains(&"--password") {
        // The fast path: wait until meshctl has chosen it (the note says if it didn't).
        lab::wait_for(WAIT_MAX, || {
            a.status_json()["peers"][0]["overlay"] == "vxlan"
        });
    }
    if !lab::wait_for(WAIT_MAX, || lab::ping(&c1.netns, ip2)) {
        eprintln!("{name}: containers cannot ping:{}", lab.report());
        return Row {
            name,
            samples: Vec::new(),
            note: "containers cannot ping, see above".to_owned(),
        };
    }
    let status = a.status_json();
    let peer = &status["peers"][0];
    let reason = match peer["overlay_reason"].as_str().unwrap_or("") {
        "" => String::new(),
        r => format!(" ({r})"),
    };
    let note = format!(
        "overlay {}{reason}, cipher {}, batching {}",
        peer["overlay"].as_str().unwrap_or("?"),
        peer["cipher"].as_str().unwrap_or("?"),
        status["sleeve"]["batching"].as_str().unwrap_or("?"),
    );
    let routers: Vec<i32> = [&a, &b].iter().filter_map(|h| h.daemon_pid()).collect();
    measure(&lab, name, &c1.netns, &c2.netns, ip2, &routers, note)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

/// The median of one column over a row's samples.
fn median(samples: &[Sample], pick: fn(&Sample) -> Option<f64>) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().filter_map(pick).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// "median (min..max)" of one column over a row's samples.
fn stat(samples: &[Sample], pick: fn(&Sample) -> Option<f64>, digits: usize) -> String {
    let mut v: Vec<f64> = samples.iter().filter_map(pick).collect();
    if v.is_empty() {
        return "-".to_owned();
    }
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    if v.len() == 1 {
        return format!("{median:.digits$}");
    }
    format!(
        "{median:.digits$} ({:.digits$}..{:.digits$})",
        v[0],
        v[v.len() - 1]
    )
}

fn main() -> ExitCode {
    if lab::skip_unless_root("bench") {
        return ExitCode::FAILURE;
    }
    if let Err(e) = lab::ensure_meshctl_built() {
        eprintln!("bench: {e}");
        return ExitCode::FAILURE;
    }
    let scenarios: [Scenario; 7] = [
        ("raw underlay", raw),
        ("kernel vxlan", kernel_vxlan),
        ("meshctl fast path", || {
            meshctl("meshctl fast path", &["--mtu", "1450"])
        }),
        ("meshctl sleeve plain", || {
            meshctl("meshctl sleeve plain", &["--no-fastpath"])
        }),
        ("meshctl sleeve chacha20", || {
            meshctl(
                "meshctl sleeve chacha20",
                &["--password", "bench", "--cipher", "chacha20-poly1305"],
            )
        }),
        ("meshctl sleeve chacha20 sendmmsg", || {
            meshctl(
                "meshctl sleeve chacha20 sendmmsg",
                &[
                    "--password",
                    "bench",
                    "--cipher",
                    "chacha20-poly1305",
                    "--udp-offload",
                    "off",
                ],
            )
        }),
        ("meshctl sleeve aes-256-gcm", || {
            meshctl(
                "meshctl sleeve aes-256-gcm",
                &["--password", "bench", "--cipher", "aes-256-gcm"],
            )
        }),
    ];
    let mut rows = Vec::new();
    // BENCH_ONLY=a,b measures only the rows whose names contain one of the words.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| {
        only.is_empty()
            || only
                .split(',')
                .any(|w| !w.is_empty() && name.contains(w.trim()))
    };
    for (name, scenario) in scenarios {
        if !wanted(name) {
            continue;
        }
        eprintln!("measuring {name}");
        // A failed setup (its lab already cleaned up while unwinding) costs one row, not the table.
        let row = std::panic::catch_unwind(scenario).unwrap_or_else(|_| Row {
            name,
            samples: Vec::new(),
            note: "setup failed, see above".to_owned(),
        });
        rows.push(row);
    }
    println!(
        "\niperf3 {} s per run, {} repetitions, median (min..max); veth underlay, MTU 1500{}\n",
        seconds(),
        reps(),
        std::env::var("BENCH_LOSS")
            .map(|l| format!(", netem loss {l}"))
            .unwrap_or_default()
    );
    println!(
        "| {:<32} | {:<20} | {:<20} | {:<20} | {:<16} | {:<16} | {:<10} | note |",
        "path",
        "TCP 1 Gbit/s",
        "TCP 4 Gbit/s",
        "UDP 64 B kpps",
        "ping rtt µs",
        "router CPU %",
        "+rtt µs"
    );
    println!("|{}|", ["---"; 8].join("|"));
    let vxlan_rtt = rows
        .iter()
        .find(|r| r.name == "kernel vxlan")
        .and_then(|r| median(&r.samples, |x| x.rtt_us));
    for row in &rows {
        let s = &row.samples;
        let added = match (median(s, |x| x.rtt_us), vxlan_rtt) {
            (Some(r), Some(v)) => Some(r - v),
            _ => None,
        };
        println!(
            "| {:<32} | {:<20} | {:<20} | {:<20} | {:<16} | {:<16} | {:<10} | {} |",
            row.name,
            stat(s, |x| x.tcp1, 2),
            stat(s, |x| x.tcp4, 2),
            stat(s, |x| x.kpps64, 0),
            stat(s, |x| x.rtt_us, 0),
            stat(s, |x| x.cpu_pct, 0),
            fmt(added, 0),
            row.note
        );
    }
    ExitCode::SUCCESS
}

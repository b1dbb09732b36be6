//! `meshctl status`: tables for people, `--json` for scripts.

use std::process::ExitCode;

use anyhow::Result;
use hyper::Method;

use super::Paths;
use crate::api::client::call;
use crate::api::types::Status;

/// One part of `meshctl status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Section {
    /// Every other router: overlay and why, path, RTT, loss, MTU, traffic, key age.
    Peers,
    /// Control connections, dials and refused attempts.
    Connections,
    /// Address allocation (as `meshctl ipam`).
    Ipam,
    /// The embedded name server and its records.
    Dns,
    /// The addresses this router dials and how that goes.
    Targets,
}

pub(super) async fn run(paths: &Paths, section: Option<Section>, json: bool) -> Result<ExitCode> {
    let status: Status = call::<(), _>(&paths.socket, Method::GET, "/status", None).await?;
    match (section, json) {
        (None, true) => outln!("{}", serde_json::to_string_pretty(&status)?),
        (Some(section), true) => {
            let value = match section {
                Section::Peers => serde_json::to_value(&status.peers)?,
                Section::Connections => serde_json::to_value(&status.connections)?,
                Section::Ipam => serde_json::to_value(&status.ipam)?,
                Section::Dns => serde_json::to_value(&status.dns)?,
                Section::Targets => serde_json::to_value(&status.targets)?,
            };
            outln!("{}", serde_json::to_string_pretty(&value)?);
        }
        (None, false) => out!("{}", render(&status)),
        (Some(section), false) => out!("{}", render_section(&status, section)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The summary line and every section.
fn render(s: &Status) -> String {
    let mut out = format!(
        "Router {} ({}), meshctl {}\n  encryption: {}\n  control port {}, sleeve port {}, vxlan port {}, bridge {}, mtu {}\n",
        s.name,
        s.nickname,
        s.version,
        if s.encryption {
            "on (cipher per peer below)"
        } else {
            "off (no password set; traffic is not encrypted)"
        },
        s.port,
        u32::from(s.port) + 1,
        u32::from(s.port) + 2,
        s.bridge,
        s.mtu
    );
    let reachable = s.peers.iter().filter(|p| p.reachable).count();
    let established = s
        .connections
        .iter()
        .filter(|c| c.state == "established")
        .count();
    out.push_str(&format!(
        "  peers: {} ({} reachable), connections established: {}, gossip rx {} / tx {}\n",
        s.peers.len(),
        reachable,
        established,
        bytes(s.gossip.rx_bytes),
        bytes(s.gossip.tx_bytes)
    ));
    for section in [
        Section::Peers,
        Section::Connections,
        Section::Targets,
        Section::Ipam,
        Section::Dns,
    ] {
        out.push('\n');
        out.push_str(&render_section(s, section));
    }
    let sl = &s.sleeve;
    out.push_str(&format!(
        "\nSleeve ({}, batching {}): rx {} datagrams / {} frames / {}, tx {} datagrams / {} frames / {}, relayed {} frames, keys rotated {} times\n",
        sl.cipher,
        sl.batching.as_deref().unwrap_or("not set up yet"),
        sl.rx_datagrams,
        sl.rx_frames,
        bytes(sl.rx_bytes),
        sl.tx_datagrams,
        sl.tx_frames,
        bytes(sl.tx_bytes),
        sl.relayed_frames,
        sl.key_rotations
    ));
    let drops: Vec<String> = sl
        .drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    out.push_str(&format!(
        "  drops: {}\n",
        if drops.is_empty() {
            "none".to_string()
        } else {
            drops.join(", ")
        }
    ));
    out
}

fn render_section(s: &Status, section: Section) -> String {
    match section {
        Section::Peers => render_peers(s),
        Section::Connections => render_connections(s),
        Section::Ipam => match &s.ipam {
            Some(ipam) => render_ipam(ipam),
            None => "IPAM: not running\n".to_string(),
        },
        Section::Dns => render_dns(s),
        Section::Targets => render_targets(s),
    }
}

fn dash() -> String {
    "-".to_string()
}

fn render_peers(s: &Status) -> String {
    let nick = |name: &str| {
        s.peers
            .iter()
            .find(|p| p.name == name)
            .map_or_else(|| name.to_string(), |p| p.nickname.clone())
    };
    let rows: Vec<Vec<String>> = s
        .peers
        .iter()
        .map(|p| {
            let link = p.link.as_ref();
            let total = p.traffic.total();
            // On VXLAN without kernel counters, the sleeve's share alone would understate it.
            let uncounted = p.overlay.as_deref() == Some("vxlan") && p.traffic.vxlan.is_none();
            let traffic = |packets: u64, b: u64| {
                let mark = if uncounted { " +vxlan?" } else { "" };
                format!("{} / {packets}{mark}", bytes(b))
            };
            vec![
                p.name.clone(),
                p.nickname.clone(),
                if p.reachable {
                    "reachable"
                } else {
                    "unreachable"
                }
                .to_string(),
                match (&p.relayed_via, p.reachable) {
                    (Some(hop), _) => nick(hop),
                    (None, true) => "direct".to_string(),
                    (None, false) => dash(),
                },
                p.overlay.clone().unwrap_or_else(dash),
                link.map_or_else(dash, |l| format!("{:.2}ms", l.rtt_ms)),
                link.map_or_else(dash, |l| format!("{:.1}%", l.loss_ratio * 100.0)),
                p.mtu.map_or_else(dash, |m| m.to_string()),
                link.map_or_else(dash, |l| l.path_mtu_bytes.to_string()),
                traffic(total.rx_packets, total.rx_bytes),
                traffic(total.tx_packets, total.tx_bytes),
                link.map_or_else(dash, |l| duration(l.key_age_secs)),
                p.cipher.clone().unwrap_or_else(dash),
                p.overlay_reason.clone(),
            ]
        })
        .collect();
    format!("Peers ({}):\n", s.peers.len())
        + &table(
            &[
                "NAME",
                "NICKNAME",
                "STATE",
                "VIA",
                "OVERLAY",
                "RTT",
                "LOSS",
                "MTU",
                "PATH MTU",
                "RX BYTES / PKTS",
                "TX BYTES / PKTS",
                "KEY AGE",
                "CIPHER",
                "REASON",
            ],
            &rows,
        )
        + &match s.vxlan_counting.strip_prefix("none: ") {
            Some(why)
                if s.peers
                    .iter()
                    .any(|p| p.overlay.as_deref() == Some("vxlan")) =>
            {
                format!("VXLAN traffic is not counted per peer: {why}\n")
            }
            _ => String::new(),
        }
}

fn render_connections(s: &Status) -> String {
    let rows: Vec<Vec<String>> = s
        .connections
        .iter()
        .map(|c| {
            let who = match (&c.peer, &c.nickname) {
                (Some(p), Some(n)) => format!("{p} ({n})"),
                (Some(p), None) => p.clone(),
                _ => dash(),
            };
            vec![
                c.address.clone(),
                c.direction.clone(),
                c.state.clone(),
                who,
                c.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    format!("Connections ({}):\n", s.connections.len())
        + &table(&["ADDRESS", "DIRECTION", "STATE", "PEER", "ERROR"], &rows)
}

fn render_targets(s: &Status) -> String {
    let rows: Vec<Vec<String>> = s
        .targets
        .iter()
        .map(|t| {
            vec![
                t.address.clone(),
                t.source.clone(),
                t.state.clone(),
                t.attempts.to_string(),
                t.retry_in_secs.map_or_else(dash, duration),
                t.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    format!("Targets ({}):\n", s.targets.len())
        + &table(
            &[
                "ADDRESS",
                "SOURCE",
                "STATE",
                "ATTEMPTS",
                "RETRY IN",
                "LAST ERROR",
            ],
            &rows,
        )
}

fn render_dns(s: &Status) -> String {
    let Some(dns) = &s.dns else {
        return "DNS not enabled\n".to_string();
    };
    let mut out = format!(
        "DNS: domain {}, listening on {}, upstream {}\n  {} queries: {} answered, {} nxdomain, {} forwarded, {} upstream failed, {} malformed\n",
        dns.domain,
        if dns.listening.is_empty() {
            "nothing (no address on the bridge; see `meshctl expose`)".to_string()
        } else {
            dns.listening.join(", ")
        },
        dns.upstream.as_deref().unwrap_or("none"),
        dns.queries,
        dns.answered,
        dns.nxdomain,
        dns.forwarded,
        dns.upstream_failed,
        dns.malformed
    );
    let rows: Vec<Vec<String>> = dns
        .records
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.address.clone(),
                match &r.nickname {
                    Some(n) => format!("{} ({n})", r.peer),
                    None => r.peer.clone(),
                },
            ]
        })
        .collect();
    out.push_str(&format!("Records ({}):\n", dns.records.len()));
    out.push_str(&table(&["NAME", "ADDRESS", "PEER"], &rows));
    out
}

/// Bytes in binary units, e.g. `1.5 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Seconds as `45s`, `3m20s`, `2h5m`, `3d4h`.
fn duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{}m", secs / 3600, secs / 60 % 60),
        _ => format!("{}d{}h", secs / 86_400, secs / 3600 % 24),
    }
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return "  (none)\n".to_string();
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from(" ");
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            s.push(' ');
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$} "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `meshctl ipam`.
pub(super) async fn ipam(paths: &Paths, json: bool) -> Result<ExitCode> {
    let s: crate::api::types::IpamStatus =
        call::<(), _>(&paths.socket, Method::GET, "/ipam", None).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        out!("{}", render_ipam(&s));
    }
    Ok(ExitCode::SUCCESS)
}

fn render_ipam(s: &crate::api::types::IpamStatus) -> String {
    let mut out = format!("IPAM: {} (range {})\n", s.state, s.range);
    if let Some(w) = &s.waiting {
        out.push_str(&format!("  waiting: {w}\n"));
    }
    if let Some(c) = &s.conflict {
        out.push_str(&format!("  conflict: {c}\n"));
    }
    match &s.bootstrap_members {
        Some(m) => out.push_str(&format!("  bootstrap: agreed among {}\n", m.join(", "))),
        None => out.push_str("  bootstrap: not agreed yet\n"),
    }
    if !s.unreachable_owners.is_empty() {
        out.push_str(&format!(
            "  unreachable owners (their space is unusable until they return or `meshctl rmpeer`): {}\n",
            s.unreachable_owners.join(", ")
        ));
        if let Some(p) = s.reachable_percent {
            let can = if p > 50.0 {
                "enough to reclaim"
            } else {
                "reclaims need more than half (of two exact halves, the one with the range's first address)"
            };
            out.push_str(&format!(
                "  reachable owners hold {p:.1}% of {}: {can}\n",
                s.range
            ));
        }
    }
    for sub in &s.subnets {
        out.push_str(&format!("\nSubnet {}:\n", sub.subnet));
        out.push_str(&format!(
            "  {:<20} {:<16} {:>10} {:>10} {:>10}  {}\n",
            "PEER", "NICKNAME", "OWNED", "USED", "FREE", "REACHABLE"
        ));
        for o in &sub.owners {
            out.push_str(&format!(
                "  {:<20} {:<16} {:>10} {:>10} {:>10}  {}\n",
                o.peer,
                o.nickname.as_deref().unwrap_or("-"),
                o.owned,
                o.used,
                o.free,
                if o.reachable { "yes" } else { "no" }
            ));
        }
    }
    out.push_str(&format!("\nAllocations here ({}):\n", s.allocations.len()));
    for a in &s.allocations {
        out.push_str(&format!(
            "  {:<16} {:<20} {}{}\n",
            a.address,
            a.subnet,
            a.container,
            if a.releasing {
                " (released, in grace period)"
            } else {
                ""
            }
        ));
    }
    for c in &s.reclaims {
        out.push_str(&format!("  reclaim: {c}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(t, "  A    BB\n  xxx  y\n  z    w\n");
    }

    #[test]
    fn bytes_and_durations_read_like_people_write_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(200), "3m20s");
        assert_eq!(duration(7500), "2h5m");
        assert_eq!(duration(2 * 86_400 + 3600), "2d1h");
    }
}

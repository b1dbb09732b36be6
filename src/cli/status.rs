//! `meshctl status`: tables for people, `--json` for scripts.

use std::process::ExitCode;

use anyhow::Result;
use hyper::Method;

use super::Paths;
use crate::api::client::call;
use crate::api::types::Status;

pub(super) async fn run(paths: &Paths, json: bool) -> Result<ExitCode> {
    let status: Status = call::<(), _>(&paths.socket, Method::GET, "/status", None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(ExitCode::SUCCESS)
}

fn render(s: &Status) -> String {
    let mut out = format!(
        "Router {} ({}), meshctl {}\n  encryption: {}\n  control port {}, sleeve port {}, vxlan port {}, bridge {}, mtu {}\n\n",
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
    let dash = || "-".to_string();
    out.push_str(&format!("Peers ({}):\n", s.peers.len()));
    let rows: Vec<Vec<String>> = s
        .peers
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.nickname.clone(),
                if p.reachable {
                    "reachable"
                } else {
                    "unreachable"
                }
                .to_string(),
                p.next_hop.clone().unwrap_or_else(dash),
                match &p.overlay {
                    Some(o) if p.overlay_reason.is_empty() => o.clone(),
                    Some(o) => format!("{o}: {}", p.overlay_reason),
                    None => p.overlay_reason.clone(),
                },
                p.mtu.map_or_else(dash, |m| m.to_string()),
                p.cipher.clone().unwrap_or_else(dash),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "NAME", "NICKNAME", "STATE", "NEXT HOP", "OVERLAY", "MTU", "CIPHER",
        ],
        &rows,
    ));
    out.push_str(&format!("\nConnections ({}):\n", s.connections.len()));
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
    out.push_str(&table(
        &["ADDRESS", "DIRECTION", "STATE", "PEER", "ERROR"],
        &rows,
    ));
    let sl = &s.sleeve;
    out.push_str(&format!(
        "\nSleeve ({}): rx {} datagrams / {} frames, tx {} datagrams / {} frames, relayed {} frames\n",
        sl.cipher, sl.rx_datagrams, sl.rx_frames, sl.tx_datagrams, sl.tx_frames, sl.relayed_frames
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
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", render_ipam(&s));
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
}

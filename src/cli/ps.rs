//! `meshctl ps`: the containers on this router's mesh bridge, attached by `meshctl attach` or
//! started through the Docker plugin, with MAC and addresses. Plugin containers are named through
//! the Docker Engine API when it answers (else by their endpoint).

use std::process::ExitCode;

use anyhow::Result;
use hyper::Method;

use super::Paths;
use crate::api::client::call;
use crate::api::types::PsEntry;

pub(super) async fn run(paths: &Paths, json: bool) -> Result<ExitCode> {
    let mut list: Vec<PsEntry> = call::<(), _>(&paths.socket, Method::GET, "/ps", None).await?;
    name_plugin_containers(&mut list).await;
    if json {
        outln!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        out!("{}", render(&list));
    }
    Ok(ExitCode::SUCCESS)
}

/// Replaces "endpoint ID" with the Docker container's name where the engine knows it.
async fn name_plugin_containers(list: &mut [PsEntry]) {
    let mut networks: Vec<String> = list.iter().filter_map(|e| e.network.clone()).collect();
    networks.sort();
    networks.dedup();
    for network in networks {
        let Ok(endpoints) = crate::plugin::engine::network_endpoints(&network).await else {
            continue;
        };
        for entry in list
            .iter_mut()
            .filter(|e| e.network.as_deref() == Some(network.as_str()))
        {
            let Some(short) = entry.container.strip_prefix("endpoint ") else {
                continue;
            };
            if let Some((_, name)) = endpoints.iter().find(|(ep, _)| ep.starts_with(short)) {
                entry.container = name.clone();
            }
        }
    }
}

fn render(list: &[PsEntry]) -> String {
    let header = [
        "CONTAINER",
        "VIA",
        "IFNAME",
        "MAC",
        "ADDRESSES",
        "HOST IFNAME",
    ]
    .map(String::from);
    let mut rows = vec![header.to_vec()];
    for e in list {
        rows.push(vec![
            e.container.clone(),
            e.via.clone(),
            if e.ifname.is_empty() {
                "-".to_string()
            } else {
                e.ifname.clone()
            },
            e.mac.clone(),
            e.ips.join(","),
            e.host_ifname.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_line_up() {
        let e = |c: &str, via: &str, ip: &str| PsEntry {
            via: via.into(),
            container: c.into(),
            network: None,
            ifname: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            ips: vec![ip.into()],
            host_ifname: "mc0123abcd".into(),
        };
        let out = render(&[
            e("web", "attach", "10.32.0.1/12"),
            e("database-1", "plugin", "10.2.1.2/24"),
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = |l: &str| l.find("02:00").unwrap_or(usize::MAX);
        assert_eq!(col(lines[1]), col(lines[2]));
        assert_eq!(lines[0].find("MAC"), Some(col(lines[1])));
        assert!(lines[2].starts_with("database-1  plugin"), "{out}");
    }
}

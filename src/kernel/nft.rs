//! Per-peer counters for the kernel VXLAN fast path.
//!
//! The VXLAN device counts per device, not per remote, and its frames never pass through this
//! process. So at launch we add one nftables table of our own to the host's network namespace:
//!
//! ```text
//! table ip meshctl_BRIDGE {
//!   set vxlan_tx { type ipv4_addr; flags dynamic; counter; }   # one counter per remote
//!   set vxlan_rx { type ipv4_addr; flags dynamic; counter; }
//!   chain tx { type filter hook output priority filter; udp dport PORT update @vxlan_tx { ip daddr } }
//!   chain rx { type filter hook input  priority filter; udp dport PORT update @vxlan_rx { ip saddr } }
//! }
//! ```
//!
//! The kernel adds an element per remote endpoint on its first packet and counts its packets and
//! bytes; the chains accept everything and match nothing else, so no traffic changes. Status and
//! metrics read the sets (`nft -j list table`) and match the addresses to peers' VXLAN endpoints.
//! The table goes on stop; a table left by a router that was killed is replaced at launch.
//!
//! This runs the `nft` program, like the firewall module runs `iptables`: nftables' netlink
//! messages are only stable through libnftables, and the program is its supported front end.
//! Without `nft` (package `nftables`) or `nf_tables` in the kernel, the fast path works as before
//! and status says that its traffic is not counted and why.

use std::collections::HashMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

use crate::api::types::{Status, TrafficCounts};

/// Outer IPv4 (20), UDP (8) and VXLAN (8) headers: what a VXLAN packet adds to the Ethernet frame
/// inside. Subtracted so that VXLAN and sleeve counts both count Ethernet frame bytes.
const ENCAPSULATION: u64 = 36;

/// How long a status request waits for `nft` before leaving the counts out.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// The fast path's per-peer counters: where they are, or why there are none.
#[derive(Debug, Clone)]
pub(crate) struct VxlanCounters {
    /// The nftables table, when installed.
    table: Option<String>,
    /// What status shows in `vxlan_counting`.
    describe: String,
}

impl VxlanCounters {
    /// No counters: the fast path is off.
    pub(crate) fn disabled() -> VxlanCounters {
        VxlanCounters {
            table: None,
            describe: "none: the VXLAN fast path is disabled (--no-fastpath)".into(),
        }
    }

    /// Installs the table counting VXLAN packets on UDP `port`, replacing one a killed router
    /// left. Never fails the launch: without nftables the fast path simply goes uncounted.
    pub(crate) fn install(bridge: &str, port: u16) -> VxlanCounters {
        let table = table_name(bridge);
        let script = format!(
            "table ip {table} {{}}\n\
             delete table ip {table}\n\
             table ip {table} {{\n\
               set vxlan_tx {{ type ipv4_addr; size 65535; flags dynamic; counter; }}\n\
               set vxlan_rx {{ type ipv4_addr; size 65535; flags dynamic; counter; }}\n\
               chain tx {{ type filter hook output priority filter; policy accept;\n\
                 udp dport {port} update @vxlan_tx {{ ip daddr }}\n\
               }}\n\
               chain rx {{ type filter hook input priority filter; policy accept;\n\
                 udp dport {port} update @vxlan_rx {{ ip saddr }}\n\
               }}\n\
             }}\n"
        );
        match run_nft(&["-f", "-"], Some(&script)) {
            Ok(_) => {
                tracing::debug!(%table, "counting VXLAN traffic per peer");
                VxlanCounters {
                    describe: format!("nftables table ip {table}"),
                    table: Some(table),
                }
            }
            Err(e) => {
                tracing::warn!(
                    "VXLAN traffic will not be counted per peer: {e} \
                     (install nftables and load nf_tables to count it)"
                );
                VxlanCounters {
                    table: None,
                    describe: format!("none: {e}"),
                }
            }
        }
    }

    /// Removes the table, if we installed one.
    pub(crate) fn remove(&self) -> Option<String> {
        let table = self.table.as_ref()?;
        run_nft(&["delete", "table", "ip", table], None)
            .err()
            .map(|e| format!("remove nftables table {table}: {e}"))
    }

    /// Fills `peers[].traffic.vxlan` and `vxlan_counting` from the kernel's counters.
    pub(crate) async fn fill(&self, status: &mut Status) {
        status.vxlan_counting = self.describe.clone();
        let Some(table) = self.table.clone() else {
            return;
        };
        let read = tokio::task::spawn_blocking(move || {
            run_nft(&["-j", "list", "table", "ip", &table], None).and_then(|out| parse(&out))
        });
        let counts = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(Ok(counts))) => counts,
            Ok(Ok(Err(e))) => {
                status.vxlan_counting = format!("none: {e}");
                return;
            }
            Ok(Err(e)) => {
                status.vxlan_counting = format!("none: {e}");
                return;
            }
            Err(_) => {
                status.vxlan_counting = format!(
                    "none: nft did not answer within {}s",
                    READ_TIMEOUT.as_secs()
                );
                return;
            }
        };
        for peer in &mut status.peers {
            let endpoint = peer
                .vxlan_endpoint
                .as_deref()
                .and_then(|e| e.parse::<std::net::SocketAddrV4>().ok());
            peer.traffic.vxlan = endpoint.map(|e| counts.get(e.ip()).copied().unwrap_or_default());
        }
    }
}

/// nftables names allow letters, digits and `_` without quoting; bridge names may hold more.
fn table_name(bridge: &str) -> String {
    let safe: String = bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("meshctl_{safe}")
}

/// Runs `nft` with `args` (and `stdin`), returning its output or an error naming the problem.
fn run_nft(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("write to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for nft: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("nft {}: {}", args.join(" "), err.trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Deserialize)]
struct Listing {
    nftables: Vec<Object>,
}

#[derive(Deserialize)]
struct Object {
    set: Option<Set>,
}

#[derive(Deserialize)]
struct Set {
    name: String,
    #[serde(default)]
    elem: Vec<Elem>,
}

#[derive(Deserialize)]
struct Elem {
    elem: ElemBody,
}

#[derive(Deserialize)]
struct ElemBody {
    val: String,
    counter: Counter,
}

#[derive(Deserialize)]
struct Counter {
    packets: u64,
    bytes: u64,
}

/// Reads `nft -j list table` output into counts per remote address, in Ethernet frame bytes.
fn parse(json: &str) -> Result<HashMap<Ipv4Addr, TrafficCounts>, String> {
    let listing: Listing =
        serde_json::from_str(json).map_err(|e| format!("unexpected nft output: {e}"))?;
    let mut counts: HashMap<Ipv4Addr, TrafficCounts> = HashMap::new();
    for set in listing.nftables.into_iter().filter_map(|o| o.set) {
        let rx = match set.name.as_str() {
            "vxlan_rx" => true,
            "vxlan_tx" => false,
            _ => continue,
        };
        for Elem { elem } in set.elem {
            let Ok(addr) = elem.val.parse::<Ipv4Addr>() else {
                continue;
            };
            let c = elem.counter;
            let bytes = c.bytes.saturating_sub(c.packets * ENCAPSULATION);
            let entry = counts.entry(addr).or_default();
            if rx {
                entry.rx_packets = c.packets;
                entry.rx_bytes = bytes;
            } else {
                entry.tx_packets = c.packets;
                entry.tx_bytes = bytes;
            }
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert_eq!(table_name("mesh"), "meshctl_mesh");
        assert_eq!(table_name("mi-1.a"), "meshctl_mi_1_a");
    }

    #[test]
    fn parses_both_sets_and_strips_the_encapsulation() {
        // As nftables 1.0.6 prints it after three pings across a VXLAN device.
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
          {"table": {"family": "ip", "name": "meshctl_mesh", "handle": 1}},
          {"set": {"family": "ip", "name": "vxlan_tx", "table": "meshctl_mesh", "type": "ipv4_addr",
            "handle": 3, "size": 65535, "flags": ["dynamic"],
            "elem": [{"elem": {"val": "192.0.2.2", "counter": {"packets": 3, "bytes": 402}}}]}},
          {"set": {"family": "ip", "name": "vxlan_rx", "table": "meshctl_mesh", "type": "ipv4_addr",
            "handle": 4, "size": 65535, "flags": ["dynamic"]}},
          {"chain": {"family": "ip", "table": "meshctl_mesh", "name": "tx", "handle": 5}}]}"#;
        let counts = parse(json).expect("parses");
        let c = counts[&"192.0.2.2".parse::<Ipv4Addr>().unwrap()];
        assert_eq!((c.tx_packets, c.tx_bytes), (3, 402 - 3 * 36));
        assert_eq!((c.rx_packets, c.rx_bytes), (0, 0));
        assert!(parse("not json").is_err());
    }
}

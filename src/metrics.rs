//! Prometheus metrics: `GET /metrics` on a local TCP address (default 127.0.0.1:6782).
//!
//! The text is rendered from the same [`Status`] document that `meshctl status --json` shows, asked of
//! the control loop for every scrape, so metrics and status never disagree. Format: Prometheus text
//! exposition 0.0.4 (HELP and TYPE before every family, label values escaped).

use std::fmt::Write;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::{mpsc, oneshot};

use std::sync::Arc;

use crate::api::server::Call;
use crate::api::types::{Status, TrafficCounts};
use crate::kernel::nft::VxlanCounters;

/// Serves `/metrics` until the listener fails or the task is dropped.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    calls: mpsc::Sender<Call>,
    vxlan_counters: Arc<VxlanCounters>,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .with_state((calls, vxlan_counters));
    axum::serve(listener, app).await
}

async fn metrics(
    State((calls, vxlan_counters)): State<(mpsc::Sender<Call>, Arc<VxlanCounters>)>,
) -> impl IntoResponse {
    let (tx, rx) = oneshot::channel();
    let mut status = match calls.send(Call::Status(tx)).await {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    if let Some(status) = &mut status {
        vxlan_counters.fill(status).await;
    }
    match status {
        Some(status) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            render(&status),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "the router is shutting down\n".to_string(),
        ),
    }
}

/// One metric family being written.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl Family<'_> {
    fn sample(&mut self, labels: &[(&str, &str)], value: u64) {
        self.value(labels, &value.to_string());
    }

    fn sample_f64(&mut self, labels: &[(&str, &str)], value: f64) {
        self.value(labels, &value.to_string());
    }

    fn value(&mut self, labels: &[(&str, &str)], value: &str) {
        let _ = write!(self.out, "{}", self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn family<'a>(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Family<'a> {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    Family { out, name }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the status as Prometheus text.
pub(crate) fn render(s: &Status) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "meshctl_info",
        "gauge",
        "Router identity; the value is always 1.",
    )
    .sample(
        &[
            ("name", &s.name),
            ("nickname", &s.nickname),
            ("version", &s.version),
            ("encryption", if s.encryption { "on" } else { "off" }),
        ],
        1,
    );

    let mut f = family(
        &mut out,
        "meshctl_peer_reachable",
        "gauge",
        "1 if a route to the peer exists.",
    );
    for p in &s.peers {
        f.sample(
            &[("peer", &p.name), ("nickname", &p.nickname)],
            u64::from(p.reachable),
        );
    }
    let mut f = family(
        &mut out,
        "meshctl_peer_overlay",
        "gauge",
        "The overlay that reaches each reachable peer (value 1).",
    );
    for p in &s.peers {
        if let Some(overlay) = &p.overlay {
            f.sample(
                &[
                    ("peer", &p.name),
                    ("nickname", &p.nickname),
                    ("overlay", overlay),
                ],
                1,
            );
        }
    }

    render_links(&mut out, s);
    render_traffic(&mut out, s);

    let mut counts: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for c in &s.connections {
        *counts
            .entry((c.direction.as_str(), c.state.as_str()))
            .or_default() += 1;
    }
    let mut f = family(
        &mut out,
        "meshctl_connections",
        "gauge",
        "Control connections and connection attempts by direction and state.",
    );
    for ((direction, state), n) in &counts {
        f.sample(&[("direction", direction), ("state", state)], *n);
    }

    let sl = &s.sleeve;
    let mut f = family(
        &mut out,
        "meshctl_sleeve_datagrams_total",
        "counter",
        "Sleeve UDP datagrams.",
    );
    f.sample(&[("direction", "rx")], sl.rx_datagrams);
    f.sample(&[("direction", "tx")], sl.tx_datagrams);
    let mut f = family(
        &mut out,
        "meshctl_sleeve_frames_total",
        "counter",
        "Ethernet frames carried by the sleeve.",
    );
    f.sample(&[("direction", "rx")], sl.rx_frames);
    f.sample(&[("direction", "tx")], sl.tx_frames);
    family(
        &mut out,
        "meshctl_sleeve_relayed_frames_total",
        "counter",
        "Frames this router relayed between two other peers.",
    )
    .sample(&[], sl.relayed_frames);
    family(
        &mut out,
        "meshctl_sleeve_key_rotations_total",
        "counter",
        "Times a sending key moved to a new epoch (keys rotate by datagram count).",
    )
    .sample(&[], sl.key_rotations);
    let mut f = family(
        &mut out,
        "meshctl_sleeve_drops_total",
        "counter",
        "Datagrams or frames the sleeve dropped, by reason.",
    );
    for (reason, n) in &sl.drops {
        f.sample(&[("reason", reason)], *n);
    }
    let mut f = family(
        &mut out,
        "meshctl_sleeve_bytes_total",
        "counter",
        "Bytes of sleeve UDP datagrams (payload).",
    );
    f.sample(&[("direction", "rx")], sl.rx_bytes);
    f.sample(&[("direction", "tx")], sl.tx_bytes);

    let g = &s.gossip;
    let mut f = family(
        &mut out,
        "meshctl_gossip_bytes_total",
        "counter",
        "Bytes of control-plane messages (gossip, IPAM, heartbeats) on all connections.",
    );
    f.sample(&[("direction", "rx")], g.rx_bytes);
    f.sample(&[("direction", "tx")], g.tx_bytes);
    let mut f = family(
        &mut out,
        "meshctl_gossip_messages_total",
        "counter",
        "Control-plane messages on all connections.",
    );
    f.sample(&[("direction", "rx")], g.rx_messages);
    f.sample(&[("direction", "tx")], g.tx_messages);

    render_ipam(&mut out, s);

    let mut f = family(
        &mut out,
        "meshctl_dns_queries_total",
        "counter",
        "DNS messages the embedded name server received, by outcome (0 while DNS is not enabled).",
    );
    let dns = s.dns.as_ref();
    let count = |pick: fn(&crate::api::types::DnsStatus) -> u64| dns.map_or(0, pick);
    for (outcome, n) in [
        ("answered", count(|d| d.answered)),
        ("nxdomain", count(|d| d.nxdomain)),
        ("forwarded", count(|d| d.forwarded)),
        ("upstream_failed", count(|d| d.upstream_failed)),
        ("malformed", count(|d| d.malformed)),
    ] {
        f.sample(&[("outcome", outcome)], n);
    }
    family(
        &mut out,
        "meshctl_dns_records",
        "gauge",
        "Live container names in the mesh's DNS.",
    )
    .sample(&[], dns.map_or(0, |d| d.records.len() as u64));
    out
}

/// Per-peer measurements of direct connections: RTT, loss, path MTU, key age, sleeve traffic.
fn render_links(out: &mut String, s: &Status) {
    let linked: Vec<_> = s
        .peers
        .iter()
        .filter_map(|p| Some((p, p.link.as_ref()?)))
        .collect();
    let labels = |p: &crate::api::types::PeerStatus| {
        [("peer", p.name.clone()), ("nickname", p.nickname.clone())]
    };
    type Gauge = fn(&crate::api::types::LinkStatus) -> f64;
    let gauges: [(&'static str, &str, Gauge); 3] = [
        (
            "meshctl_peer_rtt_seconds",
            "Smoothed round-trip time of the control connection to a directly connected peer.",
            |l| l.rtt_ms / 1000.0,
        ),
        (
            "meshctl_peer_path_mtu_bytes",
            "Largest UDP payload the underlay path to a directly connected peer carries (QUIC path MTU discovery).",
            |l| f64::from(l.path_mtu_bytes),
        ),
        (
            "meshctl_peer_key_age_seconds",
            "Age of the sleeve keys with a directly connected peer (derived in the handshake).",
            |l| l.key_age_secs as f64,
        ),
    ];
    for (name, help, value) in gauges {
        let mut f = family(out, name, "gauge", help);
        for (p, l) in &linked {
            let [a, b] = labels(p);
            f.sample_f64(&[(a.0, &a.1), (b.0, &b.1)], value(l));
        }
    }
    let mut f = family(
        out,
        "meshctl_peer_control_packets_total",
        "counter",
        "QUIC packets of the control connection to a directly connected peer, sent and declared lost.",
    );
    for (p, l) in &linked {
        let [a, b] = labels(p);
        f.sample(
            &[(a.0, &a.1), (b.0, &b.1), ("state", "sent")],
            l.sent_packets,
        );
        f.sample(
            &[(a.0, &a.1), (b.0, &b.1), ("state", "lost")],
            l.lost_packets,
        );
    }
    type Counter = fn(&crate::api::types::LinkStatus) -> Option<u64>;
    let counters: [(&'static str, &str, Counter, Counter); 2] = [
        (
            "meshctl_peer_sleeve_bytes_total",
            "Bytes of sleeve datagrams exchanged with a directly connected peer (including relayed traffic; absent while the peer is on VXLAN).",
            |l| l.rx_bytes,
            |l| l.tx_bytes,
        ),
        (
            "meshctl_peer_sleeve_packets_total",
            "Sleeve datagrams exchanged with a directly connected peer (including relayed traffic; absent while the peer is on VXLAN).",
            |l| l.rx_packets,
            |l| l.tx_packets,
        ),
    ];
    let mut f = family(
        out,
        "meshctl_peer_drops_total",
        "counter",
        "Sleeve datagrams from a directly connected peer dropped, by reason.",
    );
    for (p, l) in &linked {
        let [a, b] = labels(p);
        for (reason, n) in &l.drops {
            f.sample(&[(a.0, &a.1), (b.0, &b.1), ("reason", reason)], *n);
        }
    }
    for (name, help, rx, tx) in counters {
        let mut f = family(out, name, "counter", help);
        for (p, l) in &linked {
            let [a, b] = labels(p);
            for (direction, value) in [("rx", rx(l)), ("tx", tx(l))] {
                if let Some(v) = value {
                    f.sample(&[(a.0, &a.1), (b.0, &b.1), ("direction", direction)], v);
                }
            }
        }
    }
}

/// Frames exchanged with every peer end to end, by overlay and direction.
fn render_traffic(out: &mut String, s: &Status) {
    type Pick = fn(&TrafficCounts) -> (u64, u64);
    let families: [(&'static str, &str, Pick); 2] = [
        (
            "meshctl_peer_traffic_packets_total",
            "Ethernet frames exchanged with a peer's containers, direct or relayed, by overlay (vxlan: nftables counters, present when counted).",
            |c| (c.rx_packets, c.tx_packets),
        ),
        (
            "meshctl_peer_traffic_bytes_total",
            "Bytes of those frames, by overlay.",
            |c| (c.rx_bytes, c.tx_bytes),
        ),
    ];
    for (name, help, pick) in families {
        let mut f = family(out, name, "counter", help);
        for p in &s.peers {
            let overlays = [
                ("sleeve", Some(p.traffic.sleeve)),
                ("vxlan", p.traffic.vxlan),
            ];
            for (overlay, counts) in overlays {
                let Some(counts) = counts else { continue };
                let (rx, tx) = pick(&counts);
                for (direction, v) in [("rx", rx), ("tx", tx)] {
                    f.sample(
                        &[
                            ("peer", &p.name),
                            ("nickname", &p.nickname),
                            ("overlay", overlay),
                            ("direction", direction),
                        ],
                        v,
                    );
                }
            }
        }
    }
}

/// Owned, used and free addresses per subnet and owner.
fn render_ipam(out: &mut String, s: &Status) {
    let mut f = family(
        out,
        "meshctl_ipam_addresses",
        "gauge",
        "Addresses per subnet and owning peer, by state (used or free); their sum is what the peer owns.",
    );
    let Some(ipam) = &s.ipam else {
        return;
    };
    for sub in &ipam.subnets {
        for o in &sub.owners {
            for (state, n) in [("used", o.used), ("free", o.free)] {
                f.sample(
                    &[("subnet", &sub.subnet), ("peer", &o.peer), ("state", state)],
                    n,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{
        ConnectionStatus, DnsStatus, IpamOwner, IpamStatus, IpamSubnet, LinkStatus, PeerStatus,
        PeerTraffic, SleeveStatus,
    };

    #[test]
    fn renders_families_with_help_type_and_escaped_labels() {
        let status = Status {
            name: "aa:bb:cc:dd:ee:ff".into(),
            nickname: "a \"quoted\" host".into(),
            version: "0.1.0".into(),
            encryption: true,
            port: 6783,
            bridge: "mesh".into(),
            mtu: 1376,
            ipam: Some(IpamStatus {
                state: "ready".into(),
                waiting: None,
                conflict: None,
                range: "10.32.0.0/12".into(),
                bootstrap_members: None,
                subnets: vec![IpamSubnet {
                    subnet: "10.32.0.0/12".into(),
                    owners: vec![IpamOwner {
                        peer: "aa:bb:cc:dd:ee:ff".into(),
                        nickname: None,
                        owned: 100,
                        used: 3,
                        free: 97,
                        reachable: true,
                    }],
                }],
                unreachable_owners: vec![],
                reachable_percent: None,
                allocations: vec![],
                reclaims: vec![],
            }),
            targets: vec![],
            gossip: Default::default(),
            peers: vec![PeerStatus {
                name: "11:22:33:44:55:66".into(),
                nickname: "b".into(),
                reachable: true,
                next_hop: Some("11:22:33:44:55:66".into()),
                overlay: Some("sleeve".into()),
                overlay_reason: "encrypted".into(),
                mtu: Some(1376),
                cipher: Some("ChaCha20-Poly1305".into()),
                connections: 1,
                relayed_via: None,
                link: Some(LinkStatus {
                    rtt_ms: 1.5,
                    sent_packets: 10,
                    lost_packets: 1,
                    loss_ratio: 0.1,
                    path_mtu_bytes: 1452,
                    rx_bytes: Some(4096),
                    tx_packets: Some(2),
                    drops: [("replayed".to_string(), 4)].into_iter().collect(),
                    ..Default::default()
                }),
                vxlan_endpoint: Some("10.0.0.2:6785".into()),
                traffic: PeerTraffic {
                    sleeve: TrafficCounts {
                        rx_packets: 5,
                        ..Default::default()
                    },
                    vxlan: Some(TrafficCounts {
                        tx_bytes: 9000,
                        ..Default::default()
                    }),
                },
            }],
            vxlan_counting: "nftables table ip meshctl_mesh".into(),
            connections: vec![ConnectionStatus {
                address: "10.0.0.2:6783".into(),
                direction: "outbound".into(),
                state: "established".into(),
                peer: None,
                nickname: None,
                error: None,
            }],
            dns: Some(DnsStatus {
                domain: "meshctl.local".into(),
                listening: vec![],
                upstream: None,
                queries: 9,
                answered: 7,
                nxdomain: 1,
                forwarded: 1,
                upstream_failed: 0,
                malformed: 0,
                records: vec![],
            }),
            sleeve: SleeveStatus {
                drops: [("replayed".to_string(), 3)].into_iter().collect(),
                ..Default::default()
            },
        };
        let text = render(&status);
        assert!(
            text.contains("nickname=\"a \\\"quoted\\\" host\""),
            "{text}"
        );
        assert!(
            text.contains("meshctl_sleeve_drops_total{reason=\"replayed\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("meshctl_connections{direction=\"outbound\",state=\"established\"} 1")
        );
        for sample in [
            "meshctl_peer_rtt_seconds{peer=\"11:22:33:44:55:66\",nickname=\"b\"} 0.0015",
            "meshctl_peer_control_packets_total{peer=\"11:22:33:44:55:66\",nickname=\"b\",state=\"lost\"} 1",
            "meshctl_peer_sleeve_bytes_total{peer=\"11:22:33:44:55:66\",nickname=\"b\",direction=\"rx\"} 4096",
            "meshctl_peer_sleeve_packets_total{peer=\"11:22:33:44:55:66\",nickname=\"b\",direction=\"tx\"} 2",
            "meshctl_ipam_addresses{subnet=\"10.32.0.0/12\",peer=\"aa:bb:cc:dd:ee:ff\",state=\"free\"} 97",
            "meshctl_peer_drops_total{peer=\"11:22:33:44:55:66\",nickname=\"b\",reason=\"replayed\"} 4",
            "meshctl_dns_queries_total{outcome=\"answered\"} 7",
            "meshctl_gossip_bytes_total{direction=\"rx\"} 0",
            "meshctl_peer_traffic_packets_total{peer=\"11:22:33:44:55:66\",nickname=\"b\",overlay=\"sleeve\",direction=\"rx\"} 5",
            "meshctl_peer_traffic_bytes_total{peer=\"11:22:33:44:55:66\",nickname=\"b\",overlay=\"vxlan\",direction=\"tx\"} 9000",
        ] {
            assert!(text.contains(sample), "no {sample} in\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "no TYPE for {name}"
            );
        }
    }
}

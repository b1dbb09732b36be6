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

use crate::api::server::Call;
use crate::api::types::Status;

/// Serves `/metrics` until the listener fails or the task is dropped.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    calls: mpsc::Sender<Call>,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .with_state(calls);
    axum::serve(listener, app).await
}

async fn metrics(State(calls): State<mpsc::Sender<Call>>) -> impl IntoResponse {
    let (tx, rx) = oneshot::channel();
    let status = match calls.send(Call::Status(tx)).await {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
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
    let mut f = family(
        &mut out,
        "meshctl_sleeve_drops_total",
        "counter",
        "Datagrams or frames the sleeve dropped, by reason.",
    );
    for (reason, n) in &sl.drops {
        f.sample(&[("reason", reason)], *n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{ConnectionStatus, PeerStatus, SleeveStatus};

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
            ipam: None,
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
            }],
            connections: vec![ConnectionStatus {
                address: "10.0.0.2:6783".into(),
                direction: "outbound".into(),
                state: "established".into(),
                peer: None,
                nickname: None,
                error: None,
            }],
            dns: None,
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
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "no TYPE for {name}"
            );
        }
    }
}

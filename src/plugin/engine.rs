//! A minimal Docker Engine API client: find a running container's network namespace by name or id.
//!
//! Talks HTTP to the engine's Unix socket (`DOCKER_HOST=unix://PATH`, default `/var/run/docker.sock`),
//! API paths without a version prefix, which every engine since 1.13 serves at its own version.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use hyper::{Method, StatusCode};
use serde::Deserialize;

/// Default engine socket.
const DOCKER_SOCKET: &str = "/var/run/docker.sock";

#[derive(Deserialize)]
struct Inspect {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "State")]
    state: State,
}

#[derive(Deserialize)]
struct State {
    #[serde(rename = "Running")]
    running: bool,
    #[serde(rename = "Pid")]
    pid: u32,
}

/// A running container, as the engine reports it.
#[derive(Debug, Clone)]
pub(crate) struct Container {
    /// Full id.
    pub(crate) id: String,
    /// Name without the leading slash.
    pub(crate) name: String,
    /// Its network namespace, through its main process.
    pub(crate) netns: PathBuf,
}

fn socket() -> PathBuf {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if host.starts_with("unix://") => PathBuf::from(&host["unix://".len()..]),
        _ => PathBuf::from(DOCKER_SOCKET),
    }
}

/// Looks up a running container by name or (possibly short) id.
pub(crate) async fn find(name_or_id: &str) -> Result<Container> {
    if name_or_id.is_empty() || name_or_id.contains(['/', '?', '#', ' ']) {
        bail!("{name_or_id:?} is not a container name or id");
    }
    let socket = socket();
    let stream = tokio::net::UnixStream::connect(&socket).await.map_err(|e| {
        anyhow!(
            "{name_or_id:?} is neither a network namespace nor a PID, and Docker is not reachable at {} ({e})",
            socket.display()
        )
    })?;
    let path = format!("/containers/{name_or_id}/json");
    let (status, body) = crate::api::client::request::<()>(stream, Method::GET, &path, None)
        .await
        .with_context(|| format!("ask Docker about container {name_or_id:?}"))?;
    match status {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => bail!(
            "no network namespace, PID or Docker container called {name_or_id:?} \
             (see `ip netns list` and `docker ps`)"
        ),
        other => bail!(
            "Docker answered {other} about container {name_or_id:?}: {}",
            String::from_utf8_lossy(&body).trim()
        ),
    }
    let inspect: Inspect =
        serde_json::from_slice(&body).context("decode Docker's container inspect")?;
    if !inspect.state.running || inspect.state.pid == 0 {
        bail!("Docker container {name_or_id:?} is not running; start it first");
    }
    Ok(Container {
        id: inspect.id,
        name: inspect.name.trim_start_matches('/').to_string(),
        netns: PathBuf::from(format!("/proc/{}/ns/net", inspect.state.pid)),
    })
}

#[derive(Deserialize)]
struct NetworkInspect {
    #[serde(rename = "Containers", default)]
    containers: std::collections::BTreeMap<String, NetworkContainer>,
}

#[derive(Deserialize)]
struct NetworkContainer {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "EndpointID", default)]
    endpoint_id: String,
}

/// The containers on a Docker network, as (endpoint id, container name) pairs.
pub(crate) async fn network_endpoints(network_id: &str) -> Result<Vec<(String, String)>> {
    if network_id.is_empty() || !network_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        bail!("{network_id:?} is not a network id");
    }
    let socket = socket();
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .with_context(|| format!("connect to Docker at {}", socket.display()))?;
    let path = format!("/networks/{network_id}");
    let (status, body) = crate::api::client::request::<()>(stream, Method::GET, &path, None)
        .await
        .with_context(|| format!("ask Docker about network {network_id}"))?;
    if status != StatusCode::OK {
        bail!("Docker answered {status} about network {network_id}");
    }
    let inspect: NetworkInspect =
        serde_json::from_slice(&body).context("decode Docker's network inspect")?;
    Ok(inspect
        .containers
        .into_values()
        .map(|c| (c.endpoint_id, c.name))
        .collect())
}

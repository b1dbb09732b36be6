//! The daemon side of the local API (axum on a Unix socket).
//!
//! Handlers that read or change router state ask the control loop through [`Call`] and wait for its
//! answer: the control loop stays the only owner of the router. Attach and detach need only netlink, so
//! they run here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::{mpsc, oneshot};

use super::types::{
    AttachRequest, AttachResponse, DetachRequest, DnsAddRequest, DnsLookupRequest, DnsNameResponse,
    DnsRemoveRequest, ErrorBody, ExposeRequest, ExposeResponse, IpamStatus, PeersRequest, PsEntry,
    RmPeerRequest, Status,
};
use crate::kernel::attach::{self, AttachSpec};
use crate::kernel::firewall::masquerade;
use crate::kernel::netlink::Netlink;

/// A request for the control loop.
pub(crate) enum Call {
    Status(oneshot::Sender<Status>),
    Connect(Vec<SocketAddr>, oneshot::Sender<()>),
    Forget(Vec<SocketAddr>, oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
    /// Allocate an address for a container; answered once allocated, refused, or `wait` passed.
    Allocate {
        key: String,
        subnet: Option<mesh::ipam::Cidr>,
        wait: std::time::Duration,
        reply: oneshot::Sender<Result<(std::net::Ipv4Addr, u8), String>>,
    },
    /// Release a container's addresses (kept for it during the grace period).
    Release(String, oneshot::Sender<usize>),
    Ipam(oneshot::Sender<IpamStatus>),
    /// Hand our address space to a live peer, then stop and remove the IPAM state.
    Reset(oneshot::Sender<String>),
    RmPeer(String, oneshot::Sender<Result<String, String>>),
    /// Register names (already qualified) of a container on this host; answers how many were new.
    DnsAdd {
        name: String,
        addrs: Vec<std::net::IpAddr>,
        reply: oneshot::Sender<usize>,
    },
    /// Remove this host's records of a name (one address or all); answers how many.
    DnsRemove {
        name: String,
        addr: Option<std::net::IpAddr>,
        reply: oneshot::Sender<usize>,
    },
}

/// How long attach waits for an address by default.
pub(crate) const ALLOC_WAIT_DEFAULT: u64 = 30;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) calls: mpsc::Sender<Call>,
    pub(crate) netlink: Arc<Netlink>,
    pub(crate) bridge: String,
    pub(crate) mtu: u32,
    /// The name service: lookups read its zone; expose and hide start and stop its listeners.
    pub(crate) dns: Arc<crate::dns::Service>,
    /// Containers on the bridge (`meshctl ps`, release on exit).
    pub(crate) containers: Arc<crate::plugin::containers::Registry>,
    /// Per-peer counters of the VXLAN fast path, read into each status.
    pub(crate) vxlan_counters: Arc<crate::kernel::nft::VxlanCounters>,
}

/// The IPAM key of the host's own address on the mesh (`meshctl expose` without CIDR).
pub(crate) const EXPOSE_KEY: &str = "host:expose";

/// Serves the API until the listener fails or the task is dropped.
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    state: ApiState,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/status", get(status))
        .route("/connect", post(connect))
        .route("/forget", post(forget))
        .route("/stop", post(stop))
        .route("/attach", post(attach_container))
        .route("/detach", post(detach_container))
        .route("/expose", post(expose))
        .route("/hide", post(hide))
        .route("/ipam", get(ipam))
        .route("/reset", post(reset))
        .route("/rmpeer", post(rmpeer))
        .route("/dns/add", post(dns_add))
        .route("/dns/remove", post(dns_remove))
        .route("/dns/lookup", post(dns_lookup))
        .route("/ps", get(ps))
        .with_state(state);
    axum::serve(listener, app).await
}

/// An error answer: a status code and a message that names the problem.
pub(crate) struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

async fn ask<T>(
    state: &ApiState,
    make: impl FnOnce(oneshot::Sender<T>) -> Call,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    let gone = || {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the router is shutting down".into(),
        )
    };
    state.calls.send(make(tx)).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())
}

async fn status(State(state): State<ApiState>) -> Result<Json<Status>, ApiError> {
    let mut status = ask(&state, Call::Status).await?;
    state.vxlan_counters.fill(&mut status).await;
    Ok(Json(status))
}

async fn connect(
    State(state): State<ApiState>,
    Json(req): Json<PeersRequest>,
) -> Result<Json<Vec<String>>, ApiError> {
    let addrs = crate::daemon::resolve_peers(&req.peers)
        .await
        .map_err(|e| bad_request(format!("{e:#}")))?;
    ask(&state, |tx| Call::Connect(addrs.clone(), tx)).await?;
    Ok(Json(addrs.iter().map(|a| a.to_string()).collect()))
}

async fn forget(
    State(state): State<ApiState>,
    Json(req): Json<PeersRequest>,
) -> Result<Json<Vec<String>>, ApiError> {
    let addrs = crate::daemon::resolve_peers(&req.peers)
        .await
        .map_err(|e| bad_request(format!("{e:#}")))?;
    ask(&state, |tx| Call::Forget(addrs.clone(), tx)).await?;
    Ok(Json(addrs.iter().map(|a| a.to_string()).collect()))
}

async fn stop(State(state): State<ApiState>) -> Result<Json<()>, ApiError> {
    ask(&state, Call::Stop).await?;
    Ok(Json(()))
}

async fn attach_container(
    State(state): State<ApiState>,
    Json(req): Json<AttachRequest>,
) -> Result<Json<AttachResponse>, ApiError> {
    let netns = PathBuf::from(&req.netns);
    if !netns.is_absolute() {
        return Err(bad_request(format!(
            "netns must be an absolute path, got {:?}",
            req.netns
        )));
    }
    let mut addrs = Vec::new();
    let mut subnets = Vec::new();
    for ip in &req.ips {
        if let Some(net) = ip.strip_prefix("net:") {
            let subnet: mesh::ipam::Cidr = net.parse().map_err(|e| {
                bad_request(format!(
                    "bad --ip {ip:?}: {e}; write net:CIDR, e.g. net:10.2.1.0/24"
                ))
            })?;
            subnets.push(Some(subnet));
        } else {
            addrs.push(parse_cidr(ip).map_err(bad_request)?);
        }
    }
    if req.ips.is_empty() {
        subnets.push(None);
    }
    let key = match &req.key {
        Some(k) => k.clone(),
        None => container_key(req.container.as_deref(), &netns)?,
    };
    let name = match &req.name {
        Some(n) => Some(state.dns.qualify(n).map_err(bad_request)?),
        None => None,
    };
    let wait = std::time::Duration::from_secs(req.wait_secs.unwrap_or(ALLOC_WAIT_DEFAULT));
    let allocated = !subnets.is_empty();
    for subnet in subnets {
        let (addr, prefix) = ask(&state, |reply| Call::Allocate {
            key: key.clone(),
            subnet,
            wait,
            reply,
        })
        .await?
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))?;
        addrs.push((std::net::IpAddr::V4(addr), prefix));
    }
    let shown: Vec<String> = addrs.iter().map(|(a, p)| format!("{a}/{p}")).collect();
    let spec = AttachSpec {
        netns,
        ifname: req.ifname.clone(),
        addrs,
        mtu: state.mtu,
    };
    let attached = match attach::attach(&state.netlink, &state.bridge, &spec).await {
        Ok(a) => a,
        Err(e) if allocated && format!("{e:#}").contains("already exists") => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "{e:#}; the container is attached already, with mesh address {}; detach it \
                     first to attach again",
                    shown.join(" ")
                ),
            ));
        }
        Err(e) => {
            if allocated {
                let _ = ask(&state, |tx| Call::Release(key.clone(), tx)).await;
            }
            return Err(internal(e));
        }
    };
    if let Some(name) = name.clone() {
        let addrs: Vec<std::net::IpAddr> = spec.addrs.iter().map(|(a, _)| *a).collect();
        ask(&state, |reply| Call::DnsAdd { name, addrs, reply }).await?;
    }
    let label = req.label.clone().unwrap_or_else(|| req.netns.clone());
    state.containers.insert(
        &attached.host_ifname,
        crate::plugin::containers::Entry {
            via: crate::plugin::containers::Via::Attach,
            container: label,
            key: allocated.then(|| key.clone()),
            network: None,
            ifname: attached.ifname.clone(),
            mac: format_mac(&attached.mac),
            ips: shown.clone(),
            netns: namespace_id(&spec.netns),
            dns_name: name,
        },
    );
    Ok(Json(AttachResponse {
        host_ifname: attached.host_ifname,
        ifname: attached.ifname,
        mac: format_mac(&attached.mac),
        ips: shown,
    }))
}

async fn detach_container(
    State(state): State<ApiState>,
    Json(req): Json<DetachRequest>,
) -> Result<Json<()>, ApiError> {
    let netns = PathBuf::from(&req.netns);
    // Release even when the netns is gone already (the container exited).
    let key = match &req.key {
        Some(k) => Some(k.clone()),
        None => container_key(req.container.as_deref(), &netns).ok(),
    };
    let detached = attach::detach(&state.netlink, &netns, &req.ifname).await;
    state
        .containers
        .remove(&attach::host_ifname(&netns, &req.ifname));
    if let Some(key) = key {
        ask(&state, |tx| Call::Release(key, tx)).await?;
    }
    if let Some(name) = req.name.as_deref().and_then(|n| state.dns.qualify(n).ok()) {
        ask(&state, |reply| Call::DnsRemove {
            name,
            addr: None,
            reply,
        })
        .await?;
    }
    detached.map_err(internal)?;
    Ok(Json(()))
}

/// Gives the host an address on the mesh bridge and masquerades the subnet's outbound traffic.
async fn expose(
    State(state): State<ApiState>,
    Json(req): Json<ExposeRequest>,
) -> Result<Json<ExposeResponse>, ApiError> {
    let (addr, prefix) = match &req.cidr {
        Some(cidr) => parse_cidr(cidr).map_err(bad_request)?,
        // An address of the host's own in the default subnet, the same on every expose.
        None => {
            let wait = std::time::Duration::from_secs(ALLOC_WAIT_DEFAULT);
            let (addr, prefix) = ask(&state, |reply| Call::Allocate {
                key: EXPOSE_KEY.to_string(),
                subnet: None,
                wait,
                reply,
            })
            .await?
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))?;
            (std::net::IpAddr::V4(addr), prefix)
        }
    };
    state
        .netlink
        .add_address(&state.bridge, addr, prefix)
        .await
        .map_err(internal)?;
    set_masquerade(&state, addr, prefix, true).await?;
    if let Err(e) = state.dns.listen(addr).await {
        tracing::warn!("no name server on {addr}: {e:#}");
    }
    bridge_addresses(&state).await
}

/// Removes the host's address(es) from the mesh bridge and their masquerading rules.
async fn hide(
    State(state): State<ApiState>,
    Json(req): Json<ExposeRequest>,
) -> Result<Json<ExposeResponse>, ApiError> {
    let current = state
        .netlink
        .addresses(&state.bridge)
        .await
        .map_err(internal)?;
    let chosen: Vec<(std::net::IpAddr, u8)> = match &req.cidr {
        Some(cidr) => {
            let wanted = parse_cidr(cidr).map_err(bad_request)?;
            if !current.contains(&wanted) {
                return Err(bad_request(format!(
                    "{cidr} is not exposed on bridge {}",
                    state.bridge
                )));
            }
            vec![wanted]
        }
        None => current
            .into_iter()
            .filter(|(a, _)| !is_link_local(a))
            .collect(),
    };
    let own = ask(&state, Call::Ipam)
        .await?
        .allocations
        .into_iter()
        .find(|a| a.container == EXPOSE_KEY && !a.releasing)
        .and_then(|a| a.address.parse::<std::net::IpAddr>().ok());
    for (addr, prefix) in chosen {
        state.dns.unlisten(addr);
        state
            .netlink
            .del_address(&state.bridge, addr, prefix)
            .await
            .map_err(internal)?;
        set_masquerade(&state, addr, prefix, false).await?;
        if own == Some(addr) {
            ask(&state, |tx| Call::Release(EXPOSE_KEY.to_string(), tx)).await?;
        }
    }
    bridge_addresses(&state).await
}

/// Adds or removes the masquerading rule for the subnet of `addr/prefix` (runs iptables off the runtime).
async fn set_masquerade(
    state: &ApiState,
    addr: std::net::IpAddr,
    prefix: u8,
    add: bool,
) -> Result<(), ApiError> {
    let (net, bridge) = (network(addr, prefix), state.bridge.clone());
    tokio::task::spawn_blocking(move || masquerade(&net, addr.is_ipv6(), &bridge, add))
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))
}

async fn bridge_addresses(state: &ApiState) -> Result<Json<ExposeResponse>, ApiError> {
    let addresses = state
        .netlink
        .addresses(&state.bridge)
        .await
        .map_err(internal)?;
    Ok(Json(ExposeResponse {
        addresses: addresses
            .iter()
            .filter(|(a, _)| !is_link_local(a))
            .map(|(a, p)| format!("{a}/{p}"))
            .collect(),
    }))
}

fn is_link_local(addr: &std::net::IpAddr) -> bool {
    match addr {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// `addr/prefix` with the host bits cleared, as `NET/PREFIX`.
pub(crate) fn network(addr: std::net::IpAddr, prefix: u8) -> String {
    match addr {
        std::net::IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            format!(
                "{}/{prefix}",
                std::net::Ipv4Addr::from(u32::from(v4) & mask)
            )
        }
        std::net::IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            format!(
                "{}/{prefix}",
                std::net::Ipv6Addr::from(u128::from(v6) & mask)
            )
        }
    }
}

/// The namespace file and its (device, inode), to notice when the container is gone.
fn namespace_id(netns: &std::path::Path) -> Option<(String, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(netns).ok()?;
    Some((netns.display().to_string(), meta.dev(), meta.ino()))
}

/// The IPAM key of a container: its Docker id, else its netns inode (the same for every path
/// to that namespace, and for the namespace's whole life).
fn container_key(container: Option<&str>, netns: &std::path::Path) -> Result<String, ApiError> {
    use std::os::unix::fs::MetadataExt;
    if let Some(id) = container {
        return Ok(format!("docker:{id}"));
    }
    let meta = std::fs::metadata(netns).map_err(|e| {
        bad_request(format!(
            "cannot read network namespace {}: {e}; is the container running?",
            netns.display()
        ))
    })?;
    Ok(format!("netns:{}:{}", meta.dev(), meta.ino()))
}

/// Containers on the bridge, attached ones first.
async fn ps(State(state): State<ApiState>) -> Json<Vec<PsEntry>> {
    let mut list: Vec<PsEntry> = state
        .containers
        .list()
        .into_iter()
        .map(|(host_ifname, e)| PsEntry {
            via: match e.via {
                // The CNI plugin attaches through the same call, with a key of its own.
                crate::plugin::containers::Via::Attach
                    if e.key.as_deref().is_some_and(|k| k.starts_with("cni:")) =>
                {
                    "cni".to_string()
                }
                crate::plugin::containers::Via::Attach => "attach".to_string(),
                crate::plugin::containers::Via::Plugin => "plugin".to_string(),
            },
            container: e.container,
            network: e.network,
            ifname: e.ifname,
            mac: e.mac,
            ips: e.ips,
            host_ifname,
        })
        .collect();
    list.sort_by(|a, b| (&a.via, &a.container).cmp(&(&b.via, &b.container)));
    Json(list)
}

async fn ipam(State(state): State<ApiState>) -> Result<Json<IpamStatus>, ApiError> {
    Ok(Json(ask(&state, Call::Ipam).await?))
}

/// `meshctl reset`: this host leaves the mesh and its space goes to another router. Containers
/// attached here (by `attach` or CNI) would keep addresses that router may give out again, and
/// clash the day a router runs here again, so they are detached first. Docker's endpoints are
/// Docker's to remove.
async fn reset(State(state): State<ApiState>) -> Result<Json<String>, ApiError> {
    let mut detached = 0;
    for (host_ifname, entry) in state.containers.list() {
        if entry.via != crate::plugin::containers::Via::Attach {
            continue;
        }
        match state.netlink.delete_link(&host_ifname).await {
            Ok(()) => {
                state.containers.remove(&host_ifname);
                detached += 1;
            }
            Err(e) => tracing::warn!(
                "reset: could not detach {} ({host_ifname}): {e:#}",
                entry.container
            ),
        }
    }
    let said = ask(&state, Call::Reset).await?;
    Ok(Json(if detached > 0 {
        format!("detached {detached} container(s); {said}")
    } else {
        said
    }))
}

async fn rmpeer(
    State(state): State<ApiState>,
    Json(req): Json<RmPeerRequest>,
) -> Result<Json<String>, ApiError> {
    ask(&state, |tx| Call::RmPeer(req.peer.clone(), tx))
        .await?
        .map(Json)
        .map_err(|e| ApiError(StatusCode::CONFLICT, e))
}

async fn dns_add(
    State(state): State<ApiState>,
    Json(req): Json<DnsAddRequest>,
) -> Result<Json<DnsNameResponse>, ApiError> {
    let name = state.dns.qualify(&req.name).map_err(bad_request)?;
    if req.ips.is_empty() {
        return Err(bad_request("give at least one address for the name"));
    }
    let mut addrs = Vec::new();
    for ip in &req.ips {
        addrs.push(
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| bad_request(format!("{ip:?} is not an IP address")))?,
        );
    }
    let changed = ask(&state, |reply| Call::DnsAdd {
        name: name.clone(),
        addrs,
        reply,
    })
    .await?;
    Ok(Json(name_response(&state, &name, changed)))
}

async fn dns_remove(
    State(state): State<ApiState>,
    Json(req): Json<DnsRemoveRequest>,
) -> Result<Json<DnsNameResponse>, ApiError> {
    let name = state.dns.qualify(&req.name).map_err(bad_request)?;
    let addr = match &req.ip {
        Some(ip) => Some(
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| bad_request(format!("{ip:?} is not an IP address")))?,
        ),
        None => None,
    };
    let changed = ask(&state, |reply| Call::DnsRemove {
        name: name.clone(),
        addr,
        reply,
    })
    .await?;
    if changed == 0 {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "this host has no record {name}{}; a name can only be removed on the host that added it",
                addr.map(|a| format!(" -> {a}")).unwrap_or_default()
            ),
        ));
    }
    Ok(Json(name_response(&state, &name, changed)))
}

async fn dns_lookup(
    State(state): State<ApiState>,
    Json(req): Json<DnsLookupRequest>,
) -> Result<Json<DnsNameResponse>, ApiError> {
    let name = state.dns.qualify(&req.name).map_err(bad_request)?;
    Ok(Json(name_response(&state, &name, 0)))
}

/// The name's addresses in the zone as the name server sees it. The zone is published by the
/// control loop after it handled the call, so an add or remove is visible here already.
fn name_response(state: &ApiState, name: &str, changed: usize) -> DnsNameResponse {
    let addresses = state
        .dns
        .lookup(name)
        .map(|(_, a)| a.iter().map(|a| a.to_string()).collect())
        .unwrap_or_default();
    DnsNameResponse {
        name: name.to_string(),
        addresses,
        changed,
    }
}

/// Parses `ADDR/PREFIX`, naming what is wrong.
pub(crate) fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a CIDR: write ADDRESS/PREFIX, e.g. 10.32.0.5/12"))?;
    let addr: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} in {s:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 =
        prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| {
            format!("prefix {prefix:?} in {s:?} must be a number from 0 to {max}")
        })?;
    Ok((addr, prefix))
}

pub(crate) fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_clears_host_bits() {
        assert_eq!(network("10.32.1.254".parse().unwrap(), 12), "10.32.0.0/12");
        assert_eq!(
            network("10.32.1.254".parse().unwrap(), 32),
            "10.32.1.254/32"
        );
        assert_eq!(network("10.32.1.254".parse().unwrap(), 0), "0.0.0.0/0");
        assert_eq!(network("fd00::1:5".parse().unwrap(), 64), "fd00::/64");
    }

    #[test]
    fn cidrs_parse_and_errors_name_the_problem() {
        assert_eq!(parse_cidr("10.0.0.1/24").unwrap().1, 24);
        assert!(parse_cidr("fd00::1/64").is_ok());
        assert!(parse_cidr("10.0.0.1")
            .unwrap_err()
            .contains("ADDRESS/PREFIX"));
        assert!(parse_cidr("10.0.0.1/33").unwrap_err().contains("0 to 32"));
        assert!(parse_cidr("x/3").unwrap_err().contains("not an IP"));
    }
}

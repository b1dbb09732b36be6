//! `meshctl attach` and `meshctl detach`. A container is a named netns, a PID, a netns path, or a
//! Docker container name or id (found through the Docker Engine API).

use std::process::ExitCode;

use anyhow::Result;
use hyper::Method;

use super::Paths;
use crate::api::client::call;
use crate::api::types::{
    AttachRequest, AttachResponse, DetachRequest, ExposeRequest, ExposeResponse,
};
use crate::kernel::netns;

pub(super) async fn attach(
    paths: &Paths,
    target: &str,
    ips: Vec<String>,
    ifname: String,
    wait: u64,
    name: Option<String>,
) -> Result<ExitCode> {
    for ip in &ips {
        if !ip.starts_with("net:") {
            crate::api::server::parse_cidr(ip).map_err(|e| anyhow::anyhow!(e))?;
        }
    }
    let (netns, label, container, default_name) = resolve(target).await?;
    let req = AttachRequest {
        netns: netns.display().to_string(),
        ifname,
        ips,
        container,
        wait_secs: Some(wait),
        name: name.or(default_name),
        key: None,
        // `meshctl ps` shows the name alone: "container NAME (ID)" -> NAME.
        label: Some(
            label
                .strip_prefix("container ")
                .and_then(|l| l.split(" (").next())
                .unwrap_or(&label)
                .to_string(),
        ),
    };
    let r: AttachResponse = call(&paths.socket, Method::POST, "/attach", Some(&req)).await?;
    outln!(
        "attached {label}: {} {} {} (host side {})",
        r.ifname,
        r.mac,
        r.ips.join(" "),
        r.host_ifname
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn detach(
    paths: &Paths,
    target: &str,
    ifname: String,
    name: Option<String>,
) -> Result<ExitCode> {
    let (netns, label, container, default_name) = resolve(target).await?;
    let req = DetachRequest {
        netns: netns.display().to_string(),
        ifname,
        container,
        name: name.or(default_name),
        key: None,
    };
    call::<_, ()>(&paths.socket, Method::POST, "/detach", Some(&req)).await?;
    outln!("detached {label}");
    Ok(ExitCode::SUCCESS)
}

/// A named netns, a PID or a path first; otherwise a Docker container name or id. Returns the netns
/// path, how to name the container to the user, its Docker id (the IPAM key), and its DNS name
/// (the netns or Docker name; none for a PID or a path).
async fn resolve(
    target: &str,
) -> Result<(std::path::PathBuf, String, Option<String>, Option<String>)> {
    let by_path = target.starts_with('/') || target.bytes().all(|b| b.is_ascii_digit());
    match netns::resolve(target) {
        Ok(path) => {
            let name = (!by_path).then(|| dns_name(target)).flatten();
            Ok((path, target.to_string(), None, name))
        }
        Err(e) if by_path => Err(e),
        Err(_) => {
            let c = crate::plugin::engine::find(target).await?;
            let short: String = c.id.chars().take(12).collect();
            let name = dns_name(&c.name);
            Ok((
                c.netns,
                format!("container {} ({short})", c.name),
                Some(c.id),
                name,
            ))
        }
    }
}

/// A DNS label from a container or netns name: lowercase, anything but letters, digits and '-'
/// becomes '-' (Docker allows '_' and '.'); None if nothing usable is left.
fn dns_name(name: &str) -> Option<String> {
    let label: String = name
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let label = label.trim_matches('-');
    (!label.is_empty()).then(|| label.to_string())
}

/// `meshctl expose CIDR` (`add`) and `meshctl hide [CIDR]`.
pub(super) async fn expose(paths: &Paths, cidr: Option<String>, add: bool) -> Result<ExitCode> {
    if let Some(c) = &cidr {
        crate::api::server::parse_cidr(c).map_err(|e| anyhow::anyhow!(e))?;
    }
    let path = if add { "/expose" } else { "/hide" };
    let r: ExposeResponse = call(
        &paths.socket,
        Method::POST,
        path,
        Some(&ExposeRequest { cidr }),
    )
    .await?;
    if r.addresses.is_empty() {
        outln!("this host has no address on the mesh");
    } else {
        outln!(
            "this host's address on the mesh: {}",
            r.addresses.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

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
) -> Result<ExitCode> {
    for ip in &ips {
        if !ip.starts_with("net:") {
            crate::api::server::parse_cidr(ip).map_err(|e| anyhow::anyhow!(e))?;
        }
    }
    let (netns, label, container) = resolve(target).await?;
    let req = AttachRequest {
        netns: netns.display().to_string(),
        ifname,
        ips,
        container,
        wait_secs: Some(wait),
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
    println!(
        "attached {label}: {} {} {} (host side {})",
        r.ifname,
        r.mac,
        r.ips.join(" "),
        r.host_ifname
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn detach(paths: &Paths, target: &str, ifname: String) -> Result<ExitCode> {
    let (netns, label, container) = resolve(target).await?;
    let req = DetachRequest {
        netns: netns.display().to_string(),
        ifname,
        container,
    };
    call::<_, ()>(&paths.socket, Method::POST, "/detach", Some(&req)).await?;
    println!("detached {label}");
    Ok(ExitCode::SUCCESS)
}

/// A named netns, a PID or a path first; otherwise a Docker container name or id. Returns the netns
/// path, how to name the container to the user, and its Docker id (the IPAM key).
async fn resolve(target: &str) -> Result<(std::path::PathBuf, String, Option<String>)> {
    match netns::resolve(target) {
        Ok(path) => Ok((path, target.to_string(), None)),
        Err(e) if target.starts_with('/') || target.bytes().all(|b| b.is_ascii_digit()) => Err(e),
        Err(_) => {
            let c = crate::plugin::engine::find(target).await?;
            let short: String = c.id.chars().take(12).collect();
            Ok((
                c.netns,
                format!("container {} ({short})", c.name),
                Some(c.id),
            ))
        }
    }
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
        println!("this host has no address on the mesh");
    } else {
        println!(
            "this host's address on the mesh: {}",
            r.addresses.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

//! `meshctl dns-add`, `dns-remove` and `dns-lookup`: container names in the mesh's DNS, through the
//! router's local API.

use std::process::ExitCode;

use anyhow::Result;
use hyper::Method;

use super::Paths;
use crate::api::client::call;
use crate::api::types::{DnsAddRequest, DnsLookupRequest, DnsNameResponse, DnsRemoveRequest};

pub(super) async fn add(paths: &Paths, name: String, ips: Vec<String>) -> Result<ExitCode> {
    let r: DnsNameResponse = call(
        &paths.socket,
        Method::POST,
        "/dns/add",
        Some(&DnsAddRequest { name, ips }),
    )
    .await?;
    outln!("{} -> {}", r.name, r.addresses.join(" "));
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn remove(paths: &Paths, name: String, ip: Option<String>) -> Result<ExitCode> {
    let r: DnsNameResponse = call(
        &paths.socket,
        Method::POST,
        "/dns/remove",
        Some(&DnsRemoveRequest { name, ip }),
    )
    .await?;
    if r.addresses.is_empty() {
        outln!(
            "removed {} ({} records); it has no address now",
            r.name,
            r.changed
        );
    } else {
        outln!(
            "removed {} records; {} -> {} (registered by other hosts)",
            r.changed,
            r.name,
            r.addresses.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints one address per line; fails (exit 1) when the name has none, like `host`.
pub(super) async fn lookup(paths: &Paths, name: String) -> Result<ExitCode> {
    let r: DnsNameResponse = call(
        &paths.socket,
        Method::POST,
        "/dns/lookup",
        Some(&DnsLookupRequest { name }),
    )
    .await?;
    if r.addresses.is_empty() {
        eprintln!("meshctl: {} not found", r.name);
        return Ok(ExitCode::FAILURE);
    }
    for a in &r.addresses {
        outln!("{a}");
    }
    Ok(ExitCode::SUCCESS)
}

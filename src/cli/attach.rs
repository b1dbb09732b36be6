//! `meshctl attach` and `meshctl detach`.

use std::process::ExitCode;

use anyhow::Result;
use hyper::Method;

use super::Paths;
use crate::api::client::call;
use crate::api::types::{AttachRequest, AttachResponse, DetachRequest};
use crate::kernel::netns;

pub(super) async fn attach(
    paths: &Paths,
    target: &str,
    ips: Vec<String>,
    ifname: String,
) -> Result<ExitCode> {
    for ip in &ips {
        crate::api::server::parse_cidr(ip).map_err(|e| anyhow::anyhow!(e))?;
    }
    let netns = netns::resolve(target)?;
    let req = AttachRequest {
        netns: netns.display().to_string(),
        ifname,
        ips,
    };
    let r: AttachResponse = call(&paths.socket, Method::POST, "/attach", Some(&req)).await?;
    println!(
        "attached {target}: {} {} {} (host side {})",
        r.ifname,
        r.mac,
        r.ips.join(" "),
        r.host_ifname
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn detach(paths: &Paths, target: &str, ifname: String) -> Result<ExitCode> {
    let netns = netns::resolve(target)?;
    let req = DetachRequest {
        netns: netns.display().to_string(),
        ifname,
    };
    call::<_, ()>(&paths.socket, Method::POST, "/detach", Some(&req)).await?;
    println!("detached {target}");
    Ok(ExitCode::SUCCESS)
}

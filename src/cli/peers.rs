//! `meshctl connect`, `forget`, `stop`, `reset` and `rmpeer`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use hyper::Method;

use super::Paths;
use crate::api::client::call;
use crate::api::types::PeersRequest;

/// How long `stop` and `reset` wait for the router to go away.
const GONE_WAIT: Duration = Duration::from_secs(10);

pub(super) async fn connect(paths: &Paths, peers: Vec<String>) -> Result<ExitCode> {
    change_targets(paths, "/connect", "connecting to", peers).await
}

pub(super) async fn forget(paths: &Paths, peers: Vec<String>) -> Result<ExitCode> {
    change_targets(paths, "/forget", "forgot", peers).await
}

/// Posts `peers` to `path` and prints what the router says it changed after `verb`.
async fn change_targets(
    paths: &Paths,
    path: &str,
    verb: &str,
    peers: Vec<String>,
) -> Result<ExitCode> {
    let changed: Vec<String> = call(
        &paths.socket,
        Method::POST,
        path,
        Some(&PeersRequest { peers }),
    )
    .await?;
    outln!("{verb} {}", changed.join(", "));
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn stop(paths: &Paths) -> Result<ExitCode> {
    let pid = router_pid(paths);
    call::<(), ()>(&paths.socket, Method::POST, "/stop", None).await?;
    // Wait until the router has exited, so that a following `launch` finds the port free and
    // the old router's cleanup can't touch the new one's devices.
    wait_until_gone(paths, pid).await;
    outln!("router stopped");
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn reset(paths: &Paths) -> Result<ExitCode> {
    let pid = router_pid(paths);
    let said: String = call::<(), _>(&paths.socket, Method::POST, "/reset", None).await?;
    wait_until_gone(paths, pid).await;
    outln!("{said}");
    Ok(ExitCode::SUCCESS)
}

/// The router's PID from `STATE_DIR/meshctl.pid`, if there is one.
fn router_pid(paths: &Paths) -> Option<u32> {
    std::fs::read_to_string(paths.state_dir.join("meshctl.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a process that has not exited (a zombie waiting for its parent has).
fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

/// Waits (at most [`GONE_WAIT`]) until the router's socket no longer accepts connections and
/// its process (`pid`, when known) has exited.
async fn wait_until_gone(paths: &Paths, pid: Option<u32>) {
    let deadline = tokio::time::Instant::now() + GONE_WAIT;
    while tokio::time::Instant::now() < deadline {
        let answers = tokio::net::UnixStream::connect(&paths.socket).await.is_ok();
        let running = pid.is_some_and(process_running);
        if !answers && !running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn rmpeer(paths: &Paths, peer: String) -> Result<ExitCode> {
    let said: String = call(
        &paths.socket,
        Method::POST,
        "/rmpeer",
        Some(&crate::api::types::RmPeerRequest { peer }),
    )
    .await?;
    outln!("{said}");
    Ok(ExitCode::SUCCESS)
}

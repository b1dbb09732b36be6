//! `meshctl connect`, `forget` and `stop`.

use std::process::ExitCode;

use anyhow::Result;
use hyper::Method;

use super::Paths;
use crate::api::client::call;
use crate::api::types::PeersRequest;

pub(super) async fn connect(paths: &Paths, peers: Vec<String>) -> Result<ExitCode> {
    let added: Vec<String> = call(
        &paths.socket,
        Method::POST,
        "/connect",
        Some(&PeersRequest { peers }),
    )
    .await?;
    println!("connecting to {}", added.join(", "));
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn forget(paths: &Paths, peers: Vec<String>) -> Result<ExitCode> {
    let gone: Vec<String> = call(
        &paths.socket,
        Method::POST,
        "/forget",
        Some(&PeersRequest { peers }),
    )
    .await?;
    println!("forgot {}", gone.join(", "));
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn stop(paths: &Paths) -> Result<ExitCode> {
    call::<(), ()>(&paths.socket, Method::POST, "/stop", None).await?;
    // Wait until the socket stops answering, so that a following `launch` finds the port free.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if tokio::net::UnixStream::connect(&paths.socket)
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    println!("router stopped");
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn reset(paths: &Paths) -> Result<ExitCode> {
    let said: String = call::<(), _>(&paths.socket, Method::POST, "/reset", None).await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if tokio::net::UnixStream::connect(&paths.socket)
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    println!("{said}");
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn rmpeer(paths: &Paths, peer: String) -> Result<ExitCode> {
    let said: String = call(
        &paths.socket,
        Method::POST,
        "/rmpeer",
        Some(&crate::api::types::RmPeerRequest { peer }),
    )
    .await?;
    println!("{said}");
    Ok(ExitCode::SUCCESS)
}

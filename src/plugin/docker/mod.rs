//! Docker's remote network driver and IPAM driver, served by the router on a Unix socket that the
//! engine finds by legacy plugin discovery (`/run/docker/plugins/NAME.sock`; the file name is the
//! driver name, `meshnet` by default):
//!
//! ```sh
//! docker network create -d meshnet --ipam-driver meshnet [--subnet 10.2.1.0/24] NAME
//! docker run --network NAME ...
//! ```
//!
//! Heads up: read moby's `libnetwork/docs/remote.md` (network driver) and `libnetwork/docs/ipam.md`
//! (IPAM driver) before changing this. Every request is an HTTP POST to `/Method.Name` with a JSON
//! body; every answer is JSON with content type `application/vnd.docker.plugins.v1.2+json`, and a
//! failure is `{"Err": "..."}` with a non-200 status.
//!
//! Layout: `proto.rs` (wire types), `handlers.rs` (what each request does), `state.rs` (what
//! survives a restart); this file serves them and owns the socket file.

mod handlers;
mod proto;
mod state;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

pub(crate) use handlers::{Plugin, Settings};

/// The default socket: the driver is called `meshnet`.
pub(crate) const SOCKET_DEFAULT: &str = "/run/docker/plugins/meshnet.sock";

/// The plugin socket file this router created; removed on stop only if it is still ours.
#[derive(Debug)]
pub(crate) struct Socket {
    path: PathBuf,
    inode: u64,
}

impl Socket {
    /// Binds `path`, creating its directory and replacing a stale socket that nothing answers on.
    /// Error if another process serves it.
    pub(crate) fn bind(path: &Path) -> Result<(Socket, tokio::net::UnixListener)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another process serves the Docker plugin socket {} (another router?)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("remove stale socket {}", path.display()))?;
        }
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("listen on {}", path.display()))?;
        let inode = std::fs::metadata(path)
            .with_context(|| format!("stat {}", path.display()))?
            .ino();
        Ok((
            Socket {
                path: path.to_owned(),
                inode,
            },
            listener,
        ))
    }

    /// The driver name Docker knows us by: the socket's file name without `.sock`.
    pub(crate) fn driver_name(&self) -> String {
        driver_name(&self.path)
    }

    /// Removes the socket file if it is still the one we bound.
    pub(crate) fn remove(&self) -> Result<(), String> {
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.ino() == self.inode => std::fs::remove_file(&self.path)
                .map_err(|e| format!("remove {}: {e}", self.path.display())),
            _ => Ok(()),
        }
    }
}

/// The driver name of a socket path.
pub(crate) fn driver_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Serves plugin requests until the listener fails or the task is dropped.
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    plugin: Arc<Plugin>,
) -> std::io::Result<()> {
    let app = axum::Router::new().fallback(handle).with_state(plugin);
    axum::serve(listener, app).await
}

async fn handle(State(plugin): State<Arc<Plugin>>, uri: Uri, body: Bytes) -> Response {
    let method = uri.path().trim_start_matches('/');
    let (status, value) = match plugin.handle(method, &body).await {
        Ok(value) => (StatusCode::OK, value),
        Err(handlers::Failure(status, err)) => {
            tracing::warn!("docker plugin: {method}: {err}");
            (
                status,
                serde_json::to_value(proto::ErrorAnswer { err }).unwrap_or_default(),
            )
        }
    };
    tracing::debug!("docker plugin: {method} -> {status}");
    (
        status,
        [(header::CONTENT_TYPE, proto::CONTENT_TYPE)],
        value.to_string(),
    )
        .into_response()
}

/// Whether this process shares the network namespace of PID 1 (where the engine runs and looks
/// for the interfaces a driver makes); a router in another namespace can't serve the engine.
pub(crate) fn in_host_netns() -> bool {
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    matches!((ino("/proc/self/ns/net"), ino("/proc/1/ns/net")), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_name_is_the_socket_file_stem() {
        assert_eq!(driver_name(Path::new(SOCKET_DEFAULT)), "meshnet");
        assert_eq!(
            driver_name(Path::new("/run/docker/plugins/dk1.sock")),
            "dk1"
        );
    }
}

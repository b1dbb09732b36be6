//! The CLI side of the local API: one HTTP/1.1 request per call over the Unix socket.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::types::ErrorBody;

/// Sends `body` (JSON) to `path` and decodes the JSON answer; an error answer becomes an error with its text.
pub(crate) async fn call<B: Serialize, R: DeserializeOwned>(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&B>,
) -> Result<R> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| not_running(socket, e))?;
    let (status, body) = request(stream, method, path, body)
        .await
        .with_context(|| format!("request {path} from the router at {}", socket.display()))?;
    if !status.is_success() {
        let text = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        return Err(anyhow!("{text}"));
    }
    serde_json::from_slice(&body).with_context(|| format!("decode the router's answer to {path}"))
}

/// One HTTP/1.1 request with an optional JSON body on a connected Unix stream; returns the status
/// and the whole answer body. Shared by the router client and the Docker Engine client.
pub(crate) async fn request<B: Serialize>(
    stream: tokio::net::UnixStream,
    method: Method,
    path: &str,
    body: Option<&B>,
) -> Result<(StatusCode, Bytes)> {
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
    tokio::spawn(conn);
    let bytes = match body {
        Some(b) => serde_json::to_vec(b).context("encode request")?,
        None => Vec::new(),
    };
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .context("build request")?;
    let response = sender.send_request(request).await.context("send request")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("read the answer")?
        .to_bytes();
    Ok((status, body))
}

fn not_running(socket: &Path, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow!(
            "no router is running here (nothing answers at {}); start one with `meshctl launch`, \
             or point at it with --state-dir or --socket",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow!(
            "permission denied on the router's socket {}; run meshctl as root",
            socket.display()
        ),
        _ => anyhow::Error::new(e).context(format!("connect to {}", socket.display())),
    }
}

/// True if a router answers a status request on `socket` within 2 s. A socket file whose process is
/// gone, or is still dying after `kill -9`, may accept a connection but never answers.
pub(crate) fn router_answers(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(std::time::Duration::from_secs(2)));
    if s.write_all(b"GET /status HTTP/1.1\r\nhost: meshctl\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

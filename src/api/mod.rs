//! The router's local API: HTTP/1.1 with JSON bodies on a Unix socket, used by `meshctl` itself.
//!
//! `types` holds the request and response documents (their field names are a stable interface: scripts
//! read `meshctl status --json`), `server` serves them from the daemon, `client` is what the CLI uses.
//!
//! Endpoints: `GET /status`, `POST /connect`, `POST /forget`, `POST /stop`, `POST /attach`, `POST /detach`.
//! Errors come back as a non-2xx status with `{"error": "..."}`.

pub(crate) mod client;
pub(crate) mod server;
pub(crate) mod types;

//! `meshctl report`: the router's whole state as one JSON document with a versioned schema.
//!
//! The document is the status document (`GET /status`) with `schema_version` and the time it was
//! taken added at the top level. Field names are stable: a change that removes or renames one bumps
//! [`SCHEMA_VERSION`]; adding fields does not. Every field is listed in `docs/report.md`.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Result;
use hyper::Method;
use serde::{Deserialize, Serialize};

use super::Paths;
use crate::api::client::call;
use crate::api::types::Status;

/// Version of the report's schema (docs/report.md).
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// What `meshctl report` prints.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Report {
    pub(crate) schema_version: u32,
    /// When the report was taken, in seconds since the Unix epoch.
    pub(crate) generated_unix_secs: u64,
    #[serde(flatten)]
    pub(crate) status: Status,
}

pub(super) async fn run(paths: &Paths) -> Result<ExitCode> {
    let status: Status = call::<(), _>(&paths.socket, Method::GET, "/status", None).await?;
    let report = Report {
        schema_version: SCHEMA_VERSION,
        generated_unix_secs: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        status,
    };
    outln!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

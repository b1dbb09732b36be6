//! `meshctl launch` without `--foreground`: start the router as a background process and wait until its
//! API answers, or report why it stopped.
//!
//! The background router is this same binary re-run with `--foreground`, its output appended to
//! `STATE_DIR/meshctl.log`, in its own process group so that the shell's Ctrl-C doesn't reach it.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{LaunchArgs, Paths};
use crate::api::client::router_answers;

/// How long to wait for the router to answer before giving up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn run_background(args: &LaunchArgs, paths: &Paths) -> Result<ExitCode> {
    crate::daemon::check_launch_preconditions(args)?;
    if router_answers(&paths.socket) {
        bail!(
            "a router is already running with API socket {}; stop it with `meshctl stop` first",
            paths.socket.display()
        );
    }
    std::fs::create_dir_all(&paths.state_dir)
        .with_context(|| format!("create state directory {}", paths.state_dir.display()))?;
    let log_path = paths.state_dir.join("meshctl.log");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open log {}", log_path.display()))?;
    let log_start = log.seek(SeekFrom::End(0)).context("seek log")?;

    let exe = std::env::current_exe().context("find the meshctl binary")?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--foreground")
        .env("MESHCTL_STATE_DIR", &paths.state_dir)
        .env("MESHCTL_SOCKET", &paths.socket)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log for stdout")?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("start the router process")?;

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(exit) = child.try_wait().context("check the router process")? {
            let tail = read_from(&log_path, log_start);
            bail!(
                "the router exited during start-up ({exit}):\n{}",
                tail.trim_end()
            );
        }
        if router_answers(&paths.socket) {
            outln!(
                "router started (pid {}); log: {}; see `meshctl status`",
                child.id(),
                log_path.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            bail!(
                "the router (pid {}) did not become ready within {}s; see {}",
                child.id(),
                READY_TIMEOUT.as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_from(path: &std::path::Path, offset: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_string(&mut s);
        }
    }
    s
}

//! The Docker engine side of the tests that use it: the `docker` command and the tiny test image.
//!
//! Not here: what each test starts and checks, and cleaning up its containers (each test's own
//! `Drop` guard removes what it started).
#![allow(dead_code)]

use std::path::Path;

use super::lab;

/// A container image built from scratch around Debian's busybox-static: no registry needed.
pub(crate) const TEST_IMAGE: &str = "meshctl-test-busybox:latest";

/// Runs `docker ARGS`; (success, stdout and stderr).
pub(crate) fn docker(args: &[&str]) -> (bool, String) {
    lab::run_cmd("docker", args)
}

/// Builds [`TEST_IMAGE`] in `dir` (busybox is its entry point; it sleeps unless told otherwise).
pub(crate) fn build_test_image(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::copy("/bin/busybox", dir.join("busybox"))
        .map_err(|e| format!("copy /bin/busybox (install busybox-static): {e}"))?;
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\nCMD [\"sleep\", \"3600\"]\n",
    )
    .map_err(|e| e.to_string())?;
    let (ok, out) = docker(&["build", "-q", "-t", TEST_IMAGE, &dir.display().to_string()]);
    if ok {
        Ok(())
    } else {
        Err(out)
    }
}

/// Runs `iptables -w 5 OP FORWARD ...` for the rule a router on the root namespace's `bridge`
/// inserts (`-C` checks it, `-D` deletes it); true if iptables succeeded.
pub(crate) fn bridge_rule(bridge: &str, op: &str) -> bool {
    let comment = format!("meshctl bridge {bridge}");
    let args = [
        "-w",
        "5",
        op,
        "FORWARD",
        "-i",
        bridge,
        "-o",
        bridge,
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        "ACCEPT",
    ];
    lab::run_cmd("iptables", &args).0
}

/// Removes what a root-namespace router on `bridge` leaves when it is killed hard: its TAP and
/// VXLAN ports, the bridge, and its FORWARD rule (every copy).
pub(crate) fn remove_router_leftovers(bridge: &str) {
    for link in [
        format!("{bridge}-vx"),
        format!("{bridge}-tap"),
        bridge.to_string(),
    ] {
        let _ = lab::run_cmd("ip", &["link", "del", &link]);
    }
    while bridge_rule(bridge, "-C") && bridge_rule(bridge, "-D") {}
    // The VXLAN counters' table (src/kernel/nft.rs names it after the bridge).
    let table = format!(
        "meshctl_{}",
        bridge.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    let _ = lab::run_cmd("nft", &["delete", "table", "ip", &table]);
}

/// Runs the host's `meshctl --state-dir STATE_DIR ARGS` against a router in the root namespace
/// (on the host or in a container with that state dir as its volume); (success, stdout+stderr).
pub(crate) fn root_meshctl(state_dir: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(lab::meshctl_bin())
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .env_remove("MESHCTL_SOCKET")
        .env_remove("MESHCTL_PASSWORD")
        .output()
        .expect("run meshctl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

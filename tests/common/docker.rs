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

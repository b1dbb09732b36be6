//! `meshctl launch` refuses to start with a reason the user can act on, and a CLI without a router
//! says so.
//!
//! ```text
//!   [ h ]   one host namespace, no links: each test breaks one precondition of launch
//! ```

mod common;

use common::lab::{self, in_netns, Lab};
use std::process::Command;

#[test]
fn launch_fails_when_the_control_port_is_taken() {
    if lab::skip_unless_root("launch_fails_when_the_control_port_is_taken") {
        return;
    }
    let lab = Lab::new();
    let h = lab.host("h");
    // Hold UDP 6783 in the host's namespace for the duration of the launch.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn({
        let ns = h.netns.clone();
        move || {
            in_netns(&ns, move || {
                let _socket = std::net::UdpSocket::bind("0.0.0.0:6783").expect("bind 6783");
                ready_tx.send(()).unwrap();
                let _ = rx.recv();
            })
        }
    });
    ready_rx.recv().unwrap();
    let (status, _out, err) = h.meshctl(&["launch"]);
    let _ = tx.send(());
    holder.join().unwrap();
    assert!(!status.success(), "launch succeeded with its port taken");
    assert!(
        err.contains("6783") && err.contains("in use") && err.contains("--port"),
        "error does not name the port and the fix: {err}"
    );
}

#[test]
fn launch_fails_when_the_bridge_name_is_taken_by_another_link() {
    if lab::skip_unless_root("launch_fails_when_the_bridge_name_is_taken_by_another_link") {
        return;
    }
    let lab = Lab::new();
    let h = lab.host("h");
    let out = Command::new("ip")
        .args([
            "-n", &h.netns, "link", "add", "mesh", "type", "veth", "peer", "name", "meshpeer",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip link add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _out, err) = h.meshctl(&["launch"]);
    assert!(
        !status.success(),
        "launch succeeded with a veth called mesh"
    );
    assert!(
        err.contains("mesh") && err.contains("not a bridge") && err.contains("--bridge"),
        "error does not name the link and the fix: {err}"
    );
}

#[test]
fn launch_needs_root_and_says_so() {
    if lab::skip_unless_root("launch_needs_root_and_says_so") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("meshctl-noroot-{}", std::process::id()));
    // Run as nobody through setpriv (util-linux); skip if it is missing.
    let out = match Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lab::meshctl_bin())
        .arg("--state-dir")
        .arg(&dir)
        .arg("launch")
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipping launch_needs_root_and_says_so: no setpriv ({e})");
            return;
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "launch as nobody succeeded");
    assert!(
        err.contains("needs root") && err.contains("sudo"),
        "unclear error: {err}"
    );
}

#[test]
fn commands_without_a_router_say_none_is_running() {
    if lab::skip_unless_root("commands_without_a_router_say_none_is_running") {
        return;
    }
    let lab = Lab::new();
    let h = lab.host("h");
    let (status, _out, err) = h.meshctl(&["status"]);
    assert!(!status.success());
    assert!(
        err.contains("no router is running") && err.contains("meshctl launch"),
        "unclear error: {err}"
    );
}

#[test]
fn bad_arguments_are_refused_with_the_reason() {
    let (status, _out, err) = {
        let out = Command::new(lab::meshctl_bin())
            .args([
                "--state-dir",
                "/nonexistent-meshctl",
                "attach",
                "x",
                "--ip",
                "10.0.0.1",
            ])
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(!status.success());
    assert!(err.contains("ADDRESS/PREFIX"), "unclear error: {err}");
    let out = Command::new(lab::meshctl_bin())
        .args(["launch", "--mtu", "10"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mtu"));
}

//! A real Docker container, attached by name, reaches a container on a namespace host, through a
//! router in the root namespace where Docker's firewall drops forwarded traffic by default.
//!
//! ```text
//!   root namespace (Docker's FORWARD policy DROP, br_netfilter on)       lab netns "b"
//!   docker container --(meshctl attach NAME)-- bridge mrNNNN -- router ==veth 10.253.X.1/.2 (lab.link_to_root)== router [ b ] -- cB
//!        10.47.0.1                                              port 2xxxx                 6783         10.47.0.2
//! ```
//! The root-namespace router gets its own veth subnet and port, never the default route; everything it
//! adds (bridge, firewall rule, container; the veth goes with b's namespace) is removed at the end, also on failure.

mod common;

use common::docker::{
    bridge_rule, build_test_image, docker, remove_router_leftovers, root_meshctl, TEST_IMAGE,
};
use common::lab::{self, Lab, WAIT_MAX};
use std::path::{Path, PathBuf};

/// Everything this test adds to the root namespace; dropped last.
struct RootSide {
    bridge: String,
    container: String,
    state_dir: PathBuf,
}

impl RootSide {
    fn meshctl(&self, args: &[&str]) -> (bool, String) {
        root_meshctl(&self.state_dir, args)
    }

    fn rule_present(&self) -> bool {
        bridge_rule(&self.bridge, "-C")
    }
}

impl Drop for RootSide {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.container]);
        let pid = std::fs::read_to_string(self.state_dir.join("meshctl.pid")).ok();
        let _ = self.meshctl(&["stop"]);
        // Give it time to remove its ports and firewall rule before the hard kill below.
        if let Some(pid) = pid.as_deref().map(str::trim) {
            lab::wait_for(std::time::Duration::from_secs(10), || {
                !Path::new(&format!("/proc/{pid}")).exists()
            });
        }
        if let Ok(pid) = std::fs::read_to_string(self.state_dir.join("meshctl.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // The router removes its TAP and VXLAN ports and its rule on stop; not after a hard kill.
        remove_router_leftovers(&self.bridge);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

#[test]
fn docker_container_attached_by_name_reaches_a_namespace_host() {
    if lab::skip_unless_root("docker_container_attached_by_name_reaches_a_namespace_host") {
        return;
    }
    if !docker(&["info"]).0 {
        eprintln!("skipping docker test: the Docker engine does not answer (`docker info` failed)");
        return;
    }
    let lab = Lab::new();
    build_test_image(&lab.dir().join("image")).expect("build the busybox test image");

    let tag = std::process::id() % 10_000;
    let port = 20_000 + (std::process::id() % 20_000) as u16 * 2;
    let root = RootSide {
        bridge: format!("mr{tag}"),
        container: format!("meshctl-test-{tag}"),
        state_dir: lab.dir().join("root-state"),
    };

    let b = lab.host("b");
    let cb = lab.container(&b);
    let (root_ip, _) = lab.link_to_root(&b);

    let (ok, out) = root.meshctl(&[
        "launch",
        "--password",
        "pw",
        "--nickname",
        "root",
        "--bridge",
        &root.bridge,
        "--port",
        &port.to_string(),
        "--no-metrics",
        "--no-docker-plugin",
    ]);
    assert!(ok, "root launch failed: {out}");
    b.launch(&["--password", "pw", &format!("{root_ip}:{port}")]);

    let (ok, out) = docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        &root.container,
        TEST_IMAGE,
    ]);
    assert!(ok, "docker run: {out}");
    let (ok, out) = root.meshctl(&["attach", &root.container, "--ip", "10.47.0.1/24"]);
    assert!(ok, "attach by container name failed: {out}");
    assert!(
        out.contains(&root.container),
        "attach output doesn't name the container: {out}"
    );
    b.attach(&cb, "10.47.0.2/24");

    let bridged_filtered = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|v| v.trim() == "1");
    if bridged_filtered {
        assert!(
            root.rule_present(),
            "no FORWARD accept rule for {} while br_netfilter is on",
            root.bridge
        );
    }
    let reached = lab::wait_for(WAIT_MAX, || {
        docker(&[
            "exec",
            &root.container,
            "/bin/busybox",
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "10.47.0.2",
        ])
        .0
    });
    assert!(
        reached,
        "docker container could not ping cB:\n{}",
        lab.report()
    );
    assert!(
        lab::ping(&cb.netns, "10.47.0.1".parse().unwrap()),
        "cB could not ping the docker container"
    );

    let (ok, out) = root.meshctl(&["stop"]);
    assert!(ok, "stop: {out}");
    // `stop` answers before the router has cleaned up; the rule goes during its exit.
    assert!(
        lab::wait_for(WAIT_MAX, || !root.rule_present()),
        "the FORWARD rule outlived the router"
    );
}

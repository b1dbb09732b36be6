//! The router image (docker/build.sh) runs the router as a container exactly as on the host: the host's
//! `meshctl` talks to it through the socket in its state volume, it joins a mesh, and a restart of the
//! container keeps its identity (same peer name), restores the path, and keeps the address it gave a
//! Docker container attached through it (the IPAM state lives in the volume): the address stays
//! allocated to that container, and a container attached after the restart gets another one.
//!
//! ```text
//!   root namespace                                                       lab netns "b"
//!   docker container "router" (--net=host --pid=host, NET_ADMIN NET_RAW SYS_ADMIN) ==veth 10.253.X.1/.2 (lab.link_to_root)== [ b ]
//!     bridge miNNNN, port 2xxxx, state in a bind-mounted dir                               router
//! ```
//! Like tests/docker.rs, the root side uses its own veth subnet, bridge and port, and removes all of it.

mod common;

use common::docker::{
    bridge_rule, build_test_image, remove_router_leftovers, root_meshctl, TEST_IMAGE,
};
use common::lab::{self, Lab, WAIT_MAX};
use std::path::PathBuf;
use std::process::Command;

const IMAGE: &str = "meshctl:test";

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    lab::run_cmd(cmd, args)
}

struct RootSide {
    container: String,
    /// Docker containers attached to the mesh through the router.
    workloads: Vec<String>,
    bridge: String,
    state_dir: PathBuf,
}

impl RootSide {
    /// Runs the host's `meshctl` against the containerized router (through its state volume).
    fn meshctl(&self, args: &[&str]) -> (bool, String) {
        root_meshctl(&self.state_dir, args)
    }

    fn status(&self) -> serde_json::Value {
        let (_, out) = self.meshctl(&["status", "--json"]);
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
    }

    /// Starts a test container without a network and attaches it to the mesh through the router
    /// (address from the mesh IPAM); returns its mesh address.
    fn start_workload(&mut self, name: &str) -> String {
        let (ok, out) = run(
            "docker",
            &["run", "-d", "--name", name, "--network", "none", TEST_IMAGE],
        );
        assert!(ok, "docker run {name}: {out}");
        self.workloads.push(name.to_string());
        let (ok, out) = self.meshctl(&["attach", name]);
        assert!(ok, "meshctl attach {name}: {out}");
        // "attached container NAME (ID): eth0 MAC 10.32.0.1/12 (host side ...)"
        out.split_whitespace()
            .find(|w| w.starts_with("10.") && w.contains('/'))
            .unwrap_or_else(|| panic!("attach {name} printed no address: {out}"))
            .to_string()
    }

    /// Addresses the router holds for containers (not released).
    fn held(&self) -> Vec<String> {
        let status = self.status();
        status["ipam"]["allocations"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["releasing"] == false)
                    .filter_map(|x| x["address"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl RootSide {
    /// The router's FORWARD rule for its bridge (iptables on the host, nft backend).
    fn rule(&self, op: &str) -> bool {
        bridge_rule(&self.bridge, op)
    }
}

impl Drop for RootSide {
    fn drop(&mut self) {
        // A stop (SIGTERM) lets the router remove its rule; rm -f alone would kill it.
        for w in &self.workloads {
            let _ = run("docker", &["rm", "-f", w]);
        }
        let _ = run("docker", &["stop", "-t", "10", &self.container]);
        let _ = run("docker", &["rm", "-f", &self.container]);
        // The router removes its TAP and VXLAN ports and its rule on stop; not after a hard kill.
        remove_router_leftovers(&self.bridge);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

fn peers(status: &serde_json::Value) -> usize {
    status["peers"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p["reachable"] == true).count())
}

#[test]
fn router_image_runs_the_router_and_keeps_its_identity_across_restart() {
    if lab::skip_unless_root("router_image_runs_the_router_and_keeps_its_identity_across_restart") {
        return;
    }
    if !run("docker", &["info"]).0 {
        eprintln!("skipping router image test: the Docker engine does not answer");
        return;
    }
    let root_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (ok, out) = Command::new("bash")
        .arg(root_dir.join("docker/build.sh"))
        .arg(IMAGE)
        .env("MESHCTL_PROFILE", "dev")
        .output()
        .map(|o| {
            (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            )
        })
        .expect("run docker/build.sh");
    assert!(ok, "docker/build.sh failed:\n{out}");

    let lab = Lab::new();
    let tag = std::process::id() % 10_000;
    let port = 20_001 + (std::process::id() % 20_000) as u16 * 2;
    build_test_image(&lab.dir().join("image")).expect("build the busybox test image");
    let mut root = RootSide {
        container: format!("meshctl-router-test-{tag}"),
        workloads: Vec::new(),
        bridge: format!("mi{tag}"),
        state_dir: lab.dir().join("router-state"),
    };
    std::fs::create_dir_all(&root.state_dir).unwrap();

    let b = lab.host("b");
    let (root_ip, _) = lab.link_to_root(&b);

    let volume = format!("{}:/state", root.state_dir.display());
    let port_s = port.to_string();
    let (ok, out) = run(
        "docker",
        &[
            "run",
            "-d",
            "--name",
            &root.container,
            "--net=host",
            "--pid=host",
            // The capabilities the router needs; this engine refuses --privileged.
            "--cap-add",
            "NET_ADMIN",
            "--cap-add",
            "NET_RAW",
            "--cap-add",
            "SYS_ADMIN",
            "--device",
            "/dev/net/tun",
            "-v",
            &volume,
            "-e",
            "MESHCTL_PASSWORD=pw",
            IMAGE,
            "--state-dir",
            "/state",
            "launch",
            "--foreground",
            "--nickname",
            "boxed",
            "--bridge",
            &root.bridge,
            "--port",
            &port_s,
            "--no-metrics",
        ],
    );
    assert!(ok, "docker run of the router image failed: {out}");
    b.launch(&["--password", "pw", &format!("{root_ip}:{port}")]);

    let mut status = serde_json::Value::Null;
    let joined = lab::wait_for(WAIT_MAX, || {
        status = root.status();
        peers(&status) == 1
    });
    let router_container = root.container.clone();
    let logs = || run("docker", &["logs", "--tail", "30", &router_container]).1;
    assert!(
        joined,
        "the containerized router never saw b:\n{status:#}\n{}",
        logs()
    );
    let name = status["name"].as_str().unwrap().to_string();
    assert_eq!(status["nickname"], "boxed");
    // The image carries iptables, so on this Docker host (br_netfilter, FORWARD DROP) the
    // containerized router adds its FORWARD rule just as on the host.
    let filtered = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|v| v.trim() == "1");
    if filtered {
        assert!(
            root.rule("-C"),
            "the router in the image added no FORWARD rule:\n{}",
            logs()
        );
    }

    let first = root.start_workload(&format!("meshctl-image-w1-{tag}"));
    let bare = |a: &str| a.split('/').next().unwrap_or(a).to_string();
    assert!(
        root.held().contains(&bare(&first)),
        "the router does not list {first} as held: {:#}",
        root.status()["ipam"]
    );

    let (ok, out) = run("docker", &["restart", "-t", "5", &root.container]);
    assert!(ok, "docker restart: {out}");
    let back = lab::wait_for(WAIT_MAX, || {
        status = root.status();
        peers(&status) == 1
    });
    assert!(
        back,
        "after restart the router never saw b again:\n{status:#}\n{}",
        logs()
    );
    assert_eq!(
        status["name"].as_str(),
        Some(name.as_str()),
        "the peer name changed across restart"
    );
    // The restarted router still holds the first container's address, and gives the next
    // container another one.
    assert!(
        root.held().contains(&bare(&first)),
        "after restart the router no longer holds {first}: {:#}",
        root.status()["ipam"]
    );
    let second = root.start_workload(&format!("meshctl-image-w2-{tag}"));
    assert_ne!(
        bare(&first),
        bare(&second),
        "the restarted router gave a held address again"
    );
    let (ok, out) = run("docker", &["stop", "-t", "10", &root.container]);
    assert!(ok, "docker stop: {out}");
    assert!(
        !root.rule("-C"),
        "the FORWARD rule outlived the router container"
    );
}

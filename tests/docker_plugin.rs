//! Docker containers join the mesh through the router's network and IPAM plugin and through
//! `meshctl attach`, reach a container on a namespace host by ping and TCP, keep their addresses
//! across a router restart, and give them back when they go.
//!
//! ```text
//!   root namespace (Docker engine; FORWARD policy DROP, br_netfilter on)              lab netns "b"
//!   docker run --network dkN-net  ─┐
//!   docker run --network none   ──(meshctl attach)─┐                                      cB
//!        bridge dkN ── router (plugin /run/docker/plugins/dkNd.sock) ==veth 10.253.X.1/.2== router
//!                        port 2xxxx                                                   (lab.link_to_root)
//!   all three on the isolated subnet 10.49.X.0/24 (docker network create --subnet; attach --ip net:)
//! ```
//! The root side uses its own veth subnet, bridge, port and plugin socket, never the default route,
//! and removes everything it made (containers, network, bridge, socket, netns links), also on failure.

mod common;

use common::docker::{build_test_image, docker, remove_router_leftovers, root_meshctl, TEST_IMAGE};
use common::lab::{self, Lab, WAIT_MAX};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Everything the test adds to the root namespace; dropped before the lab.
struct RootSide {
    tag: String,
    bridge: String,
    socket: PathBuf,
    state_dir: PathBuf,
    launch_args: Vec<String>,
    containers: Vec<String>,
    network: String,
    netns_links: Vec<PathBuf>,
}

impl RootSide {
    fn meshctl(&self, args: &[&str]) -> (bool, String) {
        root_meshctl(&self.state_dir, args)
    }

    fn launch(&self) {
        let args: Vec<&str> = self.launch_args.iter().map(String::as_str).collect();
        let (ok, out) = self.meshctl(&args);
        assert!(ok, "root launch failed: {out}\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("meshctl.log")).unwrap_or_default()
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.state_dir.join("meshctl.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    /// `meshctl stop`, then waits until the process is gone (its cleanup removes files).
    fn stop(&self) {
        let pid = self.pid();
        let (ok, out) = self.meshctl(&["stop"]);
        assert!(ok, "stop: {out}");
        if let Some(pid) = pid {
            let gone = lab::wait_for(WAIT_MAX, || !Path::new(&format!("/proc/{pid}")).exists());
            assert!(gone, "router {pid} did not exit after stop");
        }
    }

    fn json(&self, what: &str) -> serde_json::Value {
        let (ok, out) = self.meshctl(&[what, "--json"]);
        assert!(ok, "meshctl {what}: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what} --json: {e}: {out}"))
    }

    /// Whether the router's IPAM holds `addr` and not as released.
    fn holds(&self, addr: Ipv4Addr) -> bool {
        self.json("ipam")["allocations"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["address"] == addr.to_string() && a["releasing"] == false)
    }

    /// The root side's bridge ports, FDB, FORWARD counters and router status, for failures.
    fn diagnose(&self) -> String {
        let mut out = String::new();
        for (cmd, args) in [
            ("ip", vec!["-s", "link", "show", "master", &self.bridge]),
            ("bridge", vec!["fdb", "show", "br", &self.bridge]),
            ("iptables", vec!["-w", "5", "-L", "FORWARD", "-v", "-n"]),
        ] {
            out.push_str(&format!(
                "$ {cmd} {}\n{}\n",
                args.join(" "),
                lab::run_cmd(cmd, &args).1
            ));
        }
        out.push_str(&self.meshctl(&["status"]).1);
        out.push_str(&self.log());
        out
    }

    fn run_container(&mut self, suffix: &str, network: &str) -> String {
        let name = format!("{}-{suffix}", self.tag);
        self.containers.push(name.clone());
        let (ok, out) = docker(&[
            "run",
            "-d",
            "--network",
            network,
            "--name",
            &name,
            TEST_IMAGE,
        ]);
        assert!(ok, "docker run --network {network}: {out}\n{}", self.log());
        name
    }

    /// A `/var/run/netns` name for a Docker container's namespace, so lab helpers can enter it.
    fn netns_of(&mut self, container: &str) -> String {
        let (ok, pid) = docker(&["inspect", "-f", "{{.State.Pid}}", container]);
        assert!(ok, "inspect {container}: {pid}");
        let name = format!("{container}-ns");
        let link = PathBuf::from(format!("/var/run/netns/{name}"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/proc/{}/ns/net", pid.trim()), &link)
            .expect("link the container's netns");
        self.netns_links.push(link);
        name
    }
}

impl Drop for RootSide {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["network", "rm", &self.network]);
        let pid = std::fs::read_to_string(self.state_dir.join("meshctl.pid")).ok();
        let _ = self.meshctl(&["stop"]);
        // Give it time to remove its ports and firewall rule before the hard kill below.
        if let Some(pid) = pid.as_deref().map(str::trim) {
            lab::wait_for(std::time::Duration::from_secs(10), || {
                !Path::new(&format!("/proc/{pid}")).exists()
            });
        }
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for l in &self.netns_links {
            let _ = std::fs::remove_file(l);
        }
        // The router removes its TAP and VXLAN ports and its rule on stop; not after a hard kill.
        remove_router_leftovers(&self.bridge);
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// One raw HTTP POST to the plugin socket; returns (status line, body).
fn plugin_post(socket: &Path, method: &str, body: &str) -> (String, String) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect plugin socket");
    s.set_read_timeout(Some(WAIT_MAX)).unwrap();
    write!(
        s,
        "POST /{method} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

fn ipv4_of(container: &str) -> Ipv4Addr {
    let (ok, out) = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        container,
    ]);
    assert!(ok, "inspect {container}: {out}");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{container} has no IPv4 address: {out:?}"))
}

fn address_in(ns: &str) -> Ipv4Addr {
    let (ok, out) = lab::run_cmd("ip", &["-n", ns, "-4", "-o", "addr", "show", "eth0"]);
    assert!(ok, "{out}");
    let cidr = out.split_whitespace().skip_while(|w| *w != "inet").nth(1);
    cidr.and_then(|c| c.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no address in {ns}: {out}"))
}

fn docker_ping(container: &str, to: Ipv4Addr) -> bool {
    let to = to.to_string();
    docker(&[
        "exec",
        container,
        "/bin/busybox",
        "ping",
        "-c",
        "1",
        "-W",
        "1",
        &to,
    ])
    .0
}

fn ps_has(root: &RootSide, container: &str, via: &str, addr: Ipv4Addr) -> bool {
    root.json("ps").as_array().into_iter().flatten().any(|e| {
        e["container"] == container
            && e["via"] == via
            && e["ips"][0]
                .as_str()
                .is_some_and(|ip| ip.starts_with(&format!("{addr}/")))
            && e["mac"].as_str().is_some_and(|m| m.len() == 17)
    })
}

#[test]
fn docker_containers_join_through_the_plugin_and_attach_and_keep_addresses_across_restart() {
    if lab::skip_unless_root("docker_containers_join_through_the_plugin_and_attach") {
        return;
    }
    if !docker(&["info"]).0 {
        eprintln!("skipping docker plugin test: the Docker engine does not answer");
        return;
    }
    let lab = Lab::new();
    build_test_image(&lab.dir().join("image")).expect("build the busybox test image");

    let n = std::process::id() % 10_000;
    let port = 21_000 + (std::process::id() % 20_000) as u16 * 2;
    let third = (std::process::id() % 250) as u8;
    let subnet = format!("10.49.{third}.0/24");
    let tag = format!("dk{n}");
    let driver = format!("{tag}d");
    let socket = PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
    let state_dir = lab.dir().join("root-state");
    let mut root = RootSide {
        bridge: tag.clone(),
        socket: socket.clone(),
        launch_args: [
            "launch",
            "--nickname",
            "root",
            "--bridge",
            &tag,
            "--port",
            &port.to_string(),
            "--no-metrics",
            "--ipalloc-init",
            "consensus=2",
            "--docker-plugin",
            &socket.display().to_string(),
        ]
        .map(String::from)
        .to_vec(),
        network: format!("{tag}-net"),
        tag,
        state_dir,
        containers: Vec::new(),
        netns_links: Vec::new(),
    };

    let b = lab.host("b");
    let cb = lab.container(&b);
    let (root_ip, _) = lab.link_to_root(&b);
    root.launch();
    // b uses the root's port too: VXLAN FDB entries the kernel learns carry no port, so they
    // send to the local device's port; peers with different --port lose frames on the fast path.
    b.launch(&[
        "--port",
        &port.to_string(),
        "--ipalloc-init",
        "consensus=2",
        &format!("{root_ip}:{port}"),
    ]);

    // The plugin speaks Docker's protocol, and bad requests get {"Err": ...} naming the problem.
    let (status, body) = plugin_post(&socket, "Plugin.Activate", "");
    assert!(status.contains("200"), "{status} {body}");
    assert!(
        body.contains("NetworkDriver") && body.contains("IpamDriver"),
        "{body}"
    );
    let (status, body) = plugin_post(&socket, "NetworkDriver.Join", r#"{"EndpointID":"nope"}"#);
    assert!(!status.contains("200"), "{status}");
    assert!(
        body.contains(r#""Err":"#) && body.contains("no endpoint"),
        "{body}"
    );
    let (_, body) = plugin_post(
        &socket,
        "IpamDriver.RequestPool",
        r#"{"Pool":"10.49.0.7/24"}"#,
    );
    assert!(body.contains("host bits"), "{body}");
    let (_, body) = plugin_post(&socket, "IpamDriver.RequestPool", "{\"Pool\": 5");
    assert!(body.contains("malformed"), "{body}");

    let (ok, out) = docker(&[
        "network",
        "create",
        "-d",
        &driver,
        "--ipam-driver",
        &driver,
        "--subnet",
        &subnet,
        &root.network,
    ]);
    assert!(ok, "docker network create: {out}\n{}", root.log());
    let net = root.network.clone();
    let plugged = root.run_container("p", &net);
    let plugged_ip = ipv4_of(&plugged);
    assert_eq!(plugged_ip.octets()[..3], [10, 49, third], "{plugged_ip}");

    let (status, out, err) = b.meshctl(&["attach", &cb.netns, "--ip", &format!("net:{subnet}")]);
    assert!(status.success(), "attach cB: {out}{err}");
    let cb_ip = address_in(&cb.netns);

    // Plugin container <-> namespace host's container: ping both ways, then TCP.
    assert!(
        lab::wait_for(WAIT_MAX, || docker_ping(&plugged, cb_ip)),
        "plugin container {plugged_ip} could not ping cB {cb_ip}:\n{}\n{}",
        root.diagnose(),
        lab.report()
    );
    assert!(
        lab::ping(&cb.netns, plugged_ip),
        "cB could not ping the plugin container"
    );
    let plugged_ns = root.netns_of(&plugged);
    let t = lab::tcp_transfer(&plugged_ns, &cb.netns, cb_ip, 5001, 4 << 20).expect("tcp transfer");
    assert_eq!(
        t.sent_sha256, t.received_sha256,
        "TCP bytes changed on the way"
    );

    // A container started without the plugin, attached by name.
    let attached = root.run_container("a", "none");
    let (ok, out) = root.meshctl(&["attach", &attached, "--ip", &format!("net:{subnet}")]);
    assert!(ok, "attach by container name: {out}");
    let attached_ns = root.netns_of(&attached);
    let attached_ip = address_in(&attached_ns);
    assert!(
        lab::wait_for(WAIT_MAX, || docker_ping(&attached, cb_ip)),
        "attached container could not ping cB"
    );
    assert!(
        docker_ping(&attached, plugged_ip),
        "attached could not ping plugin container"
    );
    assert!(
        ps_has(&root, &plugged, "plugin", plugged_ip),
        "{:#}",
        root.json("ps")
    );
    assert!(
        ps_has(&root, &attached, "attach", attached_ip),
        "{:#}",
        root.json("ps")
    );

    // Restarting the router keeps every address, and the mesh carries traffic again.
    root.stop();
    assert!(!socket.exists(), "the plugin socket outlived the router");
    root.launch();
    assert_eq!(ipv4_of(&plugged), plugged_ip);
    assert_eq!(address_in(&attached_ns), attached_ip);
    assert!(
        root.holds(plugged_ip) && root.holds(attached_ip),
        "{:#}",
        root.json("ipam")
    );
    assert!(
        lab::wait_for(WAIT_MAX, || docker_ping(&plugged, cb_ip)),
        "after the restart the plugin container could not ping cB"
    );
    assert!(ps_has(&root, &attached, "attach", attached_ip));

    // A second plugin container gets a different address, and the first keeps its own.
    let second = root.run_container("q", &net);
    let second_ip = ipv4_of(&second);
    assert_ne!(second_ip, plugged_ip);
    assert_ne!(second_ip, attached_ip);
    assert!(lab::wait_for(WAIT_MAX, || docker_ping(&second, plugged_ip)));

    // The attached container exits: the router notices and releases its address.
    let (ok, out) = docker(&["rm", "-f", &attached]);
    assert!(ok, "{out}");
    assert!(
        lab::wait_for(WAIT_MAX, || !root.holds(attached_ip)),
        "the exited container's address is still held:\n{:#}",
        root.json("ipam")
    );
    assert!(!ps_has(&root, &attached, "attach", attached_ip));

    // Removing plugin containers releases their addresses; network rm cleans up.
    for c in [&plugged, &second] {
        let (ok, out) = docker(&["rm", "-f", c]);
        assert!(ok, "{out}");
    }
    assert!(
        !root.holds(plugged_ip) && !root.holds(second_ip),
        "{:#}",
        root.json("ipam")
    );
    let (ok, out) = docker(&["network", "rm", &net]);
    assert!(ok, "docker network rm: {out}");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.state_dir.join("docker-plugin.json")).expect("plugin state"),
    )
    .unwrap();
    assert_eq!(state["networks"], serde_json::json!({}), "{state:#}");
    assert_eq!(state["endpoints"], serde_json::json!({}), "{state:#}");
    assert_eq!(state["addresses"], serde_json::json!({}), "{state:#}");
    let (_, links) = lab::run_cmd("ip", &["-o", "link", "show", "master", &root.bridge]);
    assert!(
        !links.contains("mnh"),
        "a plugin veth is left on the bridge: {links}"
    );
    assert_eq!(root.json("ps"), serde_json::json!([]));
}

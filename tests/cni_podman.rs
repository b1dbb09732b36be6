//! A real container runtime runs `meshnet`: podman, with its CNI backend, starts a container on a
//! network whose only plugin is `meshnet`. The container gets its address from the mesh IPAM,
//! pings a container on a namespace host through the mesh, and gives the address back on
//! `podman rm`.
//!
//! ```text
//!   root namespace                                                         lab netns "b"
//!   podman run --network pmN-net ──(CNI ADD: meshnet -> /attach)─┐              cB
//!        bridge pmN ── router (API socket STATE/meshctl.sock) ==veth 10.253.X.1/.2== router
//!                        port 2xxxx                                        (lab.link_to_root)
//!   both containers on the isolated subnet 10.52.X.0/24 (conflist "subnet"; attach --ip net:)
//! ```
//! This podman shares nothing with the host's. Its storage (vfs), run state, locks, events, CNI
//! configuration and plugin directory (a link `meshnet` to the binary under test) all live in the
//! lab's directory, named through CONTAINERS_CONF and CONTAINERS_STORAGE_CONF. Its containers run
//! under a cgroup parent of their own, from a root file system holding only Debian's static
//! busybox (`run --rootfs`): no image is pulled or imported, which would also write podman's
//! host-wide blob cache under /var/lib/containers. The root side uses its own veth subnet, bridge
//! and port, never the default route, and removes everything it made, also on failure.

mod common;

use common::docker::{remove_router_leftovers, root_meshctl};
use common::lab::{self, Lab, WAIT_MAX};
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The router in the root namespace; stopped, and its leftovers removed, on drop.
struct RootRouter {
    bridge: String,
    state_dir: PathBuf,
}

impl RootRouter {
    fn meshctl(&self, args: &[&str]) -> (bool, String) {
        root_meshctl(&self.state_dir, args)
    }

    fn socket(&self) -> PathBuf {
        self.state_dir.join("meshctl.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("meshctl.log")).unwrap_or_default()
    }

    fn json(&self, what: &str) -> Value {
        let (ok, out) = self.meshctl(&[what, "--json"]);
        assert!(ok, "meshctl {what}: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what} --json: {e}: {out}"))
    }

    /// The `ipam --json` allocation of `addr` that is not being released.
    fn allocation(&self, addr: Ipv4Addr) -> Option<Value> {
        self.json("ipam")["allocations"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["address"] == addr.to_string() && a["releasing"] == false)
            .cloned()
    }

    /// The `ps --json` entry of a container that `meshnet` attached.
    fn ps_entry(&self, container_id: &str) -> Option<Value> {
        let label = format!("cni:{}", &container_id[..12]);
        self.json("ps")
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["container"] == label.as_str())
            .cloned()
    }
}

impl Drop for RootRouter {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.state_dir.join("meshctl.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        let _ = self.meshctl(&["stop"]);
        if let Some(pid) = pid {
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            let gone = lab::wait_for(Duration::from_secs(10), || !proc_dir.exists());
            let ours = std::fs::read(proc_dir.join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("meshctl"));
            if !gone && ours {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // The router removes its ports and rule on stop, but not the bridge, nor after a kill.
        remove_router_leftovers(&self.bridge);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// A podman whose every file is under `dir`; removes its containers, network, storage and cgroups
/// on drop.
struct Podman {
    dir: PathBuf,
    network: String,
    cgroup_parent: String,
    containers: Vec<String>,
}

impl Podman {
    /// Writes the configuration and a CNI network `{tag}-net` that is `meshnet` alone, talking to
    /// the router at `socket` and allocating from `subnet`.
    fn new(dir: &Path, tag: &str, socket: &Path, subnet: &str) -> Podman {
        let podman = Podman {
            dir: dir.to_path_buf(),
            network: format!("{tag}-net"),
            cgroup_parent: format!("/meshctl-test-{tag}"),
            containers: Vec::new(),
        };
        let (plugins, networks) = (dir.join("cni-bin"), dir.join("cni-conf"));
        for d in [&plugins, &networks, &dir.join("tmp")] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        // Podman's CNI backend brings up the loopback itself: `meshnet` is the only plugin needed.
        std::os::unix::fs::symlink(lab::meshctl_bin(), plugins.join("meshnet"))
            .expect("link meshnet");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": podman.network,
            "plugins": [{"type": "meshnet", "socket": socket, "subnet": subnet}],
        });
        let d = |p: &str| dir.join(p).display().to_string();
        let files = [
            (
                format!("cni-conf/{}.conflist", podman.network),
                conflist.to_string(),
            ),
            // The limits stay below any hard limit: podman's defaults for root (nofile and nproc
            // of about a million) fail where the test runs without CAP_SYS_RESOURCE.
            (
                "containers.conf".to_string(),
                format!(
                    "[containers]\n\
                     default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
                     [network]\n\
                     network_backend = \"cni\"\n\
                     cni_plugin_dirs = [\"{}\"]\n\
                     network_config_dir = \"{}\"\n\
                     default_network = \"{}\"\n\
                     [engine]\n\
                     cgroup_manager = \"cgroupfs\"\n\
                     events_logger = \"file\"\n\
                     events_logfile_path = \"{}\"\n\
                     lock_type = \"file\"\n\
                     tmp_dir = \"{}\"\n",
                    plugins.display(),
                    networks.display(),
                    podman.network,
                    d("events.log"),
                    d("tmp"),
                ),
            ),
            (
                "storage.conf".to_string(),
                format!(
                    "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                    d("root"),
                    d("runroot")
                ),
            ),
        ];
        for (name, text) in files {
            std::fs::write(dir.join(&name), text).unwrap_or_else(|e| panic!("write {name}: {e}"));
        }
        let bin = dir.join("rootfs/bin");
        std::fs::create_dir_all(&bin).expect("create the rootfs");
        std::fs::copy("/bin/busybox", bin.join("busybox"))
            .unwrap_or_else(|e| panic!("copy /bin/busybox (apt-get install busybox-static): {e}"));
        podman
    }

    /// Runs `podman ARGS` with this podman's storage and configuration; (success, stdout+stderr).
    fn cmd(&self, args: &[&str]) -> (bool, String) {
        let d = |p: &str| self.dir.join(p);
        let out = Command::new("podman")
            .arg("--root")
            .arg(d("root"))
            .arg("--runroot")
            .arg(d("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", d("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d("storage.conf"))
            .env_remove("CONTAINER_HOST")
            .env_remove("CONTAINER_CONNECTION")
            .output()
            .expect("run podman");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// `podman run -d` on the mesh network; returns the container's ID.
    fn run(&mut self, name: &str) -> Result<String, String> {
        self.containers.push(name.to_string());
        let (ok, out) = self.cmd(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &self.network,
            "--cgroup-parent",
            &self.cgroup_parent,
            "--rootfs",
            &self.dir.join("rootfs").display().to_string(),
            "/bin/busybox",
            "sleep",
            "300",
        ]);
        if !ok {
            return Err(out);
        }
        Ok(self.inspect(name, "{{.Id}}"))
    }

    fn inspect(&self, container: &str, format: &str) -> String {
        let (ok, out) = self.cmd(&["inspect", "-f", format, container]);
        assert!(ok, "podman inspect {container}: {out}");
        out.trim().to_string()
    }

    fn ping(&self, container: &str, to: Ipv4Addr) -> bool {
        let to = to.to_string();
        self.cmd(&[
            "exec",
            container,
            "/bin/busybox",
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            &to,
        ])
        .0
    }

    /// `podman rm -f` without the stop timeout (busybox `sleep` as PID 1 ignores SIGTERM).
    fn remove(&mut self, container: &str) {
        let (ok, out) = self.cmd(&["rm", "-f", "-t", "0", container]);
        assert!(ok, "podman rm {container}: {out}");
        self.containers.retain(|c| c != container);
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.cmd(&["rm", "-f", "-t", "0", c]);
        }
        let _ = self.cmd(&["network", "rm", "-f", &self.network]);
        // Removes the storage podman made (vfs container layers, its database) the way podman does.
        let _ = self.cmd(&["system", "reset", "--force"]);
        remove_cgroup(&self.cgroup_parent);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes the cgroup `parent` that the cgroupfs manager made: one tree per v1 hierarchy, or one
/// under the v2 root, deepest first.
fn remove_cgroup(parent: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let relative = parent.trim_start_matches('/');
    let mut tops = vec![root.join(relative)];
    if let Ok(entries) = std::fs::read_dir(root) {
        tops.extend(entries.flatten().map(|e| e.path().join(relative)));
    }
    for top in tops {
        remove_cgroup_tree(&top);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    // rmdir succeeds once the cgroup's last process (conmon, on its way out) is gone.
    lab::wait_for(Duration::from_secs(5), || {
        std::fs::remove_dir(dir).is_ok() || !dir.exists()
    });
}

fn address_in(ns: &str) -> Ipv4Addr {
    let (ok, out) = lab::run_cmd("ip", &["-n", ns, "-4", "-o", "addr", "show", "eth0"]);
    assert!(ok, "{out}");
    let cidr = out.split_whitespace().skip_while(|w| *w != "inet").nth(1);
    cidr.and_then(|c| c.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no address in {ns}: {out}"))
}

#[test]
fn podman_puts_a_container_on_the_mesh_through_meshnet() {
    // Goal: the CNI plugin works under a real runtime, not only under our imitation of one.
    // Method: podman runs a container on a `meshnet` network; we check podman's, the container's
    // and the router's view of its address, ping across the mesh, then `podman rm` it.
    if lab::skip_unless_root("podman_puts_a_container_on_the_mesh_through_meshnet") {
        return;
    }
    lab::require_program("podman", "podman");
    let lab = Lab::new();
    let pid = std::process::id();
    let tag = format!("pm{}", pid % 10_000);
    // Below the ephemeral range; PORT, PORT+1 and PORT+2 are the router's.
    let port = (22_000 + (pid % 3_500) * 3).to_string();
    let third = (pid % 250) as u8;
    let subnet = format!("10.52.{third}.0/24");

    let root = RootRouter {
        bridge: tag.clone(),
        state_dir: lab.dir().join("root-state"),
    };
    let b = lab.host("b");
    let cb = lab.container(&b);
    let (root_ip, _) = lab.link_to_root(&b);
    let (ok, out) = root.meshctl(&[
        "launch",
        "--nickname",
        "root",
        "--bridge",
        &tag,
        "--port",
        &port,
        "--no-metrics",
        "--no-docker-plugin",
        "--ipalloc-init",
        "consensus=2",
    ]);
    assert!(ok, "root launch failed: {out}\n{}", root.log());
    // Same port on both: kernel-learned VXLAN FDB entries carry none (see tests/docker_plugin.rs).
    b.launch(&[
        "--port",
        &port,
        "--ipalloc-init",
        "consensus=2",
        &format!("{root_ip}:{port}"),
    ]);
    b.attach(&cb, &format!("net:{subnet}"));
    let cb_ip = address_in(&cb.netns);

    let mut podman = Podman::new(&lab.dir().join("podman"), &tag, &root.socket(), &subnet);
    let name = format!("{tag}-c");
    let id = podman
        .run(&name)
        .unwrap_or_else(|out| panic!("podman run: {out}\n{}", root.log()));

    // Podman's view, the container's and the router's agree on one address from the subnet.
    let ip: Ipv4Addr = podman
        .inspect(
            &name,
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        )
        .parse()
        .expect("podman reports an IPv4 address");
    assert_eq!(ip.octets()[..3], [10, 52, third], "{ip} not in {subnet}");
    let (ok, out) = podman.cmd(&[
        "exec",
        &name,
        "/bin/busybox",
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        "eth0",
    ]);
    assert!(
        ok && out.contains(&format!("inet {ip}/24")),
        "eth0 in the container: {out}"
    );
    let allocation = root
        .allocation(ip)
        .unwrap_or_else(|| panic!("the router does not hold {ip}:\n{:#}", root.json("ipam")));
    assert_eq!(allocation["container"], format!("cni:{id}:eth0"));
    let entry = root
        .ps_entry(&id)
        .unwrap_or_else(|| panic!("meshctl ps lacks {id}:\n{:#}", root.json("ps")));
    assert_eq!(entry["ips"][0], format!("{ip}/24"), "{entry}");
    assert_eq!(entry["via"], "cni", "{entry}");
    let host_ifname = entry["host_ifname"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        lab::run_cmd("ip", &["link", "show", "dev", &host_ifname]).0,
        "no host-side veth {host_ifname:?}"
    );

    // Across the mesh, both ways.
    assert!(
        lab::wait_for(WAIT_MAX, || podman.ping(&name, cb_ip)),
        "the podman container {ip} could not ping cB {cb_ip}:\n{}\n{}",
        root.log(),
        lab.report()
    );
    // Waits too: on a loaded machine the first echo this way was lost now and then, a second
    // or so after the routers connected (the next one answered).
    assert!(
        lab::wait_for(WAIT_MAX, || lab::ping(&cb.netns, ip)),
        "cB could not ping the podman container {ip}:\n{}",
        root.log()
    );

    // `podman rm` runs DEL: the veth and podman's namespace go, the address is released.
    let sandbox = podman.inspect(&name, "{{.NetworkSettings.SandboxKey}}");
    assert!(Path::new(&sandbox).exists(), "no netns at {sandbox:?}");
    podman.remove(&name);
    assert!(
        !lab::run_cmd("ip", &["link", "show", "dev", &host_ifname]).0,
        "the host-side veth {host_ifname} outlived the container"
    );
    assert!(
        !Path::new(&sandbox).exists(),
        "{sandbox} outlived the container"
    );
    assert!(
        root.allocation(ip).is_none(),
        "{ip} still held after podman rm:\n{:#}",
        root.json("ipam")
    );
    assert!(root.ps_entry(&id).is_none(), "{:#}", root.json("ps"));
    assert!(
        !lab::ping(&cb.netns, ip),
        "{ip} still answers after podman rm"
    );
}

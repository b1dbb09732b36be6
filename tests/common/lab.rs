//! The namespace test lab: hosts, links, switches and containers as network namespaces, and
//! helpers to run `meshctl` inside them and to look at what a user would see.
//!
//! Owns every netns, veth, bridge, temporary directory and process it creates. `Drop` (also
//! while unwinding from a failed assertion) kills those processes by PID (daemons through the
//! `meshctl.pid` file in their state dir), deletes the namespaces (and with them every link inside)
//! and removes the temporary directories. Nothing is ever created in the caller's own namespace.
//!
//! Not here: the topology and assertions of a particular test (`tests/*.rs`), and any knowledge
//! of meshctl's internals; it is driven only through its CLI and `status --json`.
//!
//! Invariants: names are unique per lab (`m{pid%100000:05}{n}`, `n` a process-wide counter) and
//! at most 15 characters, so tests run in parallel; links get addresses from 10.250.k.0/24, which
//! exist only inside this lab's namespaces; traffic is only sent to those addresses and to
//! container addresses inside this lab's namespaces; waiting is always polling with a deadline
//! (`wait_for`), never a fixed sleep. Ancestor: wireguard-go's `tests/netns.sh`.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The longest any single wait in a test may take.
pub(crate) const WAIT_MAX: Duration = Duration::from_secs(30);
/// How long a single `meshctl` invocation may run before the lab kills it.
const COMMAND_MAX: Duration = Duration::from_secs(60);
/// Linux interface names hold at most 15 bytes (IFNAMSIZ - 1); we hold netns names to it too.
const NAME_LEN_MAX: usize = 15;

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static OUTPUT_COUNTER: AtomicU32 = AtomicU32::new(0);

/// True when we may create namespaces. Otherwise prints why the test is skipped.
pub(crate) fn skip_unless_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!(
        "SKIP {test}: needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN to create network namespaces)"
    );
    true
}

/// Programs the lab runs, with the Debian package of each (`.ci/run` installs them). A missing
/// one fails the test at once with its name, rather than as a ping that never answers.
const PROGRAMS: [(&str, &str); 2] = [("ip", "iproute2"), ("ping", "iputils-ping")];

fn require_programs() {
    for (program, package) in PROGRAMS {
        require_program(program, package);
    }
}

/// Fails the test at once if `program` is not on PATH, naming the Debian `package` that has it.
pub(crate) fn require_program(program: &str, package: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| dir.join(program).is_file());
    assert!(
        found,
        "`{program}` is not installed; the namespace tests need it: apt-get install {package} \
         (or run .ci/run, which installs everything the tests use)"
    );
}

/// Nicknames of the peers a `status --json` document shows as reachable.
pub(crate) fn reachable_nicknames(
    status: &serde_json::Value,
) -> std::collections::BTreeSet<String> {
    status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["reachable"].as_bool() == Some(true))
        .filter_map(|p| p["nickname"].as_str().map(str::to_owned))
        .collect()
}

/// Polls `cond` every 50 ms until it holds (true) or `deadline` has passed (false).
pub(crate) fn wait_for(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Path of the meshctl binary: cargo's own for integration tests, else next to the example.
pub(crate) fn meshctl_bin() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_meshctl") {
        return PathBuf::from(path);
    }
    if let Ok(path) = std::env::var("MESHCTL_BIN") {
        return PathBuf::from(path);
    }
    // Examples live in target/<profile>/examples/; the binary in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe is readable on Linux");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("an example binary lives two levels below the target dir");
    profile_dir.join("meshctl")
}

/// For examples, which cargo gives no path to the binary: runs `cargo build --bin meshctl` with
/// the example's profile (a no-op when it is current) and returns the binary's path.
pub(crate) fn ensure_meshctl_built() -> Result<PathBuf, String> {
    let bin = meshctl_bin();
    let profile_dir = bin.parent().map(Path::to_path_buf).unwrap_or_default();
    let release = profile_dir.ends_with("release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!(
        "building meshctl ({})",
        if release { "release" } else { "debug" }
    );
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--bin", "meshctl"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .map_err(|e| format!("run {cargo} build: {e}"))?;
    if !status.success() || !bin.exists() {
        return Err(format!(
            "{cargo} build --bin meshctl did not produce {}",
            bin.display()
        ));
    }
    Ok(bin)
}

/// Runs `ip ARGS`, panicking with its stderr on failure (lab setup must not half-work).
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip ARGS` during cleanup: failures are collected, not fatal.
fn ip_cleanup(args: &[&str], errors: &mut Vec<String>) {
    match Command::new("ip").args(args).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => errors.push(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => errors.push(format!("ip {}: {e}", args.join(" "))),
    }
}

/// Runs `cmd` with a time limit, stdout and stderr going to files in `dir` rather than pipes, so
/// a daemon that inherits them cannot keep us waiting for EOF.
fn run_bounded(mut cmd: Command, dir: &Path, limit: Duration) -> (ExitStatus, String, String) {
    let n = OUTPUT_COUNTER.fetch_add(1, Ordering::Relaxed);
    let out_path = dir.join(format!("cmd{n}.out"));
    let err_path = dir.join(format!("cmd{n}.err"));
    let out_file = File::create(&out_path).expect("create command stdout file");
    let err_file = File::create(&err_path).expect("create command stderr file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(err_file)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for our own child") {
            break status;
        }
        if Instant::now() >= end {
            // Our own direct child, killed by its handle (PID).
            let _ = child.kill();
            let status = child.wait().expect("wait for our killed child");
            let mut err = fs::read_to_string(&err_path).unwrap_or_default();
            err.push_str(&format!("\n[lab: killed after {limit:?}: {cmd:?}]"));
            let out = fs::read_to_string(&out_path).unwrap_or_default();
            return (status, out, err);
        }
        thread::sleep(Duration::from_millis(10));
    };
    let out = fs::read_to_string(&out_path).unwrap_or_default();
    let err = fs::read_to_string(&err_path).unwrap_or_default();
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    (status, out, err)
}

/// True if `pid` is a live (not zombie) process whose command line mentions `needle`.
fn process_alive(pid: i32, needle: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 3 of /proc/PID/stat is the state; it follows the parenthesised command name.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains(needle)
}

/// Sends SIGKILL to `pid` and waits (bounded) until it is gone.
fn kill_pid(pid: i32) -> bool {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_for(Duration::from_secs(5), || !process_alive(pid, ""))
}

/// A network namespace standing for one machine running meshctl.
#[derive(Clone, Debug)]
pub(crate) struct Host {
    /// Short name used in reports, e.g. "a".
    pub(crate) name: String,
    /// The netns name (under /var/run/netns).
    pub(crate) netns: String,
    /// meshctl's `--state-dir` for this host (pid file, log, state).
    pub(crate) state_dir: PathBuf,
    /// Where command outputs are spooled.
    scratch: PathBuf,
}

impl Host {
    /// Runs `meshctl --state-dir DIR ARGS` inside the host; returns (status, stdout, stderr).
    pub(crate) fn meshctl(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(meshctl_bin())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args)
            .env("MESHCTL_STATE_DIR", &self.state_dir)
            .env_remove("MESHCTL_SOCKET")
            .env_remove("MESHCTL_PASSWORD");
        run_bounded(cmd, &self.scratch, COMMAND_MAX)
    }

    /// `meshctl launch ARGS` (daemonizes, returns when ready). Panics with output and log on failure.
    pub(crate) fn launch(&self, args: &[&str]) {
        let mut full = vec!["launch", "--nickname", &self.name];
        full.extend_from_slice(args);
        let (status, out, err) = self.meshctl(&full);
        assert!(
            status.success(),
            "host {}: meshctl {} failed ({status}):\nstdout: {out}\nstderr: {err}\nlog:\n{}",
            self.name,
            full.join(" "),
            self.log_tail(40)
        );
    }

    /// `meshctl attach NETNS --ip CIDR`. Panics with output and log on failure.
    pub(crate) fn attach(&self, container: &Container, cidr: &str) {
        let (status, out, err) = self.meshctl(&["attach", &container.netns, "--ip", cidr]);
        assert!(
            status.success(),
            "host {}: meshctl attach {} --ip {cidr} failed ({status}):\nstdout: {out}\nstderr: {err}\nlog:\n{}",
            self.name,
            container.netns,
            self.log_tail(40)
        );
    }

    /// `meshctl status --json` parsed; `Value::Null` if the command or the parse failed, so that
    /// wait conditions simply read false while a daemon is down.
    pub(crate) fn status_json(&self) -> serde_json::Value {
        self.try_status_json().unwrap_or(serde_json::Value::Null)
    }

    /// `meshctl status --json` parsed, or why not.
    pub(crate) fn try_status_json(&self) -> Result<serde_json::Value, String> {
        let (status, out, err) = self.meshctl(&["status", "--json"]);
        if !status.success() {
            return Err(format!("status --json failed ({status}): {err}"));
        }
        serde_json::from_str(&out).map_err(|e| format!("status --json is not JSON ({e}): {out}"))
    }

    /// PID of the daemon from `STATE_DIR/meshctl.pid`, if the file exists and parses.
    pub(crate) fn daemon_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.state_dir.join("meshctl.pid")).ok()?;
        text.trim().parse().ok()
    }

    /// True if the PID in the pid file is a live meshctl process.
    pub(crate) fn daemon_alive(&self) -> bool {
        self.daemon_pid()
            .is_some_and(|pid| process_alive(pid, "meshctl"))
    }

    /// Kills the daemon with SIGKILL (PID from its pid file) and waits until it is gone.
    pub(crate) fn kill9(&self) {
        let pid = self
            .daemon_pid()
            .unwrap_or_else(|| panic!("host {}: no daemon pid file", self.name));
        assert!(
            process_alive(pid, "meshctl"),
            "host {}: pid {pid} from the pid file is not a live meshctl",
            self.name
        );
        assert!(
            kill_pid(pid),
            "host {}: pid {pid} survived SIGKILL",
            self.name
        );
    }

    /// The last `lines` lines of `STATE_DIR/meshctl.log`.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let log = self.state_dir.join("meshctl.log");
        match fs::read_to_string(&log) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("[no log at {}: {e}]", log.display()),
        }
    }
}

/// A network namespace standing for one container; attached by `meshctl attach` on its host.
#[derive(Clone, Debug)]
pub(crate) struct Container {
    /// The netns name (under /var/run/netns), which is what `meshctl attach` takes.
    pub(crate) netns: String,
}

/// One test's private set of namespaces. Build with `Lab::new`, everything goes on `Drop`.
pub(crate) struct Lab {
    prefix: String,
    dir: PathBuf,
    netns: Mutex<Vec<String>>,
    hosts: Mutex<Vec<Host>>,
    children: Mutex<Vec<Child>>,
    subnets: AtomicU32,
}

impl Lab {
    /// A new empty lab with a unique name prefix and scratch directory.
    pub(crate) fn new() -> Lab {
        require_programs();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("m{:05}{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("meshlab-{prefix}"));
        let _ = fs::remove_dir_all(&dir); // a leftover of an earlier process with our PID
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Lab {
            prefix,
            dir,
            netns: Mutex::new(Vec::new()),
            hosts: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            subnets: AtomicU32::new(0),
        }
    }

    /// The unique prefix of every name this lab makes.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's scratch directory (removed on drop).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn add_netns(&self, suffix: &str) -> String {
        let name = format!("{}{suffix}", self.prefix);
        assert!(name.len() <= NAME_LEN_MAX, "netns name {name} is too long");
        ip(&["netns", "add", &name]);
        self.netns.lock().expect("lab lock").push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        // Hosts never route between their links: A reaches C only through the mesh.
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=0",
            ])
            .output()
            .expect("run sysctl in netns");
        assert!(out.status.success(), "disable forwarding in {name}");
        name
    }

    /// A new host namespace with its own state dir. `name` is short ("a", "b").
    pub(crate) fn host(&self, name: &str) -> Host {
        let netns = self.add_netns(name);
        let state_dir = self.dir.join(name);
        fs::create_dir_all(&state_dir).expect("create host state dir");
        let host = Host {
            name: name.to_owned(),
            netns,
            state_dir,
            scratch: self.dir.clone(),
        };
        self.hosts.lock().expect("lab lock").push(host.clone());
        host
    }

    /// A new container namespace belonging to `host` (attach it with `host.attach`).
    pub(crate) fn container(&self, host: &Host) -> Container {
        let n = self.netns.lock().expect("lab lock").len();
        Container {
            netns: self.add_netns(&format!("{}c{n}", host.name)),
        }
    }

    fn next_subnet(&self) -> u32 {
        let k = self.subnets.fetch_add(1, Ordering::Relaxed) + 1;
        assert!(k < 255, "too many subnets in one lab");
        k
    }

    /// A veth pair between two hosts on a fresh 10.250.k.0/24; returns (a's address, b's address).
    /// The interface is called `u{k}` on both sides.
    pub(crate) fn link(&self, a: &Host, b: &Host) -> (Ipv4Addr, Ipv4Addr) {
        let k = self.next_subnet();
        let ifname = format!("u{k}");
        ip(&[
            "-n", &a.netns, "link", "add", &ifname, "type", "veth", "peer", "name", &ifname,
            "netns", &b.netns,
        ]);
        let addr_a = Ipv4Addr::new(10, 250, k as u8, 1);
        let addr_b = Ipv4Addr::new(10, 250, k as u8, 2);
        for (host, addr) in [(a, addr_a), (b, addr_b)] {
            ip(&[
                "-n",
                &host.netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &ifname,
            ]);
            ip(&["-n", &host.netns, "link", "set", &ifname, "up"]);
        }
        (addr_a, addr_b)
    }

    /// A veth between the ROOT namespace (name `{prefix}r`) and `host` (name `eth1`), on a /24 of
    /// its own in 10.253.0.0/16 chosen from our PID and this lab, so that a test touching the root
    /// namespace (Docker) never depends on the default route. Returns (root side, host side). The
    /// pair goes away with the host's namespace when the lab drops.
    #[allow(dead_code)] // only the tests that touch the root namespace use it
    pub(crate) fn link_to_root(&self, host: &Host) -> (Ipv4Addr, Ipv4Addr) {
        let third = (std::process::id() as u8).wrapping_add(self.next_subnet() as u8);
        let root_if = format!("{}r", self.prefix);
        ip(&[
            "link",
            "add",
            &root_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
            "netns",
            &host.netns,
        ]);
        let root_ip = Ipv4Addr::new(10, 253, third, 1);
        let host_ip = Ipv4Addr::new(10, 253, third, 2);
        ip(&["addr", "add", &format!("{root_ip}/24"), "dev", &root_if]);
        ip(&["link", "set", &root_if, "up"]);
        ip(&[
            "-n",
            &host.netns,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            "eth1",
        ]);
        ip(&["-n", &host.netns, "link", "set", "eth1", "up"]);
        (root_ip, host_ip)
    }

    /// A shared segment: a bridge in its own underlay netns, each host with a veth (`u{k}`) into
    /// it, addresses 10.250.k.(i+1)/24 in the order given.
    pub(crate) fn switch(&self, hosts: &[&Host]) -> Vec<Ipv4Addr> {
        let k = self.next_subnet();
        let underlay = self.add_netns(&format!("s{k}"));
        ip(&["-n", &underlay, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &underlay, "link", "set", "br0", "up"]);
        let ifname = format!("u{k}");
        let mut addrs = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let port = format!("p{i}");
            ip(&[
                "-n",
                &underlay,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                &ifname,
                "netns",
                &host.netns,
            ]);
            ip(&["-n", &underlay, "link", "set", &port, "master", "br0", "up"]);
            let addr = Ipv4Addr::new(10, 250, k as u8, i as u8 + 1);
            ip(&[
                "-n",
                &host.netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &ifname,
            ]);
            ip(&["-n", &host.netns, "link", "set", &ifname, "up"]);
            addrs.push(addr);
        }
        addrs
    }

    /// Runs `cmd ARGS` inside `netns` as a background process the lab kills on drop.
    /// Output goes to `{lab dir}/{log_name}`.
    pub(crate) fn spawn_in(&self, netns: &str, cmd: &str, args: &[&str], log_name: &str) -> u32 {
        let log = File::create(self.dir.join(log_name)).expect("create process log");
        let log_err = log.try_clone().expect("clone process log fd");
        let child = Command::new("ip")
            .args(["netns", "exec", netns, cmd])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd} in {netns}: {e}"));
        let pid = child.id();
        self.children.lock().expect("lab lock").push(child);
        pid
    }

    /// Every host's `status --json` and log tail, for failure messages.
    pub(crate) fn report(&self) -> String {
        let hosts = self.hosts.lock().expect("lab lock").clone();
        let mut text = String::new();
        for host in hosts {
            let status = match host.try_status_json() {
                Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
                Err(e) => e,
            };
            text.push_str(&format!(
                "\n===== host {} ({}) status:\n{status}\n----- {} log (tail):\n{}\n",
                host.name,
                host.netns,
                host.state_dir.join("meshctl.log").display(),
                host.log_tail(30)
            ));
        }
        text
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let hosts = std::mem::take(&mut *self.hosts.lock().unwrap_or_else(|e| e.into_inner()));
        for host in &hosts {
            if let Some(pid) = host.daemon_pid() {
                if process_alive(pid, "meshctl") && !kill_pid(pid) {
                    errors.push(format!(
                        "daemon pid {pid} of {} survived SIGKILL",
                        host.name
                    ));
                }
            }
        }
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let namespaces = std::mem::take(&mut *self.netns.lock().unwrap_or_else(|e| e.into_inner()));
        // Anything still running inside our namespaces was started there by this lab (e.g. a
        // daemon whose pid file was not written yet): kill each by PID.
        for ns in &namespaces {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    if !kill_pid(pid) {
                        errors.push(format!("pid {pid} in {ns} survived SIGKILL"));
                    }
                }
            }
        }
        // Deleting a netns destroys the veths inside it, and with them their peers.
        for ns in namespaces.iter().rev() {
            ip_cleanup(&["netns", "del", ns], &mut errors);
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            errors.push(format!("remove {}: {e}", self.dir.display()));
        }
        errors
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("lab {} failed; final state:{}", self.prefix, self.report());
        }
        let errors = self.teardown();
        if !errors.is_empty() {
            eprintln!(
                "lab {} cleanup problems:\n  {}",
                self.prefix,
                errors.join("\n  ")
            );
        }
    }
}

/// Runs `f` on a new thread joined to netns `ns` and returns its result (a panic in `f` is
/// re-raised here). The calling thread's namespace is never changed.
pub(crate) fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match spawn_in_netns(ns, f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Starts `f` on a new thread joined to netns `ns`.
pub(crate) fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns to {path}: {e}"));
        f()
    })
}

/// One ICMP echo from inside `ns` to `addr` (1 s timeout).
pub(crate) fn ping(ns: &str, addr: Ipv4Addr) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c", "1", "-W", "1", "-q"])
        .arg(addr.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Sends one UDP datagram from inside `ns` (ephemeral source port).
pub(crate) fn send_udp(ns: &str, to: SocketAddr, payload: Vec<u8>) {
    in_netns(ns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind udp in netns");
        socket.send_to(&payload, to).expect("send udp in netns");
    });
}

/// Starts sending `count` UDP datagrams from inside `ns` to `to`, one after another as fast as
/// one socket can (ephemeral source port); `make(i, buf)` writes datagram `i` into `buf`, which
/// is empty. A send the kernel refuses for lack of buffer space is retried, so the result, how
/// many left the socket, is `count` unless a send failed otherwise. What the path or the receiver
/// drops after that is for the caller to measure ([`udp_receive_errors`], [`link_drops`]).
pub(crate) fn flood_udp(
    ns: &str,
    to: SocketAddr,
    count: u64,
    mut make: impl FnMut(u64, &mut Vec<u8>) + Send + 'static,
) -> JoinHandle<Result<u64, String>> {
    spawn_in_netns(ns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind udp: {e}"))?;
        let mut buf = Vec::with_capacity(65_536);
        for i in 0..count {
            buf.clear();
            make(i, &mut buf);
            loop {
                match socket.send_to(&buf, to) {
                    Ok(_) => break,
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.raw_os_error() == Some(libc::ENOBUFS) =>
                    {
                        thread::yield_now();
                    }
                    Err(e) => return Err(format!("send datagram {i} to {to}: {e}")),
                }
            }
        }
        Ok(count)
    })
}

/// Datagrams the UDP sockets of netns `ns` lost, summed over all of them: `RcvbufErrors` and
/// `InErrors` of `/proc/net/snmp` (which include each other's share on some kernels, so this may
/// overstate).
pub(crate) fn udp_receive_errors(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .output()
        .expect("run cat /proc/net/snmp in netns");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        panic!("no Udp lines in /proc/net/snmp of {ns}:\n{text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(name, _)| matches!(*name, "RcvbufErrors" | "InErrors"))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum()
}

/// Packets interface `dev` in netns `ns` dropped, received and sent (`ip -s link`).
pub(crate) fn link_drops(ns: &str, dev: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", dev])
        .output()
        .expect("run ip -s link");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ip -s -j link show dev {dev} in {ns}: {e}"));
    let stats = &links[0]["stats64"];
    ["rx", "tx"]
        .iter()
        .filter_map(|dir| stats[dir]["dropped"].as_u64())
        .sum()
}

/// A small deterministic PRNG (xorshift64*) for test payloads; not for anything secret.
pub(crate) struct TestRng(u64);

impl TestRng {
    pub(crate) fn new(seed: u64) -> TestRng {
        TestRng(seed | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Result of [`tcp_transfer`]: SHA-256 of what was sent and of what arrived, and the rate.
#[derive(Debug)]
pub(crate) struct Transfer {
    pub(crate) sent_sha256: Vec<u8>,
    pub(crate) received_sha256: Vec<u8>,
    pub(crate) received_bytes: u64,
    pub(crate) elapsed: Duration,
}

/// Sends `bytes` pseudo-random bytes over TCP from netns `from` to `to:port` (a listener in
/// netns `to_ns`), hashing both ends. Every socket operation is bounded by `WAIT_MAX`.
pub(crate) fn tcp_transfer(
    from: &str,
    to_ns: &str,
    to: Ipv4Addr,
    port: u16,
    bytes: u64,
) -> Result<Transfer, String> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let server = spawn_in_netns(to_ns, move || -> Result<(u64, Vec<u8>), String> {
        let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(format!("bind tcp :{port}: {e}")));
                return Err(format!("bind tcp :{port}: {e}"));
            }
        };
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let _ = ready_tx.send(Ok(()));
        let end = Instant::now() + WAIT_MAX;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < end => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(WAIT_MAX))
            .map_err(|e| e.to_string())?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    ctx.update(&buf[..n]);
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read after {total} bytes: {e}")),
            }
        }
        Ok((total, ctx.finish().as_ref().to_vec()))
    });
    ready_rx
        .recv_timeout(WAIT_MAX)
        .map_err(|e| format!("server never became ready: {e}"))??;
    let start = Instant::now();
    let client = spawn_in_netns(from, move || -> Result<Vec<u8>, String> {
        let addr = SocketAddr::from((to, port));
        let mut stream = TcpStream::connect_timeout(&addr, WAIT_MAX)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_write_timeout(Some(WAIT_MAX))
            .map_err(|e| e.to_string())?;
        let mut rng = TestRng::new(0x5eed_0000 ^ bytes);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            ctx.update(&buf[..n]);
            stream
                .write_all(&buf[..n])
                .map_err(|e| format!("write after {} bytes: {e}", bytes - left))?;
            left -= n as u64;
        }
        stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        Ok(ctx.finish().as_ref().to_vec())
    });
    let sent = client
        .join()
        .map_err(|_| "client thread panicked".to_owned())?;
    let received = server
        .join()
        .map_err(|_| "server thread panicked".to_owned())?;
    let elapsed = start.elapsed();
    let sent_sha256 = sent?;
    let (received_bytes, received_sha256) = received?;
    Ok(Transfer {
        sent_sha256,
        received_sha256,
        received_bytes,
        elapsed,
    })
}

/// Captures IPv4 UDP datagrams inside one netns through an AF_PACKET socket (both directions,
/// every interface), to pick out real sleeve datagrams for replay and tamper tests.
pub(crate) struct UdpCapture {
    // std's UdpSocket serves only as a safe owner of the packet socket's fd, offering recv(2)
    // and SO_RCVTIMEO; it is never used for UDP.
    socket: UdpSocket,
}

impl UdpCapture {
    /// Opens the capture inside `ns`; packets sent after this returns are seen.
    pub(crate) fn start(ns: &str) -> UdpCapture {
        let socket = in_netns(ns, || packet_socket_ipv4().expect("open AF_PACKET socket"));
        UdpCapture { socket }
    }

    /// The first UDP payload to `dst` of at least `len_min` bytes seen before `deadline`.
    pub(crate) fn next_payload(
        &self,
        dst: SocketAddrV4,
        len_min: usize,
        deadline: Duration,
    ) -> Option<Vec<u8>> {
        let end = Instant::now() + deadline;
        let mut buf = vec![0u8; 65_536];
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            self.socket.set_read_timeout(Some(left)).ok()?;
            let n = match self.socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            };
            if let Some(payload) = udp_payload_to(&buf[..n], dst) {
                if payload.len() >= len_min {
                    return Some(payload.to_vec());
                }
            }
        }
        None
    }
}

/// The UDP payload of an IPv4 packet if it is an unfragmented datagram to `dst`.
fn udp_payload_to(packet: &[u8], dst: SocketAddrV4) -> Option<&[u8]> {
    let version_ihl = *packet.first()?;
    if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 || packet.len() < 20 || packet[9] != 17 {
        return None;
    }
    let more_fragments_or_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff;
    if more_fragments_or_offset != 0 {
        return None;
    }
    let dst_addr = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let udp = packet.get(usize::from(version_ihl & 0x0f) * 4..)?;
    let port = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    if dst_addr != *dst.ip() || port != dst.port() || len < 8 {
        return None;
    }
    udp.get(8..len)
}

/// An AF_PACKET/SOCK_DGRAM socket (link header stripped) in the calling thread's netns. It must
/// be ETH_P_ALL: the kernel shows outgoing packets only to ETH_P_ALL taps. Non-IPv4 packets are
/// told apart by their first nibble in [`udp_payload_to`].
#[allow(unsafe_code)]
fn packet_socket_ipv4() -> io::Result<UdpSocket> {
    let protocol = i32::from((libc::ETH_P_ALL as u16).to_be());
    // SAFETY: socket(2) takes plain integers and has no memory-safety preconditions; the result
    // is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2), is open, and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(UdpSocket::from(owned))
}

/// Runs a command to completion; (success, stdout followed by stderr). Used by the tests that drive
/// the Docker CLI and other host tools.
#[allow(dead_code)] // not every test binary uses it
pub(crate) fn run_cmd(cmd: &str, args: &[&str]) -> (bool, String) {
    match Command::new(cmd).args(args).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, format!("run {cmd}: {e}")),
    }
}

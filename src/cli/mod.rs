//! The `meshctl` command line: argument definitions and dispatch, one file per subcommand group.
//!
//! Every command but `launch --foreground` is a thin client of the router's local API (`api/`), found
//! through `--socket`, or `--state-dir` (the socket lives inside it), or the default place.

/// `print!` for command output: a reader that went away (`meshctl ipam --json | head`) ends
/// the program quietly, as it does other Unix tools, instead of a panic.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` for command output, like [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod attach;
mod dns;
mod launch;
mod peers;
mod ps;
mod report;
mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, CommandFactory, Parser, Subcommand};

/// Default state directory when `--state-dir` is not given.
pub(crate) const STATE_DIR_DEFAULT: &str = "/var/lib/meshctl";
/// Default API socket when neither `--socket` nor `--state-dir` is given.
pub(crate) const SOCKET_DEFAULT: &str = "/run/meshctl/meshctl.sock";
/// Default control port; the sleeve uses the next one.
pub(crate) const PORT_DEFAULT: u16 = 6783;

#[derive(Parser, Debug)]
#[command(
    name = "meshctl",
    version,
    about = "A mesh router for containers: connect hosts, attach containers, reach them as on one LAN",
    long_about = "meshctl joins hosts into one encrypted layer-2 network for containers.\n\n\
        Run `meshctl launch [PEER...]` on every host (with the same --password), then \
        `meshctl attach NETNS --ip CIDR` to put a container on the mesh. Routers find each other by \
        gossip and relay traffic over several hops where no direct path exists.\n\n\
        Several routers can run on one machine, one per network namespace: give each its own --state-dir."
)]
pub(crate) struct Cli {
    /// Directory for the router's identity, log, pid file and (by default) its API socket.
    #[arg(long, global = true, env = "MESHCTL_STATE_DIR", value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Path of the router's API socket [default: DIR/meshctl.sock with --state-dir, else /run/meshctl/meshctl.sock].
    #[arg(long, global = true, env = "MESHCTL_SOCKET", value_name = "PATH")]
    pub(crate) socket: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Start the router on this host and connect it to the given peers.
    ///
    /// Without --foreground the router runs in the background and this command returns once it is ready
    /// (or fails with the reason). Needs root: it creates a bridge and a TAP device.
    Launch(LaunchArgs),
    /// Add peers for the running router to connect to (retried until `meshctl forget`).
    Connect {
        /// HOST[:PORT] of another router; PORT defaults to 6783.
        #[arg(required = true, value_name = "HOST[:PORT]")]
        peers: Vec<String>,
    },
    /// Stop connecting to peers added by `launch` or `connect` (established connections stay).
    Forget {
        /// HOST[:PORT] as given to launch or connect.
        #[arg(required = true, value_name = "HOST[:PORT]")]
        peers: Vec<String>,
    },
    /// Stop the running router (attached containers keep their interfaces).
    Stop,
    /// Show the router's peers, connections and data-plane counters (all sections, or one).
    Status {
        /// Show only this section.
        #[arg(value_enum)]
        section: Option<status::Section>,
        /// Print one JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Print everything the router knows about itself and its peers as one JSON document with a
    /// stable, versioned schema (docs/report.md).
    Report,
    /// Put a container (a network namespace) on the mesh with a veth on the mesh bridge.
    Attach {
        /// A named network namespace (as in `ip netns`), a PID whose namespace to use, or a path to a netns file.
        #[arg(value_name = "NETNS|PID")]
        target: String,
        /// Address with prefix, e.g. 10.32.0.5/12, or `net:CIDR` to allocate one from an
        /// isolated subnet (repeat for more). Without it, an address is allocated from the
        /// default subnet (--ipalloc-range).
        #[arg(long = "ip", value_name = "CIDR|net:CIDR")]
        ips: Vec<String>,
        /// Interface name inside the container.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// How long to wait for an address (seconds) before saying what allocation waits for.
        #[arg(long, default_value_t = crate::api::server::ALLOC_WAIT_DEFAULT, value_name = "SECS")]
        wait: u64,
        /// DNS name to register (NAME.DOMAIN) [default: the netns or Docker container name].
        #[arg(long)]
        name: Option<String>,
    },
    /// List the containers on this router's mesh bridge (attached or started through the Docker
    /// plugin) with their MAC and addresses.
    Ps {
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show address allocation: owned, used and free space per peer, unreachable owners,
    /// and what allocation waits for.
    Ipam {
        /// Print one JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Leave the mesh: detach the containers attached here, hand this router's address space to
    /// a live peer, stop the router and remove its IPAM state and identity (before removing the
    /// host from the mesh; a later launch joins as a new peer).
    Reset,
    /// Reclaim the address space of a peer that is gone for good, once routers owning more than
    /// half of the address range agree (it must be unreachable; each router's addresses vote).
    Rmpeer {
        /// Peer name or nickname.
        peer: String,
    },
    /// Give this host an address on the mesh, so it can reach containers (and they it); traffic from
    /// the mesh subnet that leaves through the host is masqueraded.
    Expose {
        /// The host's address with prefix, e.g. 10.32.0.254/12 [default: one from the mesh's
        /// IPAM, the same on every expose; the name server answers there too].
        #[arg(value_name = "CIDR")]
        cidr: Option<String>,
    },
    /// Remove the host's address(es) on the mesh added by `expose` (all of them without CIDR).
    Hide {
        #[arg(value_name = "CIDR")]
        cidr: Option<String>,
    },
    /// Print a shell completion script (e.g. `meshctl completions bash > /etc/bash_completion.d/meshctl`).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page in roff (e.g. `meshctl man > /usr/share/man/man1/meshctl.1`).
    Man,
    /// Remove a container's mesh interface added by `meshctl attach`.
    Detach {
        /// The same NETNS|PID given to attach.
        #[arg(value_name = "NETNS|PID")]
        target: String,
        /// Interface name inside the container.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// DNS name to remove, if attach was given --name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Register a name for addresses on this host's containers (NAME.DOMAIN in the mesh's DNS).
    DnsAdd {
        /// `web` or `web.meshctl.local`.
        name: String,
        /// One or more addresses.
        #[arg(required = true, value_name = "IP")]
        ips: Vec<String>,
    },
    /// Remove a name this host registered (only the given address, or all of them).
    DnsRemove {
        name: String,
        #[arg(value_name = "IP")]
        ip: Option<String>,
    },
    /// Show the addresses of a name in the mesh's DNS.
    DnsLookup { name: String },
}

/// Flags of `meshctl launch`.
#[derive(Args, Debug, Clone)]
pub(crate) struct LaunchArgs {
    /// Routers to connect to, as HOST[:PORT]; retried until they answer.
    #[arg(value_name = "PEER")]
    pub(crate) peers: Vec<String>,
    /// Stay in the foreground (for systemd and containers); log to stderr.
    #[arg(long)]
    pub(crate) foreground: bool,
    /// Mesh password: only routers with the same password join, and all traffic is encrypted.
    /// Without one, traffic is not encrypted.
    #[arg(long, env = "MESHCTL_PASSWORD", hide_env_values = true)]
    pub(crate) password: Option<String>,
    /// Human name of this router in status output [default: the host name].
    #[arg(long)]
    pub(crate) nickname: Option<String>,
    /// UDP port for control connections (QUIC); the sleeve uses PORT+1, VXLAN PORT+2.
    #[arg(long, default_value_t = PORT_DEFAULT)]
    pub(crate) port: u16,
    /// Name of the Linux bridge containers attach to (at most 10 characters).
    #[arg(long, default_value = "mesh")]
    pub(crate) bridge: String,
    /// MTU of the bridge, the TAP port and attached containers; leave room for the sleeve's overhead.
    #[arg(long, default_value_t = 1376, value_parser = clap::value_parser!(u32).range(576..=65000))]
    pub(crate) mtu: u32,
    /// Connect only to peers given here or with `meshctl connect`, not to peers that others announce.
    #[arg(long)]
    pub(crate) no_discovery: bool,
    /// Force the sleeve's cipher: `chacha20-poly1305` or `aes-256-gcm`. By default AES-256-GCM is
    /// used with peers where both CPUs have AES instructions, ChaCha20-Poly1305 otherwise.
    #[arg(long, value_parser = parse_cipher)]
    pub(crate) cipher: Option<crate::dataplane::sleeve::crypto::Cipher>,
    /// Seal at most 2^N datagrams under one sleeve key before moving to the next (keys rotate
    /// by counter, with no message and no gap; two peers use the smaller of their values). For
    /// tests; the default keeps AES-256-GCM far inside its per-key limit.
    #[arg(long, hide = true, default_value_t = crate::dataplane::sleeve::crypto::EPOCH_SHIFT_DEFAULT,
          value_parser = clap::value_parser!(u8).range(
              crate::dataplane::sleeve::crypto::EPOCH_SHIFT_MIN as i64..=40))]
    pub(crate) sleeve_rekey_shift: u8,
    /// Whether the sleeve uses the kernel's UDP segmentation offloads: `auto` sends with UDP GSO
    /// and receives with GRO where the kernel has them, and falls back to `sendmmsg`/`recvmmsg`
    /// (many datagrams per system call, each copied on its own) where it doesn't; `off` always
    /// uses the fallback. Try `off` when sleeve traffic stalls or arrives corrupted behind a NIC,
    /// driver or tunnel that mishandles GSO/GRO, or to measure the fallback. `meshctl status`
    /// shows the batching in use.
    #[arg(long, default_value = "auto", value_name = "auto|off", value_parser = parse_udp_offload)]
    pub(crate) udp_offload: crate::dataplane::sleeve::udp::Offload,
    /// Where to serve Prometheus metrics (`GET /metrics`).
    #[arg(long, default_value = "127.0.0.1:6782", value_name = "ADDR:PORT")]
    pub(crate) metrics_addr: std::net::SocketAddr,
    /// Serve no metrics.
    #[arg(long)]
    pub(crate) no_metrics: bool,
    /// Never use the kernel VXLAN fast path (UDP PORT+2); carry everything over the sleeve.
    #[arg(long)]
    pub(crate) no_fastpath: bool,
    /// Underlay subnets (CIDR, comma-separated or repeated) whose hosts trust each other's
    /// network: between two addresses inside them, traffic may skip encryption and take the
    /// VXLAN fast path even with a password.
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub(crate) trusted_subnets: Vec<ipnet::IpNet>,
    /// Most connections to keep: discovered peers are not dialed beyond it, and peers already in
    /// the mesh are refused beyond it (newcomers and peers you name are always let in).
    #[arg(long, default_value_t = mesh::CONN_LIMIT_DEFAULT as u16, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) conn_limit: u16,
    /// Also connect to the peers of the previous run (saved in STATE_DIR/targets by launch,
    /// connect and forget).
    #[arg(long)]
    pub(crate) resume: bool,
    /// Address range that containers attached without `--ip` get addresses from; it is
    /// also the default subnet.
    #[arg(long, default_value = "10.32.0.0/12", value_name = "CIDR")]
    pub(crate) ipalloc_range: String,
    /// How a new mesh agrees who owns the range: `consensus=N` (N initial peers vote),
    /// `seed=PEER,...` (split among these peer names) or `observer` (own nothing at first)
    /// [default: consensus=(number of PEERs given + 1)].
    #[arg(long, value_name = "MODE")]
    pub(crate) ipalloc_init: Option<String>,
    /// After how long unreachable a router's address space is reclaimed, once routers owning
    /// more than half of the range agree (`30m`, `1h`, `2h30m`; `never`: only by `meshctl
    /// rmpeer`). Longer than any network split you want to outlast: a router cut off for longer
    /// counts as gone, and the side holding most of the range takes its space over.
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = parse_reclaim_after)]
    pub(crate) ipalloc_reclaim_after: ReclaimAfter,
    /// Domain of container names: attached containers are NAME.DOMAIN, answered by the
    /// router's name server on the bridge's addresses (see `meshctl expose`).
    #[arg(long, default_value = crate::dns::DOMAIN_DEFAULT, value_name = "DOMAIN")]
    pub(crate) dns_domain: String,
    /// Run no name server (names are still gossiped and `meshctl dns-lookup` works).
    #[arg(long)]
    pub(crate) no_dns: bool,
    /// Serve Docker's network and IPAM plugin on this socket; its file name is the driver name
    /// (`docker network create -d meshnet --ipam-driver meshnet NAME`) [default:
    /// /run/docker/plugins/meshnet.sock when /run/docker exists and the router runs in the host's
    /// network namespace].
    #[arg(long, value_name = "PATH", conflicts_with = "no_docker_plugin")]
    pub(crate) docker_plugin: Option<PathBuf>,
    /// Don't serve the Docker plugin.
    #[arg(long)]
    pub(crate) no_docker_plugin: bool,
}

/// `--ipalloc-reclaim-after`: a duration, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReclaimAfter(pub(crate) Option<std::time::Duration>);

fn parse_reclaim_after(s: &str) -> Result<ReclaimAfter, String> {
    const MIN: u64 = 10;
    if matches!(s, "never" | "off") {
        return Ok(ReclaimAfter(None));
    }
    let bad = || {
        format!("bad duration {s:?}; write it like 45m, 1h or 2h30m (units s, m, h, d), or never")
    };
    let mut secs: u64 = 0;
    let mut digits = String::new();
    for ch in s.chars() {
        if ch.is_ascii_digit() {
            digits.push(ch);
            continue;
        }
        let unit = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        secs = n
            .checked_mul(unit)
            .and_then(|v| secs.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() || s.is_empty() {
        return Err(bad());
    }
    if secs < MIN {
        return Err(format!(
            "{s:?} is too short: a router unreachable that briefly is not gone; give at least {MIN}s"
        ));
    }
    Ok(ReclaimAfter(Some(std::time::Duration::from_secs(secs))))
}

fn parse_cipher(s: &str) -> Result<crate::dataplane::sleeve::crypto::Cipher, String> {
    crate::dataplane::sleeve::crypto::Cipher::parse(s)
        .ok_or_else(|| format!("unknown cipher {s:?}; choose chacha20-poly1305 or aes-256-gcm"))
}

fn parse_udp_offload(s: &str) -> Result<crate::dataplane::sleeve::udp::Offload, String> {
    crate::dataplane::sleeve::udp::Offload::parse(s)
        .ok_or_else(|| format!("unknown value {s:?}; choose auto or off"))
}

/// Where to find (or put) the router's files, from the global flags.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    pub(crate) state_dir: PathBuf,
    pub(crate) socket: PathBuf,
}

impl Paths {
    fn from_cli(cli: &Cli) -> Paths {
        let state_dir = cli
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(STATE_DIR_DEFAULT));
        let socket = match (&cli.socket, &cli.state_dir) {
            (Some(s), _) => s.clone(),
            (None, Some(dir)) => dir.join("meshctl.sock"),
            (None, None) => PathBuf::from(SOCKET_DEFAULT),
        };
        Paths { state_dir, socket }
    }
}

/// Entry point of the binary.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let paths = Paths::from_cli(&cli);
    let result = match cli.command {
        Command::Launch(args) if args.foreground => crate::daemon::run_foreground(args, paths),
        Command::Launch(args) => launch::run_background(&args, &paths),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "meshctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::BrokenPipe => Ok(()),
                _ => Err(anyhow::anyhow!("write the manual page: {e}")),
            })
            .map(|_| ExitCode::SUCCESS),
        command => runtime().and_then(|rt| rt.block_on(dispatch(command, &paths))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes command output; see [`out!`].
pub(crate) fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("meshctl: error: write to standard output: {e}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn dispatch(command: Command, paths: &Paths) -> Result<ExitCode> {
    match command {
        Command::Launch(_) | Command::Completions { .. } | Command::Man => {
            unreachable!("handled before the runtime starts")
        }
        Command::Connect { peers } => peers::connect(paths, peers).await,
        Command::Forget { peers } => peers::forget(paths, peers).await,
        Command::Stop => peers::stop(paths).await,
        Command::Status { section, json } => status::run(paths, section, json).await,
        Command::Report => report::run(paths).await,
        Command::Ipam { json } => status::ipam(paths, json).await,
        Command::Ps { json } => ps::run(paths, json).await,
        Command::Reset => peers::reset(paths).await,
        Command::Rmpeer { peer } => peers::rmpeer(paths, peer).await,
        Command::Attach {
            target,
            ips,
            ifname,
            wait,
            name,
        } => attach::attach(paths, &target, ips, ifname, wait, name).await,
        Command::Detach {
            target,
            ifname,
            name,
        } => attach::detach(paths, &target, ifname, name).await,
        Command::DnsAdd { name, ips } => dns::add(paths, name, ips).await,
        Command::DnsRemove { name, ip } => dns::remove(paths, name, ip).await,
        Command::DnsLookup { name } => dns::lookup(paths, name).await,
        Command::Expose { cidr } => attach::expose(paths, cidr, true).await,
        Command::Hide { cidr } => attach::expose(paths, cidr, false).await,
    }
}

/// Parses HOST[:PORT] with the default port; HOST may be a name, an IPv4 or a bracketed IPv6 address.
pub(crate) fn split_host_port(spec: &str) -> Result<(String, u16)> {
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    if let Ok(ip) = spec.parse::<std::net::IpAddr>() {
        return Ok((ip.to_string(), PORT_DEFAULT));
    }
    match spec.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            let port = port.parse::<u16>().map_err(|_| {
                anyhow::anyhow!("bad peer {spec:?}: port {port:?} is not a number from 1 to 65535")
            })?;
            Ok((host.to_string(), port))
        }
        Some(_) => anyhow::bail!("bad peer {spec:?}: write IPv6 addresses as [ADDR]:PORT"),
        None if spec.is_empty() => anyhow::bail!("empty peer address"),
        None => Ok((spec.to_string(), PORT_DEFAULT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn man_page_and_completions_are_generated_from_the_definition() {
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut man)
            .unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(
            man.contains(".TH meshctl") && man.contains("launch"),
            "{man}"
        );
        let mut bash = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "meshctl",
            &mut bash,
        );
        assert!(String::from_utf8(bash).unwrap().contains("attach"));
    }

    #[test]
    fn peers_parse_with_default_port() {
        assert_eq!(
            split_host_port("10.0.0.1").unwrap(),
            ("10.0.0.1".into(), 6783)
        );
        assert_eq!(
            split_host_port("10.0.0.1:7000").unwrap(),
            ("10.0.0.1".into(), 7000)
        );
        assert_eq!(split_host_port("host-b").unwrap(), ("host-b".into(), 6783));
        assert_eq!(split_host_port("[::1]:9").unwrap(), ("::1".into(), 9));
        assert!(split_host_port("a:b").is_err());
        assert!(split_host_port("").is_err());
    }

    #[test]
    fn reclaim_after_reads_units_and_never_and_names_the_fix() {
        let secs = |s: &str| parse_reclaim_after(s).map(|r| r.0.map(|d| d.as_secs()));
        assert_eq!(secs("1h"), Ok(Some(3600)));
        assert_eq!(secs("2h30m"), Ok(Some(9000)));
        assert_eq!(secs("90s"), Ok(Some(90)));
        assert_eq!(secs("1d"), Ok(Some(86400)));
        assert_eq!(secs("never"), Ok(None));
        for bad in ["", "1", "h", "1x", "1h5", "-1h", "99999999999999999999d"] {
            let e = parse_reclaim_after(bad).unwrap_err();
            assert!(e.contains("45m, 1h or 2h30m"), "{bad:?}: {e}");
        }
        assert!(parse_reclaim_after("5s")
            .unwrap_err()
            .contains("at least 10s"));
    }

    #[test]
    fn socket_defaults_to_the_state_dir() {
        let cli = Cli::parse_from(["meshctl", "--state-dir", "/tmp/x", "status"]);
        assert_eq!(
            Paths::from_cli(&cli).socket,
            PathBuf::from("/tmp/x/meshctl.sock")
        );
        let cli = Cli::parse_from(["meshctl", "status", "--socket", "/tmp/s"]);
        assert_eq!(Paths::from_cli(&cli).socket, PathBuf::from("/tmp/s"));
    }
}

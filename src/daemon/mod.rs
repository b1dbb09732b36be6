//! The composition root of the router daemon (`meshctl launch --foreground`).
//!
//! Builds, in order: the state directory and persistent identity, the control (QUIC) and sleeve (UDP)
//! sockets, the bridge with its TAP port and (unless `--no-fastpath`) its VXLAN port (netlink), the
//! data-plane tasks (sleeve, FDB reconciler, VXLAN prober), the local API, and finally the control
//! loop (`control.rs`), which owns the mesh `Router` and runs until `meshctl stop` or a signal.
//! On the way out it removes the TAP and VXLAN ports, the API socket and the pid file; the bridge
//! stays, because attached containers hang on it.

mod control;
mod ipam_store;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use mesh::{Identity, PeerName};
use tokio::sync::{mpsc, watch};

use crate::cli::{LaunchArgs, Paths};
use crate::dataplane::forwarding::ForwardingTable;
use crate::dataplane::sleeve::{self, Counters};
use crate::dataplane::{tap, vxlan};
use crate::kernel::firewall::BridgeRules;
use crate::kernel::netlink::Netlink;
use crate::kernel::nft::VxlanCounters;

/// Longest bridge name we accept, so that the TAP's name (`BRIDGE-tap`) fits Linux's 15 characters.
const BRIDGE_NAME_MAX: usize = 11;

/// Checks that need no side effects, so that `launch` fails before it forks.
pub(crate) fn check_launch_preconditions(args: &LaunchArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "meshctl launch needs root (it creates the bridge {:?} and a TAP device); run it with sudo",
            args.bridge
        );
    }
    if args.bridge.is_empty()
        || args.bridge.len() > BRIDGE_NAME_MAX
        || !args
            .bridge
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!(
            "bad --bridge {:?}: use 1 to {BRIDGE_NAME_MAX} letters, digits, '-' or '_'",
            args.bridge
        );
    }
    if args.port > u16::MAX - 2 {
        bail!(
            "--port must leave room for the sleeve (PORT+1) and VXLAN (PORT+2) ports; \
             choose a port below 65534"
        );
    }
    if let Some(p) = &args.password {
        if p.is_empty() {
            bail!("--password is empty; give a password or leave the flag out to run unencrypted");
        }
    }
    ipam_config(args)?;
    if let Err(e) = crate::dns::Service::new(&args.dns_domain, false, None).qualify("x") {
        bail!("bad --dns-domain {:?}: {e}", args.dns_domain);
    }
    Ok(())
}

/// Runs the router in this process until stopped.
pub(crate) fn run_foreground(args: LaunchArgs, paths: Paths) -> Result<ExitCode> {
    check_launch_preconditions(&args)?;
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start async runtime")?;
    runtime.block_on(run(args, paths))?;
    Ok(ExitCode::SUCCESS)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MESHCTL_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,netlink_packet_route=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(args: LaunchArgs, paths: Paths) -> Result<()> {
    std::fs::create_dir_all(&paths.state_dir)
        .with_context(|| format!("create state directory {}", paths.state_dir.display()))?;
    let identity = load_or_create_identity(&paths.state_dir)?;
    let ipam = ipam_config(&args)?;
    let (ipam_store, ipam_restored) = ipam_store::Store::open(&paths.state_dir)?;
    let mut targets = resolve_peers(&args.peers).await?;
    if args.resume {
        for addr in control::load_targets(&paths.state_dir)? {
            if !targets.contains(&addr) {
                targets.push(addr);
            }
        }
    }
    let nickname = args.nickname.clone().unwrap_or_else(hostname);
    let sealed = args.password.is_some();

    let control_addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, args.port));
    let data_addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, args.port + 1));
    let endpoint = crate::transport::quic::endpoint(control_addr, identity.pkcs8())?;
    let data_socket = std::net::UdpSocket::bind(data_addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "UDP port {} (sleeve) is already in use; stop the other router or choose another --port",
                data_addr.port()
            )
        } else {
            anyhow::Error::new(e).context(format!("bind sleeve socket {data_addr}"))
        }
    })?;

    let netlink = Arc::new(Netlink::open().context("open netlink")?);
    let bridge_index = netlink.ensure_bridge(&args.bridge, args.mtu).await?;
    let tap_name = format!("{}-tap", args.bridge);
    let tap = tap::open_tap(&tap_name, args.mtu)?;
    netlink
        .enslave(&tap_name, bridge_index, true)
        .await
        .with_context(|| format!("add TAP {tap_name} to bridge {}", args.bridge))?;

    let vxlan_port = args.port + 2;
    let device = if args.no_fastpath {
        // A device left behind by an earlier run without the flag would still take frames.
        netlink.delete_link(&format!("{}-vx", args.bridge)).await?;
        None
    } else {
        Some(
            vxlan::setup(&netlink, &args.bridge, bridge_index, vxlan_port, args.mtu)
                .await
                .with_context(|| {
                    format!(
                        "set up the VXLAN fast path on UDP {vxlan_port} \
                         (use --no-fastpath to run without it)"
                    )
                })?,
        )
    };

    let counters = Arc::new(Counters::default());
    let empty = Arc::new(ForwardingTable::empty(identity.name(), sealed));
    // control loop -> FDB reconciler -> sleeve: the sleeve sees a table only once the kernel's
    // flood entries match it, and says when it works with it (`live`), after which the
    // reconciler resets the bridge's learned MACs.
    let (table_tx, control_rx) = watch::channel(empty.clone());
    let (sleeve_tx, table_rx) = watch::channel(empty.clone());
    let (live_tx, live_rx) = watch::channel(empty);
    let reconciler = tokio::spawn(vxlan::run_reconciler(
        netlink.clone(),
        device.clone(),
        tap_name.clone(),
        control_rx,
        sleeve_tx,
        live_rx,
    ));
    let dataplane = tokio::spawn(sleeve::run(
        tap,
        data_socket,
        args.udp_offload,
        table_rx,
        live_tx,
        counters.clone(),
    ));
    let (fastpath, prober) = match &device {
        None => (None, None),
        Some(device) => {
            let (probes_tx, probes_rx) = mpsc::unbounded_channel();
            let (events_tx, events_rx) = mpsc::unbounded_channel();
            let prober = tokio::spawn(async move {
                if let Err(e) = vxlan::run_prober(probes_rx, events_tx).await {
                    tracing::warn!("vxlan prober stopped, peers stay on sleeve: {e:#}");
                }
            });
            let fastpath = control::FastPath {
                device: device.clone(),
                probes: probes_tx,
                events: events_rx,
            };
            (Some(fastpath), Some(prober))
        }
    };

    let bridge_addrs: Vec<std::net::IpAddr> = netlink
        .addresses(&args.bridge)
        .await
        .with_context(|| format!("read addresses of bridge {}", args.bridge))?
        .into_iter()
        .map(|(a, _)| a)
        .filter(|a| !is_link_local(a))
        .collect();
    let dns = Arc::new(crate::dns::Service::new(
        &args.dns_domain,
        !args.no_dns,
        crate::dns::host_upstream(&bridge_addrs),
    ));
    // An address exposed by an earlier run is still on the bridge: answer there again.
    for addr in &bridge_addrs {
        if let Err(e) = dns.listen(*addr).await {
            tracing::warn!("no name server on {addr}: {e:#}");
        }
    }

    let socket_path = paths.socket.clone();
    let listener = bind_api_socket(&socket_path)?;
    let socket_inode = file_inode(&socket_path);
    let (calls_tx, calls_rx) = mpsc::channel(64);
    // A table left by a launch that failed after this point is harmless (it only counts) and
    // replaced by the next launch.
    let vxlan_counters = Arc::new(match &device {
        None => VxlanCounters::disabled(),
        Some(_) => {
            let bridge = args.bridge.clone();
            tokio::task::spawn_blocking(move || VxlanCounters::install(&bridge, vxlan_port))
                .await
                .context("install VXLAN counters")?
        }
    });
    let metrics = if args.no_metrics {
        None
    } else {
        match tokio::net::TcpListener::bind(args.metrics_addr).await {
            Ok(l) => Some(tokio::spawn(crate::metrics::serve(
                l,
                calls_tx.clone(),
                vxlan_counters.clone(),
            ))),
            Err(e) => {
                tracing::warn!(
                    "serving no metrics: cannot listen on {} ({e}); choose another --metrics-addr or --no-metrics",
                    args.metrics_addr
                );
                None
            }
        }
    };
    let containers = crate::plugin::containers::Registry::open(&paths.state_dir);
    let watcher = tokio::spawn(crate::plugin::containers::watch(
        containers.clone(),
        netlink.clone(),
        calls_tx.clone(),
    ));
    let docker_plugin = start_docker_plugin(
        &args,
        crate::plugin::docker::Settings {
            calls: calls_tx.clone(),
            netlink: netlink.clone(),
            bridge: args.bridge.clone(),
            mtu: args.mtu,
            default_pool: ipam.universe,
            state_dir: paths.state_dir.clone(),
            registry: containers.clone(),
        },
    )?;
    let api = tokio::spawn(crate::api::server::serve(
        listener,
        crate::api::server::ApiState {
            calls: calls_tx,
            netlink: netlink.clone(),
            bridge: args.bridge.clone(),
            mtu: args.mtu,
            dns: dns.clone(),
            containers,
            vxlan_counters: vxlan_counters.clone(),
        },
    ));
    let pid_path = paths.state_dir.join("meshctl.pid");
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .with_context(|| format!("write pid file {}", pid_path.display()))?;

    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    tracing::info!(
        name = %identity.name(), %nickname, port = args.port, bridge = %args.bridge,
        encryption = sealed, fastpath = device.is_some(), "router ready"
    );
    let control = control::Control::new(control::Settings {
        identity,
        nickname,
        password: args.password.clone(),
        cipher: args.cipher,
        epoch_shift: args.sleeve_rekey_shift,
        discovery: !args.no_discovery,
        conn_limit: usize::from(args.conn_limit),
        state_dir: paths.state_dir.clone(),
        port: args.port,
        bridge: args.bridge.clone(),
        mtu: args.mtu,
        incarnation,
        endpoint,
        table: table_tx,
        counters,
        fastpath,
        trusted_subnets: args.trusted_subnets.clone(),
        ipam,
        ipam_store: Some(ipam_store),
        ipam_restored,
        dns,
    })?;
    // Last fallible step done: from here on, cleanup below removes what we add.
    let bridge_for_rules = args.bridge.clone();
    let mut firewall = tokio::task::spawn_blocking(move || BridgeRules::install(&bridge_for_rules))
        .await
        .context("install firewall rules")?;
    let outcome = control.run(targets, calls_rx).await;

    api.abort();
    watcher.abort();
    let mut problems = Vec::new();
    if let Some((socket, task)) = docker_plugin {
        task.abort();
        if let Err(e) = socket.remove() {
            problems.push(e);
        }
    }
    if let Some(m) = metrics {
        m.abort();
    }
    dataplane.abort();
    reconciler.abort();
    if let Some(prober) = prober {
        prober.abort();
    }
    problems.extend(firewall.remove());
    problems.extend(vxlan_counters.remove());
    if let Err(e) = netlink.delete_link(&tap_name).await {
        problems.push(format!("remove TAP {tap_name}: {e:#}"));
    }
    if let Some(device) = &device {
        if let Err(e) = netlink.delete_link(&device.name).await {
            problems.push(format!("remove VXLAN {}: {e:#}", device.name));
        }
    }
    // Only files that are still ours: a router launched while this one was cleaning up has
    // bound a socket and written a pid file of its own under the same names.
    let ours_pid = std::fs::read_to_string(&pid_path)
        .is_ok_and(|t| t.trim() == std::process::id().to_string());
    let ours_socket = socket_inode.is_some() && file_inode(&socket_path) == socket_inode;
    for (path, ours) in [(&socket_path, ours_socket), (&pid_path, ours_pid)] {
        if !ours {
            continue;
        }
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                problems.push(format!("remove {}: {e}", path.display()));
            }
        }
    }
    for p in &problems {
        tracing::warn!("cleanup: {p}");
    }
    tracing::info!("router stopped");
    outcome
}

/// Serves Docker's network and IPAM plugin: on `--docker-plugin PATH` (failing the launch if it
/// can't), or by default on `/run/docker/plugins/meshnet.sock` when Docker is installed and this
/// router shares the engine's network namespace (skipped with a warning if that socket is taken).
fn start_docker_plugin(
    args: &LaunchArgs,
    settings: crate::plugin::docker::Settings,
) -> Result<Option<(crate::plugin::docker::Socket, tokio::task::JoinHandle<()>)>> {
    use crate::plugin::docker;
    let (path, explicit) = match &args.docker_plugin {
        _ if args.no_docker_plugin => return Ok(None),
        Some(path) => (path.clone(), true),
        None if Path::new("/run/docker").is_dir() && docker::in_host_netns() => {
            (std::path::PathBuf::from(docker::SOCKET_DEFAULT), false)
        }
        None => return Ok(None),
    };
    let started = docker::Plugin::new(settings)
        .map_err(anyhow::Error::msg)
        .and_then(|plugin| Ok((plugin, docker::Socket::bind(&path)?)));
    let (plugin, (socket, listener)) = match started {
        Ok(s) => s,
        Err(e) if explicit => return Err(e.context("serve the Docker plugin (--docker-plugin)")),
        Err(e) => {
            tracing::warn!("not serving the Docker plugin: {e:#} (choose another --docker-plugin PATH, or --no-docker-plugin)");
            return Ok(None);
        }
    };
    let driver = socket.driver_name();
    tracing::info!(
        "serving the Docker network and IPAM driver {driver:?} on {}",
        path.display()
    );
    let task = tokio::spawn(async move {
        if let Err(e) = docker::serve(listener, std::sync::Arc::new(plugin)).await {
            tracing::warn!("docker plugin {driver}: {e}");
        }
    });
    Ok(Some((socket, task)))
}

/// The file in the state directory that holds the router's key pair, hence its peer name.
pub(crate) const IDENTITY_FILE: &str = "identity.pk8";

/// Loads the identity from `DIR/identity.pk8`, creating it (mode 0600) on first start.
fn load_or_create_identity(dir: &Path) -> Result<Identity> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Identity::from_pkcs8(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "the identity file {} is damaged ({e}); move it away to make a new identity",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let rng = ring::rand::SystemRandom::new();
            let (identity, pkcs8) =
                Identity::generate(&rng).map_err(|e| anyhow::anyhow!("generate identity: {e}"))?;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let tmp = dir.join("identity.pk8.tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("create {}", tmp.display()))?;
            f.write_all(&pkcs8)
                .and_then(|_| f.sync_all())
                .with_context(|| format!("write {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| format!("install {}", path.display()))?;
            Ok(identity)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("read {}", path.display()))),
    }
}

/// The inode of the file at `path`, to tell our own socket from a newer router's.
fn file_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Binds the API socket, replacing a stale file that nothing answers on.
fn bind_api_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if crate::api::client::router_answers(path) {
            bail!(
                "a router is already running with API socket {}; stop it with `meshctl stop` first",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))
}

/// Resolves HOST[:PORT] strings to socket addresses (IPv4 preferred, as the control socket is IPv4).
pub(crate) async fn resolve_peers(specs: &[String]) -> Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    for spec in specs {
        let (host, port) = crate::cli::split_host_port(spec)?;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("resolve peer {spec:?}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .with_context(|| format!("peer {spec:?} has no address"))?;
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

fn is_link_local(addr: &std::net::IpAddr) -> bool {
    match addr {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "meshctl".to_string())
}

/// The IPAM settings from `--ipalloc-range`, `--ipalloc-init` and `--ipalloc-reclaim-after`.
pub(crate) fn ipam_config(args: &LaunchArgs) -> Result<mesh::ipam::IpamConfig> {
    use mesh::ipam::{Cidr, Init, IpamConfig};
    let universe: Cidr = args.ipalloc_range.parse().map_err(|e| {
        anyhow::anyhow!(
            "bad --ipalloc-range {:?}: {e}; give a CIDR such as 10.32.0.0/12",
            args.ipalloc_range
        )
    })?;
    let init = match args.ipalloc_init.as_deref() {
        None => Init::Consensus(args.peers.len() + 1),
        Some("observer") => Init::Observer,
        Some(s) if s.starts_with("consensus=") => {
            let n = &s["consensus=".len()..];
            match n.parse::<usize>() {
                Ok(n) if n >= 1 => Init::Consensus(n),
                _ => bail!(
                    "bad --ipalloc-init {s:?}: N in consensus=N must be the number of initial \
                     peers (1 or more)"
                ),
            }
        }
        Some(s) if s.starts_with("seed=") => {
            let mut peers = Vec::new();
            for p in s["seed=".len()..].split(',').filter(|p| !p.is_empty()) {
                peers.push(p.parse::<PeerName>().map_err(|e| {
                    anyhow::anyhow!(
                        "bad --ipalloc-init {s:?}: {p:?} is not a peer name ({e}); use the names \
                         `meshctl status` shows"
                    )
                })?);
            }
            if peers.is_empty() {
                bail!("bad --ipalloc-init {s:?}: list at least one peer name after seed=");
            }
            Init::Seed(peers)
        }
        Some(s) => bail!("bad --ipalloc-init {s:?}: use consensus=N, seed=PEER,... or observer"),
    };
    Ok(IpamConfig {
        universe,
        init,
        reclaim_after: args.ipalloc_reclaim_after.0,
        ..IpamConfig::default()
    })
}

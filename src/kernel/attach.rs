//! Attaching a container's network namespace to the bridge with a veth pair.
//!
//! [`attach`] creates the pair in the daemon's namespace, puts the host end on the bridge and
//! moves the other end into the container, where it is renamed (usually to `eth0`), addressed and
//! brought up. [`detach`] deletes the host end, which removes both ends.
//!
//! Not here: choosing addresses (IPAM), routes inside the container, and the bridge itself
//! (`Netlink::ensure_bridge`). CNI, which runs as a short-lived process, may call this too.
//!
//! Invariants: the host end's name is a function of (namespace inode, container ifname), so
//! detach needs no stored state; netlink work inside the container runs on a std thread joined
//! to its namespace, never on a runtime thread; a failed attach leaves nothing behind (unless the
//! future is dropped midway).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::kernel::netlink::Netlink;
use crate::kernel::netns;

/// What to attach: a namespace and how its interface should look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachSpec {
    /// Path of the container's network namespace file (see [`netns::resolve`]).
    pub netns: PathBuf,
    /// Interface name inside the container, usually "eth0".
    pub ifname: String,
    /// Addresses with prefix lengths to put on `ifname`.
    pub addrs: Vec<(IpAddr, u8)>,
    /// MTU of both veth ends.
    pub mtu: u32,
}

/// The result of a successful [`attach`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// Name of the veth end on the bridge, in the daemon's namespace.
    pub host_ifname: String,
    /// Hardware address of the container's interface.
    pub mac: [u8; 6],
    /// Interface name inside the container.
    pub ifname: String,
}

/// Creates a veth pair; the host end named [`host_ifname`] joins `bridge` (not isolated) and
/// goes up; the other end moves into `spec.netns`, is renamed to `spec.ifname`, gets mtu and
/// addresses, goes up (and lo goes up). On any failure it removes what it created. Error if
/// `spec.ifname` already exists in that namespace.
pub async fn attach(nl: &Netlink, bridge: &str, spec: &AttachSpec) -> anyhow::Result<Attached> {
    let shown = spec.netns.display().to_string();
    let host = host_ifname(&spec.netns, &spec.ifname);
    // Same hash, other prefix: the container end's name while it is still in our namespace.
    let temp = format!("mp{}", &host[2..]);
    let bridge_index = nl
        .link_index(bridge)
        .await?
        .with_context(|| format!("attach {shown}: bridge {bridge} does not exist"))?;

    let ifname = spec.ifname.clone();
    let taken = in_netns(&spec.netns, move |nl| async move {
        Ok(nl.link_index(&ifname).await?.is_some())
    })
    .await
    .with_context(|| format!("attach {shown}: look for {}", spec.ifname))?;
    if taken {
        bail!(
            "attach {shown}: {} already exists in that netns",
            spec.ifname
        );
    }

    // Leftovers of an attach that died midway carry the same names; they are ours to remove.
    nl.delete_link(&host).await?;
    nl.delete_link(&temp).await?;
    nl.add_veth(&host, &temp)
        .await
        .with_context(|| format!("attach {shown}"))?;
    match configure(nl, bridge_index, spec, &host, &temp).await {
        Ok(mac) => Ok(Attached {
            host_ifname: host,
            mac,
            ifname: spec.ifname.clone(),
        }),
        Err(e) => {
            if let Err(cleanup) = nl.delete_link(&host).await {
                tracing::warn!("attach {shown}: clean up veth {host}: {cleanup:#}");
            }
            Err(e.context(format!("attach {shown} as {}", spec.ifname)))
        }
    }
}

/// Puts the fresh pair in place; returns the container end's MAC.
async fn configure(
    nl: &Netlink,
    bridge_index: u32,
    spec: &AttachSpec,
    host: &str,
    temp: &str,
) -> anyhow::Result<[u8; 6]> {
    nl.set_mtu(host, spec.mtu).await?;
    nl.enslave(host, bridge_index, false).await?;
    let netns =
        File::open(&spec.netns).with_context(|| format!("open netns {}", spec.netns.display()))?;
    nl.move_to_netns(temp, netns.as_fd()).await?;
    drop(netns);

    let (temp, spec) = (temp.to_owned(), spec.clone());
    in_netns(&spec.netns.clone(), move |nl| async move {
        nl.rename(&temp, &spec.ifname).await?;
        nl.set_mtu(&spec.ifname, spec.mtu).await?;
        for &(addr, prefix) in &spec.addrs {
            nl.add_address(&spec.ifname, addr, prefix).await?;
        }
        nl.set_up(&spec.ifname).await?;
        nl.set_up("lo").await?;
        nl.link_mac(&spec.ifname)
            .await?
            .with_context(|| format!("read mac of {}", spec.ifname))
    })
    .await
}

/// Deletes the veth (deleting the host end removes both). Idempotent.
pub async fn detach(nl: &Netlink, netns: &Path, ifname: &str) -> anyhow::Result<()> {
    let host = host_ifname(netns, ifname);
    nl.delete_link(&host)
        .await
        .with_context(|| format!("detach {} {ifname}", netns.display()))
}

/// Deterministic, at most 15 chars: "mc" + 8 hex digits of a hash of (the namespace's inode, or
/// its path if it cannot be read, and `ifname`). The inode makes "NAME", PID and path forms of the
/// same namespace agree.
pub fn host_ifname(netns: &Path, ifname: &str) -> String {
    let mut hash = Fnv1a::default();
    match std::fs::metadata(netns) {
        Ok(meta) => {
            hash.write(&meta.dev().to_le_bytes());
            hash.write(&meta.ino().to_le_bytes());
        }
        Err(_) => hash.write(netns.as_os_str().as_bytes()),
    }
    hash.write(&[0]);
    hash.write(ifname.as_bytes());
    let folded = (hash.0 ^ (hash.0 >> 32)) as u32;
    format!("mc{folded:08x}")
}

/// 64-bit FNV-1a: stable across Rust releases, unlike `DefaultHasher`.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// [`netns::block_on_in`] without blocking a runtime thread.
async fn in_netns<T, F, Fut>(netns: &Path, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let netns = netns.to_owned();
    tokio::task::spawn_blocking(move || netns::block_on_in(&netns, f))
        .await
        .context("join netns thread")?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netns::testing::{ip, TestNetns};

    fn spec(ns: &TestNetns, addr: &str, mtu: u32) -> AttachSpec {
        AttachSpec {
            netns: ns.path().to_owned(),
            ifname: "eth0".to_owned(),
            addrs: vec![(addr.parse().unwrap(), 24)],
            mtu,
        }
    }

    fn attach_in(host: &TestNetns, spec: AttachSpec) -> anyhow::Result<Attached> {
        host.try_block_on(move |nl| async move {
            nl.ensure_bridge("br-t", 1500).await?;
            attach(&nl, "br-t", &spec).await
        })
    }

    fn assert_no_veth_left(host: &TestNetns, container: &TestNetns) {
        let name = host_ifname(container.path(), "eth0");
        let temp = format!("mp{}", &name[2..]);
        let links = ip(&["-n", host.name(), "link", "show"]);
        assert!(!links.contains(&name) && !links.contains(&temp), "{links}");
    }

    fn mac_text(mac: [u8; 6]) -> String {
        mac.map(|b| format!("{b:02x}")).join(":")
    }

    #[test]
    fn attach_configures_both_ends() {
        let (Some(host), Some(c1)) = (TestNetns::new(), TestNetns::new()) else {
            return;
        };
        let attached = attach_in(&host, spec(&c1, "10.40.0.1", 1376)).unwrap();
        assert_eq!(attached.host_ifname, host_ifname(c1.path(), "eth0"));
        assert_eq!(attached.ifname, "eth0");

        let eth0 = ip(&["-n", c1.name(), "addr", "show", "eth0"]);
        assert!(eth0.contains("inet 10.40.0.1/24"), "{eth0}");
        assert!(eth0.contains("mtu 1376"), "{eth0}");
        assert!(eth0.contains(",UP"), "{eth0}");
        assert!(eth0.contains(&mac_text(attached.mac)), "{eth0}");
        let lo = ip(&["-n", c1.name(), "link", "show", "lo"]);
        assert!(lo.contains(",UP"), "{lo}");

        let port = ip(&[
            "-n",
            host.name(),
            "-d",
            "link",
            "show",
            &attached.host_ifname,
        ]);
        assert!(port.contains("master br-t"), "{port}");
        assert!(port.contains("isolated off"), "{port}");
        assert!(port.contains("mtu 1376"), "{port}");
    }

    #[test]
    fn attach_refuses_an_existing_ifname_and_leaves_nothing() {
        let (Some(host), Some(c1)) = (TestNetns::new(), TestNetns::new()) else {
            return;
        };
        ip(&[
            "-n",
            c1.name(),
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0-p",
        ]);
        let err = format!(
            "{:#}",
            attach_in(&host, spec(&c1, "10.40.0.1", 1500)).unwrap_err()
        );
        assert!(err.contains("eth0 already exists"), "{err}");
        assert_no_veth_left(&host, &c1);
    }

    #[test]
    fn failed_attach_removes_the_veth() {
        let (Some(host), Some(c1)) = (TestNetns::new(), TestNetns::new()) else {
            return;
        };
        let mut bad = spec(&c1, "10.40.0.1", 1500);
        bad.addrs = vec![("10.40.0.1".parse().unwrap(), 40)]; // the kernel refuses /40 for IPv4
        assert!(attach_in(&host, bad).is_err());
        assert_no_veth_left(&host, &c1);
        let inside = ip(&["-n", c1.name(), "link", "show"]);
        assert!(!inside.contains("eth0"), "{inside}");
    }

    #[test]
    fn two_attached_namespaces_ping_across_the_bridge() {
        if std::process::Command::new("ping")
            .arg("-V")
            .output()
            .is_err()
        {
            eprintln!("skipped: ping is not installed");
            return;
        }
        let (Some(host), Some(c1), Some(c2)) =
            (TestNetns::new(), TestNetns::new(), TestNetns::new())
        else {
            return;
        };
        attach_in(&host, spec(&c1, "10.40.0.1", 1500)).unwrap();
        attach_in(&host, spec(&c2, "10.40.0.2", 1500)).unwrap();
        // -w bounds the whole run; a fresh bridge port may need a moment to forward.
        ip(&[
            "netns",
            "exec",
            c1.name(),
            "ping",
            "-c",
            "1",
            "-w",
            "5",
            "10.40.0.2",
        ]);
    }

    #[test]
    fn detach_removes_both_ends_and_is_idempotent() {
        let (Some(host), Some(c1)) = (TestNetns::new(), TestNetns::new()) else {
            return;
        };
        let attached = attach_in(&host, spec(&c1, "10.40.0.1", 1500)).unwrap();
        let path = c1.path().to_owned();
        host.block_on(move |nl| async move {
            detach(&nl, &path, "eth0").await?;
            detach(&nl, &path, "eth0").await
        });
        let links = ip(&["-n", host.name(), "link", "show"]);
        assert!(!links.contains(&attached.host_ifname), "{links}");
        let inside = ip(&["-n", c1.name(), "link", "show"]);
        assert!(!inside.contains("eth0"), "{inside}");
    }

    #[test]
    fn host_ifname_is_short_stable_and_form_independent() {
        let name = host_ifname(Path::new("/no/such/netns"), "eth0");
        assert_eq!(name, host_ifname(Path::new("/no/such/netns"), "eth0"));
        assert_ne!(name, host_ifname(Path::new("/no/such/netns"), "eth1"));
        assert!(name.len() <= 15 && name.starts_with("mc"), "{name}");

        let Some(ns) = TestNetns::new() else { return };
        let by_name = host_ifname(ns.path(), "eth0");
        let by_thread = netns::run_in(ns.path(), || {
            host_ifname(Path::new("/proc/thread-self/ns/net"), "eth0")
        })
        .unwrap();
        assert_eq!(by_name, by_thread);
    }
}

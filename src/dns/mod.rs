//! The embedded name server for container names (issue 7): `wire` parses queries and emits answers,
//! `server` answers for the mesh's domain from a zone snapshot and forwards other names upstream,
//! and [`Service`] (here) ties them to the daemon.
//!
//! The records themselves are `mesh::dns::Records`, gossiped by the router. The control loop owns
//! them and publishes a [`server::Zone`] snapshot through [`Service::publish`] whenever they change;
//! the servers read the snapshot and never wait on the control loop.
//!
//! Where it listens: UDP and TCP port 53 on each address of the mesh bridge (what `meshctl expose`
//! adds), so containers reach it on their own subnet and nothing listens on the host's other
//! interfaces. The API's expose and hide handlers start and stop the listeners.
//!
//! Not here: which names exist (the router), registering names on attach (the API).

pub(crate) mod server;
pub(crate) mod wire;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use server::{DnsCounters, Resolver, Zone};

/// The default domain of container names (`--dns-domain`).
pub(crate) const DOMAIN_DEFAULT: &str = "meshctl.local";
/// The port we answer on.
const PORT: u16 = 53;

/// The name service of one router: zone snapshot, counters and listeners.
pub(crate) struct Service {
    domain: String,
    /// False with `--no-dns`: names are still gossiped and looked up, but nothing listens.
    enabled: bool,
    zone: watch::Sender<Arc<Zone>>,
    resolver: Resolver,
    /// Per bridge address: the UDP and TCP server tasks.
    listeners: Mutex<BTreeMap<IpAddr, [JoinHandle<()>; 2]>>,
}

impl Service {
    /// A service for `domain` that forwards other names to `upstream`.
    pub(crate) fn new(domain: &str, enabled: bool, upstream: Option<SocketAddr>) -> Service {
        let domain = mesh::dns::normalize(domain);
        let (zone, rx) = watch::channel(Arc::new(Zone {
            domain: domain.clone(),
            names: BTreeMap::new(),
        }));
        Service {
            domain,
            enabled,
            zone,
            resolver: Resolver {
                zone: rx,
                upstream,
                counters: Arc::new(DnsCounters::default()),
            },
            listeners: Mutex::new(BTreeMap::new()),
        }
    }

    /// The domain we answer for, lowercased without the trailing dot.
    pub(crate) fn domain(&self) -> &str {
        &self.domain
    }

    /// Where other names go.
    pub(crate) fn upstream(&self) -> Option<SocketAddr> {
        self.resolver.upstream
    }

    /// The counters, for status and metrics.
    pub(crate) fn counters(&self) -> &DnsCounters {
        &self.resolver.counters
    }

    /// Replaces the zone with the live records (called by the control loop on change).
    pub(crate) fn publish(&self, records: &mesh::dns::Records) {
        let mut names: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for r in records.live() {
            names.entry(r.name.clone()).or_default().push(r.addr);
        }
        for addrs in names.values_mut() {
            addrs.sort();
        }
        let zone = Zone {
            domain: self.domain.clone(),
            names,
        };
        self.zone.send_replace(Arc::new(zone));
    }

    /// Addresses of `name` (qualified with our domain if it has none) in the current zone.
    pub(crate) fn lookup(&self, name: &str) -> Result<(String, Vec<IpAddr>), String> {
        let name = self.qualify(name)?;
        let addrs = self
            .resolver
            .zone
            .borrow()
            .names
            .get(&name)
            .cloned()
            .unwrap_or_default();
        Ok((name, addrs))
    }

    /// `web` -> `web.meshctl.local`; a name in our domain stays as it is. Refuses what is not
    /// a DNS name (RFC 1123 labels: letters, digits and '-', at most 63 bytes each).
    pub(crate) fn qualify(&self, name: &str) -> Result<String, String> {
        let name = mesh::dns::normalize(name);
        let full = if name == self.domain || name.ends_with(&format!(".{}", self.domain)) {
            name
        } else {
            format!("{name}.{}", self.domain)
        };
        let ok_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if full.len() > 253 || !full.split('.').all(ok_label) {
            return Err(format!(
                "{full:?} is not a DNS name: use letters, digits and '-' in dot-separated labels"
            ));
        }
        Ok(full)
    }

    /// Starts answering on `addr` port 53 (UDP and TCP), unless already listening there or
    /// disabled.
    pub(crate) async fn listen(&self, addr: IpAddr) -> anyhow::Result<()> {
        if !self.enabled
            || self
                .listeners
                .lock()
                .expect("invariant: listener map lock is never poisoned")
                .contains_key(&addr)
        {
            return Ok(());
        }
        let at = SocketAddr::new(addr, PORT);
        let udp = tokio::net::UdpSocket::bind(at)
            .await
            .with_context(|| format!("listen for DNS on UDP {at}"))?;
        let tcp = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("listen for DNS on TCP {at}"))?;
        let (r1, r2) = (self.resolver.clone(), self.resolver.clone());
        let tasks = [
            tokio::spawn(async move {
                if let Err(e) = server::serve(udp, r1).await {
                    tracing::warn!("DNS on UDP {at} stopped: {e}");
                }
            }),
            tokio::spawn(async move {
                if let Err(e) = server::serve_tcp(tcp, r2).await {
                    tracing::warn!("DNS on TCP {at} stopped: {e}");
                }
            }),
        ];
        tracing::info!(%at, domain = %self.domain, "answering DNS");
        let old = self
            .listeners
            .lock()
            .expect("invariant: listener map lock is never poisoned")
            .insert(addr, tasks);
        for task in old.into_iter().flatten() {
            task.abort();
        }
        Ok(())
    }

    /// Stops answering on `addr`.
    pub(crate) fn unlisten(&self, addr: IpAddr) {
        let old = self
            .listeners
            .lock()
            .expect("invariant: listener map lock is never poisoned")
            .remove(&addr);
        for task in old.into_iter().flatten() {
            task.abort();
        }
    }

    /// The addresses we answer on, sorted.
    pub(crate) fn listening(&self) -> Vec<IpAddr> {
        self.listeners
            .lock()
            .expect("invariant: listener map lock is never poisoned")
            .keys()
            .copied()
            .collect()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(map) = self.listeners.get_mut() {
            for task in map.values().flatten() {
                task.abort();
            }
        }
    }
}

/// The upstream resolver from the host's `/etc/resolv.conf`, skipping `ours`.
pub(crate) fn host_upstream(ours: &[IpAddr]) -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    server::upstream_from_resolv_conf(&text, ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_qualified_with_our_domain_and_checked() {
        let s = Service::new("Mesh.Example.", true, None);
        assert_eq!(s.domain(), "mesh.example");
        assert_eq!(s.qualify("web").unwrap(), "web.mesh.example");
        assert_eq!(s.qualify("WEB.mesh.example.").unwrap(), "web.mesh.example");
        assert_eq!(s.qualify("a.b").unwrap(), "a.b.mesh.example");
        assert!(s
            .qualify("bad_name")
            .unwrap_err()
            .contains("not a DNS name"));
        assert!(s.qualify("").is_err());
        assert!(s.qualify(&"x".repeat(64)).is_err());
    }
}

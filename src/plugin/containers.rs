//! The containers this router put on the mesh bridge, by `meshctl attach` or the Docker network
//! plugin: what `meshctl ps` lists, and the watcher that releases the address of an attached
//! container that died.
//!
//! Owns the list (keyed by the veth's host end) and its copy in `STATE_DIR/containers.json`, so a
//! restarted router still knows them. Not here: creating the veths (`kernel::attach`, the plugin's
//! handlers) and the addresses themselves (the control loop's IPAM).
//!
//! Invariants: an entry exists from a successful attach or Join until detach, Leave, or the
//! watcher seeing its host end gone; the file is rewritten whole (temp file, rename) on every change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::api::server::Call;
use crate::kernel::netlink::Netlink;

/// How often the watcher looks for vanished host ends.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// How a container came onto the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Via {
    /// `meshctl attach`: the router releases its address when it dies.
    Attach,
    /// The Docker network plugin: the engine releases it (Leave, ReleaseAddress).
    Plugin,
}

/// One container on the bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) via: Via,
    /// The name the user knows it by (netns name, PID, Docker name), or the Docker endpoint id.
    pub(crate) container: String,
    /// The IPAM key of its allocated addresses, if any were allocated.
    pub(crate) key: Option<String>,
    /// Docker network id (plugin entries).
    #[serde(default)]
    pub(crate) network: Option<String>,
    /// Interface inside the container (`eth0`), if known.
    pub(crate) ifname: String,
    pub(crate) mac: String,
    /// Addresses with prefix.
    pub(crate) ips: Vec<String>,
    /// Attached containers: the namespace file as given to attach, and its (device, inode) then.
    /// When that path stops naming the same namespace (the PID exited, `ip netns del`), the
    /// container is gone, even while the kernel still takes its time to free the namespace.
    #[serde(default)]
    pub(crate) netns: Option<(String, u64, u64)>,
    /// The DNS name registered for it on attach (qualified), removed when it is gone.
    #[serde(default)]
    pub(crate) dns_name: Option<String>,
}

impl Entry {
    /// Whether the namespace it was attached in is still there under the same path.
    fn netns_alive(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match &self.netns {
            None => true,
            Some((path, dev, ino)) => {
                std::fs::metadata(path).is_ok_and(|m| m.dev() == *dev && m.ino() == *ino)
            }
        }
    }
}

/// The list, shared by the API handlers, the plugin and the watcher (short critical sections;
/// nothing awaits while holding the lock).
#[derive(Debug)]
pub(crate) struct Registry {
    path: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl Registry {
    /// Loads `DIR/containers.json` (empty when missing or unreadable, with a warning).
    pub(crate) fn open(state_dir: &std::path::Path) -> Arc<Registry> {
        let path = state_dir.join("containers.json");
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("ignoring damaged {}: {e}", path.display());
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Arc::new(Registry {
            path,
            entries: Mutex::new(entries),
        })
    }

    /// Records (or replaces) the container whose veth host end is `host_ifname`.
    pub(crate) fn insert(&self, host_ifname: &str, entry: Entry) {
        let mut entries = self.lock();
        entries.insert(host_ifname.to_string(), entry);
        self.save(&entries);
    }

    /// Forgets it; returns what was recorded.
    pub(crate) fn remove(&self, host_ifname: &str) -> Option<Entry> {
        let mut entries = self.lock();
        let gone = entries.remove(host_ifname);
        if gone.is_some() {
            self.save(&entries);
        }
        gone
    }

    /// Everything, by host end name.
    pub(crate) fn list(&self) -> Vec<(String, Entry)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding it leaves a consistent map (every change is one insert/remove).
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, entries: &BTreeMap<String, Entry>) {
        let tmp = self.path.with_extension("json.tmp");
        let result = serde_json::to_vec_pretty(entries)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|_| std::fs::rename(&tmp, &self.path));
        if let Err(e) = result {
            tracing::warn!("save {}: {e}", self.path.display());
        }
    }
}

/// Releases the addresses of attached containers whose veth host end vanished (the container's
/// namespace died, taking its end of the pair and so ours). The IPAM keeps a released address
/// for its grace period, so a container attached again at once gets it back. Runs until dropped.
pub(crate) async fn watch(
    registry: Arc<Registry>,
    netlink: Arc<Netlink>,
    calls: mpsc::Sender<Call>,
) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tick.tick().await;
        for (host, entry) in registry.list() {
            if entry.via != Via::Attach {
                continue;
            }
            let why = match netlink.link_index(&host).await {
                Ok(Some(_)) if entry.netns_alive() => continue,
                Ok(Some(_)) => "its network namespace is gone",
                Ok(None) => "its veth vanished",
                Err(e) => {
                    tracing::debug!("look for {host}: {e:#}");
                    continue;
                }
            };
            registry.remove(&host);
            tracing::info!(container = %entry.container, "container is gone ({why}: {host})");
            // Its namespace may linger in the kernel for a while; the veth goes with it anyway.
            if let Err(e) = netlink.delete_link(&host).await {
                tracing::debug!("remove {host}: {e:#}");
            }
            if let Some(key) = entry.key {
                let (tx, rx) = oneshot::channel();
                if calls.send(Call::Release(key, tx)).await.is_err() {
                    return;
                }
                let _ = rx.await;
            }
            // Its name must not keep pointing at an address that may go to another container.
            if let Some(name) = entry.dns_name {
                let (reply, rx) = oneshot::channel();
                let call = Call::DnsRemove {
                    name,
                    addr: None,
                    reply,
                };
                if calls.send(call).await.is_err() {
                    return;
                }
                let _ = rx.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("meshctl-reg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let entry = Entry {
            via: Via::Attach,
            container: "c1".into(),
            key: Some("netns:1:2".into()),
            network: None,
            ifname: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            ips: vec!["10.32.0.1/12".into()],
            netns: Some(("/proc/self/ns/net".into(), 1, 2)),
            dns_name: Some("c1.meshctl.local".into()),
        };
        assert!(!entry.netns_alive(), "another namespace's inode matched");
        let r = Registry::open(&dir);
        r.insert("mc0000", entry.clone());
        let again = Registry::open(&dir);
        assert_eq!(again.list(), vec![("mc0000".to_string(), entry.clone())]);
        assert_eq!(again.remove("mc0000"), Some(entry));
        assert!(Registry::open(&dir).list().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! What the Docker plugin remembers across router restarts: networks, endpoints, and which IPAM key
//! holds each address it handed out. Kept in `STATE_DIR/docker-plugin.json`, rewritten whole on
//! every change (temp file, rename), so a restarted router can still answer Leave, DeleteEndpoint
//! and ReleaseAddress for containers that were started before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A Docker network of our driver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Network {
    /// The IPv4 pool (CIDR) the engine gave it.
    pub(crate) pool: String,
}

/// An endpoint: one container's interface on one network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Endpoint {
    pub(crate) network: String,
    /// IPv4 address with prefix.
    pub(crate) address: String,
    pub(crate) mac: String,
    /// The veth end on the bridge, once joined.
    pub(crate) host_ifname: Option<String>,
}

/// The whole persisted state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct State {
    pub(crate) networks: BTreeMap<String, Network>,
    pub(crate) endpoints: BTreeMap<String, Endpoint>,
    /// Pool id -> address (no prefix) -> the IPAM key that holds it.
    pub(crate) addresses: BTreeMap<String, BTreeMap<String, String>>,
}

impl State {
    /// The file's place in the state directory.
    pub(crate) fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("docker-plugin.json")
    }

    /// Loads it; a missing file is an empty state, a damaged one an error naming the file.
    pub(crate) fn load(path: &Path) -> Result<State, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "the Docker plugin state {} is damaged ({e}); move it away to start empty",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(format!("read {}: {e}", path.display())),
        }
    }

    /// Writes it atomically.
    pub(crate) fn save(&self, path: &Path) -> Result<(), String> {
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| format!("save {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_damaged_file_is_named() {
        let dir = std::env::temp_dir().join(format!("meshctl-dps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = State::path(&dir);
        assert_eq!(State::load(&path).unwrap(), State::default());
        let mut s = State::default();
        s.networks.insert(
            "n1".into(),
            Network {
                pool: "10.2.1.0/24".into(),
            },
        );
        s.addresses
            .entry("10.2.1.0/24".into())
            .or_default()
            .insert("10.2.1.1".into(), "docker-ipam:1".into());
        s.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), s);
        std::fs::write(&path, b"{").unwrap();
        assert!(State::load(&path).unwrap_err().contains("damaged"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

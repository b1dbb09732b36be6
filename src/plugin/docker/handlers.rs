//! What each Docker plugin request does. The network driver puts a veth on the mesh bridge for
//! each container (the engine moves the other end in, names and addresses it); the IPAM driver
//! hands out addresses from the mesh's IPAM through the control loop.
//!
//! Not here: the wire types (`proto.rs`), serving HTTP (`mod.rs`), the IPAM itself (control loop).
//!
//! Invariants: every change of the persisted state is saved before the answer; requests are
//! handled one at a time (the state lock is held across each), so the engine's retries and
//! concurrent calls see a consistent state; teardown requests (Leave, DeleteEndpoint,
//! DeleteNetwork, ReleaseAddress, ReleasePool) succeed for things already gone.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::proto::{self, *};
use super::state::{Endpoint, Network, State};
use crate::api::server::Call;
use crate::kernel::netlink::Netlink;
use crate::plugin::containers::{Entry, Registry, Via};

/// Address space name we report (the engine only passes it back).
const ADDRESS_SPACE: &str = "meshnet";
/// How long RequestAddress waits for the mesh IPAM (the engine's own timeout is longer).
const ALLOC_WAIT: Duration = Duration::from_secs(20);
/// The option that marks a gateway request.
const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
const GATEWAY: &str = "com.docker.network.gateway";

/// A failed request: the HTTP status and the message for `{"Err": ...}`.
#[derive(Debug)]
pub(crate) struct Failure(pub(crate) StatusCode, pub(crate) String);

fn bad(msg: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, msg.into())
}

fn failed(msg: impl Into<String>) -> Failure {
    Failure(StatusCode::INTERNAL_SERVER_ERROR, msg.into())
}

/// What the driver needs from the router.
pub(crate) struct Settings {
    pub(crate) calls: mpsc::Sender<Call>,
    pub(crate) netlink: Arc<Netlink>,
    pub(crate) bridge: String,
    pub(crate) mtu: u32,
    /// `--ipalloc-range`: the pool of networks created without `--subnet`.
    pub(crate) default_pool: mesh::ipam::Cidr,
    pub(crate) state_dir: PathBuf,
    pub(crate) registry: Arc<Registry>,
}

/// The network and IPAM driver.
pub(crate) struct Plugin {
    settings: Settings,
    path: PathBuf,
    state: Mutex<State>,
}

impl Plugin {
    /// Loads the persisted state (error if the file is damaged).
    pub(crate) fn new(settings: Settings) -> Result<Plugin, String> {
        let path = State::path(&settings.state_dir);
        let state = State::load(&path)?;
        Ok(Plugin {
            settings,
            path,
            state: Mutex::new(state),
        })
    }

    /// Handles one request: `method` is the path without its leading slash, e.g.
    /// `NetworkDriver.Join`.
    pub(crate) async fn handle(&self, method: &str, body: &[u8]) -> Result<Value, Failure> {
        let mut state = self.state.lock().await;
        let before = state.clone();
        let answer = self.dispatch(&mut state, method, body).await;
        if *state != before {
            state.save(&self.path).map_err(failed)?;
        }
        answer
    }

    async fn dispatch(
        &self,
        state: &mut State,
        method: &str,
        body: &[u8],
    ) -> Result<Value, Failure> {
        match method {
            "Plugin.Activate" => json(Activate {
                implements: vec!["NetworkDriver", "IpamDriver"],
            }),
            "NetworkDriver.GetCapabilities" => json(NetworkCapabilities {
                scope: "local",
                connectivity_scope: "global",
            }),
            "NetworkDriver.CreateNetwork" => {
                create_network(state, proto::parse(body).map_err(bad)?)
            }
            "NetworkDriver.DeleteNetwork" => {
                let r: NetworkRef = proto::parse(body).map_err(bad)?;
                state.networks.remove(&r.network_id);
                json(Empty {})
            }
            "NetworkDriver.CreateEndpoint" => {
                create_endpoint(state, proto::parse(body).map_err(bad)?)
            }
            "NetworkDriver.DeleteEndpoint" => {
                let r: EndpointRef = proto::parse(body).map_err(bad)?;
                if let Some(ep) = state.endpoints.remove(&r.endpoint_id) {
                    self.unplug(&ep).await?;
                }
                json(Empty {})
            }
            "NetworkDriver.EndpointOperInfo" => {
                let r: EndpointRef = proto::parse(body).map_err(bad)?;
                let ep = endpoint(state, &r.endpoint_id)?;
                let mut value = BTreeMap::new();
                value.insert("MacAddress".to_string(), ep.mac.clone());
                if let Some(host) = &ep.host_ifname {
                    value.insert("HostInterface".to_string(), host.clone());
                }
                json(EndpointInfo { value })
            }
            "NetworkDriver.Join" => self.join(state, proto::parse(body).map_err(bad)?).await,
            "NetworkDriver.Leave" => {
                let r: EndpointRef = proto::parse(body).map_err(bad)?;
                if let Some(ep) = state.endpoints.get_mut(&r.endpoint_id) {
                    let gone = ep.clone();
                    ep.host_ifname = None;
                    self.unplug(&gone).await?;
                }
                json(Empty {})
            }
            "NetworkDriver.DiscoverNew"
            | "NetworkDriver.DiscoverDelete"
            | "NetworkDriver.ProgramExternalConnectivity"
            | "NetworkDriver.RevokeExternalConnectivity"
            | "NetworkDriver.AllocateNetwork"
            | "NetworkDriver.FreeNetwork" => json(Empty {}),
            "IpamDriver.GetCapabilities" => json(IpamCapabilities {
                requires_mac_address: false,
                requires_request_replay: false,
            }),
            "IpamDriver.GetDefaultAddressSpaces" => json(AddressSpaces {
                local_default_address_space: ADDRESS_SPACE,
                global_default_address_space: ADDRESS_SPACE,
            }),
            "IpamDriver.RequestPool" => self.request_pool(proto::parse(body).map_err(bad)?),
            "IpamDriver.ReleasePool" => {
                let _: PoolRef = proto::parse(body).map_err(bad)?;
                json(Empty {})
            }
            "IpamDriver.RequestAddress" => {
                self.request_address(state, proto::parse(body).map_err(bad)?)
                    .await
            }
            "IpamDriver.ReleaseAddress" => {
                self.release_address(state, proto::parse(body).map_err(bad)?)
                    .await
            }
            other => Err(Failure(
                StatusCode::NOT_FOUND,
                format!("meshnet does not implement {other:?}"),
            )),
        }
    }

    async fn join(&self, state: &mut State, r: Join) -> Result<Value, Failure> {
        let ep = state.endpoints.get_mut(&r.endpoint_id).ok_or_else(|| {
            bad(format!(
                "Join: no endpoint {:?} (CreateEndpoint must come first)",
                r.endpoint_id
            ))
        })?;
        let nl = &self.settings.netlink;
        let tag = name_tag(&r.endpoint_id);
        let (host, peer) = (format!("mnh{tag}"), format!("mnc{tag}"));
        let bridge_index = nl
            .link_index(&self.settings.bridge)
            .await
            .map_err(|e| failed(format!("{e:#}")))?
            .ok_or_else(|| failed(format!("the mesh bridge {} is gone", self.settings.bridge)))?;
        // Leftovers of a Join that died midway carry the same names.
        let _ = nl.delete_link(&host).await;
        let _ = nl.delete_link(&peer).await;
        nl.add_veth(&host, &peer)
            .await
            .map_err(|e| failed(format!("Join: create veth {host}: {e:#}")))?;
        let plugged = async {
            nl.set_mtu(&host, self.settings.mtu).await?;
            nl.set_mtu(&peer, self.settings.mtu).await?;
            nl.enslave(&host, bridge_index, false).await?;
            nl.set_up(&host).await
        }
        .await;
        if let Err(e) = plugged {
            let _ = nl.delete_link(&host).await;
            return Err(failed(format!(
                "Join: put {host} on bridge {}: {e:#}",
                self.settings.bridge
            )));
        }
        ep.host_ifname = Some(host.clone());
        let short: String = r.endpoint_id.chars().take(12).collect();
        self.settings.registry.insert(
            &host,
            Entry {
                via: Via::Plugin,
                container: format!("endpoint {short}"),
                key: None,
                network: Some(ep.network.clone()),
                ifname: String::new(),
                mac: ep.mac.clone(),
                ips: vec![ep.address.clone()],
                netns: None,
                dns_name: None,
            },
        );
        json(JoinResponse {
            interface_name: InterfaceName {
                src_name: peer,
                dst_prefix: "eth".to_string(),
            },
            gateway: String::new(),
            disable_gateway_service: true,
        })
    }

    /// Removes an endpoint's veth (both ends) and its `ps` entry.
    async fn unplug(&self, ep: &Endpoint) -> Result<(), Failure> {
        if let Some(host) = &ep.host_ifname {
            self.settings.registry.remove(host);
            self.settings
                .netlink
                .delete_link(host)
                .await
                .map_err(|e| failed(format!("remove veth {host}: {e:#}")))?;
        }
        Ok(())
    }

    fn request_pool(&self, r: RequestPool) -> Result<Value, Failure> {
        if r.v6 {
            return Err(bad(
                "meshnet IPAM has no IPv6 pools; create the network without --ipv6",
            ));
        }
        if !r.sub_pool.is_empty() {
            return Err(bad(format!(
                "meshnet IPAM does not support --ip-range ({}); give only --subnet",
                r.sub_pool
            )));
        }
        let pool = if r.pool.is_empty() {
            self.settings.default_pool
        } else {
            r.pool.parse::<mesh::ipam::Cidr>().map_err(|e| {
                bad(format!(
                    "bad subnet {:?}: {e}; give an IPv4 CIDR such as 10.2.1.0/24",
                    r.pool
                ))
            })?
        };
        json(RequestPoolResponse {
            pool_id: pool.to_string(),
            pool: pool.to_string(),
            data: BTreeMap::new(),
        })
    }

    async fn request_address(
        &self,
        state: &mut State,
        r: AddressRequest,
    ) -> Result<Value, Failure> {
        let pool: mesh::ipam::Cidr = r
            .pool_id
            .parse()
            .map_err(|e| bad(format!("unknown pool {:?}: {e}", r.pool_id)))?;
        let kind = r.options.as_ref().and_then(|o| o.get(REQUEST_ADDRESS_TYPE));
        let what = if kind.map(String::as_str) == Some(GATEWAY) {
            "gateway"
        } else {
            "address"
        };
        if !r.address.is_empty() {
            return Err(bad(format!(
                "meshnet IPAM cannot reserve a chosen {what} ({}): the mesh allocates every \
                 address; leave out --ip/--gateway",
                r.address
            )));
        }
        let subnet = (pool != self.settings.default_pool).then_some(pool);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let key = format!("docker-{what}:{nanos:x}");
        let (tx, rx) = oneshot::channel();
        let call = Call::Allocate {
            key: key.clone(),
            subnet,
            wait: ALLOC_WAIT,
            reply: tx,
        };
        let gone = || failed("the router is shutting down");
        self.settings.calls.send(call).await.map_err(|_| gone())?;
        let (addr, prefix) = rx
            .await
            .map_err(|_| gone())?
            .map_err(|e| failed(format!("no {what} in {pool}: {e}")))?;
        state
            .addresses
            .entry(r.pool_id.clone())
            .or_default()
            .insert(addr.to_string(), key);
        json(RequestAddressResponse {
            address: format!("{addr}/{prefix}"),
            data: BTreeMap::new(),
        })
    }

    async fn release_address(
        &self,
        state: &mut State,
        r: AddressRequest,
    ) -> Result<Value, Failure> {
        let address = r.address.split('/').next().unwrap_or_default();
        let key = state
            .addresses
            .get_mut(&r.pool_id)
            .and_then(|pool| pool.remove(address));
        if state
            .addresses
            .get(&r.pool_id)
            .is_some_and(|p| p.is_empty())
        {
            state.addresses.remove(&r.pool_id);
        }
        if let Some(key) = key {
            let (tx, rx) = oneshot::channel();
            let gone = || failed("the router is shutting down");
            self.settings
                .calls
                .send(Call::Release(key, tx))
                .await
                .map_err(|_| gone())?;
            rx.await.map_err(|_| gone())?;
        }
        json(Empty {})
    }
}

fn create_network(state: &mut State, r: CreateNetwork) -> Result<Value, Failure> {
    if r.network_id.is_empty() {
        return Err(bad("CreateNetwork without a NetworkID"));
    }
    if r.ipv6_data.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(bad(
            "meshnet networks carry no IPv6 yet; create the network without --ipv6",
        ));
    }
    let pool = r
        .ipv4_data
        .unwrap_or_default()
        .into_iter()
        .next()
        .map(|d| d.pool)
        .unwrap_or_default();
    state.networks.insert(r.network_id, Network { pool });
    json(Empty {})
}

fn create_endpoint(state: &mut State, r: CreateEndpoint) -> Result<Value, Failure> {
    if !state.networks.contains_key(&r.network_id) {
        return Err(bad(format!(
            "CreateEndpoint: no meshnet network {:?}",
            r.network_id
        )));
    }
    if r.endpoint_id.is_empty() {
        return Err(bad("CreateEndpoint without an EndpointID"));
    }
    let iface = r.interface.unwrap_or_default();
    if iface.address.is_empty() {
        return Err(bad(format!(
            "CreateEndpoint: endpoint {} has no IPv4 address; create the network with an IPAM \
             driver that gives one (--ipam-driver meshnet)",
            r.endpoint_id
        )));
    }
    let chosen_mac = iface
        .mac_address
        .is_empty()
        .then(|| mac_for(&r.endpoint_id));
    let mac = chosen_mac.clone().unwrap_or(iface.mac_address);
    state.endpoints.insert(
        r.endpoint_id,
        Endpoint {
            network: r.network_id,
            address: iface.address,
            mac,
            host_ifname: None,
        },
    );
    json(CreateEndpointResponse {
        interface: chosen_mac.map(|mac_address| EndpointInterface {
            mac_address,
            ..EndpointInterface::default()
        }),
    })
}

fn endpoint<'a>(state: &'a State, id: &str) -> Result<&'a Endpoint, Failure> {
    state
        .endpoints
        .get(id)
        .ok_or_else(|| bad(format!("no endpoint {id:?}")))
}

fn json(v: impl Serialize) -> Result<Value, Failure> {
    serde_json::to_value(v).map_err(|e| failed(format!("encode answer: {e}")))
}

/// 64-bit FNV-1a of the endpoint id: stable names and MACs for the same endpoint.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// 12 hex digits naming the endpoint's veth ends (`mnh` + tag on the bridge, `mnc` + tag for the
/// container's end until the engine renames it): at most 15 characters.
fn name_tag(endpoint_id: &str) -> String {
    format!("{:012x}", fnv(endpoint_id) & 0xffff_ffff_ffff)
}

/// A locally administered unicast MAC derived from the endpoint id.
fn mac_for(endpoint_id: &str) -> String {
    let h = fnv(endpoint_id).to_be_bytes();
    let mac = [0x02 | (h[0] & 0xfc), h[1], h[2], h[3], h[4], h[5]];
    crate::api::server::format_mac(&mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_and_macs_are_local_unicast() {
        let tag = name_tag("f00d");
        assert_eq!(format!("mnh{tag}").len(), 15);
        assert_eq!(tag, name_tag("f00d"));
        let mac = mac_for("f00d");
        let first = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "{mac}");
    }

    #[test]
    fn endpoints_need_a_known_network_and_an_address() {
        let mut state = State::default();
        let err = create_endpoint(
            &mut state,
            CreateEndpoint {
                network_id: "n".into(),
                endpoint_id: "e".into(),
                interface: None,
            },
        )
        .unwrap_err();
        assert!(err.1.contains("no meshnet network"), "{}", err.1);
        create_network(
            &mut state,
            CreateNetwork {
                network_id: "n".into(),
                ..CreateNetwork::default()
            },
        )
        .unwrap();
        let err = create_endpoint(
            &mut state,
            CreateEndpoint {
                network_id: "n".into(),
                endpoint_id: "e".into(),
                interface: None,
            },
        )
        .unwrap_err();
        assert!(err.1.contains("no IPv4 address"), "{}", err.1);
        let answer = create_endpoint(
            &mut state,
            CreateEndpoint {
                network_id: "n".into(),
                endpoint_id: "e".into(),
                interface: Some(EndpointInterface {
                    address: "10.32.0.2/12".into(),
                    ..EndpointInterface::default()
                }),
            },
        )
        .unwrap();
        assert_eq!(answer["Interface"]["MacAddress"], mac_for("e"));
        assert!(answer["Interface"].get("Address").is_none());
    }
}

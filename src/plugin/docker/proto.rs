//! Wire types of Docker's plugin protocols, as the engine sends and expects them: the plugin
//! handshake (`Plugin.Activate`), the remote network driver (`NetworkDriver.*`) and the remote IPAM
//! driver (`IpamDriver.*`). Field names are Docker's (Go's exported names, PascalCase).
//!
//! Heads up: the protocols are described in moby's `libnetwork/docs/remote.md` and
//! `libnetwork/docs/ipam.md`; the engine ignores fields it does not know and sends fields we
//! ignore (`Options`), so every request type tolerates missing and unknown fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Content type of every answer.
pub(crate) const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// `Plugin.Activate` answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Activate {
    pub(crate) implements: Vec<&'static str>,
}

/// `NetworkDriver.GetCapabilities` answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NetworkCapabilities {
    /// `local`: the engine keeps networks per host (the mesh connects them).
    pub(crate) scope: &'static str,
    /// `global`: containers on other hosts are reachable.
    pub(crate) connectivity_scope: &'static str,
}

/// One address pool of a network, in `CreateNetwork`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct IpamData {
    pub(crate) address_space: String,
    /// The pool's CIDR.
    pub(crate) pool: String,
    /// Gateway with prefix, e.g. `10.32.0.1/12`.
    pub(crate) gateway: String,
}

/// `NetworkDriver.CreateNetwork`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub(crate) network_id: String,
    #[serde(rename = "IPv4Data")]
    pub(crate) ipv4_data: Option<Vec<IpamData>>,
    #[serde(rename = "IPv6Data")]
    pub(crate) ipv6_data: Option<Vec<IpamData>>,
}

/// `NetworkDriver.DeleteNetwork`, `AllocateNetwork` and `FreeNetwork`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct NetworkRef {
    #[serde(rename = "NetworkID")]
    pub(crate) network_id: String,
}

/// The interface of an endpoint, in `CreateEndpoint` requests and answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct EndpointInterface {
    /// IPv4 address with prefix.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) address: String,
    #[serde(rename = "AddressIPv6", skip_serializing_if = "String::is_empty")]
    pub(crate) address_ipv6: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) mac_address: String,
}

/// `NetworkDriver.CreateEndpoint`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    pub(crate) network_id: String,
    #[serde(rename = "EndpointID")]
    pub(crate) endpoint_id: String,
    pub(crate) interface: Option<EndpointInterface>,
}

/// `CreateEndpoint` answer: the interface fields the driver chose (only those the engine left
/// empty).
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CreateEndpointResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) interface: Option<EndpointInterface>,
}

/// `NetworkDriver.DeleteEndpoint`, `EndpointOperInfo`, `Leave`, `Program/RevokeExternalConnectivity`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct EndpointRef {
    #[serde(rename = "NetworkID")]
    pub(crate) network_id: String,
    #[serde(rename = "EndpointID")]
    pub(crate) endpoint_id: String,
}

/// `NetworkDriver.Join`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct Join {
    #[serde(rename = "NetworkID")]
    pub(crate) network_id: String,
    #[serde(rename = "EndpointID")]
    pub(crate) endpoint_id: String,
    /// The container's network namespace, e.g. `/var/run/docker/netns/1f0a...`.
    pub(crate) sandbox_key: String,
}

/// The interface the engine moves into the container.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct InterfaceName {
    /// Our end's name in the host namespace.
    pub(crate) src_name: String,
    /// The engine names it DstPrefix + number inside the container (`eth0`, `eth1`, ...).
    pub(crate) dst_prefix: String,
}

/// `Join` answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct JoinResponse {
    pub(crate) interface_name: InterfaceName,
    /// Empty: the mesh has no router to the outside.
    pub(crate) gateway: String,
    /// True: don't attach the container to `docker_gwbridge` for a default route either.
    pub(crate) disable_gateway_service: bool,
}

/// `EndpointOperInfo` answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct EndpointInfo {
    pub(crate) value: BTreeMap<String, String>,
}

/// `IpamDriver.GetCapabilities` answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct IpamCapabilities {
    #[serde(rename = "RequiresMACAddress")]
    pub(crate) requires_mac_address: bool,
    pub(crate) requires_request_replay: bool,
}

/// `IpamDriver.GetDefaultAddressSpaces` answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct AddressSpaces {
    pub(crate) local_default_address_space: &'static str,
    pub(crate) global_default_address_space: &'static str,
}

/// `IpamDriver.RequestPool`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct RequestPool {
    pub(crate) address_space: String,
    /// `--subnet`, or empty for the default.
    pub(crate) pool: String,
    /// `--ip-range`.
    pub(crate) sub_pool: String,
    /// The engine sends `null` when there are none.
    pub(crate) options: Option<BTreeMap<String, String>>,
    #[serde(rename = "V6")]
    pub(crate) v6: bool,
}

/// `RequestPool` answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RequestPoolResponse {
    #[serde(rename = "PoolID")]
    pub(crate) pool_id: String,
    /// CIDR.
    pub(crate) pool: String,
    pub(crate) data: BTreeMap<String, String>,
}

/// `IpamDriver.ReleasePool`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct PoolRef {
    #[serde(rename = "PoolID")]
    pub(crate) pool_id: String,
}

/// `IpamDriver.RequestAddress` and `ReleaseAddress`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct AddressRequest {
    #[serde(rename = "PoolID")]
    pub(crate) pool_id: String,
    /// A chosen address (`--ip`, `--gateway`), or empty.
    pub(crate) address: String,
    /// `RequestAddressType: com.docker.network.gateway` marks the network's gateway (`null` when
    /// there are none).
    pub(crate) options: Option<BTreeMap<String, String>>,
}

/// `RequestAddress` answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RequestAddressResponse {
    /// With prefix.
    pub(crate) address: String,
    pub(crate) data: BTreeMap<String, String>,
}

/// The empty success answer.
#[derive(Debug, Serialize)]
pub(crate) struct Empty {}

/// Every error answer: `{"Err": "..."}`.
#[derive(Debug, Serialize)]
pub(crate) struct ErrorAnswer {
    #[serde(rename = "Err")]
    pub(crate) err: String,
}

/// Parses a request body; the engine sends an empty body or `null` for requests without fields.
pub(crate) fn parse<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, String> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(trimmed).map_err(|e| format!("malformed request body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_docker_field_names_and_tolerate_empty_bodies() {
        let r: CreateEndpoint = parse(
            br#"{"NetworkID":"n1","EndpointID":"e1","Interface":{"Address":"10.32.0.2/12","AddressIPv6":"","MacAddress":""},"Options":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(r.network_id, "n1");
        assert_eq!(r.interface.unwrap().address, "10.32.0.2/12");
        let r: RequestPool = parse(b"").unwrap();
        assert!(r.pool.is_empty() && !r.v6);
        let r: RequestPool = parse(b"null").unwrap();
        assert!(r.pool.is_empty());
        let r: CreateNetwork = parse(
            br#"{"NetworkID":"n","IPv4Data":[{"AddressSpace":"meshnet","Pool":"10.2.1.0/24","Gateway":"10.2.1.1/24"}]}"#,
        )
        .unwrap();
        assert_eq!(r.ipv4_data.unwrap()[0].gateway, "10.2.1.1/24");
        let r: AddressRequest =
            parse(br#"{"PoolID":"10.32.0.0/12","Address":"","Options":null}"#).unwrap();
        assert!(r.options.is_none());
        assert!(parse::<Join>(b"{\"NetworkID\": 3}")
            .unwrap_err()
            .contains("malformed"));
    }

    #[test]
    fn answers_use_docker_field_names() {
        let j = serde_json::to_value(JoinResponse {
            interface_name: InterfaceName {
                src_name: "a".into(),
                dst_prefix: "eth".into(),
            },
            gateway: String::new(),
            disable_gateway_service: true,
        })
        .unwrap();
        assert_eq!(j["InterfaceName"]["SrcName"], "a");
        assert_eq!(j["DisableGatewayService"], true);
        let c = serde_json::to_value(IpamCapabilities {
            requires_mac_address: false,
            requires_request_replay: false,
        })
        .unwrap();
        assert!(c.get("RequiresMACAddress").is_some());
        let e = serde_json::to_string(&ErrorAnswer { err: "x".into() }).unwrap();
        assert_eq!(e, r#"{"Err":"x"}"#);
        let p = serde_json::to_value(RequestPoolResponse {
            pool_id: "p".into(),
            pool: "10.32.0.0/12".into(),
            data: BTreeMap::new(),
        })
        .unwrap();
        assert_eq!(p["PoolID"], "p");
    }
}

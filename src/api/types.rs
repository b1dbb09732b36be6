//! Documents exchanged over the local API. Field names are part of the user-visible interface.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /status`: everything `meshctl status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Status {
    pub(crate) name: String,
    pub(crate) nickname: String,
    pub(crate) version: String,
    /// Whether a mesh password is set, so that sleeve traffic is sealed.
    pub(crate) encryption: bool,
    pub(crate) port: u16,
    pub(crate) bridge: String,
    pub(crate) mtu: u32,
    /// Every other router this one knows of.
    pub(crate) peers: Vec<PeerStatus>,
    /// Established connections, connection attempts to targets, and recently refused inbound attempts.
    pub(crate) connections: Vec<ConnectionStatus>,
    /// The addresses this router dials (given by the user or discovered) and how that goes.
    #[serde(default)]
    pub(crate) targets: Vec<TargetStatus>,
    /// Control-plane traffic (gossip, IPAM, heartbeats) on all connections.
    #[serde(default)]
    pub(crate) gossip: GossipStatus,
    pub(crate) sleeve: SleeveStatus,
    /// Address allocation (`meshctl ipam`).
    #[serde(default)]
    pub(crate) ipam: Option<IpamStatus>,
    /// Container names and the embedded name server (`meshctl status dns`).
    #[serde(default)]
    pub(crate) dns: Option<DnsStatus>,
    /// Where `peers[].traffic.vxlan` comes from (`nftables table ip meshctl_BRIDGE`), or
    /// `none: ` and why it is missing.
    #[serde(default)]
    pub(crate) vxlan_counting: String,
}

/// The name service: what it answers for, where, and every live name in the mesh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DnsStatus {
    /// The domain container names live in, e.g. `meshctl.local`.
    pub(crate) domain: String,
    /// Addresses the server answers on (UDP and TCP port 53): the bridge's addresses.
    pub(crate) listening: Vec<String>,
    /// Where other names are forwarded (`IP:53` from the host's resolv.conf), if anywhere.
    pub(crate) upstream: Option<String>,
    /// Messages received by the server.
    pub(crate) queries: u64,
    /// Answered from the mesh's names.
    pub(crate) answered: u64,
    /// Names in our domain that don't exist.
    pub(crate) nxdomain: u64,
    /// Sent upstream.
    pub(crate) forwarded: u64,
    /// Upstream silent, failed or missing (answered SERVFAIL).
    pub(crate) upstream_failed: u64,
    /// Not a query we could read.
    pub(crate) malformed: u64,
    /// Live names of the whole mesh, sorted by name.
    pub(crate) records: Vec<DnsRecord>,
}

/// One live name in [`DnsStatus::records`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DnsRecord {
    /// Full name without the trailing dot, e.g. `web.meshctl.local`.
    pub(crate) name: String,
    pub(crate) address: String,
    /// The peer that registered it (the container's host).
    pub(crate) peer: String,
    pub(crate) nickname: Option<String>,
}

/// `POST /dns/add`: register names of containers on this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DnsAddRequest {
    /// `web` or `web.meshctl.local`.
    pub(crate) name: String,
    pub(crate) ips: Vec<String>,
}

/// `POST /dns/remove`: remove this host's records of a name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DnsRemoveRequest {
    pub(crate) name: String,
    /// Only this address; all of this host's addresses for the name without it.
    pub(crate) ip: Option<String>,
}

/// `POST /dns/lookup`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DnsLookupRequest {
    pub(crate) name: String,
}

/// Answer to the `/dns/*` calls: the name (qualified) and its addresses afterwards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DnsNameResponse {
    pub(crate) name: String,
    pub(crate) addresses: Vec<String>,
    /// How many records the call added or removed (0 for lookup).
    #[serde(default)]
    pub(crate) changed: usize,
}

/// `GET /ipam`: who owns which addresses, and what allocation waits for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IpamStatus {
    /// `ready`, `waiting` (no agreed ownership yet) or `conflict`.
    pub(crate) state: String,
    /// What allocation waits for, and which peers are missing.
    pub(crate) waiting: Option<String>,
    pub(crate) conflict: Option<String>,
    /// `--ipalloc-range`, the default subnet.
    pub(crate) range: String,
    /// The peers that agreed the first ownership, once agreed.
    pub(crate) bootstrap_members: Option<Vec<String>>,
    pub(crate) subnets: Vec<IpamSubnet>,
    /// Owners we have no route to (their space cannot be used until they return or are
    /// reclaimed).
    pub(crate) unreachable_owners: Vec<String>,
    /// The share of `range`, in percent, owned by this router and the routers it reaches:
    /// reclaims need more than 50. Absent before the first ownership is agreed.
    #[serde(default)]
    pub(crate) reachable_percent: Option<f64>,
    /// This router's allocations.
    pub(crate) allocations: Vec<IpamAllocation>,
    /// Reclaims of vanished peers, in progress or done.
    pub(crate) reclaims: Vec<String>,
}

/// One subnet in [`IpamStatus::subnets`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IpamSubnet {
    pub(crate) subnet: String,
    pub(crate) owners: Vec<IpamOwner>,
}

/// One owner's share of a subnet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IpamOwner {
    pub(crate) peer: String,
    pub(crate) nickname: Option<String>,
    pub(crate) owned: u64,
    pub(crate) used: u64,
    pub(crate) free: u64,
    pub(crate) reachable: bool,
}

/// One allocation of this router.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IpamAllocation {
    pub(crate) subnet: String,
    /// The container key: `docker:ID` or `netns:INODE`.
    pub(crate) container: String,
    pub(crate) address: String,
    /// Released, kept for the container during the grace period.
    pub(crate) releasing: bool,
}

/// `POST /rmpeer`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RmPeerRequest {
    /// Peer name or nickname.
    pub(crate) peer: String,
}

/// One peer in [`Status::peers`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PeerStatus {
    pub(crate) name: String,
    pub(crate) nickname: String,
    /// Whether a route to it exists.
    pub(crate) reachable: bool,
    /// The neighbour traffic to it goes through (itself when directly connected).
    pub(crate) next_hop: Option<String>,
    /// `vxlan` (kernel fast path) or `sleeve` (userspace UDP) while reachable.
    pub(crate) overlay: Option<String>,
    /// Why that overlay (empty for `vxlan`), or why none: `encryption required`, `fast path
    /// disabled`, `vxlan probe lost since 12:03:04 UTC`, ...
    pub(crate) overlay_reason: String,
    /// The cipher of the sleeve session to the next hop (`none` without a password); absent
    /// while unreachable.
    #[serde(default)]
    pub(crate) cipher: Option<String>,
    /// The container MTU the path to it carries, while reachable.
    #[serde(default)]
    pub(crate) mtu: Option<u32>,
    /// How many connections it announces.
    pub(crate) connections: usize,
    /// The neighbour that relays our traffic to it; `None` when directly connected or unreachable.
    #[serde(default)]
    pub(crate) relayed_via: Option<String>,
    /// Measurements of the direct connection; `None` unless directly connected.
    #[serde(default)]
    pub(crate) link: Option<LinkStatus>,
    /// Where its VXLAN device listens (`IP:port`), when it is a direct neighbour that offers
    /// the fast path.
    #[serde(default)]
    pub(crate) vxlan_endpoint: Option<String>,
    /// Ethernet frames exchanged with it end to end, direct or relayed, by overlay.
    #[serde(default)]
    pub(crate) traffic: PeerTraffic,
}

/// [`PeerStatus::traffic`]: frames between this host's containers and the peer's, counted at
/// the ends of the path (frames we relay for others are not in here).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PeerTraffic {
    /// Over the sleeve, counted by the router as frames enter and leave the TAP.
    pub(crate) sleeve: TrafficCounts,
    /// Over kernel VXLAN, counted by nftables per remote endpoint; `None` when there is no
    /// endpoint or no counters (`Status::vxlan_counting` says why).
    pub(crate) vxlan: Option<TrafficCounts>,
}

impl PeerTraffic {
    /// Both overlays together.
    pub(crate) fn total(&self) -> TrafficCounts {
        let v = self.vxlan.unwrap_or_default();
        let s = self.sleeve;
        TrafficCounts {
            rx_packets: s.rx_packets + v.rx_packets,
            rx_bytes: s.rx_bytes + v.rx_bytes,
            tx_packets: s.tx_packets + v.tx_packets,
            tx_bytes: s.tx_bytes + v.tx_bytes,
        }
    }
}

/// Packets and bytes each way. Bytes are Ethernet frame bytes; a super-frame the kernel hands
/// over in one piece (GSO) counts once on VXLAN and once per segment on the sleeve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TrafficCounts {
    pub(crate) rx_packets: u64,
    pub(crate) rx_bytes: u64,
    pub(crate) tx_packets: u64,
    pub(crate) tx_bytes: u64,
}

/// [`PeerStatus::link`]: what we measure on a direct connection to a peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LinkStatus {
    /// Smoothed round-trip time of the control connection (QUIC), in milliseconds.
    pub(crate) rtt_ms: f64,
    /// QUIC packets of the control connection declared lost / sent, since the handshake.
    pub(crate) lost_packets: u64,
    pub(crate) sent_packets: u64,
    /// `lost_packets / sent_packets` (0 before anything was sent).
    pub(crate) loss_ratio: f64,
    /// Largest UDP payload the underlay path carries, as QUIC's path MTU discovery found it.
    pub(crate) path_mtu_bytes: u32,
    /// When the handshake completed, in seconds since the Unix epoch.
    pub(crate) handshake_unix_secs: u64,
    /// Seconds since the handshake.
    pub(crate) handshake_age_secs: u64,
    /// Age of the key we seal with, in seconds: since the handshake, or since the key last
    /// rotated (every 2^22 datagrams by default).
    pub(crate) key_age_secs: u64,
    /// Sleeve datagrams and bytes exchanged with this neighbour since the handshake, including
    /// traffic it relays for others; `None` while the peer is on the kernel VXLAN fast path
    /// (the kernel keeps no per-destination counters there).
    pub(crate) rx_packets: Option<u64>,
    pub(crate) rx_bytes: Option<u64>,
    pub(crate) tx_packets: Option<u64>,
    pub(crate) tx_bytes: Option<u64>,
    /// Sleeve datagrams from this neighbour dropped since the handshake, by reason
    /// (`auth_failed`, `plain_when_sealed`, `replayed`).
    #[serde(default)]
    pub(crate) drops: BTreeMap<String, u64>,
}

/// One line of [`Status::connections`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ConnectionStatus {
    pub(crate) address: String,
    /// `outbound` (we dial) or `inbound`.
    pub(crate) direction: String,
    /// `established`, `connecting`, `failed` (will retry), or `refused` (an inbound attempt we turned away).
    pub(crate) state: String,
    pub(crate) peer: Option<String>,
    pub(crate) nickname: Option<String>,
    /// The last error, e.g. `password mismatch: ...`.
    pub(crate) error: Option<String>,
}

/// Sleeve data-plane counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct SleeveStatus {
    /// `ChaCha20-Poly1305` or `none`.
    pub(crate) cipher: String,
    pub(crate) rx_datagrams: u64,
    pub(crate) tx_datagrams: u64,
    pub(crate) rx_frames: u64,
    pub(crate) tx_frames: u64,
    pub(crate) relayed_frames: u64,
    /// Sending keys that moved to a new epoch (keys rotate by datagram count).
    #[serde(default)]
    pub(crate) key_rotations: u64,
    /// Bytes of received and sent datagrams (UDP payload).
    #[serde(default)]
    pub(crate) rx_bytes: u64,
    #[serde(default)]
    pub(crate) tx_bytes: u64,
    /// Dropped datagrams or frames by reason.
    pub(crate) drops: BTreeMap<String, u64>,
    /// How the socket batches datagrams: `gso/gro`, `sendmmsg/recvmmsg` or a mix; `None` until
    /// the sleeve has set up its socket.
    #[serde(default)]
    pub(crate) batching: Option<String>,
}

/// One line of [`Status::targets`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TargetStatus {
    pub(crate) address: String,
    /// `user` (given to launch or connect) or `discovered` (announced by a peer).
    pub(crate) source: String,
    /// `connected`, `connecting`, `waiting` (retry due later) or `failed` (waiting after an error).
    pub(crate) state: String,
    /// Seconds until the next attempt while waiting.
    pub(crate) retry_in_secs: Option<u64>,
    /// Consecutive failed attempts.
    pub(crate) attempts: u32,
    pub(crate) last_error: Option<String>,
}

/// [`Status::gossip`]: bytes and messages of the control connections, all peers together.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct GossipStatus {
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) rx_messages: u64,
    pub(crate) tx_messages: u64,
}

/// `POST /connect` and `POST /forget`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PeersRequest {
    /// HOST[:PORT] strings.
    pub(crate) peers: Vec<String>,
}

/// `POST /attach`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AttachRequest {
    /// Absolute path of the container's network namespace file.
    pub(crate) netns: String,
    pub(crate) ifname: String,
    /// CIDRs, e.g. `10.32.0.5/12`, or `net:CIDR` to allocate from an isolated subnet; none:
    /// allocate from the default subnet.
    pub(crate) ips: Vec<String>,
    /// Docker container id, the allocation key when given (else the netns inode).
    #[serde(default)]
    pub(crate) container: Option<String>,
    /// How long to wait for an address, in seconds.
    #[serde(default)]
    pub(crate) wait_secs: Option<u64>,
    /// The container's DNS name (`web`, qualified with the domain); registered on attach.
    #[serde(default)]
    pub(crate) name: Option<String>,
    /// The IPAM key, when the caller has its own (the CNI plugin: `cni:ID:IFNAME`).
    #[serde(default)]
    pub(crate) key: Option<String>,
    /// How `meshctl ps` names the container (as the user gave it).
    #[serde(default)]
    pub(crate) label: Option<String>,
}

/// Answer to `POST /attach`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AttachResponse {
    pub(crate) host_ifname: String,
    pub(crate) ifname: String,
    pub(crate) mac: String,
    pub(crate) ips: Vec<String>,
}

/// `POST /detach`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DetachRequest {
    pub(crate) netns: String,
    pub(crate) ifname: String,
    #[serde(default)]
    pub(crate) container: Option<String>,
    /// The container's DNS name, removed on detach.
    #[serde(default)]
    pub(crate) name: Option<String>,
    /// The IPAM key given to attach, if any.
    #[serde(default)]
    pub(crate) key: Option<String>,
}

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: String,
}

/// `POST /expose` and `POST /hide`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ExposeRequest {
    /// The host's address on the mesh with prefix, e.g. `10.32.0.254/12`; for hide, None means all.
    pub(crate) cidr: Option<String>,
}

/// Answer to `POST /expose` and `POST /hide`: the host's addresses on the bridge afterwards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ExposeResponse {
    pub(crate) addresses: Vec<String>,
}

/// `GET /ps`: one container on the mesh bridge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PsEntry {
    /// `attach` (`meshctl attach`), `cni` (the CNI plugin) or `plugin` (the Docker network
    /// plugin).
    pub(crate) via: String,
    /// Netns name, PID, Docker container name, or the Docker endpoint for plugin containers.
    pub(crate) container: String,
    /// Docker network id (plugin containers).
    #[serde(default)]
    pub(crate) network: Option<String>,
    /// Interface inside the container, when known.
    pub(crate) ifname: String,
    pub(crate) mac: String,
    /// Addresses with prefix.
    pub(crate) ips: Vec<String>,
    /// The veth end on the bridge.
    pub(crate) host_ifname: String,
}

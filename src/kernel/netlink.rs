//! Link and address management for the daemon, through async rtnetlink.
//!
//! [`Netlink`] wraps one rtnetlink socket bound to the network namespace of the thread that
//! opened it. Every operation names links by interface name and adds the object and the verb to
//! its error ("create bridge mesh", "enslave mesh-tap to bridge 7").
//!
//! Also the VXLAN mechanisms the fast path needs: creating the device, and adding, appending,
//! listing and deleting bridge FDB entries (some of them hand-built, see each method).
//!
//! Not here: entering other namespaces (`netns.rs`), veth plumbing for containers (`attach.rs`),
//! which VXLAN FDB entries should exist (`dataplane/vxlan.rs`), and the TAP file descriptor
//! (`dataplane/tap.rs`).
//!
//! Invariants: the socket's namespace is fixed at [`Netlink::open`]; nothing here calls `setns`.
//! Deleting and adding an existing address are idempotent, so reconcilers may repeat them.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, Context};
use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_route::link::{
    InfoBridgePort, InfoKind, InfoPortData, InfoPortKind, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlag, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

/// Longest interface name the kernel accepts (IFNAMSIZ minus the NUL).
pub const IFNAME_LEN_MAX: usize = 15;

/// A netlink route socket in one network namespace.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace; spawns its connection on
    /// the current runtime.
    pub fn open() -> anyhow::Result<Netlink> {
        let runtime = tokio::runtime::Handle::try_current()
            .context("open rtnetlink socket: no tokio runtime on this thread")?;
        let (connection, handle, _) =
            rtnetlink::new_connection().context("open rtnetlink socket")?;
        runtime.spawn(connection);
        Ok(Netlink { handle })
    }

    /// The full link message for `name`, or `None` if no such link exists.
    pub async fn link(&self, name: &str) -> anyhow::Result<Option<LinkMessage>> {
        check_ifname(name)?;
        let mut request = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match request.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("look up link {name}")),
        }
    }

    /// The interface index of `name`, or `None` if no such link exists.
    pub async fn link_index(&self, name: &str) -> anyhow::Result<Option<u32>> {
        Ok(self.link(name).await?.map(|link| link.header.index))
    }

    /// The link kind ("bridge", "veth", "tun", ...) of `name`; `None` if absent, `Some("")` if the
    /// link has no kind (for example `lo` or a physical NIC).
    pub async fn link_kind(&self, name: &str) -> anyhow::Result<Option<String>> {
        Ok(self.link(name).await?.map(|link| kind_of(&link)))
    }

    /// The hardware address of `name`, or `None` if absent or not an Ethernet-like link.
    pub async fn link_mac(&self, name: &str) -> anyhow::Result<Option<[u8; 6]>> {
        let Some(link) = self.link(name).await? else {
            return Ok(None);
        };
        Ok(link.attributes.iter().find_map(|attr| match attr {
            LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => None,
        }))
    }

    /// Creates the bridge if missing, sets mtu, brings it up, returns ifindex. If a link with that
    /// name exists and is not a bridge, fails with an error naming the link, its kind and the fix.
    pub async fn ensure_bridge(&self, name: &str, mtu: u32) -> anyhow::Result<u32> {
        match self.link_kind(name).await? {
            Some(kind) if kind == "bridge" => {}
            Some(kind) => {
                let kind = if kind.is_empty() {
                    "link without a kind"
                } else {
                    &kind
                };
                bail!(
                    "link {name} exists and is a {kind}, not a bridge: \
                     choose another --bridge or delete it"
                );
            }
            None => {
                let created = self
                    .handle
                    .link()
                    .add()
                    .bridge(name.to_owned())
                    .execute()
                    .await;
                match created {
                    Ok(()) => {}
                    // Someone created it between our lookup and our add: check it once more below.
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e).with_context(|| format!("create bridge {name}")),
                }
                if self.link_kind(name).await?.as_deref() != Some("bridge") {
                    bail!("create bridge {name}: a link of another kind took the name meanwhile");
                }
            }
        }
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(index)
            .mtu(mtu)
            .up()
            .execute()
            .await
            .with_context(|| format!("set bridge {name} mtu {mtu} up"))?;
        Ok(index)
    }

    /// Makes `port` a port of the bridge, sets `isolated` (IFLA_BRPORT_ISOLATED) as given, brings
    /// it up.
    pub async fn enslave(
        &self,
        port: &str,
        bridge_index: u32,
        isolated: bool,
    ) -> anyhow::Result<()> {
        let index = self.require_index(port).await?;
        self.handle
            .link()
            .set(index)
            .controller(bridge_index)
            .execute()
            .await
            .with_context(|| format!("enslave {port} to bridge {bridge_index}"))?;
        self.set_bridge_port_isolated(port, index, isolated).await?;
        self.handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .with_context(|| format!("set {port} up"))
    }

    /// Brings `name` up.
    pub async fn set_up(&self, name: &str) -> anyhow::Result<()> {
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .with_context(|| format!("set {name} up"))
    }

    /// Sets the MTU of `name`.
    pub async fn set_mtu(&self, name: &str, mtu: u32) -> anyhow::Result<()> {
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(index)
            .mtu(mtu)
            .execute()
            .await
            .with_context(|| format!("set {name} mtu {mtu}"))
    }

    /// Renames `name` to `new_name`. The link must be down.
    pub async fn rename(&self, name: &str, new_name: &str) -> anyhow::Result<()> {
        check_ifname(new_name)?;
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(index)
            .name(new_name.to_owned())
            .execute()
            .await
            .with_context(|| format!("rename {name} to {new_name}"))
    }

    /// Moves `name` into the network namespace open at `netns`.
    pub async fn move_to_netns(
        &self,
        name: &str,
        netns: std::os::fd::BorrowedFd<'_>,
    ) -> anyhow::Result<()> {
        use std::os::fd::AsRawFd;
        let index = self.require_index(name).await?;
        // The kernel resolves the fd while handling the request, and `netns` outlives this call.
        self.handle
            .link()
            .set(index)
            .setns_by_fd(netns.as_raw_fd())
            .execute()
            .await
            .with_context(|| format!("move {name} to another netns"))
    }

    /// Creates a veth pair `name` <-> `peer_name`, both down.
    pub async fn add_veth(&self, name: &str, peer_name: &str) -> anyhow::Result<()> {
        check_ifname(name)?;
        check_ifname(peer_name)?;
        let mut request = self
            .handle
            .link()
            .add()
            .veth(name.to_owned(), peer_name.to_owned());
        // rtnetlink's veth() asks for one end up; we bring ends up once they are placed.
        request.message_mut().header.flags.clear();
        request.message_mut().header.change_mask.clear();
        request
            .execute()
            .await
            .with_context(|| format!("create veth {name} peer {peer_name}"))
    }

    /// Deletes `name`; succeeds if it does not exist.
    pub async fn delete_link(&self, name: &str) -> anyhow::Result<()> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("delete link {name}")),
        }
    }

    /// Adds `addr/prefix` to `name`; succeeds if it is already there.
    pub async fn add_address(&self, name: &str, addr: IpAddr, prefix: u8) -> anyhow::Result<()> {
        let index = self.require_index(name).await?;
        match self
            .handle
            .address()
            .add(index, addr, prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("add address {addr}/{prefix} to {name}")),
        }
    }

    /// The addresses on `name` with their prefix lengths.
    pub async fn addresses(&self, name: &str) -> anyhow::Result<Vec<(IpAddr, u8)>> {
        Ok(self
            .address_messages(name)
            .await?
            .into_iter()
            .filter_map(|(addr, prefix, _)| Some((addr?, prefix)))
            .collect())
    }

    /// Removes `addr/prefix` from `name`; Ok if it isn't there.
    pub async fn del_address(&self, name: &str, addr: IpAddr, prefix: u8) -> anyhow::Result<()> {
        for (a, p, message) in self.address_messages(name).await? {
            if a == Some(addr) && p == prefix {
                self.handle
                    .address()
                    .del(message)
                    .execute()
                    .await
                    .with_context(|| format!("remove address {addr}/{prefix} from {name}"))?;
            }
        }
        Ok(())
    }

    async fn address_messages(
        &self,
        name: &str,
    ) -> anyhow::Result<
        Vec<(
            Option<IpAddr>,
            u8,
            netlink_packet_route::address::AddressMessage,
        )>,
    > {
        use netlink_packet_route::address::AddressAttribute;
        let index = self.require_index(name).await?;
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(message) = stream
            .try_next()
            .await
            .with_context(|| format!("list addresses of {name}"))?
        {
            let addr = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            out.push((addr, message.header.prefix_len, message));
        }
        Ok(out)
    }

    /// Sets IFLA_BRPORT_ISOLATED on a bridge port. rtnetlink 0.14 cannot send this: the kernel
    /// applies bridge port options (IFLA_LINKINFO { INFO_SLAVE_KIND "bridge", INFO_SLAVE_DATA })
    /// only in RTM_NEWLINK, RTM_SETLINK ignores them silently, and rtnetlink's NEWLINK always
    /// carries NLM_F_CREATE|NLM_F_EXCL, which an existing link answers with EEXIST. So we send
    /// the RTM_NEWLINK ourselves with flags REQUEST|ACK only, as `ip link set DEV type
    /// bridge_slave isolated on` does. The kernel reads the options with the port's current
    /// master, so the port must already be enslaved.
    async fn set_bridge_port_isolated(
        &self,
        port: &str,
        index: u32,
        isolated: bool,
    ) -> anyhow::Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::Isolated(
                isolated,
            )])),
        ]));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewLink(message));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let context = || format!("set bridge port {port} isolated {isolated}");
        let mut replies = self.handle.clone().request(request).with_context(context)?;
        while let Some(reply) = replies.next().await {
            if let NetlinkPayload::Error(err) = reply.payload {
                if err.code.is_some() {
                    return Err(rtnetlink::Error::NetlinkError(err)).with_context(context);
                }
            }
        }
        Ok(())
    }

    /// Creates the VXLAN device `name` (VNI `vni`, UDP port `port`, learning on, no fixed
    /// remote), sets its MTU, and returns its ifindex. An existing link of that name is deleted
    /// first, so a device left by an earlier run never keeps old settings.
    pub async fn create_vxlan(
        &self,
        name: &str,
        vni: u32,
        port: u16,
        mtu: u32,
    ) -> anyhow::Result<u32> {
        check_ifname(name)?;
        self.delete_link(name).await?;
        self.handle
            .link()
            .add()
            .vxlan(name.to_owned(), vni)
            .port(port)
            .learning(true)
            .execute()
            .await
            .with_context(|| format!("create vxlan {name} vni {vni} port {port}"))?;
        self.set_mtu(name, mtu).await?;
        self.require_index(name).await
    }

    /// `bridge fdb append MAC dev IFINDEX dst DST port PORT self permanent`: adds one more
    /// remote to the VXLAN FDB entry for `mac` (all zeros: the flood list). rtnetlink 0.14 can't
    /// say `append`, so the RTM_NEWNEIGH is built here with NLM_F_CREATE|NLM_F_APPEND. Appending
    /// a remote that is already listed answers EEXIST, which counts as success.
    pub async fn fdb_append(
        &self,
        ifindex: u32,
        mac: [u8; 6],
        dst: Ipv4Addr,
        port: u16,
    ) -> anyhow::Result<()> {
        let message = fdb_message(ifindex, mac, dst, Some(port));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(message));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        let context = || {
            format!(
                "append fdb {} dst {dst}:{port} on ifindex {ifindex}",
                fmt_mac(&mac)
            )
        };
        match self.ack(request).await {
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            other => other.with_context(context),
        }
    }

    /// `bridge fdb del MAC dev IFINDEX dst DST self`: removes that one remote (or learned entry).
    /// Succeeds if it is not there.
    pub async fn fdb_delete(
        &self,
        ifindex: u32,
        mac: [u8; 6],
        dst: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let message = fdb_message(ifindex, mac, dst, None);
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::DelNeighbour(message));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        match self.ack(request).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::ENODEV)) => Ok(()),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "delete fdb {} dst {dst} on ifindex {ifindex}",
                    fmt_mac(&mac)
                )
            }),
        }
    }

    /// The device's own FDB entries (`bridge fdb show dev DEV self`) that name an IPv4 remote:
    /// VXLAN flood entries and learned or static unicast entries alike.
    pub async fn fdb_remotes(&self, ifindex: u32) -> anyhow::Result<Vec<FdbRemote>> {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        message.header.ifindex = ifindex;
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(message));
        request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let context = || format!("list fdb entries of ifindex {ifindex}");
        let mut replies = self.handle.clone().request(request).with_context(context)?;
        let mut out = Vec::new();
        while let Some(reply) = replies.next().await {
            let message = match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => m,
                NetlinkPayload::Error(err) if err.code.is_some() => {
                    return Err(rtnetlink::Error::NetlinkError(err)).with_context(context);
                }
                _ => continue,
            };
            if message.header.ifindex != ifindex
                || !message.header.flags.contains(&NeighbourFlag::Own)
            {
                continue;
            }
            let mut mac = None;
            let mut dst = None;
            for attr in &message.attributes {
                match attr {
                    NeighbourAttribute::LinkLocalAddress(b) => {
                        mac = <[u8; 6]>::try_from(b.as_slice()).ok()
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dst = Some(*a),
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                    }
                    _ => {}
                }
            }
            if let (Some(mac), Some(dst)) = (mac, dst) {
                out.push(FdbRemote {
                    mac,
                    dst,
                    permanent: message.header.state == NeighbourState::Permanent,
                });
            }
        }
        Ok(out)
    }

    /// Forgets every MAC the bridge learned on port `port` (IFLA_BRPORT_FLUSH, as
    /// `ip link set PORT type bridge_slave fdb_flush`; hand-built like
    /// [`Self::set_bridge_port_isolated`]).
    pub async fn flush_bridge_port(&self, port: &str) -> anyhow::Result<()> {
        let index = self.require_index(port).await?;
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::Flush])),
        ]));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewLink(message));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        self.ack(request)
            .await
            .with_context(|| format!("flush learned MACs of bridge port {port}"))
    }

    /// Sends a hand-built request and waits for its acknowledgement.
    async fn ack(
        &self,
        request: NetlinkMessage<RouteNetlinkMessage>,
    ) -> Result<(), rtnetlink::Error> {
        let mut replies = self.handle.clone().request(request)?;
        while let Some(reply) = replies.next().await {
            if let NetlinkPayload::Error(err) = reply.payload {
                if err.code.is_some() {
                    return Err(rtnetlink::Error::NetlinkError(err));
                }
            }
        }
        Ok(())
    }

    async fn require_index(&self, name: &str) -> anyhow::Result<u32> {
        self.link_index(name)
            .await?
            .with_context(|| format!("find link {name}: no such link"))
    }
}

/// One entry of a VXLAN device's own FDB: frames for `mac` go to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdbRemote {
    pub mac: [u8; 6],
    pub dst: Ipv4Addr,
    /// Added by us (`permanent`) rather than learned.
    pub permanent: bool,
}

fn fdb_message(ifindex: u32, mac: [u8; 6], dst: Ipv4Addr, port: Option<u16>) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = ifindex;
    message.header.state = NeighbourState::Permanent;
    message.header.flags = vec![NeighbourFlag::Own];
    message.attributes = vec![
        NeighbourAttribute::LinkLocalAddress(mac.to_vec()),
        NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)),
    ];
    if let Some(port) = port {
        message.attributes.push(NeighbourAttribute::Port(port));
    }
    message
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The positive errno of a netlink error reply, if `e` is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|code| -code.get()),
        _ => None,
    }
}

fn kind_of(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|attr| match attr {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                LinkInfo::Kind(kind) => Some(kind_name(kind)),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or_default()
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Other(name) => name.clone(),
        known => known.to_string(),
    }
}

fn check_ifname(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > IFNAME_LEN_MAX || name.contains(['/', ' ', '\0']) {
        bail!("invalid interface name {name:?}: 1 to {IFNAME_LEN_MAX} bytes, no '/', space or NUL");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netns::testing::{ip, TestNetns};

    #[test]
    fn ensure_bridge_creates_and_is_idempotent() {
        let Some(ns) = TestNetns::new() else { return };
        let (first, second) = ns.block_on(|nl| async move {
            let first = nl.ensure_bridge("br-t", 1400).await?;
            let second = nl.ensure_bridge("br-t", 1400).await?;
            anyhow::Ok((first, second))
        });
        assert_eq!(first, second);
        let out = ip(&["-n", ns.name(), "-d", "link", "show", "br-t"]);
        assert!(out.contains("mtu 1400"), "{out}");
        assert!(out.contains("bridge "), "{out}");
        assert!(out.contains(",UP"), "{out}");
    }

    #[test]
    fn ensure_bridge_refuses_a_link_of_another_kind() {
        let Some(ns) = TestNetns::new() else { return };
        ip(&[
            "-n",
            ns.name(),
            "link",
            "add",
            "taken",
            "type",
            "veth",
            "peer",
            "name",
            "taken-p",
        ]);
        let err = ns.try_block_on(|nl| async move { nl.ensure_bridge("taken", 1500).await });
        let err = format!("{:#}", err.unwrap_err());
        assert!(err.contains("taken") && err.contains("veth"), "{err}");
        assert!(
            err.contains("choose another --bridge or delete it"),
            "{err}"
        );
    }

    #[test]
    fn link_kind_reports_absent_and_kindless_links() {
        let Some(ns) = TestNetns::new() else { return };
        let (lo, absent) = ns.block_on(|nl| async move {
            anyhow::Ok((nl.link_kind("lo").await?, nl.link_kind("nope").await?))
        });
        assert_eq!(lo.as_deref(), Some(""));
        assert_eq!(absent, None);
    }

    #[test]
    fn enslave_sets_isolated_on_and_off() {
        let Some(ns) = TestNetns::new() else { return };
        ip(&[
            "-n",
            ns.name(),
            "link",
            "add",
            "d-iso",
            "type",
            "veth",
            "peer",
            "name",
            "d-iso-p",
        ]);
        ip(&[
            "-n",
            ns.name(),
            "link",
            "add",
            "d-open",
            "type",
            "veth",
            "peer",
            "name",
            "d-open-p",
        ]);
        ns.block_on(|nl| async move {
            let br = nl.ensure_bridge("br-t", 1500).await?;
            nl.enslave("d-iso", br, true).await?;
            nl.enslave("d-open", br, false).await
        });
        let iso = ip(&["-n", ns.name(), "-d", "link", "show", "d-iso"]);
        assert!(iso.contains("master br-t"), "{iso}");
        assert!(iso.contains("isolated on"), "{iso}");
        assert!(iso.contains(",UP"), "{iso}");
        let open = ip(&["-n", ns.name(), "-d", "link", "show", "d-open"]);
        assert!(open.contains("isolated off"), "{open}");
    }

    #[test]
    fn delete_link_and_add_address_are_idempotent() {
        let Some(ns) = TestNetns::new() else { return };
        ip(&[
            "-n",
            ns.name(),
            "link",
            "add",
            "d0",
            "type",
            "veth",
            "peer",
            "name",
            "d0-p",
        ]);
        ns.block_on(|nl| async move {
            let addr: IpAddr = "10.9.0.1".parse()?;
            nl.add_address("d0", addr, 24).await?;
            nl.add_address("d0", addr, 24).await?;
            nl.set_mtu("d0", 1300).await?;
            nl.set_up("d0").await
        });
        let out = ip(&["-n", ns.name(), "addr", "show", "d0"]);
        assert!(out.contains("inet 10.9.0.1/24"), "{out}");
        assert!(out.contains("mtu 1300"), "{out}");
        ns.block_on(|nl| async move {
            nl.delete_link("d0").await?;
            nl.delete_link("d0").await
        });
        let out = ip(&["-n", ns.name(), "link", "show"]);
        assert!(!out.contains("d0"), "{out}");
    }

    #[test]
    fn vxlan_flood_entries_append_list_and_delete() {
        let Some(ns) = TestNetns::new() else { return };
        let (a, b) = ("10.9.9.1".parse().unwrap(), "10.9.9.2".parse().unwrap());
        let listed = ns.block_on(move |nl| async move {
            let br = nl.ensure_bridge("br-t", 1500).await?;
            let vx = nl.create_vxlan("vx-t", 4242, 6785, 1450).await?;
            nl.enslave("vx-t", br, true).await?;
            nl.fdb_append(vx, [0; 6], a, 6785).await?;
            nl.fdb_append(vx, [0; 6], b, 6785).await?;
            nl.fdb_append(vx, [0; 6], b, 6785).await?; // already there: fine
            nl.fdb_delete(vx, [0; 6], a).await?;
            nl.fdb_delete(vx, [0; 6], a).await?; // gone already: fine
            nl.flush_bridge_port("vx-t").await?;
            nl.fdb_remotes(vx).await
        });
        assert_eq!(
            listed,
            vec![FdbRemote {
                mac: [0; 6],
                dst: b,
                permanent: true
            }]
        );
        let out = ip(&["-n", ns.name(), "-d", "link", "show", "vx-t"]);
        assert!(
            out.contains("vxlan id 4242") && out.contains("dstport 6785"),
            "{out}"
        );
        assert!(
            out.contains("isolated on") && out.contains("mtu 1450"),
            "{out}"
        );
    }

    #[test]
    fn invalid_names_are_refused_before_the_kernel_sees_them() {
        let Some(ns) = TestNetns::new() else { return };
        let err = ns.try_block_on(|nl| async move { nl.link_index("a-name-far-too-long").await });
        assert!(format!("{:#}", err.unwrap_err()).contains("invalid interface name"));
    }
}

//! The kernel VXLAN fast path ("fastdp"): the device on the bridge, its flood FDB entries, and
//! the health probes that travel the same path as the traffic.
//!
//! Heads up: RFC 7348 (VXLAN) for the 8-byte header, and `man bridge` (`fdb append`) for how the
//! Linux vxlan driver keeps a list of remotes under the all-zeros MAC and floods to each.
//!
//! - [`setup`] creates `BRIDGE-vx` (fixed [`VNI`], UDP port = control port + 2, learning on) and
//!   makes it an *isolated* bridge port like the TAP, so the bridge never forwards between the two
//!   overlays.
//! - [`run_reconciler`] sits between the control loop and the sleeve: for every new
//!   [`ForwardingTable`] it first brings the flood entries in line with `table.vxlan`, then hands
//!   the table on. So the sleeve never skips a peer before the kernel floods to it, and never
//!   resumes a peer after the kernel stopped. When a peer changed overlay, it then waits until
//!   the sleeve works with the new table and only then makes the bridge forget what it learned
//!   on both overlay ports: flushed earlier, the sleeve could still write that peer's frames into
//!   the TAP (or take frames for it) under the old table and teach the bridge the old port again.
//! - [`run_prober`] sends probes as VXLAN datagrams built here (to the peer's VXLAN port, inner
//!   frame addressed to the peer's vxlan device, ethertype [`PROBE_ETHERTYPE`], full container
//!   MTU or small) and receives the ones the peer's kernel decapsulated: the peer's bridge hands a
//!   frame for its port's own MAC up to the host, where a packet socket for that ethertype reads it.
//!
//! Not here: which peers should be on VXLAN (`overlay.rs`, `daemon/control.rs`) and the netlink
//! messages themselves (`kernel/netlink.rs`).
//!
//! Invariants: flood entries exist only for peers in the last table handed on; learned entries
//! pointing at a peer that leaves are deleted with it, so no unicast keeps going to a broken path.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use anyhow::Context as _;
use mesh::PeerName;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::forwarding::ForwardingTable;
use crate::kernel::netlink::Netlink;

/// The VNI of the mesh's VXLAN segment (fixed: one network per mesh).
pub const VNI: u32 = 0x6d_6573;
/// Bytes VXLAN over IPv4 adds to a container frame: outer IPv4 20, UDP 8, VXLAN 8, inner
/// Ethernet 14.
pub const OVERHEAD: u32 = 50;
/// Ethertype of probe frames (IEEE 802 local experimental).
pub const PROBE_ETHERTYPE: u16 = 0x88b5;
/// The FDB key under which the vxlan driver keeps its flood list.
pub const FLOOD_MAC: [u8; 6] = [0; 6];

const VXLAN_HEADER_LEN: usize = 8;
const ETHERNET_HEADER_LEN: usize = 14;
const PROBE_MAGIC: &[u8; 6] = b"mshvx1";
const PROBE_LEN: usize = 6 + 1 + 1 + 8 + 8 + 6;
/// Inner frame size of a small probe.
pub const SMALL_PROBE_FRAME: usize = 64;
/// How long the reconciler waits for the sleeve to take a new table before it flushes the
/// bridge anyway (the sleeve itself gives up waiting for its threads after a second).
const LIVE_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// The fast-path device on this host.
#[derive(Clone, Debug)]
pub struct Device {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    /// Our VXLAN UDP port.
    pub port: u16,
}

/// Creates `BRIDGE-vx`, puts it on the bridge as an isolated port and brings it up.
pub async fn setup(
    netlink: &Netlink,
    bridge: &str,
    bridge_index: u32,
    port: u16,
    mtu: u32,
) -> anyhow::Result<Device> {
    let name = format!("{bridge}-vx");
    let index = netlink.create_vxlan(&name, VNI, port, mtu).await?;
    netlink
        .enslave(&name, bridge_index, true)
        .await
        .with_context(|| format!("add vxlan {name} to bridge {bridge}"))?;
    let mac = netlink
        .link_mac(&name)
        .await?
        .with_context(|| format!("read the MAC address of {name}"))?;
    Ok(Device {
        name,
        index,
        mac,
        port,
    })
}

/// Keeps the device's flood entries equal to `table.vxlan` and passes each table on to the
/// sleeve once the kernel agrees with it; after a change, flushes the bridge's learned MACs on
/// the TAP and the VXLAN port once the sleeve reports the table on `live`. A peer whose entry
/// can't be added stays with the sleeve. Returns when either table channel closes.
pub async fn run_reconciler(
    netlink: Arc<Netlink>,
    device: Option<Device>,
    tap: String,
    mut from_control: watch::Receiver<Arc<ForwardingTable>>,
    to_sleeve: watch::Sender<Arc<ForwardingTable>>,
    mut live: watch::Receiver<Arc<ForwardingTable>>,
) {
    let mut applied: BTreeMap<PeerName, SocketAddrV4> = BTreeMap::new();
    loop {
        let table = from_control.borrow_and_update().clone();
        let Some(device) = &device else {
            let mut table = (*table).clone();
            table.vxlan.clear();
            to_sleeve.send_replace(Arc::new(table));
            if from_control.changed().await.is_err() {
                return;
            }
            continue;
        };
        let mut changed = false;
        let leaving: Vec<(PeerName, SocketAddrV4)> = applied
            .iter()
            .filter(|(peer, addr)| table.vxlan.get(peer) != Some(addr))
            .map(|(p, a)| (*p, *a))
            .collect();
        for (peer, addr) in leaving {
            changed = true;
            applied.remove(&peer);
            if let Err(e) = remove_remote(&netlink, device, *addr.ip()).await {
                tracing::warn!(%peer, "fast path: {e:#}");
            }
            tracing::info!(%peer, %addr, "fast path: peer left vxlan");
        }
        for (peer, addr) in &table.vxlan {
            if applied.contains_key(peer) {
                continue;
            }
            changed = true;
            match netlink
                .fdb_append(device.index, FLOOD_MAC, *addr.ip(), addr.port())
                .await
            {
                Ok(()) => {
                    tracing::info!(%peer, %addr, "fast path: peer on vxlan");
                    applied.insert(*peer, *addr);
                }
                Err(e) => tracing::warn!(%peer, "fast path: {e:#}; peer stays on sleeve"),
            }
        }
        let mut table = (*table).clone();
        table.vxlan = applied.clone();
        let table = Arc::new(table);
        to_sleeve.send_replace(table.clone());
        if changed {
            // MACs the bridge learned on either overlay port may now sit behind the other
            // one; forget them so the next frame floods once and teaches the right port. Only
            // once the sleeve works with the new table: until then it may still write a frame
            // from a peer that moved into the TAP, and the bridge would learn it there again.
            let sleeve_has_it = live.wait_for(|t| Arc::ptr_eq(t, &table));
            if tokio::time::timeout(LIVE_MAX, sleeve_has_it).await.is_err() {
                tracing::warn!("fast path: the sleeve did not take the new table in time");
            }
            for port in [device.name.as_str(), tap.as_str()] {
                if let Err(e) = netlink.flush_bridge_port(port).await {
                    tracing::warn!("fast path: {e:#}");
                }
            }
        }
        if from_control.changed().await.is_err() {
            return;
        }
    }
}

/// Removes `dst` from the flood list and every learned entry that points at it.
async fn remove_remote(netlink: &Netlink, device: &Device, dst: Ipv4Addr) -> anyhow::Result<()> {
    netlink.fdb_delete(device.index, FLOOD_MAC, dst).await?;
    for entry in netlink.fdb_remotes(device.index).await? {
        if entry.dst == dst && entry.mac != FLOOD_MAC {
            netlink.fdb_delete(device.index, entry.mac, dst).await?;
        }
    }
    Ok(())
}

/// One probe or answer, as carried after the inner Ethernet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// An answer to a probe (else a probe asking for one).
    pub answer: bool,
    /// An answer saying "not with me": the peer requires encryption between us.
    pub declined: bool,
    /// Full container MTU (else small).
    pub full: bool,
    /// The router that sent this frame.
    pub from: PeerName,
    /// The prober's sequence number, echoed in the answer.
    pub seq: u64,
    /// The sender's vxlan device MAC, where answers go.
    pub reply_mac: [u8; 6],
}

impl Probe {
    /// The whole UDP payload: VXLAN header, inner Ethernet header, probe, zero padding up to an
    /// inner frame of `frame_len` bytes.
    pub fn emit(&self, dst_mac: [u8; 6], frame_len: usize) -> Vec<u8> {
        let frame_len = frame_len.max(ETHERNET_HEADER_LEN + PROBE_LEN);
        let mut out = Vec::with_capacity(VXLAN_HEADER_LEN + frame_len);
        // Flags: I (valid VNI); VNI in the upper 24 bits of the second word.
        out.extend_from_slice(&[0x08, 0, 0, 0]);
        out.extend_from_slice(&(VNI << 8).to_be_bytes());
        out.extend_from_slice(&dst_mac);
        out.extend_from_slice(&self.reply_mac);
        out.extend_from_slice(&PROBE_ETHERTYPE.to_be_bytes());
        out.extend_from_slice(PROBE_MAGIC);
        out.push(match (self.answer, self.declined) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        });
        out.push(u8::from(self.full));
        out.extend_from_slice(&self.from.0.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.reply_mac);
        out.resize(VXLAN_HEADER_LEN + frame_len, 0);
        out
    }

    /// Parses what a packet socket gives for one frame (the payload after the ethertype).
    pub fn parse(payload: &[u8]) -> Option<Probe> {
        let p = payload.get(..PROBE_LEN)?;
        if &p[..6] != PROBE_MAGIC || p[6] > 2 || p[7] > 1 {
            return None;
        }
        Some(Probe {
            answer: p[6] >= 1,
            declined: p[6] == 2,
            full: p[7] == 1,
            from: PeerName(u64::from_be_bytes(p[8..16].try_into().ok()?)),
            seq: u64::from_be_bytes(p[16..24].try_into().ok()?),
            reply_mac: p[24..30].try_into().ok()?,
        })
    }
}

/// A probe (or answer) for the prober task to send.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSend {
    /// The peer's underlay address and VXLAN port.
    pub to: SocketAddrV4,
    /// The peer's vxlan device MAC.
    pub dst_mac: [u8; 6],
    pub probe: Probe,
    /// Inner frame size.
    pub frame_len: usize,
}

/// What the prober reports: a probe frame arrived. (A probe that can't be sent is simply not
/// answered; the prober only logs it.)
#[derive(Clone, Copy, Debug)]
pub enum ProbeEvent {
    Received(Probe),
}

/// Sends probes from `sends` and reports every probe frame that reaches this host. Fails only
/// if the sockets can't be opened or read.
pub async fn run_prober(
    mut sends: mpsc::UnboundedReceiver<ProbeSend>,
    events: mpsc::UnboundedSender<ProbeEvent>,
) -> anyhow::Result<()> {
    let udp = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        .await
        .context("bind vxlan probe socket")?;
    set_dont_fragment(&udp).context("set don't-fragment on the vxlan probe socket")?;
    let packets = probe_receiver().context("open packet socket for vxlan probes")?;
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            send = sends.recv() => {
                let Some(send) = send else { return Ok(()) };
                let bytes = send.probe.emit(send.dst_mac, send.frame_len);
                if let Err(e) = udp.send_to(&bytes, SocketAddr::V4(send.to)).await {
                    tracing::debug!(to = %send.to, error = %e, "send vxlan probe");
                }
            }
            read = packets.recv(&mut buf) => {
                let n = read.context("read vxlan probe frame")?;
                if let Some(probe) = Probe::parse(&buf[..n]) {
                    let _ = events.send(ProbeEvent::Received(probe));
                }
            }
        }
    }
}

/// An AF_PACKET datagram socket for [`PROBE_ETHERTYPE`] frames on every interface of this netns.
/// A frame whose destination is the vxlan port's own MAC is passed up by the bridge, so it is
/// seen here once, on the bridge.
///
/// Sets IP_MTU_DISCOVER to IP_PMTUDISC_DO, so that a full-size probe that doesn't fit the path is
/// dropped (or refused with EMSGSIZE) instead of being fragmented on the way: a shrunk path MTU then
/// shows as lost full-size probes, and the peer moves to the sleeve. (Neither nix nor socket2 wraps
/// this option.)
#[allow(unsafe_code)]
fn set_dont_fragment(socket: &UdpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: the fd belongs to `socket`, which outlives the call; we pass a pointer to a c_int that
    // lives across the call and its exact size, as setsockopt(2) requires for IP_MTU_DISCOVER.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Tokio's `UdpSocket` serves only as a safe async owner of the fd: `recv(2)` on a packet socket
/// returns one frame like on a UDP socket, and nothing UDP-specific is ever called on it.
fn probe_receiver() -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let protocol = Protocol::from(i32::from(PROBE_ETHERTYPE.to_be()));
    let socket = Socket::new(Domain::PACKET, Type::DGRAM, Some(protocol))?;
    socket.set_nonblocking(true)?;
    let fd = std::os::fd::OwnedFd::from(socket);
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_round_trips_and_pads_to_size() {
        let p = Probe {
            answer: true,
            declined: false,
            full: true,
            from: PeerName(0x1234_5678_9abc),
            seq: 77,
            reply_mac: [2, 0, 0, 0, 0, 9],
        };
        let bytes = p.emit([2, 1, 1, 1, 1, 1], 1376 + 14);
        assert_eq!(bytes.len(), 8 + 1376 + 14);
        assert_eq!(&bytes[..8], &[0x08, 0, 0, 0, 0x6d, 0x65, 0x73, 0]);
        assert_eq!(&bytes[20..22], &PROBE_ETHERTYPE.to_be_bytes());
        assert_eq!(Probe::parse(&bytes[22..]), Some(p));
        assert_eq!(Probe::parse(&bytes[22..40]), None);
        let mut bad = bytes[22..].to_vec();
        bad[0] ^= 1;
        assert_eq!(Probe::parse(&bad), None);
    }
}

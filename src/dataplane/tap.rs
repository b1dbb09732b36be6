//! The TAP device through which the router exchanges Ethernet frames with the bridge.
//!
//! [`open_tap`] opens (creating if needed) a layer-2 TAP with no packet-info prefix, a single
//! queue and no virtio-net header, sets its MTU and brings it up. Putting it on the bridge with
//! `isolated on` is the caller's job (`Netlink::enslave`).
//!
//! Not here: reading and writing frames (the sleeve tasks own the device), and the bridge.
//!
//! Invariants: the offload mask is reset on every open. The mask is device-wide and outlives the
//! file descriptor of a persistent TAP, so an earlier reader that used `IFF_VNET_HDR` would
//! otherwise leave us receiving GSO super-frames with unfinished checksums (ping works, TCP
//! hangs). tun-rs issues `TUNSETOFFLOAD 0` itself whenever `offload(false)` is built, so this
//! module needs no `unsafe`. The device is not made persistent: it disappears when the daemon
//! closes it, and with it its bridge port.

use anyhow::Context;
use tun_rs::{DeviceBuilder, Layer};

/// Opens (creating if needed) the TAP `name` (layer 2, no packet info, single queue, no vnet
/// header), resets its offload flags, sets mtu, brings it up, and returns the tokio device.
/// Must be called inside a tokio runtime.
pub fn open_tap(name: &str, mtu: u32) -> anyhow::Result<tun_rs::AsyncDevice> {
    let mtu_bytes = u16::try_from(mtu)
        .ok()
        .with_context(|| format!("open tap {name}: mtu {mtu} is larger than 65535"))?;
    DeviceBuilder::new()
        .name(name)
        .layer(Layer::L2)
        .packet_information(false)
        .multi_queue(false)
        // Also what makes tun-rs reset the device-wide offload mask (TUNSETOFFLOAD 0).
        .offload(false)
        .mtu(mtu_bytes)
        .enable(true)
        .build_async()
        .with_context(|| format!("open tap {name} mtu {mtu}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netns::testing::{ip, TestNetns};

    #[test]
    fn open_tap_creates_an_up_tap_that_can_be_enslaved() {
        let Some(ns) = TestNetns::new() else { return };
        let left = ns.block_on(|nl| async move {
            let tap = open_tap("tap-t", 1420)?;
            let bridge = nl.ensure_bridge("br-t", 1500).await?;
            nl.enslave("tap-t", bridge, true).await?;
            assert_eq!(nl.link_kind("tap-t").await?.as_deref(), Some("tun"));
            let out = ip(&["-d", "link", "show", "tap-t"]);
            assert!(out.contains("tun type tap"), "{out}");
            assert!(out.contains("mtu 1420"), "{out}");
            assert!(out.contains("master br-t"), "{out}");
            assert!(out.contains("isolated on"), "{out}");
            drop(tap);
            // Not persistent: closing the last descriptor removes the device.
            anyhow::Ok(nl.link_index("tap-t").await?)
        });
        assert_eq!(left, None, "tap-t outlives its descriptor");
    }

    #[test]
    fn open_tap_refuses_an_mtu_over_u16() {
        let err = open_tap("tap-x", 70_000)
            .err()
            .expect("mtu 70000 is refused");
        assert!(format!("{err:#}").contains("mtu 70000"));
    }
}

//! The TAP device through which the router exchanges Ethernet frames with the bridge.
//!
//! [`open_tap`] opens (creating if needed) a layer-2 TAP with no packet-info prefix, a single
//! queue and the virtio-net header (`IFF_VNET_HDR`), sets its MTU and brings it up. Every frame
//! read or written starts with a `struct virtio_net_hdr` (`sleeve::offload::VnetHdr`): reads
//! give TCP super-frames of up to 64 KiB with partial checksums, writes may hand such
//! super-frames back, and the kernel delivers them to containers without re-segmenting.
//! Putting the TAP on the bridge with `isolated on` is the caller's job (`Netlink::enslave`).
//!
//! Not here: what the frames mean (the sleeve) and the bridge.
//!
//! Invariants: the offload mask is set explicitly on every open, to `CSUM | TSO4 | TSO6` and
//! nothing else (no UDP segmentation offload, no ECN), because the mask is device-wide and
//! outlives the descriptor of a persistent TAP: a mask left by an earlier reader would otherwise
//! decide what we receive. The descriptor we read and write is non-blocking; [`Tap::wait`] polls.
//! The device is not made persistent: it disappears when the daemon closes it.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use anyhow::Context;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tun_rs::{DeviceBuilder, Layer, SyncDevice};

/// `_IOW('T', 208, unsigned int)` from `include/uapi/linux/if_tun.h` (not in the libc crate).
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;

/// An open TAP with the virtio-net header; shared by the sleeve's reader and writer threads.
pub struct Tap {
    /// Keeps the device alive; `file` is a duplicate of its descriptor.
    _device: SyncDevice,
    file: File,
}

impl Tap {
    /// Reads one frame (virtio-net header first) into `buf`. Non-blocking: `WouldBlock` when
    /// nothing is queued.
    // HOT PATH
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame given as parts (virtio-net header first) with a single `writev`.
    // HOT PATH
    pub fn write(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        let want: usize = parts.iter().map(|p| p.len()).sum();
        loop {
            match (&self.file).write_vectored(parts) {
                Ok(n) if n == want => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "tap took {n} of {want} bytes of a frame"
                    )))
                }
                // The TAP queue towards the bridge is full for a moment.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait_for(PollFlags::POLLOUT, Duration::from_millis(10))?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until a frame can be read or `timeout` passes; returns whether one can.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        self.wait_for(PollFlags::POLLIN, timeout)
    }

    fn wait_for(&self, flags: PollFlags, timeout: Duration) -> io::Result<bool> {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), flags)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// Opens (creating if needed) the TAP `name` (layer 2, no packet info, single queue, virtio-net
/// header with TCP offloads), sets mtu and brings it up.
pub fn open_tap(name: &str, mtu: u32) -> anyhow::Result<Tap> {
    let mtu_bytes = u16::try_from(mtu)
        .ok()
        .with_context(|| format!("open tap {name}: mtu {mtu} is larger than 65535"))?;
    let device = DeviceBuilder::new()
        .name(name)
        .layer(Layer::L2)
        .packet_information(false)
        .multi_queue(false)
        .offload(true)
        .mtu(mtu_bytes)
        .enable(true)
        .build_sync()
        .with_context(|| format!("open tap {name} mtu {mtu}"))?;
    set_offload(
        &device,
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6,
    )
    .with_context(|| format!("set offloads (TUNSETOFFLOAD) on tap {name}"))?;
    let fd = device
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("duplicate descriptor of tap {name}"))?;
    let file = File::from(fd);
    let flags = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .with_context(|| format!("read flags of tap {name}"))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
        .with_context(|| format!("make tap {name} non-blocking"))?;
    Ok(Tap {
        _device: device,
        file,
    })
}

fn set_offload(device: &SyncDevice, mask: libc::c_uint) -> io::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: the descriptor is a live TUN/TAP descriptor owned by `device` for the whole call,
    // and TUNSETOFFLOAD takes its argument by value (an unsigned int of TUN_F_* bits).
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), TUNSETOFFLOAD, mask) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
            assert!(out.contains("vnet_hdr"), "{out}");
            assert!(out.contains("tun type tap"), "{out}");
            assert!(out.contains("mtu 1420"), "{out}");
            assert!(out.contains("master br-t"), "{out}");
            assert!(out.contains("isolated on"), "{out}");
            drop(tap);
            // Not persistent: closing the last descriptor removes the device. Another test
            // thread that forks a child at this moment holds the descriptor until its exec
            // closes it, so give that a moment.
            for _ in 0..100 {
                if nl.link_index("tap-t").await?.is_none() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
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

//! The sleeve's UDP socket with segmentation offloads: UDP GSO on send (one `sendmsg` carries up
//! to 64 datagrams of equal size) and GRO on receive (one `recvmsg` returns several datagrams from
//! one sender back to back, with their stride).
//!
//! The cmsg handling lives in `quinn-udp`, which also detects kernels and devices without GSO
//! (it then sends one datagram per call) and without GRO (one datagram per read). The socket is
//! non-blocking; [`Udp::wait`] polls, so the sleeve's threads can check for shutdown.
//!
//! Not here: what the datagrams hold (`frame.rs`) and who gets them (`mod.rs`).

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};

/// Socket buffer size we ask for in each direction (the kernel caps it at `rmem_max`/`wmem_max`).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Largest UDP payload of one `sendmsg`, GSO or not.
pub const SEND_MAX_BYTES: usize = 65_000;

/// One received batch: `len` bytes at the start of the buffer, datagrams of `stride` bytes each
/// (the last may be shorter), all from `from`.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    /// Total bytes.
    pub len: usize,
    /// Size of each datagram but the last.
    pub stride: usize,
    /// The sender.
    pub from: SocketAddr,
}

/// The sleeve socket, shared by the sending and receiving threads.
pub struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl Udp {
    /// Takes over `socket`: makes it non-blocking, enables GRO and enlarges its buffers.
    pub fn new(socket: UdpSocket) -> io::Result<Udp> {
        let state = UdpSocketState::new((&socket).into())?;
        // Best effort: small buffers only cost throughput.
        let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
        let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
        Ok(Udp { socket, state })
    }

    /// How many datagrams one [`Udp::send`] may carry (1 without GSO).
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    /// Sends `contents` to `to` as datagrams of `segment_size` bytes (the last may be shorter),
    /// or as one datagram when `segment_size` is `None`. Waits while the socket buffer is full.
    // HOT PATH
    pub fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment_size.filter(|s| *s < contents.len()),
            src_ip: None,
        };
        loop {
            match self.state.try_send((&self.socket).into(), &transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait_for(PollFlags::POLLOUT, Duration::from_millis(10))?;
                }
                other => return other,
            }
        }
    }

    /// Receives one batch into `buf`. Non-blocking: `WouldBlock` when nothing is queued.
    // HOT PATH
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let mut meta = [RecvMeta::default()];
        let mut bufs = [IoSliceMut::new(buf)];
        let n = self
            .state
            .recv((&self.socket).into(), &mut bufs, &mut meta)?;
        debug_assert_eq!(n, 1, "one buffer, one message");
        let m = meta[0];
        Ok(Received {
            len: m.len,
            stride: m.stride.max(1),
            from: m.addr,
        })
    }

    /// Waits until a datagram can be read or `timeout` passes; returns whether one can.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        self.wait_for(PollFlags::POLLIN, timeout)
    }

    fn wait_for(&self, flags: PollFlags, timeout: Duration) -> io::Result<bool> {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.socket.as_fd(), flags)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// The MTU of the kernel's route to `to`: the interface's, or a smaller path MTU the kernel
/// learned from ICMP. What a datagram to `to` may measure, IP header included, without being
/// refused or fragmented. `None` when there is no route.
#[allow(unsafe_code)]
pub fn route_mtu(to: SocketAddr) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let local: SocketAddr = match to {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).ok()?;
    socket.connect(to).ok()?;
    let (level, name) = match to {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the fd belongs to `socket`, which outlives the call; `value` and `len` live across
    // it and `len` holds `value`'s exact size, as getsockopt(2) requires for IP_MTU/IPV6_MTU.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| usize::try_from(value).ok()).flatten()
}

//! The sleeve's UDP socket and how it batches datagrams: UDP GSO on send (one `sendmsg` carries
//! up to 64 datagrams of equal size) and GRO on receive (one `recvmsg` returns several datagrams
//! from one sender back to back, with their stride) where the kernel has them; otherwise, or when
//! `--udp-offload off` says so, one `sendmmsg(2)` per run of datagrams and one `recvmmsg(2)` for
//! up to [`RECV_SLOTS`] datagrams, each in a slot of its own.
//!
//! The GSO/GRO cmsg handling lives in `quinn-udp`, which also detects kernels and devices without
//! GSO (it says so through `max_gso_segments`, at start or after a send failed with EIO) and
//! without GRO. [`Udp::batching`] reports what is in use. The socket is non-blocking;
//! [`Udp::wait`] polls, so the sleeve's threads can check for shutdown.
//!
//! Not here: what the datagrams hold (`frame.rs`) and who gets them (`mod.rs`).
//!
//! Invariants: no heap allocation per call in steady state (the `mmsghdr` and `iovec` arrays live
//! on the caller's stack for the one call that needs them, so the two threads that share the
//! socket never wait on each other); every datagram of a batch is handed out, in order, exactly
//! once by [`RecvBuf::datagrams`]; GRO is switched off on the socket whenever `recvmmsg` reads it,
//! so a read never merges datagrams it can't tell apart.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};

/// Socket buffer size we ask for in each direction (the kernel caps it at `rmem_max`/`wmem_max`).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Largest UDP payload of one [`Udp::send`], GSO or not.
pub const SEND_MAX_BYTES: usize = 65_000;
/// Most datagrams one `sendmmsg` carries (the same as the kernel's GSO limit, `UDP_MAX_SEGMENTS`).
const SEND_SEGMENTS_MAX: usize = 64;
/// Most datagrams one `recvmmsg` reads.
pub const RECV_SLOTS: usize = 32;
/// Room for one datagram in a `recvmmsg` slot: any UDP payload fits, so none is cut short.
const SLOT_BYTES: usize = 1 << 16;
/// Room for one GRO batch (the kernel merges at most 64 KiB).
const GRO_BUFFER_BYTES: usize = 1 << 17;

/// Whether the sleeve may use the kernel's UDP segmentation offloads (`--udp-offload`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Offload {
    /// GSO and GRO where the kernel has them, `sendmmsg`/`recvmmsg` where it doesn't.
    #[default]
    Auto,
    /// Always `sendmmsg`/`recvmmsg`.
    Off,
}

impl Offload {
    /// Parses the `--udp-offload` value: `auto` or `off`.
    pub fn parse(s: &str) -> Option<Offload> {
        match s {
            "auto" => Some(Offload::Auto),
            "off" => Some(Offload::Off),
            _ => None,
        }
    }
}

/// How the socket batches datagrams, each direction on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Sends use UDP GSO (else `sendmmsg`).
    pub gso: bool,
    /// Receives use UDP GRO (else `recvmmsg`).
    pub gro: bool,
}

impl Batching {
    /// `gso/gro`, `sendmmsg/recvmmsg`, or a mix of the two (`gso/recvmmsg`, `sendmmsg/gro`).
    pub fn name(self) -> &'static str {
        match (self.gso, self.gro) {
            (true, true) => "gso/gro",
            (true, false) => "gso/recvmmsg",
            (false, true) => "sendmmsg/gro",
            (false, false) => "sendmmsg/recvmmsg",
        }
    }

    /// A non-zero code for an atomic (see [`Batching::from_code`]).
    pub fn code(self) -> u8 {
        1 | u8::from(self.gso) << 1 | u8::from(self.gro) << 2
    }

    /// The batching of a [`Batching::code`]; `None` for 0 (not known yet).
    pub fn from_code(code: u8) -> Option<Batching> {
        (code & 1 != 0).then_some(Batching {
            gso: code & 2 != 0,
            gro: code & 4 != 0,
        })
    }
}

/// The sleeve socket, shared by the sending and receiving threads.
pub struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
    offload: Offload,
    /// GRO is on for the socket (so reads go through `quinn-udp`).
    gro: bool,
}

impl Udp {
    /// Takes over `socket`: makes it non-blocking, enables GRO unless `offload` is off, and
    /// enlarges its buffers.
    pub fn new(socket: UdpSocket, offload: Offload) -> io::Result<Udp> {
        // Also switches GRO on where the kernel has it.
        let state = UdpSocketState::new((&socket).into())?;
        // Best effort: small buffers only cost throughput.
        let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
        let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
        let gro = match offload {
            Offload::Auto => state.gro_segments() > 1,
            Offload::Off => {
                // `recvmmsg` can't tell merged datagrams apart: GRO must be off, or we fail.
                use nix::sys::socket::{setsockopt, sockopt::UdpGroSegment};
                if state.gro_segments() > 1 {
                    setsockopt(&socket, UdpGroSegment, &false)?;
                }
                false
            }
        };
        Ok(Udp {
            socket,
            state,
            offload,
            gro,
        })
    }

    /// How datagrams are batched now (GSO can stop working while we run; see the module doc).
    pub fn batching(&self) -> Batching {
        Batching {
            gso: self.gso(),
            gro: self.gro,
        }
    }

    fn gso(&self) -> bool {
        self.offload == Offload::Auto && self.state.max_gso_segments() > 1
    }

    /// How many datagrams one [`Udp::send`] may carry.
    pub fn max_segments(&self) -> usize {
        if self.gso() {
            self.state.max_gso_segments()
        } else {
            SEND_SEGMENTS_MAX
        }
    }

    /// Sends `contents` to `to` as datagrams of `segment_size` bytes (the last may be shorter),
    /// or as one datagram when `segment_size` is `None`. At most [`Udp::max_segments`] datagrams.
    /// Waits while the socket buffer is full.
    // HOT PATH
    pub fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let segment_size = segment_size.filter(|s| *s > 0 && *s < contents.len());
        match segment_size {
            Some(segment) if !self.gso() => self.send_mmsg(to, contents, segment),
            _ => match self.send_quinn(to, contents, segment_size) {
                // quinn-udp turned GSO off after the kernel refused it: send these again.
                Err(_) if segment_size.is_some() && !self.gso() => {
                    self.send_mmsg(to, contents, segment_size.unwrap_or(contents.len()))
                }
                other => other,
            },
        }
    }

    fn send_quinn(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size,
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

    /// Sends `contents` cut into datagrams of `segment` bytes with as few `sendmmsg` calls as the
    /// socket buffer allows.
    // HOT PATH
    #[allow(unsafe_code)]
    fn send_mmsg(&self, to: SocketAddr, contents: &[u8], segment: usize) -> io::Result<()> {
        let count = contents.len().div_ceil(segment);
        if count > SEND_SEGMENTS_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{count} datagrams in one send; at most {SEND_SEGMENTS_MAX}"),
            ));
        }
        let name = socket2::SockAddr::from(to);
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; SEND_SEGMENTS_MAX];
        for (iov, chunk) in iovs.iter_mut().zip(contents.chunks(segment)) {
            // sendmmsg(2) only reads through the pointer.
            iov.iov_base = chunk.as_ptr().cast_mut().cast();
            iov.iov_len = chunk.len();
        }
        // SAFETY: all-zero bytes are a valid mmsghdr (null pointers, zero lengths and flags).
        let mut msgs: [libc::mmsghdr; SEND_SEGMENTS_MAX] = unsafe { std::mem::zeroed() };
        for (msg, iov) in msgs.iter_mut().zip(iovs.iter_mut()).take(count) {
            msg.msg_hdr.msg_name = name.as_ptr().cast_mut().cast();
            msg.msg_hdr.msg_namelen = name.len();
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < count {
            let left = &mut msgs[sent..count];
            // SAFETY: the fd belongs to `self.socket`, open for as long as `self` lives; `left`
            // holds `left.len()` initialised headers whose name, iovec and data pointers point
            // into `name`, `iovs` and `contents`, all alive and unmoved until the call returns.
            let rc = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    left.as_mut_ptr(),
                    left.len() as libc::c_uint,
                    0,
                )
            };
            if rc > 0 {
                sent += rc as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => {
                    self.wait_for(PollFlags::POLLOUT, Duration::from_millis(10))?;
                }
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
        Ok(())
    }

    /// A receive buffer that fits how this socket batches.
    pub fn recv_buf(&self) -> RecvBuf {
        let (slot_bytes, slots) = if self.gro {
            (GRO_BUFFER_BYTES, 1)
        } else {
            (SLOT_BYTES, RECV_SLOTS)
        };
        RecvBuf {
            buf: vec![0u8; slot_bytes * slots],
            slot_bytes,
            msgs: [Msg::EMPTY; RECV_SLOTS],
            count: 0,
        }
    }

    /// Receives one batch into `into` (made by [`Udp::recv_buf`]): a GRO batch from one sender,
    /// or up to [`RECV_SLOTS`] datagrams. Non-blocking: `WouldBlock` when nothing is queued.
    // HOT PATH
    pub fn recv(&self, into: &mut RecvBuf) -> io::Result<()> {
        into.count = 0;
        if self.gro {
            let mut meta = [RecvMeta::default()];
            let mut bufs = [IoSliceMut::new(&mut into.buf)];
            let n = self
                .state
                .recv((&self.socket).into(), &mut bufs, &mut meta)?;
            debug_assert_eq!(n, 1, "one buffer, one message");
            into.msgs[0] = Msg {
                len: meta[0].len,
                stride: meta[0].stride.max(1),
                from: meta[0].addr,
            };
            into.count = 1;
            Ok(())
        } else {
            self.recv_mmsg(into)
        }
    }

    // HOT PATH
    #[allow(unsafe_code)]
    fn recv_mmsg(&self, into: &mut RecvBuf) -> io::Result<()> {
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; RECV_SLOTS];
        for (iov, slot) in iovs.iter_mut().zip(into.buf.chunks_mut(into.slot_bytes)) {
            iov.iov_base = slot.as_mut_ptr().cast();
            iov.iov_len = slot.len();
        }
        let slots = into.buf.len() / into.slot_bytes;
        // SAFETY: all-zero bytes are a valid sockaddr_storage and a valid mmsghdr.
        let mut names: [libc::sockaddr_storage; RECV_SLOTS] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; RECV_SLOTS] = unsafe { std::mem::zeroed() };
        for ((msg, iov), name) in msgs.iter_mut().zip(iovs.iter_mut()).zip(names.iter_mut()) {
            msg.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
            msg.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
        }
        let got = loop {
            // SAFETY: the fd belongs to `self.socket`, open for as long as `self` lives; the first
            // `slots` headers point at `names`, `iovs` and slots of `into.buf`, which stay alive
            // and unmoved until the call returns and are each as long as their header says. No
            // timeout pointer: the socket is non-blocking.
            let rc = unsafe {
                libc::recvmmsg(
                    self.socket.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    slots as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                break rc as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        for ((out, msg), name) in into.msgs.iter_mut().zip(&msgs).zip(&names).take(got) {
            let len = (msg.msg_len as usize).min(into.slot_bytes);
            *out = Msg {
                len,
                // One datagram per slot.
                stride: len.max(1),
                from: socket_addr(name).unwrap_or(Msg::EMPTY.from),
            };
        }
        into.count = got;
        Ok(())
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

/// The address in a `sockaddr_storage` the kernel filled in, if it is IPv4 or IPv6.
#[allow(unsafe_code)]
fn socket_addr(name: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(name.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in; sockaddr_storage is at
            // least as large and as aligned as any socket address.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// One received message: `len` bytes at the start of its slot, datagrams of `stride` bytes (the
/// last may be shorter), all from `from`.
#[derive(Clone, Copy, Debug)]
struct Msg {
    len: usize,
    stride: usize,
    from: SocketAddr,
}

impl Msg {
    const EMPTY: Msg = Msg {
        len: 0,
        stride: 1,
        from: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
    };
}

/// Where [`Udp::recv`] puts a batch: one slot holding a GRO batch, or [`RECV_SLOTS`] slots of one
/// datagram each. Made once per receiving thread by [`Udp::recv_buf`] and reused.
pub struct RecvBuf {
    buf: Vec<u8>,
    slot_bytes: usize,
    msgs: [Msg; RECV_SLOTS],
    /// Messages in `msgs` filled by the last receive.
    count: usize,
}

impl RecvBuf {
    /// The datagrams of the last batch, in the order they arrived, each with its sender.
    pub fn datagrams(&mut self) -> Datagrams<'_> {
        Datagrams {
            slots: self.buf.chunks_mut(self.slot_bytes),
            msgs: self.msgs[..self.count].iter(),
            current: <&mut [u8]>::default().chunks_mut(1),
            from: Msg::EMPTY.from,
        }
    }
}

/// Iterator over the datagrams of a [`RecvBuf`]: mutable, so they can be opened in place.
pub struct Datagrams<'a> {
    slots: std::slice::ChunksMut<'a, u8>,
    msgs: std::slice::Iter<'a, Msg>,
    /// The datagrams left in the current message.
    current: std::slice::ChunksMut<'a, u8>,
    from: SocketAddr,
}

impl<'a> Iterator for Datagrams<'a> {
    type Item = (&'a mut [u8], SocketAddr);

    // HOT PATH
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(datagram) = self.current.next() {
                return Some((datagram, self.from));
            }
            let (msg, slot) = (self.msgs.next()?, self.slots.next()?);
            let len = msg.len.min(slot.len());
            self.current = slot[..len].chunks_mut(msg.stride.max(1));
            self.from = msg.from;
        }
    }
}

/// The MTU of the kernel's route to `to`: the interface's, or a smaller path MTU the kernel
/// learned from ICMP. What a datagram to `to` may measure, IP header included, without being
/// refused or fragmented. `None` when there is no route.
#[allow(unsafe_code)]
pub fn route_mtu(to: SocketAddr) -> Option<usize> {
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

#[cfg(test)]
mod tests {
    //! Runs of datagrams between two sockets on loopback, in each batching mode; no root needed.

    use super::*;
    use std::time::Instant;

    fn socket(offload: Offload) -> (Udp, SocketAddr) {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        let addr = s.local_addr().expect("bound socket has an address");
        (Udp::new(s, offload).expect("set up socket"), addr)
    }

    /// `count` datagrams of `size` bytes (the last `last` bytes), each filled with its number.
    fn run_of(count: usize, size: usize, last: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..count {
            let len = if i + 1 == count { last } else { size };
            out.extend(std::iter::repeat_n(i as u8, len));
        }
        out
    }

    /// Receives until `count` datagrams arrived (or 5 s passed); each with its sender.
    fn receive(udp: &Udp, count: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut buf = udp.recv_buf();
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(5);
        while got.len() < count && Instant::now() < end {
            match udp.recv(&mut buf) {
                Ok(()) => got.extend(buf.datagrams().map(|(d, from)| (d.to_vec(), from))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    udp.wait(Duration::from_millis(100)).expect("poll");
                }
                Err(e) => panic!("receive: {e}"),
            }
        }
        got
    }

    fn check_run(sender: Offload, receiver: Offload) {
        let (tx, tx_addr) = socket(sender);
        let (rx, rx_addr) = socket(receiver);
        let contents = run_of(10, 1200, 500);
        tx.send(rx_addr, &contents, Some(1200)).expect("send run");
        tx.send(rx_addr, &[0xaa; 40], None).expect("send one");
        let got = receive(&rx, 11);
        let lens: Vec<usize> = got.iter().map(|(d, _)| d.len()).collect();
        let mut want = vec![1200; 9];
        want.extend([500, 40]);
        assert_eq!(lens, want, "{sender:?} -> {receiver:?}");
        for (i, (d, from)) in got.iter().enumerate().take(10) {
            assert!(d.iter().all(|b| *b == i as u8), "datagram {i} mixed up");
            assert_eq!(*from, tx_addr);
        }
    }

    #[test]
    fn forced_fallback_reports_sendmmsg_and_recvmmsg() {
        let (udp, _) = socket(Offload::Off);
        assert_eq!(udp.batching().name(), "sendmmsg/recvmmsg");
        assert_eq!(udp.max_segments(), SEND_SEGMENTS_MAX);
        assert_eq!(
            Batching::from_code(udp.batching().code()),
            Some(udp.batching())
        );
        assert_eq!(Batching::from_code(0), None);
    }

    #[test]
    fn sendmmsg_run_arrives_as_separate_datagrams_through_recvmmsg() {
        check_run(Offload::Off, Offload::Off);
    }

    #[test]
    fn a_gso_run_is_split_again_for_a_recvmmsg_receiver() {
        // Needs GRO off on the receiver: with it on, the kernel hands loopback GSO runs over
        // whole, and the receiver would see one long datagram.
        check_run(Offload::Auto, Offload::Off);
    }

    #[test]
    fn a_sendmmsg_run_reaches_a_gro_receiver() {
        check_run(Offload::Off, Offload::Auto);
    }

    #[test]
    fn too_many_segments_are_refused_not_sent_in_part() {
        let (tx, _) = socket(Offload::Off);
        let (_rx, rx_addr) = socket(Offload::Off);
        let contents = vec![0u8; 100 * (SEND_SEGMENTS_MAX + 1)];
        let e = tx.send(rx_addr, &contents, Some(100)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}

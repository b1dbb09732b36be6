//! The virtio-net header and TCP segmentation offload, done by hand where the kernel can't.
//!
//! The TAP hands us TCP super-frames (up to 64 KiB, one set of headers, `gso_size` bytes of payload
//! per segment) with a [`VnetHdr`] in front, and takes the same back. The sleeve cuts a super-frame
//! into chunks of `gso_size` payload bytes, each with a copy of the headers, so that one lost
//! datagram costs one TCP segment, not 64 KiB. The receiver joins consecutive chunks back into a
//! super-frame and fixes the headers with [`fix_segment`]; a run with a gap simply becomes two
//! super-frames. For peers without offload support [`fix_segment`] with `complete` makes each
//! chunk an ordinary frame with a finished checksum, and [`finish_checksum`] does the same for
//! small frames whose checksum the container left to "hardware".
//!
//! Heads up: `include/uapi/linux/virtio_net.h` (header layout, native endian for a legacy TAP),
//! `include/linux/virtio_net.h` (`virtio_net_hdr_to_skb`: what the kernel checks on write), and
//! RFC 1071 (the Internet checksum). Pure functions: no IO, no allocation.
//!
//! Invariants: functions here never panic on any input; they return [`OffloadError`] instead.

/// Length of `struct virtio_net_hdr` (no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is partial.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN`, or-ed into the type.
pub const GSO_ECN: u8 = 0x80;
/// Largest frame (Ethernet header included) we build or accept.
pub const FRAME_MAX: usize = u16::MAX as usize;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
const IPPROTO_TCP: u8 = 6;
const UDP_CSUM_OFFSET: u16 = 6;

/// Why a frame's offload metadata can't be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// A GSO type other than TCP over IPv4 or IPv6.
    #[error("unsupported GSO type {got:#04x}")]
    GsoType {
        /// The type received.
        got: u8,
    },
    /// Offsets point outside the frame or headers are inconsistent.
    #[error("offload offsets don't fit the frame")]
    Layout,
}

/// `struct virtio_net_hdr`, as the TAP reads and writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM` and friends.
    pub flags: u8,
    /// `GSO_*`.
    pub gso_type: u8,
    /// Length of the headers (the kernel's value is only a hint).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (the L4 header).
    pub csum_start: u16,
    /// Where the checksum goes, relative to `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the header at the start of `buf`. A legacy TAP uses native byte order.
    pub fn parse(buf: &[u8]) -> Option<VnetHdr> {
        let b = buf.first_chunk::<VNET_HDR_LEN>()?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// Writes the header in the TAP's byte order.
    pub fn emit(&self, out: &mut [u8; VNET_HDR_LEN]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }

    /// Whether the frame is a TCP super-frame to be cut into segments.
    pub fn is_gso(&self) -> bool {
        self.gso_type != GSO_NONE
    }
}

/// Where the headers of a TCP frame are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header (`csum_start`).
    pub l4: usize,
    /// Length of all headers: the payload starts here.
    pub hdr_len: usize,
    /// IPv6 rather than IPv4.
    pub v6: bool,
}

impl Layout {
    /// Finds and checks the headers of a TCP frame described by `gso_type` and `csum_start`.
    pub fn parse(gso_type: u8, csum_start: u16, frame: &[u8]) -> Result<Layout, OffloadError> {
        let v6 = match gso_type & !GSO_ECN {
            GSO_TCPV4 => false,
            GSO_TCPV6 => true,
            got => return Err(OffloadError::GsoType { got }),
        };
        let ethertype = |at: usize| {
            frame
                .get(at..at + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
        };
        let l3 = match ethertype(12) {
            Some(ETH_P_8021Q) => 18,
            Some(_) => 14,
            None => return Err(OffloadError::Layout),
        };
        let want = if v6 { ETH_P_IPV6 } else { ETH_P_IPV4 };
        if ethertype(l3 - 2) != Some(want) {
            return Err(OffloadError::Layout);
        }
        let l4 = usize::from(csum_start);
        let min_l3 = if v6 { 40 } else { 20 };
        let doff = frame.get(l4 + 12).ok_or(OffloadError::Layout)? >> 4;
        let hdr_len = l4 + usize::from(doff) * 4;
        if l4 < l3 + min_l3 || doff < 5 || hdr_len > frame.len() {
            return Err(OffloadError::Layout);
        }
        if !v6 && (frame[l3] >> 4 != 4 || l3 + usize::from(frame[l3] & 0x0f) * 4 > l4) {
            return Err(OffloadError::Layout);
        }
        Ok(Layout {
            l3,
            l4,
            hdr_len,
            v6,
        })
    }
}

/// Makes `frame` (headers copied from a super-frame, followed by the payload that started
/// `offset` bytes into the super-frame's payload) a valid TCP frame: IP length (and IPv4 id and
/// header checksum), TCP sequence number and flags. `first`/`last` say whether the frame begins
/// or ends the super-frame. The TCP checksum field gets the pseudo-header sum (what
/// `F_NEEDS_CSUM` expects), or with `complete` the finished checksum.
pub fn fix_segment(
    frame: &mut [u8],
    at: &Layout,
    offset: usize,
    seg_index: u16,
    first: bool,
    last: bool,
    complete: bool,
) -> Result<(), OffloadError> {
    if frame.len() < at.hdr_len || frame.len() > FRAME_MAX {
        return Err(OffloadError::Layout);
    }
    let tcp_len = frame.len() - at.l4;
    let l3_len = at.l4 - at.l3 + tcp_len;
    let mut pseudo;
    if at.v6 {
        let payload = u16::try_from(l3_len - 40).map_err(|_| OffloadError::Layout)?;
        frame[at.l3 + 4..at.l3 + 6].copy_from_slice(&payload.to_be_bytes());
        pseudo = sum(&frame[at.l3 + 8..at.l3 + 40], 0);
    } else {
        let ihl = usize::from(frame[at.l3] & 0x0f) * 4;
        let tot = u16::try_from(l3_len).map_err(|_| OffloadError::Layout)?;
        frame[at.l3 + 2..at.l3 + 4].copy_from_slice(&tot.to_be_bytes());
        let id = u16::from_be_bytes([frame[at.l3 + 4], frame[at.l3 + 5]]).wrapping_add(seg_index);
        frame[at.l3 + 4..at.l3 + 6].copy_from_slice(&id.to_be_bytes());
        frame[at.l3 + 10..at.l3 + 12].copy_from_slice(&[0, 0]);
        let check = !fold(sum(&frame[at.l3..at.l3 + ihl], 0));
        frame[at.l3 + 10..at.l3 + 12].copy_from_slice(&check.to_be_bytes());
        pseudo = sum(&frame[at.l3 + 12..at.l3 + 20], 0);
    }
    pseudo += u64::from(IPPROTO_TCP) + tcp_len as u64;
    let tcp = &mut frame[at.l4..];
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]).wrapping_add(offset as u32);
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    if !last {
        tcp[13] &= !(TCP_FIN | TCP_PSH);
    }
    if !first {
        tcp[13] &= !TCP_CWR;
    }
    tcp[16..18].copy_from_slice(&fold(pseudo).to_be_bytes());
    if complete {
        let check = !fold(sum(tcp, 0));
        tcp[16..18].copy_from_slice(&check.to_be_bytes());
    }
    Ok(())
}

/// Finishes a partial checksum (`F_NEEDS_CSUM`): the field already holds the pseudo-header sum.
pub fn finish_checksum(
    frame: &mut [u8],
    csum_start: u16,
    csum_offset: u16,
) -> Result<(), OffloadError> {
    let start = usize::from(csum_start);
    let field = start + usize::from(csum_offset);
    if field + 2 > frame.len() {
        return Err(OffloadError::Layout);
    }
    let mut check = !fold(sum(&frame[start..], 0));
    if check == 0 && csum_offset == UDP_CSUM_OFFSET {
        check = 0xffff; // zero means "no checksum" in UDP
    }
    frame[field..field + 2].copy_from_slice(&check.to_be_bytes());
    Ok(())
}

/// One's complement sum of `data` as big-endian 16-bit words, unfolded, added to `acc`.
// HOT PATH
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    // Summing 32-bit words and folding later gives the same result (2^16 = 1 mod 2^16 - 1).
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rem = chunks.remainder();
    let mut tail = [0u8; 4];
    tail[..rem.len()].copy_from_slice(rem);
    acc + u64::from(u32::from_be_bytes(tail))
}

/// Folds an unfolded sum to 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP (20-byte header) frame with `payload`, checksum partial.
    fn tcp4(payload: &[u8], flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[14 + 4..14 + 6].copy_from_slice(&0x1234u16.to_be_bytes());
        f[14 + 8] = 64;
        f[14 + 9] = IPPROTO_TCP;
        f[14 + 12..14 + 16].copy_from_slice(&[10, 0, 0, 1]);
        f[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 2]);
        f[34 + 4..34 + 8].copy_from_slice(&1000u32.to_be_bytes());
        f[34 + 12] = 5 << 4;
        f[34 + 13] = flags;
        f.extend_from_slice(payload);
        f
    }

    /// Reference checksum: RFC 1071, byte pairs.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for pair in data.chunks(2) {
            let w = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            acc += u32::from(w);
        }
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    fn tcp_checksum_ok(f: &[u8]) -> bool {
        let tcp = &f[34..];
        let mut pseudo = f[26..34].to_vec();
        pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(tcp);
        if pseudo.len() % 2 == 1 {
            pseudo.push(0);
        }
        reference(&pseudo) == 0xffff
    }

    #[test]
    fn sum_matches_rfc1071_for_all_lengths() {
        let data: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        for n in 0..data.len() {
            assert_eq!(fold(sum(&data[..n], 0)), reference(&data[..n]), "len {n}");
        }
    }

    #[test]
    fn vnet_header_round_trips() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 86,
            gso_size: 1428,
            csum_start: 54,
            csum_offset: 16,
        };
        let mut b = [0u8; VNET_HDR_LEN];
        h.emit(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    #[test]
    fn segments_of_a_super_frame_are_valid_tcp() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let sup = tcp4(&payload, TCP_PSH | TCP_FIN | TCP_CWR);
        let at = Layout::parse(GSO_TCPV4, 34, &sup).unwrap();
        assert_eq!(at.hdr_len, 54);
        let chunks: Vec<&[u8]> = payload.chunks(1400).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut f = [&sup[..54], chunk].concat();
            let (first, last) = (i == 0, i == chunks.len() - 1);
            fix_segment(&mut f, &at, i * 1400, i as u16, first, last, true).unwrap();
            assert_eq!(reference(&f[14..34]), 0xffff, "ip header checksum");
            assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, f.len() - 14);
            assert_eq!(u16::from_be_bytes([f[18], f[19]]), 0x1234 + i as u16);
            let seq = u32::from_be_bytes([f[38], f[39], f[40], f[41]]);
            assert_eq!(seq, 1000 + (i * 1400) as u32);
            assert_eq!(f[47] & TCP_FIN != 0, last);
            assert_eq!(f[47] & TCP_PSH != 0, last);
            assert_eq!(f[47] & TCP_CWR != 0, first);
            assert!(tcp_checksum_ok(&f), "segment {i}");
        }
    }

    #[test]
    fn partial_checksum_is_the_pseudo_header_sum() {
        let mut f = tcp4(b"hello world", 0);
        let at = Layout::parse(GSO_TCPV4, 34, &f).unwrap();
        fix_segment(&mut f, &at, 0, 0, true, true, false).unwrap();
        finish_checksum(&mut f, 34, 16).unwrap();
        assert!(tcp_checksum_ok(&f));
    }

    #[test]
    fn bad_layouts_are_errors_not_panics() {
        let f = tcp4(b"x", 0);
        assert_eq!(
            Layout::parse(3, 34, &f),
            Err(OffloadError::GsoType { got: 3 })
        );
        assert_eq!(Layout::parse(GSO_TCPV6, 34, &f), Err(OffloadError::Layout));
        for start in [0u16, 20, 50, 54, 60, u16::MAX] {
            assert!(Layout::parse(GSO_TCPV4, start, &f).is_err(), "{start}");
        }
        for n in 0..f.len() {
            let _ = Layout::parse(GSO_TCPV4, 34, &f[..n]);
            let mut g = f[..n].to_vec();
            let _ = finish_checksum(&mut g, 34, 16);
        }
        let at = Layout::parse(GSO_TCPV4, 34, &f).unwrap();
        let mut short = f[..40].to_vec();
        assert!(fix_segment(&mut short, &at, 0, 0, true, true, true).is_err());
    }
}

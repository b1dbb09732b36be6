//! Sleeve wire format: the outer header and the body of frames, parsed in place.
//!
//! ```text
//! header (16 bytes, the AEAD's associated data)
//!   [kind u8][flags u8: FLAG_SEGMENT | FLAG_RELAY_ONLY][reserved u16 = 0][receiver_index u32 BE]
//!   [counter u64 BE]
//! body (the plaintext; sealed datagrams append a 16-byte tag after it)
//!   [src peer 6][dst peer 6, all zero = broadcast][hop_limit u8][frame_count u8]
//!   frame_count x [len u16 BE][ethernet frame]
//! segment body (header flag FLAG_SEGMENT; only sent to peers that announced offload support)
//!   [src peer 6][dst peer 6][hop_limit u8][reserved u8 = 0]
//!   [gso_type u8][reserved u8][hdr_len u16][gso_size u16][csum_start u16][csum_offset u16]
//!   [group u32][index u16][count u16]
//!   [hdr_len bytes: the super-frame's headers][payload bytes index*gso_size.. of the super-frame]
//! ```
//! A segment is one chunk of a TCP super-frame (see `offload.rs`); the receiver joins consecutive
//! chunks of a group back into a super-frame.
//!
//! Parsing borrows the input and never allocates; emitting writes into caller-owned buffers.
//! Nothing here touches keys or sockets (`crypto.rs`, `mod.rs`).
//!
//! Invariants: a `Frames` iterator only exists for a body whose frame lengths were all checked, so
//! iterating it cannot fail; every frame it yields is at least an Ethernet header long.

use mesh::PeerName;

/// Length of the outer header.
pub const HEADER_LEN: usize = 16;
/// Length of the body header (src, dst, hop_limit, frame_count).
pub const BODY_HEADER_LEN: usize = 14;
/// Length of the length prefix before each frame.
pub const FRAME_PREFIX_LEN: usize = 2;
/// Smallest frame we accept: an Ethernet header.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Offset of `hop_limit` within the body.
pub const HOP_LIMIT_OFFSET: usize = 12;
/// Offset of `frame_count` within the body.
pub const FRAME_COUNT_OFFSET: usize = 13;
/// Header flag: the body is one segment of a super-frame.
pub const FLAG_SEGMENT: u8 = 0x01;
/// Header flag: the receiver already got these frames over kernel VXLAN from the source; it
/// must only relay them along the source's broadcast tree, not deliver them to its TAP.
/// Only ever sent to peers that advertised VXLAN support.
pub const FLAG_RELAY_ONLY: u8 = 0x02;
/// Length of [`SegmentMeta`] on the wire.
pub const SEGMENT_META_LEN: usize = 18;

/// Why a datagram could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The input ends before the structure it should hold.
    #[error("truncated datagram")]
    Truncated,
    /// The header's kind byte is not one we know.
    #[error("unknown datagram kind {got}")]
    UnknownKind {
        /// The kind byte received.
        got: u8,
    },
    /// The reserved header field is not zero.
    #[error("reserved header field is {got:#06x}, expected 0")]
    Reserved {
        /// The reserved field received.
        got: u16,
    },
    /// A frame is shorter than an Ethernet header.
    #[error("frame of {len} bytes is shorter than an ethernet header")]
    BadFrameLength {
        /// The frame length received.
        len: usize,
    },
    /// The body announces no frames.
    #[error("body holds no frames")]
    NoFrames,
    /// A segment's metadata does not fit its payload.
    #[error("inconsistent segment metadata")]
    BadSegment,
    /// Bytes follow the last announced frame.
    #[error("{len} bytes after the last frame")]
    TrailingBytes {
        /// How many bytes follow.
        len: usize,
    },
}

/// What a datagram carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Body sealed with ChaCha20-Poly1305, tag appended.
    Sealed = 1,
    /// Body in the clear (no mesh password).
    Plain = 2,
}

/// The outer header of a sleeve datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Sealed or plain.
    pub kind: Kind,
    /// [`FLAG_SEGMENT`] and [`FLAG_RELAY_ONLY`] bits; other bits are ignored on receipt.
    pub flags: u8,
    /// The receiver's `local_index` for the session.
    pub receiver_index: u32,
    /// The sender's per-session datagram counter (the AEAD nonce).
    pub counter: u64,
}

impl Header {
    /// Parses the header at the start of `buf` and returns it with the rest of the datagram.
    pub fn parse(buf: &[u8]) -> Result<(Header, &[u8]), FrameError> {
        let (head, rest) = buf
            .split_first_chunk::<HEADER_LEN>()
            .ok_or(FrameError::Truncated)?;
        let kind = match head[0] {
            1 => Kind::Sealed,
            2 => Kind::Plain,
            got => return Err(FrameError::UnknownKind { got }),
        };
        let reserved = u16::from_be_bytes([head[2], head[3]]);
        if reserved != 0 {
            return Err(FrameError::Reserved { got: reserved });
        }
        let header = Header {
            kind,
            flags: head[1],
            receiver_index: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
            counter: u64::from_be_bytes(head[8..16].try_into().expect("slice of 8 bytes")),
        };
        Ok((header, rest))
    }

    /// Writes the header into `out`.
    pub fn emit(&self, out: &mut [u8; HEADER_LEN]) {
        out[0] = self.kind as u8;
        out[1] = self.flags;
        out[2..4].copy_from_slice(&[0, 0]);
        out[4..8].copy_from_slice(&self.receiver_index.to_be_bytes());
        out[8..16].copy_from_slice(&self.counter.to_be_bytes());
    }
}

/// The body header: who sent the frames, to whom, and how many follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyHeader {
    /// The peer whose TAP the frames came from.
    pub src: PeerName,
    /// The destination peer, or `None` for broadcast.
    pub dst: Option<PeerName>,
    /// How many more times the body may be relayed.
    pub hop_limit: u8,
    /// How many frames follow.
    pub frame_count: u8,
}

impl BodyHeader {
    /// Parses a whole body: the header and every frame length. Returns the header and an
    /// iterator over the frames.
    pub fn parse(body: &[u8]) -> Result<(BodyHeader, Frames<'_>), FrameError> {
        let (head, frames) = body
            .split_first_chunk::<BODY_HEADER_LEN>()
            .ok_or(FrameError::Truncated)?;
        let dst = peer_from_bytes(&head[6..12]);
        let header = BodyHeader {
            src: peer_from_bytes(&head[0..6]),
            dst: (dst.0 != 0).then_some(dst),
            hop_limit: head[HOP_LIMIT_OFFSET],
            frame_count: head[FRAME_COUNT_OFFSET],
        };
        if header.frame_count == 0 {
            return Err(FrameError::NoFrames);
        }
        let mut rest = frames;
        for _ in 0..header.frame_count {
            let (len, after) = rest
                .split_first_chunk::<FRAME_PREFIX_LEN>()
                .ok_or(FrameError::Truncated)?;
            let len = usize::from(u16::from_be_bytes(*len));
            if len < ETHERNET_HEADER_LEN {
                return Err(FrameError::BadFrameLength { len });
            }
            rest = after.get(len..).ok_or(FrameError::Truncated)?;
        }
        if !rest.is_empty() {
            return Err(FrameError::TrailingBytes { len: rest.len() });
        }
        Ok((
            header,
            Frames {
                rest: frames,
                left: header.frame_count,
            },
        ))
    }

    /// Parses only the 14-byte body header, for segment bodies. Returns the header and the rest.
    pub fn parse_head(body: &[u8]) -> Result<(BodyHeader, &[u8]), FrameError> {
        let (head, rest) = body
            .split_first_chunk::<BODY_HEADER_LEN>()
            .ok_or(FrameError::Truncated)?;
        let dst = peer_from_bytes(&head[6..12]);
        let header = BodyHeader {
            src: peer_from_bytes(&head[0..6]),
            dst: (dst.0 != 0).then_some(dst),
            hop_limit: head[HOP_LIMIT_OFFSET],
            frame_count: head[FRAME_COUNT_OFFSET],
        };
        Ok((header, rest))
    }

    /// Appends the body header to `out`. Frames follow with [`push_frame`].
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&peer_to_bytes(self.src));
        out.extend_from_slice(&peer_to_bytes(self.dst.unwrap_or(PeerName(0))));
        out.push(self.hop_limit);
        out.push(self.frame_count);
    }
}

/// Appends one length-prefixed frame to a body. The caller keeps `frame_count` in step (see
/// [`FRAME_COUNT_OFFSET`]).
///
/// # Panics
/// If `frame` is longer than `u16::MAX`: callers read frames into buffers no larger than that.
pub fn push_frame(out: &mut Vec<u8>, frame: &[u8]) {
    let len = u16::try_from(frame.len()).expect("frames are read into buffers of at most 64 KiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
}

/// Where a segment belongs in its super-frame, and the offload metadata to rebuild it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentMeta {
    /// `GSO_TCPV4` or `GSO_TCPV6` (maybe with `GSO_ECN`).
    pub gso_type: u8,
    /// Length of the headers that start the chunk.
    pub hdr_len: u16,
    /// Payload bytes per segment; every chunk but the last carries exactly this many.
    pub gso_size: u16,
    /// Offset of the TCP header.
    pub csum_start: u16,
    /// Offset of the TCP checksum within the TCP header.
    pub csum_offset: u16,
    /// Identifies the super-frame among the sender's.
    pub group: u32,
    /// Position of this chunk in the super-frame.
    pub index: u16,
    /// Number of chunks in the super-frame.
    pub count: u16,
}

impl SegmentMeta {
    /// Parses the metadata at the start of `rest` (what follows the body header) and returns it
    /// with the chunk (headers and payload). Checks that the chunk fits the metadata.
    pub fn parse(rest: &[u8]) -> Result<(SegmentMeta, &[u8]), FrameError> {
        let (m, chunk) = rest
            .split_first_chunk::<SEGMENT_META_LEN>()
            .ok_or(FrameError::Truncated)?;
        let u = |i: usize| u16::from_be_bytes([m[i], m[i + 1]]);
        let meta = SegmentMeta {
            gso_type: m[0],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            group: u32::from_be_bytes([m[10], m[11], m[12], m[13]]),
            index: u(14),
            count: u(16),
        };
        let headers = usize::from(meta.hdr_len);
        let payload = chunk
            .len()
            .checked_sub(headers)
            .ok_or(FrameError::Truncated)?;
        let consistent = meta.index < meta.count
            && meta.gso_size > 0
            && headers >= ETHERNET_HEADER_LEN
            && meta.csum_start < meta.hdr_len
            && payload <= usize::from(meta.gso_size)
            && (payload == usize::from(meta.gso_size) || meta.index + 1 == meta.count);
        if !consistent {
            return Err(FrameError::BadSegment);
        }
        Ok((meta, chunk))
    }

    /// Appends the metadata to `out`; the headers and payload follow.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.gso_type, 0]);
        for v in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&self.group.to_be_bytes());
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
    }
}

/// The frames of a parsed body, in order.
#[derive(Clone, Debug)]
pub struct Frames<'a> {
    rest: &'a [u8],
    left: u8,
}

impl<'a> Iterator for Frames<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Lengths were checked in `BodyHeader::parse`; `get` keeps this panic-free regardless.
        let len = usize::from(u16::from_be_bytes([
            *self.rest.first()?,
            *self.rest.get(1)?,
        ]));
        let frame = self.rest.get(FRAME_PREFIX_LEN..FRAME_PREFIX_LEN + len)?;
        self.rest = &self.rest[FRAME_PREFIX_LEN + len..];
        Some(frame)
    }
}

/// The 48 significant bits of a peer name, big-endian.
pub fn peer_to_bytes(peer: PeerName) -> [u8; 6] {
    let b = peer.0.to_be_bytes();
    [b[2], b[3], b[4], b[5], b[6], b[7]]
}

fn peer_from_bytes(b: &[u8]) -> PeerName {
    let mut full = [0u8; 8];
    full[2..].copy_from_slice(&b[..6]);
    PeerName(u64::from_be_bytes(full))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fill: u8, len: usize) -> Vec<u8> {
        vec![fill; len]
    }

    fn body(dst: Option<PeerName>, frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        let head = BodyHeader {
            src: PeerName(0x0102_0304_0506),
            dst,
            hop_limit: 16,
            frame_count: frames.len() as u8,
        };
        head.emit(&mut out);
        for f in frames {
            push_frame(&mut out, f);
        }
        out
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            kind: Kind::Sealed,
            flags: 0,
            receiver_index: 0xdead_beef,
            counter: u64::MAX - 3,
        };
        let mut buf = [0u8; HEADER_LEN + 3];
        h.emit((&mut buf[..HEADER_LEN]).try_into().unwrap());
        buf[HEADER_LEN..].copy_from_slice(&[7, 8, 9]);
        let (parsed, rest) = Header::parse(&buf).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(rest, &[7, 8, 9]);
        let h2 = Header {
            kind: Kind::Plain,
            ..h
        };
        let mut buf2 = [0u8; HEADER_LEN];
        h2.emit(&mut buf2);
        assert_eq!(Header::parse(&buf2).unwrap().0, h2);
    }

    #[test]
    fn header_rejects_unknown_kind_and_reserved() {
        let mut buf = [0u8; HEADER_LEN];
        Header {
            kind: Kind::Plain,
            flags: 0,
            receiver_index: 1,
            counter: 1,
        }
        .emit(&mut buf);
        for kind in [0u8, 3, 255] {
            let mut b = buf;
            b[0] = kind;
            assert_eq!(
                Header::parse(&b),
                Err(FrameError::UnknownKind { got: kind })
            );
        }
        let mut b = buf;
        b[3] = 1;
        assert_eq!(Header::parse(&b), Err(FrameError::Reserved { got: 1 }));
    }

    #[test]
    fn body_round_trips() {
        let frames = vec![frame(1, 14), frame(2, 60), frame(3, 1514)];
        for dst in [None, Some(PeerName(0xaabb_ccdd_eeff))] {
            let b = body(dst, &frames);
            let (head, iter) = BodyHeader::parse(&b).unwrap();
            assert_eq!(head.src, PeerName(0x0102_0304_0506));
            assert_eq!(head.dst, dst);
            assert_eq!(head.hop_limit, 16);
            assert_eq!(head.frame_count, 3);
            let got: Vec<&[u8]> = iter.collect();
            assert_eq!(got, frames.iter().map(|f| f.as_slice()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn body_rejects_bad_lengths() {
        let b = body(None, &[frame(1, 20)]);
        // Frame count larger than what is there.
        let mut more = b.clone();
        more[FRAME_COUNT_OFFSET] = 2;
        assert_eq!(BodyHeader::parse(&more).unwrap_err(), FrameError::Truncated);
        let mut none = b.clone();
        none[FRAME_COUNT_OFFSET] = 0;
        assert_eq!(BodyHeader::parse(&none).unwrap_err(), FrameError::NoFrames);
        let mut trailing = b.clone();
        trailing.push(0);
        assert_eq!(
            BodyHeader::parse(&trailing).unwrap_err(),
            FrameError::TrailingBytes { len: 1 }
        );
        let short = body(None, &[frame(1, 13)]);
        assert_eq!(
            BodyHeader::parse(&short).unwrap_err(),
            FrameError::BadFrameLength { len: 13 }
        );
    }

    #[test]
    fn header_flags_are_distinct_bits_and_round_trip() {
        assert_eq!(FLAG_SEGMENT & FLAG_RELAY_ONLY, 0);
        for flags in [0, FLAG_SEGMENT, FLAG_RELAY_ONLY] {
            let mut out = [0u8; HEADER_LEN];
            Header {
                kind: Kind::Sealed,
                flags,
                receiver_index: 3,
                counter: 4,
            }
            .emit(&mut out);
            assert_eq!(Header::parse(&out).unwrap().0.flags, flags);
        }
    }

    #[test]
    fn segment_meta_round_trips_and_checks_sizes() {
        let meta = SegmentMeta {
            gso_type: 1,
            hdr_len: 54,
            gso_size: 100,
            csum_start: 34,
            csum_offset: 16,
            group: 7,
            index: 1,
            count: 3,
        };
        let mut out = Vec::new();
        meta.emit(&mut out);
        assert_eq!(out.len(), SEGMENT_META_LEN);
        out.extend_from_slice(&[0u8; 154]);
        let (parsed, chunk) = SegmentMeta::parse(&out).unwrap();
        assert_eq!(parsed, meta);
        assert_eq!(chunk.len(), 154);
        // A middle chunk must be exactly gso_size long.
        assert_eq!(
            SegmentMeta::parse(&out[..out.len() - 1]),
            Err(FrameError::BadSegment)
        );
        for n in 0..out.len() {
            let _ = SegmentMeta::parse(&out[..n]);
        }
    }

    #[test]
    fn truncated_inputs_never_panic() {
        let b = body(Some(PeerName(9)), &[frame(1, 14), frame(2, 100)]);
        for n in 0..b.len() {
            assert!(
                BodyHeader::parse(&b[..n]).is_err(),
                "prefix of {n} bytes parsed"
            );
        }
        let mut d = [0u8; HEADER_LEN];
        Header {
            kind: Kind::Sealed,
            flags: 0,
            receiver_index: 1,
            counter: 2,
        }
        .emit(&mut d);
        for n in 0..HEADER_LEN {
            assert_eq!(Header::parse(&d[..n]), Err(FrameError::Truncated));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic generator: every length and many byte patterns.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = Vec::new();
        for round in 0..20_000usize {
            buf.clear();
            for _ in 0..(round % 80) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            if buf.len() > FRAME_COUNT_OFFSET {
                buf[FRAME_COUNT_OFFSET] %= 4;
            }
            let _ = Header::parse(&buf);
            if let Ok((_, frames)) = BodyHeader::parse(&buf) {
                assert!(frames.into_iter().all(|f| f.len() >= ETHERNET_HEADER_LEN));
            }
        }
    }
}

//! "Too big" answers to containers: ICMP fragmentation needed (IPv4) and ICMPv6 packet too big.
//!
//! The container MTU assumes an underlay that carries 1500-byte packets. When the path to a
//! peer carries less (a tunnel, a cloud network with 1450), a full-size frame can't leave as one
//! sleeve datagram: the kernel refuses it (UDP GSO) or the path drops it, and TCP stalls on the
//! first full segment. So the sending thread checks each unicast frame against the limit the
//! control loop measured for the next hop ([`super::super::forwarding::Traffic::max_frame`])
//! and answers one that is too big with the ICMP error a router on the path would send: the
//! container's kernel then lowers its path MTU to that peer and resends smaller (RFC 1191, RFC
//! 8201). The answer comes from the frame's destination address, so it reaches the socket that
//! sent it like any ICMP error.
//!
//! Not here: measuring the limit (`daemon::control`, from the kernel's route MTU to the peer).
//! IPv4 frames without DF are not answered (the sender allowed fragmentation; we count and drop
//! them). Invariant: an answer is a complete Ethernet frame, checksums done.

use super::frame::ETHERNET_HEADER_LEN;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
/// IPv4 minimum reassembly size: an ICMP error quotes at most this much in all (RFC 1812).
const IPV4_ERROR_MAX: usize = 576;
/// IPv6 minimum MTU: an ICMPv6 error fits in it (RFC 4443), and no path MTU goes below it.
const IPV6_MIN_MTU: usize = 1280;

/// The ICMP answer telling the sender of `frame` (an Ethernet frame from our TAP) that frames
/// over `mtu` bytes of IP packet can't pass; `None` when there is nothing to answer: not IP, too
/// short to quote, or IPv4 without the don't-fragment bit.
pub fn too_big(frame: &[u8], mtu: usize) -> Option<Vec<u8>> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = &frame[ETHERNET_HEADER_LEN..];
    let answer = match ethertype {
        ETHERTYPE_IPV4 => ipv4(ip, mtu)?,
        ETHERTYPE_IPV6 => ipv6(ip, mtu)?,
        _ => return None,
    };
    let mut out = Vec::with_capacity(ETHERNET_HEADER_LEN + answer.len());
    out.extend_from_slice(&frame[6..12]); // back to the sender's MAC
    out.extend_from_slice(&frame[0..6]); // from the MAC it sent to
    out.extend_from_slice(&ethertype.to_be_bytes());
    out.extend_from_slice(&answer);
    Some(out)
}

fn ipv4(ip: &[u8], mtu: usize) -> Option<Vec<u8>> {
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl + 8 {
        return None;
    }
    let dont_fragment = ip[6] & 0x40 != 0;
    // Never answer an ICMP error with one (RFC 1122): type 3, 4, 5, 11, 12.
    let icmp_error = ip[9] == 1 && matches!(ip[ihl], 3 | 4 | 5 | 11 | 12);
    if !dont_fragment || icmp_error {
        return None;
    }
    let quoted = &ip[..ip.len().min(IPV4_ERROR_MAX - 28)];
    let total = 20 + 8 + quoted.len();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&(total as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]); // id, no flags, TTL 64, ICMP, checksum
    out.extend_from_slice(&ip[16..20]); // from the address it sent to
    out.extend_from_slice(&ip[12..16]); // to the sender
    let sum = checksum(&[&out[..20]]);
    out[10..12].copy_from_slice(&sum.to_be_bytes());
    let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
    out.extend_from_slice(&[3, 4, 0, 0, 0, 0]); // destination unreachable, fragmentation needed
    out.extend_from_slice(&mtu.to_be_bytes());
    out.extend_from_slice(quoted);
    let sum = checksum(&[&out[20..]]);
    out[22..24].copy_from_slice(&sum.to_be_bytes());
    Some(out)
}

fn ipv6(ip: &[u8], mtu: usize) -> Option<Vec<u8>> {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return None;
    }
    // Never answer an ICMPv6 error (types below 128) with one, when it follows the header
    // directly (RFC 4443; extension headers are not walked).
    if ip[6] == 58 && ip.get(40).is_some_and(|t| *t < 128) {
        return None;
    }
    let quoted = &ip[..ip.len().min(IPV6_MIN_MTU - 48)];
    let payload = 8 + quoted.len();
    let mut out = Vec::with_capacity(40 + payload);
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(payload as u16).to_be_bytes());
    out.extend_from_slice(&[58, 64]); // ICMPv6, hop limit
    out.extend_from_slice(&ip[24..40]); // from the address it sent to
    out.extend_from_slice(&ip[8..24]); // to the sender
    let mtu = mtu.max(IPV6_MIN_MTU) as u32;
    out.extend_from_slice(&[2, 0, 0, 0]); // packet too big
    out.extend_from_slice(&mtu.to_be_bytes());
    out.extend_from_slice(quoted);
    let pseudo_len = (payload as u32).to_be_bytes();
    let sum = checksum(&[&out[8..40], &pseudo_len, &[0, 0, 0, 58], &out[40..]]);
    out[42..44].copy_from_slice(&sum.to_be_bytes());
    Some(out)
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts` (each of even length but
/// the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_frame(df: bool, len: usize) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
        let mut ip = vec![
            0x45,
            0,
            0,
            0,
            0,
            0,
            if df { 0x40 } else { 0 },
            0,
            64,
            6,
            0,
            0,
        ];
        ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        ip.resize(len, 0xab);
        let total = (len as u16).to_be_bytes();
        ip[2..4].copy_from_slice(&total);
        f.extend_from_slice(&ip);
        f
    }

    #[test]
    fn ipv4_with_df_gets_fragmentation_needed_with_the_mtu() {
        let frame = ipv4_frame(true, 1400);
        let out = too_big(&frame, 1300).expect("answered");
        assert_eq!(&out[0..6], &frame[6..12], "to the sender's MAC");
        assert_eq!(&out[6..12], &frame[0..6]);
        let ip = &out[14..];
        assert_eq!(checksum(&[&ip[..20]]), 0, "IP header checksum");
        assert_eq!(checksum(&[&ip[20..]]), 0, "ICMP checksum");
        assert_eq!((ip[20], ip[21]), (3, 4));
        assert_eq!(u16::from_be_bytes([ip[26], ip[27]]), 1300);
        assert_eq!(&ip[12..16], &[10, 0, 0, 2], "from the destination");
        assert_eq!(&ip[16..20], &[10, 0, 0, 1], "to the source");
        assert_eq!(&ip[28..48], &frame[14..34], "quotes the header");
        assert_eq!(ip.len(), IPV4_ERROR_MAX);
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
    }

    #[test]
    fn no_answer_without_df_for_icmp_errors_or_garbage() {
        assert!(too_big(&ipv4_frame(false, 1400), 1300).is_none());
        let mut error = ipv4_frame(true, 600);
        error[14 + 9] = 1; // ICMP
        error[14 + 20] = 3; // destination unreachable
        assert!(too_big(&error, 500).is_none());
        assert!(too_big(&[0u8; 10], 1300).is_none());
        let mut arp = ipv4_frame(true, 100);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(too_big(&arp, 50).is_none());
        assert!(too_big(&ipv4_frame(true, 100)[..30], 50).is_none());
    }

    #[test]
    fn ipv6_gets_packet_too_big_at_least_1280() {
        let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
        let mut ip = vec![0x60, 0, 0, 0, 0x05, 0x00, 6, 64];
        ip.extend_from_slice(&[0xfd; 16]);
        ip.extend_from_slice(&[0xfe; 16]);
        ip.resize(1400, 0xcd);
        frame.extend_from_slice(&ip);
        let out = too_big(&frame, 1300).expect("answered");
        let ip6 = &out[14..];
        assert_eq!(ip6.len(), IPV6_MIN_MTU, "fits the minimum MTU");
        assert_eq!((ip6[40], ip6[41]), (2, 0));
        assert_eq!(
            u32::from_be_bytes([ip6[44], ip6[45], ip6[46], ip6[47]]),
            1300
        );
        assert_eq!(&ip6[8..24], &[0xfe; 16], "from the destination");
        let payload = (ip6.len() - 40) as u32;
        let sum = checksum(&[
            &ip6[8..40],
            &payload.to_be_bytes(),
            &[0, 0, 0, 58],
            &ip6[40..],
        ]);
        assert_eq!(sum, 0, "ICMPv6 checksum");
        let small = too_big(&frame, 1000).expect("answered");
        assert_eq!(
            u32::from_be_bytes([small[58], small[59], small[60], small[61]]),
            1280
        );
    }
}

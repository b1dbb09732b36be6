//! The part of the DNS wire format (RFC 1035 §4) the embedded name server needs: parse a one-question
//! query, emit an answer with A/AAAA records.
//!
//! Heads up: names in queries are never compressed (RFC 1035 §4.1.4 allows pointers only to earlier
//! names, and a question is the first name), so a pointer in a query is refused as malformed. Answers
//! point back to the question (0xC00C) for their owner name.

use std::fmt;
use std::net::IpAddr;

/// Fixed header length.
const HEADER_LEN: usize = 12;
/// Record types.
pub(crate) const TYPE_A: u16 = 1;
pub(crate) const TYPE_AAAA: u16 = 28;
pub(crate) const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;

/// Response codes we send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
}

/// Why bytes are not a query we answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WireError {
    /// Shorter than its header or question says.
    Truncated,
    /// A response, or an opcode other than QUERY.
    NotAQuery,
    /// Not exactly one question.
    QuestionCount { got: u16 },
    /// A label over 63 bytes, a name over 255, or a compression pointer.
    BadName,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => write!(f, "truncated DNS message"),
            WireError::NotAQuery => write!(f, "not a standard query"),
            WireError::QuestionCount { got } => write!(f, "{got} questions, expected 1"),
            WireError::BadName => write!(f, "malformed name in question"),
        }
    }
}

impl std::error::Error for WireError {}

/// A parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Query {
    pub(crate) id: u16,
    /// Recursion desired, echoed back.
    pub(crate) rd: bool,
    /// Lowercased, dot-separated, without the trailing dot.
    pub(crate) name: String,
    pub(crate) qtype: u16,
    pub(crate) qclass: u16,
    /// End of the question section in the original bytes.
    question_end: usize,
}

/// Parses a query with exactly one question. Never panics.
pub(crate) fn parse_query(buf: &[u8]) -> Result<Query, WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    let id = u16::from_be_bytes([buf[0], buf[1]]);
    let flags = u16::from_be_bytes([buf[2], buf[3]]);
    let (qr, opcode) = (flags >> 15, (flags >> 11) & 0xf);
    if qr != 0 || opcode != 0 {
        return Err(WireError::NotAQuery);
    }
    let qdcount = u16::from_be_bytes([buf[4], buf[5]]);
    if qdcount != 1 {
        return Err(WireError::QuestionCount { got: qdcount });
    }
    let mut pos = HEADER_LEN;
    let mut labels: Vec<String> = Vec::new();
    let mut name_len = 0usize;
    loop {
        let len = *buf.get(pos).ok_or(WireError::Truncated)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return Err(WireError::BadName);
        }
        let label = buf.get(pos..pos + len).ok_or(WireError::Truncated)?;
        name_len += len + 1;
        if name_len > 255 {
            return Err(WireError::BadName);
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        pos += len;
    }
    let fixed = buf.get(pos..pos + 4).ok_or(WireError::Truncated)?;
    Ok(Query {
        id,
        rd: flags & 0x0100 != 0,
        name: labels.join("."),
        qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
        qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
        question_end: pos + 4,
    })
}

/// Builds the answer to `query` (whose original bytes are `raw`): the addresses of the asked type, with
/// `ttl` seconds. Authoritative; recursion available because we forward other names.
pub(crate) fn answer(
    raw: &[u8],
    query: &Query,
    rcode: Rcode,
    addrs: &[IpAddr],
    ttl: u32,
) -> Vec<u8> {
    let wanted: Vec<&IpAddr> = addrs
        .iter()
        .filter(|a| match query.qtype {
            TYPE_A => a.is_ipv4(),
            TYPE_AAAA => a.is_ipv6(),
            TYPE_ANY => true,
            _ => false,
        })
        .filter(|_| query.qclass == CLASS_IN)
        .collect();
    let mut out = Vec::with_capacity(query.question_end + wanted.len() * 28);
    out.extend_from_slice(&query.id.to_be_bytes());
    let flags: u16 = 0x8000 | 0x0400 | (u16::from(query.rd) << 8) | 0x0080 | rcode as u16;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(wanted.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&raw[HEADER_LEN..query.question_end]);
    for addr in wanted {
        out.extend_from_slice(&[0xc0, 0x0c]);
        let (rtype, rdata): (u16, Vec<u8>) = match addr {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    out
}

/// An error answer to bytes we could read the header of (FORMERR), or nothing at all.
pub(crate) fn format_error(raw: &[u8]) -> Option<Vec<u8>> {
    let head = raw.get(..4)?;
    let mut out = vec![head[0], head[1], 0x80, Rcode::FormErr as u8];
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// Builds a query (for tests).
#[cfg(test)]
pub(crate) fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

/// The addresses in an answer (for tests); None if it isn't a well-formed answer.
#[cfg(test)]
pub(crate) fn answer_addrs(buf: &[u8]) -> Option<(u8, Vec<IpAddr>)> {
    let rcode = *buf.get(3)? & 0xf;
    let ancount = u16::from_be_bytes([*buf.get(6)?, *buf.get(7)?]);
    let mut pos = HEADER_LEN;
    while *buf.get(pos)? != 0 {
        pos += 1 + *buf.get(pos)? as usize;
    }
    pos += 5;
    let mut addrs = Vec::new();
    for _ in 0..ancount {
        pos += 2; // name pointer
        let rtype = u16::from_be_bytes([*buf.get(pos)?, *buf.get(pos + 1)?]);
        let len = u16::from_be_bytes([*buf.get(pos + 8)?, *buf.get(pos + 9)?]) as usize;
        let data = buf.get(pos + 10..pos + 10 + len)?;
        match (rtype, len) {
            (TYPE_A, 4) => addrs.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (TYPE_AAAA, 16) => addrs.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => return None,
        }
        pos += 10 + len;
    }
    Some((rcode, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_round_trips_and_answers_carry_only_the_asked_type() {
        let raw = query(0x1234, "Web.MeshCtl.Local.", TYPE_A);
        let q = parse_query(&raw).unwrap();
        assert_eq!(
            (q.id, q.rd, q.name.as_str(), q.qtype),
            (0x1234, true, "web.meshctl.local", TYPE_A)
        );
        let addrs: Vec<IpAddr> = vec!["10.32.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let a = answer(&raw, &q, Rcode::NoError, &addrs, 30);
        assert_eq!(answer_addrs(&a), Some((0, vec![addrs[0]])));
        let raw6 = query(7, "web.meshctl.local", TYPE_AAAA);
        let a6 = answer(
            &raw6,
            &parse_query(&raw6).unwrap(),
            Rcode::NoError,
            &addrs,
            30,
        );
        assert_eq!(answer_addrs(&a6), Some((0, vec![addrs[1]])));
    }

    #[test]
    fn nxdomain_has_no_answers() {
        let raw = query(1, "nope.meshctl.local", TYPE_A);
        let a = answer(&raw, &parse_query(&raw).unwrap(), Rcode::NxDomain, &[], 30);
        assert_eq!(answer_addrs(&a), Some((3, vec![])));
    }

    #[test]
    fn malformed_queries_are_refused_without_panicking() {
        assert_eq!(parse_query(&[0; 5]), Err(WireError::Truncated));
        let mut resp = query(1, "a", TYPE_A);
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp), Err(WireError::NotAQuery));
        let mut pointer = query(1, "a", TYPE_A);
        pointer[12] = 0xc0;
        assert_eq!(parse_query(&pointer), Err(WireError::BadName));
        let raw = query(1, "web.meshctl.local", TYPE_A);
        for len in 0..raw.len() {
            let _ = parse_query(&raw[..len]);
            let _ = answer_addrs(&raw[..len]);
        }
        for seed in 0..2000u32 {
            let junk: Vec<u8> = (0..(seed % 64))
                .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 97) >> 7) as u8)
                .collect();
            let _ = parse_query(&junk);
            let _ = format_error(&junk);
        }
    }
}

//! IPv4 subnets ([`Cidr`]) and half-open address ranges ([`Range`]) as plain `u32` arithmetic.
//!
//! Not here: who owns what (`ring.rs`) and which addresses are in use (`allocator.rs`).
//! Invariants: a `Range` has `start <= end`; a `Cidr`'s address has no host bits set.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 subnet, e.g. `10.32.0.0/12`. The address never has host bits set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cidr {
    addr: u32,
    prefix: u8,
}

/// Why a string is not a subnet we can allocate from.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum CidrError {
    /// Not `ADDRESS/PREFIX`.
    #[error("{input:?} is not a subnet: write ADDRESS/PREFIX, e.g. 10.32.0.0/12")]
    Syntax {
        /// The text we were given.
        input: String,
    },
    /// The prefix leaves fewer than 4 addresses (network, broadcast and two hosts).
    #[error("subnet {input:?} is too small: use a prefix of /30 or shorter")]
    TooSmall {
        /// The text we were given.
        input: String,
    },
    /// Host bits are set.
    #[error("{input:?} has host bits set: did you mean {fixed}?")]
    HostBits {
        /// The text we were given.
        input: String,
        /// The subnet with host bits cleared.
        fixed: String,
    },
}

impl Cidr {
    /// The subnet of `addr/prefix`; `None` if host bits are set or the prefix is over 30.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Cidr> {
        let addr = u32::from(addr);
        (prefix <= 30 && addr & !mask(prefix) == 0).then_some(Cidr { addr, prefix })
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// All addresses of the subnet, network and broadcast included.
    pub fn range(&self) -> Range {
        Range {
            start: u64::from(self.addr),
            end: u64::from(self.addr) + (1u64 << (32 - self.prefix)),
        }
    }

    /// The addresses we hand out: all but the network and broadcast address.
    pub fn hosts(&self) -> Range {
        let r = self.range();
        Range {
            start: r.start + 1,
            end: r.end - 1,
        }
    }

    /// Whether `addr` lies in the subnet.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        self.range().contains(u64::from(u32::from(addr)))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.addr), self.prefix)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let syntax = || CidrError::Syntax {
            input: s.to_owned(),
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(syntax)?;
        if prefix > 30 {
            return Err(CidrError::TooSmall {
                input: s.to_owned(),
            });
        }
        let raw = u32::from(addr);
        if raw & !mask(prefix) != 0 {
            return Err(CidrError::HostBits {
                input: s.to_owned(),
                fixed: format!("{}/{prefix}", Ipv4Addr::from(raw & mask(prefix))),
            });
        }
        Ok(Cidr { addr: raw, prefix })
    }
}

/// A half-open range of IPv4 addresses as `u64` (so that the end of 255.255.255.255 fits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct Range {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
}

impl Range {
    /// How many addresses.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True if it holds no address.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The overlap of two ranges (possibly empty).
    pub fn intersect(&self, other: &Range) -> Range {
        let start = self.start.max(other.start);
        Range {
            start,
            end: self.end.min(other.end).max(start),
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "(empty)");
        }
        write!(f, "{}-{}", ip(self.start), ip(self.end - 1))
    }
}

/// The dotted form of an address held as `u64`.
pub fn ip(addr: u64) -> Ipv4Addr {
    Ipv4Addr::from(addr as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_errors_name_the_fix() {
        let c: Cidr = "10.32.0.0/12".parse().unwrap();
        assert_eq!(c.to_string(), "10.32.0.0/12");
        assert_eq!(c.range().len(), 1 << 20);
        assert_eq!(ip(c.hosts().start).to_string(), "10.32.0.1");
        assert_eq!(ip(c.hosts().end - 1).to_string(), "10.47.255.254");
        let e = "10.32.0.1/12".parse::<Cidr>().unwrap_err().to_string();
        assert!(e.contains("did you mean 10.32.0.0/12"), "{e}");
        assert!(matches!(
            "10.0.0.0/31".parse::<Cidr>(),
            Err(CidrError::TooSmall { .. })
        ));
        assert!(matches!(
            "banana".parse::<Cidr>(),
            Err(CidrError::Syntax { .. })
        ));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert_eq!(all.range().end, 1 << 32);
    }
}

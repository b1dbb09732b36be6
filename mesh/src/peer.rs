//! Who a peer is: its name, its persistent key, and the id of a control connection.
//!
//! A [`PeerName`] is 48 bits taken from the SHA-256 of the peer's Ed25519 public key, so two
//! machines cloned from one image still get different names once each generates its own key.
//! [`Identity`] holds that keypair; the daemon stores its PKCS#8 form in the state directory.
//!
//! Not here: what a peer announces (`topology.rs`), and where the key file lives (the daemon).
//!
//! Invariants: a `PeerName` never uses more than 48 bits; its text form is six lowercase hex
//! octets separated by colons, as Weave prints peer names.

use std::fmt;
use std::str::FromStr;

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

/// The name of a peer: 48 significant bits, printed like a MAC address (`aa:bb:cc:dd:ee:ff`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerName(pub u64);

/// Mask of the 48 bits a [`PeerName`] may use.
const NAME_MASK: u64 = (1 << 48) - 1;

impl PeerName {
    /// The name belonging to `public_key`: the first 6 bytes of its SHA-256 digest.
    pub fn from_public_key(public_key: &[u8]) -> PeerName {
        let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
        let name = digest.as_ref()[..6]
            .iter()
            .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
        PeerName(name)
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = (self.0 & NAME_MASK).to_be_bytes();
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[2], b[3], b[4], b[5], b[6], b[7]
        )
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a peer name.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum PeerNameError {
    /// The name does not have six colon-separated octets.
    #[error("peer name {input:?} has {octets} octets, expected 6 (aa:bb:cc:dd:ee:ff)")]
    OctetCount {
        /// The text we were given.
        input: String,
        /// How many colon-separated parts it had.
        octets: usize,
    },
    /// One octet is not two hex digits.
    #[error("peer name {input:?}: octet {octet:?} is not two hex digits")]
    BadOctet {
        /// The text we were given.
        input: String,
        /// The offending part.
        octet: String,
    },
}

impl FromStr for PeerName {
    type Err = PeerNameError;

    fn from_str(s: &str) -> Result<PeerName, PeerNameError> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(PeerNameError::OctetCount {
                input: s.to_owned(),
                octets: parts.len(),
            });
        }
        let mut name = 0u64;
        for part in parts {
            let ok = part.len() == 2 && part.bytes().all(|b| b.is_ascii_hexdigit());
            let byte = match ok {
                true => u8::from_str_radix(part, 16).ok(),
                false => None,
            };
            let Some(byte) = byte else {
                return Err(PeerNameError::BadOctet {
                    input: s.to_owned(),
                    octet: part.to_owned(),
                });
            };
            name = (name << 8) | u64::from(byte);
        }
        Ok(PeerName(name))
    }
}

/// The id the daemon gives one control connection; unique for the life of a `Router`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Why an identity could not be created or loaded.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    /// The random number generator failed while generating a key.
    #[error("generate Ed25519 key: random number generator failed")]
    Generate,
    /// The stored bytes are not a valid Ed25519 PKCS#8 document.
    #[error("load Ed25519 key: not a valid PKCS#8 v2 document ({reason})")]
    Pkcs8 {
        /// What ring reported.
        reason: String,
    },
}

/// A peer's persistent identity: an Ed25519 keypair (and the name derived from it).
pub struct Identity {
    keypair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
    name: PeerName,
}

impl Identity {
    /// Generates a new keypair; returns it and its PKCS#8 encoding for the daemon to store.
    pub fn generate(
        rng: &dyn ring::rand::SecureRandom,
    ) -> Result<(Identity, Vec<u8>), IdentityError> {
        let document = Ed25519KeyPair::generate_pkcs8(rng).map_err(|_| IdentityError::Generate)?;
        let pkcs8 = document.as_ref().to_vec();
        let identity = Identity::from_pkcs8(&pkcs8)?;
        Ok((identity, pkcs8))
    }

    /// Loads a keypair stored by [`Identity::generate`].
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Identity, IdentityError> {
        let keypair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| IdentityError::Pkcs8 {
            reason: e.to_string(),
        })?;
        let name = PeerName::from_public_key(keypair.public_key().as_ref());
        Ok(Identity {
            keypair,
            pkcs8: pkcs8.to_vec(),
            name,
        })
    }

    /// Our peer name, derived from the public key.
    pub fn name(&self) -> PeerName {
        self.name
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> &[u8] {
        self.keypair.public_key().as_ref()
    }

    /// The PKCS#8 document this identity was loaded from.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// Signs `message` with our private key (64-byte Ed25519 signature).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.keypair.sign(message).as_ref().to_vec()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Identity")
            .field("name", &self.name)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let name = PeerName(0x0a1b_2c3d_4e5f);
        assert_eq!(name.to_string(), "0a:1b:2c:3d:4e:5f");
        assert_eq!(format!("{name:?}"), "0a:1b:2c:3d:4e:5f");
        assert_eq!("0a:1b:2c:3d:4e:5f".parse::<PeerName>(), Ok(name));
        assert_eq!("0A:1B:2C:3D:4E:5F".parse::<PeerName>(), Ok(name));
    }

    #[test]
    fn parse_rejects_bad_names() {
        assert!(matches!(
            "0a:1b".parse::<PeerName>(),
            Err(PeerNameError::OctetCount { octets: 2, .. })
        ));
        assert!(matches!(
            "0a:1b:2c:3d:4e:+f".parse::<PeerName>(),
            Err(PeerNameError::BadOctet { .. })
        ));
        assert!("0a:1b:2c:3d:4e:5".parse::<PeerName>().is_err());
        assert!("".parse::<PeerName>().is_err());
    }

    #[test]
    fn name_from_key_uses_48_bits_of_sha256() {
        // SHA-256("") = e3b0c442 98fc...
        assert_eq!(
            PeerName::from_public_key(b"").to_string(),
            "e3:b0:c4:42:98:fc"
        );
        assert!(PeerName::from_public_key(b"any key").0 <= NAME_MASK);
    }

    #[test]
    fn identity_survives_a_pkcs8_round_trip() {
        let rng = ring::rand::SystemRandom::new();
        let (identity, pkcs8) = Identity::generate(&rng).expect("generate");
        let loaded = Identity::from_pkcs8(&pkcs8).expect("load");
        assert_eq!(identity.name(), loaded.name());
        assert_eq!(identity.public_key(), loaded.public_key());
        assert_eq!(loaded.pkcs8(), &pkcs8[..]);
        assert_eq!(
            identity.name(),
            PeerName::from_public_key(identity.public_key())
        );
        assert!(matches!(
            Identity::from_pkcs8(b"garbage"),
            Err(IdentityError::Pkcs8 { .. })
        ));
    }
}

//! Sealing and opening sleeve bodies, and deriving the per-direction session keys.
//!
//! ChaCha20-Poly1305 (`ring`), with the 16-byte outer header as associated data and the nonce
//! `4 zero bytes || counter BE`. Sans-IO: no sockets, no clock, no randomness.
//!
//! Not here: choosing counters (the sleeve task owns one per session and never reuses one),
//! replay protection (`replay.rs`), and agreeing on the secret (the control connection).
//!
//! Invariants: a key is used with each counter at most once; that is the caller's duty, since
//! this module keeps no state between calls.

use mesh::PeerName;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::hkdf;

use super::frame::{peer_to_bytes, HEADER_LEN};

/// Length of the authentication tag appended to sealed bodies.
pub const TAG_LEN: usize = 16;

/// HKDF salt for session keys.
const KDF_SALT: &[u8] = b"meshctl sleeve v1";

/// The authentication tag did not match: wrong key, wrong counter or tampered bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("sleeve datagram failed authentication")]
pub struct OpenError;

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn less_safe_key(key: &[u8; 32]) -> LessSafeKey {
    let unbound =
        UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key fits ChaCha20-Poly1305");
    LessSafeKey::new(unbound)
}

/// Seals bodies we send to one neighbour.
pub struct SealingKey(LessSafeKey);

impl SealingKey {
    /// Builds the key from 32 bytes of key material.
    pub fn new(key: &[u8; 32]) -> Self {
        Self(less_safe_key(key))
    }

    /// Seals `buf` (the body) in place and appends the tag.
    #[cfg(test)]
    pub fn seal(&self, header: &[u8; HEADER_LEN], counter: u64, buf: &mut Vec<u8>) {
        let tag = self.seal_detached(header, counter, buf);
        buf.extend_from_slice(&tag);
    }

    /// Seals `body` in place and returns the tag, for callers that keep the header and body in
    /// one buffer.
    pub fn seal_detached(
        &self,
        header: &[u8; HEADER_LEN],
        counter: u64,
        body: &mut [u8],
    ) -> [u8; TAG_LEN] {
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce(counter), Aad::from(header), body)
            .expect("ChaCha20-Poly1305 seals any body shorter than 256 GiB");
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

/// Opens bodies one neighbour sent us.
pub struct OpeningKey(LessSafeKey);

impl OpeningKey {
    /// Builds the key from 32 bytes of key material.
    pub fn new(key: &[u8; 32]) -> Self {
        Self(less_safe_key(key))
    }

    /// Opens `buf` (the sealed body with its tag) in place and returns the plaintext part.
    pub fn open<'b>(
        &self,
        header: &[u8; HEADER_LEN],
        counter: u64,
        buf: &'b mut [u8],
    ) -> Result<&'b [u8], OpenError> {
        let plain = self
            .0
            .open_in_place(nonce(counter), Aad::from(header), buf)
            .map_err(|_| OpenError)?;
        Ok(plain)
    }
}

/// The two keys of one session, named by direction.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Key for datagrams the initiator sends.
    pub initiator_to_responder: [u8; 32],
    /// Key for datagrams the responder sends.
    pub responder_to_initiator: [u8; 32],
}

/// Derives the session keys from a secret both ends share (e.g. a TLS exporter value), with
/// HKDF-SHA256. Both peer names go into the info, so keys are bound to the pair and direction.
pub fn derive_keys(secret: &[u8], initiator: PeerName, responder: PeerName) -> SessionKeys {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(secret);
    let (i, r) = (peer_to_bytes(initiator), peer_to_bytes(responder));
    let expand = |direction: &[u8]| {
        let info = [b"meshctl sleeve key".as_slice(), &i, &r, direction];
        let mut key = [0u8; 32];
        prk.expand(&info, hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut key))
            .expect("HKDF-SHA256 yields 32 bytes");
        key
    };
    SessionKeys {
        initiator_to_responder: expand(b"initiator to responder"),
        responder_to_initiator: expand(b"responder to initiator"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: [u8; HEADER_LEN] = [1, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 42];

    #[test]
    fn seal_open_round_trip() {
        let key = [7u8; 32];
        let body = b"some ethernet frames".to_vec();
        let mut buf = body.clone();
        SealingKey::new(&key).seal(&HEADER, 42, &mut buf);
        assert_eq!(buf.len(), body.len() + TAG_LEN);
        assert_ne!(&buf[..body.len()], &body[..]);
        let plain = OpeningKey::new(&key).open(&HEADER, 42, &mut buf).unwrap();
        assert_eq!(plain, &body[..]);
    }

    #[test]
    fn tampering_fails_authentication() {
        let key = [7u8; 32];
        let mut sealed = b"0123456789abcdef0123".to_vec();
        SealingKey::new(&key).seal(&HEADER, 42, &mut sealed);
        let opener = OpeningKey::new(&key);
        for i in 0..sealed.len() {
            let mut b = sealed.clone();
            b[i] ^= 0x01;
            assert_eq!(opener.open(&HEADER, 42, &mut b), Err(OpenError), "byte {i}");
        }
        for i in 0..HEADER_LEN {
            let mut h = HEADER;
            h[i] ^= 0x80;
            let mut b = sealed.clone();
            assert_eq!(
                opener.open(&h, 42, &mut b),
                Err(OpenError),
                "header byte {i}"
            );
        }
        let mut b = sealed.clone();
        assert_eq!(
            opener.open(&HEADER, 43, &mut b),
            Err(OpenError),
            "other counter"
        );
    }

    #[test]
    fn wrong_key_fails_authentication() {
        let mut sealed = b"body".to_vec();
        SealingKey::new(&[1u8; 32]).seal(&HEADER, 0, &mut sealed);
        assert_eq!(
            OpeningKey::new(&[2u8; 32]).open(&HEADER, 0, &mut sealed),
            Err(OpenError)
        );
    }

    #[test]
    fn short_inputs_never_panic() {
        let opener = OpeningKey::new(&[1u8; 32]);
        for n in 0..=TAG_LEN + 1 {
            let mut b = vec![0u8; n];
            assert_eq!(opener.open(&HEADER, 0, &mut b), Err(OpenError));
        }
    }

    #[test]
    fn derived_keys_bind_names_and_directions() {
        let (a, b) = (PeerName(0xaa), PeerName(0xbb));
        let k = derive_keys(b"secret", a, b);
        assert_ne!(k.initiator_to_responder, k.responder_to_initiator);
        assert!(derive_keys(b"secret", a, b) == k, "deterministic");
        let swapped = derive_keys(b"secret", b, a);
        assert_ne!(swapped.initiator_to_responder, k.initiator_to_responder);
        let other = derive_keys(b"secres", a, b);
        assert_ne!(other.initiator_to_responder, k.initiator_to_responder);
    }
}

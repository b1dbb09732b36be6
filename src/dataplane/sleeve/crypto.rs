//! Sealing and opening sleeve bodies, and deriving the per-direction session keys.
//!
//! ChaCha20-Poly1305 or AES-256-GCM (`ring`, negotiated per session: see [`Cipher::negotiate`]),
//! with the 16-byte outer header as associated data and the nonce `4 zero bytes || counter BE`.
//! Sans-IO: no sockets, no clock, no randomness.
//!
//! Keys rotate by counter, without a message and without a gap: a session's counters are cut into
//! epochs of `2^shift` datagrams (see [`epoch_of`]), epoch 0 seals under the session key and every
//! later epoch under a key derived from it and the epoch number ([`epoch_key`]). The counter travels
//! in the clear in every header, so the receiver knows which key opened each datagram and needs no
//! signal when the sender moves on; datagrams reordered across an epoch boundary still open.
//! [`SendKeys`] and [`RecvKeys`] keep the keys of the newest epochs. The default of 2^22 datagrams
//! per key keeps AES-256-GCM far inside its confidentiality limit of 2^23 packets per key (RFC
//! 9001, section 6.6); at 20 Gbit/s of full-size datagrams a key lasts about 2.5 s.
//!
//! Not here: choosing counters (the sleeve task owns one per session and never reuses one),
//! replay protection (`replay.rs`), and agreeing on the secret (the control connection).
//!
//! Invariants: a key is used with each counter at most once; that is the caller's duty. The key
//! caches only ever hold keys that derive from the session key, so they never change what opens.

use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh::PeerName;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use ring::hkdf;

use super::frame::{peer_to_bytes, HEADER_LEN};

/// Length of the authentication tag appended to sealed bodies.
pub const TAG_LEN: usize = 16;

/// HKDF salt for session keys.
const KDF_SALT: &[u8] = b"meshctl sleeve v1";
/// HKDF salt for epoch keys.
const EPOCH_SALT: &[u8] = b"meshctl sleeve epoch v1";

/// Datagrams per key epoch as a power of two, unless a session agreed on less.
pub const EPOCH_SHIFT_DEFAULT: u8 = 22;
/// The smallest epoch a router accepts (256 datagrams); tests use it to rotate often.
pub const EPOCH_SHIFT_MIN: u8 = 8;
/// A shift this large never rotates (peers that predate rotation).
pub const EPOCH_SHIFT_NEVER: u8 = 64;

/// The epoch a counter belongs to under `shift`.
pub fn epoch_of(counter: u64, shift: u8) -> u64 {
    counter.checked_shr(u32::from(shift)).unwrap_or(0)
}

/// The epoch length two routers use for a session: the shorter of the two they announced (never
/// below [`EPOCH_SHIFT_MIN`]), or no rotation when either predates it. Symmetric.
pub fn agree_epoch_shift(a: Option<u8>, b: Option<u8>) -> u8 {
    match (a, b) {
        (Some(a), Some(b)) => a.min(b).clamp(EPOCH_SHIFT_MIN, EPOCH_SHIFT_NEVER),
        _ => EPOCH_SHIFT_NEVER,
    }
}

/// The key of `epoch`: the session key itself for epoch 0, else
/// HKDF-SHA256(salt, session key) expanded with the epoch number.
pub fn epoch_key(session_key: &[u8; 32], epoch: u64) -> [u8; 32] {
    if epoch == 0 {
        return *session_key;
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, EPOCH_SALT).extract(session_key);
    let number = epoch.to_be_bytes();
    let info = [b"meshctl sleeve epoch key".as_slice(), &number];
    let mut key = [0u8; 32];
    prk.expand(&info, hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut key))
        .expect("HKDF-SHA256 yields 32 bytes");
    key
}

/// The authentication tag did not match: wrong key, wrong counter or tampered bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("sleeve datagram failed authentication")]
pub struct OpenError;

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The AEAD a session seals with. Both ends of a session use the same one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// ChaCha20-Poly1305: fast everywhere, the default and the fallback.
    #[default]
    ChaCha20Poly1305,
    /// AES-256-GCM: about 3-4x faster than ChaCha20 on CPUs with AES and carry-less multiply
    /// instructions, much slower without them.
    Aes256Gcm,
}

impl Cipher {
    /// The name shown in status and accepted by `--cipher`.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::ChaCha20Poly1305 => "ChaCha20-Poly1305",
            Cipher::Aes256Gcm => "AES-256-GCM",
        }
    }

    /// Parses a `--cipher` value (case-insensitive; `chacha20`, `aes`, `aes-256-gcm`, ...).
    pub fn parse(s: &str) -> Option<Cipher> {
        match s.to_ascii_lowercase().as_str() {
            "chacha20-poly1305" | "chacha20poly1305" | "chacha20" | "chacha" => {
                Some(Cipher::ChaCha20Poly1305)
            }
            "aes-256-gcm" | "aes256gcm" | "aes-gcm" | "aes" => Some(Cipher::Aes256Gcm),
            _ => None,
        }
    }

    /// Wire code in the handshake.
    pub fn code(self) -> u8 {
        match self {
            Cipher::ChaCha20Poly1305 => 1,
            Cipher::Aes256Gcm => 2,
        }
    }

    /// Inverse of [`Cipher::code`].
    pub fn from_code(code: u8) -> Option<Cipher> {
        match code {
            1 => Some(Cipher::ChaCha20Poly1305),
            2 => Some(Cipher::Aes256Gcm),
            _ => None,
        }
    }

    /// Whether this CPU has the instructions that make AES-256-GCM fast.
    pub fn aes_is_fast() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
        }
        #[cfg(target_arch = "aarch64")]
        {
            std::arch::is_aarch64_feature_detected!("aes")
                && std::arch::is_aarch64_feature_detected!("pmull")
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    }

    /// The cipher both ends of a session use, computed the same way on both from what each
    /// announced: a forced ChaCha20 on either side wins, then a forced AES; otherwise AES-256-GCM
    /// when both have fast AES, else ChaCha20-Poly1305. Symmetric in its arguments.
    pub fn negotiate(a: (bool, Option<Cipher>), b: (bool, Option<Cipher>)) -> Cipher {
        let forced = [a.1, b.1];
        if forced.contains(&Some(Cipher::ChaCha20Poly1305)) {
            Cipher::ChaCha20Poly1305
        } else if forced.contains(&Some(Cipher::Aes256Gcm)) || (a.0 && b.0) {
            Cipher::Aes256Gcm
        } else {
            Cipher::ChaCha20Poly1305
        }
    }
}

fn less_safe_key(cipher: Cipher, key: &[u8; 32]) -> LessSafeKey {
    let alg = match cipher {
        Cipher::ChaCha20Poly1305 => &CHACHA20_POLY1305,
        Cipher::Aes256Gcm => &AES_256_GCM,
    };
    let unbound = UnboundKey::new(alg, key).expect("a 32-byte key fits both AEADs");
    LessSafeKey::new(unbound)
}

/// Seals bodies we send to one neighbour.
pub struct SealingKey(LessSafeKey);

impl SealingKey {
    /// Builds a ChaCha20-Poly1305 key from 32 bytes of key material.
    #[cfg(test)]
    pub fn new(key: &[u8; 32]) -> Self {
        Self::with_cipher(Cipher::ChaCha20Poly1305, key)
    }

    /// Builds a key for `cipher` from 32 bytes of key material.
    pub fn with_cipher(cipher: Cipher, key: &[u8; 32]) -> Self {
        Self(less_safe_key(cipher, key))
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
            .expect("both AEADs seal any body shorter than 64 GiB");
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

/// Opens bodies one neighbour sent us.
pub struct OpeningKey(LessSafeKey);

impl OpeningKey {
    /// Builds a ChaCha20-Poly1305 key from 32 bytes of key material.
    #[cfg(test)]
    pub fn new(key: &[u8; 32]) -> Self {
        Self::with_cipher(Cipher::ChaCha20Poly1305, key)
    }

    /// Builds a key for `cipher` from 32 bytes of key material.
    pub fn with_cipher(cipher: Cipher, key: &[u8; 32]) -> Self {
        Self(less_safe_key(cipher, key))
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

/// The sealing side of one session's key schedule, shared by the threads that send to it.
pub struct SendKeys {
    cipher: Cipher,
    session_key: [u8; 32],
    shift: u8,
    /// The newest epoch any thread sealed in, with its key.
    current: ArcSwap<(u64, SealingKey)>,
}

impl SendKeys {
    /// The schedule for `session_key` with epochs of `2^shift` datagrams.
    pub fn new(cipher: Cipher, session_key: &[u8; 32], shift: u8) -> Self {
        Self {
            cipher,
            session_key: *session_key,
            shift,
            current: ArcSwap::from_pointee((0, SealingKey::with_cipher(cipher, session_key))),
        }
    }

    /// The newest epoch sealed in so far.
    #[cfg(test)]
    pub fn epoch(&self) -> u64 {
        self.current.load().0
    }

    /// Seals `body` in place under the key of `counter`'s epoch and returns the tag. The first
    /// datagram of a new epoch derives its key and makes it the current one.
    // HOT PATH
    pub fn seal_detached(
        &self,
        header: &[u8; HEADER_LEN],
        counter: u64,
        body: &mut [u8],
    ) -> [u8; TAG_LEN] {
        let epoch = epoch_of(counter, self.shift);
        let current = self.current.load();
        if current.0 == epoch {
            return current.1.seal_detached(header, counter, body);
        }
        let key = SealingKey::with_cipher(self.cipher, &epoch_key(&self.session_key, epoch));
        let tag = key.seal_detached(header, counter, body);
        // Another thread may still finish a datagram of the old epoch; it derives that key again.
        if epoch > current.0 {
            self.current.store(Arc::new((epoch, key)));
        }
        tag
    }
}

/// The opening side of one session's key schedule, owned by the receiving thread.
pub struct RecvKeys {
    cipher: Cipher,
    session_key: [u8; 32],
    shift: u8,
    /// The keys of the two newest epochs that opened a datagram.
    cache: [(u64, OpeningKey); 2],
}

impl RecvKeys {
    /// The schedule for `session_key` with epochs of `2^shift` datagrams.
    pub fn new(cipher: Cipher, session_key: &[u8; 32], shift: u8) -> Self {
        let first = || (0, OpeningKey::with_cipher(cipher, session_key));
        Self {
            cipher,
            session_key: *session_key,
            shift,
            cache: [first(), first()],
        }
    }

    /// The newest epoch that opened a datagram.
    #[cfg(test)]
    pub fn epoch(&self) -> u64 {
        self.cache[0].0.max(self.cache[1].0)
    }

    /// Opens `buf` (sealed body and tag) under the key of `counter`'s epoch. A key derived for a
    /// new epoch is kept only once a datagram opened with it, so forged counters can't evict keys.
    // HOT PATH
    pub fn open<'b>(
        &mut self,
        header: &[u8; HEADER_LEN],
        counter: u64,
        buf: &'b mut [u8],
    ) -> Result<&'b [u8], OpenError> {
        let epoch = epoch_of(counter, self.shift);
        if let Some((_, key)) = self.cache.iter().find(|(e, _)| *e == epoch) {
            return key.open(header, counter, buf);
        }
        let key = OpeningKey::with_cipher(self.cipher, &epoch_key(&self.session_key, epoch));
        let plain = key.open(header, counter, buf)?;
        let oldest = usize::from(self.cache[1].0 < self.cache[0].0);
        if epoch > self.cache[oldest].0 {
            self.cache[oldest] = (epoch, key);
        }
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
    fn aes_round_trips_and_differs_from_chacha() {
        let key = [9u8; 32];
        let mut a = b"frames".to_vec();
        SealingKey::with_cipher(Cipher::Aes256Gcm, &key).seal(&HEADER, 1, &mut a);
        let mut c = b"frames".to_vec();
        SealingKey::new(&key).seal(&HEADER, 1, &mut c);
        assert_ne!(a, c);
        let mut b = a.clone();
        let opened = OpeningKey::with_cipher(Cipher::Aes256Gcm, &key).open(&HEADER, 1, &mut b);
        assert_eq!(opened.unwrap(), b"frames");
        assert_eq!(
            OpeningKey::new(&key).open(&HEADER, 1, &mut a),
            Err(OpenError)
        );
    }

    #[test]
    fn epochs_rotate_keys_and_reordered_datagrams_still_open() {
        let key = [5u8; 32];
        assert_eq!(epoch_key(&key, 0), key);
        assert_ne!(epoch_key(&key, 1), key);
        assert_ne!(epoch_key(&key, 1), epoch_key(&key, 2));
        assert_eq!(epoch_of(u64::MAX, EPOCH_SHIFT_NEVER), 0);
        for cipher in [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm] {
            let send = SendKeys::new(cipher, &key, EPOCH_SHIFT_MIN);
            let mut recv = RecvKeys::new(cipher, &key, EPOCH_SHIFT_MIN);
            let seal = |counter: u64| {
                let mut body = counter.to_be_bytes().to_vec();
                let tag = send.seal_detached(&HEADER, counter, &mut body);
                body.extend_from_slice(&tag);
                body
            };
            let epoch = 1u64 << EPOCH_SHIFT_MIN;
            // Across three boundaries, with the last datagram of each epoch arriving late.
            let mut late = None;
            for counter in 0..3 * epoch + 5 {
                let mut d = seal(counter);
                if counter % epoch == epoch - 1 {
                    late = Some((counter, d));
                    continue;
                }
                let plain = recv.open(&HEADER, counter, &mut d).expect("opens");
                assert_eq!(plain, counter.to_be_bytes(), "{cipher:?} counter {counter}");
                if counter % epoch == 2 {
                    if let Some((c, mut d)) = late.take() {
                        assert!(recv.open(&HEADER, c, &mut d).is_ok(), "late {c}");
                    }
                }
            }
            assert_eq!(send.epoch(), 3);
            assert_eq!(recv.epoch(), 3);
            // A datagram sealed under the session key but numbered in epoch 3 does not open.
            let mut forged = b"x".to_vec();
            SealingKey::with_cipher(cipher, &key).seal(&HEADER, 3 * epoch + 9, &mut forged);
            assert_eq!(
                recv.open(&HEADER, 3 * epoch + 9, &mut forged),
                Err(OpenError)
            );
            // A forged counter far ahead opens nothing and evicts nothing.
            let mut junk = vec![0u8; 40];
            assert_eq!(recv.open(&HEADER, 1 << 40, &mut junk), Err(OpenError));
            assert_eq!(recv.epoch(), 3);
        }
    }

    #[test]
    fn negotiation_is_symmetric() {
        use Cipher::*;
        let cases = [
            ((true, None), (true, None), Aes256Gcm),
            ((true, None), (false, None), ChaCha20Poly1305),
            ((false, Some(Aes256Gcm)), (false, None), Aes256Gcm),
            (
                (true, Some(ChaCha20Poly1305)),
                (true, Some(Aes256Gcm)),
                ChaCha20Poly1305,
            ),
            (
                (true, Some(ChaCha20Poly1305)),
                (true, None),
                ChaCha20Poly1305,
            ),
        ];
        for (a, b, want) in cases {
            assert_eq!(Cipher::negotiate(a, b), want, "{a:?} {b:?}");
            assert_eq!(Cipher::negotiate(b, a), want, "{b:?} {a:?}");
        }
        for c in [ChaCha20Poly1305, Aes256Gcm] {
            assert_eq!(Cipher::from_code(c.code()), Some(c));
            assert_eq!(Cipher::parse(c.name()), Some(c));
        }
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

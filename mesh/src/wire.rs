//! Framing of messages on a control connection: `[PROTOCOL_VERSION: u8][postcard(Message)]`.
//!
//! One message per call; the transport (the daemon's QUIC streams) delimits messages. The leading
//! version byte lets a peer refuse a different protocol with an error that names both versions
//! instead of a confusing decode failure.
//!
//! Not here: the handshake and authentication (the daemon, before `Router::handle_connected`).
//!
//! Invariants: [`decode`] never panics on any input, and `decode(&encode(m)) == Ok(m)`.

use serde::{Deserialize, Serialize};

use crate::topology::TopologyUpdate;

/// The protocol version we speak; the first byte of every message.
pub const PROTOCOL_VERSION: u8 = 1;

/// A message between two routers over their control connection.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Message {
    /// Topology entries: a delta of what changed, or our full state (to a new neighbour and
    /// periodically). Both merge the same way, so the receiver need not know which it got.
    Gossip(TopologyUpdate),
    /// IPAM state: what changed, or the full state (to a new neighbour and periodically); both
    /// merge like a CRDT (see `ipam`).
    Ipam(Box<crate::ipam::IpamUpdate>),
    /// Anti-entropy, sent periodically to a few random neighbours: an 8-byte summary of the
    /// sender's reachable topology ([`crate::Topology::digest`]) and its size. A receiver whose
    /// view differs answers with its [`Message::Versions`] (small meshes) or
    /// [`Message::Buckets`] (large ones), and the two sides then exchange only what the other
    /// lacks. Steady state costs a few bytes per neighbour per interval, whatever the mesh size.
    Digest {
        /// The sender's [`crate::Topology::digest`].
        digest: u64,
        /// How many reachable peers the sender knows.
        peers: u32,
        /// Whether the receiver should answer with its own digest on a mismatch.
        reply: bool,
    },
    /// Container name records (`crate::dns`): a delta on change, the full state to a new
    /// neighbour and periodically. Appended last, so the other variants keep their encoding;
    /// a peer built before it closes the connection on it with a decode error, and the router
    /// sends it only once there are records to carry.
    Dns(crate::dns::RecordsUpdate),
    /// Anti-entropy, second step: the name and version of every reachable entry the sender
    /// holds ([`crate::Topology::versions`]), sent in answer to a [`Message::Digest`] that
    /// differs from the sender's own. The receiver answers with the entries it holds newer or
    /// that the list lacks, as [`Message::Gossip`], and, if `reply` and the list holds
    /// something newer than its own view, with its own `Versions` (without `reply`). Each side
    /// so gets only what it lacks, for ~15 bytes per peer instead of a full state's whole
    /// entries: while a change is still spreading, digests differ everywhere, and answering
    /// each with a full state made one change cost O(N²) bytes across the mesh.
    Versions {
        /// The sender's reachable entries, sorted by name.
        entries: Vec<(crate::PeerName, crate::topology::Version)>,
        /// Whether the receiver should send its own list when it lacks something.
        reply: bool,
    },
    /// Anti-entropy in a large mesh, instead of [`Message::Versions`] in answer to a differing
    /// [`Message::Digest`]: the digest of each of the sender's
    /// [`crate::topology::DIGEST_BUCKETS`] buckets of entries (by [`crate::topology::bucket_of`]
    /// their name), 8 bytes each. The receiver answers with [`Message::BucketVersions`] for the
    /// buckets that differ, so a change costs the version lists of a bucket or two, O(N/64),
    /// where whole lists made each differing digest cost O(N) while a change spreads.
    Buckets {
        /// The sender's [`crate::Topology::bucket_digests`].
        digests: Vec<[u8; 8]>,
    },
    /// [`Message::Versions`] restricted to some buckets: the name and version of each of the
    /// sender's reachable entries in them. Answered like `Versions`, within those buckets.
    BucketVersions {
        /// The buckets listed, bit `i` for bucket `i`.
        buckets: crate::topology::BucketMask,
        /// The sender's reachable entries in those buckets, sorted by name.
        entries: Vec<(crate::PeerName, crate::topology::Version)>,
        /// Whether the receiver should send its own list when it lacks something.
        reply: bool,
    },
}

impl Message {
    /// The encoded size in bytes (version byte included) without building the encoding.
    pub fn encoded_len(&self) -> usize {
        // Serializing our own plain data types cannot fail.
        1 + postcard::serialize_with_flavor(self, postcard::ser_flavors::Size::default())
            .expect("invariant: Message serializes")
    }
}

/// Why bytes from a control connection are not a message.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The message was empty.
    #[error("empty message")]
    Empty,
    /// The remote speaks a protocol version we don't.
    #[error("peer speaks protocol version {got}, we speak {supported}")]
    UnknownVersion {
        /// The version byte the remote sent.
        got: u8,
        /// The version we speak ([`PROTOCOL_VERSION`]).
        supported: u8,
    },
    /// postcard could not decode the body.
    #[error("malformed message: {reason}")]
    Malformed {
        /// What was wrong.
        reason: String,
    },
}

/// Encodes `msg` with the version byte in front.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = vec![PROTOCOL_VERSION];
    // Serializing our own plain data types into a Vec cannot fail.
    let body = postcard::to_stdvec(msg).expect("invariant: Message serializes to a Vec");
    out.extend_from_slice(&body);
    out
}

/// Decodes one message. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnknownVersion {
            got: version,
            supported: PROTOCOL_VERSION,
        });
    }
    let (msg, rest) =
        postcard::take_from_bytes::<Message>(body).map_err(|e| DecodeError::Malformed {
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed {
            reason: format!("{} trailing bytes after the message", rest.len()),
        });
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerName;
    use crate::topology::{ConnectionInfo, Peer, Version};
    use proptest::prelude::*;

    fn sample() -> Message {
        Message::Gossip(TopologyUpdate {
            peers: vec![std::sync::Arc::new(Peer {
                name: PeerName(0xaabb_ccdd_eeff),
                nickname: "host-a".into(),
                version: Version {
                    incarnation: 1_700_000_000,
                    counter: 7,
                },
                connections: vec![
                    ConnectionInfo {
                        peer: PeerName(2),
                        addr: Some("192.0.2.1:6783".parse().expect("literal addr")),
                        outbound: true,
                    },
                    ConnectionInfo {
                        peer: PeerName(3),
                        addr: None,
                        outbound: false,
                    },
                ],
            })],
        })
    }

    #[test]
    fn round_trips() {
        let msg = sample();
        let bytes = encode(&msg);
        assert_eq!(bytes[0], PROTOCOL_VERSION);
        assert_eq!(decode(&bytes), Ok(msg.clone()));
        let empty = Message::Gossip(TopologyUpdate::default());
        assert_eq!(decode(&encode(&empty)), Ok(empty));
        let digest = Message::Digest {
            digest: u64::MAX,
            peers: 7,
            reply: true,
        };
        assert_eq!(decode(&encode(&digest)), Ok(digest.clone()));
        assert_eq!(digest.encoded_len(), encode(&digest).len());
        assert_eq!(msg.encoded_len(), bytes.len());
        let dns = Message::Dns(crate::dns::RecordsUpdate {
            records: vec![crate::dns::Record {
                name: "web.meshctl.local".into(),
                addr: "10.32.0.5".parse().expect("literal addr"),
                origin: PeerName(7),
                version: 3,
                tombstone: true,
            }],
        });
        assert_eq!(decode(&encode(&dns)), Ok(dns));
        let versions = Message::Versions {
            entries: vec![(
                PeerName(9),
                crate::topology::Version {
                    incarnation: 1_700_000_000,
                    counter: 12,
                },
            )],
            reply: true,
        };
        assert_eq!(decode(&encode(&versions)), Ok(versions.clone()));
        assert_eq!(versions.encoded_len(), encode(&versions).len());
        let buckets = Message::Buckets {
            digests: vec![u64::MAX.to_le_bytes(); crate::topology::DIGEST_BUCKETS],
        };
        assert_eq!(decode(&encode(&buckets)), Ok(buckets.clone()));
        // Version byte, variant, length, then 8 bytes per bucket.
        assert_eq!(
            buckets.encoded_len(),
            3 + 8 * crate::topology::DIGEST_BUCKETS
        );
        let some = Message::BucketVersions {
            buckets: 1 << 63 | 1,
            entries: vec![(
                PeerName(3),
                crate::topology::Version {
                    incarnation: 1,
                    counter: 2,
                },
            )],
            reply: false,
        };
        assert_eq!(decode(&encode(&some)), Ok(some));
    }

    #[test]
    fn refuses_empty_other_versions_and_garbage() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        let mut bytes = encode(&sample());
        bytes[0] = 2;
        let err = decode(&bytes).expect_err("version 2 is refused");
        assert_eq!(
            err.to_string(),
            "peer speaks protocol version 2, we speak 1"
        );
        assert!(matches!(
            decode(&[1, 0xff]),
            Err(DecodeError::Malformed { .. })
        ));
        let mut long = encode(&sample());
        long.push(0);
        assert!(matches!(decode(&long), Err(DecodeError::Malformed { .. })));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn random_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut bytes = vec![PROTOCOL_VERSION];
            bytes.extend(body);
            let _ = decode(&bytes);
        }

        #[test]
        fn mutated_messages_never_panic(pos in any::<usize>(), byte in any::<u8>()) {
            let mut bytes = encode(&sample());
            let i = pos % bytes.len();
            bytes[i] = byte;
            let _ = decode(&bytes);
        }
    }
}

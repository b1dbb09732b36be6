//! The mesh's view of who is connected to whom.
//!
//! `Topology` holds one [`Peer`] per router we have heard of, with the connections it last
//! announced. Others' entries change only through [`Topology::apply`], which merges a gossiped
//! update and returns the part that was new to us: that delta is what we pass on, so gossip
//! converges and its per-change cost is the changed entries, not the whole topology.
//!
//! Not here: route computation (`routes.rs`, a pure function of `&Topology`), deciding when to
//! send what (`router.rs`), and anything that touches a socket or the clock.
//!
//! Failure detection behind other peers: when a peer falls silent, its neighbours drop their
//! connections to it (transport idle timeout) and announce that; it then has no symmetric path
//! from us, so [`Topology::mark_reachable`] marks it unreachable (routes avoid it at once), and
//! after a grace period [`Topology::gc`] removes it and keeps a tombstone of its last version, so
//! that a stale (older) copy still circulating can't bring it back. It returns cleanly with any newer
//! version (a restart raises the incarnation; a reconnect bumps the counter).
//!
//! Entries are shared (`Arc<Peer>`): an update merged from a message is kept as is, never
//! copied, and a full state is a vector of pointers. The [`Topology::digest`] (an XOR over the
//! reachable entries' names and versions) lets neighbours compare whole views in 8 bytes, so
//! periodic anti-entropy costs O(1) bytes per peer when nothing differs; when they differ,
//! [`Topology::versions`] and [`Topology::newer_than`] find exactly the entries one side lacks.
//!
//! Invariants: our own peer is always present and only we change it (through
//! [`Topology::set_own_connections`], or by bumping its version when someone holds a copy at least
//! as new as ours); a peer's version only grows while the peer is held or tombstoned; unreachable
//! peers leave through [`Topology::gc`], never through `apply`; every held entry's connection
//! list is sorted by peer name with no duplicates. Weave equivalent: `mesh/peers.go`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::peer::PeerName;

/// Version of a peer's entry, ordered by `incarnation`, then `counter`.
///
/// The incarnation grows across restarts of the peer, so a restarted peer's new state always
/// beats copies of its previous life; the counter grows with every change within one life.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Version {
    /// Which life of the peer this is (the daemon uses its start time in unix seconds).
    pub incarnation: u64,
    /// Changes within this life.
    pub counter: u64,
}

/// One established connection, as announced by the peer at one end of it.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// The peer at the other end.
    pub peer: PeerName,
    /// The other end's address, if known (its listening address when we dialed it).
    pub addr: Option<SocketAddr>,
    /// Whether the announcing peer dialed this connection.
    pub outbound: bool,
}

/// What one peer announces about itself.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's name.
    pub name: PeerName,
    /// Human-readable name (hostname by default).
    pub nickname: String,
    /// Version of this entry; higher wins.
    pub version: Version,
    /// Established connections, sorted by peer name.
    pub connections: Vec<ConnectionInfo>,
}

impl Peer {
    /// Total order used by merge: version first, then content, so that two different entries
    /// with the same version (which a correct peer never produces) still merge deterministically.
    fn merge_cmp(&self, other: &Peer) -> Ordering {
        (self.version, &self.nickname, &self.connections).cmp(&(
            other.version,
            &other.nickname,
            &other.connections,
        ))
    }

    /// Whether this peer lists a connection to `other` (binary search: lists are sorted).
    pub fn lists(&self, other: PeerName) -> bool {
        self.connections
            .binary_search_by(|c| c.peer.cmp(&other))
            .is_ok()
    }
}

/// A set of peer entries: a delta or a full state. Gossiped as [`crate::wire::Message::Gossip`].
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct TopologyUpdate {
    /// The entries, at most one per peer, sorted by name.
    pub peers: Vec<Arc<Peer>>,
}

impl TopologyUpdate {
    /// True when the update carries no entries.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// A hasher for peer names: they are already uniform (from SHA-256) in the daemon, and small
/// integers in tests, so one multiply spreads them well and costs far less than SipHash.
#[derive(Default, Clone, Copy, Debug)]
pub struct NameHasher(u64);

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// `HashMap` keyed by [`PeerName`] with [`NameHasher`].
pub type NameMap<V> = std::collections::HashMap<PeerName, V, BuildHasherDefault<NameHasher>>;

/// The digest contribution of one entry.
fn digest_of(name: PeerName, version: Version) -> u64 {
    let mut h = NameHasher(0x5bd1_e995);
    h.write_u64(name.0);
    h.write_u64(version.incarnation);
    h.write_u64(version.counter);
    h.write_u64(0x2545_f491_4f6c_dd1d);
    h.finish()
}

/// How many buckets [`Topology::bucket_digests`] splits the reachable entries into.
pub const DIGEST_BUCKETS: usize = 64;

/// A set of digest buckets, bit `i` for bucket `i`.
pub type BucketMask = u64;

/// Every bucket.
pub const ALL_BUCKETS: BucketMask = u64::MAX;

/// The digest bucket of `name`: the top bits of a hash, so that small test names spread too.
pub fn bucket_of(name: PeerName) -> usize {
    let mut h = NameHasher(0x9ae1_6a3b_2f90_404f);
    h.write_u64(name.0);
    // The top 6 bits: always below DIGEST_BUCKETS.
    (h.finish() >> 58) as usize
}

fn in_mask(mask: BucketMask, name: PeerName) -> bool {
    mask & (1 << bucket_of(name)) != 0
}

/// Our view of the mesh: one entry per known peer, our own included.
#[derive(Clone, Debug)]
pub struct Topology {
    me: PeerName,
    peers: BTreeMap<PeerName, Arc<Peer>>,
    /// Held peers with no symmetric path from us, and since when.
    unreachable: BTreeMap<PeerName, Instant>,
    /// Last version of collected peers, and when they were collected.
    tombstones: BTreeMap<PeerName, (Version, Instant)>,
    /// XOR of `digest_of` over held reachable entries, per [`bucket_of`] the entry's name; the
    /// digest is the XOR of all buckets.
    buckets: [u64; DIGEST_BUCKETS],
}

/// Two topologies are equal when they hold the same entries (marks and tombstones aside).
impl PartialEq for Topology {
    fn eq(&self, other: &Topology) -> bool {
        self.me == other.me && self.peers == other.peers
    }
}

impl Eq for Topology {}

impl Topology {
    /// A topology that knows only us, with no connections.
    pub fn new(me: PeerName, nickname: String, incarnation: u64) -> Topology {
        let own = Peer {
            name: me,
            nickname,
            version: Version {
                incarnation,
                counter: 0,
            },
            connections: Vec::new(),
        };
        let mut t = Topology {
            me,
            peers: BTreeMap::new(),
            unreachable: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            buckets: [0; DIGEST_BUCKETS],
        };
        t.toggle_digest(me, own.version);
        t.peers.insert(me, Arc::new(own));
        t
    }

    /// Adds an entry to the digests, or removes it (XOR).
    fn toggle_digest(&mut self, name: PeerName, version: Version) {
        self.buckets[bucket_of(name)] ^= digest_of(name, version);
    }

    /// Our own name.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// Our own entry.
    pub fn own(&self) -> &Peer {
        self.peers
            .get(&self.me)
            .expect("invariant: our own entry is always present")
    }

    /// The entry for `name`, if we know it.
    pub fn peer(&self, name: PeerName) -> Option<&Peer> {
        self.peers.get(&name).map(|p| &**p)
    }

    /// All known peers, sorted by name (unreachable ones included until collected).
    pub fn peers(&self) -> impl Iterator<Item = &Peer> + '_ {
        self.peers.values().map(|p| &**p)
    }

    /// Number of known peers, us included.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Always false: we always know ourselves. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Whether `name` is held but marked unreachable (waiting for collection).
    pub fn is_unreachable(&self, name: PeerName) -> bool {
        self.unreachable.contains_key(&name)
    }

    /// Number of collected peers whose last version we still remember.
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// An 8-byte summary of the reachable entries: equal views give equal digests.
    pub fn digest(&self) -> u64 {
        self.buckets.iter().fold(0, |d, b| d ^ b)
    }

    /// Everything reachable we know, to send to a new neighbour or after a digest mismatch.
    /// Unreachable entries stay local: passing them on would let them circle the mesh.
    pub fn full_state(&self) -> TopologyUpdate {
        TopologyUpdate {
            peers: self
                .peers
                .iter()
                .filter(|(name, _)| !self.unreachable.contains_key(name))
                .map(|(_, p)| p.clone())
                .collect(),
        }
    }

    /// The digest of each of the [`DIGEST_BUCKETS`] buckets, as little-endian bytes: the
    /// reachable entries split by [`bucket_of`] their name. Two views whose digests differ
    /// differ only in the buckets whose digests differ.
    pub fn bucket_digests(&self) -> Vec<[u8; 8]> {
        self.buckets.iter().map(|d| d.to_le_bytes()).collect()
    }

    /// The buckets whose digest differs from `theirs` (a [`Topology::bucket_digests`]); a
    /// list of another length differs in every bucket.
    pub fn differing_buckets(&self, theirs: &[[u8; 8]]) -> BucketMask {
        if theirs.len() != DIGEST_BUCKETS {
            return ALL_BUCKETS;
        }
        self.buckets
            .iter()
            .zip(theirs)
            .enumerate()
            .filter(|(_, (mine, theirs))| mine.to_le_bytes() != **theirs)
            .fold(0, |mask, (i, _)| mask | (1 << i))
    }

    /// The name and version of every reachable entry in the buckets of `mask`, sorted by name:
    /// what a [`crate::wire::Message::Versions`] carries, about 15 bytes per peer where a full
    /// state costs a whole entry (its connection list) per peer.
    pub fn versions(&self, mask: BucketMask) -> Vec<(PeerName, Version)> {
        self.peers
            .iter()
            .filter(|(name, _)| !self.unreachable.contains_key(name) && in_mask(mask, **name))
            .map(|(name, p)| (*name, p.version))
            .collect()
    }

    /// Our reachable entries in the buckets of `mask` that `theirs` (a complete
    /// [`Topology::versions`] list of those buckets) lacks or holds at an older version:
    /// exactly what its sender is missing from our view there.
    pub fn newer_than(&self, theirs: &[(PeerName, Version)], mask: BucketMask) -> TopologyUpdate {
        let theirs: NameMap<Version> = theirs.iter().copied().collect();
        TopologyUpdate {
            peers: self
                .peers
                .iter()
                .filter(|(name, _)| !self.unreachable.contains_key(name) && in_mask(mask, **name))
                .filter(|(name, p)| theirs.get(name).is_none_or(|v| *v < p.version))
                .map(|(_, p)| p.clone())
                .collect(),
        }
    }

    /// Whether `theirs` lists an entry newer than anything we hold or remember of that peer,
    /// so that its sender has something for us.
    pub fn lacks_any(&self, theirs: &[(PeerName, Version)]) -> bool {
        theirs.iter().any(|(name, v)| {
            let held = self.peers.get(name).map(|p| p.version);
            let buried = self.tombstones.get(name).map(|(t, _)| *t);
            held.max(buried).is_none_or(|mine| mine < *v)
        })
    }

    /// Replaces our own connection list (sorted here) and bumps our version if it changed.
    /// Returns the delta to gossip, or `None` if nothing changed.
    pub fn set_own_connections(
        &mut self,
        mut connections: Vec<ConnectionInfo>,
    ) -> Option<TopologyUpdate> {
        connections.sort();
        connections.dedup_by_key(|c| c.peer);
        let own = self.own();
        if own.connections == connections {
            return None;
        }
        let mut next = own.clone();
        next.connections = connections;
        next.version.counter = next.version.counter.saturating_add(1);
        Some(TopologyUpdate {
            peers: vec![self.replace_own(next)],
        })
    }

    fn replace_own(&mut self, next: Peer) -> Arc<Peer> {
        let old = self.own().version;
        self.toggle_digest(self.me, old);
        self.toggle_digest(self.me, next.version);
        let next = Arc::new(next);
        self.peers.insert(self.me, next.clone());
        next
    }

    /// Merges a gossiped update; returns the entries that were new to us (the delta to pass on).
    ///
    /// Per peer the higher version wins. Our own entry is never replaced: if the update holds a
    /// copy of us at least as new as ours (we restarted within one incarnation, or our clock went
    /// back), we bump our version past it and include our entry in the delta, so ours wins.
    /// Copies no newer than a tombstone are ignored.
    pub fn apply(&mut self, update: TopologyUpdate) -> Option<TopologyUpdate> {
        let mut changed = BTreeSet::new();
        for incoming in update.peers {
            let incoming = normalized(incoming);
            if incoming.name == self.me {
                if self.outrank_copy_of_us(&incoming) {
                    changed.insert(self.me);
                }
                continue;
            }
            // The same version may come back (a peer that was cut off without changing its
            // entry); an older one is a stale copy.
            if let Some((version, _)) = self.tombstones.get(&incoming.name) {
                if incoming.version < *version {
                    continue;
                }
            }
            let newer = match self.peers.get(&incoming.name) {
                Some(held) => incoming.merge_cmp(held) == Ordering::Greater,
                None => true,
            };
            if newer {
                let name = incoming.name;
                self.tombstones.remove(&name);
                if !self.unreachable.contains_key(&name) {
                    if let Some(old) = self.peers.get(&name).map(|p| p.version) {
                        self.toggle_digest(name, old);
                    }
                    self.toggle_digest(name, incoming.version);
                }
                changed.insert(name);
                self.peers.insert(name, incoming);
            }
        }
        if changed.is_empty() {
            return None;
        }
        Some(TopologyUpdate {
            peers: changed
                .iter()
                .map(|name| self.peers[name].clone())
                .collect(),
        })
    }

    /// Bumps our own version above `copy` if `copy` is at least as new and not an exact echo of
    /// our entry. Returns whether it did.
    fn outrank_copy_of_us(&mut self, copy: &Peer) -> bool {
        let own = self.own();
        // An exact echo of our entry is not news; a different entry at our version, or any
        // higher version, comes from a previous life of ours and must be outranked.
        let echo = copy.version == own.version
            && copy.nickname == own.nickname
            && copy.connections == own.connections;
        if copy.version < own.version || echo {
            return false;
        }
        let mut next = own.clone();
        next.version = Version {
            incarnation: copy.version.incarnation,
            counter: copy.version.counter.saturating_add(1),
        };
        self.replace_own(next);
        true
    }

    /// Whether `a` and `b` both announce a connection to each other.
    pub fn symmetric(&self, a: PeerName, b: PeerName) -> bool {
        let lists = |x: PeerName, y: PeerName| self.peers.get(&x).is_some_and(|p| p.lists(y));
        lists(a, b) && lists(b, a)
    }

    /// `name`'s neighbours over symmetric connections, sorted by name.
    pub fn neighbours(&self, name: PeerName) -> Vec<PeerName> {
        let Some(peer) = self.peers.get(&name) else {
            return Vec::new();
        };
        peer.connections
            .iter()
            .map(|c| c.peer)
            .filter(|&other| other != name && self.symmetric(name, other))
            .collect()
    }

    /// Peers reachable from `from` over symmetric connections, `from` included if known.
    pub fn reachable(&self, from: PeerName) -> BTreeSet<PeerName> {
        let mut seen = BTreeSet::new();
        if !self.peers.contains_key(&from) {
            return seen;
        }
        let mut queue = VecDeque::from([from]);
        seen.insert(from);
        while let Some(name) = queue.pop_front() {
            for next in self.neighbours(name) {
                if seen.insert(next) {
                    queue.push_back(next);
                }
            }
        }
        seen
    }

    /// Marks every held peer for which `reachable` is false as unreachable (since `now`, if it
    /// was not already) and clears the mark of the others. Returns whether any mark changed.
    pub fn mark_reachable(&mut self, now: Instant, reachable: impl Fn(PeerName) -> bool) -> bool {
        let mut changed = false;
        let mut buckets = [0; DIGEST_BUCKETS];
        for (&name, peer) in &self.peers {
            if name == self.me || reachable(name) {
                changed |= self.unreachable.remove(&name).is_some();
                buckets[bucket_of(name)] ^= digest_of(name, peer.version);
            } else if let std::collections::btree_map::Entry::Vacant(e) =
                self.unreachable.entry(name)
            {
                e.insert(now);
                changed = true;
            }
        }
        self.buckets = buckets;
        changed
    }

    /// When the next unreachable peer or tombstone expires, for the caller's timer.
    pub fn next_expiry(&self, grace: Duration) -> Option<Instant> {
        let marks = self.unreachable.values().map(|&since| since + grace);
        let stones = self
            .tombstones
            .values()
            .map(|&(_, at)| at + tombstone_ttl(grace));
        marks.chain(stones).min()
    }

    /// Removes peers marked unreachable for at least `grace`, remembering their last version;
    /// forgets tombstones older than ten grace periods. Returns the removed names.
    pub fn gc(&mut self, now: Instant, grace: Duration) -> Vec<PeerName> {
        let removed: Vec<PeerName> = self
            .unreachable
            .iter()
            .filter(|&(_, &since)| now.saturating_duration_since(since) >= grace)
            .map(|(&name, _)| name)
            .collect();
        for name in &removed {
            self.unreachable.remove(name);
            if let Some(peer) = self.peers.remove(name) {
                self.tombstones.insert(*name, (peer.version, now));
            }
        }
        let ttl = tombstone_ttl(grace);
        self.tombstones
            .retain(|_, &mut (_, at)| now.saturating_duration_since(at) < ttl);
        removed
    }

    /// Addresses other peers announce for `name` (from their connection lists).
    pub fn addresses_of(&self, name: PeerName) -> BTreeSet<SocketAddr> {
        self.peers
            .values()
            .flat_map(|p| p.connections.iter())
            .filter(|c| c.peer == name)
            .filter_map(|c| c.addr)
            .collect()
    }
}

/// How long a tombstone outlives its peer's collection.
fn tombstone_ttl(grace: Duration) -> Duration {
    grace.saturating_mul(10)
}

/// `peer` with its connection list sorted by name and without duplicates (a correct peer sends
/// it that way; the check costs one pass, the copy happens only for a faulty sender).
fn normalized(peer: Arc<Peer>) -> Arc<Peer> {
    let ok = peer.connections.windows(2).all(|w| w[0].peer < w[1].peer);
    if ok {
        return peer;
    }
    let mut copy = (*peer).clone();
    copy.connections.sort();
    copy.connections.dedup_by_key(|c| c.peer);
    Arc::new(copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(x: u64) -> PeerName {
        PeerName(x)
    }

    fn peer(name: u64, counter: u64, conns: &[u64]) -> Peer {
        Peer {
            name: n(name),
            nickname: format!("p{name}"),
            version: Version {
                incarnation: 1,
                counter,
            },
            connections: conns
                .iter()
                .map(|&c| ConnectionInfo {
                    peer: n(c),
                    addr: None,
                    outbound: name < c,
                })
                .collect(),
        }
    }

    fn update(peers: Vec<Peer>) -> TopologyUpdate {
        TopologyUpdate {
            peers: peers.into_iter().map(Arc::new).collect(),
        }
    }

    #[test]
    fn apply_returns_only_what_was_new() {
        let mut t = Topology::new(n(1), "me".into(), 1);
        let delta = t.apply(update(vec![peer(2, 3, &[1]), peer(3, 1, &[])]));
        assert_eq!(delta.map(|d| d.peers.len()), Some(2));
        // Same again: nothing new.
        assert_eq!(t.apply(update(vec![peer(2, 3, &[1])])), None);
        // Older copy loses, newer copy wins and is the whole delta.
        assert_eq!(t.apply(update(vec![peer(2, 2, &[])])), None);
        let delta = t.apply(update(vec![peer(2, 4, &[]), peer(3, 1, &[])]));
        assert_eq!(delta, Some(update(vec![peer(2, 4, &[])])));
    }

    #[test]
    fn our_own_entry_wins_over_copies_of_us() {
        let mut t = Topology::new(n(1), "me".into(), 5);
        // A stale copy from our previous life is ignored.
        let stale = Peer {
            version: Version {
                incarnation: 4,
                counter: 99,
            },
            ..peer(1, 0, &[7])
        };
        assert_eq!(t.apply(update(vec![stale])), None);
        assert!(t.own().connections.is_empty());
        // A copy as new as ours (same incarnation) makes us bump past it.
        let same = Peer {
            version: Version {
                incarnation: 5,
                counter: 3,
            },
            ..peer(1, 0, &[7])
        };
        let delta = t
            .apply(update(vec![same]))
            .expect("our entry is in the delta");
        assert_eq!(delta.peers[0].name, n(1));
        assert!(delta.peers[0].connections.is_empty());
        // An exact echo of our entry is not news.
        let echo = t.own().clone();
        assert_eq!(t.apply(update(vec![echo])), None);
        assert_eq!(
            t.own().version,
            Version {
                incarnation: 5,
                counter: 4
            }
        );
    }

    #[test]
    fn set_own_connections_bumps_only_on_change() {
        let mut t = Topology::new(n(1), "me".into(), 1);
        let conns = peer(1, 0, &[2]).connections;
        assert!(t.set_own_connections(conns.clone()).is_some());
        assert_eq!(t.own().version.counter, 1);
        assert!(t.set_own_connections(conns).is_none());
        assert_eq!(t.own().version.counter, 1);
    }

    #[test]
    fn digest_tracks_reachable_entries() {
        let mut a = Topology::new(n(1), "me".into(), 1);
        let mut b = Topology::new(n(1), "me".into(), 1);
        a.apply(update(vec![peer(2, 1, &[]), peer(3, 1, &[])]));
        b.apply(update(vec![peer(3, 1, &[])]));
        assert_ne!(a.digest(), b.digest());
        b.apply(update(vec![peer(2, 1, &[])]));
        assert_eq!(a.digest(), b.digest());
        a.apply(update(vec![peer(2, 2, &[])]));
        assert_ne!(a.digest(), b.digest());
    }

    fn arb_peer() -> impl Strategy<Value = Peer> {
        (
            2u64..6,
            0u64..4,
            0u64..3,
            proptest::collection::vec(1u64..6, 0..4),
        )
            .prop_map(|(name, counter, nick, conns)| Peer {
                nickname: format!("n{nick}"),
                ..peer(name, counter, &conns)
            })
    }

    fn arb_update() -> impl Strategy<Value = TopologyUpdate> {
        proptest::collection::vec(arb_peer(), 0..5).prop_map(update)
    }

    fn merged(updates: &[&TopologyUpdate]) -> Topology {
        let mut t = Topology::new(n(1), "me".into(), 1);
        for u in updates {
            t.apply((*u).clone());
        }
        t
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in arb_update(), b in arb_update()) {
            prop_assert_eq!(merged(&[&a, &b]), merged(&[&b, &a]));
        }

        #[test]
        fn merge_is_associative(a in arb_update(), b in arb_update(), c in arb_update()) {
            // (a + b) + c == a + (b + c): merge b and c first into one update, then apply it.
            let mut bc = Topology::new(n(1), "me".into(), 1);
            bc.apply(b.clone());
            bc.apply(c.clone());
            let bc_update = TopologyUpdate {
                peers: bc.peers().filter(|p| p.name != n(1)).cloned().map(Arc::new).collect(),
            };
            prop_assert_eq!(merged(&[&a, &b, &c]), merged(&[&a, &bc_update]));
        }

        #[test]
        fn merge_is_idempotent(a in arb_update()) {
            let mut t = merged(&[&a]);
            let before = t.clone();
            prop_assert_eq!(t.apply(a.clone()), None);
            prop_assert_eq!(t, before);
        }

        #[test]
        fn delta_carries_everything_that_changed(a in arb_update(), b in arb_update()) {
            // Applying b's delta to a copy of the pre-b state yields the same result as applying b.
            let mut t = merged(&[&a]);
            let mut copy = t.clone();
            if let Some(delta) = t.apply(b.clone()) {
                copy.apply(delta);
            }
            prop_assert_eq!(t, copy);
        }
    }
}

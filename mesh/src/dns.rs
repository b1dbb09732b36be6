//! Container names, gossiped across the mesh: a set of (name, address) records that merges like a CRDT.
//!
//! Each record is owned by the peer that registered it (the host of the container). Only the owner adds
//! or removes it; removal leaves a tombstone with a higher version, so a stale copy arriving later can't
//! bring the record back. Merge keeps, per record, the entry with the higher `(version, origin)`, so it is
//! commutative, associative and idempotent. Tombstones are dropped by [`Records::gc`] after a grace
//! period, long enough for every peer to have seen them.
//!
//! Not here: the DNS protocol and the server (the daemon), gossip transport (the router carries
//! [`RecordsUpdate`] like any other channel). Names are stored lowercased and without the trailing dot.
//!
//! Invariants: every record's version is at most the owner's `clock`; a live record and a tombstone never
//! coexist for one key.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::PeerName;

/// One record as gossiped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Lowercased, without the trailing dot (e.g. `web.meshctl.local`).
    pub name: String,
    /// The container's address.
    pub addr: IpAddr,
    /// The peer that registered it.
    pub origin: PeerName,
    /// Grows with every change the origin makes.
    pub version: u64,
    /// True once the origin removed it.
    pub tombstone: bool,
}

/// A set of records: a delta or a full state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordsUpdate {
    /// At most one entry per (name, addr).
    pub records: Vec<Record>,
}

type Key = (String, IpAddr);

/// This peer's view of all names in the mesh.
#[derive(Clone, Debug)]
pub struct Records {
    me: PeerName,
    clock: u64,
    entries: BTreeMap<Key, Record>,
    /// When each tombstone was first seen here, for `gc`.
    buried: BTreeMap<Key, Instant>,
    /// Grows with every change to `entries`, so a reader can tell cheaply whether to re-read.
    generation: u64,
}

/// Normalizes a DNS name: lowercase, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Records {
    /// An empty set for peer `me`; `clock` should exceed any version `me` used before (the daemon passes
    /// its incarnation, so records of a restarted peer win over its old ones).
    pub fn new(me: PeerName, clock: u64) -> Records {
        Records {
            me,
            clock,
            entries: BTreeMap::new(),
            buried: BTreeMap::new(),
            generation: 0,
        }
    }

    /// Registers `name -> addr` as ours; returns the delta to gossip (None if already present).
    pub fn add(&mut self, name: &str, addr: IpAddr) -> Option<RecordsUpdate> {
        let key = (normalize(name), addr);
        if self.entries.get(&key).is_some_and(|r| !r.tombstone) {
            return None;
        }
        self.clock += 1;
        let record = Record {
            name: key.0.clone(),
            addr,
            origin: self.me,
            version: self.clock,
            tombstone: false,
        };
        self.buried.remove(&key);
        self.entries.insert(key, record.clone());
        self.generation += 1;
        Some(RecordsUpdate {
            records: vec![record],
        })
    }

    /// Removes our records for `name` (all addresses if `addr` is None); returns the delta to gossip.
    pub fn remove(
        &mut self,
        now: Instant,
        name: &str,
        addr: Option<IpAddr>,
    ) -> Option<RecordsUpdate> {
        let name = normalize(name);
        let keys: Vec<Key> = self
            .entries
            .iter()
            .filter(|(k, r)| {
                k.0 == name && addr.is_none_or(|a| a == k.1) && r.origin == self.me && !r.tombstone
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in keys {
            self.clock += 1;
            let record = self
                .entries
                .get_mut(&key)
                .expect("invariant: key was just listed");
            record.version = self.clock;
            record.tombstone = true;
            out.push(record.clone());
            self.buried.insert(key, now);
            self.generation += 1;
        }
        (!out.is_empty()).then_some(RecordsUpdate { records: out })
    }

    /// Merges gossip; returns what was new to us (to pass on).
    pub fn merge(&mut self, now: Instant, update: RecordsUpdate) -> Option<RecordsUpdate> {
        let mut new = Vec::new();
        for record in update.records {
            let key = (normalize(&record.name), record.addr);
            let wins = match self.entries.get(&key) {
                None => true,
                Some(old) => (record.version, record.origin) > (old.version, old.origin),
            };
            if !wins {
                continue;
            }
            if record.origin == self.me {
                // A copy of our own record from an earlier life: move our clock past it.
                self.clock = self.clock.max(record.version);
            }
            if record.tombstone {
                self.buried.entry(key.clone()).or_insert(now);
            } else {
                self.buried.remove(&key);
            }
            self.entries.insert(key, record.clone());
            self.generation += 1;
            new.push(record);
        }
        (!new.is_empty()).then_some(RecordsUpdate { records: new })
    }

    /// Everything, for a new neighbour or a periodic full exchange.
    pub fn full_state(&self) -> RecordsUpdate {
        RecordsUpdate {
            records: self.entries.values().cloned().collect(),
        }
    }

    /// Live addresses for `name`, sorted.
    pub fn lookup(&self, name: &str) -> Vec<IpAddr> {
        let name = normalize(name);
        self.entries
            .range((name.clone(), IpAddr::from([0u8; 4]))..)
            .take_while(|((n, _), _)| *n == name)
            .filter(|(_, r)| !r.tombstone)
            .map(|((_, a), _)| *a)
            .collect()
    }

    /// Live records, for status.
    pub fn live(&self) -> impl Iterator<Item = &Record> {
        self.entries.values().filter(|r| !r.tombstone)
    }

    /// Drops tombstones older than `grace`, and (when `origin_gone` says so) live records of peers that
    /// left the mesh for good. Returns how many entries were dropped.
    pub fn gc(
        &mut self,
        now: Instant,
        grace: Duration,
        origin_gone: impl Fn(PeerName) -> bool,
    ) -> usize {
        let before = self.entries.len();
        let expired: Vec<Key> = self
            .buried
            .iter()
            .filter(|(_, &t)| now.duration_since(t) >= grace)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.buried.remove(&key);
            self.entries.remove(&key);
        }
        self.entries
            .retain(|_, r| r.tombstone || r.origin == self.me || !origin_gone(r.origin));
        let dropped = before - self.entries.len();
        if dropped > 0 {
            self.generation += 1;
        }
        dropped
    }

    /// A number that grows with every change; equal numbers mean the same records.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

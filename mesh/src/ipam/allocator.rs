//! Which addresses of our own space are in use, by which container.
//!
//! An allocation belongs to a container id (the netns path or a name) and a subnet. A released
//! allocation stays reserved for a grace period, so a container that restarts quickly gets its
//! address back. Finding a free address is a walk over our owned ranges and the sorted set of
//! used addresses: lowest free first, so results are deterministic.
//!
//! Not here: ownership (`ring.rs`); this module trusts the caller to pass the ranges we own.
//! Invariants: `used` holds exactly the addresses of `allocations`; one address per (container,
//! subnet).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::space::{Cidr, Range};

/// One container's address in one subnet.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Allocation {
    /// The address.
    pub addr: u64,
    /// Released and waiting out the grace period (then freed).
    pub releasing: bool,
}

/// The allocations of this peer.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Allocator {
    allocations: BTreeMap<(Cidr, String), Allocation>,
    used: BTreeMap<Cidr, BTreeSet<u64>>,
    /// When releasing allocations become free (not persisted: a restart restarts the grace).
    #[serde(skip)]
    release_at: BTreeMap<(Cidr, String), Instant>,
}

impl Allocator {
    /// The address `id` holds in `subnet`, if any (also while releasing).
    pub fn lookup(&self, subnet: Cidr, id: &str) -> Option<&Allocation> {
        self.allocations.get(&(subnet, id.to_owned()))
    }

    /// Takes `id`'s address back from release, if it is waiting out its grace period.
    pub fn reclaim(&mut self, subnet: Cidr, id: &str) -> Option<u64> {
        let key = (subnet, id.to_owned());
        let a = self.allocations.get_mut(&key)?;
        a.releasing = false;
        self.release_at.remove(&key);
        Some(a.addr)
    }

    /// Allocates the lowest free address of `owned` (restricted to `hosts`) to `id`.
    pub fn allocate(&mut self, subnet: Cidr, id: &str, owned: &[Range]) -> Option<u64> {
        let used = self.used.entry(subnet).or_default();
        let hosts = subnet.hosts();
        let addr = owned
            .iter()
            .map(|r| r.intersect(&hosts))
            .find_map(|r| first_free(r, used))?;
        used.insert(addr);
        self.allocations.insert(
            (subnet, id.to_owned()),
            Allocation {
                addr,
                releasing: false,
            },
        );
        Some(addr)
    }

    /// Starts the grace period of `id`'s addresses (all subnets); they free at `until`.
    /// Returns how many addresses were affected.
    pub fn release(&mut self, id: &str, until: Instant) -> usize {
        let mut n = 0;
        for (key, a) in self.allocations.iter_mut() {
            if key.1 == id && !a.releasing {
                a.releasing = true;
                self.release_at.insert(key.clone(), until);
                n += 1;
            }
        }
        n
    }

    /// Re-arms grace periods after a restart: releasing allocations free at `until`.
    pub fn restart_grace(&mut self, until: Instant) {
        for (key, a) in &self.allocations {
            if a.releasing {
                self.release_at.insert(key.clone(), until);
            }
        }
    }

    /// Frees allocations whose grace period ended; returns whether any did.
    pub fn expire(&mut self, now: Instant) -> bool {
        let due: Vec<_> = self
            .release_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &due {
            self.release_at.remove(key);
            self.remove(key);
        }
        !due.is_empty()
    }

    /// The earliest end of a grace period.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.release_at.values().min().copied()
    }

    /// Drops allocations outside `owned` (space we no longer own); returns them.
    pub fn retain_owned(&mut self, subnet: Cidr, owned: &[Range]) -> Vec<(String, u64)> {
        let lost: Vec<(Cidr, String)> = self
            .allocations
            .iter()
            .filter(|(k, a)| k.0 == subnet && !owned.iter().any(|r| r.contains(a.addr)))
            .map(|(k, _)| k.clone())
            .collect();
        lost.into_iter()
            .filter_map(|k| self.remove(&k).map(|addr| (k.1, addr)))
            .collect()
    }

    fn remove(&mut self, key: &(Cidr, String)) -> Option<u64> {
        let a = self.allocations.remove(key)?;
        if let Some(used) = self.used.get_mut(&key.0) {
            used.remove(&a.addr);
        }
        Some(a.addr)
    }

    /// All allocations: (subnet, container id, allocation).
    pub fn all(&self) -> impl Iterator<Item = (Cidr, &str, &Allocation)> {
        self.allocations
            .iter()
            .map(|((s, id), a)| (*s, id.as_str(), a))
    }

    /// Free addresses of `owned` in `subnet`.
    pub fn free(&self, subnet: Cidr, owned: &[Range]) -> u64 {
        let hosts = subnet.hosts();
        let total: u64 = owned.iter().map(|r| r.intersect(&hosts).len()).sum();
        let used = self.used.get(&subnet).map_or(0, |u| {
            owned
                .iter()
                .map(|r| u.range(r.start..r.end).count() as u64)
                .sum()
        });
        total.saturating_sub(used)
    }

    /// The longest run of free addresses in `owned`, for a donation.
    pub fn largest_free_run(&self, subnet: Cidr, owned: &[Range]) -> Option<Range> {
        let empty = BTreeSet::new();
        let used = self.used.get(&subnet).unwrap_or(&empty);
        let hosts = subnet.hosts();
        let mut best: Option<Range> = None;
        for r in owned {
            let r = r.intersect(&hosts);
            let mut cursor = r.start;
            let mut consider = |run: Range| {
                if run.len() > best.map_or(0, |b| b.len()) {
                    best = Some(run);
                }
            };
            for &u in used.range(r.start..r.end) {
                consider(Range {
                    start: cursor,
                    end: u,
                });
                cursor = u + 1;
            }
            consider(Range {
                start: cursor,
                end: r.end,
            });
        }
        best.filter(|b| !b.is_empty())
    }
}

/// The lowest address of `range` not in `used`.
fn first_free(range: Range, used: &BTreeSet<u64>) -> Option<u64> {
    let mut cursor = range.start;
    for &u in used.range(range.start..range.end) {
        if u > cursor {
            break;
        }
        cursor = u + 1;
    }
    (cursor < range.end).then_some(cursor)
}

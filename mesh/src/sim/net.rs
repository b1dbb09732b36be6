//! The simulated network: a time-ordered event queue, the links between peers, the partition.
//!
//! Events with equal times run in the order they were queued (a sequence number breaks ties),
//! so a run is a pure function of its seed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::peer::ConnId;
use crate::wire::Message;

/// Something that happens at a virtual time.
pub(super) enum Ev {
    /// A router's `poll_timeout` is due.
    Timer { node: usize },
    /// A message arrives on a connection.
    Deliver {
        to: usize,
        conn: ConnId,
        message: Arc<Message>,
    },
    /// The transport reports a connection as gone.
    Disconnected {
        to: usize,
        conn: ConnId,
        reason: String,
    },
    /// A dial completes (or fails) now.
    Dialed { from: usize, addr: SocketAddr },
    /// The idle timeout of a link across a partition ran out: break it if still cut.
    CheckLink { a: usize, conn: ConnId },
    /// A crashed peer starts again.
    Boot { node: usize },
    /// Time to decide on random faults.
    Tick,
}

#[derive(Default)]
pub(super) struct Net {
    queue: BTreeMap<(Instant, u64), Ev>,
    seq: u64,
    /// (node, conn) -> (far node, far conn), both directions.
    links: BTreeMap<(usize, ConnId), (usize, ConnId)>,
    next_conn: u64,
    /// Side of each peer while a partition is active.
    pub(super) partition: Option<Vec<bool>>,
    /// Random faults keep ticking.
    pub(super) ticking: bool,
    /// A message over the size bound was sent (reported after the step).
    pub(super) oversized: Option<String>,
}

impl Net {
    pub(super) fn push(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn pop(&mut self) -> Option<(Instant, Ev)> {
        self.queue.pop_first().map(|((at, _), ev)| (at, ev))
    }

    pub(super) fn next_at(&self) -> Option<Instant> {
        self.queue.first_key_value().map(|(&(at, _), _)| at)
    }

    /// Drops every queued delivery (used after a warm start).
    pub(super) fn clear_messages(&mut self) {
        self.queue.retain(|_, ev| !matches!(ev, Ev::Deliver { .. }));
    }

    pub(super) fn can_reach(&self, a: usize, b: usize) -> bool {
        match &self.partition {
            None => true,
            Some(side) => side.get(a) == side.get(b),
        }
    }

    pub(super) fn link(&mut self, a: usize, b: usize) -> (ConnId, ConnId) {
        let (ca, cb) = (ConnId(self.next_conn), ConnId(self.next_conn + 1));
        self.next_conn += 2;
        self.links.insert((a, ca), (b, cb));
        self.links.insert((b, cb), (a, ca));
        (ca, cb)
    }

    pub(super) fn linked(&self, a: usize, conn: ConnId) -> bool {
        self.links.contains_key(&(a, conn))
    }

    pub(super) fn far(&self, a: usize, conn: ConnId) -> Option<(usize, ConnId)> {
        self.links.get(&(a, conn)).copied()
    }

    /// Removes the link (both directions); returns the far end.
    pub(super) fn unlink(&mut self, a: usize, conn: ConnId) -> Option<(usize, ConnId)> {
        let far = self.links.remove(&(a, conn))?;
        self.links.remove(&far);
        Some(far)
    }

    /// Removes every link of `a`; returns the far ends.
    pub(super) fn unlink_all(&mut self, a: usize) -> Vec<(usize, ConnId)> {
        let mine: Vec<ConnId> = self
            .links
            .range((a, ConnId(0))..=(a, ConnId(u64::MAX)))
            .map(|(&(_, c), _)| c)
            .collect();
        mine.into_iter().filter_map(|c| self.unlink(a, c)).collect()
    }

    /// One end of every link.
    pub(super) fn links(&self) -> Vec<(usize, ConnId)> {
        self.links
            .iter()
            .filter(|(&(a, _), &(b, _))| a < b)
            .map(|(&k, _)| k)
            .collect()
    }
}

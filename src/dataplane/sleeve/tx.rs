//! The sending thread: frames from the TAP to sealed datagrams.
//!
//! A TCP super-frame to a peer that supports offloads becomes one segment datagram per
//! `gso_size` bytes of payload (each with a copy of the headers; see `frame.rs`), all of one size
//! but the last, so one GSO `sendmsg` carries them. To other peers, and for broadcasts, it becomes
//! finished TCP frames, packed like any small frame. Small frames with a partial checksum get it
//! finished here. Frames for the same destination read in one burst share datagrams.
//!
//! Peers on the kernel VXLAN fast path (`ForwardingTable::vxlan`) get nothing unicast from here:
//! the bridge reaches them through its VXLAN port, so their MACs are never in the table below and
//! a frame for one is flooded like an unknown destination. Our own broadcasts still go to them,
//! flagged [`FLAG_RELAY_ONLY`]: the kernel already delivered them, they only relay them on to
//! their subtree.
//!
//! Invariants: frames leave in the order the TAP gave them (pending packed frames go out before
//! the segments of a later super-frame); no allocation per frame in steady state; `macs` never
//! maps to a peer on VXLAN in the current snapshot.

use std::collections::HashMap;
use std::io;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use mesh::PeerName;

use super::frame::{self, BodyHeader, SegmentMeta, FLAG_RELAY_ONLY, FLAG_SEGMENT};
use super::icmp;
use super::offload::{self, Layout, VnetHdr, FRAME_MAX, F_NEEDS_CSUM, VNET_HDR_LEN};
use super::{bump, Dest, Sender, Shared, Snapshot, TxSession, HOP_LIMIT, IDLE, IDLE_POLL, TX};

/// Frames read from the TAP in one burst are packed into one datagram while its body stays under
/// this many bytes (a first frame always goes, whatever its size).
const BATCH_BODY_MAX: usize = 1400;

/// Plaintext body being filled with frames, all for one destination.
#[derive(Default)]
struct Batch {
    dest: Option<Dest>,
    body: Vec<u8>,
    frames: u8,
    /// Bytes of the frames in `body`, without their prefixes.
    frame_bytes: u64,
}

struct Tx {
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    /// Learned MACs: the peer behind each, and the session to that peer's next hop (resolved
    /// once per snapshot, so a frame costs no route lookup to check its size).
    macs: HashMap<[u8; 6], (PeerName, Option<Arc<TxSession>>)>,
    batch: Batch,
    sender: Sender,
    /// Scratch for one finished TCP segment.
    segment: Vec<u8>,
    /// Numbers the super-frames we cut, so the receiver can tell them apart.
    next_group: u32,
}

/// Runs until the stop flag is set (then `Ok`) or the TAP fails.
pub(super) fn run(shared: &Arc<Shared>, macs: Receiver<([u8; 6], PeerName)>) -> anyhow::Result<()> {
    let mut tx = Tx {
        shared: shared.clone(),
        snapshot: shared.snapshot.load_full(),
        macs: HashMap::new(),
        batch: Batch::default(),
        sender: Sender::new(shared.clone()),
        segment: Vec::with_capacity(FRAME_MAX),
        next_group: 0,
    };
    let mut buf = vec![0u8; VNET_HDR_LEN + FRAME_MAX];
    shared.adopted(TX, tx.snapshot.generation);
    while !shared.stop.load(std::sync::atomic::Ordering::Relaxed) {
        tx.refresh(&macs);
        match shared.tap.read(&mut buf) {
            Ok(len) => tx.handle_tap_frame(&mut buf[..len]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tx.flush_batch();
                tx.sender.flush();
                shared.adopted(TX, IDLE);
                let waited = shared.tap.wait(IDLE_POLL);
                shared.adopted(TX, tx.snapshot.generation);
                waited?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(anyhow::Error::new(e).context("read frame from tap")),
        }
    }
    Ok(())
}

impl Tx {
    /// Picks up a new snapshot and newly learned MACs.
    fn refresh(&mut self, macs: &Receiver<([u8; 6], PeerName)>) {
        let current = self.shared.snapshot.load();
        if !Arc::ptr_eq(&current, &self.snapshot) {
            self.flush_batch();
            self.snapshot = current.clone();
            let table = &self.snapshot.table;
            // A MAC still mapped to a peer that moved to VXLAN would send a frame the bridge
            // flooded to the VXLAN port a second time, over the sleeve.
            self.macs.retain(|_, (owner, _)| {
                table.unicast.contains_key(owner) && !table.vxlan.contains_key(owner)
            });
            let snapshot = &self.snapshot;
            for (owner, via) in self.macs.values_mut() {
                *via = hop_session(snapshot, *owner);
            }
            self.shared.adopted(TX, snapshot.generation);
        }
        while let Ok((mac, owner)) = macs.try_recv() {
            if !self.snapshot.table.vxlan.contains_key(&owner) {
                let via = hop_session(&self.snapshot, owner);
                self.macs.insert(mac, (owner, via));
            }
        }
    }

    // HOT PATH
    fn handle_tap_frame(&mut self, raw: &mut [u8]) {
        let Some(vnet) = VnetHdr::parse(raw) else {
            return bump(&self.shared.counters.drop_bad_tap_frame, 1);
        };
        let frame = &mut raw[VNET_HDR_LEN..];
        let Some(dst_mac) = frame
            .first_chunk::<6>()
            .filter(|_| frame.len() >= frame::ETHERNET_HEADER_LEN)
        else {
            tracing::debug!(
                len = frame.len(),
                "tap gave a frame shorter than an ethernet header"
            );
            return bump(&self.shared.counters.drop_bad_tap_frame, 1);
        };
        // `limit`: the largest frame the path to the next hop carries (0: no limit known).
        let (dest, limit) = match self.macs.get(dst_mac) {
            Some((owner, via)) if dst_mac[0] & 1 == 0 => (
                Dest::Peer(*owner),
                via.as_ref().map_or(0, |s| s.params.traffic.max_frame()),
            ),
            _ => (Dest::Broadcast, 0),
        };
        if vnet.is_gso() {
            return self.handle_super_frame(&vnet, frame, dest, limit);
        }
        if limit > 0 && frame.len() > limit {
            return self.too_big(frame, limit);
        }
        if vnet.flags & F_NEEDS_CSUM != 0
            && offload::finish_checksum(frame, vnet.csum_start, vnet.csum_offset).is_err()
        {
            tracing::debug!("tap gave a frame whose checksum offsets don't fit");
            return bump(&self.shared.counters.drop_bad_tap_frame, 1);
        }
        self.push_frame(dest, frame);
    }

    /// Sends a TCP super-frame: as segments to a peer that joins them, else as finished frames.
    // HOT PATH
    fn handle_super_frame(&mut self, vnet: &VnetHdr, frame: &[u8], dest: Dest, limit: usize) {
        let layout = match Layout::parse(vnet.gso_type, vnet.csum_start, frame) {
            Ok(l) if vnet.gso_size > 0 && vnet.csum_offset == 16 => l,
            _ => {
                tracing::debug!(?vnet, "tap gave a super-frame we can't cut");
                return bump(&self.shared.counters.drop_bad_tap_frame, 1);
            }
        };
        let gso_size = usize::from(vnet.gso_size);
        if limit > 0 && layout.hdr_len + gso_size > limit {
            return self.too_big(frame, limit);
        }
        let (headers, payload) = frame.split_at(layout.hdr_len);
        let count = payload.len().div_ceil(gso_size).max(1);
        let hop = match dest {
            Dest::Peer(peer) => self.snapshot.table.unicast.get(&peer).copied(),
            Dest::Broadcast => None,
        };
        let session = hop.and_then(|h| self.snapshot.sessions.get(&h).cloned());
        if let (Dest::Peer(peer), Some(session)) = (dest, session) {
            if session.params.offload {
                self.flush_batch();
                let group = self.next_group;
                self.next_group = self.next_group.wrapping_add(1);
                let mut head = Vec::with_capacity(frame::BODY_HEADER_LEN + frame::SEGMENT_META_LEN);
                BodyHeader {
                    src: self.snapshot.table.me,
                    dst: Some(peer),
                    hop_limit: HOP_LIMIT,
                    frame_count: 0,
                }
                .emit(&mut head);
                let mut meta = SegmentMeta {
                    gso_type: vnet.gso_type,
                    hdr_len: layout.hdr_len as u16,
                    gso_size: vnet.gso_size,
                    csum_start: vnet.csum_start,
                    csum_offset: vnet.csum_offset,
                    group,
                    index: 0,
                    count: count as u16,
                };
                let head_len = head.len();
                let sealed = self.snapshot.table.sealed;
                for (i, chunk) in payload.chunks(gso_size).enumerate() {
                    head.truncate(head_len);
                    meta.index = i as u16;
                    meta.emit(&mut head);
                    self.sender
                        .queue(&session, sealed, FLAG_SEGMENT, &[&head, headers, chunk], 1);
                }
                if let Some(traffic) = self.snapshot.table.peer_traffic.get(&peer) {
                    let bytes = headers.len() * count + payload.len();
                    traffic.sent_many(count as u64, bytes as u64);
                }
                return;
            }
        }
        // Finished segments, packed like any other frame.
        for (i, chunk) in payload.chunks(gso_size).enumerate() {
            self.segment.clear();
            self.segment.extend_from_slice(headers);
            self.segment.extend_from_slice(chunk);
            let (first, last) = (i == 0, i + 1 == count);
            let mut segment = std::mem::take(&mut self.segment);
            let fixed = offload::fix_segment(
                &mut segment,
                &layout,
                i * gso_size,
                i as u16,
                first,
                last,
                true,
            );
            match fixed {
                Ok(()) => self.push_frame(dest, &segment),
                Err(_) => bump(&self.shared.counters.drop_bad_tap_frame, 1),
            }
            self.segment = segment;
        }
    }

    /// Drops a frame too big for the path to its next hop (its datagrams would carry more than
    /// `limit` bytes of frame each), counts it, and tells its sender the MTU that fits.
    fn too_big(&mut self, frame: &[u8], limit: usize) {
        bump(&self.shared.counters.drop_too_big, 1);
        let mtu = limit.saturating_sub(frame::ETHERNET_HEADER_LEN);
        if let Some(answer) = icmp::too_big(frame, mtu) {
            let plain = [0u8; VNET_HDR_LEN];
            if let Err(e) = self
                .shared
                .tap
                .write(&[io::IoSlice::new(&plain), io::IoSlice::new(&answer)])
            {
                tracing::debug!(error = %e, "write ICMP too-big to tap");
            }
        }
    }

    /// Adds a finished frame to the packed batch for `dest`.
    // HOT PATH
    fn push_frame(&mut self, dest: Dest, frame: &[u8]) {
        let batch = &self.batch;
        let fits = batch.body.len() + frame::FRAME_PREFIX_LEN + frame.len() <= BATCH_BODY_MAX;
        if batch.dest != Some(dest) || !fits || batch.frames == u8::MAX {
            self.flush_batch();
        }
        let batch = &mut self.batch;
        if batch.dest.is_none() {
            batch.dest = Some(dest);
            batch.body.clear();
            batch.frames = 0;
            batch.frame_bytes = 0;
            let dst = match dest {
                Dest::Broadcast => None,
                Dest::Peer(p) => Some(p),
            };
            BodyHeader {
                src: self.snapshot.table.me,
                dst,
                hop_limit: HOP_LIMIT,
                frame_count: 0,
            }
            .emit(&mut batch.body);
        }
        frame::push_frame(&mut batch.body, frame);
        batch.frames += 1;
        batch.frame_bytes += frame.len() as u64;
    }

    /// Queues the packed batch (if any) for its next hops and empties it.
    fn flush_batch(&mut self) {
        let Some(dest) = self.batch.dest.take() else {
            return;
        };
        let batch = &mut self.batch;
        batch.body[frame::FRAME_COUNT_OFFSET] = batch.frames;
        let frames = u64::from(batch.frames);
        let table = &self.snapshot.table;
        let sealed = table.sealed;
        let send = |hop: PeerName, flags: u8, sender: &mut Sender| match self
            .snapshot
            .sessions
            .get(&hop)
        {
            Some(session) => sender.queue(session, sealed, flags, &[&batch.body], frames),
            None => {
                tracing::debug!(%hop, "no session to next hop; dropping frames");
                bump(&self.shared.counters.drop_no_route, frames);
            }
        };
        match dest {
            Dest::Broadcast => {
                for child in table.broadcast.get(&table.me).into_iter().flatten() {
                    // The bridge also flooded these frames to the VXLAN port, which delivered
                    // them to the peers on VXLAN; they still relay them to their subtrees.
                    let flags = if table.vxlan.contains_key(child) {
                        FLAG_RELAY_ONLY
                    } else {
                        0
                    };
                    send(*child, flags, &mut self.sender);
                }
            }
            Dest::Peer(peer) => match table.unicast.get(&peer).copied() {
                Some(hop) => {
                    send(hop, 0, &mut self.sender);
                    if let Some(traffic) = table.peer_traffic.get(&peer) {
                        traffic.sent_many(frames, batch.frame_bytes);
                    }
                }
                None => {
                    tracing::debug!(%peer, "no route to peer; dropping frames");
                    bump(&self.shared.counters.drop_no_route, frames);
                }
            },
        }
    }
}

/// The sending half of the session to `peer`'s next hop in `snapshot`, if there is one.
fn hop_session(snapshot: &Snapshot, peer: PeerName) -> Option<Arc<TxSession>> {
    let hop = snapshot.table.unicast.get(&peer)?;
    snapshot.sessions.get(hop).cloned()
}

//! The receiving thread: sealed datagrams to frames in the TAP, and relaying.
//!
//! It owns the opening half of every session (key and replay window) and the MAC table. Each
//! received batch (GRO or `recvmmsg`, see `udp.rs`) is split into datagrams; each is
//! authenticated, then its frames are written into the TAP, or its segment joins the super-frame
//! being rebuilt ([`Joiner`]), and what is addressed to others is relayed along the routes.
//!
//! A body flagged [`FLAG_RELAY_ONLY`] comes from a neighbour that reaches us over kernel VXLAN
//! too: the kernel already delivered its frames, so they are only relayed along the source's
//! broadcast tree, never written into the TAP, and teach no MACs. MACs of peers on VXLAN are not
//! learned at all (nor kept when a peer moves there): `tx` never unicasts to them.
//!
//! Nor is any frame from a peer on VXLAN written into the TAP, flagged or not. Each end moves to
//! VXLAN when its own probes say so, up to a second apart, and until the peer has moved too it
//! still sends us frames over the sleeve (its containers' replies, its broadcasts). Written into
//! the TAP they would teach the bridge that the peer's containers sit behind the TAP, where `tx`
//! sends nothing to a VXLAN peer: frames for them would vanish until the entry aged out (300 s)
//! or they happened to send something over VXLAN, which a container that only answers never
//! does. Dropped here (`drops.from_vxlan_peer`), the frame is lost, like any frame in flight
//! across a switch, and the bridge learns the peer's MACs on the VXLAN port.
//!
//! Invariants: the replay window moves only after a datagram opened; a partly rebuilt
//! super-frame is written before any later frame and before the thread sleeps, so nothing waits
//! for a segment that was lost.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::mpsc::Sender as MacSender;
use std::sync::Arc;

use mesh::PeerName;

use super::crypto::RecvKeys;
use super::frame::{
    self, BodyHeader, FrameError, Header, Kind, SegmentMeta, FLAG_RELAY_ONLY, FLAG_SEGMENT,
    HEADER_LEN,
};
use super::offload::{self, Layout, VnetHdr, FRAME_MAX, F_NEEDS_CSUM, GSO_NONE, VNET_HDR_LEN};
use super::replay::ReplayWindow;
use super::{bump, same_keys, Sender, Shared, Snapshot, IDLE, IDLE_POLL, MACS_MAX, RX};
use crate::dataplane::forwarding::{SessionDrop, SessionParams};

/// The receiving half of a session.
struct RxSession {
    params: Arc<SessionParams>,
    opening: RecvKeys,
    replay: ReplayWindow,
}

struct Rx {
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    /// Sessions by the index senders put in `receiver_index`.
    sessions: HashMap<u32, RxSession>,
    macs: HashMap<[u8; 6], PeerName>,
    mac_updates: MacSender<([u8; 6], PeerName)>,
    joiner: Joiner,
    sender: Sender,
    /// Scratch for a relayed segment turned into a finished frame.
    scratch: Vec<u8>,
}

/// Runs until the stop flag is set (then `Ok`) or the socket fails.
pub(super) fn run(
    shared: &Arc<Shared>,
    mac_updates: MacSender<([u8; 6], PeerName)>,
) -> anyhow::Result<()> {
    let mut rx = Rx {
        shared: shared.clone(),
        snapshot: shared.snapshot.load_full(),
        sessions: HashMap::new(),
        macs: HashMap::new(),
        mac_updates,
        joiner: Joiner::default(),
        sender: Sender::new(shared.clone()),
        scratch: Vec::with_capacity(FRAME_MAX),
    };
    rx.adopt_sessions();
    shared.adopted(RX, rx.snapshot.generation);
    let mut batch = shared.udp.recv_buf();
    while !shared.stop.load(std::sync::atomic::Ordering::Relaxed) {
        rx.refresh();
        match shared.udp.recv(&mut batch) {
            Ok(()) => {
                for (datagram, from) in batch.datagrams() {
                    rx.handle_datagram(datagram, from);
                }
                rx.sender.flush();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                rx.joiner.flush(&rx.shared);
                shared.adopted(RX, IDLE);
                let waited = shared.udp.wait(IDLE_POLL);
                shared.adopted(RX, rx.snapshot.generation);
                waited?;
            }
            // ICMP errors reported by the kernel for earlier sends; not fatal.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) =>
            {
                tracing::debug!(error = %e, "sleeve socket reported an error");
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context("receive datagrams on sleeve socket"))
            }
        }
    }
    Ok(())
}

impl Rx {
    fn refresh(&mut self) {
        let current = self.shared.snapshot.load();
        if !Arc::ptr_eq(&current, &self.snapshot) {
            // A super-frame joined under the old table goes out under it too.
            self.joiner.flush(&self.shared);
            self.snapshot = current.clone();
            self.adopt_sessions();
            self.shared.adopted(RX, self.snapshot.generation);
        }
    }

    /// Sessions with unchanged index and keys keep their replay windows, changed ones start
    /// over, vanished ones are dropped.
    fn adopt_sessions(&mut self) {
        let mut old = std::mem::take(&mut self.sessions);
        for params in self.snapshot.table.sessions.values() {
            let session = match old.remove(&params.local_index) {
                Some(mut s) if same_keys(&s.params, params) => {
                    s.params = params.clone();
                    s
                }
                _ => RxSession {
                    opening: RecvKeys::new(params.cipher, &params.recv_key, params.epoch_shift),
                    replay: ReplayWindow::new(),
                    params: params.clone(),
                },
            };
            self.sessions.insert(params.local_index, session);
        }
        // A peer on VXLAN is reached through the bridge's own learning (`tx` forgets them too).
        let table = &self.snapshot.table;
        self.macs.retain(|_, owner| {
            table.unicast.contains_key(owner) && !table.vxlan.contains_key(owner)
        });
    }

    /// Authenticates, checks and delivers or relays one datagram. Never fails: every problem is
    /// a counted drop.
    // HOT PATH
    fn handle_datagram(&mut self, buf: &mut [u8], from: SocketAddr) {
        let counters = &self.shared.counters;
        bump(&counters.rx_datagrams, 1);
        bump(&counters.rx_bytes, buf.len() as u64);
        let (header, _) = match Header::parse(buf) {
            Ok(parsed) => parsed,
            Err(e) => return self.drop_bad_frame(e, from),
        };
        let Some(session) = self.sessions.get_mut(&header.receiver_index) else {
            tracing::debug!(%from, index = header.receiver_index, "datagram for unknown session");
            return bump(&counters.drop_unknown_session, 1);
        };
        let peer = session.params.peer;
        let (head, rest) = buf.split_at_mut(HEADER_LEN);
        let head: &[u8; HEADER_LEN] = (&*head).try_into().expect("split at HEADER_LEN");
        let body_len = match header.kind {
            Kind::Plain if self.snapshot.table.sealed => {
                tracing::debug!(%from, %peer, "plain datagram while sealed");
                session.params.traffic.dropped(SessionDrop::PlainWhenSealed);
                return bump(&counters.drop_plain_when_sealed, 1);
            }
            Kind::Plain => rest.len(),
            Kind::Sealed => {
                if !session.replay.would_accept(header.counter) {
                    tracing::debug!(%from, %peer, counter = header.counter, "replayed datagram");
                    session.params.traffic.dropped(SessionDrop::Replayed);
                    return bump(&counters.drop_replayed, 1);
                }
                let len = match session.opening.open(head, header.counter, rest) {
                    Ok(plain) => plain.len(),
                    Err(e) => {
                        tracing::debug!(%from, %peer, error = %e, "dropping datagram");
                        session.params.traffic.dropped(SessionDrop::AuthFailed);
                        return bump(&counters.drop_auth_failed, 1);
                    }
                };
                if !session.replay.accept(header.counter) {
                    tracing::debug!(%from, %peer, counter = header.counter, "replayed datagram");
                    session.params.traffic.dropped(SessionDrop::Replayed);
                    return bump(&counters.drop_replayed, 1);
                }
                len
            }
        };
        session.params.traffic.received(HEADER_LEN + rest.len());
        let body = &mut rest[..body_len];
        if header.flags & FLAG_SEGMENT != 0 {
            self.handle_segment(body, peer, from);
        } else {
            let relay_only = header.flags & FLAG_RELAY_ONLY != 0;
            self.handle_body(body, peer, from, relay_only);
        }
    }

    /// Delivers and relays an authenticated body of packed frames from neighbour `via`. A
    /// `relay_only` body reached us over VXLAN already: it is relayed, not delivered, and teaches
    /// no MACs.
    // HOT PATH
    fn handle_body(&mut self, body: &mut [u8], via: PeerName, from: SocketAddr, relay_only: bool) {
        let (head, frames) = match BodyHeader::parse(body) {
            Ok(parsed) => parsed,
            Err(e) => return self.drop_bad_frame(e, from),
        };
        let me = self.snapshot.table.me;
        if head.src == me {
            tracing::debug!(%from, "our own frames came back; dropping");
            return bump(&self.shared.counters.drop_malformed, 1);
        }
        let frame_count = u64::from(head.frame_count);
        bump(&self.shared.counters.rx_frames, frame_count);
        if !relay_only {
            for frame in frames.clone() {
                let src_mac: [u8; 6] = frame[6..12]
                    .try_into()
                    .expect("frames hold an ethernet header");
                self.learn(src_mac, head.src);
            }
        }
        let for_us = !relay_only && (head.dst.is_none() || head.dst == Some(me));
        if for_us && self.snapshot.table.vxlan.contains_key(&head.src) {
            bump(&self.shared.counters.drop_from_vxlan_peer, frame_count);
        } else if for_us {
            // Frames must not overtake a super-frame that is still being joined.
            self.joiner.flush(&self.shared);
            let plain = [0u8; VNET_HDR_LEN];
            let mut delivered = 0;
            for frame in frames {
                delivered += frame.len() as u64;
                if let Err(e) = self
                    .shared
                    .tap
                    .write(&[IoSlice::new(&plain), IoSlice::new(frame)])
                {
                    tracing::debug!(error = %e, "write frame to tap");
                    bump(&self.shared.counters.drop_tap_write, 1);
                }
            }
            if let Some(traffic) = self.snapshot.table.peer_traffic.get(&head.src) {
                traffic.received_many(frame_count, delivered);
            }
        }
        if head.dst == Some(me) {
            return;
        }
        if head.hop_limit == 0 {
            tracing::debug!(%from, src = %head.src, "hop limit reached; not relaying");
            return bump(&self.shared.counters.drop_hop_limit, 1);
        }
        body[frame::HOP_LIMIT_OFFSET] = head.hop_limit - 1;
        let snapshot = self.snapshot.clone();
        let table = &snapshot.table;
        match head.dst {
            None => {
                for child in table.broadcast.get(&head.src).into_iter().flatten() {
                    if *child != via {
                        self.send_to_neighbour(&snapshot, *child, 0, body, frame_count);
                    }
                }
            }
            Some(dst) => match table.unicast.get(&dst) {
                Some(hop) => {
                    bump(&self.shared.counters.relayed_frames, frame_count);
                    self.send_to_neighbour(&snapshot, *hop, 0, body, frame_count);
                }
                None => {
                    tracing::debug!(%dst, "no route to relay to");
                    bump(&self.shared.counters.drop_no_route, frame_count);
                }
            },
        }
    }

    /// Delivers or relays one authenticated segment of a super-frame from neighbour `via`.
    // HOT PATH
    fn handle_segment(&mut self, body: &mut [u8], _via: PeerName, from: SocketAddr) {
        let (head, rest) = match BodyHeader::parse_head(body) {
            Ok(parsed) => parsed,
            Err(e) => return self.drop_bad_frame(e, from),
        };
        let (meta, chunk) = match SegmentMeta::parse(rest) {
            Ok(parsed) => parsed,
            Err(e) => return self.drop_bad_frame(e, from),
        };
        let me = self.snapshot.table.me;
        let Some(dst) = head.dst.filter(|_| head.src != me) else {
            tracing::debug!(%from, "segment of our own or without a destination; dropping");
            return bump(&self.shared.counters.drop_malformed, 1);
        };
        bump(&self.shared.counters.rx_frames, 1);
        let src_mac: [u8; 6] = chunk[6..12]
            .try_into()
            .expect("segments hold an ethernet header");
        self.learn(src_mac, head.src);
        if dst == me {
            if self.snapshot.table.vxlan.contains_key(&head.src) {
                return bump(&self.shared.counters.drop_from_vxlan_peer, 1);
            }
            if let Some(traffic) = self.snapshot.table.peer_traffic.get(&head.src) {
                traffic.received_many(1, chunk.len() as u64);
            }
            if let Err(e) = self.joiner.push(&self.shared, head.src, &meta, chunk) {
                self.drop_bad_frame(e, from);
            }
            return;
        }
        if head.hop_limit == 0 {
            tracing::debug!(%from, src = %head.src, "hop limit reached; not relaying");
            return bump(&self.shared.counters.drop_hop_limit, 1);
        }
        let snapshot = self.snapshot.clone();
        let Some(hop) = snapshot.table.unicast.get(&dst).copied() else {
            tracing::debug!(%dst, "no route to relay to");
            return bump(&self.shared.counters.drop_no_route, 1);
        };
        bump(&self.shared.counters.relayed_frames, 1);
        let offload = snapshot
            .sessions
            .get(&hop)
            .is_some_and(|s| s.params.offload);
        if offload {
            body[frame::HOP_LIMIT_OFFSET] = head.hop_limit - 1;
            return self.send_to_neighbour(&snapshot, hop, FLAG_SEGMENT, body, 1);
        }
        // The next hop can't join segments: relay this one as a finished TCP frame.
        let Ok(layout) = Layout::parse(meta.gso_type, meta.csum_start, chunk) else {
            return self.drop_bad_frame(FrameError::BadSegment, from);
        };
        let mut relayed = std::mem::take(&mut self.scratch);
        relayed.clear();
        BodyHeader {
            src: head.src,
            dst: head.dst,
            hop_limit: head.hop_limit - 1,
            frame_count: 1,
        }
        .emit(&mut relayed);
        let start = relayed.len() + frame::FRAME_PREFIX_LEN;
        frame::push_frame(&mut relayed, chunk);
        let offset = usize::from(meta.index) * usize::from(meta.gso_size);
        let last = meta.index + 1 == meta.count;
        match offload::fix_segment(
            &mut relayed[start..],
            &layout,
            offset,
            meta.index,
            meta.index == 0,
            last,
            true,
        ) {
            Ok(()) => self.send_to_neighbour(&snapshot, hop, 0, &relayed, 1),
            Err(_) => self.drop_bad_frame(FrameError::BadSegment, from),
        }
        self.scratch = relayed;
    }

    fn send_to_neighbour(
        &mut self,
        snapshot: &Snapshot,
        hop: PeerName,
        flags: u8,
        body: &[u8],
        frames: u64,
    ) {
        match snapshot.sessions.get(&hop) {
            Some(session) => {
                self.sender
                    .queue(session, snapshot.table.sealed, flags, &[body], frames)
            }
            None => {
                tracing::debug!(%hop, "no session to next hop; dropping frames");
                bump(&self.shared.counters.drop_no_route, frames);
            }
        }
    }

    fn learn(&mut self, mac: [u8; 6], owner: PeerName) {
        // Group addresses are never a frame's source; don't let one steer unicast. Peers on
        // VXLAN are never unicast to over the sleeve (`tx` would drop the update anyway, and a
        // MAC kept here would not be sent again once the peer returns to the sleeve).
        if mac[0] & 1 != 0
            || self.macs.get(&mac) == Some(&owner)
            || self.snapshot.table.vxlan.contains_key(&owner)
        {
            return;
        }
        if self.macs.len() < MACS_MAX || self.macs.contains_key(&mac) {
            self.macs.insert(mac, owner);
            // The sending thread only stops at shutdown.
            let _ = self.mac_updates.send((mac, owner));
        }
    }

    fn drop_bad_frame(&self, e: FrameError, from: SocketAddr) {
        tracing::debug!(%from, error = %e, "dropping datagram");
        match e {
            FrameError::Truncated => bump(&self.shared.counters.drop_truncated, 1),
            _ => bump(&self.shared.counters.drop_malformed, 1),
        }
    }
}

/// Rebuilds super-frames from consecutive segments of one group and writes them into the TAP.
#[derive(Default)]
struct Joiner {
    /// Virtio-net header space, then the frame being rebuilt.
    buf: Vec<u8>,
    /// Source peer and group of the run being joined.
    key: Option<(PeerName, u32)>,
    meta: Option<SegmentMeta>,
    layout: Option<Layout>,
    first: u16,
    next: u16,
}

impl Joiner {
    /// Adds a segment addressed to us; writes the run out when it is complete or broken.
    // HOT PATH
    fn push(
        &mut self,
        shared: &Shared,
        src: PeerName,
        meta: &SegmentMeta,
        chunk: &[u8],
    ) -> Result<(), FrameError> {
        let payload = &chunk[usize::from(meta.hdr_len)..];
        let continues = self.key == Some((src, meta.group))
            && meta.index == self.next
            && self.buf.len() + payload.len() <= VNET_HDR_LEN + FRAME_MAX;
        if continues {
            self.buf.extend_from_slice(payload);
            self.next += 1;
        } else {
            self.flush(shared);
            let layout = Layout::parse(meta.gso_type, meta.csum_start, chunk)
                .map_err(|_| FrameError::BadSegment)?;
            if layout.hdr_len != usize::from(meta.hdr_len) || meta.csum_offset != 16 {
                return Err(FrameError::BadSegment);
            }
            self.buf.clear();
            self.buf.extend_from_slice(&[0u8; VNET_HDR_LEN]);
            self.buf.extend_from_slice(chunk);
            self.key = Some((src, meta.group));
            self.meta = Some(*meta);
            self.layout = Some(layout);
            self.first = meta.index;
            self.next = meta.index + 1;
        }
        if self.next == meta.count {
            self.flush(shared);
        }
        Ok(())
    }

    /// Writes the run (if any) into the TAP as one super-frame with fixed headers.
    fn flush(&mut self, shared: &Shared) {
        let (Some(_), Some(meta), Some(layout)) = (self.key.take(), self.meta, self.layout) else {
            return;
        };
        let chunks = self.next - self.first;
        let offset = usize::from(self.first) * usize::from(meta.gso_size);
        let last = self.next == meta.count;
        let (vnet_buf, frame) = self.buf.split_at_mut(VNET_HDR_LEN);
        if offload::fix_segment(
            frame,
            &layout,
            offset,
            self.first,
            self.first == 0,
            last,
            false,
        )
        .is_err()
        {
            return bump(&shared.counters.drop_malformed, 1);
        }
        let gso = chunks > 1;
        let vnet = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if gso { meta.gso_type } else { GSO_NONE },
            hdr_len: if gso { meta.hdr_len } else { 0 },
            gso_size: if gso { meta.gso_size } else { 0 },
            csum_start: meta.csum_start,
            csum_offset: meta.csum_offset,
        };
        vnet.emit(vnet_buf.try_into().expect("split at VNET_HDR_LEN"));
        if let Err(e) = shared.tap.write(&[IoSlice::new(&self.buf)]) {
            tracing::debug!(error = %e, "write super-frame to tap");
            bump(&shared.counters.drop_tap_write, 1);
        }
    }
}

//! Per-peer choice between the kernel VXLAN fast path and the sleeve, with fallback and return.
//!
//! Two pieces, both free of IO and clock reads (callers pass `now`):
//! - [`ProbeState`]: what the health probes over the VXLAN path to one peer have shown. Probes go
//!   every [`PROBE_INTERVAL`] in two sizes, full container MTU and small; the path is up while
//!   full-size probes are answered, lost when none was answered for [`LOSS_AFTER`], and comes back
//!   only after answers kept coming without a gap for [`RETURN_AFTER`] (a hold-down, so a
//!   flapping path does not flap the overlay).
//! - [`choose`]: the policy, a pure function of the facts about one peer.
//!
//! Not here: sending and answering probes (`vxlan.rs`, driven by `daemon/control.rs`), FDB
//! entries (`vxlan.rs`), and keeping the sleeve away from VXLAN peers (`sleeve/`).
//!
//! Invariants: only directly connected peers that are our children in our own broadcast tree
//! can be on VXLAN (the caller passes `direct`), which is what keeps broadcasts exactly-once in
//! a mixed mesh (see `ForwardingTable::vxlan`). Weave equivalent: `router/fastdp.go`'s
//! heartbeats and `overlay_switch.go`.

use std::time::{Duration, Instant};

/// How often probes go to each fast-path candidate.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// No full-size answer for this long: the path is lost (fallback well within 5 s).
pub const LOSS_AFTER: Duration = Duration::from_millis(2500);
/// After a loss, answers must keep coming without a gap this long before we return.
pub const RETURN_AFTER: Duration = Duration::from_secs(4);

/// What the probes say about the VXLAN path to one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathState {
    /// No answer yet, and not for long enough to call it lost.
    Pending,
    /// Full-size probes are answered.
    Up,
    /// Full-size probes are not answered since `since` (the last answer, or the first probe).
    Lost { since: Instant },
    /// Small probes are answered, full-size ones not: the path can't carry the container MTU.
    MtuTooSmall { since: Instant },
    /// The peer answers that it requires encryption with us (its `--trusted-subnets` differ).
    Declined,
}

/// Probe history of one peer.
#[derive(Clone, Debug)]
pub struct ProbeState {
    started: Instant,
    last_full: Option<Instant>,
    last_small: Option<Instant>,
    /// Start of the current run of full-size answers without a gap longer than `LOSS_AFTER`.
    streak_since: Option<Instant>,
    up: bool,
    /// Whether the path was ever up (the first answer brings it up at once).
    ever_up: bool,
    /// When the path was last declared lost.
    lost_since: Option<Instant>,
    /// When the peer last declined.
    declined: Option<Instant>,
    next_seq: u64,
}

impl ProbeState {
    /// A peer we start probing at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            last_full: None,
            last_small: None,
            streak_since: None,
            up: false,
            ever_up: false,
            lost_since: None,
            declined: None,
            next_seq: 1,
        }
    }

    /// The sequence number for the next probe.
    pub fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Whether `seq` is one we sent (answers to anything else are ignored).
    pub fn sent(&self, seq: u64) -> bool {
        seq > 0 && seq < self.next_seq
    }

    /// An answer to a probe arrived; `full` if it was a full-size one.
    pub fn on_answer(&mut self, now: Instant, full: bool) {
        if !full {
            self.last_small = Some(now);
            return;
        }
        let gap = self
            .last_full
            .is_none_or(|last| now.saturating_duration_since(last) > LOSS_AFTER);
        if gap || self.streak_since.is_none() {
            self.streak_since = Some(now);
        }
        self.last_full = Some(now);
        if !self.ever_up {
            self.ever_up = true;
            self.up = true;
            self.lost_since = None;
        }
    }

    /// The peer declined a probe: it requires encryption with us.
    pub fn on_declined(&mut self, now: Instant) {
        self.declined = Some(now);
        self.up = false;
        self.streak_since = None;
    }

    /// Updates up/lost from the time passed and returns the state.
    pub fn evaluate(&mut self, now: Instant) -> PathState {
        let recent =
            |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) <= LOSS_AFTER);
        if recent(self.declined) {
            return PathState::Declined;
        }
        if self.up && !recent(self.last_full) {
            self.up = false;
            self.streak_since = None;
            self.lost_since = Some(self.last_full.unwrap_or(self.started));
        }
        // The run of answers must itself span the hold-down (not just have begun that long ago).
        let streak = match (self.streak_since, self.last_full) {
            (Some(first), Some(last)) => last.saturating_duration_since(first),
            _ => Duration::ZERO,
        };
        if !self.up && recent(self.last_full) && streak >= RETURN_AFTER {
            self.up = true;
            self.lost_since = None;
        }
        if self.up {
            return PathState::Up;
        }
        let since = self
            .lost_since
            .unwrap_or_else(|| self.last_full.unwrap_or(self.started));
        if !self.ever_up && now.saturating_duration_since(self.started) < LOSS_AFTER {
            PathState::Pending
        } else if recent(self.last_small) && !recent(self.last_full) {
            PathState::MtuTooSmall { since }
        } else {
            // Also while answers are back but the hold-down is not over yet.
            PathState::Lost { since }
        }
    }
}

/// Everything the choice for one peer depends on.
#[derive(Clone, Copy, Debug)]
pub struct PeerFacts {
    /// `--no-fastpath` was not given.
    pub fastpath: bool,
    /// Traffic to this peer must be encrypted (a password, and not both ends in a trusted subnet).
    pub encryption_required: bool,
    /// We reach it directly (our own neighbour, and our child in our broadcast tree).
    pub direct: bool,
    /// It advertised VXLAN support with our VNI in its handshake.
    pub supports_vxlan: bool,
    /// Its VXLAN port differs from ours: (ours, its). The kernel sends unicast to MACs it learned
    /// to the remote address at *our* port, so such a pair would lose unicast frames.
    pub port_mismatch: Option<(u16, u16)>,
    /// What the probes say; `None` while not probing.
    pub path: Option<PathState>,
}

/// Why a peer is on the sleeve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SleeveReason {
    Disabled,
    EncryptionRequired,
    Relayed,
    Unsupported,
    PortMismatch { ours: u16, theirs: u16 },
    Probing,
    ProbeLost { since: Instant },
    PathMtu { since: Instant },
}

/// The overlay for one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Vxlan,
    Sleeve(SleeveReason),
}

/// The policy: VXLAN only when nothing speaks against it and the probes succeed.
pub fn choose(f: &PeerFacts) -> Choice {
    use SleeveReason::*;
    let reason = if !f.fastpath {
        Disabled
    } else if f.encryption_required {
        EncryptionRequired
    } else if !f.direct {
        Relayed
    } else if !f.supports_vxlan {
        Unsupported
    } else if let Some((ours, theirs)) = f.port_mismatch {
        PortMismatch { ours, theirs }
    } else {
        match f.path {
            Some(PathState::Up) => return Choice::Vxlan,
            None | Some(PathState::Pending) => Probing,
            Some(PathState::Lost { since }) => ProbeLost { since },
            Some(PathState::MtuTooSmall { since }) => PathMtu { since },
            Some(PathState::Declined) => EncryptionRequired,
        }
    };
    Choice::Sleeve(reason)
}

/// Whether probes should go to a peer with these facts (everything but the path allows VXLAN).
pub fn wants_probes(f: &PeerFacts) -> bool {
    f.fastpath
        && !f.encryption_required
        && f.direct
        && f.supports_vxlan
        && f.port_mismatch.is_none()
}

/// The status text for a choice: (`overlay`, `reason`). `clock` turns an instant into a time of
/// day for people; `mtu` is the container MTU the fast path must carry.
pub fn describe(choice: Choice, mtu: u32, clock: impl Fn(Instant) -> String) -> (String, String) {
    let reason = match choice {
        Choice::Vxlan => return ("vxlan".to_string(), String::new()),
        Choice::Sleeve(r) => match r {
            SleeveReason::Disabled => "fast path disabled".to_string(),
            SleeveReason::EncryptionRequired => "encryption required".to_string(),
            SleeveReason::Relayed => "relayed (not directly connected)".to_string(),
            SleeveReason::Unsupported => "peer does not support vxlan".to_string(),
            SleeveReason::PortMismatch { ours, theirs } => format!(
                "vxlan port differs (ours {ours}, the peer's {theirs}); give both routers the same --port"
            ),
            SleeveReason::Probing => "probing vxlan".to_string(),
            SleeveReason::ProbeLost { since } => {
                format!("vxlan probe lost since {}", clock(since))
            }
            SleeveReason::PathMtu { since } => format!(
                "vxlan path can't carry mtu {mtu} (+{} bytes) since {}",
                super::vxlan::OVERHEAD,
                clock(since)
            ),
        },
    };
    ("sleeve".to_string(), reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(path: Option<PathState>) -> PeerFacts {
        PeerFacts {
            fastpath: true,
            encryption_required: false,
            direct: true,
            supports_vxlan: true,
            port_mismatch: None,
            path,
        }
    }

    /// Drives a probe state with one round per second: `answered(second)` says whether the
    /// full-size probe of that second was answered. Returns the state after each second.
    fn drive(seconds: u64, answered: impl Fn(u64) -> bool) -> Vec<PathState> {
        let t0 = Instant::now();
        let mut p = ProbeState::new(t0);
        (0..seconds)
            .map(|s| {
                let now = t0 + Duration::from_secs(s);
                if answered(s) {
                    p.on_answer(now + Duration::from_millis(1), true);
                }
                p.evaluate(now + Duration::from_millis(2))
            })
            .collect()
    }

    #[test]
    fn first_answer_brings_the_path_up() {
        let states = drive(3, |_| true);
        assert_eq!(states[0], PathState::Up);
    }

    #[test]
    fn never_answered_is_pending_then_lost() {
        let states = drive(5, |_| false);
        assert_eq!(states[0], PathState::Pending);
        assert!(matches!(states[4], PathState::Lost { .. }), "{states:?}");
    }

    #[test]
    fn fallback_within_five_seconds_and_return_within_fifteen() {
        // Up for 10 s, broken 10..20, healed from 20.
        let states = drive(40, |s| !(10..20).contains(&s));
        let down = states.iter().position(|s| *s != PathState::Up).unwrap();
        assert!(down > 9 && down <= 9 + 5, "fell back at {down}: {states:?}");
        assert!(matches!(states[down], PathState::Lost { .. }));
        let back = (20..40)
            .find(|&s| states[s as usize] == PathState::Up)
            .unwrap();
        assert!(back - 20 < 15, "returned at {back}: {states:?}");
        assert!(back - 20 >= RETURN_AFTER.as_secs(), "no hold-down: {back}");
        assert!(states[back as usize..].iter().all(|s| *s == PathState::Up));
    }

    #[test]
    fn a_flapping_path_stays_on_sleeve() {
        // Answers every other 3 s: never a gap-free run long enough to return.
        let states = drive(40, |s| s < 5 || (s / 3) % 2 == 0);
        assert!(
            states[20..].iter().all(|s| *s != PathState::Up),
            "{states:?}"
        );
    }

    #[test]
    fn small_answers_without_full_ones_mean_mtu() {
        let t0 = Instant::now();
        let mut p = ProbeState::new(t0);
        p.on_answer(t0, true);
        for s in 1..6 {
            p.on_answer(t0 + Duration::from_secs(s), false);
        }
        assert!(matches!(
            p.evaluate(t0 + Duration::from_secs(5)),
            PathState::MtuTooSmall { .. }
        ));
    }

    #[test]
    fn policy_order_and_reasons() {
        assert_eq!(choose(&facts(Some(PathState::Up))), Choice::Vxlan);
        let mut f = facts(Some(PathState::Up));
        f.encryption_required = true;
        assert_eq!(choose(&f), Choice::Sleeve(SleeveReason::EncryptionRequired));
        assert!(!wants_probes(&f));
        f.fastpath = false;
        assert_eq!(choose(&f), Choice::Sleeve(SleeveReason::Disabled));
        let mut f = facts(Some(PathState::Up));
        f.direct = false;
        assert_eq!(choose(&f), Choice::Sleeve(SleeveReason::Relayed));
        let mut f = facts(Some(PathState::Up));
        f.supports_vxlan = false;
        assert_eq!(choose(&f), Choice::Sleeve(SleeveReason::Unsupported));
        f.supports_vxlan = true;
        f.port_mismatch = Some((6785, 7785));
        let c = choose(&f);
        assert!(!wants_probes(&f), "no probes where unicast would be lost");
        let (overlay, reason) = describe(c, 1376, |_| String::new());
        assert_eq!(overlay, "sleeve");
        assert!(reason.contains("ours 6785, the peer's 7785"), "{reason}");
        assert_eq!(choose(&facts(None)), Choice::Sleeve(SleeveReason::Probing));
        let since = Instant::now();
        let c = choose(&facts(Some(PathState::Lost { since })));
        let (o, r) = describe(c, 1376, |_| "12:03:04".into());
        assert_eq!(
            (o.as_str(), r.as_str()),
            ("sleeve", "vxlan probe lost since 12:03:04")
        );
        let (o, r) = describe(Choice::Vxlan, 1376, |_| String::new());
        assert_eq!((o.as_str(), r.as_str()), ("vxlan", ""));
    }
}

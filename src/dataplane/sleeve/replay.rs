//! Replay protection for sealed sleeve datagrams: a sliding window of counters already seen.
//!
//! A bitmap ring of 32 blocks of 64 bits, as in wireguard-go's `replay` package (RFC 6479). It
//! accepts each counter once, in any order, as long as it is no more than [`WINDOW_SIZE`] below
//! the highest counter accepted so far.
//!
//! Not here: authentication. Call [`ReplayWindow::accept`] only after the datagram opened, or a
//! forger could move the window; [`ReplayWindow::would_accept`] is the cheap check before that.
//!
//! Invariants: `last` is the highest counter accepted; the ring holds the bits of counters in
//! `(last - WINDOW_SIZE - 63, last]`, and only those.

const BLOCK_BITS: u64 = 64;
const RING_BLOCKS: u64 = 32;

/// How far below the highest accepted counter a counter may be and still be accepted.
pub const WINDOW_SIZE: u64 = (RING_BLOCKS - 1) * BLOCK_BITS;
const _: () = assert!(
    WINDOW_SIZE >= 1024,
    "the window covers at least 1024 counters"
);

/// The counters one session has accepted.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    last: u64,
    ring: [u64; RING_BLOCKS as usize],
}

impl ReplayWindow {
    /// A window that has accepted nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `accept(counter)` would succeed now. Changes nothing.
    pub fn would_accept(&self, counter: u64) -> bool {
        if counter > self.last {
            return true;
        }
        if self.last - counter > WINDOW_SIZE {
            return false;
        }
        let (block, bit) = Self::position(counter);
        self.ring[block] & bit == 0
    }

    /// Records `counter` as seen. Returns false if it is a duplicate or too old.
    pub fn accept(&mut self, counter: u64) -> bool {
        if counter > self.last {
            let current = self.last / BLOCK_BITS;
            let target = counter / BLOCK_BITS;
            // Clear the blocks the window slides over; after a whole ring, all of them.
            let clear = (target - current).min(RING_BLOCKS);
            for i in 1..=clear {
                self.ring[((current + i) % RING_BLOCKS) as usize] = 0;
            }
            self.last = counter;
        } else if self.last - counter > WINDOW_SIZE {
            return false;
        }
        let (block, bit) = Self::position(counter);
        let seen = self.ring[block] & bit != 0;
        self.ring[block] |= bit;
        !seen
    }

    fn position(counter: u64) -> (usize, u64) {
        let block = ((counter / BLOCK_BITS) % RING_BLOCKS) as usize;
        (block, 1u64 << (counter % BLOCK_BITS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(w: &mut ReplayWindow, counter: u64, expected: bool) {
        assert_eq!(w.would_accept(counter), expected, "would_accept({counter})");
        assert_eq!(w.accept(counter), expected, "accept({counter})");
    }

    #[test]
    fn in_order_counters_are_accepted_once() {
        let mut w = ReplayWindow::new();
        for c in 0..10_000 {
            check(&mut w, c, true);
        }
        for c in 10_000 - WINDOW_SIZE..10_000 {
            check(&mut w, c, false);
        }
    }

    #[test]
    fn reordering_within_the_window_is_accepted() {
        let mut w = ReplayWindow::new();
        check(&mut w, 2000, true);
        for c in (2000 - WINDOW_SIZE..2000).rev() {
            check(&mut w, c, true);
        }
        for c in 2000 - WINDOW_SIZE..=2000 {
            check(&mut w, c, false);
        }
        // Interleaved: odd counters first, then even ones.
        let mut w = ReplayWindow::new();
        for c in (1..200).step_by(2) {
            check(&mut w, c, true);
        }
        for c in (0..200).step_by(2) {
            check(&mut w, c, true);
        }
    }

    #[test]
    fn too_old_counters_are_rejected() {
        let mut w = ReplayWindow::new();
        check(&mut w, 5000, true);
        check(&mut w, 5000 - WINDOW_SIZE, true);
        check(&mut w, 5000 - WINDOW_SIZE - 1, false);
        check(&mut w, 0, false);
    }

    #[test]
    fn duplicates_are_rejected() {
        let mut w = ReplayWindow::new();
        check(&mut w, 0, true);
        check(&mut w, 0, false);
        check(&mut w, 7, true);
        check(&mut w, 7, false);
        check(&mut w, 3, true);
        check(&mut w, 3, false);
    }

    #[test]
    fn big_jumps_forget_the_old_window() {
        let mut w = ReplayWindow::new();
        for c in 0..100 {
            check(&mut w, c, true);
        }
        let far = 1_000_000;
        check(&mut w, far, true);
        check(&mut w, 50, false);
        // Counters just below the jump were never seen, even those whose ring slots held bits.
        for c in far - WINDOW_SIZE..far {
            check(&mut w, c, true);
        }
        check(&mut w, u64::MAX, true);
        check(&mut w, u64::MAX, false);
        check(&mut w, u64::MAX - 1, true);
        check(&mut w, far, false);
    }

    #[test]
    fn jumps_of_part_of_the_ring_clear_exactly_the_slid_blocks() {
        let mut w = ReplayWindow::new();
        for c in 0..2048 {
            w.accept(c);
        }
        // Slide by 10 blocks: the 10 oldest blocks' slots now belong to new counters.
        let top = 2047 + 10 * BLOCK_BITS;
        check(&mut w, top, true);
        for c in 2048..top {
            check(&mut w, c, true);
        }
        for c in top - WINDOW_SIZE..2048 {
            check(&mut w, c, false);
        }
    }
}

//! Hybrid logical clocks, for ordering a channel's messages within an epoch.
//!
//! An [`Hlc`] is the wall clock in milliseconds plus a counter that breaks ties and absorbs
//! clocks that run behind: it never goes backwards, and a message's clock is always after every
//! clock its sender had seen. Receivers order messages by `(epoch, hlc, id)`.

use serde::{Deserialize, Serialize};

use crate::{MAX_CLOCK_SKEW_MS, Timestamp};

/// A hybrid logical timestamp.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (physical part).
    pub wall_ms: u64,
    /// Logical counter within one millisecond.
    pub counter: u32,
}

/// A device's clock state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// The timestamp for a local event at `now`.
    pub fn tick(&mut self, now: Timestamp) -> Hlc {
        self.last = if now.0 > self.last.wall_ms {
            Hlc { wall_ms: now.0, counter: 0 }
        } else {
            Hlc { wall_ms: self.last.wall_ms, counter: self.last.counter.saturating_add(1) }
        };
        self.last
    }

    /// Takes in a remote timestamp seen at `now`. A remote clock more than
    /// [`MAX_CLOCK_SKEW_MS`] ahead is not adopted (a peer cannot drag everyone into the future);
    /// the message is still accepted and ordered by its own timestamp.
    pub fn observe(&mut self, remote: Hlc, now: Timestamp) {
        if remote.wall_ms > now.0.saturating_add(MAX_CLOCK_SKEW_MS) {
            return;
        }
        if remote > self.last {
            self.last = remote;
        }
    }

    /// The latest timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_causal() {
        let mut a = HlcClock::default();
        let t1 = a.tick(Timestamp(100));
        let t2 = a.tick(Timestamp(90)); // clock stepped back
        assert!(t2 > t1);
        let mut b = HlcClock::default();
        b.observe(t2, Timestamp(50)); // b's clock is behind
        assert!(b.tick(Timestamp(50)) > t2);
        // A far-future timestamp is not adopted.
        let mut c = HlcClock::default();
        c.observe(Hlc { wall_ms: u64::MAX, counter: 0 }, Timestamp(0));
        assert_eq!(c.tick(Timestamp(1)).wall_ms, 1);
    }
}

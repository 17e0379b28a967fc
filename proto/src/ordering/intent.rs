//! A member's outgoing change, from staging to merge.

use serde::{Deserialize, Serialize};

use super::{CommitHash, CommitRef};
use crate::Timestamp;

/// Submissions of one change before it is given up.
pub const MAX_SUBMIT_ATTEMPTS: u32 = 8;
/// Back-off after the first conflict, in milliseconds; it doubles with every further one.
pub const BACKOFF_BASE_MS: u64 = 50;
/// The longest back-off, in milliseconds.
pub const BACKOFF_MAX_MS: u64 = 5_000;

/// Where an outgoing change stands. Stored durably by the node, so that a crash in any state
/// resumes correctly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum IntentState {
    /// To be staged on the current epoch and submitted, not before `not_before`.
    ToPublish {
        /// Earliest time of the next attempt.
        not_before: Timestamp,
    },
    /// Staged and submitted; waiting for the orderers' answer.
    Published {
        /// The epoch it was built on.
        epoch: u64,
        /// The staged commit's hash.
        hash: CommitHash,
    },
    /// Accepted and merged.
    Committed {
        /// The epoch it was built on.
        epoch: u64,
    },
    /// No longer needed: another commit already made the change.
    Superseded,
    /// Given up after [`MAX_SUBMIT_ATTEMPTS`] conflicts.
    Failed,
}

/// An outgoing change `C` (for example "add these devices") and its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Intent<C> {
    /// What to change; rebuilt into a fresh commit on every attempt.
    pub change: C,
    /// Where it stands.
    pub state: IntentState,
    /// Submissions so far.
    pub attempts: u32,
}

impl<C> Intent<C> {
    /// A new change, ready to publish now.
    pub fn new(change: C, now: Timestamp) -> Self {
        Self { change, state: IntentState::ToPublish { not_before: now }, attempts: 0 }
    }

    /// Whether it should be staged and submitted at `now`.
    pub fn is_due(&self, now: Timestamp) -> bool {
        matches!(self.state, IntentState::ToPublish { not_before } if now >= not_before)
    }

    /// Records that a commit for it was staged on `epoch` and submitted.
    pub fn published(&mut self, epoch: u64, hash: CommitHash) {
        debug_assert!(matches!(self.state, IntentState::ToPublish { .. }));
        self.attempts += 1;
        self.state = IntentState::Published { epoch, hash };
    }

    /// Records the orderers' acceptance of `winner`. Returns whether the winner is this intent's
    /// commit (then the caller merges its pending commit).
    pub fn accepted(&mut self, winner: &CommitRef) -> bool {
        match self.state {
            IntentState::Published { epoch, hash }
                if epoch == winner.epoch && hash == winner.hash =>
            {
                self.state = IntentState::Committed { epoch };
                true
            }
            _ => false,
        }
    }

    /// Records that another commit won. The caller processes the winner, then calls this;
    /// `jitter` is a random number from the caller. The change goes back to
    /// [`IntentState::ToPublish`] after an exponential, jittered back-off, or to
    /// [`IntentState::Failed`] after [`MAX_SUBMIT_ATTEMPTS`].
    pub fn lost(&mut self, now: Timestamp, jitter: u64) {
        if self.attempts >= MAX_SUBMIT_ATTEMPTS {
            self.state = IntentState::Failed;
            return;
        }
        let shift = self.attempts.saturating_sub(1).min(16);
        let backoff = (BACKOFF_BASE_MS << shift).min(BACKOFF_MAX_MS);
        let delay = backoff / 2 + jitter % (backoff / 2 + 1);
        self.state = IntentState::ToPublish { not_before: now.plus_ms(delay) };
    }

    /// Records that the change is no longer needed.
    pub fn superseded(&mut self) {
        self.state = IntentState::Superseded;
    }

    /// Whether it reached a final state.
    pub fn is_done(&self) -> bool {
        matches!(
            self.state,
            IntentState::Committed { .. } | IntentState::Superseded | IntentState::Failed
        )
    }
}

//! Epoch ordering: one total order of commits per channel.
//!
//! MLS needs every member to apply the same commit for each epoch. The relays of a channel run
//! the [`OrderingState`] state machine as the replicated state of a Raft group (the relay crate
//! drives it with openraft; this crate knows nothing of Raft). Its rule is **first valid commit
//! wins**: the first [`OrderingCommand::Submit`] for `(channel, epoch)` takes the epoch, a later
//! one with another hash gets [`Outcome::Conflict`] naming the winner.
//!
//! After applying an accepted entry each relay signs an [`EpochCert`] body; a commit counts once
//! a majority of the channel's orderers (its relay set, or its creator's device for a channel
//! with no relay) signed it. Two signatures of one relay on different hashes for the same
//! `(channel, epoch)` are an [`Equivocation`] proof.
//!
//! The submitting member tracks its change as an [`Intent`]: stage, submit, merge only on
//! acceptance, rebuild on conflict with bounded, jittered back-off.

mod cert;
mod intent;
mod orderer;
mod report;

pub use cert::{
    CertError, CertSignature, EpochCert, EpochCertBody, Equivocation, MAX_CERT_SIGNATURES,
};
pub use intent::{BACKOFF_BASE_MS, BACKOFF_MAX_MS, Intent, IntentState, MAX_SUBMIT_ATTEMPTS};
pub use orderer::{
    Accepted, DEFAULT_STATE_BUDGET, Delivery, MAX_WAITING, MEMBER_EPOCHS, MemberSet, OrderCommand,
    Orderer, StoragePairs, Verdict, Waiting,
};
pub use report::{
    EpochRecord, EpochReport, EpochReportBody, Finding, ForkKind, REPORTERS_PER_EPOCH, ReportError,
    compare, epoch_digest, reports_epoch,
};

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::Canonical;
use crate::identity::DeviceId;
use crate::keys::hex_string;

/// A channel's id: the MLS group id. Its first 16 bytes bind it to its creator's device
/// ([`ChannelId::of_creator`]), the other 16 are random.
///
/// The binding is what lets a relay refuse a channel's first state from anyone but its
/// creator: a member who knows the id cannot open a group of its own making under it where
/// no relay holds a copy yet (the relays of a channel would then order from that group, and
/// the true channel could never be opened there).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ChannelId(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl ChannelId {
    /// The id of a channel `creator` makes, with `random` as its last 16 bytes.
    pub fn of_creator(creator: &DeviceId, random: [u8; 16]) -> Self {
        let mut id = [0u8; 32];
        id[..16].copy_from_slice(&Self::creator_tag(creator));
        id[16..].copy_from_slice(&random);
        Self(id)
    }

    /// Whether `creator` made this id ([`ChannelId::of_creator`]).
    pub fn is_of_creator(&self, creator: &DeviceId) -> bool {
        self.0[..16] == Self::creator_tag(creator)
    }

    /// Whether `opener` may open a state of epoch 0 of this channel whose config names
    /// `creator`: only the creator, whose device the id names.
    pub fn opens_first_state(&self, creator: &DeviceId, opener: &DeviceId) -> bool {
        creator == opener && self.is_of_creator(creator)
    }

    fn creator_tag(creator: &DeviceId) -> [u8; 16] {
        let mut h = blake3::Hasher::new_derive_key("chitchat/v1/channel-id");
        h.update(creator.as_bytes());
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&h.finalize().as_bytes()[..16]);
        tag
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelId({})", hex_string(&self.0[..8]))
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_string(&self.0))
    }
}

/// BLAKE3 hash of a commit's MLS encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct CommitHash(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl fmt::Debug for CommitHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommitHash({})", hex_string(&self.0[..8]))
    }
}

/// The commit that won (or asks for) an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct CommitRef {
    /// The channel.
    pub channel: ChannelId,
    /// The epoch the commit was built on; applying it moves the channel to `epoch + 1`.
    pub epoch: u64,
    /// The commit's hash.
    pub hash: CommitHash,
    /// The device that submitted it.
    pub submitter: DeviceId,
}

/// An entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum OrderingCommand {
    /// Start ordering a channel whose next commit is for `epoch` (0 for a new channel).
    Open {
        /// The channel.
        channel: ChannelId,
        /// The epoch of its next commit.
        epoch: u64,
    },
    /// Ask for `commit.epoch` of `commit.channel`.
    Submit(CommitRef),
}

impl Canonical for OrderingCommand {
    const MAX_LEN: usize = 256;
}

impl Canonical for OrderingState {
    /// A snapshot of a large relay's state.
    const MAX_LEN: usize = 1 << 30;
}

/// The result of applying one [`OrderingCommand`]. Deterministic: every replica that applies
/// the same log gets the same outcomes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Outcome {
    /// The channel is now ordered here.
    Opened,
    /// The channel was already open; nothing changed.
    AlreadyOpen {
        /// The epoch its next commit is for.
        next_epoch: u64,
    },
    /// The commit won its epoch (also returned again for a resubmission of the winner).
    Accepted(CommitRef),
    /// Another commit won the epoch first.
    Conflict {
        /// The winner.
        winner: CommitRef,
    },
    /// The commit is for an epoch that is not the next one, and the winner of that epoch is no
    /// longer remembered (too old) or the epoch is in the future.
    WrongEpoch {
        /// The epoch the next commit must be for.
        next_epoch: u64,
    },
    /// The channel is not ordered here.
    UnknownChannel,
    /// The state holds [`OrderingLimits::max_channels`] channels already.
    Full,
}

/// Bounds on the replicated state. Every replica must use the same values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct OrderingLimits {
    /// Channels ordered at once.
    pub max_channels: usize,
    /// Past winners remembered per channel, so a late loser learns whom it lost to.
    pub retained_epochs: u64,
}

impl Default for OrderingLimits {
    fn default() -> Self {
        Self { max_channels: 1_000_000, retained_epochs: 16 }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
struct ChannelOrder {
    next_epoch: u64,
    /// Recent winners by epoch, at most `retained_epochs` of them.
    winners: BTreeMap<u64, CommitRef>,
}

/// The replicated state machine: for each channel, which commit won each epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct OrderingState {
    limits: OrderingLimits,
    channels: BTreeMap<ChannelId, ChannelOrder>,
}

impl OrderingState {
    /// An empty state with the given limits.
    pub fn new(limits: OrderingLimits) -> Self {
        Self { limits, channels: BTreeMap::new() }
    }

    /// Applies one log entry.
    pub fn apply(&mut self, command: &OrderingCommand) -> Outcome {
        match command {
            OrderingCommand::Open { channel, epoch } => self.open(*channel, *epoch),
            OrderingCommand::Submit(commit) => self.submit(commit),
        }
    }

    /// The epoch the next commit of `channel` must be built on, if the channel is ordered here.
    pub fn next_epoch(&self, channel: &ChannelId) -> Option<u64> {
        self.channels.get(channel).map(|c| c.next_epoch)
    }

    /// The remembered winner of `(channel, epoch)`.
    pub fn winner(&self, channel: &ChannelId, epoch: u64) -> Option<&CommitRef> {
        self.channels.get(channel)?.winners.get(&epoch)
    }

    /// The limits it was made with.
    pub fn limits(&self) -> OrderingLimits {
        self.limits
    }

    /// Forgets a channel (its copy was stale: it is opened again from a later state).
    pub fn forget(&mut self, channel: &ChannelId) {
        self.channels.remove(channel);
    }

    /// How many channels are ordered.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    fn open(&mut self, channel: ChannelId, epoch: u64) -> Outcome {
        if let Some(c) = self.channels.get(&channel) {
            return Outcome::AlreadyOpen { next_epoch: c.next_epoch };
        }
        if self.channels.len() >= self.limits.max_channels {
            return Outcome::Full;
        }
        self.channels.insert(channel, ChannelOrder { next_epoch: epoch, winners: BTreeMap::new() });
        Outcome::Opened
    }

    fn submit(&mut self, commit: &CommitRef) -> Outcome {
        // The first commit of a new channel opens it implicitly.
        if commit.epoch == 0
            && !self.channels.contains_key(&commit.channel)
            && self.open(commit.channel, 0) == Outcome::Full
        {
            return Outcome::Full;
        }
        let Some(order) = self.channels.get_mut(&commit.channel) else {
            return Outcome::UnknownChannel;
        };
        if let Some(winner) = order.winners.get(&commit.epoch) {
            return if winner.hash == commit.hash {
                Outcome::Accepted(*winner)
            } else {
                Outcome::Conflict { winner: *winner }
            };
        }
        // Epochs come from the network: the last one a u64 holds takes no commit.
        let next = order.next_epoch.checked_add(1);
        if commit.epoch != order.next_epoch || next.is_none() {
            return Outcome::WrongEpoch { next_epoch: order.next_epoch };
        }
        order.winners.insert(commit.epoch, *commit);
        order.next_epoch = next.unwrap_or(u64::MAX);
        while order.winners.len() as u64 > self.limits.retained_epochs {
            order.winners.pop_first();
        }
        debug_assert!(order.winners.len() as u64 <= self.limits.retained_epochs.max(1));
        Outcome::Accepted(*commit)
    }
}

#[cfg(test)]
mod tests;

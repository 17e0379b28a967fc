//! The orderer: the whole replicated state machine of a channel's relays, sans I/O.
//!
//! [`OrderingState`] says which commit won each epoch; the orderer adds what makes the winner a
//! *valid* commit: each channel's public MLS state ([`PublicChannel`]), checked with the channel
//! rules ([`crate::channel::authorize_commit`]) on every commit, and followed as winners apply.
//! The relay drives it from its Raft log (openraft, in the relay crate); the simulation and the
//! tests drive it directly, so every "relay" of a test validates as the real one does.
//!
//! Deterministic: replicas that apply the same [`OrderCommand`]s in the same order give the same
//! [`Verdict`]s and the same [`Accepted`] fan-outs. Credential checks, which depend on each
//! relay's directory and clock, are not part of it: the relay a device submits to makes them
//! with [`Orderer::check`] before it proposes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    ChannelId, CommitRef, EpochCert, OrderingCommand, OrderingLimits, OrderingState, Outcome,
};
use crate::channel::{
    AcceptAll, ChannelConfig, ChannelError, CredentialCheck, MAX_PAST_EPOCHS, PublicChannel,
    PublicState,
};
use crate::codec::Bytes;
use crate::identity::{DeviceId, RelayId};
use crate::inbox::SealedEnvelope;
use crate::keys::PublicKey;
use crate::wire::{SealedWelcomes, commit_hash};

/// Epochs whose member sets are kept per channel: as many as a member reads messages from (the
/// current one and [`MAX_PAST_EPOCHS`] before it). A post is fanned out to the members of the
/// epoch it was encrypted in. Only epochs applied since the last restore are known; an older
/// post goes to the current members.
pub const MEMBER_EPOCHS: usize = MAX_PAST_EPOCHS + 1;

/// The public state an orderer holds for all its channels together, unless told otherwise
/// ([`Orderer::with_state_budget`]): what its snapshot and its memory grow to at most, give or
/// take one commit.
pub const DEFAULT_STATE_BUDGET: u64 = 512 * 1024 * 1024;

/// What one remembered winner costs, at most, counted for every epoch a channel may remember
/// ([`OrderingLimits::retained_epochs`]) from the start, so that a channel's cost grows only
/// with its public state.
const WINNER_BYTES: u64 = 128;

/// Winners of channels of several relays waiting for their certificate, at most (the oldest
/// is dropped beyond: its committer's resubmission, or another member's next commit, moves the
/// channel on).
pub const MAX_WAITING: usize = 65_536;

/// A command of the orderer's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderCommand {
    /// Start ordering a channel from a member's export of its public state.
    Open {
        /// The channel.
        channel: ChannelId,
        /// GroupInfo and ratchet tree.
        state: PublicState,
    },
    /// Ask for an epoch with this commit; if it wins, fan it out with its Welcomes.
    Order {
        /// What is ordered; `submitter` must be the member that committed it.
        commit: CommitRef,
        /// The commit (MLS PublicMessage), checked against the channel's public state.
        bytes: Bytes,
        /// The Welcomes for the devices it adds, sealed by the submitter.
        welcome: Option<SealedWelcomes>,
    },
    /// Like [`OrderCommand::Open`], and also replaces a channel this orderer no longer orders:
    /// one whose relay set, as its last commit here left it, differs from the relay set of the
    /// state given, which is of a later epoch. That is a channel that moved to another relay
    /// set and now comes back (its copy here is stale). A channel whose relay set is the one
    /// given, or a state of an epoch not past the copy's, is answered
    /// [`Outcome::AlreadyOpen`] as `Open` is.
    Reopen {
        /// The channel.
        channel: ChannelId,
        /// GroupInfo and ratchet tree.
        state: PublicState,
    },
    /// The certificate of a winner of a channel of several relays (a majority of its relays
    /// signed): every relay of the group fans the winner out to its own members with it.
    Deliver {
        /// The certificate.
        cert: EpochCert,
    },
}

/// The answer to one [`OrderCommand`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// What the ordering state decided.
    Ordering(Outcome),
    /// The command was not valid against the channel's public state or its rules; nothing
    /// changed.
    Invalid(String),
    /// The submitter may not submit this commit (not a member, or not its committer).
    Forbidden(String),
    /// The orderer holds as much public state as its budget allows: a new channel, or a commit
    /// that adds members, waits until channels shrink. Nothing changed.
    OverBudget(String),
}

/// A commit that won its epoch: what to fan out. Produced once per accepted log entry, so a
/// driver that dies before the fan-out is durable produces it again when it applies its log
/// again, and skips what it already did by `index`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Accepted {
    /// The log index of the entry.
    pub index: u64,
    /// The commit's reference (its submitter included).
    pub commit: CommitRef,
    /// The commit (MLS PublicMessage).
    pub bytes: Bytes,
    /// Every member of the epoch the commit ends, sorted (removed devices learn of their
    /// removal; the committer is among them).
    pub recipients: Vec<DeviceId>,
    /// Welcomes for the devices the commit adds (any others the submitter attached are
    /// dropped).
    pub welcomes: Vec<SealedEnvelope>,
}

/// A winner to fan out, with the certificate to fan it out with (`None`: the relay's own
/// signature, which is the whole certificate of a one-relay channel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The winner.
    pub accepted: Accepted,
    /// Its certificate, for a channel of several relays.
    pub cert: Option<EpochCert>,
    /// Relays the commit brings into the channel's relay set: the Welcomes of devices that are
    /// not this relay's go to them (the first user of a relay joins this way).
    pub new_relays: Vec<RelayId>,
}

/// A winner of a channel of several relays, waiting for its certificate: by a majority of
/// `orderers`, the relay set of the epoch it was built on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    /// The winner.
    pub accepted: Accepted,
    /// Who must sign its certificate.
    pub orderers: Vec<PublicKey>,
}

/// A public group's openmls storage, as key-value pairs.
pub type StoragePairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A channel's member devices in one epoch, sorted.
pub type MemberSet = Arc<[DeviceId]>;

/// A channel's member sets by epoch, oldest first; the last is the current epoch's.
type MemberEpochs = VecDeque<(u64, MemberSet)>;

/// The replicated state of a relay group: which commit won each epoch of each channel, and each
/// channel's public MLS state.
#[derive(Debug)]
pub struct Orderer {
    state: OrderingState,
    channels: BTreeMap<ChannelId, PublicChannel>,
    /// Each channel's member devices, sorted, in its last [`MEMBER_EPOCHS`] epochs: derived
    /// from `channels` after every change, so that a post (the hot path) reads them without
    /// walking the ratchet tree.
    members: BTreeMap<ChannelId, MemberEpochs>,
    /// Each channel's [`PublicChannel::stored_bytes`], and their sum.
    sizes: BTreeMap<ChannelId, u64>,
    total_bytes: u64,
    /// The most `total_bytes` may reach before opens and adds are refused.
    state_budget: u64,
    /// Winners of channels of several relays, by (channel, epoch), waiting for their
    /// certificate ([`OrderCommand::Deliver`]) to be fanned out.
    waiting: BTreeMap<(ChannelId, u64), Waiting>,
    crypto: openmls_rust_crypto::RustCrypto,
}

impl Orderer {
    /// An empty orderer.
    pub fn new(limits: OrderingLimits) -> Self {
        Self::from_parts(OrderingState::new(limits), BTreeMap::new())
    }

    /// Restores an orderer from [`Orderer::export`]'s parts and [`Orderer::waiting`].
    pub fn restore(
        state: OrderingState,
        channels: Vec<(ChannelId, StoragePairs)>,
        waiting: Vec<Waiting>,
    ) -> Result<Self, ChannelError> {
        let mut public = BTreeMap::new();
        for (id, pairs) in channels {
            public.insert(id, PublicChannel::import(id, pairs)?);
        }
        let mut orderer = Self::from_parts(state, public);
        orderer.waiting = waiting
            .into_iter()
            .map(|w| ((w.accepted.commit.channel, w.accepted.commit.epoch), w))
            .collect();
        Ok(orderer)
    }

    fn from_parts(state: OrderingState, channels: BTreeMap<ChannelId, PublicChannel>) -> Self {
        let mut orderer = Self {
            state,
            channels,
            members: BTreeMap::new(),
            sizes: BTreeMap::new(),
            total_bytes: 0,
            state_budget: DEFAULT_STATE_BUDGET,
            waiting: BTreeMap::new(),
            crypto: openmls_rust_crypto::RustCrypto::default(),
        };
        let ids: Vec<ChannelId> = orderer.channels.keys().copied().collect();
        for id in ids {
            orderer.refresh_members(id);
        }
        orderer
    }

    /// Sets the public-state budget: once the channels' public state together holds `bytes`,
    /// new channels and commits that add members are refused ([`Verdict::OverBudget`]) until
    /// removals make room. One commit may overshoot it by what it adds, so the state (and a
    /// snapshot of it) stays under `bytes` plus one commit's growth. A restored orderer keeps
    /// all it held even above a budget lowered since.
    ///
    /// Every replica of a group must use the same budget, since it decides commits.
    pub fn with_state_budget(mut self, bytes: u64) -> Self {
        self.state_budget = bytes;
        self
    }

    /// The state held for all channels, in bytes: their public state
    /// ([`PublicChannel::stored_bytes`]) and room for the winners each may remember.
    pub fn state_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// What a snapshot holds: the ordering state and each channel's public-group storage.
    pub fn export(&self) -> (OrderingState, Vec<(ChannelId, StoragePairs)>) {
        (self.state.clone(), self.channels.iter().map(|(id, c)| (*id, c.export())).collect())
    }

    /// The winners of channels of several relays waiting for their certificate, oldest
    /// channel first.
    pub fn waiting(&self) -> impl Iterator<Item = &Waiting> {
        self.waiting.values()
    }

    /// Applies one command, the entry at log index `index`.
    ///
    /// A winner of a channel of one relay (or none) is fanned out at once: the relay's own
    /// signature is its certificate. A winner of a channel of several relays waits until its
    /// certificate, signed by a majority of the relay set of the epoch it was built on, is in
    /// the log ([`OrderCommand::Deliver`]), and is fanned out then, once.
    pub fn apply(&mut self, index: u64, command: OrderCommand) -> (Verdict, Option<Delivery>) {
        let (commit, bytes, welcome) = match command {
            OrderCommand::Open { channel, state } => return (self.open(channel, state), None),
            OrderCommand::Reopen { channel, state } => return (self.reopen(channel, state), None),
            OrderCommand::Deliver { cert } => return self.deliver(index, cert),
            OrderCommand::Order { commit, bytes, welcome } => (commit, bytes, welcome),
        };
        // A commit is certified by the relays of the epoch it is built on: those of the config
        // before it (a commit that changes the relay set is the old set's).
        let before = match self.config(&commit.channel) {
            Some(Ok(c)) => c.orderers(),
            _ => Vec::new(),
        };
        let (verdict, accepted) = self.order(index, commit, bytes, welcome);
        let Some(accepted) = accepted else { return (verdict, None) };
        if before.len() >= 2 {
            if self.waiting.len() >= MAX_WAITING {
                self.waiting.pop_first();
            }
            let key = (accepted.commit.channel, accepted.commit.epoch);
            self.waiting.insert(key, Waiting { accepted, orderers: before });
            return (verdict, None);
        }
        let new_relays = self.new_relays(&accepted.commit.channel, &before);
        (verdict, Some(Delivery { accepted, cert: None, new_relays }))
    }

    /// A certificate for a waiting winner: it must be for the winner, signed by a majority of
    /// the channel's relays. Fanned out once (a second certificate finds nothing waiting).
    fn deliver(&mut self, index: u64, cert: EpochCert) -> (Verdict, Option<Delivery>) {
        let b = cert.body;
        let Some(winner) = self.state.winner(&b.channel, b.epoch).copied() else {
            return (Verdict::Invalid("no winner known for that epoch".into()), None);
        };
        if winner.hash != b.hash {
            return (Verdict::Invalid("the certificate is not for the winner".into()), None);
        }
        let Some(waiting) = self.waiting.get(&(b.channel, b.epoch)) else {
            // Delivered already (or never waited: a one-relay channel's winner).
            return (Verdict::Ordering(Outcome::Accepted(winner)), None);
        };
        if let Err(e) = cert.verify(&waiting.orderers) {
            return (Verdict::Invalid(format!("certificate: {e}")), None);
        }
        let outcome = Verdict::Ordering(Outcome::Accepted(winner));
        match self.waiting.remove(&(b.channel, b.epoch)) {
            Some(Waiting { mut accepted, orderers }) => {
                accepted.index = index;
                let new_relays = self.new_relays(&b.channel, &orderers);
                (outcome, Some(Delivery { accepted, cert: Some(cert), new_relays }))
            }
            None => (outcome, None),
        }
    }

    /// The relays of the channel's current config whose keys are not among `before`.
    fn new_relays(&self, channel: &ChannelId, before: &[PublicKey]) -> Vec<RelayId> {
        match self.config(channel) {
            Some(Ok(c)) => c.relays.into_iter().filter(|r| !before.contains(&r.key)).collect(),
            _ => Vec::new(),
        }
    }

    /// Checks a commit against the channel's current public state and rules, with `check` for
    /// the credentials it brings in (the caller's directory), without changing anything.
    /// Returns the member that committed it.
    pub fn check(
        &self,
        channel: &ChannelId,
        commit: &[u8],
        check: &impl CredentialCheck,
    ) -> Result<DeviceId, ChannelError> {
        let public = self.channels.get(channel).ok_or(ChannelError::WrongChannel)?;
        public.check(&self.crypto, commit, check).map(|c| c.committer)
    }

    /// The ordering state.
    pub fn state(&self) -> &OrderingState {
        &self.state
    }

    /// The epoch the channel's next commit must be built on, if it is ordered here.
    pub fn next_epoch(&self, channel: &ChannelId) -> Option<u64> {
        self.state.next_epoch(channel)
    }

    /// The channels ordered here.
    pub fn channel_ids(&self) -> impl Iterator<Item = &ChannelId> {
        self.channels.keys()
    }

    /// The channel's current config, if it is ordered here.
    pub fn config(&self, channel: &ChannelId) -> Option<Result<ChannelConfig, ChannelError>> {
        self.channels.get(channel).map(PublicChannel::config)
    }

    /// The member devices of the channel's current epoch, sorted; `None` if it is not ordered.
    pub fn member_set(&self, channel: &ChannelId) -> Option<MemberSet> {
        self.members.get(channel).and_then(|e| e.back()).map(|(_, m)| m.clone())
    }

    /// The member devices of the channel's current epoch and of `epoch` (the current ones if
    /// `epoch` is not among the last [`MEMBER_EPOCHS`] known), sorted.
    pub fn member_sets(&self, channel: &ChannelId, epoch: u64) -> Option<(MemberSet, MemberSet)> {
        let epochs = self.members.get(channel)?;
        let (_, current) = epochs.back()?;
        let then = epochs.iter().find(|(e, _)| *e == epoch).map_or(current, |(_, m)| m);
        Some((current.clone(), then.clone()))
    }

    /// Whether `device` may gossip in the channel at `epoch`, as a relay judging a gossiped
    /// envelope asks (`GossipEnvelope::judge`): `Some(false)` if it was not a member at `epoch`;
    /// `Some(true)` if it was, and is a member still; `None` if the channel is not ordered
    /// here, `epoch` is not among the last [`MEMBER_EPOCHS`] it knows, or the device was removed
    /// since (its message may be one sent before the removal, which the inbox carries: not held
    /// against whoever forwards it, and not forwarded, for a removed member still holds the
    /// old epoch's keys).
    pub fn is_member(&self, channel: &ChannelId, device: &DeviceId, epoch: u64) -> Option<bool> {
        let epochs = self.members.get(channel)?;
        let (_, then) = epochs.iter().find(|(e, _)| *e == epoch)?;
        if then.binary_search(device).is_err() {
            return Some(false);
        }
        let (_, now) = epochs.back()?;
        now.binary_search(device).is_ok().then_some(true)
    }

    /// Whether `state` is exactly the channel's public state here (epoch, tree, transcript,
    /// config): `None` if the channel is not known here or the state does not parse.
    pub fn matches(&self, channel: &ChannelId, state: &PublicState) -> Option<bool> {
        let held = self.channels.get(channel)?;
        let other = PublicChannel::from_state(&self.crypto, state).ok()?;
        Some(held.same_state(&other))
    }

    fn reopen(&mut self, channel: ChannelId, state: PublicState) -> Verdict {
        let Some(held) = self.channels.get(&channel) else { return self.open(channel, state) };
        let public = match PublicChannel::from_state(&self.crypto, &state) {
            Ok(p) if p.id() == channel => p,
            Ok(_) => return Verdict::Invalid("the state is of another channel".into()),
            Err(e) => return Verdict::Invalid(e.to_string()),
        };
        let set = |c: &PublicChannel| {
            c.config().ok().map(|c| {
                let mut relays = c.relays;
                relays.sort();
                relays.dedup();
                relays
            })
        };
        let (old, new) = (set(held), set(&public));
        let next_epoch = self.state.next_epoch(&channel).unwrap_or_default();
        if old.is_none() || old == new || public.epoch() <= held.epoch() {
            return Verdict::Ordering(Outcome::AlreadyOpen { next_epoch });
        }
        // The stale copy goes; the channel starts again from the later state.
        let freed = self.sizes.remove(&channel).unwrap_or(0);
        self.total_bytes = self.total_bytes.saturating_sub(freed);
        self.channels.remove(&channel);
        self.members.remove(&channel);
        self.state.forget(&channel);
        // Winners of the stale copy still waiting for a certificate can never get one (no
        // relay knows them any more): without this, the leader's sweep would ask for their
        // signatures forever.
        self.waiting.retain(|(c, _), _| *c != channel);
        self.open(channel, state)
    }

    fn open(&mut self, channel: ChannelId, state: PublicState) -> Verdict {
        if let Some(next_epoch) = self.state.next_epoch(&channel) {
            return Verdict::Ordering(Outcome::AlreadyOpen { next_epoch });
        }
        let public = match PublicChannel::from_state(&self.crypto, &state) {
            Ok(p) if p.id() == channel => p,
            Ok(_) => return Verdict::Invalid("the state is of another channel".into()),
            Err(e) => return Verdict::Invalid(e.to_string()),
        };
        let size = public.stored_bytes().saturating_add(self.winners_bytes());
        if self.total_bytes.saturating_add(size) > self.state_budget {
            return Verdict::OverBudget(format!(
                "the relay holds {} bytes of channel state, its budget is {}",
                self.total_bytes, self.state_budget
            ));
        }
        let outcome = self.state.apply(&OrderingCommand::Open { channel, epoch: public.epoch() });
        if outcome == Outcome::Opened {
            self.channels.insert(channel, public);
            self.refresh_members(channel);
        }
        Verdict::Ordering(outcome)
    }

    fn order(
        &mut self,
        index: u64,
        commit: CommitRef,
        bytes: Bytes,
        welcome: Option<SealedWelcomes>,
    ) -> (Verdict, Option<Accepted>) {
        let Some(public) = self.channels.get_mut(&commit.channel) else {
            return (Verdict::Ordering(Outcome::UnknownChannel), None);
        };
        let before =
            self.members.get(&commit.channel).and_then(|e| e.back()).map(|(_, m)| m.clone());
        // A resubmitted winner, a loser, or a commit for another epoch: the ordering state
        // answers without checking again, to a member of the epoch the commit was built on (a
        // loser removed by the winner learns whom it lost to), of the current epoch, or to the
        // winner's submitter; nothing is fanned out again.
        if self.state.next_epoch(&commit.channel) != Some(commit.epoch) {
            let winner = self.state.winner(&commit.channel, commit.epoch);
            let was_member =
                self.member_sets(&commit.channel, commit.epoch).is_some_and(|(now, then)| {
                    now.binary_search(&commit.submitter).is_ok()
                        || then.binary_search(&commit.submitter).is_ok()
                });
            if !was_member && winner.is_none_or(|w| w.submitter != commit.submitter) {
                return (Verdict::Forbidden("not a member of the channel".into()), None);
            }
            return (Verdict::Ordering(self.state.apply(&OrderingCommand::Submit(commit))), None);
        }
        if commit_hash(&bytes) != commit.hash {
            return (Verdict::Invalid("the commit does not hash to the ordered hash".into()), None);
        }
        // First *valid* commit wins, and only its committer submits it. (Credentials are the
        // submitting relay's to check, with `Orderer::check`: they depend on its directory.)
        let checked = match public.check(&self.crypto, &bytes, &AcceptAll) {
            Ok(c) => c,
            Err(e) => return (Verdict::Invalid(e.to_string()), None),
        };
        if checked.committer != commit.submitter {
            let reason = "a commit is submitted by the member that committed it".into();
            return (Verdict::Forbidden(reason), None);
        }
        if checked.adds && self.total_bytes >= self.state_budget {
            let reason = format!(
                "the relay holds {} bytes of channel state, its budget is {}: no members are added \
                 until channels shrink",
                self.total_bytes, self.state_budget
            );
            return (Verdict::OverBudget(reason), None);
        }
        // The epoch is next, so the ordering state takes it, unless it is the last a u64 holds:
        // checked first, so that a refusal changes nothing.
        if commit.epoch.checked_add(1).is_none() {
            return (Verdict::Ordering(Outcome::WrongEpoch { next_epoch: commit.epoch }), None);
        }
        if let Err(e) = public.apply(checked) {
            return (Verdict::Invalid(e.to_string()), None);
        }
        let outcome = self.state.apply(&OrderingCommand::Submit(commit));
        debug_assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
        self.refresh_members(commit.channel);
        let before = before.unwrap_or_else(|| Arc::from(Vec::new()));
        let added: Vec<DeviceId> = self
            .member_set(&commit.channel)
            .iter()
            .flat_map(|m| m.iter())
            .filter(|d| before.binary_search(d).is_err())
            .copied()
            .collect();
        let welcomes = welcome
            .map(|w| w.envelopes.into_iter().filter(|e| added.contains(&e.recipient)).collect())
            .unwrap_or_default();
        let accepted = Accepted { index, commit, bytes, recipients: before.to_vec(), welcomes };
        (Verdict::Ordering(outcome), Some(accepted))
    }

    /// What a channel's remembered winners may cost.
    fn winners_bytes(&self) -> u64 {
        self.state.limits().retained_epochs.max(1).saturating_mul(WINNER_BYTES)
    }

    /// Re-derives what is kept beside the channel's public state: its member sets and its size.
    fn refresh_members(&mut self, channel: ChannelId) {
        let Some(public) = self.channels.get(&channel) else { return };
        let size = public.stored_bytes().saturating_add(self.winners_bytes());
        let old = self.sizes.insert(channel, size).unwrap_or(0);
        self.total_bytes = self.total_bytes.saturating_sub(old).saturating_add(size);
        let mut members = public.members();
        members.sort();
        members.dedup();
        let epoch = public.epoch();
        let epochs = self.members.entry(channel).or_default();
        if epochs.back().is_some_and(|(e, _)| *e == epoch) {
            epochs.pop_back();
        }
        epochs.push_back((epoch, members.into()));
        while epochs.len() > MEMBER_EPOCHS {
            epochs.pop_front();
        }
    }
}

//! Relay-less channels (a LAN): ordered by their creator's device, which signs each commit's
//! certificate itself (section 6 of the design), keeps what it ordered (`ordered-0`) for the
//! members that missed it, and never certifies two commits for one epoch. Their messages go by
//! gossip alone: their outbox items are published, not posted to a relay.

use std::collections::BTreeSet;

use chitchat_proto::channel::ChannelMessage;
use chitchat_proto::ordering::{CertSignature, ChannelId, EpochCert, EpochCertBody};
use chitchat_proto::wire::{ChannelPost, OrderedCommit, Request, commit_hash};
use chitchat_proto::{DeviceId, Dir, RelayId, Timestamp};
use openmls_traits::OpenMlsProvider as _;

use super::{Engine, EngineError, Event, active_in, id_string};
use crate::store::{Batch, MessageStatus, OutboxItem, StagedRecord};

/// What the creator made of a member's submitted commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ordered {
    /// It won its epoch: ordered, certified, kept.
    Accepted(OrderedCommit),
    /// Another commit won that epoch.
    Conflict(OrderedCommit),
    /// This device is changing the channel itself: ask again in a moment.
    Busy,
}

/// Commits one answer to a member's catch-up carries, at most (and about a frame's bytes).
const MAX_CATCH_UP: usize = chitchat_proto::peer::MAX_COMMITS;

impl Engine {
    /// Lets this device join relay-less channels (`false` for a relay-only node, which meets
    /// no peer to order them). Channels it is in already stay.
    pub fn set_lan(&mut self, lan: bool) {
        self.lan = lan;
    }

    /// Whether the channel is relay-less (ordered by its creator's device).
    pub fn is_relayless(&self, id: &ChannelId) -> bool {
        self.channels
            .get(id)
            .and_then(|h| h.channel.as_ref())
            .is_some_and(|c| c.config().relays.is_empty())
    }

    /// The relay-less channels this device is in.
    pub fn relayless_channels(&self) -> BTreeSet<ChannelId> {
        self.channels
            .iter()
            .filter(|(_, h)| h.channel.as_ref().is_some_and(|c| c.config().relays.is_empty()))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether any member may change the channel's membership (`--open`).
    pub fn is_open(&self, id: &ChannelId) -> bool {
        self.channels.get(id).and_then(|h| h.channel.as_ref()).is_some_and(|c| {
            matches!(c.config().admins, chitchat_proto::channel::AdminPolicy::AnyMember)
        })
    }

    /// The device that created the channel (the orderer of a relay-less one).
    pub fn creator(&self, id: &ChannelId) -> Option<DeviceId> {
        self.channels.get(id).and_then(|h| h.channel.as_ref()).map(|c| c.config().creator)
    }

    /// The identity records this device holds of the channel's members (at most
    /// `MAX_DIRS`).
    pub fn member_dirs(&self, id: &ChannelId) -> Vec<Dir> {
        let Some(channel) = self.channels.get(id).and_then(|h| h.channel.as_ref()) else {
            return Vec::new();
        };
        let own = self.account.as_ref().map(|a| &a.dir);
        channel
            .members()
            .iter()
            .filter_map(|m| self.dirs.get(m).or(own.filter(|d| d.device() == *m)))
            .take(chitchat_proto::wire::MAX_DIRS)
            .cloned()
            .collect()
    }

    /// This device's identity record as peers get it: the one its relay sponsors, or, for a
    /// device registered nowhere, a record of its own under `name` (which no one vouches for).
    pub fn peer_record(&self, name: &str, now: Timestamp) -> Dir {
        match &self.account {
            Some(a) => a.dir.clone(),
            None => self.first_dir(name, now),
        }
    }

    /// Orders this device's staged commit of a relay-less channel it created: certifies it
    /// with its own key and keeps it (`ordered-0`, durably) before the certificate is returned.
    /// A commit already ordered for that epoch is answered again; another one is refused (the
    /// device never certifies two commits for one epoch).
    pub fn order_own(
        &mut self,
        id: &ChannelId,
        staged: &StagedRecord,
    ) -> Result<OrderedCommit, EngineError> {
        let channel = active_in(&mut self.channels, id)?;
        let config = channel.config();
        if !config.relays.is_empty() || config.creator != DeviceId(self.key.public()) {
            return Err(EngineError::Invalid(
                "only the creator's device orders a relay-less channel".into(),
            ));
        }
        let epoch = channel.epoch();
        let hash = commit_hash(&staged.commit);
        if let Some(done) = self.store.ordered_at(id, staged.epoch)? {
            if done.cert.body.hash == hash {
                return Ok(done);
            }
            return Err(EngineError::Invalid(format!(
                "epoch {} of the channel was ordered for another commit",
                staged.epoch
            )));
        }
        if staged.epoch != epoch {
            return Err(EngineError::Invalid(format!(
                "a commit built on epoch {} while the channel is at {epoch}",
                staged.epoch
            )));
        }
        let body = EpochCertBody { channel: *id, epoch, hash };
        let cert = EpochCert { signatures: vec![CertSignature::sign(&self.key, &body)], body };
        let ordered = OrderedCommit { channel: *id, commit: staged.commit.clone(), cert };
        let mut b = Batch::default();
        b.ordered(ordered.clone());
        self.commit(b)?;
        Ok(ordered)
    }

    /// Orders a member's commit of a relay-less channel this device created: the first valid
    /// commit built on `epoch` wins (checked as every member will check it, with the channel
    /// rules, and committed by `submitter` itself); its certificate is kept (`ordered-0`)
    /// before it is returned. The commit is not merged here: the caller hands it to the engine
    /// as a member's.
    pub fn order_submitted(
        &mut self,
        id: &ChannelId,
        epoch: u64,
        commit: &[u8],
        submitter: &DeviceId,
        now: Timestamp,
    ) -> Result<Ordered, EngineError> {
        let me = DeviceId(self.key.public());
        let channel = active_in(&mut self.channels, id)?;
        let config = channel.config().clone();
        if !config.relays.is_empty() || config.creator != me {
            return Err(EngineError::Invalid("this device orders no such channel".into()));
        }
        let hash = commit_hash(commit);
        if let Some(done) = self.store.ordered_at(id, epoch)? {
            return Ok(if done.cert.body.hash == hash {
                Ordered::Accepted(done)
            } else {
                Ordered::Conflict(done)
            });
        }
        if channel.pending().is_some() {
            return Ok(Ordered::Busy);
        }
        if epoch != channel.epoch() {
            return Err(EngineError::Invalid(format!(
                "epoch {epoch} is not the channel's (it is at {})",
                channel.epoch()
            )));
        }
        let state = self.public_state(id)?;
        let crypto = self.provider.crypto();
        let public = chitchat_proto::channel::PublicChannel::from_state(crypto, &state)?;
        let check =
            super::Recording::new(&self.dirs, self.trust(), now, self.lan).for_config(&config);
        let checked = public
            .check(crypto, commit, &check)
            .map_err(|e| EngineError::Invalid(format!("commit refused: {e}")))?;
        if checked.committer != *submitter {
            return Err(EngineError::Invalid("the commit is another member's".into()));
        }
        let body = EpochCertBody { channel: *id, epoch, hash };
        let cert = EpochCert { signatures: vec![CertSignature::sign(&self.key, &body)], body };
        let ordered = OrderedCommit { channel: *id, commit: commit.to_vec(), cert };
        let mut b = Batch::default();
        b.ordered(ordered.clone());
        self.commit(b)?;
        Ok(Ordered::Accepted(ordered))
    }

    /// The channel's other members whose records this device holds vouched for by no relay it
    /// knows (registered nowhere, or not looked up yet).
    pub fn unvouched_members(&self, id: &ChannelId, now: Timestamp) -> Vec<DeviceId> {
        let me = DeviceId(self.key.public());
        let Some(channel) = self.channels.get(id).and_then(|h| h.channel.as_ref()) else {
            return Vec::new();
        };
        let trust = self.trust();
        channel
            .members()
            .into_iter()
            .filter(|d| *d != me)
            .filter(|d| self.dirs.get(d).is_none_or(|dir| dir.verify(&trust, now).is_err()))
            .collect()
    }

    /// The relay set a relay-less channel this device created moves onto: this device's relay
    /// first, then the relay of each other member (as its record, vouched for by that relay,
    /// says; one relay serving several members is named once). Refused, naming them, if a
    /// member's record is vouched for by no relay this device knows: after the move the
    /// channel's relays deliver to members' inboxes, so each must be registered.
    pub fn move_plan(&self, id: &ChannelId, now: Timestamp) -> Result<Vec<RelayId>, EngineError> {
        let me = DeviceId(self.key.public());
        let channel = self
            .channels
            .get(id)
            .and_then(|h| h.channel.as_ref())
            .ok_or_else(|| EngineError::UnknownChannel(id.to_string()))?;
        let config = channel.config();
        if !config.relays.is_empty() {
            return Err(EngineError::Invalid("the channel is ordered by relays already".into()));
        }
        if config.creator != me {
            return Err(EngineError::Invalid(
                "only the creator's device, which orders the channel, moves it onto relays".into(),
            ));
        }
        let account = self.account.as_ref().ok_or_else(|| {
            EngineError::Invalid(
                "this device is registered at no relay: register it (`chitchat register`) first"
                    .into(),
            )
        })?;
        let trust = self.trust();
        let mut relays = vec![account.relay.id.clone()];
        let mut unvouched = Vec::new();
        for device in channel.members().into_iter().filter(|d| *d != me) {
            let Some(Ok(addresses)) = self.dirs.get(&device).map(|d| d.verify(&trust, now)) else {
                unvouched.push(device.0.to_hex());
                continue;
            };
            if addresses.iter().any(|a| relays.iter().any(|r| r.host == a.host)) {
                continue;
            }
            if let Some(relay) =
                addresses.iter().find_map(|a| trust.relays.iter().find(|r| r.host == a.host))
            {
                relays.push(relay.clone());
            }
        }
        if !unvouched.is_empty() {
            return Err(EngineError::Invalid(format!(
                "no relay vouches for these members: {}. Each registers at a relay (`chitchat \
                 register`) before the channel moves, or is removed",
                unvouched.join(", ")
            )));
        }
        Ok(relays)
    }

    /// Records the channel's public state before its move onto relays (durably, before the move
    /// is staged): with the move's certified commit, the evidence its relays open it on.
    pub fn record_move(&mut self, id: &ChannelId) -> Result<(), EngineError> {
        let epoch = active_in(&mut self.channels, id)?.epoch();
        let before = self.public_state(id)?;
        let mut b = Batch::default();
        b.moved(*id, epoch, before);
        self.commit(b)
    }

    /// What opens the channel at its relay: its state (`OpenChannel`), or, right after this
    /// device moved it there from relay-less, the state before, the certified move and the
    /// state after (`OpenMoved`: no relay ordered it before, so none vouches for the state).
    pub fn open_request(&mut self, id: &ChannelId) -> Result<Request, EngineError> {
        let state = self.public_state(id)?;
        let epoch = self.epoch(id).ok_or_else(|| EngineError::UnknownChannel(id.to_string()))?;
        if let Some((at, before)) = self.store.moved(id)?
            && at.checked_add(1) == Some(epoch)
            && let Some(moved) = self.store.ordered_at(id, at)?
        {
            return Ok(Request::OpenMoved { before, moved, state });
        }
        Ok(Request::OpenChannel { channel: *id, state })
    }

    /// What this device keeps of a channel is served to its members alone.
    fn served_to(&self, id: &ChannelId, asker: &DeviceId) -> Result<(), EngineError> {
        let channel = self
            .channels
            .get(id)
            .and_then(|h| h.channel.as_ref())
            .ok_or_else(|| EngineError::UnknownChannel(id.to_string()))?;
        if !channel.members().contains(asker) {
            return Err(EngineError::Invalid("not a member of the channel".into()));
        }
        Ok(())
    }

    /// The commits this device keeps of a relay-less channel (ordered, or taken as a member),
    /// built on `from` and after, for `asker`, which must be a member now.
    pub fn ordered_for(
        &self,
        id: &ChannelId,
        from: u64,
        asker: &DeviceId,
    ) -> Result<Vec<OrderedCommit>, EngineError> {
        self.served_to(id, asker)?;
        let max_bytes = chitchat_proto::wire::MAX_FRAME_LEN / 2;
        Ok(self.store.ordered_from(id, from, MAX_CATCH_UP, max_bytes)?)
    }

    /// Keeps what this device took of a relay-less channel (MLS authenticated it), for members
    /// that miss it: its messages (`lan-history-0`, the last `KEPT_LAN_HISTORY`, once each) and
    /// its certified commits (`ordered-0`, beside what the creator ordered). Every member keeps
    /// them, so a member that was away catches up from any other, the creator's device or not.
    /// They are written with what was received, in one transaction.
    pub(super) fn lan_keep(&self, channel: ChannelId, message: ChannelMessage, b: &mut Batch) {
        match message {
            ChannelMessage::Application { message } => b.lan_keep(ChannelPost { channel, message }),
            ChannelMessage::Commit { commit, cert } => {
                b.ordered(OrderedCommit { channel, commit, cert });
            }
        }
    }

    /// The messages kept of a relay-less channel from position `from` on, for `asker`, which
    /// must be a member now; with the position to ask from next.
    pub fn lan_history_for(
        &self,
        id: &ChannelId,
        from: u64,
        asker: &DeviceId,
    ) -> Result<(Vec<(u64, ChannelPost)>, u64), EngineError> {
        self.served_to(id, asker)?;
        let max_bytes = chitchat_proto::wire::MAX_FRAME_LEN / 2;
        let max = chitchat_proto::peer::MAX_HISTORY;
        Ok(self.store.lan_history(id, from, max, max_bytes)?)
    }

    /// The messages of a relay-less channel that this device did not take yet (a member's
    /// history repeats what was read: dropped here, before decryption, which would fail on a
    /// past generation's deleted keys).
    pub fn lan_unkept(
        &self,
        id: &ChannelId,
        posts: Vec<ChannelPost>,
    ) -> Result<Vec<ChannelPost>, EngineError> {
        Ok(self.store.lan_unkept(id, posts)?)
    }

    /// Outbox items of relay-less channels, oldest first: they are published by gossip, not
    /// posted to a relay.
    pub fn lan_outbox(&self) -> Result<Vec<(u64, OutboxItem)>, EngineError> {
        let lan = self.relayless_channels();
        if lan.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.store.outbox(super::OUTBOX_BATCH, |i| lan.contains(&i.channel))?)
    }

    /// A relay-less channel's outbox item sealed for gossip now (the epoch its stored message
    /// was sent in), or `None` if it is not stored (a typing notice, stale by now).
    pub fn lan_envelope(
        &self,
        item: &OutboxItem,
        now: Timestamp,
    ) -> Result<Option<chitchat_proto::gossip::GossipEnvelope>, EngineError> {
        let Some(stored) = self.store.message(&item.channel, &item.id)? else { return Ok(None) };
        Ok(Some(chitchat_proto::gossip::GossipEnvelope::seal(
            &self.key,
            item.channel,
            stored.epoch,
            item.message.clone(),
            now,
        )))
    }

    /// Drops an outbox item that will not go (an unstored notice no one published in time).
    pub fn drop_outbox_item(&mut self, outbox_id: u64) -> Result<(), EngineError> {
        let mut b = Batch::default();
        b.outbox(outbox_id, None);
        Ok(self.store.commit_lazy(b)?)
    }

    /// Records that a relay-less channel's message went out by gossip: its outbox item goes,
    /// and it shows `gossiped` (there is no relay to store it).
    pub fn lan_published(&mut self, outbox_id: u64, item: &OutboxItem) -> Result<(), EngineError> {
        let mut b = Batch::default();
        b.outbox(outbox_id, None);
        b.status(item.channel, item.id, MessageStatus::Gossiped);
        self.store.commit(b)?;
        self.emit(Event::Gossiped { channel: item.channel.to_string(), id: id_string(&item.id) });
        Ok(())
    }
}

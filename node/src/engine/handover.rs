//! A channel's history handed to a new device of the user: MLS gives a member no key of the
//! epochs before it joined, so another device of the user, which read them, passes on what it
//! stored, in packs it signs ([`chitchat_proto::pack`]), each sealed to the new device alone
//! ([`InboxPayload::History`]). The new device takes a pack only from a device of its own user,
//! checks its root, and stores its messages as any other (once each).

use chitchat_proto::codec::{Bytes, Canonical as _};
use chitchat_proto::inbox::{self, SealedEnvelope};
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::pack::{MAX_PACK_ENVELOPES, Pack};
use chitchat_proto::wire::{HistoryMessage, InboxPayload};
use chitchat_proto::{DeviceId, Timestamp, codec};

use super::{Engine, EngineError, Event, Need, Step};
use crate::store::{Batch, MessageStatus, StoredMessage};

/// The most messages of a channel handed to a new device (the latest ones).
pub(crate) const HANDOVER_MESSAGES: usize = 5_000;
/// Bytes of message encodings in one pack, at most: a sealed inbox payload holds 256 KiB.
const PACK_BYTES: usize = 192 * 1024;

impl Engine {
    /// The latest [`HANDOVER_MESSAGES`] messages of `channel` this device stored, in packs
    /// signed by this device, each sealed to `device` (a device of this user, whose record is
    /// known). Messages given up (`failed`) reached no one and are left out.
    pub fn history_for(
        &self,
        channel: &ChannelId,
        device: DeviceId,
    ) -> Result<Vec<SealedEnvelope>, EngineError> {
        let dir = self
            .dirs
            .get(&device)
            .ok_or_else(|| EngineError::Invalid(format!("no record of {device}")))?;
        let messages = self.store.messages(channel, HANDOVER_MESSAGES)?;
        let mut packs: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut bytes = 0;
        for m in messages.into_iter().filter(|m| m.status != MessageStatus::Failed) {
            let entry = codec::encode(&HistoryMessage {
                id: m.id,
                hlc: m.hlc,
                epoch: m.epoch,
                payload: Bytes(m.payload),
            });
            if entry.len() > PACK_BYTES {
                continue; // cannot be: a message is at most the inbox payload's size
            }
            match packs.last_mut() {
                Some(p) if bytes + entry.len() <= PACK_BYTES && p.len() < MAX_PACK_ENVELOPES => {
                    bytes += entry.len();
                    p.push(entry);
                }
                _ => {
                    bytes = entry.len();
                    packs.push(vec![entry]);
                }
            }
        }
        let mut out = Vec::with_capacity(packs.len());
        let mut first = 0u64;
        for envelopes in packs {
            let n = envelopes.len() as u64;
            let pack = Pack::seal(&self.key, *channel, first, envelopes)
                .map_err(|e| EngineError::Invalid(format!("history pack: {e}")))?;
            first += n;
            let payload = InboxPayload::History(pack).to_bytes();
            let sealed = inbox::seal(&mut rand::rng(), device, &dir.body.inbox_key, &payload)
                .map_err(|e| EngineError::Invalid(format!("seal: {e}")))?;
            out.push(sealed);
        }
        Ok(out)
    }

    /// Whether `device` is another device of this user: its record verifies, sponsored with
    /// this device's address (the relay sponsors a name only for devices linked with one under
    /// it). `None`: its record is not known here yet.
    fn of_this_user(&self, device: DeviceId, now: Timestamp) -> Option<bool> {
        let account = self.account.as_ref()?;
        if device == account.dir.device() {
            return Some(false);
        }
        let dir = self.dirs.get(&device)?;
        let address = account.address();
        Some(dir.verify(&self.trust(), now).is_ok_and(|a| a.contains(&address)))
    }

    /// Takes a history pack: from a device of this user, with a root that holds, for a channel
    /// this device is in. Its messages are stored once each, as the device that sent them
    /// stored them (this user's own as sent).
    pub(super) fn receive_history(
        &mut self,
        pack: Pack,
        now: Timestamp,
        b: &mut Batch,
        events: &mut Vec<Event>,
    ) -> Step {
        let channel = pack.root.body.channel;
        let signer = DeviceId(pack.root.body.signer);
        if let Err(e) = pack.verify() {
            tracing::warn!(%channel, %signer, error = %e, "a history pack that does not hold; dropped");
            self.dropped.invalid += 1;
            return Step::Dropped;
        }
        match self.of_this_user(signer, now) {
            Some(true) => {}
            Some(false) => {
                tracing::warn!(%channel, %signer, "history from a device of another user; dropped");
                self.dropped.invalid += 1;
                return Step::Dropped;
            }
            None if self.account.is_none() => return Step::Dropped,
            None => return Step::Need(Need { devices: vec![signer], relays: vec![] }),
        }
        let Some(held) = self.channels.get(&channel).filter(|h| h.channel.is_some()) else {
            tracing::warn!(%channel, "history of a channel this device is not in; dropped");
            return Step::Dropped;
        };
        let mime = held.record.mime.clone();
        // Whether each sender is this user's: asked once per sender of the pack, not of every
        // record known here.
        let mut own: std::collections::BTreeMap<DeviceId, bool> =
            std::collections::BTreeMap::from([(self.device(), true)]);
        for envelope in &pack.envelopes {
            let Ok(m) = HistoryMessage::from_bytes(&envelope.0) else {
                self.dropped.invalid += 1;
                continue;
            };
            let mine = *own
                .entry(m.id.sender)
                .or_insert_with(|| self.of_this_user(m.id.sender, now) == Some(true));
            let status = if mine { MessageStatus::Sent } else { MessageStatus::Received };
            let stored = StoredMessage {
                id: m.id,
                hlc: m.hlc,
                epoch: m.epoch,
                payload: m.payload.0,
                status,
                at: now,
            };
            let message = crate::view::MessageView::new(&stored, &mime, |d| self.name_of(d));
            events
                .push(Event::Message { channel: channel.to_string(), message: Box::new(message) });
            b.message(channel, stored);
        }
        Step::Done
    }
}

//! Gossip: what the members of a channel (and the relays that serve it) pass to each other on
//! the channel's topic, and the rules every peer applies before it forwards anything.
//!
//! A gossiped message is the channel's MLS PrivateMessage inside a [`GossipEnvelope`], signed
//! by the sending device under [`Label::Envelope`] (the outer signature). A peer checks that
//! signature, and that the sender is a member of the channel at the envelope's epoch, **before**
//! it forwards the envelope, so a non-member's traffic stops at the first honest peer: no one
//! needs to decrypt anything to drop spam. What a peer cannot judge yet (an epoch it has not
//! reached) it neither forwards nor holds against the sender ([`Verdict::Ignore`]); what is
//! wrong whatever the peer knows (a bad signature, a non-member, another channel's topic, a
//! size past the limit) is [`Verdict::Reject`]ed, and gossipsub's peer scoring counts it
//! against the peer that sent it.
//!
//! The topic of a channel is derived from its id ([`topic`]): a peer that sees the topic learns
//! nothing of the channel it belongs to, unless it already knows the channel's id.

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::codec::{Canonical, encode};
use crate::identity::DeviceId;
use crate::keys::{Label, SecretKey, Signature};
use crate::ordering::{ChannelId, EpochReport};
use crate::wire::MAX_INBOX_PAYLOAD_LEN;

/// The largest MLS message one envelope carries (the same as a post through the relay).
pub const MAX_GOSSIP_MESSAGE_LEN: usize = MAX_INBOX_PAYLOAD_LEN;
/// How far an envelope's `sent` may lie in the future, in milliseconds.
pub const MAX_GOSSIP_SKEW_MS: u64 = crate::MAX_CLOCK_SKEW_MS;
/// How old an envelope may be and still be forwarded, in milliseconds: older ones are history,
/// which goes through inboxes and packs, not gossip (and an old envelope replayed by a peer
/// goes no further than that peer).
pub const MAX_GOSSIP_AGE_MS: u64 = 10 * 60 * 1000;

/// The gossipsub topic of `channel`: `chitchat/1/` and 32 hex digits of a BLAKE3 key derived
/// from the channel id.
pub fn topic(channel: &ChannelId) -> String {
    let mut h = blake3::Hasher::new_derive_key("chitchat/v1/gossip-topic");
    h.update(&channel.0);
    format!("chitchat/1/{}", crate::keys::hex_string(&h.finalize().as_bytes()[..16]))
}

/// The gossipsub topic of a channel's epoch reports (members' [`EpochReport`]s, for fork
/// detection): its messages' topic with `/reports`.
pub fn report_topic(channel: &ChannelId) -> String {
    format!("{}{REPORTS_SUFFIX}", topic(channel))
}

/// What ends a report topic's name.
pub const REPORTS_SUFFIX: &str = "/reports";

/// Judges a gossiped epoch report (the encoding of an [`EpochReport`]) that came on the topic
/// `topic_name`, as [`GossipEnvelope::judge`] judges an envelope: it must decode, be of the
/// topic's channel, carry a valid signature of its device, and that device must be a member of
/// the channel at the reported epoch (`is_member`). Returns the report when it is accepted.
pub fn judge_report(
    bytes: &[u8],
    topic_name: &str,
    is_member: impl FnOnce(&DeviceId, u64) -> Option<bool>,
) -> (Verdict, Option<EpochReport>) {
    let report = match check_report(bytes, topic_name) {
        Ok(report) => report,
        Err(e) => return (Verdict::Reject(e), None),
    };
    match Verdict::of_membership(is_member(&report.body.device, report.body.epoch)) {
        Verdict::Accept => (Verdict::Accept, Some(report)),
        other => (other, None),
    }
}

/// Every check of [`judge_report`] but the membership, which a peer that must look it up
/// elsewhere (a relay, in its orderer) does after: the report, decoded, of the topic's channel,
/// signed by its device.
pub fn check_report(bytes: &[u8], topic_name: &str) -> Result<EpochReport, GossipError> {
    let report = EpochReport::from_bytes(bytes).map_err(|_| GossipError::Malformed)?;
    if report_topic(&report.body.channel) != topic_name {
        return Err(GossipError::WrongTopic);
    }
    report.verify().map_err(|_| GossipError::BadSignature)?;
    Ok(report)
}

/// The content id of a gossiped message's bytes: BLAKE3 of them (gossipsub's message id, so
/// that one envelope reaching a peer by two paths is one message; what [`GossipEnvelope::id`]
/// gives for the envelope they encode).
pub fn message_id(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// What the sender signs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct GossipBody {
    /// The channel.
    pub channel: ChannelId,
    /// The epoch the message is encrypted for.
    pub epoch: u64,
    /// The sending device.
    pub sender: DeviceId,
    /// When it was sent (the sender's clock).
    pub sent: Timestamp,
    /// The MLS PrivateMessage, at most [`MAX_GOSSIP_MESSAGE_LEN`] bytes.
    #[serde(with = "serde_bytes")]
    pub message: Vec<u8>,
}

impl std::fmt::Debug for GossipBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipBody")
            .field("channel", &self.channel)
            .field("epoch", &self.epoch)
            .field("sender", &self.sender)
            .field("sent", &self.sent)
            .field("len", &self.message.len())
            .finish()
    }
}

/// A gossiped message: the body and its sender's outer signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct GossipEnvelope {
    /// What is signed.
    pub body: GossipBody,
    /// The sender's signature under [`Label::Envelope`].
    pub signature: Signature,
}

impl Canonical for GossipEnvelope {
    const MAX_LEN: usize = MAX_GOSSIP_MESSAGE_LEN + 256;
}

/// Why an envelope is refused for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    /// The outer signature does not verify for the sender.
    #[error("bad outer signature")]
    BadSignature,
    /// The envelope came on another channel's topic.
    #[error("the envelope is not for this topic")]
    WrongTopic,
    /// The sender is not a member of the channel at the envelope's epoch.
    #[error("the sender is not a member of the channel at that epoch")]
    NotMember,
    /// The message is larger than [`MAX_GOSSIP_MESSAGE_LEN`].
    #[error("the message is too large")]
    TooLarge,
    /// `sent` is further in the future than [`MAX_GOSSIP_SKEW_MS`].
    #[error("sent in the future")]
    FromTheFuture,
    /// The bytes are not an envelope (found by the peer's decoder, before [`GossipEnvelope::judge`]).
    #[error("not an envelope")]
    Malformed,
}

/// Why an envelope is neither forwarded nor held against its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unjudged {
    /// The checking peer does not know the channel's members at that epoch (it has not
    /// reached it, or the epoch's members are forgotten).
    UnknownEpoch,
    /// Older than [`MAX_GOSSIP_AGE_MS`].
    TooOld,
}

/// What a peer does with an envelope (gossipsub's acceptance, with the reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it, and forward it.
    Accept,
    /// Drop it, without penalty.
    Ignore(Unjudged),
    /// Drop it, and count it against the peer that sent it.
    Reject(GossipError),
}

impl GossipEnvelope {
    /// Seals `message` of `channel` at `epoch`, from the device of `key`.
    pub fn seal(
        key: &SecretKey,
        channel: ChannelId,
        epoch: u64,
        message: Vec<u8>,
        sent: Timestamp,
    ) -> Self {
        let body = GossipBody { channel, epoch, sender: DeviceId(key.public()), sent, message };
        let signature = key.sign(Label::Envelope, &encode(&body));
        Self { body, signature }
    }

    /// Its content id: [`message_id`] of its encoding.
    pub fn id(&self) -> [u8; 32] {
        message_id(&encode(self))
    }

    /// Judges an envelope that arrived on `topic`, at `now`. `is_member` says whether a device
    /// is a member of the channel at an epoch, or `None` if the peer does not know that
    /// epoch's members.
    ///
    /// The cheap checks come first and the signature last but one: a flood of envelopes for a
    /// wrong topic, too large, or too old costs no signature check.
    pub fn judge(
        &self,
        topic_name: &str,
        now: Timestamp,
        is_member: impl FnOnce(&DeviceId, u64) -> Option<bool>,
    ) -> Verdict {
        let b = &self.body;
        if topic(&b.channel) != topic_name {
            return Verdict::Reject(GossipError::WrongTopic);
        }
        if b.message.len() > MAX_GOSSIP_MESSAGE_LEN {
            return Verdict::Reject(GossipError::TooLarge);
        }
        if b.sent.0 > now.0.saturating_add(MAX_GOSSIP_SKEW_MS) {
            return Verdict::Reject(GossipError::FromTheFuture);
        }
        if b.sent.0.saturating_add(MAX_GOSSIP_AGE_MS) < now.0 {
            return Verdict::Ignore(Unjudged::TooOld);
        }
        if b.sender.0.verify(Label::Envelope, &encode(b), &self.signature).is_err() {
            return Verdict::Reject(GossipError::BadSignature);
        }
        Verdict::of_membership(is_member(&b.sender, b.epoch))
    }
}

impl Verdict {
    /// The verdict on an envelope that passed every other check, by whether its sender is a
    /// member at its epoch (`None`: the peer does not know that epoch's members).
    pub fn of_membership(member: Option<bool>) -> Self {
        match member {
            Some(true) => Self::Accept,
            Some(false) => Self::Reject(GossipError::NotMember),
            None => Self::Ignore(Unjudged::UnknownEpoch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member's report on its channel's report topic is taken; a report on another topic,
    /// forged, of a non-member, or garbage is rejected; of an epoch whose members are unknown,
    /// ignored.
    #[test]
    fn reports_are_judged_like_envelopes() {
        use crate::ordering::{EpochReport, EpochReportBody};
        let key = SecretKey::from_seed([1; 32]);
        let channel = ChannelId([7; 32]);
        let body = EpochReportBody {
            channel,
            epoch: 4,
            digest: [9; 32],
            cert: None,
            device: DeviceId(key.public()),
        };
        let report = EpochReport::sign(&key, body.clone());
        let bytes = encode(&report);
        let t = report_topic(&channel);
        assert_ne!(t, topic(&channel), "reports have a topic of their own");
        let member = |_: &DeviceId, _: u64| Some(true);
        assert_eq!(judge_report(&bytes, &t, member), (Verdict::Accept, Some(report.clone())));
        let other = report_topic(&ChannelId([8; 32]));
        assert_eq!(
            judge_report(&bytes, &other, member).0,
            Verdict::Reject(GossipError::WrongTopic)
        );
        assert_eq!(
            judge_report(&bytes, &topic(&channel), member).0,
            Verdict::Reject(GossipError::WrongTopic),
            "not on the messages' topic"
        );
        let forged = EpochReport { body: EpochReportBody { digest: [8; 32], ..body }, ..report };
        assert_eq!(
            judge_report(&encode(&forged), &t, member).0,
            Verdict::Reject(GossipError::BadSignature)
        );
        let stranger = |_: &DeviceId, _: u64| Some(false);
        assert_eq!(judge_report(&bytes, &t, stranger).0, Verdict::Reject(GossipError::NotMember));
        let unknown = |_: &DeviceId, _: u64| None;
        assert_eq!(judge_report(&bytes, &t, unknown).0, Verdict::Ignore(Unjudged::UnknownEpoch));
        assert!(matches!(judge_report(&[1, 2, 3], &t, member).0, Verdict::Reject(_)));
    }

    const NOW: Timestamp = Timestamp(1_000_000_000);

    fn channel() -> ChannelId {
        ChannelId([4; 32])
    }

    fn alice() -> SecretKey {
        SecretKey::from_seed([1; 32])
    }

    /// Alice is a member at epochs 3 and 4; epoch 5 is not known yet.
    fn members(device: &DeviceId, epoch: u64) -> Option<bool> {
        match epoch {
            3 | 4 => Some(*device == DeviceId(alice().public())),
            _ => None,
        }
    }

    fn sealed(epoch: u64, sent: Timestamp) -> GossipEnvelope {
        GossipEnvelope::seal(&alice(), channel(), epoch, b"ciphertext".to_vec(), sent)
    }

    #[test]
    fn a_members_envelope_is_accepted_and_survives_encoding() {
        let e = sealed(4, NOW);
        let bytes = encode(&e);
        let back = GossipEnvelope::from_bytes(&bytes).expect("decodes");
        assert_eq!(back, e);
        assert_eq!(back.judge(&topic(&channel()), NOW, members), Verdict::Accept);
        assert_eq!(back.id(), e.id());
    }

    /// Every rule, broken on purpose.
    #[test]
    fn each_rule_refuses_what_breaks_it() {
        let t = topic(&channel());
        // Another channel's topic: cross-posting.
        let other = topic(&ChannelId([5; 32]));
        assert_eq!(
            sealed(4, NOW).judge(&other, NOW, members),
            Verdict::Reject(GossipError::WrongTopic)
        );
        // A non-member (Mallory signs her own envelope).
        let mallory = SecretKey::from_seed([6; 32]);
        let m = GossipEnvelope::seal(&mallory, channel(), 4, b"spam".to_vec(), NOW);
        assert_eq!(m.judge(&t, NOW, members), Verdict::Reject(GossipError::NotMember));
        // Mallory claims to be Alice: the signature does not verify.
        let mut posing = m.clone();
        posing.body.sender = DeviceId(alice().public());
        assert_eq!(posing.judge(&t, NOW, members), Verdict::Reject(GossipError::BadSignature));
        // A member's envelope altered in flight (its message, its epoch).
        let mut altered = sealed(4, NOW);
        altered.body.message.push(0);
        assert_eq!(altered.judge(&t, NOW, members), Verdict::Reject(GossipError::BadSignature));
        let mut moved = sealed(4, NOW);
        moved.body.epoch = 3;
        assert_eq!(moved.judge(&t, NOW, members), Verdict::Reject(GossipError::BadSignature));
        // Too large, even signed by a member.
        let big =
            GossipEnvelope::seal(&alice(), channel(), 4, vec![0; MAX_GOSSIP_MESSAGE_LEN + 1], NOW);
        assert_eq!(big.judge(&t, NOW, members), Verdict::Reject(GossipError::TooLarge));
        // From the future, past the skew allowed.
        let future = sealed(4, NOW.plus_ms(MAX_GOSSIP_SKEW_MS + 1));
        assert_eq!(future.judge(&t, NOW, members), Verdict::Reject(GossipError::FromTheFuture));
        assert_eq!(
            sealed(4, NOW.plus_ms(MAX_GOSSIP_SKEW_MS)).judge(&t, NOW, members),
            Verdict::Accept
        );
    }

    /// What a peer cannot judge is dropped without penalty: an epoch it has not reached, an
    /// envelope too old to forward (a replay).
    #[test]
    fn what_cannot_be_judged_is_ignored() {
        let t = topic(&channel());
        assert_eq!(sealed(5, NOW).judge(&t, NOW, members), Verdict::Ignore(Unjudged::UnknownEpoch));
        let old = Timestamp(NOW.0 - MAX_GOSSIP_AGE_MS - 1);
        assert_eq!(sealed(4, old).judge(&t, NOW, members), Verdict::Ignore(Unjudged::TooOld));
    }

    /// The topic names no channel: it is not the id, and two channels never share one.
    #[test]
    fn topics_hide_the_channel_id() {
        let t = topic(&channel());
        assert!(t.starts_with("chitchat/1/") && t.len() == "chitchat/1/".len() + 32, "{t}");
        assert!(!t.contains(&"04".repeat(16)));
        assert_ne!(t, topic(&ChannelId([5; 32])));
        assert_eq!(t, topic(&channel()), "stable");
    }
}

//! What the tables hold. Every value is a postcard record decoded strictly: a record that does
//! not decode is reported as corruption, never unwrapped.

use chitchat_proto::codec::{Bytes, decode, encode};
use chitchat_proto::inbox::SealedEnvelope;
use chitchat_proto::wire::{Envelope, HistoryMark};
use chitchat_proto::{DeviceId, Dir, Timestamp};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::StoreError;

/// The largest record read back from disk.
const MAX_RECORD_LEN: usize = 2 * 1024 * 1024;

/// An invite token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// When it was issued.
    pub created: Timestamp,
    /// When it stops working.
    pub expires: Timestamp,
    /// The device that used it, once used.
    pub used_by: Option<DeviceId>,
}

/// A registered device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The name it registered under.
    pub local_name: String,
    /// Its latest identity record.
    pub dir: Dir,
    /// When it registered.
    pub registered: Timestamp,
}

/// A link slot (`link-slots-0`): where a user's device and its new device meet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSlotRecord {
    /// The device that opened it.
    pub offerer: DeviceId,
    /// When it closes.
    pub expires: Timestamp,
    /// The new device's hello, once it came (the first one only).
    pub hello: Option<chitchat_proto::link::LinkHello>,
    /// The offerer's answer, once it came.
    pub answer: Option<chitchat_proto::link::LinkAnswer>,
}

/// A revoked device (`revoked-0`): what it was, and the revocation the relay took.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedRecord {
    /// The name it was registered under.
    pub local_name: String,
    /// Its last record.
    pub dir: Dir,
    /// When it had registered.
    pub registered: Timestamp,
    /// The revocation, with the signatures that made the quorum.
    pub revocation: chitchat_proto::identity::Revocation,
    /// When the relay took it.
    pub at: Timestamp,
}

/// Signatures gathered for a revocation that has no quorum yet (`revoking-0`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRevocation {
    /// The revocation with the devices' signatures so far (no recovery signature: with one,
    /// a single device's signature is enough, so it never waits).
    pub revocation: chitchat_proto::identity::Revocation,
    /// When each signature came; a signature older than a day no longer counts.
    pub signed_at: Vec<(DeviceId, Timestamp)>,
}

/// What a device says of itself beside its record (`device-info-0`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The name it gave itself.
    pub name: String,
    /// When it last spoke to the relay (to the minute).
    pub last_seen: Option<Timestamp>,
}

/// A file's blob pinned here (`files-0`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePin {
    /// The user whose device pinned it (its quota counts it).
    pub user: String,
    /// The device.
    pub device: [u8; 32],
    /// The channel it was sent in.
    pub channel: [u8; 32],
    /// The blob's length.
    pub len: u64,
    /// When it was pinned.
    pub pinned: Timestamp,
    /// When it goes.
    pub expires: Timestamp,
}

/// Per-device counters, kept in step with the inbox and KeyPackage tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Id of the next KeyPackage stored.
    pub next_key_package: u64,
    /// Id of the next inbox item (ids only grow, so cursors stay valid).
    pub next_inbox: u64,
    /// Items in the inbox.
    pub inbox_items: u64,
    /// Bytes in the inbox.
    pub inbox_bytes: u64,
    /// Unclaimed KeyPackages.
    pub key_packages: u64,
}

/// An uploaded KeyPackage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKeyPackage {
    /// When it expires.
    pub not_after: Timestamp,
    /// Its TLS encoding.
    pub bytes: Bytes,
}

/// An inbox item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredItem {
    /// When it was stored (for retention).
    pub stored_at: Timestamp,
    /// The authenticated device that sent it (for per-sender quotas).
    pub sender: DeviceId,
    /// What it carries.
    pub envelope: Envelope,
    /// For a post or commit, its place in the channel's history (see
    /// [`chitchat_proto::wire::InboxItem::history`]).
    pub history: Option<HistoryMark>,
}

impl StoredItem {
    /// Decodes an inbox record of this version or of storage version 3 (which had no
    /// history mark).
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        decode_record(bytes, "inbox").or_else(|_| {
            let v3: StoredItemV3 = decode_record(bytes, "inbox")?;
            Ok(Self {
                stored_at: v3.stored_at,
                sender: v3.sender,
                envelope: v3.envelope,
                history: None,
            })
        })
    }
}

/// An inbox item of storage version 3.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredItemV3 {
    pub stored_at: Timestamp,
    pub sender: DeviceId,
    pub envelope: Envelope,
}

/// An entry of a channel's history: a post or commit as it was fanned out here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredHistory {
    /// When it was stored (for retention).
    pub stored_at: Timestamp,
    /// The post or commit: the canonical encoding of its [`Envelope`], as it is served.
    pub envelope: Bytes,
}

/// Where a channel's history stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryHead {
    /// The position the next entry takes.
    pub next: u64,
    /// The oldest position kept.
    pub first: u64,
    /// The bytes of the entries kept.
    pub bytes: u64,
}

/// A payload waiting in the queue for another relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedForward {
    /// When it was queued (for retention).
    pub queued_at: Timestamp,
    /// The authenticated device that sent it.
    pub sender: DeviceId,
    /// A payload sealed to one device of that relay, or a channel post for its members there.
    pub envelope: Envelope,
}

/// The counters of the queue for one relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounters {
    /// The number of the next payload queued (numbers only grow: they are the forwarding ids).
    pub next_seq: u64,
    /// Payloads queued.
    pub items: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// An inbox item of storage version 1, read once by the migration to version 2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredItemV1 {
    pub stored_at: Timestamp,
    pub sender: DeviceId,
    pub envelope: SealedEnvelope,
}

impl From<StoredItemV1> for StoredItem {
    fn from(v1: StoredItemV1) -> Self {
        Self {
            stored_at: v1.stored_at,
            sender: v1.sender,
            envelope: Envelope::Sealed(v1.envelope),
            history: None,
        }
    }
}

pub(crate) fn decode_record<T: Serialize + DeserializeOwned>(
    bytes: &[u8],
    table: &'static str,
) -> Result<T, StoreError> {
    decode(bytes, MAX_RECORD_LEN).map_err(|_| StoreError::Corrupt { table })
}

pub(crate) fn encode_record<T: Serialize>(value: &T) -> Vec<u8> {
    encode(value)
}

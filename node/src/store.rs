//! The node's durable state, in one redb file (`node.redb`).
//!
//! Everything a node knows is here: its keys, its account at its relay, the identity records
//! it has seen, its channels (the `ChannelState` next to openmls' own storage), the messages,
//! the outbox and the commit intents. Tables carry a version in their name (`messages-0`); the
//! storage version in `meta-0` is checked on open.
//!
//! Writes are made by the engine as one [`Batch`] per operation, committed in **one** write
//! transaction with fsync: the MLS state, the channel state, the messages and the outbox of
//! one operation become durable together or not at all.
//!
//! openmls writes its state through many separate storage calls per operation, with no
//! transaction hook, so the engine keeps openmls' `MemoryStorage` as the working copy and
//! [`MlsMirror`] finds what changed since the last commit (a comparison with the last
//! persisted copy); the changes go into the operation's batch.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use chitchat_proto::channel::{ChannelMessage, ChannelState, MessageId};
use chitchat_proto::codec::{Bytes, decode, encode};
use chitchat_proto::hlc::Hlc;
use chitchat_proto::ordering::{ChannelId, EpochRecord, Equivocation, ForkKind};
use chitchat_proto::wire::{ChannelPost, OrderedCommit, SealedWelcomes};
use chitchat_proto::{DeviceId, Dir, PublicKey, RelayId, Timestamp};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The layout version of the database; bumped with every incompatible change.
pub const STORAGE_VERSION: u32 = 3;
/// Largest record accepted from disk.
const MAX_RECORD_LEN: usize = 64 * 1024 * 1024;

const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta-0");
const KEYS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("keys-0");
const MLS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("mls-0");
const CHANNELS: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("channels-0");
const DIRS: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("dirs-0");
/// Messages in display order: `(channel, epoch, hlc wall ms, hlc counter, sender, seq)`.
const MESSAGES: TableDefinition<'_, MessageKey, &[u8]> = TableDefinition::new("messages-0");
/// Where a message is, by id: `(seq, sender, channel)` to its `(epoch, wall, counter)`.
/// Keyed by sequence number first, so a short reference (`ab12cd34:0.7`) is one small range.
const MESSAGE_IDS: TableDefinition<'_, MessageRef, (u64, u64, u32)> =
    TableDefinition::new("message-ids-0");
const OUTBOX: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("outbox-1");
/// The outbox of storage version 1 (items sealed per recipient), migrated on open.
const OUTBOX_V1: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("outbox-0");
const INTENTS: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("intents-0");
/// How many messages each channel has stored (kept with every insert: counting is O(1)).
const MESSAGE_COUNTS: TableDefinition<'_, [u8; 32], u64> = TableDefinition::new("message-counts-0");
/// Channels whose messages may leave before their state is durable (see [`Batch::released`]).
const RELEASED: TableDefinition<'_, [u8; 32], ()> = TableDefinition::new("released-0");
/// Why each of this device's failed messages was given up, by message.
const FAILURES: TableDefinition<'_, MessageRef, &str> = TableDefinition::new("failures-0");
/// Other relays, as this node's relay vouched for them: host → key.
const RELAYS: TableDefinition<'_, &str, [u8; 32]> = TableDefinition::new("relays-0");
/// What this device recorded of each epoch it reached, for the last [`KEPT_EPOCHS`] epochs of
/// each channel: `(channel, epoch)` → [`EpochRecord`].
const EPOCHS: TableDefinition<'_, ([u8; 32], u64), &[u8]> = TableDefinition::new("epochs-0");
/// The members of each channel at each of its last [`KEPT_ROSTERS`] epochs this device
/// reached: `(channel, epoch)` → the member devices. Written with the channel state, read by
/// gossip validation without the engine ([`Rosters`]).
const ROSTERS: TableDefinition<'_, ([u8; 32], u64), &[u8]> = TableDefinition::new("rosters-0");
/// Orderers caught signing two commits for one epoch: key → the [`Equivocation`] proof.
const CONVICTED: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("convicted-0");
/// Forks found: `(channel, epoch, reporting device)` → [`ForkRecord`].
const FORKS: TableDefinition<'_, ForkKey, &[u8]> = TableDefinition::new("forks-0");
/// The certified commits of relay-less channels: `(channel, epoch built on)` → the
/// [`OrderedCommit`] with its certificate. The creator's device writes each one it orders before
/// the certificate leaves it, so that it never certifies two commits for one epoch; every member
/// writes those it takes. Read to answer members that missed commits.
const ORDERED: TableDefinition<'_, ([u8; 32], u64), &[u8]> = TableDefinition::new("ordered-0");
/// Epochs of a relay-less channel whose commits `ordered-0` keeps, at most (a member further
/// behind than that cannot catch up from peers: it is removed and added again).
pub const KEPT_COMMITS: u64 = 10_000;
/// Relay-less channels this device moves onto relays: channel → `(epoch, PublicState)`, the
/// channel's public state before the move, written before the move is staged. With the move's
/// commit (`ordered-0` at that epoch) it is the evidence a relay opens the channel on
/// ([`chitchat_proto::wire::Request::OpenMoved`]).
const MOVED: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("moved-0");
/// The messages of the relay-less channels this device created, as members gossiped them,
/// for members that missed some: `(channel, position)` → the [`ChannelPost`]. The last
/// [`KEPT_LAN_HISTORY`] of each channel are kept.
const LAN_HISTORY: TableDefinition<'_, ([u8; 32], u64), &[u8]> =
    TableDefinition::new("lan-history-0");
/// Which MLS messages `lan-history-0` holds: `(channel, BLAKE3 of the message)` → position.
const LAN_HISTORY_IDS: TableDefinition<'_, ([u8; 32], [u8; 32]), u64> =
    TableDefinition::new("lan-history-ids-0");
/// Messages kept per relay-less channel for members that missed them.
pub const KEPT_LAN_HISTORY: u64 = 10_000;
/// `(channel, epoch, device)`.
type ForkKey = ([u8; 32], u64, [u8; 32]);

/// Epochs of each channel whose [`EpochRecord`] is kept.
pub const KEPT_EPOCHS: u64 = 256;
/// Epochs of each channel whose members are kept for gossip validation: as many as the epochs
/// whose messages a member can still read (the current one and four before it).
pub const KEPT_ROSTERS: u64 = 5;
/// Most forks kept (the first ones: a fork is reported once and stays until the user acts).
pub const MAX_FORKS: u64 = 1024;

/// A fork this device found: another member reported another commit or state for an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkRecord {
    /// The channel.
    pub channel: ChannelId,
    /// The epoch.
    pub epoch: u64,
    /// The member whose report differs.
    pub device: DeviceId,
    /// How.
    pub kind: ForkKind,
    /// When it was found.
    pub at: Timestamp,
}

type MessageKey = ([u8; 32], u64, u64, u32, [u8; 32], u64);

/// A message's key in `message-ids-0` and `failures-0`.
fn message_ref(channel: &ChannelId, id: &MessageId) -> MessageRef {
    (id.seq, *id.sender.as_bytes(), channel.0)
}

/// `(seq, sender, channel)`.
type MessageRef = (u64, [u8; 32], [u8; 32]);

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, or the file is locked by another process: a daemon already runs).
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    /// The database was written by another layout version.
    #[error("database has storage version {found}, this node reads version {STORAGE_VERSION}")]
    Version {
        /// The version found.
        found: u32,
    },
    /// A stored record does not decode.
    #[error("corrupt record in {table}")]
    Corrupt {
        /// The table holding it.
        table: &'static str,
    },
}

fn redb_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Storage(e.into())
}

fn record<T: Serialize + DeserializeOwned>(
    bytes: &[u8],
    table: &'static str,
) -> Result<T, StoreError> {
    decode(bytes, MAX_RECORD_LEN).map_err(|_| StoreError::Corrupt { table })
}

/// The node's relay, as its `.well-known` described it at registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// The HTTP URL it was found at.
    pub url: String,
    /// Its host name and key.
    pub id: RelayId,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Its libp2p addresses.
    pub addrs: Vec<String>,
}

/// The node's registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The home relay.
    pub relay: RelayInfo,
    /// `alice` of `alice@relay`.
    pub local_name: String,
    /// The device's current identity record (with the relay's sponsorship).
    pub dir: Dir,
}

impl Account {
    /// The user's address, `local_name@host`.
    pub fn address(&self) -> chitchat_proto::Address {
        chitchat_proto::Address { local: self.local_name.clone(), host: self.relay.id.host.clone() }
    }
}

/// A channel as the node keeps it, beside openmls' group state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRecord {
    /// The wrapper's state (sequence numbers, clock, seen ids, pending commit).
    pub state: ChannelState,
    /// Its name (also kept here: a channel this device left has no MLS group loaded).
    pub name: String,
    /// Its MIME type.
    pub mime: String,
    /// Whether the relay was sent the channel's public state (`OpenChannel`).
    pub opened: bool,
    /// Whether this device left or was removed; the history stays readable.
    pub left: bool,
    /// When the node created or joined it.
    pub joined: Timestamp,
}

/// Where a stored message stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageStatus {
    /// Ours, durable in the outbox, not yet accepted by the relay for every recipient.
    Sending,
    /// Ours, in every recipient's inbox.
    Sent,
    /// Someone else's.
    Received,
    /// Ours, given up: the relay refused it for good, or it was not delivered within
    /// `[send] give_up_after_days`; the reason is kept beside it.
    Failed,
    /// Ours, durable in the outbox, and gossiped to at least one peer of the channel; not yet
    /// accepted by the relay. (Only a message `Sending` becomes `Gossiped`.)
    Gossiped,
}

/// One application message of a channel, decrypted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Its id.
    pub id: MessageId,
    /// Its sender's clock.
    pub hlc: Hlc,
    /// The epoch it was sent in.
    pub epoch: u64,
    /// The plaintext payload (of the channel's MIME type).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Where it stands.
    pub status: MessageStatus,
    /// When this node stored it.
    pub at: Timestamp,
}

/// A message waiting to be posted to the relay, which fans it out to the channel's members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxItem {
    /// The channel.
    pub channel: ChannelId,
    /// The message's id.
    pub id: MessageId,
    /// The MLS PrivateMessage, exactly as first sent: a resend is the same message, which
    /// receivers drop as a duplicate if they had it.
    #[serde(with = "serde_bytes")]
    pub message: Vec<u8>,
    /// Delivery attempts so far.
    pub attempts: u32,
}

/// An outbox item of storage version 1, read once by the migration to version 2.
#[derive(Serialize, Deserialize)]
struct OutboxItemV1 {
    channel: ChannelId,
    id: MessageId,
    message: ChannelMessage,
    #[allow(dead_code)]
    recipients: Vec<DeviceId>,
    attempts: u32,
}

/// A membership change being ordered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentRecord {
    /// What to change.
    pub op: IntentOp,
    /// The commit staged for it, if one is waiting for the orderers.
    pub staged: Option<StagedRecord>,
    /// Rebuilds so far.
    pub attempts: u32,
}

/// What a membership change does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IntentOp {
    /// Add devices: their records and claimed KeyPackages.
    Add(Vec<(Dir, Bytes)>),
    /// Remove devices.
    Remove(Vec<DeviceId>),
    /// Set the relay set of a relay-less channel: its move onto relays.
    Relays(Vec<RelayId>),
}

/// A staged commit, as submitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedRecord {
    /// The epoch it is built on.
    pub epoch: u64,
    /// The commit (MLS PublicMessage).
    #[serde(with = "serde_bytes")]
    pub commit: Vec<u8>,
    /// The Welcome, sealed to each added device.
    pub welcome: Option<SealedWelcomes>,
    /// Devices that get the commit besides the members before it.
    pub fanout: Vec<DeviceId>,
}

/// One write of a [`Batch`].
#[derive(Debug)]
enum Op {
    Key(&'static str, Vec<u8>),
    Mls(Vec<u8>, Option<Vec<u8>>),
    Channel(ChannelId, ChannelRecord),
    Dir(Dir),
    Message(ChannelId, StoredMessage),
    Status(ChannelId, MessageId, MessageStatus),
    Failure(ChannelId, MessageId, String),
    Outbox(u64, Option<OutboxItem>),
    Intent(ChannelId, Option<IntentRecord>),
    Released(ChannelId, bool),
    Relay(RelayId),
    Epoch(ChannelId, u64, EpochRecord),
    Roster(ChannelId, Option<Roster>),
    Convicted(PublicKey, Equivocation),
    Fork(ForkRecord),
    Ordered(OrderedCommit),
    Moved(ChannelId, u64, chitchat_proto::channel::PublicState),
    LanKeep(ChannelPost),
}

/// The writes of one operation, committed together.
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    /// Whether it writes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// Stores a key or the account (`keys-0`).
    pub fn key(&mut self, name: &'static str, value: Vec<u8>) {
        self.ops.push(Op::Key(name, value));
    }
    /// Applies openmls storage changes.
    pub fn mls(&mut self, changes: Vec<(Vec<u8>, Option<Vec<u8>>)>) {
        self.ops.extend(changes.into_iter().map(|(k, v)| Op::Mls(k, v)));
    }
    /// Stores a channel.
    pub fn channel(&mut self, id: ChannelId, record: ChannelRecord) {
        self.ops.push(Op::Channel(id, record));
    }
    /// Remembers another relay's key (`relays-0`).
    pub fn relay(&mut self, relay: RelayId) {
        self.ops.push(Op::Relay(relay));
    }
    /// Stores an identity record.
    pub fn dir(&mut self, dir: Dir) {
        self.ops.push(Op::Dir(dir));
    }
    /// Stores a message (once: a message already stored is left as it is).
    pub fn message(&mut self, channel: ChannelId, message: StoredMessage) {
        self.ops.push(Op::Message(channel, message));
    }
    /// Changes a stored message's status.
    pub fn status(&mut self, channel: ChannelId, id: MessageId, status: MessageStatus) {
        self.ops.push(Op::Status(channel, id, status));
    }
    /// Records why one of this device's messages was given up.
    pub fn failure(&mut self, channel: ChannelId, id: MessageId, reason: String) {
        self.ops.push(Op::Failure(channel, id, reason));
    }
    /// Stores (`Some`) or deletes (`None`) an outbox item.
    pub fn outbox(&mut self, id: u64, item: Option<OutboxItem>) {
        self.ops.push(Op::Outbox(id, item));
    }
    /// Stores (`Some`) or deletes (`None`) a channel's intent.
    pub fn intent(&mut self, channel: ChannelId, intent: Option<IntentRecord>) {
        self.ops.push(Op::Intent(channel, intent));
    }
    /// Marks (`true`) or unmarks a channel whose messages may leave before the state that
    /// encrypted them is durable: on the next open, its sending ratchet must skip a generation
    /// before it sends again (`released-0`).
    pub fn released(&mut self, channel: ChannelId, released: bool) {
        self.ops.push(Op::Released(channel, released));
    }
    /// Records what this device reached at `epoch` (`epochs-0`); records older than
    /// [`KEPT_EPOCHS`] before it are deleted.
    pub fn epoch(&mut self, channel: ChannelId, epoch: u64, record: EpochRecord) {
        self.ops.push(Op::Epoch(channel, epoch, record));
    }
    /// Records the channel's members at `epoch` (`rosters-0`, forgetting epochs more than
    /// [`KEPT_ROSTERS`] before it), or with `None` forgets all of the channel's (this device
    /// is no longer in it).
    pub fn roster(&mut self, channel: ChannelId, roster: Option<Roster>) {
        self.ops.push(Op::Roster(channel, roster));
    }
    /// Keeps the proof that convicts `signer` (`convicted-0`), unless one is kept already.
    pub fn convicted(&mut self, signer: PublicKey, proof: Equivocation) {
        self.ops.push(Op::Convicted(signer, proof));
    }
    /// Keeps a fork found (`forks-0`), up to [`MAX_FORKS`].
    pub fn fork(&mut self, fork: ForkRecord) {
        self.ops.push(Op::Fork(fork));
    }
    /// Keeps a message of a relay-less channel this device created (`lan-history-0`), unless
    /// it is kept already; past [`KEPT_LAN_HISTORY`], the channel's oldest goes.
    pub fn lan_keep(&mut self, post: ChannelPost) {
        self.ops.push(Op::LanKeep(post));
    }
    /// Keeps a commit this device ordered (`ordered-0`), unless one for its epoch is kept.
    pub fn ordered(&mut self, commit: OrderedCommit) {
        self.ops.push(Op::Ordered(commit));
    }

    /// Records a relay-less channel's public state at `epoch`, before its move onto relays.
    pub fn moved(
        &mut self,
        channel: ChannelId,
        epoch: u64,
        before: chitchat_proto::channel::PublicState,
    ) {
        self.ops.push(Op::Moved(channel, epoch, before));
    }
}

/// The node's database.
#[derive(Debug)]
pub struct Store {
    db: Arc<Database>,
}

/// A channel's members at an epoch: `(epoch, members)`.
pub type Roster = (u64, Vec<DeviceId>);

/// Reads the channels' members (`rosters-0`) beside the engine: a read transaction waits for
/// no writer, so judging gossip never waits behind the engine's lock or its fsyncs.
#[derive(Clone, Debug)]
pub struct Rosters {
    db: Arc<Database>,
}

impl Rosters {
    /// Whether `device` may gossip in `channel` at `epoch`: `Some(false)` if it was no member
    /// at `epoch`; `Some(true)` if it was and still is (at the latest epoch this device
    /// reached); `None` if this device does not know that epoch's members (not reached yet,
    /// forgotten, or not in the channel) or `device` was removed since (a removed member keeps
    /// the old epoch's keys: its gossip is not forwarded; what it sent before its removal comes
    /// through the inbox, which the relay checked when it was posted).
    pub fn is_member(
        &self,
        channel: &ChannelId,
        device: &DeviceId,
        epoch: u64,
    ) -> Result<Option<bool>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(ROSTERS).map_err(redb_err)?;
        let Some(v) = t.get((channel.0, epoch)).map_err(redb_err)? else {
            return Ok(None);
        };
        let then: Vec<DeviceId> = record(v.value(), "rosters")?;
        if !then.contains(device) {
            return Ok(Some(false));
        }
        let Some(latest) =
            t.range((channel.0, epoch)..=(channel.0, u64::MAX)).map_err(redb_err)?.next_back()
        else {
            return Ok(None);
        };
        let now: Vec<DeviceId> = record(latest.map_err(redb_err)?.1.value(), "rosters")?;
        Ok(now.contains(device).then_some(true))
    }
}

fn message_key(channel: &ChannelId, m: &StoredMessage) -> MessageKey {
    (channel.0, m.epoch, m.hlc.wall_ms, m.hlc.counter, *m.id.sender.as_bytes(), m.id.seq)
}

impl Store {
    /// Opens (creating if needed) the database at `path`. Fails if another process has it open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Arc::new(Database::create(path).map_err(redb_err)?);
        restrict_file(path);
        let w = db.begin_write().map_err(redb_err)?;
        {
            let mut meta = w.open_table(META).map_err(redb_err)?;
            let found = match meta.get("version").map_err(redb_err)? {
                Some(v) => Some(record::<u32>(v.value(), "meta")?),
                None => None,
            };
            match found {
                Some(STORAGE_VERSION) => {}
                Some(old @ (1 | 2)) => {
                    if old == 1 {
                        migrate_outbox_v1(&w)?;
                        count_messages_v1(&w)?;
                    }
                    // Version 3 adds `released-0`, created below: nothing to move. (`failures-0`,
                    // also created below, needs no version: an absent reason reads as none.)
                    meta.insert("version", encode(&STORAGE_VERSION).as_slice())
                        .map_err(redb_err)?;
                }
                Some(found) => return Err(StoreError::Version { found }),
                None => {
                    meta.insert("version", encode(&STORAGE_VERSION).as_slice())
                        .map_err(redb_err)?;
                }
            }
            w.open_table(KEYS).map_err(redb_err)?;
            w.open_table(MLS).map_err(redb_err)?;
            w.open_table(CHANNELS).map_err(redb_err)?;
            w.open_table(DIRS).map_err(redb_err)?;
            w.open_table(MESSAGES).map_err(redb_err)?;
            w.open_table(MESSAGE_IDS).map_err(redb_err)?;
            w.open_table(OUTBOX).map_err(redb_err)?;
            w.open_table(INTENTS).map_err(redb_err)?;
            w.open_table(MESSAGE_COUNTS).map_err(redb_err)?;
            w.open_table(RELEASED).map_err(redb_err)?;
            w.open_table(FAILURES).map_err(redb_err)?;
            w.open_table(RELAYS).map_err(redb_err)?;
            w.open_table(EPOCHS).map_err(redb_err)?;
            w.open_table(ROSTERS).map_err(redb_err)?;
            w.open_table(CONVICTED).map_err(redb_err)?;
            w.open_table(FORKS).map_err(redb_err)?;
            w.open_table(ORDERED).map_err(redb_err)?;
            w.open_table(MOVED).map_err(redb_err)?;
            w.open_table(LAN_HISTORY).map_err(redb_err)?;
            w.open_table(LAN_HISTORY_IDS).map_err(redb_err)?;
        }
        w.commit().map_err(redb_err)?;
        Ok(Self { db })
    }

    /// A reader of the channels' members that works beside the engine.
    pub fn rosters(&self) -> Rosters {
        Rosters { db: self.db.clone() }
    }

    /// The epoch of each channel's latest roster.
    pub fn roster_epochs(&self) -> Result<BTreeMap<ChannelId, u64>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(ROSTERS).map_err(redb_err)?;
        let mut out = BTreeMap::new();
        for e in t.iter().map_err(redb_err)? {
            let (channel, epoch) = e.map_err(redb_err)?.0.value();
            out.insert(ChannelId(channel), epoch);
        }
        Ok(out)
    }

    /// Commits a batch in one fsync'd transaction.
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut w = self.db.begin_write().map_err(redb_err)?;
        w.set_durability(Durability::Immediate).map_err(redb_err)?;
        apply(&w, batch)?;
        w.commit().map_err(redb_err)
    }

    /// Commits a batch without waiting for the disk: it becomes durable with the next
    /// [`Store::commit`], and a crash before that loses it. Only for writes whose loss is
    /// harmless (an outbox item found delivered: losing that resends a message, which receivers
    /// drop by id).
    pub fn commit_lazy(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut w = self.db.begin_write().map_err(redb_err)?;
        w.set_durability(Durability::None).map_err(redb_err)?;
        apply(&w, batch)?;
        w.commit().map_err(redb_err)
    }

    /// A key or record of `keys-0`.
    pub fn key(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(KEYS).map_err(redb_err)?;
        Ok(t.get(name).map_err(redb_err)?.map(|v| v.value().to_vec()))
    }

    /// The registration, if any.
    pub fn account(&self) -> Result<Option<Account>, StoreError> {
        self.key("account")?.map(|v| record(&v, "keys")).transpose()
    }

    /// Every openmls storage entry.
    pub fn mls_entries(&self) -> Result<HashMap<Vec<u8>, Vec<u8>>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(MLS).map_err(redb_err)?;
        let mut out = HashMap::new();
        for e in t.iter().map_err(redb_err)? {
            let (k, v) = e.map_err(redb_err)?;
            out.insert(k.value().to_vec(), v.value().to_vec());
        }
        Ok(out)
    }

    /// Every channel.
    pub fn channels(&self) -> Result<Vec<ChannelRecord>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(CHANNELS).map_err(redb_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(redb_err)? {
            out.push(record(e.map_err(redb_err)?.1.value(), "channels")?);
        }
        Ok(out)
    }

    /// The other relays this node knows (vouched for by its relay).
    pub fn relays(&self) -> Result<Vec<RelayId>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(RELAYS).map_err(redb_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(redb_err)? {
            let (host, key) = e.map_err(redb_err)?;
            out.push(RelayId { host: host.value().to_owned(), key: PublicKey(key.value()) });
        }
        Ok(out)
    }

    /// Every cached identity record.
    pub fn dirs(&self) -> Result<Vec<Dir>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(DIRS).map_err(redb_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(redb_err)? {
            out.push(record(e.map_err(redb_err)?.1.value(), "dirs")?);
        }
        Ok(out)
    }

    /// A channel's messages in display order (epoch, clock, id): at most `limit`, the latest
    /// ones.
    pub fn messages(
        &self,
        channel: &ChannelId,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(MESSAGES).map_err(redb_err)?;
        let lo = (channel.0, 0, 0, 0, [0; 32], 0);
        let hi = (channel.0, u64::MAX, u64::MAX, u32::MAX, [0xff; 32], u64::MAX);
        let mut out = Vec::new();
        for e in t.range(lo..=hi).map_err(redb_err)?.rev().take(limit) {
            out.push(record(e.map_err(redb_err)?.1.value(), "messages")?);
        }
        out.reverse();
        Ok(out)
    }

    /// How many messages a channel holds.
    pub fn count_messages(&self, channel: &ChannelId) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(MESSAGE_COUNTS).map_err(redb_err)?;
        Ok(t.get(channel.0).map_err(redb_err)?.map_or(0, |v| v.value()))
    }

    /// One message by id.
    pub fn message(
        &self,
        channel: &ChannelId,
        id: &MessageId,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let ids = r.open_table(MESSAGE_IDS).map_err(redb_err)?;
        let Some(at) = ids.get(message_ref(channel, id)).map_err(redb_err)? else {
            return Ok(None);
        };
        let (epoch, wall, counter) = at.value();
        let t = r.open_table(MESSAGES).map_err(redb_err)?;
        let key = (channel.0, epoch, wall, counter, *id.sender.as_bytes(), id.seq);
        t.get(key).map_err(redb_err)?.map(|v| record(v.value(), "messages")).transpose()
    }

    /// Why one of this device's messages was given up, if it was.
    pub fn failure(
        &self,
        channel: &ChannelId,
        id: &MessageId,
    ) -> Result<Option<String>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(FAILURES).map_err(redb_err)?;
        Ok(t.get(message_ref(channel, id)).map_err(redb_err)?.map(|v| v.value().to_owned()))
    }

    /// Messages whose sender's id starts with `prefix` and whose sequence number is `seq`, in
    /// any channel: `(channel, id)`, at most `max`.
    pub fn find_messages(
        &self,
        prefix: &[u8],
        seq: u64,
        max: usize,
    ) -> Result<Vec<(ChannelId, MessageId)>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let ids = r.open_table(MESSAGE_IDS).map_err(redb_err)?;
        let mut lo = [0u8; 32];
        let mut hi = [0xffu8; 32];
        let n = prefix.len().min(32);
        lo[..n].copy_from_slice(&prefix[..n]);
        hi[..n].copy_from_slice(&prefix[..n]);
        let mut out = Vec::new();
        for e in ids.range((seq, lo, [0; 32])..=(seq, hi, [0xff; 32])).map_err(redb_err)? {
            let (k, _) = e.map_err(redb_err)?;
            let (_, sender, channel) = k.value();
            let sender = DeviceId::from_slice(&sender)
                .ok_or(StoreError::Corrupt { table: "message-ids" })?;
            out.push((ChannelId(channel), MessageId { sender, seq }));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Outbox items, oldest first, at most `max`.
    pub fn outbox(
        &self,
        max: usize,
        wanted: impl Fn(&OutboxItem) -> bool,
    ) -> Result<Vec<(u64, OutboxItem)>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(OUTBOX).map_err(redb_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(redb_err)? {
            let (k, v) = e.map_err(redb_err)?;
            let item: OutboxItem = record(v.value(), "outbox")?;
            if wanted(&item) {
                out.push((k.value(), item));
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Which of a relay-less channel's messages are not kept here (by their content ids).
    pub fn lan_unkept(
        &self,
        channel: &ChannelId,
        posts: Vec<ChannelPost>,
    ) -> Result<Vec<ChannelPost>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let ids = r.open_table(LAN_HISTORY_IDS).map_err(redb_err)?;
        let mut out = Vec::new();
        for post in posts {
            let id = chitchat_proto::gossip::message_id(&post.message);
            if ids.get((channel.0, id)).map_err(redb_err)?.is_none() {
                out.push(post);
            }
        }
        Ok(out)
    }

    /// Kept messages of a relay-less channel from position `from` on: at most `max`, and about
    /// `max_bytes` (at least one); with the position after the last one kept.
    pub fn lan_history(
        &self,
        channel: &ChannelId,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<(u64, ChannelPost)>, u64), StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(LAN_HISTORY).map_err(redb_err)?;
        let c = channel.0;
        let next = match t.range((c, 0)..=(c, u64::MAX)).map_err(redb_err)?.next_back() {
            Some(e) => e.map_err(redb_err)?.0.value().1.saturating_add(1),
            None => 0,
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in t.range((c, from)..=(c, u64::MAX)).map_err(redb_err)? {
            let (k, v) = e.map_err(redb_err)?;
            bytes += v.value().len();
            if out.len() >= max || (!out.is_empty() && bytes > max_bytes) {
                break;
            }
            out.push((k.value().1, record(v.value(), "lan-history")?));
        }
        Ok((out, next))
    }

    /// The commit kept for the channel's `epoch` (ordered by this device, or taken as a member),
    /// if any.
    pub fn ordered_at(
        &self,
        channel: &ChannelId,
        epoch: u64,
    ) -> Result<Option<OrderedCommit>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(ORDERED).map_err(redb_err)?;
        t.get((channel.0, epoch))
            .map_err(redb_err)?
            .map(|v| record(v.value(), "ordered"))
            .transpose()
    }

    /// The public state a relay-less channel had before this device moved it onto relays, with
    /// its epoch.
    pub fn moved(
        &self,
        channel: &ChannelId,
    ) -> Result<Option<(u64, chitchat_proto::channel::PublicState)>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(MOVED).map_err(redb_err)?;
        t.get(channel.0).map_err(redb_err)?.map(|v| record(v.value(), "moved")).transpose()
    }

    /// The commits kept for the channel from epoch `from` on, in order and without a gap, at
    /// most `max` of them and about `max_bytes` (at least one).
    pub fn ordered_from(
        &self,
        channel: &ChannelId,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<OrderedCommit>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(ORDERED).map_err(redb_err)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        // A run without gaps: a member keeps only the commits it took (none before it joined).
        // (`from` is a peer's: no arithmetic on it may overflow.)
        let mut expected = Some(from);
        for e in t.range((channel.0, from)..=(channel.0, u64::MAX)).map_err(redb_err)? {
            let (k, v) = e.map_err(redb_err)?;
            bytes += v.value().len();
            if Some(k.value().1) != expected
                || out.len() >= max
                || (!out.is_empty() && bytes > max_bytes)
            {
                break;
            }
            out.push(record(v.value(), "ordered")?);
            expected = k.value().1.checked_add(1);
        }
        Ok(out)
    }

    /// One outbox item.
    pub fn outbox_item(&self, id: u64) -> Result<Option<OutboxItem>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(OUTBOX).map_err(redb_err)?;
        t.get(id).map_err(redb_err)?.map(|v| record(v.value(), "outbox")).transpose()
    }

    /// The next free outbox id.
    pub fn next_outbox_id(&self) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(OUTBOX).map_err(redb_err)?;
        Ok(t.last().map_err(redb_err)?.map_or(0, |(k, _)| k.value() + 1))
    }

    /// A channel's intent.
    pub fn intent(&self, channel: &ChannelId) -> Result<Option<IntentRecord>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(INTENTS).map_err(redb_err)?;
        t.get(channel.0).map_err(redb_err)?.map(|v| record(v.value(), "intents")).transpose()
    }

    /// The channels marked by [`Batch::released`].
    pub fn released(&self) -> Result<Vec<ChannelId>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(RELEASED).map_err(redb_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(redb_err)? {
            out.push(ChannelId(e.map_err(redb_err)?.0.value()));
        }
        Ok(out)
    }

    /// Every intent.
    pub fn intents(&self) -> Result<Vec<(ChannelId, IntentRecord)>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(INTENTS).map_err(redb_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(redb_err)? {
            let (k, v) = e.map_err(redb_err)?;
            out.push((ChannelId(k.value()), record(v.value(), "intents")?));
        }
        Ok(out)
    }
}

impl Store {
    /// What this device recorded when it reached `epoch` of `channel`.
    pub fn epoch_record(
        &self,
        channel: &ChannelId,
        epoch: u64,
    ) -> Result<Option<EpochRecord>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(EPOCHS).map_err(redb_err)?;
        t.get((channel.0, epoch))
            .map_err(redb_err)?
            .map(|v| record(v.value(), "epochs"))
            .transpose()
    }

    /// The orderers convicted of equivocation, with their proofs.
    pub fn convicted(&self) -> Result<Vec<(PublicKey, Equivocation)>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(CONVICTED).map_err(redb_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(redb_err)? {
            let (k, v) = e.map_err(redb_err)?;
            out.push((PublicKey(k.value()), record(v.value(), "convicted")?));
        }
        Ok(out)
    }

    /// The forks found.
    pub fn forks(&self) -> Result<Vec<ForkRecord>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(FORKS).map_err(redb_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(redb_err)? {
            out.push(record(e.map_err(redb_err)?.1.value(), "forks")?);
        }
        Ok(out)
    }
}

/// Storage version 1 to 2: outbox items are posted once to the relay (which fans them out)
/// instead of sealed to each recipient. Runs in the opening transaction.
fn migrate_outbox_v1(w: &WriteTransaction) -> Result<(), StoreError> {
    {
        let old = w.open_table(OUTBOX_V1).map_err(redb_err)?;
        let mut new = w.open_table(OUTBOX).map_err(redb_err)?;
        for e in old.iter().map_err(redb_err)? {
            let (k, v) = e.map_err(redb_err)?;
            let item: OutboxItemV1 = record(v.value(), "outbox-0")?;
            let ChannelMessage::Application { message } = item.message else {
                // Commits never went through the outbox.
                continue;
            };
            let item =
                OutboxItem { channel: item.channel, id: item.id, message, attempts: item.attempts };
            new.insert(k.value(), encode(&item).as_slice()).map_err(redb_err)?;
        }
    }
    w.delete_table(OUTBOX_V1).map_err(redb_err)?;
    Ok(())
}

fn apply(w: &WriteTransaction, batch: Batch) -> Result<(), StoreError> {
    let mut keys = w.open_table(KEYS).map_err(redb_err)?;
    let mut mls = w.open_table(MLS).map_err(redb_err)?;
    let mut channels = w.open_table(CHANNELS).map_err(redb_err)?;
    let mut dirs = w.open_table(DIRS).map_err(redb_err)?;
    let mut messages = w.open_table(MESSAGES).map_err(redb_err)?;
    let mut ids = w.open_table(MESSAGE_IDS).map_err(redb_err)?;
    let mut outbox = w.open_table(OUTBOX).map_err(redb_err)?;
    let mut intents = w.open_table(INTENTS).map_err(redb_err)?;
    let mut added: HashMap<[u8; 32], u64> = HashMap::new();
    for op in batch.ops {
        match op {
            Op::Key(name, value) => {
                keys.insert(name, value.as_slice()).map_err(redb_err)?;
            }
            Op::Mls(k, Some(v)) => {
                mls.insert(k.as_slice(), v.as_slice()).map_err(redb_err)?;
            }
            Op::Mls(k, None) => {
                mls.remove(k.as_slice()).map_err(redb_err)?;
            }
            Op::Channel(id, r) => {
                channels.insert(id.0, encode(&r).as_slice()).map_err(redb_err)?;
            }
            Op::Dir(dir) => {
                dirs.insert(dir.device().as_bytes(), encode(&dir).as_slice()).map_err(redb_err)?;
            }
            Op::Message(channel, m) => {
                let id_key = message_ref(&channel, &m.id);
                if ids.get(id_key).map_err(redb_err)?.is_some() {
                    continue;
                }
                let key = message_key(&channel, &m);
                ids.insert(id_key, (key.1, key.2, key.3)).map_err(redb_err)?;
                messages.insert(key, encode(&m).as_slice()).map_err(redb_err)?;
                *added.entry(channel.0).or_default() += 1;
            }
            Op::Status(channel, id, status) => {
                let Some(at) = ids.get(message_ref(&channel, &id)).map_err(redb_err)? else {
                    continue;
                };
                let (epoch, wall, counter) = at.value();
                let key = (channel.0, epoch, wall, counter, *id.sender.as_bytes(), id.seq);
                let old = match messages.get(key).map_err(redb_err)? {
                    Some(v) => record::<StoredMessage>(v.value(), "messages")?,
                    None => continue,
                };
                if status == MessageStatus::Gossiped && old.status != MessageStatus::Sending {
                    continue;
                }
                let new = StoredMessage { status, ..old };
                messages.insert(key, encode(&new).as_slice()).map_err(redb_err)?;
            }
            Op::Relay(relay) => {
                w.open_table(RELAYS)
                    .map_err(redb_err)?
                    .insert(relay.host.as_str(), relay.key.0)
                    .map_err(redb_err)?;
            }
            Op::Failure(channel, id, reason) => {
                w.open_table(FAILURES)
                    .map_err(redb_err)?
                    .insert(message_ref(&channel, &id), reason.as_str())
                    .map_err(redb_err)?;
            }
            Op::Outbox(id, Some(item)) => {
                outbox.insert(id, encode(&item).as_slice()).map_err(redb_err)?;
            }
            Op::Outbox(id, None) => {
                outbox.remove(id).map_err(redb_err)?;
            }
            Op::Intent(channel, Some(intent)) => {
                intents.insert(channel.0, encode(&intent).as_slice()).map_err(redb_err)?;
            }
            Op::Intent(channel, None) => {
                intents.remove(channel.0).map_err(redb_err)?;
            }
            Op::Released(channel, true) => {
                w.open_table(RELEASED)
                    .map_err(redb_err)?
                    .insert(channel.0, ())
                    .map_err(redb_err)?;
            }
            Op::Released(channel, false) => {
                w.open_table(RELEASED).map_err(redb_err)?.remove(channel.0).map_err(redb_err)?;
            }
            Op::Epoch(channel, epoch, record) => {
                let mut t = w.open_table(EPOCHS).map_err(redb_err)?;
                t.insert((channel.0, epoch), encode(&record).as_slice()).map_err(redb_err)?;
                let oldest = epoch.saturating_sub(KEPT_EPOCHS);
                t.retain_in((channel.0, 0)..(channel.0, oldest), |_, _| false).map_err(redb_err)?;
            }
            Op::Roster(channel, roster) => {
                let mut t = w.open_table(ROSTERS).map_err(redb_err)?;
                match roster {
                    Some((epoch, members)) => {
                        t.insert((channel.0, epoch), encode(&members).as_slice())
                            .map_err(redb_err)?;
                        let oldest = epoch.saturating_sub(KEPT_ROSTERS - 1);
                        t.retain_in((channel.0, 0)..(channel.0, oldest), |_, _| false)
                            .map_err(redb_err)?;
                    }
                    None => {
                        t.retain_in((channel.0, 0)..=(channel.0, u64::MAX), |_, _| false)
                            .map_err(redb_err)?;
                    }
                }
            }
            Op::Convicted(signer, proof) => {
                let mut t = w.open_table(CONVICTED).map_err(redb_err)?;
                if t.get(signer.0).map_err(redb_err)?.is_none() {
                    t.insert(signer.0, encode(&proof).as_slice()).map_err(redb_err)?;
                }
            }
            Op::Moved(channel, epoch, before) => {
                let mut t = w.open_table(MOVED).map_err(redb_err)?;
                t.insert(channel.0, encode(&(epoch, before)).as_slice()).map_err(redb_err)?;
            }
            Op::Ordered(c) => {
                let mut t = w.open_table(ORDERED).map_err(redb_err)?;
                let key = (c.channel.0, c.cert.body.epoch);
                if t.get(key).map_err(redb_err)?.is_none() {
                    t.insert(key, encode(&c).as_slice()).map_err(redb_err)?;
                    // The channel's last `KEPT_COMMITS` epochs are kept (the creator orders
                    // only the current one, so what goes is never asked of it again).
                    let cut = c.cert.body.epoch.saturating_sub(KEPT_COMMITS - 1);
                    if cut > 0 {
                        let ch = c.channel.0;
                        t.retain_in((ch, 0)..(ch, cut), |_, _| false).map_err(redb_err)?;
                    }
                }
            }
            Op::LanKeep(post) => {
                let mut ids = w.open_table(LAN_HISTORY_IDS).map_err(redb_err)?;
                let hash = chitchat_proto::gossip::message_id(&post.message);
                if ids.get((post.channel.0, hash)).map_err(redb_err)?.is_some() {
                    continue;
                }
                let mut t = w.open_table(LAN_HISTORY).map_err(redb_err)?;
                let c = post.channel.0;
                let seq = match t.range((c, 0)..=(c, u64::MAX)).map_err(redb_err)?.next_back() {
                    Some(e) => e.map_err(redb_err)?.0.value().1.saturating_add(1),
                    None => 0,
                };
                t.insert((c, seq), encode(&post).as_slice()).map_err(redb_err)?;
                ids.insert((c, hash), seq).map_err(redb_err)?;
                if let Some(gone) = seq.checked_sub(KEPT_LAN_HISTORY) {
                    let old = t.remove((c, gone)).map_err(redb_err)?;
                    if let Some(old) = old {
                        let old: ChannelPost = record(old.value(), "lan-history")?;
                        ids.remove((c, chitchat_proto::gossip::message_id(&old.message)))
                            .map_err(redb_err)?;
                    }
                }
            }
            Op::Fork(fork) => {
                let mut t = w.open_table(FORKS).map_err(redb_err)?;
                if t.len().map_err(redb_err)? < MAX_FORKS {
                    let key = (fork.channel.0, fork.epoch, *fork.device.as_bytes());
                    t.insert(key, encode(&fork).as_slice()).map_err(redb_err)?;
                }
            }
        }
    }
    if !added.is_empty() {
        let mut counts = w.open_table(MESSAGE_COUNTS).map_err(redb_err)?;
        for (channel, n) in added {
            let now = counts.get(channel).map_err(redb_err)?.map_or(0, |v| v.value());
            counts.insert(channel, now.saturating_add(n)).map_err(redb_err)?;
        }
    }
    Ok(())
}

/// Storage version 1 to 2: the message counts, which version 1 did not keep.
fn count_messages_v1(w: &WriteTransaction) -> Result<(), StoreError> {
    let mut per_channel: HashMap<[u8; 32], u64> = HashMap::new();
    for e in w.open_table(MESSAGES).map_err(redb_err)?.iter().map_err(redb_err)? {
        *per_channel.entry(e.map_err(redb_err)?.0.value().0).or_default() += 1;
    }
    let mut counts = w.open_table(MESSAGE_COUNTS).map_err(redb_err)?;
    for (channel, n) in per_channel {
        counts.insert(channel, n).map_err(redb_err)?;
    }
    Ok(())
}

/// The database holds the device key: owner only.
fn restrict_file(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    let _ = path;
}

/// What of openmls' working storage is already on disk.
#[derive(Debug, Default)]
pub struct MlsMirror {
    persisted: HashMap<Vec<u8>, Vec<u8>>,
}

impl MlsMirror {
    /// A mirror of what was loaded from disk.
    pub fn new(persisted: HashMap<Vec<u8>, Vec<u8>>) -> Self {
        Self { persisted }
    }

    /// What changed in `current` since the last [`MlsMirror::persisted`]: values to write and
    /// keys to delete.
    pub fn changes(&self, current: &HashMap<Vec<u8>, Vec<u8>>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut out: Vec<(Vec<u8>, Option<Vec<u8>>)> = current
            .iter()
            .filter(|(k, v)| self.persisted.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        out.extend(
            self.persisted.keys().filter(|k| !current.contains_key(*k)).map(|k| (k.clone(), None)),
        );
        out
    }

    /// Records that `changes` are on disk.
    pub fn persisted(&mut self, changes: &[(Vec<u8>, Option<Vec<u8>>)]) {
        for (k, v) in changes {
            match v {
                Some(v) => self.persisted.insert(k.clone(), v.clone()),
                None => self.persisted.remove(k),
            };
        }
    }

    /// The state on disk (to roll the working copy back after a failed operation).
    pub fn snapshot(&self) -> HashMap<Vec<u8>, Vec<u8>> {
        self.persisted.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_reports_writes_and_deletes_once() {
        let mut m = MlsMirror::default();
        let mut cur =
            HashMap::from([(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())]);
        let c = m.changes(&cur);
        assert_eq!(c.len(), 2);
        m.persisted(&c);
        assert!(m.changes(&cur).is_empty());
        cur.remove(b"a".as_slice());
        cur.insert(b"b".to_vec(), b"3".to_vec());
        let mut c = m.changes(&cur);
        c.sort();
        assert_eq!(c, vec![(b"a".to_vec(), None), (b"b".to_vec(), Some(b"3".to_vec()))]);
        m.persisted(&c);
        assert_eq!(m.snapshot(), cur);
    }

    #[test]
    fn refuses_another_storage_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.redb");
        drop(Store::open(&path).expect("create"));
        {
            let db = Database::create(&path).expect("reopen");
            let w = db.begin_write().expect("write");
            w.open_table(META)
                .expect("meta")
                .insert("version", encode(&99u32).as_slice())
                .expect("insert");
            w.commit().expect("commit");
        }
        assert!(matches!(Store::open(&path), Err(StoreError::Version { found: 99 })));
    }

    #[test]
    fn a_version_1_outbox_is_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.redb");
        let device = DeviceId(chitchat_proto::SecretKey::from_seed([1; 32]).public());
        let id = MessageId { sender: device, seq: 7 };
        let channel = ChannelId([2; 32]);
        let old =
            |message| OutboxItemV1 { channel, id, message, recipients: vec![device], attempts: 3 };
        {
            let db = Database::create(&path).expect("create");
            let w = db.begin_write().expect("write");
            w.open_table(META)
                .expect("meta")
                .insert("version", encode(&1u32).as_slice())
                .expect("insert");
            let mut t = w.open_table(OUTBOX_V1).expect("outbox-0");
            let app = old(ChannelMessage::Application { message: vec![9; 40] });
            t.insert(4, encode(&app).as_slice()).expect("insert");
            let cert = chitchat_proto::ordering::EpochCert {
                body: chitchat_proto::ordering::EpochCertBody {
                    channel,
                    epoch: 1,
                    hash: chitchat_proto::ordering::CommitHash([0; 32]),
                },
                signatures: vec![],
            };
            let commit = old(ChannelMessage::Commit { commit: vec![1], cert });
            t.insert(5, encode(&commit).as_slice()).expect("insert");
            drop(t);
            let m = StoredMessage {
                id,
                hlc: Hlc { wall_ms: 5, counter: 0 },
                epoch: 1,
                payload: vec![1],
                status: MessageStatus::Sending,
                at: Timestamp(5),
            };
            w.open_table(MESSAGES)
                .expect("messages")
                .insert(message_key(&channel, &m), encode(&m).as_slice())
                .expect("insert");
            w.commit().expect("commit");
        }
        let store = Store::open(&path).expect("migrated");
        assert_eq!(store.count_messages(&channel).expect("count"), 1, "counted on migration");
        let want = OutboxItem { channel, id, message: vec![9; 40], attempts: 3 };
        assert_eq!(store.outbox(10, |_| true).expect("outbox"), vec![(4, want)]);
        drop(store);
        // Version 2 now: opens again, same outbox.
        assert_eq!(
            Store::open(&path).expect("reopen").outbox(10, |_| true).expect("outbox").len(),
            1
        );
    }
}

#[cfg(test)]
mod message_tests {
    use super::*;
    use chitchat_proto::SecretKey;

    fn msg(sender: u8, seq: u64, wall: u64) -> StoredMessage {
        StoredMessage {
            id: MessageId { sender: DeviceId(SecretKey::from_seed([sender; 32]).public()), seq },
            hlc: Hlc { wall_ms: wall, counter: 0 },
            epoch: 1,
            payload: vec![sender],
            status: MessageStatus::Received,
            at: Timestamp(0),
        }
    }

    #[test]
    fn messages_are_ordered_deduplicated_and_found_by_short_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("n.redb")).expect("open");
        let (c1, c2) = (ChannelId([1; 32]), ChannelId([2; 32]));
        let mut b = Batch::default();
        b.message(c1, msg(1, 0, 30));
        b.message(c1, msg(2, 0, 10));
        b.message(c1, msg(1, 1, 20));
        b.message(c2, msg(1, 0, 5));
        store.commit(b).expect("commit");
        // The same id again is ignored, even with other contents.
        let mut b = Batch::default();
        b.message(c1, StoredMessage { payload: vec![9], ..msg(1, 0, 99) });
        b.status(c1, msg(2, 0, 10).id, MessageStatus::Sent);
        store.commit(b).expect("commit");
        let all = store.messages(&c1, 10).expect("read");
        let walls: Vec<u64> = all.iter().map(|m| m.hlc.wall_ms).collect();
        assert_eq!(walls, [10, 20, 30], "display order is by clock");
        assert_eq!(all[0].status, MessageStatus::Sent);
        assert_eq!(all[2].payload, vec![1], "the first copy stays");
        assert_eq!(store.messages(&c1, 2).expect("read").len(), 2, "the latest two");
        let counts = (store.count_messages(&c1).expect("n"), store.count_messages(&c2).expect("n"));
        assert_eq!(counts, (3, 1), "a duplicate is not counted");
        let sender = msg(1, 0, 0).id.sender;
        let prefix = &sender.as_bytes()[..4];
        let found = store.find_messages(prefix, 0, 16).expect("find");
        assert_eq!(found.len(), 2, "seq 0 of that sender is in both channels");
        assert!(found.iter().all(|(_, id)| id.sender == sender && id.seq == 0));
        assert_eq!(store.find_messages(prefix, 1, 16).expect("find"), vec![(c1, msg(1, 1, 0).id)]);
        assert!(store.find_messages(prefix, 7, 16).expect("find").is_empty());
        assert!(store.message(&c2, &msg(1, 0, 0).id).expect("get").is_some());
    }
}

#[cfg(test)]
mod lan_tests {
    use super::*;

    fn post(channel: ChannelId, n: u64) -> ChannelPost {
        ChannelPost { channel, message: n.to_be_bytes().to_vec() }
    }

    /// A relay-less channel's kept messages: once each, in order, per channel, the oldest going
    /// past the bound (with their ids, so that one gone may be kept again).
    #[test]
    fn kept_commits_are_served_without_gaps_from_any_epoch() {
        use chitchat_proto::ordering::{CommitHash, EpochCert, EpochCertBody};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("n.redb")).expect("open");
        let c = ChannelId([1; 32]);
        let commit = |epoch: u64| OrderedCommit {
            channel: c,
            commit: vec![epoch as u8],
            cert: EpochCert {
                signatures: vec![],
                body: EpochCertBody { channel: c, epoch, hash: CommitHash([epoch as u8; 32]) },
            },
        };
        let mut b = Batch::default();
        for epoch in [3, 4, 6] {
            b.ordered(commit(epoch));
        }
        store.commit(b).expect("commit");
        let epochs = |from| -> Vec<u64> {
            let got = store.ordered_from(&c, from, 64, 1 << 20).expect("read");
            got.iter().map(|o| o.cert.body.epoch).collect()
        };
        assert_eq!(epochs(3), [3, 4], "up to the gap");
        assert!(epochs(5).is_empty(), "none kept for 5");
        assert_eq!(epochs(6), [6]);
        assert!(epochs(0).is_empty(), "a member that joined later has no run from 0");
        // Bounded: the newest epoch keeps the `KEPT_COMMITS` before it.
        let mut b = Batch::default();
        for epoch in [10, 11, 10 + KEPT_COMMITS] {
            b.ordered(commit(epoch));
        }
        store.commit(b).expect("commit");
        assert!(epochs(10).is_empty() && epochs(3).is_empty(), "more than KEPT_COMMITS before");
        assert_eq!(epochs(11), [11], "within the bound: kept");
        // A peer's `from` at the very end overflows nothing.
        let mut b = Batch::default();
        b.ordered(commit(u64::MAX));
        store.commit(b).expect("commit");
        assert_eq!(epochs(u64::MAX), [u64::MAX]);
    }

    #[test]
    fn lan_history_keeps_each_message_once_and_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("n.redb")).expect("open");
        let (c1, c2) = (ChannelId([1; 32]), ChannelId([2; 32]));
        let mut b = Batch::default();
        b.lan_keep(post(c1, 0));
        b.lan_keep(post(c1, 1));
        b.lan_keep(post(c1, 0));
        b.lan_keep(post(c2, 9));
        store.commit(b).expect("commit");
        let (entries, next) = store.lan_history(&c1, 0, 100, 1 << 20).expect("read");
        assert_eq!(entries, vec![(0, post(c1, 0)), (1, post(c1, 1))], "the copy is dropped");
        assert_eq!(next, 2);
        assert_eq!(
            store.lan_history(&c1, 1, 100, 1 << 20).expect("read").0,
            vec![(1, post(c1, 1))]
        );
        assert_eq!(
            store.lan_history(&c2, 0, 100, 1 << 20).expect("read").0,
            vec![(0, post(c2, 9))]
        );
        assert_eq!(store.lan_history(&c1, 0, 1, 1 << 20).expect("read").0.len(), 1, "max holds");
        let mut b = Batch::default();
        for n in 2..KEPT_LAN_HISTORY + 2 {
            b.lan_keep(post(c1, n));
        }
        store.commit(b).expect("commit");
        let (entries, next) = store.lan_history(&c1, 0, 3, 1 << 20).expect("read");
        assert_eq!(next, KEPT_LAN_HISTORY + 2);
        assert_eq!(entries.first().map(|e| e.0), Some(2), "the two oldest went");
        // The first message is gone, so it would be kept again (a late copy), at the end.
        let mut b = Batch::default();
        b.lan_keep(post(c1, 0));
        store.commit(b).expect("commit");
        let (_, next) = store.lan_history(&c1, 0, 1, 1 << 20).expect("read");
        assert_eq!(next, KEPT_LAN_HISTORY + 3);
    }
}

//! The relay's durable state, in one redb file.
//!
//! Who talks to whom: every write goes through [`Store::write`] to one writer thread (the
//! actor), which drains up to `max_batch` queued writes, applies them in **one** write
//! transaction and commits it with fsync (`Durability::Immediate`) before it answers any of them.
//! Concurrent enqueues therefore share one fsync (group commit), and an answer always means
//! durable. Reads open their own read transaction from any thread (redb is MVCC).
//!
//! Every write first checks, then writes: a rejected write changes nothing, so one bad request
//! never spoils the batch it shares. A storage error aborts the whole batch; every write in it
//! is answered `Unavailable` and none is acknowledged.
//!
//! Tables carry a version in their name (`inbox-0`); the storage version in `meta-0` is checked
//! on open.

mod records;
mod write;

pub use records::{
    Counters, DeviceInfo, DeviceRecord, FilePin, HistoryHead, LinkSlotRecord, PendingRevocation,
    QueueCounters, QueuedForward, RevokedRecord, StoredHistory, StoredItem, StoredKeyPackage,
    TokenRecord,
};
pub use write::{
    Fanned, HistoryLimits, InboxQuota, Onward, QueueLimits, Write, WriteError, Written,
};

use std::path::Path;
use std::sync::Arc;

use chitchat_proto::wire::InboxItem;
use chitchat_proto::{DeviceId, Dir};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot};

/// The layout version of the database; bumped with every incompatible change.
/// Version 3: inbox items may hold an `Envelope::Commit` (an unsealed ordered commit), which a
/// version-2 relay could not read. Version 4: channel histories (`history-0`, `history-heads-0`,
/// `history-gaps-0`), and inbox items with a history mark; version-3 items are read as they are
/// (no mark). Version 5: the bytes each user has pinned (`files-used-0`) and pins by expiry
/// (`files-expiry-0`), built from `files-0` when an older database is opened.
pub const STORAGE_VERSION: u32 = 5;
/// Writes waiting for the writer, at most.
pub const WRITE_QUEUE: usize = 8192;

pub(crate) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta-0");
/// The key in `meta-0` of the fan-out watermark: the highest ordering-log index whose accepted
/// commit is in its recipients' inboxes (8 bytes, big-endian).
/// (A multi-relay group's watermark is under `fanned-out-GROUP`.)
pub const FANNED_OUT: &str = "fanned-out";
pub(crate) const TOKENS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("tokens-0");
pub(crate) const NAMES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("names-0");
pub(crate) const DEVICES: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("devices-0");
pub(crate) const KEY_PACKAGES: TableDefinition<'_, ([u8; 32], u64), &[u8]> =
    TableDefinition::new("keypackages-0");
pub(crate) const LAST_RESORT: TableDefinition<'_, [u8; 32], &[u8]> =
    TableDefinition::new("keypackages-last-0");
pub(crate) const COUNTERS: TableDefinition<'_, [u8; 32], &[u8]> =
    TableDefinition::new("counters-0");
pub(crate) const INBOX: TableDefinition<'_, ([u8; 32], u64), &[u8]> =
    TableDefinition::new("inbox-1");
/// The inbox of storage version 1 (sealed envelopes only), migrated into `inbox-1` on open.
const INBOX_V1: TableDefinition<'_, ([u8; 32], u64), &[u8]> = TableDefinition::new("inbox-0");
pub(crate) const BLOCKED: TableDefinition<'_, &str, u64> = TableDefinition::new("blocked-0");
/// Payloads waiting to be forwarded to another relay: `(host, seq)` → [`QueuedForward`].
pub(crate) const FED_QUEUE: TableDefinition<'_, (&str, u64), &[u8]> =
    TableDefinition::new("fed-queue-0");
/// Each destination's queue counters: host → [`QueueCounters`].
pub(crate) const FED_QUEUES: TableDefinition<'_, &str, &[u8]> =
    TableDefinition::new("fed-queues-0");
/// Payloads forwarded here, by `(origin relay key, seq)` → when (ms): a payload forwarded twice
/// is stored once.
pub(crate) const FED_SEEN: TableDefinition<'_, ([u8; 32], u64), u64> =
    TableDefinition::new("fed-seen-0");
/// Channels' histories: `(channel, position)` → [`StoredHistory`].
pub(crate) const HISTORY: TableDefinition<'_, ([u8; 32], u64), &[u8]> =
    TableDefinition::new("history-0");
/// Each channel's [`HistoryHead`].
pub(crate) const HISTORY_HEADS: TableDefinition<'_, [u8; 32], &[u8]> =
    TableDefinition::new("history-heads-0");
/// `(device, channel)` → the first history position its inbox missed since it last got an
/// entry of the channel (the next entry it gets carries it as `missed_from`).
pub(crate) const HISTORY_GAPS: TableDefinition<'_, ([u8; 32], [u8; 32]), u64> =
    TableDefinition::new("history-gaps-0");
/// Orderers convicted of equivocation: key → the [`chitchat_proto::ordering::Equivocation`]
/// proof (its canonical encoding).
/// Files' blobs pinned here, by hash: [`FilePin`] (postcard).
pub(crate) const FILES: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("files-0");
/// The bytes each user's pins in `files-0` hold: user → bytes (no entry: none).
pub(crate) const FILES_USED: TableDefinition<'_, &str, u64> = TableDefinition::new("files-used-0");
/// The pins of `files-0` by expiry: `(expires_ms, hash)` → nothing.
pub(crate) const FILES_EXPIRY: TableDefinition<'_, (u64, [u8; 32]), ()> =
    TableDefinition::new("files-expiry-0");
pub(crate) const CONVICTED: TableDefinition<'_, [u8; 32], &[u8]> =
    TableDefinition::new("convicted-0");
/// Link slots: slot → [`LinkSlotRecord`].
pub(crate) const LINK_SLOTS: TableDefinition<'_, [u8; 16], &[u8]> =
    TableDefinition::new("link-slots-0");
/// The slot each device has open: device → slot (one each).
pub(crate) const LINK_OFFERS: TableDefinition<'_, [u8; 32], [u8; 16]> =
    TableDefinition::new("link-offers-0");
/// What devices say of themselves: device → [`DeviceInfo`].
pub(crate) const DEVICE_INFO: TableDefinition<'_, [u8; 32], &[u8]> =
    TableDefinition::new("device-info-0");

/// The user's recovery key (public half): local name → key.
pub(crate) const RECOVERY: TableDefinition<'_, &str, [u8; 32]> =
    TableDefinition::new("recovery-keys-0");
/// Revoked devices: device → [`RevokedRecord`]. A revoked device never registers again.
pub(crate) const REVOKED: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("revoked-0");
/// Revoked devices by the name they were revoked from: (local name, device) → when.
pub(crate) const REVOKED_OF: TableDefinition<'_, (&str, [u8; 32]), u64> =
    TableDefinition::new("revoked-of-0");
/// Revocations gathering signatures: target device → [`PendingRevocation`].
pub(crate) const REVOKING: TableDefinition<'_, [u8; 32], &[u8]> =
    TableDefinition::new("revoking-0");

/// Why the store could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, or the file is locked by another process).
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    /// The database was written by another layout version.
    #[error("database has storage version {found}, this relay reads version {STORAGE_VERSION}")]
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
    /// The writer thread is gone (the relay is shutting down).
    #[error("store is shut down")]
    Closed,
}

fn redb_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Storage(e.into())
}

struct Job {
    write: Write,
    reply: oneshot::Sender<Result<Written, WriteError>>,
}

/// The relay's store: a redb database and its writer.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the database at `path`, checks its version, and starts the writer
    /// thread, which batches at most `max_batch` writes per transaction.
    pub fn open(path: &Path, max_batch: usize) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(redb_err)?;
        init(&db)?;
        let db = Arc::new(db);
        let (jobs, rx) = mpsc::channel(WRITE_QUEUE);
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(&writer_db, rx, max_batch.max(1)))
            .map_err(|e| StoreError::Storage(redb::Error::Io(e)))?;
        Ok(Self { db, jobs })
    }

    /// Applies a write; returns once it is durable (or was rejected, changing nothing).
    pub async fn write(&self, write: Write) -> Result<Written, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { write, reply }).await.map_err(|_| WriteError::Closed)?;
        answer.await.map_err(|_| WriteError::Closed)?
    }

    /// The registration record of a device.
    pub fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(DEVICES).map_err(redb_err)?;
        let Some(v) = t.get(device.as_bytes()).map_err(redb_err)? else { return Ok(None) };
        records::decode_record(v.value(), "devices").map(Some)
    }

    /// The highest ordering-log index whose fan-out is durable here, if one was ever recorded.
    pub fn fanned_out(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(META).map_err(redb_err)?;
        let Some(v) = t.get(key).map_err(redb_err)? else { return Ok(None) };
        let bytes: [u8; 8] =
            v.value().try_into().map_err(|_| StoreError::Corrupt { table: "meta" })?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    /// Whether a device is registered here (no record is decoded).
    pub fn is_registered(&self, device: &DeviceId) -> Result<bool, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(DEVICES).map_err(redb_err)?;
        Ok(t.get(device.as_bytes()).map_err(redb_err)?.is_some())
    }

    /// Whether the operator blocked `host`.
    pub fn is_blocked(&self, host: &str) -> Result<bool, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(BLOCKED).map_err(redb_err)?;
        Ok(t.get(host).map_err(redb_err)?.is_some())
    }

    /// Bytes of the blobs `user` has pinned here.
    pub fn files_used(&self, user: &str) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(FILES_USED).map_err(redb_err)?;
        Ok(t.get(user).map_err(redb_err)?.map_or(0, |v| v.value()))
    }

    /// Whether a blob is pinned here and its pin has not expired by `now`: what the relay
    /// serves, over iroh and in parts alike.
    pub fn serves_file(
        &self,
        hash: &[u8; 32],
        now: chitchat_proto::Timestamp,
    ) -> Result<bool, StoreError> {
        Ok(self.file_pin(hash)?.is_some_and(|pin| pin.expires > now))
    }

    /// The pin of a blob, if it is pinned here.
    pub fn file_pin(&self, hash: &[u8; 32]) -> Result<Option<FilePin>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(FILES).map_err(redb_err)?;
        match t.get(hash).map_err(redb_err)? {
            Some(v) => Ok(Some(records::decode_record(v.value(), "files")?)),
            None => Ok(None),
        }
    }

    /// The keys of the orderers convicted of equivocation.
    pub fn convicted(&self) -> Result<Vec<chitchat_proto::PublicKey>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(CONVICTED).map_err(redb_err)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(redb_err)? {
            out.push(chitchat_proto::PublicKey(entry.map_err(redb_err)?.0.value()));
        }
        Ok(out)
    }

    /// The hosts with payloads queued for them.
    pub fn queued_hosts(&self) -> Result<Vec<String>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(FED_QUEUES).map_err(redb_err)?;
        let mut hosts = Vec::new();
        for entry in t.iter().map_err(redb_err)? {
            let (k, v) = entry.map_err(redb_err)?;
            let c: QueueCounters = records::decode_record(v.value(), "fed-queues")?;
            if c.items > 0 {
                hosts.push(k.value().to_owned());
            }
        }
        Ok(hosts)
    }

    /// The oldest payloads queued for `host`: at most `max` of them and `max_bytes` of their
    /// envelopes' encodings (always at least one).
    pub fn queued(
        &self,
        host: &str,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, QueuedForward)>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(FED_QUEUE).map_err(redb_err)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for entry in t.range((host, 0)..=(host, u64::MAX)).map_err(redb_err)? {
            let (k, v) = entry.map_err(redb_err)?;
            if out.len() >= max || (!out.is_empty() && bytes + v.value().len() > max_bytes) {
                break;
            }
            bytes += v.value().len();
            out.push((k.value().1, records::decode_record(v.value(), "fed-queue")?));
        }
        Ok(out)
    }

    /// Payloads queued for other relays, in all.
    pub fn queued_total(&self) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        r.open_table(FED_QUEUE).map_err(redb_err)?.len().map_err(redb_err)
    }

    /// A link slot, if open (expired or not).
    pub fn link_slot(
        &self,
        slot: &chitchat_proto::link::LinkSlot,
    ) -> Result<Option<LinkSlotRecord>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(LINK_SLOTS).map_err(redb_err)?;
        match t.get(&slot.0).map_err(redb_err)? {
            Some(v) => Ok(Some(records::decode_record(v.value(), "link-slots")?)),
            None => Ok(None),
        }
    }

    /// The devices registered under `device`'s name, each with its record, registration and
    /// what it says of itself (name, last seen).
    pub fn own_devices(
        &self,
        device: &DeviceId,
    ) -> Result<Vec<(DeviceRecord, DeviceInfo)>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let devices = r.open_table(DEVICES).map_err(redb_err)?;
        let Some(v) = devices.get(device.as_bytes()).map_err(redb_err)? else {
            return Ok(vec![]);
        };
        let me: DeviceRecord = records::decode_record(v.value(), "devices")?;
        let names = r.open_table(NAMES).map_err(redb_err)?;
        let Some(v) = names.get(me.local_name.as_str()).map_err(redb_err)? else {
            return Ok(vec![]);
        };
        let all: Vec<DeviceId> = records::decode_record(v.value(), "names")?;
        let info = r.open_table(DEVICE_INFO).map_err(redb_err)?;
        let mut out = Vec::with_capacity(all.len());
        for d in all {
            let Some(v) = devices.get(d.as_bytes()).map_err(redb_err)? else { continue };
            let record: DeviceRecord = records::decode_record(v.value(), "devices")?;
            let i = match info.get(d.as_bytes()).map_err(redb_err)? {
                Some(v) => records::decode_record(v.value(), "device-info")?,
                None => DeviceInfo::default(),
            };
            out.push((record, i));
        }
        Ok(out)
    }

    /// The public half of the recovery key of the user named `local_name`, if it set one.
    pub fn recovery_key(
        &self,
        local_name: &str,
    ) -> Result<Option<chitchat_proto::PublicKey>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(RECOVERY).map_err(redb_err)?;
        Ok(t.get(local_name).map_err(redb_err)?.map(|v| chitchat_proto::PublicKey(v.value())))
    }

    /// The revocation of `device`, if it was revoked here.
    pub fn revoked(&self, device: &DeviceId) -> Result<Option<RevokedRecord>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(REVOKED).map_err(redb_err)?;
        match t.get(device.as_bytes()).map_err(redb_err)? {
            Some(v) => Ok(Some(records::decode_record(v.value(), "revoked")?)),
            None => Ok(None),
        }
    }

    /// The latest `max` devices revoked from `local_name`, latest first.
    pub fn revoked_of(
        &self,
        local_name: &str,
        max: usize,
    ) -> Result<Vec<RevokedRecord>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let of = r.open_table(REVOKED_OF).map_err(redb_err)?;
        let mut found = Vec::new();
        for entry in of.range((local_name, [0; 32])..=(local_name, [0xff; 32])).map_err(redb_err)? {
            let (k, v) = entry.map_err(redb_err)?;
            found.push((v.value(), k.value().1));
        }
        found.sort_unstable_by(|a, b| b.cmp(a));
        let t = r.open_table(REVOKED).map_err(redb_err)?;
        let mut out = Vec::new();
        for (_, device) in found.into_iter().take(max) {
            if let Some(v) = t.get(&device).map_err(redb_err)? {
                out.push(records::decode_record(v.value(), "revoked")?);
            }
        }
        Ok(out)
    }

    /// The current records of the devices registered under `local_name`.
    pub fn lookup(&self, local_name: &str) -> Result<Vec<Dir>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let names = r.open_table(NAMES).map_err(redb_err)?;
        let Some(v) = names.get(local_name).map_err(redb_err)? else { return Ok(vec![]) };
        let devices: Vec<DeviceId> = records::decode_record(v.value(), "names")?;
        let t = r.open_table(DEVICES).map_err(redb_err)?;
        let mut dirs = Vec::with_capacity(devices.len());
        for d in devices {
            if let Some(v) = t.get(d.as_bytes()).map_err(redb_err)? {
                dirs.push(records::decode_record::<DeviceRecord>(v.value(), "devices")?.dir);
            }
        }
        Ok(dirs)
    }

    /// Inbox items of `device` with ids above `after`, at most `max` of them and at most
    /// `max_bytes` of item encodings (always at least one item); and whether more follow.
    pub fn fetch(
        &self,
        device: &DeviceId,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<InboxItem>, bool), StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(INBOX).map_err(redb_err)?;
        let start = after.map_or(0, |a| a.saturating_add(1));
        let key = *device.as_bytes();
        let mut items = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        for entry in t.range((key, start)..=(key, u64::MAX)).map_err(redb_err)? {
            let (k, v) = entry.map_err(redb_err)?;
            if items.len() == max {
                more = true;
                break;
            }
            let stored = StoredItem::decode(v.value())?;
            let item =
                InboxItem { id: k.value().1, envelope: stored.envelope, history: stored.history };
            // Exact: the answer's frame holds the items' encodings and a fixed overhead.
            let len = item.encoded_len();
            if !items.is_empty() && bytes + len > max_bytes {
                more = true;
                break;
            }
            bytes += len;
            items.push(item);
        }
        Ok((items, more))
    }

    /// A run of a channel's history from position `from` (or from the oldest kept, if later):
    /// at most `max` entries and `max_bytes` of their encodings (always at least one), with
    /// where the history stands.
    pub fn history(
        &self,
        channel: &[u8; 32],
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<(HistoryHead, Vec<HistoryEntry>), StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let heads = r.open_table(HISTORY_HEADS).map_err(redb_err)?;
        let head: HistoryHead = match heads.get(channel).map_err(redb_err)? {
            Some(v) => records::decode_record(v.value(), "history-heads")?,
            None => HistoryHead::default(),
        };
        let t = r.open_table(HISTORY).map_err(redb_err)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in
            t.range((*channel, from.max(head.first))..=(*channel, u64::MAX)).map_err(redb_err)?
        {
            let (k, v) = entry.map_err(redb_err)?;
            if out.len() >= max {
                break;
            }
            let stored: StoredHistory = records::decode_record(v.value(), "history")?;
            let envelope = stored.envelope.0;
            if !out.is_empty() && bytes + envelope.len() > max_bytes {
                break;
            }
            bytes += envelope.len();
            out.push((k.value().1, envelope));
        }
        Ok((head, out))
    }

    /// A device's counters (inbox depth and bytes, ...).
    pub fn counters(&self, device: &DeviceId) -> Result<Counters, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(COUNTERS).map_err(redb_err)?;
        match t.get(device.as_bytes()).map_err(redb_err)? {
            Some(v) => records::decode_record(v.value(), "counters"),
            None => Ok(Counters::default()),
        }
    }

    /// Every local name and its devices.
    pub fn users(&self) -> Result<Vec<(String, Vec<DeviceId>)>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(NAMES).map_err(redb_err)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(redb_err)? {
            let (k, v) = entry.map_err(redb_err)?;
            out.push((k.value().to_owned(), records::decode_record(v.value(), "names")?));
        }
        Ok(out)
    }

    /// Blocked relay hosts.
    pub fn blocked(&self) -> Result<Vec<String>, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        let t = r.open_table(BLOCKED).map_err(redb_err)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(redb_err)? {
            out.push(entry.map_err(redb_err)?.0.value().to_owned());
        }
        Ok(out)
    }

    /// Totals for `stats` and metrics.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let r = self.db.begin_read().map_err(redb_err)?;
        Ok(Stats {
            devices: r.open_table(DEVICES).map_err(redb_err)?.len().map_err(redb_err)?,
            names: r.open_table(NAMES).map_err(redb_err)?.len().map_err(redb_err)?,
            inbox_items: r.open_table(INBOX).map_err(redb_err)?.len().map_err(redb_err)?,
            key_packages: r.open_table(KEY_PACKAGES).map_err(redb_err)?.len().map_err(redb_err)?,
            tokens: r.open_table(TOKENS).map_err(redb_err)?.len().map_err(redb_err)?,
        })
    }
}

/// A history entry as it is served: its position and the encoding of its envelope.
pub type HistoryEntry = (u64, Vec<u8>);

/// Totals over the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Registered devices.
    pub devices: u64,
    /// Registered local names.
    pub names: u64,
    /// Items waiting in inboxes.
    pub inbox_items: u64,
    /// Unclaimed KeyPackages.
    pub key_packages: u64,
    /// Invite tokens (used or not).
    pub tokens: u64,
}

/// Creates the tables and checks (or writes) the storage version.
fn init(db: &Database) -> Result<(), StoreError> {
    let w = db.begin_write().map_err(redb_err)?;
    {
        let mut meta = w.open_table(META).map_err(redb_err)?;
        let found = match meta.get("storage_version").map_err(redb_err)? {
            Some(v) => {
                let bytes: [u8; 4] =
                    v.value().try_into().map_err(|_| StoreError::Corrupt { table: "meta" })?;
                Some(u32::from_le_bytes(bytes))
            }
            None => None,
        };
        match found {
            Some(STORAGE_VERSION) => {}
            Some(old @ (1..=4)) => {
                if old == 1 {
                    migrate_inbox_v1(&w)?;
                }
                index_files(&w)?;
                meta.insert("storage_version", STORAGE_VERSION.to_le_bytes().as_slice())
                    .map_err(redb_err)?;
            }
            Some(found) => return Err(StoreError::Version { found }),
            None => {
                meta.insert("storage_version", STORAGE_VERSION.to_le_bytes().as_slice())
                    .map_err(redb_err)?;
            }
        }
        w.open_table(TOKENS).map_err(redb_err)?;
        w.open_table(NAMES).map_err(redb_err)?;
        w.open_table(DEVICES).map_err(redb_err)?;
        w.open_table(KEY_PACKAGES).map_err(redb_err)?;
        w.open_table(LAST_RESORT).map_err(redb_err)?;
        w.open_table(COUNTERS).map_err(redb_err)?;
        w.open_table(INBOX).map_err(redb_err)?;
        w.open_table(BLOCKED).map_err(redb_err)?;
        w.open_table(FED_QUEUE).map_err(redb_err)?;
        w.open_table(FED_QUEUES).map_err(redb_err)?;
        w.open_table(FED_SEEN).map_err(redb_err)?;
        w.open_table(CONVICTED).map_err(redb_err)?;
        w.open_table(FILES).map_err(redb_err)?;
        w.open_table(FILES_USED).map_err(redb_err)?;
        w.open_table(FILES_EXPIRY).map_err(redb_err)?;
        w.open_table(HISTORY).map_err(redb_err)?;
        w.open_table(HISTORY_HEADS).map_err(redb_err)?;
        w.open_table(HISTORY_GAPS).map_err(redb_err)?;
        w.open_table(LINK_SLOTS).map_err(redb_err)?;
        w.open_table(LINK_OFFERS).map_err(redb_err)?;
        w.open_table(DEVICE_INFO).map_err(redb_err)?;
        w.open_table(RECOVERY).map_err(redb_err)?;
        w.open_table(REVOKED).map_err(redb_err)?;
        w.open_table(REVOKED_OF).map_err(redb_err)?;
        w.open_table(REVOKING).map_err(redb_err)?;
    }
    w.commit().map_err(redb_err)?;
    Ok(())
}

/// Storage version 4 to 5: each user's pinned bytes and the pins by expiry, from `files-0`. In
/// the opening transaction, as every migration.
fn index_files(w: &redb::WriteTransaction) -> Result<(), StoreError> {
    let files = w.open_table(FILES).map_err(redb_err)?;
    let mut used = w.open_table(FILES_USED).map_err(redb_err)?;
    let mut expiry = w.open_table(FILES_EXPIRY).map_err(redb_err)?;
    let mut by_user: std::collections::BTreeMap<String, u64> = Default::default();
    for entry in files.iter().map_err(redb_err)? {
        let (k, v) = entry.map_err(redb_err)?;
        let pin: FilePin = records::decode_record(v.value(), "files")?;
        let total = by_user.entry(pin.user).or_default();
        *total = total.saturating_add(pin.len);
        expiry.insert((pin.expires.0, k.value()), ()).map_err(redb_err)?;
    }
    for (user, bytes) in &by_user {
        used.insert(user.as_str(), *bytes).map_err(redb_err)?;
    }
    Ok(())
}

/// Storage version 1 to 2: inbox items carry an [`chitchat_proto::wire::Envelope`] (sealed,
/// or a channel post) instead of a sealed envelope only. Runs in the opening transaction, so
/// a crash half-way leaves version 1 intact.
fn migrate_inbox_v1(w: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut grown: std::collections::BTreeMap<[u8; 32], u64> = Default::default();
    {
        let old = w.open_table(INBOX_V1).map_err(redb_err)?;
        let mut new = w.open_table(INBOX).map_err(redb_err)?;
        for entry in old.iter().map_err(redb_err)? {
            let (k, v) = entry.map_err(redb_err)?;
            let item: records::StoredItemV1 = records::decode_record(v.value(), "inbox-0")?;
            let bytes = records::encode_record(&StoredItem::from(item));
            *grown.entry(k.value().0).or_default() +=
                (bytes.len() as u64).saturating_sub(v.value().len() as u64);
            new.insert(k.value(), bytes.as_slice()).map_err(redb_err)?;
        }
    }
    w.delete_table(INBOX_V1).map_err(redb_err)?;
    // Quotas count stored bytes: keep the counters equal to what is stored.
    let mut counters = w.open_table(COUNTERS).map_err(redb_err)?;
    for (device, extra) in grown {
        let mut c: Counters = match counters.get(&device).map_err(redb_err)? {
            Some(v) => records::decode_record(v.value(), "counters")?,
            None => Counters::default(),
        };
        c.inbox_bytes = c.inbox_bytes.saturating_add(extra);
        counters.insert(&device, records::encode_record(&c).as_slice()).map_err(redb_err)?;
    }
    Ok(())
}

/// The writer actor: batch, apply, commit, answer.
fn writer(db: &Database, mut rx: mpsc::Receiver<Job>, max_batch: usize) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let results = write::apply_batch(db, jobs.iter().map(|j| &j.write));
        debug_assert_eq!(results.len(), jobs.len());
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests;

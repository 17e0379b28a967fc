//! The writes, each applied inside the writer's batch transaction.

use chitchat_proto::codec::{Bytes, encode};
use chitchat_proto::identity::linked;
use chitchat_proto::inbox::SealedEnvelope;
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::wire::{Envelope, ErrorCode, HistoryMark};
use chitchat_proto::{DeviceId, Dir, Timestamp};
use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};

use super::records::{decode_record, encode_record};
use super::{
    BLOCKED, CONVICTED, COUNTERS, Counters, DEVICE_INFO, DEVICES, DeviceInfo, DeviceRecord,
    FED_QUEUE, FED_QUEUES, FED_SEEN, FILES, FILES_EXPIRY, FILES_USED, FilePin, HISTORY,
    HISTORY_GAPS, HISTORY_HEADS, HistoryHead, INBOX, KEY_PACKAGES, LAST_RESORT, LINK_OFFERS,
    LINK_SLOTS, LinkSlotRecord, META, NAMES, PendingRevocation, QueueCounters, QueuedForward,
    RECOVERY, REVOKED, REVOKED_OF, REVOKING, RevokedRecord, StoredHistory, StoredItem,
    StoredKeyPackage, TOKENS, TokenRecord,
};
use chitchat_proto::link::{LinkAnswer, LinkHello, LinkSlot};

/// Inbox bounds, checked on every enqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxQuota {
    /// Items per inbox.
    pub max_items: u64,
    /// Bytes per inbox.
    pub max_bytes: u64,
}

/// Bounds of one channel's history: past either, its oldest entries go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Entries kept per channel.
    pub max_entries: u64,
    /// Bytes kept per channel.
    pub max_bytes: u64,
}

/// Bounds of the queues for other relays, checked on every [`Write::Queue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Payloads queued for one relay.
    pub max_items: u64,
    /// Bytes queued for one relay.
    pub max_bytes: u64,
    /// Payloads queued for all relays together.
    pub max_total_items: u64,
}

/// Where else a post goes: the queues of the channel's other relays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Onward {
    /// The other relays' hosts.
    pub hosts: Vec<String>,
    /// The queues' bounds.
    pub limits: QueueLimits,
}

/// One winner's fan-out in a [`Write::Ordered`].
#[derive(Clone, Debug)]
pub struct Fanned {
    /// The commit for the members ([`Write::Fanout`], past the inbox quota).
    pub commit: Box<Write>,
    /// The Welcomes ([`Write::Enqueue`] each).
    pub welcomes: Vec<Write>,
    /// Where the Welcomes of devices not registered here are queued (the relays the commit
    /// brings into the channel's relay set), if anywhere.
    pub onward: Option<Onward>,
}

/// The key in `meta-0` of the number of payloads queued for all relays (8 bytes, big-endian).
const FED_QUEUED_TOTAL: &str = "fed-queued";

/// A change to the store.
#[derive(Clone, Debug)]
pub enum Write {
    /// Store an invite token.
    CreateToken {
        /// The token.
        token: String,
        /// Its record.
        record: TokenRecord,
    },
    /// Register a device under a name, consuming a token (unless registration is open).
    Register {
        /// The invite token.
        token: Option<String>,
        /// Whether registration without a token is allowed.
        open: bool,
        /// The name asked for.
        local_name: String,
        /// The device's self-signed record (already checked by the caller).
        dir: Dir,
        /// The time of the request.
        now: Timestamp,
    },
    /// Replace a registered device's record with a newer one.
    PublishDir {
        /// The record (signature already checked by the caller).
        dir: Dir,
    },
    /// Store KeyPackages of a device (already validated by the caller).
    UploadKeyPackages {
        /// The device.
        device: DeviceId,
        /// Packages with their expiry.
        packages: Vec<(Timestamp, Bytes)>,
        /// A last-resort package, replacing the previous one.
        last_resort: Option<(Timestamp, Bytes)>,
        /// Unclaimed packages a device may have stored.
        max_per_device: u64,
    },
    /// Take one unexpired KeyPackage of a device (the last-resort one is kept).
    ClaimKeyPackage {
        /// The device whose package is wanted.
        device: DeviceId,
        /// The time of the claim.
        now: Timestamp,
    },
    /// Put a sealed payload into its recipient's inbox.
    Enqueue {
        /// The authenticated sender.
        sender: DeviceId,
        /// The payload.
        envelope: SealedEnvelope,
        /// The time of the request.
        now: Timestamp,
        /// The recipient's bounds.
        quota: InboxQuota,
    },
    /// Put one unsealed envelope (a channel post, an ordered commit) into the inboxes of
    /// `recipients` (the channel's member devices). A recipient that is not registered here
    /// or whose inbox is full is skipped.
    Fanout {
        /// The authenticated sender, a member of the channel.
        sender: DeviceId,
        /// What every recipient gets.
        envelope: Envelope,
        /// Who gets it.
        recipients: std::sync::Arc<[DeviceId]>,
        /// The time of the request.
        now: Timestamp,
        /// Each recipient's bounds.
        quota: InboxQuota,
        /// The other relays of the channel, which fan it out to their own members: it is
        /// queued for each, all or nothing with the rest of the write.
        onward: Option<Onward>,
        /// For a post another relay forwarded: its `(origin key, seq)`, so it is stored once.
        seen: Option<([u8; 32], u64)>,
        /// For a post or commit, the bounds of its channel's history, which it joins (`None`:
        /// it is kept in no history).
        history: Option<HistoryLimits>,
    },
    /// The fan-out of the winners of the ordering-log entry at `index` (one, or several for a
    /// batch): each one's record for the channel's members and the Welcomes for the devices it
    /// adds, unless the watermark says the entry was done (then nothing is written); moves the
    /// watermark to `index`.
    Ordered {
        /// The watermark's key in `meta-0` (one per ordering group).
        key: String,
        /// The ordering-log index of the entry.
        index: u64,
        /// Its winners' fan-outs, in the entry's order.
        fanned: Vec<Fanned>,
    },
    /// Records the fan-out watermark as it is (a relay upgraded from before it existed).
    SetFannedOut {
        /// The watermark's key.
        key: String,
        /// The log index.
        index: u64,
    },
    /// Delete acknowledged items of a device's inbox.
    Ack {
        /// The inbox owner.
        device: DeviceId,
        /// The items.
        ids: Vec<u64>,
    },
    /// Delete inbox items stored before `before`, at most `max` of them.
    Expire {
        /// The retention horizon.
        before: Timestamp,
        /// Most items deleted in one pass.
        max: usize,
    },
    /// Delete channels' history entries stored before `before`, at most `max` of them.
    ExpireHistory {
        /// The retention horizon.
        before: Timestamp,
        /// Most entries deleted in one pass.
        max: usize,
    },
    /// Queue sealed payloads for the devices of another relay, all or none, within the
    /// queue's bounds.
    Queue {
        /// The relay they go to.
        host: String,
        /// The authenticated sender.
        sender: DeviceId,
        /// The payloads.
        envelopes: Vec<Envelope>,
        /// The time of the request.
        now: Timestamp,
        /// The bounds.
        limits: QueueLimits,
    },
    /// Remove payloads from the queue for `host` (delivered, or refused for good).
    Unqueue {
        /// The relay.
        host: String,
        /// Their numbers.
        seqs: Vec<u64>,
    },
    /// Store a payload another relay forwarded, unless that relay's `seq` was stored before.
    Forwarded {
        /// The forwarding relay's key.
        origin: [u8; 32],
        /// Its number in that relay's queue.
        seq: u64,
        /// The device that sent it there.
        sender: DeviceId,
        /// The payload, for a device registered here.
        envelope: SealedEnvelope,
        /// The time of arrival.
        now: Timestamp,
        /// The recipient's bounds.
        quota: InboxQuota,
    },
    /// Delete queued payloads queued before `before`, and the memory of forwarded payloads
    /// stored before it, at most `max` of each.
    ExpireFederation {
        /// The retention horizon.
        before: Timestamp,
        /// Most entries deleted in one pass.
        max: usize,
    },
    /// Keep the proof that convicts `signer` of equivocation (the first one only).
    Convict {
        /// The orderer convicted.
        signer: [u8; 32],
        /// The proof's canonical encoding.
        proof: Vec<u8>,
    },
    /// Pin a file's blob: refused (`QuotaExceeded`) if its user's pins would pass `quota`
    /// bytes. A blob pinned already keeps its pin (and its expiry).
    PinFile {
        /// The blob's hash.
        hash: [u8; 32],
        /// The pin.
        pin: FilePin,
        /// The user's quota, in bytes.
        quota: u64,
    },
    /// Delete the pins that expired by `now` (at most `max`); answered with their hashes.
    ExpireFiles {
        /// The time.
        now: Timestamp,
        /// Most pins deleted in one pass.
        max: usize,
    },
    /// Open a link slot for `offerer` (registered here) until `expires`, closing the one it
    /// had open.
    OfferLink {
        /// The device that offers.
        offerer: DeviceId,
        /// The slot.
        slot: LinkSlot,
        /// When it closes.
        expires: Timestamp,
    },
    /// Put `joiner`'s hello in an open slot: the first hello only (`TokenUsed` for another),
    /// none after the slot closed (`TokenInvalid`).
    JoinLink {
        /// The device that joins (not registered here).
        joiner: DeviceId,
        /// The slot.
        slot: LinkSlot,
        /// Its hello (proof unchecked: the relay cannot check it).
        hello: LinkHello,
        /// The time of the request.
        now: Timestamp,
    },
    /// Put the offerer's answer in its slot, after a hello.
    AnswerLink {
        /// The device that answers (the slot's offerer).
        offerer: DeviceId,
        /// The slot.
        slot: LinkSlot,
        /// The answer.
        answer: LinkAnswer,
        /// The time of the request.
        now: Timestamp,
    },
    /// Delete the link slots closed by `now`.
    ExpireLinks {
        /// The time.
        now: Timestamp,
    },
    /// A registered device names itself.
    NameDevice {
        /// The device.
        device: DeviceId,
        /// Its name (checked by the caller).
        name: String,
    },
    /// When devices were last seen (kept only where later than what is stored, and only for
    /// devices registered here).
    Seen(Vec<(DeviceId, Timestamp)>),
    /// Keep the recovery key of `device`'s user: only if the user has none and `device` is
    /// its only device.
    SetRecovery {
        /// The device that sets it.
        device: DeviceId,
        /// The key's public half.
        key: chitchat_proto::PublicKey,
    },
    /// Add `by`'s signatures of a revocation to those gathered; revoke the target once
    /// [`chitchat_proto::identity::revocation::quorum`] holds. The caller has checked every
    /// signature ([`chitchat_proto::identity::Revocation::verify`]) and the user's host.
    Revoke {
        /// The device that asks (one of the signers).
        by: DeviceId,
        /// The revocation, its signatures checked.
        revocation: chitchat_proto::identity::Revocation,
        /// Whether the user's recovery key signed it (checked).
        recovered: bool,
        /// The time of the request.
        now: Timestamp,
    },
    /// Block or unblock a relay host.
    Block {
        /// The host.
        host: String,
        /// `true` to block, `false` to unblock.
        blocked: bool,
        /// The time of the change.
        now: Timestamp,
    },
}

/// What a write did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// Done.
    Done,
    /// Where a revocation stands.
    Revoking {
        /// Whether the target is revoked now (or was).
        revoked: bool,
        /// Signatures that count.
        signed: usize,
        /// Signatures needed without the recovery key.
        needed: usize,
    },
    /// Stored KeyPackages; the device now has this many unclaimed.
    KeyPackages {
        /// Unclaimed packages.
        available: u64,
    },
    /// A claimed KeyPackage.
    KeyPackage(Vec<u8>),
    /// The enqueued item's id.
    Enqueued {
        /// The id.
        id: u64,
    },
    /// How many items were deleted.
    Removed(u64),
    /// An ordered commit's fan-out was already durable: nothing was written.
    AlreadyFannedOut,
    /// An equivocation proof was kept (`new`), or one against that orderer was kept before.
    Convicted {
        /// Whether it is the first proof against that orderer.
        new: bool,
    },
    /// A file's pin (the one written, or the one there already).
    Pinned(FilePin),
    /// The hashes of the pins deleted.
    Unpinned(Vec<[u8; 32]>),
    /// A post is in these inboxes; `skipped` recipients did not get it.
    Posted {
        /// The inboxes it is in.
        delivered: Vec<DeviceId>,
        /// Recipients not registered here or with a full inbox.
        skipped: u32,
    },
}

/// Why a write did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The request is refused; nothing changed.
    #[error("{message}")]
    Rejected {
        /// The protocol error code.
        code: ErrorCode,
        /// Why.
        message: String,
    },
    /// The batch failed to commit; nothing of it is durable.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The store is shutting down.
    #[error("store closed")]
    Closed,
}

fn reject(code: ErrorCode, message: impl Into<String>) -> WriteError {
    WriteError::Rejected { code, message: message.into() }
}

fn storage(e: impl Into<redb::Error>) -> WriteError {
    WriteError::Storage(e.into().to_string())
}

fn corrupt(e: super::StoreError) -> WriteError {
    WriteError::Storage(e.to_string())
}

/// The tables, opened once per batch.
pub(super) struct Tables<'txn> {
    tokens: Table<'txn, &'static str, &'static [u8]>,
    names: Table<'txn, &'static str, &'static [u8]>,
    devices: Table<'txn, [u8; 32], &'static [u8]>,
    key_packages: Table<'txn, ([u8; 32], u64), &'static [u8]>,
    last_resort: Table<'txn, [u8; 32], &'static [u8]>,
    counters: Table<'txn, [u8; 32], &'static [u8]>,
    inbox: Table<'txn, ([u8; 32], u64), &'static [u8]>,
    blocked: Table<'txn, &'static str, u64>,
    meta: Table<'txn, &'static str, &'static [u8]>,
    fed_queue: Table<'txn, (&'static str, u64), &'static [u8]>,
    fed_queues: Table<'txn, &'static str, &'static [u8]>,
    fed_seen: Table<'txn, ([u8; 32], u64), u64>,
    convicted: Table<'txn, [u8; 32], &'static [u8]>,
    files: Table<'txn, [u8; 32], &'static [u8]>,
    files_used: Table<'txn, &'static str, u64>,
    files_expiry: Table<'txn, (u64, [u8; 32]), ()>,
    history: Table<'txn, ([u8; 32], u64), &'static [u8]>,
    history_heads: Table<'txn, [u8; 32], &'static [u8]>,
    history_gaps: Table<'txn, ([u8; 32], [u8; 32]), u64>,
    link_slots: Table<'txn, [u8; 16], &'static [u8]>,
    link_offers: Table<'txn, [u8; 32], [u8; 16]>,
    device_info: Table<'txn, [u8; 32], &'static [u8]>,
    recovery: Table<'txn, &'static str, [u8; 32]>,
    revoked: Table<'txn, [u8; 32], &'static [u8]>,
    revoked_of: Table<'txn, (&'static str, [u8; 32]), u64>,
    revoking: Table<'txn, [u8; 32], &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, WriteError> {
        Ok(Self {
            tokens: txn.open_table(TOKENS).map_err(storage)?,
            names: txn.open_table(NAMES).map_err(storage)?,
            devices: txn.open_table(DEVICES).map_err(storage)?,
            key_packages: txn.open_table(KEY_PACKAGES).map_err(storage)?,
            last_resort: txn.open_table(LAST_RESORT).map_err(storage)?,
            counters: txn.open_table(COUNTERS).map_err(storage)?,
            inbox: txn.open_table(INBOX).map_err(storage)?,
            blocked: txn.open_table(BLOCKED).map_err(storage)?,
            meta: txn.open_table(META).map_err(storage)?,
            fed_queue: txn.open_table(FED_QUEUE).map_err(storage)?,
            fed_queues: txn.open_table(FED_QUEUES).map_err(storage)?,
            fed_seen: txn.open_table(FED_SEEN).map_err(storage)?,
            convicted: txn.open_table(CONVICTED).map_err(storage)?,
            files: txn.open_table(FILES).map_err(storage)?,
            files_used: txn.open_table(FILES_USED).map_err(storage)?,
            files_expiry: txn.open_table(FILES_EXPIRY).map_err(storage)?,
            history: txn.open_table(HISTORY).map_err(storage)?,
            history_heads: txn.open_table(HISTORY_HEADS).map_err(storage)?,
            history_gaps: txn.open_table(HISTORY_GAPS).map_err(storage)?,
            link_slots: txn.open_table(LINK_SLOTS).map_err(storage)?,
            link_offers: txn.open_table(LINK_OFFERS).map_err(storage)?,
            device_info: txn.open_table(DEVICE_INFO).map_err(storage)?,
            recovery: txn.open_table(RECOVERY).map_err(storage)?,
            revoked: txn.open_table(REVOKED).map_err(storage)?,
            revoked_of: txn.open_table(REVOKED_OF).map_err(storage)?,
            revoking: txn.open_table(REVOKING).map_err(storage)?,
        })
    }
}

/// Applies writes in one transaction with fsync. Storage failures fail the whole batch.
pub(super) fn apply_batch<'a>(
    db: &Database,
    writes: impl ExactSizeIterator<Item = &'a Write>,
) -> Vec<Result<Written, WriteError>> {
    let n = writes.len();
    let fail_all = |e: WriteError| vec![Err(e); n];
    let mut txn = match db.begin_write() {
        Ok(t) => t,
        Err(e) => return fail_all(storage(e)),
    };
    if let Err(e) = txn.set_durability(Durability::Immediate) {
        return fail_all(storage(e));
    }
    let results = match apply_all(&txn, writes) {
        Ok(results) => results,
        Err(e) => {
            let _ = txn.abort();
            return fail_all(e);
        }
    };
    match txn.commit() {
        Ok(()) => results,
        Err(e) => fail_all(storage(e)),
    }
}

/// Applies each write; the first storage error aborts them all.
fn apply_all<'a>(
    txn: &WriteTransaction,
    writes: impl ExactSizeIterator<Item = &'a Write>,
) -> Result<Vec<Result<Written, WriteError>>, WriteError> {
    let mut t = Tables::open(txn)?;
    let mut results = Vec::with_capacity(writes.len());
    for w in writes {
        match apply(&mut t, w) {
            Err(WriteError::Storage(e)) => return Err(WriteError::Storage(e)),
            r => results.push(r),
        }
    }
    Ok(results)
}

fn apply(t: &mut Tables<'_>, w: &Write) -> Result<Written, WriteError> {
    match w {
        Write::CreateToken { token, record } => {
            if t.tokens.get(token.as_str()).map_err(storage)?.is_some() {
                return Err(reject(ErrorCode::BadRequest, "token exists"));
            }
            t.tokens.insert(token.as_str(), encode_record(record).as_slice()).map_err(storage)?;
            Ok(Written::Done)
        }
        Write::Register { token, open, local_name, dir, now } => {
            register(t, token.as_deref(), *open, local_name, dir, *now)
        }
        Write::PublishDir { dir } => publish_dir(t, dir),
        Write::OfferLink { offerer, slot, expires } => offer_link(t, *offerer, *slot, *expires),
        Write::JoinLink { joiner, slot, hello, now } => join_link(t, *joiner, *slot, hello, *now),
        Write::AnswerLink { offerer, slot, answer, now } => {
            answer_link(t, *offerer, *slot, answer, *now)
        }
        Write::ExpireLinks { now } => expire_links(t, *now),
        Write::SetRecovery { device, key } => set_recovery(t, *device, key),
        Write::Revoke { by, revocation, recovered, now } => {
            revoke(t, *by, revocation, *recovered, *now)
        }
        Write::NameDevice { device, name } => {
            if device_record(t, *device)?.is_none() {
                return Err(reject(ErrorCode::NotFound, "device is not registered here"));
            }
            let mut info = device_info(t, *device)?;
            info.name = name.clone();
            t.device_info
                .insert(device.as_bytes(), encode_record(&info).as_slice())
                .map_err(storage)?;
            Ok(Written::Done)
        }
        Write::Seen(seen) => {
            for (device, at) in seen {
                if device_record(t, *device)?.is_none() {
                    continue;
                }
                let mut info = device_info(t, *device)?;
                if info.last_seen.is_some_and(|l| l >= *at) {
                    continue;
                }
                info.last_seen = Some(*at);
                let bytes = encode_record(&info);
                t.device_info.insert(device.as_bytes(), bytes.as_slice()).map_err(storage)?;
            }
            Ok(Written::Done)
        }
        Write::UploadKeyPackages { device, packages, last_resort, max_per_device } => {
            upload_key_packages(t, *device, packages, last_resort.as_ref(), *max_per_device)
        }
        Write::ClaimKeyPackage { device, now } => claim_key_package(t, *device, *now),
        Write::Enqueue { sender, envelope, now, quota } => {
            let recipient = envelope.recipient;
            let envelope = Envelope::Sealed(envelope.clone());
            let item = encode_record(&StoredItem {
                stored_at: *now,
                sender: *sender,
                envelope,
                history: None,
            });
            enqueue(t, recipient, &item, *quota)
        }
        Write::Fanout { sender, envelope, recipients, now, quota, onward, seen, history } => {
            if let Some(key) = seen
                && t.fed_seen.get(*key).map_err(storage)?.is_some()
            {
                return Ok(Written::Posted { delivered: Vec::new(), skipped: 0 });
            }
            // Room in every onward queue first: a refusal changes nothing.
            if let Some(o) = onward {
                let items = queue_items(*sender, std::slice::from_ref(envelope), *now);
                let hosts: Vec<&str> = o.hosts.iter().map(String::as_str).collect();
                queue_room(t, &hosts, &items, o.limits)?;
                for host in &hosts {
                    queue_encoded(t, host, &items)?;
                }
            }
            if let Some(key) = seen {
                t.fed_seen.insert(*key, now.0).map_err(storage)?;
            }
            // The channel's history first: the inbox records point into it.
            let channel = match envelope {
                Envelope::Post(p) => Some(p.channel),
                Envelope::Commit(c) => Some(c.channel),
                Envelope::Sealed(_) | Envelope::Report(_) | Envelope::Missed { .. } => None,
            };
            let place = match (channel, history) {
                (Some(channel), Some(limits)) => {
                    Some((channel, append_history(t, &channel, envelope, *now, *limits)?))
                }
                _ => None,
            };
            // One record, stored in every recipient's inbox (and one of its own for a
            // recipient whose inbox missed entries of the channel: it says from where).
            let record = |missed_from: Option<u64>| {
                encode_record(&StoredItem {
                    stored_at: *now,
                    sender: *sender,
                    envelope: envelope.clone(),
                    history: place.map(|(_, seq)| HistoryMark { seq, missed_from }),
                })
            };
            let item = record(None);
            let mut delivered = Vec::with_capacity(recipients.len());
            let mut skipped = 0u32;
            for recipient in recipients.iter() {
                let gap = match place {
                    Some((channel, _)) => {
                        let key = (*recipient.as_bytes(), channel.0);
                        t.history_gaps.get(key).map_err(storage)?.map(|g| (key, g.value()))
                    }
                    None => None,
                };
                let result = match gap {
                    Some((_, from)) => enqueue(t, *recipient, &record(Some(from)), *quota),
                    None => enqueue(t, *recipient, &item, *quota),
                };
                match result {
                    Ok(_) => {
                        if let Some((key, _)) = gap {
                            t.history_gaps.remove(key).map_err(storage)?;
                        }
                        delivered.push(*recipient);
                    }
                    // Members of other relays are theirs to serve: not counted.
                    Err(WriteError::Rejected { code: ErrorCode::NotFound, .. }) => {}
                    Err(WriteError::Rejected { .. }) => {
                        skipped = skipped.saturating_add(1);
                        // The inbox is full: the entry waits in the history. A notice past the
                        // quota says so now, and the next entry this device gets says so too.
                        if let (Some((channel, seq)), None) = (place, gap) {
                            t.history_gaps
                                .insert((*recipient.as_bytes(), channel.0), seq)
                                .map_err(storage)?;
                            let notice = encode_record(&StoredItem {
                                stored_at: *now,
                                sender: *sender,
                                envelope: Envelope::Missed { channel, from: seq },
                                history: None,
                            });
                            let unbounded = InboxQuota { max_items: u64::MAX, max_bytes: u64::MAX };
                            enqueue(t, *recipient, &notice, unbounded)?;
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Written::Posted { delivered, skipped })
        }
        Write::Ordered { key, index, fanned } => ordered(t, key, *index, fanned),
        Write::SetFannedOut { key, index } => {
            t.meta.insert(key.as_str(), index.to_be_bytes().as_slice()).map_err(storage)?;
            Ok(Written::Done)
        }
        Write::Ack { device, ids } => ack(t, *device, ids),
        Write::Expire { before, max } => expire(t, *before, *max),
        Write::ExpireHistory { before, max } => {
            Ok(Written::Removed(expire_history(t, *before, *max)?))
        }
        Write::Queue { host, sender, envelopes, now, limits } => {
            queue(t, host, *sender, envelopes, *now, *limits)
        }
        Write::Unqueue { host, seqs } => unqueue(t, host, seqs),
        Write::Forwarded { origin, seq, sender, envelope, now, quota } => {
            if t.fed_seen.get((*origin, *seq)).map_err(storage)?.is_some() {
                return Ok(Written::Done);
            }
            let item = StoredItem {
                stored_at: *now,
                sender: *sender,
                envelope: Envelope::Sealed(envelope.clone()),
                history: None,
            };
            let written = enqueue(t, envelope.recipient, &encode_record(&item), *quota)?;
            t.fed_seen.insert((*origin, *seq), now.0).map_err(storage)?;
            Ok(written)
        }
        Write::ExpireFederation { before, max } => expire_federation(t, *before, *max),
        Write::Convict { signer, proof } => {
            let new = t.convicted.get(*signer).map_err(storage)?.is_none();
            if new {
                t.convicted.insert(*signer, proof.as_slice()).map_err(storage)?;
            }
            Ok(Written::Convicted { new })
        }
        Write::PinFile { hash, pin, quota } => {
            // A pin that holds stays as it is; an expired one (not swept yet) is replaced: the
            // file was asked for again.
            let old = match t.files.get(*hash).map_err(storage)? {
                Some(old) => Some(decode_record::<FilePin>(old.value(), "files").map_err(corrupt)?),
                None => None,
            };
            if let Some(old) = &old
                && old.expires > pin.pinned
            {
                return Ok(Written::Pinned(old.clone()));
            }
            // Checked before anything changes: a refusal changes nothing.
            let mut used =
                t.files_used.get(pin.user.as_str()).map_err(storage)?.map_or(0, |v| v.value());
            if let Some(old) = old.as_ref().filter(|o| o.user == pin.user) {
                used = used.saturating_sub(old.len);
            }
            if used.saturating_add(pin.len) > *quota {
                return Err(reject(
                    ErrorCode::QuotaExceeded { retry_after_ms: 0 },
                    format!(
                        "the user's files would take {} bytes here, over the quota of {quota}",
                        used.saturating_add(pin.len)
                    ),
                ));
            }
            if let Some(old) = &old {
                unpin(t, hash, old)?;
            }
            let bytes = encode_record(pin);
            t.files.insert(*hash, bytes.as_slice()).map_err(storage)?;
            // (`used` already leaves out the expired pin just replaced, if it was this user's.)
            t.files_used
                .insert(pin.user.as_str(), used.saturating_add(pin.len))
                .map_err(storage)?;
            t.files_expiry.insert((pin.expires.0, *hash), ()).map_err(storage)?;
            Ok(Written::Pinned(pin.clone()))
        }
        Write::ExpireFiles { now, max } => {
            // The earliest expiries first, from the index: no pin that holds is read.
            let mut due = Vec::new();
            for entry in t.files_expiry.range(..=(now.0, [0xff; 32])).map_err(storage)? {
                let (k, _) = entry.map_err(storage)?;
                due.push(k.value().1);
                if due.len() >= *max {
                    break;
                }
            }
            let mut gone = Vec::new();
            for hash in due {
                let pin = match t.files.get(hash).map_err(storage)? {
                    Some(v) => decode_record::<FilePin>(v.value(), "files").map_err(corrupt)?,
                    None => continue,
                };
                unpin(t, &hash, &pin)?;
                gone.push(hash);
            }
            Ok(Written::Unpinned(gone))
        }
        Write::Block { host, blocked, now } => {
            if *blocked {
                t.blocked.insert(host.as_str(), now.0).map_err(storage)?;
            } else {
                t.blocked.remove(host.as_str()).map_err(storage)?;
            }
            Ok(Written::Done)
        }
    }
}

/// Deletes the pin of `hash` (which is `pin`), with its place in the indexes.
fn unpin(t: &mut Tables<'_>, hash: &[u8; 32], pin: &FilePin) -> Result<(), WriteError> {
    t.files.remove(*hash).map_err(storage)?;
    t.files_expiry.remove((pin.expires.0, *hash)).map_err(storage)?;
    let used = t.files_used.get(pin.user.as_str()).map_err(storage)?.map_or(0, |v| v.value());
    let left = used.saturating_sub(pin.len);
    if left == 0 {
        t.files_used.remove(pin.user.as_str()).map_err(storage)?;
    } else {
        t.files_used.insert(pin.user.as_str(), left).map_err(storage)?;
    }
    Ok(())
}

/// One log entry's fan-out, once: each winner's commit to its recipients (those not
/// registered here are skipped), the Welcomes to theirs (a Welcome refused for a full inbox is
/// skipped and logged: the commit is ordered whatever happens to it), and the watermark.
fn ordered(
    t: &mut Tables<'_>,
    key: &str,
    index: u64,
    fanned: &[Fanned],
) -> Result<Written, WriteError> {
    let watermark = match t.meta.get(key).map_err(storage)? {
        Some(v) => {
            let bytes: [u8; 8] = v
                .value()
                .try_into()
                .map_err(|_| WriteError::Storage("corrupt fan-out watermark".into()))?;
            Some(u64::from_be_bytes(bytes))
        }
        None => None,
    };
    if watermark.is_some_and(|w| index <= w) {
        return Ok(Written::AlreadyFannedOut);
    }
    let (mut delivered, mut skipped) = (Vec::new(), 0u32);
    for f in fanned {
        fan_out_one(t, f, &mut delivered, &mut skipped)?;
    }
    t.meta.insert(key, index.to_be_bytes().as_slice()).map_err(storage)?;
    Ok(Written::Posted { delivered, skipped })
}

/// One winner's part of [`ordered`].
fn fan_out_one(
    t: &mut Tables<'_>,
    fanned: &Fanned,
    delivered: &mut Vec<DeviceId>,
    skipped: &mut u32,
) -> Result<(), WriteError> {
    let Fanned { commit, welcomes, onward } = fanned;
    match apply(t, commit)? {
        Written::Posted { delivered: d, skipped: s } => {
            delivered.extend(d);
            *skipped = skipped.saturating_add(s);
        }
        other => return Err(WriteError::Storage(format!("unexpected {other:?}"))),
    }
    for welcome in welcomes {
        let Write::Enqueue { envelope, sender, now, .. } = welcome else { continue };
        match apply(t, welcome) {
            Ok(_) => delivered.push(envelope.recipient),
            // A device of another relay: queued for the relays the commit brings in.
            Err(WriteError::Rejected { code: ErrorCode::NotFound, .. }) if onward.is_some() => {
                let Some(o) = onward else { continue };
                let items = queue_items(*sender, &[Envelope::Sealed(envelope.clone())], *now);
                let hosts: Vec<&str> = o.hosts.iter().map(String::as_str).collect();
                match queue_room(t, &hosts, &items, o.limits) {
                    Ok(()) => {
                        for host in &hosts {
                            queue_encoded(t, host, &items)?;
                        }
                    }
                    Err(WriteError::Rejected { message, .. }) => {
                        tracing::warn!(%message, "a Welcome for another relay was not queued");
                        *skipped = skipped.saturating_add(1);
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(WriteError::Rejected { message, .. }) => {
                tracing::warn!(%message, "a Welcome of an ordered commit was not delivered");
                *skipped = skipped.saturating_add(1);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_counters(t: &Tables<'_>, device: DeviceId) -> Result<Counters, WriteError> {
    match t.counters.get(device.as_bytes()).map_err(storage)? {
        Some(v) => decode_record(v.value(), "counters").map_err(corrupt),
        None => Ok(Counters::default()),
    }
}

fn write_counters(t: &mut Tables<'_>, device: DeviceId, c: &Counters) -> Result<(), WriteError> {
    t.counters.insert(device.as_bytes(), encode_record(c).as_slice()).map_err(storage)?;
    Ok(())
}

fn device_record(t: &Tables<'_>, device: DeviceId) -> Result<Option<DeviceRecord>, WriteError> {
    let v = t.devices.get(device.as_bytes()).map_err(storage)?;
    v.map(|v| decode_record(v.value(), "devices").map_err(corrupt)).transpose()
}

fn device_info(t: &Tables<'_>, device: DeviceId) -> Result<DeviceInfo, WriteError> {
    match t.device_info.get(device.as_bytes()).map_err(storage)? {
        Some(v) => decode_record(v.value(), "device-info").map_err(corrupt),
        None => Ok(DeviceInfo::default()),
    }
}

fn link_slot(t: &Tables<'_>, slot: LinkSlot) -> Result<Option<LinkSlotRecord>, WriteError> {
    let v = t.link_slots.get(&slot.0).map_err(storage)?;
    v.map(|v| decode_record(v.value(), "link-slots").map_err(corrupt)).transpose()
}

fn set_recovery(
    t: &mut Tables<'_>,
    device: DeviceId,
    key: &chitchat_proto::PublicKey,
) -> Result<Written, WriteError> {
    let Some(record) = device_record(t, device)? else {
        return Err(reject(ErrorCode::NotFound, "device is not registered here"));
    };
    let name = record.local_name.as_str();
    if let Some(existing) = t.recovery.get(name).map_err(storage)? {
        // A retry after a lost answer: done.
        if existing.value() == key.0 {
            return Ok(Written::Done);
        }
        return Err(reject(ErrorCode::Forbidden, "the user has a recovery code already"));
    }
    if name_devices(t, name)?.len() != 1 {
        return Err(reject(
            ErrorCode::Forbidden,
            "a recovery code is set by the user's first device, before it links another",
        ));
    }
    t.recovery.insert(name, key.0).map_err(storage)?;
    Ok(Written::Done)
}

/// How long a signature of a revocation without a quorum counts: a day.
pub(crate) const REVOCATION_PENDING_MS: u64 = 24 * 3600 * 1000;

fn revoke(
    t: &mut Tables<'_>,
    by: DeviceId,
    revocation: &chitchat_proto::identity::Revocation,
    recovered: bool,
    now: Timestamp,
) -> Result<Written, WriteError> {
    use chitchat_proto::identity::revocation::{SETTLED_MS, quorum, tally};
    let target = revocation.body.target;
    let name = revocation.body.user.local.as_str();
    if t.revoked.get(target.as_bytes()).map_err(storage)?.is_some() {
        return Ok(Written::Revoking { revoked: true, signed: 0, needed: 0 });
    }
    let Some(by_record) = device_record(t, by)? else {
        return Err(reject(ErrorCode::NotFound, "device is not registered here"));
    };
    if by_record.local_name != name {
        return Err(reject(ErrorCode::Forbidden, "a device revokes only devices of its own user"));
    }
    if !revocation.signers.iter().any(|(d, _)| *d == by) {
        return Err(reject(
            ErrorCode::BadRequest,
            "the revocation lacks the asking device's signature",
        ));
    }
    let Some(target_record) = device_record(t, target)?.filter(|r| r.local_name == name) else {
        return Err(reject(ErrorCode::NotFound, format!("no such device of {name}")));
    };
    let mut devices = std::collections::BTreeSet::new();
    let mut voters = std::collections::BTreeSet::new();
    for d in name_devices(t, name)? {
        if let Some(r) = device_record(t, d)? {
            devices.insert(d);
            if r.registered.plus_ms(SETTLED_MS) <= now {
                voters.insert(d);
            }
        }
    }
    // The signatures of the last day, and this request's.
    let fresh = |at: Timestamp| at.plus_ms(REVOCATION_PENDING_MS) > now;
    let mut pending = match t.revoking.get(target.as_bytes()).map_err(storage)? {
        Some(v) => decode_record::<PendingRevocation>(v.value(), "revoking").map_err(corrupt)?,
        None => PendingRevocation {
            revocation: chitchat_proto::identity::Revocation::new(
                target,
                revocation.body.user.clone(),
            ),
            signed_at: Vec::new(),
        },
    };
    pending.signed_at.retain(|(d, at)| fresh(*at) && devices.contains(d));
    let kept: Vec<DeviceId> = pending.signed_at.iter().map(|(d, _)| *d).collect();
    pending.revocation.signers.retain(|(d, _)| kept.contains(d));
    pending.revocation.recovery = None;
    let mut incoming = revocation.clone();
    incoming.signers.retain(|(d, _)| devices.contains(d));
    pending
        .revocation
        .merge(&incoming)
        .map_err(|e| reject(ErrorCode::BadRequest, format!("revocation: {e}")))?;
    for (d, _) in &incoming.signers {
        pending.signed_at.retain(|(x, _)| x != d);
        pending.signed_at.push((*d, now));
    }
    let signed: std::collections::BTreeSet<DeviceId> =
        pending.revocation.signers.iter().map(|(d, _)| *d).collect();
    match quorum(&devices, &voters, target, &signed, recovered) {
        Ok(()) => {
            let (counted, needed) = tally(&voters, target, &signed);
            // (The merge brought the recovery signature along, if it counted.)
            revoke_device(t, target_record, pending.revocation, now)?;
            Ok(Written::Revoking { revoked: true, signed: counted, needed })
        }
        Err(chitchat_proto::identity::IdentityError::Quorum { signed, needed }) => {
            let bytes = encode_record(&pending);
            t.revoking.insert(target.as_bytes(), bytes.as_slice()).map_err(storage)?;
            Ok(Written::Revoking { revoked: false, signed, needed })
        }
        Err(e) => Err(reject(ErrorCode::BadRequest, format!("revocation: {e}"))),
    }
}

/// Takes a device out of its user for good: its name, record, KeyPackages, inbox, counters,
/// link offer and what it said of itself go; the revocation is kept.
fn revoke_device(
    t: &mut Tables<'_>,
    record: DeviceRecord,
    revocation: chitchat_proto::identity::Revocation,
    now: Timestamp,
) -> Result<(), WriteError> {
    let device = revocation.body.target;
    let key = *device.as_bytes();
    let name = record.local_name.clone();
    let mut devices = name_devices(t, &name)?;
    devices.retain(|d| *d != device);
    t.names.insert(name.as_str(), encode_record(&devices).as_slice()).map_err(storage)?;
    t.devices.remove(&key).map_err(storage)?;
    t.key_packages.retain_in((key, 0)..=(key, u64::MAX), |_, _| false).map_err(storage)?;
    t.inbox.retain_in((key, 0)..=(key, u64::MAX), |_, _| false).map_err(storage)?;
    t.last_resort.remove(&key).map_err(storage)?;
    t.counters.remove(&key).map_err(storage)?;
    t.device_info.remove(&key).map_err(storage)?;
    if let Some(slot) = t.link_offers.remove(&key).map_err(storage)? {
        let slot = slot.value();
        t.link_slots.remove(&slot).map_err(storage)?;
    }
    t.revoking.remove(&key).map_err(storage)?;
    let revoked = RevokedRecord {
        local_name: name.clone(),
        dir: record.dir,
        registered: record.registered,
        revocation,
        at: now,
    };
    t.revoked.insert(&key, encode_record(&revoked).as_slice()).map_err(storage)?;
    t.revoked_of.insert((name.as_str(), key), now.0).map_err(storage)?;
    Ok(())
}

fn name_devices(t: &Tables<'_>, name: &str) -> Result<Vec<DeviceId>, WriteError> {
    match t.names.get(name).map_err(storage)? {
        Some(v) => decode_record(v.value(), "names").map_err(corrupt),
        None => Ok(Vec::new()),
    }
}

fn offer_link(
    t: &mut Tables<'_>,
    offerer: DeviceId,
    slot: LinkSlot,
    expires: Timestamp,
) -> Result<Written, WriteError> {
    if device_record(t, offerer)?.is_none() {
        return Err(reject(ErrorCode::NotFound, "device is not registered here"));
    }
    if let Some(existing) = link_slot(t, slot)? {
        // A retry of the same offer keeps the slot as it is (a hello may be in it already).
        if existing.offerer == offerer {
            return Ok(Written::Done);
        }
        return Err(reject(ErrorCode::Forbidden, "the slot is taken"));
    }
    if let Some(previous) = t.link_offers.get(offerer.as_bytes()).map_err(storage)? {
        let previous = previous.value();
        t.link_slots.remove(&previous).map_err(storage)?;
    }
    let record = LinkSlotRecord { offerer, expires, hello: None, answer: None };
    t.link_slots.insert(&slot.0, encode_record(&record).as_slice()).map_err(storage)?;
    t.link_offers.insert(offerer.as_bytes(), slot.0).map_err(storage)?;
    Ok(Written::Done)
}

fn join_link(
    t: &mut Tables<'_>,
    joiner: DeviceId,
    slot: LinkSlot,
    hello: &LinkHello,
    now: Timestamp,
) -> Result<Written, WriteError> {
    let Some(mut record) = link_slot(t, slot)?.filter(|r| r.expires > now) else {
        return Err(reject(ErrorCode::TokenInvalid, "unknown or expired link code"));
    };
    match &record.hello {
        Some(h) if h == hello => return Ok(Written::Done), // a retry
        // The same device again (it restarted before the answer): its newer hello counts.
        Some(h) if h.dir.device() == joiner && record.answer.is_none() => {}
        Some(h) if h.dir.device() == joiner => return Ok(Written::Done),
        Some(_) => return Err(reject(ErrorCode::TokenUsed, "link code already used")),
        None => {}
    }
    if hello.dir.device() != joiner {
        return Err(reject(ErrorCode::Forbidden, "a device joins only with its own record"));
    }
    if device_record(t, joiner)?.is_some() {
        return Err(reject(ErrorCode::Forbidden, "this device is registered here already"));
    }
    record.hello = Some(hello.clone());
    t.link_slots.insert(&slot.0, encode_record(&record).as_slice()).map_err(storage)?;
    Ok(Written::Done)
}

fn answer_link(
    t: &mut Tables<'_>,
    offerer: DeviceId,
    slot: LinkSlot,
    answer: &LinkAnswer,
    now: Timestamp,
) -> Result<Written, WriteError> {
    let Some(mut record) = link_slot(t, slot)?.filter(|r| r.expires > now) else {
        return Err(reject(ErrorCode::TokenInvalid, "unknown or expired link code"));
    };
    if record.offerer != offerer {
        return Err(reject(ErrorCode::Forbidden, "not this device's slot"));
    }
    if record.hello.is_none() {
        return Err(reject(ErrorCode::BadRequest, "no device joined the slot yet"));
    }
    match &record.answer {
        Some(a) if a == answer => return Ok(Written::Done),
        Some(_) => return Err(reject(ErrorCode::Forbidden, "the slot is answered")),
        None => {}
    }
    record.answer = Some(answer.clone());
    t.link_slots.insert(&slot.0, encode_record(&record).as_slice()).map_err(storage)?;
    Ok(Written::Done)
}

/// Deletes the closed link slots (at most one per registered device exists).
fn expire_links(t: &mut Tables<'_>, now: Timestamp) -> Result<Written, WriteError> {
    let mut gone = Vec::new();
    for entry in t.link_slots.iter().map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        let record: LinkSlotRecord = decode_record(v.value(), "link-slots").map_err(corrupt)?;
        if record.expires <= now {
            gone.push((k.value(), record.offerer));
        }
    }
    for (slot, offerer) in &gone {
        t.link_slots.remove(slot).map_err(storage)?;
        let current = t.link_offers.get(offerer.as_bytes()).map_err(storage)?.map(|v| v.value());
        if current == Some(*slot) {
            t.link_offers.remove(offerer.as_bytes()).map_err(storage)?;
        }
    }
    Ok(Written::Removed(gone.len() as u64))
}

fn register(
    t: &mut Tables<'_>,
    token: Option<&str>,
    open: bool,
    local_name: &str,
    dir: &Dir,
    now: Timestamp,
) -> Result<Written, WriteError> {
    let device = dir.device();
    // A revoked device stays out: its record may still name a device of the user's, which
    // would otherwise let it back in without an invite.
    if t.revoked.get(device.as_bytes()).map_err(storage)?.is_some() {
        return Err(reject(ErrorCode::Revoked, "this device was revoked"));
    }
    // A retry after a lost answer finds the device registered under the same name: done.
    if let Some(existing) = device_record(t, device)? {
        if existing.local_name == local_name {
            return Ok(Written::Done);
        }
        return Err(reject(ErrorCode::Forbidden, "device is registered under another name"));
    }
    // A name holds one user: another device may join it only when linked both ways with one of
    // the devices already there, and then needs no invite (the user's own device vouches).
    let mut devices: Vec<DeviceId> = match t.names.get(local_name).map_err(storage)? {
        Some(v) => decode_record(v.value(), "names").map_err(corrupt)?,
        None => Vec::new(),
    };
    if !devices.is_empty() {
        let mut linked_to_user = false;
        for d in &devices {
            if let Some(rec) = device_record(t, *d)? {
                linked_to_user |= linked(&rec.dir, dir).is_ok();
            }
        }
        if !linked_to_user {
            return Err(reject(ErrorCode::NameTaken, format!("{local_name} is taken")));
        }
    }
    let token = if devices.is_empty() { token } else { None };
    let token_record = match token {
        Some(token) => {
            let Some(v) = t.tokens.get(token).map_err(storage)? else {
                return Err(reject(ErrorCode::TokenInvalid, "unknown invite token"));
            };
            let record: TokenRecord = decode_record(v.value(), "tokens").map_err(corrupt)?;
            if record.used_by.is_some() {
                return Err(reject(ErrorCode::TokenUsed, "invite token already used"));
            }
            if now >= record.expires {
                return Err(reject(ErrorCode::TokenInvalid, "invite token expired"));
            }
            Some((token, record))
        }
        None if open || !devices.is_empty() => None,
        None => {
            return Err(reject(
                ErrorCode::RegistrationClosed,
                "registration needs an invite token",
            ));
        }
    };
    // A user is at most MAX_LINKED_DEVICES devices (a record lists at most that many others, so
    // more could never all be linked with each other).
    if devices.len() >= chitchat_proto::identity::MAX_LINKED_DEVICES {
        return Err(reject(ErrorCode::Forbidden, "too many devices for one name"));
    }
    // Checks are done; write.
    if let Some((token, mut record)) = token_record {
        record.used_by = Some(device);
        t.tokens.insert(token, encode_record(&record).as_slice()).map_err(storage)?;
    }
    devices.push(device);
    t.names.insert(local_name, encode_record(&devices).as_slice()).map_err(storage)?;
    let record =
        DeviceRecord { local_name: local_name.to_owned(), dir: dir.clone(), registered: now };
    t.devices.insert(device.as_bytes(), encode_record(&record).as_slice()).map_err(storage)?;
    Ok(Written::Done)
}

fn publish_dir(t: &mut Tables<'_>, dir: &Dir) -> Result<Written, WriteError> {
    let device = dir.device();
    let Some(mut record) = device_record(t, device)? else {
        return Err(reject(ErrorCode::NotFound, "device is not registered here"));
    };
    if record.dir == *dir {
        return Ok(Written::Done); // a retry
    }
    if !dir.supersedes(&record.dir) {
        return Err(reject(
            ErrorCode::StaleSequence,
            format!("sequence {} is not above the stored {}", dir.body.seq, record.dir.body.seq),
        ));
    }
    record.dir = dir.clone();
    t.devices.insert(device.as_bytes(), encode_record(&record).as_slice()).map_err(storage)?;
    Ok(Written::Done)
}

fn upload_key_packages(
    t: &mut Tables<'_>,
    device: DeviceId,
    packages: &[(Timestamp, Bytes)],
    last_resort: Option<&(Timestamp, Bytes)>,
    max_per_device: u64,
) -> Result<Written, WriteError> {
    if device_record(t, device)?.is_none() {
        return Err(reject(ErrorCode::NotFound, "device is not registered here"));
    }
    let mut c = read_counters(t, device)?;
    if c.key_packages + packages.len() as u64 > max_per_device {
        return Err(reject(
            ErrorCode::QuotaExceeded { retry_after_ms: 0 },
            format!("at most {max_per_device} unclaimed key packages per device"),
        ));
    }
    for (not_after, bytes) in packages {
        let kp = StoredKeyPackage { not_after: *not_after, bytes: bytes.clone() };
        let key = (*device.as_bytes(), c.next_key_package);
        t.key_packages.insert(key, encode_record(&kp).as_slice()).map_err(storage)?;
        c.next_key_package += 1;
        c.key_packages += 1;
    }
    if let Some((not_after, bytes)) = last_resort {
        let kp = StoredKeyPackage { not_after: *not_after, bytes: bytes.clone() };
        t.last_resort.insert(device.as_bytes(), encode_record(&kp).as_slice()).map_err(storage)?;
    }
    write_counters(t, device, &c)?;
    Ok(Written::KeyPackages { available: c.key_packages })
}

fn claim_key_package(
    t: &mut Tables<'_>,
    device: DeviceId,
    now: Timestamp,
) -> Result<Written, WriteError> {
    let mut c = read_counters(t, device)?;
    let key = *device.as_bytes();
    // Oldest first; expired packages met on the way are deleted, never served.
    let mut found = None;
    let mut expired = Vec::new();
    for entry in t.key_packages.range((key, 0)..=(key, u64::MAX)).map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        let kp: StoredKeyPackage = decode_record(v.value(), "keypackages").map_err(corrupt)?;
        if kp.not_after <= now {
            expired.push(k.value().1);
            continue;
        }
        found = Some((k.value().1, kp.bytes));
        break;
    }
    for id in &expired {
        t.key_packages.remove((key, *id)).map_err(storage)?;
    }
    c.key_packages = c.key_packages.saturating_sub(expired.len() as u64);
    if let Some((id, bytes)) = found {
        t.key_packages.remove((key, id)).map_err(storage)?;
        c.key_packages = c.key_packages.saturating_sub(1);
        write_counters(t, device, &c)?;
        return Ok(Written::KeyPackage(bytes.0));
    }
    if !expired.is_empty() {
        write_counters(t, device, &c)?;
    }
    if let Some(v) = t.last_resort.get(device.as_bytes()).map_err(storage)? {
        let kp: StoredKeyPackage = decode_record(v.value(), "keypackages-last").map_err(corrupt)?;
        if kp.not_after > now {
            return Ok(Written::KeyPackage(kp.bytes.0));
        }
    }
    // Expired packages were cleaned up even though nothing is served: keep that, but say so.
    Err(reject(ErrorCode::NotFound, "no key package available for the device"))
}

/// Stores an encoded [`StoredItem`] in `recipient`'s inbox, within its quota.
fn enqueue(
    t: &mut Tables<'_>,
    recipient: DeviceId,
    bytes: &[u8],
    quota: InboxQuota,
) -> Result<Written, WriteError> {
    // Existence only: decoding the whole record on every enqueue costs more than the insert.
    if t.devices.get(recipient.as_bytes()).map_err(storage)?.is_none() {
        return Err(reject(ErrorCode::NotFound, "recipient is not registered here"));
    }
    let mut c = read_counters(t, recipient)?;
    if c.inbox_items >= quota.max_items
        || c.inbox_bytes.saturating_add(bytes.len() as u64) > quota.max_bytes
    {
        return Err(reject(
            ErrorCode::QuotaExceeded { retry_after_ms: 60_000 },
            "recipient's inbox is full",
        ));
    }
    let id = c.next_inbox;
    t.inbox.insert((*recipient.as_bytes(), id), bytes).map_err(storage)?;
    c.next_inbox = c.next_inbox.saturating_add(1);
    c.inbox_items = c.inbox_items.saturating_add(1);
    c.inbox_bytes = c.inbox_bytes.saturating_add(bytes.len() as u64);
    write_counters(t, recipient, &c)?;
    Ok(Written::Enqueued { id })
}

/// Appends a post or commit to its channel's history; returns its position. Past the
/// channel's bounds, the oldest entries go.
fn append_history(
    t: &mut Tables<'_>,
    channel: &ChannelId,
    envelope: &Envelope,
    now: Timestamp,
    limits: HistoryLimits,
) -> Result<u64, WriteError> {
    let mut head: HistoryHead = match t.history_heads.get(channel.0).map_err(storage)? {
        Some(v) => decode_record(v.value(), "history-heads").map_err(corrupt)?,
        None => HistoryHead::default(),
    };
    let seq = head.next;
    let entry = encode_record(&StoredHistory { stored_at: now, envelope: encode(envelope).into() });
    t.history.insert((channel.0, seq), entry.as_slice()).map_err(storage)?;
    head.next = head.next.saturating_add(1);
    head.bytes = head.bytes.saturating_add(entry.len() as u64);
    while head.first < seq
        && (head.next - head.first > limits.max_entries || head.bytes > limits.max_bytes)
    {
        if let Some(v) = t.history.remove((channel.0, head.first)).map_err(storage)? {
            head.bytes = head.bytes.saturating_sub(v.value().len() as u64);
        }
        head.first += 1;
    }
    t.history_heads.insert(channel.0, encode_record(&head).as_slice()).map_err(storage)?;
    Ok(seq)
}

/// Deletes history entries stored before `before`, at most `max` of them.
fn expire_history(t: &mut Tables<'_>, before: Timestamp, max: usize) -> Result<u64, WriteError> {
    let mut heads: Vec<([u8; 32], HistoryHead)> = Vec::new();
    for entry in t.history_heads.iter().map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        heads.push((k.value(), decode_record(v.value(), "history-heads").map_err(corrupt)?));
    }
    let mut removed = 0u64;
    for (channel, mut head) in heads {
        let before_first = head.first;
        while head.first < head.next && removed < max as u64 {
            let Some(v) = t.history.get((channel, head.first)).map_err(storage)? else {
                head.first += 1;
                continue;
            };
            let stored: StoredHistory = decode_record(v.value(), "history").map_err(corrupt)?;
            let len = v.value().len() as u64;
            drop(v);
            if stored.stored_at >= before {
                break;
            }
            t.history.remove((channel, head.first)).map_err(storage)?;
            head.bytes = head.bytes.saturating_sub(len);
            head.first += 1;
            removed += 1;
        }
        if head.first != before_first {
            t.history_heads.insert(channel, encode_record(&head).as_slice()).map_err(storage)?;
        }
    }
    Ok(removed)
}

fn ack(t: &mut Tables<'_>, device: DeviceId, ids: &[u64]) -> Result<Written, WriteError> {
    let mut c = read_counters(t, device)?;
    let mut removed = 0;
    for id in ids {
        if let Some(v) = t.inbox.remove((*device.as_bytes(), *id)).map_err(storage)? {
            c.inbox_items = c.inbox_items.saturating_sub(1);
            c.inbox_bytes = c.inbox_bytes.saturating_sub(v.value().len() as u64);
            removed += 1;
        }
    }
    if removed > 0 {
        write_counters(t, device, &c)?;
    }
    Ok(Written::Removed(removed))
}

fn expire(t: &mut Tables<'_>, before: Timestamp, max: usize) -> Result<Written, WriteError> {
    // Each item: its key, its length, and the channel and position it leaves missed.
    type Old = (([u8; 32], u64), u64, Option<([u8; 32], u64)>);
    let mut old: Vec<Old> = Vec::new();
    for entry in t.inbox.iter().map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        let item = StoredItem::decode(v.value()).map_err(corrupt)?;
        if item.stored_at < before {
            // A post or commit that expires unread is missed: its device's next entry of the
            // channel says so (from the first position missed).
            let channel = match &item.envelope {
                Envelope::Post(p) => Some(p.channel.0),
                Envelope::Commit(c) => Some(c.channel.0),
                Envelope::Sealed(_) | Envelope::Report(_) | Envelope::Missed { .. } => None,
            };
            let missed = channel
                .zip(item.history)
                .map(|(c, mark)| (c, mark.missed_from.unwrap_or(mark.seq).min(mark.seq)));
            old.push((k.value(), v.value().len() as u64, missed));
            if old.len() >= max {
                break;
            }
        }
    }
    let mut per_device: std::collections::BTreeMap<[u8; 32], (u64, u64)> = Default::default();
    for (key, len, missed) in &old {
        if let Some((channel, from)) = missed {
            let gap = (key.0, *channel);
            let earlier = t.history_gaps.get(gap).map_err(storage)?.map(|g| g.value());
            t.history_gaps.insert(gap, earlier.map_or(*from, |e| e.min(*from))).map_err(storage)?;
        }
        t.inbox.remove(*key).map_err(storage)?;
        let e = per_device.entry(key.0).or_default();
        e.0 += 1;
        e.1 += len;
    }
    for (device, (items, bytes)) in per_device {
        let device = DeviceId(chitchat_proto::PublicKey(device));
        let mut c = read_counters(t, device)?;
        c.inbox_items = c.inbox_items.saturating_sub(items);
        c.inbox_bytes = c.inbox_bytes.saturating_sub(bytes);
        write_counters(t, device, &c)?;
    }
    Ok(Written::Removed(old.len() as u64))
}

fn queue_counters(t: &Tables<'_>, host: &str) -> Result<QueueCounters, WriteError> {
    match t.fed_queues.get(host).map_err(storage)? {
        Some(v) => decode_record(v.value(), "fed-queues").map_err(corrupt),
        // Numbers start at random, so a relay whose database was lost never reuses the number
        // of a payload the other relay remembers as stored (it would be dropped as a repeat).
        None => Ok(QueueCounters { next_seq: rand::random::<u64>() >> 2, ..Default::default() }),
    }
}

fn queued_total(t: &Tables<'_>) -> Result<u64, WriteError> {
    match t.meta.get(FED_QUEUED_TOTAL).map_err(storage)? {
        Some(v) => {
            let bytes: [u8; 8] = v
                .value()
                .try_into()
                .map_err(|_| WriteError::Storage("corrupt federation queue total".into()))?;
            Ok(u64::from_be_bytes(bytes))
        }
        None => Ok(0),
    }
}

fn set_queue_counts(
    t: &mut Tables<'_>,
    host: &str,
    c: &QueueCounters,
    total: u64,
) -> Result<(), WriteError> {
    t.fed_queues.insert(host, encode_record(c).as_slice()).map_err(storage)?;
    t.meta.insert(FED_QUEUED_TOTAL, total.to_be_bytes().as_slice()).map_err(storage)?;
    Ok(())
}

fn queue(
    t: &mut Tables<'_>,
    host: &str,
    sender: DeviceId,
    envelopes: &[Envelope],
    now: Timestamp,
    limits: QueueLimits,
) -> Result<Written, WriteError> {
    let items = queue_items(sender, envelopes, now);
    queue_room(t, &[host], &items, limits)?;
    queue_encoded(t, host, &items)
}

fn queue_items(sender: DeviceId, envelopes: &[Envelope], now: Timestamp) -> Vec<Vec<u8>> {
    envelopes
        .iter()
        .map(|e| encode_record(&QueuedForward { queued_at: now, sender, envelope: e.clone() }))
        .collect()
}

/// Checks that `items` fit the queue of every host of `hosts` (all of them together for the
/// total bound), changing nothing.
fn queue_room(
    t: &Tables<'_>,
    hosts: &[&str],
    items: &[Vec<u8>],
    limits: QueueLimits,
) -> Result<(), WriteError> {
    let n = items.len() as u64;
    let bytes: u64 = items.iter().map(|i| i.len() as u64).sum();
    let total = queued_total(t)?;
    if total.saturating_add(n.saturating_mul(hosts.len() as u64)) > limits.max_total_items {
        return Err(reject(
            ErrorCode::QuotaExceeded { retry_after_ms: 60_000 },
            "the queues for other relays are full",
        ));
    }
    for host in hosts {
        let c = queue_counters(t, host)?;
        if c.items.saturating_add(n) > limits.max_items
            || c.bytes.saturating_add(bytes) > limits.max_bytes
        {
            return Err(reject(
                ErrorCode::QuotaExceeded { retry_after_ms: 60_000 },
                format!("the queue for {host} is full"),
            ));
        }
    }
    Ok(())
}

/// Appends encoded items to `host`'s queue (room already checked).
fn queue_encoded(t: &mut Tables<'_>, host: &str, items: &[Vec<u8>]) -> Result<Written, WriteError> {
    let mut c = queue_counters(t, host)?;
    let total = queued_total(t)?;
    let n = items.len() as u64;
    let bytes: u64 = items.iter().map(|i| i.len() as u64).sum();
    let first = c.next_seq;
    for item in items {
        t.fed_queue.insert((host, c.next_seq), item.as_slice()).map_err(storage)?;
        c.next_seq = c.next_seq.saturating_add(1);
    }
    c.items = c.items.saturating_add(n);
    c.bytes = c.bytes.saturating_add(bytes);
    set_queue_counts(t, host, &c, total.saturating_add(n))?;
    Ok(Written::Enqueued { id: first })
}

fn unqueue(t: &mut Tables<'_>, host: &str, seqs: &[u64]) -> Result<Written, WriteError> {
    let mut c = queue_counters(t, host)?;
    let mut removed = 0u64;
    let mut bytes = 0u64;
    for seq in seqs {
        if let Some(v) = t.fed_queue.remove((host, *seq)).map_err(storage)? {
            removed += 1;
            bytes += v.value().len() as u64;
        }
    }
    if removed > 0 {
        c.items = c.items.saturating_sub(removed);
        c.bytes = c.bytes.saturating_sub(bytes);
        let total = queued_total(t)?.saturating_sub(removed);
        set_queue_counts(t, host, &c, total)?;
    }
    Ok(Written::Removed(removed))
}

fn expire_federation(
    t: &mut Tables<'_>,
    before: Timestamp,
    max: usize,
) -> Result<Written, WriteError> {
    let mut old: Vec<(String, u64)> = Vec::new();
    for entry in t.fed_queue.iter().map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        let item: QueuedForward = decode_record(v.value(), "fed-queue").map_err(corrupt)?;
        if item.queued_at < before {
            let (host, seq) = k.value();
            old.push((host.to_owned(), seq));
            if old.len() >= max {
                break;
            }
        }
    }
    let mut by_host: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for (host, seq) in &old {
        by_host.entry(host.clone()).or_default().push(*seq);
    }
    let mut removed = 0;
    for (host, seqs) in by_host {
        if let Written::Removed(n) = unqueue(t, &host, &seqs)? {
            removed += n;
        }
        if !seqs.is_empty() {
            tracing::warn!(%host, dropped = seqs.len(), "payloads for a relay expired undelivered");
        }
    }
    // Remembered a day longer than the other relay retries, against clock differences.
    let seen_before = before.0.saturating_sub(24 * 3600 * 1000);
    let mut seen = Vec::new();
    for entry in t.fed_seen.iter().map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        if v.value() < seen_before {
            seen.push(k.value());
            if seen.len() >= max {
                break;
            }
        }
    }
    for k in seen {
        t.fed_seen.remove(k).map_err(storage)?;
    }
    Ok(Written::Removed(removed))
}

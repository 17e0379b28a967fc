//! The node's state machine: keys, channels, messages, outbox and intents, over the store.
//!
//! The engine does no network I/O: the daemon ([`crate::daemon`]) talks to the relay and calls
//! the engine between requests. Every operation that changes state ends in one
//! [`Store::commit`]: openmls' changes, the channel states, the messages and the outbox of that
//! operation are durable together. If the commit fails, the engine rolls its working state back
//! to what is on disk, so memory never runs ahead of the disk.
//!
//! The engine is synchronous (redb writes fsync); the daemon calls it from blocking tasks,
//! one operation at a time.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use chitchat_proto::channel::{
    AdminPolicy, Change, Channel, ChannelConfig, ChannelError, ChannelEvent, ChannelMessage,
    CredentialCheck, Identity, KnownDirs, MessageId, PublicState, UserId,
};
use chitchat_proto::codec::{Bytes, Canonical};
use chitchat_proto::gossip::GossipEnvelope;
use chitchat_proto::identity::{DirBody, Profile, TrustedRelays};
use chitchat_proto::inbox::{self, InboxSecret};
use chitchat_proto::ordering::{ChannelId, EpochCert, EpochRecord};
use chitchat_proto::wire::{Envelope, InboxItem, InboxPayload, LeaveRequest, SealedWelcomes};
use chitchat_proto::{DeviceId, Dir, RelayId, SecretKey, Timestamp, chat};
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider as _;
use rand::RngExt as _;
use serde::Serialize;
use tokio::sync::broadcast;

mod evidence;
mod handover;
mod lan;

pub use evidence::{Conviction, Outgoing};
pub use lan::Ordered;

use crate::store::{
    Account, Batch, ChannelRecord, IntentOp, IntentRecord, MessageStatus, MlsMirror, OutboxItem,
    Roster, StagedRecord, Store, StoreError, StoredMessage,
};

/// Events kept for slow subscribers of the event stream, at most.
pub const EVENT_BUFFER: usize = 4096;
/// The sequence number of a device's first identity record; each later one is one above the
/// record it replaces ([`Engine::next_dir`]).
pub const FIRST_DIR_SEQ: u64 = 1;
/// Messages one outbox pass reads, at most.
pub const OUTBOX_BATCH: usize = 256;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The disk failed; nothing of the operation was kept.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The channel refused the operation.
    #[error("{0}")]
    Channel(#[from] ChannelError),
    /// No such channel.
    #[error("no channel {0}")]
    UnknownChannel(String),
    /// The device must register with a relay first.
    #[error("not registered with a relay yet (run `chitchat register`)")]
    NotRegistered,
    /// The device is registered already.
    #[error("already registered as {0}")]
    AlreadyRegistered(String),
    /// This device is no longer a member of the channel.
    #[error("this device left the channel")]
    Left,
    /// A request that makes no sense.
    #[error("{0}")]
    Invalid(String),
    /// This device is in a channel of that name already.
    #[error("a channel named {0:?} exists; pick another name")]
    ChannelExists(String),
}

/// Delivery attempts of a message that is not stored (a typing notice) before it is dropped.
pub const EPHEMERAL_ATTEMPTS: u32 = 3;

/// What became of one delivery attempt of an outbox item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The relay took it.
    Posted,
    /// Not this time; it stays in the outbox (unless it is older than the give-up time).
    Retry,
    /// Refused for good, for this reason.
    Failed(String),
}

/// What the event stream carries. Serialized as JSON for the local API.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A message was stored (received, or sent by this device).
    Message {
        /// The channel (hex).
        channel: String,
        /// The message.
        #[serde(flatten)]
        message: Box<crate::view::MessageView>,
    },
    /// One of this device's messages is in its relay's hands: durable in the inbox of every
    /// member device the relay serves.
    Sent {
        /// The channel (hex).
        channel: String,
        /// The message id.
        id: String,
    },
    /// One of this device's messages went out by gossip to at least one peer of its channel
    /// (the relay has not taken it yet).
    Gossiped {
        /// The channel (hex).
        channel: String,
        /// The message id.
        id: String,
    },
    /// One of this device's messages was given up: refused for good by the relay, or not
    /// delivered within `[send] give_up_after_days`.
    Failed {
        /// The channel (hex).
        channel: String,
        /// The message id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A member is typing (never stored).
    Typing {
        /// The channel (hex).
        channel: String,
        /// The member's device (hex).
        device: String,
        /// Whether typing goes on.
        active: bool,
    },
    /// The membership changed.
    Members {
        /// The channel (hex).
        channel: String,
        /// The new epoch.
        epoch: u64,
        /// Devices added (hex).
        added: Vec<String>,
        /// Devices removed (hex).
        removed: Vec<String>,
    },
    /// This device joined a channel through a Welcome.
    Joined {
        /// The channel (hex).
        channel: String,
        /// Its name.
        name: String,
    },
    /// This device was removed from a channel.
    Removed {
        /// The channel (hex).
        channel: String,
    },
    /// The link to the relay came up or went down.
    Relay {
        /// Whether a connection is up.
        connected: bool,
        /// Since when (Unix milliseconds).
        since_ms: u64,
    },
    /// An orderer signed two commits for one epoch: the proof is kept and its signatures no
    /// longer count.
    Equivocation {
        /// The orderer's key (hex).
        orderer: String,
        /// Its host, if it is a relay this device knows.
        relay: Option<String>,
        /// The channel (hex).
        channel: String,
        /// The epoch.
        epoch: u64,
    },
    /// A file's fetch moved on, finished or failed.
    File {
        /// The channel (hex).
        channel: String,
        /// The message that carries the file.
        id: String,
        /// The blob's bytes here (verified).
        bytes: u64,
        /// The blob's length.
        total: u64,
        /// `fetching`, `fetched` or `failed`.
        state: &'static str,
    },
    /// A new device of this user is linked (this device showed the code).
    DeviceLinked {
        /// The new device (hex).
        device: String,
    },
    /// A link this device offered failed (the new device's hello did not hold, or the relay
    /// refused the answer).
    LinkFailed {
        /// Why.
        reason: String,
    },
    /// Another member reported another commit or state for an epoch of a channel.
    Fork {
        /// The channel (hex).
        channel: String,
        /// The epoch.
        epoch: u64,
        /// The member's device (hex).
        device: String,
        /// How the states differ.
        kind: String,
    },
}

/// A [`CredentialCheck`] over the known records that also remembers unknown devices, so the
/// daemon can look them up and try again.
struct Recording<'a> {
    dirs: &'a BTreeMap<DeviceId, Dir>,
    trust: TrustedRelays,
    now: Timestamp,
    missing: RefCell<BTreeSet<DeviceId>>,
    /// Relays named by a channel (its relay set, or one a commit adds) whose key this device
    /// does not know yet: its relay is asked about them.
    relays: RefCell<BTreeSet<RelayId>>,
    /// Relay-less channels may be joined (the device is not relay-only).
    lan: bool,
    /// The channel checked is relay-less: no relay vouches for its members' names, so their
    /// self-signed records are all there is to check ([`Dir::verify_self`]).
    relayless: Cell<bool>,
}

impl<'a> Recording<'a> {
    fn new(
        dirs: &'a BTreeMap<DeviceId, Dir>,
        trust: TrustedRelays,
        now: Timestamp,
        lan: bool,
    ) -> Self {
        Self {
            dirs,
            trust,
            now,
            missing: RefCell::new(BTreeSet::new()),
            relays: RefCell::new(BTreeSet::new()),
            lan,
            relayless: Cell::new(false),
        }
    }

    /// The same, for a channel of this config (known before the check, as for a commit).
    fn for_config(mut self, config: &ChannelConfig) -> Self {
        self.relayless = Cell::new(self.lan && config.relays.is_empty());
        self
    }

    /// The devices and relays to look up, if the check failed for want of them.
    fn need(self) -> Option<Need> {
        let devices: Vec<DeviceId> = self.missing.into_inner().into_iter().collect();
        let relays: Vec<RelayId> = self.relays.into_inner().into_iter().collect();
        (!devices.is_empty() || !relays.is_empty()).then_some(Need { devices, relays })
    }

    fn is_missing_something(&self) -> bool {
        !self.missing.borrow().is_empty() || !self.relays.borrow().is_empty()
    }

    /// Notes the relay if its host is not known here at all.
    fn note(&self, relay: &RelayId) {
        use chitchat_proto::identity::RelayTrust as _;
        if self.trust.relay_key(&relay.host).is_none() && !self.trust.is_blocked(&relay.host) {
            self.relays.borrow_mut().insert(relay.clone());
        }
    }
}

/// What a message needs before it can be processed: identity records of devices, and the keys
/// of relays (looked up through this device's relay).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Need {
    /// Devices whose records are unknown.
    pub devices: Vec<DeviceId>,
    /// Relays whose keys are unknown.
    pub relays: Vec<RelayId>,
}

impl CredentialCheck for Recording<'_> {
    fn check(&self, device: DeviceId, user: &UserId) -> Result<(), String> {
        if !self.dirs.contains_key(&device) {
            self.missing.borrow_mut().insert(device);
        }
        // In a relay-less channel no relay vouches for an address, and the rules give an
        // address nothing there (`rules::same_user`): the record's own signature is all.
        if self.relayless.get() {
            let dir = self.dirs.get(&device).ok_or("no identity record for the device")?;
            return dir.verify_self(self.now).map_err(|e| e.to_string());
        }
        KnownDirs { dirs: self.dirs, trust: &self.trust, now: self.now }.check(device, user)
    }

    fn check_orderers(&self, config: &ChannelConfig) -> Result<(), String> {
        // A relay-less channel is ordered by its creator's device (which the channel id
        // names, and which signs every certificate).
        if self.lan && config.relays.is_empty() {
            self.relayless.set(true);
            return Ok(());
        }
        // Other relays of the set are learned, for the members they sponsor.
        config.relays.iter().for_each(|r| self.note(r));
        KnownDirs { dirs: self.dirs, trust: &self.trust, now: self.now }.check_orderers(config)
    }

    fn check_relay(&self, relay: &RelayId) -> Result<(), String> {
        let result =
            KnownDirs { dirs: self.dirs, trust: &self.trust, now: self.now }.check_relay(relay);
        if result.is_err() {
            self.note(relay);
        }
        result
    }
}

fn members_event(
    channel: &ChannelId,
    epoch: u64,
    added: &[DeviceId],
    removed: &[DeviceId],
) -> Event {
    Event::Members {
        channel: channel.to_string(),
        epoch,
        added: added.iter().map(|d| d.0.to_hex()).collect(),
        removed: removed.iter().map(|d| d.0.to_hex()).collect(),
    }
}

/// A sent message, free to leave: by the outbox to the relay, and by gossip to the members
/// online (see [`Engine::send`]).
#[derive(Clone, Debug)]
pub struct Released {
    /// Its outbox entry's id.
    pub outbox_id: u64,
    /// Its outbox entry.
    pub item: OutboxItem,
    /// The same ciphertext, sealed for gossip.
    pub gossip: GossipEnvelope,
    /// Released before its state was durable.
    pub early: bool,
    /// Of a relay-less channel: it goes by gossip alone (no relay posts it).
    pub lan: bool,
}

/// A message for the engine, from wherever it came. Every source goes through
/// [`Engine::receive`]: a message that arrives twice (by gossip, then from the inbox) is shown
/// once, the second copy dropped by its id before decryption.
#[derive(Clone, Debug)]
pub enum Incoming {
    /// An item of the relay's inbox, acknowledged by its id once processed and durable.
    Inbox(InboxItem),
    /// A channel message gossiped by a peer, judged by the host before it got here (signed by
    /// a member of the channel at its epoch); nothing acknowledges it.
    Gossip(GossipEnvelope),
    /// A post or commit of a channel's history at the relay, fetched because the inbox missed
    /// it (checked against its pack's signed root before it got here); nothing acknowledges
    /// it.
    History(Envelope),
    /// Another member's epoch report, gossiped by a peer and judged by the host (signed by a
    /// member of the channel at that epoch); nothing acknowledges it.
    Report(chitchat_proto::ordering::EpochReport),
    /// An envelope a peer handed over directly (`chitchat_proto::peer`): a Welcome sealed to
    /// this device, or a relay-less channel's commit with its creator's certificate. Checked as
    /// an inbox item is; nothing acknowledges it.
    Direct(Envelope),
}

impl Incoming {
    /// The inbox item's id, for an item of the inbox.
    pub fn inbox_id(&self) -> Option<u64> {
        match self {
            Self::Inbox(item) => Some(item.id),
            Self::Gossip(_) | Self::History(_) | Self::Report(_) | Self::Direct(_) => None,
        }
    }
}

impl From<InboxItem> for Incoming {
    fn from(item: InboxItem) -> Self {
        Self::Inbox(item)
    }
}

/// What one call to [`Engine::receive`] did.
#[derive(Debug, Default)]
pub struct Received {
    /// Inbox items done with, to acknowledge.
    pub done: Vec<u64>,
    /// Items whose message waits in a channel's future-epoch buffer: `(channel, epoch, item)`.
    /// They are acknowledged once the channel reaches the epoch.
    pub held: Vec<(ChannelId, u64, u64)>,
    /// Processing stopped at this index of the input: its message names devices whose
    /// identity records are unknown. Look them up, then call again from there.
    pub stopped: Option<(usize, Need)>,
    /// Members that asked to leave channels this device administers: `(channel, device)`.
    /// The daemon orders their removal.
    pub removals: Vec<(ChannelId, DeviceId)>,
    /// The channels were reloaded from disk after a failed item: messages waiting in their
    /// future-epoch buffers are gone from memory (they stay in the relay's inbox, unacknowledged).
    pub reloaded: bool,
}

/// One channel as the engine holds it.
#[derive(Debug)]
struct Held {
    record: ChannelRecord,
    channel: Option<Channel>,
}

/// The node's state.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    provider: OpenMlsRustCrypto,
    mirror: MlsMirror,
    key: SecretKey,
    inbox: InboxSecret,
    me: Identity,
    account: Option<Account>,
    channels: BTreeMap<ChannelId, Held>,
    dirs: BTreeMap<DeviceId, Dir>,
    /// Other relays, as this device's relay vouched for them, by host.
    relays: BTreeMap<String, RelayId>,
    next_outbox: u64,
    events: broadcast::Sender<Event>,
    /// Channels whose sends may leave before their commit: each is marked in `released-0`
    /// (durably, by the first send of this run) and skips a generation on the next open.
    released: BTreeSet<ChannelId>,
    /// Channels whose early-released send failed to commit: the next send skips first.
    must_skip: BTreeSet<ChannelId>,
    /// Every send commits before its message leaves (`send.commit_first`).
    commit_first: bool,
    /// Inbox items dropped since the daemon started, by reason (shown in the node's status).
    dropped: Dropped,
    /// Epoch records, reports and proofs (see [`evidence`]).
    evidence: evidence::Evidence,
    /// Messages for channels this device is not in yet, oldest first (memory only: their
    /// inbox items are not acknowledged).
    awaiting: VecDeque<Awaiting>,
    /// The epoch of each channel whose members `rosters-0` holds (see [`Engine::commit`]).
    rosters: BTreeMap<ChannelId, u64>,
    /// Relay-less channels may be joined (see [`Engine::set_lan`]).
    lan: bool,
}

/// Inbox items the node could not use and dropped (acknowledged, so that they never block the
/// inbox), counted since the daemon started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Dropped {
    /// Messages of a future epoch past the channel's buffer, or past their sender's share of it.
    pub buffer_full: u64,
    /// Messages of an epoch too far ahead to be buffered.
    pub too_far_ahead: u64,
    /// Messages of an epoch whose keys are gone (more than 4 epochs before the channel's, or a
    /// past epoch whose keys for it were used or never held: sent before this device joined).
    pub too_old: u64,
    /// Messages of a past epoch from a device that is no longer a member (removed or revoked
    /// since it sent them).
    pub from_removed: u64,
    /// Messages that failed to open, decrypt or validate.
    pub invalid: u64,
    /// Messages for a channel this device is not in, whose Welcome did not come in time
    /// ([`AWAITING_JOIN_MS`]) or that did not fit ([`MAX_AWAITING_JOIN`]).
    pub not_joined: u64,
    /// Posts and commits the inbox missed that the relay's history no longer kept (or would
    /// not give).
    pub missed: u64,
}

/// Messages held for channels this device is not in yet, at most: a channel's commits and
/// messages may reach the inbox before the Welcome that adds this device (each relay of a set
/// fans out what its group orders: when the relay set changed, the group of the old set that
/// ordered the add may reach this relay later than the group of the new set that ordered what
/// came next). Beyond, the oldest is dropped.
pub const MAX_AWAITING_JOIN: usize = 1024;
/// How long a message for a channel this device is not in waits for its Welcome.
pub const AWAITING_JOIN_MS: u64 = 10 * 60 * 1000;

/// A message for a channel this device is not in yet, waiting for the Welcome. Its inbox item
/// stays unacknowledged until it is processed or dropped, so that a restart meets it again.
#[derive(Debug)]
struct Awaiting {
    item: Option<u64>,
    channel: ChannelId,
    message: ChannelMessage,
    since: Timestamp,
}

impl Engine {
    /// Opens the node's state, creating the device keys on first use.
    pub fn open(store: Store) -> Result<Self, EngineError> {
        let (key, inbox) = match (store.key("device")?, store.key("inbox")?) {
            (Some(d), Some(i)) => (seed(&d)?, seed(&i)?),
            _ => {
                let device: [u8; 32] = rand::rng().random();
                let inbox: [u8; 32] = rand::rng().random();
                let mut b = Batch::default();
                b.key("device", device.to_vec());
                b.key("inbox", inbox.to_vec());
                store.commit(b)?;
                (device, inbox)
            }
        };
        let key = SecretKey::from_seed(key);
        let inbox = InboxSecret::from_seed(&inbox);
        let account = store.account()?;
        let me = Identity::new(&key).with_user(account.as_ref().map(Account::address));
        let provider = OpenMlsRustCrypto::default();
        let entries = store.mls_entries()?;
        provider
            .storage()
            .values
            .write()
            .map_err(|_| EngineError::Invalid("storage lock poisoned".into()))?
            .clone_from(&entries);
        let mirror = MlsMirror::new(entries);
        let dirs = store.dirs()?.into_iter().map(|d| (d.device(), d)).collect();
        let relays = store.relays()?.into_iter().map(|r| (r.host.clone(), r)).collect();
        let next_outbox = store.next_outbox_id()?;
        let evidence = evidence::Evidence::load(store.convicted()?);
        let store_rosters = store.roster_epochs()?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let mut engine = Self {
            store,
            provider,
            mirror,
            key,
            inbox,
            me,
            account,
            channels: BTreeMap::new(),
            dirs,
            relays,
            next_outbox,
            events,
            released: BTreeSet::new(),
            must_skip: BTreeSet::new(),
            commit_first: false,
            dropped: Dropped::default(),
            awaiting: VecDeque::new(),
            rosters: store_rosters,
            evidence,
            lan: true,
        };
        engine.load_channels()?;
        engine.skip_released(now())?;
        // Rosters of channels joined before rosters were kept (an empty batch writes them).
        engine.commit(Batch::default())?;
        Ok(engine)
    }

    /// Every channel that may have let a message leave before its state was durable (the
    /// process stopped, maybe in that window) moves its sending ratchet on by one generation,
    /// in one commit, before anything else: no generation or message id is used twice.
    fn skip_released(&mut self, now: Timestamp) -> Result<(), EngineError> {
        let marked = self.store.released()?;
        // A channel whose skip fails keeps its mark and skips before its next send (which
        // fails as long as the skip does): one broken channel does not stop the node.
        let mut failed = BTreeSet::new();
        'attempt: loop {
            let mut b = Batch::default();
            let mut skipped = 0;
            for id in marked.iter().filter(|id| !failed.contains(*id)) {
                b.released(*id, false);
                let Some(channel) = self
                    .channels
                    .get_mut(id)
                    .and_then(|h| h.channel.as_mut())
                    .filter(|c| c.is_active())
                else {
                    // Left or removed since: it sends nothing again.
                    continue;
                };
                if let Err(e) = channel.skip(&self.provider, &self.me, now) {
                    tracing::error!(channel = %id, error = %e, "cannot skip a sending generation; the channel sends nothing until it can");
                    self.rollback();
                    failed.insert(*id);
                    continue 'attempt;
                }
                self.save_channel(id, &mut b);
                skipped += 1;
            }
            self.commit(b)?;
            if skipped > 0 {
                tracing::info!(
                    channels = skipped,
                    "skipped one sending generation where a send may have been cut short"
                );
            }
            self.must_skip.extend(failed);
            return Ok(());
        }
    }

    fn load_channels(&mut self) -> Result<(), EngineError> {
        self.channels.clear();
        for record in self.store.channels()? {
            let id = record.state.id;
            let channel = if record.left {
                None
            } else {
                match Channel::load(&self.provider, record.state.clone()) {
                    Ok(mut c) => {
                        c.set_convicted(self.evidence.convicted_keys());
                        Some(c)
                    }
                    Err(e) => {
                        tracing::error!(channel = %id, error = %e, "cannot load channel");
                        None
                    }
                }
            };
            self.channels.insert(id, Held { record, channel });
        }
        Ok(())
    }

    /// Unmarks the channels whose sends of this run all committed, for a clean stop: no send
    /// is between its release and its commit (the engine is exclusive), so the next open need
    /// not skip them. A channel that still must skip keeps its mark. A send after this commits
    /// first and marks its channel again.
    pub fn close(&mut self) -> Result<(), EngineError> {
        let mut b = Batch::default();
        for id in &self.released {
            b.released(*id, false);
        }
        self.commit(b)?;
        self.released.clear();
        Ok(())
    }

    /// Makes every send commit before its message leaves (see [`Engine::send`]).
    pub fn set_commit_first(&mut self, commit_first: bool) {
        self.commit_first = commit_first;
    }

    /// Where events go (for the daemon's own: a fetch's progress).
    pub fn event_sender(&self) -> broadcast::Sender<Event> {
        self.events.clone()
    }

    /// Subscribes to events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Sends an event that comes from outside the engine (the relay link's state).
    pub fn announce(&self, event: Event) {
        self.emit(event);
    }

    /// This device.
    pub fn device(&self) -> DeviceId {
        self.me.device()
    }

    /// The device key (for the relay link).
    pub fn key(&self) -> &SecretKey {
        &self.key
    }

    /// The inbox key's public half.
    pub fn inbox_key(&self) -> [u8; 32] {
        self.inbox.public()
    }

    /// This device's first identity record: self-signed, sponsored by no relay, linked to no
    /// device, sequence number [`FIRST_DIR_SEQ`]. What it registers (or joins a link) with, and
    /// what it shows peers while it is registered nowhere.
    pub fn first_dir(&self, display_name: &str, now: Timestamp) -> Dir {
        Dir::sign(
            &self.key,
            DirBody {
                device: self.device(),
                seq: FIRST_DIR_SEQ,
                inbox_key: self.inbox.public(),
                linked: BTreeSet::new(),
                sponsorships: Vec::new(),
                profile: Profile { display_name: display_name.to_owned(), avatar: None },
                revoked: false,
                issued: now,
            },
        )
    }

    /// The record that follows `current` (this device's latest, as the account or the relay
    /// holds it): its sequence number one above, issued `now`, with `change` made to it.
    pub fn next_dir(
        &self,
        current: &Dir,
        change: impl FnOnce(&mut DirBody),
        now: Timestamp,
    ) -> Result<Dir, EngineError> {
        if current.device() != self.device() {
            return Err(EngineError::Invalid("another device's record".into()));
        }
        let mut body = current.body.clone();
        body.seq = body.seq.checked_add(1).ok_or(EngineError::Invalid("record sequence".into()))?;
        body.issued = now;
        body.inbox_key = self.inbox.public();
        change(&mut body);
        Ok(Dir::sign(&self.key, body))
    }

    /// The registration, if any.
    pub fn account(&self) -> Option<&Account> {
        self.account.as_ref()
    }

    /// The relays whose sponsorships this device accepts: its own, and the others its relay
    /// vouched for (their key as the relay read it from their `.well-known`). The home relay's
    /// host is never taken from another source.
    fn trust(&self) -> TrustedRelays {
        let home = self.account.as_ref().map(|a| a.relay.id.clone());
        let others: Vec<RelayId> = self
            .relays
            .values()
            .filter(|r| home.as_ref().is_none_or(|h| h.host != r.host))
            .cloned()
            .collect();
        TrustedRelays { relays: home.into_iter().chain(others).collect(), ..Default::default() }
    }

    /// Remembers another relay's identity as this device's relay vouched for it, so records it
    /// sponsors verify. A change of key for a known host replaces the old key (the relay read
    /// it from the host's `.well-known`, which is the authority for the name).
    pub fn learn_relay(&mut self, relay: RelayId) -> Result<(), EngineError> {
        if self.account.as_ref().is_some_and(|a| a.relay.id.host == relay.host)
            || self.relays.get(&relay.host) == Some(&relay)
        {
            return Ok(());
        }
        let mut b = Batch::default();
        b.relay(relay.clone());
        self.store.commit(b)?;
        self.relays.insert(relay.host.clone(), relay);
        Ok(())
    }

    /// The other relays this device knows.
    pub fn relays(&self) -> impl Iterator<Item = &RelayId> {
        self.relays.values()
    }

    /// The store, for reads.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Commits `batch` with openmls' changes. On failure the working state goes back to the
    /// disk's.
    fn commit(&mut self, mut batch: Batch) -> Result<(), EngineError> {
        let changes = {
            let values = self
                .provider
                .storage()
                .values
                .read()
                .map_err(|_| EngineError::Invalid("storage lock poisoned".into()))?;
            self.mirror.changes(&values)
        };
        batch.mls(changes.clone());
        let rosters = self.roster_changes();
        for (id, roster) in &rosters {
            batch.roster(*id, roster.clone());
        }
        match self.store.commit(batch) {
            Ok(()) => {
                self.mirror.persisted(&changes);
                for (id, roster) in rosters {
                    match roster {
                        Some((epoch, _)) => self.rosters.insert(id, epoch),
                        None => self.rosters.remove(&id),
                    };
                }
                Ok(())
            }
            Err(e) => {
                self.rollback();
                Err(e.into())
            }
        }
    }

    /// Puts the working state back to what is on disk.
    /// The rosters to write with the next commit: the members of every channel that reached
    /// an epoch since its last roster, and `None` for every channel this device is no longer
    /// in. Written with the MLS state that makes them true, so that gossip validation
    /// ([`crate::store::Rosters`]) never judges by members the disk does not have.
    fn roster_changes(&self) -> Vec<(ChannelId, Option<Roster>)> {
        let mut out = Vec::new();
        for (id, held) in &self.channels {
            match held.channel.as_ref().filter(|c| c.is_active()) {
                Some(c) if self.rosters.get(id) != Some(&c.epoch()) => {
                    out.push((*id, Some((c.epoch(), c.members()))));
                }
                Some(_) => {}
                None if self.rosters.contains_key(id) => out.push((*id, None)),
                None => {}
            }
        }
        out.extend(
            self.rosters.keys().filter(|id| !self.channels.contains_key(id)).map(|id| (*id, None)),
        );
        out
    }

    fn rollback(&mut self) {
        if let Ok(mut values) = self.provider.storage().values.write() {
            *values = self.mirror.snapshot();
        }
        if let Err(e) = self.load_channels() {
            tracing::error!(error = %e, "cannot reload channels after a failed commit");
        }
    }

    /// Fails an operation: rolls back whatever openmls already changed in memory.
    fn fail<T>(&mut self, e: impl Into<EngineError>) -> Result<T, EngineError> {
        self.rollback();
        Err(e.into())
    }

    /// Records the registration and the device's sponsored identity record.
    pub fn set_account(&mut self, account: Account) -> Result<(), EngineError> {
        let mut b = Batch::default();
        b.key("account", chitchat_proto::codec::encode(&account));
        b.dir(account.dir.clone());
        self.commit(b)?;
        self.dirs.insert(account.dir.device(), account.dir.clone());
        // KeyPackages made from now on name the user.
        self.me = Identity::new(&self.key).with_user(Some(account.address()));
        self.account = Some(account);
        Ok(())
    }

    /// Makes `n` KeyPackages (and a last-resort one if `last_resort`) to upload; their private
    /// keys are durable before this returns.
    pub fn key_packages(
        &mut self,
        n: usize,
        last_resort: bool,
    ) -> Result<(Vec<Bytes>, Option<Bytes>), EngineError> {
        let mut packages = Vec::with_capacity(n);
        for _ in 0..n {
            match self.me.key_package(&self.provider, false) {
                Ok(p) => packages.push(Bytes(p)),
                Err(e) => return self.fail(e),
            }
        }
        let last = if last_resort {
            match self.me.key_package(&self.provider, true) {
                Ok(p) => Some(Bytes(p)),
                Err(e) => return self.fail(e),
            }
        } else {
            None
        };
        self.commit(Batch::default())?;
        Ok((packages, last))
    }

    /// Caches identity records (verified by the caller's lookups; checked again on use).
    pub fn add_dirs(&mut self, dirs: Vec<Dir>) -> Result<(), EngineError> {
        let mut b = Batch::default();
        for dir in dirs {
            if dir.verify_signature().is_err() {
                continue;
            }
            let newer = self.dirs.get(&dir.device()).is_none_or(|old| dir.supersedes(old));
            if newer {
                b.dir(dir.clone());
                self.dirs.insert(dir.device(), dir);
            }
        }
        self.store.commit(b)?;
        Ok(())
    }

    /// A cached identity record.
    pub fn dir(&self, device: &DeviceId) -> Option<&Dir> {
        self.dirs.get(device)
    }

    /// Checks a record as a member would: signature, validity, a sponsorship of a trusted relay.
    pub fn verify_dir(&self, dir: &Dir, now: Timestamp) -> Result<(), EngineError> {
        dir.verify(&self.trust(), now)
            .map(|_| ())
            .map_err(|e| EngineError::Invalid(format!("identity record rejected: {e}")))
    }

    /// Creates a channel with this device as its only member, ordered by the home relay, or
    /// (`lan`) relay-less: ordered by this device, for peers met directly (on a LAN).
    pub fn create_channel(
        &mut self,
        name: &str,
        mime: &str,
        open: bool,
        lan: bool,
        now: Timestamp,
    ) -> Result<ChannelId, EngineError> {
        let relays = match (&self.account, lan) {
            (_, true) => Vec::new(),
            (Some(account), false) => vec![account.relay.id.clone()],
            (None, false) => return Err(EngineError::NotRegistered),
        };
        if name.chars().chain(mime.chars()).any(char::is_control) {
            return Err(EngineError::Invalid(
                "a channel's name and MIME type may not hold control characters".into(),
            ));
        }
        // A name finds its channel: two active channels of one name would make it useless.
        if self.channels().any(|(_, r, _)| r.name == name && !r.left) {
            return Err(EngineError::ChannelExists(name.to_owned()));
        }
        let id = ChannelId::of_creator(&self.device(), rand::rng().random());
        // The user is the admin (every device of theirs), where a relay vouches for the user's
        // address; a relay-less channel's creator is its device.
        let admins = match self.account.as_ref().map(Account::address) {
            _ if open => AdminPolicy::AnyMember,
            Some(address) if !relays.is_empty() => AdminPolicy::Users(BTreeSet::from([address])),
            _ => AdminPolicy::Admins(BTreeSet::from([self.device()])),
        };
        let config = ChannelConfig {
            mime: mime.into(),
            name: name.into(),
            relays,
            admins,
            creator: self.device(),
        };
        let channel = match Channel::create(&self.provider, &self.me, id, config) {
            Ok(c) => c,
            Err(e) => return self.fail(e),
        };
        let record = ChannelRecord {
            state: channel.state().clone(),
            name: name.into(),
            mime: mime.into(),
            opened: false,
            left: false,
            joined: now,
        };
        let mut b = Batch::default();
        b.channel(id, record.clone());
        self.commit(b)?;
        self.channels.insert(id, Held { record, channel: Some(channel) });
        Ok(id)
    }

    fn held(&self, id: &ChannelId) -> Result<&Held, EngineError> {
        self.channels.get(id).ok_or_else(|| EngineError::UnknownChannel(id.to_string()))
    }

    /// Every channel: `(id, record, channel if loaded)`.
    pub fn channels(&self) -> impl Iterator<Item = (ChannelId, &ChannelRecord, Option<&Channel>)> {
        self.channels.iter().map(|(id, h)| (*id, &h.record, h.channel.as_ref()))
    }

    /// The channels this device is in (not left, not removed).
    pub fn active_channels(&self) -> BTreeSet<ChannelId> {
        self.channels
            .iter()
            .filter(|(_, h)| h.channel.as_ref().is_some_and(Channel::is_active))
            .map(|(id, _)| *id)
            .collect()
    }

    /// One channel.
    pub fn channel(
        &self,
        id: &ChannelId,
    ) -> Result<(&ChannelRecord, Option<&Channel>), EngineError> {
        let h = self.held(id)?;
        Ok((&h.record, h.channel.as_ref()))
    }

    /// The channel's public state, for the relay (`OpenChannel`).
    pub fn public_state(&mut self, id: &ChannelId) -> Result<PublicState, EngineError> {
        let provider = &self.provider;
        let me = &self.me;
        let held =
            self.channels.get(id).ok_or_else(|| EngineError::UnknownChannel(id.to_string()))?;
        let channel = held.channel.as_ref().ok_or(EngineError::Left)?;
        Ok(channel.public_state(provider, me)?)
    }

    /// Records that the relay orders the channel.
    pub fn mark_opened(&mut self, id: &ChannelId) -> Result<(), EngineError> {
        let mut record = self.held(id)?.record.clone();
        record.opened = true;
        let mut b = Batch::default();
        b.channel(*id, record.clone());
        self.store.commit(b)?;
        if let Some(h) = self.channels.get_mut(id) {
            h.record = record;
        }
        Ok(())
    }

    /// Encrypts `payload` for the channel and stores it with the outbox entry that will deliver
    /// it, in one transaction: once this returns, the message survives a crash. Returns its id.
    /// A typing notice (`store == false`) is delivered but never stored.
    ///
    /// `release` gets the outbox entry and the gossip envelope (unless no one else is in the
    /// channel) as soon as the ciphertext may leave, with `early` if that is before the commit. The first send of a
    /// channel in a run commits first, marking the channel in `released-0`; later ones release
    /// before their commit (the disk's latency is then off the message's path), because the
    /// mark makes the next open skip the generation a crash in that window could reuse. With
    /// [`Engine::set_commit_first`], every send commits first.
    pub fn send(
        &mut self,
        id: &ChannelId,
        payload: &[u8],
        store: bool,
        now: Timestamp,
        release: impl FnOnce(Released),
    ) -> Result<MessageId, EngineError> {
        let must_skip = self.must_skip.contains(id);
        if must_skip
            && let Err(e) = active_in(&mut self.channels, id)?.skip(&self.provider, &self.me, now)
        {
            return self.fail(e);
        }
        let sent = active_in(&mut self.channels, id)?.send(&self.provider, &self.me, now, payload);
        let (msg_id, message) = match sent {
            Ok((id, ChannelMessage::Application { message })) => (id, message),
            Ok((_, ChannelMessage::Commit { .. })) => {
                return Err(EngineError::Invalid("a send produced a commit".into()));
            }
            Err(e) => return self.fail(e),
        };
        tracing::debug!(channel = %id, message = %id_string(&msg_id), "sending");
        let (state, alone, epoch, hlc, lan) = {
            let channel = active_in(&mut self.channels, id)?;
            let alone = !channel.has_other_members();
            let lan = channel.config().relays.is_empty();
            (channel.state().clone(), alone, channel.epoch(), channel.state().clock.last(), lan)
        };
        let outbox_id = self.next_outbox;
        let mut record = self.held(id)?.record.clone();
        record.state = state;
        let mut b = Batch::default();
        b.channel(*id, record.clone());
        let stored = StoredMessage {
            id: msg_id,
            hlc,
            epoch,
            payload: payload.to_vec(),
            status: if alone { MessageStatus::Sent } else { MessageStatus::Sending },
            at: now,
        };
        if store {
            b.message(*id, stored.clone());
        }
        let gossip =
            (!alone).then(|| GossipEnvelope::seal(&self.key, *id, epoch, message.clone(), now));
        // Every member of a relay-less channel keeps its messages for members that miss them.
        if lan && store {
            b.lan_keep(chitchat_proto::wire::ChannelPost {
                channel: *id,
                message: message.clone(),
            });
        }
        let item =
            (!alone).then_some(OutboxItem { channel: *id, id: msg_id, message, attempts: 0 });
        if let Some(item) = &item {
            b.outbox(outbox_id, Some(item.clone()));
        }
        // Never with `commit_first` or `must_skip`: neither kind of channel is in `released`.
        let early = self.released.contains(id);
        if !early && !self.commit_first {
            b.released(*id, true);
        }
        let mut item = item;
        let mut release = Some(release);
        let mut gossip = gossip;
        if early
            && let Some(item) = item.take()
            && let Some(gossip) = gossip.take()
            && let Some(release) = release.take()
        {
            release(Released { outbox_id, item, gossip, early: true, lan });
        }
        if let Err(e) = self.commit(b) {
            if early {
                // The ciphertext may be out while the state that made it is not on disk: the
                // channel skips a generation before its next send, which commits first. The
                // outbox id is spent too (the worker may record the released item's delivery).
                self.released.remove(id);
                self.must_skip.insert(*id);
                self.next_outbox += 1;
            }
            return Err(e);
        }
        if !self.commit_first {
            self.released.insert(*id);
        }
        self.must_skip.remove(id);
        self.next_outbox += 1;
        if let Some(h) = self.channels.get_mut(id) {
            h.record = record;
        }
        if let Some(item) = item
            && let Some(gossip) = gossip
            && let Some(release) = release.take()
        {
            release(Released { outbox_id, item, gossip, early: false, lan });
        }
        if store {
            self.emit_message(id, &stored);
        }
        Ok(msg_id)
    }

    fn emit_message(&self, channel: &ChannelId, m: &StoredMessage) {
        let mime = self.channels.get(channel).map_or(chat::MIME, |h| h.record.mime.as_str());
        let message = crate::view::MessageView::new(m, mime, |d| self.name_of(d));
        self.emit(Event::Message { channel: channel.to_string(), message: Box::new(message) });
    }

    /// The user a device belongs to: the address a trusted relay sponsored it as (its
    /// sponsorship's signature checked, not its expiry: what it sent while sponsored stays the
    /// user's), or the device alone. Chat edits, deletes, reactions and receipts are judged by
    /// it.
    pub fn user_of(&self, device: &DeviceId) -> UserId {
        let trust = self.trust();
        self.dirs
            .get(device)
            .filter(|dir| dir.verify_signature().is_ok())
            .and_then(|dir| {
                dir.body
                    .sponsorships
                    .iter()
                    .find(|s| s.body.device == *device && s.verify(&trust, s.body.issued).is_ok())
            })
            .map_or(UserId::Device(*device), |s| UserId::Address(s.address()))
    }

    /// The address a device is known by (`alice@relay`), or its short id.
    pub fn name_of(&self, device: &DeviceId) -> String {
        let dir = self.dirs.get(device);
        if let Some(s) = dir.and_then(|d| d.body.sponsorships.first()) {
            return s.address().to_string();
        }
        // A name no relay vouches for (a peer met on a LAN) is shown as such.
        match dir.map(|d| d.body.profile.display_name.as_str()).filter(|n| !n.is_empty()) {
            Some(name) => format!("{name} ({}, unverified)", short_device(device)),
            None => short_device(device),
        }
    }

    /// The id the next outbox item gets.
    pub fn next_outbox_id(&self) -> u64 {
        self.next_outbox
    }

    /// Outbox items to deliver, oldest first.
    pub fn outbox(&self) -> Result<Vec<(u64, OutboxItem)>, EngineError> {
        // A relay-less channel's items are the publish task's (see `lan_outbox`).
        let lan = self.relayless_channels();
        Ok(self.store.outbox(OUTBOX_BATCH, |i| !lan.contains(&i.channel))?)
    }

    /// Records delivery attempts, in one transaction: for each item, whether it was posted,
    /// stays for another attempt, or is given up. An item to retry that was stored more than
    /// `give_up_after_ms` before `now` is given up: time, not attempts, bounds the retries, so
    /// that no outage however long fails a message before then.
    pub fn outbox_progress(
        &mut self,
        progress: Vec<(u64, OutboxItem, Delivery)>,
        now: Timestamp,
        give_up_after_ms: u64,
    ) -> Result<(), EngineError> {
        let mut b = Batch::default();
        let mut events = Vec::new();
        for (outbox_id, mut item, mut delivery) in progress {
            let (channel, id) = (item.channel.to_string(), id_string(&item.id));
            if delivery == Delivery::Retry {
                match self.store.message(&item.channel, &item.id)? {
                    Some(stored) if now.0.saturating_sub(stored.at.0) > give_up_after_ms => {
                        let days = give_up_after_ms / (24 * 3600 * 1000);
                        let reason = format!("not delivered within {days} days");
                        tracing::warn!(message = %id, "{reason}; given up");
                        delivery = Delivery::Failed(reason);
                    }
                    Some(_) => {}
                    // Not stored (a typing notice): stale soon, so a few tries only, and no
                    // one is told (there is nothing to show as failed).
                    None if item.attempts.saturating_add(1) >= EPHEMERAL_ATTEMPTS => {
                        b.outbox(outbox_id, None);
                        continue;
                    }
                    None => {}
                }
            }
            match delivery {
                Delivery::Posted => {
                    b.outbox(outbox_id, None);
                    b.status(item.channel, item.id, MessageStatus::Sent);
                    events.push(Event::Sent { channel, id });
                }
                Delivery::Failed(reason) => {
                    b.outbox(outbox_id, None);
                    b.status(item.channel, item.id, MessageStatus::Failed);
                    b.failure(item.channel, item.id, reason.clone());
                    events.push(Event::Failed { channel, id, reason });
                }
                Delivery::Retry => {
                    item.attempts = item.attempts.saturating_add(1);
                    b.outbox(outbox_id, Some(item));
                }
            }
        }
        // Losing this in a crash only resends (receivers drop the copies): no fsync.
        self.store.commit_lazy(b)?;
        for event in events {
            self.emit(event);
        }
        Ok(())
    }

    /// Records that a message of this device went out by gossip, unless the relay took it
    /// already. Not fsync'd: losing it loses a status only.
    pub fn gossiped(&mut self, channel: &ChannelId, id: &MessageId) -> Result<(), EngineError> {
        if self.store.message(channel, id)?.is_none_or(|m| m.status != MessageStatus::Sending) {
            return Ok(());
        }
        let mut b = Batch::default();
        b.status(*channel, *id, MessageStatus::Gossiped);
        self.store.commit_lazy(b)?;
        self.emit(Event::Gossiped { channel: channel.to_string(), id: id_string(id) });
        Ok(())
    }

    /// Why one of this device's messages was given up, if it was.
    pub fn failure(
        &self,
        channel: &ChannelId,
        id: &MessageId,
    ) -> Result<Option<String>, EngineError> {
        Ok(self.store.failure(channel, id)?)
    }

    /// Opens, decrypts and stores incoming messages, in order, in one transaction. See
    /// [`Received`].
    pub fn receive(&mut self, items: &[Incoming], now: Timestamp) -> Result<Received, EngineError> {
        let mut out = Received::default();
        let mut b = Batch::default();
        let mut touched = BTreeSet::new();
        let mut pending_events = Vec::new();
        let mut opened: VecDeque<Result<InboxPayload, String>> = self.open_all(items).into();
        // Messages that waited for a channel joined since (before a look-up this call resumes
        // after, say) go first; those that waited too long are dropped.
        while let Some(a) = self.awaiting.front()
            && now.0.saturating_sub(a.since.0) > AWAITING_JOIN_MS
        {
            if let Some(a) = self.awaiting.pop_front() {
                tracing::warn!(channel = %a.channel, "no Welcome came for a message of a channel this device is not in; dropped");
                self.dropped.not_joined += 1;
                out.done.extend(a.item);
            }
        }
        let mut replay: VecDeque<Awaiting> = VecDeque::new();
        let joined: Vec<ChannelId> = self
            .awaiting
            .iter()
            .map(|a| a.channel)
            .filter(|c| self.channels.get(c).is_some_and(|h| h.channel.is_some()))
            .collect();
        for c in joined {
            replay.extend(self.take_awaiting(&c));
        }
        let mut next = 0;
        loop {
            // An item of the input (with its index), or a message replayed after its Welcome.
            let (index, item_id, opened, since) = match replay.pop_front() {
                Some(a) => {
                    let payload = InboxPayload::Channel { channel: a.channel, message: a.message };
                    (None, a.item, Ok(payload), a.since)
                }
                None => match (items.get(next), opened.pop_front()) {
                    (Some(item), Some(o)) => {
                        next += 1;
                        (Some(next - 1), item.inbox_id(), o, now)
                    }
                    _ => break,
                },
            };
            let payload = match opened {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(item = ?item_id, error = %e, "dropping an inbox item that does not open");
                    self.dropped.invalid += 1;
                    out.done.extend(item_id);
                    continue;
                }
            };
            // A Welcome or a commit that fails half-way (an unknown member, say) may already
            // have changed openmls' working state: everything before it is committed first, so
            // that a failure rolls back to exactly the state before it.
            let risky = matches!(
                payload,
                InboxPayload::Welcome { .. }
                    | InboxPayload::Channel { message: ChannelMessage::Commit { .. }, .. }
            );
            if risky {
                self.flush(
                    std::mem::take(&mut b),
                    std::mem::take(&mut touched),
                    &mut pending_events,
                )?;
            }
            let mut welcomed = None;
            let mut kept = None;
            let step = match payload {
                InboxPayload::Welcome { channel, welcome } => {
                    welcomed = Some(channel);
                    self.receive_welcome(channel, &welcome, now, &mut b, &mut pending_events)
                }
                InboxPayload::Leave(request) => {
                    if let Some(removal) = self.leave_request(&request, now) {
                        out.removals.push(removal);
                    }
                    Step::Done
                }
                InboxPayload::Report(report) => {
                    self.receive_report(report, now, &mut pending_events)
                }
                InboxPayload::History(pack) => {
                    self.receive_history(pack, now, &mut b, &mut pending_events)
                }
                InboxPayload::Channel { channel, message } => {
                    if self.awaits_welcome(&channel) {
                        Step::Awaiting(channel, message)
                    } else {
                        // Only a replayed message is kept, to wait again after a look-up.
                        if index.is_none() {
                            kept = Some((channel, message.clone()));
                        }
                        self.receive_channel(
                            channel,
                            message,
                            now,
                            &mut b,
                            &mut touched,
                            &mut pending_events,
                        )
                    }
                }
            };
            if risky && matches!(step, Step::Dropped | Step::Need(_)) {
                self.rollback();
                b = Batch::default();
                touched.clear();
                pending_events.clear();
                out.reloaded = true;
            }
            if let (Step::Done, Some(channel)) = (&step, welcomed) {
                replay.extend(self.take_awaiting(&channel));
            }
            let step = match (step, index) {
                // A replayed message that needs a look-up waits again, first in line: the call
                // that resumes after the look-up replays it before the rest of the input.
                (Step::Need(devices), None) => {
                    let (channel, message) = kept.ok_or(EngineError::Invalid(
                        "a replayed message needs a look-up but is gone".into(),
                    ))?;
                    self.awaiting.push_front(Awaiting { item: item_id, channel, message, since });
                    for a in replay.into_iter().rev() {
                        self.awaiting.push_front(a);
                    }
                    out.stopped = Some((next, devices));
                    break;
                }
                (step, _) => step,
            };
            let index = index.unwrap_or(next);
            match step {
                Step::Done | Step::Dropped => out.done.extend(item_id),
                // A gossiped message waits in the buffer (memory) only: if it is lost there,
                // the inbox brings it again.
                Step::Held(channel, epoch) => {
                    out.held.extend(item_id.map(|item| (channel, epoch, item)));
                }
                Step::Awaiting(channel, message) => {
                    tracing::debug!(%channel, item = ?item_id, "a message for a channel this device is not in (yet); held for its Welcome");
                    self.awaiting.push_back(Awaiting { item: item_id, channel, message, since });
                    while self.awaiting.len() > MAX_AWAITING_JOIN {
                        if let Some(a) = self.awaiting.pop_front() {
                            tracing::warn!(channel = %a.channel, "too many messages wait for Welcomes; dropping the oldest");
                            self.dropped.not_joined += 1;
                            out.done.extend(a.item);
                        }
                    }
                }
                Step::Need(devices) => {
                    out.stopped = Some((index, devices));
                    break;
                }
            }
        }
        self.flush(b, touched, &mut pending_events)?;
        Ok(out)
    }

    /// Opens inbox envelopes (HPKE: one X25519 agreement each) on every core; the MLS work
    /// that follows is sequential.
    fn open_all(&self, items: &[Incoming]) -> Vec<Result<InboxPayload, String>> {
        let me = self.device();
        let open_envelope = |envelope: &Envelope| match envelope {
            Envelope::Sealed(sealed) => self
                .inbox
                .open(me, sealed)
                .map_err(|e| e.to_string())
                .and_then(|bytes| InboxPayload::from_bytes(&bytes).map_err(|e| e.to_string())),
            Envelope::Post(post) => Ok(InboxPayload::Channel {
                channel: post.channel,
                message: ChannelMessage::Application { message: post.message.clone() },
            }),
            Envelope::Commit(c) => Ok(InboxPayload::Channel {
                channel: c.channel,
                message: ChannelMessage::Commit { commit: c.commit.clone(), cert: c.cert.clone() },
            }),
            Envelope::Report(r) => Ok(InboxPayload::Report(r.clone())),
            // The daemon fills these from the history before the engine sees the batch.
            Envelope::Missed { .. } => Err("a notice of missed history, not a message".into()),
        };
        let open = |item: &Incoming| match item {
            Incoming::Gossip(e) => Ok(InboxPayload::Channel {
                channel: e.body.channel,
                message: ChannelMessage::Application { message: e.body.message.clone() },
            }),
            Incoming::Inbox(item) => open_envelope(&item.envelope),
            Incoming::History(Envelope::Sealed(_)) => Err("a sealed envelope in a history".into()),
            Incoming::History(envelope) => open_envelope(envelope),
            Incoming::Report(report) => Ok(InboxPayload::Report(report.clone())),
            Incoming::Direct(envelope @ (Envelope::Sealed(_) | Envelope::Commit(_))) => {
                open_envelope(envelope)
            }
            Incoming::Direct(_) => Err("a peer may hand over Welcomes and commits only".into()),
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        let sealed = items
            .iter()
            .filter(|i| {
                matches!(i, Incoming::Inbox(InboxItem { envelope: Envelope::Sealed(_), .. }))
            })
            .count();
        if sealed < 32 || threads < 2 {
            return items.iter().map(open).collect();
        }
        let per = items.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let open = &open;
            let handles: Vec<_> = items
                .chunks(per)
                .map(|chunk| {
                    (chunk.len(), scope.spawn(move || chunk.iter().map(open).collect::<Vec<_>>()))
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|(len, h)| {
                    h.join().unwrap_or_else(|_| vec![Err("opening panicked".into()); len])
                })
                .collect()
        })
    }

    /// Emits the events of received messages, then commits them with the states of the
    /// channels they touched. Events go first: showing a message does not wait for the disk.
    /// The inbox items are acknowledged only after the commit, so a message whose commit fails
    /// stays at the relay and comes again (events are at least once; clients dedupe by id).
    fn flush(
        &mut self,
        mut b: Batch,
        touched: BTreeSet<ChannelId>,
        events: &mut Vec<Event>,
    ) -> Result<(), EngineError> {
        for event in events.drain(..) {
            self.emit(event);
        }
        for id in touched {
            self.save_channel(&id, &mut b);
        }
        self.commit(b)
    }

    /// Whether a message for `channel` waits for a Welcome: this device is not in it, and did
    /// not leave it.
    fn awaits_welcome(&self, channel: &ChannelId) -> bool {
        match self.channels.get(channel) {
            None => true,
            Some(h) => h.channel.is_none() && !h.record.left,
        }
    }

    /// The messages that wait for `channel`'s Welcome, in arrival order.
    fn take_awaiting(&mut self, channel: &ChannelId) -> Vec<Awaiting> {
        let (mine, rest): (Vec<Awaiting>, Vec<Awaiting>) =
            std::mem::take(&mut self.awaiting).into_iter().partition(|a| a.channel == *channel);
        self.awaiting = rest.into();
        mine
    }

    fn receive_welcome(
        &mut self,
        channel: ChannelId,
        welcome: &[u8],
        now: Timestamp,
        b: &mut Batch,
        events: &mut Vec<Event>,
    ) -> Step {
        // Each relay that ordered the commit may deliver the Welcome (those it queued for a
        // relay new to the set too): a copy for a channel this device is in already is done.
        if self.channels.get(&channel).is_some_and(|h| h.channel.is_some()) {
            tracing::debug!(%channel, "a Welcome to a channel this device is in; dropped");
            return Step::Done;
        }
        let check = Recording::new(&self.dirs, self.trust(), now, self.lan);
        match Channel::join(&self.provider, welcome, &check) {
            Ok(joined) if joined.id() == channel => {
                let record = ChannelRecord {
                    state: joined.state().clone(),
                    name: joined.config().name.clone(),
                    mime: joined.config().mime.clone(),
                    opened: true,
                    left: false,
                    joined: now,
                };
                b.channel(channel, record.clone());
                events.push(Event::Joined {
                    channel: channel.to_string(),
                    name: joined.config().name.clone(),
                });
                let reached =
                    (joined.epoch(), EpochRecord { digest: joined.epoch_digest(), cert: None });
                let mut joined = joined;
                joined.set_convicted(self.evidence.convicted_keys());
                self.channels.insert(channel, Held { record, channel: Some(joined) });
                self.reached(channel, reached.0, reached.1, b, events, now);
                Step::Done
            }
            Ok(_) => {
                tracing::warn!(%channel, "a Welcome for another channel than it claims; dropped");
                Step::Dropped
            }
            Err(ChannelError::Credential { .. } | ChannelError::UntrustedOrderers(_))
                if check.is_missing_something() =>
            {
                check.need().map_or(Step::Dropped, Step::Need)
            }
            Err(ChannelError::AlreadyJoined) => Step::Done,
            Err(e) => {
                tracing::warn!(%channel, error = %e, "dropping a Welcome");
                Step::Dropped
            }
        }
    }

    fn receive_channel(
        &mut self,
        id: ChannelId,
        message: ChannelMessage,
        now: Timestamp,
        b: &mut Batch,
        touched: &mut BTreeSet<ChannelId>,
        events: &mut Vec<Event>,
    ) -> Step {
        if let ChannelMessage::Commit { cert, .. } = &message
            && self.epoch(&id).is_some_and(|e| cert.body.epoch < e)
        {
            self.check_late_commit(id, cert, events);
        }
        let check = Recording::new(&self.dirs, self.trust(), now, self.lan);
        let Some(channel) = self.channels.get_mut(&id).and_then(|h| h.channel.as_mut()) else {
            tracing::debug!(channel = %id, "message for a channel this device is not in; dropped");
            return Step::Done;
        };
        let check = check.for_config(channel.config());
        // A relay-less channel's members keep what they take of it (see `lan_keep`).
        let keep = channel.config().relays.is_empty().then(|| message.clone());
        let result = channel.process(&self.provider, now, message, &check);
        let mime = channel.config().mime.clone();
        let epoch_now = channel.epoch();
        let result = match result {
            Ok(events) => events,
            Err(ChannelError::Credential { .. }) if check.is_missing_something() => {
                return check.need().map_or(Step::Dropped, Step::Need);
            }
            // A message that cannot be used yet is bounded per channel and per sender, and
            // dropped past the bound: kept, it would block the inbox behind it.
            Err(e @ ChannelError::TooFarAhead { .. }) => {
                tracing::warn!(channel = %id, error = %e, "dropping a message of a far epoch");
                self.dropped.too_far_ahead += 1;
                return Step::Dropped;
            }
            Err(e @ ChannelError::TooOld { .. }) => {
                tracing::warn!(channel = %id, error = %e, "dropping a message of an old epoch");
                self.dropped.too_old += 1;
                return Step::Dropped;
            }
            // History and late copies bring these (a message sent before this device joined).
            Err(e @ ChannelError::PastEpoch { .. }) => {
                tracing::debug!(channel = %id, error = %e, "dropping a message of a past epoch");
                self.dropped.too_old += 1;
                return Step::Dropped;
            }
            Err(e @ ChannelError::FormerMember { .. }) => {
                tracing::info!(channel = %id, error = %e, "dropping a message of a removed device");
                self.dropped.from_removed += 1;
                return Step::Dropped;
            }
            Err(ChannelError::BufferFull) => {
                tracing::warn!(channel = %id, "future-epoch buffer full; dropping a message");
                self.dropped.buffer_full += 1;
                return Step::Dropped;
            }
            Err(e) => {
                tracing::warn!(channel = %id, error = %e, "dropping a channel message");
                self.dropped.invalid += 1;
                return Step::Dropped;
            }
        };
        touched.insert(id);
        let mut step = Step::Done;
        // Whether what came was taken: a message read or held, or this very commit applied.
        let mut taken = false;
        let applies = match &keep {
            Some(ChannelMessage::Commit { cert, .. }) => Some(cert.body.epoch.saturating_add(1)),
            _ => None,
        };
        for event in result {
            match event {
                ChannelEvent::Message { id: msg_id, hlc, epoch, payload } => {
                    if mime == chat::MIME
                        && let Ok(chat::ChatContent::Typing { active }) =
                            chat::ChatContent::from_bytes(&payload)
                    {
                        events.push(Event::Typing {
                            channel: id.to_string(),
                            device: msg_id.sender.0.to_hex(),
                            active,
                        });
                        continue;
                    }
                    let stored = StoredMessage {
                        id: msg_id,
                        hlc,
                        epoch,
                        payload,
                        status: MessageStatus::Received,
                        at: now,
                    };
                    let message =
                        crate::view::MessageView::new(&stored, &mime, |d| self.name_of(d));
                    events.push(Event::Message {
                        channel: id.to_string(),
                        message: Box::new(message),
                    });
                    b.message(id, stored);
                    taken |= applies.is_none();
                }
                ChannelEvent::Duplicate(dup) => {
                    tracing::debug!(channel = %id, message = %id_string(&dup), "duplicate dropped");
                }
                ChannelEvent::Buffered { epoch } if epoch > epoch_now => {
                    step = Step::Held(id, epoch);
                    taken |= applies.is_none();
                }
                ChannelEvent::CommitApplied { epoch, added, removed, self_removed, record } => {
                    taken |= applies == Some(epoch);
                    events.push(members_event(&id, epoch, &added, &removed));
                    if self_removed {
                        events.push(Event::Removed { channel: id.to_string() });
                    } else {
                        self.reached(id, epoch, record, b, events, now);
                    }
                }
                _ => {}
            }
        }
        if taken && let Some(message) = keep {
            self.lan_keep(id, message, b);
        }
        step
    }

    /// Inbox items dropped since the daemon started, by reason.
    /// Counts history entries missed for good (see [`Dropped::missed`]).
    pub fn count_missed(&mut self, n: u64) {
        self.dropped.missed = self.dropped.missed.saturating_add(n);
    }

    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    /// The channel's epoch, if this device is in it.
    pub fn epoch(&self, id: &ChannelId) -> Option<u64> {
        self.channels.get(id).and_then(|h| h.channel.as_ref()).map(Channel::epoch)
    }

    /// The channel's members.
    pub fn members(&self, id: &ChannelId) -> Result<Vec<DeviceId>, EngineError> {
        let held = self.held(id)?;
        Ok(held.channel.as_ref().map(Channel::members).unwrap_or_default())
    }

    /// Stages a commit for `op` and records the intent, durably, before anything is submitted.
    pub fn stage(
        &mut self,
        id: &ChannelId,
        op: IntentOp,
        attempts: u32,
        now: Timestamp,
    ) -> Result<StagedRecord, EngineError> {
        let orderers = active_in(&mut self.channels, id)?.config().orderers();
        if self.orderers_convicted(&orderers) {
            return Err(EngineError::Invalid(
                "this channel's orderers were caught signing two commits for one epoch (see \
                 `chitchat status`): no change to it can be certified any more; create a new \
                 channel"
                    .into(),
            ));
        }
        let mut change = Change::default();
        let trust = self.trust();
        let relayless = active_in(&mut self.channels, id)?.config().relays.is_empty();
        match &op {
            IntentOp::Add(adds) => {
                let mut config = active_in(&mut self.channels, id)?.config().clone();
                for (dir, kp) in adds {
                    let rejected =
                        |e| EngineError::Invalid(format!("identity record rejected: {e}"));
                    if relayless {
                        // No relay vouches for anyone here; the set stays empty.
                        dir.verify_self(now).map_err(rejected)?;
                        self.dirs.insert(dir.device(), dir.clone());
                        change.add.push(kp.clone());
                        continue;
                    }
                    let addresses = dir.verify(&trust, now).map_err(rejected)?;
                    self.dirs.insert(dir.device(), dir.clone());
                    change.add.push(kp.clone());
                    // A device sponsored by none of the channel's relays brings its relay into
                    // the relay set (which orders the channel from the next epoch on).
                    let in_set = |host: &str| config.relays.iter().any(|r| r.host == host);
                    if !addresses.iter().any(|a| in_set(&a.host))
                        && let Some(relay) = addresses
                            .iter()
                            .find_map(|a| trust.relays.iter().find(|r| r.host == a.host))
                    {
                        config.relays.push(relay.clone());
                    }
                }
                change.config = Some(config);
            }
            IntentOp::Remove(devices) => {
                change.remove.clone_from(devices);
                change.config = self.shrunk_config(id, devices)?;
            }
            IntentOp::Relays(relays) => {
                let mut config = active_in(&mut self.channels, id)?.config().clone();
                if !config.relays.is_empty() {
                    return Err(EngineError::Invalid(
                        "the channel is ordered by relays already".into(),
                    ));
                }
                config.relays.clone_from(relays);
                change.config = Some(config);
            }
        }
        let config = active_in(&mut self.channels, id)?.config().clone();
        let check = Recording::new(&self.dirs, trust, now, self.lan).for_config(&config);
        let staged =
            active_in(&mut self.channels, id)?.stage(&self.provider, &self.me, &change, &check);
        let staged = match staged {
            Ok(s) => s,
            Err(e) => return self.fail(e),
        };
        let welcome = match &staged.welcome {
            Some(w) => {
                let payload =
                    InboxPayload::Welcome { channel: *id, welcome: Bytes(w.clone()) }.to_bytes();
                let mut envelopes = Vec::new();
                for device in &staged.added {
                    let Some(dir) = self.dirs.get(device) else { continue };
                    match inbox::seal(&mut rand::rng(), *device, &dir.body.inbox_key, &payload) {
                        Ok(e) => envelopes.push(e),
                        Err(e) => return self.fail(EngineError::Invalid(e.to_string())),
                    }
                }
                Some(SealedWelcomes { envelopes })
            }
            None => None,
        };
        let record = StagedRecord {
            epoch: staged.epoch,
            commit: staged.commit.clone(),
            welcome,
            fanout: Vec::new(),
        };
        let mut b = Batch::default();
        if let IntentOp::Add(adds) = &op {
            for (dir, _) in adds {
                b.dir(dir.clone());
            }
        }
        b.intent(*id, Some(IntentRecord { op, staged: Some(record.clone()), attempts }));
        self.save_channel(id, &mut b);
        self.commit(b)?;
        Ok(record)
    }

    fn save_channel(&mut self, id: &ChannelId, b: &mut Batch) {
        if let Some(h) = self.channels.get_mut(id) {
            if let Some(c) = &h.channel {
                h.record.state = c.state().clone();
                h.record.left = !c.is_active();
            }
            if h.record.left
                && let Some(c) = h.channel.take()
                && let Err(e) = c.delete(&self.provider)
            {
                // Removed: the channel is never loaded again, whatever stays.
                tracing::warn!(channel = %id, error = %e, "cannot delete a removed channel's keys");
            }
            b.channel(*id, h.record.clone());
        }
    }

    /// The channel's config without the relays that no remaining member is sponsored by, if
    /// removing `devices` leaves any such relay (removing the last user of a relay removes it
    /// from the relay set, in the same commit). `None` if the set stays as it is, if a remaining
    /// member's record is unknown (nothing is dropped on a guess), or if no relay would remain.
    fn shrunk_config(
        &mut self,
        id: &ChannelId,
        devices: &[DeviceId],
    ) -> Result<Option<ChannelConfig>, EngineError> {
        let channel = active_in(&mut self.channels, id)?;
        let config = channel.config().clone();
        if config.relays.len() < 2 {
            return Ok(None);
        }
        let mut hosts = BTreeSet::new();
        let own = self.account.as_ref().map(|a| &a.dir);
        for member in channel.members().iter().filter(|m| !devices.contains(m)) {
            let dir = self.dirs.get(member).or(own.filter(|d| d.device() == *member));
            let Some(dir) = dir else { return Ok(None) };
            hosts.extend(dir.body.sponsorships.iter().map(|s| s.body.relay.host.clone()));
        }
        let relays: Vec<RelayId> =
            config.relays.iter().filter(|r| hosts.contains(&r.host)).cloned().collect();
        if relays.is_empty() || relays.len() == config.relays.len() {
            return Ok(None);
        }
        Ok(Some(ChannelConfig { relays, ..config }))
    }

    /// Merges this device's staged commit, certified by the orderers, and drops the intent.
    pub fn accept(&mut self, id: &ChannelId, cert: &EpochCert) -> Result<(), EngineError> {
        let channel = active_in(&mut self.channels, id)?;
        if channel.pending().is_none() && channel.epoch() > cert.body.epoch {
            // The relay fans a commit out to its committer too: it came through the inbox
            // first and was merged there. Only the intent is left to drop, if it was this
            // commit: a certificate for another hash of an epoch already applied convicts
            // whoever signed both.
            let mut b = Batch::default();
            b.intent(*id, None);
            self.commit(b)?;
            let applied = cert
                .body
                .epoch
                .checked_add(1)
                .and_then(|e| self.record_of(id, e))
                .and_then(|r| r.cert);
            if let Some(applied) = applied
                && applied.body.hash != cert.body.hash
            {
                let mut events = Vec::new();
                self.check_late_commit(*id, cert, &mut events);
                for event in events {
                    self.emit(event);
                }
                return Err(EngineError::Invalid(
                    "another commit won that epoch, yet the orderers certified this one too".into(),
                ));
            }
            return Ok(());
        }
        let relayless = channel.config().relays.is_empty();
        let result = channel.accept_own(&self.provider, cert);
        let events = match result {
            Ok(e) => e,
            Err(e) => return self.fail(e),
        };
        let mut b = Batch::default();
        // A relay-less channel's members keep its commits for those that miss them (see
        // `lan_keep`): this device's own too.
        let staged = match relayless {
            true => self.store.intent(id)?.and_then(|i| i.staged),
            false => None,
        };
        if let Some(staged) =
            staged.filter(|s| chitchat_proto::wire::commit_hash(&s.commit) == cert.body.hash)
        {
            let commit = ChannelMessage::Commit { commit: staged.commit, cert: cert.clone() };
            self.lan_keep(*id, commit, &mut b);
        }
        b.intent(*id, None);
        self.save_channel(id, &mut b);
        let mut emitted = Vec::new();
        for event in events {
            if let ChannelEvent::CommitApplied { epoch, added, removed, record, self_removed } =
                event
            {
                emitted.push(members_event(id, epoch, &added, &removed));
                if !self_removed {
                    self.reached(*id, epoch, record, &mut b, &mut emitted, now());
                }
            }
        }
        self.commit(b)?;
        for event in emitted {
            self.emit(event);
        }
        Ok(())
    }

    /// Drops this device's staged commit (another won the epoch, or the relay refused it). The
    /// intent stays, without a staged commit, unless `give_up`.
    pub fn discard(&mut self, id: &ChannelId, give_up: bool) -> Result<(), EngineError> {
        let result = {
            let provider = &self.provider;
            match self.channels.get_mut(id).and_then(|h| h.channel.as_mut()) {
                Some(c) if c.pending().is_some() => c.discard_own(provider),
                _ => Ok(()),
            }
        };
        if let Err(e) = result {
            return self.fail(e);
        }
        let mut b = Batch::default();
        let intent = if give_up {
            None
        } else {
            self.store.intent(id)?.map(|mut i| {
                i.staged = None;
                i
            })
        };
        b.intent(*id, intent);
        self.save_channel(id, &mut b);
        self.commit(b)
    }

    /// Checks a member's request to leave: signed by the device, recent, for a channel this
    /// device may change the membership of, from a member other than this device.
    fn leave_request(
        &self,
        request: &LeaveRequest,
        now: Timestamp,
    ) -> Option<(ChannelId, DeviceId)> {
        if let Err(e) = request.verify(now) {
            tracing::warn!(channel = %request.channel, error = e, "leave request refused");
            return None;
        }
        let channel = self.channels.get(&request.channel)?.channel.as_ref()?;
        let me = self.device();
        let may = channel.is_admin_device(me);
        let member = channel.members().contains(&request.device);
        (channel.is_active() && may && member && request.device != me)
            .then_some((request.channel, request.device))
    }

    /// Signed requests to be removed from the channel, sealed to the members who may remove
    /// this device (the admins, or every member of an open channel).
    pub fn leave_requests(
        &self,
        id: &ChannelId,
        now: Timestamp,
    ) -> Result<Vec<inbox::SealedEnvelope>, EngineError> {
        let held = self.held(id)?;
        let Some(channel) = held.channel.as_ref().filter(|c| c.is_active()) else {
            return Ok(vec![]);
        };
        let me = self.device();
        let payload = InboxPayload::Leave(LeaveRequest::sign(&self.key, *id, now)).to_bytes();
        let mut out = Vec::new();
        for device in channel.members().into_iter().filter(|d| *d != me) {
            let may = channel.is_admin_device(device);
            let Some(dir) = self.dirs.get(&device).filter(|_| may) else { continue };
            match inbox::seal(&mut rand::rng(), device, &dir.body.inbox_key, &payload) {
                Ok(e) => out.push(e),
                Err(e) => tracing::warn!(%device, error = %e, "cannot seal to the device"),
            }
        }
        Ok(out)
    }

    /// Leaves a channel on this device: the channel stops here (nothing more is sent or
    /// processed) and its history stays readable. MLS lets no member commit its own removal:
    /// the daemon first sends [`Engine::leave_requests`], and an admin's node removes it.
    pub fn leave(&mut self, id: &ChannelId) -> Result<(), EngineError> {
        let mut record = self.held(id)?.record.clone();
        record.left = true;
        // Its keys of every epoch go with the commit below (a failed commit reloads them).
        if let Some(channel) = self.channels.get_mut(id).and_then(|h| h.channel.take())
            && let Err(e) = channel.delete(&self.provider)
        {
            return self.fail(e);
        }
        let mut b = Batch::default();
        b.channel(*id, record.clone());
        b.intent(*id, None);
        self.commit(b)?;
        if let Some(h) = self.channels.get_mut(id) {
            h.record = record;
            h.channel = None;
        }
        Ok(())
    }

    /// Every stored intent.
    pub fn intents(&self) -> Result<Vec<(ChannelId, IntentRecord)>, EngineError> {
        Ok(self.store.intents()?)
    }
}

/// What one inbox item came to.
enum Step {
    /// Processed: acknowledge it.
    Done,
    /// Refused (garbage, or not valid here): acknowledge it; undo what it changed.
    Dropped,
    /// In the channel's future-epoch buffer.
    Held(ChannelId, u64),
    /// For a channel this device is not in (yet): held for its Welcome.
    Awaiting(ChannelId, ChannelMessage),
    /// Needs these devices' identity records, or these relays' keys, first.
    Need(Need),
}

fn active_in<'a>(
    channels: &'a mut BTreeMap<ChannelId, Held>,
    id: &ChannelId,
) -> Result<&'a mut Channel, EngineError> {
    let held = channels.get_mut(id).ok_or_else(|| EngineError::UnknownChannel(id.to_string()))?;
    held.channel.as_mut().filter(|c| c.is_active()).ok_or(EngineError::Left)
}

fn seed(bytes: &[u8]) -> Result<[u8; 32], EngineError> {
    bytes.try_into().map_err(|_| EngineError::Store(StoreError::Corrupt { table: "keys" }))
}

/// The current time.
pub fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp(ms)
}

/// A message id as the API writes it: `SENDER:EPOCH.N`, the sender's device id in hex and its
/// sequence number split into the epoch it joined in and a counter.
pub fn id_string(id: &MessageId) -> String {
    format!("{}:{}", id.sender.0.to_hex(), seq_string(id.seq))
}

/// A sequence number as `EPOCH.N`.
pub fn seq_string(seq: u64) -> String {
    format!("{}.{}", seq >> 32, seq & 0xffff_ffff)
}

/// Reads an id as [`id_string`] writes it.
pub fn parse_id(s: &str) -> Option<MessageId> {
    let (sender, seq) = s.split_once(':')?;
    let sender = DeviceId(chitchat_proto::keys::PublicKey::from_hex(sender)?);
    Some(MessageId { sender, seq: parse_seq(seq)? })
}

/// A short id for display: the first 8 hex digits of the sender.
pub fn short_id(id: &MessageId) -> String {
    format!("{}:{}", &id.sender.0.to_hex()[..8], seq_string(id.seq))
}

/// A device's short id.
pub fn short_device(device: &DeviceId) -> String {
    device.0.to_hex()[..12].to_owned()
}

/// Parses `EPOCH.N` or a plain number.
pub fn parse_seq(s: &str) -> Option<u64> {
    match s.split_once('.') {
        Some((hi, lo)) => {
            let hi: u64 = hi.parse().ok()?;
            let lo: u64 = lo.parse().ok()?;
            (hi <= u64::from(u32::MAX) && lo <= u64::from(u32::MAX)).then_some(hi << 32 | lo)
        }
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn seq_strings_round_trip(seq: u64) {
            prop_assert_eq!(parse_seq(&seq_string(seq)), Some(seq));
        }

        #[test]
        fn seq_parsing_never_panics(s in "\\PC{0,24}") {
            let _ = parse_seq(&s);
        }

        #[test]
        fn ids_round_trip(key: [u8; 32], seq: u64) {
            let id = MessageId { sender: DeviceId(chitchat_proto::keys::PublicKey(key)), seq };
            prop_assert_eq!(parse_id(&id_string(&id)), Some(id));
            prop_assert_eq!(parse_id(&short_id(&id)), None, "a short id is not a whole one");
        }
    }

    #[test]
    fn seq_strings_split_the_join_epoch() {
        assert_eq!(seq_string((3 << 32) | 7), "3.7");
        assert_eq!(parse_seq("12"), Some(12));
        assert_eq!(parse_seq("1.4294967296"), None, "the counter is 32 bits");
        assert_eq!(parse_seq("x.1"), None);
    }
}

//! The running node: the engine, the relay link, and the background tasks that move messages.
//!
//! - The **inbox task** long-polls the relay (`Wait`), hands what arrives to the engine,
//!   looks up identity records the engine asks for, and acknowledges what was processed (only
//!   after it is durable).
//! - The **outbox task** posts stored outgoing messages to the relay (`Post`), which puts each
//!   into the inbox of every other member of its channel; with bounded back-off and a bounded
//!   retry time (`[send] give_up_after_days`). A message sent through the API is posted at once.
//! - **Membership changes** go through the ordering flow: stage, record the intent, submit,
//!   merge only what the relay certified; a lost race is rebuilt on the new epoch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitchat_proto::channel::MessageId;
use chitchat_proto::codec::Bytes;
use chitchat_proto::gossip::{GossipEnvelope, Verdict};
use chitchat_proto::ordering::{ChannelId, Intent, IntentState};
use chitchat_proto::wire::{
    ChannelPost, CommitSubmission, Envelope, ErrorCode, InboxItem, MAX_ENQUEUE_BATCH,
    MAX_FETCH_ITEMS, MAX_HISTORY_ENTRIES, MAX_LOOKUP_DEVICES, MAX_POST_BATCH, PostResult, Request,
    Response,
};
use chitchat_proto::{Address, DeviceId, Dir, PublicKey, RelayId};
use rand::RngExt as _;
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};

use crate::config::Config;
use crate::engine::{Delivery, Engine, EngineError, Event, Incoming, Need, Released};
use crate::history;
use crate::host::{Gossiped, Host, PeerInfo};
use crate::link::{LinkError, LinkState, RelayLink};
use crate::store::Rosters;
use crate::store::{Account, IntentOp, OutboxItem, RelayInfo, StagedRecord};
use libp2p::multiaddr::Protocol;

/// KeyPackages uploaded at a time.
const KEY_PACKAGE_BATCH: usize = 20;
/// Below this many unclaimed KeyPackages at the relay, more are uploaded.
const KEY_PACKAGE_LOW: u32 = 10;
/// Longest pause between two attempts of the same work, in milliseconds.
const MAX_BACKOFF_MS: u64 = 30_000;
/// Longest pause between two attempts to reach the inbox, in milliseconds.
const INBOX_MAX_BACKOFF_MS: u64 = 3_000;
/// How long the inbox and outbox tasks of a revoked device sleep between looks at the flag
/// (it never clears: they idle).
const REVOKED_IDLE: Duration = Duration::from_secs(60);
/// Attempts of one acknowledgement before its items are left for the next start.
const ACK_ATTEMPTS: u32 = 5;
/// How often the evidence task looks for reports and proofs to send.
const EVIDENCE_INTERVAL: Duration = Duration::from_millis(200);
/// The longest pause between attempts to send evidence while the relay is away.
const EVIDENCE_MAX_BACKOFF_MS: u64 = 10_000;

pub use crate::engine::now;

mod devices;
mod files;
mod lan;
pub use devices::{LinkOffer, RevokeOutcome};
pub use files::Attachment;
pub use lan::parse_device;

/// Why a node operation failed, as the local API reports it.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The engine refused or the disk failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The relay could not be reached.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The relay refused the request.
    #[error("relay refused: {message} ({code})")]
    Relay {
        /// The relay's error code.
        code: &'static str,
        /// Its explanation.
        message: String,
    },
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A request that cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be taken, fetched or read.
    #[error("{message}")]
    File {
        /// What kind of failure: `too_large`, `busy`, `unavailable`, `corrupt`, `upload`,
        /// `storage`.
        code: &'static str,
        /// Why.
        message: String,
    },
}

fn refused(response: Response) -> NodeError {
    match response {
        Response::Error { code, message } => NodeError::Relay { code: code.name(), message },
        other => NodeError::Relay { code: "unexpected", message: format!("{other:?}") },
    }
}

/// Why a message the relay refused for good was given up, in words.
fn refusal_reason(code: ErrorCode) -> String {
    let why = match code {
        ErrorCode::Forbidden => "this device is not a member of the channel there",
        ErrorCode::BadRequest => "the message is malformed or too large",
        ErrorCode::NotFound => "the channel is not ordered there",
        _ => "refused",
    };
    format!("the relay refused it ({}): {why}", code.name())
}

/// What `/.well-known/chitchat/relay` says.
#[derive(Clone, Debug, Deserialize)]
struct WellKnown {
    host: String,
    key: String,
    peer_id: String,
    addrs: Vec<String>,
}

/// The running node.
#[derive(Debug)]
pub struct Node {
    engine: Arc<Mutex<Engine>>,
    link: Mutex<Option<Arc<RelayLink>>>,
    config: Config,
    /// Wakes the outbox task.
    outbox: Notify,
    /// Wakes the tasks that wait for a relay link.
    registered: Notify,
    /// Wakes waiters for a channel's epoch (the inbox task applied commits).
    epochs: Notify,
    /// One membership change at a time.
    ordering: tokio::sync::Mutex<()>,
    /// The first outbox id of this run.
    first_outbox_id: u64,
    /// Messages stored by this run's sends, waiting for the outbox worker (at most 256).
    ready: Mutex<std::collections::VecDeque<(u64, OutboxItem)>>,
    /// Whether the inbox was read to its end once since the node started: until then, what
    /// the relay holds may move a channel to a later epoch (a member added while this node
    /// was away), and a message encrypted now would miss the members it adds.
    caught_up: tokio::sync::watch::Sender<bool>,
    /// The libp2p host (relay link, gossip).
    host: Host,
    /// The channels' members, read beside the engine to judge gossip.
    rosters: Rosters,
    /// Wakes the task that keeps the gossip topics those of the channels this device is in.
    topics: Notify,
    /// Messages to gossip, from the engine's thread (bounded: past it, only the relay carries
    /// a message), with the outbox entry of a relay-less channel's (which goes once gossiped).
    publish: mpsc::Sender<ToPublish>,
    /// How far each channel's history at the relay was read this run (what the inbox missed
    /// is fetched once, whether a notice or an item asks for it first).
    history_read: Mutex<HashMap<ChannelId, u64>>,
    /// Files' blobs: this device's iroh endpoint and store (a store with no endpoint on a
    /// relay-only node: iroh speaks UDP; its blobs go in parts over the relay link).
    blobs: Option<chitchat_blobs::Blobs>,
    /// Blobs being fetched now (one fetch of each at a time).
    fetching: Mutex<std::collections::HashSet<iroh_blobs::Hash>>,
    /// Blobs dropped because a chunk did not open when read, and when: their data stays on
    /// disk until garbage collection, and a fetch would take it for the blob (see
    /// `files::Damaged`).
    damaged: files::Damaged,
    /// Files pinned again for members' requests, and when (once an hour each, at most).
    reuploads: files::Reuploads,
    /// Where events go, besides the engine's own (a fetch's progress).
    events: tokio::sync::broadcast::Sender<Event>,
    /// The link slot this device offers now, if any (one at a time).
    offer: Mutex<Option<chitchat_proto::link::LinkSlot>>,
}

/// A message to gossip: its channel, id, envelope, and for a relay-less channel its outbox
/// entry.
type ToPublish = (ChannelId, MessageId, GossipEnvelope, Option<(u64, OutboxItem)>);

/// Messages waiting to be gossiped, at most.
const PUBLISH_QUEUE: usize = 256;
/// Gossiped messages judged, and handed to the engine, at a time.
const GOSSIP_BATCH: usize = 64;
/// How often the gossip topics are checked against the channels this device is in, besides
/// the changes the engine announces.
const TOPICS_INTERVAL: Duration = Duration::from_secs(5);

/// How long a send right after start waits for the inbox to be read to its end (the relay may
/// be away: then it goes with what this node knows).
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

impl Node {
    /// Opens the node's state and starts its background tasks.
    pub async fn start(
        mut engine: Engine,
        config: Config,
        blobs: Option<chitchat_blobs::Blobs>,
    ) -> Result<Arc<Self>, NodeError> {
        engine.set_commit_first(config.send.commit_first);
        engine.set_lan(!config.network.relay_only);
        if engine.account().is_none() {
            // What a Welcome to a relay-less channel checks this device's own credential with.
            let own = engine.peer_record(&config.profile.name, now());
            engine.add_dirs(vec![own])?;
        }
        let bad_config = |e: crate::config::ConfigError| NodeError::Invalid(e.to_string());
        let identity = chitchat_net::keypair(engine.key())
            .map_err(|e| NodeError::Invalid(format!("device key: {e}")))?;
        let (host, gossiped, asks) = Host::start(
            identity,
            &config.network.listen_addrs().map_err(bad_config)?,
            &config.network.peer_addrs().map_err(bad_config)?,
            config.network.relay_only,
            config.network.mdns_on(engine.account().is_some()),
            config.network.tls().map_err(bad_config)?,
        )
        .await
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let link = match engine.account() {
            Some(a) => {
                Some(Arc::new(link_for(&host, engine.key().clone(), &a.relay, &config).await?))
            }
            None => None,
        };
        let rosters = engine.store().rosters();
        let (publish, to_publish) = mpsc::channel(PUBLISH_QUEUE);
        let first_outbox_id = engine.next_outbox_id();
        let events = engine.event_sender();
        let node = Arc::new(Self {
            engine: Arc::new(Mutex::new(engine)),
            link: Mutex::new(link.clone()),
            config,
            outbox: Notify::new(),
            registered: Notify::new(),
            epochs: Notify::new(),
            ordering: tokio::sync::Mutex::new(()),
            ready: Mutex::new(std::collections::VecDeque::new()),
            first_outbox_id,
            // A device registered nowhere has no inbox to read first.
            caught_up: tokio::sync::watch::Sender::new(link.is_none()),
            host,
            rosters,
            topics: Notify::new(),
            publish,
            history_read: Mutex::new(HashMap::new()),
            blobs,
            fetching: Mutex::new(std::collections::HashSet::new()),
            damaged: Arc::default(),
            reuploads: files::Reuploads::default(),
            events,
            offer: Mutex::new(None),
        });
        tokio::spawn(node.clone().gossip_task(gossiped));
        tokio::spawn(node.clone().publish_task(to_publish));
        tokio::spawn(node.clone().topics_task());
        tokio::spawn(node.clone().inbox_task());
        tokio::spawn(node.clone().outbox_task());
        tokio::spawn(node.clone().resume_intents());
        tokio::spawn(node.clone().key_package_task());
        tokio::spawn(node.clone().link_state_task());
        tokio::spawn(node.clone().evidence_task());
        tokio::spawn(node.clone().peer_task(asks));
        tokio::spawn(node.clone().lan_task());
        tokio::spawn(node.clone().file_request_task());
        tokio::spawn(node.clone().follow_task());
        Ok(node)
    }

    /// This node's libp2p peer id, the addresses it listens on, and the peers connected now.
    pub async fn network(&self) -> Result<(String, Vec<String>, Vec<PeerInfo>), NodeError> {
        let unavailable = |e: crate::host::HostError| NodeError::Invalid(e.to_string());
        let listening = self.host.listening().await.map_err(unavailable)?;
        let peers = self.host.peers().await.map_err(unavailable)?;
        let me = self.host.peer_id();
        let listening = listening
            .into_iter()
            .map(|a| {
                if a.iter().last() == Some(Protocol::P2p(me)) {
                    a
                } else {
                    a.with(Protocol::P2p(me))
                }
            })
            .map(|a| a.to_string())
            .collect();
        Ok((me.to_string(), listening, peers))
    }

    /// Dials a peer at a libp2p address (ending in `/p2p/PEER_ID`).
    pub async fn dial(&self, addr: &str) -> Result<(), NodeError> {
        let addr = crate::config::peer_addr(addr)
            .map_err(|e| NodeError::Invalid(format!("address {e}")))?;
        self.host.dial(addr).await.map_err(|e| NodeError::Invalid(e.to_string()))
    }

    /// Keeps the gossip topics those of the channels this device is in: at start, when the
    /// engine announces a change of channels, and every few seconds. (Read from the engine,
    /// which a receive holds until its commit: an event announced before the commit is read
    /// after it.)
    async fn topics_task(self: Arc<Self>) {
        let mut events = self.subscribe().await;
        loop {
            let channels = self.with(|e| e.active_channels()).await;
            if self.host.set_topics(channels).await.is_err() {
                return;
            }
            let changed = async {
                loop {
                    match events.recv().await {
                        Ok(
                            Event::Joined { .. } | Event::Removed { .. } | Event::Members { .. },
                        )
                        | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            };
            tokio::select! {
                () = changed => {}
                () = self.topics.notified() => {}
                () = tokio::time::sleep(TOPICS_INTERVAL) => {}
            }
        }
    }

    /// Gossips what [`Node::send`] released, and marks each message `gossiped` once a peer of
    /// its channel took it. A message no peer takes goes by the relay only, as before gossip.
    async fn publish_task(self: Arc<Self>, mut queue: mpsc::Receiver<ToPublish>) {
        while let Some((channel, id, envelope, lan)) = queue.recv().await {
            let data = chitchat_proto::codec::encode(&envelope);
            match self.host.publish(channel, data).await {
                Ok(()) => {
                    let recorded = match lan {
                        Some((outbox_id, item)) => {
                            self.with(move |e| e.lan_published(outbox_id, &item)).await
                        }
                        None => self.with(move |e| e.gossiped(&channel, &id)).await,
                    };
                    if let Err(e) = recorded {
                        tracing::debug!(error = %e, "cannot record a gossiped message");
                    }
                }
                Err(e) => tracing::debug!(%channel, error = %e, "not gossiped"),
            }
        }
    }

    /// Judges what peers gossip, a batch at a time, beside the engine (signatures, and the
    /// members read from `rosters-0`): the host forwards what is accepted, drops the rest, and
    /// counts what is rejected against the peer that sent it. What is accepted goes to the
    /// engine through the same entry point as the inbox's items, which drops the second copy
    /// of a message by its id.
    async fn gossip_task(self: Arc<Self>, mut queue: mpsc::Receiver<Gossiped>) {
        while let Some(first) = queue.recv().await {
            let mut batch = vec![first];
            while batch.len() < GOSSIP_BATCH {
                match queue.try_recv() {
                    Ok(g) => batch.push(g),
                    Err(_) => break,
                }
            }
            let rosters = self.rosters.clone();
            let at = now();
            let judged = tokio::task::spawn_blocking(move || {
                batch.into_iter().map(|g| (judge(&rosters, &g, at), g)).collect::<Vec<_>>()
            })
            .await;
            let Ok(judged) = judged else { continue };
            let mut accepted = Vec::new();
            for ((verdict, incoming), g) in judged {
                if !matches!(verdict, Verdict::Accept) {
                    tracing::debug!(peer = %g.source, ?verdict, "gossip not accepted");
                }
                self.host.report(g.id, g.source, verdict);
                if let (Verdict::Accept, Some(i)) = (verdict, incoming) {
                    accepted.push(i);
                }
            }
            if accepted.is_empty() {
                continue;
            }
            let result = match self.link() {
                Ok(link) => self.receive(&link, accepted, &mut Vec::new()).await.map(|_| ()),
                Err(_) => {
                    let now = now();
                    self.with(move |e| e.receive(&accepted, now))
                        .await
                        .map(|_| ())
                        .map_err(Into::into)
                }
            };
            if let Err(e) = result {
                // The inbox brings the same messages.
                tracing::debug!(error = %e, "gossiped messages not processed");
            }
        }
    }

    /// Whether the relay link is connected and since when; `None` before registration.
    /// Whether the relay said this device was revoked (by its user's other devices).
    pub fn is_revoked(&self) -> bool {
        self.link().ok().is_some_and(|l| l.is_revoked())
    }

    pub fn link_state(&self) -> Option<LinkState> {
        self.link().ok().map(|l| *l.state().borrow())
    }

    /// Puts the relay link's ups and downs on the event stream, and in the log.
    async fn link_state_task(self: Arc<Self>) {
        let mut state = self.wait_for_link().await.state();
        loop {
            let now = *state.borrow_and_update();
            if now.connected {
                tracing::info!("connected to the relay");
            } else {
                tracing::info!(since_ms = now.since.0, "not connected to the relay");
            }
            let event = Event::Relay { connected: now.connected, since_ms: now.since.0 };
            self.with(move |e| e.announce(event)).await;
            if state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Runs `f` on the engine, where blocking is allowed (engine operations fsync).
    pub async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> R + Send + 'static,
    ) -> R {
        let engine = self.engine.clone();
        let run = move || {
            let mut guard = match engine.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            f(&mut guard)
        };
        // On a multi-threaded runtime the call runs right here, the worker's other tasks
        // moving to another worker: no hand-off to a blocking thread and back, which costs
        // more than most engine calls.
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            return tokio::task::block_in_place(run);
        }
        match tokio::task::spawn_blocking(run).await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Subscribes to the event stream.
    pub async fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.with(|e| e.subscribe()).await
    }

    fn link(&self) -> Result<Arc<RelayLink>, NodeError> {
        self.link
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .ok_or(NodeError::Engine(EngineError::NotRegistered))
    }

    async fn wait_for_link(&self) -> Arc<RelayLink> {
        loop {
            let notified = self.registered.notified();
            if let Ok(link) = self.link() {
                return link;
            }
            notified.await;
        }
    }

    /// Registers with the relay whose HTTP endpoint is `url` (its `.well-known` names its
    /// host, key and addresses), as `name`, with an invite token.
    pub async fn register(
        &self,
        url: &str,
        token: Option<String>,
        name: &str,
    ) -> Result<Account, NodeError> {
        self.check_unregistered().await?;
        chitchat_proto::identity::check_local_name(name)
            .map_err(|e| NodeError::Invalid(format!("name {name:?}: {e}")))?;
        let relay = fetch_well_known(url).await?;
        let key = self.with(|e| e.key().clone()).await;
        let link = Arc::new(link_for(&self.host, key, &relay, &self.config).await?);
        let now = now();
        let dir = self.with(move |e| e.first_dir("", now)).await;
        let local_name = name.to_owned();
        let request = Request::Register { token, local_name: local_name.clone(), dir: dir.clone() };
        let sponsorship = match link.call(&request).await? {
            Response::Registered { sponsorship } => sponsorship,
            other => return Err(refused(other)),
        };
        self.registered_as(link, relay, local_name, dir, sponsorship).await
    }

    /// `AlreadyRegistered` if this device is.
    async fn check_unregistered(&self) -> Result<(), NodeError> {
        match self.with(|e| e.account().cloned()).await {
            Some(a) => {
                let address = a.dir.body.sponsorships.first().map(|s| s.address().to_string());
                Err(EngineError::AlreadyRegistered(address.unwrap_or_default()).into())
            }
            None => Ok(()),
        }
    }

    /// The record the relay holds for this device, if any.
    async fn relay_record(&self, link: &RelayLink, me: DeviceId) -> Result<Option<Dir>, NodeError> {
        match link.call(&Request::LookupDevices { devices: vec![me] }).await? {
            Response::Dirs(dirs) => Ok(dirs.into_iter().find(|d| d.device() == me)),
            other => Err(refused(other)),
        }
    }

    /// After the relay registered this device with the record `sent` and sponsored it: the
    /// sponsored record (one above what the relay holds: `sent`, or a later one a lost answer
    /// left there) published, the account kept, KeyPackages uploaded, the tasks started.
    async fn registered_as(
        &self,
        link: Arc<RelayLink>,
        relay: RelayInfo,
        local_name: String,
        sent: Dir,
        sponsorship: chitchat_proto::Sponsorship,
    ) -> Result<Account, NodeError> {
        let held = self
            .relay_record(&link, sent.device())
            .await?
            .filter(|d| d.body.seq > sent.body.seq)
            .unwrap_or(sent);
        let now = now();
        let display_name = local_name.clone();
        let dir = self
            .with(move |e| {
                let change = |b: &mut chitchat_proto::DirBody| {
                    b.sponsorships = vec![sponsorship];
                    b.profile.display_name = display_name;
                };
                e.next_dir(&held, change, now)
            })
            .await?;
        match link.call(&Request::PublishDir { dir: dir.clone() }).await? {
            Response::DirPublished => {}
            other => return Err(refused(other)),
        }
        let account = Account { relay, local_name, dir };
        let saved = account.clone();
        self.with(move |e| e.set_account(saved)).await?;
        // KeyPackages first, so that others can invite this device as soon as this returns;
        // then the background tasks start.
        if let Err(e) = self.top_up_key_packages(&link).await {
            tracing::warn!(error = %e, "cannot upload KeyPackages yet");
        }
        if let Ok(mut l) = self.link.lock() {
            *l = Some(link.clone());
        }
        self.registered.notify_waiters();
        Ok(account)
    }

    /// Uploads KeyPackages when the relay holds few.
    async fn top_up_key_packages(&self, link: &RelayLink) -> Result<(), NodeError> {
        let query = Request::UploadKeyPackages { packages: vec![], last_resort: None };
        let available = match link.call(&query).await? {
            Response::KeyPackagesStored { available } => available,
            other => return Err(refused(other)),
        };
        if available >= KEY_PACKAGE_LOW {
            return Ok(());
        }
        let (packages, last_resort) =
            self.with(|e| e.key_packages(KEY_PACKAGE_BATCH, true)).await?;
        match link.call(&Request::UploadKeyPackages { packages, last_resort }).await? {
            Response::KeyPackagesStored { .. } => Ok(()),
            other => Err(refused(other)),
        }
    }

    async fn key_package_task(self: Arc<Self>) {
        let link = self.wait_for_link().await;
        let mut backoff = Backoff::default();
        loop {
            match self.top_up_key_packages(&link).await {
                Ok(()) => {
                    backoff.reset();
                    // Joining a channel uses one; check again now and then.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "KeyPackage top-up failed");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Creates a channel and asks the relay to order it.
    pub async fn create_channel(
        &self,
        name: String,
        mime: String,
        open: bool,
        lan: bool,
    ) -> Result<ChannelId, NodeError> {
        if name.is_empty() || name.len() > 255 || mime.is_empty() || mime.len() > 255 {
            return Err(NodeError::Invalid("name and MIME type: 1 to 255 bytes".into()));
        }
        if lan && self.config.network.relay_only {
            return Err(NodeError::Invalid(
                "a relay-only node meets no peer: it cannot order a relay-less channel".into(),
            ));
        }
        let now = now();
        let id = self.with(move |e| e.create_channel(&name, &mime, open, lan, now)).await?;
        self.topics.notify_one();
        if lan {
            return Ok(id);
        }
        if let Err(e) = self.open_at_relay(&id).await {
            // Opened before the first commit instead.
            tracing::warn!(channel = %id, error = %e, "relay not told of the channel yet");
        }
        Ok(id)
    }

    /// Opens the channel at the relay unless it was opened there already (`again`: whatever
    /// was done before; the relay says it does not order the channel, which happens after the
    /// channel's relay set changed: the group of the new set opens it).
    async fn open_at_relay(&self, id: &ChannelId) -> Result<(), NodeError> {
        self.open_at_relay_again(id, false).await
    }

    pub(crate) async fn open_at_relay_again(
        &self,
        id: &ChannelId,
        again: bool,
    ) -> Result<(), NodeError> {
        let channel = *id;
        let (record, request) = self
            .with(move |e| -> Result<_, EngineError> {
                let opened = e.channel(&channel)?.0.opened && !again;
                Ok((opened, if opened { None } else { Some(e.open_request(&channel)?) }))
            })
            .await?;
        let (false, Some(request)) = (record, request) else { return Ok(()) };
        let link = self.link()?;
        match link.call(&request).await? {
            Response::ChannelOpened { .. } => {
                self.with(move |e| e.mark_opened(&channel)).await?;
                Ok(())
            }
            other => Err(refused(other)),
        }
    }

    /// Encrypts and stores a message, then wakes the outbox. Returns once the message is
    /// durable (status `sending`); delivery goes on in the background.
    pub async fn send(
        self: &Arc<Self>,
        channel: ChannelId,
        payload: Vec<u8>,
        store: bool,
    ) -> Result<MessageId, NodeError> {
        // Right after start, the channel's epoch is the one on disk: what the relay kept for
        // this node comes first (at most a few seconds), so that the message is encrypted for
        // the members the channel has now.
        if !*self.caught_up.borrow() {
            let mut caught_up = self.caught_up.subscribe();
            if tokio::time::timeout(CATCH_UP_WAIT, caught_up.wait_for(|c| *c)).await.is_err() {
                // The relay is away or slow: sends go on with what this node knows.
                self.caught_up.send_replace(true);
            }
        }
        let now = now();
        let node = self.clone();
        // Runs on the engine's thread, maybe before the send's commit: the outbox task posts
        // the message while the disk writes it.
        let release = move |r: Released| {
            let Released { outbox_id, item, gossip, early, lan } = r;
            if lan {
                // No relay: gossip alone carries it (the LAN task again if no one took it).
                let _ =
                    node.publish.try_send((item.channel, item.id, gossip, Some((outbox_id, item))));
                return;
            }
            if node.publish.try_send((item.channel, item.id, gossip, None)).is_err() {
                tracing::debug!("gossip queue full; the relay alone carries a message");
            }
            if let Ok(mut q) = node.ready.lock()
                // Bounded: beyond, the worker finds the rest in the store.
                && q.len() < crate::engine::OUTBOX_BATCH
            {
                q.push_back((outbox_id, item));
            }
            node.outbox.notify_one();
            if early && fault("exit-before-send-commit") {
                // The message leaves; the process dies before its state is on disk.
                std::thread::sleep(std::time::Duration::from_millis(500));
                std::process::abort();
            }
        };
        Ok(self.with(move |e| e.send(&channel, &payload, store, now, release)).await?)
    }

    /// Posts messages stored by [`Node::send`] in this run at once, in order, skipping any that
    /// a pass over the store already delivered. Anything that does not go through is left to
    /// the store passes.
    async fn deliver_ready(&self, link: &RelayLink, after: u64) -> Result<(), NodeError> {
        let ready: Vec<(u64, OutboxItem)> = match self.ready.lock() {
            Ok(mut q) => q.drain(..).filter(|(id, _)| *id >= after).collect(),
            Err(_) => return Ok(()),
        };
        if ready.is_empty() {
            return Ok(());
        }
        self.post(link, ready).await.map(|_| ())
    }

    /// One delivery pass over the oldest outbox items, in order.
    /// `passed` becomes one past the highest outbox id it read.
    async fn deliver_pass(&self, link: &RelayLink, passed: &mut u64) -> Result<Pass, NodeError> {
        let items = self.with(|e| e.outbox()).await?;
        if items.is_empty() {
            return Ok(Pass::Empty);
        }
        if let Some((last, _)) = items.last() {
            *passed = (*passed).max(last.saturating_add(1));
        }
        let full = items.len() >= crate::engine::OUTBOX_BATCH;
        let pass = self.post(link, items).await?;
        Ok(match pass {
            Pass::Empty if full => Pass::More,
            other => other,
        })
    }

    /// Posts outbox items to the relay, which fans each out to its channel's members, in
    /// requests of up to [`MAX_POST_BATCH`], then records the outcome in one transaction.
    async fn post(
        &self,
        link: &RelayLink,
        items: Vec<(u64, OutboxItem)>,
    ) -> Result<Pass, NodeError> {
        // The injected fault hits messages sent in this run, not redeliveries after a restart.
        let fresh = items.iter().any(|(id, _)| *id >= self.first_outbox_id);
        let mut outcome = vec![Delivery::Retry; items.len()];
        let mut failed = false;
        let mut unknown_channels = BTreeSet::new();
        for (chunk_index, chunk) in items.chunks(MAX_POST_BATCH).enumerate() {
            let posts = chunk
                .iter()
                .map(|(_, item)| ChannelPost {
                    channel: item.channel,
                    message: item.message.clone(),
                })
                .collect();
            let base = chunk_index * MAX_POST_BATCH;
            match link.call(&Request::Post { posts }).await {
                Ok(Response::Posted(results)) if results.len() == chunk.len() => {
                    for (i, ((_, item), result)) in chunk.iter().zip(results).enumerate() {
                        outcome[base + i] = match result {
                            PostResult::Posted { skipped, .. } => {
                                if skipped > 0 {
                                    tracing::warn!(
                                        message = %crate::engine::id_string(&item.id), skipped,
                                        "some members' inboxes were full: they miss this message"
                                    );
                                }
                                Delivery::Posted
                            }
                            PostResult::Refused(ErrorCode::NotFound) => {
                                // The relay does not order the channel (it was created while
                                // the relay was away): open it there, then try again.
                                unknown_channels.insert(item.channel);
                                Delivery::Retry
                            }
                            PostResult::Refused(code) if code.is_retryable() => Delivery::Retry,
                            PostResult::Refused(code) => {
                                tracing::warn!(
                                    message = %crate::engine::id_string(&item.id), code = code.name(),
                                    "the relay refused a message; not retried"
                                );
                                Delivery::Failed(refusal_reason(code))
                            }
                        };
                    }
                }
                other => {
                    match other {
                        Ok(r) => tracing::warn!(response = ?r, "unexpected answer to Post"),
                        Err(e) => tracing::debug!(error = %e, "delivery failed"),
                    }
                    failed = true;
                    break;
                }
            }
        }
        if fresh && fault("exit-after-enqueue") {
            // Once the sends' own commits are done (they hold the engine): the crash hits
            // between the relay's acceptance and the outbox's record of it.
            self.with(|_| ()).await;
            // The messages are in the recipients' inboxes, and still in the outbox.
            std::process::abort();
        }
        for channel in unknown_channels {
            if let Err(e) = self.open_at_relay_again(&channel, true).await {
                tracing::debug!(%channel, error = %e, "cannot open the channel at the relay");
            }
        }
        let progress: Vec<(u64, OutboxItem, Delivery)> =
            items.into_iter().zip(outcome).map(|((id, item), d)| (id, item, d)).collect();
        let all_done = progress.iter().all(|(_, _, d)| *d != Delivery::Retry);
        tracing::debug!(items = progress.len(), all_done, failed, "posted");
        let give_up_ms = u64::from(self.config.send.give_up_after_days) * 24 * 3600 * 1000;
        self.with(move |e| e.outbox_progress(progress, now(), give_up_ms)).await?;
        if failed {
            return Err(LinkError::Unreachable("delivery incomplete".into()).into());
        }
        Ok(if all_done { Pass::Empty } else { Pass::Refused })
    }

    async fn outbox_task(self: Arc<Self>) {
        let link = self.wait_for_link().await;
        let mut backoff = Backoff::default();
        // Outbox ids below this were looked at by a pass over the store.
        let mut passed: u64 = 0;
        loop {
            if link.is_revoked() {
                // Nothing will ever be delivered: the messages stay in the outbox, shown as
                // sending, and this task idles.
                tokio::time::sleep(REVOKED_IDLE).await;
                continue;
            }
            let woken = self.outbox.notified();
            if let Err(e) = self.deliver_ready(&link, passed).await {
                tracing::debug!(error = %e, "delivery of fresh messages failed; the store pass retries");
            }
            match self.deliver_pass(&link, &mut passed).await {
                Ok(Pass::Empty) => {
                    backoff.reset();
                    woken.await;
                }
                Ok(Pass::More) => backoff.reset(),
                other => {
                    if let Err(e) = other {
                        tracing::debug!(error = %e, "delivery pass failed");
                    }
                    // A new message, or the inbox task finding the relay back, ends the pause.
                    tokio::select! {
                        () = backoff.wait() => {}
                        () = woken => {}
                    }
                }
            }
        }
    }

    /// Sends this device's epoch reports (the latest of each channel that reached a new
    /// epoch) and the equivocation proofs it found, through the relay. Reports are best
    /// effort: one that cannot go is replaced by the channel's next.
    async fn evidence_task(self: Arc<Self>) {
        let link = self.wait_for_link().await;
        let mut backoff = Backoff::capped(EVIDENCE_MAX_BACKOFF_MS);
        loop {
            tokio::time::sleep(EVIDENCE_INTERVAL).await;
            let out = self.with(|e| e.take_outgoing()).await;
            if out.is_empty() {
                continue;
            }
            let mut unsent = crate::engine::Outgoing::default();
            for proof in out.proofs {
                match link.call(&Request::Equivocation { proof: proof.clone() }).await {
                    Ok(Response::EquivocationNoted { new }) => {
                        tracing::info!(new, "the relay took an equivocation proof");
                    }
                    Ok(other) => {
                        tracing::warn!(answer = ?other, "the relay refused an equivocation proof")
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "equivocation proof not sent");
                        unsent.proofs.push(proof);
                    }
                }
            }
            for report in out.reports {
                // To the members online by gossip (what a fork looks like does not wait for
                // the relay), and through the relay to every member.
                let bytes = chitchat_proto::codec::encode(&report);
                if let Err(e) = self.host.publish_report(report.body.channel, bytes).await {
                    tracing::debug!(channel = %report.body.channel, error = %e, "epoch report not gossiped");
                }
                match link.call(&Request::Report { report: report.clone() }).await {
                    Ok(Response::Posted(results))
                        if matches!(results[..], [PostResult::Posted { .. }]) => {}
                    Ok(Response::Posted(results)) if matches!(results[..], [PostResult::Refused(code)] if code.is_retryable()) =>
                    {
                        unsent.reports.push(report);
                    }
                    Ok(other) => {
                        tracing::debug!(channel = %report.body.channel, answer = ?other, "epoch report refused");
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "epoch report not sent");
                        unsent.reports.push(report);
                    }
                }
            }
            if unsent.is_empty() {
                backoff.reset();
            } else {
                self.with(move |e| e.untake_outgoing(unsent)).await;
                backoff.wait().await;
            }
        }
    }

    async fn inbox_task(self: Arc<Self>) {
        let link = self.wait_for_link().await;
        let mut cursor: Option<u64> = None;
        let mut held: Vec<(ChannelId, u64, u64)> = Vec::new();
        let mut acking: Option<tokio::task::JoinHandle<()>> = None;
        // Live push: come back soon after the relay does.
        let mut backoff = Backoff::capped(INBOX_MAX_BACKOFF_MS);
        let timeout_ms = self.config.relay.wait_seconds.saturating_mul(1000);
        let wait = {
            let link = link.clone();
            move |after: Option<u64>, timeout_ms: u32| {
                let link = link.clone();
                async move {
                    link.call(&Request::Wait { after, max: MAX_FETCH_ITEMS, timeout_ms }).await
                }
            }
        };
        // The next wait, already at the relay while a batch is processed and committed: the
        // next message is pushed without waiting for this node's disk.
        let mut next: Option<tokio::task::JoinHandle<Result<Response, LinkError>>> = None;
        loop {
            if link.is_revoked() {
                tokio::time::sleep(REVOKED_IDLE).await;
                continue;
            }
            let answer = match next.take() {
                Some(prefetched) => match prefetched.await {
                    Ok(answer) => answer,
                    Err(e) => Err(LinkError::Unreachable(e.to_string())),
                },
                // Until the inbox was read to its end once, a look that does not wait: an empty
                // inbox says so at once.
                None if !*self.caught_up.borrow() => wait(cursor, 0).await,
                None => wait(cursor, timeout_ms).await,
            };
            let (items, more) = match answer {
                Ok(Response::Items { items, more }) => (items, more),
                Ok(other) => {
                    tracing::warn!(response = ?other, "inbox wait refused");
                    backoff.wait().await;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "inbox wait failed");
                    backoff.wait().await;
                    continue;
                }
            };
            if backoff.failures > 0 {
                // The relay is back: whatever waits in the outbox can go now.
                self.outbox.notify_one();
            }
            backoff.reset();
            if items.is_empty() {
                self.caught_up.send_replace(true);
                continue;
            }
            tracing::debug!(
                count = items.len(),
                first = items.first().map(|i| i.id),
                ?cursor,
                "inbox items"
            );
            let last = items.iter().map(|i| i.id).max();
            next = Some(tokio::spawn(wait(last.or(cursor), timeout_ms)));
            let (items, notices) = match self.with_history(&link, items).await {
                Ok(filled) => filled,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch what the inbox missed; retrying");
                    if let Some(prefetched) = next.take() {
                        prefetched.abort();
                    }
                    backoff.wait().await;
                    continue;
                }
            };
            match self.receive(&link, items, &mut held).await {
                Ok((done_to, removals, mut ack)) => {
                    ack.extend(notices);
                    cursor = done_to.max(last).or(cursor);
                    if !more {
                        // All the relay held is processed: the channels are at their epochs.
                        self.caught_up.send_replace(true);
                    }
                    // The ack goes while the next batch is fetched and processed: at most one
                    // in flight, so a slow relay slows the inbox down instead of piling up acks.
                    if let Some(previous) = acking.take() {
                        let _ = previous.await;
                    }
                    let link = link.clone();
                    acking = Some(tokio::spawn(async move { acknowledge(&link, ack).await }));
                    self.remove_on_request(removals);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inbox processing failed");
                    // The batch is fetched again: the prefetched wait starts after it.
                    if let Some(prefetched) = next.take() {
                        prefetched.abort();
                    }
                    backoff.wait().await;
                }
            }
        }
    }

    /// The inbox items, each preceded by the entries of its channel's history the inbox missed
    /// before it (fetched from the relay and checked, [`crate::history`]); and the notices of
    /// missed entries ([`Envelope::Missed`]), done with once the batch is. A run already
    /// fetched is not fetched again; a run the relay no longer keeps, or refuses, is counted
    /// as missed; a relay that cannot be reached fails the batch (it is fetched again).
    async fn with_history(
        &self,
        link: &RelayLink,
        items: Vec<InboxItem>,
    ) -> Result<(Vec<Incoming>, Vec<u64>), NodeError> {
        if items.iter().all(|i| history::gap(i).is_none()) {
            return Ok((items.into_iter().map(Incoming::from).collect(), Vec::new()));
        }
        let relay = self
            .with(|e| e.account().map(|a| a.relay.id.key))
            .await
            .ok_or_else(|| NodeError::Invalid("no relay".into()))?;
        let mut out = Vec::with_capacity(items.len());
        let mut notices = Vec::new();
        let mut missed = 0u64;
        for item in items {
            let Some((channel, from, to)) = history::gap(&item) else {
                out.push(Incoming::Inbox(item));
                continue;
            };
            let read = self.history_read.lock().map(|r| r.get(&channel).copied()).unwrap_or(None);
            let mut at = from.max(read.unwrap_or(0));
            // Up to the item's own position, or, for a notice, to the end of the history.
            let mut end = to.unwrap_or(u64::MAX);
            while at < end {
                let max = (end - at).min(u64::from(MAX_HISTORY_ENTRIES)) as u32;
                let request = Request::History { channel, from: at, max };
                let (first, next, pack) = match link.call(&request).await? {
                    Response::History { first, next, pack } => (first, next, pack),
                    Response::Error { code, message } if !code.is_retryable() => {
                        tracing::warn!(%channel, %message, "the relay gives no history");
                        break;
                    }
                    other => return Err(refused(other)),
                };
                end = end.min(next);
                // A notice's run ends where the history does: its last entries only, like
                // any other gap's.
                if end.saturating_sub(at) > history::MAX_FILL {
                    missed = missed.saturating_add(end - history::MAX_FILL - at);
                    at = end - history::MAX_FILL;
                    continue;
                }
                let Some(pack) = pack else { break };
                // An answer that does not check is not retried (it would block the inbox
                // behind it): what it should have held counts as missed.
                let entries = match history::check(&relay, &channel, at, first, &pack) {
                    Ok(entries) => entries,
                    Err(e) => {
                        tracing::warn!(%channel, error = %e, "a history answer of the relay is refused");
                        break;
                    }
                };
                let Some(last) = entries.last().map(|(seq, _)| *seq) else { break };
                missed = missed.saturating_add(entries.first().map_or(0, |(seq, _)| seq - at));
                let wanted = entries.into_iter().filter(|(seq, _)| *seq < end);
                out.extend(wanted.map(|(_, e)| Incoming::History(e)));
                at = last.saturating_add(1);
            }
            if end != u64::MAX {
                missed = missed.saturating_add(end.saturating_sub(at));
            }
            if let Ok(mut r) = self.history_read.lock() {
                let was = r.entry(channel).or_default();
                *was = (*was).max(at);
            }
            tracing::info!(%channel, from, to = at, "filled what the inbox missed from the relay's history");
            match item.envelope {
                Envelope::Missed { .. } => notices.push(item.id),
                _ => out.push(Incoming::Inbox(item)),
            }
        }
        if missed > 0 {
            tracing::warn!(missed, "entries the inbox missed are gone from the relay's history");
            self.with(move |e| e.count_missed(missed)).await;
        }
        Ok((out, notices))
    }

    /// Processes a run of inbox items; returns the highest item id looked at (the next `Wait`
    /// starts after it), the removals asked for, and the ids to acknowledge (all durable).
    async fn receive(
        &self,
        link: &RelayLink,
        items: Vec<Incoming>,
        held: &mut Vec<(ChannelId, u64, u64)>,
    ) -> Result<(Option<u64>, Vec<(ChannelId, DeviceId)>, Vec<u64>), NodeError> {
        let last = items.iter().filter_map(Incoming::inbox_id).max();
        let mut removals = Vec::new();
        let items = Arc::new(items);
        let mut start = 0;
        let mut lookups = 0;
        let mut ack = Vec::new();
        // Once through the items, and again after each look-up a message asked for (one held
        // for a Welcome and replayed may ask for one after the last item).
        loop {
            let batch = items.clone();
            let now = now();
            let from = start.min(items.len());
            let received = self.with(move |e| e.receive(&batch[from..], now)).await?;
            ack.extend(received.done);
            removals.extend(received.removals);
            if received.reloaded {
                // Their messages left memory with the reload; they stay in the inbox for the
                // next start.
                held.clear();
            }
            held.extend(received.held);
            match received.stopped {
                Some((index, need)) if lookups < 8 => {
                    lookups += 1;
                    start += index;
                    self.lookup_devices(link, need).await?;
                }
                Some((index, need)) => {
                    tracing::warn!(?need, "identity records not found; message skipped");
                    // (A replayed message has no item here: it waits until it expires.)
                    if let Some(id) = items.get(start + index).and_then(Incoming::inbox_id) {
                        ack.push(id);
                    }
                    start += index + 1;
                    lookups = 0;
                    if start >= items.len() {
                        break;
                    }
                }
                None => break,
            }
        }
        // Buffered messages were processed once their channel reached their epoch.
        let epochs: BTreeMap<ChannelId, Option<u64>> = {
            let channels: Vec<ChannelId> = held.iter().map(|(c, _, _)| *c).collect();
            self.with(move |e| channels.into_iter().map(|c| (c, e.epoch(&c))).collect()).await
        };
        held.retain(|(c, epoch, id)| {
            let reached = epochs.get(c).copied().flatten().is_none_or(|now| now >= *epoch);
            if reached {
                ack.push(*id);
            }
            !reached
        });
        self.epochs.notify_waiters();
        Ok((last, removals, ack))
    }

    /// Looks up what a message needs: the relays it names that this device does not know
    /// (through its relay, which vouches for their keys), and the devices, at its relay and
    /// then at the other relays it knows.
    async fn lookup_devices(&self, link: &RelayLink, need: Need) -> Result<(), NodeError> {
        let Need { devices, relays } = need;
        let first: Vec<DeviceId> = devices.iter().take(MAX_LOOKUP_DEVICES).copied().collect();
        for relay in relays {
            let request =
                Request::LookupDevicesAt { host: relay.host.clone(), devices: first.clone() };
            match link.call(&request).await {
                Ok(Response::RemoteDirs { relay: vouched, dirs }) if vouched == relay => {
                    self.with(move |e| {
                        e.learn_relay(vouched)?;
                        e.add_dirs(dirs)
                    })
                    .await?;
                }
                Ok(Response::RemoteDirs { relay: vouched, .. }) => {
                    tracing::warn!(host = %relay.host, named = %relay.key, vouched = %vouched.key,
                        "a channel names a relay with another key than the relay's own");
                }
                Ok(other) => tracing::warn!(host = %relay.host, answer = ?other, "relay not found"),
                Err(e) => tracing::warn!(host = %relay.host, error = %e, "relay not reached"),
            }
        }
        for chunk in devices.chunks(MAX_LOOKUP_DEVICES) {
            match link.call(&Request::LookupDevices { devices: chunk.to_vec() }).await? {
                Response::Dirs(dirs) => self.with(move |e| e.add_dirs(dirs)).await?,
                other => return Err(refused(other)),
            }
        }
        let (missing, others): (Vec<DeviceId>, Vec<RelayId>) = self
            .with(move |e| {
                let missing = devices.into_iter().filter(|d| e.dir(d).is_none()).collect();
                (missing, e.relays().cloned().collect())
            })
            .await;
        if missing.is_empty() {
            return Ok(());
        }
        for relay in others {
            let request = Request::LookupDevicesAt {
                host: relay.host.clone(),
                devices: missing.iter().take(MAX_LOOKUP_DEVICES).copied().collect(),
            };
            if let Ok(Response::RemoteDirs { relay: vouched, dirs }) = link.call(&request).await
                && vouched == relay
                && !dirs.is_empty()
            {
                self.with(move |e| e.add_dirs(dirs)).await?;
            }
        }
        Ok(())
    }

    /// Resolves `alice@relay` to the verified records of her devices. A user of another relay
    /// is looked up through this node's relay, which reads that relay's key from its
    /// `.well-known` and answers with it; the node keeps that key to verify the relay's
    /// sponsorships.
    pub async fn lookup(&self, address: &str) -> Result<Vec<Dir>, NodeError> {
        let address = Address::parse(address)
            .map_err(|e| NodeError::Invalid(format!("address {address:?}: {e}")))?;
        let link = self.link()?;
        let home = self.with(|e| e.account().map(|a| a.relay.id.host.clone())).await;
        let dirs = if home.as_deref() == Some(address.host.as_str()) {
            match link.call(&Request::Lookup { local_name: address.local.clone() }).await? {
                Response::Dirs(dirs) => dirs,
                other => return Err(refused(other)),
            }
        } else {
            let request =
                Request::LookupAt { host: address.host.clone(), local_name: address.local.clone() };
            match link.call(&request).await? {
                Response::RemoteDirs { relay, dirs } if relay.host == address.host => {
                    self.with(move |e| e.learn_relay(relay)).await?;
                    dirs
                }
                Response::RemoteDirs { relay, .. } => {
                    return Err(NodeError::Invalid(format!(
                        "the relay answered for {} when asked about {}",
                        relay.host, address.host
                    )));
                }
                other => return Err(refused(other)),
            }
        };
        let now = now();
        let (valid, rejected) = self
            .with(move |e| {
                let (ok, bad): (Vec<Dir>, Vec<Dir>) =
                    dirs.into_iter().partition(|d| e.verify_dir(d, now).is_ok());
                let _ = e.add_dirs(ok.clone());
                (ok, bad.len())
            })
            .await;
        if valid.is_empty() {
            return Err(NodeError::NotFound(format!(
                "no device of {address} with a valid record ({rejected} rejected)"
            )));
        }
        Ok(valid)
    }

    /// Adds every device of `address` to the channel, through the ordering flow.
    pub async fn invite(
        &self,
        channel: ChannelId,
        address: &str,
    ) -> Result<Vec<DeviceId>, NodeError> {
        if self.with(move |e| e.is_relayless(&channel)).await {
            return self.lan_invite(channel, address).await;
        }
        self.add_devices_of(channel, address, |_| true).await
    }

    /// Adds the devices of the user at `address` that `wanted` picks and that are not members
    /// yet, to a channel relays order.
    async fn add_devices_of(
        &self,
        channel: ChannelId,
        address: &str,
        wanted: impl Fn(&DeviceId) -> bool,
    ) -> Result<Vec<DeviceId>, NodeError> {
        let home = self.with(|e| e.account().map(|a| a.relay.id.host.clone())).await;
        let host = Address::parse(address)
            .map_err(|e| NodeError::Invalid(format!("address {address:?}: {e}")))?
            .host;
        let dirs = self.lookup(address).await?;
        let members: BTreeSet<DeviceId> =
            self.with(move |e| e.members(&channel)).await?.into_iter().collect();
        let link = self.link()?;
        let mut adds = Vec::new();
        for dir in
            dirs.into_iter().filter(|d| !members.contains(&d.device()) && wanted(&d.device()))
        {
            let device = dir.device();
            let request = if home.as_deref() == Some(host.as_str()) {
                Request::ClaimKeyPackage { device }
            } else {
                Request::ClaimKeyPackageAt { host: host.clone(), device }
            };
            match link.call(&request).await? {
                Response::KeyPackage(kp) => adds.push((dir, Bytes(kp))),
                other => {
                    tracing::warn!(%device, response = ?other, "no KeyPackage");
                }
            }
        }
        if adds.is_empty() {
            return Err(NodeError::Invalid(format!(
                "{address}: every device is a member already, or none has a KeyPackage"
            )));
        }
        let added = adds.iter().map(|(d, _)| d.device()).collect();
        self.change(channel, IntentOp::Add(adds)).await?;
        Ok(added)
    }

    /// Removes devices from the channel, through the ordering flow.
    pub async fn remove(
        &self,
        channel: ChannelId,
        devices: Vec<DeviceId>,
    ) -> Result<(), NodeError> {
        self.change(channel, IntentOp::Remove(devices)).await
    }

    /// Leaves the channel on this device: asks the admins to remove it (they must: MLS lets
    /// no member commit its own removal), then stops the channel here. Fails, changing
    /// nothing, if the request cannot reach the relay.
    pub async fn leave(&self, channel: ChannelId) -> Result<(), NodeError> {
        if self.with(move |e| e.is_relayless(&channel)).await {
            return self.leave_lan(channel).await;
        }
        let _one_at_a_time = self.ordering.lock().await;
        let now = now();
        let requests = self.with(move |e| e.leave_requests(&channel, now)).await?;
        if !requests.is_empty() {
            let link = self.link()?;
            for chunk in requests.chunks(MAX_ENQUEUE_BATCH) {
                let envelopes = chunk.to_vec();
                match link.call(&Request::EnqueueBatch { envelopes }).await? {
                    Response::EnqueuedBatch(_) => {}
                    other => return Err(refused(other)),
                }
            }
        }
        self.with(move |e| e.leave(&channel)).await?;
        self.topics.notify_one();
        Ok(())
    }

    /// Removes members that asked to leave (each signed its request), one task each: another
    /// admin's removal may win, which is as good.
    fn remove_on_request(self: &Arc<Self>, removals: Vec<(ChannelId, DeviceId)>) {
        for (channel, device) in removals {
            let node = self.clone();
            tokio::spawn(async move {
                match node.remove(channel, vec![device]).await {
                    Ok(()) => tracing::info!(%channel, %device, "removed a member at its request"),
                    Err(e) => {
                        tracing::debug!(%channel, %device, error = %e, "removal on request not done (another admin's may have won)")
                    }
                }
            });
        }
    }

    /// Orders a membership change and drops its intent if it fails. A commit the relay may
    /// have ordered (it never answered) is never dropped: it stays staged, and
    /// [`Node::resume_intents`] resubmits it until the relay decides.
    async fn change(&self, channel: ChannelId, op: IntentOp) -> Result<(), NodeError> {
        let _one_at_a_time = self.ordering.lock().await;
        match self.change_locked(channel, op).await {
            Ok(Submitted::Accepted) => Ok(()),
            Ok(_) => Err(NodeError::Link(LinkError::Unreachable(UNDECIDED.into()))),
            Err(e) => {
                if let Err(e) = self.with(move |e| e.discard(&channel, true)).await {
                    tracing::warn!(%channel, error = %e, "cannot drop a failed intent");
                }
                Err(e)
            }
        }
    }

    /// Orders a membership change: stage, submit, merge on acceptance; on a lost race, wait
    /// for the winner and rebuild, with jittered back-off, at most
    /// [`chitchat_proto::ordering::MAX_SUBMIT_ATTEMPTS`] times. Returns `Accepted`, or
    /// `Undecided` if the relay stopped answering (the commit stays staged).
    async fn change_locked(
        &self,
        channel: ChannelId,
        op: IntentOp,
    ) -> Result<Submitted, NodeError> {
        if !self.with(move |e| e.is_relayless(&channel)).await {
            self.open_at_relay(&channel).await?;
        }
        let mut intent = Intent::new(op, now());
        loop {
            if let IntentState::ToPublish { not_before } = intent.state {
                let wait = not_before.0.saturating_sub(now().0);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            let op = intent.change.clone();
            let attempts = intent.attempts;
            let now = now();
            let staged = self.with(move |e| e.stage(&channel, op, attempts, now)).await?;
            intent.published(staged.epoch, chitchat_proto::wire::commit_hash(&staged.commit));
            // The Welcomes go with the commit, all of them: the relays that order it deliver
            // those of their own devices, and queue the others, durably with the fan-out, for
            // the relays the commit brings into the set.
            match self.submit(channel, &staged).await? {
                Submitted::Lost => {
                    intent.lost(now, rand::rng().random());
                    if intent.is_done() {
                        return Err(NodeError::Invalid(format!(
                            "gave up after {} lost races for the channel's epoch",
                            intent.attempts
                        )));
                    }
                }
                decided => return Ok(decided),
            }
        }
    }

    /// Submits a staged commit until the relay decides. Network failures resubmit the same
    /// commit (the relay answers a resubmitted winner again), with back-off capped at 3 s;
    /// after [`SUBMIT_PATIENCE`] it is `Undecided` (the caller hears so in a minute, not after an
    /// outage; the commit stays staged and [`Node::resume_intents`] goes on).
    async fn submit(
        &self,
        channel: ChannelId,
        staged: &StagedRecord,
    ) -> Result<Submitted, NodeError> {
        if self.with(move |e| e.is_relayless(&channel)).await {
            return self.submit_lan(channel, staged).await;
        }
        let link = self.link()?;
        let request = Request::SubmitCommit(CommitSubmission {
            channel,
            epoch: staged.epoch,
            commit: staged.commit.clone(),
            welcome: staged.welcome.clone(),
            fanout: staged.fanout.clone(),
        });
        let mut backoff = Backoff::capped(INBOX_MAX_BACKOFF_MS);
        let deadline = tokio::time::Instant::now() + SUBMIT_PATIENCE;
        let mut reopened = false;
        while tokio::time::Instant::now() < deadline {
            match link.call(&request).await {
                Ok(Response::CommitAccepted { cert }) => {
                    self.with(move |e| e.accept(&channel, &cert)).await?;
                    return Ok(Submitted::Accepted);
                }
                Ok(Response::CommitConflict { winner }) => {
                    self.with(move |e| e.discard(&channel, false)).await?;
                    self.wait_epoch(channel, winner.epoch.saturating_add(1)).await;
                    return Ok(Submitted::Lost);
                }
                Ok(Response::Error { code: ErrorCode::RateLimited { retry_after_ms }, .. }) => {
                    tokio::time::sleep(Duration::from_millis(retry_after_ms.min(MAX_BACKOFF_MS)))
                        .await;
                }
                // The relay does not order the channel (its relay set changed since it was
                // opened): open it there, once, and submit again. An open the relay cannot do
                // yet (the relays that ordered the move are away) is tried again after a while.
                Ok(Response::Error { code: ErrorCode::NotFound, .. }) if !reopened => {
                    match self.open_at_relay_again(&channel, true).await {
                        Ok(()) => reopened = true,
                        Err(NodeError::Relay { code: "unavailable", message }) => {
                            tracing::debug!(%channel, %message, "cannot open the channel yet");
                            backoff.wait().await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(other) => {
                    self.with(move |e| e.discard(&channel, true)).await?;
                    return Err(refused(other));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "commit submission failed; resubmitting");
                    backoff.wait().await;
                }
            }
        }
        Ok(Submitted::Undecided)
    }

    /// Waits (bounded) until the inbox task brought the channel to `epoch`.
    async fn wait_epoch(&self, channel: ChannelId, epoch: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let notified = self.epochs.notified();
            if self.with(move |e| e.epoch(&channel)).await.is_none_or(|e| e >= epoch) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// Finishes the intents a crash or an outage interrupted, at start and then every
    /// [`RESUME_INTENTS_SECS`]: a staged commit is resubmitted as it is until the relay decides
    /// (merged if it won, dropped if it lost or was refused); one that lost is dropped (the user
    /// asks again). A commit the relay may have ordered is never dropped before it answers.
    async fn resume_intents(self: Arc<Self>) {
        self.wait_for_link().await;
        let mut tick = tokio::time::interval(Duration::from_secs(RESUME_INTENTS_SECS));
        loop {
            tick.tick().await;
            let intents = match self.with(|e| e.intents()).await {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read intents");
                    continue;
                }
            };
            for (channel, intent) in intents {
                let _one_at_a_time = self.ordering.lock().await;
                let result = match &intent.staged {
                    Some(staged) => self.submit(channel, staged).await,
                    None => Ok(Submitted::Lost),
                };
                match result {
                    Ok(Submitted::Undecided) => {
                        tracing::info!(%channel, "a staged commit is still undecided; retried later");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(%channel, error = %e, "interrupted membership change failed");
                    }
                    Ok(_) => {}
                }
                if self.with(move |e| e.discard(&channel, true)).await.is_err() {
                    tracing::warn!(%channel, "cannot drop an interrupted intent");
                }
            }
        }
    }
}

/// Judges one gossiped message: decodes the envelope (an undecodable one counts against the
/// peer that sent it) and applies [`GossipEnvelope::judge`] with the members on disk. A roster
/// that cannot be read leaves the message unjudged (ignored).
fn judge(
    rosters: &Rosters,
    g: &Gossiped,
    now: chitchat_proto::Timestamp,
) -> (Verdict, Option<Incoming>) {
    use chitchat_proto::codec::Canonical as _;
    let member = |channel: ChannelId| {
        move |device: &DeviceId, epoch: u64| {
            rosters.is_member(&channel, device, epoch).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read a roster");
                None
            })
        }
    };
    if g.topic.as_str().ends_with(chitchat_proto::gossip::REPORTS_SUFFIX) {
        return match chitchat_proto::gossip::check_report(&g.data, g.topic.as_str()) {
            Ok(report) => {
                let b = &report.body;
                let verdict = Verdict::of_membership(member(b.channel)(&b.device, b.epoch));
                (verdict, (verdict == Verdict::Accept).then_some(Incoming::Report(report)))
            }
            Err(e) => (Verdict::Reject(e), None),
        };
    }
    let Ok(envelope) = GossipEnvelope::from_bytes(&g.data) else {
        return (Verdict::Reject(chitchat_proto::gossip::GossipError::Malformed), None);
    };
    let verdict = envelope.judge(g.topic.as_str(), now, member(envelope.body.channel));
    (verdict, Some(Incoming::Gossip(envelope)))
}

/// How long one submission round resubmits a commit the relay does not answer.
const SUBMIT_PATIENCE: Duration = Duration::from_secs(60);

/// Seconds between passes over the intents left staged.
const RESUME_INTENTS_SECS: u64 = 30;

const UNDECIDED: &str =
    "the relay did not answer the commit; it stays staged and is resubmitted until it answers";

/// Acknowledges processed (durable) inbox items, retrying a few times. Acks are idempotent;
/// items whose ack is lost stay at the relay and come again after a restart, where they are
/// dropped by id.
async fn acknowledge(link: &RelayLink, ids: Vec<u64>) {
    for chunk in ids.chunks(chitchat_proto::wire::MAX_ACK_IDS) {
        let mut backoff = Backoff::capped(INBOX_MAX_BACKOFF_MS);
        for attempt in 1..=ACK_ATTEMPTS {
            match link.call(&Request::Ack { ids: chunk.to_vec() }).await {
                Ok(Response::Acked) => break,
                other => {
                    tracing::debug!(?other, attempt, "acknowledgement failed");
                    if attempt == ACK_ATTEMPTS {
                        tracing::warn!(
                            items = chunk.len(),
                            "inbox items not acknowledged; they come again after a restart"
                        );
                    } else {
                        backoff.wait().await;
                    }
                }
            }
        }
    }
}

/// What a delivery pass left.
enum Pass {
    /// Nothing: the outbox is empty.
    Empty,
    /// The pass was full; more items wait.
    More,
    /// Some recipients refused for now (quota, rate): try again after a pause.
    Refused,
}

/// What the relay decided on a submitted commit.
enum Submitted {
    /// It won its epoch and is merged.
    Accepted,
    /// Another commit won; this one is dropped.
    Lost,
    /// The relay did not answer: the commit may be ordered, so it stays staged.
    Undecided,
}

async fn link_for(
    host: &Host,
    key: chitchat_proto::SecretKey,
    relay: &RelayInfo,
    config: &Config,
) -> Result<RelayLink, NodeError> {
    let peer = relay
        .peer_id
        .parse()
        .map_err(|e| NodeError::Invalid(format!("relay peer id {:?}: {e}", relay.peer_id)))?;
    let mut addrs: Vec<libp2p::Multiaddr> =
        relay.addrs.iter().filter_map(|a| a.parse().ok()).collect();
    if config.network.relay_only {
        // Where only the relay can be reached, what looks like HTTPS is what gets through:
        // WebSocket with TLS if the relay has it, else TCP (UDP is often what is blocked).
        use libp2p::multiaddr::Protocol;
        let tls =
            |a: &libp2p::Multiaddr| a.iter().any(|p| matches!(p, Protocol::Tls | Protocol::Wss(_)));
        if addrs.iter().any(tls) {
            addrs.retain(tls);
        } else {
            addrs.retain(|a| !a.iter().any(|p| matches!(p, Protocol::Udp(_))));
        }
    } else {
        // Plain TCP and QUIC first, WebSocket last (its certificate may be one this node does
        // not trust; the circuit reservation goes to the first address).
        use libp2p::multiaddr::Protocol;
        addrs.sort_by_key(|a| a.iter().any(|p| matches!(p, Protocol::Ws(_) | Protocol::Wss(_))));
    }
    // The relay is where the members of this node's channels find each other.
    host.rendezvous_at(peer, addrs.clone()).await.map_err(|e| NodeError::Invalid(e.to_string()))?;
    Ok(RelayLink::new(
        host.clone(),
        key,
        relay.id.host.clone(),
        peer,
        addrs,
        Duration::from_secs(config.relay.request_timeout_seconds),
    )
    .await?)
}

/// Whether the fault `name` is to be injected: `CHITCHAT_FAULT=name` makes the daemon crash at
/// that point, for the crash tests. Read once.
fn fault(name: &str) -> bool {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAULT.get_or_init(|| std::env::var("CHITCHAT_FAULT").ok()).as_deref() == Some(name)
}

/// Reads a relay's `.well-known`.
async fn fetch_well_known(url: &str) -> Result<RelayInfo, NodeError> {
    let base = url.trim_end_matches('/').to_owned();
    if !base.starts_with("http://") {
        return Err(NodeError::Invalid(format!(
            "relay {url:?}: expected the relay's HTTP address, like http://127.0.0.1:8080"
        )));
    }
    let wk_url = format!("{base}/.well-known/chitchat/relay");
    let fetched = tokio::task::spawn_blocking(move || -> Result<WellKnown, String> {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        let mut r = agent.get(&wk_url).call().map_err(|e| format!("{wk_url}: {e}"))?;
        r.body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_json::<WellKnown>()
            .map_err(|e| format!("{wk_url}: {e}"))
    })
    .await
    .map_err(|e| NodeError::Invalid(e.to_string()))?
    .map_err(|e| NodeError::Link(LinkError::Unreachable(e)))?;
    let key = PublicKey::from_hex(&fetched.key)
        .ok_or_else(|| NodeError::Invalid(format!("relay key {:?} is not hex", fetched.key)))?;
    chitchat_proto::identity::check_host(&fetched.host)
        .map_err(|e| NodeError::Invalid(format!("relay host {:?}: {e}", fetched.host)))?;
    check_peer_id(&key, &fetched.peer_id)?;
    if fetched.addrs.is_empty()
        || fetched.addrs.len() > MAX_RELAY_ADDRS
        || fetched.addrs.iter().any(|a| a.parse::<libp2p::Multiaddr>().is_err())
    {
        return Err(NodeError::Invalid(format!(
            "relay addresses {:?}: expected 1 to {MAX_RELAY_ADDRS} multiaddrs",
            fetched.addrs
        )));
    }
    Ok(RelayInfo {
        url: base,
        id: RelayId { host: fetched.host, key },
        peer_id: fetched.peer_id,
        addrs: fetched.addrs,
    })
}

/// Addresses a relay's `.well-known` may list.
const MAX_RELAY_ADDRS: usize = 32;

/// The relay's libp2p identity must be its key: the connection (Noise) then authenticates the
/// same key that signs sponsorships and certificates. A `.well-known` naming another peer is
/// refused.
fn check_peer_id(key: &PublicKey, peer_id: &str) -> Result<(), NodeError> {
    let ed = libp2p::identity::ed25519::PublicKey::try_from_bytes(&key.0)
        .map_err(|e| NodeError::Invalid(format!("relay key: {e}")))?;
    let expected = libp2p::identity::PublicKey::from(ed).to_peer_id();
    if peer_id.parse::<libp2p::PeerId>().ok() != Some(expected) {
        return Err(NodeError::Invalid(format!(
            "the relay's peer id {peer_id:?} is not its key's ({expected}): refusing it"
        )));
    }
    Ok(())
}

/// Exponential back-off from 100 ms to a cap ([`MAX_BACKOFF_MS`] unless set), jittered.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    max_ms: Option<u64>,
}

impl Backoff {
    /// A back-off capped at `max_ms`.
    fn capped(max_ms: u64) -> Self {
        Self { failures: 0, max_ms: Some(max_ms) }
    }

    async fn wait(&mut self) {
        let cap = self.max_ms.unwrap_or(MAX_BACKOFF_MS);
        let base = (100u64 << self.failures.min(16)).min(cap);
        self.failures = self.failures.saturating_add(1);
        let jitter = rand::rng().random_range(0..=base / 2);
        tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

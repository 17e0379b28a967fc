//! What the relay answers to each request. The network layer authenticates the peer and hands
//! each decoded request here with the device it proved (if any).

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use chitchat_proto::channel::{
    ChannelConfig, CredentialCheck, PublicChannel, PublicState, UserId, claims,
    inspect_application, inspect_commit, validate_key_package,
};
use chitchat_proto::codec::{Bytes, Canonical as _, encode};
use chitchat_proto::federation::{
    FedBody, FedRequest, FedResponse, ForwardResult, HeldCopy, StateCheck, Vouched,
};
use chitchat_proto::gossip::{GossipEnvelope, GossipError, Unjudged, Verdict as GossipVerdict};
use chitchat_proto::identity::{SponsorshipBody, check_local_name};
use chitchat_proto::inbox::SealedEnvelope;
use chitchat_proto::ordering::{
    CertSignature, ChannelId, CommitRef, EpochCert, EpochCertBody, EpochReport, Equivocation,
    Outcome,
};
use chitchat_proto::wire::{
    AuthProof, ErrorCode, MAX_FETCH_BYTES, MAX_FETCH_ITEMS, Request, Response,
};
use chitchat_proto::wire::{ChannelPost, EnqueueResult, MAX_WAIT_MS, PostResult};
use chitchat_proto::wire::{CommitSubmission, Envelope, commit_hash};
use chitchat_proto::wire::{MAX_HISTORY_BYTES, MAX_HISTORY_ENTRIES};
use chitchat_proto::{DeviceId, PublicKey, RelayId, SecretKey, Signature, Sponsorship, Timestamp};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use iroh_blobs::Hash;
use tokio::sync::Notify;

use crate::config::Config;
use crate::federation::{FedError, Federation};
use crate::groups::{Group, Groups};
use crate::metrics::Metrics;
use crate::ordering::{Ordering, RelayCommand, RelayOutcome};
use crate::store::{
    InboxQuota, Onward, QueueLimits, Store, StoreError, Write, WriteError, Written,
};

mod devices;

const DAY_MS: u64 = 24 * 3600 * 1000;

/// The relay's services over its store.
#[derive(Debug)]
pub struct Relay {
    config: Config,
    key: SecretKey,
    id: RelayId,
    store: Store,
    crypto: openmls_rust_crypto::RustCrypto,
    senders: DefaultKeyedRateLimiter<DeviceId>,
    claimers: DefaultKeyedRateLimiter<DeviceId>,
    claimed: DefaultKeyedRateLimiter<DeviceId>,
    submitters: DefaultKeyedRateLimiter<DeviceId>,
    openers: DefaultKeyedRateLimiter<DeviceId>,
    ordering: Ordering,
    /// Devices with a `Wait` request held open, woken by enqueues to them.
    waiters: Arc<Waiters>,
    metrics: Arc<Metrics>,
    federation: Arc<Federation>,
    /// The ordering groups shared with other relays.
    groups: Arc<Groups>,
    /// Requests from each other relay (by key).
    relays: DefaultKeyedRateLimiter<PublicKey>,
    /// Records of other relays' devices looked up lately.
    remote_dirs: RemoteDirs,
    /// A fault switch for tests of what members and other relays catch: set
    /// `CHITCHAT_RELAY_FAULT=equivocate` and this relay certifies a losing commit as well
    /// (signing two hashes for one epoch). Never set it on a relay anyone uses.
    equivocate: bool,
    /// A fault switch for tests: `CHITCHAT_RELAY_FAULT=exit-before-deliver` makes the relay
    /// abort after a winner of a channel of several relays is ordered, before it asks for its
    /// certificate (the others' sweep must deliver it).
    exit_before_deliver: bool,
    /// A fault switch for tests: `CHITCHAT_RELAY_FAULT=short-file-expiry` makes files pinned
    /// here expire after [`SHORT_FILE_EXPIRY_MS`] rather than `[files] expiry_days`.
    short_file_expiry: bool,
    /// Files' blobs pinned here (none until [`Relay::with_files`]).
    files: Option<Arc<crate::files::RelayFiles>>,
    /// When each device that spoke since the last [`Relay::flush_seen`] last did.
    seen: std::sync::Mutex<HashMap<DeviceId, Timestamp>>,
}

/// The environment variable of the relay's fault switch.
pub const FAULT_ENV: &str = "CHITCHAT_RELAY_FAULT";

/// How long a pin lasts under the fault switch `short-file-expiry` (tests of expiry).
pub const SHORT_FILE_EXPIRY_MS: u64 = 8_000;

/// Whether the fault switch `short-file-expiry` is on (see [`SHORT_FILE_EXPIRY_MS`]).
pub fn short_file_expiry() -> bool {
    std::env::var(FAULT_ENV).is_ok_and(|v| v == "short-file-expiry")
}

/// This relay's directory as a [`CredentialCheck`]: a device may join a channel ordered here if
/// it is registered here and its current record verifies against this relay, or if this relay
/// looked it up lately at another relay (for a device of this relay: `LookupAt`) and its record
/// verifies against that relay (neither blocked). A relay may join a channel's relay set if it
/// is this relay or one this relay resolved (its key as its `.well-known` or the config says).
struct Directory<'a> {
    relay: &'a Relay,
    /// This relay, and the block list as read once for the whole check.
    trust: chitchat_proto::identity::TrustedRelays,
    now: Timestamp,
}

impl<'a> Directory<'a> {
    fn new(relay: &'a Relay, now: Timestamp) -> Result<Self, StoreError> {
        let trust = chitchat_proto::identity::TrustedRelays {
            relays: vec![relay.id.clone()],
            blocked: relay.store.blocked()?.into_iter().collect(),
        };
        Ok(Self { relay, trust, now })
    }
}

impl CredentialCheck for Directory<'_> {
    fn check(&self, device: DeviceId, user: &UserId) -> Result<(), String> {
        let record = match self.relay.store.device(&device) {
            Ok(Some(r)) => r,
            Ok(None) => {
                let Some((dir, relay)) = self.relay.remote_dirs.get(&device) else {
                    return Err("the device is not registered on this relay, nor looked up at \
                                another lately"
                        .into());
                };
                let trust = chitchat_proto::identity::TrustedRelays {
                    relays: vec![relay],
                    blocked: self.trust.blocked.clone(),
                };
                let addresses = dir.verify(&trust, self.now).map_err(|e| e.to_string())?;
                return claims(device, user, &addresses);
            }
            Err(e) => return Err(format!("directory unavailable: {e}")),
        };
        let addresses = record.dir.verify(&self.trust, self.now).map_err(|e| e.to_string())?;
        claims(device, user, &addresses)
    }

    fn check_orderers(&self, config: &ChannelConfig) -> Result<(), String> {
        self.relay.orders(config)
    }

    fn check_relay(&self, relay: &RelayId) -> Result<(), String> {
        if self.trust.blocked.contains(&relay.host) {
            return Err(format!("{} is blocked here", relay.host));
        }
        if *relay == self.relay.id || self.relay.federation.knows(relay) {
            Ok(())
        } else {
            Err(format!("{} is not known to this relay with that key", relay.host))
        }
    }
}

/// Records of other relays' devices this relay looked up lately (for its devices), with the
/// relay that answered: what its credential check accepts for devices not registered here.
#[derive(Debug, Default)]
pub struct RemoteDirs(
    std::sync::Mutex<HashMap<DeviceId, (chitchat_proto::Dir, RelayId, std::time::Instant)>>,
);

impl RemoteDirs {
    /// How long a looked-up record is used.
    const TTL: Duration = Duration::from_secs(3600);
    /// Records kept at most.
    const MAX: usize = 100_000;

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        HashMap<DeviceId, (chitchat_proto::Dir, RelayId, std::time::Instant)>,
    > {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn put(&self, relay: &RelayId, dirs: &[chitchat_proto::Dir]) {
        let mut m = self.lock();
        if m.len() + dirs.len() > Self::MAX {
            m.retain(|_, (_, _, at)| at.elapsed() < Self::TTL);
            if m.len() + dirs.len() > Self::MAX {
                m.clear();
            }
        }
        for d in dirs {
            m.insert(d.device(), (d.clone(), relay.clone(), std::time::Instant::now()));
        }
    }

    fn get(&self, device: &DeviceId) -> Option<(chitchat_proto::Dir, RelayId)> {
        self.lock()
            .get(device)
            .filter(|(_, _, at)| at.elapsed() < Self::TTL)
            .map(|(d, r, _)| (d.clone(), r.clone()))
    }
}

/// The group that orders a channel: this relay's own, or one shared with other relays.
enum OrderedBy<'a> {
    Solo(&'a Ordering),
    Group(Arc<Group>),
}

impl OrderedBy<'_> {
    fn ordering(&self) -> &Ordering {
        match self {
            Self::Solo(o) => o,
            Self::Group(g) => &g.ordering,
        }
    }
}

/// Devices with a `Wait` request held open, each woken by what arrives in its inbox.
#[derive(Debug, Default)]
pub struct Waiters(std::sync::Mutex<HashMap<DeviceId, Arc<Notify>>>);

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Arc<Notify>>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wakes the device's waiting fetches, if any.
    pub fn wake(&self, device: DeviceId) {
        if let Some(n) = self.lock().get(&device) {
            n.notify_waiters();
        }
    }
}

/// A relay set as it names a group: sorted, each relay once.
pub(crate) fn relay_set(relays: &[RelayId]) -> Vec<RelayId> {
    let mut set = relays.to_vec();
    set.sort();
    set.dedup();
    set
}

/// This relay's certificate for an ordered commit (Ed25519 is deterministic: the same body
/// gets the same signature, whenever it is signed again).
pub fn certify(key: &SecretKey, body: EpochCertBody) -> EpochCert {
    EpochCert { body, signatures: vec![CertSignature::sign(key, &body)] }
}

/// The wall clock, as the protocol's [`Timestamp`].
pub fn now() -> Timestamp {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
}

/// Takes one token of `key`'s bucket, or says how long to wait, in milliseconds.
pub(crate) fn check_rate<K: Clone + Eq + std::hash::Hash>(
    limiter: &DefaultKeyedRateLimiter<K>,
    key: K,
) -> Result<(), u64> {
    use governor::clock::{Clock as _, DefaultClock};
    limiter.check_key(&key).map_err(|not_until| {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: message.into() }
}

/// Where this relay's blob endpoint listens, as frames carry it.
fn blob_addrs(files: &crate::files::RelayFiles) -> Vec<chitchat_proto::wire::IpPort> {
    files.addrs().into_iter().map(Into::into).collect()
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "store failure");
    error(ErrorCode::Unavailable, "storage unavailable, retry later")
}

/// How long a device is told to wait when the ordering state is at its budget: room comes
/// back only as channels shrink.
const OVER_BUDGET_RETRY_MS: u64 = 3_600_000;
/// How long a submission waits for this relay's replica of its group to reach the commit's
/// epoch.
const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

/// The ordering state is at its budget (`[ordering] max_state_bytes`) or channel limit.
fn over_budget(reason: impl std::fmt::Display) -> Response {
    tracing::warn!(%reason, "ordering state at its budget");
    error(ErrorCode::QuotaExceeded { retry_after_ms: OVER_BUDGET_RETRY_MS }, reason.to_string())
}

/// The code a refused write answers with (a store failure is logged and `Unavailable`).
fn refusal(e: WriteError) -> ErrorCode {
    match e {
        WriteError::Rejected { code, .. } => code,
        other => {
            tracing::error!(error = %other, "store failure");
            ErrorCode::Unavailable
        }
    }
}

fn from_write(e: WriteError) -> Response {
    match e {
        WriteError::Rejected { code, message } => error(code, message),
        other => unavailable(other),
    }
}

fn kind(r: &Request) -> &'static str {
    match r {
        Request::Challenge { .. } => "challenge",
        Request::Authenticate { .. } => "authenticate",
        Request::Register { .. } => "register",
        Request::PublishDir { .. } => "publish_dir",
        Request::Lookup { .. } => "lookup",
        Request::UploadKeyPackages { .. } => "upload_key_packages",
        Request::ClaimKeyPackage { .. } => "claim_key_package",
        Request::Enqueue { .. } => "enqueue",
        Request::Fetch { .. } => "fetch",
        Request::Ack { .. } => "ack",
        Request::SubmitCommit(_) => "submit_commit",
        Request::Wait { .. } => "wait",
        Request::EnqueueBatch { .. } => "enqueue_batch",
        Request::OpenChannel { .. } => "open_channel",
        Request::LookupDevices { .. } => "lookup_devices",
        Request::Post { .. } => "post",
        Request::LookupAt { .. } => "lookup_at",
        Request::LookupDevicesAt { .. } => "lookup_devices_at",
        Request::ClaimKeyPackageAt { .. } => "claim_key_package_at",
        Request::Forward { .. } => "forward",
        Request::Report { .. } => "report",
        Request::Equivocation { .. } => "equivocation",
        Request::History { .. } => "history",
        Request::OpenMoved { .. } => "open_moved",
        Request::PinFile { .. } => "pin_file",
        Request::BlobEndpoint => "blob_endpoint",
        Request::BlobPart { .. } => "blob_part",
        Request::PushPart { .. } => "push_part",
        Request::OfferLink { .. } => "offer_link",
        Request::JoinLink { .. } => "join_link",
        Request::LinkPoll { .. } => "link_poll",
        Request::AnswerLink { .. } => "answer_link",
        Request::OwnDevices => "own_devices",
        Request::NameDevice { .. } => "name_device",
        Request::SetRecovery { .. } => "set_recovery",
        Request::Revoke { .. } => "revoke",
    }
}

fn fed_kind(b: &FedBody) -> &'static str {
    match b {
        FedBody::Lookup { .. } => "lookup",
        FedBody::LookupDevices { .. } => "lookup_devices",
        FedBody::ClaimKeyPackage { .. } => "claim_key_package",
        FedBody::Forward { .. } => "forward",
        FedBody::Raft { .. } => "raft",
        FedBody::Propose { .. } => "propose",
        FedBody::Sign { .. } => "sign",
        FedBody::Equivocation { .. } => "equivocation",
        FedBody::CheckState { .. } => "check_state",
        FedBody::ReplicateFile { .. } => "replicate_file",
    }
}

fn fed_error(code: ErrorCode, message: impl Into<String>) -> FedResponse {
    FedResponse::Error { code, message: message.into() }
}

fn from_fed(e: &FedError) -> Response {
    error(e.code(), e.to_string())
}

/// Who a relay orders with and talks to: its own one-relay group, the groups it shares with
/// other relays, and federation.
#[derive(Debug)]
pub struct Peers {
    /// The one-relay group.
    pub ordering: Ordering,
    /// The groups of two or more relays.
    pub groups: Arc<Groups>,
    /// Other relays.
    pub federation: Arc<Federation>,
}

impl Relay {
    /// A relay with this config, key and store.
    pub fn new(
        config: Config,
        key: SecretKey,
        store: Store,
        metrics: Arc<Metrics>,
        waiters: Arc<Waiters>,
        peers: Peers,
    ) -> Self {
        let Peers { ordering, groups, federation } = peers;
        let id = RelayId { host: config.host.clone(), key: key.public() };
        match store.convicted() {
            Ok(convicted) => {
                metrics.convicted.set(i64::try_from(convicted.len()).unwrap_or(i64::MAX));
                for k in convicted {
                    groups.convict(k);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the convicted orderers"),
        }
        let equivocate = std::env::var(FAULT_ENV).is_ok_and(|v| v == "equivocate");
        let exit_before_deliver =
            std::env::var(FAULT_ENV).is_ok_and(|v| v == "exit-before-deliver");
        if equivocate {
            tracing::warn!(
                "FAULT SWITCH ON: this relay certifies losing commits too (equivocates); for tests only"
            );
        }
        let k = config.key_packages;
        let fed_rate = config.federation.requests_per_minute_per_relay;
        Self {
            senders: RateLimiter::keyed(per_minute(config.inbox.sender_per_minute)),
            claimers: RateLimiter::keyed(per_minute(k.claims_per_requester_per_minute)),
            claimed: RateLimiter::keyed(per_minute(k.claims_per_target_per_minute)),
            submitters: RateLimiter::keyed(per_minute(config.ordering.submits_per_minute)),
            openers: RateLimiter::keyed(Quota::per_hour(
                NonZeroU32::new(config.ordering.opens_per_hour).unwrap_or(NonZeroU32::MIN),
            )),
            config,
            key,
            id,
            store,
            crypto: openmls_rust_crypto::RustCrypto::default(),
            ordering,
            waiters,
            metrics,
            relays: RateLimiter::keyed(per_minute(fed_rate)),
            federation,
            groups,
            remote_dirs: RemoteDirs::default(),
            equivocate,
            exit_before_deliver,
            short_file_expiry: short_file_expiry(),
            files: None,
            seen: Default::default(),
        }
    }

    /// This relay pins files' blobs in `files`.
    pub fn with_files(mut self, files: crate::files::RelayFiles) -> Self {
        self.files = Some(Arc::new(files));
        self
    }

    /// The files' blob store, if this relay keeps files.
    pub fn files(&self) -> Option<&Arc<crate::files::RelayFiles>> {
        self.files.as_ref()
    }

    /// The relay's federation side.
    pub fn federation(&self) -> &Arc<Federation> {
        &self.federation
    }

    /// The relay's identity.
    pub fn id(&self) -> &RelayId {
        &self.id
    }

    /// The relay's config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The relay's store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This relay orders only channels that name it among their relays.
    fn orders(&self, config: &ChannelConfig) -> Result<(), String> {
        if config.relays.contains(&self.id) {
            Ok(())
        } else {
            Err("the channel's relay set does not name this relay".into())
        }
    }

    /// Checks a device's answer to this relay's challenge `nonce`.
    pub fn verify_auth(&self, device: DeviceId, nonce: [u8; 32], signature: &Signature) -> bool {
        AuthProof::verify(&self.id.host, device, nonce, signature).is_ok()
    }

    /// Answers one request from a peer that proved `auth` (if any). Challenge and
    /// Authenticate belong to the network layer and are refused here.
    pub async fn handle(&self, auth: Option<DeviceId>, request: Request) -> Response {
        self.metrics.request(kind(&request));
        let response = self.dispatch(auth, request, now()).await;
        if let Response::Error { code, .. } = &response {
            self.metrics.error(code.name());
        }
        response
    }

    async fn dispatch(&self, auth: Option<DeviceId>, request: Request, now: Timestamp) -> Response {
        if let Request::Lookup { local_name } = &request {
            return match self.store.lookup(local_name) {
                Ok(dirs) => Response::Dirs(dirs),
                Err(e) => unavailable(e),
            };
        }
        if let Request::LookupDevices { devices } = &request {
            return match self.local_devices(devices) {
                Ok(dirs) => Response::Dirs(dirs),
                Err(e) => unavailable(e),
            };
        }
        let Some(me) = auth else {
            return error(
                ErrorCode::Unauthenticated,
                "authenticate first (Challenge, Authenticate)",
            );
        };
        // A key costs nothing: everything but registration (and a new device's side of a link)
        // needs a device registered here.
        if !matches!(
            request,
            Request::Register { .. } | Request::JoinLink { .. } | Request::LinkPoll { .. }
        ) {
            match self.store.is_registered(&me) {
                Ok(true) => self.note_seen(me, now),
                Ok(false) => {
                    return match self.store.revoked(&me) {
                        Ok(Some(_)) => error(ErrorCode::Revoked, "this device was revoked"),
                        Ok(None) => error(ErrorCode::Forbidden, "register this device here first"),
                        Err(e) => unavailable(e),
                    };
                }
                Err(e) => return unavailable(e),
            }
        }
        match request {
            Request::Challenge { .. }
            | Request::Authenticate { .. }
            | Request::Lookup { .. }
            | Request::LookupDevices { .. } => error(ErrorCode::BadRequest, "not handled here"),
            Request::LookupAt { host, local_name } => self.lookup_at(&host, local_name).await,
            Request::LookupDevicesAt { host, devices } => {
                self.lookup_devices_at(&host, devices).await
            }
            Request::ClaimKeyPackageAt { host, device } => {
                self.claim_at(me, &host, device, now).await
            }
            Request::Forward { host, envelopes } => self.forward(me, host, envelopes, now).await,
            Request::Report { report } => {
                Response::Posted(vec![self.report(me, report, now).await])
            }
            Request::Equivocation { proof } => self.equivocation(me, &proof).await,
            Request::History { channel, from, max } => self.history(me, channel, from, max).await,
            Request::PinFile { channel, hash, len } => {
                self.pin_file(me, channel, Hash::from_bytes(hash), len, now).await
            }
            Request::BlobEndpoint => match &self.files {
                Some(f) => Response::BlobEndpoint { addrs: blob_addrs(f) },
                None => error(ErrorCode::NotFound, "this relay keeps no files"),
            },
            Request::BlobPart { hash, first, chunks } => {
                self.blob_part(me, Hash::from_bytes(hash), first, chunks, now).await
            }
            Request::PushPart { hash, len, first, chunks, part } => {
                self.push_part(me, Hash::from_bytes(hash), len, first, chunks, part.0).await
            }
            Request::Register { token, local_name, dir } => {
                self.register(me, token, local_name, dir, now).await
            }
            Request::OfferLink { slot, expires } => self.offer_link(me, slot, expires, now).await,
            Request::JoinLink { slot, hello } => self.join_link(me, slot, hello, now).await,
            Request::LinkPoll { slot } => self.link_poll(me, slot, now),
            Request::AnswerLink { slot, answer } => self.answer_link(me, slot, answer, now).await,
            Request::OwnDevices => self.own_devices(me),
            Request::NameDevice { name } => self.name_device(me, name).await,
            Request::SetRecovery { key } => self.set_recovery(me, key).await,
            Request::Revoke { revocation } => self.revoke(me, *revocation, now).await,
            Request::PublishDir { dir } => {
                if dir.device() != me {
                    return error(ErrorCode::Forbidden, "a device publishes only its own record");
                }
                if let Err(e) = dir.verify_signature() {
                    return error(ErrorCode::BadRequest, format!("record: {e}"));
                }
                match self.store.write(Write::PublishDir { dir }).await {
                    Ok(_) => Response::DirPublished,
                    Err(e) => from_write(e),
                }
            }
            Request::UploadKeyPackages { packages, last_resort } => {
                self.upload_key_packages(me, packages, last_resort, now).await
            }
            Request::ClaimKeyPackage { device } => self.claim(me, device, now).await,
            Request::Enqueue { envelope } => match self.enqueue(me, envelope, now).await {
                EnqueueResult::Enqueued(id) => Response::Enqueued { id },
                EnqueueResult::Refused(code) => {
                    error(code, "refused (rate, quota, or unknown recipient)")
                }
            },
            Request::EnqueueBatch { envelopes } => {
                let results = futures::future::join_all(
                    envelopes.into_iter().map(|e| self.enqueue(me, e, now)),
                )
                .await;
                for r in &results {
                    if let EnqueueResult::Refused(code) = r {
                        self.metrics.error(code.name());
                    }
                }
                Response::EnqueuedBatch(results)
            }
            Request::Wait { after, max, timeout_ms } => {
                let max = max.clamp(1, MAX_FETCH_ITEMS) as usize;
                let timeout = Duration::from_millis(u64::from(timeout_ms.min(MAX_WAIT_MS)));
                self.wait(me, after, max, timeout).await
            }
            Request::Fetch { after, max } => {
                let max = max.clamp(1, MAX_FETCH_ITEMS) as usize;
                match self.store.fetch(&me, after, max, MAX_FETCH_BYTES) {
                    Ok((items, more)) => {
                        self.metrics.fetched.inc_by(items.len() as u64);
                        Response::Items { items, more }
                    }
                    Err(e) => unavailable(e),
                }
            }
            Request::Ack { ids } => match self.store.write(Write::Ack { device: me, ids }).await {
                Ok(Written::Removed(n)) => {
                    self.metrics.acks.inc_by(n);
                    Response::Acked
                }
                Ok(other) => unavailable(format!("unexpected {other:?}")),
                Err(e) => from_write(e),
            },
            Request::SubmitCommit(submission) => self.submit_commit(me, submission, now).await,
            Request::OpenChannel { channel, state } => self.open_channel(me, channel, state).await,
            Request::OpenMoved { before, moved, state } => {
                self.open_moved(me, before, moved, state, now).await
            }
            Request::Post { posts } => {
                let results =
                    futures::future::join_all(posts.into_iter().map(|p| self.post(me, p, now)))
                        .await;
                for r in &results {
                    if let PostResult::Refused(code) = r {
                        self.metrics.error(code.name());
                    }
                }
                Response::Posted(results)
            }
        }
    }

    /// The group that orders `channel` here, if one does.
    /// A group that holds a channel whose relay set changed since (the channel moved to the
    /// group of its new set) is passed over: only the group of the channel's current set orders
    /// it.
    async fn ordered_by(&self, channel: &ChannelId) -> Option<OrderedBy<'_>> {
        if let Some(Ok(config)) = self.ordering.config(channel).await
            && config.relays == [self.id.clone()]
        {
            return Some(OrderedBy::Solo(&self.ordering));
        }
        for g in self.groups.all().await {
            if let Some(Ok(config)) = g.ordering.config(channel).await
                && relay_set(&config.relays) == g.relays
            {
                return Some(OrderedBy::Group(g));
            }
        }
        None
    }

    /// The channels this relay orders, alone or in a group with others: the gossip topics it
    /// takes part in.
    pub async fn gossip_channels(&self) -> BTreeSet<ChannelId> {
        let mut out: BTreeSet<ChannelId> =
            self.ordering.channels_of(std::slice::from_ref(&self.id)).await.into_iter().collect();
        for g in self.groups.all().await {
            out.extend(g.ordering.channels_of(&g.relays).await);
        }
        out
    }

    /// Judges an envelope gossiped on `topic` as a member would, with the members of the
    /// channel as this relay orders it: every check of [`GossipEnvelope::judge`] but the
    /// membership first (no lock taken for spam that fails them), then the membership.
    pub async fn judge_gossip(&self, topic: &str, data: &[u8], now: Timestamp) -> GossipVerdict {
        if topic.ends_with(chitchat_proto::gossip::REPORTS_SUFFIX) {
            // An epoch report: every check but the membership, then the membership.
            let report = match chitchat_proto::gossip::check_report(data, topic) {
                Ok(report) => report,
                Err(e) => return GossipVerdict::Reject(e),
            };
            let b = &report.body;
            let member = match self.ordered_by(&b.channel).await {
                Some(by) => by.ordering().is_member(&b.channel, &b.device, b.epoch).await,
                None => None,
            };
            return GossipVerdict::of_membership(member);
        }
        let Ok(envelope) = GossipEnvelope::from_bytes(data) else {
            return GossipVerdict::Reject(GossipError::Malformed);
        };
        match envelope.judge(topic, now, |_, _| None) {
            // Every check but the membership passed.
            GossipVerdict::Ignore(Unjudged::UnknownEpoch) => {}
            other => return other,
        }
        let b = &envelope.body;
        let member = match self.ordered_by(&b.channel).await {
            Some(by) => by.ordering().is_member(&b.channel, &b.sender, b.epoch).await,
            None => None,
        };
        GossipVerdict::of_membership(member)
    }

    /// The channel's config as every group of this relay that holds it has it.
    async fn configs_of(&self, channel: &ChannelId) -> Vec<ChannelConfig> {
        let mut configs = Vec::new();
        if let Some(Ok(c)) = self.ordering.config(channel).await {
            configs.push(c);
        }
        for g in self.groups.all().await {
            if let Some(Ok(c)) = g.ordering.config(channel).await {
                configs.push(c);
            }
        }
        configs
    }

    /// The group (this relay's own, or one it shares) whose log decided `(channel, epoch)`.
    async fn decided_by(&self, channel: &ChannelId, epoch: u64) -> Option<OrderedBy<'_>> {
        if self.ordering.winner(channel, epoch).await.is_some() {
            return Some(OrderedBy::Solo(&self.ordering));
        }
        for g in self.groups.all().await {
            if g.ordering.winner(channel, epoch).await.is_some() {
                return Some(OrderedBy::Group(g));
            }
        }
        None
    }

    /// The relay's multi-relay ordering groups.
    pub fn groups(&self) -> &Arc<Groups> {
        &self.groups
    }

    /// The records of the devices registered here among `devices`, each once.
    fn local_devices(&self, devices: &[DeviceId]) -> Result<Vec<chitchat_proto::Dir>, StoreError> {
        let devices: std::collections::BTreeSet<&DeviceId> = devices.iter().collect();
        let mut dirs = Vec::with_capacity(devices.len());
        for device in devices {
            if let Some(record) = self.store.device(device)? {
                dirs.push(record.dir);
            }
        }
        Ok(dirs)
    }

    /// Checks a host a device names, and whether it is this relay.
    fn remote_host(&self, host: &str) -> Result<bool, Box<Response>> {
        if let Err(e) = chitchat_proto::identity::check_host(host) {
            return Err(Box::new(error(ErrorCode::BadRequest, format!("host {host:?}: {e}"))));
        }
        Ok(host != self.id.host)
    }

    /// `local_name@host`, here or at another relay.
    async fn lookup_at(&self, host: &str, local_name: String) -> Response {
        if let Err(e) = check_local_name(&local_name) {
            return error(ErrorCode::BadRequest, e.to_string());
        }
        match self.remote_host(host) {
            Err(r) => *r,
            Ok(false) => match self.store.lookup(&local_name) {
                Ok(dirs) => Response::RemoteDirs { relay: self.id.clone(), dirs },
                Err(e) => unavailable(e),
            },
            Ok(true) => match self.federation.call(host, FedBody::Lookup { local_name }).await {
                Ok((remote, FedResponse::Dirs(dirs))) => {
                    self.remote_dirs.put(&remote.id, &dirs);
                    Response::RemoteDirs { relay: remote.id.clone(), dirs }
                }
                Ok((_, other)) => unavailable(format!("{host} answered a look-up with {other:?}")),
                Err(e) => from_fed(&e),
            },
        }
    }

    /// Devices by id, here or at another relay.
    async fn lookup_devices_at(&self, host: &str, devices: Vec<DeviceId>) -> Response {
        match self.remote_host(host) {
            Err(r) => *r,
            Ok(false) => match self.local_devices(&devices) {
                Ok(dirs) => Response::RemoteDirs { relay: self.id.clone(), dirs },
                Err(e) => unavailable(e),
            },
            Ok(true) => {
                match self
                    .federation
                    .call(host, FedBody::LookupDevices { devices: devices.clone() })
                    .await
                {
                    Ok((remote, FedResponse::Dirs(dirs))) => {
                        self.remote_dirs.put(&remote.id, &dirs);
                        Response::RemoteDirs { relay: remote.id.clone(), dirs }
                    }
                    Ok((_, other)) => {
                        unavailable(format!("{host} answered a look-up with {other:?}"))
                    }
                    // A relay that is away: the records looked up there lately still verify
                    // (each is signed by its device and sponsored by that relay), so a member
                    // can still join a channel with that relay's users.
                    Err(e @ (FedError::Unreachable { .. } | FedError::Discovery { .. })) => {
                        let cached: Vec<(chitchat_proto::Dir, RelayId)> = devices
                            .iter()
                            .filter_map(|d| self.remote_dirs.get(d))
                            .filter(|(_, r)| r.host == host)
                            .collect();
                        match cached.first().map(|(_, r)| r.clone()) {
                            Some(relay) => Response::RemoteDirs {
                                relay,
                                dirs: cached.into_iter().map(|(d, _)| d).collect(),
                            },
                            None => from_fed(&e),
                        }
                    }
                    Err(e) => from_fed(&e),
                }
            }
        }
    }

    /// A KeyPackage of a device here or at another relay: this relay limits the requester, the
    /// other relay the target (and this relay as a whole).
    async fn claim_at(
        &self,
        me: DeviceId,
        host: &str,
        device: DeviceId,
        now: Timestamp,
    ) -> Response {
        match self.remote_host(host) {
            Err(r) => *r,
            Ok(false) => self.claim(me, device, now).await,
            Ok(true) => {
                if let Err(retry_after_ms) = check_rate(&self.claimers, me) {
                    return error(
                        ErrorCode::RateLimited { retry_after_ms },
                        "too many key package claims",
                    );
                }
                let body = FedBody::ClaimKeyPackage { requester: me, device };
                match self.federation.call(host, body).await {
                    Ok((_, FedResponse::KeyPackage(kp))) => Response::KeyPackage(kp),
                    Ok((_, other)) => {
                        unavailable(format!("{host} answered a claim with {other:?}"))
                    }
                    Err(e) => from_fed(&e),
                }
            }
        }
    }

    /// Queues sealed payloads for the devices of another relay, durably, and wakes its worker.
    async fn forward(
        &self,
        me: DeviceId,
        host: String,
        envelopes: Vec<SealedEnvelope>,
        now: Timestamp,
    ) -> Response {
        match self.remote_host(&host) {
            Err(r) => return *r,
            Ok(false) => {
                return error(
                    ErrorCode::BadRequest,
                    "devices of this relay get Enqueue, not Forward",
                );
            }
            Ok(true) => {}
        }
        match self.store.is_blocked(&host) {
            Ok(false) => {}
            Ok(true) => return error(ErrorCode::Forbidden, format!("{host} is blocked here")),
            Err(e) => return unavailable(e),
        }
        for _ in &envelopes {
            if let Err(retry_after_ms) = check_rate(&self.senders, me) {
                return error(ErrorCode::RateLimited { retry_after_ms }, "too many payloads sent");
            }
        }
        let n = u32::try_from(envelopes.len()).unwrap_or(u32::MAX);
        if n == 0 {
            return Response::Forwarded { queued: 0 };
        }
        let f = &self.config.federation;
        let limits = QueueLimits {
            max_items: f.max_queue_items,
            max_bytes: f.max_queue_bytes,
            max_total_items: f.max_queued_total,
        };
        let envelopes = envelopes.into_iter().map(Envelope::Sealed).collect();
        let write = Write::Queue { host: host.clone(), sender: me, envelopes, now, limits };
        match self.store.write(write).await {
            Ok(_) => {
                self.federation.kick(&host);
                Response::Forwarded { queued: n }
            }
            Err(e) => from_write(e),
        }
    }

    /// Answers a request frame from another relay, authenticated by Noise as `peer` (at `ip`).
    pub async fn handle_federation(
        &self,
        peer: libp2p::PeerId,
        ip: Option<std::net::IpAddr>,
        frame: &[u8],
    ) -> FedResponse {
        let request = match chitchat_proto::wire::decode_frame::<FedRequest>(frame) {
            Ok(r) => r,
            Err(e) => return fed_error(ErrorCode::BadRequest, e.to_string()),
        };
        self.metrics.federation_request(fed_kind(&request.body));
        let origin = match self.federation.verify_peer(&request.from, peer, ip).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(%peer, from = %request.from, error = %e, "federation request refused");
                return fed_error(e.code(), e.to_string());
            }
        };
        if let Err(retry_after_ms) = check_rate(&self.relays, origin.key) {
            return fed_error(ErrorCode::RateLimited { retry_after_ms }, "too many requests");
        }
        let response = self.federated(&origin, request.body, now()).await;
        if let FedResponse::Error { code, .. } = &response {
            self.metrics.error(code.name());
        }
        response
    }

    async fn federated(&self, origin: &RelayId, body: FedBody, now: Timestamp) -> FedResponse {
        match body {
            body @ (FedBody::Raft { .. } | FedBody::Propose { .. } | FedBody::Sign { .. }) => {
                self.groups.handle(origin, body).await
            }
            FedBody::Equivocation { proof } => {
                match self.note_proof(&proof, &format!("relay {}", origin.host)).await {
                    Ok(new) => FedResponse::Noted { new },
                    Err((code, message)) => fed_error(code, message),
                }
            }
            FedBody::CheckState { channel, state } => {
                let (set, epoch) = match PublicChannel::from_state(&self.crypto, &state)
                    .map(|p| (p.config(), p.epoch()))
                {
                    Ok((Ok(c), epoch)) => (relay_set(&c.relays), epoch),
                    _ => return FedResponse::StateChecked(StateCheck::Differs),
                };
                if !set.contains(origin) || !set.contains(&self.id) {
                    return fed_error(ErrorCode::Forbidden, "the state's relay set names neither");
                }
                FedResponse::StateChecked(self.judge_state(&channel, &set, &state, epoch).await)
            }
            FedBody::ReplicateFile { channel, hash, len, expires_ms, addrs } => {
                let expires = Timestamp(expires_ms);
                match self
                    .replicate_from(
                        origin,
                        channel,
                        Hash::from_bytes(hash),
                        len,
                        expires,
                        addrs,
                        now,
                    )
                    .await
                {
                    Ok(()) => FedResponse::Replicating,
                    Err((code, message)) => fed_error(code, message),
                }
            }
            FedBody::Lookup { local_name } => match self.store.lookup(&local_name) {
                Ok(dirs) => FedResponse::Dirs(dirs),
                Err(e) => fed_error(ErrorCode::Unavailable, e.to_string()),
            },
            FedBody::LookupDevices { devices } => match self.local_devices(&devices) {
                Ok(dirs) => FedResponse::Dirs(dirs),
                Err(e) => fed_error(ErrorCode::Unavailable, e.to_string()),
            },
            FedBody::ClaimKeyPackage { requester, device } => {
                match self.claim(requester, device, now).await {
                    Response::KeyPackage(kp) => FedResponse::KeyPackage(kp),
                    Response::Error { code, message } => fed_error(code, message),
                    other => fed_error(ErrorCode::Unavailable, format!("unexpected {other:?}")),
                }
            }
            FedBody::Forward { items } => {
                let quota = self.inbox_quota();
                let results = futures::future::join_all(items.into_iter().map(|item| async move {
                    if let Err(retry_after_ms) = check_rate(&self.senders, item.sender) {
                        return ForwardResult::Refused(ErrorCode::RateLimited { retry_after_ms });
                    }
                    let envelope = match item.envelope {
                        Envelope::Sealed(e) => e,
                        Envelope::Post(p) => {
                            return self
                                .forwarded_post(origin, item.seq, item.sender, p, now)
                                .await;
                        }
                        Envelope::Report(r) => {
                            return self
                                .forwarded_report(origin, item.seq, item.sender, r, now)
                                .await;
                        }
                        Envelope::Commit(_) | Envelope::Missed { .. } => {
                            return ForwardResult::Refused(ErrorCode::BadRequest);
                        }
                    };
                    let recipient = envelope.recipient;
                    let len = envelope.ciphertext.len() as u64;
                    let write = Write::Forwarded {
                        origin: origin.key.0,
                        seq: item.seq,
                        sender: item.sender,
                        envelope,
                        now,
                        quota,
                    };
                    match self.store.write(write).await {
                        Ok(Written::Enqueued { .. }) => {
                            self.metrics.enqueues.inc();
                            self.metrics.enqueue_bytes.inc_by(len);
                            self.wake(recipient);
                            ForwardResult::Stored
                        }
                        Ok(_) => ForwardResult::Stored,
                        Err(e) => ForwardResult::Refused(refusal(e)),
                    }
                }))
                .await;
                FedResponse::Forwarded(results)
            }
        }
    }

    /// Each inbox's bounds, from the config.
    fn inbox_quota(&self) -> InboxQuota {
        InboxQuota {
            max_items: self.config.inbox.max_items,
            max_bytes: self.config.inbox.max_bytes,
        }
    }

    /// Fans a channel post out to the inboxes of the channel's other members, in one durable
    /// write (shared with concurrent writes). Only a member may post; the poster is the device
    /// authenticated on this connection. Counts as one request against the sender's rate. In a
    /// channel of several relays, the same write queues the post once for each other relay of
    /// the set, which fans it out to its own members.
    async fn post(&self, me: DeviceId, post: ChannelPost, now: Timestamp) -> PostResult {
        if let Err(retry_after_ms) = check_rate(&self.senders, me) {
            return PostResult::Refused(ErrorCode::RateLimited { retry_after_ms });
        }
        let Ok(framing) = inspect_application(&post.message) else {
            return PostResult::Refused(ErrorCode::BadRequest);
        };
        let Some(by) = self.ordered_by(&post.channel).await else {
            return PostResult::Refused(ErrorCode::NotFound);
        };
        let Some((members, then)) = by.ordering().member_sets(&post.channel, framing.epoch).await
        else {
            return PostResult::Refused(ErrorCode::NotFound);
        };
        if framing.channel != post.channel {
            return PostResult::Refused(ErrorCode::BadRequest);
        }
        // Only a current member posts; the message goes to the members of the epoch it was
        // encrypted in (a commit may have been ordered since): those removed since can still
        // read it, those added since could not.
        if members.binary_search(&me).is_err() {
            return PostResult::Refused(ErrorCode::Forbidden);
        }
        let recipients: Arc<[DeviceId]> = then.iter().copied().filter(|d| *d != me).collect();
        self.fan_out_posted(&by, me, Envelope::Post(post), recipients, now).await
    }

    /// Fans what `me` posted out to `recipients` here and, for a channel of several relays,
    /// queues it in the same write for the channel's other relays (woken at once).
    async fn fan_out_posted(
        &self,
        by: &OrderedBy<'_>,
        me: DeviceId,
        envelope: Envelope,
        recipients: Arc<[DeviceId]>,
        now: Timestamp,
    ) -> PostResult {
        let onward = self.onward(by);
        let hosts: Vec<String> = onward.iter().flat_map(|o| o.hosts.clone()).collect();
        let history = self.history_limits(&envelope);
        let write = Write::Fanout {
            sender: me,
            envelope,
            recipients,
            now,
            quota: self.inbox_quota(),
            onward,
            seen: None,
            history,
        };
        let result = self.fan_out(write).await;
        for host in &hosts {
            self.federation.kick(host);
        }
        result
    }

    /// The history bounds a fanned-out envelope is kept within: posts only (commits are kept
    /// by the commit fan-out), if the operator keeps history.
    fn history_limits(&self, envelope: &Envelope) -> Option<crate::store::HistoryLimits> {
        matches!(envelope, Envelope::Post(_)).then(|| self.config.history.limits()).flatten()
    }

    /// Who orders `channel` here, if `me` is one of its current members; the refusal
    /// otherwise (`what` only a member does).
    async fn check_member(
        &self,
        me: DeviceId,
        channel: &ChannelId,
        what: &str,
    ) -> Result<OrderedBy<'_>, Response> {
        let Some(by) = self.ordered_by(channel).await else {
            return Err(error(ErrorCode::NotFound, "channel not ordered here"));
        };
        let Some((members, _)) = by.ordering().member_sets(channel, u64::MAX).await else {
            return Err(error(ErrorCode::NotFound, "channel not ordered here"));
        };
        if members.binary_search(&me).is_err() {
            return Err(error(ErrorCode::Forbidden, format!("only a member {what}")));
        }
        Ok(by)
    }

    /// A run of a channel's history for one of its current members, as a pack signed by this
    /// relay. Counts as one request against the member's rate.
    async fn history(&self, me: DeviceId, channel: ChannelId, from: u64, max: u32) -> Response {
        if let Err(retry_after_ms) = check_rate(&self.senders, me) {
            return error(ErrorCode::RateLimited { retry_after_ms }, "too many requests");
        }
        if let Err(refused) = self.check_member(me, &channel, "reads a channel's history").await {
            return refused;
        }
        let max = max.clamp(1, MAX_HISTORY_ENTRIES) as usize;
        let store = self.store.clone();
        let read = tokio::task::spawn_blocking(move || {
            store.history(&channel.0, from, max, MAX_HISTORY_BYTES)
        })
        .await;
        let (head, entries) = match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return unavailable(e),
            Err(e) => return unavailable(e),
        };
        let Some(start) = entries.first().map(|(seq, _)| *seq) else {
            return Response::History { first: head.first, next: head.next, pack: None };
        };
        // Positions are consecutive from `start`: entries go only from the oldest end.
        let envelopes = entries.into_iter().map(|(_, e)| e).collect();
        match chitchat_proto::pack::Pack::seal(&self.key, channel, start, envelopes) {
            Ok(pack) => Response::History { first: head.first, next: head.next, pack: Some(pack) },
            Err(e) => error(ErrorCode::BadRequest, e.to_string()),
        }
    }

    /// Pins a file's blob for `channel`'s members, or says where to push it first (see
    /// [`crate::files`]).
    async fn pin_file(
        &self,
        me: DeviceId,
        channel: ChannelId,
        hash: Hash,
        len: u64,
        now: Timestamp,
    ) -> Response {
        let Some(files) = &self.files else {
            return error(ErrorCode::NotFound, "this relay keeps no files");
        };
        if let Err(retry_after_ms) = check_rate(&self.senders, me) {
            return error(ErrorCode::RateLimited { retry_after_ms }, "too many requests");
        }
        let limits = &self.config.files;
        if let Err((code, message)) = self.check_file_size(len) {
            return error(code, message);
        }
        let by = match self.check_member(me, &channel, "pins a channel's files").await {
            Ok(by) => by,
            Err(refused) => return refused,
        };
        let user = match self.store.device(&me) {
            Ok(Some(d)) => d.local_name,
            Ok(None) => return error(ErrorCode::Forbidden, "register this device here first"),
            Err(e) => return unavailable(e),
        };
        let blobs = files.blobs();
        let here = match blobs.complete(hash).await {
            Ok(true) => blobs.local_bytes(hash).await.ok(),
            Ok(false) => None,
            Err(e) => return unavailable(e),
        };
        match here {
            Some(have) if have == len => {}
            Some(have) => {
                files.done(me, hash);
                return error(
                    ErrorCode::BadRequest,
                    format!("the blob has {have} bytes, not the {len} announced"),
                );
            }
            None => {
                // The quota is checked before a byte is pushed (and again when pinning).
                let quota = limits.quota_bytes_per_user;
                match self.store.files_used(&user) {
                    Ok(used) if used.saturating_add(len) > quota => {
                        return error(
                            ErrorCode::QuotaExceeded { retry_after_ms: 0 },
                            format!(
                                "the user's files would take {} bytes here, over the quota of {quota}",
                                used.saturating_add(len)
                            ),
                        );
                    }
                    Ok(_) => {}
                    Err(e) => return unavailable(e),
                }
                // Named at once, so that what is pushed survives garbage collection.
                if let Err(e) = blobs.keep(hash).await {
                    return unavailable(e);
                }
                if !files.want(me, hash) {
                    return error(
                        ErrorCode::RateLimited { retry_after_ms: 60_000 },
                        "too many files are being pushed here",
                    );
                }
                return Response::FileWanted { addrs: blob_addrs(files) };
            }
        }
        let lifetime = self.file_lifetime_ms();
        let pin = crate::store::FilePin {
            user,
            device: me.0.0,
            channel: channel.0,
            len,
            pinned: now,
            expires: Timestamp(now.0.saturating_add(lifetime)),
        };
        let quota = limits.quota_bytes_per_user;
        let written = self.store.write(Write::PinFile { hash: *hash.as_bytes(), pin, quota }).await;
        files.done(me, hash);
        match written {
            Ok(Written::Pinned(pin)) => {
                if let Err(e) = blobs.keep(hash).await {
                    return unavailable(e);
                }
                if pin.pinned == now {
                    self.metrics.files_pinned.inc();
                    // The channel's other relays keep it too, for their members.
                    if let Some(onward) = self.onward(&by) {
                        let body = FedBody::ReplicateFile {
                            channel,
                            hash: *hash.as_bytes(),
                            len,
                            expires_ms: pin.expires.0,
                            addrs: blob_addrs(files),
                        };
                        files.notify(&self.federation, onward.hosts, body);
                    }
                }
                Response::FilePinned { expires_ms: pin.expires.0 }
            }
            Ok(other) => unavailable(format!("unexpected {other:?}")),
            Err(WriteError::Rejected { code, message }) => {
                // Refused for good: nothing of it is kept here.
                if !files.is_wanted(hash) {
                    let _ = blobs.forget(hash).await;
                }
                error(code, message)
            }
            Err(e) => unavailable(e),
        }
    }

    /// Part of a blob pinned here (and not expired), for a device that reaches this relay over
    /// its link only: what the blob endpoint would serve it over iroh.
    async fn blob_part(
        &self,
        me: DeviceId,
        hash: Hash,
        first: u64,
        chunks: u32,
        now: Timestamp,
    ) -> Response {
        let Some(files) = &self.files else {
            return error(ErrorCode::NotFound, "this relay keeps no files");
        };
        match self.store.serves_file(hash.as_bytes(), now) {
            Ok(true) => {}
            Ok(false) => return error(ErrorCode::NotFound, "no such file here (or it expired)"),
            Err(e) => return unavailable(e),
        }
        let Some(_turn) = files.part_turn(me) else {
            return error(ErrorCode::RateLimited { retry_after_ms: 100 }, "too many parts at once");
        };
        match files.blobs().export_part(hash, first, u64::from(chunks)).await {
            Ok(part) => Response::BlobPart { part: chitchat_proto::codec::Bytes(part) },
            Err(e) => unavailable(e),
        }
    }

    /// Part of a blob this relay asked `me` to push (`FileWanted`), over its link rather than
    /// iroh: verified against the hash and kept; `PinFile` pins it once it is whole.
    async fn push_part(
        &self,
        me: DeviceId,
        hash: Hash,
        len: u64,
        first: u64,
        chunks: u32,
        part: Vec<u8>,
    ) -> Response {
        let Some(files) = &self.files else {
            return error(ErrorCode::NotFound, "this relay keeps no files");
        };
        if !files.may_push(me, hash) {
            return error(ErrorCode::Forbidden, "push only a file this relay asked for (PinFile)");
        }
        if let Err((code, message)) = self.check_file_size(len) {
            return error(code, message);
        }
        let Some(_turn) = files.part_turn(me) else {
            return error(ErrorCode::RateLimited { retry_after_ms: 100 }, "too many parts at once");
        };
        match files.blobs().import_part(hash, len, first, u64::from(chunks), part).await {
            Ok(()) => Response::PartTaken,
            Err(e) => error(ErrorCode::BadRequest, format!("the part was refused: {e}")),
        }
    }

    /// Starts replicating a blob `origin` pinned for `channel`, which both relays order: it is
    /// fetched from `origin`'s blob endpoint and pinned here until `origin` unpins it (or
    /// sooner, by this relay's own expiry), within this relay's size limit and its quota for
    /// `origin`.
    #[allow(clippy::too_many_arguments)]
    async fn replicate_from(
        &self,
        origin: &RelayId,
        channel: ChannelId,
        hash: Hash,
        len: u64,
        expires: Timestamp,
        addrs: Vec<chitchat_proto::wire::IpPort>,
        now: Timestamp,
    ) -> Result<(), (ErrorCode, String)> {
        let Some(files) = &self.files else {
            return Err((ErrorCode::NotFound, "this relay keeps no files".into()));
        };
        let limits = &self.config.files;
        let Some(OrderedBy::Group(g)) = self.ordered_by(&channel).await else {
            return Err((ErrorCode::NotFound, "channel not ordered here with others".into()));
        };
        if !g.relays.contains(origin) {
            return Err((
                ErrorCode::Forbidden,
                "the asking relay is not one of the channel's".into(),
            ));
        }
        self.check_file_size(len)?;
        if expires <= now {
            return Err((ErrorCode::BadRequest, "the pin has expired".into()));
        }
        let unavailable = |e: crate::store::StoreError| (ErrorCode::Unavailable, e.to_string());
        if self.store.file_pin(hash.as_bytes()).map_err(unavailable)?.is_some() {
            return Ok(());
        }
        // Counted apart from this relay's users: as the other relay's, by its host.
        let user = format!("@{}", origin.host);
        let quota = limits.replica_quota_bytes_per_relay;
        let used = self.store.files_used(&user).map_err(unavailable)?;
        if used.saturating_add(len) > quota {
            return Err((
                ErrorCode::QuotaExceeded { retry_after_ms: 0 },
                format!(
                    "{} would have {} bytes replicated here, over {quota}",
                    origin.host,
                    used.saturating_add(len)
                ),
            ));
        }
        let Some(id) = chitchat_blobs::endpoint_id(&origin.key) else {
            return Err((ErrorCode::BadRequest, "the asking relay's key is no endpoint id".into()));
        };
        let pin = crate::store::FilePin {
            user,
            device: origin.key.0,
            channel: channel.0,
            len,
            pinned: now,
            expires: Timestamp(expires.0.min(now.0.saturating_add(self.file_lifetime_ms()))),
        };
        let provider = chitchat_blobs::Provider {
            id,
            addrs: addrs.into_iter().map(std::net::SocketAddr::from).collect(),
        };
        let replica = crate::files::Replica { provider, hash, pin, quota };
        if !files.replicate(self.store.clone(), self.metrics.clone(), replica) {
            return Err((
                ErrorCode::RateLimited { retry_after_ms: 60_000 },
                "too many files are being replicated here".into(),
            ));
        }
        Ok(())
    }

    /// Refuses a blob over `[files] max_file_bytes`, pinned or replicated alike.
    fn check_file_size(&self, len: u64) -> Result<(), (ErrorCode, String)> {
        let max = self.config.files.max_file_bytes;
        if len > max {
            return Err((
                ErrorCode::QuotaExceeded { retry_after_ms: 0 },
                format!("the file is over this relay's limit of {max} bytes"),
            ));
        }
        Ok(())
    }

    /// How long a file pinned now stays (`[files] expiry_days`), in milliseconds.
    fn file_lifetime_ms(&self) -> u64 {
        if self.short_file_expiry {
            return SHORT_FILE_EXPIRY_MS;
        }
        self.config.files.expiry_days.saturating_mul(86_400_000)
    }

    /// Deletes the pins past their expiry, and their blobs' names (garbage collection deletes
    /// the data). Returns how many went.
    pub async fn expire_files(&self, now: Timestamp) -> Result<usize, WriteError> {
        let Some(files) = &self.files else { return Ok(0) };
        let mut total = 0;
        loop {
            let gone = match self.store.write(Write::ExpireFiles { now, max: 1024 }).await? {
                Written::Unpinned(gone) => gone,
                _ => Vec::new(),
            };
            for hash in &gone {
                if let Err(e) = files.blobs().forget(Hash::from_bytes(*hash)).await {
                    tracing::warn!(error = %e, "an expired blob's name not dropped");
                }
            }
            total += gone.len();
            if gone.len() < 1024 {
                return Ok(total);
            }
        }
    }

    /// Where a post or report of a channel goes besides this relay's members: once to each
    /// other relay of a channel of several relays.
    fn onward(&self, by: &OrderedBy<'_>) -> Option<Onward> {
        let OrderedBy::Group(g) = by else { return None };
        let f = &self.config.federation;
        Some(Onward {
            hosts: g.relays.iter().filter(|r| **r != self.id).map(|r| r.host.clone()).collect(),
            limits: QueueLimits {
                max_items: f.max_queue_items,
                max_bytes: f.max_queue_bytes,
                max_total_items: f.max_queued_total,
            },
        })
    }

    /// Fans a member's epoch report out to the channel's other current members, here and
    /// through the channel's other relays, like a post. The report must be the authenticated
    /// device's own, of a channel it is a member of now.
    async fn report(&self, me: DeviceId, report: EpochReport, now: Timestamp) -> PostResult {
        if let Err(retry_after_ms) = check_rate(&self.senders, me) {
            return PostResult::Refused(ErrorCode::RateLimited { retry_after_ms });
        }
        if report.body.device != me {
            return PostResult::Refused(ErrorCode::Forbidden);
        }
        if report.verify().is_err() {
            return PostResult::Refused(ErrorCode::BadRequest);
        }
        let channel = report.body.channel;
        let Some(by) = self.ordered_by(&channel).await else {
            return PostResult::Refused(ErrorCode::NotFound);
        };
        let Some((members, _)) = by.ordering().member_sets(&channel, report.body.epoch).await
        else {
            return PostResult::Refused(ErrorCode::NotFound);
        };
        if members.binary_search(&me).is_err() {
            return PostResult::Refused(ErrorCode::Forbidden);
        }
        self.metrics.epoch_reports.inc();
        let recipients: Arc<[DeviceId]> = members.iter().copied().filter(|d| *d != me).collect();
        self.fan_out_posted(&by, me, Envelope::Report(report), recipients, now).await
    }

    /// A report another relay of the channel forwarded: fanned out to this relay's current
    /// members, once per `(origin, seq)`.
    async fn forwarded_report(
        &self,
        origin: &RelayId,
        seq: u64,
        sender: DeviceId,
        report: EpochReport,
        now: Timestamp,
    ) -> ForwardResult {
        if report.body.device != sender || report.verify().is_err() {
            return ForwardResult::Refused(ErrorCode::BadRequest);
        }
        let channel = report.body.channel;
        let Some(OrderedBy::Group(g)) = self.ordered_by(&channel).await else {
            return ForwardResult::Refused(ErrorCode::Unavailable);
        };
        if !g.relays.contains(origin) {
            return ForwardResult::Refused(ErrorCode::Forbidden);
        }
        let Some((members, then)) = g.ordering.member_sets(&channel, report.body.epoch).await
        else {
            return ForwardResult::Refused(ErrorCode::Unavailable);
        };
        if members.binary_search(&sender).is_err() && then.binary_search(&sender).is_err() {
            return ForwardResult::Refused(ErrorCode::Forbidden);
        }
        let recipients: Arc<[DeviceId]> =
            members.iter().copied().filter(|d| *d != sender).collect();
        self.fan_out_forwarded((origin, seq), sender, Envelope::Report(report), recipients, now)
            .await
    }

    /// Fans out what another relay forwarded, once per `(origin, seq)`.
    async fn fan_out_forwarded(
        &self,
        (origin, seq): (&RelayId, u64),
        sender: DeviceId,
        envelope: Envelope,
        recipients: Arc<[DeviceId]>,
        now: Timestamp,
    ) -> ForwardResult {
        let history = self.history_limits(&envelope);
        let write = Write::Fanout {
            sender,
            envelope,
            recipients,
            now,
            quota: self.inbox_quota(),
            onward: None,
            seen: Some((origin.key.0, seq)),
            history,
        };
        match self.fan_out(write).await {
            PostResult::Posted { .. } => ForwardResult::Stored,
            PostResult::Refused(code) => ForwardResult::Refused(code),
        }
    }

    /// A member's proof that an orderer signed two commits for one epoch: checked, kept,
    /// logged and counted; the orderer's signatures stop counting in certificates this relay
    /// builds; and the first proof against an orderer is passed on to the other relays this
    /// relay orders with it.
    async fn equivocation(&self, me: DeviceId, proof: &Equivocation) -> Response {
        if let Err(retry_after_ms) = check_rate(&self.senders, me) {
            return error(ErrorCode::RateLimited { retry_after_ms }, "too many requests");
        }
        match self.note_proof(proof, &format!("device {me}")).await {
            Ok(new) => {
                if new {
                    self.pass_on(proof).await;
                }
                Response::EquivocationNoted { new }
            }
            Err((code, message)) => error(code, message),
        }
    }

    /// Checks a proof (against an orderer of a channel ordered here), keeps it, logs and
    /// counts it, and stops counting that orderer's signatures. `Ok(true)` for the first proof
    /// against that orderer.
    async fn note_proof(
        &self,
        proof: &Equivocation,
        reported_by: &str,
    ) -> Result<bool, (ErrorCode, String)> {
        let signer =
            proof.verify().map_err(|e| (ErrorCode::BadRequest, format!("not a proof: {e}")))?;
        // Only against an orderer of a channel this relay orders (anyone can make a key sign
        // two hashes; that convicts no one worth remembering).
        let (channel, epoch) = proof.epoch();
        if !self.configs_of(&channel).await.iter().any(|c| c.orderers().contains(&signer)) {
            return Err((
                ErrorCode::Forbidden,
                "the proof is not against an orderer of a channel ordered here".into(),
            ));
        }
        let write = Write::Convict { signer: signer.0, proof: encode(proof) };
        let new = match self.store.write(write).await {
            Ok(Written::Convicted { new }) => new,
            Ok(other) => return Err((ErrorCode::Unavailable, format!("unexpected {other:?}"))),
            Err(e) => return Err((refusal(e), "the proof could not be kept".into())),
        };
        if new {
            self.metrics.convicted.inc();
            tracing::error!(
                orderer = %signer.to_hex(),
                reported_by,
                %channel,
                epoch,
                own = signer == self.id.key,
                "EQUIVOCATION: an orderer signed two commits for one epoch; its signatures no longer count here"
            );
        }
        self.groups.convict(signer);
        Ok(new)
    }

    /// Gives a new proof to every other relay of the proof's channel and of the groups the
    /// convicted orderer is in (best effort: a relay that is away hears of it from its own
    /// members' reports).
    async fn pass_on(&self, proof: &Equivocation) {
        let Ok(signer) = proof.verify() else { return };
        let (channel, _) = proof.epoch();
        let mut relays: Vec<RelayId> =
            self.configs_of(&channel).await.into_iter().flat_map(|c| c.relays).collect();
        for g in self.groups.all().await {
            if g.relays.iter().any(|r| r.key == signer) {
                relays.extend(g.relays.iter().cloned());
            }
        }
        let hosts: std::collections::BTreeSet<String> = relays
            .into_iter()
            .filter(|r| r.key != signer && *r != self.id)
            .map(|r| r.host)
            .collect();
        for host in hosts {
            let federation = self.federation.clone();
            let body = FedBody::Equivocation { proof: Box::new(proof.clone()) };
            tokio::spawn(async move {
                match federation.call(&host, body).await {
                    Ok((_, FedResponse::Noted { .. })) => {}
                    Ok((_, other)) => {
                        tracing::warn!(%host, answer = ?other, "an equivocation proof was refused");
                    }
                    Err(e) => {
                        tracing::warn!(%host, error = %e, "an equivocation proof was not passed on");
                    }
                }
            });
        }
    }

    /// Writes a post's fan-out and counts it.
    async fn fan_out(&self, write: Write) -> PostResult {
        let len = match &write {
            Write::Fanout { envelope: Envelope::Post(p), .. } => p.message.len() as u64,
            _ => 0,
        };
        match self.store.write(write).await {
            Ok(Written::Posted { delivered, skipped }) => {
                self.metrics.posts.inc();
                self.metrics.enqueues.inc_by(delivered.len() as u64);
                self.metrics.enqueue_bytes.inc_by(len.saturating_mul(delivered.len() as u64));
                self.metrics.post_skips.inc_by(u64::from(skipped));
                for device in &delivered {
                    self.wake(*device);
                }
                PostResult::Posted {
                    delivered: u32::try_from(delivered.len()).unwrap_or(u32::MAX),
                    skipped,
                }
            }
            Ok(other) => {
                tracing::error!(?other, "unexpected answer to a post");
                PostResult::Refused(ErrorCode::Unavailable)
            }
            Err(e) => PostResult::Refused(refusal(e)),
        }
    }

    /// A post another relay of the channel forwarded: fanned out to this relay's members of
    /// the epoch it was sent in, once per `(origin, seq)`. The origin must be one of the
    /// channel's relays and the sender a member; a post of an epoch this relay has not applied
    /// yet is answered `Unavailable` (the origin retries).
    async fn forwarded_post(
        &self,
        origin: &RelayId,
        seq: u64,
        sender: DeviceId,
        post: ChannelPost,
        now: Timestamp,
    ) -> ForwardResult {
        let Ok(framing) = inspect_application(&post.message) else {
            return ForwardResult::Refused(ErrorCode::BadRequest);
        };
        if framing.channel != post.channel {
            return ForwardResult::Refused(ErrorCode::BadRequest);
        }
        let Some(OrderedBy::Group(g)) = self.ordered_by(&post.channel).await else {
            return ForwardResult::Refused(ErrorCode::Unavailable);
        };
        if !g.relays.contains(origin) {
            return ForwardResult::Refused(ErrorCode::Forbidden);
        }
        let o = &g.ordering;
        // The channel's current epoch is the one its next commit is built on.
        if o.next_epoch(&post.channel).await.is_none_or(|current| framing.epoch > current) {
            return ForwardResult::Refused(ErrorCode::Unavailable);
        }
        let Some((members, then)) = o.member_sets(&post.channel, framing.epoch).await else {
            return ForwardResult::Refused(ErrorCode::Unavailable);
        };
        if members.binary_search(&sender).is_err() && then.binary_search(&sender).is_err() {
            return ForwardResult::Refused(ErrorCode::Forbidden);
        }
        let recipients: Arc<[DeviceId]> = then.iter().copied().filter(|d| *d != sender).collect();
        self.fan_out_forwarded((origin, seq), sender, Envelope::Post(post), recipients, now).await
    }

    async fn register(
        &self,
        me: DeviceId,
        token: Option<String>,
        local_name: String,
        dir: chitchat_proto::Dir,
        now: Timestamp,
    ) -> Response {
        if dir.device() != me {
            return error(ErrorCode::Forbidden, "a device registers only itself");
        }
        if let Err(e) = check_local_name(&local_name) {
            return error(ErrorCode::BadRequest, e.to_string());
        }
        if let Err(e) = dir.verify_signature() {
            return error(ErrorCode::BadRequest, format!("record: {e}"));
        }
        if dir.body.revoked {
            return error(ErrorCode::Forbidden, "the record is revoked");
        }
        let open = self.config.open_registration;
        let write = Write::Register { token, open, local_name: local_name.clone(), dir, now };
        if let Err(e) = self.store.write(write).await {
            return from_write(e);
        }
        let body = SponsorshipBody {
            device: me,
            local_name,
            relay: self.id.clone(),
            issued: now,
            expires: now.plus_ms(self.config.sponsorship_days.saturating_mul(DAY_MS)),
        };
        Response::Registered { sponsorship: Sponsorship::issue(&self.key, body) }
    }

    async fn upload_key_packages(
        &self,
        me: DeviceId,
        packages: Vec<Bytes>,
        last_resort: Option<Bytes>,
        now: Timestamp,
    ) -> Response {
        let check = |bytes: &Bytes, want_last_resort: bool| {
            let info = validate_key_package(&self.crypto, bytes).map_err(|e| e.to_string())?;
            if info.device != me {
                return Err("key package of another device".to_owned());
            }
            if info.not_after <= now {
                return Err("key package expired".to_owned());
            }
            if info.last_resort != want_last_resort {
                return Err("last-resort marking does not match its place".to_owned());
            }
            Ok(info.not_after)
        };
        let mut checked = Vec::with_capacity(packages.len());
        for p in packages {
            match check(&p, false) {
                Ok(not_after) => checked.push((not_after, p)),
                Err(e) => return error(ErrorCode::BadRequest, e),
            }
        }
        let last_resort = match last_resort {
            Some(p) => match check(&p, true) {
                Ok(not_after) => Some((not_after, p)),
                Err(e) => return error(ErrorCode::BadRequest, e),
            },
            None => None,
        };
        let write = Write::UploadKeyPackages {
            device: me,
            packages: checked,
            last_resort,
            max_per_device: self.config.key_packages.max_per_device,
        };
        match self.store.write(write).await {
            Ok(Written::KeyPackages { available }) => Response::KeyPackagesStored {
                available: u32::try_from(available).unwrap_or(u32::MAX),
            },
            Ok(other) => unavailable(format!("unexpected {other:?}")),
            Err(e) => from_write(e),
        }
    }

    async fn claim(&self, me: DeviceId, target: DeviceId, now: Timestamp) -> Response {
        for (limiter, key) in [(&self.claimers, me), (&self.claimed, target)] {
            if let Err(retry_after_ms) = check_rate(limiter, key) {
                return error(
                    ErrorCode::RateLimited { retry_after_ms },
                    "too many key package claims",
                );
            }
        }
        match self.store.write(Write::ClaimKeyPackage { device: target, now }).await {
            Ok(Written::KeyPackage(bytes)) => Response::KeyPackage(bytes),
            Ok(other) => unavailable(format!("unexpected {other:?}")),
            Err(e) => from_write(e),
        }
    }

    /// Orders a commit. Only a registered member submits, and only its own commits. The winner
    /// of its epoch gets a certificate signed by this relay; its fan-out (to the members, and
    /// its Welcomes to the devices it adds) is durable before the answer, done by the ordering
    /// state machine as it applies the log ([`CommitFanout`]). A resubmitted winner gets its
    /// certificate again and is not fanned out again.
    async fn submit_commit(&self, me: DeviceId, sub: CommitSubmission, now: Timestamp) -> Response {
        if let Err(retry_after_ms) = check_rate(&self.submitters, me) {
            return error(ErrorCode::RateLimited { retry_after_ms }, "too many commits submitted");
        }
        let framing = match inspect_commit(&sub.commit) {
            Ok(f) => f,
            Err(e) => return error(ErrorCode::BadRequest, format!("commit: {e}")),
        };
        if framing.channel != sub.channel || framing.epoch != sub.epoch {
            return error(
                ErrorCode::BadRequest,
                "the commit's channel or epoch differs from the submission's",
            );
        }
        // A commit for the next epoch is checked first against the channel's public state and
        // the channel rules, with this relay's directory for the devices it adds. (A retried
        // winner or a late loser is answered by the ordering state.)
        // A commit of an epoch already decided is answered by the group that decided it, even
        // if the channel has moved on to another relay set since (a committer that resubmits
        // after a crash learns that it won, or whom it lost to).
        // (The group of the current set opened the channel at an epoch past this one when
        // another group decided it: that group answers.)
        let ordered = self.ordered_by(&sub.channel).await;
        let past = match &ordered {
            Some(by) => {
                let ordering = by.ordering();
                ordering.next_epoch(&sub.channel).await.is_some_and(|n| n > sub.epoch)
                    && ordering.winner(&sub.channel, sub.epoch).await.is_none()
            }
            None => true,
        };
        let by =
            if past { self.decided_by(&sub.channel, sub.epoch).await.or(ordered) } else { ordered };
        let Some(by) = by else {
            return error(ErrorCode::NotFound, "the channel is not ordered here; open it first");
        };
        // A replica behind its group (the committer of the epoch before heard from the leader)
        // catches up first: every commit for the next epoch gets this relay's credential check.
        let next = by.ordering().next_epoch_reaching(&sub.channel, sub.epoch, CATCH_UP).await;
        match next {
            Some(next) if next < sub.epoch => {
                return error(
                    ErrorCode::Unavailable,
                    format!("this relay has ordered the channel up to epoch {next} only; retry"),
                );
            }
            None => {
                return error(
                    ErrorCode::NotFound,
                    "the channel is not ordered here; open it first",
                );
            }
            Some(next) if next == sub.epoch => {
                let directory = match Directory::new(self, now) {
                    Ok(d) => d,
                    Err(e) => return unavailable(e),
                };
                match by.ordering().check(&sub.channel, &sub.commit, &directory).await {
                    Ok(committer) if committer == me => {}
                    Ok(_) => {
                        return error(
                            ErrorCode::Forbidden,
                            "a commit is submitted by the member that committed it",
                        );
                    }
                    Err(e) => return error(ErrorCode::BadRequest, format!("invalid commit: {e}")),
                }
            }
            Some(_) => {}
        }
        let hash = commit_hash(&sub.commit);
        let commit = CommitRef { channel: sub.channel, epoch: sub.epoch, hash, submitter: me };
        let command =
            RelayCommand::Order { commit, bytes: Bytes(sub.commit), welcome: sub.welcome };
        let submitted = match &by {
            OrderedBy::Solo(o) => o.submit_at(command).await.map_err(|e| e.to_string()),
            OrderedBy::Group(g) => self.groups.propose(g, command).await.map_err(|e| e.to_string()),
        };
        let (outcome, index) = match submitted {
            Ok((RelayOutcome::Ordering(o), index)) => (o, index),
            Ok((RelayOutcome::Invalid(reason), _)) => {
                return error(ErrorCode::BadRequest, format!("invalid commit: {reason}"));
            }
            Ok((RelayOutcome::Forbidden(reason), _)) => return error(ErrorCode::Forbidden, reason),
            Ok((RelayOutcome::OverBudget(reason), _)) => return over_budget(reason),
            Err(e) => return unavailable(e),
        };
        match outcome {
            Outcome::Accepted(w) if w.hash == hash => {
                let body = EpochCertBody { channel: sub.channel, epoch: sub.epoch, hash };
                match &by {
                    OrderedBy::Solo(_) => {
                        Response::CommitAccepted { cert: certify(&self.key, body) }
                    }
                    // A resubmitted winner finds it in the log: its index is where to wait.
                    // The certificate goes into the log, and every relay of the set fans the
                    // commit out to its own members with it, before the committer hears.
                    OrderedBy::Group(_) if self.exit_before_deliver => {
                        tracing::error!(
                            "fault injection: exiting before the certificate of a winner is delivered"
                        );
                        std::process::abort();
                    }
                    OrderedBy::Group(g) => match self.groups.certify(g, body, index).await {
                        Ok(cert) => {
                            let deliver = RelayCommand::Deliver { cert: cert.clone() };
                            match self.groups.propose(g, deliver).await {
                                Ok((RelayOutcome::Ordering(Outcome::Accepted(_)), _)) => {
                                    Response::CommitAccepted { cert }
                                }
                                Ok((other, _)) => {
                                    unavailable(format!("certified, not delivered: {other:?}"))
                                }
                                Err(e) => unavailable(format!("certified, not delivered: {e}")),
                            }
                        }
                        Err(e) => unavailable(format!("ordered, not yet certified: {e}")),
                    },
                }
            }
            Outcome::Conflict { winner } => {
                self.metrics.commit_conflicts.inc();
                if self.equivocate {
                    // The fault switch: tell the loser it won, with this relay's signature on
                    // its hash (the winner's certificate carries a signature on another).
                    let body = EpochCertBody { channel: sub.channel, epoch: sub.epoch, hash };
                    tracing::warn!(channel = %sub.channel, epoch = sub.epoch, "fault switch: certifying a losing commit");
                    return Response::CommitAccepted { cert: certify(&self.key, body) };
                }
                Response::CommitConflict { winner }
            }
            Outcome::WrongEpoch { next_epoch } => error(
                ErrorCode::BadRequest,
                format!("the channel's next commit is for epoch {next_epoch}"),
            ),
            Outcome::UnknownChannel => {
                error(ErrorCode::NotFound, "the channel is not ordered here")
            }
            other => unavailable(format!("ordering answered {other:?}")),
        }
    }

    /// Starts ordering a channel from a member's export of its public state. The opener must be
    /// a member of it, and the channel's relay set must name this relay.
    async fn open_channel(&self, me: DeviceId, channel: ChannelId, state: PublicState) -> Response {
        if state.group_info.len().saturating_add(state.ratchet_tree.len())
            > self.config.ordering.max_open_state_bytes
        {
            return error(ErrorCode::BadRequest, "the channel's public state is too large");
        }
        if let Err(retry_after_ms) = check_rate(&self.openers, me) {
            return error(ErrorCode::RateLimited { retry_after_ms }, "too many channels opened");
        }
        let (relays, epoch) = match PublicChannel::from_state(&self.crypto, &state) {
            Ok(p) if p.id() != channel => {
                return error(ErrorCode::BadRequest, "the state is of another channel");
            }
            Ok(p) if !p.members().contains(&me) => {
                return error(ErrorCode::Forbidden, "only a member opens a channel");
            }
            Ok(p) => match p.config() {
                Ok(config) => {
                    if let Err(e) = self.orders(&config) {
                        return error(ErrorCode::Forbidden, e);
                    }
                    // A channel's first state comes from its creator, whose device its id
                    // names: no one else can open a group of their own under a known id.
                    if p.epoch() == 0 && !channel.opens_first_state(&config.creator, &me) {
                        return error(
                            ErrorCode::Forbidden,
                            "a channel's first state is opened by its creator, whose device \
                             its id names",
                        );
                    }
                    (config.relays, p.epoch())
                }
                Err(e) => return error(ErrorCode::BadRequest, format!("public state: {e}")),
            },
            Err(e) => return error(ErrorCode::BadRequest, format!("public state: {e}")),
        };
        let set = relay_set(&relays);
        // A channel that moved here from relay sets this relay orders in too: the state must
        // be the one those relays' log left it in (a member cannot open it here at another
        // state), and a stale copy of it here is replaced.
        match self.vouch_for_state(&channel, &set, &state, epoch).await {
            Vouched::Yes => {}
            Vouched::Stale => {
                return error(
                    ErrorCode::Forbidden,
                    "the channel's state is not the one its relays ordered last",
                );
            }
            Vouched::NotYet => {
                return error(
                    ErrorCode::Unavailable,
                    "no relay that ordered the channel's move to this relay set vouches for the \
                     state yet (they are away or behind); try again",
                );
            }
        }
        self.reopen(channel, state, &set, epoch).await
    }

    /// Opens a channel (its state vouched for) in the group of `set`, at the state's `epoch`.
    async fn reopen(
        &self,
        channel: ChannelId,
        state: PublicState,
        set: &[RelayId],
        epoch: u64,
    ) -> Response {
        let opened = if set.len() < 2 {
            self.ordering
                .submit(RelayCommand::Reopen { channel, state })
                .await
                .map_err(|e| e.to_string())
        } else {
            let group = match self.groups.get_or_create(set, true).await {
                Ok(g) => g,
                Err(e) => return error(e.code(), e.to_string()),
            };
            let open = RelayCommand::Reopen { channel, state };
            match self.groups.propose(&group, open).await {
                Ok((outcome, _)) => Ok(outcome),
                Err(e) => Err(e.to_string()),
            }
        };
        match opened {
            // Opened at the state's epoch. (This relay's copy of a group it does not lead may
            // not have applied the entry yet: the answer does not wait for it.)
            Ok(RelayOutcome::Ordering(Outcome::Opened)) => {
                Response::ChannelOpened { next_epoch: epoch }
            }
            Ok(RelayOutcome::Ordering(Outcome::AlreadyOpen { next_epoch })) => {
                Response::ChannelOpened { next_epoch }
            }
            Ok(RelayOutcome::Invalid(reason)) => error(ErrorCode::BadRequest, reason),
            Ok(RelayOutcome::Forbidden(reason)) => error(ErrorCode::Forbidden, reason),
            Ok(RelayOutcome::OverBudget(reason)) => over_budget(reason),
            Ok(RelayOutcome::Ordering(Outcome::Full)) => {
                over_budget("this relay orders as many channels as it may")
            }
            Ok(RelayOutcome::Ordering(other)) => {
                unavailable(format!("ordering answered {other:?}"))
            }
            Err(e) => unavailable(e),
        }
    }

    /// Opens a relay-less channel that its creator's device moved onto relays (see
    /// [`Request::OpenMoved`]): the state before must be relay-less and the asker its creator
    /// (whose device the channel id names, and whose key alone ordered it); the move's
    /// certificate must be the creator's, for that state's epoch and that commit; the commit must
    /// pass the channel rules against the state before (as every member checks it) and lead to
    /// exactly the state offered, whose relay set names this relay. No relay held the channel
    /// before, so no relay vouches: this evidence does.
    async fn open_moved(
        &self,
        me: DeviceId,
        before: PublicState,
        moved: chitchat_proto::wire::OrderedCommit,
        state: PublicState,
        now: Timestamp,
    ) -> Response {
        let max = self.config.ordering.max_open_state_bytes;
        let size = |s: &PublicState| s.group_info.len().saturating_add(s.ratchet_tree.len());
        if size(&before) > max || size(&state) > max {
            return error(ErrorCode::BadRequest, "the channel's public state is too large");
        }
        if let Err(retry_after_ms) = check_rate(&self.openers, me) {
            return error(ErrorCode::RateLimited { retry_after_ms }, "too many channels opened");
        }
        let channel = moved.channel;
        let refused = |e: chitchat_proto::channel::ChannelError| {
            error(ErrorCode::BadRequest, format!("public state: {e}"))
        };
        let mut public = match PublicChannel::from_state(&self.crypto, &before) {
            Ok(p) if p.id() != channel => {
                return error(ErrorCode::BadRequest, "the state is of another channel");
            }
            Ok(p) => p,
            Err(e) => return refused(e),
        };
        let config = match public.config() {
            Ok(c) => c,
            Err(e) => return refused(e),
        };
        if !config.relays.is_empty() {
            return error(
                ErrorCode::Forbidden,
                "the state before the move is ordered by relays: it is opened by them",
            );
        }
        if !channel.opens_first_state(&config.creator, &me) || !public.members().contains(&me) {
            return error(
                ErrorCode::Forbidden,
                "a relay-less channel is moved by its creator, whose device its id names",
            );
        }
        let body = EpochCertBody {
            channel,
            epoch: public.epoch(),
            hash: chitchat_proto::wire::commit_hash(&moved.commit),
        };
        if let Err(e) = moved.cert.verify_for(&body, &[config.creator.0]) {
            return error(
                ErrorCode::Forbidden,
                format!("the move is not certified by the channel's creator: {e}"),
            );
        }
        let directory = match Directory::new(self, now) {
            Ok(d) => d,
            Err(e) => return unavailable(e),
        };
        let checked = match public.check(&self.crypto, &moved.commit, &directory) {
            Ok(c) => c,
            Err(e) => return error(ErrorCode::BadRequest, format!("invalid commit: {e}")),
        };
        if let Err(e) = public.apply(checked) {
            return error(ErrorCode::BadRequest, format!("invalid commit: {e}"));
        }
        let after = match PublicChannel::from_state(&self.crypto, &state) {
            Ok(a) => a,
            Err(e) => return refused(e),
        };
        if !after.same_state(&public) {
            return error(
                ErrorCode::Forbidden,
                "the state offered is not the one the move leads to",
            );
        }
        let relays = match after.config() {
            Ok(c) => c.relays,
            Err(e) => return refused(e),
        };
        if !relays.contains(&self.id) {
            return error(ErrorCode::Forbidden, "the channel's relay set does not name this relay");
        }
        tracing::info!(%channel, epoch = after.epoch(), "a relay-less channel moved here");
        let members = after.members();
        let opened = self.reopen(channel, state, &relay_set(&relays), after.epoch()).await;
        if matches!(opened, Response::ChannelOpened { .. }) {
            // The move itself goes to the members' inboxes here and into the channel's history,
            // as every commit this relay orders does: a member that was away when its creator
            // handed the move over finds it here. (An open asked again fans it out again;
            // members drop the copy as a commit of a past epoch.)
            let recipients: Arc<[DeviceId]> = members.into_iter().filter(|d| *d != me).collect();
            let unbounded = crate::store::InboxQuota { max_items: u64::MAX, max_bytes: u64::MAX };
            let write = Write::Fanout {
                sender: me,
                envelope: Envelope::Commit(moved),
                recipients,
                now,
                quota: unbounded,
                onward: None,
                seen: None,
                history: self.config.history.limits(),
            };
            if let PostResult::Refused(code) = self.fan_out(write).await {
                tracing::warn!(%channel, ?code, "the move of a relay-less channel not fanned out");
            }
        }
        opened
    }

    /// Judges a channel's public state offered to open the channel in the group of `set` (the
    /// relay set the state names), by the copies of the channel this relay's groups hold:
    ///
    /// - the latest copy outside the group of `set` names `set` (its group ordered the move into
    ///   `set`, the last this relay knows): the state must be exactly that copy, at its epoch
    ///   (the next epoch is the group of `set`'s to order, so no later state can exist yet);
    /// - it names another set: the channel moved on from there, so the state must be later;
    /// - the group of `set` holds the latest copy and it names another set (the channel left
    ///   `set` from there): the state must be later; a copy naming `set` is live, and opening
    ///   it again changes nothing.
    ///
    /// A state it has no copy to judge by is [`StateCheck::Unknown`]. Older copies are passed
    /// over (a channel that moved back and forth leaves copies naming sets it has left).
    async fn judge_state(
        &self,
        channel: &ChannelId,
        set: &[RelayId],
        state: &PublicState,
        epoch: u64,
    ) -> StateCheck {
        let mut sources: Vec<(&Ordering, Vec<RelayId>)> =
            vec![(&self.ordering, vec![self.id.clone()])];
        let groups = self.groups.all().await;
        sources.extend(groups.iter().map(|g| (&g.ordering, g.relays.clone())));
        // The copy in the group of `set`, and the latest copy elsewhere (with its ordering).
        let mut in_group = None;
        let mut elsewhere: Option<(HeldCopy, &Ordering)> = None;
        for (ordering, own_set) in sources {
            let Some(held) = ordering.next_epoch(channel).await else { continue };
            let config = ordering.config(channel).await;
            let names_set = matches!(config, Some(Ok(c)) if relay_set(&c.relays) == set);
            let copy = HeldCopy { epoch: held, names_set };
            if own_set == set {
                in_group = Some(copy);
            } else if elsewhere.is_none_or(|(e, _)| held > e.epoch) {
                elsewhere = Some((copy, ordering));
            }
        }
        let matches = match elsewhere {
            Some((copy, ordering)) if copy.names_set && copy.epoch == epoch => {
                ordering.matches(channel, state).await == Some(true)
            }
            _ => false,
        };
        StateCheck::judge(in_group, elsewhere.map(|(c, _)| c), epoch, matches)
    }

    /// Judges a state offered to open a channel in the group of `set`: this relay and every
    /// other relay of `set` it reaches judge it by their copies ([`Relay::judge_state`]), and
    /// [`StateCheck::sum`] adds them up (one `Differs` refuses it; past epoch 0 one relay must
    /// vouch for it). Relays that do not answer are passed over.
    async fn vouch_for_state(
        &self,
        channel: &ChannelId,
        set: &[RelayId],
        state: &PublicState,
        epoch: u64,
    ) -> Vouched {
        let own = self.judge_state(channel, set, state, epoch).await;
        if own == StateCheck::Differs {
            return Vouched::Stale;
        }
        let asks = set.iter().filter(|r| **r != self.id).map(|r| async move {
            let body = FedBody::CheckState { channel: *channel, state: state.clone() };
            match self.federation.call(&r.host, body).await {
                Ok((_, FedResponse::StateChecked(check))) => (r, check),
                Ok((_, other)) => {
                    tracing::debug!(relay = %r.host, answer = ?other, "no judgement of a state");
                    (r, StateCheck::Unknown)
                }
                Err(e) => {
                    tracing::debug!(relay = %r.host, error = %e, "no judgement of a state");
                    (r, StateCheck::Unknown)
                }
            }
        });
        let checks = futures::future::join_all(asks).await;
        for (relay, check) in &checks {
            if *check == StateCheck::Differs {
                tracing::warn!(%channel, relay = %relay.host, "a member offered a channel state another relay of the set did not order; refused");
            }
        }
        let vouched = StateCheck::sum(epoch, checks.iter().map(|(_, c)| *c).chain([own]));
        if vouched == Vouched::NotYet {
            tracing::info!(%channel, epoch, "no relay of the set vouches for a channel's state yet");
        }
        vouched
    }

    /// One durable enqueue from `me`, rate-limited and within the recipient's quota; wakes
    /// the recipient's waiting fetch.
    async fn enqueue(
        &self,
        me: DeviceId,
        envelope: SealedEnvelope,
        now: Timestamp,
    ) -> EnqueueResult {
        if let Err(retry_after_ms) = check_rate(&self.senders, me) {
            return EnqueueResult::Refused(ErrorCode::RateLimited { retry_after_ms });
        }
        let (len, recipient) = (envelope.ciphertext.len() as u64, envelope.recipient);
        let quota = self.inbox_quota();
        match self.store.write(Write::Enqueue { sender: me, envelope, now, quota }).await {
            Ok(Written::Enqueued { id }) => {
                self.metrics.enqueues.inc();
                self.metrics.enqueue_bytes.inc_by(len);
                self.wake(recipient);
                EnqueueResult::Enqueued(id)
            }
            Ok(other) => {
                tracing::error!(?other, "unexpected answer to an enqueue");
                EnqueueResult::Refused(ErrorCode::Unavailable)
            }
            Err(e) => EnqueueResult::Refused(refusal(e)),
        }
    }

    /// Fetches, holding the request until an item arrives or `timeout` passes.
    async fn wait(
        &self,
        me: DeviceId,
        after: Option<u64>,
        max: usize,
        timeout: Duration,
    ) -> Response {
        let notify = {
            let mut waiters = self.waiters.lock();
            waiters.entry(me).or_default().clone()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let response = loop {
            // Listen before looking, so an enqueue between the two is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.store.fetch(&me, after, max, MAX_FETCH_BYTES) {
                Ok((items, more))
                    if !items.is_empty() || tokio::time::Instant::now() >= deadline =>
                {
                    self.metrics.fetched.inc_by(items.len() as u64);
                    break Response::Items { items, more };
                }
                Ok(_) => {}
                Err(e) => break unavailable(e),
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        };
        drop(notify);
        let mut waiters = self.waiters.lock();
        // Forget the device once no request of its waits (then only the map holds it).
        if waiters.get(&me).is_some_and(|n| Arc::strong_count(n) == 1) {
            waiters.remove(&me);
        }
        response
    }

    fn wake(&self, device: DeviceId) {
        self.waiters.wake(device);
    }

    /// Deletes inbox items and history entries past their retention periods, and closed link
    /// slots; returns how many.
    pub async fn expire(&self, now: Timestamp) -> Result<u64, WriteError> {
        let before = Timestamp(now.0.saturating_sub(self.config.inbox.retention_days * DAY_MS));
        let inbox = match self.store.write(Write::Expire { before, max: 10_000 }).await? {
            Written::Removed(n) => n,
            _ => 0,
        };
        let days = self.config.history.retention_days;
        let before = Timestamp(now.0.saturating_sub(days.saturating_mul(DAY_MS)));
        let history = match self.store.write(Write::ExpireHistory { before, max: 10_000 }).await? {
            Written::Removed(n) => n,
            _ => 0,
        };
        let links = match self.store.write(Write::ExpireLinks { now }).await? {
            Written::Removed(n) => n,
            _ => 0,
        };
        Ok(inbox + history + links)
    }

    /// Forgets the rate-limit state of devices whose buckets are full again, so that the
    /// limiters hold only devices active lately (run with the hourly clean-up).
    pub fn forget_idle_limits(&self) {
        for limiter in
            [&self.senders, &self.claimers, &self.claimed, &self.submitters, &self.openers]
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        self.relays.retain_recent();
        self.relays.shrink_to_fit();
    }

    /// Refreshes the gauges that mirror the store and the ordering state.
    pub async fn refresh_gauges(&self) -> Result<(), StoreError> {
        let stats = self.store.stats()?;
        self.metrics.inbox_depth.set(i64::try_from(stats.inbox_items).unwrap_or(i64::MAX));
        self.metrics.devices.set(i64::try_from(stats.devices).unwrap_or(i64::MAX));
        let (mut channels, mut bytes) = self.ordering.size().await;
        for g in self.groups.all().await {
            let (c, b) = g.ordering.size().await;
            channels = channels.saturating_add(c);
            bytes = bytes.saturating_add(b);
        }
        self.metrics.ordered_channels.set(i64::try_from(channels).unwrap_or(i64::MAX));
        self.metrics.ordering_state_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        let queued = self.store.queued_total()?;
        self.metrics.forward_queue.set(i64::try_from(queued).unwrap_or(i64::MAX));
        Ok(())
    }
}

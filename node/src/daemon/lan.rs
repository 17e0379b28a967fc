//! Peers met directly, and relay-less channels (a LAN).
//!
//! - The **peer task** answers what peers ask on `/chitchat/peer/1` (`chitchat_proto::peer`),
//!   each peer within its rate, a few at once: this device's identity record, a fresh
//!   KeyPackage (a few a minute per peer), envelopes handed over (Welcomes, leave requests, and
//!   commits certified by their channel's creator: checked by the engine as inbox items are),
//!   and, for the relay-less channels this device is in, the commits and messages it keeps.
//! - **Relay-less channels** are ordered by their creator's device: it certifies its own
//!   commits ([`Engine::order_own`](crate::engine::Engine::order_own)) and hands each to the
//!   other members, and each Welcome to the device it adds, directly. Members that missed a
//!   commit or a message ask the members they are connected to, the creator first (every
//!   [`CATCH_UP_EVERY`]). Leaving hands the request to those who may remove the device; the
//!   creator moves the channel onto relays by an ordered commit.
//! - The **LAN task** publishes relay-less channels' messages by gossip (there is no relay to
//!   post them to): at once when sent, and again from the outbox until a peer of the channel
//!   was connected to take one.

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat_proto::codec::Bytes;
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::peer::{PeerRequest, PeerResponse};
use chitchat_proto::wire::{Envelope, ErrorCode, OrderedCommit, decode_frame, encode_frame};
use chitchat_proto::{DeviceId, Dir, PublicKey};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use libp2p::PeerId;
use tokio::sync::mpsc;

use super::{Node, NodeError, Submitted, now};
use crate::engine::{EngineError, Incoming, Need, Ordered};
use crate::host::{LanPeer, PeerAsk};
use crate::store::{IntentOp, StagedRecord};

/// How often a member of a relay-less channel asks its creator for commits it missed.
const CATCH_UP_EVERY: Duration = Duration::from_secs(5);
/// How often an undecided change of a relay-less channel is submitted again.
const RESUME_EVERY: Duration = Duration::from_secs(30);
/// How often the outbox of relay-less channels is published again.
const REPUBLISH_EVERY: Duration = Duration::from_secs(2);
/// KeyPackages one peer may claim a minute (each one is kept until used).
const KEY_PACKAGES_PER_MINUTE: u32 = 8;
/// KeyPackages all peers together may claim a minute (a peer id costs nothing to make, and each
/// KeyPackage's private part is kept until it is used).
const KEY_PACKAGES_PER_MINUTE_IN_ALL: u32 = 32;
/// Requests one peer may make a second, on average, and at once.
const PEER_REQUESTS_PER_SECOND: u32 = 20;
const PEER_REQUEST_BURST: u32 = 100;
/// Peer requests answered at once, at most (a `Deliver` may wait on record look-ups).
const PEER_CONCURRENCY: usize = 8;
/// How often peers whose limits are full again are forgotten.
const FORGET_IDLE_EVERY: Duration = Duration::from_secs(60);
/// Attempts to hand a commit or a Welcome to a member, a second apart.
const HAND_OVER_ATTEMPTS: u32 = 5;
/// History answers read from a member at a time (each at most `MAX_HISTORY`).
const MAX_HISTORY_ROUNDS: usize = 40;
/// Members of a relay-less channel asked at each catch-up, at most.
const CATCH_UP_PEERS: usize = 3;
/// History read positions remembered (channel and member), at most.
const MAX_READ_POSITIONS: usize = 4096;
/// How long a member who may remove this device has to take its leave request.
const LEAVE_PATIENCE: Duration = Duration::from_secs(10);
/// Look-ups of identity records one batch handed over may ask for.
const MAX_LOOKUPS: u32 = 4;

/// Rate limits on what peers ask: requests of every kind per peer, and KeyPackage claims per
/// peer and in all (a peer id costs nothing to make, and each KeyPackage's private part is kept
/// until it is used).
#[derive(Debug)]
struct Limits {
    requests: DefaultKeyedRateLimiter<PeerId>,
    claims: DefaultKeyedRateLimiter<PeerId>,
    all_claims: DefaultDirectRateLimiter,
}

impl Default for Limits {
    fn default() -> Self {
        let per_minute = |n: u32| Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        let requests =
            Quota::per_second(NonZeroU32::new(PEER_REQUESTS_PER_SECOND).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(PEER_REQUEST_BURST).unwrap_or(NonZeroU32::MIN));
        Self {
            requests: RateLimiter::keyed(requests),
            claims: RateLimiter::keyed(per_minute(KEY_PACKAGES_PER_MINUTE)),
            all_claims: RateLimiter::direct(per_minute(KEY_PACKAGES_PER_MINUTE_IN_ALL)),
        }
    }
}

/// Milliseconds until `not_until` (at least 1).
fn wait_ms(not_until: &governor::NotUntil<governor::clock::QuantaInstant>) -> u64 {
    use governor::clock::{Clock as _, DefaultClock};
    let wait = not_until.wait_time_from(DefaultClock::default().now());
    u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Limits {
    /// Counts a request by `peer`, or says how long (ms) until one is allowed.
    fn request(&self, peer: PeerId) -> Result<(), u64> {
        self.requests.check_key(&peer).map_err(|n| wait_ms(&n))
    }

    /// Counts a KeyPackage claim by `peer` (its own share first, so that a refused peer uses
    /// none of everyone's), or says how long (ms) until one is allowed.
    fn claim(&self, peer: PeerId) -> Result<(), u64> {
        self.claims.check_key(&peer).map_err(|n| wait_ms(&n))?;
        self.all_claims.check().map_err(|n| wait_ms(&n))
    }

    /// Forgets peers whose limits are back to full (the keyed limiters keep every key
    /// otherwise).
    fn forget_idle(&self) {
        self.requests.retain_recent();
        self.requests.shrink_to_fit();
        self.claims.retain_recent();
        self.claims.shrink_to_fit();
    }
}

fn peer_error(code: ErrorCode, message: impl Into<String>) -> PeerResponse {
    let mut message: String = message.into();
    message.truncate(1024);
    PeerResponse::Error { code, message }
}

/// The peer id of a device (its key).
pub(super) fn peer_of(device: &DeviceId) -> Result<PeerId, NodeError> {
    chitchat_net::peer_id(&device.0).map_err(|e| NodeError::Invalid(format!("device key: {e}")))
}

/// A device named as a 64-hex-digit device id or as its libp2p peer id.
pub fn parse_device(who: &str) -> Result<DeviceId, NodeError> {
    if let Some(key) = PublicKey::from_hex(who) {
        return Ok(DeviceId(key));
    }
    let peer: PeerId = who.parse().map_err(|_| {
        NodeError::Invalid(format!(
            "{who:?}: a relay-less channel's members are named by device id (64 hex digits) or \
             peer id (see `chitchat lan`)"
        ))
    })?;
    chitchat_net::public_key(&peer)
        .map(DeviceId)
        .ok_or_else(|| NodeError::Invalid(format!("{who:?} names no device key")))
}

impl Node {
    /// Answers peers' requests, [`PEER_CONCURRENCY`] at a time, each peer within its rate
    /// ([`PEER_REQUESTS_PER_SECOND`]): a request over it is answered `RateLimited` at once.
    pub(super) async fn peer_task(self: Arc<Self>, mut asks: mpsc::Receiver<PeerAsk>) {
        let limits = Arc::new(Limits::default());
        let busy = Arc::new(tokio::sync::Semaphore::new(PEER_CONCURRENCY));
        let mut forget = tokio::time::interval(FORGET_IDLE_EVERY);
        loop {
            let ask = tokio::select! {
                ask = asks.recv() => match ask {
                    Some(ask) => ask,
                    None => return,
                },
                _ = forget.tick() => {
                    limits.forget_idle();
                    continue;
                }
            };
            let Ok(permit) = busy.clone().acquire_owned().await else { return };
            let (node, limits) = (self.clone(), limits.clone());
            tokio::spawn(async move {
                let answer = match limits.request(ask.peer) {
                    Ok(()) => node.answer_peer(ask.peer, &ask.frame, &limits).await,
                    Err(retry_after_ms) => peer_error(
                        ErrorCode::RateLimited { retry_after_ms },
                        "too many requests from this peer",
                    ),
                };
                let frame = encode_frame(&answer).unwrap_or_else(|e| {
                    let answer =
                        peer_error(ErrorCode::Unavailable, format!("answer too large: {e}"));
                    encode_frame(&answer).unwrap_or_default()
                });
                // The host is gone only when the daemon stops.
                let _ = node.host.answer(ask.channel, frame).await;
                drop(permit);
            });
        }
    }

    async fn answer_peer(
        self: &Arc<Self>,
        peer: PeerId,
        frame: &[u8],
        limits: &Limits,
    ) -> PeerResponse {
        let request = match decode_frame::<PeerRequest>(frame) {
            Ok(r) => r,
            Err(e) => return peer_error(ErrorCode::BadRequest, e.to_string()),
        };
        let Some(asker) = chitchat_net::public_key(&peer).map(DeviceId) else {
            return peer_error(ErrorCode::Forbidden, "the peer id names no device key");
        };
        match request {
            PeerRequest::Hello => {
                let name = self.config.profile.name.clone();
                let dir = self.with(move |e| e.peer_record(&name, now())).await;
                PeerResponse::Hello { dir: Box::new(dir) }
            }
            PeerRequest::ClaimKeyPackage => {
                if let Err(retry_after_ms) = limits.claim(peer) {
                    return peer_error(
                        ErrorCode::RateLimited { retry_after_ms },
                        "too many KeyPackages claimed",
                    );
                }
                match self.with(|e| e.key_packages(1, false)).await {
                    Ok((mut packages, _)) => match packages.pop() {
                        Some(kp) => PeerResponse::KeyPackage(kp),
                        None => peer_error(ErrorCode::Unavailable, "no KeyPackage made"),
                    },
                    Err(e) => peer_error(ErrorCode::Unavailable, e.to_string()),
                }
            }
            PeerRequest::Deliver { envelopes, dirs } => {
                // Kept only if newer than what is known, and checked again on use.
                if let Err(e) = self.with(move |e| e.add_dirs(dirs)).await {
                    return peer_error(ErrorCode::Unavailable, e.to_string());
                }
                let items: Vec<Incoming> = envelopes.into_iter().map(Incoming::Direct).collect();
                match self.receive_direct(items).await {
                    Ok(removals) => {
                        // Members that asked to leave (a signed request handed over).
                        self.remove_on_request(removals);
                        PeerResponse::Delivered
                    }
                    Err(e) => peer_error(ErrorCode::Unavailable, e.to_string()),
                }
            }
            PeerRequest::Submit { channel, epoch, commit, dirs } => {
                if let Err(e) = self.with(move |e| e.add_dirs(dirs)).await {
                    return peer_error(ErrorCode::Unavailable, e.to_string());
                }
                let bytes = commit.0.clone();
                let at = now();
                let ordered = self
                    .with(move |e| e.order_submitted(&channel, epoch, &bytes, &asker, at))
                    .await;
                match ordered {
                    Ok(Ordered::Accepted(ordered)) => {
                        let cert = ordered.cert.clone();
                        // Merged here as any member's commit (the submitter hands it to the
                        // others, and each Welcome to its device).
                        let item = Incoming::Direct(Envelope::Commit(ordered));
                        if let Err(e) = self.receive_direct(vec![item]).await {
                            tracing::warn!(%channel, error = %e, "an ordered commit not merged here yet");
                        }
                        PeerResponse::Accepted { cert }
                    }
                    Ok(Ordered::Conflict(winner)) => PeerResponse::Conflict { winner },
                    Ok(Ordered::Busy) => peer_error(
                        ErrorCode::RateLimited { retry_after_ms: 1_000 },
                        "the creator is changing the channel",
                    ),
                    Err(EngineError::UnknownChannel(_)) => {
                        peer_error(ErrorCode::NotFound, "no such channel here")
                    }
                    Err(e) => peer_error(ErrorCode::BadRequest, e.to_string()),
                }
            }
            PeerRequest::History { channel, from } => {
                match self.with(move |e| e.lan_history_for(&channel, from, &asker)).await {
                    Ok((entries, next)) => PeerResponse::History { entries, next },
                    Err(EngineError::UnknownChannel(_)) => {
                        peer_error(ErrorCode::NotFound, "no such channel here")
                    }
                    Err(e) => peer_error(ErrorCode::Forbidden, e.to_string()),
                }
            }
            PeerRequest::Blobs => self.blob_addrs(),
            PeerRequest::Commits { channel, from } => {
                match self.with(move |e| e.ordered_for(&channel, from, &asker)).await {
                    Ok(commits) => PeerResponse::Commits { commits },
                    Err(EngineError::UnknownChannel(_)) => {
                        peer_error(ErrorCode::NotFound, "no such channel here")
                    }
                    Err(e) => peer_error(ErrorCode::Forbidden, e.to_string()),
                }
            }
        }
    }

    /// Asks a peer, and decodes its answer.
    pub(super) async fn ask_peer(
        &self,
        peer: PeerId,
        request: &PeerRequest,
    ) -> Result<PeerResponse, NodeError> {
        let frame = encode_frame(request).map_err(|e| NodeError::Invalid(e.to_string()))?;
        let answer = self
            .host
            .ask_peer(peer, frame)
            .await
            .map_err(|e| NodeError::Invalid(e.to_string()))?
            .map_err(|e| NodeError::NotFound(format!("peer {peer} not reached: {e}")))?;
        decode_frame::<PeerResponse>(&answer)
            .map_err(|e| NodeError::Invalid(format!("peer {peer} answered garbage: {e}")))
    }

    /// A device's identity record, from the device itself: it must be its own, self-signed,
    /// and not revoked.
    async fn hello(&self, device: DeviceId) -> Result<Dir, NodeError> {
        match self.ask_peer(peer_of(&device)?, &PeerRequest::Hello).await? {
            PeerResponse::Hello { dir } if dir.device() == device => {
                dir.verify_self(now())
                    .map_err(|e| NodeError::Invalid(format!("identity record rejected: {e}")))?;
                Ok(*dir)
            }
            PeerResponse::Hello { .. } => {
                Err(NodeError::Invalid("the peer answered with another device's record".into()))
            }
            other => Err(peer_refused(other)),
        }
    }

    /// The peers mDNS found, with the device and name each gives (asked at once; one that does
    /// not answer within 2 s shows without them).
    pub async fn lan(&self) -> Result<Vec<(LanPeer, Option<Dir>)>, NodeError> {
        let peers = self.host.lan().await.map_err(|e| NodeError::Invalid(e.to_string()))?;
        let asks = peers.into_iter().map(|p| async move {
            let device =
                p.peer_id.parse::<PeerId>().ok().and_then(|id| chitchat_net::public_key(&id));
            let dir = match device {
                Some(key) => {
                    tokio::time::timeout(Duration::from_secs(2), self.hello(DeviceId(key)))
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
                None => None,
            };
            (p, dir)
        });
        Ok(futures::future::join_all(asks).await)
    }

    /// Adds a device met directly (named by device or peer id) to a relay-less channel: its
    /// record and a KeyPackage from the device itself, then the ordering flow (the creator's
    /// device certifies), then the Welcome handed to it.
    pub(super) async fn lan_invite(
        &self,
        channel: ChannelId,
        who: &str,
    ) -> Result<Vec<DeviceId>, NodeError> {
        let device = parse_device(who)?;
        let (me, creator, open) =
            self.with(move |e| (e.device(), e.creator(&channel), e.is_open(&channel))).await;
        if creator != Some(me) && !open {
            return Err(NodeError::Invalid(
                "only the creator's device changes this relay-less channel (it is not --open): \
                 ask its creator to add members"
                    .into(),
            ));
        }
        let members: BTreeSet<DeviceId> =
            self.with(move |e| e.members(&channel)).await?.into_iter().collect();
        if members.contains(&device) {
            return Err(NodeError::Invalid(format!("{who} is a member already")));
        }
        let dir = self.hello(device).await?;
        let kp = match self.ask_peer(peer_of(&device)?, &PeerRequest::ClaimKeyPackage).await? {
            PeerResponse::KeyPackage(kp) => kp,
            other => return Err(peer_refused(other)),
        };
        self.change(channel, IntentOp::Add(vec![(dir, Bytes(kp.0))])).await?;
        Ok(vec![device])
    }

    /// Has this device's staged commit of a relay-less channel ordered (by itself, if it is
    /// the creator's; else by the creator, asked until it decides), merges it, and hands it to
    /// the members and its Welcomes to the devices it adds.
    pub(super) async fn submit_lan(
        &self,
        channel: ChannelId,
        staged: &StagedRecord,
    ) -> Result<Submitted, NodeError> {
        let before: Vec<DeviceId> = self.with(move |e| e.members(&channel)).await?;
        let (me, creator) = self.with(move |e| (e.device(), e.creator(&channel))).await;
        let ordered = if creator == Some(me) {
            let record = staged.clone();
            match self.with(move |e| e.order_own(&channel, &record)).await {
                Ok(o) => o,
                Err(e) => {
                    self.with(move |e| e.discard(&channel, true)).await?;
                    return Err(e.into());
                }
            }
        } else {
            let creator = creator.ok_or_else(|| NodeError::Invalid("no such channel".into()))?;
            match self.submit_to_creator(channel, creator, staged).await? {
                Ok(ordered) => ordered,
                Err(decided) => return Ok(decided),
            }
        };
        let cert = ordered.cert.clone();
        self.with(move |e| e.accept(&channel, &cert)).await?;
        self.epochs.notify_waiters();
        self.topics.notify_one();
        let me = self.with(|e| e.device()).await;
        let mut handovers: Vec<(DeviceId, Envelope, Vec<Dir>)> = before
            .into_iter()
            .filter(|d| *d != me)
            .map(|d| (d, Envelope::Commit(ordered.clone()), Vec::new()))
            .collect();
        // A Welcome comes with the members' records: some of them may be away.
        let dirs = self.with(move |e| e.member_dirs(&channel)).await;
        for sealed in staged.welcome.iter().flat_map(|w| w.envelopes.iter()) {
            handovers.push((sealed.recipient, Envelope::Sealed(sealed.clone()), dirs.clone()));
        }
        for (device, envelope, dirs) in handovers {
            let node = self.host.clone();
            tokio::spawn(async move { hand_over(&node, device, envelope, dirs).await });
        }
        Ok(Submitted::Accepted)
    }

    /// Submits a staged commit to the channel's creator until it decides: `Ok(Ok)` the ordered
    /// commit (to merge), `Ok(Err(Lost))` another won (the winner is merged, this one dropped),
    /// `Ok(Err(Undecided))` the creator did not answer in time (the commit stays staged and is
    /// submitted again later: it may have been ordered).
    async fn submit_to_creator(
        &self,
        channel: ChannelId,
        creator: DeviceId,
        staged: &StagedRecord,
    ) -> Result<Result<OrderedCommit, Submitted>, NodeError> {
        let peer = peer_of(&creator)?;
        let added: Vec<DeviceId> =
            staged.welcome.iter().flat_map(|w| w.envelopes.iter().map(|e| e.recipient)).collect();
        let dirs: Vec<Dir> =
            self.with(move |e| added.iter().filter_map(|d| e.dir(d).cloned()).collect()).await;
        let request = PeerRequest::Submit {
            channel,
            epoch: staged.epoch,
            commit: Bytes(staged.commit.clone()),
            dirs,
        };
        let deadline = Instant::now() + super::SUBMIT_PATIENCE;
        let mut pause = Duration::from_millis(250);
        while Instant::now() < deadline {
            match self.ask_peer(peer, &request).await {
                Ok(PeerResponse::Accepted { cert }) => {
                    let hash = chitchat_proto::wire::commit_hash(&staged.commit);
                    if cert.body.channel != channel
                        || cert.body.epoch != staged.epoch
                        || cert.body.hash != hash
                    {
                        return Err(NodeError::Invalid(
                            "the creator certified another commit".into(),
                        ));
                    }
                    let commit = staged.commit.clone();
                    return Ok(Ok(OrderedCommit { channel, commit, cert }));
                }
                Ok(PeerResponse::Conflict { winner }) => {
                    self.with(move |e| e.discard(&channel, false)).await?;
                    let item = Incoming::Direct(Envelope::Commit(winner));
                    self.receive_direct(vec![item]).await?;
                    return Ok(Err(Submitted::Lost));
                }
                Ok(PeerResponse::Error {
                    code: ErrorCode::RateLimited { retry_after_ms }, ..
                }) => {
                    tokio::time::sleep(Duration::from_millis(retry_after_ms.min(3_000))).await;
                }
                Ok(other) => {
                    self.with(move |e| e.discard(&channel, true)).await?;
                    return Err(peer_refused(other));
                }
                Err(e) => {
                    tracing::debug!(%channel, error = %e, "the creator was not reached; submitting again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(3));
                }
            }
        }
        Ok(Err(Submitted::Undecided))
    }

    /// Processes envelopes a peer handed over (or commits and messages fetched from members),
    /// looking up the identity records they need from the devices themselves (and from the
    /// relay, if registered). Returns the removals members asked for (leave requests).
    async fn receive_direct(
        &self,
        items: Vec<Incoming>,
    ) -> Result<Vec<(ChannelId, DeviceId)>, NodeError> {
        let items = Arc::new(items);
        let mut start = 0;
        let mut lookups = 0;
        let mut removals = Vec::new();
        loop {
            let batch = items.clone();
            let from = start.min(items.len());
            let at = now();
            let received = self.with(move |e| e.receive(&batch[from..], at)).await?;
            removals.extend(received.removals);
            match received.stopped {
                Some((index, need)) if lookups < MAX_LOOKUPS => {
                    lookups += 1;
                    start = from + index;
                    for device in need.devices.iter().take(chitchat_proto::wire::MAX_LOOKUP_DEVICES)
                    {
                        match self.hello(*device).await {
                            Ok(dir) => self.with(move |e| e.add_dirs(vec![dir])).await?,
                            Err(e) => {
                                tracing::debug!(%device, error = %e, "record not found at the peer")
                            }
                        }
                    }
                    if let Ok(link) = self.link() {
                        let _ = self.lookup_devices(&link, need).await;
                    }
                }
                Some((index, need)) => {
                    tracing::warn!(
                        ?need,
                        "identity records not found; an envelope a peer handed over is dropped"
                    );
                    start = from + index + 1;
                    lookups = 0;
                    if start >= items.len() {
                        break;
                    }
                }
                None => break,
            }
        }
        self.epochs.notify_waiters();
        self.topics.notify_one();
        Ok(removals)
    }

    /// Leaves a relay-less channel: the signed request to be removed is handed to the members
    /// who may remove this device (the creator's, or every member's of an `--open` channel),
    /// then the channel stops here. At least one of them must take it, or nothing changes. The
    /// creator's device, which orders the channel, cannot leave it while others are in it.
    pub(super) async fn leave_lan(&self, channel: ChannelId) -> Result<(), NodeError> {
        let _one_at_a_time = self.ordering.lock().await;
        let (me, creator, members) =
            self.with(move |e| (e.device(), e.creator(&channel), e.members(&channel))).await;
        if creator == Some(me) && members?.len() > 1 {
            return Err(NodeError::Invalid(
                "this device orders the relay-less channel it created: it cannot leave while \
                 others are in it (remove them first)"
                    .into(),
            ));
        }
        let at = now();
        let requests = self.with(move |e| e.leave_requests(&channel, at)).await?;
        let mut taken = 0;
        for sealed in &requests {
            let device = sealed.recipient;
            let envelopes = vec![Envelope::Sealed(sealed.clone())];
            let request = PeerRequest::Deliver { envelopes, dirs: Vec::new() };
            let answer = match peer_of(&device) {
                Ok(peer) => tokio::time::timeout(LEAVE_PATIENCE, self.ask_peer(peer, &request))
                    .await
                    .unwrap_or_else(|_| Err(NodeError::NotFound("no answer".into()))),
                Err(e) => Err(e),
            };
            match answer {
                Ok(PeerResponse::Delivered) => taken += 1,
                other => {
                    tracing::debug!(%channel, %device, answer = ?other, "leave request not taken")
                }
            }
        }
        if !requests.is_empty() && taken == 0 {
            return Err(NodeError::Link(crate::link::LinkError::Unreachable(
                "none of the members who may remove this device from the relay-less channel was \
                 reached (the creator's device, or any member of an --open channel): try again \
                 when one is online"
                    .into(),
            )));
        }
        self.with(move |e| e.leave(&channel)).await?;
        self.topics.notify_one();
        Ok(())
    }

    /// Moves a relay-less channel this device created onto relays: the members' records as
    /// their relays vouch for them (each device names its relay in its own record, and the
    /// relay gives the record it sponsors), the relay set (this device's relay and each
    /// member's), the state before recorded, the move ordered as every change of the channel
    /// (this device certifies it, the members get it directly), then the channel opened at the
    /// relay with the evidence. From the next epoch on the relays order it and deliver to the
    /// members' inboxes. Returns the relays' hosts.
    pub async fn move_onto_relays(&self, channel: ChannelId) -> Result<Vec<String>, NodeError> {
        let link = self.link()?;
        let at = now();
        let (unvouched, home) = self
            .with(move |e| {
                let home = e.account().map(|a| a.relay.id.host.clone());
                (e.unvouched_members(&channel, at), home)
            })
            .await;
        // Members of this device's relay first (they may be away), then at the relay each other
        // device names in its own record, as any look-up of records goes (`lookup_devices`).
        self.lookup_devices(&link, Need { devices: unvouched, relays: Vec::new() }).await?;
        let unvouched = self.with(move |e| e.unvouched_members(&channel, at)).await;
        let mut relays = Vec::new();
        for device in &unvouched {
            match self.hello(*device).await {
                Ok(dir) => relays.extend(
                    dir.body
                        .sponsorships
                        .first()
                        .map(|s| s.body.relay.clone())
                        .filter(|r| Some(&r.host) != home.as_ref() && !relays.contains(r)),
                ),
                // Away: the record this device holds may do.
                Err(e) => tracing::debug!(%device, error = %e, "a member's record not asked of it"),
            }
        }
        if !relays.is_empty() {
            self.lookup_devices(&link, Need { devices: unvouched, relays }).await?;
        }
        let relays = self.with(move |e| e.move_plan(&channel, at)).await?;
        self.with(move |e| e.record_move(&channel)).await?;
        self.change(channel, IntentOp::Relays(relays.clone())).await?;
        self.open_at_relay_again(&channel, true).await.map_err(|e| {
            NodeError::Invalid(format!(
                "the channel moved, but its relay did not open it yet ({e}); it is asked again \
                 with the next message or change"
            ))
        })?;
        Ok(relays.into_iter().map(|r| r.host).collect())
    }

    /// Relay-less channels' upkeep: interrupted membership changes finished at start, then
    /// their outbox published and missed commits fetched, periodically.
    pub(super) async fn lan_task(self: Arc<Self>) {
        self.resume_lan_intents().await;
        let mut republish = tokio::time::interval(REPUBLISH_EVERY);
        let mut catch_up = tokio::time::interval(CATCH_UP_EVERY);
        // How far each channel's history at each member was read in this run (from the oldest
        // kept at first: what was seen already is dropped by id, before decryption).
        let mut read: HashMap<(ChannelId, PeerId), u64> = HashMap::new();
        let mut resume = tokio::time::interval(RESUME_EVERY);
        resume.tick().await;
        loop {
            tokio::select! {
                _ = republish.tick() => self.publish_lan_outbox().await,
                _ = catch_up.tick() => self.catch_up_lan(&mut read).await,
                _ = resume.tick() => self.resume_lan_intents().await,
            }
        }
    }

    /// Finishes relay-less channels' membership changes that a crash or an absent creator
    /// interrupted: a staged commit is submitted as it is until it is decided (merged if it
    /// won), one that lost or was refused is dropped (the user asks again). A change under way
    /// (the ordering lock held) is left alone.
    async fn resume_lan_intents(&self) {
        let intents = match self.with(|e| e.intents()).await {
            Ok(i) => i,
            Err(e) => return tracing::error!(error = %e, "cannot read intents"),
        };
        for (channel, intent) in intents {
            if !self.with(move |e| e.is_relayless(&channel)).await {
                continue;
            }
            let Ok(_one_at_a_time) = self.ordering.try_lock() else { continue };
            let result = match &intent.staged {
                Some(staged) => self.submit_lan(channel, staged).await,
                None => Ok(Submitted::Lost),
            };
            match result {
                Ok(Submitted::Undecided) => continue,
                Err(e) => {
                    tracing::warn!(%channel, error = %e, "interrupted membership change failed")
                }
                Ok(_) => {}
            }
            if self.with(move |e| e.discard(&channel, true)).await.is_err() {
                tracing::warn!(%channel, "cannot drop an interrupted intent");
            }
        }
    }

    /// Publishes what waits in the outbox of relay-less channels; what no peer took stays.
    async fn publish_lan_outbox(&self) {
        let items = match self.with(|e| e.lan_outbox()).await {
            Ok(i) => i,
            Err(e) => return tracing::warn!(error = %e, "cannot read the outbox"),
        };
        let mut unreachable = BTreeSet::new();
        for (outbox_id, item) in items {
            if unreachable.contains(&item.channel) {
                continue;
            }
            let at = now();
            let sealed = self.with({
                let item = item.clone();
                move |e| e.lan_envelope(&item, at)
            });
            let envelope = match sealed.await {
                Ok(Some(envelope)) => envelope,
                Ok(None) => {
                    let _ = self.with(move |e| e.drop_outbox_item(outbox_id)).await;
                    continue;
                }
                Err(e) => return tracing::warn!(error = %e, "cannot read a message"),
            };
            let data = chitchat_proto::codec::encode(&envelope);
            match self.host.publish(item.channel, data).await {
                Ok(()) => {
                    if let Err(e) = self.with(move |e| e.lan_published(outbox_id, &item)).await {
                        tracing::warn!(error = %e, "cannot record a published message");
                    }
                }
                Err(e) => {
                    tracing::debug!(channel = %item.channel, error = %e, "not published yet");
                    unreachable.insert(item.channel);
                }
            }
        }
    }

    /// Asks the members of each relay-less channel that are connected (the creator's device
    /// first, at most [`CATCH_UP_PEERS`]) for the commits this device missed, then for the
    /// messages each kept since `read` (which went by gossip alone: a member that was away
    /// missed them). Every member keeps both, so any one of them will do.
    async fn catch_up_lan(&self, read: &mut HashMap<(ChannelId, PeerId), u64>) {
        type Lan = (ChannelId, DeviceId, u64, Vec<DeviceId>);
        let (me, channels): (DeviceId, Vec<Lan>) = self
            .with(|e| {
                let channels = e
                    .relayless_channels()
                    .into_iter()
                    .filter_map(|c| Some((c, e.creator(&c)?, e.epoch(&c)?, e.members(&c).ok()?)))
                    .collect();
                (e.device(), channels)
            })
            .await;
        if channels.is_empty() {
            return;
        }
        let connected: BTreeSet<String> = match self.host.peers().await {
            Ok(p) => p.into_iter().map(|p| p.peer_id).collect(),
            Err(_) => return,
        };
        if read.len() > MAX_READ_POSITIONS {
            // Positions are an optimisation: read again from the start, duplicates are dropped.
            read.clear();
        }
        for (channel, creator, epoch, members) in channels {
            let others =
                std::iter::once(creator).chain(members.into_iter().filter(|d| *d != creator));
            let peers: Vec<(DeviceId, PeerId)> = others
                .filter(|d| *d != me)
                .filter_map(|d| Some((d, peer_of(&d).ok()?)))
                .filter(|(_, p)| connected.contains(&p.to_string()))
                .take(CATCH_UP_PEERS)
                .collect();
            if creator != me {
                for (device, peer) in &peers {
                    // The creator has every commit: its answer settles it; a member may be
                    // behind too, and the next one is asked.
                    if self.lan_commits(channel, *peer, epoch).await || *device == creator {
                        break;
                    }
                }
            }
            for (_, peer) in peers {
                self.read_lan_history(channel, peer, read).await;
            }
        }
    }

    /// Asks a member of a relay-less channel for the commits built on `epoch` and after, and
    /// processes them; whether it gave any.
    async fn lan_commits(&self, channel: ChannelId, peer: PeerId, epoch: u64) -> bool {
        let request = PeerRequest::Commits { channel, from: epoch };
        let commits: Vec<OrderedCommit> = match self.ask_peer(peer, &request).await {
            Ok(PeerResponse::Commits { commits }) => commits,
            Ok(other) => {
                tracing::debug!(%channel, %peer, answer = ?other, "no commits from the member");
                return false;
            }
            Err(e) => {
                tracing::debug!(%channel, %peer, error = %e, "the member was not reached");
                return false;
            }
        };
        if commits.is_empty() {
            return false;
        }
        tracing::info!(%channel, %peer, from = epoch, n = commits.len(), "commits missed, from a member");
        let items = commits.into_iter().map(|c| Incoming::Direct(Envelope::Commit(c))).collect();
        if let Err(e) = self.receive_direct(items).await {
            tracing::warn!(%channel, error = %e, "commits from a member not processed");
        }
        true
    }

    /// Reads what a member kept of a relay-less channel from where this run left it, a bounded
    /// number of answers at a time.
    async fn read_lan_history(
        &self,
        channel: ChannelId,
        peer: PeerId,
        read: &mut HashMap<(ChannelId, PeerId), u64>,
    ) {
        for _ in 0..MAX_HISTORY_ROUNDS {
            let from = read.get(&(channel, peer)).copied().unwrap_or(0);
            let request = PeerRequest::History { channel, from };
            let (entries, next) = match self.ask_peer(peer, &request).await {
                Ok(PeerResponse::History { entries, next }) => (entries, next),
                Ok(other) => {
                    return tracing::debug!(%channel, %peer, answer = ?other, "no history from the member");
                }
                Err(e) => return tracing::debug!(%channel, error = %e, "history not reached"),
            };
            let full = entries.len() >= chitchat_proto::peer::MAX_HISTORY;
            let last = entries.iter().map(|(seq, _)| *seq).max();
            // Each post is a member's MLS message: MLS authenticates it, and one seen already
            // is dropped by its id.
            let posts: Vec<_> = entries
                .into_iter()
                .filter(|(seq, post)| *seq >= from && post.channel == channel)
                .map(|(_, post)| post)
                .collect();
            let posts = match self.with(move |e| e.lan_unkept(&channel, posts)).await {
                Ok(p) => p,
                Err(e) => return tracing::warn!(%channel, error = %e, "cannot read the history"),
            };
            let items: Vec<Incoming> =
                posts.into_iter().map(|post| Incoming::History(Envelope::Post(post))).collect();
            if !items.is_empty()
                && let Err(e) = self.receive_direct(items).await
            {
                return tracing::warn!(%channel, error = %e, "history from a member not processed");
            }
            let at = last.map_or(next, |l| l.saturating_add(1)).max(from);
            read.insert((channel, peer), at);
            if !full {
                return;
            }
        }
    }
}

/// Hands an envelope to a device directly, a few times a second apart; a member that never
/// takes a commit asks the creator for it later.
async fn hand_over(host: &crate::host::Host, device: DeviceId, envelope: Envelope, dirs: Vec<Dir>) {
    let Ok(peer) = peer_of(&device) else { return };
    let Ok(frame) = encode_frame(&PeerRequest::Deliver { envelopes: vec![envelope], dirs }) else {
        return;
    };
    for attempt in 1..=HAND_OVER_ATTEMPTS {
        match host.ask_peer(peer, frame.clone()).await {
            Ok(Ok(answer)) => match decode_frame::<PeerResponse>(&answer) {
                Ok(PeerResponse::Delivered) => return,
                other => tracing::debug!(%device, answer = ?other, "hand-over refused"),
            },
            Ok(Err(e)) => tracing::debug!(%device, attempt, error = %e, "hand-over failed"),
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::info!(%device, "a commit or Welcome was not handed over; the device may ask for it");
}

fn peer_refused(response: PeerResponse) -> NodeError {
    match response {
        PeerResponse::Error { code, message } => {
            NodeError::Relay { code: code.name(), message: format!("the peer refused: {message}") }
        }
        other => NodeError::Invalid(format!("the peer answered {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claims are limited per peer and in all (new peer ids cost nothing).
    #[test]
    fn key_package_claims_are_bounded_per_peer_and_in_all() {
        let limits = Limits::default();
        let one = PeerId::random();
        for _ in 0..KEY_PACKAGES_PER_MINUTE {
            assert!(limits.claim(one).is_ok());
        }
        assert!(limits.claim(one).is_err_and(|ms| ms > 0 && ms <= 60_000), "per peer");
        let mut allowed = KEY_PACKAGES_PER_MINUTE;
        for _ in 0..100 {
            if limits.claim(PeerId::random()).is_ok() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, KEY_PACKAGES_PER_MINUTE_IN_ALL, "in all, whatever the peer ids");
        limits.forget_idle();
        assert!(limits.claim(one).is_err(), "a peer still limited is not forgotten");
    }

    /// A peer that floods is refused past its burst, with a wait; others are not slowed.
    #[test]
    fn each_peer_has_a_request_rate() {
        let limits = Limits::default();
        let (flooder, other) = (PeerId::random(), PeerId::random());
        let allowed = (0..1_000).filter(|_| limits.request(flooder).is_ok()).count();
        // The burst, and what trickled back in while the loop ran.
        assert!((PEER_REQUEST_BURST as usize..PEER_REQUEST_BURST as usize + 5).contains(&allowed));
        assert!(limits.request(flooder).is_err_and(|ms| (1..=1_000 / 20 + 1).contains(&ms)));
        assert!(limits.request(other).is_ok(), "another peer is not slowed");
    }

    #[test]
    fn a_device_is_named_by_device_id_or_peer_id() {
        let key = chitchat_proto::SecretKey::from_seed([4; 32]);
        let device = DeviceId(key.public());
        assert_eq!(parse_device(&key.public().to_hex()).expect("hex"), device);
        let peer = chitchat_net::peer_id(&key.public()).expect("peer id");
        assert_eq!(parse_device(&peer.to_string()).expect("peer id"), device);
        assert!(parse_device("bob@relay.example").is_err());
        assert!(parse_device(&PeerId::random().to_string()).is_err(), "names no key");
    }
}

//! Federation: finding other relays by host name, talking to them over libp2p, and the durable
//! queues of payloads for their devices.
//!
//! Who talks to whom: [`Federation::call`] resolves a host (configured relays first, then its
//! `.well-known`, cached), and hands the request frame to the swarm task ([`crate::net`]), which
//! sends it on the federation protocol to the relay's peer id at its published addresses. An
//! inbound federation request names its host; [`Federation::verify_peer`] resolves that host
//! the same way and accepts the request only if the host publishes the key of the peer that
//! Noise authenticated. Blocked hosts are refused both ways before anything is sent or read.
//!
//! Forwarding: [`Request::Forward`](chitchat_proto::wire::Request::Forward) payloads are made
//! durable in the queue for their relay (`fed-queue-0`) before the device hears back; one
//! worker per destination relay sends the oldest of them in batches, removes what the other
//! relay stored (or refused for good), and backs off (jittered, at most 30 s) while it is away.
//! The other relay stores each `(origin, seq)` once, so a batch sent twice is stored once.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chitchat_proto::federation::{
    FedBody, FedRequest, FedResponse, ForwardResult, Forwarded, MAX_FORWARD_BATCH, is_loopback_host,
};
use chitchat_proto::wire::{self, ErrorCode, MAX_FRAME_LEN};
use chitchat_proto::{PublicKey, RelayId};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use libp2p::{Multiaddr, PeerId};
use rand::RngExt as _;
use tokio::sync::{mpsc, oneshot};

use crate::config::FederationConfig;
use crate::http::WellKnown;
use crate::metrics::Metrics;
use crate::store::{Store, Write, Written};

/// How long a resolved host is trusted before its `.well-known` is read again.
const RESOLVED_TTL: Duration = Duration::from_secs(3600);
/// How long a host that could not be resolved is not asked again.
const FAILED_TTL: Duration = Duration::from_secs(30);
/// Hosts remembered at once.
const MAX_CACHED: usize = 10_000;
/// The longest `.well-known` document read.
const MAX_WELL_KNOWN: u64 = 64 * 1024;
/// How long reading a `.well-known` may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request to another relay may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Addresses of one relay, at most.
const MAX_ADDRS: usize = 32;
/// `.well-known` reads for hosts not known yet, per minute and IP address of the peers that
/// name them (a peer could make this relay fetch any host's document).
const DISCOVERIES_PER_MINUTE_PER_IP: u32 = 60;
/// Bytes of queued payloads in one forward, at most (the frame adds a little per item).
const MAX_FORWARD_BYTES: usize = MAX_FRAME_LEN - 64 * 1024;
/// The longest back-off of a forwarding worker, in milliseconds.
const MAX_BACKOFF_MS: u64 = 30_000;

/// A request for the swarm task: send `frame` to `peer` on the federation protocol.
#[derive(Debug)]
pub struct Outbound {
    /// The other relay's peer id (its key).
    pub peer: PeerId,
    /// Where to dial it.
    pub addrs: Vec<Multiaddr>,
    /// The request frame.
    pub frame: Vec<u8>,
    /// The answer frame, or why there is none.
    pub reply: oneshot::Sender<Result<Vec<u8>, String>>,
}

/// Another relay, as resolved from its host.
#[derive(Clone, Debug)]
pub struct Remote {
    /// Its host and key.
    pub id: RelayId,
    /// Its libp2p peer id (from the key).
    pub peer_id: PeerId,
    /// Where to dial it.
    pub addrs: Vec<Multiaddr>,
}

/// Why a request to or from another relay failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FedError {
    /// The operator blocked the host.
    #[error("{0} is blocked by this relay")]
    Blocked(String),
    /// The host's `.well-known` could not be read or does not check out.
    #[error("could not find the relay {host}: {reason}")]
    Discovery {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
    /// A peer named a host that publishes another key than the peer's.
    #[error("the peer {peer} is not the relay {host}")]
    Impostor {
        /// The host it named.
        host: String,
        /// The peer.
        peer: String,
    },
    /// The relay did not answer.
    #[error("the relay {host} is unreachable: {reason}")]
    Unreachable {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
    /// The relay answered with an error.
    #[error("the relay {host} refused: {message}")]
    Refused {
        /// The host.
        host: String,
        /// Its code.
        code: ErrorCode,
        /// Its explanation.
        message: String,
    },
    /// The relay answered something that does not decode or does not fit the request.
    #[error("the relay {host} answered badly: {reason}")]
    BadAnswer {
        /// The host.
        host: String,
        /// What was wrong.
        reason: String,
    },
    /// Too many requests.
    #[error("too many requests from relays; retry later")]
    RateLimited {
        /// How long to wait, in milliseconds.
        retry_after_ms: u64,
    },
}

impl FedError {
    /// The error code a device (or the asking relay) is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Blocked(_) | Self::Impostor { .. } => ErrorCode::Forbidden,
            Self::Refused { code, .. } => *code,
            Self::RateLimited { retry_after_ms } => {
                ErrorCode::RateLimited { retry_after_ms: *retry_after_ms }
            }
            Self::Discovery { .. } | Self::Unreachable { .. } | Self::BadAnswer { .. } => {
                ErrorCode::Unavailable
            }
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Blocked(_) => "blocked",
            Self::Discovery { .. } => "discovery",
            Self::Impostor { .. } => "impostor",
            Self::Unreachable { .. } => "unreachable",
            Self::Refused { .. } => "refused",
            Self::BadAnswer { .. } => "bad_answer",
            Self::RateLimited { .. } => "rate_limited",
        }
    }
}

#[derive(Debug)]
enum Cached {
    Found(Arc<Remote>, Instant),
    Failed(String, Instant),
}

/// This relay's side of federation.
pub struct Federation {
    own: RelayId,
    config: FederationConfig,
    store: Store,
    metrics: Arc<Metrics>,
    outbound: mpsc::Sender<Outbound>,
    cache: Mutex<HashMap<String, Cached>>,
    /// The hosts a forwarding worker runs for.
    workers: Mutex<HashSet<String>>,
    discoveries: DefaultKeyedRateLimiter<IpAddr>,
    agent: ureq::Agent,
    /// How long queued payloads are kept, in milliseconds.
    retention_ms: u64,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation").field("own", &self.own).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The libp2p peer id of a relay key.
pub fn peer_id_of(key: &PublicKey) -> Result<PeerId, String> {
    let ed = libp2p::identity::ed25519::PublicKey::try_from_bytes(&key.0)
        .map_err(|e| format!("bad key: {e}"))?;
    Ok(libp2p::identity::PublicKey::from(ed).to_peer_id())
}

/// Checks a `.well-known` document read for `host`: it names the host, its key is a valid
/// key whose peer id is the one published, and it has 1 to 32 valid addresses.
pub fn check_well_known(host: &str, wk: &WellKnown) -> Result<Remote, String> {
    if wk.host != host {
        return Err(format!("it names another host ({:?})", wk.host));
    }
    let key = PublicKey::from_hex(&wk.key).ok_or("its key is not hex of 32 bytes")?;
    let peer_id = peer_id_of(&key)?;
    if wk.peer_id.parse::<PeerId>().ok() != Some(peer_id) {
        return Err(format!("its peer id {:?} is not its key's ({peer_id})", wk.peer_id));
    }
    remote(host, key, peer_id, &wk.addrs)
}

fn remote(host: &str, key: PublicKey, peer_id: PeerId, addrs: &[String]) -> Result<Remote, String> {
    if addrs.is_empty() || addrs.len() > MAX_ADDRS {
        return Err(format!("it has {} addresses (1 to {MAX_ADDRS} expected)", addrs.len()));
    }
    let addrs = addrs
        .iter()
        .map(|a| a.parse::<Multiaddr>().map_err(|e| format!("address {a:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Remote { id: RelayId { host: host.to_owned(), key }, peer_id, addrs })
}

impl Federation {
    /// Federation for the relay `own`; requests go out through `outbound` (to the swarm task).
    /// Queued payloads are kept `retention_days`.
    pub fn new(
        own: RelayId,
        config: FederationConfig,
        store: Store,
        metrics: Arc<Metrics>,
        outbound: mpsc::Sender<Outbound>,
        retention_days: u64,
    ) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(DISCOVERY_TIMEOUT))
            .max_redirects(0)
            .build()
            .into();
        let per_minute = NonZeroU32::new(DISCOVERIES_PER_MINUTE_PER_IP).unwrap_or(NonZeroU32::MIN);
        Self {
            own,
            config,
            store,
            metrics,
            outbound,
            cache: Mutex::new(HashMap::new()),
            workers: Mutex::new(HashSet::new()),
            discoveries: RateLimiter::keyed(Quota::per_minute(per_minute)),
            agent,
            retention_ms: retention_days.saturating_mul(24 * 3600 * 1000),
        }
    }

    /// This relay.
    pub fn own(&self) -> &RelayId {
        &self.own
    }

    fn blocked(&self, host: &str) -> Result<(), FedError> {
        match self.store.is_blocked(host) {
            Ok(false) => Ok(()),
            Ok(true) => Err(FedError::Blocked(host.to_owned())),
            Err(e) => Err(FedError::Unreachable {
                host: host.to_owned(),
                reason: format!("block list unreadable: {e}"),
            }),
        }
    }

    /// Whether `relay` is a relay this relay resolved (configured, or read from its
    /// `.well-known` within the last hour) under that host with that key.
    pub fn knows(&self, relay: &RelayId) -> bool {
        if let Some(p) = self.config.relays.iter().find(|r| r.host == relay.host) {
            return PublicKey::from_hex(&p.key) == Some(relay.key);
        }
        matches!(
            lock(&self.cache).get(&relay.host),
            Some(Cached::Found(r, at)) if at.elapsed() < RESOLVED_TTL && r.id == *relay
        )
    }

    /// The relay at `host`: configured, cached, or read from its `.well-known`.
    pub async fn resolve(&self, host: &str) -> Result<Arc<Remote>, FedError> {
        self.blocked(host)?;
        let discovery = |reason: String| FedError::Discovery { host: host.to_owned(), reason };
        if let Some(pinned) = self.config.relays.iter().find(|r| r.host == host) {
            let key =
                PublicKey::from_hex(&pinned.key).ok_or_else(|| discovery("bad key".into()))?;
            let peer_id = peer_id_of(&key).map_err(discovery)?;
            return remote(host, key, peer_id, &pinned.addrs).map(Arc::new).map_err(discovery);
        }
        if let Some(cached) = lock(&self.cache).get(host) {
            match cached {
                Cached::Found(r, at) if at.elapsed() < RESOLVED_TTL => return Ok(r.clone()),
                Cached::Failed(reason, at) if at.elapsed() < FAILED_TTL => {
                    return Err(discovery(reason.clone()));
                }
                _ => {}
            }
        }
        let result = self.fetch_well_known(host).await;
        let mut cache = lock(&self.cache);
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| match c {
                Cached::Found(_, at) => at.elapsed() < RESOLVED_TTL,
                Cached::Failed(_, at) => at.elapsed() < FAILED_TTL,
            });
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        match result {
            Ok(r) => {
                let r = Arc::new(r);
                cache.insert(host.to_owned(), Cached::Found(r.clone(), Instant::now()));
                Ok(r)
            }
            Err(reason) => {
                tracing::warn!(%host, %reason, "relay not found");
                cache.insert(host.to_owned(), Cached::Failed(reason.clone(), Instant::now()));
                Err(discovery(reason))
            }
        }
    }

    async fn fetch_well_known(&self, host: &str) -> Result<Remote, String> {
        chitchat_proto::identity::check_host(host).map_err(|e| e.to_string())?;
        let scheme =
            if self.config.allow_http || is_loopback_host(host) { "http" } else { "https" };
        let url = format!("{scheme}://{host}/.well-known/chitchat/relay");
        let agent = self.agent.clone();
        let wk = tokio::task::spawn_blocking(move || -> Result<WellKnown, String> {
            let mut response = agent.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
            response
                .body_mut()
                .with_config()
                .limit(MAX_WELL_KNOWN)
                .read_json::<WellKnown>()
                .map_err(|e| format!("{url}: {e}"))
        })
        .await
        .map_err(|e| format!("discovery task failed: {e}"))??;
        check_well_known(host, &wk)
    }

    /// Checks that `host` is the relay whose key Noise authenticated as `peer`; `ip` is the
    /// peer's address, which pays for reading a `.well-known` not read lately.
    pub async fn verify_peer(
        &self,
        host: &str,
        peer: PeerId,
        ip: Option<IpAddr>,
    ) -> Result<RelayId, FedError> {
        self.blocked(host)?;
        let known = matches!(
            lock(&self.cache).get(host),
            Some(Cached::Found(_, at)) if at.elapsed() < RESOLVED_TTL
        ) || self.config.relays.iter().any(|r| r.host == host);
        if !known
            && let Some(ip) = ip
            && let Err(retry_after_ms) = crate::service::check_rate(&self.discoveries, ip)
        {
            return Err(FedError::RateLimited { retry_after_ms });
        }
        let remote = self.resolve(host).await?;
        if remote.peer_id != peer {
            return Err(FedError::Impostor { host: host.to_owned(), peer: peer.to_string() });
        }
        Ok(remote.id.clone())
    }

    /// Sends `body` to the relay at `host` and returns it with the answer. An error answer is
    /// [`FedError::Refused`].
    pub async fn call(
        &self,
        host: &str,
        body: FedBody,
    ) -> Result<(Arc<Remote>, FedResponse), FedError> {
        let result = self.call_inner(host, body).await;
        if let Err(e) = &result {
            self.metrics.federation_failure(e.reason());
        }
        result
    }

    async fn call_inner(
        &self,
        host: &str,
        body: FedBody,
    ) -> Result<(Arc<Remote>, FedResponse), FedError> {
        let remote = self.resolve(host).await?;
        let unreachable = |reason: String| FedError::Unreachable { host: host.to_owned(), reason };
        let request = FedRequest { from: self.own.host.clone(), body };
        let frame = wire::encode_frame(&request).map_err(|e| FedError::BadAnswer {
            host: host.to_owned(),
            reason: format!("request does not fit a frame: {e}"),
        })?;
        let (reply, answer) = oneshot::channel();
        let out = Outbound { peer: remote.peer_id, addrs: remote.addrs.clone(), frame, reply };
        self.outbound.send(out).await.map_err(|_| unreachable("shutting down".into()))?;
        let bytes = tokio::time::timeout(CALL_TIMEOUT, answer)
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|_| unreachable("shutting down".into()))?
            .map_err(unreachable)?;
        let response = wire::decode_frame::<FedResponse>(&bytes)
            .map_err(|e| FedError::BadAnswer { host: host.to_owned(), reason: e.to_string() })?;
        if let FedResponse::Error { code, message } = response {
            return Err(FedError::Refused { host: host.to_owned(), code, message });
        }
        Ok((remote, response))
    }

    /// Makes sure a worker forwards what is queued for `host` (a running worker reads the
    /// queue again before it leaves, so it sees what was queued before this call).
    pub fn kick(self: &Arc<Self>, host: &str) {
        if lock(&self.workers).insert(host.to_owned()) {
            tokio::spawn(self.clone().forward(host.to_owned()));
        }
    }

    /// Starts a worker for every relay with payloads queued (at start).
    pub fn resume(self: &Arc<Self>) -> Result<(), crate::store::StoreError> {
        for host in self.store.queued_hosts()? {
            self.kick(&host);
        }
        Ok(())
    }

    /// The worker for `host`: forwards its queue oldest first until it is empty.
    async fn forward(self: Arc<Self>, host: String) {
        let mut failures = 0u32;
        loop {
            let batch = match self.store.queued(&host, MAX_FORWARD_BATCH, MAX_FORWARD_BYTES) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(%host, error = %e, "forward queue unreadable");
                    Vec::new()
                }
            };
            if batch.is_empty() {
                // Leave only if nothing was queued meanwhile: `kick` holds the same lock.
                let mut workers = lock(&self.workers);
                if self.store.queued(&host, 1, MAX_FORWARD_BYTES).is_ok_and(|b| b.is_empty()) {
                    workers.remove(&host);
                    return;
                }
                drop(workers);
                continue;
            }
            let seqs: Vec<u64> = batch.iter().map(|(seq, _)| *seq).collect();
            let items = batch
                .into_iter()
                .map(|(seq, q)| Forwarded { seq, sender: q.sender, envelope: q.envelope })
                .collect();
            match self.call(&host, FedBody::Forward { items }).await {
                Ok((_, FedResponse::Forwarded(results))) if results.len() == seqs.len() => {
                    let mut done = Vec::new();
                    let mut retry = false;
                    for (seq, result) in seqs.iter().zip(results) {
                        match result {
                            ForwardResult::Stored => {
                                self.metrics.forwarded.inc();
                                done.push(*seq);
                            }
                            ForwardResult::Refused(code) if code.is_retryable() => retry = true,
                            ForwardResult::Refused(code) => {
                                tracing::warn!(%host, seq, code = code.name(),
                                    "a forwarded payload was refused for good; dropped");
                                self.metrics.forward_dropped.inc();
                                done.push(*seq);
                            }
                        }
                    }
                    if let Err(e) =
                        self.store.write(Write::Unqueue { host: host.clone(), seqs: done }).await
                    {
                        tracing::error!(%host, error = %e, "could not remove forwarded payloads");
                        retry = true;
                    }
                    if retry {
                        failures = failures.saturating_add(1);
                        backoff(failures).await;
                    } else {
                        failures = 0;
                    }
                }
                Ok((_, other)) => {
                    tracing::warn!(%host, answer = ?other, "unexpected answer to a forward");
                    failures = failures.saturating_add(1);
                    backoff(failures).await;
                }
                Err(e) => {
                    tracing::debug!(%host, error = %e, "forward failed; retrying later");
                    failures = failures.saturating_add(1);
                    backoff(failures).await;
                }
            }
        }
    }

    /// Deletes queued payloads older than the retention period and old memory of forwarded
    /// payloads; returns how many payloads were dropped.
    pub async fn expire(
        &self,
        now: chitchat_proto::Timestamp,
    ) -> Result<u64, crate::store::WriteError> {
        let before = chitchat_proto::Timestamp(now.0.saturating_sub(self.retention_ms));
        match self.store.write(Write::ExpireFederation { before, max: 10_000 }).await? {
            Written::Removed(n) => {
                self.metrics.forward_dropped.inc_by(n);
                Ok(n)
            }
            _ => Ok(0),
        }
    }
}

pub(crate) async fn backoff(failures: u32) {
    let base = (250u64 << failures.min(8)).min(MAX_BACKOFF_MS);
    let jitter = rand::rng().random_range(0..=base / 2);
    tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
}

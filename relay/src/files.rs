//! Files' blobs pinned here (section 8 of the design): a member's device pushes the sealed blob
//! of a file it is about to send (`PinFile`, then an iroh-blobs push, then `PinFile` again),
//! and the relay keeps it for the channel's members until it expires (`[files] expiry_days`),
//! within a per-user quota and a size limit. The relay cannot open a blob: it holds
//! ciphertext, addressed by its hash.
//!
//! A push is taken only when asked for: `PinFile` records which device may push which hash
//! (for an hour, at most [`MAX_WANTED`] at once), and the blob store's push hook checks the
//! endpoint id the connection proved against it. The pin itself is written (fsync'd) only once
//! the whole blob is here with the length announced, and only then is the device told.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitchat_blobs::{BlobError, Blobs, Provider};
use chitchat_proto::federation::{FedBody, FedResponse};
use chitchat_proto::wire::ErrorCode;
use chitchat_proto::{DeviceId, SecretKey};
use iroh_blobs::Hash;
use tokio::sync::Semaphore;

use crate::federation::{FedError, Federation};
use crate::metrics::Metrics;
use crate::store::{FilePin, Store, Write, Written};

/// Pushes asked for and not yet pinned, at most.
pub const MAX_WANTED: usize = 4096;
/// How long a device may push a blob it asked to pin.
pub const WANTED_FOR: Duration = Duration::from_secs(3600);
/// Blobs being replicated here from other relays at once, at most (more are refused, and
/// asked for again by the other relay).
pub const MAX_REPLICATING: usize = 1024;
/// Replication fetches running at once (the others wait their turn).
const REPLICATION_FETCHES: usize = 2;
/// Notices to other relays (`ReplicateFile`) being sent or retried at once, at most; past it a
/// notice is dropped (the members there still fetch from the sender's device).
const MAX_NOTICES: usize = 1024;
/// Attempts of one notice, backing off (jittered, at most 30 s) between them.
const NOTICE_ATTEMPTS: u32 = 12;
/// Parts of blobs read or written for devices' links at once (about 600 KiB each), at most;
/// past it a device is told to retry.
pub const PARTS_AT_ONCE: usize = 16;
/// Parts one device has read or written at once, at most.
pub const PARTS_PER_DEVICE: usize = 4;

/// The relay's blob store, the pushes it waits for, and its replications.
#[derive(Debug)]
pub struct RelayFiles {
    blobs: Blobs,
    /// Where others reach the blob endpoint, if set by the operator.
    advertise: Vec<SocketAddr>,
    wanted: Arc<Mutex<HashMap<(DeviceId, Hash), Instant>>>,
    /// Blobs being fetched from another relay.
    replicating: Mutex<HashSet<Hash>>,
    /// Turns of the replication fetches.
    fetches: Semaphore,
    /// Room for notices to other relays.
    notices: Arc<Semaphore>,
    /// Room for parts over devices' links, and each device's parts in progress.
    parts: Semaphore,
    parts_by: Mutex<HashMap<DeviceId, usize>>,
}

/// A turn to read or write one part for a device's link: its room is given back on drop.
#[derive(Debug)]
pub struct PartTurn<'a> {
    files: &'a RelayFiles,
    device: DeviceId,
    _room: tokio::sync::SemaphorePermit<'a>,
}

impl Drop for PartTurn<'_> {
    fn drop(&mut self) {
        if let Ok(mut by) = self.files.parts_by.lock()
            && let Some(n) = by.get_mut(&self.device)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by.remove(&self.device);
            }
        }
    }
}

/// A blob another relay of its channel pinned, to fetch from it and pin here.
#[derive(Clone, Debug)]
pub struct Replica {
    /// The other relay's blob endpoint.
    pub provider: Provider,
    /// The blob.
    pub hash: Hash,
    /// The pin to write once it is here whole (its `user` names the other relay).
    pub pin: FilePin,
    /// The bytes the other relay may have replicated here.
    pub quota: u64,
}

impl RelayFiles {
    /// Opens the store in `dir`, its endpoint under the relay's key, bound to `bind`, and
    /// told to others as reachable at `advertise` (if empty: the addresses it is bound to, or
    /// its interfaces' for an unspecified address). It serves the blobs pinned in `store`.
    pub async fn open(
        dir: &Path,
        key: &SecretKey,
        bind: &[SocketAddr],
        advertise: Vec<SocketAddr>,
        store: Store,
    ) -> Result<Self, BlobError> {
        let wanted: Arc<Mutex<HashMap<(DeviceId, Hash), Instant>>> = Arc::default();
        let accept = {
            let wanted = wanted.clone();
            move |pusher: iroh::EndpointId, hash: Hash| {
                let device = DeviceId(chitchat_proto::PublicKey(*pusher.as_bytes()));
                wanted.lock().is_ok_and(|w| {
                    w.get(&(device, hash)).is_some_and(|until| *until > Instant::now())
                })
            }
        };
        // Only what is pinned, until it expires: an unpinned blob's data stays until garbage
        // collection, and must not be served meanwhile.
        let serve = move |hash: Hash| {
            store.serves_file(hash.as_bytes(), crate::service::now()).unwrap_or(false)
        };
        let blobs = Blobs::open_accepting(dir, key, bind, accept, serve).await?;
        Ok(Self {
            blobs,
            advertise,
            wanted,
            replicating: Mutex::default(),
            fetches: Semaphore::new(REPLICATION_FETCHES),
            notices: Arc::new(Semaphore::new(MAX_NOTICES)),
            parts: Semaphore::new(PARTS_AT_ONCE),
            parts_by: Mutex::default(),
        })
    }

    /// The blob store.
    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// Where others reach the blob endpoint (at most
    /// [`MAX_BLOB_ADDRS`](chitchat_proto::wire::MAX_BLOB_ADDRS)).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = if self.advertise.is_empty() {
            self.blobs.provider().addrs
        } else {
            self.advertise.clone()
        };
        addrs.truncate(chitchat_proto::wire::MAX_BLOB_ADDRS);
        addrs
    }

    /// Lets `device` push `hash` for the next hour; `false` if too many pushes are waiting.
    pub fn want(&self, device: DeviceId, hash: Hash) -> bool {
        let Ok(mut wanted) = self.wanted.lock() else { return false };
        let now = Instant::now();
        wanted.retain(|_, until| *until > now);
        if wanted.len() >= MAX_WANTED && !wanted.contains_key(&(device, hash)) {
            return false;
        }
        wanted.insert((device, hash), now + WANTED_FOR);
        true
    }

    /// The push of `hash` by `device` is done with (pinned, or refused).
    pub fn done(&self, device: DeviceId, hash: Hash) {
        if let Ok(mut wanted) = self.wanted.lock() {
            wanted.remove(&(device, hash));
        }
    }

    /// A turn to read or write a part for `device`, unless too many are in progress (here, or
    /// for that device).
    pub fn part_turn(&self, device: DeviceId) -> Option<PartTurn<'_>> {
        let room = self.parts.try_acquire().ok()?;
        let mut by = self.parts_by.lock().ok()?;
        let mine = by.entry(device).or_default();
        if *mine >= PARTS_PER_DEVICE {
            return None;
        }
        *mine += 1;
        Some(PartTurn { files: self, device, _room: room })
    }

    /// Whether `device` may push `hash` now (it asked to pin it, within the hour).
    pub fn may_push(&self, device: DeviceId, hash: Hash) -> bool {
        let now = Instant::now();
        self.wanted.lock().is_ok_and(|w| w.get(&(device, hash)).is_some_and(|until| *until > now))
    }

    /// Whether any device may still push `hash`.
    pub fn is_wanted(&self, hash: Hash) -> bool {
        let now = Instant::now();
        self.wanted.lock().is_ok_and(|w| w.iter().any(|((_, h), until)| *h == hash && *until > now))
    }

    /// Starts fetching a blob another relay pinned, to pin it here once it is whole; `false`
    /// if too many are being fetched. A blob being fetched already is not fetched twice.
    pub fn replicate(self: &Arc<Self>, store: Store, metrics: Arc<Metrics>, r: Replica) -> bool {
        {
            let Ok(mut replicating) = self.replicating.lock() else { return false };
            if replicating.contains(&r.hash) {
                return true;
            }
            if replicating.len() >= MAX_REPLICATING {
                return false;
            }
            replicating.insert(r.hash);
        }
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.fetch_replica(&store, &r).await;
            if let Ok(mut replicating) = this.replicating.lock() {
                replicating.remove(&r.hash);
            }
            match result {
                Ok(()) => {
                    metrics.files_replicated.inc();
                }
                Err(e) => {
                    metrics.file_replication_failures.inc();
                    tracing::warn!(hash = %r.hash, from = %r.pin.user, error = %e, "replication failed");
                    // Nothing of it is kept unless it is pinned, or a device may push it.
                    let pinned = matches!(store.file_pin(r.hash.as_bytes()), Ok(Some(_)));
                    if !pinned && !this.is_wanted(r.hash) {
                        let _ = this.blobs.forget(r.hash).await;
                    }
                }
            }
        });
        true
    }

    async fn fetch_replica(&self, store: &Store, r: &Replica) -> Result<(), String> {
        let _turn = self.fetches.acquire().await.map_err(|e| e.to_string())?;
        let len = r.pin.len;
        self.blobs
            .fetch_any(std::slice::from_ref(&r.provider), r.hash, len, |_| ())
            .await
            .map_err(|e| e.to_string())?;
        let have = self.blobs.local_bytes(r.hash).await.map_err(|e| e.to_string())?;
        if have != len {
            return Err(format!("the blob has {have} bytes, not the {len} announced"));
        }
        let write = Write::PinFile { hash: *r.hash.as_bytes(), pin: r.pin.clone(), quota: r.quota };
        match store.write(write).await {
            Ok(Written::Pinned(_)) => self.blobs.sync().await.map_err(|e| e.to_string()),
            Ok(other) => Err(format!("unexpected {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Tells each of `hosts` (the channel's other relays) to replicate a blob pinned here,
    /// in the background, retrying while a relay is away or not ready (at most
    /// [`NOTICE_ATTEMPTS`] times). A notice past [`MAX_NOTICES`] is dropped, logged.
    pub fn notify(&self, federation: &Arc<Federation>, hosts: Vec<String>, body: FedBody) {
        for host in hosts {
            let Ok(room) = self.notices.clone().try_acquire_owned() else {
                tracing::warn!(%host, "too many replication notices; one dropped");
                continue;
            };
            let (federation, body) = (federation.clone(), body.clone());
            tokio::spawn(async move {
                let _room = room;
                for attempt in 0..NOTICE_ATTEMPTS {
                    match federation.call(&host, body.clone()).await {
                        Ok((_, FedResponse::Replicating)) => return,
                        Ok((_, other)) => {
                            tracing::warn!(%host, answer = ?other, "unexpected answer to a replication notice");
                            return;
                        }
                        Err(FedError::Refused { code, message, .. }) if !retry_notice(code) => {
                            tracing::info!(%host, %message, "replication refused");
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(%host, error = %e, attempt, "replication notice failed");
                            crate::federation::backoff(attempt + 2).await;
                        }
                    }
                }
                tracing::warn!(%host, "replication notice given up");
            });
        }
    }
}

/// Whether a refused replication notice is worth sending again: the other relay is busy, or
/// does not know the channel yet.
fn retry_notice(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::Unavailable | ErrorCode::RateLimited { .. } | ErrorCode::NotFound)
}

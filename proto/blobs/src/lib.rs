//! Blobs over iroh: how files travel (section 8 of the design). One iroh endpoint and one
//! iroh-blobs store per node and per relay; nothing else builds an iroh endpoint.
//!
//! - **Offline by construction.** The endpoint uses no iroh relay, no address look-up service
//!   (pkarr, DNS), no port mapping and no reachability probes; it binds only the addresses given.
//!   A provider is always named with its addresses ([`Provider`]); nothing is looked up.
//! - **One key.** The endpoint's key is the device's (or relay's) own ed25519 key, so a
//!   provider's endpoint id is its device id, and a connection proves it.
//! - **Verified, resumable.** A blob is addressed by its BLAKE3 hash; iroh-blobs verifies every
//!   16 KiB group against it as it streams in (a provider that sends other bytes is cut off at
//!   the first bad group), and keeps what was verified: a fetch that stops half-way goes on from
//!   there, from the same provider or another ([`Blobs::fetch_any`]).
//! - **Kept by name.** Every blob this store keeps has a tag (`file/<hash>`), set before a fetch
//!   starts (so that what came in stays for the next try): iroh-blobs' garbage collection,
//!   every [`GC_INTERVAL`], deletes only what no tag names, and [`Blobs::forget`] drops the tag.
//!
//! What a blob holds is the caller's: ChitChat stores files sealed (`chitchat_proto::file`).

use std::net::SocketAddr;
use std::path::Path;

use chitchat_proto::SecretKey;
use iroh::endpoint::{NetReportConfig, PortmapperConfig, RelayMode, presets};
use iroh::protocol::Router;
use iroh::{Endpoint, EndpointAddr, EndpointId, TransportAddr};
use iroh_blobs::api::Tag;
use iroh_blobs::protocol::ChunkRanges;
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::{BlobsProtocol, Hash};

pub use iroh_blobs::ALPN as BLOBS_ALPN;

/// How long a push waits for its receiver to take more of the blob before it gives up (a
/// receiver that refuses a push never says so).
pub const PUSH_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// How often blobs no tag names are deleted.
pub const GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The cache's tags: `cache/{used_ms:020}/{hash}/{len}`, a blob's last use in its name (so the
/// tags table lists the least recently used first).
const CACHE_PREFIX: &str = "cache/";
/// The cache's index by blob: `cached/{hash}/{used_ms:020}/{len}` beside each cache tag, so
/// that a blob's cache tag is found without listing the cache.
const CACHED_PREFIX: &str = "cached/";

/// A cached blob's two tag names: in the cache's order, and in its index by blob.
fn cache_names(hash: Hash, used_ms: u64, len: u64) -> (String, String) {
    (
        format!("{CACHE_PREFIX}{used_ms:020}/{hash}/{len}"),
        format!("{CACHED_PREFIX}{hash}/{used_ms:020}/{len}"),
    )
}

/// The last use in a cache name (`cache/{used_ms}/{hash}/{len}`).
fn cache_used(name: &[u8]) -> Option<u64> {
    std::str::from_utf8(name).ok()?.strip_prefix(CACHE_PREFIX)?.split('/').next()?.parse().ok()
}

/// The last use and length in an index name (`cached/{hash}/{used_ms}/{len}`).
fn parse_cached(name: &[u8]) -> Option<(u64, u64)> {
    let name = std::str::from_utf8(name).ok()?;
    let mut parts = name.rsplit('/');
    let len = parts.next()?.parse().ok()?;
    let used = parts.next()?.parse().ok()?;
    Some((used, len))
}

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The endpoint could not bind.
    #[error("iroh endpoint: {0}")]
    Bind(String),
    /// The store could not be opened or answered an error.
    #[error("blob store: {0}")]
    Store(String),
    /// A provider could not be reached.
    #[error("provider {0} not reached: {1}")]
    Connect(String, String),
    /// A provider's transfer failed (it lacks the blob, sent bytes that are not it, or stopped).
    #[error("fetch from {0} failed: {1}")]
    Fetch(String, String),
    /// No provider had it.
    #[error("no provider gave the blob ({0} tried)")]
    NoProvider(usize),
    /// The blob is longer than the fetch allowed (its hash fixes its length, so every
    /// provider would give as much): the fetch stopped there.
    #[error("the blob is over the {0} bytes it was said to have")]
    TooLarge(u64),
}

/// Chunks (1 KiB) in a part of a blob that travels over a link that is not iroh, at most.
pub const PART_CHUNKS: u64 = chitchat_proto::wire::MAX_PART_CHUNKS as u64;
/// Parts start at a multiple of this many chunks (iroh-blobs' 16 KiB groups).
pub const GROUP_CHUNKS: u64 = chitchat_proto::wire::PART_GROUP_CHUNKS;
/// An encoded part's length, at most: its data, the tree's nodes that prove it and its length.
pub const MAX_PART_LEN: usize = chitchat_proto::wire::MAX_PART_LEN;

/// The chunk ranges of a part, checked.
fn part_ranges(first: u64, chunks: u64) -> Result<ChunkRanges, BlobError> {
    if !first.is_multiple_of(GROUP_CHUNKS) || chunks == 0 || chunks > PART_CHUNKS {
        return Err(BlobError::Fetch(
            "a part".into(),
            format!(
                "a part starts at a multiple of {GROUP_CHUNKS} chunks and has 1 to {PART_CHUNKS}"
            ),
        ));
    }
    let end = first
        .checked_add(chunks)
        .ok_or_else(|| BlobError::Fetch("a part".into(), "past any blob".into()))?;
    Ok(ChunkRanges::from(bao_tree::ChunkNum(first)..bao_tree::ChunkNum(end)))
}

/// Parses the addresses an endpoint binds (`IP:PORT`, 1 to 8 of them), as a config gives them.
pub fn parse_bind(addrs: &[String]) -> Result<Vec<SocketAddr>, String> {
    if addrs.is_empty() || addrs.len() > 8 {
        return Err("1 to 8 addresses".into());
    }
    addrs.iter().map(|a| a.parse().map_err(|e| format!("{a:?}: {e}"))).collect()
}

/// Someone to fetch a blob from: its endpoint id (a device or relay key) and the addresses it
/// listens on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provider {
    /// The provider's endpoint id.
    pub id: EndpointId,
    /// Where it listens.
    pub addrs: Vec<SocketAddr>,
}

impl Provider {
    fn endpoint_addr(&self) -> EndpointAddr {
        EndpointAddr::from_parts(self.id, self.addrs.iter().copied().map(TransportAddr::Ip))
    }
}

/// The iroh endpoint id of a ChitChat key (a device's or a relay's).
pub fn endpoint_id(key: &chitchat_proto::PublicKey) -> Option<EndpointId> {
    EndpointId::from_bytes(&key.0).ok()
}

/// One endpoint and its blob store, serving what the store holds to whoever asks by hash (or
/// a store alone, with no endpoint: [`Blobs::open_store`]). A clone is another handle on the
/// same endpoint and store.
#[derive(Clone, Debug)]
pub struct Blobs {
    /// The endpoint and what serves on it; none for a store opened alone.
    net: Option<(Endpoint, Router)>,
    /// The endpoint id (the key's), endpoint or not.
    id: EndpointId,
    store: FsStore,
}

impl Blobs {
    /// Opens the store in `dir` (created if need be) and binds the endpoint, under `key`, to
    /// `bind` (`127.0.0.1:0` for loopback only; `0.0.0.0:0` for every interface).
    pub async fn open(dir: &Path, key: &SecretKey, bind: &[SocketAddr]) -> Result<Self, BlobError> {
        Self::open_with(dir, key, bind, None).await
    }

    /// Like [`Blobs::open`], and takes pushes (iroh-blobs disables them by default): a push of
    /// a blob is taken only if `accept(pusher, hash)` says so, where `pusher` is the endpoint
    /// id the connection proved (a device key). A blob is served only if `serve(hash)` says so
    /// (rather than whatever the store holds until garbage collection). A relay opens its store
    /// this way.
    pub async fn open_accepting(
        dir: &Path,
        key: &SecretKey,
        bind: &[SocketAddr],
        accept: impl Fn(EndpointId, Hash) -> bool + Send + Sync + 'static,
        serve: impl Fn(Hash) -> bool + Send + Sync + 'static,
    ) -> Result<Self, BlobError> {
        use iroh_blobs::provider::events::{
            AbortReason, ConnectMode, EventMask, EventSender, ProviderMessage, RequestMode,
        };
        let mask = EventMask {
            connected: ConnectMode::Intercept,
            push: RequestMode::Intercept,
            get: RequestMode::Intercept,
            get_many: RequestMode::Intercept,
            ..EventMask::DEFAULT
        };
        let (events, mut rx) = EventSender::channel(64, mask);
        tokio::spawn(async move {
            // Which endpoint each live connection proved; an entry goes with its connection.
            let mut who = std::collections::HashMap::new();
            while let Some(message) = rx.recv().await {
                match message {
                    ProviderMessage::ClientConnected(msg) => {
                        if let Some(id) = msg.endpoint_id {
                            who.insert(msg.connection_id, id);
                        }
                        msg.tx.send(Ok(())).await.ok();
                    }
                    ProviderMessage::ConnectionClosed(msg) => {
                        who.remove(&msg.connection_id);
                    }
                    ProviderMessage::PushRequestReceived(msg) => {
                        let hash = msg.request.hash;
                        let ok = who.get(&msg.connection_id).is_some_and(|id| accept(*id, hash));
                        if !ok {
                            tracing::info!(%hash, "a push no one asked for refused");
                        }
                        let answer = if ok { Ok(()) } else { Err(AbortReason::Permission) };
                        msg.tx.send(answer).await.ok();
                    }
                    ProviderMessage::GetRequestReceived(msg) => {
                        let ok = serve(msg.request.hash);
                        let answer = if ok { Ok(()) } else { Err(AbortReason::Permission) };
                        msg.tx.send(answer).await.ok();
                    }
                    ProviderMessage::GetManyRequestReceived(msg) => {
                        let ok = msg.request.hashes.iter().all(|h| serve(*h));
                        let answer = if ok { Ok(()) } else { Err(AbortReason::Permission) };
                        msg.tx.send(answer).await.ok();
                    }
                    _ => {}
                }
            }
        });
        Self::open_with(dir, key, bind, Some(events)).await
    }

    /// Opens the store in `dir` with no endpoint at all: for a device that must not speak UDP
    /// (a relay-only node), whose blobs travel as parts over its link to its relay
    /// ([`Blobs::export_part`], [`Blobs::import_part`]). Fetches and pushes over iroh fail with
    /// [`BlobError::Bind`].
    pub async fn open_store(dir: &Path, key: &SecretKey) -> Result<Self, BlobError> {
        let store = Self::load_store(dir).await?;
        let id = EndpointId::from_bytes(&key.public().0)
            .map_err(|e| BlobError::Bind(format!("the key is no endpoint id: {e}")))?;
        let blobs = Self { net: None, id, store };
        blobs.index_cache().await?;
        Ok(blobs)
    }

    async fn load_store(dir: &Path) -> Result<FsStore, BlobError> {
        let mut options = iroh_blobs::store::fs::options::Options::new(dir);
        options.gc =
            Some(iroh_blobs::store::GcConfig { interval: GC_INTERVAL, add_protected: None });
        FsStore::load_with_opts(dir.join("blobs.db"), options)
            .await
            .map_err(|e| BlobError::Store(e.to_string()))
    }

    /// The endpoint, or why there is none.
    fn endpoint(&self) -> Result<&Endpoint, BlobError> {
        match &self.net {
            Some((endpoint, _)) => Ok(endpoint),
            None => Err(BlobError::Bind("this store has no endpoint (relay-only)".into())),
        }
    }

    async fn open_with(
        dir: &Path,
        key: &SecretKey,
        bind: &[SocketAddr],
        events: Option<iroh_blobs::provider::events::EventSender>,
    ) -> Result<Self, BlobError> {
        let secret = iroh::SecretKey::from_bytes(&key.seed());
        let mut builder = Endpoint::builder(presets::Minimal)
            .secret_key(secret)
            .relay_mode(RelayMode::Disabled)
            .clear_address_lookup()
            .portmapper_config(PortmapperConfig::Disabled)
            .net_report_config(NetReportConfig::minimal())
            .clear_ip_transports();
        for addr in bind {
            builder = builder.bind_addr(*addr).map_err(|e| BlobError::Bind(e.to_string()))?;
        }
        let endpoint = builder.bind().await.map_err(|e| BlobError::Bind(e.to_string()))?;
        let store = Self::load_store(dir).await?;
        let router = Router::builder(endpoint.clone())
            .accept(BLOBS_ALPN, BlobsProtocol::new(&store, events))
            .spawn();
        let blobs = Self { id: endpoint.id(), net: Some((endpoint, router)), store };
        blobs.index_cache().await?;
        Ok(blobs)
    }

    /// This endpoint as a provider: its id and the addresses others can reach it at (the
    /// local interfaces' addresses when it is bound to every interface), at most 16.
    /// No addresses for a store with no endpoint.
    pub fn provider(&self) -> Provider {
        let Some((endpoint, _)) = &self.net else {
            return Provider { id: self.id, addrs: Vec::new() };
        };
        let mut addrs: Vec<SocketAddr> = endpoint.addr().ip_addrs().copied().collect();
        for bound in endpoint.bound_sockets() {
            if !bound.ip().is_unspecified() && !addrs.contains(&bound) {
                addrs.push(bound);
            }
        }
        addrs.retain(|a| !a.ip().is_unspecified() && a.port() != 0);
        addrs.truncate(16);
        Provider { id: self.id, addrs }
    }

    /// Whether this store has an endpoint (it fetches and pushes over iroh).
    pub fn has_endpoint(&self) -> bool {
        self.net.is_some()
    }

    /// The store (for reading a blob: `store().reader(hash)` is `AsyncRead + AsyncSeek`).
    pub fn store(&self) -> &FsStore {
        &self.store
    }

    /// Adds a file's bytes to the store, tagged `file/<hash>`; its hash.
    pub async fn add_path(&self, path: &Path) -> Result<Hash, BlobError> {
        let tag = self
            .store
            .blobs()
            .add_path(path)
            .temp_tag()
            .await
            .map_err(|e| BlobError::Store(e.to_string()))?;
        self.name(tag).await
    }

    /// Adds the bytes a stream yields to the store, tagged `file/<hash>`; its hash. An error
    /// from the stream aborts the import (nothing is kept).
    pub async fn add_stream(
        &self,
        bytes: impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Sync + 'static,
    ) -> Result<Hash, BlobError> {
        let tag = self
            .store
            .blobs()
            .add_stream(bytes)
            .await
            .temp_tag()
            .await
            .map_err(|e| BlobError::Store(e.to_string()))?;
        self.name(tag).await
    }

    /// Names a blob just added under its temporary tag; its hash. The name is set before the
    /// temporary tag goes: the blob is never unnamed.
    async fn name(&self, tag: iroh_blobs::api::TempTag) -> Result<Hash, BlobError> {
        let hash = tag.hash();
        self.tag(hash).await?;
        drop(tag);
        Ok(hash)
    }

    /// How many of a blob's bytes are here (verified).
    pub async fn local_bytes(&self, hash: Hash) -> Result<u64, BlobError> {
        let local =
            self.store.remote().local(hash).await.map_err(|e| BlobError::Store(e.to_string()))?;
        Ok(local.local_bytes())
    }

    /// Names a blob so that garbage collection keeps it (and what of it comes in), durably.
    pub async fn keep(&self, hash: Hash) -> Result<(), BlobError> {
        self.tag(hash).await
    }

    /// Whether the whole blob is here, named or not (a push just taken is not named yet).
    pub async fn complete(&self, hash: Hash) -> Result<bool, BlobError> {
        self.store.blobs().has(hash).await.map_err(|e| BlobError::Store(e.to_string()))
    }

    /// Pushes a blob this store holds to `to`, which must accept it (a relay that asked for
    /// it). Returns once `to` has all of it.
    pub async fn push(&self, to: &Provider, hash: Hash) -> Result<(), BlobError> {
        let who = to.id.fmt_short().to_string();
        let conn = self
            .endpoint()?
            .connect(to.endpoint_addr(), BLOBS_ALPN)
            .await
            .map_err(|e| BlobError::Connect(who.clone(), e.to_string()))?;
        let request =
            iroh_blobs::protocol::PushRequest::from(iroh_blobs::protocol::GetRequest::blob(hash));
        self.store
            .remote()
            .execute_push(conn.clone(), request)
            .complete()
            .await
            .map_err(|e| BlobError::Fetch(who.clone(), format!("push: {e}")))?;
        // The push only sends: the connection stays up, watching the receiver's copy, until it
        // has all of it (closing it at once would drop what is still in flight), or refused it.
        use futures::StreamExt as _;
        let observe = iroh_blobs::protocol::ObserveRequest::new(hash);
        let mut seen = std::pin::pin!(self.store.remote().observe(conn, observe));
        // A receiver that refused the push never says so: silence for `PUSH_IDLE` ends it.
        // The first item is the receiver's bitfield, the next ones what it added since.
        let mut there = iroh_blobs::api::proto::Bitfield::empty();
        loop {
            match tokio::time::timeout(PUSH_IDLE, seen.next()).await {
                Ok(Some(Ok(b))) => {
                    there.update(&b);
                    if there.is_complete() {
                        return Ok(());
                    }
                }
                Ok(Some(Err(e))) => {
                    return Err(BlobError::Fetch(who, format!("push not taken: {e}")));
                }
                Ok(None) => {
                    return Err(BlobError::Fetch(who, "push not taken (the receiver left)".into()));
                }
                Err(_) => {
                    return Err(BlobError::Fetch(who, "push not taken (no progress)".into()));
                }
            }
        }
    }

    /// Names a blob so that garbage collection keeps it, durably (the store's database is
    /// committed before this returns).
    async fn tag(&self, hash: Hash) -> Result<(), BlobError> {
        self.store
            .tags()
            .set(format!("file/{hash}"), hash)
            .await
            .map_err(|e| BlobError::Store(e.to_string()))?;
        self.sync().await
    }

    /// Commits the store's database (iroh-blobs batches its writes for up to half a second).
    pub async fn sync(&self) -> Result<(), BlobError> {
        self.store.sync_db().await.map_err(|e| BlobError::Store(e.to_string()))
    }

    /// Drops this store's names for a blob (its data goes at the next garbage collection).
    pub async fn forget(&self, hash: Hash) -> Result<(), BlobError> {
        let tags = self.store.tags();
        tags.delete(format!("file/{hash}")).await.map_err(|e| BlobError::Store(e.to_string()))?;
        for (used, len) in self.cached_as(hash).await? {
            self.uncache(hash, used, len).await?;
        }
        Ok(())
    }

    /// When the blob was last used and its length, for each cache entry it has (one, unless a
    /// crash came between two tag writes).
    async fn cached_as(&self, hash: Hash) -> Result<Vec<(u64, u64)>, BlobError> {
        use futures::StreamExt as _;
        let store = |e: &dyn std::fmt::Display| BlobError::Store(e.to_string());
        let prefix = format!("{CACHED_PREFIX}{hash}/");
        let mut list = self.store.tags().list_prefix(prefix).await.map_err(|e| store(&e))?;
        let mut out = Vec::new();
        while let Some(tag) = list.next().await {
            let tag = tag.map_err(|e| store(&e))?;
            if let Some(entry) = parse_cached(&tag.name.0) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Drops one cache entry of a blob: both its names.
    async fn uncache(&self, hash: Hash, used: u64, len: u64) -> Result<(), BlobError> {
        let tags = self.store.tags();
        let (name, index) = cache_names(hash, used, len);
        tags.delete(name).await.map_err(|e| BlobError::Store(e.to_string()))?;
        tags.delete(index).await.map_err(|e| BlobError::Store(e.to_string()))?;
        Ok(())
    }

    /// Gives every cache tag its index name (a cache written before the index had none).
    async fn index_cache(&self) -> Result<(), BlobError> {
        use futures::StreamExt as _;
        let tags = self.store.tags();
        let store = |e: &dyn std::fmt::Display| BlobError::Store(e.to_string());
        let mut indexed: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        let mut list = tags.list_prefix(CACHED_PREFIX).await.map_err(|e| store(&e))?;
        while let Some(tag) = list.next().await {
            indexed.insert(tag.map_err(|e| store(&e))?.name.0.to_vec());
        }
        let mut added = false;
        for (name, hash, len) in self.cache_entries().await? {
            let Some(used) = cache_used(&name.0) else { continue };
            let (_, index) = cache_names(hash, used, len);
            if !indexed.contains(index.as_bytes()) {
                tags.set(index, hash).await.map_err(|e| store(&e))?;
                added = true;
            }
        }
        if added {
            self.sync().await?;
        }
        Ok(())
    }

    /// The cache's names with their blobs and lengths, least recently used first
    /// (`cache/{used_ms:020}/{hash}/{len}`: the tags table is sorted by name, and the length in
    /// the name spares a look-up per blob).
    async fn cache_entries(&self) -> Result<Vec<(Tag, Hash, u64)>, BlobError> {
        use futures::StreamExt as _;
        let store = |e: &dyn std::fmt::Display| BlobError::Store(e.to_string());
        let mut list = self.store.tags().list_prefix(CACHE_PREFIX).await.map_err(|e| store(&e))?;
        let mut out = Vec::new();
        while let Some(tag) = list.next().await {
            let tag = tag.map_err(|e| store(&e))?;
            let len = std::str::from_utf8(&tag.name.0)
                .ok()
                .and_then(|n| n.rsplit('/').next()?.parse::<u64>().ok());
            let len = match len {
                Some(len) => len,
                None => self.local_bytes(tag.hash).await?,
            };
            out.push((tag.name, tag.hash, len));
        }
        Ok(out)
    }

    /// Notes that the blob is a cached copy (it can be fetched again), last used at `now_ms`:
    /// [`Blobs::evict`] drops the least recently used first. `only_if_cached`: a blob not in the
    /// cache (one this device sent, say) stays out of it.
    pub async fn cache(
        &self,
        hash: Hash,
        now_ms: u64,
        only_if_cached: bool,
    ) -> Result<(), BlobError> {
        // Found by its index: no listing of the cache on every read.
        let old = self.cached_as(hash).await?;
        if old.is_empty() && only_if_cached {
            return Ok(());
        }
        let len = self.local_bytes(hash).await?;
        let (name, index) = cache_names(hash, now_ms, len);
        let tags = self.store.tags();
        tags.set(name, hash).await.map_err(|e| BlobError::Store(e.to_string()))?;
        tags.set(index, hash).await.map_err(|e| BlobError::Store(e.to_string()))?;
        for (used, old_len) in old.into_iter().filter(|o| *o != (now_ms, len)) {
            self.uncache(hash, used, old_len).await?;
        }
        self.sync().await
    }

    /// The bytes the cached blobs take here.
    pub async fn cached_bytes(&self) -> Result<u64, BlobError> {
        Ok(self.cache_entries().await?.iter().fold(0u64, |t, (.., len)| t.saturating_add(*len)))
    }

    /// Forgets the least recently used cached blobs, but never `keep`, until the cache takes
    /// at most `max_bytes`. Returns the blobs forgotten.
    pub async fn evict(&self, max_bytes: u64, keep: Option<Hash>) -> Result<Vec<Hash>, BlobError> {
        let entries = self.cache_entries().await?;
        let mut total = entries.iter().fold(0u64, |t, (.., len)| t.saturating_add(*len));
        let mut gone = Vec::new();
        let tags = self.store.tags();
        for (name, hash, len) in entries {
            if total <= max_bytes {
                break;
            }
            if Some(hash) == keep {
                continue;
            }
            // Its names, as `forget` drops them (without listing the cache again).
            tags.delete(format!("file/{hash}"))
                .await
                .map_err(|e| BlobError::Store(e.to_string()))?;
            let used = cache_used(&name.0);
            tags.delete(name).await.map_err(|e| BlobError::Store(e.to_string()))?;
            if let Some(used) = used {
                let (_, index) = cache_names(hash, used, len);
                tags.delete(index).await.map_err(|e| BlobError::Store(e.to_string()))?;
            }
            total = total.saturating_sub(len);
            gone.push(hash);
        }
        if !gone.is_empty() {
            self.sync().await?;
        }
        Ok(gone)
    }

    /// Whether the whole blob is here and kept (a forgotten one is not, even before garbage
    /// collection deletes it).
    pub async fn has(&self, hash: Hash) -> Result<bool, BlobError> {
        let named = self
            .store
            .tags()
            .get(format!("file/{hash}"))
            .await
            .map_err(|e| BlobError::Store(e.to_string()))?;
        if named.is_none() {
            return Ok(false);
        }
        self.store.blobs().has(hash).await.map_err(|e| BlobError::Store(e.to_string()))
    }

    /// Fetches the blob from one provider, verified as it streams in, from where a previous
    /// fetch stopped; keeps it tagged. Returns the bytes this fetch moved.
    pub async fn fetch(&self, provider: &Provider, hash: Hash) -> Result<u64, BlobError> {
        self.fetch_with(provider, hash, u64::MAX, |_| ()).await
    }

    /// [`Blobs::fetch`], calling `progress` with the bytes this fetch moved so far as they
    /// come in, and stopping with [`BlobError::TooLarge`] once it moved more than `max_moved`.
    pub async fn fetch_with(
        &self,
        provider: &Provider,
        hash: Hash,
        max_moved: u64,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, BlobError> {
        use futures::StreamExt as _;
        use iroh_blobs::api::remote::GetProgressItem;
        let who = provider.id.fmt_short().to_string();
        // Named first: what comes in is kept for a later fetch to go on from.
        self.tag(hash).await?;
        let conn = self
            .endpoint()?
            .connect(provider.endpoint_addr(), BLOBS_ALPN)
            .await
            .map_err(|e| BlobError::Connect(who.clone(), e.to_string()))?;
        let moved = {
            let mut items = std::pin::pin!(self.store.remote().fetch(conn, hash).stream());
            loop {
                match items.next().await {
                    Some(GetProgressItem::Progress(n)) if n > max_moved => break None,
                    Some(GetProgressItem::Progress(n)) => progress(n),
                    Some(GetProgressItem::Done(stats)) => break Some(stats.payload_bytes_read),
                    Some(GetProgressItem::Error(e)) => {
                        return Err(BlobError::Fetch(who, e.to_string()));
                    }
                    None => {
                        return Err(BlobError::Fetch(who, "the transfer ended unfinished".into()));
                    }
                }
            }
            // (The transfer stops here, with its stream.)
        };
        match moved {
            Some(moved) => Ok(moved),
            None => {
                // Not the blob that was wanted: none of it is kept.
                self.forget(hash).await?;
                Err(BlobError::TooLarge(max_moved))
            }
        }
    }

    /// Fetches the blob from the first provider that gives all of it, in order; each failure
    /// (unreachable, no such blob, bytes that are not it) moves on to the next, keeping what was
    /// verified. A blob over `max_len` bytes is not fetched further (from anyone).
    /// `progress` hears how many of the blob's bytes are here (verified) as they come in.
    /// Returns which provider finished it.
    pub async fn fetch_any(
        &self,
        providers: &[Provider],
        hash: Hash,
        max_len: u64,
        mut progress: impl FnMut(u64),
    ) -> Result<usize, BlobError> {
        for (i, provider) in providers.iter().enumerate() {
            let here = self.local_bytes(hash).await?;
            progress(here);
            let room = max_len.saturating_sub(here);
            match self.fetch_with(provider, hash, room, |n| progress(here.saturating_add(n))).await
            {
                Ok(_) if self.has(hash).await? => {
                    self.sync().await?;
                    progress(self.local_bytes(hash).await?);
                    return Ok(i);
                }
                Ok(_) => {
                    tracing::debug!(%hash, provider = %provider.id, "provider gave part of a blob")
                }
                Err(e @ BlobError::TooLarge(_)) => return Err(e),
                Err(e) => tracing::info!(%hash, error = %e, "provider failed; trying the next"),
            }
        }
        Err(BlobError::NoProvider(providers.len()))
    }

    /// Part of a blob, bao-encoded (its length, then the tree's nodes that prove the part, then
    /// its data: what iroh-blobs sends for a range), for a link that is not iroh: chunks
    /// (1 KiB) `first .. first + chunks` of it, cut at its end. `first` must be a multiple of
    /// [`GROUP_CHUNKS`] and `chunks` at most [`PART_CHUNKS`]. Fails unless this store has the
    /// whole blob.
    pub async fn export_part(
        &self,
        hash: Hash,
        first: u64,
        chunks: u64,
    ) -> Result<Vec<u8>, BlobError> {
        let ranges = part_ranges(first, chunks)?;
        if !self.complete(hash).await? {
            return Err(BlobError::Fetch("this store".into(), "the blob is not here whole".into()));
        }
        self.store
            .export_bao(hash, ranges)
            .bao_to_vec()
            .await
            .map_err(|e| BlobError::Store(e.to_string()))
    }

    /// Verifies a part of the blob `hash` (as [`Blobs::export_part`] makes it: the same
    /// `first` and `chunks`) against the hash, and keeps it, tagged (what came stays for the
    /// rest). A part that is not of that blob, or of another length than `len`, keeps nothing.
    pub async fn import_part(
        &self,
        hash: Hash,
        len: u64,
        first: u64,
        chunks: u64,
        part: Vec<u8>,
    ) -> Result<(), BlobError> {
        let ranges = part_ranges(first, chunks)?;
        if part.len() > MAX_PART_LEN {
            return Err(BlobError::Fetch("a part".into(), "over the part limit".into()));
        }
        // The length is the first thing in it (and the hash proves it).
        let said = part.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        if said != Some(len) {
            return Err(BlobError::Fetch("a part".into(), format!("not of a blob of {len} bytes")));
        }
        self.tag(hash).await?;
        self.store
            .import_bao_bytes(hash, ranges, part)
            .await
            .map_err(|e| BlobError::Fetch("a part".into(), format!("does not verify: {e}")))
    }

    /// The first chunk of the blob `hash` not here (a multiple of [`GROUP_CHUNKS`]), or `None`
    /// if it is here whole; `len` is its length.
    pub async fn next_missing(&self, hash: Hash, len: u64) -> Result<Option<u64>, BlobError> {
        let here =
            self.store.blobs().observe(hash).await.map_err(|e| BlobError::Store(e.to_string()))?;
        let end = bao_tree::ChunkNum::chunks(len).0;
        let have = &here.ranges;
        let mut at = 0;
        while at < end {
            let group = ChunkRanges::from(
                bao_tree::ChunkNum(at)..bao_tree::ChunkNum((at + GROUP_CHUNKS).min(end)),
            );
            if !have.is_superset(&group) {
                return Ok(Some(at));
            }
            at += GROUP_CHUNKS;
        }
        Ok(None)
    }

    /// Stops serving, closes the endpoint, and closes the store (its database committed).
    pub async fn shutdown(&self) {
        if let Some((_, router)) = &self.net
            && let Err(e) = router.shutdown().await
        {
            tracing::debug!(error = %e, "blob router shutdown");
        }
        if let Err(e) = self.store.shutdown().await {
            tracing::debug!(error = %e, "blob store shutdown");
        }
    }
}

//! Files (section 8 of the design): a file sent is sealed under a fresh key as it streams in
//! and added to this device's blob store before its message is sent; a file received is
//! fetched from its providers when asked, verified twice (iroh-blobs checks every group against
//! the hash the message names, then its first and last chunks must open under the message's key
//! and size), and read back opened, a chunk at a time (a chunk that does not open ends the read
//! and drops the blob).
//!
//! Nothing here holds a file in memory: the upload is sealed between two bounded channels, the
//! download is opened one sealed chunk at a time.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use chitchat_blobs::{BlobError, Blobs, Provider};
use chitchat_proto::DeviceId;
use chitchat_proto::channel::MessageId;
use chitchat_proto::chat::{ChatContent, FileRef};
use chitchat_proto::codec::Canonical as _;
use chitchat_proto::file::{self, FileKey, Opener, SEALED_CHUNK_LEN};
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::peer::{PeerRequest, PeerResponse};
use chitchat_proto::wire::{ErrorCode, MAX_PART_CHUNKS, Request, Response};
use futures::{Stream, StreamExt as _};
use iroh_blobs::Hash;
use tokio::io::AsyncReadExt as _;

use super::lan::peer_of;
use super::{Node, NodeError};
use crate::engine::{EngineError, Event, id_string};
use crate::link::RelayLink;

/// Sealed chunks in flight between the sealing thread and the blob store, at most.
const SEALED_QUEUE: usize = 8;
/// Sealed chunks read from the store at a time (about a MiB).
const READ_CHUNKS: usize = 16;
/// How long a pin the relay cannot take yet (busy, or not ordering the channel yet) is asked
/// for again before the send fails.
const PIN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);
/// How often a fetch's progress is announced, at most.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// How long a sender's node has to say where its blob endpoint listens.
const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn file_error(code: &'static str, message: impl Into<String>) -> NodeError {
    NodeError::File { code, message: message.into() }
}

/// The file a message carries, with its channel and sender.
#[derive(Clone, Debug)]
pub struct Attachment {
    /// The channel.
    pub channel: ChannelId,
    /// The message.
    pub id: MessageId,
    /// The file.
    pub file: FileRef,
}

impl Attachment {
    /// The blob's hash.
    pub fn hash(&self) -> Hash {
        Hash::from_bytes(self.file.hash)
    }
}

/// Writes each sealed chunk into the channel the blob store reads (blocking: from the sealing
/// thread).
struct ToStore(tokio::sync::mpsc::Sender<std::io::Result<Bytes>>);

impl Write for ToStore {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::other("the blob store stopped taking the file"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads at most `max` bytes, and fails (rather than ends) past them: a file over the limit is
/// never stored in part.
struct AtMost<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for AtMost<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::FileTooLarge, "the file is over the limit")
        })?;
        Ok(n)
    }
}

/// Keeps a copy of the bytes read, while they are at most `max` (none once past it): an image's
/// source for its thumbnail.
struct Tee<R> {
    inner: R,
    copy: Option<Vec<u8>>,
    max: usize,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(copy) = &mut self.copy {
            if copy.len().saturating_add(n) > self.max {
                self.copy = None;
            } else {
                copy.extend_from_slice(&buf[..n]);
            }
        }
        Ok(n)
    }
}

impl Node {
    /// The blob store (with no endpoint on a relay-only node).
    pub fn blobs(&self) -> Option<&Blobs> {
        self.blobs.as_ref()
    }

    /// The blob store, or why there is none.
    fn store(&self) -> Result<&Blobs, NodeError> {
        self.blobs.as_ref().ok_or_else(|| file_error("unavailable", "this node has no blob store"))
    }

    /// Drops this store's name for a blob, if there is a store.
    async fn forget(&self, hash: Hash) {
        if let Some(b) = &self.blobs {
            let _ = b.forget(hash).await;
        }
    }

    /// Seals the bytes `body` yields as a new file named `name` of type `mime`, keeps its blob
    /// here, and sends it in `channel` (a `text/chitchat` channel) with `caption`. Nothing is
    /// sent, and nothing kept, if the body fails, is over `[files] max_send_bytes`, or the
    /// file's description is refused.
    pub async fn send_file<E>(
        self: &Arc<Self>,
        channel: ChannelId,
        name: String,
        mime: String,
        caption: Option<String>,
        body: impl Stream<Item = Result<Bytes, E>> + Send + 'static,
    ) -> Result<(MessageId, FileRef, Option<u64>), NodeError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // The description is checked before a byte is read.
        let mut file =
            FileRef { hash: [0; 32], key: [0; 32], size: 0, mime, name, thumbnail: None };
        let content = ChatContent::Attachment { file: file.clone(), caption: caption.clone() };
        content.validate().map_err(|e| NodeError::Invalid(e.into()))?;
        self.with(move |e| e.channel(&channel).map(|_| ())).await?;

        let key = FileKey::generate(&mut rand::rng());
        let max = self.config.files.max_send_bytes;
        let body = body.map(|r| r.map_err(std::io::Error::other));
        let reader =
            tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(Box::pin(body)));
        let (tx, rx) = tokio::sync::mpsc::channel(SEALED_QUEUE);
        let seal_key = key.clone();
        let image = crate::thumbnail::is_image(&file.mime);
        let sealing = tokio::task::spawn_blocking(move || {
            let out = ToStore(tx.clone());
            let mut body = Tee {
                inner: AtMost { inner: reader, left: max },
                copy: image.then(Vec::new),
                max: crate::thumbnail::MAX_SOURCE_LEN,
            };
            let sealed = file::seal_to(&seal_key, &mut body, out);
            if let Err(e) = &sealed {
                // The store's import fails with it: no blob of a part.
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
            sealed.map(|size| (size, body.copy))
        });
        let added = self.store()?.add_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        let (size, source) = match sealing.await {
            Ok(Ok(sealed)) => sealed,
            Ok(Err(file::FileError::Io(e))) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                return Err(file_error(
                    "too_large",
                    format!("the file is over this device's limit of {max} bytes"),
                ));
            }
            Ok(Err(e)) => return Err(file_error("upload", format!("the file was not read: {e}"))),
            Err(e) => return Err(file_error("storage", format!("sealing stopped: {e}"))),
        };
        let hash = added.map_err(|e| file_error("storage", e.to_string()))?;
        file.hash = *hash.as_bytes();
        file.key = key.to_bytes();
        if super::fault("seal-file-under-another-key") {
            // For tests: a sender that names another key than it sealed under.
            file.key = FileKey::generate(&mut rand::rng()).to_bytes();
        }
        file.size = size;
        if let Some(source) = source {
            // Bounded, and on a blocking thread: a crafted image costs little.
            let max = chitchat_proto::chat::MAX_THUMBNAIL_LEN;
            let made = tokio::task::spawn_blocking(move || crate::thumbnail::make(&source, max));
            file.thumbnail = made.await.ok().flatten().map(Into::into);
        }
        // A channel that relays serve: the blob is pinned at this device's relay first, so
        // that members can fetch it while this device is away. Refused there, nothing is sent.
        let relayless = self.with(move |e| e.is_relayless(&channel)).await;
        let pinned = if relayless {
            None
        } else {
            match self.pin_at_relay(channel, hash, file::sealed_len(size)).await {
                Ok(expires) => Some(expires),
                Err(e) => {
                    self.forget(hash).await;
                    return Err(e);
                }
            }
        };
        let content = ChatContent::Attachment { file: file.clone(), caption };
        let id = match self.send(channel, content.to_bytes(), true).await {
            Ok(id) => id,
            Err(e) => {
                // Not sent: the blob is no one's.
                self.forget(hash).await;
                return Err(e);
            }
        };
        tracing::info!(%channel, id = %id_string(&id), size, "file sent");
        Ok((id, file, pinned))
    }

    /// Pins a blob at this device's relay: asks, pushes what the relay wants, asks again.
    /// Returns when the pin expires (Unix milliseconds).
    async fn pin_at_relay(
        &self,
        channel: ChannelId,
        hash: Hash,
        len: u64,
    ) -> Result<u64, NodeError> {
        let link = self.link()?;
        let relay = self.relay_provider_id().await?;
        let request = Request::PinFile { channel, hash: *hash.as_bytes(), len };
        let deadline = std::time::Instant::now() + PIN_PATIENCE;
        let mut wait = std::time::Duration::from_millis(250);
        // Asked, pushed, asked again; a third push only if the push was cut short.
        let mut pushes = 0;
        let mut reopened = false;
        loop {
            match link.call(&request).await? {
                Response::FilePinned { expires_ms } => return Ok(expires_ms),
                Response::FileWanted { addrs } if pushes < 2 => {
                    pushes += 1;
                    let store = self.store()?;
                    // Over iroh, else (a relay-only device, or iroh does not get through) in
                    // parts over the link.
                    let over_iroh = store.has_endpoint()
                        && {
                            let to = Provider { id: relay, addrs: socket_addrs(addrs) };
                            match store.push(&to, hash).await {
                                Ok(()) => true,
                                Err(e) => {
                                    tracing::info!(%hash, error = %e, "push to the relay failed; over the link then");
                                    false
                                }
                            }
                        };
                    if !over_iroh && let Err(e) = self.push_over_link(hash, len).await {
                        tracing::info!(%hash, error = %e, "push over the relay link failed");
                    }
                }
                Response::FileWanted { .. } => {
                    return Err(file_error(
                        "unavailable",
                        "the relay did not take the file; nothing was sent",
                    ));
                }
                Response::Error { code: ErrorCode::QuotaExceeded { .. }, message } => {
                    return Err(file_error(
                        "quota_exceeded",
                        format!("the relay refused the file: {message}"),
                    ));
                }
                // The relay does not order the channel (its relay set changed since it was
                // opened): open it there, once, as a post or commit would, and ask again.
                Response::Error { code: ErrorCode::NotFound, .. } if !reopened => {
                    reopened = true;
                    if let Err(e) = self.open_at_relay_again(&channel, true).await {
                        tracing::info!(%channel, error = %e, "channel not opened at the relay yet");
                    }
                }
                // Busy, or not ordering the channel yet (the relays that ordered its move are
                // slow): asked again for a while.
                Response::Error {
                    code:
                        ErrorCode::NotFound | ErrorCode::Unavailable | ErrorCode::RateLimited { .. },
                    ..
                } if std::time::Instant::now() + wait < deadline => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(2));
                }
                other => return Err(super::refused(other)),
            }
        }
    }

    /// The endpoint id of this device's relay.
    async fn relay_provider_id(&self) -> Result<iroh::EndpointId, NodeError> {
        let key = self.with(|e| e.account().map(|a| a.relay.id.key)).await;
        key.and_then(|k| chitchat_blobs::endpoint_id(&k))
            .ok_or(NodeError::Engine(EngineError::NotRegistered))
    }

    /// The file message `id` of `channel` carries.
    pub async fn attachment(
        &self,
        channel: ChannelId,
        id: MessageId,
    ) -> Result<Attachment, NodeError> {
        let stored =
            self.with(move |e| e.store().message(&channel, &id).map_err(EngineError::from)).await?;
        let Some(stored) = stored else {
            return Err(NodeError::NotFound(format!("no message {}", id_string(&id))));
        };
        match ChatContent::from_bytes(&stored.payload) {
            Ok(ChatContent::Attachment { file, .. }) => Ok(Attachment { channel, id, file }),
            _ => Err(NodeError::Invalid(format!("message {} carries no file", id_string(&id)))),
        }
    }

    /// Which of these blobs are here whole.
    pub async fn fetched(&self, hashes: impl IntoIterator<Item = [u8; 32]>) -> BTreeSet<[u8; 32]> {
        let mut here = BTreeSet::new();
        let Some(blobs) = &self.blobs else { return here };
        for h in hashes {
            if matches!(blobs.has(Hash::from_bytes(h)).await, Ok(true)) {
                here.insert(h);
            }
        }
        here
    }

    /// Fetches the file `a` names from its providers (this device's relay, then its sender's
    /// device), unless
    /// it is here already; announces progress (`file` events). Checks that its first and last
    /// chunks open.
    /// Returns whether it moved anything.
    pub async fn fetch_file(self: &Arc<Self>, a: &Attachment) -> Result<bool, NodeError> {
        let hash = a.hash();
        let max = self.config.files.max_fetch_bytes;
        if a.file.size > max {
            return Err(file_error(
                "too_large",
                format!("the file has {} bytes, over this device's limit of {max}", a.file.size),
            ));
        }
        if self.store()?.has(hash).await.map_err(|e| file_error("storage", e.to_string()))? {
            return Ok(false);
        }
        let _busy = FetchGuard::take(self, hash)?;
        let damaged = self.damaged.lock().ok().and_then(|d| d.get(&hash).copied());
        if let Some(at) = damaged {
            let left = self.store()?.local_bytes(hash).await.unwrap_or(0);
            if left > 0 && at.elapsed() < 2 * chitchat_blobs::GC_INTERVAL {
                return Err(file_error(
                    "busy",
                    "a damaged copy of this file is being deleted; fetch it again in a minute",
                ));
            }
            if let Ok(mut d) = self.damaged.lock() {
                d.remove(&hash);
            }
        }
        let total = file::sealed_len(a.file.size);
        let (channel, id) = (a.channel.to_string(), id_string(&a.id));
        let mut last = std::time::Instant::now();
        let events = self.events.clone();
        let mut progress = |bytes: u64| {
            if bytes < total && last.elapsed() < PROGRESS_EVERY {
                return;
            }
            last = std::time::Instant::now();
            let _ = events.send(Event::File {
                channel: channel.clone(),
                id: id.clone(),
                bytes: bytes.min(total),
                total,
                state: "fetching",
            });
        };
        // This device's relay first (always on, and it pins what its members send); the
        // sender's device is asked where it listens only if the relay does not give it all.
        let store = self.store()?;
        let channel = a.channel;
        let relayless = self.with(move |e| e.is_relayless(&channel)).await;
        let mut tried = 0;
        let mut fetched = Err(BlobError::NoProvider(0));
        if store.has_endpoint()
            && !relayless
            && let Some(relay) = self.relay_provider().await
        {
            tried += 1;
            fetched = store.fetch_any(&[relay], hash, total, &mut progress).await.map(|_| ());
        }
        // The relay again, over the link in parts: a relay-only device's only way, and any
        // device's where iroh does not get through to the relay.
        if matches!(fetched, Err(BlobError::NoProvider(_))) && !relayless && self.link().is_ok() {
            tried += 1;
            fetched = self.fetch_over_link(hash, total, &mut progress).await;
        }
        if matches!(fetched, Err(BlobError::NoProvider(_)))
            && store.has_endpoint()
            && let Some(sender) = self.sender_provider(&a.id.sender).await
        {
            tried += 1;
            fetched = store.fetch_any(&[sender], hash, total, &mut progress).await.map(|_| ());
        }
        if let Err(e) = fetched {
            self.announce_file(a, 0, "failed");
            let e = match e {
                BlobError::NoProvider(_) if tried == 0 => {
                    "no provider of the file is reachable (neither a relay nor its sender's device)"
                        .to_owned()
                }
                BlobError::NoProvider(_) => format!("no provider gave the blob ({tried} tried)"),
                e => e.to_string(),
            };
            return Err(file_error("unavailable", e));
        }
        if let Err(e) = self.check_ends(a).await {
            // Its sender sealed something else than it said: it is no one's file.
            self.forget(hash).await;
            self.announce_file(a, 0, "failed");
            return Err(e);
        }
        self.cache_fetched(hash).await;
        self.announce_file(a, total, "fetched");
        Ok(true)
    }

    /// Fetches a blob from this device's relay over the link, in parts (a few asked at once),
    /// from where it stopped; each part is verified against the hash before it is kept. A
    /// relay that does not have it is [`BlobError::NoProvider`].
    async fn fetch_over_link(
        &self,
        hash: Hash,
        len: u64,
        progress: &mut impl FnMut(u64),
    ) -> Result<(), BlobError> {
        use futures::stream::FuturesOrdered;
        let link =
            self.link().map_err(|e| BlobError::Connect("relay link".into(), e.to_string()))?;
        let store = self.store().map_err(|e| BlobError::Store(e.to_string()))?;
        let end = len.div_ceil(1024);
        let Some(mut next) = store.next_missing(hash, len).await? else {
            return Ok(());
        };
        progress(next.saturating_mul(1024).min(len));
        let mut asked = FuturesOrdered::new();
        loop {
            while asked.len() < PARTS_IN_FLIGHT && next < end {
                let (link, first) = (link.clone(), next);
                next = next.saturating_add(PART_CHUNKS);
                asked.push_back(async move { (first, ask_part(&link, hash, first).await) });
            }
            let Some((first, part)) = asked.next().await else { break };
            store.import_part(hash, len, first, PART_CHUNKS, part?).await?;
            progress(first.saturating_add(PART_CHUNKS).saturating_mul(1024).min(len));
        }
        store.sync().await?;
        if store.has(hash).await? {
            Ok(())
        } else {
            Err(BlobError::Fetch("relay link".into(), "the blob did not come whole".into()))
        }
    }

    /// Pushes a blob this store holds to this device's relay over the link, in parts (a few
    /// at once): after the relay asked for it (`FileWanted`).
    async fn push_over_link(&self, hash: Hash, len: u64) -> Result<(), NodeError> {
        use futures::stream::FuturesUnordered;
        let link = self.link()?;
        let store = self.store()?;
        let unavailable = |e: BlobError| file_error("unavailable", e.to_string());
        let mut firsts = (0..len.div_ceil(1024)).step_by(PART_CHUNKS as usize);
        let mut pushing = FuturesUnordered::new();
        loop {
            while pushing.len() < PARTS_IN_FLIGHT
                && let Some(first) = firsts.next()
            {
                let part =
                    store.export_part(hash, first, PART_CHUNKS).await.map_err(unavailable)?;
                let request = Request::PushPart {
                    hash: *hash.as_bytes(),
                    len,
                    first,
                    chunks: MAX_PART_CHUNKS,
                    part: chitchat_proto::codec::Bytes(part),
                };
                let link = link.clone();
                pushing.push(async move { call_part(&link, &request).await });
            }
            match pushing.next().await {
                None => return Ok(()),
                Some(Ok(Response::PartTaken)) => {}
                Some(Ok(other)) => return Err(super::refused(other)),
                Some(Err(e)) => return Err(unavailable(e)),
            }
        }
    }

    /// Puts a fetched blob in the cache, and drops the least recently used others past
    /// `[files] cache_bytes` (they can be fetched again). A failure here only logs: the file
    /// is here.
    async fn cache_fetched(&self, hash: Hash) {
        let Some(blobs) = &self.blobs else { return };
        if let Err(e) = blobs.cache(hash, crate::engine::now().0, false).await {
            tracing::warn!(%hash, error = %e, "fetched file not put in the cache");
            return;
        }
        match blobs.evict(self.config.files.cache_bytes, Some(hash)).await {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(files = gone.len(), "the cache dropped the least recently used");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "the cache could not drop files"),
        }
    }

    /// Notes that a file was read: the cache keeps what is used last (a file this device sent
    /// is not in it).
    pub async fn used_file(&self, a: &Attachment) {
        let Some(blobs) = &self.blobs else { return };
        if let Err(e) = blobs.cache(a.hash(), crate::engine::now().0, true).await {
            tracing::debug!(hash = %a.hash(), error = %e, "file use not noted");
        }
    }

    fn announce_file(&self, a: &Attachment, bytes: u64, state: &'static str) {
        let _ = self.events.send(Event::File {
            channel: a.channel.to_string(),
            id: id_string(&a.id),
            bytes,
            total: file::sealed_len(a.file.size),
            state,
        });
    }

    /// Opens the blob's first and last chunks, keeping none: a sender that named another key
    /// or size than it sealed under is caught at once. (iroh-blobs verified every byte against
    /// the hash the message names; a blob its sender sealed under two keys on purpose is caught
    /// when the chunk that does not open is read, and dropped then: see
    /// [`Node::open_chunks`].)
    async fn check_ends(&self, a: &Attachment) -> Result<(), NodeError> {
        let last = file::chunks(a.file.size).saturating_sub(1);
        for first in [0, last] {
            let mut chunks = std::pin::pin!(self.open_chunks(a, first)?);
            if let Some(chunk) = chunks.next().await {
                chunk?;
            }
        }
        Ok(())
    }

    /// The opened file, a chunk at a time, from chunk `first` on: for a file that is here. A
    /// chunk that does not open ends the stream with a `corrupt` error, and the blob is
    /// forgotten (no one can read it; a fetch may get it again).
    pub fn open_chunks(
        &self,
        a: &Attachment,
        first: u64,
    ) -> Result<impl Stream<Item = Result<Bytes, NodeError>> + Send + 'static, NodeError> {
        let size = a.file.size;
        let opener = Opener::new(&FileKey::from_bytes(a.file.key), size)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        let blobs = self.store()?.clone();
        let damaged = self.damaged.clone();
        let hash = a.hash();
        let reader = blobs.store().reader(hash);
        let start = first.saturating_mul(SEALED_CHUNK_LEN as u64);
        Ok(futures::stream::try_unfold(
            (reader, first, false),
            move |(mut reader, index, seeked)| {
                let opener = opener.clone();
                let blobs = blobs.clone();
                let damaged = damaged.clone();
                async move {
                    let opener = opener.map_err(|e| file_error("corrupt", e))?;
                    // Up to `READ_CHUNKS` chunks a read: each read of the store is a round trip to
                    // its actor.
                    let mut lens = Vec::new();
                    while lens.len() < READ_CHUNKS {
                        match file::chunk_len(size, index + lens.len() as u64) {
                            Some(plain) => lens.push(plain + file::TAG_LEN),
                            None => break,
                        }
                    }
                    if lens.is_empty() {
                        return Ok(None);
                    }
                    if !seeked && start > 0 {
                        use tokio::io::AsyncSeekExt as _;
                        reader
                            .seek(std::io::SeekFrom::Start(start))
                            .await
                            .map_err(|e| file_error("storage", e.to_string()))?;
                    }
                    let mut sealed = vec![0u8; lens.iter().sum()];
                    reader.read_exact(&mut sealed).await.map_err(|e| {
                        file_error("corrupt", format!("the file's blob is cut short here: {e}"))
                    })?;
                    let n = lens.len() as u64;
                    // Opened off the async workers (a MiB at a time).
                    let opened = tokio::task::spawn_blocking(move || {
                        let mut out = Vec::with_capacity(sealed.len());
                        let mut at = 0;
                        for (i, len) in lens.into_iter().enumerate() {
                            let chunk = &sealed[at..at + len];
                            at += len;
                            out.extend_from_slice(&opener.open(index + i as u64, chunk).map_err(
                                |e| file_error("corrupt", format!("the file does not open: {e}")),
                            )?);
                        }
                        Ok::<_, NodeError>(out)
                    })
                    .await
                    .map_err(|e| file_error("storage", e.to_string()))?;
                    let opened = match opened {
                        Ok(opened) => opened,
                        Err(e) => {
                            tracing::warn!(%hash, error = %e, "a fetched file does not open; dropped");
                            note_damaged(&damaged, hash);
                            if let Err(e) = blobs.forget(hash).await {
                                tracing::warn!(%hash, error = %e, "the file not dropped");
                            }
                            return Err(e);
                        }
                    };
                    Ok(Some((Bytes::from(opened), (reader, index + n, true))))
                }
            },
        ))
    }

    /// This device's relay as a provider of files, if the relay says where its blob endpoint
    /// listens.
    async fn relay_provider(&self) -> Option<Provider> {
        let (link, id) = (self.link().ok()?, self.relay_provider_id().await.ok()?);
        match link.call(&Request::BlobEndpoint).await {
            Ok(Response::BlobEndpoint { addrs }) => {
                Some(Provider { id, addrs: socket_addrs(addrs) })
            }
            Ok(other) => {
                tracing::debug!(answer = ?other, "the relay serves no files");
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "the relay not asked for its blob endpoint");
                None
            }
        }
    }

    /// The sender's device as a provider, if it says where its blob endpoint listens.
    async fn sender_provider(&self, sender: &DeviceId) -> Option<Provider> {
        if *sender == self.with(|e| e.device()).await {
            return None;
        }
        let id = chitchat_blobs::endpoint_id(&sender.0)?;
        let peer = peer_of(sender).ok()?;
        let asked =
            tokio::time::timeout(ASK_TIMEOUT, self.ask_peer(peer, &PeerRequest::Blobs)).await;
        match asked {
            Ok(Ok(PeerResponse::Blobs { addrs })) if !addrs.is_empty() => {
                return Some(Provider { id, addrs: socket_addrs(addrs) });
            }
            Ok(Ok(other)) => {
                tracing::debug!(device = %sender, answer = ?other, "the sender serves no blob")
            }
            Ok(Err(e)) => tracing::debug!(device = %sender, error = %e, "the sender not asked"),
            Err(_) => tracing::debug!(device = %sender, "the sender did not answer in time"),
        }
        None
    }

    /// What this device answers a peer's [`PeerRequest::Blobs`]: where its blob endpoint
    /// listens, or nothing for a relay-only device (it tells no one its addresses).
    pub(super) fn blob_addrs(&self) -> PeerResponse {
        let addrs = match &self.blobs {
            Some(b) if !self.config.network.relay_only => b.provider().addrs,
            _ => Vec::new(),
        };
        PeerResponse::Blobs { addrs: addrs.into_iter().map(Into::into).collect() }
    }
}

/// Files pinned again for members' requests: when each was last, and how many pins run now.
#[derive(Debug)]
pub(crate) struct Reuploads {
    last: std::sync::Mutex<std::collections::HashMap<Hash, std::time::Instant>>,
    running: tokio::sync::Semaphore,
    /// Room for requests being looked at (past it, a request is dropped: a flood of them
    /// costs a bounded number of tasks).
    looking: Arc<tokio::sync::Semaphore>,
}

/// How often one file is pinned again for members' requests, at most: a request asks every
/// member, and many members may ask.
const REUPLOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// Files remembered as pinned again within [`REUPLOAD_EVERY`], at most (past it, a request
/// waits).
const MAX_REUPLOADS: usize = 1024;
/// Files pinned again at once, at most.
const REUPLOADS_AT_ONCE: usize = 2;
/// Requests looked at (or waiting to pin) at once, at most.
const REQUESTS_AT_ONCE: usize = 64;
/// A request older than this (by its sender's clock) is not answered: it came with history.
const REQUEST_FRESH_MS: u64 = 24 * 3600 * 1000;

impl Default for Reuploads {
    fn default() -> Self {
        Self {
            last: std::sync::Mutex::default(),
            running: tokio::sync::Semaphore::new(REUPLOADS_AT_ONCE),
            looking: Arc::new(tokio::sync::Semaphore::new(REQUESTS_AT_ONCE)),
        }
    }
}

impl Reuploads {
    /// Forgets that `hash` was pinned again (it was not, after all).
    fn give_back(&self, hash: Hash) {
        if let Ok(mut last) = self.last.lock() {
            last.remove(&hash);
        }
    }

    /// Whether `hash` may be pinned again now; if so, notes it.
    fn take(&self, hash: Hash) -> bool {
        let Ok(mut last) = self.last.lock() else { return false };
        last.retain(|_, at| at.elapsed() < REUPLOAD_EVERY);
        if last.contains_key(&hash) || last.len() >= MAX_REUPLOADS {
            return false;
        }
        last.insert(hash, std::time::Instant::now());
        true
    }
}

impl Node {
    /// Asks the members of the channel of `a` for its file again (`request-file`): sent as a
    /// [`ChatContent::FileRequest`]. Refused if the file is here.
    pub async fn request_file(self: &Arc<Self>, a: &Attachment) -> Result<MessageId, NodeError> {
        if self.store()?.has(a.hash()).await.map_err(|e| file_error("storage", e.to_string()))? {
            return Err(file_error("fetched", "the file is here already"));
        }
        let content = ChatContent::FileRequest { target: a.id };
        self.send(a.channel, content.to_bytes(), true).await
    }

    /// Answers members' requests for files again: for each request (from another device) for
    /// a file this device holds whole, in a channel relays serve, the file is pinned at this
    /// device's relay again (and so replicated to the channel's other relays). Each file at
    /// most once an hour; two at a time. Requests missed while the event queue overflowed are
    /// not answered (the member asks again).
    pub(super) async fn file_request_task(self: Arc<Self>) {
        use tokio::sync::broadcast::error::RecvError;
        let mut events = self.subscribe().await;
        loop {
            let (channel, message) = match events.recv().await {
                Ok(Event::Message { channel, message }) => (channel, message),
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => {
                    tracing::info!(
                        missed = n,
                        "events missed; file requests among them unanswered"
                    );
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let Some(crate::view::Content::FileRequest { target }) = &message.content else {
                continue;
            };
            // Another device's, and recent: a request that comes with old history is not
            // answered again.
            let age = crate::engine::now().0.saturating_sub(message.time_ms);
            if message.status != "received" || age > REQUEST_FRESH_MS {
                continue;
            }
            let mut id = [0u8; 32];
            let (Ok(()), Some(target)) =
                (hex::decode_to_slice(&channel, &mut id), crate::engine::parse_id(target))
            else {
                continue;
            };
            let channel = ChannelId(id);
            let Ok(room) = self.reuploads.looking.clone().try_acquire_owned() else {
                tracing::info!(%channel, "too many file requests at once; one dropped");
                continue;
            };
            let node = self.clone();
            tokio::spawn(async move {
                if let Err(e) = node.answer_file_request(channel, target).await {
                    tracing::info!(%channel, error = %e, "a file request not answered");
                }
                drop(room);
            });
        }
    }

    /// Pins the file of message `target` at this device's relay again, if this device holds
    /// it whole and did not within the hour.
    async fn answer_file_request(
        self: &Arc<Self>,
        channel: ChannelId,
        target: MessageId,
    ) -> Result<(), NodeError> {
        let a = self.attachment(channel, target).await?;
        let hash = a.hash();
        let Some(blobs) = &self.blobs else { return Ok(()) };
        if !blobs.has(hash).await.unwrap_or(false)
            || self.with(move |e| e.is_relayless(&channel)).await
        {
            return Ok(());
        }
        if !self.reuploads.take(hash) {
            tracing::debug!(%hash, "pinned again within the hour; the request is not answered");
            return Ok(());
        }
        let _slot =
            self.reuploads.running.acquire().await.map_err(|_| file_error("storage", "closed"))?;
        let pinned = self.pin_at_relay(channel, hash, file::sealed_len(a.file.size)).await;
        let expires = match pinned {
            Ok(expires) => expires,
            Err(e) => {
                // Not pinned: the next request may try again.
                self.reuploads.give_back(hash);
                return Err(e);
            }
        };
        tracing::info!(%channel, id = %id_string(&target), expires, "file pinned again for a member");
        Ok(())
    }
}

/// Parts asked for, or pushed, over the relay link at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Chunks (1 KiB) in each part over the relay link.
const PART_CHUNKS: u64 = MAX_PART_CHUNKS as u64;
/// How many times a part the relay was too busy for is asked again (then the transfer fails;
/// what came is kept for the next).
const PART_RETRIES: u32 = 100;

/// Sends a part request, asking again while the relay is too busy for it.
async fn call_part(link: &RelayLink, request: &Request) -> Result<Response, BlobError> {
    for _ in 0..PART_RETRIES {
        match link.call(request).await {
            Ok(Response::Error { code: ErrorCode::RateLimited { retry_after_ms }, .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(
                    retry_after_ms.clamp(10, 1000),
                ))
                .await;
            }
            Ok(answer) => return Ok(answer),
            Err(e) => return Err(BlobError::Connect("relay link".into(), e.to_string())),
        }
    }
    Err(BlobError::Fetch("relay link".into(), "the relay stayed too busy".into()))
}

/// Part `first` of a blob pinned at this device's relay, over the link.
async fn ask_part(link: &RelayLink, hash: Hash, first: u64) -> Result<Vec<u8>, BlobError> {
    let request = Request::BlobPart { hash: *hash.as_bytes(), first, chunks: MAX_PART_CHUNKS };
    match call_part(link, &request).await? {
        Response::BlobPart { part } => Ok(part.0),
        Response::Error { code: ErrorCode::NotFound, .. } => Err(BlobError::NoProvider(1)),
        Response::Error { message, .. } => Err(BlobError::Fetch("relay link".into(), message)),
        _ => Err(BlobError::Fetch("relay link".into(), "an unexpected answer".into())),
    }
}

/// Addresses as a frame carries them, as sockets.
fn socket_addrs(addrs: Vec<chitchat_proto::wire::IpPort>) -> Vec<std::net::SocketAddr> {
    addrs.into_iter().map(Into::into).collect()
}

/// Blobs dropped as damaged (a chunk did not open when read), and when. iroh-blobs keeps
/// a dropped blob's data until its garbage collection and trusts it: fetched again before
/// that, the same damaged bytes would be named again. So a fetch of one waits for the data to
/// go. At most [`MAX_DAMAGED`] are remembered.
pub(crate) type Damaged =
    Arc<std::sync::Mutex<std::collections::HashMap<Hash, std::time::Instant>>>;

/// Damaged blobs remembered at once, at most.
const MAX_DAMAGED: usize = 1024;

fn note_damaged(damaged: &Damaged, hash: Hash) {
    if let Ok(mut d) = damaged.lock() {
        let cutoff = 2 * chitchat_blobs::GC_INTERVAL;
        d.retain(|_, at| at.elapsed() < cutoff);
        if d.len() < MAX_DAMAGED {
            d.insert(hash, std::time::Instant::now());
        }
    }
}

/// One fetch of a blob at a time: a second one is refused while the first runs.
struct FetchGuard<'a> {
    node: &'a Node,
    hash: Hash,
}

impl<'a> FetchGuard<'a> {
    fn take(node: &'a Node, hash: Hash) -> Result<Self, NodeError> {
        let mut fetching = node.fetching.lock().map_err(|_| file_error("storage", "poisoned"))?;
        if !fetching.insert(hash) {
            return Err(file_error("busy", "the file is being fetched already"));
        }
        Ok(Self { node, hash })
    }
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut fetching) = self.node.fetching.lock() {
            fetching.remove(&self.hash);
        }
    }
}

//! Blobs over iroh on loopback (`chitchat_blobs`), with files sealed as ChitChat seals
//! them (`chitchat_proto::file`): real endpoints on real UDP sockets, real stores on disk. A
//! sealed file travels and opens; a provider that sends bytes that are not the blob is cut off
//! and the next provider finishes; a fetch stopped half-way goes on where it stopped.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use chitchat_blobs::{BLOBS_ALPN, BlobError, Blobs, Provider};
use chitchat_proto::SecretKey;
use chitchat_proto::file::{FileKey, open_to, seal_to, sealed_len};
use tokio::io::AsyncReadExt as _;

fn loopback() -> Vec<SocketAddr> {
    vec!["127.0.0.1:0".parse().expect("addr")]
}

async fn endpoint(dir: &Path, n: u8) -> Blobs {
    Blobs::open(&dir.join(format!("store-{n}")), &SecretKey::from_seed([n; 32]), &loopback())
        .await
        .expect("open")
}

/// `len` pseudo-random bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect()
}

/// Seals `plain` into a file in `dir`; its path.
fn sealed_file(dir: &Path, key: &FileKey, plain: &[u8]) -> std::path::PathBuf {
    let path = dir.join("sealed");
    let file = std::fs::File::create(&path).expect("create");
    seal_to(key, plain, std::io::BufWriter::new(file)).expect("seal");
    path
}

async fn read_blob(blobs: &Blobs, hash: iroh_blobs::Hash) -> Vec<u8> {
    let mut out = Vec::new();
    blobs.store().reader(hash).read_to_end(&mut out).await.expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_file_travels_between_two_endpoints_and_opens() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (alice, bob) = (endpoint(tmp.path(), 1).await, endpoint(tmp.path(), 2).await);
    let key = FileKey::from_bytes([5; 32]);
    let plain = data(3_000_000, 1);
    let hash = alice.add_path(&sealed_file(tmp.path(), &key, &plain)).await.expect("add");
    assert_eq!(
        alice.provider().id,
        chitchat_blobs::endpoint_id(&SecretKey::from_seed([1; 32]).public()).expect("id"),
        "the endpoint is the device"
    );

    let moved = bob.fetch(&alice.provider(), hash).await.expect("fetch");
    assert_eq!(moved, sealed_len(plain.len() as u64), "the whole blob, once");
    assert!(bob.has(hash).await.expect("has"));
    let blob = read_blob(&bob, hash).await;
    let mut opened = Vec::new();
    open_to(&key, plain.len() as u64, &blob[..], &mut opened).expect("opens");
    assert_eq!(opened, plain);
    // Fetching again moves nothing.
    assert_eq!(bob.fetch(&alice.provider(), hash).await.expect("again"), 0);

    // A blob longer than it was said to be stops the fetch near the limit, and no other
    // provider is asked (its hash fixes its length).
    let carol = endpoint(tmp.path(), 3).await;
    let providers = [alice.provider(), bob.provider()];
    let e = carol.fetch_any(&providers, hash, 1_000_000, |_| ()).await.expect_err("too large");
    assert!(matches!(e, BlobError::TooLarge(1_000_000)), "{e:?}");
    assert!(!carol.has(hash).await.expect("has"));
    let got = carol.local_bytes(hash).await.expect("local");
    let whole = alice.local_bytes(hash).await.expect("len");
    assert!(got < whole, "the fetch stopped short of the blob: {got} of {whole}");
    carol.shutdown().await;

    // A blob the provider does not have is a clear error.
    let missing = iroh_blobs::Hash::new(b"no such blob");
    let e = bob.fetch(&alice.provider(), missing).await.expect_err("missing");
    assert!(matches!(e, BlobError::Fetch(..)), "{e:?}");
    assert!(!bob.has(missing).await.expect("has"));
    alice.shutdown().await;
    bob.shutdown().await;
}

/// An endpoint that answers every blob request with garbage.
async fn liar() -> (iroh::Endpoint, tokio::task::JoinHandle<()>) {
    let endpoint = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .secret_key(iroh::SecretKey::from_bytes(&[66; 32]))
        .relay_mode(iroh::endpoint::RelayMode::Disabled)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")
        .expect("addr")
        .alpns(vec![BLOBS_ALPN.to_vec()])
        .bind()
        .await
        .expect("bind");
    let server = endpoint.clone();
    let task = tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let Ok(conn) = incoming.await else { continue };
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut request = [0u8; 256];
                    let _ = recv.read(&mut request).await;
                    let _ = send.write_all(&data(1 << 20, 9)).await;
                    let _ = send.finish();
                }
            });
        }
    });
    (endpoint, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_lies_is_cut_off_and_the_next_one_finishes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (alice, bob) = (endpoint(tmp.path(), 1).await, endpoint(tmp.path(), 2).await);
    let key = FileKey::from_bytes([6; 32]);
    let plain = data(1_000_000, 2);
    let hash = alice.add_path(&sealed_file(tmp.path(), &key, &plain)).await.expect("add");
    let (mallory, task) = liar().await;
    let mallory_provider = Provider { id: mallory.id(), addrs: mallory.bound_sockets() };

    let e = bob.fetch(&mallory_provider, hash).await.expect_err("garbage is refused");
    assert!(matches!(e, BlobError::Fetch(..)), "{e:?}");
    assert!(!bob.has(hash).await.expect("has"), "nothing unverified is kept as the blob");
    let mut seen = Vec::new();
    let which = bob
        .fetch_any(&[mallory_provider, alice.provider()], hash, u64::MAX, |n| seen.push(n))
        .await
        .expect("fetch");
    assert_eq!(which, 1, "the honest provider finished it");
    let sealed = chitchat_proto::file::sealed_len(plain.len() as u64);
    assert_eq!(seen.last().copied(), Some(sealed), "progress ends at the blob's length");
    let mut opened = Vec::new();
    open_to(&key, plain.len() as u64, &read_blob(&bob, hash).await[..], &mut opened)
        .expect("opens");
    assert_eq!(opened, plain);
    task.abort();
    mallory.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_fetch_goes_on_where_it_stopped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let alice = endpoint(tmp.path(), 1).await;
    let bob = std::sync::Arc::new(endpoint(tmp.path(), 2).await);
    let key = FileKey::from_bytes([7; 32]);
    let plain = data(48 << 20, 3);
    let total = sealed_len(plain.len() as u64);
    let hash = alice.add_path(&sealed_file(tmp.path(), &key, &plain)).await.expect("add");

    // The fetch is stopped once some of the blob is in, before the end.
    let fetching = {
        let (bob, provider) = (bob.clone(), alice.provider());
        tokio::spawn(async move { bob.fetch(&provider, hash).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut have = 0;
    while have == 0 {
        assert!(Instant::now() < deadline, "nothing came");
        let local = bob.store().remote().local(hash).await.expect("local");
        have = local.local_bytes();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    fetching.abort();
    let _ = fetching.await;
    let local = bob.store().remote().local(hash).await.expect("local");
    let kept = local.local_bytes();
    assert!(kept > 0 && kept < total, "stopped half-way: {kept} of {total}");

    let moved = bob.fetch(&alice.provider(), hash).await.expect("resume");
    assert!(moved < total, "only the rest moved: {moved} of {total} (had {kept})");
    assert!(bob.has(hash).await.expect("has"));
    let mut opened = Vec::new();
    open_to(&key, plain.len() as u64, &read_blob(&bob, hash).await[..], &mut opened)
        .expect("opens");
    assert!(opened == plain, "the resumed blob opens to the file");
}

/// A stream added in pieces is the same blob as the file; a stream that fails part-way keeps
/// nothing under any hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_added_whole_or_not_at_all() {
    let tmp = tempfile::tempdir().expect("tmp");
    let alice = endpoint(tmp.path(), 1).await;
    let key = FileKey::from_bytes([8; 32]);
    let plain = data(300_000, 4);
    let mut sealed = Vec::new();
    seal_to(&key, &plain[..], &mut sealed).expect("seal");
    let pieces: Vec<std::io::Result<bytes::Bytes>> =
        sealed.chunks(7_000).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
    let hash = alice.add_stream(futures::stream::iter(pieces)).await.expect("add");
    assert_eq!(hash, iroh_blobs::Hash::new(&sealed), "the blob is the bytes streamed");
    assert!(alice.has(hash).await.expect("has"));
    assert_eq!(alice.local_bytes(hash).await.expect("local"), sealed.len() as u64);

    let other = {
        let mut s = sealed.clone();
        s[0] ^= 1;
        s
    };
    let broken = vec![
        Ok(bytes::Bytes::copy_from_slice(&other[..100_000])),
        Err(std::io::Error::other("the sender went away")),
    ];
    let e = alice.add_stream(futures::stream::iter(broken)).await.expect_err("a broken stream");
    assert!(matches!(e, BlobError::Store(_)), "{e:?}");
    let partial = iroh_blobs::Hash::new(&other[..100_000]);
    assert!(!alice.has(partial).await.expect("has"), "no blob of the part that came");
    let tags = alice.store().tags().list().await.expect("tags");
    use futures::StreamExt as _;
    assert_eq!(tags.count().await, 1, "one tag: the whole blob's");
}

/// A store that takes pushes takes only those its hook accepts, by the pusher's proven
/// endpoint id and the hash; a store opened plainly takes none. (Mallory holds no copy of
/// Alice's blob, so her push of its hash has nothing to send; what matters is that nothing of
/// hers is kept.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_taken_only_when_accepted() {
    let tmp = tempfile::tempdir().expect("tmp");
    let alice = endpoint(tmp.path(), 1).await;
    let mallory = endpoint(tmp.path(), 3).await;
    let plain_store = endpoint(tmp.path(), 4).await;
    let key = FileKey::from_bytes([9; 32]);
    let hash = alice.add_path(&sealed_file(tmp.path(), &key, &data(200_000, 5))).await.expect("a");
    let other = mallory.add_path(&sealed_file(tmp.path(), &key, &data(1000, 6))).await.expect("m");
    let alice_id = alice.provider().id;
    let served = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let serving = served.clone();
    let relay = Blobs::open_accepting(
        &tmp.path().join("relay"),
        &SecretKey::from_seed([2; 32]),
        &loopback(),
        move |who, h| who == alice_id && h == hash,
        move |_| serving.load(std::sync::atomic::Ordering::Relaxed),
    )
    .await
    .expect("open");

    // The receiver says nothing of a refusal: the push ends after PUSH_IDLE without progress.
    let refused = mallory.push(&relay.provider(), other).await;
    assert!(refused.is_err(), "the pusher learns that it was not taken");
    assert!(!relay.complete(other).await.expect("complete"), "a push not accepted is refused");
    let _ = mallory.push(&relay.provider(), hash).await;
    assert!(!relay.complete(hash).await.expect("complete"), "not from another pusher either");
    let e = alice.push(&relay.provider(), hash).await;
    e.expect("alice's push of the hash accepted");
    assert!(relay.complete(hash).await.expect("complete"), "all of it, once the push returns");
    assert!(!relay.has(hash).await.expect("has"), "pushed, not yet kept by name");
    relay.keep(hash).await.expect("keep");
    assert!(relay.has(hash).await.expect("has"));
    // Served only when the hook says so.
    let bob = endpoint(tmp.path(), 5).await;
    let e = bob.fetch(&relay.provider(), hash).await.expect_err("not served yet");
    assert!(matches!(e, BlobError::Fetch(..)), "{e:?}");
    assert_eq!(bob.local_bytes(hash).await.expect("local"), 0, "nothing came");
    served.store(true, std::sync::atomic::Ordering::Relaxed);
    bob.fetch(&relay.provider(), hash).await.expect("served");
    assert!(bob.has(hash).await.expect("has"));
    let _ = alice.push(&plain_store.provider(), hash).await;
    assert!(!plain_store.complete(hash).await.expect("complete"), "a plain store takes no push");
}

/// The cache drops the least recently used cached blobs first, never the one kept, and never a
/// blob outside it (one this device sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_drops_the_least_recently_used_first() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = endpoint(tmp.path(), 1).await;
    let key = FileKey::from_bytes([5; 32]);
    let mut hashes = Vec::new();
    for seed in 0..4 {
        let dir = tmp.path().join(format!("file{seed}"));
        std::fs::create_dir(&dir).expect("dir");
        let path = sealed_file(&dir, &key, &data(100_000, seed));
        hashes.push(store.add_path(&path).await.expect("add"));
    }
    let [a, b, c, own] = hashes[..] else { unreachable!() };
    let len = store.local_bytes(a).await.expect("len");
    store.cache(a, 1, false).await.expect("cache a");
    store.cache(b, 2, false).await.expect("cache b");
    store.cache(c, 3, false).await.expect("cache c");
    store.cache(a, 4, true).await.expect("a used again");
    store.cache(own, 5, true).await.expect("not cached: stays out");
    assert_eq!(store.cached_bytes().await.expect("bytes"), 3 * len);

    assert_eq!(store.evict(2 * len, None).await.expect("evict"), vec![b], "b was used last");
    assert!(!store.has(b).await.expect("has"), "forgotten");
    assert_eq!(store.evict(0, Some(c)).await.expect("evict"), vec![a], "c is kept");
    assert_eq!(store.cached_bytes().await.expect("bytes"), len);
    assert!(store.has(c).await.expect("has") && store.has(own).await.expect("has"));
    // Forgetting drops the cache's name too.
    store.forget(c).await.expect("forget");
    assert_eq!(store.cached_bytes().await.expect("bytes"), 0);
    assert_eq!(store.evict(0, None).await.expect("evict"), vec![], "nothing cached");
    assert!(store.has(own).await.expect("has"), "what this device sent stays");
    // No name is left for what went (garbage collection deletes only what no tag names).
    let names = |store: Blobs| async move {
        use futures::StreamExt as _;
        let list = store.store().tags().list().await.expect("tags");
        let tags: Vec<_> = list.map(|t| t.expect("tag")).collect().await;
        tags.into_iter()
            .map(|t| (String::from_utf8_lossy(&t.name.0).into_owned(), t.hash))
            .collect::<Vec<_>>()
    };
    let left = names(store.clone()).await;
    assert_eq!(left, vec![(format!("file/{own}"), own)], "{left:?}");

    // A cache written before its index (a cache tag alone) is indexed when the store opens:
    // a read refreshes it, and forgetting leaves no name.
    let d = store.add_path(&sealed_file(&tmp.path().join("file0"), &key, &data(100_000, 0))).await;
    let d = d.expect("add again");
    let legacy = format!("cache/{:020}/{d}/{len}", 7);
    store.store().tags().set(legacy.clone(), d).await.expect("legacy tag");
    store.shutdown().await;
    let store = endpoint(tmp.path(), 1).await;
    store.cache(d, 8, true).await.expect("refreshed");
    let left = names(store.clone()).await;
    assert!(left.iter().any(|(n, _)| n.starts_with(&format!("cache/{:020}/", 8))), "{left:?}");
    assert!(!left.iter().any(|(n, _)| *n == legacy), "the old entry went: {left:?}");
    assert_eq!(store.cached_bytes().await.expect("bytes"), len);
    store.forget(d).await.expect("forget");
    let left = names(store.clone()).await;
    assert_eq!(left, vec![(format!("file/{own}"), own)], "{left:?}");
    store.shutdown().await;
}

/// A blob travels as parts over a link that is not iroh (a relay-only node's link to its
/// relay): into a store with no endpoint, part by part, from where it stopped. A part of
/// another blob, a part with a flipped byte, one that says another length, and one that does not
/// start on a group are refused, and keep nothing; the blob that came out is the one sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_travels_in_parts_into_a_store_with_no_endpoint() {
    use chitchat_blobs::{GROUP_CHUNKS, PART_CHUNKS};
    let tmp = tempfile::tempdir().expect("tmp");
    let relay = endpoint(tmp.path(), 1).await;
    let node = Blobs::open_store(&tmp.path().join("store-2"), &SecretKey::from_seed([2; 32]))
        .await
        .expect("store alone");
    assert!(!node.has_endpoint() && node.provider().addrs.is_empty());
    let key = FileKey::from_bytes([5; 32]);
    let plain = data(1_500_000, 3);
    let hash = relay.add_path(&sealed_file(tmp.path(), &key, &plain)).await.expect("add");
    let len = sealed_len(plain.len() as u64);
    let other =
        relay.add_path(&sealed_file(tmp.path(), &key, &data(900_000, 4))).await.expect("add");
    let other_len = sealed_len(900_000);
    // The endpoint-less store cannot fetch over iroh.
    let e = node.fetch(&relay.provider(), hash).await.expect_err("no endpoint");
    assert!(matches!(e, BlobError::Bind(_)), "{e}");

    assert_eq!(node.next_missing(hash, len).await.expect("missing"), Some(0));
    // The first part comes.
    let part = relay.export_part(hash, 0, PART_CHUNKS).await.expect("export");
    assert!(part.len() <= chitchat_blobs::MAX_PART_LEN, "{}", part.len());
    node.import_part(hash, len, 0, PART_CHUNKS, part.clone()).await.expect("import");
    assert_eq!(node.next_missing(hash, len).await.expect("missing"), Some(PART_CHUNKS));

    // What is refused keeps nothing.
    let next = PART_CHUNKS;
    let foreign = relay.export_part(other, 0, PART_CHUNKS).await.expect("export other");
    let e = node.import_part(hash, other_len, next, PART_CHUNKS, foreign.clone()).await;
    assert!(e.is_err(), "a part of another blob");
    let e = node.import_part(hash, len, next, PART_CHUNKS, foreign).await;
    assert!(e.is_err(), "another blob's part, said to be this one's length");
    let mut flipped = relay.export_part(hash, next, PART_CHUNKS).await.expect("export");
    let at = flipped.len() - 100;
    flipped[at] ^= 1;
    assert!(node.import_part(hash, len, next, PART_CHUNKS, flipped).await.is_err(), "flipped");
    let part = relay.export_part(hash, next, PART_CHUNKS).await.expect("export");
    assert!(node.import_part(hash, len, next + 1, PART_CHUNKS, part.clone()).await.is_err());
    assert!(relay.export_part(hash, 3, 16).await.is_err(), "not on a group");
    assert!(relay.export_part(hash, 0, PART_CHUNKS + 1).await.is_err(), "over the part limit");
    let missing = node.next_missing(hash, len).await.expect("missing");
    assert!(missing.is_some_and(|m| m >= PART_CHUNKS && m % GROUP_CHUNKS == 0), "{missing:?}");
    // (The flipped part may have kept its groups before the flip: they were verified.)

    // The rest, from where it stopped.
    while let Some(first) = node.next_missing(hash, len).await.expect("missing") {
        let part = relay.export_part(hash, first, PART_CHUNKS).await.expect("export");
        node.import_part(hash, len, first, PART_CHUNKS, part).await.expect("import");
    }
    assert!(node.has(hash).await.expect("has"), "whole, and kept");
    assert_eq!(read_blob(&node, hash).await, read_blob(&relay, hash).await);
    let mut opened = Vec::new();
    open_to(&key, plain.len() as u64, &read_blob(&node, hash).await[..], &mut opened)
        .expect("opens");
    assert!(opened == plain);
    // A store that lacks the blob exports none of it.
    assert!(node.export_part(other, 0, 16).await.is_err());
}

//! Files between real `chitchat` daemons on loopback: the CLI streams a file to its daemon,
//! which seals it and keeps its blob; a member's daemon fetches the blob from the sender's
//! device over iroh (told where by a peer request), checks it, and the CLI writes it out.
//! Every promise is also tried against: a name that is a path, a file over the limit, content
//! that pretends to be a file, a sender that is away, and a sender that names another key than
//! it sealed under. Through a relay, a 100 MB file is pinned there before its message goes, and
//! a member fetches it while the sender is away; the relay's quota and size limit refuse files
//! whole, with the reason on the sender's side. Across two relays, the channel's other relay
//! replicates the file for its members, and refuses to replicate for a relay that is not the
//! channel's, or past its limits.

use std::path::Path;
use std::time::{Duration, Instant};

use chitchat_tests::{NodeProcess, RelayProcess};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(40);

/// `len` pseudo-random bytes (eight at a step: a debug build makes 100 MB in a moment).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state =
            state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn device(node: &NodeProcess) -> String {
    let v = node.json("GET", "/v1/status", None).await.expect("status");
    v["device"].as_str().expect("device").to_owned()
}

async fn peer_addr(node: &NodeProcess) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = node.json("GET", "/v1/network", None).await.expect("network");
        if let Some(a) = v["listening"].as_array().into_iter().flatten().find_map(Value::as_str) {
            return a.to_owned();
        }
        assert!(Instant::now() < deadline, "no address: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the history entry that carries a file named `name`; returns it.
async fn wait_file(node: &NodeProcess, channel: &str, name: &str) -> Value {
    node.wait_file(channel, name, WAIT).await.expect("the file's message")
}

/// Asks `node` to fetch the file of `message` until it works (within `within`); its answer.
async fn fetch_within(node: &NodeProcess, message: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        match node.json("POST", &format!("/v1/messages/{message}/fetch"), None).await {
            Ok(v) => return v,
            Err(e) => assert!(Instant::now() < deadline, "never fetched: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    path.to_str().expect("utf-8").to_owned()
}

/// Alice sends Bob files in a relay-less channel; Bob fetches them from her device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_goes_from_the_senders_device_to_a_member_and_opens() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Bob keeps 5.1 MB of fetched files: the 5 MB one, and not much more.
    let bob = NodeProcess::start(&[
        ("CHITCHAT_PROFILE_NAME", "bob"),
        ("CHITCHAT_FILES_CACHE_BYTES", "5100000"),
    ])
    .expect("bob");
    let bob_addr = peer_addr(&bob).await;
    let mut alice = NodeProcess::start(&[
        ("CHITCHAT_PROFILE_NAME", "alice"),
        ("CHITCHAT_NETWORK_PEERS", &bob_addr),
    ])
    .expect("alice");
    let bob_dev = device(&bob).await;
    let id = alice.cli(&["channel", "create", "files", "--lan"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "files", &bob_dev]).expect("invite bob");
    bob.wait_joined(&id, WAIT).await.expect("bob joins");

    // A 5 MB file, with a caption, through the CLI.
    let plain = data(5_000_000, 1);
    let path = write(tmp.path(), "photo.png", &plain);
    let sent =
        alice.cli(&["send-file", "files", &path, "--caption", "the view"]).expect("send-file");
    assert!(sent.contains("sending") || sent.contains("sent"), "{sent}");
    let mine = wait_file(&alice, &id, "photo.png").await;
    assert_eq!(mine["attachment"]["fetched"], true, "the sender has it: {mine}");
    let entry = wait_file(&bob, &id, "photo.png").await;
    assert_eq!(entry["body"], "the view", "{entry}");
    assert_eq!(entry["attachment"]["size"], 5_000_000, "{entry}");
    assert_eq!(entry["attachment"]["mime"], "image/png", "guessed from the name: {entry}");
    assert_eq!(entry["attachment"]["fetched"], false, "nothing fetched unasked: {entry}");
    let listed = bob.cli(&["history", "files"]).expect("history");
    assert!(
        listed.contains("[file photo.png, 4.8 MiB, image/png, not fetched] the view"),
        "{listed}"
    );

    // Reading before fetching is refused; then the CLI fetches and writes it out.
    let message = entry["id"].as_str().expect("id").to_owned();
    let early = bob.api().raw("GET", &format!("/v1/messages/{message}/file"), None).await;
    assert_eq!(early.expect("answer").0, 409, "not fetched yet");
    let out = tmp.path().join("fetched.png");
    let out_str = out.to_str().expect("utf-8");
    let said = bob.cli(&["fetch", &message, "--out", out_str]).expect("fetch");
    assert!(said.contains("5000000 bytes"), "{said}");
    assert!(std::fs::read(&out).expect("written") == plain, "the same bytes came out");
    let entry = wait_file(&bob, &id, "photo.png").await;
    assert_eq!(entry["attachment"]["fetched"], true, "{entry}");
    let again = bob.cli(&["fetch", &message, "--out", out_str]);
    assert!(again.is_err_and(|e| e.to_string().contains("exists")), "never overwritten");
    let twice = bob.json("POST", &format!("/v1/messages/{message}/fetch"), None).await;
    assert_eq!(twice.expect("fetch")["moved"], false, "a second fetch moves nothing");

    // An empty file travels too.
    let empty = write(tmp.path(), "empty.txt", b"");
    alice.cli(&["send-file", "files", &empty]).expect("send an empty file");
    let entry = wait_file(&bob, &id, "empty.txt").await;
    let empty_id = entry["id"].as_str().expect("id").to_owned();
    let out = tmp.path().join("empty.out");
    bob.cli(&["fetch", &empty_id, "--out", out.to_str().expect("utf-8")]).expect("fetch empty");
    assert_eq!(std::fs::read(&out).expect("written"), b"");

    // An image gets a thumbnail, made by the sender's node: a JPEG of at most 8 KiB in the
    // message, so that Bob sees it before any fetch.
    let mut png = Vec::new();
    image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([x as u8, y as u8, 128]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("png");
    let pic = write(tmp.path(), "pic.png", &png);
    alice.cli(&["send-file", "files", &pic]).expect("send an image");
    let entry = wait_file(&bob, &id, "pic.png").await;
    assert_eq!(entry["attachment"]["fetched"], false, "{entry}");
    let thumb = entry["attachment"]["thumbnail_base64"].as_str().expect("a thumbnail");
    use base64::Engine as _;
    let thumb = base64::engine::general_purpose::STANDARD.decode(thumb).expect("base64");
    assert!(thumb.len() <= 8192, "{} bytes", thumb.len());
    let shown = image::load_from_memory(&thumb).expect("a picture");
    assert!(shown.width() <= 160 && shown.height() <= 120, "{}x{}", shown.width(), shown.height());
    // Not an image: no thumbnail.
    let entry = wait_file(&bob, &id, "empty.txt").await;
    assert!(entry["attachment"].get("thumbnail_base64").is_none(), "{entry}");

    // What is refused, and sends nothing.
    let api = alice.api();
    let refused = |v: anyhow::Result<(u16, Vec<u8>)>| v.expect("answer").0;
    let path_name = api
        .raw("POST", &format!("/v1/channels/{id}/files?name=..%2Fetc%2Fpasswd"), Some(vec![1; 9]))
        .await;
    assert_eq!(refused(path_name), 400, "a name that is a path");
    let no_channel =
        api.raw("POST", "/v1/channels/nowhere/files?name=a.txt", Some(vec![1; 9])).await;
    assert_eq!(refused(no_channel), 404);
    let pretend = json!({"content": {"type": "attachment", "file": {"name": "a", "mime": "b",
        "size": 1, "hash": "00", "fetched": true}}});
    let pretend = alice.json("POST", &format!("/v1/channels/{id}/messages"), Some(pretend)).await;
    assert!(pretend.is_err_and(|e| e.to_string().contains("POST /v1/channels")), "not as content");
    let count = |v: &Value| v["history"]["messages"].as_array().map_or(0, Vec::len);
    let before =
        count(&alice.json("GET", &format!("/v1/channels/{id}/history"), None).await.expect("h"));

    // Over the sender's limit: refused whole, nothing sent.
    alice.restart_with(&[("CHITCHAT_FILES_MAX_SEND_BYTES", "1000000")]).expect("restart");
    let big = write(tmp.path(), "big.bin", &data(2_000_000, 2));
    let over = alice.cli(&["send-file", "files", &big]);
    assert!(over.is_err_and(|e| e.to_string().contains("limit")), "over the limit");
    let after =
        count(&alice.json("GET", &format!("/v1/channels/{id}/history"), None).await.expect("h"));
    assert_eq!(before, after, "nothing sent");

    // A sender that names another key than it sealed under: the fetch fails, keeps nothing.
    alice.restart_with(&[("CHITCHAT_FAULT", "seal-file-under-another-key")]).expect("restart");
    let liar = write(tmp.path(), "liar.bin", &data(300_000, 3));
    alice.cli(&["send-file", "files", &liar]).expect("send");
    let entry = wait_file(&bob, &id, "liar.bin").await;
    let liar_id = entry["id"].as_str().expect("id").to_owned();
    let e = bob.json("POST", &format!("/v1/messages/{liar_id}/fetch"), None).await;
    assert!(e.is_err_and(|e| e.to_string().contains("does not open")), "caught");
    let entry = wait_file(&bob, &id, "liar.bin").await;
    assert_eq!(entry["attachment"]["fetched"], false, "nothing kept: {entry}");

    // The sender away: the fetch fails clearly, and works once it is back.
    alice.restart().expect("restart");
    let later = write(tmp.path(), "later.bin", &data(200_000, 4));
    alice.cli(&["send-file", "files", &later]).expect("send");
    let entry = wait_file(&bob, &id, "later.bin").await;
    let later_id = entry["id"].as_str().expect("id").to_owned();
    alice.stop().expect("stop");
    let away = bob.json("POST", &format!("/v1/messages/{later_id}/fetch"), None).await;
    assert!(away.is_err_and(|e| e.to_string().contains("HTTP 502")), "unavailable");
    alice.restart().expect("restart");
    let v = fetch_within(&bob, &later_id, WAIT).await;
    assert_eq!(v["fetched"], true, "{v}");

    // Bob's cache went over its 5.1 MB with later.bin: the file used least recently, photo.png,
    // was dropped (later.bin, just fetched, stays), and is fetched again when asked for.
    // Alice's files are hers: never dropped.
    let entry = wait_file(&bob, &id, "photo.png").await;
    assert_eq!(entry["attachment"]["fetched"], false, "dropped from the cache: {entry}");
    assert_eq!(wait_file(&bob, &id, "later.bin").await["attachment"]["fetched"], true);
    let read = bob.api().raw("GET", &format!("/v1/messages/{message}/file"), None).await;
    assert_eq!(read.expect("answer").0, 409, "to be fetched again");
    let again = bob.json("POST", &format!("/v1/messages/{message}/fetch"), None).await;
    assert_eq!(again.expect("fetch again")["moved"], true);
    let (status, body) =
        bob.api().raw("GET", &format!("/v1/messages/{message}/file"), None).await.expect("read");
    assert!(status == 200 && body == plain, "the same bytes again");
    assert_eq!(wait_file(&alice, &id, "photo.png").await["attachment"]["fetched"], true);

    // A byte of Bob's copy rots on disk, mid-file: the read fails there (no whole file comes
    // out), the blob is dropped, and once its damaged data is deleted (garbage collection, within
    // a minute or two; a fetch before is refused, as it would take the damaged data back) a
    // fetch gets it again.
    let hash = entry["attachment"]["hash"].as_str().expect("hash").to_owned();
    let data = bob.home().join("blobs").join("data").join(format!("{hash}.data"));
    let mut bytes = std::fs::read(&data).expect("the blob's data file");
    bytes[3_000_000] ^= 0x55;
    std::fs::write(&data, &bytes).expect("rot");
    drop(bytes);
    let read = bob.api().raw("GET", &format!("/v1/messages/{message}/file"), None).await;
    assert!(
        !read.is_ok_and(|(s, b)| s == 200 && b == plain),
        "a rotten file never comes out whole"
    );
    let entry = wait_file(&bob, &id, "photo.png").await;
    assert_eq!(entry["attachment"]["fetched"], false, "dropped: {entry}");
    let early = bob.json("POST", &format!("/v1/messages/{message}/fetch"), None).await;
    assert!(early.is_err_and(|e| e.to_string().contains("damaged")), "not the damaged data again");
    let v = fetch_within(&bob, &message, Duration::from_secs(150)).await;
    assert_eq!(v["moved"], true, "{v}");
    let (status, body) =
        bob.api().raw("GET", &format!("/v1/messages/{message}/file"), None).await.expect("read");
    assert!(status == 200 && body == plain, "whole again");
}

/// Alice's 100 MB file is pinned at the relay before its message goes; Alice stops; Bob fetches
/// it from the relay. Past the user's quota, or past the relay's size limit, a file is refused
/// whole with the reason, and nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_reaches_a_member_through_the_relay_while_the_sender_is_away() {
    let tmp = tempfile::tempdir().expect("tmp");
    let relay = RelayProcess::start(
        |c| {
            c.replace("quota_bytes_per_user = 10737418240", "quota_bytes_per_user = 110000000")
                .replace("max_file_bytes = 2147483648", "max_file_bytes = 101000000")
        },
        &[],
    )
    .expect("relay");
    let mut alice = NodeProcess::start(&[]).expect("alice");
    let bob = NodeProcess::start(&[]).expect("bob");
    alice.register(&relay, "alice").await.expect("register alice");
    bob.register(&relay, "bob").await.expect("register bob");
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", "bob@localhost"]).expect("invite");
    bob.wait_joined(&id, WAIT).await.expect("bob joins");

    let plain = data(100_000_000, 7);
    let path = write(tmp.path(), "video.mp4", &plain);
    let sent = alice.cli(&["send-file", "general", &path]).expect("send-file");
    assert!(sent.contains("sending") || sent.contains("sent"), "{sent}");
    let entry = wait_file(&bob, &id, "video.mp4").await;
    let message = entry["id"].as_str().expect("id").to_owned();
    alice.stop().expect("alice stops");

    let out = tmp.path().join("video.out");
    bob.cli(&["fetch", &message, "--out", out.to_str().expect("utf-8")]).expect("fetch");
    let got = std::fs::read(&out).expect("written");
    assert!(got.len() == plain.len() && got == plain, "the same 100 MB came out");
    drop(got);

    // The quota (110 MB a user) and the size limit (101 MB) refuse files whole.
    alice.restart().expect("restart");
    let count = |v: &Value| v["history"]["messages"].as_array().map_or(0, Vec::len);
    let history = format!("/v1/channels/{id}/history");
    let before = count(&alice.json("GET", &history, None).await.expect("history"));
    let second = write(tmp.path(), "second.bin", &data(12_000_000, 8));
    let over = alice.cli(&["send-file", "general", &second]);
    let e = over.expect_err("over the quota");
    assert!(e.to_string().contains("quota") && e.to_string().contains("507"), "{e}");
    // (Sparse: its zeros cost no time to write.)
    let big = tmp.path().join("big.bin");
    std::fs::File::create(&big).and_then(|f| f.set_len(102_000_000)).expect("big");
    let big = big.to_str().expect("utf-8");
    let e = alice.cli(&["send-file", "general", big]).expect_err("over the size limit");
    assert!(e.to_string().contains("limit of 101000000"), "{e}");
    let after = count(&alice.json("GET", &history, None).await.expect("history"));
    assert_eq!(before, after, "nothing sent");
}

/// Alice (of relay A) sends a file in a channel Bob (of relay B) is in: A pins it, B replicates
/// it from A, and Bob fetches it from B with Alice away. B takes replication notices only from
/// the channel's relays, within its limits; a blob A does not have comes to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channels_other_relay_replicates_a_file_for_its_members() {
    use chitchat_proto::federation::{FedBody, FedRequest, FedResponse};
    use chitchat_proto::wire::ErrorCode;
    let tmp = tempfile::tempdir().expect("tmp");
    let start = || RelayProcess::start_federated(|c| c.to_owned()).expect("relay");
    let (a, b, c) = (start(), start(), start());
    let mut alice = NodeProcess::start(&[]).expect("alice");
    let bob = NodeProcess::start(&[]).expect("bob");
    alice.register(&a, "alice").await.expect("register alice");
    let bob_address = bob.register(&b, "bob").await.expect("register bob");
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", &bob_address]).expect("invite");
    bob.wait_joined(&id, WAIT).await.expect("bob joins");

    // Each relay publishes its blob endpoint.
    let wk: Value = serde_json::from_str(&b.http_get("/.well-known/chitchat/relay").expect("wk"))
        .expect("json");
    assert!(wk["files"].as_array().is_some_and(|f| !f.is_empty()), "{wk}");

    let plain = data(5_000_000, 11);
    let path = write(tmp.path(), "report.pdf", &plain);
    alice.cli(&["send-file", "general", &path]).expect("send-file");
    let entry = wait_file(&bob, &id, "report.pdf").await;
    let message = entry["id"].as_str().expect("id").to_owned();
    let hash: [u8; 32] = hex::decode(entry["attachment"]["hash"].as_str().expect("hash"))
        .expect("hex")
        .try_into()
        .expect("32 bytes");
    let deadline = Instant::now() + WAIT;
    while b.metric("chitchat_relay_files_replicated_total") < 1.0 {
        assert!(Instant::now() < deadline, "B never replicated the file");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.metric("chitchat_relay_files_pinned_total"), 1.0);
    alice.stop().expect("alice stops");
    let out = tmp.path().join("report.out");
    bob.cli(&["fetch", &message, "--out", out.to_str().expect("utf-8")]).expect("fetch from B");
    assert!(std::fs::read(&out).expect("written") == plain, "the same file came out");

    // What a hostile relay could ask of B.
    let channel = chitchat_proto::ordering::ChannelId(
        hex::decode(&id).expect("hex").try_into().expect("32 bytes"),
    );
    let far = 4_000_000_000_000;
    let ask = |from: &RelayProcess, hash: [u8; 32], len: u64, expires_ms: u64| FedRequest {
        from: from.host().to_owned(),
        body: FedBody::ReplicateFile {
            channel,
            hash,
            len,
            expires_ms,
            addrs: vec!["127.0.0.1:9".parse::<std::net::SocketAddr>().expect("addr").into()],
        },
    };
    let refused = |r: FedResponse| match r {
        FedResponse::Error { code, message } => (code, message),
        other => panic!("not refused: {other:?}"),
    };
    // A relay that is not the channel's.
    let as_c = c.as_relay_to(&b).await.expect("connect as C");
    let r = as_c.call_fed(&ask(&c, [7; 32], 1000, far)).await.expect("call");
    assert_eq!(refused(r).0, ErrorCode::Forbidden, "C orders nothing with B");
    // The channel's relay, past B's size limit, or with a pin that has expired.
    let as_a = a.as_relay_to(&b).await.expect("connect as A");
    let r = as_a.call_fed(&ask(&a, [7; 32], 3 << 30, far)).await.expect("call");
    assert!(matches!(refused(r).0, ErrorCode::QuotaExceeded { .. }), "over the size limit");
    let r = as_a.call_fed(&ask(&a, [7; 32], 1000, 1)).await.expect("call");
    assert_eq!(refused(r).0, ErrorCode::BadRequest, "expired");
    // A blob A does not have (at an address where no one answers): taken, then given up, and
    // nothing is pinned for it.
    let failures = b.metric("chitchat_relay_file_replication_failures_total");
    let r = as_a.call_fed(&ask(&a, [7; 32], 1000, far)).await.expect("call");
    assert_eq!(r, FedResponse::Replicating);
    let deadline = Instant::now() + Duration::from_secs(60);
    while b.metric("chitchat_relay_file_replication_failures_total") <= failures {
        assert!(Instant::now() < deadline, "the bad replication never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(b.metric("chitchat_relay_files_replicated_total"), 1.0, "nothing more pinned");
    // The file replicated already is answered at once.
    let r = as_a.call_fed(&ask(&a, hash, 1000, far)).await.expect("call");
    assert_eq!(r, FedResponse::Replicating);
}

/// Past its expiry the relay serves a file no more, and a member whose sender is away cannot
/// fetch it; they ask the channel for it, and a member whose device has it pins it at the relay
/// again, so that it can be fetched. A member answers such requests for a file once an hour at
/// most; a request for a file that is here, or for a message without one, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_asks_for_an_expired_file_and_another_uploads_it_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Pins last 8 seconds here, and expired ones are swept every second.
    let relay =
        RelayProcess::start(|c| c.to_owned(), &[("CHITCHAT_RELAY_FAULT", "short-file-expiry")])
            .expect("relay");
    let mut alice = NodeProcess::start(&[]).expect("alice");
    let bob = NodeProcess::start(&[]).expect("bob");
    let carol = NodeProcess::start(&[]).expect("carol");
    alice.register(&relay, "alice").await.expect("register alice");
    bob.register(&relay, "bob").await.expect("register bob");
    carol.register(&relay, "carol").await.expect("register carol");
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", "bob@localhost"]).expect("invite bob");
    alice.cli(&["invite", "general", "carol@localhost"]).expect("invite carol");
    bob.wait_joined(&id, WAIT).await.expect("bob joins");
    carol.wait_joined(&id, WAIT).await.expect("carol joins");

    let plain = data(2_000_000, 21);
    let path = write(tmp.path(), "notes.bin", &plain);
    alice.cli(&["send-file", "general", &path]).expect("send-file");
    let pinned_at = Instant::now();
    let message = wait_file(&carol, &id, "notes.bin").await["id"].as_str().expect("id").to_owned();
    wait_file(&bob, &id, "notes.bin").await;
    fetch_within(&carol, &message, WAIT).await;
    alice.stop().expect("alice stops");
    assert_eq!(relay.metric("chitchat_relay_files_pinned_total"), 1.0);

    // Past the pin's 8 seconds, nothing provides it.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(pinned_at.elapsed())).await;
    let out = tmp.path().join("notes.out");
    let out = out.to_str().expect("utf-8");
    let e = bob.cli(&["fetch", &message, "--out", out]).expect_err("expired, sender away");
    assert!(e.to_string().contains("request-file"), "the CLI says what to do: {e}");

    // Bob asks; Carol's device has it and pins it again; Bob fetches it.
    let asked = bob.cli(&["request-file", &message]).expect("request-file");
    assert!(asked.contains("asked"), "{asked}");
    let deadline = Instant::now() + WAIT;
    while relay.metric("chitchat_relay_files_pinned_total") < 2.0 {
        assert!(Instant::now() < deadline, "no one pinned the file again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bob.cli(&["fetch", &message, "--out", out]).expect("fetched after the request");
    assert!(std::fs::read(out).expect("written") == plain, "the same file came out");

    // Asking for a file that is here, or for a message that carries none, is refused.
    let reference = format!("{id}%2F{message}");
    let e = bob.json("POST", &format!("/v1/messages/{reference}/request"), None).await;
    let e = e.expect_err("here").to_string();
    assert!(e.contains("409"), "the file is here: {e}");
    bob.cli(&["send", "general", "hello"]).expect("send");
    let history = bob.json("GET", &format!("/v1/channels/{id}/history"), None).await.expect("h");
    let hello = history["history"]["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["body"] == "hello")
        .and_then(|m| m["id"].as_str())
        .expect("hello")
        .to_owned();
    let e = bob.json("POST", &format!("/v1/messages/{id}%2F{hello}/request"), None).await;
    let e = e.expect_err("no file").to_string();
    assert!(e.contains("400"), "a message without a file: {e}");

    // Carol pinned it again within the hour: a second request (sent as content, past Bob's
    // own check) is not answered again, once the new pin expired too.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let content = json!({ "content": { "type": "file_request", "target": message } });
    bob.json("POST", &format!("/v1/channels/{id}/messages"), Some(content))
        .await
        .expect("request as content");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(relay.metric("chitchat_relay_files_pinned_total"), 2.0, "once an hour at most");
    // The request is not a line of the history.
    let history = carol.json("GET", &format!("/v1/channels/{id}/history"), None).await.expect("h");
    let lines = history["history"]["messages"].as_array().map_or(0, Vec::len);
    assert_eq!(lines, 2, "the file and hello: {history}");
}

//! The relay binary on loopback, driven by the test client: registration, identity records,
//! KeyPackages, inbox, quotas, bad input, and a crash under load.

use std::collections::BTreeSet;
use std::sync::Arc;

use chitchat_proto::Timestamp;
use chitchat_proto::channel::Identity;
use chitchat_proto::codec::Bytes;
use chitchat_proto::identity::TrustedRelays;
use chitchat_proto::inbox;
use chitchat_proto::wire::{self, ErrorCode, Request, Response};
use chitchat_tests::{Client, Device, RelayProcess, register};
use rand_core::SeedableRng;

fn now() -> Timestamp {
    chitchat_relay::service::now()
}

fn code(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

/// A relay with closed registration, and `edit` applied to its config.
fn closed_relay(edit: impl FnOnce(String) -> String) -> RelayProcess {
    RelayProcess::start(|c| edit(c.to_owned()), &[]).expect("relay starts")
}

async fn client(relay: &RelayProcess) -> Client {
    Client::connect(relay.tcp_addr(), relay.peer_id()).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_directory_and_key_packages() {
    let relay = closed_relay(|c| c);
    let alice = Device::new(1);
    let bob = Device::new(2);
    let c = client(&relay).await;

    // Nothing but lookups before authenticating; a bad signature does not authenticate.
    let reg = Request::Register {
        token: None,
        local_name: "alice".into(),
        dir: alice.dir(1, vec![], now()),
    };
    assert_eq!(code(&c.call(&reg).await.expect("call")), Some(ErrorCode::Unauthenticated));
    let Response::Challenge { nonce } =
        c.call(&Request::Challenge { device: alice.id() }).await.expect("challenge")
    else {
        panic!("no challenge")
    };
    let forged = chitchat_proto::wire::AuthProof::sign(&bob.key, "localhost", nonce);
    let r = c
        .call(&Request::Authenticate { device: alice.id(), signature: forged })
        .await
        .expect("auth");
    assert_eq!(code(&r), Some(ErrorCode::Unauthenticated));
    // A signature for another relay's name does not work either.
    let Response::Challenge { nonce } =
        c.call(&Request::Challenge { device: alice.id() }).await.expect("challenge")
    else {
        panic!("no challenge")
    };
    let elsewhere = chitchat_proto::wire::AuthProof::sign(&alice.key, "evil.example", nonce);
    let r = c
        .call(&Request::Authenticate { device: alice.id(), signature: elsewhere })
        .await
        .expect("auth");
    assert_eq!(code(&r), Some(ErrorCode::Unauthenticated));
    assert_eq!(
        c.authenticate(&alice.key, "localhost").await.expect("auth"),
        Response::Authenticated
    );

    // Registration is closed: a token is needed, and only a real, unused, unexpired one works.
    assert_eq!(code(&c.call(&reg).await.expect("call")), Some(ErrorCode::RegistrationClosed));
    let bogus = Request::Register {
        token: Some("nope".into()),
        local_name: "alice".into(),
        dir: alice.dir(1, vec![], now()),
    };
    assert_eq!(code(&c.call(&bogus).await.expect("call")), Some(ErrorCode::TokenInvalid));
    let expired = relay.cli(&["invite", "--days", "0"]).expect("invite").trim().to_owned();
    let with_expired = Request::Register {
        token: Some(expired),
        local_name: "alice".into(),
        dir: alice.dir(1, vec![], now()),
    };
    assert_eq!(code(&c.call(&with_expired).await.expect("call")), Some(ErrorCode::TokenInvalid));
    let token = relay.cli(&["invite"]).expect("invite").trim().to_owned();
    // Another device's record is refused.
    let not_mine = Request::Register {
        token: Some(token.clone()),
        local_name: "alice".into(),
        dir: bob.dir(1, vec![], now()),
    };
    assert_eq!(code(&c.call(&not_mine).await.expect("call")), Some(ErrorCode::Forbidden));
    let ok = Request::Register {
        token: Some(token.clone()),
        local_name: "alice".into(),
        dir: alice.dir(1, vec![], now()),
    };
    let Response::Registered { sponsorship } = c.call(&ok).await.expect("register") else {
        panic!("not registered")
    };
    let trust =
        TrustedRelays { relays: vec![relay.relay_id().expect("well-known")], ..Default::default() };
    sponsorship.verify(&trust, now()).expect("the sponsorship verifies against .well-known");
    assert_eq!(sponsorship.address().to_string(), "alice@localhost");

    // The token is used up for anyone else; the name is taken.
    let cb = client(&relay).await;
    cb.authenticate(&bob.key, "localhost").await.expect("auth");
    let reuse = Request::Register {
        token: Some(token),
        local_name: "bob".into(),
        dir: bob.dir(1, vec![], now()),
    };
    assert_eq!(code(&cb.call(&reuse).await.expect("call")), Some(ErrorCode::TokenUsed));
    let fresh = relay.cli(&["invite"]).expect("invite").trim().to_owned();
    let taken = Request::Register {
        token: Some(fresh),
        local_name: "alice".into(),
        dir: bob.dir(1, vec![], now()),
    };
    assert_eq!(code(&cb.call(&taken).await.expect("call")), Some(ErrorCode::NameTaken));

    // Records: newer wins, stale and forged are refused; lookup serves a verifiable record.
    let v2 = alice.dir(2, vec![sponsorship.clone()], now());
    assert_eq!(
        c.call(&Request::PublishDir { dir: v2.clone() }).await.expect("publish"),
        Response::DirPublished
    );
    let stale = alice.dir(1, vec![sponsorship.clone()], now());
    assert_eq!(
        code(&c.call(&Request::PublishDir { dir: stale }).await.expect("call")),
        Some(ErrorCode::StaleSequence)
    );
    let mut forged = alice.dir(3, vec![sponsorship], now());
    forged.signature.0[0] ^= 1;
    assert_eq!(
        code(&c.call(&Request::PublishDir { dir: forged }).await.expect("call")),
        Some(ErrorCode::BadRequest)
    );
    let Response::Dirs(dirs) =
        cb.call(&Request::Lookup { local_name: "alice".into() }).await.expect("lookup")
    else {
        panic!("no dirs")
    };
    assert_eq!(dirs, vec![v2.clone()]);
    dirs[0].verify(&trust, now()).expect("the served record verifies");
    // By device id too (no authentication needed); unknown devices are left out.
    let stranger = Device::new(77).id();
    let by_id = Request::LookupDevices { devices: vec![stranger, alice.id()] };
    assert_eq!(cb.call(&by_id).await.expect("lookup devices"), Response::Dirs(vec![v2]));
    let too_many = Request::LookupDevices { devices: vec![stranger; wire::MAX_LOOKUP_DEVICES + 1] };
    assert_eq!(code(&cb.call(&too_many).await.expect("call")), Some(ErrorCode::BadRequest));

    // KeyPackages: real MLS KeyPackages; each claimed once; the last resort is kept.
    let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let mls = Identity::new(&alice.key);
    let kps: Vec<Bytes> =
        (0..2).map(|_| Bytes(mls.key_package(&provider, false).expect("kp"))).collect();
    let last = Bytes(mls.key_package(&provider, true).expect("kp"));
    let upload =
        Request::UploadKeyPackages { packages: kps.clone(), last_resort: Some(last.clone()) };
    assert_eq!(
        c.call(&upload).await.expect("upload"),
        Response::KeyPackagesStored { available: 2 }
    );
    // Bob's KeyPackage cannot be uploaded by Alice, and garbage is refused.
    let bobs = Bytes(Identity::new(&bob.key).key_package(&provider, false).expect("kp"));
    let wrong = Request::UploadKeyPackages { packages: vec![bobs], last_resort: None };
    assert_eq!(code(&c.call(&wrong).await.expect("call")), Some(ErrorCode::BadRequest));
    let junk =
        Request::UploadKeyPackages { packages: vec![Bytes(vec![1, 2, 3])], last_resort: None };
    assert_eq!(code(&c.call(&junk).await.expect("call")), Some(ErrorCode::BadRequest));
    let claim = Request::ClaimKeyPackage { device: alice.id() };
    // Bob's key is not registered: it claims nothing (a key costs nothing). Registered, it may.
    let r = cb.call(&claim).await.expect("claim");
    assert!(matches!(r, Response::Error { code: ErrorCode::Forbidden, .. }), "{r:?}");
    let token = relay.cli(&["invite"]).expect("invite").trim().to_owned();
    let register_bob = Request::Register {
        token: Some(token),
        local_name: "bob".into(),
        dir: bob.dir(1, vec![], now()),
    };
    let r = cb.call(&register_bob).await.expect("register");
    assert!(matches!(r, Response::Registered { .. }), "{r:?}");
    let mut claimed = Vec::new();
    for _ in 0..4 {
        match cb.call(&claim).await.expect("claim") {
            Response::KeyPackage(kp) => claimed.push(kp),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(claimed, vec![kps[0].0.clone(), kps[1].0.clone(), last.0.clone(), last.0]);
    let none = cb.call(&Request::ClaimKeyPackage { device: bob.id() }).await.expect("claim");
    assert_eq!(code(&none), Some(ErrorCode::NotFound));

    // The operator sees the user.
    let users = relay.cli(&["users"]).expect("users");
    assert!(users.contains("alice") && users.contains(&alice.id().0.to_hex()), "{users}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_enqueue_fetch_ack_quota_and_metrics() {
    let relay = closed_relay(|c| c.replace("max_items = 10000", "max_items = 5"));
    let alice = Device::new(1);
    let bob = Device::new(2);
    let ca = register(&relay, &alice, "alice").await;
    let cb = register(&relay, &bob, "bob").await;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let seal = |rng: &mut rand_chacha::ChaCha20Rng, text: &str| {
        inbox::seal(rng, bob.id(), &bob.inbox.public(), text.as_bytes()).expect("seal")
    };
    for i in 0..5 {
        let r = ca
            .call(&Request::Enqueue { envelope: seal(&mut rng, &format!("m{i}")) })
            .await
            .expect("enqueue");
        assert_eq!(r, Response::Enqueued { id: i });
    }
    // The inbox is full: an explicit quota error, and nothing is stored.
    let full = ca.call(&Request::Enqueue { envelope: seal(&mut rng, "m5") }).await.expect("call");
    assert!(matches!(code(&full), Some(ErrorCode::QuotaExceeded { .. })), "{full:?}");
    // An unknown recipient is refused.
    let stranger = Device::new(9);
    let lost = inbox::seal(&mut rng, stranger.id(), &stranger.inbox.public(), b"x").expect("seal");
    assert_eq!(
        code(&ca.call(&Request::Enqueue { envelope: lost }).await.expect("call")),
        Some(ErrorCode::NotFound)
    );

    // Bob fetches in pages, opens, acks; only Bob reads Bob's inbox.
    let Response::Items { items, more } =
        cb.call(&Request::Fetch { after: None, max: 3 }).await.expect("fetch")
    else {
        panic!("no items")
    };
    assert_eq!((items.len(), more), (3, true));
    let texts: Vec<String> = items
        .iter()
        .map(|i| {
            String::from_utf8(
                bob.inbox.open(bob.id(), i.envelope.as_sealed().expect("sealed")).expect("opens"),
            )
            .expect("utf-8")
        })
        .collect();
    assert_eq!(texts, ["m0", "m1", "m2"]);
    let Response::Items { items: alices, .. } =
        ca.call(&Request::Fetch { after: None, max: 10 }).await.expect("fetch")
    else {
        panic!("no items")
    };
    assert!(alices.is_empty(), "Alice's inbox is hers: empty");
    assert_eq!(cb.call(&Request::Ack { ids: vec![0, 1, 2] }).await.expect("ack"), Response::Acked);
    let Response::Items { items, more } =
        cb.call(&Request::Fetch { after: None, max: 10 }).await.expect("fetch")
    else {
        panic!("no items")
    };
    assert_eq!((items.iter().map(|i| i.id).collect::<Vec<_>>(), more), (vec![3, 4], false));
    // Room again after the ack.
    assert_eq!(
        ca.call(&Request::Enqueue { envelope: seal(&mut rng, "m6") }).await.expect("call"),
        Response::Enqueued { id: 5 }
    );

    let metrics = relay.http_get("/metrics").expect("metrics");
    assert!(metrics.contains("chitchat_relay_enqueues_total 6"), "{metrics}");
    assert!(metrics.contains("chitchat_relay_acks_total 3"), "{metrics}");
    assert!(metrics.contains("chitchat_relay_inbox_depth 3"), "{metrics}");
    assert!(metrics.contains("kind=\"quota_exceeded\""), "{metrics}");
    assert_eq!(relay.http_get("/health").expect("health"), "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_and_the_relay_keeps_serving() {
    let relay = closed_relay(|c| c);
    let c = client(&relay).await;
    let bad_request = |r: Response, why: &str| match r {
        Response::Error { code: ErrorCode::BadRequest, message } => {
            assert!(message.contains(why), "{message}")
        }
        other => panic!("expected BadRequest ({why}), got {other:?}"),
    };
    let decode =
        |bytes: Vec<u8>| wire::decode_frame::<Response>(&bytes).expect("a valid response frame");
    // Garbage, an empty frame, trailing bytes, a future version, an oversized frame.
    bad_request(decode(c.call_raw(vec![1, 0xff, 0xff, 0xff, 0xff, 0xff]).await.expect("call")), "");
    bad_request(decode(c.call_raw(vec![]).await.expect("call")), "malformed");
    let mut trailing =
        wire::encode_frame(&Request::Lookup { local_name: "a".into() }).expect("frame");
    trailing.push(0);
    bad_request(decode(c.call_raw(trailing).await.expect("call")), "trailing");
    let mut future =
        wire::encode_frame(&Request::Lookup { local_name: "a".into() }).expect("frame");
    future[0] = 9;
    bad_request(decode(c.call_raw(future).await.expect("call")), "version");
    let huge = vec![0u8; wire::MAX_FRAME_LEN + 100];
    bad_request(decode(c.call_raw(huge).await.expect("call")), "exceeds");
    let too_many = Request::Ack { ids: vec![0; wire::MAX_ACK_IDS + 1] };
    bad_request(c.call(&too_many).await.expect("call"), "too many");
    // Still serving, on the same connection and on a new one, over QUIC too.
    let r = c.call(&Request::Lookup { local_name: "nobody".into() }).await.expect("call");
    assert_eq!(r, Response::Dirs(vec![]));
    let quic = Client::connect(relay.quic_addr(), relay.peer_id()).await.expect("quic");
    assert_eq!(
        quic.call(&Request::Lookup { local_name: "nobody".into() }).await.expect("call"),
        Response::Dirs(vec![])
    );
    let metrics = relay.http_get("/metrics").expect("metrics");
    assert!(metrics.contains("kind=\"bad_request\""), "{metrics}");
}

/// kill -9 under concurrent enqueue load, then restart: every acknowledged enqueue is there, and
/// nothing the recipient acknowledged comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_under_load_loses_nothing_acknowledged() {
    let mut relay = closed_relay(|c| c);
    let bob = Device::new(2);
    let senders: Vec<Device> = (10..14).map(Device::new).collect();
    let cb = register(&relay, &bob, "bob").await;
    let mut clients = Vec::new();
    for (i, s) in senders.iter().enumerate() {
        clients.push(Arc::new(register(&relay, s, &format!("sender{i}")).await));
    }
    // Bob reads and acknowledges a first batch before the crash.
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    for i in 0..10 {
        let env =
            inbox::seal(&mut rng, bob.id(), &bob.inbox.public(), format!("early {i}").as_bytes())
                .expect("seal");
        clients[0].call(&Request::Enqueue { envelope: env }).await.expect("enqueue");
    }
    let Response::Items { items, .. } =
        cb.call(&Request::Fetch { after: None, max: 100 }).await.expect("fetch")
    else {
        panic!("no items")
    };
    let early: Vec<u64> = items.iter().map(|i| i.id).collect();
    assert_eq!(cb.call(&Request::Ack { ids: early.clone() }).await.expect("ack"), Response::Acked);

    // Four senders enqueue as fast as they can; the relay is killed while they do.
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let mut tasks = Vec::new();
    for (k, c) in clients.iter().enumerate() {
        let (c, acked, bob_id, bob_key) = (c.clone(), acked.clone(), bob.id(), bob.inbox.public());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(k as u64);
            for i in 0..100_000u32 {
                let env = inbox::seal(&mut rng, bob_id, &bob_key, format!("{k}/{i}").as_bytes())
                    .expect("seal");
                match c.call(&Request::Enqueue { envelope: env }).await {
                    Ok(Response::Enqueued { id }) => {
                        acked.lock().expect("lock").insert(id);
                    }
                    _ => break, // the relay is gone
                }
            }
        }));
    }
    while acked.lock().expect("lock").len() < 300 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    relay.kill9();
    for t in tasks {
        t.await.expect("task");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 300);

    relay.restart().expect("restart");
    let cb = client(&relay).await;
    cb.authenticate(&bob.key, "localhost").await.expect("auth");
    let mut seen = BTreeSet::new();
    let mut after = None;
    loop {
        let Response::Items { items, more } =
            cb.call(&Request::Fetch { after, max: 1024 }).await.expect("fetch")
        else {
            panic!("no items")
        };
        for i in &items {
            assert!(seen.insert(i.id), "item {} served twice", i.id);
            bob.inbox
                .open(bob.id(), i.envelope.as_sealed().expect("sealed"))
                .expect("every stored item opens");
        }
        after = items.last().map(|i| i.id).or(after);
        if !more {
            break;
        }
    }
    let missing: Vec<&u64> = acked.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged enqueues lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(early.iter().all(|id| !seen.contains(id)), "acknowledged items came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_push_by_waiting_fetch_and_batched_enqueues() {
    let relay = closed_relay(|c| c);
    let alice = Device::new(1);
    let bob = Device::new(2);
    let ca = register(&relay, &alice, "alice").await;
    let cb = Arc::new(register(&relay, &bob, "bob").await);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);

    // An empty inbox holds the request for its timeout, then answers empty.
    let t = std::time::Instant::now();
    let r = cb.call(&Request::Wait { after: None, max: 10, timeout_ms: 300 }).await.expect("wait");
    assert_eq!(r, Response::Items { items: vec![], more: false });
    assert!(t.elapsed() >= std::time::Duration::from_millis(250), "held for its timeout");

    // A waiting fetch is answered as soon as an item arrives: live push.
    let waiting = {
        let cb = cb.clone();
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            let r = cb
                .call(&Request::Wait { after: None, max: 10, timeout_ms: 30_000 })
                .await
                .expect("wait");
            (r, t.elapsed())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let env = inbox::seal(&mut rng, bob.id(), &bob.inbox.public(), b"pushed").expect("seal");
    assert_eq!(
        ca.call(&Request::Enqueue { envelope: env }).await.expect("enqueue"),
        Response::Enqueued { id: 0 }
    );
    let (r, waited) = waiting.await.expect("task");
    let Response::Items { items, .. } = r else { panic!("items") };
    assert_eq!(
        bob.inbox.open(bob.id(), items[0].envelope.as_sealed().expect("sealed")).expect("opens"),
        b"pushed"
    );
    assert!(
        waited < std::time::Duration::from_secs(10),
        "answered on arrival, not at the timeout: {waited:?}"
    );

    // A batch: each envelope answered on its own, in order; a bad one refuses only itself.
    let stranger = Device::new(9);
    let mut envelopes: Vec<_> = (0..5)
        .map(|i| {
            inbox::seal(&mut rng, bob.id(), &bob.inbox.public(), format!("b{i}").as_bytes())
                .expect("seal")
        })
        .collect();
    envelopes.insert(
        2,
        inbox::seal(&mut rng, stranger.id(), &stranger.inbox.public(), b"x").expect("seal"),
    );
    let Response::EnqueuedBatch(results) =
        ca.call(&Request::EnqueueBatch { envelopes }).await.expect("batch")
    else {
        panic!("batch answer")
    };
    use chitchat_proto::wire::EnqueueResult;
    assert_eq!(results.len(), 6);
    assert_eq!(results[2], EnqueueResult::Refused(ErrorCode::NotFound));
    let mut ids: Vec<u64> = results
        .iter()
        .filter_map(|r| match r {
            EnqueueResult::Enqueued(id) => Some(*id),
            EnqueueResult::Refused(_) => None,
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    let too_big = Request::EnqueueBatch {
        envelopes: vec![
            inbox::seal(&mut rng, bob.id(), &bob.inbox.public(), b"x").expect("seal");
            wire::MAX_ENQUEUE_BATCH + 1
        ],
    };
    assert_eq!(code(&ca.call(&too_big).await.expect("call")), Some(ErrorCode::BadRequest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_peer_are_bounded() {
    let relay =
        closed_relay(|c| c.replace("max_connections_per_peer = 8", "max_connections_per_peer = 2"));
    let identity = libp2p::identity::Keypair::generate_ed25519();
    let lookup = Request::Lookup { local_name: "nobody".into() };
    let mut open = Vec::new();
    for _ in 0..2 {
        let c = Client::connect_as(identity.clone(), relay.tcp_addr(), relay.peer_id())
            .await
            .expect("connect");
        assert_eq!(c.call(&lookup).await.expect("served"), Response::Dirs(vec![]));
        open.push(c);
    }
    // A third connection of the same peer is refused: it cannot connect, or is cut at once.
    let third = match Client::connect_as(identity.clone(), relay.tcp_addr(), relay.peer_id()).await
    {
        Err(_) => None,
        Ok(c) => {
            Some(tokio::time::timeout(std::time::Duration::from_secs(10), c.call(&lookup)).await)
        }
    };
    assert!(!matches!(third, Some(Ok(Ok(_)))), "the third connection was served: {third:?}");
    // The first two still work, and other peers are unaffected.
    assert_eq!(open[0].call(&lookup).await.expect("served"), Response::Dirs(vec![]));
    let other = client(&relay).await;
    assert_eq!(other.call(&lookup).await.expect("served"), Response::Dirs(vec![]));
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Many online devices each hold a waiting fetch (as every online node does); they hold no
/// request permit, so the relay keeps answering everyone else at once (before, 4,096 waits took
/// every permit and the relay answered `busy`). One device holds at most a few waits.
/// `CHITCHAT_TEST_WAITERS` sets how many devices wait (default 4,200; the long run uses 10,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_holding_waits_leave_the_relay_serving() {
    let n: u32 =
        std::env::var("CHITCHAT_TEST_WAITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(4200);
    let relay = closed_relay(|c| {
        c.replace("open_registration = false", "open_registration = true")
            .replace("anonymous_per_minute_per_ip = 1200", "anonymous_per_minute_per_ip = 10000000")
    });
    let pid = relay.info.pid;
    let idle = rss_kib(pid);
    let started = std::time::Instant::now();
    // Connect, authenticate and register every device, some at a time.
    let mut clients = Vec::with_capacity(n as usize);
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let joined = futures::future::join_all(chunk.iter().map(|i| {
            let relay = &relay;
            async move {
                let device = Device::numbered(*i);
                let c = client(relay).await;
                let auth = c.authenticate(&device.key, "localhost").await.expect("auth");
                assert_eq!(auth, Response::Authenticated);
                let register = Request::Register {
                    token: None,
                    local_name: format!("w{i}"),
                    dir: device.dir(1, vec![], now()),
                };
                let r = c.call(&register).await.expect("register");
                assert!(matches!(r, Response::Registered { .. }), "{r:?}");
                (device, Arc::new(c))
            }
        }))
        .await;
        clients.extend(joined);
    }
    let connected = started.elapsed();
    let before_waits = rss_kib(pid);
    // Every device holds a wait open.
    let waits: Vec<_> = clients
        .iter()
        .map(|(_, c)| {
            let c = c.clone();
            tokio::spawn(async move {
                c.call(&Request::Wait { after: None, max: 10, timeout_ms: 60_000 }).await
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let waiting = rss_kib(pid);

    // Everyone else is served at once: a look-up, an enqueue that wakes one waiter.
    let (_, first) = &clients[0];
    let t = std::time::Instant::now();
    let r = first.call(&Request::Lookup { local_name: "w1".into() }).await.expect("lookup");
    assert!(matches!(r, Response::Dirs(ref d) if d.len() == 1), "{r:?}");
    let (to, _) = &clients[1];
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    let env = inbox::seal(&mut rng, to.id(), &to.inbox.public(), b"wake").expect("seal");
    let r = first.call(&Request::Enqueue { envelope: env }).await.expect("enqueue");
    assert_eq!(r, Response::Enqueued { id: 0 });
    let served = t.elapsed();
    assert!(served < std::time::Duration::from_secs(5), "served in {served:?}");

    // One device holds at most four waits: its fifth is refused with a time to retry.
    let extra: Vec<_> = (0..3)
        .map(|_| {
            let c = first.clone();
            tokio::spawn(async move {
                c.call(&Request::Wait { after: None, max: 10, timeout_ms: 2_000 }).await
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let r = first.call(&Request::Wait { after: None, max: 10, timeout_ms: 2_000 }).await;
    assert!(matches!(r, Ok(Response::Error { code: ErrorCode::RateLimited { .. }, .. })), "{r:?}");
    for e in extra {
        assert!(matches!(e.await.expect("task"), Ok(Response::Items { .. })));
    }
    // The enqueue woke its waiter.
    let (r, _) = (waits.into_iter().nth(1).expect("wait").await.expect("task"), ());
    assert!(matches!(r, Ok(Response::Items { ref items, .. }) if items.len() == 1), "{r:?}");
    eprintln!(
        "{n} devices connected and registered in {connected:?}; relay RSS idle {idle} KiB, \
         connected {before_waits} KiB ({} B per connection), all waiting {waiting} KiB \
         ({} B per waiting fetch); served during the waits in {served:?}",
        (before_waits.saturating_sub(idle) * 1024) / u64::from(n),
        (waiting.saturating_sub(before_waits) * 1024) / u64::from(n),
    );
}

/// An empty (or short) admin token would open the admin API to requests without one: the relay
/// refuses to start with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_admin_token_refuses_to_start() {
    let mut relay = closed_relay(|c| c);
    relay.kill9();
    std::fs::write(relay.dir().join("admin.token"), "\n").expect("write");
    let err = relay.restart().expect_err("the relay refuses to start");
    assert!(err.to_string().contains("exited during start"), "{err}");
}

/// Revocation frames an attacker builds by hand, from a stolen phone: none revokes the laptop,
/// none plants a recovery key; the user's own revocation takes the phone out for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_frames_built_by_a_thief_are_refused() {
    use chitchat_proto::identity::{Address, RecoverySecret, Revocation};
    use chitchat_proto::{Dir, Label};
    let relay = closed_relay(|c| c);
    let (laptop, phone, bob) = (Device::new(1), Device::new(2), Device::new(3));
    let linked = |d: &Device, to: &Device, seq| {
        let mut body = d.dir(seq, vec![], now()).body;
        body.linked.insert(to.id());
        Dir::sign(&d.key, body)
    };
    // The laptop registers (with an invite) and sets the recovery key; the phone joins the
    // name without one (both records list each other), and cannot set a key of its own.
    let token = relay.cli(&["invite"]).expect("invite").trim().to_owned();
    let c1 = client(&relay).await;
    c1.authenticate(&laptop.key, "localhost").await.expect("auth");
    let reg = Request::Register {
        token: Some(token),
        local_name: "alice".into(),
        dir: linked(&laptop, &phone, 1),
    };
    assert!(matches!(c1.call(&reg).await.expect("register"), Response::Registered { .. }));
    let recovery = RecoverySecret::generate(&mut rand::rng());
    let set = Request::SetRecovery { key: recovery.key().public() };
    assert_eq!(c1.call(&set).await.expect("set"), Response::RecoverySet);
    let c2 = client(&relay).await;
    c2.authenticate(&phone.key, "localhost").await.expect("auth");
    let reg = Request::Register {
        token: None,
        local_name: "alice".into(),
        dir: linked(&phone, &laptop, 1),
    };
    assert!(matches!(c2.call(&reg).await.expect("register"), Response::Registered { .. }));
    let planted = Request::SetRecovery { key: phone.key.public() };
    assert_eq!(code(&c2.call(&planted).await.expect("plant")), Some(ErrorCode::Forbidden));
    register(&relay, &bob, "bob").await;

    let alice = Address::parse("alice@localhost").expect("address");
    let revoke = |r: Revocation| Request::Revoke { revocation: Box::new(r) };
    let of_laptop = || Revocation::new(laptop.id(), alice.clone());
    // The laptop's signature forged by the phone's key.
    let mut forged = of_laptop();
    forged.sign(&phone.key);
    let body = chitchat_proto::codec::encode(&forged.body);
    forged.signers.push((
        chitchat_proto::DeviceId(bob.key.public()),
        phone.key.sign(Label::Revocation, &body),
    ));
    forged.signers.sort_by_key(|(d, _)| *d);
    assert_eq!(code(&c2.call(&revoke(forged)).await.expect("call")), Some(ErrorCode::BadRequest));
    // A recovery signature under a key the thief made up.
    let mut guessed = of_laptop();
    guessed.sign(&phone.key);
    guessed.sign_recovery(&RecoverySecret::generate(&mut rand::rng()));
    assert_eq!(code(&c2.call(&revoke(guessed)).await.expect("call")), Some(ErrorCode::BadRequest));
    // The user named at another relay; the target signing for itself; no signature of the
    // asking device (a stranger's, valid, instead); a device of another user.
    let mut elsewhere =
        Revocation::new(laptop.id(), Address::parse("alice@evil.example").expect("a"));
    elsewhere.sign(&phone.key);
    assert_eq!(
        code(&c2.call(&revoke(elsewhere)).await.expect("call")),
        Some(ErrorCode::BadRequest)
    );
    let mut own = Revocation::new(phone.id(), alice.clone());
    own.sign(&phone.key);
    assert_eq!(code(&c2.call(&revoke(own)).await.expect("call")), Some(ErrorCode::BadRequest));
    let mut strangers = of_laptop();
    strangers.sign(&bob.key);
    assert_eq!(
        code(&c2.call(&revoke(strangers)).await.expect("call")),
        Some(ErrorCode::BadRequest)
    );
    let mut bobs = Revocation::new(bob.id(), alice.clone());
    bobs.sign(&phone.key);
    assert_eq!(code(&c2.call(&revoke(bobs)).await.expect("call")), Some(ErrorCode::NotFound));
    // Its own honest signature: taken, and not enough.
    let mut alone = of_laptop();
    alone.sign(&phone.key);
    match c2.call(&revoke(alone)).await.expect("call") {
        Response::Revoking { revoked: false, .. } => {}
        other => panic!("the phone alone revoked the laptop: {other:?}"),
    }
    let Response::Dirs(dirs) =
        c1.call(&Request::Lookup { local_name: "alice".into() }).await.expect("lookup")
    else {
        panic!("no lookup")
    };
    assert_eq!(dirs.len(), 2);

    // The laptop revokes the phone with the recovery code.
    let mut theirs = Revocation::new(phone.id(), alice.clone());
    theirs.sign(&laptop.key);
    theirs.sign_recovery(&recovery);
    match c1.call(&revoke(theirs)).await.expect("call") {
        Response::Revoking { revoked: true, .. } => {}
        other => panic!("not revoked: {other:?}"),
    }
    // The phone is refused everything, on this connection and a new one, and cannot register
    // again, under alice or under a new name with an invite.
    let r = c2.call(&Request::OwnDevices).await.expect("call");
    assert_eq!(code(&r), Some(ErrorCode::Revoked), "{r:?}");
    let c3 = client(&relay).await;
    c3.authenticate(&phone.key, "localhost").await.expect("auth");
    let r = c3.call(&Request::Fetch { after: None, max: 10 }).await.expect("call");
    assert_eq!(code(&r), Some(ErrorCode::Revoked));
    let token = relay.cli(&["invite"]).expect("invite").trim().to_owned();
    let again = Request::Register {
        token: Some(token),
        local_name: "mallory".into(),
        dir: phone.dir(3, vec![], now()),
    };
    assert_eq!(code(&c3.call(&again).await.expect("call")), Some(ErrorCode::Revoked));
    let Response::Dirs(dirs) =
        c1.call(&Request::Lookup { local_name: "alice".into() }).await.expect("lookup")
    else {
        panic!("no lookup")
    };
    assert_eq!(dirs.iter().map(Dir::device).collect::<Vec<_>>(), vec![laptop.id()]);
    // The laptop's list shows the revocation, signed by the laptop and the recovery key.
    let Response::OwnDevices(list) = c1.call(&Request::OwnDevices).await.expect("list") else {
        panic!("no list")
    };
    let revoked: Vec<_> = list.iter().filter_map(|d| d.revocation.as_ref()).collect();
    assert_eq!(revoked.len(), 1);
    assert_eq!(
        revoked[0].verify(Some(&recovery.key().public())).map(|(d, r)| (d.len(), r)),
        Ok((1, true))
    );
}

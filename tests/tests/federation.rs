//! Relays federating on loopback, each named by its address (`127.0.0.1:PORT`) and found
//! through its `.well-known`: look-ups and KeyPackage claims across relays, payloads forwarded
//! to a relay that is away (and a sender relay killed meanwhile), blocked hosts, and peers that
//! pretend to be a relay.

use chitchat_proto::Timestamp;
use chitchat_proto::channel::Identity;
use chitchat_proto::codec::Bytes;
use chitchat_proto::federation::{FEDERATION_PROTOCOL, FedBody, FedRequest, FedResponse};
use chitchat_proto::identity::TrustedRelays;
use chitchat_proto::inbox;
use chitchat_proto::wire::{Envelope, ErrorCode, Request, Response};
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

fn relay(edit: impl FnOnce(&str) -> String) -> RelayProcess {
    RelayProcess::start_federated(edit).expect("relay starts")
}

/// A metric's value from a relay's `/metrics` (0 when absent).
fn metric(relay: &RelayProcess, name: &str) -> f64 {
    relay.metric(name)
}

async fn upload_key_packages(c: &Client, device: &Device, n: usize) {
    let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let mls = Identity::new(&device.key);
    let packages = (0..n).map(|_| Bytes(mls.key_package(&provider, false).expect("kp"))).collect();
    let r = c.call(&Request::UploadKeyPackages { packages, last_resort: None }).await;
    assert!(matches!(r.expect("upload"), Response::KeyPackagesStored { .. }));
}

fn sealed(to: &Device, text: &str) -> inbox::SealedEnvelope {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(rand::random());
    inbox::seal(&mut rng, to.id(), &to.inbox.public(), text.as_bytes()).expect("seal")
}

/// What `device` finds in its inbox at `c`, opened, in order.
async fn inbox_texts(c: &Client, device: &Device) -> Vec<String> {
    let mut texts = Vec::new();
    let mut after = None;
    loop {
        let r = c.call(&Request::Fetch { after, max: 1024 }).await.expect("fetch");
        let Response::Items { items, more } = r else { panic!("fetch: {r:?}") };
        for item in &items {
            let Envelope::Sealed(e) = &item.envelope else { panic!("not sealed") };
            let plain = device.inbox.open(device.id(), e).expect("opens");
            texts.push(String::from_utf8(plain).expect("utf-8"));
        }
        after = items.last().map(|i| i.id).or(after);
        if !more {
            return texts;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_reach_users_of_other_relays() {
    let a = relay(|c| c.to_owned());
    // B lets each device's packages be claimed twice a minute.
    let b = relay(|c| {
        c.replace("claims_per_target_per_minute = 60", "claims_per_target_per_minute = 2")
    });
    let (alice, bob) = (Device::new(1), Device::new(2));
    let ca = register(&a, &alice, "alice").await;
    let cb = register(&b, &bob, "bob").await;
    upload_key_packages(&cb, &bob, 5).await;

    // Alice finds bob@B through her relay, which vouches for B's key as B publishes it.
    let r = ca
        .call(&Request::LookupAt { host: b.host().into(), local_name: "bob".into() })
        .await
        .expect("lookup");
    let Response::RemoteDirs { relay, dirs } = r else { panic!("lookup: {r:?}") };
    assert_eq!(relay, b.relay_id().expect("B's well-known"));
    assert_eq!(dirs.len(), 1);
    let trust = TrustedRelays { relays: vec![relay], ..Default::default() };
    let addresses = dirs[0].verify(&trust, now()).expect("bob's record verifies against B");
    assert_eq!(addresses[0].to_string(), format!("bob@{}", b.host()));
    // By device id too; an unknown user is an empty answer, not an error.
    let r = ca
        .call(&Request::LookupDevicesAt { host: b.host().into(), devices: vec![bob.id()] })
        .await
        .expect("lookup devices");
    assert!(matches!(r, Response::RemoteDirs { ref dirs, .. } if dirs.len() == 1), "{r:?}");
    let r = ca
        .call(&Request::LookupAt { host: b.host().into(), local_name: "nobody".into() })
        .await
        .expect("lookup");
    assert!(matches!(r, Response::RemoteDirs { ref dirs, .. } if dirs.is_empty()), "{r:?}");
    // Its own host answers from its own directory.
    let r = cb
        .call(&Request::LookupAt { host: b.host().into(), local_name: "bob".into() })
        .await
        .expect("lookup");
    assert!(matches!(r, Response::RemoteDirs { ref dirs, .. } if dirs.len() == 1), "{r:?}");

    // KeyPackage claims cross under B's per-target limit (2 a minute here).
    for _ in 0..2 {
        let r = ca
            .call(&Request::ClaimKeyPackageAt { host: b.host().into(), device: bob.id() })
            .await
            .expect("claim");
        assert!(matches!(r, Response::KeyPackage(_)), "{r:?}");
    }
    let r = ca
        .call(&Request::ClaimKeyPackageAt { host: b.host().into(), device: bob.id() })
        .await
        .expect("claim");
    assert!(matches!(code(&r), Some(ErrorCode::RateLimited { .. })), "{r:?}");

    // A sealed payload for bob goes to B once, and bob reads it there.
    let r = ca
        .call(&Request::Forward {
            host: b.host().into(),
            envelopes: vec![sealed(&bob, "hello from A")],
        })
        .await
        .expect("forward");
    assert_eq!(r, Response::Forwarded { queued: 1 });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let texts = inbox_texts(&cb, &bob).await;
        if !texts.is_empty() {
            assert_eq!(texts, vec!["hello from A".to_owned()]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the forwarded payload never arrived");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&a, "chitchat_relay_forwarded_total"), 1.0);

    // Clear errors: a relay that does not exist, a host that is not a host, Forward to itself,
    // and remote requests from a device not registered here.
    let r = ca
        .call(&Request::LookupAt { host: "127.0.0.1:1".into(), local_name: "bob".into() })
        .await
        .expect("lookup");
    let Response::Error { code: unavailable, message } = r else { panic!("{r:?}") };
    assert_eq!(unavailable, ErrorCode::Unavailable);
    assert!(message.contains("could not find the relay 127.0.0.1:1"), "{message}");
    let r = ca
        .call(&Request::LookupAt { host: "Not A Host".into(), local_name: "bob".into() })
        .await
        .expect("lookup");
    assert_eq!(code(&r), Some(ErrorCode::BadRequest));
    let r = ca
        .call(&Request::Forward { host: a.host().into(), envelopes: vec![sealed(&bob, "x")] })
        .await
        .expect("forward");
    assert_eq!(code(&r), Some(ErrorCode::BadRequest));
    let stranger = Client::connect(a.tcp_addr(), a.peer_id()).await.expect("connect");
    let r = stranger
        .call(&Request::LookupAt { host: b.host().into(), local_name: "bob".into() })
        .await
        .expect("lookup");
    assert_eq!(code(&r), Some(ErrorCode::Unauthenticated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_payloads_wait_for_a_relay_that_is_away_and_survive_a_crash() {
    let mut a = relay(|c| c.to_owned());
    let mut b = relay(|c| c.to_owned());
    let (alice, bob) = (Device::new(1), Device::new(2));
    let ca = register(&a, &alice, "alice").await;
    drop(register(&b, &bob, "bob").await);

    // B is away (killed); A takes 60 payloads for it and answers only once they are durable.
    b.kill9();
    for chunk in 0..3 {
        let envelopes =
            (0..20).map(|i| sealed(&bob, &format!("m{}", chunk * 20 + i))).collect::<Vec<_>>();
        let r =
            ca.call(&Request::Forward { host: b.host().into(), envelopes }).await.expect("forward");
        assert_eq!(r, Response::Forwarded { queued: 20 });
    }
    // A is killed too before B comes back: the queue is on A's disk.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    a.kill9();
    b.restart().expect("B restarts");
    a.restart().expect("A restarts");
    let cb = Client::connect(b.tcp_addr(), b.peer_id()).await.expect("connect");
    assert_eq!(cb.authenticate(&bob.key, b.host()).await.expect("auth"), Response::Authenticated);
    let want: Vec<String> = (0..60).map(|i| format!("m{i}")).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let texts = inbox_texts(&cb, &bob).await;
        // Exactly once, in order, whatever was retried.
        assert!(want.starts_with(&texts), "out of order or repeated: {texts:?}");
        if texts.len() == want.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of 60 forwarded payloads arrived",
            texts.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Nothing is left in A's queue.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while metric(&a, "chitchat_relay_forward_queue") != 0.0 {
        assert!(std::time::Instant::now() < deadline, "A's queue never emptied");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_host_gets_nothing_through_and_is_never_contacted() {
    let a = relay(|c| c.to_owned());
    let b = relay(|c| c.to_owned());
    let (alice, bob) = (Device::new(1), Device::new(2));
    let ca = register(&a, &alice, "alice").await;
    let cb = register(&b, &bob, "bob").await;
    a.cli(&["block", b.host()]).expect("block");

    // Nothing goes from A to B: look-ups, claims and forwards are refused at A ...
    for request in [
        Request::LookupAt { host: b.host().into(), local_name: "bob".into() },
        Request::LookupDevicesAt { host: b.host().into(), devices: vec![bob.id()] },
        Request::ClaimKeyPackageAt { host: b.host().into(), device: bob.id() },
        Request::Forward { host: b.host().into(), envelopes: vec![sealed(&bob, "x")] },
    ] {
        let r = ca.call(&request).await.expect("call");
        let Response::Error { code, message } = r else { panic!("{request:?} got {r:?}") };
        assert_eq!(code, ErrorCode::Forbidden, "{message}");
        assert!(message.contains("blocked"), "{message}");
    }
    // ... without A ever reaching B: B saw no federation request and no connection but bob's.
    assert_eq!(metric(&b, "chitchat_relay_federation_requests_total"), 0.0);
    assert_eq!(metric(&b, "chitchat_relay_connections"), 1.0);

    // And nothing from B is accepted at A.
    let r = cb
        .call(&Request::LookupAt { host: a.host().into(), local_name: "alice".into() })
        .await
        .expect("lookup");
    let Response::Error { code, message } = r else { panic!("{r:?}") };
    assert_eq!(code, ErrorCode::Forbidden, "{message}");
    let r = cb
        .call(&Request::Forward { host: a.host().into(), envelopes: vec![sealed(&alice, "x")] })
        .await
        .expect("forward");
    assert_eq!(r, Response::Forwarded { queued: 1 }, "B queues it: it does not know");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(inbox_texts(&ca, &alice).await.is_empty(), "a blocked relay's payload got in");
    assert_eq!(metric(&b, "chitchat_relay_forward_queue"), 1.0, "B keeps it and retries");

    // Unblocked, the queued payload arrives (B retries within its back-off).
    a.cli(&["unblock", b.host()]).expect("unblock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(45);
    while inbox_texts(&ca, &alice).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the payload never arrived after unblock");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_pretending_to_be_a_relay_is_refused() {
    let a = relay(|c| c.to_owned());
    let b = relay(|c| c.to_owned());
    let bob = Device::new(2);
    drop(register(&b, &bob, "bob").await);
    let lookup = |from: &str| FedRequest {
        from: from.to_owned(),
        body: FedBody::Lookup { local_name: "bob".into() },
    };
    let connect = || async {
        Client::connect_on(
            libp2p::identity::Keypair::generate_ed25519(),
            b.tcp_addr(),
            b.peer_id(),
            FEDERATION_PROTOCOL,
        )
        .await
        .expect("connect")
    };

    // A peer whose key is not A's says it is A: B reads A's .well-known and refuses.
    let impostor = connect().await;
    let r = impostor.call_fed(&lookup(a.host())).await.expect("call");
    let FedResponse::Error { code, message } = r else { panic!("{r:?}") };
    assert_eq!(code, ErrorCode::Forbidden);
    assert!(message.contains("is not the relay"), "{message}");
    // A host with no relay behind it, and a name that is no host, are refused too.
    let r = impostor.call_fed(&lookup("127.0.0.1:1")).await.expect("call");
    assert!(matches!(r, FedResponse::Error { code: ErrorCode::Unavailable, .. }), "{r:?}");
    let r = impostor.call_fed(&lookup("NOT A HOST")).await.expect("call");
    assert!(matches!(r, FedResponse::Error { .. }), "{r:?}");
    // Garbage is a typed error, and B still serves A afterwards.
    let raw = impostor.call_raw(vec![0xff; 40]).await.expect("call");
    let r: FedResponse = chitchat_proto::wire::decode_frame(&raw).expect("an error frame");
    assert!(matches!(r, FedResponse::Error { code: ErrorCode::BadRequest, .. }), "{r:?}");

    // The real A gets its answer (through a device of A).
    let alice = Device::new(1);
    let ca = register(&a, &alice, "alice").await;
    let r = ca
        .call(&Request::LookupAt { host: b.host().into(), local_name: "bob".into() })
        .await
        .expect("lookup");
    assert!(matches!(r, Response::RemoteDirs { ref dirs, .. } if dirs.len() == 1), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_looks_up_a_user_of_another_relay_and_trusts_only_what_its_relay_vouched_for() {
    use chitchat_tests::NodeProcess;
    let a = relay(|c| c.to_owned());
    let b = relay(|c| c.to_owned());
    let mut alice = NodeProcess::start(&[]).expect("node");
    let bob = NodeProcess::start(&[]).expect("node");
    alice.register(&a, "alice").await.expect("register");
    let bob_address = bob.register(&b, "bob").await.expect("register");
    assert_eq!(bob_address, format!("bob@{}", b.host()));
    let bob_device = bob.json("GET", "/v1/status", None).await.expect("status")["device"]
        .as_str()
        .expect("device")
        .to_owned();

    let v = alice.json("GET", &format!("/v1/users/{bob_address}"), None).await.expect("lookup");
    assert_eq!(v["devices"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["devices"][0]["device"], bob_device.as_str());
    assert_eq!(v["relay_key"], b.relay_id().expect("well-known").key.to_hex().as_str());
    // The relay's key is remembered: after a restart the record still verifies.
    alice.stop().expect("stop");
    alice.restart().expect("restart");
    let out = alice.cli(&["lookup", &bob_address]).expect("cli lookup");
    assert!(out.contains(&bob_device), "{out}");
    // Unknown users and relays are clear errors.
    let missing = alice.json("GET", &format!("/v1/users/nobody@{}", b.host()), None).await;
    assert!(format!("{missing:?}").contains("no device of nobody@"), "{missing:?}");
    let nowhere = alice.json("GET", "/v1/users/bob@127.0.0.1:1", None).await;
    assert!(format!("{nowhere:?}").contains("could not find the relay"), "{nowhere:?}");
}

/// A device registered at several relays, with its channel.
struct Orderee {
    device: Device,
    mls: chitchat_proto::channel::Identity,
    provider: openmls_rust_crypto::OpenMlsRustCrypto,
    channel: chitchat_proto::channel::Channel,
}

impl Orderee {
    /// A device registered at each of `relays` (as `alice0`, `alice1`, ...; a member submits
    /// through any of them), with a channel ordered by all of them, opened through the first.
    /// Returns it with a client at each relay.
    async fn open_at(relays: &[RelayProcess], name: &str, id: u8) -> (Self, Vec<Client>) {
        use chitchat_proto::channel::{AdminPolicy, Channel, ChannelConfig};
        let ids: Vec<_> = relays.iter().map(|r| r.relay_id().expect("well-known")).collect();
        let device = Device::new(1);
        let mut clients = Vec::new();
        for (i, r) in relays.iter().enumerate() {
            clients.push(register(r, &device, &format!("alice{i}")).await);
        }
        let mls = Identity::new(&device.key);
        let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let config = ChannelConfig {
            mime: "text/chitchat".into(),
            name: name.into(),
            relays: ids,
            admins: AdminPolicy::AnyMember,
            creator: mls.device(),
        };
        let id = device.channel(id);
        let channel = Channel::create(&provider, &mls, id, config).expect("create");
        let alice = Orderee { device, mls, provider, channel };
        let state = alice.channel.public_state(&alice.provider, &alice.mls).expect("export");
        let r = clients[0].call(&Request::OpenChannel { channel: id, state }).await.expect("open");
        assert_eq!(r, Response::ChannelOpened { next_epoch: 0 }, "{r:?}");
        (alice, clients)
    }

    fn stage(&mut self) -> chitchat_proto::channel::StagedCommit {
        let update = chitchat_proto::channel::Change { update: true, ..Default::default() };
        let check = chitchat_proto::channel::AcceptAll;
        self.channel.stage(&self.provider, &self.mls, &update, &check).expect("stage")
    }

    fn submission(&self, staged: &chitchat_proto::channel::StagedCommit) -> Request {
        Request::SubmitCommit(chitchat_proto::wire::CommitSubmission {
            channel: self.channel.id(),
            epoch: staged.epoch,
            commit: staged.commit.clone(),
            welcome: None,
            fanout: vec![],
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_order_a_channel_together_through_kills_and_freezes() {
    let mut relays = [relay(|c| c.to_owned()), relay(|c| c.to_owned()), relay(|c| c.to_owned())];
    let keys: Vec<_> = relays.iter().map(|r| r.relay_id().expect("well-known").key).collect();
    let (mut alice, mut clients) = Orderee::open_at(&relays, "three", 7).await;

    let mut winners = Vec::new();
    let mut last_staged = None;
    // Five commits through each relay in turn while another one is killed (kill -9, then
    // restarted) or frozen (SIGSTOP, then SIGCONT): no acknowledged commit is lost, and each
    // carries a majority certificate.
    let (kill, freeze) = (true, false);
    let plan = [
        (0usize, None),
        (0, Some((1usize, kill))),
        (1, Some((0, kill))),
        (0, Some((2, kill))),
        (1, Some((2, freeze))),
        (2, None),
    ];
    for (via, down) in plan {
        match down {
            Some((d, true)) => relays[d].kill9(),
            Some((d, false)) => relays[d].pause().expect("SIGSTOP"),
            None => {}
        }
        for _ in 0..5 {
            let staged = alice.stage();
            // Generous: on a loaded 2-core CI machine a restart after kill -9 and the election
            // after it once took longer than 30 s.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
            let cert = loop {
                match clients[via].call(&alice.submission(&staged)).await {
                    Ok(Response::CommitAccepted { cert }) => break cert,
                    // While a new leader is elected, or the client reconnects.
                    other => {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "epoch {} not ordered via relay {via}: {other:?}",
                            staged.epoch
                        );
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        if other.is_err() {
                            clients[via] =
                                Client::connect(relays[via].tcp_addr(), relays[via].peer_id())
                                    .await
                                    .expect("reconnect");
                            clients[via]
                                .authenticate(&alice.device.key, relays[via].host())
                                .await
                                .expect("auth");
                        }
                    }
                }
            };
            cert.verify(&keys).expect("a majority of the three relays signed");
            assert!(cert.signatures.len() >= 2);
            alice.channel.accept_own(&alice.provider, &cert).expect("merge");
            winners.push((staged.epoch, staged.hash));
            last_staged = Some(alice.submission(&staged));
        }
        if let Some((d, false)) = down {
            relays[d].resume().expect("SIGCONT");
        }
        if let Some((d, true)) = down {
            relays[d].restart().expect("restart");
            clients[d] = Client::connect(relays[d].tcp_addr(), relays[d].peer_id())
                .await
                .expect("reconnect");
            clients[d].authenticate(&alice.device.key, relays[d].host()).await.expect("auth");
        }
    }
    assert_eq!(winners.len(), 30);
    assert_eq!(winners.last().map(|w| w.0), Some(29));
    // No fork: every relay applied the 30 epochs, and each certifies the last winner again when
    // it is resubmitted there (its own log says that hash won epoch 29).
    let (last_epoch, last_hash) = *winners.last().expect("winners");
    let last = last_staged.expect("a last commit");
    for (i, c) in clients.iter().enumerate() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let state = alice.channel.public_state(&alice.provider, &alice.mls).expect("export");
            let r = c
                .call(&Request::OpenChannel { channel: alice.channel.id(), state })
                .await
                .expect("open");
            if r == (Response::ChannelOpened { next_epoch: 30 }) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "relay {i} is at {r:?}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let r = c.call(&last).await.expect("resubmit");
        let Response::CommitAccepted { cert } = r else { panic!("relay {i}: {r:?}") };
        assert_eq!((cert.body.epoch, cert.body.hash), (last_epoch, last_hash), "relay {i}");
        cert.verify(&keys).expect("a majority signed");
    }
    // Each relay fanned every winner out to its own members (here: the device, registered at
    // each) with the majority's certificate, once, in order; those that were down caught up.
    for (i, c) in clients.iter().enumerate() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let mut got = Vec::new();
            let mut after = None;
            loop {
                let r = c.call(&Request::Fetch { after, max: 1024 }).await.expect("fetch");
                let Response::Items { items, more } = r else { panic!("fetch: {r:?}") };
                for item in &items {
                    if let Envelope::Commit(oc) = &item.envelope {
                        oc.cert.verify(&keys).expect("fanned out with a majority certificate");
                        got.push((oc.cert.body.epoch, oc.cert.body.hash));
                    }
                }
                after = items.last().map(|i| i.id).or(after);
                if !more {
                    break;
                }
            }
            if got == winners {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "relay {i} fanned out {} of 30 commits: {:?}",
                got.len(),
                got.iter().map(|g| g.0).collect::<Vec<_>>()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_and_commits_reach_members_on_every_relay_of_the_channel() {
    use chitchat_proto::channel::{
        AcceptAll, AdminPolicy, Change, Channel, ChannelConfig, ChannelEvent, ChannelMessage,
        Identity,
    };
    use chitchat_proto::codec::Canonical;
    use chitchat_proto::wire::{
        ChannelPost, CommitSubmission, InboxPayload, PostResult, SealedWelcomes,
    };
    let (a, b) = (relay(|c| c.to_owned()), relay(|c| c.to_owned()));
    let ids = vec![a.relay_id().expect("A"), b.relay_id().expect("B")];
    let keys: Vec<_> = ids.iter().map(|r| r.key).collect();
    let (alice_dev, bob_dev) = (Device::new(1), Device::new(2));
    // Alice is registered at both relays, Bob at B only.
    let alice_a = register(&a, &alice_dev, "alice").await;
    let alice_b = register(&b, &alice_dev, "alice").await;
    let bob_b = register(&b, &bob_dev, "bob").await;
    let (alice_mls, bob_mls) = (Identity::new(&alice_dev.key), Identity::new(&bob_dev.key));
    let (alice_p, bob_p) = (
        openmls_rust_crypto::OpenMlsRustCrypto::default(),
        openmls_rust_crypto::OpenMlsRustCrypto::default(),
    );
    let kp = Bytes(bob_mls.key_package(&bob_p, false).expect("kp"));
    let r = bob_b.call(&Request::UploadKeyPackages { packages: vec![kp], last_resort: None }).await;
    assert!(matches!(r.expect("upload"), Response::KeyPackagesStored { .. }));

    let config = ChannelConfig {
        mime: "text/chitchat".into(),
        name: "two relays".into(),
        relays: ids.clone(),
        admins: AdminPolicy::AnyMember,
        creator: alice_mls.device(),
    };
    let id = alice_dev.channel(8);
    let mut alice = Channel::create(&alice_p, &alice_mls, id, config).expect("create");
    let state = alice.public_state(&alice_p, &alice_mls).expect("export");
    let r = alice_a.call(&Request::OpenChannel { channel: id, state }).await.expect("open");
    assert_eq!(r, Response::ChannelOpened { next_epoch: 0 });

    // Alice adds Bob through B (his relay knows his record), with his Welcome.
    let Response::KeyPackage(bobs_kp) =
        alice_b.call(&Request::ClaimKeyPackage { device: bob_dev.id() }).await.expect("claim")
    else {
        panic!("no key package")
    };
    let change = Change { add: vec![Bytes(bobs_kp)], ..Default::default() };
    let staged = alice.stage(&alice_p, &alice_mls, &change, &AcceptAll).expect("stage");
    let welcome = InboxPayload::Welcome {
        channel: id,
        welcome: Bytes(staged.welcome.clone().expect("welcome")),
    };
    let sealed = inbox::seal(
        &mut rand_chacha::ChaCha20Rng::seed_from_u64(3),
        bob_dev.id(),
        &bob_dev.inbox.public(),
        &welcome.to_bytes(),
    )
    .expect("seal");
    let sub = CommitSubmission {
        channel: id,
        epoch: 0,
        commit: staged.commit.clone(),
        welcome: Some(SealedWelcomes { envelopes: vec![sealed] }),
        fanout: vec![],
    };
    let r = alice_b.call(&Request::SubmitCommit(sub)).await.expect("submit");
    let Response::CommitAccepted { cert } = r else { panic!("{r:?}") };
    cert.verify(&keys).expect("both relays signed");
    alice.accept_own(&alice_p, &cert).expect("merge");

    // Bob's relay delivered his Welcome; he joins.
    let bob_items = |c: &Client| {
        let c = c.clone();
        async move {
            let r = c.call(&Request::Fetch { after: None, max: 100 }).await.expect("fetch");
            let Response::Items { items, .. } = r else { panic!("{r:?}") };
            let ids = items.iter().map(|i| i.id).collect();
            c.call(&Request::Ack { ids }).await.expect("ack");
            items
        }
    };
    // (B fans the ordered commit out when it applies its log entry, which may be a moment
    // after the certificate: the Welcome is waited for.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let welcome = loop {
        let items = bob_items(&bob_b).await;
        let welcome = items.iter().find_map(|i| match &i.envelope {
            Envelope::Sealed(e) => {
                let bytes = bob_dev.inbox.open(bob_dev.id(), e).expect("opens");
                match InboxPayload::from_bytes(&bytes).expect("payload") {
                    InboxPayload::Welcome { welcome, .. } => Some(welcome),
                    _ => None,
                }
            }
            _ => None,
        });
        if let Some(welcome) = welcome {
            break welcome;
        }
        assert!(std::time::Instant::now() < deadline, "no Welcome at B");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let mut bob = Channel::join(&bob_p, &welcome, &AcceptAll).expect("join");
    assert_eq!(bob.epoch_authenticator(), alice.epoch_authenticator());

    // Alice posts at A; A forwards it once to B, which puts it in Bob's inbox.
    let (msg_id, ChannelMessage::Application { message }) =
        alice.send(&alice_p, &alice_mls, now(), b"across relays").expect("send")
    else {
        panic!("an application message")
    };
    let r = alice_a
        .call(&Request::Post { posts: vec![ChannelPost { channel: id, message }] })
        .await
        .expect("post");
    assert!(
        matches!(&r, Response::Posted(p) if matches!(p[0], PostResult::Posted { .. })),
        "{r:?}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let got = loop {
        let items = bob_items(&bob_b).await;
        let mut events = Vec::new();
        for item in items {
            if let Envelope::Post(p) = item.envelope {
                let m = ChannelMessage::Application { message: p.message };
                events.extend(bob.process(&bob_p, now(), m, &AcceptAll).expect("process"));
            }
        }
        if !events.is_empty() {
            break events;
        }
        assert!(std::time::Instant::now() < deadline, "the post never reached Bob at B");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        matches!(&got[..], [ChannelEvent::Message { id, payload, .. }]
            if *id == msg_id && payload == b"across relays"),
        "{got:?}"
    );
    // A post a relay forwards is stored once, whatever is retried: nothing more arrives.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(bob_items(&bob_b).await.is_empty());
    // Bob, a member of B only, posts at B; Alice gets it at A (and at B, where she is too).
    let (_, ChannelMessage::Application { message }) =
        bob.send(&bob_p, &bob_mls, now(), b"back").expect("send")
    else {
        panic!("an application message")
    };
    let r = bob_b
        .call(&Request::Post { posts: vec![ChannelPost { channel: id, message }] })
        .await
        .expect("post");
    assert!(
        matches!(&r, Response::Posted(p) if matches!(p[0], PostResult::Posted { delivered: 1, .. })),
        "{r:?}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let items = bob_items(&alice_a).await;
        if items.iter().any(|i| matches!(&i.envelope, Envelope::Post(_))) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "Bob's post never reached A");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_of_two_relays_chat_in_one_channel() {
    use chitchat_tests::NodeProcess;
    use serde_json::json;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
    let (a, b) = (relay(|c| c.to_owned()), relay(|c| c.to_owned()));
    let alice = NodeProcess::start(&[]).expect("node");
    let carol = NodeProcess::start(&[]).expect("node");
    let bob = NodeProcess::start(&[]).expect("node");
    alice.register(&a, "alice").await.expect("register");
    carol.register(&a, "carol").await.expect("register");
    let bob_address = bob.register(&b, "bob").await.expect("register");

    // Alice's channel, ordered by A; Carol (of A) is in it before Bob (of B) is invited.
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", &format!("carol@{}", a.host())]).expect("invite carol");
    let out = alice.cli(&["invite", "general", &bob_address]).expect("invite bob");
    assert!(out.contains("added"), "{out}");
    // The channel is now ordered by both relays.
    let info = alice.json("GET", &format!("/v1/channels/{id}"), None).await.expect("info");
    let relays = info["relays"].to_string();
    assert!(relays.contains(a.host()) && relays.contains(b.host()), "{info}");
    let out = alice.cli(&["channel", "info", "general"]).expect("channel info");
    assert!(out.contains(&format!("ordered by {}, {}", a.host(), b.host())), "{out}");

    alice.cli(&["send", "general", "hello bob"]).expect("send");
    if let Err(e) = bob.wait_texts(&id, WAIT, |t| t == ["hello bob"]).await {
        let channels = bob.json("GET", "/v1/channels", None).await;
        let status = bob.json("GET", "/v1/status", None).await;
        let sent = alice.json("GET", &format!("/v1/channels/{id}/messages"), None).await;
        panic!("bob reads alice: {e}; bob: {channels:?} {status:?}; alice: {sent:?}");
    }
    carol.wait_texts(&id, WAIT, |t| t == ["hello bob"]).await.expect("carol reads alice");
    let body = json!({"text": "hi from B"});
    bob.json("POST", &format!("/v1/channels/{id}/messages"), Some(body)).await.expect("send");
    alice.wait_texts(&id, WAIT, |t| t.len() == 2).await.expect("alice reads bob");
    carol.wait_texts(&id, WAIT, |t| t.len() == 2).await.expect("carol reads bob");

    // Edits and reactions flow both ways.
    let hist = bob.json("GET", &format!("/v1/channels/{id}/history"), None).await.expect("h");
    let first = hist["history"]["messages"][0]["short"].as_str().expect("short").to_owned();
    let second = hist["history"]["messages"][1]["short"].as_str().expect("short").to_owned();
    bob.cli(&["react", &first, "👍"]).expect("react");
    alice.cli(&["edit", &first, "hello, bob"]).expect("edit");
    bob.cli(&["edit", &second, "hi from relay B"]).expect("edit");
    for node in [&alice, &bob, &carol] {
        node.wait_texts(&id, WAIT, |t| t == ["hello, bob", "hi from relay B"])
            .await
            .expect("every node sees both edits");
    }
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let h = alice.json("GET", &format!("/v1/channels/{id}/history"), None).await.expect("h");
        if h["history"]["messages"][0]["reactions"]["👍"] == json!([bob_address.clone()]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no reaction at alice: {h:#}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Bob is removed across relays: he learns it and gets nothing after.
    let out = alice.cli(&["remove", "general", &bob_address]).expect("remove");
    assert!(out.contains("removed"), "{out}");
    alice.cli(&["send", "general", "bob is gone"]).expect("send");
    carol
        .wait_texts(&id, WAIT, |t| t.last().map(String::as_str) == Some("bob is gone"))
        .await
        .expect("carol");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = bob.json("GET", "/v1/channels", None).await.expect("channels");
        if v["channels"][0]["left"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "bob never learnt of his removal: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!bob.texts(&id).await.expect("bob").iter().any(|t| t == "bob is gone"));

    // Bob was B's last user: B left the relay set in the same commit, and A orders the channel
    // alone again (its copy from before Bob came was stale, and is replaced).
    let info = alice.json("GET", &format!("/v1/channels/{id}"), None).await.expect("info");
    assert_eq!(info["relays"], json!([a.host()]), "{info}");
    let body = json!({"text": "just us"});
    carol.json("POST", &format!("/v1/channels/{id}/messages"), Some(body)).await.expect("send");
    alice
        .wait_texts(&id, WAIT, |t| t.last().map(String::as_str) == Some("just us"))
        .await
        .expect("alice reads carol at A alone");

    // Bob comes back: B joins the set again, and the group of A and B, whose copy is stale,
    // orders the channel again from its current state.
    let out = alice.cli(&["invite", "general", &bob_address]).expect("invite bob again");
    assert!(out.contains("added"), "{out}");
    let info = alice.json("GET", &format!("/v1/channels/{id}"), None).await.expect("info");
    let relays = info["relays"].to_string();
    assert!(relays.contains(a.host()) && relays.contains(b.host()), "{info}");
    alice.cli(&["send", "general", "welcome back"]).expect("send");
    bob.wait_texts(&id, WAIT, |t| t.last().map(String::as_str) == Some("welcome back"))
        .await
        .expect("bob reads alice again");
    let body = json!({"text": "glad to be back"});
    bob.json("POST", &format!("/v1/channels/{id}/messages"), Some(body)).await.expect("send");
    carol
        .wait_texts(&id, WAIT, |t| t.last().map(String::as_str) == Some("glad to be back"))
        .await
        .expect("carol reads bob");
}

/// The first user of a relay gets the Welcome through the relays, whatever happens to the node
/// that invited them: relay A dies after ordering the invite's commit and before its fan-out,
/// the inviting node is killed meanwhile and stays down, and after A comes back Bob (of B)
/// joins from the Welcome A queued for B with the fan-out it redid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_user_of_a_relay_joins_though_the_inviter_dies() {
    use chitchat_tests::NodeProcess;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
    let (mut a, b) = (relay(|c| c.to_owned()), relay(|c| c.to_owned()));
    let mut alice = NodeProcess::start(&[]).expect("node");
    let bob = NodeProcess::start(&[]).expect("node");
    alice.register(&a, "alice").await.expect("register");
    let bob_address = bob.register(&b, "bob").await.expect("register");
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["lookup", &bob_address]).expect("lookup");

    a.kill9();
    a.set_env("CHITCHAT_RELAY_FAULT", Some("exit-before-fanout"));
    a.restart().expect("relay A with the fault");
    let mut invite = alice.spawn_cli(&["invite", "general", &bob_address]).expect("invite");
    a.wait_exit(WAIT).expect("relay A aborts before the fan-out");
    alice.kill9();
    let _ = invite.kill();
    let _ = invite.wait();

    a.set_env("CHITCHAT_RELAY_FAULT", None);
    a.restart().expect("relay A again");
    bob.wait_joined(&id, WAIT).await.expect("bob never got the Welcome");

    // Alice's node comes back, finishes its intent, and the two talk.
    alice.restart().expect("alice again");
    // Her commit reaches her (answer to the resubmission, or her inbox): a message sent before
    // would be of the epoch Bob never had.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = alice.json("GET", &format!("/v1/channels/{id}"), None).await.expect("channel");
        if v["epoch"] == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "alice never merged her commit: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = alice.cli(&["send", "general", "you made it"]);
        if out.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "alice cannot send: {out:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    bob.wait_texts(&id, WAIT, |t| t.last().map(String::as_str) == Some("you made it"))
        .await
        .expect("bob reads alice");
}

/// A winner whose submitting relay dies before asking for its certificate is delivered by the
/// others: relay A orders Alice's invite of Dave in a channel of A, B and C, and aborts before
/// the certificate; the leader of the group certifies it with a majority and delivers it, so
/// Bob and Carol see Dave added and Dave joins while A is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_winner_its_relay_left_waiting_is_delivered_by_the_others() {
    use chitchat_tests::NodeProcess;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
    let mut a = relay(|c| c.to_owned());
    let (b, c) = (relay(|c| c.to_owned()), relay(|c| c.to_owned()));
    let alice = NodeProcess::start(&[]).expect("node");
    let bob = NodeProcess::start(&[]).expect("node");
    let carol = NodeProcess::start(&[]).expect("node");
    let dave = NodeProcess::start(&[]).expect("node");
    alice.register(&a, "alice").await.expect("register");
    let bob_address = bob.register(&b, "bob").await.expect("register");
    let carol_address = carol.register(&c, "carol").await.expect("register");
    let dave_address = dave.register(&b, "dave").await.expect("register");
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", &bob_address]).expect("invite bob");
    alice.cli(&["invite", "general", &carol_address]).expect("invite carol");
    alice.cli(&["lookup", &dave_address]).expect("lookup dave");
    async fn members(node: &NodeProcess, id: &str) -> String {
        let path = format!("/v1/channels/{id}/members");
        // Not joined yet: no such channel.
        node.json("GET", &path, None).await.map(|v| v.to_string()).unwrap_or_default()
    }
    let deadline = std::time::Instant::now() + WAIT;
    while !members(&carol, &id).await.contains("bob@") {
        assert!(std::time::Instant::now() < deadline, "carol never joined");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    a.kill9();
    a.set_env("CHITCHAT_RELAY_FAULT", Some("exit-before-deliver"));
    a.restart().expect("relay A with the fault");
    let mut invite = alice.spawn_cli(&["invite", "general", &dave_address]).expect("invite");
    a.wait_exit(WAIT).expect("relay A aborts before the certificate");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (at_bob, at_carol) = (members(&bob, &id).await, members(&carol, &id).await);
        if at_bob.contains("dave@") && at_carol.contains("dave@") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the waiting winner was never delivered: bob {at_bob}, carol {at_carol}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    dave.wait_joined(&id, WAIT).await.expect("dave never joined");
    let _ = invite.kill();
    let _ = invite.wait();
    a.set_env("CHITCHAT_RELAY_FAULT", None);
    a.restart().expect("relay A again");
    let body = serde_json::json!({"text": "welcome dave"});
    bob.json("POST", &format!("/v1/channels/{id}/messages"), Some(body)).await.expect("send");
    for node in [&alice, &carol, &dave] {
        node.wait_texts(&id, WAIT, |t| t.last().map(String::as_str) == Some("welcome dave"))
            .await
            .expect("everyone reads bob");
    }
}

/// One relay of three stops (SIGSTOP, then kill -9): the others go on ordering and
/// delivering, its user gets a clear error (and his message waits, durable, as `sending`), and
/// everything he missed arrives once it is back, in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_of_a_stopped_relay_get_a_clear_error_and_catch_up() {
    use chitchat_tests::NodeProcess;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
    let a = relay(|c| c.to_owned());
    let mut b = relay(|c| c.to_owned());
    let c = relay(|c| c.to_owned());
    let alice = NodeProcess::start(&[]).expect("node");
    let bob = NodeProcess::start(&[]).expect("node");
    let carol = NodeProcess::start(&[]).expect("node");
    let dave = NodeProcess::start(&[]).expect("node");
    alice.register(&a, "alice").await.expect("register");
    let bob_address = bob.register(&b, "bob").await.expect("register");
    let carol_address = carol.register(&c, "carol").await.expect("register");
    let dave_address = dave.register(&c, "dave").await.expect("register");
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", &bob_address]).expect("invite bob");
    alice.cli(&["invite", "general", &carol_address]).expect("invite carol");
    alice.cli(&["send", "general", "all three relays"]).expect("send");
    for node in [&bob, &carol] {
        node.wait_texts(&id, WAIT, |t| t == ["all three relays"]).await.expect("joined");
    }
    let last_is =
        |text: &'static str| move |t: &[String]| t.last().map(String::as_str) == Some(text);

    for (round, stop) in ["SIGSTOP", "kill -9"].into_iter().enumerate() {
        if round == 0 {
            b.pause().expect("freeze B");
        } else {
            b.kill9();
        }
        // The others go on: a message, and a commit (Dave joins in the first round).
        let text: &'static str = if round == 0 { "while B sleeps" } else { "while B is dead" };
        alice.cli(&["send", "general", text]).expect("send");
        carol.wait_texts(&id, WAIT, last_is(text)).await.expect("carol reads alice");
        if round == 0 {
            let out = alice.cli(&["invite", "general", &dave_address]).expect("invite dave");
            assert!(out.contains("added"), "{out}");
            alice.cli(&["send", "general", "hi dave"]).expect("send");
            dave.wait_texts(&id, WAIT, last_is("hi dave")).await.expect("dave joined");
        }
        // Bob's relay is away: a clear error, and his message waits as `sending`.
        let err = bob.cli(&["lookup", &carol_address]).expect_err("no relay");
        assert!(err.to_string().contains("relay unreachable"), "{stop}: {err}");
        let reply: &'static str = if round == 0 { "bob was frozen" } else { "bob was dead" };
        let out = bob.cli(&["send", "general", reply]).expect("durable while the relay is away");
        assert!(out.contains("sending"), "{out}");

        if round == 0 {
            b.resume().expect("thaw B");
        } else {
            b.restart().expect("B again");
        }
        bob.wait_texts(&id, WAIT, |t| t.iter().any(|x| x == text)).await.expect("bob catches up");
        for node in [&alice, &carol] {
            node.wait_texts(&id, WAIT, |t| t.iter().any(|x| x == reply))
                .await
                .expect("bob's message arrives");
        }
    }
    let v = bob.json("GET", &format!("/v1/channels/{id}/members"), None).await.expect("m");
    assert!(v.to_string().contains("dave@"), "bob learnt of dave: {v}");
}

/// A proof that relay C equivocated, given to relay A by a member, reaches relay B (which
/// orders with C too): both keep it and count it; a second copy is not new, and C's own
/// relay set is told nothing it could use to hide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_pass_an_equivocation_proof_on_to_the_relays_they_order_with() {
    use chitchat_proto::ordering::{
        CertSignature, ChannelId, CommitHash, EpochCertBody, Equivocation,
    };
    use chitchat_tests::NodeProcess;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
    let (a, b, c) = (relay(|c| c.to_owned()), relay(|c| c.to_owned()), relay(|c| c.to_owned()));
    let alice = NodeProcess::start(&[]).expect("node");
    let bob = NodeProcess::start(&[]).expect("node");
    let carol = NodeProcess::start(&[]).expect("node");
    alice.register(&a, "alice").await.expect("register");
    let bob_address = bob.register(&b, "bob").await.expect("register");
    let carol_address = carol.register(&c, "carol").await.expect("register");
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", &bob_address]).expect("invite bob");
    alice.cli(&["invite", "general", &carol_address]).expect("invite carol");
    alice.cli(&["send", "general", "hello"]).expect("send");
    for node in [&bob, &carol] {
        node.wait_texts(&id, WAIT, |t| t == ["hello"]).await.expect("joined");
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&id[2 * i..2 * i + 2], 16).expect("hex");
    }
    let channel = ChannelId(bytes);

    // C's key signs two hashes for one epoch (as a C that equivocates would).
    let c_key = chitchat_relay::home::RelayDir::new(c.dir()).load_key().expect("C's key");
    let body = |h: u8| EpochCertBody { channel, epoch: 1, hash: CommitHash([h; 32]) };
    let proof = Equivocation::from_pair(
        (body(1), CertSignature::sign(&c_key, &body(1))),
        (body(2), CertSignature::sign(&c_key, &body(2))),
    )
    .expect("a proof");
    let eve = Device::new(99);
    let client = register(&a, &eve, "eve").await;
    let r = client.call(&Request::Equivocation { proof: proof.clone() }).await.expect("answer");
    assert_eq!(r, Response::EquivocationNoted { new: true });
    let deadline = std::time::Instant::now() + WAIT;
    while metric(&b, "chitchat_relay_convicted") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "B never heard of the proof: A {}, B {}, C {}; A's federation failures: {}",
            metric(&a, "chitchat_relay_convicted"),
            metric(&b, "chitchat_relay_convicted"),
            metric(&c, "chitchat_relay_convicted"),
            metric(&a, "chitchat_relay_federation_failures"),
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&a, "chitchat_relay_convicted"), 1.0);
    let r = client.call(&Request::Equivocation { proof }).await.expect("answer");
    assert_eq!(r, Response::EquivocationNoted { new: false });
    assert_eq!(metric(&a, "chitchat_relay_convicted"), 1.0);

    // With C's signatures left out, A and B still certify (two of three): the channel goes on.
    alice.cli(&["send", "general", "still going"]).expect("send");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = alice.cli(&["remove", "general", &carol_address]);
        if out.as_ref().is_ok_and(|o| o.contains("removed")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no commit without C: {out:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    if let Err(e) = bob.wait_texts(&id, WAIT, |t| t.iter().any(|x| x == "still going")).await {
        let channels = bob.json("GET", "/v1/channels", None).await;
        let status = bob.json("GET", "/v1/status", None).await;
        let alice_info = alice.json("GET", &format!("/v1/channels/{id}"), None).await;
        panic!("bob: {e}; {channels:?} {status:?}; alice: {alice_info:?}");
    }
}

/// Rounds of the concurrent-commit race: 200 (about 35 s), or `CHITCHAT_FED_ROUNDS`.
fn rounds() -> usize {
    std::env::var("CHITCHAT_FED_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_members_on_three_relays_race_for_every_epoch() {
    use chitchat_proto::channel::{
        AcceptAll, AdminPolicy, Change, Channel, ChannelConfig, ChannelMessage, Identity,
    };
    use chitchat_proto::codec::Canonical;
    use chitchat_proto::wire::{CommitSubmission, InboxPayload, SealedWelcomes};
    const MEMBERS: usize = 10;
    // Every member proposes every round: more than the default 60 commits a minute.
    let fast = |c: &str| c.replace("submits_per_minute = 60", "submits_per_minute = 100000");
    let relays = [relay(fast), relay(fast), relay(fast)];
    let ids: Vec<_> = relays.iter().map(|r| r.relay_id().expect("well-known")).collect();
    struct M {
        device: Device,
        mls: Identity,
        provider: openmls_rust_crypto::OpenMlsRustCrypto,
        client: Client,
        channel: Option<Channel>,
        after: Option<u64>,
    }
    let mut m = Vec::new();
    for i in 0..MEMBERS {
        let device = Device::new(40 + i as u8);
        let client = register(&relays[i % 3], &device, &format!("m{i}")).await;
        let mls = Identity::new(&device.key);
        let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let kp = Bytes(mls.key_package(&provider, false).expect("kp"));
        let upload = Request::UploadKeyPackages { packages: vec![kp], last_resort: None };
        let r = client.call(&upload).await.expect("upload");
        assert!(matches!(r, Response::KeyPackagesStored { .. }));
        m.push(M { device, mls, provider, client, channel: None, after: None });
    }
    // Member 0 (of A) creates the channel, ordered by the three relays, and adds the others:
    // A looks the others up at their relays first (its credential check needs their records).
    let config = ChannelConfig {
        mime: "application/octet-stream".into(),
        name: "race".into(),
        relays: ids.clone(),
        admins: AdminPolicy::AnyMember,
        creator: m[0].mls.device(),
    };
    let id = m[0].device.channel(9);
    let channel = Channel::create(&m[0].provider, &m[0].mls, id, config).expect("create");
    let state = channel.public_state(&m[0].provider, &m[0].mls).expect("export");
    m[0].channel = Some(channel);
    let r = m[0].client.call(&Request::OpenChannel { channel: id, state }).await.expect("open");
    assert_eq!(r, Response::ChannelOpened { next_epoch: 0 });
    let mut kps = Vec::new();
    for i in 1..MEMBERS {
        let (host, device) = (relays[i % 3].host().to_owned(), m[i].device.id());
        let lookup = Request::LookupDevicesAt { host: host.clone(), devices: vec![device] };
        assert!(matches!(m[0].client.call(&lookup).await, Ok(Response::RemoteDirs { .. })));
        let r = m[0].client.call(&Request::ClaimKeyPackageAt { host, device }).await;
        let Ok(Response::KeyPackage(kp)) = r else { panic!("claim: {r:?}") };
        kps.push(Bytes(kp));
    }
    let change = Change { add: kps, ..Default::default() };
    let first = &mut m[0];
    let (p0, mls0) = (&first.provider, &first.mls);
    let staged =
        first.channel.as_mut().expect("ch").stage(p0, mls0, &change, &AcceptAll).expect("stage");
    let welcome =
        InboxPayload::Welcome { channel: id, welcome: Bytes(staged.welcome.clone().expect("w")) };
    let envelopes = (1..MEMBERS)
        .map(|i| {
            let d = &m[i].device;
            inbox::seal(
                &mut rand_chacha::ChaCha20Rng::seed_from_u64(i as u64),
                d.id(),
                &d.inbox.public(),
                &welcome.to_bytes(),
            )
            .expect("seal")
        })
        .collect();
    let sub = CommitSubmission {
        channel: id,
        epoch: 0,
        commit: staged.commit.clone(),
        welcome: Some(SealedWelcomes { envelopes }),
        fanout: vec![],
    };
    let r = m[0].client.call(&Request::SubmitCommit(sub)).await.expect("submit");
    let Response::CommitAccepted { cert } = r else { panic!("{r:?}") };
    let first = &mut m[0];
    first.channel.as_mut().expect("ch").accept_own(&first.provider, &cert).expect("merge");

    /// Drains a member's inbox at its relay: joins from a Welcome, applies commits.
    async fn catch_up(x: &mut M) {
        loop {
            let r =
                x.client.call(&Request::Fetch { after: x.after, max: 1024 }).await.expect("fetch");
            let Response::Items { items, more } = r else { panic!("{r:?}") };
            for item in &items {
                match &item.envelope {
                    Envelope::Sealed(e) if x.channel.is_none() => {
                        let bytes = x.device.inbox.open(x.device.id(), e).expect("opens");
                        if let Ok(InboxPayload::Welcome { welcome, .. }) =
                            InboxPayload::from_bytes(&bytes)
                        {
                            x.channel = Some(
                                Channel::join(&x.provider, &welcome, &AcceptAll).expect("join"),
                            );
                        }
                    }
                    Envelope::Commit(c) => {
                        if let Some(ch) = x.channel.as_mut() {
                            let msg = ChannelMessage::Commit {
                                commit: c.commit.clone(),
                                cert: c.cert.clone(),
                            };
                            // Its own commit, merged already, comes back as stale.
                            let _ = ch.process(&x.provider, now(), msg, &AcceptAll);
                        }
                    }
                    _ => {}
                }
            }
            x.after = items.last().map(|i| i.id).or(x.after);
            if !more {
                return;
            }
        }
    }

    let rounds = rounds();
    for round in 0..=rounds {
        // Everyone reaches the current epoch (from its own relay's inbox).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            for x in m.iter_mut() {
                catch_up(x).await;
            }
            let epochs: Vec<Option<u64>> =
                m.iter().map(|x| x.channel.as_ref().map(Channel::epoch)).collect();
            if epochs.iter().all(|e| *e == epochs[0] && e.is_some()) {
                let auths: Vec<Vec<u8>> = m
                    .iter()
                    .map(|x| x.channel.as_ref().expect("ch").epoch_authenticator())
                    .collect();
                assert!(auths.iter().all(|a| *a == auths[0]), "round {round}: a fork");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "round {round}: members at {epochs:?}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if round == rounds {
            break;
        }
        // All stage an update on the same epoch and submit through their own relays at once.
        let update = Change { update: true, ..Default::default() };
        let mut staged = Vec::new();
        for x in m.iter_mut() {
            let ch = x.channel.as_mut().expect("ch");
            staged.push(ch.stage(&x.provider, &x.mls, &update, &AcceptAll).expect("stage"));
        }
        let calls = m.iter().zip(&staged).map(|(x, s)| {
            let req = Request::SubmitCommit(CommitSubmission {
                channel: id,
                epoch: s.epoch,
                commit: s.commit.clone(),
                welcome: None,
                fanout: vec![],
            });
            let c = x.client.clone();
            async move { c.call(&req).await.expect("submit") }
        });
        let answers = futures::future::join_all(calls).await;
        let winners: Vec<usize> = answers
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Response::CommitAccepted { .. }))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: exactly one commit wins: {answers:?}");
        for (i, (x, r)) in m.iter_mut().zip(answers).enumerate() {
            let ch = x.channel.as_mut().expect("ch");
            match r {
                Response::CommitAccepted { cert } => {
                    ch.accept_own(&x.provider, &cert).expect("merge");
                }
                Response::CommitConflict { winner } => {
                    assert_eq!(
                        winner.hash, staged[winners[0]].hash,
                        "member {i} lost to the winner"
                    );
                    ch.discard_own(&x.provider).expect("discard");
                }
                other => panic!("round {round}, member {i}: {other:?}"),
            }
        }
    }
}

/// The federation demo of the README runs as documented: three users on two relays.
#[test]
fn the_two_relay_demo_script_runs() {
    let bin = chitchat_tests::binaries_dir();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../node/demo/two-relays.sh");
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
    };
    let ports = format!("{} {} {} {}", port(), port(), port(), port());
    let out = std::process::Command::new("bash")
        .arg(&script)
        .env("CHITCHAT_BIN", &bin)
        .env("CHITCHAT_DEMO_PORTS", &ports)
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let hosts: Vec<&str> = ports.split(' ').collect();
    let (a, b) = (format!("127.0.0.1:{}", hosts[1]), format!("127.0.0.1:{}", hosts[3]));
    for want in [
        format!("registered as bob@{b}"),
        format!("added bob@{b}"),
        format!("ordered by {a}, {b}"),
        "hello from relay B".to_owned(),
        "(edited)".to_owned(),
        format!("👋 carol@{a}"),
        "no equivocation, no fork".to_owned(),
        format!("removed bob@{b}"),
        format!("ordered by {a}\n"),
        "just the two of us on A".to_owned(),
    ] {
        assert!(stdout.contains(&want), "the demo's output lacks {want:?}:\n{stdout}");
    }
}

/// A channel Alice (of the first relay) created there, which her commit moved to all of
/// `relays`, adding Mallory (of the second) and one user of each other relay; Mallory's
/// forgeries of its state.
struct Moved {
    ids: Vec<chitchat_proto::RelayId>,
    id: chitchat_proto::ordering::ChannelId,
    alice: chitchat_proto::channel::Channel,
    alice_p: openmls_rust_crypto::OpenMlsRustCrypto,
    alice_mls: Identity,
    alice_a: Client,
    mallory_b: Client,
    mallory_dev: Device,
    mallory_mls: Identity,
    moved: chitchat_proto::channel::ChannelConfig,
}

impl Moved {
    async fn new(relays: &[&RelayProcess]) -> Self {
        use chitchat_proto::channel::{AcceptAll, AdminPolicy, Change, Channel, ChannelConfig};
        use chitchat_proto::wire::CommitSubmission;
        let ids: Vec<_> = relays.iter().map(|r| r.relay_id().expect("relay id")).collect();
        let (alice_dev, mallory_dev) = (Device::new(1), Device::new(6));
        let alice_a = register(relays[0], &alice_dev, "alice").await;
        let (alice_mls, mallory_mls) =
            (Identity::new(&alice_dev.key), Identity::new(&mallory_dev.key));
        let alice_p = openmls_rust_crypto::OpenMlsRustCrypto::default();
        // Mallory on the second relay, one more user on each further relay; A learns their
        // records (and their relays' keys) through look-ups, and claims their KeyPackages.
        let mut joiners = Vec::new();
        let mut mallory_b = None;
        for (k, r) in relays.iter().enumerate().skip(1) {
            let dev = if k == 1 { Device::new(6) } else { Device::new(20 + k as u8) };
            let c = register(r, &dev, if k == 1 { "mallory" } else { "carol" }).await;
            upload_key_packages(&c, &dev, 1).await;
            let r2 = alice_a
                .call(&Request::LookupDevicesAt { host: r.host().into(), devices: vec![dev.id()] })
                .await
                .expect("lookup");
            assert!(matches!(r2, Response::RemoteDirs { .. }), "{r2:?}");
            let r2 = alice_a
                .call(&Request::ClaimKeyPackageAt { host: r.host().into(), device: dev.id() })
                .await
                .expect("claim");
            let Response::KeyPackage(kp) = r2 else { panic!("{r2:?}") };
            joiners.push(Bytes(kp));
            if k == 1 {
                mallory_b = Some(c);
            }
        }

        // Alice's channel, ordered by A alone; her commit moves it to all the relays.
        let config = ChannelConfig {
            mime: "text/chitchat".into(),
            name: "moving".into(),
            relays: vec![ids[0].clone()],
            admins: AdminPolicy::AnyMember,
            creator: alice_mls.device(),
        };
        let id = alice_dev.channel(9);
        let mut alice = Channel::create(&alice_p, &alice_mls, id, config.clone()).expect("create");
        let state = alice.public_state(&alice_p, &alice_mls).expect("export");
        let r = alice_a.call(&Request::OpenChannel { channel: id, state }).await.expect("open");
        assert_eq!(r, Response::ChannelOpened { next_epoch: 0 });
        let moved = ChannelConfig { relays: ids.clone(), ..config };
        let change = Change { add: joiners, config: Some(moved.clone()), ..Default::default() };
        let staged = alice.stage(&alice_p, &alice_mls, &change, &AcceptAll).expect("stage");
        let sub = CommitSubmission {
            channel: id,
            epoch: 0,
            commit: staged.commit.clone(),
            welcome: None,
            fanout: vec![],
        };
        let r = alice_a.call(&Request::SubmitCommit(sub)).await.expect("submit");
        let Response::CommitAccepted { cert } = r else { panic!("{r:?}") };
        alice.accept_own(&alice_p, &cert).expect("merge");
        assert_eq!(alice.epoch(), 1);
        let mallory_b = mallory_b.expect("a second relay");
        Self {
            ids,
            id,
            alice,
            alice_p,
            alice_mls,
            alice_a,
            mallory_b,
            mallory_dev,
            mallory_mls,
            moved,
        }
    }

    /// Mallory's states: groups of her own with the channel's id (each in a store of its own),
    /// naming the new set from epoch 0, from epoch 1, and from epoch 2; she certifies their
    /// commits herself while she is their only orderer.
    fn forgeries(&self) -> Vec<chitchat_proto::channel::PublicState> {
        use chitchat_proto::channel::{AcceptAll, Change, Channel, ChannelConfig};
        use chitchat_proto::ordering::{CertSignature, EpochCert, EpochCertBody};
        let forge = |first: Vec<chitchat_proto::RelayId>, changes: Vec<Change>| {
            let p = openmls_rust_crypto::OpenMlsRustCrypto::default();
            let config = ChannelConfig {
                relays: first,
                creator: self.mallory_mls.device(),
                ..self.moved.clone()
            };
            let mut c = Channel::create(&p, &self.mallory_mls, self.id, config).expect("create");
            for change in changes {
                let s = c.stage(&p, &self.mallory_mls, &change, &AcceptAll).expect("stage");
                let body = EpochCertBody { channel: self.id, epoch: s.epoch, hash: s.hash };
                let sig = CertSignature::sign(&self.mallory_dev.key, &body);
                c.accept_own(&p, &EpochCert { body, signatures: vec![sig] }).expect("merge");
            }
            c.public_state(&p, &self.mallory_mls).expect("export")
        };
        let to_all = Change {
            config: Some(ChannelConfig {
                creator: self.mallory_mls.device(),
                ..self.moved.clone()
            }),
            ..Default::default()
        };
        let update = Change { update: true, ..Default::default() };
        vec![
            forge(self.ids.clone(), vec![]),
            forge(vec![], vec![to_all.clone()]),
            forge(vec![], vec![update, to_all]),
        ]
    }

    /// Mallory offers each forgery to her relay, which refuses it (`Forbidden`).
    async fn mallory_is_refused(&self, forgeries: Vec<chitchat_proto::channel::PublicState>) {
        for (epoch, state) in forgeries.into_iter().enumerate() {
            let open = Request::OpenChannel { channel: self.id, state };
            let r = self.mallory_b.call(&open).await.expect("open");
            assert_eq!(
                code(&r),
                Some(ErrorCode::Forbidden),
                "a forged state of epoch {epoch}: {r:?}"
            );
        }
    }

    /// Alice opens the channel in the group of the new set with her true state, and that group
    /// orders and certifies her next commit.
    async fn alice_goes_on(mut self) {
        use chitchat_proto::channel::{AcceptAll, Change};
        use chitchat_proto::wire::CommitSubmission;
        let state = self.alice.public_state(&self.alice_p, &self.alice_mls).expect("export");
        let r = self
            .alice_a
            .call(&Request::OpenChannel { channel: self.id, state })
            .await
            .expect("open");
        assert_eq!(r, Response::ChannelOpened { next_epoch: 1 });
        let update = Change { update: true, ..Default::default() };
        let staged =
            self.alice.stage(&self.alice_p, &self.alice_mls, &update, &AcceptAll).expect("stage");
        let sub = CommitSubmission {
            channel: self.id,
            epoch: 1,
            commit: staged.commit.clone(),
            welcome: None,
            fanout: vec![],
        };
        let r = self.alice_a.call(&Request::SubmitCommit(sub)).await.expect("submit");
        let Response::CommitAccepted { cert } = r else { panic!("{r:?}") };
        let keys: Vec<_> = self.ids.iter().map(|r| r.key).collect();
        cert.verify(&keys).expect("a majority of the new set signed");
        self.alice.accept_own(&self.alice_p, &cert).expect("merge");
    }
}

/// A channel's relay set grows from {A} to {A, B} by a commit A alone ordered. Before any
/// honest member opens it in the group of {A, B}, Mallory (on B, where no copy of the channel
/// is) offers B states of her own making for it: one of the epoch before the move, one of its
/// epoch, one past it. B asks A, which ordered the move and holds the very state, and refuses
/// each (the first also because a channel's first state comes from its creator, whose device
/// its id names); Alice's true state opens it, and the group of {A, B} orders and certifies
/// from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_state_cannot_open_a_channel_that_moved() {
    let (a, b) = (relay(|c| c.to_owned()), relay(|c| c.to_owned()));
    let moved = Moved::new(&[&a, &b]).await;
    moved.mallory_is_refused(moved.forgeries()).await;
    moved.alice_goes_on().await;
}

/// The channel moves from {A} to {A, B, C}, and A, the only relay that ordered the move, is
/// killed before anyone opens the channel in the new group, where B and C make a majority
/// without it. Mallory (on B) offers her forgeries: the one of epoch 0 is refused (not her
/// channel's id), and the later ones wait (`Unavailable`) instead of opening the channel with
/// no relay to vouch for them (before, B and C found nothing to judge them by and ordered from
/// Mallory's state, and Alice's channel could never be opened there). Once A is back, they
/// are refused, and Alice's true state opens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_state_waits_while_the_relays_that_moved_the_channel_are_away() {
    let mut a = relay(|c| c.to_owned());
    let (b, c) = (relay(|c| c.to_owned()), relay(|c| c.to_owned()));
    let moved = Moved::new(&[&a, &b, &c]).await;
    a.kill9();
    let forgeries = moved.forgeries();
    let want = [ErrorCode::Forbidden, ErrorCode::Unavailable, ErrorCode::Unavailable];
    for (epoch, state) in forgeries.iter().enumerate() {
        let open = Request::OpenChannel { channel: moved.id, state: state.clone() };
        let r = moved.mallory_b.call(&open).await.expect("open");
        assert_eq!(code(&r), Some(want[epoch]), "a forged state of epoch {epoch}: {r:?}");
    }
    a.restart().expect("restart");
    moved.mallory_is_refused(forgeries).await;
    moved.alice_goes_on().await;
}

/// A relay whose replica of the group lags behind (fault switch `slow-apply`: it applies half
/// a second late) still checks the credentials of a commit for the next epoch: it waits for its
/// replica instead of proposing the commit unchecked. The member adds a device registered at
/// no relay (its own check skipped), through the lagging relay, right after the epoch before
/// was certified by the other two: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_relay_still_checks_the_commits_it_proposes() {
    use chitchat_proto::channel::{AcceptAll, Change};
    let mut relays = [relay(|c| c.to_owned()), relay(|c| c.to_owned()), relay(|c| c.to_owned())];
    relays[2].set_env("CHITCHAT_RELAY_FAULT", Some("slow-apply"));
    relays[2].kill9();
    relays[2].restart().expect("restart");
    let (mut alice, clients) = Orderee::open_at(&relays, "lagging", 8).await;
    // The lagging relay's replica has the channel before the race starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric(&relays[2], "chitchat_relay_ordered_channels") < 1.0 {
        assert!(std::time::Instant::now() < deadline, "the third relay never applied the open");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Epoch 0, certified through the first relay (its majority does not wait for the third).
    let staged = alice.stage();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let cert = loop {
        match clients[0].call(&alice.submission(&staged)).await {
            Ok(Response::CommitAccepted { cert }) => break cert,
            other => assert!(std::time::Instant::now() < deadline, "{other:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    alice.channel.accept_own(&alice.provider, &cert).expect("merge");
    // At once, through the lagging relay: epoch 1 adds a device that no relay knows.
    let stranger = Device::new(77);
    let kp = Identity::new(&stranger.key)
        .key_package(&openmls_rust_crypto::OpenMlsRustCrypto::default(), false)
        .expect("kp");
    let add = Change { add: vec![Bytes(kp)], ..Default::default() };
    let staged = alice.channel.stage(&alice.provider, &alice.mls, &add, &AcceptAll).expect("stage");
    let r = clients[2].call(&alice.submission(&staged)).await.expect("submit");
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::BadRequest, message } if message.contains("invalid commit")),
        "a lagging relay ordered a commit it did not check: {r:?}"
    );
}

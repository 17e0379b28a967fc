//! A relay that equivocates is caught. The relay runs with its fault switch
//! (`CHITCHAT_RELAY_FAULT=equivocate`: it certifies a losing commit as well). Two test members
//! (X and Y, built from `chitchat-proto`) race for one epoch of a channel the relay orders
//! alone; both are told they won, so Y is forked away from X and the node (Alice). Alice's
//! node must find the proof in Y's epoch report, keep it across a restart, show it in its
//! status, give it to the relay (metric), report the fork, refuse the relay's certificates
//! from then on, and refuse to stage changes the relay would have to certify.

use std::time::{Duration, Instant};

use chitchat_proto::channel::{AcceptAll, AdminPolicy, Change, Channel, ChannelConfig, Identity};
use chitchat_proto::codec::{Bytes, Canonical};
use chitchat_proto::inbox;
use chitchat_proto::ordering::{ChannelId, EpochCert, EpochReport, EpochReportBody};
use chitchat_proto::wire::{
    CommitSubmission, Envelope, InboxPayload, PostResult, Request, Response, SealedWelcomes,
};
use chitchat_proto::{DeviceId, Dir, PublicKey};
use chitchat_tests::{Client, Device, NodeProcess, RelayProcess, register};
use rand_core::SeedableRng;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn metric(relay: &RelayProcess, name: &str) -> f64 {
    relay.metric(name)
}

/// A member built from `chitchat-proto`, talking to the relay frame by frame.
struct Member {
    device: Device,
    mls: Identity,
    provider: openmls_rust_crypto::OpenMlsRustCrypto,
    client: Client,
    channel: Option<Channel>,
}

impl Member {
    async fn new(relay: &RelayProcess, n: u8, name: &str) -> Self {
        let device = Device::new(n);
        let client = register(relay, &device, name).await;
        let mls = Identity::new(&device.key);
        let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let kp = Bytes(mls.key_package(&provider, false).expect("kp"));
        let upload = Request::UploadKeyPackages { packages: vec![kp], last_resort: None };
        assert!(matches!(client.call(&upload).await, Ok(Response::KeyPackagesStored { .. })));
        Self { device, mls, provider, client, channel: None }
    }

    /// Creates a chat channel that `relay` orders alone, every member an admin, and opens it
    /// there.
    async fn create(&mut self, id: ChannelId, name: &str, relay: &chitchat_proto::RelayId) {
        let config = ChannelConfig {
            mime: chitchat_proto::chat::MIME.into(),
            name: name.into(),
            relays: vec![relay.clone()],
            admins: AdminPolicy::AnyMember,
            creator: self.mls.device(),
        };
        let channel = Channel::create(&self.provider, &self.mls, id, config).expect("create");
        let state = channel.public_state(&self.provider, &self.mls).expect("export");
        self.channel = Some(channel);
        let r = self.client.call(&Request::OpenChannel { channel: id, state }).await;
        assert_eq!(r.expect("open"), Response::ChannelOpened { next_epoch: 0 });
    }

    fn channel(&self) -> &Channel {
        self.channel.as_ref().expect("in the channel")
    }

    /// Joins from the first Welcome in the inbox.
    async fn join(&mut self) {
        let deadline = Instant::now() + WAIT;
        while self.channel.is_none() {
            let r = self.client.call(&Request::Fetch { after: None, max: 64 }).await;
            let Ok(Response::Items { items, .. }) = r else { panic!("fetch: {r:?}") };
            for item in items {
                if let Envelope::Sealed(e) = &item.envelope {
                    let bytes = self.device.inbox.open(self.device.id(), e).expect("opens");
                    if let Ok(InboxPayload::Welcome { welcome, .. }) =
                        InboxPayload::from_bytes(&bytes)
                    {
                        let joined = Channel::join(&self.provider, &welcome, &AcceptAll);
                        self.channel = Some(joined.expect("join"));
                    }
                }
            }
            assert!(Instant::now() < deadline, "no Welcome");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stages an update of its own leaf and submits it.
    async fn update(&mut self, id: ChannelId) -> (Response, u64) {
        let change = Change { update: true, ..Default::default() };
        let (provider, mls) = (&self.provider, &self.mls);
        let staged = self
            .channel
            .as_mut()
            .expect("ch")
            .stage(provider, mls, &change, &AcceptAll)
            .expect("stage");
        let sub = CommitSubmission {
            channel: id,
            epoch: staged.epoch,
            commit: staged.commit,
            welcome: None,
            fanout: vec![],
        };
        (self.client.call(&Request::SubmitCommit(sub)).await.expect("submit"), staged.epoch)
    }

    /// Sends its report of the epoch it is at, with `cert` and `digest`.
    async fn report(&self, id: ChannelId, epoch: u64, digest: [u8; 32], cert: &EpochCert) {
        let body = EpochReportBody {
            channel: id,
            epoch,
            digest,
            cert: Some(cert.clone()),
            device: self.device.id(),
        };
        let report = EpochReport::sign(&self.device.key, body);
        let r = self.client.call(&Request::Report { report }).await.expect("report");
        assert!(
            matches!(&r, Response::Posted(p) if matches!(p[..], [PostResult::Posted { .. }])),
            "{r:?}"
        );
    }
}

async fn status(node: &NodeProcess) -> Value {
    node.json("GET", "/v1/status", None).await.expect("status")
}

async fn wait_status(node: &NodeProcess, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = status(node).await;
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn epoch(node: &NodeProcess, id: &ChannelId) -> Option<u64> {
    let v = node.json("GET", &format!("/v1/channels/{id}"), None).await.expect("channel");
    v["epoch"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_certifies_two_commits_for_one_epoch_is_caught() {
    let relay = RelayProcess::start(
        |c| c.replace("submits_per_minute = 60", "submits_per_minute = 100000"),
        &[("CHITCHAT_RELAY_FAULT", "equivocate")],
    )
    .expect("relay");
    let relay_id = relay.relay_id().expect("relay id");
    let mut x = Member::new(&relay, 61, "x").await;
    let mut y = Member::new(&relay, 62, "y").await;
    let _z = Member::new(&relay, 63, "z").await;
    let mut alice = NodeProcess::start(&[]).expect("node");
    alice.register(&relay, "alice").await.expect("register");
    let alice_device = status(&alice).await["device"].as_str().expect("device").to_owned();
    let alice_device = DeviceId(PublicKey::from_hex(&alice_device).expect("hex"));

    // X creates a channel the relay orders alone, and adds Y and Alice's node.
    let id = x.device.channel(0x3c);
    x.create(id, "watched", &relay_id).await;
    let mut kps = Vec::new();
    let mut inbox_keys = Vec::new();
    for device in [y.device.id(), alice_device] {
        let Ok(Response::KeyPackage(kp)) =
            x.client.call(&Request::ClaimKeyPackage { device }).await
        else {
            panic!("claim")
        };
        kps.push(Bytes(kp));
        let Ok(Response::Dirs(dirs)) =
            x.client.call(&Request::LookupDevices { devices: vec![device] }).await
        else {
            panic!("lookup")
        };
        let dir: &Dir = dirs.first().expect("record");
        inbox_keys.push((device, dir.body.inbox_key));
    }
    let change = Change { add: kps, ..Default::default() };
    let (provider, mls) = (&x.provider, &x.mls);
    let staged =
        x.channel.as_mut().expect("ch").stage(provider, mls, &change, &AcceptAll).expect("stage");
    let welcome =
        InboxPayload::Welcome { channel: id, welcome: Bytes(staged.welcome.clone().expect("w")) };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let envelopes = inbox_keys
        .iter()
        .map(|(d, k)| inbox::seal(&mut rng, *d, k, &welcome.to_bytes()).expect("seal"))
        .collect();
    let sub = CommitSubmission {
        channel: id,
        epoch: 0,
        commit: staged.commit.clone(),
        welcome: Some(SealedWelcomes { envelopes }),
        fanout: vec![],
    };
    let Response::CommitAccepted { cert } =
        x.client.call(&Request::SubmitCommit(sub)).await.expect("submit")
    else {
        panic!("first commit")
    };
    x.channel.as_mut().expect("ch").accept_own(&x.provider, &cert).expect("merge");
    y.join().await;
    let deadline = Instant::now() + WAIT;
    while epoch(&alice, &id).await != Some(1) {
        assert!(Instant::now() < deadline, "alice never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let clean = status(&alice).await;
    assert_eq!(clean["convicted"], serde_json::json!([]), "{clean:#}");
    assert_eq!(clean["forks"], serde_json::json!([]), "{clean:#}");

    // X and Y both commit on epoch 1. X wins; the faulty relay tells Y it won as well.
    let (rx, _) = x.update(id).await;
    let Response::CommitAccepted { cert: cert_x } = rx else { panic!("x: {rx:?}") };
    let (ry, _) = y.update(id).await;
    let Response::CommitAccepted { cert: cert_y } = ry else {
        panic!("the fault switch should certify the loser: {ry:?}")
    };
    assert_ne!(cert_x.body.hash, cert_y.body.hash);
    x.channel.as_mut().expect("ch").accept_own(&x.provider, &cert_x).expect("x merges");
    y.channel.as_mut().expect("ch").accept_own(&y.provider, &cert_y).expect("y merges a fork");
    let deadline = Instant::now() + WAIT;
    while epoch(&alice, &id).await != Some(2) {
        assert!(Instant::now() < deadline, "alice never applied X's commit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // X reports honestly: nothing is found. Then Y reports its (forked) epoch 2.
    let x_digest = x.channel().epoch_digest();
    x.report(id, 2, x_digest, &cert_x).await;
    let y_digest = y.channel().epoch_digest();
    assert_ne!(x_digest, y_digest, "Y is in another state");
    y.report(id, 2, y_digest, &cert_y).await;
    let v = wait_status(&alice, "alice convicts the relay", |v| {
        v["convicted"].as_array().is_some_and(|c| !c.is_empty())
            && v["forks"].as_array().is_some_and(|f| !f.is_empty())
    })
    .await;
    let convicted = &v["convicted"][0];
    assert_eq!(convicted["orderer"], relay_id.key.to_hex(), "{v:#}");
    assert_eq!(convicted["relay"], relay.host(), "{v:#}");
    assert_eq!(convicted["epoch"], 1, "{v:#}");
    let forks = v["forks"].as_array().expect("forks");
    assert_eq!(forks.len(), 1, "only Y's report differs (X's was honest): {v:#}");
    assert_eq!(forks[0]["device"], y.device.id().0.to_hex(), "{v:#}");
    assert_eq!(forks[0]["epoch"], 2, "{v:#}");
    assert!(forks[0]["kind"].as_str().is_some_and(|k| k.starts_with("OtherCommit")), "{v:#}");
    let out = alice.cli(&["status"]).expect("status");
    assert!(out.contains("EQUIVOCATION") && out.contains(relay.host()), "{out}");
    assert!(out.contains("FORK"), "{out}");

    // The relay got the proof from Alice's node.
    let deadline = Instant::now() + WAIT;
    while metric(&relay, "chitchat_relay_convicted") < 1.0 {
        assert!(Instant::now() < deadline, "the relay never got the proof");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A member whose report differs only in its state (a Welcome that does not match its
    // commit, say) is a fork too.
    x.report(id, 2, [0; 32], &cert_x).await;
    wait_status(&alice, "a fork of state", |v| {
        v["forks"].as_array().is_some_and(|f| {
            f.iter().any(|f| f["device"] == x.device.id().0.to_hex() && f["kind"] == "OtherState")
        })
    })
    .await;

    // From now on the relay's certificates do not count at Alice: X's next commit, which
    // the relay certifies alone, is refused, and Alice stays at epoch 2.
    let before = status(&alice).await["dropped"]["invalid"].as_u64().unwrap_or(0);
    let (rx, _) = x.update(id).await;
    assert!(matches!(rx, Response::CommitAccepted { .. }), "{rx:?}");
    wait_status(&alice, "the convicted relay's certificate refused", |v| {
        v["dropped"]["invalid"].as_u64().unwrap_or(0) > before
    })
    .await;
    assert_eq!(epoch(&alice, &id).await, Some(2));

    // Alice cannot change the channel any more: the only orderer is convicted.
    let out = alice.cli(&["invite", "watched", &format!("z@{}", relay.host())]);
    let err = out.expect_err("a change no one can certify");
    assert!(err.to_string().contains("signing two commits"), "{err}");

    // The proof survives restarts, at the node and at the relay.
    alice.stop().expect("stop");
    alice.restart().expect("restart");
    let v = status(&alice).await;
    assert_eq!(v["convicted"][0]["orderer"], relay_id.key.to_hex(), "{v:#}");
    assert_eq!(v["forks"].as_array().map(Vec::len), Some(2), "{v:#}");
    let mut relay = relay;
    relay.kill9();
    relay.restart().expect("relay restarts");
    assert_eq!(metric(&relay, "chitchat_relay_convicted"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_that_are_not_the_senders_own_or_are_tampered_are_refused() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let relay_id = relay.relay_id().expect("relay id");
    let mut x = Member::new(&relay, 71, "x").await;
    let y = Member::new(&relay, 72, "y").await;
    let id = x.device.channel(0x4d);
    x.create(id, "r", &relay_id).await;
    let body = |device: DeviceId| EpochReportBody {
        channel: id,
        epoch: 0,
        digest: [1; 32],
        cert: None,
        device,
    };
    // Y is no member: its own report is refused.
    let report = EpochReport::sign(&y.device.key, body(y.device.id()));
    let r = y.client.call(&Request::Report { report }).await.expect("report");
    assert!(
        matches!(&r, Response::Posted(p) if matches!(p[..], [PostResult::Refused(chitchat_proto::wire::ErrorCode::Forbidden)])),
        "{r:?}"
    );
    // X's report sent by Y (a replay by another device) is refused.
    let report = EpochReport::sign(&x.device.key, body(x.device.id()));
    let r = y.client.call(&Request::Report { report: report.clone() }).await.expect("report");
    assert!(
        matches!(&r, Response::Posted(p) if matches!(p[..], [PostResult::Refused(_)])),
        "{r:?}"
    );
    // A tampered report does not pass the frame's validation.
    let mut tampered = report;
    tampered.body.digest = [2; 32];
    let r = x.client.call(&Request::Report { report: tampered }).await.expect("answered");
    assert!(matches!(r, Response::Error { .. }), "{r:?}");
    // A proof that proves nothing is refused, and nothing is counted.
    let body = chitchat_proto::ordering::EpochCertBody {
        channel: id,
        epoch: 0,
        hash: chitchat_proto::ordering::CommitHash([1; 32]),
    };
    let sig = chitchat_proto::ordering::CertSignature::sign(&x.device.key, &body);
    let proof = chitchat_proto::ordering::Equivocation { first: (body, sig), second: (body, sig) };
    let r = x.client.call(&Request::Equivocation { proof }).await.expect("answered");
    assert!(matches!(r, Response::Error { .. }), "{r:?}");
    // A real proof against a key that orders nothing here (anyone can make one) is refused.
    let other = chitchat_proto::ordering::EpochCertBody {
        hash: chitchat_proto::ordering::CommitHash([2; 32]),
        ..body
    };
    let proof = chitchat_proto::ordering::Equivocation::from_pair(
        (body, chitchat_proto::ordering::CertSignature::sign(&x.device.key, &body)),
        (other, chitchat_proto::ordering::CertSignature::sign(&x.device.key, &other)),
    )
    .expect("a valid proof");
    let r = x.client.call(&Request::Equivocation { proof }).await.expect("answered");
    assert!(
        matches!(r, Response::Error { code: chitchat_proto::wire::ErrorCode::Forbidden, .. }),
        "{r:?}"
    );
    assert_eq!(metric(&relay, "chitchat_relay_convicted"), 0.0);
}

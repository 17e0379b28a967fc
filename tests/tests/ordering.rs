//! Commit ordering through a real relay: MLS channels on two devices, a Welcome delivered only
//! after its commit is ordered, two commits racing for one epoch with exactly one winner, the
//! loser catching up from its inbox and rebuilding, and the order surviving a kill -9.

use std::collections::BTreeMap;

use chitchat_proto::channel::{
    AdminPolicy, Change, Channel, ChannelConfig, ChannelEvent, ChannelMessage, Identity, KnownDirs,
    StagedCommit,
};
use chitchat_proto::codec::{Bytes, Canonical};
use chitchat_proto::identity::TrustedRelays;
use chitchat_proto::inbox;
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::wire::{
    ChannelPost, CommitSubmission, Envelope, ErrorCode, InboxPayload, PostResult, Request,
    Response, SealedWelcomes,
};
use chitchat_proto::{DeviceId, Dir, Timestamp};
use chitchat_tests::{Client, Device, RelayProcess, register};
use openmls_rust_crypto::OpenMlsRustCrypto;

fn now() -> Timestamp {
    chitchat_relay::service::now()
}

/// One device: its keys, its relay connection, its MLS state.
struct Member {
    device: Device,
    client: Client,
    mls: Identity,
    provider: OpenMlsRustCrypto,
    channel: Option<Channel>,
}

impl Member {
    fn channel(&mut self) -> &mut Channel {
        self.channel.as_mut().expect("in the channel")
    }

    fn public_state(&self) -> chitchat_proto::channel::PublicState {
        let channel = self.channel.as_ref().expect("member");
        channel.public_state(&self.provider, &self.mls).expect("export")
    }

    fn accept(&mut self, cert: &chitchat_proto::ordering::EpochCert) {
        let provider = &self.provider;
        self.channel.as_mut().expect("member").accept_own(provider, cert).expect("merge own");
    }

    fn discard(&mut self) {
        let provider = &self.provider;
        self.channel.as_mut().expect("member").discard_own(provider).expect("discard");
    }

    fn stage(&mut self, change: &Change, check: &KnownDirs<'_, TrustedRelays>) -> StagedCommit {
        let (provider, me) = (&self.provider, &self.mls);
        self.channel.as_mut().expect("member").stage(provider, me, change, check).expect("stage")
    }

    async fn submit(
        &self,
        staged: &StagedCommit,
        fanout: Vec<DeviceId>,
        welcome: Option<SealedWelcomes>,
    ) -> Response {
        let channel = self.channel.as_ref().expect("member").id();
        let sub = CommitSubmission {
            channel,
            epoch: staged.epoch,
            commit: staged.commit.clone(),
            welcome,
            fanout,
        };
        self.client.call(&Request::SubmitCommit(sub)).await.expect("submit")
    }

    /// A staged commit's Welcome, sealed to this device's inbox.
    fn sealed_welcome(&self, channel: ChannelId, staged: &StagedCommit) -> inbox::SealedEnvelope {
        let welcome = InboxPayload::Welcome {
            channel,
            welcome: Bytes(staged.welcome.clone().expect("welcome")),
        };
        let to = &self.device;
        inbox::seal(&mut rand::rng(), to.id(), &to.inbox.public(), &welcome.to_bytes())
            .expect("seal")
    }

    /// Submits without expecting an answer (the relay may die first).
    async fn submit_raw(&self, staged: &StagedCommit) -> anyhow::Result<Response> {
        let channel = self.channel.as_ref().expect("member").id();
        let sub = CommitSubmission {
            channel,
            epoch: staged.epoch,
            commit: staged.commit.clone(),
            welcome: None,
            fanout: vec![],
        };
        self.client.call(&Request::SubmitCommit(sub)).await
    }

    /// A submission of a commit to channel 9 (the forged ones), for `epoch`.
    fn forged(commit: &[u8], epoch: u64) -> CommitSubmission {
        CommitSubmission {
            channel: Device::new(1).channel(9),
            epoch,
            commit: commit.to_vec(),
            welcome: None,
            fanout: vec![],
        }
    }

    /// Fetches, opens and acknowledges everything in the inbox.
    async fn drain(&self) -> Vec<InboxPayload> {
        let Response::Items { items, .. } =
            self.client.call(&Request::Fetch { after: None, max: 100 }).await.expect("fetch")
        else {
            panic!("no items")
        };
        let ids = items.iter().map(|i| i.id).collect();
        assert_eq!(self.client.call(&Request::Ack { ids }).await.expect("ack"), Response::Acked);
        items
            .iter()
            .map(|i| match &i.envelope {
                Envelope::Sealed(sealed) => {
                    let bytes = self.device.inbox.open(self.device.id(), sealed).expect("opens");
                    let payload = InboxPayload::from_bytes(&bytes).expect("a payload");
                    assert!(
                        !matches!(
                            payload,
                            InboxPayload::Channel { message: ChannelMessage::Commit { .. }, .. }
                        ),
                        "the relay fans commits out unsealed"
                    );
                    payload
                }
                Envelope::Post(post) => InboxPayload::Channel {
                    channel: post.channel,
                    message: ChannelMessage::Application { message: post.message.clone() },
                },
                Envelope::Commit(c) => InboxPayload::Channel {
                    channel: c.channel,
                    message: ChannelMessage::Commit {
                        commit: c.commit.clone(),
                        cert: c.cert.clone(),
                    },
                },
                Envelope::Report(r) => InboxPayload::Report(r.clone()),
                Envelope::Missed { .. } => panic!("no inbox here misses anything"),
            })
            .collect()
    }

    fn process(
        &mut self,
        payload: InboxPayload,
        check: &KnownDirs<'_, TrustedRelays>,
    ) -> Vec<ChannelEvent> {
        let InboxPayload::Channel { message, .. } = payload else {
            panic!("not a channel message")
        };
        let provider = &self.provider;
        self.channel
            .as_mut()
            .expect("member")
            .process(provider, now(), message, check)
            .expect("process")
    }
}

async fn member(relay: &RelayProcess, n: u8, name: &str) -> Member {
    let device = Device::new(n);
    let client = register(relay, &device, name).await;
    let mls = Identity::new(&device.key);
    Member { device, client, mls, provider: OpenMlsRustCrypto::default(), channel: None }
}

/// A chat channel named `general`, ordered by `relay`, where every member may add and remove.
fn open_channel(relay: chitchat_proto::RelayId, creator: DeviceId) -> ChannelConfig {
    ChannelConfig {
        mime: chitchat_proto::chat::MIME.into(),
        name: "general".into(),
        relays: vec![relay],
        admins: AdminPolicy::AnyMember,
        creator,
    }
}

async fn lookup(c: &Client, name: &str) -> Dir {
    let Response::Dirs(mut dirs) =
        c.call(&Request::Lookup { local_name: name.into() }).await.expect("lookup")
    else {
        panic!("no dirs")
    };
    dirs.pop().expect("a record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_winner_per_epoch_through_the_relay() {
    let mut relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let relay_id = relay.relay_id().expect("well-known");
    let trust = TrustedRelays { relays: vec![relay_id.clone()], ..Default::default() };
    let mut alice = member(&relay, 1, "alice").await;
    let mut bob = member(&relay, 2, "bob").await;

    // Both devices' records, as the relay serves them, are what the credential checks use.
    let mut dirs = BTreeMap::new();
    dirs.insert(alice.device.id(), lookup(&bob.client, "alice").await);
    dirs.insert(bob.device.id(), lookup(&alice.client, "bob").await);
    let check = KnownDirs { dirs: &dirs, trust: &trust, now: now() };

    // Bob uploads a KeyPackage; Alice creates a channel ordered by the relay and claims it.
    let kp = Bytes(bob.mls.key_package(&bob.provider, false).expect("kp"));
    let upload = Request::UploadKeyPackages { packages: vec![kp], last_resort: None };
    assert!(matches!(
        bob.client.call(&upload).await.expect("upload"),
        Response::KeyPackagesStored { available: 1 }
    ));
    let config = open_channel(relay_id, alice.device.id());
    let id = alice.device.channel(7);
    alice.channel = Some(Channel::create(&alice.provider, &alice.mls, id, config).expect("create"));
    // The relay orders only channels it follows; only a member opens one.
    let state = alice.public_state();
    let by_bob = bob
        .client
        .call(&Request::OpenChannel { channel: id, state: state.clone() })
        .await
        .expect("call");
    assert!(matches!(by_bob, Response::Error { code: ErrorCode::Forbidden, .. }), "{by_bob:?}");
    let opened =
        alice.client.call(&Request::OpenChannel { channel: id, state }).await.expect("open");
    assert_eq!(opened, Response::ChannelOpened { next_epoch: 0 });
    let Response::KeyPackage(bobs_kp) = alice
        .client
        .call(&Request::ClaimKeyPackage { device: bob.device.id() })
        .await
        .expect("claim")
    else {
        panic!("no key package")
    };

    // The add: the Welcome is sealed to Bob, and the relay delivers it only once ordered.
    let staged = alice.stage(&Change { add: vec![Bytes(bobs_kp)], ..Default::default() }, &check);
    let sealed = bob.sealed_welcome(id, &staged);
    let Response::CommitAccepted { cert } =
        alice.submit(&staged, vec![], Some(SealedWelcomes { envelopes: vec![sealed] })).await
    else {
        panic!("the first commit of epoch 0 wins")
    };
    alice.accept(&cert);
    let mut inbox_bob = bob.drain().await;
    assert_eq!(inbox_bob.len(), 1);
    let Some(InboxPayload::Welcome { welcome, .. }) = inbox_bob.pop() else { panic!("a welcome") };
    bob.channel = Some(Channel::join(&bob.provider, &welcome, &check).expect("join"));
    assert_eq!(bob.channel().epoch_authenticator(), alice.channel().epoch_authenticator());

    // Both commit on epoch 1 at once; the relay orders Alice's first.
    let update = Change { update: true, ..Default::default() };
    let staged_a = alice.stage(&update, &check);
    let staged_b = bob.stage(&update, &check);
    assert_eq!(staged_a.epoch, staged_b.epoch);
    let Response::CommitAccepted { cert } = alice.submit(&staged_a, vec![], None).await
    // no fan-out list: the relay knows the members
    else {
        panic!("Alice wins epoch 1")
    };
    alice.accept(&cert);
    let Response::CommitConflict { winner } =
        bob.submit(&staged_b, vec![alice.device.id()], None).await
    else {
        panic!("Bob loses epoch 1")
    };
    assert_eq!(
        (winner.hash, winner.submitter, winner.epoch),
        (staged_a.hash, alice.device.id(), 1)
    );
    // Resubmitting the winner is answered the same (a retry after a lost answer).
    assert!(matches!(alice.submit(&staged_a, vec![], None).await, Response::CommitAccepted { .. }));

    // Bob drops his commit, applies the winner from his inbox, and rebuilds on epoch 2.
    bob.discard();
    let payloads = bob.drain().await;
    assert!(!payloads.is_empty(), "the winner was fanned out to Bob");
    let mut applied = false;
    for p in payloads {
        for e in bob.process(p, &check) {
            applied |= matches!(e, ChannelEvent::CommitApplied { epoch: 2, .. });
        }
    }
    assert!(applied, "Bob applied Alice's commit");
    assert_eq!(bob.channel().epoch_authenticator(), alice.channel().epoch_authenticator());
    let rebuilt = bob.stage(&update, &check);
    let Response::CommitAccepted { cert } =
        bob.submit(&rebuilt, vec![alice.device.id()], None).await
    else {
        panic!("Bob's rebuilt commit wins epoch 2")
    };
    bob.accept(&cert);
    for p in alice.drain().await {
        alice.process(p, &check);
    }
    assert_eq!(alice.channel().epoch(), 3);
    assert_eq!(bob.channel().epoch_authenticator(), alice.channel().epoch_authenticator());

    // A post goes to every other member, unsealed; only members may post, only to channels
    // ordered here.
    let (msg_id, ChannelMessage::Application { message }) = alice
        .channel
        .as_mut()
        .expect("member")
        .send(&alice.provider, &alice.mls, now(), b"fan me out")
        .expect("send")
    else {
        panic!("an application message")
    };
    let post = ChannelPost { channel: id, message };
    let r = alice.client.call(&Request::Post { posts: vec![post.clone()] }).await.expect("post");
    assert_eq!(r, Response::Posted(vec![PostResult::Posted { delivered: 1, skipped: 0 }]));
    // (Bob's inbox also holds his own commit of epoch 2: the relay fans a commit out to its
    // committer too; he merged it already.)
    let got: Vec<ChannelEvent> = bob
        .drain()
        .await
        .into_iter()
        .flat_map(|p| bob.process(p, &check))
        .filter(|e| !matches!(e, ChannelEvent::StaleCommit { .. }))
        .collect();
    assert!(
        matches!(&got[..], [ChannelEvent::Message { id, payload, .. }]
            if *id == msg_id && payload == b"fan me out"),
        "{got:?}"
    );
    assert!(alice.drain().await.is_empty(), "the poster does not get its own post");
    let carol = member(&relay, 3, "carol").await;
    let r = carol.client.call(&Request::Post { posts: vec![post.clone()] }).await.expect("post");
    assert_eq!(r, Response::Posted(vec![PostResult::Refused(ErrorCode::Forbidden)]));
    let elsewhere = ChannelPost { channel: ChannelId([9; 32]), ..post };
    let r = alice.client.call(&Request::Post { posts: vec![elsewhere] }).await.expect("post");
    assert_eq!(r, Response::Posted(vec![PostResult::Refused(ErrorCode::NotFound)]));
    let garbage = ChannelPost { channel: id, message: vec![1, 2, 3] };
    let r = alice.client.call(&Request::Post { posts: vec![garbage] }).await.expect("post");
    assert_eq!(r, Response::Posted(vec![PostResult::Refused(ErrorCode::BadRequest)]));
    assert!(bob.drain().await.is_empty(), "refused posts store nothing");

    // The operator sees it: three accepted and fanned out (add, Alice's, Bob's rebuilt; Alice's
    // retry was answered, not fanned out again), one conflict.
    let metrics = relay.http_get("/metrics").expect("metrics");
    assert!(metrics.contains("chitchat_relay_posts_total 1"), "{metrics}");
    assert!(metrics.contains("chitchat_relay_commits_accepted_total 3"), "{metrics}");
    assert!(metrics.contains("chitchat_relay_commit_conflicts_total 1"), "{metrics}");

    // Bad submissions: garbage, and a commit whose framing disagrees with the submission.
    let garbage = CommitSubmission {
        channel: id,
        epoch: 3,
        commit: vec![1, 2, 3],
        welcome: None,
        fanout: vec![],
    };
    let r = alice.client.call(&Request::SubmitCommit(garbage)).await.expect("call");
    assert!(matches!(r, Response::Error { code: ErrorCode::BadRequest, .. }), "{r:?}");
    let mismatch = CommitSubmission {
        channel: id,
        epoch: 9,
        commit: staged_b.commit.clone(),
        welcome: None,
        fanout: vec![],
    };
    let r = alice.client.call(&Request::SubmitCommit(mismatch)).await.expect("call");
    assert!(matches!(r, Response::Error { code: ErrorCode::BadRequest, .. }), "{r:?}");

    // The relay refuses a commit adding a device it cannot vouch for (not registered here),
    // even though its committer did not check, and a commit whose signature was tampered with.
    let stranger = Identity::new(&Device::new(77).key);
    let stranger_kp =
        Bytes(stranger.key_package(&OpenMlsRustCrypto::default(), false).expect("kp"));
    let careless = {
        let provider = &alice.provider;
        let change = Change { add: vec![stranger_kp], ..Default::default() };
        alice
            .channel
            .as_mut()
            .expect("member")
            .stage(provider, &alice.mls, &change, &chitchat_proto::channel::AcceptAll)
            .expect("stage")
    };
    let r = alice.submit(&careless, vec![], None).await;
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::BadRequest, message } if message.contains("not registered")),
        "{r:?}"
    );
    alice.discard();
    let mut forged = alice.stage(&update, &check);
    let n = forged.commit.len();
    forged.commit[n - 67] ^= 1;
    let r = alice.submit(&forged, vec![], None).await;
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::BadRequest, message } if message.contains("signature")),
        "{r:?}"
    );
    alice.discard();

    // The order survives a crash: after kill -9 and restart, Bob's old commit still loses to
    // Alice's, and the channel's next epoch is still 3.
    relay.kill9();
    relay.restart().expect("restart");
    let c = Client::connect(relay.tcp_addr(), relay.peer_id()).await.expect("connect");
    c.authenticate(&bob.device.key, "localhost").await.expect("auth");
    let sub = CommitSubmission {
        channel: id,
        epoch: 1,
        commit: staged_b.commit,
        welcome: None,
        fanout: vec![],
    };
    let Response::CommitConflict { winner } =
        c.call(&Request::SubmitCommit(sub)).await.expect("call")
    else {
        panic!("still a conflict")
    };
    assert_eq!(winner.hash, staged_a.hash);
    // Alice's next commit, which only she may submit (Bob is refused).
    let ca = Client::connect(relay.tcp_addr(), relay.peer_id()).await.expect("connect");
    ca.authenticate(&alice.device.key, "localhost").await.expect("auth");
    let late = alice.stage(&update, &check);
    let by_bob = CommitSubmission {
        channel: id,
        epoch: 3,
        commit: late.commit.clone(),
        welcome: None,
        fanout: vec![],
    };
    let r = c.call(&Request::SubmitCommit(by_bob)).await.expect("call");
    assert!(matches!(r, Response::Error { code: ErrorCode::Forbidden, .. }), "{r:?}");
    let sub = CommitSubmission {
        channel: id,
        epoch: 1,
        commit: late.commit.clone(),
        welcome: None,
        fanout: vec![],
    };
    let r = ca.call(&Request::SubmitCommit(sub)).await.expect("call");
    assert!(
        matches!(r, Response::Error { code: ErrorCode::BadRequest, .. }),
        "framing says epoch 3: {r:?}"
    );
    let sub = CommitSubmission {
        channel: id,
        epoch: 3,
        commit: late.commit,
        welcome: None,
        fanout: vec![],
    };
    let Response::CommitAccepted { cert } =
        ca.call(&Request::SubmitCommit(sub)).await.expect("call")
    else {
        panic!("accepted")
    };
    alice.accept(&cert);

    // A post crossing a membership change goes to the members of the epoch it was encrypted
    // in: sent in epoch 4 and posted once the commit removing Bob is ordered, it still reaches
    // him (he can read it); one sent after the removal reaches no one.
    let encrypt = |alice: &mut Member, text: &[u8]| {
        let channel = alice.channel.as_mut().expect("member");
        match channel.send(&alice.provider, &alice.mls, now(), text).expect("send") {
            (_, ChannelMessage::Application { message }) => message,
            other => panic!("{other:?}"),
        }
    };
    let before = encrypt(&mut alice, b"before the removal");
    let removal =
        alice.stage(&Change { remove: vec![bob.device.id()], ..Default::default() }, &check);
    let sub = CommitSubmission {
        channel: id,
        epoch: removal.epoch,
        commit: removal.commit.clone(),
        welcome: None,
        fanout: vec![],
    };
    let Response::CommitAccepted { cert } =
        ca.call(&Request::SubmitCommit(sub)).await.expect("call")
    else {
        panic!("the removal is ordered")
    };
    alice.accept(&cert);
    let post = |message: &Vec<u8>| Request::Post {
        posts: vec![ChannelPost { channel: id, message: message.clone() }],
    };
    let r = ca.call(&post(&before)).await.expect("post");
    assert_eq!(r, Response::Posted(vec![PostResult::Posted { delivered: 1, skipped: 0 }]));
    let after = encrypt(&mut alice, b"after the removal");
    let r = ca.call(&post(&after)).await.expect("post");
    assert_eq!(r, Response::Posted(vec![PostResult::Posted { delivered: 0, skipped: 0 }]));
    let Response::Items { items, .. } =
        c.call(&Request::Fetch { after: None, max: 100 }).await.expect("fetch")
    else {
        panic!("items")
    };
    let posts: Vec<&Vec<u8>> = items
        .iter()
        .filter_map(|i| match &i.envelope {
            Envelope::Post(p) => Some(&p.message),
            _ => None,
        })
        .collect();
    assert_eq!(posts, [&before], "Bob gets what was sent while he was a member");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_proposes_too_often_is_slowed_down() {
    let relay = RelayProcess::start(
        |c| c.replace("submits_per_minute = 60", "submits_per_minute = 2"),
        &[],
    )
    .expect("relay");
    let relay_id = relay.relay_id().expect("well-known");
    let trust = TrustedRelays { relays: vec![relay_id.clone()], ..Default::default() };
    let mut alice = member(&relay, 1, "alice").await;
    let dirs = BTreeMap::new();
    let check = KnownDirs { dirs: &dirs, trust: &trust, now: now() };
    let config = ChannelConfig {
        mime: "application/octet-stream".into(),
        name: "busy".into(),
        relays: vec![relay_id],
        admins: AdminPolicy::AnyMember,
        creator: alice.device.id(),
    };
    alice.channel = Some(
        Channel::create(&alice.provider, &alice.mls, alice.device.channel(8), config)
            .expect("create"),
    );
    let state = alice.public_state();
    let open = Request::OpenChannel { channel: alice.device.channel(8), state };
    assert_eq!(
        alice.client.call(&open).await.expect("open"),
        Response::ChannelOpened { next_epoch: 0 }
    );
    let update = Change { update: true, ..Default::default() };
    for _ in 0..2 {
        let staged = alice.stage(&update, &check);
        let Response::CommitAccepted { cert } = alice.submit(&staged, vec![], None).await else {
            panic!("accepted")
        };
        alice.accept(&cert);
    }
    let staged = alice.stage(&update, &check);
    let r = alice.submit(&staged, vec![], None).await;
    assert!(
        matches!(r, Response::Error { code: ErrorCode::RateLimited { retry_after_ms }, .. } if retry_after_ms > 0),
        "{r:?}"
    );
}

/// A commit Bob builds with raw openmls from his stored group, bypassing `Channel::stage`'s
/// checks: what an attacker who is a member can send.
enum Forgery {
    Add(Box<openmls::prelude::KeyPackage>),
    Config(openmls::prelude::Extensions<openmls::prelude::GroupContext>),
}

fn forge(m: &Member, channel: ChannelId, forgery: Forgery) -> Vec<u8> {
    use openmls::prelude::tls_codec::Serialize as _;
    use openmls_traits::OpenMlsProvider as _;
    let storage = m.provider.storage();
    let mut group =
        openmls::group::MlsGroup::load(storage, &openmls::group::GroupId::from_slice(&channel.0))
            .expect("load")
            .expect("stored group");
    let builder = match forgery {
        Forgery::Add(kp) => group.commit_builder().propose_adds([*kp]),
        Forgery::Config(extensions) => {
            group.commit_builder().propose_group_context_extensions(extensions).expect("proposal")
        }
    };
    let bundle = builder
        .load_psks(storage)
        .expect("psks")
        .build(m.provider.rand(), m.provider.crypto(), m.mls.signer(), |_| true)
        .expect("build")
        .stage_commit(&m.provider)
        .expect("stage");
    let (commit, _, _) = bundle.into_contents();
    group.clear_pending_commit(storage).expect("clear");
    commit.tls_serialize_detached().expect("encode")
}

/// Alice, Bob and Carol registered at `relay`, and their records as it serves them.
async fn trio(relay: &RelayProcess) -> (Member, Member, Member, BTreeMap<DeviceId, Dir>) {
    let alice = member(relay, 1, "alice").await;
    let bob = member(relay, 2, "bob").await;
    let carol = member(relay, 3, "carol").await;
    let mut dirs = BTreeMap::new();
    for (m, name) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        dirs.insert(m.device.id(), lookup(&alice.client, name).await);
    }
    (alice, bob, carol, dirs)
}

/// A KeyPackage whose leaf is signed by `key` but whose credential names `claims`.
fn impersonating_key_package(key: &chitchat_proto::SecretKey, claims: DeviceId) -> Vec<u8> {
    use openmls::prelude::tls_codec::Serialize as _;
    use openmls::prelude::*;
    let provider = OpenMlsRustCrypto::default();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(claims.as_bytes().to_vec()).into(),
        signature_key: key.public().0.to_vec().into(),
    };
    let capabilities = Capabilities::builder()
        .extensions(vec![ExtensionType::Unknown(chitchat_proto::channel::CONFIG_EXTENSION_TYPE)])
        .build();
    KeyPackage::builder()
        .leaf_node_capabilities(capabilities)
        .build(
            chitchat_proto::channel::CIPHERSUITE,
            &provider,
            Identity::new(key).signer(),
            credential,
        )
        .expect("key package")
        .key_package()
        .tls_serialize_detached()
        .expect("encode")
}

fn refused(r: &Response, code: ErrorCode, says: &str) -> bool {
    matches!(r, Response::Error { code: c, message } if *c == code && message.contains(says))
}

/// The relay applies the channel rules as members do, and keys that cost nothing get nothing:
/// every finding of the audit (issue #10) that a relay can be tested for, through the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_holds_the_channel_rules_and_refuses_free_keys() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let relay_id = relay.relay_id().expect("well-known");
    let trust = TrustedRelays { relays: vec![relay_id.clone()], ..Default::default() };
    let (mut alice, mut bob, carol, dirs) = trio(&relay).await;
    let check = KnownDirs { dirs: &dirs, trust: &trust, now: now() };

    // A channel that only Alice administers, with Bob in it.
    let config = ChannelConfig {
        mime: chitchat_proto::chat::MIME.into(),
        name: "announcements".into(),
        relays: vec![relay_id.clone()],
        admins: AdminPolicy::Admins([alice.device.id()].into()),
        creator: alice.device.id(),
    };
    let id = alice.device.channel(9);
    alice.channel =
        Some(Channel::create(&alice.provider, &alice.mls, id, config.clone()).expect("create"));
    let opened = alice
        .client
        .call(&Request::OpenChannel { channel: id, state: alice.public_state() })
        .await
        .expect("open");
    assert_eq!(opened, Response::ChannelOpened { next_epoch: 0 });
    let kp = Bytes(bob.mls.key_package(&bob.provider, false).expect("kp"));
    let staged = alice.stage(&Change { add: vec![kp], ..Default::default() }, &check);
    let Response::CommitAccepted { cert: first_cert } = alice.submit(&staged, vec![], None).await
    else {
        panic!("the add is ordered")
    };
    alice.accept(&first_cert);
    let welcome = staged.welcome.clone().expect("welcome");
    bob.channel = Some(Channel::join(&bob.provider, &welcome, &check).expect("join"));
    let _ = alice.drain().await;
    let _ = bob.drain().await;

    // A key that is not registered here authenticates, and gets nothing else.
    let stranger = Device::new(40);
    let c = Client::connect(relay.tcp_addr(), relay.peer_id()).await.expect("connect");
    assert_eq!(
        c.authenticate(&stranger.key, "localhost").await.expect("auth"),
        Response::Authenticated
    );
    let sealed = inbox::seal(&mut rand::rng(), bob.device.id(), &bob.device.inbox.public(), b"x")
        .expect("seal");
    let post = ChannelPost { channel: id, message: vec![1, 2, 3] };
    let sub = CommitSubmission {
        channel: id,
        epoch: 1,
        commit: staged.commit.clone(),
        welcome: None,
        fanout: vec![],
    };
    for request in [
        Request::ClaimKeyPackage { device: bob.device.id() },
        Request::Enqueue { envelope: sealed },
        Request::OpenChannel { channel: alice.device.channel(10), state: alice.public_state() },
        Request::SubmitCommit(sub),
        Request::Post { posts: vec![post] },
        Request::Fetch { after: None, max: 10 },
        Request::Wait { after: None, max: 10, timeout_ms: 10 },
    ] {
        let r = c.call(&request).await.expect("call");
        assert!(refused(&r, ErrorCode::Forbidden, "register"), "{request:?}: {r:?}");
    }
    // Look-ups stay open to it.
    assert!(matches!(
        c.call(&Request::Lookup { local_name: "bob".into() }).await.expect("lookup"),
        Response::Dirs(d) if d.len() == 1
    ));

    // Bob, not an admin, adds Carol with a commit built by hand: the relay refuses it as the
    // members would (before, it ordered it, and the channel was stuck behind it).
    let carol_kp = {
        use openmls::prelude::tls_codec::Deserialize as _;
        use openmls_traits::OpenMlsProvider as _;
        let bytes = carol.mls.key_package(&carol.provider, false).expect("kp");
        openmls::prelude::KeyPackageIn::tls_deserialize_exact(&bytes[..])
            .expect("decode")
            .validate(carol.provider.crypto(), openmls::prelude::ProtocolVersion::Mls10)
            .expect("valid")
    };
    let bad_add = forge(&bob, id, Forgery::Add(Box::new(carol_kp)));
    let bad_add = Member::forged(&bad_add, 1);
    let r = bob.client.call(&Request::SubmitCommit(bad_add.clone())).await.expect("submit");
    assert!(refused(&r, ErrorCode::BadRequest, "not an admin"), "{r:?}");
    // Bob makes himself admin by rewriting the config.
    let mut rewritten = config.clone();
    rewritten.admins = AdminPolicy::Admins([bob.device.id()].into());
    let extensions = {
        use openmls::prelude::*;
        Extensions::from_vec(vec![
            Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
                &[ExtensionType::Unknown(chitchat_proto::channel::CONFIG_EXTENSION_TYPE)],
                &[],
                &[],
            )),
            Extension::Unknown(
                chitchat_proto::channel::CONFIG_EXTENSION_TYPE,
                UnknownExtension(chitchat_proto::codec::encode(&rewritten)),
            ),
        ])
        .expect("extensions")
    };
    let takeover = forge(&bob, id, Forgery::Config(extensions));
    let r = bob
        .client
        .call(&Request::SubmitCommit(Member::forged(&takeover, 1)))
        .await
        .expect("submit");
    assert!(refused(&r, ErrorCode::BadRequest, "not an admin"), "{r:?}");

    // Impersonation: a KeyPackage signed by one key whose credential names another device is
    // refused on upload (Bob's name, Mallory's key), and a commit adding one (Carol's name,
    // Mallory's key) is refused even from the admin (before, both passed: the relay checked the
    // named device's record, not that the leaf's key was that device's).
    let mallory = chitchat_proto::SecretKey::from_seed([66; 32]);
    let own_name = impersonating_key_package(&mallory, bob.device.id());
    let upload = Request::UploadKeyPackages { packages: vec![Bytes(own_name)], last_resort: None };
    let r = bob.client.call(&upload).await.expect("upload");
    assert!(refused(&r, ErrorCode::BadRequest, "does not name its signature key"), "{r:?}");
    let posing = {
        use openmls::prelude::tls_codec::Deserialize as _;
        use openmls_traits::OpenMlsProvider as _;
        let bytes = impersonating_key_package(&mallory, carol.device.id());
        openmls::prelude::KeyPackageIn::tls_deserialize_exact(&bytes[..])
            .expect("decode")
            .validate(alice.provider.crypto(), openmls::prelude::ProtocolVersion::Mls10)
            .expect("a valid KeyPackage, as openmls sees it")
    };
    let posing = forge(&alice, id, Forgery::Add(Box::new(posing)));
    let r = alice
        .client
        .call(&Request::SubmitCommit(Member::forged(&posing, 1)))
        .await
        .expect("submit");
    assert!(refused(&r, ErrorCode::BadRequest, "does not name its signature key"), "{r:?}");

    // Carol, registered but not a member, submits Alice's next commit, then Alice's winner.
    let next = alice.stage(&Change { update: true, ..Default::default() }, &check);
    let r = carol
        .client
        .call(&Request::SubmitCommit(Member::forged(&next.commit, 1)))
        .await
        .expect("submit");
    assert!(refused(&r, ErrorCode::Forbidden, "committed"), "{r:?}");
    let r = carol
        .client
        .call(&Request::SubmitCommit(Member::forged(&staged.commit, 0)))
        .await
        .expect("submit");
    assert!(refused(&r, ErrorCode::Forbidden, "not a member"), "{r:?}");
    alice.discard();

    // Alice resubmits her winner: the same certificate, and no second fan-out.
    let r = alice.submit(&staged, vec![], None).await;
    assert_eq!(r, Response::CommitAccepted { cert: first_cert });
    assert!(bob.drain().await.is_empty(), "a replayed winner is not fanned out again");
    assert!(alice.drain().await.is_empty());

    // A channel whose relay set does not name this relay is not ordered here.
    let mut elsewhere = config;
    elsewhere.creator = carol.device.id();
    elsewhere.admins = AdminPolicy::AnyMember;
    elsewhere.relays =
        vec![chitchat_proto::RelayId { host: "elsewhere.example".into(), key: relay_id.key }];
    let other = Channel::create(&carol.provider, &carol.mls, carol.device.channel(11), elsewhere)
        .expect("create");
    let state = other.public_state(&carol.provider, &carol.mls).expect("export");
    let r = carol
        .client
        .call(&Request::OpenChannel { channel: carol.device.channel(11), state })
        .await
        .expect("open");
    assert!(refused(&r, ErrorCode::Forbidden, "relay set"), "{r:?}");
    // Nothing of it moved the channel: Bob is at epoch 1 with Alice.
    assert_eq!(bob.channel().epoch_authenticator(), alice.channel().epoch_authenticator());
}

/// A relay that dies after ordering a commit and before its fan-out delivers it after the
/// restart: the added devices get their Welcomes, the committer (who never heard the answer)
/// finds its own commit in its inbox and merges it, and a removed member learns of its removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_between_ordering_and_fan_out_delivers_after_restart() {
    const FAULT: &str = chitchat_relay::fanout::FAULT_ENV;
    let mut relay = RelayProcess::start_fixed(|c| c.to_owned()).expect("relay");
    let relay_id = relay.relay_id().expect("well-known");
    let trust = TrustedRelays { relays: vec![relay_id.clone()], ..Default::default() };
    let (mut alice, mut bob, mut carol, dirs) = trio(&relay).await;
    let check = KnownDirs { dirs: &dirs, trust: &trust, now: now() };
    let config = open_channel(relay_id, alice.device.id());
    let id = alice.device.channel(12);
    alice.channel = Some(Channel::create(&alice.provider, &alice.mls, id, config).expect("create"));
    let opened = alice
        .client
        .call(&Request::OpenChannel { channel: id, state: alice.public_state() })
        .await
        .expect("open");
    assert_eq!(opened, Response::ChannelOpened { next_epoch: 0 });

    let reconnect = async |relay: &mut RelayProcess,
                           members: [&mut Member; 3],
                           fault: Option<&str>| {
        relay.set_env(FAULT, fault);
        relay.kill9();
        relay.restart().expect("restart");
        for m in members {
            m.client = Client::connect(relay.tcp_addr(), relay.peer_id()).await.expect("connect");
            let auth = m.client.authenticate(&m.device.key, "localhost").await.expect("auth");
            assert_eq!(auth, Response::Authenticated);
        }
    };
    // The add of Bob and Carol is ordered; the relay dies before its fan-out.
    reconnect(&mut relay, [&mut alice, &mut bob, &mut carol], Some("exit-before-fanout")).await;
    let mut add = Vec::new();
    let mut welcomes = Vec::new();
    for m in [&bob, &carol] {
        add.push(Bytes(m.mls.key_package(&m.provider, false).expect("kp")));
    }
    for m in [&bob, &carol] {
        let upload =
            Request::UploadKeyPackages { packages: vec![add.remove(0)], last_resort: None };
        assert!(matches!(
            m.client.call(&upload).await.expect("upload"),
            Response::KeyPackagesStored { .. }
        ));
        let Response::KeyPackage(kp) = alice
            .client
            .call(&Request::ClaimKeyPackage { device: m.device.id() })
            .await
            .expect("claim")
        else {
            panic!("no key package")
        };
        add.push(Bytes(kp));
    }
    let staged = alice.stage(&Change { add, ..Default::default() }, &check);
    for m in [&bob, &carol] {
        welcomes.push(m.sealed_welcome(id, &staged));
    }
    let answer = alice
        .client
        .call(&Request::SubmitCommit(CommitSubmission {
            channel: id,
            epoch: 0,
            commit: staged.commit.clone(),
            welcome: Some(SealedWelcomes { envelopes: welcomes }),
            fanout: vec![],
        }))
        .await;
    assert!(answer.is_err(), "the relay died before answering: {answer:?}");
    relay.wait_exit(std::time::Duration::from_secs(10)).expect("the fault fired");

    // Restarted without the fault: the fan-out happens as the log is applied again.
    reconnect(&mut relay, [&mut alice, &mut bob, &mut carol], None).await;
    for m in [&mut bob, &mut carol] {
        let Some(InboxPayload::Welcome { welcome, .. }) = m.drain().await.pop() else {
            panic!("the Welcome came after the restart")
        };
        m.channel = Some(Channel::join(&m.provider, &welcome, &check).expect("join"));
    }
    let events: Vec<ChannelEvent> =
        alice.drain().await.into_iter().flat_map(|p| alice.process(p, &check)).collect();
    assert!(
        matches!(&events[..], [ChannelEvent::CommitApplied { epoch: 1, .. }]),
        "Alice merges her own commit from her inbox: {events:?}"
    );
    assert_eq!(bob.channel().epoch_authenticator(), alice.channel().epoch_authenticator());
    assert_eq!(carol.channel().epoch_authenticator(), alice.channel().epoch_authenticator());

    // Bob removes Carol; the relay dies again before the fan-out.
    reconnect(&mut relay, [&mut alice, &mut bob, &mut carol], Some("exit-before-fanout")).await;
    let remove =
        bob.stage(&Change { remove: vec![carol.device.id()], ..Default::default() }, &check);
    assert!(bob.submit_raw(&remove).await.is_err(), "the relay died before answering");
    relay.wait_exit(std::time::Duration::from_secs(10)).expect("the fault fired");
    reconnect(&mut relay, [&mut alice, &mut bob, &mut carol], None).await;
    // Bob resubmits after the restart: accepted (the same commit), fanned out only once.
    let Response::CommitAccepted { cert } = bob.submit(&remove, vec![], None).await else {
        panic!("the removal was ordered before the crash")
    };
    bob.accept(&cert);
    for m in [&mut alice, &mut carol] {
        let events: Vec<ChannelEvent> =
            m.drain().await.into_iter().flat_map(|p| m.process(p, &check)).collect();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(matches!(events[0], ChannelEvent::CommitApplied { epoch: 2, .. }), "{events:?}");
    }
    assert!(!carol.channel().is_active(), "Carol learned of her removal");
    assert_eq!(bob.channel().epoch_authenticator(), alice.channel().epoch_authenticator());
}

/// A gauge of the relay's `/metrics`.
fn gauge(relay: &RelayProcess, name: &str) -> u64 {
    let metrics = relay.http_get("/metrics").expect("metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {metrics}"));
    line[name.len() + 1..].trim().parse().expect("a number")
}

/// The ordering state has a budget (`[ordering] max_state_bytes`): channels are opened until it
/// is full, then refused with `QuotaExceeded`; commits that add nobody still go through and
/// snapshots are taken; killed and restarted at its largest state, the relay loads its snapshot
/// and orders as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_at_its_state_budget_restarts_from_its_snapshot() {
    const BUDGET: u64 = 96 * 1024;
    let mut relay = RelayProcess::start_fixed(|c| {
        c.replace("max_state_bytes = 536870912", &format!("max_state_bytes = {BUDGET}"))
            .replace("snapshot_every = 10000", "snapshot_every = 4")
            .replace("opens_per_hour = 60", "opens_per_hour = 100000")
    })
    .expect("relay");
    let relay_id = relay.relay_id().expect("well-known");
    let mut alice = member(&relay, 1, "alice").await;
    let dirs = BTreeMap::from([(alice.device.id(), lookup(&alice.client, "alice").await)]);
    let trust = TrustedRelays { relays: vec![relay_id.clone()], ..Default::default() };
    let check = KnownDirs { dirs: &dirs, trust: &trust, now: now() };
    let config = open_channel(relay_id, alice.device.id());
    let mut opened = Vec::new();
    let refusal = loop {
        let id = alice.device.channel(opened.len() as u8 + 1);
        let channel =
            Channel::create(&alice.provider, &alice.mls, id, config.clone()).expect("create");
        let state = channel.public_state(&alice.provider, &alice.mls).expect("export");
        match alice.client.call(&Request::OpenChannel { channel: id, state }).await.expect("open") {
            Response::ChannelOpened { next_epoch: 0 } => opened.push(channel),
            other => break other,
        }
        assert!(opened.len() < 200, "the budget never filled");
    };
    assert!(
        matches!(&refusal, Response::Error { code: ErrorCode::QuotaExceeded { .. }, message }
            if message.contains("budget")),
        "{refusal:?}"
    );
    let channels = opened.len() as u64;
    assert!(channels >= 8, "{channels} channels fill {BUDGET} bytes");
    assert_eq!(gauge(&relay, "chitchat_relay_ordered_channels"), channels);
    let full = gauge(&relay, "chitchat_relay_ordering_state_bytes");
    assert!(full <= BUDGET && full + BUDGET / channels > BUDGET, "{full} of {BUDGET}");

    // At the budget, a member's own update is still ordered: enough of them for a snapshot of
    // the full state.
    alice.channel = Some(opened.remove(0));
    for epoch in 0..6 {
        let staged = alice.stage(&Change { update: true, ..Default::default() }, &check);
        let Response::CommitAccepted { cert } = alice.submit(&staged, vec![], None).await else {
            panic!("update {epoch} refused")
        };
        alice.accept(&cert);
    }
    let before = gauge(&relay, "chitchat_relay_ordering_state_bytes");

    relay.kill9();
    let started = std::time::Instant::now();
    relay.restart().expect("restart at the largest state");
    eprintln!("restart with {before} bytes of ordering state: {:?}", started.elapsed());
    alice.client = Client::connect(relay.tcp_addr(), relay.peer_id()).await.expect("connect");
    let auth = alice.client.authenticate(&alice.device.key, "localhost").await.expect("auth");
    assert_eq!(auth, Response::Authenticated);
    assert_eq!(gauge(&relay, "chitchat_relay_ordered_channels"), channels);
    assert_eq!(gauge(&relay, "chitchat_relay_ordering_state_bytes"), before);
    // It orders the next epoch where it left off, and is as full as before.
    let staged = alice.stage(&Change { update: true, ..Default::default() }, &check);
    assert_eq!(staged.epoch, 6);
    let Response::CommitAccepted { cert } = alice.submit(&staged, vec![], None).await else {
        panic!("the update after the restart was refused")
    };
    alice.accept(&cert);
    let id = alice.device.channel(250);
    let channel = Channel::create(&alice.provider, &alice.mls, id, config).expect("create");
    let state = channel.public_state(&alice.provider, &alice.mls).expect("export");
    let again =
        alice.client.call(&Request::OpenChannel { channel: id, state }).await.expect("open");
    assert!(
        matches!(again, Response::Error { code: ErrorCode::QuotaExceeded { .. }, .. }),
        "{again:?}"
    );
}

/// A relay-less channel moved onto a relay by its creator opens there on the evidence alone
/// (the state before, relay-less; the move, certified by the creator's device; the state after)
/// and on nothing less: not from another member, not with another device's certificate, not
/// at a state the move does not lead to, not from a state some relay ordered, not onto a set
/// without this relay; and a plain `OpenChannel` of the moved state finds no relay to vouch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_lan_channel_opens_at_its_relay_on_the_creators_evidence_only() {
    use chitchat_proto::ordering::{CertSignature, EpochCert, EpochCertBody};
    use chitchat_proto::wire::{OrderedCommit, commit_hash};

    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let relay_id = relay.relay_id().expect("well-known");
    let trust = TrustedRelays { relays: vec![relay_id.clone()], ..Default::default() };
    let (mut alice, mut bob, _carol, dirs) = trio(&relay).await;
    let check = KnownDirs { dirs: &dirs, trust: &trust, now: now() };

    // Alice's relay-less channel, then the commit that moves it onto the relay, certified by
    // her device (the only orderer of a relay-less channel).
    let lan = ChannelConfig { relays: vec![], ..open_channel(relay_id.clone(), alice.device.id()) };
    let id = alice.device.channel(12);
    alice.channel =
        Some(Channel::create(&alice.provider, &alice.mls, id, lan.clone()).expect("create"));
    let before = alice.public_state();
    let onto = |relays| Change {
        config: Some(ChannelConfig { relays, ..lan.clone() }),
        ..Default::default()
    };
    let staged = alice.stage(&onto(vec![relay_id.clone()]), &check);
    let certify = |key: &chitchat_proto::SecretKey, commit: &[u8]| {
        let body = EpochCertBody { channel: id, epoch: 0, hash: commit_hash(commit) };
        EpochCert { signatures: vec![CertSignature::sign(key, &body)], body }
    };
    let moved = OrderedCommit {
        channel: id,
        commit: staged.commit.clone(),
        cert: certify(&alice.device.key, &staged.commit),
    };
    alice.accept(&moved.cert);
    let after = alice.public_state();
    let open = |before, moved, state| Request::OpenMoved { before, moved, state };

    // Without the evidence, no relay vouches for a state past epoch 0.
    let plain = Request::OpenChannel { channel: id, state: after.clone() };
    let plain = alice.client.call(&plain).await.expect("call");
    assert!(refused(&plain, ErrorCode::Unavailable, "vouches"), "{plain:?}");
    // Another member cannot move it, even with the creator's evidence.
    let by_bob = open(before.clone(), moved.clone(), after.clone());
    let by_bob = bob.client.call(&by_bob).await.expect("call");
    assert!(refused(&by_bob, ErrorCode::Forbidden, "creator"), "{by_bob:?}");
    // Another device's certificate is not the creator's.
    let forged = OrderedCommit { cert: certify(&bob.device.key, &moved.commit), ..moved.clone() };
    let r = alice.client.call(&open(before.clone(), forged, after.clone())).await.expect("call");
    assert!(refused(&r, ErrorCode::Forbidden, "certified"), "{r:?}");
    // The state offered must be the one the move leads to.
    let same = open(before.clone(), moved.clone(), before.clone());
    let r = alice.client.call(&same).await.expect("call");
    assert!(refused(&r, ErrorCode::Forbidden, "leads to"), "{r:?}");
    // A state some relay ordered is opened by those relays, not moved.
    let relayed = open_channel(relay_id.clone(), alice.device.id());
    let other = Channel::create(&alice.provider, &alice.mls, alice.device.channel(13), relayed)
        .expect("create");
    let relayed_state = other.public_state(&alice.provider, &alice.mls).expect("export");
    let moved_13 = OrderedCommit { channel: alice.device.channel(13), ..moved.clone() };
    let relayed = open(relayed_state, moved_13, after.clone());
    let r = alice.client.call(&relayed).await.expect("call");
    assert!(refused(&r, ErrorCode::Forbidden, "ordered by relays"), "{r:?}");
    // A move onto a set without this relay is not this relay's to open (Bob's channel: a
    // relay it knows, but not itself).
    let mut elsewhere = relay_id.clone();
    elsewhere.host = "elsewhere.example".into();
    let bob_lan = ChannelConfig { relays: vec![], creator: bob.device.id(), ..lan.clone() };
    let bob_id = bob.device.channel(14);
    bob.channel =
        Some(Channel::create(&bob.provider, &bob.mls, bob_id, bob_lan.clone()).expect("create"));
    let bob_before = bob.public_state();
    let trust_both =
        TrustedRelays { relays: vec![relay_id.clone(), elsewhere.clone()], ..Default::default() };
    let check_both = KnownDirs { dirs: &dirs, trust: &trust_both, now: now() };
    let to_elsewhere = Change {
        config: Some(ChannelConfig { relays: vec![elsewhere], ..bob_lan }),
        ..Default::default()
    };
    let staged_b = bob.stage(&to_elsewhere, &check_both);
    let body = EpochCertBody { channel: bob_id, epoch: 0, hash: commit_hash(&staged_b.commit) };
    let cert = EpochCert { signatures: vec![CertSignature::sign(&bob.device.key, &body)], body };
    bob.accept(&cert);
    let moved_b = OrderedCommit { channel: bob_id, commit: staged_b.commit.clone(), cert };
    let elsewhere = open(bob_before, moved_b, bob.public_state());
    let r = bob.client.call(&elsewhere).await.expect("call");
    assert!(
        matches!(r, Response::Error { code: ErrorCode::BadRequest | ErrorCode::Forbidden, .. }),
        "{r:?}"
    );

    // The evidence itself opens it at the move's epoch, and the relay orders what follows.
    let evidence = open(before, moved, after);
    let r = alice.client.call(&evidence).await.expect("open");
    assert_eq!(r, Response::ChannelOpened { next_epoch: 1 });
    let update = alice.stage(&Change { update: true, ..Default::default() }, &check);
    let Response::CommitAccepted { cert } = alice.submit(&update, vec![], None).await else {
        panic!("the relay orders the moved channel")
    };
    assert_eq!(cert.body.epoch, 1);
}

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

/// Accepts every device: a careless committer.
struct AllowAll;

impl chitchat_proto::channel::CredentialCheck for AllowAll {
    fn check(&self, _: DeviceId) -> Result<(), String> {
        Ok(())
    }

    fn check_orderers(&self, _: &ChannelConfig) -> Result<(), String> {
        Ok(())
    }
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
    let config = ChannelConfig {
        mime: chitchat_proto::chat::MIME.into(),
        name: "general".into(),
        relays: vec![relay_id],
        admins: AdminPolicy::AnyMember,
        creator: alice.device.id(),
    };
    let id = ChannelId([7; 32]);
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
    let welcome = InboxPayload::Welcome {
        channel: id,
        welcome: Bytes(staged.welcome.clone().expect("welcome")),
    };
    let sealed = inbox::seal(
        &mut rand::rng(),
        bob.device.id(),
        &bob.device.inbox.public(),
        &welcome.to_bytes(),
    )
    .expect("seal");
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
    let got: Vec<ChannelEvent> =
        bob.drain().await.into_iter().flat_map(|p| bob.process(p, &check)).collect();
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

    // The operator sees it: four accepted (add, Alice's, her retry, Bob's rebuilt), one conflict.
    let metrics = relay.http_get("/metrics").expect("metrics");
    assert!(metrics.contains("chitchat_relay_posts_total 1"), "{metrics}");
    assert!(metrics.contains("chitchat_relay_commits_accepted_total 4"), "{metrics}");
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
            .stage(provider, &alice.mls, &change, &AllowAll)
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
    let late = alice.stage(&update, &check);
    let sub = CommitSubmission {
        channel: id,
        epoch: 1,
        commit: late.commit.clone(),
        welcome: None,
        fanout: vec![],
    };
    let r = c.call(&Request::SubmitCommit(sub)).await.expect("call");
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
        c.call(&Request::SubmitCommit(sub)).await.expect("call")
    else {
        panic!("accepted")
    };
    alice.accept(&cert);

    // A post crossing a membership change goes to the members of the epoch it was encrypted
    // in: sent in epoch 4 and posted once the commit removing Bob is ordered, it still reaches
    // him (he can read it); one sent after the removal reaches no one.
    let ca = Client::connect(relay.tcp_addr(), relay.peer_id()).await.expect("connect");
    ca.authenticate(&alice.device.key, "localhost").await.expect("auth");
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
        Channel::create(&alice.provider, &alice.mls, ChannelId([8; 32]), config).expect("create"),
    );
    let state = alice.public_state();
    let open = Request::OpenChannel { channel: ChannelId([8; 32]), state };
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

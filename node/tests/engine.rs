//! The engine without a network: two and three devices whose relay is `proto`'s orderer (the
//! real relay's state machine), driven by this test, which carries inbox items by hand. Real
//! MLS, real redb.

use chitchat_node::engine::{Delivery, Engine, EngineError, Event, Incoming, Received};
use chitchat_node::store::{Account, IntentOp, MessageStatus, OutboxItem, RelayInfo, Store};
use chitchat_proto::channel::ChannelMessage;
use chitchat_proto::channel::MessageId;
use chitchat_proto::codec::Canonical as _;
use chitchat_proto::identity::SponsorshipBody;
use std::cell::{Cell, RefCell};

use chitchat_proto::channel::AcceptAll;
use chitchat_proto::ordering::{
    CertSignature, ChannelId, CommitRef, EpochCert, EpochCertBody, OrderCommand, Orderer,
    OrderingLimits, Outcome, Verdict,
};
use chitchat_proto::wire::{ChannelPost, Envelope, InboxItem, InboxPayload, commit_hash};
use chitchat_proto::{RelayId, SecretKey, Sponsorship, Timestamp, chat, inbox};

const NOW: Timestamp = Timestamp(1_800_000_000_000);
const DAY_MS: u64 = 24 * 3600 * 1000;

/// The relay of these tests: `proto`'s orderer, as the real relay runs it (channel rules
/// included), its certificates, and inbox items carried by hand.
struct Relay {
    key: SecretKey,
    next_item: u64,
    orderer: RefCell<Orderer>,
    log: Cell<u64>,
}

impl Relay {
    fn new() -> Self {
        Self {
            key: SecretKey::from_seed([7; 32]),
            next_item: 0,
            orderer: RefCell::new(Orderer::new(OrderingLimits::default())),
            log: Cell::new(0),
        }
    }

    fn id(&self) -> RelayId {
        RelayId { host: "relay.test".into(), key: self.key.public() }
    }

    /// Starts ordering a channel `e` created.
    fn open(&self, e: &mut Engine, channel: ChannelId) {
        let state = e.public_state(&channel).expect("public state");
        self.log.set(self.log.get() + 1);
        let (verdict, _) =
            self.orderer.borrow_mut().apply(self.log.get(), OrderCommand::Open { channel, state });
        assert_eq!(verdict, Verdict::Ordering(Outcome::Opened));
    }

    /// Orders a commit for `epoch` (its committer submits it) and certifies it; the relay
    /// refusing it fails the test. A resubmitted winner gets its certificate again.
    fn cert(&self, channel: ChannelId, epoch: u64, commit: &[u8]) -> EpochCert {
        let hash = commit_hash(commit);
        let mut orderer = self.orderer.borrow_mut();
        let submitter = match orderer.state().winner(&channel, epoch) {
            Some(w) => w.submitter,
            None => orderer.check(&channel, commit, &AcceptAll).expect("the relay accepts it"),
        };
        let r = CommitRef { channel, epoch, hash, submitter };
        self.log.set(self.log.get() + 1);
        let order = OrderCommand::Order { commit: r, bytes: commit.to_vec().into(), welcome: None };
        let (verdict, _) = orderer.apply(self.log.get(), order);
        assert_eq!(verdict, Verdict::Ordering(Outcome::Accepted(r)));
        let body = EpochCertBody { channel, epoch, hash };
        EpochCert { body, signatures: vec![CertSignature::sign(&self.key, &body)] }
    }

    /// A channel post, as the relay fans it out: not sealed.
    fn post(&mut self, item: &OutboxItem) -> InboxItem {
        self.next_item += 1;
        let post = ChannelPost { channel: item.channel, message: item.message.clone() };
        InboxItem { id: self.next_item, envelope: Envelope::Post(post), history: None }
    }
}

/// The engine's one entry point, fed inbox items as the daemon's inbox task feeds it.
trait ReceiveInbox {
    fn receive_inbox(
        &mut self,
        items: &[InboxItem],
        now: Timestamp,
    ) -> Result<Received, EngineError>;
}

impl ReceiveInbox for Engine {
    fn receive_inbox(
        &mut self,
        items: &[InboxItem],
        now: Timestamp,
    ) -> Result<Received, EngineError> {
        let items: Vec<Incoming> = items.iter().cloned().map(Incoming::from).collect();
        self.receive(&items, now)
    }
}

fn sealed(envelope: inbox::SealedEnvelope, id: u64) -> InboxItem {
    InboxItem { id, envelope: Envelope::Sealed(envelope), history: None }
}

fn device(dir: &tempfile::TempDir, name: &str, relay: &Relay) -> Engine {
    device_of(dir, name, name, relay)
}

/// A device in `dir/FILE.redb`, registered as `name` (two files, one name: two devices of one
/// user).
fn device_of(dir: &tempfile::TempDir, file: &str, name: &str, relay: &Relay) -> Engine {
    let store = Store::open(&dir.path().join(format!("{file}.redb"))).expect("store");
    let mut e = Engine::open(store).expect("engine");
    let body = SponsorshipBody {
        device: e.device(),
        local_name: name.into(),
        relay: relay.id(),
        issued: NOW,
        expires: NOW.plus_ms(86_400_000),
    };
    let sponsorship = Sponsorship::issue(&relay.key, body);
    let first = e.first_dir(name, NOW);
    let dir = e.next_dir(&first, |b| b.sponsorships = vec![sponsorship], NOW).expect("record");
    assert_eq!(dir.body.seq, first.body.seq + 1, "a record follows the one it replaces");
    let info = RelayInfo {
        url: "http://relay.test".into(),
        id: relay.id(),
        peer_id: String::new(),
        addrs: vec![],
    };
    e.set_account(Account { relay: info, local_name: name.into(), dir }).expect("account");
    e
}

/// Sends and returns the message's id and the outbox entry the engine released, with whether
/// it was released before the send's commit.
fn send(
    e: &mut Engine,
    channel: &ChannelId,
    payload: &[u8],
) -> (MessageId, Option<(u64, OutboxItem, bool)>) {
    let mut released = None;
    let id = e
        .send(channel, payload, true, NOW, |r| released = Some((r.outbox_id, r.item, r.early)))
        .expect("send");
    (id, released)
}

fn text(body: &str) -> Vec<u8> {
    chat::ChatContent::Text { body: body.into() }.to_bytes()
}

/// Alice and Bob in a channel Alice created.
fn pair(tmp: &tempfile::TempDir, relay: &Relay) -> (Engine, Engine, ChannelId) {
    let mut alice = device(tmp, "alice", relay);
    let mut bob = device(tmp, "bob", relay);
    let channel = alice.create_channel("general", chat::MIME, false, false, NOW).expect("create");
    relay.open(&mut alice, channel);
    bob.add_dirs(vec![alice.account().expect("alice").dir.clone()]).expect("dirs");
    add(&mut alice, &mut bob, relay, channel, 0);
    (alice, bob, channel)
}

/// Alice adds Bob to the channel, and Bob joins from the Welcome (inbox item `item`).
fn add(alice: &mut Engine, bob: &mut Engine, relay: &Relay, channel: ChannelId, item: u64) {
    let (packages, _) = bob.key_packages(1, false).expect("kp");
    let bob_dir = bob.account().expect("bob").dir.clone();
    let staged = alice
        .stage(&channel, IntentOp::Add(vec![(bob_dir, packages[0].clone())]), 0, NOW)
        .expect("stage");
    alice.accept(&channel, &relay.cert(channel, staged.epoch, &staged.commit)).expect("merge");
    let welcome = staged.welcome.expect("welcome").envelopes[0].clone();
    assert_eq!(bob.receive_inbox(&[sealed(welcome, item)], NOW).expect("join").done, [item]);
}

/// `payload` sealed to `to`'s inbox, as the relay seals the commits it fans out.
fn sealed_to(to: &Engine, payload: &InboxPayload, id: u64) -> InboxItem {
    let key = to.account().expect("account").dir.body.inbox_key;
    let envelope =
        inbox::seal(&mut rand::rng(), to.device(), &key, &payload.to_bytes()).expect("seal");
    sealed(envelope, id)
}

fn reopen(dir: &tempfile::TempDir, name: &str, e: Engine) -> Engine {
    drop(e);
    Engine::open(Store::open(&dir.path().join(format!("{name}.redb"))).expect("store"))
        .expect("engine")
}

#[test]
fn invite_send_receive_and_survive_restarts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut relay = Relay::new();
    let mut alice = device(&tmp, "alice", &relay);
    let mut bob = device(&tmp, "bob", &relay);
    // Bob's KeyPackages must survive a restart: the Welcome may arrive much later.
    let (packages, _) = bob.key_packages(2, true).expect("key packages");
    let mut bob = reopen(&tmp, "bob", bob);
    let bob_dir = bob.account().expect("bob").dir.clone();

    let channel = alice.create_channel("general", chat::MIME, false, false, NOW).expect("create");
    relay.open(&mut alice, channel);
    let staged = alice
        .stage(&channel, IntentOp::Add(vec![(bob_dir, packages[0].clone())]), 0, NOW)
        .expect("stage");
    assert_eq!(alice.intents().expect("intents").len(), 1, "the intent is durable");
    // Alice crashes after staging; the staged commit is still what she submits.
    let mut alice = reopen(&tmp, "alice", alice);
    let cert = relay.cert(channel, staged.epoch, &staged.commit);
    alice.accept(&channel, &cert).expect("merge");
    assert!(alice.intents().expect("intents").is_empty());
    assert_eq!(alice.members(&channel).expect("members").len(), 2);

    let welcome = staged.welcome.clone().expect("welcome").envelopes[0].clone();
    let item = sealed(welcome, 100);
    let mut events = bob.subscribe();
    let got = bob.receive_inbox(std::slice::from_ref(&item), NOW).expect("receive");
    // Bob does not know Alice's record yet: the engine says whom to look up.
    let alice_id = alice.device();
    assert!(got.done.is_empty());
    let need = chitchat_node::engine::Need { devices: vec![alice_id], relays: vec![] };
    assert_eq!(got.stopped, Some((0, need)));
    bob.add_dirs(vec![alice.account().expect("alice").dir.clone()]).expect("dirs");
    let got = bob.receive_inbox(&[item], NOW).expect("receive");
    assert_eq!(got.done, vec![100]);
    assert!(matches!(events.try_recv(), Ok(Event::Joined { .. })));
    assert_eq!(bob.epoch(&channel), Some(1));

    let text = chat::ChatContent::Text { body: "hi bob".into() }.to_bytes();
    let (id, entry) = send(&mut alice, &channel, &text);
    let (outbox_id, _, early) = entry.expect("bob is a recipient");
    assert!(!early, "the first send of a run is durable before it leaves");
    let outbox = alice.outbox().expect("outbox");
    assert_eq!(outbox.len(), 1, "a sent message waits in the outbox");
    // Alice crashes before delivering: the outbox still holds the same message.
    let mut alice = reopen(&tmp, "alice", alice);
    let (oid, item) = alice.outbox().expect("outbox").remove(0);
    assert_eq!(oid, outbox_id);
    assert_eq!(item.id, id);
    let first = relay.post(&item);
    let again = relay.post(&item);
    let got = bob.receive_inbox(&[first, again], NOW).expect("receive");
    assert_eq!(got.done.len(), 2);
    let stored = bob.store().messages(&channel, 10).expect("messages");
    assert_eq!(stored.len(), 1, "a resent message is stored once");
    assert_eq!(stored[0].payload, text);
    alice.outbox_progress(vec![(oid, item, Delivery::Posted)], NOW, DAY_MS).expect("delivered");
    assert!(alice.outbox().expect("outbox").is_empty());

    // Bob restarts and still reads new messages: his MLS state was durable.
    let mut bob = reopen(&tmp, "bob", bob);
    let text2 = chat::ChatContent::Text { body: "still there?".into() }.to_bytes();
    send(&mut alice, &channel, &text2);
    let (_, item) = alice.outbox().expect("outbox").remove(0);
    let it = relay.post(&item);
    bob.receive_inbox(&[it], NOW).expect("receive");
    assert_eq!(bob.store().messages(&channel, 10).expect("messages").len(), 2);
}

/// Where the time of a catch-up goes (run with `--ignored --nocapture`).
#[test]
#[ignore = "a measurement, not a test"]
fn receive_cost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut relay = Relay::new();
    let (mut alice, mut bob, channel) = pair(&tmp, &relay);
    let n = 2000;
    let t = std::time::Instant::now();
    for i in 0..n {
        let text = chat::ChatContent::Text { body: format!("message {i}") }.to_bytes();
        send(&mut alice, &channel, &text);
    }
    eprintln!("send: {:?} per message", t.elapsed() / n);
    let mut items = Vec::new();
    for (_, item) in &alice.store().outbox(usize::MAX, |_| true).expect("outbox") {
        items.push(relay.post(item));
    }
    let t = std::time::Instant::now();
    for chunk in items.chunks(1024) {
        let r = bob.receive_inbox(chunk, NOW).expect("receive");
        assert_eq!(r.done.len(), chunk.len());
    }
    eprintln!(
        "receive: {:?} per message ({} messages)",
        t.elapsed() / items.len() as u32,
        items.len()
    );
}

/// A send may leave before its commit (all but the first of a run, per channel). A crash in
/// that window loses the state that encrypted it; the next open must skip that generation and
/// id, or the next message would reuse them (a reused AEAD key and nonce, and a message Bob
/// drops as a duplicate).
#[test]
fn a_crash_between_release_and_commit_never_reuses_a_generation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut relay = Relay::new();
    let (mut alice, mut bob, channel) = pair(&tmp, &relay);

    let (_, first) = send(&mut alice, &channel, &text("one"));
    let (_, first, early) = first.expect("released");
    assert!(!early, "the first send of a run commits first");
    // The second leaves before its commit; the process dies in that window.
    let mut leaked = None;
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        alice.send(&channel, &text("two"), true, NOW, |r| {
            assert!(r.early, "later sends leave before their commit");
            leaked = Some(r.item);
            panic!("the process dies here");
        })
    }));
    assert!(crashed.is_err());
    let leaked = leaked.expect("the message left");
    let mut alice = reopen(&tmp, "alice", alice);
    let outbox: Vec<_> = alice.outbox().expect("outbox").into_iter().map(|(_, i)| i.id).collect();
    assert_eq!(outbox, [first.id], "the crashed send never became durable");
    let (_, third) = send(&mut alice, &channel, &text("three"));
    let (_, third, _) = third.expect("released");
    assert_ne!(third.id, leaked.id, "the id of the message that left is not reused");
    let items = [relay.post(&first), relay.post(&leaked), relay.post(&third)];
    let got = bob.receive_inbox(&items, NOW).expect("receive");
    assert_eq!(got.done.len(), 3);
    let shown: Vec<Vec<u8>> = bob
        .store()
        .messages(&channel, 10)
        .expect("messages")
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(shown, [text("one"), text("two"), text("three")], "Bob reads all three");

    // A clean restart skips too (the mark stays until the next open), and a channel's sends
    // stay readable across many restarts.
    for i in 0..3 {
        alice = reopen(&tmp, "alice", alice);
        let body = format!("after restart {i}");
        let (_, m) = send(&mut alice, &channel, &text(&body));
        let (_, m, early) = m.expect("released");
        assert!(!early);
        let got = bob.receive_inbox(&[relay.post(&m)], NOW).expect("receive");
        assert_eq!(got.done.len(), 1);
    }
    assert_eq!(bob.store().messages(&channel, 10).expect("messages").len(), 6);
}

/// `send.commit_first`: every message leaves after its commit, and no channel is marked.
#[test]
fn commit_first_never_releases_before_the_commit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let relay = Relay::new();
    let (mut alice, _bob, channel) = pair(&tmp, &relay);
    alice.set_commit_first(true);
    for i in 0..3 {
        let (_, m) = send(&mut alice, &channel, &text(&format!("m{i}")));
        let (_, _, early) = m.expect("released");
        assert!(!early, "message {i} left before its commit");
    }
    assert!(alice.store().released().expect("released").is_empty());
}

/// After a clean stop ([`Engine::close`]) the next open skips nothing: receivers see no gap in
/// the sender's ids. After a stop without it, the next message's id is one further on.
#[test]
fn a_clean_stop_skips_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let relay = Relay::new();
    let mut alice = device(&tmp, "alice", &relay);
    let channel = alice.create_channel("general", chat::MIME, false, false, NOW).expect("create");
    relay.open(&mut alice, channel);
    let seq = |e: &mut Engine| send(e, &channel, &text("m")).0.seq;
    let first = seq(&mut alice);
    assert_eq!(seq(&mut alice), first + 1);
    assert_eq!(alice.store().released().expect("marks"), [channel]);
    alice.close().expect("close");
    assert!(alice.store().released().expect("marks").is_empty());
    let mut alice = reopen(&tmp, "alice", alice);
    assert_eq!(seq(&mut alice), first + 2, "no skip after a clean stop");
    let mut alice = reopen(&tmp, "alice", alice);
    assert_eq!(seq(&mut alice), first + 4, "one id skipped after an unclean stop");
}

/// A channel's MLS state leaves the disk with the device: on `leave`, and when the device is
/// removed. Then a new invitation joins afresh (a Welcome for a group still on disk would be
/// refused as already joined).
#[test]
fn leaving_or_removal_deletes_the_keys_and_a_new_welcome_joins() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut relay = Relay::new();
    let (mut alice, mut bob, channel) = pair(&tmp, &relay);
    let bob_id = bob.device();
    let mls_entries = |e: &Engine| e.store().mls_entries().expect("mls").len();

    // 1. Bob leaves: his keys go at once. Alice removes him, then invites him again.
    let before = mls_entries(&bob);
    bob.leave(&channel).expect("leave");
    assert!(mls_entries(&bob) < before, "the group's state is deleted");
    let staged = alice.stage(&channel, IntentOp::Remove(vec![bob_id]), 0, NOW).expect("stage");
    alice.accept(&channel, &relay.cert(channel, staged.epoch, &staged.commit)).expect("merge");
    add(&mut alice, &mut bob, &relay, channel, 10);
    assert_eq!(bob.epoch(&channel), alice.epoch(&channel), "bob joined afresh");

    // 2. Bob is removed: he learns it from the commit, and his keys go with it.
    let before = mls_entries(&bob);
    let staged = alice.stage(&channel, IntentOp::Remove(vec![bob_id]), 0, NOW).expect("stage");
    let cert = relay.cert(channel, staged.epoch, &staged.commit);
    alice.accept(&channel, &cert).expect("merge");
    let commit = ChannelMessage::Commit { commit: staged.commit.clone(), cert };
    let item = sealed_to(&bob, &InboxPayload::Channel { channel, message: commit }, 20);
    assert_eq!(bob.receive_inbox(&[item], NOW).expect("receive").done, [20]);
    assert_eq!(bob.epoch(&channel), None, "bob is out");
    assert!(mls_entries(&bob) < before, "the group's state is deleted");
    add(&mut alice, &mut bob, &relay, channel, 30);
    let (_, m) = send(&mut alice, &channel, &text("welcome back"));
    let (_, m, _) = m.expect("released");
    assert_eq!(bob.receive_inbox(&[relay.post(&m)], NOW).expect("receive").done.len(), 1);
    let last = bob.store().messages(&channel, 1).expect("messages");
    assert_eq!(last[0].payload, text("welcome back"));
}

/// Messages a member cannot use yet are bounded (32 per sender in a channel's future-epoch
/// buffer); past the bound they are dropped, acknowledged (so they never block the inbox) and
/// counted, and what was buffered is shown once the epoch arrives.
#[test]
fn messages_past_the_buffer_are_dropped_acknowledged_and_counted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut relay = Relay::new();
    let (mut alice, mut bob, channel) = pair(&tmp, &relay);
    let mut carol = device(&tmp, "carol", &relay);
    let dirs = vec![alice.account().expect("a").dir.clone(), bob.account().expect("b").dir.clone()];
    carol.add_dirs(dirs).expect("dirs");
    bob.add_dirs(vec![carol.account().expect("c").dir.clone()]).expect("dirs");
    // Alice adds Carol (epoch 2); Bob has not seen that commit yet.
    let (packages, _) = carol.key_packages(1, false).expect("kp");
    let carol_dir = carol.account().expect("carol").dir.clone();
    let staged = alice
        .stage(&channel, IntentOp::Add(vec![(carol_dir, packages[0].clone())]), 0, NOW)
        .expect("stage");
    let cert = relay.cert(channel, staged.epoch, &staged.commit);
    alice.accept(&channel, &cert).expect("merge");
    // Alice sends 40 messages in epoch 2: Bob buffers her first 32 and drops the rest.
    for i in 0..40 {
        send(&mut alice, &channel, &text(&format!("m{i}")));
    }
    let items: Vec<InboxItem> =
        alice.outbox().expect("outbox").iter().map(|(_, item)| relay.post(item)).collect();
    let got = bob.receive_inbox(&items, NOW).expect("receive");
    assert_eq!(got.held.len(), 32, "buffered, acknowledged once the epoch comes");
    assert_eq!(got.done.len(), 8, "dropped and acknowledged");
    assert_eq!(bob.dropped().buffer_full, 8);
    // The commit arrives: the buffered messages are shown.
    let commit = chitchat_proto::wire::OrderedCommit { channel, commit: staged.commit, cert };
    let item = InboxItem { id: 1000, envelope: Envelope::Commit(commit), history: None };
    let got = bob.receive_inbox(&[item], NOW).expect("receive");
    assert_eq!(got.done, vec![1000]);
    assert_eq!(bob.epoch(&channel), Some(2));
    assert_eq!(bob.store().messages(&channel, 100).expect("messages").len(), 32);
}

/// The relay fans a commit out to its committer too: when the answer to a submission is lost,
/// the committer merges its commit from its inbox, and the answer that comes later (a
/// resubmission answered `Accepted` again) finds it merged and only drops the intent.
#[test]
fn a_commit_merged_from_the_inbox_is_not_merged_twice() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let relay = Relay::new();
    let (mut alice, bob, channel) = pair(&tmp, &relay);
    let bob_id = bob.device();
    let staged = alice.stage(&channel, IntentOp::Remove(vec![bob_id]), 0, NOW).expect("stage");
    let cert = relay.cert(channel, staged.epoch, &staged.commit);
    // The answer is lost; the commit comes back through the inbox, after a restart.
    let mut alice = reopen(&tmp, "alice", alice);
    let commit = chitchat_proto::wire::OrderedCommit {
        channel,
        commit: staged.commit.clone(),
        cert: cert.clone(),
    };
    let item = InboxItem { id: 7, envelope: Envelope::Commit(commit), history: None };
    assert_eq!(alice.receive_inbox(&[item], NOW).expect("receive").done, vec![7]);
    assert_eq!(alice.epoch(&channel), Some(2), "merged as her own");
    assert_eq!(alice.members(&channel).expect("members").len(), 1);
    // The resubmission's answer arrives: nothing is merged twice, the intent goes.
    alice.accept(&channel, &cert).expect("accept is idempotent");
    assert_eq!(alice.epoch(&channel), Some(2));
    assert!(alice.intents().expect("intents").is_empty());
}

/// Retries are bounded by time, not attempts: a message the relay could not take for a month
/// less a day is still `sending`, however many attempts failed; past the give-up time it is
/// `failed`, with the reason in its status and its event. A refusal for good fails it at once,
/// with the relay's reason.
#[test]
fn an_outbox_item_is_given_up_by_time_not_by_attempts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let relay = Relay::new();
    let (mut alice, _bob, channel) = pair(&tmp, &relay);
    let mut events = alice.subscribe();
    let (id, _) = send(&mut alice, &channel, &text("through the outage"));
    let status = |e: &Engine, id| e.store().message(&channel, &id).expect("read").expect("stored");
    let give_up = 30 * DAY_MS;
    let (oid, mut item) = alice.outbox().expect("outbox").remove(0);
    item.attempts = 1_000_000;
    let later = Timestamp(NOW.0 + 29 * DAY_MS);
    alice.outbox_progress(vec![(oid, item, Delivery::Retry)], later, give_up).expect("retry");
    assert_eq!(status(&alice, id).status, MessageStatus::Sending);
    assert_eq!(alice.outbox().expect("outbox").len(), 1, "still waiting after a million tries");

    let (oid, item) = alice.outbox().expect("outbox").remove(0);
    let month = Timestamp(NOW.0 + 31 * DAY_MS);
    alice.outbox_progress(vec![(oid, item, Delivery::Retry)], month, give_up).expect("give up");
    assert_eq!(status(&alice, id).status, MessageStatus::Failed);
    assert!(alice.outbox().expect("outbox").is_empty());
    let reason = alice.failure(&channel, &id).expect("read").expect("a reason");
    assert!(reason.contains("30 days"), "{reason}");
    let failed = std::iter::from_fn(|| events.try_recv().ok())
        .find_map(|e| match e {
            Event::Failed { reason, .. } => Some(reason),
            _ => None,
        })
        .expect("a failed event");
    assert_eq!(failed, reason);

    let (refused, _) = send(&mut alice, &channel, &text("refused"));
    let (oid, item) = alice.outbox().expect("outbox").remove(0);
    let why = Delivery::Failed("the relay refused it (forbidden)".into());
    alice.outbox_progress(vec![(oid, item, why)], NOW, give_up).expect("refused");
    assert_eq!(status(&alice, refused).status, MessageStatus::Failed);
    let reason = alice.failure(&channel, &refused).expect("read");
    assert_eq!(reason.as_deref(), Some("the relay refused it (forbidden)"));
    // A message that did not fail has no reason.
    assert_eq!(
        alice.failure(&channel, &MessageId { sender: alice.device(), seq: 999 }).expect("read"),
        None
    );
}

/// A message that is not stored (a typing notice) is not kept for a month: after a few failed
/// attempts it leaves the outbox quietly, with no `failed` event (nothing shows it).
#[test]
fn an_unstored_notice_is_dropped_after_a_few_attempts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let relay = Relay::new();
    let (mut alice, _bob, channel) = pair(&tmp, &relay);
    let typing = chat::ChatContent::Typing { active: true }.to_bytes();
    alice.send(&channel, &typing, false, NOW, |_| {}).expect("send");
    let mut events = alice.subscribe();
    for attempt in 1..=chitchat_node::engine::EPHEMERAL_ATTEMPTS {
        let (oid, item) = alice.outbox().expect("outbox").remove(0);
        alice.outbox_progress(vec![(oid, item, Delivery::Retry)], NOW, DAY_MS).expect("retry");
        let left = alice.outbox().expect("outbox").len();
        let want = usize::from(attempt < chitchat_node::engine::EPHEMERAL_ATTEMPTS);
        assert_eq!(left, want, "after attempt {attempt}");
    }
    assert!(events.try_recv().is_err(), "no event for a notice nobody sees");
}

/// Bob's Welcome reaches his inbox after the channel's next commit and a message of the epoch
/// after it (the relays of the old set ordered his add, those of the new set what followed,
/// and his relay fanned the second out first). Both wait for the Welcome, unacknowledged, and
/// are used once he joins; across a restart, the relay's copies of the unacknowledged items
/// do the same. One that no Welcome follows is dropped after a while, acknowledged and counted.
#[test]
fn messages_before_their_welcome_wait_for_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut relay = Relay::new();
    let mut alice = device(&tmp, "alice", &relay);
    let mut bob = device(&tmp, "bob", &relay);
    let mut carol = device(&tmp, "carol", &relay);
    let dirs =
        vec![alice.account().expect("a").dir.clone(), carol.account().expect("c").dir.clone()];
    bob.add_dirs(dirs).expect("dirs");
    let channel = alice.create_channel("general", chat::MIME, false, false, NOW).expect("create");
    relay.open(&mut alice, channel);
    // Epoch 0 → 1 adds Bob; 1 → 2 adds Carol; then a message of epoch 2.
    let mut welcome = None;
    let mut commit = None;
    for n in 0..2 {
        let who = if n == 0 { &mut bob } else { &mut carol };
        let (packages, _) = who.key_packages(1, false).expect("kp");
        let dir = who.account().expect("dir").dir.clone();
        let staged = alice
            .stage(&channel, IntentOp::Add(vec![(dir, packages[0].clone())]), 0, NOW)
            .expect("stage");
        let cert = relay.cert(channel, staged.epoch, &staged.commit);
        alice.accept(&channel, &cert).expect("merge");
        if n == 0 {
            welcome = Some(staged.welcome.expect("welcome").envelopes[0].clone());
        } else {
            let c = chitchat_proto::wire::OrderedCommit { channel, commit: staged.commit, cert };
            commit = Some(InboxItem { id: 10, envelope: Envelope::Commit(c), history: None });
        }
    }
    send(&mut alice, &channel, &text("after carol"));
    let (_, out) = alice.outbox().expect("outbox").remove(0);
    relay.next_item = 10;
    let post = relay.post(&out); // item 11
    let welcome = sealed(welcome.expect("welcome"), 12);
    let commit = commit.expect("commit");

    // The commit and the message come first: held, not acknowledged.
    let early = [commit.clone(), post.clone()];
    let got = bob.receive_inbox(&early, NOW).expect("receive");
    assert!(got.done.is_empty() && got.held.is_empty(), "{got:?}");
    assert_eq!(bob.epoch(&channel), None);
    // Bob restarts: what waited in memory is gone, the relay sends the items again, in the
    // same order, and the Welcome after them.
    let mut bob = reopen(&tmp, "bob", bob);
    let got = bob.receive_inbox(&[commit, post, welcome], NOW.plus_ms(1_000)).expect("receive");
    let mut done = got.done.clone();
    done.sort_unstable();
    assert_eq!(done, [10, 11, 12], "all used and acknowledged: {got:?}");
    assert_eq!(bob.epoch(&channel), Some(2), "Carol's add applied after the Welcome");
    let shown = bob.store().messages(&channel, 10).expect("messages");
    assert_eq!(shown.len(), 1, "the message of epoch 2 is shown");
    assert_eq!(bob.dropped().not_joined, 0);

    // A message for a channel no Welcome ever comes for waits ten minutes, then is dropped.
    let mut dave = device(&tmp, "dave", &relay);
    let lonely = relay.post(&out);
    assert!(
        dave.receive_inbox(std::slice::from_ref(&lonely), NOW).expect("receive").done.is_empty()
    );
    let later = NOW.plus_ms(chitchat_node::engine::AWAITING_JOIN_MS + 1);
    assert_eq!(dave.receive_inbox(&[], later).expect("receive").done, [lonely.id]);
    assert_eq!(dave.dropped().not_joined, 1);
}

/// A message that reaches Bob by gossip and again from his inbox is shown once; the inbox copy
/// is acknowledged (dropped by id before decryption), and the gossiped one asks for no
/// acknowledgement. Alice's status moves from `sending` to `gossiped` to `sent`, never back.
#[test]
fn gossip_and_inbox_are_one_receive_path() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut relay = Relay::new();
    let (mut alice, mut bob, channel) = pair(&tmp, &relay);
    let mut released = None;
    let id = alice
        .send(&channel, &text("by two paths"), true, NOW, |r| released = Some(r))
        .expect("send");
    let r = released.expect("released");
    assert_eq!(r.gossip.body.message, r.item.message, "one ciphertext for both paths");
    assert_eq!(r.gossip.body.sender, alice.device());

    let got = bob.receive(&[Incoming::Gossip(r.gossip.clone())], NOW).expect("gossip");
    assert!(got.done.is_empty() && got.held.is_empty(), "nothing to acknowledge: {got:?}");
    let got = bob.receive_inbox(&[relay.post(&r.item)], NOW).expect("inbox");
    assert_eq!(got.done.len(), 1, "the inbox copy is acknowledged");
    let shown = bob.store().messages(&channel, 10).expect("messages");
    assert_eq!(shown.len(), 1, "shown once");
    assert_eq!(shown[0].payload, text("by two paths"));
    // A peer that gossips it again changes nothing.
    bob.receive(&[Incoming::Gossip(r.gossip.clone())], NOW).expect("again");
    assert_eq!(bob.store().messages(&channel, 10).expect("messages").len(), 1);

    let status = |e: &Engine| e.store().message(&channel, &id).expect("read").expect("kept").status;
    assert_eq!(status(&alice), MessageStatus::Sending);
    alice.gossiped(&channel, &id).expect("gossiped");
    assert_eq!(status(&alice), MessageStatus::Gossiped);
    alice
        .outbox_progress(vec![(r.outbox_id, r.item, Delivery::Posted)], NOW, DAY_MS)
        .expect("posted");
    assert_eq!(status(&alice), MessageStatus::Sent);
    alice.gossiped(&channel, &id).expect("late");
    assert_eq!(status(&alice), MessageStatus::Sent, "a late gossip report does not undo sent");
}

/// Gossip is judged by the members on disk (`rosters-0`), read beside the engine: both
/// members at the epoch they share; after Bob's removal, he is no member at the new epoch
/// (his envelopes are rejected), and his envelopes of the old epoch, whose keys he may keep,
/// are no longer judged (ignored: the inbox carries what he sent before); Bob, out, knows no
/// roster at all, and the rosters survive a reopen.
#[test]
fn gossip_is_judged_by_the_rosters_on_disk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let relay = Relay::new();
    let (mut alice, mut bob, channel) = pair(&tmp, &relay);
    let (a, b) = (alice.device(), bob.device());
    let epoch = alice.epoch(&channel).expect("in");
    let rosters = alice.store().rosters();
    assert_eq!(rosters.is_member(&channel, &b, epoch).expect("read"), Some(true));
    assert_eq!(bob.store().rosters().is_member(&channel, &a, epoch).expect("read"), Some(true));
    assert_eq!(rosters.is_member(&channel, &b, epoch + 1).expect("read"), None, "not reached");
    assert_eq!(alice.active_channels().into_iter().collect::<Vec<_>>(), [channel], "topics");

    let staged = alice.stage(&channel, IntentOp::Remove(vec![b]), 0, NOW).expect("stage");
    assert_eq!(rosters.is_member(&channel, &b, epoch + 1).expect("read"), None, "staged only");
    let cert = relay.cert(channel, staged.epoch, &staged.commit);
    alice.accept(&channel, &cert).expect("merge");
    assert_eq!(rosters.is_member(&channel, &b, epoch + 1).expect("read"), Some(false));
    assert_eq!(rosters.is_member(&channel, &a, epoch + 1).expect("read"), Some(true));
    assert_eq!(rosters.is_member(&channel, &a, epoch).expect("read"), Some(true), "kept");
    // Bob still holds epoch `epoch`'s keys: his envelopes of that epoch are no longer judged
    // (not forwarded; what he sent before his removal comes through the inbox).
    assert_eq!(rosters.is_member(&channel, &b, epoch).expect("read"), None, "removed since");
    let commit = ChannelMessage::Commit { commit: staged.commit.clone(), cert };
    let item = sealed_to(&bob, &InboxPayload::Channel { channel, message: commit }, 5);
    bob.receive_inbox(&[item], NOW).expect("removed");
    let bob_rosters = bob.store().rosters();
    assert_eq!(bob_rosters.is_member(&channel, &a, epoch).expect("read"), None, "bob is out");
    assert!(bob.active_channels().is_empty(), "bob gossips on no topic");
    // (A reader keeps the file open: the database is closed with the last of them.)
    drop(rosters);
    let alice = reopen(&tmp, "alice", alice);
    let rosters = alice.store().rosters();
    assert_eq!(rosters.is_member(&channel, &b, epoch + 1).expect("read"), Some(false));
}

#[test]
fn history_is_taken_only_from_a_device_of_the_same_user_and_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let relay = Relay::new();
    let (mut alice, mut bob, channel) = pair(&tmp, &relay);
    for body in ["one", "two"] {
        send(&mut alice, &channel, &text(body));
    }
    send(&mut bob, &channel, &text("bob's"));
    // Alice's second device joins the channel; MLS gives it nothing from before.
    let mut phone = device_of(&tmp, "phone", "alice", &relay);
    phone.add_dirs(vec![alice.account().expect("a").dir.clone()]).expect("dirs");
    phone.add_dirs(vec![bob.account().expect("b").dir.clone()]).expect("dirs");
    alice.add_dirs(vec![phone.account().expect("p").dir.clone()]).expect("dirs");
    bob.add_dirs(vec![phone.account().expect("p").dir.clone()]).expect("dirs");
    add(&mut alice, &mut phone, &relay, channel, 0);
    let count = |e: &Engine| e.store().count_messages(&channel).expect("count");
    assert_eq!(count(&phone), 0);

    // Bob is another user: his history of the channel is not the phone's to take.
    let from_bob = bob.history_for(&channel, phone.device()).expect("bob's packs");
    assert_eq!(from_bob.len(), 1, "bob's pack holds his message");
    let items: Vec<InboxItem> =
        from_bob.into_iter().zip(1..).map(|(e, id)| sealed(e, id)).collect();
    phone.receive_inbox(&items, NOW).expect("receive");
    assert_eq!(count(&phone), 0, "history from another user is dropped");

    // A pack signed with Alice's key whose message was changed after signing does not hold.
    let forged = {
        let m = chitchat_proto::wire::HistoryMessage {
            id: MessageId { sender: bob.device(), seq: 99 },
            hlc: chitchat_proto::hlc::Hlc { wall_ms: NOW.0, counter: 0 },
            epoch: 1,
            payload: chitchat_proto::codec::Bytes(text("forged")),
        };
        let pack = chitchat_proto::pack::Pack::seal(alice.key(), channel, 0, vec![m.to_bytes()]);
        let mut pack = pack.expect("pack");
        pack.envelopes[0].0[0] ^= 1;
        InboxPayload::History(pack)
    };
    phone.receive_inbox(&[sealed_to(&phone, &forged, 10)], NOW).expect("receive");
    assert_eq!(count(&phone), 0, "a tampered pack is dropped");
    let mut packs = alice.history_for(&channel, phone.device()).expect("packs");
    assert_eq!(packs.len(), 1);

    // Alice's own pack: both messages, once each however often it comes.
    let envelope = packs.remove(0);
    phone.receive_inbox(&[sealed(envelope.clone(), 11)], NOW).expect("receive");
    phone.receive_inbox(&[sealed(envelope, 12)], NOW).expect("receive again");
    assert_eq!(count(&phone), 2);
    let shown = phone.store().messages(&channel, 10).expect("messages");
    let bodies: Vec<Vec<u8>> = shown.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(bodies, [text("one"), text("two")]);
}

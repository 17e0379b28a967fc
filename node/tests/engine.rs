//! The engine without a network: two and three devices whose "relay" is this test, which
//! signs epoch certificates and carries inbox items by hand. Real MLS, real redb.

use chitchat_node::engine::{Delivery, Engine, Event};
use chitchat_node::store::{Account, IntentOp, OutboxItem, RelayInfo, Store};
use chitchat_proto::codec::Canonical as _;
use chitchat_proto::identity::SponsorshipBody;
use chitchat_proto::ordering::{CertSignature, ChannelId, EpochCert, EpochCertBody};
use chitchat_proto::wire::{ChannelPost, Envelope, InboxItem, commit_hash};
use chitchat_proto::{RelayId, SecretKey, Sponsorship, Timestamp, chat, inbox};

const NOW: Timestamp = Timestamp(1_800_000_000_000);

struct Relay {
    key: SecretKey,
    next_item: u64,
}

impl Relay {
    fn id(&self) -> RelayId {
        RelayId { host: "relay.test".into(), key: self.key.public() }
    }

    fn cert(&self, channel: ChannelId, epoch: u64, commit: &[u8]) -> EpochCert {
        let body = EpochCertBody { channel, epoch, hash: commit_hash(commit) };
        EpochCert { body, signatures: vec![CertSignature::sign(&self.key, &body)] }
    }

    /// A channel post, as the relay fans it out: not sealed.
    fn post(&mut self, item: &OutboxItem) -> InboxItem {
        self.next_item += 1;
        let post = ChannelPost { channel: item.channel, message: item.message.clone() };
        InboxItem { id: self.next_item, envelope: Envelope::Post(post) }
    }
}

fn sealed(envelope: inbox::SealedEnvelope, id: u64) -> InboxItem {
    InboxItem { id, envelope: Envelope::Sealed(envelope) }
}

fn device(dir: &tempfile::TempDir, name: &str, relay: &Relay) -> Engine {
    let store = Store::open(&dir.path().join(format!("{name}.redb"))).expect("store");
    let mut e = Engine::open(store).expect("engine");
    let body = SponsorshipBody {
        device: e.device(),
        local_name: name.into(),
        relay: relay.id(),
        issued: NOW,
        expires: NOW.plus_ms(86_400_000),
    };
    let sponsorship = Sponsorship::issue(&relay.key, body);
    let dir = e.own_dir(2, vec![sponsorship], NOW);
    let info = RelayInfo {
        url: "http://relay.test".into(),
        id: relay.id(),
        peer_id: String::new(),
        addrs: vec![],
    };
    e.set_account(Account { relay: info, local_name: name.into(), dir }).expect("account");
    e
}

fn reopen(dir: &tempfile::TempDir, name: &str, e: Engine) -> Engine {
    drop(e);
    Engine::open(Store::open(&dir.path().join(format!("{name}.redb"))).expect("store"))
        .expect("engine")
}

#[test]
fn invite_send_receive_and_survive_restarts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut relay = Relay { key: SecretKey::from_seed([7; 32]), next_item: 0 };
    let mut alice = device(&tmp, "alice", &relay);
    let mut bob = device(&tmp, "bob", &relay);
    // Bob's KeyPackages must survive a restart: the Welcome may arrive much later.
    let (packages, _) = bob.key_packages(2, true).expect("key packages");
    let mut bob = reopen(&tmp, "bob", bob);
    let bob_dir = bob.account().expect("bob").dir.clone();

    let channel = alice.create_channel("general", chat::MIME, false, NOW).expect("create");
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
    let got = bob.receive(std::slice::from_ref(&item), NOW).expect("receive");
    // Bob does not know Alice's record yet: the engine says whom to look up.
    let alice_id = alice.device();
    assert!(got.done.is_empty());
    assert_eq!(got.stopped, Some((0, vec![alice_id])));
    bob.add_dirs(vec![alice.account().expect("alice").dir.clone()]).expect("dirs");
    let got = bob.receive(&[item], NOW).expect("receive");
    assert_eq!(got.done, vec![100]);
    assert!(matches!(events.try_recv(), Ok(Event::Joined { .. })));
    assert_eq!(bob.epoch(&channel), Some(1));

    let text = chat::ChatContent::Text { body: "hi bob".into() }.to_bytes();
    let (id, entry) = alice.send(&channel, &text, true, NOW).expect("send");
    let outbox_id = entry.expect("bob is a recipient").0;
    let outbox = alice.outbox().expect("outbox");
    assert_eq!(outbox.len(), 1, "a sent message waits in the outbox");
    // Alice crashes before delivering: the outbox still holds the same message.
    let mut alice = reopen(&tmp, "alice", alice);
    let (oid, item) = alice.outbox().expect("outbox").remove(0);
    assert_eq!(oid, outbox_id);
    assert_eq!(item.id, id);
    let first = relay.post(&item);
    let again = relay.post(&item);
    let got = bob.receive(&[first, again], NOW).expect("receive");
    assert_eq!(got.done.len(), 2);
    let stored = bob.store().messages(&channel, 10).expect("messages");
    assert_eq!(stored.len(), 1, "a resent message is stored once");
    assert_eq!(stored[0].payload, text);
    alice.outbox_progress(vec![(oid, item, Delivery::Posted)]).expect("delivered");
    assert!(alice.outbox().expect("outbox").is_empty());

    // Bob restarts and still reads new messages: his MLS state was durable.
    let mut bob = reopen(&tmp, "bob", bob);
    let text2 = chat::ChatContent::Text { body: "still there?".into() }.to_bytes();
    alice.send(&channel, &text2, true, NOW).expect("send");
    let (_, item) = alice.outbox().expect("outbox").remove(0);
    let it = relay.post(&item);
    bob.receive(&[it], NOW).expect("receive");
    assert_eq!(bob.store().messages(&channel, 10).expect("messages").len(), 2);
}

/// Where the time of a catch-up goes (run with `--ignored --nocapture`).
#[test]
#[ignore = "a measurement, not a test"]
fn receive_cost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut relay = Relay { key: SecretKey::from_seed([7; 32]), next_item: 0 };
    let mut alice = device(&tmp, "alice", &relay);
    let mut bob = device(&tmp, "bob", &relay);
    let (packages, _) = bob.key_packages(1, false).expect("kp");
    let bob_dir = bob.account().expect("bob").dir.clone();
    let channel = alice.create_channel("general", chat::MIME, false, NOW).expect("create");
    let staged = alice
        .stage(&channel, IntentOp::Add(vec![(bob_dir, packages[0].clone())]), 0, NOW)
        .expect("stage");
    alice.accept(&channel, &relay.cert(channel, staged.epoch, &staged.commit)).expect("merge");
    bob.add_dirs(vec![alice.account().expect("alice").dir.clone()]).expect("dirs");
    let welcome = staged.welcome.expect("w").envelopes[0].clone();
    bob.receive(&[sealed(welcome, 0)], NOW).expect("join");
    let n = 2000;
    let t = std::time::Instant::now();
    for i in 0..n {
        let text = chat::ChatContent::Text { body: format!("message {i}") }.to_bytes();
        alice.send(&channel, &text, true, NOW).expect("send");
    }
    eprintln!("send: {:?} per message", t.elapsed() / n);
    let mut items = Vec::new();
    for (_, item) in &alice.store().outbox(usize::MAX).expect("outbox") {
        items.push(relay.post(item));
    }
    let t = std::time::Instant::now();
    for chunk in items.chunks(1024) {
        let r = bob.receive(chunk, NOW).expect("receive");
        assert_eq!(r.done.len(), chunk.len());
    }
    eprintln!(
        "receive: {:?} per message ({} messages)",
        t.elapsed() / items.len() as u32,
        items.len()
    );
}

//! Relay-less channels in the engine, without a network: devices registered nowhere, a channel
//! ordered by its creator's device, envelopes handed over by hand as the peer protocol hands
//! them. Real MLS, real redb. Each rule is broken on purpose once.

use chitchat_node::engine::{Engine, Incoming, Ordered};
use chitchat_node::store::{IntentOp, MessageStatus, Store};
use chitchat_proto::codec::{Bytes, Canonical as _};
use chitchat_proto::ordering::{CertSignature, ChannelId, EpochCert, EpochCertBody};
use chitchat_proto::wire::{Envelope, OrderedCommit, commit_hash};
use chitchat_proto::{Timestamp, chat};

const NOW: Timestamp = Timestamp(1_800_000_000_000);

/// A device registered nowhere, knowing its own record (as the daemon arranges at start).
fn device(tmp: &tempfile::TempDir, name: &str) -> Engine {
    let store = Store::open(&tmp.path().join(format!("{name}.redb"))).expect("store");
    let mut e = Engine::open(store).expect("engine");
    let own = e.peer_record(name, NOW);
    e.add_dirs(vec![own]).expect("own record");
    e
}

fn text(body: &str) -> Vec<u8> {
    chat::ChatContent::Text { body: body.into() }.to_bytes()
}

/// `adder` adds `new` to the channel: `new`'s record and KeyPackage (as `Hello` and
/// `ClaimKeyPackage` give them), staged, ordered by `adder` (the creator), merged. Returns the
/// ordered commit and the Welcome envelopes.
fn add(
    adder: &mut Engine,
    new: &mut Engine,
    name: &str,
    channel: &ChannelId,
) -> (OrderedCommit, Vec<Envelope>) {
    let dir = new.peer_record(name, NOW);
    let (mut kps, _) = new.key_packages(1, false).expect("key package");
    let kp = kps.pop().expect("one");
    let staged =
        adder.stage(channel, IntentOp::Add(vec![(dir, Bytes(kp.0))]), 0, NOW).expect("stage");
    let ordered = adder.order_own(channel, &staged).expect("the creator orders");
    adder.accept(channel, &ordered.cert).expect("merge");
    let welcomes = staged
        .welcome
        .iter()
        .flat_map(|w| w.envelopes.iter().cloned().map(Envelope::Sealed))
        .collect();
    (ordered, welcomes)
}

fn hand(e: &mut Engine, envelopes: Vec<Envelope>) {
    let items: Vec<Incoming> = envelopes.into_iter().map(Incoming::Direct).collect();
    let r = e.receive(&items, NOW).expect("receive");
    assert!(r.stopped.is_none(), "nothing to look up: {:?}", r.stopped);
}

#[test]
fn a_relay_less_channel_is_ordered_by_its_creator_alone() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut alice = device(&tmp, "alice");
    let mut bob = device(&tmp, "bob");
    let mut carol = device(&tmp, "carol");
    // Registered nowhere: a relay-ordered channel is refused, a relay-less one made.
    assert!(alice.create_channel("x", chat::MIME, false, false, NOW).is_err());
    // Open: any member may stage a change (only the creator can order it).
    let channel = alice.create_channel("lan", chat::MIME, true, true, NOW).expect("create");
    assert!(alice.is_relayless(&channel));

    let (first, welcomes) = add(&mut alice, &mut bob, "bob", &channel);
    // The creator answers the same commit again, and never certifies another for the epoch.
    let staged_again = chitchat_node::store::StagedRecord {
        epoch: first.cert.body.epoch,
        commit: first.commit.clone(),
        welcome: None,
        fanout: Vec::new(),
    };
    assert_eq!(alice.order_own(&channel, &staged_again).expect("same commit"), first);
    let other = chitchat_node::store::StagedRecord { commit: vec![1, 2, 3], ..staged_again };
    let refused = alice.order_own(&channel, &other);
    assert!(refused.is_err_and(|e| e.to_string().contains("another commit")), "two certificates");

    // Bob joins from the Welcome handed to him, with Alice's record (as Deliver carries it).
    bob.add_dirs(vec![alice.peer_record("alice", NOW)]).expect("dirs");
    hand(&mut bob, welcomes);
    assert_eq!(bob.epoch(&channel), Some(1), "bob joined at epoch 1");
    assert!(
        bob.name_of(&alice.device()).contains("alice")
            && bob.name_of(&alice.device()).contains("unverified")
    );

    // Bob, a member, stages an add of Carol and certifies it himself: he is no orderer here.
    bob.add_dirs(vec![carol.peer_record("carol", NOW)]).expect("dirs");
    let (mut kps, _) = carol.key_packages(1, false).expect("kp");
    let kp = kps.pop().expect("one");
    let staged = bob
        .stage(
            &channel,
            IntentOp::Add(vec![(carol.peer_record("carol", NOW), Bytes(kp.0))]),
            0,
            NOW,
        )
        .expect("bob may stage in an open channel");
    assert!(bob.order_own(&channel, &staged).is_err(), "only the creator orders");
    let body = EpochCertBody { channel, epoch: staged.epoch, hash: commit_hash(&staged.commit) };
    let forged = OrderedCommit {
        channel,
        commit: staged.commit.clone(),
        cert: EpochCert { signatures: vec![CertSignature::sign(bob.key(), &body)], body },
    };
    alice.add_dirs(vec![carol.peer_record("carol", NOW)]).expect("dirs");
    hand(&mut alice, vec![Envelope::Commit(forged)]);
    assert_eq!(alice.epoch(&channel), Some(1), "a commit certified by a member is refused");
    assert_eq!(alice.members(&channel).expect("members").len(), 2);
    // Submitted to Alice, it is ordered: checked as every member checks it, committed by the
    // submitter itself, the first of its epoch; the same commit again gets the same answer,
    // another one for that epoch the winner.
    let epoch = staged.epoch;
    let wrong = alice.order_submitted(&channel, epoch, &staged.commit, &carol.device(), NOW);
    assert!(wrong.is_err(), "the commit is Bob's, not Carol's");
    assert!(alice.order_submitted(&channel, epoch, b"junk", &bob.device(), NOW).is_err());
    let Ordered::Accepted(ordered) = alice
        .order_submitted(&channel, epoch, &staged.commit, &bob.device(), NOW)
        .expect("ordered")
    else {
        panic!("the first valid commit of the epoch wins");
    };
    let again = alice.order_submitted(&channel, epoch, &staged.commit, &bob.device(), NOW);
    assert_eq!(again.expect("again"), Ordered::Accepted(ordered.clone()));
    let late = alice.order_submitted(&channel, epoch, b"another", &bob.device(), NOW);
    assert_eq!(late.expect("late"), Ordered::Conflict(ordered.clone()));
    assert_eq!(ordered.cert.body.hash, body.hash);
    let cert = ordered.cert.clone();
    hand(&mut alice, vec![Envelope::Commit(ordered)]);
    assert_eq!(alice.epoch(&channel), Some(2), "the creator's certificate counts");
    assert_eq!(alice.members(&channel).expect("members").len(), 3);
    bob.accept(&channel, &cert).expect("bob merges his commit, certified");

    // What Alice ordered is served to members only, from the epoch asked.
    assert_eq!(alice.ordered_for(&channel, 0, &bob.device()).expect("bob").len(), 2);
    assert_eq!(alice.ordered_for(&channel, 1, &bob.device()).expect("bob").len(), 1);
    assert!(alice.ordered_for(&channel, 2, &bob.device()).expect("bob").is_empty());
    let stranger = device(&tmp, "stranger");
    assert!(alice.ordered_for(&channel, 0, &stranger.device()).is_err(), "not a member");

    // Messages: released for gossip alone; the relay's outbox never sees them.
    let mut released = None;
    alice
        .send(&channel, &text("hi bob"), true, NOW, |r| {
            released = Some((r.outbox_id, r.item, r.lan))
        })
        .expect("send");
    let (outbox_id, item, lan) = released.expect("released");
    assert!(lan, "a relay-less channel's message is marked for gossip alone");
    assert!(alice.outbox().expect("outbox").is_empty(), "nothing for a relay");
    assert_eq!(alice.lan_outbox().expect("lan outbox").len(), 1);
    alice.lan_published(outbox_id, &item).expect("published");
    assert!(alice.lan_outbox().expect("lan outbox").is_empty());
    let stored = alice.store().message(&channel, &item.id).expect("read").expect("stored");
    assert_eq!(stored.status, MessageStatus::Gossiped);
    // Bob reads it from gossip, as the gossip task hands it over.
    let envelope = alice.lan_envelope(&item, NOW).expect("read").expect("stored message");
    bob.receive(&[Incoming::Gossip(envelope)], NOW).expect("receive");
    let texts = bob.store().messages(&channel, usize::MAX).expect("messages").len();
    assert_eq!(texts, 1, "bob has alice's message");

    // Every member keeps the channel's messages it took (its own, and what others gossip, once
    // each) and serves them to members, not to others; what does not authenticate is not kept.
    let (kept, next) = alice.lan_history_for(&channel, 0, &bob.device()).expect("bob may read");
    assert_eq!((kept.len(), next), (1, 1), "alice's own message");
    let (kept, _) = bob.lan_history_for(&channel, 0, &alice.device()).expect("alice may read");
    assert_eq!(kept.len(), 1, "what bob read of alice's: kept by a member, not only the creator");
    let mut from_bob = None;
    bob.send(&channel, &text("from bob"), true, NOW, |r| from_bob = Some(r.gossip)).expect("send");
    let from_bob = from_bob.expect("released");
    let forged = chitchat_proto::gossip::GossipEnvelope::seal(
        &chitchat_proto::SecretKey::from_seed([9; 32]),
        channel,
        from_bob.body.epoch,
        vec![7; 200],
        NOW,
    );
    let items =
        [Incoming::Gossip(from_bob.clone()), Incoming::Gossip(from_bob), Incoming::Gossip(forged)];
    alice.receive(&items, NOW).expect("receive");
    let (kept, _) = alice.lan_history_for(&channel, 0, &carol.device()).expect("carol may read");
    assert_eq!(kept.len(), 2, "once each, and not the forgery");
    let (kept, _) = bob.lan_history_for(&channel, 0, &carol.device()).expect("carol may read");
    assert_eq!(kept.len(), 2, "bob keeps his own message too");
    // A member keeps the commits it took, and serves them from where the asker is.
    let at_bob = bob.ordered_for(&channel, 1, &carol.device()).expect("carol may ask bob");
    assert_eq!(at_bob.len(), 1, "the commit bob merged as his own");
    assert_eq!(at_bob[0].cert, cert, "with the creator's certificate");
    let gap = bob.ordered_for(&channel, 0, &carol.device()).expect("carol may ask bob");
    assert!(gap.is_empty(), "bob joined at epoch 1: no run starts at 0");
    assert!(bob.ordered_for(&channel, 0, &stranger.device()).is_err(), "not a member");
    assert!(alice.lan_history_for(&channel, 0, &stranger.device()).is_err(), "not a member");
}

/// A relay-only device (which meets no peer) joins no relay-less channel, and a peer may hand
/// over Welcomes and commits only.
#[test]
fn a_relay_only_device_refuses_a_relay_less_welcome_and_peers_hand_over_no_posts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut alice = device(&tmp, "alice");
    let mut bob = device(&tmp, "bob");
    bob.set_lan(false);
    let channel = alice.create_channel("lan", chat::MIME, false, true, NOW).expect("create");
    let (_, welcomes) = add(&mut alice, &mut bob, "bob", &channel);
    bob.add_dirs(vec![alice.peer_record("alice", NOW)]).expect("dirs");
    let items: Vec<Incoming> = welcomes.into_iter().map(Incoming::Direct).collect();
    bob.receive(&items, NOW).expect("receive");
    assert_eq!(bob.epoch(&channel), None, "not joined");
    let post = Envelope::Missed { channel, from: 0 };
    let before = alice.dropped().invalid;
    alice.receive(&[Incoming::Direct(post)], NOW).expect("receive");
    assert_eq!(alice.dropped().invalid, before + 1, "refused and counted");
}

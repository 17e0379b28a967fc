//! In-memory multi-member scenarios on a virtual clock: Alice, Bob, Carol and Alice's second
//! device (`alice2`) in one channel ordered by one relay.

use std::collections::{BTreeMap, VecDeque};

use openmls_rust_crypto::OpenMlsRustCrypto;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng as _, SeedableRng};

use super::*;
use crate::identity::{Dir, DirBody, Profile, Sponsorship, SponsorshipBody, TrustedRelays};
use crate::ordering::{
    CertSignature, CommitRef, Intent, IntentState, OrderCommand, Orderer, OrderingLimits, Outcome,
    Verdict,
};

const DAY_MS: u64 = 24 * 3600 * 1000;

/// The relay of the test: `proto`'s orderer, as the real relay runs it (channel rules
/// included), and its certificates.
struct Relay {
    key: SecretKey,
    id: RelayId,
    orderer: Orderer,
    /// Entries ordered so far.
    log: u64,
    /// Accepted commits by hash, so losers can fetch the winner.
    commits: BTreeMap<CommitHash, (Vec<u8>, EpochCert)>,
}

impl Relay {
    fn new() -> Self {
        let key = SecretKey::from_seed([200; 32]);
        let id = RelayId { host: "relay.test".into(), key: key.public() };
        let orderer = Orderer::new(OrderingLimits::default());
        Self { key, id, orderer, log: 0, commits: BTreeMap::new() }
    }

    /// Starts ordering a channel from a member's export.
    fn open(&mut self, channel: &Channel, provider: &OpenMlsRustCrypto, me: &Identity) {
        let state = channel.public_state(provider, me).expect("export");
        self.log += 1;
        let (verdict, _) =
            self.orderer.apply(self.log, OrderCommand::Open { channel: channel.id(), state });
        assert_eq!(verdict, Verdict::Ordering(Outcome::Opened));
    }

    /// Orders a staged commit: `Ok(cert)` if it won, `Err(winner)` if another did. The relay
    /// refusing it is a test failure.
    fn submit(
        &mut self,
        channel: ChannelId,
        by: DeviceId,
        s: &StagedCommit,
    ) -> Result<EpochCert, CommitRef> {
        let r = CommitRef { channel, epoch: s.epoch, hash: s.hash, submitter: by };
        self.log += 1;
        let order =
            OrderCommand::Order { commit: r, bytes: s.commit.clone().into(), welcome: None };
        let (verdict, _) = self.orderer.apply(self.log, order);
        let Verdict::Ordering(outcome) = verdict else { panic!("the relay refused: {verdict:?}") };
        match outcome {
            Outcome::Accepted(w) => {
                let body = EpochCertBody { channel, epoch: w.epoch, hash: w.hash };
                let cert =
                    EpochCert { body, signatures: vec![CertSignature::sign(&self.key, &body)] };
                self.commits.insert(w.hash, (s.commit.clone(), cert.clone()));
                Ok(cert)
            }
            Outcome::Conflict { winner } => Err(winner),
            other => panic!("unexpected outcome {other:?}"),
        }
    }
}

struct Device {
    name: &'static str,
    key: SecretKey,
    me: Identity,
    provider: OpenMlsRustCrypto,
    channel: Option<Channel>,
    inbox: VecDeque<ChannelMessage>,
    shown: Vec<(MessageId, Vec<u8>)>,
    duplicates: usize,
}

impl Device {
    fn new(name: &'static str, seed: u8) -> Self {
        let key = SecretKey::from_seed([seed; 32]);
        let me = Identity::new(&key);
        Self {
            name,
            key,
            me,
            provider: OpenMlsRustCrypto::default(),
            channel: None,
            inbox: VecDeque::new(),
            shown: Vec::new(),
            duplicates: 0,
        }
    }

    fn id(&self) -> DeviceId {
        self.me.device()
    }

    fn key_package(&self) -> crate::codec::Bytes {
        crate::codec::Bytes::from(self.me.key_package(&self.provider, false).expect("kp"))
    }
}

/// The world: devices, the relay, the directory of identity records, and a virtual clock.
struct World {
    now: Timestamp,
    relay: Relay,
    trust: TrustedRelays,
    dirs: BTreeMap<DeviceId, Dir>,
    devices: Vec<Device>,
    rng: ChaCha20Rng,
}

const ALICE: usize = 0;
const BOB: usize = 1;
const CAROL: usize = 2;
const ALICE2: usize = 3;
const MALLORY: usize = 4;

impl World {
    fn new() -> Self {
        let relay = Relay::new();
        let trust = TrustedRelays { relays: vec![relay.id.clone()], ..Default::default() };
        let mut w = Self {
            now: Timestamp(1_700_000_000_000),
            relay,
            trust,
            dirs: BTreeMap::new(),
            devices: vec![
                Device::new("alice", 1),
                Device::new("bob", 2),
                Device::new("carol", 3),
                Device::new("alice2", 4),
                Device::new("mallory", 5),
            ],
            rng: ChaCha20Rng::seed_from_u64(7),
        };
        let alice = w.devices[ALICE].id();
        let alice2 = w.devices[ALICE2].id();
        for (i, name) in [(ALICE, "alice"), (BOB, "bob"), (CAROL, "carol"), (ALICE2, "alice")] {
            let linked = match i {
                ALICE => [alice2].into(),
                ALICE2 => [alice].into(),
                _ => Default::default(),
            };
            w.publish_dir(i, Some(name), linked);
        }
        // Mallory has a record but no sponsorship.
        w.publish_dir(MALLORY, None, Default::default());
        w
    }

    fn publish_dir(
        &mut self,
        i: usize,
        name: Option<&str>,
        linked: std::collections::BTreeSet<DeviceId>,
    ) {
        let d = &self.devices[i];
        let sponsorships = name
            .map(|n| {
                Sponsorship::issue(
                    &self.relay.key,
                    SponsorshipBody {
                        device: d.id(),
                        local_name: n.into(),
                        relay: self.relay.id.clone(),
                        issued: self.now,
                        expires: self.now.plus_ms(30 * DAY_MS),
                    },
                )
            })
            .into_iter()
            .collect();
        let body = DirBody {
            device: d.id(),
            seq: 1,
            inbox_key: [i as u8; 32],
            linked,
            sponsorships,
            profile: Profile { display_name: d.name.into(), avatar: None },
            revoked: false,
            issued: self.now,
        };
        self.dirs.insert(d.id(), Dir::sign(&d.key, body));
    }

    fn tick(&mut self) {
        self.now = self.now.plus_ms(10);
    }

    fn channel_id(&self) -> ChannelId {
        self.devices[ALICE].channel.as_ref().expect("alice in channel").id()
    }

    /// A world where Alice created the channel and added `others` in one commit, which
    /// everyone processed.
    fn started(others: &[usize]) -> Self {
        let mut w = Self::new();
        w.create();
        let add = others.iter().map(|i| w.devices[*i].key_package()).collect();
        let staged = w.stage(ALICE, &Change { add, ..Default::default() }).expect("stage");
        w.submit(ALICE, &staged).expect("accepted");
        w.deliver_all();
        w
    }

    /// `who` lost its epoch: it drops its staged commit and applies the winner.
    fn apply_winner(&mut self, who: usize, winner: &CommitRef) -> Vec<ChannelEvent> {
        let (commit, cert) = self.relay.commits[&winner.hash].clone();
        let d = &mut self.devices[who];
        d.channel.as_mut().expect("member").discard_own(&d.provider).expect("discard");
        self.process(who, ChannelMessage::Commit { commit, cert }).expect("winner applies")
    }

    fn create(&mut self) {
        let config = ChannelConfig {
            mime: crate::chat::MIME.into(),
            name: "general".into(),
            relays: vec![self.relay.id.clone()],
            admins: AdminPolicy::AnyMember,
            creator: self.devices[ALICE].id(),
        };
        let a = &mut self.devices[ALICE];
        let channel =
            Channel::create(&a.provider, &a.me, ChannelId([42; 32]), config).expect("create");
        self.relay.open(&channel, &a.provider, &a.me);
        a.channel = Some(channel);
    }

    /// Stages `change` at `who`, without submitting.
    fn stage(&mut self, who: usize, change: &Change) -> Result<StagedCommit, ChannelError> {
        let check = KnownDirs { dirs: &self.dirs, trust: &self.trust, now: self.now };
        let d = &mut self.devices[who];
        let (provider, me) = (&d.provider, &d.me);
        d.channel.as_mut().expect("member").stage(provider, me, change, &check)
    }

    /// Stages `change` at `who` without checking the credentials it brings in, as a careless
    /// or hostile committer would.
    fn stage_unchecked(&mut self, who: usize, change: &Change) -> StagedCommit {
        let d = &mut self.devices[who];
        let (provider, me) = (&d.provider, &d.me);
        d.channel.as_mut().expect("member").stage(provider, me, change, &AcceptAll).expect("stage")
    }

    /// Submits a staged commit. On acceptance: merge, fan the commit out to the other members,
    /// deliver Welcomes to the added devices. On conflict: return the winner.
    fn submit(&mut self, who: usize, staged: &StagedCommit) -> Result<(), CommitRef> {
        let channel = self.channel_id();
        let by = self.devices[who].id();
        let cert = self.relay.submit(channel, by, staged)?;
        let d = &mut self.devices[who];
        let events =
            d.channel.as_mut().expect("member").accept_own(&d.provider, &cert).expect("merge own");
        match &events[0] {
            ChannelEvent::CommitApplied { added, removed, self_removed: false, .. } => {
                assert_eq!((added, removed), (&staged.added, &staged.removed));
            }
            other => panic!("expected the commit applied, got {other:?}"),
        }
        let msg = ChannelMessage::Commit { commit: staged.commit.clone(), cert };
        self.fanout(who, &msg, &staged.removed);
        // The Welcome is delivered only now that the commit is ordered.
        if let Some(welcome) = &staged.welcome {
            for new in &staged.added {
                let i = self.index_of(*new);
                let check = KnownDirs { dirs: &self.dirs, trust: &self.trust, now: self.now };
                let d = &mut self.devices[i];
                d.channel = Some(Channel::join(&d.provider, welcome, &check).expect("join"));
            }
        }
        Ok(())
    }

    /// Puts a message in the inbox of every member but the sender (removed devices included, so
    /// they learn of their removal).
    fn fanout(&mut self, from: usize, msg: &ChannelMessage, also: &[DeviceId]) {
        for (i, d) in self.devices.iter_mut().enumerate() {
            let member =
                d.channel.as_ref().is_some_and(Channel::is_active) || also.contains(&d.id());
            if i != from && member {
                d.inbox.push_back(msg.clone());
            }
        }
    }

    fn index_of(&self, device: DeviceId) -> usize {
        self.devices.iter().position(|d| d.id() == device).expect("known device")
    }

    fn send(&mut self, who: usize, text: &str) -> MessageId {
        self.tick();
        let now = self.now;
        let d = &mut self.devices[who];
        let (provider, me) = (&d.provider, &d.me);
        let (id, msg) = d
            .channel
            .as_mut()
            .expect("member")
            .send(provider, me, now, text.as_bytes())
            .expect("send");
        d.shown.push((id, text.as_bytes().to_vec()));
        self.fanout(who, &msg, &[]);
        id
    }

    /// Delivers every queued message, in a shuffled order per inbox.
    fn deliver_all(&mut self) -> Vec<(usize, ChannelEvent)> {
        let mut log = Vec::new();
        for i in 0..self.devices.len() {
            let mut queue: Vec<ChannelMessage> = self.devices[i].inbox.drain(..).collect();
            for k in (1..queue.len()).rev() {
                let j = (self.rng.next_u64() % (k as u64 + 1)) as usize;
                queue.swap(k, j);
            }
            for msg in queue {
                for e in self.process(i, msg).expect("process") {
                    log.push((i, e));
                }
            }
        }
        log
    }

    fn process(
        &mut self,
        i: usize,
        msg: ChannelMessage,
    ) -> Result<Vec<ChannelEvent>, ChannelError> {
        let check = KnownDirs { dirs: &self.dirs, trust: &self.trust, now: self.now };
        let now = self.now;
        let d = &mut self.devices[i];
        let Some(channel) = d.channel.as_mut() else {
            return Ok(vec![]);
        };
        let events = channel.process(&d.provider, now, msg, &check)?;
        for e in &events {
            match e {
                ChannelEvent::Message { id, payload, .. } => d.shown.push((*id, payload.clone())),
                ChannelEvent::Duplicate(_) => d.duplicates += 1,
                _ => {}
            }
        }
        Ok(events)
    }

    fn check(&self) -> KnownDirs<'_, TrustedRelays> {
        KnownDirs { dirs: &self.dirs, trust: &self.trust, now: self.now }
    }

    fn epoch_authenticators(&self, who: &[usize]) -> Vec<Vec<u8>> {
        who.iter()
            .map(|i| self.devices[*i].channel.as_ref().expect("member").epoch_authenticator())
            .collect()
    }

    fn epochs(&self, who: &[usize]) -> Vec<u64> {
        who.iter().map(|i| self.devices[*i].channel.as_ref().expect("member").epoch()).collect()
    }
}

fn all_equal<T: PartialEq + std::fmt::Debug>(v: &[T]) {
    assert!(v.windows(2).all(|w| w[0] == w[1]), "not all equal: {v:?}");
}

/// Runs one intent to completion: stage, submit, and on conflict process the winner and
/// rebuild on the new epoch. Returns the number of attempts.
fn drive_intent(w: &mut World, who: usize, intent: &mut Intent<Change>) -> u32 {
    while !intent.is_done() {
        assert!(intent.is_due(w.now) || matches!(intent.state, IntentState::ToPublish { .. }));
        if let IntentState::ToPublish { not_before } = intent.state {
            w.now = w.now.max(not_before);
        }
        let staged = w.stage(who, &intent.change).expect("stage");
        intent.published(staged.epoch, staged.hash);
        match w.submit(who, &staged) {
            Ok(()) => {
                let mine = CommitRef {
                    channel: w.channel_id(),
                    epoch: staged.epoch,
                    hash: staged.hash,
                    submitter: w.devices[who].id(),
                };
                assert!(intent.accepted(&mine));
            }
            Err(winner) => {
                // Lost: drop the staged commit, apply the winner, then rebuild.
                let events = w.apply_winner(who, &winner);
                assert!(matches!(events[0], ChannelEvent::CommitApplied { .. }), "{events:?}");
                let jitter = w.rng.next_u64();
                intent.lost(w.now, jitter);
            }
        }
    }
    intent.attempts
}

#[test]
fn alice_bob_carol_and_alice2_converge() {
    let mut w = World::new();
    w.create();

    // Alice adds Bob and her second device in one commit.
    let change = Change {
        add: vec![w.devices[BOB].key_package(), w.devices[ALICE2].key_package()],
        ..Default::default()
    };
    let staged = w.stage(ALICE, &change).expect("stage");
    assert_eq!(
        w.devices[ALICE].channel.as_ref().map(Channel::epoch),
        Some(0),
        "staging changes nothing"
    );
    assert!(staged.welcome.is_some());
    w.submit(ALICE, &staged).expect("first commit wins");
    w.deliver_all();
    all_equal(&w.epochs(&[ALICE, BOB, ALICE2]));
    all_equal(&w.epoch_authenticators(&[ALICE, BOB, ALICE2]));
    assert_eq!(
        w.devices[BOB].channel.as_ref().map(|c| c.config().name.clone()),
        Some("general".into())
    );

    // Messages: everyone sees everyone's, once.
    let m1 = w.send(ALICE, "hi all");
    w.send(BOB, "hi alice");
    w.send(ALICE2, "alice here, from my laptop");
    w.deliver_all();
    for i in [ALICE, BOB, ALICE2] {
        assert_eq!(w.devices[i].shown.len(), 3, "{} sees all three", w.devices[i].name);
    }
    // A replayed message is reported as a duplicate, not shown again.
    let replay = {
        let d = &mut w.devices[ALICE];
        let (provider, me) = (&d.provider, &d.me);
        d.channel.as_mut().expect("member").send(provider, me, w.now, b"once").expect("send").1
    };
    for _ in 0..3 {
        w.devices[BOB].inbox.push_back(replay.clone());
    }
    w.deliver_all();
    let bob = &w.devices[BOB];
    assert_eq!(bob.shown.iter().filter(|(_, p)| p == b"once").count(), 1);
    assert_eq!(bob.duplicates, 2);
    assert!(bob.shown.iter().any(|(id, _)| *id == m1));

    // Concurrent commits: Bob adds Carol while Alice2 refreshes her key, on the same epoch.
    let add_carol = Change { add: vec![w.devices[CAROL].key_package()], ..Default::default() };
    let update = Change { update: true, ..Default::default() };
    let staged_bob = w.stage(BOB, &add_carol).expect("stage");
    let staged_a2 = w.stage(ALICE2, &update).expect("stage");
    assert_eq!(staged_bob.epoch, staged_a2.epoch);
    w.submit(ALICE2, &staged_a2).expect("alice2 is first");
    let winner = w.submit(BOB, &staged_bob).expect_err("bob loses epoch 1");
    assert_eq!(winner.hash, staged_a2.hash, "the rejection names the winner");
    // Bob rebuilds his change on the new epoch through an intent.
    let (commit, cert) = w.relay.commits[&winner.hash].clone();
    {
        let d = &mut w.devices[BOB];
        d.channel.as_mut().expect("member").discard_own(&d.provider).expect("discard");
    }
    w.devices[BOB].inbox.push_front(ChannelMessage::Commit { commit, cert });
    let events = w.deliver_all();
    assert!(
        events.iter().any(|(i, e)| *i == BOB && matches!(e, ChannelEvent::CommitApplied { .. }))
    );
    // The winner's echo reaching Bob again is stale, not an error.
    let mut intent = Intent::new(add_carol, w.now);
    assert_eq!(drive_intent(&mut w, BOB, &mut intent), 1);
    w.deliver_all();
    let members = [ALICE, BOB, CAROL, ALICE2];
    all_equal(&w.epochs(&members));
    all_equal(&w.epoch_authenticators(&members));
    assert_eq!(w.devices[CAROL].channel.as_ref().map(|c| c.members().len()), Some(4));

    // Carol's first message reaches everyone.
    w.send(CAROL, "thanks for having me");
    w.deliver_all();
    for i in members {
        assert!(w.devices[i].shown.iter().any(|(_, p)| p == b"thanks for having me"));
    }

    // Alice removes Bob. Bob learns he was removed and can no longer send.
    let remove = Change { remove: vec![w.devices[BOB].id()], ..Default::default() };
    let staged = w.stage(ALICE, &remove).expect("stage");
    w.submit(ALICE, &staged).expect("accepted");
    let events = w.deliver_all();
    assert!(
        events.iter().any(|(i, e)| *i == BOB
            && matches!(e, ChannelEvent::CommitApplied { self_removed: true, .. }))
    );
    assert!(!w.devices[BOB].channel.as_ref().expect("kept").is_active());
    let bob_id = w.devices[BOB].id();
    let carol_saw = events.iter().find_map(|(i, e)| match e {
        ChannelEvent::CommitApplied { added, removed, .. } if *i == CAROL => Some((added, removed)),
        _ => None,
    });
    assert_eq!(carol_saw, Some((&vec![], &vec![bob_id])), "Carol sees exactly Bob removed");
    let d = &mut w.devices[BOB];
    let (provider, me) = (&d.provider, &d.me);
    assert_eq!(
        d.channel.as_mut().expect("kept").send(provider, me, w.now, b"x").map(|_| ()),
        Err(ChannelError::Inactive)
    );

    // After the removal, Bob cannot read what follows.
    w.send(ALICE, "bob is gone");
    let remaining = [ALICE, CAROL, ALICE2];
    w.deliver_all();
    all_equal(&w.epochs(&remaining));
    all_equal(&w.epoch_authenticators(&remaining));
    assert!(!w.devices[BOB].shown.iter().any(|(_, p)| p == b"bob is gone"));
    for i in remaining {
        assert!(w.devices[i].shown.iter().any(|(_, p)| p == b"bob is gone"));
    }
}

#[test]
fn concurrent_commits_every_epoch_has_one_winner() {
    // Alice, Bob and Alice2 all commit key updates at once, five rounds; each round exactly one
    // wins, the others rebuild, and everybody ends on the same authenticator.
    let mut w = World::started(&[BOB, ALICE2]);
    let members = [ALICE, BOB, ALICE2];
    for round in 0..5 {
        let update = Change { update: true, ..Default::default() };
        let staged: Vec<StagedCommit> =
            members.iter().map(|i| w.stage(*i, &update).expect("stage")).collect();
        let mut winners = 0;
        let mut intents = Vec::new();
        for (k, i) in members.iter().enumerate() {
            match w.submit(*i, &staged[k]) {
                Ok(()) => winners += 1,
                Err(winner) => {
                    w.apply_winner(*i, &winner);
                    let mut intent = Intent::new(update.clone(), w.now);
                    intent.published(staged[k].epoch, staged[k].hash);
                    intent.lost(w.now, round);
                    intents.push((*i, intent));
                }
            }
        }
        assert_eq!(winners, 1, "round {round}: exactly one commit wins the epoch");
        // Drain echoes (now stale for those who already applied them).
        w.deliver_all();
        for (i, mut intent) in intents {
            drive_intent(&mut w, i, &mut intent);
            w.deliver_all();
        }
        all_equal(&w.epochs(&members));
        all_equal(&w.epoch_authenticators(&members));
    }
    assert_eq!(w.devices[ALICE].channel.as_ref().map(Channel::epoch), Some(1 + 5 * 3));
}

#[test]
fn future_epoch_messages_wait_for_their_commit() {
    let mut w = World::started(&[BOB, ALICE2]);
    // Alice commits and sends at the new epoch; Bob gets the message before the commit.
    let staged = w.stage(ALICE, &Change { update: true, ..Default::default() }).expect("stage");
    w.submit(ALICE, &staged).expect("accepted");
    let commit = w.devices[BOB].inbox.pop_back().expect("commit queued");
    w.send(ALICE, "from epoch 2");
    let msg = w.devices[BOB].inbox.pop_back().expect("message queued");
    let events = w.process(BOB, msg).expect("buffered");
    assert_eq!(events, vec![ChannelEvent::Buffered { epoch: 2 }]);
    let events = w.process(BOB, commit).expect("commit");
    assert!(matches!(events[0], ChannelEvent::CommitApplied { epoch: 2, .. }));
    // A message claiming an epoch far ahead is refused, not buffered.
    let sent = {
        let d = &mut w.devices[ALICE];
        let (provider, me) = (&d.provider, &d.me);
        d.channel.as_mut().expect("member").send(provider, me, w.now, b"x").expect("send").1
    };
    let ChannelMessage::Application { message } = sent else {
        panic!("not an application message")
    };
    // Rewrite the epoch field of the PrivateMessage (after version, wire format, group id).
    let mut far = message.clone();
    let epoch_at = 2 + 2 + 1 + 32; // version u16, wire format u16, group id length + 32 bytes
    far[epoch_at..epoch_at + 8].copy_from_slice(&1000u64.to_be_bytes());
    let err = w.process(BOB, ChannelMessage::Application { message: far }).expect_err("refused");
    assert_eq!(err, ChannelError::TooFarAhead { epoch: 1000, current: 2 });
    assert!(
        matches!(&events[1], ChannelEvent::Message { payload, .. } if payload == b"from epoch 2")
    );
}

#[test]
fn uncertified_and_unsponsored_are_rejected() {
    let mut w = World::new();
    w.create();
    // Mallory has no sponsorship: Alice refuses to add her.
    let change = Change { add: vec![w.devices[MALLORY].key_package()], ..Default::default() };
    assert!(matches!(w.stage(ALICE, &change), Err(ChannelError::Credential { .. })));
    // An unknown device too.
    let stranger = Device::new("stranger", 99);
    let change = Change { add: vec![stranger.key_package()], ..Default::default() };
    assert!(matches!(w.stage(ALICE, &change), Err(ChannelError::Credential { .. })));
    // Garbage is a typed error.
    let change =
        Change { add: vec![crate::codec::Bytes::from(vec![1, 2, 3])], ..Default::default() };
    assert!(matches!(w.stage(ALICE, &change), Err(ChannelError::Malformed(_))));

    let change = Change { add: vec![w.devices[BOB].key_package()], ..Default::default() };
    let staged = w.stage(ALICE, &change).expect("stage");
    w.submit(ALICE, &staged).expect("accepted");
    w.deliver_all();

    // A commit certified by someone who is not an orderer is not applied.
    let staged = w.stage(ALICE, &Change { update: true, ..Default::default() }).expect("stage");
    let body = EpochCertBody { channel: w.channel_id(), epoch: staged.epoch, hash: staged.hash };
    let forger = SecretKey::from_seed([66; 32]);
    let cert = EpochCert { body, signatures: vec![CertSignature::sign(&forger, &body)] };
    let err = w
        .process(BOB, ChannelMessage::Commit { commit: staged.commit.clone(), cert })
        .expect_err("rejected");
    assert!(matches!(err, ChannelError::Cert(CertError::NoQuorum { .. })));
    // A real certificate for another hash does not carry this commit.
    let other = EpochCertBody { hash: CommitHash([0; 32]), ..body };
    let cert =
        EpochCert { body: other, signatures: vec![CertSignature::sign(&w.relay.key, &other)] };
    let err = w
        .process(BOB, ChannelMessage::Commit { commit: staged.commit.clone(), cert })
        .expect_err("rejected");
    assert_eq!(err, ChannelError::Cert(CertError::Mismatch));
    assert_eq!(w.devices[BOB].channel.as_ref().map(Channel::epoch), Some(1), "nothing applied");
    // An application message sent as a commit, and garbage, are typed errors.
    let cert = EpochCert { body, signatures: vec![CertSignature::sign(&w.relay.key, &body)] };
    let err = w
        .process(BOB, ChannelMessage::Commit { commit: vec![0xff; 10], cert })
        .expect_err("rejected");
    assert!(matches!(err, ChannelError::Malformed(_)));
}

#[test]
fn admin_policy_limits_membership_changes() {
    let mut w = World::new();
    let alice = w.devices[ALICE].id();
    let config = ChannelConfig {
        mime: "application/octet-stream".into(),
        name: "announcements".into(),
        relays: vec![w.relay.id.clone()],
        admins: AdminPolicy::Admins([alice].into()),
        creator: alice,
    };
    let a = &mut w.devices[ALICE];
    let channel = Channel::create(&a.provider, &a.me, ChannelId([43; 32]), config).expect("create");
    w.relay.open(&channel, &a.provider, &a.me);
    a.channel = Some(channel);
    let change = Change { add: vec![w.devices[BOB].key_package()], ..Default::default() };
    let staged = w.stage(ALICE, &change).expect("stage");
    w.submit(ALICE, &staged).expect("accepted");
    w.deliver_all();
    let change = Change { add: vec![w.devices[CAROL].key_package()], ..Default::default() };
    assert_eq!(w.stage(BOB, &change).map(|_| ()), Err(ChannelError::NotAdmin));
    // Bob may still refresh his own key.
    let staged = w.stage(BOB, &Change { update: true, ..Default::default() }).expect("stage");
    w.submit(BOB, &staged).expect("accepted");
    w.deliver_all();
    all_equal(&w.epoch_authenticators(&[ALICE, BOB]));
}

#[test]
fn channel_reloads_from_storage() {
    let mut w = World::started(&[BOB]);
    w.send(ALICE, "before restart");
    w.deliver_all();
    // Bob "restarts": only the provider's storage and the channel state survive.
    let state = w.devices[BOB].channel.take().expect("member").state().clone();
    let encoded = crate::codec::encode(&state);
    let state: ChannelState = crate::codec::decode(&encoded, usize::MAX).expect("decode");
    let d = &mut w.devices[BOB];
    d.channel = Some(Channel::load(&d.provider, state).expect("load"));
    w.send(ALICE, "after restart");
    w.send(BOB, "bob is back");
    w.deliver_all();
    assert!(w.devices[BOB].shown.iter().any(|(_, p)| p == b"after restart"));
    assert!(w.devices[ALICE].shown.iter().any(|(_, p)| p == b"bob is back"));
    // Bob's sequence numbers continued, so his new message was not taken for a replay.
    all_equal(&w.epoch_authenticators(&[ALICE, BOB]));
}

#[test]
fn removed_and_reinvited_device_is_heard_again() {
    let mut w = World::started(&[BOB, CAROL]);
    let first = w.send(BOB, "first membership");
    w.deliver_all();
    let remove = Change { remove: vec![w.devices[BOB].id()], ..Default::default() };
    let staged = w.stage(ALICE, &remove).expect("stage");
    w.submit(ALICE, &staged).expect("accepted");
    w.deliver_all();
    // The relay judges gossip by the members of each epoch: Bob was one at epoch 1 but was
    // removed since (his epoch-1 envelope is not judged: not forwarded, not held against the
    // peer that brings it), is not one at epoch 2, and an epoch it never saw is not judged.
    let (id, bob) = (ChannelId([42; 32]), w.devices[BOB].id());
    assert_eq!(w.relay.orderer.is_member(&id, &bob, 1), None);
    assert_eq!(w.relay.orderer.is_member(&id, &w.devices[CAROL].id(), 1), Some(true));
    assert_eq!(w.relay.orderer.is_member(&id, &bob, 2), Some(false));
    assert_eq!(w.relay.orderer.is_member(&id, &w.devices[ALICE].id(), 2), Some(true));
    assert_eq!(w.relay.orderer.is_member(&id, &bob, 9), None);
    assert_eq!(w.relay.orderer.is_member(&ChannelId([7; 32]), &bob, 1), None);
    // Alice invites Bob again; his old, inactive group is replaced by the new one.
    let change = Change { add: vec![w.devices[BOB].key_package()], ..Default::default() };
    let staged = w.stage(ALICE, &change).expect("stage");
    w.submit(ALICE, &staged).expect("accepted");
    w.deliver_all();
    let second = w.send(BOB, "second membership");
    assert_ne!(first, second, "ids stay unique across memberships");
    w.deliver_all();
    for i in [ALICE, CAROL] {
        let shown: Vec<_> =
            w.devices[i].shown.iter().filter(|(id, _)| id.sender == w.devices[BOB].id()).collect();
        assert_eq!(shown.len(), 2, "{} hears Bob in both memberships", w.devices[i].name);
    }
    all_equal(&w.epoch_authenticators(&[ALICE, BOB, CAROL]));
    // The same Welcome again is refused (its KeyPackage is used up) and changes nothing.
    let d = &w.devices[BOB];
    let check = KnownDirs { dirs: &w.dirs, trust: &w.trust, now: w.now };
    let welcome = staged.welcome.expect("welcome");
    assert!(Channel::join(&d.provider, &welcome, &check).is_err());
    w.send(BOB, "still here");
    w.deliver_all();
    assert!(w.devices[ALICE].shown.iter().any(|(_, p)| p == b"still here"));
}

#[test]
fn members_refuse_a_certified_commit_adding_an_unsponsored_device() {
    let mut w = World::started(&[BOB]);
    // Alice skips the check and adds Mallory; the relay orders it (it cannot read credentials).
    let change = Change { add: vec![w.devices[MALLORY].key_package()], ..Default::default() };
    let staged = w.stage_unchecked(ALICE, &change);
    let cert = w.relay.submit(w.channel_id(), w.devices[ALICE].id(), &staged).expect("ordered");
    let err = w
        .process(BOB, ChannelMessage::Commit { commit: staged.commit, cert })
        .expect_err("Bob refuses");
    assert!(
        matches!(err, ChannelError::Credential { device: Some(d), .. } if d == w.devices[MALLORY].id()),
        "{err:?}"
    );
    assert_eq!(w.devices[BOB].channel.as_ref().map(Channel::epoch), Some(1), "nothing applied");
}

#[test]
fn key_packages_validate_for_relays() {
    let w = World::new();
    let d = &w.devices[BOB];
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let info = validate_key_package(&crypto, &d.key_package()).expect("valid");
    assert_eq!(info.device, d.id());
    assert!(!info.last_resort);
    assert!(info.not_after > w.now, "fresh packages are not expired");
    let last = d.me.key_package(&d.provider, true).expect("kp");
    assert!(validate_key_package(&crypto, &last).expect("valid").last_resort);
    // A flipped byte in the signed part breaks it.
    let mut bad = d.key_package().0;
    let n = bad.len();
    bad[n - 70] ^= 1;
    assert!(validate_key_package(&crypto, &bad).is_err());
    assert!(matches!(validate_key_package(&crypto, b"junk"), Err(ChannelError::Malformed(_))));
}

#[test]
fn relays_read_commit_framing_only() {
    let mut w = World::started(&[BOB]);
    let staged = w.stage(ALICE, &Change { update: true, ..Default::default() }).expect("stage");
    let framing = inspect_commit(&staged.commit).expect("a commit");
    assert_eq!(framing, Framing { channel: w.channel_id(), epoch: 1 });
    // An application message is not a commit; garbage is malformed.
    let d = &mut w.devices[ALICE];
    let (provider, me) = (&d.provider, &d.me);
    let (_, msg) =
        d.channel.as_mut().expect("member").send(provider, me, w.now, b"hi").expect("send");
    let ChannelMessage::Application { message } = msg else { panic!("not an application message") };
    assert_eq!(inspect_commit(&message), Err(ChannelError::WrongWireFormat));
    assert!(matches!(inspect_commit(b"junk"), Err(ChannelError::Malformed(_))));
}

#[test]
fn a_relay_checks_commits_as_members_will() {
    let mut w = World::new();
    w.create();
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let state = {
        let d = &w.devices[ALICE];
        d.channel.as_ref().expect("member").public_state(&d.provider, &d.me).expect("export")
    };
    let mut relay = PublicChannel::from_state(&crypto, &state).expect("follow");
    assert_eq!(
        (relay.id(), relay.epoch(), relay.members()),
        (w.channel_id(), 0, vec![w.devices[ALICE].id()])
    );

    // Alice adds Bob: the relay checks the commit, it is ordered, the relay applies it.
    let change = Change { add: vec![w.devices[BOB].key_package()], ..Default::default() };
    let staged = w.stage(ALICE, &change).expect("stage");
    let checked = relay.check(&crypto, &staged.commit, &w.check()).expect("valid");
    w.submit(ALICE, &staged).expect("ordered");
    relay.apply(checked).expect("apply");
    w.deliver_all();
    assert_eq!((relay.epoch(), relay.members().len()), (1, 2));

    // Two commits for epoch 1 are both valid until one is applied; then the other is stale.
    let update = Change { update: true, ..Default::default() };
    let a = w.stage(ALICE, &update).expect("stage");
    let b = w.stage(BOB, &update).expect("stage");
    let checked_a = relay.check(&crypto, &a.commit, &w.check()).expect("valid");
    relay.check(&crypto, &b.commit, &w.check()).expect("valid too, for now");
    w.submit(ALICE, &a).expect("ordered");
    relay.apply(checked_a).expect("apply");
    assert!(relay.check(&crypto, &b.commit, &w.check()).is_err(), "a commit of a past epoch");
    let winner = w.submit(BOB, &b).expect_err("Bob lost");
    w.apply_winner(BOB, &winner);
    w.deliver_all();

    // A commit whose signature was tampered with is refused. (From the end of a member's
    // PublicMessage: membership tag and confirmation tag, each a length byte and 32 bytes; the
    // signature's 64 bytes come before.)
    let c = w.stage(ALICE, &update).expect("stage");
    let mut forged = c.commit.clone();
    let n = forged.len();
    forged[n - 67] ^= 1;
    let err = relay.check(&crypto, &forged, &w.check()).expect_err("a forged signature");
    assert!(matches!(&err, ChannelError::Mls(m) if m.contains("signature")), "{err:?}");
    relay.check(&crypto, &c.commit, &w.check()).expect("the untampered commit is valid");
    {
        let d = &mut w.devices[ALICE];
        d.channel.as_mut().expect("member").discard_own(&d.provider).expect("discard");
    }

    // A commit adding an unsponsored device is refused, even if its committer did not check.
    let change = Change { add: vec![w.devices[MALLORY].key_package()], ..Default::default() };
    let bad = w.stage_unchecked(ALICE, &change);
    let err = relay.check(&crypto, &bad.commit, &w.check()).expect_err("refused");
    assert!(matches!(err, ChannelError::Credential { .. }), "{err:?}");
    // The public state survives a snapshot round trip.
    let restored = PublicChannel::import(relay.id(), relay.export()).expect("import");
    assert_eq!((restored.epoch(), restored.members()), (relay.epoch(), relay.members()));
    restored
        .check(&crypto, &c.commit, &w.check())
        .expect("the restored state checks as the original does");
    // Garbage and application messages are refused too.
    assert!(matches!(relay.check(&crypto, b"junk", &w.check()), Err(ChannelError::Malformed(_))));
}

#[test]
fn late_messages_within_the_tolerance_are_read() {
    let mut w = World::started(&[BOB]);
    // Alice sends 200 messages; Bob gets the newest first and the rest in reverse order, as
    // deliveries retried after a failure would bring them.
    for i in 0..200 {
        w.send(ALICE, &format!("m{i}"));
    }
    let queued: Vec<ChannelMessage> = w.devices[BOB].inbox.drain(..).collect();
    let mut read = 0;
    for m in queued.into_iter().rev() {
        let events = w.process(BOB, m).expect("a late message is still read");
        read += events.iter().filter(|e| matches!(e, ChannelEvent::Message { .. })).count();
    }
    assert_eq!(read, 200);
}

#[test]
fn a_removed_device_is_not_heard_from_its_old_epoch() {
    let mut w = World::started(&[BOB, CAROL]);
    // Bob's message, and Carol's, both of epoch 1, wait in Alice's inbox while Alice removes Bob.
    w.send(BOB, "before removal");
    w.send(CAROL, "late but a member");
    let held: Vec<ChannelMessage> = w.devices[ALICE].inbox.drain(..).collect();
    let remove = Change { remove: vec![w.devices[BOB].id()], ..Default::default() };
    let staged = w.stage(ALICE, &remove).expect("stage");
    w.submit(ALICE, &staged).expect("accepted");
    // Bob (a lost device that never fetches its removal) still writes at epoch 1.
    w.devices[BOB].inbox.clear();
    w.send(BOB, "after removal");
    let after: Vec<ChannelMessage> = w.devices[ALICE].inbox.drain(..).collect();
    let mut refused = 0;
    for m in held.into_iter().chain(after) {
        match w.process(ALICE, m) {
            Ok(_) => {}
            Err(ChannelError::FormerMember { epoch: 1, .. }) => refused += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    // Every message of the removed device is refused once its removal is merged; the member's
    // late message of the same epoch is read.
    let shown: Vec<&[u8]> = w.devices[ALICE].shown.iter().map(|(_, p)| p.as_slice()).collect();
    assert_eq!(refused, 2);
    assert!(shown.contains(&b"late but a member".as_slice()));
    assert!(
        !shown.contains(&b"after removal".as_slice())
            && !shown.contains(&b"before removal".as_slice())
    );
}

mod rules;

#[test]
fn the_orderer_keeps_within_its_state_budget() {
    let mut w = World::started(&[BOB]);
    let channel = w.channel_id();
    let cost = w.relay.orderer.state_bytes();
    // A 2-member channel: its public state and room for its winners.
    assert!((2_000..16_000).contains(&cost), "{cost}");
    // The relay restarts with a budget its state already fills.
    let (state, channels) = w.relay.orderer.export();
    w.relay.orderer =
        Orderer::restore(state, channels, Vec::new()).expect("restore").with_state_budget(cost);
    assert_eq!(w.relay.orderer.state_bytes(), cost);

    let order = |w: &mut World, who: usize, staged: &StagedCommit| {
        let commit = CommitRef {
            channel,
            epoch: staged.epoch,
            hash: staged.hash,
            submitter: w.devices[who].id(),
        };
        w.relay.log += 1;
        let bytes = staged.commit.clone().into();
        w.relay.orderer.apply(w.relay.log, OrderCommand::Order { commit, bytes, welcome: None }).0
    };
    // No new member while the budget is full, and nothing changed.
    let add = Change { add: vec![w.devices[CAROL].key_package()], ..Default::default() };
    let staged = w.stage(ALICE, &add).expect("stage");
    assert!(matches!(order(&mut w, ALICE, &staged), Verdict::OverBudget(_)));
    assert_eq!(w.relay.orderer.next_epoch(&channel), Some(staged.epoch));
    let a = &mut w.devices[ALICE];
    a.channel.as_mut().expect("member").discard_own(&a.provider).expect("discard");
    // No new channel either.
    let (provider, me) =
        (OpenMlsRustCrypto::default(), Identity::new(&SecretKey::from_seed([9; 32])));
    let config = ChannelConfig {
        mime: crate::chat::MIME.into(),
        name: "second".into(),
        relays: vec![w.relay.id.clone()],
        admins: AdminPolicy::AnyMember,
        creator: me.device(),
    };
    let other = Channel::create(&provider, &me, ChannelId([44; 32]), config).expect("create");
    let open = OrderCommand::Open {
        channel: other.id(),
        state: other.public_state(&provider, &me).expect("export"),
    };
    assert!(matches!(w.relay.orderer.apply(99, open.clone()), (Verdict::OverBudget(_), None)));
    // Commits that add nobody still go through: a member's own update, and a removal, which
    // makes room for the add.
    let staged = w.stage(BOB, &Change { update: true, ..Default::default() }).expect("stage");
    w.submit(BOB, &staged).expect("an update is ordered over the budget");
    w.deliver_all();
    let remove = Change { remove: vec![w.devices[BOB].id()], ..Default::default() };
    let staged = w.stage(ALICE, &remove).expect("stage");
    w.submit(ALICE, &staged).expect("a removal is ordered over the budget");
    w.deliver_all();
    assert!(w.relay.orderer.state_bytes() < cost);
    let add = Change { add: vec![w.devices[CAROL].key_package()], ..Default::default() };
    let staged = w.stage(ALICE, &add).expect("stage");
    w.submit(ALICE, &staged).expect("room for one member again");
    // The state is over the budget by at most that one commit's growth.
    let over = w.relay.orderer.state_bytes().saturating_sub(cost);
    assert!(over <= staged.commit.len() as u64, "{over} over, commit {}", staged.commit.len());
}

/// A message that arrives after more than [`MAX_PAST_EPOCHS`] commits past its own epoch can
/// never be read (its epoch's keys are gone): a typed `TooOld`, not an MLS error, so that the
/// node drops and counts it. One within the window is read.
#[test]
fn a_message_older_than_the_kept_epochs_is_too_old() {
    let mut w = World::started(&[BOB]);
    w.send(ALICE, "kept");
    let kept = w.devices[BOB].inbox.pop_back().expect("queued");
    w.send(ALICE, "too old");
    let old = w.devices[BOB].inbox.pop_back().expect("queued");
    let start = w.epochs(&[ALICE])[0];
    for _ in 0..=MAX_PAST_EPOCHS {
        let staged = w.stage(ALICE, &Change { update: true, ..Default::default() }).expect("stage");
        w.submit(ALICE, &staged).expect("accepted");
        let commits: Vec<ChannelMessage> = w.devices[BOB].inbox.drain(..).collect();
        for c in commits {
            w.process(BOB, c).expect("commit");
        }
        if w.epochs(&[BOB])[0] == start + MAX_PAST_EPOCHS as u64 {
            // Exactly MAX_PAST_EPOCHS later: still readable.
            let events = w.process(BOB, kept.clone()).expect("read");
            assert!(matches!(&events[..], [ChannelEvent::Message { .. }]), "{events:?}");
        }
    }
    let err = w.process(BOB, old).expect_err("too old");
    assert_eq!(
        err,
        ChannelError::TooOld { epoch: start, current: start + MAX_PAST_EPOCHS as u64 + 1 }
    );
}

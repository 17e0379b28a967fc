//! One channel, many members, concurrent commits.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use chitchat_proto::channel::{
    AdminPolicy, Change, Channel, ChannelConfig, ChannelError, ChannelEvent, ChannelMessage,
    Identity, KnownDirs, MessageId, StagedCommit,
};
use chitchat_proto::codec::Bytes;
use chitchat_proto::identity::{DirBody, Profile, SponsorshipBody, TrustedRelays};
use chitchat_proto::ordering::{
    CertSignature, ChannelId, CommitHash, CommitRef, EpochCert, EpochCertBody, Intent, IntentState,
    OrderCommand, Orderer, OrderingLimits, Outcome, Verdict,
};
use chitchat_proto::{DeviceId, Dir, RelayId, SecretKey, Sponsorship, Timestamp};
use openmls_rust_crypto::OpenMlsRustCrypto;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng as _, SeedableRng};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Params {
    /// Seed of the schedule.
    pub seed: u64,
    /// Devices in the channel at the start.
    pub members: usize,
    /// Devices outside it, to be added and removed.
    pub spares: usize,
    /// Rounds to run.
    pub rounds: usize,
    /// Members that commit concurrently in each round.
    pub committers: usize,
    /// Application messages per round.
    pub messages: usize,
    /// Probability (percent) that a delivery is replayed once more.
    pub replay_pct: u64,
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Epoch of the channel at the end.
    pub final_epoch: u64,
    /// Commits submitted to the orderer, retries included.
    pub submitted: u64,
    /// Submissions that won their epoch.
    pub accepted: u64,
    /// Submissions that lost to another commit.
    pub conflicts: u64,
    /// Changes dropped because the winner already made them.
    pub superseded: u64,
    /// Changes given up after the attempt limit.
    pub failed: u64,
    /// Most submissions one change needed.
    pub max_attempts: u32,
    /// Application messages sent.
    pub sent: u64,
    /// Messages shown to receivers (must be sent × receivers).
    pub shown: u64,
    /// Receivers expected to show them.
    pub expected_shown: u64,
    /// Messages that reached a device after it processed its own removal, so it could not read
    /// them (sent in an epoch it was still a member of).
    pub lost_to_removal: u64,
    /// Messages that reached a device after it processed their sender's removal: refused, a
    /// removed device is not heard from its old epoch (sent while it was a member).
    pub from_removed: u64,
    /// Messages that reached a device more than `MAX_PAST_EPOCHS` epochs after theirs (many
    /// concurrent commits while they were in flight), whose keys are gone: never readable.
    pub lost_too_old: u64,
    /// Replays detected and not shown.
    pub duplicates: u64,
    /// Messages held for a future epoch and released later.
    pub buffered: u64,
    /// Members added and removed.
    pub adds: u64,
    /// Members removed.
    pub removes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

struct Device {
    key: SecretKey,
    me: Identity,
    provider: OpenMlsRustCrypto,
    channel: Option<Channel>,
    inbox: Vec<ChannelMessage>,
    shown: BTreeMap<MessageId, usize>,
    /// Messages it could not read because it had been removed.
    lost: std::collections::BTreeSet<MessageId>,
}

struct World {
    p: Params,
    rng: ChaCha20Rng,
    now: Timestamp,
    relay_key: SecretKey,
    relay: RelayId,
    trust: TrustedRelays,
    dirs: BTreeMap<DeviceId, Dir>,
    /// The relay's replicated state machine, as the relay runs it (channel rules included).
    orderer: Orderer,
    /// Entries ordered so far (the orderer's log index).
    log: u64,
    accepted: BTreeMap<CommitHash, ChannelMessage>,
    /// Application messages sent, by their bytes.
    sent_ids: std::collections::HashMap<Vec<u8>, MessageId>,
    devices: Vec<Device>,
    report: Report,
}

const CHANNEL: ChannelId = ChannelId([7; 32]);

/// Runs a simulation and checks its invariants; `Err` says which broke (with the seed).
pub fn run(p: &Params) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut w = World::new(p.clone());
    w.setup().with_context(|| format!("setup, seed {}", p.seed))?;
    for round in 0..p.rounds {
        w.round().with_context(|| format!("round {round}, seed {}", p.seed))?;
    }
    w.report.final_epoch = w.members().first().map_or(0, |i| w.channel(*i).epoch());
    w.report.seconds = started.elapsed().as_secs_f64();
    Ok(w.report)
}

impl World {
    fn new(p: Params) -> Self {
        let relay_key = SecretKey::from_seed([250; 32]);
        let relay = RelayId { host: "relay.sim".into(), key: relay_key.public() };
        let trust = TrustedRelays { relays: vec![relay.clone()], ..Default::default() };
        let mut rng = ChaCha20Rng::seed_from_u64(p.seed);
        let devices = (0..p.members + p.spares)
            .map(|_| {
                let mut seed = [0u8; 32];
                rng.fill_bytes(&mut seed);
                let key = SecretKey::from_seed(seed);
                Device {
                    me: Identity::new(&key),
                    key,
                    provider: OpenMlsRustCrypto::default(),
                    channel: None,
                    inbox: Vec::new(),
                    shown: BTreeMap::new(),
                    lost: Default::default(),
                }
            })
            .collect();
        Self {
            p,
            rng,
            now: Timestamp(1_700_000_000_000),
            relay_key,
            relay,
            trust,
            dirs: BTreeMap::new(),
            orderer: Orderer::new(OrderingLimits::default()),
            log: 0,
            accepted: BTreeMap::new(),
            sent_ids: Default::default(),
            devices,
            report: Report::default(),
        }
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        for i in 0..self.devices.len() {
            let d = &self.devices[i];
            let device = d.me.device();
            let sponsorship = Sponsorship::issue(
                &self.relay_key,
                SponsorshipBody {
                    device,
                    local_name: format!("user{i}"),
                    relay: self.relay.clone(),
                    issued: self.now,
                    expires: self.now.plus_ms(1 << 40),
                },
            );
            let body = DirBody {
                device,
                seq: 1,
                inbox_key: [0; 32],
                linked: Default::default(),
                sponsorships: vec![sponsorship],
                profile: Profile { display_name: format!("user {i}"), avatar: None },
                revoked: false,
                issued: self.now,
            };
            self.dirs.insert(device, Dir::sign(&d.key, body));
        }
        let config = ChannelConfig {
            mime: "application/x-sim".into(),
            name: "sim".into(),
            relays: vec![self.relay.clone()],
            admins: AdminPolicy::AnyMember,
            creator: self.devices[0].me.device(),
        };
        let d = &mut self.devices[0];
        let channel = Channel::create(&d.provider, &d.me, CHANNEL, config)?;
        let state = channel.public_state(&d.provider, &d.me)?;
        d.channel = Some(channel);
        self.log += 1;
        let opened = self.orderer.apply(self.log, OrderCommand::Open { channel: CHANNEL, state });
        ensure!(opened.0 == Verdict::Ordering(Outcome::Opened), "the relay opens: {opened:?}");
        let add =
            (1..self.p.members).map(|i| self.key_package(i)).collect::<anyhow::Result<_>>()?;
        let mut intent = Intent::new(Change { add, ..Default::default() }, self.now);
        self.drive(0, &mut intent)?;
        self.deliver()
    }

    fn key_package(&self, i: usize) -> anyhow::Result<Bytes> {
        let d = &self.devices[i];
        Ok(Bytes(d.me.key_package(&d.provider, false)?))
    }

    fn members(&self) -> Vec<usize> {
        (0..self.devices.len())
            .filter(|i| self.devices[*i].channel.as_ref().is_some_and(Channel::is_active))
            .collect()
    }

    fn channel(&self, i: usize) -> &Channel {
        self.devices[i].channel.as_ref().expect("a member")
    }

    fn pick(&mut self, from: &[usize]) -> usize {
        from[(self.rng.next_u64() % from.len() as u64) as usize]
    }

    /// A random change for member `i`: mostly key updates, sometimes an add or a remove.
    fn random_change(&mut self, i: usize) -> anyhow::Result<Change> {
        let members = self.members();
        let spares: Vec<usize> = (0..self.devices.len()).filter(|d| !members.contains(d)).collect();
        let roll = self.rng.next_u64() % 10;
        if roll == 0 && !spares.is_empty() {
            let s = self.pick(&spares);
            return Ok(Change { add: vec![self.key_package(s)?], ..Default::default() });
        }
        let others: Vec<usize> = members.iter().copied().filter(|m| *m != i && *m != 0).collect();
        if roll == 1 && members.len() > 3 && !others.is_empty() {
            let victim = self.pick(&others);
            return Ok(Change {
                remove: vec![self.devices[victim].me.device()],
                ..Default::default()
            });
        }
        Ok(Change { update: true, ..Default::default() })
    }

    fn round(&mut self) -> anyhow::Result<()> {
        self.now = self.now.plus_ms(1000);
        // Concurrent commits: several members stage on the same epoch, then submit in a random
        // order. Exactly one wins; the others rebuild on the new epoch.
        let members = self.members();
        let mut committers = Vec::new();
        while committers.len() < self.p.committers.min(members.len()) {
            let c = self.pick(&members);
            if !committers.contains(&c) {
                committers.push(c);
            }
        }
        let mut intents = Vec::new();
        for &c in &committers {
            let change = self.random_change(c)?;
            intents.push((c, Intent::new(change, self.now)));
        }
        let epoch_before = self.channel(members[0]).epoch();
        let mut staged = Vec::new();
        for (c, intent) in &mut intents {
            match self.stage(*c, &intent.change) {
                Ok(s) => {
                    intent.published(s.epoch, s.hash);
                    staged.push((*c, s));
                }
                Err(ChannelError::AlreadyMember(_) | ChannelError::NotMember(_)) => {
                    intent.superseded()
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut winners = 0;
        for (c, s) in &staged {
            let intent = &mut intents.iter_mut().find(|(i, _)| i == c).expect("intent").1;
            if self.submit(*c, s, intent)? {
                winners += 1;
            }
        }
        ensure!(staged.is_empty() || winners == 1, "{winners} commits won epoch {epoch_before}");
        // Interleave messages with the deliveries, so some arrive before their epoch's commit.
        for _ in 0..self.p.messages {
            self.send_random()?;
        }
        for (c, mut intent) in intents {
            if !intent.is_done() && self.devices[c].channel.as_ref().is_some_and(Channel::is_active)
            {
                self.drive(c, &mut intent)?;
            }
            self.record(&intent);
        }
        self.deliver()?;
        self.check_converged()
    }

    fn record(&mut self, intent: &Intent<Change>) {
        self.report.max_attempts = self.report.max_attempts.max(intent.attempts);
        match intent.state {
            IntentState::Superseded => self.report.superseded += 1,
            IntentState::Failed => self.report.failed += 1,
            _ => {}
        }
    }

    fn stage(&mut self, i: usize, change: &Change) -> Result<StagedCommit, ChannelError> {
        let check = KnownDirs { dirs: &self.dirs, trust: &self.trust, now: self.now };
        let d = &mut self.devices[i];
        let (provider, me) = (&d.provider, &d.me);
        d.channel.as_mut().expect("a member").stage(provider, me, change, &check)
    }

    /// Submits a staged commit; returns whether it won. A loser applies the winner at once.
    fn submit(
        &mut self,
        i: usize,
        s: &StagedCommit,
        intent: &mut Intent<Change>,
    ) -> anyhow::Result<bool> {
        self.report.submitted += 1;
        let by = self.devices[i].me.device();
        let commit = CommitRef { channel: CHANNEL, epoch: s.epoch, hash: s.hash, submitter: by };
        self.log += 1;
        let bytes = Bytes(s.commit.clone());
        let (verdict, fanout) =
            self.orderer.apply(self.log, OrderCommand::Order { commit, bytes, welcome: None });
        let Verdict::Ordering(outcome) = verdict else {
            bail!("the relay refused a commit members would merge: {verdict:?}");
        };
        match outcome {
            Outcome::Accepted(w) => {
                self.report.accepted += 1;
                let body = EpochCertBody { channel: CHANNEL, epoch: w.epoch, hash: w.hash };
                let cert = EpochCert {
                    body,
                    signatures: vec![CertSignature::sign(&self.relay_key, &body)],
                };
                ensure!(intent.accepted(&w), "intent did not recognise its own commit");
                let d = &mut self.devices[i];
                d.channel.as_mut().expect("a member").accept_own(&d.provider, &cert)?;
                let msg = ChannelMessage::Commit { commit: s.commit.clone(), cert };
                self.accepted.insert(w.hash, msg.clone());
                // The fan-out the relay derives: the members of the epoch the commit ends (the
                // removed devices learn of it), the committer aside, who merged it already.
                let fanout = fanout.context("an accepted commit has a fan-out")?;
                let mut recipients = fanout.accepted.recipients;
                recipients.retain(|d| *d != by);
                let mut expected = self.peers(i);
                expected.retain(|d| !s.added.contains(d));
                expected.extend(&s.removed);
                expected.sort();
                ensure!(
                    recipients == expected,
                    "the relay fans out to {recipients:?}, not {expected:?}"
                );
                self.fanout(&msg, &recipients);
                if let Some(welcome) = &s.welcome {
                    self.welcome(welcome, &s.added)?;
                }
                Ok(true)
            }
            Outcome::Conflict { winner } => {
                self.report.conflicts += 1;
                let msg = self.accepted.get(&winner.hash).context("winner not stored")?.clone();
                let d = &mut self.devices[i];
                d.channel.as_mut().expect("a member").discard_own(&d.provider)?;
                self.process(i, msg)?;
                let jitter = self.rng.next_u64();
                intent.lost(self.now, jitter);
                Ok(false)
            }
            other => bail!("unexpected ordering outcome {other:?}"),
        }
    }

    /// Stage, submit, rebuild on conflict: until the change is committed, superseded or failed.
    fn drive(&mut self, i: usize, intent: &mut Intent<Change>) -> anyhow::Result<()> {
        while !intent.is_done() {
            if let IntentState::ToPublish { not_before } = intent.state {
                self.now = self.now.max(not_before);
            }
            // Catch up first: the rebuilt commit must be built on the newest epoch.
            self.deliver_to(i)?;
            if !self.devices[i].channel.as_ref().is_some_and(Channel::is_active) {
                intent.superseded(); // removed meanwhile: the change no longer matters
                break;
            }
            let change = intent.change.clone();
            match self.stage(i, &change) {
                Ok(s) => {
                    intent.published(s.epoch, s.hash);
                    self.submit(i, &s, intent)?;
                }
                Err(ChannelError::AlreadyMember(_) | ChannelError::NotMember(_)) => {
                    intent.superseded()
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn welcome(&mut self, welcome: &[u8], added: &[DeviceId]) -> anyhow::Result<()> {
        for device in added {
            let i =
                self.devices.iter().position(|d| d.me.device() == *device).context("unknown")?;
            let check = KnownDirs { dirs: &self.dirs, trust: &self.trust, now: self.now };
            let d = &mut self.devices[i];
            d.channel = Some(Channel::join(&d.provider, welcome, &check)?);
            d.inbox.clear();
            self.report.adds += 1;
        }
        Ok(())
    }

    /// Queues `msg` for `recipients`, sometimes twice (a replay).
    fn fanout(&mut self, msg: &ChannelMessage, recipients: &[DeviceId]) {
        for i in 0..self.devices.len() {
            if !recipients.contains(&self.devices[i].me.device()) {
                continue;
            }
            let replay = self.rng.next_u64() % 100 < self.p.replay_pct;
            let d = &mut self.devices[i];
            d.inbox.push(msg.clone());
            if replay {
                d.inbox.push(msg.clone());
            }
        }
    }

    /// The members of device `i`'s current epoch, other than itself.
    fn peers(&self, i: usize) -> Vec<DeviceId> {
        let me = self.devices[i].me.device();
        self.channel(i).members().into_iter().filter(|d| *d != me).collect()
    }

    fn send_random(&mut self) -> anyhow::Result<()> {
        let members = self.members();
        let i = self.pick(&members);
        // A node processes what it has received before it sends.
        self.deliver_to(i)?;
        if !self.devices[i].channel.as_ref().is_some_and(Channel::is_active) {
            return Ok(()); // it learned of its removal: nothing to send
        }
        self.now = self.now.plus_ms(1);
        let now = self.now;
        let d = &mut self.devices[i];
        let (provider, me) = (&d.provider, &d.me);
        let (id, msg) = d.channel.as_mut().expect("a member").send(provider, me, now, b"sim")?;
        if let ChannelMessage::Application { message } = &msg {
            self.sent_ids.insert(message.clone(), id);
        }
        // Sent to the members of the sender's epoch: the membership MLS encrypted it for.
        let recipients = self.peers(i);
        self.report.sent += 1;
        self.report.expected_shown += recipients.len() as u64;
        self.fanout(&msg, &recipients);
        Ok(())
    }

    fn process(&mut self, i: usize, msg: ChannelMessage) -> anyhow::Result<()> {
        let check = KnownDirs { dirs: &self.dirs, trust: &self.trust, now: self.now };
        let now = self.now;
        let d = &mut self.devices[i];
        let Some(channel) = d.channel.as_mut() else { return Ok(()) };
        if !channel.is_active() {
            // Removed before this arrived: a removed device keeps no keys to read it with.
            if let ChannelMessage::Application { message } = &msg {
                let id = self.sent_ids.get(message).context("unknown message")?;
                if !d.shown.contains_key(id) && d.lost.insert(*id) {
                    self.report.lost_to_removal += 1;
                }
            }
            return Ok(());
        }
        let id = match &msg {
            ChannelMessage::Application { message } => self.sent_ids.get(message).copied(),
            ChannelMessage::Commit { .. } => None,
        };
        let events = match channel.process(&d.provider, now, msg, &check) {
            Err(ChannelError::TooOld { .. }) => {
                let id = id.context("unknown message")?;
                if !d.shown.contains_key(&id) && d.lost.insert(id) {
                    self.report.lost_too_old += 1;
                }
                return Ok(());
            }
            Err(ChannelError::FormerMember { .. }) => {
                let id = id.context("unknown message")?;
                if !d.shown.contains_key(&id) && d.lost.insert(id) {
                    self.report.from_removed += 1;
                }
                return Ok(());
            }
            other => other?,
        };
        for e in events {
            match e {
                ChannelEvent::Message { id, .. } => {
                    *d.shown.entry(id).or_default() += 1;
                    self.report.shown += 1;
                }
                ChannelEvent::Duplicate(_) => self.report.duplicates += 1,
                ChannelEvent::Buffered { .. } => self.report.buffered += 1,
                ChannelEvent::CommitApplied { removed, self_removed, .. } => {
                    if self_removed {
                        self.report.removes += 1;
                    }
                    let _ = removed;
                }
                ChannelEvent::StaleCommit { .. } => {}
            }
        }
        Ok(())
    }

    /// Delivers device `i`'s inbox in a random order.
    fn deliver_to(&mut self, i: usize) -> anyhow::Result<()> {
        let mut queue = std::mem::take(&mut self.devices[i].inbox);
        for k in (1..queue.len()).rev() {
            let j = (self.rng.next_u64() % (k as u64 + 1)) as usize;
            queue.swap(k, j);
        }
        for msg in queue {
            self.process(i, msg)?;
        }
        Ok(())
    }

    fn deliver(&mut self) -> anyhow::Result<()> {
        for i in 0..self.devices.len() {
            self.deliver_to(i)?;
        }
        Ok(())
    }

    fn check_converged(&self) -> anyhow::Result<()> {
        let members = self.members();
        let first = self.channel(members[0]);
        for &i in &members {
            let c = self.channel(i);
            ensure!(
                c.epoch() == first.epoch(),
                "member {i} at epoch {} not {}",
                c.epoch(),
                first.epoch()
            );
            ensure!(c.epoch_authenticator() == first.epoch_authenticator(), "member {i} forked");
            ensure!(c.members().len() == members.len(), "member {i} sees another membership");
        }
        for d in &self.devices {
            if let Some((id, n)) = d.shown.iter().find(|(_, n)| **n > 1) {
                bail!("message {id:?} shown {n} times");
            }
        }
        Ok(())
    }
}

//! Many relays, many channels: the orderer replicated by Raft groups on a virtual clock, with
//! latency, loss, partitions and crashes.
//!
//! Every relay runs, for each relay set it belongs to, a replica of that group's state machine:
//! `proto`'s [`Orderer`] (real MLS validation of every commit, the channel rules, the winners
//! waiting for a certificate, [`OrderCommand::Deliver`]), fed by a Raft log. Around it the
//! relay protocol as the relay crate runs it: a device submits to its own relay, which proposes
//! to the group's leader; the submitting relay collects a majority's signatures (each relay
//! signs only what its own applied log says won), proposes the certificate (`Deliver`), and
//! only then answers the device; every relay fans a delivered winner out to its own devices
//! from a durable inbox; the leader sweeps winners left waiting (their submitting relay died).
//! Members are real MLS devices (`proto`'s [`Channel`]) that stage, submit, retry, rebuild on
//! conflict and apply only certified commits. Channels move between relay sets: adding a
//! member of another relay grows the set, removing a relay's last member shrinks it; the
//! group of the new set opens the channel when a member next submits (its state checked as the
//! relay checks it), and Welcomes for devices of relays new to the set are queued onward to
//! them.
//!
//! **Raft is modelled here, not run.** The relay runs openraft, whose election timers draw from
//! a thread-local random generator and whose core `select!`s poll in random order, so it cannot
//! replay a schedule from a seed. The model keeps what the ordering relies on: terms, votes with
//! the up-to-date-log rule, log matching with truncation of uncommitted entries, commitment only
//! of the leader's own term by a majority, durable term, vote and log, volatile commit and
//! applied indices (a restarted relay re-applies its log; its fan-out watermark skips what was
//! fanned out before).
//!
//! Checks, stopping the run with its seed at the first violation: one winner per (channel,
//! epoch) across every replica of every group; one certified hash per (channel, epoch); one
//! applied commit per (channel, epoch) across all members; no relay refuses an honest member's
//! valid commit. After the faults heal: every change was committed, superseded or given up; every
//! commit a member was told was certified is the one all members applied; all members of a
//! channel are at the same epoch with the same `epoch_authenticator`, the same membership, and
//! the relays' state agrees with them.
//!
//! Deterministic: one seed gives one schedule and one trace (the events in order, without the
//! MLS bytes, which come from openmls' own randomness), summarized by [`Report::trace`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use chitchat_proto::channel::{
    AdminPolicy, Change, Channel, ChannelConfig, ChannelError, ChannelEvent, ChannelMessage,
    Identity, KnownDirs, PublicChannel, PublicState, StagedCommit,
};
use chitchat_proto::codec::Bytes;
use chitchat_proto::federation::{HeldCopy, StateCheck, Vouched};
use chitchat_proto::identity::{DirBody, Profile, SponsorshipBody, TrustedRelays};
use chitchat_proto::ordering::{
    CertSignature, ChannelId, CommitHash, CommitRef, Delivery, EpochCert, EpochCertBody, Intent,
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
    /// Relays.
    pub relays: usize,
    /// Channels; each gets a relay set of one to three relays, drawn from the seed.
    pub channels: usize,
    /// Members of each channel after its first commit (spread over its relays).
    pub members: usize,
    /// Devices per channel outside it, added and removed as churn.
    pub spares: usize,
    /// Virtual milliseconds with faults and changes.
    pub fault_ms: u64,
    /// Virtual milliseconds after the faults heal for everything to settle.
    pub settle_ms: u64,
    /// Mean virtual milliseconds between two changes a member starts.
    pub change_every_ms: u64,
    /// Percent of messages between relays lost while faults last.
    pub loss_pct: u64,
    /// Mean virtual milliseconds between two relay crashes (0: none).
    pub crash_every_ms: u64,
    /// Mean virtual milliseconds between two partitions (0: none).
    pub partition_every_ms: u64,
    /// One-way latency between relays and between a device and its relay: uniform in this
    /// range, in virtual milliseconds.
    pub latency_ms: (u64, u64),
}

impl Default for Params {
    fn default() -> Self {
        Self {
            seed: 1,
            relays: 5,
            channels: 6,
            members: 4,
            spares: 2,
            fault_ms: 30_000,
            settle_ms: 30_000,
            change_every_ms: 3_000,
            loss_pct: 5,
            crash_every_ms: 4_000,
            partition_every_ms: 6_000,
            latency_ms: (1, 15),
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Ordering groups (distinct relay sets).
    pub groups: usize,
    /// Commits that won an epoch (sum over channels of their final epochs).
    pub epochs: u64,
    /// Submissions from members, resubmissions included.
    pub submitted: u64,
    /// Commits a member was told were certified.
    pub acknowledged: u64,
    /// Submissions that lost to another commit.
    pub conflicts: u64,
    /// Submissions answered "unavailable" or never answered (retried).
    pub unavailable: u64,
    /// Changes given up after the attempt limit.
    pub failed: u64,
    /// Changes made unnecessary by another commit.
    pub superseded: u64,
    /// Raft leaders elected.
    pub elections: u64,
    /// Channels opened in the group of a new relay set (after an add of a user of another
    /// relay, or the removal of a relay's last user).
    pub moves: u64,
    /// Relay crashes.
    pub crashes: u64,
    /// Partitions.
    pub partitions: u64,
    /// Messages between relays sent, and lost.
    pub relay_messages: u64,
    /// Messages between relays lost (loss, partitions, crashed relays).
    pub dropped: u64,
    /// Winners certified and delivered by a leader's sweep (their submitting relay died).
    pub swept: u64,
    /// Virtual time at the end, in milliseconds.
    pub virtual_ms: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// BLAKE3 of the trace: equal for equal seeds.
    pub trace: [u8; 32],
    /// Events in the trace.
    pub events: u64,
}

/// How long a relay waits for its log to reach a winner it is asked to sign (as the relay).
const SIGN_WAIT_MS: u64 = 3_000;
/// How often a group's leader looks for winners waiting for a certificate (as the relay).
const SWEEP_EVERY_MS: u64 = 5_000;
/// How long a submitting relay works on one request before it answers "unavailable".
const REQUEST_MS: u64 = 4_000;
/// How long a device waits for an answer before it resubmits.
const ANSWER_MS: u64 = 5_000;
const HEARTBEAT_MS: u64 = 50;
const ELECTION_MS: (u64, u64) = (300, 600);
const TICK_MS: u64 = 10;
/// Commits a device keeps for a channel it is not in yet (the node's `MAX_AWAITING_JOIN`).
const EARLY_MAX: usize = 1024;
/// Entries in one append.
const MAX_APPEND: usize = 32;

/// A Raft log entry: a command of the orderer, or the blank entry a new leader appends.
#[derive(Clone, Debug)]
struct Entry {
    term: u64,
    command: Option<OrderCommand>,
}

#[derive(Clone, Debug)]
enum Rpc {
    Vote { term: u64, last_index: u64, last_term: u64 },
    Voted { term: u64, granted: bool },
    Append { term: u64, prev_index: u64, prev_term: u64, entries: Vec<Entry>, commit: u64 },
    Appended { term: u64, success: bool, matched: u64 },
}

/// What relays say to each other.
#[derive(Clone, Debug)]
enum RelayMsg {
    Raft {
        group: usize,
        rpc: Rpc,
    },
    /// To the leader: order this command; answer `Proposed` with `req`.
    Propose {
        group: usize,
        command: OrderCommand,
        req: u64,
    },
    /// The verdict and log index, or `None` if the proposal was not ordered.
    Proposed {
        req: u64,
        result: Option<(Verdict, u64)>,
    },
    Sign {
        group: usize,
        body: EpochCertBody,
        index: u64,
        req: u64,
    },
    Signed {
        req: u64,
        signature: Option<CertSignature>,
    },
}

impl RelayMsg {
    /// What the trace says of it: its kind and numbers, no bytes.
    fn kind(&self) -> String {
        match self {
            Self::Raft { group, rpc } => match rpc {
                Rpc::Vote { term, last_index, .. } => {
                    format!("g{group} vote t{term} i{last_index}")
                }
                Rpc::Voted { term, granted } => format!("g{group} voted t{term} {granted}"),
                Rpc::Append { term, prev_index, entries, commit, .. } => {
                    format!("g{group} append t{term} p{prev_index} n{} c{commit}", entries.len())
                }
                Rpc::Appended { term, success, matched } => {
                    format!("g{group} appended t{term} {success} m{matched}")
                }
            },
            Self::Propose { group, req, .. } => format!("g{group} propose q{req}"),
            Self::Proposed { req, result } => format!("proposed q{req} {}", result.is_some()),
            Self::Sign { group, index, req, .. } => format!("g{group} sign i{index} q{req}"),
            Self::Signed { req, signature } => format!("signed q{req} {}", signature.is_some()),
        }
    }
}

/// A relay's answer to a submission.
#[derive(Clone, Debug)]
enum Answer {
    Accepted(EpochCert),
    Conflict,
    Unavailable,
    /// No group of the relay orders the channel: its relay set changed, and the group of the
    /// new set has not opened it yet (the device opens it).
    NotOrdered,
    /// The channel is open in the group of its relay set.
    Opened,
    /// The opening state is not the one the relays ordered last (the device is behind).
    OpenRefused,
    Refused(String),
}

/// What reaches a device.
#[derive(Clone, Debug)]
enum Incoming {
    Commit(ChannelMessage),
    /// The Welcome of the commit with this hash (the sim keeps the bytes; the relay carries them
    /// opaquely, as it carries sealed Welcomes).
    Welcome(CommitHash),
    Answer {
        seq: u64,
        answer: Answer,
    },
}

#[derive(Debug)]
enum Event {
    Relay { from: usize, to: usize, msg: RelayMsg },
    Submit { relay: usize, device: usize, seq: u64, commit: CommitRef, bytes: Vec<u8> },
    Open { relay: usize, device: usize, seq: u64, state: PublicState },
    Device { device: usize, incoming: Incoming },
    Restart(usize),
    Heal,
}

#[derive(Debug)]
enum Role {
    Follower,
    Candidate { votes: BTreeSet<usize> },
    Leader { next: BTreeMap<usize, u64>, matched: BTreeMap<usize, u64> },
}

/// Who waits for a proposal's outcome at the leader.
#[derive(Clone, Copy, Debug)]
enum Waiter {
    Here(u64),
    Remote { relay: usize, req: u64 },
}

/// One relay's replica of one group.
struct Replica {
    // Durable.
    term: u64,
    voted_for: Option<usize>,
    log: Vec<Entry>,
    /// Highest log index whose fan-out is in the inbox.
    fanned: u64,
    // Volatile.
    role: Role,
    leader: Option<usize>,
    commit: u64,
    applied: u64,
    orderer: Orderer,
    election_at: u64,
    heartbeat_at: u64,
    waiters: Vec<(u64, u64, Waiter)>,
    /// Signature requests waiting for the log to reach their index: (index, body, from, req,
    /// deadline).
    sign_waits: Vec<(u64, EpochCertBody, usize, u64, u64)>,
    swept: BTreeSet<(ChannelId, u64)>,
    sweep_at: u64,
}

impl Replica {
    fn new(log: Vec<Entry>) -> Self {
        Self {
            term: 0,
            voted_for: None,
            log,
            fanned: 0,
            role: Role::Follower,
            leader: None,
            commit: 0,
            applied: 0,
            orderer: Orderer::new(OrderingLimits::default()),
            election_at: 0,
            heartbeat_at: 0,
            waiters: Vec::new(),
            sign_waits: Vec::new(),
            swept: BTreeSet::new(),
            sweep_at: 0,
        }
    }

    /// Forgets what a crash loses.
    fn crash(&mut self) {
        self.role = Role::Follower;
        self.leader = None;
        self.commit = 0;
        self.applied = 0;
        self.orderer = Orderer::new(OrderingLimits::default());
        self.waiters.clear();
        self.sign_waits.clear();
        self.swept.clear();
    }

    fn last(&self) -> (u64, u64) {
        (self.log.len() as u64, self.log.last().map_or(0, |e| e.term))
    }

    fn term_at(&self, index: u64) -> u64 {
        if index == 0 { 0 } else { self.log.get(index as usize - 1).map_or(0, |e| e.term) }
    }

    fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader { .. })
    }
}

#[derive(Debug)]
enum Stage {
    Opening,
    Ordering { commit: CommitRef },
    Certifying { body: EpochCertBody, signatures: Vec<CertSignature> },
    Delivering { cert: EpochCert },
}

/// Work a relay does for a device's submission (or for its own sweep).
#[derive(Debug)]
struct Request {
    device: Option<(usize, u64)>,
    group: usize,
    stage: Stage,
    deadline: u64,
}

struct Relay {
    key: SecretKey,
    id: RelayId,
    up: bool,
    replicas: BTreeMap<usize, Replica>,
    /// Durable inbox of each of its devices.
    inbox: BTreeMap<usize, VecDeque<Incoming>>,
    requests: BTreeMap<u64, Request>,
    next_req: u64,
}

struct Group {
    relays: Vec<usize>,
    keys: Vec<chitchat_proto::PublicKey>,
}

struct Device {
    me: Identity,
    provider: OpenMlsRustCrypto,
    relay: usize,
    chan: usize,
    channel: Option<Channel>,
    received: VecDeque<Incoming>,
    intent: Option<Intent<Change>>,
    staged: Option<StagedCommit>,
    /// The last submission: its number and when to give up waiting for its answer.
    seq: u64,
    awaiting: Option<u64>,
    retry_at: u64,
    /// Told another commit won: waiting for it to arrive.
    lost: bool,
    /// Told the channel is not ordered by its relay: open it before submitting again.
    must_open: bool,
    /// The devices its change adds.
    adding: Vec<usize>,
    /// Commits for the channel while it is not in it, kept for the Welcome that may follow
    /// them (as the node keeps them; bounded).
    early: VecDeque<ChannelMessage>,
    next_change: u64,
    /// When the last message to it arrives: its link to its relay keeps order (an inbox is
    /// fetched in order).
    arrival: u64,
}

struct Chan {
    id: ChannelId,
    devices: Vec<usize>,
}

struct World {
    p: Params,
    rng: ChaCha20Rng,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Event>,
    relays: Vec<Relay>,
    /// Every relay set some channel was ordered by, and its group.
    groups: Vec<Group>,
    crypto: openmls_rust_crypto::RustCrypto,
    devices: Vec<Device>,
    chans: Vec<Chan>,
    dirs: BTreeMap<DeviceId, Dir>,
    trust: TrustedRelays,
    /// Relay pairs that cannot reach each other.
    cut: BTreeSet<(usize, usize)>,
    faults: bool,
    welcomes: BTreeMap<CommitHash, Vec<u8>>,
    /// Every winner a replica applied, every certificate a relay built, every commit a member
    /// applied, by (channel, epoch).
    winners: BTreeMap<(ChannelId, u64), CommitHash>,
    certified: BTreeMap<(ChannelId, u64), CommitHash>,
    applied: BTreeMap<(ChannelId, u64), CommitHash>,
    acknowledged: Vec<(ChannelId, u64, CommitHash)>,
    trace: blake3::Hasher,
    /// Prints every event to stderr (`CHITCHAT_SIM_TRACE=1`).
    print_trace: bool,
    tail: VecDeque<String>,
    report: Report,
}

const BASE_MS: u64 = 1_700_000_000_000;

/// Runs a simulation and checks its invariants; `Err` says which broke, with the seed and the
/// last events.
pub fn run(p: &Params) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut w = World::new(p.clone())?;
    let result = w.run();
    if let Err(e) = result {
        let tail: Vec<String> = w.tail.iter().cloned().collect();
        bail!("seed {}: {e:#}\nat {} ms; last events:\n  {}", p.seed, w.now, tail.join("\n  "));
    }
    w.report.virtual_ms = w.now;
    w.report.seconds = started.elapsed().as_secs_f64();
    w.report.trace = *w.trace.finalize().as_bytes();
    Ok(w.report)
}

impl World {
    fn new(p: Params) -> anyhow::Result<Self> {
        ensure!(p.relays >= 1 && p.channels >= 1 && p.members >= 1, "nothing to simulate");
        let rng = ChaCha20Rng::seed_from_u64(p.seed);
        let mut relays = Vec::new();
        for i in 0..p.relays {
            let key = SecretKey::from_seed([200u8.wrapping_add(i as u8); 32]);
            let id = RelayId { host: format!("relay{i}.sim"), key: key.public() };
            relays.push(Relay {
                key,
                id,
                up: true,
                replicas: BTreeMap::new(),
                inbox: BTreeMap::new(),
                requests: BTreeMap::new(),
                next_req: 1,
            });
        }
        let trust = TrustedRelays {
            relays: relays.iter().map(|r| r.id.clone()).collect(),
            ..Default::default()
        };
        let mut w = Self {
            p,
            rng,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            relays,
            groups: Vec::new(),
            crypto: openmls_rust_crypto::RustCrypto::default(),
            devices: Vec::new(),
            chans: Vec::new(),
            dirs: BTreeMap::new(),
            trust,
            cut: BTreeSet::new(),
            faults: true,
            welcomes: BTreeMap::new(),
            winners: BTreeMap::new(),
            certified: BTreeMap::new(),
            applied: BTreeMap::new(),
            acknowledged: Vec::new(),
            trace: blake3::Hasher::new(),
            print_trace: std::env::var_os("CHITCHAT_SIM_TRACE").is_some(),
            tail: VecDeque::new(),
            report: Report::default(),
        };
        w.setup()?;
        Ok(w)
    }

    fn rand(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.rng.next_u64() % n }
    }

    fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.rand(hi.saturating_sub(lo) + 1)
    }

    fn stamp(&self) -> Timestamp {
        Timestamp(BASE_MS + self.now)
    }

    fn log(&mut self, line: String) {
        if self.print_trace {
            eprintln!("{line}");
        }
        self.trace.update(line.as_bytes());
        self.trace.update(b"\n");
        self.report.events += 1;
        if self.tail.len() >= 40 {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    fn schedule(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        self.events.insert((self.now + delay, self.seq), event);
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        // Each channel starts with a relay set of one to three relays, its members on them; its
        // spares sit on any relay, so that adding one may grow the set.
        let mut sets = Vec::new();
        for c in 0..self.p.channels {
            let size = (1 + self.rand(3) as usize).min(self.p.relays);
            let mut set = BTreeSet::new();
            while set.len() < size {
                set.insert(self.rand(self.p.relays as u64) as usize);
            }
            let set: Vec<usize> = set.into_iter().collect();
            let mut id = [0u8; 32];
            self.rng.fill_bytes(&mut id);
            let mut devices = Vec::new();
            for k in 0..self.p.members.max(set.len()) {
                devices.push(self.add_device(set[k % set.len()], c));
            }
            for _ in 0..self.p.spares {
                let relay = self.rand(self.p.relays as u64) as usize;
                devices.push(self.add_device(relay, c));
            }
            // The id names the creator, its first device (as the relay's open checks).
            let mut random = [0u8; 16];
            random.copy_from_slice(&id[..16]);
            let id = ChannelId::of_creator(&self.devices[devices[0]].me.device(), random);
            self.chans.push(Chan { id, devices });
            sets.push(set);
        }
        // Each channel is created by its first device and opened in its group's log (the same
        // first entries on every replica); its first commit adds the other members.
        let mut opening: BTreeMap<usize, Vec<Entry>> = BTreeMap::new();
        for (c, set) in sets.into_iter().enumerate() {
            let group = self.group_of(set.clone());
            let mut relays: Vec<RelayId> = set.iter().map(|r| self.relays[*r].id.clone()).collect();
            relays.sort();
            let creator = self.chans[c].devices[0];
            let d = &mut self.devices[creator];
            let config = ChannelConfig {
                mime: "application/x-sim".into(),
                name: format!("channel {c}"),
                relays,
                admins: AdminPolicy::AnyMember,
                creator: d.me.device(),
            };
            let channel = Channel::create(&d.provider, &d.me, self.chans[c].id, config)?;
            let state = channel.public_state(&d.provider, &d.me)?;
            d.channel = Some(channel);
            opening.entry(group).or_default().push(Entry {
                term: 0,
                command: Some(OrderCommand::Open { channel: self.chans[c].id, state }),
            });
            let initial = self.p.members.max(set.len());
            let add = self.chans[c].devices[1..initial]
                .iter()
                .copied()
                .map(|i| self.key_package(i))
                .collect::<anyhow::Result<Vec<_>>>()?;
            self.devices[creator].intent =
                Some(Intent::new(Change { add, ..Default::default() }, self.stamp()));
            self.devices[creator].adding = self.chans[c].devices[1..initial].to_vec();
        }
        for (g, entries) in opening {
            for &r in &self.groups[g].relays.clone() {
                let mut replica = Replica::new(entries.clone());
                replica.election_at = self.between(ELECTION_MS);
                self.relays[r].replicas.insert(g, replica);
            }
        }
        for d in 0..self.devices.len() {
            self.devices[d].next_change = self.between((0, 2 * self.p.change_every_ms));
        }
        Ok(())
    }

    /// The group of a relay set (sorted relay indices), registered on first use.
    fn group_of(&mut self, set: Vec<usize>) -> usize {
        if let Some(g) = self.groups.iter().position(|g| g.relays == set) {
            return g;
        }
        let keys = set.iter().map(|r| self.relays[*r].id.key).collect();
        self.groups.push(Group { relays: set, keys });
        self.report.groups = self.groups.len();
        self.groups.len() - 1
    }

    /// The relay set of a config, as sorted relay indices.
    fn set_of(&self, config: &ChannelConfig) -> Vec<usize> {
        let mut set: Vec<usize> = config
            .relays
            .iter()
            .filter_map(|id| self.relays.iter().position(|r| r.id == *id))
            .collect();
        set.sort_unstable();
        set.dedup();
        set
    }

    /// The group of relay `r` that orders the channel: the one whose relay set is the
    /// channel's current one (a group holding a copy whose set moved on is passed over).
    fn ordered_by(&self, r: usize, id: &ChannelId) -> Option<usize> {
        self.relays[r].replicas.iter().find_map(|(g, replica)| match replica.orderer.config(id) {
            Some(Ok(config)) if self.set_of(&config) == self.groups[*g].relays => Some(*g),
            _ => None,
        })
    }

    /// The group of relay `r` whose log decided `(channel, epoch)`: it answers a resubmission
    /// even after the channel moved on.
    fn decided_by(&self, r: usize, id: &ChannelId, epoch: u64) -> Option<usize> {
        self.relays[r]
            .replicas
            .iter()
            .find_map(|(g, x)| x.orderer.state().winner(id, epoch).map(|_| *g))
    }

    /// Relay `r`'s replica of group `g`, started if it does not run yet (its relay opens a
    /// channel there, or hears a Raft message for it).
    fn ensure_replica(&mut self, r: usize, g: usize) {
        if !self.relays[r].replicas.contains_key(&g) && self.groups[g].relays.contains(&r) {
            let mut replica = Replica::new(Vec::new());
            replica.election_at = self.now + self.between(ELECTION_MS);
            self.relays[r].replicas.insert(g, replica);
        }
    }

    fn add_device(&mut self, relay: usize, chan: usize) -> usize {
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let key = SecretKey::from_seed(seed);
        let me = Identity::new(&key);
        let n = self.devices.len();
        let issued = self.stamp();
        let sponsorship = Sponsorship::issue(
            &self.relays[relay].key,
            SponsorshipBody {
                device: me.device(),
                local_name: format!("user{n}"),
                relay: self.relays[relay].id.clone(),
                issued,
                expires: issued.plus_ms(1 << 40),
            },
        );
        let body = DirBody {
            device: me.device(),
            seq: 1,
            inbox_key: [0; 32],
            linked: Default::default(),
            sponsorships: vec![sponsorship],
            profile: Profile { display_name: format!("user {n}"), avatar: None },
            revoked: false,
            issued,
        };
        self.dirs.insert(me.device(), Dir::sign(&key, body));
        self.devices.push(Device {
            me,
            provider: OpenMlsRustCrypto::default(),
            relay,
            chan,
            channel: None,
            received: VecDeque::new(),
            intent: None,
            staged: None,
            seq: 0,
            awaiting: None,
            retry_at: 0,
            lost: false,
            must_open: false,
            adding: Vec::new(),
            early: VecDeque::new(),
            next_change: 0,
            arrival: 0,
        });
        n
    }

    fn key_package(&self, i: usize) -> anyhow::Result<Bytes> {
        let d = &self.devices[i];
        Ok(Bytes(d.me.key_package(&d.provider, false)?))
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let end = self.p.fault_ms + self.p.settle_ms;
        self.schedule(self.p.fault_ms, Event::Heal);
        let mut next_crash = self.next_fault(self.p.crash_every_ms);
        let mut next_partition = self.next_fault(self.p.partition_every_ms);
        while self.now < end {
            // Events due before the next tick, in time order.
            let tick_end = self.now + TICK_MS;
            while let Some(entry) = self.events.first_entry() {
                if entry.key().0 >= tick_end {
                    break;
                }
                let ((at, _), event) = entry.remove_entry();
                self.now = self.now.max(at);
                self.handle(event)?;
            }
            self.now = tick_end;
            if self.faults && self.now >= next_crash {
                self.crash()?;
                next_crash = self.now + self.next_fault(self.p.crash_every_ms);
            }
            if self.faults && self.now >= next_partition {
                self.partition();
                next_partition = self.now + self.next_fault(self.p.partition_every_ms);
            }
            self.tick()?;
            if !self.faults && self.settled() {
                break;
            }
        }
        self.final_checks()
    }

    fn next_fault(&mut self, mean: u64) -> u64 {
        if mean == 0 { u64::MAX / 2 } else { self.between((mean / 2, mean * 3 / 2)) }
    }

    fn crash(&mut self) -> anyhow::Result<()> {
        let up: Vec<usize> = (0..self.relays.len()).filter(|r| self.relays[*r].up).collect();
        // At most one relay down at a time, so that every group of three keeps a majority.
        if up.len() < self.relays.len() || up.is_empty() {
            return Ok(());
        }
        let r = up[self.rand(up.len() as u64) as usize];
        let down = self.between((300, 3_000));
        self.log(format!("{} crash r{r} for {down} ms", self.now));
        self.report.crashes += 1;
        let relay = &mut self.relays[r];
        relay.up = false;
        relay.requests.clear();
        for replica in relay.replicas.values_mut() {
            replica.crash();
        }
        self.schedule(down, Event::Restart(r));
        Ok(())
    }

    fn partition(&mut self) {
        if !self.cut.is_empty() || self.relays.len() < 2 {
            return;
        }
        let alone = self.rand(self.relays.len() as u64) as usize;
        for other in 0..self.relays.len() {
            if other != alone {
                self.cut.insert((alone, other));
                self.cut.insert((other, alone));
            }
        }
        let lasts = self.between((500, 4_000));
        self.log(format!("{} partition r{alone} for {lasts} ms", self.now));
        self.report.partitions += 1;
        self.schedule(lasts, Event::Heal);
    }

    fn send(&mut self, from: usize, to: usize, msg: RelayMsg) {
        self.report.relay_messages += 1;
        let lost = self.faults && self.rand(100) < self.p.loss_pct;
        if lost || self.cut.contains(&(from, to)) {
            self.report.dropped += 1;
            return;
        }
        let delay = self.between(self.p.latency_ms);
        self.schedule(delay, Event::Relay { from, to, msg });
    }

    fn send_to_device(&mut self, device: usize, incoming: Incoming) {
        let at = (self.now + self.between(self.p.latency_ms)).max(self.devices[device].arrival);
        self.devices[device].arrival = at;
        self.schedule(at - self.now, Event::Device { device, incoming });
    }

    fn handle(&mut self, event: Event) -> anyhow::Result<()> {
        match event {
            Event::Relay { from, to, msg } => {
                self.log(format!("{} r{from}>r{to} {}", self.now, msg.kind()));
                if !self.relays[to].up {
                    self.report.dropped += 1;
                    return Ok(());
                }
                self.relay_msg(from, to, msg)
            }
            Event::Submit { relay, device, seq, commit, bytes } => {
                if !self.relays[relay].up {
                    return Ok(()); // the device times out
                }
                self.submitted(relay, device, seq, commit, bytes);
                Ok(())
            }
            Event::Open { relay, device, seq, state } => {
                if self.relays[relay].up {
                    self.open(relay, device, seq, state);
                }
                Ok(())
            }
            Event::Device { device, incoming } => {
                self.devices[device].received.push_back(incoming);
                Ok(())
            }
            Event::Restart(r) => {
                self.log(format!("{} restart r{r}", self.now));
                self.relays[r].up = true;
                let groups: Vec<usize> = self.relays[r].replicas.keys().copied().collect();
                for g in groups {
                    let at = self.now + self.between(ELECTION_MS);
                    if let Some(replica) = self.relays[r].replicas.get_mut(&g) {
                        replica.election_at = at;
                        replica.sweep_at = at + SWEEP_EVERY_MS;
                    }
                }
                Ok(())
            }
            Event::Heal => {
                self.cut.clear();
                if self.now >= self.p.fault_ms && self.faults {
                    self.faults = false;
                    self.log(format!("{} faults end", self.now));
                    for r in 0..self.relays.len() {
                        if !self.relays[r].up {
                            self.handle(Event::Restart(r))?;
                        }
                    }
                } else {
                    self.log(format!("{} heal", self.now));
                }
                Ok(())
            }
        }
    }

    // ---- Raft ----

    fn majority(&self, g: usize) -> usize {
        self.groups[g].relays.len() / 2 + 1
    }

    fn replica(&mut self, r: usize, g: usize) -> anyhow::Result<&mut Replica> {
        self.relays[r].replicas.get_mut(&g).context("no replica of that group here")
    }

    fn tick(&mut self) -> anyhow::Result<()> {
        for r in 0..self.relays.len() {
            if !self.relays[r].up {
                continue;
            }
            let groups: Vec<usize> = self.relays[r].replicas.keys().copied().collect();
            for g in groups {
                self.raft_tick(r, g)?;
                self.sign_timeouts(r, g);
            }
            self.request_timeouts(r);
            // The relay's devices fetch their inboxes.
            let queued: Vec<(usize, Incoming)> = {
                let inbox = &mut self.relays[r].inbox;
                let mut out = Vec::new();
                for (d, q) in inbox.iter_mut() {
                    out.extend(q.drain(..).map(|i| (*d, i)));
                }
                out
            };
            for (d, incoming) in queued {
                self.send_to_device(d, incoming);
            }
        }
        for d in 0..self.devices.len() {
            self.device_tick(d)?;
        }
        Ok(())
    }

    fn raft_tick(&mut self, r: usize, g: usize) -> anyhow::Result<()> {
        let now = self.now;
        let replica = self.replica(r, g)?;
        if replica.is_leader() {
            if now >= replica.heartbeat_at {
                replica.heartbeat_at = now + HEARTBEAT_MS;
                self.replicate(r, g)?;
            }
            let replica = self.replica(r, g)?;
            if now >= replica.sweep_at {
                replica.sweep_at = now + SWEEP_EVERY_MS;
                self.sweep(r, g)?;
            }
            return Ok(());
        }
        if now < replica.election_at {
            return Ok(());
        }
        replica.term += 1;
        replica.voted_for = Some(r);
        replica.leader = None;
        replica.role = Role::Candidate { votes: BTreeSet::from([r]) };
        let term = replica.term;
        let (last_index, last_term) = replica.last();
        let timeout = self.between(ELECTION_MS);
        self.replica(r, g)?.election_at = now + timeout;
        self.log(format!("{now} r{r} g{g} candidate term {term}"));
        if self.majority(g) == 1 {
            return self.become_leader(r, g);
        }
        for peer in self.groups[g].relays.clone() {
            if peer != r {
                self.send(
                    r,
                    peer,
                    RelayMsg::Raft { group: g, rpc: Rpc::Vote { term, last_index, last_term } },
                );
            }
        }
        Ok(())
    }

    fn become_leader(&mut self, r: usize, g: usize) -> anyhow::Result<()> {
        let peers: Vec<usize> = self.groups[g].relays.iter().copied().filter(|p| *p != r).collect();
        let now = self.now;
        let replica = self.replica(r, g)?;
        let term = replica.term;
        replica.log.push(Entry { term, command: None });
        let next_index = replica.log.len() as u64;
        replica.role = Role::Leader {
            next: peers.iter().map(|p| (*p, next_index)).collect(),
            matched: peers.iter().map(|p| (*p, 0)).collect(),
        };
        replica.leader = Some(r);
        replica.heartbeat_at = now + HEARTBEAT_MS;
        replica.sweep_at = now + SWEEP_EVERY_MS;
        self.report.elections += 1;
        self.log(format!("{now} r{r} g{g} leader term {term}"));
        self.replicate(r, g)?;
        self.advance_commit(r, g)
    }

    fn step_down(&mut self, r: usize, g: usize, term: u64) -> anyhow::Result<()> {
        let timeout = self.between(ELECTION_MS);
        let now = self.now;
        let replica = self.replica(r, g)?;
        if term > replica.term {
            replica.term = term;
            replica.voted_for = None;
        }
        let was_leader = replica.is_leader();
        replica.role = Role::Follower;
        if was_leader {
            replica.leader = None;
            replica.election_at = now + timeout;
        }
        // Proposals waiting here are not ordered by this leader; their proposers retry.
        let waiters = std::mem::take(&mut replica.waiters);
        for (_, _, waiter) in waiters {
            self.resolve(r, waiter, None)?;
        }
        Ok(())
    }

    fn replicate(&mut self, r: usize, g: usize) -> anyhow::Result<()> {
        let replica = self.replica(r, g)?;
        let Role::Leader { next, .. } = &replica.role else { return Ok(()) };
        let mut out = Vec::new();
        for (peer, next_index) in next {
            let prev_index = next_index - 1;
            let from = prev_index as usize;
            let to = (from + MAX_APPEND).min(replica.log.len());
            let entries = replica.log.get(from..to).map(<[Entry]>::to_vec).unwrap_or_default();
            out.push((
                *peer,
                Rpc::Append {
                    term: replica.term,
                    prev_index,
                    prev_term: replica.term_at(prev_index),
                    entries,
                    commit: replica.commit,
                },
            ));
        }
        for (peer, rpc) in out {
            self.send(r, peer, RelayMsg::Raft { group: g, rpc });
        }
        Ok(())
    }

    fn raft(&mut self, from: usize, r: usize, g: usize, rpc: Rpc) -> anyhow::Result<()> {
        let current = self.replica(r, g)?.term;
        let term = match &rpc {
            Rpc::Vote { term, .. }
            | Rpc::Voted { term, .. }
            | Rpc::Append { term, .. }
            | Rpc::Appended { term, .. } => *term,
        };
        if term > current {
            self.step_down(r, g, term)?;
        }
        let now = self.now;
        match rpc {
            Rpc::Vote { term, last_index, last_term } => {
                let timeout = self.between(ELECTION_MS);
                let replica = self.replica(r, g)?;
                let (my_index, my_term) = replica.last();
                let up_to_date =
                    last_term > my_term || (last_term == my_term && last_index >= my_index);
                let granted = term == replica.term
                    && replica.voted_for.is_none_or(|v| v == from)
                    && up_to_date;
                if granted {
                    replica.voted_for = Some(from);
                    replica.election_at = now + timeout;
                }
                let term = replica.term;
                self.send(r, from, RelayMsg::Raft { group: g, rpc: Rpc::Voted { term, granted } });
            }
            Rpc::Voted { term, granted } => {
                let majority = self.majority(g);
                let replica = self.replica(r, g)?;
                if term != replica.term || !granted {
                    return Ok(());
                }
                if let Role::Candidate { votes } = &mut replica.role {
                    votes.insert(from);
                    if votes.len() >= majority {
                        self.become_leader(r, g)?;
                    }
                }
            }
            Rpc::Append { term, prev_index, prev_term, entries, commit } => {
                let timeout = self.between(ELECTION_MS);
                let replica = self.replica(r, g)?;
                if term < replica.term {
                    let term = replica.term;
                    let rpc = Rpc::Appended { term, success: false, matched: 0 };
                    self.send(r, from, RelayMsg::Raft { group: g, rpc });
                    return Ok(());
                }
                if !matches!(replica.role, Role::Follower) {
                    replica.role = Role::Follower;
                }
                replica.leader = Some(from);
                replica.election_at = now + timeout;
                let term = replica.term;
                if prev_index > replica.log.len() as u64 || replica.term_at(prev_index) != prev_term
                {
                    let matched = (replica.log.len() as u64).min(prev_index.saturating_sub(1));
                    let rpc = Rpc::Appended { term, success: false, matched };
                    self.send(r, from, RelayMsg::Raft { group: g, rpc });
                    return Ok(());
                }
                for (k, entry) in entries.iter().enumerate() {
                    let index = prev_index as usize + k; // 0-based position
                    match replica.log.get(index) {
                        Some(e) if e.term == entry.term => {}
                        Some(_) => {
                            ensure!(
                                index as u64 >= replica.commit,
                                "r{r} g{g}: a committed entry at {} would be overwritten",
                                index + 1
                            );
                            replica.log.truncate(index);
                            replica.log.push(entry.clone());
                        }
                        None => replica.log.push(entry.clone()),
                    }
                }
                let matched = prev_index + entries.len() as u64;
                if commit > replica.commit {
                    replica.commit = commit.min(matched).max(replica.commit);
                }
                self.send(
                    r,
                    from,
                    RelayMsg::Raft {
                        group: g,
                        rpc: Rpc::Appended { term, success: true, matched },
                    },
                );
                self.apply_committed(r, g)?;
            }
            Rpc::Appended { term, success, matched } => {
                let replica = self.replica(r, g)?;
                if term != replica.term {
                    return Ok(());
                }
                let Role::Leader { next, matched: matches } = &mut replica.role else {
                    return Ok(());
                };
                if success {
                    let m = matches.entry(from).or_default();
                    *m = (*m).max(matched);
                    next.insert(from, *m + 1);
                    self.advance_commit(r, g)?;
                } else {
                    let n = next.entry(from).or_insert(1);
                    *n = (*n - 1).min(matched + 1).max(1);
                    self.replicate(r, g)?;
                }
            }
        }
        Ok(())
    }

    fn advance_commit(&mut self, r: usize, g: usize) -> anyhow::Result<()> {
        let majority = self.majority(g);
        let replica = self.replica(r, g)?;
        let Role::Leader { matched, .. } = &replica.role else { return Ok(()) };
        let mut indices: Vec<u64> = matched.values().copied().collect();
        indices.push(replica.log.len() as u64);
        indices.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = indices[majority - 1];
        if candidate > replica.commit && replica.term_at(candidate) == replica.term {
            replica.commit = candidate;
            self.apply_committed(r, g)?;
        }
        Ok(())
    }

    /// Appends a command at the leader; `waiter` hears the outcome once it is applied.
    fn append(
        &mut self,
        r: usize,
        g: usize,
        command: OrderCommand,
        waiter: Waiter,
    ) -> anyhow::Result<()> {
        let replica = self.replica(r, g)?;
        let term = replica.term;
        replica.log.push(Entry { term, command: Some(command) });
        let index = replica.log.len() as u64;
        replica.waiters.push((index, term, waiter));
        self.replicate(r, g)?;
        self.advance_commit(r, g)
    }

    fn apply_committed(&mut self, r: usize, g: usize) -> anyhow::Result<()> {
        loop {
            let replica = self.replica(r, g)?;
            if replica.applied >= replica.commit {
                break;
            }
            let index = replica.applied + 1;
            let entry =
                replica.log.get(index as usize - 1).context("committed entry missing")?.clone();
            replica.applied = index;
            let (verdict, delivery) = match entry.command {
                Some(command) => {
                    let order = matches!(command, OrderCommand::Order { .. });
                    let (verdict, delivery) = replica.orderer.apply(index, command);
                    if order && let Verdict::Ordering(Outcome::Accepted(w)) = &verdict {
                        let (key, hash) = ((w.channel, w.epoch), w.hash);
                        if let Some(other) = self.winners.insert(key, hash) {
                            ensure!(
                                other == hash,
                                "two winners for epoch {} of {:?}",
                                key.1,
                                key.0
                            );
                        }
                    }
                    (Some(verdict), delivery)
                }
                None => (None, None),
            };
            if let Some(d) = delivery {
                self.fan_out(r, g, d)?;
            }
            // Answers wait for the entry to be applied, fan-out first.
            let replica = self.replica(r, g)?;
            let mut ready = Vec::new();
            replica.waiters.retain(|(i, t, w)| {
                if *i == index {
                    ready.push((*t == entry.term, *w));
                    false
                } else {
                    true
                }
            });
            for (ours, waiter) in ready {
                let result = if ours { verdict.clone().map(|v| (v, index)) } else { None };
                self.resolve(r, waiter, result)?;
            }
            self.signs_ready(r, g)?;
        }
        Ok(())
    }

    fn fan_out(&mut self, r: usize, g: usize, d: Delivery) -> anyhow::Result<()> {
        let replica = self.replica(r, g)?;
        if d.accepted.index <= replica.fanned {
            return Ok(());
        }
        replica.fanned = d.accepted.index;
        let commit = d.accepted.commit;
        let cert = match d.cert {
            Some(c) => c,
            None => {
                // A one-relay channel: the relay's own signature is the whole certificate.
                let body = EpochCertBody {
                    channel: commit.channel,
                    epoch: commit.epoch,
                    hash: commit.hash,
                };
                EpochCert {
                    body,
                    signatures: vec![CertSignature::sign(&self.relays[r].key, &body)],
                }
            }
        };
        let msg = ChannelMessage::Commit { commit: d.accepted.bytes.0.clone(), cert };
        let local: Vec<usize> = {
            let c = self.chans.iter().position(|c| c.id == commit.channel).context("channel")?;
            self.chans[c].devices.iter().copied().filter(|i| self.devices[*i].relay == r).collect()
        };
        for i in local {
            let device = self.devices[i].me.device();
            if d.accepted.recipients.binary_search(&device).is_ok() {
                self.relays[r].inbox.entry(i).or_default().push_back(Incoming::Commit(msg.clone()));
            }
        }
        // Welcomes for the devices the commit adds: this relay's own, and (queued onward, as
        // the relay's forwarding queue does) those of relays the commit brings into the set.
        let onward: Vec<usize> = d
            .new_relays
            .iter()
            .filter_map(|id| self.relays.iter().position(|x| x.id == *id))
            .collect();
        if let Some(welcome_of) = self.welcomes.get(&commit.hash).map(|_| commit.hash) {
            let replica = self.replica(r, g)?;
            let now_members = replica.orderer.member_set(&commit.channel).unwrap_or_default();
            let c = self.chans.iter().position(|c| c.id == commit.channel).context("channel")?;
            for &i in &self.chans[c].devices.clone() {
                let device = self.devices[i].me.device();
                let home = self.devices[i].relay;
                if (home == r || onward.contains(&home))
                    && now_members.binary_search(&device).is_ok()
                    && d.accepted.recipients.binary_search(&device).is_err()
                {
                    self.relays[home]
                        .inbox
                        .entry(i)
                        .or_default()
                        .push_back(Incoming::Welcome(welcome_of));
                }
            }
        }
        self.log(format!(
            "{} r{r} g{g} fans out epoch {} of c{}",
            self.now,
            commit.epoch,
            self.chan_of(&commit.channel)
        ));
        Ok(())
    }

    fn chan_of(&self, id: &ChannelId) -> usize {
        self.chans.iter().position(|c| c.id == *id).unwrap_or(usize::MAX)
    }

    // ---- The relay protocol ----

    fn relay_msg(&mut self, from: usize, r: usize, msg: RelayMsg) -> anyhow::Result<()> {
        match msg {
            RelayMsg::Raft { group, rpc } => {
                self.ensure_replica(r, group);
                self.raft(from, r, group, rpc)
            }
            RelayMsg::Propose { group, command, req } => {
                if self.relays[r].replicas.get(&group).is_some_and(Replica::is_leader) {
                    self.append(r, group, command, Waiter::Remote { relay: from, req })
                } else {
                    self.send(r, from, RelayMsg::Proposed { req, result: None });
                    Ok(())
                }
            }
            RelayMsg::Proposed { req, result } => self.proposed(r, req, result),
            RelayMsg::Sign { group, body, index, req } => {
                let deadline = self.now + SIGN_WAIT_MS;
                let Some(replica) = self.relays[r].replicas.get_mut(&group) else {
                    self.send(r, from, RelayMsg::Signed { req, signature: None });
                    return Ok(());
                };
                replica.sign_waits.push((index, body, from, req, deadline));
                self.signs_ready(r, group)
            }
            RelayMsg::Signed { req, signature } => self.signed(r, req, signature),
        }
    }

    /// Answers the signature requests whose index the log reached: a signature if the applied
    /// log says the body's hash won, a refusal otherwise.
    fn signs_ready(&mut self, r: usize, g: usize) -> anyhow::Result<()> {
        let replica = self.replica(r, g)?;
        let applied = replica.applied;
        let mut answers = Vec::new();
        let mut kept = Vec::new();
        for wait in std::mem::take(&mut replica.sign_waits) {
            let (index, body, from, req, _) = wait;
            if index > applied {
                kept.push(wait);
                continue;
            }
            let won = replica
                .orderer
                .state()
                .winner(&body.channel, body.epoch)
                .is_some_and(|w| w.hash == body.hash);
            answers.push((from, req, body, won));
        }
        self.replica(r, g)?.sign_waits = kept;
        for (from, req, body, won) in answers {
            let signature = won.then(|| CertSignature::sign(&self.relays[r].key, &body));
            if from == r {
                self.signed(r, req, signature)?;
            } else {
                self.send(r, from, RelayMsg::Signed { req, signature });
            }
        }
        Ok(())
    }

    fn sign_timeouts(&mut self, r: usize, g: usize) {
        let now = self.now;
        let Some(replica) = self.relays[r].replicas.get_mut(&g) else { return };
        let mut expired = Vec::new();
        replica.sign_waits.retain(|(_, _, from, req, deadline)| {
            if *deadline <= now {
                expired.push((*from, *req));
                false
            } else {
                true
            }
        });
        for (from, req) in expired {
            self.send(r, from, RelayMsg::Signed { req, signature: None });
        }
    }

    fn request_timeouts(&mut self, r: usize) {
        let now = self.now;
        let expired: Vec<u64> = self.relays[r]
            .requests
            .iter()
            .filter(|(_, q)| q.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(q) = self.relays[r].requests.remove(&id) {
                self.answer(q.device, Answer::Unavailable);
            }
        }
    }

    fn answer(&mut self, device: Option<(usize, u64)>, answer: Answer) {
        if let Some((d, seq)) = device {
            self.send_to_device(d, Incoming::Answer { seq, answer });
        }
    }

    /// A device's submission reaches its relay: propose it to the group's leader.
    fn submitted(&mut self, r: usize, device: usize, seq: u64, commit: CommitRef, bytes: Vec<u8>) {
        // As the relay: the group of the current set, unless it opened the channel past this
        // epoch and another group decided it.
        let ordered = self.ordered_by(r, &commit.channel);
        let past = ordered.is_none_or(|g| {
            let x = &self.relays[r].replicas[&g].orderer;
            x.next_epoch(&commit.channel).is_some_and(|n| n > commit.epoch)
                && x.state().winner(&commit.channel, commit.epoch).is_none()
        });
        let routed = if past {
            self.decided_by(r, &commit.channel, commit.epoch).or(ordered)
        } else {
            ordered
        };
        let Some(g) = routed else {
            self.answer(Some((device, seq)), Answer::NotOrdered);
            return;
        };
        let req = self.relays[r].next_req;
        self.relays[r].next_req += 1;
        let deadline = self.now + REQUEST_MS;
        self.relays[r].requests.insert(
            req,
            Request {
                device: Some((device, seq)),
                group: g,
                stage: Stage::Ordering { commit },
                deadline,
            },
        );
        let command = OrderCommand::Order { commit, bytes: Bytes(bytes), welcome: None };
        self.propose_or_answer(r, g, command, req);
    }

    /// A device opens its channel at its relay, from its export of the channel's public state:
    /// in the group of the state's relay set, after checking the state against every group of
    /// this relay that ordered the move to that set (as the relay's `vouch_for_state`).
    fn open(&mut self, r: usize, device: usize, seq: u64, state: PublicState) {
        let Ok(public) = PublicChannel::from_state(&self.crypto, &state) else {
            self.answer(Some((device, seq)), Answer::Refused("an unreadable state".into()));
            return;
        };
        let (id, config) = match public.config() {
            Ok(config) => (public.id(), config),
            Err(e) => return self.answer(Some((device, seq)), Answer::Refused(e.to_string())),
        };
        let set = self.set_of(&config);
        if !set.contains(&r) {
            return self
                .answer(Some((device, seq)), Answer::Refused("not a relay of the set".into()));
        }
        // As the relay: a first state comes from the creator its id names.
        let opener = self.devices[device].me.device();
        if public.epoch() == 0 && !id.opens_first_state(&config.creator, &opener) {
            return self.answer(Some((device, seq)), Answer::Refused("not the creator".into()));
        }
        // As the relay's `vouch_for_state`: this relay and every other relay of the set it
        // reaches judge the state by their copies; one that finds it differs refuses it.
        let epoch = public.epoch();
        let checks: Vec<StateCheck> = set
            .iter()
            .filter(|&&x| x == r || (self.relays[x].up && !self.cut.contains(&(r, x))))
            .map(|&x| self.judge_state(x, &id, &set, &state, epoch))
            .collect();
        let vouched = StateCheck::sum(epoch, checks);
        if vouched == Vouched::NotYet {
            self.log(format!(
                "{} r{r} cannot open c{} at epoch {epoch}: no relay of {set:?} vouches yet",
                self.now,
                self.chan_of(&id)
            ));
            return self.answer(Some((device, seq)), Answer::Unavailable);
        }
        if vouched == Vouched::Stale {
            let held: Vec<String> = self.relays[r]
                .replicas
                .iter()
                .filter_map(|(g, x)| x.orderer.next_epoch(&id).map(|e| format!("g{g}@{e}")))
                .collect();
            self.log(format!(
                "{} r{r} refuses to open c{} at epoch {} in the group of {set:?}: holds {held:?}",
                self.now,
                self.chan_of(&id),
                public.epoch()
            ));
            return self.answer(Some((device, seq)), Answer::OpenRefused);
        }
        let g = self.group_of(set);
        self.ensure_replica(r, g);
        let req = self.relays[r].next_req;
        self.relays[r].next_req += 1;
        let deadline = self.now + REQUEST_MS;
        self.relays[r].requests.insert(
            req,
            Request { device: Some((device, seq)), group: g, stage: Stage::Opening, deadline },
        );
        self.log(format!("{} r{r} opens c{} in g{g}", self.now, self.chan_of(&id)));
        self.propose_or_answer(r, g, OrderCommand::Reopen { channel: id, state }, req);
    }

    /// Relay `x`'s judgement of a state offered to open a channel in the group of `set`, by
    /// its copies of the channel (the relay's `judge_state`).
    fn judge_state(
        &self,
        x: usize,
        id: &ChannelId,
        set: &[usize],
        state: &PublicState,
        epoch: u64,
    ) -> StateCheck {
        let mut in_group = None;
        let mut elsewhere: Option<(HeldCopy, &Orderer)> = None;
        for (g, replica) in &self.relays[x].replicas {
            let o = &replica.orderer;
            let Some(held) = o.next_epoch(id) else { continue };
            let names_set = matches!(o.config(id), Some(Ok(c)) if self.set_of(&c) == set);
            let copy = HeldCopy { epoch: held, names_set };
            if self.groups[*g].relays == set {
                in_group = Some(copy);
            } else if elsewhere.is_none_or(|(e, _)| held > e.epoch) {
                elsewhere = Some((copy, o));
            }
        }
        let matches = elsewhere.is_some_and(|(c, o)| {
            c.names_set && c.epoch == epoch && o.matches(id, state) == Some(true)
        });
        StateCheck::judge(in_group, elsewhere.map(|(c, _)| c), epoch, matches)
    }

    /// [`World::propose`]s for request `req`, which is answered "unavailable" and dropped if
    /// no leader is known.
    fn propose_or_answer(&mut self, r: usize, g: usize, command: OrderCommand, req: u64) {
        if self.propose(r, g, command, req).is_err()
            && let Some(q) = self.relays[r].requests.remove(&req)
        {
            self.answer(q.device, Answer::Unavailable);
        }
    }

    /// Orders `command` in group `g`: here if this relay leads, else at the leader it knows.
    fn propose(
        &mut self,
        r: usize,
        g: usize,
        command: OrderCommand,
        req: u64,
    ) -> anyhow::Result<()> {
        let replica = self.replica(r, g)?;
        if replica.is_leader() {
            return self.append(r, g, command, Waiter::Here(req));
        }
        match replica.leader {
            Some(leader) if leader != r => {
                self.send(r, leader, RelayMsg::Propose { group: g, command, req });
                Ok(())
            }
            _ => bail!("no leader known"),
        }
    }

    fn resolve(
        &mut self,
        r: usize,
        waiter: Waiter,
        result: Option<(Verdict, u64)>,
    ) -> anyhow::Result<()> {
        match waiter {
            Waiter::Here(req) => self.proposed(r, req, result),
            Waiter::Remote { relay, req } => {
                self.send(r, relay, RelayMsg::Proposed { req, result });
                Ok(())
            }
        }
    }

    /// The outcome of a proposal made for request `req`.
    fn proposed(
        &mut self,
        r: usize,
        req: u64,
        result: Option<(Verdict, u64)>,
    ) -> anyhow::Result<()> {
        let Some(q) = self.relays[r].requests.remove(&req) else { return Ok(()) };
        let Some((verdict, index)) = result else {
            self.answer(q.device, Answer::Unavailable);
            return Ok(());
        };
        let g = q.group;
        match (q.stage, verdict) {
            (Stage::Opening, Verdict::Ordering(Outcome::Opened)) => {
                self.report.moves += 1;
                self.answer(q.device, Answer::Opened);
                Ok(())
            }
            (Stage::Opening, Verdict::Ordering(Outcome::AlreadyOpen { .. })) => {
                self.answer(q.device, Answer::Opened);
                Ok(())
            }
            (Stage::Ordering { commit }, Verdict::Ordering(Outcome::Accepted(w)))
                if w.hash == commit.hash =>
            {
                let body = EpochCertBody {
                    channel: commit.channel,
                    epoch: commit.epoch,
                    hash: commit.hash,
                };
                if self.groups[g].relays.len() == 1 {
                    // A one-relay channel: its winner was fanned out when applied, with the
                    // relay's own signature.
                    let cert = EpochCert {
                        body,
                        signatures: vec![CertSignature::sign(&self.relays[r].key, &body)],
                    };
                    self.certificate(g, &cert)?;
                    self.answer(q.device, Answer::Accepted(cert));
                    return Ok(());
                }
                self.certify(r, g, q.device, body, index, q.deadline)
            }
            (Stage::Ordering { .. }, Verdict::Ordering(Outcome::Conflict { .. })) => {
                self.answer(q.device, Answer::Conflict);
                Ok(())
            }
            (Stage::Ordering { .. }, Verdict::Ordering(Outcome::WrongEpoch { .. })) => {
                // The member is behind: what it missed is on its way.
                self.answer(q.device, Answer::Unavailable);
                Ok(())
            }
            (Stage::Ordering { .. }, other) => {
                self.answer(q.device, Answer::Refused(format!("{other:?}")));
                Ok(())
            }
            (Stage::Delivering { cert }, Verdict::Ordering(Outcome::Accepted(w)))
                if w.hash == cert.body.hash =>
            {
                self.answer(q.device, Answer::Accepted(cert));
                Ok(())
            }
            (stage, other) => {
                self.answer(q.device, Answer::Refused(format!("{other:?} at {stage:?}")));
                Ok(())
            }
        }
    }

    /// Starts collecting a majority's signatures for a winner at log `index`: this relay signs
    /// through its own log like the others.
    fn certify(
        &mut self,
        r: usize,
        g: usize,
        device: Option<(usize, u64)>,
        body: EpochCertBody,
        index: u64,
        deadline: u64,
    ) -> anyhow::Result<()> {
        let req = self.relays[r].next_req;
        self.relays[r].next_req += 1;
        self.relays[r].requests.insert(
            req,
            Request {
                device,
                group: g,
                stage: Stage::Certifying { body, signatures: Vec::new() },
                deadline,
            },
        );
        for peer in self.groups[g].relays.clone() {
            if peer == r {
                let deadline = self.now + SIGN_WAIT_MS;
                self.replica(r, g)?.sign_waits.push((index, body, r, req, deadline));
            } else {
                self.send(r, peer, RelayMsg::Sign { group: g, body, index, req });
            }
        }
        self.signs_ready(r, g)
    }

    fn signed(
        &mut self,
        r: usize,
        req: u64,
        signature: Option<CertSignature>,
    ) -> anyhow::Result<()> {
        let Some(signature) = signature else { return Ok(()) };
        let Some(q) = self.relays[r].requests.get_mut(&req) else { return Ok(()) };
        let g = q.group;
        let Stage::Certifying { body, signatures } = &mut q.stage else { return Ok(()) };
        if signature.verify(body).is_err()
            || !self.groups[g].keys.contains(&signature.signer)
            || signatures.iter().any(|s| s.signer == signature.signer)
        {
            return Ok(());
        }
        signatures.push(signature);
        if signatures.len() < self.groups[g].relays.len() / 2 + 1 {
            return Ok(());
        }
        let cert = EpochCert { body: *body, signatures: std::mem::take(signatures) };
        q.stage = Stage::Delivering { cert: cert.clone() };
        self.certificate(g, &cert)?;
        self.propose_or_answer(r, g, OrderCommand::Deliver { cert }, req);
        Ok(())
    }

    /// Records a certificate a relay built: one hash per (channel, epoch).
    fn certificate(&mut self, g: usize, cert: &EpochCert) -> anyhow::Result<()> {
        cert.verify(&self.groups[g].keys).context("a certificate without a majority")?;
        let key = (cert.body.channel, cert.body.epoch);
        if let Some(other) = self.certified.insert(key, cert.body.hash) {
            ensure!(
                other == cert.body.hash,
                "two certified hashes for epoch {} of {:?}",
                key.1,
                key.0
            );
        }
        Ok(())
    }

    /// The leader certifies and delivers the winners it saw waiting on its last sweep too.
    fn sweep(&mut self, r: usize, g: usize) -> anyhow::Result<()> {
        let replica = self.replica(r, g)?;
        let waiting: Vec<(EpochCertBody, u64)> = replica
            .orderer
            .waiting()
            .map(|w| {
                let c = w.accepted.commit;
                (
                    EpochCertBody { channel: c.channel, epoch: c.epoch, hash: c.hash },
                    w.accepted.index,
                )
            })
            .collect();
        let seen = std::mem::take(&mut replica.swept);
        let mut still = BTreeSet::new();
        for (body, index) in waiting {
            let key = (body.channel, body.epoch);
            still.insert(key);
            if seen.contains(&key) {
                self.report.swept += 1;
                self.log(format!(
                    "{} r{r} g{g} sweeps epoch {} of c{}",
                    self.now,
                    body.epoch,
                    self.chan_of(&body.channel)
                ));
                let deadline = self.now + REQUEST_MS;
                self.certify(r, g, None, body, index, deadline)?;
            }
        }
        self.replica(r, g)?.swept = still;
        Ok(())
    }

    // ---- Devices ----

    fn check(&self) -> KnownDirs<'_, TrustedRelays> {
        KnownDirs { dirs: &self.dirs, trust: &self.trust, now: self.stamp() }
    }

    fn device_tick(&mut self, i: usize) -> anyhow::Result<()> {
        while let Some(incoming) = self.devices[i].received.pop_front() {
            self.receive(i, incoming)?;
        }
        let now = self.now;
        let active = self.devices[i].channel.as_ref().is_some_and(Channel::is_active);
        let d = &mut self.devices[i];
        if !active {
            if let Some(intent) = &mut d.intent {
                intent.superseded();
                self.report.superseded += 1;
            }
            d.intent = None;
            d.staged = None;
            d.awaiting = None;
            return Ok(());
        }
        if d.intent.is_none() {
            if self.faults && now >= d.next_change {
                let next =
                    self.between((self.p.change_every_ms / 2, self.p.change_every_ms * 3 / 2));
                self.devices[i].next_change = now + next;
                if let Some(change) = self.random_change(i)? {
                    self.devices[i].intent = Some(Intent::new(change, self.stamp()));
                }
            }
            return Ok(());
        }
        let d = &mut self.devices[i];
        if let Some(deadline) = d.awaiting {
            if now < deadline {
                return Ok(());
            }
            d.awaiting = None;
            d.retry_at = now;
            self.report.unavailable += 1;
        }
        let d = &mut self.devices[i];
        if d.staged.is_some() {
            if d.lost || now < d.retry_at {
                return Ok(());
            }
            if d.must_open {
                return self.open_at_relay(i);
            }
            return self.submit(i);
        }
        let due = d.intent.as_ref().is_some_and(|t| t.is_due(Timestamp(BASE_MS + now)));
        if !due {
            return Ok(());
        }
        let change = d.intent.as_ref().map(|t| t.change.clone()).unwrap_or_default();
        let change = self.with_relay_set(i, change)?;
        let check =
            KnownDirs { dirs: &self.dirs, trust: &self.trust, now: Timestamp(BASE_MS + now) };
        let d = &mut self.devices[i];
        let (provider, me) = (&d.provider, &d.me);
        let channel = d.channel.as_mut().context("a member")?;
        match channel.stage(provider, me, &change, &check) {
            Ok(s) => {
                if let Some(intent) = &mut d.intent {
                    intent.published(s.epoch, s.hash);
                }
                if let Some(welcome) = &s.welcome {
                    self.welcomes.insert(s.hash, welcome.clone());
                }
                self.devices[i].staged = Some(s);
                self.submit(i)
            }
            Err(ChannelError::AlreadyMember(_) | ChannelError::NotMember(_)) => {
                self.devices[i].intent = None;
                self.report.superseded += 1;
                Ok(())
            }
            Err(e) => Err(e).context(format!("device {i} stages")),
        }
    }

    /// The change with the relay set its members will need, as the node computes it when it
    /// stages: the relays of the members after it (in the config's order, new ones last), or
    /// no config change if that is the set already.
    fn with_relay_set(&self, i: usize, change: Change) -> anyhow::Result<Change> {
        let d = &self.devices[i];
        let config = d.channel.as_ref().context("a member")?.config().clone();
        let chan = &self.chans[d.chan];
        let relay_of = |device: &DeviceId| {
            chan.devices
                .iter()
                .find(|k| self.devices[**k].me.device() == *device)
                .map(|k| self.devices[*k].relay)
        };
        let mut hosts: BTreeSet<usize> = d
            .channel
            .as_ref()
            .context("a member")?
            .members()
            .iter()
            .filter(|m| !change.remove.contains(m))
            .filter_map(relay_of)
            .collect();
        hosts.extend(d.adding.iter().map(|k| self.devices[*k].relay));
        let mut relays: Vec<RelayId> = config
            .relays
            .iter()
            .filter(|id| {
                self.relays.iter().position(|r| r.id == **id).is_some_and(|r| hosts.contains(&r))
            })
            .cloned()
            .collect();
        for r in hosts {
            if !relays.contains(&self.relays[r].id) {
                relays.push(self.relays[r].id.clone());
            }
        }
        if relays.is_empty() || relays == config.relays {
            return Ok(Change { config: None, ..change });
        }
        Ok(Change { config: Some(ChannelConfig { relays, ..config }), ..change })
    }

    /// Opens the channel at the device's relay, from its export of the public state.
    fn open_at_relay(&mut self, i: usize) -> anyhow::Result<()> {
        let d = &mut self.devices[i];
        let state = d.channel.as_ref().context("a member")?.public_state(&d.provider, &d.me)?;
        d.seq += 1;
        let seq = d.seq;
        d.awaiting = Some(self.now + ANSWER_MS);
        let relay = d.relay;
        self.log(format!("{} d{i} opens c{} at r{relay}", self.now, self.devices[i].chan));
        let delay = self.between(self.p.latency_ms);
        self.schedule(delay, Event::Open { relay, device: i, seq, state });
        Ok(())
    }

    fn submit(&mut self, i: usize) -> anyhow::Result<()> {
        let d = &mut self.devices[i];
        let s = d.staged.as_ref().context("staged")?;
        let commit = CommitRef {
            channel: self.chans[d.chan].id,
            epoch: s.epoch,
            hash: s.hash,
            submitter: d.me.device(),
        };
        let bytes = s.commit.clone();
        d.seq += 1;
        let seq = d.seq;
        d.awaiting = Some(self.now + ANSWER_MS);
        let relay = d.relay;
        self.report.submitted += 1;
        self.log(format!(
            "{} d{i} submits epoch {} of c{}",
            self.now, commit.epoch, self.devices[i].chan
        ));
        let delay = self.between(self.p.latency_ms);
        self.schedule(delay, Event::Submit { relay, device: i, seq, commit, bytes });
        Ok(())
    }

    /// A random change: mostly key updates, sometimes adding a spare (which grows the relay set
    /// if its relay is not in it) or removing another member (which shrinks it if that was the
    /// last member on its relay).
    fn random_change(&mut self, i: usize) -> anyhow::Result<Option<Change>> {
        let c = self.devices[i].chan;
        let members: Vec<usize> = self.chans[c]
            .devices
            .iter()
            .copied()
            .filter(|d| self.devices[*d].channel.as_ref().is_some_and(Channel::is_active))
            .collect();
        let spares: Vec<usize> =
            self.chans[c].devices.iter().copied().filter(|d| !members.contains(d)).collect();
        self.devices[i].adding.clear();
        let roll = self.rand(10);
        if roll < 2 && !spares.is_empty() {
            let s = spares[self.rand(spares.len() as u64) as usize];
            self.devices[i].adding = vec![s];
            return Ok(Some(Change { add: vec![self.key_package(s)?], ..Default::default() }));
        }
        let others: Vec<usize> = members.iter().copied().filter(|m| *m != i).collect();
        if roll < 4 && members.len() > 2 && !others.is_empty() {
            let victim = others[self.rand(others.len() as u64) as usize];
            let device = self.devices[victim].me.device();
            return Ok(Some(Change { remove: vec![device], ..Default::default() }));
        }
        Ok(Some(Change { update: true, ..Default::default() }))
    }

    fn receive(&mut self, i: usize, incoming: Incoming) -> anyhow::Result<()> {
        match incoming {
            Incoming::Welcome(hash) => {
                if self.devices[i].channel.as_ref().is_some_and(Channel::is_active) {
                    return Ok(()); // a duplicate
                }
                let welcome = self.welcomes.get(&hash).context("welcome bytes")?.clone();
                let check = self.check();
                let d = &self.devices[i];
                let channel = Channel::join(&d.provider, &welcome, &check)
                    .with_context(|| format!("device {i} joins"))?;
                self.log(format!(
                    "{} d{i} joins c{} at epoch {}",
                    self.now,
                    d.chan,
                    channel.epoch()
                ));
                let d = &mut self.devices[i];
                d.channel = Some(channel);
                d.next_change = self.now + self.p.change_every_ms;
                for msg in std::mem::take(&mut d.early) {
                    self.process(i, msg)?;
                }
                Ok(())
            }
            Incoming::Commit(msg) => self.process(i, msg),
            Incoming::Answer { seq, answer } => {
                let d = &self.devices[i];
                if seq != d.seq || d.staged.is_none() {
                    return Ok(()); // about an earlier submission
                }
                self.devices[i].awaiting = None;
                let name = match &answer {
                    Answer::Accepted(_) => "accepted",
                    Answer::Conflict => "conflict",
                    Answer::Unavailable => "unavailable",
                    Answer::NotOrdered => "not ordered",
                    Answer::Opened => "opened",
                    Answer::OpenRefused => "open refused",
                    Answer::Refused(_) => "refused",
                };
                self.log(format!("{} d{i} hears {name}", self.now));
                match answer {
                    Answer::Accepted(cert) => self.accept(i, &cert),
                    Answer::Conflict => {
                        self.report.conflicts += 1;
                        self.devices[i].lost = true;
                        Ok(())
                    }
                    Answer::Unavailable => {
                        self.report.unavailable += 1;
                        let wait = self.between((200, 800));
                        self.devices[i].retry_at = self.now + wait;
                        Ok(())
                    }
                    Answer::NotOrdered => {
                        self.devices[i].must_open = true;
                        self.devices[i].retry_at = self.now;
                        Ok(())
                    }
                    Answer::Opened => {
                        self.devices[i].must_open = false;
                        self.devices[i].retry_at = self.now;
                        Ok(())
                    }
                    Answer::OpenRefused => {
                        // Behind: what it misses is on its way; open again after a while.
                        let wait = self.between((200, 800));
                        self.devices[i].retry_at = self.now + wait;
                        Ok(())
                    }
                    Answer::Refused(reason) => {
                        bail!("a relay refused device {i}'s valid commit: {reason}")
                    }
                }
            }
        }
    }

    /// The certificate of this device's own staged commit, from its relay.
    fn accept(&mut self, i: usize, cert: &EpochCert) -> anyhow::Result<()> {
        let d = &mut self.devices[i];
        let Some(channel) = d.channel.as_mut().filter(|c| c.is_active()) else { return Ok(()) };
        if channel.pending() != Some((cert.body.epoch, cert.body.hash)) {
            return Ok(()); // merged from the inbox already
        }
        let events = channel.accept_own(&d.provider, cert).context("accept own")?;
        self.acknowledged.push((cert.body.channel, cert.body.epoch, cert.body.hash));
        self.report.acknowledged += 1;
        self.merged(i, events)
    }

    /// Processes a certified commit from the inbox.
    fn process(&mut self, i: usize, msg: ChannelMessage) -> anyhow::Result<()> {
        let now = Timestamp(BASE_MS + self.now);
        let check = KnownDirs { dirs: &self.dirs, trust: &self.trust, now };
        let d = &mut self.devices[i];
        let Some(channel) = d.channel.as_mut().filter(|c| c.is_active()) else {
            // Not in the channel (yet): its Welcome may come after this.
            d.early.push_back(msg);
            if d.early.len() > EARLY_MAX {
                d.early.pop_front();
            }
            return Ok(());
        };
        let before = channel.epoch();
        let events = channel
            .process(&d.provider, now, msg, &check)
            .with_context(|| format!("device {i} processes a commit at epoch {before}"))?;
        self.merged(i, events)
    }

    /// Follows the commits a device applied: one per (channel, epoch) across all members, and
    /// the fate of its own change.
    fn merged(&mut self, i: usize, events: Vec<ChannelEvent>) -> anyhow::Result<()> {
        for e in events {
            let ChannelEvent::CommitApplied { epoch, record, .. } = e else { continue };
            let cert = record.cert.context("an applied commit has its certificate")?;
            let key = (cert.body.channel, epoch - 1);
            if let Some(other) = self.applied.insert(key, cert.body.hash) {
                ensure!(
                    other == cert.body.hash,
                    "members applied two commits for epoch {} of {:?}",
                    key.1,
                    key.0
                );
            }
            self.log(format!("{} d{i} at epoch {epoch}", self.now));
            let d = &mut self.devices[i];
            if d.staged.as_ref().is_none_or(|s| s.epoch != key.1) {
                continue;
            }
            let s = d.staged.take().context("staged")?;
            d.awaiting = None;
            d.lost = false;
            let winner = CommitRef {
                channel: key.0,
                epoch: key.1,
                hash: cert.body.hash,
                submitter: d.me.device(),
            };
            let jitter = self.rng.next_u64();
            let stamp = Timestamp(BASE_MS + self.now);
            let d = &mut self.devices[i];
            let intent = d.intent.as_mut().context("intent")?;
            if s.hash == winner.hash {
                intent.accepted(&winner);
            } else {
                intent.lost(stamp, jitter);
            }
            if intent.is_done() {
                if matches!(intent.state, chitchat_proto::ordering::IntentState::Failed) {
                    self.report.failed += 1;
                }
                d.intent = None;
            }
        }
        Ok(())
    }

    /// Whether the settling phase is over: no change in flight, nothing queued for a device,
    /// and every channel converged.
    fn settled(&self) -> bool {
        self.devices.iter().all(|d| d.intent.is_none() && d.received.is_empty())
            && self.relays.iter().all(|r| r.inbox.values().all(VecDeque::is_empty))
            && (0..self.chans.len()).all(|c| self.converged(c).is_ok())
    }

    /// Channel `c`'s members agree with each other and with every relay of its group.
    fn converged(&self, c: usize) -> anyhow::Result<u64> {
        let chan = &self.chans[c];
        let members: Vec<usize> = chan
            .devices
            .iter()
            .copied()
            .filter(|d| self.devices[*d].channel.as_ref().is_some_and(Channel::is_active))
            .collect();
        ensure!(!members.is_empty(), "channel {c} has no members left");
        let first = self.devices[members[0]].channel.as_ref().context("member")?;
        let mut devices: Vec<DeviceId> =
            members.iter().map(|m| self.devices[*m].me.device()).collect();
        devices.sort();
        for &m in &members {
            let ch = self.devices[m].channel.as_ref().context("member")?;
            ensure!(
                ch.epoch() == first.epoch(),
                "channel {c}: device {m} at epoch {}, device {} at {}",
                ch.epoch(),
                members[0],
                first.epoch()
            );
            ensure!(
                ch.epoch_authenticator() == first.epoch_authenticator(),
                "channel {c}: device {m} forked"
            );
            let mut seen = ch.members();
            seen.sort();
            ensure!(seen == devices, "channel {c}: device {m} sees another membership");
        }
        // The relays: every replica of the group of the channel's relay set holds it at the
        // members' epoch with their membership, unless that group has not opened it yet (a
        // member opens it there when it next submits or posts): then the group that ordered the
        // move holds it at that epoch, with that relay set. No copy anywhere is ahead.
        let set = self.set_of(first.config());
        let mut holders = Vec::new();
        for (g, group) in self.groups.iter().enumerate() {
            for &r in &group.relays {
                let Some(replica) = self.relays[r].replicas.get(&g) else { continue };
                let Some(next) = replica.orderer.next_epoch(&chan.id) else { continue };
                ensure!(
                    next <= first.epoch(),
                    "channel {c}: relay {r} (group {g}) orders epoch {next}, members are at {}",
                    first.epoch()
                );
                let config = replica.orderer.config(&chan.id).context("config")??;
                if group.relays == set && self.set_of(&config) == set {
                    ensure!(
                        next == first.epoch(),
                        "channel {c}: relay {r} of its group orders epoch {next}, members are at {}",
                        first.epoch()
                    );
                }
                if next == first.epoch() {
                    let held = replica.orderer.member_set(&chan.id).context("members")?;
                    ensure!(
                        held.to_vec() == devices,
                        "channel {c}: relay {r} has another membership"
                    );
                    ensure!(
                        self.set_of(&config) == set,
                        "channel {c}: relay {r} has another relay set"
                    );
                    holders.push(r);
                }
            }
        }
        ensure!(!holders.is_empty(), "channel {c}: no relay holds epoch {}", first.epoch());
        Ok(first.epoch())
    }

    fn final_checks(&mut self) -> anyhow::Result<()> {
        for (i, d) in self.devices.iter().enumerate() {
            ensure!(
                d.intent.is_none(),
                "device {i} (relay {}, channel {}, at epoch {:?}) still has a change in flight: \
                 {:?}; staged {:?}, awaiting {:?}, lost {}, must open {}, retry at {}",
                d.relay,
                d.chan,
                d.channel.as_ref().map(Channel::epoch),
                d.intent.as_ref().map(|t| &t.state),
                d.staged.as_ref().map(|s| s.epoch),
                d.awaiting,
                d.lost,
                d.must_open,
                d.retry_at
            );
        }
        for c in 0..self.chans.len() {
            self.report.epochs += self.converged(c)?;
        }
        for (channel, epoch, hash) in &self.acknowledged {
            ensure!(
                self.applied.get(&(*channel, *epoch)) == Some(hash),
                "an acknowledged commit for epoch {epoch} of {channel:?} is not the one members \
                 applied"
            );
        }
        Ok(())
    }
}

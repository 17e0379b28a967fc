//! Gossip on one channel's topic at scale: a model of gossipsub (v1.1) as the node configures
//! it, on a virtual clock with per-link latency and loss, to measure how fast and how surely a
//! message reaches every member, and what it costs.
//!
//! What is modelled: each member is connected to `connections` random other members and keeps
//! a mesh of `D` of them (grafts up to `D` below `D_low`, prunes down to `D` above `D_high`, at
//! every heartbeat); a publisher sends to every connected member (flood publish); a member
//! that receives a message for the first time validates it (a fixed cost) and forwards it to
//! its mesh but the sender; every heartbeat a member tells `D_lazy` connected members outside
//! its mesh the ids it received in the last `history` heartbeats (IHAVE), and they ask for the
//! ones they lack (IWANT). Every transmission (message, IHAVE, IWANT) is lost with the loss
//! probability, independently. Members that spam (publish envelopes that fail validation)
//! are rejected at the first hop and pruned once their score falls (`spam_tolerance` rejected
//! messages). Not modelled: bandwidth and queueing, peer exchange, opportunistic grafting,
//! churn.
//!
//! Everything random comes from the seed; the trace (every delivery, in order) is hashed, so
//! one seed gives one run.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng as _, SeedableRng as _};

/// What a run is made of.
#[derive(Clone, Debug)]
pub struct Params {
    /// The seed of everything random.
    pub seed: u64,
    /// Members subscribed to the topic.
    pub members: usize,
    /// Of them, members that publish only invalid envelopes.
    pub spammers: usize,
    /// Messages published by honest members (one every `publish_every_ms`).
    pub messages: usize,
    /// Virtual milliseconds between two honest publications.
    pub publish_every_ms: u64,
    /// Spam envelopes each spammer publishes per honest message.
    pub spam_per_message: usize,
    /// Connections per member (other members it knows).
    pub connections: usize,
    /// Mesh degree, its bounds, and the peers told of recent ids per heartbeat.
    pub d: usize,
    /// Below this, a member grafts.
    pub d_low: usize,
    /// Above this, a member prunes.
    pub d_high: usize,
    /// Peers outside the mesh sent IHAVE per heartbeat.
    pub d_lazy: usize,
    /// Heartbeats whose ids an IHAVE carries.
    pub history: usize,
    /// Virtual milliseconds between heartbeats.
    pub heartbeat_ms: u64,
    /// One-way latency of a link, in virtual milliseconds, uniform in this range.
    pub latency_ms: (u64, u64),
    /// Virtual microseconds a member spends validating an envelope before forwarding it.
    pub validate_us: u64,
    /// Percent of transmissions lost.
    pub loss_pct: u64,
    /// Rejected envelopes from one peer before it is pruned and ignored.
    pub spam_tolerance: u32,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            seed: 1,
            members: 1000,
            spammers: 0,
            messages: 50,
            publish_every_ms: 200,
            spam_per_message: 0,
            connections: 20,
            d: 6,
            d_low: 4,
            d_high: 12,
            d_lazy: 6,
            history: 3,
            heartbeat_ms: 700,
            latency_ms: (5, 60),
            validate_us: 60,
            loss_pct: 5,
            spam_tolerance: 3,
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Honest deliveries expected (messages × other honest members).
    pub expected: u64,
    /// Honest deliveries made.
    pub delivered: u64,
    /// Delivery latency percentiles, in virtual milliseconds (p50, p99, max).
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Copies of honest messages received after the first, per delivery.
    pub duplicates_per_delivery: f64,
    /// Transmissions sent per member per honest message (messages, IHAVE, IWANT).
    pub sends_per_member_message: f64,
    /// Deliveries that came through IWANT (lazy gossip) rather than the mesh.
    pub via_gossip: u64,
    /// Spam envelopes that reached a member past the first hop.
    pub spam_forwarded: u64,
    /// The trace's hash.
    pub trace: [u8; 32],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Member `from` publishes message `msg` (spam if it is a spammer).
    Publish { from: u32, msg: u32 },
    /// Message `msg` arrives at `to` from `from`; `pulled` if it answers an IWANT.
    Message { to: u32, from: u32, msg: u32, pulled: bool },
    /// `to` is told by `from` that it has `msg`.
    IHave { to: u32, from: u32, msg: u32 },
    /// `to` is asked by `from` for `msg`.
    IWant { to: u32, from: u32, msg: u32 },
    /// `node` keeps its mesh and gossips.
    Heartbeat { node: u32 },
}

struct Member {
    connected: Vec<u32>,
    mesh: BTreeSet<u32>,
    /// When each message first arrived (or was published here).
    seen: HashMap<u32, u64>,
    /// Ids received per heartbeat, newest last.
    recent: Vec<Vec<u32>>,
    /// Rejected envelopes per peer.
    rejected: HashMap<u32, u32>,
    spammer: bool,
}

struct World {
    p: Params,
    rng: ChaCha20Rng,
    now_us: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    members: Vec<Member>,
    /// Per message: publisher, publication time (µs), whether it is spam.
    messages: Vec<(u32, u64, bool)>,
    latencies_us: Vec<u64>,
    duplicates: u64,
    sends: u64,
    via_gossip: u64,
    spam_forwarded: u64,
    trace: blake3::Hasher,
}

impl World {
    fn rand(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.rng.next_u64() % n }
    }

    fn at(&mut self, delay_us: u64, event: Event) {
        self.seq += 1;
        self.events.push(Reverse((self.now_us + delay_us, self.seq, event)));
    }

    /// Sends over a link: lost with the loss probability, else it arrives after the link's
    /// latency.
    fn send(&mut self, event: Event) {
        self.sends += 1;
        if self.rand(100) < self.p.loss_pct {
            return;
        }
        let (lo, hi) = self.p.latency_ms;
        let latency = lo * 1000 + self.rand((hi - lo) * 1000 + 1);
        self.at(latency, event);
    }

    fn setup(&mut self) {
        let n = self.p.members;
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            members.push(Member {
                connected: Vec::new(),
                mesh: BTreeSet::new(),
                seen: HashMap::new(),
                recent: vec![Vec::new()],
                rejected: HashMap::new(),
                spammer: i < self.p.spammers,
            });
        }
        self.members = members;
        // Each member dials `connections / 2` random others; connections go both ways.
        for i in 0..n {
            let mut dialled = 0;
            while dialled < self.p.connections / 2 && n > 1 {
                let j = self.rand(n as u64) as usize;
                if j == i || self.members[i].connected.contains(&(j as u32)) {
                    continue;
                }
                self.members[i].connected.push(j as u32);
                self.members[j].connected.push(i as u32);
                dialled += 1;
            }
        }
        // The first mesh, and heartbeats with jittered phases.
        for i in 0..n {
            self.graft(i as u32);
            let phase = self.rand(self.p.heartbeat_ms * 1000);
            self.at(phase, Event::Heartbeat { node: i as u32 });
        }
        // Honest publications, spread over the honest members; spam alongside.
        let honest: Vec<u32> = (self.p.spammers..n).map(|i| i as u32).collect();
        for m in 0..self.p.messages {
            let from = honest[self.rand(honest.len() as u64) as usize];
            let t = 2_000_000 + m as u64 * self.p.publish_every_ms * 1000;
            let msg = self.messages.len() as u32;
            self.messages.push((from, t, false));
            self.seq += 1;
            self.events.push(Reverse((t, self.seq, Event::Publish { from, msg })));
            for s in 0..self.p.spammers {
                for k in 0..self.p.spam_per_message {
                    let msg = self.messages.len() as u32;
                    let t = t + k as u64 * 1000;
                    self.messages.push((s as u32, t, true));
                    self.seq += 1;
                    let e = Event::Publish { from: s as u32, msg };
                    self.events.push(Reverse((t, self.seq, e)));
                }
            }
        }
    }

    /// Grafts connected members (not ignored) into `i`'s mesh up to `D`; the other side
    /// accepts below `D_high`.
    fn graft(&mut self, i: u32) {
        let mut candidates: Vec<u32> = self.members[i as usize]
            .connected
            .iter()
            .copied()
            .filter(|c| !self.members[i as usize].mesh.contains(c) && !self.ignored(i, *c))
            .collect();
        while self.members[i as usize].mesh.len() < self.p.d && !candidates.is_empty() {
            let k = self.rand(candidates.len() as u64) as usize;
            let c = candidates.swap_remove(k);
            if self.members[c as usize].mesh.len() < self.p.d_high {
                self.members[i as usize].mesh.insert(c);
                self.members[c as usize].mesh.insert(i);
            }
        }
    }

    fn ignored(&self, i: u32, peer: u32) -> bool {
        self.members[i as usize].rejected.get(&peer).is_some_and(|r| *r >= self.p.spam_tolerance)
    }

    fn receive(&mut self, to: u32, from: u32, msg: u32, pulled: bool) {
        if self.ignored(to, from) {
            return;
        }
        let (publisher, published, spam) = self.messages[msg as usize];
        if spam {
            // Validation fails at the first honest hop: never forwarded, counted against the
            // peer that sent it, which is pruned once past the tolerance.
            if self.members[to as usize].spammer {
                return;
            }
            if from != publisher {
                self.spam_forwarded += 1;
            }
            let r = self.members[to as usize].rejected.entry(from).or_default();
            *r += 1;
            if *r >= self.p.spam_tolerance {
                self.members[to as usize].mesh.remove(&from);
                self.members[from as usize].mesh.remove(&to);
            }
            return;
        }
        if self.members[to as usize].seen.contains_key(&msg) {
            self.duplicates += 1;
            return;
        }
        let validated = self.now_us + self.p.validate_us;
        self.members[to as usize].seen.insert(msg, validated);
        if let Some(last) = self.members[to as usize].recent.last_mut() {
            last.push(msg);
        }
        if to != publisher && !self.members[to as usize].spammer {
            self.latencies_us.push(validated - published);
            if pulled {
                self.via_gossip += 1;
            }
            self.trace.update(&[to.to_be_bytes(), msg.to_be_bytes()].concat());
            self.trace.update(&validated.to_be_bytes());
        }
        let mesh: Vec<u32> = self.members[to as usize].mesh.iter().copied().collect();
        for peer in mesh {
            if peer != from {
                self.send_after(
                    self.p.validate_us,
                    Event::Message { to: peer, from: to, msg, pulled: false },
                );
            }
        }
    }

    fn send_after(&mut self, delay_us: u64, event: Event) {
        self.now_us += delay_us;
        self.send(event);
        self.now_us -= delay_us;
    }

    fn heartbeat(&mut self, i: u32) {
        let p = self.p.clone();
        // Mesh upkeep.
        let mesh_len = self.members[i as usize].mesh.len();
        if mesh_len < p.d_low {
            self.graft(i);
        } else if mesh_len > p.d_high {
            while self.members[i as usize].mesh.len() > p.d {
                let all: Vec<u32> = self.members[i as usize].mesh.iter().copied().collect();
                let c = all[self.rand(all.len() as u64) as usize];
                self.members[i as usize].mesh.remove(&c);
                self.members[c as usize].mesh.remove(&i);
            }
        }
        // Lazy gossip: the ids of the last `history` heartbeats, to `D_lazy` peers outside
        // the mesh.
        let ids: Vec<u32> = self.members[i as usize].recent.iter().flatten().copied().collect();
        if !ids.is_empty() && !self.members[i as usize].spammer {
            let mut outside: Vec<u32> = self.members[i as usize]
                .connected
                .iter()
                .copied()
                .filter(|c| !self.members[i as usize].mesh.contains(c))
                .collect();
            for _ in 0..p.d_lazy.min(outside.len()) {
                let k = self.rand(outside.len() as u64) as usize;
                let peer = outside.swap_remove(k);
                for &msg in &ids {
                    self.send(Event::IHave { to: peer, from: i, msg });
                }
            }
        }
        let recent = &mut self.members[i as usize].recent;
        recent.push(Vec::new());
        if recent.len() > p.history {
            recent.remove(0);
        }
        self.at(p.heartbeat_ms * 1000, Event::Heartbeat { node: i });
    }

    fn publish(&mut self, from: u32, msg: u32) {
        let spam = self.messages[msg as usize].2;
        if !spam {
            self.members[from as usize].seen.insert(msg, self.now_us);
            if let Some(last) = self.members[from as usize].recent.last_mut() {
                last.push(msg);
            }
        }
        // Flood publish: to every connected member.
        let peers = self.members[from as usize].connected.clone();
        for peer in peers {
            self.send(Event::Message { to: peer, from, msg, pulled: false });
        }
    }

    fn run(&mut self, until_us: u64) {
        while let Some(Reverse((t, _, event))) = self.events.pop() {
            if t > until_us {
                break;
            }
            self.now_us = t;
            match event {
                Event::Publish { from, msg } => self.publish(from, msg),
                Event::Message { to, from, msg, pulled } => self.receive(to, from, msg, pulled),
                Event::IHave { to, from, msg } => {
                    if !self.members[to as usize].seen.contains_key(&msg) && !self.ignored(to, from)
                    {
                        self.send(Event::IWant { to: from, from: to, msg });
                    }
                }
                Event::IWant { to, from, msg } => {
                    if self.members[to as usize].seen.contains_key(&msg) {
                        self.send(Event::Message { to: from, from: to, msg, pulled: true });
                    }
                }
                Event::Heartbeat { node } => self.heartbeat(node),
            }
        }
    }
}

/// Runs one seeded simulation and reports what it measured.
pub fn run(p: &Params) -> Report {
    let mut w = World {
        p: p.clone(),
        rng: ChaCha20Rng::seed_from_u64(p.seed),
        now_us: 0,
        seq: 0,
        events: BinaryHeap::new(),
        members: Vec::new(),
        messages: Vec::new(),
        latencies_us: Vec::new(),
        duplicates: 0,
        sends: 0,
        via_gossip: 0,
        spam_forwarded: 0,
        trace: blake3::Hasher::new(),
    };
    w.setup();
    // Time for the last message, and for lazy gossip to repair what was lost (ten heartbeats).
    let last = 2_000_000 + p.messages as u64 * p.publish_every_ms * 1000;
    w.run(last + 10 * p.heartbeat_ms * 1000 + 1_000_000);
    let honest_members = (p.members - p.spammers) as u64;
    let expected = p.messages as u64 * honest_members.saturating_sub(1);
    let mut l = w.latencies_us.clone();
    l.sort_unstable();
    let pct = |q: f64| {
        if l.is_empty() {
            return 0.0;
        }
        let k = ((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1;
        l[k] as f64 / 1000.0
    };
    let delivered = l.len() as u64;
    Report {
        expected,
        delivered,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: l.last().map_or(0.0, |m| *m as f64 / 1000.0),
        duplicates_per_delivery: w.duplicates as f64 / delivered.max(1) as f64,
        sends_per_member_message: w.sends as f64 / (p.members as f64 * p.messages.max(1) as f64),
        via_gossip: w.via_gossip,
        spam_forwarded: w.spam_forwarded,
        trace: *w.trace.finalize().as_bytes(),
    }
}

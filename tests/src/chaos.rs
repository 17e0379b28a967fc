//! A chaos run: one relay and several nodes, real processes on loopback, under steady sends
//! while faults hit them at random; then everything heals and the run checks what a user was
//! promised.
//!
//! Faults, one at a time, at seeded random times: `kill -9` and restart of the relay or of a
//! node (down for a random while), SIGSTOP then SIGCONT of the relay or of a node, and network
//! partitions: the relay runs in its own network namespace ([`Netns`]), and a partition cuts it
//! off from every node, silently (packets dropped, nothing refused), for a random while.
//! Partitions need root; without it the relay runs on loopback, they are skipped, and the
//! report says so.
//!
//! After the last fault, the senders stop and every process runs again; the run waits (bounded)
//! until every node holds every message whose send was accepted, then checks:
//! - every accepted message is in every member's history exactly once;
//! - each sender's messages appear in the order it sent them, on every node;
//! - nothing appears that was never sent;
//! - no accepted message is still `sending` (or `failed`) on its sender;
//! - all members agree on the channel's epoch and membership.
//!
//! A send is *accepted* when the API answered `sending`. A send whose answer was lost (the node
//! was killed or frozen during it) is *uncertain*: it may or may not be delivered, but at most
//! once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chitchat_node::client::ApiClient;
use rand::RngExt as _;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng as _;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{Netns, NodeProcess, RelayProcess};

const NAMES: [&str; 8] = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"];
/// How long one send may take before its outcome counts as unknown.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// What a chaos run does.
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    /// Seeds the fault schedule (kinds, targets, times); the same seed replays the same one.
    pub seed: u64,
    /// Nodes, all in one channel (2 to 8).
    pub nodes: usize,
    /// How long sends and faults go on.
    pub duration: Duration,
    /// Pause between two sends of one node.
    pub send_every: Duration,
    /// Shortest and longest pause between two faults.
    pub fault_gap: (Duration, Duration),
    /// Shortest and longest time a process stays down or frozen.
    pub outage: (Duration, Duration),
    /// How long healing may take before the run fails.
    pub heal_timeout: Duration,
}

impl ChaosConfig {
    /// The short run of the test suite: about a minute.
    pub fn short(seed: u64) -> Self {
        Self {
            seed,
            nodes: 3,
            duration: Duration::from_secs(30),
            send_every: Duration::from_millis(150),
            fault_gap: (Duration::from_millis(500), Duration::from_secs(3)),
            outage: (Duration::from_millis(300), Duration::from_secs(4)),
            heal_timeout: Duration::from_secs(90),
        }
    }
}

/// A fault the run injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// `kill -9` of the relay, restarted after the outage.
    KillRelay,
    /// SIGSTOP of the relay, SIGCONT after the outage.
    FreezeRelay,
    /// `kill -9` of a node, restarted after the outage.
    KillNode,
    /// SIGSTOP of a node, SIGCONT after the outage.
    FreezeNode,
    /// The relay's network cut off from every node, joined again after the outage.
    Partition,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::KillRelay => "kill -9 relay",
            Self::FreezeRelay => "SIGSTOP relay",
            Self::KillNode => "kill -9 node",
            Self::FreezeNode => "SIGSTOP node",
            Self::Partition => "partition relay",
        })
    }
}

/// What a chaos run did and found.
#[derive(Debug, Default)]
pub struct Report {
    /// The configuration's seed.
    pub seed: u64,
    /// Nodes in the channel.
    pub nodes: usize,
    /// How long sends and faults went on.
    pub duration: Duration,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u32>,
    /// How partitions were injected, or why they were not.
    pub partitions: String,
    /// Sends answered `sending`.
    pub accepted: usize,
    /// Sends whose answer was lost.
    pub uncertain: usize,
    /// How long after the senders stopped every node held every accepted message.
    pub healed_after: Option<Duration>,
    /// Broken promises, one line each.
    pub violations: Vec<String>,
}

impl Report {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.healed_after.is_some()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chaos run: seed {}, {} nodes, {:?} of faults",
            self.seed, self.nodes, self.duration
        )?;
        let faults: Vec<String> = self.faults.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        writeln!(
            f,
            "  faults: {}",
            if faults.is_empty() { "none".into() } else { faults.join(", ") }
        )?;
        writeln!(f, "  partitions: {}", self.partitions)?;
        writeln!(f, "  sends: {} accepted, {} uncertain", self.accepted, self.uncertain)?;
        match self.healed_after {
            Some(d) => writeln!(
                f,
                "  healed: every accepted message everywhere {d:?} after the last send"
            )?,
            None => writeln!(f, "  healed: NO, not within the heal timeout")?,
        }
        if self.violations.is_empty() {
            writeln!(f, "  result: PASS (exactly once, in order, one epoch and membership)")
        } else {
            writeln!(f, "  result: FAIL, {} violations:", self.violations.len())?;
            for v in self.violations.iter().take(40) {
                writeln!(f, "    - {v}")?;
            }
            if self.violations.len() > 40 {
                writeln!(f, "    - ... and {} more", self.violations.len() - 40)?;
            }
            Ok(())
        }
    }
}

/// What one sender's sends came to: message numbers.
#[derive(Debug, Default)]
struct Sends {
    accepted: Vec<u64>,
    uncertain: Vec<u64>,
}

/// Runs a chaos run and reports. An `Err` is a failure of the harness itself (a process that
/// would not start), not a finding.
pub async fn run(config: ChaosConfig) -> anyhow::Result<Report> {
    anyhow::ensure!((2..=NAMES.len()).contains(&config.nodes), "2 to 8 nodes");
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    // Declared before the relay, so that the relay dies before its namespace goes.
    let (netns, partitions) = match Netns::create() {
        Ok(ns) => {
            let how = format!(
                "injected (the relay in network namespace {}, cut off by its veth going down)",
                ns.name()
            );
            (Some(ns), how)
        }
        Err(why) => (None, format!("not injected: {why} (network namespaces need root)")),
    };
    let mut relay = match &netns {
        Some(ns) => RelayProcess::start_in(ns, |c| c.to_owned())?,
        None => RelayProcess::start_fixed(|c| c.to_owned())?,
    };
    let mut nodes = Vec::new();
    for name in &NAMES[..config.nodes] {
        let node = NodeProcess::start(&[])?;
        node.register(&relay, name).await?;
        nodes.push(node);
    }
    let channel = setup_channel(&nodes).await?;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut apis = Vec::new();
    let mut senders = Vec::new();
    let mut sends = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let (tx, rx) = watch::channel(Some(node.api().clone()));
        apis.push(tx);
        let record = Arc::new(Mutex::new(Sends::default()));
        sends.push(record.clone());
        let (stop, channel, every) = (stop.clone(), channel.clone(), config.send_every);
        senders.push(tokio::spawn(send_steadily(NAMES[i], rx, channel, every, stop, record)));
    }

    let mut report = Report {
        seed: config.seed,
        nodes: config.nodes,
        duration: config.duration,
        partitions,
        ..Report::default()
    };
    let deadline = Instant::now() + config.duration;
    while Instant::now() < deadline {
        tokio::time::sleep(between(&mut rng, config.fault_gap)).await;
        let kinds = if netns.is_some() { 5 } else { 4 };
        let fault = match rng.random_range(0..kinds) {
            0 => Fault::KillRelay,
            1 => Fault::FreezeRelay,
            2 => Fault::KillNode,
            3 => Fault::FreezeNode,
            _ => Fault::Partition,
        };
        let target = rng.random_range(0..nodes.len());
        let outage = between(&mut rng, config.outage);
        *report.faults.entry(fault.to_string()).or_default() += 1;
        match fault {
            Fault::KillRelay => {
                relay.kill9();
                tokio::time::sleep(outage).await;
                tokio::task::block_in_place(|| relay.restart()).context("relay restart")?;
            }
            Fault::FreezeRelay => {
                relay.pause()?;
                tokio::time::sleep(outage).await;
                relay.resume()?;
            }
            Fault::KillNode => {
                // Killed under its sender's feet: a send in flight has no answer (uncertain).
                nodes[target].kill9();
                apis[target].send_replace(None);
                tokio::time::sleep(outage).await;
                tokio::task::block_in_place(|| nodes[target].restart()).context("node restart")?;
                apis[target].send_replace(Some(nodes[target].api().clone()));
            }
            Fault::FreezeNode => {
                nodes[target].pause()?;
                tokio::time::sleep(outage).await;
                nodes[target].resume()?;
            }
            Fault::Partition => {
                let ns = netns.as_ref().context("partitions need the namespace")?;
                ns.partition()?;
                tokio::time::sleep(outage).await;
                ns.heal()?;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.await.context("sender")?;
    }
    let sends: Vec<Sends> = sends
        .iter()
        .map(|s| std::mem::take(&mut *s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)))
        .collect();
    report.accepted = sends.iter().map(|s| s.accepted.len()).sum();
    report.uncertain = sends.iter().map(|s| s.uncertain.len()).sum();

    // Heal: everything runs; wait until every node holds every accepted message, and each
    // sender has them all `sent`.
    let healing = Instant::now();
    let mut last = Vec::new();
    while healing.elapsed() < config.heal_timeout {
        last = histories(&nodes, &channel).await;
        if healed(&last, &sends) {
            report.healed_after = Some(healing.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.violations = check(&last, &sends);
    report.violations.extend(agreement(&nodes, &channel).await);
    Ok(report)
}

/// Alice creates a channel and invites everyone else; returns its id once all are in.
async fn setup_channel(nodes: &[NodeProcess]) -> anyhow::Result<String> {
    let alice = &nodes[0];
    let v = alice.json("POST", "/v1/channels", Some(json!({"name": "chaos"}))).await?;
    let channel = v["id"].as_str().context("channel id")?.to_owned();
    for name in &NAMES[1..nodes.len()] {
        let body = json!({"address": format!("{name}@localhost")});
        alice.json("POST", &format!("/v1/channels/{channel}/invite"), Some(body)).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &nodes[1..] {
        loop {
            let joined = node.json("GET", &format!("/v1/channels/{channel}/members"), None).await;
            let count = |v: &Value| v["members"].as_array().map_or(0, Vec::len);
            if joined.is_ok_and(|v| count(&v) == nodes.len()) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "not everyone joined in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(channel)
}

/// Sends `NAME#N` every `every` while the node is up, until `stop`.
async fn send_steadily(
    name: &'static str,
    mut api: watch::Receiver<Option<ApiClient>>,
    channel: String,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
    record: Arc<Mutex<Sends>>,
) {
    let mut n = 0u64;
    let path = format!("/v1/channels/{channel}/messages");
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        let Some(client) = api.borrow_and_update().clone() else { continue };
        n += 1;
        let body = json!({"text": format!("{name}#{n}")});
        let sent = tokio::time::timeout(SEND_TIMEOUT, client.json("POST", &path, Some(body))).await;
        let accepted = matches!(&sent, Ok(Ok(v)) if v["status"] == "sending");
        let mut r = record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if accepted { r.accepted.push(n) } else { r.uncertain.push(n) }
    }
}

/// One node's messages: `(sender name, number, status)` in display order; `None` if the node
/// did not answer.
type History = Option<Vec<(String, u64, String)>>;

async fn histories(nodes: &[NodeProcess], channel: &str) -> Vec<History> {
    let mut out = Vec::new();
    for node in nodes {
        let path = format!("/v1/channels/{channel}/messages?limit=100000");
        let v = tokio::time::timeout(SEND_TIMEOUT, node.json("GET", &path, None)).await;
        out.push(match v {
            Ok(Ok(v)) => Some(parse_history(&v)),
            _ => None,
        });
    }
    out
}

fn parse_history(v: &Value) -> Vec<(String, u64, String)> {
    let Some(messages) = v["messages"].as_array() else { return vec![] };
    messages
        .iter()
        .filter_map(|m| {
            let body = m["content"]["body"].as_str()?;
            let (name, n) = body.split_once('#')?;
            let status = m["status"].as_str().unwrap_or_default().to_owned();
            Some((name.to_owned(), n.parse().ok()?, status))
        })
        .collect()
}

/// Whether every node holds every accepted message, and each sender has its own past
/// `sending` and `gossiped` (both wait for the relay).
fn healed(histories: &[History], sends: &[Sends]) -> bool {
    histories.iter().all(|h| {
        let Some(h) = h else { return false };
        let have: BTreeMap<(&str, u64), &str> =
            h.iter().map(|(name, n, status)| ((name.as_str(), *n), status.as_str())).collect();
        sends.iter().enumerate().all(|(i, s)| {
            s.accepted.iter().all(|n| {
                have.get(&(NAMES[i], *n)).is_some_and(|st| !matches!(*st, "sending" | "gossiped"))
            })
        })
    })
}

/// Every broken promise in the final histories.
fn check(histories: &[History], sends: &[Sends]) -> Vec<String> {
    let mut violations = Vec::new();
    let sender_of = |name: &str| NAMES.iter().position(|n| *n == name);
    for (i, h) in histories.iter().enumerate() {
        let node = NAMES[i];
        let Some(h) = h else {
            violations.push(format!("{node} did not answer after the heal"));
            continue;
        };
        let mut seen: BTreeMap<(&str, u64), usize> = BTreeMap::new();
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        for (name, n, status) in h {
            *seen.entry((name.as_str(), *n)).or_default() += 1;
            let Some(s) = sender_of(name).filter(|s| *s < sends.len()) else {
                violations.push(format!("{node} shows {name}#{n}, which no member sent"));
                continue;
            };
            if !sends[s].accepted.contains(n) && !sends[s].uncertain.contains(n) {
                violations.push(format!("{node} shows {name}#{n}, which was never sent"));
            }
            if let Some(prev) = last.insert(name.as_str(), *n)
                && prev > *n
            {
                violations.push(format!("{node} shows {name}#{n} after {name}#{prev}"));
            }
            if name == node && status != "sent" && sends[s].accepted.contains(n) {
                violations.push(format!("{node}'s own {name}#{n} is {status}"));
            }
        }
        for ((name, n), count) in &seen {
            if *count > 1 {
                violations.push(format!("{node} shows {name}#{n} {count} times"));
            }
        }
        for (s, record) in sends.iter().enumerate() {
            let missing: Vec<u64> = record
                .accepted
                .iter()
                .filter(|n| !seen.contains_key(&(NAMES[s], **n)))
                .copied()
                .collect();
            if !missing.is_empty() {
                violations.push(format!(
                    "{node} misses {} accepted messages of {}: {:?}",
                    missing.len(),
                    NAMES[s],
                    &missing[..missing.len().min(10)]
                ));
            }
        }
    }
    violations
}

/// Whether all members agree on the channel's epoch and membership.
async fn agreement(nodes: &[NodeProcess], channel: &str) -> Vec<String> {
    let mut views = BTreeSet::new();
    let mut lines = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let path = format!("/v1/channels/{channel}/members");
        match tokio::time::timeout(SEND_TIMEOUT, node.json("GET", &path, None)).await {
            Ok(Ok(v)) => {
                let mut members: Vec<String> = v["members"]
                    .as_array()
                    .map(|m| {
                        m.iter().filter_map(|m| m["device"].as_str().map(str::to_owned)).collect()
                    })
                    .unwrap_or_default();
                members.sort();
                let view = (v["epoch"].as_u64().unwrap_or(u64::MAX), members);
                lines.push(format!("{}: epoch {}, {} members", NAMES[i], view.0, view.1.len()));
                views.insert(view);
            }
            _ => lines.push(format!("{}: no answer", NAMES[i])),
        }
    }
    if views.len() == 1
        && lines.len() == nodes.len()
        && views.iter().all(|(_, m)| m.len() == nodes.len())
    {
        vec![]
    } else {
        vec![format!("members disagree on the channel: {}", lines.join("; "))]
    }
}

fn between(rng: &mut ChaCha8Rng, (lo, hi): (Duration, Duration)) -> Duration {
    let (lo, hi) = (lo.as_millis() as u64, hi.as_millis().max(lo.as_millis() + 1) as u64);
    Duration::from_millis(rng.random_range(lo..hi))
}

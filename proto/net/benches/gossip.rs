//! Gossip between many hosts in one process: gossipsub as ChitChat configures it
//! (`chitchat_net::gossip`), every envelope signed and judged by every host (signature and
//! membership) before it is forwarded, on loopback TCP (default) or libp2p's memory transport.
//!
//! Run: `cargo bench -p chitchat-net --bench gossip` (`-- --quick` for fewer messages;
//! `--hosts 100`, `--messages 200`, `--transport memory`).
//!
//! Rows: `clean` (honest members only) and `one spammer` (a connected peer, not a member,
//! publishing a forged envelope every millisecond through the run), with the delivery ratio,
//! the latency from publication to each other member's acceptance (p50, p99, max), and from
//! gossipsub's own metrics on every member: duplicates per message (copies received beyond the
//! first, per message a member accepted) and the gossip bytes each member sent and received in
//! the run (messages only: control traffic such as IHAVE and heartbeats is not counted).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat_net::gossip::{self, Gossip, GossipEvent};
use chitchat_net::{HostConfig, memory_swarm};
use chitchat_proto::codec::{Canonical as _, encode};
use chitchat_proto::gossip::{GossipEnvelope, Verdict};
use chitchat_proto::identity::DeviceId;
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::{SecretKey, Timestamp};
use futures::StreamExt as _;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm, gossipsub};
use prometheus_client::encoding::text::encode as encode_metrics;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

const CHANNEL: ChannelId = ChannelId([0x42; 32]);
const NOW: Timestamp = Timestamp(1_000_000_000);

enum Command {
    Dial(Multiaddr),
    Publish(Vec<u8>),
    MeshSize(oneshot::Sender<usize>),
}

/// One host: its swarm on a task of its own, judging every envelope as a member would.
struct Host {
    commands: mpsc::UnboundedSender<Command>,
    addr: Multiaddr,
    /// Gossipsub's metrics of this host.
    metrics: Registry,
}

impl Host {
    /// The sum of a counter of this host's gossipsub metrics over its labels (topics).
    fn counter(&self, name: &str) -> f64 {
        let mut text = String::new();
        if encode_metrics(&mut text, &self.metrics).is_err() {
            return 0.0;
        }
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Gossipsub's counters, summed over a set of hosts.
#[derive(Clone, Copy, Default)]
struct Counters {
    received: f64,
    unique: f64,
    bytes_sent: f64,
    bytes_received: f64,
}

impl Counters {
    fn of(hosts: &[Host]) -> Self {
        let mut c = Self::default();
        for h in hosts {
            c.received += h.counter("topic_msg_recv_counts_unfiltered_total");
            c.unique += h.counter("topic_msg_recv_counts_total");
            c.bytes_sent += h.counter("topic_msg_sent_bytes_total");
            c.bytes_received += h.counter("topic_msg_recv_bytes_unfiltered_total");
        }
        c
    }

    fn since(self, before: Self) -> Self {
        Self {
            received: self.received - before.received,
            unique: self.unique - before.unique,
            bytes_sent: self.bytes_sent - before.bytes_sent,
            bytes_received: self.bytes_received - before.bytes_received,
        }
    }
}

async fn host(
    n: usize,
    counted: bool,
    memory: bool,
    members: Arc<HashSet<DeviceId>>,
    start: Instant,
    deliveries: mpsc::UnboundedSender<(usize, Duration)>,
) -> Host {
    let config = HostConfig { idle_timeout: Duration::from_secs(600), lazy: false, tls: None };
    let identity = libp2p::identity::Keypair::generate_ed25519();
    let mut metrics = Registry::default();
    let gossip = Gossip::with_metrics(&mut metrics).expect("gossip");
    let make = |_: &libp2p::identity::Keypair| gossip;
    let mut swarm: Swarm<Gossip> = if memory {
        memory_swarm(identity, config, make).expect("swarm")
    } else {
        chitchat_net::swarm(identity, config, make).await.expect("swarm")
    };
    let listen: Multiaddr = if memory {
        format!("/memory/{}", 1_000_000 + n).parse().expect("addr")
    } else {
        "/ip4/127.0.0.1/tcp/0".parse().expect("addr")
    };
    swarm.listen_on(listen).expect("listen");
    gossip::subscribe(&mut swarm.behaviour_mut().gossipsub, &CHANNEL).expect("subscribe");
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let (commands, mut rx) = mpsc::unbounded_channel();
    let topic = chitchat_proto::gossip::topic(&CHANNEL);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                c = rx.recv() => match c {
                    Some(Command::Dial(a)) => { let _ = swarm.dial(a); }
                    Some(Command::Publish(bytes)) => {
                        let _ = swarm.behaviour_mut().gossipsub.publish(gossip::topic(&CHANNEL), bytes);
                    }
                    Some(Command::MeshSize(reply)) => {
                        let t = gossip::topic(&CHANNEL).hash();
                        let _ = reply.send(swarm.behaviour().gossipsub.mesh_peers(&t).count());
                    }
                    None => return,
                },
                e = swarm.select_next_some() => {
                    let SwarmEvent::Behaviour(GossipEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message_id, message })) = e else { continue };
                    let verdict = match GossipEnvelope::from_bytes(&message.data) {
                        Ok(env) => {
                            let v = env.judge(&topic, NOW, |d, _| Some(members.contains(d)));
                            if v == Verdict::Accept && counted {
                                let mut at = [0u8; 8];
                                at.copy_from_slice(&env.body.message[..8]);
                                let sent = Duration::from_micros(u64::from_be_bytes(at));
                                let _ = deliveries.send((n, start.elapsed().saturating_sub(sent)));
                            }
                            v
                        }
                        Err(_) => Verdict::Reject(chitchat_proto::gossip::GossipError::BadSignature),
                    };
                    swarm.behaviour_mut().report(&message_id, &propagation_source, verdict);
                }
            }
        }
    });
    Host { commands, addr, metrics }
}

/// CPU time of this process so far (user and system), from `/proc/self/stat`.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<u64> = after.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // utime and stime are fields 14 and 15 of the line; 11 and 12 after the name's ')' (the
    // state field, not a number, is skipped).
    let ticks = fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

struct Row {
    counters: Counters,
    cpu_per_message: Duration,
    delivered: usize,
    expected: usize,
    latencies: Vec<Duration>,
}

async fn run(
    hosts: usize,
    messages: usize,
    memory: bool,
    spammer: bool,
    seed: u64,
    round: usize,
) -> Row {
    let keys: Vec<SecretKey> = (0..hosts)
        .map(|i| {
            let mut s = [0u8; 32];
            s[..8].copy_from_slice(&(seed * 1_000_000 + i as u64).to_be_bytes());
            SecretKey::from_seed(s)
        })
        .collect();
    let members: Arc<HashSet<DeviceId>> =
        Arc::new(keys.iter().map(|k| DeviceId(k.public())).collect());
    let start = Instant::now();
    let (tx, mut deliveries) = mpsc::unbounded_channel();
    let mut all = Vec::new();
    for n in 0..hosts + usize::from(spammer) {
        let id = n + round * 10_000;
        all.push(host(id, n < hosts, memory, members.clone(), start, tx.clone()).await);
    }
    // Each host dials four others (a connection goes both ways: about eight each).
    let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = |m: usize| {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) as usize % m
    };
    for (i, h) in all[..hosts].iter().enumerate() {
        for _ in 0..4 {
            let j = next(hosts);
            if j != i {
                let _ = h.commands.send(Command::Dial(all[j].addr.clone()));
            }
        }
    }
    // The spammer connects as a member would, to eight members.
    if spammer {
        let mut rng = seed.wrapping_add(99);
        for _ in 0..8 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (rng >> 33) as usize % hosts;
            let _ = all[hosts].commands.send(Command::Dial(all[j].addr.clone()));
        }
    }
    // Meshes form within a few heartbeats.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut small = 0;
        for h in &all[..hosts] {
            let (reply, size) = oneshot::channel();
            let _ = h.commands.send(Command::MeshSize(reply));
            if size.await.unwrap_or(0) < 4 {
                small += 1;
            }
        }
        if small == 0 || Instant::now() > deadline {
            if small > 0 {
                eprintln!("meshes: {small} of {hosts} hosts below 4 peers after 30 s");
            }
            break;
        }
    }
    let spam = spammer.then(|| {
        let commands = all[hosts].commands.clone();
        let mallory = SecretKey::from_seed([0xee; 32]);
        tokio::spawn(async move {
            for i in 0u64.. {
                let e = GossipEnvelope::seal(&mallory, CHANNEL, 1, i.to_be_bytes().to_vec(), NOW);
                if commands.send(Command::Publish(encode(&e))).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    });
    while deliveries.try_recv().is_ok() {}
    let before = Counters::of(&all[..hosts]);
    let cpu_before = cpu();
    for m in 0..messages {
        let from = next(hosts);
        let sent = start.elapsed().as_micros() as u64;
        let mut body = sent.to_be_bytes().to_vec();
        body.extend_from_slice(&[m as u8; 200]);
        let e = GossipEnvelope::seal(&keys[from], CHANNEL, 1, body, NOW);
        let _ = all[from].commands.send(Command::Publish(encode(&e)));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_per_message = (cpu() - cpu_before) / messages.max(1) as u32;
    let counters = Counters::of(&all[..hosts]).since(before);
    if let Some(s) = spam {
        s.abort();
    }
    let mut latencies = Vec::new();
    while let Ok((_, l)) = deliveries.try_recv() {
        latencies.push(l);
    }
    latencies.sort_unstable();
    drop(all);
    Row {
        counters,
        cpu_per_message,
        delivered: latencies.len(),
        expected: messages * (hosts - 1),
        latencies,
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag =
        |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let quick = args.iter().any(|a| a == "--quick");
    let hosts: usize = flag("--hosts").and_then(|v| v.parse().ok()).unwrap_or(100);
    let messages: usize =
        flag("--messages").and_then(|v| v.parse().ok()).unwrap_or(if quick { 50 } else { 200 });
    let memory = flag("--transport").is_some_and(|t| t == "memory");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!(
        "gossip benchmark{}: {hosts} hosts, {} transport, {messages} messages of 200 bytes, 10 ms apart",
        if quick { " (quick run)" } else { "" },
        if memory { "memory" } else { "loopback TCP" }
    );
    println!(
        "{:<14} {:>10} {:>9} {:>9} {:>9} {:>13} {:>9} {:>13} {:>13}",
        "row",
        "delivered",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CPU ms/msg",
        "dups/msg",
        "KiB out/node",
        "KiB in/node"
    );
    let mut p99 = Vec::new();
    // The same hosts, keys and connections in every row (one seed); the spammer is one more
    // host, connected to eight members. Rows alternate, twice each: this machine's noise is as
    // large as the effect.
    let rows = [("clean", false), ("one spammer", true), ("clean", false), ("one spammer", true)];
    for (round, (name, spammer)) in rows.into_iter().enumerate() {
        let r = rt.block_on(run(hosts, messages, memory, spammer, 1, round));
        let c = r.counters;
        println!(
            "{:<14} {:>9.2}% {:>9.2} {:>9.2} {:>9.2} {:>13.2} {:>9.2} {:>13.1} {:>13.1}",
            name,
            100.0 * r.delivered as f64 / r.expected.max(1) as f64,
            pct(&r.latencies, 0.5),
            pct(&r.latencies, 0.99),
            r.latencies.last().map_or(0.0, |l| l.as_secs_f64() * 1000.0),
            r.cpu_per_message.as_secs_f64() * 1000.0,
            (c.received - c.unique) / c.unique.max(1.0),
            c.bytes_sent / hosts as f64 / 1024.0,
            c.bytes_received / hosts as f64 / 1024.0,
        );
        p99.push(pct(&r.latencies, 0.99));
    }
    if let [c1, s1, c2, s2] = p99[..] {
        let (clean, spammed) = ((c1 + c2) / 2.0, (s1 + s2) / 2.0);
        println!(
            "honest p99 with a spammer (means of two runs each): {:+.1}% of the clean run",
            100.0 * (spammed - clean) / clean
        );
    }
}

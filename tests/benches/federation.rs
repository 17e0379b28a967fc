//! Federation: certified commits through one relay and through three, and payloads forwarded
//! from one relay to another beside local enqueues, on loopback, all in the same run.
//!
//! Run: `cargo bench -p chitchat-tests --bench federation` (add `-- --quick` for a short run;
//! `--channels 1,8,64` for the numbers of channels committing at once, default one and many;
//! `--commits-only` to stop after the commit rows).
//!
//! Rows:
//! - `commits, 1 relay`: N devices, each with its own channel ordered by one relay, commit
//!   (MLS self-updates) one after another; the latency is the submission's round trip until the
//!   certificate is back (staging and merging, on the device, are not counted).
//! - `commits, 3 relays`: the same with every channel's relay set naming three relays: each
//!   commit is a Raft entry replicated to a majority, signed by a majority, and its certificate
//!   is a second entry, before the answer.
//! - `local enqueue`: one device's sealed payloads (batches of 256) into another's inbox at the
//!   same relay, each batch answered once durable.
//! - `forwarded A → B`: the same payloads for a device of relay B, given to relay A (`Forward`,
//!   answered once durable in A's queue), counted until all are in the device's inbox at B.
//!
//! Then idle channels (`--idle N`; 2,000 quick, 20,000 full): N channels opened in a relay's
//! own group (a fresh relay, the baseline) and N in the group of three relays, then each
//! relay's resident memory per channel (RSS growth over the channels) and the time a relay
//! takes to start again after `kill -9` (until it listens: its groups are loaded by then) and
//! until its metrics count the channels.

use std::time::{Duration, Instant};

use chitchat_proto::channel::{AcceptAll, AdminPolicy, Change, Channel, ChannelConfig, Identity};
use chitchat_proto::inbox::SealedEnvelope;
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::wire::{CommitSubmission, EnqueueResult, Request, Response};
use chitchat_proto::{DeviceId, RelayId};
use chitchat_tests::{Client, Device, RelayProcess, register, rss_kib};
use openmls_rust_crypto::OpenMlsRustCrypto;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn relay() -> RelayProcess {
    RelayProcess::start_federated(|c| {
        c.replace("submits_per_minute = 60", "submits_per_minute = 1000000")
            .replace("opens_per_hour = 60", "opens_per_hour = 1000000")
            .replace("sender_per_minute = 6000", "sender_per_minute = 100000000")
            .replace("max_items = 10000", "max_items = 100000000")
            .replace("max_bytes = 67108864", "max_bytes = 100000000000")
            .replace(
                "requests_per_minute_per_relay = 6000",
                "requests_per_minute_per_relay = 100000000",
            )
    })
    .expect("relay")
}

/// `devices` devices commit `commits` times each on their own channel ordered by `relays`,
/// through `relays[0]`; returns (elapsed, sorted latencies).
async fn commits(
    relays: &[&RelayProcess],
    devices: u32,
    commits: u32,
    first: u32,
) -> (Duration, Vec<Duration>) {
    let ids: Vec<RelayId> = relays.iter().map(|r| r.relay_id().expect("well-known")).collect();
    let mut tasks = Vec::new();
    let start_gate = std::sync::Arc::new(tokio::sync::Barrier::new(devices as usize + 1));
    for k in 0..devices {
        let device = Device::numbered(first + k);
        let client = register(relays[0], &device, &format!("d{}", first + k)).await;
        let ids = ids.clone();
        let gate = start_gate.clone();
        tasks.push(tokio::spawn(async move {
            let mls = Identity::new(&device.key);
            let provider = OpenMlsRustCrypto::default();
            let config = ChannelConfig {
                mime: "application/octet-stream".into(),
                name: "bench".into(),
                relays: ids,
                admins: AdminPolicy::AnyMember,
                creator: mls.device(),
            };
            let id = device.channel(0);
            let mut channel = Channel::create(&provider, &mls, id, config).expect("create");
            let state = channel.public_state(&provider, &mls).expect("export");
            let r = client.call(&Request::OpenChannel { channel: id, state }).await;
            assert!(matches!(r, Ok(Response::ChannelOpened { .. })), "{r:?}");
            gate.wait().await;
            let mut latencies = Vec::with_capacity(commits as usize);
            let update = Change { update: true, ..Default::default() };
            for _ in 0..commits {
                let staged = channel.stage(&provider, &mls, &update, &AcceptAll).expect("stage");
                let sub = CommitSubmission {
                    channel: id,
                    epoch: staged.epoch,
                    commit: staged.commit.clone(),
                    welcome: None,
                    fanout: vec![],
                };
                let t = Instant::now();
                let r = client.call(&Request::SubmitCommit(sub)).await.expect("submit");
                latencies.push(t.elapsed());
                let Response::CommitAccepted { cert } = r else { panic!("{r:?}") };
                channel.accept_own(&provider, &cert).expect("merge");
            }
            latencies
        }));
    }
    start_gate.wait().await;
    let start = Instant::now();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("task"));
    }
    let elapsed = start.elapsed();
    latencies.sort();
    (elapsed, latencies)
}

fn sealed(to: DeviceId, i: u64) -> SealedEnvelope {
    let mut ciphertext = vec![0u8; 200];
    ciphertext[..8].copy_from_slice(&i.to_le_bytes());
    SealedEnvelope { recipient: to, enc: [7; 32], ciphertext }
}

/// Counts the items in a device's inbox (without acknowledging them).
async fn inbox_len(c: &Client) -> usize {
    let mut n = 0;
    let mut after = None;
    loop {
        let r = c.call(&Request::Fetch { after, max: 1024 }).await.expect("fetch");
        let Response::Items { items, more } = r else { panic!("{r:?}") };
        n += items.len();
        after = items.last().map(|i| i.id).or(after);
        if !more {
            return n;
        }
    }
}

/// `n` payloads for `to`, 256 per request, through `via` (`Forward` to `host`, or `Enqueue`
/// when `host` is `None`), until all are in `to`'s inbox (read through `reader`).
async fn payloads(
    via: &Client,
    reader: &Client,
    to: DeviceId,
    host: Option<&str>,
    n: u64,
) -> Duration {
    let before = inbox_len(reader).await as u64;
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = 256.min(n - sent);
        let envelopes: Vec<_> = (0..k).map(|i| sealed(to, sent + i)).collect();
        match host {
            Some(host) => {
                let r = via
                    .call(&Request::Forward { host: host.into(), envelopes })
                    .await
                    .expect("forward");
                assert!(matches!(r, Response::Forwarded { .. }), "{r:?}");
            }
            None => {
                let r = via.call(&Request::EnqueueBatch { envelopes }).await.expect("enqueue");
                let Response::EnqueuedBatch(results) = r else { panic!("{r:?}") };
                assert!(results.iter().all(|r| matches!(r, EnqueueResult::Enqueued(_))));
            }
        }
        sent += k;
    }
    while (inbox_len(reader).await as u64) < before + n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (devices, per_device, forwarded) = if quick { (8, 20, 5_000) } else { (32, 50, 50_000) };
    let (a, b, c) = (relay(), relay(), relay());

    println!(
        "federation benchmark ({} run), loopback, 3 relay processes",
        if quick { "quick" } else { "full" }
    );
    println!("{:<44} {:>9} {:>10} {:>10} {:>12}", "row", "count", "p50", "p99", "per second");
    let row = |name: &str, count: u64, elapsed: Duration, lat: &[Duration]| {
        println!(
            "{:<44} {:>9} {:>10.2?} {:>10.2?} {:>12.0}",
            name,
            count,
            percentile(lat, 0.5),
            percentile(lat, 0.99),
            count as f64 / elapsed.as_secs_f64()
        );
    };
    // Channels committing at once: one (latency alone), and many (throughput).
    let loads: Vec<u32> = std::env::args()
        .skip_while(|a| a != "--channels")
        .nth(1)
        .map(|l| l.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, devices]);
    for (i, &devices) in loads.iter().enumerate() {
        let first = 1_000 * i as u32;
        let total = u64::from(devices * per_device);
        let (elapsed, lat) = commits(&[&a], devices, per_device, first).await;
        row(&format!("commits, 1 relay ({devices} channels)"), total, elapsed, &lat);
        let (elapsed, lat) = commits(&[&a, &b, &c], devices, per_device, 100_000 + first).await;
        row(&format!("commits, 3 relays ({devices} channels)"), total, elapsed, &lat);
    }

    if std::env::args().any(|a| a == "--commits-only") {
        return;
    }
    let sender = Device::numbered(900_000);
    let (to_a, to_b) = (Device::numbered(900_001), Device::numbered(900_002));
    let via_a = register(&a, &sender, "sender").await;
    let via_b = register(&b, &sender, "sender").await;
    let reader_a = register(&a, &to_a, "local").await;
    let reader_b = register(&b, &to_b, "remote").await;
    let local = payloads(&via_b, &reader_b, to_b.id(), None, forwarded).await;
    row("local enqueue at B (batches of 256)", forwarded, local, &[]);
    let remote = payloads(&via_a, &reader_b, to_b.id(), Some(b.host()), forwarded).await;
    row("forwarded A -> B until in B's inbox", forwarded, remote, &[]);
    println!(
        "forwarding rate / local enqueue rate: {:.0}%",
        100.0 * local.as_secs_f64() / remote.as_secs_f64()
    );
    drop((reader_a, via_b));

    let idle = std::env::args()
        .skip_while(|a| a != "--idle")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(if quick { 2_000 } else { 20_000 });
    println!("\n{idle} idle channels, opened 16 at a time");
    println!(
        "{:<44} {:>9} {:>12} {:>12} {:>12} {:>12}",
        "row", "channels", "opened/s", "KiB/channel", "restart", "counted"
    );
    let mut solo = relay();
    idle_channels(&mut [&mut solo], idle, 500_000, "own group of one relay (baseline)").await;
    let (mut a, mut b, mut c) = (a, b, c);
    idle_channels(&mut [&mut b, &mut a, &mut c], idle, 600_000, "group of three relays").await;
}

/// Opens `n` channels ordered by `relays` (through the first), 16 at a time, then measures
/// the first relay's memory per channel and its restart after `kill -9`.
async fn idle_channels(relays: &mut [&mut RelayProcess], n: u32, first: u32, name: &str) {
    let ids: Vec<RelayId> = relays.iter().map(|r| r.relay_id().expect("well-known")).collect();
    let before = relays[0].pid().map_or(0, rss_kib);
    let per = n.div_ceil(16);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..16u32 {
        let device = Device::numbered(first + k);
        let client = register(relays[0], &device, &format!("idle{}", first + k)).await;
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mls = Identity::new(&device.key);
            for i in 0..per {
                let provider = OpenMlsRustCrypto::default();
                let config = ChannelConfig {
                    mime: "application/octet-stream".into(),
                    name: "idle".into(),
                    relays: ids.clone(),
                    admins: AdminPolicy::AnyMember,
                    creator: mls.device(),
                };
                let mut random = [0u8; 16];
                random[..4].copy_from_slice(&i.to_be_bytes());
                let id = ChannelId::of_creator(&mls.device(), random);
                let channel = Channel::create(&provider, &mls, id, config).expect("create");
                let state = channel.public_state(&provider, &mls).expect("export");
                let r = client.call(&Request::OpenChannel { channel: id, state }).await;
                assert!(matches!(r, Ok(Response::ChannelOpened { .. })), "{r:?}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let opened = per * 16;
    let rate = f64::from(opened) / start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = relays[0].pid().map_or(0, rss_kib);
    let per_channel = after.saturating_sub(before) as f64 / f64::from(opened);
    relays[0].kill9();
    let t = Instant::now();
    relays[0].restart().expect("restart");
    let listening = t.elapsed();
    loop {
        if relays[0].metric("chitchat_relay_ordered_channels") >= f64::from(opened) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "the channels were not counted again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counted = t.elapsed();
    println!(
        "{:<44} {:>9} {:>12.0} {:>12.1} {:>12.2?} {:>12.2?}",
        name, opened, rate, per_channel, listening, counted
    );
}

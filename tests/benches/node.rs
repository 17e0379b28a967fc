//! The node end to end, on loopback, in release builds of the real binaries: message latency
//! node → relay → node, catch-up after being offline, and idle memory. Baselines are measured
//! in the same run: the relay alone (enqueue → live push, and fetch + ack), so that the node's
//! own share is visible on this shared, noisy machine. The node is also measured with
//! `send.commit_first` (each message leaves only after its commit), the order every message
//! had before sends left during their commit.
//!
//! Run: `cargo bench -p chitchat-tests --bench node` (add `-- --quick` for a short run).
//!
//! Goals (issue #4): latency p50 ≤ 2 ms; catch-up of 10,000 messages ≤ 1 s; idle RSS ≤ 40 MB.
//! Issue #13: direct delivery between two nodes (gossip over their own connection, the relay
//! frozen) beats the path through the relay (both nodes relay-only), measured in the same run.

use std::time::{Duration, Instant};

use chitchat_proto::inbox::SealedEnvelope;
use chitchat_proto::wire::{Request, Response};
use chitchat_tests::{Device, NodeProcess, RelayProcess, register, rss_kib};
use serde_json::json;
use tokio::sync::mpsc;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The pause between two paced pings.
const PACE: Duration = Duration::from_millis(10);

/// Latencies of one round of pings.
struct Round {
    /// API call → its answer.
    api: Vec<Duration>,
    /// API call → the sender's `sent` event.
    sent: Vec<Duration>,
    /// API call → the receiver's `message` event.
    received: Vec<Duration>,
}

/// Sends `n` messages one at a time, `pause` apart, and times each (the `sent` events only with
/// `sent_rx`).
async fn ping_round(
    alice: &NodeProcess,
    channel: &str,
    rx: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    mut sent_rx: Option<&mut mpsc::UnboundedReceiver<(String, Instant)>>,
    n: usize,
    pause: Duration,
) -> Round {
    let mut round = Round {
        api: Vec::with_capacity(n),
        sent: Vec::with_capacity(n),
        received: Vec::with_capacity(n),
    };
    for i in 0..n {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let t = Instant::now();
        let v = alice
            .json(
                "POST",
                &format!("/v1/channels/{channel}/messages"),
                Some(json!({"text": format!("ping {i}")})),
            )
            .await
            .expect("send");
        round.api.push(t.elapsed());
        let id = v["id"].as_str().expect("id").to_owned();
        loop {
            let (got, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("bob got it in 10 s")
                .expect("event stream");
            if got == id {
                round.received.push(at - t);
                break;
            }
        }
        let Some(sent_rx) = sent_rx.as_deref_mut() else { continue };
        while let Ok(Some((got, at))) =
            tokio::time::timeout(Duration::from_secs(10), sent_rx.recv()).await
        {
            if got == id {
                round.sent.push(at - t);
                break;
            }
        }
    }
    round
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn latency_row(name: &str, mut lat: Vec<Duration>) {
    lat.sort();
    println!(
        "| {name} | {} | {} | {} | {} | {} |",
        lat.len(),
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.9)),
        ms(percentile(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
    );
}

/// The relay alone: A enqueues to B, who holds a `Wait` open; time until B's wait returns.
async fn relay_push_latency(
    relay: &RelayProcess,
    n: usize,
    pause: Duration,
    seed: u8,
) -> Vec<Duration> {
    let (a, b) = (Device::new(seed), Device::new(seed + 1));
    let ca = register(relay, &a, &format!("push{seed}")).await;
    let cb = register(relay, &b, &format!("push{}", seed + 1)).await;
    let mut lat = Vec::with_capacity(n);
    let mut after = None;
    for i in 0..n {
        let wait = Request::Wait { after, max: 16, timeout_ms: 10_000 };
        let waiter = {
            let frame = chitchat_proto::wire::encode_frame(&wait).expect("frame");
            let cb = &cb;
            async move { cb.call_raw(frame).await }
        };
        let envelope =
            SealedEnvelope { recipient: b.id(), enc: [1; 32], ciphertext: vec![i as u8; 300] };
        let send = async {
            // Let the wait reach the relay first, as a node's standing wait would have.
            tokio::time::sleep(pause.max(Duration::from_millis(1))).await;
            let t = Instant::now();
            let r = ca.call(&Request::Enqueue { envelope }).await.expect("enqueue");
            assert!(matches!(r, Response::Enqueued { .. }), "{r:?}");
            t
        };
        let (got, t) = tokio::join!(waiter, send);
        lat.push(t.elapsed());
        let resp: Response =
            chitchat_proto::wire::decode_frame(&got.expect("wait")).expect("decode");
        let Response::Items { items, .. } = resp else { panic!("{resp:?}") };
        after = items.last().map(|i| i.id).or(after);
    }
    lat
}

/// The relay alone: fetch and acknowledge `n` waiting items.
async fn relay_drain(relay: &RelayProcess, n: usize) -> Duration {
    let (a, b) = (Device::new(71), Device::new(72));
    let ca = register(relay, &a, "draina").await;
    let cb = register(relay, &b, "drainb").await;
    for chunk in (0..n).collect::<Vec<_>>().chunks(256) {
        let envelopes = chunk
            .iter()
            .map(|i| SealedEnvelope {
                recipient: b.id(),
                enc: [1; 32],
                ciphertext: vec![*i as u8; 300],
            })
            .collect();
        ca.call(&Request::EnqueueBatch { envelopes }).await.expect("batch");
    }
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let r = cb.call(&Request::Fetch { after: None, max: 1024 }).await.expect("fetch");
        let Response::Items { items, .. } = r else { panic!("{r:?}") };
        got += items.len();
        let ids = items.iter().map(|i| i.id).collect();
        cb.call(&Request::Ack { ids }).await.expect("ack");
    }
    start.elapsed()
}

/// One redb commit with fsync (`Durability::Immediate`), a small write: the floor of every
/// durable step on this disk. A message crosses two on its way (the sender's commit before its
/// ciphertext leaves, the relay's before it hands it on).
fn raw_commit_latency(dir: &std::path::Path, n: usize, pause: Duration) -> Vec<Duration> {
    const T: redb::TableDefinition<'_, u64, &[u8]> = redb::TableDefinition::new("t");
    let db =
        redb::Database::create(dir.join(format!("raw-{}.redb", pause.as_millis()))).expect("db");
    let record = vec![7u8; 600];
    (0..n as u64)
        .map(|i| {
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
            let t = Instant::now();
            let mut w = db.begin_write().expect("write");
            w.set_durability(redb::Durability::Immediate).expect("durability");
            w.open_table(T).expect("table").insert(i, record.as_slice()).expect("insert");
            w.commit().expect("commit");
            t.elapsed()
        })
        .collect()
}

/// The ids of a node's events of one type in a channel, with when they came.
fn watch(
    node: &NodeProcess,
    channel: &str,
    kind: &'static str,
) -> mpsc::UnboundedReceiver<(String, Instant)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let api = node.api().clone();
    let channel = channel.to_owned();
    tokio::spawn(async move {
        let _ = api
            .events(Some(&channel), |e| {
                if e["type"] == kind {
                    let id = e["id"].as_str().unwrap_or_default().to_owned();
                    let _ = tx.send((id, Instant::now()));
                }
                true
            })
            .await;
    });
    rx
}

/// Waits until Alice has a direct connection to Bob.
async fn wait_direct(alice: &NodeProcess, bob: &NodeProcess) {
    let bob_id = bob.json("GET", "/v1/network", None).await.expect("network")["peer_id"].clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = alice.json("GET", "/v1/network", None).await.expect("network");
        let direct = v["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["peer_id"] == bob_id && p["direct"] == true));
        if direct {
            return;
        }
        assert!(Instant::now() < deadline, "alice and bob never connected directly: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stored(node: &NodeProcess, channel: &str) -> u64 {
    node.json("GET", &format!("/v1/channels/{channel}"), None)
        .await
        .ok()
        .and_then(|v| v["messages"].as_u64())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (pings, backlog) = if quick { (200, 2_000) } else { (2_000, 10_000) };
    // The backlog is over the relay's default inbox quota (10,000 items) and sender rate
    // (6,000 a minute): an operator expecting such backlogs raises them.
    let relay = RelayProcess::start(
        |c| {
            assert!(c.contains("max_items = 10000") && c.contains("sender_per_minute = 6000"));
            c.replace("max_items = 10000", "max_items = 100000")
                .replace("sender_per_minute = 6000", "sender_per_minute = 100000")
        },
        &[],
    )
    .expect("relay");
    let mut alice = NodeProcess::start(&[]).expect("alice");
    let mut bob = NodeProcess::start(&[]).expect("bob");
    alice.register(&relay, "alice").await.expect("alice");
    bob.register(&relay, "bob").await.expect("bob");
    let v =
        alice.json("POST", "/v1/channels", Some(json!({"name": "bench"}))).await.expect("create");
    let channel = v["id"].as_str().expect("id").to_owned();
    alice
        .json(
            "POST",
            &format!("/v1/channels/{channel}/invite"),
            Some(json!({"address": "bob@localhost"})),
        )
        .await
        .expect("invite");
    while stored(&bob, &channel).await == 0 {
        alice
            .json(
                "POST",
                &format!("/v1/channels/{channel}/messages"),
                Some(json!({"text": "hello"})),
            )
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Latency: Alice's API call to Bob's event, and to her own `sent` event (when the relay had
    // the message in Bob's inbox).
    let mut rx = watch(&bob, &channel, "message");
    let mut sent_rx = watch(&alice, &channel, "sent");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One message at a time, each sent once the previous one is settled on both nodes (the
    // receiver commits after showing a message, the sender records `sent` after the relay's
    // answer): the latency of a message alone. Then back to back, where each message's
    // sending overlaps the previous one's tail work (both nodes' fsyncs on one disk).
    let paced = ping_round(&alice, &channel, &mut rx, Some(&mut sent_rx), pings, PACE).await;
    let back_to_back =
        ping_round(&alice, &channel, &mut rx, Some(&mut sent_rx), pings, Duration::ZERO).await;
    // The same with `send.commit_first`: each message leaves only after its commit (as every
    // message did before sends left during their commit).
    alice.stop().expect("alice stops");
    alice.restart_with(&[("CHITCHAT_SEND_COMMIT_FIRST", "true")]).expect("alice, commit first");
    let mut sent_rx = watch(&alice, &channel, "sent");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Warm-up: the link to the relay comes up with the first message.
    ping_round(&alice, &channel, &mut rx, Some(&mut sent_rx), 5, PACE).await;
    let commit_first =
        ping_round(&alice, &channel, &mut rx, Some(&mut sent_rx), pings, Duration::ZERO).await;
    let commit_first_paced =
        ping_round(&alice, &channel, &mut rx, Some(&mut sent_rx), pings, PACE).await;
    alice.stop().expect("alice stops");
    alice.restart().expect("alice back");

    // Direct: Alice and Bob connected to each other (they found each other at the relay), the
    // relay frozen: only gossip over their own connection carries a message.
    wait_direct(&alice, &bob).await;
    relay.pause().expect("SIGSTOP");
    let direct = ping_round(&alice, &channel, &mut rx, None, pings, PACE).await;
    relay.resume().expect("SIGCONT");
    // Through the relay: both relay-only (gossip forwarded by the relay, or the inbox, whichever
    // is first).
    let relay_only = [("CHITCHAT_NETWORK_RELAY_ONLY", "true")];
    alice.stop().expect("alice stops");
    bob.stop().expect("bob stops");
    bob.restart_with(&relay_only).expect("bob, relay-only");
    alice.restart_with(&relay_only).expect("alice, relay-only");
    let mut rx = watch(&bob, &channel, "message");
    tokio::time::sleep(Duration::from_millis(300)).await;
    ping_round(&alice, &channel, &mut rx, None, 5, PACE).await;
    let through_relay = ping_round(&alice, &channel, &mut rx, None, pings, PACE).await;
    alice.stop().expect("alice stops");
    bob.stop().expect("bob stops");
    bob.restart().expect("bob back");
    alice.restart().expect("alice back");
    let relay_lat = relay_push_latency(&relay, pings, Duration::ZERO, 61).await;
    let relay_paced = relay_push_latency(&relay, pings, PACE, 63).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let fsync_lat = raw_commit_latency(tmp.path(), pings, Duration::ZERO);
    let fsync_paced = raw_commit_latency(tmp.path(), pings, PACE);
    let pace = PACE.as_millis();
    println!("\n## Latency (loopback, one message at a time)\n");
    println!(
        "Back to back: the next message goes as soon as the previous one arrived. {pace} ms \
         apart: the machine idles between messages, and on this VM an fsync or a wake-up from \
         idle costs more (compare the baselines of the two regimes).\n"
    );
    println!("| path | messages | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    latency_row("raw redb: one commit with fsync, back to back (baseline)", fsync_lat);
    latency_row("relay alone: enqueue → waiting fetch returns, 1 ms apart (baseline)", relay_lat);
    latency_row("node: API send answered (durable, `sending`), back to back", back_to_back.api);
    latency_row("node → relay: API send → sender's `sent` event, back to back", back_to_back.sent);
    latency_row(
        "**node → relay → node: API send → receiver's event, back to back**",
        back_to_back.received,
    );
    latency_row(
        "node → relay → node, `commit_first` (leaves after its commit), back to back",
        commit_first.received,
    );
    latency_row(
        &format!("raw redb: one commit with fsync, {pace} ms apart (baseline)"),
        fsync_paced,
    );
    latency_row(
        &format!("relay alone: enqueue → waiting fetch returns, {pace} ms apart (baseline)"),
        relay_paced,
    );
    latency_row(&format!("node: API send answered, {pace} ms apart"), paced.api);
    latency_row(
        &format!("node → relay → node: API send → receiver's event, {pace} ms apart"),
        paced.received,
    );
    latency_row(
        &format!("node → relay → node, `commit_first`, {pace} ms apart"),
        commit_first_paced.received,
    );

    println!("\n## Direct vs through the relay (issue #13), {pace} ms apart\n");
    println!("| path | messages | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    latency_row("**direct: gossip between the two nodes, relay frozen**", direct.received);
    latency_row(
        "through the relay: both nodes relay-only (relay's gossip or the inbox)",
        through_relay.received,
    );

    // Catch-up: Bob is offline while Alice sends the backlog.
    bob.kill9();
    let sends = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let api = alice.api().clone();
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..backlog).step_by(8) {
                api.json(
                    "POST",
                    &format!("/v1/channels/{channel}/messages"),
                    Some(json!({"text": format!("backlog {i}")})),
                )
                .await
                .expect("send");
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    let before = stored(&alice, &channel).await;
    // Wait until Alice's outbox is empty: every message is in Bob's inbox.
    loop {
        let v = alice
            .json("GET", &format!("/v1/channels/{channel}/messages?limit=1"), None)
            .await
            .expect("m");
        if v["messages"][0]["status"] == "sent" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let send_time = sends.elapsed();
    let want = before;
    let started = Instant::now();
    bob.restart().expect("bob back");
    let up = started.elapsed();
    while stored(&bob, &channel).await < want {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let caught_up = started.elapsed();
    let drain = relay_drain(&relay, backlog).await;
    println!("\n## Catch-up of {backlog} missed messages\n");
    println!("| what | ms |");
    println!("|---|---|");
    println!("| relay alone: fetch + ack {backlog} items (baseline) | {} |", ms(drain));
    println!("| node: daemon start (process spawn → API listening) | {} |", ms(up));
    println!("| node: daemon start → all {backlog} decrypted and stored | {} |", ms(caught_up));
    println!("| node: catch-up after the daemon is up | {} |", ms(caught_up - up));
    println!(
        "| (Alice sending them: {} messages/s through the API, 8 at a time) | {} |",
        (backlog as f64 / send_time.as_secs_f64()).round(),
        ms(send_time)
    );

    // Idle memory.
    let fresh = NodeProcess::start(&[]).expect("fresh");
    fresh.register(&relay, "idle").await.expect("register");
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("\n## Idle RSS (3 s after the last activity)\n");
    println!("| node | MiB |");
    println!("|---|---|");
    for (name, node) in [
        ("registered, no channels", &fresh),
        ("Bob, after catching up", &bob),
        ("Alice, after sending", &alice),
    ] {
        let kib = node.pid().map_or(0, rss_kib);
        println!("| {name} | {:.1} |", kib as f64 / 1024.0);
    }
}

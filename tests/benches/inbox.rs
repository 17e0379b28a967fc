//! Relay inbox throughput: durable enqueue, then fetch + ack, against raw redb measured in the
//! same run on the same disk.
//!
//! Run: `cargo bench -p chitchat-tests --bench inbox` (add `-- --quick` for a short run).
//!
//! Rows:
//! - `raw redb`: batched inserts of inbox-sized records, one fsync'd transaction per batch: the
//!   ceiling for anything durable on this disk.
//! - `store enqueue`: the relay's store with N concurrent writers; each write is acknowledged
//!   only after its batch committed with fsync (group commit), so N bounds the batch size.
//! - `store fetch+ack`: one recipient draining its inbox in pages, acknowledging each page.
//! - `relay over libp2p`: the real relay binary, N clients each on its own TCP connection,
//!   one Enqueue request per message, each answered only once durable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat_proto::identity::{DirBody, Profile};
use chitchat_proto::inbox::SealedEnvelope;
use chitchat_proto::wire::{Request, Response};
use chitchat_proto::{DeviceId, Dir, SecretKey, Timestamp};
use chitchat_relay::store::{InboxQuota, Store, Write, Written};
use chitchat_tests::{Client, Device, RelayProcess};
use redb::{Database, Durability, TableDefinition};

const PAYLOAD: usize = 200;
const NOW: Timestamp = Timestamp(1_700_000_000_000);
const QUOTA: InboxQuota = InboxQuota { max_items: u64::MAX, max_bytes: u64::MAX };

fn envelope(to: DeviceId, i: u64) -> SealedEnvelope {
    let mut ciphertext = vec![0u8; PAYLOAD];
    ciphertext[..8].copy_from_slice(&i.to_le_bytes());
    SealedEnvelope { recipient: to, enc: [7; 32], ciphertext }
}

/// Waits for every task and returns all their latencies, sorted.
async fn join_latencies(tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("task"));
    }
    latencies.sort();
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Row {
    name: String,
    messages: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

fn raw_redb(dir: &std::path::Path, messages: u64, batch: u64) -> Row {
    const T: TableDefinition<'_, ([u8; 32], u64), &[u8]> = TableDefinition::new("inbox");
    let db = Database::create(dir.join("raw.redb")).expect("db");
    let record = vec![1u8; PAYLOAD + 80]; // an inbox record: envelope plus metadata
    let start = Instant::now();
    let mut i = 0;
    while i < messages {
        let mut w = db.begin_write().expect("write");
        w.set_durability(Durability::Immediate).expect("durability");
        {
            let mut t = w.open_table(T).expect("table");
            for _ in 0..batch.min(messages - i) {
                t.insert(([9; 32], i), record.as_slice()).expect("insert");
                i += 1;
            }
        }
        w.commit().expect("commit");
    }
    Row {
        name: format!("raw redb (batches of {batch})"),
        messages,
        elapsed: start.elapsed(),
        latencies: vec![],
    }
}

fn recipient() -> (SecretKey, Dir) {
    let key = SecretKey::from_seed([2; 32]);
    let dir = Dir::sign(
        &key,
        DirBody {
            device: DeviceId(key.public()),
            seq: 1,
            inbox_key: [0; 32],
            linked: Default::default(),
            sponsorships: vec![],
            profile: Profile::default(),
            revoked: false,
            issued: NOW,
        },
    );
    (key, dir)
}

async fn store_enqueue(store: &Store, to: DeviceId, writers: u64, per_writer: u64) -> Row {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_writer as usize);
            for i in 0..per_writer {
                let t = Instant::now();
                let env = envelope(to, w * per_writer + i);
                let sender = DeviceId(chitchat_proto::PublicKey([w as u8; 32]));
                let r = store
                    .write(Write::Enqueue { sender, envelope: env, now: NOW, quota: QUOTA })
                    .await;
                assert!(matches!(r, Ok(Written::Enqueued { .. })), "{r:?}");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let latencies = join_latencies(tasks).await;
    let elapsed = start.elapsed();
    Row {
        name: format!("store enqueue ({writers} writers)"),
        messages: writers * per_writer,
        elapsed,
        latencies,
    }
}

async fn store_drain(store: &Store, to: DeviceId) -> Row {
    let start = Instant::now();
    let mut messages = 0;
    let mut latencies = Vec::new();
    loop {
        let t = Instant::now();
        let (items, _) =
            store.fetch(&to, None, 1024, chitchat_proto::wire::MAX_FETCH_BYTES).expect("fetch");
        if items.is_empty() {
            break;
        }
        messages += items.len() as u64;
        let ids = items.iter().map(|i| i.id).collect();
        store.write(Write::Ack { device: to, ids }).await.expect("ack");
        latencies.push(t.elapsed());
    }
    latencies.sort();
    Row {
        name: "store fetch+ack (pages of 1024)".into(),
        messages,
        elapsed: start.elapsed(),
        latencies,
    }
}

async fn network_relay() -> (RelayProcess, Vec<Arc<Client>>, Device) {
    let relay = RelayProcess::start(
        |c| {
            c.replace("sender_per_minute = 6000", "sender_per_minute = 100000000")
                .replace("max_items = 10000", "max_items = 100000000")
                .replace("max_bytes = 67108864", "max_bytes = 100000000000")
        },
        &[("CHITCHAT_RELAY_OPEN_REGISTRATION", "true")],
    )
    .expect("relay");
    let bob = Device::new(2);
    let mut conns = Vec::new();
    for k in 0..=64u8 {
        let d = if k == 0 { Device::new(2) } else { Device::new(100 + k) };
        let c = Client::connect(relay.tcp_addr(), relay.peer_id()).await.expect("connect");
        c.authenticate(&d.key, "localhost").await.expect("auth");
        let reg = Request::Register {
            token: None,
            local_name: format!("u{k}"),
            dir: d.dir(1, vec![], NOW),
        };
        assert!(matches!(c.call(&reg).await.expect("register"), Response::Registered { .. }));
        conns.push(Arc::new(c));
    }
    (relay, conns, bob)
}

/// `clients` senders (connections 1..) each send `per_client` messages to Bob, `batch` per request.
async fn over_network(
    conns: &[Arc<Client>],
    to: DeviceId,
    clients: u64,
    per_client: u64,
    batch: u64,
) -> Row {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (k, c) in conns.iter().skip(1).take(clients as usize).enumerate() {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity((per_client / batch) as usize);
            let mut sent = 0;
            while sent < per_client {
                let n = batch.min(per_client - sent);
                let envelopes: Vec<_> =
                    (0..n).map(|i| envelope(to, k as u64 * per_client + sent + i)).collect();
                let req = if batch == 1 {
                    Request::Enqueue { envelope: envelopes.into_iter().next().expect("one") }
                } else {
                    Request::EnqueueBatch { envelopes }
                };
                let t = Instant::now();
                match c.call(&req).await.expect("enqueue") {
                    Response::Enqueued { .. } => {}
                    Response::EnqueuedBatch(r) => {
                        assert!(
                            r.iter().all(|r| matches!(
                                r,
                                chitchat_proto::wire::EnqueueResult::Enqueued(_)
                            ))
                        )
                    }
                    other => panic!("{other:?}"),
                }
                lat.push(t.elapsed());
                sent += n;
            }
            lat
        }));
    }
    let latencies = join_latencies(tasks).await;
    let elapsed = start.elapsed();
    let how = if batch == 1 { "1 per request".to_owned() } else { format!("batches of {batch}") };
    Row {
        name: format!("libp2p enqueue ({clients} clients, {how})"),
        messages: clients * per_client,
        elapsed,
        latencies,
    }
}

/// Bob drains his inbox over the network: fetch a page, ack it.
async fn drain_network(bob: &Client) -> Row {
    let start = Instant::now();
    let (mut messages, mut latencies) = (0, Vec::new());
    loop {
        let t = Instant::now();
        let Response::Items { items, .. } =
            bob.call(&Request::Fetch { after: None, max: 1024 }).await.expect("fetch")
        else {
            panic!("items")
        };
        if items.is_empty() {
            break;
        }
        messages += items.len() as u64;
        let ids = items.iter().map(|i| i.id).collect();
        assert_eq!(bob.call(&Request::Ack { ids }).await.expect("ack"), Response::Acked);
        latencies.push(t.elapsed());
    }
    latencies.sort();
    Row {
        name: "libp2p fetch+ack (pages of 1024)".into(),
        messages,
        elapsed: start.elapsed(),
        latencies,
    }
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 1 } else { 4 };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rows = Vec::new();

    let raw = raw_redb(dir.path(), 50_000 * scale, 256);
    let baseline = raw.rate();
    rows.push(raw);
    rows.push(raw_redb(dir.path(), 50_000 * scale, 1024));

    let store = Store::open(&dir.path().join("relay.redb"), 1024).expect("store");
    let (_, bob) = recipient();
    let to = bob.device();
    store
        .write(Write::Register {
            token: None,
            open: true,
            local_name: "bob".into(),
            dir: bob,
            now: NOW,
        })
        .await
        .expect("register");
    for writers in [1u64, 64, 256] {
        let per_writer = if writers == 1 { 500 } else { 50_000 * scale / writers };
        rows.push(store_enqueue(&store, to, writers, per_writer).await);
        rows.push(store_drain(&store, to).await);
    }
    let (_relay, conns, bob) = network_relay().await;
    rows.push(over_network(&conns, bob.id(), 64, 100 * scale, 1).await);
    rows.push(drain_network(&conns[0]).await);
    rows.push(over_network(&conns, bob.id(), 16, 3200 * scale, 256).await);
    rows.push(drain_network(&conns[0]).await);

    println!("inbox throughput ({PAYLOAD}-byte payloads; every acknowledged write fsync'd)\n");
    println!(
        "{:<36} {:>9} {:>12} {:>10} {:>10} {:>10}",
        "", "messages", "msgs/s", "vs raw", "p50", "p99"
    );
    for r in &rows {
        let (p50, p99) = (percentile(&r.latencies, 0.5), percentile(&r.latencies, 0.99));
        let lat = |d: Duration| {
            if r.latencies.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2}ms", d.as_secs_f64() * 1e3)
            }
        };
        println!(
            "{:<36} {:>9} {:>12.0} {:>9.0}% {:>10} {:>10}",
            r.name,
            r.messages,
            r.rate(),
            100.0 * r.rate() / baseline,
            lat(p50),
            lat(p99)
        );
    }
    println!("\n(raw redb baseline for 'vs raw': batches of 256)");
}

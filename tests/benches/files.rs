//! Files end to end, on loopback, in release builds of the real binaries: a file sealed by one
//! node, fetched over iroh by another, and read back opened; beside raw iroh-blobs (the same
//! bytes, unencrypted, between two stores in this process) on the same link in the same run,
//! since this machine is shared and noisy. The nodes' resident memory is sampled throughout.
//!
//! Run: `cargo bench -p chitchat-tests --bench files` (1 GiB; `-- --quick` for 256 MiB,
//! `-- --mib N` for N MiB). Three paths: node → node (the sender's device serves the blob),
//! node → relay → node (the sender pins it at its relay, then the member fetches it from there),
//! and the same between two relay-only nodes (the blob in parts over their TCP relay links).
//! `-- --check-rss` exits with an error if any process (node or relay) went over 100 MB: with
//! `--mib 4096`, this is the 4 GiB streaming test (memory stays flat whatever the file's size).
//!
//! Goal (issue #14): at least 70% of raw iroh-blobs' throughput, and a node's RSS during the
//! transfer under 100 MB.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chitchat_blobs::Blobs;
use chitchat_proto::SecretKey;
use chitchat_tests::{NodeProcess, RelayProcess, rss_kib};
use serde_json::{Value, json};

const MIB: f64 = 1024.0 * 1024.0;

/// Writes `len` pseudo-random bytes to `path`, a MiB at a time.
fn write_file(path: &Path, len: u64) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for b in block.chunks_mut(8) {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n]).expect("write");
        left -= n as u64;
    }
    out.flush().expect("flush");
}

/// Samples the RSS of `pids` every 20 ms until stopped; the peak of each, in KiB.
struct Sampler {
    stop: Arc<AtomicBool>,
    peaks: Vec<Arc<AtomicU64>>,
    task: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Vec<Arc<AtomicU64>> = pids.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let task = {
            let (stop, peaks) = (stop.clone(), peaks.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (pid, peak) in pids.iter().zip(&peaks) {
                        peak.fetch_max(rss_kib(*pid), Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Self { stop, peaks, task }
    }

    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.join();
        self.peaks.iter().map(|p| p.load(Ordering::Relaxed)).collect()
    }
}

fn rate(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / MIB / took.as_secs_f64()
}

/// Raw iroh-blobs: the plain file added to one store, fetched by another over loopback.
async fn raw(dir: &Path, plain: &Path, len: u64) -> Duration {
    let loopback = ["127.0.0.1:0".parse().expect("addr")];
    let a = Blobs::open(&dir.join("raw-a"), &SecretKey::from_seed([1; 32]), &loopback)
        .await
        .expect("open");
    let b = Blobs::open(&dir.join("raw-b"), &SecretKey::from_seed([2; 32]), &loopback)
        .await
        .expect("open");
    let hash = a.add_path(plain).await.expect("add");
    let start = Instant::now();
    let moved = b.fetch(&a.provider(), hash).await.expect("fetch");
    let took = start.elapsed();
    assert!(moved >= len, "raw fetch moved {moved} of {len}");
    a.shutdown().await;
    b.shutdown().await;
    took
}

/// One path's numbers: each step's time and the peak RSS of every process sampled, in KiB.
struct Run {
    send: (Duration, Vec<u64>),
    fetch: (Duration, Vec<u64>),
    read: (Duration, Vec<u64>),
}

/// Times `step` while sampling the RSS of `pids`.
async fn timed<T>(
    pids: &[u32],
    step: impl std::future::Future<Output = T>,
) -> (T, Duration, Vec<u64>) {
    let sampler = Sampler::start(pids.to_vec());
    let start = Instant::now();
    let out = step.await;
    let took = start.elapsed();
    (out, took, sampler.finish())
}

/// Alice sends the file in `channel`; Bob fetches it and reads it back opened. `pids`: every
/// process to sample.
async fn transfer(
    alice: &NodeProcess,
    bob: &NodeProcess,
    channel: &str,
    plain: &Path,
    len: u64,
    pids: &[u32],
) -> Run {
    let file = tokio::fs::File::open(plain).await.expect("open");
    let path = format!("/v1/channels/{channel}/files?name=plain.bin");
    let api = alice.api();
    let (sent, send_took, send_peaks) =
        timed(pids, api.upload(&path, "application/octet-stream", file, len, |_| ())).await;
    let sent: Value = sent.expect("send-file");
    let id = sent["id"].as_str().expect("id").to_owned();

    // The message reaches Bob; then the fetch, timed alone.
    let deadline = Instant::now() + Duration::from_secs(60);
    while bob.json("GET", &format!("/v1/messages/{id}"), None).await.is_err() {
        assert!(Instant::now() < deadline, "the file message never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fetch = format!("/v1/messages/{id}/fetch");
    let (fetched, fetch_took, fetch_peaks) = timed(pids, bob.json("POST", &fetch, None)).await;
    assert_eq!(fetched.expect("fetch")["fetched"], json!(true));

    // Read back opened (to a sink).
    let mut sink = tokio::io::sink();
    let file = format!("/v1/messages/{id}/file");
    let bob_api = bob.api();
    let (read, read_took, read_peaks) =
        timed(pids, bob_api.download(&file, &mut sink, |_| ())).await;
    assert_eq!(read.expect("read"), len);
    Run {
        send: (send_took, send_peaks),
        fetch: (fetch_took, fetch_peaks),
        read: (read_took, read_peaks),
    }
}

/// Node → node: a relay-less channel; Bob fetches from Alice's device.
async fn node_to_node(plain: &Path, len: u64) -> Run {
    let bob = NodeProcess::start(&[("CHITCHAT_PROFILE_NAME", "bob")]).expect("bob");
    let network = bob.json("GET", "/v1/network", None).await.expect("network");
    let bob_addr = network["listening"][0].as_str().expect("bob listens").to_owned();
    let alice = NodeProcess::start(&[
        ("CHITCHAT_PROFILE_NAME", "alice"),
        ("CHITCHAT_NETWORK_PEERS", &bob_addr),
    ])
    .expect("alice");
    let bob_dev = bob.json("GET", "/v1/status", None).await.expect("status")["device"]
        .as_str()
        .expect("device")
        .to_owned();
    let channel = alice.cli(&["channel", "create", "files", "--lan"]).expect("create");
    let channel = channel.trim().to_owned();
    alice.cli(&["invite", "files", &bob_dev]).expect("invite");
    bob.wait_joined(&channel, Duration::from_secs(60)).await.expect("joined");
    let pids = [alice.pid().expect("alice"), bob.pid().expect("bob")];
    transfer(&alice, &bob, &channel, plain, len, &pids).await
}

/// Node → relay → node: Alice pins the file at the relay (a push) before its message goes; Bob
/// fetches it from the relay (his first provider). With `relay_only`, both nodes are
/// relay-only: the blob goes in parts over their TCP links to the relay, not over iroh.
async fn through_relay(plain: &Path, len: u64, relay_only: bool) -> Run {
    let limit = format!("max_file_bytes = {}", len + (64 << 20));
    let quota = format!("quota_bytes_per_user = {}", len + (128 << 20));
    let relay = RelayProcess::start(
        |c| {
            c.replace("max_file_bytes = 2147483648", &limit)
                .replace("quota_bytes_per_user = 10737418240", &quota)
        },
        &[],
    )
    .expect("relay");
    let env: &[(&str, &str)] =
        if relay_only { &[("CHITCHAT_NETWORK_RELAY_ONLY", "true")] } else { &[] };
    let alice = NodeProcess::start(env).expect("alice");
    let bob = NodeProcess::start(env).expect("bob");
    alice.register(&relay, "alice").await.expect("register alice");
    bob.register(&relay, "bob").await.expect("register bob");
    let channel = alice.cli(&["channel", "create", "files"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "files", "bob@localhost"]).expect("invite");
    bob.wait_joined(&channel, Duration::from_secs(60)).await.expect("joined");
    let pids = [alice.pid().expect("alice"), bob.pid().expect("bob"), relay.pid().expect("relay")];
    transfer(&alice, &bob, &channel, plain, len, &pids).await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let check_rss = args.iter().any(|a| a == "--check-rss");
    let mib: Option<u64> =
        args.iter().position(|a| a == "--mib").and_then(|i| args.get(i + 1)?.parse().ok());
    let len: u64 = match mib {
        Some(m) => m << 20,
        None if quick => 256 << 20,
        None => 1 << 30,
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let plain = tmp.path().join("plain.bin");
    write_file(&plain, len);

    let raw_took = {
        let dir = tempfile::tempdir_in(tmp.path()).expect("raw dir");
        raw(dir.path(), &plain, len).await
    };
    let direct = node_to_node(&plain, len).await;
    let relayed = through_relay(&plain, len, false).await;
    let linked = through_relay(&plain, len, true).await;
    let paths = [
        ("node → node", &direct),
        ("node → relay → node", &relayed),
        ("relay-only → relay → relay-only (parts over TCP)", &linked),
    ];

    let mib = |kib: u64| kib as f64 / 1024.0;
    let peaks =
        |p: &[u64]| p.iter().map(|k| format!("{:.1}", mib(*k))).collect::<Vec<_>>().join(" / ");
    println!("files, {} MiB, on loopback (2 worker threads in this process)", len >> 20);
    println!("| step | time | MiB/s | RSS peak, MiB (sender / member [/ relay]) |");
    println!("|---|---|---|---|");
    println!(
        "| raw iroh-blobs fetch, unencrypted (baseline) | {:.2} s | {:.0} | - |",
        raw_took.as_secs_f64(),
        rate(len, raw_took)
    );
    for (path, run) in paths {
        for (step, (took, p)) in [
            ("send-file: stream, seal, store (and pin at the relay)", &run.send),
            ("fetch, sealed blob, first and last chunks opened", &run.fetch),
            ("read back opened (member's API)", &run.read),
        ] {
            println!(
                "| {path}: {step} | {:.2} s | {:.0} | {} |",
                took.as_secs_f64(),
                rate(len, *took),
                peaks(p)
            );
        }
    }
    let all = paths
        .iter()
        .map(|(_, r)| r)
        .flat_map(|r| [&r.send.1, &r.fetch.1, &r.read.1])
        .flatten()
        .copied()
        .max()
        .unwrap_or(0);
    for (path, run) in paths {
        println!(
            "{path} fetch throughput: {:.0}% of raw iroh-blobs (goal ≥ 70%)",
            100.0 * raw_took.as_secs_f64() / run.fetch.0.as_secs_f64()
        );
    }
    println!("peak RSS of any process: {:.1} MiB (goal < 100 MB)", mib(all));
    if check_rss && all * 1024 >= 100_000_000 {
        eprintln!("FAILED: a process's RSS reached {:.1} MiB moving {} MiB", mib(all), len >> 20);
        std::process::exit(1);
    }
}

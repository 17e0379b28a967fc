//! Files end to end, on loopback, in release builds of the real binaries: a file sealed by one
//! node, fetched over iroh by another, and read back opened; beside raw iroh-blobs (the same
//! bytes, unencrypted, between two stores in this process) on the same link in the same run,
//! since this machine is shared and noisy. The nodes' resident memory is sampled throughout.
//!
//! Run: `cargo bench -p chitchat-tests --bench files` (1 GiB; `-- --quick` for 256 MiB).
//!
//! Goal (issue #14): at least 70% of raw iroh-blobs' throughput, and a node's RSS during the
//! transfer under 100 MB. Node → relay → node waits for relays as providers.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chitchat_blobs::Blobs;
use chitchat_proto::SecretKey;
use chitchat_tests::{NodeProcess, rss_kib};
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let len: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let tmp = tempfile::tempdir().expect("tmp");
    let plain = tmp.path().join("plain.bin");
    write_file(&plain, len);

    let raw_took = raw(tmp.path(), &plain, len).await;

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
    let pids = vec![alice.pid().expect("alice"), bob.pid().expect("bob")];

    // Send: the file streamed to Alice's daemon, sealed, kept.
    let sampler = Sampler::start(pids.clone());
    let start = Instant::now();
    let file = tokio::fs::File::open(&plain).await.expect("open");
    let path = format!("/v1/channels/{channel}/files?name=plain.bin");
    let sent: Value = alice
        .api()
        .upload(&path, "application/octet-stream", file, len, |_| ())
        .await
        .expect("send-file");
    let send_took = start.elapsed();
    let send_peaks = sampler.finish();
    let id = sent["id"].as_str().expect("id").to_owned();

    // The message reaches Bob by gossip; then the fetch, timed alone.
    let deadline = Instant::now() + Duration::from_secs(60);
    while bob.json("GET", &format!("/v1/messages/{id}"), None).await.is_err() {
        assert!(Instant::now() < deadline, "the file message never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sampler = Sampler::start(pids.clone());
    let start = Instant::now();
    let fetched = bob.json("POST", &format!("/v1/messages/{id}/fetch"), None).await;
    let fetch_took = start.elapsed();
    let fetch_peaks = sampler.finish();
    assert_eq!(fetched.expect("fetch")["fetched"], json!(true));

    // Read back opened (to a sink).
    let sampler = Sampler::start(pids.clone());
    let start = Instant::now();
    let mut sink = tokio::io::sink();
    let read = bob
        .api()
        .download(&format!("/v1/messages/{id}/file"), &mut sink, |_| ())
        .await
        .expect("read");
    let read_took = start.elapsed();
    let read_peaks = sampler.finish();
    assert_eq!(read, len);

    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("files, {} MiB, on loopback (2 worker threads in this process)", len >> 20);
    println!("| step | time | MiB/s | RSS peak alice / bob |");
    println!("|---|---|---|---|");
    println!(
        "| raw iroh-blobs fetch, unencrypted (baseline) | {:.2} s | {:.0} | - |",
        raw_took.as_secs_f64(),
        rate(len, raw_took)
    );
    println!(
        "| send-file: stream, seal, store (alice) | {:.2} s | {:.0} | {:.1} / {:.1} MiB |",
        send_took.as_secs_f64(),
        rate(len, send_took),
        mib(send_peaks[0]),
        mib(send_peaks[1])
    );
    println!(
        "| fetch node → node, sealed blob, every chunk checked | {:.2} s | {:.0} | {:.1} / {:.1} MiB |",
        fetch_took.as_secs_f64(),
        rate(len, fetch_took),
        mib(fetch_peaks[0]),
        mib(fetch_peaks[1])
    );
    println!(
        "| read back opened (bob's API) | {:.2} s | {:.0} | {:.1} / {:.1} MiB |",
        read_took.as_secs_f64(),
        rate(len, read_took),
        mib(read_peaks[0]),
        mib(read_peaks[1])
    );
    println!(
        "fetch throughput: {:.0}% of raw iroh-blobs (goal ≥ 70%); peak RSS {:.1} MiB (goal < 100 MB)",
        100.0 * raw_took.as_secs_f64() / fetch_took.as_secs_f64(),
        mib(*send_peaks.iter().chain(&fetch_peaks).chain(&read_peaks).max().unwrap_or(&0))
    );
}

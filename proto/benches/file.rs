//! File encryption throughput, beside the baselines of the same run: a plain copy of the bytes,
//! and BLAKE3 over them (what iroh-blobs pays per byte to address and verify a blob anyway).
//!
//! Run: `cargo bench -p chitchat-proto --bench file` (add `-- --quick` for 64 MiB instead of
//! 512 MiB). One thread, in memory: sealing and opening stream a chunk at a time, so the file's
//! size does not change the memory used.

use std::io::{Read, Write};
use std::time::Instant;

use chitchat_proto::file::{FileKey, open_to, seal_to, sealed_len};

/// Reads `len` pseudo-random bytes without holding them (a counter mixed with a multiplier).
struct Source {
    left: u64,
    state: u64,
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        for b in &mut buf[..n] {
            self.state = self.state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            *b = (self.state >> 56) as u8;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Counts what is written.
#[derive(Default)]
struct Count(u64);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / secs
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let len: u64 = if quick { 64 << 20 } else { 512 << 20 };
    let key = FileKey::from_bytes([9; 32]);
    // The source's own cost, then each step over it.
    let source = || Source { left: len, state: 1 };
    let t = Instant::now();
    let copied = std::io::copy(&mut source(), &mut Count::default()).expect("copy");
    let copy = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut source(), &mut hasher).expect("hash");
    let _ = hasher.finalize();
    let hash = t.elapsed().as_secs_f64();
    let mut blob = Vec::with_capacity(usize::try_from(sealed_len(len)).unwrap_or(0));
    let t = Instant::now();
    seal_to(&key, source(), &mut blob).expect("seal");
    let seal = t.elapsed().as_secs_f64();
    let t = Instant::now();
    open_to(&key, len, &blob[..], Count::default()).expect("open");
    let open = t.elapsed().as_secs_f64();
    assert_eq!(copied, len);

    println!("file encryption, {} MiB, one thread", len >> 20);
    println!("| step | seconds | MiB/s |");
    println!("|---|---|---|");
    for (name, secs) in [
        ("copy (baseline)", copy),
        ("BLAKE3 (baseline)", hash),
        ("seal (ChaCha20-Poly1305 STREAM)", seal),
        ("open", open),
    ] {
        println!("| {name} | {secs:.3} | {:.0} |", mib_s(len, secs));
    }
    println!("blob overhead: {} bytes", sealed_len(len) - len);
}

//! The orderer's state at scale: what a channel costs a relay, and how long a snapshot of many
//! channels takes to write and to load back (what a relay's restart costs).
//!
//! Run: `cargo bench -p chitchat-proto --bench orderer` (add `-- --quick` for 1,000 channels
//! only). Each channel has one member (its creator), as most channels start. Baseline: decoding
//! the same snapshot bytes without restoring the public groups, so the table shows what loading
//! openmls' state adds to plain deserialization.

use std::time::Instant;

use chitchat_proto::channel::{AdminPolicy, Channel, ChannelConfig, Identity, PublicState};
use chitchat_proto::codec::{decode, encode};
use chitchat_proto::ordering::{
    ChannelId, OrderCommand, Orderer, OrderingLimits, OrderingState, StoragePairs, Verdict,
};
use chitchat_proto::{RelayId, SecretKey};
use openmls_rust_crypto::OpenMlsRustCrypto;

type Snapshot = (OrderingState, Vec<(ChannelId, StoragePairs)>);

/// This process's resident memory, in bytes (Linux; 0 elsewhere).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

fn states(n: u32) -> Vec<(ChannelId, PublicState)> {
    let relay =
        RelayId { host: "relay.test".into(), key: SecretKey::from_seed([200; 32]).public() };
    let provider = OpenMlsRustCrypto::default();
    let me = Identity::new(&SecretKey::from_seed([1; 32]));
    (0..n)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_le_bytes());
            let config = ChannelConfig {
                mime: chitchat_proto::chat::MIME.into(),
                name: format!("channel {i}"),
                relays: vec![relay.clone()],
                admins: AdminPolicy::AnyMember,
                creator: me.device(),
            };
            let channel = Channel::create(&provider, &me, ChannelId(id), config).expect("create");
            (ChannelId(id), channel.public_state(&provider, &me).expect("export"))
        })
        .collect()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[u32] = if quick { &[1_000] } else { &[1_000, 10_000] };
    println!(
        "| channels | state bytes | per channel | RSS per channel | open µs/ch | snapshot MB | \
         encode ms | decode only ms | restore ms | restore µs/ch |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in sizes {
        let before = rss();
        let states = states(n);
        let mut orderer = Orderer::new(OrderingLimits::default());
        let t = Instant::now();
        for (i, (channel, state)) in states.into_iter().enumerate() {
            let (verdict, _) = orderer.apply(i as u64, OrderCommand::Open { channel, state });
            assert!(matches!(verdict, Verdict::Ordering(_)), "{verdict:?}");
        }
        let open = t.elapsed();
        // The states were moved into the orderer; what the process grew by is the orderer's
        // (an upper bound: the allocator keeps some freed memory).
        let resident = rss().saturating_sub(before) / u64::from(n);
        let bytes = orderer.state_bytes();
        let t = Instant::now();
        let snapshot = encode(&orderer.export());
        let encode_time = t.elapsed();
        let t = Instant::now();
        let decoded: Snapshot = decode(&snapshot, usize::MAX).expect("decode");
        let decode_time = t.elapsed();
        drop(decoded);
        let t = Instant::now();
        let (state, channels): Snapshot = decode(&snapshot, usize::MAX).expect("decode");
        let restored = Orderer::restore(state, channels, Vec::new()).expect("restore");
        let restore = t.elapsed();
        assert_eq!(restored.state_bytes(), bytes);
        println!(
            "| {n} | {bytes} | {} | {resident} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} |",
            bytes / u64::from(n),
            open.as_secs_f64() * 1e6 / f64::from(n),
            snapshot.len() as f64 / 1e6,
            encode_time.as_secs_f64() * 1e3,
            decode_time.as_secs_f64() * 1e3,
            restore.as_secs_f64() * 1e3,
            restore.as_secs_f64() * 1e6 / f64::from(n),
        );
    }
}

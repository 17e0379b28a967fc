//! The orderer's state at scale: what a channel costs a relay, and how long a snapshot of many
//! channels takes to write and to load back (what a relay's restart costs).
//!
//! Run: `cargo bench -p chitchat-proto --bench orderer` (add `-- --quick` for 1,000 channels
//! only). Each channel has one member (its creator), as most channels start. Baseline: decoding
//! the same snapshot bytes without restoring the public groups, so the table shows what loading
//! openmls' state adds to plain deserialization.
//!
//! Then the CPU a certified commit costs, step by step, in a channel ordered by three relays
//! (one thread, no I/O): what bounds the certified commits per second a machine can order (see
//! the federation benchmark in `tests/benches`). Baseline: one Ed25519 signature.

use std::time::Instant;

use chitchat_proto::channel::{
    AcceptAll, AdminPolicy, Change, Channel, ChannelConfig, Identity, PublicState,
};
use chitchat_proto::codec::{Bytes, decode, encode};
use chitchat_proto::ordering::{
    CertSignature, ChannelId, CommitHash, CommitRef, EpochCert, EpochCertBody, OrderCommand,
    Orderer, OrderingLimits, OrderingState, Outcome, StoragePairs, Verdict,
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
    commit_costs(quick);
}

/// Microseconds per call of `f`, over `n` calls.
fn per_call(n: u32, mut f: impl FnMut(u32)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

/// What one certified commit (a member's self-update) costs in CPU, step by step, in a channel
/// of one member ordered by three relays.
fn commit_costs(quick: bool) {
    let n: u32 = if quick { 200 } else { 1_000 };
    let keys: Vec<SecretKey> = (0..3u8).map(|i| SecretKey::from_seed([210 + i; 32])).collect();
    let relays: Vec<RelayId> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| RelayId { host: format!("relay{i}.test"), key: k.public() })
        .collect();
    let provider = OpenMlsRustCrypto::default();
    let me = Identity::new(&SecretKey::from_seed([2; 32]));
    let id = ChannelId([9; 32]);
    let config = ChannelConfig {
        mime: chitchat_proto::chat::MIME.into(),
        name: "commits".into(),
        relays,
        admins: AdminPolicy::AnyMember,
        creator: me.device(),
    };
    let mut channel = Channel::create(&provider, &me, id, config).expect("create");
    let state = channel.public_state(&provider, &me).expect("export");
    let mut orderer = Orderer::new(OrderingLimits::default());
    let (verdict, _) = orderer.apply(0, OrderCommand::Open { channel: id, state });
    assert!(matches!(verdict, Verdict::Ordering(_)), "{verdict:?}");
    let update = Change { update: true, ..Default::default() };
    let (mut stage, mut check, mut apply, mut sign, mut deliver, mut merge) =
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let us = |t: Instant| t.elapsed().as_secs_f64() * 1e6;
    for i in 0..n {
        let t = Instant::now();
        let staged = channel.stage(&provider, &me, &update, &AcceptAll).expect("stage");
        stage += us(t);
        let t = Instant::now();
        orderer.check(&id, &staged.commit, &AcceptAll).expect("check");
        check += us(t);
        let commit = CommitRef {
            channel: id,
            epoch: staged.epoch,
            hash: staged.hash,
            submitter: me.device(),
        };
        let t = Instant::now();
        let order = OrderCommand::Order { commit, bytes: Bytes(staged.commit), welcome: None };
        let (verdict, _) = orderer.apply(u64::from(2 * i + 1), order);
        apply += us(t);
        assert!(matches!(verdict, Verdict::Ordering(Outcome::Accepted(_))), "{verdict:?}");
        let body = EpochCertBody { channel: id, epoch: staged.epoch, hash: staged.hash };
        let t = Instant::now();
        let signatures: Vec<_> = keys[..2].iter().map(|k| CertSignature::sign(k, &body)).collect();
        sign += us(t);
        let cert = EpochCert { body, signatures };
        let t = Instant::now();
        let (_, delivery) =
            orderer.apply(u64::from(2 * i + 2), OrderCommand::Deliver { cert: cert.clone() });
        deliver += us(t);
        assert!(delivery.is_some());
        let t = Instant::now();
        channel.accept_own(&provider, &cert).expect("merge");
        merge += us(t);
    }
    let k = f64::from(n);
    let signature = per_call(n, |i| {
        let body = EpochCertBody { channel: id, epoch: u64::from(i), hash: CommitHash([0; 32]) };
        std::hint::black_box(CertSignature::sign(&keys[0], &body));
    });
    // What three relays spend on one commit: the submitting relay's check, every relay's apply
    // of the order and of the certificate, two signatures.
    let relays = check / k + 3.0 * (apply + deliver) / k + sign / k;
    println!("\nCPU per certified commit (1 member, 3 relays, {n} commits, µs)\n");
    println!("| step | where | µs |");
    println!("|---|---|---:|");
    println!("| one Ed25519 signature (baseline) | | {signature:.1} |");
    println!("| stage a self-update | device | {:.1} |", stage / k);
    println!("| check it before proposing | submitting relay | {:.1} |", check / k);
    println!("| apply the order (validate, advance) | every relay | {:.1} |", apply / k);
    println!("| sign the certificate | 2 relays | {:.1} |", sign / k);
    println!("| apply the certificate (verify) | every relay | {:.1} |", deliver / k);
    println!("| verify and merge | device | {:.1} |", merge / k);
    println!("| **all relays together** | | {relays:.1} |");
    println!(
        "\nBound from the relays' CPU alone: {:.0} certified commits/s per core \
         (3 relays on one machine share its cores; devices and I/O come on top).",
        1e6 / relays
    );
}

//! The short chaos run of the test suite (the long one: `cargo run --release -p chitchat-tests
//! --bin chaos -- --minutes N`). `CHITCHAT_CHAOS_SEED` replays another schedule.

use chitchat_tests::chaos::{ChaosConfig, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_survives_kills_and_freezes_of_the_relay_and_the_nodes() {
    let seed = std::env::var("CHITCHAT_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let report = run(ChaosConfig::short(seed)).await.expect("the harness ran");
    eprintln!("{report}");
    assert!(report.faults.values().sum::<u32>() >= 5, "too few faults to mean anything");
    assert!(report.accepted >= 100, "too few sends to mean anything");
    assert!(report.passed(), "{report}");
}

//! A small seeded simulation, as a test: concurrent commits, churn, reordering and replays must
//! converge with every message shown exactly once. (Longer runs: `cargo run -p chitchat-sim`.)

use chitchat_sim::channel::{Params, run};

#[test]
fn small_channel_converges() {
    for seed in [11, 12] {
        let p = Params {
            seed,
            members: 10,
            spares: 3,
            rounds: 12,
            committers: 3,
            messages: 5,
            replay_pct: 20,
        };
        let r = run(&p).unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
        let accounted = r.shown + r.lost_to_removal + r.from_removed;
        assert_eq!(accounted, r.expected_shown, "seed {seed}: {r:?}");
        assert_eq!(r.failed, 0, "seed {seed}: {r:?}");
        assert!(r.conflicts > 0, "concurrent commits must have conflicted: {r:?}");
        assert!(r.duplicates > 0, "replays must have been detected: {r:?}");
        assert_eq!(r.accepted, r.final_epoch, "one accepted commit per epoch: {r:?}");
    }
}

//! The multi-relay simulation as a test: Raft groups of relays on a virtual clock with latency,
//! loss, partitions and crashes; members converge, one winner per epoch, nothing acknowledged
//! lost; one seed gives one trace. (Longer runs: `cargo run -p chitchat-sim --bin federation`.)

use chitchat_sim::federation::{Params, Report, run};

fn check(r: &Report) {
    assert!(r.crashes > 0 && r.partitions > 0, "faults must have happened: {r:?}");
    assert!(r.dropped > 0, "messages must have been lost: {r:?}");
    assert!(r.acknowledged > 20, "commits must have been made: {r:?}");
    assert!(r.conflicts > 0, "concurrent commits must have conflicted: {r:?}");
    assert!(r.elections > r.groups as u64, "leaders must have changed: {r:?}");
    assert!(r.moves > 0, "channels must have moved to the group of a new relay set: {r:?}");
}

#[test]
fn relays_order_through_faults() {
    for seed in [1, 2, 3] {
        let p = Params { seed, ..Params::default() };
        let r = run(&p).unwrap_or_else(|e| panic!("{e:#}"));
        check(&r);
    }
}

#[test]
fn one_seed_gives_one_trace() {
    let p = Params { seed: 9, fault_ms: 10_000, ..Params::default() };
    let a = run(&p).unwrap_or_else(|e| panic!("{e:#}"));
    let b = run(&p).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(a.events > 1_000, "{a:?}");
    assert_eq!(a.trace, b.trace, "seed 9 gave two traces");
    assert_eq!((a.events, a.epochs, a.submitted), (b.events, b.epochs, b.submitted));
    let c = run(&Params { seed: 10, ..p }).unwrap_or_else(|e| panic!("{e:#}"));
    assert_ne!(a.trace, c.trace, "seeds 9 and 10 gave one trace");
}

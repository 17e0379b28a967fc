//! The gossip model, small enough for CI: every honest member gets every message despite loss,
//! fast, spam stops at the first hop, and one seed gives one trace. (At scale:
//! `cargo run --release -p chitchat-sim --bin gossip`.)

use chitchat_sim::gossip::{Params, run};

#[test]
fn gossip_reaches_every_member_through_loss() {
    for loss_pct in [0, 5, 20] {
        let p = Params { members: 300, messages: 20, loss_pct, ..Params::default() };
        let r = run(&p);
        assert_eq!(r.delivered, r.expected, "{loss_pct}% loss: {r:?}");
        assert!(r.p99_ms < 1000.0, "{loss_pct}% loss: {r:?}");
        assert!(r.duplicates_per_delivery < 12.0, "mesh floods, but boundedly: {r:?}");
    }
    // Heavy loss is repaired by lazy gossip (IHAVE / IWANT), not by the mesh alone.
    let r = run(&Params { members: 300, messages: 20, loss_pct: 40, ..Params::default() });
    assert!(r.via_gossip > 0, "{r:?}");
    assert!(r.delivered as f64 >= 0.99 * r.expected as f64, "{r:?}");
}

#[test]
fn spam_stops_at_the_first_hop() {
    let clean = Params { members: 300, messages: 20, loss_pct: 5, ..Params::default() };
    let spammed = Params { spammers: 10, spam_per_message: 10, ..clean.clone() };
    let (c, s) = (run(&clean), run(&spammed));
    assert_eq!(s.spam_forwarded, 0, "{s:?}");
    assert_eq!(s.delivered, s.expected, "{s:?}");
    assert!(s.p99_ms < 1.5 * c.p99_ms, "honest p99 {} with spam, {} without", s.p99_ms, c.p99_ms);
}

#[test]
fn one_seed_gives_one_trace() {
    let p = Params { members: 200, messages: 10, loss_pct: 5, ..Params::default() };
    assert_eq!(run(&p).trace, run(&p).trace);
    assert_ne!(run(&p).trace, run(&Params { seed: 2, ..p }).trace);
}

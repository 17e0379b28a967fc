//! `gossip`: runs the gossip model over members counts and loss rates and prints what it
//! measured.

use chitchat_sim::gossip::{Params, run};
use clap::Parser;

/// Gossip on one channel's topic, on a virtual clock with latency and loss.
#[derive(Debug, Parser)]
#[command(name = "gossip", version)]
struct Cli {
    /// The seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Members counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    members: Vec<usize>,
    /// Loss rates to run, in percent, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,5")]
    loss: Vec<u64>,
    /// Honest messages per run.
    #[arg(long, default_value_t = 50)]
    messages: usize,
    /// Spamming members per run (each publishes 10 invalid envelopes per honest message).
    #[arg(long, default_value_t = 0)]
    spammers: usize,
}

fn main() {
    let cli = Cli::parse();
    println!(
        "gossip model: mesh D=6 (4..12), D_lazy=6, heartbeat 700 ms, latency 5-60 ms, seed {}",
        cli.seed
    );
    println!(
        "{:>8} {:>5} {:>8} {:>10} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>10}",
        "members",
        "loss",
        "spammers",
        "delivered",
        "p50 ms",
        "p99 ms",
        "max ms",
        "dup/msg",
        "sends/m",
        "via iwant",
        "spam fwd"
    );
    for &members in &cli.members {
        for &loss_pct in &cli.loss {
            let p = Params {
                seed: cli.seed,
                members,
                loss_pct,
                messages: cli.messages,
                spammers: cli.spammers,
                spam_per_message: if cli.spammers > 0 { 10 } else { 0 },
                ..Params::default()
            };
            let r = run(&p);
            println!(
                "{:>8} {:>4}% {:>8} {:>9.4}% {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>9.1} {:>8} {:>10}",
                members,
                loss_pct,
                cli.spammers,
                100.0 * r.delivered as f64 / r.expected.max(1) as f64,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.duplicates_per_delivery,
                r.sends_per_member_message,
                r.via_gossip,
                r.spam_forwarded,
            );
        }
    }
}

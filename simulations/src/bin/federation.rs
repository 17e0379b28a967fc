//! `federation`: runs the multi-relay simulation over many seeds and prints what it measured.

use chitchat_sim::federation::{self, Params};
use clap::Parser;

/// Relays ordering channels in Raft groups, on a virtual clock with latency, loss, partitions
/// and crashes.
#[derive(Debug, Parser)]
#[command(name = "federation", version)]
struct Cli {
    /// First seed; runs use seed, seed+1, ...
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Number of seeded runs.
    #[arg(long, default_value_t = 10)]
    runs: u64,
    /// Relays.
    #[arg(long, default_value_t = 5)]
    relays: usize,
    /// Channels (each ordered by one to three relays).
    #[arg(long, default_value_t = 6)]
    channels: usize,
    /// Members per channel after its first commit.
    #[arg(long, default_value_t = 4)]
    members: usize,
    /// Devices per channel outside it, added and removed.
    #[arg(long, default_value_t = 2)]
    spares: usize,
    /// Virtual seconds with faults.
    #[arg(long, default_value_t = 30)]
    fault_secs: u64,
    /// Virtual seconds allowed to settle after the faults heal.
    #[arg(long, default_value_t = 30)]
    settle_secs: u64,
    /// Mean virtual milliseconds between a member's changes.
    #[arg(long, default_value_t = 3_000)]
    change_every_ms: u64,
    /// Percent of messages between relays lost while faults last.
    #[arg(long, default_value_t = 5)]
    loss_pct: u64,
    /// Mean virtual milliseconds between relay crashes (0: none).
    #[arg(long, default_value_t = 4_000)]
    crash_every_ms: u64,
    /// Mean virtual milliseconds between partitions (0: none).
    #[arg(long, default_value_t = 6_000)]
    partition_every_ms: u64,
    /// Largest one-way latency in virtual milliseconds (the smallest is 1).
    #[arg(long, default_value_t = 15)]
    latency_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    println!(
        "federation simulation: {} relays, {} channels of {} members (+{} spares), {} s of faults \
         ({}% loss, a crash every ~{} ms, a partition every ~{} ms, latency 1-{} ms)\n",
        cli.relays,
        cli.channels,
        cli.members,
        cli.spares,
        cli.fault_secs,
        cli.loss_pct,
        cli.crash_every_ms,
        cli.partition_every_ms,
        cli.latency_ms
    );
    println!(
        "{:>5} {:>6} {:>5} {:>6} {:>9} {:>6} {:>9} {:>11} {:>6} {:>9} {:>7} {:>7} {:>10} {:>8} {:>7} {:>9} {:>7} {:>16}",
        "seed",
        "groups",
        "moves",
        "epochs",
        "submitted",
        "acked",
        "conflicts",
        "unavailable",
        "failed",
        "elections",
        "crashes",
        "splits",
        "relay-msgs",
        "dropped",
        "swept",
        "settle-ms",
        "seconds",
        "trace"
    );
    let mut failures = Vec::new();
    for seed in cli.seed..cli.seed + cli.runs {
        let p = Params {
            seed,
            relays: cli.relays,
            channels: cli.channels,
            members: cli.members,
            spares: cli.spares,
            fault_ms: cli.fault_secs * 1000,
            settle_ms: cli.settle_secs * 1000,
            change_every_ms: cli.change_every_ms,
            loss_pct: cli.loss_pct,
            crash_every_ms: cli.crash_every_ms,
            partition_every_ms: cli.partition_every_ms,
            latency_ms: (1, cli.latency_ms.max(1)),
        };
        match federation::run(&p) {
            Ok(r) => println!(
                "{:>5} {:>6} {:>5} {:>6} {:>9} {:>6} {:>9} {:>11} {:>6} {:>9} {:>7} {:>7} {:>10} {:>8} {:>7} {:>9} {:>7.2} {:>16}",
                seed,
                r.groups,
                r.moves,
                r.epochs,
                r.submitted,
                r.acknowledged,
                r.conflicts,
                r.unavailable,
                r.failed,
                r.elections,
                r.crashes,
                r.partitions,
                r.relay_messages,
                r.dropped,
                r.swept,
                r.virtual_ms.saturating_sub(p.fault_ms),
                r.seconds,
                r.trace[..8].iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
            Err(e) => {
                println!("{seed:>5} FAILED: {e:#}");
                failures.push(seed);
            }
        }
    }
    if failures.is_empty() {
        println!(
            "\nall runs: one winner and one certified hash per epoch, every acknowledged commit kept, \
             all members converged after the faults healed"
        );
        Ok(())
    } else {
        anyhow::bail!("failed seeds: {failures:?} (rerun one with --seed N --runs 1)")
    }
}

//! `chitchat-sim`: runs seeded simulations of the protocol cores and prints what they measured.

use anyhow::ensure;
use chitchat_sim::channel::{self, Params};
use clap::Parser;

/// Simulate one channel: many members, concurrent commits, churn, reordering, replays.
#[derive(Debug, Parser)]
#[command(name = "chitchat-sim", version)]
struct Cli {
    /// First seed; runs use seed, seed+1, ...
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Number of seeded runs.
    #[arg(long, default_value_t = 3)]
    runs: u64,
    /// Members at the start.
    #[arg(long, default_value_t = 24)]
    members: usize,
    /// Devices outside the channel, added and removed as churn.
    #[arg(long, default_value_t = 4)]
    spares: usize,
    /// Rounds per run.
    #[arg(long, default_value_t = 25)]
    rounds: usize,
    /// Members committing concurrently each round.
    #[arg(long, default_value_t = 4)]
    committers: usize,
    /// Application messages per round.
    #[arg(long, default_value_t = 6)]
    messages: usize,
    /// Percent of deliveries replayed once more.
    #[arg(long, default_value_t = 10)]
    replay_pct: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    println!(
        "channel simulation: {} members (+{} spares), {} rounds, {} concurrent committers, {} messages/round, {}% replays\n",
        cli.members, cli.spares, cli.rounds, cli.committers, cli.messages, cli.replay_pct
    );
    println!(
        "{:>6} {:>6} {:>9} {:>8} {:>9} {:>10} {:>6} {:>8} {:>5} {:>6} {:>9} {:>7} {:>9} {:>8} {:>10} {:>8} {:>4} {:>4} {:>7}",
        "seed",
        "epoch",
        "submitted",
        "accepted",
        "conflicts",
        "superseded",
        "failed",
        "max-try",
        "sent",
        "shown",
        "expected",
        "lost-rm",
        "from-rmd",
        "lost-old",
        "duplicates",
        "buffered",
        "adds",
        "rms",
        "seconds"
    );
    for seed in cli.seed..cli.seed + cli.runs {
        let p = Params {
            seed,
            members: cli.members,
            spares: cli.spares,
            rounds: cli.rounds,
            committers: cli.committers,
            messages: cli.messages,
            replay_pct: cli.replay_pct,
        };
        let r = channel::run(&p)?;
        println!(
            "{:>6} {:>6} {:>9} {:>8} {:>9} {:>10} {:>6} {:>8} {:>5} {:>6} {:>9} {:>7} {:>9} {:>8} {:>10} {:>8} {:>4} {:>4} {:>7.2}",
            seed,
            r.final_epoch,
            r.submitted,
            r.accepted,
            r.conflicts,
            r.superseded,
            r.failed,
            r.max_attempts,
            r.sent,
            r.shown,
            r.expected_shown,
            r.lost_to_removal,
            r.from_removed,
            r.lost_too_old,
            r.duplicates,
            r.buffered,
            r.adds,
            r.removes,
            r.seconds
        );
        ensure!(
            r.shown + r.lost_to_removal + r.from_removed + r.lost_too_old == r.expected_shown,
            "seed {seed}: {} shown + {} lost to removal + {} from removed senders + {} too old, {} \
             expected",
            r.shown,
            r.lost_to_removal,
            r.from_removed,
            r.lost_too_old,
            r.expected_shown
        );
        ensure!(r.failed == 0, "seed {seed}: {} changes failed", r.failed);
    }
    println!(
        "\nall runs converged: one winner per epoch, equal epoch authenticators, every message shown once"
    );
    Ok(())
}

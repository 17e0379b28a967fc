//! The long chaos run: `cargo run --release -p chitchat-tests --bin chaos -- --minutes 10
//! [--seed N] [--nodes 3]`. Prints what it ran and found; exits with 1 if a promise broke.

use std::time::Duration;

use chitchat_tests::chaos::{ChaosConfig, run};

fn main() -> anyhow::Result<()> {
    let mut config = ChaosConfig::short(rand::random());
    config.duration = Duration::from_secs(600);
    config.heal_timeout = Duration::from_secs(300);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--minutes" => config.duration = Duration::from_secs(value()?.parse::<u64>()? * 60),
            "--seconds" => config.duration = Duration::from_secs(value()?.parse()?),
            "--seed" => config.seed = value()?.parse()?,
            "--nodes" => config.nodes = value()?.parse()?,
            "--help" | "-h" => {
                println!(
                    "chaos [--minutes N | --seconds N] [--seed N] [--nodes 2..8]\n\
                     One relay and N nodes (3) in one channel under steady sends, with kill -9 and\n\
                     SIGSTOP of the relay and the nodes at random; then heals and checks that every\n\
                     accepted message arrived exactly once everywhere, in order."
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(run(config))?;
    println!("{report}");
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}

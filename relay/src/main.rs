//! `chitchat-relay`: the relay's command line.

use clap::Parser;

/// ChitChat relay. Its services arrive with issue #3; today this binary only reports its
/// version.
#[derive(Debug, Parser)]
#[command(name = "chitchat-relay", version = chitchat_relay::VERSION)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    eprintln!(
        "chitchat-relay {}: the relay is not built yet (see issue #3).",
        chitchat_relay::VERSION
    );
    std::process::exit(2)
}

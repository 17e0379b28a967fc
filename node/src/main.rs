//! `chitchat`: the node's command line.

use clap::Parser;

/// ChitChat node. The daemon and its commands arrive with issue #4; today this binary only
/// reports its version.
#[derive(Debug, Parser)]
#[command(name = "chitchat", version = chitchat_node::VERSION)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    eprintln!(
        "chitchat {}: the node daemon is not built yet (see issue #4). \
         Try `cargo run -p chitchat-sim --release` for the protocol simulation.",
        chitchat_node::VERSION
    );
    std::process::exit(2)
}

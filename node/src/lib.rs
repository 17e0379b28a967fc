//! The ChitChat node: the daemon every device runs, and the CLI that talks to it.
//!
//! - [`store`]: the node's redb file (keys, identity records, channels, openmls state,
//!   messages, outbox, intents).
//! - [`engine`]: the synchronous state machine over the store; no network I/O.
//! - [`history`]: checking what the relay's history of a channel fills in for the inbox.
//! - [`host`]: the node's libp2p host (the relay protocol, gossip, identify), one swarm.
//! - [`link`]: the connection to the node's relay, over the host.
//! - [`daemon`]: the running node; background tasks for the inbox, the outbox and the
//!   ordering of membership changes.
//! - [`api`]: the local API (HTTP + JSON, WebSocket events), and [`client`], its client.
//! - [`cli`]: the command line's formatting.
//!
//! Protocol logic lives in [`chitchat_proto`]; this crate is the I/O driver around it.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod history;
pub mod home;
pub mod host;
pub mod link;
pub mod store;
pub mod thumbnail;
pub mod view;

/// The version of this node.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

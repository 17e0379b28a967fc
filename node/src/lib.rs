//! The ChitChat node: the daemon every device runs.
//!
//! It will own the device's redb store, its libp2p swarm and iroh blobs endpoint, the client of
//! its relay, and the local API that the CLI and other programs use (issue #4). Protocol logic
//! lives in [`chitchat_proto`]; this crate is the I/O driver around it.

/// The version of this node.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

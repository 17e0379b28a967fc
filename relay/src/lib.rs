//! The ChitChat relay (homeserver): inboxes, identity sponsorship, KeyPackages, history and
//! blobs with expiry, and Raft-ordered epochs for its channels.
//!
//! The services arrive with issue #3. Protocol logic lives in [`chitchat_proto`]; this crate is
//! the I/O driver around it.

/// The version of this relay.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

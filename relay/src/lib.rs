//! The ChitChat relay (homeserver): inboxes, identity sponsorship, KeyPackages, and (next)
//! Raft-ordered epochs for its channels.
//!
//! Protocol logic lives in [`chitchat_proto`]; this crate is the I/O around it: the redb
//! [`store`], the request handling of each service, the libp2p network and the HTTP endpoints.

pub mod admin;
pub mod config;
pub mod fanout;
pub mod federation;
pub mod files;
pub mod groups;
pub mod home;
pub mod http;
pub mod metrics;
pub mod net;
pub mod ordering;
pub mod service;
pub mod store;

/// The version of this relay.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

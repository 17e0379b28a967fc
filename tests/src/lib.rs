//! End-to-end tests of ChitChat: real relays and nodes as separate processes on loopback.
//!
//! - [`RelayProcess`] runs the real `chitchat-relay` binary in a temporary directory.
//! - [`Client`] is a test client built from `chitchat-proto`: a libp2p peer that speaks the relay
//!   protocol frame by frame, so tests can also send what a correct client never would.
//! - [`Device`] holds a device's keys and builds its identity records.

mod client;
mod device;
mod process;

pub use client::Client;
pub use device::Device;
pub use process::RelayProcess;

//! End-to-end tests of ChitChat: real relays and nodes as separate processes on loopback.
//!
//! - [`RelayProcess`] runs the real `chitchat-relay` binary in a temporary directory.
//! - [`Client`] is a test client built from `chitchat-proto`: a libp2p peer that speaks the relay
//!   protocol frame by frame, so tests can also send what a correct client never would.
//! - [`NodeProcess`] runs the real `chitchat` daemon and talks to its local API.
//! - [`Device`] holds a device's keys and builds its identity records.
//! - [`chaos`] runs relays and nodes under faults and checks delivery.

pub mod chaos;
mod client;
mod device;
mod netns;
mod node;
mod process;

pub use client::Client;
pub use device::Device;
pub use netns::Netns;
pub use node::NodeProcess;
pub use process::{RelayProcess, binaries_dir};

use chitchat_proto::wire::{Request, Response};

/// Registers `device` as `name` with an invite token from the relay's CLI, then publishes a
/// record holding the sponsorship. Returns the client, authenticated as the device.
pub async fn register(relay: &RelayProcess, device: &Device, name: &str) -> Client {
    let now = chitchat_relay::service::now();
    let token = relay.cli(&["invite"]).expect("invite").trim().to_owned();
    let c = Client::connect(relay.tcp_addr(), relay.peer_id()).await.expect("connect");
    assert_eq!(
        c.authenticate(&device.key, relay.host()).await.expect("auth"),
        Response::Authenticated
    );
    let req = Request::Register {
        token: Some(token),
        local_name: name.into(),
        dir: device.dir(1, vec![], now),
    };
    let Response::Registered { sponsorship } = c.call(&req).await.expect("register") else {
        panic!("not registered")
    };
    let dir = device.dir(2, vec![sponsorship], now);
    assert_eq!(
        c.call(&Request::PublishDir { dir }).await.expect("publish"),
        Response::DirPublished
    );
    c
}

/// The resident memory of process `pid`, in KiB (0 if it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

//! The node's connection to its relay: the relay protocol over the node's host
//! ([`crate::host`]), request-response, one frame per request and response.
//!
//! [`RelayLink::call`] sends a request and returns the relay's response. The host dials the
//! relay when a request needs it, with the relay's addresses given on every request (libp2p
//! forgets an address after a failed dial, which once left a node unable to reach a relay that
//! had restarted), so a link survives any relay restart or outage: the next request
//! reconnects. A request that times out drops the connection, so that one the network broke
//! silently is replaced rather than waited on. The relay authenticates per connection; a request
//! answered `Unauthenticated` authenticates (challenge, signed proof) and is sent once more.
//!
//! [`RelayLink::state`] says whether a connection is up, and since when it is or is not.

use std::time::Duration;

use chitchat_proto::wire::{self, AuthProof, ErrorCode, Request, Response};
use chitchat_proto::{DeviceId, SecretKey};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{Mutex, watch};

use crate::host::{Host, PeerState};

pub use chitchat_net::RELAY_PROTOCOL as PROTOCOL;

/// Why a call to the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The relay could not be reached, or the request timed out.
    #[error("relay unreachable: {0}")]
    Unreachable(String),
    /// The relay answered something that does not decode.
    #[error("bad response from relay: {0}")]
    BadResponse(String),
    /// The relay refused to authenticate this device.
    #[error("relay refused authentication: {0}")]
    Auth(String),
    /// The link is shut down.
    #[error("link closed")]
    Closed,
}

/// Whether the link has a connection to its relay, and since when.
pub type LinkState = PeerState;

/// The answer a revoked device gets.
fn revoked() -> Response {
    Response::Error { code: ErrorCode::Revoked, message: "this device was revoked".into() }
}

/// A connection to one relay, shared by all of the node's tasks.
#[derive(Debug)]
pub struct RelayLink {
    host: Host,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    state: watch::Receiver<LinkState>,
    key: SecretKey,
    hostname: String,
    timeout: Duration,
    /// Serialises re-authentication; counts successful authentications.
    auth: Mutex<u64>,
    /// Set when the relay answered that this device was revoked: final, so later calls are
    /// answered so here, without asking the relay.
    revoked: std::sync::atomic::AtomicBool,
}

impl RelayLink {
    /// A link through `host` to relay `peer` (named `hostname`) at `addrs`, for the device
    /// with `key`. Nothing is dialled until the first call. `timeout` bounds every call but
    /// `Wait`.
    pub async fn new(
        host: Host,
        key: SecretKey,
        hostname: String,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        timeout: Duration,
    ) -> Result<Self, LinkError> {
        let state = host.watch(peer).await.map_err(|_| LinkError::Closed)?;
        Ok(Self {
            host,
            peer,
            addrs,
            state,
            key,
            hostname,
            timeout,
            auth: Mutex::new(0),
            revoked: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The relay's peer id.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Whether the link is connected to its relay, and since when; changes as connections come
    /// and go.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// The device this link authenticates as.
    pub fn device(&self) -> DeviceId {
        DeviceId(self.key.public())
    }

    async fn call_once(&self, request: &Request, timeout: Duration) -> Result<Response, LinkError> {
        let frame =
            wire::encode_frame(request).map_err(|e| LinkError::BadResponse(e.to_string()))?;
        let call = self.host.call(self.peer, self.addrs.clone(), frame);
        let Ok(answer) = tokio::time::timeout(timeout, call).await else {
            self.host.reset(self.peer);
            return Err(LinkError::Unreachable("request timed out".into()));
        };
        let bytes = answer.map_err(|_| LinkError::Closed)?.map_err(LinkError::Unreachable)?;
        wire::decode_frame(&bytes).map_err(|e| LinkError::BadResponse(e.to_string()))
    }

    /// Sends a request, authenticating first if the relay asks for it.
    pub async fn call(&self, request: &Request) -> Result<Response, LinkError> {
        let timeout = match request {
            Request::Wait { timeout_ms, .. } => {
                Duration::from_millis(u64::from(*timeout_ms)) + self.timeout
            }
            _ => self.timeout,
        };
        if self.is_revoked() {
            return Ok(revoked());
        }
        let seen = *self.auth.lock().await;
        let mut response = self.call_once(request, timeout).await?;
        if matches!(response, Response::Error { code: ErrorCode::Unauthenticated, .. }) {
            self.authenticate(seen).await?;
            response = self.call_once(request, timeout).await?;
        }
        if matches!(response, Response::Error { code: ErrorCode::Revoked, .. })
            && !self.revoked.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::error!(
                "this device was revoked by its user's other devices: the relay refuses it \
                 everything, and it will not ask again"
            );
        }
        Ok(response)
    }

    /// Whether the relay said this device was revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Authenticates unless another task did since `seen`.
    async fn authenticate(&self, seen: u64) -> Result<(), LinkError> {
        let mut count = self.auth.lock().await;
        if *count != seen {
            return Ok(());
        }
        let device = self.device();
        let nonce = match self.call_once(&Request::Challenge { device }, self.timeout).await? {
            Response::Challenge { nonce } => nonce,
            other => return Err(LinkError::Auth(format!("{other:?}"))),
        };
        let signature = AuthProof::sign(&self.key, &self.hostname, nonce);
        match self.call_once(&Request::Authenticate { device, signature }, self.timeout).await? {
            Response::Authenticated => {
                *count += 1;
                Ok(())
            }
            Response::Error { message, .. } => Err(LinkError::Auth(message)),
            other => Err(LinkError::Auth(format!("{other:?}"))),
        }
    }
}

//! The node's connection to its relay: a libp2p swarm (TCP, QUIC, WebSocket; Noise; yamux)
//! speaking the relay protocol over request-response, one frame per request and response.
//!
//! [`RelayLink::call`] sends a request and returns the relay's response. The swarm dials the
//! relay when a request needs it, with the relay's addresses given on every request (libp2p
//! forgets an address after a failed dial, which once left a node unable to reach a relay that
//! had restarted), so a link survives any relay restart or outage: the next request
//! reconnects. A request that times out drops the connection, so that one the network broke
//! silently is replaced rather than waited on. The relay authenticates per connection; a request
//! answered `Unauthenticated` authenticates (challenge, signed proof) and is sent once more.
//!
//! [`RelayLink::state`] says whether a connection is up, and since when it is or is not.

use std::collections::HashMap;
use std::time::Duration;

use chitchat_net::{HostConfig, frames};
use chitchat_proto::wire::{self, AuthProof, ErrorCode, Request, Response};
use chitchat_proto::{DeviceId, SecretKey, Timestamp};
use futures::StreamExt as _;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{Mutex, mpsc, oneshot, watch};

pub use chitchat_net::RELAY_PROTOCOL as PROTOCOL;
/// Requests waiting for the swarm task, at most.
const CALL_QUEUE: usize = 1024;
/// The longest any request may take at the transport level (a `Wait` lasts up to a minute).
const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(75);

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

type Reply = oneshot::Sender<Result<Vec<u8>, LinkError>>;

/// What the swarm task is asked to do.
enum Command {
    /// Send a request frame; the response (or failure) goes to the reply.
    Call(Vec<u8>, Reply),
    /// A request timed out: close the connections to the relay, so that the next request
    /// dials afresh instead of waiting on a connection the network may have broken silently.
    Reset,
}

/// Whether the link has a connection to its relay, and since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// A connection is established.
    pub connected: bool,
    /// When it came up, or when the last one went down (when the link started, if it was
    /// never up).
    pub since: Timestamp,
}

/// A connection to one relay, shared by all of the node's tasks.
#[derive(Debug)]
pub struct RelayLink {
    calls: mpsc::Sender<Command>,
    state: watch::Receiver<LinkState>,
    key: SecretKey,
    host: String,
    timeout: Duration,
    /// Serialises re-authentication; counts successful authentications.
    auth: Mutex<u64>,
}

impl RelayLink {
    /// A link to relay `peer` (named `host`) at `addrs`, for the device with `key`. Nothing is
    /// dialled until the first call. `timeout` bounds every call but `Wait`.
    pub async fn new(
        key: SecretKey,
        host: String,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        timeout: Duration,
    ) -> Result<Self, LinkError> {
        let identity = chitchat_net::keypair(&key).map_err(|e| LinkError::Auth(e.to_string()))?;
        let config = HostConfig { idle_timeout: Duration::from_secs(90), lazy: true };
        let mut swarm = chitchat_net::swarm(identity, config, |_| {
            frames(
                PROTOCOL,
                ProtocolSupport::Outbound,
                request_response::Config::default()
                    .with_request_timeout(TRANSPORT_TIMEOUT)
                    .with_max_concurrent_streams(256),
            )
        })
        .await
        .map_err(|e| LinkError::Unreachable(e.to_string()))?;
        let (calls, mut rx) = mpsc::channel::<Command>(CALL_QUEUE);
        let started = LinkState { connected: false, since: crate::engine::now() };
        let (state_tx, state) = watch::channel(started);
        tokio::spawn(async move {
            let mut pending: HashMap<OutboundRequestId, Reply> = HashMap::new();
            let set = |connected: bool| {
                state_tx.send_if_modified(|s| {
                    let changed = s.connected != connected;
                    if changed {
                        *s = LinkState { connected, since: crate::engine::now() };
                    }
                    changed
                });
            };
            loop {
                tokio::select! {
                    call = rx.recv() => match call {
                        Some(Command::Call(bytes, reply)) => {
                            let id = swarm
                                .behaviour_mut()
                                .send_request_with_addresses(&peer, bytes, addrs.clone());
                            pending.insert(id, reply);
                        }
                        Some(Command::Reset) => {
                            if swarm.is_connected(&peer) {
                                tracing::debug!("relay request timed out; reconnecting");
                                let _ = swarm.disconnect_peer_id(peer);
                            }
                        }
                        None => break,
                    },
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::Behaviour(request_response::Event::Message {
                            message: request_response::Message::Response { request_id, response },
                            ..
                        }) => {
                            if let Some(r) = pending.remove(&request_id) {
                                let _ = r.send(Ok(response));
                            }
                        }
                        SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                            request_id, error, ..
                        }) => {
                            if let Some(r) = pending.remove(&request_id) {
                                let _ = r.send(Err(LinkError::Unreachable(error.to_string())));
                            }
                            if matches!(error, request_response::OutboundFailure::Timeout)
                                && swarm.is_connected(&peer)
                            {
                                let _ = swarm.disconnect_peer_id(peer);
                            }
                        }
                        SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == peer => {
                            set(true);
                        }
                        SwarmEvent::ConnectionClosed { peer_id, num_established, cause, .. }
                            if peer_id == peer =>
                        {
                            tracing::debug!(?cause, "relay connection closed");
                            if num_established == 0 {
                                set(false);
                            }
                        }
                        _ => {}
                    },
                }
            }
        });
        Ok(Self { calls, state, key, host, timeout, auth: Mutex::new(0) })
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
        let (reply, answer) = oneshot::channel();
        self.calls.send(Command::Call(frame, reply)).await.map_err(|_| LinkError::Closed)?;
        let Ok(answer) = tokio::time::timeout(timeout, answer).await else {
            let _ = self.calls.try_send(Command::Reset);
            return Err(LinkError::Unreachable("request timed out".into()));
        };
        let bytes = answer.map_err(|_| LinkError::Closed)??;
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
        let seen = *self.auth.lock().await;
        let response = self.call_once(request, timeout).await?;
        if !matches!(response, Response::Error { code: ErrorCode::Unauthenticated, .. }) {
            return Ok(response);
        }
        self.authenticate(seen).await?;
        self.call_once(request, timeout).await
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
        let signature = AuthProof::sign(&self.key, &self.host, nonce);
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

//! A test client of the relay protocol.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chitchat_net::{HostConfig, RELAY_PROTOCOL as PROTOCOL, frames};
use chitchat_proto::federation::{FedRequest, FedResponse};
use chitchat_proto::wire::{self, AuthProof, Request, Response};
use chitchat_proto::{DeviceId, SecretKey};
use futures::StreamExt as _;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Sender<anyhow::Result<Vec<u8>>>;

/// A connection to one relay. Requests are sent over libp2p request-response; clones share
/// the connection.
#[derive(Clone, Debug)]
pub struct Client {
    calls: mpsc::Sender<(Vec<u8>, Reply)>,
    /// The device and relay host it authenticated as, to do it again on a new connection
    /// (authentication belongs to a connection, and an idle one is closed).
    auth: std::sync::Arc<std::sync::Mutex<Option<(SecretKey, String)>>>,
}

impl Client {
    /// Connects to the relay `peer` at `addr` with a fresh libp2p identity.
    pub async fn connect(addr: Multiaddr, peer: PeerId) -> anyhow::Result<Self> {
        Self::connect_as(libp2p::identity::Keypair::generate_ed25519(), addr, peer).await
    }

    /// Connects with the given libp2p identity.
    pub async fn connect_as(
        identity: libp2p::identity::Keypair,
        addr: Multiaddr,
        peer: PeerId,
    ) -> anyhow::Result<Self> {
        Self::connect_on(identity, addr, peer, PROTOCOL).await
    }

    /// Connects with the given libp2p identity, to speak `protocol` (the device protocol, or
    /// relays' [`FEDERATION_PROTOCOL`](chitchat_proto::federation::FEDERATION_PROTOCOL), as a relay would or an impostor might).
    pub async fn connect_on(
        identity: libp2p::identity::Keypair,
        addr: Multiaddr,
        peer: PeerId,
        protocol: &'static str,
    ) -> anyhow::Result<Self> {
        // As the node does (a request rides with the protocol proposal).
        let config = HostConfig { idle_timeout: Duration::from_secs(60), lazy: true, tls: None };
        let mut swarm = chitchat_net::swarm(identity, config, |_| {
            frames(
                protocol,
                ProtocolSupport::Outbound,
                request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
            )
        })
        .await?;
        swarm.dial(addr.clone())?;
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == peer => {
                        return Ok(());
                    }
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        bail!("dial {addr}: {error}")
                    }
                    _ => {}
                }
            }
        })
        .await;
        connected.context("connect timed out")??;
        let (calls, mut rx) = mpsc::channel::<(Vec<u8>, Reply)>(1024);
        tokio::spawn(async move {
            let mut pending: HashMap<OutboundRequestId, Reply> = HashMap::new();
            loop {
                tokio::select! {
                    call = rx.recv() => match call {
                        Some((bytes, reply)) => {
                            // The address rides with every request: a connection closed
                            // while idle is dialled again (libp2p keeps no address for it).
                            let id = swarm.behaviour_mut().send_request_with_addresses(
                                &peer,
                                bytes,
                                vec![addr.clone()],
                            );
                            pending.insert(id, reply);
                        }
                        None => break,
                    },
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::Behaviour(request_response::Event::Message {
                            message: request_response::Message::Response { request_id, response }, ..
                        }) => {
                            if let Some(r) = pending.remove(&request_id) {
                                let _ = r.send(Ok(response));
                            }
                        }
                        SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, error, .. }) => {
                            if let Some(r) = pending.remove(&request_id) {
                                let _ = r.send(Err(anyhow::anyhow!("request failed: {error}")));
                            }
                        }
                        _ => {}
                    },
                }
            }
        });
        Ok(Self { calls, auth: Default::default() })
    }

    /// Sends raw bytes as a request frame and returns the raw response.
    pub async fn call_raw(&self, bytes: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        let (reply, answer) = oneshot::channel();
        self.calls.send((bytes, reply)).await.context("client gone")?;
        answer.await.context("client gone")?
    }

    /// Sends a request and decodes the response. A client that authenticated before and is
    /// answered `Unauthenticated` (its connection was closed and dialled again) authenticates
    /// again and sends the request once more.
    pub async fn call(&self, request: &Request) -> anyhow::Result<Response> {
        let response = self.call_once(request).await?;
        if matches!(response, Response::Error { code: wire::ErrorCode::Unauthenticated, .. }) {
            let auth = self.auth.lock().map(|a| a.clone()).unwrap_or_default();
            if let Some((key, host)) = auth {
                self.authenticate(&key, &host).await?;
                return self.call_once(request).await;
            }
        }
        Ok(response)
    }

    async fn call_once(&self, request: &Request) -> anyhow::Result<Response> {
        let frame = wire::encode_frame(request)?;
        let bytes = self.call_raw(frame).await?;
        Ok(wire::decode_frame(&bytes)?)
    }

    /// Sends a federation request (on a client connected with [`FEDERATION_PROTOCOL`](chitchat_proto::federation::FEDERATION_PROTOCOL)).
    pub async fn call_fed(&self, request: &FedRequest) -> anyhow::Result<FedResponse> {
        let bytes = self.call_raw(wire::encode_frame(request)?).await?;
        Ok(wire::decode_frame(&bytes)?)
    }

    /// Authenticates as `key`'s device for the relay named `host`.
    pub async fn authenticate(&self, key: &SecretKey, host: &str) -> anyhow::Result<Response> {
        let device = DeviceId(key.public());
        let Response::Challenge { nonce } = self.call_once(&Request::Challenge { device }).await?
        else {
            bail!("no challenge");
        };
        let signature = AuthProof::sign(key, host, nonce);
        let answer = self.call_once(&Request::Authenticate { device, signature }).await?;
        if answer == Response::Authenticated
            && let Ok(mut auth) = self.auth.lock()
        {
            *auth = Some((key.clone(), host.to_owned()));
        }
        Ok(answer)
    }
}

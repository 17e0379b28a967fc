//! The relay's libp2p side: TCP, QUIC and WebSocket, Noise, yamux, and one request-response
//! protocol whose messages are `chitchat-proto` frames.
//!
//! Who talks to whom: one task owns the [`Swarm`]. It decodes every request frame itself,
//! answers the authentication handshake (`Challenge`, `Authenticate`) from its per-peer state,
//! and hands every other request, with the device that peer proved, to a task running
//! [`Relay::handle`]; answers come back to the swarm task over a bounded channel. At most
//! [`MAX_IN_FLIGHT`] requests are handled at once; beyond that a peer is told to retry.
//!
//! Authentication is bound to the libp2p `PeerId`, which Noise authenticates: once a peer has
//! signed a challenge for a device, its requests act as that device until it disconnects.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use chitchat_net::gossip::{self, Gossip, GossipEvent};
use chitchat_net::{FrameCodec, HostConfig, frames};
use chitchat_proto::federation::{FEDERATION_PROTOCOL, FedResponse};
use chitchat_proto::gossip::{Unjudged, Verdict as GossipVerdict};
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::wire::{self, ErrorCode, Request, Response};
use chitchat_proto::{DeviceId, SecretKey};
use futures::StreamExt as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use libp2p::gossipsub::{self as libp2p_gossipsub, MessageId};
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, connection_limits, identify, rendezvous};
use rand::RngExt as _;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::config::NetworkConfig;
use crate::federation::Outbound;
use crate::service::Relay;

pub use chitchat_net::RELAY_PROTOCOL as PROTOCOL;
/// Requests handled at once, at most.
pub const MAX_IN_FLIGHT: usize = 4096;
/// Waiting fetches (`Wait` held open until something arrives) held at once, in all. They hold
/// no request permit: an online node keeps one open all the time.
pub const MAX_WAITING: usize = 65_536;
/// Waiting fetches one device may hold at once.
pub const MAX_WAITS_PER_DEVICE: usize = 4;
/// Requests a peer may have open on one connection.
pub const MAX_STREAMS_PER_CONNECTION: usize = 256;
/// How often the relay's gossip topics are brought in line with the channels it orders.
pub const TOPICS_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest and longest registration at the rendezvous point, in seconds: a peer that
/// went away stays listed no longer than its registration.
pub const RENDEZVOUS_MIN_TTL: u64 = 60;
/// See [`RENDEZVOUS_MIN_TTL`].
pub const RENDEZVOUS_MAX_TTL: u64 = 60 * 60;
/// Seconds an idle connection stays open.
pub const IDLE_TIMEOUT_SECS: u64 = 120;

/// The relay's network behaviour.
#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    rr: request_response::Behaviour<FrameCodec>,
    /// Relays among themselves ([`FEDERATION_PROTOCOL`]), both ways.
    fed: request_response::Behaviour<FrameCodec>,
    identify: identify::Behaviour,
    /// Gossip: the relay is an always-on peer of the channels it orders.
    gossip: Gossip,
    /// The rendezvous point where the members of a channel find each other (the namespace is
    /// the channel's topic).
    rendezvous: rendezvous::server::Behaviour,
    /// Circuit relay v2: nodes reachable through this relay, and DCUtR's meeting point.
    circuits: libp2p::relay::Behaviour,
}

/// An answer for the swarm task to send.
enum Answer {
    /// The relay's verdict on a gossiped message.
    Gossip(MessageId, PeerId, GossipVerdict),
    /// The channels whose topics the relay takes part in.
    Topics(BTreeSet<ChannelId>),
    /// To a device; names the device whose waiting fetch it ends, if it is one.
    Device(ResponseChannel<Vec<u8>>, Response, Option<DeviceId>),
    /// To another relay.
    Relay(ResponseChannel<Vec<u8>>, FedResponse),
}

pub use chitchat_net::keypair;

/// Where the relay listens, once it does.
#[derive(Clone, Debug)]
pub struct Listening {
    /// The relay's libp2p peer id.
    pub peer_id: PeerId,
    /// Bound addresses (ports resolved).
    pub addrs: Vec<Multiaddr>,
}

#[derive(Debug, Default)]
struct PeerState {
    connections: usize,
    /// The IP address of its first connection.
    ip: Option<IpAddr>,
    challenge: Option<(DeviceId, [u8; 32])>,
    device: Option<DeviceId>,
}

/// Limits on requests that need no registered device, by IP address and by peer: keys and
/// peer ids cost nothing, addresses cost a little more.
struct Anonymous {
    by_ip: DefaultKeyedRateLimiter<IpAddr>,
    by_peer: DefaultKeyedRateLimiter<PeerId>,
}

impl Anonymous {
    fn new(net: &NetworkConfig) -> Self {
        let quota = |n: u32| Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        Self {
            by_ip: RateLimiter::keyed(quota(net.anonymous_per_minute_per_ip)),
            by_peer: RateLimiter::keyed(quota(net.anonymous_per_minute_per_peer)),
        }
    }

    /// Takes a token for `peer` (and its address), or says how long to wait, in milliseconds.
    fn check(&self, peer: PeerId, ip: Option<IpAddr>) -> Result<(), u64> {
        use governor::clock::{Clock as _, DefaultClock};
        let wait = |n: governor::NotUntil<_>| {
            let wait = n.wait_time_from(DefaultClock::default().now());
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)
        };
        if let Some(ip) = ip {
            self.by_ip.check_key(&ip).map_err(wait)?;
        }
        self.by_peer.check_key(&peer).map_err(wait)
    }

    /// Forgets keys whose buckets are full again, so the maps hold only recent senders.
    fn forget_idle(&self) {
        self.by_ip.retain_recent();
        self.by_ip.shrink_to_fit();
        self.by_peer.retain_recent();
        self.by_peer.shrink_to_fit();
    }
}

/// Whether a request needs no registered device.
fn is_anonymous(request: &Request) -> bool {
    matches!(
        request,
        Request::Challenge { .. }
            | Request::Authenticate { .. }
            | Request::Register { .. }
            | Request::JoinLink { .. }
            | Request::LinkPoll { .. }
            | Request::Lookup { .. }
            | Request::LookupDevices { .. }
    )
}

/// The IP address a multiaddr starts with, if any.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Runs the relay's swarm until `shutdown` turns true. `ready` receives the bound addresses once
/// every listen address is bound; `outbound` brings requests for other relays; `gossip` is the
/// gossip behaviour to run (with its metrics registered).
pub async fn run(
    relay: Arc<Relay>,
    key: &SecretKey,
    gossip: Gossip,
    listen: Vec<Multiaddr>,
    ready: oneshot::Sender<Listening>,
    mut outbound: mpsc::Receiver<Outbound>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let tls = relay.config().tls.load()?;
    let mut swarm = build_swarm(key, &relay.config().network, tls, gossip).await?;
    for addr in &listen {
        swarm.listen_on(addr.clone())?;
    }
    let peer_id = *swarm.local_peer_id();
    let (answers_tx, mut answers) = mpsc::channel::<Answer>(MAX_IN_FLIGHT);
    let mut calls: HashMap<
        request_response::OutboundRequestId,
        oneshot::Sender<Result<Vec<u8>, String>>,
    > = HashMap::new();
    let mut waiting: HashMap<DeviceId, usize> = HashMap::new();
    let mut waiting_total = 0usize;
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut peers: HashMap<PeerId, PeerState> = HashMap::new();
    let anonymous = Anonymous::new(&relay.config().network);
    let mut forget = tokio::time::interval(Duration::from_secs(60));
    let mut topics_tick = tokio::time::interval(TOPICS_INTERVAL);
    let mut topics: BTreeSet<ChannelId> = BTreeSet::new();
    let mut bound = Vec::new();
    let mut ready = Some(ready);
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    tracing::info!(%address, "listening");
                    // Given to the nodes that hold a reservation here, as where to reach them.
                    swarm.add_external_address(address.clone());
                    bound.push(address);
                    if bound.len() >= listen.len()
                        && let Some(r) = ready.take()
                    {
                        let _ = r.send(Listening { peer_id, addrs: bound.clone() });
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    let state = peers.entry(peer_id).or_default();
                    state.connections += 1;
                    if state.ip.is_none() {
                        state.ip = ip_of(endpoint.get_remote_address());
                    }
                    relay.metrics().connections.inc();
                }
                SwarmEvent::ConnectionClosed { peer_id, .. } => {
                    relay.metrics().connections.dec();
                    if let Some(p) = peers.get_mut(&peer_id) {
                        p.connections = p.connections.saturating_sub(1);
                        if p.connections == 0 {
                            peers.remove(&peer_id);
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Rr(request_response::Event::Message {
                    peer,
                    message: request_response::Message::Request { request, channel, .. },
                    ..
                })) => {
                    let state = peers.entry(peer).or_default();
                    let Some(request) = handshake(&relay, &anonymous, peer, state, &request, channel, &mut swarm) else {
                        continue;
                    };
                    let (request, channel) = request;
                    let (relay_, answers_tx, auth) = (relay.clone(), answers_tx.clone(), state.device);
                    // A waiting fetch of an authenticated device holds no request permit, only
                    // one of its device's few waiting places.
                    if let (Request::Wait { .. }, Some(device)) = (&request, auth) {
                        let mine = waiting.entry(device).or_default();
                        if *mine >= MAX_WAITS_PER_DEVICE || waiting_total >= MAX_WAITING {
                            relay.metrics().error("rate_limited");
                            let limited = Response::Error {
                                code: ErrorCode::RateLimited { retry_after_ms: 1000 },
                                message: "too many waiting fetches".into(),
                            };
                            send(&mut swarm, channel, &limited);
                            continue;
                        }
                        *mine += 1;
                        waiting_total += 1;
                        tokio::spawn(async move {
                            let response = relay_.handle(auth, request).await;
                            let _ = answers_tx.send(Answer::Device(channel, response, Some(device))).await;
                        });
                        continue;
                    }
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        let busy = Response::Error { code: ErrorCode::Unavailable, message: "busy, retry".into() };
                        send(&mut swarm, channel, &busy);
                        continue;
                    };
                    tokio::spawn(async move {
                        let response = relay_.handle(auth, request).await;
                        let _ = answers_tx.send(Answer::Device(channel, response, None)).await;
                        drop(permit);
                    });
                }
                SwarmEvent::Behaviour(BehaviourEvent::Fed(request_response::Event::Message {
                    peer,
                    message: request_response::Message::Request { request, channel, .. },
                    ..
                })) => {
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        let busy = FedResponse::Error { code: ErrorCode::Unavailable, message: "busy, retry".into() };
                        send_fed(&mut swarm, channel, &busy);
                        continue;
                    };
                    let ip = peers.get(&peer).and_then(|p| p.ip);
                    let (relay_, answers_tx) = (relay.clone(), answers_tx.clone());
                    tokio::spawn(async move {
                        let response = relay_.handle_federation(peer, ip, &request).await;
                        let _ = answers_tx.send(Answer::Relay(channel, response)).await;
                        drop(permit);
                    });
                }
                SwarmEvent::Behaviour(BehaviourEvent::Fed(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                })) => {
                    if let Some(reply) = calls.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Fed(request_response::Event::OutboundFailure {
                    request_id, error, peer, ..
                })) => {
                    tracing::debug!(%peer, %error, "request to a relay failed");
                    if let Some(reply) = calls.remove(&request_id) {
                        let _ = reply.send(Err(error.to_string()));
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Gossip(GossipEvent::Gossipsub(
                    libp2p_gossipsub::Event::Message { propagation_source, message_id, message },
                ))) => {
                    // Judged beside the swarm (the membership is behind the ordering's lock);
                    // past the request limit, not judged: neither forwarded nor held against
                    // the peer.
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        let ignore = GossipVerdict::Ignore(Unjudged::UnknownEpoch);
                        swarm.behaviour_mut().gossip.report(&message_id, &propagation_source, ignore);
                        continue;
                    };
                    let (relay_, answers_tx) = (relay.clone(), answers_tx.clone());
                    tokio::spawn(async move {
                        let now = crate::service::now();
                        let verdict = relay_.judge_gossip(message.topic.as_str(), &message.data, now).await;
                        let _ = answers_tx.send(Answer::Gossip(message_id, propagation_source, verdict)).await;
                        drop(permit);
                    });
                }
                SwarmEvent::Behaviour(BehaviourEvent::Rr(request_response::Event::InboundFailure { peer, error, .. })) => {
                    tracing::debug!(%peer, %error, "inbound request failed");
                }
                _ => {}
            },
            Some(answer) = answers.recv() => match answer {
                Answer::Device(channel, response, waited) => {
                    if let Some(device) = waited
                        && let Some(n) = waiting.get_mut(&device)
                    {
                        *n = n.saturating_sub(1);
                        waiting_total = waiting_total.saturating_sub(1);
                        if *n == 0 {
                            waiting.remove(&device);
                        }
                    }
                    send(&mut swarm, channel, &response);
                }
                Answer::Relay(channel, response) => send_fed(&mut swarm, channel, &response),
                Answer::Gossip(id, source, verdict) => {
                    relay.metrics().gossip(&verdict);
                    if !matches!(verdict, GossipVerdict::Accept) {
                        tracing::debug!(peer = %source, ?verdict, "gossip not accepted");
                    }
                    if swarm.behaviour_mut().gossip.report(&id, &source, verdict) {
                        relay.metrics().gossip_bans.inc();
                        tracing::warn!(peer = %source, "banned a peer that sent forged gossip");
                    }
                }
                Answer::Topics(wanted) => {
                    gossip::set_topics(&mut swarm.behaviour_mut().gossip.gossipsub, &mut topics, wanted);
                }
            },
            _ = topics_tick.tick() => {
                let (relay_, answers_tx) = (relay.clone(), answers_tx.clone());
                tokio::spawn(async move {
                    let channels = relay_.gossip_channels().await;
                    let _ = answers_tx.send(Answer::Topics(channels)).await;
                });
            }
            Some(out) = outbound.recv() => {
                // Every call ends in a response or a failure (libp2p times it out), which
                // removes it: the map holds only calls in flight.
                let id = swarm.behaviour_mut().fed.send_request_with_addresses(&out.peer, out.frame, out.addrs);
                calls.insert(id, out.reply);
            }
            _ = forget.tick() => anonymous.forget_idle(),
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Decodes a request frame and answers the handshake. Returns the request (and its channel)
/// when it is for the services.
fn handshake(
    relay: &Relay,
    anonymous: &Anonymous,
    peer: PeerId,
    state: &mut PeerState,
    frame: &[u8],
    channel: ResponseChannel<Vec<u8>>,
    swarm: &mut Swarm<Behaviour>,
) -> Option<(Request, ResponseChannel<Vec<u8>>)> {
    let request = match wire::decode_frame::<Request>(frame) {
        Ok(r) => r,
        Err(e) => {
            relay.metrics().error("bad_request");
            let bad = Response::Error { code: ErrorCode::BadRequest, message: e.to_string() };
            send(swarm, channel, &bad);
            return None;
        }
    };
    if (is_anonymous(&request) || state.device.is_none())
        && let Err(retry_after_ms) = anonymous.check(peer, state.ip)
    {
        relay.metrics().error("rate_limited");
        let limited = Response::Error {
            code: ErrorCode::RateLimited { retry_after_ms },
            message: "too many requests that need no registered device".into(),
        };
        send(swarm, channel, &limited);
        return None;
    }
    match request {
        Request::Challenge { device } => {
            let nonce: [u8; 32] = rand::rng().random();
            state.challenge = Some((device, nonce));
            send(swarm, channel, &Response::Challenge { nonce });
            None
        }
        Request::Authenticate { device, signature } => {
            // A challenge answers once, right or wrong.
            let ok = match state.challenge.take() {
                Some((d, nonce)) if d == device => relay.verify_auth(device, nonce, &signature),
                _ => false,
            };
            let response = if ok {
                state.device = Some(device);
                Response::Authenticated
            } else {
                relay.metrics().error("unauthenticated");
                Response::Error {
                    code: ErrorCode::Unauthenticated,
                    message: "no matching challenge, or a bad signature".into(),
                }
            };
            send(swarm, channel, &response);
            None
        }
        other => Some((other, channel)),
    }
}

fn send(swarm: &mut Swarm<Behaviour>, channel: ResponseChannel<Vec<u8>>, response: &Response) {
    match wire::encode_frame(response) {
        Ok(bytes) => {
            let _ = swarm.behaviour_mut().rr.send_response(channel, bytes);
        }
        Err(e) => tracing::error!(error = %e, "response does not fit a frame"),
    }
}

fn send_fed(
    swarm: &mut Swarm<Behaviour>,
    channel: ResponseChannel<Vec<u8>>,
    response: &FedResponse,
) {
    match wire::encode_frame(response) {
        Ok(bytes) => {
            let _ = swarm.behaviour_mut().fed.send_response(channel, bytes);
        }
        Err(e) => tracing::error!(error = %e, "federation response does not fit a frame"),
    }
}

async fn build_swarm(
    key: &SecretKey,
    net: &NetworkConfig,
    tls: Option<chitchat_net::Tls>,
    gossip: Gossip,
) -> anyhow::Result<Swarm<Behaviour>> {
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(net.max_connections))
        .with_max_established_per_peer(Some(net.max_connections_per_peer))
        .with_max_pending_incoming(Some(net.max_pending_incoming));
    let host =
        HostConfig { idle_timeout: Duration::from_secs(IDLE_TIMEOUT_SECS), lazy: false, tls };
    let swarm = chitchat_net::swarm(keypair(key)?, host, |key| {
        // A `Wait` is answered after up to `MAX_WAIT_MS`; the stream must outlive it.
        let timeout = Duration::from_millis(u64::from(chitchat_proto::wire::MAX_WAIT_MS))
            + Duration::from_secs(10);
        let config = request_response::Config::default()
            .with_request_timeout(timeout)
            .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
        Behaviour {
            limits: connection_limits::Behaviour::new(limits),
            rr: frames(PROTOCOL, ProtocolSupport::Inbound, config),
            fed: frames(
                FEDERATION_PROTOCOL,
                ProtocolSupport::Full,
                request_response::Config::default()
                    .with_request_timeout(crate::federation::CALL_TIMEOUT)
                    .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION),
            ),
            identify: identify::Behaviour::new(identify::Config::new(
                format!("chitchat-relay/{}", crate::VERSION),
                key.public(),
            )),
            gossip,
            rendezvous: rendezvous::server::Behaviour::new(
                rendezvous::server::Config::default()
                    .with_min_ttl(RENDEZVOUS_MIN_TTL)
                    .with_max_ttl(RENDEZVOUS_MAX_TTL)
                    .with_max_registration_total(net.max_rendezvous_registrations as usize)
                    .with_max_registration_per_peer(
                        net.max_rendezvous_registrations_per_peer as usize,
                    ),
            ),
            circuits: libp2p::relay::Behaviour::new(
                key.public().to_peer_id(),
                libp2p::relay::Config {
                    max_reservations: net.max_reservations as usize,
                    max_reservations_per_peer: 4,
                    max_circuits: net.max_circuits as usize,
                    max_circuits_per_peer: 16,
                    max_circuit_duration: Duration::from_secs(120),
                    max_circuit_bytes: 1 << 20,
                    ..libp2p::relay::Config::default()
                },
            ),
        }
    })
    .await?;
    Ok(swarm)
}

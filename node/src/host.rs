//! The node's libp2p host: one swarm carries everything the node says to anyone, driven by one
//! task.
//!
//! - The **relay protocol** (request-response, outbound only): [`Host::call`], used by
//!   [`crate::link::RelayLink`].
//! - **Gossip** (gossipsub with peer scoring and a ban, `chitchat_net::gossip`): the node
//!   subscribes to the topic of every channel it is in ([`Host::set_topics`]) and publishes its
//!   messages there ([`Host::publish`]). What arrives is handed out on a bounded queue
//!   ([`Gossiped`]) and forwarded by gossipsub only once the node reported its verdict
//!   ([`Host::report`]).
//! - **Identify**, so that peers learn each other's listen addresses and protocols.
//!
//! The host listens on the addresses of `[network] listen` and dials `[network] peers` at start
//! (and any peer [`Host::dial`] is given).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chitchat_net::gossip::{self, Gossip, GossipEvent};
use chitchat_net::{HostConfig, frames};
use chitchat_proto::Timestamp;
use chitchat_proto::gossip::Verdict;
use chitchat_proto::ordering::ChannelId;
use futures::StreamExt as _;
use libp2p::gossipsub::{self, MessageId, PublishError, TopicHash};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, identify};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

/// Commands waiting for the swarm task, at most.
const COMMAND_QUEUE: usize = 1024;
/// Gossiped messages waiting for validation, at most: beyond, they are ignored (neither
/// forwarded nor held against their sender).
pub const GOSSIP_QUEUE: usize = 1024;
/// The longest any relay request may take at the transport level (a `Wait` lasts up to a
/// minute).
const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(75);
/// The identify protocol version ChitChat hosts announce.
pub const IDENTIFY_PROTOCOL: &str = "/chitchat/1";

/// Why the host failed to do something.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The swarm could not be built or could not listen.
    #[error("network: {0}")]
    Net(String),
    /// The host's task is gone.
    #[error("host closed")]
    Closed,
    /// A dial was refused at once (a bad address, say).
    #[error("dial: {0}")]
    Dial(String),
}

/// A relay request's answer, or why there is none.
pub type CallResult = Result<Vec<u8>, String>;

/// A message that arrived on a channel's topic, waiting for the node's verdict.
#[derive(Debug)]
pub struct Gossiped {
    /// Its gossipsub id (the BLAKE3 hash of `data`).
    pub id: MessageId,
    /// The peer that forwarded it.
    pub source: PeerId,
    /// The topic it came on.
    pub topic: TopicHash,
    /// The encoded envelope.
    pub data: Vec<u8>,
}

/// Whether a peer is connected, and since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerState {
    /// A connection is established.
    pub connected: bool,
    /// When it came up, or when the last one went down (when watching began, if it never
    /// was up).
    pub since: Timestamp,
}

/// A connected peer, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerInfo {
    /// Its peer id.
    pub peer_id: String,
    /// The addresses of its connections.
    pub addrs: Vec<String>,
    /// Its gossipsub score.
    pub score: Option<f64>,
}

/// What the host's task is asked to do.
enum Command {
    Call { peer: PeerId, addrs: Vec<Multiaddr>, frame: Vec<u8>, reply: oneshot::Sender<CallResult> },
    Reset(PeerId),
    Watch(PeerId, oneshot::Sender<watch::Receiver<PeerState>>),
    Topics(BTreeSet<ChannelId>),
    Publish { channel: ChannelId, data: Vec<u8>, reply: oneshot::Sender<Result<(), String>> },
    Report { id: MessageId, source: PeerId, verdict: Verdict },
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Listening(oneshot::Sender<Vec<Multiaddr>>),
}

#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct Behaviour {
    relay: request_response::Behaviour<chitchat_net::FrameCodec>,
    gossip: Gossip,
    identify: identify::Behaviour,
}

/// A handle on the node's host (cheap to clone).
#[derive(Clone, Debug)]
pub struct Host {
    commands: mpsc::Sender<Command>,
    peer_id: PeerId,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Host {
    /// Starts the host of the device with libp2p `identity`: listens on `listen`, dials
    /// `peers`, and hands gossiped messages to the returned queue.
    pub async fn start(
        identity: libp2p::identity::Keypair,
        listen: &[Multiaddr],
        peers: &[Multiaddr],
    ) -> Result<(Self, mpsc::Receiver<Gossiped>), HostError> {
        let config = HostConfig { idle_timeout: Duration::from_secs(90), lazy: true };
        let gossip = Gossip::new().map_err(|e| HostError::Net(e.to_string()))?;
        let mut swarm = chitchat_net::swarm(identity, config, |key| Behaviour {
            relay: frames(
                chitchat_net::RELAY_PROTOCOL,
                ProtocolSupport::Outbound,
                request_response::Config::default()
                    .with_request_timeout(TRANSPORT_TIMEOUT)
                    .with_max_concurrent_streams(256),
            ),
            gossip,
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.into(),
                key.public(),
            )),
        })
        .await
        .map_err(|e| HostError::Net(e.to_string()))?;
        for addr in listen {
            swarm.listen_on(addr.clone()).map_err(|e| HostError::Net(format!("{addr}: {e}")))?;
        }
        for addr in peers {
            if let Err(e) = swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "cannot dial a configured peer");
            }
        }
        let peer_id = *swarm.local_peer_id();
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let (gossiped, gossip_rx) = mpsc::channel(GOSSIP_QUEUE);
        tokio::spawn(run(swarm, rx, gossiped));
        Ok((Self { commands, peer_id }, gossip_rx))
    }

    /// This host's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, HostError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| HostError::Closed)?;
        rx.await.map_err(|_| HostError::Closed)
    }

    /// Sends a relay request frame to `peer` (dialled at `addrs` if not connected) and
    /// returns the response frame.
    pub async fn call(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        frame: Vec<u8>,
    ) -> Result<CallResult, HostError> {
        self.ask(|reply| Command::Call { peer, addrs, frame, reply }).await
    }

    /// Closes the connections to `peer` (a request to it timed out), so that the next request
    /// dials afresh instead of waiting on a connection the network may have broken silently.
    pub fn reset(&self, peer: PeerId) {
        let _ = self.commands.try_send(Command::Reset(peer));
    }

    /// Whether `peer` is connected, as it changes.
    pub async fn watch(&self, peer: PeerId) -> Result<watch::Receiver<PeerState>, HostError> {
        self.ask(|reply| Command::Watch(peer, reply)).await
    }

    /// Makes the channels' topics the ones this host is subscribed to.
    pub async fn set_topics(&self, channels: BTreeSet<ChannelId>) -> Result<(), HostError> {
        self.commands.send(Command::Topics(channels)).await.map_err(|_| HostError::Closed)
    }

    /// Publishes an encoded envelope on the channel's topic. Fails when no peer of the topic
    /// is connected (then only the relay carries the message).
    pub async fn publish(&self, channel: ChannelId, data: Vec<u8>) -> Result<(), String> {
        self.ask(|reply| Command::Publish { channel, data, reply })
            .await
            .map_err(|e| e.to_string())?
    }

    /// Reports the node's verdict on a gossiped message: forward it, drop it, or drop it and
    /// count it against its source (which is banned past the graylist threshold).
    pub fn report(&self, id: MessageId, source: PeerId, verdict: Verdict) {
        if self.commands.try_send(Command::Report { id, source, verdict }).is_err() {
            // Gossipsub forgets an unreported message after a while: it is not forwarded.
            tracing::debug!("host busy; a gossip verdict is dropped");
        }
    }

    /// Dials a peer.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), HostError> {
        self.ask(|reply| Command::Dial(addr, reply)).await?.map_err(HostError::Dial)
    }

    /// The peers connected now.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, HostError> {
        self.ask(Command::Peers).await
    }

    /// The addresses this host listens on.
    pub async fn listening(&self) -> Result<Vec<Multiaddr>, HostError> {
        self.ask(Command::Listening).await
    }
}

/// The swarm's task: runs commands and swarm events until every handle is dropped.
async fn run(
    mut swarm: libp2p::Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    gossiped: mpsc::Sender<Gossiped>,
) {
    let mut pending: HashMap<OutboundRequestId, oneshot::Sender<CallResult>> = HashMap::new();
    let mut watched: HashMap<PeerId, watch::Sender<PeerState>> = HashMap::new();
    let mut topics: BTreeSet<ChannelId> = BTreeSet::new();
    // The remote address of each connection, by peer.
    let mut remotes: HashMap<PeerId, HashMap<libp2p::swarm::ConnectionId, Multiaddr>> =
        HashMap::new();
    let set = |watched: &HashMap<PeerId, watch::Sender<PeerState>>, peer: &PeerId, up: bool| {
        if let Some(w) = watched.get(peer) {
            w.send_if_modified(|s| {
                let changed = s.connected != up;
                if changed {
                    *s = PeerState { connected: up, since: crate::engine::now() };
                }
                changed
            });
        }
    };
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { return };
                match command {
                    Command::Call { peer, addrs, frame, reply } => {
                        let id = swarm.behaviour_mut().relay.send_request_with_addresses(&peer, frame, addrs);
                        pending.insert(id, reply);
                    }
                    Command::Reset(peer) => {
                        if swarm.is_connected(&peer) {
                            tracing::debug!(%peer, "a request timed out; reconnecting");
                            let _ = swarm.disconnect_peer_id(peer);
                        }
                    }
                    Command::Watch(peer, reply) => {
                        let connected = swarm.is_connected(&peer);
                        let w = watched.entry(peer).or_insert_with(|| {
                            watch::Sender::new(PeerState { connected, since: crate::engine::now() })
                        });
                        let _ = reply.send(w.subscribe());
                    }
                    Command::Topics(wanted) => {
                        let g = &mut swarm.behaviour_mut().gossip.gossipsub;
                        for gone in topics.difference(&wanted) {
                            g.unsubscribe(&gossip::topic(gone));
                        }
                        for new in wanted.difference(&topics) {
                            if let Err(e) = gossip::subscribe(g, new) {
                                tracing::warn!(channel = %new, error = %e, "cannot subscribe to a channel's topic");
                            }
                        }
                        topics = wanted;
                    }
                    Command::Publish { channel, data, reply } => {
                        let g = &mut swarm.behaviour_mut().gossip.gossipsub;
                        let r = match g.publish(gossip::topic(&channel), data) {
                            Ok(_) => Ok(()),
                            Err(PublishError::NoPeersSubscribedToTopic) => Err("no peer of the channel is connected".into()),
                            Err(e) => Err(e.to_string()),
                        };
                        let _ = reply.send(r);
                    }
                    Command::Report { id, source, verdict } => {
                        if swarm.behaviour_mut().gossip.report(&id, &source, verdict) {
                            tracing::warn!(peer = %source, "banned a peer that sent forged gossip");
                        }
                    }
                    Command::Dial(addr, reply) => {
                        let _ = reply.send(swarm.dial(addr).map_err(|e| e.to_string()));
                    }
                    Command::Peers(reply) => {
                        let g = &swarm.behaviour().gossip.gossipsub;
                        let peers = swarm.connected_peers().map(|p| PeerInfo {
                            peer_id: p.to_string(),
                            addrs: remotes.get(p).map(|c| c.values().map(ToString::to_string).collect()).unwrap_or_default(),
                            score: g.peer_score(p),
                        }).collect();
                        let _ = reply.send(peers);
                    }
                    Command::Listening(reply) => {
                        let _ = reply.send(swarm.listeners().cloned().collect());
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(BehaviourEvent::Relay(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                })) => {
                    if let Some(r) = pending.remove(&request_id) {
                        let _ = r.send(Ok(response));
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Relay(request_response::Event::OutboundFailure {
                    request_id, error, peer, ..
                })) => {
                    if let Some(r) = pending.remove(&request_id) {
                        let _ = r.send(Err(error.to_string()));
                    }
                    if matches!(error, request_response::OutboundFailure::Timeout)
                        && swarm.is_connected(&peer)
                    {
                        let _ = swarm.disconnect_peer_id(peer);
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Gossip(GossipEvent::Gossipsub(
                    gossipsub::Event::Message { propagation_source, message_id, message },
                ))) => {
                    let g = Gossiped {
                        id: message_id,
                        source: propagation_source,
                        topic: message.topic,
                        data: message.data,
                    };
                    if let Err(mpsc::error::TrySendError::Full(g)) = gossiped.try_send(g) {
                        // Too much at once: not judged, so neither forwarded nor held against
                        // the peer (the inbox carries what members send).
                        let verdict = Verdict::Ignore(chitchat_proto::gossip::Unjudged::UnknownEpoch);
                        swarm.behaviour_mut().gossip.report(&g.id, &g.source, verdict);
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                    remotes.entry(peer_id).or_default().insert(connection_id, endpoint.get_remote_address().clone());
                    set(&watched, &peer_id, true);
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                    tracing::debug!(peer = %peer_id, ?cause, "connection closed");
                    if let Some(c) = remotes.get_mut(&peer_id) {
                        c.remove(&connection_id);
                    }
                    if num_established == 0 {
                        remotes.remove(&peer_id);
                        set(&watched, &peer_id, false);
                    }
                }
                SwarmEvent::NewListenAddr { address, .. } => {
                    tracing::info!(%address, "listening for peers");
                }
                _ => {}
            },
        }
    }
}

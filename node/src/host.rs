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
//! - **Circuit relay v2** and **DCUtR**: the node takes a reservation at its relay and listens
//!   on the circuit address it gives (`/p2p/RELAY/p2p-circuit`), so that a member that cannot
//!   reach it directly reaches it through the relay; DCUtR then tries to replace the relayed
//!   connection by a direct one (hole punching).
//! - **Rendezvous** at the node's relay ([`Host::rendezvous_at`]): the node registers its
//!   addresses under the topic of every channel it is in, discovers the other members
//!   registered there, and dials them (at most [`MAX_DIRECT_PEERS`] connections to peers).
//!
//! - The **peer protocol** (`chitchat_proto::peer`, request-response both ways): what nodes ask
//!   each other directly ([`Host::ask_peer`]); requests from peers are handed out on a bounded
//!   queue ([`PeerAsk`]) and answered with [`Host::answer`].
//! - **mDNS** (`[network] mdns`): peers on the local network are found and dialled (within
//!   [`MAX_DIRECT_PEERS`]); [`Host::lan`] lists them.
//!
//! The host listens on the addresses of `[network] listen` and dials `[network] peers` at start
//! (and any peer [`Host::dial`] is given).
//!
//! A **relay-only** host (`[network] relay_only`) connects to its relay and to no one else: it
//! listens nowhere, registers nothing and discovers no one, dials no circuit, and an allow-list
//! of one peer (the relay) refuses every other connection, in or out. Gossip still flows, through
//! the relay, which is a gossip peer of the channels it orders.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chitchat_net::gossip::{self, Gossip, GossipEvent};
use chitchat_net::{HostConfig, frames};
use chitchat_proto::Timestamp;
use chitchat_proto::gossip::Verdict;
use chitchat_proto::ordering::ChannelId;
use futures::StreamExt as _;
use libp2p::gossipsub::{self, MessageId, PublishError, TopicHash};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::ResponseChannel;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, allow_block_list, dcutr, identify, mdns, relay, rendezvous};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

/// The first pause before a fallen circuit at the relay is asked for again, and the longest.
const CIRCUIT_RETRY_FIRST: Duration = Duration::from_secs(2);
const CIRCUIT_RETRY_MAX: Duration = Duration::from_secs(60);

/// Listens on a circuit through the relay (a reservation); `None` if it cannot at once.
fn listen_circuit(
    swarm: &mut libp2p::Swarm<Behaviour>,
    addr: &Multiaddr,
) -> Option<libp2p::core::transport::ListenerId> {
    match swarm.listen_on(addr.clone()) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot listen through the relay");
            None
        }
    }
}

/// The longest a request to a peer may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(20);
/// Commands waiting for the swarm task, at most.
const COMMAND_QUEUE: usize = 1024;
/// Gossiped messages waiting for validation, at most: beyond, they are ignored (neither
/// forwarded nor held against their sender).
pub const GOSSIP_QUEUE: usize = 1024;
/// The longest any relay request may take at the transport level (a `Wait` lasts up to a
/// minute).
const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(75);
/// Connections to peers found by discovery, at most (the relay and peers that dial in do not
/// count against it).
pub const MAX_DIRECT_PEERS: usize = 64;
/// Between two discovery rounds at the rendezvous point.
const DISCOVER_EVERY: Duration = Duration::from_secs(5);
/// Topics asked about in one discovery round (each topic comes round again after the others).
const DISCOVER_PER_ROUND: usize = 8;
/// How long a registration at the rendezvous point lasts, in seconds, and how often it is
/// renewed: a node that went away is listed no longer than this.
const REGISTRATION_TTL: u64 = 15 * 60;
const REGISTER_EVERY: Duration = Duration::from_secs(5 * 60);
/// How long after a dial of a peer's direct addresses its circuits are dialled instead (or, when
/// connected through the relay, its direct addresses tried again).
const DIRECT_RETRY: Duration = Duration::from_secs(30);
/// Requests from peers waiting for the node, at most: beyond, they are refused at once.
pub const PEER_QUEUE: usize = 256;
/// Peers found by mDNS that are remembered, at most.
pub const MAX_LAN_PEERS: usize = 256;
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

/// A request a peer sent, waiting for the node's answer ([`Host::answer`]).
#[derive(Debug)]
pub struct PeerAsk {
    /// The peer that asks (its key is the asking device's).
    pub peer: PeerId,
    /// The request frame.
    pub frame: Vec<u8>,
    /// Where the answer goes.
    pub channel: ResponseChannel<Vec<u8>>,
}

/// A peer found on the local network by mDNS.
#[derive(Clone, Debug, Serialize)]
pub struct LanPeer {
    /// Its peer id.
    pub peer_id: String,
    /// The addresses it announced.
    pub addrs: Vec<String>,
    /// Whether it is connected now.
    pub connected: bool,
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
    /// Whether one of its connections runs through a relay (a circuit).
    pub relayed: bool,
    /// Whether one of its connections is direct.
    pub direct: bool,
    /// Its gossipsub score.
    pub score: Option<f64>,
}

/// What the host's task is asked to do.
enum Command {
    Call {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        frame: Vec<u8>,
        reply: oneshot::Sender<CallResult>,
    },
    Reset(PeerId),
    Watch(PeerId, oneshot::Sender<watch::Receiver<PeerState>>),
    Topics(BTreeSet<ChannelId>),
    Publish {
        channel: ChannelId,
        report: bool,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Report {
        id: MessageId,
        source: PeerId,
        verdict: Verdict,
    },
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Listening(oneshot::Sender<Vec<Multiaddr>>),
    RendezvousAt(PeerId, Vec<Multiaddr>),
    AskPeer {
        peer: PeerId,
        frame: Vec<u8>,
        reply: oneshot::Sender<CallResult>,
    },
    Answer(ResponseChannel<Vec<u8>>, Vec<u8>),
    Lan(oneshot::Sender<Vec<LanPeer>>),
}

#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct Behaviour {
    relay: request_response::Behaviour<chitchat_net::FrameCodec>,
    gossip: Gossip,
    identify: identify::Behaviour,
    rendezvous: rendezvous::client::Behaviour,
    circuits: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    peer: request_response::Behaviour<chitchat_net::FrameCodec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    /// Relay-only: the one peer this host may be connected to.
    only: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
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
    /// `peers`, finds peers on the local network if `mdns`, and hands gossiped messages and
    /// peers' requests to the returned queues. A `relay_only` host connects to its relay alone
    /// (see the module's text).
    pub async fn start(
        identity: libp2p::identity::Keypair,
        listen: &[Multiaddr],
        peers: &[Multiaddr],
        relay_only: bool,
        mdns: bool,
        tls: Option<chitchat_net::Tls>,
    ) -> Result<(Self, mpsc::Receiver<Gossiped>, mpsc::Receiver<PeerAsk>), HostError> {
        if relay_only && !(listen.is_empty() && peers.is_empty() && !mdns) {
            return Err(HostError::Net(
                "a relay-only host listens nowhere, dials no peer and looks for none".into(),
            ));
        }
        let local = identity.public().to_peer_id();
        let mdns = if mdns {
            // Records live 2 minutes (a node that left is forgotten soon); the network is asked
            // again every 30 s, as well as whenever a peer announces itself.
            let config = mdns::Config {
                ttl: Duration::from_secs(120),
                query_interval: Duration::from_secs(30),
                enable_ipv6: false,
            };
            Some(
                mdns::tokio::Behaviour::new(config, local)
                    .map_err(|e| HostError::Net(format!("mdns: {e}")))?,
            )
        } else {
            None
        };
        let config = HostConfig { idle_timeout: Duration::from_secs(90), lazy: true, tls };
        let gossip = Gossip::new().map_err(|e| HostError::Net(e.to_string()))?;
        let mut swarm =
            chitchat_net::swarm_with_relay_client(identity, config, |key, circuits| Behaviour {
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
                rendezvous: rendezvous::client::Behaviour::new(key.clone()),
                circuits,
                dcutr: dcutr::Behaviour::new(key.public().to_peer_id()),
                peer: frames(
                    chitchat_net::PEER_PROTOCOL,
                    ProtocolSupport::Full,
                    request_response::Config::default()
                        .with_request_timeout(PEER_TIMEOUT)
                        .with_max_concurrent_streams(64),
                ),
                mdns: Toggle::from(mdns),
                only: Toggle::from(relay_only.then(allow_block_list::Behaviour::default)),
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
        let (asks, asks_rx) = mpsc::channel(PEER_QUEUE);
        tokio::spawn(run(swarm, rx, gossiped, asks, relay_only));
        Ok((Self { commands, peer_id }, gossip_rx, asks_rx))
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
        self.ask(|reply| Command::Publish { channel, report: false, data, reply })
            .await
            .map_err(|e| e.to_string())?
    }

    /// Publishes an epoch report (its encoding) on its channel's report topic.
    pub async fn publish_report(&self, channel: ChannelId, data: Vec<u8>) -> Result<(), String> {
        self.ask(|reply| Command::Publish { channel, report: true, data, reply })
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

    /// Uses `peer` (the node's relay, at `addrs`) as the rendezvous point where the members of
    /// the node's channels find each other, and as the relay of the circuits through which
    /// they reach it.
    pub async fn rendezvous_at(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    ) -> Result<(), HostError> {
        self.commands.send(Command::RendezvousAt(peer, addrs)).await.map_err(|_| HostError::Closed)
    }

    /// The addresses this host listens on.
    pub async fn listening(&self) -> Result<Vec<Multiaddr>, HostError> {
        self.ask(Command::Listening).await
    }

    /// Sends a peer-protocol request frame to `peer` (dialled at the addresses the host knows
    /// for it: from mDNS, identify or an earlier connection) and returns the answer's frame.
    pub async fn ask_peer(&self, peer: PeerId, frame: Vec<u8>) -> Result<CallResult, HostError> {
        self.ask(|reply| Command::AskPeer { peer, frame, reply }).await
    }

    /// Answers a peer's request.
    pub async fn answer(
        &self,
        channel: ResponseChannel<Vec<u8>>,
        frame: Vec<u8>,
    ) -> Result<(), HostError> {
        self.commands.send(Command::Answer(channel, frame)).await.map_err(|_| HostError::Closed)
    }

    /// The peers mDNS found on the local network.
    pub async fn lan(&self) -> Result<Vec<LanPeer>, HostError> {
        self.ask(Command::Lan).await
    }
}

/// The swarm's task: runs commands and swarm events until every handle is dropped.
async fn run(
    mut swarm: libp2p::Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    gossiped: mpsc::Sender<Gossiped>,
    asks: mpsc::Sender<PeerAsk>,
    relay_only: bool,
) {
    let mut pending: HashMap<OutboundRequestId, oneshot::Sender<CallResult>> = HashMap::new();
    let mut asked: HashMap<OutboundRequestId, oneshot::Sender<CallResult>> = HashMap::new();
    // What mDNS found: each peer's addresses.
    let mut lan: HashMap<PeerId, BTreeSet<Multiaddr>> = HashMap::new();
    let mut watched: HashMap<PeerId, watch::Sender<PeerState>> = HashMap::new();
    let mut topics: BTreeSet<ChannelId> = BTreeSet::new();
    let mut discovery = Discovery::default();
    // The circuit this node listens on at its relay, its listener while it stands, and when to
    // ask for it again once it fell (the relay restarted, the connection broke, a reservation
    // was refused): a node stays reachable through its relay without a restart of its own.
    let mut circuit: Option<(Multiaddr, Option<libp2p::core::transport::ListenerId>, Duration)> =
        None;
    let mut circuit_retry: Option<tokio::time::Instant> = None;
    let mut discover_tick = tokio::time::interval(DISCOVER_EVERY);
    // The remote address of each connection, by peer.
    let mut remotes: HashMap<PeerId, HashMap<libp2p::swarm::ConnectionId, (Multiaddr, bool)>> =
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
                        let (gone, new) = gossip::set_topics(g, &mut topics, wanted);
                        for channel in &gone {
                            discovery.forget(&mut swarm, channel);
                        }
                        for channel in new {
                            discovery.due.push_front(channel);
                        }
                        discovery.round(&mut swarm, &topics);
                    }
                    Command::RendezvousAt(peer, _) if relay_only => {
                        if let Some(only) = swarm.behaviour_mut().only.as_mut() {
                            only.allow_peer(peer);
                        }
                    }
                    Command::RendezvousAt(peer, addrs) => {
                        discovery.point = Some(peer);
                        discovery.round(&mut swarm, &topics);
                        // A reservation at the relay: the circuit address becomes one of the
                        // node's (registered with the others at the rendezvous point).
                        let relay_addr = addrs.iter().find(|a| !a.iter().any(|p| matches!(p, Protocol::P2pCircuit)));
                        if let Some(addr) = relay_addr {
                            let addr = addr.clone().with_p2p(peer).unwrap_or_else(|a| a).with(Protocol::P2pCircuit);
                            if circuit.as_ref().is_none_or(|(a, _, _)| *a != addr) {
                                if let Some((_, Some(old), _)) = circuit.take() {
                                    swarm.remove_listener(old);
                                }
                                let id = listen_circuit(&mut swarm, &addr);
                                if id.is_none() {
                                    circuit_retry = Some(tokio::time::Instant::now() + CIRCUIT_RETRY_FIRST);
                                }
                                circuit = Some((addr, id, CIRCUIT_RETRY_FIRST));
                            }
                        }
                    }
                    Command::Publish { channel, report, data, reply } => {
                        let g = &mut swarm.behaviour_mut().gossip.gossipsub;
                        let topic = if report { gossip::report_topic(&channel) } else { gossip::topic(&channel) };
                        let r = match g.publish(topic, data) {
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
                    Command::Dial(_, reply) if relay_only => {
                        let _ = reply.send(Err("this node is relay-only: it dials no peer".into()));
                    }
                    Command::Dial(addr, reply) => {
                        let _ = reply.send(swarm.dial(addr).map_err(|e| e.to_string()));
                    }
                    Command::Peers(reply) => {
                        let g = &swarm.behaviour().gossip.gossipsub;
                        let peers = swarm.connected_peers().map(|p| PeerInfo {
                            peer_id: p.to_string(),
                            addrs: remotes.get(p).map(|c| c.values().map(|(a, _)| a.to_string()).collect()).unwrap_or_default(),
                            relayed: remotes.get(p).is_some_and(|c| c.values().any(|(_, r)| *r)),
                            direct: remotes.get(p).is_some_and(|c| c.values().any(|(_, r)| !*r)),
                            score: g.peer_score(p),
                        }).collect();
                        let _ = reply.send(peers);
                    }
                    Command::Listening(reply) => {
                        let _ = reply.send(swarm.listeners().cloned().collect());
                    }
                    Command::AskPeer { peer, reply, .. } if relay_only => {
                        let _ = reply.send(Err(format!("this node is relay-only: it asks no peer ({peer})")));
                    }
                    Command::AskPeer { peer, frame, reply } => {
                        let id = swarm.behaviour_mut().peer.send_request(&peer, frame);
                        asked.insert(id, reply);
                    }
                    Command::Answer(channel, frame) => {
                        let _ = swarm.behaviour_mut().peer.send_response(channel, frame);
                    }
                    Command::Lan(reply) => {
                        let peers = lan.iter().map(|(p, addrs)| LanPeer {
                            peer_id: p.to_string(),
                            addrs: addrs.iter().map(ToString::to_string).collect(),
                            connected: swarm.is_connected(p),
                        }).collect();
                        let _ = reply.send(peers);
                    }
                }
            }
            _ = discover_tick.tick() => {
                discovery.round(&mut swarm, &topics);
                if circuit_retry.is_some_and(|at| at <= tokio::time::Instant::now())
                    && let Some((addr, id, backoff)) = circuit.as_mut()
                {
                    circuit_retry = None;
                    *id = listen_circuit(&mut swarm, addr);
                    *backoff = (*backoff * 2).min(CIRCUIT_RETRY_MAX);
                    if id.is_none() {
                        circuit_retry = Some(tokio::time::Instant::now() + *backoff);
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
                SwarmEvent::Behaviour(BehaviourEvent::Peer(request_response::Event::Message {
                    peer, message, ..
                })) => match message {
                    request_response::Message::Request { request, channel, .. } => {
                        if let Err(mpsc::error::TrySendError::Full(ask)) = asks.try_send(PeerAsk { peer, frame: request, channel }) {
                            // Too many at once: closing the stream tells the peer so at once.
                            drop(ask);
                            tracing::debug!(%peer, "peer request refused: the node is busy");
                        }
                    }
                    request_response::Message::Response { request_id, response } => {
                        if let Some(r) = asked.remove(&request_id) {
                            let _ = r.send(Ok(response));
                        }
                    }
                },
                SwarmEvent::Behaviour(BehaviourEvent::Peer(request_response::Event::OutboundFailure {
                    request_id, error, ..
                })) => {
                    if let Some(r) = asked.remove(&request_id) {
                        let _ = r.send(Err(error.to_string()));
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                    for (peer, addr) in found {
                        if peer == *swarm.local_peer_id() || (!lan.contains_key(&peer) && lan.len() >= MAX_LAN_PEERS) {
                            continue;
                        }
                        lan.entry(peer).or_default().insert(addr.clone());
                        let direct = remotes.values().filter(|c| c.values().any(|(_, r)| !r)).count();
                        if !swarm.is_connected(&peer) && direct < MAX_DIRECT_PEERS {
                            tracing::debug!(%peer, %addr, "found on the local network; dialling");
                            let opts = DialOpts::peer_id(peer).addresses(vec![addr]).build();
                            if let Err(e) = swarm.dial(opts) {
                                tracing::debug!(%peer, error = %e, "cannot dial a peer found on the local network");
                            }
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                    for (peer, addr) in gone {
                        if let Some(addrs) = lan.get_mut(&peer) {
                            addrs.remove(&addr);
                            if addrs.is_empty() {
                                lan.remove(&peer);
                            }
                        }
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
                    let relayed = endpoint.is_relayed();
                    let connections = remotes.entry(peer_id).or_default();
                    // A direct connection replaces those through a relay, and a connection
                    // through a relay is not kept beside a direct one: gossipsub hands a peer's
                    // messages to whichever of its connections takes them first, and a relay
                    // that stops takes its circuits, and what was sent on them, with it.
                    if !relayed {
                        for (id, _) in connections.iter().filter(|(_, (_, r))| *r) {
                            swarm.close_connection(*id);
                        }
                    } else if connections.values().any(|(_, r)| !r) {
                        swarm.close_connection(connection_id);
                    }
                    connections.insert(connection_id, (endpoint.get_remote_address().clone(), relayed));
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
                SwarmEvent::NewListenAddr { address, listener_id } => {
                    if let Some((_, id, backoff)) = circuit.as_mut()
                        && *id == Some(listener_id)
                    {
                        // Reserved: the next fall starts from the first pause again.
                        *backoff = CIRCUIT_RETRY_FIRST;
                    }
                    tracing::info!(%address, "listening for peers");
                    // What the node listens on is what it registers at the rendezvous point.
                    swarm.add_external_address(address);
                    discovery.registered.clear();
                }
                SwarmEvent::ExpiredListenAddr { address, .. } => {
                    swarm.remove_external_address(&address);
                }
                SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                    if let Some((addr, id, backoff)) = circuit.as_mut()
                        && *id == Some(listener_id)
                    {
                        tracing::info!(%addr, ?reason, "the circuit at the relay fell; asking again");
                        *id = None;
                        circuit_retry = Some(tokio::time::Instant::now() + *backoff);
                    }
                }

                SwarmEvent::Behaviour(BehaviourEvent::Rendezvous(event)) => {
                    let has_direct = |p: &PeerId| remotes.get(p).is_some_and(|c| c.values().any(|(_, relayed)| !relayed));
                    discovery.on_event(&mut swarm, event, has_direct);
                }
                _ => {}
            },
        }
    }
}

/// Finding the other members of the node's channels at the rendezvous point (the node's
/// relay): the node's own registration under each channel's topic, renewed every
/// [`REGISTER_EVERY`], and discovery of a few topics each round.
#[derive(Default)]
struct Discovery {
    point: Option<PeerId>,
    /// When each topic was last registered.
    registered: HashMap<ChannelId, std::time::Instant>,
    /// Topics to discover, the next first.
    due: std::collections::VecDeque<ChannelId>,
    /// When each peer's direct addresses were last dialled.
    tried_direct: HashMap<PeerId, std::time::Instant>,
}

impl Discovery {
    fn namespace(channel: &ChannelId) -> Option<rendezvous::Namespace> {
        rendezvous::Namespace::new(chitchat_proto::gossip::topic(channel)).ok()
    }

    /// Registers what needs it and discovers the next few topics, if the rendezvous point is
    /// connected.
    fn round(&mut self, swarm: &mut libp2p::Swarm<Behaviour>, topics: &BTreeSet<ChannelId>) {
        let Some(point) = self.point.filter(|p| swarm.is_connected(p)) else { return };
        let now = std::time::Instant::now();
        let has_addrs = swarm.external_addresses().next().is_some();
        for channel in topics {
            let fresh = self
                .registered
                .get(channel)
                .is_some_and(|at| now.duration_since(*at) < REGISTER_EVERY);
            if fresh || !has_addrs {
                continue;
            }
            let Some(ns) = Self::namespace(channel) else { continue };
            match swarm.behaviour_mut().rendezvous.register(ns, point, Some(REGISTRATION_TTL)) {
                Ok(()) => {
                    self.registered.insert(*channel, now);
                }
                Err(e) => {
                    tracing::debug!(%channel, error = %e, "cannot register at the rendezvous point")
                }
            }
        }
        self.due.retain(|c| topics.contains(c));
        for c in topics {
            if !self.due.contains(c) {
                self.due.push_back(*c);
            }
        }
        for _ in 0..DISCOVER_PER_ROUND.min(self.due.len()) {
            let Some(channel) = self.due.pop_front() else { break };
            if let Some(ns) = Self::namespace(&channel) {
                swarm.behaviour_mut().rendezvous.discover(
                    Some(ns),
                    None,
                    Some(MAX_DIRECT_PEERS as u64),
                    point,
                );
            }
            self.due.push_back(channel);
        }
    }

    /// Stops announcing a channel this node left.
    fn forget(&mut self, swarm: &mut libp2p::Swarm<Behaviour>, channel: &ChannelId) {
        self.due.retain(|c| c != channel);
        if self.registered.remove(channel).is_some()
            && let (Some(point), Some(ns)) = (self.point, Self::namespace(channel))
        {
            swarm.behaviour_mut().rendezvous.unregister(ns, point);
        }
    }

    /// Dials the members found, while the node has room for more peers: their direct
    /// addresses first (also when the only connection runs through the relay: DCUtR's hole
    /// punching is for NATs, a reachable address needs none), their circuits when a direct dial
    /// failed within [`DIRECT_RETRY`].
    fn on_event(
        &mut self,
        swarm: &mut libp2p::Swarm<Behaviour>,
        event: rendezvous::client::Event,
        has_direct: impl Fn(&PeerId) -> bool,
    ) {
        match event {
            rendezvous::client::Event::Discovered { registrations, .. } => {
                let me = *swarm.local_peer_id();
                let now = std::time::Instant::now();
                self.tried_direct.retain(|_, at| now.duration_since(*at) < DIRECT_RETRY);
                for r in registrations {
                    let peer = r.record.peer_id();
                    let peers = swarm.connected_peers().count();
                    if peer == me || has_direct(&peer) {
                        continue;
                    }
                    let connected = swarm.is_connected(&peer);
                    let (circuits, direct): (Vec<Multiaddr>, Vec<Multiaddr>) = r
                        .record
                        .addresses()
                        .iter()
                        .cloned()
                        .partition(|a| a.iter().any(|p| matches!(p, Protocol::P2pCircuit)));
                    let addrs = if !direct.is_empty() && !self.tried_direct.contains_key(&peer) {
                        self.tried_direct.insert(peer, now);
                        direct
                    } else if !connected {
                        circuits
                    } else {
                        continue;
                    };
                    if addrs.is_empty() || (!connected && peers >= MAX_DIRECT_PEERS) {
                        continue;
                    }
                    tracing::debug!(%peer, ?addrs, "dialling a member found at the rendezvous point");
                    let opts = DialOpts::peer_id(peer)
                        .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                        .addresses(addrs)
                        .build();
                    if let Err(e) = swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "cannot dial a member");
                    }
                }
            }
            rendezvous::client::Event::RegisterFailed { namespace, error, .. } => {
                tracing::debug!(%namespace, ?error, "registration refused at the rendezvous point");
            }
            rendezvous::client::Event::DiscoverFailed { namespace, error, .. } => {
                tracing::debug!(?namespace, ?error, "discovery refused at the rendezvous point");
            }
            _ => {}
        }
    }
}

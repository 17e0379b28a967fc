//! Gossipsub as ChitChat runs it: one topic per channel (`chitchat_proto::gossip::topic`),
//! envelopes that carry their own outer signature (so gossipsub's messages are anonymous: no
//! author, no sequence number, no libp2p signature; a relay may publish for a relay-only
//! member), content-addressed message ids, and manual validation: nothing is forwarded before
//! the application judged it ([`report`]), and what it rejects counts against the peer that
//! sent it (peer scoring: a peer past the graylist threshold is ignored).

use std::collections::BTreeSet;
use std::time::Duration;

use chitchat_proto::gossip::{GossipEnvelope, MAX_GOSSIP_AGE_MS, Verdict, message_id};
use chitchat_proto::ordering::ChannelId;
use libp2p::gossipsub::{
    self, ConfigBuilder, IdentTopic, MessageAcceptance, MessageAuthenticity, MessageId,
    PeerScoreParams, PeerScoreThresholds, TopicHash, TopicScoreParams, ValidationMode,
};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{PeerId, allow_block_list};
use prometheus_client::registry::Registry;

use crate::NetError;

mod woken;
pub use woken::Woken;

/// Largest gossipsub message: one envelope, with room for the RPC framing.
pub const MAX_TRANSMIT: usize =
    <GossipEnvelope as chitchat_proto::codec::Canonical>::MAX_LEN + 1024;
/// Between two heartbeats (mesh upkeep, lazy gossip).
pub const HEARTBEAT: Duration = Duration::from_millis(700);
/// Score below which a peer's gossip is ignored (IHAVE, IWANT).
pub const GOSSIP_THRESHOLD: f64 = -10.0;
/// Score below which a peer gets none of our publications.
pub const PUBLISH_THRESHOLD: f64 = -50.0;
/// Score below which everything from a peer is ignored.
pub const GRAYLIST_THRESHOLD: f64 = -80.0;
/// Peers banned at once, at most (peer ids cost nothing to make: beyond this, an earlier ban
/// is lifted to make room).
pub const MAX_BANNED: usize = 65_536;

/// Gossip with a ban at the connection level: a peer dropped for forged envelopes has its
/// connections closed and cannot connect again (unless [`MAX_BANNED`] later bans push it out).
#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
pub struct Gossip {
    /// Gossipsub, configured by [`behaviour`], with handlers that are woken when messages
    /// wait for them ([`Woken`]).
    pub gossipsub: Woken,
    /// The banned peers.
    pub banned: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let banned = self.banned.blocked_peers().len();
        f.debug_struct("Gossip").field("banned", &banned).finish_non_exhaustive()
    }
}

impl Gossip {
    /// Gossipsub as [`behaviour`] configures it, and no one banned.
    pub fn new() -> Result<Self, NetError> {
        Ok(Self {
            gossipsub: Woken::new(behaviour()?),
            banned: allow_block_list::Behaviour::default(),
        })
    }

    /// The same, recording gossipsub's own metrics in `registry` (messages received with and
    /// without duplicates, bytes sent and received, mesh sizes, scores, validation outcomes,
    /// per topic, for at most 300 topics: topic names reveal no channel).
    pub fn with_metrics(registry: &mut Registry) -> Result<Self, NetError> {
        let gossipsub = behaviour()?.with_metrics(registry, gossipsub::MetricsConfig::default());
        Ok(Self {
            gossipsub: Woken::new(gossipsub),
            banned: allow_block_list::Behaviour::default(),
        })
    }

    /// [`report`]s a verdict, and bans the peer that sent it once it is past the graylist
    /// threshold: its connections close, and new ones are refused. Returns whether it was
    /// banned now.
    pub fn report(&mut self, id: &MessageId, source: &PeerId, verdict: Verdict) -> bool {
        if !report(&mut self.gossipsub, id, source, verdict) {
            return false;
        }
        if self.banned.blocked_peers().len() >= MAX_BANNED
            && let Some(earlier) = self.banned.blocked_peers().iter().next().copied()
        {
            self.banned.unblock_peer(earlier);
        }
        self.banned.block_peer(*source)
    }
}

/// The gossipsub behaviour, configured (see the module's text). Mesh: 6 peers (4 to 12), lazy
/// gossip to 6 more, three heartbeats of history, flood publish; seen ids kept for as long as
/// an envelope may be forwarded ([`MAX_GOSSIP_AGE_MS`]) and a minute more.
pub fn behaviour() -> Result<gossipsub::Behaviour, NetError> {
    let config = ConfigBuilder::default()
        .protocol_id_prefix("/chitchat/gossip")
        .validation_mode(ValidationMode::Anonymous)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| MessageId::from(message_id(&m.data).to_vec()))
        .max_transmit_size(MAX_TRANSMIT)
        .heartbeat_interval(HEARTBEAT)
        .mesh_n(6)
        .mesh_n_low(4)
        .mesh_n_high(12)
        .gossip_lazy(6)
        .history_gossip(3)
        .flood_publish(true)
        .duplicate_cache_time(Duration::from_millis(MAX_GOSSIP_AGE_MS) + Duration::from_secs(60))
        .build()
        .map_err(|e| NetError::Transport(format!("gossipsub config: {e}")))?;
    let mut b = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, config)
        .map_err(|e| NetError::Transport(format!("gossipsub: {e}")))?;
    let thresholds = PeerScoreThresholds {
        gossip_threshold: GOSSIP_THRESHOLD,
        publish_threshold: PUBLISH_THRESHOLD,
        graylist_threshold: GRAYLIST_THRESHOLD,
        ..PeerScoreThresholds::default()
    };
    // Peers on one address are suspected of being one operator's Sybils (gossipsub's IP
    // colocation penalty), except on loopback, where every host of a test or of one machine
    // sits.
    let params = PeerScoreParams {
        ip_colocation_factor_whitelist: [
            std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
            std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ]
        .into(),
        ..PeerScoreParams::default()
    };
    b.with_peer_score(params, thresholds)
        .map_err(|e| NetError::Transport(format!("gossipsub scoring: {e}")))?;
    Ok(b)
}

/// A channel's topic.
pub fn topic(channel: &ChannelId) -> IdentTopic {
    IdentTopic::new(chitchat_proto::gossip::topic(channel))
}

/// The topic of a channel's epoch reports.
pub fn report_topic(channel: &ChannelId) -> IdentTopic {
    IdentTopic::new(chitchat_proto::gossip::report_topic(channel))
}

/// The scoring of a channel's topic: a rejected envelope weighs heavily (two put the sender
/// past the graylist threshold), delivering first and staying in the mesh count a little, and
/// a quiet peer is never penalised for being quiet (a chat's traffic is too sparse for
/// gossipsub's mesh-delivery penalties).
pub fn topic_params() -> TopicScoreParams {
    TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 0.5,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 20.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -50.0,
        invalid_message_deliveries_decay: 0.9,
        ..TopicScoreParams::default()
    }
}

/// Subscribes to a channel's topics (its messages' and its epoch reports'), with their
/// scoring; returns the messages' topic.
pub fn subscribe(b: &mut gossipsub::Behaviour, channel: &ChannelId) -> Result<TopicHash, NetError> {
    for t in [topic(channel), report_topic(channel)] {
        b.subscribe(&t).map_err(|e| NetError::Transport(format!("subscribe: {e}")))?;
        b.set_topic_params(t, topic_params())
            .map_err(|e| NetError::Transport(format!("topic scoring: {e}")))?;
    }
    Ok(topic(channel).hash())
}

/// Makes `wanted` the channels whose topics `b` is subscribed to, `current` being those it is
/// subscribed to now (updated). Returns the channels left and those joined.
pub fn set_topics(
    b: &mut gossipsub::Behaviour,
    current: &mut BTreeSet<ChannelId>,
    wanted: BTreeSet<ChannelId>,
) -> (Vec<ChannelId>, Vec<ChannelId>) {
    let gone: Vec<ChannelId> = current.difference(&wanted).copied().collect();
    let new: Vec<ChannelId> = wanted.difference(current).copied().collect();
    for channel in &gone {
        b.unsubscribe(&topic(channel));
        b.unsubscribe(&report_topic(channel));
    }
    for channel in &new {
        if let Err(e) = subscribe(b, channel) {
            tracing::warn!(%channel, error = %e, "cannot subscribe to a channel's topic");
        }
    }
    *current = wanted;
    (gone, new)
}

/// Tells gossipsub what the application made of a message: forward it, drop it, or drop it
/// and count it against `source`. Returns `true` when `source` has fallen past the graylist
/// threshold: it is then blacklisted here (nothing of it is taken or forwarded any more), and
/// its connections should be closed, so that its traffic costs nothing more than a refused
/// dial ([`Gossip::report`] does both).
pub fn report(b: &mut Woken, id: &MessageId, source: &PeerId, verdict: Verdict) -> bool {
    let acceptance = match verdict {
        Verdict::Accept => MessageAcceptance::Accept,
        Verdict::Ignore(_) => MessageAcceptance::Ignore,
        Verdict::Reject(_) => MessageAcceptance::Reject,
    };
    b.report_message_validation_result(id, source, acceptance);
    let drop = matches!(verdict, Verdict::Reject(_))
        && b.peer_score(source).is_some_and(|s| s < GRAYLIST_THRESHOLD);
    if drop {
        b.blacklist_peer(source);
    }
    drop
}

#[cfg(test)]
mod tests {
    use chitchat_proto::codec::{Canonical as _, encode};
    use chitchat_proto::identity::DeviceId;
    use chitchat_proto::{SecretKey, Timestamp};
    use futures::StreamExt as _;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Multiaddr, Swarm};

    use super::*;
    use crate::{HostConfig, memory_swarm};

    const NOW: Timestamp = Timestamp(1_000_000_000);

    fn channel() -> ChannelId {
        ChannelId([4; 32])
    }

    fn alice() -> SecretKey {
        SecretKey::from_seed([1; 32])
    }

    fn host(n: u64) -> (Swarm<Gossip>, Multiaddr) {
        let config = HostConfig { idle_timeout: Duration::from_secs(60), lazy: false, tls: None };
        let id = libp2p::identity::Keypair::generate_ed25519();
        let mut s = memory_swarm(id, config, |_| Gossip::new().expect("gossip")).expect("swarm");
        let addr: Multiaddr = format!("/memory/{n}").parse().expect("addr");
        s.listen_on(addr.clone()).expect("listen");
        subscribe(&mut s.behaviour_mut().gossipsub, &channel()).expect("subscribe");
        (s, addr)
    }

    /// What a host's application does with a message: judge it as a member would (Alice is
    /// the channel's only member), report it, and keep every envelope it was given (accepted
    /// or not: whatever a peer forwarded).
    fn judge(s: &mut Swarm<Gossip>, event: GossipEvent, got: &mut Vec<GossipEnvelope>) {
        if let GossipEvent::Gossipsub(gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        }) = event
        {
            let verdict = match GossipEnvelope::from_bytes(&message.data) {
                Ok(e) => {
                    let t = chitchat_proto::gossip::topic(&channel());
                    let v = e.judge(&t, NOW, |d, _| Some(*d == DeviceId(alice().public())));
                    got.push(e);
                    v
                }
                Err(_) => Verdict::Reject(chitchat_proto::gossip::GossipError::BadSignature),
            };
            s.behaviour_mut().report(&message_id, &propagation_source, verdict);
        }
    }

    /// Three hosts in a line, A — B — C (A and C not connected). Alice's envelope published at
    /// A reaches C through B. Mallory's envelopes, published at A, are rejected by B and never
    /// reach C; B's score of A falls below zero, and past the graylist threshold after two.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_envelopes_cross_the_mesh_and_forgeries_stop_at_the_first_hop() {
        let base = rand_base();
        let (mut a, _) = host(base);
        let (mut b, b_addr) = host(base + 1);
        let (mut c, _) = host(base + 2);
        let (a_id, c_id) = (*a.local_peer_id(), *c.local_peer_id());
        a.dial(b_addr.clone()).expect("dial");
        c.dial(b_addr).expect("dial");
        let t = topic(&channel()).hash();
        let (mut at_b, mut at_c) = (Vec::new(), Vec::new());
        // Until B has both in its mesh.
        let meshed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                tokio::select! {
                    _ = a.select_next_some() => {}
                    e = b.select_next_some() => if let SwarmEvent::Behaviour(e) = e { judge(&mut b, e, &mut at_b) },
                    e = c.select_next_some() => if let SwarmEvent::Behaviour(e) = e { judge(&mut c, e, &mut at_c) },
                }
                let mesh: Vec<PeerId> = b.behaviour().gossipsub.mesh_peers(&t).copied().collect();
                let b_id = *b.local_peer_id();
                let a_knows_b = a.behaviour().gossipsub.mesh_peers(&t).any(|p| *p == b_id);
                if mesh.contains(&a_id) && mesh.contains(&c_id) && a_knows_b {
                    return;
                }
            }
        })
        .await;
        assert!(meshed.is_ok(), "B never meshed with A and C");

        let good = GossipEnvelope::seal(&alice(), channel(), 3, b"hello".to_vec(), NOW);
        let mallory = SecretKey::from_seed([6; 32]);
        let forged: Vec<GossipEnvelope> =
            (0..3).map(|i| GossipEnvelope::seal(&mallory, channel(), 3, vec![i; 8], NOW)).collect();
        a.behaviour_mut()
            .gossipsub
            .publish(topic(&channel()), encode(&forged[0]))
            .expect("publish");
        a.behaviour_mut().gossipsub.publish(topic(&channel()), encode(&good)).expect("publish");
        for f in &forged[1..] {
            a.behaviour_mut().gossipsub.publish(topic(&channel()), encode(f)).expect("publish");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                tokio::select! {
                    _ = a.select_next_some() => {}
                    e = b.select_next_some() => if let SwarmEvent::Behaviour(e) = e { judge(&mut b, e, &mut at_b) },
                    e = c.select_next_some() => if let SwarmEvent::Behaviour(e) = e { judge(&mut c, e, &mut at_c) },
                }
                if !at_c.is_empty() && b.behaviour().gossipsub.peer_score(&a_id).is_some_and(|s| s < GRAYLIST_THRESHOLD) {
                    return;
                }
            }
        })
        .await;
        // A little longer, for a forgery that would still be on its way to C, and for B to
        // close its connection to A.
        let _ = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                tokio::select! {
                    _ = a.select_next_some() => {}
                    e = b.select_next_some() => if let SwarmEvent::Behaviour(e) = e { judge(&mut b, e, &mut at_b) },
                    e = c.select_next_some() => if let SwarmEvent::Behaviour(e) = e { judge(&mut c, e, &mut at_c) },
                }
            }
        })
        .await;
        // B judged Alice's envelope and the forgeries before A's score fell past the graylist
        // threshold (after two; one more may have come in the same batch).
        assert!(at_b.contains(&good) && at_b.len() >= 3, "B was given: {at_b:?}");
        assert_eq!(at_c, vec![good], "C got Alice's envelope through B, and no forgery");
        let score = b.behaviour().gossipsub.peer_score(&a_id).expect("scored");
        assert!(score < GRAYLIST_THRESHOLD, "A, which sent forgeries, is graylisted at B: {score}");
        assert!(!b.is_connected(&a_id), "and B dropped it");
        // A comes back: B refuses the connection.
        a.dial(b.listeners().next().expect("listening").clone()).expect("dial");
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                tokio::select! {
                    _ = a.select_next_some() => {}
                    _ = b.select_next_some() => {}
                }
            }
        })
        .await;
        assert!(!b.is_connected(&a_id) && !a.is_connected(b.local_peer_id()), "A got back in");
    }

    /// Two connections between A and B, the first closed once both are up (as a node does
    /// when a direct connection replaces one through a relay): what A publishes afterwards
    /// still reaches B, on the connection left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gossip_flows_on_the_connection_left_when_the_first_one_closes() {
        use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
        let base = rand_base() + 100;
        let (mut a, _) = host(base);
        let (mut b, b_addr) = host(base + 1);
        let b_id = *b.local_peer_id();
        let t = topic(&channel()).hash();
        let dial = |a: &mut Swarm<Gossip>| {
            let opts = DialOpts::peer_id(b_id)
                .condition(PeerCondition::Always)
                .addresses(vec![b_addr.clone()])
                .build();
            a.dial(opts).expect("dial");
        };
        dial(&mut a);
        let mut connections = Vec::new();
        let mut got = Vec::new();
        // The first connection, and A and B in each other's mesh.
        let up = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                tokio::select! {
                    e = a.select_next_some() => if let SwarmEvent::ConnectionEstablished { connection_id, .. } = e {
                        connections.push(connection_id);
                    },
                    e = b.select_next_some() => if let SwarmEvent::Behaviour(e) = e { judge(&mut b, e, &mut got) },
                }
                if connections.len() == 1 && a.behaviour().gossipsub.mesh_peers(&t).any(|p| *p == b_id) {
                    return;
                }
            }
        })
        .await;
        assert!(up.is_ok(), "A and B never meshed");
        // The second, once the first carries gossip.
        dial(&mut a);
        let second = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                tokio::select! {
                    e = a.select_next_some() => if let SwarmEvent::ConnectionEstablished { connection_id, .. } = e {
                        connections.push(connection_id);
                        return;
                    },
                    e = b.select_next_some() => if let SwarmEvent::Behaviour(e) = e { judge(&mut b, e, &mut got) },
                }
            }
        })
        .await;
        assert!(second.is_ok(), "no second connection");
        // Both sides settle (the second connection's handlers are polled with nothing to
        // send), then the first connection closes.
        run_both(&mut a, &mut b, &mut got, Duration::from_millis(500)).await;
        assert!(a.close_connection(connections[0]), "the first connection is open");
        run_both(&mut a, &mut b, &mut got, Duration::from_millis(500)).await;
        assert!(a.is_connected(&b_id), "the second connection is still up");
        // Both ways: B's second connection was accepted, A's dialled.
        let (one, two) = (
            GossipEnvelope::seal(&alice(), channel(), 3, b"from a".to_vec(), NOW),
            GossipEnvelope::seal(&alice(), channel(), 3, b"from b".to_vec(), NOW),
        );
        a.behaviour_mut().gossipsub.publish(topic(&channel()), encode(&one)).expect("publish");
        b.behaviour_mut().gossipsub.publish(topic(&channel()), encode(&two)).expect("publish");
        let started = std::time::Instant::now();
        let mut at_a = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                tokio::select! {
                    e = a.select_next_some() => if let SwarmEvent::Behaviour(e) = e { judge(&mut a, e, &mut at_a) },
                    e = b.select_next_some() => if let SwarmEvent::Behaviour(e) = e { judge(&mut b, e, &mut got) },
                }
                if !got.is_empty() && !at_a.is_empty() {
                    return;
                }
            }
        })
        .await;
        let took = started.elapsed();
        assert_eq!((got, at_a), (vec![one], vec![two]), "after {took:?}");
        assert!(took < Duration::from_secs(1), "late: {took:?}");
    }

    /// Drives both hosts for `how_long`, B judging what it gets.
    async fn run_both(
        a: &mut Swarm<Gossip>,
        b: &mut Swarm<Gossip>,
        got: &mut Vec<GossipEnvelope>,
        how_long: Duration,
    ) {
        let _ = tokio::time::timeout(how_long, async {
            loop {
                tokio::select! {
                    _ = a.select_next_some() => {}
                    e = b.select_next_some() => if let SwarmEvent::Behaviour(e) = e { judge(b, e, got) },
                }
            }
        })
        .await;
    }

    fn rand_base() -> u64 {
        // Memory addresses are process-wide: each test run takes its own range.
        u64::from(std::process::id()) * 1000 + 1
    }
}

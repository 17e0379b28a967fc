//! Peer to peer, end to end: real `chitchat` daemons and a real relay as separate processes on
//! loopback. Members online at the same time reach each other directly by gossip; the relay is
//! the safety net.

use std::time::{Duration, Instant};

use chitchat_tests::{NodeProcess, RelayProcess};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// Alice and Bob, registered at `relay`, in a channel Alice created; returns its id.
async fn pair(relay: &RelayProcess) -> (NodeProcess, NodeProcess, String) {
    pair_with(relay, &[]).await
}

/// [`pair`], both nodes started with `env`.
async fn pair_with(
    relay: &RelayProcess,
    env: &[(&str, &str)],
) -> (NodeProcess, NodeProcess, String) {
    let alice = NodeProcess::start(env).expect("alice");
    alice.register(relay, "alice").await.expect("register");
    let bob = NodeProcess::start(env).expect("bob");
    bob.register(relay, "bob").await.expect("register");
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", "bob@localhost"]).expect("invite");
    bob.wait_joined(&id, WAIT).await.expect("bob joins");
    (alice, bob, id)
}

async fn send(node: &NodeProcess, channel: &str, text: &str) -> String {
    let v = node
        .json("POST", &format!("/v1/channels/{channel}/messages"), Some(json!({"text": text})))
        .await
        .expect("send");
    v["id"].as_str().expect("id").to_owned()
}

/// The status of one of the node's messages.
async fn status(node: &NodeProcess, channel: &str, id: &str) -> String {
    let v = node
        .json("GET", &format!("/v1/channels/{channel}/messages?limit=1000"), None)
        .await
        .expect("messages");
    v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .find(|m| m["id"] == id)
        .map(|m| m["status"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

async fn wait_status(node: &NodeProcess, channel: &str, id: &str, want: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = status(node, channel, id).await;
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "message {id} is {now:?}, never {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn network(node: &NodeProcess) -> Value {
    node.json("GET", "/v1/network", None).await.expect("network")
}

/// The node's own loopback TCP address, `/p2p/` included. The node lists its addresses in no
/// fixed order, and the first may be a circuit through the relay, which a bare host cannot dial
/// (and which a frozen relay does not carry).
async fn direct_addr(node: &NodeProcess) -> String {
    let listening = network(node).await["listening"].clone();
    listening
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|a| a.starts_with("/ip4/127.0.0.1/tcp/") && !a.contains("p2p-circuit"))
        .unwrap_or_else(|| panic!("no loopback TCP address: {listening}"))
        .to_owned()
}

/// Waits until `from` and `to` list each other as connected peers.
async fn wait_connected(from: &NodeProcess, to: &NodeProcess) {
    let (from_id, to_id) =
        (network(from).await["peer_id"].clone(), network(to).await["peer_id"].clone());
    let deadline = Instant::now() + WAIT;
    loop {
        if connection_to(from, &to_id).await.is_some()
            && connection_to(to, &from_id).await.is_some()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{from_id} and {to_id} never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two members online at the same time find each other at their relay (rendezvous under the
/// channel's topic) and connect directly, with no address given to either: with the relay
/// frozen (SIGSTOP), Alice's message still reaches Bob, by gossip, and shows `gossiped` at
/// Alice. When the relay wakes up it takes the message too (`sent`), and Bob, who gets it a
/// second time from his inbox, still shows it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_find_each_other_and_gossip_while_the_relay_is_frozen() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let (alice, bob, id) = pair(&relay).await;
    wait_connected(&bob, &alice).await;
    // A peer can also be dialled by address; one that names no peer is refused.
    let addr = direct_addr(&alice).await;
    bob.json("POST", "/v1/network/dial", Some(json!({"addr": addr}))).await.expect("dial");
    let bad =
        bob.json("POST", "/v1/network/dial", Some(json!({"addr": "/ip4/127.0.0.1/tcp/1"}))).await;
    assert!(bad.is_err(), "an address without /p2p/ is refused: {bad:?}");
    send(&alice, &id, "through both").await;
    bob.wait_texts(&id, WAIT, |t| t == ["through both"]).await.expect("bob reads alice");
    // The topic's subscriptions cross the new connection within a heartbeat or two.
    tokio::time::sleep(Duration::from_secs(2)).await;

    relay.pause().expect("SIGSTOP");
    let started = Instant::now();
    let msg = send(&alice, &id, "while the relay sleeps").await;
    let texts = bob.wait_texts(&id, WAIT, |t| t.len() == 2).await;
    let took = started.elapsed();
    relay.resume().expect("SIGCONT");
    let texts = texts.expect("bob reads alice with the relay frozen");
    assert_eq!(texts, ["through both", "while the relay sleeps"]);
    assert!(took < Duration::from_secs(5), "gossip took {took:?}");
    wait_status(&alice, &id, &msg, "gossiped").await;

    // The relay wakes: it takes the message (sent), and Bob's inbox copy is dropped by id.
    wait_status(&alice, &id, &msg, "sent").await;
    send(&alice, &id, "after").await;
    let texts = bob.wait_texts(&id, WAIT, |t| t.len() >= 3).await.expect("bob");
    assert_eq!(texts, ["through both", "while the relay sleeps", "after"], "each shown once");
}

/// Whether `node` lists the peer `id`, and through which kinds of connection: `(relayed, direct)`.
async fn connection_to(node: &NodeProcess, id: &Value) -> Option<(bool, bool)> {
    let v = network(node).await;
    let p = v["peers"].as_array()?.iter().find(|p| p["peer_id"] == *id)?;
    Some((p["relayed"] == true, p["direct"] == true))
}

/// Waits until `node`'s connections to the peer `id` are `want` (`(relayed, direct)`).
async fn wait_connection(node: &NodeProcess, id: &Value, want: (bool, bool)) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = connection_to(node, id).await;
        if now == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "connection to {id} is {now:?}, never {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Alice first reaches Bob through the relay's circuit, then directly: the direct connection
/// replaces the relayed one on both sides, and a second circuit is not kept beside it. With
/// the relay frozen, gossip then flows both ways on the direct connection alone (gossipsub
/// 0.50 left a peer's messages waiting on a second connection once the first closed: this is
/// the case that caught it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_flows_after_a_direct_connection_replaces_the_relayed_one() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let alice = NodeProcess::start(&[]).expect("alice");
    alice.register(&relay, "alice").await.expect("register");
    let bob = NodeProcess::start(&[]).expect("bob");
    bob.register(&relay, "bob").await.expect("register");
    let (alice_id, bob_id) =
        (network(&alice).await["peer_id"].clone(), network(&bob).await["peer_id"].clone());
    let bob_str = bob_id.as_str().expect("peer id").to_owned();
    // Bob's addresses: his circuit at the relay (once he holds a reservation) and his own.
    let deadline = Instant::now() + WAIT;
    let (circuit, direct) = loop {
        let listening = network(&bob).await["listening"].clone();
        let addrs: Vec<String> = listening
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        let tcp = |a: &&String| a.starts_with("/ip4/127.0.0.1/tcp/");
        let (circuit, direct): (Vec<&String>, Vec<&String>) =
            addrs.iter().filter(tcp).partition(|a| a.contains("/p2p-circuit"));
        let named = |a: &String| {
            if a.ends_with(&bob_str) { a.clone() } else { format!("{a}/p2p/{bob_str}") }
        };
        if let (Some(c), Some(d)) = (circuit.first(), direct.first()) {
            break (named(c), named(d));
        }
        assert!(Instant::now() < deadline, "bob has no circuit and direct address: {listening}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    alice.json("POST", "/v1/network/dial", Some(json!({"addr": circuit}))).await.expect("dial");
    wait_connection(&alice, &bob_id, (true, false)).await;
    alice.json("POST", "/v1/network/dial", Some(json!({"addr": direct}))).await.expect("dial");
    wait_connection(&alice, &bob_id, (false, true)).await;
    wait_connection(&bob, &alice_id, (false, true)).await;
    // A circuit dialled beside the direct connection is closed at once.
    alice.json("POST", "/v1/network/dial", Some(json!({"addr": circuit}))).await.expect("dial");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(connection_to(&alice, &bob_id).await, Some((false, true)), "a circuit kept beside");

    // The channel comes after: its subscriptions cross the direct connection alone.
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", "bob@localhost"]).expect("invite");
    bob.wait_joined(&id, WAIT).await.expect("bob joins");
    send(&alice, &id, "first").await;
    bob.wait_texts(&id, WAIT, |t| t == ["first"]).await.expect("bob reads alice");
    tokio::time::sleep(Duration::from_secs(2)).await;

    relay.pause().expect("SIGSTOP");
    let started = Instant::now();
    let to_bob = send(&alice, &id, "to bob, relay frozen").await;
    let at_bob = bob.wait_texts(&id, WAIT, |t| t.len() == 2).await;
    send(&bob, &id, "to alice, relay frozen").await;
    let at_alice = alice.wait_texts(&id, WAIT, |t| t.len() == 3).await;
    let took = started.elapsed();
    relay.resume().expect("SIGCONT");
    assert_eq!(at_bob.expect("bob reads alice by gossip"), ["first", "to bob, relay frozen"]);
    let at_alice = at_alice.expect("alice reads bob by gossip");
    assert_eq!(at_alice, ["first", "to bob, relay frozen", "to alice, relay frozen"]);
    assert!(took < Duration::from_secs(5), "gossip took {took:?}");
    wait_status(&alice, &id, &to_bob, "sent").await;
}

/// A peer that is no member of the channel (Mallory: any libp2p host that learnt the topic)
/// gossips envelopes she signed herself on the channel's topic to Bob. Bob rejects them
/// before forwarding anything, scores her down, drops her connection, and refuses her when
/// she dials again; Alice's messages still reach Bob. The relay, a gossip peer of the channel,
/// does the same to her.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spamming_peer_is_scored_down_and_dropped() {
    use chitchat_net::HostConfig;
    use chitchat_net::gossip::{Gossip, subscribe};
    use chitchat_proto::ordering::ChannelId;
    use futures::StreamExt as _;
    use libp2p::swarm::SwarmEvent;

    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let (alice, bob, id) = pair(&relay).await;
    let bytes: Vec<u8> = (0..id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&id[i..i + 2], 16).expect("hex"))
        .collect();
    let channel = ChannelId(bytes.try_into().expect("32 bytes"));
    let epoch =
        bob.json("GET", &format!("/v1/channels/{id}/members"), None).await.expect("m")["epoch"]
            .as_u64()
            .expect("epoch");

    let config = HostConfig { idle_timeout: Duration::from_secs(60), lazy: false, tls: None };
    let identity = libp2p::identity::Keypair::generate_ed25519();
    let mut mallory = chitchat_net::swarm(identity, config, |_| Gossip::new().expect("gossip"))
        .await
        .expect("swarm");
    subscribe(&mut mallory.behaviour_mut().gossipsub, &channel).expect("subscribe");
    let target = network(&bob).await;
    let bob_peer: libp2p::PeerId =
        target["peer_id"].as_str().expect("peer id").parse().expect("peer id");
    let bob_addr: libp2p::Multiaddr = direct_addr(&bob).await.parse().expect("addr");
    let dropped = spam(&mut mallory, bob_peer, bob_addr.clone(), channel, epoch).await;
    assert!(dropped.is_ok(), "Bob never dropped the spamming peer");
    let listed = network(&bob).await["peers"].to_string();
    assert!(!listed.contains(&mallory.local_peer_id().to_string()), "still listed: {listed}");

    // She dials again: refused (the connection never stays up).
    mallory.dial(bob_addr).expect("dial");
    let back = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let SwarmEvent::ConnectionEstablished { peer_id, .. } =
                mallory.select_next_some().await
                && peer_id == bob_peer
            {
                // Bob's ban closes what the handshake opened at once.
                if let SwarmEvent::ConnectionClosed { .. } = mallory.select_next_some().await {
                    continue;
                }
                return;
            }
        }
    })
    .await;
    assert!(back.is_err() || !mallory.is_connected(&bob_peer), "Mallory got back in");

    send(&alice, &id, "still here").await;
    bob.wait_texts(&id, WAIT, |t| t == ["still here"]).await.expect("bob reads alice");

    // The relay judges as the members do: it rejects her forgeries, bans her, and counts both.
    let relay_peer: libp2p::PeerId = relay.info.peer_id.parse().expect("relay peer id");
    let relay_addr: libp2p::Multiaddr = relay.info.addrs[0].parse().expect("relay addr");
    let dropped = spam(&mut mallory, relay_peer, relay_addr, channel, epoch).await;
    assert!(dropped.is_ok(), "the relay never dropped the spamming peer");
    assert!(relay.metric("chitchat_relay_gossip_bans") >= 1.0, "no ban counted");
    assert!(
        relay.metric("chitchat_relay_gossip_total{kind=\"reject\"}") >= 2.0,
        "rejections not counted"
    );
    assert!(relay.metric("chitchat_relay_gossip_total{kind=\"accept\"}") >= 1.0, "no accept");
    // Gossipsub's own metrics, beside the relay's, saw the same.
    assert!(relay.metric("gossipsub_rejected_messages_per_topic_total") >= 2.0, "gossipsub");
    assert!(relay.metric("gossipsub_topic_msg_recv_counts_total") >= 3.0, "gossipsub");
}

/// Fork detection over gossip: members' epoch reports travel on their channel's report topic
/// too. With the relay frozen (SIGSTOP), a report of Alice's device that disagrees with Bob's
/// state of his current epoch (signed with her key while her node is stopped: what a member
/// forked away from Bob would send) reaches Bob by gossip alone, and Bob reports the fork.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_is_reported_over_gossip_while_the_relay_is_frozen() {
    use chitchat_net::HostConfig;
    use chitchat_net::gossip::{Gossip, report_topic, subscribe};
    use chitchat_proto::ordering::{ChannelId, EpochReport, EpochReportBody};
    use futures::StreamExt as _;

    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let (mut alice, bob, id) = pair(&relay).await;
    let channel = ChannelId(hex::decode(&id).expect("hex id").try_into().expect("32 bytes"));
    let info = bob.json("GET", &format!("/v1/channels/{id}"), None).await.expect("channel");
    let epoch = info["epoch"].as_u64().expect("epoch");
    let status = bob.json("GET", "/v1/status", None).await.expect("status");
    assert_eq!(status["forks"], json!([]), "no fork to begin with: {status}");
    // Alice's device key, read from her store while her node is stopped.
    alice.stop().expect("alice stops");
    let db = chitchat_node::home::NodeDir::new(alice.home()).db();
    let store = chitchat_node::store::Store::open(&db).expect("alice's store");
    let seed: [u8; 32] =
        store.key("device").expect("read").expect("a key").try_into().expect("32 bytes");
    drop(store);
    let key = chitchat_proto::SecretKey::from_seed(seed);
    let forked = EpochReport::sign(
        &key,
        EpochReportBody {
            channel,
            epoch,
            digest: [0xab; 32],
            cert: None,
            device: chitchat_proto::DeviceId(key.public()),
        },
    );

    relay.pause().expect("SIGSTOP");
    let config = HostConfig { idle_timeout: Duration::from_secs(60), lazy: false, tls: None };
    let identity = libp2p::identity::Keypair::generate_ed25519();
    let mut host = chitchat_net::swarm(identity, config, |_| Gossip::new().expect("gossip"))
        .await
        .expect("swarm");
    subscribe(&mut host.behaviour_mut().gossipsub, &channel).expect("subscribe");
    // Bob's own address (his circuit goes through the frozen relay).
    let addr = direct_addr(&bob).await;
    host.dial(addr.parse::<libp2p::Multiaddr>().expect("addr")).expect("dial");
    let bytes = chitchat_proto::codec::encode(&forked);
    let deadline = Instant::now() + WAIT;
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let forks = loop {
        tokio::select! {
            _ = host.select_next_some() => continue,
            _ = tick.tick() => {}
        }
        // Again until Bob's subscription to the report topic reached the host.
        let _ = host.behaviour_mut().gossipsub.publish(report_topic(&channel), bytes.clone());
        let status = bob.json("GET", "/v1/status", None).await.expect("status");
        if status["forks"].as_array().is_some_and(|f| !f.is_empty()) {
            break status["forks"].clone();
        }
        assert!(Instant::now() < deadline, "bob never reported the fork: {status}");
    };
    relay.resume().expect("SIGCONT");
    let forks = forks.as_array().expect("forks");
    assert_eq!(forks.len(), 1, "{forks:?}");
    assert_eq!(forks[0]["device"], key.public().to_hex(), "{forks:?}");
    assert_eq!(forks[0]["epoch"], epoch, "{forks:?}");
    assert!(forks[0]["kind"].as_str().is_some_and(|k| k.starts_with("OtherState")), "{forks:?}");
}

/// Mallory dials `peer` at `addr`, waits until its subscription to the channel's topic reached
/// her, gossips four envelopes she signed herself (she is no member) and waits for `peer` to
/// close her connection (`Err` if it never does).
async fn spam(
    mallory: &mut libp2p::Swarm<chitchat_net::gossip::Gossip>,
    peer: libp2p::PeerId,
    addr: libp2p::Multiaddr,
    channel: chitchat_proto::ordering::ChannelId,
    epoch: u64,
) -> Result<(), tokio::time::error::Elapsed> {
    use chitchat_net::gossip::topic;
    use chitchat_proto::codec::encode;
    use chitchat_proto::gossip::GossipEnvelope;
    use futures::StreamExt as _;
    use libp2p::swarm::SwarmEvent;

    mallory.dial(addr).expect("dial");
    let t = topic(&channel).hash();
    tokio::time::timeout(WAIT, async {
        loop {
            let _ = mallory.select_next_some().await;
            let g = &mallory.behaviour().gossipsub;
            if g.all_peers().any(|(p, topics)| *p == peer && topics.contains(&&t)) {
                return;
            }
        }
    })
    .await
    .expect("the peer's subscription never reached Mallory");
    let key = chitchat_proto::SecretKey::from_seed([66; 32]);
    let now = chitchat_proto::Timestamp(
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_millis(),
        )
        .expect("ms"),
    );
    for i in 0..4u8 {
        let forged = GossipEnvelope::seal(&key, channel, epoch, vec![i; 64], now);
        let _ = mallory.behaviour_mut().gossipsub.publish(topic(&channel), encode(&forged));
    }
    tokio::time::timeout(WAIT, async {
        loop {
            if let SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } =
                mallory.select_next_some().await
                && peer_id == peer
            {
                return;
            }
        }
    })
    .await
}

/// Two members that listen on no address of their own (behind a NAT, say) still connect to
/// each other: each holds a reservation at the relay (circuit relay v2), registers the circuit
/// address at the rendezvous point, and the other dials it; the connection runs through the
/// relay, and gossip with it. When the relay restarts (kill -9), the circuits fall with it:
/// each node asks for its reservation again, and they connect through the relay again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_listen_nowhere_connect_through_the_relay() {
    let mut relay = RelayProcess::start_fixed(|c| c.to_owned()).expect("relay");
    let (alice, bob, id) = pair_with(&relay, &[("CHITCHAT_NETWORK_LISTEN", "")]).await;
    let bob_id = network(&bob).await["peer_id"].clone();
    let through_relay = || async {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = network(&alice).await;
            let found = v["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["peer_id"] == bob_id && p["relayed"] == true));
            if found {
                return;
            }
            assert!(Instant::now() < deadline, "alice never reached bob through the relay: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    through_relay().await;
    let listening = network(&bob).await["listening"].clone();
    let all_circuits = listening.as_array().is_some_and(|a| {
        !a.is_empty() && a.iter().all(|a| a.as_str().is_some_and(|a| a.contains("/p2p-circuit/")))
    });
    assert!(all_circuits, "bob is reachable only through the relay: {listening}");
    send(&alice, &id, "hello through the relay").await;
    bob.wait_texts(&id, WAIT, |t| t == ["hello through the relay"]).await.expect("bob reads");

    relay.kill9();
    let deadline = Instant::now() + WAIT;
    while !network(&alice).await["peers"].as_array().is_some_and(Vec::is_empty) {
        assert!(Instant::now() < deadline, "the circuit outlived its relay");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.restart().expect("relay restarts");
    through_relay().await;
}

/// A TCP or UDP socket of a process, from `/proc`: `(udp, local port, remote ip, remote port,
/// listening)`.
type Socket = (bool, u16, String, u16, bool);

/// Every TCP and UDP socket the process `pid` holds (its descriptors' inodes, looked up in its
/// network namespace's tables).
fn sockets(pid: u32) -> Vec<Socket> {
    let mut inodes = std::collections::BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds").flatten() {
        if let Ok(target) = std::fs::read_link(fd.path())
            && let Some(inode) = target.to_str().and_then(|t| t.strip_prefix("socket:["))
        {
            inodes.insert(inode.trim_end_matches(']').to_owned());
        }
    }
    let port = |hex: &str| u16::from_str_radix(hex, 16).expect("port");
    let mut out = Vec::new();
    for (table, udp) in [("tcp", false), ("tcp6", false), ("udp", true), ("udp6", true)] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.contains(f[9]) {
                continue;
            }
            let (_, local) = f[1].split_once(':').expect("local");
            let (ip, remote) = f[2].split_once(':').expect("remote");
            out.push((udp, port(local), ip.to_owned(), port(remote), f[3] == "0A"));
        }
    }
    out
}

/// A relay-only node (`--relay-only`) talks to its relay and to no one else: it listens on no
/// peer address, registers nowhere, refuses to dial, and its only sockets are the local API's
/// and its connections to the relay's TCP port (no UDP at all) — while messages and files flow
/// both ways with a member who is not relay-only (its files in parts over its relay link).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_node_talks_to_its_relay_alone() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let alice = NodeProcess::start(&[("CHITCHAT_NETWORK_RELAY_ONLY", "true")]).expect("alice");
    alice.register(&relay, "alice").await.expect("register");
    let bob = NodeProcess::start(&[]).expect("bob");
    bob.register(&relay, "bob").await.expect("register");
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", "bob@localhost"]).expect("invite");
    bob.wait_joined(&id, WAIT).await.expect("bob joins");
    send(&alice, &id, "from behind the wall").await;
    bob.wait_texts(&id, WAIT, |t| t.len() == 1).await.expect("bob reads alice");
    send(&bob, &id, "heard you").await;
    alice.wait_texts(&id, WAIT, |t| t.len() == 2).await.expect("alice reads bob");

    // Files both ways, through the relay, over Alice's TCP link alone (her sockets are checked
    // below): hers pushed to the relay in parts, Bob's fetched from it in parts.
    let tmp = tempfile::tempdir().expect("tmp");
    let bytes = |len: u32, k: u32| -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(k) >> 24) as u8).collect()
    };
    let (hers, his) = (bytes(3_000_000, 1), bytes(2_100_000, 2));
    let (her_path, his_path) = (tmp.path().join("wall.bin"), tmp.path().join("reply.bin"));
    std::fs::write(&her_path, &hers).expect("write");
    std::fs::write(&his_path, &his).expect("write");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
    alice.cli(&["send-file", "general", &path(&her_path)]).expect("a relay-only node sends");
    assert_eq!(relay.metric("chitchat_relay_files_pinned_total"), 1.0, "pinned before it went");
    let entry = bob.wait_file(&id, "wall.bin", WAIT).await.expect("bob sees the file");
    let out = path(&tmp.path().join("wall.out"));
    bob.cli(&["fetch", entry["id"].as_str().expect("id"), "--out", &out]).expect("bob fetches");
    assert!(std::fs::read(&out).expect("read") == hers, "bob got alice's file");
    bob.cli(&["send-file", "general", &path(&his_path)]).expect("bob sends");
    let entry = alice.wait_file(&id, "reply.bin", WAIT).await.expect("alice sees the file");
    let out = path(&tmp.path().join("reply.out"));
    alice.cli(&["fetch", entry["id"].as_str().expect("id"), "--out", &out]).expect("she fetches");
    assert!(std::fs::read(&out).expect("read") == his, "alice got bob's file");

    // What the link carries for another registered device: a part of a pinned blob (its hash
    // is the capability, as over iroh), no part of a blob not pinned there, no push the relay
    // did not ask that device for, and no part off a group or over the limit.
    use chitchat_proto::wire::{ErrorCode, Request, Response};
    let mallory =
        chitchat_tests::register(&relay, &chitchat_tests::Device::new(66), "mallory").await;
    let hash: [u8; 32] = hex::decode(entry["attachment"]["hash"].as_str().expect("hash"))
        .expect("hex")
        .try_into()
        .expect("32 bytes");
    let ask = |hash, first, chunks| Request::BlobPart { hash, first, chunks };
    let part = mallory.call(&ask(hash, 0, 512)).await.expect("call");
    assert!(matches!(&part, Response::BlobPart { part } if part.0.len() > 512 * 1024), "a part");
    let code = |r: Response| match r {
        Response::Error { code, .. } => code,
        other => panic!("not refused: {other:?}"),
    };
    let r = mallory.call(&ask([9; 32], 0, 512)).await.expect("call");
    assert_eq!(code(r), ErrorCode::NotFound, "not pinned here");
    let push = Request::PushPart {
        hash: [9; 32],
        len: 5000,
        first: 0,
        chunks: 16,
        part: chitchat_proto::codec::Bytes(vec![0; 5008]),
    };
    assert_eq!(code(mallory.call(&push).await.expect("call")), ErrorCode::Forbidden, "unasked");
    for bad in [ask(hash, 8, 16), ask(hash, 0, 513)] {
        let refused = mallory.call(&bad).await;
        assert!(refused.is_err() || matches!(refused, Ok(Response::Error { .. })), "{refused:?}");
    }

    // Time for discovery rounds (every 5 s) to have found anyone there was to find.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let v = network(&alice).await;
    assert_eq!(v["listening"], json!([]), "listens nowhere: {v}");
    let relay_peer = relay.info.peer_id.clone();
    let peers: Vec<&str> = v["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["peer_id"].as_str())
        .collect();
    assert_eq!(peers, [relay_peer.as_str()], "connected to the relay alone: {v}");
    let addr = direct_addr(&bob).await;
    let dial = alice.json("POST", "/v1/network/dial", Some(json!({"addr": addr}))).await;
    assert!(dial.is_err(), "a relay-only node dials no peer: {dial:?}");
    let alice_id = v["peer_id"].clone();
    let bob_peers = network(&bob).await["peers"].to_string();
    assert!(!bob_peers.contains(alice_id.as_str().expect("id")), "bob reached alice: {bob_peers}");

    let run = chitchat_node::home::NodeDir::new(alice.home()).load_run_info().expect("run.json");
    let api_port: u16 = run.api.rsplit(':').next().expect("port").parse().expect("port");
    // The relay's libp2p TCP ports and its HTTP port (`.well-known`).
    let mut relay_ports: Vec<u16> = relay
        .info
        .addrs
        .iter()
        .filter_map(|a| a.split('/').skip_while(|p| *p != "tcp").nth(1)?.parse().ok())
        .collect();
    relay_ports.extend(relay.info.http.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()));
    let pid = alice.pid().expect("running");
    let socks = sockets(pid);
    let mut relay_sockets = 0;
    for (udp, local, ip, remote, listening) in &socks {
        assert!(!udp, "a UDP socket: {socks:?}");
        if *listening {
            assert_eq!(*local, api_port, "listens only for its API: {socks:?}");
            continue;
        }
        let api = *local == api_port || *remote == api_port;
        // 127.0.0.1 as /proc writes it, alone or IPv4-mapped.
        let to_relay = ip.ends_with("0100007F") && relay_ports.contains(remote);
        assert!(api || to_relay, "a socket to {ip}:{remote}: {socks:?}");
        relay_sockets += usize::from(to_relay);
    }
    assert!(relay_sockets > 0, "no connection to the relay seen: {socks:?}");
}

/// Relay-only over WebSocket with TLS, as on port 443 where nothing else gets through: the
/// relay serves its own certificate on a `/tls/ws` address beside plain TCP, and a relay-only
/// node that trusts that certificate reaches the relay over it alone (no socket to the relay's
/// plain TCP port, no UDP), while messages flow both ways with a member on plain TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_node_reaches_its_relay_over_websocket_with_tls() {
    let certs = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    let (chain, key) = (certs.path().join("chain.pem"), certs.path().join("key.pem"));
    std::fs::write(&chain, cert.cert.pem()).expect("write");
    std::fs::write(&key, cert.key_pair.serialize_pem()).expect("write");
    let configure = |c: &str| {
        c.replace("# certificate = \"tls/fullchain.pem\"", &format!("certificate = {chain:?}"))
            .replace("# key = \"tls/privkey.pem\"", &format!("key = {key:?}"))
    };
    let listen = "/ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/tcp/0/tls/ws";
    let relay =
        RelayProcess::start(configure, &[("CHITCHAT_RELAY_LISTEN", listen)]).expect("relay");
    let wss_port: u16 = relay
        .info
        .addrs
        .iter()
        .find(|a| a.contains("/tls/ws"))
        .and_then(|a| a.split('/').skip_while(|p| *p != "tcp").nth(1)?.parse().ok())
        .expect("the relay listens on /tls/ws");
    let tcp_port: u16 = relay
        .info
        .addrs
        .iter()
        .find(|a| a.contains("/tcp/") && !a.contains("/ws"))
        .and_then(|a| a.split('/').skip_while(|p| *p != "tcp").nth(1)?.parse().ok())
        .expect("the relay listens on TCP");
    let roots = chain.to_str().expect("path").to_owned();
    let alice = NodeProcess::start(&[
        ("CHITCHAT_NETWORK_RELAY_ONLY", "true"),
        ("CHITCHAT_NETWORK_TLS_ROOTS", roots.as_str()),
    ])
    .expect("alice");
    alice.register(&relay, "alice").await.expect("register");
    let bob = NodeProcess::start(&[]).expect("bob");
    bob.register(&relay, "bob").await.expect("register");
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", "bob@localhost"]).expect("invite");
    bob.wait_joined(&id, WAIT).await.expect("bob joins");
    send(&alice, &id, "over 443, as it were").await;
    bob.wait_texts(&id, WAIT, |t| t.len() == 1).await.expect("bob reads alice");
    send(&bob, &id, "heard you").await;
    alice.wait_texts(&id, WAIT, |t| t.len() == 2).await.expect("alice reads bob");

    let pid = alice.pid().expect("running");
    let socks = sockets(pid);
    assert!(socks.iter().all(|(udp, ..)| !udp), "a UDP socket: {socks:?}");
    let to = |port: u16| socks.iter().filter(|(_, _, _, remote, l)| !l && *remote == port).count();
    assert!(to(wss_port) > 0, "no connection to the relay's TLS port: {socks:?}");
    assert_eq!(to(tcp_port), 0, "a connection to the relay's plain TCP port: {socks:?}");
}

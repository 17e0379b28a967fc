//! Peer to peer, end to end: real `chitchat` daemons and a real relay as separate processes on
//! loopback. Members online at the same time reach each other directly by gossip; the relay is
//! the safety net.

use std::time::{Duration, Instant};

use chitchat_tests::{NodeProcess, RelayProcess};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// Alice and Bob, registered at `relay`, in a channel Alice created; returns its id.
async fn pair(relay: &RelayProcess) -> (NodeProcess, NodeProcess, String) {
    let alice = NodeProcess::start(&[]).expect("alice");
    alice.register(relay, "alice").await.expect("register");
    let bob = NodeProcess::start(&[]).expect("bob");
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

/// Connects `from` to `to` directly, and waits until each lists the other.
async fn connect(from: &NodeProcess, to: &NodeProcess) {
    let target = network(to).await;
    let addr = target["listening"][0].as_str().expect("listening").to_owned();
    from.json("POST", "/v1/network/dial", Some(json!({"addr": addr}))).await.expect("dial");
    let (from_id, to_id) = (network(from).await["peer_id"].clone(), target["peer_id"].clone());
    let deadline = Instant::now() + WAIT;
    loop {
        let lists = |v: &Value, id: &Value| {
            v["peers"].as_array().is_some_and(|p| p.iter().any(|p| p["peer_id"] == *id))
        };
        if lists(&network(from).await, &to_id) && lists(&network(to).await, &from_id) {
            return;
        }
        assert!(Instant::now() < deadline, "{from_id} and {to_id} never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two members online at the same time, connected directly: with the relay frozen (SIGSTOP),
/// Alice's message still reaches Bob, by gossip, and shows `gossiped` at Alice. When the relay
/// wakes up it takes the message too (`sent`), and Bob, who gets it a second time from his
/// inbox, still shows it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_online_gets_a_message_while_the_relay_is_frozen() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let (alice, bob, id) = pair(&relay).await;
    connect(&bob, &alice).await;
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

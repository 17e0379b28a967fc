//! Relay-less LAN mode, end to end: real `chitchat` daemons, registered at no relay, that find
//! each other by mDNS on a small LAN (a veth pair into a network namespace: the namespace's end
//! and the host's end are the only two hosts on it) and chat in a channel that the creator's
//! device orders. Without root (no namespace), the peers are given by address instead and the
//! mDNS part is skipped (the test says so).

use std::time::{Duration, Instant};

use chitchat_tests::{Netns, NodeProcess, RelayProcess};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(40);

async fn send(node: &NodeProcess, channel: &str, text: &str) -> anyhow::Result<String> {
    let v = node
        .json("POST", &format!("/v1/channels/{channel}/messages"), Some(json!({"text": text})))
        .await?;
    Ok(v["id"].as_str().unwrap_or_default().to_owned())
}

async fn device(node: &NodeProcess) -> String {
    let v = node.json("GET", "/v1/status", None).await.expect("status");
    v["device"].as_str().expect("device").to_owned()
}

/// The node's own address on `ip`, `/p2p/` included.
async fn addr_on(node: &NodeProcess, ip: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = node.json("GET", "/v1/network", None).await.expect("network");
        let found = v["listening"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|a| a.starts_with(&format!("/ip4/{ip}/tcp/")))
            .map(str::to_owned);
        if let Some(a) = found {
            return a;
        }
        assert!(Instant::now() < deadline, "no address on {ip}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `node`'s `GET /v1/network/lan` lists `device`, connected, under `name`.
async fn wait_found(node: &NodeProcess, device: &str, name: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = node.json("GET", "/v1/network/lan", None).await.expect("lan");
        let peer = v["peers"].as_array().into_iter().flatten().find(|p| p["device"] == device);
        if let Some(p) = peer
            && p["connected"] == true
            && p["name"] == name
        {
            return p.clone();
        }
        assert!(Instant::now() < deadline, "{device} ({name}) not found on the LAN: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Connects `from` to `to` at its address on `ip` (mDNS would in time; a restarted node's port
/// is new, and without a namespace there is no mDNS).
async fn dial(from: &NodeProcess, to: &NodeProcess, ip: &str) {
    let addr = addr_on(to, ip).await;
    from.json("POST", "/v1/network/dial", Some(json!({"addr": addr}))).await.expect("dial");
}

/// Waits until `node` counts `n` members in the channel.
async fn wait_members(node: &NodeProcess, channel: &str, n: usize, what: &str) {
    let deadline = Instant::now() + WAIT;
    while members(node, channel).await.len() != n {
        assert!(Instant::now() < deadline, "{what}: {:?}", members(node, channel).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn members(node: &NodeProcess, channel: &str) -> Vec<String> {
    let v = node.json("GET", &format!("/v1/channels/{channel}/members"), None).await.expect("m");
    let mut m: Vec<String> = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["device"].as_str().or(m.as_str()).map(str::to_owned))
        .collect();
    m.sort();
    m
}

/// Alice and Bob, registered nowhere, meet on the LAN (mDNS), and Alice creates a relay-less
/// channel (`--lan`), which her device orders, and adds Bob by his device id: his record and a
/// KeyPackage come from his device, his Welcome goes to it directly. They chat both ways (by
/// gossip: there is no relay). Bob, a member but not the creator, cannot order a change. While
/// Bob is stopped, Alice sends, adds Carol (a third node on the LAN) and sends again; Bob, back,
/// gets the commit and the messages he missed from Alice (who keeps the channel's history), in
/// order, and reads what Carol sends in the new epoch. While Alice is away, Carol's message
/// reaches Bob alone; Alice, back, gets it from Bob (every member keeps the channel's history).
/// In an `--open` LAN channel, Bob adds Carol himself: his commit is ordered by Alice's device.
/// Carol leaves it (her request handed to the members, who remove her); the creator cannot
/// leave. Bob's leave of the closed channel fails while Alice, its only admin, is away, and
/// goes through once she is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_no_relay_meet_by_mdns_and_chat_in_a_channel_the_creator_orders() {
    let netns = Netns::create();
    if let Err(why) = &netns {
        eprintln!(
            "mDNS part skipped: {why} (network namespaces need root); peers given by address"
        );
    }
    let (alice_ip, bob_ip) = match &netns {
        Ok(ns) => (ns.host_ip().to_owned(), ns.inner_ip().to_owned()),
        Err(_) => ("127.0.0.1".to_owned(), "127.0.0.1".to_owned()),
    };
    let listen = |ip: &str| format!("/ip4/{ip}/tcp/0");
    let (alice_listen, bob_listen) = (listen(&alice_ip), listen(&bob_ip));
    let bob_env = [("CHITCHAT_PROFILE_NAME", "bob"), ("CHITCHAT_NETWORK_LISTEN", &bob_listen)];
    let mut bob = match &netns {
        Ok(ns) => NodeProcess::start_in(ns, &bob_env).expect("bob"),
        Err(_) => NodeProcess::start(&bob_env).expect("bob"),
    };
    // Without mDNS, Alice is told where Bob is.
    let bob_addr = addr_on(&bob, &bob_ip).await;
    let peers = if netns.is_ok() { String::new() } else { bob_addr.clone() };
    let alice_env = [
        ("CHITCHAT_PROFILE_NAME", "alice"),
        ("CHITCHAT_NETWORK_LISTEN", &alice_listen),
        ("CHITCHAT_NETWORK_PEERS", &peers),
    ];
    let mut alice = NodeProcess::start(&alice_env).expect("alice");
    let (alice_dev, bob_dev) = (device(&alice).await, device(&bob).await);
    if netns.is_ok() {
        let found = wait_found(&alice, &bob_dev, "bob").await;
        assert_eq!(found["sponsored"], json!([]), "no relay vouches for Bob: {found}");
        wait_found(&bob, &alice_dev, "alice").await;
        let lan = alice.cli(&["lan"]).expect("chitchat lan");
        assert!(lan.contains(&bob_dev) && lan.contains("bob (unverified)"), "{lan}");
    }

    // A channel needs a relay unless asked for relay-less.
    let plain = alice.json("POST", "/v1/channels", Some(json!({"name": "x"}))).await;
    assert!(plain.is_err(), "registered nowhere, only a --lan channel: {plain:?}");
    let id =
        alice.cli(&["channel", "create", "general", "--lan"]).expect("create").trim().to_owned();
    let bad = alice.cli(&["invite", "general", "not-a-device"]);
    assert!(bad.is_err(), "a LAN member is named by device id: {bad:?}");
    alice.cli(&["invite", "general", &bob_dev]).expect("invite bob");
    bob.wait_joined(&id, WAIT).await.expect("bob joins");
    let info = bob.json("GET", &format!("/v1/channels/{id}"), None).await.expect("channel");
    assert_eq!(info["epoch"], 1, "{info}");

    send(&alice, &id, "hello over the lan").await.expect("send");
    bob.wait_texts(&id, WAIT, |t| t == ["hello over the lan"]).await.expect("bob reads alice");
    let reply = send(&bob, &id, "hi alice").await.expect("send");
    alice.wait_texts(&id, WAIT, |t| t.len() == 2).await.expect("alice reads bob");
    let list =
        alice.json("GET", &format!("/v1/channels/{id}/messages"), None).await.expect("messages");
    let got = list["messages"].as_array().into_iter().flatten().find(|m| m["id"] == reply);
    let from = got.and_then(|m| m["from"].as_str()).unwrap_or_default();
    assert!(from.contains("bob") && from.contains("unverified"), "shown as unverified: {list}");
    let status = bob
        .json("GET", &format!("/v1/channels/{id}/messages?limit=10"), None)
        .await
        .expect("messages");
    let mine = status["messages"].as_array().into_iter().flatten().find(|m| m["id"] == reply);
    assert_eq!(mine.map(|m| m["status"].clone()), Some(json!("gossiped")), "{status}");

    // Bob is a member, not the creator: his device orders nothing.
    let mut carol = NodeProcess::start(&[
        ("CHITCHAT_PROFILE_NAME", "carol"),
        ("CHITCHAT_NETWORK_LISTEN", &alice_listen),
        ("CHITCHAT_NETWORK_PEERS", &peers),
    ])
    .expect("carol");
    let carol_dev = device(&carol).await;
    if netns.is_ok() {
        wait_found(&alice, &carol_dev, "carol").await;
    }
    let refused = bob.cli(&["invite", "general", &carol_dev]);
    assert!(refused.is_err_and(|e| e.to_string().contains("creator")), "only the creator orders");

    // Bob away; Alice adds Carol; Bob back, catches up from Alice, reads Carol.
    bob.stop().expect("bob stops");
    send(&alice, &id, "while bob was away").await.expect("send");
    alice.cli(&["invite", "general", &carol_dev]).expect("invite carol");
    carol.wait_joined(&id, WAIT).await.expect("carol joins");
    send(&alice, &id, "carol is in").await.expect("send");
    bob.restart().expect("bob restarts");
    let want = {
        let mut m = vec![alice_dev.clone(), bob_dev.clone(), carol_dev.clone()];
        m.sort();
        m
    };
    let deadline = Instant::now() + WAIT;
    while members(&bob, &id).await != want {
        assert!(Instant::now() < deadline, "bob never caught up: {:?}", members(&bob, &id).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    send(&carol, &id, "carol here").await.expect("send");
    let want =
        ["hello over the lan", "hi alice", "while bob was away", "carol is in", "carol here"];
    bob.wait_texts(&id, WAIT, |t| t == want).await.expect("bob reads what he missed, in order");
    alice.wait_texts(&id, WAIT, |t| t.iter().any(|t| t == "carol here")).await.expect("alice");

    // The creator away: Carol's message reaches Bob alone, and Carol stops. Alice, back, gets
    // it from Bob, a member like any other (every member keeps the channel's messages).
    alice.stop().expect("alice stops");
    dial(&carol, &bob, &bob_ip).await;
    send(&carol, &id, "while alice was away").await.expect("send");
    bob.wait_texts(&id, WAIT, |t| t.iter().any(|t| t == "while alice was away"))
        .await
        .expect("bob reads carol by gossip");
    carol.stop().expect("carol stops");
    alice.restart().expect("alice restarts");
    dial(&alice, &bob, &bob_ip).await;
    alice
        .wait_texts(&id, WAIT, |t| t.iter().any(|t| t == "while alice was away"))
        .await
        .expect("alice reads what she missed from bob");
    carol.restart().expect("carol restarts");
    dial(&carol, &alice, &alice_ip).await;
    dial(&carol, &bob, &bob_ip).await;

    // In an --open LAN channel any member may add: Bob's commit goes to Alice, who orders it.
    let open = alice.cli(&["channel", "create", "open", "--lan", "--open"]).expect("create");
    let open = open.trim().to_owned();
    alice.cli(&["invite", "open", &bob_dev]).expect("invite bob");
    bob.wait_joined(&open, WAIT).await.expect("bob joins");
    bob.cli(&["invite", "open", &carol_dev]).expect("bob adds carol, ordered by alice");
    carol.wait_joined(&open, WAIT).await.expect("carol joins");
    send(&bob, &open, "welcome carol").await.expect("send");
    carol.wait_texts(&open, WAIT, |t| t == ["welcome carol"]).await.expect("carol reads bob");
    alice.wait_texts(&open, WAIT, |t| t == ["welcome carol"]).await.expect("alice reads bob");
    assert_eq!(members(&alice, &open).await.len(), 3);
    // Carol leaves: her signed request goes to the members who may remove her (any member of
    // an --open channel); a removal is ordered by Alice, and the others get it directly.
    carol.cli(&["leave", "open"]).expect("carol leaves");
    wait_members(&bob, &open, 2, "bob never saw carol leave").await;
    wait_members(&alice, &open, 2, "alice never saw carol leave").await;
    let sent = send(&carol, &open, "still here?").await;
    assert!(sent.is_err(), "carol left: {sent:?}");
    // The creator's device orders the channel: it cannot leave while others are in it.
    let refused = alice.cli(&["leave", "open"]);
    assert!(refused.is_err_and(|e| e.to_string().contains("orders")), "a clear refusal");

    // In a closed channel only the creator may remove: with Alice away, Bob's leave fails and
    // changes nothing; with her back, it goes through.
    alice.stop().expect("alice stops");
    let refused = bob.cli(&["leave", "general"]);
    assert!(refused.is_err_and(|e| e.to_string().contains("reached")), "no one to remove bob");
    assert_eq!(members(&bob, &id).await.len(), 3, "bob is still in");
    alice.restart().expect("alice restarts");
    dial(&bob, &alice, &alice_ip).await;
    bob.cli(&["leave", "general"]).expect("bob leaves");
    wait_members(&alice, &id, 2, "alice never removed bob").await;
    wait_members(&carol, &id, 2, "carol never saw bob go").await;
    drop(netns);
}

/// The status of `id` in `node`'s history of the channel.
async fn status(node: &NodeProcess, channel: &str, id: &str) -> Value {
    let list = node.json("GET", &format!("/v1/channels/{channel}/messages"), None).await;
    let list = list.expect("messages");
    list["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["id"] == id)
        .map(|m| m["status"].clone())
        .unwrap_or_default()
}

/// A relay-less channel moves onto a relay by an ordered commit: refused while its creator or a
/// member is registered nowhere, and to a member that is not the creator; then the creator's
/// `chitchat channel move`, while that member is away, makes the relay order it (the relay opens
/// it on the creator's evidence); the relay takes a message for the member (status `sent`,
/// which gossip never says); back at an address no peer knows, the member gets the move and the
/// message from its inbox; and the next change is ordered by the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lan_channel_moves_onto_a_relay_by_an_ordered_commit() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let env = |name: &'static str| {
        [("CHITCHAT_PROFILE_NAME", name), ("CHITCHAT_NETWORK_LISTEN", "/ip4/127.0.0.1/tcp/0")]
    };
    let alice = NodeProcess::start(&env("alice")).expect("alice");
    let mut bob = NodeProcess::start(&env("bob")).expect("bob");
    dial(&alice, &bob, "127.0.0.1").await;
    let bob_dev = device(&bob).await;
    let id =
        alice.cli(&["channel", "create", "general", "--lan"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", &bob_dev]).expect("invite bob");
    bob.wait_joined(&id, WAIT).await.expect("bob joins");
    send(&alice, &id, "before the move").await.expect("send");
    bob.wait_texts(&id, WAIT, |t| t == ["before the move"]).await.expect("bob reads");

    // A move needs relays to deliver to everyone: the creator's, and each member's.
    let refused = alice.cli(&["channel", "move", "general"]);
    assert!(refused.is_err_and(|e| e.to_string().contains("register")), "alice registered nowhere");
    alice.register(&relay, "alice").await.expect("alice registers");
    let refused = alice.cli(&["channel", "move", "general"]);
    assert!(
        refused.is_err_and(|e| e.to_string().contains("no relay vouches")),
        "bob registered nowhere"
    );
    bob.register(&relay, "bob").await.expect("bob registers");
    let refused = bob.cli(&["channel", "move", "general"]);
    assert!(refused.is_err_and(|e| e.to_string().contains("creator")), "bob is not the creator");
    // Bob is away during the move: the relay has his record, and keeps the move for him.
    bob.stop().expect("bob stops");
    let moved = alice.cli(&["channel", "move", "general"]).expect("alice moves it");
    assert!(moved.contains("localhost"), "{moved}");
    let info = alice.json("GET", &format!("/v1/channels/{id}"), None).await.expect("info");
    assert_eq!(info["relays"], json!(["localhost"]), "{info}");
    // The relay takes Alice's message for Bob (status `sent`, which gossip never gives).
    let sent = send(&alice, &id, "after the move").await.expect("send");
    let deadline = Instant::now() + WAIT;
    while status(&alice, &id, &sent).await != "sent" {
        let now = status(&alice, &id, &sent).await;
        assert!(Instant::now() < deadline, "the relay never took it: {now}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back (at a new address no one dials: only the relay reaches him), Bob gets the move and
    // the message from his inbox.
    bob.restart().expect("bob restarts");
    bob.wait_texts(&id, WAIT, |t| t == ["before the move", "after the move"])
        .await
        .expect("bob reads it from his inbox");
    let info = bob.json("GET", &format!("/v1/channels/{id}"), None).await.expect("info");
    assert_eq!(info["relays"], json!(["localhost"]), "bob has the move: {info}");

    // The next change is the relay's to order: Carol, a user of the relay, is invited by name.
    let carol = NodeProcess::start(&[]).expect("carol");
    carol.register(&relay, "carol").await.expect("carol registers");
    alice.cli(&["invite", "general", "carol@localhost"]).expect("invite carol");
    carol.wait_joined(&id, WAIT).await.expect("carol joins");
    send(&carol, &id, "hello from the relay").await.expect("send");
    bob.wait_texts(&id, WAIT, |t| t.iter().any(|t| t == "hello from the relay"))
        .await
        .expect("bob reads carol");
}

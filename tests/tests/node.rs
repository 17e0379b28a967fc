//! The node end to end: real `chitchat` daemons and a real relay as separate processes on
//! loopback, driven through the local API (and the CLI).

use std::time::{Duration, Instant};

use chitchat_tests::{NodeProcess, RelayProcess};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

async fn users(relay: &RelayProcess, names: &[&str]) -> Vec<NodeProcess> {
    let mut nodes = Vec::new();
    for name in names {
        let node = NodeProcess::start(&[]).expect("node");
        node.register(relay, name).await.expect("register");
        nodes.push(node);
    }
    nodes
}

async fn create(node: &NodeProcess, name: &str) -> String {
    let v = node.json("POST", "/v1/channels", Some(json!({"name": name}))).await.expect("create");
    v["id"].as_str().expect("id").to_owned()
}

async fn send(node: &NodeProcess, channel: &str, text: &str) -> String {
    let v = node
        .json("POST", &format!("/v1/channels/{channel}/messages"), Some(json!({"text": text})))
        .await
        .expect("send");
    assert_eq!(v["status"], "sending");
    v["id"].as_str().expect("id").to_owned()
}

async fn members(node: &NodeProcess, channel: &str) -> Vec<String> {
    let v =
        node.json("GET", &format!("/v1/channels/{channel}/members"), None).await.expect("members");
    let mut names: Vec<String> = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["name"].as_str().expect("name").to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_then_a_third_added_and_one_removed() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let nodes = users(&relay, &["alice", "bob", "carol"]).await;
    let [alice, bob, carol] = nodes.as_slice() else { unreachable!() };

    // The CLI drives the same API.
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    let out = alice.cli(&["invite", "general", "bob@localhost"]).expect("invite");
    assert!(out.contains("added bob@localhost"), "{out}");
    alice.cli(&["send", "general", "hello bob"]).expect("send");
    bob.wait_texts(&id, WAIT, |t| t == ["hello bob"]).await.expect("bob reads alice");
    send(bob, &id, "hi alice").await;
    alice.wait_texts(&id, WAIT, |t| t.len() == 2).await.expect("alice reads bob");

    // Chat content: reply, edit, reaction, delete, read receipt.
    let hist = alice.json("GET", &format!("/v1/channels/{id}/history"), None).await.expect("h");
    let first = hist["history"]["messages"][0]["short"].as_str().expect("short").to_owned();
    bob.cli(&["reply", &first, "replying"]).expect("reply");
    bob.cli(&["react", &first, "👍"]).expect("react");
    alice.cli(&["edit", &first, "hello, bob"]).expect("edit");
    let doomed = send(alice, &id, "a mistake").await;
    alice.cli(&["delete", &doomed]).expect("delete");
    bob.wait_texts(&id, WAIT, |t| t.len() == 4 && t[0] == "hello, bob" && t[3] == "[deleted]")
        .await
        .expect("bob sees the edit and the deletion");
    bob.cli(&["read", "general"]).expect("read receipt");
    let deadline = Instant::now() + WAIT;
    loop {
        let h = alice.json("GET", &format!("/v1/channels/{id}/history"), None).await.expect("h");
        let m = &h["history"]["messages"];
        let reacted = m[0]["reactions"]["👍"] == json!(["bob@localhost"]);
        let replied = m[2]["reply_to"].as_str() == Some(first.as_str());
        let read = h["history"]["receipts"]["bob@localhost"].is_string();
        if reacted && replied && read && m[0]["edited"] == true && m[3]["deleted"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "alice's history never folded everything: {h:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let history = alice.cli(&["history", "general"]).expect("history");
    assert!(history.contains("hello, bob (edited) [👍 bob@localhost]"), "{history}");
    assert!(history.contains("(reply to"), "{history}");

    // A third user joins: she reads what comes after, never what came before.
    alice.cli(&["invite", "general", "carol@localhost"]).expect("invite carol");
    send(alice, &id, "welcome carol").await;
    carol.wait_texts(&id, WAIT, |t| t == ["welcome carol"]).await.expect("carol");
    bob.wait_texts(&id, WAIT, |t| t.last().map(String::as_str) == Some("welcome carol"))
        .await
        .expect("bob");
    assert_eq!(members(carol, &id).await, ["alice@localhost", "bob@localhost", "carol@localhost"]);

    // Bob is removed: he learns it, and gets nothing after.
    let out = alice.cli(&["remove", "general", "bob@localhost"]).expect("remove");
    assert!(out.contains("removed"), "{out}");
    assert_eq!(members(alice, &id).await, ["alice@localhost", "carol@localhost"]);
    send(alice, &id, "bob is gone").await;
    send(carol, &id, "indeed").await;
    carol
        .wait_texts(&id, WAIT, |t| t.ends_with(&["bob is gone".into(), "indeed".into()]))
        .await
        .expect("carol");
    alice
        .wait_texts(&id, WAIT, |t| t.last().map(String::as_str) == Some("indeed"))
        .await
        .expect("a");
    let deadline = Instant::now() + WAIT;
    loop {
        let v = bob.json("GET", "/v1/channels", None).await.expect("channels");
        if v["channels"][0]["left"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "bob never learnt of his removal: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bob_texts = bob.texts(&id).await.expect("bob");
    assert!(!bob_texts.iter().any(|t| t == "bob is gone" || t == "indeed"), "{bob_texts:?}");
    let err = send_err(bob, &id, "can I still talk?").await;
    assert_eq!(err.0, 409, "{err:?}");

    // Carol leaves: her node asks the admin's, which removes her through the ordering flow.
    let out = carol.cli(&["leave", "general"]).expect("leave");
    assert!(out.contains("left"), "{out}");
    let deadline = Instant::now() + WAIT;
    while members(alice, &id).await != ["alice@localhost"] {
        assert!(Instant::now() < deadline, "alice's node never removed carol");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let history = carol.texts(&id).await.expect("carol keeps her history");
    assert!(history.contains(&"indeed".to_owned()), "{history:?}");
}

async fn send_err(node: &NodeProcess, channel: &str, text: &str) -> (u16, Value) {
    let body = serde_json::to_vec(&json!({"text": text})).expect("json");
    let (status, bytes) = node
        .api()
        .raw("POST", &format!("/v1/channels/{channel}/messages"), Some(body))
        .await
        .expect("request");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_a_send_delivers_exactly_once() {
    let mut relay = RelayProcess::start_fixed(|c| c.to_owned()).expect("relay");
    let mut nodes = users(&relay, &["alice", "bob"]).await;
    let id = create(&nodes[0], "general").await;
    nodes[0]
        .json(
            "POST",
            &format!("/v1/channels/{id}/invite"),
            Some(json!({"address": "bob@localhost"})),
        )
        .await
        .expect("invite");
    send(&nodes[0], &id, "before").await;
    nodes[1].wait_texts(&id, WAIT, |t| t == ["before"]).await.expect("bob");

    // 1. The relay is down: the send is durable ("sending") but cannot be delivered. Alice is
    //    killed; when both come back, the outbox delivers it.
    relay.kill9();
    send(&nodes[0], &id, "while the relay was down").await;
    nodes[0].kill9();
    relay.restart().expect("relay back");
    nodes[0].restart().expect("alice back");
    nodes[1]
        .wait_texts(&id, WAIT, |t| t == ["before", "while the relay was down"])
        .await
        .expect("delivered after the restarts");

    // 2. Alice crashes right after the relay accepted the message and before she noted it:
    //    she sends it again on restart, and Bob shows it once.
    nodes[0].kill9();
    nodes[0].restart_with(&[("CHITCHAT_FAULT", "exit-after-enqueue")]).expect("alice faulty");
    // The daemon may die before its answer is out: the message is durable before delivery
    // starts, so the answer does not matter here.
    let body = serde_json::to_vec(&json!({"text": "exactly once"})).expect("json");
    let _ = nodes[0].api().raw("POST", &format!("/v1/channels/{id}/messages"), Some(body)).await;
    nodes[0].wait_exit(WAIT).expect("alice crashed at the fault");
    nodes[0].restart().expect("alice back");
    let want = ["before", "while the relay was down", "exactly once"];
    nodes[1].wait_texts(&id, WAIT, |t| t == want).await.expect("bob");
    // Give the resend time to arrive, then check there is still exactly one.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let v =
            nodes[0].json("GET", &format!("/v1/channels/{id}/messages"), None).await.expect("m");
        let statuses: Vec<&str> = v["messages"]
            .as_array()
            .expect("m")
            .iter()
            .filter_map(|m| m["status"].as_str())
            .collect();
        if statuses.iter().all(|s| *s == "sent") || Instant::now() > deadline {
            assert!(statuses.iter().all(|s| *s == "sent"), "{statuses:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(nodes[1].texts(&id).await.expect("bob"), want);
    let v = nodes[1].json("GET", &format!("/v1/channels/{id}/messages"), None).await.expect("m");
    assert_eq!(v["messages"].as_array().expect("m").len(), 3, "stored once each");

    // 3. A send leaves before its commit (all but a run's first in a channel). Alice dies in
    //    that window: the message is out, the state that encrypted it is not on disk. On
    //    restart she skips its generation and id, so her next message is read, not dropped
    //    as a copy of the one that left (or refused for a reused key).
    nodes[0].kill9();
    nodes[0].restart_with(&[("CHITCHAT_FAULT", "exit-before-send-commit")]).expect("alice");
    send(&nodes[0], &id, "first of a run").await;
    // Settled, so that the outbox is idle (the fault holds the engine until the process dies).
    let deadline = Instant::now() + WAIT;
    loop {
        let v = nodes[0]
            .json("GET", &format!("/v1/channels/{id}/messages?limit=1"), None)
            .await
            .expect("m");
        if v["messages"][0]["status"] == "sent" {
            break;
        }
        assert!(Instant::now() < deadline, "not sent: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = serde_json::to_vec(&json!({"text": "cut short"})).expect("json");
    let _ = nodes[0].api().raw("POST", &format!("/v1/channels/{id}/messages"), Some(body)).await;
    nodes[0].wait_exit(WAIT).expect("alice crashed before the commit");
    nodes[0].restart().expect("alice back");
    send(&nodes[0], &id, "after the crash").await;
    let want = [&want[..], &["first of a run", "cut short", "after the crash"]].concat();
    nodes[1].wait_texts(&id, WAIT, |t| t == want).await.expect("bob reads all");
    // Alice's history never had the message that was cut short: she was never told it was
    // sending.
    let mine = nodes[0].texts(&id).await.expect("alice");
    assert!(!mine.iter().any(|t| t == "cut short"), "{mine:?}");
    assert!(mine.iter().any(|t| t == "after the crash"), "{mine:?}");

    // 4. A clean stop (SIGTERM) records that no send was cut short: the next start skips
    //    nothing, and the next message's id follows on (no gap for receivers to remember).
    let before = send(&nodes[0], &id, "before a clean stop").await;
    nodes[0].stop().expect("clean stop");
    nodes[0].restart().expect("alice back");
    let after = send(&nodes[0], &id, "after a clean stop").await;
    let counter = |id: &str| -> u64 {
        id.rsplit('.').next().and_then(|n| n.parse().ok()).expect("SENDER:EPOCH.N")
    };
    assert_eq!(counter(&after), counter(&before) + 1, "{before} then {after}");
}

/// The node never throws away a commit the relay may have ordered. The relay orders Alice's
/// invitation of Carol and dies before it answers (or fans out); Alice is killed while she
/// retries. Both come back: the relay fans the commit out as it re-applies its log, Alice's node
/// resubmits the staged commit at start, gets the certificate of the winner (its own) and merges
/// it; all three agree on the epoch and the members, and talk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_the_relay_ordered_without_answering_is_merged_after_restarts() {
    const FAULT: &str = chitchat_relay::fanout::FAULT_ENV;
    let mut relay = RelayProcess::start_fixed(|c| c.to_owned()).expect("relay");
    let mut nodes = users(&relay, &["alice", "bob", "carol"]).await;
    let id = create(&nodes[0], "general").await;
    let invite = |address: &'static str| {
        let api = nodes[0].api().clone();
        let path = format!("/v1/channels/{id}/invite");
        async move { api.json("POST", &path, Some(json!({"address": address}))).await }
    };
    invite("bob@localhost").await.expect("invite bob");
    relay.set_env(FAULT, Some("exit-before-fanout"));
    relay.kill9();
    relay.restart().expect("relay armed");
    // Alice's node reconnects by itself; her invitation is ordered, and the relay dies.
    let pending = tokio::spawn(invite("carol@localhost"));
    relay.wait_exit(WAIT).expect("the relay died between ordering and fan-out");
    nodes[0].kill9();
    let answer = pending.await.expect("task");
    assert!(answer.is_err(), "Alice never heard the relay's answer: {answer:?}");
    relay.set_env(FAULT, None);
    relay.restart().expect("relay back");
    nodes[0].restart().expect("alice back");

    let everyone = ["alice@localhost", "bob@localhost", "carol@localhost"];
    let deadline = Instant::now() + WAIT;
    loop {
        let mut views = Vec::new();
        for node in &nodes {
            let v = node.json("GET", &format!("/v1/channels/{id}/members"), None).await;
            views.push(v.map(|v| (v["epoch"].clone(), v["members"].as_array().map(Vec::len))).ok());
        }
        let agreed = views.iter().all(|v| *v == views[0]) && views[0].is_some();
        if agreed && members(&nodes[2], &id).await == everyone {
            assert_eq!(views[0], Some((json!(2), Some(3))), "{views:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no agreement: {views:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(members(&nodes[0], &id).await, everyone);
    send(&nodes[2], &id, "carol is in").await;
    for node in &nodes[..2] {
        node.wait_texts(&id, WAIT, |t| t == ["carol is in"]).await.expect("carol heard");
    }
    nodes.truncate(3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_offline_for_1000_messages_catches_up() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let mut nodes = users(&relay, &["alice", "bob"]).await;
    let id = create(&nodes[0], "general").await;
    nodes[0]
        .json(
            "POST",
            &format!("/v1/channels/{id}/invite"),
            Some(json!({"address": "bob@localhost"})),
        )
        .await
        .expect("invite");
    send(&nodes[0], &id, "m0").await;
    nodes[1].wait_texts(&id, WAIT, |t| t.len() == 1).await.expect("bob joined");
    nodes[1].kill9();
    for i in 1..=1000 {
        send(&nodes[0], &id, &format!("m{i}")).await;
    }
    let started = Instant::now();
    nodes[1].restart().expect("bob back");
    let texts = nodes[1]
        .wait_texts(&id, Duration::from_secs(120), |t| t.len() == 1001)
        .await
        .expect("bob caught up");
    eprintln!(
        "caught up on 1000 messages in {:?} (including the daemon's start)",
        started.elapsed()
    );
    let want: Vec<String> = (0..=1000).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want, "every message, once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_to_the_local_api_gets_a_clear_4xx() {
    let node = NodeProcess::start(&[]).expect("node");
    let api = node.api();
    let expect = |(status, bytes): (u16, Vec<u8>), want: u16, says: &str| {
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
        assert_eq!(status, want, "{v}");
        let message = v["message"].as_str().expect("a message");
        assert!(message.contains(says), "{message:?} should say {says:?}");
        assert!(v["error"].is_string(), "{v}");
    };
    let post = |path: &'static str, body: &[u8]| api.raw("POST", path, Some(body.to_vec()));
    expect(post("/v1/channels", b"{not json").await.expect("r"), 400, "invalid JSON");
    expect(post("/v1/channels", b"[1,2,3]").await.expect("r"), 400, "invalid JSON");
    expect(post("/v1/channels", br#"{"name": 5}"#).await.expect("r"), 400, "invalid type");
    expect(
        post("/v1/channels", br#"{"name": "x", "colour": 1}"#).await.expect("r"),
        400,
        "unknown field",
    );
    expect(post("/v1/channels", &[0xff, 0xfe, 0x00]).await.expect("r"), 400, "invalid JSON");
    expect(post("/v1/channels", br#"{"name": "x"}"#).await.expect("r"), 409, "not registered");
    expect(
        post("/v1/register", br#"{"relay": "ftp://x", "name": "a"}"#).await.expect("r"),
        400,
        "HTTP address",
    );
    expect(
        post("/v1/register", br#"{"relay": "http://x", "name": "A B"}"#).await.expect("r"),
        400,
        "name",
    );
    expect(
        api.raw("GET", "/v1/channels/nope/history", None).await.expect("r"),
        404,
        "no such channel",
    );
    expect(api.raw("GET", "/v1/messages/zz:1", None).await.expect("r"), 400, "hex");
    expect(api.raw("GET", "/v1/messages/abcd:x.y", None).await.expect("r"), 400, "sequence");
    expect(api.raw("GET", "/v1/nowhere", None).await.expect("r"), 404, "no such route");
    let huge = vec![b'a'; 2 * 1024 * 1024];
    expect(post("/v1/channels", &huge).await.expect("r"), 413, "over 1048576 bytes");
    // Without the token, or with a wrong one: 401.
    let target = chitchat_node::config::ApiListen::parse(
        &chitchat_node::home::NodeDir::new(node.home()).load_run_info().expect("run").api,
    )
    .expect("addr");
    let wrong = chitchat_node::client::ApiClient::new(target, "wrong".into());
    expect(wrong.raw("GET", "/v1/status", None).await.expect("r"), 401, "wrong API token");
    // The daemon still works.
    let v = node.json("GET", "/v1/status", None).await.expect("status");
    assert!(v["device"].is_string());
}

/// Every error is JSON, with a code and a message, including those axum raises before a handler
/// runs; limits are refused or clamped as API.md says; channel names stay usable; the status
/// says whether the relay link is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_api_answers_every_error_in_json() {
    let mut relay = RelayProcess::start_fixed(|c| c.to_owned()).expect("relay");
    let nodes = users(&relay, &["alice"]).await;
    let alice = &nodes[0];
    let api = alice.api();
    let expect = |(status, bytes): (u16, Vec<u8>), want: u16, code: &str, says: &str| {
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
        assert_eq!((status, v["error"].as_str()), (want, Some(code)), "{v}");
        let message = v["message"].as_str().expect("a message");
        assert!(message.contains(says), "{message:?} should say {says:?}");
    };
    let id = create(alice, "general").await;
    let post = |path: &'static str, body: Value| {
        api.raw("POST", path, Some(serde_json::to_vec(&body).expect("json")))
    };
    // A second channel of one name is refused: the name keeps finding the first.
    expect(
        post("/v1/channels", json!({"name": "general"})).await.expect("r"),
        409,
        "channel_exists",
        "exists",
    );
    expect(
        post("/v1/channels", json!({"name": "news\u{1b}[2J"})).await.expect("r"),
        400,
        "bad_request",
        "control characters",
    );
    expect(
        post("/v1/channels", json!({"name": "x", "mime": "text/plain\n"})).await.expect("r"),
        400,
        "bad_request",
        "control characters",
    );
    let v = alice.json("GET", "/v1/channels/general", None).await.expect("by name");
    assert_eq!(v["id"], id.as_str());
    // Query parameters.
    let get = async |path: String| api.raw("GET", &path, None).await;
    let messages = format!("/v1/channels/{id}/messages");
    expect(get(format!("{messages}?limit=abc")).await.expect("r"), 400, "bad_request", "limit");
    expect(get(format!("{messages}?limit=-1")).await.expect("r"), 400, "bad_request", "limit");
    expect(
        get(format!("{messages}?limit=99999999999999999999999")).await.expect("r"),
        400,
        "bad_request",
        "limit",
    );
    expect(get(format!("{messages}?limit=0")).await.expect("r"), 400, "bad_request", "1 to");
    expect(get(format!("{messages}?colour=red")).await.expect("r"), 400, "bad_request", "colour");
    let history = format!("/v1/channels/{id}/history?limit=0");
    expect(get(history).await.expect("r"), 400, "bad_request", "1 to");
    let (status, _) = get(format!("{messages}?limit=18446744073709551615")).await.expect("r");
    assert_eq!(status, 200, "a huge limit is clamped");
    // Methods a route does not take.
    expect(
        api.raw("DELETE", "/v1/channels", None).await.expect("r"),
        405,
        "method_not_allowed",
        "method",
    );
    expect(
        api.raw("POST", "/v1/status", Some(b"{}".to_vec())).await.expect("r"),
        405,
        "method_not_allowed",
        "method",
    );
    // The event stream is a WebSocket.
    expect(get("/v1/events".into()).await.expect("r"), 426, "websocket_required", "WebSocket");
    // The relay link is up, and says since when; it goes down with the relay and comes back
    // by itself.
    let link = async |connected: bool| {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = alice.json("GET", "/v1/status", None).await.expect("status");
            if v["relay_link"]["connected"] == connected {
                return v["relay_link"]["since_ms"].as_u64().expect("since_ms");
            }
            assert!(Instant::now() < deadline, "the link never became {connected}: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let up = link(true).await;
    // A stream of one channel's events gets the link's too.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let events = {
        let api = api.clone();
        tokio::spawn(async move {
            api.events(Some("general"), |e| {
                if e["type"] == "relay" {
                    let _ = tx.send(e["connected"].as_bool());
                }
                true
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.kill9();
    let down = link(false).await;
    assert!(down >= up, "down since {down}, up since {up}");
    let event = tokio::time::timeout(WAIT, rx.recv()).await.expect("an event in time");
    assert_eq!(event, Some(Some(false)), "the stream says the link went down");
    relay.restart().expect("relay back");
    assert!(link(true).await >= down);
    let event = tokio::time::timeout(WAIT, rx.recv()).await.expect("an event in time");
    assert_eq!(event, Some(Some(true)), "the stream says the link came back");
    events.abort();
}

/// A `.well-known` whose peer id is not the relay's key (a proxy or an impostor answering
/// for it) is refused at registration: the node would otherwise trust sponsorships signed by
/// one key while talking to another peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_known_naming_another_peer_is_refused() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let mut wk: Value =
        serde_json::from_str(&relay.http_get("/.well-known/chitchat/relay").expect("wk"))
            .expect("json");
    let impostor = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
    wk["peer_id"] = json!(impostor.to_string());
    let body = wk.to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    let node = NodeProcess::start(&[]).expect("node");
    let token = relay.cli(&["invite"]).expect("invite").trim().to_owned();
    let register = json!({"relay": url, "token": token, "name": "alice"});
    let (status, bytes) = node
        .api()
        .raw("POST", "/v1/register", Some(serde_json::to_vec(&register).expect("json")))
        .await
        .expect("request");
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| m.contains("peer id")), "{v}");
    let status = node.json("GET", "/v1/status", None).await.expect("status");
    assert!(status["account"].is_null(), "not registered: {status}");
}

/// The scripted demo of the README runs as documented.
#[test]
fn the_two_user_demo_script_runs() {
    let bin = chitchat_tests::binaries_dir();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../node/demo/two-users.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .env("CHITCHAT_BIN", &bin)
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "registered as bob@localhost",
        "added bob@localhost",
        "thanks alice!",
        "[deleted]",
        "(edited)",
        "🎉 bob@localhost",
        "read by bob@localhost",
    ] {
        assert!(stdout.contains(want), "the demo's output lacks {want:?}:\n{stdout}");
    }
}

/// The local API on a Unix socket, and the node's secrets readable by their owner only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_api_on_a_unix_socket_and_private_files() {
    use std::os::unix::fs::PermissionsExt as _;
    let node = NodeProcess::start(&[("CHITCHAT_API_LISTEN", "unix:api.sock")]).expect("node");
    let run = chitchat_node::home::NodeDir::new(node.home()).load_run_info().expect("run.json");
    assert!(run.api.starts_with("unix:"), "{run:?}");
    let v = node.json("GET", "/v1/status", None).await.expect("status over the socket");
    assert!(v["device"].is_string());
    let out = node.cli(&["whoami"]).expect("the CLI finds the socket");
    assert!(out.contains("not registered"), "{out}");
    let mode = |name: &str| {
        std::fs::metadata(node.home().join(name)).expect(name).permissions().mode() & 0o777
    };
    assert_eq!(mode("api.token"), 0o600);
    assert_eq!(mode("node.redb"), 0o600);
    assert_eq!(mode("api.sock"), 0o600);
    assert_eq!(std::fs::metadata(node.home()).expect("home").permissions().mode() & 0o777, 0o700);
}

/// Bob's node is away while Alice adds Carol; it comes back and Bob sends at once. The node
/// reads what the relay kept for it before it encrypts, so the message is for the channel as
/// it is now: Carol reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_from_away_sends_to_the_members_added_meanwhile() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let mut nodes = users(&relay, &["alice", "bob", "carol"]).await;
    let id = nodes[0].cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    nodes[0].cli(&["invite", "general", "bob@localhost"]).expect("invite bob");
    send(&nodes[0], &id, "hello bob").await;
    nodes[1].wait_texts(&id, WAIT, |t| t == ["hello bob"]).await.expect("bob joined");
    nodes[1].stop().expect("bob stops");
    nodes[0].cli(&["invite", "general", "carol@localhost"]).expect("invite carol");
    nodes[2].wait_joined(&id, WAIT).await.expect("carol joined");
    nodes[1].restart().expect("bob is back");
    send(&nodes[1], &id, "back, hello carol").await;
    nodes[2]
        .wait_texts(&id, WAIT, |t| t.iter().any(|m| m == "back, hello carol"))
        .await
        .expect("carol reads what bob sent as he came back");
    assert_eq!(members(&nodes[1], &id).await.len(), 3);
}

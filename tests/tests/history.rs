//! A channel's history at its relay, end to end: real `chitchat` daemons and a real relay as
//! separate processes on loopback. A node whose inbox missed messages (it was full) fills them
//! in from the relay's history, checked against the pack the relay signed.

use std::time::Duration;

use chitchat_proto::ordering::ChannelId;
use chitchat_proto::wire::{ErrorCode, Request, Response};
use chitchat_tests::{Device, NodeProcess, RelayProcess, register};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

async fn send(node: &NodeProcess, channel: &str, text: &str) {
    node.json("POST", &format!("/v1/channels/{channel}/messages"), Some(json!({"text": text})))
        .await
        .expect("send");
}

async fn status(node: &NodeProcess) -> Value {
    node.json("GET", "/v1/status", None).await.expect("status")
}

/// Bob is away while Alice sends more than his inbox holds (5 items at this relay) and adds
/// Carol in the middle (a commit, which the inbox takes past its quota). When Bob is back, the
/// relay's notice and his next items say what his inbox missed; he fetches it from the relay's
/// history and shows every message, in order, once: also those of the epoch before Carol's,
/// which he must read before he applies her commit. A device that is no member of the channel
/// gets none of its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_inbox_was_full_fills_it_in_from_the_history() {
    let relay = RelayProcess::start(|c| c.replace("max_items = 10000", "max_items = 5"), &[])
        .expect("relay");
    let alice = NodeProcess::start(&[]).expect("alice");
    alice.register(&relay, "alice").await.expect("register");
    let mut bob = NodeProcess::start(&[]).expect("bob");
    bob.register(&relay, "bob").await.expect("register");
    let carol = NodeProcess::start(&[]).expect("carol");
    carol.register(&relay, "carol").await.expect("register");
    let id = alice.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    alice.cli(&["invite", "general", "bob@localhost"]).expect("invite");
    bob.wait_joined(&id, WAIT).await.expect("bob joins");
    send(&alice, &id, "hello").await;
    bob.wait_texts(&id, WAIT, |t| t == ["hello"]).await.expect("bob reads");
    // Let Bob's acknowledgements land: his inbox is empty when he goes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob.stop().expect("bob stops");

    let mut expected = vec!["hello".to_owned()];
    for i in 0..8 {
        let text = format!("before carol {i}");
        send(&alice, &id, &text).await;
        expected.push(text);
    }
    alice.cli(&["invite", "general", "carol@localhost"]).expect("invite");
    carol.wait_joined(&id, WAIT).await.expect("carol joins");
    for i in 0..8 {
        let text = format!("with carol {i}");
        send(&alice, &id, &text).await;
        expected.push(text);
    }
    carol.wait_texts(&id, WAIT, |t| t.len() == 8).await.expect("carol reads her part");

    bob.restart().expect("bob is back");
    let texts = bob.wait_texts(&id, WAIT, |t| t.len() >= expected.len()).await;
    let texts = texts.expect("bob reads everything");
    assert_eq!(texts, expected, "every message, in order, once");
    let s = status(&bob).await;
    assert_eq!(s["dropped"]["missed"], 0, "nothing was lost for good: {s}");
    assert_eq!(s["dropped"]["too_old"], 0, "read at their own epochs: {s}");

    // Mallory, registered here but no member, asks for the channel's history.
    let mallory = Device::new(66);
    let client = register(&relay, &mallory, "mallory").await;
    let channel: ChannelId =
        ChannelId(hex::decode(&id).expect("hex id").try_into().expect("32 bytes"));
    let answer = client.call(&Request::History { channel, from: 0, max: 256 }).await;
    assert!(
        matches!(answer, Ok(Response::Error { code: ErrorCode::Forbidden, .. })),
        "a non-member got {answer:?}"
    );
}

//! Several devices of one user, end to end: real `chitchat` daemons and a real relay as
//! separate processes on loopback. Linking with a one-time code (the CLI's `devices link` and
//! `init --link`), the records that name each other, the device list, and the codes that must
//! not work: a wrong one, a used one, and a hello made without the secret. Revoking a stolen
//! device: what the thief cannot do, and what the revoked device can no longer do.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chitchat_proto::link::{LinkCode, LinkHello, LinkSecret};
use chitchat_proto::wire::{ErrorCode, Request, Response};
use chitchat_proto::{DeviceId, Dir, DirBody, SecretKey, identity::Profile};
use chitchat_tests::{Client, NodeProcess, RelayProcess};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// `chitchat devices link` on `node`, running: the code it printed, and the process (which
/// waits for the new device).
fn show_code(node: &NodeProcess) -> (String, std::process::Child) {
    let mut child = node
        .command(&["devices", "link"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("devices link");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut qr_lines = 0;
    let code = loop {
        let line = lines.next().expect("a line").expect("utf-8");
        if let Some(code) = line.strip_prefix("link code: ") {
            break code.to_owned();
        }
        if line.contains('█') || line.contains('▀') || line.contains('▄') {
            qr_lines += 1;
        }
    };
    assert!(qr_lines > 10, "a QR code is drawn above the code ({qr_lines} lines)");
    // The rest of the output is read by whoever waits for the process.
    std::thread::spawn(move || lines.for_each(drop));
    (code, child)
}

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "`devices link` still waits");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn devices(node: &NodeProcess) -> Value {
    node.json("GET", "/v1/devices", None).await.expect("devices")
}

async fn send(node: &NodeProcess, channel: &str, text: &str) {
    let body = serde_json::json!({"text": text});
    node.json("POST", &format!("/v1/channels/{channel}/messages"), Some(body)).await.expect("send");
}

/// Who sent the message `text` in `channel`, as `node` shows it, once it is there.
async fn wait_sender(node: &NodeProcess, channel: &str, text: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = node.json("GET", &format!("/v1/channels/{channel}/history"), None).await;
        let found = v.ok().and_then(|v| {
            v["history"]["messages"].as_array()?.iter().find(|m| m["body"] == text).cloned()
        });
        if let Some(m) = found {
            return m["from"].as_str().unwrap_or_default().to_owned();
        }
        assert!(Instant::now() < deadline, "{text:?} never reached the node");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The member devices of `channel` as `node` lists them.
async fn members_of(node: &NodeProcess, channel: &str) -> Vec<String> {
    let v = node.json("GET", &format!("/v1/channels/{channel}/members"), None).await;
    v.expect("members")["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["device"].as_str().map(str::to_owned))
        .collect()
}

fn entry<'a>(list: &'a Value, device: &str) -> &'a Value {
    list["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["device"] == device))
        .unwrap_or_else(|| panic!("{device} is not listed: {list}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_code_links_a_new_device_once_and_only_with_its_secret() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    let laptop = NodeProcess::start(&[]).expect("laptop");
    laptop.register(&relay, "alice").await.expect("register");
    laptop.cli(&["devices", "name", "laptop"]).expect("name the laptop");
    let status = laptop.json("GET", "/v1/status", None).await.expect("status");
    let laptop_id = status["device"].as_str().expect("device").to_owned();
    // Alice's user administers "general", with Bob in it; Bob's user administers "bobs", with
    // Alice's laptop in it (there the laptop is no admin).
    let bob = NodeProcess::start(&[]).expect("bob");
    bob.register(&relay, "bob").await.expect("register");
    let general = laptop.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    laptop.cli(&["invite", "general", "bob@localhost"]).expect("invite bob");
    bob.wait_joined(&general, WAIT).await.expect("bob joins general");
    let bobs = bob.cli(&["channel", "create", "bobs"]).expect("create").trim().to_owned();
    bob.cli(&["invite", "bobs", "alice@localhost"]).expect("invite alice");
    laptop.wait_joined(&bobs, WAIT).await.expect("the laptop joins bobs");
    send(&laptop, &general, "before the phone").await;
    send(&bob, &general, "bob, before the phone").await;
    let before =
        laptop.wait_texts(&general, WAIT, |t| t.len() == 2).await.expect("the laptop reads both");
    bob.wait_texts(&general, WAIT, |t| t == before).await.expect("bob reads both");

    // The CLI shows a code and a QR code; the new device links with it.
    let (code, mut waiting) = show_code(&laptop);
    assert!(LinkCode::parse(&code).is_ok(), "{code}");
    let phone = NodeProcess::start_linked(&code, "phone", &[]).expect("the phone links");
    assert!(wait_exit(&mut waiting).success(), "`devices link` ends once the phone is linked");
    let me = phone.json("GET", "/v1/status", None).await.expect("status");
    assert_eq!(me["account"]["address"], "alice@localhost", "{me}");
    let phone_id = me["device"].as_str().expect("device").to_owned();

    // Both devices list both, linked both ways, with their names; each record's sequence
    // number follows the one before it (laptop: registered 1, sponsored 2, linked 3; phone:
    // first 1, linked 2, sponsored 3).
    for node in [&laptop, &phone] {
        let list = devices(node).await;
        assert_eq!(list["address"], "alice@localhost");
        assert_eq!(list["devices"].as_array().map(Vec::len), Some(2), "{list}");
        let (l, p) = (entry(&list, &laptop_id), entry(&list, &phone_id));
        assert_eq!((l["name"].as_str(), p["name"].as_str()), (Some("laptop"), Some("phone")));
        assert_eq!((l["linked"].as_bool(), p["linked"].as_bool()), (Some(true), Some(true)));
        assert_eq!((l["record_seq"].as_u64(), p["record_seq"].as_u64()), (Some(3), Some(3)));
        assert!(l["last_seen_ms"].as_u64().is_some() && p["last_seen_ms"].as_u64().is_some());
    }
    let shown = laptop.cli(&["devices"]).expect("devices");
    assert!(shown.contains("phone") && shown.contains("just now"), "{shown}");
    assert!(shown.contains("this device"), "{shown}");

    // The phone follows the user into both channels: "general", where the user is admin, and
    // "bobs", where the laptop brought it in without being an admin.
    phone.wait_joined(&general, WAIT).await.expect("the phone joins general");
    phone.wait_joined(&bobs, WAIT).await.expect("the phone joins bobs");
    // It shows what was said before it came, as the laptop does: the laptop handed it the
    // channel's history, re-encrypted for it.
    phone.wait_texts(&general, WAIT, |t| t == before).await.expect("the phone shows the history");
    let history = phone.json("GET", &format!("/v1/channels/{general}/history"), None).await;
    let history = history.expect("history");
    let senders: Vec<&str> = history["history"]["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["from"].as_str())
        .collect();
    assert_eq!(senders, ["alice@localhost", "bob@localhost"], "{history}");
    // The phone edits what the laptop said: an edit belongs to the user, not to one device.
    let target = history["history"]["messages"][0]["id"].as_str().expect("id").to_owned();
    let edit = serde_json::json!({"content": {"type": "edit", "target": target, "body": "edited"}});
    phone
        .json("POST", &format!("/v1/channels/{general}/messages"), Some(edit))
        .await
        .expect("edit");
    for node in [&bob, &laptop] {
        node.wait_texts(&general, WAIT, |t| t.first().map(String::as_str) == Some("edited"))
            .await
            .expect("the edit shows everywhere");
    }
    // A message from either device is Alice's, everywhere.
    send(&phone, &general, "from the phone").await;
    for node in [&bob, &laptop] {
        let from = wait_sender(node, &general, "from the phone").await;
        assert_eq!(from, "alice@localhost");
    }
    send(&laptop, &bobs, "from the laptop").await;
    for node in [&bob, &phone] {
        assert_eq!(wait_sender(node, &bobs, "from the laptop").await, "alice@localhost");
    }
    // The phone leaves general; the laptop (an admin device: the user is admin) removes it on
    // its request, and does not bring it back, even after a restart (its follow-up runs at
    // start): a device of the user that left a channel stays out.
    phone.cli(&["leave", "general"]).expect("leave");
    let deadline = Instant::now() + WAIT;
    while members_of(&laptop, &general).await.contains(&phone_id) {
        assert!(Instant::now() < deadline, "the phone's leave was not carried out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut laptop = laptop;
    laptop.restart().expect("restart the laptop");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!members_of(&laptop, &general).await.contains(&phone_id), "brought back");
    assert!(members_of(&laptop, &bobs).await.contains(&phone_id), "still in bobs");

    // Bob removes the user: both devices go in one commit.
    bob.cli(&["remove", "bobs", "alice@localhost"]).expect("remove alice");
    let members = bob.json("GET", &format!("/v1/channels/{bobs}/members"), None).await.expect("m");
    assert_eq!(members["members"].as_array().map(Vec::len), Some(1), "{members}");

    // Anyone looking alice up finds both devices, and their records verify.
    let found = bob.json("GET", "/v1/users/alice@localhost", None).await.expect("lookup");
    assert_eq!(found["devices"].as_array().map(Vec::len), Some(2), "{found}");

    // The code is spent: a third device cannot use it.
    let err = NodeProcess::start_linked(&code, "thief", &[]).expect_err("a used code");
    assert!(err.to_string().contains("used already"), "{err}");
    // A wrong code (one character of the secret changed) is refused as such.
    let (code, mut waiting) = show_code(&laptop);
    let wrong = format!("{}{}", if code.starts_with('A') { 'B' } else { 'A' }, &code[1..]);
    let err = NodeProcess::start_linked(&wrong, "typo", &[]).expect_err("a wrong code");
    assert!(err.to_string().contains("wrong or has expired"), "{err}");
    let _ = waiting.kill();
    let _ = waiting.wait();

    // Someone who learned the slot but not the secret (the relay itself could) puts a hello
    // with a proof made under another secret: the laptop refuses to link it, and its record
    // lists only the phone.
    let (code, mut waiting) = show_code(&laptop);
    let code = LinkCode::parse(&code).expect("code");
    let intruder = SecretKey::from_seed([77; 32]);
    let client = Client::connect(relay.tcp_addr(), relay.peer_id()).await.expect("connect");
    client.authenticate(&intruder, relay.host()).await.expect("authenticate");
    let record = Dir::sign(
        &intruder,
        DirBody {
            device: DeviceId(intruder.public()),
            seq: 1,
            inbox_key: [3; 32],
            linked: Default::default(),
            sponsorships: vec![],
            profile: Profile::default(),
            revoked: false,
            issued: chitchat_node::daemon::now(),
        },
    );
    let guessed = LinkSecret::generate(&mut rand::rng());
    let hello = LinkHello::new(&guessed, record);
    let slot = code.secret.slot();
    let answer = client.call(&Request::JoinLink { slot, hello }).await.expect("join");
    assert_eq!(answer, Response::LinkJoined, "the relay cannot tell: the proof needs the secret");
    let status = wait_exit(&mut waiting);
    assert!(!status.success(), "`devices link` reports the failed link");
    // No answer for the intruder, ever; and the laptop's record does not list it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    match client.call(&Request::LinkPoll { slot }).await.expect("poll") {
        Response::LinkState { answer: None, .. } => {}
        other => panic!("the intruder got {other:?}"),
    }
    let list = devices(&laptop).await;
    assert_eq!(list["devices"].as_array().map(Vec::len), Some(2), "{list}");
    // The intruder cannot register under alice's name either (nothing links it).
    let register = Request::Register {
        token: None,
        local_name: "alice".into(),
        dir: match client.call(&Request::LinkPoll { slot }).await.expect("poll") {
            Response::LinkState { hello: Some(h), .. } => h.dir,
            other => panic!("{other:?}"),
        },
    };
    match client.call(&register).await.expect("register") {
        Response::Error { code: ErrorCode::NameTaken, .. } => {}
        other => panic!("the intruder registered: {other:?}"),
    }
}

/// The texts `node` shows in `channel` now.
async fn texts(node: &NodeProcess, channel: &str) -> Vec<String> {
    let v = node.json("GET", &format!("/v1/channels/{channel}/history"), None).await;
    v.ok()
        .and_then(|v| {
            let messages = v["history"]["messages"].as_array()?.clone();
            Some(messages.iter().filter_map(|m| m["body"].as_str().map(str::to_owned)).collect())
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_device_can_neither_read_nor_send_and_a_lost_one_revokes_no_one() {
    let relay = RelayProcess::start(|c| c.to_owned(), &[]).expect("relay");
    // Alice registers her laptop with the CLI, which shows the recovery code once.
    let laptop = NodeProcess::start(&[]).expect("laptop");
    let token = relay.cli(&["invite"]).expect("invite").trim().to_owned();
    let url = format!("http://{}", relay.info.http);
    let out = laptop
        .cli(&["register", "--relay", &url, "--token", &token, "--name", "alice"])
        .expect("register");
    let recovery = out
        .lines()
        .find_map(|l| l.strip_prefix("recovery code: "))
        .unwrap_or_else(|| panic!("no recovery code shown: {out}"))
        .to_owned();
    laptop.cli(&["devices", "name", "laptop"]).expect("name the laptop");
    let laptop_id = laptop.json("GET", "/v1/status", None).await.expect("status")["device"]
        .as_str()
        .expect("device")
        .to_owned();
    let bob = NodeProcess::start(&[]).expect("bob");
    bob.register(&relay, "bob").await.expect("register");
    let general = laptop.cli(&["channel", "create", "general"]).expect("create").trim().to_owned();
    laptop.cli(&["invite", "general", "bob@localhost"]).expect("invite bob");
    bob.wait_joined(&general, WAIT).await.expect("bob joins general");
    let (code, mut waiting) = show_code(&laptop);
    let phone = NodeProcess::start_linked(&code, "phone", &[]).expect("the phone links");
    assert!(wait_exit(&mut waiting).success());
    let phone_id = phone.json("GET", "/v1/status", None).await.expect("status")["device"]
        .as_str()
        .expect("device")
        .to_owned();
    phone.wait_joined(&general, WAIT).await.expect("the phone joins general");
    send(&bob, &general, "bob, before").await;
    phone
        .wait_texts(&general, WAIT, |t| t.contains(&"bob, before".to_owned()))
        .await
        .expect("read");

    // The phone is stolen. The thief links a tablet of their own from it, and both sign a
    // revocation of the laptop: not enough (devices vote only a week after they registered),
    // a made-up recovery code is refused, and a recovery code of the thief's own cannot be set
    // (the user has one).
    let (code, mut waiting) = show_code(&phone);
    let tablet = NodeProcess::start_linked(&code, "tablet", &[]).expect("the tablet links");
    assert!(wait_exit(&mut waiting).success());
    let tablet_id = tablet.json("GET", "/v1/status", None).await.expect("status")["device"]
        .as_str()
        .expect("device")
        .to_owned();
    tablet.wait_joined(&general, WAIT).await.expect("the phone brings the tablet in");
    for thief in [&phone, &tablet] {
        let out = thief.cli(&["devices", "revoke", "laptop"]).expect("sign");
        assert!(out.contains("signatures needed"), "{out}");
    }
    let forged = "ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZR";
    let err =
        phone.cli(&["devices", "revoke", "laptop", "--recovery", forged]).expect_err("forged");
    assert!(err.to_string().contains("signature"), "{err}");
    let err = phone.cli(&["devices", "recovery"]).expect_err("a second recovery code");
    assert!(err.to_string().contains("recovery code already"), "{err}");
    let list = devices(&laptop).await;
    assert_eq!(entry(&list, &laptop_id)["revoked"], false, "{list}");
    let found = bob.json("GET", "/v1/users/alice@localhost", None).await.expect("lookup");
    assert_eq!(found["devices"].as_array().map(Vec::len), Some(3), "{found}");
    // The tablet's record lists the phone and the laptop; the laptop lists it back on its
    // next pass (here: at start), so that the user's records name each other both ways.
    let mut laptop = laptop;
    laptop.restart().expect("restart the laptop");
    let deadline = Instant::now() + WAIT;
    while entry(&devices(&laptop).await, &tablet_id)["linked"] != true {
        assert!(Instant::now() < deadline, "the laptop never listed the tablet");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Alice revokes the phone from the laptop with her recovery code.
    let out = laptop.cli(&["devices", "revoke", "phone", "--recovery", &recovery]).expect("revoke");
    assert!(out.starts_with("revoked"), "{out}");
    let shown = laptop.cli(&["devices"]).expect("devices");
    assert!(shown.contains("REVOKED"), "{shown}");
    let list = devices(&laptop).await;
    assert_eq!(entry(&list, &phone_id)["revoked"], true, "{list}");
    assert_eq!(entry(&list, &phone_id)["revoked_with_recovery_code"], true, "{list}");
    // The relay published it: a look-up of alice finds the laptop and the tablet.
    let found = bob.json("GET", "/v1/users/alice@localhost", None).await.expect("lookup");
    assert_eq!(found["devices"].as_array().map(Vec::len), Some(2), "{found}");
    // General removes it by an ordered commit, which Bob applies too.
    let deadline = Instant::now() + WAIT;
    while members_of(&laptop, &general).await.contains(&phone_id)
        || members_of(&bob, &general).await.contains(&phone_id)
    {
        assert!(Instant::now() < deadline, "the revoked phone is still a member");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The phone's relay refuses it everything.
    let err = phone.cli(&["devices"]).expect_err("the relay serves a revoked device");
    assert!(err.to_string().contains("revoked"), "{err}");
    let status = phone.cli(&["status"]).expect("status");
    assert!(status.contains("THIS DEVICE WAS REVOKED"), "{status}");
    // What it sends from its old epoch is shown nowhere; what is said after, it never reads.
    send(&phone, &general, "from the stolen phone").await;
    send(&bob, &general, "bob, after").await;
    laptop
        .wait_texts(&general, WAIT, |t| t.contains(&"bob, after".to_owned()))
        .await
        .expect("read");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for node in [&laptop, &bob] {
        let t = texts(node, &general).await;
        assert!(!t.contains(&"from the stolen phone".to_owned()), "{t:?}");
    }
    let t = texts(&phone, &general).await;
    assert!(!t.contains(&"bob, after".to_owned()), "the revoked phone read {t:?}");
    // The laptop's record no longer lists the phone.
    let list = devices(&laptop).await;
    assert_eq!(entry(&list, &phone_id)["linked"], false, "{list}");
    // The thief's tablet goes the same way, by its id this time.
    let out = laptop
        .cli(&["devices", "revoke", &tablet_id[..12], "--recovery", &recovery])
        .expect("revoke the tablet");
    assert!(out.starts_with("revoked"), "{out}");
    let found = bob.json("GET", "/v1/users/alice@localhost", None).await.expect("lookup");
    assert_eq!(found["devices"].as_array().map(Vec::len), Some(1), "{found}");
    let deadline = Instant::now() + WAIT;
    while members_of(&bob, &general).await.contains(&tablet_id) {
        assert!(Instant::now() < deadline, "the revoked tablet is still a member");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

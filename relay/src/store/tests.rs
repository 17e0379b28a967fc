use chitchat_proto::identity::{DirBody, Profile};
use chitchat_proto::inbox::SealedEnvelope;
use chitchat_proto::wire::{ChannelPost, Envelope, ErrorCode};
use chitchat_proto::{DeviceId, Dir, SecretKey, Timestamp};

use super::write::InboxQuota;
use super::*;

const NOW: Timestamp = Timestamp(1_700_000_000_000);
const QUOTA: InboxQuota = InboxQuota { max_items: 3, max_bytes: 1 << 20 };
const HISTORY: HistoryLimits = HistoryLimits { max_entries: 1000, max_bytes: 1 << 30 };

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn dir(n: u8, seq: u64, linked: &[u8]) -> Dir {
    let k = key(n);
    Dir::sign(
        &k,
        DirBody {
            device: DeviceId(k.public()),
            seq,
            inbox_key: [0; 32],
            linked: linked.iter().map(|l| DeviceId(key(*l).public())).collect(),
            sponsorships: vec![],
            profile: Profile::default(),
            revoked: false,
            issued: NOW,
        },
    )
}

fn dev(n: u8) -> DeviceId {
    DeviceId(key(n).public())
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("relay.redb"), 64).expect("open");
    (dir, store)
}

fn code(r: Result<Written, WriteError>) -> ErrorCode {
    match r {
        Err(WriteError::Rejected { code, .. }) => code,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

async fn token(store: &Store, t: &str, expires: Timestamp) {
    let record = TokenRecord { created: NOW, expires, used_by: None };
    store.write(Write::CreateToken { token: t.into(), record }).await.expect("token");
}

fn register(token: Option<&str>, open: bool, name: &str, d: Dir) -> Write {
    Write::Register {
        token: token.map(Into::into),
        open,
        local_name: name.into(),
        dir: d,
        now: NOW,
    }
}

#[tokio::test]
async fn registration_rules() {
    let (_d, s) = open();
    token(&s, "t1", NOW.plus_ms(1000)).await;
    token(&s, "old", NOW).await;
    assert_eq!(
        code(s.write(register(None, false, "alice", dir(1, 1, &[]))).await),
        ErrorCode::RegistrationClosed
    );
    assert_eq!(
        code(s.write(register(Some("nope"), false, "alice", dir(1, 1, &[]))).await),
        ErrorCode::TokenInvalid
    );
    assert_eq!(
        code(s.write(register(Some("old"), false, "alice", dir(1, 1, &[]))).await),
        ErrorCode::TokenInvalid
    );
    s.write(register(Some("t1"), false, "alice", dir(1, 1, &[2]))).await.expect("registered");
    // A retry is fine; the token is not reusable by another device.
    s.write(register(Some("t1"), false, "alice", dir(1, 1, &[2]))).await.expect("idempotent");
    assert_eq!(
        code(s.write(register(Some("t1"), false, "bob", dir(3, 1, &[]))).await),
        ErrorCode::TokenUsed
    );
    // Open registration: a taken name needs a two-way link.
    assert_eq!(
        code(s.write(register(None, true, "alice", dir(3, 1, &[1]))).await),
        ErrorCode::NameTaken
    );
    s.write(register(None, true, "alice", dir(2, 1, &[1]))).await.expect("alice's second device");
    assert_eq!(s.lookup("alice").expect("lookup").len(), 2);
    assert!(s.lookup("nobody").expect("lookup").is_empty());
    assert_eq!(s.users().expect("users"), vec![("alice".into(), vec![dev(1), dev(2)])]);
}

#[tokio::test]
async fn dir_sequence_is_checked() {
    let (_d, s) = open();
    assert_eq!(code(s.write(Write::PublishDir { dir: dir(1, 2, &[]) }).await), ErrorCode::NotFound);
    s.write(register(None, true, "alice", dir(1, 5, &[]))).await.expect("registered");
    assert_eq!(
        code(s.write(Write::PublishDir { dir: dir(1, 5, &[9]) }).await),
        ErrorCode::StaleSequence
    );
    assert_eq!(
        code(s.write(Write::PublishDir { dir: dir(1, 4, &[]) }).await),
        ErrorCode::StaleSequence
    );
    s.write(Write::PublishDir { dir: dir(1, 6, &[]) }).await.expect("newer");
    assert_eq!(s.device(&dev(1)).expect("read").map(|r| r.dir.body.seq), Some(6));
}

#[tokio::test]
async fn key_packages_are_claimed_once_and_never_served_expired() {
    let (_d, s) = open();
    s.write(register(None, true, "bob", dir(2, 1, &[]))).await.expect("registered");
    let kp = |b: u8| chitchat_proto::codec::Bytes(vec![b; 10]);
    let upload = Write::UploadKeyPackages {
        device: dev(2),
        packages: vec![
            (NOW.plus_ms(10), kp(1)),
            (NOW.plus_ms(1000), kp(2)),
            (NOW.plus_ms(1000), kp(3)),
        ],
        last_resort: Some((NOW.plus_ms(1000), kp(9))),
        max_per_device: 3,
    };
    assert_eq!(s.write(upload.clone()).await, Ok(Written::KeyPackages { available: 3 }));
    assert!(matches!(code(s.write(upload).await), ErrorCode::QuotaExceeded { .. }));
    let claim = |now| Write::ClaimKeyPackage { device: dev(2), now };
    // The first package has expired by then: skipped and deleted.
    let later = NOW.plus_ms(100);
    assert_eq!(s.write(claim(later)).await, Ok(Written::KeyPackage(vec![2; 10])));
    assert_eq!(s.write(claim(later)).await, Ok(Written::KeyPackage(vec![3; 10])));
    // Then the last resort, again and again.
    assert_eq!(s.write(claim(later)).await, Ok(Written::KeyPackage(vec![9; 10])));
    assert_eq!(s.write(claim(later)).await, Ok(Written::KeyPackage(vec![9; 10])));
    assert_eq!(s.counters(&dev(2)).expect("counters").key_packages, 0);
    // Once the last resort expires, nothing is served.
    assert_eq!(code(s.write(claim(NOW.plus_ms(1000))).await), ErrorCode::NotFound);
}

fn envelope(to: u8, fill: u8) -> SealedEnvelope {
    SealedEnvelope { recipient: dev(to), enc: [fill; 32], ciphertext: vec![fill; 100] }
}

#[tokio::test]
async fn inbox_enqueue_fetch_ack_and_quota() {
    let (_d, s) = open();
    s.write(register(None, true, "bob", dir(2, 1, &[]))).await.expect("registered");
    let enqueue = |fill| Write::Enqueue {
        sender: dev(1),
        envelope: envelope(2, fill),
        now: NOW,
        quota: QUOTA,
    };
    assert_eq!(
        code(
            s.write(Write::Enqueue {
                sender: dev(1),
                envelope: envelope(7, 0),
                now: NOW,
                quota: QUOTA
            })
            .await
        ),
        ErrorCode::NotFound
    );
    for i in 0..3 {
        assert_eq!(s.write(enqueue(i)).await, Ok(Written::Enqueued { id: u64::from(i) }));
    }
    assert!(matches!(code(s.write(enqueue(9)).await), ErrorCode::QuotaExceeded { .. }));
    let (items, more) = s.fetch(&dev(2), None, 2, usize::MAX).expect("fetch");
    assert_eq!(items.iter().map(|i| i.id).collect::<Vec<_>>(), vec![0, 1]);
    assert!(more);
    // A byte budget cuts the page short, but always serves at least one item.
    let (items, more) = s.fetch(&dev(2), None, 10, 150).expect("fetch");
    assert_eq!((items.len(), more), (1, true));
    let (items, more) = s.fetch(&dev(2), Some(1), 10, usize::MAX).expect("fetch");
    assert_eq!((items.len(), more), (1, false));
    assert_eq!(items[0].envelope, Envelope::Sealed(envelope(2, 2)));
    // Ack is idempotent and frees quota; ids keep growing.
    assert_eq!(
        s.write(Write::Ack { device: dev(2), ids: vec![0, 1, 77] }).await,
        Ok(Written::Removed(2))
    );
    assert_eq!(s.write(Write::Ack { device: dev(2), ids: vec![0] }).await, Ok(Written::Removed(0)));
    assert_eq!(s.write(enqueue(5)).await, Ok(Written::Enqueued { id: 3 }));
    let c = s.counters(&dev(2)).expect("counters");
    assert_eq!((c.inbox_items, c.next_inbox), (2, 4));
    // Another device cannot ack Bob's items.
    assert_eq!(
        s.write(Write::Ack { device: dev(1), ids: vec![2, 3] }).await,
        Ok(Written::Removed(0))
    );
}

#[tokio::test]
async fn retention_expires_old_items() {
    let (_d, s) = open();
    s.write(register(None, true, "bob", dir(2, 1, &[]))).await.expect("registered");
    let quota = InboxQuota { max_items: 100, max_bytes: 1 << 20 };
    for (i, at) in [(0u8, NOW), (1, NOW.plus_ms(10)), (2, NOW.plus_ms(20))] {
        s.write(Write::Enqueue { sender: dev(1), envelope: envelope(2, i), now: at, quota })
            .await
            .expect("enqueue");
    }
    assert_eq!(
        s.write(Write::Expire { before: NOW.plus_ms(15), max: 100 }).await,
        Ok(Written::Removed(2))
    );
    let (items, _) = s.fetch(&dev(2), None, 10, usize::MAX).expect("fetch");
    assert_eq!(items.iter().map(|i| i.id).collect::<Vec<_>>(), vec![2]);
    assert_eq!(s.counters(&dev(2)).expect("counters").inbox_items, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_share_transactions_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.redb");
    {
        let s = Store::open(&path, 64).expect("open");
        s.write(register(None, true, "bob", dir_of(2))).await.expect("registered");
        let quota = InboxQuota { max_items: 10_000, max_bytes: 1 << 30 };
        let tasks: Vec<_> = (0..200u32)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let envelope = envelope(2, (i % 250) as u8);
                    s.write(Write::Enqueue { sender: dev(1), envelope, now: NOW, quota }).await
                })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            match t.await.expect("task") {
                Ok(Written::Enqueued { id }) => ids.push(id),
                other => panic!("{other:?}"),
            }
        }
        ids.sort_unstable();
        assert_eq!(ids, (0..200).collect::<Vec<_>>(), "every enqueue got a distinct id");
    }
    // Wait for the writer thread to let go of the file, then reopen: everything acknowledged is there.
    let s = loop {
        match Store::open(&path, 64) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    };
    assert_eq!(s.fetch(&dev(2), None, 1000, usize::MAX).expect("fetch").0.len(), 200);
}

fn dir_of(n: u8) -> Dir {
    dir(n, 1, &[])
}

#[test]
fn storage_version_is_checked() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("relay.redb");
    {
        let db = redb::Database::create(&path).expect("create");
        let w = db.begin_write().expect("write");
        w.open_table(META)
            .expect("meta")
            .insert("storage_version", 99u32.to_le_bytes().as_slice())
            .expect("insert");
        w.commit().expect("commit");
    }
    assert!(matches!(Store::open(&path, 8), Err(StoreError::Version { found: 99 })));
}

#[tokio::test]
async fn a_post_goes_to_every_recipient_with_room() {
    let (_d, s) = open();
    s.write(register(None, true, "bob", dir(2, 1, &[]))).await.expect("registered");
    s.write(register(None, true, "carol", dir(3, 1, &[]))).await.expect("registered");
    let post =
        ChannelPost { channel: chitchat_proto::ordering::ChannelId([4; 32]), message: vec![1; 50] };
    let write = |recipients: &[u8]| Write::Fanout {
        onward: None,
        seen: None,
        sender: dev(1),
        envelope: Envelope::Post(post.clone()),
        recipients: recipients.iter().map(|n| dev(*n)).collect(),
        now: NOW,
        quota: QUOTA,
        history: None,
    };
    // Device 7 is not registered here (another relay serves it): left out, not counted as
    // skipped; the others get it.
    assert_eq!(
        s.write(write(&[2, 3, 7])).await,
        Ok(Written::Posted { delivered: vec![dev(2), dev(3)], skipped: 0 })
    );
    let (items, _) = s.fetch(&dev(3), None, 10, usize::MAX).expect("fetch");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].envelope, Envelope::Post(post.clone()));
    // Carol's inbox fills up (3 items); Bob still gets the rest.
    s.write(write(&[3])).await.expect("post");
    s.write(write(&[3])).await.expect("post");
    assert_eq!(
        s.write(write(&[2, 3])).await,
        Ok(Written::Posted { delivered: vec![dev(2)], skipped: 1 })
    );
    let c = s.counters(&dev(2)).expect("counters");
    assert_eq!(c.inbox_items, 2);
    assert!(c.inbox_bytes > 100, "quota counts the stored bytes: {}", c.inbox_bytes);
}

#[test]
fn a_version_1_inbox_is_migrated() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("relay.redb");
    let old = records::StoredItemV1 { stored_at: NOW, sender: dev(1), envelope: envelope(2, 5) };
    let old_bytes = records::encode_record(&old);
    {
        let db = redb::Database::create(&path).expect("create");
        let w = db.begin_write().expect("write");
        w.open_table(META)
            .expect("meta")
            .insert("storage_version", 1u32.to_le_bytes().as_slice())
            .expect("insert");
        w.open_table(INBOX_V1)
            .expect("inbox-0")
            .insert((*dev(2).as_bytes(), 7), old_bytes.as_slice())
            .expect("insert");
        let c = Counters {
            next_inbox: 8,
            inbox_items: 1,
            inbox_bytes: old_bytes.len() as u64,
            ..Counters::default()
        };
        w.open_table(COUNTERS)
            .expect("counters")
            .insert(dev(2).as_bytes(), records::encode_record(&c).as_slice())
            .expect("insert");
        w.commit().expect("commit");
    }
    for _ in 0..2 {
        // Migrated on the first open; the second finds the current version. (The writer thread of the
        // first store lets go of the file a moment after the store is dropped.)
        let s = (0..200)
            .find_map(|_| match Store::open(&path, 8) {
                Err(StoreError::Storage(redb::Error::DatabaseAlreadyOpen)) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    None
                }
                other => Some(other.expect("open")),
            })
            .expect("the first store closes");
        let (items, more) = s.fetch(&dev(2), None, 10, usize::MAX).expect("fetch");
        assert_eq!((items.len(), more), (1, false));
        assert_eq!((items[0].id, &items[0].envelope), (7, &Envelope::Sealed(envelope(2, 5))));
        let c = s.counters(&dev(2)).expect("counters");
        let new_len = records::encode_record(&StoredItem::from(old.clone())).len() as u64;
        assert_eq!((c.inbox_items, c.inbox_bytes, c.next_inbox), (1, new_len, 8));
    }
}

/// Fetch answers are budgeted by the exact encoding of their items, so they always fit a frame:
/// with 1,024 small ordered commits (the old estimate undercounted each by about 110 bytes, so
/// that the answer did not fit and a waiting node retried forever), and with the largest items
/// the relay stores.
#[tokio::test]
async fn fetch_answers_always_fit_a_frame() {
    use chitchat_proto::ordering::{CertSignature, ChannelId, EpochCert, EpochCertBody};
    use chitchat_proto::wire::{
        MAX_FETCH_BYTES, MAX_FETCH_ITEMS, MAX_MLS_MESSAGE_LEN, OrderedCommit, Response,
        encode_frame,
    };
    let (_d, s) = open();
    s.write(register(None, true, "bob", dir(2, 1, &[]))).await.expect("registered");
    let unbounded = InboxQuota { max_items: u64::MAX, max_bytes: u64::MAX };
    let body = EpochCertBody {
        channel: ChannelId([4; 32]),
        epoch: u64::MAX,
        hash: chitchat_proto::ordering::CommitHash([5; 32]),
    };
    let cert = EpochCert { body, signatures: vec![CertSignature::sign(&key(9), &body)] };
    let fanout = |envelope: Envelope| Write::Fanout {
        onward: None,
        seen: None,
        sender: dev(1),
        envelope,
        recipients: [dev(2)].into_iter().collect(),
        now: NOW,
        quota: unbounded,
        // With their history marks, as the relay stores them.
        history: Some(HISTORY),
    };
    // Commits sized so that 1,024 of them just fit the old estimate of the budget.
    let commit = OrderedCommit { channel: body.channel, commit: vec![7; 840], cert };
    for _ in 0..MAX_FETCH_ITEMS {
        s.write(fanout(Envelope::Commit(commit.clone()))).await.expect("stored");
    }
    // Then the largest posts the relay takes.
    let post = ChannelPost { channel: body.channel, message: vec![8; MAX_MLS_MESSAGE_LEN] };
    for _ in 0..3 {
        s.write(fanout(Envelope::Post(post.clone()))).await.expect("stored");
    }
    let mut after = None;
    let mut fetched = 0;
    loop {
        let (items, more) =
            s.fetch(&dev(2), after, MAX_FETCH_ITEMS as usize, MAX_FETCH_BYTES).expect("fetch");
        fetched += items.len();
        after = items.last().map(|i| i.id);
        let frame = encode_frame(&Response::Items { items, more });
        assert!(frame.is_ok(), "an answer that does not fit a frame: {frame:?}");
        if !more {
            break;
        }
    }
    assert_eq!(fetched, MAX_FETCH_ITEMS as usize + 3);
}

#[tokio::test]
async fn a_forwarded_payload_is_stored_once_whatever_is_resent() {
    let (_d, store) = open();
    store.write(register(None, true, "bob", dir(2, 1, &[]))).await.expect("register");
    let origin = [9; 32];
    let forwarded = |seq: u64, fill: u8| Write::Forwarded {
        origin,
        seq,
        sender: dev(1),
        envelope: envelope(2, fill),
        now: NOW,
        quota: QUOTA,
    };
    assert!(matches!(store.write(forwarded(5, 1)).await, Ok(Written::Enqueued { .. })));
    // The same (origin, seq) again, as after a lost answer: stored once.
    assert_eq!(store.write(forwarded(5, 1)).await, Ok(Written::Done));
    // The same seq from another relay is another payload.
    let other = Write::Forwarded {
        origin: [8; 32],
        seq: 5,
        sender: dev(1),
        envelope: envelope(2, 2),
        now: NOW,
        quota: QUOTA,
    };
    assert!(matches!(store.write(other).await, Ok(Written::Enqueued { .. })));
    let (items, _) = store.fetch(&dev(2), None, 10, usize::MAX).expect("fetch");
    assert_eq!(items.len(), 2);
    // A refused one (unknown recipient, full inbox) is not remembered: it may come again.
    let unknown = Write::Forwarded {
        origin,
        seq: 6,
        sender: dev(1),
        envelope: envelope(3, 1),
        now: NOW,
        quota: QUOTA,
    };
    assert_eq!(code(store.write(unknown).await), ErrorCode::NotFound);
    assert!(matches!(store.write(forwarded(7, 3)).await, Ok(Written::Enqueued { .. })));
    assert!(matches!(code(store.write(forwarded(8, 4)).await), ErrorCode::QuotaExceeded { .. }));
    store.write(Write::Ack { device: dev(2), ids: vec![items[0].id] }).await.expect("ack");
    assert!(matches!(store.write(forwarded(8, 4)).await, Ok(Written::Enqueued { .. })));
    // Forgotten after the retention (plus a day); the queue's memory expires with it.
    let later = Timestamp(NOW.0 + 2 * 24 * 3600 * 1000 + 1);
    let (items, _) = store.fetch(&dev(2), None, 10, usize::MAX).expect("fetch");
    let ids = items.iter().map(|i| i.id).collect();
    store.write(Write::Ack { device: dev(2), ids }).await.expect("ack");
    assert_eq!(store.write(forwarded(5, 1)).await, Ok(Written::Done), "remembered till then");
    store.write(Write::ExpireFederation { before: later, max: 100 }).await.expect("expire");
    assert!(matches!(store.write(forwarded(5, 1)).await, Ok(Written::Enqueued { .. })));
}

#[tokio::test]
async fn queues_for_other_relays_are_bounded_ordered_and_expire() {
    let (_d, store) = open();
    let limits = QueueLimits { max_items: 5, max_bytes: 1 << 20, max_total_items: 8 };
    let queue = |host: &str, n: u8, now: Timestamp| Write::Queue {
        host: host.into(),
        sender: dev(1),
        envelopes: (0..n).map(|i| Envelope::Sealed(envelope(2, i))).collect(),
        now,
        limits,
    };
    let Ok(Written::Enqueued { id: first }) = store.write(queue("b.example", 3, NOW)).await else {
        panic!("not queued")
    };
    // All or nothing: 3 more would pass 5 for this relay.
    assert!(matches!(
        code(store.write(queue("b.example", 3, NOW)).await),
        ErrorCode::QuotaExceeded { .. }
    ));
    store.write(queue("b.example", 2, Timestamp(NOW.0 + 10))).await.expect("queued");
    // 8 in all, whatever the relay.
    store.write(queue("c.example", 3, NOW)).await.expect("queued");
    assert!(matches!(
        code(store.write(queue("d.example", 1, NOW)).await),
        ErrorCode::QuotaExceeded { .. }
    ));
    assert_eq!(store.queued_total().expect("total"), 8);
    let mut hosts = store.queued_hosts().expect("hosts");
    hosts.sort();
    assert_eq!(hosts, vec!["b.example".to_owned(), "c.example".to_owned()]);
    // Oldest first, numbered in order, bounded by count.
    let batch = store.queued("b.example", 4, usize::MAX).expect("queued");
    let seqs: Vec<u64> = batch.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (first..first + 4).collect::<Vec<_>>());
    assert_eq!(batch[1].1.envelope, Envelope::Sealed(envelope(2, 1)));
    // Delivered ones leave; removing twice changes nothing.
    let unqueue = Write::Unqueue { host: "b.example".into(), seqs: seqs[..2].to_vec() };
    assert_eq!(store.write(unqueue.clone()).await, Ok(Written::Removed(2)));
    assert_eq!(store.write(unqueue).await, Ok(Written::Removed(0)));
    assert_eq!(store.queued_total().expect("total"), 6);
    // Room again: the counters followed.
    store.write(queue("d.example", 2, NOW)).await.expect("queued");
    // Expiry drops what was queued before the horizon, and only that.
    let expired =
        store.write(Write::ExpireFederation { before: Timestamp(NOW.0 + 5), max: 100 }).await;
    assert_eq!(expired, Ok(Written::Removed(6)));
    let left = store.queued("b.example", 10, usize::MAX).expect("queued");
    assert_eq!(left.len(), 2, "the two queued later stay");
    assert_eq!(store.queued_total().expect("total"), 2);
    assert_eq!(store.queued_hosts().expect("hosts"), vec!["b.example".to_owned()]);
}

/// The fan-out of a log entry with several winners (a batch) writes every one of them, then
/// moves the watermark once; the same entry again writes nothing.
#[tokio::test]
async fn an_entry_with_several_winners_is_fanned_out_whole_and_once() {
    use chitchat_proto::ordering::{CertSignature, ChannelId, EpochCert, EpochCertBody};
    use chitchat_proto::wire::OrderedCommit;
    let (_d, s) = open();
    s.write(register(None, true, "bob", dir(2, 1, &[]))).await.expect("registered");
    let unbounded = InboxQuota { max_items: u64::MAX, max_bytes: u64::MAX };
    let winner = |channel: u8| {
        let body = EpochCertBody {
            channel: ChannelId([channel; 32]),
            epoch: 0,
            hash: chitchat_proto::ordering::CommitHash([channel; 32]),
        };
        let cert = EpochCert { body, signatures: vec![CertSignature::sign(&key(9), &body)] };
        let commit = OrderedCommit { channel: body.channel, commit: vec![channel; 64], cert };
        Fanned {
            commit: Box::new(Write::Fanout {
                onward: None,
                seen: None,
                sender: dev(1),
                envelope: Envelope::Commit(commit),
                recipients: [dev(2)].into_iter().collect(),
                now: NOW,
                quota: unbounded,
                history: None,
            }),
            welcomes: vec![],
            onward: None,
        }
    };
    let entry = |index: u64| Write::Ordered {
        key: "fanned-test".into(),
        index,
        fanned: vec![winner(1), winner(2), winner(3)],
    };
    let written = s.write(entry(7)).await.expect("fanned out");
    assert!(matches!(written, Written::Posted { ref delivered, .. } if delivered.len() == 3));
    assert_eq!(s.fanned_out("fanned-test").expect("watermark"), Some(7));
    assert_eq!(s.write(entry(7)).await, Ok(Written::AlreadyFannedOut));
    let (items, _) = s.fetch(&dev(2), None, 100, 1 << 20).expect("fetch");
    assert_eq!(items.len(), 3, "every winner of the entry, once");
}

/// A post fanned out to `recipients` of channel 4, kept in its history within `limits`.
fn posted(n: u8, recipients: &[u8], limits: HistoryLimits, now: Timestamp) -> Write {
    let channel = chitchat_proto::ordering::ChannelId([4; 32]);
    Write::Fanout {
        onward: None,
        seen: None,
        sender: dev(1),
        envelope: Envelope::Post(ChannelPost { channel, message: vec![n; 20] }),
        recipients: recipients.iter().map(|n| dev(*n)).collect(),
        now,
        quota: QUOTA,
        history: Some(limits),
    }
}

fn marks(s: &Store, device: u8) -> Vec<Option<chitchat_proto::wire::HistoryMark>> {
    let (items, _) = s.fetch(&dev(device), None, 100, usize::MAX).expect("fetch");
    items.into_iter().map(|i| i.history).collect()
}

/// Every post joins its channel's history, in order. An inbox that is full misses posts; the
/// next post it gets says from which position it missed them, once; the history serves them.
#[tokio::test]
async fn the_history_keeps_what_a_full_inbox_missed_and_the_next_item_says_so() {
    use chitchat_proto::wire::HistoryMark;
    let (_d, s) = open();
    s.write(register(None, true, "bob", dir(2, 1, &[]))).await.expect("registered");
    for n in 0..5 {
        s.write(posted(n, &[2], HISTORY, NOW)).await.expect("posted");
    }
    // Bob's inbox holds 3: positions 3 and 4 are missed, and a notice past the quota says
    // so at the first.
    let mark = |seq, missed_from| Some(HistoryMark { seq, missed_from });
    assert_eq!(marks(&s, 2), [mark(0, None), mark(1, None), mark(2, None), None]);
    let (items, _) = s.fetch(&dev(2), None, 100, usize::MAX).expect("fetch");
    let channel = chitchat_proto::ordering::ChannelId([4; 32]);
    assert_eq!(items[3].envelope, Envelope::Missed { channel, from: 3 }, "one notice per gap");
    let ids = items.iter().map(|i| i.id).collect();
    s.write(Write::Ack { device: dev(2), ids }).await.expect("acked");
    s.write(posted(5, &[2], HISTORY, NOW)).await.expect("posted");
    s.write(posted(6, &[2], HISTORY, NOW)).await.expect("posted");
    assert_eq!(marks(&s, 2), [mark(5, Some(3)), mark(6, None)], "the gap is closed");
    let channel = [4; 32];
    let (head, entries) = s.history(&channel, 3, 100, usize::MAX).expect("history");
    assert_eq!((head.first, head.next), (0, 7));
    let seqs: Vec<u64> = entries.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, [3, 4, 5, 6]);
    let third: Envelope = chitchat_proto::codec::decode(&entries[0].1, 1 << 20).expect("envelope");
    assert!(matches!(third, Envelope::Post(p) if p.message == vec![3; 20]));
    // The byte budget stops a run early, never before its first entry.
    let (_, one) = s.history(&channel, 3, 100, 1).expect("history");
    assert_eq!(one.len(), 1);
    // Another channel's history is its own.
    let (head, none) = s.history(&[5; 32], 0, 100, usize::MAX).expect("history");
    assert!(none.is_empty() && head.next == 0);
}

/// A channel's history keeps its last entries within its bounds, and entries past the
/// retention go; inbox items that expire unread count as missed.
#[tokio::test]
async fn the_history_is_bounded_and_expires() {
    use chitchat_proto::wire::HistoryMark;
    let (_d, s) = open();
    s.write(register(None, true, "bob", dir(2, 1, &[]))).await.expect("registered");
    let small = HistoryLimits { max_entries: 4, max_bytes: 1 << 30 };
    for n in 0..6 {
        s.write(posted(n, &[], small, Timestamp(NOW.0 + u64::from(n)))).await.expect("posted");
    }
    let channel = [4; 32];
    let (head, entries) = s.history(&channel, 0, 100, usize::MAX).expect("history");
    assert_eq!((head.first, head.next), (2, 6), "the oldest two went");
    assert_eq!(entries.first().map(|(seq, _)| *seq), Some(2));
    let removed = s
        .write(Write::ExpireHistory { before: Timestamp(NOW.0 + 4), max: 100 })
        .await
        .expect("expired");
    assert_eq!(removed, Written::Removed(2));
    let (head, entries) = s.history(&channel, 0, 100, usize::MAX).expect("history");
    assert_eq!((head.first, entries.len()), (4, 2));
    // Bob's two items expire unread: his next one says he missed them.
    s.write(posted(6, &[2], HISTORY, NOW)).await.expect("posted");
    s.write(posted(7, &[2], HISTORY, NOW)).await.expect("posted");
    s.write(Write::Expire { before: Timestamp(NOW.0 + 1), max: 100 }).await.expect("expired");
    s.write(posted(8, &[2], HISTORY, Timestamp(NOW.0 + 10))).await.expect("posted");
    assert_eq!(marks(&s, 2), [Some(HistoryMark { seq: 8, missed_from: Some(6) })]);
}

/// Inbox records of storage version 3 (no history mark) are read as they are.
#[test]
fn version_3_inbox_records_still_read() {
    let channel = chitchat_proto::ordering::ChannelId([4; 32]);
    let v3 = super::records::StoredItemV3 {
        stored_at: NOW,
        sender: dev(1),
        envelope: Envelope::Post(ChannelPost { channel, message: vec![1] }),
    };
    let item = StoredItem::decode(&chitchat_proto::codec::encode(&v3)).expect("decodes");
    assert_eq!((item.envelope, item.history), (v3.envelope, None));
}

fn pin(user: &str, len: u64, expires: Timestamp) -> FilePin {
    FilePin { user: user.into(), device: [1; 32], channel: [2; 32], len, pinned: NOW, expires }
}

/// A user's pins stay within the quota (another user's do not count); a blob pinned already
/// keeps its first pin until it expires; pins go when their expiry passes (the time is the caller's: a test
/// clock), the others stay.
#[tokio::test]
async fn file_pins_keep_to_the_quota_and_expire() {
    let (_dir, store) = open();
    let later = Timestamp(NOW.0 + 1_000);
    let pin_file = |hash: u8, p: FilePin| Write::PinFile { hash: [hash; 32], pin: p, quota: 100 };
    let w = store.write(pin_file(1, pin("alice", 60, later))).await.expect("pin");
    assert_eq!(w, Written::Pinned(pin("alice", 60, later)));
    let over = store.write(pin_file(2, pin("alice", 41, later))).await;
    assert!(matches!(code(over), ErrorCode::QuotaExceeded { .. }), "60 + 41 > 100");
    store.write(pin_file(3, pin("bob", 90, NOW))).await.expect("another user's quota");
    store.write(pin_file(4, pin("alice", 40, later))).await.expect("60 + 40 fits");
    let again = store.write(pin_file(1, pin("alice", 60, Timestamp(NOW.0 + 9_999)))).await;
    assert_eq!(again.expect("repeat"), Written::Pinned(pin("alice", 60, later)), "first pin");
    // An expired pin not swept yet is replaced when the file is pinned again (asked for
    // again); its own length is not counted twice against the quota.
    store.write(pin_file(5, pin("carol", 90, NOW))).await.expect("carol's");
    let renewed = store.write(pin_file(5, pin("carol", 90, later))).await.expect("pinned again");
    assert_eq!(renewed, Written::Pinned(pin("carol", 90, later)), "the expired pin is replaced");

    let gone = store.write(Write::ExpireFiles { now: NOW, max: 10 }).await.expect("expire");
    assert_eq!(gone, Written::Unpinned(vec![[3; 32]]), "only bob's had expired");
    let gone = store.write(Write::ExpireFiles { now: NOW, max: 10 }).await.expect("expire");
    assert_eq!(gone, Written::Unpinned(vec![]));
    let gone = store.write(Write::ExpireFiles { now: later, max: 1 }).await.expect("expire");
    assert_eq!(gone, Written::Unpinned(vec![[1; 32]]), "at most max at a time");
    store.write(pin_file(2, pin("alice", 41, later))).await.expect("room again");
    // The users' totals follow every pin, replacement and expiry.
    let used = |u: &str| store.files_used(u).expect("used");
    assert_eq!((used("alice"), used("bob"), used("carol")), (81, 0, 90));
    let gone = store.write(Write::ExpireFiles { now: later, max: 10 }).await.expect("expire");
    assert_eq!(gone, Written::Unpinned(vec![[2; 32], [4; 32], [5; 32]]), "by expiry, then hash");
    assert_eq!((used("alice"), used("carol")), (0, 0));
    assert_eq!(store.file_pin(&[5; 32]).expect("read"), None);
}

/// A database of storage version 4 (pins, no indexes) is indexed on open: each user's total,
/// and the pins by expiry, as if they had been written by this version.
#[tokio::test]
async fn version_4_file_pins_are_indexed_on_open() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("relay.redb");
    let later = Timestamp(NOW.0 + 1_000);
    {
        let db = redb::Database::create(&path).expect("create");
        let w = db.begin_write().expect("write");
        w.open_table(META)
            .expect("meta")
            .insert("storage_version", 4u32.to_le_bytes().as_slice())
            .expect("insert");
        {
            let mut files = w.open_table(FILES).expect("files-0");
            for (hash, p) in [
                (1u8, pin("alice", 30, NOW)),
                (2, pin("alice", 50, later)),
                (3, pin("bob", 7, later)),
            ] {
                files.insert([hash; 32], records::encode_record(&p).as_slice()).expect("insert");
            }
        }
        w.commit().expect("commit");
    }
    let store = Store::open(&path, 8).expect("open");
    let used = |u: &str| store.files_used(u).expect("used");
    assert_eq!((used("alice"), used("bob")), (80, 7));
    let over = store
        .write(Write::PinFile { hash: [4; 32], pin: pin("alice", 21, later), quota: 100 })
        .await;
    assert!(matches!(code(over), ErrorCode::QuotaExceeded { .. }), "80 + 21 > 100");
    let gone = store.write(Write::ExpireFiles { now: NOW, max: 10 }).await.expect("expire");
    assert_eq!(gone, Written::Unpinned(vec![[1; 32]]));
    assert_eq!(used("alice"), 50);
}

fn hello(n: u8, secret: &chitchat_proto::link::LinkSecret) -> chitchat_proto::link::LinkHello {
    chitchat_proto::link::LinkHello::new(secret, dir(n, 1, &[]))
}

#[tokio::test]
async fn link_slots_take_one_hello_answered_by_their_offerer_and_close() {
    use chitchat_proto::link::{LinkAnswer, LinkSecret};
    use rand::SeedableRng;
    let (_d, s) = open();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (secret, other) = (LinkSecret::generate(&mut rng), LinkSecret::generate(&mut rng));
    let slot = secret.slot();
    let expires = NOW.plus_ms(60_000);
    let offer =
        |offerer: u8, slot, expires| Write::OfferLink { offerer: dev(offerer), slot, expires };
    // Only a registered device offers.
    assert_eq!(code(s.write(offer(1, slot, expires)).await), ErrorCode::NotFound);
    s.write(register(None, true, "alice", dir(1, 1, &[]))).await.expect("registered");
    s.write(register(None, true, "mallory", dir(5, 1, &[]))).await.expect("registered");
    s.write(offer(1, slot, expires)).await.expect("offered");
    s.write(offer(1, slot, expires)).await.expect("a retry");
    assert_eq!(code(s.write(offer(5, slot, expires)).await), ErrorCode::Forbidden, "taken");

    let join = |joiner: u8, slot, h: &chitchat_proto::link::LinkHello, now| Write::JoinLink {
        joiner: dev(joiner),
        slot,
        hello: h.clone(),
        now,
    };
    let h2 = hello(2, &secret);
    // Unknown and expired slots, a hello under another device's record, a registered joiner.
    assert_eq!(code(s.write(join(2, other.slot(), &h2, NOW)).await), ErrorCode::TokenInvalid);
    assert_eq!(code(s.write(join(2, slot, &h2, expires)).await), ErrorCode::TokenInvalid);
    assert_eq!(code(s.write(join(3, slot, &h2, NOW)).await), ErrorCode::Forbidden);
    assert_eq!(code(s.write(join(5, slot, &hello(5, &secret), NOW)).await), ErrorCode::Forbidden);
    // An answer before any hello is refused.
    let answer = LinkAnswer::new(&secret, dev(2), dir(1, 2, &[2]));
    let answer_write = |offerer: u8, a: &LinkAnswer| Write::AnswerLink {
        offerer: dev(offerer),
        slot,
        answer: a.clone(),
        now: NOW,
    };
    assert_eq!(code(s.write(answer_write(1, &answer)).await), ErrorCode::BadRequest);

    s.write(join(2, slot, &h2, NOW)).await.expect("joined");
    s.write(join(2, slot, &h2, NOW)).await.expect("the same hello again: a retry");
    // The same device with a newer hello (it restarted): kept in place of the first.
    let h2b = chitchat_proto::link::LinkHello::new(&secret, dir(2, 2, &[]));
    s.write(join(2, slot, &h2b, NOW)).await.expect("the joiner again");
    assert_eq!(s.link_slot(&slot).expect("read").and_then(|r| r.hello), Some(h2b));
    s.write(join(2, slot, &h2, NOW)).await.expect("and back");
    // The code is spent: another device's hello, even with the right secret, is refused.
    assert_eq!(code(s.write(join(3, slot, &hello(3, &secret), NOW)).await), ErrorCode::TokenUsed);
    assert_eq!(s.link_slot(&slot).expect("read").and_then(|r| r.hello), Some(h2.clone()));

    // Only the offerer answers, once.
    assert_eq!(code(s.write(answer_write(5, &answer)).await), ErrorCode::Forbidden);
    s.write(answer_write(1, &answer)).await.expect("answered");
    s.write(answer_write(1, &answer)).await.expect("a retry");
    let other_answer = LinkAnswer::new(&secret, dev(2), dir(1, 3, &[2]));
    assert_eq!(code(s.write(answer_write(1, &other_answer)).await), ErrorCode::Forbidden);

    // A new offer closes the device's previous slot.
    s.write(offer(1, other.slot(), expires)).await.expect("a second offer");
    assert_eq!(s.link_slot(&slot).expect("read"), None);
    assert!(s.link_slot(&other.slot()).expect("read").is_some());
    // Closed slots go with the clean-up, and only those.
    s.write(offer(5, slot, NOW.plus_ms(10))).await.expect("mallory offers");
    assert_eq!(s.write(Write::ExpireLinks { now: NOW.plus_ms(10) }).await, Ok(Written::Removed(1)));
    assert_eq!(s.link_slot(&slot).expect("read"), None);
    assert!(s.link_slot(&other.slot()).expect("read").is_some());
    assert_eq!(s.write(Write::ExpireLinks { now: expires }).await, Ok(Written::Removed(1)));
    assert_eq!(s.link_slot(&other.slot()).expect("read"), None);
}

#[tokio::test]
async fn a_linked_device_registers_without_an_invite_and_the_list_shows_names_and_sightings() {
    let (_d, s) = open();
    token(&s, "t1", NOW.plus_ms(1000)).await;
    s.write(register(Some("t1"), false, "alice", dir(1, 1, &[2]))).await.expect("alice");
    // Closed registration: a device alice's record lists, and that lists alice's, needs no
    // token; one that only claims the link does not get in, with or without one.
    assert_eq!(
        code(s.write(register(None, false, "alice", dir(3, 1, &[1]))).await),
        ErrorCode::NameTaken
    );
    s.write(register(None, false, "alice", dir(2, 1, &[1]))).await.expect("linked device");
    assert_eq!(
        code(s.write(register(None, false, "bob", dir(4, 1, &[]))).await),
        ErrorCode::RegistrationClosed,
        "a new user still needs an invite"
    );

    s.write(Write::NameDevice { device: dev(2), name: "phone".into() }).await.expect("named");
    assert_eq!(
        code(s.write(Write::NameDevice { device: dev(4), name: "x".into() }).await),
        ErrorCode::NotFound
    );
    let seen = vec![(dev(1), NOW.plus_ms(5)), (dev(4), NOW)];
    s.write(Write::Seen(seen)).await.expect("seen");
    // An older sighting does not move it back.
    s.write(Write::Seen(vec![(dev(1), NOW)])).await.expect("seen");
    let list = s.own_devices(&dev(2)).expect("list");
    let summary: Vec<_> =
        list.iter().map(|(r, i)| (r.dir.device(), i.name.as_str(), i.last_seen)).collect();
    assert_eq!(
        summary,
        vec![(dev(1), "", Some(NOW.plus_ms(5))), (dev(2), "phone", None)],
        "both of alice's devices, and nobody else's"
    );
    assert!(s.own_devices(&dev(4)).expect("list").is_empty());
}

#[tokio::test]
async fn revocations_need_a_quorum_of_settled_devices_and_take_the_device_out_for_good() {
    use chitchat_proto::identity::{Address, Revocation};
    let (_d, s) = open();
    let alice = Address::parse("alice@relay.example").expect("address");
    let signed = |target: u8, by: &[u8]| {
        let mut r = Revocation::new(dev(target), alice.clone());
        for b in by {
            r.sign(&key(*b));
        }
        r
    };
    let revoke = |by: u8, r: Revocation, recovered: bool, now: Timestamp| Write::Revoke {
        by: dev(by),
        revocation: r,
        recovered,
        now,
    };
    let standing = |revoked, signed, needed| Ok(Written::Revoking { revoked, signed, needed });
    token(&s, "t1", NOW.plus_ms(1000)).await;
    s.write(register(Some("t1"), false, "alice", dir(1, 1, &[2, 3]))).await.expect("alice");
    // The first device sets the recovery key while it is alone; no one replaces it.
    let recovery = key(50).public();
    s.write(Write::SetRecovery { device: dev(1), key: recovery }).await.expect("set");
    s.write(Write::SetRecovery { device: dev(1), key: recovery }).await.expect("a retry");
    assert_eq!(
        code(s.write(Write::SetRecovery { device: dev(1), key: key(51).public() }).await),
        ErrorCode::Forbidden
    );
    s.write(register(None, false, "alice", dir(2, 1, &[1, 3]))).await.expect("phone");
    s.write(register(None, false, "alice", dir(3, 1, &[1, 2]))).await.expect("tablet");
    assert_eq!(s.recovery_key("alice").expect("read"), Some(recovery));
    token(&s, "t2", NOW.plus_ms(1000)).await;
    s.write(register(Some("t2"), false, "bob", dir(4, 1, &[]))).await.expect("bob");
    // Bob, alone, sets his own.
    s.write(Write::SetRecovery { device: dev(4), key: key(52).public() }).await.expect("bob's");

    // Within the first week no device has a vote: one device alone revokes nothing.
    assert_eq!(
        s.write(revoke(2, signed(3, &[2]), false, NOW.plus_ms(1))).await,
        standing(false, 0, 1)
    );
    // A week on, all three are settled. The phone (stolen) tries to revoke the laptop and the
    // tablet on its own: its signature is one of the two needed.
    let later = NOW.plus_ms(chitchat_proto::identity::revocation::SETTLED_MS + 1);
    assert_eq!(s.write(revoke(2, signed(1, &[2]), false, later)).await, standing(false, 1, 2));
    assert_eq!(s.write(revoke(2, signed(3, &[2]), false, later)).await, standing(false, 1, 2));
    assert_eq!(s.lookup("alice").expect("lookup").len(), 3, "nobody revoked");
    // Not for another user's device, nor without the asker's own signature.
    assert_eq!(code(s.write(revoke(4, signed(1, &[4]), false, later)).await), ErrorCode::Forbidden);
    assert_eq!(
        code(s.write(revoke(1, signed(2, &[3]), false, later)).await),
        ErrorCode::BadRequest
    );
    // The laptop and the tablet revoke the phone, one after the other.
    assert_eq!(s.write(revoke(1, signed(2, &[1]), false, later)).await, standing(false, 1, 2));
    assert_eq!(s.write(revoke(3, signed(2, &[3]), false, later)).await, standing(true, 2, 2));
    assert_eq!(s.write(revoke(3, signed(2, &[3]), false, later)).await, standing(true, 0, 0));
    // The phone is out: not in lookups, not registered, its record gone, and it cannot come
    // back through the link its record still names.
    let devices: Vec<DeviceId> =
        s.lookup("alice").expect("lookup").iter().map(Dir::device).collect();
    assert_eq!(devices, vec![dev(1), dev(3)]);
    assert!(!s.is_registered(&dev(2)).expect("read"));
    assert_eq!(
        code(s.write(register(None, false, "alice", dir(2, 2, &[1, 3]))).await),
        ErrorCode::Revoked
    );
    let listed = s.revoked_of("alice", 16).expect("revoked");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].revocation.body.target, dev(2));
    assert_eq!(listed[0].revocation.verify(None).map(|(d, _)| d.len()), Ok(2));
    assert!(s.revoked(&dev(2)).expect("read").is_some());
    // Nothing can be sent to it any more.
    assert_eq!(
        code(
            s.write(Write::Enqueue {
                sender: dev(1),
                envelope: envelope(2, 0),
                now: later,
                quota: QUOTA
            })
            .await
        ),
        ErrorCode::NotFound
    );
    // The phone's signature against the laptop counted for nothing once it was revoked: the
    // tablet adding its own makes one of two.
    assert_eq!(s.write(revoke(3, signed(1, &[3]), false, later)).await, standing(false, 1, 2));
    // Signatures of more than a day ago no longer count.
    let next_day = later.plus_ms(25 * 3600 * 1000);
    assert_eq!(s.write(revoke(1, signed(3, &[1]), false, next_day)).await, standing(false, 1, 2));
    // One device with the recovery code is enough.
    assert_eq!(s.write(revoke(1, signed(3, &[1]), true, next_day)).await, standing(true, 1, 2));
    let devices: Vec<DeviceId> =
        s.lookup("alice").expect("lookup").iter().map(Dir::device).collect();
    assert_eq!(devices, vec![dev(1)]);
    assert_eq!(s.revoked_of("alice", 16).expect("revoked").len(), 2);
    assert_eq!(s.revoked_of("alice", 1).expect("revoked")[0].revocation.body.target, dev(3));
}

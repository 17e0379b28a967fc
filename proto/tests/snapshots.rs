//! Frozen wire formats. A change to any of these encodings breaks compatibility with deployed
//! nodes and relays: if a snapshot changes, bump the protocol version or the type's label and
//! say so in the changelog, then accept the new snapshot (`INSTA_UPDATE=always cargo test`).

use chitchat_proto::channel::{AdminPolicy, ChannelConfig, ChannelMessage, MessageId};
use chitchat_proto::chat::{ChatContent, FileRef};
use chitchat_proto::codec::{Bytes, Canonical, encode};
use chitchat_proto::hlc::Hlc;
use chitchat_proto::identity::{Address, DirBody, Profile, Revocation, SponsorshipBody};
use chitchat_proto::inbox::{self, InboxSecret};
use chitchat_proto::ordering::{
    CertSignature, ChannelId, CommitHash, CommitRef, EpochCert, EpochCertBody, Equivocation,
    OrderingCommand,
};
use chitchat_proto::pack::Pack;
use chitchat_proto::wire::{
    self, AuthProof, CommitSubmission, ErrorCode, InboxItem, Request, Response,
};
use chitchat_proto::{DeviceId, Dir, RelayId, SecretKey, Sponsorship, Timestamp};
use rand_core::SeedableRng;

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}
fn dev(n: u8) -> DeviceId {
    DeviceId(key(n).public())
}
fn relay() -> RelayId {
    RelayId { host: "relay.example".into(), key: key(200).public() }
}

/// Hex in lines of 32 bytes, so diffs show where an encoding changed.
fn hex(bytes: &[u8]) -> String {
    bytes.chunks(32).map(hex::encode).collect::<Vec<_>>().join("\n")
}

fn sponsorship() -> Sponsorship {
    Sponsorship::issue(
        &key(200),
        SponsorshipBody {
            device: dev(1),
            local_name: "alice".into(),
            relay: relay(),
            issued: T0,
            expires: T0.plus_ms(1000),
        },
    )
}

fn dir() -> Dir {
    Dir::sign(
        &key(1),
        DirBody {
            device: dev(1),
            seq: 7,
            inbox_key: InboxSecret::from_seed(&[9; 32]).public(),
            linked: [dev(2)].into(),
            sponsorships: vec![sponsorship()],
            profile: Profile { display_name: "Alice".into(), avatar: Some([3; 32]) },
            revoked: false,
            issued: T0,
        },
    )
}

fn cert() -> EpochCert {
    let body = EpochCertBody { channel: ChannelId([5; 32]), epoch: 3, hash: CommitHash([6; 32]) };
    EpochCert { body, signatures: vec![CertSignature::sign(&key(200), &body)] }
}

fn envelope() -> inbox::SealedEnvelope {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let bob = InboxSecret::from_seed(&[9; 32]);
    inbox::seal(&mut rng, dev(2), &bob.public(), b"hello bob").expect("seal")
}

fn revocation() -> Revocation {
    let mut revocation =
        Revocation::new(dev(2), Address::parse("alice@relay.example").expect("address"));
    revocation.sign(&key(1));
    revocation.sign(&key(3));
    revocation
}

#[test]
fn identity_records() {
    insta::assert_snapshot!("sponsorship", hex(&sponsorship().to_bytes()));
    insta::assert_snapshot!("dir", hex(&dir().to_bytes()));
    insta::assert_snapshot!("revocation", hex(&revocation().to_bytes()));
    let proof = AuthProof { relay_host: "relay.example".into(), device: dev(1), nonce: [4; 32] };
    insta::assert_snapshot!("auth_proof", hex(&encode(&proof)));
}

#[test]
fn ordering() {
    insta::assert_snapshot!("epoch_cert", hex(&cert().to_bytes()));
    let a = cert().body;
    let b = EpochCertBody { hash: CommitHash([7; 32]), ..a };
    let eq = Equivocation::from_pair(
        (a, CertSignature::sign(&key(200), &a)),
        (b, CertSignature::sign(&key(200), &b)),
    )
    .expect("proof");
    insta::assert_snapshot!("equivocation", hex(&eq.to_bytes()));
    let submit = OrderingCommand::Submit(CommitRef {
        channel: ChannelId([5; 32]),
        epoch: 3,
        hash: CommitHash([6; 32]),
        submitter: dev(1),
    });
    insta::assert_snapshot!("ordering_submit", hex(&submit.to_bytes()));
}

/// A gossiped envelope, and the topic of a channel.
#[test]
fn gossip() {
    use chitchat_proto::gossip::{GossipEnvelope, topic};
    let e = GossipEnvelope::seal(&key(1), ChannelId([5; 32]), 3, b"ciphertext".to_vec(), T0);
    insta::assert_snapshot!("gossip_envelope", hex(&e.to_bytes()));
    insta::assert_snapshot!("gossip_topic", topic(&ChannelId([5; 32])));
}

#[test]
fn inbox_envelope() {
    insta::assert_snapshot!("sealed_envelope", hex(&envelope().to_bytes()));
}

/// Files pinned at a relay: the request, the two answers, and the endpoint's addresses.
#[test]
fn files_at_a_relay() {
    let request = Request::PinFile { channel: ChannelId([5; 32]), hash: [6; 32], len: 1_000_016 };
    insta::assert_snapshot!("request_pin_file", hex(&wire::encode_frame(&request).expect("frame")));
    let request = Request::BlobEndpoint;
    insta::assert_snapshot!(
        "request_blob_endpoint",
        hex(&wire::encode_frame(&request).expect("f"))
    );
    let addrs = vec!["127.0.0.1:4433".parse::<std::net::SocketAddr>().expect("addr").into()];
    for (name, response) in [
        ("response_file_pinned", Response::FilePinned { expires_ms: 1_800_000_000_000 }),
        ("response_file_wanted", Response::FileWanted { addrs: addrs.clone() }),
        ("response_blob_endpoint", Response::BlobEndpoint { addrs }),
    ] {
        let frame = wire::encode_frame(&response).expect("frame");
        insta::assert_snapshot!(name, hex(&frame));
        assert_eq!(wire::decode_frame::<Response>(&frame).expect("decode"), response);
    }
    let many = Response::FileWanted {
        addrs: vec![
            wire::IpPort::from("127.0.0.1:1".parse::<std::net::SocketAddr>().expect("addr"));
            17
        ],
    };
    let frame = wire::encode_frame(&many).expect("frame");
    assert!(wire::decode_frame::<Response>(&frame).is_err(), "at most 16 addresses");
}

/// Blobs in parts over the relay link (relay-only devices): the requests and answers, and the
/// limits a decoder enforces.
#[test]
fn blob_parts_over_the_link() {
    use chitchat_proto::codec::Bytes;
    let ask = Request::BlobPart { hash: [6; 32], first: 512, chunks: 512 };
    let push = Request::PushPart {
        hash: [6; 32],
        len: 1_000_016,
        first: 0,
        chunks: 16,
        part: Bytes(vec![7; 40]),
    };
    for (name, request) in [("request_blob_part", ask), ("request_push_part", push)] {
        let frame = wire::encode_frame(&request).expect("frame");
        insta::assert_snapshot!(name, hex(&frame));
        assert_eq!(wire::decode_frame::<Request>(&frame).expect("decode"), request);
    }
    for (name, response) in [
        ("response_blob_part", Response::BlobPart { part: Bytes(vec![1, 2, 3]) }),
        ("response_part_taken", Response::PartTaken),
    ] {
        let frame = wire::encode_frame(&response).expect("frame");
        insta::assert_snapshot!(name, hex(&frame));
        assert_eq!(wire::decode_frame::<Response>(&frame).expect("decode"), response);
    }
    let refused = [
        Request::BlobPart { hash: [6; 32], first: 8, chunks: 16 },
        Request::BlobPart { hash: [6; 32], first: 0, chunks: 0 },
        Request::BlobPart { hash: [6; 32], first: 0, chunks: wire::MAX_PART_CHUNKS + 1 },
        Request::PushPart {
            hash: [6; 32],
            len: 1,
            first: 0,
            chunks: 1,
            part: Bytes(vec![0; wire::MAX_PART_LEN + 1]),
        },
    ];
    for request in refused {
        let frame = wire::encode_frame(&request).expect("frame");
        assert!(wire::decode_frame::<Request>(&frame).is_err(), "{request:?}");
    }
    let long = Response::BlobPart { part: Bytes(vec![0; wire::MAX_PART_LEN + 1]) };
    let frame = wire::encode_frame(&long).expect("frame");
    assert!(wire::decode_frame::<Response>(&frame).is_err(), "a part over the limit");
}

/// A relay asks another relay of the channel to replicate a blob it pinned.
#[test]
fn files_between_relays() {
    use chitchat_proto::federation::{FedBody, FedRequest, FedResponse};
    let addr = |a: &str| wire::IpPort::from(a.parse::<std::net::SocketAddr>().expect("addr"));
    let replicate = |n: usize| FedRequest {
        from: "relay.example".into(),
        body: FedBody::ReplicateFile {
            channel: ChannelId([5; 32]),
            hash: [6; 32],
            len: 1_000_016,
            expires_ms: 1_800_000_000_000,
            addrs: vec![addr("127.0.0.1:4433"); n],
        },
    };
    let frame = wire::encode_frame(&replicate(1)).expect("frame");
    insta::assert_snapshot!("fed_replicate_file", hex(&frame));
    assert_eq!(wire::decode_frame::<FedRequest>(&frame).expect("decode"), replicate(1));
    let answer = wire::encode_frame(&FedResponse::Replicating).expect("frame");
    insta::assert_snapshot!("fed_replicating", hex(&answer));
    let frame = wire::encode_frame(&replicate(17)).expect("frame");
    assert!(wire::decode_frame::<FedRequest>(&frame).is_err(), "at most 16 addresses");
}

#[test]
fn history() {
    let request = Request::History { channel: ChannelId([5; 32]), from: 7, max: 256 };
    insta::assert_snapshot!("request_history", hex(&wire::encode_frame(&request).expect("frame")));
    let pack = Pack::seal(&key(1), ChannelId([5; 32]), 7, vec![b"a".to_vec()]).expect("pack");
    let response = Response::History { first: 3, next: 8, pack: Some(pack) };
    let frame = wire::encode_frame(&response).expect("frame");
    insta::assert_snapshot!("response_history", hex(&frame));
    assert_eq!(wire::decode_frame::<Response>(&frame).expect("decode"), response);
}

#[test]
fn packs() {
    let pack = Pack::seal(
        &key(1),
        ChannelId([5; 32]),
        7,
        vec![b"a".to_vec(), b"bc".to_vec(), b"def".to_vec()],
    )
    .expect("pack");
    insta::assert_snapshot!("pack", hex(&pack.to_bytes()));
    insta::assert_snapshot!("inclusion_proof", hex(&pack.prove(2).expect("proof").to_bytes()));
}

#[test]
fn chat_content() {
    let id = MessageId { sender: dev(1), seq: 4 };
    let all = [
        ChatContent::Text { body: "hi *there*".into() },
        ChatContent::Reply { to: id, body: "yes".into() },
        ChatContent::Edit { target: id, body: "hi".into() },
        ChatContent::Delete { target: id },
        ChatContent::Reaction { target: id, emoji: "👍".into(), remove: false },
        ChatContent::Attachment {
            file: FileRef {
                hash: [1; 32],
                key: [2; 32],
                size: 1234,
                mime: "image/png".into(),
                name: "cat.png".into(),
                thumbnail: Some(Bytes(vec![0x89, 0x50])),
            },
            caption: Some("a cat".into()),
        },
        ChatContent::ReadReceipt { up_to: id },
        ChatContent::Typing { active: true },
        ChatContent::FileRequest { target: id },
    ];
    let lines: Vec<String> = all.iter().map(|c| hex::encode(c.to_bytes())).collect();
    insta::assert_snapshot!("chat_content", lines.join("\n"));
}

#[test]
fn channel() {
    let config = ChannelConfig {
        mime: "text/chitchat".into(),
        name: "general".into(),
        relays: vec![relay()],
        admins: AdminPolicy::Admins([dev(1)].into()),
        creator: dev(1),
    };
    insta::assert_snapshot!("channel_config", hex(&config.to_bytes()));
    let app = ChannelMessage::Application { message: vec![1, 2, 3] };
    let commit = ChannelMessage::Commit { commit: vec![4, 5], cert: cert() };
    insta::assert_snapshot!(
        "channel_message",
        format!("{}\n{}", hex(&app.to_bytes()), hex(&commit.to_bytes()))
    );
    insta::assert_snapshot!("hlc", hex(&encode(&Hlc { wall_ms: T0.0, counter: 2 })));
    let payloads = [
        wire::InboxPayload::Channel { channel: ChannelId([5; 32]), message: app.clone() },
        wire::InboxPayload::Welcome { channel: ChannelId([5; 32]), welcome: Bytes(vec![9, 9]) },
        wire::InboxPayload::Leave(wire::LeaveRequest::sign(&key(1), ChannelId([5; 32]), T0)),
    ];
    let lines: Vec<String> = payloads.iter().map(|p| hex::encode(p.to_bytes())).collect();
    insta::assert_snapshot!("inbox_payload", lines.join("\n"));
    // A channel's history handed to a new device of the user.
    let message = wire::HistoryMessage {
        id: MessageId { sender: dev(1), seq: 3 },
        hlc: Hlc { wall_ms: T0.0, counter: 1 },
        epoch: 2,
        payload: Bytes(b"hi".to_vec()),
    };
    let pack = Pack::seal(&key(1), ChannelId([5; 32]), 0, vec![message.to_bytes()]).expect("pack");
    let history = wire::InboxPayload::History(pack);
    insta::assert_snapshot!("inbox_payload_history", hex(&history.to_bytes()));
    assert_eq!(wire::InboxPayload::from_bytes(&history.to_bytes()).expect("decode"), history);
}

#[test]
fn relay_protocol_frames() {
    let requests = vec![
        Request::Challenge { device: dev(1) },
        Request::Authenticate {
            device: dev(1),
            signature: AuthProof::sign(&key(1), "relay.example", [4; 32]),
        },
        Request::Register { token: Some("tok".into()), local_name: "alice".into(), dir: dir() },
        Request::PublishDir { dir: dir() },
        Request::Lookup { local_name: "alice".into() },
        Request::LookupDevices { devices: vec![dev(2)] },
        Request::UploadKeyPackages {
            packages: vec![Bytes(vec![1, 2])],
            last_resort: Some(Bytes(vec![3])),
        },
        Request::ClaimKeyPackage { device: dev(2) },
        Request::Enqueue { envelope: envelope() },
        Request::Fetch { after: Some(10), max: 100 },
        Request::Ack { ids: vec![11, 12] },
        Request::SubmitCommit(CommitSubmission {
            channel: ChannelId([5; 32]),
            epoch: 3,
            commit: vec![1, 2, 3],
            welcome: None,
            fanout: vec![dev(2)],
        }),
    ];
    let responses = vec![
        Response::Challenge { nonce: [4; 32] },
        Response::Authenticated,
        Response::Registered { sponsorship: sponsorship() },
        Response::DirPublished,
        Response::Dirs(vec![dir()]),
        Response::KeyPackagesStored { available: 5 },
        Response::KeyPackage(vec![1, 2]),
        Response::Enqueued { id: 9 },
        Response::Items {
            items: vec![InboxItem {
                id: 9,
                envelope: wire::Envelope::Sealed(envelope()),
                history: None,
            }],
            more: false,
        },
        Response::Acked,
        Response::CommitAccepted { cert: cert() },
        Response::CommitConflict {
            winner: CommitRef {
                channel: ChannelId([5; 32]),
                epoch: 3,
                hash: CommitHash([6; 32]),
                submitter: dev(2),
            },
        },
        Response::Error {
            code: ErrorCode::QuotaExceeded { retry_after_ms: 1000 },
            message: "inbox full".into(),
        },
    ];
    let frames = |v: Vec<String>| v.join("\n--\n");
    insta::assert_snapshot!(
        "requests",
        frames(requests.iter().map(|r| hex(&wire::encode_frame(r).expect("frame"))).collect())
    );
    insta::assert_snapshot!(
        "responses",
        frames(responses.iter().map(|r| hex(&wire::encode_frame(r).expect("frame"))).collect())
    );
    let later = [
        Request::Wait { after: Some(3), max: 100, timeout_ms: 30_000 },
        Request::EnqueueBatch { envelopes: vec![envelope()] },
    ];
    insta::assert_snapshot!(
        "requests_wait_batch",
        frames(later.iter().map(|r| hex(&wire::encode_frame(r).expect("frame"))).collect())
    );
    let open = Request::OpenChannel {
        channel: ChannelId([5; 32]),
        state: chitchat_proto::channel::PublicState {
            group_info: Bytes(vec![1]),
            ratchet_tree: Bytes(vec![2, 3]),
        },
    };
    insta::assert_snapshot!(
        "request_open_channel",
        hex(&wire::encode_frame(&open).expect("frame"))
    );
    let moved = Request::OpenMoved {
        before: chitchat_proto::channel::PublicState {
            group_info: Bytes(vec![1]),
            ratchet_tree: Bytes(vec![2, 3]),
        },
        moved: wire::OrderedCommit {
            channel: ChannelId([5; 32]),
            commit: vec![9; 3],
            cert: cert(),
        },
        state: chitchat_proto::channel::PublicState {
            group_info: Bytes(vec![4]),
            ratchet_tree: Bytes(vec![5, 6]),
        },
    };
    insta::assert_snapshot!("request_open_moved", hex(&wire::encode_frame(&moved).expect("frame")));
    let opened = Response::ChannelOpened { next_epoch: 4 };
    insta::assert_snapshot!(
        "response_channel_opened",
        hex(&wire::encode_frame(&opened).expect("frame"))
    );
    let batch = Response::EnqueuedBatch(vec![
        wire::EnqueueResult::Enqueued(4),
        wire::EnqueueResult::Refused(ErrorCode::NotFound),
    ]);
    insta::assert_snapshot!("response_batch", hex(&wire::encode_frame(&batch).expect("frame")));
    let post = wire::ChannelPost { channel: ChannelId([5; 32]), message: vec![7, 8] };
    let fan_out = [Request::Post { posts: vec![post.clone()] }, Request::Post { posts: vec![] }];
    insta::assert_snapshot!(
        "requests_post",
        frames(fan_out.iter().map(|r| hex(&wire::encode_frame(r).expect("frame"))).collect())
    );
    let posted = [
        Response::Posted(vec![
            wire::PostResult::Posted { delivered: 3, skipped: 1 },
            wire::PostResult::Refused(ErrorCode::Forbidden),
        ]),
        Response::Items {
            items: vec![InboxItem {
                id: 10,
                envelope: wire::Envelope::Post(post),
                history: Some(wire::HistoryMark { seq: 4, missed_from: Some(2) }),
            }],
            more: true,
        },
    ];
    insta::assert_snapshot!(
        "responses_post",
        frames(posted.iter().map(|r| hex(&wire::encode_frame(r).expect("frame"))).collect())
    );
    let commit =
        wire::OrderedCommit { channel: ChannelId([5; 32]), commit: vec![9; 3], cert: cert() };
    let fanned = Response::Items {
        items: vec![InboxItem {
            id: 11,
            envelope: wire::Envelope::Commit(commit),
            history: Some(wire::HistoryMark { seq: 5, missed_from: None }),
        }],
        more: false,
    };
    insta::assert_snapshot!("response_commit", hex(&wire::encode_frame(&fanned).expect("frame")));
    assert_eq!(
        wire::decode_frame::<Response>(&wire::encode_frame(&fanned).expect("frame"))
            .expect("decode"),
        fanned
    );
    // Every frozen frame still decodes to the value it came from.
    for r in &requests {
        assert_eq!(
            &wire::decode_frame::<Request>(&wire::encode_frame(r).expect("frame")).expect("decode"),
            r
        );
    }
    for r in &responses {
        assert_eq!(
            &wire::decode_frame::<Response>(&wire::encode_frame(r).expect("frame"))
                .expect("decode"),
            r
        );
    }
}

/// Protocol version 4: federation. The device asks its relay about other relays' users and
/// forwards payloads through it; relays speak `FedRequest`/`FedResponse` among themselves.
#[test]
fn federation_frames() {
    use chitchat_proto::federation::{FedBody, FedRequest, FedResponse, ForwardResult, Forwarded};
    let frames = |v: Vec<Vec<u8>>| v.iter().map(|f| hex(f)).collect::<Vec<_>>().join("\n--\n");
    let requests = [
        Request::LookupAt { host: "b.example:7561".into(), local_name: "bob".into() },
        Request::LookupDevicesAt { host: "b.example".into(), devices: vec![dev(2)] },
        Request::ClaimKeyPackageAt { host: "b.example".into(), device: dev(2) },
        Request::Forward { host: "b.example".into(), envelopes: vec![envelope()] },
    ];
    let responses = [
        Response::RemoteDirs { relay: relay(), dirs: vec![dir()] },
        Response::Forwarded { queued: 3 },
    ];
    let fed_requests = [
        FedBody::Lookup { local_name: "bob".into() },
        FedBody::LookupDevices { devices: vec![dev(2)] },
        FedBody::ClaimKeyPackage { requester: dev(1), device: dev(2) },
        FedBody::Forward {
            items: vec![
                Forwarded {
                    seq: 300,
                    sender: dev(1),
                    envelope: wire::Envelope::Sealed(envelope()),
                },
                Forwarded {
                    seq: 301,
                    sender: dev(1),
                    envelope: wire::Envelope::Post(wire::ChannelPost {
                        channel: ChannelId([5; 32]),
                        message: vec![7],
                    }),
                },
            ],
        },
    ]
    .map(|body| FedRequest { from: "a.example".into(), body });
    let fed_responses = [
        FedResponse::Dirs(vec![dir()]),
        FedResponse::KeyPackage(vec![1, 2]),
        FedResponse::Forwarded(vec![
            ForwardResult::Stored,
            ForwardResult::Refused(ErrorCode::RateLimited { retry_after_ms: 5 }),
        ]),
        FedResponse::Error { code: ErrorCode::Forbidden, message: "blocked".into() },
    ];
    insta::assert_snapshot!(
        "requests_federated",
        frames(requests.iter().map(|r| wire::encode_frame(r).expect("frame")).collect())
    );
    insta::assert_snapshot!(
        "responses_federated",
        frames(responses.iter().map(|r| wire::encode_frame(r).expect("frame")).collect())
    );
    insta::assert_snapshot!(
        "fed_requests",
        frames(fed_requests.iter().map(|r| wire::encode_frame(r).expect("frame")).collect())
    );
    insta::assert_snapshot!(
        "fed_responses",
        frames(fed_responses.iter().map(|r| wire::encode_frame(r).expect("frame")).collect())
    );
    for r in &requests {
        let f = wire::encode_frame(r).expect("frame");
        assert_eq!(&wire::decode_frame::<Request>(&f).expect("decode"), r);
    }
    for r in &fed_requests {
        let f = wire::encode_frame(r).expect("frame");
        assert_eq!(&wire::decode_frame::<FedRequest>(&f).expect("decode"), r);
    }
    for r in &fed_responses {
        let f = wire::encode_frame(r).expect("frame");
        assert_eq!(&wire::decode_frame::<FedResponse>(&f).expect("decode"), r);
    }
}

/// Epoch reports and equivocation proofs (protocol version 5).
#[test]
fn evidence_frames() {
    use chitchat_proto::ordering::{EpochReport, EpochReportBody};
    let body =
        |h: u8| EpochCertBody { channel: ChannelId([5; 32]), epoch: 3, hash: CommitHash([h; 32]) };
    let cert =
        EpochCert { body: body(1), signatures: vec![CertSignature::sign(&key(200), &body(1))] };
    let report = EpochReport::sign(
        &key(1),
        EpochReportBody {
            channel: ChannelId([5; 32]),
            epoch: 4,
            digest: [6; 32],
            cert: Some(cert),
            device: dev(1),
        },
    );
    report.verify().expect("a valid report");
    let proof = Equivocation::from_pair(
        (body(1), CertSignature::sign(&key(200), &body(1))),
        (body(2), CertSignature::sign(&key(200), &body(2))),
    )
    .expect("a proof");
    let requests =
        vec![Request::Report { report: report.clone() }, Request::Equivocation { proof }];
    let responses = [Response::EquivocationNoted { new: true }];
    let payload = wire::InboxPayload::Report(report.clone());
    insta::assert_snapshot!(
        "requests_evidence",
        requests
            .iter()
            .map(|r| hex(&wire::encode_frame(r).expect("frame")))
            .collect::<Vec<_>>()
            .join("\n--\n")
    );
    insta::assert_snapshot!(
        "responses_evidence",
        responses
            .iter()
            .map(|r| hex(&wire::encode_frame(r).expect("frame")))
            .collect::<Vec<_>>()
            .join("\n--\n")
    );
    let fed = chitchat_proto::federation::FedRequest {
        from: "relay.example".into(),
        body: chitchat_proto::federation::FedBody::Equivocation {
            proof: Box::new(requests_proof(&requests)),
        },
    };
    let noted = chitchat_proto::federation::FedResponse::Noted { new: false };
    insta::assert_snapshot!(
        "fed_evidence",
        [
            hex(&wire::encode_frame(&fed).expect("frame")),
            hex(&wire::encode_frame(&noted).expect("frame"))
        ]
        .join("\n--\n")
    );
    let check = chitchat_proto::federation::FedRequest {
        from: "relay.example".into(),
        body: chitchat_proto::federation::FedBody::CheckState {
            channel: chitchat_proto::ordering::ChannelId([4; 32]),
            state: chitchat_proto::channel::PublicState {
                group_info: vec![1, 2, 3].into(),
                ratchet_tree: vec![4, 5].into(),
            },
        },
    };
    let checked = chitchat_proto::federation::FedResponse::StateChecked(
        chitchat_proto::federation::StateCheck::Differs,
    );
    insta::assert_snapshot!(
        "fed_check_state",
        [
            hex(&wire::encode_frame(&check).expect("frame")),
            hex(&wire::encode_frame(&checked).expect("frame"))
        ]
        .join("\n--\n")
    );
    insta::assert_snapshot!("envelope_report", hex(&encode(&wire::Envelope::Report(report))));
    let missed = wire::Envelope::Missed { channel: ChannelId([5; 32]), from: 300 };
    insta::assert_snapshot!("envelope_missed", hex(&encode(&missed)));
    insta::assert_snapshot!("inbox_payload_report", hex(&payload.to_bytes()));
    for r in &requests {
        let f = wire::encode_frame(r).expect("frame");
        assert_eq!(&wire::decode_frame::<Request>(&f).expect("decode"), r);
    }
}

fn requests_proof(requests: &[Request]) -> Equivocation {
    requests
        .iter()
        .find_map(|r| match r {
            Request::Equivocation { proof } => Some(proof.clone()),
            _ => None,
        })
        .expect("a proof")
}

/// What nodes say to each other directly (`/chitchat/peer/1`).
#[test]
fn peer_frames() {
    use chitchat_proto::peer::{PeerRequest, PeerResponse};
    use chitchat_proto::wire::Envelope;
    let frame = |bytes: Result<Vec<u8>, chitchat_proto::DecodeError>| hex(&bytes.expect("fits"));
    let commit =
        wire::OrderedCommit { channel: ChannelId([5; 32]), commit: vec![9; 3], cert: cert() };
    insta::assert_snapshot!("peer_hello", frame(wire::encode_frame(&PeerRequest::Hello)));
    insta::assert_snapshot!(
        "peer_deliver",
        frame(wire::encode_frame(&PeerRequest::Deliver {
            envelopes: vec![Envelope::Commit(commit.clone())],
            dirs: vec![dir()],
        }))
    );
    insta::assert_snapshot!(
        "peer_commits",
        frame(wire::encode_frame(&PeerRequest::Commits { channel: ChannelId([5; 32]), from: 2 }))
    );
    insta::assert_snapshot!(
        "peer_hello_answer",
        frame(wire::encode_frame(&PeerResponse::Hello { dir: Box::new(dir()) }))
    );
    insta::assert_snapshot!(
        "peer_commits_answer",
        frame(wire::encode_frame(&PeerResponse::Commits { commits: vec![commit] }))
    );
    insta::assert_snapshot!(
        "peer_history",
        frame(wire::encode_frame(&PeerRequest::History { channel: ChannelId([5; 32]), from: 7 }))
    );
    insta::assert_snapshot!(
        "peer_submit",
        frame(wire::encode_frame(&PeerRequest::Submit {
            channel: ChannelId([5; 32]),
            epoch: 4,
            commit: Bytes(vec![9; 3]),
            dirs: vec![dir()],
        }))
    );
    insta::assert_snapshot!(
        "peer_accepted",
        frame(wire::encode_frame(&PeerResponse::Accepted { cert: cert() }))
    );
    let post = wire::ChannelPost { channel: ChannelId([5; 32]), message: vec![8; 3] };
    insta::assert_snapshot!(
        "peer_history_answer",
        frame(wire::encode_frame(&PeerResponse::History { entries: vec![(7, post)], next: 8 }))
    );
    insta::assert_snapshot!("peer_blobs", frame(wire::encode_frame(&PeerRequest::Blobs)));
    let addrs = vec![
        "127.0.0.1:4433".parse::<std::net::SocketAddr>().expect("addr").into(),
        "[::1]:4434".parse::<std::net::SocketAddr>().expect("addr").into(),
    ];
    insta::assert_snapshot!(
        "peer_blobs_answer",
        frame(wire::encode_frame(&PeerResponse::Blobs { addrs }))
    );
}

/// Linking a device and the device list: the requests, the answers, and the limits a decoder
/// enforces.
#[test]
fn links_and_devices() {
    use chitchat_proto::link::{LinkAnswer, LinkHello, LinkSecret};
    use chitchat_proto::wire::DeviceEntry;
    let secret = LinkSecret::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(4));
    let slot = secret.slot();
    let hello = LinkHello::new(&secret, dir());
    let answer = LinkAnswer::new(&secret, dev(2), dir());
    for (name, request) in [
        ("request_offer_link", Request::OfferLink { slot, expires: T0 }),
        ("request_join_link", Request::JoinLink { slot, hello: hello.clone() }),
        ("request_link_poll", Request::LinkPoll { slot }),
        ("request_answer_link", Request::AnswerLink { slot, answer: answer.clone() }),
        ("request_own_devices", Request::OwnDevices),
        ("request_name_device", Request::NameDevice { name: "phone".into() }),
        ("request_set_recovery", Request::SetRecovery { key: key(7).public() }),
        ("request_revoke", Request::Revoke { revocation: Box::new(revocation()) }),
    ] {
        let frame = wire::encode_frame(&request).expect("frame");
        insta::assert_snapshot!(name, hex(&frame));
        assert_eq!(wire::decode_frame::<Request>(&frame).expect("decode"), request);
    }
    let entry = DeviceEntry {
        dir: dir(),
        name: "laptop".into(),
        registered: T0,
        last_seen: Some(T0),
        revocation: None,
    };
    let revoked = DeviceEntry { revocation: Some(revocation()), ..entry.clone() };
    for (name, response) in [
        ("response_link_offered", Response::LinkOffered),
        ("response_link_joined", Response::LinkJoined),
        (
            "response_link_state",
            Response::LinkState { hello: Some(Box::new(hello)), answer: Some(Box::new(answer)) },
        ),
        ("response_link_answered", Response::LinkAnswered),
        ("response_own_devices", Response::OwnDevices(vec![entry.clone()])),
        ("response_device_named", Response::DeviceNamed),
        ("response_own_devices_revoked", Response::OwnDevices(vec![revoked])),
        ("response_recovery_set", Response::RecoverySet),
        ("response_revoking", Response::Revoking { revoked: false, signed: 1, needed: 2 }),
        (
            "response_error_revoked",
            Response::Error {
                code: chitchat_proto::wire::ErrorCode::Revoked,
                message: "this device was revoked".into(),
            },
        ),
    ] {
        let frame = wire::encode_frame(&response).expect("frame");
        insta::assert_snapshot!(name, hex(&frame));
        assert_eq!(wire::decode_frame::<Response>(&frame).expect("decode"), response);
    }
    for bad in ["x".repeat(65), "tab\there".to_owned(), "\u{1b}[2J".to_owned()] {
        let frame = wire::encode_frame(&Request::NameDevice { name: bad.clone() }).expect("frame");
        assert!(wire::decode_frame::<Request>(&frame).is_err(), "{bad:?}");
        let named = DeviceEntry { name: bad.clone(), ..entry.clone() };
        let frame = wire::encode_frame(&Response::OwnDevices(vec![named])).expect("frame");
        assert!(wire::decode_frame::<Response>(&frame).is_err(), "{bad:?}");
    }
    let many = Response::OwnDevices(vec![entry; 50]);
    let frame = wire::encode_frame(&many).expect("frame");
    assert!(wire::decode_frame::<Response>(&frame).is_err(), "at most 33 devices and 16 revoked");
}

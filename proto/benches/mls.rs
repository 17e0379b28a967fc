//! The MLS wrapper ([`chitchat_proto::channel`]) against raw openmls, at 10, 100 and 1,000
//! members: add one member, commit (self-update), process a commit, encrypt, decrypt.
//!
//! Run: `cargo bench -p chitchat-proto --bench mls` (add `-- --quick` for fewer iterations).
//! Both sides serialize to and from bytes, as they would on the wire. The wrapper's time
//! includes what it adds: certificate checks, credential checks (DIR and sponsorship
//! signatures), message ids, replay tracking. The relay's signing of certificates is not timed.
//! Operations alternate raw/wrapper so that machine noise hits both alike.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chitchat_proto::channel::{
    AdminPolicy, CIPHERSUITE, Change, Channel, ChannelConfig, ChannelMessage, Identity, KnownDirs,
    StagedCommit,
};
use chitchat_proto::codec::Bytes;
use chitchat_proto::identity::{DirBody, Profile, SponsorshipBody, TrustedRelays};
use chitchat_proto::ordering::{CertSignature, ChannelId, EpochCert, EpochCertBody};
use chitchat_proto::{DeviceId, Dir, RelayId, SecretKey, Sponsorship, Timestamp};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;

const NOW: Timestamp = Timestamp(1_700_000_000_000);
const OPS: [&str; 5] = ["add", "commit", "process", "encrypt", "decrypt"];

fn seed(i: u32) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..4].copy_from_slice(&i.to_le_bytes());
    s[31] = 1;
    s
}

/// Identity records for devices `0..n`, all sponsored by one relay.
struct Directory {
    relay: SecretKey,
    trust: TrustedRelays,
    dirs: BTreeMap<DeviceId, Dir>,
}

impl Directory {
    fn new(n: u32) -> Self {
        let relay = SecretKey::from_seed([200; 32]);
        let relay_id = RelayId { host: "relay.bench".into(), key: relay.public() };
        let trust = TrustedRelays { relays: vec![relay_id.clone()], ..Default::default() };
        let mut dirs = BTreeMap::new();
        for i in 0..n {
            let key = SecretKey::from_seed(seed(i));
            let device = DeviceId(key.public());
            let sponsorship = Sponsorship::issue(
                &relay,
                SponsorshipBody {
                    device,
                    local_name: format!("user{i}"),
                    relay: relay_id.clone(),
                    issued: NOW,
                    expires: NOW.plus_ms(1 << 40),
                },
            );
            let body = DirBody {
                device,
                seq: 1,
                inbox_key: [0; 32],
                linked: Default::default(),
                sponsorships: vec![sponsorship],
                profile: Profile::default(),
                revoked: false,
                issued: NOW,
            };
            dirs.insert(device, Dir::sign(&key, body));
        }
        Self { relay, trust, dirs }
    }

    fn check(&self) -> KnownDirs<'_, TrustedRelays> {
        KnownDirs { dirs: &self.dirs, trust: &self.trust, now: NOW }
    }

    fn cert(&self, channel: ChannelId, staged: &StagedCommit) -> EpochCert {
        let body = EpochCertBody { channel, epoch: staged.epoch, hash: staged.hash };
        EpochCert { body, signatures: vec![CertSignature::sign(&self.relay, &body)] }
    }
}

fn raw_signer(i: u32) -> SignatureKeyPair {
    let key = SecretKey::from_seed(seed(i));
    SignatureKeyPair::from_raw(
        CIPHERSUITE.signature_algorithm(),
        key.seed().to_vec(),
        key.public().0.to_vec(),
    )
}

fn raw_credential(signer: &SignatureKeyPair) -> CredentialWithKey {
    CredentialWithKey {
        credential: BasicCredential::new(signer.public().to_vec()).into(),
        signature_key: signer.to_public_vec().into(),
    }
}

fn raw_key_package(provider: &OpenMlsRustCrypto, i: u32) -> KeyPackage {
    let signer = raw_signer(i);
    let bundle = KeyPackage::builder()
        .build(CIPHERSUITE, provider, &signer, raw_credential(&signer))
        .expect("key package");
    bundle.key_package().clone()
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(4)
        .build()
}

/// Raw openmls: Alice (device 0) and Bob (device 1) in a group of `n`.
struct Raw {
    alice_p: OpenMlsRustCrypto,
    bob_p: OpenMlsRustCrypto,
    alice_sig: SignatureKeyPair,
    bob_sig: SignatureKeyPair,
    alice: MlsGroup,
    bob: MlsGroup,
}

fn to_protocol(bytes: &[u8]) -> ProtocolMessage {
    MlsMessageIn::tls_deserialize_exact(bytes)
        .expect("decode")
        .try_into_protocol_message()
        .expect("protocol message")
}

impl Raw {
    fn new(n: u32, others: &OpenMlsRustCrypto) -> Self {
        let alice_p = OpenMlsRustCrypto::default();
        let bob_p = OpenMlsRustCrypto::default();
        let alice_sig = raw_signer(0);
        let bob_sig = raw_signer(1);
        let mut alice = MlsGroup::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .with_wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(4)
            .build(&alice_p, &alice_sig, raw_credential(&alice_sig))
            .expect("group");
        let mut kps = vec![
            KeyPackage::builder()
                .build(CIPHERSUITE, &bob_p, &bob_sig, raw_credential(&bob_sig))
                .expect("kp")
                .key_package()
                .clone(),
        ];
        kps.extend((2..n).map(|i| raw_key_package(others, i)));
        let (_, welcome, _) =
            alice.add_members_without_update(&alice_p, &alice_sig, &kps).expect("add");
        alice.merge_pending_commit(&alice_p).expect("merge");
        let welcome = welcome.tls_serialize_detached().expect("welcome");
        let MlsMessageBodyIn::Welcome(w) =
            MlsMessageIn::tls_deserialize_exact(welcome.as_slice()).expect("decode").extract()
        else {
            panic!("not a welcome")
        };
        let bob = StagedWelcome::new_from_welcome(&bob_p, &join_config(), w, None)
            .expect("stage welcome")
            .into_group(&bob_p)
            .expect("join");
        Self { alice_p, bob_p, alice_sig, bob_sig, alice, bob }
    }

    fn commit(&mut self) -> Vec<u8> {
        let (commit, _, _) = self
            .alice
            .self_update(&self.alice_p, &self.alice_sig, LeafNodeParameters::default())
            .expect("update")
            .into_contents();
        self.alice.merge_pending_commit(&self.alice_p).expect("merge");
        commit.tls_serialize_detached().expect("encode")
    }

    /// Adds the device whose KeyPackage arrived as `bytes` (decoded and validated, as any
    /// KeyPackage from the network must be).
    fn add(&mut self, bytes: &[u8]) -> Vec<u8> {
        let kp = KeyPackageIn::tls_deserialize_exact(bytes)
            .expect("decode")
            .validate(self.alice_p.crypto(), ProtocolVersion::Mls10)
            .expect("valid");
        // Without a path update, as the wrapper's add-only commit.
        let (commit, _, _) = self
            .alice
            .add_members_without_update(&self.alice_p, &self.alice_sig, &[kp])
            .expect("add");
        self.alice.merge_pending_commit(&self.alice_p).expect("merge");
        commit.tls_serialize_detached().expect("encode")
    }

    fn process(&mut self, commit: &[u8]) {
        let processed =
            self.bob.process_message(&self.bob_p, to_protocol(commit)).expect("process");
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            panic!("not a commit")
        };
        self.bob.merge_staged_commit(&self.bob_p, *staged).expect("merge");
    }

    fn encrypt(&mut self) -> Vec<u8> {
        let msg = self
            .alice
            .create_message(&self.alice_p, &self.alice_sig, b"hello, bench")
            .expect("encrypt");
        msg.tls_serialize_detached().expect("encode")
    }

    fn decrypt(&mut self, bytes: &[u8]) {
        let processed = self.bob.process_message(&self.bob_p, to_protocol(bytes)).expect("decrypt");
        assert!(matches!(processed.into_content(), ProcessedMessageContent::ApplicationMessage(_)));
        let _ = &self.bob_sig;
    }
}

/// The wrapper: Alice and Bob as channel members in a channel of `n`.
struct Wrapped {
    alice_p: OpenMlsRustCrypto,
    bob_p: OpenMlsRustCrypto,
    alice_id: Identity,
    alice: Channel,
    bob: Channel,
}

impl Wrapped {
    fn new(n: u32, dir: &Directory, others: &OpenMlsRustCrypto) -> Self {
        let alice_p = OpenMlsRustCrypto::default();
        let bob_p = OpenMlsRustCrypto::default();
        let alice_id = Identity::new(&SecretKey::from_seed(seed(0)));
        let bob_id = Identity::new(&SecretKey::from_seed(seed(1)));
        let relay_id = dir.trust.relays[0].clone();
        let config = ChannelConfig {
            mime: "application/octet-stream".into(),
            name: "bench".into(),
            relays: vec![relay_id],
            admins: AdminPolicy::AnyMember,
            creator: alice_id.device(),
        };
        let id = ChannelId([1; 32]);
        let mut alice = Channel::create(&alice_p, &alice_id, id, config).expect("create");
        let mut add = vec![Bytes(bob_id.key_package(&bob_p, false).expect("kp"))];
        add.extend((2..n).map(|i| {
            Bytes(
                Identity::new(&SecretKey::from_seed(seed(i)))
                    .key_package(others, false)
                    .expect("kp"),
            )
        }));
        let change = Change { add, ..Default::default() };
        let staged = alice.stage(&alice_p, &alice_id, &change, &dir.check()).expect("stage");
        alice.accept_own(&alice_p, &dir.cert(id, &staged)).expect("accept");
        let welcome = staged.welcome.expect("welcome");
        let bob = Channel::join(&bob_p, &welcome, &dir.check()).expect("join");
        Self { alice_p, bob_p, alice_id, alice, bob }
    }

    /// Stages and accepts `change` at Alice; returns the timed part and the message for Bob.
    fn change(&mut self, dir: &Directory, change: &Change) -> (Duration, ChannelMessage) {
        let t = Instant::now();
        let staged =
            self.alice.stage(&self.alice_p, &self.alice_id, change, &dir.check()).expect("stage");
        let mut spent = t.elapsed();
        let cert = dir.cert(self.alice.id(), &staged); // the relay's work: not timed
        let t = Instant::now();
        self.alice.accept_own(&self.alice_p, &cert).expect("accept");
        spent += t.elapsed();
        (spent, ChannelMessage::Commit { commit: staged.commit, cert })
    }

    fn process(&mut self, dir: &Directory, message: ChannelMessage) {
        let events = self.bob.process(&self.bob_p, NOW, message, &dir.check()).expect("process");
        assert_eq!(events.len(), 1);
    }

    fn encrypt(&mut self) -> ChannelMessage {
        self.alice.send(&self.alice_p, &self.alice_id, NOW, b"hello, bench").expect("send").1
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run(n: u32, iterations: u32) -> Vec<(&'static str, Duration, Duration)> {
    let extra = iterations + 1;
    let dir = Directory::new(n + extra);
    let others = OpenMlsRustCrypto::default();
    let mut raw = Raw::new(n, &others);
    let mut wrapped = Wrapped::new(n, &dir, &others);
    let mut times: BTreeMap<&str, (Vec<Duration>, Vec<Duration>)> = BTreeMap::new();
    let mut record = |op, raw_t, wrapped_t| {
        let e = times.entry(op).or_default();
        e.0.push(raw_t);
        e.1.push(wrapped_t);
    };
    for k in 0..iterations {
        // add: one new member per iteration, on both sides.
        let i = n + k;
        let kp = raw_key_package(&others, i).tls_serialize_detached().expect("encode");
        let t = Instant::now();
        let commit = raw.add(&kp);
        let raw_t = t.elapsed();
        raw.process(&commit);
        let kp =
            Identity::new(&SecretKey::from_seed(seed(i))).key_package(&others, false).expect("kp");
        let (wrapped_t, msg) =
            wrapped.change(&dir, &Change { add: vec![Bytes(kp)], ..Default::default() });
        wrapped.process(&dir, msg);
        record("add", raw_t, wrapped_t);

        // commit: a self-update, staged and merged.
        let t = Instant::now();
        let commit = raw.commit();
        let raw_t = t.elapsed();
        raw.process(&commit);
        let (wrapped_t, msg) = wrapped.change(&dir, &Change { update: true, ..Default::default() });
        wrapped.process(&dir, msg);
        record("commit", raw_t, wrapped_t);

        // process: Bob applies Alice's self-update.
        let commit = raw.commit();
        let t = Instant::now();
        raw.process(&commit);
        let raw_t = t.elapsed();
        let (_, msg) = wrapped.change(&dir, &Change { update: true, ..Default::default() });
        let t = Instant::now();
        wrapped.process(&dir, msg);
        record("process", raw_t, t.elapsed());

        // encrypt and decrypt one application message.
        let t = Instant::now();
        let bytes = raw.encrypt();
        let raw_enc = t.elapsed();
        let t = Instant::now();
        raw.decrypt(&bytes);
        let raw_dec = t.elapsed();
        let t = Instant::now();
        let msg = wrapped.encrypt();
        let wrapped_enc = t.elapsed();
        let t = Instant::now();
        wrapped.process(&dir, msg);
        let wrapped_dec = t.elapsed();
        record("encrypt", raw_enc, wrapped_enc);
        record("decrypt", raw_dec, wrapped_dec);
    }
    assert_eq!(wrapped.alice.epoch_authenticator(), wrapped.bob.epoch_authenticator());
    OPS.iter()
        .map(|op| {
            let (r, w) = times.remove(op).expect("measured");
            (*op, median(r), median(w))
        })
        .collect()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[(u32, u32)] =
        if quick { &[(10, 5), (100, 5), (1000, 3)] } else { &[(10, 41), (100, 41), (1000, 15)] };
    println!("MLS wrapper vs raw openmls (median per operation; ratio = wrapper / raw)\n");
    println!("{:>7}  {:<8} {:>12} {:>12} {:>7}", "members", "op", "raw", "wrapper", "ratio");
    let mut log_sum = 0.0;
    let mut count = 0;
    let mut worst: (f64, String) = (0.0, String::new());
    for &(n, iterations) in sizes {
        let setup = Instant::now();
        let rows = run(n, iterations);
        for (op, raw, wrapped) in rows {
            let ratio = wrapped.as_secs_f64() / raw.as_secs_f64();
            log_sum += ratio.ln();
            count += 1;
            if ratio > worst.0 {
                worst = (ratio, format!("{op} at {n}"));
            }
            println!("{n:>7}  {op:<8} {:>10.1}µs {:>10.1}µs {ratio:>7.2}", us(raw), us(wrapped));
        }
        eprintln!("  ({n} members: {:.1}s including setup)", setup.elapsed().as_secs_f64());
    }
    println!(
        "\ngeometric mean ratio {:.2}; worst {:.2} ({})",
        (log_sum / count as f64).exp(),
        worst.0,
        worst.1
    );
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

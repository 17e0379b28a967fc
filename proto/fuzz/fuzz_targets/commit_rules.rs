#![no_main]

//! The channel rules on arbitrary commits: a member (`Channel::process`, with a valid
//! certificate) never merges what a relay (`PublicChannel::check`) refuses, and neither panics. Seed the corpus with real commits (any staged commit of a two-member channel) so that
//! mutations reach the rules.

use chitchat_proto::channel::{
    AcceptAll, AdminPolicy, Change, Channel, ChannelConfig, ChannelMessage, Identity,
    PublicChannel,
};
use chitchat_proto::ordering::{CertSignature, ChannelId, EpochCert, EpochCertBody};
use chitchat_proto::wire::commit_hash;
use chitchat_proto::{RelayId, SecretKey, Timestamp};
use openmls_rust_crypto::OpenMlsRustCrypto;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let relay_key = SecretKey::from_seed([9; 32]);
    let relay = RelayId { host: "relay.fuzz".into(), key: relay_key.public() };
    let (alice_p, bob_p) = (OpenMlsRustCrypto::default(), OpenMlsRustCrypto::default());
    let alice = Identity::new(&SecretKey::from_seed([1; 32]));
    let bob = Identity::new(&SecretKey::from_seed([2; 32]));
    let config = ChannelConfig {
        mime: "application/octet-stream".into(),
        name: "fuzz".into(),
        relays: vec![relay],
        admins: AdminPolicy::Admins([alice.device()].into()),
        creator: alice.device(),
    };
    let id = ChannelId([0; 32]);
    let Ok(mut a) = Channel::create(&alice_p, &alice, id, config) else { return };
    let Ok(kp) = bob.key_package(&bob_p, false) else { return };
    let change = Change { add: vec![kp.into()], ..Default::default() };
    let Ok(staged) = a.stage(&alice_p, &alice, &change, &AcceptAll) else { return };
    let certify = |epoch, hash| {
        let body = EpochCertBody { channel: id, epoch, hash };
        EpochCert { body, signatures: vec![CertSignature::sign(&relay_key, &body)] }
    };
    if a.accept_own(&alice_p, &certify(staged.epoch, staged.hash)).is_err() {
        return;
    }
    let Some(welcome) = staged.welcome else { return };
    let Ok(mut b) = Channel::join(&bob_p, &welcome, &AcceptAll) else { return };
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let Ok(state) = a.public_state(&alice_p, &alice) else { return };
    let Ok(public) = PublicChannel::from_state(&crypto, &state) else { return };

    let relay_ok = public.check(&crypto, data, &AcceptAll).is_ok();
    let message = ChannelMessage::Commit {
        commit: data.to_vec(),
        cert: certify(b.epoch(), commit_hash(data)),
    };
    let member_ok = b.process(&bob_p, Timestamp(0), message, &AcceptAll).is_ok_and(|events| {
        events.iter().any(|e| matches!(e, chitchat_proto::channel::ChannelEvent::CommitApplied { .. }))
    });
    // Whatever a member merges, the relay accepted: it never refuses what members apply. (The
    // converse holds but for the membership tag, which only members can check; the property
    // test in `channel/tests/rules.rs` checks both ways over commits with valid tags.)
    assert!(!member_ok || relay_ok, "a member merged a commit the relay refused");
});

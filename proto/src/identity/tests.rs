//! Every signature check of identity records, one rejection at a time.

use super::*;
use crate::keys::SignatureError;

const NOW: Timestamp = Timestamp(1_700_000_000_000);
const DAY: u64 = 24 * 3600 * 1000;

struct Fixture {
    relay: SecretKey,
    relay_id: RelayId,
    trust: TrustedRelays,
    alice: SecretKey,
    alice2: SecretKey,
}

fn fixture() -> Fixture {
    let relay = SecretKey::from_seed([200; 32]);
    let relay_id = RelayId { host: "relay.example".into(), key: relay.public() };
    let trust = TrustedRelays { relays: vec![relay_id.clone()], blocked: Default::default() };
    Fixture {
        relay,
        relay_id,
        trust,
        alice: SecretKey::from_seed([1; 32]),
        alice2: SecretKey::from_seed([2; 32]),
    }
}

impl Fixture {
    fn sponsorship(&self, device: &SecretKey, expires: Timestamp) -> Sponsorship {
        Sponsorship::issue(
            &self.relay,
            SponsorshipBody {
                device: DeviceId(device.public()),
                local_name: "alice".into(),
                relay: self.relay_id.clone(),
                issued: NOW,
                expires,
            },
        )
    }

    fn body(&self, device: &SecretKey, linked: &[&SecretKey]) -> DirBody {
        DirBody {
            device: DeviceId(device.public()),
            seq: 1,
            inbox_key: [9; 32],
            linked: linked.iter().map(|k| DeviceId(k.public())).collect(),
            sponsorships: vec![self.sponsorship(device, NOW.plus_ms(30 * DAY))],
            profile: Profile { display_name: "Alice".into(), avatar: None },
            revoked: false,
            issued: NOW,
        }
    }

    fn dir(&self, device: &SecretKey, linked: &[&SecretKey]) -> Dir {
        Dir::sign(device, self.body(device, linked))
    }
}

#[test]
fn valid_record_verifies_with_its_address() {
    let f = fixture();
    let dir = f.dir(&f.alice, &[]);
    let addresses = dir.verify(&f.trust, NOW).expect("valid");
    assert_eq!(addresses, vec![Address::parse("alice@relay.example").expect("address")]);
    assert_eq!(Dir::from_bytes(&dir.to_bytes()), Ok(dir));
}

#[test]
fn dir_bad_signature() {
    let f = fixture();
    let mut dir = f.dir(&f.alice, &[]);
    dir.signature.0[3] ^= 1;
    assert_eq!(
        dir.verify(&f.trust, NOW),
        Err(IdentityError::Signature(SignatureError::BadSignature))
    );
    // Changing a signed field breaks the signature too.
    let mut dir = f.dir(&f.alice, &[]);
    dir.body.seq = 2;
    assert_eq!(
        dir.verify(&f.trust, NOW),
        Err(IdentityError::Signature(SignatureError::BadSignature))
    );
}

#[test]
fn dir_wrong_label() {
    let f = fixture();
    let body = f.body(&f.alice, &[]);
    let signature = f.alice.sign(Label::Sponsorship, &encode(&body));
    let dir = Dir { body, signature };
    assert_eq!(
        dir.verify(&f.trust, NOW),
        Err(IdentityError::Signature(SignatureError::BadSignature))
    );
}

#[test]
fn dir_wrong_key() {
    let f = fixture();
    let body = f.body(&f.alice, &[]);
    let signature = f.alice2.sign(Label::Dir, &encode(&body));
    let dir = Dir { body, signature };
    assert_eq!(
        dir.verify(&f.trust, NOW),
        Err(IdentityError::Signature(SignatureError::BadSignature))
    );
}

#[test]
fn dir_revoked_self() {
    let f = fixture();
    let mut body = f.body(&f.alice, &[]);
    body.revoked = true;
    let dir = Dir::sign(&f.alice, body);
    assert_eq!(dir.verify(&f.trust, NOW), Err(IdentityError::Revoked));
}

#[test]
fn dir_issued_in_the_future() {
    let f = fixture();
    let mut body = f.body(&f.alice, &[]);
    body.issued = NOW.plus_ms(DAY);
    let dir = Dir::sign(&f.alice, body);
    assert!(matches!(dir.verify(&f.trust, NOW), Err(IdentityError::NotYetValid { .. })));
}

#[test]
fn dir_limits() {
    let f = fixture();
    let mut body = f.body(&f.alice, &[]);
    body.profile.display_name = "x".repeat(MAX_DISPLAY_NAME_LEN + 1);
    assert!(matches!(
        Dir::sign(&f.alice, body).verify(&f.trust, NOW),
        Err(IdentityError::Limit(_))
    ));
    let mut body = f.body(&f.alice, &[]);
    body.linked.insert(DeviceId(f.alice.public()));
    assert!(matches!(
        Dir::sign(&f.alice, body).verify(&f.trust, NOW),
        Err(IdentityError::Limit(_))
    ));
    let mut body = f.body(&f.alice, &[]);
    body.linked = (0..=MAX_LINKED_DEVICES as u8)
        .map(|i| DeviceId(SecretKey::from_seed([i + 50; 32]).public()))
        .collect();
    assert!(matches!(
        Dir::sign(&f.alice, body).verify(&f.trust, NOW),
        Err(IdentityError::Limit(_))
    ));
}

#[test]
fn sponsorship_bad_signature() {
    let f = fixture();
    let mut s = f.sponsorship(&f.alice, NOW.plus_ms(DAY));
    s.body.local_name = "mallory".into();
    assert_eq!(
        s.verify(&f.trust, NOW),
        Err(IdentityError::Signature(SignatureError::BadSignature))
    );
}

#[test]
fn sponsorship_wrong_label() {
    let f = fixture();
    let mut s = f.sponsorship(&f.alice, NOW.plus_ms(DAY));
    s.signature = f.relay.sign(Label::Dir, &encode(&s.body));
    assert_eq!(
        s.verify(&f.trust, NOW),
        Err(IdentityError::Signature(SignatureError::BadSignature))
    );
}

#[test]
fn sponsorship_wrong_key() {
    let f = fixture();
    // Signed by a key that claims the relay's host but is not the trusted key.
    let impostor = SecretKey::from_seed([201; 32]);
    let body = SponsorshipBody {
        device: DeviceId(f.alice.public()),
        local_name: "alice".into(),
        relay: RelayId { host: "relay.example".into(), key: impostor.public() },
        issued: NOW,
        expires: NOW.plus_ms(DAY),
    };
    let s = Sponsorship::issue(&impostor, body);
    assert_eq!(s.verify(&f.trust, NOW), Err(IdentityError::UntrustedRelay));
    // The trusted key named, but the signature made by another.
    let mut s = f.sponsorship(&f.alice, NOW.plus_ms(DAY));
    s.signature = impostor.sign(Label::Sponsorship, &encode(&s.body));
    assert_eq!(
        s.verify(&f.trust, NOW),
        Err(IdentityError::Signature(SignatureError::BadSignature))
    );
    // A host nobody trusts.
    let unknown = TrustedRelays::default();
    assert_eq!(
        f.sponsorship(&f.alice, NOW.plus_ms(DAY)).verify(&unknown, NOW),
        Err(IdentityError::UntrustedRelay)
    );
}

#[test]
fn sponsorship_expired() {
    let f = fixture();
    let s = f.sponsorship(&f.alice, NOW.plus_ms(DAY));
    assert_eq!(s.verify(&f.trust, NOW.plus_ms(DAY - 1)), Ok(()));
    assert!(matches!(s.verify(&f.trust, NOW.plus_ms(DAY)), Err(IdentityError::Expired { .. })));
    // A record whose only sponsorship expired is unsponsored: the reason is kept.
    let mut body = f.body(&f.alice, &[]);
    body.sponsorships = vec![s];
    let dir = Dir::sign(&f.alice, body);
    assert!(matches!(
        dir.verify(&f.trust, NOW.plus_ms(2 * DAY)),
        Err(IdentityError::Expired { .. })
    ));
}

#[test]
fn sponsorship_blocked_relay() {
    let mut f = fixture();
    f.trust.blocked.insert("relay.example".into());
    let dir = f.dir(&f.alice, &[]);
    assert_eq!(dir.verify(&f.trust, NOW), Err(IdentityError::BlockedRelay("relay.example".into())));
}

#[test]
fn sponsorship_for_another_device() {
    let f = fixture();
    let mut body = f.body(&f.alice, &[]);
    body.sponsorships = vec![f.sponsorship(&f.alice2, NOW.plus_ms(DAY))];
    let dir = Dir::sign(&f.alice, body);
    assert_eq!(dir.verify(&f.trust, NOW), Err(IdentityError::WrongDevice));
}

#[test]
fn unsponsored_record() {
    let f = fixture();
    let mut body = f.body(&f.alice, &[]);
    body.sponsorships.clear();
    let dir = Dir::sign(&f.alice, body);
    assert_eq!(dir.verify(&f.trust, NOW), Err(IdentityError::Unsponsored));
}

#[test]
fn links_need_both_sides() {
    let f = fixture();
    let a = f.dir(&f.alice, &[&f.alice2]);
    let b_one_sided = f.dir(&f.alice2, &[]);
    assert_eq!(linked(&a, &b_one_sided), Err(IdentityError::NotLinked));
    assert_eq!(linked(&b_one_sided, &a), Err(IdentityError::NotLinked));
    let b = f.dir(&f.alice2, &[&f.alice]);
    assert_eq!(linked(&a, &b), Ok(()));
}

#[test]
fn revocation_checks() {
    let f = fixture();
    let a = f.dir(&f.alice, &[&f.alice2]);
    let b = f.dir(&f.alice2, &[&f.alice]);
    let r = Revocation::issue(&f.alice, DeviceId(f.alice2.public()), NOW);
    assert_eq!(r.verify(&a, &b), Ok(()));
    // Bad signature.
    let mut bad = r.clone();
    bad.signature.0[0] ^= 1;
    assert_eq!(bad.verify(&a, &b), Err(IdentityError::Signature(SignatureError::BadSignature)));
    // Wrong label.
    let mut wrong_label = r.clone();
    wrong_label.signature = f.alice.sign(Label::Dir, &encode(&r.body));
    assert_eq!(
        wrong_label.verify(&a, &b),
        Err(IdentityError::Signature(SignatureError::BadSignature))
    );
    // Wrong key: Mallory signs a revocation in Alice's name.
    let mallory = SecretKey::from_seed([66; 32]);
    let mut forged = r.clone();
    forged.signature = mallory.sign(Label::Revocation, &encode(&r.body));
    assert_eq!(forged.verify(&a, &b), Err(IdentityError::Signature(SignatureError::BadSignature)));
    // A device that is not linked both ways cannot revoke.
    let stranger = f.dir(&mallory, &[&f.alice2]);
    let r = Revocation::issue(&mallory, DeviceId(f.alice2.public()), NOW);
    assert_eq!(r.verify(&stranger, &b), Err(IdentityError::NotLinked));
    // Records of other devices than the revocation names.
    let r = Revocation::issue(&f.alice, DeviceId(f.alice2.public()), NOW);
    assert_eq!(r.verify(&b, &a), Err(IdentityError::WrongDevice));
}

#[test]
fn supersedes_by_sequence() {
    let f = fixture();
    let v1 = f.dir(&f.alice, &[]);
    let mut body = f.body(&f.alice, &[]);
    body.seq = 2;
    let v2 = Dir::sign(&f.alice, body);
    assert!(v2.supersedes(&v1));
    assert!(!v1.supersedes(&v2));
    assert!(!v1.supersedes(&v1));
    assert!(!f.dir(&f.alice2, &[]).supersedes(&v1));
}

#[test]
fn auth_challenge_signature() {
    use crate::wire::AuthProof;
    let f = fixture();
    let me = DeviceId(f.alice.public());
    let sig = AuthProof::sign(&f.alice, "relay.example", [5; 32]);
    assert_eq!(AuthProof::verify("relay.example", me, [5; 32], &sig), Ok(()));
    // Another nonce, another relay, another device, another label: all rejected.
    assert!(AuthProof::verify("relay.example", me, [6; 32], &sig).is_err());
    assert!(AuthProof::verify("evil.example", me, [5; 32], &sig).is_err());
    assert!(
        AuthProof::verify("relay.example", DeviceId(f.alice2.public()), [5; 32], &sig).is_err()
    );
    let proof = AuthProof { relay_host: "relay.example".into(), device: me, nonce: [5; 32] };
    let wrong_label = f.alice.sign(Label::Dir, &encode(&proof));
    assert!(AuthProof::verify("relay.example", me, [5; 32], &wrong_label).is_err());
}

#[test]
fn names() {
    for ok in ["alice", "a.b-c_d", "0"] {
        assert_eq!(check_local_name(ok), Ok(()), "{ok}");
    }
    for bad in ["", "Alice", ".alice", "al ice", "ä", &"a".repeat(65)] {
        assert!(check_local_name(bad).is_err(), "{bad}");
    }
    for ok in ["relay.example", "localhost", "localhost:8443", "a-b.c"] {
        assert_eq!(check_host(ok), Ok(()), "{ok}");
    }
    for bad in ["", "Relay.example", "-a.b", "a..b", "a.b:99999", "a.b:x"] {
        assert!(check_host(bad).is_err(), "{bad}");
    }
    assert!(Address::parse("alice").is_err());
    assert_eq!(
        Address::parse("bob@relay.example").map(|a| a.to_string()),
        Ok("bob@relay.example".into())
    );
}

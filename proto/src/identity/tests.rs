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

fn devices(keys: &[&SecretKey]) -> BTreeSet<DeviceId> {
    keys.iter().map(|k| DeviceId(k.public())).collect()
}

#[test]
fn revocation_signatures_are_each_checked() {
    let f = fixture();
    let user = Address::parse("alice@relay.example").expect("address");
    let target = DeviceId(f.alice2.public());
    let recovery = RecoverySecret::parse("0123-4567-89AB-CDEF-GHJK-MNPQ-RR").expect("code");
    let mut r = Revocation::new(target, user.clone());
    r.sign(&f.alice);
    r.sign_recovery(&recovery);
    let key = recovery.key().public();
    assert_eq!(r.verify(Some(&key)), Ok((devices(&[&f.alice]), true)));
    assert_eq!(Revocation::from_bytes(&r.to_bytes()), Ok(r.clone()));
    // A device's signature changed, or made under another label, or by Mallory in its name.
    let mut bad = r.clone();
    bad.signers[0].1.0[0] ^= 1;
    assert_eq!(bad.verify(Some(&key)), Err(IdentityError::Signature(SignatureError::BadSignature)));
    let mut wrong_label = r.clone();
    wrong_label.signers[0].1 = f.alice.sign(Label::Dir, &encode(&r.body));
    assert!(matches!(wrong_label.verify(Some(&key)), Err(IdentityError::Signature(_))));
    let mallory = SecretKey::from_seed([66; 32]);
    let mut forged = r.clone();
    forged.signers[0].1 = mallory.sign(Label::Revocation, &encode(&r.body));
    assert!(matches!(forged.verify(Some(&key)), Err(IdentityError::Signature(_))));
    // Signatures over another target do not carry over.
    let mut moved = r.clone();
    moved.body.target = DeviceId(mallory.public());
    assert!(matches!(moved.verify(Some(&key)), Err(IdentityError::Signature(_))));
    // A recovery signature by another code, or for a user with none.
    let other = RecoverySecret::parse("ZZZZ-4567-89AB-CDEF-GHJK-MNPQ-RR").expect("code");
    assert!(matches!(r.verify(Some(&other.key().public())), Err(IdentityError::Signature(_))));
    assert!(matches!(r.verify(None), Err(IdentityError::Limit(_))));
    // The target signing its own revocation; signers twice or out of order.
    let mut own = Revocation::new(target, user.clone());
    own.sign(&f.alice2);
    assert!(matches!(own.verify(None), Err(IdentityError::Limit(_))));
    let mut twice = Revocation::new(target, user.clone());
    twice.sign(&f.alice);
    twice.signers.push(twice.signers[0]);
    assert!(matches!(twice.verify(None), Err(IdentityError::Limit(_))));
    let mut two = Revocation::new(target, user.clone());
    two.sign(&f.alice);
    two.sign(&mallory);
    assert_eq!(two.verify(None).map(|(d, _)| d.len()), Ok(2));
    two.signers.reverse();
    assert!(matches!(two.verify(None), Err(IdentityError::Limit(_))));
    // Merging signatures of the same revocation; not of another.
    let mut a = Revocation::new(target, user.clone());
    a.sign(&f.alice);
    let mut b = Revocation::new(target, user.clone());
    b.sign(&mallory);
    a.merge(&b).expect("same body");
    assert_eq!(a.verify(None).map(|(d, _)| d.len()), Ok(2));
    let elsewhere = Revocation::new(target, Address::parse("bob@relay.example").expect("address"));
    assert!(a.merge(&elsewhere).is_err());
}

#[test]
fn a_lost_device_cannot_revoke_the_others_on_its_own() {
    let [a, b, c, d, x] = [1u8, 2, 3, 4, 5].map(|i| SecretKey::from_seed([i; 32]));
    let id = |k: &SecretKey| DeviceId(k.public());
    let quorum = revocation::quorum;
    let (two, three, four) =
        (devices(&[&a, &b]), devices(&[&a, &b, &c]), devices(&[&a, &b, &c, &d]));
    // Two settled devices: one alone cannot (it might be the thief); with the recovery code it
    // can, either way.
    assert_eq!(
        quorum(&two, &two, id(&b), &devices(&[&a]), false),
        Err(IdentityError::Quorum { signed: 1, needed: 2 })
    );
    assert_eq!(quorum(&two, &two, id(&b), &devices(&[&a]), true), Ok(()));
    assert_eq!(quorum(&two, &two, id(&a), &devices(&[&b]), true), Ok(()));
    // The recovery code with no device of the user is not enough.
    assert!(quorum(&two, &two, id(&b), &BTreeSet::new(), true).is_err());
    let mallory = SecretKey::from_seed([66; 32]);
    assert!(quorum(&two, &two, id(&b), &devices(&[&mallory]), true).is_err());
    // Three settled: two of them; four: three of them.
    assert!(quorum(&three, &three, id(&c), &devices(&[&a]), false).is_err());
    assert_eq!(quorum(&three, &three, id(&c), &devices(&[&a, &b]), false), Ok(()));
    assert!(quorum(&four, &four, id(&d), &devices(&[&a, &b]), false).is_err());
    assert_eq!(quorum(&four, &four, id(&d), &devices(&[&a, &b, &c]), false), Ok(()));
    // Signatures of devices that are not the user's, or the target's own, count for nothing.
    assert!(quorum(&three, &three, id(&c), &devices(&[&a, &mallory]), false).is_err());
    assert!(quorum(&three, &three, id(&c), &devices(&[&a, &c]), false).is_err());
    // A thief holding `b` links `c` and `d` itself: new devices have no vote, so the three of
    // them cannot revoke `a`. The user revokes `b` from
    // `a` with the recovery code, then `a` (the one voter left) revokes `c` and `d` alone.
    let settled = devices(&[&a, &b]);
    assert!(quorum(&four, &settled, id(&a), &devices(&[&b, &c, &d]), false).is_err());
    assert!(quorum(&four, &settled, id(&c), &devices(&[&b]), false).is_err());
    assert_eq!(quorum(&four, &settled, id(&b), &devices(&[&a]), true), Ok(()));
    let left = devices(&[&a, &c, &d]);
    assert_eq!(quorum(&left, &devices(&[&a]), id(&c), &devices(&[&a]), false), Ok(()));
    assert!(quorum(&left, &devices(&[&a]), id(&a), &devices(&[&c, &d]), false).is_err());
    // A device that is not the user's is not revoked from it.
    assert_eq!(
        quorum(&two, &two, id(&x), &devices(&[&a, &b]), true),
        Err(IdentityError::NotLinked)
    );
}

#[test]
fn recovery_codes_read_back_sloppily_and_refuse_garbage() {
    let secret = RecoverySecret::parse("0123-4567-89AB-CDEF-GHJK-MNPQ-RR").expect("code");
    let text = secret.code().to_string();
    assert_eq!(text.len(), 32);
    assert_eq!(RecoverySecret::parse(&text), Ok(secret.clone()));
    let sloppy = text.to_lowercase().replace('-', " ").replace('0', "o");
    assert_eq!(RecoverySecret::parse(&sloppy), Ok(secret.clone()));
    assert!(format!("{secret:?}").contains(".."));
    for bad in
        ["", "0123", "0123-4567-89AB-CDEF-GHJK-MNPQ-RSTU", "UUUU-4567-89AB-CDEF-GHJK-MNPQ-RR"]
    {
        assert!(RecoverySecret::parse(bad).is_err(), "{bad}");
    }
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

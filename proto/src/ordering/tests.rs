use super::*;
use crate::keys::SecretKey;
use crate::{DeviceId, Timestamp};

fn channel(n: u8) -> ChannelId {
    ChannelId([n; 32])
}

fn commit(c: u8, epoch: u64, h: u8, who: u8) -> CommitRef {
    CommitRef {
        channel: channel(c),
        epoch,
        hash: CommitHash([h; 32]),
        submitter: DeviceId(SecretKey::from_seed([who; 32]).public()),
    }
}

#[test]
fn first_valid_commit_wins_and_loser_learns_winner() {
    let mut s = OrderingState::default();
    let a = commit(1, 0, 0xa, 1);
    let b = commit(1, 0, 0xb, 2);
    assert_eq!(s.apply(&OrderingCommand::Submit(a)), Outcome::Accepted(a));
    assert_eq!(s.apply(&OrderingCommand::Submit(b)), Outcome::Conflict { winner: a });
    // Resubmitting the winner (a lost response) is idempotent.
    assert_eq!(s.apply(&OrderingCommand::Submit(a)), Outcome::Accepted(a));
    assert_eq!(s.next_epoch(&channel(1)), Some(1));
    // The loser rebuilds on epoch 1 and wins it.
    let b1 = commit(1, 1, 0xb1, 2);
    assert_eq!(s.apply(&OrderingCommand::Submit(b1)), Outcome::Accepted(b1));
}

#[test]
fn epochs_must_be_consecutive() {
    let mut s = OrderingState::default();
    assert_eq!(s.apply(&OrderingCommand::Submit(commit(1, 3, 1, 1))), Outcome::UnknownChannel);
    assert_eq!(s.apply(&OrderingCommand::Open { channel: channel(1), epoch: 3 }), Outcome::Opened);
    assert_eq!(
        s.apply(&OrderingCommand::Open { channel: channel(1), epoch: 9 }),
        Outcome::AlreadyOpen { next_epoch: 3 }
    );
    assert_eq!(
        s.apply(&OrderingCommand::Submit(commit(1, 5, 1, 1))),
        Outcome::WrongEpoch { next_epoch: 3 }
    );
    assert!(matches!(s.apply(&OrderingCommand::Submit(commit(1, 3, 1, 1))), Outcome::Accepted(_)));
}

#[test]
fn retained_winners_are_bounded() {
    let limits = OrderingLimits { max_channels: 2, retained_epochs: 4 };
    let mut s = OrderingState::new(limits);
    for e in 0..10 {
        assert!(matches!(
            s.apply(&OrderingCommand::Submit(commit(1, e, e as u8, 1))),
            Outcome::Accepted(_)
        ));
    }
    assert!(s.winner(&channel(1), 5).is_none());
    assert!(s.winner(&channel(1), 6).is_some());
    // A loser of a forgotten epoch is told where the channel is now.
    assert_eq!(
        s.apply(&OrderingCommand::Submit(commit(1, 2, 0xff, 2))),
        Outcome::WrongEpoch { next_epoch: 10 }
    );
    s.apply(&OrderingCommand::Open { channel: channel(2), epoch: 0 });
    assert_eq!(s.apply(&OrderingCommand::Open { channel: channel(3), epoch: 0 }), Outcome::Full);
    assert_eq!(s.channel_count(), 2);
}

#[test]
fn replicas_applying_one_log_agree() {
    let log: Vec<OrderingCommand> = (0..50u8)
        .map(|i| OrderingCommand::Submit(commit(i % 3, u64::from(i / 6), i, i % 5)))
        .collect();
    let run = || {
        let mut s = OrderingState::default();
        let outcomes: Vec<Outcome> = log.iter().map(|c| s.apply(c)).collect();
        (s, outcomes)
    };
    assert_eq!(run(), run());
    // The state survives a snapshot (postcard) unchanged.
    let (s, _) = run();
    let bytes = crate::codec::encode(&s);
    let back: OrderingState = crate::codec::decode(&bytes, usize::MAX).expect("decode");
    assert_eq!(back, s);
}

fn relays(n: u8) -> Vec<SecretKey> {
    (0..n).map(|i| SecretKey::from_seed([100 + i; 32])).collect()
}

#[test]
fn cert_needs_majority_of_orderers() {
    let keys = relays(3);
    let set: Vec<_> = keys.iter().map(SecretKey::public).collect();
    let body = EpochCertBody { channel: channel(1), epoch: 4, hash: CommitHash([9; 32]) };
    let sig = |k: &SecretKey| CertSignature::sign(k, &body);
    let one = EpochCert { body, signatures: vec![sig(&keys[0])] };
    assert_eq!(one.verify(&set), Err(CertError::NoQuorum { have: 1, need: 2 }));
    // The same signer twice counts once.
    let twice = EpochCert { body, signatures: vec![sig(&keys[0]), sig(&keys[0])] };
    assert_eq!(twice.verify(&set), Err(CertError::NoQuorum { have: 1, need: 2 }));
    let two = EpochCert { body, signatures: vec![sig(&keys[0]), sig(&keys[2])] };
    assert_eq!(two.verify(&set), Ok(()));
    // A non-orderer's signature does not count.
    let outsider = SecretKey::from_seed([1; 32]);
    let with_outsider = EpochCert { body, signatures: vec![sig(&keys[0]), sig(&outsider)] };
    assert!(matches!(with_outsider.verify(&set), Err(CertError::NoQuorum { .. })));
    // A signature over another body is rejected, not skipped.
    let other = EpochCertBody { epoch: 5, ..body };
    let forged =
        EpochCert { body, signatures: vec![sig(&keys[0]), CertSignature::sign(&keys[1], &other)] };
    assert_eq!(forged.verify(&set), Err(CertError::BadSignature));
    // Right signatures, wrong expectation.
    assert_eq!(two.verify_for(&other, &set), Err(CertError::Mismatch));
    assert_eq!(two.verify(&[]), Err(CertError::NoOrderers));
}

#[test]
fn equivocation_is_provable_and_only_then() {
    let k = SecretKey::from_seed([50; 32]);
    let a = EpochCertBody { channel: channel(1), epoch: 2, hash: CommitHash([1; 32]) };
    let b = EpochCertBody { hash: CommitHash([2; 32]), ..a };
    let proof =
        Equivocation::from_pair((a, CertSignature::sign(&k, &a)), (b, CertSignature::sign(&k, &b)))
            .expect("a proof");
    assert_eq!(proof.verify(), Ok(k.public()));
    // Same hash twice is not equivocation.
    assert!(
        Equivocation::from_pair((a, CertSignature::sign(&k, &a)), (a, CertSignature::sign(&k, &a)))
            .is_none()
    );
    // Different epochs are not equivocation.
    let c = EpochCertBody { epoch: 3, ..b };
    assert!(
        Equivocation::from_pair((a, CertSignature::sign(&k, &a)), (c, CertSignature::sign(&k, &c)))
            .is_none()
    );
    // Two different signers are not equivocation.
    let k2 = SecretKey::from_seed([51; 32]);
    assert!(
        Equivocation::from_pair(
            (a, CertSignature::sign(&k, &a)),
            (b, CertSignature::sign(&k2, &b))
        )
        .is_none()
    );
}

#[test]
fn intent_backs_off_and_gives_up() {
    let now = Timestamp(1_000);
    let mut i = Intent::new("add carol", now);
    assert!(i.is_due(now));
    let mut delays = Vec::new();
    for attempt in 0..MAX_SUBMIT_ATTEMPTS {
        i.published(u64::from(attempt), CommitHash([attempt as u8; 32]));
        let winner = commit(1, u64::from(attempt), 0xee, 9);
        assert!(!i.accepted(&winner), "someone else's commit is not ours");
        i.lost(now, 12345);
        if let IntentState::ToPublish { not_before } = i.state {
            assert!(!i.is_due(Timestamp(not_before.0 - 1)));
            delays.push(not_before.0 - now.0);
        }
    }
    assert_eq!(i.state, IntentState::Failed);
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "back-off grows: {delays:?}");
    assert!(delays.iter().all(|d| *d <= BACKOFF_MAX_MS));

    let mut ok = Intent::new("remove bob", now);
    ok.published(3, CommitHash([3; 32]));
    let mine = CommitRef { hash: CommitHash([3; 32]), ..commit(1, 3, 0, 1) };
    assert!(ok.accepted(&mine));
    assert!(ok.is_done());
}

#[test]
fn the_last_epoch_takes_no_commit() {
    let mut s = OrderingState::default();
    let c = channel(1);
    assert_eq!(s.apply(&OrderingCommand::Open { channel: c, epoch: u64::MAX }), Outcome::Opened);
    assert_eq!(
        s.apply(&OrderingCommand::Submit(commit(1, u64::MAX, 1, 1))),
        Outcome::WrongEpoch { next_epoch: u64::MAX }
    );
}

/// A channel that moved to another relay set and back is opened again from its later state;
/// a channel still ordered here, or a state not past the copy, is not replaced.
#[test]
fn a_stale_copy_of_a_channel_that_moved_away_is_replaced_and_nothing_else() {
    use crate::channel::{AcceptAll, AdminPolicy, Change, Channel, ChannelConfig, Identity};
    use crate::identity::RelayId;
    let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let key = SecretKey::from_seed([3; 32]);
    let me = Identity::new(&key);
    let (r1, r2) = (SecretKey::from_seed([201; 32]), SecretKey::from_seed([202; 32]));
    let relay = |k: &SecretKey, host: &str| RelayId { host: host.into(), key: k.public() };
    let config = ChannelConfig {
        mime: "application/octet-stream".into(),
        name: "moving".into(),
        relays: vec![relay(&r1, "one.example")],
        admins: AdminPolicy::AnyMember,
        creator: me.device(),
    };
    let id = channel(8);
    let mut ch = Channel::create(&provider, &me, id, config.clone()).expect("create");
    let mut o = Orderer::new(OrderingLimits::default());
    let open = |ch: &Channel| ch.public_state(&provider, &me).expect("export");
    let (v, _) = o.apply(1, OrderCommand::Open { channel: id, state: open(&ch) });
    assert_eq!(v, Verdict::Ordering(Outcome::Opened));
    // Still ordered here: a reopen of the same state is not a replacement.
    let (v, _) = o.apply(2, OrderCommand::Reopen { channel: id, state: open(&ch) });
    assert_eq!(v, Verdict::Ordering(Outcome::AlreadyOpen { next_epoch: 0 }));

    // A commit ordered here moves the channel to {one, two}.
    let both = vec![relay(&r1, "one.example"), relay(&r2, "two.example")];
    let moved = ChannelConfig { relays: both.clone(), ..config.clone() };
    let change = Change { update: true, config: Some(moved), ..Default::default() };
    let staged = ch.stage(&provider, &me, &change, &AcceptAll).expect("stage");
    let order = |s: &crate::channel::StagedCommit| OrderCommand::Order {
        commit: CommitRef { channel: id, epoch: s.epoch, hash: s.hash, submitter: me.device() },
        bytes: crate::codec::Bytes(s.commit.clone()),
        welcome: None,
    };
    let (v, _) = o.apply(3, order(&staged));
    assert!(matches!(v, Verdict::Ordering(Outcome::Accepted(_))), "{v:?}");
    let body = EpochCertBody { channel: id, epoch: 0, hash: staged.hash };
    let cert = EpochCert { body, signatures: vec![CertSignature::sign(&r1, &body)] };
    ch.accept_own(&provider, &cert).expect("merge");
    // Elsewhere (the group of {one, two}), a commit moves it back to {one}: the copy here is
    // at epoch 1 with relay set {one, two}, stale.
    let back = Change { update: true, config: Some(config), ..Default::default() };
    let staged = ch.stage(&provider, &me, &back, &AcceptAll).expect("stage");
    let body = EpochCertBody { channel: id, epoch: 1, hash: staged.hash };
    let signatures = vec![CertSignature::sign(&r1, &body), CertSignature::sign(&r2, &body)];
    ch.accept_own(&provider, &EpochCert { body, signatures }).expect("merge");
    assert_eq!(ch.epoch(), 2);
    // An open does not replace it; a reopen of the later state does, at its epoch.
    let (v, _) = o.apply(4, OrderCommand::Open { channel: id, state: open(&ch) });
    assert_eq!(v, Verdict::Ordering(Outcome::AlreadyOpen { next_epoch: 1 }));
    assert_eq!(o.matches(&id, &open(&ch)), Some(false));
    let (v, _) = o.apply(5, OrderCommand::Reopen { channel: id, state: open(&ch) });
    assert_eq!(v, Verdict::Ordering(Outcome::Opened));
    assert_eq!(o.next_epoch(&id), Some(2));
    assert_eq!(o.matches(&id, &open(&ch)), Some(true));
    // Now ordered here again: another reopen is refused.
    let (v, _) = o.apply(6, OrderCommand::Reopen { channel: id, state: open(&ch) });
    assert_eq!(v, Verdict::Ordering(Outcome::AlreadyOpen { next_epoch: 2 }));
}

/// A channel ordered by two relays leaves winners waiting for their certificate, moves to one
/// relay, and comes back: the winners of the stale copy stop waiting (no relay can certify
/// them any more), and a certificate for one of them is refused.
#[test]
fn a_reopened_channel_leaves_no_winner_waiting() {
    use crate::channel::{AcceptAll, AdminPolicy, Change, Channel, ChannelConfig, Identity};
    use crate::identity::RelayId;
    let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let me = Identity::new(&SecretKey::from_seed([4; 32]));
    let (r1, r2) = (SecretKey::from_seed([211; 32]), SecretKey::from_seed([212; 32]));
    let relay = |k: &SecretKey, host: &str| RelayId { host: host.into(), key: k.public() };
    let one = vec![relay(&r1, "one.example")];
    let both = vec![relay(&r1, "one.example"), relay(&r2, "two.example")];
    let config = ChannelConfig {
        mime: "application/octet-stream".into(),
        name: "returning".into(),
        relays: both.clone(),
        admins: AdminPolicy::AnyMember,
        creator: me.device(),
    };
    let id = channel(9);
    let mut ch = Channel::create(&provider, &me, id, config.clone()).expect("create");
    let open = |ch: &Channel| ch.public_state(&provider, &me).expect("export");
    let mut o = Orderer::new(OrderingLimits::default());
    let (v, _) = o.apply(1, OrderCommand::Open { channel: id, state: open(&ch) });
    assert_eq!(v, Verdict::Ordering(Outcome::Opened));
    let certify = |ch: &mut Channel, change: &Change, o: &mut Orderer, index: u64| {
        let s = ch.stage(&provider, &me, change, &AcceptAll).expect("stage");
        let commit =
            CommitRef { channel: id, epoch: s.epoch, hash: s.hash, submitter: me.device() };
        let order =
            OrderCommand::Order { commit, bytes: crate::codec::Bytes(s.commit), welcome: None };
        let (v, delivery) = o.apply(index, order);
        assert!(matches!(v, Verdict::Ordering(Outcome::Accepted(_))), "{v:?}");
        assert!(delivery.is_none(), "a winner of two relays waits for its certificate");
        let body = EpochCertBody { channel: id, epoch: s.epoch, hash: s.hash };
        let signatures = vec![CertSignature::sign(&r1, &body), CertSignature::sign(&r2, &body)];
        let cert = EpochCert { body, signatures };
        ch.accept_own(&provider, &cert).expect("merge");
        cert
    };
    // Two winners here, never delivered: a self-update, then the move to {one}.
    let update = Change { update: true, ..Default::default() };
    let stale = certify(&mut ch, &update, &mut o, 2);
    let to_one = Change {
        update: true,
        config: Some(ChannelConfig { relays: one, ..config.clone() }),
        ..Default::default()
    };
    certify(&mut ch, &to_one, &mut o, 3);
    assert_eq!(o.waiting().count(), 2);
    // Elsewhere (the group of {one}) a commit brings it back to {one, two}.
    let back = Change { update: true, config: Some(config), ..Default::default() };
    let s = ch.stage(&provider, &me, &back, &AcceptAll).expect("stage");
    let body = EpochCertBody { channel: id, epoch: s.epoch, hash: s.hash };
    let cert = EpochCert { body, signatures: vec![CertSignature::sign(&r1, &body)] };
    ch.accept_own(&provider, &cert).expect("merge");
    let (v, _) = o.apply(4, OrderCommand::Reopen { channel: id, state: open(&ch) });
    assert_eq!(v, Verdict::Ordering(Outcome::Opened));
    assert_eq!(o.waiting().count(), 0, "winners of the stale copy still wait");
    let (v, delivery) = o.apply(5, OrderCommand::Deliver { cert: stale });
    assert!(matches!(v, Verdict::Invalid(_)), "{v:?}");
    assert!(delivery.is_none());
}

/// A channel id names its creator: no other device's id matches it, and the random half does
/// not change that.
#[test]
fn a_channel_id_is_bound_to_its_creator() {
    let alice = DeviceId(SecretKey::from_seed([1; 32]).public());
    let mallory = DeviceId(SecretKey::from_seed([6; 32]).public());
    let id = ChannelId::of_creator(&alice, [7; 16]);
    assert!(id.is_of_creator(&alice));
    assert!(!id.is_of_creator(&mallory));
    assert!(ChannelId::of_creator(&alice, [8; 16]).is_of_creator(&alice));
    assert_ne!(ChannelId::of_creator(&alice, [8; 16]), id);
    // An id of arbitrary bytes (what a forger would pick) names no one.
    assert!(!ChannelId([7; 32]).is_of_creator(&alice));
}

//! The channel rules under attack: commits built with raw openmls by members who break a rule
//! on purpose, checked by a relay ([`PublicChannel::check`]) and processed by the other members
//! with a valid certificate. Both must refuse them, for the same reason; and over generated
//! commits the relay accepts exactly what the members merge.

use openmls::prelude::tls_codec::Serialize as _;
use proptest::prelude::*;

use super::*;

/// A commit a member builds with raw openmls, bypassing [`Channel::stage`]'s own checks.
#[derive(Clone, Debug, Default)]
struct Forge {
    /// KeyPackages to add (TLS encoding; validated by openmls only).
    add: Vec<Vec<u8>>,
    remove: Vec<DeviceId>,
    /// A GroupContextExtensions proposal with this config.
    config: Option<ChannelConfig>,
    /// Leave out the required-capabilities extension from the proposal.
    drop_required: bool,
    /// A custom proposal.
    custom: bool,
    /// A new leaf signed by this key, whose credential claims this device.
    new_leaf: Option<(SecretKey, DeviceId)>,
}

/// The relay's verdict on a commit, and each other member's.
type Verdicts = (Result<(), ChannelError>, Vec<(usize, Result<(), ChannelError>)>);

/// What a forged commit carries.
struct Forged {
    commit: Vec<u8>,
    welcome: Option<Vec<u8>>,
}

fn config_extensions(config: &ChannelConfig, required: bool) -> Extensions<GroupContext> {
    let mut extensions = Vec::new();
    if required {
        extensions.push(Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
            &[ExtensionType::Unknown(CONFIG_EXTENSION_TYPE)],
            &[],
            &[],
        )));
    }
    extensions.push(Extension::Unknown(CONFIG_EXTENSION_TYPE, UnknownExtension(encode(config))));
    Extensions::from_vec(extensions).expect("extensions")
}

/// A KeyPackage whose leaf is signed by `key` but whose credential claims `claims`.
fn impersonating_key_package(key: &SecretKey, claims: DeviceId) -> Vec<u8> {
    let signer = Identity::new(key).signer;
    let provider = OpenMlsRustCrypto::default();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(claims.as_bytes().to_vec()).into(),
        signature_key: key.public().0.to_vec().into(),
    };
    KeyPackage::builder()
        .leaf_node_capabilities(capabilities())
        .build(CIPHERSUITE, &provider, &signer, credential)
        .expect("key package")
        .key_package()
        .tls_serialize_detached()
        .expect("encode")
}

impl World {
    /// A channel whose only admin is Alice, with Bob and Carol in it, ordered by the relay.
    fn admins_only() -> Self {
        let mut w = Self::new();
        let alice = w.devices[ALICE].id();
        let config = ChannelConfig {
            mime: crate::chat::MIME.into(),
            name: "announcements".into(),
            relays: vec![w.relay.id.clone()],
            admins: AdminPolicy::Admins([alice].into()),
            creator: alice,
        };
        let a = &mut w.devices[ALICE];
        let channel =
            Channel::create(&a.provider, &a.me, ChannelId([42; 32]), config).expect("create");
        w.relay.open(&channel, &a.provider, &a.me);
        a.channel = Some(channel);
        let add = vec![w.devices[BOB].key_package(), w.devices[CAROL].key_package()];
        let staged = w.stage(ALICE, &Change { add, ..Default::default() }).expect("stage");
        w.submit(ALICE, &staged).expect("accepted");
        w.deliver_all();
        w
    }

    /// The epoch the relay orders next.
    fn relay_epoch(&self) -> u64 {
        self.relay.orderer.next_epoch(&ChannelId([42; 32])).expect("ordered")
    }

    /// Builds `forge` as a commit of `who`, left pending in its group.
    fn forge(&mut self, who: usize, forge: &Forge) -> Result<Forged, ChannelError> {
        let d = &mut self.devices[who];
        let channel = d.channel.as_mut().expect("member");
        let provider = &d.provider;
        let mut key_packages = Vec::new();
        for bytes in &forge.add {
            let kp = KeyPackageIn::tls_deserialize_exact(&bytes[..])
                .map_err(|e| ChannelError::Malformed(e.to_string()))?
                .validate(provider.crypto(), ProtocolVersion::Mls10)
                .map_err(mls_err)?;
            key_packages.push(kp);
        }
        let leaves = forge
            .remove
            .iter()
            .filter_map(|r| {
                channel.group.members().find(|m| credential_device(&m.credential) == Some(*r))
            })
            .map(|m| m.index)
            .collect::<Vec<_>>();
        let mut builder = channel
            .group
            .commit_builder()
            .force_self_update(true)
            .propose_adds(key_packages)
            .propose_removals(leaves);
        if let Some(config) = &forge.config {
            builder = builder
                .propose_group_context_extensions(config_extensions(config, !forge.drop_required))
                .map_err(mls_err)?;
        }
        if forge.custom {
            builder = builder
                .add_proposal(Proposal::Custom(Box::new(CustomProposal::new(0xF0F0, vec![1]))));
        }
        let builder = builder.load_psks(provider.storage()).map_err(mls_err)?;
        let built = match &forge.new_leaf {
            None => builder.build(provider.rand(), provider.crypto(), &d.me.signer, |_| true),
            Some((key, claims)) => {
                let signer = Identity::new(key).signer;
                let credential_with_key = CredentialWithKey {
                    credential: BasicCredential::new(claims.as_bytes().to_vec()).into(),
                    signature_key: key.public().0.to_vec().into(),
                };
                builder.build_with_new_signer(
                    provider.rand(),
                    provider.crypto(),
                    &d.me.signer,
                    NewSignerBundle { signer: &signer, credential_with_key },
                    |_| true,
                )
            }
        }
        .map_err(mls_err)?;
        let bundle = built.stage_commit(provider).map_err(mls_err)?;
        let welcome = match bundle.to_welcome_msg() {
            Some(w) => Some(w.tls_serialize_detached().map_err(mls_err)?),
            None => None,
        };
        let (commit, _, _) = bundle.into_contents();
        Ok(Forged { commit: commit.tls_serialize_detached().map_err(mls_err)?, welcome })
    }

    /// The relay's verdict on a forged commit of `who` (its orderer's check with the directory,
    /// then the order itself, as the relay service does), then every other member's, each given
    /// the commit with a valid certificate (as if the relay had certified it). The committer
    /// merges its commit if the relay accepted it, and drops it otherwise.
    fn judge(&mut self, who: usize, forged: &Forged) -> Verdicts {
        let channel = self.channel_id_of(who);
        let checked = self.relay.orderer.check(&channel, &forged.commit, &self.check());
        let epoch = self.relay_epoch();
        let hash = commit_hash(&forged.commit);
        let body = EpochCertBody { channel, epoch, hash };
        let cert =
            EpochCert { body, signatures: vec![CertSignature::sign(&self.relay.key, &body)] };
        let mut members = Vec::new();
        for i in 0..self.devices.len() {
            let active = self.devices[i].channel.as_ref().is_some_and(Channel::is_active);
            if i == who || !active {
                continue;
            }
            let msg = ChannelMessage::Commit { commit: forged.commit.clone(), cert: cert.clone() };
            let verdict = self.process(i, msg).and_then(|events| match events.first() {
                Some(ChannelEvent::CommitApplied { .. }) => Ok(()),
                other => Err(ChannelError::Mls(format!("not applied: {other:?}"))),
            });
            members.push((i, verdict));
        }
        let verdict = match checked {
            Ok(committer) => {
                assert_eq!(committer, self.devices[who].id());
                let commit = CommitRef { channel, epoch, hash, submitter: committer };
                let order = OrderCommand::Order {
                    commit,
                    bytes: forged.commit.clone().into(),
                    welcome: None,
                };
                self.relay.log += 1;
                let (ordered, _) = self.relay.orderer.apply(self.relay.log, order);
                assert_eq!(ordered, Verdict::Ordering(Outcome::Accepted(commit)));
                let d = &mut self.devices[who];
                let channel = d.channel.as_mut().expect("member");
                channel.group.merge_pending_commit(&d.provider).expect("merge own");
                channel.config = read_config(channel.group.extensions()).expect("config");
                if let Some(welcome) = &forged.welcome {
                    self.join_all(welcome);
                }
                Ok(())
            }
            Err(e) => {
                let d = &mut self.devices[who];
                let channel = d.channel.as_mut().expect("member");
                channel.group.clear_pending_commit(d.provider.storage()).expect("clear");
                Err(e)
            }
        };
        (verdict, members)
    }

    fn channel_id_of(&self, who: usize) -> ChannelId {
        self.devices[who].channel.as_ref().expect("member").id()
    }

    /// Every device a Welcome is for joins (those it is not for fail and stay as they are).
    fn join_all(&mut self, welcome: &[u8]) {
        let check = KnownDirs { dirs: &self.dirs, trust: &self.trust, now: self.now };
        for d in &mut self.devices {
            if d.channel.as_ref().is_some_and(Channel::is_active) {
                continue;
            }
            if let Ok(channel) = Channel::join(&d.provider, welcome, &check) {
                d.channel = Some(channel);
            }
        }
    }
}

/// Asserts that the relay and every member refused the commit, the relay as `expected` says.
fn all_refuse((relay, members): Verdicts, expected: impl Fn(&ChannelError) -> bool) {
    let err = relay.expect_err("the relay refuses");
    assert!(expected(&err), "relay: {err:?}");
    for (i, verdict) in members {
        let err = verdict.expect_err("a member refuses");
        assert!(expected(&err), "member {i}: {err:?}");
    }
}

fn config_of(w: &World, who: usize) -> ChannelConfig {
    w.devices[who].channel.as_ref().expect("member").config().clone()
}

#[test]
fn a_non_admin_cannot_rewrite_the_config() {
    let mut w = World::admins_only();
    let bob = w.devices[BOB].id();
    // Bob makes himself admin.
    let mut config = config_of(&w, BOB);
    config.admins = AdminPolicy::Admins([bob].into());
    let forged =
        w.forge(BOB, &Forge { config: Some(config), ..Default::default() }).expect("forge");
    all_refuse(w.judge(BOB, &forged), |e| *e == ChannelError::NotAdmin);
    // Bob puts his own key in the relay set, to certify his own commits.
    let mut config = config_of(&w, BOB);
    config.relays.push(RelayId { host: "bob.example".into(), key: bob.0 });
    let forged =
        w.forge(BOB, &Forge { config: Some(config), ..Default::default() }).expect("forge");
    all_refuse(w.judge(BOB, &forged), |e| *e == ChannelError::NotAdmin);
    assert_eq!(w.epochs(&[ALICE, BOB, CAROL]), vec![1, 1, 1], "nothing applied");
    assert_eq!(w.relay_epoch(), 1);
}

#[test]
fn an_admin_changes_only_the_name_and_the_admins() {
    let mut w = World::admins_only();
    let carol = w.devices[CAROL].id();
    let base = config_of(&w, ALICE);
    let forbidden = |f: fn(&mut ChannelConfig)| {
        let mut c = base.clone();
        f(&mut c);
        c
    };
    for (config, why) in [
        (forbidden(|c| c.relays.clear()), "relay"),
        (forbidden(|c| c.mime = "application/other".into()), "MIME"),
        (forbidden(|c| c.creator = DeviceId(SecretKey::from_seed([9; 32]).public())), "creator"),
        (forbidden(|c| c.admins = AdminPolicy::Admins(Default::default())), "empty"),
    ] {
        let forged =
            w.forge(ALICE, &Forge { config: Some(config), ..Default::default() }).expect("forge");
        all_refuse(
            w.judge(ALICE, &forged),
            |e| matches!(e, ChannelError::ForbiddenConfig(m) if m.contains(why)),
        );
    }
    // A name with an escape sequence, which would reach every member's terminal.
    let config = forbidden(|c| c.name = "\u{1b}[2Jnews".into());
    let forged =
        w.forge(ALICE, &Forge { config: Some(config), ..Default::default() }).expect("forge");
    all_refuse(
        w.judge(ALICE, &forged),
        |e| matches!(e, ChannelError::BadConfig(m) if m.contains("control")),
    );
    // Dropping the required capability would let members without the config join (openmls
    // refuses to build such a commit; if it did build one, the rule would refuse it).
    let forge = Forge { config: Some(base.clone()), drop_required: true, ..Default::default() };
    match w.forge(ALICE, &forge) {
        Ok(forged) => {
            all_refuse(w.judge(ALICE, &forged), |e| matches!(e, ChannelError::ForbiddenConfig(_)))
        }
        Err(e) => assert!(matches!(e, ChannelError::Mls(_)), "{e:?}"),
    }
    // A new name and Carol as a second admin are fine, for the relay and the members alike.
    let mut config = base.clone();
    config.name = "news".into();
    config.admins = AdminPolicy::Admins([base.creator, carol].into());
    let forged = w
        .forge(ALICE, &Forge { config: Some(config.clone()), ..Default::default() })
        .expect("forge");
    let (relay_verdict, members) = w.judge(ALICE, &forged);
    relay_verdict.expect("the relay accepts");
    assert!(members.iter().all(|(_, v)| v.is_ok()), "{members:?}");
    for i in [ALICE, BOB, CAROL] {
        assert_eq!(config_of(&w, i), config);
    }
    let ordered = w.relay.orderer.config(&ChannelId([42; 32])).expect("ordered");
    assert_eq!(ordered.expect("config"), config);
    // Carol, now an admin, may remove Bob.
    let forged = w
        .forge(CAROL, &Forge { remove: vec![w.devices[BOB].id()], ..Default::default() })
        .expect("forge");
    let (relay_verdict, members) = w.judge(CAROL, &forged);
    relay_verdict.expect("the relay accepts");
    assert!(members.iter().all(|(_, v)| v.is_ok()), "{members:?}");
    assert!(!w.devices[BOB].channel.as_ref().expect("was a member").is_active());
}

#[test]
fn no_one_poses_as_another_device() {
    let mut w = World::admins_only();
    let mallory = SecretKey::from_seed([5; 32]);
    let alice2 = w.devices[ALICE2].id();
    // Mallory's key under Alice's second device's name: refused on upload, when staging, by the
    // relay and by the members, even from an admin who does not check.
    let kp = impersonating_key_package(&mallory, alice2);
    let crypto = openmls_rust_crypto::RustCrypto::default();
    assert_eq!(validate_key_package(&crypto, &kp), Err(ChannelError::LeafMismatch(Some(alice2))));
    let change = Change { add: vec![kp.clone().into()], ..Default::default() };
    assert_eq!(w.stage(ALICE, &change).map(|_| ()), Err(ChannelError::LeafMismatch(Some(alice2))));
    let forged = w.forge(ALICE, &Forge { add: vec![kp], ..Default::default() }).expect("forge");
    all_refuse(w.judge(ALICE, &forged), |e| *e == ChannelError::LeafMismatch(Some(alice2)));
    // Bob's update may not give his leaf another device's name, nor another device's key.
    let bob = w.devices[BOB].id();
    for claims in [alice2, DeviceId(mallory.public())] {
        let forge = Forge { new_leaf: Some((mallory.clone(), claims)), ..Default::default() };
        let forged = w.forge(BOB, &forge).expect("forge");
        all_refuse(
            w.judge(BOB, &forged),
            |e| matches!(e, ChannelError::LeafMismatch(Some(d)) if *d == claims || *d == bob),
        );
    }
    assert_eq!(w.relay_epoch(), 1, "nothing applied");
}

#[test]
fn proposals_of_other_types_and_non_admin_changes_are_refused() {
    let mut w = World::admins_only();
    // A custom proposal, even from the admin.
    match w.forge(ALICE, &Forge { custom: true, ..Default::default() }) {
        Ok(forged) => all_refuse(w.judge(ALICE, &forged), |e| {
            matches!(e, ChannelError::ForbiddenProposal(_) | ChannelError::Mls(_))
        }),
        // openmls itself refuses to build it: nothing to check.
        Err(e) => assert!(matches!(e, ChannelError::Mls(_)), "{e:?}"),
    }
    // Bob, not an admin, adds Alice's second device or removes Carol: the relay refuses as the
    // members do (before, it ordered them and the channel was stuck behind the certificate).
    let kp = w.devices[ALICE2].key_package().0;
    let forged = w.forge(BOB, &Forge { add: vec![kp], ..Default::default() }).expect("forge");
    all_refuse(w.judge(BOB, &forged), |e| *e == ChannelError::NotAdmin);
    let carol = w.devices[CAROL].id();
    let forged = w.forge(BOB, &Forge { remove: vec![carol], ..Default::default() }).expect("forge");
    all_refuse(w.judge(BOB, &forged), |e| *e == ChannelError::NotAdmin);
    // His own update is his to commit.
    let forged = w.forge(BOB, &Forge::default()).expect("forge");
    let (verdict, members) = w.judge(BOB, &forged);
    verdict.expect("accepted");
    assert!(members.iter().all(|(_, v)| v.is_ok()), "{members:?}");
    all_equal(&w.epoch_authenticators(&[ALICE, BOB, CAROL]));
}

#[test]
fn a_welcome_needs_trusted_orderers() {
    let mut w = World::new();
    let alice = w.devices[ALICE].id();
    let stranger =
        RelayId { host: "elsewhere.example".into(), key: SecretKey::from_seed([77; 32]).public() };
    for (n, relays) in [vec![stranger], vec![]].into_iter().enumerate() {
        let config = ChannelConfig {
            mime: crate::chat::MIME.into(),
            name: "elsewhere".into(),
            relays,
            admins: AdminPolicy::AnyMember,
            creator: alice,
        };
        let a = &mut w.devices[ALICE];
        a.channel = Some(
            Channel::create(&a.provider, &a.me, ChannelId([44 + n as u8; 32]), config)
                .expect("create"),
        );
        let change = Change { add: vec![w.devices[BOB].key_package()], ..Default::default() };
        let staged = w.stage(ALICE, &change).expect("stage");
        let welcome = staged.welcome.expect("welcome");
        let d = &w.devices[BOB];
        let check = KnownDirs { dirs: &w.dirs, trust: &w.trust, now: w.now };
        let err = Channel::join(&d.provider, &welcome, &check).expect_err("refused");
        assert!(matches!(err, ChannelError::UntrustedOrderers(_)), "{err:?}");
    }
}

/// One generated attempt: who commits, and what.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    who: usize,
    kind: u8,
}

fn attempt() -> impl Strategy<Value = Attempt> {
    (prop::sample::select(vec![ALICE, BOB, CAROL, ALICE2]), 0u8..13)
        .prop_map(|(who, kind)| Attempt { who, kind })
}

/// The forge of an attempt kind, on the world as it is.
fn forge_of(w: &World, a: Attempt) -> Forge {
    let me = w.devices[a.who].id();
    let mallory = SecretKey::from_seed([5; 32]);
    let members = w.devices[a.who].channel.as_ref().expect("member").members();
    let other = members.iter().copied().find(|d| *d != me);
    let mut config = config_of(w, a.who);
    match a.kind {
        0 => Forge::default(),
        1 => Forge { add: vec![w.devices[ALICE2].key_package().0], ..Default::default() },
        2 => Forge {
            add: vec![impersonating_key_package(&mallory, w.devices[ALICE2].id())],
            ..Default::default()
        },
        3 => Forge { add: vec![w.devices[MALLORY].key_package().0], ..Default::default() },
        4 => Forge { remove: other.into_iter().collect(), ..Default::default() },
        5 => {
            config.name.push('!');
            Forge { config: Some(config), ..Default::default() }
        }
        6 => {
            config.admins = AdminPolicy::Admins([me].into());
            Forge { config: Some(config), ..Default::default() }
        }
        7 => {
            config.relays.push(RelayId { host: "x.example".into(), key: me.0 });
            Forge { config: Some(config), ..Default::default() }
        }
        8 => {
            config.mime = "application/x".into();
            Forge { config: Some(config), ..Default::default() }
        }
        9 => Forge { config: Some(config), drop_required: true, ..Default::default() },
        10 => Forge { custom: true, ..Default::default() },
        11 => Forge { new_leaf: Some((mallory, me)), ..Default::default() },
        _ => {
            config.admins = AdminPolicy::AnyMember;
            Forge {
                config: Some(config),
                add: vec![w.devices[ALICE2].key_package().0],
                ..Default::default()
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Over generated commits, the relay accepts exactly what every member merges.
    #[test]
    fn relays_and_members_agree_on_every_commit(attempts in prop::collection::vec(attempt(), 1..8)) {
        agree(World::admins_only(), attempts)?;
    }

    /// The same where credentials name users and Bob's user is the admin: Alice brings and
    /// removes her second device, Carol may not, and no one claims a user it is not.
    #[test]
    fn relays_and_members_agree_where_users_are_named(
        attempts in prop::collection::vec(attempt(), 1..8),
    ) {
        agree(World::with_users(BOB, "bob", &[ALICE, CAROL]), attempts)?;
    }
}

/// Judges each attempt on `w`: the relay and every member reach the same verdict, and all stay
/// at the relay's epoch.
fn agree(mut w: World, attempts: Vec<Attempt>) -> Result<(), TestCaseError> {
    {
        for a in attempts {
            if !w.devices[a.who].channel.as_ref().is_some_and(Channel::is_active) {
                continue;
            }
            let forge = forge_of(&w, a);
            let Ok(forged) = w.forge(a.who, &forge) else {
                // openmls would not build it (say, Alice's second device is already in).
                let d = &mut w.devices[a.who];
                let channel = d.channel.as_mut().expect("member");
                let _ = channel.group.clear_pending_commit(d.provider.storage());
                continue;
            };
            let (verdict, members) = w.judge(a.who, &forged);
            for (i, member) in &members {
                prop_assert_eq!(
                    verdict.is_ok(),
                    member.is_ok(),
                    "{:?}: relay {:?}, member {} {:?}",
                    a,
                    verdict,
                    i,
                    member
                );
            }
            let active: Vec<usize> = (0..w.devices.len())
                .filter(|i| w.devices[*i].channel.as_ref().is_some_and(Channel::is_active))
                .collect();
            all_equal(&w.epochs(&active));
            prop_assert_eq!(w.epochs(&active[..1])[0], w.relay_epoch());
        }
    }
    Ok(())
}

#[test]
fn a_flood_of_future_messages_from_one_sender_leaves_room_for_the_others() {
    let mut w = World::started(&[BOB, CAROL]);
    // Alice commits; Bob applies it, Carol has not yet.
    let staged = w.stage(ALICE, &Change { update: true, ..Default::default() }).expect("stage");
    w.submit(ALICE, &staged).expect("accepted");
    let commit_for_carol = w.devices[CAROL].inbox.pop_front().expect("the commit");
    w.deliver_all();
    // Bob floods the next epoch; Alice sends one message in it.
    for i in 0..MAX_BUFFERED_PER_SENDER + 8 {
        w.send(BOB, &format!("flood {i}"));
    }
    w.send(ALICE, "still heard");
    let mut full = 0;
    let inbox: Vec<ChannelMessage> = w.devices[CAROL].inbox.drain(..).collect();
    for msg in inbox {
        match w.process(CAROL, msg) {
            Ok(events) => assert!(matches!(events[..], [ChannelEvent::Buffered { .. }])),
            Err(ChannelError::BufferFull) => full += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(full, 8, "Bob's messages past his share are refused");
    let events = w.process(CAROL, commit_for_carol).expect("the commit");
    let shown = |text: &str| {
        events.iter().any(
            |e| matches!(e, ChannelEvent::Message { payload, .. } if payload == text.as_bytes()),
        )
    };
    assert!(shown("still heard"), "Alice's message was kept despite Bob's flood");
    assert!(shown("flood 0"));
}

impl World {
    /// Every device's credentials name the user its record is sponsored as (Mallory, sponsored
    /// by no one, claims to be Alice). A channel `creator` made, whose admin is the user
    /// `admin`, with `others` added by the creator.
    fn with_users(creator: usize, admin: &str, others: &[usize]) -> Self {
        let mut w = Self::new();
        for (i, name) in [
            (ALICE, "alice"),
            (BOB, "bob"),
            (CAROL, "carol"),
            (ALICE2, "alice"),
            (MALLORY, "alice"),
        ] {
            let address = w.address(name);
            let d = &mut w.devices[i];
            d.me = Identity::new(&d.key).with_user(Some(address));
        }
        let config = ChannelConfig {
            mime: crate::chat::MIME.into(),
            name: "users".into(),
            relays: vec![w.relay.id.clone()],
            admins: AdminPolicy::Users([w.address(admin)].into()),
            creator: w.devices[creator].id(),
        };
        let c = &mut w.devices[creator];
        let channel =
            Channel::create(&c.provider, &c.me, ChannelId([42; 32]), config).expect("create");
        w.relay.open(&channel, &c.provider, &c.me);
        c.channel = Some(channel);
        if !others.is_empty() {
            let add = others.iter().map(|i| w.devices[*i].key_package()).collect();
            let staged = w.stage(creator, &Change { add, ..Default::default() }).expect("stage");
            w.submit_by(creator, &staged);
        }
        w
    }

    fn address(&self, name: &str) -> crate::identity::Address {
        crate::identity::Address { local: name.into(), host: self.relay.id.host.clone() }
    }

    /// Submits `who`'s staged commit and delivers everything.
    fn submit_by(&mut self, who: usize, staged: &StagedCommit) {
        let channel = self.channel_id_of(who);
        let cert = self.relay.submit(channel, self.devices[who].id(), staged).expect("accepted");
        let d = &mut self.devices[who];
        d.channel.as_mut().expect("member").accept_own(&d.provider, &cert).expect("merge own");
        let msg = ChannelMessage::Commit { commit: staged.commit.clone(), cert };
        self.fanout(who, &msg, &staged.removed);
        if let Some(welcome) = &staged.welcome {
            self.join_all(welcome);
        }
        self.deliver_all();
    }

    fn in_channel(&self, who: usize, of: usize) -> bool {
        let id = self.devices[of].id();
        self.devices[who].channel.as_ref().is_some_and(|c| c.members().contains(&id))
    }
}

#[test]
fn a_member_brings_and_removes_its_own_users_devices_and_no_one_elses() {
    // Bob created the channel and is its only admin (as a user); Alice is a member.
    let mut w = World::with_users(BOB, "bob", &[ALICE]);
    let (alice2, bob) = (w.devices[ALICE2].id(), w.devices[BOB].id());

    // Alice adds her second device: no admin needed, the relay certifies, all merge.
    let add = vec![w.devices[ALICE2].key_package()];
    let staged = w.stage(ALICE, &Change { add, ..Default::default() }).expect("her own device");
    w.submit_by(ALICE, &staged);
    for who in [ALICE, BOB, ALICE2] {
        assert!(w.in_channel(who, ALICE2), "{who} sees Alice's second device");
    }
    assert!(!w.devices[ALICE2].channel.as_ref().expect("joined").is_admin_device(alice2));

    // Carol is not Alice's: refused when staged, and forged, by the relay and every member.
    let add = vec![w.devices[CAROL].key_package()];
    assert_eq!(
        w.stage(ALICE, &Change { add: add.clone(), ..Default::default() }).err(),
        Some(ChannelError::NotAdmin)
    );
    let forged = w
        .forge(
            ALICE,
            &Forge { add: add.iter().map(|b| b.0.clone()).collect(), ..Default::default() },
        )
        .expect("forge");
    all_refuse(w.judge(ALICE, &forged), |e| *e == ChannelError::NotAdmin);
    assert!(!w.in_channel(BOB, CAROL));

    // Carol's KeyPackage claiming to be Alice passes the rule (same user) but not the
    // credential check: Carol's record is sponsored as carol.
    let carol_as_alice = {
        let d = &w.devices[CAROL];
        let me = Identity::new(&d.key).with_user(Some(w.address("alice")));
        me.key_package(&d.provider, false).expect("kp")
    };
    assert!(matches!(
        w.stage(ALICE, &Change { add: vec![carol_as_alice.clone().into()], ..Default::default() }),
        Err(ChannelError::Credential { .. })
    ));
    let forged =
        w.forge(ALICE, &Forge { add: vec![carol_as_alice], ..Default::default() }).expect("forge");
    all_refuse(w.judge(ALICE, &forged), |e| matches!(e, ChannelError::Credential { .. }));
    // Mallory's claims to be Alice too; no relay sponsors Mallory at all.
    let add = vec![w.devices[MALLORY].key_package().0];
    let forged = w.forge(ALICE, &Forge { add, ..Default::default() }).expect("forge");
    all_refuse(w.judge(ALICE, &forged), |e| matches!(e, ChannelError::Credential { .. }));
    assert!(!w.in_channel(BOB, CAROL) && !w.in_channel(BOB, MALLORY));

    // Alice may not remove Bob; she may remove her own second device.
    let remove = Change { remove: vec![bob], ..Default::default() };
    assert_eq!(w.stage(ALICE, &remove).err(), Some(ChannelError::NotAdmin));
    let forged = w.forge(ALICE, &Forge { remove: vec![bob], ..Default::default() }).expect("forge");
    all_refuse(w.judge(ALICE, &forged), |e| *e == ChannelError::NotAdmin);
    let staged =
        w.stage(ALICE, &Change { remove: vec![alice2], ..Default::default() }).expect("her own");
    w.submit_by(ALICE, &staged);
    assert!(!w.in_channel(BOB, ALICE2) && w.in_channel(BOB, ALICE));
}

#[test]
fn admin_rights_belong_to_the_user_not_to_one_device() {
    // Alice's user is the admin; her first device created the channel with Bob in it.
    let mut w = World::with_users(ALICE, "alice", &[BOB]);
    let add = vec![w.devices[ALICE2].key_package()];
    let staged = w.stage(ALICE, &Change { add, ..Default::default() }).expect("add");
    w.submit_by(ALICE, &staged);
    // Her second device, never named an admin, adds Carol and renames the channel.
    let alice2 = w.devices[ALICE2].id();
    assert!(w.devices[BOB].channel.as_ref().expect("member").is_admin_device(alice2));
    let mut config = config_of(&w, ALICE2);
    config.name = "renamed".into();
    let change = Change {
        add: vec![w.devices[CAROL].key_package()],
        config: Some(config),
        ..Default::default()
    };
    let staged = w.stage(ALICE2, &change).expect("an admin user's device");
    w.submit_by(ALICE2, &staged);
    assert!(w.in_channel(BOB, CAROL));
    assert_eq!(config_of(&w, BOB).name, "renamed");
    // Bob is no admin: he may not rename it back, forged or not.
    let mut config = config_of(&w, BOB);
    config.name = "bob's".into();
    let forged =
        w.forge(BOB, &Forge { config: Some(config), ..Default::default() }).expect("forge");
    all_refuse(w.judge(BOB, &forged), |e| *e == ChannelError::NotAdmin);
    // An admin set of no user is refused like an empty one of devices.
    let mut config = config_of(&w, ALICE);
    config.admins = AdminPolicy::Users(Default::default());
    let forged =
        w.forge(ALICE, &Forge { config: Some(config), ..Default::default() }).expect("forge");
    all_refuse(w.judge(ALICE, &forged), |e| matches!(e, ChannelError::ForbiddenConfig(_)));
}

#[test]
fn an_address_gives_nothing_in_a_relayless_channel() {
    let w = World::with_users(ALICE, "alice", &[]);
    let alice = w.devices[ALICE].me.user();
    let mut config = config_of(&w, ALICE);
    let kp = w.devices[ALICE2].key_package();
    let kp = KeyPackageIn::tls_deserialize_exact(&kp.0[..])
        .expect("kp")
        .validate(w.devices[ALICE2].provider.crypto(), ProtocolVersion::Mls10)
        .expect("valid");
    let credential = kp.leaf_node().credential();
    assert!(same_user(&config, &alice, credential));
    config.relays.clear();
    assert!(!same_user(&config, &alice, credential), "no relay vouches for the address");
    // A device alone is no user with other devices.
    let lone = UserId::Device(w.devices[ALICE].id());
    assert!(!same_user(&config_of(&w, ALICE), &lone, credential));
}

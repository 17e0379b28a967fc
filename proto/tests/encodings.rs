//! Property tests for every encoding: any value round-trips and re-encodes to the same bytes;
//! any byte string either fails to decode with a typed error or is the canonical encoding of the
//! value it decodes to.

use arbitrary::{Arbitrary, Unstructured};
use chitchat_proto::channel::{ChannelConfig, ChannelMessage, ChannelState};
use chitchat_proto::chat::ChatContent;
use chitchat_proto::codec::{Canonical, DecodeError, encode};
use chitchat_proto::identity::Revocation;
use chitchat_proto::inbox::SealedEnvelope;
use chitchat_proto::ordering::{EpochCert, Equivocation, OrderingCommand, OrderingState};
use chitchat_proto::pack::{InclusionProof, Pack};
use chitchat_proto::wire::{self, Request, Response, Validate};
use chitchat_proto::{Dir, Sponsorship};
use proptest::collection::vec;
use proptest::prelude::*;

fn round_trip<T>(seed: &[u8]) -> Result<(), TestCaseError>
where
    T: Canonical + for<'a> Arbitrary<'a> + PartialEq + std::fmt::Debug,
{
    let Ok(value) = T::arbitrary(&mut Unstructured::new(seed)) else {
        return Ok(());
    };
    let bytes = value.to_bytes();
    if bytes.len() > T::MAX_LEN {
        let too_large = matches!(T::from_bytes(&bytes), Err(DecodeError::TooLarge { .. }));
        prop_assert!(too_large, "an oversized encoding must be rejected as too large");
        return Ok(());
    }
    let back = T::from_bytes(&bytes).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    prop_assert_eq!(&back, &value);
    prop_assert_eq!(back.to_bytes(), bytes);
    Ok(())
}

fn any_bytes<T: Canonical>(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(value) = T::from_bytes(bytes) {
        prop_assert_eq!(value.to_bytes(), bytes, "accepted a non-canonical encoding");
    }
    Ok(())
}

fn frame_round_trip<T>(seed: &[u8]) -> Result<(), TestCaseError>
where
    T: serde::Serialize
        + serde::de::DeserializeOwned
        + Validate
        + for<'a> Arbitrary<'a>
        + PartialEq
        + std::fmt::Debug,
{
    let Ok(value) = T::arbitrary(&mut Unstructured::new(seed)) else {
        return Ok(());
    };
    let Ok(frame) = wire::encode_frame(&value) else {
        return Ok(());
    };
    match (value.validate(), wire::decode_frame::<T>(&frame)) {
        (Ok(()), Ok(back)) => prop_assert_eq!(back, value),
        (Err(why), Err(DecodeError::Invalid(got))) => prop_assert_eq!(why, got),
        (v, d) => prop_assert!(false, "validate {v:?} but decode {d:?}"),
    }
    Ok(())
}

fn frame_any_bytes<T>(bytes: &[u8]) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Validate,
{
    if let Ok(value) = wire::decode_frame::<T>(bytes) {
        prop_assert_eq!(wire::encode_frame(&value).ok(), Some(bytes.to_vec()));
    }
    Ok(())
}

macro_rules! canonical_props {
    ($($name:ident: $t:ty),* $(,)?) => {
        mod canonical {
            use super::*;
            proptest! {
                $(
                    #[test]
                    fn $name(seed in vec(any::<u8>(), 0..2048)) {
                        round_trip::<$t>(&seed)?;
                        any_bytes::<$t>(&seed)?;
                    }
                )*
            }
        }
    };
}

canonical_props! {
    dir: Dir,
    sponsorship: Sponsorship,
    revocation: Revocation,
    sealed_envelope: SealedEnvelope,
    epoch_cert: EpochCert,
    equivocation: Equivocation,
    ordering_command: OrderingCommand,
    ordering_state: OrderingState,
    pack: Pack,
    inclusion_proof: InclusionProof,
    chat_content: ChatContent,
    channel_config: ChannelConfig,
    channel_message: ChannelMessage,
    channel_state: ChannelState,
    inbox_payload: chitchat_proto::wire::InboxPayload,
    envelope: chitchat_proto::wire::Envelope,
    gossip_envelope: chitchat_proto::gossip::GossipEnvelope,
    link_hello: chitchat_proto::link::LinkHello,
    link_answer: chitchat_proto::link::LinkAnswer,
}

proptest! {
    /// A link code's text: any string is read or refused without a panic; what is read writes
    /// back to a text that reads the same; a code written reads back whole.
    #[test]
    fn link_codes(text in ".{0,300}", secret in any::<[u8; 32]>(), url in "[a-z0-9:/.]{1,64}") {
        use chitchat_proto::link::{LinkCode, LinkSecret};
        if let Ok(code) = LinkCode::parse(&text) {
            prop_assert_eq!(LinkCode::parse(&code.to_string()), Ok(code));
        }
        let mut rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed(secret);
        let code = LinkCode { relay_url: url, secret: LinkSecret::generate(&mut rng) };
        prop_assert_eq!(LinkCode::parse(&code.to_string()), Ok(code));
    }

    /// A recovery code's text reads back as the secret it came from, and any text is read or
    /// refused without a panic, a secret read writing back to the same secret.
    #[test]
    fn recovery_codes(text in ".{0,100}", seed in any::<[u8; 32]>()) {
        use chitchat_proto::identity::RecoverySecret;
        if let Ok(secret) = RecoverySecret::parse(&text) {
            prop_assert_eq!(RecoverySecret::parse(&secret.code().to_string()), Ok(secret));
        }
        let mut rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed(seed);
        let secret = RecoverySecret::generate(&mut rng);
        let code = secret.code().to_string();
        prop_assert_eq!(code.len(), 32);
        prop_assert_eq!(RecoverySecret::parse(&code.to_lowercase()), Ok(secret));
    }
}

proptest! {
    #[test]
    fn request_frames(seed in vec(any::<u8>(), 0..2048)) {
        frame_round_trip::<Request>(&seed)?;
        frame_any_bytes::<Request>(&seed)?;
    }

    #[test]
    fn response_frames(seed in vec(any::<u8>(), 0..2048)) {
        frame_round_trip::<Response>(&seed)?;
        frame_any_bytes::<Response>(&seed)?;
    }

    #[test]
    fn federation_frames(seed in vec(any::<u8>(), 0..2048)) {
        frame_round_trip::<chitchat_proto::federation::FedRequest>(&seed)?;
        frame_any_bytes::<chitchat_proto::federation::FedRequest>(&seed)?;
        frame_round_trip::<chitchat_proto::federation::FedResponse>(&seed)?;
        frame_any_bytes::<chitchat_proto::federation::FedResponse>(&seed)?;
    }

    #[test]
    fn peer_frames(seed in vec(any::<u8>(), 0..2048)) {
        frame_round_trip::<chitchat_proto::peer::PeerRequest>(&seed)?;
        frame_any_bytes::<chitchat_proto::peer::PeerRequest>(&seed)?;
        frame_round_trip::<chitchat_proto::peer::PeerResponse>(&seed)?;
        frame_any_bytes::<chitchat_proto::peer::PeerResponse>(&seed)?;
    }

    /// Valid frames with one byte changed still never decode to a non-canonical value.
    #[test]
    fn mutated_request_frames(seed in vec(any::<u8>(), 0..1024), at in any::<usize>(), x in any::<u8>()) {
        let Ok(value) = Request::arbitrary(&mut Unstructured::new(&seed)) else { return Ok(()) };
        let Ok(mut frame) = wire::encode_frame(&value) else { return Ok(()) };
        let i = at % frame.len();
        frame[i] ^= x;
        frame_any_bytes::<Request>(&frame)?;
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let cmd =
        OrderingCommand::Open { channel: chitchat_proto::ordering::ChannelId([1; 32]), epoch: 3 };
    let mut bytes = cmd.to_bytes();
    bytes.push(0);
    assert_eq!(OrderingCommand::from_bytes(&bytes), Err(DecodeError::TrailingBytes { count: 1 }));
}

#[test]
fn overlong_varint_is_rejected() {
    // epoch 3 as a two-byte varint (0x83 0x00) instead of 0x03.
    let cmd =
        OrderingCommand::Open { channel: chitchat_proto::ordering::ChannelId([1; 32]), epoch: 3 };
    let mut bytes = cmd.to_bytes();
    assert_eq!(bytes.pop(), Some(3));
    bytes.extend_from_slice(&[0x83, 0x00]);
    assert!(matches!(
        OrderingCommand::from_bytes(&bytes),
        Err(DecodeError::NonCanonical | DecodeError::Malformed(_))
    ));
}

#[test]
fn unsorted_set_is_rejected() {
    use chitchat_proto::identity::{DirBody, Profile};
    use chitchat_proto::{DeviceId, SecretKey, Timestamp};
    let key = SecretKey::from_seed([1; 32]);
    let a = DeviceId(SecretKey::from_seed([2; 32]).public());
    let b = DeviceId(SecretKey::from_seed([3; 32]).public());
    let body = DirBody {
        device: DeviceId(key.public()),
        seq: 1,
        inbox_key: [0; 32],
        linked: [a, b].into(),
        sponsorships: vec![],
        profile: Profile::default(),
        revoked: false,
        issued: Timestamp(0),
    };
    let dir = Dir::sign(&key, body);
    let bytes = dir.to_bytes();
    // Swap the two linked device ids in the encoding (each is a length byte and 32 key bytes).
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let pos = bytes.windows(32).position(|w| w == lo.as_bytes()).expect("first id");
    let mut swapped = bytes.clone();
    swapped[pos..pos + 32].copy_from_slice(hi.as_bytes());
    swapped[pos + 33..pos + 65].copy_from_slice(lo.as_bytes());
    assert_eq!(Dir::from_bytes(&swapped), Err(DecodeError::NonCanonical));
}

#[test]
fn bad_bool_is_rejected() {
    let msg = encode(&(7u8, true));
    let mut bad = msg.clone();
    bad[1] = 2;
    assert!(chitchat_proto::codec::decode::<(u8, bool)>(&bad, 16).is_err());
    assert_eq!(chitchat_proto::codec::decode::<(u8, bool)>(&msg, 16), Ok((7, true)));
}

#[test]
fn frame_limits_and_versions() {
    let req = Request::Fetch { after: None, max: 10 };
    let mut frame = wire::encode_frame(&req).expect("encode");
    assert_eq!(wire::decode_frame::<Request>(&frame), Ok(req));
    let other = wire::PROTOCOL_VERSION + 1;
    frame[0] = u8::try_from(other).expect("a one-byte varint");
    assert_eq!(
        wire::decode_frame::<Request>(&frame),
        Err(DecodeError::UnsupportedVersion { got: other, supported: wire::PROTOCOL_VERSION })
    );
    let huge = vec![0u8; wire::MAX_FRAME_LEN + 1];
    assert!(matches!(wire::decode_frame::<Request>(&huge), Err(DecodeError::TooLarge { .. })));
    let too_many = Request::Fetch { after: None, max: wire::MAX_FETCH_ITEMS + 1 };
    let frame = wire::encode_frame(&too_many).expect("encode");
    assert_eq!(
        wire::decode_frame::<Request>(&frame),
        Err(DecodeError::Invalid("fetch max too large"))
    );
    assert!(matches!(wire::decode_frame::<Request>(&[]), Err(DecodeError::Malformed(_))));
}

proptest! {
    /// A fetch answer's frame is its items' encodings plus at most `ITEMS_FRAME_OVERHEAD`
    /// bytes, for any items: the budget a relay counts is exact.
    #[test]
    fn items_frame_budget_is_exact(seed in vec(any::<u8>(), 0..8192), more in any::<bool>()) {
        let mut u = Unstructured::new(&seed);
        let Ok(items) = Vec::<wire::InboxItem>::arbitrary(&mut u) else { return Ok(()) };
        let items: Vec<_> = items.into_iter().take(wire::MAX_FETCH_ITEMS as usize).collect();
        for item in &items {
            prop_assert_eq!(item.encoded_len(), encode(item).len());
        }
        let sum: usize = items.iter().map(wire::InboxItem::encoded_len).sum();
        let frame = encode(&wire::PROTOCOL_VERSION).len()
            + encode(&Response::Items { items, more }).len();
        prop_assert!(frame <= sum + wire::ITEMS_FRAME_OVERHEAD, "{frame} > {sum} + overhead");
    }
}

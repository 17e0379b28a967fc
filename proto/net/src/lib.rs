//! ChitChat's libp2p host, shared by the node, the relay and the tests' clients: one way to
//! build a swarm (TCP, QUIC, WebSocket, DNS; Noise; yamux) around any behaviour, the codec that
//! carries `chitchat-proto` frames over request-response, the protocol names, and the libp2p
//! identity of a ChitChat key.
//!
//! It holds no protocol logic: what a frame means is `chitchat-proto`'s, what a peer does with
//! it is the node's or the relay's.

pub mod gossip;
mod tls;

pub use tls::Tls;

use std::time::Duration;

use chitchat_proto::wire::MAX_FRAME_LEN;
use chitchat_proto::{PublicKey, SecretKey};
use futures::{AsyncReadExt as _, AsyncWriteExt as _};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{StreamProtocol, Swarm, noise, relay, request_response, tcp, yamux};

/// The protocol devices speak to their relay.
pub const RELAY_PROTOCOL: &str = "/chitchat/relay/1";
/// The protocol nodes speak to each other directly (`chitchat_proto::peer`).
pub const PEER_PROTOCOL: &str = "/chitchat/peer/1";
/// The protocol relays speak among themselves.
pub use chitchat_proto::federation::FEDERATION_PROTOCOL;

/// Why a host could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The key is not a usable Ed25519 seed.
    #[error("key: {0}")]
    Key(String),
    /// A transport could not be set up.
    #[error("transport: {0}")]
    Transport(String),
}

/// The libp2p identity of a ChitChat key (the same Ed25519 seed): a relay's peer id is its
/// relay key, a node's is its device key.
pub fn keypair(key: &SecretKey) -> Result<libp2p::identity::Keypair, NetError> {
    let mut seed = *key.seed();
    libp2p::identity::Keypair::ed25519_from_bytes(&mut seed)
        .map_err(|e| NetError::Key(e.to_string()))
}

/// The peer id of a ChitChat public key (a device's or a relay's).
pub fn peer_id(key: &PublicKey) -> Result<libp2p::PeerId, NetError> {
    let key = libp2p::identity::ed25519::PublicKey::try_from_bytes(&key.0)
        .map_err(|e| NetError::Key(e.to_string()))?;
    Ok(libp2p::identity::PublicKey::from(key).to_peer_id())
}

/// The ChitChat key a peer id names, if it names an Ed25519 key (every ChitChat host's does).
pub fn public_key(peer: &libp2p::PeerId) -> Option<PublicKey> {
    let multihash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    // An identity multihash (code 0) holds the protobuf encoding of the key itself.
    if multihash.code() != 0 {
        return None;
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    Some(PublicKey(key.try_into_ed25519().ok()?.to_bytes()))
}

/// How a host's swarm behaves apart from its behaviour.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// How long a connection with no stream open stays up.
    pub idle_timeout: Duration,
    /// Open streams with multistream-select V1Lazy: the first request rides with the protocol
    /// proposal instead of waiting a round trip for the other side to confirm it (for a side
    /// that speaks one protocol per stream to peers known to speak it).
    pub lazy: bool,
    /// TLS for WebSocket (`/tls/ws`): a certificate to serve, roots to trust. Without it,
    /// WebSocket serves no TLS and trusts the web's roots.
    pub tls: Option<Tls>,
}

/// A swarm for `identity` on every transport ChitChat uses (TCP with `nodelay`, QUIC, DNS
/// names, WebSocket; Noise; yamux), around the behaviour `behaviour` makes. It dials no relay
/// circuit ([`swarm_with_relay_client`] does).
pub async fn swarm<B: NetworkBehaviour>(
    identity: libp2p::identity::Keypair,
    config: HostConfig,
    behaviour: impl FnOnce(&libp2p::identity::Keypair) -> B,
) -> Result<Swarm<B>, NetError> {
    // Without its behaviour, the circuit transport refuses every circuit address.
    swarm_with_relay_client(identity, config, |key, _circuits| behaviour(key)).await
}

/// [`swarm`], with circuits through relays too (circuit relay v2: `/p2p/RELAY/p2p-circuit`
/// addresses to listen on, reachable through a relay's reservation, and to dial): `behaviour`
/// gets the relay client's behaviour to compose.
pub async fn swarm_with_relay_client<B: NetworkBehaviour>(
    identity: libp2p::identity::Keypair,
    config: HostConfig,
    behaviour: impl FnOnce(&libp2p::identity::Keypair, relay::client::Behaviour) -> B,
) -> Result<Swarm<B>, NetError> {
    let transport = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    let swarm_config = |c: libp2p::swarm::Config| {
        let c = c.with_idle_connection_timeout(config.idle_timeout);
        if config.lazy {
            c.with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        } else {
            c
        }
    };
    if let Some(tls) = &config.tls {
        let swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
            .with_tokio()
            .with_other_transport(|key| {
                tls::transport(key, tls)
                    .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
            })
            .map_err(|e| transport(&e))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| transport(&e))?
            .with_behaviour(|key, circuits| behaviour(key, circuits))
            .map_err(|e| transport(&e))?
            .with_swarm_config(swarm_config)
            .build();
        return Ok(swarm);
    }
    let swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| transport(&e))?
        .with_quic()
        .with_dns()
        .map_err(|e| transport(&e))?
        .with_websocket(noise::Config::new, yamux::Config::default)
        .await
        .map_err(|e| transport(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport(&e))?
        .with_behaviour(|key, circuits| behaviour(key, circuits))
        .map_err(|e| transport(&e))?
        .with_swarm_config(swarm_config)
        .build();
    Ok(swarm)
}

/// A swarm for `identity` on libp2p's in-process memory transport only (Noise, yamux): many
/// hosts in one process, for tests and benchmarks (`/memory/N` addresses).
pub fn memory_swarm<B: NetworkBehaviour>(
    identity: libp2p::identity::Keypair,
    config: HostConfig,
    behaviour: impl FnOnce(&libp2p::identity::Keypair) -> B,
) -> Result<Swarm<B>, NetError> {
    use libp2p::Transport as _;
    let transport = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            Ok(libp2p::core::transport::MemoryTransport::default()
                .upgrade(libp2p::core::upgrade::Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default()))
        })
        .map_err(|e| transport(&e))?
        .with_behaviour(|key| behaviour(key))
        .map_err(|e| transport(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
        .build();
    Ok(swarm)
}

/// A request-response behaviour carrying frames of `protocol`, in the directions `support`
/// allows.
pub fn frames(
    protocol: &'static str,
    support: request_response::ProtocolSupport,
    config: request_response::Config,
) -> request_response::Behaviour<FrameCodec> {
    request_response::Behaviour::with_codec(
        FrameCodec,
        [(StreamProtocol::new(protocol), support)],
        config,
    )
}

/// A request-response codec whose messages are whole frames, read to the end of the stream.
/// A frame longer than [`MAX_FRAME_LEN`] is read one byte past the limit and handed on, so that
/// its decoder refuses it with a typed error the peer can be told (`FrameError::TooLong`).
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameCodec;

async fn read_frame<T: futures::AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    io.take(MAX_FRAME_LEN as u64 + 1).read_to_end(&mut buf).await?;
    Ok(buf)
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        io.write_all(&res).await?;
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use libp2p::request_response::Codec as _;

    use super::*;

    /// A frame is the whole stream; one past the limit is read (for a typed refusal), and no
    /// more: a peer cannot make a reader hold more than one frame's worth.
    #[tokio::test]
    async fn frames_are_read_whole_and_bounded() {
        let protocol = StreamProtocol::new(RELAY_PROTOCOL);
        let mut codec = FrameCodec;
        let mut wire = futures::io::Cursor::new(Vec::new());
        codec.write_request(&protocol, &mut wire, b"hello".to_vec()).await.expect("write");
        let mut read = futures::io::Cursor::new(wire.into_inner());
        assert_eq!(codec.read_request(&protocol, &mut read).await.expect("read"), b"hello");

        let huge = vec![7u8; MAX_FRAME_LEN + 4096];
        let mut read = futures::io::Cursor::new(huge);
        let got = codec.read_response(&protocol, &mut read).await.expect("read");
        assert_eq!(got.len(), MAX_FRAME_LEN + 1);
        assert!(
            chitchat_proto::wire::decode_frame::<chitchat_proto::wire::Response>(&got).is_err()
        );
    }

    /// A host's peer id is its ChitChat key.
    #[test]
    fn the_peer_id_is_the_key() {
        let key = SecretKey::from_seed([3; 32]);
        let id = keypair(&key).expect("keypair").public();
        let ed = id.try_into_ed25519().expect("ed25519");
        assert_eq!(ed.to_bytes(), key.public().0);
    }

    #[test]
    fn a_peer_id_names_its_key_and_back() {
        let key = SecretKey::from_seed([9; 32]);
        let peer = keypair(&key).expect("keypair").public().to_peer_id();
        assert_eq!(peer_id(&key.public()).expect("peer id"), peer);
        assert_eq!(public_key(&peer), Some(key.public()));
        // A peer id that is a hash of a key (not Ed25519's inline form) names no key here.
        assert_eq!(public_key(&libp2p::PeerId::random()), None);
    }
}

//! WebSocket with TLS (`/tls/ws` addresses): what a relay needs to listen on 443 with its own
//! certificate, and a node to reach a relay whose certificate the web's roots do not vouch for.
//!
//! libp2p's swarm builder gives WebSocket no server certificate, and places it outside the DNS
//! transport so that a `/dns4/HOST/tcp/443/tls/ws` address keeps its host name for TLS. With
//! [`Tls`] given, [`crate::swarm`] builds the transports itself in that same arrangement:
//! TCP and QUIC under DNS, and WebSocket over DNS and TCP, with this TLS configuration.

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport as _};
use libp2p::core::upgrade::Version;
use libp2p::{PeerId, dns, noise, quic, tcp, websocket, yamux};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::NetError;

/// TLS for WebSocket: a certificate to serve (a relay), and roots to trust beside the web's
/// (a node whose relay has a certificate of its own making).
#[derive(Clone, Debug, Default)]
pub struct Tls {
    /// The private key (DER, checked) and the certificate chain (DER), leaf first.
    server: Option<(Vec<u8>, Vec<Vec<u8>>)>,
    /// Extra trusted roots (DER).
    roots: Vec<Vec<u8>>,
}

impl Tls {
    /// Serves the certificate chain `chain` (PEM, leaf first) with `key` (PEM: PKCS#8, PKCS#1
    /// or SEC1).
    pub fn server_from_pem(chain: &[u8], key: &[u8]) -> Result<Self, NetError> {
        let bad =
            |what: &str, e: &dyn std::fmt::Display| NetError::Transport(format!("{what}: {e}"));
        let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(chain)
            .map(|c| c.map(|c| c.as_ref().to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| bad("TLS certificate", &e))?;
        if certs.is_empty() {
            return Err(NetError::Transport("TLS certificate: no certificate in the PEM".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("TLS key", &e))?;
        let der = key.secret_der().to_vec();
        // What libp2p's `PrivateKey::new` expects (it panics on anything else), then the key
        // and certificate as rustls takes them, so that a bad pair fails here, not at start.
        PrivateKeyDer::try_from(der.clone()).map_err(|e| bad("TLS key", &e))?;
        let tls = Self { server: Some((der, certs)), roots: Vec::new() };
        tls.websocket()?;
        Ok(tls)
    }

    /// Trusts the certificates of `pem` as roots too.
    pub fn trust_pem(mut self, pem: &[u8]) -> Result<Self, NetError> {
        for c in CertificateDer::pem_slice_iter(pem) {
            let c = c.map_err(|e| NetError::Transport(format!("TLS root: {e}")))?;
            self.roots.push(c.as_ref().to_vec());
        }
        Ok(self)
    }

    /// The websocket transport's TLS configuration.
    fn websocket(&self) -> Result<websocket::tls::Config, NetError> {
        let bad = |e: websocket::tls::Error| NetError::Transport(format!("TLS: {e}"));
        let mut b = websocket::tls::Config::builder();
        for root in &self.roots {
            b.add_trust(&websocket::tls::Certificate::new(root.clone())).map_err(bad)?;
        }
        if let Some((key, chain)) = &self.server {
            // Checked when read: `PrivateKey::new` would panic on a key it cannot parse.
            let key = websocket::tls::PrivateKey::new(key.clone());
            let chain = chain.iter().map(|c| websocket::tls::Certificate::new(c.clone()));
            b.server(key, chain).map_err(bad)?;
        }
        Ok(b.finish())
    }
}

/// TCP (nodelay) and QUIC under DNS, and WebSocket (with `tls`) over DNS and TCP; Noise and
/// yamux on the streams.
pub(crate) fn transport(
    key: &libp2p::identity::Keypair,
    tls: &Tls,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NetError> {
    let bad = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    let noise = || noise::Config::new(key).map_err(|e| bad(&e));
    let tcp_config = tcp::Config::default().nodelay(true);
    let tcp = tcp::tokio::Transport::new(tcp_config.clone())
        .upgrade(Version::V1Lazy)
        .authenticate(noise()?)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    let quic = quic::tokio::Transport::new(quic::Config::new(key))
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    let base =
        dns::tokio::Transport::system(tcp.or_transport(quic).map(|either, _| match either {
            futures::future::Either::Left(o) | futures::future::Either::Right(o) => o,
        }))
        .map_err(|e| bad(&e))?;
    let inner = dns::tokio::Transport::system(tcp::tokio::Transport::new(tcp_config))
        .map_err(|e| bad(&e))?;
    let mut ws = websocket::Config::new(inner);
    ws.set_tls_config(tls.websocket()?);
    let ws = ws
        .upgrade(Version::V1Lazy)
        .authenticate(noise()?)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    Ok(ws
        .or_transport(base)
        .map(|either, _| match either {
            futures::future::Either::Left(o) | futures::future::Either::Right(o) => o,
        })
        .boxed())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt as _;
    use libp2p::Multiaddr;
    use libp2p::swarm::{SwarmEvent, dummy};

    use super::*;
    use crate::HostConfig;

    async fn host(tls: Tls) -> libp2p::Swarm<dummy::Behaviour> {
        let config =
            HostConfig { idle_timeout: Duration::from_secs(30), lazy: false, tls: Some(tls) };
        let identity = libp2p::identity::Keypair::generate_ed25519();
        crate::swarm(identity, config, |_| dummy::Behaviour).await.expect("swarm")
    }

    /// Whether `client` connects to `server` (listening on `/tls/ws`) within a few seconds.
    async fn connects(
        server: &mut libp2p::Swarm<dummy::Behaviour>,
        client: &mut libp2p::Swarm<dummy::Behaviour>,
    ) -> bool {
        let addr: Multiaddr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
                break address;
            }
        };
        assert!(addr.to_string().contains("/tls/ws"), "{addr}");
        client.dial(addr).expect("dial");
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    _ = server.select_next_some() => {}
                    e = client.select_next_some() => match e {
                        SwarmEvent::ConnectionEstablished { .. } => return true,
                        SwarmEvent::OutgoingConnectionError { .. } => return false,
                        _ => {}
                    },
                }
            }
        })
        .await;
        r.unwrap_or(false)
    }

    /// A relay serves its own certificate on `/tls/ws`; a node that trusts it connects, one
    /// that does not (the web's roots only) is refused by its own TLS check.
    #[tokio::test]
    async fn websocket_with_tls_serves_its_certificate_to_those_who_trust_it() {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
        let (chain, key) = (cert.cert.pem(), cert.key_pair.serialize_pem());
        let server_tls = Tls::server_from_pem(chain.as_bytes(), key.as_bytes()).expect("server");
        let mut server = host(server_tls.clone()).await;
        server.listen_on("/ip4/127.0.0.1/tcp/0/tls/ws".parse().expect("addr")).expect("listen");
        let trusting = Tls::default().trust_pem(chain.as_bytes()).expect("root");
        let mut client = host(trusting).await;
        assert!(connects(&mut server, &mut client).await, "a client that trusts the certificate");

        let mut server = host(server_tls).await;
        server.listen_on("/ip4/127.0.0.1/tcp/0/tls/ws".parse().expect("addr")).expect("listen");
        let mut stranger = host(Tls::default()).await;
        assert!(!connects(&mut server, &mut stranger).await, "a client that does not trust it");
    }

    #[test]
    fn bad_pem_is_a_typed_error() {
        assert!(Tls::server_from_pem(b"", b"").is_err());
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let chain = cert.cert.pem();
        assert!(
            Tls::server_from_pem(
                chain.as_bytes(),
                b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n"
            )
            .is_err()
        );
        assert!(
            Tls::default()
                .trust_pem(b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n")
                .is_err()
        );
    }
}

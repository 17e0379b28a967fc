//! The node's configuration: `HOME/config.toml`, then `CHITCHAT_*` environment variables on top.
//! No secret is in it: the device key is in `node.redb`, the API token in `api.token`.

use serde::{Deserialize, Serialize};

/// Everything a node is configured with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The local API.
    #[serde(default)]
    pub api: ApiConfig,
    /// How the node talks to its relay.
    #[serde(default)]
    pub relay: RelayConfig,
    /// How messages are sent.
    #[serde(default)]
    pub send: SendConfig,
    /// How the node meets its peers.
    #[serde(default)]
    pub network: NetworkConfig,
    /// What this device tells peers about its user.
    #[serde(default)]
    pub profile: ProfileConfig,
    /// Files: where their blobs travel, and how large they may be.
    #[serde(default)]
    pub files: FilesConfig,
}

/// Files: the blob endpoint (iroh) and its limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// UDP addresses the blob endpoint binds (QUIC), `IP:PORT`; port 0 picks a free port.
    pub bind: Vec<String>,
    /// The largest file this device sends, in bytes.
    pub max_send_bytes: u64,
    /// The largest file this device fetches, in bytes (a message may name any size).
    pub max_fetch_bytes: u64,
    /// Bytes of fetched files kept, at most: past it, the least recently used fetched files
    /// are dropped (they can be fetched again). Files this device sent are not counted.
    pub cache_bytes: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            bind: vec!["0.0.0.0:0".into()],
            max_send_bytes: 16 << 30,
            max_fetch_bytes: 16 << 30,
            cache_bytes: 20 << 30,
        }
    }
}

impl FilesConfig {
    /// The addresses to bind, parsed (at least one, at most 8).
    pub fn bind_addrs(&self) -> Result<Vec<std::net::SocketAddr>, ConfigError> {
        chitchat_blobs::parse_bind(&self.bind)
            .map_err(|e| ConfigError::Invalid(format!("files.bind: {e}")))
    }
}

/// What this device tells peers about its user.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// The name peers on the local network see for a device registered at no relay (no one
    /// vouches for it). Once registered, the relay's name is used.
    pub name: String,
}

/// How the node meets its peers (the members of its channels, directly).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// libp2p addresses to listen on for peers; empty: listen nowhere (only dial out).
    pub listen: Vec<String>,
    /// Peers to dial at start: libp2p addresses ending in `/p2p/PEER_ID`.
    pub peers: Vec<String>,
    /// Talk to the relay alone (for networks where only the relay can be reached): dial no
    /// peer, listen nowhere, announce no address; gossip, inbox and history all go through
    /// the relay. `listen` is ignored; `peers` must be empty.
    pub relay_only: bool,
    /// PEM files of certificates to trust, beside the web's roots, for a relay's WebSocket with
    /// TLS (`/tls/ws`): a relay whose certificate is of its operator's own making.
    pub tls_roots: Vec<String>,
    /// Find peers on the local network by mDNS. Unset: on for a device registered at no relay
    /// (a LAN's only way to meet), off otherwise. Never for a relay-only node.
    pub mdns: Option<bool>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/0.0.0.0/udp/0/quic-v1".into(), "/ip4/0.0.0.0/tcp/0".into()],
            peers: Vec::new(),
            relay_only: false,
            tls_roots: Vec::new(),
            mdns: None,
        }
    }
}

impl NetworkConfig {
    /// Whether mDNS runs, for a device that is `registered` at a relay or not.
    pub fn mdns_on(&self, registered: bool) -> bool {
        !self.relay_only && self.mdns.unwrap_or(!registered)
    }

    /// The TLS roots to trust besides the web's, read (`None` when there are none).
    pub fn tls(&self) -> Result<Option<chitchat_net::Tls>, ConfigError> {
        if self.tls_roots.is_empty() {
            return Ok(None);
        }
        let mut tls = chitchat_net::Tls::default();
        for path in &self.tls_roots {
            let pem = std::fs::read(path)
                .map_err(|e| ConfigError::Invalid(format!("network.tls_roots {path:?}: {e}")))?;
            tls = tls
                .trust_pem(&pem)
                .map_err(|e| ConfigError::Invalid(format!("network.tls_roots {path:?}: {e}")))?;
        }
        Ok(Some(tls))
    }

    /// The listen addresses, parsed (none for a relay-only node).
    pub fn listen_addrs(&self) -> Result<Vec<libp2p::Multiaddr>, ConfigError> {
        let addrs = parse_addrs("network.listen", &self.listen)?;
        Ok(if self.relay_only { Vec::new() } else { addrs })
    }

    /// The peers' addresses, parsed; each names its peer.
    pub fn peer_addrs(&self) -> Result<Vec<libp2p::Multiaddr>, ConfigError> {
        if self.relay_only && !self.peers.is_empty() {
            return Err(ConfigError::Invalid(
                "network.peers: a relay-only node dials no peer".into(),
            ));
        }
        if self.peers.len() > 64 {
            return Err(ConfigError::Invalid("network.peers: at most 64 addresses".into()));
        }
        self.peers
            .iter()
            .map(|a| peer_addr(a).map_err(|e| ConfigError::Invalid(format!("network.peers {e}"))))
            .collect()
    }
}

/// A peer's libp2p address, which must name the peer (`/p2p/PEER_ID`); the error says why
/// not, starting with the address.
pub fn peer_addr(addr: &str) -> Result<libp2p::Multiaddr, String> {
    let parsed: libp2p::Multiaddr = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
    if !matches!(parsed.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
        return Err(format!("{addr:?}: the address must end in /p2p/PEER_ID"));
    }
    Ok(parsed)
}

fn parse_addrs(what: &str, addrs: &[String]) -> Result<Vec<libp2p::Multiaddr>, ConfigError> {
    if addrs.len() > 64 {
        return Err(ConfigError::Invalid(format!("{what}: at most 64 addresses")));
    }
    addrs
        .iter()
        .map(|a| a.parse().map_err(|e| ConfigError::Invalid(format!("{what} {a:?}: {e}"))))
        .collect()
}

/// How messages are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SendConfig {
    /// Let a message leave only after its commit, not while it is written. Slower (the disk's
    /// latency is added to every message); the gain is that a crash can never deliver a
    /// message this node did not store.
    pub commit_first: bool,
    /// Days a message is retried while the relay cannot be reached before it is given up
    /// (`failed`), 1..=3650. Only time gives a message up, never a number of attempts.
    pub give_up_after_days: u32,
}

impl Default for SendConfig {
    fn default() -> Self {
        Self { commit_first: false, give_up_after_days: 30 }
    }
}

/// The local API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `127.0.0.1:PORT` (or another loopback address; port 0 picks a free port, written to
    /// `run.json`), or `unix:PATH` for a Unix socket (relative paths are in the node directory).
    pub listen: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:0".into() }
    }
}

/// How the node talks to its relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// How long one live-push request waits at the relay for new items, in seconds (1..=60).
    pub wait_seconds: u32,
    /// How long one request to the relay may take, in seconds.
    pub request_timeout_seconds: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self { wait_seconds: 30, request_timeout_seconds: 20 }
    }
}

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML does not parse or has unknown keys.
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// The file `chitchat init` writes; it documents every setting.
    pub const TEMPLATE: &'static str = r#"# ChitChat node configuration. Environment variables override these values.

[api]
# Where the local API listens (env CHITCHAT_API_LISTEN). Either a loopback address,
# "127.0.0.1:PORT" (port 0 picks a free port; the daemon writes it to run.json), or
# "unix:PATH" for a Unix socket (a relative path is inside the node directory).
# Every request needs the token in api.token.
listen = "127.0.0.1:0"

[relay]
# How long one live-push request waits at the relay for new items, in seconds (1..=60).
wait_seconds = 30
# How long one request to the relay may take, in seconds.
request_timeout_seconds = 20

[send]
# A message leaves while its commit is written (after a crash, the node skips the ratchet
# generation it may have used). true: it leaves only once committed, which adds the disk's
# latency to every message, and a crash can never deliver a message this node did not store
# (env CHITCHAT_SEND_COMMIT_FIRST).
commit_first = false
# Days a message is retried while the relay cannot be reached, however long the outage, before
# it is given up and shown as failed (1..=3650). A message the relay refuses for good (this
# device is not a member, the message is malformed) fails at once, with the reason.
give_up_after_days = 30

[network]
# Where this node listens for its peers, as libp2p addresses (env CHITCHAT_NETWORK_LISTEN,
# comma-separated). Port 0 picks a free port. An empty list listens nowhere: peers reach the
# node through its relay (a circuit relay reservation).
listen = ["/ip4/0.0.0.0/udp/0/quic-v1", "/ip4/0.0.0.0/tcp/0"]
# Peers to connect to at start, as libp2p addresses ending in /p2p/PEER_ID
# (env CHITCHAT_NETWORK_PEERS, comma-separated).
peers = []
# Talk to the relay alone, for networks where nothing else can be reached (env
# CHITCHAT_NETWORK_RELAY_ONLY, or `chitchat daemon --relay-only`): the node dials no peer,
# listens nowhere (listen is ignored) and announces no address; gossip, inbox and history all go
# through the relay, over its WebSocket-with-TLS addresses if it has any (a relay on port 443,
# with its own certificate or behind a TLS reverse proxy), else over any of its TCP addresses.
relay_only = false
# PEM files of certificates to trust for a relay's WebSocket with TLS, besides the web's roots
# (env CHITCHAT_NETWORK_TLS_ROOTS, comma-separated).
tls_roots = []
# Find peers on the local network by mDNS (env CHITCHAT_NETWORK_MDNS, true or false). Unset, it
# is on for a device registered at no relay when the daemon starts (peers on a LAN meet that
# way) and off for a registered one; a relay-only node never runs it.
# mdns = true

[files]
# Where the blob endpoint (iroh, QUIC over UDP) binds, as IP:PORT (env CHITCHAT_FILES_BIND,
# comma-separated). Port 0 picks a free port. Members fetch the files this device sent from
# here; no iroh relay and no discovery service is ever used.
bind = ["0.0.0.0:0"]
# The largest file this device sends, and the largest it fetches, in bytes (16 GiB; env
# CHITCHAT_FILES_MAX_SEND_BYTES, CHITCHAT_FILES_MAX_FETCH_BYTES).
max_send_bytes = 17179869184
max_fetch_bytes = 17179869184
# Bytes of fetched files kept (20 GiB; env CHITCHAT_FILES_CACHE_BYTES): past it, the least
# recently used fetched files are dropped, to be fetched again when asked for. Files this device
# sent are never dropped: it is their source.
cache_bytes = 21474836480

[profile]
# The name peers on the local network see while this device is registered at no relay (env
# CHITCHAT_PROFILE_NAME). No relay vouches for it: peers show it as unverified.
name = ""
"#;

    /// Parses and validates a config file's text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Applies `CHITCHAT_API_LISTEN`, `CHITCHAT_SEND_COMMIT_FIRST`, `CHITCHAT_FILES_*` and
    /// `CHITCHAT_NETWORK_RELAY_ONLY` (`true` or `false`), `CHITCHAT_NETWORK_LISTEN` and
    /// `CHITCHAT_NETWORK_PEERS` (comma-separated addresses).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = var("CHITCHAT_API_LISTEN") {
            self.api.listen = v;
        }
        let list = |v: String| -> Vec<String> {
            v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
        };
        if let Some(v) = var("CHITCHAT_NETWORK_LISTEN") {
            self.network.listen = list(v);
        }
        if let Some(v) = var("CHITCHAT_NETWORK_PEERS") {
            self.network.peers = list(v);
        }
        if let Some(v) = var("CHITCHAT_NETWORK_TLS_ROOTS") {
            self.network.tls_roots = list(v);
        }
        if let Some(v) = var("CHITCHAT_NETWORK_MDNS") {
            self.network.mdns = Some(v.parse().map_err(|_| {
                ConfigError::Invalid(format!("CHITCHAT_NETWORK_MDNS={v:?}: expected true or false"))
            })?);
        }
        if let Some(v) = var("CHITCHAT_FILES_BIND") {
            self.files.bind = list(v);
        }
        let bytes = |k: &str, v: String| {
            v.parse::<u64>().map_err(|_| ConfigError::Invalid(format!("{k}={v:?}: expected bytes")))
        };
        if let Some(v) = var("CHITCHAT_FILES_MAX_SEND_BYTES") {
            self.files.max_send_bytes = bytes("CHITCHAT_FILES_MAX_SEND_BYTES", v)?;
        }
        if let Some(v) = var("CHITCHAT_FILES_MAX_FETCH_BYTES") {
            self.files.max_fetch_bytes = bytes("CHITCHAT_FILES_MAX_FETCH_BYTES", v)?;
        }
        if let Some(v) = var("CHITCHAT_FILES_CACHE_BYTES") {
            self.files.cache_bytes = bytes("CHITCHAT_FILES_CACHE_BYTES", v)?;
        }
        if let Some(v) = var("CHITCHAT_PROFILE_NAME") {
            self.profile.name = v;
        }
        if let Some(v) = var("CHITCHAT_NETWORK_RELAY_ONLY") {
            self.network.relay_only = v.parse().map_err(|_| {
                ConfigError::Invalid(format!(
                    "CHITCHAT_NETWORK_RELAY_ONLY={v:?}: expected true or false"
                ))
            })?;
        }
        if let Some(v) = var("CHITCHAT_SEND_COMMIT_FIRST") {
            self.send.commit_first = v.parse().map_err(|_| {
                ConfigError::Invalid(format!(
                    "CHITCHAT_SEND_COMMIT_FIRST={v:?}: expected true or false"
                ))
            })?;
        }
        self.validate()
    }

    /// Checks values that TOML cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match ApiListen::parse(&self.api.listen) {
            Some(ApiListen::Tcp(addr)) if !addr.ip().is_loopback() => {
                return Err(ConfigError::Invalid(format!(
                    "api.listen {addr}: the local API listens on loopback only"
                )));
            }
            Some(_) => {}
            None => {
                return Err(ConfigError::Invalid(format!(
                    "api.listen {:?}: expected 127.0.0.1:PORT or unix:PATH",
                    self.api.listen
                )));
            }
        }
        self.network.listen_addrs()?;
        self.network.peer_addrs()?;
        self.files.bind_addrs()?;
        let max = chitchat_proto::file::MAX_FILE_LEN;
        if self.files.max_send_bytes > max || self.files.max_fetch_bytes > max {
            return Err(ConfigError::Invalid(format!(
                "files.max_send_bytes and files.max_fetch_bytes are at most {max}"
            )));
        }
        if self.network.relay_only && self.network.mdns == Some(true) {
            return Err(ConfigError::Invalid(
                "network.mdns: a relay-only node looks for no peer on the local network".into(),
            ));
        }
        let name = &self.profile.name;
        if name.len() > chitchat_proto::identity::MAX_DISPLAY_NAME_LEN
            || name.chars().any(char::is_control)
        {
            return Err(ConfigError::Invalid(format!(
                "profile.name {name:?}: at most {} bytes, no control characters",
                chitchat_proto::identity::MAX_DISPLAY_NAME_LEN
            )));
        }
        if !(1..=3650).contains(&self.send.give_up_after_days) {
            return Err(ConfigError::Invalid("send.give_up_after_days must be 1..=3650".into()));
        }
        if !(1..=60).contains(&self.relay.wait_seconds) {
            return Err(ConfigError::Invalid("relay.wait_seconds must be 1..=60".into()));
        }
        if !(1..=600).contains(&self.relay.request_timeout_seconds) {
            return Err(ConfigError::Invalid(
                "relay.request_timeout_seconds must be 1..=600".into(),
            ));
        }
        Ok(())
    }
}

/// Where the local API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiListen {
    /// A TCP address on loopback.
    Tcp(std::net::SocketAddr),
    /// A Unix socket.
    Unix(std::path::PathBuf),
}

impl ApiListen {
    /// Parses `HOST:PORT` or `unix:PATH`.
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(path) = s.strip_prefix("unix:") {
            return (!path.is_empty()).then(|| Self::Unix(path.into()));
        }
        s.parse().ok().map(Self::Tcp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_to_defaults() {
        let c = Config::parse(Config::TEMPLATE).expect("template");
        assert_eq!(
            c,
            Config {
                api: ApiConfig::default(),
                relay: RelayConfig::default(),
                send: SendConfig { commit_first: false, give_up_after_days: 30 },
                network: NetworkConfig::default(),
                profile: ProfileConfig::default(),
                files: FilesConfig::default(),
            }
        );
    }

    #[test]
    fn file_settings_are_checked() {
        let c = Config::parse("").expect("defaults");
        assert_eq!(c.files.bind_addrs().expect("bind"), ["0.0.0.0:0".parse().expect("addr")]);
        let bad = Config::parse("[files]\nbind = [\"udp:7000\"]\n");
        assert!(matches!(bad, Err(ConfigError::Invalid(m)) if m.contains("files.bind")));
        let none = Config::parse("[files]\nbind = []\n");
        assert!(matches!(none, Err(ConfigError::Invalid(m)) if m.contains("files.bind")));
        let huge = Config::parse("[files]\nmax_send_bytes = 999999999999999999\n");
        assert!(matches!(huge, Err(ConfigError::Invalid(m)) if m.contains("max_send_bytes")));
        let mut c = Config::parse("").expect("defaults");
        c.apply_env(|k| (k == "CHITCHAT_FILES_BIND").then(|| "127.0.0.1:0".into())).expect("env");
        assert_eq!(c.files.bind, ["127.0.0.1:0"]);
    }

    /// mDNS follows the registration unless set; never for a relay-only node; the profile
    /// name is bounded.
    #[test]
    fn mdns_and_the_profile_name_are_checked() {
        let c = Config::parse("").expect("defaults");
        assert!(c.network.mdns_on(false), "on for a device registered nowhere");
        assert!(!c.network.mdns_on(true), "off once registered");
        let on = Config::parse("[network]\nmdns = true\n").expect("file");
        assert!(on.network.mdns_on(true));
        let bad = Config::parse("[network]\nmdns = true\nrelay_only = true\n");
        assert!(matches!(bad, Err(ConfigError::Invalid(m)) if m.contains("relay-only")));
        let only = Config::parse("[network]\nrelay_only = true\n").expect("file");
        assert!(!only.network.mdns_on(false), "a relay-only node never runs mDNS");
        let mut c = Config::parse("").expect("defaults");
        c.apply_env(|k| (k == "CHITCHAT_NETWORK_MDNS").then(|| "false".to_owned())).expect("env");
        assert!(!c.network.mdns_on(false));
        let long = format!("[profile]\nname = \"{}\"\n", "x".repeat(200));
        assert!(
            matches!(Config::parse(&long), Err(ConfigError::Invalid(m)) if m.contains("profile.name"))
        );
        let mut c = Config::parse("").expect("defaults");
        let bad = c.apply_env(|k| (k == "CHITCHAT_PROFILE_NAME").then(|| "a\u{7}b".to_owned()));
        assert!(bad.is_err(), "control characters refused");
    }

    #[test]
    fn commit_first_from_the_file_and_the_environment() {
        let c = Config::parse("[send]\ncommit_first = true\n").expect("file");
        assert!(c.send.commit_first);
        let mut c = Config::parse("").expect("defaults");
        c.apply_env(|k| (k == "CHITCHAT_SEND_COMMIT_FIRST").then(|| "true".to_owned()))
            .expect("env");
        assert!(c.send.commit_first);
        let bad = c.apply_env(|k| (k == "CHITCHAT_SEND_COMMIT_FIRST").then(|| "yes".to_owned()));
        assert!(matches!(bad, Err(ConfigError::Invalid(m)) if m.contains("true or false")));
    }

    /// Addresses that do not parse, or a peer that names no peer id, are refused with the
    /// setting's name; the environment's comma-separated lists replace the file's.
    #[test]
    fn network_addresses_are_checked() {
        let bad = Config::parse("[network]\nlisten = [\"tcp:7000\"]\n");
        assert!(matches!(bad, Err(ConfigError::Invalid(m)) if m.contains("network.listen")));
        let anonymous = Config::parse("[network]\npeers = [\"/ip4/127.0.0.1/tcp/7000\"]\n");
        assert!(matches!(anonymous, Err(ConfigError::Invalid(m)) if m.contains("/p2p/")));
        // A circuit through a relay names the relay, not the peer at its end.
        let relay =
            "/ip4/127.0.0.1/tcp/7000/p2p/12D3KooWEBrj8e9SBj9UVkLAJeaN9etRcsaxy7RMz9CKeEz3PxA9";
        let circuit = Config::parse(&format!("[network]\npeers = [\"{relay}/p2p-circuit\"]\n"));
        assert!(matches!(circuit, Err(ConfigError::Invalid(m)) if m.contains("/p2p/")));
        let to_peer =
            format!("{relay}/p2p-circuit/p2p/12D3KooWEBrj8e9SBj9UVkLAJeaN9etRcsaxy7RMz9CKeEz3PxA9");
        Config::parse(&format!("[network]\npeers = [\"{to_peer}\"]\n"))
            .expect("a circuit to a peer");
        let mut c = Config::parse("").expect("defaults");
        c.apply_env(|k| (k == "CHITCHAT_NETWORK_LISTEN").then(|| "/ip4/127.0.0.1/tcp/0, ".into()))
            .expect("env");
        assert_eq!(c.network.listen, ["/ip4/127.0.0.1/tcp/0"]);
        c.apply_env(|k| (k == "CHITCHAT_NETWORK_LISTEN").then(String::new)).expect("empty");
        assert!(c.network.listen.is_empty(), "an empty list listens nowhere");
        // Relay-only: the listen addresses are ignored, and a peer to dial is a contradiction.
        let c = Config::parse("[network]\nrelay_only = true\n").expect("relay-only");
        assert!(c.network.listen_addrs().expect("addrs").is_empty());
        let both = "[network]\nrelay_only = true\npeers = [\"/ip4/127.0.0.1/tcp/1/p2p/12D3KooWEBrj8e9SBj9UVkLAJeaN9etRcsaxy7RMz9CKeEz3PxA9\"]\n";
        assert!(
            matches!(Config::parse(both), Err(ConfigError::Invalid(m)) if m.contains("relay-only"))
        );
    }

    #[test]
    fn refuses_public_api_and_unknown_keys() {
        let public = "[api]\nlisten = \"0.0.0.0:7000\"\n";
        assert!(matches!(Config::parse(public), Err(ConfigError::Invalid(_))));
        assert!(matches!(Config::parse("[api]\nport = 1\n"), Err(ConfigError::Parse(_))));
        let mut c = Config::parse("").expect("empty is defaults");
        let env = |k: &str| (k == "CHITCHAT_API_LISTEN").then(|| "unix:api.sock".to_owned());
        c.apply_env(env).expect("unix socket");
        assert_eq!(ApiListen::parse(&c.api.listen), Some(ApiListen::Unix("api.sock".into())));
    }
}

//! The relay's configuration: `DIR/config.toml`, then environment variables on top.
//!
//! `chitchat-relay init` writes [`TEMPLATE`], which documents every setting. The relay's secret
//! key is never in the config: it is `DIR/relay.key` (hex seed, mode 0600), and the admin token
//! is `DIR/admin.token`.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Everything a relay is configured with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The host name in users' addresses (`alice@HOST`) and in sponsorships.
    pub host: String,
    /// libp2p listen addresses (multiaddrs).
    pub listen: Vec<String>,
    /// Addresses to publish in `.well-known`; empty publishes the listen addresses.
    #[serde(default)]
    pub advertise: Vec<String>,
    /// HTTP address for `.well-known`, `/health`, `/metrics` and the admin API.
    pub http: SocketAddr,
    /// Whether devices may register without an invite token.
    #[serde(default)]
    pub open_registration: bool,
    /// How long a sponsorship is valid, in days.
    #[serde(default = "defaults::sponsorship_days")]
    pub sponsorship_days: u64,
    /// How long an invite token is valid, in days.
    #[serde(default = "defaults::token_days")]
    pub token_days: u64,
    /// Inbox limits.
    #[serde(default)]
    pub inbox: InboxConfig,
    /// Channels' histories: what is kept, and for how long.
    #[serde(default)]
    pub history: HistoryConfig,
    /// The relay's own certificate for WebSocket with TLS.
    #[serde(default)]
    pub tls: TlsConfig,
    /// KeyPackage limits.
    #[serde(default)]
    pub key_packages: KeyPackageConfig,
    /// Commit ordering limits.
    #[serde(default)]
    pub ordering: OrderingConfig,
    /// Connection limits.
    #[serde(default)]
    pub network: NetworkConfig,
    /// Other relays: discovery, limits, the forwarding queues.
    #[serde(default)]
    pub federation: FederationConfig,
    /// Writes batched into one transaction, at most.
    #[serde(default = "defaults::max_batch")]
    pub max_batch: usize,
    /// Files' blobs pinned for members: where they travel, how large, for how long.
    #[serde(default)]
    pub files: FilesConfig,
}

/// Files' blobs pinned here for the members of the channels this relay serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// UDP addresses the blob endpoint (iroh, QUIC) binds, `IP:PORT`.
    pub bind: Vec<String>,
    /// Where others reach the blob endpoint, `IP:PORT` (behind NAT or a port mapping); if
    /// empty, the addresses it binds (an unspecified one: each interface's).
    pub advertise: Vec<String>,
    /// The largest blob pinned, in bytes.
    pub max_file_bytes: u64,
    /// Bytes of pinned blobs per user, at most.
    pub quota_bytes_per_user: u64,
    /// Days a blob stays pinned.
    pub expiry_days: u64,
    /// Bytes of blobs replicated here from one other relay of a channel, at most.
    pub replica_quota_bytes_per_relay: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            bind: vec!["0.0.0.0:0".into()],
            advertise: Vec::new(),
            max_file_bytes: 2 << 30,
            quota_bytes_per_user: 10 << 30,
            expiry_days: 30,
            replica_quota_bytes_per_relay: 100 << 30,
        }
    }
}

impl FilesConfig {
    /// The addresses to bind, parsed (1 to 8).
    pub fn bind_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        chitchat_blobs::parse_bind(&self.bind)
            .map_err(|e| ConfigError::Invalid(format!("files.bind: {e}")))
    }

    /// The addresses to advertise, parsed (none, or 1 to 8).
    pub fn advertise_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        if self.advertise.is_empty() {
            return Ok(Vec::new());
        }
        chitchat_blobs::parse_bind(&self.advertise)
            .map_err(|e| ConfigError::Invalid(format!("files.advertise: {e}")))
    }
}

/// Inbox limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboxConfig {
    /// Items one inbox holds.
    pub max_items: u64,
    /// Bytes one inbox holds.
    pub max_bytes: u64,
    /// Days an unacknowledged item is kept.
    pub retention_days: u64,
    /// Enqueues one sender may make per minute.
    pub sender_per_minute: u32,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self { max_items: 10_000, max_bytes: 64 << 20, retention_days: 30, sender_per_minute: 6000 }
    }
}

/// The relay's own certificate, served on its `/tls/ws` listen addresses (WebSocket with TLS,
/// for instance on port 443 for nodes that can reach nothing else). Paths are relative to the
/// relay directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The certificate chain, PEM, leaf first.
    pub certificate: Option<std::path::PathBuf>,
    /// Its private key, PEM.
    pub key: Option<std::path::PathBuf>,
}

impl TlsConfig {
    /// The TLS configuration to serve, if a certificate and key are set (read and checked).
    pub fn load(&self) -> Result<Option<chitchat_net::Tls>, ConfigError> {
        let (Some(cert), Some(key)) = (&self.certificate, &self.key) else {
            return Ok(None);
        };
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|source| ConfigError::Read { path: p.display().to_string(), source })
        };
        chitchat_net::Tls::server_from_pem(&read(cert)?, &read(key)?)
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("tls: {e}")))
    }
}

/// What the relay keeps of each channel it serves (the posts and commits it fans out, for
/// members whose inbox missed them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Days an entry is kept.
    pub retention_days: u64,
    /// Entries kept per channel (0 keeps no history); past it, the oldest go.
    pub max_entries_per_channel: u64,
    /// Bytes kept per channel; past it, the oldest entries go.
    pub max_bytes_per_channel: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            retention_days: 30,
            max_entries_per_channel: 100_000,
            max_bytes_per_channel: 256 << 20,
        }
    }
}

impl HistoryConfig {
    /// The bounds of each channel's history, if one is kept.
    pub fn limits(&self) -> Option<crate::store::HistoryLimits> {
        (self.max_entries_per_channel > 0 && self.retention_days > 0).then_some(
            crate::store::HistoryLimits {
                max_entries: self.max_entries_per_channel,
                max_bytes: self.max_bytes_per_channel,
            },
        )
    }
}

/// KeyPackage limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyPackageConfig {
    /// Unclaimed packages one device may store.
    pub max_per_device: u64,
    /// Claims one device may make per minute.
    pub claims_per_requester_per_minute: u32,
    /// Claims of one device's packages per minute.
    pub claims_per_target_per_minute: u32,
}

impl Default for KeyPackageConfig {
    fn default() -> Self {
        Self {
            max_per_device: 200,
            claims_per_requester_per_minute: 120,
            claims_per_target_per_minute: 60,
        }
    }
}

/// Commit ordering limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrderingConfig {
    /// Commits one device may submit per minute; beyond, `RateLimited` (a device that proposes
    /// too often is slowed down, so it cannot starve the others of epochs).
    pub submits_per_minute: u32,
    /// Channels one device may open per hour (each costs the relay memory until restart and
    /// room in every snapshot).
    pub opens_per_hour: u32,
    /// Largest public state (GroupInfo and ratchet tree) a channel may be opened with, in bytes.
    pub max_open_state_bytes: usize,
    /// The ordering state all channels together may hold, in bytes: their public MLS state
    /// and room for the winners each remembers (about 6 KiB for a two-member channel). Once
    /// reached, new channels and commits that add members are refused until removals make
    /// room. The state, in memory and in each snapshot, stays under it plus one commit. At most
    /// 768 MiB.
    pub max_state_bytes: u64,
    /// Ordered commits between two snapshots of the ordering state (a restart reads the last
    /// snapshot and re-applies at most this many).
    pub snapshot_every: u64,
}

impl Default for OrderingConfig {
    fn default() -> Self {
        Self {
            submits_per_minute: 60,
            opens_per_hour: 60,
            max_open_state_bytes: 256 * 1024,
            max_state_bytes: chitchat_proto::ordering::DEFAULT_STATE_BUDGET,
            snapshot_every: 10_000,
        }
    }
}

/// Connection limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Established connections in all.
    pub max_connections: u32,
    /// Established connections from one peer.
    pub max_connections_per_peer: u32,
    /// Incoming connections still in their handshake.
    pub max_pending_incoming: u32,
    /// Requests a minute that need no registered device (challenge, authenticate, register,
    /// look-ups), and every request of a peer not yet authenticated, from one IP address.
    pub anonymous_per_minute_per_ip: u32,
    /// The same, from one libp2p peer.
    pub anonymous_per_minute_per_peer: u32,
    /// Peers' registrations the rendezvous point keeps (a peer announcing its addresses under
    /// a channel's gossip topic, so that the channel's other members find it), in all.
    pub max_rendezvous_registrations: u32,
    /// The same, for one peer (one registration per channel it is in).
    pub max_rendezvous_registrations_per_peer: u32,
    /// Circuit relay v2: reservations held at once (a node reachable through this relay), and
    /// circuits open at once (a connection between two peers through this relay, each at
    /// most 2 minutes and 1 MiB: long enough for the peers to connect directly).
    pub max_reservations: u32,
    /// See `max_reservations`.
    pub max_circuits: u32,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_peer: 8,
            max_pending_incoming: 512,
            anonymous_per_minute_per_ip: 1200,
            anonymous_per_minute_per_peer: 240,
            max_rendezvous_registrations: 100_000,
            max_rendezvous_registrations_per_peer: 1024,
            max_reservations: 10_000,
            max_circuits: 1024,
        }
    }
}

/// Federation: how other relays are found and what they may ask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Read other relays' `.well-known` over plain HTTP even when they are not on loopback
    /// (a private network, tests). Loopback hosts are always read over HTTP, others over HTTPS.
    pub allow_http: bool,
    /// Requests a minute one other relay may make here.
    pub requests_per_minute_per_relay: u32,
    /// Payloads queued for one relay, at most.
    pub max_queue_items: u64,
    /// Bytes queued for one relay, at most.
    pub max_queue_bytes: u64,
    /// Payloads queued for all relays together, at most.
    pub max_queued_total: u64,
    /// Relays known without asking their `.well-known` (it is not read for them).
    pub relays: Vec<PinnedRelay>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            allow_http: false,
            requests_per_minute_per_relay: 6000,
            max_queue_items: 100_000,
            max_queue_bytes: 256 << 20,
            max_queued_total: 1_000_000,
            relays: Vec::new(),
        }
    }
}

/// A relay the operator configured by hand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedRelay {
    /// Its host name.
    pub host: String,
    /// Its Ed25519 key, hex.
    pub key: String,
    /// Addresses to dial (multiaddrs).
    pub addrs: Vec<String>,
}

mod defaults {
    pub(super) fn sponsorship_days() -> u64 {
        365
    }
    pub(super) fn token_days() -> u64 {
        7
    }
    pub(super) fn max_batch() -> usize {
        1024
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The error.
        source: Box<toml::de::Error>,
    },
    /// An environment variable or value is invalid.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// The defaults for `host`, as `init` writes them.
    pub fn new(host: &str) -> Self {
        Self {
            host: host.to_owned(),
            listen: vec![
                "/ip4/0.0.0.0/tcp/4433".into(),
                "/ip4/0.0.0.0/udp/4433/quic-v1".into(),
                "/ip4/0.0.0.0/tcp/4434/ws".into(),
            ],
            advertise: vec![],
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            open_registration: false,
            sponsorship_days: defaults::sponsorship_days(),
            token_days: defaults::token_days(),
            inbox: InboxConfig::default(),
            history: HistoryConfig::default(),
            tls: TlsConfig::default(),
            key_packages: KeyPackageConfig::default(),
            ordering: OrderingConfig::default(),
            network: NetworkConfig::default(),
            federation: FederationConfig::default(),
            max_batch: defaults::max_batch(),
            files: FilesConfig::default(),
        }
    }

    /// Reads `path`, then applies `CHITCHAT_RELAY_*` environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let mut config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })?;
        config.apply_env(|k| std::env::var(k).ok())?;
        // TLS files are named relative to the relay directory.
        if let Some(dir) = path.parent() {
            for p in [&mut config.tls.certificate, &mut config.tls.key].into_iter().flatten() {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Applies overrides: `CHITCHAT_RELAY_HOST`, `_LISTEN` (comma-separated), `_ADVERTISE`,
    /// `_HTTP`, `_OPEN_REGISTRATION` (`true`/`false`).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let list = |v: String| {
            v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
        };
        if let Some(v) = var("CHITCHAT_RELAY_HOST") {
            self.host = v;
        }
        if let Some(v) = var("CHITCHAT_RELAY_LISTEN") {
            self.listen = list(v);
        }
        if let Some(v) = var("CHITCHAT_RELAY_ADVERTISE") {
            self.advertise = list(v);
        }
        if let Some(v) = var("CHITCHAT_RELAY_HTTP") {
            self.http =
                v.parse().map_err(|e| ConfigError::Invalid(format!("CHITCHAT_RELAY_HTTP: {e}")))?;
        }
        if let Some(v) = var("CHITCHAT_RELAY_FILES_BIND") {
            self.files.bind = list(v);
        }
        if let Some(v) = var("CHITCHAT_RELAY_OPEN_REGISTRATION") {
            self.open_registration = v.parse().map_err(|e| {
                ConfigError::Invalid(format!("CHITCHAT_RELAY_OPEN_REGISTRATION: {e}"))
            })?;
        }
        Ok(())
    }

    /// Checks values that TOML cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        chitchat_proto::identity::check_host(&self.host)
            .map_err(|e| ConfigError::Invalid(format!("host {:?}: {e}", self.host)))?;
        if self.listen.is_empty() {
            return Err(ConfigError::Invalid("no listen address".into()));
        }
        self.files.bind_addrs()?;
        if !(1..=3650).contains(&self.files.expiry_days) {
            return Err(ConfigError::Invalid("files.expiry_days must be 1..=3650".into()));
        }
        if self.tls.certificate.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "tls: set both certificate and key, or neither".into(),
            ));
        }
        let tls_listen = self.listen.iter().find(|a| a.contains("/tls/ws") || a.contains("/wss"));
        if let (Some(a), None) = (tls_listen, &self.tls.certificate) {
            return Err(ConfigError::Invalid(format!(
                "listen address {a:?} serves TLS: set [tls] certificate and key"
            )));
        }
        for a in self.listen.iter().chain(&self.advertise) {
            a.parse::<libp2p::Multiaddr>()
                .map_err(|e| ConfigError::Invalid(format!("address {a:?}: {e}")))?;
        }
        if self.max_batch == 0 || self.inbox.max_items == 0 || self.inbox.sender_per_minute == 0 {
            return Err(ConfigError::Invalid("limits must be positive".into()));
        }
        if self.ordering.opens_per_hour == 0 {
            return Err(ConfigError::Invalid("opens_per_hour must be positive".into()));
        }
        if self.ordering.max_state_bytes > crate::ordering::MAX_STATE_BUDGET {
            return Err(ConfigError::Invalid(format!(
                "max_state_bytes may be at most {}",
                crate::ordering::MAX_STATE_BUDGET
            )));
        }
        if self.ordering.snapshot_every == 0 {
            return Err(ConfigError::Invalid("snapshot_every must be positive".into()));
        }
        if self.ordering.submits_per_minute == 0 {
            return Err(ConfigError::Invalid("submits_per_minute must be positive".into()));
        }
        let f = &self.federation;
        if f.requests_per_minute_per_relay == 0
            || f.max_queue_items == 0
            || f.max_queue_bytes == 0
            || f.max_queued_total == 0
        {
            return Err(ConfigError::Invalid("federation limits must be positive".into()));
        }
        for r in &f.relays {
            chitchat_proto::identity::check_host(&r.host)
                .map_err(|e| ConfigError::Invalid(format!("federation relay {:?}: {e}", r.host)))?;
            chitchat_proto::PublicKey::from_hex(&r.key).ok_or_else(|| {
                ConfigError::Invalid(format!("federation relay {}: bad key", r.host))
            })?;
            if r.addrs.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "federation relay {}: no address",
                    r.host
                )));
            }
            for a in &r.addrs {
                a.parse::<libp2p::Multiaddr>()
                    .map_err(|e| ConfigError::Invalid(format!("address {a:?}: {e}")))?;
            }
        }
        if self.key_packages.claims_per_requester_per_minute == 0
            || self.key_packages.claims_per_target_per_minute == 0
        {
            return Err(ConfigError::Invalid("claim rates must be positive".into()));
        }
        Ok(())
    }

    /// The config file `init` writes: the template with the host filled in.
    pub fn template(host: &str) -> String {
        TEMPLATE.replace("{host}", host)
    }
}

/// The documented config file written by `chitchat-relay init`.
pub const TEMPLATE: &str = r#"# ChitChat relay configuration.
# Every setting can be overridden by an environment variable, named below.
# The relay's secret key is not here: it is relay.key next to this file (keep it private).

# The host name in users' addresses (alice@HOST) and in the sponsorships this relay signs.
# Env: CHITCHAT_RELAY_HOST
host = "{host}"

# libp2p listen addresses: TCP, QUIC and WebSocket. Env: CHITCHAT_RELAY_LISTEN (comma-separated)
listen = [
    "/ip4/0.0.0.0/tcp/4433",
    "/ip4/0.0.0.0/udp/4433/quic-v1",
    "/ip4/0.0.0.0/tcp/4434/ws",
]

# Addresses published at /.well-known/chitchat/relay; empty publishes the listen addresses.
# Behind a reverse proxy on port 443, put the public WebSocket address here, for example
# "/dns4/relay.example/tcp/443/wss". Env: CHITCHAT_RELAY_ADVERTISE
advertise = []

# HTTP: /.well-known/chitchat/relay, /health, /metrics, and the admin API used by the CLI.
# Keep it on loopback, or behind a proxy that exposes only /.well-known. Env: CHITCHAT_RELAY_HTTP
http = "127.0.0.1:8080"

# Registration is closed: devices need a token from `chitchat-relay invite`.
# Env: CHITCHAT_RELAY_OPEN_REGISTRATION
open_registration = false

# How long a sponsorship (alice@HOST) is valid, and an invite token, in days.
sponsorship_days = 365
token_days = 7

# Writes batched into one fsync'd transaction, at most.
max_batch = 1024

[inbox]
# Items and bytes one device's inbox holds; beyond, senders get QuotaExceeded.
max_items = 10000
max_bytes = 67108864
# Days an unacknowledged item is kept.
retention_days = 30
# Enqueues one sending device may make per minute.
sender_per_minute = 6000

[tls]
# The relay's own certificate, for WebSocket with TLS: listen on /ip4/0.0.0.0/tcp/443/tls/ws and
# advertise /dns4/HOST/tcp/443/tls/ws, for nodes that can reach only port 443. PEM files, relative
# to this directory. Without them, put a TLS reverse proxy in front of a /ws listen address.
# certificate = "tls/fullchain.pem"
# key = "tls/privkey.pem"

[history]
# What is kept of each channel served here (its posts and commits, encrypted), for members
# whose inbox missed them; they fetch it by position. 0 entries keeps no history.
retention_days = 30
max_entries_per_channel = 100000
max_bytes_per_channel = 268435456

[files]
# Files' blobs (sealed; the relay cannot read them) pinned for the members of the channels
# served here, pushed by the sender's device before it sends the file. The blob endpoint (iroh,
# QUIC over UDP) binds these addresses (env CHITCHAT_RELAY_FILES_BIND, comma-separated) and
# uses no iroh relay and no discovery.
bind = ["0.0.0.0:0"]
# Where devices and other relays reach it, if not at the addresses it binds (NAT, port
# mapping); published in .well-known.
advertise = []
# The largest blob, the bytes each user may have pinned, and how long a blob stays.
max_file_bytes = 2147483648
quota_bytes_per_user = 10737418240
expiry_days = 30
# A blob pinned by another relay of a channel served here is replicated here (for this relay's
# members, until it expires there), within this many bytes per other relay.
replica_quota_bytes_per_relay = 107374182400

[key_packages]
# Unclaimed KeyPackages one device may store.
max_per_device = 200
# Claims one device may make per minute, and claims of one device's packages per minute.
claims_per_requester_per_minute = 120
claims_per_target_per_minute = 60

[ordering]
# Commits one device may submit per minute; beyond, it is told to retry later.
submits_per_minute = 60
# Channels one device may open per hour, and the largest public state (GroupInfo and ratchet
# tree) a channel may be opened with, in bytes.
opens_per_hour = 60
max_open_state_bytes = 262144
# The ordering state all channels together may hold (their public MLS state, about 6 KiB for a
# two-member channel): once reached, new channels and commits that add members are refused until
# removals make room. At most 805306368 (768 MiB).
max_state_bytes = 536870912
# Ordered commits between two snapshots of the ordering state.
snapshot_every = 10000

[network]
# Established connections in all, from one peer, and incoming ones still in their handshake.
max_connections = 10000
max_connections_per_peer = 8
max_pending_incoming = 512
# Requests a minute that need no registered device (challenge, authenticate, register, look-ups),
# and every request of a peer not yet authenticated: from one IP address, and from one peer.
anonymous_per_minute_per_ip = 1200
anonymous_per_minute_per_peer = 240
# The rendezvous point: members of a channel announce their addresses here under the channel's
# gossip topic, and find each other. Registrations kept in all, and for one peer (one per
# channel it is in); each lasts 15 minutes unless renewed.
max_rendezvous_registrations = 100000
max_rendezvous_registrations_per_peer = 1024
# Circuit relay v2: nodes reachable through this relay (reservations), and connections between
# two peers through it (circuits, each at most 2 minutes and 1 MiB: long enough for the peers to
# connect directly), held at once.
max_reservations = 10000
max_circuits = 1024

[federation]
# Other relays are found from their host name: https://HOST/.well-known/chitchat/relay gives
# their key (which must be the libp2p identity they connect with) and addresses. Hosts on
# loopback (localhost, 127.0.0.1:PORT) are read over plain HTTP; allow_http does that for every
# host (a private network without TLS).
allow_http = false
# Requests a minute one other relay may make here.
requests_per_minute_per_relay = 6000
# Payloads for devices of other relays wait in a durable queue per relay until it takes them
# (retried while it is away, for as long as inbox items are kept). Bounds: per relay, in items
# and bytes, and for all relays together.
max_queue_items = 100000
max_queue_bytes = 268435456
max_queued_total = 1000000
# Relays known without .well-known: [[federation.relays]] host = "...", key = "HEX",
# addrs = ["/dns4/relay.example/tcp/4433"]. Hosts named by `chitchat-relay block` are never
# contacted and nothing from them is accepted.
relays = []
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_to_the_defaults() {
        let parsed: Config = toml::from_str(&Config::template("relay.example")).expect("parse");
        assert_eq!(parsed, Config::new("relay.example"));
        parsed.validate().expect("valid");
    }

    #[test]
    fn env_overrides_and_validation() {
        let mut c = Config::new("relay.example");
        let env = |k: &str| match k {
            "CHITCHAT_RELAY_HOST" => Some("other.example".to_owned()),
            "CHITCHAT_RELAY_LISTEN" => {
                Some("/ip4/127.0.0.1/tcp/1, /ip4/127.0.0.1/udp/2/quic-v1".to_owned())
            }
            "CHITCHAT_RELAY_OPEN_REGISTRATION" => Some("true".to_owned()),
            _ => None,
        };
        c.apply_env(env).expect("apply");
        assert_eq!(c.host, "other.example");
        assert_eq!(c.listen.len(), 2);
        assert!(c.open_registration);
        c.validate().expect("valid");
        let bad = |k: &str| (k == "CHITCHAT_RELAY_HTTP").then(|| "nope".to_owned());
        assert!(c.apply_env(bad).is_err());
        c.listen = vec!["not a multiaddr".into()];
        assert!(c.validate().is_err());
        let unknown = "host = \"a.b\"\nlisten = [\"/ip4/1.2.3.4/tcp/1\"]\nhttp = \"127.0.0.1:1\"\nsurprise = 1\n";
        assert!(toml::from_str::<Config>(unknown).is_err(), "unknown keys are refused");
    }

    /// A TLS listen address needs a certificate and key; both or neither; unreadable or bad
    /// files are errors when the relay starts, never a panic.
    #[test]
    fn tls_is_checked() {
        let mut c = Config::new("relay.example");
        c.listen = vec!["/ip4/127.0.0.1/tcp/443/tls/ws".into()];
        let e = c.validate().expect_err("no certificate");
        assert!(e.to_string().contains("[tls]"), "{e}");
        c.tls.certificate = Some("/nonexistent/chain.pem".into());
        assert!(c.validate().is_err(), "a certificate without its key");
        c.tls.key = Some("/nonexistent/key.pem".into());
        c.validate().expect("both named");
        assert!(matches!(c.tls.load(), Err(ConfigError::Read { .. })));
        let dir = tempfile::tempdir().expect("tempdir");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").expect("write");
        c.tls = TlsConfig { certificate: Some(garbage.clone()), key: Some(garbage) };
        assert!(matches!(c.tls.load(), Err(ConfigError::Invalid(_))));
        assert_eq!(TlsConfig::default().load().expect("none").map(|_| ()), None);
    }
}

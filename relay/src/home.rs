//! The relay's directory: `config.toml`, `relay.key` (hex seed, mode 0600), `admin.token`
//! (mode 0600), `relay.redb`, and `run.json` (where a running relay listens; removed on a clean
//! stop).

use std::path::{Path, PathBuf};

use chitchat_proto::SecretKey;
use rand::RngExt as _;
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Shortest admin token accepted (`init` writes 32 hex digits).
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Where a running relay listens, written to `run.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// libp2p peer id.
    pub peer_id: String,
    /// Bound libp2p addresses.
    pub addrs: Vec<String>,
    /// Bound HTTP address.
    pub http: String,
    /// Process id.
    pub pid: u32,
}

/// The files of one relay.
#[derive(Clone, Debug)]
pub struct RelayDir {
    root: PathBuf,
}

impl RelayDir {
    /// The relay directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `config.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// `relay.key`.
    pub fn key(&self) -> PathBuf {
        self.root.join("relay.key")
    }
    /// `admin.token`.
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }
    /// `relay.redb`.
    pub fn db(&self) -> PathBuf {
        self.root.join("relay.redb")
    }
    /// `blobs/`: the files' blob store (iroh-blobs).
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }
    /// `ordering.redb`: the ordering group's Raft log and snapshots.
    pub fn ordering_db(&self) -> PathBuf {
        self.root.join("ordering.redb")
    }
    /// `ordering-groups/`: the groups shared with other relays, one redb file each.
    pub fn ordering_groups(&self) -> PathBuf {
        self.root.join("ordering-groups")
    }
    /// `run.json`.
    pub fn run_info(&self) -> PathBuf {
        self.root.join("run.json")
    }

    /// Creates the directory with a fresh key, admin token and documented config. Refuses to
    /// overwrite an existing key unless `force`.
    pub fn init(&self, host: &str, force: bool) -> anyhow::Result<SecretKey> {
        chitchat_proto::identity::check_host(host)
            .map_err(|e| anyhow::anyhow!("host {host:?}: {e}"))?;
        if self.key().exists() && !force {
            anyhow::bail!(
                "{} exists; pass --force to replace the relay's key",
                self.key().display()
            );
        }
        std::fs::create_dir_all(&self.root)?;
        let key = SecretKey::from_seed(rand::rng().random());
        write_secret(&self.key(), &format!("{}\n", hex::encode(*key.seed())))?;
        let token: [u8; 16] = rand::rng().random();
        write_secret(&self.admin_token(), &format!("{}\n", hex::encode(token)))?;
        std::fs::write(self.config(), Config::template(host))?;
        Ok(key)
    }

    /// Reads the relay's key.
    pub fn load_key(&self) -> anyhow::Result<SecretKey> {
        let text = std::fs::read_to_string(self.key()).map_err(|e| {
            anyhow::anyhow!("{}: {e} (run `chitchat-relay init` first)", self.key().display())
        })?;
        let bytes = hex::decode(text.trim())
            .map_err(|_| anyhow::anyhow!("{}: not hex", self.key().display()))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("{}: not 32 bytes", self.key().display()))?;
        Ok(SecretKey::from_seed(seed))
    }

    /// Reads the admin token. A missing, empty or short token is an error: the admin API
    /// would otherwise open to requests without one.
    pub fn load_admin_token(&self) -> anyhow::Result<String> {
        let path = self.admin_token();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let token = text.trim().to_owned();
        if token.len() < MIN_ADMIN_TOKEN_LEN {
            anyhow::bail!(
                "{}: the admin token must be at least {MIN_ADMIN_TOKEN_LEN} characters \
                 (`init` writes a random one); refusing to start with an open admin API",
                path.display()
            );
        }
        Ok(token)
    }

    /// Reads `run.json`, if a relay is running here.
    pub fn load_run_info(&self) -> Option<RunInfo> {
        let text = std::fs::read_to_string(self.run_info()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes `run.json` atomically.
    pub fn write_run_info(&self, info: &RunInfo) -> anyhow::Result<()> {
        let tmp = self.root.join("run.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(info)?)?;
        std::fs::rename(tmp, self.run_info())?;
        Ok(())
    }
}

fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

//! The node directory: `config.toml`, `node.redb` (keys and all state, mode 0600), `api.token`
//! (mode 0600), and `run.json` (where a running daemon's local API listens; removed on a clean
//! stop).

use std::path::{Path, PathBuf};

use rand::RngExt as _;
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Where a running daemon listens, written to `run.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The local API: `127.0.0.1:PORT`, or `unix:PATH`.
    pub api: String,
    /// Process id.
    pub pid: u32,
}

/// The files of one node.
#[derive(Clone, Debug)]
pub struct NodeDir {
    root: PathBuf,
}

impl NodeDir {
    /// The node directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `config.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// `node.redb`.
    pub fn db(&self) -> PathBuf {
        self.root.join("node.redb")
    }
    /// `api.token`.
    pub fn api_token(&self) -> PathBuf {
        self.root.join("api.token")
    }
    /// `run.json`.
    pub fn run_info(&self) -> PathBuf {
        self.root.join("run.json")
    }

    /// Whether `init` ran here.
    pub fn exists(&self) -> bool {
        self.db().exists()
    }

    /// Creates the directory, the API token and the documented config. The device key is
    /// created by the store when it first opens `node.redb`. Refuses to touch an existing node.
    pub fn init(&self) -> anyhow::Result<()> {
        if self.exists() {
            anyhow::bail!("{} already holds a node", self.root.display());
        }
        std::fs::create_dir_all(&self.root)?;
        restrict_dir(&self.root)?;
        let token: [u8; 16] = rand::rng().random();
        write_secret(&self.api_token(), &format!("{}\n", hex::encode(token)))?;
        if !self.config().exists() {
            std::fs::write(self.config(), Config::TEMPLATE)?;
        }
        Ok(())
    }

    /// Reads the API token.
    pub fn read_token(&self) -> anyhow::Result<String> {
        let path = self.api_token();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e} (run `chitchat init` first)", path.display()))?;
        Ok(text.trim().to_owned())
    }

    /// Loads the config file with environment overrides.
    pub fn load_config(&self) -> anyhow::Result<Config> {
        let path = self.config();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut config =
            Config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config.apply_env(|k| std::env::var(k).ok())?;
        Ok(config)
    }

    /// Where a running daemon listens, if one does.
    pub fn load_run_info(&self) -> Option<RunInfo> {
        let text = std::fs::read_to_string(self.run_info()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Records where the daemon listens.
    pub fn write_run_info(&self, info: &RunInfo) -> anyhow::Result<()> {
        let tmp = self.root.join("run.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(info)?)?;
        std::fs::rename(&tmp, self.run_info())?;
        Ok(())
    }
}

/// Writes a file readable by its owner only.
fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Makes the node directory private: it holds the device key.
fn restrict_dir(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    let _ = path;
    Ok(())
}

//! Running the real `chitchat` node binary.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chitchat_node::client::ApiClient;
use chitchat_node::home::NodeDir;
use serde_json::{Value, json};

use crate::RelayProcess;
use crate::process::binary;

/// The `chitchat` binary.
fn node_binary() -> std::path::PathBuf {
    binary("chitchat-node", "chitchat")
}

/// A node (`chitchat daemon`) in its own temporary directory. Killed when dropped.
#[derive(Debug)]
pub struct NodeProcess {
    dir: tempfile::TempDir,
    child: Option<Child>,
    env: Vec<(String, String)>,
    api: Option<ApiClient>,
    /// A command prefix the daemon runs under (a network namespace's `ip netns exec`).
    wrapper: Vec<String>,
}

impl NodeProcess {
    /// Initialises a node and starts its daemon. `env` are extra environment variables. Unless
    /// `env` says otherwise, the node listens for peers on loopback TCP only.
    pub fn start(env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_wrapped(env, Vec::new())
    }

    /// Like [`NodeProcess::start`], inside a network namespace: the daemon sees only the
    /// namespace's side of its veth pair (and loopback), and its API is a Unix socket in the node
    /// directory, which the test reaches from outside.
    pub fn start_in(netns: &crate::Netns, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut env = env.to_vec();
        env.push(("CHITCHAT_API_LISTEN", "unix:api.sock"));
        Self::start_wrapped(&env, netns.wrapper())
    }

    fn start_wrapped(env: &[(&str, &str)], wrapper: Vec<String>) -> anyhow::Result<Self> {
        let (dir, env) = Self::init(env, &[])?;
        let mut node = Self { dir, child: None, env, api: None, wrapper };
        node.restart()?;
        Ok(node)
    }

    /// Runs `chitchat init ARGS...` in a new directory, with `env` and the tests' defaults
    /// (loopback TCP for peers, loopback for files); returns the directory and that environment.
    fn init(
        env: &[(&str, &str)],
        args: &[&str],
    ) -> anyhow::Result<(tempfile::TempDir, Vec<(String, String)>)> {
        let dir = tempfile::tempdir()?;
        let mut env: Vec<(String, String)> =
            env.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        if !env.iter().any(|(k, _)| k == "CHITCHAT_NETWORK_LISTEN") {
            env.push(("CHITCHAT_NETWORK_LISTEN".into(), "/ip4/127.0.0.1/tcp/0".into()));
        }
        if !env.iter().any(|(k, _)| k == "CHITCHAT_FILES_BIND") {
            env.push(("CHITCHAT_FILES_BIND".into(), "127.0.0.1:0".into()));
        }
        let out = Command::new(node_binary())
            .arg("--home")
            .arg(dir.path())
            .arg("init")
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", std::env::var("CHITCHAT_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .output()?;
        if !out.status.success() {
            bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((dir, env))
    }

    /// Initialises a node as a new device of a user with `chitchat init --link CODE
    /// --device-name NAME`, then starts its daemon. The error carries what `init` printed.
    pub fn start_linked(code: &str, name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let (dir, env) = Self::init(env, &["--link", code, "--device-name", name])?;
        let mut node = Self { dir, child: None, env, api: None, wrapper: Vec::new() };
        node.restart()?;
        Ok(node)
    }

    /// Starts (again) the daemon on the same directory and waits until its API listens; one
    /// still running is killed first (SIGKILL).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.restart_with(&[])
    }

    /// Starts the daemon with extra environment variables for this run only.
    pub fn restart_with(&mut self, extra: &[(&str, &str)]) -> anyhow::Result<()> {
        // A daemon still running would hold the database: the new one would fail on it and
        // the old one live on, orphaned. It is killed first.
        self.kill9();
        let dir = NodeDir::new(self.dir.path());
        let _ = std::fs::remove_file(dir.run_info());
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(node_binary());
                c
            }
            None => Command::new(node_binary()),
        };
        let child = command
            .arg("--home")
            .arg(self.dir.path())
            .arg("daemon")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().copied())
            .env("RUST_LOG", std::env::var("CHITCHAT_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn node")?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if dir.load_run_info().is_some_and(|i| i.pid == pid) {
                self.api = Some(ApiClient::from_home(&dir)?);
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("node exited during start: {status}");
            }
            if Instant::now() > deadline {
                bail!("node did not start in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL (no clean shutdown) and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon with SIGTERM (a clean stop) and waits for it.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let status = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status()?;
            if !status.success() {
                bail!("kill -TERM failed: {status}");
            }
            let status = c.wait()?;
            if !status.success() {
                bail!("the daemon stopped with {status}");
            }
        }
        Ok(())
    }

    /// Waits for the daemon to exit by itself (after a fault it was told to inject).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<()> {
        crate::process::wait_for_exit(&mut self.child, timeout, "node")
    }

    /// Freezes the daemon (SIGSTOP): its sockets stay open, nothing answers.
    pub fn pause(&self) -> anyhow::Result<()> {
        crate::process::signal(&self.child, "STOP")
    }

    /// Lets a paused daemon go on (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        crate::process::signal(&self.child, "CONT")
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The node directory.
    pub fn home(&self) -> &Path {
        self.dir.path()
    }

    /// The local API client.
    pub fn api(&self) -> &ApiClient {
        self.api.as_ref().expect("started")
    }

    /// Calls the local API; an error status is an error.
    pub async fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        self.api().json(method, path, body).await
    }

    /// `chitchat --home DIR ARGS...`, to run as the test needs (its output read as it comes).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(node_binary());
        c.arg("--home").arg(self.dir.path()).args(args);
        c
    }

    /// Starts `chitchat --home DIR ARGS...` without waiting for it (output discarded).
    pub fn spawn_cli(&self, args: &[&str]) -> anyhow::Result<std::process::Child> {
        Ok(Command::new(node_binary())
            .arg("--home")
            .arg(self.dir.path())
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?)
    }

    /// Waits until this device is in the channel `id` (its Welcome was processed), at most
    /// `timeout`.
    pub async fn wait_joined(&self, id: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let v = self.json("GET", "/v1/channels", None).await?;
            if v["channels"].as_array().is_some_and(|c| c.iter().any(|c| c["id"] == id)) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("not in channel {id} after {timeout:?}: {v}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `chitchat --home DIR ARGS...` and returns its standard output.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out =
            Command::new(node_binary()).arg("--home").arg(self.dir.path()).args(args).output()?;
        if !out.status.success() {
            bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Registers with `relay` as `name` (invite token from the relay's CLI); returns the
    /// address.
    pub async fn register(&self, relay: &RelayProcess, name: &str) -> anyhow::Result<String> {
        let token = relay.cli(&["invite"])?.trim().to_owned();
        let body =
            json!({"relay": format!("http://{}", relay.info.http), "token": token, "name": name});
        let v = self.json("POST", "/v1/register", Some(body)).await?;
        Ok(v["address"].as_str().context("address")?.to_owned())
    }

    /// The texts of a chat channel's history, in order.
    pub async fn texts(&self, channel: &str) -> anyhow::Result<Vec<String>> {
        let v = self.json("GET", &format!("/v1/channels/{channel}/history"), None).await?;
        Ok(v["history"]["messages"]
            .as_array()
            .context("messages")?
            .iter()
            .map(|m| m["body"].as_str().unwrap_or("[deleted]").to_owned())
            .collect())
    }

    /// Waits until `check` holds for the channel's texts, or fails after `timeout`.
    pub async fn wait_texts(
        &self,
        channel: &str,
        timeout: Duration,
        check: impl Fn(&[String]) -> bool,
    ) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let texts = self.texts(channel).await.unwrap_or_default();
            if check(&texts) {
                return Ok(texts);
            }
            if Instant::now() > deadline {
                bail!("timed out; history is {texts:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the history entry of `channel` that carries a file named `name`; returns it.
    pub async fn wait_file(
        &self,
        channel: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.json("GET", &format!("/v1/channels/{channel}/history"), None).await;
            let found = v.as_ref().ok().and_then(|v| {
                v["history"]["messages"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| m["attachment"]["name"] == name)
                    .cloned()
            });
            if let Some(m) = found {
                return Ok(m);
            }
            if Instant::now() > deadline {
                bail!("no file {name} in {v:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

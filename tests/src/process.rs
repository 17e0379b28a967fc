//! Running the real relay binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chitchat_relay::home::{RelayDir, RunInfo};
use libp2p::{Multiaddr, PeerId};

/// A binary of this workspace, built once per test run with the same profile as the tests.
pub(crate) fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, path)) = built.iter().find(|(b, _)| b == bin) {
        return path.clone();
    }
    // The test executable is target/<profile>/deps/<name> (a binary of this crate, such as
    // `chaos`, is target/<profile>/<name>); the binary is target/<profile>/, built with the
    // same profile (release for benchmarks).
    let exe = std::env::current_exe().expect("current exe");
    let parent = exe.parent().expect("exe dir");
    let profile_dir =
        if parent.ends_with("deps") { parent.parent().expect("target dir") } else { parent };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "building {bin} failed");
    let path = profile_dir.join(bin);
    built.push((bin.to_owned(), path.clone()));
    path
}

/// The directory holding `chitchat` and `chitchat-relay`, both built for this profile.
pub fn binaries_dir() -> PathBuf {
    let relay = relay_binary();
    binary("chitchat-node", "chitchat");
    relay.parent().expect("target dir").to_path_buf()
}

/// A TCP port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The `chitchat-relay` binary.
pub(crate) fn relay_binary() -> PathBuf {
    binary("chitchat-relay", "chitchat-relay")
}

/// A relay process in its own temporary directory. Killed when dropped.
#[derive(Debug)]
pub struct RelayProcess {
    dir: tempfile::TempDir,
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// A command the relay runs under (`ip netns exec NS`), if any.
    wrapper: Vec<String>,
    /// Its host name (`localhost` unless federated).
    host: String,
    /// Where it listens (refreshed on every start).
    pub info: RunInfo,
}

impl RelayProcess {
    /// Initialises a relay for `localhost` and starts it on loopback with ephemeral ports,
    /// after `configure` edited its config file. `env` are extra environment variables.
    pub fn start(
        configure: impl FnOnce(&str) -> String,
        env_extra: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut relay = Self::prepare(configure, env_extra)?;
        relay.restart()?;
        Ok(relay)
    }

    /// Initialises the relay's directory, without starting it.
    fn prepare(
        configure: impl FnOnce(&str) -> String,
        env_extra: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let out = Command::new(relay_binary())
            .args(["--dir"])
            .arg(dir.path())
            .args(["init", "--host", "localhost"])
            .output()?;
        if !out.status.success() {
            bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let config = RelayDir::new(dir.path()).config();
        let text = std::fs::read_to_string(&config)?;
        std::fs::write(&config, configure(&text))?;
        // Defaults first: `env` may replace them.
        let mut env: Vec<(String, String)> = vec![
            (
                "CHITCHAT_RELAY_LISTEN".into(),
                "/ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1".into(),
            ),
            ("CHITCHAT_RELAY_HTTP".into(), "127.0.0.1:0".into()),
            ("CHITCHAT_RELAY_FILES_BIND".into(), "127.0.0.1:0".into()),
        ];
        env.extend(env_extra.iter().map(|(k, v)| ((*k).into(), (*v).into())));
        let relay = Self {
            dir,
            child: None,
            env,
            wrapper: Vec::new(),
            host: "localhost".into(),
            info: RunInfo { peer_id: String::new(), addrs: vec![], http: String::new(), pid: 0 },
        };
        Ok(relay)
    }

    /// Like [`RelayProcess::start`], on fixed free ports, so that a restarted relay is found
    /// where it was.
    pub fn start_fixed(configure: impl FnOnce(&str) -> String) -> anyhow::Result<Self> {
        let tcp = free_port()?;
        let http = free_port()?;
        let listen = format!("/ip4/127.0.0.1/tcp/{tcp}");
        let http = format!("127.0.0.1:{http}");
        Self::start(
            configure,
            &[("CHITCHAT_RELAY_LISTEN", listen.as_str()), ("CHITCHAT_RELAY_HTTP", http.as_str())],
        )
    }

    /// A relay that federates: on fixed loopback ports, named by its HTTP address
    /// (`127.0.0.1:PORT`), as relays side by side on one machine are, so that other relays find
    /// it through its `.well-known`.
    pub fn start_federated(configure: impl FnOnce(&str) -> String) -> anyhow::Result<Self> {
        let tcp = free_port()?;
        let http = format!("127.0.0.1:{}", free_port()?);
        let listen = format!("/ip4/127.0.0.1/tcp/{tcp}");
        let env = [
            ("CHITCHAT_RELAY_LISTEN", listen.as_str()),
            ("CHITCHAT_RELAY_HTTP", http.as_str()),
            ("CHITCHAT_RELAY_HOST", http.as_str()),
        ];
        let mut relay = Self::prepare(configure, &env)?;
        relay.host = http;
        relay.restart()?;
        Ok(relay)
    }

    /// A metric's value from `/metrics` (the sum over its labels; 0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.http_get("/metrics").unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Its host name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Like [`RelayProcess::start_fixed`], inside a network namespace: it listens on the
    /// namespace's address, which [`Netns::partition`](crate::Netns::partition) can cut off.
    pub fn start_in(
        netns: &crate::Netns,
        configure: impl FnOnce(&str) -> String,
    ) -> anyhow::Result<Self> {
        let ip = netns.inner_ip();
        let (tcp, http) = (free_port()?, free_port()?);
        let listen = format!("/ip4/{ip}/tcp/{tcp}");
        let http = format!("{ip}:{http}");
        let env = [("CHITCHAT_RELAY_LISTEN", listen.as_str()), ("CHITCHAT_RELAY_HTTP", &http)];
        let mut relay = Self::prepare(configure, &env)?;
        relay.wrapper = netns.wrapper();
        relay.restart()?;
        Ok(relay)
    }

    /// Starts (again) the relay process on the same directory and waits until it listens; one
    /// still running is killed first (SIGKILL).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        // A relay still running would hold the database: the new one would fail on it and
        // the old one live on, orphaned. It is killed first.
        self.kill9();
        let dir = RelayDir::new(self.dir.path());
        let _ = std::fs::remove_file(dir.run_info());
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(relay_binary());
                c
            }
            None => Command::new(relay_binary()),
        };
        let child = command
            .arg("--dir")
            .arg(self.dir.path())
            .arg("run")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("CHITCHAT_TEST_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn relay")?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(info) = dir.load_run_info().filter(|i| i.pid == pid) {
                self.info = info;
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("relay exited during start: {status}");
            }
            if Instant::now() > deadline {
                bail!("relay did not start in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sets (or with `None` removes) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.into(), v.into()));
        }
    }

    /// Waits until the process exits by itself (a fault injected into it), at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<()> {
        wait_for_exit(&mut self.child, timeout, "relay")
    }

    /// Kills the process with SIGKILL (no clean shutdown) and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the process (SIGSTOP): its sockets stay open, nothing answers.
    pub fn pause(&self) -> anyhow::Result<()> {
        signal(&self.child, "STOP")
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        signal(&self.child, "CONT")
    }

    /// Whether the process was started and not killed since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The relay's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The relay's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.info.peer_id.parse().expect("peer id")
    }

    /// The relay's TCP address.
    pub fn tcp_addr(&self) -> Multiaddr {
        self.addr("/tcp/")
    }

    /// The relay's QUIC address.
    pub fn quic_addr(&self) -> Multiaddr {
        self.addr("/quic-v1")
    }

    fn addr(&self, contains: &str) -> Multiaddr {
        let a = self.info.addrs.iter().find(|a| a.contains(contains) && !a.ends_with("/ws"));
        a.expect("address").parse().expect("multiaddr")
    }

    /// Runs `chitchat-relay --dir DIR ARGS...` and returns its standard output.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out =
            Command::new(relay_binary()).arg("--dir").arg(self.dir.path()).args(args).output()?;
        if !out.status.success() {
            bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The relay's identity, as its `/.well-known/chitchat/relay` publishes it.
    pub fn relay_id(&self) -> anyhow::Result<chitchat_proto::RelayId> {
        let wk: chitchat_relay::http::WellKnown =
            serde_json::from_str(&self.http_get("/.well-known/chitchat/relay")?)?;
        let key =
            chitchat_proto::PublicKey::from_hex(&wk.key).context("well-known key is not hex")?;
        Ok(chitchat_proto::RelayId { host: wk.host, key })
    }

    /// A client speaking the federation protocol to `to` as this relay, with this relay's key:
    /// what a relay that turned hostile could send.
    pub async fn as_relay_to(&self, to: &RelayProcess) -> anyhow::Result<crate::Client> {
        let key = chitchat_relay::home::RelayDir::new(self.dir()).load_key()?;
        let identity = libp2p::identity::Keypair::ed25519_from_bytes(*key.seed())?;
        let protocol = chitchat_proto::federation::FEDERATION_PROTOCOL;
        crate::Client::connect_on(identity, to.tcp_addr(), to.peer_id(), protocol).await
    }

    /// GETs a path of the relay's HTTP endpoint.
    pub fn http_get(&self, path: &str) -> anyhow::Result<String> {
        let mut r = ureq::get(&format!("http://{}{path}", self.info.http)).call()?;
        Ok(r.body_mut().read_to_string()?)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until `child` exits by itself, at most `timeout`; then forgets it.
/// Sends `signal` (`STOP`, `CONT`, ...) to the process, if it runs.
pub(crate) fn signal(child: &Option<Child>, signal: &str) -> anyhow::Result<()> {
    let Some(c) = child else { return Ok(()) };
    let status = Command::new("kill").arg(format!("-{signal}")).arg(c.id().to_string()).status()?;
    if !status.success() {
        bail!("kill -{signal} {} failed: {status}", c.id());
    }
    Ok(())
}

pub(crate) fn wait_for_exit(
    child: &mut Option<Child>,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(c) = child.as_mut()
            && c.try_wait()?.is_some()
        {
            *child = None;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("the {what} did not exit in {timeout:?}")
}

//! A network namespace joined to the host by a veth pair, for partitions: a process started in
//! it (see [`RelayProcess::start_in`](crate::RelayProcess::start_in)) is reached from the host
//! at [`Netns::inner_ip`], and [`Netns::partition`] cuts it off silently (its side of the pair
//! goes down: packets are dropped, nothing is refused), as a broken network does.
//!
//! Needs root and `ip` (iproute2); [`Netns::create`] says why when it cannot make one.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};

/// Namespaces made by this process so far (names and subnets must not collide).
static MADE: AtomicU32 = AtomicU32::new(0);

/// A network namespace and its veth pair; both are deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    host_if: String,
    inner_if: String,
    inner_ip: String,
    host_ip: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Netns {
    /// Makes a namespace, or says why it cannot (not root, no `ip`, no namespaces here).
    pub fn create() -> Result<Self, String> {
        let uid = Command::new("id").arg("-u").output().map_err(|e| format!("id -u: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not root".into());
        }
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 100_000, n % 100);
        let subnet = format!("10.{}.{}", 200 + pid % 50, n % 250);
        let ns = Self {
            name: format!("chitchat-{tag}"),
            host_if: format!("cch{tag}"),
            inner_if: format!("ccn{tag}"),
            inner_ip: format!("{subnet}.2"),
            host_ip: format!("{subnet}.1"),
        };
        // Dropped on failure, which removes whatever part was made.
        ns.setup(&ns.host_ip.clone()).map_err(|e| e.to_string())?;
        Ok(ns)
    }

    fn setup(&self, host_ip: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", &self.name])?;
        ip(&["link", "add", &self.host_if, "type", "veth", "peer", "name", &self.inner_if])?;
        ip(&["link", "set", &self.inner_if, "netns", &self.name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &self.host_if])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &self.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{}/30", self.inner_ip), "dev", &self.inner_if])?;
        inside(&["link", "set", &self.inner_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        // Some containers make namespaces but cannot enter them to run a program (no /sys to
        // mount): find out now, not when the relay fails to start.
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "true"])
            .output()
            .context("ip netns exec")?;
        if !out.status.success() {
            bail!("ip netns exec: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// The namespace's address, as the host reaches it.
    pub fn inner_ip(&self) -> &str {
        &self.inner_ip
    }

    /// The host's address on the pair (what the namespace reaches the host at: the two ends
    /// are one small LAN, where mDNS works).
    pub fn host_ip(&self) -> &str {
        &self.host_ip
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn wrapper(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name].iter().map(|s| (*s).to_owned()).collect()
    }

    /// Cuts the namespace off: its side of the veth pair goes down, and packets to and from it
    /// are dropped without an answer.
    pub fn partition(&self) -> anyhow::Result<()> {
        ip(&["netns", "exec", &self.name, "ip", "link", "set", &self.inner_if, "down"])
    }

    /// Joins it again.
    pub fn heal(&self) -> anyhow::Result<()> {
        ip(&["netns", "exec", &self.name, "ip", "link", "set", &self.inner_if, "up"])
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

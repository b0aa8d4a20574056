//! Throw-away network namespaces: a small lab network of "VMs" on one Linux host.
//!
//! [`NetnsLab::create`] builds `n` peer namespaces and one hub namespace holding a bridge;
//! each peer gets a veth `eth0` whose other end is enslaved to the hub's bridge, with an
//! address `10.213.0.(i+1)/24` (the hub's bridge is `10.213.0.254`). Nothing is created in
//! the host's own namespace: veth pairs are made inside the namespaces, so the host's
//! interfaces, routes and rules are untouched.
//!
//! Names are `ucn-<pid>-<rand>-<role>`: the creator's process id makes leftovers of a
//! crashed run recognisable ([`cleanup_stale`] deletes the namespaces of runs whose process
//! no longer exists, never those of a live parallel run), the random part keeps two runs
//! of one process apart. The lab deletes its namespaces when dropped, on failure half-way
//! through creation, and on [`NetnsLab::teardown`].

use std::time::Duration;

use crate::colour::exec::{check, run_argv};
use crate::error::{Error, Result};

/// The family prefix of every namespace this module creates.
pub const FAMILY_PREFIX: &str = "ucn-";

const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// The first three octets of the lab subnet (`10.213.0.0/24`), a private range used only
/// inside the namespaces.
pub const SUBNET: [u8; 3] = [10, 213, 0];

/// The hub's bridge address.
pub const HUB_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 213, 0, 254);

fn ip(args: &[&str]) -> Result<()> {
    let argv: Vec<String> = std::iter::once("ip")
        .chain(args.iter().copied())
        .map(str::to_string)
        .collect();
    let out = run_argv(&argv, IP_TIMEOUT)?;
    check(&argv, out).map(|_| ())
}

/// Names of all network namespaces (`ip netns list`).
pub fn list_namespaces() -> Result<Vec<String>> {
    let argv = vec!["ip".to_string(), "netns".to_string(), "list".to_string()];
    let out = check(&argv, run_argv(&argv, IP_TIMEOUT)?)?;
    Ok(out
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Checks that this process may create network namespaces, by creating and deleting one.
/// The error says why not (not root, no `ip`, no CAP_SYS_ADMIN in a container…).
pub fn probe() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotPrivileged {
            reason: "creating network namespaces and netfilter rules needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); run with sudo".to_string(),
        });
    }
    // A name of its own per call: tests probe from several threads at once.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{FAMILY_PREFIX}{}-probe{n}", std::process::id());
    match ip(&["netns", "add", &name]) {
        Ok(()) => {
            let _ = ip(&["netns", "del", &name]);
            Ok(())
        }
        Err(e) => Err(Error::NotPrivileged {
            reason: format!("cannot create a network namespace ({e}); install iproute2 and run as root outside a restricted container"),
        }),
    }
}

/// Deletes namespaces of the family whose creating process no longer exists (leftovers of
/// a crashed run). Returns the names deleted.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    for name in list_namespaces()? {
        let Some(rest) = name.strip_prefix(FAMILY_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = pid as u32 == std::process::id()
            || std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            tracing::warn!(namespace = %name, "deleting a namespace left by a crashed run");
            ip(&["netns", "del", &name])?;
            deleted.push(name);
        }
    }
    Ok(deleted)
}

/// A namespace standing in for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNs {
    /// Namespace name.
    pub name: String,
    /// Its address on the lab bridge.
    pub addr: std::net::Ipv4Addr,
}

/// A set of namespaces joined by a bridge, deleted when dropped.
#[derive(Debug)]
pub struct NetnsLab {
    prefix: String,
    hub: String,
    peers: Vec<PeerNs>,
    created: Vec<String>,
}

impl NetnsLab {
    /// A fresh prefix `ucn-<pid>-<rand>-` for this run.
    pub fn fresh_prefix() -> String {
        format!(
            "{FAMILY_PREFIX}{}-{:04x}-",
            std::process::id(),
            rand::random::<u16>()
        )
    }

    /// Creates `n` (1..=250) peer namespaces and a hub with a bridge. Deletes leftovers of
    /// crashed runs first. On failure everything created so far is deleted.
    pub fn create(n: usize) -> Result<Self> {
        if n == 0 || n > 250 {
            return Err(Error::InvalidConfig {
                reason: format!("{n} namespaces requested; the lab supports 1 to 250"),
            });
        }
        cleanup_stale()?;
        let prefix = Self::fresh_prefix();
        let mut lab = Self {
            hub: format!("{prefix}hub"),
            prefix,
            peers: Vec::new(),
            created: Vec::new(),
        };
        // On error `lab` is dropped, which deletes what was created.
        lab.build(n)?;
        Ok(lab)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.created.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn build(&mut self, n: usize) -> Result<()> {
        let hub = self.hub.clone();
        self.add_ns(&hub)?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{HUB_ADDR}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let name = format!("{}p{i}", self.prefix);
            let addr = std::net::Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], (i + 1) as u8);
            self.add_ns(&name)?;
            let hub_end = format!("v{i}");
            ip(&[
                "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", &hub_end,
                "netns", &hub,
            ])?;
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &name, "link", "set", "eth0", "up"])?;
            ip(&["-n", &hub, "link", "set", &hub_end, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &hub_end, "up"])?;
            self.peers.push(PeerNs { name, addr });
        }
        Ok(())
    }

    /// A lab that owns nothing (teardown does nothing).
    pub(crate) fn empty() -> Self {
        Self {
            prefix: String::from("\u{0}none-"),
            hub: String::new(),
            peers: Vec::new(),
            created: Vec::new(),
        }
    }

    /// The run's name prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hub namespace (bridge address [`HUB_ADDR`]).
    pub fn hub(&self) -> &str {
        &self.hub
    }

    /// The peer namespaces, in creation order.
    pub fn peers(&self) -> &[PeerNs] {
        &self.peers
    }

    /// Deletes every namespace of this lab (idempotent). Processes still inside keep
    /// their namespace alive until they exit, but the names are gone.
    pub fn teardown(&mut self) -> Result<()> {
        let mut first_err = None;
        let present = list_namespaces().unwrap_or_default();
        for name in self.created.drain(..).rev() {
            if !present.is_empty() && !present.contains(&name) {
                continue;
            }
            if let Err(e) = ip(&["netns", "del", &name]) {
                tracing::error!(namespace = %name, error = %e, "could not delete namespace");
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// How many namespaces with this lab's prefix exist now.
    pub fn namespaces_left(&self) -> Result<usize> {
        Ok(list_namespaces()?
            .iter()
            .filter(|n| n.starts_with(&self.prefix))
            .count())
    }
}

impl Drop for NetnsLab {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

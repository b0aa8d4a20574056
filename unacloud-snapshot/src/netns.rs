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
//!
//! A lab killed with SIGKILL cannot clean up itself: the programs it started die with it
//! ([`die_with_parent_if_asked`]), its reaper (`unacloud-gs reap`, told by the kernel)
//! kills its VMs and deletes its namespaces and run directory ([`remove_lab`]), and if the
//! reaper was killed too, the next lab deletes what is left — namespaces (with their
//! rules and taps) and the private run directory ([`RunDir`]).

use std::time::Duration;

use crate::colour::exec::{check, run_argv};
use crate::net::{Error, Result};

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
        if !pid_alive(pid) {
            tracing::warn!(namespace = %name, "deleting a namespace left by a crashed run");
            if let Err(e) = ip(&["netns", "del", &name]) {
                // Another clean-up (a parallel run, a reaper) may have deleted it first.
                if list_namespaces()?.contains(&name) {
                    return Err(e);
                }
            }
            deleted.push(name);
        }
    }
    Ok(deleted)
}

/// The environment variable through which a lab asks the programs it starts to die with
/// it: its value is the lab's process id (see [`die_with_parent_if_asked`]).
pub const DIE_WITH_PARENT_ENV: &str = "UNACLOUD_DIE_WITH_PARENT";

/// Called first thing by programs a lab starts (the `unacloud-gs` subcommands): when
/// [`DIE_WITH_PARENT_ENV`] names a process id, the kernel sends this process SIGTERM when
/// its parent dies (`PR_SET_PDEATHSIG`), so a SIGKILLed lab leaves no launcher, ring peer
/// or test manager behind; launchers handle SIGTERM by removing their rules. If the parent
/// is already gone (it died before this call), the process exits at once.
pub fn die_with_parent_if_asked() {
    if arm_parent_death_signal() == Some(false) {
        eprintln!("the process that started this one is gone; exiting");
        std::process::exit(1);
    }
}

/// Asks the kernel for SIGTERM when the parent dies, if [`DIE_WITH_PARENT_ENV`] is set:
/// `None` when it is not set, else whether the parent named there is still the parent
/// (it may have died before this call).
pub fn arm_parent_death_signal() -> Option<bool> {
    let parent = std::env::var(DIE_WITH_PARENT_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())?;
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM) {
        tracing::warn!(error = %e, "cannot ask to die with the parent process");
    }
    Some(nix::unistd::getppid().as_raw() == parent)
}

/// Deletes every namespace whose name starts with `prefix` (a lab's namespaces) and then
/// the run directory `dir`; returns the namespaces deleted. Used by a lab's reaper when
/// the lab was killed, and harmless when there is nothing left.
pub fn remove_lab(prefix: &str, dir: &std::path::Path) -> Vec<String> {
    let mut deleted = Vec::new();
    if prefix.starts_with(FAMILY_PREFIX) && prefix.len() > FAMILY_PREFIX.len() {
        for name in list_namespaces().unwrap_or_default() {
            if name.starts_with(prefix) && ip(&["netns", "del", &name]).is_ok() {
                deleted.push(name);
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    deleted
}

/// A private directory of one lab run: `<tmp>/ucn-<pid>-run-<random>`, created with
/// `mkdtemp` (unpredictable name, mode 0700) and removed when dropped. The creator's pid in
/// the name lets a later run remove it if this one was killed
/// ([`remove_stale_run_dirs`]).
#[derive(Debug)]
pub struct RunDir {
    path: std::path::PathBuf,
}

impl RunDir {
    /// Creates a fresh run directory in the system's temporary directory.
    pub fn create() -> Result<Self> {
        let template =
            std::env::temp_dir().join(format!("{FAMILY_PREFIX}{}-run-XXXXXX", std::process::id()));
        let path = nix::unistd::mkdtemp(&template).map_err(|e| Error::ResultsIo {
            path: template.clone(),
            source: std::io::Error::from(e),
        })?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Writes a secret (e.g. a cluster key) into a new file readable by its owner only
    /// (mode 0600, never an existing file).
    pub fn write_secret(&self, name: &str, contents: &[u8]) -> Result<std::path::PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.path.join(name);
        let io = |source| Error::ResultsIo {
            path: p.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .map_err(io)?;
        f.write_all(contents).map_err(io)?;
        Ok(p)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn pid_alive(pid: i32) -> bool {
    pid as u32 == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Every run directory ([`RunDir`]) in the temporary folder, with the process id of
/// the run that created it.
fn run_dirs() -> Vec<(i32, std::path::PathBuf)> {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(FAMILY_PREFIX)?;
            let (pid, tail) = rest.split_once('-')?;
            let pid: i32 = pid.parse().ok()?;
            (tail.starts_with("run-") && e.file_type().ok()?.is_dir()).then(|| (pid, e.path()))
        })
        .collect()
}

/// Run directories ([`RunDir`]) whose creating process no longer exists.
pub fn stale_run_dirs() -> Vec<std::path::PathBuf> {
    run_dirs()
        .into_iter()
        .filter(|(pid, _)| !pid_alive(*pid))
        .map(|(_, dir)| dir)
        .collect()
}

/// The run directories of the lab run by process `pid` (one while it runs; none once
/// it, or the next run's clean-up, has removed them).
pub fn run_dirs_of(pid: u32) -> Vec<std::path::PathBuf> {
    run_dirs()
        .into_iter()
        .filter(|(p, _)| *p as u32 == pid)
        .map(|(_, dir)| dir)
        .collect()
}

/// The network namespaces of the lab run by process `pid` (`ucn-<pid>-…`).
pub fn namespaces_of(pid: u32) -> Result<Vec<String>> {
    let prefix = format!("{FAMILY_PREFIX}{pid}-");
    Ok(list_namespaces()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect())
}

/// Removes the run directories of runs that were killed; returns them.
pub fn remove_stale_run_dirs() -> Vec<std::path::PathBuf> {
    let dirs = stale_run_dirs();
    for d in &dirs {
        tracing::warn!(dir = %d.display(), "removing the run directory of a killed run");
        let _ = std::fs::remove_dir_all(d);
    }
    dirs
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
        remove_stale_run_dirs();
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

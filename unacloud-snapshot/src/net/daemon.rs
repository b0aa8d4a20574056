//! The daemons of a deployment (SPEC §5, "Implementation"): a metadata server, one
//! launcher per host that registers its VMs (one participant per VM; the VM registered
//! first gets id 0 and its participant is the coordinator) and the operator's triggers:
//! `start` (`StartGS`, [`trigger_global_snapshot`]) and `resume` (POLL, RESTORE, START from
//! a completed global snapshot, [`trigger_resume`]). Configuration comes from a TOML file
//! and/or command-line flags.
//!
//! ```toml
//! cluster = 7
//! key_file = "/etc/unacloud/cluster.key"   # hex; enables HMAC-SHA256 of every frame
//! metadata_server = "10.0.0.1:7000"        # where launchers, `start` and `resume` find it
//! dscp_pre = 0x10
//! dscp_post = 0x12
//! snapshot_timeout_ms = 120000
//! precheck_timeout_ms = 10000
//!
//! [metadata]                                # for `metadata-server`
//! listen = "0.0.0.0:7000"
//! base_port = 7100
//! results_csv = "global-snapshots.csv"
//! max_registrations = 1024                  # INSERTs beyond are refused
//!
//! [launcher]                                # for `launcher`
//! advertise = "10.0.0.5"                    # address participants are reached at
//! cluster_size = 16                         # VMs in the whole deployment
//! backend = "nft-netlink"                   # or "nft", "nft-command", "iptables"
//! catalog = "/var/lib/unacloud/catalog-7.json"   # the default: catalog-<cluster>.json there
//! run_dir = "/run/unacloud"                 # lock files (default; else the temp directory)
//!
//! [launcher.hypervisor]                     # the VMs' local snapshots, restores, starts
//! backend = "qemu"                          # unacloud-core's QEMU backend (feature `hypervisor`)
//! root = "/var/lib/unacloud/vms"            # its root folder on this host
//! live = true                               # live snapshots (the guest runs on)
//! margin_mb = 64                            # free space required beyond the VM's memory
//!
//! [[launcher.vm]]
//! name = "web-1"
//! tap = "uct-web-1"                         # colour at the host, on the VM's tap
//! netns = "pc-5"                            # where that tap lives (optional)
//! ```
//!
//! A VM's local snapshot is explicit: the launcher's hypervisor (`[launcher.hypervisor]`),
//! or one of the lab methods of a VM entry — `freeze_pid` (SIGSTOP a process standing in
//! for the VM), `snapshot_command` (an argv template) or `lab_sleep_ms` (only wait; tests).
//! A VM with none of them is a configuration error: nothing records a global snapshot
//! that holds no state.
//!
//! Packet colouring happens at the host. With `tap` the rules mark what the VM sends and
//! filter what it receives on that interface (forward path, see
//! [`crate::colour::Scope::Interface`]), so neither guest nor application nor hypervisor
//! changes; without it they apply to the host's (or namespace's) own traffic.
//!
//! A launcher first locks every VM's colouring scope (its namespace and tap, or the host):
//! an exclusive `flock` of `launcher-<netns>-<tap>.lock` in the run directory, taken
//! before any colouring backend is built, because building one removes the rules it finds
//! (a crashed predecessor's leftovers). A second launcher for the same VM on the same
//! host therefore fails at once, naming the lock file and the launcher holding it, and
//! leaves the running launcher's rules alone.
//!
//! The coordinator's catalog of completed global snapshots is always persisted: to
//! `catalog` when given, else to [`default_catalog_path`]
//! (`/var/lib/unacloud/catalog-<cluster>.json`, the directory created with mode 0700).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::conn::{request, TransportConfig};
use super::frame::ClusterKey;
use super::host::{HostActions, HostSummary, LocalSnapshot, VmHost};
use super::node::{spawn_coordinator, spawn_participant, NodeEvent, NodeHandle};
use crate::colour::exec::{CommandExecutor, LocalHost, NetnsExec};
use crate::colour::iptables::Iptables;
use crate::colour::netlink::NftNetlink;
use crate::colour::nft::{Nft, NftOneShot, NftSession};
use crate::colour::{ColourBackend, Scope};
use crate::error::{Error, Result};
use crate::protocol::{
    ClusterId, CoordinatorConfig, DscpConfig, Envelope, GlobalSnapshotId, Message,
    ParticipantConfig, ParticipantId, ProtocolEvent, Registration, Timeouts,
};

/// Which packet-colouring backend a launcher uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum BackendKind {
    /// nftables through a long-lived `nft -j -i` session (fast path, default): `nft`.
    #[default]
    #[serde(rename = "nft", alias = "nft-session")]
    NftSession,
    /// nftables, one `nft` process per change: `nft-command`.
    #[serde(rename = "nft-command")]
    Nft,
    /// iptables, one process per command: `iptables`.
    #[serde(rename = "iptables")]
    Iptables,
    /// nftables through nf_tables netlink messages sent by the launcher itself (no `nft`
    /// process; on the host or in a network namespace):
    /// `nft-netlink`.
    #[serde(rename = "nft-netlink")]
    NftNetlink,
}

impl BackendKind {
    /// The name used by `--backend` and the configuration file.
    pub fn name(self) -> &'static str {
        match self {
            Self::NftSession => "nft",
            Self::Nft => "nft-command",
            Self::Iptables => "iptables",
            Self::NftNetlink => "nft-netlink",
        }
    }
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nft" | "nft-session" => Ok(Self::NftSession),
            "nft-command" => Ok(Self::Nft),
            "iptables" => Ok(Self::Iptables),
            "nft-netlink" => Ok(Self::NftNetlink),
            other => Err(Error::InvalidConfig {
                reason: format!(
                    "unknown colouring backend {other:?}; use nft, nft-netlink, nft-command or iptables"
                ),
            }),
        }
    }
}

/// One VM of a launcher.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The VM's name (registered at the metadata server).
    pub name: String,
    /// Apply its rules inside this network namespace (the one holding its tap).
    pub netns: Option<String>,
    /// Colour the VM's traffic on this host interface (its tap): forward-path rules
    /// scoped to the interface instead of the host's own output/input.
    pub tap: Option<String>,
    /// Lab method: local snapshot = freeze this process (SIGSTOP/SIGCONT) for `hold_ms`.
    pub freeze_pid: Option<i32>,
    /// How long a frozen process stays stopped (default 0).
    #[serde(default)]
    pub hold_ms: u64,
    /// Lab method: local snapshot = run this command (`{vm}`, `{gs}` substituted).
    pub snapshot_command: Option<Vec<String>>,
    /// Bound on the snapshot command (default 600 s).
    pub snapshot_timeout_ms: Option<u64>,
    /// Test method: the "local snapshot" only waits this long and captures nothing.
    pub lab_sleep_ms: Option<u64>,
}

/// `[launcher.hypervisor]`: the backend that takes the VMs' local snapshots.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypervisorSection {
    /// `qemu` (unacloud-core's QEMU backend).
    pub backend: String,
    /// The backend's root folder on this host.
    pub root: PathBuf,
    /// Live snapshots (the guest keeps running while its memory is written); default
    /// true.
    #[serde(default = "yes")]
    pub live: bool,
    /// Free space required beyond each VM's memory, in MiB (default 64).
    #[serde(default = "default_margin_mb")]
    pub margin_mb: u64,
    /// `auto`, `kvm` or `tcg` (default `auto`: KVM when a probe boot shows it works).
    pub accel: Option<String>,
}

fn yes() -> bool {
    true
}

fn default_margin_mb() -> u64 {
    64
}

/// `[metadata]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataSection {
    /// Listening address.
    pub listen: SocketAddr,
    /// Participant `id` gets port `base_port + id`.
    pub base_port: u16,
    /// CSV file the times of every global snapshot are appended to.
    pub results_csv: Option<PathBuf>,
    /// At most this many registrations (default 1024).
    #[serde(default)]
    pub max_registrations: Option<usize>,
}

/// `[launcher]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LauncherSection {
    /// The address other hosts reach this host's participants at.
    pub advertise: IpAddr,
    /// Number of VMs in the whole deployment (the coordinator waits for all).
    pub cluster_size: u32,
    /// Colouring backend.
    #[serde(default)]
    pub backend: BackendKind,
    /// Catalog file of the coordinator (if this host gets id 0); default
    /// [`default_catalog_path`].
    pub catalog: Option<PathBuf>,
    /// Where the lock files of the VMs' colouring scopes live; default
    /// [`default_run_dir`]. Launchers of one host must agree on it.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    /// The hypervisor that takes, restores and starts the VMs' local snapshots.
    pub hypervisor: Option<HypervisorSection>,
    /// The host's VMs.
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmConfig>,
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The cluster id.
    pub cluster: u64,
    /// File with the hex cluster key.
    pub key_file: Option<PathBuf>,
    /// The metadata server's address.
    pub metadata_server: Option<SocketAddr>,
    /// DSCP value of PRESNAPSHOT (default 0x10).
    pub dscp_pre: Option<u8>,
    /// DSCP value of POSTSNAPSHOT (default 0x12).
    pub dscp_post: Option<u8>,
    /// Phase-2 deadline in milliseconds (default 120 000).
    pub snapshot_timeout_ms: Option<u64>,
    /// Phase-1 deadline in milliseconds (default 10 000).
    pub precheck_timeout_ms: Option<u64>,
    /// Metadata server section.
    pub metadata: Option<MetadataSection>,
    /// Launcher section.
    pub launcher: Option<LauncherSection>,
}

impl DaemonConfig {
    /// An empty configuration of cluster `cluster` (flags fill the rest).
    pub fn new(cluster: u64) -> Self {
        Self {
            cluster,
            key_file: None,
            metadata_server: None,
            dscp_pre: None,
            dscp_post: None,
            snapshot_timeout_ms: None,
            precheck_timeout_ms: None,
            metadata: None,
            launcher: None,
        }
    }

    /// Parses TOML text; `path` names the file in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: format!("cannot read it: {e}"),
        })?;
        Self::from_toml(&text, path)
    }

    /// The cluster key, if configured.
    pub fn key(&self) -> Result<Option<ClusterKey>> {
        self.key_file
            .as_deref()
            .map(ClusterKey::from_file)
            .transpose()
    }

    /// The DSCP values.
    pub fn dscp(&self) -> Result<DscpConfig> {
        DscpConfig::new(
            self.dscp_pre.unwrap_or(DscpConfig::DEFAULT_PRE),
            self.dscp_post.unwrap_or(DscpConfig::DEFAULT_POST),
        )
    }

    /// The protocol deadlines.
    pub fn timeouts(&self) -> Timeouts {
        let mut t = Timeouts::default();
        if let Some(ms) = self.snapshot_timeout_ms {
            t.snapshot = Duration::from_millis(ms);
        }
        if let Some(ms) = self.precheck_timeout_ms {
            t.precheck = Duration::from_millis(ms);
        }
        t
    }

    /// Transport settings.
    pub fn transport(&self) -> Result<TransportConfig> {
        Ok(TransportConfig::new(ClusterId(self.cluster), self.key()?))
    }

    fn metadata_server(&self) -> Result<SocketAddr> {
        self.metadata_server.ok_or_else(|| Error::InvalidConfig {
            reason: "no metadata server address: set `metadata_server` or pass --ms".to_string(),
        })
    }
}

/// Builds a colouring backend of `kind` whose commands run through `exec`.
///
/// [`BackendKind::NftNetlink`] runs no commands; build it with [`build_vm_backend`].
pub fn build_backend(
    kind: BackendKind,
    exec: Arc<dyn CommandExecutor>,
    dscp: DscpConfig,
) -> Result<Box<dyn ColourBackend>> {
    Ok(match kind {
        BackendKind::NftSession => Box::new(Nft::new(NftSession::start(exec.as_ref())?, dscp)),
        BackendKind::Nft => Box::new(Nft::new(NftOneShot::new(exec), dscp)),
        BackendKind::Iptables => Box::new(Iptables::new(exec, dscp)),
        BackendKind::NftNetlink => {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "the nft-netlink backend runs no commands (asked for {}); build it from the VM's configuration",
                    exec.place()
                ),
            })
        }
    })
}

/// Builds the colouring backend of `kind` for `vm`: commands through [`vm_executor`], or
/// for [`BackendKind::NftNetlink`] a netlink socket opened in the VM's namespace (or on
/// this host when it has none); scoped to the VM's tap when it has one.
pub fn build_vm_backend(
    kind: BackendKind,
    vm: &VmConfig,
    dscp: DscpConfig,
) -> Result<Box<dyn ColourBackend>> {
    let scope = match &vm.tap {
        Some(tap) => Scope::interface(tap)?,
        None => Scope::Host,
    };
    Ok(match kind {
        BackendKind::NftNetlink => {
            let nl = match &vm.netns {
                Some(ns) => NftNetlink::open_in_netns(ns, dscp)?,
                None => NftNetlink::open_here(dscp)?,
            };
            Box::new(nl.scope(scope))
        }
        BackendKind::NftSession => {
            Box::new(Nft::new(NftSession::start(vm_executor(vm).as_ref())?, dscp).scope(scope))
        }
        BackendKind::Nft => Box::new(Nft::new(NftOneShot::new(vm_executor(vm)), dscp).scope(scope)),
        BackendKind::Iptables => Box::new(Iptables::new(vm_executor(vm), dscp).scope(scope)),
    })
}

/// The executor where a VM's rules are applied: its namespace, or this host.
pub fn vm_executor(vm: &VmConfig) -> Arc<dyn CommandExecutor> {
    if let Some(ns) = &vm.netns {
        Arc::new(NetnsExec::new(ns.clone()))
    } else {
        Arc::new(LocalHost)
    }
}

/// The directory of the default catalog files.
pub const DEFAULT_CATALOG_DIR: &str = "/var/lib/unacloud";

/// The default catalog file of cluster `cluster`:
/// `/var/lib/unacloud/catalog-<cluster>.json`.
pub fn default_catalog_path(cluster: u64) -> PathBuf {
    Path::new(DEFAULT_CATALOG_DIR).join(format!("catalog-{cluster}.json"))
}

/// Creates the directory of the catalog file `path` (mode 0700, parents as needed) if it
/// is missing, so that the coordinator can persist its catalog. The error says what to
/// pass instead.
pub fn prepare_catalog_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::InvalidConfig {
            reason: format!(
                "cannot create the catalog directory {} ({e}); the coordinator keeps its \
                 catalog of completed global snapshots there: run as a user who may create \
                 it, or pass --catalog FILE (`catalog` in [launcher]) in a writable directory",
                dir.display()
            ),
        })
}

/// The run directory of launchers' lock files: `/run/unacloud` when it exists or can be
/// created and is writable, else the system's temporary directory.
pub fn default_run_dir() -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let run = PathBuf::from("/run/unacloud");
    let usable = (run.is_dir() || std::fs::DirBuilder::new().mode(0o755).create(&run).is_ok())
        && nix::unistd::access(&run, nix::unistd::AccessFlags::W_OK).is_ok();
    if usable {
        run
    } else {
        std::env::temp_dir()
    }
}

/// A name component of a lock file: letters, digits, `.` and `_` as they are, anything
/// else (`-` included, the separator) as `%XX`, so distinct scopes get distinct files.
fn lock_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The lock file of `vm`'s colouring scope in `run_dir`:
/// `launcher-<netns or "host">-<tap or "all">.lock`.
pub fn scope_lock_path(run_dir: &Path, vm: &VmConfig) -> PathBuf {
    let ns = vm
        .netns
        .as_deref()
        .map_or("host".to_string(), |n| format!("ns-{}", lock_component(n)));
    let tap = vm
        .tap
        .as_deref()
        .map_or("all".to_string(), |t| format!("tap-{}", lock_component(t)));
    run_dir.join(format!("launcher-{ns}-{tap}.lock"))
}

/// An exclusive lock on one VM colouring scope (a namespace and tap, or the host), held by
/// a running launcher: a non-blocking `flock` of a file in the run directory, which holds
/// the holder's description. Released, and the file removed, when dropped (or when the
/// process dies: the kernel releases the lock).
#[derive(Debug)]
pub struct ScopeLock {
    path: PathBuf,
    _file: nix::fcntl::Flock<std::fs::File>,
}

impl ScopeLock {
    /// Takes the lock at `path` for VM `vm`, without waiting. Fails with the holder's
    /// description when another process holds it.
    pub fn acquire(path: &Path, vm: &str) -> Result<Self> {
        use nix::fcntl::{Flock, FlockArg};
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let io_err = |what: &str, e: std::io::Error| Error::InvalidConfig {
            reason: format!(
                "VM {vm}: cannot {what} the lock file {} ({e}); pass --run-dir DIR \
                 (`run_dir` in [launcher]) in a writable directory",
                path.display()
            ),
        };
        // A holder removes its file while it still holds the lock; a file we locked but
        // that is no longer at `path` was such a file: open the new one and try again.
        for _ in 0..10 {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
                .map_err(|e| io_err("open", e))?;
            let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    let holder = if holder.is_empty() {
                        "a launcher that is starting".to_string()
                    } else {
                        holder.to_string()
                    };
                    return Err(Error::InvalidConfig {
                        reason: format!(
                            "VM {vm} is already run by another launcher on this host: the \
                             lock file {} is held by {holder}. Starting would remove its \
                             packet-colouring rules; stop that launcher first",
                            path.display()
                        ),
                    });
                }
                Err((_, errno)) => return Err(io_err("lock", errno.into())),
            };
            let same = match (file.metadata(), std::fs::metadata(path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let me = format!(
                "pid {} (unacloud-gs launcher, VM {vm}, since unix time {since})\n",
                std::process::id()
            );
            file.set_len(0).map_err(|e| io_err("write", e))?;
            file.rewind().map_err(|e| io_err("write", e))?;
            file.write_all(me.as_bytes())
                .map_err(|e| io_err("write", e))?;
            return Ok(Self {
                path: path.to_path_buf(),
                _file: file,
            });
        }
        Err(Error::InvalidConfig {
            reason: format!(
                "VM {vm}: the lock file {} keeps being replaced; is another launcher \
                 starting and stopping in a loop?",
                path.display()
            ),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScopeLock {
    fn drop(&mut self) {
        // Removed while still held, so that nobody locks a file that is going away.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Locks the colouring scope of every VM in `vms` (one lock per distinct scope) in
/// `run_dir`, creating the directory if needed. Fails, holding nothing, if any scope is
/// held by another process.
pub fn lock_vm_scopes(run_dir: &Path, vms: &[VmConfig]) -> Result<Vec<ScopeLock>> {
    if !run_dir.is_dir() {
        std::fs::create_dir_all(run_dir).map_err(|e| Error::InvalidConfig {
            reason: format!(
                "cannot create the run directory {} for the launchers' lock files ({e})",
                run_dir.display()
            ),
        })?;
    }
    let mut locks: Vec<ScopeLock> = Vec::new();
    for vm in vms {
        let path = scope_lock_path(run_dir, vm);
        if locks.iter().any(|l| l.path == path) {
            continue;
        }
        locks.push(ScopeLock::acquire(&path, &vm.name)?);
    }
    Ok(locks)
}

/// The local-snapshot method of `vm`: a lab method of its own entry, else the
/// launcher's hypervisor (`hv`); neither is a configuration error.
pub fn local_snapshot(vm: &VmConfig, hv: Option<&LocalSnapshot>) -> Result<LocalSnapshot> {
    let lab = [
        vm.freeze_pid.is_some(),
        vm.snapshot_command.is_some(),
        vm.lab_sleep_ms.is_some(),
    ];
    if lab.iter().filter(|x| **x).count() > 1 {
        return Err(Error::InvalidConfig {
            reason: format!(
                "VM {}: give one local-snapshot method, not several of freeze_pid, snapshot_command and lab_sleep_ms",
                vm.name
            ),
        });
    }
    if let Some(pid) = vm.freeze_pid {
        return Ok(LocalSnapshot::Freeze {
            pid,
            hold: Duration::from_millis(vm.hold_ms),
        });
    }
    if let Some(argv) = &vm.snapshot_command {
        if argv.is_empty() {
            return Err(Error::InvalidConfig {
                reason: format!("VM {}: snapshot_command is empty", vm.name),
            });
        }
        return Ok(LocalSnapshot::Command {
            argv: argv.clone(),
            timeout: Duration::from_millis(vm.snapshot_timeout_ms.unwrap_or(600_000)),
        });
    }
    if let Some(ms) = vm.lab_sleep_ms {
        return Ok(LocalSnapshot::Sleep(Duration::from_millis(ms)));
    }
    hv.cloned().ok_or_else(|| Error::InvalidConfig {
        reason: format!(
            "VM {} has no local-snapshot method: configure [launcher.hypervisor] (or --hypervisor), \
             or a lab method (freeze_pid, snapshot_command, lab_sleep_ms)",
            vm.name
        ),
    })
}

/// Opens the hypervisor of `[launcher.hypervisor]` as a local-snapshot method.
#[cfg(feature = "hypervisor")]
pub async fn open_hypervisor(section: &HypervisorSection) -> Result<LocalSnapshot> {
    use unacloud_core::qemu::{Accel, QemuHypervisor, QemuImg, QemuSystem};
    if section.backend != "qemu" {
        return Err(Error::InvalidConfig {
            reason: format!(
                "hypervisor backend {:?}: this launcher drives `qemu`; embed the library with \
                 LocalSnapshot::Hypervisor for other backends",
                section.backend
            ),
        });
    }
    let accel: Accel =
        section
            .accel
            .as_deref()
            .unwrap_or("auto")
            .parse()
            .map_err(|e: unacloud_core::Error| Error::InvalidConfig {
                reason: format!("hypervisor: {e}"),
            })?;
    let hv = QemuHypervisor::open_configured(
        &section.root,
        QemuImg::new(),
        QemuSystem::new().with_accel(accel),
    )
    .await
    .map_err(|e| Error::InvalidConfig {
        reason: format!(
            "cannot open the QEMU backend at {}: {}",
            section.root.display(),
            error_chain(&e)
        ),
    })?;
    Ok(LocalSnapshot::Hypervisor {
        hv: Arc::new(hv),
        live: section.live,
        margin: section.margin_mb.saturating_mul(1 << 20),
    })
}

/// Without the `hypervisor` feature a `[launcher.hypervisor]` section is refused.
#[cfg(not(feature = "hypervisor"))]
pub async fn open_hypervisor(section: &HypervisorSection) -> Result<LocalSnapshot> {
    Err(Error::InvalidConfig {
        reason: format!(
            "hypervisor backend {:?}: this build of unacloud-snapshot lacks the `hypervisor` feature",
            section.backend
        ),
    })
}

#[cfg(feature = "hypervisor")]
use crate::error::error_chain;

/// Sends `StartGS` to the metadata server, which forwards it to the coordinator.
///
/// `Ok` means the trigger was forwarded; the coordinator reports the global snapshot (or
/// its refusal, e.g. while another one runs) as events of its launcher.
pub async fn trigger_global_snapshot(
    metadata_server: SocketAddr,
    transport: &TransportConfig,
) -> Result<()> {
    send_trigger(metadata_server, transport, Message::TriggerGlobalSnapshot).await
}

/// Sends TRIGGER_RESUME to the metadata server, which forwards it to the coordinator: the
/// coordinator resumes the application from `gs` (by default the latest completed global
/// snapshot) — POLL, repeated until every participant answers, then RESTORE and START.
///
/// `Ok` means the trigger was forwarded; the coordinator reports the resume
/// ([`LauncherEvent::ResumeStarted`], `ResumeCompleted`, `ResumeFailed`) or its refusal
/// ([`LauncherEvent::TriggerRefused`]: busy, nothing restorable, `gs` not restorable) as
/// events of its launcher. Fails with [`Error::PeerRejected`] when the metadata server
/// refuses it (nobody registered, or the coordinator is not connected to it).
pub async fn trigger_resume(
    metadata_server: SocketAddr,
    transport: &TransportConfig,
    gs: Option<GlobalSnapshotId>,
) -> Result<()> {
    send_trigger(metadata_server, transport, Message::TriggerResume { gs }).await
}

async fn send_trigger(
    metadata_server: SocketAddr,
    transport: &TransportConfig,
    trigger: Message,
) -> Result<()> {
    let kind = trigger.kind();
    let env = Envelope::new(
        transport.cluster,
        ParticipantId::UNREGISTERED,
        ParticipantId::METADATA_SERVER,
        trigger,
    );
    let reply = request(metadata_server, transport, env, Duration::from_secs(5)).await?;
    match reply.message {
        Message::TriggerForwarded => Ok(()),
        Message::Refused { reason } => Err(Error::PeerRejected {
            peer: format!("metadata server {metadata_server}"),
            reason,
        }),
        other => Err(Error::TransportFrame {
            peer: metadata_server.to_string(),
            reason: format!("answered {} to {kind}", other.kind()),
        }),
    }
}

/// What a launcher reports while it runs (printed as JSON lines by the command line).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum LauncherEvent {
    /// A VM was registered.
    Registered {
        /// The VM.
        vm: String,
        /// Its participant id.
        id: u32,
        /// Its port.
        port: u16,
    },
    /// Coordinator: every participant is connected; triggers will be served.
    Ready {
        /// Number of participants besides the coordinator.
        participants: usize,
    },
    /// Coordinator: a global snapshot started.
    GsStarted {
        /// Its id.
        gs: u64,
    },
    /// Coordinator: a global snapshot completed.
    GsCompleted {
        /// Its id.
        gs: u64,
        /// Global time in microseconds.
        global_us: u64,
        /// Every participant's local time in microseconds, by id.
        local_us: Vec<u64>,
    },
    /// Coordinator: a global snapshot failed.
    GsFailed {
        /// Its id.
        gs: u64,
        /// The participants at fault.
        who: Vec<u32>,
        /// Why.
        why: String,
    },
    /// Coordinator: a trigger (global snapshot or resume) was refused.
    TriggerRefused {
        /// Why.
        reason: String,
    },
    /// Coordinator: a resume started (POLL sent to every participant).
    ResumeStarted {
        /// The global snapshot being restored.
        gs: u64,
        /// The resume attempt.
        attempt: u64,
    },
    /// Coordinator: every participant answered POLL; RESTORE was sent.
    PollCompleted {
        /// The global snapshot being restored.
        gs: u64,
        /// POLL rounds it took (1 = everybody answered the first).
        rounds: u32,
    },
    /// Coordinator: every host restored and started its VMs.
    ResumeCompleted {
        /// The restored global snapshot.
        gs: u64,
    },
    /// Coordinator: the resume failed. START is sent only after every RESTORE_OK, so
    /// hosts that restored stay stopped (restored, not started); trigger the resume again.
    ResumeFailed {
        /// The global snapshot that was being restored.
        gs: u64,
        /// The participants at fault (0 = the coordinator's own host).
        who: Vec<u32>,
        /// Why.
        why: String,
    },
    /// Participant: its VMs were restored to a global snapshot and started.
    Resumed {
        /// The participant.
        id: u32,
        /// The restored global snapshot.
        gs: u64,
    },
    /// Participant: a local snapshot was abandoned (abort or deadline); rules removed.
    Abandoned {
        /// The participant.
        id: u32,
        /// The global snapshot.
        gs: u64,
        /// Why.
        why: String,
    },
    /// A peer connected (coordinator: a participant or the metadata server; participant:
    /// its coordinator).
    Connected {
        /// The participant reporting it.
        id: u32,
        /// The peer.
        peer: u32,
    },
    /// A connection closed; `reason` is set when it was an error.
    Disconnected {
        /// The participant reporting it.
        id: u32,
        /// The peer, when known.
        peer: Option<u32>,
        /// Why, for errors.
        reason: Option<String>,
    },
    /// A node refused an input (a message it cannot accept, a failed action report).
    Error {
        /// The participant reporting it.
        id: u32,
        /// What happened.
        message: String,
    },
    /// Participant: neither RELEASE nor ABORT of `gs` arrived before its deadline (the
    /// coordinator vanished); it stopped colouring by itself. Whether `gs` completed only
    /// the coordinator's catalog knows.
    ReleaseMissed {
        /// The participant.
        id: u32,
        /// The global snapshot whose colour was held.
        gs: u64,
    },
    /// Removing the rules failed three times; the host may still colour or drop traffic.
    /// Needs an operator.
    CleanupFailed {
        /// The participant.
        id: u32,
        /// The global snapshot whose rules could not be removed.
        gs: u64,
        /// The last failure.
        why: String,
    },
    /// Arming the idle drop rule failed; the next global snapshot tries again.
    IdleDropFailed {
        /// The participant.
        id: u32,
        /// Why.
        why: String,
    },
    /// The launcher was asked to stop (SIGINT/SIGTERM) before it was running, in `phase`
    /// (`building hosts`, `registering`, `waiting for the cluster to register`, `waiting
    /// for the coordinator's address`); every rule it installed is removed and a
    /// [`LauncherEvent::Summary`] per VM follows.
    Interrupted {
        /// What it was doing.
        phase: String,
    },
    /// A VM's host stopped; its rules were removed.
    Summary {
        /// The VM.
        vm: String,
        /// Its participant id (`null` when it stopped before it registered).
        id: Option<u32>,
        /// What the host reports.
        #[serde(flatten)]
        summary: HostSummary,
    },
}

/// The launcher event of node event `ev` of participant `id`, if it has one.
fn translate(id: ParticipantId, ev: &NodeEvent) -> Option<LauncherEvent> {
    match ev {
        NodeEvent::Protocol(ProtocolEvent::GlobalSnapshotStarted { gs }) => {
            Some(LauncherEvent::GsStarted { gs: gs.0 })
        }
        NodeEvent::Protocol(ProtocolEvent::GlobalSnapshotCompleted {
            gs,
            local_times,
            global_time,
        }) => Some(LauncherEvent::GsCompleted {
            gs: gs.0,
            global_us: global_time.as_micros() as u64,
            local_us: local_times
                .iter()
                .map(|l| l.local_time.as_micros() as u64)
                .collect(),
        }),
        NodeEvent::Protocol(ProtocolEvent::GlobalSnapshotFailed { gs, who, why }) => {
            Some(LauncherEvent::GsFailed {
                gs: gs.0,
                who: who.iter().map(|p| p.0).collect(),
                why: why.to_string(),
            })
        }
        NodeEvent::Protocol(ProtocolEvent::TriggerRefused { reason }) => {
            Some(LauncherEvent::TriggerRefused {
                reason: reason.clone(),
            })
        }
        NodeEvent::Protocol(ProtocolEvent::ResumeStarted { gs, attempt }) => {
            Some(LauncherEvent::ResumeStarted {
                gs: gs.0,
                attempt: attempt.0,
            })
        }
        NodeEvent::Protocol(ProtocolEvent::PollCompleted { gs, rounds }) => {
            Some(LauncherEvent::PollCompleted {
                gs: gs.0,
                rounds: *rounds,
            })
        }
        NodeEvent::Protocol(ProtocolEvent::ResumeCompleted { gs }) => {
            Some(LauncherEvent::ResumeCompleted { gs: gs.0 })
        }
        NodeEvent::Protocol(ProtocolEvent::ResumeFailed { gs, who, why }) => {
            Some(LauncherEvent::ResumeFailed {
                gs: gs.0,
                who: who.iter().map(|p| p.0).collect(),
                why: why.to_string(),
            })
        }
        NodeEvent::Protocol(ProtocolEvent::Resumed { gs }) => {
            Some(LauncherEvent::Resumed { id: id.0, gs: gs.0 })
        }
        NodeEvent::Protocol(ProtocolEvent::LocalSnapshotAbandoned { gs, why }) => {
            Some(LauncherEvent::Abandoned {
                id: id.0,
                gs: gs.0,
                why: why.clone(),
            })
        }
        NodeEvent::Protocol(ProtocolEvent::ReleaseMissed { gs }) => {
            Some(LauncherEvent::ReleaseMissed { id: id.0, gs: gs.0 })
        }
        NodeEvent::Protocol(ProtocolEvent::CleanupFailed { gs, why }) => {
            Some(LauncherEvent::CleanupFailed {
                id: id.0,
                gs: gs.0,
                why: why.clone(),
            })
        }
        NodeEvent::Protocol(ProtocolEvent::IdleDropFailed { why }) => {
            Some(LauncherEvent::IdleDropFailed {
                id: id.0,
                why: why.clone(),
            })
        }
        NodeEvent::Connected(peer) => Some(LauncherEvent::Connected {
            id: id.0,
            peer: peer.0,
        }),
        NodeEvent::Disconnected { peer, reason } => Some(LauncherEvent::Disconnected {
            id: id.0,
            peer: peer.map(|p| p.0),
            reason: reason.clone(),
        }),
        NodeEvent::Error(message) => Some(LauncherEvent::Error {
            id: id.0,
            message: message.clone(),
        }),
        _ => None,
    }
}

/// Fault injection for tests: the process kills itself with SIGKILL right after one
/// step (1–6) of phase 2 completed at this host, as a host powered off mid-snapshot.
/// Steps are recognised in sequence (colour PRE, drop POST, local snapshot, colour POST,
/// accept POST, clear colour), so actions outside phase 2 never trigger it.
#[derive(Debug)]
pub struct CrashAfterStep {
    inner: Arc<dyn HostActions>,
    step: u8,
    reached: Arc<std::sync::atomic::AtomicU8>,
}

impl CrashAfterStep {
    /// Wraps `inner`; `step` is 1–6 in the thesis's numbering.
    pub fn new(inner: Arc<dyn HostActions>, step: u8) -> Self {
        Self {
            inner,
            step,
            reached: Arc::new(std::sync::atomic::AtomicU8::new(0)),
        }
    }
}

impl HostActions for CrashAfterStep {
    fn perform(
        &self,
        action: crate::protocol::HostAction,
    ) -> futures::future::BoxFuture<'static, crate::protocol::ActionOutcome> {
        use crate::protocol::{Colour, HostAction};
        use futures::FutureExt;
        use std::sync::atomic::Ordering;
        let before = self.reached.load(Ordering::SeqCst);
        let n = match (&action, before) {
            (HostAction::SetOutgoingColour(Colour::Pre), _) => 1,
            (HostAction::DropIncoming(_), 1) => 2,
            (HostAction::TakeLocalSnapshots { .. }, 2) => 3,
            (HostAction::SetOutgoingColour(Colour::Post), 3) => 4,
            (HostAction::AcceptIncoming(_), 4) => 5,
            (HostAction::ClearColour, 5) => 6,
            _ => before,
        };
        self.reached.store(n, Ordering::SeqCst);
        let crash = n == self.step && before != n;
        let fut = self.inner.perform(action);
        async move {
            let out = fut.await;
            if crash {
                tracing::error!(step = n, "fault injection: this host powers off now");
                let _ = nix::sys::signal::kill(
                    nix::unistd::getpid(),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            out
        }
        .boxed()
    }

    fn shutdown(&self) -> futures::future::BoxFuture<'static, HostSummary> {
        self.inner.shutdown()
    }
}

/// Options of [`run_launcher`] that are not in the file.
#[derive(Debug, Clone, Default)]
pub struct LauncherOptions {
    /// Fault injection: crash after this step (1–6) of phase 2.
    pub crash_after_step: Option<u8>,
    /// Bound on registration and on waiting for the cluster (default 60 s).
    pub registration_timeout: Option<Duration>,
}

async fn ms_request(
    ms: SocketAddr,
    transport: &TransportConfig,
    from: ParticipantId,
    message: Message,
) -> Result<Message> {
    let env = Envelope::new(
        transport.cluster,
        from,
        ParticipantId::METADATA_SERVER,
        message,
    );
    Ok(request(ms, transport, env, Duration::from_secs(5))
        .await?
        .message)
}

/// Every registration at the metadata server `ms`, read page by page (`QUERY_LIST
/// {after}` until `more` is false), asking as participant `from`.
pub async fn query_registrations(
    ms: SocketAddr,
    transport: &TransportConfig,
    from: ParticipantId,
) -> Result<Vec<Registration>> {
    let mut all: Vec<Registration> = Vec::new();
    let mut after = None;
    loop {
        match ms_request(ms, transport, from, Message::QueryList { after }).await? {
            Message::List { participants, more } => {
                let last = participants.last().map(|r| r.id);
                all.extend(participants);
                if !more {
                    return Ok(all);
                }
                match last {
                    // Each page must move on, or a faulty server would keep us here.
                    Some(l) if after.map_or(true, |a| l > a) => after = Some(l),
                    _ => {
                        return Err(Error::TransportFrame {
                            peer: ms.to_string(),
                            reason: "answered QUERY_LIST with a page that says more follow \
                                     but does not advance"
                                .to_string(),
                        })
                    }
                }
            }
            Message::Refused { reason } => {
                return Err(Error::PeerRejected {
                    peer: format!("metadata server {ms}"),
                    reason,
                })
            }
            other => {
                return Err(Error::TransportFrame {
                    peer: ms.to_string(),
                    reason: format!("answered {} to QUERY_LIST", other.kind()),
                })
            }
        }
    }
}

/// `fut`, unless `shutdown` comes first (`None`).
async fn unless_shutdown<T>(
    shutdown: &CancellationToken,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<Option<T>> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Ok(None),
        r = fut => r.map(Some),
    }
}

/// Sleeps `d`; `false` if `shutdown` came first.
async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// A host built (its empty chains installed) but not yet given to a node.
struct Pending {
    vm: String,
    id: Option<ParticipantId>,
    port: u16,
    host: Arc<dyn HostActions>,
}

/// What a launcher is made of while it starts: hosts without a node yet, and nodes.
#[derive(Default)]
struct Starting {
    pending: Vec<Pending>,
    nodes: Vec<(String, ParticipantId, NodeHandle)>,
}

impl Starting {
    /// Stops every node and shuts every pending host down (removing their rules),
    /// reporting each VM's summary.
    async fn tear_down(self, on_event: &mut (impl FnMut(LauncherEvent) + Send)) {
        for (vm, id, node) in self.nodes {
            let summary = node.stop().await;
            on_event(LauncherEvent::Summary {
                vm,
                id: Some(id.0),
                summary,
            });
        }
        for p in self.pending {
            let summary = p.host.shutdown().await;
            on_event(LauncherEvent::Summary {
                vm: p.vm,
                id: p.id.map(|i| i.0),
                summary,
            });
        }
    }
}

const BUILDING: &str = "building hosts";
const REGISTERING: &str = "registering";
const WAITING_FOR_CLUSTER: &str = "waiting for the cluster to register";
const WAITING_FOR_COORDINATOR: &str = "waiting for the coordinator's address";

/// Everything [`start_launcher`] needs besides the configuration.
struct StartParams<'a> {
    section: &'a LauncherSection,
    opts: &'a LauncherOptions,
    ms: SocketAddr,
    transport: &'a TransportConfig,
    dscp: DscpConfig,
    timeouts: Timeouts,
    catalog: PathBuf,
    shutdown: &'a CancellationToken,
}

/// Builds the hosts, registers them and starts their nodes, into `st`. `Break(phase)`
/// when `shutdown` came during `phase`.
async fn start_launcher(
    p: StartParams<'_>,
    st: &mut Starting,
    on_event: &mut (impl FnMut(LauncherEvent) + Send),
) -> Result<std::ops::ControlFlow<&'static str>> {
    use std::ops::ControlFlow::{Break, Continue};
    let StartParams {
        section,
        opts,
        ms,
        transport,
        dscp,
        timeouts,
        catalog,
        shutdown,
    } = p;
    let reg_timeout = opts.registration_timeout.unwrap_or(Duration::from_secs(60));
    let reg_deadline = Instant::now() + reg_timeout;

    // Build the hosts first (installing our empty chains), then register.
    let hv = match &section.hypervisor {
        Some(h) => match unless_shutdown(shutdown, open_hypervisor(h)).await? {
            Some(hv) => Some(hv),
            None => return Ok(Break(BUILDING)),
        },
        None => None,
    };
    for vm in &section.vms {
        // Let a pending signal be seen between two hosts.
        tokio::task::yield_now().await;
        if shutdown.is_cancelled() {
            return Ok(Break(BUILDING));
        }
        let method = local_snapshot(vm, hv.as_ref())?;
        let backend = build_vm_backend(section.backend, vm, dscp)?;
        let host: Arc<dyn HostActions> = Arc::new(VmHost::new(&vm.name, backend, method)?);
        let host: Arc<dyn HostActions> = match opts.crash_after_step {
            Some(step) => Arc::new(CrashAfterStep::new(host, step)),
            None => host,
        };
        st.pending.push(Pending {
            vm: vm.name.clone(),
            id: None,
            port: 0,
            host,
        });
    }
    for p in st.pending.iter_mut() {
        let insert = ms_request(
            ms,
            transport,
            ParticipantId::UNREGISTERED,
            Message::Insert {
                addr: section.advertise.to_string(),
                vms: vec![p.vm.clone()],
            },
        );
        let Some(reply) = unless_shutdown(shutdown, insert).await? else {
            return Ok(Break(REGISTERING));
        };
        let (id, port) = match reply {
            Message::Inserted { id, port } => (id, port),
            Message::Refused { reason } => {
                return Err(Error::PeerRejected {
                    peer: format!("metadata server {ms}"),
                    reason,
                })
            }
            other => {
                return Err(Error::TransportFrame {
                    peer: ms.to_string(),
                    reason: format!("answered {} to INSERT", other.kind()),
                })
            }
        };
        p.id = Some(id);
        p.port = port;
        on_event(LauncherEvent::Registered {
            vm: p.vm.clone(),
            id: id.0,
            port,
        });
    }
    // Then start the nodes (the coordinator waits for the whole cluster, this host's
    // other VMs included).
    while let Some(first) = st.pending.first() {
        let (name, host, port) = (first.vm.clone(), first.host.clone(), first.port);
        let id = first.id.unwrap_or(ParticipantId::UNREGISTERED);
        let node = if id.is_coordinator() {
            let listen = SocketAddr::new(section.advertise, port);
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|source| Error::Network {
                    peer: listen.to_string(),
                    action: "listen",
                    source,
                })?;
            // Wait for the whole cluster to register, then learn the participant ids.
            let participants = loop {
                let Some(all) =
                    unless_shutdown(shutdown, query_registrations(ms, transport, id)).await?
                else {
                    return Ok(Break(WAITING_FOR_CLUSTER));
                };
                if all.len() >= section.cluster_size as usize {
                    break all;
                }
                if Instant::now() > reg_deadline {
                    return Err(Error::Timeout {
                        what: format!(
                            "{} VMs to register ({} did)",
                            section.cluster_size,
                            all.len()
                        ),
                        after: reg_timeout,
                    });
                }
                if !pause(shutdown, Duration::from_millis(20)).await {
                    return Ok(Break(WAITING_FOR_CLUSTER));
                }
            };
            let ids: Vec<ParticipantId> = participants
                .iter()
                .map(|r| r.id)
                .filter(|p| !p.is_coordinator())
                .collect();
            let mut cc = CoordinatorConfig::new(transport.cluster, ids, vec![name.clone()]);
            cc.timeouts = timeouts;
            cc.dscp = dscp;
            cc.report_to_metadata_server = true;
            spawn_coordinator(
                cc,
                Some(catalog.clone()),
                listener,
                Some(ms),
                transport.clone(),
                host,
            )
            .await?
        } else {
            let coord = loop {
                let ask = ms_request(
                    ms,
                    transport,
                    id,
                    Message::QueryAddress {
                        id: ParticipantId::COORDINATOR,
                    },
                );
                let Some(reply) = unless_shutdown(shutdown, ask).await? else {
                    return Ok(Break(WAITING_FOR_COORDINATOR));
                };
                match reply {
                    Message::Address { registration } => {
                        let ip: IpAddr =
                            registration
                                .addr
                                .parse()
                                .map_err(|_| Error::InvalidConfig {
                                    reason: format!(
                                        "the coordinator registered the address {:?}, which is not an IP address",
                                        registration.addr
                                    ),
                                })?;
                        break SocketAddr::new(ip, registration.port);
                    }
                    _ if Instant::now() > reg_deadline => {
                        return Err(Error::Timeout {
                            what: "the coordinator to register".to_string(),
                            after: reg_timeout,
                        })
                    }
                    _ => {
                        if !pause(shutdown, Duration::from_millis(20)).await {
                            return Ok(Break(WAITING_FOR_COORDINATOR));
                        }
                    }
                }
            };
            let mut pc = ParticipantConfig::new(transport.cluster, id, vec![name.clone()]);
            pc.timeouts = timeouts;
            pc.dscp = dscp;
            spawn_participant(pc, coord, transport.clone(), host)?
        };
        // The node owns the host now.
        st.pending.remove(0);
        st.nodes.push((name, id, node));
    }
    Ok(Continue(()))
}

/// The catalog file a launcher's coordinator persists to: `[launcher] catalog` /
/// `--catalog`, else [`default_catalog_path`] (its directory created if missing).
pub fn launcher_catalog(cfg: &DaemonConfig) -> Result<PathBuf> {
    match cfg.launcher.as_ref().and_then(|l| l.catalog.clone()) {
        Some(p) => Ok(p),
        None => {
            let p = default_catalog_path(cfg.cluster);
            prepare_catalog_dir(&p)?;
            Ok(p)
        }
    }
}

/// Runs a launcher until `shutdown`: locks the VMs' colouring scopes
/// ([`lock_vm_scopes`]), builds their hosts, registers every VM, runs one participant per
/// VM (the coordinator for id 0, its catalog persisted, see [`launcher_catalog`]),
/// reports events to `on_event`, and on shutdown removes every rule and reports each
/// VM's summary.
///
/// `shutdown` is honoured in every phase: while the hosts are built, while registering,
/// while the coordinator waits for the cluster to register and while a participant waits
/// for the coordinator's address. The launcher then reports
/// [`LauncherEvent::Interrupted`], removes the rules it installed (a
/// [`LauncherEvent::Summary`] per VM) and returns `Ok`. A failure while starting removes
/// them too before the error is returned.
pub async fn run_launcher(
    cfg: &DaemonConfig,
    opts: LauncherOptions,
    shutdown: CancellationToken,
    mut on_event: impl FnMut(LauncherEvent) + Send,
) -> Result<()> {
    let section = cfg.launcher.as_ref().ok_or_else(|| Error::InvalidConfig {
        reason: "no [launcher] section and no --vm flags: nothing to launch".to_string(),
    })?;
    if section.vms.is_empty() {
        return Err(Error::InvalidConfig {
            reason: "the launcher has no VMs; add [[launcher.vm]] entries or --vm".to_string(),
        });
    }
    let ms = cfg.metadata_server()?;
    let transport = cfg.transport()?;
    let dscp = cfg.dscp()?;
    let timeouts = cfg.timeouts();
    let catalog = launcher_catalog(cfg)?;
    let run_dir = section.run_dir.clone().unwrap_or_else(default_run_dir);
    // Before any backend is built: building one removes the rules it finds.
    let locks = lock_vm_scopes(&run_dir, &section.vms)?;
    for l in &locks {
        tracing::debug!(lock = %l.path().display(), "locked a colouring scope");
    }

    let mut st = Starting::default();
    let params = StartParams {
        section,
        opts: &opts,
        ms,
        transport: &transport,
        dscp,
        timeouts,
        catalog,
        shutdown: &shutdown,
    };
    match start_launcher(params, &mut st, &mut on_event).await {
        Ok(std::ops::ControlFlow::Continue(())) => {}
        Ok(std::ops::ControlFlow::Break(phase)) => {
            tracing::info!(phase, "stopping: asked to stop while starting");
            on_event(LauncherEvent::Interrupted {
                phase: phase.to_string(),
            });
            st.tear_down(&mut on_event).await;
            drop(locks);
            return Ok(());
        }
        Err(e) => {
            st.tear_down(&mut on_event).await;
            drop(locks);
            return Err(e);
        }
    }
    let mut nodes = st.nodes;

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(ParticipantId, NodeEvent)>();
    // Forward every node's events to one channel.
    let mut forwarders = Vec::new();
    for (_, id, node) in nodes.iter_mut() {
        let mut rx = std::mem::replace(&mut node.events, mpsc::unbounded_channel().1);
        let tx = ev_tx.clone();
        let id = *id;
        forwarders.push(tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if tx.send((id, e)).is_err() {
                    break;
                }
            }
        }));
    }
    drop(ev_tx);
    let coordinator_peers = nodes
        .iter()
        .find(|(_, id, _)| id.is_coordinator())
        .map(|_| section.cluster_size.saturating_sub(1) as usize);
    let mut ready_sent = coordinator_peers.is_none();
    if coordinator_peers == Some(0) {
        on_event(LauncherEvent::Ready { participants: 0 });
        ready_sent = true;
    }
    loop {
        let item = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = ev_rx.recv() => i,
        };
        let Some((id, ev)) = item else { break };
        if !ready_sent && id.is_coordinator() {
            if let NodeEvent::Connected(_) = ev {
                let want = coordinator_peers.unwrap_or(0);
                let have = nodes
                    .iter()
                    .find(|(_, i, _)| i.is_coordinator())
                    .map(|(_, _, n)| n.connected().len())
                    .unwrap_or(0);
                if have >= want {
                    ready_sent = true;
                    on_event(LauncherEvent::Ready { participants: want });
                }
            }
        }
        if let Some(le) = translate(id, &ev) {
            on_event(le);
        }
    }
    Starting {
        pending: Vec::new(),
        nodes,
    }
    .tear_down(&mut on_event)
    .await;
    for f in forwarders {
        f.abort();
    }
    drop(locks);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let text = r#"
cluster = 7
metadata_server = "10.0.0.1:7000"
dscp_pre = 0x10
dscp_post = 0x12
snapshot_timeout_ms = 120000

[metadata]
listen = "0.0.0.0:7000"
base_port = 7100
results_csv = "global-snapshots.csv"

[launcher]
advertise = "10.0.0.5"
cluster_size = 16
backend = "iptables"

[launcher.hypervisor]
backend = "qemu"
root = "/var/lib/unacloud/vms"

[[launcher.vm]]
name = "web-1"
tap = "uct-web-1"
netns = "pc-5"
"#;
        let c = DaemonConfig::from_toml(text, Path::new("x.toml")).unwrap();
        assert_eq!(c.cluster, 7);
        let l = c.launcher.as_ref().unwrap();
        assert_eq!(l.backend, BackendKind::Iptables);
        assert_eq!(l.vms[0].name, "web-1");
        assert_eq!(c.timeouts().snapshot, Duration::from_secs(120));
        assert_eq!(c.metadata.as_ref().unwrap().base_port, 7100);
        let exec = vm_executor(&l.vms[0]);
        assert_eq!(exec.place(), "netns pc-5");
        let h = l.hypervisor.as_ref().unwrap();
        assert!(h.live);
        assert_eq!(h.margin_mb, 64);
        assert_eq!(l.vms[0].tap.as_deref(), Some("uct-web-1"));
    }

    #[cfg(feature = "hypervisor")]
    #[tokio::test]
    async fn a_launcher_hypervisor_section_opens_the_qemu_backend_or_says_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let section = |backend: &str, accel: Option<&str>| HypervisorSection {
            backend: backend.to_string(),
            root: dir.path().join("vms"),
            live: true,
            margin_mb: 32,
            accel: accel.map(str::to_string),
        };
        let first = open_hypervisor(&section("qemu", Some("tcg")))
            .await
            .unwrap();
        match &first {
            LocalSnapshot::Hypervisor { live, margin, .. } => {
                assert!(*live);
                assert_eq!(*margin, 32 << 20);
            }
            other => panic!("{other:?}"),
        }
        let e = open_hypervisor(&section("vmware", None)).await.unwrap_err();
        assert!(e.to_string().contains("\"vmware\""), "{e}");
        let e = open_hypervisor(&section("qemu", Some("hvf")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("auto, kvm or tcg"), "{e}");
        // The first backend still holds the root: a second one is refused with the reason.
        let e = open_hypervisor(&section("qemu", Some("tcg")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        // A VM without a lab method takes the launcher's hypervisor.
        let vm = VmConfig {
            name: "web-1".to_string(),
            ..VmConfig::default()
        };
        assert!(matches!(
            local_snapshot(&vm, Some(&first)).unwrap(),
            LocalSnapshot::Hypervisor { .. }
        ));
    }

    #[test]
    fn a_vm_without_a_snapshot_method_is_a_configuration_error() {
        let vm = VmConfig {
            name: "web-1".to_string(),
            ..VmConfig::default()
        };
        let e = local_snapshot(&vm, None).unwrap_err();
        assert!(e.to_string().contains("no local-snapshot method"), "{e}");
        let lab = VmConfig {
            lab_sleep_ms: Some(3),
            ..vm.clone()
        };
        assert!(matches!(
            local_snapshot(&lab, None).unwrap(),
            LocalSnapshot::Sleep(d) if d == Duration::from_millis(3)
        ));
        let two = VmConfig {
            freeze_pid: Some(1),
            ..lab
        };
        assert!(local_snapshot(&two, None).is_err());
        let empty = VmConfig {
            snapshot_command: Some(Vec::new()),
            ..vm
        };
        assert!(local_snapshot(&empty, None).is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let e = DaemonConfig::from_toml("cluster = 1\nclustr_size = 3\n", Path::new("c.toml"))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("c.toml") && msg.contains("clustr_size"),
            "{msg}"
        );
        let e = DaemonConfig::from_toml("cluster = \"x\"\n", Path::new("c.toml")).unwrap_err();
        assert!(matches!(e, Error::ConfigFile { .. }));
        let mut c = DaemonConfig::new(1);
        c.dscp_pre = Some(0x12);
        assert!(c.dscp().is_err());
        assert!("pf".parse::<BackendKind>().is_err());
    }

    #[test]
    fn backend_names_round_trip() {
        for k in [
            BackendKind::NftSession,
            BackendKind::NftNetlink,
            BackendKind::Nft,
            BackendKind::Iptables,
        ] {
            assert_eq!(k.name().parse::<BackendKind>().unwrap(), k);
            let toml = format!("[[launcher]]\nbackend = \"{}\"\n", k.name());
            let v: toml::Value = toml::from_str(&toml).unwrap();
            let b: BackendKind = v["launcher"][0]["backend"].clone().try_into().unwrap();
            assert_eq!(b, k);
        }
        // A tap name the kernel would refuse is a configuration error.
        let vm = VmConfig {
            name: "web-1".to_string(),
            tap: Some("no/slash".to_string()),
            ..VmConfig::default()
        };
        let e = build_vm_backend(BackendKind::Iptables, &vm, DscpConfig::default()).unwrap_err();
        assert!(e.to_string().contains("interface name"), "{e}");
        let e = build_backend(
            BackendKind::NftNetlink,
            Arc::new(LocalHost),
            DscpConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("nft-netlink"), "{e}");
    }

    #[test]
    fn node_errors_disconnections_and_missed_releases_become_launcher_events() {
        let json = |ev: NodeEvent| {
            serde_json::to_value(translate(ParticipantId(3), &ev).unwrap()).unwrap()
        };
        let v = json(NodeEvent::Error("bad frame".into()));
        assert_eq!(v["event"], "error");
        assert_eq!(v["id"], 3);
        assert_eq!(v["message"], "bad frame");
        let v = json(NodeEvent::Disconnected {
            peer: Some(ParticipantId(0)),
            reason: Some("reset".into()),
        });
        assert_eq!(v["event"], "disconnected");
        assert_eq!(
            (v["peer"].clone(), v["reason"].clone()),
            (0.into(), "reset".into())
        );
        let v = json(NodeEvent::Disconnected {
            peer: None,
            reason: None,
        });
        assert!(v["peer"].is_null() && v["reason"].is_null(), "{v}");
        let v = json(NodeEvent::Protocol(ProtocolEvent::ReleaseMissed {
            gs: GlobalSnapshotId(9),
        }));
        assert_eq!(v["event"], "release_missed");
        assert_eq!(v["gs"], 9);
        assert_eq!(v["id"], 3);
        let v = json(NodeEvent::Protocol(ProtocolEvent::CleanupFailed {
            gs: GlobalSnapshotId(2),
            why: "EBUSY".into(),
        }));
        assert_eq!(v["event"], "cleanup_failed");
        let v = json(NodeEvent::Protocol(ProtocolEvent::IdleDropFailed {
            why: "EPERM".into(),
        }));
        assert_eq!(v["event"], "idle_drop_failed");
        let v = json(NodeEvent::Connected(ParticipantId(0)));
        assert_eq!(
            (v["event"].clone(), v["peer"].clone()),
            ("connected".into(), 0.into())
        );
        // A summary of a VM that never registered has no id.
        let v = serde_json::to_value(LauncherEvent::Summary {
            vm: "web-1".into(),
            id: None,
            summary: HostSummary::default(),
        })
        .unwrap();
        assert!(v["id"].is_null() && v["leftovers"] == 0, "{v}");
    }

    #[test]
    fn each_colouring_scope_has_its_own_lock_file() {
        let dir = Path::new("/run/x");
        let vm = |netns: Option<&str>, tap: Option<&str>| VmConfig {
            name: "v".into(),
            netns: netns.map(str::to_string),
            tap: tap.map(str::to_string),
            ..VmConfig::default()
        };
        assert_eq!(
            scope_lock_path(dir, &vm(None, None)),
            Path::new("/run/x/launcher-host-all.lock")
        );
        assert_eq!(
            scope_lock_path(dir, &vm(Some("pc-5"), Some("uct-web-1"))),
            Path::new("/run/x/launcher-ns-pc%2D5-tap-uct%2Dweb%2D1.lock")
        );
        // Separators inside names cannot make two scopes share a file.
        assert_ne!(
            scope_lock_path(dir, &vm(Some("x-tap-y"), None)),
            scope_lock_path(dir, &vm(Some("x"), Some("y-all")))
        );
        assert_ne!(
            scope_lock_path(dir, &vm(Some("a/b"), None)),
            scope_lock_path(dir, &vm(Some("a_b"), None))
        );
    }

    #[test]
    fn a_held_scope_lock_names_its_holder_and_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let vms = vec![
            VmConfig {
                name: "web-1".into(),
                netns: Some("pc-5".into()),
                ..VmConfig::default()
            },
            // Same scope as web-1: one lock for both.
            VmConfig {
                name: "web-2".into(),
                netns: Some("pc-5".into()),
                ..VmConfig::default()
            },
        ];
        let held = lock_vm_scopes(dir.path(), &vms).unwrap();
        assert_eq!(held.len(), 1);
        let path = held[0].path().to_path_buf();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        // flock conflicts between two opens even within one process.
        let e = lock_vm_scopes(dir.path(), &vms[1..])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&path.display().to_string())
                && e.contains(&format!("pid {}", std::process::id()))
                && e.contains("web-2")
                && e.contains("another launcher"),
            "{e}"
        );
        // Another scope is free.
        let other = VmConfig {
            name: "db".into(),
            ..VmConfig::default()
        };
        let free = lock_vm_scopes(dir.path(), &[other]).unwrap();
        drop(free);
        drop(held);
        assert!(!path.exists(), "the lock file outlived its lock");
        let again = lock_vm_scopes(dir.path(), &vms).unwrap();
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn the_default_catalog_is_per_cluster_and_its_directory_is_created_private() {
        assert_eq!(
            default_catalog_path(7),
            Path::new("/var/lib/unacloud/catalog-7.json")
        );
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a/b/catalog-7.json");
        prepare_catalog_dir(&file).unwrap();
        let mode = std::fs::metadata(dir.path().join("a/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        prepare_catalog_dir(&file).unwrap();
        // A directory that cannot be created (a file is in the way): a clear error.
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let e = prepare_catalog_dir(&dir.path().join("f/catalog.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot create the catalog directory") && e.contains("--catalog"),
            "{e}"
        );
        // An explicit catalog is used as given.
        let mut cfg = DaemonConfig::new(7);
        cfg.launcher = Some(LauncherSection {
            advertise: "127.0.0.1".parse().unwrap(),
            cluster_size: 1,
            backend: BackendKind::default(),
            catalog: Some(file.clone()),
            run_dir: None,
            hypervisor: None,
            vms: Vec::new(),
        });
        assert_eq!(launcher_catalog(&cfg).unwrap(), file);
    }
}

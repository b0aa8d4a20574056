//! The launcher's TOML configuration: backends, VMs, hypervisor, metadata and launcher sections.

use super::*;

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
        Ok(DscpConfig::new(
            self.dscp_pre.unwrap_or(DscpConfig::DEFAULT_PRE),
            self.dscp_post.unwrap_or(DscpConfig::DEFAULT_POST),
        )?)
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

    pub(super) fn metadata_server(&self) -> Result<SocketAddr> {
        self.metadata_server.ok_or_else(|| Error::InvalidConfig {
            reason: "no metadata server address: set `metadata_server` or pass --ms".to_string(),
        })
    }
}

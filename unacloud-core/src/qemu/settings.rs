//! The QEMU backend's on-disk state: one small JSON settings file per VM and a
//! registry of VMs and disks per backend root. Both are written atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{DiskInfo, Uuid};

/// Format marker written into every VM settings file.
pub(crate) const SETTINGS_FORMAT: &str = "unacloud-qemu-vm/2";
/// The previous format, read as long as it records no snapshots (its snapshots were
/// internal qcow2 snapshots, which this version does not take).
const SETTINGS_FORMAT_V1: &str = "unacloud-qemu-vm/1";
/// Format marker of the registry (paths inside the root are stored relative to it).
pub(crate) const REGISTRY_FORMAT: &str = "unacloud-qemu-registry/2";
/// The previous format, with absolute paths: read, converted on the next write.
const REGISTRY_FORMAT_V1: &str = "unacloud-qemu-registry/1";

/// The multiattach template a VM disk is a differencing child of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    /// The template's uuid in the registry where the VM was created.
    pub uuid: Uuid,
    /// The template's file name: how another host's copy is found.
    pub file_name: String,
    /// Where the template was when the overlay was created.
    pub path: PathBuf,
    /// The template's image format.
    pub format: String,
}

/// One disk slot of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSlot {
    /// Storage controller name.
    pub controller: String,
    /// Port.
    pub port: u32,
    /// Device.
    pub device: u32,
    /// The attached image; relative paths are relative to the VM's folder.
    pub file: PathBuf,
    /// The attached image's uuid.
    pub uuid: Uuid,
    /// Whether the image belongs to this VM (deleted with it, copied when it moves).
    pub own: bool,
    /// The multiattach template below the image, if any.
    #[serde(default)]
    pub base: Option<BaseRef>,
    /// Virtual size of the image in bytes, when known.
    #[serde(default)]
    pub logical_size: Option<u64>,
}

/// The image a disk slot was frozen in when a snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenDisk {
    /// Storage controller name of the slot.
    pub controller: String,
    /// Port of the slot.
    pub port: u32,
    /// Device of the slot.
    pub device: u32,
    /// The frozen image, relative to the VM's folder.
    pub file: PathBuf,
    /// The frozen image's uuid.
    pub uuid: Uuid,
}

impl FrozenDisk {
    /// Whether this is the frozen image of the disk in `slot` (same controller, port
    /// and device).
    pub fn is_of(&self, slot: &DiskSlot) -> bool {
        self.controller == slot.controller && self.port == slot.port && self.device == slot.device
    }
}

impl SnapshotMeta {
    /// The image the disk in `slot` was frozen in at this snapshot; settings that record
    /// none are corrupt (`settings_at` names them in the error).
    pub(crate) fn frozen_for(&self, slot: &DiskSlot, settings_at: &Path) -> Result<&FrozenDisk> {
        self.disks
            .iter()
            .find(|f| f.is_of(slot))
            .ok_or_else(|| Error::Corrupt {
                what: "QEMU VM settings",
                path: settings_at.to_owned(),
                reason: format!(
                    "snapshot {} records no image for disk {}:{}:{}",
                    self.name, slot.controller, slot.port, slot.device
                ),
                backup: None,
            })
    }
}

/// Files to boot the guest's kernel directly (`-kernel`, `-initrd`, `-append`), for
/// images such as the reference guest whose disk holds no boot loader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFiles {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initial RAM disk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line words (the backend adds `console=ttyS0` and the
    /// network settings).
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// How a VM's network adapter is connected.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum NetConfig {
    /// No network adapter.
    #[default]
    None,
    /// QEMU's user-mode network (outgoing connections only).
    User,
    /// A tap device, optionally inside a named network namespace (`ip netns`), with a
    /// fixed MAC; the guest configures `ip` (address/prefix) and `gateway` itself from
    /// the kernel command line (no DHCP).
    Tap {
        /// The network namespace that holds the tap (`None`: the backend's own).
        #[serde(default)]
        netns: Option<String>,
        /// The tap's interface name.
        ifname: String,
        /// The guest's address with prefix length, e.g. `10.77.0.2/24`.
        #[serde(default)]
        ip: Option<String>,
        /// The guest's default gateway.
        #[serde(default)]
        gateway: Option<String>,
        /// The adapter's MAC address.
        mac: String,
    },
}

impl NetConfig {
    /// Parses the command-line form `none`, `user` or `tap:<netns>:<ifname>:<ip/prefix>`
    /// (an empty netns means the caller's own); `mac` is used for a tap.
    pub fn parse(text: &str, mac: &str) -> Result<NetConfig> {
        match text {
            "none" => return Ok(NetConfig::None),
            "user" => return Ok(NetConfig::User),
            _ => {}
        }
        let parts: Vec<&str> = text.splitn(4, ':').collect();
        match parts.as_slice() {
            ["tap", netns, ifname, ip] if !ifname.is_empty() => {
                if ifname.len() > 15
                    || !ifname
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                {
                    return Err(Error::InvalidInput(format!(
                        "tap interface name {ifname:?} must be 1-15 letters, digits, '-', '_' or '.'"
                    )));
                }
                let ip = check_cidr(ip)?;
                Ok(NetConfig::Tap {
                    netns: (!netns.is_empty()).then(|| (*netns).to_owned()),
                    ifname: (*ifname).to_owned(),
                    ip: Some(ip),
                    gateway: None,
                    mac: mac.to_owned(),
                })
            }
            _ => Err(Error::InvalidInput(format!(
                "network {text:?}: expected none, user or tap:<netns>:<ifname>:<ip/prefix>"
            ))),
        }
    }
}

fn check_cidr(text: &str) -> Result<String> {
    let bad = || {
        Error::InvalidInput(format!(
            "{text:?} is not an IPv4 address with a prefix length (like 10.77.0.2/24)"
        ))
    };
    let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
    addr.parse::<std::net::Ipv4Addr>().map_err(|_| bad())?;
    match prefix.parse::<u8>() {
        Ok(p) if p <= 32 => Ok(text.to_owned()),
        _ => Err(bad()),
    }
}

/// A memory state the VM resumes from at its next start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// The state file, relative to the VM's folder.
    pub file: PathBuf,
    /// The snapshot the file belongs to (it is then kept after the start); `None` for
    /// a state saved by `save_state`, which is deleted once the VM runs again.
    #[serde(default)]
    pub snapshot: Option<String>,
}

/// A multi-step operation that had begun when the settings were last written: replayed
/// or rolled back when the backend next opens the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOp {
    /// What was under way (`snapshot` or `save-state`).
    pub op: String,
    /// The snapshot's tag, for a snapshot.
    #[serde(default)]
    pub tag: Option<String>,
    /// Files the operation creates, relative to the VM's folder; removed on roll-back.
    #[serde(default)]
    pub new_files: Vec<PathBuf>,
    /// The operation paused a running guest: a roll-back lets it run again.
    #[serde(default)]
    pub resume_after: bool,
}

/// One snapshot as the settings remember it. A snapshot freezes each disk's current
/// image (the VM continues on a new overlay above it) and, for a running VM, writes the
/// memory to its own state file, the way VirtualBox lays out its `Snapshots` folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The snapshot's identifier (`uc-<uuid>`).
    pub tag: String,
    /// The user's name.
    pub name: String,
    /// The user's description.
    #[serde(default)]
    pub description: Option<String>,
    /// The tag of the parent snapshot.
    #[serde(default)]
    pub parent: Option<String>,
    /// The image each disk slot was frozen in.
    #[serde(default)]
    pub disks: Vec<FrozenDisk>,
    /// The memory state, relative to the VM's folder (`None`: taken while the VM was
    /// off; restoring it powers the VM off).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// When it was taken (ISO 8601, UTC).
    #[serde(default)]
    pub time_stamp: Option<String>,
    /// How long the guest was paused to take it, in microseconds (`None`: taken while
    /// the VM was off, or by an older version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_us: Option<u64>,
    /// How long taking it took, from the call until it was durable and recorded, in
    /// microseconds (`None` for older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_us: Option<u64>,
}

/// A VM's settings file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSettings {
    /// Always `unacloud-qemu-vm/1`.
    pub format: String,
    /// The VM's uuid.
    pub uuid: Uuid,
    /// The VM's name.
    pub name: String,
    /// Virtual CPUs.
    pub cores: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Guest OS type.
    #[serde(default)]
    pub os_type: Option<String>,
    /// Host interface the first network adapter is bridged to.
    #[serde(default)]
    pub bridge_adapter: Option<String>,
    /// Disk slots.
    #[serde(default)]
    pub disks: Vec<DiskSlot>,
    /// Snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotMeta>,
    /// Tag of the snapshot the current state hangs below.
    #[serde(default)]
    pub current_snapshot: Option<String>,
    /// The template version the VM was built from, if recorded.
    #[serde(default)]
    pub template: Option<String>,
    /// Direct kernel boot, when the disk has no boot loader.
    #[serde(default)]
    pub boot: Option<BootFiles>,
    /// The network adapter.
    #[serde(default)]
    pub net: NetConfig,
    /// The memory state the next start resumes from (the VM is then `Saved`).
    #[serde(default)]
    pub saved_state: Option<SavedState>,
    /// The VM's process ended without being powered off (a power cut, a kill).
    #[serde(default)]
    pub aborted: bool,
    /// An operation that had begun and not finished.
    #[serde(default)]
    pub pending: Option<PendingOp>,
}

impl VmSettings {
    /// Reads and validates a settings file (e.g. to check a template VM's settings
    /// against the image requirements with
    /// [`ImageSettings::from_qemu_settings`](crate::provision::catalog::ImageSettings::from_qemu_settings)).
    pub fn load(path: &Path) -> Result<VmSettings> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound {
                    kind: "VM settings file",
                    id: path.display().to_string(),
                }
            } else {
                Error::io(path, e)
            }
        })?;
        let s: VmSettings = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            what: "QEMU VM settings",
            path: path.to_owned(),
            reason: e.to_string(),
            backup: None,
        })?;
        let old_without_snapshots = s.format == SETTINGS_FORMAT_V1 && s.snapshots.is_empty();
        if s.format != SETTINGS_FORMAT && !old_without_snapshots {
            return Err(Error::Corrupt {
                what: "QEMU VM settings",
                path: path.to_owned(),
                reason: format!("format {:?}, expected {SETTINGS_FORMAT:?}", s.format),
                backup: None,
            });
        }
        validate_name(&s.name)?;
        s.check_paths(path)?;
        Ok(s)
    }

    /// Every file a settings file names inside its folder must stay inside it: a
    /// hostile or damaged file cannot make the backend write or delete elsewhere.
    fn check_paths(&self, path: &Path) -> Result<()> {
        let inside = |p: &Path| {
            !p.is_absolute()
                && p.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
        };
        let mut named: Vec<&Path> = Vec::new();
        for m in &self.snapshots {
            named.extend(m.disks.iter().map(|d| d.file.as_path()));
            named.extend(m.state_file.as_deref());
        }
        named.extend(self.saved_state.as_ref().map(|s| s.file.as_path()));
        if let Some(p) = &self.pending {
            named.extend(p.new_files.iter().map(PathBuf::as_path));
        }
        named.extend(
            self.disks
                .iter()
                .filter(|d| d.own)
                .map(|d| d.file.as_path()),
        );
        match named.into_iter().find(|p| !inside(p)) {
            Some(bad) => Err(Error::Corrupt {
                what: "QEMU VM settings",
                path: path.to_owned(),
                reason: format!(
                    "{} is not a plain relative path inside the VM's folder",
                    bad.display()
                ),
                backup: None,
            }),
            None => Ok(()),
        }
    }

    /// Writes the settings atomically.
    pub(crate) fn save(&self, path: &Path, durable: bool) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| Error::InvalidInput(e.to_string()))?;
        crate::fsutil::write_atomic_with(path, &bytes, durable)
    }

    /// The absolute path of a slot's image.
    pub(crate) fn disk_path(folder: &Path, slot: &DiskSlot) -> PathBuf {
        if slot.file.is_absolute() {
            slot.file.clone()
        } else {
            folder.join(&slot.file)
        }
    }
}

/// A VM name must be usable as a file name.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.starts_with('.')
        || name.len() > 200
        || name
            .chars()
            .any(|c| c == '/' || c == '\\' || c == '\0' || c.is_control());
    if bad {
        return Err(Error::InvalidInput(format!(
            "VM name {name:?} cannot be used as a folder name; use letters, digits, '-', '_' \
             or spaces, not starting with '.'"
        )));
    }
    Ok(())
}

/// The backend's registry: which settings files are registered VMs, and which disks were
/// registered on their own (templates and other images, with their write mode). A VM's
/// own images are described by its settings file only, so they are never recorded twice.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Registry {
    pub format: String,
    pub vms: Vec<PathBuf>,
    pub disks: Vec<DiskInfo>,
    /// Kernel and initrd of templates that boot directly, by the template's uuid.
    #[serde(default)]
    pub boot: std::collections::BTreeMap<Uuid, BootFiles>,
    /// The root this registry was last written for.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Absolute paths outside the root that came from a registry written for another
    /// root (a copied root): the backend never deletes them.
    #[serde(default)]
    pub foreign: Vec<PathBuf>,
}

impl Registry {
    /// The registry as read from `root/registry.json`, with every path made absolute;
    /// absolute paths outside `root` from a registry written for another root (or by
    /// the previous format) are marked foreign.
    pub(crate) fn resolve(mut self, root: &Path) -> Registry {
        use super::journal::abs;
        let copied = self.root.as_deref() != Some(root);
        let mut foreign: Vec<PathBuf> = self.foreign.iter().map(|p| abs(root, p)).collect();
        let mut mark = |p: &Path| {
            if copied && p.is_absolute() && !p.starts_with(root) && !foreign.iter().any(|f| f == p)
            {
                foreign.push(p.to_path_buf());
            }
        };
        for v in &self.vms {
            mark(v);
        }
        for d in &self.disks {
            mark(&d.location);
        }
        self.vms = self.vms.iter().map(|p| abs(root, p)).collect();
        for d in &mut self.disks {
            d.location = abs(root, &d.location);
        }
        for b in self.boot.values_mut() {
            b.kernel = abs(root, &b.kernel);
            b.initrd = b.initrd.as_deref().map(|i| abs(root, i));
        }
        self.foreign = foreign;
        self.root = Some(root.to_path_buf());
        self.format = REGISTRY_FORMAT.to_owned();
        self
    }

    /// The registry as stored: paths inside `root` relative to it.
    pub(crate) fn stored(&self, root: &Path) -> Registry {
        use super::journal::rel;
        let mut r = self.clone();
        r.vms = r.vms.iter().map(|p| rel(root, p)).collect();
        for d in &mut r.disks {
            d.location = rel(root, &d.location);
        }
        for b in r.boot.values_mut() {
            b.kernel = rel(root, &b.kernel);
            b.initrd = b.initrd.as_deref().map(|i| rel(root, i));
        }
        r.foreign = r.foreign.iter().map(|p| rel(root, p)).collect();
        r.root = Some(root.to_path_buf());
        r.format = REGISTRY_FORMAT.to_owned();
        r
    }

    pub(crate) fn load(path: &Path) -> Result<Registry> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let r: Registry = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
                    what: "QEMU backend registry",
                    path: path.to_owned(),
                    reason: e.to_string(),
                    backup: None,
                })?;
                if r.format != REGISTRY_FORMAT && r.format != REGISTRY_FORMAT_V1 {
                    return Err(Error::Corrupt {
                        what: "QEMU backend registry",
                        path: path.to_owned(),
                        reason: format!("format {:?}, expected {REGISTRY_FORMAT:?}", r.format),
                        backup: None,
                    });
                }
                Ok(r)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry {
                format: REGISTRY_FORMAT.to_owned(),
                ..Default::default()
            }),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    pub(crate) fn save(&self, path: &Path, durable: bool) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| Error::InvalidInput(e.to_string()))?;
        crate::fsutil::write_atomic_with(path, &bytes, durable)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn network_forms_parse_and_bad_ones_are_typed_errors() {
        assert_eq!(NetConfig::parse("none", "m").unwrap(), NetConfig::None);
        assert_eq!(NetConfig::parse("user", "m").unwrap(), NetConfig::User);
        match NetConfig::parse("tap:pc1:tap0:10.77.0.2/24", "52:54:00:00:00:01").unwrap() {
            NetConfig::Tap {
                netns,
                ifname,
                ip,
                mac,
                ..
            } => {
                assert_eq!(netns.as_deref(), Some("pc1"));
                assert_eq!(
                    (ifname.as_str(), ip.as_deref()),
                    ("tap0", Some("10.77.0.2/24"))
                );
                assert_eq!(mac, "52:54:00:00:00:01");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            NetConfig::parse("tap::tap0:10.0.0.1/8", "m").unwrap(),
            NetConfig::Tap { netns: None, .. }
        ));
        for bad in [
            "bridge",
            "tap:ns:tap0",
            "tap:ns::10.0.0.1/24",
            "tap:ns:tap0:10.0.0.1",
            "tap:ns:tap0:10.0.0.300/24",
            "tap:ns:tap0:10.0.0.1/33",
            "tap:ns:a-very-long-tap-name:10.0.0.1/24",
            "tap:ns:ta p:10.0.0.1/24",
        ] {
            assert!(
                matches!(NetConfig::parse(bad, "m"), Err(Error::InvalidInput(_))),
                "{bad:?} was accepted"
            );
        }
    }
}

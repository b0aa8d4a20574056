//! Identifiers and model types shared by every backend.
//!
//! All types are serde-serialisable so they can be stored, sent to an agent or handed to
//! Python as plain dictionaries.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
/// Disk, snapshot and VM identities. [`Uuid::try_parse`] reads every form users and
/// VirtualBox write, braces included, so callers need no trimming of their own:
///
/// ```
/// use unacloud_core::model::Uuid;
/// let plain = Uuid::try_parse("9e02c1a4-8d56-4c4c-9c3a-6f0f5f3c2b1d").unwrap();
/// assert_eq!(Uuid::try_parse("{9e02c1a4-8d56-4c4c-9c3a-6f0f5f3c2b1d}").unwrap(), plain);
/// assert_eq!(Uuid::try_parse("{9E02C1A4-8D56-4C4C-9C3A-6F0F5F3C2B1D}").unwrap(), plain);
/// ```
pub use uuid::Uuid;

use crate::error::Error;

/// How a VM is named to a hypervisor: its name or its uuid, as the hypervisor's own
/// tools accept (`VBoxManage startvm <name|uuid>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmId(pub String);

impl VmId {
    /// Wraps a name or uuid.
    pub fn new(id: impl Into<String>) -> Self {
        VmId(id.into())
    }
    /// The name or uuid as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for VmId {
    fn from(s: &str) -> Self {
        VmId(s.to_owned())
    }
}

impl From<String> for VmId {
    fn from(s: String) -> Self {
        VmId(s)
    }
}

/// A physical machine (lab PC) as named by the desktop cloud.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostId(pub String);

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for HostId {
    fn from(s: &str) -> Self {
        HostId(s.to_owned())
    }
}

/// The write mode of a virtual disk (VirtualBox's medium types, thesis §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum DiskType {
    /// Read-write, attachable to one running VM; snapshots create differencing images.
    #[default]
    Normal,
    /// Writes go to a differencing image that is discarded when the VM powers off.
    Immutable,
    /// Not affected by snapshots.
    Writethrough,
    /// Attachable read-write to several VMs at once (fixed-size images only).
    Shareable,
    /// Read-only (DVD-like).
    Readonly,
    /// Read-only base shared by many running VMs, each writing to its own differencing
    /// child: the basis of template provisioning.
    MultiAttach,
}

impl DiskType {
    /// The spelling VirtualBox writes in settings files and expects on its command line
    /// (`--type multiattach` takes the lower-case form, see [`DiskType::as_cli`]).
    pub fn as_settings(self) -> &'static str {
        match self {
            DiskType::Normal => "Normal",
            DiskType::Immutable => "Immutable",
            DiskType::Writethrough => "Writethrough",
            DiskType::Shareable => "Shareable",
            DiskType::Readonly => "Readonly",
            DiskType::MultiAttach => "MultiAttach",
        }
    }

    /// The lower-case spelling used by `VBoxManage modifymedium --type` and
    /// `storageattach --mtype`.
    pub fn as_cli(self) -> &'static str {
        match self {
            DiskType::Normal => "normal",
            DiskType::Immutable => "immutable",
            DiskType::Writethrough => "writethrough",
            DiskType::Shareable => "shareable",
            DiskType::Readonly => "readonly",
            DiskType::MultiAttach => "multiattach",
        }
    }
}

impl fmt::Display for DiskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_settings())
    }
}

impl FromStr for DiskType {
    type Err = Error;
    /// Case-insensitive; accepts the settings and the command-line spellings.
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "normal" => DiskType::Normal,
            "immutable" => DiskType::Immutable,
            "writethrough" => DiskType::Writethrough,
            "shareable" => DiskType::Shareable,
            "readonly" => DiskType::Readonly,
            "multiattach" => DiskType::MultiAttach,
            _ => return Err(Error::InvalidInput(format!("unknown disk type {s:?}"))),
        })
    }
}

/// The file format of a disk image.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DiskFormat {
    /// VirtualBox Disk Image.
    Vdi,
    /// VMware disk.
    Vmdk,
    /// Microsoft Virtual Hard Disk.
    Vhd,
    /// QEMU copy-on-write v2.
    Qcow2,
    /// Raw image.
    Raw,
    /// Anything else, as written by the tool.
    Other(String),
}

impl DiskFormat {
    /// Parses a format name case-insensitively (`VDI`, `vdi`, `qcow2`, …).
    pub fn parse(s: &str) -> DiskFormat {
        match s.to_ascii_lowercase().as_str() {
            "vdi" => DiskFormat::Vdi,
            "vmdk" => DiskFormat::Vmdk,
            "vhd" | "vpc" => DiskFormat::Vhd,
            "qcow2" => DiskFormat::Qcow2,
            "raw" => DiskFormat::Raw,
            _ => DiskFormat::Other(s.to_owned()),
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskFormat::Vdi => f.write_str("VDI"),
            DiskFormat::Vmdk => f.write_str("VMDK"),
            DiskFormat::Vhd => f.write_str("VHD"),
            DiskFormat::Qcow2 => f.write_str("qcow2"),
            DiskFormat::Raw => f.write_str("raw"),
            DiskFormat::Other(s) => f.write_str(s),
        }
    }
}

/// The hardware profiles a deployment may request (thesis Table 2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HardwareProfile {
    /// 1 core, 1 GB of RAM.
    Small,
    /// 2 cores, 2 GB of RAM.
    Medium,
    /// 3 cores, 4 GB of RAM.
    Large,
    /// 4 cores, 8 GB of RAM.
    ExtraLarge,
}

impl HardwareProfile {
    /// Every profile, smallest first.
    pub const ALL: [HardwareProfile; 4] = [
        HardwareProfile::Small,
        HardwareProfile::Medium,
        HardwareProfile::Large,
        HardwareProfile::ExtraLarge,
    ];

    /// Virtual CPU cores.
    pub fn cores(self) -> u32 {
        match self {
            HardwareProfile::Small => 1,
            HardwareProfile::Medium => 2,
            HardwareProfile::Large => 3,
            HardwareProfile::ExtraLarge => 4,
        }
    }

    /// Memory in MiB (the unit of `VBoxManage modifyvm --memory`).
    pub fn memory_mb(self) -> u64 {
        match self {
            HardwareProfile::Small => 1024,
            HardwareProfile::Medium => 2048,
            HardwareProfile::Large => 4096,
            HardwareProfile::ExtraLarge => 8192,
        }
    }

    /// The kebab-case name (`extra-large`).
    pub fn as_str(self) -> &'static str {
        match self {
            HardwareProfile::Small => "small",
            HardwareProfile::Medium => "medium",
            HardwareProfile::Large => "large",
            HardwareProfile::ExtraLarge => "extra-large",
        }
    }
}

impl fmt::Display for HardwareProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HardwareProfile {
    type Err = Error;
    /// Accepts `small`, `medium`, `large`, `extra-large` (also `extralarge`, `xl`),
    /// case-insensitively.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "small" | "s" => Ok(HardwareProfile::Small),
            "medium" | "m" => Ok(HardwareProfile::Medium),
            "large" | "l" => Ok(HardwareProfile::Large),
            "extra-large" | "extralarge" | "xl" => Ok(HardwareProfile::ExtraLarge),
            _ => Err(Error::UnknownProfile(s.to_owned())),
        }
    }
}

/// A VM's power state as reported by its hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerState {
    /// Not running, no saved state.
    PoweredOff,
    /// Not running; memory saved to a state file.
    Saved,
    /// Stopped abnormally (host crash, hypervisor killed).
    Aborted,
    /// Running.
    Running,
    /// Paused in memory.
    Paused,
    /// Starting up.
    Starting,
    /// Shutting down.
    Stopping,
    /// Saving its state.
    Saving,
    /// Restoring a saved state.
    Restoring,
    /// Taking a snapshot while running.
    LiveSnapshotting,
    /// Hung; needs to be powered off.
    Stuck,
    /// A state this library does not model, verbatim.
    Other(String),
}

impl PowerState {
    /// Whether the guest is executing (or about to): a global snapshot's phase 1
    /// requires this of every VM.
    pub fn is_running(&self) -> bool {
        matches!(self, PowerState::Running | PowerState::LiveSnapshotting)
    }

    /// Whether the VM can be started (powered off, saved or aborted).
    pub fn is_startable(&self) -> bool {
        matches!(
            self,
            PowerState::PoweredOff | PowerState::Saved | PowerState::Aborted
        )
    }
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            PowerState::PoweredOff => "powered off",
            PowerState::Saved => "saved",
            PowerState::Aborted => "aborted",
            PowerState::Running => "running",
            PowerState::Paused => "paused",
            PowerState::Starting => "starting",
            PowerState::Stopping => "stopping",
            PowerState::Saving => "saving",
            PowerState::Restoring => "restoring",
            PowerState::LiveSnapshotting => "live snapshotting",
            PowerState::Stuck => "stuck",
            PowerState::Other(s) => s,
        };
        f.write_str(s)
    }
}

/// A physical machine of the desktop cloud with the resources it can give to VMs now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// The host's identifier.
    pub id: HostId,
    /// Cores free for VMs.
    pub free_cores: u32,
    /// Memory free for VMs, MiB.
    pub free_memory_mb: u64,
    /// Disk free in the VM folder, bytes.
    pub free_disk_bytes: u64,
    /// Whether a student is logged in at the console (the Sorting algorithm prefers such
    /// hosts: they are less likely to be switched off).
    #[serde(default)]
    pub user_logged_in: bool,
    /// Templates (by template id) already preloaded on this host.
    #[serde(default)]
    pub preloaded_templates: Vec<String>,
}

impl Host {
    /// A host with the given free resources, no user logged in and nothing preloaded.
    pub fn new(
        id: impl Into<String>,
        free_cores: u32,
        free_memory_mb: u64,
        free_disk_bytes: u64,
    ) -> Self {
        Host {
            id: HostId(id.into()),
            free_cores,
            free_memory_mb,
            free_disk_bytes,
            user_logged_in: false,
            preloaded_templates: Vec::new(),
        }
    }
}

/// A disk registered with a hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The image's uuid.
    pub uuid: Uuid,
    /// Where the image file is.
    pub location: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Its write mode.
    pub disk_type: DiskType,
    /// The differencing parent, if this is a differencing image.
    pub parent: Option<Uuid>,
    /// Virtual size in bytes, when known.
    pub logical_size: Option<u64>,
}

/// Where a disk is plugged into a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAttachment {
    /// Storage controller name ("SATA", "IDE Controller", …).
    pub controller: String,
    /// Port on the controller.
    pub port: u32,
    /// Device on the port.
    pub device: u32,
    /// The image attached there (for a multiattach template: the VM's own
    /// differencing child, never the template itself).
    pub disk: Uuid,
}

/// A VM as a hypervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's name.
    pub name: String,
    /// The VM's uuid, when the hypervisor has one.
    pub uuid: Option<Uuid>,
    /// Its power state.
    pub state: PowerState,
    /// Virtual CPUs.
    pub cores: u32,
    /// Memory, MiB.
    pub memory_mb: u64,
    /// Attached disks.
    pub disks: Vec<DiskAttachment>,
    /// Identifier of the current snapshot (the one the current state hangs below).
    pub current_snapshot: Option<String>,
    /// Where the VM's settings live, when it has a file.
    pub settings_file: Option<PathBuf>,
    /// The template version the VM was built from, if any.
    #[serde(default)]
    pub template: Option<String>,
}

/// What to create: a VM's name, hardware and network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The VM's name (unique per hypervisor).
    pub name: String,
    /// Hardware profile.
    pub profile: HardwareProfile,
    /// Guest OS type as the hypervisor names it (e.g. `Ubuntu_64`).
    pub os_type: Option<String>,
    /// Host network interface to bridge the first adapter to (thesis Table 2.2 requires a
    /// bridged adapter); `None` leaves the default (NAT).
    pub bridge_adapter: Option<String>,
    /// Folder that holds the VM's files; the backend's default when `None`.
    pub base_folder: Option<PathBuf>,
    /// Memory in MiB instead of the profile's (small guests in labs and tests).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Virtual CPUs instead of the profile's.
    #[serde(default)]
    pub cores: Option<u32>,
}

impl VmSpec {
    /// A spec with only a name and a profile.
    pub fn new(name: impl Into<String>, profile: HardwareProfile) -> Self {
        VmSpec {
            name: name.into(),
            profile,
            os_type: None,
            bridge_adapter: None,
            base_folder: None,
            memory_mb: None,
            cores: None,
        }
    }

    /// Sets the memory in MiB, overriding the profile's.
    ///
    /// ```
    /// use unacloud_core::model::{HardwareProfile, VmSpec};
    /// let spec = VmSpec::new("tiny", HardwareProfile::Small).with_memory_mb(128).with_cores(1);
    /// assert_eq!((spec.effective_memory_mb(), spec.effective_cores()), (128, 1));
    /// ```
    pub fn with_memory_mb(mut self, memory_mb: u64) -> Self {
        self.memory_mb = Some(memory_mb);
        self
    }

    /// Sets the number of virtual CPUs, overriding the profile's.
    pub fn with_cores(mut self, cores: u32) -> Self {
        self.cores = Some(cores);
        self
    }

    /// The memory the VM gets: the override, else the profile's.
    pub fn effective_memory_mb(&self) -> u64 {
        self.memory_mb.unwrap_or_else(|| self.profile.memory_mb())
    }

    /// The virtual CPUs the VM gets: the override, else the profile's.
    pub fn effective_cores(&self) -> u32 {
        self.cores.unwrap_or_else(|| self.profile.cores())
    }
}

/// Free and total space of the file system holding a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpace {
    /// Bytes available to unprivileged users.
    pub available: u64,
    /// Total bytes.
    pub total: u64,
}

/// Returns the free space of the file system holding `path` (`statvfs`).
///
/// ```
/// let space = unacloud_core::model::disk_space(std::path::Path::new(".")).unwrap();
/// assert!(space.total >= space.available);
/// ```
pub fn disk_space(path: &std::path::Path) -> crate::Result<DiskSpace> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Error::io(path, std::io::Error::from_raw_os_error(e as i32)))?;
    let frag = st.fragment_size() as u64;
    Ok(DiskSpace {
        available: (st.blocks_available() as u64).saturating_mul(frag),
        total: (st.blocks() as u64).saturating_mul(frag),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn profiles_match_thesis_table_2_3() {
        let got: Vec<(u32, u64)> = HardwareProfile::ALL
            .iter()
            .map(|p| (p.cores(), p.memory_mb()))
            .collect();
        assert_eq!(got, vec![(1, 1024), (2, 2048), (3, 4096), (4, 8192)]);
    }

    #[test]
    fn unknown_profile_is_a_typed_error() {
        let err = "huge".parse::<HardwareProfile>().unwrap_err();
        assert!(matches!(err, Error::UnknownProfile(ref s) if s == "huge"));
        assert_eq!(
            "Extra-Large".parse::<HardwareProfile>().unwrap(),
            HardwareProfile::ExtraLarge
        );
    }

    #[test]
    fn disk_type_round_trips_both_spellings() {
        for t in [
            DiskType::Normal,
            DiskType::Immutable,
            DiskType::Writethrough,
            DiskType::Shareable,
            DiskType::Readonly,
            DiskType::MultiAttach,
        ] {
            assert_eq!(t.as_settings().parse::<DiskType>().unwrap(), t);
            assert_eq!(t.as_cli().parse::<DiskType>().unwrap(), t);
        }
        assert!("weird".parse::<DiskType>().is_err());
    }
}

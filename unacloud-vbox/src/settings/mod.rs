//! VirtualBox settings files: machine `.vbox` files and the global `VirtualBox.xml`.
//!
//! [`MachineSettings::parse_str`] and [`GlobalRegistry::parse_str`] read a document
//! in one streaming pass (quick-xml events, no DOM) into plain data: the machine's
//! identity and hardware, its media registry and its snapshot tree. Everything is
//! matched on local names, so both namespaces VirtualBox has used
//! (`http://www.virtualbox.org/` and `http://www.innotek.de/VirtualBox-settings`) and
//! no namespace at all are accepted, for settings versions 1.12 to 1.19.
//!
//! Two layout differences between versions are handled:
//!
//! * `<StorageControllers>` is a sibling of `<Hardware>` up to 1.16 and a child of it
//!   from 1.17 on, for the machine and for every snapshot;
//! * the root `<Snapshot>` is a child of `<Machine>`, while its children are wrapped in
//!   `<Snapshots>`.
//!
//! Snapshots and hard disks are stored as flat arenas in document (pre-)order with
//! parent indices, so arbitrarily deep trees need no recursion to build, walk or drop.
//! Hostile input is bounded by [`ParseLimits`].
//!
//! ```
//! use unacloud_vbox::settings::MachineSettings;
//!
//! let xml = r#"<?xml version="1.0"?>
//! <VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
//!   <Machine uuid="{11111111-1111-1111-1111-111111111111}" name="TM" OSType="Ubuntu_64"
//!            currentSnapshot="{22222222-2222-2222-2222-222222222222}">
//!     <MediaRegistry><HardDisks>
//!       <HardDisk uuid="{aaaaaaaa-0000-0000-0000-000000000001}" location="TM.vdi" format="VDI" type="Normal">
//!         <HardDisk uuid="{aaaaaaaa-0000-0000-0000-000000000002}" location="Snapshots/{aaaaaaaa-0000-0000-0000-000000000002}.vdi" format="VDI"/>
//!       </HardDisk>
//!     </HardDisks></MediaRegistry>
//!     <Snapshot uuid="{22222222-2222-2222-2222-222222222222}" name="installed" timeStamp="2024-01-01T00:00:00Z">
//!       <Hardware><StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">
//!         <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{aaaaaaaa-0000-0000-0000-000000000001}"/></AttachedDevice>
//!       </StorageController></StorageControllers></Hardware>
//!     </Snapshot>
//!     <Hardware><CPU count="2"/><Memory RAMSize="2048"/>
//!       <StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">
//!         <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{aaaaaaaa-0000-0000-0000-000000000002}"/></AttachedDevice>
//!       </StorageController></StorageControllers>
//!     </Hardware>
//!   </Machine>
//! </VirtualBox>"#;
//! let m = MachineSettings::parse_str(xml)?;
//! assert_eq!(m.name, "TM");
//! assert_eq!((m.hardware.cpu_count, m.hardware.memory_mb), (2, Some(2048)));
//! assert_eq!(m.snapshots.len(), 1);
//! assert_eq!(m.media.hard_disks.len(), 2);
//! assert_eq!(m.media.hard_disks[1].parent, Some(0));
//! assert_eq!(m.current_snapshot_index(), Some(0));
//! # Ok::<(), unacloud_vbox::Error>(())
//! ```

mod parse;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use unacloud_core::model::{DiskFormat, DiskType};
pub use uuid::Uuid;

use crate::error::{Error, Result};

/// A uuid as VirtualBox and users write it, trimmed and without one pair of braces
/// around it (`{9e02…}` → `9e02…`), ready for [`Uuid::try_parse`].
pub(crate) fn unbraced(s: &str) -> &str {
    let t = s.trim();
    t.strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(t)
}

/// Safety limits applied while parsing, so that hostile input cannot exhaust memory
/// or time. The defaults accept any settings file VirtualBox writes, including
/// generated machines with tens of thousands of snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Largest input accepted by the `load` functions, in bytes (default 64 MiB,
    /// several times the largest settings file VirtualBox writes for a machine with
    /// thousands of snapshots). Larger files are refused with
    /// [`Error::InputTooLarge`] before anything is read.
    pub max_input_bytes: u64,
    /// Deepest element nesting (each snapshot level costs two: `Snapshot` and
    /// `Snapshots`). The parser keeps an explicit stack, so this bounds memory, not
    /// the call stack.
    pub max_depth: usize,
    /// Largest start tag (element name plus all its attributes), in bytes; this bounds
    /// every attribute value.
    pub max_tag_bytes: usize,
    /// Largest `<Description>` text, in bytes.
    pub max_text_bytes: usize,
    /// Most elements in one document.
    pub max_elements: u64,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_input_bytes: 64 << 20,
            max_depth: 50_000,
            max_tag_bytes: 1 << 20,
            max_text_bytes: 1 << 20,
            max_elements: 20_000_000,
        }
    }
}

/// The settings-format version from `<VirtualBox version="1.19-windows">`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsVersion {
    /// Major version (always 1 so far).
    pub major: u32,
    /// Minor version (12 to 19 for VirtualBox 4.1 to 7.x).
    pub minor: u32,
    /// The host platform that wrote the file (`windows`, `linux`, `macosx`, …).
    pub platform: String,
}

impl SettingsVersion {
    /// Oldest version read (VirtualBox 4.1).
    pub const OLDEST: (u32, u32) = (1, 12);
    /// Newest version this crate was checked against.
    pub const NEWEST_KNOWN: (u32, u32) = (1, 19);

    /// Parses `1.19-windows`; `None` if it is not `<major>.<minor>[-platform]`.
    pub fn parse(s: &str) -> Option<SettingsVersion> {
        let (num, platform) = match s.split_once('-') {
            Some((n, p)) => (n, p),
            None => (s, ""),
        };
        let (maj, min) = num.split_once('.')?;
        Some(SettingsVersion {
            major: maj.parse().ok()?,
            minor: min.parse().ok()?,
            platform: platform.to_owned(),
        })
    }

    /// Whether `<StorageControllers>` sits inside `<Hardware>` (1.17 and later).
    pub fn controllers_inside_hardware(&self) -> bool {
        (self.major, self.minor) >= (1, 17)
    }
}

impl fmt::Display for SettingsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if !self.platform.is_empty() {
            write!(f, "-{}", self.platform)?;
        }
        Ok(())
    }
}

/// A hard disk of a media registry. Differencing images are nested under their
/// parent in the file; here they point to it by index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardDisk {
    /// The image's uuid.
    pub uuid: Uuid,
    /// `location` as written (relative to the registry file's folder, or absolute).
    pub location: String,
    /// `format` as written (`VDI`, `vdi`, `VMDK`, …); see [`HardDisk::disk_format`].
    pub format: String,
    /// `type` — only base images carry it; differencing images inherit the base's.
    pub disk_type: Option<DiskType>,
    /// Index of the differencing parent in the same registry's `hard_disks`.
    pub parent: Option<usize>,
    /// Indices of the differencing children.
    pub children: Vec<usize>,
    /// `autoReset` of a differencing image (set on the children of immutable disks).
    pub auto_reset: bool,
    /// `<Description>` text.
    pub description: Option<String>,
}

impl HardDisk {
    /// The format, parsed case-insensitively.
    pub fn disk_format(&self) -> DiskFormat {
        DiskFormat::parse(&self.format)
    }
}

/// Which kind of removable image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageKind {
    /// An optical disc image (`<DVDImages>`).
    Dvd,
    /// A floppy image (`<FloppyImages>`).
    Floppy,
}

/// A DVD or floppy image of a media registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The image's uuid.
    pub uuid: Uuid,
    /// `location` as written.
    pub location: String,
    /// `format`, when written (`RAW`, `VBoxIsoMaker`, …).
    pub format: Option<String>,
    /// DVD or floppy.
    pub kind: ImageKind,
}

/// The `<MediaRegistry>` of a machine or of the global registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MediaRegistry {
    /// Hard disks in document order; a differencing image follows its parent.
    pub hard_disks: Vec<HardDisk>,
    /// `<DVDImages>`.
    pub dvd_images: Vec<Image>,
    /// `<FloppyImages>`.
    pub floppy_images: Vec<Image>,
}

impl MediaRegistry {
    /// Whether the registry defines no medium.
    pub fn is_empty(&self) -> bool {
        self.hard_disks.is_empty() && self.dvd_images.is_empty() && self.floppy_images.is_empty()
    }

    /// Index of the hard disk with this uuid (linear; the tracker keeps a hash index).
    pub fn hard_disk_index(&self, uuid: &Uuid) -> Option<usize> {
        self.hard_disks.iter().position(|d| &d.uuid == uuid)
    }

    /// Longest base-to-leaf chain length (1 when there is no differencing image,
    /// 0 when there is no disk).
    pub fn max_chain_depth(&self) -> usize {
        // Parents precede children (document order), so one forward pass suffices.
        let mut depth = vec![0usize; self.hard_disks.len()];
        let mut max = 0;
        for (i, d) in self.hard_disks.iter().enumerate() {
            depth[i] = d.parent.map_or(1, |p| depth[p] + 1);
            max = max.max(depth[i]);
        }
        max
    }
}

/// What a device slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeviceType {
    /// A hard disk.
    HardDisk,
    /// An optical drive.
    Dvd,
    /// A floppy drive.
    Floppy,
}

/// A device on a storage controller port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedDevice {
    /// Hard disk, DVD or floppy.
    pub device_type: DeviceType,
    /// Port on the controller.
    pub port: u32,
    /// Device on the port.
    pub device: u32,
    /// The attached medium (`<Image uuid>`), if any (an empty DVD drive has none).
    pub image: Option<Uuid>,
    /// A host drive passed through (`<HostDrive src>`), if any.
    pub host_drive: Option<String>,
    /// `passthrough` (DVD).
    pub passthrough: bool,
    /// `nonrotational` (SSD).
    pub nonrotational: bool,
    /// `hotpluggable`.
    pub hotpluggable: bool,
}

/// A storage controller with its devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageController {
    /// Its name (`SATA`, `IDE`, localized names occur).
    pub name: String,
    /// `type` (`AHCI`, `PIIX4`, `NVMe`, `VirtioSCSI`, …).
    pub controller_type: String,
    /// `PortCount`.
    pub port_count: Option<u32>,
    /// `Bootable`.
    pub bootable: Option<bool>,
    /// Attached devices in document order.
    pub devices: Vec<AttachedDevice>,
}

/// How a network adapter is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum NetworkAttachment {
    /// Not attached.
    #[default]
    None,
    /// NAT.
    Nat,
    /// A NAT network.
    NatNetwork {
        /// Network name.
        name: Option<String>,
    },
    /// Bridged to a host interface (the thesis's requirement for images).
    Bridged {
        /// Host interface name.
        interface: Option<String>,
    },
    /// Internal network.
    Internal {
        /// Network name.
        name: Option<String>,
    },
    /// Host-only adapter.
    HostOnly {
        /// Host interface name.
        interface: Option<String>,
    },
    /// Generic driver.
    Generic {
        /// Driver name.
        driver: Option<String>,
    },
    /// A mode this crate does not model, by element name (`CloudNetwork`, …).
    Other {
        /// The element's local name.
        element: String,
        /// Its `name` attribute.
        name: Option<String>,
    },
}

impl NetworkAttachment {
    /// A short lower-case word for the mode (`bridged`, `nat`, …).
    pub fn mode(&self) -> &str {
        match self {
            NetworkAttachment::None => "none",
            NetworkAttachment::Nat => "nat",
            NetworkAttachment::NatNetwork { .. } => "natnetwork",
            NetworkAttachment::Bridged { .. } => "bridged",
            NetworkAttachment::Internal { .. } => "intnet",
            NetworkAttachment::HostOnly { .. } => "hostonly",
            NetworkAttachment::Generic { .. } => "generic",
            NetworkAttachment::Other { element, .. } => element,
        }
    }
}

/// A network adapter slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAdapter {
    /// Slot number.
    pub slot: u32,
    /// `enabled`.
    pub enabled: bool,
    /// `MACAddress` as written (12 hex digits).
    pub mac_address: Option<String>,
    /// Emulated chip (`type`, e.g. `82540EM`).
    pub adapter_type: Option<String>,
    /// `cable` (connected).
    pub cable_connected: Option<bool>,
    /// How it is attached (modes listed under `<DisabledModes>` are ignored).
    pub attachment: NetworkAttachment,
}

/// The hardware of the current state or of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardware {
    /// `<CPU count>` (1 when omitted, as newer versions do for the default).
    pub cpu_count: u32,
    /// `<Memory RAMSize>`, MiB.
    pub memory_mb: Option<u64>,
    /// Network adapters in document order.
    pub network_adapters: Vec<NetworkAdapter>,
    /// Storage controllers, wherever they sat (beside or inside `<Hardware>`).
    pub storage_controllers: Vec<StorageController>,
}

impl Default for Hardware {
    fn default() -> Self {
        Hardware {
            cpu_count: 1,
            memory_mb: None,
            network_adapters: Vec::new(),
            storage_controllers: Vec::new(),
        }
    }
}

impl Hardware {
    /// Every attached device with the name of its controller.
    pub fn attachments(&self) -> impl Iterator<Item = (&StorageController, &AttachedDevice)> {
        self.storage_controllers
            .iter()
            .flat_map(|c| c.devices.iter().map(move |d| (c, d)))
    }

    /// Uuids of the attached hard disks, in controller/port order of the file.
    pub fn hard_disk_uuids(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.attachments()
            .filter(|(_, d)| d.device_type == DeviceType::HardDisk)
            .filter_map(|(_, d)| d.image)
    }
}

/// One snapshot of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSettings {
    /// The snapshot's uuid.
    pub uuid: Uuid,
    /// Its name (names repeat).
    pub name: String,
    /// `timeStamp` as written (ISO 8601, UTC).
    pub time_stamp: Option<String>,
    /// `<Description>` text.
    pub description: Option<String>,
    /// `stateFile` as written: the saved memory state if taken while running.
    pub state_file: Option<String>,
    /// The hardware (and attached media) frozen in the snapshot.
    pub hardware: Hardware,
    /// Index of the parent snapshot in [`MachineSettings::snapshots`].
    pub parent: Option<usize>,
    /// Indices of the children, oldest first.
    pub children: Vec<usize>,
}

/// A parsed machine settings file (`.vbox`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSettings {
    /// Settings-format version.
    pub version: SettingsVersion,
    /// The default namespace, if declared.
    pub namespace: Option<String>,
    /// The machine's uuid.
    pub uuid: Uuid,
    /// The machine's name.
    pub name: String,
    /// `OSType`.
    pub os_type: Option<String>,
    /// `<Description>` of the machine.
    pub description: Option<String>,
    /// `currentSnapshot`: the snapshot below which the current state hangs.
    pub current_snapshot: Option<Uuid>,
    /// `snapshotFolder` as written.
    pub snapshot_folder: Option<String>,
    /// The machine's own `stateFile` (set when the VM is in saved state).
    pub state_file: Option<String>,
    /// `lastStateChange` as written.
    pub last_state_change: Option<String>,
    /// `currentStateModified` (true when omitted).
    pub current_state_modified: bool,
    /// `aborted`.
    pub aborted: bool,
    /// The current state's hardware.
    pub hardware: Hardware,
    /// The machine's media registry.
    pub media: MediaRegistry,
    /// Snapshots in document (pre-)order; the root, if any, is at index 0.
    pub snapshots: Vec<SnapshotSettings>,
    /// Non-fatal findings (newer-than-known version, missing `currentSnapshot`, …).
    pub warnings: Vec<String>,
}

impl MachineSettings {
    /// Parses a `.vbox` document with the default [`ParseLimits`].
    pub fn parse_str(xml: &str) -> Result<MachineSettings> {
        Self::parse_str_with_limits(xml, &ParseLimits::default())
    }

    /// Parses a `.vbox` document with explicit limits.
    pub fn parse_str_with_limits(xml: &str, limits: &ParseLimits) -> Result<MachineSettings> {
        let doc = parse::parse_document(xml, limits)?;
        match doc {
            parse::Document::Machine(m) => {
                let m = *m;
                m.validate()?;
                Ok(m)
            }
            parse::Document::Global(_) => Err(Error::WrongRoot {
                found: "VirtualBox/Global".into(),
                expected: "VirtualBox/Machine",
                hint: " (this is a global registry; load it with GlobalRegistry::load)",
            }),
        }
    }

    /// Reads and parses a `.vbox` file; errors are wrapped in
    /// [`Error::InFile`] naming `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<MachineSettings> {
        Self::load_with_limits(path, &ParseLimits::default())
    }

    /// [`MachineSettings::load`] with explicit limits.
    pub fn load_with_limits(
        path: impl AsRef<Path>,
        limits: &ParseLimits,
    ) -> Result<MachineSettings> {
        let path = path.as_ref();
        let text = read_limited(path, limits)?;
        Self::parse_str_with_limits(&text, limits).map_err(|e| Error::in_file(path, e))
    }

    /// The root snapshot, if any.
    pub fn root_snapshot(&self) -> Option<&SnapshotSettings> {
        self.snapshots.first()
    }

    /// Index of the snapshot the current state hangs below.
    pub fn current_snapshot_index(&self) -> Option<usize> {
        let cur = self.current_snapshot?;
        self.snapshots.iter().position(|s| s.uuid == cur)
    }

    /// Depth of the snapshot tree (0 without snapshots, 1 for a lone root).
    pub fn snapshot_depth(&self) -> usize {
        let mut depth = vec![0usize; self.snapshots.len()];
        let mut max = 0;
        for (i, s) in self.snapshots.iter().enumerate() {
            depth[i] = s.parent.map_or(1, |p| depth[p] + 1);
            max = max.max(depth[i]);
        }
        max
    }

    /// Checks cross-references: unique snapshot and medium uuids, and a
    /// `currentSnapshot` that exists.
    fn validate(&self) -> Result<()> {
        let mut seen: HashMap<Uuid, ()> = HashMap::with_capacity(self.snapshots.len());
        for s in &self.snapshots {
            if seen.insert(s.uuid, ()).is_some() {
                return Err(Error::DuplicateUuid {
                    kind: "snapshot",
                    uuid: s.uuid,
                });
            }
        }
        if let Some(cur) = self.current_snapshot {
            if !seen.contains_key(&cur) {
                return Err(Error::DanglingReference {
                    element: "Machine",
                    attribute: "currentSnapshot",
                    uuid: cur,
                });
            }
        }
        self.media.check_unique()
    }
}

impl MediaRegistry {
    fn check_unique(&self) -> Result<()> {
        let mut seen: HashMap<Uuid, ()> = HashMap::with_capacity(self.hard_disks.len());
        let all = self
            .hard_disks
            .iter()
            .map(|d| d.uuid)
            .chain(self.dvd_images.iter().map(|i| i.uuid))
            .chain(self.floppy_images.iter().map(|i| i.uuid));
        for u in all {
            if seen.insert(u, ()).is_some() {
                return Err(Error::DuplicateUuid {
                    kind: "medium",
                    uuid: u,
                });
            }
        }
        Ok(())
    }
}

/// A machine listed in the global registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineEntry {
    /// The machine's uuid.
    pub uuid: Uuid,
    /// Path of its `.vbox` as written.
    pub src: String,
}

/// The global registry, `VirtualBox.xml`: registered machines and globally registered
/// media (where templates made multiattach by `VBoxManage` live).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalRegistry {
    /// Settings-format version.
    pub version: SettingsVersion,
    /// `<MachineRegistry>` entries.
    pub machines: Vec<MachineEntry>,
    /// The global media registry.
    pub media: MediaRegistry,
    /// The folder relative locations in this file are resolved against (the folder
    /// holding `VirtualBox.xml`); empty when parsed from a string.
    pub base_dir: PathBuf,
}

impl GlobalRegistry {
    /// Parses a `VirtualBox.xml` document; relative locations will resolve against
    /// `base_dir` (pass the folder that holds the file).
    pub fn parse_str(xml: &str, base_dir: impl Into<PathBuf>) -> Result<GlobalRegistry> {
        Self::parse_str_with_limits(xml, base_dir, &ParseLimits::default())
    }

    /// [`GlobalRegistry::parse_str`] with explicit limits.
    pub fn parse_str_with_limits(
        xml: &str,
        base_dir: impl Into<PathBuf>,
        limits: &ParseLimits,
    ) -> Result<GlobalRegistry> {
        match parse::parse_document(xml, limits)? {
            parse::Document::Global(mut g) => {
                g.base_dir = base_dir.into();
                g.media.check_unique()?;
                Ok(*g)
            }
            parse::Document::Machine(_) => Err(Error::WrongRoot {
                found: "VirtualBox/Machine".into(),
                expected: "VirtualBox/Global",
                hint: " (this is a machine settings file; load it with MachineSettings::load)",
            }),
        }
    }

    /// Reads and parses `VirtualBox.xml`; relative locations resolve against the
    /// folder that holds it.
    pub fn load(path: impl AsRef<Path>) -> Result<GlobalRegistry> {
        Self::load_with_limits(path, &ParseLimits::default())
    }

    /// [`GlobalRegistry::load`] with explicit limits.
    pub fn load_with_limits(
        path: impl AsRef<Path>,
        limits: &ParseLimits,
    ) -> Result<GlobalRegistry> {
        let path = path.as_ref();
        let text = read_limited(path, limits)?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse_str_with_limits(&text, base, limits).map_err(|e| Error::in_file(path, e))
    }
}

/// Reads a settings file: the path is followed once (a symbolic link to a regular
/// file is fine), the opened file must be a regular file — a FIFO or a device is
/// refused without being read, and opening never waits for a FIFO's writer — and at
/// most [`ParseLimits::max_input_bytes`] are read, even from a file that grows.
fn read_limited(path: &Path, limits: &ParseLimits) -> Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(Error::not_regular(path, meta.file_type()));
    }
    let max = limits.max_input_bytes;
    let too_large = |len| Error::InputTooLarge {
        path: path.to_path_buf(),
        len,
        max,
    };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    // A regular file ignores O_NONBLOCK; read one byte past the limit to notice growth.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not UTF-8 (byte {}): settings files are UTF-8 XML",
                    e.utf8_error().valid_up_to()
                ),
            ),
        )
    })
}

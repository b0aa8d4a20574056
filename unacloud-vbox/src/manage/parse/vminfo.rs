//! `showvminfo <vm> --machinereadable`: state, hardware, storage attachments, NICs and
//! the snapshot tree.

use std::path::PathBuf;

use unacloud_core::model::{DiskAttachment, PowerState, Uuid, VmInfo};
use unacloud_core::tree::SnapshotTree;

use crate::manage::parse::machinereadable::{self, MachineReadable};
use crate::manage::parse::snapshots::{
    normalise_uuid, tree_from_machine_readable, SnapshotListError,
};

/// A storage controller (`storagecontrollername<i>` and friends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageController {
    /// The user-chosen name (`SATA`, `IDE Controller`, …).
    pub name: String,
    /// The chipset (`IntelAhci`, `PIIX4`, …).
    pub controller_type: String,
    /// Ports in use.
    pub port_count: Option<u32>,
    /// Maximum ports.
    pub max_port_count: Option<u32>,
    /// Whether the controller is bootable.
    pub bootable: bool,
}

/// What a storage slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotMedium {
    /// `"none"`: nothing attached.
    Empty,
    /// `"emptydrive"`: a drive (DVD/floppy) without a medium.
    EmptyDrive,
    /// An image file.
    Image {
        /// Its location as printed.
        location: String,
        /// Its uuid (`"<ctl>-ImageUUID-p-d"`), when printed.
        uuid: Option<Uuid>,
    },
}

/// One `"<ctl>-<port>-<device>"` slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSlot {
    /// The controller's name.
    pub controller: String,
    /// Port.
    pub port: u32,
    /// Device.
    pub device: u32,
    /// What is attached.
    pub medium: SlotMedium,
    /// Whether the slot is probably a DVD/floppy drive: VirtualBox prints
    /// `IsEjected`/`tempeject` keys for removable drives (numbered since 7.0), and an
    /// `.iso`/`.img` image is one.
    pub removable: bool,
}

/// A network adapter (`nic<n>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Adapter number, 1-based.
    pub index: u8,
    /// Attachment: `nat`, `bridged`, `hostonly`, `intnet`, `none`, …
    pub attachment: String,
    /// The host interface of a bridged adapter.
    pub bridge_adapter: Option<String>,
    /// MAC address as printed (12 hex digits).
    pub mac: Option<String>,
}

/// Everything this library reads from `showvminfo --machinereadable`.
#[derive(Debug, Clone)]
pub struct VmDetails {
    /// The VM's name (`<inaccessible>` for an inaccessible VM).
    pub name: String,
    /// The VM's uuid.
    pub uuid: Option<Uuid>,
    /// Whether VirtualBox could read the VM's settings (an inaccessible VM prints only
    /// `name` and `UUID`).
    pub accessible: bool,
    /// `VMState`, verbatim.
    pub state_name: Option<String>,
    /// `VMState` mapped to a power state.
    pub state: PowerState,
    /// `VMStateFile`: the saved state of a saved VM.
    pub state_file: Option<PathBuf>,
    /// `CfgFile`: the settings file.
    pub settings_file: Option<PathBuf>,
    /// `SnapFldr`.
    pub snapshot_folder: Option<PathBuf>,
    /// `ostype`.
    pub os_type: Option<String>,
    /// `cpus`.
    pub cpus: Option<u32>,
    /// `memory`, MiB.
    pub memory_mb: Option<u64>,
    /// `description`.
    pub description: Option<String>,
    /// Storage controllers in order.
    pub controllers: Vec<StorageController>,
    /// Every slot printed, in order.
    pub slots: Vec<StorageSlot>,
    /// Network adapters that are not `none`.
    pub nics: Vec<Nic>,
    /// The snapshot tree (empty without snapshots).
    pub snapshots: SnapshotTree,
    /// `CurrentSnapshotUUID`.
    pub current_snapshot: Option<String>,
    /// The raw document, for keys this struct does not model.
    pub raw: MachineReadable,
}

/// Maps VBoxManage's short machine-state names (`machineStateToName(…, true)`) to
/// [`PowerState`].
pub fn power_state(name: &str) -> PowerState {
    match name {
        "poweroff" => PowerState::PoweredOff,
        "saved" => PowerState::Saved,
        "aborted" | "aborted-saved" => PowerState::Aborted,
        "running" => PowerState::Running,
        "paused" => PowerState::Paused,
        "starting" => PowerState::Starting,
        "stopping" => PowerState::Stopping,
        "saving" => PowerState::Saving,
        "restoring" => PowerState::Restoring,
        "livesnapshotting" | "onlinesnapshotting" => PowerState::LiveSnapshotting,
        "gurumeditation" => PowerState::Stuck,
        other => PowerState::Other(other.to_owned()),
    }
}

fn parse_uuid(s: &str) -> Option<Uuid> {
    Uuid::parse_str(&normalise_uuid(s)).ok()
}

/// Splits `<p>-<d>` into numbers.
fn port_device(s: &str) -> Option<(u32, u32)> {
    let (p, d) = s.split_once('-')?;
    Some((p.parse().ok()?, d.parse().ok()?))
}

/// Why `showvminfo` output was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VmInfoError {
    /// The text has no `name=` line: it is not `showvminfo --machinereadable` output.
    #[error("no name= line; is this showvminfo --machinereadable output?")]
    NotVmInfo,
    /// The `Snapshot*` keys do not describe a tree; the source says why.
    #[error("snapshot keys")]
    Snapshots(#[from] SnapshotListError),
}

/// Parses `showvminfo --machinereadable` output.
pub fn parse_vm_info(text: &str) -> Result<VmDetails, VmInfoError> {
    let doc = machinereadable::parse(text);
    let name = doc.get("name").ok_or(VmInfoError::NotVmInfo)?.to_owned();
    let uuid = doc.get("UUID").and_then(parse_uuid);
    let state_name = doc.get("VMState").map(str::to_owned);
    // An inaccessible VM prints only name and UUID.
    let accessible = state_name.is_some() || doc.entries.len() > 2;
    let state = match &state_name {
        Some(s) => power_state(s),
        None => PowerState::Other("inaccessible".to_owned()),
    };

    let mut controllers = Vec::new();
    for i in 0.. {
        let Some(cname) = doc.get(&format!("storagecontrollername{i}")) else {
            break;
        };
        controllers.push(StorageController {
            name: cname.to_owned(),
            controller_type: doc
                .get(&format!("storagecontrollertype{i}"))
                .unwrap_or("")
                .to_owned(),
            port_count: doc
                .get(&format!("storagecontrollerportcount{i}"))
                .and_then(|v| v.parse().ok()),
            max_port_count: doc
                .get(&format!("storagecontrollermaxportcount{i}"))
                .and_then(|v| v.parse().ok()),
            bootable: doc.get(&format!("storagecontrollerbootable{i}")) == Some("on"),
        });
    }
    // Longest names first, so that "SATA Controller" wins over "SATA".
    let mut names: Vec<&str> = controllers.iter().map(|c| c.name.as_str()).collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));

    let mut slots: Vec<StorageSlot> = Vec::new();
    let mut removable_marks: Vec<(String, Option<(u32, u32)>)> = Vec::new();
    let mut image_uuids: Vec<(String, u32, u32, Uuid)> = Vec::new();
    for e in doc.entries.iter().filter(|e| e.quoted_key) {
        let Some((ctl, rest)) = names.iter().find_map(|n| {
            e.key
                .strip_prefix(n)
                .and_then(|r| r.strip_prefix('-'))
                .map(|r| (*n, r))
        }) else {
            continue;
        };
        if let Some((p, d)) = port_device(rest) {
            let medium = match e.value.as_str() {
                "none" => SlotMedium::Empty,
                "emptydrive" => SlotMedium::EmptyDrive,
                loc => SlotMedium::Image {
                    location: loc.to_owned(),
                    uuid: None,
                },
            };
            slots.push(StorageSlot {
                controller: ctl.to_owned(),
                port: p,
                device: d,
                medium,
                removable: false,
            });
        } else if let Some(pd) = rest.strip_prefix("ImageUUID-") {
            if let (Some((p, d)), Some(u)) = (port_device(pd), parse_uuid(&e.value)) {
                image_uuids.push((ctl.to_owned(), p, d, u));
            }
        } else {
            for marker in ["IsEjected", "tempeject", "dvdpassthrough"] {
                if let Some(after) = rest.strip_prefix(marker) {
                    let pd = after.strip_prefix('-').and_then(port_device);
                    removable_marks.push((ctl.to_owned(), pd));
                }
            }
        }
    }
    for (ctl, p, d, u) in image_uuids {
        if let Some(slot) = slots
            .iter_mut()
            .find(|s| s.controller == ctl && s.port == p && s.device == d)
        {
            if let SlotMedium::Image { uuid, .. } = &mut slot.medium {
                *uuid = Some(u);
            }
        }
    }
    for slot in slots.iter_mut() {
        let numbered_mark = removable_marks
            .iter()
            .any(|(c, pd)| *c == slot.controller && *pd == Some((slot.port, slot.device)));
        let is_image_of_removable = matches!(&slot.medium, SlotMedium::Image { location, .. }
            if { let l = location.to_ascii_lowercase(); l.ends_with(".iso") || l.ends_with(".img") || l.ends_with(".dmg") });
        slot.removable =
            numbered_mark || is_image_of_removable || slot.medium == SlotMedium::EmptyDrive;
    }

    let mut nics = Vec::new();
    for n in 1u8..=36 {
        let Some(att) = doc.get(&format!("nic{n}")) else {
            continue;
        };
        if att == "none" {
            continue;
        }
        nics.push(Nic {
            index: n,
            attachment: att.to_owned(),
            bridge_adapter: doc.get(&format!("bridgeadapter{n}")).map(str::to_owned),
            mac: doc.get(&format!("macaddress{n}")).map(str::to_owned),
        });
    }

    let snapshots = tree_from_machine_readable(&doc)?;
    let current_snapshot = doc.get("CurrentSnapshotUUID").map(normalise_uuid);
    Ok(VmDetails {
        name,
        uuid,
        accessible,
        state_name,
        state,
        state_file: doc.get("VMStateFile").map(PathBuf::from),
        settings_file: doc.get("CfgFile").map(PathBuf::from),
        snapshot_folder: doc.get("SnapFldr").map(PathBuf::from),
        os_type: doc.get("ostype").map(str::to_owned),
        cpus: doc.get_u64("cpus").and_then(|v| u32::try_from(v).ok()),
        memory_mb: doc.get_u64("memory"),
        description: doc.get("description").map(str::to_owned),
        controllers,
        slots,
        nics,
        snapshots,
        current_snapshot,
        raw: doc,
    })
}

impl VmDetails {
    /// Hard-disk attachments (slots holding an image with a uuid that is not a
    /// removable medium).
    pub fn disk_attachments(&self) -> Vec<DiskAttachment> {
        self.slots
            .iter()
            .filter(|s| !s.removable)
            .filter_map(|s| match &s.medium {
                SlotMedium::Image { uuid: Some(u), .. } => Some(DiskAttachment {
                    controller: s.controller.clone(),
                    port: s.port,
                    device: s.device,
                    disk: *u,
                }),
                _ => None,
            })
            .collect()
    }

    /// The VM as the core model describes it.
    pub fn to_vm_info(&self) -> VmInfo {
        VmInfo {
            name: self.name.clone(),
            uuid: self.uuid,
            state: self.state.clone(),
            cores: self.cpus.unwrap_or(0),
            memory_mb: self.memory_mb.unwrap_or(0),
            disks: self.disk_attachments(),
            current_snapshot: self.current_snapshot.clone(),
            settings_file: self.settings_file.clone(),
            template: None,
        }
    }
}

//! The QEMU backend's on-disk state: one small JSON settings file per VM and a
//! registry of VMs and disks per backend root. Both are written atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{DiskInfo, Uuid};

/// Format marker written into every VM settings file.
pub(crate) const SETTINGS_FORMAT: &str = "unacloud-qemu-vm/1";
/// Format marker of the registry.
pub(crate) const REGISTRY_FORMAT: &str = "unacloud-qemu-registry/1";

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

/// One snapshot as the settings remember it (qcow2 stores snapshots as a flat list;
/// the tree shape and the user's names live here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The qcow2 snapshot tag, identical on every disk of the VM.
    pub tag: String,
    /// The user's name.
    pub name: String,
    /// The user's description.
    #[serde(default)]
    pub description: Option<String>,
    /// The tag of the parent snapshot.
    #[serde(default)]
    pub parent: Option<String>,
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
        if s.format != SETTINGS_FORMAT {
            return Err(Error::Corrupt {
                what: "QEMU VM settings",
                path: path.to_owned(),
                reason: format!("format {:?}, expected {SETTINGS_FORMAT:?}", s.format),
                backup: None,
            });
        }
        validate_name(&s.name)?;
        Ok(s)
    }

    /// Writes the settings atomically.
    pub(crate) fn save(&self, path: &Path, durable: bool) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| Error::InvalidInput(e.to_string()))?;
        crate::provision::fsutil::write_atomic_with(path, &bytes, durable)
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
}

impl Registry {
    pub(crate) fn load(path: &Path) -> Result<Registry> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let r: Registry = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
                    what: "QEMU backend registry",
                    path: path.to_owned(),
                    reason: e.to_string(),
                    backup: None,
                })?;
                if r.format != REGISTRY_FORMAT {
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
        crate::provision::fsutil::write_atomic_with(path, &bytes, durable)
    }
}

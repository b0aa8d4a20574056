//! The files of a VM and the minimal set needed to resume it elsewhere.
//!
//! Backends (VirtualBox's file tracker, QEMU's backing chains) compute a
//! [`MigrationSet`]; this module only holds the shared, serialisable result types and
//! their arithmetic, so that tools and the Python bindings treat every backend alike.
//!
//! ```
//! use unacloud_core::files::{FileRole, MigrationSet, VmFile};
//!
//! let mut set = MigrationSet::default();
//! set.push(VmFile::new("/vms/TM/TM.vbox", FileRole::Settings, None, Some(4_000)));
//! set.push(VmFile::new("/vms/TM/TM.vdi", FileRole::Disk, Some("0a1b".into()), Some(1_000_000)));
//! set.push(VmFile::new("/vms/TM/TM.vdi", FileRole::Disk, Some("0a1b".into()), Some(1_000_000)));
//! assert_eq!(set.files.len(), 2); // de-duplicated by path
//! assert_eq!(set.total_bytes(), 1_004_000);
//! ```

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What a file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileRole {
    /// The VM's settings (`.vbox`, or the QEMU backend's VM description).
    Settings,
    /// A disk image (base or differencing).
    Disk,
    /// A saved memory state (`.sav`).
    SavedState,
}

impl FileRole {
    /// `settings`, `disk` or `saved-state`.
    pub fn as_str(self) -> &'static str {
        match self {
            FileRole::Settings => "settings",
            FileRole::Disk => "disk",
            FileRole::SavedState => "saved-state",
        }
    }
}

impl fmt::Display for FileRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One file of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFile {
    /// The resolved path on this host.
    pub path: PathBuf,
    /// What the file is for.
    pub role: FileRole,
    /// The disk image's uuid without braces (`None` for settings and saved states).
    pub uuid: Option<String>,
    /// Length in bytes (sparse files count their length); `None` when the file is
    /// missing.
    pub bytes: Option<u64>,
}

impl VmFile {
    /// Builds a file entry.
    pub fn new(
        path: impl Into<PathBuf>,
        role: FileRole,
        uuid: Option<String>,
        bytes: Option<u64>,
    ) -> Self {
        VmFile {
            path: path.into(),
            role,
            uuid,
            bytes,
        }
    }
}

/// A disk the destination is expected to have already (a preloaded template).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedFile {
    /// The image's uuid without braces.
    pub uuid: String,
    /// Where it is on this host, when known.
    pub path: Option<PathBuf>,
}

/// The files needed to resume a VM from one state on another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MigrationSet {
    /// Files to copy, de-duplicated by resolved path, in a stable order (settings first,
    /// then disks from the base up, then saved states).
    pub files: Vec<VmFile>,
    /// Images the destination already has and that are therefore not copied.
    pub expected_at_destination: Vec<ExpectedFile>,
    /// Images the VM uses but that are not copied (DVD/floppy ISOs, unresolved parents),
    /// described in words.
    pub external: Vec<String>,
    /// Non-fatal findings: missing files, unresolved references.
    pub warnings: Vec<String>,
}

impl MigrationSet {
    /// Adds a file unless one with the same path is already in the set.
    pub fn push(&mut self, file: VmFile) {
        if !self.files.iter().any(|f| f.path == file.path) {
            self.files.push(file);
        }
    }

    /// Records that the destination must already have the image `uuid` (at `path` on
    /// this host), unless it is recorded already.
    ///
    /// ```
    /// let mut set = unacloud_core::files::MigrationSet::default();
    /// set.expect("0a1b", None);
    /// set.expect("0a1b", None);
    /// assert_eq!(set.expected_at_destination.len(), 1);
    /// ```
    pub fn expect(&mut self, uuid: impl ToString, path: Option<PathBuf>) {
        let uuid = uuid.to_string();
        if !self.expected_at_destination.iter().any(|x| x.uuid == uuid) {
            self.expected_at_destination
                .push(ExpectedFile { uuid, path });
        }
    }

    /// Sum of the known file lengths.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().filter_map(|f| f.bytes).sum()
    }

    /// Files whose length is unknown because they are missing.
    pub fn missing(&self) -> impl Iterator<Item = &VmFile> {
        self.files.iter().filter(|f| f.bytes.is_none())
    }
}

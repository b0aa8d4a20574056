//! The Global Snapshot File Tracker: which files resume a machine from a snapshot.
//!
//! A [`Machine`] is a parsed `.vbox` (plus, optionally, the global `VirtualBox.xml`)
//! with every medium indexed by uuid. For a chosen state — a snapshot by uuid or name,
//! or `current` — [`Machine::migration_set`] lists exactly what another host needs
//! (SPEC §4, state *Sᵢ*):
//!
//! * the settings file;
//! * for every hard disk attached in that state, the attached image and all its
//!   ancestors up the differencing chain, base first;
//! * the state's saved memory (`stateFile` of the snapshot; for `current` the
//!   machine's own `stateFile`, if it is in saved state).
//!
//! Images the destination already has (a preloaded multiattach template, by uuid) are
//! listed in `expected_at_destination` together with their own ancestors, never
//! silently dropped. DVD and floppy images are listed as external dependencies unless
//! [`MigrationOptions::include_removable`] is set. Media registered only in the global
//! registry are followed when it is given and reported as unresolved (naming the uuid)
//! when it is not. Files are de-duplicated by resolved path (two snapshots may share
//! one `.sav`), and each file's length is read from the file system when it exists;
//! a missing file is reported per file.
//!
//! ```
//! use unacloud_vbox::settings::MachineSettings;
//! use unacloud_vbox::tracker::{Machine, MigrationOptions};
//!
//! let xml = r#"<VirtualBox version="1.19-windows">
//!   <Machine uuid="{11111111-1111-1111-1111-111111111111}" name="TM" OSType="Ubuntu_64"
//!            currentSnapshot="{22222222-2222-2222-2222-222222222222}">
//!     <MediaRegistry><HardDisks>
//!       <HardDisk uuid="{aaaaaaaa-0000-0000-0000-000000000001}" location="TM.vdi" format="VDI" type="Normal">
//!         <HardDisk uuid="{aaaaaaaa-0000-0000-0000-000000000002}" location="Snapshots/{aaaaaaaa-0000-0000-0000-000000000002}.vdi" format="VDI"/>
//!       </HardDisk>
//!     </HardDisks></MediaRegistry>
//!     <Snapshot uuid="{22222222-2222-2222-2222-222222222222}" name="installed"
//!               timeStamp="2024-01-01T00:00:00Z" stateFile="Snapshots/s1.sav">
//!       <Hardware><StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">
//!         <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{aaaaaaaa-0000-0000-0000-000000000001}"/></AttachedDevice>
//!       </StorageController></StorageControllers></Hardware>
//!     </Snapshot>
//!     <Hardware><StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">
//!       <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{aaaaaaaa-0000-0000-0000-000000000002}"/></AttachedDevice>
//!     </StorageController></StorageControllers></Hardware>
//!   </Machine>
//! </VirtualBox>"#;
//! let settings = MachineSettings::parse_str(xml)?;
//! let m = Machine::from_settings(settings, "/vms/TM/TM.vbox", None)?;
//! let set = m.migration_set("installed", &MigrationOptions::default())?;
//! let paths: Vec<_> = set.files.iter().map(|f| f.path.to_string_lossy().into_owned()).collect();
//! assert_eq!(paths, ["/vms/TM/TM.vbox", "/vms/TM/TM.vdi", "/vms/TM/Snapshots/s1.sav"]);
//! assert_eq!(m.all_files().expected_count, 4); // Eq. 5.4: (d+1)(s+1) = 2·2
//! # Ok::<(), unacloud_vbox::Error>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use unacloud_core::files::VmFile;
use unacloud_core::model::DiskType;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::location::Location;
use crate::settings::{
    unbraced, GlobalRegistry, MachineSettings, MediaRegistry, ParseLimits, SnapshotSettings,
};

mod files;
mod tree;
mod verify;

pub use verify::VerifyReport;

/// Which registry a medium was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegistrySource {
    /// The machine's own `.vbox`.
    Machine,
    /// The global `VirtualBox.xml`.
    Global,
}

/// What kind of medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MediumKind {
    /// A hard disk (base or differencing).
    HardDisk,
    /// An optical disc image.
    Dvd,
    /// A floppy image.
    Floppy,
}

/// A medium known to a [`Machine`], from its own or the global registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Medium {
    /// The medium's uuid.
    pub uuid: Uuid,
    /// Hard disk, DVD or floppy.
    pub kind: MediumKind,
    /// Where it is (resolved against the folder of the registry that lists it).
    pub location: Location,
    /// `format` as written, when written.
    pub format: Option<String>,
    /// `type` as written (base images only).
    pub disk_type: Option<DiskType>,
    /// Index of the differencing parent in [`Machine::media`].
    pub parent: Option<usize>,
    /// Which registry lists it.
    pub source: RegistrySource,
}

/// A state of the machine a migration set can be computed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StateRef {
    /// The current state (what runs when the VM is started now).
    Current,
    /// A snapshot, by index into [`Machine::snapshots`].
    Snapshot(usize),
}

/// Options of [`Machine::migration_set`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationOptions {
    /// Images the destination already has (e.g. preloaded multiattach templates).
    /// They and their ancestors go to `expected_at_destination` instead of `files`.
    pub preloaded: HashSet<Uuid>,
    /// Copy DVD and floppy images too (default: list them as external dependencies).
    pub include_removable: bool,
    /// Fail with [`Error::UnresolvedDependency`] when an attached hard disk is in no
    /// registry (default: report it in `warnings` and `external`).
    pub strict: bool,
    /// Read each file's length from the file system (default: true). Without it every
    /// `bytes` is `None` and nothing is reported missing.
    pub measure_sizes: bool,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            preloaded: HashSet::new(),
            include_removable: false,
            strict: false,
            measure_sizes: true,
        }
    }
}

impl MigrationOptions {
    /// Adds preloaded images (by uuid).
    pub fn with_preloaded(mut self, uuids: impl IntoIterator<Item = Uuid>) -> Self {
        self.preloaded.extend(uuids);
        self
    }

    /// Adds a preloaded image given as text (with or without braces, any case).
    pub fn preload(&mut self, uuid: &str) -> Result<()> {
        let u = Uuid::try_parse(unbraced(uuid)).map_err(|e| {
            Error::Core(unacloud_core::Error::InvalidInput(format!(
                "preloaded image {uuid:?} is not a uuid ({e})"
            )))
        })?;
        self.preloaded.insert(u);
        Ok(())
    }
}

/// Every file of a machine, with the file count predicted by the thesis's Eq. 5.4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllFiles {
    /// The files, de-duplicated by path: settings, disks, saved states.
    pub files: Vec<VmFile>,
    /// `d`: hard disks attached in the current state.
    pub disks: usize,
    /// `s`: snapshots.
    pub snapshots: usize,
    /// Eq. 5.4: `d + 1` if `s = 0`, else `(d + 1)(s + 1)` — exact when every snapshot
    /// was taken while running and nothing is shared or orphaned.
    pub expected_count: u64,
    /// Missing files and similar findings.
    pub warnings: Vec<String>,
}

impl AllFiles {
    /// Sum of the known file lengths.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().filter_map(|f| f.bytes).sum()
    }
}

/// How [`Machine::render_snapshot_tree`] writes the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TreeFormat {
    /// Indented text, the current state's snapshot marked with `*`.
    Text,
    /// Graphviz DOT.
    Dot,
    /// JSON (`{"current": uuid, "snapshots": [...]}`).
    Json,
}

impl std::str::FromStr for TreeFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "text" | "txt" => Ok(TreeFormat::Text),
            "dot" => Ok(TreeFormat::Dot),
            "json" => Ok(TreeFormat::Json),
            _ => Err(Error::Core(unacloud_core::Error::InvalidInput(format!(
                "unknown tree format {s:?}; expected text, dot or json"
            )))),
        }
    }
}

/// The indices' map: foldhash is several times cheaper than the standard SipHash for
/// uuid and path keys, and its per-process random seed keeps crafted keys from
/// colliding on purpose.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A machine ready for file tracking: settings, their location and a uuid index of
/// every medium it can see.
#[derive(Debug, Clone)]
pub struct Machine {
    settings: MachineSettings,
    settings_path: PathBuf,
    machine_dir: PathBuf,
    global: Option<GlobalRegistry>,
    media: Vec<Medium>,
    media_by_uuid: FastMap<Uuid, usize>,
    /// For each medium, the first medium with the same resolved path (itself unless
    /// two registry entries share a file).
    canonical: Vec<usize>,
    /// Resolved path → first medium with it.
    media_by_path: FastMap<OsString, usize>,
    snapshot_by_uuid: FastMap<Uuid, usize>,
}

/// The same type under the thesis's name.
pub type FileTracker = Machine;

impl Machine {
    /// Loads a `.vbox` file, and the global registry if given.
    ///
    /// Only regular files are read (a symbolic link is followed once); FIFOs and
    /// devices are refused with [`Error::NotRegularFile`], files above
    /// [`ParseLimits::max_input_bytes`] (64 MiB by default) with
    /// [`Error::InputTooLarge`]; see [`Machine::load_with_limits`].
    pub fn load(path: impl AsRef<Path>, global_registry: Option<&Path>) -> Result<Machine> {
        Self::load_with_limits(path, global_registry, &ParseLimits::default())
    }

    /// [`Machine::load`] with explicit parse limits (for both files).
    pub fn load_with_limits(
        path: impl AsRef<Path>,
        global_registry: Option<&Path>,
        limits: &ParseLimits,
    ) -> Result<Machine> {
        let path = path.as_ref();
        let settings = MachineSettings::load_with_limits(path, limits)?;
        let global = match global_registry {
            Some(g) => Some(GlobalRegistry::load_with_limits(g, limits)?),
            None => None,
        };
        Machine::from_settings(settings, path, global).map_err(|e| match e {
            e @ Error::InFile { .. } => e,
            e => Error::in_file(path, e),
        })
    }

    /// Builds a machine from parsed settings; `settings_path` is where the `.vbox`
    /// is (relative locations resolve against its folder). Fails on inconsistent
    /// registries: a medium listed under different parents, or a parent cycle.
    pub fn from_settings(
        settings: MachineSettings,
        settings_path: impl Into<PathBuf>,
        global: Option<GlobalRegistry>,
    ) -> Result<Machine> {
        let settings_path = settings_path.into();
        let machine_dir = settings_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut m = Machine {
            snapshot_by_uuid: settings
                .snapshots
                .iter()
                .enumerate()
                .map(|(i, s)| (s.uuid, i))
                .collect(),
            settings,
            settings_path,
            machine_dir,
            global: None,
            media: Vec::new(),
            media_by_uuid: FastMap::default(),
            canonical: Vec::new(),
            media_by_path: FastMap::default(),
        };
        let dir = m.machine_dir.clone();
        let own = std::mem::take(&mut m.settings.media);
        m.index_registry(&own, &dir, RegistrySource::Machine)?;
        m.settings.media = own;
        if let Some(g) = global {
            m.index_registry(&g.media, &g.base_dir, RegistrySource::Global)?;
            m.global = Some(g);
        }
        m.check_acyclic()?;
        m.canonical = Vec::with_capacity(m.media.len());
        for (i, med) in m.media.iter().enumerate() {
            let first = *m
                .media_by_path
                .entry(med.location.path().as_os_str().to_owned())
                .or_insert(i);
            m.canonical.push(first);
        }
        Ok(m)
    }

    fn index_registry(
        &mut self,
        reg: &MediaRegistry,
        base: &Path,
        source: RegistrySource,
    ) -> Result<()> {
        for d in &reg.hard_disks {
            self.add_medium(Medium {
                uuid: d.uuid,
                kind: MediumKind::HardDisk,
                location: Location::resolve(&d.location, base),
                format: Some(d.format.clone()).filter(|f| !f.is_empty()),
                disk_type: d.disk_type,
                parent: None,
                source,
            })?;
        }
        for (kind, list) in [
            (MediumKind::Dvd, &reg.dvd_images),
            (MediumKind::Floppy, &reg.floppy_images),
        ] {
            for i in list {
                self.add_medium(Medium {
                    uuid: i.uuid,
                    kind,
                    location: Location::resolve(&i.location, base),
                    format: i.format.clone(),
                    disk_type: None,
                    parent: None,
                    source,
                })?;
            }
        }
        // Resolve parent uuids to indices now that the whole registry is indexed.
        for d in &reg.hard_disks {
            if let Some(p) = d.parent.and_then(|p| reg.hard_disks.get(p)) {
                let (Some(&ci), Some(&pi)) = (
                    self.media_by_uuid.get(&d.uuid),
                    self.media_by_uuid.get(&p.uuid),
                ) else {
                    continue;
                };
                match self.media[ci].parent {
                    None => self.media[ci].parent = Some(pi),
                    Some(existing) if existing == pi => {}
                    Some(_) => {
                        return Err(Error::DuplicateUuid {
                            kind: "medium (the machine and global registries list it under different parents)",
                            uuid: d.uuid,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds a medium or merges it with an entry of the same uuid from another registry.
    fn add_medium(&mut self, m: Medium) -> Result<usize> {
        if let Some(&i) = self.media_by_uuid.get(&m.uuid) {
            let existing = &mut self.media[i];
            if existing.source == m.source || existing.kind != m.kind {
                return Err(Error::DuplicateUuid {
                    kind: "medium",
                    uuid: m.uuid,
                });
            }
            // Listed by both registries: keep the machine's entry, take the type if only
            // the global one has it.
            if existing.disk_type.is_none() {
                existing.disk_type = m.disk_type;
            }
            return Ok(i);
        }
        let i = self.media.len();
        self.media_by_uuid.insert(m.uuid, i);
        self.media.push(m);
        Ok(i)
    }

    /// Every medium has at most one parent, so a cycle is found by walking each chain
    /// once and colouring what was seen (linear time).
    fn check_acyclic(&self) -> Result<()> {
        // 0 = unvisited, 1 = on the current walk, 2 = done.
        let mut colour = vec![0u8; self.media.len()];
        for start in 0..self.media.len() {
            let mut walk = Vec::new();
            let mut cur = Some(start);
            while let Some(i) = cur {
                match colour[i] {
                    2 => break,
                    1 => {
                        return Err(Error::ParentCycle {
                            uuid: self.media[i].uuid,
                        })
                    }
                    _ => {}
                }
                colour[i] = 1;
                walk.push(i);
                cur = self.media[i].parent;
            }
            for i in walk {
                colour[i] = 2;
            }
        }
        Ok(())
    }

    // ----- accessors --------------------------------------------------------------

    /// The parsed settings.
    pub fn settings(&self) -> &MachineSettings {
        &self.settings
    }

    /// Where the `.vbox` is.
    pub fn settings_path(&self) -> &Path {
        &self.settings_path
    }

    /// The machine folder (relative locations resolve against it).
    pub fn machine_dir(&self) -> &Path {
        &self.machine_dir
    }

    /// The global registry, if one was given.
    pub fn global_registry(&self) -> Option<&GlobalRegistry> {
        self.global.as_ref()
    }

    /// The machine's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The machine's uuid.
    pub fn uuid(&self) -> Uuid {
        self.settings.uuid
    }

    /// Snapshots in tree pre-order (parents before children).
    pub fn snapshots(&self) -> &[SnapshotSettings] {
        &self.settings.snapshots
    }

    /// The snapshot the current state hangs below.
    pub fn current_snapshot(&self) -> Option<&SnapshotSettings> {
        let cur = self.settings.current_snapshot?;
        self.snapshot(&cur)
    }

    /// A snapshot by uuid.
    pub fn snapshot(&self, uuid: &Uuid) -> Option<&SnapshotSettings> {
        self.snapshot_by_uuid
            .get(uuid)
            .and_then(|&i| self.settings.snapshots.get(i))
    }

    /// The children of a snapshot, oldest first.
    pub fn snapshot_children<'a>(
        &'a self,
        s: &'a SnapshotSettings,
    ) -> impl Iterator<Item = &'a SnapshotSettings> + 'a {
        s.children
            .iter()
            .filter_map(move |&c| self.settings.snapshots.get(c))
    }

    /// The parent of a snapshot.
    pub fn snapshot_parent(&self, s: &SnapshotSettings) -> Option<&SnapshotSettings> {
        s.parent.and_then(|p| self.settings.snapshots.get(p))
    }

    /// Every medium the machine can see (own registry first, then global).
    pub fn media(&self) -> &[Medium] {
        &self.media
    }

    /// A medium by uuid.
    pub fn medium(&self, uuid: &Uuid) -> Option<&Medium> {
        self.media_by_uuid.get(uuid).map(|&i| &self.media[i])
    }

    /// The medium's chain from the base down to it (indices into [`Machine::media`]).
    pub fn chain(&self, uuid: &Uuid) -> Option<Vec<usize>> {
        let start = *self.media_by_uuid.get(uuid)?;
        let mut chain = vec![start];
        let mut cur = self.media[start].parent;
        while let Some(p) = cur {
            if chain.len() > self.media.len() {
                break; // unreachable: cycles are refused at construction
            }
            chain.push(p);
            cur = self.media[p].parent;
        }
        chain.reverse();
        Some(chain)
    }

    /// The effective type of a medium: its own, or its base's for differencing images.
    pub fn effective_disk_type(&self, uuid: &Uuid) -> Option<DiskType> {
        let chain = self.chain(uuid)?;
        chain
            .first()
            .and_then(|&b| self.media[b].disk_type)
            .or(Some(DiskType::Normal))
    }

    /// `path` relative to the machine folder, or `None` when it lies outside it (or
    /// is foreign). Both are made absolute against the current folder first, so a
    /// machine given by a relative path (`vms/TM.vbox`, `TM.vbox`) gives the same
    /// answer whatever the current folder; the comparison is lexical.
    fn relative_to_machine_dir(&self, path: &Path) -> Option<PathBuf> {
        let base = absolute_lexical(&self.machine_dir)?;
        let file = absolute_lexical(path)?;
        Location::resolve(&file.to_string_lossy(), Path::new("/")).strip_base(&base)
    }
}

/// `path` made absolute against the current folder and folded lexically (`.` and
/// `..`), or `None` for a foreign path (a Windows drive or share on this host),
/// which is never resolved against anything.
fn absolute_lexical(path: &Path) -> Option<PathBuf> {
    if Location::kind_of_path(path).is_foreign() {
        return None;
    }
    let p = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let abs = std::path::absolute(p).ok()?;
    Some(
        Location::resolve(&abs.to_string_lossy(), Path::new("/"))
            .path()
            .to_path_buf(),
    )
}

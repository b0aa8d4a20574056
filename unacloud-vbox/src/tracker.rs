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
use unacloud_core::files::{ExpectedFile, FileRole, MigrationSet, VmFile};
use unacloud_core::model::DiskType;
use unacloud_core::tree::SnapshotTree;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::location::{Location, LocationKind};
use crate::settings::{
    DeviceType, GlobalRegistry, Hardware, MachineSettings, MediaRegistry, ParseLimits,
    SnapshotSettings,
};

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
        let t = uuid.trim();
        let inner = t
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or(t);
        let u = Uuid::try_parse(inner).map_err(|e| {
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

/// The thesis's Eq. 5.4: files of one VM with `d` disks and `s` snapshots taken while
/// running.
pub fn eq_5_4(d: u64, s: u64) -> u64 {
    if s == 0 {
        d + 1
    } else {
        (d + 1) * (s + 1)
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

    /// The snapshot tree for `unacloud_core` (ids are uuids without braces).
    pub fn snapshot_tree(&self) -> Result<SnapshotTree> {
        self.settings.snapshot_tree()
    }

    /// The snapshot tree as text, DOT or JSON.
    ///
    /// Text is for people: control characters in names are escaped
    /// ([`crate::display::escape_control`]) so that a hostile name cannot forge rows.
    /// DOT escapes by its own rules and JSON holds the exact strings.
    ///
    /// JSON has the shape of [`unacloud_core::tree::TreeJson`]
    /// (`{"current": id|null, "snapshots": [{"id", "name", …, "current", "children"}]}`)
    /// and is written without recursion, in compact form, so trees of any depth are
    /// safe to render.
    pub fn render_snapshot_tree(&self, format: TreeFormat) -> Result<String> {
        Ok(match format {
            TreeFormat::Text => crate::display::render_tree_text(&self.snapshot_tree()?)?,
            TreeFormat::Dot => self.snapshot_tree()?.render_dot(),
            TreeFormat::Json => self.snapshot_tree_json()?,
        })
    }

    fn snapshot_tree_json(&self) -> Result<String> {
        let snaps = &self.settings.snapshots;
        let cur = self.settings.current_snapshot_index();
        let mut out = String::from("{\"current\":");
        out.push_str(&match cur {
            Some(c) => format!("\"{}\"", snaps[c].uuid),
            None => "null".to_owned(),
        });
        out.push_str(",\"snapshots\":[");
        // Explicit stack of (snapshot, next child to visit).
        let roots: Vec<usize> = (0..snaps.len())
            .filter(|&i| snaps[i].parent.is_none())
            .collect();
        let mut stack: Vec<(usize, usize)> = Vec::new();
        let mut pending_roots = roots.into_iter();
        let mut first_root = true;
        loop {
            let Some(&mut (node, ref mut next)) = stack.last_mut() else {
                let Some(r) = pending_roots.next() else { break };
                if !first_root {
                    out.push(',');
                }
                first_root = false;
                self.open_json_node(&mut out, r, cur)?;
                stack.push((r, 0));
                continue;
            };
            let children = &snaps[node].children;
            if *next < children.len() {
                let c = children[*next];
                if *next > 0 {
                    out.push(',');
                }
                *next += 1;
                self.open_json_node(&mut out, c, cur)?;
                stack.push((c, 0));
            } else {
                out.push_str("]}");
                stack.pop();
            }
        }
        out.push_str("]}");
        Ok(out)
    }

    /// Writes `{"id":…,"name":…,…,"current":b,"children":[` for snapshot `i`.
    fn open_json_node(&self, out: &mut String, i: usize, cur: Option<usize>) -> Result<()> {
        let s = &self.settings.snapshots[i];
        let node = unacloud_core::tree::Snapshot {
            id: s.uuid.to_string(),
            name: s.name.clone(),
            description: s.description.clone(),
            time_stamp: s.time_stamp.clone(),
            state_file: s.state_file.clone(),
        };
        let body = serde_json::to_string(&node).map_err(|e| {
            Error::Core(unacloud_core::Error::InvalidInput(format!(
                "cannot serialise snapshot {}: {e}",
                s.uuid
            )))
        })?;
        // `body` is a JSON object; reopen it to append the tree fields.
        out.push_str(body.strip_suffix('}').unwrap_or(&body));
        out.push_str(if cur == Some(i) {
            ",\"current\":true,\"children\":["
        } else {
            ",\"current\":false,\"children\":["
        });
        Ok(())
    }

    // ----- selection ----------------------------------------------------------------

    /// Resolves a user's selector: `current` (any case), a uuid (with or without
    /// braces), or a snapshot name, which must be unique.
    pub fn select(&self, selector: &str) -> Result<StateRef> {
        let sel = selector.trim();
        if sel.eq_ignore_ascii_case("current") {
            return Ok(StateRef::Current);
        }
        let inner = sel
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or(sel);
        if let Ok(u) = Uuid::try_parse(inner) {
            if let Some(&i) = self.snapshot_by_uuid.get(&u) {
                return Ok(StateRef::Snapshot(i));
            }
        }
        let matches: Vec<usize> = self
            .settings
            .snapshots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.name == sel)
            .map(|(i, _)| i)
            .collect();
        match matches.as_slice() {
            [] => Err(Error::SnapshotNotFound {
                selector: selector.to_owned(),
                machine: self.settings.name.clone(),
            }),
            [one] => Ok(StateRef::Snapshot(*one)),
            many => Err(Error::AmbiguousSnapshotName {
                name: sel.to_owned(),
                candidates: many
                    .iter()
                    .map(|&i| self.settings.snapshots[i].uuid.to_string())
                    .collect(),
            }),
        }
    }

    fn state_parts(&self, state: StateRef) -> (&Hardware, Option<&str>, String) {
        match state {
            StateRef::Current => (
                &self.settings.hardware,
                self.settings.state_file.as_deref(),
                "the current state".to_owned(),
            ),
            StateRef::Snapshot(i) => {
                let s = &self.settings.snapshots[i];
                (
                    &s.hardware,
                    s.state_file.as_deref(),
                    format!("snapshot {:?} {{{}}}", s.name, s.uuid),
                )
            }
        }
    }

    // ----- the file tracker ---------------------------------------------------------

    /// The files needed to resume `selector` (see [`Machine::select`]) on another host.
    pub fn migration_set(
        &self,
        selector: &str,
        options: &MigrationOptions,
    ) -> Result<MigrationSet> {
        let state = self.select(selector)?;
        self.migration_set_for(state, options)
    }

    /// [`Machine::migration_set`] for an already selected state.
    pub fn migration_set_for(
        &self,
        state: StateRef,
        options: &MigrationOptions,
    ) -> Result<MigrationSet> {
        if let StateRef::Snapshot(i) = state {
            if i >= self.settings.snapshots.len() {
                return Err(Error::SnapshotNotFound {
                    selector: format!("#{i}"),
                    machine: self.settings.name.clone(),
                });
            }
        }
        let (hw, state_file, what) = self.state_parts(state);
        let mut b = SetBuilder::new(self, options.measure_sizes);
        b.push_path(self.settings_path.clone(), FileRole::Settings);
        let mut expected_seen: HashSet<Uuid> = HashSet::new();
        for (ctrl, dev) in hw.attachments() {
            let slot = format!("{} port {} device {}", ctrl.name, dev.port, dev.device);
            match (dev.device_type, dev.image, &dev.host_drive) {
                (DeviceType::HardDisk, Some(u), _) => {
                    let Some(chain) = self.chain(&u) else {
                        let needed_by = format!("hard disk at {slot} in {what}");
                        if options.strict {
                            return Err(Error::UnresolvedDependency { uuid: u, needed_by });
                        }
                        b.set.warnings.push(format!(
                            "unresolved dependency: hard disk {u} ({needed_by}) is in no registry given; pass the global VirtualBox.xml that registers it"
                        ));
                        b.set
                            .external
                            .push(format!("unresolved hard disk {u} ({needed_by})"));
                        continue;
                    };
                    let cut = chain
                        .iter()
                        .rposition(|&i| options.preloaded.contains(&self.media[i].uuid))
                        .map_or(0, |k| k + 1);
                    for &i in &chain[..cut] {
                        let m = &self.media[i];
                        if expected_seen.insert(m.uuid) {
                            b.set.expected_at_destination.push(ExpectedFile {
                                uuid: uuid_string(&m.uuid),
                                path: Some(m.location.path().to_path_buf()),
                            });
                        }
                    }
                    for &i in &chain[cut..] {
                        b.push_medium(i);
                    }
                }
                (DeviceType::Dvd | DeviceType::Floppy, Some(u), _) => {
                    let kind = if dev.device_type == DeviceType::Dvd {
                        "DVD"
                    } else {
                        "floppy"
                    };
                    match self.media_by_uuid.get(&u).map(|&i| (i, &self.media[i])) {
                        Some((i, _)) if options.include_removable => b.push_medium(i),
                        Some((_, m)) => b.set.external.push(format!(
                            "{kind} image {u} at {} ({slot}; not copied)",
                            m.location.path().display()
                        )),
                        None => {
                            b.set
                                .external
                                .push(format!("{kind} image {u} ({slot}; in no registry given)"));
                            if options.include_removable {
                                b.set.warnings.push(format!(
                                    "unresolved dependency: {kind} image {u} at {slot} is in no registry given"
                                ));
                            }
                        }
                    }
                }
                (_, None, Some(src)) => b.set.external.push(format!(
                    "host drive {src:?} ({slot}; passthrough, not a file)"
                )),
                _ => {}
            }
        }
        if let Some(sf) = state_file {
            let loc = Location::resolve(sf, &self.machine_dir);
            b.push_location(loc, FileRole::SavedState);
        }
        Ok(b.finish())
    }

    /// Every file of the machine: the settings, every hard disk of its own registry
    /// and the global-registry disks its states use, and every saved state; with the
    /// count Eq. 5.4 predicts. DVD and floppy images are not included.
    pub fn all_files(&self) -> AllFiles {
        self.all_files_with(true)
    }

    /// [`Machine::all_files`], reading each file's length only if `measure_sizes`
    /// (without it every `bytes` is `None` and the file system is not touched).
    pub fn all_files_with(&self, measure_sizes: bool) -> AllFiles {
        let set = self.collect_all(&self.used_media(), measure_sizes, |_| true);
        let disks = self
            .settings
            .hardware
            .hard_disk_uuids()
            .collect::<HashSet<_>>()
            .len();
        let snapshots = self.settings.snapshots.len();
        AllFiles {
            files: set.files,
            disks,
            snapshots,
            expected_count: eq_5_4(disks as u64, snapshots as u64),
            warnings: set.warnings,
        }
    }

    /// Files of [`Machine::all_files`] that no snapshot and not the current state
    /// needs: what a clean-up could delete.
    pub fn unneeded_files(&self) -> Vec<VmFile> {
        let used = self.used_media();
        // Every saved state belongs to a snapshot or to the current state: all are needed.
        self.collect_all(&used, true, |f| match f {
            Candidate::Settings | Candidate::StateFile => false,
            Candidate::Medium(i) => !used[i],
        })
        .files
    }

    /// The files of [`Machine::all_files`] that `keep` accepts, measured if asked;
    /// `used` is [`Machine::used_media`].
    fn collect_all(
        &self,
        used: &[bool],
        measure: bool,
        mut keep: impl FnMut(Candidate) -> bool,
    ) -> MigrationSet {
        let mut b = SetBuilder::new(self, measure);
        if keep(Candidate::Settings) {
            b.push_path(self.settings_path.clone(), FileRole::Settings);
        }
        for (i, m) in self.media.iter().enumerate() {
            if m.kind == MediumKind::HardDisk
                && (m.source == RegistrySource::Machine || used[i])
                && keep(Candidate::Medium(i))
            {
                b.push_medium(i);
            }
        }
        for sf in self.state_files() {
            if keep(Candidate::StateFile) {
                let loc = Location::resolve(sf, &self.machine_dir);
                b.push_location(loc, FileRole::SavedState);
            }
        }
        b.finish()
    }

    /// Files of [`Machine::all_files`] that resuming `selector` does not need (the
    /// thesis's comparison for one snapshot: older saved states, the current state's
    /// image, …).
    pub fn files_not_needed_for(
        &self,
        selector: &str,
        options: &MigrationOptions,
    ) -> Result<Vec<VmFile>> {
        let set = self.migration_set(selector, options)?;
        let needed: HashSet<&Path> = set
            .files
            .iter()
            .map(|f| f.path.as_path())
            .chain(
                set.expected_at_destination
                    .iter()
                    .filter_map(|e| e.path.as_deref()),
            )
            .collect();
        Ok(self
            .all_files()
            .files
            .into_iter()
            .filter(|f| !needed.contains(f.path.as_path()))
            .collect())
    }

    // ----- verification and copy ---------------------------------------------------

    /// Checks every VDI image of `set` against the registries before anything is
    /// copied: the file exists, is a VDI, carries the registry's uuid, and names the
    /// registry's parent (for the image directly above a preloaded template too).
    /// Images in other formats (VMDK, VHD) cannot be checked this way and are listed
    /// in [`VerifyReport::not_checked`]. Every problem is reported, not just the first.
    pub fn verify(&self, set: &MigrationSet) -> VerifyReport {
        let mut links = Vec::new();
        let mut not_checked = Vec::new();
        let mut unknown = Vec::new();
        let mut foreign = Vec::new();
        for f in set.files.iter().filter(|f| f.role == FileRole::Disk) {
            let medium = f
                .uuid
                .as_deref()
                .and_then(|u| Uuid::try_parse(u).ok())
                .and_then(|u| self.medium(&u));
            match medium {
                // A foreign location names no file here: missing, never looked up.
                Some(m) if Location::kind_of_path(&f.path).is_foreign() => {
                    foreign.push(crate::vdi::ChainProblem::Missing {
                        path: f.path.clone(),
                        uuid: m.uuid,
                    });
                }
                Some(m) if m.kind == MediumKind::HardDisk && is_vdi(m.format.as_deref()) => {
                    let parent = m.parent.map(|p| self.media[p].uuid);
                    links.push(crate::vdi::ChainLink::new(f.path.clone(), m.uuid, parent));
                }
                Some(_) => not_checked.push(f.clone()),
                None => unknown.push(f.clone()),
            }
        }
        let mut chain = crate::vdi::verify_chain(&links);
        chain.problems.extend(foreign);
        VerifyReport {
            chain,
            not_checked,
            unknown,
        }
    }

    /// Computes the migration set of `selector` (unresolved dependencies are errors),
    /// verifies its VDI chain, and copies it with [`Machine::copy_set_to`].
    pub fn copy_to<F>(
        &self,
        selector: &str,
        options: &MigrationOptions,
        dest_root: &Path,
        copy_options: &crate::copy::CopyOptions,
        progress: F,
    ) -> Result<crate::copy::CopyReport>
    where
        F: FnMut(&crate::copy::CopyProgress<'_>),
    {
        let strict = MigrationOptions {
            strict: true,
            measure_sizes: false,
            ..options.clone()
        };
        let set = self.migration_set(selector, &strict)?;
        self.copy_set_to(&set, dest_root, copy_options, progress)
    }

    /// Verifies `set` ([`Machine::verify`]; a broken chain fails before anything is
    /// written) and copies its files into `dest_root`, which becomes the machine
    /// folder at the destination: every file keeps its path relative to this
    /// machine's folder. A file outside the machine folder (an absolute location, a
    /// `..` path, a template elsewhere) is refused together with every other
    /// offending file, before anything is written — preload such images and list them
    /// in [`MigrationOptions::preloaded`] instead. The layout is computed from the
    /// machine folder, made absolute, so a machine loaded from a relative path
    /// (`vms/TM.vbox`) copies to `dest_root/TM.vbox`, whatever the current folder.
    /// Foreign locations (`C:\…`, `//host/share/…` on a non-Windows host) are
    /// refused too. Copies go to temporary names, are checked and renamed into place
    /// (see [`crate::copy`]): a file of the set that is a symbolic link (simplest and
    /// safest: links are never followed, wherever they point) or not a regular file,
    /// and a `dest_root` that is itself a symbolic link, are refused before anything
    /// is written; every copy keeps its source's permission bits.
    pub fn copy_set_to<F>(
        &self,
        set: &MigrationSet,
        dest_root: &Path,
        copy_options: &crate::copy::CopyOptions,
        progress: F,
    ) -> Result<crate::copy::CopyReport>
    where
        F: FnMut(&crate::copy::CopyProgress<'_>),
    {
        self.refuse_linked_folders(set, dest_root)?;
        self.verify(set).into_result()?;
        let pairs: Vec<(PathBuf, PathBuf)> = set
            .files
            .iter()
            .map(|f| {
                let rel = self.relative_to_machine_dir(&f.path).unwrap_or_else(|| {
                    // Outside the machine folder: hand over an absolute form (or the
                    // foreign path as it is), so the copier refuses it and names it.
                    absolute_lexical(&f.path).unwrap_or_else(|| f.path.clone())
                });
                (f.path.clone(), rel)
            })
            .collect();
        crate::copy::copy_files(&pairs, dest_root, copy_options, progress)
    }

    /// Refuses (before anything is read or written) every file of `set` that lies
    /// below a symbolic link to a folder inside the machine folder (`Snapshots` ->
    /// `/etc`): the copier never follows a link as the file itself, and this closes
    /// the same hole one folder up. The machine folder itself may be a link.
    fn refuse_linked_folders(&self, set: &MigrationSet, dest_root: &Path) -> Result<()> {
        let Some(base) = absolute_lexical(&self.machine_dir) else {
            return Ok(());
        };
        let mut rejected = Vec::new();
        for f in &set.files {
            let Some(rel) = self.relative_to_machine_dir(&f.path) else {
                continue; // refused by the copier, naming it
            };
            let mut cur = base.clone();
            let parts: Vec<_> = rel.components().collect();
            for part in parts.iter().take(parts.len().saturating_sub(1)) {
                cur.push(part);
                if std::fs::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_symlink()) {
                    rejected.push(crate::copy::RejectedPath {
                        source: f.path.clone(),
                        relative: rel.to_string_lossy().into_owned(),
                        reason: crate::copy::RejectReason::SourceSymlink { path: cur.clone() },
                    });
                    break;
                }
            }
        }
        if rejected.is_empty() {
            Ok(())
        } else {
            Err(Error::CopyRefused {
                dest_root: dest_root.to_path_buf(),
                rejected,
            })
        }
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

    /// Saved-state files of every snapshot and of the machine (may repeat).
    fn state_files(&self) -> impl Iterator<Item = &str> {
        self.settings
            .snapshots
            .iter()
            .filter_map(|s| s.state_file.as_deref())
            .chain(self.settings.state_file.as_deref())
    }

    /// Marks every medium on the chain of a hard disk attached in any state. Each
    /// walk stops at the first medium already marked, so the cost is linear.
    fn used_media(&self) -> Vec<bool> {
        let mut used = vec![false; self.media.len()];
        let states = std::iter::once(&self.settings.hardware)
            .chain(self.settings.snapshots.iter().map(|s| &s.hardware));
        for hw in states {
            for u in hw.hard_disk_uuids() {
                let mut cur = self.media_by_uuid.get(&u).copied();
                while let Some(i) = cur {
                    if used[i] {
                        break;
                    }
                    used[i] = true;
                    cur = self.media[i].parent;
                }
            }
        }
        used
    }
}

/// The outcome of [`Machine::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// The VDI chain check (every problem found).
    pub chain: crate::vdi::ChainReport,
    /// Disk images in formats whose headers are not checked (VMDK, VHD, …).
    pub not_checked: Vec<VmFile>,
    /// Disk files of the set whose uuid this machine does not know (the set was
    /// computed for another machine).
    pub unknown: Vec<VmFile>,
}

impl VerifyReport {
    /// Whether every checked image is intact and every disk is known.
    pub fn is_ok(&self) -> bool {
        self.chain.is_ok() && self.unknown.is_empty()
    }

    /// `Ok(())` when intact; [`Error::BrokenChain`] listing every problem otherwise,
    /// or [`Error::UnresolvedDependency`] for a disk this machine does not know.
    pub fn into_result(self) -> Result<()> {
        if let Some(f) = self.unknown.first() {
            return Err(Error::UnresolvedDependency {
                uuid: f
                    .uuid
                    .as_deref()
                    .and_then(|u| Uuid::try_parse(u).ok())
                    .unwrap_or_else(Uuid::nil),
                needed_by: format!("disk file {} of the migration set", f.path.display()),
            });
        }
        self.chain.into_result()
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

fn is_vdi(format: Option<&str>) -> bool {
    format.is_some_and(|f| f.eq_ignore_ascii_case("vdi"))
}

/// What [`Machine::collect_all`] offers to its filter.
enum Candidate {
    Settings,
    Medium(usize),
    StateFile,
}

/// The hyphenated lower-case form, without going through `fmt`.
fn uuid_string(u: &Uuid) -> String {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    u.hyphenated().encode_lower(&mut buf).to_owned()
}

/// Accumulates a [`MigrationSet`], de-duplicating by resolved path in O(1): media by
/// their canonical index (precomputed per machine), other files by a path set.
struct SetBuilder<'m> {
    machine: &'m Machine,
    set: MigrationSet,
    media_in: Vec<bool>,
    others: HashSet<OsString>,
    measure: bool,
    /// For each file of `set`, the location it was written as (`None` for the
    /// settings file, which the user gave).
    locations: Vec<Option<Location>>,
}

impl<'m> SetBuilder<'m> {
    fn new(machine: &'m Machine, measure: bool) -> Self {
        SetBuilder {
            machine,
            set: MigrationSet::default(),
            media_in: vec![false; machine.media.len()],
            others: HashSet::new(),
            measure,
            locations: Vec::new(),
        }
    }

    fn push_medium(&mut self, i: usize) {
        let c = self.machine.canonical[i];
        if !std::mem::replace(&mut self.media_in[c], true) {
            let m = &self.machine.media[i];
            self.set.files.push(VmFile::new(
                m.location.path(),
                FileRole::Disk,
                Some(uuid_string(&m.uuid)),
                None,
            ));
            self.locations.push(Some(m.location.clone()));
        }
    }

    /// A file given by its path (the settings file): no location to judge.
    fn push_path(&mut self, path: PathBuf, role: FileRole) {
        if self.add_path(&path) {
            self.set.files.push(VmFile::new(path, role, None, None));
            self.locations.push(None);
        }
    }

    /// A file read from a settings file's location (a saved state).
    fn push_location(&mut self, loc: Location, role: FileRole) {
        let path = loc.path().to_path_buf();
        if self.add_path(&path) {
            self.set.files.push(VmFile::new(path, role, None, None));
            self.locations.push(Some(loc));
        }
    }

    /// Whether `path` is new to the set (and marks it seen).
    fn add_path(&mut self, path: &Path) -> bool {
        if let Some(&c) = self.machine.media_by_path.get(path.as_os_str()) {
            !std::mem::replace(&mut self.media_in[c], true)
        } else {
            self.others.insert(path.as_os_str().to_owned())
        }
    }

    fn finish(mut self) -> MigrationSet {
        for (f, loc) in self.set.files.iter_mut().zip(&self.locations) {
            let what = format!(
                "{}{}",
                f.role,
                f.uuid
                    .as_deref()
                    .map(|u| format!(" {u}"))
                    .unwrap_or_default()
            );
            let foreign = loc.as_ref().filter(|l| l.is_foreign());
            if let Some(l) = foreign {
                // Never looked up: on this host it would be read relative to the
                // current folder, which the settings file knows nothing about.
                let kind = match l.kind() {
                    LocationKind::Unc => "a network share",
                    _ => "a Windows path",
                };
                self.set.warnings.push(format!(
                    "missing file: {} ({what}): foreign location {:?}, {kind} of the host that wrote the settings, outside the machine folder; it is not looked up on this host and copies refuse it",
                    f.path.display(),
                    l.original()
                ));
                continue;
            }
            if self.measure {
                match std::fs::metadata(&f.path) {
                    Ok(meta) if meta.is_file() => f.bytes = Some(meta.len()),
                    Ok(_) => self.set.warnings.push(format!(
                        "not a regular file: {} ({})",
                        f.path.display(),
                        f.role
                    )),
                    Err(e) => self
                        .set
                        .warnings
                        .push(format!("missing file: {} ({what}): {e}", f.path.display())),
                }
            }
            let Some(l) = loc else { continue };
            if self.machine.relative_to_machine_dir(&f.path).is_none() {
                self.set.warnings.push(format!(
                    "location {:?} ({what}) is outside the machine folder (it resolves to {}); copies refuse it: preload it at the destination instead",
                    l.original(),
                    f.path.display()
                ));
            } else if l.kind().is_absolute() {
                self.set.warnings.push(format!(
                    "absolute location {:?} ({what}): a copy keeps the file's place in the machine folder, but the copied settings still name this host's path",
                    l.original()
                ));
            }
        }
        self.set
    }
}

impl MachineSettings {
    /// The snapshot tree for `unacloud_core` (ids are uuids without braces), with the
    /// current state's snapshot marked.
    pub fn snapshot_tree(&self) -> Result<SnapshotTree> {
        use unacloud_core::tree::{NodeId, Snapshot};
        let mut tree = SnapshotTree::new();
        let mut ids: Vec<NodeId> = Vec::with_capacity(self.snapshots.len());
        for s in &self.snapshots {
            let node = Snapshot {
                id: s.uuid.to_string(),
                name: s.name.clone(),
                description: s.description.clone(),
                time_stamp: s.time_stamp.clone(),
                state_file: s.state_file.clone(),
            };
            let id = match s.parent.and_then(|p| ids.get(p).copied()) {
                Some(p) => tree.add_child(p, node)?,
                None => tree.add_root(node)?,
            };
            ids.push(id);
        }
        if let Some(c) = self.current_snapshot_index() {
            tree.set_current(ids.get(c).copied());
        }
        Ok(tree)
    }
}

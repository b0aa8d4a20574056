//! The file tracker proper: selecting a state, the migration set that resumes it, all
//! the files of a machine and those no state needs.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use unacloud_core::cost::files_per_vm;
use unacloud_core::files::{ExpectedFile, FileRole, MigrationSet, VmFile};
use uuid::Uuid;

use super::{AllFiles, Machine, MediumKind, MigrationOptions, RegistrySource, StateRef};
use crate::error::{Error, Result};
use crate::location::{Location, LocationKind};
use crate::settings::{unbraced, DeviceType, Hardware};

impl Machine {
    // ----- selection ----------------------------------------------------------------

    /// Resolves a user's selector: `current` (any case), a uuid (with or without
    /// braces), or a snapshot name, which must be unique.
    pub fn select(&self, selector: &str) -> Result<StateRef> {
        let sel = selector.trim();
        if sel.eq_ignore_ascii_case("current") {
            return Ok(StateRef::Current);
        }
        if let Ok(u) = Uuid::try_parse(unbraced(sel)) {
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
            // Thesis Eq. 5.4, as the cost model computes it.
            expected_count: {
                let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                u64::try_from(files_per_vm(count(disks), count(snapshots))).unwrap_or(u64::MAX)
            },
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

//! Crash safety of the backend's multi-step operations (write-ahead intents).
//!
//! Before the first side effect of an operation that changes more than one file
//! (creating, provisioning, cloning, registering or deleting a VM), an **intent** is
//! written to `<root>/intents/<id>.json` (atomically; `fsync`'d when the backend is
//! durable). The registry stays the single source of truth: an operation is committed
//! once the registry (or, for a disk attachment, the VM's settings) records its result,
//! and the intent is removed last. When the root is next opened, every intent left
//! behind is replayed: a committed operation keeps its result, an uncommitted one is
//! rolled back (the files it created are removed), a deletion that was committed is
//! finished. An intent whose operation was abandoned in this process (its future was
//! dropped, e.g. on Ctrl-C) is replayed the same way by the next operation on that VM.
//!
//! Files that no intent explains (left by versions before intents) are adopted or
//! removed on open: an overlay beside a VM that has no disk is attached to it when its
//! backing file is a registered multiattach template, and removed otherwise.
//!
//! A test-only fault hook ([`QemuHypervisor::__fault_at`]) makes the N-th side effect
//! fail, either alone (an I/O error: the operation rolls back in process) or as if the
//! process had died there (every later side effect fails too: nothing more is written).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{DiskFormat, DiskType, Uuid};

use super::settings::{BaseRef, DiskSlot, VmSettings};
use super::{own_image_file, sanitize, QemuHypervisor, State};

/// The folder of intents under the root.
pub(crate) const INTENT_DIR: &str = "intents";
/// Room kept under the root so that a VM can still be deleted (its registry entry and
/// intent rewritten) when another process has filled the disk.
pub(crate) const RESERVE_FILE: &str = ".reserve";
const RESERVE_BYTES: usize = 256 << 10;
const INTENT_FORMAT: &str = "unacloud-qemu-intent/1";

/// One operation under way. Paths are relative to the root when inside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Intent {
    pub format: String,
    pub id: Uuid,
    pub vm: String,
    pub settings_file: PathBuf,
    #[serde(flatten)]
    pub op: IntentOp,
}

/// What the operation does, with what a roll-back or a replay needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub(crate) enum IntentOp {
    /// A new VM (folder, settings, registry entry). Committed when registered.
    CreateVm {
        folder: PathBuf,
        created_folder: bool,
    },
    /// A new overlay in a VM's folder. Committed when the VM's settings name it.
    AttachDisk { overlay: PathBuf },
    /// A clone into a new folder. Committed when registered.
    CloneVm { folder: PathBuf },
    /// Registering copied files, with the overlays it creates. Committed when
    /// registered.
    RegisterVm { new_files: Vec<PathBuf> },
    /// Deleting a VM and exactly these files. Committed (then finished) once the
    /// registry no longer names it.
    DeleteVm {
        folder: PathBuf,
        files: Vec<PathBuf>,
    },
}

/// The fault hook's state (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct Fault {
    steps: AtomicU64,
    fail_at: AtomicU64,
    crash: AtomicBool,
    dead: AtomicBool,
}

/// Removes an intent from the set of live ones when its operation ends or is dropped.
#[derive(Debug)]
pub(crate) struct IntentGuard<'a> {
    hv: &'a QemuHypervisor,
    pub intent: Intent,
}

impl Drop for IntentGuard<'_> {
    fn drop(&mut self) {
        let mut live = self
            .hv
            .live_intents
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        live.remove(&self.intent.id);
    }
}

/// `p` relative to `root` when inside it.
pub(crate) fn rel(root: &Path, p: &Path) -> PathBuf {
    p.strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| p.to_path_buf())
}

/// A stored path made absolute.
pub(crate) fn abs(root: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}

/// Whether a file name is a temporary sibling left by an atomic write or a copy.
pub(crate) fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && (name.contains(".tmp-") || name.contains(".part-"))
}

/// Whether an error is the file system being full.
pub(crate) fn is_no_space(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => {
            matches!(source.raw_os_error(), Some(c) if c == nix::errno::Errno::ENOSPC as i32 || c == nix::errno::Errno::EDQUOT as i32)
        }
        Error::QemuImg { kind, .. } => *kind == crate::error::ImageFailure::NoSpace,
        _ => false,
    }
}

impl QemuHypervisor {
    /// Makes sure the reserve file is there (best effort: on a full disk it is made
    /// later).
    pub(crate) fn ensure_reserve(&self) {
        let path = self.root.join(RESERVE_FILE);
        if path.exists() {
            return;
        }
        let zeros = vec![0u8; RESERVE_BYTES];
        if let Err(e) = crate::fsutil::write_atomic_with(&path, &zeros, self.durable) {
            tracing::debug!("no room for the reserve file yet: {e}");
        }
    }

    /// Whether `e` says the disk is full and the reserve file could be given up (the
    /// failed step may then be tried once more with that room).
    pub(crate) fn room_after(&self, e: &Error) -> bool {
        if !is_no_space(e) {
            return false;
        }
        let path = self.root.join(RESERVE_FILE);
        if std::fs::remove_file(&path).is_ok() {
            tracing::warn!("the disk is full; using the reserve to finish a deletion");
            true
        } else {
            false
        }
    }

    /// Counts one side effect; fails when the fault hook says so.
    pub(crate) fn fx(&self, what: &str) -> Result<()> {
        let f = &self.fault;
        let step = f.steps.fetch_add(1, Ordering::SeqCst) + 1;
        if f.dead.load(Ordering::SeqCst) {
            return Err(Error::FaultInjected {
                step,
                at: format!("{what} (after the simulated crash)"),
            });
        }
        if f.fail_at.load(Ordering::SeqCst) == step {
            if f.crash.load(Ordering::SeqCst) {
                f.dead.store(true, Ordering::SeqCst);
            }
            return Err(Error::FaultInjected {
                step,
                at: what.to_owned(),
            });
        }
        Ok(())
    }

    /// Test hook: the `step`-th side effect from now fails (0: none). With `crash`,
    /// every side effect after it fails too, as if the process had died there; the
    /// backend should then be dropped and the root opened again.
    ///
    /// Unstable (feature `__testing`): a hook of this project's crash tests.
    #[cfg(feature = "__testing")]
    pub fn __fault_at(&self, step: u64, crash: bool) {
        let f = &self.fault;
        f.steps.store(0, Ordering::SeqCst);
        f.dead.store(false, Ordering::SeqCst);
        f.crash.store(crash, Ordering::SeqCst);
        f.fail_at.store(step, Ordering::SeqCst);
    }

    /// Test hook: side effects counted since the last [`QemuHypervisor::__fault_at`].
    ///
    /// Unstable (feature `__testing`).
    #[cfg(feature = "__testing")]
    pub fn __fault_steps(&self) -> u64 {
        self.fault.steps.load(Ordering::SeqCst)
    }

    fn intent_dir(&self) -> PathBuf {
        self.root.join(INTENT_DIR)
    }

    fn intent_path(&self, id: Uuid) -> PathBuf {
        self.intent_dir().join(format!("{id}.json"))
    }

    /// Writes the intent of an operation about to start (on a blocking thread).
    pub(crate) async fn begin(
        &self,
        vm: &str,
        settings_file: &Path,
        op: IntentOp,
    ) -> Result<IntentGuard<'_>> {
        let intent = Intent {
            format: INTENT_FORMAT.to_owned(),
            id: Uuid::new_v4(),
            vm: vm.to_owned(),
            settings_file: rel(&self.root, settings_file),
            op,
        };
        self.fx("write intent")?;
        // Live before it is on disk: a replay by an operation on another VM (which
        // reads every intent) never takes it for an abandoned one.
        self.live_intents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(intent.id);
        let guard = IntentGuard { hv: self, intent };
        let dir = self.intent_dir();
        let bytes = serde_json::to_vec_pretty(&guard.intent)
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        let (path, durable) = (self.intent_path(guard.intent.id), self.durable);
        crate::hypervisor::run_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            crate::fsutil::write_atomic_with(&path, &bytes, durable)
        })
        .await?;
        Ok(guard)
    }

    /// Removes the intent of an operation that committed or was rolled back. A failure
    /// only leaves the record for the next open (which finds the operation settled).
    pub(crate) async fn end(&self, guard: IntentGuard<'_>) {
        let path = self.intent_path(guard.intent.id);
        let (dir, durable) = (self.intent_dir(), self.durable);
        let res = match self.fx("remove intent") {
            Ok(()) => {
                crate::hypervisor::run_blocking(move || {
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                    if durable {
                        crate::fsutil::sync_dir(&dir)?;
                    }
                    Ok(())
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            tracing::warn!(
                "the record of a finished operation on VM {} stays until the next open: {e}",
                guard.intent.vm
            );
        }
    }

    /// Rolls back (or finishes) a failed operation in this process and removes its
    /// intent; if that fails too, the record stays for the next open. The caller holds
    /// the VM's name or settings lock and not the state.
    pub(crate) async fn abandon(&self, guard: IntentGuard<'_>) {
        let registered = self.registered_vms().await;
        match self.settle(&registered, &guard.intent) {
            Ok(()) => self.end(guard).await,
            Err(e) => tracing::warn!(
                "VM {}: the failed operation is rolled back when the root is next opened: {e}",
                guard.intent.vm
            ),
        }
    }

    /// Removes a file the operation created (counted as a side effect).
    pub(crate) fn remove_created(&self, path: &Path) -> Result<()> {
        self.fx("remove file")?;
        super::remove_if_exists(path)
    }

    /// Removes a folder the operation created, with everything in it.
    fn remove_created_dir(&self, path: &Path) -> Result<()> {
        self.fx("remove folder")?;
        match std::fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Brings the files to the state the intent's operation leaves when it committed,
    /// or to the state before it when it did not; `registered` are the settings files
    /// the registry names (which say whether it committed).
    pub(crate) fn settle(&self, registered: &[PathBuf], intent: &Intent) -> Result<()> {
        let settings_file = abs(&self.root, &intent.settings_file);
        let registered = registered.contains(&settings_file);
        let temps = |dir: &Path| -> Result<()> {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if is_temp_name(&e.file_name().to_string_lossy()) {
                    self.remove_created(&e.path())?;
                }
            }
            Ok(())
        };
        match &intent.op {
            IntentOp::CreateVm {
                folder,
                created_folder,
            } => {
                if !registered {
                    let folder = abs(&self.root, folder);
                    if *created_folder {
                        self.remove_created_dir(&folder)?;
                    } else {
                        self.remove_created(&settings_file)?;
                        temps(&folder)?;
                    }
                }
            }
            IntentOp::CloneVm { folder } => {
                if !registered {
                    self.remove_created_dir(&abs(&self.root, folder))?;
                }
            }
            IntentOp::RegisterVm { new_files } => {
                if !registered {
                    for f in new_files {
                        self.remove_created(&abs(&self.root, f))?;
                    }
                }
            }
            IntentOp::AttachDisk { overlay } => {
                let overlay = abs(&self.root, overlay);
                let folder = settings_file
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                let used = VmSettings::load(&settings_file).is_ok_and(|s| {
                    s.disks
                        .iter()
                        .any(|d| VmSettings::disk_path(&folder, d) == overlay)
                });
                if !used {
                    self.remove_created(&overlay)?;
                }
                temps(&folder)?;
            }
            IntentOp::DeleteVm { folder, files } => {
                if !registered {
                    for f in files {
                        self.remove_created(&abs(&self.root, f))?;
                    }
                    self.remove_created(&settings_file)?;
                    let folder = abs(&self.root, folder);
                    temps(&folder)?;
                    let _ = std::fs::remove_dir(folder.join("Snapshots"));
                    let _ = std::fs::remove_dir(&folder);
                }
            }
        }
        Ok(())
    }

    /// Every intent in the root, oldest first. Half-written ones are removed when
    /// `sweep` (the root is being opened: no operation is under way), else skipped.
    fn stored_intents(&self, sweep: bool) -> Result<Vec<(PathBuf, Intent)>> {
        let dir = self.intent_dir();
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if is_temp_name(&name) {
                // A half-written intent: its operation had not started (or, while
                // the backend is open, is starting).
                if sweep {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                // The operation on another VM that wrote it has ended meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, e)),
            };
            let intent: Intent = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
                what: "QEMU backend intent record",
                path: path.clone(),
                reason: e.to_string(),
                backup: None,
            })?;
            let modified = e.metadata().and_then(|m| m.modified()).ok();
            out.push((modified, path, intent));
        }
        out.sort_by_key(|a| a.0);
        Ok(out.into_iter().map(|(_, p, i)| (p, i)).collect())
    }

    /// Replays every intent that no operation of this process is running (all of them
    /// when the root is being opened), or only those of VM `only`; `registered` as for
    /// [`QemuHypervisor::settle`].
    pub(crate) fn replay_intents(&self, registered: &[PathBuf], only: Option<&str>) -> Result<()> {
        let live: HashSet<Uuid> = self
            .live_intents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (path, intent) in self.stored_intents(only.is_none())? {
            if live.contains(&intent.id) || only.is_some_and(|v| v != intent.vm) {
                continue;
            }
            tracing::warn!(
                "VM {}: settling an interrupted operation ({:?})",
                intent.vm,
                intent.op
            );
            self.settle(registered, &intent)?;
            self.fx("remove intent")?;
            super::remove_if_exists(&path)?;
        }
        Ok(())
    }

    /// Adopts or removes the files that no registered VM and no intent explain (left
    /// by versions that wrote no intents): temporary files, an overlay beside a VM
    /// that has no disk (adopted when it sits on a registered multiattach template),
    /// and VM folders without settings that hold only such files.
    pub(crate) async fn sweep_orphans(&self) -> Result<()> {
        let mut st = self.state.lock().await;
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            if is_temp_name(&e.file_name().to_string_lossy()) {
                super::remove_if_exists(&e.path())?;
            }
        }
        let names: Vec<String> = st.vms.keys().cloned().collect();
        let mut owned_folders = HashSet::new();
        for name in names {
            let Some(e) = st.vms.get(&name) else { continue };
            if st.registry.foreign.contains(&e.settings_file) {
                continue;
            }
            let folder = e.folder();
            owned_folders.insert(folder.clone());
            // Every file the settings name: current disks, snapshots' frozen images and
            // states, the saved state.
            let mut used: HashSet<PathBuf> = e.disk_paths().collect();
            for m in &e.settings.snapshots {
                used.extend(m.disks.iter().map(|d| folder.join(&d.file)));
                used.extend(m.state_file.iter().map(|f| folder.join(f)));
            }
            used.extend(e.settings.saved_state.iter().map(|s| folder.join(&s.file)));
            let prefix = format!("{}-", sanitize(&name));
            let mut strays = Vec::new();
            for f in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
                let fname = f.file_name().to_string_lossy().into_owned();
                if is_temp_name(&fname) {
                    super::remove_if_exists(&f.path())?;
                } else if fname.starts_with(&prefix)
                    && fname.ends_with(".qcow2")
                    && !used.contains(&f.path())
                {
                    strays.push(f.path());
                }
            }
            if e.settings.pending.is_some() {
                // Its own roll-back (when the VM is reattached) decides about its files.
                continue;
            }
            if !strays.is_empty() {
                // An image below a used one in its backing chain is used too (an
                // interrupted snapshot's roll-back can leave the VM on a new overlay
                // whose backing file the settings do not name).
                let mut below = HashSet::new();
                for p in &used {
                    match self.img.info_chain(p).await {
                        Ok(chain) => below.extend(chain.into_iter().map(|i| {
                            let f = PathBuf::from(i.filename);
                            std::fs::canonicalize(&f).unwrap_or(f)
                        })),
                        Err(_) => {
                            // A chain that cannot be read: nothing is removed beside it.
                            below.extend(strays.iter().cloned());
                        }
                    }
                }
                strays.retain(|p| {
                    !below.contains(&std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
                });
            }
            for stray in strays {
                let adopted = self.adopt_overlay(&mut st, &name, &stray).await;
                match adopted {
                    Ok(true) => tracing::warn!(
                        "VM {name}: adopted the overlay {} an interrupted attach left",
                        stray.display()
                    ),
                    Ok(false) | Err(_) => {
                        tracing::warn!(
                            "VM {name}: removing the untracked overlay {}",
                            stray.display()
                        );
                        super::remove_if_exists(&stray)?;
                    }
                }
            }
        }
        // VM folders under the default folder with no settings file at all.
        for e in std::fs::read_dir(&self.vm_folder)
            .into_iter()
            .flatten()
            .flatten()
        {
            let folder = e.path();
            if !folder.is_dir() || owned_folders.contains(&folder) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let prefix = format!("{}-", sanitize(&name));
            let files: Vec<_> = std::fs::read_dir(&folder)
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            let only_ours = files.iter().all(|f| {
                let n = f.file_name().to_string_lossy().into_owned();
                is_temp_name(&n) || (n.starts_with(&prefix) && n.ends_with(".qcow2"))
            });
            if only_ours {
                tracing::warn!(
                    "removing {}: a VM folder with no settings, left by an interrupted creation",
                    folder.display()
                );
                for f in &files {
                    super::remove_if_exists(&f.path())?;
                }
                let _ = std::fs::remove_dir(&folder);
            }
        }
        Ok(())
    }

    /// Attaches `overlay` to VM `name` when the VM has no disk and no snapshot, the file
    /// is the VM's first SATA overlay and its backing file is a registered multiattach
    /// template.
    async fn adopt_overlay(&self, st: &mut State, name: &str, overlay: &Path) -> Result<bool> {
        let Some(e) = st.vms.get(name) else {
            return Ok(false);
        };
        let expected = own_image_file(name, "SATA", 0, 0);
        if !e.settings.disks.is_empty()
            || !e.settings.snapshots.is_empty()
            || overlay.file_name() != expected.file_name()
        {
            return Ok(false);
        }
        let info = self.img.info(overlay).await?;
        let Some(backing) = info.full_backing_filename.or(info.backing_filename) else {
            return Ok(false);
        };
        let Some(t) = st
            .registry
            .disks
            .iter()
            .find(|d| d.location == Path::new(&backing) && d.disk_type == DiskType::MultiAttach)
            .cloned()
        else {
            return Ok(false);
        };
        let boot = st.registry.boot.get(&t.uuid).cloned();
        let slot = DiskSlot {
            controller: "SATA".to_owned(),
            port: 0,
            device: 0,
            file: expected,
            uuid: Uuid::new_v4(),
            own: true,
            base: Some(BaseRef {
                uuid: t.uuid,
                file_name: t
                    .location
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                path: t.location.clone(),
                format: match t.format {
                    DiskFormat::Qcow2 => "qcow2".to_owned(),
                    other => other.to_string().to_ascii_lowercase(),
                },
            }),
            logical_size: t.logical_size,
        };
        let durable = self.durable;
        let Some(e) = st.vms.get_mut(name) else {
            return Ok(false);
        };
        e.update(durable, |s| {
            s.disks.push(slot);
            if s.boot.is_none() {
                s.boot = boot;
            }
        })?;
        Ok(true)
    }
}

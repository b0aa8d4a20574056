//! Snapshots laid out the way VirtualBox lays them out, so the file tracker's reasoning
//! holds for QEMU too: at each snapshot every disk's current overlay becomes a frozen
//! image and the VM continues on a new overlay above it (`Snapshots/{uuid}.qcow2`), and
//! a running VM's memory goes to the snapshot's own state file (`Snapshots/<tag>.sav`).
//!
//! A live snapshot of a running VM captures disk and memory at one instant: the guest
//! is paused, every disk switches to its new overlay in one QMP `transaction`, the
//! memory save starts with QEMU's `background-snapshot` capability (memory is
//! write-protected and written while the guest runs on), and the guest continues. The
//! snapshot is recorded once the state file is complete and on stable storage.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{Error, Result};
use crate::files::{FileRole, MigrationSet, VmFile};
use crate::hypervisor::SnapshotRef;
use crate::model::{DiskType, Uuid, VmId};
use crate::tree::{NodeId, Snapshot, SnapshotTree};

use super::img::BACKEND;
use super::settings::{FrozenDisk, PendingOp, SavedState, SnapshotMeta, VmSettings};
use super::vm::{self, RuntimeGuard};
use super::{find, iso8601, QemuHypervisor};

/// What taking a snapshot did and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// The new snapshot.
    pub snapshot: SnapshotRef,
    /// Whether the VM's memory was saved (it was running or saved).
    pub with_memory: bool,
    /// Whether the guest ran on while its memory was written (`background-snapshot`).
    pub background: bool,
    /// How long the guest was paused, in milliseconds (0 for a VM that was off).
    pub downtime_ms: f64,
    /// From the start of the call until the snapshot was durable, in milliseconds.
    pub total_ms: f64,
    /// Bytes of the memory state file.
    pub state_bytes: u64,
}

fn rel_backing(from_dir_rel: &Path, target_rel: &Path) -> PathBuf {
    // Both paths are relative to the VM folder; overlays live in `Snapshots/`.
    let depth = from_dir_rel.components().count();
    let mut p = PathBuf::new();
    for _ in 0..depth {
        p.push("..");
    }
    p.join(target_rel)
}

impl QemuHypervisor {
    /// Takes a snapshot and reports its timings. For a running VM, `live` keeps the
    /// guest running while its memory is written (where QEMU and the host kernel allow
    /// it); otherwise the guest stays paused until the state is complete. A VM that is
    /// off gets a disk-only snapshot (with its saved state, if it has one).
    ///
    /// The room for the state file (the guest's memory size plus a margin) is checked
    /// first; a snapshot that fails half-way leaves the previous snapshots and the
    /// running VM as they were.
    pub async fn take_snapshot_with(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        live: bool,
    ) -> Result<SnapshotReport> {
        self.take_snapshot_staged(vm, name, description, live, None)
            .await
    }

    /// [`QemuHypervisor::take_snapshot_with`], awaiting `at_point` at the snapshot point:
    /// for a running VM once it is paused and its disks switched to the new overlays —
    /// its state is fixed from then on, since the guest does not run and no device
    /// writes to its memory until QEMU has captured it — and before the guest runs on (a
    /// VM that is not running has its point at once). The guest's downtime includes the
    /// time `at_point` takes.
    pub async fn take_snapshot_staged(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        live: bool,
        mut at_point: Option<crate::hypervisor::AtPoint>,
    ) -> Result<SnapshotReport> {
        let t0 = Instant::now();
        let (mut guard, vm_name, folder, settings) = self.lock_vm(vm).await?;
        if settings.disks.is_empty() {
            return Err(Error::InvalidState {
                operation: "take snapshot of",
                id: vm_name,
                state: "without disks".to_owned(),
            });
        }
        if let Some(shared) = settings.disks.iter().find(|d| !d.own) {
            return Err(Error::Unsupported {
                backend: BACKEND.to_owned(),
                operation: "take snapshot",
                reason: format!(
                    "disk {} is a shared image, not the VM's own overlay",
                    shared.file.display()
                ),
            });
        }
        let running = guard.live.is_some();
        let guard_running_unpaused = guard.live.as_ref().is_some_and(|l| !l.paused);
        let tag = format!("uc-{}", Uuid::new_v4().simple());
        let snaps = PathBuf::from("Snapshots");
        vm::create_dir(&folder.join(&snaps))?;
        let with_memory = running || settings.saved_state.is_some();
        let state_rel = with_memory.then(|| snaps.join(format!("{tag}.sav")));
        if running {
            self.check_room(&folder, settings.memory_mb, &vm_name)
                .await?;
        } else {
            self.check_room(&folder, 0, &vm_name).await?;
        }
        let new_disks: Vec<(PathBuf, Uuid)> = settings
            .disks
            .iter()
            .map(|_| {
                let u = Uuid::new_v4();
                (snaps.join(format!("{{{u}}}.qcow2")), u)
            })
            .collect();
        let mut new_files: Vec<PathBuf> = new_disks.iter().map(|(p, _)| p.clone()).collect();
        new_files.extend(state_rel.clone());
        self.change_settings(&vm_name, |s| {
            s.pending = Some(PendingOp {
                op: "snapshot".to_owned(),
                tag: Some(tag.clone()),
                new_files: new_files.clone(),
                resume_after: guard_running_unpaused,
            })
        })
        .await?;
        let cleanup = |files: &[PathBuf]| {
            for f in files {
                let _ = std::fs::remove_file(folder.join(f));
            }
        };
        // The new overlays exist before the guest is paused.
        for (slot, (rel, _)) in settings.disks.iter().zip(&new_disks) {
            let size = slot.logical_size.unwrap_or(0);
            let size = if size == 0 {
                self.img
                    .info(&VmSettings::disk_path(&folder, slot))
                    .await
                    .map(|i| i.virtual_size)
                    .unwrap_or(0)
            } else {
                size
            };
            let backing = rel_backing(&snaps, &slot.file);
            if let Err(e) = self
                .img
                .create_overlay_unopened(&folder.join(rel), &backing, "qcow2", size)
                .await
            {
                cleanup(&new_files);
                self.clear_pending(&vm_name).await;
                return Err(e);
            }
        }
        let mut downtime_ms = 0.0;
        let mut background = false;
        let mut state_bytes = 0;
        if let Some(live_vm) = guard.live.as_mut() {
            let state = folder.join(state_rel.as_ref().expect("running VMs save memory"));
            background = if live {
                vm::set_background(live_vm, true).await?
            } else {
                vm::set_background(live_vm, false).await?
            };
            if let Err(e) = vm::prepare_state_file(&mut live_vm.qmp, &state).await {
                let _ = std::fs::remove_file(&state);
                cleanup(&new_files);
                self.clear_pending(&vm_name).await;
                return Err(e);
            }
            let was_paused = live_vm.paused;
            let pause_at = Instant::now();
            if !was_paused {
                live_vm.qmp.execute("stop", None).await?;
            }
            let actions: Vec<serde_json::Value> = new_disks
                .iter()
                .enumerate()
                .map(|(i, (rel, _))| {
                    json!({"type": "blockdev-snapshot-sync", "data": {
                        "device": format!("disk{i}"),
                        "snapshot-file": folder.join(rel).to_string_lossy(),
                        "format": "qcow2",
                        "mode": "existing"}})
                })
                .collect();
            if let Err(e) = live_vm
                .qmp
                .execute("transaction", Some(json!({ "actions": actions })))
                .await
            {
                if !was_paused {
                    let _ = live_vm.qmp.execute("cont", None).await;
                }
                cleanup(&new_files);
                self.clear_pending(&vm_name).await;
                return Err(e);
            }
            // The disks now run on the new overlays: record that before anything else
            // can fail, so the VM's current state is never lost.
            let switched = self
                .change_settings(&vm_name, |s| {
                    for (slot, (rel, u)) in s.disks.iter_mut().zip(&new_disks) {
                        slot.file = rel.clone();
                        slot.uuid = *u;
                    }
                })
                .await;
            let mut resumed = false;
            let saved = async {
                switched?;
                // The state is fixed from here on: the guest is paused and no device
                // writes to its memory until it runs again. The point's hook runs now.
                if let Some(point) = at_point.take() {
                    point.await;
                }
                vm::start_migration(&mut live_vm.qmp).await?;
                if background {
                    // QEMU's background snapshot fixes the device state and starts
                    // tracking writes in its own thread after `migrate` returned: the
                    // guest must not run before that, so no `cont` until it is done.
                    let ran = vm::wait_capture(&mut live_vm.qmp, self.snapshot_timeout).await?;
                    if was_paused {
                        if ran {
                            // QEMU 7.2 resumes the guest itself after the capture.
                            live_vm.qmp.execute("stop", None).await?;
                        }
                    } else {
                        if !ran {
                            live_vm.qmp.execute("cont", None).await?;
                        }
                        resumed = true;
                        downtime_ms = pause_at.elapsed().as_secs_f64() * 1e3;
                    }
                }
                vm::wait_migration(&mut live_vm.qmp, &state, self.snapshot_timeout).await?;
                vm::sync_file_async(&state).await
            }
            .await;
            // Whatever failed, a guest this call paused runs again.
            if !was_paused && !resumed {
                let _ = live_vm.qmp.execute("cont", None).await;
                downtime_ms = pause_at.elapsed().as_secs_f64() * 1e3;
            }
            if let Err(e) = saved {
                // The old overlays stay in the current chain; no snapshot is recorded.
                let _ = std::fs::remove_file(&state);
                self.clear_pending(&vm_name).await;
                return Err(e);
            }
            state_bytes = super::run::file_len(&state);
        } else {
            if let Some(point) = at_point.take() {
                point.await;
            }
            if let (Some(rel), Some(saved)) = (&state_rel, &settings.saved_state) {
                let to = folder.join(rel);
                let (from, dest) = (folder.join(&saved.file), to.clone());
                // A link when the file system allows, else a copy of the whole state.
                let linked = tokio::task::spawn_blocking(move || {
                    std::fs::hard_link(&from, &dest)
                        .or_else(|_| std::fs::copy(&from, &dest).map(drop))
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                if let Err(e) = linked {
                    cleanup(&new_files);
                    self.clear_pending(&vm_name).await;
                    return Err(Error::io(to, e));
                }
                state_bytes = super::run::file_len(&to);
            }
        }
        let frozen: Vec<FrozenDisk> = settings
            .disks
            .iter()
            .map(|d| FrozenDisk {
                controller: d.controller.clone(),
                port: d.port,
                device: d.device,
                file: d.file.clone(),
                uuid: d.uuid,
            })
            .collect();
        let time_stamp = iso8601(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        );
        let recorded = self
            .change_settings(&vm_name, |s| {
                for (slot, (rel, u)) in s.disks.iter_mut().zip(&new_disks) {
                    slot.file = rel.clone();
                    slot.uuid = *u;
                }
                s.snapshots.push(SnapshotMeta {
                    tag: tag.clone(),
                    name: name.to_owned(),
                    description: description.map(str::to_owned),
                    parent: s.current_snapshot.clone(),
                    disks: frozen,
                    state_file: state_rel.clone(),
                    time_stamp: Some(time_stamp),
                    downtime_us: running.then_some((downtime_ms * 1e3) as u64),
                    took_us: Some(t0.elapsed().as_micros() as u64),
                });
                s.current_snapshot = Some(tag.clone());
                s.pending = None;
            })
            .await;
        if let Err(e) = recorded {
            if !running {
                cleanup(&new_files);
            }
            return Err(e);
        }
        drop(guard);
        Ok(SnapshotReport {
            snapshot: SnapshotRef {
                id: tag,
                name: name.to_owned(),
            },
            with_memory,
            background,
            downtime_ms,
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
            state_bytes,
        })
    }

    /// Restores a snapshot of a VM that is not running: each disk gets a new overlay
    /// over the snapshot's frozen image (the current overlays are discarded), and the
    /// VM is `Saved` with the snapshot's memory when it has some, else powered off.
    pub(crate) async fn restore_snapshot_vm(&self, vm: &VmId, selector: &str) -> Result<()> {
        let (guard, name, folder, settings) = self.lock_vm(vm).await?;
        guard.refuse_running("restore a snapshot of", &name, "running")?;
        let tag = snapshot_tag(&settings, selector)?;
        let meta = settings
            .snapshots
            .iter()
            .find(|m| m.tag == tag)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: "snapshot",
                id: selector.to_owned(),
            })?;
        if let Some(state) = &meta.state_file {
            if !folder.join(state).exists() {
                return Err(Error::NotFound {
                    kind: "snapshot state file",
                    id: folder.join(state).display().to_string(),
                });
            }
        }
        let snaps = PathBuf::from("Snapshots");
        vm::create_dir(&folder.join(&snaps))?;
        let mut fresh: Vec<(usize, PathBuf, Uuid, PathBuf)> = Vec::new();
        for (i, slot) in settings.disks.iter().enumerate() {
            let frozen = meta.frozen_for(slot, &folder)?;
            if !folder.join(&frozen.file).exists() {
                return Err(Error::NotFound {
                    kind: "snapshot disk image",
                    id: folder.join(&frozen.file).display().to_string(),
                });
            }
            let u = Uuid::new_v4();
            fresh.push((
                i,
                snaps.join(format!("{{{u}}}.qcow2")),
                u,
                frozen.file.clone(),
            ));
        }
        let new_files: Vec<PathBuf> = fresh.iter().map(|(_, p, _, _)| p.clone()).collect();
        self.change_settings(&name, |s| {
            s.pending = Some(PendingOp {
                op: "restore".to_owned(),
                tag: Some(tag.clone()),
                new_files: new_files.clone(),
                resume_after: false,
            })
        })
        .await?;
        for (i, rel, _, frozen) in &fresh {
            let slot = &settings.disks[*i];
            let size = slot.logical_size.unwrap_or(0);
            let made = self
                .img
                .create_overlay_unopened(
                    &folder.join(rel),
                    &rel_backing(&snaps, frozen),
                    "qcow2",
                    size,
                )
                .await;
            if let Err(e) = made {
                for f in &new_files {
                    let _ = std::fs::remove_file(folder.join(f));
                }
                self.clear_pending(&name).await;
                return Err(e);
            }
        }
        let old_active: Vec<PathBuf> = settings.disks.iter().map(|d| d.file.clone()).collect();
        let old_saved = settings.saved_state.clone();
        self.change_settings(&name, |s| {
            for (i, rel, u, _) in &fresh {
                s.disks[*i].file = rel.clone();
                s.disks[*i].uuid = *u;
            }
            s.current_snapshot = Some(tag.clone());
            s.saved_state = meta.state_file.clone().map(|file| SavedState {
                file,
                snapshot: Some(tag.clone()),
            });
            s.aborted = false;
            s.pending = None;
        })
        .await?;
        // The discarded current state: its overlays (never frozen by a snapshot) and
        // its own saved state.
        let frozen_anywhere = |p: &Path| {
            settings
                .snapshots
                .iter()
                .any(|m| m.disks.iter().any(|d| d.file == p))
        };
        for p in old_active.iter().filter(|p| !frozen_anywhere(p)) {
            let _ = std::fs::remove_file(folder.join(p));
        }
        if let Some(SavedState {
            file,
            snapshot: None,
        }) = old_saved
        {
            let _ = std::fs::remove_file(folder.join(file));
        }
        drop(guard);
        Ok(())
    }

    /// Deletes a snapshot of a VM that is not running: every image built on the
    /// snapshot's frozen image is rebased onto the image below it (copying what
    /// differs, so no content changes), then the frozen image and the state file go.
    pub(crate) async fn delete_snapshot_vm(&self, vm: &VmId, selector: &str) -> Result<()> {
        let (guard, name, folder, settings) = self.lock_vm(vm).await?;
        guard.refuse_running(
            "delete a snapshot of",
            &name,
            "running (power it off or save its state first)",
        )?;
        let tag = snapshot_tag(&settings, selector)?;
        self.change_settings(&name, |s| {
            s.pending = Some(PendingOp {
                op: "delete-snapshot".to_owned(),
                tag: Some(tag.clone()),
                new_files: Vec::new(),
                resume_after: false,
            })
        })
        .await?;
        self.finish_delete(&name, &folder, &tag).await?;
        drop(guard);
        Ok(())
    }

    /// The idempotent body of a snapshot deletion (also run by crash recovery).
    async fn finish_delete(&self, name: &str, folder: &Path, tag: &str) -> Result<()> {
        let settings = self.settings_of(name).await?;
        let Some(meta) = settings.snapshots.iter().find(|m| m.tag == tag).cloned() else {
            self.change_settings(name, |s| s.pending = None).await?;
            return Ok(());
        };
        let snaps = PathBuf::from("Snapshots");
        let parent = meta
            .parent
            .as_ref()
            .and_then(|p| settings.snapshots.iter().find(|m| &m.tag == p));
        for slot in &settings.disks {
            let same = |f: &&FrozenDisk| f.is_of(slot);
            let Some(frozen) = meta.disks.iter().find(same) else {
                continue;
            };
            let frozen_abs = folder.join(&frozen.file);
            // What lies below the frozen image: the parent's frozen image or the template.
            let (below, below_fmt): (PathBuf, String) =
                match parent.and_then(|p| p.disks.iter().find(same)) {
                    Some(pf) => (pf.file.clone(), "qcow2".to_owned()),
                    None => match &slot.base {
                        Some(b) => (b.path.clone(), b.format.clone()),
                        None => {
                            return Err(Error::Unsupported {
                                backend: BACKEND.to_owned(),
                                operation: "delete snapshot",
                                reason: format!(
                            "the first snapshot of disk {} has no template below it to merge into",
                            slot.file.display()
                        ),
                            })
                        }
                    },
                };
            let mut children: Vec<PathBuf> = settings
                .snapshots
                .iter()
                .filter(|m| m.parent.as_deref() == Some(tag))
                .filter_map(|m| m.disks.iter().find(same).map(|d| d.file.clone()))
                .collect();
            if settings.current_snapshot.as_deref() == Some(tag) {
                children.push(slot.file.clone());
            }
            for child in children {
                let child_abs = folder.join(&child);
                let info = self.img.info(&child_abs).await?;
                let backing = info
                    .full_backing_filename
                    .or(info.backing_filename)
                    .map(PathBuf::from);
                let on_frozen = backing.as_ref().is_some_and(|b| {
                    b == &frozen_abs
                        || std::fs::canonicalize(b).ok() == std::fs::canonicalize(&frozen_abs).ok()
                });
                if !on_frozen || !frozen_abs.exists() {
                    continue;
                }
                let target = if below.is_absolute() {
                    below.clone()
                } else {
                    rel_backing(&snaps, &below)
                };
                // qemu-img resolves a relative -b from the overlay's folder.
                self.img
                    .rebase_safe(&child_abs, &target, &below_fmt)
                    .await?;
            }
            let _ = std::fs::remove_file(&frozen_abs);
        }
        if let Some(state) = &meta.state_file {
            let still_used = settings
                .saved_state
                .as_ref()
                .is_some_and(|s| &s.file == state);
            if !still_used {
                let _ = std::fs::remove_file(folder.join(state));
            }
        }
        self.change_settings(name, |s| {
            s.snapshots.retain(|m| m.tag != tag);
            for m in &mut s.snapshots {
                if m.parent.as_deref() == Some(tag) {
                    m.parent = meta.parent.clone();
                }
            }
            if s.current_snapshot.as_deref() == Some(tag) {
                s.current_snapshot = meta.parent.clone();
            }
            if let Some(saved) = &mut s.saved_state {
                if saved.snapshot.as_deref() == Some(tag) {
                    saved.snapshot = None;
                }
            }
            s.pending = None;
        })
        .await?;
        Ok(())
    }

    /// Rolls back (or, for a deletion, finishes) an operation that had begun when the
    /// backend or the VM's process last stopped.
    pub(crate) async fn recover_pending(
        &self,
        guard: &mut RuntimeGuard,
        name: &str,
        folder: &Path,
    ) -> Result<()> {
        let settings = self.settings_of(name).await?;
        let Some(p) = settings.pending.clone() else {
            return Ok(());
        };
        tracing::warn!("VM {name}: completing recovery of an interrupted {}", p.op);
        super::run::wait_for_qemu_img(folder, std::time::Duration::from_secs(30)).await;
        if p.op == "delete-snapshot" {
            if let Some(tag) = &p.tag {
                return self.finish_delete(name, folder, tag).await;
            }
        }
        // Files the operation made that the settings do not use are removed; a disk the
        // running process already writes to is kept as the current overlay.
        let mut active_in_process: Vec<PathBuf> = Vec::new();
        if let Some(live) = guard.live.as_mut() {
            // A memory save the dead caller started runs to its end first (cancelling a
            // background snapshot half-way is not something to rely on); its file is
            // then discarded with the rest of the operation.
            for _ in 0..6000 {
                let active = live.qmp.execute("query-migrate", None).await.map(|m| {
                    matches!(
                        m["status"].as_str(),
                        Some("setup" | "active" | "device" | "cancelling")
                    )
                });
                if !active.unwrap_or(false) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            if p.resume_after && live.qmp.status().await.is_ok_and(|s| s != "running") {
                live.qmp.execute("cont", None).await?;
                live.paused = false;
            }
            if let Ok(blocks) = live.qmp.execute("query-block", None).await {
                for f in &p.new_files {
                    let abs = folder.join(f);
                    if blocks.to_string().contains(&*abs.to_string_lossy()) {
                        active_in_process.push(f.clone());
                    }
                }
            }
        }
        let used = |f: &PathBuf| {
            settings.disks.iter().any(|d| &d.file == f)
                || settings.snapshots.iter().any(|m| {
                    m.state_file.as_ref() == Some(f) || m.disks.iter().any(|d| &d.file == f)
                })
                || settings.saved_state.as_ref().is_some_and(|s| &s.file == f)
        };
        let adopt: Vec<PathBuf> = active_in_process
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "qcow2"))
            .collect();
        for f in &p.new_files {
            if !used(f) && !adopt.contains(f) {
                let _ = std::fs::remove_file(folder.join(f));
            }
        }
        self.change_settings(name, |s| {
            if !adopt.is_empty() && adopt.len() == s.disks.len() {
                for (slot, f) in s.disks.iter_mut().zip(&adopt) {
                    slot.file = f.clone();
                    slot.uuid = Uuid::new_v4();
                }
            }
            s.pending = None;
        })
        .await?;
        Ok(())
    }

    /// The minimal set of files to resume `snapshot` of `vm` on another host: the
    /// settings, each disk's chain of the VM's own images from the template up to the
    /// snapshot's frozen image, and the snapshot's state file; the multiattach template
    /// is expected at the destination.
    pub async fn snapshot_files(&self, vm: &VmId, snapshot: &str) -> Result<MigrationSet> {
        let (settings_file, folder, settings, registered) = {
            let st = self.state.lock().await;
            let e = find(&st, vm)?;
            (
                e.settings_file.clone(),
                e.folder(),
                e.settings.clone(),
                st.registry.disks.clone(),
            )
        };
        let tag = snapshot_tag(&settings, snapshot)?;
        let meta = settings
            .snapshots
            .iter()
            .find(|m| m.tag == tag)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: "snapshot",
                id: snapshot.to_owned(),
            })?;
        let mut set = MigrationSet::default();
        set.push(VmFile::new(
            settings_file.clone(),
            FileRole::Settings,
            None,
            len(&settings_file),
        ));
        for frozen in &meta.disks {
            let top = folder.join(&frozen.file);
            let base = settings
                .disks
                .iter()
                .find(|d| frozen.is_of(d))
                .and_then(|d| d.base.as_ref());
            self.push_chain(
                &mut set,
                &top,
                Some(frozen.uuid),
                &folder,
                &registered,
                base,
            )
            .await;
        }
        if let Some(state) = &meta.state_file {
            let p = folder.join(state);
            set.push(VmFile::new(p.clone(), FileRole::SavedState, None, len(&p)));
        }
        add_missing_warnings(&mut set);
        Ok(set)
    }

    /// Adds `top` and the VM's own images below it (base first) to `set`, stopping at
    /// a registered multiattach template ("expected at destination").
    pub(crate) async fn push_chain(
        &self,
        set: &mut MigrationSet,
        top: &Path,
        top_uuid: Option<Uuid>,
        folder: &Path,
        registered: &[crate::model::DiskInfo],
        base: Option<&super::settings::BaseRef>,
    ) {
        let chain = match self.img.info_chain(top).await {
            Ok(c) => c,
            Err(e) => {
                set.warnings
                    .push(format!("cannot inspect {}: {e}", top.display()));
                set.push(VmFile::new(
                    top.to_path_buf(),
                    FileRole::Disk,
                    top_uuid.map(|u| u.to_string()),
                    len(top),
                ));
                if let Some(b) = base {
                    set.expect(b.uuid, Some(b.path.clone()));
                }
                return;
            }
        };
        let mut own: Vec<PathBuf> = Vec::new();
        for image in &chain {
            let p = PathBuf::from(&image.filename);
            let p = if p.is_absolute() { p } else { folder.join(p) };
            let canon = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            if let Some(t) = registered.iter().find(|d| {
                (d.location == canon || d.location == p) && d.disk_type == DiskType::MultiAttach
            }) {
                set.expect(t.uuid, Some(t.location.clone()));
                break;
            }
            if canon.starts_with(folder) || p.starts_with(folder) {
                own.push(canon);
            } else {
                set.external.push(format!(
                    "backing image {} of {} is neither the VM's own nor a registered multiattach template; it is not copied",
                    p.display(),
                    top.display()
                ));
                break;
            }
        }
        for (i, p) in own.iter().enumerate().rev() {
            let uuid = if i == 0 {
                top_uuid.map(|u| u.to_string())
            } else {
                None
            };
            set.push(VmFile::new(p.clone(), FileRole::Disk, uuid, len(p)));
        }
    }
}

pub(crate) fn len(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

pub(crate) fn add_missing_warnings(set: &mut MigrationSet) {
    let missing: Vec<String> = set
        .missing()
        .map(|f| format!("file {} is missing", f.path.display()))
        .collect();
    for msg in missing {
        if !set.warnings.contains(&msg) {
            set.warnings.push(msg);
        }
    }
}

/// The tag of the snapshot a user names (tag or unique name).
pub(crate) fn snapshot_tag(settings: &VmSettings, selector: &str) -> Result<String> {
    let tree = tree_from_settings(settings);
    let node = tree.resolve(selector)?;
    Ok(tree.get(node).map(|s| s.id.clone()).unwrap_or_default())
}

/// The snapshot tree the settings record.
pub(crate) fn tree_from_settings(s: &VmSettings) -> SnapshotTree {
    let mut tree = SnapshotTree::new();
    let mut nodes: std::collections::BTreeMap<&str, NodeId> = std::collections::BTreeMap::new();
    for m in &s.snapshots {
        let mut snap = Snapshot::new(m.tag.clone(), m.name.clone());
        snap.description = m.description.clone();
        snap.time_stamp = m.time_stamp.clone();
        snap.state_file = m.state_file.as_ref().map(|p| p.display().to_string());
        let added = match m.parent.as_deref().and_then(|p| nodes.get(p)) {
            Some(parent) => tree.add_child(*parent, snap),
            None => tree.add_root(snap),
        };
        if let Ok(n) = added {
            nodes.insert(m.tag.as_str(), n);
        }
    }
    tree.set_current(
        s.current_snapshot
            .as_deref()
            .and_then(|t| nodes.get(t))
            .copied(),
    );
    tree
}

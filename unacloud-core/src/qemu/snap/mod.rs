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
use crate::files::MigrationSet;
use crate::hypervisor::SnapshotRef;
use crate::model::{Uuid, VmId};
use crate::tree::{NodeId, Snapshot, SnapshotTree};

use super::img::BACKEND;
use super::settings::{FrozenDisk, PendingOp, SnapshotMeta, VmSettings};
use super::vm::{self};
use super::{iso8601, QemuHypervisor};

mod files;
mod restore;

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

/// The recorded snapshot `selector` names (a tag, a name or a path, as
/// [`SnapshotTree::resolve`] reads them), with its tag.
pub(crate) fn snapshot_meta(settings: &VmSettings, selector: &str) -> Result<SnapshotMeta> {
    let tag = snapshot_tag(settings, selector)?;
    settings
        .snapshots
        .iter()
        .find(|m| m.tag == tag)
        .cloned()
        .ok_or_else(|| Error::NotFound {
            kind: "snapshot",
            id: selector.to_owned(),
        })
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

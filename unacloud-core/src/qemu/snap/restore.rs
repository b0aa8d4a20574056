//! Restoring a snapshot, deleting one, and finishing or rolling back a snapshot
//! operation that a stopped backend or VM left half done.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::{Uuid, VmId};

use super::{rel_backing, snapshot_meta, snapshot_tag};
use crate::qemu::img::BACKEND;
use crate::qemu::settings::{FrozenDisk, PendingOp, SavedState};
use crate::qemu::vm::{self, RuntimeGuard};
use crate::qemu::QemuHypervisor;

impl QemuHypervisor {
    /// Restores a snapshot of a VM that is not running: each disk gets a new overlay
    /// over the snapshot's frozen image (the current overlays are discarded), and the
    /// VM is `Saved` with the snapshot's memory when it has some, else powered off.
    pub(crate) async fn restore_snapshot_vm(&self, vm: &VmId, selector: &str) -> Result<()> {
        let (guard, name, folder, settings) = self.lock_vm(vm).await?;
        guard.refuse_running("restore a snapshot of", &name, "running")?;
        let meta = snapshot_meta(&settings, selector)?;
        let tag = meta.tag.clone();
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
        crate::qemu::run::wait_for_qemu_img(folder, std::time::Duration::from_secs(30)).await;
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
}

//! A VM's files as a whole: registering a VM whose files were copied from another host
//! (re-linking its chain to this host's template), unregistering and deleting exactly
//! the VM's own files, and cloning.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hypervisor::CloneSpec;
use crate::model::{DiskType, Uuid, VmId, VmInfo};

use super::img::BACKEND;
use super::journal::{rel, IntentOp};
use super::settings::{validate_name, DiskSlot, NetConfig, SavedState, VmSettings};
use super::{all_disks, find, own_image_file, run, set_writable, QemuHypervisor};

impl QemuHypervisor {
    /// Registers a VM from its settings file (e.g. copied from another host with the
    /// files of one snapshot). Snapshots whose images or state are not here are dropped;
    /// when the current overlays were not copied the VM is put at its latest remaining
    /// snapshot (`Saved` with its memory, as after a restore). Every image that sat on
    /// the template is re-linked to this host's copy (found by uuid, else by file name)
    /// without copying data, and the template's boot files here are used.
    pub(crate) async fn register_vm_files(&self, settings_path: &Path) -> Result<VmInfo> {
        let settings_file =
            std::fs::canonicalize(settings_path).map_err(|e| Error::io(settings_path, e))?;
        let mut settings = VmSettings::load(&settings_file)?;
        let folder = settings_file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut st = self.state.lock().await;
        if let Some(e) = st.vms.get(&settings.name) {
            return Err(Error::AlreadyExists {
                kind: "vm",
                id: format!("{} ({})", settings.name, e.settings_file.display()),
            });
        }
        let known = all_disks(&st);
        // Snapshots usable here: their own images and their ancestors' images (the
        // qcow2 backing chain) are here, and so is their own memory. An ancestor whose
        // memory was not copied (the minimal set of a later snapshot leaves it out) is
        // left out of the tree, and its descendants hang from the nearest kept ancestor.
        let present = |p: &PathBuf| folder.join(p).exists();
        let parent_of: std::collections::HashMap<String, Option<String>> = settings
            .snapshots
            .iter()
            .map(|m| (m.tag.clone(), m.parent.clone()))
            .collect();
        let disks_here: std::collections::HashMap<String, bool> = settings
            .snapshots
            .iter()
            .map(|m| (m.tag.clone(), m.disks.iter().all(|d| present(&d.file))))
            .collect();
        let chain_here = |tag: &str| {
            let mut cur = Some(tag.to_owned());
            let mut steps = 0;
            while let Some(t) = cur {
                steps += 1;
                if steps > parent_of.len() || !disks_here.get(&t).copied().unwrap_or(false) {
                    return false;
                }
                cur = parent_of.get(&t).cloned().flatten();
            }
            true
        };
        let mut kept: Vec<String> = Vec::new();
        for m in &settings.snapshots {
            if chain_here(&m.tag) && m.state_file.as_ref().map_or(true, present) {
                kept.push(m.tag.clone());
            } else {
                tracing::info!(
                    "VM {}: snapshot {} was not copied here; it is left out",
                    settings.name,
                    m.name
                );
            }
        }
        for m in settings.snapshots.iter_mut() {
            let mut parent = m.parent.clone();
            let mut steps = 0;
            while let Some(p) = parent.clone() {
                if kept.contains(&p) || steps > parent_of.len() {
                    break;
                }
                steps += 1;
                parent = parent_of.get(&p).cloned().flatten();
            }
            m.parent = parent.filter(|p| kept.contains(p));
        }
        settings.snapshots.retain(|m| kept.contains(&m.tag));
        if settings
            .current_snapshot
            .as_ref()
            .is_some_and(|c| !kept.contains(c))
        {
            settings.current_snapshot = None;
        }
        let actives_here = settings
            .disks
            .iter()
            .filter(|d| d.own)
            .all(|d| present(&d.file));
        let mut fresh_overlays: Vec<(usize, PathBuf)> = Vec::new();
        if !actives_here {
            let at = settings
                .current_snapshot
                .clone()
                .or_else(|| settings.snapshots.last().map(|m| m.tag.clone()))
                .ok_or_else(|| Error::NotFound {
                    kind: "disk image",
                    id: format!(
                        "the current disks of VM {} (copy them, or the files of one of its snapshots)",
                        settings.name
                    ),
                })?;
            let meta = settings
                .snapshots
                .iter()
                .find(|m| m.tag == at)
                .cloned()
                .expect("kept above");
            for (i, slot) in settings.disks.iter_mut().enumerate() {
                if !slot.own {
                    continue;
                }
                let frozen = meta.frozen_for(slot, &settings_file)?;
                let u = Uuid::new_v4();
                let rel = PathBuf::from("Snapshots").join(format!("{{{u}}}.qcow2"));
                fresh_overlays.push((i, frozen.file.clone()));
                slot.file = rel;
                slot.uuid = u;
            }
            settings.current_snapshot = Some(at.clone());
            settings.saved_state = meta.state_file.clone().map(|file| SavedState {
                file,
                snapshot: Some(at),
            });
        } else if settings
            .saved_state
            .as_ref()
            .is_some_and(|s| !present(&s.file))
        {
            settings.saved_state = None;
        }
        // Every own image this host will use.
        let mut images: Vec<PathBuf> = settings
            .disks
            .iter()
            .filter(|d| d.own)
            .map(|d| d.file.clone())
            .collect();
        images.retain(|p| {
            !fresh_overlays
                .iter()
                .any(|(i, _)| settings.disks[*i].file == *p)
        });
        for m in &settings.snapshots {
            images.extend(m.disks.iter().map(|d| d.file.clone()));
        }
        images.extend(fresh_overlays.iter().map(|(_, f)| f.clone()));
        images.sort();
        images.dedup();
        for slot in &settings.disks {
            if slot.own {
                if known.iter().any(|d| d.uuid == slot.uuid) {
                    return Err(Error::AlreadyExists {
                        kind: "disk",
                        id: slot.uuid.to_string(),
                    });
                }
                continue;
            }
            if !st.registry.disks.iter().any(|d| d.uuid == slot.uuid) {
                return Err(Error::NotFound {
                    kind: "shared disk",
                    id: format!(
                        "{} ({}) used by VM {}; register it on this host first",
                        slot.file.display(),
                        slot.uuid,
                        settings.name
                    ),
                });
            }
        }
        let mut local_template = None;
        for slot in settings.disks.iter_mut().filter(|d| d.own) {
            let Some(base) = &mut slot.base else { continue };
            let multiattach = || {
                st.registry
                    .disks
                    .iter()
                    .filter(|d| d.disk_type == DiskType::MultiAttach)
            };
            let local = multiattach()
                .find(|d| d.uuid == base.uuid)
                .or_else(|| {
                    multiattach().find(|d| {
                        d.location.file_name().map(|n| n.to_string_lossy())
                            == Some(base.file_name.as_str().into())
                    })
                })
                .cloned()
                .ok_or_else(|| Error::NotFound {
                    kind: "multiattach template",
                    id: format!(
                        "{} (uuid {}) needed by VM {}; preload it on this host first",
                        base.file_name, base.uuid, settings.name
                    ),
                })?;
            base.uuid = local.uuid;
            base.path = local.location.clone();
            base.format = local.format.to_string().to_ascii_lowercase();
            local_template = Some(local);
        }
        if let Some(t) = &local_template {
            // The images that sat directly on the template point at this host's copy.
            let fmt = t.format.to_string().to_ascii_lowercase();
            for rel in &images {
                let path = folder.join(rel);
                let info = self.img.info(&path).await?;
                let backing = info.full_backing_filename.or(info.backing_filename);
                let on_template = backing.as_deref().is_some_and(|b| {
                    let b = Path::new(b);
                    b.is_absolute() && !b.starts_with(&folder)
                });
                if on_template && backing.as_deref().map(Path::new) != Some(t.location.as_path()) {
                    self.img.rebase_unsafe(&path, &t.location, &fmt).await?;
                }
            }
            if let Some(boot) = st.registry.boot.get(&t.uuid) {
                let cmdline = settings.boot.as_ref().and_then(|b| b.cmdline.clone());
                settings.boot = Some(super::settings::BootFiles {
                    cmdline,
                    ..boot.clone()
                });
            }
        }
        let new_files: Vec<PathBuf> = fresh_overlays
            .iter()
            .map(|(i, _)| rel(&self.root, &folder.join(&settings.disks[*i].file)))
            .collect();
        let intent = self.begin(
            &settings.name,
            &settings_file,
            IntentOp::RegisterVm { new_files },
        )?;
        let res = self
            .register_rest(&mut st, &folder, &settings_file, settings, &fresh_overlays)
            .await;
        match &res {
            Ok(_) => self.end(intent),
            Err(_) => self.abandon(&mut st, intent),
        }
        res
    }

    /// The side effects of [`QemuHypervisor::register_vm_files`] once its intent is
    /// written: fresh overlays, the settings, the registry entry (the commit point).
    async fn register_rest(
        &self,
        st: &mut super::State,
        folder: &Path,
        settings_file: &Path,
        mut settings: VmSettings,
        fresh_overlays: &[(usize, PathBuf)],
    ) -> Result<VmInfo> {
        for (i, frozen) in fresh_overlays {
            let slot = &settings.disks[*i];
            let backing = PathBuf::from("..").join(frozen);
            self.fx("create overlay")?;
            std::fs::create_dir_all(folder.join("Snapshots")).map_err(|e| Error::io(folder, e))?;
            self.img
                .create_overlay_unopened(
                    &folder.join(&slot.file),
                    &backing,
                    "qcow2",
                    slot.logical_size.unwrap_or(0),
                )
                .await?;
        }
        settings.aborted = false;
        settings.pending = None;
        run::RunRecord::remove(folder);
        self.fx("write VM settings")?;
        settings.save(settings_file, self.durable)?;
        self.update_registry(st, |reg| reg.vms.push(settings_file.to_path_buf()))?;
        Ok(st.add_vm(settings_file.to_path_buf(), settings))
    }

    /// Unregisters a VM that is not running; with `delete_files`, removes exactly its
    /// own files: its overlays, every snapshot's images and state, its saved state,
    /// console log and settings (never a template).
    pub(crate) async fn unregister_vm_files(&self, vm: &VmId, delete_files: bool) -> Result<()> {
        let (guard, name, folder, settings) = self.lock_vm(vm).await?;
        guard.refuse_running("unregister", &name, "running")?;
        let mut st = self.state.lock().await;
        // An operation on this VM abandoned in this process is settled first.
        self.replay_intents(&mut st, Some(&name))?;
        let settings_file = find(&st, vm)?.settings_file.clone();
        if !delete_files {
            self.update_registry(&mut st, |reg| {
                reg.vms.retain(|p| *p != settings_file);
                reg.foreign.retain(|p| *p != settings_file);
            })?;
            st.vms.remove(&name);
            return Ok(());
        }
        if st.registry.foreign.contains(&settings_file) {
            return Err(Error::OutsideRoot {
                operation: "delete the files of VM",
                path: settings_file,
                root: self.root.clone(),
            });
        }
        let files = own_files(&name, &folder, &settings);
        // On a disk another process filled, the reserve makes room for the two small
        // writes a deletion needs (then the VM's files free far more).
        let intent = self.with_room(|| {
            self.begin(
                &name,
                &settings_file,
                IntentOp::DeleteVm {
                    folder: rel(&self.root, &folder),
                    files: files.iter().map(|f| rel(&self.root, f)).collect(),
                },
            )
        })?;
        // The registry no longer naming the VM is the commit point; the files go after.
        let committed = self.with_room(|| {
            self.update_registry(&mut st, |reg| reg.vms.retain(|p| *p != settings_file))
        });
        if let Err(e) = committed {
            self.abandon(&mut st, intent);
            return Err(e);
        }
        st.vms.remove(&name);
        let finished = self.settle(&mut st, &intent.intent);
        drop(st);
        drop(guard);
        match finished {
            Ok(()) => {
                self.end(intent);
                self.ensure_reserve();
                Ok(())
            }
            // The VM is unregistered; the rest of its files go when the root is next
            // opened (or the name is used again).
            Err(e) => Err(e),
        }
    }

    /// Clones a VM that is not running: each disk's content at the current state (or at
    /// `spec.snapshot`) is written into one new overlay on the same template.
    pub(crate) async fn clone_vm_files(&self, source: &VmId, spec: &CloneSpec) -> Result<VmInfo> {
        validate_name(&spec.name)?;
        let (guard, src_name, src_folder, src) = self.lock_vm(source).await?;
        guard.refuse_running("clone", &src_name, "running")?;
        if self.state.lock().await.vms.contains_key(&spec.name) {
            return Err(Error::AlreadyExists {
                kind: "vm",
                id: spec.name.clone(),
            });
        }
        let at = match &spec.snapshot {
            Some(sel) => {
                let tag = super::snap::snapshot_tag(&src, sel)?;
                src.snapshots.iter().find(|m| m.tag == tag).cloned()
            }
            None => None,
        };
        if let Some(shared) = src.disks.iter().find(|d| !d.own) {
            return Err(Error::Unsupported {
                backend: BACKEND.to_owned(),
                operation: "clone VM",
                reason: format!(
                    "disk {} of {} is a shared image, not the VM's own overlay; only VMs \
                     whose disks are their own (e.g. overlays of a multiattach template) can \
                     be cloned",
                    shared.file.display(),
                    src.name
                ),
            });
        }
        let parent_dir = src_folder
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.vm_folder.clone());
        let folder = parent_dir.join(&spec.name);
        if folder.exists() {
            return Err(Error::AlreadyExists {
                kind: "VM folder",
                id: folder.display().to_string(),
            });
        }
        let settings_file = folder.join(format!("{}.vm.json", spec.name));
        let intent = self.begin(
            &spec.name,
            &settings_file,
            IntentOp::CloneVm {
                folder: rel(&self.root, &folder),
            },
        )?;
        let result = async {
            self.fx("create VM folder")?;
            std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
            let mut slots = Vec::new();
            for d in &src.disks {
                let from = match &at {
                    Some(m) => m
                        .disks
                        .iter()
                        .find(|f| f.is_of(d))
                        .map(|f| src_folder.join(&f.file))
                        .unwrap_or_else(|| VmSettings::disk_path(&src_folder, d)),
                    None => VmSettings::disk_path(&src_folder, d),
                };
                let file = own_image_file(&spec.name, &d.controller, d.port, d.device);
                let to = folder.join(&file);
                self.fx("copy disk")?;
                match &d.base {
                    Some(b) => {
                        self.img
                            .convert_onto(&from, &to, &b.path, &b.format)
                            .await?
                    }
                    None => self.img.convert(&from, "qcow2", &to, "qcow2").await?,
                }
                set_writable(&to, true)?;
                slots.push(DiskSlot {
                    file,
                    uuid: Uuid::new_v4(),
                    own: true,
                    ..d.clone()
                });
            }
            let uuid = Uuid::new_v4();
            let net = match &src.net {
                NetConfig::Tap { .. } => NetConfig::None,
                other => other.clone(),
            };
            let settings = VmSettings {
                uuid,
                name: spec.name.clone(),
                disks: slots,
                snapshots: Vec::new(),
                current_snapshot: None,
                saved_state: None,
                aborted: false,
                pending: None,
                net,
                ..src.clone()
            };
            self.fx("write VM settings")?;
            settings.save(&settings_file, self.durable)?;
            let mut st = self.state.lock().await;
            if st.vms.contains_key(&spec.name) {
                return Err(Error::AlreadyExists {
                    kind: "vm",
                    id: spec.name.clone(),
                });
            }
            self.update_registry(&mut st, |reg| reg.vms.push(settings_file.clone()))?;
            Ok(st.add_vm(settings_file.clone(), settings))
        }
        .await;
        let mut st = self.state.lock().await;
        match &result {
            Ok(_) => self.end(intent),
            Err(_) => self.abandon(&mut st, intent),
        }
        drop(st);
        drop(guard);
        result
    }
}

/// Exactly the files of VM `name` in `folder`: its overlays, every snapshot's images and
/// state, its saved state, console log, run record and pid file, and any overlay named
/// as this VM's own that an interrupted attach left untracked. Never a template, never
/// a shared image.
fn own_files(name: &str, folder: &Path, settings: &VmSettings) -> Vec<PathBuf> {
    let mut own: Vec<PathBuf> = settings
        .disks
        .iter()
        .filter(|d| d.own)
        .map(|d| VmSettings::disk_path(folder, d))
        .collect();
    for m in &settings.snapshots {
        own.extend(m.disks.iter().map(|d| folder.join(&d.file)));
        own.extend(m.state_file.iter().map(|f| folder.join(f)));
    }
    own.extend(settings.saved_state.iter().map(|s| folder.join(&s.file)));
    own.push(folder.join("console.log"));
    own.push(folder.join(run::RUN_FILE));
    own.push(folder.join("qemu.pid"));
    let prefix = format!("{}-", super::sanitize(name));
    for e in std::fs::read_dir(folder).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) && n.ends_with(".qcow2") && !own.contains(&e.path()) {
            own.push(e.path());
        }
    }
    own
}

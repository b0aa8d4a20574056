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
        let path = settings_path.to_path_buf();
        let (settings_file, mut settings) = crate::hypervisor::run_blocking(move || {
            let file = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
            let settings = VmSettings::load(&file)?;
            Ok((file, settings))
        })
        .await?;
        let folder = settings_file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let name = settings.name.clone();
        let _name = self.lock_name(&name).await;
        // What the state says now; the registration itself is checked again when it
        // commits.
        let (known, registered_disks, boot_files) = {
            let st = self.state.lock().await;
            if let Some(e) = st.vms.get(&settings.name) {
                return Err(Error::AlreadyExists {
                    kind: "vm",
                    id: format!("{} ({})", settings.name, e.settings_file.display()),
                });
            }
            (
                all_disks(&st),
                st.registry.disks.clone(),
                st.registry.boot.clone(),
            )
        };
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
            if !registered_disks.iter().any(|d| d.uuid == slot.uuid) {
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
                registered_disks
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
        // The template stays registered until the VM is (marked before it is checked).
        let _in_use = local_template
            .as_ref()
            .map(|t| self.mark_in_use(t.uuid, &name));
        if let Some(t) = &local_template {
            let st = self.state.lock().await;
            if !st.registry.disks.iter().any(|d| d.uuid == t.uuid) {
                return Err(Error::NotFound {
                    kind: "multiattach template",
                    id: format!(
                        "{} needed by VM {name} (it was unregistered meanwhile)",
                        t.location.display()
                    ),
                });
            }
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
            if let Some(boot) = boot_files.get(&t.uuid) {
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
        let intent = self
            .begin(
                &settings.name,
                &settings_file,
                IntentOp::RegisterVm { new_files },
            )
            .await?;
        let res = self
            .register_rest(&folder, &settings_file, settings, &fresh_overlays)
            .await;
        match &res {
            Ok(_) => self.end(intent).await,
            Err(_) => self.abandon(intent).await,
        }
        res
    }

    /// The side effects of [`QemuHypervisor::register_vm_files`] once its intent is
    /// written: fresh overlays, the settings, the registry entry (the commit point).
    async fn register_rest(
        &self,
        folder: &Path,
        settings_file: &Path,
        mut settings: VmSettings,
        fresh_overlays: &[(usize, PathBuf)],
    ) -> Result<VmInfo> {
        for (i, frozen) in fresh_overlays {
            let slot = &settings.disks[*i];
            let backing = PathBuf::from("..").join(frozen);
            self.fx("create overlay")?;
            let (dir, f) = (folder.join("Snapshots"), folder.to_path_buf());
            crate::hypervisor::run_blocking(move || {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(&f, e))
            })
            .await?;
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
        self.save_new_settings(&settings, settings_file).await?;
        let st = self.lock_state().await;
        // Own disks another registration brought meanwhile (under another name).
        let known = all_disks(&st);
        if let Some(slot) = settings
            .disks
            .iter()
            .find(|d| d.own && known.iter().any(|k| k.uuid == d.uuid))
        {
            return Err(Error::AlreadyExists {
                kind: "disk",
                id: slot.uuid.to_string(),
            });
        }
        let file = settings_file.to_path_buf();
        let added = file.clone();
        self.commit_registry(
            st,
            move |reg| reg.vms.push(added),
            move |st| st.add_vm(file, settings),
        )
        .await
    }

    /// Unregisters a VM that is not running; with `delete_files`, removes exactly its
    /// own files: its overlays, every snapshot's images and state, its saved state,
    /// console log and settings (never a template).
    pub(crate) async fn unregister_vm_files(&self, vm: &VmId, delete_files: bool) -> Result<()> {
        let name = find(&*self.state.lock().await, vm)?.settings.name.clone();
        let _name = self.lock_name(&name).await;
        let (guard, name, folder, settings) = self.lock_vm(vm).await?;
        guard.refuse_running("unregister", &name, "running")?;
        let _settings_lock = self.lock_settings_of(settings.uuid).await;
        let settings_file = {
            let st = self.state.lock().await;
            // An operation on this VM abandoned in this process is settled first.
            self.replay_intents(&st.registry.vms, Some(&name))?;
            find(&st, vm)?.settings_file.clone()
        };
        let forget = |file: PathBuf, foreign_too: bool| {
            move |reg: &mut super::settings::Registry| {
                reg.vms.retain(|p| *p != file);
                if foreign_too {
                    reg.foreign.retain(|p| *p != file);
                }
            }
        };
        if !delete_files {
            let st = self.lock_state().await;
            let n = name.clone();
            return self
                .commit_registry(st, forget(settings_file, true), move |st| {
                    st.vms.remove(&n);
                })
                .await;
        }
        if self
            .state
            .lock()
            .await
            .registry
            .foreign
            .contains(&settings_file)
        {
            return Err(Error::OutsideRoot {
                operation: "delete the files of VM",
                path: settings_file,
                root: self.root.clone(),
            });
        }
        let files = own_files(&name, &folder, &settings);
        // On a disk another process filled, the reserve makes room for the two small
        // writes a deletion needs (then the VM's files free far more).
        let op = || IntentOp::DeleteVm {
            folder: rel(&self.root, &folder),
            files: files.iter().map(|f| rel(&self.root, f)).collect(),
        };
        let intent = match self.begin(&name, &settings_file, op()).await {
            Err(e) if self.room_after(&e) => self.begin(&name, &settings_file, op()).await,
            r => r,
        }?;
        // The registry no longer naming the VM is the commit point; the files go after.
        let commit = || {
            let n = name.clone();
            (
                forget(settings_file.clone(), false),
                move |st: &mut super::State| {
                    st.vms.remove(&n);
                },
            )
        };
        let (change, then) = commit();
        let st = self.lock_state().await;
        let committed = match self.commit_registry(st, change, then).await {
            Err(e) if self.room_after(&e) => {
                let (change, then) = commit();
                let st = self.lock_state().await;
                self.commit_registry(st, change, then).await
            }
            r => r,
        };
        if let Err(e) = committed {
            self.abandon(intent).await;
            return Err(e);
        }
        let registered = self.registered_vms().await;
        let finished = self.settle(&registered, &intent.intent);
        drop(guard);
        match finished {
            Ok(()) => {
                self.end(intent).await;
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
        let _name = self.lock_name(&spec.name).await;
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
        let intent = self
            .begin(
                &spec.name,
                &settings_file,
                IntentOp::CloneVm {
                    folder: rel(&self.root, &folder),
                },
            )
            .await?;
        let result = async {
            self.fx("create VM folder")?;
            let f = folder.clone();
            crate::hypervisor::run_blocking(move || {
                std::fs::create_dir_all(&f).map_err(|e| Error::io(&f, e))
            })
            .await?;
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
            self.save_new_settings(&settings, &settings_file).await?;
            let st = self.lock_state().await;
            if st.vms.contains_key(&spec.name) {
                return Err(Error::AlreadyExists {
                    kind: "vm",
                    id: spec.name.clone(),
                });
            }
            let (file, added) = (settings_file.clone(), settings_file.clone());
            self.commit_registry(
                st,
                move |reg| reg.vms.push(added),
                move |st| st.add_vm(file, settings),
            )
            .await
        }
        .await;
        match &result {
            Ok(_) => self.end(intent).await,
            Err(_) => self.abandon(intent).await,
        }
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

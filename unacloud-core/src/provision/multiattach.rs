//! The thesis's Multiattach Manager: seven operations over any [`Hypervisor`].
//!
//! | # | operation | method |
//! |---|---|---|
//! | 1 | preload / register a multiattach disk | [`super::preload::preload`], [`MultiattachManager::register_template`] |
//! | 2 | create a VM attached to one | [`MultiattachManager::create_vm`] |
//! | 3 | clone such a VM | [`MultiattachManager::clone_vm`] |
//! | 4 | replicate it to another host | [`MultiattachManager::replicate`] |
//! | 5 | migrate it to another host | [`MultiattachManager::migrate`] |
//! | 6 | delete it | [`MultiattachManager::delete_vm`] |
//! | 7 | unregister the multiattach disk | [`MultiattachManager::unregister_template`] |
//!
//! Each operation is all-or-nothing: when a step fails, what the operation created so
//! far (a VM, a differencing image, copied files, a registration) is removed again and
//! the error of the failing step is returned. No operation ever writes to or deletes a
//! template's image.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::hypervisor::{AttachSpec, CloneSpec, DiskRef, Hypervisor, StartMode};
use crate::model::{DiskInfo, DiskType, PowerState, Uuid, VmId, VmInfo, VmSpec};

/// Moves a file from the source host to the destination host.
#[async_trait]
pub trait FileTransfer: Send + Sync + std::fmt::Debug {
    /// Copies `from` (on the source host) to `to` (on the destination host), creating
    /// `to`'s folder; `to` must appear complete or not at all. Returns bytes copied.
    async fn copy(&self, from: &Path, to: &Path) -> Result<u64>;
}

/// A [`FileTransfer`] between folders this process can reach (hosts sharing a file
/// system, or a mounted destination): copy to a temporary name, `fsync`, `rename`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalTransfer;

#[async_trait]
impl FileTransfer for LocalTransfer {
    async fn copy(&self, from: &Path, to: &Path) -> Result<u64> {
        if let Some(dir) = to.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| Error::io(dir, e))?;
        }
        let tmp = crate::fsutil::temp_sibling(to, "part");
        let n = tokio::fs::copy(from, &tmp)
            .await
            .map_err(|e| Error::io(from, e));
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        // Every error path removes the temporary copy (a full disk leaves nothing).
        let synced = async {
            let f = tokio::fs::OpenOptions::new()
                .write(true)
                .open(&tmp)
                .await
                .map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().await.map_err(|e| Error::io(&tmp, e))
        }
        .await;
        if let Err(e) = synced {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        if let Err(e) = tokio::fs::rename(&tmp, to).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(Error::io(to, e));
        }
        Ok(n)
    }
}

/// The Multiattach Manager over one hypervisor (the source host for operations 4 and 5).
#[derive(Debug, Clone, Copy)]
pub struct MultiattachManager<'a> {
    hv: &'a dyn Hypervisor,
}

/// Names of the VMs that use `template` through any chain of differencing images.
async fn users_of(hv: &dyn Hypervisor, template: Uuid) -> Result<Vec<String>> {
    let disks = hv.list_disks().await?;
    let parent: HashMap<Uuid, Option<Uuid>> = disks.iter().map(|d| (d.uuid, d.parent)).collect();
    let reaches = |mut u: Uuid| {
        for _ in 0..=parent.len() {
            if u == template {
                return true;
            }
            match parent.get(&u).copied().flatten() {
                Some(p) => u = p,
                None => return false,
            }
        }
        false
    };
    Ok(hv
        .list_vms()
        .await?
        .into_iter()
        .filter(|vm| vm.disks.iter().any(|a| reaches(a.disk)))
        .map(|vm| vm.name)
        .collect())
}

async fn find_disk(hv: &dyn Hypervisor, disk: &DiskRef) -> Result<DiskInfo> {
    let disks = hv.list_disks().await?;
    let found = match disk {
        DiskRef::Uuid(u) => disks.into_iter().find(|d| d.uuid == *u),
        DiskRef::Path(p) => {
            let canon = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            disks
                .into_iter()
                .find(|d| d.location == *p || d.location == canon)
        }
    };
    found.ok_or_else(|| Error::NotFound {
        kind: "disk",
        id: disk.to_string(),
    })
}

/// Removes a VM and its own files, ignoring "not found" (rollback helper).
pub(crate) async fn remove_vm_quietly(hv: &dyn Hypervisor, vm: &VmId) {
    if let Ok(info) = hv.vm_info(vm).await {
        if info.state.is_running() || info.state == PowerState::Paused {
            let _ = hv.power_off(vm).await;
        }
        if let Err(e) = hv.unregister_vm(vm, true).await {
            tracing::warn!("rollback could not remove VM {vm}: {e}");
        }
    }
}

impl<'a> MultiattachManager<'a> {
    /// A manager over `hv`.
    pub fn new(hv: &'a dyn Hypervisor) -> Self {
        MultiattachManager { hv }
    }

    /// Operation 1 (registration part): registers an image file already on this host and
    /// makes it a multiattach disk. If the type change fails, the registration is undone.
    /// (To copy the file onto the host first, use [`super::preload::preload`].)
    pub async fn register_template(&self, path: &Path) -> Result<DiskInfo> {
        let disk = self.hv.register_disk(path).await?;
        let r = DiskRef::Uuid(disk.uuid);
        if let Err(e) = self.hv.set_disk_type(&r, DiskType::MultiAttach).await {
            if let Err(u) = self.hv.unregister_disk(&r, false).await {
                tracing::warn!("rollback could not unregister {}: {u}", path.display());
            }
            return Err(e);
        }
        Ok(DiskInfo {
            disk_type: DiskType::MultiAttach,
            ..disk
        })
    }

    /// Operation 2: creates a VM whose disk is its own differencing child of the
    /// multiattach `template`. On failure the VM (and any child) is removed.
    pub async fn create_vm(&self, spec: &VmSpec, template: &DiskRef) -> Result<VmInfo> {
        let t = find_disk(self.hv, template).await?;
        if t.disk_type != DiskType::MultiAttach {
            return Err(Error::InvalidState {
                operation: "create a VM from",
                id: t.location.display().to_string(),
                state: format!("a {} disk, not multiattach", t.disk_type),
            });
        }
        self.create_vm_from(spec, &t).await
    }

    /// Operation 2 for a template already looked up (saves a `list_disks` per VM).
    pub async fn create_vm_from(&self, spec: &VmSpec, template: &DiskInfo) -> Result<VmInfo> {
        let created = self.hv.create_vm(spec).await?;
        let id = VmId::new(created.name.clone());
        let result = async {
            let child = self
                .hv
                .attach_disk(&id, &AttachSpec::sata(DiskRef::Uuid(template.uuid)))
                .await?;
            if child.uuid == template.uuid {
                return Err(Error::Backend {
                    backend: self.hv.backend().to_owned(),
                    message: format!(
                        "attached the template {} itself instead of a differencing child",
                        template.location.display()
                    ),
                });
            }
            self.hv.vm_info(&id).await
        }
        .await;
        if result.is_err() {
            remove_vm_quietly(self.hv, &id).await;
        }
        result
    }

    /// Whether `vm` is complete as [`MultiattachManager::create_vm_from`] leaves it:
    /// exactly one disk, which is its own differencing child of `template`, and every
    /// file of the VM present (no warning in its file set). A VM an interrupted
    /// provisioning left half-made (no disk yet, or a missing image) is not.
    pub async fn is_complete_from(&self, vm: &VmId, template: &DiskInfo) -> Result<bool> {
        let info = self.hv.vm_info(vm).await?;
        let [attached] = info.disks.as_slice() else {
            return Ok(false);
        };
        let disks = self.hv.list_disks().await?;
        let on_template = disks
            .iter()
            .find(|d| d.uuid == attached.disk)
            .is_some_and(|d| d.parent == Some(template.uuid) && d.uuid != template.uuid);
        if !on_template {
            return Ok(false);
        }
        match self.hv.vm_files(vm).await {
            Ok(set) => Ok(set.warnings.is_empty()),
            // A backend that cannot list files: the disk chain is all there is to check.
            Err(Error::Unsupported { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Operation 3: clones `source` into a new VM named `name` whose disks are new
    /// differencing images (never a full copy of the template). On failure the clone is
    /// removed.
    pub async fn clone_vm(&self, source: &VmId, name: &str) -> Result<VmInfo> {
        let src = self.hv.vm_info(source).await?;
        let spec = CloneSpec {
            name: name.to_owned(),
            snapshot: None,
            linked: true,
        };
        let clone = self.hv.clone_vm(source, &spec).await?;
        let id = VmId::new(clone.name.clone());
        let check = async {
            let disks = self.hv.list_disks().await?;
            for a in &clone.disks {
                let d = disks.iter().find(|d| d.uuid == a.disk);
                let shared = src.disks.iter().any(|s| s.disk == a.disk);
                match d {
                    Some(d) if d.parent.is_some() && !shared => {}
                    _ => {
                        return Err(Error::Backend {
                            backend: self.hv.backend().to_owned(),
                            message: format!(
                                "clone {name} got disk {} that is not a new differencing image",
                                a.disk
                            ),
                        })
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = check {
            remove_vm_quietly(self.hv, &id).await;
            return Err(e);
        }
        Ok(clone)
    }

    /// Operation 4: copies `vm`'s own files (settings and differencing images, never the
    /// template) into `dest_folder` on another host and registers the copy with `dest`.
    /// The VM must not be running. The destination must have the template preloaded
    /// (same uuid, or same file name) and room for the files. On failure the copied
    /// files are removed.
    pub async fn replicate(
        &self,
        vm: &VmId,
        dest: &dyn Hypervisor,
        dest_folder: &Path,
        transfer: &dyn FileTransfer,
    ) -> Result<VmInfo> {
        let info = self.hv.vm_info(vm).await?;
        if !info.state.is_startable() {
            return Err(Error::InvalidState {
                operation: "replicate",
                id: info.name,
                state: info.state.to_string(),
            });
        }
        let set = self.hv.vm_files(vm).await?;
        if let Some(m) = set.missing().next() {
            return Err(Error::NotFound {
                kind: "VM file",
                id: m.path.display().to_string(),
            });
        }
        let settings = set
            .files
            .iter()
            .find(|f| f.role == crate::files::FileRole::Settings)
            .ok_or_else(|| Error::Backend {
                backend: self.hv.backend().to_owned(),
                message: format!("no settings file listed for {vm}"),
            })?
            .path
            .clone();
        let src_folder = settings.parent().map(Path::to_path_buf).unwrap_or_default();

        // The destination must hold every template.
        let dest_disks = dest.list_disks().await?;
        for want in &set.expected_at_destination {
            let name = want.path.as_ref().and_then(|p| p.file_name());
            let ok = dest_disks.iter().any(|d| {
                d.disk_type == DiskType::MultiAttach
                    && (d.uuid.to_string() == want.uuid
                        || (name.is_some() && d.location.file_name() == name))
            });
            if !ok {
                return Err(Error::NotFound {
                    kind: "multiattach template on the destination",
                    id: format!(
                        "{} ({}); preload it there first",
                        want.path
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                        want.uuid
                    ),
                });
            }
        }
        let needed = set.total_bytes();
        tokio::fs::create_dir_all(dest_folder)
            .await
            .map_err(|e| Error::io(dest_folder, e))?;
        let space = dest.host_disk_space(dest_folder).await?;
        if space.available < needed {
            return Err(Error::InsufficientSpace {
                path: dest_folder.to_owned(),
                needed,
                available: space.available,
            });
        }
        let folder_name = src_folder.file_name().ok_or_else(|| {
            Error::InvalidInput(format!("VM folder {} has no name", src_folder.display()))
        })?;
        let target = dest_folder.join(folder_name);
        if tokio::fs::try_exists(&target)
            .await
            .map_err(|e| Error::io(&target, e))?
        {
            return Err(Error::AlreadyExists {
                kind: "VM folder on the destination",
                id: target.display().to_string(),
            });
        }
        let mut plan: Vec<(PathBuf, PathBuf)> = Vec::new();
        for f in &set.files {
            let rel = f.path.strip_prefix(&src_folder).map_err(|_| {
                Error::InvalidInput(format!(
                    "{} is outside the VM folder {}; only VMs whose own files live in \
                     their folder can be replicated",
                    f.path.display(),
                    src_folder.display()
                ))
            })?;
            plan.push((f.path.clone(), target.join(rel)));
        }
        let result = async {
            for (from, to) in &plan {
                transfer.copy(from, to).await?;
            }
            let dest_settings =
                target.join(settings.strip_prefix(&src_folder).unwrap_or(&settings));
            dest.register_vm(&dest_settings).await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&target).await;
        }
        result
    }

    /// Operation 5: replicates `vm` to `dest`, optionally starts it there, then removes
    /// the source VM and its own files. If starting or removing the source fails, the
    /// destination copy is removed and the source is left as it was.
    pub async fn migrate(
        &self,
        vm: &VmId,
        dest: &dyn Hypervisor,
        dest_folder: &Path,
        transfer: &dyn FileTransfer,
        start: bool,
    ) -> Result<VmInfo> {
        let copy = self.replicate(vm, dest, dest_folder, transfer).await?;
        let copy_id = VmId::new(copy.name.clone());
        let rest = async {
            if start {
                dest.start_vm(&copy_id, StartMode::Headless).await?;
            }
            self.hv.unregister_vm(vm, true).await
        }
        .await;
        match rest {
            Ok(()) => dest.vm_info(&copy_id).await,
            Err(e) => {
                remove_vm_quietly(dest, &copy_id).await;
                Err(e)
            }
        }
    }

    /// Operation 6: deletes a VM and its own files (differencing images, settings,
    /// saved states), powering it off first if it runs. The template is never touched.
    pub async fn delete_vm(&self, vm: &VmId) -> Result<()> {
        let info = self.hv.vm_info(vm).await?;
        if info.state.is_running() || info.state == PowerState::Paused {
            self.hv.power_off(vm).await?;
        }
        self.hv.unregister_vm(vm, true).await
    }

    /// Operation 7: unregisters a multiattach template (and with `delete_file` deletes
    /// its image). Refused with [`Error::InUse`] listing every VM whose disks descend
    /// from it.
    pub async fn unregister_template(&self, template: &DiskRef, delete_file: bool) -> Result<()> {
        let t = find_disk(self.hv, template).await?;
        let users = users_of(self.hv, t.uuid).await?;
        if !users.is_empty() {
            return Err(Error::InUse {
                id: t.location.display().to_string(),
                users,
            });
        }
        self.hv
            .unregister_disk(&DiskRef::Uuid(t.uuid), delete_file)
            .await
    }

    /// The VMs whose disks descend from `template`.
    pub async fn template_users(&self, template: &DiskRef) -> Result<Vec<String>> {
        let t = find_disk(self.hv, template).await?;
        users_of(self.hv, t.uuid).await
    }
}

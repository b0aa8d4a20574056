//! An in-memory [`Hypervisor`]: the reference semantics, for tests.
//!
//! [`InMemoryHypervisor`] keeps VMs, disks and snapshot trees in memory and behaves the
//! way VirtualBox does where the family depends on it:
//!
//! * power states follow the hypervisor's rules (only a powered-off, saved or aborted VM
//!   starts; only a running VM pauses or saves its state; a running VM cannot restore a
//!   snapshot or be unregistered);
//! * taking a snapshot freezes every attached image and attaches a fresh differencing
//!   child per disk, and a snapshot of a running VM records a saved-state file;
//! * restoring a snapshot discards the current-state differencing images and attaches new
//!   children of the snapshot's images;
//! * a [`DiskType::MultiAttach`] base is never attached itself: each VM gets its own
//!   differencing child, and the base cannot be unregistered while children exist;
//! * deleting a VM's files removes its own images, never a multiattach template.
//!
//! It is a test double for users' own tests and for the family's conformance suite
//! ([`crate::conformance`]); it touches no files and runs no guest. Failures can be
//! injected with [`InMemoryHypervisor::fail_on`] to test all-or-nothing code paths.
//!
//! ```
//! # tokio_test_block_on(async {
//! use std::path::Path;
//! use unacloud_core::hypervisor::{AttachSpec, DiskRef, Hypervisor};
//! use unacloud_core::memory::InMemoryHypervisor;
//! use unacloud_core::model::{DiskType, HardwareProfile, VmId, VmSpec};
//!
//! let hv = InMemoryHypervisor::new();
//! let template = hv.register_disk(Path::new("/templates/ubuntu.vdi")).await.unwrap();
//! hv.set_disk_type(&DiskRef::Uuid(template.uuid), DiskType::MultiAttach).await.unwrap();
//! hv.create_vm(&VmSpec::new("web1", HardwareProfile::Small)).await.unwrap();
//! let child = hv
//!     .attach_disk(&VmId::from("web1"), &AttachSpec::sata(DiskRef::Uuid(template.uuid)))
//!     .await
//!     .unwrap();
//! assert_eq!(child.parent, Some(template.uuid)); // the VM writes to its own child
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::files::{FileRole, MigrationSet, VmFile};
use crate::hypervisor::{
    AttachSpec, CloneSpec, DiskRef, GuestCommand, GuestOutput, Hypervisor, SnapshotRef, StartMode,
};
use crate::model::{
    DiskAttachment, DiskFormat, DiskInfo, DiskSpace, DiskType, PowerState, Uuid, VmId, VmInfo,
    VmSpec,
};
use crate::tree::{Snapshot, SnapshotTree};

mod snapshots;
mod state;

use state::{push_chains, SnapshotState, State, VmRecord};

const BACKEND: &str = "in-memory";

/// The in-memory reference implementation of [`Hypervisor`]. See the module docs.
#[derive(Debug, Default)]
pub struct InMemoryHypervisor {
    state: Mutex<State>,
}

impl InMemoryHypervisor {
    /// An empty hypervisor: no VMs, no disks, 1 TiB of free disk space.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another test thread panicked; the state is still
        // consistent because every mutation is completed before returning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the `(skip + 1)`-th next call of `operation` fail with [`Error::Backend`].
    ///
    /// `operation` is the trait method's name (`"attach_disk"`, `"start_vm"`, …).
    pub fn fail_on(&self, operation: &str, skip: usize) {
        self.lock().failures.push((operation.to_owned(), skip));
    }

    /// Sets what [`Hypervisor::host_disk_space`] reports.
    pub fn set_disk_space(&self, space: DiskSpace) {
        self.lock().disk_space = Some(space);
    }

    /// Every guest command run so far, with the VM it ran in.
    pub fn guest_log(&self) -> Vec<(String, GuestCommand)> {
        self.lock().guest_log.clone()
    }

    /// Forces a VM into a power state, as a host crash would (e.g. `Aborted`).
    pub fn force_state(&self, vm: &VmId, state: PowerState) -> Result<()> {
        self.lock().vm_mut(vm)?.info.state = state;
        Ok(())
    }
}

fn invalid(operation: &'static str, vm: &VmRecord) -> Error {
    Error::InvalidState {
        operation,
        id: vm.info.name.clone(),
        state: vm.info.state.to_string(),
    }
}

#[async_trait]
impl Hypervisor for InMemoryHypervisor {
    fn backend(&self) -> &str {
        BACKEND
    }

    async fn list_vms(&self) -> Result<Vec<VmInfo>> {
        let mut s = self.lock();
        s.check_failure("list_vms")?;
        Ok(s.vms.values().map(|r| r.info.clone()).collect())
    }

    async fn vm_info(&self, vm: &VmId) -> Result<VmInfo> {
        let mut s = self.lock();
        s.check_failure("vm_info")?;
        Ok(s.vm_mut(vm)?.info.clone())
    }

    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        let mut s = self.lock();
        s.check_failure("create_vm")?;
        if spec.name.is_empty() {
            return Err(Error::InvalidInput("a VM needs a name".to_owned()));
        }
        if s.vms.contains_key(&spec.name) {
            return Err(Error::AlreadyExists {
                kind: "vm",
                id: spec.name.clone(),
            });
        }
        let folder = spec
            .base_folder
            .clone()
            .unwrap_or_else(|| PathBuf::from("/vms"))
            .join(&spec.name);
        let uuid = s.new_uuid();
        let info = VmInfo {
            name: spec.name.clone(),
            uuid: Some(uuid),
            state: PowerState::PoweredOff,
            cores: spec.effective_cores(),
            memory_mb: spec.effective_memory_mb(),
            disks: Vec::new(),
            current_snapshot: None,
            settings_file: Some(folder.join(format!("{}.vbox", spec.name))),
            template: None,
        };
        s.vms
            .insert(spec.name.clone(), VmRecord::new(info.clone(), folder));
        Ok(info)
    }

    async fn register_vm(&self, settings: &Path) -> Result<VmInfo> {
        let mut s = self.lock();
        s.check_failure("register_vm")?;
        let record = s
            .unregistered
            .remove(settings)
            .ok_or_else(|| Error::NotFound {
                kind: "settings file",
                id: settings.display().to_string(),
            })?;
        if s.vms.contains_key(&record.info.name) {
            let name = record.info.name.clone();
            s.unregistered.insert(settings.to_path_buf(), record);
            return Err(Error::AlreadyExists {
                kind: "vm",
                id: name,
            });
        }
        let info = record.info.clone();
        s.vms.insert(info.name.clone(), record);
        Ok(info)
    }

    async fn unregister_vm(&self, vm: &VmId, delete_files: bool) -> Result<()> {
        let mut s = self.lock();
        s.check_failure("unregister_vm")?;
        let (key, record) = s.vm_snapshot(vm)?;
        if !record.info.state.is_startable() {
            return Err(invalid("unregister", &record));
        }
        s.vms.remove(&key);
        if delete_files {
            // Its own images: everything it or its snapshots attach, and their ancestors
            // up to (excluding) the first image shared with someone else or multiattach.
            let mut own: Vec<Uuid> = record.info.disks.iter().map(|a| a.disk).collect();
            for st in record.snapshot_states.values() {
                own.extend(st.attachments.iter().map(|a| a.disk));
            }
            let mut frontier = own.clone();
            while let Some(d) = frontier.pop() {
                if let Some(p) = s.disks.get(&d).and_then(|x| x.parent) {
                    if !own.contains(&p) {
                        own.push(p);
                        frontier.push(p);
                    }
                }
            }
            // Delete leaves first, repeatedly, never touching multiattach or shared bases.
            loop {
                let removable: Vec<Uuid> = own
                    .iter()
                    .copied()
                    .filter(|d| {
                        s.disks
                            .get(d)
                            .is_some_and(|x| x.disk_type != DiskType::MultiAttach)
                            && s.children_of(*d).is_empty()
                            && s.users_of(*d).is_empty()
                    })
                    .collect();
                if removable.is_empty() {
                    break;
                }
                for d in removable {
                    s.disks.remove(&d);
                    own.retain(|x| *x != d);
                }
            }
        } else if let Some(path) = record.info.settings_file.clone() {
            s.unregistered.insert(path, record);
        }
        Ok(())
    }

    async fn clone_vm(&self, source: &VmId, spec: &CloneSpec) -> Result<VmInfo> {
        let mut s = self.lock();
        s.check_failure("clone_vm")?;
        if s.vms.contains_key(&spec.name) {
            return Err(Error::AlreadyExists {
                kind: "vm",
                id: spec.name.clone(),
            });
        }
        let src = s.vm_mut(source)?.clone();
        let attachments = match &spec.snapshot {
            Some(sel) => {
                let node = src.tree.resolve(sel)?;
                let id = src.tree.get(node).map(|n| n.id.clone()).unwrap_or_default();
                src.snapshot_states
                    .get(&id)
                    .map(|st| st.attachments.clone())
                    .unwrap_or_default()
            }
            None if spec.linked => {
                return Err(Error::InvalidInput(
                    "a linked clone needs a snapshot to branch from".to_owned(),
                ))
            }
            None => src.info.disks.clone(),
        };
        let folder = src
            .folder
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
            .join(&spec.name);
        let mut disks = Vec::new();
        for a in attachments {
            let new_disk = if spec.linked {
                s.new_child(a.disk, &folder)?
            } else {
                let orig = s
                    .disks
                    .get(&a.disk)
                    .cloned()
                    .ok_or_else(|| Error::NotFound {
                        kind: "disk",
                        id: a.disk.to_string(),
                    })?;
                let uuid = s.new_uuid();
                let full = DiskInfo {
                    uuid,
                    location: folder.join(format!("{}-disk{}.vdi", spec.name, a.port)),
                    format: orig.format,
                    disk_type: DiskType::Normal,
                    parent: None,
                    logical_size: orig.logical_size,
                };
                s.disks.insert(uuid, full.clone());
                full
            };
            disks.push(DiskAttachment {
                disk: new_disk.uuid,
                ..a
            });
        }
        let uuid = s.new_uuid();
        let info = VmInfo {
            name: spec.name.clone(),
            uuid: Some(uuid),
            state: PowerState::PoweredOff,
            disks,
            current_snapshot: None,
            settings_file: Some(folder.join(format!("{}.vbox", spec.name))),
            ..src.info.clone()
        };
        s.vms
            .insert(spec.name.clone(), VmRecord::new(info.clone(), folder));
        Ok(info)
    }

    async fn start_vm(&self, vm: &VmId, _mode: StartMode) -> Result<()> {
        let mut s = self.lock();
        s.check_failure("start_vm")?;
        let (_, record) = s.vm_snapshot(vm)?;
        if !record.info.state.is_startable() {
            return Err(invalid("start", &record));
        }
        // A normal image may be attached to several VMs but only one of them may run.
        for a in &record.info.disks {
            let running_user = s.vms.values().find(|o| {
                o.info.name != record.info.name
                    && !o.info.state.is_startable()
                    && o.info.disks.iter().any(|b| b.disk == a.disk)
            });
            if let Some(o) = running_user {
                return Err(Error::InUse {
                    id: a.disk.to_string(),
                    users: vec![o.info.name.clone()],
                });
            }
        }
        s.vm_mut(vm)?.info.state = PowerState::Running;
        Ok(())
    }

    async fn power_off(&self, vm: &VmId) -> Result<()> {
        let mut s = self.lock();
        s.check_failure("power_off")?;
        let r = s.vm_mut(vm)?;
        match r.info.state {
            PowerState::Running | PowerState::Paused | PowerState::Stuck => {
                r.info.state = PowerState::PoweredOff;
                Ok(())
            }
            _ => Err(invalid("power off", r)),
        }
    }

    async fn save_state(&self, vm: &VmId) -> Result<()> {
        let mut s = self.lock();
        s.check_failure("save_state")?;
        let r = s.vm_mut(vm)?;
        match r.info.state {
            PowerState::Running | PowerState::Paused => {
                r.info.state = PowerState::Saved;
                Ok(())
            }
            _ => Err(invalid("save the state of", r)),
        }
    }

    async fn pause(&self, vm: &VmId) -> Result<()> {
        let mut s = self.lock();
        s.check_failure("pause")?;
        let r = s.vm_mut(vm)?;
        if r.info.state != PowerState::Running {
            return Err(invalid("pause", r));
        }
        r.info.state = PowerState::Paused;
        Ok(())
    }

    async fn resume(&self, vm: &VmId) -> Result<()> {
        let mut s = self.lock();
        s.check_failure("resume")?;
        let r = s.vm_mut(vm)?;
        if r.info.state != PowerState::Paused {
            return Err(invalid("resume", r));
        }
        r.info.state = PowerState::Running;
        Ok(())
    }

    async fn take_snapshot(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        live: bool,
    ) -> Result<SnapshotRef> {
        self.snapshot_take(vm, name, description, live)
    }

    async fn restore_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        self.snapshot_restore(vm, snapshot)
    }

    async fn delete_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        self.snapshot_delete(vm, snapshot)
    }

    async fn snapshot_tree(&self, vm: &VmId) -> Result<SnapshotTree> {
        let mut s = self.lock();
        s.check_failure("snapshot_tree")?;
        Ok(s.vm_mut(vm)?.tree.clone())
    }

    async fn list_disks(&self) -> Result<Vec<DiskInfo>> {
        let mut s = self.lock();
        s.check_failure("list_disks")?;
        Ok(s.disks.values().cloned().collect())
    }

    async fn register_disk(&self, path: &Path) -> Result<DiskInfo> {
        let mut s = self.lock();
        s.check_failure("register_disk")?;
        if s.disks.values().any(|d| d.location == path) {
            return Err(Error::AlreadyExists {
                kind: "disk",
                id: path.display().to_string(),
            });
        }
        let uuid = s.new_uuid();
        let format = DiskFormat::parse(path.extension().and_then(|e| e.to_str()).unwrap_or("raw"));
        let info = DiskInfo {
            uuid,
            location: path.to_path_buf(),
            format,
            disk_type: DiskType::Normal,
            parent: None,
            logical_size: None,
        };
        s.disks.insert(uuid, info.clone());
        Ok(info)
    }

    async fn unregister_disk(&self, disk: &DiskRef, _delete_file: bool) -> Result<()> {
        let mut s = self.lock();
        s.check_failure("unregister_disk")?;
        let uuid = s.disk_uuid(disk)?;
        let mut users = s.users_of(uuid);
        for c in s.children_of(uuid) {
            users.push(format!("differencing image {c}"));
        }
        if !users.is_empty() {
            return Err(Error::InUse {
                id: uuid.to_string(),
                users,
            });
        }
        s.disks.remove(&uuid);
        Ok(())
    }

    async fn set_disk_type(&self, disk: &DiskRef, disk_type: DiskType) -> Result<()> {
        let mut s = self.lock();
        s.check_failure("set_disk_type")?;
        let uuid = s.disk_uuid(disk)?;
        let users = s.users_of(uuid);
        if !users.is_empty() {
            return Err(Error::InUse {
                id: uuid.to_string(),
                users,
            });
        }
        let d = s.disks.get_mut(&uuid).ok_or_else(|| Error::NotFound {
            kind: "disk",
            id: uuid.to_string(),
        })?;
        if d.parent.is_some() && disk_type != DiskType::Normal {
            return Err(Error::InvalidState {
                operation: "change the type of",
                id: uuid.to_string(),
                state: "a differencing image".to_owned(),
            });
        }
        d.disk_type = disk_type;
        Ok(())
    }

    async fn attach_disk(&self, vm: &VmId, spec: &AttachSpec) -> Result<DiskInfo> {
        let mut s = self.lock();
        s.check_failure("attach_disk")?;
        let uuid = s.disk_uuid(&spec.disk)?;
        let (_, r) = s.vm_snapshot(vm)?;
        if !r.info.state.is_startable() {
            return Err(invalid("attach a disk to", &r));
        }
        if r.info.disks.iter().any(|a| {
            a.controller == spec.controller && a.port == spec.port && a.device == spec.device
        }) {
            return Err(Error::AlreadyExists {
                kind: "attachment",
                id: format!(
                    "{} port {} device {}",
                    spec.controller, spec.port, spec.device
                ),
            });
        }
        let disk = s.disks.get(&uuid).cloned().ok_or_else(|| Error::NotFound {
            kind: "disk",
            id: uuid.to_string(),
        })?;
        let attached = if disk.disk_type == DiskType::MultiAttach {
            s.new_child(uuid, &r.folder)?
        } else {
            disk
        };
        let a = DiskAttachment {
            controller: spec.controller.clone(),
            port: spec.port,
            device: spec.device,
            disk: attached.uuid,
        };
        s.vm_mut(vm)?.info.disks.push(a);
        Ok(attached)
    }

    async fn guest_run(&self, vm: &VmId, command: &GuestCommand) -> Result<GuestOutput> {
        let mut s = self.lock();
        s.check_failure("guest_run")?;
        let r = s.vm_mut(vm)?;
        if r.info.state != PowerState::Running {
            return Err(invalid("run a command in", r));
        }
        let name = r.info.name.clone();
        s.guest_log.push((name, command.clone()));
        Ok(GuestOutput {
            exit_code: 0,
            stdout: String::new(),
            stderr: String::new(),
        })
    }

    async fn vm_files(&self, vm: &VmId) -> Result<MigrationSet> {
        let mut s = self.lock();
        s.check_failure("vm_files")?;
        let r = s.vm_mut(vm)?.clone();
        let mut set = MigrationSet::default();
        if let Some(settings) = &r.info.settings_file {
            set.push(VmFile::new(
                settings.clone(),
                FileRole::Settings,
                None,
                None,
            ));
        }
        push_chains(&s, &mut set, &r.info.disks);
        if r.info.state == PowerState::Saved {
            set.push(VmFile::new(
                r.folder.join("Snapshots").join("current.sav"),
                FileRole::SavedState,
                None,
                None,
            ));
        }
        Ok(set)
    }

    async fn snapshot_files(&self, vm: &VmId, snapshot: &str) -> Result<MigrationSet> {
        self.snapshot_file_set(vm, snapshot)
    }

    async fn host_disk_space(&self, _path: &Path) -> Result<DiskSpace> {
        let mut s = self.lock();
        s.check_failure("host_disk_space")?;
        Ok(s.disk_space.unwrap_or(DiskSpace {
            available: 1 << 40,
            total: 1 << 40,
        }))
    }
}

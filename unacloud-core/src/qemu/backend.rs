//! [`Hypervisor`] for the QEMU backend: listing, creating and removing VMs, the disk
//! registry and attachments, and the files of a VM. Running VMs, snapshots and whole-VM
//! file operations live in the `vm`, `snap` and `files` modules; these methods call them.

use super::*;

#[async_trait]
impl Hypervisor for QemuHypervisor {
    fn backend(&self) -> &str {
        BACKEND
    }

    async fn list_vms(&self) -> Result<Vec<VmInfo>> {
        let all: Vec<(VmInfo, VmSettings, PathBuf)> = {
            let st = self.state.lock().await;
            st.vms
                .values()
                .map(|e| (info_of(e), e.settings.clone(), e.folder()))
                .collect()
        };
        let mut out = Vec::with_capacity(all.len());
        for (mut info, settings, folder) in all {
            info.state = self.power_state(&settings, &folder).await;
            out.push(info);
        }
        Ok(out)
    }

    async fn vm_info(&self, vm: &VmId) -> Result<VmInfo> {
        let (mut info, settings, folder) = {
            let st = self.state.lock().await;
            let e = find(&st, vm)?;
            (info_of(e), e.settings.clone(), e.folder())
        };
        info.state = self.power_state(&settings, &folder).await;
        Ok(info)
    }

    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        validate_name(&spec.name)?;
        let _name = self.lock_name(&spec.name).await;
        {
            let st = self.state.lock().await;
            // An earlier attempt at this name abandoned in this process is settled first.
            self.replay_intents(&st.registry.vms, Some(&spec.name))?;
            if st.vms.contains_key(&spec.name) {
                return Err(Error::AlreadyExists {
                    kind: "vm",
                    id: spec.name.clone(),
                });
            }
        }
        let base = spec
            .base_folder
            .clone()
            .unwrap_or_else(|| self.vm_folder.clone());
        let folder = base.join(&spec.name);
        let settings_file = folder.join(format!("{}.vm.json", spec.name));
        if settings_file.exists() {
            return Err(Error::AlreadyExists {
                kind: "VM settings file",
                id: settings_file.display().to_string(),
            });
        }
        let created_folder = !folder.exists();
        let settings = VmSettings {
            format: SETTINGS_FORMAT.to_owned(),
            uuid: Uuid::new_v4(),
            name: spec.name.clone(),
            cores: spec.effective_cores(),
            memory_mb: spec.effective_memory_mb(),
            os_type: spec.os_type.clone(),
            bridge_adapter: spec.bridge_adapter.clone(),
            disks: Vec::new(),
            snapshots: Vec::new(),
            current_snapshot: None,
            template: None,
            boot: None,
            net: NetConfig::None,
            saved_state: None,
            aborted: false,
            pending: None,
        };
        let intent = self
            .begin(
                &spec.name,
                &settings_file,
                journal::IntentOp::CreateVm {
                    folder: journal::rel(&self.root, &folder),
                    created_folder,
                },
            )
            .await?;
        let res = async {
            self.fx("create VM folder")?;
            let f = folder.clone();
            crate::hypervisor::run_blocking(move || {
                std::fs::create_dir_all(&f).map_err(|e| Error::io(&f, e))
            })
            .await?;
            self.fx("write VM settings")?;
            self.save_new_settings(&settings, &settings_file).await?;
            let st = self.lock_state().await;
            let file = settings_file.clone();
            self.commit_registry(
                st,
                move |reg| reg.vms.push(file),
                move |st| st.add_vm(settings_file, settings),
            )
            .await
        }
        .await;
        match res {
            Ok(info) => {
                self.end(intent).await;
                Ok(info)
            }
            Err(e) => {
                self.abandon(intent).await;
                Err(e)
            }
        }
    }

    async fn register_vm(&self, settings_path: &Path) -> Result<VmInfo> {
        self.register_vm_files(settings_path).await
    }

    async fn unregister_vm(&self, vm: &VmId, delete_files: bool) -> Result<()> {
        self.unregister_vm_files(vm, delete_files).await
    }

    async fn clone_vm(&self, source: &VmId, spec: &CloneSpec) -> Result<VmInfo> {
        self.clone_vm_files(source, spec).await
    }

    async fn start_vm(&self, vm: &VmId, mode: StartMode) -> Result<()> {
        if mode == StartMode::Gui {
            return Err(Error::Unsupported {
                backend: BACKEND.to_owned(),
                operation: "start VM with a window",
                reason: "the QEMU backend runs VMs headless; use StartMode::Headless".to_owned(),
            });
        }
        self.start_vm_with(vm, StartOptions::default())
            .await
            .map(drop)
    }

    async fn power_off(&self, vm: &VmId) -> Result<()> {
        self.power_off_vm(vm).await
    }

    async fn save_state(&self, vm: &VmId) -> Result<()> {
        self.save_state_vm(vm).await
    }

    async fn pause(&self, vm: &VmId) -> Result<()> {
        self.pause_vm(vm, true).await
    }

    async fn resume(&self, vm: &VmId) -> Result<()> {
        self.pause_vm(vm, false).await
    }

    async fn take_snapshot(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        live: bool,
    ) -> Result<SnapshotRef> {
        self.take_snapshot_with(vm, name, description, live)
            .await
            .map(|r| r.snapshot)
    }

    async fn take_snapshot_at_point(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        at_point: crate::hypervisor::AtPoint,
    ) -> Result<SnapshotRef> {
        self.take_snapshot_staged(vm, name, description, true, Some(at_point))
            .await
            .map(|r| r.snapshot)
    }

    async fn restore_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        self.restore_snapshot_vm(vm, snapshot).await
    }

    async fn delete_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        self.delete_snapshot_vm(vm, snapshot).await
    }

    async fn snapshot_tree(&self, vm: &VmId) -> Result<SnapshotTree> {
        let st = self.state.lock().await;
        Ok(snap::tree_from_settings(&find(&st, vm)?.settings))
    }

    async fn snapshot_files(&self, vm: &VmId, snapshot: &str) -> Result<MigrationSet> {
        QemuHypervisor::snapshot_files(self, vm, snapshot).await
    }

    async fn list_disks(&self) -> Result<Vec<DiskInfo>> {
        Ok(all_disks(&*self.state.lock().await))
    }

    async fn register_disk(&self, path: &Path) -> Result<DiskInfo> {
        let location = std::fs::canonicalize(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound {
                    kind: "disk image",
                    id: path.display().to_string(),
                }
            } else {
                Error::io(path, e)
            }
        })?;
        let info = self.img.info(&location).await?;
        let st = self.lock_state().await;
        if let Some(d) = all_disks(&st).iter().find(|d| d.location == location) {
            return Err(Error::AlreadyExists {
                kind: "disk",
                id: format!("{} ({})", location.display(), d.uuid),
            });
        }
        let parent = info
            .full_backing_filename
            .as_ref()
            .and_then(|b| {
                st.registry
                    .disks
                    .iter()
                    .find(|d| d.location == Path::new(b))
            })
            .map(|d| d.uuid);
        let disk = DiskInfo {
            uuid: Uuid::new_v4(),
            location,
            format: DiskFormat::parse(&info.format),
            disk_type: DiskType::Normal,
            parent,
            logical_size: Some(info.virtual_size),
        };
        let d = disk.clone();
        self.update_registry(st, move |reg| reg.disks.push(d))
            .await?;
        Ok(disk)
    }

    async fn unregister_disk(&self, disk: &DiskRef, delete_file: bool) -> Result<()> {
        let st = self.lock_state().await;
        let d = find_disk(&st, disk)?;
        let users = self.users_of(&st, d.uuid);
        if !users.is_empty() {
            return Err(Error::InUse {
                id: d.location.display().to_string(),
                users,
            });
        }
        let children: Vec<String> = st
            .registry
            .disks
            .iter()
            .filter(|c| c.parent == Some(d.uuid))
            .map(|c| c.location.display().to_string())
            .collect();
        if !children.is_empty() {
            return Err(Error::InUse {
                id: d.location.display().to_string(),
                users: children,
            });
        }
        if delete_file && st.registry.foreign.contains(&d.location) {
            return Err(Error::OutsideRoot {
                operation: "delete the disk image",
                path: d.location.clone(),
                root: self.root.clone(),
            });
        }
        let (uuid, location) = (d.uuid, d.location.clone());
        self.update_registry(st, move |reg| {
            reg.disks.retain(|x| x.uuid != uuid);
            reg.foreign.retain(|f| *f != location);
        })
        .await?;
        if delete_file {
            self.fx("remove disk image")?;
            remove_if_exists(&d.location)?;
        }
        Ok(())
    }

    async fn set_disk_type(&self, disk: &DiskRef, disk_type: DiskType) -> Result<()> {
        let st = self.lock_state().await;
        let d = find_disk(&st, disk)?;
        if d.disk_type == disk_type {
            return Ok(());
        }
        let writable = match disk_type {
            DiskType::Normal => true,
            DiskType::MultiAttach | DiskType::Readonly => false,
            other => {
                return Err(Error::Unsupported {
                    backend: BACKEND.to_owned(),
                    operation: "set disk type",
                    reason: format!("{other} disks have no qcow2 equivalent here"),
                })
            }
        };
        let users = self.users_of(&st, d.uuid);
        if !users.is_empty() {
            return Err(Error::InUse {
                id: d.location.display().to_string(),
                users,
            });
        }
        if d.parent.is_some() && disk_type == DiskType::MultiAttach {
            return Err(Error::InvalidInput(format!(
                "{} is an overlay; only a base image can become a multiattach template",
                d.location.display()
            )));
        }
        set_writable(&d.location, writable)?;
        let uuid = d.uuid;
        let recorded = self
            .update_registry(st, move |reg| {
                for x in &mut reg.disks {
                    if x.uuid == uuid {
                        x.disk_type = disk_type;
                    }
                }
            })
            .await;
        if let Err(e) = recorded {
            let _ = set_writable(&d.location, d.disk_type == DiskType::Normal);
            return Err(e);
        }
        Ok(())
    }

    async fn attach_disk(&self, vm: &VmId, spec: &AttachSpec) -> Result<DiskInfo> {
        let uuid = {
            let st = self.state.lock().await;
            match find(&st, vm) {
                Ok(e) => e.settings.uuid,
                Err(e) => {
                    find_disk(&st, &spec.disk)?;
                    return Err(e);
                }
            }
        };
        // The whole attachment holds the VM's settings lock: it neither interleaves with
        // another change of this VM's settings nor with its removal.
        let _settings_lock = self.lock_settings_of(uuid).await;
        let (disk, _in_use, name, folder, settings_file, mut settings, boot) = {
            let st = self.state.lock().await;
            if let Ok(e) = find(&st, vm) {
                // An attach to this VM abandoned in this process (its future was
                // dropped) is settled first, so its overlay does not block this one.
                let name = e.settings.name.clone();
                self.replay_intents(&st.registry.vms, Some(&name))?;
            }
            let disk = find_disk(&st, &spec.disk)?;
            let users = self.users_of(&st, disk.uuid);
            let e = find(&st, vm)?;
            let name = e.settings.name.clone();
            if e.settings.disks.iter().any(|d| {
                d.controller == spec.controller && d.port == spec.port && d.device == spec.device
            }) {
                return Err(Error::AlreadyExists {
                    kind: "disk attachment",
                    id: format!(
                        "{}:{}:{} of {name}",
                        spec.controller, spec.port, spec.device
                    ),
                });
            }
            if !e.settings.snapshots.is_empty() {
                return Err(Error::InvalidState {
                    operation: "attach a disk to",
                    id: name,
                    state: "a VM with snapshots".to_owned(),
                });
            }
            if disk.disk_type == DiskType::Normal && !users.is_empty() {
                return Err(Error::InUse {
                    id: disk.location.display().to_string(),
                    users,
                });
            }
            // Marked under the state lock: the disk cannot be unregistered, retyped or
            // attached elsewhere (when normal) until this attachment ends.
            let in_use = self.mark_in_use(disk.uuid, &name);
            let boot = st.registry.boot.get(&disk.uuid).cloned();
            (
                disk,
                in_use,
                name,
                e.folder(),
                e.settings_file.clone(),
                e.settings.clone(),
                boot,
            )
        };
        let mut attach_intent = None;
        let (slot, new_disk) = if disk.disk_type == DiskType::MultiAttach {
            let file = own_image_file(&name, &spec.controller, spec.port, spec.device);
            let overlay = folder.join(&file);
            if overlay.exists() {
                return Err(Error::AlreadyExists {
                    kind: "overlay image",
                    id: overlay.display().to_string(),
                });
            }
            let fmt = disk.format.to_string().to_ascii_lowercase();
            let intent = self
                .begin(
                    &name,
                    &settings_file,
                    journal::IntentOp::AttachDisk {
                        overlay: journal::rel(&self.root, &overlay),
                    },
                )
                .await?;
            let made = match self.fx("create overlay") {
                Ok(()) => {
                    self.img
                        .create_overlay(&overlay, &disk.location, &fmt)
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = made {
                self.abandon(intent).await;
                return Err(e);
            }
            attach_intent = Some(intent);
            let uuid = Uuid::new_v4();
            let slot = DiskSlot {
                controller: spec.controller.clone(),
                port: spec.port,
                device: spec.device,
                file,
                uuid,
                own: true,
                base: Some(BaseRef {
                    uuid: disk.uuid,
                    file_name: disk
                        .location
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    path: disk.location.clone(),
                    format: fmt,
                }),
                logical_size: disk.logical_size,
            };
            let info = DiskInfo {
                uuid,
                location: overlay,
                format: DiskFormat::Qcow2,
                disk_type: DiskType::Normal,
                parent: Some(disk.uuid),
                logical_size: disk.logical_size,
            };
            (slot, Some(info))
        } else {
            // A registered image stays registered on its own: deleting the VM
            // detaches it but never deletes it.
            let slot = DiskSlot {
                controller: spec.controller.clone(),
                port: spec.port,
                device: spec.device,
                file: disk.location.clone(),
                uuid: disk.uuid,
                own: false,
                base: None,
                logical_size: disk.logical_size,
            };
            (slot, None)
        };
        settings.disks.push(slot);
        if settings.boot.is_none() {
            settings.boot = boot;
        }
        // The overlay is recorded in the VM's settings only (one atomic write: the
        // commit point).
        let saved = match self.fx("write VM settings") {
            Ok(()) => self.store_settings(&name, &settings_file, settings).await,
            Err(e) => Err(e),
        };
        if let Err(err) = saved {
            if let Some(intent) = attach_intent {
                self.abandon(intent).await;
            }
            return Err(err);
        }
        if let Some(intent) = attach_intent {
            self.end(intent).await;
        }
        Ok(new_disk.unwrap_or(disk))
    }

    async fn guest_run(&self, _vm: &VmId, _command: &GuestCommand) -> Result<GuestOutput> {
        Err(Error::Unsupported {
            backend: BACKEND.to_owned(),
            operation: "run guest command",
            reason: "the QEMU backend has no guest agent; guests are configured from the \
                     kernel command line and report on their console"
                .to_owned(),
        })
    }

    /// The settings, each disk's chain of the VM's own images (walked with
    /// `qemu-img info --backing-chain`, ending at a registered multiattach template,
    /// which is "expected at destination") and a saved state when the VM is `Saved`.
    async fn vm_files(&self, vm: &VmId) -> Result<MigrationSet> {
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
        let mut set = MigrationSet::default();
        set.push(VmFile::new(
            settings_file.clone(),
            FileRole::Settings,
            None,
            snap::len(&settings_file),
        ));
        for slot in &settings.disks {
            let path = VmSettings::disk_path(&folder, slot);
            if !slot.own {
                set.external.push(format!(
                    "shared image {} ({}) is not copied",
                    path.display(),
                    slot.uuid
                ));
                continue;
            }
            self.push_chain(
                &mut set,
                &path,
                Some(slot.uuid),
                &folder,
                &registered,
                slot.base.as_ref(),
            )
            .await;
        }
        if let Some(saved) = &settings.saved_state {
            let p = folder.join(&saved.file);
            set.push(VmFile::new(
                p.clone(),
                FileRole::SavedState,
                None,
                snap::len(&p),
            ));
        }
        snap::add_missing_warnings(&mut set);
        Ok(set)
    }
}

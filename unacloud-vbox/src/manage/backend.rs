//! [`VBoxManageHypervisor`]: the hypervisor trait over `VBoxManage`.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use unacloud_core::hypervisor::{
    run_blocking, AttachSpec, CloneSpec, DiskRef, GuestCommand, GuestOutput, Hypervisor,
    SnapshotRef, StartMode, Timeouts,
};
use unacloud_core::model::{DiskInfo, DiskType, VmId, VmInfo, VmSpec};
use unacloud_core::tree::SnapshotTree;
use unacloud_core::{Error as CoreError, Result as CoreResult};

use crate::error::{Error, Result};
use crate::manage::command::{self, Bus, ControlAction, VBoxCommand, VmChanges};
use crate::manage::failure::check;
use crate::manage::parse::{self, VmDetails};
use crate::manage::runner::{CommandOutput, CommandRunner};
use crate::manage::secret::PasswordSource;

/// The VirtualBox backend: every trait operation is one or a few `VBoxManage` commands
/// run through a [`CommandRunner`].
///
/// Each command is bounded by the matching [`Timeouts`] limit (queries, power,
/// snapshots, provisioning, guest). Failures are classified from VBoxManage's error
/// lines and surface as [`unacloud_core::Error`] variants (see
/// [`Failure`](crate::manage::Failure)).
///
/// Selecting a snapshot by name goes through the tree first, so an ambiguous name is an
/// [`unacloud_core::Error::AmbiguousName`] instead of whatever VirtualBox picks; the
/// command then names the snapshot by uuid.
#[derive(Debug, Clone)]
pub struct VBoxManageHypervisor {
    runner: Arc<dyn CommandRunner>,
    limits: Timeouts,
    guest_password: Option<PasswordSource>,
}

impl VBoxManageHypervisor {
    /// A backend over `runner` with the default [`Timeouts`].
    pub fn new(runner: Arc<dyn CommandRunner>) -> Self {
        VBoxManageHypervisor {
            runner,
            limits: Timeouts::default(),
            guest_password: None,
        }
    }

    /// Uses these time limits.
    pub fn with_timeouts(mut self, limits: Timeouts) -> Self {
        self.limits = limits;
        self
    }

    /// Where guest passwords come from when a [`GuestCommand`] carries none.
    pub fn with_guest_password(mut self, source: PasswordSource) -> Self {
        self.guest_password = Some(source);
        self
    }

    /// The runner.
    pub fn runner(&self) -> &Arc<dyn CommandRunner> {
        &self.runner
    }

    /// Runs a command and returns its output, or the classified failure.
    pub async fn exec(&self, cmd: &VBoxCommand) -> Result<CommandOutput> {
        let limit = cmd.class().limit(&self.limits);
        let out = self.runner.run(cmd, limit).await?;
        check(cmd, out, limit)
    }

    /// Runs commands one after another, stopping at the first failure.
    pub async fn exec_all(&self, cmds: &[VBoxCommand]) -> Result<Vec<CommandOutput>> {
        let mut outs = Vec::with_capacity(cmds.len());
        for c in cmds {
            outs.push(self.exec(c).await?);
        }
        Ok(outs)
    }

    /// `showvminfo --machinereadable`, parsed.
    pub async fn details(&self, vm: &str) -> Result<VmDetails> {
        let cmd = command::show_vm_info(vm);
        let out = self.exec(&cmd).await?;
        parse::parse_vm_info(&out.stdout).map_err(|e| Error::UnexpectedOutput {
            command: cmd.shell_line(),
            message: crate::display::join_sources(&e),
        })
    }

    /// The snapshot tree from `snapshot <vm> list --machinereadable`. A VM without
    /// snapshots makes VBoxManage exit with code 1 and no error line; that is an empty
    /// tree.
    pub async fn snapshots(&self, vm: &str) -> Result<SnapshotTree> {
        let cmd = command::snapshot_list(vm);
        let limit = cmd.class().limit(&self.limits);
        let out = self.runner.run(&cmd, limit).await?;
        let no_snapshots = out.exit_code == Some(1)
            && crate::manage::failure::is_silent(&out.stderr)
            && !out.stdout.contains("SnapshotName");
        if no_snapshots {
            return Ok(SnapshotTree::new());
        }
        let out = check(&cmd, out, limit)?;
        let doc = parse::machinereadable::parse(&out.stdout);
        parse::tree_from_machine_readable(&doc).map_err(|e| Error::UnexpectedOutput {
            command: cmd.shell_line(),
            message: e.to_string(),
        })
    }

    /// Resolves a snapshot selector (uuid or unique name) to a uuid via the tree.
    pub async fn resolve_snapshot(&self, vm: &str, selector: &str) -> Result<String> {
        let tree = self.snapshots(vm).await?;
        let node = tree.resolve(selector)?;
        Ok(tree
            .get(node)
            .map(|s| s.id.clone())
            .unwrap_or_else(|| selector.to_owned()))
    }

    /// `controlvm <vm> <action>`.
    async fn control(&self, vm: &VmId, action: ControlAction) -> Result<()> {
        self.exec(&command::control_vm(vm.as_str(), action)).await?;
        Ok(())
    }

    /// `snapshot <vm> restorecurrent`: back to the current snapshot's state.
    pub async fn restore_current(&self, vm: &VmId) -> Result<()> {
        self.exec(&command::snapshot_restore_current(vm.as_str()))
            .await?;
        Ok(())
    }

    /// `showmediuminfo disk <ref>`, parsed.
    pub async fn medium(&self, disk: &str) -> Result<DiskInfo> {
        let cmd = command::show_medium_info(disk);
        let out = self.exec(&cmd).await?;
        parse::parse_media(&out.stdout)
            .first()
            .and_then(|r| r.to_disk_info())
            .ok_or_else(|| Error::UnexpectedOutput {
                command: cmd.shell_line(),
                message: "no medium record with UUID and Location".to_owned(),
            })
    }

    /// The VirtualBox version (`--version`).
    pub async fn version(&self) -> Result<parse::VBoxVersion> {
        let cmd = command::version();
        let out = self.exec(&cmd).await?;
        parse::parse_version(&out.stdout).ok_or_else(|| Error::UnexpectedOutput {
            command: cmd.shell_line(),
            message: format!("no version number in {:?}", out.stdout.trim()),
        })
    }
}

/// Copies time stamps, state files and descriptions from the settings file into a tree
/// read from VBoxManage (matched by uuid). On any problem with the file the tree is
/// returned unchanged.
fn enrich_from_settings(tree: &SnapshotTree, cfg: &Path) -> SnapshotTree {
    let settings = match crate::settings::MachineSettings::load(cfg) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(file = %cfg.display(), error = %e, "cannot read the VM's settings; snapshot details omitted");
            return tree.clone();
        }
    };
    let mut out = SnapshotTree::new();
    let mut map = std::collections::HashMap::new();
    for (n, _) in tree.iter() {
        let Some(snap) = tree.get(n) else { continue };
        let mut snap = snap.clone();
        if let Some(s) = settings
            .snapshots
            .iter()
            .find(|s| s.uuid.to_string() == snap.id)
        {
            snap.time_stamp = s.time_stamp.clone();
            snap.state_file = s.state_file.clone();
            if snap.description.is_none() {
                snap.description = s.description.clone();
            }
        }
        let added = match tree.parent(n).and_then(|p| map.get(&p)) {
            Some(p) => out.add_child(*p, snap),
            None => out.add_root(snap),
        };
        match added {
            Ok(id) => {
                map.insert(n, id);
            }
            Err(_) => return tree.clone(),
        }
    }
    out.set_current(tree.current().and_then(|c| map.get(&c).copied()));
    out
}

fn disk_arg(d: &DiskRef) -> Result<String> {
    match d {
        DiskRef::Uuid(u) => Ok(u.to_string()),
        DiskRef::Path(p) => command::path_arg(p),
    }
}

/// The commands that create a VM from a spec: `createvm --register`, then `modifyvm`
/// with the profile's CPUs and memory and, if asked, a bridged first adapter.
pub fn create_vm_commands(spec: &VmSpec) -> Result<Vec<VBoxCommand>> {
    let mut changes = VmChanges::profile(spec.profile);
    changes.cpus = Some(spec.effective_cores());
    changes.memory_mb = Some(spec.effective_memory_mb());
    if let Some(b) = &spec.bridge_adapter {
        changes = changes.bridged_to(b);
    }
    Ok(vec![
        command::create_vm(
            &spec.name,
            spec.os_type.as_deref(),
            spec.base_folder.as_deref(),
        )?,
        command::modify_vm(&spec.name, &changes)?,
    ])
}

#[async_trait]
impl Hypervisor for VBoxManageHypervisor {
    fn backend(&self) -> &str {
        "virtualbox"
    }

    async fn list_vms(&self) -> CoreResult<Vec<VmInfo>> {
        let cmd = command::list_vms();
        let out = self.exec(&cmd).await?;
        let mut vms = Vec::new();
        for e in parse::parse_vm_list(&out.stdout) {
            if e.is_inaccessible() {
                vms.push(VmInfo {
                    name: e.name.clone(),
                    uuid: Some(e.uuid),
                    state: unacloud_core::model::PowerState::Other("inaccessible".to_owned()),
                    cores: 0,
                    memory_mb: 0,
                    disks: Vec::new(),
                    current_snapshot: None,
                    settings_file: None,
                    template: None,
                });
                continue;
            }
            vms.push(self.details(&e.uuid.to_string()).await?.to_vm_info());
        }
        Ok(vms)
    }

    async fn vm_info(&self, vm: &VmId) -> CoreResult<VmInfo> {
        Ok(self.details(vm.as_str()).await?.to_vm_info())
    }

    async fn create_vm(&self, spec: &VmSpec) -> CoreResult<VmInfo> {
        let cmds = create_vm_commands(spec)?;
        let created = self.exec(&cmds[0]).await?;
        let parsed =
            parse::parse_createvm(&created.stdout).ok_or_else(|| Error::UnexpectedOutput {
                command: cmds[0].shell_line(),
                message: "no \"UUID: …\" line".to_owned(),
            })?;
        self.exec(&cmds[1]).await?;
        Ok(VmInfo {
            name: spec.name.clone(),
            uuid: Some(parsed.uuid),
            state: unacloud_core::model::PowerState::PoweredOff,
            cores: spec.profile.cores(),
            memory_mb: spec.profile.memory_mb(),
            disks: Vec::new(),
            current_snapshot: None,
            settings_file: parsed.settings_file,
            template: None,
        })
    }

    async fn register_vm(&self, settings: &Path) -> CoreResult<VmInfo> {
        if !settings.is_absolute() {
            return Err(CoreError::InvalidInput(format!(
                "VirtualBox needs an absolute settings path; got {}",
                settings.display()
            )));
        }
        let machine = {
            let settings = settings.to_path_buf();
            run_blocking(move || Ok(crate::settings::MachineSettings::load(&settings)?)).await?
        };
        self.exec(&command::register_vm(settings)?).await?;
        Ok(self.details(&machine.uuid.to_string()).await?.to_vm_info())
    }

    async fn unregister_vm(&self, vm: &VmId, delete_files: bool) -> CoreResult<()> {
        self.exec(&command::unregister_vm(vm.as_str(), delete_files))
            .await?;
        Ok(())
    }

    async fn clone_vm(&self, source: &VmId, spec: &CloneSpec) -> CoreResult<VmInfo> {
        let snapshot = match &spec.snapshot {
            Some(s) => Some(self.resolve_snapshot(source.as_str(), s).await?),
            None => None,
        };
        let cmd = command::clone_vm(
            source.as_str(),
            &spec.name,
            snapshot.as_deref(),
            spec.linked,
            None,
        )?;
        self.exec(&cmd).await?;
        Ok(self.details(&spec.name).await?.to_vm_info())
    }

    async fn start_vm(&self, vm: &VmId, mode: StartMode) -> CoreResult<()> {
        self.exec(&command::start_vm(vm.as_str(), mode)).await?;
        Ok(())
    }

    async fn power_off(&self, vm: &VmId) -> CoreResult<()> {
        Ok(self.control(vm, ControlAction::PowerOff).await?)
    }

    async fn save_state(&self, vm: &VmId) -> CoreResult<()> {
        Ok(self.control(vm, ControlAction::SaveState).await?)
    }

    async fn pause(&self, vm: &VmId) -> CoreResult<()> {
        Ok(self.control(vm, ControlAction::Pause).await?)
    }

    async fn resume(&self, vm: &VmId) -> CoreResult<()> {
        Ok(self.control(vm, ControlAction::Resume).await?)
    }

    async fn take_snapshot(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        live: bool,
    ) -> CoreResult<SnapshotRef> {
        let cmd = command::snapshot_take(vm.as_str(), name, description, live);
        let out = self.exec(&cmd).await?;
        let uuid =
            parse::parse_snapshot_taken(&out.stdout).ok_or_else(|| Error::UnexpectedOutput {
                command: cmd.shell_line(),
                message: "no \"Snapshot taken. UUID: …\" line".to_owned(),
            })?;
        Ok(SnapshotRef {
            id: uuid.to_string(),
            name: name.to_owned(),
        })
    }

    async fn restore_snapshot(&self, vm: &VmId, snapshot: &str) -> CoreResult<()> {
        let id = self.resolve_snapshot(vm.as_str(), snapshot).await?;
        self.exec(&command::snapshot_restore(vm.as_str(), &id))
            .await?;
        Ok(())
    }

    async fn delete_snapshot(&self, vm: &VmId, snapshot: &str) -> CoreResult<()> {
        let id = self.resolve_snapshot(vm.as_str(), snapshot).await?;
        self.exec(&command::snapshot_delete(vm.as_str(), &id))
            .await?;
        Ok(())
    }

    /// `snapshot <vm> list --machinereadable`; for a non-empty tree also `showvminfo`,
    /// and when the settings file it names is readable here, each snapshot's time stamp,
    /// saved-state file and description are taken from it (VBoxManage does not print
    /// them).
    async fn snapshot_tree(&self, vm: &VmId) -> CoreResult<SnapshotTree> {
        let tree = self.snapshots(vm.as_str()).await?;
        if tree.is_empty() {
            return Ok(tree);
        }
        let details = self.details(vm.as_str()).await?;
        Ok(match details.settings_file.as_deref() {
            Some(cfg) if cfg.is_file() => {
                let cfg = cfg.to_path_buf();
                run_blocking(move || Ok(enrich_from_settings(&tree, &cfg))).await?
            }
            _ => tree,
        })
    }

    async fn list_disks(&self) -> CoreResult<Vec<DiskInfo>> {
        let cmd = command::list_hdds();
        let out = self.exec(&cmd).await?;
        Ok(parse::parse_media(&out.stdout)
            .iter()
            .filter_map(parse::MediumRecord::to_disk_info)
            .collect())
    }

    async fn register_disk(&self, path: &Path) -> CoreResult<DiskInfo> {
        if !path.is_absolute() {
            return Err(CoreError::InvalidInput(format!(
                "VirtualBox needs an absolute image path; got {}",
                path.display()
            )));
        }
        Ok(self.medium(&command::path_arg(path)?).await?)
    }

    async fn unregister_disk(&self, disk: &DiskRef, delete_file: bool) -> CoreResult<()> {
        self.exec(&command::close_medium(&disk_arg(disk)?, delete_file))
            .await?;
        Ok(())
    }

    async fn set_disk_type(&self, disk: &DiskRef, disk_type: DiskType) -> CoreResult<()> {
        self.exec(&command::modify_medium_type(&disk_arg(disk)?, disk_type))
            .await?;
        Ok(())
    }

    async fn attach_disk(&self, vm: &VmId, spec: &AttachSpec) -> CoreResult<DiskInfo> {
        let before = self.details(vm.as_str()).await?;
        if !before.controllers.iter().any(|c| c.name == spec.controller) {
            self.exec(&command::storage_ctl_add(
                vm.as_str(),
                &spec.controller,
                Bus::for_controller_name(&spec.controller),
            ))
            .await?;
        }
        let medium_ref = disk_arg(&spec.disk)?;
        let medium = self.medium(&medium_ref).await?;
        let mtype = (medium.disk_type == DiskType::MultiAttach).then_some(DiskType::MultiAttach);
        self.exec(&command::storage_attach(
            vm.as_str(),
            &spec.controller,
            spec.port,
            spec.device,
            &medium_ref,
            mtype,
        ))
        .await?;
        if mtype.is_none() {
            return Ok(medium);
        }
        // VirtualBox attached a new differencing child of the template: find it.
        let after = self.details(vm.as_str()).await?;
        let attached = after
            .disk_attachments()
            .into_iter()
            .find(|a| {
                a.controller == spec.controller && a.port == spec.port && a.device == spec.device
            })
            .ok_or_else(|| Error::UnexpectedOutput {
                command: command::show_vm_info(vm.as_str()).shell_line(),
                message: format!(
                    "no disk at {} port {} device {} after attaching it",
                    spec.controller, spec.port, spec.device
                ),
            })?;
        Ok(self.medium(&attached.disk.to_string()).await?)
    }

    async fn guest_run(&self, vm: &VmId, cmd: &GuestCommand) -> CoreResult<GuestOutput> {
        let source = if cmd.password.is_some() {
            None
        } else {
            self.guest_password.as_ref()
        };
        let c = command::guest_run(vm.as_str(), cmd, source)?;
        let limit = c.class().limit(&self.limits);
        let out = self.runner.run(&c, limit).await?;
        match guest_exit(&out) {
            GuestExit::Exited(code) => Ok(GuestOutput {
                exit_code: code,
                stdout: out.stdout,
                stderr: out.stderr,
            }),
            GuestExit::Failed => Err(check(&c, out, limit).err().map_or_else(
                || CoreError::Backend {
                    backend: "virtualbox".to_owned(),
                    message: "guestcontrol run failed".to_owned(),
                },
                CoreError::from,
            )),
            GuestExit::Abnormal(what) => Err(CoreError::Backend {
                backend: "virtualbox".to_owned(),
                message: format!("{}: the guest process {what}", c.shell_line()),
            }),
            GuestExit::TimedOut => Err(CoreError::Timeout {
                operation: "guestcontrol run",
                after: cmd.timeout.unwrap_or(limit),
            }),
        }
    }
}

/// How a `guestcontrol run` ended, decoded from VBoxManage's exit code
/// (VBoxManageGuestCtrl.cpp, frozen since 5.0): 0 is success; a guest exit code `n` in
/// 1..=93 is returned as `n + 32`; 94 and above as 126; 18 means the process was killed
/// by a signal, 19 that it ended abnormally, 20 that it timed out; 1 (with an error
/// line) is a VBoxManage failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The program exited with this code (126 stands for "94 or more").
    Exited(i32),
    /// VBoxManage failed before or while running the program.
    Failed,
    /// The program did not exit normally (`killed by a signal`, `ended abnormally`).
    Abnormal(&'static str),
    /// The program exceeded its `--timeout`.
    TimedOut,
}

/// Decodes a `guestcontrol run` result (see [`GuestExit`]).
pub fn guest_exit(out: &CommandOutput) -> GuestExit {
    match out.exit_code {
        Some(0) => GuestExit::Exited(0),
        Some(c @ 33..=125) => GuestExit::Exited(c - 32),
        Some(126) => GuestExit::Exited(126),
        Some(18) => GuestExit::Abnormal("was killed by a signal"),
        Some(19) => GuestExit::Abnormal("ended abnormally"),
        Some(20) => GuestExit::TimedOut,
        _ => GuestExit::Failed,
    }
}

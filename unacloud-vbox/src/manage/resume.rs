//! Resuming a VM from a snapshot (SPEC §4; thesis Figs 5.27–5.28), on the same host or
//! on another one, as the global-snapshot protocol's RESTORE and START actions do.
//!
//! * **In place**: choose the snapshot (by default the latest, i.e. the one the
//!   current state hangs below), power the VM off if it is still up, restore, start.
//! * **Elsewhere**: choose the snapshot in the machine's `.vbox`, compute the minimal
//!   file set with the [file tracker](crate::tracker), copy it under a destination
//!   folder keeping the machine folder's structure with the
//!   [verified copy](crate::copy), register the copied VM, restore, start.
//!
//! Each function returns a [`ResumeReport`] listing the steps it took. The restore and
//! start halves are separate functions because the protocol runs them as separate
//! phases (RESTORE → RESTORE_OK from everyone, then START).
//!
//! The functions work over any [`Hypervisor`]; with
//! [`VBoxManageHypervisor`](crate::manage::VBoxManageHypervisor) they run `snapshot list`, `controlvm poweroff`,
//! `snapshot restore`, `registervm` and `startvm`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use unacloud_core::files::MigrationSet;
use unacloud_core::hypervisor::{run_blocking, Hypervisor, StartMode};
use unacloud_core::model::{PowerState, Uuid, VmId};
use unacloud_core::{Error, Result};

use crate::copy::{CopyOptions, CopyReport};
use crate::tracker::{Machine, MigrationOptions, StateRef};

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResumeAction {
    /// Chose the snapshot to resume from.
    SelectSnapshot,
    /// Powered off a VM that was still up.
    PowerOff,
    /// Computed the files needed on the destination.
    ComputeFiles,
    /// Copied the files.
    Copy,
    /// Registered the copied VM.
    Register,
    /// Restored the snapshot.
    Restore,
    /// Started the VM.
    Start,
}

impl fmt::Display for ResumeAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResumeAction::SelectSnapshot => "select snapshot",
            ResumeAction::PowerOff => "power off",
            ResumeAction::ComputeFiles => "compute files",
            ResumeAction::Copy => "copy",
            ResumeAction::Register => "register",
            ResumeAction::Restore => "restore",
            ResumeAction::Start => "start",
        })
    }
}

/// One step taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeStep {
    /// What was done.
    pub action: ResumeAction,
    /// Details in words (snapshot, file count, bytes, …).
    pub detail: String,
}

/// What a resume did, step by step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeReport {
    /// The VM, as the hypervisor knows it (name, or uuid after a registration).
    pub vm: String,
    /// The snapshot's uuid.
    pub snapshot_id: String,
    /// The snapshot's name.
    pub snapshot_name: String,
    /// The steps, in order.
    pub steps: Vec<ResumeStep>,
    /// The files computed for a resume elsewhere.
    pub migration: Option<MigrationSet>,
    /// The copied settings file, for a resume elsewhere.
    pub registered_settings: Option<PathBuf>,
    /// Bytes copied, for a resume elsewhere.
    pub copied_bytes: Option<u64>,
}

impl ResumeReport {
    /// A report on resuming `vm` from a snapshot, with no step taken yet.
    fn new(vm: String, snapshot_id: String, snapshot_name: String) -> Self {
        ResumeReport {
            vm,
            snapshot_id,
            snapshot_name,
            steps: Vec::new(),
            migration: None,
            registered_settings: None,
            copied_bytes: None,
        }
    }

    fn step(&mut self, action: ResumeAction, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::info!(vm = %self.vm, %action, %detail, "resume step");
        self.steps.push(ResumeStep { action, detail });
    }

    /// The actions taken, in order.
    pub fn actions(&self) -> Vec<ResumeAction> {
        self.steps.iter().map(|s| s.action).collect()
    }
}

fn is_up(state: &PowerState) -> bool {
    matches!(
        state,
        PowerState::Running
            | PowerState::Paused
            | PowerState::Stuck
            | PowerState::LiveSnapshotting
            | PowerState::Starting
    )
}

/// RESTORE on the same host: selects the snapshot (`selector` is a uuid or a unique
/// name; `None` means the latest — the snapshot the current state hangs below), powers
/// the VM off if it is up, and restores the snapshot.
pub async fn restore_in_place(
    hv: &dyn Hypervisor,
    vm: &VmId,
    selector: Option<&str>,
) -> Result<ResumeReport> {
    let tree = hv.snapshot_tree(vm).await?;
    let node = match selector {
        Some(s) => tree.resolve(s)?,
        None => tree.current().ok_or_else(|| Error::NotFound {
            kind: "snapshot",
            id: format!("latest snapshot of {vm} (the VM has no current snapshot)"),
        })?,
    };
    let snap = tree.get(node).cloned().ok_or_else(|| Error::NotFound {
        kind: "snapshot",
        id: selector.unwrap_or("latest").to_owned(),
    })?;
    let mut report = ResumeReport::new(vm.to_string(), snap.id.clone(), snap.name.clone());
    report.step(
        ResumeAction::SelectSnapshot,
        format!(
            "{:?} {{{}}}{}",
            snap.name,
            snap.id,
            if selector.is_none() { " (latest)" } else { "" }
        ),
    );
    let info = hv.vm_info(vm).await?;
    if is_up(&info.state) {
        hv.power_off(vm).await?;
        report.step(ResumeAction::PowerOff, format!("was {}", info.state));
    }
    hv.restore_snapshot(vm, &snap.id).await?;
    report.step(ResumeAction::Restore, format!("{{{}}}", snap.id));
    Ok(report)
}

/// START: starts the VM headless and records the step.
pub async fn start(hv: &dyn Hypervisor, report: &mut ResumeReport) -> Result<()> {
    hv.start_vm(&VmId::new(report.vm.clone()), StartMode::Headless)
        .await?;
    report.step(ResumeAction::Start, "headless");
    Ok(())
}

/// Resume on the same host: [`restore_in_place`] then [`start`].
pub async fn resume_in_place(
    hv: &dyn Hypervisor,
    vm: &VmId,
    selector: Option<&str>,
) -> Result<ResumeReport> {
    let mut report = restore_in_place(hv, vm, selector).await?;
    start(hv, &mut report).await?;
    Ok(report)
}

/// How to resume elsewhere.
#[derive(Debug, Clone, Default)]
pub struct ElsewhereOptions {
    /// The source host's global `VirtualBox.xml`, for images registered only there.
    pub global_registry: Option<PathBuf>,
    /// Images the destination already has (preloaded multiattach templates), by uuid.
    pub preloaded: Vec<Uuid>,
    /// How to copy; [`resume_elsewhere`] always turns checksums on.
    pub copy: CopyOptions,
}

/// RESTORE on another host: selects the snapshot in `settings` (the machine's `.vbox`
/// as readable from here; `selector` as in [`restore_in_place`], `None` = the current
/// snapshot), computes the files needed, copies them to
/// `dest_root/<machine folder name>/…` keeping their layout (verified with BLAKE3),
/// registers the copy and restores the snapshot.
///
/// Every file to copy must lie inside the machine's folder (settings keep relative
/// paths there); images elsewhere must already be at the destination — name them in
/// [`ElsewhereOptions::preloaded`] — or the call fails before copying anything.
pub async fn restore_elsewhere(
    hv: &dyn Hypervisor,
    settings: &Path,
    selector: Option<&str>,
    dest_root: &Path,
    options: &ElsewhereOptions,
) -> Result<ResumeReport> {
    let machine = {
        let settings = settings.to_path_buf();
        let global = options.global_registry.clone();
        run_blocking(move || Ok(Machine::load(&settings, global.as_deref())?)).await?
    };
    let snap = match selector.map(|s| machine.select(s)).transpose()? {
        Some(StateRef::Snapshot(i)) => machine.snapshots()[i].clone(),
        Some(StateRef::Current) => {
            machine
                .current_snapshot()
                .cloned()
                .ok_or_else(|| Error::NotFound {
                    kind: "snapshot",
                    id: format!("current snapshot of {}", machine.name()),
                })?
        }
        None => machine
            .current_snapshot()
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: "snapshot",
                id: format!(
                    "latest snapshot of {} (it has no current snapshot)",
                    machine.name()
                ),
            })?,
    };
    let mut report = ResumeReport::new(
        machine.uuid().to_string(),
        snap.uuid.to_string(),
        snap.name.clone(),
    );
    report.step(
        ResumeAction::SelectSnapshot,
        format!("{:?} {{{}}}", snap.name, snap.uuid),
    );

    let mopts = MigrationOptions::default().with_preloaded(options.preloaded.iter().copied());
    let set = machine.migration_set(&snap.uuid.to_string(), &mopts)?;
    let machine_dir = machine.machine_dir().to_path_buf();
    let folder = machine_dir.file_name().map(PathBuf::from).ok_or_else(|| {
        Error::InvalidInput(format!("{} has no machine folder name", settings.display()))
    })?;
    let mut pairs: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut outside = Vec::new();
    for f in &set.files {
        match f.path.strip_prefix(&machine_dir) {
            Ok(rel) => pairs.push((f.path.clone(), folder.join(rel))),
            Err(_) => outside.push(f.path.display().to_string()),
        }
    }
    if !outside.is_empty() {
        return Err(Error::InvalidInput(format!(
            "files outside the machine folder {} cannot be copied keeping their paths: {}; preload them on the destination and pass their uuids as preloaded",
            machine_dir.display(),
            outside.join(", ")
        )));
    }
    report.step(
        ResumeAction::ComputeFiles,
        format!(
            "{} files, {} bytes; {} expected at the destination",
            set.files.len(),
            set.total_bytes(),
            set.expected_at_destination.len()
        ),
    );
    report.migration = Some(set);

    let copy_options = options.copy.clone().checksum(true);
    let dest = dest_root.to_path_buf();
    let copied: CopyReport = run_blocking(move || {
        Ok(crate::copy::copy_files(
            &pairs,
            &dest,
            &copy_options,
            |_| {},
        )?)
    })
    .await?;
    report.copied_bytes = Some(copied.bytes);
    report.step(
        ResumeAction::Copy,
        format!(
            "{} files, {} bytes to {}",
            copied.files.len(),
            copied.bytes,
            dest_root.display()
        ),
    );

    let file_name = settings
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("{} has no file name", settings.display())))?;
    let dest_settings = dest_root.join(&folder).join(file_name);
    let dest_settings =
        std::path::absolute(&dest_settings).map_err(|e| Error::io(&dest_settings, e))?;
    // Registration keeps the machine's uuid, which names it unambiguously from now on.
    hv.register_vm(&dest_settings).await?;
    report.registered_settings = Some(dest_settings.clone());
    report.step(ResumeAction::Register, dest_settings.display().to_string());

    let vm = VmId::new(report.vm.clone());
    hv.restore_snapshot(&vm, &snap.uuid.to_string()).await?;
    report.step(ResumeAction::Restore, format!("{{{}}}", snap.uuid));
    Ok(report)
}

/// Resume on another host: [`restore_elsewhere`] then [`start`].
pub async fn resume_elsewhere(
    hv: &dyn Hypervisor,
    settings: &Path,
    selector: Option<&str>,
    dest_root: &Path,
    options: &ElsewhereOptions,
) -> Result<ResumeReport> {
    let mut report = restore_elsewhere(hv, settings, selector, dest_root, options).await?;
    start(hv, &mut report).await?;
    Ok(report)
}

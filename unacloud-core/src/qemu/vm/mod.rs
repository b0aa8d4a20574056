//! Running VMs: start (from a saved state or a snapshot's memory), power off, pause,
//! resume and save state over QMP; the per-VM runtime and its supervision.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{Error, Result};
use crate::model::{PowerState, Uuid, VmId};

use super::qmp::Qmp;

mod steps;

use super::run::{self, Accel, ProbeRecord, RunPaths, RunRecord};
use super::settings::{NetConfig, PendingOp, SavedState, VmSettings};
use super::{find, QemuHypervisor};
pub(crate) use steps::*;

/// How to start a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Wait until the guest prints its first `heartbeat <n>` line on the console (the
    /// reference guest image does once a second), at most this long.
    pub wait_guest: Option<Duration>,
}

/// What a start did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartReport {
    /// The VM's QEMU process.
    pub pid: i32,
    /// The console log (the guest's serial port), appended to across starts.
    pub console_log: PathBuf,
    /// Length of the console log before this start: this run's output follows it.
    pub console_offset: u64,
    /// The accelerator used (`kvm` or `tcg`).
    pub accel: String,
    /// Whether the start resumed a saved memory state.
    pub resumed_state: bool,
    /// Milliseconds from launch to the guest running (state loaded and continued).
    pub running_ms: u64,
    /// Milliseconds from launch to the first heartbeat, when waited for.
    pub boot_ms: Option<u64>,
    /// The first heartbeat value seen, when waited for.
    pub first_heartbeat: Option<u64>,
}

/// The live part of a running VM.
#[derive(Debug)]
pub(crate) struct Live {
    pub rec: RunRecord,
    pub qmp: Qmp,
    pub paused: bool,
    /// Whether this QEMU offers the `background-snapshot` migration capability and the
    /// host kernel lets it write-protect guest memory; probed on first use.
    pub background_snapshot: Option<bool>,
}

/// Per-VM runtime: the lock that serialises operations on one VM, and its process.
#[derive(Debug, Default)]
pub(crate) struct Runtime {
    pub live: Option<Live>,
}

pub(crate) type RuntimeGuard = tokio::sync::OwnedMutexGuard<Runtime>;

impl Runtime {
    /// Refuses `operation` on VM `name` while its process runs (`state` says how).
    pub(crate) fn refuse_running(
        &self,
        operation: &'static str,
        name: &str,
        state: &str,
    ) -> Result<()> {
        if self.live.is_some() {
            return Err(Error::InvalidState {
                operation,
                id: name.to_owned(),
                state: state.to_owned(),
            });
        }
        Ok(())
    }
}

impl QemuHypervisor {
    /// The runtime of the VM with `uuid`, created on first use.
    pub(crate) fn runtime(&self, uuid: Uuid) -> Arc<tokio::sync::Mutex<Runtime>> {
        let mut map = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(uuid).or_default().clone()
    }

    /// Locks the VM for one operation and returns its name, uuid, folder and settings
    /// (as of the lock), with its process checked: a process that is gone without a
    /// power-off has left the VM `Aborted`.
    pub(crate) async fn lock_vm(
        &self,
        vm: &VmId,
    ) -> Result<(RuntimeGuard, String, PathBuf, VmSettings)> {
        let uuid = {
            let st = self.state.lock().await;
            find(&st, vm)?.settings.uuid
        };
        let guard = self.runtime(uuid).lock_owned().await;
        let mut guard = guard;
        let (name, folder, settings) = {
            let st = self.state.lock().await;
            let e = find(&st, vm)?;
            (e.settings.name.clone(), e.folder(), e.settings.clone())
        };
        let mut changed = false;
        if let Some(live) = &guard.live {
            if !run::is_vm_process(live.rec.pid, &settings.uuid.to_string()) {
                guard.live = None;
                self.mark_aborted(&name, &folder).await?;
                changed = true;
            }
        }
        if settings.pending.is_some() {
            // An earlier operation failed and could not clear its record: finish its
            // roll-back before anything else.
            self.recover_pending(&mut guard, &name, &folder).await?;
            changed = true;
        }
        let settings = if changed {
            self.settings_of(&name).await?
        } else {
            settings
        };
        Ok((guard, name, folder, settings))
    }

    pub(crate) async fn settings_of(&self, name: &str) -> Result<VmSettings> {
        let st = self.state.lock().await;
        Ok(find(&st, &VmId::from(name))?.settings.clone())
    }

    /// Applies `change` to the VM's settings and saves them (atomically, durably when
    /// the backend is durable).
    pub(crate) async fn change_settings(
        &self,
        name: &str,
        change: impl FnOnce(&mut VmSettings),
    ) -> Result<VmSettings> {
        let (_guard, name) = self.lock_settings(&VmId::from(name)).await?;
        self.write_settings(&name, change).await
    }

    /// [`QemuHypervisor::change_settings`] for a caller that holds the VM's settings
    /// lock. The write runs on a blocking thread; the state is locked only to read the
    /// settings and to keep the new ones.
    pub(crate) async fn write_settings(
        &self,
        name: &str,
        change: impl FnOnce(&mut VmSettings),
    ) -> Result<VmSettings> {
        let (file, mut settings) = {
            let st = self.state.lock().await;
            let e = find(&st, &VmId::from(name))?;
            (e.settings_file.clone(), e.settings.clone())
        };
        change(&mut settings);
        let name = settings.name.clone();
        self.store_settings(&name, &file, settings).await
    }

    /// Clears the intent record of an operation that failed and was undone. If even that
    /// write fails (a full disk), the record stays and the roll-back is completed by
    /// the next operation on the VM or the next open.
    pub(crate) async fn clear_pending(&self, name: &str) {
        if let Err(e) = self.change_settings(name, |s| s.pending = None).await {
            tracing::warn!(
                "VM {name}: the failed operation's record stays until it can be cleared: {e}"
            );
        }
    }

    async fn mark_aborted(&self, name: &str, folder: &Path) -> Result<()> {
        RunRecord::remove(folder);
        tracing::warn!("VM {name}: its QEMU process is gone without a power-off; it is Aborted");
        self.change_settings(name, |s| s.aborted = true)
            .await
            .map(drop)
    }

    /// The accelerator to use for `settings`, probing KVM once per root when the
    /// configuration says `auto`.
    pub(crate) async fn resolve_accel(&self, settings: &VmSettings) -> Result<Accel> {
        match self.system.accel {
            Accel::Kvm => return Ok(Accel::Kvm),
            Accel::Tcg => return Ok(Accel::Tcg),
            Accel::Auto => {}
        }
        let mut cached = self.accel.lock().await;
        if let Some(a) = *cached {
            return Ok(a);
        }
        let record_path = self.root.join("accel.json");
        if let Some(rec) = std::fs::read_to_string(&record_path)
            .ok()
            .and_then(|t| serde_json::from_str::<ProbeRecord>(&t).ok())
        {
            *cached = Some(rec.accel);
            return Ok(rec.accel);
        }
        let Some(boot) = &settings.boot else {
            // Nothing to boot a probe with: TCG works everywhere.
            return Ok(Accel::Tcg);
        };
        let (kvm, detail) = run::probe_kvm(
            &self.system,
            &boot.kernel,
            boot.initrd.as_deref(),
            &self.root,
        )
        .await?;
        let accel = if kvm { Accel::Kvm } else { Accel::Tcg };
        tracing::info!("accelerator probe: {detail}; using {accel}");
        let rec = ProbeRecord {
            accel,
            qemu: self.system.program.display().to_string(),
            kernel: boot.kernel.clone(),
            detail,
        };
        if let Ok(bytes) = serde_json::to_vec_pretty(&rec) {
            let _ = crate::fsutil::write_atomic_with(&record_path, &bytes, true);
        }
        *cached = Some(accel);
        Ok(accel)
    }

    /// Starts a VM: from its saved state (a `save_state` or a restored snapshot's
    /// memory) when it has one, else a fresh boot. See [`StartOptions`].
    pub async fn start_vm_with(&self, vm: &VmId, options: StartOptions) -> Result<StartReport> {
        let (mut guard, name, folder, settings) = self.lock_vm(vm).await?;
        guard.refuse_running("start", &name, "running")?;
        if settings.disks.is_empty() && settings.boot.is_none() {
            return Err(Error::InvalidState {
                operation: "start",
                id: name,
                state: "without a disk or a kernel to boot".to_owned(),
            });
        }
        let disks: Vec<PathBuf> = settings
            .disks
            .iter()
            .map(|d| VmSettings::disk_path(&folder, d))
            .collect();
        if let Some(missing) = disks.iter().find(|p| !p.exists()) {
            return Err(Error::NotFound {
                kind: "disk image",
                id: format!("{} of VM {name}", missing.display()),
            });
        }
        let incoming = settings.saved_state.as_ref().map(|s| folder.join(&s.file));
        if let Some(state) = &incoming {
            check_state_file(state)?;
        }
        let accel = self.resolve_accel(&settings).await?;
        let uuid = settings.uuid.to_string();
        let paths = RunPaths::for_vm(&folder, &uuid);
        let args = run::build_args(&settings, &disks, &paths, accel, incoming.as_deref())?;
        let netns = match &settings.net {
            NetConfig::Tap { netns, .. } => netns.clone(),
            _ => None,
        };
        let console_offset = run::file_len(&paths.console_log);
        let t0 = Instant::now();
        let Some(pid) = run::launch(&self.system, netns.as_deref(), &args, &paths).await? else {
            RunRecord::remove(&folder);
            return Err(match &incoming {
                Some(state) => Error::Corrupt {
                    what: "saved VM state",
                    path: state.clone(),
                    reason: "QEMU could not load it and ended at once; the VM is unchanged"
                        .to_owned(),
                    backup: None,
                },
                None => Error::Backend {
                    backend: super::img::BACKEND.to_owned(),
                    message: format!(
                        "the QEMU process of VM {name} ended as soon as it started; see {}",
                        paths.console_log.display()
                    ),
                },
            });
        };
        let rec = RunRecord {
            pid,
            qmp: paths.qmp.clone(),
            console_log: paths.console_log.clone(),
            console_offset,
            accel: accel.to_string(),
        };
        // From here on a failure must not leave a process behind.
        let kill = |why: Error| {
            run::kill_and_wait(pid, &uuid, Duration::from_secs(5));
            RunRecord::remove(&folder);
            why
        };
        let saved_rec = {
            let (rec, folder) = (rec.clone(), folder.clone());
            crate::hypervisor::run_blocking(move || rec.save(&folder)).await
        };
        saved_rec.map_err(kill)?;
        let mut qmp = match connect_qmp(&paths.qmp, self.system.qmp_timeout, pid, &uuid).await {
            Ok(q) => q,
            Err(e) => {
                let e = kill(e);
                return Err(match &incoming {
                    // QEMU ends at once when the state it was given cannot be loaded.
                    Some(state) => Error::Corrupt {
                        what: "saved VM state",
                        path: state.clone(),
                        reason: format!("QEMU could not load it ({e}); the VM is unchanged"),
                        backup: None,
                    },
                    None => e,
                });
            }
        };
        if let Some(state) = &incoming {
            if let Err(e) = wait_incoming(&mut qmp, pid, &uuid, self.snapshot_timeout).await {
                let _ = kill(Error::Cancelled {
                    operation: String::new(),
                });
                return Err(match e {
                    Error::Timeout { .. } => e,
                    _ => Error::Corrupt {
                        what: "saved VM state",
                        path: state.clone(),
                        reason: format!("QEMU could not load it ({e}); the VM is unchanged"),
                        backup: None,
                    },
                });
            }
        }
        if let NetConfig::Tap {
            netns: Some(ns),
            ifname,
            ..
        } = &settings.net
        {
            set_link_up(ns, ifname).await;
        }
        qmp.execute("cont", None).await.map_err(kill)?;
        let running_ms = t0.elapsed().as_millis() as u64;
        let saved = settings.saved_state.clone();
        self.change_settings(&name, |s| {
            s.saved_state = None;
            s.aborted = false;
        })
        .await
        .map_err(kill)?;
        if let Some(SavedState {
            file,
            snapshot: None,
        }) = saved
        {
            // A save_state file has served its purpose; a snapshot's stays with it.
            let _ = std::fs::remove_file(folder.join(file));
        }
        guard.live = Some(Live {
            rec,
            qmp,
            paused: false,
            background_snapshot: None,
        });
        drop(guard);
        let (mut boot_ms, mut first_heartbeat) = (None, None);
        if let Some(deadline) = options.wait_guest {
            let until = t0 + deadline;
            loop {
                if let Some(h) = run::last_heartbeat(&paths.console_log, console_offset) {
                    boot_ms = Some(t0.elapsed().as_millis() as u64);
                    first_heartbeat = Some(h);
                    break;
                }
                if !run::is_vm_process(pid, &uuid) {
                    return Err(Error::Backend {
                        backend: super::img::BACKEND.to_owned(),
                        message: format!(
                            "VM {name} stopped before its first heartbeat; see {}",
                            paths.console_log.display()
                        ),
                    });
                }
                if Instant::now() >= until {
                    return Err(Error::Timeout {
                        operation: "wait for the guest's first heartbeat",
                        after: deadline,
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(StartReport {
            pid,
            console_log: paths.console_log,
            console_offset,
            accel: accel.to_string(),
            resumed_state: incoming.is_some(),
            running_ms,
            boot_ms,
            first_heartbeat,
        })
    }

    /// Pulls the plug: the QEMU process is ended at once (QMP `quit`, SIGKILL if it
    /// does not answer); the guest gets no chance to shut down.
    pub(crate) async fn power_off_vm(&self, vm: &VmId) -> Result<()> {
        let (mut guard, name, folder, settings) = self.lock_vm(vm).await?;
        let Some(mut live) = guard.live.take() else {
            return Err(Error::InvalidState {
                operation: "power off",
                id: name,
                state: state_without_process(&settings).to_string(),
            });
        };
        end_process(&mut live, &settings.uuid.to_string()).await;
        RunRecord::remove(&folder);
        self.change_settings(&name, |s| s.aborted = false).await?;
        Ok(())
    }

    pub(crate) async fn pause_vm(&self, vm: &VmId, pause: bool) -> Result<()> {
        let (mut guard, name, _folder, settings) = self.lock_vm(vm).await?;
        let op = if pause { "pause" } else { "resume" };
        let Some(live) = guard.live.as_mut() else {
            return Err(Error::InvalidState {
                operation: op,
                id: name,
                state: state_without_process(&settings).to_string(),
            });
        };
        // QEMU also pauses a guest by itself when its disk is full (`io-error`), as
        // VirtualBox does: such a guest resumes like one the user paused.
        let status = live.qmp.status().await?;
        let paused_now = status != "running";
        if paused_now == pause {
            return Err(Error::InvalidState {
                operation: op,
                id: name,
                state: if pause { "paused" } else { "running" }.to_owned(),
            });
        }
        live.qmp
            .execute(if pause { "stop" } else { "cont" }, None)
            .await?;
        live.paused = pause;
        Ok(())
    }

    /// Saves the VM's memory to a state file and ends its process; the next start
    /// resumes from it. The room for the state is checked first.
    pub(crate) async fn save_state_vm(&self, vm: &VmId) -> Result<()> {
        let (mut guard, name, folder, settings) = self.lock_vm(vm).await?;
        let Some(live) = guard.live.as_mut() else {
            return Err(Error::InvalidState {
                operation: "save the state of",
                id: name,
                state: state_without_process(&settings).to_string(),
            });
        };
        let rel = PathBuf::from("Snapshots").join(format!("saved-{}.sav", Uuid::new_v4().simple()));
        let file = folder.join(&rel);
        self.check_room(&folder, settings.memory_mb, &name).await?;
        create_dir(&folder.join("Snapshots"))?;
        self.change_settings(&name, |s| {
            s.pending = Some(PendingOp {
                op: "save-state".to_owned(),
                tag: None,
                new_files: vec![rel.clone()],
                resume_after: !live.paused,
            })
        })
        .await?;
        let was_paused = live.paused;
        let result = async {
            if !was_paused {
                live.qmp.execute("stop", None).await?;
            }
            set_background(live, false).await?;
            migrate_to_file(&mut live.qmp, &file, self.snapshot_timeout).await?;
            sync_file_async(&file).await?;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&file);
            if !was_paused {
                let _ = live.qmp.execute("cont", None).await;
            }
            self.clear_pending(&name).await;
            return Err(e);
        }
        let mut live = guard.live.take().expect("checked above");
        end_process(&mut live, &settings.uuid.to_string()).await;
        RunRecord::remove(&folder);
        self.change_settings(&name, |s| {
            s.pending = None;
            s.saved_state = Some(SavedState {
                file: rel,
                snapshot: None,
            });
            s.aborted = false;
        })
        .await?;
        Ok(())
    }

    /// Refuses with [`Error::InsufficientSpace`] unless the file system of `folder` has
    /// room for `memory_mb` of state plus the margin for new overlays.
    pub(crate) async fn check_room(&self, folder: &Path, memory_mb: u64, name: &str) -> Result<()> {
        let needed = memory_mb
            .saturating_mul(1 << 20)
            .saturating_add(self.space_margin);
        let space = crate::model::disk_space(folder)?;
        if space.available < needed {
            tracing::warn!(
                "VM {name}: {} bytes free at {}, {needed} needed",
                space.available,
                folder.display()
            );
            return Err(Error::InsufficientSpace {
                path: folder.to_owned(),
                needed,
                available: space.available,
            });
        }
        Ok(())
    }

    /// The power state of a VM: live process state when it runs, else what the
    /// settings record (saved, aborted, powered off).
    pub(crate) async fn power_state(&self, settings: &VmSettings, folder: &Path) -> PowerState {
        let rt = self.runtime(settings.uuid);
        let Ok(mut guard) = rt.try_lock() else {
            // An operation is under way on this VM: it holds a process.
            return PowerState::Running;
        };
        let Some(live) = guard.live.as_mut() else {
            return state_without_process(settings);
        };
        if !run::is_vm_process(live.rec.pid, &settings.uuid.to_string()) {
            guard.live = None;
            let _ = self.mark_aborted(&settings.name, folder).await;
            return PowerState::Aborted;
        }
        match live.qmp.status().await.as_deref() {
            Ok("running") => PowerState::Running,
            Ok(
                "paused" | "prelaunch" | "postmigrate" | "finish-migrate" | "suspended"
                | "io-error",
            ) => PowerState::Paused,
            Ok("inmigrate" | "restore-vm") => PowerState::Restoring,
            Ok("save-vm") => PowerState::Saving,
            Ok("shutdown") => {
                // The guest powered itself off (the process stays up for -no-shutdown).
                let mut live = guard.live.take().expect("checked above");
                end_process(&mut live, &settings.uuid.to_string()).await;
                RunRecord::remove(folder);
                PowerState::PoweredOff
            }
            Ok(_) => PowerState::Stuck,
            Err(_) if live.paused => PowerState::Paused,
            Err(_) => PowerState::Stuck,
        }
    }

    /// Finds the VMs whose processes were started by an earlier backend on this root:
    /// live ones are connected again, dead ones become `Aborted`; an operation that had
    /// begun is rolled back.
    pub(crate) async fn reattach_all(&self) -> Result<()> {
        let entries: Vec<(String, PathBuf, VmSettings)> = {
            let st = self.state.lock().await;
            st.vms
                .values()
                .map(|e| (e.settings.name.clone(), e.folder(), e.settings.clone()))
                .collect()
        };
        for (name, folder, settings) in entries {
            let uuid = settings.uuid.to_string();
            let rt = self.runtime(settings.uuid);
            let mut guard = rt.lock_owned().await;
            if let Some(rec) = RunRecord::load(&folder) {
                if run::is_vm_process(rec.pid, &uuid) {
                    match Qmp::connect(&rec.qmp, self.system.qmp_timeout).await {
                        Ok(mut qmp) => {
                            let paused = qmp.status().await.is_ok_and(|s| s != "running");
                            guard.live = Some(Live {
                                rec,
                                qmp,
                                paused,
                                background_snapshot: None,
                            });
                        }
                        Err(e) => {
                            tracing::warn!(
                                "VM {name}: its process {} does not answer QMP ({e}); killing it",
                                rec.pid
                            );
                            run::kill_and_wait(rec.pid, &uuid, Duration::from_secs(5));
                            self.mark_aborted(&name, &folder).await?;
                        }
                    }
                } else {
                    self.mark_aborted(&name, &folder).await?;
                }
            }
            if settings.pending.is_some() {
                self.recover_pending(&mut guard, &name, &folder).await?;
            }
        }
        Ok(())
    }
}

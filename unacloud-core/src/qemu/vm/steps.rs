//! The steps a VM operation is made of: QMP connections, loading and saving the memory
//! state (migration to and from a file, `background-snapshot`), durable files, ending a
//! process, bringing a tap link up.

use super::*;

/// The state of a VM that has no process.
pub(crate) fn state_without_process(s: &VmSettings) -> PowerState {
    if s.saved_state.is_some() {
        PowerState::Saved
    } else if s.aborted {
        PowerState::Aborted
    } else {
        PowerState::PoweredOff
    }
}

/// A state file must exist and hold a QEMU migration stream (it starts with the magic
/// `QEVM`); anything else is refused before a process is started.
pub(super) fn check_state_file(state: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(state).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                kind: "saved VM state",
                id: state.display().to_string(),
            }
        } else {
            Error::io(state, e)
        }
    })?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || &magic != b"QEVM" {
        return Err(Error::Corrupt {
            what: "saved VM state",
            path: state.to_owned(),
            reason: "it does not start with a QEMU migration stream header".to_owned(),
            backup: None,
        });
    }
    Ok(())
}

pub(super) async fn connect_qmp(
    path: &Path,
    timeout: Duration,
    pid: i32,
    uuid: &str,
) -> Result<Qmp> {
    let until = Instant::now() + timeout;
    loop {
        if path.exists() {
            match Qmp::connect(path, timeout).await {
                Ok(q) => return Ok(q),
                Err(e) if Instant::now() >= until => return Err(e),
                Err(_) => {}
            }
        }
        if !run::is_vm_process(pid, uuid) {
            return Err(Error::Backend {
                backend: crate::qemu::img::BACKEND.to_owned(),
                message: "the QEMU process ended before its QMP socket answered".to_owned(),
            });
        }
        if Instant::now() >= until {
            return Err(Error::Timeout {
                operation: "connect to QMP",
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until an incoming migration (a state being loaded) has finished.
pub(super) async fn wait_incoming(
    qmp: &mut Qmp,
    pid: i32,
    uuid: &str,
    limit: Duration,
) -> Result<()> {
    let until = Instant::now() + limit;
    loop {
        let status = qmp.status().await?;
        if status != "inmigrate" {
            return Ok(());
        }
        if !run::is_vm_process(pid, uuid) {
            return Err(Error::Backend {
                backend: crate::qemu::img::BACKEND.to_owned(),
                message: "QEMU exited while loading the state".to_owned(),
            });
        }
        if Instant::now() >= until {
            return Err(Error::Timeout {
                operation: "load the saved VM state",
                after: limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Turns the `background-snapshot` capability on or off (off when not offered).
pub(crate) async fn set_background(live: &mut Live, on: bool) -> Result<bool> {
    if live.background_snapshot.is_none() {
        live.background_snapshot = Some(
            live.qmp
                .has_migration_capability("background-snapshot")
                .await?,
        );
    }
    if live.background_snapshot != Some(true) {
        return Ok(false);
    }
    let set = live
        .qmp
        .execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "background-snapshot", "state": on}]})),
        )
        .await;
    match set {
        Ok(_) => Ok(on),
        Err(e) if on => {
            // Offered but not usable (no userfaultfd write-protection for this memory).
            tracing::info!(
                "background-snapshot unavailable, memory is saved with the guest paused: {e}"
            );
            live.background_snapshot = Some(false);
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Creates `file` (mode 0600) and hands it to QEMU as the target of the next memory
/// save, before the guest is paused: the pause itself then runs no shell, opens no
/// file and starts no process.
pub(crate) async fn prepare_state_file(qmp: &mut Qmp, file: &Path) -> Result<()> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    // QEMU throttles migrations for networks (128 MiB/s by default); a state file on
    // the local disk is written as fast as the disk takes it.
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 1u64 << 40 })),
    )
    .await?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| Error::io(file, e))?;
    qmp.send_fd(STATE_FD, f.as_fd()).await
}

pub(super) const STATE_FD: &str = "unacloud-state";

/// Starts `migrate` of the VM's memory into the file given to [`prepare_state_file`].
pub(crate) async fn start_migration(qmp: &mut Qmp) -> Result<()> {
    qmp.execute("migrate", Some(json!({ "uri": format!("fd:{STATE_FD}") })))
        .await
        .map(drop)
}

/// After `migrate` with `background-snapshot` on a paused guest: waits until QEMU's
/// migration thread has captured the device state and started tracking memory writes.
/// QEMU 7.2 then resumes the guest itself (`true`: the guest runs again); newer versions
/// leave it paused, and the capture shows as memory being written or the save being
/// over (`false`: the caller resumes it).
pub(crate) async fn wait_capture(qmp: &mut Qmp, limit: Duration) -> Result<bool> {
    let until = Instant::now() + limit;
    loop {
        if qmp.status().await? == "running" {
            return Ok(true);
        }
        let m = qmp.execute("query-migrate", None).await?;
        let written = m["ram"]["transferred"].as_u64().unwrap_or(0) > 0;
        if written || !matches!(m["status"].as_str(), Some("setup" | "active")) {
            return Ok(false);
        }
        if Instant::now() > until {
            return Err(Error::Timeout {
                operation: "capture the VM's state for a snapshot",
                after: limit,
            });
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Waits until the running migration has completed; its failure is an error.
pub(crate) async fn wait_migration(qmp: &mut Qmp, file: &Path, limit: Duration) -> Result<()> {
    let until = Instant::now() + limit;
    loop {
        let r = qmp.execute("query-migrate", None).await?;
        match r["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed" | "cancelled") => {
                let why = r["error-desc"].as_str().unwrap_or("no reason given");
                let nospace = why.to_ascii_lowercase().contains("no space")
                    || crate::model::disk_space(file.parent().unwrap_or(Path::new("/")))
                        .is_ok_and(|s| s.available == 0);
                return Err(if nospace {
                    Error::InsufficientSpace {
                        path: file.to_owned(),
                        needed: 0,
                        available: 0,
                    }
                } else {
                    Error::Backend {
                        backend: crate::qemu::img::BACKEND.to_owned(),
                        message: format!(
                            "saving the VM's memory to {} failed: {why}",
                            file.display()
                        ),
                    }
                });
            }
            _ => {}
        }
        if Instant::now() >= until {
            let _ = qmp.execute("migrate_cancel", None).await;
            return Err(Error::Timeout {
                operation: "save the VM's memory",
                after: limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

pub(super) async fn migrate_to_file(qmp: &mut Qmp, file: &Path, limit: Duration) -> Result<()> {
    prepare_state_file(qmp, file).await?;
    start_migration(qmp).await?;
    wait_migration(qmp, file, limit).await
}

/// `fsync` of a file and of its folder: the state is durable once this returns.
pub(crate) async fn sync_file_async(file: &Path) -> Result<()> {
    let file = file.to_path_buf();
    crate::hypervisor::run_blocking(move || sync_file(&file)).await
}

/// Flushes a file and its folder to stable storage.
pub(crate) fn sync_file(file: &Path) -> Result<()> {
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    f.sync_all().map_err(|e| Error::io(file, e))?;
    if let Some(dir) = file.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Ends a VM's process: QMP `quit`, then SIGKILL if it is still there.
pub(crate) async fn end_process(live: &mut Live, uuid: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(3), live.qmp.execute("quit", None)).await;
    let pid = live.rec.pid;
    let uuid = uuid.to_owned();
    let _ = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until && run::is_vm_process(pid, &uuid) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if run::is_vm_process(pid, &uuid) {
            run::kill_and_wait(pid, &uuid, Duration::from_secs(5));
        }
    })
    .await;
    let _ = std::fs::remove_file(&live.rec.qmp);
}

pub(super) async fn set_link_up(netns: &str, ifname: &str) {
    let out = tokio::process::Command::new("ip")
        .args(["-n", netns, "link", "set", ifname, "up"])
        .output()
        .await;
    if let Ok(o) = out {
        if !o.status.success() {
            tracing::warn!(
                "could not bring {ifname} up in {netns}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
    }
}

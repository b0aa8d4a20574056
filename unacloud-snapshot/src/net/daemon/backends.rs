//! Building a VM's colouring backend, command executor and local-snapshot method from the configuration; the catalog and run folders.

use super::*;

/// Builds a colouring backend of `kind` whose commands run through `exec`.
///
/// [`BackendKind::NftNetlink`] runs no commands; build it with [`build_vm_backend`].
pub fn build_backend(
    kind: BackendKind,
    exec: Arc<dyn CommandExecutor>,
    dscp: DscpConfig,
) -> Result<Box<dyn ColourBackend>> {
    Ok(match kind {
        BackendKind::NftSession => Box::new(Nft::new(NftSession::start(exec.as_ref())?, dscp)),
        BackendKind::Nft => Box::new(Nft::new(NftOneShot::new(exec), dscp)),
        BackendKind::Iptables => Box::new(Iptables::new(exec, dscp)),
        BackendKind::NftNetlink => {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "the nft-netlink backend runs no commands (asked for {}); build it from the VM's configuration",
                    exec.place()
                ),
            })
        }
    })
}

/// Builds the colouring backend of `kind` for `vm`: commands through [`vm_executor`], or
/// for [`BackendKind::NftNetlink`] a netlink socket opened in the VM's namespace (or on
/// this host when it has none); scoped to the VM's tap when it has one.
pub fn build_vm_backend(
    kind: BackendKind,
    vm: &VmConfig,
    dscp: DscpConfig,
) -> Result<Box<dyn ColourBackend>> {
    let scope = match &vm.tap {
        Some(tap) => Scope::interface(tap)?,
        None => Scope::Host,
    };
    Ok(match kind {
        BackendKind::NftNetlink => {
            let nl = match &vm.netns {
                Some(ns) => NftNetlink::open_in_netns(ns, dscp)?,
                None => NftNetlink::open_here(dscp)?,
            };
            Box::new(nl.scope(scope))
        }
        BackendKind::NftSession => {
            Box::new(Nft::new(NftSession::start(vm_executor(vm).as_ref())?, dscp).scope(scope))
        }
        BackendKind::Nft => Box::new(Nft::new(NftOneShot::new(vm_executor(vm)), dscp).scope(scope)),
        BackendKind::Iptables => Box::new(Iptables::new(vm_executor(vm), dscp).scope(scope)),
    })
}

/// The executor where a VM's rules are applied: its namespace, or this host.
pub fn vm_executor(vm: &VmConfig) -> Arc<dyn CommandExecutor> {
    if let Some(ns) = &vm.netns {
        Arc::new(NetnsExec::new(ns.clone()))
    } else {
        Arc::new(LocalHost)
    }
}

/// The directory of the default catalog files.
pub const DEFAULT_CATALOG_DIR: &str = "/var/lib/unacloud";

/// The default catalog file of cluster `cluster`:
/// `/var/lib/unacloud/catalog-<cluster>.json`.
pub fn default_catalog_path(cluster: u64) -> PathBuf {
    Path::new(DEFAULT_CATALOG_DIR).join(format!("catalog-{cluster}.json"))
}

/// Creates the directory of the catalog file `path` (mode 0700, parents as needed) if it
/// is missing, so that the coordinator can persist its catalog. The error says what to
/// pass instead.
pub fn prepare_catalog_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::InvalidConfig {
            reason: format!(
                "cannot create the catalog directory {} ({e}); the coordinator keeps its \
                 catalog of completed global snapshots there: run as a user who may create \
                 it, or pass --catalog FILE (`catalog` in [launcher]) in a writable directory",
                dir.display()
            ),
        })
}

/// The run directory of launchers' lock files: `/run/unacloud` when it exists or can be
/// created and is writable, else the system's temporary directory.
pub fn default_run_dir() -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let run = PathBuf::from("/run/unacloud");
    let usable = (run.is_dir() || std::fs::DirBuilder::new().mode(0o755).create(&run).is_ok())
        && nix::unistd::access(&run, nix::unistd::AccessFlags::W_OK).is_ok();
    if usable {
        run
    } else {
        std::env::temp_dir()
    }
}

/// The local-snapshot method of `vm`: a lab method of its own entry, else the
/// launcher's hypervisor (`hv`); neither is a configuration error.
pub fn local_snapshot(vm: &VmConfig, hv: Option<&LocalSnapshot>) -> Result<LocalSnapshot> {
    let lab = [
        vm.freeze_pid.is_some(),
        vm.snapshot_command.is_some(),
        vm.lab_sleep_ms.is_some(),
    ];
    if lab.iter().filter(|x| **x).count() > 1 {
        return Err(Error::InvalidConfig {
            reason: format!(
                "VM {}: give one local-snapshot method, not several of freeze_pid, snapshot_command and lab_sleep_ms",
                vm.name
            ),
        });
    }
    if let Some(pid) = vm.freeze_pid {
        return Ok(LocalSnapshot::Freeze {
            pid,
            hold: Duration::from_millis(vm.hold_ms),
        });
    }
    if let Some(argv) = &vm.snapshot_command {
        if argv.is_empty() {
            return Err(Error::InvalidConfig {
                reason: format!("VM {}: snapshot_command is empty", vm.name),
            });
        }
        return Ok(LocalSnapshot::Command {
            argv: argv.clone(),
            timeout: Duration::from_millis(vm.snapshot_timeout_ms.unwrap_or(600_000)),
        });
    }
    if let Some(ms) = vm.lab_sleep_ms {
        return Ok(LocalSnapshot::Sleep(Duration::from_millis(ms)));
    }
    hv.cloned().ok_or_else(|| Error::InvalidConfig {
        reason: format!(
            "VM {} has no local-snapshot method: configure [launcher.hypervisor] (or --hypervisor), \
             or a lab method (freeze_pid, snapshot_command, lab_sleep_ms)",
            vm.name
        ),
    })
}

/// Opens the hypervisor of `[launcher.hypervisor]` as a local-snapshot method.
#[cfg(feature = "hypervisor")]
pub async fn open_hypervisor(section: &HypervisorSection) -> Result<LocalSnapshot> {
    use unacloud_core::qemu::{Accel, QemuHypervisor, QemuImg, QemuSystem};
    if section.backend != "qemu" {
        return Err(Error::InvalidConfig {
            reason: format!(
                "hypervisor backend {:?}: this launcher drives `qemu`; embed the library with \
                 LocalSnapshot::Hypervisor for other backends",
                section.backend
            ),
        });
    }
    let accel: Accel =
        section
            .accel
            .as_deref()
            .unwrap_or("auto")
            .parse()
            .map_err(|e: unacloud_core::Error| Error::InvalidConfig {
                reason: format!("hypervisor: {e}"),
            })?;
    let hv = QemuHypervisor::open_configured(
        &section.root,
        QemuImg::new(),
        QemuSystem::new().with_accel(accel),
    )
    .await
    .map_err(|e| Error::InvalidConfig {
        reason: format!(
            "cannot open the QEMU backend at {}: {}",
            section.root.display(),
            error_chain(&e)
        ),
    })?;
    Ok(LocalSnapshot::Hypervisor {
        hv: Arc::new(hv),
        live: section.live,
        margin: section.margin_mb.saturating_mul(1 << 20),
    })
}

/// Without the `hypervisor` feature a `[launcher.hypervisor]` section is refused.
#[cfg(not(feature = "hypervisor"))]
pub async fn open_hypervisor(section: &HypervisorSection) -> Result<LocalSnapshot> {
    Err(Error::InvalidConfig {
        reason: format!(
            "hypervisor backend {:?}: this build of unacloud-snapshot lacks the `hypervisor` feature",
            section.backend
        ),
    })
}

#[cfg(feature = "hypervisor")]
use crate::net::error::error_chain;

//! A QEMU backend of [`Hypervisor`] that runs VMs: `qemu-system-x86_64` driven over
//! QMP, disks and snapshots with the real `qemu-img`.
//!
//! * A **template** is a base image (qcow2 or raw) registered with
//!   [`Hypervisor::register_disk`] and switched to [`DiskType::MultiAttach`] with
//!   [`Hypervisor::set_disk_type`], which also makes the file read-only (mode `a-w`).
//!   [`QemuHypervisor::set_boot_files`] records the kernel and initrd of a template
//!   whose disk has no boot loader (the reference guest image).
//! * Attaching a multiattach template to a VM creates the VM's own qcow2 **overlay**
//!   (`qemu-img create -f qcow2 -b <template> -F <format>`) in the VM's folder: QEMU's
//!   equivalent of VirtualBox's differencing child.
//! * **Running**: one headless, daemonized QEMU process per VM with its QMP socket,
//!   pid file and console log in the VM's folder ([`QemuHypervisor::start_vm_with`]).
//!   The accelerator is KVM where a probe boot under KVM works, else TCG
//!   ([`Accel`]). Networking is none, user-mode, or a tap in a network namespace with a
//!   fixed MAC and an address the guest reads from its kernel command line
//!   ([`NetConfig`]). A backend opened again finds its running VMs; a process that died
//!   without a power-off leaves its VM `Aborted`.
//! * **Snapshots** follow VirtualBox's layout (see [`SnapshotReport`] and the `snap`
//!   module): the current overlay becomes the snapshot's frozen image, the VM continues
//!   on a new overlay, and a running VM's memory goes to the snapshot's own state file,
//!   captured at the same instant as the disks; with `live` the guest runs on while its
//!   memory is written (QEMU's `background-snapshot`). The room for the state is checked
//!   before anything starts ([`Error::InsufficientSpace`]).
//! * **Files**: [`Hypervisor::vm_files`] (current state) and
//!   [`Hypervisor::snapshot_files`] (one snapshot) give the minimal set to move; the
//!   template is "expected at destination". [`Hypervisor::register_vm`] on another host
//!   re-links the chain to that host's copy of the template by uuid (or file name).
//! * A VM's **settings** are a small JSON file `<folder>/<name>/<name>.vm.json`, written
//!   atomically; an operation in progress is recorded there first and rolled back (or
//!   finished) when the backend next opens the root. The root holds `registry.json`
//!   (paths under the root stored relative to it, so a copied root is independent;
//!   files a copied registry names outside the root are never deleted,
//!   [`Error::OutsideRoot`]).
//! * **Crash safety**: creating, provisioning, cloning, registering and deleting a VM
//!   write an intent to `<root>/intents/` before their first side effect; the next open
//!   replays or rolls back each one (the registry says which committed) and adopts or
//!   removes files no record explains, so a killed caller never leaves a registered VM
//!   without its disk or an untracked overlay.
//! * **Concurrency**: operations on different VMs run at the same time (their
//!   `qemu-img` runs and `fsync`s overlap); operations on one VM run one after the
//!   other. Only the registry writes are serialised backend-wide. File work runs on
//!   tokio's blocking threads, never on the caller's worker thread.
//!
//! ```no_run
//! # async fn demo() -> unacloud_core::Result<()> {
//! use std::time::Duration;
//! use unacloud_core::hypervisor::{AttachSpec, DiskRef, Hypervisor};
//! use unacloud_core::model::{DiskType, HardwareProfile, VmSpec};
//! use unacloud_core::qemu::{BootFiles, QemuHypervisor, StartOptions};
//!
//! let hv = QemuHypervisor::open("/var/lib/unacloud/host").await?;
//! let base = hv.register_disk("/var/lib/unacloud/guest/rootfs.qcow2".as_ref()).await?;
//! hv.set_disk_type(&DiskRef::Uuid(base.uuid), DiskType::MultiAttach).await?;
//! hv.set_boot_files(&DiskRef::Uuid(base.uuid), BootFiles {
//!     kernel: "/var/lib/unacloud/guest/vmlinuz".into(),
//!     initrd: Some("/var/lib/unacloud/guest/initrd.img".into()),
//!     cmdline: None,
//! }).await?;
//! let spec = VmSpec::new("TM", HardwareProfile::Small).with_memory_mb(128);
//! let vm = hv.create_vm(&spec).await?;
//! let id = vm.name.as_str().into();
//! hv.attach_disk(&id, &AttachSpec::sata(DiskRef::Uuid(base.uuid))).await?;
//! let started = hv.start_vm_with(&id, StartOptions { wait_guest: Some(Duration::from_secs(60)) }).await?;
//! println!("first heartbeat after {:?} ms", started.boot_ms);
//! let snap = hv.take_snapshot_with(&id, "s1", None, true).await?;
//! println!("guest paused {:.1} ms", snap.downtime_ms);
//! # Ok(()) }
//! ```

mod backend;
mod files;
mod img;
mod journal;
mod locks;
mod qmp;
mod run;
mod settings;
mod snap;
mod vm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::Mutex;

pub use img::{parse_info, ImageInfo, ImageSnapshot, QemuImg};
pub use qmp::Qmp;
pub use run::{
    kill_all_under, last_heartbeat, mac_for, vm_processes_under, Accel, QemuSystem, SYSTEM_PACKAGE,
};
pub use settings::{
    BaseRef, BootFiles, DiskSlot, FrozenDisk, NetConfig, PendingOp, SavedState, SnapshotMeta,
    VmSettings,
};
pub use snap::SnapshotReport;
pub use vm::{StartOptions, StartReport};

use crate::error::{Error, Result};
use crate::files::{FileRole, MigrationSet, VmFile};
use crate::hypervisor::{
    AttachSpec, CloneSpec, DiskRef, GuestCommand, GuestOutput, Hypervisor, SnapshotRef, StartMode,
};
use crate::model::{DiskAttachment, DiskFormat, DiskInfo, DiskType, Uuid, VmId, VmInfo, VmSpec};
use crate::tree::SnapshotTree;
use img::BACKEND;
use settings::{validate_name, Registry, SETTINGS_FORMAT};

#[derive(Debug)]
struct Entry {
    settings_file: PathBuf,
    settings: VmSettings,
}

impl Entry {
    fn folder(&self) -> PathBuf {
        self.settings_file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// The image file of each disk slot, in slot order.
    fn disk_paths(&self) -> impl Iterator<Item = PathBuf> + '_ {
        let folder = self.folder();
        self.settings
            .disks
            .iter()
            .map(move |d| VmSettings::disk_path(&folder, d))
    }

    /// Applies `change` to a copy of the settings, saves it, and only then keeps it.
    fn update(&mut self, durable: bool, change: impl FnOnce(&mut VmSettings)) -> Result<()> {
        let mut s = self.settings.clone();
        change(&mut s);
        s.save(&self.settings_file, durable)?;
        self.settings = s;
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) struct State {
    registry: Registry,
    vms: BTreeMap<String, Entry>,
}

impl State {
    /// Keeps a VM whose settings file is written and registered; returns its info.
    fn add_vm(&mut self, settings_file: PathBuf, settings: VmSettings) -> VmInfo {
        let entry = Entry {
            settings_file,
            settings,
        };
        let info = info_of(&entry);
        self.vms.insert(entry.settings.name.clone(), entry);
        info
    }
}

/// The QEMU/KVM backend. See the [module documentation](self).
#[derive(Debug)]
pub struct QemuHypervisor {
    root: PathBuf,
    vm_folder: PathBuf,
    img: QemuImg,
    durable: bool,
    state: std::sync::Arc<Mutex<State>>,
    names: locks::NameLocks,
    settings_locks: locks::SettingsLocks,
    in_flight: locks::InFlight,
    system: QemuSystem,
    runtimes: std::sync::Mutex<std::collections::HashMap<Uuid, std::sync::Arc<Mutex<vm::Runtime>>>>,
    accel: Mutex<Option<Accel>>,
    space_margin: u64,
    snapshot_timeout: std::time::Duration,
    fault: journal::Fault,
    live_intents: std::sync::Mutex<std::collections::HashSet<Uuid>>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl QemuHypervisor {
    /// Opens (creating it if needed) a backend rooted at `root`: the registry is
    /// `root/registry.json`, new VMs go to `root/vms` unless their spec names a folder.
    ///
    /// Only one backend may have a root open at a time (an exclusive `flock` on
    /// `root/.lock`, released on drop); a second one gets [`Error::InUse`].
    pub async fn open(root: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(root, QemuImg::new()).await
    }

    /// Like [`QemuHypervisor::open`] with a configured `qemu-img` runner.
    pub async fn open_with(root: impl AsRef<Path>, img: QemuImg) -> Result<Self> {
        Self::open_configured(root, img, QemuSystem::new()).await
    }

    /// Like [`QemuHypervisor::open`] with configured `qemu-img` and `qemu-system`
    /// runners. VMs that an earlier backend started on this root and that still run
    /// are found again; operations that were interrupted are rolled back.
    pub async fn open_configured(
        root: impl AsRef<Path>,
        img: QemuImg,
        system: QemuSystem,
    ) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        // Creating the root, taking its lock and reading every VM's settings is file
        // work: it runs on the blocking pool, not on the caller's executor thread.
        let (root, lock, registry, vms) = crate::hypervisor::run_blocking(move || {
            std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
            let root = std::fs::canonicalize(&root).map_err(|e| Error::io(&root, e))?;
            // One backend per root: the registry is rewritten in place.
            let lock_path = root.join(".lock");
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| Error::io(&lock_path, e))?;
            let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|(_, errno)| {
                if errno == nix::errno::Errno::EWOULDBLOCK {
                    Error::InUse {
                        id: root.display().to_string(),
                        users: vec!["another QemuHypervisor (in this or another process)".into()],
                    }
                } else {
                    Error::io(&lock_path, std::io::Error::from_raw_os_error(errno as i32))
                }
            })?;
            let registry = Registry::load(&root.join("registry.json"))?.resolve(&root);
            let mut vms = BTreeMap::new();
            for file in &registry.vms {
                match VmSettings::load(file) {
                    Ok(settings) => {
                        vms.insert(
                            settings.name.clone(),
                            Entry {
                                settings_file: file.clone(),
                                settings,
                            },
                        );
                    }
                    Err(e) => tracing::warn!("skipping registered VM {}: {e}", file.display()),
                }
            }
            Ok((root, lock, registry, vms))
        })
        .await?;
        let hv = QemuHypervisor {
            vm_folder: root.join("vms"),
            root,
            img,
            durable: true,
            state: std::sync::Arc::new(Mutex::new(State { registry, vms })),
            names: std::sync::Mutex::new(std::collections::HashMap::new()),
            settings_locks: std::sync::Mutex::new(std::collections::HashMap::new()),
            in_flight: std::sync::Mutex::new(Vec::new()),
            system,
            runtimes: std::sync::Mutex::new(std::collections::HashMap::new()),
            accel: Mutex::new(None),
            space_margin: 64 << 20,
            snapshot_timeout: std::time::Duration::from_secs(600),
            fault: journal::Fault::default(),
            live_intents: std::sync::Mutex::new(std::collections::HashSet::new()),
            _lock: lock,
        };
        // Interrupted operations first (the registry says which committed), then files
        // no record explains, then running VMs.
        {
            let mut st = hv.state.lock().await;
            hv.replay_intents(&st.registry.vms, None)?;
            let vms = std::mem::take(&mut st.vms);
            st.vms = vms
                .into_iter()
                .filter(|(_, e)| st.registry.vms.contains(&e.settings_file))
                .collect();
        }
        hv.sweep_orphans().await?;
        hv.ensure_reserve();
        hv.reattach_all().await?;
        Ok(hv)
    }

    /// Bytes of free space required beyond the guest's memory before a snapshot or a
    /// save-state starts (new overlays grow while the state is written); 64 MiB by
    /// default.
    pub fn with_space_margin(mut self, bytes: u64) -> Self {
        self.space_margin = bytes;
        self
    }

    /// The `qemu-system` runner used for later starts.
    pub fn with_system(mut self, system: QemuSystem) -> Self {
        self.system = system;
        self
    }

    /// The `qemu-system` runner.
    pub fn qemu_system(&self) -> &QemuSystem {
        &self.system
    }

    /// The accelerator this backend runs guests with (probing once if configured
    /// `auto` and a VM has a kernel to probe with; TCG otherwise).
    pub async fn accelerator(&self, vm: Option<&VmId>) -> Result<Accel> {
        let settings = match vm {
            Some(v) => Some(find(&*self.state.lock().await, v)?.settings.clone()),
            None => None,
        };
        match settings {
            Some(s) => self.resolve_accel(&s).await,
            None => Ok(match self.system.accel {
                Accel::Kvm => Accel::Kvm,
                _ => Accel::Tcg,
            }),
        }
    }

    /// Records the kernel and initrd that boot a template whose disk has no boot
    /// loader; VMs created on the template boot with them, and on another host the
    /// local template's files are used.
    pub async fn set_boot_files(&self, template: &DiskRef, boot: BootFiles) -> Result<()> {
        for p in std::iter::once(&boot.kernel).chain(boot.initrd.iter()) {
            if !p.is_file() {
                return Err(Error::NotFound {
                    kind: "boot file",
                    id: p.display().to_string(),
                });
            }
        }
        let st = self.lock_state().await;
        let d = find_disk(&st, template)?;
        let boot = BootFiles {
            kernel: std::fs::canonicalize(&boot.kernel).map_err(|e| Error::io(&boot.kernel, e))?,
            initrd: match &boot.initrd {
                Some(i) => Some(std::fs::canonicalize(i).map_err(|e| Error::io(i, e))?),
                None => None,
            },
            cmdline: boot.cmdline,
        };
        self.update_registry(st, move |reg| {
            reg.boot.insert(d.uuid, boot);
        })
        .await
    }

    /// Sets how a VM's network adapter is connected (the VM must not be running).
    pub async fn set_vm_network(&self, vm: &VmId, net: NetConfig) -> Result<()> {
        let (guard, name, _folder, _settings) = self.lock_vm(vm).await?;
        guard.refuse_running("change the network of", &name, "running")?;
        self.change_settings(&name, |s| s.net = net).await.map(drop)
    }

    /// Sets (or clears) the kernel a VM boots directly.
    pub async fn set_vm_boot(&self, vm: &VmId, boot: Option<BootFiles>) -> Result<()> {
        let (_guard, name, _folder, _settings) = self.lock_vm(vm).await?;
        self.change_settings(&name, |s| s.boot = boot)
            .await
            .map(drop)
    }

    /// A VM's settings as stored.
    pub async fn vm_settings(&self, vm: &VmId) -> Result<VmSettings> {
        Ok(find(&*self.state.lock().await, vm)?.settings.clone())
    }

    /// The console log of a VM and the offset where its current run's output starts.
    pub async fn console(&self, vm: &VmId) -> Result<(PathBuf, u64)> {
        let folder = find(&*self.state.lock().await, vm)?.folder();
        let rec = run::RunRecord::load(&folder);
        Ok(match rec {
            Some(r) => (r.console_log, r.console_offset),
            None => (folder.join("console.log"), 0),
        })
    }

    /// The pid of a VM's QEMU process, when it runs.
    pub async fn vm_pid(&self, vm: &VmId) -> Result<Option<i32>> {
        let (folder, uuid) = {
            let st = self.state.lock().await;
            let e = find(&st, vm)?;
            (e.folder(), e.settings.uuid.to_string())
        };
        Ok(run::RunRecord::load(&folder)
            .map(|r| r.pid)
            .filter(|&p| run::is_vm_process(p, &uuid)))
    }

    /// Whether settings and registry writes are flushed to stable storage (`fsync` of
    /// the file and its folder) before a call returns. On by default. Turned off, every
    /// write is still atomic (a reader never sees a torn file) but a power cut may lose
    /// the most recent changes; provisioning is then faster on slow disks.
    pub fn with_durable_writes(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// The backend's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The `qemu-img` runner.
    pub fn qemu_img(&self) -> &QemuImg {
        &self.img
    }

    /// The backing chain of every disk of `vm`, from the VM's image down to its base, as
    /// `qemu-img info --backing-chain` reports it.
    pub async fn backing_chains(&self, vm: &VmId) -> Result<Vec<Vec<ImageInfo>>> {
        let paths: Vec<PathBuf> = find(&*self.state.lock().await, vm)?.disk_paths().collect();
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            out.push(self.img.info_chain(&p).await?);
        }
        Ok(out)
    }

    /// Records the template version a VM was built from in its settings file.
    pub async fn set_vm_template(&self, vm: &VmId, template: Option<String>) -> Result<()> {
        let (_guard, name) = self.lock_settings(vm).await?;
        self.write_settings(&name, |s| s.template = template)
            .await
            .map(drop)
    }
}

fn find<'a>(st: &'a State, vm: &VmId) -> Result<&'a Entry> {
    if let Some(e) = st.vms.get(vm.as_str()) {
        return Ok(e);
    }
    st.vms
        .values()
        .find(|e| {
            e.settings
                .uuid
                .to_string()
                .eq_ignore_ascii_case(vm.as_str())
        })
        .ok_or_else(|| Error::NotFound {
            kind: "vm",
            id: vm.to_string(),
        })
}

/// Every disk: the registered ones and the VMs' own images.
fn all_disks(st: &State) -> Vec<DiskInfo> {
    let mut out = st.registry.disks.clone();
    for e in st.vms.values() {
        let folder = e.folder();
        for d in e.settings.disks.iter().filter(|d| d.own) {
            out.push(DiskInfo {
                uuid: d.uuid,
                location: VmSettings::disk_path(&folder, d),
                format: DiskFormat::Qcow2,
                disk_type: DiskType::Normal,
                parent: d.base.as_ref().map(|b| b.uuid),
                logical_size: d.logical_size,
            });
        }
    }
    out
}

fn find_disk(st: &State, disk: &DiskRef) -> Result<DiskInfo> {
    let all = all_disks(st);
    let found = match disk {
        DiskRef::Uuid(u) => all.into_iter().find(|d| d.uuid == *u),
        DiskRef::Path(p) => {
            let canon = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            all.into_iter()
                .find(|d| d.location == canon || d.location == *p)
        }
    };
    found.ok_or_else(|| Error::NotFound {
        kind: "disk",
        id: format!("{disk} (it is not registered on this host)"),
    })
}

fn info_of(e: &Entry) -> VmInfo {
    VmInfo {
        name: e.settings.name.clone(),
        uuid: Some(e.settings.uuid),
        state: vm::state_without_process(&e.settings),
        cores: e.settings.cores,
        memory_mb: e.settings.memory_mb,
        disks: e
            .settings
            .disks
            .iter()
            .map(|d| DiskAttachment {
                controller: d.controller.clone(),
                port: d.port,
                device: d.device,
                disk: d.uuid,
            })
            .collect(),
        current_snapshot: e.settings.current_snapshot.clone(),
        settings_file: Some(e.settings_file.clone()),
        template: e.settings.template.clone(),
    }
}

/// Names of the VMs that use `uuid` directly or as the base of their overlay.
fn users_of(st: &State, uuid: Uuid) -> Vec<String> {
    st.vms
        .values()
        .filter(|e| {
            e.settings
                .disks
                .iter()
                .any(|d| d.uuid == uuid || d.base.as_ref().is_some_and(|b| b.uuid == uuid))
        })
        .map(|e| e.settings.name.clone())
        .collect()
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The file name of a VM's own image in the slot `controller:port:device`.
fn own_image_file(vm: &str, controller: &str, port: u32, device: u32) -> PathBuf {
    PathBuf::from(format!(
        "{}-{}-{}-{}.qcow2",
        sanitize(vm),
        sanitize(controller),
        port,
        device
    ))
}

/// Formats Unix seconds as an ISO 8601 UTC time stamp.
fn iso8601(secs: i64) -> String {
    crate::time::CivilTime::from_unix(secs).to_string()
}

fn set_writable(path: &Path, writable: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mode = meta.permissions().mode();
    let new = if writable {
        mode | 0o200
    } else {
        mode & !0o222
    };
    if new != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(new))
            .map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_matches_known_instants() {
        // (The same instants as the protocol crate's time stamps.)
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_795_599_990), "2026-11-25T09:46:30Z");
    }

    #[test]
    fn names_that_escape_the_folder_are_refused() {
        for bad in ["", "..", "a/b", ".hidden", "x\0y"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name("TM 01_b-c").is_ok());
    }
}

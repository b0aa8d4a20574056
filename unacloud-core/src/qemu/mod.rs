//! A QEMU/KVM backend of [`Hypervisor`] built on the real `qemu-img`.
//!
//! * A **template** is a base image (qcow2 or raw) registered with
//!   [`Hypervisor::register_disk`] and switched to [`DiskType::MultiAttach`] with
//!   [`Hypervisor::set_disk_type`], which also makes the file read-only (mode `a-w`).
//! * Attaching a multiattach template to a VM creates the VM's own qcow2 **overlay**
//!   (`qemu-img create -f qcow2 -b <template> -F <format>`) in the VM's folder: QEMU's
//!   equivalent of VirtualBox's differencing child.
//! * **Snapshots** of a stopped VM are qcow2 internal snapshots taken on every disk with
//!   `qemu-img snapshot -c/-a/-d` under one unique tag; the tree shape and the user's
//!   names are kept in the VM's settings file, because qcow2 stores a flat list.
//! * **Inspection** uses `qemu-img info --backing-chain --output=json`: the snapshot tree
//!   ([`Hypervisor::snapshot_tree`]) and the files to move ([`Hypervisor::vm_files`],
//!   a [`MigrationSet`] whose templates are "expected at destination").
//! * A VM's **settings** (name, uuid, cores, memory, bridged adapter, disk slots,
//!   snapshots) are a small JSON file `<folder>/<name>/<name>.vm.json`, written
//!   atomically; the backend root holds `registry.json` listing registered VMs and disks.
//!
//! **Not supported:** running VMs. Starting, pausing, saving state and guest commands
//! need `qemu-system-*` and its QMP socket, which this backend does not drive; those
//! calls return [`Error::Unsupported`] with the reason. VMs managed here are therefore
//! always powered off, and [`Hypervisor::power_off`] / [`Hypervisor::resume`] report
//! [`Error::InvalidState`].
//!
//! ```no_run
//! # async fn demo() -> unacloud_core::Result<()> {
//! use unacloud_core::hypervisor::{AttachSpec, DiskRef, Hypervisor};
//! use unacloud_core::model::{DiskType, HardwareProfile, VmSpec};
//! use unacloud_core::qemu::QemuHypervisor;
//!
//! let hv = QemuHypervisor::open("/var/lib/unacloud/host").await?;
//! let base = hv.register_disk("/var/lib/unacloud/templates/ubuntu-1.qcow2".as_ref()).await?;
//! hv.set_disk_type(&DiskRef::Uuid(base.uuid), DiskType::MultiAttach).await?;
//! let vm = hv.create_vm(&VmSpec::new("TM", HardwareProfile::Small)).await?;
//! let overlay = hv
//!     .attach_disk(&vm.name.as_str().into(), &AttachSpec::sata(DiskRef::Uuid(base.uuid)))
//!     .await?;
//! assert_eq!(overlay.parent, Some(base.uuid));
//! # Ok(()) }
//! ```

mod img;
mod settings;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::Mutex;

pub use img::{parse_info, ImageInfo, ImageSnapshot, QemuImg};
pub use settings::{BaseRef, DiskSlot, SnapshotMeta, VmSettings};

use crate::error::{Error, Result};
use crate::files::{ExpectedFile, FileRole, MigrationSet, VmFile};
use crate::hypervisor::{
    AttachSpec, CloneSpec, DiskRef, GuestCommand, GuestOutput, Hypervisor, SnapshotRef, StartMode,
};
use crate::model::{
    DiskAttachment, DiskFormat, DiskInfo, DiskType, PowerState, Uuid, VmId, VmInfo, VmSpec,
};
use crate::tree::{NodeId, Snapshot, SnapshotTree};
use img::BACKEND;
use settings::{validate_name, Registry, SETTINGS_FORMAT};

const RUN_REASON: &str = "running VMs needs qemu-system and its QMP socket, which this backend \
     does not drive (it manages images, snapshots of stopped VMs and settings with qemu-img)";

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
struct State {
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
    state: Mutex<State>,
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
        let root = root.as_ref().to_path_buf();
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
        let registry = Registry::load(&root.join("registry.json"))?;
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
        Ok(QemuHypervisor {
            vm_folder: root.join("vms"),
            root,
            img,
            durable: true,
            state: Mutex::new(State { registry, vms }),
            _lock: lock,
        })
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
        let mut st = self.state.lock().await;
        find_mut(&mut st, vm)?.update(self.durable, |s| s.template = template)
    }

    /// Applies `change` to a copy of the registry, saves it, and only then keeps it.
    fn update_registry(&self, st: &mut State, change: impl FnOnce(&mut Registry)) -> Result<()> {
        let mut reg = st.registry.clone();
        change(&mut reg);
        reg.save(&self.root.join("registry.json"), self.durable)?;
        st.registry = reg;
        Ok(())
    }

    /// VMs managed here are always powered off: `operation`, which needs a running VM,
    /// is refused (after checking that `vm` exists).
    async fn refuse_powered_off(&self, vm: &VmId, operation: &'static str) -> Result<()> {
        let st = self.state.lock().await;
        Err(Error::InvalidState {
            operation,
            id: find(&st, vm)?.settings.name.clone(),
            state: PowerState::PoweredOff.to_string(),
        })
    }

    fn unsupported(operation: &'static str) -> Error {
        Error::Unsupported {
            backend: BACKEND.to_owned(),
            operation,
            reason: RUN_REASON.to_owned(),
        }
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

fn find_mut<'a>(st: &'a mut State, vm: &VmId) -> Result<&'a mut Entry> {
    let name = find(st, vm)?.settings.name.clone();
    st.vms.get_mut(&name).ok_or_else(|| Error::NotFound {
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
        id: format!("{disk} (register it with register_disk first)"),
    })
}

fn info_of(e: &Entry) -> VmInfo {
    VmInfo {
        name: e.settings.name.clone(),
        uuid: Some(e.settings.uuid),
        state: PowerState::PoweredOff,
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

fn fresh_tag() -> String {
    format!("uc-{}", Uuid::new_v4().simple())
}

/// Formats Unix seconds as an ISO 8601 UTC time stamp.
fn iso8601(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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

#[async_trait]
impl Hypervisor for QemuHypervisor {
    fn backend(&self) -> &str {
        BACKEND
    }

    async fn list_vms(&self) -> Result<Vec<VmInfo>> {
        let st = self.state.lock().await;
        Ok(st.vms.values().map(info_of).collect())
    }

    async fn vm_info(&self, vm: &VmId) -> Result<VmInfo> {
        let st = self.state.lock().await;
        find(&st, vm).map(info_of)
    }

    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        validate_name(&spec.name)?;
        let mut st = self.state.lock().await;
        if st.vms.contains_key(&spec.name) {
            return Err(Error::AlreadyExists {
                kind: "vm",
                id: spec.name.clone(),
            });
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
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        let settings = VmSettings {
            format: SETTINGS_FORMAT.to_owned(),
            uuid: Uuid::new_v4(),
            name: spec.name.clone(),
            cores: spec.profile.cores(),
            memory_mb: spec.profile.memory_mb(),
            os_type: spec.os_type.clone(),
            bridge_adapter: spec.bridge_adapter.clone(),
            disks: Vec::new(),
            snapshots: Vec::new(),
            current_snapshot: None,
            template: None,
        };
        let res = settings.save(&settings_file, self.durable).and_then(|()| {
            self.update_registry(&mut st, |reg| reg.vms.push(settings_file.clone()))
        });
        if let Err(e) = res {
            let _ = std::fs::remove_file(&settings_file);
            if created_folder {
                let _ = std::fs::remove_dir(&folder);
            }
            return Err(e);
        }
        Ok(st.add_vm(settings_file, settings))
    }

    async fn register_vm(&self, settings_path: &Path) -> Result<VmInfo> {
        let settings_file =
            std::fs::canonicalize(settings_path).map_err(|e| Error::io(settings_path, e))?;
        let mut settings = VmSettings::load(&settings_file)?;
        let folder = settings_file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut st = self.state.lock().await;
        if let Some(e) = st.vms.get(&settings.name) {
            return Err(Error::AlreadyExists {
                kind: "vm",
                id: format!("{} ({})", settings.name, e.settings_file.display()),
            });
        }
        let known = all_disks(&st);
        let mut changed = false;
        for slot in &mut settings.disks {
            if !slot.own {
                // A shared image: it must be registered here already.
                if !st.registry.disks.iter().any(|d| d.uuid == slot.uuid) {
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
                continue;
            }
            let path = VmSettings::disk_path(&folder, slot);
            if !path.exists() {
                return Err(Error::NotFound {
                    kind: "disk image",
                    id: format!("{} of VM {}", path.display(), settings.name),
                });
            }
            if known.iter().any(|d| d.uuid == slot.uuid) {
                return Err(Error::AlreadyExists {
                    kind: "disk",
                    id: slot.uuid.to_string(),
                });
            }
            if let Some(base) = &mut slot.base {
                let multiattach = || {
                    st.registry
                        .disks
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
                let info = self.img.info(&path).await?;
                let current = info.full_backing_filename.or(info.backing_filename);
                if current.as_deref().map(Path::new) != Some(local.location.as_path()) {
                    self.img
                        .rebase_unsafe(&path, &local.location, &base.format)
                        .await?;
                }
                if base.uuid != local.uuid || base.path != local.location {
                    base.uuid = local.uuid;
                    base.path = local.location.clone();
                    changed = true;
                }
            }
        }
        if changed {
            settings.save(&settings_file, self.durable)?;
        }
        self.update_registry(&mut st, |reg| reg.vms.push(settings_file.clone()))?;
        Ok(st.add_vm(settings_file, settings))
    }

    async fn unregister_vm(&self, vm: &VmId, delete_files: bool) -> Result<()> {
        let mut st = self.state.lock().await;
        let entry = find(&st, vm)?;
        let name = entry.settings.name.clone();
        let settings_file = entry.settings_file.clone();
        let folder = entry.folder();
        let own: Vec<PathBuf> = entry
            .settings
            .disks
            .iter()
            .filter(|d| d.own)
            .map(|d| VmSettings::disk_path(&folder, d))
            .collect();
        self.update_registry(&mut st, |reg| reg.vms.retain(|p| *p != settings_file))?;
        st.vms.remove(&name);
        drop(st);
        if delete_files {
            for p in &own {
                remove_if_exists(p)?;
            }
            remove_if_exists(&settings_file)?;
            // Leaves the folder if anything else is in it.
            let _ = std::fs::remove_dir(&folder);
        }
        Ok(())
    }

    async fn clone_vm(&self, source: &VmId, spec: &CloneSpec) -> Result<VmInfo> {
        validate_name(&spec.name)?;
        let (src, src_folder) = {
            let st = self.state.lock().await;
            if st.vms.contains_key(&spec.name) {
                return Err(Error::AlreadyExists {
                    kind: "vm",
                    id: spec.name.clone(),
                });
            }
            let e = find(&st, source)?;
            (e.settings.clone(), e.folder())
        };
        let tag = match &spec.snapshot {
            Some(sel) => {
                let tree = tree_from_settings(&src);
                let node = tree.resolve(sel)?;
                tree.get(node).map(|s| s.id.clone())
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
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        let result = async {
            let mut slots = Vec::new();
            for d in &src.disks {
                let from = VmSettings::disk_path(&src_folder, d);
                let file = own_image_file(&spec.name, &d.controller, d.port, d.device);
                let to = folder.join(&file);
                tokio::fs::copy(&from, &to)
                    .await
                    .map_err(|e| Error::io(&to, e))?;
                set_writable(&to, true)?;
                if let Some(t) = &tag {
                    self.img.snapshot_apply(&to, t).await?;
                }
                for s in &src.snapshots {
                    self.img.snapshot_delete(&to, &s.tag).await?;
                }
                slots.push(DiskSlot {
                    file,
                    uuid: Uuid::new_v4(),
                    own: true,
                    ..d.clone()
                });
            }
            let settings = VmSettings {
                uuid: Uuid::new_v4(),
                name: spec.name.clone(),
                disks: slots,
                snapshots: Vec::new(),
                current_snapshot: None,
                ..src.clone()
            };
            let settings_file = folder.join(format!("{}.vm.json", spec.name));
            settings.save(&settings_file, self.durable)?;
            let mut st = self.state.lock().await;
            if st.vms.contains_key(&spec.name) {
                return Err(Error::AlreadyExists {
                    kind: "vm",
                    id: spec.name.clone(),
                });
            }
            self.update_registry(&mut st, |reg| reg.vms.push(settings_file.clone()))?;
            Ok(st.add_vm(settings_file, settings))
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&folder);
        }
        result
    }

    async fn start_vm(&self, _vm: &VmId, _mode: StartMode) -> Result<()> {
        Err(Self::unsupported("start VM"))
    }

    async fn power_off(&self, vm: &VmId) -> Result<()> {
        self.refuse_powered_off(vm, "power off").await
    }

    async fn save_state(&self, _vm: &VmId) -> Result<()> {
        Err(Self::unsupported("save VM state"))
    }

    async fn pause(&self, _vm: &VmId) -> Result<()> {
        Err(Self::unsupported("pause VM"))
    }

    async fn resume(&self, vm: &VmId) -> Result<()> {
        self.refuse_powered_off(vm, "resume").await
    }

    async fn take_snapshot(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        _live: bool,
    ) -> Result<SnapshotRef> {
        let mut st = self.state.lock().await;
        let e = find_mut(&mut st, vm)?;
        if e.settings.disks.is_empty() {
            return Err(Error::InvalidState {
                operation: "take snapshot of",
                id: e.settings.name.clone(),
                state: "without disks".to_owned(),
            });
        }
        let tag = fresh_tag();
        let mut done: Vec<PathBuf> = Vec::new();
        for p in e.disk_paths() {
            if let Err(err) = self.img.snapshot_create(&p, &tag).await {
                for q in &done {
                    let _ = self.img.snapshot_delete(q, &tag).await;
                }
                return Err(err);
            }
            done.push(p);
        }
        let recorded = e.update(self.durable, |s| {
            s.snapshots.push(SnapshotMeta {
                tag: tag.clone(),
                name: name.to_owned(),
                description: description.map(str::to_owned),
                parent: s.current_snapshot.clone(),
            });
            s.current_snapshot = Some(tag.clone());
        });
        if let Err(err) = recorded {
            for q in &done {
                let _ = self.img.snapshot_delete(q, &tag).await;
            }
            return Err(err);
        }
        Ok(SnapshotRef {
            id: tag,
            name: name.to_owned(),
        })
    }

    async fn restore_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        let mut st = self.state.lock().await;
        let e = find_mut(&mut st, vm)?;
        let tag = snapshot_tag(&e.settings, snapshot)?;
        for p in e.disk_paths() {
            self.img.snapshot_apply(&p, &tag).await?;
        }
        e.update(self.durable, |s| s.current_snapshot = Some(tag))
    }

    async fn delete_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        let mut st = self.state.lock().await;
        let e = find_mut(&mut st, vm)?;
        let tag = snapshot_tag(&e.settings, snapshot)?;
        for p in e.disk_paths() {
            self.img.snapshot_delete(&p, &tag).await?;
        }
        e.update(self.durable, |s| {
            let parent = s
                .snapshots
                .iter()
                .find(|m| m.tag == tag)
                .and_then(|m| m.parent.clone());
            s.snapshots.retain(|m| m.tag != tag);
            for m in &mut s.snapshots {
                if m.parent.as_deref() == Some(tag.as_str()) {
                    m.parent = parent.clone();
                }
            }
            if s.current_snapshot.as_deref() == Some(tag.as_str()) {
                s.current_snapshot = parent;
            }
        })
    }

    async fn snapshot_tree(&self, vm: &VmId) -> Result<SnapshotTree> {
        let (settings, first_disk) = {
            let st = self.state.lock().await;
            let e = find(&st, vm)?;
            let first_disk = e.disk_paths().next();
            (e.settings.clone(), first_disk)
        };
        let Some(disk) = first_disk else {
            return Ok(tree_from_settings(&settings));
        };
        let info = self.img.info(&disk).await?;
        Ok(tree_from_image(&settings, &info.snapshots))
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
        let mut st = self.state.lock().await;
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
        self.update_registry(&mut st, |reg| reg.disks.push(disk.clone()))?;
        Ok(disk)
    }

    async fn unregister_disk(&self, disk: &DiskRef, delete_file: bool) -> Result<()> {
        let mut st = self.state.lock().await;
        let d = find_disk(&st, disk)?;
        let users = users_of(&st, d.uuid);
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
        self.update_registry(&mut st, |reg| reg.disks.retain(|x| x.uuid != d.uuid))?;
        if delete_file {
            remove_if_exists(&d.location)?;
        }
        Ok(())
    }

    async fn set_disk_type(&self, disk: &DiskRef, disk_type: DiskType) -> Result<()> {
        let mut st = self.state.lock().await;
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
        let users = users_of(&st, d.uuid);
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
        let recorded = self.update_registry(&mut st, |reg| {
            for x in &mut reg.disks {
                if x.uuid == d.uuid {
                    x.disk_type = disk_type;
                }
            }
        });
        if let Err(e) = recorded {
            let _ = set_writable(&d.location, d.disk_type == DiskType::Normal);
            return Err(e);
        }
        Ok(())
    }

    async fn attach_disk(&self, vm: &VmId, spec: &AttachSpec) -> Result<DiskInfo> {
        let mut st = self.state.lock().await;
        let disk = find_disk(&st, &spec.disk)?;
        let users = users_of(&st, disk.uuid);
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
        let folder = e.folder();
        let settings_file = e.settings_file.clone();
        let mut settings = e.settings.clone();
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
            self.img
                .create_overlay(&overlay, &disk.location, &fmt)
                .await?;
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
            if disk.disk_type == DiskType::Normal && !users.is_empty() {
                return Err(Error::InUse {
                    id: disk.location.display().to_string(),
                    users,
                });
            }
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
        // The overlay is recorded in the VM's settings only (one atomic write).
        if let Err(err) = settings.save(&settings_file, self.durable) {
            if let Some(d) = &new_disk {
                let _ = std::fs::remove_file(&d.location);
            }
            return Err(err);
        }
        let e = find_mut(&mut st, vm)?;
        e.settings = settings;
        Ok(new_disk.unwrap_or(disk))
    }

    async fn guest_run(&self, _vm: &VmId, _command: &GuestCommand) -> Result<GuestOutput> {
        Err(Self::unsupported("run guest command"))
    }

    /// Walks each own disk's real backing chain (`qemu-img info --backing-chain`):
    /// the VM's images are copied, a registered multiattach template ends the walk as
    /// "expected at destination", anything else is reported as external.
    async fn vm_files(&self, vm: &VmId) -> Result<MigrationSet> {
        let (settings_file, folder, disks, registered) = {
            let st = self.state.lock().await;
            let e = find(&st, vm)?;
            let folder = e.folder();
            let disks: Vec<(DiskSlot, PathBuf)> = e
                .settings
                .disks
                .iter()
                .map(|d| (d.clone(), VmSettings::disk_path(&folder, d)))
                .collect();
            (
                e.settings_file.clone(),
                folder,
                disks,
                st.registry.disks.clone(),
            )
        };
        let len = |p: &Path| std::fs::metadata(p).ok().map(|m| m.len());
        let mut set = MigrationSet::default();
        set.push(VmFile::new(
            settings_file.clone(),
            FileRole::Settings,
            None,
            len(&settings_file),
        ));
        let expect = |set: &mut MigrationSet, uuid: Uuid, path: &Path| {
            if !set
                .expected_at_destination
                .iter()
                .any(|x| x.uuid == uuid.to_string())
            {
                set.expected_at_destination.push(ExpectedFile {
                    uuid: uuid.to_string(),
                    path: Some(path.to_path_buf()),
                });
            }
        };
        for (slot, path) in disks {
            if !slot.own {
                set.external.push(format!(
                    "shared image {} ({}) is not copied",
                    path.display(),
                    slot.uuid
                ));
                continue;
            }
            let own_file = |bytes| {
                VmFile::new(
                    path.clone(),
                    FileRole::Disk,
                    Some(slot.uuid.to_string()),
                    bytes,
                )
            };
            let chain = match self.img.info_chain(&path).await {
                Ok(chain) => chain,
                Err(e) => {
                    set.warnings
                        .push(format!("cannot inspect {}: {e}", path.display()));
                    set.push(own_file(len(&path)));
                    if let Some(b) = &slot.base {
                        expect(&mut set, b.uuid, &b.path);
                    }
                    continue;
                }
            };
            set.push(own_file(len(&path)));
            for image in chain.iter().skip(1) {
                let p = PathBuf::from(&image.filename);
                if let Some(t) = registered
                    .iter()
                    .find(|d| d.location == p && d.disk_type == DiskType::MultiAttach)
                {
                    expect(&mut set, t.uuid, &t.location);
                    break;
                }
                if p.starts_with(&folder) {
                    set.push(VmFile::new(p.clone(), FileRole::Disk, None, len(&p)));
                } else {
                    set.external.push(format!(
                        "backing image {} of {} is neither the VM's own nor a registered \
                         multiattach template; it is not copied",
                        p.display(),
                        path.display()
                    ));
                    break;
                }
            }
        }
        let missing: Vec<String> = set
            .missing()
            .map(|f| format!("file {} is missing", f.path.display()))
            .collect();
        for msg in missing {
            if !set.warnings.contains(&msg) {
                set.warnings.push(msg);
            }
        }
        Ok(set)
    }
}

/// The qemu-img tag of the snapshot a user names (tag or unique name).
fn snapshot_tag(settings: &VmSettings, selector: &str) -> Result<String> {
    let tree = tree_from_settings(settings);
    let node = tree.resolve(selector)?;
    Ok(tree.get(node).map(|s| s.id.clone()).unwrap_or_default())
}

/// The tree recorded in the settings.
fn tree_from_settings(s: &VmSettings) -> SnapshotTree {
    tree_from_image(s, &[])
}

/// The tree recorded in the settings, checked against the image's snapshot list when
/// `image` is not empty: snapshots the image lacks are left out (their children move up),
/// snapshots only the image has are added as roots named by their tag.
fn tree_from_image(s: &VmSettings, image: &[ImageSnapshot]) -> SnapshotTree {
    let check = !image.is_empty();
    let present = |tag: &str| !check || image.iter().any(|i| i.name == tag);
    let mut tree = SnapshotTree::new();
    let mut nodes: BTreeMap<&str, NodeId> = BTreeMap::new();
    for m in &s.snapshots {
        if !present(&m.tag) {
            continue;
        }
        let mut snap = Snapshot::new(m.tag.clone(), m.name.clone());
        snap.description = m.description.clone();
        if let Some(i) = image.iter().find(|i| i.name == m.tag) {
            snap.time_stamp = Some(iso8601(i.date_sec));
        }
        let added = match nearest_in_tree(s, &nodes, m.parent.as_deref()) {
            Some(parent) => tree.add_child(parent, snap),
            None => tree.add_root(snap),
        };
        if let Ok(n) = added {
            nodes.insert(m.tag.as_str(), n);
        }
    }
    for i in image {
        if !s.snapshots.iter().any(|m| m.tag == i.name) {
            let mut snap = Snapshot::new(i.name.clone(), i.name.clone());
            snap.time_stamp = Some(iso8601(i.date_sec));
            let _ = tree.add_root(snap);
        }
    }
    tree.set_current(nearest_in_tree(s, &nodes, s.current_snapshot.as_deref()));
    tree
}

/// The node of the snapshot tagged `tag`, or else of its nearest recorded ancestor that
/// is in the tree (`nodes`); the walk up is bounded, so a parent cycle ends it.
fn nearest_in_tree<'a>(
    s: &'a VmSettings,
    nodes: &BTreeMap<&'a str, NodeId>,
    mut tag: Option<&'a str>,
) -> Option<NodeId> {
    let mut hops = 0;
    while let Some(t) = tag {
        if nodes.contains_key(t) || hops > s.snapshots.len() {
            break;
        }
        tag = s
            .snapshots
            .iter()
            .find(|m| m.tag == t)
            .and_then(|m| m.parent.as_deref());
        hops += 1;
    }
    tag.and_then(|t| nodes.get(t)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_matches_known_instants() {
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

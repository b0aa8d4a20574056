//! `unacloud.hv`: a hypervisor object over unacloud-core's `Hypervisor` trait, with the
//! QEMU backend (real VMs), the in-memory double (for tests) and VirtualBox.
//!
//! Every call runs the trait's async method on a tokio runtime the object owns, with the
//! GIL released, and can be interrupted with Ctrl-C (see [`crate::runtime::block_on`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyString};
use unacloud_core::hypervisor::{AttachSpec, DiskRef, Hypervisor as RsHypervisor, StartMode};
use unacloud_core::memory::InMemoryHypervisor;
use unacloud_core::model::{DiskType, HardwareProfile, Uuid, VmId, VmSpec};
use unacloud_core::qemu::{
    mac_for, Accel, BootFiles, NetConfig, QemuHypervisor, QemuImg, QemuSystem, StartOptions,
};
use unacloud_vbox::manage::{runner::locate_vboxmanage, TokioRunner, VBoxManageHypervisor};

use crate::convert::to_py;
use crate::errors::{core_err, invalid, raise};
use crate::runtime::{block_on, new_runtime};
use crate::vbox::MigrationSet;

mod values;
pub use values::{Disk, SnapshotNode, SnapshotTree, VmInfo};

/// How long `start_vm(wait_guest=True)` waits for the guest's first heartbeat.
const DEFAULT_BOOT_WAIT: Duration = Duration::from_secs(120);

/// A hypervisor: `qemu`, `memory` or `virtualbox` (see `unacloud.hv.open`).
#[pyclass(module = "unacloud.hv", frozen)]
pub struct Hypervisor {
    hv: Option<Arc<dyn RsHypervisor>>,
    qemu: Option<Arc<QemuHypervisor>>,
    kind: &'static str,
    root: Option<PathBuf>,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hypervisor")
            .field("kind", &self.kind)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        // The backend is dropped inside its runtime (its tasks and child processes
        // belong to it), then the runtime.
        let _inside = self.rt.enter();
        self.qemu.take();
        self.hv.take();
    }
}

/// The backend's name as Python spells it.
fn kind_of(backend: &str) -> PyResult<&'static str> {
    match backend {
        "qemu" => Ok("qemu"),
        "memory" | "in-memory" => Ok("memory"),
        "virtualbox" | "vbox" => Ok("virtualbox"),
        other => Err(invalid(format!(
            "unknown backend {other:?}; expected \"qemu\", \"memory\" or \"virtualbox\""
        ))),
    }
}

/// Opens a hypervisor. `backend`: `"qemu"` (runs VMs; `root` is the host root folder
/// that holds its registry and VMs, created if missing; `accel` is `auto`, `kvm` or
/// `tcg`), `"memory"` (the in-memory double: touches no files, runs nothing; `root`,
/// if given, is where its VMs' settings paths point) or `"virtualbox"` (through
/// `VBoxManage`; `root`, if given, is the folder new VMs are created in; raises
/// `Unsupported` when VirtualBox is not installed).
#[pyfunction]
#[pyo3(signature = (backend, root=None, *, accel="auto"))]
pub fn open(
    py: Python<'_>,
    backend: &str,
    root: Option<PathBuf>,
    accel: &str,
) -> PyResult<Hypervisor> {
    let kind = kind_of(backend)?;
    let accel: Accel = accel.parse().map_err(core_err)?;
    let rt = new_runtime()?;
    let (hv, qemu): (Arc<dyn RsHypervisor>, Option<Arc<QemuHypervisor>>) = match kind {
        "qemu" => {
            let root = root
                .clone()
                .ok_or_else(|| invalid("the qemu backend needs a root folder (root=...)"))?;
            let system = QemuSystem::new().with_accel(accel);
            let q = block_on(py, &rt, async move {
                QemuHypervisor::open_configured(&root, QemuImg::new(), system).await
            })?
            .map_err(core_err)?;
            let q = Arc::new(q);
            (q.clone(), Some(q))
        }
        "memory" => (Arc::new(InMemoryHypervisor::new()), None),
        _ => {
            let program = locate_vboxmanage(std::env::var_os("PATH")).ok_or_else(|| {
                raise(
                    "Unsupported",
                    "VirtualBox is not installed: no VBoxManage on PATH (install \
                     VirtualBox, or use the \"qemu\" or \"memory\" backend)"
                        .to_owned(),
                )
            })?;
            let runner = Arc::new(TokioRunner::new(program));
            (Arc::new(VBoxManageHypervisor::new(runner)), None)
        }
    };
    Ok(Hypervisor {
        hv: Some(hv),
        qemu,
        kind,
        root: match kind {
            "qemu" => root.as_deref().map(canonical),
            _ => root,
        },
        rt,
    })
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A VM argument: its name (or uuid) as a string, or a `VmInfo`.
pub(crate) fn vm_id(obj: &Bound<'_, PyAny>) -> PyResult<VmId> {
    if let Ok(v) = obj.downcast::<VmInfo>() {
        return Ok(VmId::from(v.get().inner.name.as_str()));
    }
    if let Ok(s) = obj.downcast::<PyString>() {
        return Ok(VmId::from(s.to_cow()?.into_owned()));
    }
    Err(PyTypeError::new_err(format!(
        "vm must be a name (str) or a VmInfo, not {}",
        obj.get_type().name()?
    )))
}

/// A snapshot argument: its id or unique name, or a `SnapshotNode`.
fn snapshot_sel(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(n) = obj.downcast::<SnapshotNode>() {
        return Ok(n.get().snap().id.clone());
    }
    if let Ok(s) = obj.downcast::<PyString>() {
        return Ok(s.to_cow()?.into_owned());
    }
    Err(PyTypeError::new_err(format!(
        "snapshot must be an id or name (str) or a SnapshotNode, not {}",
        obj.get_type().name()?
    )))
}

/// A disk argument: a `Disk`, a uuid string, or a path (str or `os.PathLike`).
pub(crate) fn disk_ref(obj: &Bound<'_, PyAny>) -> PyResult<DiskRef> {
    if let Ok(d) = obj.downcast::<Disk>() {
        return Ok(DiskRef::Uuid(d.get().inner.uuid));
    }
    if let Ok(s) = obj.downcast::<PyString>() {
        let s = s.to_cow()?;
        return Ok(match Uuid::try_parse(s.trim()) {
            Ok(u) => DiskRef::Uuid(u),
            Err(_) => DiskRef::Path(PathBuf::from(s.as_ref())),
        });
    }
    obj.extract::<PathBuf>().map(DiskRef::Path).map_err(|_| {
        PyTypeError::new_err(
            "template must be a Disk, a disk uuid or an image path (str or os.PathLike)",
        )
    })
}

/// `wait_guest`: True (the default limit), False, or a number of seconds.
fn wait_limit(obj: &Bound<'_, PyAny>) -> PyResult<Option<Duration>> {
    if let Ok(b) = obj.downcast::<PyBool>() {
        return Ok(b.is_true().then_some(DEFAULT_BOOT_WAIT));
    }
    let s = crate::args::seconds(obj, "wait_guest")?;
    Ok(Some(Duration::from_secs_f64(s)))
}

impl Hypervisor {
    pub(crate) fn hv(&self) -> PyResult<Arc<dyn RsHypervisor>> {
        self.hv
            .clone()
            .ok_or_else(|| raise("InvalidState", "the hypervisor is closed".to_owned()))
    }

    /// Runs `f(backend)` to completion, GIL released; maps the core error.
    pub(crate) fn call<T, F, Fut>(&self, py: Python<'_>, f: F) -> PyResult<T>
    where
        F: FnOnce(Arc<dyn RsHypervisor>) -> Fut,
        Fut: std::future::Future<Output = unacloud_core::Result<T>> + Send,
        T: Send,
    {
        let hv = self.hv()?;
        block_on(py, &self.rt, f(hv))?.map_err(core_err)
    }

    fn disk_info(&self, py: Python<'_>, uuid: Uuid) -> PyResult<Disk> {
        let disks = self.call(py, |hv| async move { hv.list_disks().await })?;
        disks
            .into_iter()
            .find(|d| d.uuid == uuid)
            .map(|inner| Disk { inner })
            .ok_or_else(|| raise("NotFound", format!("disk not found: {uuid}")))
    }

    fn base_folder(&self) -> Option<PathBuf> {
        match self.kind {
            "qemu" => None,
            _ => self.root.clone(),
        }
    }
}

/// Parses `net` for a backend. QEMU: `none`, `user` or `tap:<netns>:<ifname>:<ip/prefix>`;
/// VirtualBox: `nat` or `bridged:<host interface>`; the in-memory double accepts both
/// forms and records nothing (it has no network).
enum Net {
    Default,
    Qemu(String),
    Bridged(String),
}

fn parse_net(kind: &str, net: Option<&str>) -> PyResult<Net> {
    let Some(text) = net else {
        return Ok(Net::Default);
    };
    let qemu_form = |t: &str| {
        NetConfig::parse(t, "02:00:00:00:00:01")
            .map(|_| Net::Qemu(t.to_owned()))
            .map_err(core_err)
    };
    let vbox_form = |t: &str| match t.strip_prefix("bridged:") {
        Some(ifname) if !ifname.is_empty() => Ok(Net::Bridged(ifname.to_owned())),
        _ if t == "nat" => Ok(Net::Default),
        _ => Err(invalid(format!(
            "net {t:?}: VirtualBox takes \"nat\" or \"bridged:<host interface>\""
        ))),
    };
    match kind {
        "qemu" => qemu_form(text),
        "virtualbox" => vbox_form(text),
        _ => vbox_form(text)
            .or_else(|_| qemu_form(text))
            .map(|_| Net::Default),
    }
}

#[pymethods]
impl Hypervisor {
    /// `"qemu"`, `"memory"` or `"virtualbox"`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.kind
    }

    /// The root folder given to `open` (absolute for qemu), or None.
    #[getter]
    fn root(&self) -> Option<String> {
        self.root.as_ref().map(|p| p.display().to_string())
    }

    /// Registers an existing disk image (trait `register_disk`); with `multiattach`
    /// (the default) it becomes a template that every VM attaches through its own
    /// differencing child (`set_disk_type(MultiAttach)`). QEMU only: `kernel`, `initrd`
    /// and `cmdline` boot a template without a boot loader (`set_boot_files`), as the
    /// reference guest image needs.
    #[pyo3(signature = (path, multiattach=true, *, kernel=None, initrd=None, cmdline=None))]
    fn register_disk(
        &self,
        py: Python<'_>,
        path: PathBuf,
        multiattach: bool,
        kernel: Option<PathBuf>,
        initrd: Option<PathBuf>,
        cmdline: Option<String>,
    ) -> PyResult<Disk> {
        let boot = match (kernel, &self.qemu) {
            (None, _) => {
                if initrd.is_some() || cmdline.is_some() {
                    return Err(invalid("initrd and cmdline need a kernel"));
                }
                None
            }
            (Some(kernel), Some(_)) => Some(BootFiles {
                kernel,
                initrd,
                cmdline,
            }),
            (Some(_), None) => {
                return Err(raise(
                    "Unsupported",
                    format!(
                        "{}: boot files (kernel=) are a qemu backend setting",
                        self.kind
                    ),
                ))
            }
        };
        // Checked before anything is registered, so a typo leaves nothing behind.
        if let Some(b) = &boot {
            for f in std::iter::once(&b.kernel).chain(b.initrd.iter()) {
                if !f.is_file() {
                    return Err(crate::errors::missing_file(
                        f,
                        format!("boot file not found: {}", f.display()),
                    ));
                }
            }
        }
        if self.kind != "memory" && !path.exists() {
            return Err(crate::errors::missing_file(
                &path,
                format!("disk image not found: {}", path.display()),
            ));
        }
        let d = self.call(py, |hv| async move { hv.register_disk(&path).await })?;
        let r = DiskRef::Uuid(d.uuid);
        if multiattach {
            let r = r.clone();
            self.call(py, |hv| async move {
                hv.set_disk_type(&r, DiskType::MultiAttach).await
            })?;
        }
        if let (Some(boot), Some(q)) = (boot, self.qemu.clone()) {
            block_on(
                py,
                &self.rt,
                async move { q.set_boot_files(&r, boot).await },
            )?
            .map_err(core_err)?;
        }
        self.disk_info(py, d.uuid)
    }

    /// Every registered disk (trait `list_disks`).
    fn list_disks(&self, py: Python<'_>) -> PyResult<Vec<Disk>> {
        let disks = self.call(py, |hv| async move { hv.list_disks().await })?;
        Ok(disks.into_iter().map(|inner| Disk { inner }).collect())
    }

    /// Creates a VM (trait `create_vm`) with `memory_mb` MiB and `cpus` virtual CPUs
    /// (default: the `profile`'s), attaches `template` (a `Disk`, uuid or path; trait
    /// `attach_disk` on a SATA port: a multiattach template gets a differencing child)
    /// and connects its network (`net`, see the module docs). If a step after the
    /// creation fails, the VM is unregistered with its files and the error raised.
    #[pyo3(signature = (name, template=None, memory_mb=None, cpus=None, net=None, profile="small"))]
    #[allow(clippy::too_many_arguments)]
    fn create_vm(
        &self,
        py: Python<'_>,
        name: &str,
        template: Option<&Bound<'_, PyAny>>,
        #[pyo3(from_py_with = crate::args::opt_memory_mb)] memory_mb: Option<u64>,
        #[pyo3(from_py_with = crate::args::cpus)] cpus: Option<u32>,
        net: Option<&str>,
        profile: &str,
    ) -> PyResult<VmInfo> {
        let profile: HardwareProfile = profile.parse().map_err(core_err)?;
        let mut spec = VmSpec::new(name, profile);
        if let Some(m) = memory_mb {
            if m == 0 {
                return Err(invalid("memory_mb must be at least 1"));
            }
            spec = spec.with_memory_mb(m);
        }
        if let Some(c) = cpus {
            if c == 0 {
                return Err(invalid("cpus must be at least 1"));
            }
            spec = spec.with_cores(c);
        }
        spec.base_folder = self.base_folder();
        let net = parse_net(self.kind, net)?;
        if let Net::Bridged(ifname) = &net {
            spec.bridge_adapter = Some(ifname.clone());
        }
        let template = template
            .filter(|t| !t.is_none())
            .map(disk_ref)
            .transpose()?;
        let created = self.call(py, |hv| async move { hv.create_vm(&spec).await })?;
        let id = VmId::from(created.name.as_str());
        let rest = (|| -> PyResult<()> {
            if let Some(t) = template {
                let id = id.clone();
                self.call(py, |hv| async move {
                    hv.attach_disk(&id, &AttachSpec::sata(t)).await
                })?;
            }
            if let (Net::Qemu(text), Some(q)) = (&net, self.qemu.clone()) {
                let uuid = created.uuid.unwrap_or_else(Uuid::nil);
                let cfg = NetConfig::parse(text, &mac_for(&uuid)).map_err(core_err)?;
                let id = id.clone();
                block_on(
                    py,
                    &self.rt,
                    async move { q.set_vm_network(&id, cfg).await },
                )?
                .map_err(core_err)?;
            }
            Ok(())
        })();
        if let Err(e) = rest {
            let id2 = id.clone();
            // Best effort: the original error is what the caller needs to see.
            let _ = self.call(py, |hv| async move { hv.unregister_vm(&id2, true).await });
            return Err(e);
        }
        self.call(py, |hv| async move { hv.vm_info(&id).await })
            .map(|inner| VmInfo { inner })
    }

    /// Unregisters a VM (trait `unregister_vm`); `delete_files` also deletes its own
    /// files (never a template).
    #[pyo3(signature = (vm, delete_files=false))]
    fn unregister_vm(
        &self,
        py: Python<'_>,
        vm: &Bound<'_, PyAny>,
        delete_files: bool,
    ) -> PyResult<()> {
        let id = vm_id(vm)?;
        self.call(
            py,
            |hv| async move { hv.unregister_vm(&id, delete_files).await },
        )
    }

    /// Starts a VM headless, from its saved state if it has one (trait `start_vm`).
    /// QEMU: with `wait_guest` (True: up to 120 s, or a number of seconds) it returns
    /// once the guest printed its first heartbeat, and returns the start report as a
    /// dict (`pid`, `accel`, `boot_ms`, `running_ms`, `resumed_state`, …;
    /// `QemuHypervisor::start_vm_with`). Other backends return None and have no guest
    /// to wait for.
    #[pyo3(signature = (vm, wait_guest=Some(DEFAULT_BOOT_WAIT)))]
    #[pyo3(text_signature = "($self, vm, wait_guest=True)")]
    fn start_vm(
        &self,
        py: Python<'_>,
        vm: &Bound<'_, PyAny>,
        #[pyo3(from_py_with = wait_limit)] wait_guest: Option<Duration>,
    ) -> PyResult<Option<PyObject>> {
        let id = vm_id(vm)?;
        let wait = wait_guest;
        if let Some(q) = self.qemu.clone() {
            let report = block_on(py, &self.rt, async move {
                q.start_vm_with(&id, StartOptions { wait_guest: wait })
                    .await
            })?
            .map_err(core_err)?;
            return to_py(py, &report).map(Some);
        }
        self.call(py, |hv| async move {
            hv.start_vm(&id, StartMode::Headless).await
        })?;
        Ok(None)
    }

    /// Pulls the virtual power cord (trait `power_off`).
    fn power_off(&self, py: Python<'_>, vm: &Bound<'_, PyAny>) -> PyResult<()> {
        let id = vm_id(vm)?;
        self.call(py, |hv| async move { hv.power_off(&id).await })
    }

    /// Pauses a running VM (trait `pause`).
    fn pause(&self, py: Python<'_>, vm: &Bound<'_, PyAny>) -> PyResult<()> {
        let id = vm_id(vm)?;
        self.call(py, |hv| async move { hv.pause(&id).await })
    }

    /// Resumes a paused VM (trait `resume`).
    fn resume(&self, py: Python<'_>, vm: &Bound<'_, PyAny>) -> PyResult<()> {
        let id = vm_id(vm)?;
        self.call(py, |hv| async move { hv.resume(&id).await })
    }

    /// Saves the VM's memory and stops it (trait `save_state`).
    fn save_state(&self, py: Python<'_>, vm: &Bound<'_, PyAny>) -> PyResult<()> {
        let id = vm_id(vm)?;
        self.call(py, |hv| async move { hv.save_state(&id).await })
    }

    /// Takes a snapshot (trait `take_snapshot`); `live` keeps a running VM running
    /// while it is taken. Returns the new snapshot's node; on QEMU its `report` holds
    /// `downtime_ms`, `total_ms`, `state_bytes`, … (`take_snapshot_with`).
    #[pyo3(signature = (vm, name, live=true, description=None))]
    fn take_snapshot(
        &self,
        py: Python<'_>,
        vm: &Bound<'_, PyAny>,
        name: &str,
        live: bool,
        description: Option<String>,
    ) -> PyResult<SnapshotNode> {
        let id = vm_id(vm)?;
        let name = name.to_owned();
        let (snap_id, report) = if let Some(q) = self.qemu.clone() {
            let id = id.clone();
            let r = block_on(py, &self.rt, async move {
                q.take_snapshot_with(&id, &name, description.as_deref(), live)
                    .await
            })?
            .map_err(core_err)?;
            let value = serde_json::to_value(&r)
                .map_err(|e| invalid(format!("cannot convert the snapshot report: {e}")))?;
            (r.snapshot.id, Some(value))
        } else {
            let id = id.clone();
            let r = self.call(py, |hv| async move {
                hv.take_snapshot(&id, &name, description.as_deref(), live)
                    .await
            })?;
            (r.id, None)
        };
        let tree = self.call(py, |hv| async move { hv.snapshot_tree(&id).await })?;
        let node = tree
            .find_by_id(&snap_id)
            .ok_or_else(|| raise("NotFound", format!("snapshot not found: {snap_id}")))?;
        Ok(SnapshotNode {
            tree: Arc::new(tree),
            node,
            report,
        })
    }

    /// Restores a snapshot (id, unique name or `SnapshotNode`; trait
    /// `restore_snapshot`); the VM must not be running.
    fn restore_snapshot(
        &self,
        py: Python<'_>,
        vm: &Bound<'_, PyAny>,
        snapshot: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let id = vm_id(vm)?;
        let sel = snapshot_sel(snapshot)?;
        self.call(py, |hv| async move { hv.restore_snapshot(&id, &sel).await })
    }

    /// Deletes a snapshot, merging its images (trait `delete_snapshot`).
    fn delete_snapshot(
        &self,
        py: Python<'_>,
        vm: &Bound<'_, PyAny>,
        snapshot: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let id = vm_id(vm)?;
        let sel = snapshot_sel(snapshot)?;
        self.call(py, |hv| async move { hv.delete_snapshot(&id, &sel).await })
    }

    /// The VM's snapshot tree (trait `snapshot_tree`).
    fn snapshot_tree(&self, py: Python<'_>, vm: &Bound<'_, PyAny>) -> PyResult<SnapshotTree> {
        let id = vm_id(vm)?;
        let tree = self.call(py, |hv| async move { hv.snapshot_tree(&id).await })?;
        Ok(SnapshotTree {
            inner: Arc::new(tree),
        })
    }

    /// The files to copy to run the VM on another host: in its current state (trait
    /// `vm_files`) or at `snapshot` (trait `snapshot_files`). Templates are listed in
    /// `expected_at_destination`, not in `files`.
    #[pyo3(signature = (vm, snapshot=None))]
    fn vm_files(
        &self,
        py: Python<'_>,
        vm: &Bound<'_, PyAny>,
        snapshot: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<MigrationSet> {
        let id = vm_id(vm)?;
        let sel = snapshot
            .filter(|s| !s.is_none())
            .map(snapshot_sel)
            .transpose()?;
        let state = match &sel {
            Some(s) => format!("{id} at {s}"),
            None => format!("{id} (current state)"),
        };
        let inner = self.call(py, |hv| async move {
            match &sel {
                Some(s) => hv.snapshot_files(&id, s).await,
                None => hv.vm_files(&id).await,
            }
        })?;
        Ok(MigrationSet { inner, state })
    }

    /// Every VM (trait `list_vms`).
    fn list_vms(&self, py: Python<'_>) -> PyResult<Vec<VmInfo>> {
        let vms = self.call(py, |hv| async move { hv.list_vms().await })?;
        Ok(vms.into_iter().map(|inner| VmInfo { inner }).collect())
    }

    /// One VM's details (trait `vm_info`).
    fn vm_info(&self, py: Python<'_>, vm: &Bound<'_, PyAny>) -> PyResult<VmInfo> {
        let id = vm_id(vm)?;
        self.call(py, |hv| async move { hv.vm_info(&id).await })
            .map(|inner| VmInfo { inner })
    }

    fn __repr__(&self) -> String {
        match &self.root {
            Some(r) => format!("<Hypervisor {} at {}>", self.kind, r.display()),
            None => format!("<Hypervisor {}>", self.kind),
        }
    }
}

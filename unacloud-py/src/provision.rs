//! `unacloud.provision`: the template catalog, preloading templates onto hosts and
//! executing a deployment from a placement (unacloud-core's `provision` module).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use serde::{Deserialize, Serialize};
use unacloud_core::hypervisor::DiskRef;
use unacloud_core::lifecycle::State;
use unacloud_core::model::{DiskFormat, HostId, Uuid};
use unacloud_core::provision::catalog::{
    Catalog as RsCatalog, ChecksumAlgorithm, ImageSettings, NewTemplate, RequirementPolicy,
    TemplateVersion as RsTemplateVersion,
};
use unacloud_core::provision::deploy::{
    deploy as rs_deploy, CancellationToken, DeployOptions, DeploymentPlan,
    DeploymentReport as RsReport, HostTarget as RsHostTarget, RetryPolicy, VmOutcome as RsOutcome,
    VmResult,
};
use unacloud_core::provision::multiattach::{LocalTransfer, MultiattachManager as RsManager};
use unacloud_core::provision::preload::{preload as rs_preload, PreloadOutcome};

use crate::convert::{from_py, to_py};
use crate::core::Placement;
use crate::errors::{core_err, invalid};
use crate::hv::{disk_ref, vm_id, Disk, Hypervisor, VmInfo};
use crate::results::{dataframe, SIGNAL_CHECK};
use crate::runtime::new_runtime;

// ---- templates and the catalog -----------------------------------------------------

/// One version of a template in the catalog (name, version, OS, format, size, content
/// checksum, the image requirements as checked when it was added, and its status:
/// draft, published or deprecated). Picklable; `to_dict()` is the catalog's JSON entry.
#[pyclass(module = "unacloud.provision", frozen)]
#[derive(Debug, Clone)]
pub struct TemplateVersion {
    pub(crate) inner: RsTemplateVersion,
}

#[pymethods]
impl TemplateVersion {
    /// A version from its `to_dict()`.
    #[new]
    fn new(data: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(TemplateVersion {
            inner: from_py(data, "template version")?,
        })
    }
    /// Template name.
    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }
    /// Version number, from 1.
    #[getter]
    fn version(&self) -> u32 {
        self.inner.version
    }
    /// `name@version`: the template id placement requests and host targets use.
    #[getter]
    fn id(&self) -> String {
        self.inner.id()
    }
    /// Guest OS.
    #[getter]
    fn os(&self) -> &str {
        &self.inner.os
    }
    /// Image format (`qcow2`, `VDI`, …).
    #[getter]
    fn format(&self) -> String {
        self.inner.format.to_string()
    }
    /// Image length in bytes.
    #[getter]
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes
    }
    /// Content checksum as `algorithm:hex` (`blake3:…`).
    #[getter]
    fn checksum(&self) -> String {
        self.inner.checksum.to_string()
    }
    /// File name hosts store the image under (`<name>-<version>.<ext>`).
    #[getter]
    fn file_name(&self) -> &str {
        &self.inner.file_name
    }
    /// `draft`, `published` or `deprecated`.
    #[getter]
    fn status(&self) -> String {
        self.inner.status.to_string()
    }
    /// Free text, or None.
    #[getter]
    fn description(&self) -> Option<&str> {
        self.inner.description.as_deref()
    }
    /// The image requirements (thesis Table 2.2) as checked when the version was added:
    /// dicts with `name`, `status` (`met`, `not-met`, `unknown`) and `detail`.
    #[getter]
    fn requirements(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        use unacloud_core::provision::catalog::RequirementStatus as R;
        self.inner
            .requirements
            .iter()
            .map(|r| {
                let (status, detail) = match &r.status {
                    R::Met => ("met", None),
                    R::NotMet(why) => ("not-met", Some(why.as_str())),
                    R::Unknown(why) => ("unknown", Some(why.as_str())),
                };
                let d = PyDict::new(py);
                d.set_item("name", &r.name)?;
                d.set_item("status", status)?;
                d.set_item("detail", detail)?;
                Ok(d.into_any().unbind())
            })
            .collect()
    }
    /// The catalog's JSON entry as plain data.
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.inner)
    }
    fn __reduce__(slf: &Bound<'_, Self>) -> PyResult<(PyObject, (PyObject,))> {
        let d = slf.get().to_dict(slf.py())?;
        Ok((slf.get_type().into_any().unbind(), (d,)))
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .downcast::<TemplateVersion>()
            .is_ok_and(|o| o.get().inner == self.inner)
    }
    fn __repr__(&self) -> String {
        format!(
            "<TemplateVersion {} ({}, {} bytes, {})>",
            self.inner.id(),
            self.inner.format,
            self.inner.size_bytes,
            self.inner.status
        )
    }
}

/// The versioned template catalog, one JSON file (a missing file is an empty catalog).
/// Every change is written atomically before the call returns, with the previous good
/// file kept as `<file>.bak`; a corrupt file raises and is never overwritten (see
/// `Catalog.recover`). Versions still used by VMs cannot be removed.
#[pyclass(module = "unacloud.provision")]
#[derive(Debug)]
pub struct Catalog {
    inner: RsCatalog,
}

fn catalog_users(users: &[unacloud_core::provision::catalog::VmUse]) -> Vec<(String, String)> {
    users
        .iter()
        .map(|u| (u.host.clone(), u.vm.clone()))
        .collect()
}

#[pymethods]
impl Catalog {
    /// Opens the catalog at `path` (nothing is written until a change).
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py
            .allow_threads(|| RsCatalog::open(path))
            .map_err(core_err)?;
        Ok(Catalog { inner })
    }
    /// Opens a corrupt catalog from its last good copy (`<file>.bak`).
    #[staticmethod]
    fn recover(py: Python<'_>, path: PathBuf) -> PyResult<Catalog> {
        let inner = py
            .allow_threads(|| RsCatalog::recover(path))
            .map_err(core_err)?;
        Ok(Catalog { inner })
    }
    /// The catalog file.
    #[getter]
    fn path(&self) -> String {
        self.inner.path().display().to_string()
    }
    /// Every version, in the order they were added.
    #[getter]
    fn templates(&self) -> Vec<TemplateVersion> {
        self.inner
            .templates()
            .iter()
            .map(|t| TemplateVersion { inner: t.clone() })
            .collect()
    }
    /// One version; `NotFound` if it does not exist.
    fn get(&self, name: &str, version: u32) -> PyResult<TemplateVersion> {
        let t = self.inner.get(name, version).map_err(core_err)?;
        Ok(TemplateVersion { inner: t.clone() })
    }
    /// The highest published version of `name`; `NotFound` if none is published.
    fn latest_published(&self, name: &str) -> PyResult<TemplateVersion> {
        let t = self.inner.latest_published(name).map_err(core_err)?;
        Ok(TemplateVersion { inner: t.clone() })
    }
    /// Adds a draft version of template `name` from the image file `image` (read once
    /// for its size and checksum) and returns it. `format` defaults to the image's
    /// extension. `os_type`, `bridged_adapter` and `guest_additions_version` are what
    /// the image's settings say, checked against `supported_os` and
    /// `hypervisor_version` (Table 2.2); a requirement known not to hold blocks
    /// `publish`. `checksum`: `blake3` (default) or `sha256`.
    #[pyo3(signature = (name, image, os="Linux", format=None, *, os_type=None, bridged_adapter=None, guest_additions_version=None, supported_os=Vec::new(), hypervisor_version=None, checksum="blake3", description=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_draft(
        &mut self,
        py: Python<'_>,
        name: String,
        image: PathBuf,
        os: &str,
        format: Option<String>,
        os_type: Option<String>,
        bridged_adapter: Option<bool>,
        guest_additions_version: Option<String>,
        supported_os: Vec<String>,
        hypervisor_version: Option<String>,
        checksum: &str,
        description: Option<String>,
    ) -> PyResult<TemplateVersion> {
        let format = format
            .or_else(|| image.extension().map(|e| e.to_string_lossy().into_owned()))
            .ok_or_else(|| invalid("the image has no extension: pass format="))?;
        let algorithm = match checksum.to_ascii_lowercase().as_str() {
            "blake3" => ChecksumAlgorithm::Blake3,
            "sha256" | "sha-256" => ChecksumAlgorithm::Sha256,
            other => {
                return Err(invalid(format!(
                    "unknown checksum {other:?}; expected \"blake3\" or \"sha256\""
                )))
            }
        };
        let mut new = NewTemplate::new(name.clone(), os, DiskFormat::parse(&format), image);
        new.settings = ImageSettings {
            os_type,
            bridged_adapter,
            guest_additions_version,
        };
        new.policy = RequirementPolicy {
            supported_os,
            hypervisor_version,
        };
        new.algorithm = algorithm;
        new.description = description;
        let catalog = &mut self.inner;
        let version = py
            .allow_threads(|| catalog.add_draft(new))
            .map_err(core_err)?;
        self.get(&name, version)
    }
    /// Offers a version for new deployments (`InvalidState` while a requirement is
    /// known not to hold).
    fn publish(&mut self, name: &str, version: u32) -> PyResult<()> {
        self.inner.publish(name, version).map_err(core_err)
    }
    /// Withdraws a version from new deployments; VMs built from it keep it.
    fn deprecate(&mut self, name: &str, version: u32) -> PyResult<()> {
        self.inner.deprecate(name, version).map_err(core_err)
    }
    /// Removes a version; `InUse` listing the VMs while any VM was built from it.
    fn remove_version(&mut self, name: &str, version: u32) -> PyResult<()> {
        self.inner.remove_version(name, version).map_err(core_err)
    }
    /// Records that `vm` on `host` was built from a (published) version.
    fn record_use(&mut self, name: &str, version: u32, host: &str, vm: &str) -> PyResult<()> {
        self.inner
            .record_use(name, version, host, vm)
            .map_err(core_err)
    }
    /// Forgets `vm` on `host` (after it was deleted); unknown VMs are ignored.
    fn release_use(&mut self, host: &str, vm: &str) -> PyResult<()> {
        self.inner.release_use(host, vm).map_err(core_err)
    }
    /// Moves the record of `vm` to another host (after a migration).
    fn move_use(&mut self, vm: &str, from_host: &str, to_host: &str) -> PyResult<()> {
        self.inner
            .move_use(vm, from_host, to_host)
            .map_err(core_err)
    }
    /// The VMs built from a version, as `(host, vm)` pairs.
    fn users(&self, name: &str, version: u32) -> Vec<(String, String)> {
        catalog_users(self.inner.users(name, version))
    }
    /// The version `vm` on `host` was built from, or None.
    fn version_of(&self, host: &str, vm: &str) -> Option<TemplateVersion> {
        self.inner
            .version_of(host, vm)
            .map(|t| TemplateVersion { inner: t.clone() })
    }
    fn __len__(&self) -> usize {
        self.inner.templates().len()
    }
    fn __repr__(&self) -> String {
        format!(
            "<Catalog {}: {} template versions>",
            self.inner.path().display(),
            self.inner.templates().len()
        )
    }
}

// ---- the Multiattach Manager ----------------------------------------------------------

/// The thesis's Multiattach Manager over one hypervisor: its seven all-or-nothing
/// operations on multiattach templates and the VMs built from them (a failed operation
/// leaves nothing behind). VMs are names, uuids or `VmInfo`s; templates are `Disk`s,
/// disk uuids or image paths.
#[pyclass(module = "unacloud.provision", frozen)]
#[derive(Debug)]
pub struct MultiattachManager {
    hypervisor: Py<Hypervisor>,
}

#[pymethods]
impl MultiattachManager {
    /// A manager over `hypervisor` (the source host of `replicate` and `migrate`).
    #[new]
    fn new(hypervisor: Py<Hypervisor>) -> Self {
        MultiattachManager { hypervisor }
    }
    /// The hypervisor it manages.
    #[getter]
    fn hypervisor(&self, py: Python<'_>) -> Py<Hypervisor> {
        self.hypervisor.clone_ref(py)
    }
    /// Operation 1: registers the image at `path` as a multiattach template.
    fn register_template(&self, py: Python<'_>, path: PathBuf) -> PyResult<Disk> {
        let inner = self.hypervisor.get().call(py, |hv| async move {
            MultiattachManager::rs(&hv).register_template(&path).await
        })?;
        Ok(Disk { inner })
    }
    /// Operation 2: a VM named `name` with the hardware `profile` whose one disk is its
    /// own differencing child of `template`.
    #[pyo3(signature = (name, template, profile="small"))]
    fn create_vm(
        &self,
        py: Python<'_>,
        name: String,
        template: &Bound<'_, PyAny>,
        profile: &str,
    ) -> PyResult<VmInfo> {
        let template = disk_ref(template)?;
        let profile: unacloud_core::model::HardwareProfile = profile.parse().map_err(core_err)?;
        let spec = unacloud_core::model::VmSpec::new(name, profile);
        let inner = self.hypervisor.get().call(py, |hv| async move {
            MultiattachManager::rs(&hv)
                .create_vm(&spec, &template)
                .await
        })?;
        Ok(VmInfo { inner })
    }
    /// Operation 3: clones `source` into a new VM `name` whose disks are new
    /// differencing images (never a copy of the template).
    fn clone_vm(
        &self,
        py: Python<'_>,
        source: &Bound<'_, PyAny>,
        name: String,
    ) -> PyResult<VmInfo> {
        let source = vm_id(source)?;
        let inner = self.hypervisor.get().call(py, |hv| async move {
            MultiattachManager::rs(&hv).clone_vm(&source, &name).await
        })?;
        Ok(VmInfo { inner })
    }
    /// Operation 4: copies `vm`'s own files (never the template) into `dest_folder` and
    /// registers the copy with `dest`, which must have the template preloaded. The VM
    /// must not be running.
    fn replicate(
        &self,
        py: Python<'_>,
        vm: &Bound<'_, PyAny>,
        dest: &Bound<'_, Hypervisor>,
        dest_folder: PathBuf,
    ) -> PyResult<VmInfo> {
        let vm = vm_id(vm)?;
        let dest = dest.get().hv()?;
        let inner = self.hypervisor.get().call(py, |hv| async move {
            MultiattachManager::rs(&hv)
                .replicate(&vm, dest.as_ref(), &dest_folder, &LocalTransfer)
                .await
        })?;
        Ok(VmInfo { inner })
    }
    /// Operation 5: replicates `vm` to `dest`, optionally starts it there, then removes
    /// the source VM and its own files (or, on failure, the copy).
    #[pyo3(signature = (vm, dest, dest_folder, start=false))]
    fn migrate(
        &self,
        py: Python<'_>,
        vm: &Bound<'_, PyAny>,
        dest: &Bound<'_, Hypervisor>,
        dest_folder: PathBuf,
        start: bool,
    ) -> PyResult<VmInfo> {
        let vm = vm_id(vm)?;
        let dest = dest.get().hv()?;
        let inner = self.hypervisor.get().call(py, |hv| async move {
            MultiattachManager::rs(&hv)
                .migrate(&vm, dest.as_ref(), &dest_folder, &LocalTransfer, start)
                .await
        })?;
        Ok(VmInfo { inner })
    }
    /// Operation 6: deletes a VM and its own files, powering it off first; the template
    /// is never touched.
    fn delete_vm(&self, py: Python<'_>, vm: &Bound<'_, PyAny>) -> PyResult<()> {
        let vm = vm_id(vm)?;
        self.hypervisor.get().call(py, |hv| async move {
            MultiattachManager::rs(&hv).delete_vm(&vm).await
        })
    }
    /// Operation 7: unregisters a template (with `delete_file`, deletes its image);
    /// `InUse` listing the VMs built from it.
    #[pyo3(signature = (template, delete_file=false))]
    fn unregister_template(
        &self,
        py: Python<'_>,
        template: &Bound<'_, PyAny>,
        delete_file: bool,
    ) -> PyResult<()> {
        let template = disk_ref(template)?;
        self.hypervisor.get().call(py, |hv| async move {
            MultiattachManager::rs(&hv)
                .unregister_template(&template, delete_file)
                .await
        })
    }
    /// The names of the VMs whose disks descend from `template`.
    fn template_users(&self, py: Python<'_>, template: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
        let template = disk_ref(template)?;
        self.hypervisor.get().call(py, |hv| async move {
            MultiattachManager::rs(&hv).template_users(&template).await
        })
    }
    fn __repr__(&self) -> String {
        "<MultiattachManager>".to_owned()
    }
}

impl MultiattachManager {
    fn rs(hv: &Arc<dyn unacloud_core::hypervisor::Hypervisor>) -> RsManager<'_> {
        RsManager::new(hv.as_ref())
    }
}

// ---- preloading ----------------------------------------------------------------------

/// Copies `template`'s image from `source` into the host folder `store`, verifies its
/// checksum, and registers it with `hypervisor` as a multiattach disk, so that
/// provisioning there copies nothing (thesis strategy 3). Free space is checked first
/// (`InsufficientSpace`); an interrupted copy (Ctrl-C, a crash) keeps its partial file
/// and the next call resumes it; a template already present and registered is left as
/// it is. `progress(event)` gets `{"event": "copy", "copied", "total",
/// "resumed_from"}` at most every 0.1 s and after the last chunk; an exception from it
/// stops the copy (the partial file is kept). Returns a dict: `outcome`
/// (`copied`, `registered` or `already-present`), `disk` (the registered `Disk`),
/// `bytes_copied` and `resumed_from`.
#[pyfunction]
#[pyo3(signature = (hypervisor, template, source, store, progress=None))]
pub fn preload(
    py: Python<'_>,
    hypervisor: &Bound<'_, Hypervisor>,
    template: &Bound<'_, TemplateVersion>,
    source: PathBuf,
    store: PathBuf,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyObject> {
    let cb = callable(progress)?;
    let tv = template.get().inner.clone();
    let failed: Arc<std::sync::Mutex<Option<PyErr>>> = Arc::default();
    let failed_in = failed.clone();
    let outcome = hypervisor.get().call(py, move |hv| async move {
        let mut last: Option<std::time::Instant> = None;
        let mut report = move |p: &unacloud_core::provision::preload::PreloadProgress| {
            let Some(cb) = &cb else {
                return ControlFlow::Continue(());
            };
            let due = p.copied == p.total || last.map_or(true, |t| t.elapsed() >= SIGNAL_CHECK);
            if !due {
                return ControlFlow::Continue(());
            }
            last = Some(std::time::Instant::now());
            let r = Python::with_gil(|py| -> PyResult<()> {
                let d = PyDict::new(py);
                d.set_item("event", "copy")?;
                d.set_item("copied", p.copied)?;
                d.set_item("total", p.total)?;
                d.set_item("resumed_from", p.resumed_from)?;
                cb.call1(py, (d,))?;
                Ok(())
            });
            match r {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    *failed_in.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    ControlFlow::Break(())
                }
            }
        };
        rs_preload(hv.as_ref(), &tv, &source, &store, &mut report).await
    });
    if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    let outcome = outcome?;
    let d = PyDict::new(py);
    let (kind, copied, resumed) = match &outcome {
        PreloadOutcome::AlreadyPresent { .. } => ("already-present", 0, 0),
        PreloadOutcome::Registered { .. } => ("registered", 0, 0),
        PreloadOutcome::Copied {
            bytes_copied,
            resumed_from,
            ..
        } => ("copied", *bytes_copied, *resumed_from),
    };
    d.set_item("outcome", kind)?;
    d.set_item(
        "disk",
        Disk {
            inner: outcome.disk().clone(),
        },
    )?;
    d.set_item("bytes_copied", copied)?;
    d.set_item("resumed_from", resumed)?;
    Ok(d.into_any().unbind())
}

fn callable(progress: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Py<PyAny>>> {
    match progress {
        Some(p) if !p.is_none() => {
            if !p.is_callable() {
                return Err(PyTypeError::new_err("progress must be a callable or None"));
            }
            Ok(Some(p.clone().unbind()))
        }
        _ => Ok(None),
    }
}

// ---- deployments -------------------------------------------------------------------

/// A host a deployment provisions on: its hypervisor (`unacloud.hv.open(...)`), the
/// templates preloaded there (template id such as `"base@1"` → the registered
/// multiattach `Disk`, or its uuid) and optionally the folder for its VMs.
#[pyclass(module = "unacloud.provision", frozen)]
#[derive(Debug)]
pub struct HostTarget {
    hypervisor: Py<Hypervisor>,
    templates: Vec<(String, Uuid)>,
    vm_folder: Option<PathBuf>,
}

#[pymethods]
impl HostTarget {
    /// `templates`: template id → `Disk` or disk uuid.
    #[new]
    #[pyo3(signature = (hypervisor, templates, vm_folder=None))]
    fn new(
        hypervisor: Py<Hypervisor>,
        templates: &Bound<'_, PyDict>,
        vm_folder: Option<PathBuf>,
    ) -> PyResult<Self> {
        let mut list = Vec::new();
        for (k, v) in templates.iter() {
            let id: String = k
                .extract()
                .map_err(|_| PyTypeError::new_err("template ids must be str"))?;
            let uuid = if let Ok(d) = v.downcast::<Disk>() {
                d.get().inner.uuid
            } else if let Ok(s) = v.downcast::<PyString>() {
                let s = s.to_cow()?;
                Uuid::try_parse(s.trim())
                    .map_err(|_| invalid(format!("template {id}: {s:?} is not a disk uuid")))?
            } else {
                return Err(PyTypeError::new_err(format!(
                    "template {id}: expected a Disk or a disk uuid (str)"
                )));
            };
            list.push((id, uuid));
        }
        Ok(HostTarget {
            hypervisor,
            templates: list,
            vm_folder,
        })
    }
    /// The host's hypervisor.
    #[getter]
    fn hypervisor(&self, py: Python<'_>) -> Py<Hypervisor> {
        self.hypervisor.clone_ref(py)
    }
    /// Template id → disk uuid.
    #[getter]
    fn templates(&self) -> HashMap<String, String> {
        self.templates
            .iter()
            .map(|(k, u)| (k.clone(), u.to_string()))
            .collect()
    }
    /// The VM folder, or None for the backend's default.
    #[getter]
    fn vm_folder(&self) -> Option<String> {
        self.vm_folder.as_ref().map(|p| p.display().to_string())
    }
    fn __repr__(&self) -> String {
        format!("<HostTarget with {} templates>", self.templates.len())
    }
}

fn us(d: Duration) -> f64 {
    // Whole microseconds, so that a report survives to_dict() → DeploymentReport(d).
    d.as_micros() as f64 / 1000.0
}

fn from_ms(ms: f64, what: &str) -> PyResult<Duration> {
    if !(ms.is_finite() && ms >= 0.0) {
        return Err(invalid(format!(
            "{what} must be a non-negative number of ms"
        )));
    }
    Ok(Duration::from_micros((ms * 1000.0).round() as u64))
}

/// One VM's outcome as plain data (the shape of `VmOutcome.to_dict()`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutcomeData {
    vm: String,
    host: String,
    template: String,
    result: VmResult,
    state: State,
    attempts: u32,
    error: Option<String>,
    elapsed_ms: f64,
    history: Vec<(State, f64)>,
}

impl From<&RsOutcome> for OutcomeData {
    fn from(o: &RsOutcome) -> Self {
        OutcomeData {
            vm: o.vm.clone(),
            host: o.host.0.clone(),
            template: o.template.clone(),
            result: o.result,
            state: o.state,
            attempts: o.attempts,
            error: o.error.clone(),
            elapsed_ms: us(o.elapsed),
            history: o.history.iter().map(|(s, d)| (*s, us(*d))).collect(),
        }
    }
}

impl OutcomeData {
    fn into_rs(self) -> PyResult<RsOutcome> {
        Ok(RsOutcome {
            history: self
                .history
                .into_iter()
                .map(|(s, ms)| Ok((s, from_ms(ms, "history")?)))
                .collect::<PyResult<_>>()?,
            elapsed: from_ms(self.elapsed_ms, "elapsed_ms")?,
            vm: self.vm,
            host: HostId(self.host),
            template: self.template,
            result: self.result,
            state: self.state,
            attempts: self.attempts,
            error: self.error,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReportData {
    created: usize,
    failed: usize,
    cancelled_vms: usize,
    cancelled: bool,
    elapsed_ms: f64,
    outcomes: Vec<OutcomeData>,
}

fn result_str(r: VmResult) -> &'static str {
    match r {
        VmResult::Deployed => "deployed",
        VmResult::Created => "created",
        VmResult::Failed => "failed",
        VmResult::Cancelled => "cancelled",
    }
}

/// What happened to one VM of a deployment.
#[pyclass(module = "unacloud.provision", frozen)]
#[derive(Debug, Clone)]
pub struct VmOutcome {
    inner: RsOutcome,
}

#[pymethods]
impl VmOutcome {
    /// An outcome from its `to_dict()` (what pickling uses).
    #[new]
    fn new(data: &Bound<'_, PyAny>) -> PyResult<Self> {
        let d: OutcomeData = from_py(data, "VM outcome")?;
        Ok(VmOutcome {
            inner: d.into_rs()?,
        })
    }
    fn __reduce__(slf: &Bound<'_, Self>) -> PyResult<(PyObject, (PyObject,))> {
        let d = slf.get().to_dict(slf.py())?;
        Ok((slf.get_type().into_any().unbind(), (d,)))
    }
    /// The VM's name.
    #[getter]
    fn vm(&self) -> &str {
        &self.inner.vm
    }
    /// Its host.
    #[getter]
    fn host(&self) -> &str {
        &self.inner.host.0
    }
    /// The template id.
    #[getter]
    fn template(&self) -> &str {
        &self.inner.template
    }
    /// `deployed` (created and started), `created` (not started), `failed` (whatever
    /// was made was removed) or `cancelled`.
    #[getter]
    fn result(&self) -> &'static str {
        result_str(self.inner.result)
    }
    /// Its life-cycle state at the end (`deployed`, `deploying`, `failed`, `finished`, …).
    #[getter]
    fn state(&self) -> &'static str {
        self.inner.state.as_str()
    }
    /// Attempts made at creating it.
    #[getter]
    fn attempts(&self) -> u32 {
        self.inner.attempts
    }
    /// Why it failed or was cancelled, or None.
    #[getter]
    fn error(&self) -> Option<&str> {
        self.inner.error.as_deref()
    }
    /// Seconds from Requested to the end.
    #[getter]
    fn elapsed_s(&self) -> f64 {
        self.inner.elapsed.as_secs_f64()
    }
    /// The life-cycle states entered, with seconds since the VM's provisioning began.
    #[getter]
    fn history(&self) -> Vec<(&'static str, f64)> {
        self.inner
            .history
            .iter()
            .map(|(s, d)| (s.as_str(), d.as_secs_f64()))
            .collect()
    }
    /// Whether the VM exists now (`deployed` or `created`).
    #[getter]
    fn ok(&self) -> bool {
        matches!(self.inner.result, VmResult::Deployed | VmResult::Created)
    }
    /// Plain data: `vm`, `host`, `template`, `result`, `state`, `attempts`, `error`,
    /// `elapsed_ms` and `history` (`[state, ms]` pairs).
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &OutcomeData::from(&self.inner))
    }
    fn __repr__(&self) -> String {
        format!(
            "<VmOutcome {} on {}: {}>",
            self.inner.vm,
            self.inner.host.0,
            result_str(self.inner.result)
        )
    }
}

/// The report of a deployment: one `VmOutcome` per VM of the plan (every VM gets one;
/// a deployment never fails as a whole), grouped by host in plan order. `records()`
/// (and iterating the report) gives one dict per VM, so `pandas.DataFrame(report)` has
/// a row per VM. Picklable; `DeploymentReport(report.to_dict())` rebuilds it.
#[pyclass(module = "unacloud.provision", frozen)]
#[derive(Debug, Clone)]
pub struct DeploymentReport {
    inner: RsReport,
}

impl DeploymentReport {
    fn data(&self) -> ReportData {
        ReportData {
            created: self.inner.created(),
            failed: self.inner.failed(),
            cancelled_vms: self.inner.cancelled_vms(),
            cancelled: self.inner.cancelled,
            elapsed_ms: us(self.inner.elapsed),
            outcomes: self.inner.outcomes.iter().map(OutcomeData::from).collect(),
        }
    }
    fn records_list(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        self.inner
            .outcomes
            .iter()
            .map(|o| {
                let d = to_py(py, &OutcomeData::from(o))?;
                // The history stays in to_dict(); a table wants scalars.
                d.bind(py).downcast::<PyDict>()?.del_item("history")?;
                Ok(d)
            })
            .collect()
    }
}

#[pymethods]
impl DeploymentReport {
    /// A report from its `to_dict()`.
    #[new]
    fn new(data: &Bound<'_, PyAny>) -> PyResult<Self> {
        let d: ReportData = from_py(data, "deployment report")?;
        Ok(DeploymentReport {
            inner: RsReport {
                elapsed: from_ms(d.elapsed_ms, "elapsed_ms")?,
                cancelled: d.cancelled,
                outcomes: d
                    .outcomes
                    .into_iter()
                    .map(OutcomeData::into_rs)
                    .collect::<PyResult<_>>()?,
            },
        })
    }
    /// Every VM's outcome, in plan order.
    #[getter]
    fn outcomes(&self) -> Vec<VmOutcome> {
        self.inner
            .outcomes
            .iter()
            .map(|o| VmOutcome { inner: o.clone() })
            .collect()
    }
    /// VMs created (started or not).
    #[getter]
    fn created(&self) -> usize {
        self.inner.created()
    }
    /// VMs that failed.
    #[getter]
    fn failed(&self) -> usize {
        self.inner.failed()
    }
    /// VMs cancelled.
    #[getter]
    fn cancelled_vms(&self) -> usize {
        self.inner.cancelled_vms()
    }
    /// Whether the deployment was cancelled.
    #[getter]
    fn cancelled(&self) -> bool {
        self.inner.cancelled
    }
    /// Wall-clock seconds of the whole deployment.
    #[getter]
    fn elapsed_s(&self) -> f64 {
        self.inner.elapsed.as_secs_f64()
    }
    /// Records every created VM whose template id is `name@version` in `catalog`
    /// (so the version cannot be removed while they exist).
    fn record_in(&self, catalog: &mut Catalog) -> PyResult<()> {
        self.inner.record_in(&mut catalog.inner).map_err(core_err)
    }
    /// One dict per VM: `vm`, `host`, `template`, `result`, `state`, `attempts`,
    /// `error`, `elapsed_ms`.
    fn records(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        self.records_list(py)
    }
    /// Plain data: `created`, `failed`, `cancelled_vms`, `cancelled`, `elapsed_ms` and
    /// `outcomes` (`VmOutcome.to_dict()` each).
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.data())
    }
    /// `records()` as a `pandas.DataFrame` (pandas is imported only here).
    fn to_pandas(&self, py: Python<'_>) -> PyResult<PyObject> {
        let records = PyList::new(py, self.records_list(py)?)?;
        dataframe(
            py,
            records.into_any().unbind(),
            "DeploymentReport.to_pandas()",
        )
    }
    fn __iter__(&self, py: Python<'_>) -> PyResult<PyObject> {
        let list = PyList::new(py, self.records_list(py)?)?;
        Ok(list.try_iter()?.into_any().unbind())
    }
    fn __len__(&self) -> usize {
        self.inner.outcomes.len()
    }
    fn __reduce__(slf: &Bound<'_, Self>) -> PyResult<(PyObject, (PyObject,))> {
        let d = slf.get().to_dict(slf.py())?;
        Ok((slf.get_type().into_any().unbind(), (d,)))
    }
    fn __repr__(&self) -> String {
        format!(
            "<DeploymentReport {} VMs: {} created, {} failed, {} cancelled>",
            self.inner.outcomes.len(),
            self.inner.created(),
            self.inner.failed(),
            self.inner.cancelled_vms()
        )
    }
}

/// Provisions the VMs of `placement` (from `unacloud.core.place`) on `targets` (host
/// id → `HostTarget`): hosts in parallel (`max_parallel_hosts` at a time), the VMs of
/// one host one after another, each from its template's multiattach disk through its
/// own differencing child, driven through the thesis's deployment life cycle. Transient
/// failures are retried (`max_attempts`, first wait `backoff_s`, doubled each time);
/// each attempt is all-or-nothing. `start` also starts each VM. `resume` finishes an
/// interrupted deployment of the same plan (complete VMs kept, half-made ones made
/// again). With `catalog`, the created VMs are recorded as users of their template
/// versions.
///
/// Never fails as a whole: every VM gets an outcome in the returned
/// `DeploymentReport` (a host missing from `targets`, or a template missing on a host,
/// fails that host's VMs with the reason). `progress(event)` receives `{"event": "vm",
/// "outcome": VmOutcome, "done", "total"}` as each VM finishes; an exception from it
/// cancels the deployment. Ctrl-C cancels it too: no new VM is started, VMs in
/// progress are rolled back, and `KeyboardInterrupt` is raised once that is done.
#[pyfunction]
#[pyo3(signature = (placement, targets, *, start=false, max_parallel_hosts=16, max_attempts=3, backoff_s=0.5, resume=false, catalog=None, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn deploy(
    py: Python<'_>,
    placement: &Bound<'_, Placement>,
    targets: &Bound<'_, PyDict>,
    start: bool,
    #[pyo3(from_py_with = crate::args::max_parallel_hosts)] max_parallel_hosts: usize,
    #[pyo3(from_py_with = crate::args::max_attempts)] max_attempts: u32,
    #[pyo3(from_py_with = crate::args::backoff_s)] backoff_s: f64,
    resume: bool,
    catalog: Option<&Bound<'_, Catalog>>,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<DeploymentReport> {
    let cb = callable(progress)?;
    let p = placement.get();
    let plan = DeploymentPlan::from_placement(&p.plan, &p.vms).map_err(core_err)?;
    let mut rs_targets = HashMap::new();
    for (k, v) in targets.iter() {
        let host: String = k
            .extract()
            .map_err(|_| PyTypeError::new_err("targets: host ids must be str"))?;
        let t = v
            .downcast::<HostTarget>()
            .map_err(|_| PyTypeError::new_err(format!("targets[{host:?}] must be a HostTarget")))?;
        let t = t.get();
        let mut target = RsHostTarget::new(t.hypervisor.get().hv()?);
        target.vm_folder = t.vm_folder.clone();
        for (id, uuid) in &t.templates {
            target.templates.insert(id.clone(), DiskRef::Uuid(*uuid));
        }
        rs_targets.insert(HostId(host), target);
    }
    let options = DeployOptions {
        max_parallel_hosts: max_parallel_hosts.max(1),
        retry: RetryPolicy {
            max_attempts: max_attempts.max(1),
            backoff: Duration::from_secs_f64(backoff_s),
        },
        start,
        resume,
        ..DeployOptions::default()
    };
    let total = plan.len();
    let rt = new_runtime()?;
    let cancel = CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<RsOutcome>();
    let on_outcome: unacloud_core::provision::deploy::OutcomeCallback =
        Arc::new(move |o: &RsOutcome| {
            let _ = tx.send(o.clone());
        });
    let token = cancel.clone();
    // Runs with the GIL released; takes it back every 0.1 s for the signal handlers
    // and for each finished VM's progress event. A raised exception cancels the
    // deployment, which then rolls back what is in progress before it is re-raised.
    let (report, stopped) = py.allow_threads(move || {
        rt.block_on(async move {
            let fut = rs_deploy(&plan, &rs_targets, &options, Some(token), Some(on_outcome));
            let mut fut = std::pin::pin!(fut);
            let mut tick = tokio::time::interval(SIGNAL_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut stopped: Option<PyErr> = None;
            let mut done = 0usize;
            // Hands one finished VM to `progress`; an exception cancels the rest.
            let mut deliver = |o: RsOutcome, stopped: &mut Option<PyErr>| {
                done += 1;
                let (Some(cb), None) = (&cb, &stopped) else {
                    return;
                };
                let r = Python::with_gil(|py| -> PyResult<()> {
                    let d = PyDict::new(py);
                    d.set_item("event", "vm")?;
                    d.set_item("outcome", VmOutcome { inner: o })?;
                    d.set_item("done", done)?;
                    d.set_item("total", total)?;
                    cb.call1(py, (d,))?;
                    Ok(())
                });
                if let Err(e) = r {
                    *stopped = Some(e);
                    cancel.cancel();
                }
            };
            loop {
                tokio::select! {
                    report = &mut fut => {
                        while let Ok(o) = rx.try_recv() {
                            deliver(o, &mut stopped);
                        }
                        return (report, stopped);
                    }
                    Some(o) = rx.recv() => deliver(o, &mut stopped),
                    _ = tick.tick(), if stopped.is_none() => {
                        if let Err(e) = Python::with_gil(|py| py.check_signals()) {
                            stopped = Some(e);
                            cancel.cancel();
                        }
                    }
                }
            }
        })
    });
    if let Some(e) = stopped {
        return Err(e);
    }
    if let Some(c) = catalog {
        report
            .record_in(&mut c.borrow_mut().inner)
            .map_err(core_err)?;
    }
    Ok(DeploymentReport { inner: report })
}

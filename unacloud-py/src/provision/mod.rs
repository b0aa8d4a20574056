//! `unacloud.provision`: the template catalog, preloading templates onto hosts and
//! executing a deployment from a placement (unacloud-core's `provision` module).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use unacloud_core::model::DiskFormat;
use unacloud_core::provision::catalog::{
    Catalog as RsCatalog, ChecksumAlgorithm, ImageSettings, NewTemplate, RequirementPolicy,
    TemplateVersion as RsTemplateVersion,
};
use unacloud_core::provision::multiattach::{LocalTransfer, MultiattachManager as RsManager};
use unacloud_core::provision::preload::{preload as rs_preload, PreloadOutcome};

use crate::convert::{from_py, to_py};
use crate::errors::{core_err, invalid};
use crate::hv::{disk_ref, vm_id, Disk, Hypervisor, VmInfo};
use crate::results::SIGNAL_CHECK;

mod deployment;
pub use deployment::{deploy, DeploymentReport, HostTarget, VmOutcome};

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

//! `unacloud.vbox`: VirtualBox machines, snapshot trees and migration sets.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyList;
use unacloud_core::files::VmFile;
use unacloud_vbox::tracker::{Machine as RsMachine, MigrationOptions, TreeFormat};
use unacloud_vbox::vdi::VdiHeader;

use crate::convert::to_py;
use crate::errors::{invalid, vbox_err};

fn file_dict(py: Python<'_>, f: &VmFile) -> PyResult<PyObject> {
    let d = pyo3::types::PyDict::new(py);
    d.set_item("path", f.path.display().to_string())?;
    d.set_item("role", f.role.as_str())?;
    d.set_item("uuid", f.uuid.clone())?;
    d.set_item("bytes", f.bytes)?;
    Ok(d.into_any().unbind())
}

fn files_list(py: Python<'_>, files: &[VmFile]) -> PyResult<PyObject> {
    let items = files
        .iter()
        .map(|f| file_dict(py, f))
        .collect::<PyResult<Vec<_>>>()?;
    Ok(PyList::new(py, items)?.into_any().unbind())
}

/// A VirtualBox machine loaded from its `.vbox` settings file.
#[derive(Debug)]
#[pyclass(module = "unacloud.vbox", frozen)]
pub struct Machine {
    inner: Arc<RsMachine>,
}

/// One snapshot of a machine (a node of its snapshot tree).
#[derive(Debug)]
#[pyclass(module = "unacloud.vbox", frozen)]
pub struct Snapshot {
    machine: Arc<RsMachine>,
    index: usize,
}

impl Snapshot {
    fn settings(&self) -> &unacloud_vbox::settings::SnapshotSettings {
        // The index always comes from the same machine's snapshot list.
        &self.machine.snapshots()[self.index]
    }
}

#[pymethods]
impl Snapshot {
    /// The snapshot's name (names may repeat).
    #[getter]
    fn name(&self) -> String {
        self.settings().name.clone()
    }
    /// The snapshot's uuid, without braces.
    #[getter]
    fn uuid(&self) -> String {
        self.settings().uuid.to_string()
    }
    /// When it was taken (ISO 8601 as VirtualBox wrote it), or None.
    #[getter]
    fn time(&self) -> Option<String> {
        self.settings().time_stamp.clone()
    }
    /// Its description, or None.
    #[getter]
    fn description(&self) -> Option<String> {
        self.settings().description.clone()
    }
    /// The saved-state file as written in the settings, or None for an offline snapshot.
    #[getter]
    fn state_file(&self) -> Option<String> {
        self.settings().state_file.clone()
    }
    /// Child snapshots, oldest first.
    #[getter]
    fn children(&self) -> Vec<Snapshot> {
        self.settings()
            .children
            .iter()
            .map(|&i| Snapshot {
                machine: self.machine.clone(),
                index: i,
            })
            .collect()
    }
    /// The parent snapshot, or None for the root.
    #[getter]
    fn parent(&self) -> Option<Snapshot> {
        self.settings().parent.map(|i| Snapshot {
            machine: self.machine.clone(),
            index: i,
        })
    }
    /// The snapshot as a plain dict.
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        let s = self.settings();
        let d = pyo3::types::PyDict::new(py);
        d.set_item("uuid", s.uuid.to_string())?;
        d.set_item("name", &s.name)?;
        d.set_item("time", &s.time_stamp)?;
        d.set_item("description", &s.description)?;
        d.set_item("state_file", &s.state_file)?;
        d.set_item(
            "parent",
            s.parent
                .map(|p| self.machine.snapshots()[p].uuid.to_string()),
        )?;
        d.set_item("children", s.children.len())?;
        Ok(d.into_any().unbind())
    }
    fn __eq__(&self, other: &Snapshot) -> bool {
        Arc::ptr_eq(&self.machine, &other.machine) && self.index == other.index
    }
    fn __hash__(&self) -> u64 {
        self.settings().uuid.as_u128() as u64
    }
    fn __repr__(&self) -> String {
        let s = self.settings();
        format!("<Snapshot {:?} {{{}}}>", s.name, s.uuid)
    }
}

/// The files needed to resume a machine's state on another host.
#[derive(Debug)]
#[pyclass(module = "unacloud.vbox", frozen)]
pub struct MigrationSet {
    pub(crate) inner: unacloud_core::files::MigrationSet,
    pub(crate) state: String,
}

#[pymethods]
impl MigrationSet {
    /// Files to copy: dicts with `path`, `role` (settings, disk, saved-state), `uuid`
    /// (None for non-disks) and `bytes` (None when the file is missing).
    #[getter]
    fn files(&self, py: Python<'_>) -> PyResult<PyObject> {
        files_list(py, &self.inner.files)
    }
    /// Sum of the lengths of the files that are present, in bytes. Missing files
    /// (`bytes` None) count nothing here: check `missing_count` (or `missing`) before
    /// using this as the size to transfer.
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.inner.total_bytes()
    }
    /// How many files of the set are missing (their length is unknown, so
    /// `total_bytes` leaves them out).
    #[getter]
    fn missing_count(&self) -> usize {
        self.inner.missing().count()
    }
    /// The paths of the missing files.
    #[getter]
    fn missing(&self) -> Vec<String> {
        self.inner
            .missing()
            .map(|f| f.path.display().to_string())
            .collect()
    }
    /// One dict per file (`path`, `role`, `uuid`, `bytes`); iterating the set yields
    /// the same, so `pandas.DataFrame(migration_set)` has a row per file.
    fn records(&self, py: Python<'_>) -> PyResult<PyObject> {
        files_list(py, &self.inner.files)
    }
    /// `records()` as a `pandas.DataFrame` (pandas is imported only here).
    fn to_pandas(&self, py: Python<'_>) -> PyResult<PyObject> {
        crate::results::dataframe(
            py,
            files_list(py, &self.inner.files)?,
            "MigrationSet.to_pandas()",
        )
    }
    fn __iter__(&self, py: Python<'_>) -> PyResult<PyObject> {
        Ok(files_list(py, &self.inner.files)?
            .bind(py)
            .try_iter()?
            .into_any()
            .unbind())
    }
    fn __reduce__(slf: &Bound<'_, Self>) -> PyResult<(PyObject, (PyObject, String))> {
        let py = slf.py();
        let data = to_py(py, &slf.get().inner)?;
        Ok((
            slf.get_type().into_any().unbind(),
            (data, slf.get().state.clone()),
        ))
    }
    /// A set from its serialised form (what pickling uses).
    #[new]
    #[pyo3(signature = (data, state="restored".to_owned()))]
    fn new(data: &Bound<'_, PyAny>, state: String) -> PyResult<Self> {
        Ok(MigrationSet {
            inner: crate::convert::from_py(data, "migration set")?,
            state,
        })
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .downcast::<MigrationSet>()
            .is_ok_and(|o| o.get().inner == self.inner)
    }
    /// Images the destination must already have (preloaded templates): dicts with
    /// `uuid` and `path`.
    #[getter]
    fn expected_at_destination(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.inner.expected_at_destination)
    }
    /// Images used but not copied (DVD/floppy, unresolved), described in words.
    #[getter]
    fn external(&self) -> Vec<String> {
        self.inner.external.clone()
    }
    /// Non-fatal findings such as missing files.
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.inner.warnings.clone()
    }
    /// Everything as one plain dict (the same shape as the `file_tracker --json` output
    /// without the machine and snapshot headers, plus `missing_count`). For a table of
    /// the files use `pandas.DataFrame(migration_set)` or `to_pandas()`.
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        let d = pyo3::types::PyDict::new(py);
        d.set_item("files", files_list(py, &self.inner.files)?)?;
        d.set_item("total_bytes", self.inner.total_bytes())?;
        d.set_item("missing_count", self.inner.missing().count())?;
        d.set_item(
            "expected_at_destination",
            to_py(py, &self.inner.expected_at_destination)?,
        )?;
        d.set_item("external", self.inner.external.clone())?;
        d.set_item("warnings", self.inner.warnings.clone())?;
        Ok(d.into_any().unbind())
    }
    fn __len__(&self) -> usize {
        self.inner.files.len()
    }
    fn __repr__(&self) -> String {
        let missing = self.inner.missing().count();
        format!(
            "<MigrationSet for {}: {} files, {} bytes{}>",
            self.state,
            self.inner.files.len(),
            self.inner.total_bytes(),
            if missing > 0 {
                format!(" ({missing} missing, not counted)")
            } else {
                String::new()
            }
        )
    }
}

#[pymethods]
impl Machine {
    /// Loads a `.vbox` file; `global_registry` is the host's `VirtualBox.xml`, needed
    /// when disks (e.g. preloaded multiattach templates) are registered only there.
    #[staticmethod]
    #[pyo3(signature = (path, global_registry=None))]
    fn load(py: Python<'_>, path: PathBuf, global_registry: Option<PathBuf>) -> PyResult<Machine> {
        let m = py
            .allow_threads(|| RsMachine::load(&path, global_registry.as_deref()))
            .map_err(vbox_err)?;
        Ok(Machine { inner: Arc::new(m) })
    }
    /// The machine's name.
    #[getter]
    fn name(&self) -> String {
        self.inner.name().to_owned()
    }
    /// The machine's uuid, without braces.
    #[getter]
    fn uuid(&self) -> String {
        self.inner.uuid().to_string()
    }
    /// Path of the settings file.
    #[getter]
    fn settings_path(&self) -> String {
        self.inner.settings_path().display().to_string()
    }
    /// Every snapshot, in file order (the root first).
    #[getter]
    fn snapshots(&self) -> Vec<Snapshot> {
        (0..self.inner.snapshots().len())
            .map(|i| Snapshot {
                machine: self.inner.clone(),
                index: i,
            })
            .collect()
    }
    /// The snapshot the current state hangs below, or None.
    #[getter]
    fn current_snapshot(&self) -> Option<Snapshot> {
        let cur = self.inner.current_snapshot()?;
        let index = self
            .inner
            .snapshots()
            .iter()
            .position(|s| s.uuid == cur.uuid)?;
        Some(Snapshot {
            machine: self.inner.clone(),
            index,
        })
    }
    /// The snapshot tree rendered as `"text"`, `"dot"` or `"json"`.
    #[pyo3(signature = (format="text"))]
    fn snapshot_tree(&self, format: &str) -> PyResult<String> {
        let f: TreeFormat = format.parse().map_err(vbox_err)?;
        self.inner.render_snapshot_tree(f).map_err(vbox_err)
    }
    /// The files needed to resume `snapshot` (a uuid, a unique name, a `Snapshot`, or
    /// `"current"` for the machine's current state, which every machine has, with or
    /// without snapshots) on another host. Images whose uuids are in `preloaded` are expected
    /// at the destination and not copied.
    #[pyo3(signature = (snapshot, preloaded=Vec::new(), include_removable=false))]
    fn migration_set(
        &self,
        py: Python<'_>,
        snapshot: Bound<'_, PyAny>,
        preloaded: Vec<String>,
        include_removable: bool,
    ) -> PyResult<MigrationSet> {
        let selector: String = if let Ok(s) = snapshot.downcast::<Snapshot>() {
            s.get().settings().uuid.to_string()
        } else {
            snapshot.extract::<String>().map_err(|_| {
                invalid("snapshot must be a uuid, a name, a Snapshot or \"current\"")
            })?
        };
        let mut uuids = Vec::new();
        for p in &preloaded {
            uuids.push(
                uuid::Uuid::try_parse(p.trim())
                    .map_err(|_| invalid(format!("preloaded entry {p:?} is not a uuid")))?,
            );
        }
        let mut options = MigrationOptions::default().with_preloaded(uuids);
        options.include_removable = include_removable;
        let inner = self.inner.clone();
        let sel = selector.clone();
        let set = py
            .allow_threads(move || inner.migration_set(&sel, &options))
            .map_err(vbox_err)?;
        Ok(MigrationSet {
            inner: set,
            state: selector,
        })
    }
    /// Every file of the machine (settings, disks, saved states) as dicts.
    fn all_files(&self, py: Python<'_>) -> PyResult<PyObject> {
        let inner = self.inner.clone();
        let all = py.allow_threads(move || inner.all_files());
        files_list(py, &all.files)
    }
    /// The machine as a plain dict: `name`, `uuid`, `settings_path`, `snapshots` (each
    /// `Snapshot.to_dict()`, in file order), `current_snapshot` (its uuid or None) and
    /// `expected_file_count`.
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        let d = pyo3::types::PyDict::new(py);
        d.set_item("name", self.inner.name())?;
        d.set_item("uuid", self.inner.uuid().to_string())?;
        d.set_item(
            "settings_path",
            self.inner.settings_path().display().to_string(),
        )?;
        let snaps = self
            .snapshots()
            .iter()
            .map(|s| s.to_dict(py))
            .collect::<PyResult<Vec<_>>>()?;
        d.set_item("snapshots", PyList::new(py, snaps)?)?;
        d.set_item(
            "current_snapshot",
            self.inner.current_snapshot().map(|s| s.uuid.to_string()),
        )?;
        d.set_item("expected_file_count", self.expected_file_count())?;
        Ok(d.into_any().unbind())
    }
    /// The file count the thesis's Eq. 5.4 predicts for this machine.
    #[getter]
    fn expected_file_count(&self) -> u64 {
        self.inner.all_files().expected_count
    }
    /// Files that neither the current state nor any snapshot needs (what a clean-up
    /// could delete), as dicts.
    fn unneeded_files(&self, py: Python<'_>) -> PyResult<PyObject> {
        let inner = self.inner.clone();
        let files = py.allow_threads(move || inner.unneeded_files());
        files_list(py, &files)
    }
    fn __repr__(&self) -> String {
        format!(
            "<Machine {:?} {{{}}}: {} snapshots>",
            self.inner.name(),
            self.inner.uuid(),
            self.inner.snapshots().len()
        )
    }
}

/// Reads a VDI image's header: a dict with the image type, sizes, block counts and
/// the image and parent uuids.
#[pyfunction]
pub fn read_vdi_header(py: Python<'_>, path: PathBuf) -> PyResult<PyObject> {
    let h: VdiHeader = py
        .allow_threads(|| VdiHeader::read(&path))
        .map_err(vbox_err)?;
    let d = pyo3::types::PyDict::new(py);
    d.set_item(
        "version",
        format!("{}.{}", h.version_major, h.version_minor),
    )?;
    d.set_item("image_type", h.image_type.as_str())?;
    d.set_item("disk_size", h.disk_size)?;
    d.set_item("block_size", h.block_size)?;
    d.set_item("blocks", h.blocks)?;
    d.set_item("blocks_allocated", h.blocks_allocated)?;
    d.set_item("uuid", h.uuid.to_string())?;
    d.set_item("parent_uuid", h.parent_uuid.map(|u| u.to_string()))?;
    d.set_item("comment", h.comment)?;
    Ok(d.into_any().unbind())
}

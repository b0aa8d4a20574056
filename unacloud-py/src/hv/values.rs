//! The values `unacloud.hv` returns: disks, VM information and snapshot trees.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use unacloud_core::model::{DiskInfo, VmInfo as RsVmInfo};
use unacloud_core::tree::{NodeId, SnapshotTree as RsSnapshotTree};

use crate::convert::to_py;
use crate::errors::invalid;

/// A registered disk image.
#[pyclass(module = "unacloud.hv", frozen)]
#[derive(Debug)]
pub struct Disk {
    pub(crate) inner: DiskInfo,
}

#[pymethods]
impl Disk {
    /// The image's uuid.
    #[getter]
    fn uuid(&self) -> String {
        self.inner.uuid.to_string()
    }
    /// The image file.
    #[getter]
    fn path(&self) -> String {
        self.inner.location.display().to_string()
    }
    /// Its format (`qcow2`, `VDI`, `raw`, …).
    #[getter]
    fn format(&self) -> String {
        self.inner.format.to_string()
    }
    /// Its write mode: `normal`, `multiattach`, `immutable`, …
    #[getter]
    fn disk_type(&self) -> &'static str {
        self.inner.disk_type.as_cli()
    }
    /// The differencing parent's uuid, or None for a base image.
    #[getter]
    fn parent(&self) -> Option<String> {
        self.inner.parent.map(|u| u.to_string())
    }
    /// Virtual size in bytes, when known.
    #[getter]
    fn logical_size(&self) -> Option<u64> {
        self.inner.logical_size
    }
    /// Everything as a plain dict.
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        let d = PyDict::new(py);
        d.set_item("uuid", self.uuid())?;
        d.set_item("path", self.path())?;
        d.set_item("format", self.format())?;
        d.set_item("disk_type", self.disk_type())?;
        d.set_item("parent", self.parent())?;
        d.set_item("logical_size", self.inner.logical_size)?;
        Ok(d.into_any().unbind())
    }
    fn __repr__(&self) -> String {
        format!(
            "<Disk {} {} ({})>",
            self.inner.uuid,
            self.inner.location.display(),
            self.inner.disk_type.as_cli()
        )
    }
}

/// A VM as the hypervisor reports it.
#[pyclass(module = "unacloud.hv", frozen)]
#[derive(Debug)]
pub struct VmInfo {
    pub(crate) inner: RsVmInfo,
}

fn state_str(s: &unacloud_core::model::PowerState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| s.to_string())
}

#[pymethods]
impl VmInfo {
    /// The VM's name.
    #[getter]
    fn name(&self) -> String {
        self.inner.name.clone()
    }
    /// Its uuid, when the backend has one.
    #[getter]
    fn uuid(&self) -> Option<String> {
        self.inner.uuid.map(|u| u.to_string())
    }
    /// Its power state: `powered-off`, `running`, `paused`, `saved`, `aborted`, …
    #[getter]
    fn state(&self) -> String {
        state_str(&self.inner.state)
    }
    /// Virtual CPUs.
    #[getter]
    fn cpus(&self) -> u32 {
        self.inner.cores
    }
    /// Memory, MiB.
    #[getter]
    fn memory_mb(&self) -> u64 {
        self.inner.memory_mb
    }
    /// Attached disks: dicts with `controller`, `port`, `device` and `disk` (uuid).
    #[getter]
    fn disks(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.inner.disks)
    }
    /// The id of the snapshot the current state hangs below, or None.
    #[getter]
    fn current_snapshot(&self) -> Option<String> {
        self.inner.current_snapshot.clone()
    }
    /// The settings file, when the VM has one.
    #[getter]
    fn settings_file(&self) -> Option<String> {
        self.inner
            .settings_file
            .as_ref()
            .map(|p| p.display().to_string())
    }
    /// Everything as a plain dict (`cores` is `cpus`).
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.inner)
    }
    fn __repr__(&self) -> String {
        format!("<VmInfo {:?} {}>", self.inner.name, self.state())
    }
}

/// A VM's snapshot tree with the current-state position.
#[pyclass(module = "unacloud.hv", frozen)]
#[derive(Debug)]
pub struct SnapshotTree {
    pub(crate) inner: Arc<RsSnapshotTree>,
}

#[pymethods]
impl SnapshotTree {
    /// Every snapshot, depth first from the roots (parents before children).
    #[getter]
    fn snapshots(&self) -> Vec<SnapshotNode> {
        self.inner
            .iter()
            .map(|(node, _)| SnapshotNode {
                tree: self.inner.clone(),
                node,
                report: None,
            })
            .collect()
    }
    /// The snapshot the current state hangs below, or None.
    #[getter]
    fn current(&self) -> Option<SnapshotNode> {
        self.inner.current().map(|node| SnapshotNode {
            tree: self.inner.clone(),
            node,
            report: None,
        })
    }
    /// The tree as `"text"` (indented, the current one marked `*`), `"dot"` or
    /// `"json"`.
    #[pyo3(signature = (format="text"))]
    fn render(&self, format: &str) -> PyResult<String> {
        match format {
            "text" => Ok(self.inner.render_text()),
            "dot" => Ok(self.inner.render_dot()),
            "json" => serde_json::to_string(&self.inner.to_json())
                .map_err(|e| invalid(format!("cannot render the tree: {e}"))),
            other => Err(invalid(format!(
                "unknown tree format {other:?}; expected text, dot or json"
            ))),
        }
    }
    /// The tree as a plain dict: `{"current": id|None, "snapshots": [...nested...]}`.
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.inner.to_json())
    }
    fn __len__(&self) -> usize {
        self.inner.len()
    }
    fn __repr__(&self) -> String {
        format!("<SnapshotTree of {} snapshots>", self.inner.len())
    }
}

/// One snapshot of a VM.
#[pyclass(module = "unacloud.hv", frozen)]
#[derive(Debug)]
pub struct SnapshotNode {
    pub(crate) tree: Arc<RsSnapshotTree>,
    pub(crate) node: NodeId,
    pub(crate) report: Option<serde_json::Value>,
}

impl SnapshotNode {
    pub(crate) fn snap(&self) -> &unacloud_core::tree::Snapshot {
        // Nodes are only made from ids of the same tree.
        static EMPTY: std::sync::OnceLock<unacloud_core::tree::Snapshot> =
            std::sync::OnceLock::new();
        self.tree
            .get(self.node)
            .unwrap_or_else(|| EMPTY.get_or_init(Default::default))
    }
    fn at(&self, node: NodeId) -> SnapshotNode {
        SnapshotNode {
            tree: self.tree.clone(),
            node,
            report: None,
        }
    }
}

#[pymethods]
impl SnapshotNode {
    /// The snapshot's name (names may repeat).
    #[getter]
    fn name(&self) -> String {
        self.snap().name.clone()
    }
    /// The backend's identifier of the snapshot: a uuid for VirtualBox and the
    /// in-memory double, `uc-<hex>` for QEMU.
    #[getter]
    fn uuid(&self) -> String {
        self.snap().id.clone()
    }
    /// Its description, or None.
    #[getter]
    fn description(&self) -> Option<String> {
        self.snap().description.clone()
    }
    /// When it was taken, as the backend wrote it, or None.
    #[getter]
    fn time(&self) -> Option<String> {
        self.snap().time_stamp.clone()
    }
    /// The saved memory state, or None for a snapshot of a VM that was off.
    #[getter]
    fn state_file(&self) -> Option<String> {
        self.snap().state_file.clone()
    }
    /// The parent snapshot, or None for a root.
    #[getter]
    fn parent(&self) -> Option<SnapshotNode> {
        self.tree.parent(self.node).map(|p| self.at(p))
    }
    /// Child snapshots, oldest first.
    #[getter]
    fn children(&self) -> Vec<SnapshotNode> {
        self.tree
            .children(self.node)
            .iter()
            .map(|&c| self.at(c))
            .collect()
    }
    /// Whether the current state hangs directly below this snapshot.
    #[getter]
    fn is_current(&self) -> bool {
        self.tree.current() == Some(self.node)
    }
    /// For a snapshot just taken on QEMU: `with_memory`, `background`, `downtime_ms`,
    /// `total_ms`, `state_bytes` and `snapshot`; otherwise None.
    #[getter]
    fn report(&self, py: Python<'_>) -> PyResult<Option<PyObject>> {
        self.report.as_ref().map(|r| to_py(py, r)).transpose()
    }
    /// The snapshot as a plain dict (without children).
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        let d = PyDict::new(py);
        d.set_item("uuid", self.uuid())?;
        d.set_item("name", self.name())?;
        d.set_item("description", self.description())?;
        d.set_item("time", self.time())?;
        d.set_item("state_file", self.state_file())?;
        d.set_item(
            "parent",
            self.tree
                .parent(self.node)
                .and_then(|p| self.tree.get(p))
                .map(|s| s.id.clone()),
        )?;
        d.set_item("current", self.is_current())?;
        Ok(d.into_any().unbind())
    }
    fn __eq__(&self, other: &SnapshotNode) -> bool {
        self.snap().id == other.snap().id
    }
    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.snap().id.hash(&mut h);
        h.finish()
    }
    fn __repr__(&self) -> String {
        let s = self.snap();
        format!("<SnapshotNode {:?} {}>", s.name, s.id)
    }
}

//! `unacloud.experiment`: the thesis experiment with real VMs (unacloud-snapshot's
//! `net::ring_vms::run_ring_vms`, the `ring_vms` example) from Python.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::{PyImportError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use unacloud_snapshot::net::daemon::BackendKind;
use unacloud_snapshot::net::ring_vms::{run_ring_vms, GuestImage, RingVmsConfig, RingVmsReport};

use crate::args;
use crate::convert::{from_py, to_py};
use crate::errors::{invalid, missing_file, raise};
use crate::runtime::{block_on, new_runtime};
use crate::snapshot::net_err;

/// The keys of the `ring_vms --json` object, in its order (the report's field order,
/// which pythonize keeps and a `serde_json::Value` map would sort).
fn report_fields(py: Python<'_>) -> PyResult<Vec<String>> {
    let d = pythonize::pythonize(py, &RingVmsReport::default())
        .map_err(|e| invalid(format!("cannot convert the report: {e}")))?;
    d.downcast::<PyDict>()?
        .keys()
        .iter()
        .map(|k| k.extract::<String>())
        .collect()
}

/// The guest image: `guest_dir`, else `$UNACLOUD_GUEST_DIR`; a missing file is a
/// `FileNotFoundError` naming it.
fn guest_image(guest_dir: Option<PathBuf>) -> PyResult<GuestImage> {
    let dir = guest_dir
        .or_else(|| std::env::var_os("UNACLOUD_GUEST_DIR").map(PathBuf::from))
        .ok_or_else(|| {
            invalid(
                "no guest image: pass guest_dir= or set UNACLOUD_GUEST_DIR to the folder \
                 scripts/guest-image builds (vmlinuz, initrd.img, rootfs.qcow2)",
            )
        })?;
    let g = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        template: dir.join("rootfs.qcow2"),
    };
    for f in [&g.kernel, &g.initrd, &g.template] {
        if !f.is_file() {
            return Err(missing_file(
                f,
                format!(
                    "the guest image has no {} (build it with scripts/guest-image)",
                    f.display()
                ),
            ));
        }
    }
    Ok(g)
}

fn emit(progress: Option<&Bound<'_, PyAny>>, event: Bound<'_, PyDict>) -> PyResult<()> {
    match progress {
        Some(p) => p.call1((event,)).map(drop),
        None => Ok(()),
    }
}

/// Runs the RCPBT token ring inside `vms` QEMU guests on `hosts` emulated PCs, takes
/// `snapshots` consistent global snapshots while it runs and, with `power_off`, powers
/// every PC off and resumes from the latest one (`relocate` VMs on spare PCs). Needs
/// root (network namespaces, taps, netfilter: `PermissionError` otherwise) and the
/// guest image (`guest_dir` or `$UNACLOUD_GUEST_DIR`). `progress(event)` receives
/// `{"event": "start", ...the configuration}` before and `{"event": "finish",
/// "result": RingVmsResult}` or `{"event": "error", "error": str}` after the run
/// (the Rust function reports nothing in between). Ctrl-C stops the run and removes
/// every VM, namespace, rule and file it made.
#[pyfunction]
#[pyo3(signature = (vms=2, hosts=2, tokens=5000, snapshots=1, power_off=false, relocate=0, progress=None, *, spare_hosts=None, memory_mb=128, gap_s=1.0, accel="auto", backend="nft-netlink", guest_dir=None))]
#[allow(clippy::too_many_arguments)]
pub fn ring_vms(
    py: Python<'_>,
    #[pyo3(from_py_with = args::vms)] vms: u32,
    #[pyo3(from_py_with = args::hosts)] hosts: u32,
    #[pyo3(from_py_with = args::tokens)] tokens: u64,
    #[pyo3(from_py_with = args::snapshots)] snapshots: u32,
    power_off: bool,
    #[pyo3(from_py_with = args::relocate)] relocate: u32,
    progress: Option<&Bound<'_, PyAny>>,
    #[pyo3(from_py_with = args::spare_hosts)] spare_hosts: Option<u32>,
    #[pyo3(from_py_with = args::memory_mb)] memory_mb: u64,
    #[pyo3(from_py_with = args::gap_s)] gap_s: f64,
    accel: &str,
    backend: &str,
    guest_dir: Option<PathBuf>,
) -> PyResult<Py<RingVmsResult>> {
    let spare_hosts = spare_hosts.unwrap_or(relocate.div_ceil(2));
    let gap = Duration::from_secs_f64(gap_s);
    let accel: unacloud_core::qemu::Accel = accel.parse().map_err(crate::errors::core_err)?;
    let backend: BackendKind = backend
        .parse()
        .map_err(|e| invalid(format!("backend {backend:?}: {e}")))?;
    if let Some(p) = progress {
        if !p.is_none() && !p.is_callable() {
            return Err(PyTypeError::new_err("progress must be a callable or None"));
        }
    }
    let progress = progress.filter(|p| !p.is_none());
    py.allow_threads(unacloud_snapshot::netns::probe)
        .map_err(net_err)?;
    let guest = guest_image(guest_dir)?;
    let python: PathBuf = py
        .import("sys")?
        .getattr("executable")?
        .extract::<Option<PathBuf>>()?
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| {
            raise(
                "Unsupported",
                "cannot start the test manager: sys.executable is unknown".to_owned(),
            )
        })?;
    let mut cfg = RingVmsConfig::new(
        vms,
        hosts,
        tokens,
        snapshots,
        guest,
        python,
        vec!["-m".to_owned(), "unacloud._gs".to_owned()],
    );
    cfg.spare_hosts = spare_hosts;
    cfg.power_off = power_off;
    cfg.relocate = relocate;
    cfg.memory_mb = memory_mb;
    cfg.gap = gap;
    cfg.accel = accel;
    cfg.backend = backend;

    let start = PyDict::new(py);
    start.set_item("event", "start")?;
    start.set_item("vms", vms)?;
    start.set_item("hosts", hosts)?;
    start.set_item("spare_hosts", spare_hosts)?;
    start.set_item("tokens", tokens)?;
    start.set_item("snapshots", snapshots)?;
    start.set_item("power_off", power_off)?;
    start.set_item("relocate", relocate)?;
    emit(progress, start)?;

    let rt = new_runtime()?;
    let outcome = block_on(py, &rt, run_ring_vms(cfg));
    let report = match outcome {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let err = net_err(e);
            let ev = PyDict::new(py);
            ev.set_item("event", "error")?;
            ev.set_item("error", err.value(py).str()?.to_string())?;
            emit(progress, ev)?;
            return Err(err);
        }
        Err(interrupted) => {
            let ev = PyDict::new(py);
            ev.set_item("event", "error")?;
            ev.set_item("error", "interrupted")?;
            // The interruption is what the caller must see, not a callback's error.
            let _ = emit(progress, ev);
            return Err(interrupted);
        }
    };
    let value = serde_json::to_value(&report)
        .map_err(|e| invalid(format!("cannot convert the report: {e}")))?;
    let result = Py::new(py, RingVmsResult { report: value })?;
    let ev = PyDict::new(py);
    ev.set_item("event", "finish")?;
    ev.set_item("result", result.clone_ref(py))?;
    emit(progress, ev)?;
    Ok(result)
}

/// The outcome of `ring_vms`: the `ring_vms --json` object.
#[pyclass(module = "unacloud.experiment", frozen)]
#[derive(Debug)]
pub struct RingVmsResult {
    report: serde_json::Value,
}

impl RingVmsResult {
    fn u64_field(&self, key: &str) -> u64 {
        self.report[key].as_u64().unwrap_or(0)
    }
    fn floats(&self, key: &str) -> Vec<f64> {
        self.report[key]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect())
            .unwrap_or_default()
    }
}

#[pymethods]
impl RingVmsResult {
    /// The field names of `to_dict()` (those of `ring_vms --json`).
    #[classattr]
    #[allow(non_snake_case)]
    fn FIELDS(py: Python<'_>) -> PyResult<Vec<String>> {
        report_fields(py)
    }

    /// The same as `from_dict` (which pickling uses).
    #[new]
    fn new(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<RingVmsResult> {
        Self::from_dict(py, data)
    }

    fn __reduce__(slf: &Bound<'_, Self>) -> PyResult<(PyObject, (PyObject,))> {
        let d = slf.get().to_dict(slf.py())?;
        Ok((slf.get_type().into_any().unbind(), (d,)))
    }

    /// A result from a `ring_vms --json` object (e.g. one entry of
    /// `benches/ring_vms/results.json`); it must have exactly the fields of `FIELDS`.
    #[staticmethod]
    fn from_dict(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<RingVmsResult> {
        let report: serde_json::Value = from_py(data, "ring_vms result")?;
        let Some(obj) = report.as_object() else {
            return Err(invalid("a ring_vms result must be a dict"));
        };
        let fields = report_fields(py)?;
        let missing: Vec<&str> = fields
            .iter()
            .filter(|f| !obj.contains_key(f.as_str()))
            .map(String::as_str)
            .collect();
        let extra: Vec<&str> = obj
            .keys()
            .filter(|k| !fields.contains(k))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            return Err(invalid(format!(
                "not a ring_vms result: missing fields {missing:?}, unknown fields {extra:?}"
            )));
        }
        Ok(RingVmsResult { report })
    }

    /// Every field of the `ring_vms --json` object, in its order, as plain Python data.
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        let d = PyDict::new(py);
        for key in report_fields(py)? {
            d.set_item(&key, to_py(py, &self.report[key.as_str()])?)?;
        }
        Ok(d.into_any().unbind())
    }

    /// One row per completed global snapshot: `global_snapshot` (its id), `local_ms`
    /// (slowest local snapshot), `global_ms`, `overhead_ms` (global − slowest local) and
    /// `downtime_ms` (the longest guest pause among its VMs; NaN when some VM did not
    /// report one). Needs pandas (imported here, not with the package).
    fn to_pandas(&self, py: Python<'_>) -> PyResult<PyObject> {
        let pandas = py.import("pandas").map_err(|e| {
            PyImportError::new_err(format!(
                "RingVmsResult.to_pandas() needs pandas, which is not installed \
                 (pip install pandas): {e}"
            ))
        })?;
        let ids: Vec<u64> = self.report["completed_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        let n = ids.len();
        let col = |key: &str| {
            let mut v = self.floats(key);
            v.resize(n, f64::NAN);
            v
        };
        let per_vm = usize::try_from(self.u64_field("vms")).unwrap_or(0);
        let downtime = self.floats("vm_downtime_ms");
        let downtime: Vec<f64> = if per_vm > 0 && downtime.len() == per_vm * n {
            downtime
                .chunks(per_vm)
                .map(|c| c.iter().copied().fold(f64::NAN, f64::max))
                .collect()
        } else {
            vec![f64::NAN; n]
        };
        let columns = PyDict::new(py);
        columns.set_item("global_snapshot", PyList::new(py, ids)?)?;
        columns.set_item("local_ms", col("local_ms"))?;
        columns.set_item("global_ms", col("global_ms"))?;
        columns.set_item("overhead_ms", col("overhead_ms"))?;
        columns.set_item("downtime_ms", downtime)?;
        Ok(pandas.getattr("DataFrame")?.call1((columns,))?.unbind())
    }

    /// Whether the ring's peers counted exactly the tokens sent (none lost or
    /// duplicated).
    #[getter]
    fn exact(&self) -> bool {
        self.u64_field("tokens_counted") == self.u64_field("tokens_expected")
    }
    /// VMs.
    #[getter]
    fn vms(&self) -> u64 {
        self.u64_field("vms")
    }
    /// PCs (without spares).
    #[getter]
    fn hosts(&self) -> u64 {
        self.u64_field("hosts")
    }
    /// Tokens configured.
    #[getter]
    fn tokens_expected(&self) -> u64 {
        self.u64_field("tokens_expected")
    }
    /// Tokens the ring's peers counted.
    #[getter]
    fn tokens_counted(&self) -> u64 {
        self.u64_field("tokens_counted")
    }
    /// Ids of the completed global snapshots.
    #[getter]
    fn completed_ids(&self) -> Vec<u64> {
        self.report["completed_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default()
    }
    /// The global snapshot the ring resumed from, or None.
    #[getter]
    fn restored_from(&self) -> Option<u64> {
        self.report["restored_from"].as_u64()
    }
    /// What went wrong, for the operator (empty on a clean run).
    #[getter]
    fn failures(&self) -> Vec<String> {
        self.report["failures"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
    fn __repr__(&self) -> String {
        format!(
            "<RingVmsResult {} VMs on {} hosts: {} of {} tokens, {} global snapshots>",
            self.vms(),
            self.hosts(),
            self.tokens_counted(),
            self.tokens_expected(),
            self.completed_ids().len()
        )
    }
}

/// The test manager's entry point (`python -m unacloud._gs …`): the `unacloud-gs`
/// command line, which `ring_vms` starts inside the lab's hub namespace. Returns the
/// exit status.
#[pyfunction]
pub fn _gs_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    unacloud_snapshot::net::cli::init_tracing();
    let code = py.allow_threads(|| unacloud_snapshot::net::cli::main(&argv));
    if code == std::process::ExitCode::SUCCESS {
        0
    } else {
        1
    }
}

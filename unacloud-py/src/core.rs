//! `unacloud.core`: hardware profiles, placement and the cost model.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use unacloud_core::cost::{files_per_system, files_per_vm, VmStorage};
use unacloud_core::model::{HardwareProfile, Host, HostId};
use unacloud_core::placement::{
    place as rs_place, place_best_effort, Algorithm, Placement as RsPlacement, VmRequest,
};

use crate::args;
use crate::convert::{from_py, to_py};
use crate::errors::core_err;
use crate::results::dataframe;

/// The hardware profiles of the thesis (Table 2.3) as a list of dicts with `name`,
/// `cores` and `memory_mb`.
#[pyfunction]
pub fn hardware_profiles(py: Python<'_>) -> PyResult<PyObject> {
    let list: Vec<_> = HardwareProfile::ALL
        .iter()
        .map(|p| {
            serde_json::json!({"name": p.as_str(), "cores": p.cores(), "memory_mb": p.memory_mb()})
        })
        .collect();
    to_py(py, &list)
}

/// One profile by name (`small`, `medium`, `large`, `extra-large`) as a dict.
#[pyfunction]
pub fn hardware_profile(py: Python<'_>, name: &str) -> PyResult<PyObject> {
    let p: HardwareProfile = name.parse().map_err(core_err)?;
    to_py(
        py,
        &serde_json::json!({"name": p.as_str(), "cores": p.cores(), "memory_mb": p.memory_mb()}),
    )
}

/// The names of the placement algorithms.
#[pyfunction]
pub fn placement_algorithms() -> Vec<&'static str> {
    Algorithm::ALL.iter().map(|a| a.as_str()).collect()
}

/// Places VMs on hosts with one of the eight algorithms (`placement_algorithms()`).
///
/// `hosts`: dicts with `id`, `free_cores`, `free_memory_mb`, `free_disk_bytes` and
/// optionally `user_logged_in`, `preloaded_templates`. `vms`: dicts with `name`,
/// `template`, `profile` and optionally `disk_bytes`, `template_bytes`. `seed` makes
/// `random` reproducible (without one a seed is drawn and reported in the result).
/// Returns a `Placement`; raises `PlacementError` naming every VM that fits nowhere,
/// unless `best_effort`, which keeps the partial plan and lists them in `unplaced`.
#[pyfunction]
#[pyo3(signature = (hosts, vms, algorithm="best-fit", seed=None, *, best_effort=false))]
pub fn place(
    py: Python<'_>,
    hosts: &Bound<'_, PyAny>,
    vms: &Bound<'_, PyAny>,
    algorithm: &str,
    #[pyo3(from_py_with = args::opt_seed)] seed: Option<u64>,
    best_effort: bool,
) -> PyResult<Placement> {
    let hosts: Vec<Host> = from_py(hosts, "hosts")?;
    let vms: Vec<VmRequest> = from_py(vms, "vms")?;
    let algorithm: Algorithm = algorithm.parse().map_err(core_err)?;
    let plan = py
        .allow_threads(|| {
            if best_effort {
                place_best_effort(&hosts, &vms, algorithm, seed)
            } else {
                rs_place(&hosts, &vms, algorithm, seed)
            }
        })
        .map_err(core_err)?;
    Ok(Placement { plan, vms })
}

/// A placement plan: which host each VM goes to, what is left on each host, the
/// template copies the plan needs and the VMs no host could take. `records()` (and
/// iterating the plan) gives one dict per placed VM, so `pandas.DataFrame(plan)` has a
/// row per VM. `to_dict()` is plain data that `Placement(d)` turns back into a plan
/// (that is how it pickles); `unacloud.provision.deploy` executes it.
#[pyclass(module = "unacloud.core", frozen)]
#[derive(Debug, Clone)]
pub struct Placement {
    pub(crate) plan: RsPlacement,
    /// The requests the plan was made for.
    pub(crate) vms: Vec<VmRequest>,
}

impl Placement {
    fn records_list(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        self.plan
            .assignments
            .iter()
            .map(|a| {
                let d = PyDict::new(py);
                d.set_item("vm", &a.vm)?;
                d.set_item("host", &a.host.0)?;
                if let Some(r) = self.vms.iter().find(|r| r.name == a.vm) {
                    d.set_item("template", &r.template)?;
                    d.set_item("profile", r.profile.as_str())?;
                    d.set_item("cores", r.profile.cores())?;
                    d.set_item("memory_mb", r.profile.memory_mb())?;
                    d.set_item("disk_bytes", r.disk_bytes)?;
                }
                Ok(d.into_any().unbind())
            })
            .collect()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PlacementData {
    #[serde(flatten)]
    plan: RsPlacement,
    vms: Vec<VmRequest>,
}

#[pymethods]
impl Placement {
    /// A plan from `to_dict()` output.
    #[new]
    fn new(data: &Bound<'_, PyAny>) -> PyResult<Self> {
        let d: PlacementData = from_py(data, "placement")?;
        Ok(Placement {
            plan: d.plan,
            vms: d.vms,
        })
    }
    /// The algorithm that made the plan.
    #[getter]
    fn algorithm(&self) -> &'static str {
        self.plan.algorithm.as_str()
    }
    /// For `random`, the seed used (pass it back to reproduce the plan); else None.
    #[getter]
    fn seed(&self) -> Option<u64> {
        self.plan.seed
    }
    /// Placed VMs in request order: dicts with `vm` and `host`.
    #[getter]
    fn assignments(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.plan.assignments)
    }
    /// The hosts in the order given, with the resources left after the plan (host
    /// dicts as `place` takes them).
    #[getter]
    fn remaining(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.plan.remaining)
    }
    /// Templates to copy before the VMs can be created: dicts with `host`, `template`,
    /// `bytes`.
    #[getter]
    fn template_copies(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.plan.template_copies)
    }
    /// VMs no host could take (only with `best_effort`): dicts with `vm`, `reason`.
    #[getter]
    fn unplaced(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.plan.unplaced)
    }
    /// The VM requests the plan was made for (as `place` took them).
    #[getter]
    fn vms(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.vms)
    }
    /// The host chosen for `vm`, or None.
    fn host_of(&self, vm: &str) -> Option<String> {
        self.plan.host_of(vm).map(|h| h.0.clone())
    }
    /// The VMs placed on `host`, in request order.
    fn vms_on(&self, host: &str) -> Vec<String> {
        let id = HostId(host.to_owned());
        self.plan.vms_on(&id).map(str::to_owned).collect()
    }
    /// One dict per placed VM: `vm`, `host`, `template`, `profile`, `cores`,
    /// `memory_mb`, `disk_bytes`.
    fn records(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        self.records_list(py)
    }
    /// The plan as plain data: `algorithm`, `seed`, `assignments`, `remaining`,
    /// `template_copies`, `unplaced` and `vms` (the requests).
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(
            py,
            &PlacementData {
                plan: self.plan.clone(),
                vms: self.vms.clone(),
            },
        )
    }
    /// `records()` as a `pandas.DataFrame` (pandas is imported only here).
    fn to_pandas(&self, py: Python<'_>) -> PyResult<PyObject> {
        let records = PyList::new(py, self.records_list(py)?)?;
        dataframe(py, records.into_any().unbind(), "Placement.to_pandas()")
    }
    fn __iter__(&self, py: Python<'_>) -> PyResult<PyObject> {
        let list = PyList::new(py, self.records_list(py)?)?;
        Ok(list.try_iter()?.into_any().unbind())
    }
    fn __len__(&self) -> usize {
        self.plan.assignments.len()
    }
    fn __reduce__(slf: &Bound<'_, Self>) -> PyResult<(PyObject, (PyObject,))> {
        let d = slf.get().to_dict(slf.py())?;
        Ok((slf.get_type().into_any().unbind(), (d,)))
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .downcast::<Placement>()
            .is_ok_and(|o| o.get().plan == self.plan && o.get().vms == self.vms)
    }
    fn __repr__(&self) -> String {
        let hosts: std::collections::BTreeSet<&str> = self
            .plan
            .assignments
            .iter()
            .map(|a| a.host.0.as_str())
            .collect();
        format!(
            "<Placement {}: {} VMs on {} hosts, {} unplaced>",
            self.plan.algorithm,
            self.plan.assignments.len(),
            hosts.len(),
            self.plan.unplaced.len()
        )
    }
}

/// Files of `vms` VMs with `disks` disks and `snapshots` snapshots taken while running
/// (thesis Eq. 5.4 and 5.5).
#[pyfunction]
#[pyo3(signature = (disks, snapshots, vms=1))]
pub fn file_count(
    #[pyo3(from_py_with = args::disks)] disks: u32,
    #[pyo3(from_py_with = args::snapshots)] snapshots: u32,
    #[pyo3(from_py_with = args::vms)] vms: u32,
) -> u128 {
    if vms == 1 {
        files_per_vm(disks, snapshots)
    } else {
        files_per_system(vms, disks, snapshots)
    }
}

/// Transfer estimate for resuming a VM from snapshot `snapshot` on another host, with
/// and without a preloaded template (thesis §5.6). Sizes in bytes. Returns a dict with
/// `all_files`, `without_template` and `with_preloaded_template`, each `{files, bytes}`.
#[pyfunction]
#[pyo3(signature = (base_bytes, differencing_bytes, saved_state_bytes, snapshots, snapshot=None, disks=1, settings_bytes=0))]
#[allow(clippy::too_many_arguments)]
pub fn transfer_estimate(
    py: Python<'_>,
    #[pyo3(from_py_with = args::base_bytes)] base_bytes: u64,
    #[pyo3(from_py_with = args::differencing_bytes)] differencing_bytes: u64,
    #[pyo3(from_py_with = args::saved_state_bytes)] saved_state_bytes: u64,
    #[pyo3(from_py_with = args::snapshots)] snapshots: u32,
    #[pyo3(from_py_with = args::snapshot)] snapshot: Option<u32>,
    #[pyo3(from_py_with = args::disks)] disks: u32,
    #[pyo3(from_py_with = args::settings_bytes)] settings_bytes: u64,
) -> PyResult<PyObject> {
    let vm = VmStorage {
        disks,
        snapshots,
        settings_bytes,
        base_bytes,
        differencing_bytes,
        saved_state_bytes,
    };
    let cost = vm
        .resume_cost(snapshot.unwrap_or(snapshots))
        .map_err(core_err)?;
    let d = PyDict::new(py);
    d.set_item("snapshot", cost.snapshot)?;
    d.set_item("all_files", to_py(py, &cost.all_files)?)?;
    d.set_item("without_template", to_py(py, &cost.without_template)?)?;
    d.set_item(
        "with_preloaded_template",
        to_py(py, &cost.with_preloaded_template)?,
    )?;
    Ok(d.into_any().unbind())
}

//! `unacloud.core`: hardware profiles, placement and the cost model.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use unacloud_core::cost::{files_per_system, files_per_vm, VmStorage};
use unacloud_core::model::{HardwareProfile, Host};
use unacloud_core::placement::{place as rs_place, Algorithm, VmRequest};

use crate::args;
use crate::convert::{from_py, to_py};
use crate::errors::core_err;

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

/// Places VMs on hosts.
///
/// `hosts`: dicts with `id`, `free_cores`, `free_memory_mb`, `free_disk_bytes` and
/// optionally `user_logged_in`, `preloaded_templates`. `vms`: dicts with `name`,
/// `template`, `profile` and optionally `disk_bytes`, `template_bytes`. Returns a dict
/// with `assignments` (list of `{vm, host}`), `remaining` hosts and `template_copies`;
/// raises `PlacementError` naming every VM that fits nowhere.
#[pyfunction]
#[pyo3(signature = (hosts, vms, algorithm="best-fit", seed=None))]
pub fn place(
    py: Python<'_>,
    hosts: &Bound<'_, PyAny>,
    vms: &Bound<'_, PyAny>,
    algorithm: &str,
    #[pyo3(from_py_with = args::opt_seed)] seed: Option<u64>,
) -> PyResult<PyObject> {
    let hosts: Vec<Host> = from_py(hosts, "hosts")?;
    let vms: Vec<VmRequest> = from_py(vms, "vms")?;
    let algorithm: Algorithm = algorithm.parse().map_err(core_err)?;
    let plan = py
        .allow_threads(|| rs_place(&hosts, &vms, algorithm, seed))
        .map_err(core_err)?;
    to_py(py, &plan)
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

//! Deployments from Python: the hosts a deployment provisions on, each VM's outcome and
//! the deployment's report (unacloud-core's `provision::deploy`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use serde::{Deserialize, Serialize};
use unacloud_core::hypervisor::DiskRef;
use unacloud_core::lifecycle::State;
use unacloud_core::model::{HostId, Uuid};
use unacloud_core::provision::deploy::{
    deploy as rs_deploy, CancellationToken, DeployOptions, DeploymentPlan,
    DeploymentReport as RsReport, HostTarget as RsHostTarget, RetryPolicy, VmOutcome as RsOutcome,
    VmResult,
};

use super::{callable, Catalog};
use crate::convert::{from_py, to_py};
use crate::core::Placement;
use crate::errors::{core_err, invalid};
use crate::hv::{Disk, Hypervisor};
use crate::results::{dataframe, SIGNAL_CHECK};
use crate::runtime::new_runtime;

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

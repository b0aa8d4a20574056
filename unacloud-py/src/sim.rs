//! `unacloud.snapshot.simulate_ring`: the deterministic ring simulator with every knob a
//! study needs, interruptible, with progress, and its result class.

use std::time::Duration;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use unacloud_snapshot::protocol::ClearColourPolicy;
use unacloud_snapshot::sim::{Cluster, RestoreFrom, RingConfig, RingReport};

use crate::args;
use crate::convert::{from_py, to_py};
use crate::errors::invalid;
use crate::results::{dataframe, Ticker};
use crate::snapshot::sim_err;

/// A non-negative, finite number of milliseconds as a duration.
fn ms(value: f64, name: &str) -> PyResult<Duration> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(invalid(format!(
            "{name} must be a non-negative number of milliseconds, got {value}"
        )));
    }
    Ok(Duration::from_secs_f64(value / 1000.0))
}

/// A range of milliseconds: one number (a fixed time) or a `(min, max)` pair (uniform).
fn ms_range(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<(Duration, Duration)> {
    if let Ok(t) = obj.downcast::<PyTuple>() {
        if t.len() != 2 {
            return Err(invalid(format!(
                "{name} must be a number or a (min, max) pair of milliseconds"
            )));
        }
        let lo: f64 = t.get_item(0)?.extract().map_err(|_| {
            PyTypeError::new_err(format!("{name}: min must be a number of milliseconds"))
        })?;
        let hi: f64 = t.get_item(1)?.extract().map_err(|_| {
            PyTypeError::new_err(format!("{name}: max must be a number of milliseconds"))
        })?;
        let (lo, hi) = (ms(lo, name)?, ms(hi, name)?);
        if lo > hi {
            return Err(invalid(format!(
                "{name}: min {lo:?} is larger than max {hi:?}"
            )));
        }
        return Ok((lo, hi));
    }
    let v: f64 = obj.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a number or a (min, max) pair of milliseconds"
        ))
    })?;
    let d = ms(v, name)?;
    Ok((d, d))
}

/// `restore_from`: `"latest"`, a global snapshot id, or its decimal string.
fn restore_arg(obj: &Bound<'_, PyAny>) -> PyResult<RestoreFrom> {
    if let Ok(s) = obj.downcast::<pyo3::types::PyString>() {
        return s.to_cow()?.parse::<RestoreFrom>().map_err(sim_err);
    }
    args::uint::<u64>(obj, "restore_from").map(RestoreFrom::Id)
}

fn probability(p: f64, name: &str) -> PyResult<f64> {
    if !(0.0..=1.0).contains(&p) {
        return Err(invalid(format!(
            "{name} must be a probability in [0, 1], got {p}"
        )));
    }
    Ok(p)
}

fn progress_event<'py>(py: Python<'py>, c: &Cluster, budget: u64) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("event", "progress")?;
    d.set_item("steps", c.steps())?;
    d.set_item("step_budget", budget)?;
    d.set_item("sim_time_ms", c.elapsed().as_secs_f64() * 1e3)?;
    d.set_item(
        "global_snapshots_completed",
        c.records()
            .values()
            .filter(|r| r.completed.is_some())
            .count(),
    )?;
    d.set_item("crashes", c.crashes().len())?;
    Ok(d)
}

/// Runs the RCPBT token ring with periodic global snapshots in the deterministic
/// simulator (virtual time: nothing sleeps) and returns a `SimulationResult`.
///
/// The ring: `nodes` peers (one VM per host, host 0 runs the coordinator) pass `tokens`
/// tokens over `transport` (`"tcp"` or `"udp"`); a global snapshot is triggered
/// whenever the ring reaches a multiple of `snapshot_every` (0: never). `seed` drives
/// every random choice, so a seed replays the same run.
///
/// Local snapshots: `local_snapshot_ms` is a fixed time or a `(min, max)` range drawn
/// uniformly per host and snapshot (default `(1, 3)`); `durability_ms` the extra time
/// until a live snapshot is on disk (default 0: point and durability coincide);
/// `restore_time_ms` how long restoring a VM takes (2); `action_latency_ms` every other
/// host action (0.05); `think_ms` the application's time per token (0).
///
/// Network: `latency_ms` one-way (0.2), `jitter_ms` uniform extra delay (0.05),
/// `loss` and `reorder` probabilities of application datagrams (protocol traffic is
/// reliable).
///
/// Crash: a host powers off when the ring delivers token `crash_at`, or `crash_at_ms`
/// after the start (not both); `crash_host` picks it (default: drawn from the seed); it
/// powers on `reboot_after_ms` later (20) and the operator asks for a resume
/// `resume_after_ms` after the crash (1), from `restore_from` (`"latest"` or a global
/// snapshot id).
///
/// Protocol deadlines: `precheck_timeout_ms` (50), `snapshot_timeout_ms` (500),
/// `poll_interval_ms` (10), `poll_give_up_ms` (None: poll until every host answers),
/// `resume_phase_timeout_ms` (1000). `max_steps` bounds the run (default: from its
/// size); a run that does not settle raises `SimulationError`.
///
/// Negative controls: `filter=False` (hosts install no drop filter), `thesis_order`
/// (the thesis's literal step order), `done_before_durable` (DONE at the snapshot point;
/// needs `durability_ms`).
///
/// The run checks for signals every 0.1 s (Ctrl-C raises `KeyboardInterrupt`) and, with
/// `progress`, calls `progress(event)` as often with `{"event": "progress", "steps",
/// "step_budget", "sim_time_ms", "global_snapshots_completed", "crashes"}`, then once
/// with `{"event": "finish", "result": SimulationResult}`.
#[pyfunction]
#[pyo3(signature = (
    nodes=4, tokens=1000, snapshot_every=100, crash_at=None, transport="tcp", seed=0,
    filter=true, restore_from=RestoreFrom::Latest, latency_ms=None, thesis_order=false, *,
    jitter_ms=None, loss=0.0, reorder=0.0, local_snapshot_ms=None, durability_ms=None,
    done_before_durable=false, restore_time_ms=None, action_latency_ms=None, think_ms=None,
    crash_host=None, crash_at_ms=None, reboot_after_ms=None, resume_after_ms=None,
    precheck_timeout_ms=None, snapshot_timeout_ms=None, poll_interval_ms=None,
    poll_give_up_ms=None, resume_phase_timeout_ms=None, max_steps=None, progress=None
))]
#[allow(clippy::too_many_arguments)]
pub fn simulate_ring(
    py: Python<'_>,
    #[pyo3(from_py_with = args::nodes)] nodes: usize,
    #[pyo3(from_py_with = args::tokens)] tokens: u64,
    #[pyo3(from_py_with = args::snapshot_every)] snapshot_every: u64,
    #[pyo3(from_py_with = args::crash_at)] crash_at: Option<u64>,
    transport: &str,
    #[pyo3(from_py_with = args::seed)] seed: u64,
    filter: bool,
    #[pyo3(from_py_with = restore_arg)] restore_from: RestoreFrom,
    latency_ms: Option<f64>,
    thesis_order: bool,
    jitter_ms: Option<f64>,
    loss: f64,
    reorder: f64,
    local_snapshot_ms: Option<&Bound<'_, PyAny>>,
    durability_ms: Option<&Bound<'_, PyAny>>,
    done_before_durable: bool,
    restore_time_ms: Option<f64>,
    action_latency_ms: Option<f64>,
    think_ms: Option<f64>,
    #[pyo3(from_py_with = args::crash_host)] crash_host: Option<usize>,
    crash_at_ms: Option<f64>,
    reboot_after_ms: Option<f64>,
    resume_after_ms: Option<f64>,
    precheck_timeout_ms: Option<f64>,
    snapshot_timeout_ms: Option<f64>,
    poll_interval_ms: Option<f64>,
    poll_give_up_ms: Option<f64>,
    resume_phase_timeout_ms: Option<f64>,
    #[pyo3(from_py_with = args::max_steps)] max_steps: Option<u64>,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<SimulationResult> {
    let mut c = RingConfig {
        nodes,
        tokens,
        snapshot_every,
        crash_at,
        seed,
        filter,
        crash_host,
        done_before_durable,
        max_steps,
        ..RingConfig::default()
    };
    c.transport = transport.parse().map_err(invalid)?;
    if thesis_order {
        // Negative control: the thesis's literal order (colour cleared right after the
        // host's own snapshot), which the simulator shows to be inconsistent.
        c.clear_colour = ClearColourPolicy::AfterOwnSnapshot;
    }
    c.restore_from = restore_from;
    let set = |d: &mut Duration, v: Option<f64>, name: &str| -> PyResult<()> {
        if let Some(v) = v {
            *d = ms(v, name)?;
        }
        Ok(())
    };
    set(&mut c.link.latency, latency_ms, "latency_ms")?;
    set(&mut c.link.jitter, jitter_ms, "jitter_ms")?;
    c.link.loss = probability(loss, "loss")?;
    c.link.reorder = probability(reorder, "reorder")?;
    if let Some(r) = local_snapshot_ms {
        (c.local_snapshot_min, c.local_snapshot_max) = ms_range(r, "local_snapshot_ms")?;
    }
    if let Some(r) = durability_ms {
        (c.durability_min, c.durability_max) = ms_range(r, "durability_ms")?;
    }
    set(&mut c.restore_time, restore_time_ms, "restore_time_ms")?;
    set(
        &mut c.action_latency,
        action_latency_ms,
        "action_latency_ms",
    )?;
    set(&mut c.think, think_ms, "think_ms")?;
    c.crash_at_time = crash_at_ms.map(|v| ms(v, "crash_at_ms")).transpose()?;
    set(&mut c.reboot_after, reboot_after_ms, "reboot_after_ms")?;
    set(&mut c.resume_after, resume_after_ms, "resume_after_ms")?;
    set(
        &mut c.timeouts.precheck,
        precheck_timeout_ms,
        "precheck_timeout_ms",
    )?;
    set(
        &mut c.timeouts.snapshot,
        snapshot_timeout_ms,
        "snapshot_timeout_ms",
    )?;
    set(
        &mut c.timeouts.poll_interval,
        poll_interval_ms,
        "poll_interval_ms",
    )?;
    c.timeouts.poll_give_up = poll_give_up_ms
        .map(|v| ms(v, "poll_give_up_ms"))
        .transpose()?;
    set(
        &mut c.timeouts.resume_phase,
        resume_phase_timeout_ms,
        "resume_phase_timeout_ms",
    )?;
    let progress: Option<Py<PyAny>> = match progress {
        Some(p) if !p.is_none() => {
            if !p.is_callable() {
                return Err(PyTypeError::new_err("progress must be a callable or None"));
            }
            Some(p.clone().unbind())
        }
        _ => None,
    };
    c.validate().map_err(sim_err)?;
    let config = c.clone();
    let budget = c.step_budget();

    // The run, without the GIL; every 0.1 s it takes the GIL back to run the signal
    // handlers (Ctrl-C) and the progress callback. An exception from either stops it.
    let cb = progress.as_ref().map(|p| p.clone_ref(py));
    let outcome = py.allow_threads(move || -> PyResult<Result<RingReport, PyErr>> {
        let mut cluster = match Cluster::new(c) {
            Ok(cl) => cl,
            Err(e) => return Ok(Err(sim_err(e))),
        };
        let mut ticker = Ticker::new();
        let mut stopped: Option<PyErr> = None;
        let driven = cluster.drive_until(budget, |cl| {
            if cl.is_finished() {
                return true;
            }
            if !ticker.due() {
                return false;
            }
            let checked = Python::with_gil(|py| -> PyResult<()> {
                py.check_signals()?;
                if let Some(p) = &cb {
                    p.call1(py, (progress_event(py, cl, budget)?,))?;
                }
                Ok(())
            });
            match checked {
                Ok(()) => false,
                Err(e) => {
                    stopped = Some(e);
                    true
                }
            }
        });
        if let Some(e) = stopped {
            return Err(e);
        }
        Ok(match driven {
            Ok(_) => Ok(RingReport::from_cluster(&cluster)),
            Err(e) => Err(sim_err(e)),
        })
    })?;
    let report = outcome?;
    let result = SimulationResult {
        report,
        config: Some(config),
    };
    if let Some(p) = progress {
        let ev = PyDict::new(py);
        ev.set_item("event", "finish")?;
        ev.set_item("result", Py::new(py, result.clone())?)?;
        p.call1(py, (ev,))?;
    }
    Ok(result)
}

/// The outcome of `simulate_ring`: totals (`to_dict()`, attributes) and one record per
/// global snapshot attempt (`snapshots()`; iterating the result yields the same records,
/// so `pandas.DataFrame(result)` has one row per global snapshot). Picklable;
/// `SimulationResult(result.report())` rebuilds it.
#[pyclass(module = "unacloud.snapshot", frozen)]
#[derive(Debug, Clone)]
pub struct SimulationResult {
    report: RingReport,
    /// The configuration of the run (None for a result rebuilt from a report).
    config: Option<RingConfig>,
}

fn opt_max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

impl SimulationResult {
    fn records(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        self.report
            .snapshots
            .iter()
            .map(|s| {
                let d = PyDict::new(py);
                d.set_item("global_snapshot", s.id)?;
                d.set_item("status", &s.status)?;
                d.set_item("started_ms", s.started_ms)?;
                d.set_item("local_ms", opt_max(&s.local_ms))?;
                let mean = if s.local_ms.is_empty() {
                    None
                } else {
                    Some(s.local_ms.iter().sum::<f64>() / s.local_ms.len() as f64)
                };
                d.set_item("local_ms_mean", mean)?;
                d.set_item("global_ms", s.global_ms)?;
                d.set_item("overhead_ms", s.coordination_overhead_ms)?;
                d.set_item("phase2_ms", s.phase2_ms)?;
                d.set_item("protocol_messages", s.protocol_messages)?;
                d.set_item("orphans", s.orphans)?;
                d.set_item("unrecoverable", s.unrecoverable)?;
                d.set_item("failure", &s.failure)?;
                d.set_item("host_local_ms", PyList::new(py, &s.local_ms)?)?;
                Ok(d.into_any().unbind())
            })
            .collect()
    }
}

#[pymethods]
impl SimulationResult {
    /// Rebuilds a result from `report()` (the `ring_sim` JSON object).
    #[new]
    fn new(report: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(SimulationResult {
            report: from_py(report, "simulation report")?,
            config: None,
        })
    }

    /// One dict per global snapshot attempt, in order: `global_snapshot` (id), `status`
    /// (completed, failed, unfinished), `started_ms`, `local_ms` (the slowest host's
    /// local snapshot), `local_ms_mean`, `global_ms` (trigger to completion, pre-check
    /// included), `overhead_ms` (global − slowest local: what coordinating costs),
    /// `phase2_ms`, `protocol_messages`, `orphans`, `unrecoverable`, `failure` and
    /// `host_local_ms` (every host's local time, host 0 first). Times in virtual ms;
    /// None where an attempt did not get that far.
    fn snapshots(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        self.records(py)
    }

    /// The totals: every key of the `ring_sim` JSON object except `snapshots`
    /// (`nodes`, `tokens_expected`, `tokens_final`, `lost`, `duplicated`,
    /// `global_snapshots_started`, `global_snapshots_completed`, `restored_from`,
    /// `orphan_messages`, `unrestorable_snapshots`, `violations`, `sim_time_ms`,
    /// `messages_sent`, `overhead` as a dict).
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        let d = to_py(py, &self.report)?;
        d.bind(py).downcast::<PyDict>()?.del_item("snapshots")?;
        Ok(d)
    }

    /// The whole `ring_sim` JSON object (totals and `snapshots` as the simulator
    /// reports them).
    fn report(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.report)
    }

    /// The simulator configuration of the run (its `RingConfig` fields, durations in
    /// µs as in `ring_sim --config`), or None for a result rebuilt from a report.
    fn config(&self, py: Python<'_>) -> PyResult<Option<PyObject>> {
        self.config.as_ref().map(|c| to_py(py, c)).transpose()
    }

    /// `snapshots()` as a `pandas.DataFrame` (pandas is imported only here).
    fn to_pandas(&self, py: Python<'_>) -> PyResult<PyObject> {
        let records = PyList::new(py, self.records(py)?)?;
        dataframe(
            py,
            records.into_any().unbind(),
            "SimulationResult.to_pandas()",
        )
    }

    fn __iter__(&self, py: Python<'_>) -> PyResult<PyObject> {
        let list = PyList::new(py, self.records(py)?)?;
        Ok(list.try_iter()?.into_any().unbind())
    }
    fn __len__(&self) -> usize {
        self.report.snapshots.len()
    }
    fn __reduce__(slf: &Bound<'_, Self>) -> PyResult<(PyObject, (PyObject,))> {
        let py = slf.py();
        let report = slf.get().report(py)?;
        Ok((slf.get_type().into_any().unbind(), (report,)))
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .downcast::<SimulationResult>()
            .is_ok_and(|o| o.get().report == self.report)
    }

    /// No token lost or duplicated, every token delivered, no violation.
    #[getter]
    fn exact(&self) -> bool {
        let r = &self.report;
        r.tokens_final == r.tokens_expected && r.lost == 0 && r.duplicated == 0 && r.violations == 0
    }
    /// Peers in the ring.
    #[getter]
    fn nodes(&self) -> usize {
        self.report.nodes
    }
    /// Tokens configured.
    #[getter]
    fn tokens_expected(&self) -> u64 {
        self.report.tokens_expected
    }
    /// Distinct tokens the final application states processed.
    #[getter]
    fn tokens_final(&self) -> u64 {
        self.report.tokens_final
    }
    /// Messages the final timeline sent that were never received.
    #[getter]
    fn lost(&self) -> u64 {
        self.report.lost
    }
    /// Messages received twice.
    #[getter]
    fn duplicated(&self) -> u64 {
        self.report.duplicated
    }
    /// Orphan messages over every completed global snapshot.
    #[getter]
    fn orphan_messages(&self) -> u64 {
        self.report.orphan_messages
    }
    /// Consistency violations found by the checker.
    #[getter]
    fn violations(&self) -> u64 {
        self.report.violations
    }
    /// Global snapshots started.
    #[getter]
    fn global_snapshots_started(&self) -> u64 {
        self.report.global_snapshots_started
    }
    /// Global snapshots completed.
    #[getter]
    fn global_snapshots_completed(&self) -> u64 {
        self.report.global_snapshots_completed
    }
    /// The global snapshot the ring resumed from after the crash, or None.
    #[getter]
    fn restored_from(&self) -> Option<u64> {
        self.report.restored_from
    }
    /// Virtual time of the run, ms.
    #[getter]
    fn sim_time_ms(&self) -> f64 {
        self.report.sim_time_ms
    }
    fn __repr__(&self) -> String {
        let r = &self.report;
        format!(
            "<SimulationResult {} nodes: {} of {} tokens, {} of {} global snapshots, {} violations>",
            r.nodes,
            r.tokens_final,
            r.tokens_expected,
            r.global_snapshots_completed,
            r.global_snapshots_started,
            r.violations
        )
    }
}

//! `unacloud.snapshot`: the sans-IO protocol state machines and the wire format (the
//! ring simulator is in `sim`).

use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use unacloud_snapshot::protocol::{
    decode_frame, encode_frame, ActionId, ActionOutcome, Catalog, ClusterId,
    Coordinator as RsCoordinator, CoordinatorConfig, Envelope, Error as ProtocolError,
    GlobalSnapshotId, Output, Participant as RsParticipant, ParticipantConfig, ParticipantId,
    ProtocolEvent,
};

use crate::args;
use crate::convert::{from_py, to_py};
use crate::errors::{chain, invalid, raise};

/// The exception class of a protocol error (wire format, state machines).
fn protocol_class(e: &ProtocolError) -> &'static str {
    use ProtocolError as E;
    match e {
        E::InvalidConfig { .. } => "InvalidInput",
        E::UnsupportedVersion { .. }
        | E::FrameTooLarge { .. }
        | E::TruncatedFrame { .. }
        | E::TrailingBytes { .. }
        | E::EmptyFrame
        | E::MalformedPayload { .. } => "ParseError",
        _ => "ProtocolError",
    }
}

/// Maps an error of the sans-IO protocol.
pub(crate) fn protocol_err(e: ProtocolError) -> PyErr {
    raise(protocol_class(&e), chain(&e))
}

/// Maps an error of the simulator.
pub(crate) fn sim_err(e: unacloud_snapshot::sim::Error) -> PyErr {
    use unacloud_snapshot::sim::Error as E;
    let class = match &e {
        E::Protocol(p) => protocol_class(p),
        E::InvalidConfig { .. } => "InvalidInput",
        _ => "SimulationError",
    };
    raise(class, chain(&e))
}

/// Maps an error of the real network (labs, namespaces); file failures carry `errno`
/// and `filename`.
pub(crate) fn net_err(e: unacloud_snapshot::net::Error) -> PyErr {
    use unacloud_snapshot::catalog_store::Error as C;
    use unacloud_snapshot::net::Error as E;
    match &e {
        E::Catalog(C::Io { path, source, .. }) | E::ResultsIo { path, source } => {
            return crate::errors::io_err(path, source, chain(&e))
        }
        _ => {}
    }
    let class = match &e {
        E::Protocol(p) => protocol_class(p),
        E::InvalidConfig { .. } | E::Catalog(C::ForeignCluster { .. }) => "InvalidInput",
        E::Timeout { .. } => "Timeout",
        E::NotPrivileged { .. } => "AccessDenied",
        _ => "ProtocolError",
    };
    raise(class, chain(&e))
}

/// Encodes an envelope dict as one wire frame (bytes).
#[pyfunction]
pub fn encode(envelope: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let env: Envelope = from_py(envelope, "envelope")?;
    encode_frame(&env).map_err(protocol_err)
}

/// Decodes one wire frame into an envelope dict; malformed frames raise `ParseError`.
#[pyfunction]
pub fn decode(py: Python<'_>, frame: &[u8]) -> PyResult<PyObject> {
    let env = decode_frame(frame).map_err(protocol_err)?;
    to_py(py, &env)
}

/// Maps the Python program's clock (seconds, e.g. `time.monotonic()`) onto `Instant`s.
#[derive(Debug)]
struct Clock {
    base: Instant,
    origin: Option<f64>,
}

impl Clock {
    fn new() -> Self {
        Clock {
            base: Instant::now(),
            origin: None,
        }
    }
    fn at(&mut self, now: f64) -> PyResult<Instant> {
        if !now.is_finite() {
            return Err(invalid("now must be a finite number of seconds"));
        }
        let origin = *self.origin.get_or_insert(now);
        Ok(self.base + Duration::from_secs_f64((now - origin).max(0.0)))
    }
    fn seconds(&self, t: Instant) -> Option<f64> {
        let origin = self.origin?;
        Some(origin + t.saturating_duration_since(self.base).as_secs_f64())
    }
}

fn outcome(
    kind: &str,
    running: Option<bool>,
    local_time: Option<f64>,
    error: Option<String>,
) -> PyResult<ActionOutcome> {
    Ok(match kind {
        "done" => ActionOutcome::Done,
        "vms_running" => ActionOutcome::VmsRunning(
            running.ok_or_else(|| invalid("outcome vms_running needs running=True/False"))?,
        ),
        "snapshot_taken" | "snapshot_point" | "snapshot_durable" => {
            let t = local_time
                .ok_or_else(|| invalid(format!("outcome {kind} needs local_time (seconds)")))?;
            if !(t.is_finite() && t >= 0.0) {
                return Err(invalid(
                    "local_time must be a non-negative number of seconds",
                ));
            }
            let t = Duration::from_secs_f64(t);
            match kind {
                "snapshot_taken" => ActionOutcome::SnapshotTaken { local_time: t },
                "snapshot_point" => ActionOutcome::SnapshotPoint { local_time: t },
                _ => ActionOutcome::SnapshotDurable { total_time: t },
            }
        }
        "failed" => ActionOutcome::Failed(error.unwrap_or_else(|| "failed".to_owned())),
        other => {
            return Err(invalid(format!(
                "unknown outcome {other:?}; expected done, vms_running, snapshot_taken, \
                 snapshot_point, snapshot_durable or failed"
            )))
        }
    })
}

fn event_dict(py: Python<'_>, e: &ProtocolEvent) -> PyResult<PyObject> {
    let d = PyDict::new(py);
    match e {
        ProtocolEvent::GlobalSnapshotCompleted {
            gs,
            local_times,
            global_time,
        } => {
            d.set_item("event", "global_snapshot_completed")?;
            d.set_item("gs", gs.0)?;
            let locals = PyDict::new(py);
            for lt in local_times {
                locals.set_item(lt.participant.0, lt.local_time.as_secs_f64())?;
            }
            d.set_item("local_times", locals)?;
            d.set_item("global_time", global_time.as_secs_f64())?;
        }
        ProtocolEvent::GlobalSnapshotFailed { gs, who, why } => {
            d.set_item("event", "global_snapshot_failed")?;
            d.set_item("gs", gs.0)?;
            d.set_item("who", who.iter().map(|p| p.0).collect::<Vec<_>>())?;
            d.set_item("why", why.to_string())?;
        }
        ProtocolEvent::ResumeFailed { gs, who, why } => {
            d.set_item("event", "resume_failed")?;
            d.set_item("gs", gs.0)?;
            d.set_item("who", who.iter().map(|p| p.0).collect::<Vec<_>>())?;
            d.set_item("why", why.to_string())?;
        }
        ProtocolEvent::ResumeCompleted { gs } => {
            d.set_item("event", "resume_completed")?;
            d.set_item("gs", gs.0)?;
        }
        ProtocolEvent::TriggerRefused { reason } => {
            d.set_item("event", "trigger_refused")?;
            d.set_item("reason", reason)?;
        }
        other => {
            // Progress events: their name and a readable rendering.
            let text = format!("{other:?}");
            let name = text.split([' ', '{', '(']).next().unwrap_or("event");
            d.set_item("event", snake(name))?;
            d.set_item("detail", text)?;
        }
    }
    Ok(d.into_any().unbind())
}

fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn output_dict(py: Python<'_>, o: Output) -> PyResult<PyObject> {
    let d = PyDict::new(py);
    match o {
        Output::Transmit(env) => {
            d.set_item("kind", "transmit")?;
            d.set_item("to", env.to.0)?;
            d.set_item("envelope", to_py(py, &env)?)?;
            d.set_item(
                "frame",
                pyo3::types::PyBytes::new(py, &encode_frame(&env).map_err(protocol_err)?),
            )?;
        }
        Output::Action { id, action } => {
            d.set_item("kind", "action")?;
            d.set_item("id", id.0)?;
            d.set_item("action", to_py(py, &action)?)?;
        }
        Output::Event(e) => {
            d.set_item("kind", "event")?;
            d.set_item("event", event_dict(py, &e)?)?;
        }
    }
    Ok(d.into_any().unbind())
}

fn envelope_from(obj: &Bound<'_, PyAny>) -> PyResult<Envelope> {
    if let Ok(bytes) = obj.extract::<Vec<u8>>() {
        if !obj.is_instance_of::<pyo3::types::PyList>() {
            return decode_frame(&bytes).map_err(protocol_err);
        }
    }
    from_py(obj, "envelope")
}

/// Generates a `#[pymethods]` block for a sans-IO state machine wrapper (a struct with
/// `inner` and `clock` fields): the driving methods both machines share, followed by the
/// class's own `$extra` methods.
macro_rules! sans_io_class {
    ($ty:ident { $($extra:tt)* }) => {
        #[pymethods]
        impl $ty {
            $($extra)*

            /// Feeds a received envelope (a dict, or the frame's bytes).
            fn handle_message(&mut self, now: f64, envelope: &Bound<'_, PyAny>) -> PyResult<()> {
                let t = self.clock.at(now)?;
                let env = envelope_from(envelope)?;
                self.inner.handle_message(t, env).map_err(protocol_err)
            }
            /// Reports the outcome of host action `action_id`: `outcome` is `done`,
            /// `vms_running` (with `running`), `snapshot_taken` (a local snapshot whose
            /// point and durability coincide, with `local_time` in seconds),
            /// `snapshot_point` (a live snapshot at its point, `local_time` until the
            /// point; the machine then asks for `await_durable`), `snapshot_durable`
            /// (with the total time as `local_time`) or `failed` (with `error`).
            #[pyo3(signature = (now, action_id, outcome="done", running=None, local_time=None, error=None))]
            fn handle_action_complete(
                &mut self,
                now: f64,
                #[pyo3(from_py_with = crate::args::action_id)] action_id: u64,
                outcome: &str,
                running: Option<bool>,
                local_time: Option<f64>,
                error: Option<String>,
            ) -> PyResult<()> {
                let t = self.clock.at(now)?;
                let o = self::outcome(outcome, running, local_time, error)?;
                self.inner
                    .handle_action_complete(t, ActionId(action_id), o)
                    .map_err(protocol_err)
            }
            /// Fires due timers.
            fn handle_timeout(&mut self, now: f64) -> PyResult<()> {
                let t = self.clock.at(now)?;
                self.inner.handle_timeout(t);
                Ok(())
            }
            /// The next output as a dict (`kind`: transmit, action or event), or None.
            fn poll_output(&mut self, py: Python<'_>) -> PyResult<Option<PyObject>> {
                self.inner.poll_output().map(|o| output_dict(py, o)).transpose()
            }
            /// When `handle_timeout` must be called next, in the caller's seconds, or None.
            fn poll_timeout(&self) -> Option<f64> {
                self.inner.poll_timeout().and_then(|t| self.clock.seconds(t))
            }
        }
    };
}

/// The coordinator (participant 0) of the global-snapshot and resume protocols, as a
/// sans-IO state machine: feed it messages, completed actions and timeouts with the
/// current time in seconds; drain `poll_output()` for frames to send, host actions to
/// perform and events.
#[pyclass(module = "unacloud.snapshot")]
#[derive(Debug)]
pub struct Coordinator {
    inner: RsCoordinator,
    clock: Clock,
}

sans_io_class!(Coordinator {
    /// `participants`: the ids of the other participants (1, 2, …); `vms`: the VMs of
    /// the coordinator's own host.
    #[new]
    #[pyo3(signature = (cluster, participants, vms=Vec::new()))]
    fn new(
        #[pyo3(from_py_with = args::cluster)] cluster: u64,
        #[pyo3(from_py_with = args::participants)] participants: Vec<u32>,
        vms: Vec<String>,
    ) -> PyResult<Self> {
        let config = CoordinatorConfig::new(
            ClusterId(cluster),
            participants.into_iter().map(ParticipantId).collect(),
            vms,
        );
        let inner =
            RsCoordinator::new(config, Catalog::new(ClusterId(cluster))).map_err(protocol_err)?;
        Ok(Coordinator {
            inner,
            clock: Clock::new(),
        })
    }
    /// Starts a global snapshot; returns its id. Refused while one runs.
    fn start_global_snapshot(&mut self, now: f64) -> PyResult<u64> {
        let t = self.clock.at(now)?;
        self.inner
            .start_global_snapshot(t)
            .map(|g| g.0)
            .map_err(protocol_err)
    }
    /// Starts the resume protocol from global snapshot `gs` (default: latest complete).
    #[pyo3(signature = (now, gs=None))]
    fn start_resume(
        &mut self,
        now: f64,
        #[pyo3(from_py_with = args::gs)] gs: Option<u64>,
    ) -> PyResult<()> {
        let t = self.clock.at(now)?;
        self.inner
            .start_resume(t, gs.map(GlobalSnapshotId))
            .map(|_| ())
            .map_err(protocol_err)
    }
    /// Ids of the completed (restorable) global snapshots.
    fn completed(&self) -> Vec<u64> {
        self.inner.catalog().completed_ids().into_iter().map(|g| g.0).collect()
    }
    fn __repr__(&self) -> String {
        format!(
            "<Coordinator of {} participants, {} completed global snapshots>",
            self.inner.config().participants.len(),
            self.inner.catalog().completed_ids().len()
        )
    }
});

/// A participant (id ≥ 1) of the protocols, as a sans-IO state machine; see
/// `Coordinator`.
#[pyclass(module = "unacloud.snapshot")]
#[derive(Debug)]
pub struct Participant {
    inner: RsParticipant,
    clock: Clock,
}

sans_io_class!(Participant {
    /// `id`: this participant's id (from the metadata server); `vms`: its host's VMs.
    #[new]
    #[pyo3(signature = (cluster, id, vms=Vec::new()))]
    fn new(
        #[pyo3(from_py_with = args::cluster)] cluster: u64,
        #[pyo3(from_py_with = args::participant_id)] id: u32,
        vms: Vec<String>,
    ) -> PyResult<Self> {
        let inner = RsParticipant::new(ParticipantConfig::new(
            ClusterId(cluster),
            ParticipantId(id),
            vms,
        ))
        .map_err(protocol_err)?;
        Ok(Participant {
            inner,
            clock: Clock::new(),
        })
    }
    /// This participant's id.
    #[getter]
    fn id(&self) -> u32 {
        self.inner.id().0
    }
    fn __repr__(&self) -> String {
        format!("<Participant {}>", self.inner.id().0)
    }
});

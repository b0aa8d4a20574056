//! What the state machines ask of their driver: host actions, transmissions and events.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::ids::{ActionId, Colour, GlobalSnapshotId, ParticipantId, ResumeAttempt};
use super::message::{Envelope, LocalTime};

/// Something a state machine asks its host to do. The driver performs it and reports the
/// outcome with `handle_action_complete(now, id, outcome)`; a state machine never has more
/// than one action outstanding per host (except [`HostAction::ClearAll`], see its docs), and
/// never issues the next step before the previous one's completion was handled.
///
/// A state machine's first action is `DropIncoming(Post)`: the idle state of a host drops
/// incoming POST datagrams. Phase 2 then issues, in this order: `SetOutgoingColour(Pre)`
/// (step 1), `DropIncoming(Post)` (step 2), `TakeLocalSnapshots` (step 3),
/// `SetOutgoingColour(Post)` (step 4), `AcceptIncoming(Post)` (step 5) — then, only if
/// step 3 answered [`ActionOutcome::SnapshotPoint`] (a live snapshot whose state is not on
/// disk yet), `AwaitDurable`, and DONE once it answered; `ClearColour` (step 6) when the
/// coordinator's RELEASE arrives (see [`super::ClearColourPolicy`]), followed by
/// `DropIncoming(Post)` to re-arm the idle drop rule. After a `ClearAll` the idle drop
/// rule is re-armed the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
#[non_exhaustive]
pub enum HostAction {
    /// Phase 1: check that these VMs are running; answer [`ActionOutcome::VmsRunning`].
    CheckVmsRunning {
        /// The host's VMs.
        vms: Vec<String>,
    },
    /// Steps 1 and 4: write this colour's DSCP value into every outgoing IPv4 datagram of
    /// the VMs (replacing the previous colour rule).
    SetOutgoingColour(Colour),
    /// Step 2, and the idle state (issued when a state machine starts and after every
    /// `ClearColour` or `ClearAll`): drop incoming datagrams carrying this colour's DSCP
    /// value. Idempotent.
    DropIncoming(Colour),
    /// Step 3: take a live local snapshot of every VM, in parallel. Answer
    /// [`ActionOutcome::SnapshotTaken`] with the time it took (the slowest VM's time) once
    /// the snapshots are durable (on disk), or [`ActionOutcome::SnapshotPoint`] as soon as
    /// every VM's state is fixed (the snapshot point; the guests run on) while it is still
    /// being written — the state machine then asks for [`HostAction::AwaitDurable`] after
    /// steps 4 and 5.
    TakeLocalSnapshots {
        /// The global snapshot the local snapshots belong to (name them after it).
        gs: GlobalSnapshotId,
        /// The host's VMs.
        vms: Vec<String>,
    },
    /// Step 5: stop dropping incoming datagrams of this colour.
    AcceptIncoming(Colour),
    /// After step 5, only if step 3 answered [`ActionOutcome::SnapshotPoint`]: wait until
    /// the local snapshots of `gs` are durable (their state is on disk and survives a power
    /// failure); answer [`ActionOutcome::SnapshotDurable`], or [`ActionOutcome::Failed`]
    /// if they cannot be made durable. DONE is sent only after it; a failure or the
    /// snapshot deadline fails the global snapshot like any failed step. Never issued to a
    /// driver that answers step 3 with [`ActionOutcome::SnapshotTaken`].
    AwaitDurable {
        /// The global snapshot the local snapshots belong to.
        gs: GlobalSnapshotId,
        /// The host's VMs.
        vms: Vec<String>,
    },
    /// Step 6 (on RELEASE): stop colouring outgoing datagrams.
    ClearColour,
    /// Safety cleanup after an abort, a failed step or a deadline: remove every colour and
    /// filter rule the protocol may have installed, the idle drop rule included (a state
    /// machine that keeps running re-arms it next with `DropIncoming(Post)`). Must be
    /// idempotent, and safe to run while a hung earlier action is still outstanding (it is
    /// issued then only after that action exceeded its deadline). A driver that shuts down
    /// runs it too, so no rule outlives the protocol.
    ClearAll,
    /// Resume: restore every VM to its local snapshot of this global snapshot.
    RestoreLocal {
        /// The global snapshot to restore.
        gs: GlobalSnapshotId,
        /// The host's VMs.
        vms: Vec<String>,
    },
    /// Resume: start the restored VMs.
    StartVms {
        /// The host's VMs.
        vms: Vec<String>,
    },
}

impl HostAction {
    /// Short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            HostAction::CheckVmsRunning { .. } => "check VMs running",
            HostAction::SetOutgoingColour(_) => "set outgoing colour",
            HostAction::DropIncoming(_) => "drop incoming colour",
            HostAction::TakeLocalSnapshots { .. } => "take local snapshots",
            HostAction::AcceptIncoming(_) => "accept incoming colour",
            HostAction::AwaitDurable { .. } => "await durability",
            HostAction::ClearColour => "clear colour",
            HostAction::ClearAll => "clear all rules",
            HostAction::RestoreLocal { .. } => "restore local snapshots",
            HostAction::StartVms { .. } => "start VMs",
        }
    }
}

/// The outcome of a [`HostAction`], reported by the driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ActionOutcome {
    /// The action succeeded (colour, filter, restore and start actions).
    Done,
    /// Answer to [`HostAction::CheckVmsRunning`]: whether all VMs run.
    VmsRunning(bool),
    /// Answer to [`HostAction::TakeLocalSnapshots`]: the local snapshots exist and are
    /// durable — their point and their durability coincide. No
    /// [`HostAction::AwaitDurable`] follows.
    SnapshotTaken {
        /// How long taking them took (all VMs, in parallel).
        #[serde(with = "super::message::micros", rename = "local_time_us")]
        local_time: Duration,
    },
    /// Answer to [`HostAction::TakeLocalSnapshots`] for a live snapshot: every VM's state
    /// is fixed (the snapshot point) and the guests run on, but the state is still being
    /// written (durability pending). Steps 4 and 5 follow at once; DONE waits for
    /// [`HostAction::AwaitDurable`].
    SnapshotPoint {
        /// Time from the start of step 3 to the snapshot point (all VMs, in parallel).
        #[serde(with = "super::message::micros", rename = "local_time_us")]
        local_time: Duration,
    },
    /// Answer to [`HostAction::AwaitDurable`]: the local snapshots are on disk.
    SnapshotDurable {
        /// Time from the start of step 3 until the snapshots were durable (all VMs).
        #[serde(with = "super::message::micros", rename = "total_time_us")]
        total_time: Duration,
    },
    /// The action failed; the text says why.
    Failed(String),
}

/// Why a global snapshot or a resume failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureReason {
    /// The listed participants did not answer before the phase's deadline.
    Timeout {
        /// The protocol phase (`precheck`, `snapshot`, `restore`, `start`, `poll`).
        phase: String,
        /// The deadline that passed.
        #[serde(with = "super::message::micros", rename = "deadline_us")]
        deadline: Duration,
    },
    /// A participant's VMs were not all running (phase 1).
    VmsNotRunning {
        /// The participant's explanation.
        detail: String,
    },
    /// A host action failed (at the coordinator's own host, or reported by a participant).
    ActionFailed {
        /// The participant's or host's explanation.
        detail: String,
    },
    /// A participant had already seen a newer epoch (STALE): this coordinator's counters
    /// were behind, e.g. after it lost its catalog. They now continue after the newest.
    StaleEpoch {
        /// What the participant had seen.
        detail: String,
    },
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureReason::Timeout { phase, deadline } => {
                write!(f, "no answer in the {phase} phase within {deadline:?}")
            }
            FailureReason::VmsNotRunning { detail } => write!(f, "VMs not running: {detail}"),
            FailureReason::ActionFailed { detail } => write!(f, "host action failed: {detail}"),
            FailureReason::StaleEpoch { detail } => write!(f, "stale epoch: {detail}"),
        }
    }
}

/// Something that happened, reported to the driver (for logs, persistence, statistics).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolEvent {
    /// Coordinator: a global snapshot attempt started; persist the catalog now so the
    /// epoch survives a restart.
    GlobalSnapshotStarted {
        /// The attempt.
        gs: GlobalSnapshotId,
    },
    /// Coordinator: every participant passed the pre-check; phase 2 starts.
    PrecheckPassed {
        /// The attempt.
        gs: GlobalSnapshotId,
    },
    /// Coordinator: the global snapshot is complete and recorded in the catalog; persist
    /// the catalog now.
    GlobalSnapshotCompleted {
        /// The completed global snapshot.
        gs: GlobalSnapshotId,
        /// Local snapshot times of every participant, the coordinator's (id 0) first,
        /// then by ascending id.
        local_times: Vec<LocalTime>,
        /// Time from sending TAKE_SNAPSHOT to completion.
        global_time: Duration,
    },
    /// Coordinator: the global snapshot failed; it is never offered for restore. ABORT
    /// was sent to every participant.
    GlobalSnapshotFailed {
        /// The failed attempt.
        gs: GlobalSnapshotId,
        /// The participants that caused the failure (id 0 = the coordinator's own host).
        who: Vec<ParticipantId>,
        /// Why.
        why: FailureReason,
    },
    /// Coordinator: a trigger from the metadata server was refused.
    TriggerRefused {
        /// Why (for the operator).
        reason: String,
    },
    /// Coordinator: a resume started; persist the catalog (it records the attempt).
    ResumeStarted {
        /// The global snapshot being restored.
        gs: GlobalSnapshotId,
        /// The attempt.
        attempt: ResumeAttempt,
    },
    /// Coordinator: every participant answered POLL; RESTORE was sent.
    PollCompleted {
        /// The global snapshot being restored.
        gs: GlobalSnapshotId,
        /// How many POLL rounds it took (1 = everybody answered the first POLL).
        rounds: u32,
    },
    /// Coordinator: every participant restored and started its VMs.
    ResumeCompleted {
        /// The restored global snapshot.
        gs: GlobalSnapshotId,
    },
    /// Coordinator: a participant had seen newer epochs (STALE); the counters jumped past
    /// them. Persist the catalog now.
    EpochAdvanced {
        /// The highest global snapshot id now counted as started.
        last_started: Option<GlobalSnapshotId>,
        /// The highest resume attempt now counted as started.
        last_resume_attempt: Option<ResumeAttempt>,
    },
    /// Coordinator: the resume failed.
    ResumeFailed {
        /// The global snapshot that was being restored.
        gs: GlobalSnapshotId,
        /// The participants that caused the failure.
        who: Vec<ParticipantId>,
        /// Why.
        why: FailureReason,
    },
    /// Participant: the coordinator aborted resume attempt `attempt` (RESUME_ABORT); a
    /// START of it will not come. VMs this host restored stay restored and stopped.
    ResumeAborted {
        /// The global snapshot that was being restored.
        gs: GlobalSnapshotId,
        /// Why.
        reason: String,
    },
    /// Participant: its local snapshot is taken and durable (steps 1–5 done, and the wait
    /// for durability after a live snapshot's point) and DONE was sent.
    LocalSnapshotCompleted {
        /// The global snapshot.
        gs: GlobalSnapshotId,
        /// Time from the start of step 3 to the snapshot point (the value DONE carries).
        local_time: Duration,
        /// Time from the start of step 3 until the local snapshot(s) were durable: the
        /// time [`ActionOutcome::SnapshotDurable`] reported, or `local_time` when the
        /// driver answered [`ActionOutcome::SnapshotTaken`] (point and durability
        /// coincide).
        total_time: Duration,
    },
    /// Participant: the global snapshot was aborted or a step failed; ClearAll was issued
    /// (or nothing needed cleaning). Its local snapshots of `gs`, if any, are not part of
    /// a consistent global snapshot and may be deleted.
    LocalSnapshotAbandoned {
        /// The global snapshot.
        gs: GlobalSnapshotId,
        /// Why.
        why: String,
    },
    /// Coordinator or participant: ClearAll failed three times; the host may still colour
    /// or drop traffic. Needs an operator (or a host reboot).
    CleanupFailed {
        /// The global snapshot whose rules could not be removed.
        gs: GlobalSnapshotId,
        /// The last failure.
        why: String,
    },
    /// Participant: neither RELEASE nor ABORT of `gs` arrived before its snapshot deadline
    /// (the coordinator vanished); it stopped colouring by itself (ClearAll, then the idle
    /// drop rule). Whether `gs` completed is known only to the coordinator's catalog.
    ReleaseMissed {
        /// The global snapshot whose colour was held.
        gs: GlobalSnapshotId,
    },
    /// Coordinator or participant: arming the idle drop rule (`DropIncoming(Post)` outside
    /// a global snapshot) failed; POST datagrams of a global snapshot may reach this host
    /// before its TAKE_SNAPSHOT does. The next ClearColour or ClearAll tries again.
    IdleDropFailed {
        /// The driver's explanation.
        why: String,
    },
    /// Participant: its VMs were restored to `gs` and started.
    Resumed {
        /// The restored global snapshot.
        gs: GlobalSnapshotId,
    },
    /// Metadata server: the trigger was forwarded to the coordinator.
    GlobalSnapshotRequested,
}

/// One output of a state machine; a driver loop is a single `match`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this envelope to `envelope.to`.
    Transmit(Envelope),
    /// Perform this action on the local host and report the outcome with `id`.
    Action {
        /// Hand this back with the outcome.
        id: ActionId,
        /// What to do.
        action: HostAction,
    },
    /// Something happened.
    Event(ProtocolEvent),
}

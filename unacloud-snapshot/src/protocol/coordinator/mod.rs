//! The coordinator (participant 0): drives phase 1, phase 2 and the resume protocol, and
//! runs the six steps on its own host.
//!
//! It completes a global snapshot when its own steps 1–5 (and, after a live snapshot's
//! point, its own wait for durability) and every DONE are there, then sends RELEASE to
//! every participant and performs its own step 6; its idle state drops incoming POST
//! datagrams, like a participant's.
//!
//! Cost: every incoming message is handled in O(1) (an index lookup and a counter); only
//! starting a phase (sending to everybody), a deadline and the completion (building the
//! report) touch every participant.

mod resume;
mod snapshot;

use resume::resume_refusal;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::catalog::Catalog;
use super::config::CoordinatorConfig;
use super::host::{Host, LocalTimes, RulePurpose};
use super::ids::{ActionId, GlobalSnapshotId, ParticipantId, ResumeAttempt};
use super::message::{Envelope, Message};
use super::output::{ActionOutcome, FailureReason, HostAction, Output, ProtocolEvent};
use crate::protocol::error::{Error, Operation, Result};

const ROLE: &str = "coordinator";

/// What the coordinator's own outstanding host action is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// (Re-)arming the idle drop rule.
    Arm,
    Check(GlobalSnapshotId),
    Step(GlobalSnapshotId, u8),
    /// Own step 6 at completion.
    Release(GlobalSnapshotId),
    Cleanup(GlobalSnapshotId, u8),
    Restore(ResumeAttempt),
    StartVms(ResumeAttempt),
}

impl RulePurpose for Purpose {
    const ARM: Self = Purpose::Arm;
    fn cleanup(gs: GlobalSnapshotId, tries: u8) -> Self {
        Purpose::Cleanup(gs, tries)
    }
}

impl Purpose {
    /// Short rule maintenance: new work queues behind it instead of being refused.
    fn is_maintenance(self) -> bool {
        matches!(self, Purpose::Arm | Purpose::Release(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResumeStage {
    Poll { rounds: u32, next_poll: Instant },
    Restore,
    Start,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Idle,
    Precheck {
        gs: GlobalSnapshotId,
        deadline: Instant,
        own_ok: bool,
    },
    Snapshot {
        gs: GlobalSnapshotId,
        started: Instant,
        deadline: Instant,
        own_done: bool,
        /// The own local snapshot's point and durability, as reported so far.
        own_times: LocalTimes,
    },
    Resume {
        gs: GlobalSnapshotId,
        attempt: ResumeAttempt,
        stage: ResumeStage,
        started: Instant,
        deadline: Instant,
        own_done: bool,
    },
}

/// The coordinator's state machine. See the crate documentation for the driving loop.
///
/// Inputs: [`Coordinator::start_global_snapshot`], [`Coordinator::start_resume`],
/// [`Coordinator::handle_message`], [`Coordinator::handle_action_complete`],
/// [`Coordinator::handle_timeout`]. Outputs: [`Coordinator::poll_output`] and
/// [`Coordinator::poll_timeout`].
#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    catalog: Catalog,
    /// Participant id → index into the per-participant vectors.
    index: HashMap<ParticipantId, usize>,
    /// Stamp of the phase in which each participant last answered.
    answered: Vec<u64>,
    /// Local snapshot time reported in each participant's DONE.
    local_times: Vec<Duration>,
    /// Participants that have not answered in the current phase.
    pending: usize,
    /// Increases with every phase, so `answered` never needs clearing.
    stamp: u64,
    phase: Phase,
    host: Host<Purpose>,
    out: VecDeque<Output>,
}

impl Coordinator {
    /// A coordinator with the catalog recovered after a restart (or [`Catalog::new`]).
    ///
    /// Fails with [`Error::InvalidConfig`] if a participant id is 0, reserved or repeated,
    /// or if the catalog belongs to another cluster.
    pub fn new(config: CoordinatorConfig, catalog: Catalog) -> Result<Self> {
        if catalog.cluster != config.cluster {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "the catalog belongs to {} but the coordinator is configured for {}; use that cluster's catalog file",
                    catalog.cluster, config.cluster
                ),
            });
        }
        let mut participants = config.participants.clone();
        participants.sort_unstable();
        let mut index = HashMap::with_capacity(participants.len());
        for (i, &p) in participants.iter().enumerate() {
            if p.is_coordinator()
                || p == ParticipantId::METADATA_SERVER
                || p == ParticipantId::UNREGISTERED
            {
                return Err(Error::InvalidConfig {
                    reason: format!("participant id {p} is reserved; participants are numbered from 1 (0 is the coordinator)"),
                });
            }
            if index.insert(p, i).is_some() {
                return Err(Error::InvalidConfig {
                    reason: format!("participant {p} is listed twice"),
                });
            }
        }
        let n = participants.len();
        let config = CoordinatorConfig {
            participants,
            ..config
        };
        let mut c = Self {
            config,
            catalog,
            index,
            answered: vec![0; n],
            local_times: vec![Duration::ZERO; n],
            pending: 0,
            stamp: 0,
            phase: Phase::Idle,
            host: Host::new(),
            out: VecDeque::new(),
        };
        // The idle state drops POST: the first action, before anything else.
        c.arm_idle_drop();
        Ok(c)
    }

    /// The catalog of completed global snapshots (persist it on the events that say so).
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The configuration (participants sorted by id).
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The operation in progress, if any.
    pub fn running(&self) -> Option<(Operation, GlobalSnapshotId)> {
        match self.phase {
            Phase::Idle => None,
            Phase::Precheck { gs, .. } | Phase::Snapshot { gs, .. } => {
                Some((Operation::GlobalSnapshot, gs))
            }
            Phase::Resume { gs, .. } => Some((Operation::Resume, gs)),
        }
    }

    /// Starts a global snapshot: phase 1 (PRECHECK to every participant, and the own VM
    /// check), then phase 2 once everybody passed.
    ///
    /// Refused with [`Error::Busy`] while another global snapshot or a resume runs, or while
    /// the own host still cleans up after a failed one.
    pub fn start_global_snapshot(&mut self, now: Instant) -> Result<GlobalSnapshotId> {
        self.ensure_idle()?;
        let gs = self.catalog.next_gs();
        self.catalog.last_started = Some(gs);
        self.out
            .push_back(Output::Event(ProtocolEvent::GlobalSnapshotStarted { gs }));
        self.begin_phase();
        self.broadcast(Message::Precheck { gs });
        let deadline = now + self.config.timeouts.precheck;
        let vms = self.config.vms.clone();
        self.host.issue_or_queue(
            &mut self.out,
            Purpose::Check(gs),
            HostAction::CheckVmsRunning { vms },
            deadline,
        );
        self.phase = Phase::Precheck {
            gs,
            deadline,
            own_ok: false,
        };
        self.maybe_advance(now);
        Ok(gs)
    }

    /// Feeds a received envelope.
    ///
    /// Late and duplicated messages of earlier global snapshots or resume attempts are
    /// ignored (`Ok`). Errors: [`Error::ForeignCluster`], [`Error::Misaddressed`],
    /// [`Error::UnknownParticipant`], [`Error::UnexpectedMessage`].
    pub fn handle_message(&mut self, now: Instant, envelope: Envelope) -> Result<()> {
        envelope.check_addressed_to(self.config.cluster, ParticipantId::COORDINATOR)?;
        if envelope.from == ParticipantId::METADATA_SERVER {
            return match envelope.message {
                Message::TriggerGlobalSnapshot => {
                    if let Err(e) = self.start_global_snapshot(now) {
                        self.out
                            .push_back(Output::Event(ProtocolEvent::TriggerRefused {
                                reason: e.to_string(),
                            }));
                    }
                    Ok(())
                }
                Message::TriggerResume { gs } => {
                    if let Err(e) = self.start_resume(now, gs) {
                        self.out
                            .push_back(Output::Event(ProtocolEvent::TriggerRefused {
                                reason: resume_refusal(&e),
                            }));
                    }
                    Ok(())
                }
                other => Err(Error::UnexpectedMessage {
                    role: ROLE,
                    message: other.kind(),
                }),
            };
        }
        let Some(&i) = self.index.get(&envelope.from) else {
            return Err(Error::UnknownParticipant { id: envelope.from });
        };
        let from = envelope.from;
        match envelope.message {
            Message::PrecheckOk { gs } => {
                if matches!(self.phase, Phase::Precheck { gs: cur, .. } if cur == gs) {
                    self.mark(i);
                    self.maybe_advance(now);
                }
            }
            Message::PrecheckFailed { gs, reason } => {
                if matches!(self.phase, Phase::Precheck { gs: cur, .. } if cur == gs) {
                    self.fail_snapshot(
                        now,
                        vec![from],
                        FailureReason::VmsNotRunning { detail: reason },
                    );
                }
            }
            Message::Done { gs, local_time } => {
                if matches!(self.phase, Phase::Snapshot { gs: cur, .. } if cur == gs) {
                    if self.mark(i) {
                        self.local_times[i] = local_time;
                    }
                    self.maybe_advance(now);
                }
            }
            Message::SnapshotFailed { gs, reason } => {
                if matches!(self.phase, Phase::Snapshot { gs: cur, .. } | Phase::Precheck { gs: cur, .. } if cur == gs)
                {
                    self.fail_snapshot(
                        now,
                        vec![from],
                        FailureReason::ActionFailed { detail: reason },
                    );
                }
            }
            Message::PollOk { gs, attempt } => {
                if self.is_resume_stage(gs, attempt, |s| matches!(s, ResumeStage::Poll { .. })) {
                    self.mark(i);
                    self.maybe_advance(now);
                }
            }
            Message::RestoreOk { gs, attempt } => {
                if self.is_resume_stage(gs, attempt, |s| s == ResumeStage::Restore) {
                    self.mark(i);
                    self.maybe_advance(now);
                }
            }
            Message::StartOk { gs, attempt } => {
                if self.is_resume_stage(gs, attempt, |s| s == ResumeStage::Start) {
                    self.mark(i);
                    self.maybe_advance(now);
                }
            }
            Message::ResumeFailed {
                gs,
                attempt,
                reason,
            } => {
                if self.is_resume_stage(gs, attempt, |_| true) {
                    self.fail_resume(vec![from], FailureReason::ActionFailed { detail: reason });
                }
            }
            Message::Stale {
                gs,
                attempt,
                newest_gs,
                newest_attempt,
            } => self.on_stale(now, from, gs, attempt, newest_gs, newest_attempt),
            other => {
                return Err(Error::UnexpectedMessage {
                    role: ROLE,
                    message: other.kind(),
                })
            }
        }
        Ok(())
    }

    /// Reports the outcome of an action of the coordinator's own host.
    ///
    /// Completions of abandoned actions (after a failure) are ignored; an id that was never
    /// issued is [`Error::UnknownAction`].
    pub fn handle_action_complete(
        &mut self,
        now: Instant,
        id: ActionId,
        outcome: ActionOutcome,
    ) -> Result<()> {
        let Some(purpose) = self.host.complete(id)? else {
            return Ok(());
        };
        match purpose {
            Purpose::Arm => self.host.armed(&mut self.out, outcome),
            Purpose::Release(gs) => match outcome {
                ActionOutcome::Failed(_) => self.issue_cleanup(now, gs),
                _ => self.arm_idle_drop(),
            },
            Purpose::Check(gs) => self.own_check_done(now, gs, outcome),
            Purpose::Step(gs, step) => self.own_step_done(now, gs, step, outcome),
            Purpose::Cleanup(gs, tries) => match outcome {
                ActionOutcome::Failed(why) => {
                    let deadline = now + self.config.timeouts.snapshot;
                    self.host
                        .cleanup_failed(&mut self.out, gs, tries, why, deadline);
                }
                // Everything is removed: re-arm the idle drop rule.
                _ => self.arm_idle_drop(),
            },
            Purpose::Restore(attempt) | Purpose::StartVms(attempt) => {
                self.own_resume_step_done(now, attempt, outcome);
            }
        }
        Ok(())
    }

    /// Fires deadlines that have passed: silent participants fail the running operation,
    /// unanswered POLLs are repeated, a hung own action is abandoned and cleaned up.
    pub fn handle_timeout(&mut self, now: Instant) {
        // A hung own action during cleanup: abandon it and clear anyway. ClearAll and
        // arming the idle drop rule have no deadline: they are waited for.
        if let Some(o) = self.host.outstanding() {
            let due = o.deadline.is_some_and(|d| now >= d);
            if due && (matches!(self.phase, Phase::Idle) || o.purpose.is_maintenance()) {
                let purpose = o.purpose;
                self.host.abandon();
                if let Purpose::Step(gs, _) | Purpose::Release(gs) = purpose {
                    self.issue_cleanup(now, gs);
                } else {
                    self.host.issue_queued(&mut self.out);
                }
            }
        }
        match self.phase {
            Phase::Idle => {}
            Phase::Precheck {
                deadline, own_ok, ..
            } if now >= deadline => {
                let limit = self.config.timeouts.precheck;
                self.snapshot_timed_out(now, own_ok, "precheck", limit);
            }
            Phase::Snapshot {
                deadline, own_done, ..
            } if now >= deadline => {
                let limit = self.config.timeouts.snapshot;
                self.snapshot_timed_out(now, own_done, "snapshot", limit);
            }
            Phase::Resume { .. } => self.resume_timeout(now),
            _ => {}
        }
    }

    /// The next output to act on, `None` when there is nothing to do.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Coordinator::handle_timeout`] must be called next, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Idle => None,
            Phase::Precheck { deadline, .. } | Phase::Snapshot { deadline, .. } => Some(deadline),
            Phase::Resume {
                stage: ResumeStage::Poll { next_poll, .. },
                deadline,
                ..
            } => Some(next_poll.min(deadline)),
            Phase::Resume { deadline, .. } => Some(deadline),
        };
        let host = match (self.phase, self.host.outstanding()) {
            (Phase::Idle, Some(o)) => o.deadline,
            (_, Some(o)) if o.purpose.is_maintenance() => o.deadline,
            _ => None,
        };
        match (phase, host) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ----- internals -------------------------------------------------------------------

    fn ensure_idle(&self) -> Result<()> {
        if let Some((running, gs)) = self.running() {
            return Err(Error::Busy { running, gs });
        }
        if let Some(o) = self.host.outstanding() {
            let gs = match o.purpose {
                // Short rule maintenance: new work queues behind it.
                Purpose::Arm | Purpose::Release(_) => return Ok(()),
                Purpose::Check(gs) | Purpose::Step(gs, _) | Purpose::Cleanup(gs, _) => gs,
                Purpose::Restore(_) | Purpose::StartVms(_) => {
                    self.catalog.last_started.unwrap_or(GlobalSnapshotId(0))
                }
            };
            return Err(Error::Busy {
                running: Operation::GlobalSnapshot,
                gs,
            });
        }
        Ok(())
    }

    fn begin_phase(&mut self) {
        self.stamp += 1;
        self.pending = self.config.participants.len();
    }

    /// Marks participant `i` as answered in this phase; false if it already had.
    fn mark(&mut self, i: usize) -> bool {
        if self.answered[i] == self.stamp {
            return false;
        }
        self.answered[i] = self.stamp;
        self.pending -= 1;
        true
    }

    fn silent(&self) -> Vec<ParticipantId> {
        self.config
            .participants
            .iter()
            .zip(&self.answered)
            .filter(|(_, &s)| s != self.stamp)
            .map(|(&p, _)| p)
            .collect()
    }

    /// Who held up a phase past its deadline: the coordinator first (unless its own part
    /// is `own_finished`), then the participants that have not answered.
    fn late(&self, own_finished: bool) -> Vec<ParticipantId> {
        let mut who = self.silent();
        if !own_finished {
            who.insert(0, ParticipantId::COORDINATOR);
        }
        who
    }

    /// Phase `phase` of the global snapshot passed its deadline `limit`.
    fn snapshot_timed_out(
        &mut self,
        now: Instant,
        own_finished: bool,
        phase: &str,
        limit: Duration,
    ) {
        let who = self.late(own_finished);
        self.fail_snapshot(
            now,
            who,
            FailureReason::Timeout {
                phase: phase.into(),
                deadline: limit,
            },
        );
    }

    fn send(&mut self, to: ParticipantId, message: Message) {
        self.out.push_back(Output::Transmit(Envelope::new(
            self.config.cluster,
            ParticipantId::COORDINATOR,
            to,
            message,
        )));
    }

    /// A participant has seen newer epochs than this request's (`PROTOCOL.md` §6.3): the
    /// counters continue after the newest it has seen, and the attempt the request
    /// belongs to fails at once (instead of waiting for its deadline).
    fn on_stale(
        &mut self,
        now: Instant,
        from: ParticipantId,
        gs: GlobalSnapshotId,
        attempt: Option<ResumeAttempt>,
        newest_gs: GlobalSnapshotId,
        newest_attempt: ResumeAttempt,
    ) {
        let behind_gs = self.catalog.last_started.map_or(true, |l| l < newest_gs);
        if behind_gs {
            self.catalog.last_started = Some(newest_gs);
        }
        let behind_attempt = self
            .catalog
            .last_resume_attempt
            .map_or(true, |l| l < newest_attempt);
        if behind_attempt && newest_attempt.0 > 0 {
            self.catalog.last_resume_attempt = Some(newest_attempt);
        }
        let detail = format!(
            "participant {from} has seen {newest_gs} and resume attempt {}; this coordinator's request was of {gs}{}. \
             Its counters now continue after them (was its catalog lost?); trigger again",
            newest_attempt.0,
            attempt.map(|a| format!(", attempt {}", a.0)).unwrap_or_default()
        );
        if behind_gs || behind_attempt {
            self.out
                .push_back(Output::Event(ProtocolEvent::EpochAdvanced {
                    last_started: self.catalog.last_started,
                    last_resume_attempt: self.catalog.last_resume_attempt,
                }));
        }
        match (self.phase, attempt) {
            (Phase::Precheck { gs: cur, .. } | Phase::Snapshot { gs: cur, .. }, None)
                if cur == gs =>
            {
                self.fail_snapshot(now, vec![from], FailureReason::StaleEpoch { detail });
            }
            (Phase::Resume { attempt: cur, .. }, Some(a)) if cur == a => {
                self.fail_resume(vec![from], FailureReason::StaleEpoch { detail });
            }
            _ => {}
        }
    }

    fn broadcast(&mut self, message: Message) {
        let cluster = self.config.cluster;
        self.out.reserve(self.config.participants.len());
        for &p in &self.config.participants {
            self.out.push_back(Output::Transmit(Envelope::new(
                cluster,
                ParticipantId::COORDINATOR,
                p,
                message.clone(),
            )));
        }
    }

    /// Issues `DropIncoming(Post)`: the idle state drops POST datagrams.
    fn arm_idle_drop(&mut self) {
        self.host.arm_idle_drop(&mut self.out);
    }

    fn issue_cleanup(&mut self, now: Instant, gs: GlobalSnapshotId) {
        let deadline = now + self.config.timeouts.snapshot;
        self.host.issue_cleanup(&mut self.out, gs, deadline);
    }
}

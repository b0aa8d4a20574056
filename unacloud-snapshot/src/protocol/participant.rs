//! A participant (id ≥ 1): answers the coordinator and runs the six steps on its host.
//!
//! Safety rule: a participant never waits for the coordinator while its host filters
//! traffic — the six steps run back to back once TAKE_SNAPSHOT arrived — and if they have
//! not all completed `timeouts.snapshot` after TAKE_SNAPSHOT (a hung hypervisor, a lost
//! completion) it issues [`HostAction::ClearAll`] by itself. So neither a vanished
//! coordinator nor a hung step leaves a host dropping traffic.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::config::ParticipantConfig;
use super::host::{step_action, step_name, Host, CLEANUP_TRIES, SNAPSHOT_STEP, STEPS};
use super::ids::{ActionId, GlobalSnapshotId, ParticipantId, ResumeAttempt};
use super::message::{Envelope, Message};
use super::output::{ActionOutcome, HostAction, Output, ProtocolEvent};
use crate::error::{Error, Result};

const ROLE: &str = "participant";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Check(GlobalSnapshotId),
    Step(GlobalSnapshotId, u8),
    Cleanup(GlobalSnapshotId, u8),
    Restore(GlobalSnapshotId, ResumeAttempt),
    StartVms(GlobalSnapshotId, ResumeAttempt),
}

/// What the participant last did for the current global snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapState {
    Idle,
    Checking,
    Checked(bool),
    Steps { step: u8, deadline: Instant },
    Done(Duration),
    Abandoned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResumeState {
    Idle,
    Restoring,
    Restored,
    Starting,
    Started,
    Failed,
}

/// A participant's state machine. Same driving loop as the [`super::Coordinator`].
#[derive(Debug)]
pub struct Participant {
    config: ParticipantConfig,
    /// The newest global snapshot seen (the epoch); older ones are ignored.
    gs: GlobalSnapshotId,
    snap: SnapState,
    local_time: Duration,
    /// The newest resume attempt seen.
    attempt: ResumeAttempt,
    resume_gs: GlobalSnapshotId,
    resume: ResumeState,
    host: Host<Purpose>,
    out: VecDeque<Output>,
}

impl Participant {
    /// A participant; fails with [`Error::InvalidConfig`] for id 0 or a reserved id.
    pub fn new(config: ParticipantConfig) -> Result<Self> {
        if config.id.is_coordinator()
            || config.id == ParticipantId::METADATA_SERVER
            || config.id == ParticipantId::UNREGISTERED
        {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "participant id {} is reserved; participants are numbered from 1 (0 is the coordinator)",
                    config.id
                ),
            });
        }
        Ok(Self {
            config,
            gs: GlobalSnapshotId(0),
            snap: SnapState::Idle,
            local_time: Duration::ZERO,
            attempt: ResumeAttempt(0),
            resume_gs: GlobalSnapshotId(0),
            resume: ResumeState::Idle,
            host: Host::new(),
            out: VecDeque::new(),
        })
    }

    /// This participant's id.
    pub fn id(&self) -> ParticipantId {
        self.config.id
    }

    /// The configuration.
    pub fn config(&self) -> &ParticipantConfig {
        &self.config
    }

    /// Whether the host may currently colour or filter traffic for the protocol (between
    /// the first step's issue and the completion of step 6 or of a ClearAll).
    pub fn may_filter(&self) -> bool {
        matches!(self.snap, SnapState::Steps { .. })
            || matches!(
                self.host.outstanding().map(|o| o.purpose),
                Some(Purpose::Cleanup(..))
            )
    }

    /// Feeds a received envelope. Late and duplicated messages of earlier global
    /// snapshots or resume attempts are ignored (`Ok`).
    pub fn handle_message(&mut self, now: Instant, envelope: Envelope) -> Result<()> {
        if envelope.cluster != self.config.cluster {
            return Err(Error::ForeignCluster {
                expected: self.config.cluster,
                got: envelope.cluster,
            });
        }
        if envelope.to != self.config.id {
            return Err(Error::Misaddressed {
                to: envelope.to,
                me: self.config.id,
            });
        }
        if envelope.from != ParticipantId::COORDINATOR {
            return Err(Error::UnknownParticipant { id: envelope.from });
        }
        match envelope.message {
            Message::Precheck { gs } => self.on_precheck(now, gs),
            Message::TakeSnapshot { gs } => self.on_take_snapshot(now, gs),
            Message::Abort { gs, reason } => self.on_abort(now, gs, reason),
            Message::Poll { gs, attempt } => {
                if attempt >= self.attempt {
                    if attempt > self.attempt {
                        self.attempt = attempt;
                        self.resume_gs = gs;
                        self.resume = ResumeState::Idle;
                    }
                    self.send(Message::PollOk { gs, attempt });
                }
            }
            Message::Restore { gs, attempt } => self.on_restore(now, gs, attempt),
            Message::Start { gs, attempt } => self.on_start(now, gs, attempt),
            other => {
                return Err(Error::UnexpectedMessage {
                    role: ROLE,
                    message: other.kind(),
                })
            }
        }
        Ok(())
    }

    /// Reports the outcome of a host action. Completions of abandoned actions are
    /// ignored; an id never issued is [`Error::UnknownAction`].
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
            Purpose::Check(gs) => {
                if gs == self.gs && self.snap == SnapState::Checking {
                    let ok = outcome == ActionOutcome::VmsRunning(true);
                    self.snap = SnapState::Checked(ok);
                    self.send_precheck_answer(gs, Some(outcome));
                }
            }
            Purpose::Step(gs, step) => self.step_done(now, gs, step, outcome),
            Purpose::Cleanup(gs, tries) => {
                if let ActionOutcome::Failed(why) = outcome {
                    self.cleanup_failed(now, gs, tries, why);
                }
            }
            Purpose::Restore(gs, attempt) | Purpose::StartVms(gs, attempt) => {
                if attempt != self.attempt {
                    return Ok(());
                }
                let restoring = matches!(purpose, Purpose::Restore(..));
                match outcome {
                    ActionOutcome::Failed(reason) => {
                        self.resume = ResumeState::Failed;
                        self.send(Message::ResumeFailed {
                            gs,
                            attempt,
                            reason,
                        });
                    }
                    _ if restoring => {
                        self.resume = ResumeState::Restored;
                        self.send(Message::RestoreOk { gs, attempt });
                    }
                    _ => {
                        self.resume = ResumeState::Started;
                        self.send(Message::StartOk { gs, attempt });
                        self.out
                            .push_back(Output::Event(ProtocolEvent::Resumed { gs }));
                    }
                }
            }
        }
        Ok(())
    }

    /// Fires deadlines: steps that did not finish in time are abandoned and the host is
    /// cleaned up (ClearAll); a hung VM check or resume action is reported as failed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(o) = self.host.outstanding() else {
            return;
        };
        if now < o.deadline {
            return;
        }
        match o.purpose {
            Purpose::Check(gs) => {
                self.host.abandon();
                if gs == self.gs && self.snap == SnapState::Checking {
                    self.snap = SnapState::Checked(false);
                    self.send(Message::PrecheckFailed {
                        gs,
                        reason: format!(
                            "the VM check did not complete within {:?}",
                            self.config.timeouts.precheck
                        ),
                    });
                }
            }
            Purpose::Step(gs, _) if self.snap == SnapState::Abandoned || gs != self.gs => {
                // Already aborted and waiting for this step to finish: clean up now.
                self.host.abandon();
                self.issue_cleanup(now, gs);
            }
            Purpose::Step(gs, step) => {
                self.host.abandon();
                let reason = format!(
                    "{} did not complete within {:?} of TAKE_SNAPSHOT; rules removed",
                    step_name(step),
                    self.config.timeouts.snapshot
                );
                self.abandon_snapshot(now, gs, reason, true);
            }
            Purpose::Cleanup(..) => {}
            Purpose::Restore(gs, attempt) | Purpose::StartVms(gs, attempt) => {
                self.host.abandon();
                if attempt == self.attempt {
                    self.resume = ResumeState::Failed;
                    self.send(Message::ResumeFailed {
                        gs,
                        attempt,
                        reason: format!(
                            "the host action did not complete within {:?}",
                            self.config.timeouts.resume_phase
                        ),
                    });
                }
            }
        }
    }

    /// The next output to act on.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Participant::handle_timeout`] must be called next, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.host.outstanding() {
            Some(o) if !matches!(o.purpose, Purpose::Cleanup(..)) => Some(o.deadline),
            _ => None,
        }
    }

    // ----- internals -------------------------------------------------------------------

    fn send(&mut self, message: Message) {
        self.out.push_back(Output::Transmit(Envelope::new(
            self.config.cluster,
            self.config.id,
            ParticipantId::COORDINATOR,
            message,
        )));
    }

    fn busy_reason(&self) -> Option<String> {
        self.host.outstanding().map(|o| {
            let what = match o.purpose {
                Purpose::Check(gs) => format!("checking VMs for {gs}"),
                Purpose::Step(gs, step) => format!("{} of {gs}", step_name(step)),
                Purpose::Cleanup(gs, _) => format!("removing the rules of {gs}"),
                Purpose::Restore(gs, _) => format!("restoring {gs}"),
                Purpose::StartVms(gs, _) => format!("starting the VMs of {gs}"),
            };
            format!("participant {} is busy {what}", self.config.id)
        })
    }

    fn on_precheck(&mut self, now: Instant, gs: GlobalSnapshotId) {
        if gs < self.gs {
            return; // stale
        }
        if gs == self.gs && self.snap != SnapState::Idle {
            // Duplicate: repeat a finished answer, otherwise it is coming.
            if let SnapState::Checked(_) = self.snap {
                self.send_precheck_answer(gs, None);
            }
            return;
        }
        self.gs = gs;
        if let Some(reason) = self.busy_reason() {
            self.snap = SnapState::Abandoned;
            self.send(Message::PrecheckFailed { gs, reason });
            return;
        }
        self.snap = SnapState::Checking;
        let deadline = now + self.config.timeouts.precheck;
        let vms = self.config.vms.clone();
        self.host.issue(
            &mut self.out,
            Purpose::Check(gs),
            HostAction::CheckVmsRunning { vms },
            deadline,
        );
    }

    fn send_precheck_answer(&mut self, gs: GlobalSnapshotId, outcome: Option<ActionOutcome>) {
        match (self.snap, outcome) {
            (SnapState::Checked(true), _) => self.send(Message::PrecheckOk { gs }),
            (_, Some(ActionOutcome::Failed(reason))) => {
                self.send(Message::PrecheckFailed { gs, reason })
            }
            _ => self.send(Message::PrecheckFailed {
                gs,
                reason: format!("not all VMs of participant {} are running", self.config.id),
            }),
        }
    }

    fn on_take_snapshot(&mut self, now: Instant, gs: GlobalSnapshotId) {
        if gs < self.gs {
            return; // stale
        }
        if gs == self.gs {
            match self.snap {
                SnapState::Steps { .. } | SnapState::Abandoned => return,
                SnapState::Done(local_time) => {
                    self.send(Message::Done { gs, local_time });
                    return;
                }
                SnapState::Idle | SnapState::Checking | SnapState::Checked(_) => {}
            }
        }
        self.gs = gs;
        if let Some(o) = self.host.outstanding() {
            if let Purpose::Check(_) = o.purpose {
                // The coordinator moved on without our answer being needed.
                self.host.abandon();
            }
        }
        if let Some(reason) = self.busy_reason() {
            self.snap = SnapState::Abandoned;
            self.send(Message::SnapshotFailed { gs, reason });
            return;
        }
        let deadline = now + self.config.timeouts.snapshot;
        self.snap = SnapState::Steps { step: 0, deadline };
        self.local_time = Duration::ZERO;
        let action = step_action(0, gs, &self.config.vms);
        self.host
            .issue(&mut self.out, Purpose::Step(gs, 0), action, deadline);
    }

    fn step_done(&mut self, now: Instant, gs: GlobalSnapshotId, step: u8, outcome: ActionOutcome) {
        let SnapState::Steps { deadline, .. } = self.snap else {
            // Aborted while the step ran: remove whatever it installed.
            self.issue_cleanup(now, gs);
            return;
        };
        if gs != self.gs {
            self.issue_cleanup(now, gs);
            return;
        }
        if let ActionOutcome::Failed(detail) = outcome {
            let reason = format!("{} failed: {detail}", step_name(step));
            self.abandon_snapshot(now, gs, reason, true);
            return;
        }
        if step == SNAPSHOT_STEP {
            if let ActionOutcome::SnapshotTaken { local_time } = outcome {
                self.local_time = local_time;
            }
        }
        if step + 1 < STEPS {
            self.snap = SnapState::Steps {
                step: step + 1,
                deadline,
            };
            let action = step_action(step + 1, gs, &self.config.vms);
            self.host
                .issue(&mut self.out, Purpose::Step(gs, step + 1), action, deadline);
        } else {
            let local_time = self.local_time;
            self.snap = SnapState::Done(local_time);
            self.send(Message::Done { gs, local_time });
            self.out
                .push_back(Output::Event(ProtocolEvent::LocalSnapshotCompleted {
                    gs,
                    local_time,
                }));
        }
    }

    fn on_abort(&mut self, now: Instant, gs: GlobalSnapshotId, reason: String) {
        if gs < self.gs {
            return; // stale
        }
        if gs > self.gs {
            // An attempt we never saw: just move the epoch on.
            self.gs = gs;
            self.snap = SnapState::Abandoned;
            return;
        }
        match self.snap {
            SnapState::Steps { .. } => {
                let running = self.host.is_busy();
                // A running step is cleaned up when it completes (or at its deadline).
                self.abandon_snapshot(
                    now,
                    gs,
                    format!("aborted by the coordinator: {reason}"),
                    false,
                );
                if !running {
                    self.issue_cleanup(now, gs);
                }
            }
            SnapState::Checking => {
                self.host.abandon();
                self.snap = SnapState::Abandoned;
            }
            SnapState::Done(_) => {
                self.snap = SnapState::Abandoned;
                self.out
                    .push_back(Output::Event(ProtocolEvent::LocalSnapshotAbandoned {
                        gs,
                        why: format!("aborted by the coordinator: {reason}"),
                    }));
            }
            SnapState::Idle | SnapState::Checked(_) | SnapState::Abandoned => {
                self.snap = SnapState::Abandoned;
            }
        }
    }

    /// Gives up the current steps. With `cleanup_now`, ClearAll is issued immediately
    /// (the outstanding step, if any, was abandoned or has completed) and the coordinator is
    /// told; otherwise the outstanding step's completion triggers the cleanup.
    fn abandon_snapshot(
        &mut self,
        now: Instant,
        gs: GlobalSnapshotId,
        why: String,
        cleanup_now: bool,
    ) {
        self.snap = SnapState::Abandoned;
        if cleanup_now {
            self.host.abandon();
            self.issue_cleanup(now, gs);
            self.send(Message::SnapshotFailed {
                gs,
                reason: why.clone(),
            });
        }
        self.out
            .push_back(Output::Event(ProtocolEvent::LocalSnapshotAbandoned {
                gs,
                why,
            }));
    }

    /// A ClearAll failed: retry up to [`CLEANUP_TRIES`] times in total, then report it —
    /// the host may still colour or drop traffic and needs an operator.
    fn cleanup_failed(&mut self, now: Instant, gs: GlobalSnapshotId, tries: u8, why: String) {
        if tries < CLEANUP_TRIES {
            let deadline = now + self.config.timeouts.snapshot;
            self.host.issue(
                &mut self.out,
                Purpose::Cleanup(gs, tries + 1),
                HostAction::ClearAll,
                deadline,
            );
        } else {
            self.out
                .push_back(Output::Event(ProtocolEvent::CleanupFailed { gs, why }));
        }
    }

    fn issue_cleanup(&mut self, now: Instant, gs: GlobalSnapshotId) {
        let deadline = now + self.config.timeouts.snapshot;
        self.host.issue(
            &mut self.out,
            Purpose::Cleanup(gs, 1),
            HostAction::ClearAll,
            deadline,
        );
    }

    fn on_restore(&mut self, now: Instant, gs: GlobalSnapshotId, attempt: ResumeAttempt) {
        if attempt < self.attempt {
            return;
        }
        if attempt == self.attempt && self.resume != ResumeState::Idle {
            match self.resume {
                ResumeState::Restored | ResumeState::Starting | ResumeState::Started => {
                    self.send(Message::RestoreOk { gs, attempt })
                }
                _ => {}
            }
            return;
        }
        self.attempt = attempt;
        self.resume_gs = gs;
        if let Some(reason) = self.busy_reason() {
            self.resume = ResumeState::Failed;
            self.send(Message::ResumeFailed {
                gs,
                attempt,
                reason,
            });
            return;
        }
        self.resume = ResumeState::Restoring;
        let deadline = now + self.config.timeouts.resume_phase;
        let vms = self.config.vms.clone();
        self.host.issue(
            &mut self.out,
            Purpose::Restore(gs, attempt),
            HostAction::RestoreLocal { gs, vms },
            deadline,
        );
    }

    fn on_start(&mut self, now: Instant, gs: GlobalSnapshotId, attempt: ResumeAttempt) {
        if attempt != self.attempt || gs != self.resume_gs {
            return;
        }
        match self.resume {
            ResumeState::Restored => {}
            ResumeState::Started => {
                self.send(Message::StartOk { gs, attempt });
                return;
            }
            ResumeState::Starting => return,
            _ => {
                self.send(Message::ResumeFailed {
                    gs,
                    attempt,
                    reason: format!(
                        "participant {} has not restored {gs} in this attempt",
                        self.config.id
                    ),
                });
                return;
            }
        }
        self.resume = ResumeState::Starting;
        let deadline = now + self.config.timeouts.resume_phase;
        let vms = self.config.vms.clone();
        self.host.issue(
            &mut self.out,
            Purpose::StartVms(gs, attempt),
            HostAction::StartVms { vms },
            deadline,
        );
    }
}

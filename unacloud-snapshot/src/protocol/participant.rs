//! A participant (id ≥ 1): answers the coordinator and runs the six steps on its host.
//!
//! Its idle state drops incoming POST datagrams (the first action it issues, re-armed
//! after every ClearColour and ClearAll). Once TAKE_SNAPSHOT arrived, steps 1–5 run back
//! to back and DONE is sent; the host then keeps colouring POST (and accepting POST) until
//! the coordinator's RELEASE says every host has taken its local snapshot, and performs
//! step 6 only then ([`ClearColourPolicy::OnRelease`]).
//!
//! A live local snapshot has two moments: the snapshot point (the VMs' state is fixed,
//! [`ActionOutcome::SnapshotPoint`]) and durability (the state is on disk). Steps 4 and 5
//! follow the point at once; DONE waits for [`HostAction::AwaitDurable`], so the
//! coordinator never records a global snapshot that a power failure could still make
//! unrestorable.
//!
//! Safety rule: if the steps have not completed, or neither RELEASE nor ABORT arrived,
//! `timeouts.snapshot` after TAKE_SNAPSHOT (a hung hypervisor, a lost completion, a
//! vanished coordinator) it issues [`HostAction::ClearAll`] by itself. So neither a
//! vanished coordinator nor a hung step leaves a host colouring or filtering beyond the
//! idle rule, which only drops POST datagrams — and those exist only while some host is
//! inside a global snapshot.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::config::{ClearColourPolicy, ParticipantConfig};
use super::host::{
    after_step, clears_before_done, step_action, step_name, AfterStep, Host, LocalTimes,
    RulePurpose,
};
use super::ids::{ActionId, GlobalSnapshotId, ParticipantId, ResumeAttempt};
use super::message::{Envelope, Message};
use super::output::{ActionOutcome, HostAction, Output, ProtocolEvent};
use crate::protocol::error::{Error, Result};

const ROLE: &str = "participant";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// (Re-)arming the idle drop rule.
    Arm,
    Check(GlobalSnapshotId),
    Step(GlobalSnapshotId, u8),
    /// Step 6 after RELEASE.
    Release(GlobalSnapshotId),
    Cleanup(GlobalSnapshotId, u8),
    Restore(GlobalSnapshotId, ResumeAttempt),
    StartVms(GlobalSnapshotId, ResumeAttempt),
}

impl RulePurpose for Purpose {
    const ARM: Self = Purpose::Arm;
    fn cleanup(gs: GlobalSnapshotId, tries: u8) -> Self {
        Purpose::Cleanup(gs, tries)
    }
}

impl Purpose {
    /// Short rule maintenance: other work queues behind it instead of being refused.
    fn is_maintenance(self) -> bool {
        matches!(self, Purpose::Arm | Purpose::Release(_))
    }
}

/// What the participant last did for the current global snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapState {
    Idle,
    Checking,
    Checked(bool),
    /// Steps 1–5 (or 6), then the wait for durability, run; `times` are set once step 3
    /// (and the wait) reported them.
    Steps {
        deadline: Instant,
        times: LocalTimes,
    },
    /// DONE sent; the host colours POST until RELEASE, ABORT or the deadline.
    Holding {
        local_time: Duration,
        deadline: Instant,
    },
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
    Aborted,
}

/// A participant's state machine. Same driving loop as the [`super::Coordinator`].
#[derive(Debug)]
pub struct Participant {
    config: ParticipantConfig,
    /// The newest global snapshot seen (the epoch); older ones are ignored.
    gs: GlobalSnapshotId,
    snap: SnapState,
    /// Whether the newest global snapshot is decided here (RELEASE or ABORT arrived, or
    /// its deadline passed): a request of it can then only come from a coordinator that
    /// reuses the epoch, and is answered STALE (`PROTOCOL.md` §6.3).
    decided: bool,
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
        let mut p = Self {
            config,
            gs: GlobalSnapshotId(0),
            snap: SnapState::Idle,
            decided: false,
            attempt: ResumeAttempt(0),
            resume_gs: GlobalSnapshotId(0),
            resume: ResumeState::Idle,
            host: Host::new(),
            out: VecDeque::new(),
        };
        // The idle state drops POST: the first action, before anything else.
        p.arm_idle_drop();
        Ok(p)
    }

    /// This participant's id.
    pub fn id(&self) -> ParticipantId {
        self.config.id
    }

    /// The configuration.
    pub fn config(&self) -> &ParticipantConfig {
        &self.config
    }

    /// Whether the host's rules may currently differ from the idle state (no colour,
    /// incoming POST dropped): from the first step's issue until step 6 (after RELEASE) or
    /// a ClearAll completed.
    pub fn may_filter(&self) -> bool {
        matches!(
            self.snap,
            SnapState::Steps { .. } | SnapState::Holding { .. }
        ) || matches!(
            self.host.outstanding().map(|o| o.purpose),
            Some(Purpose::Cleanup(..) | Purpose::Release(_))
        )
    }

    /// Feeds a received envelope. Late and duplicated messages of earlier global
    /// snapshots or resume attempts are ignored (`Ok`).
    pub fn handle_message(&mut self, now: Instant, envelope: Envelope) -> Result<()> {
        envelope.check_addressed_to(self.config.cluster, self.config.id)?;
        if envelope.from != ParticipantId::COORDINATOR {
            return Err(Error::UnknownParticipant { id: envelope.from });
        }
        match envelope.message {
            Message::Precheck { gs } => self.on_precheck(now, gs),
            Message::TakeSnapshot { gs } => self.on_take_snapshot(now, gs),
            Message::Release { gs } => self.on_release(now, gs),
            Message::Abort { gs, reason } => self.on_abort(now, gs, reason),
            Message::Poll { gs, attempt } => {
                // A coordinator that resumes has decided every global snapshot.
                self.release_held(now);
                if self.reused_attempt(gs, attempt) {
                    self.send_stale(gs, Some(attempt));
                } else if attempt >= self.attempt {
                    if attempt > self.attempt {
                        self.attempt = attempt;
                        self.resume_gs = gs;
                        self.resume = ResumeState::Idle;
                    }
                    self.send(Message::PollOk { gs, attempt });
                } else {
                    self.send_stale(gs, Some(attempt));
                }
            }
            Message::ResumeAbort {
                gs,
                attempt,
                reason,
            } => self.on_resume_abort(gs, attempt, reason),
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
            Purpose::Arm => self.host.armed(&mut self.out, outcome),
            Purpose::Release(gs) => match outcome {
                ActionOutcome::Failed(_) => self.issue_cleanup(now, gs),
                _ => self.arm_idle_drop(),
            },
            Purpose::Check(gs) => {
                if gs == self.gs && self.snap == SnapState::Checking {
                    let ok = outcome == ActionOutcome::VmsRunning(true);
                    self.snap = SnapState::Checked(ok);
                    self.send_precheck_answer(gs, Some(outcome));
                }
            }
            Purpose::Step(gs, step) => self.step_done(now, gs, step, outcome),
            Purpose::Cleanup(gs, tries) => match outcome {
                ActionOutcome::Failed(why) => {
                    let deadline = now + self.config.timeouts.snapshot;
                    self.host
                        .cleanup_failed(&mut self.out, gs, tries, why, deadline);
                }
                _ => self.arm_idle_drop(),
            },
            Purpose::Restore(gs, attempt) | Purpose::StartVms(gs, attempt) => {
                if attempt != self.attempt || self.resume == ResumeState::Aborted {
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
    /// cleaned up (ClearAll); a host still colouring POST without RELEASE or ABORT cleans
    /// up by itself; a hung VM check or resume action is reported as failed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let SnapState::Holding {
            local_time,
            deadline,
        } = self.snap
        {
            if now >= deadline && !self.host.is_busy() {
                let gs = self.gs;
                self.snap = SnapState::Done(local_time);
                self.decided = true;
                self.out
                    .push_back(Output::Event(ProtocolEvent::ReleaseMissed { gs }));
                self.issue_cleanup(now, gs);
                return;
            }
        }
        let Some(o) = self.host.outstanding() else {
            return;
        };
        let Some(deadline) = o.deadline else {
            return; // ClearAll and arming the idle drop rule are waited for
        };
        if now < deadline {
            return;
        }
        match o.purpose {
            Purpose::Arm | Purpose::Cleanup(..) => {}
            Purpose::Release(gs) => {
                // Step 6 hung: remove everything instead.
                self.host.abandon();
                self.issue_cleanup(now, gs);
            }
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
        let action = self.host.outstanding().and_then(|o| o.deadline);
        let holding = match self.snap {
            SnapState::Holding { deadline, .. } => Some(deadline),
            _ => None,
        };
        match (action, holding) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
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

    /// Why new work must be refused: an action other than short rule maintenance is
    /// outstanding, or one is already queued behind it.
    fn busy_reason(&self) -> Option<String> {
        let purpose = match (
            self.host.outstanding().map(|o| o.purpose),
            self.host.queued(),
        ) {
            (_, Some(q)) => q,
            (Some(p), None) if !p.is_maintenance() => p,
            _ => return None,
        };
        let what = match purpose {
            Purpose::Arm => "arming the idle drop rule".to_string(),
            Purpose::Check(gs) => format!("checking VMs for {gs}"),
            Purpose::Step(gs, step) => format!("{} of {gs}", step_name(step)),
            Purpose::Release(gs) => format!("stopping the colour of {gs}"),
            Purpose::Cleanup(gs, _) => format!("removing the rules of {gs}"),
            Purpose::Restore(gs, _) => format!("restoring {gs}"),
            Purpose::StartVms(gs, _) => format!("starting the VMs of {gs}"),
        };
        Some(format!("participant {} is busy {what}", self.config.id))
    }

    /// Issues `DropIncoming(Post)`: the idle state drops POST datagrams.
    fn arm_idle_drop(&mut self) {
        self.host.arm_idle_drop(&mut self.out);
    }

    /// A message shows that the coordinator has decided the global snapshot whose colour
    /// this host still holds (a newer epoch, or a resume): perform step 6 now.
    fn release_held(&mut self, now: Instant) {
        if let SnapState::Holding { local_time, .. } = self.snap {
            self.snap = SnapState::Done(local_time);
            let gs = self.gs;
            self.issue_release(now, gs);
        }
    }

    /// Step 6 (ClearColour), then the idle drop rule is re-armed.
    fn issue_release(&mut self, now: Instant, gs: GlobalSnapshotId) {
        let deadline = now + self.config.timeouts.snapshot;
        self.host.issue(
            &mut self.out,
            Purpose::Release(gs),
            HostAction::ClearColour,
            deadline,
        );
    }

    /// Forgets a VM check, outstanding or queued.
    fn cancel_check(&mut self) {
        if let Some(Purpose::Check(_)) = self.host.queued() {
            self.host.drop_queued();
        }
        if let Some(Purpose::Check(_)) = self.host.outstanding().map(|o| o.purpose) {
            self.host.abandon();
            self.host.issue_queued(&mut self.out);
        }
    }

    fn on_release(&mut self, now: Instant, gs: GlobalSnapshotId) {
        if gs < self.gs {
            return; // stale
        }
        if gs > self.gs {
            // Of an attempt we never took part in: nothing of it to clear.
            self.skip_to(now, gs);
            return;
        }
        // Current attempt: release the held colour; a duplicate finds nothing to do.
        self.release_held(now);
        self.decided = true;
    }

    /// Moves the epoch on to `gs`, an attempt this host never took part in (after
    /// releasing the colour it still holds for the current one).
    fn skip_to(&mut self, now: Instant, gs: GlobalSnapshotId) {
        self.release_held(now);
        self.gs = gs;
        self.snap = SnapState::Abandoned;
        self.decided = true;
    }

    /// Tells the coordinator that its request of `gs` (`attempt`) is older than what this
    /// participant has seen (`PROTOCOL.md` §6.3).
    fn send_stale(&mut self, gs: GlobalSnapshotId, attempt: Option<ResumeAttempt>) {
        self.send(Message::Stale {
            gs,
            attempt,
            newest_gs: self.gs,
            newest_attempt: self.attempt,
        });
    }

    fn on_resume_abort(&mut self, gs: GlobalSnapshotId, attempt: ResumeAttempt, reason: String) {
        if attempt < self.attempt {
            return;
        }
        self.attempt = attempt;
        self.resume_gs = gs;
        self.resume = ResumeState::Aborted;
        self.out
            .push_back(Output::Event(ProtocolEvent::ResumeAborted { gs, reason }));
    }

    fn on_precheck(&mut self, now: Instant, gs: GlobalSnapshotId) {
        if gs < self.gs || (gs == self.gs && self.decided) {
            self.send_stale(gs, None);
            return;
        }
        if gs == self.gs && self.snap != SnapState::Idle {
            // Duplicate: repeat a finished answer, otherwise it is coming.
            if let SnapState::Checked(_) = self.snap {
                self.send_precheck_answer(gs, None);
            }
            return;
        }
        self.release_held(now);
        self.gs = gs;
        self.decided = false;
        if let Some(reason) = self.busy_reason() {
            self.snap = SnapState::Abandoned;
            self.send(Message::PrecheckFailed { gs, reason });
            return;
        }
        self.snap = SnapState::Checking;
        let deadline = now + self.config.timeouts.precheck;
        let vms = self.config.vms.clone();
        self.host.issue_or_queue(
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
        if gs < self.gs || (gs == self.gs && self.decided) {
            self.send_stale(gs, None);
            return;
        }
        if gs == self.gs {
            match self.snap {
                SnapState::Steps { .. } | SnapState::Abandoned => return,
                SnapState::Done(local_time) | SnapState::Holding { local_time, .. } => {
                    self.send(Message::Done { gs, local_time });
                    return;
                }
                SnapState::Idle | SnapState::Checking | SnapState::Checked(_) => {}
            }
        }
        self.release_held(now);
        self.gs = gs;
        self.decided = false;
        // The coordinator moved on without our answer being needed.
        self.cancel_check();
        if let Some(reason) = self.busy_reason() {
            self.snap = SnapState::Abandoned;
            self.send(Message::SnapshotFailed { gs, reason });
            return;
        }
        let deadline = now + self.config.timeouts.snapshot;
        self.snap = SnapState::Steps {
            deadline,
            times: LocalTimes::default(),
        };
        let action = step_action(0, gs, &self.config.vms);
        self.host
            .issue_or_queue(&mut self.out, Purpose::Step(gs, 0), action, deadline);
    }

    fn step_done(&mut self, now: Instant, gs: GlobalSnapshotId, step: u8, outcome: ActionOutcome) {
        let SnapState::Steps {
            deadline,
            mut times,
        } = self.snap
        else {
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
        times.record(step, &outcome);
        self.snap = SnapState::Steps { deadline, times };
        let policy = self.config.clear_colour;
        if clears_before_done(step, policy) {
            // The thesis: step 6 is done; back to the idle drop rule (a wait for
            // durability queues behind it).
            self.arm_idle_drop();
        }
        match after_step(step, policy, times) {
            AfterStep::Issue(next) => {
                let action = step_action(next, gs, &self.config.vms);
                self.host
                    .issue_or_queue(&mut self.out, Purpose::Step(gs, next), action, deadline);
            }
            AfterStep::Done => {
                let local_time = times.point;
                self.snap = match policy {
                    // Keep colouring POST until RELEASE, ABORT or the deadline.
                    ClearColourPolicy::OnRelease => SnapState::Holding {
                        local_time,
                        deadline,
                    },
                    ClearColourPolicy::AfterOwnSnapshot => SnapState::Done(local_time),
                };
                self.send(Message::Done { gs, local_time });
                self.out
                    .push_back(Output::Event(ProtocolEvent::LocalSnapshotCompleted {
                        gs,
                        local_time,
                        total_time: times.total(),
                    }));
            }
        }
    }

    fn on_abort(&mut self, now: Instant, gs: GlobalSnapshotId, reason: String) {
        if gs < self.gs {
            return; // stale
        }
        if gs > self.gs {
            // An attempt we never saw: just move the epoch on.
            self.skip_to(now, gs);
            return;
        }
        self.decided = true;
        let why = || format!("aborted by the coordinator: {reason}");
        match self.snap {
            SnapState::Steps { .. } if matches!(self.host.queued(), Some(Purpose::Step(..))) => {
                // Step 1 had not been issued yet, or (thesis order) step 6 is done and the
                // wait for durability queues behind re-arming the idle drop rule: nothing
                // to clean.
                self.host.drop_queued();
                self.abandon_snapshot(now, gs, why(), false);
            }
            SnapState::Steps { .. } => {
                let running = self.host.is_busy();
                // A running step is cleaned up when it completes (or at its deadline).
                self.abandon_snapshot(now, gs, why(), false);
                if !running {
                    self.issue_cleanup(now, gs);
                }
            }
            SnapState::Checking => {
                self.cancel_check();
                self.snap = SnapState::Abandoned;
            }
            SnapState::Holding { .. } | SnapState::Done(_) => {
                // Holding: same cleanup as for running steps: remove every rule, then
                // re-arm.
                let holding = matches!(self.snap, SnapState::Holding { .. });
                self.snap = SnapState::Abandoned;
                if holding && !self.host.is_busy() {
                    self.issue_cleanup(now, gs);
                }
                self.out
                    .push_back(Output::Event(ProtocolEvent::LocalSnapshotAbandoned {
                        gs,
                        why: why(),
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

    fn issue_cleanup(&mut self, now: Instant, gs: GlobalSnapshotId) {
        let deadline = now + self.config.timeouts.snapshot;
        self.host.issue_cleanup(&mut self.out, gs, deadline);
    }

    /// A request of the current resume attempt that no coordinator sends twice: that
    /// attempt was aborted here, or the request names another global snapshot than the
    /// attempt does (a coordinator that reuses attempt numbers).
    fn reused_attempt(&self, gs: GlobalSnapshotId, attempt: ResumeAttempt) -> bool {
        attempt == self.attempt
            && attempt.0 > 0
            && (self.resume == ResumeState::Aborted || gs != self.resume_gs)
    }

    fn on_restore(&mut self, now: Instant, gs: GlobalSnapshotId, attempt: ResumeAttempt) {
        if attempt < self.attempt || self.reused_attempt(gs, attempt) {
            self.send_stale(gs, Some(attempt));
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
        self.release_held(now);
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
        self.host.issue_or_queue(
            &mut self.out,
            Purpose::Restore(gs, attempt),
            HostAction::RestoreLocal { gs, vms },
            deadline,
        );
    }

    fn on_start(&mut self, now: Instant, gs: GlobalSnapshotId, attempt: ResumeAttempt) {
        if attempt < self.attempt || (attempt == self.attempt && gs != self.resume_gs) {
            self.send_stale(gs, Some(attempt));
            return;
        }
        if attempt != self.attempt {
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
        self.host.issue_or_queue(
            &mut self.out,
            Purpose::StartVms(gs, attempt),
            HostAction::StartVms { vms },
            deadline,
        );
    }
}

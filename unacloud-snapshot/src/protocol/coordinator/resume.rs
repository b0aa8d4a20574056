//! The coordinator's side of the resume protocol: POLL (repeated until everybody
//! answered), RESTORE, START.

use std::time::{Duration, Instant};

use super::{Coordinator, Phase, Purpose, ResumeStage};
use crate::error::{Error, Result};
use crate::protocol::ids::{GlobalSnapshotId, ParticipantId, ResumeAttempt};
use crate::protocol::message::Message;
use crate::protocol::output::{ActionOutcome, FailureReason, HostAction, Output, ProtocolEvent};

impl Coordinator {
    /// Starts resuming from `gs`, by default the latest completed global snapshot:
    /// POLL (repeated every `poll_interval` until all answered), RESTORE, START.
    ///
    /// Fails with [`Error::NoRestorableSnapshot`] or [`Error::SnapshotNotRestorable`] if
    /// there is nothing (complete) to restore, [`Error::Busy`] while something runs.
    pub fn start_resume(
        &mut self,
        now: Instant,
        gs: Option<GlobalSnapshotId>,
    ) -> Result<GlobalSnapshotId> {
        self.ensure_idle()?;
        let gs = match gs {
            None => self.catalog.latest().ok_or(Error::NoRestorableSnapshot)?.gs,
            Some(gs) if self.catalog.is_restorable(gs) => gs,
            Some(gs) => {
                return Err(Error::SnapshotNotRestorable {
                    gs,
                    completed: self.catalog.completed_ids(),
                })
            }
        };
        let attempt = self.catalog.next_resume_attempt();
        self.catalog.last_resume_attempt = Some(attempt);
        self.out
            .push_back(Output::Event(ProtocolEvent::ResumeStarted { gs, attempt }));
        self.begin_phase();
        self.broadcast(Message::Poll { gs, attempt });
        let give_up = self
            .config
            .timeouts
            .poll_give_up
            .map_or(far_future(now), |d| now + d);
        self.phase = Phase::Resume {
            gs,
            attempt,
            stage: ResumeStage::Poll {
                rounds: 1,
                next_poll: now + self.config.timeouts.poll_interval,
            },
            started: now,
            deadline: give_up,
            own_done: true,
        };
        self.maybe_advance(now);
        Ok(gs)
    }

    /// Fires the resume deadlines: repeats POLL to the silent, fails a stage past its
    /// deadline.
    pub(super) fn resume_timeout(&mut self, now: Instant) {
        let Phase::Resume {
            gs,
            attempt,
            stage,
            deadline,
            own_done,
            ..
        } = self.phase
        else {
            return;
        };
        if now >= deadline {
            let who = self.late(own_done);
            let (phase, limit) = match stage {
                ResumeStage::Poll { .. } => (
                    "poll",
                    self.config.timeouts.poll_give_up.unwrap_or(Duration::MAX),
                ),
                ResumeStage::Restore => ("restore", self.config.timeouts.resume_phase),
                ResumeStage::Start => ("start", self.config.timeouts.resume_phase),
            };
            self.fail_resume(
                who,
                FailureReason::Timeout {
                    phase: phase.into(),
                    deadline: limit,
                },
            );
        } else if let ResumeStage::Poll { rounds, next_poll } = stage {
            if now >= next_poll {
                for p in self.silent() {
                    self.send(p, Message::Poll { gs, attempt });
                }
                if let Phase::Resume { ref mut stage, .. } = self.phase {
                    *stage = ResumeStage::Poll {
                        rounds: rounds + 1,
                        next_poll: now + self.config.timeouts.poll_interval,
                    };
                }
            }
        }
    }

    /// Moves the resume to its next stage once everybody answered.
    pub(super) fn advance_resume(&mut self, now: Instant) {
        let Phase::Resume {
            gs,
            attempt,
            stage,
            started,
            ..
        } = self.phase
        else {
            return;
        };
        let deadline = now + self.config.timeouts.resume_phase;
        let (next_stage, message, action, purpose) = match stage {
            ResumeStage::Poll { rounds, .. } => {
                self.out
                    .push_back(Output::Event(ProtocolEvent::PollCompleted { gs, rounds }));
                (
                    ResumeStage::Restore,
                    Message::Restore { gs, attempt },
                    HostAction::RestoreLocal {
                        gs,
                        vms: self.config.vms.clone(),
                    },
                    Purpose::Restore(attempt),
                )
            }
            ResumeStage::Restore => (
                ResumeStage::Start,
                Message::Start { gs, attempt },
                HostAction::StartVms {
                    vms: self.config.vms.clone(),
                },
                Purpose::StartVms(attempt),
            ),
            ResumeStage::Start => {
                self.phase = Phase::Idle;
                self.out
                    .push_back(Output::Event(ProtocolEvent::ResumeCompleted { gs }));
                return;
            }
        };
        self.begin_phase();
        self.broadcast(message);
        self.phase = Phase::Resume {
            gs,
            attempt,
            stage: next_stage,
            started,
            deadline,
            own_done: false,
        };
        self.host
            .issue_or_queue(&mut self.out, purpose, action, deadline);
    }

    /// The own restore or start of resume attempt `attempt` completed.
    pub(super) fn own_resume_step_done(
        &mut self,
        now: Instant,
        attempt: ResumeAttempt,
        outcome: ActionOutcome,
    ) {
        let Phase::Resume {
            attempt: cur,
            ref mut own_done,
            ..
        } = self.phase
        else {
            return;
        };
        if cur != attempt {
            return;
        }
        match outcome {
            ActionOutcome::Failed(detail) => self.fail_resume(
                vec![ParticipantId::COORDINATOR],
                FailureReason::ActionFailed { detail },
            ),
            _ => {
                *own_done = true;
                self.maybe_advance(now);
            }
        }
    }

    pub(super) fn is_resume_stage(
        &self,
        gs: GlobalSnapshotId,
        attempt: ResumeAttempt,
        stage_ok: impl Fn(ResumeStage) -> bool,
    ) -> bool {
        matches!(self.phase, Phase::Resume { gs: g, attempt: a, stage, .. }
            if g == gs && a == attempt && stage_ok(stage))
    }

    pub(super) fn fail_resume(&mut self, who: Vec<ParticipantId>, why: FailureReason) {
        let Phase::Resume { gs, .. } = self.phase else {
            return;
        };
        self.phase = Phase::Idle;
        // Forget the own restore or start (outstanding or queued), not rule maintenance.
        if let Some(Purpose::Restore(_) | Purpose::StartVms(_)) = self.host.queued() {
            self.host.drop_queued();
        }
        if let Some(Purpose::Restore(_) | Purpose::StartVms(_)) =
            self.host.outstanding().map(|o| o.purpose)
        {
            self.host.abandon();
        }
        self.out
            .push_back(Output::Event(ProtocolEvent::ResumeFailed { gs, who, why }));
    }
}

/// An instant that is never reached in practice (for "no deadline").
fn far_future(now: Instant) -> Instant {
    // 100 years; checked_add cannot fail on any supported platform for this span.
    now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600))
        .unwrap_or(now)
}

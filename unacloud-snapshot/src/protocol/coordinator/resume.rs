//! The coordinator's side of the resume protocol: POLL (repeated until everybody
//! answered), RESTORE, START.

use std::time::{Duration, Instant};

use super::{Coordinator, Phase, Purpose, ResumeStage};
use crate::protocol::error::{Error, Result};
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
        let Phase::Resume { gs, attempt, .. } = self.phase else {
            return;
        };
        self.phase = Phase::Idle;
        // Participants learn that this attempt is over: a START of it will not come.
        self.broadcast(Message::ResumeAbort {
            gs,
            attempt,
            reason: why.to_string(),
        });
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

/// The reason of a refused TRIGGER_RESUME, for the operator: says that it was a resume
/// that was refused, and for a global snapshot that cannot be restored, which ones can.
pub(super) fn resume_refusal(e: &Error) -> String {
    match e {
        Error::SnapshotNotRestorable { gs, completed } if completed.is_empty() => format!(
            "cannot resume from {gs}: it is not a completed global snapshot, and no global \
             snapshot has completed yet"
        ),
        Error::SnapshotNotRestorable { gs, completed } => {
            let ids: Vec<String> = completed.iter().map(ToString::to_string).collect();
            format!(
                "cannot resume from {gs}: it is not a completed global snapshot; completed \
                 (restorable) ones: {}",
                ids.join(", ")
            )
        }
        other => format!("cannot resume: {other}"),
    }
}

/// An instant that is never reached in practice (for "no deadline").
fn far_future(now: Instant) -> Instant {
    // 100 years; checked_add cannot fail on any supported platform for this span.
    now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600))
        .unwrap_or(now)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::catalog::{Catalog, CompletedSnapshot};
    use crate::protocol::config::CoordinatorConfig;
    use crate::protocol::ids::ClusterId;
    use crate::protocol::message::Envelope;

    const C: ClusterId = ClusterId(5);

    /// A host action issued and not completed yet.
    type Pending = (crate::protocol::ids::ActionId, HostAction);

    fn coordinator(completed: &[u64]) -> Coordinator {
        let mut cat = Catalog::new(C);
        for &g in completed {
            let gs = GlobalSnapshotId(g);
            cat.completed.insert(
                gs,
                CompletedSnapshot {
                    gs,
                    participants: vec![ParticipantId(0), ParticipantId(1)],
                    local_times: Vec::new(),
                    global_time: Duration::ZERO,
                },
            );
            cat.last_started = Some(gs);
        }
        let cfg = CoordinatorConfig::new(C, vec![ParticipantId(1)], vec!["vm0".into()]);
        let mut c = Coordinator::new(cfg, cat).unwrap();
        while c.poll_output().is_some() {}
        c
    }

    fn trigger(from: ParticipantId, gs: Option<u64>) -> Envelope {
        Envelope::new(
            C,
            from,
            ParticipantId::COORDINATOR,
            Message::TriggerResume {
                gs: gs.map(GlobalSnapshotId),
            },
        )
    }

    fn outputs(c: &mut Coordinator) -> Vec<Output> {
        std::iter::from_fn(|| c.poll_output()).collect()
    }

    fn refusal(c: &mut Coordinator) -> String {
        let out = outputs(c);
        match out.as_slice() {
            [Output::Event(ProtocolEvent::TriggerRefused { reason })] => reason.clone(),
            other => panic!("expected only a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_forwarded_trigger_starts_the_resume_from_the_latest_or_the_given_gs() {
        for (asked, restored) in [(None, 2), (Some(1), 1)] {
            let mut c = coordinator(&[1, 2]);
            c.handle_message(
                Instant::now(),
                trigger(ParticipantId::METADATA_SERVER, asked),
            )
            .unwrap();
            let out = outputs(&mut c);
            let gs = GlobalSnapshotId(restored);
            assert!(out.iter().any(|o| matches!(
                o,
                Output::Event(ProtocolEvent::ResumeStarted { gs: g, .. }) if *g == gs
            )));
            assert!(out.iter().any(|o| matches!(
                o,
                Output::Transmit(e) if e.to == ParticipantId(1)
                    && matches!(e.message, Message::Poll { gs: g, .. } if g == gs)
            )));
            // A second trigger while the resume polls is refused as busy.
            c.handle_message(
                Instant::now(),
                trigger(ParticipantId::METADATA_SERVER, None),
            )
            .unwrap();
            let why = refusal(&mut c);
            assert!(
                why.starts_with("cannot resume: ") && why.contains("still running"),
                "{why}"
            );
        }
    }

    #[test]
    fn refusals_say_why_and_send_nothing() {
        let mut c = coordinator(&[]);
        c.handle_message(
            Instant::now(),
            trigger(ParticipantId::METADATA_SERVER, None),
        )
        .unwrap();
        assert_eq!(
            refusal(&mut c),
            "cannot resume: no completed global snapshot to resume from"
        );
        c.handle_message(
            Instant::now(),
            trigger(ParticipantId::METADATA_SERVER, Some(3)),
        )
        .unwrap();
        let why = refusal(&mut c);
        assert!(
            why.contains("gs-3") && why.contains("no global snapshot has completed"),
            "{why}"
        );
        let mut c = coordinator(&[1, 4]);
        c.handle_message(
            Instant::now(),
            trigger(ParticipantId::METADATA_SERVER, Some(3)),
        )
        .unwrap();
        assert_eq!(
            refusal(&mut c),
            "cannot resume from gs-3: it is not a completed global snapshot; completed \
             (restorable) ones: gs-1, gs-4"
        );
        assert!(c.running().is_none());
    }

    #[test]
    fn only_the_metadata_server_may_trigger() {
        let mut c = coordinator(&[1]);
        assert!(matches!(
            c.handle_message(Instant::now(), trigger(ParticipantId(1), None)),
            Err(Error::UnexpectedMessage {
                message: "TRIGGER_RESUME",
                ..
            })
        ));
        assert!(matches!(
            c.handle_message(Instant::now(), trigger(ParticipantId::UNREGISTERED, None)),
            Err(Error::UnknownParticipant { .. })
        ));
        assert!(c.running().is_none());
        assert!(outputs(&mut c).is_empty());
    }

    /// START goes out only once every RESTORE_OK and the own restore are in: a failed
    /// RESTORE at one participant fails the resume and nobody is told to start.
    #[test]
    fn a_failed_restore_sends_no_start() {
        let now = Instant::now();
        let cfg = CoordinatorConfig::new(
            C,
            vec![ParticipantId(1), ParticipantId(2)],
            vec!["vm0".into()],
        );
        let mut cat = Catalog::new(C);
        let gs = GlobalSnapshotId(1);
        cat.completed.insert(
            gs,
            CompletedSnapshot {
                gs,
                participants: vec![ParticipantId(0), ParticipantId(1), ParticipantId(2)],
                local_times: Vec::new(),
                global_time: Duration::ZERO,
            },
        );
        let mut c = Coordinator::new(cfg, cat).unwrap();
        let mut pending = Vec::new();
        let drain = |c: &mut Coordinator, pending: &mut Vec<Pending>| {
            let mut sent = Vec::new();
            for o in outputs(c) {
                match o {
                    Output::Transmit(e) => sent.push(e.message),
                    Output::Action { id, action } => pending.push((id, action)),
                    Output::Event(_) => {}
                }
            }
            sent
        };
        drain(&mut c, &mut pending);
        for (id, _) in pending.drain(..) {
            c.handle_action_complete(now, id, ActionOutcome::Done)
                .unwrap();
        }
        let attempt = ResumeAttempt(1);
        c.start_resume(now, None).unwrap();
        drain(&mut c, &mut pending);
        let from =
            |p: u32, m: Message| Envelope::new(C, ParticipantId(p), ParticipantId::COORDINATOR, m);
        for p in [1, 2] {
            c.handle_message(now, from(p, Message::PollOk { gs, attempt }))
                .unwrap();
        }
        let sent = drain(&mut c, &mut pending);
        assert!(sent.iter().all(|m| matches!(m, Message::Restore { .. })) && sent.len() == 2);
        // The own restore and participant 1 succeed, participant 2 fails.
        for (id, action) in pending.drain(..) {
            assert!(
                matches!(action, HostAction::RestoreLocal { .. }),
                "{action:?}"
            );
            c.handle_action_complete(now, id, ActionOutcome::Done)
                .unwrap();
        }
        c.handle_message(now, from(1, Message::RestoreOk { gs, attempt }))
            .unwrap();
        assert!(
            drain(&mut c, &mut pending).is_empty(),
            "START before every RESTORE_OK"
        );
        c.handle_message(
            now,
            from(
                2,
                Message::ResumeFailed {
                    gs,
                    attempt,
                    reason: "disk gone".into(),
                },
            ),
        )
        .unwrap();
        assert!(c.running().is_none());
        // Every participant learns that the attempt is over; nobody gets START.
        let sent = drain(&mut c, &mut pending);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert!(
            sent.iter()
                .all(|m| matches!(m, Message::ResumeAbort { attempt: a, .. } if *a == attempt)),
            "{sent:?}"
        );
        // A late RESTORE_OK of the failed attempt starts nothing either.
        c.handle_message(now, from(2, Message::RestoreOk { gs, attempt }))
            .unwrap();
        let sent = drain(&mut c, &mut pending);
        assert!(
            sent.is_empty() && pending.is_empty(),
            "{sent:?} {pending:?}"
        );
    }
}

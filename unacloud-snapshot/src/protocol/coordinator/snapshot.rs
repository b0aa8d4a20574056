//! The coordinator's side of a global snapshot: its own pre-check and six steps,
//! advancing the phases as answers arrive, and completing or failing the snapshot.

use std::time::{Duration, Instant};

use crate::protocol::catalog::CompletedSnapshot;
use crate::protocol::config::ClearColourPolicy;
use crate::protocol::host::{
    after_step, clears_before_done, step_action, step_name, AfterStep, LocalTimes,
};
use crate::protocol::ids::{GlobalSnapshotId, ParticipantId};
use crate::protocol::message::{LocalTime, Message};
use crate::protocol::output::{ActionOutcome, FailureReason, HostAction, Output, ProtocolEvent};

use super::{Coordinator, Phase, Purpose};

impl Coordinator {
    pub(super) fn own_check_done(
        &mut self,
        now: Instant,
        gs: GlobalSnapshotId,
        outcome: ActionOutcome,
    ) {
        let Phase::Precheck {
            gs: cur,
            ref mut own_ok,
            ..
        } = self.phase
        else {
            return;
        };
        if cur != gs {
            return;
        }
        match outcome {
            ActionOutcome::VmsRunning(true) => {
                *own_ok = true;
                self.maybe_advance(now);
            }
            ActionOutcome::VmsRunning(false) => self.fail_snapshot(
                now,
                vec![ParticipantId::COORDINATOR],
                FailureReason::VmsNotRunning {
                    detail: "not all VMs of the coordinator's host run".into(),
                },
            ),
            other => self.fail_snapshot(
                now,
                vec![ParticipantId::COORDINATOR],
                FailureReason::ActionFailed {
                    detail: outcome_detail(other, "check VMs running"),
                },
            ),
        }
    }

    pub(super) fn own_step_done(
        &mut self,
        now: Instant,
        gs: GlobalSnapshotId,
        step: u8,
        outcome: ActionOutcome,
    ) {
        let Phase::Snapshot {
            gs: cur,
            ref mut own_times,
            deadline,
            ..
        } = self.phase
        else {
            // The snapshot failed while this step ran: clean up now.
            self.issue_cleanup(now, gs);
            return;
        };
        if cur != gs {
            self.issue_cleanup(now, gs);
            return;
        }
        match outcome {
            ActionOutcome::Failed(detail) => {
                self.fail_snapshot(
                    now,
                    vec![ParticipantId::COORDINATOR],
                    FailureReason::ActionFailed {
                        detail: format!("{}: {detail}", step_name(step)),
                    },
                );
            }
            outcome => {
                own_times.record(step, &outcome);
                let (times, policy) = (*own_times, self.config.clear_colour);
                if clears_before_done(step, policy) {
                    // The thesis: step 6 is done; back to the idle drop rule (a wait for
                    // durability queues behind it).
                    self.arm_idle_drop();
                }
                match after_step(step, policy, times) {
                    AfterStep::Issue(next) => {
                        let action = step_action(next, gs, &self.config.vms);
                        // Every own step shares the phase deadline.
                        self.host.issue_or_queue(
                            &mut self.out,
                            Purpose::Step(gs, next),
                            action,
                            deadline,
                        );
                    }
                    AfterStep::Done => {
                        if let Phase::Snapshot { own_done, .. } = &mut self.phase {
                            *own_done = true;
                        }
                        self.maybe_advance(now);
                    }
                }
            }
        }
    }

    /// Moves to the next phase when everybody (and the own host) answered.
    pub(super) fn maybe_advance(&mut self, now: Instant) {
        if self.pending != 0 {
            return;
        }
        match self.phase {
            Phase::Precheck {
                gs, own_ok: true, ..
            } => {
                self.out
                    .push_back(Output::Event(ProtocolEvent::PrecheckPassed { gs }));
                self.begin_phase();
                self.broadcast(Message::TakeSnapshot { gs });
                let deadline = now + self.config.timeouts.snapshot;
                self.phase = Phase::Snapshot {
                    gs,
                    started: now,
                    deadline,
                    own_done: false,
                    own_times: LocalTimes::default(),
                };
                let action = step_action(0, gs, &self.config.vms);
                self.host
                    .issue(&mut self.out, Purpose::Step(gs, 0), action, deadline);
                self.maybe_advance(now);
            }
            Phase::Snapshot {
                gs,
                started,
                own_done: true,
                own_times,
                ..
            } => self.complete_snapshot(now, gs, started, own_times.point),
            Phase::Resume { own_done: true, .. } => self.advance_resume(now),
            _ => {}
        }
    }

    pub(super) fn complete_snapshot(
        &mut self,
        now: Instant,
        gs: GlobalSnapshotId,
        started: Instant,
        own_local_time: Duration,
    ) {
        let global_time = now.saturating_duration_since(started);
        let mut local_times = Vec::with_capacity(self.config.participants.len() + 1);
        local_times.push(LocalTime {
            participant: ParticipantId::COORDINATOR,
            local_time: own_local_time,
        });
        let mut participants = Vec::with_capacity(self.config.participants.len() + 1);
        participants.push(ParticipantId::COORDINATOR);
        for (&p, &t) in self.config.participants.iter().zip(&self.local_times) {
            participants.push(p);
            local_times.push(LocalTime {
                participant: p,
                local_time: t,
            });
        }
        self.catalog.completed.insert(
            gs,
            CompletedSnapshot {
                gs,
                participants,
                local_times: local_times.clone(),
                global_time,
            },
        );
        self.phase = Phase::Idle;
        // Every host has taken its local snapshot: all may stop colouring POST now.
        self.broadcast(Message::Release { gs });
        if self.config.clear_colour == ClearColourPolicy::OnRelease {
            let deadline = now + self.config.timeouts.snapshot;
            self.host.issue(
                &mut self.out,
                Purpose::Release(gs),
                HostAction::ClearColour,
                deadline,
            );
        }
        if self.config.report_to_metadata_server {
            self.send(
                ParticipantId::METADATA_SERVER,
                Message::SnapshotReport {
                    gs,
                    global_time,
                    local_times: local_times.clone(),
                },
            );
        }
        self.out
            .push_back(Output::Event(ProtocolEvent::GlobalSnapshotCompleted {
                gs,
                local_times,
                global_time,
            }));
    }

    pub(super) fn fail_snapshot(
        &mut self,
        now: Instant,
        who: Vec<ParticipantId>,
        why: FailureReason,
    ) {
        let (gs, may_have_rules) = match self.phase {
            Phase::Precheck { gs, .. } => (gs, false),
            // Rules are installed from step 1 until step 6: with the default policy, the
            // colour is held until completion; with the thesis's order, step 6 follows
            // the own snapshot.
            Phase::Snapshot { gs, own_done, .. } => (
                gs,
                !own_done || self.config.clear_colour == ClearColourPolicy::OnRelease,
            ),
            _ => return,
        };
        self.phase = Phase::Idle;
        self.broadcast(Message::Abort {
            gs,
            reason: why.to_string(),
        });
        self.out
            .push_back(Output::Event(ProtocolEvent::GlobalSnapshotFailed {
                gs,
                who,
                why,
            }));
        if let Some(Purpose::Check(_) | Purpose::Step(..)) = self.host.queued() {
            // The own VM check had not started yet, or (thesis order) the wait for
            // durability queued behind re-arming the idle drop rule: nothing to clean.
            self.host.drop_queued();
        }
        match self.host.outstanding().map(|o| (o.purpose, o.deadline)) {
            // The own VM check is harmless: forget it.
            Some((Purpose::Check(_), _)) => {
                self.host.abandon();
            }
            // A step runs: clean up when it completes, or when it passed its deadline.
            Some((Purpose::Step(..), Some(deadline))) if now >= deadline => {
                self.host.abandon();
                self.issue_cleanup(now, gs);
            }
            Some(_) => {}
            None if may_have_rules => self.issue_cleanup(now, gs),
            None => {}
        }
    }
}

fn outcome_detail(outcome: ActionOutcome, what: &str) -> String {
    match outcome {
        ActionOutcome::Failed(detail) => format!("{what}: {detail}"),
        other => format!("{what}: unexpected outcome {other:?}"),
    }
}

//! Bookkeeping of the one host action a state machine may have outstanding (and the one
//! action queued behind a short rule-maintenance action), and the thesis's six steps.
//! Shared by the coordinator (which runs the steps on its own host) and the participants.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::config::ClearColourPolicy;
use super::ids::{ActionId, Colour, GlobalSnapshotId};
use super::output::{ActionOutcome, HostAction, Output, ProtocolEvent};
use crate::protocol::error::{Error, Result};

/// How many times a failing ClearAll is tried before it is reported.
pub(crate) const CLEANUP_TRIES: u8 = 3;
/// Number of steps of phase 2 a host runs after TAKE_SNAPSHOT, before DONE: steps 1–5
/// with [`ClearColourPolicy::OnRelease`] (step 6 waits for RELEASE), all six with the
/// thesis's [`ClearColourPolicy::AfterOwnSnapshot`].
pub(crate) fn steps_before_done(policy: ClearColourPolicy) -> u8 {
    match policy {
        ClearColourPolicy::OnRelease => 5,
        ClearColourPolicy::AfterOwnSnapshot => 6,
    }
}
/// Index (0-based) of the step that takes the local snapshots.
pub(crate) const SNAPSHOT_STEP: u8 = 2;
/// Index of step 6 (stop colouring), run before DONE only by the thesis's order.
const CLEAR_STEP: u8 = 5;
/// Pseudo-step index of [`HostAction::AwaitDurable`]: issued after the last step before
/// DONE when step 3 answered only the snapshot point. Not one of the thesis's six steps.
pub(crate) const DURABLE_STEP: u8 = 6;

/// The action of phase-2 step `step` (0-based), in the thesis's exact order, or the wait
/// for durability ([`DURABLE_STEP`]).
pub(crate) fn step_action(step: u8, gs: GlobalSnapshotId, vms: &[String]) -> HostAction {
    match step {
        0 => HostAction::SetOutgoingColour(Colour::Pre),
        1 => HostAction::DropIncoming(Colour::Post),
        2 => HostAction::TakeLocalSnapshots {
            gs,
            vms: vms.to_vec(),
        },
        3 => HostAction::SetOutgoingColour(Colour::Post),
        4 => HostAction::AcceptIncoming(Colour::Post),
        CLEAR_STEP => HostAction::ClearColour,
        _ => HostAction::AwaitDurable {
            gs,
            vms: vms.to_vec(),
        },
    }
}

/// Human name of a step for failure reasons.
pub(crate) fn step_name(step: u8) -> &'static str {
    match step {
        0 => "step 1 (colour outgoing PRESNAPSHOT)",
        1 => "step 2 (drop incoming POSTSNAPSHOT)",
        2 => "step 3 (take local snapshots)",
        3 => "step 4 (colour outgoing POSTSNAPSHOT)",
        4 => "step 5 (accept incoming POSTSNAPSHOT)",
        CLEAR_STEP => "step 6 (stop colouring)",
        _ => "waiting for the local snapshots to be durable",
    }
}

/// The two moments of a host's local snapshot within phase 2, as its driver reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct LocalTimes {
    /// Time from the start of step 3 to the snapshot point (what DONE carries).
    pub point: Duration,
    /// Time from the start of step 3 until the snapshots were durable; `None` while
    /// durability is pending (after [`ActionOutcome::SnapshotPoint`]).
    pub durable: Option<Duration>,
}

impl LocalTimes {
    /// Records the successful outcome of phase-2 step `step`.
    pub fn record(&mut self, step: u8, outcome: &ActionOutcome) {
        match (step, outcome) {
            (SNAPSHOT_STEP, ActionOutcome::SnapshotPoint { local_time }) => {
                *self = LocalTimes {
                    point: *local_time,
                    durable: None,
                }
            }
            (SNAPSHOT_STEP, ActionOutcome::SnapshotTaken { local_time }) => {
                *self = LocalTimes {
                    point: *local_time,
                    durable: Some(*local_time),
                }
            }
            // Any other success of step 3 (e.g. a bare `Done`) claims durable snapshots.
            (SNAPSHOT_STEP, _) => {
                *self = LocalTimes {
                    point: Duration::ZERO,
                    durable: Some(Duration::ZERO),
                }
            }
            (DURABLE_STEP, ActionOutcome::SnapshotDurable { total_time }) => {
                self.durable = Some((*total_time).max(self.point));
            }
            (DURABLE_STEP, _) => self.durable = Some(self.point),
            _ => {}
        }
    }

    /// The durable time, or the point if durability was never reported.
    pub fn total(&self) -> Duration {
        self.durable.unwrap_or(self.point)
    }
}

/// What a host does after phase-2 step `step` succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterStep {
    /// Issue this step next.
    Issue(u8),
    /// Its part is done: DONE (or, at the coordinator, the own part of completion).
    Done,
}

/// The step that follows `step`: the next of the steps before DONE, then
/// [`DURABLE_STEP`] if durability is still pending, then DONE.
pub(crate) fn after_step(step: u8, policy: ClearColourPolicy, times: LocalTimes) -> AfterStep {
    if step == DURABLE_STEP {
        AfterStep::Done
    } else if step + 1 < steps_before_done(policy) {
        AfterStep::Issue(step + 1)
    } else if times.durable.is_none() {
        AfterStep::Issue(DURABLE_STEP)
    } else {
        AfterStep::Done
    }
}

/// Whether `step` is step 6 run before DONE (the thesis's order), after which the idle
/// drop rule is re-armed at once.
pub(crate) fn clears_before_done(step: u8, policy: ClearColourPolicy) -> bool {
    step == CLEAR_STEP && policy == ClearColourPolicy::AfterOwnSnapshot
}

/// The one outstanding action of a host, with what it was for. Actions without a deadline
/// (ClearAll, arming the idle drop rule) are waited for.
#[derive(Debug, Clone)]
pub(crate) struct Outstanding<P> {
    pub id: ActionId,
    pub purpose: P,
    pub deadline: Option<Instant>,
}

/// An action waiting for a short rule-maintenance action (step 6 on RELEASE, re-arming the
/// idle drop rule) to complete.
#[derive(Debug, Clone)]
pub(crate) struct Queued<P> {
    pub purpose: P,
    pub action: HostAction,
    pub deadline: Instant,
}

/// The purposes the rule maintenance shared by the coordinator and the participants issues
/// under: re-arming the idle drop rule and the numbered tries of a ClearAll.
pub(crate) trait RulePurpose {
    /// (Re-)arming the idle drop rule.
    const ARM: Self;
    /// Try `tries` (from 1) of ClearAll after global snapshot `gs`.
    fn cleanup(gs: GlobalSnapshotId, tries: u8) -> Self;
}

/// Allocates action ids and remembers the outstanding action.
#[derive(Debug)]
pub(crate) struct Host<P> {
    next_id: u64,
    outstanding: Option<Outstanding<P>>,
    queued: Option<Queued<P>>,
}

impl<P: Clone> Host<P> {
    pub fn new() -> Self {
        Self {
            next_id: 0,
            outstanding: None,
            queued: None,
        }
    }

    pub fn outstanding(&self) -> Option<&Outstanding<P>> {
        self.outstanding.as_ref()
    }

    pub fn is_busy(&self) -> bool {
        self.outstanding.is_some()
    }

    /// Issues `action`; the caller guarantees nothing is outstanding (or abandons it first).
    pub fn issue(
        &mut self,
        out: &mut VecDeque<Output>,
        purpose: P,
        action: HostAction,
        deadline: Instant,
    ) -> ActionId {
        self.issue_with(out, purpose, action, Some(deadline))
    }

    /// Issues an action that has no deadline (it is waited for).
    pub fn issue_untimed(
        &mut self,
        out: &mut VecDeque<Output>,
        purpose: P,
        action: HostAction,
    ) -> ActionId {
        self.issue_with(out, purpose, action, None)
    }

    fn issue_with(
        &mut self,
        out: &mut VecDeque<Output>,
        purpose: P,
        action: HostAction,
        deadline: Option<Instant>,
    ) -> ActionId {
        let id = ActionId(self.next_id);
        self.next_id += 1;
        self.outstanding = Some(Outstanding {
            id,
            purpose,
            deadline,
        });
        out.push_back(Output::Action { id, action });
        id
    }

    /// Issues `action` now if nothing is outstanding, otherwise queues it (replacing a
    /// queued one) until [`Host::issue_queued`] runs it.
    pub fn issue_or_queue(
        &mut self,
        out: &mut VecDeque<Output>,
        purpose: P,
        action: HostAction,
        deadline: Instant,
    ) {
        if self.outstanding.is_some() {
            self.queued = Some(Queued {
                purpose,
                action,
                deadline,
            });
        } else {
            self.issue(out, purpose, action, deadline);
        }
    }

    /// The queued action's purpose, if one waits.
    pub fn queued(&self) -> Option<P> {
        self.queued.as_ref().map(|q| q.purpose.clone())
    }

    /// Forgets the queued action.
    pub fn drop_queued(&mut self) -> Option<P> {
        self.queued.take().map(|q| q.purpose)
    }

    /// Issues the queued action if nothing is outstanding.
    pub fn issue_queued(&mut self, out: &mut VecDeque<Output>) {
        if self.outstanding.is_none() {
            if let Some(q) = self.queued.take() {
                self.issue(out, q.purpose, q.action, q.deadline);
            }
        }
    }

    /// Forgets the outstanding action; its late completion will be ignored.
    pub fn abandon(&mut self) -> Option<Outstanding<P>> {
        self.outstanding.take()
    }

    /// Matches a completion: `Ok(Some(purpose))` for the outstanding action, `Ok(None)` for
    /// an earlier (abandoned) one, an error for an id never issued.
    pub fn complete(&mut self, id: ActionId) -> Result<Option<P>> {
        match &self.outstanding {
            Some(o) if o.id == id => Ok(self.outstanding.take().map(|o| o.purpose)),
            _ if id.0 < self.next_id => Ok(None),
            _ => Err(Error::UnknownAction { id }),
        }
    }
}

impl<P: Clone + RulePurpose> Host<P> {
    /// Issues `DropIncoming(Post)`: the idle state drops POST datagrams.
    pub fn arm_idle_drop(&mut self, out: &mut VecDeque<Output>) {
        self.issue_untimed(out, P::ARM, HostAction::DropIncoming(Colour::Post));
    }

    /// Arming the idle drop rule completed with `outcome`: report a failure, then issue
    /// the action queued behind it.
    pub fn armed(&mut self, out: &mut VecDeque<Output>, outcome: ActionOutcome) {
        if let ActionOutcome::Failed(why) = outcome {
            out.push_back(Output::Event(ProtocolEvent::IdleDropFailed { why }));
        }
        self.issue_queued(out);
    }

    /// Issues the first try of ClearAll, which removes every rule of `gs`.
    pub fn issue_cleanup(
        &mut self,
        out: &mut VecDeque<Output>,
        gs: GlobalSnapshotId,
        deadline: Instant,
    ) {
        self.issue(out, P::cleanup(gs, 1), HostAction::ClearAll, deadline);
    }

    /// Try `tries` of ClearAll failed with `why`: retry (until `deadline`) up to
    /// [`CLEANUP_TRIES`] times in total, then report it — the host may still colour or
    /// drop traffic and needs an operator — and go on with the queued action.
    pub fn cleanup_failed(
        &mut self,
        out: &mut VecDeque<Output>,
        gs: GlobalSnapshotId,
        tries: u8,
        why: String,
        deadline: Instant,
    ) {
        if tries < CLEANUP_TRIES {
            self.issue(
                out,
                P::cleanup(gs, tries + 1),
                HostAction::ClearAll,
                deadline,
            );
        } else {
            out.push_back(Output::Event(ProtocolEvent::CleanupFailed { gs, why }));
            self.issue_queued(out);
        }
    }
}

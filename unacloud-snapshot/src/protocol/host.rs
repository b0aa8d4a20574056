//! Bookkeeping of the one host action a state machine may have outstanding, and the
//! thesis's six steps. Shared by the coordinator (which runs the steps on its own host) and
//! the participants.

use std::collections::VecDeque;
use std::time::Instant;

use super::ids::{ActionId, Colour, GlobalSnapshotId};
use super::output::{HostAction, Output};
use crate::error::{Error, Result};

/// How many times a failing ClearAll is tried before it is reported.
pub(crate) const CLEANUP_TRIES: u8 = 3;
/// Number of steps of phase 2.
pub(crate) const STEPS: u8 = 6;
/// Index (0-based) of the step that takes the local snapshots.
pub(crate) const SNAPSHOT_STEP: u8 = 2;

/// The action of phase-2 step `step` (0-based), in the thesis's exact order.
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
        _ => HostAction::ClearColour,
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
        _ => "step 6 (stop colouring)",
    }
}

/// The one outstanding action of a host, with what it was for.
#[derive(Debug, Clone)]
pub(crate) struct Outstanding<P> {
    pub id: ActionId,
    pub purpose: P,
    pub deadline: Instant,
}

/// Allocates action ids and remembers the outstanding action.
#[derive(Debug)]
pub(crate) struct Host<P> {
    next_id: u64,
    outstanding: Option<Outstanding<P>>,
}

impl<P: Clone> Host<P> {
    pub fn new() -> Self {
        Self {
            next_id: 0,
            outstanding: None,
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

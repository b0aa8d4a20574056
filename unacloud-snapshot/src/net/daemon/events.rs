//! What a launcher reports while it runs.

use super::*;

/// What a launcher reports while it runs (printed as JSON lines by the command line).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum LauncherEvent {
    /// A VM was registered.
    Registered {
        /// The VM.
        vm: String,
        /// Its participant id.
        id: u32,
        /// Its port.
        port: u16,
    },
    /// Coordinator: every participant is connected; triggers will be served.
    Ready {
        /// Number of participants besides the coordinator.
        participants: usize,
    },
    /// Coordinator: a global snapshot started.
    GsStarted {
        /// Its id.
        gs: u64,
    },
    /// Coordinator: a global snapshot completed.
    GsCompleted {
        /// Its id.
        gs: u64,
        /// Global time in microseconds.
        global_us: u64,
        /// Every participant's local time in microseconds, by id.
        local_us: Vec<u64>,
    },
    /// Coordinator: a global snapshot failed.
    GsFailed {
        /// Its id.
        gs: u64,
        /// The participants at fault.
        who: Vec<u32>,
        /// Why.
        why: String,
    },
    /// Coordinator: a trigger (global snapshot or resume) was refused.
    TriggerRefused {
        /// Why.
        reason: String,
    },
    /// Coordinator: a resume started (POLL sent to every participant).
    ResumeStarted {
        /// The global snapshot being restored.
        gs: u64,
        /// The resume attempt.
        attempt: u64,
    },
    /// Coordinator: every participant answered POLL; RESTORE was sent.
    PollCompleted {
        /// The global snapshot being restored.
        gs: u64,
        /// POLL rounds it took (1 = everybody answered the first).
        rounds: u32,
    },
    /// Coordinator: every host restored and started its VMs.
    ResumeCompleted {
        /// The restored global snapshot.
        gs: u64,
    },
    /// Coordinator: the resume failed. START is sent only after every RESTORE_OK, so
    /// hosts that restored stay stopped (restored, not started); trigger the resume again.
    ResumeFailed {
        /// The global snapshot that was being restored.
        gs: u64,
        /// The participants at fault (0 = the coordinator's own host).
        who: Vec<u32>,
        /// Why.
        why: String,
    },
    /// Participant: its VMs were restored to a global snapshot and started.
    Resumed {
        /// The participant.
        id: u32,
        /// The restored global snapshot.
        gs: u64,
    },
    /// Participant: a local snapshot was abandoned (abort or deadline); rules removed.
    Abandoned {
        /// The participant.
        id: u32,
        /// The global snapshot.
        gs: u64,
        /// Why.
        why: String,
    },
    /// A peer connected (coordinator: a participant or the metadata server; participant:
    /// its coordinator).
    Connected {
        /// The participant reporting it.
        id: u32,
        /// The peer.
        peer: u32,
    },
    /// A connection closed; `reason` is set when it was an error.
    Disconnected {
        /// The participant reporting it.
        id: u32,
        /// The peer, when known.
        peer: Option<u32>,
        /// Why, for errors.
        reason: Option<String>,
    },
    /// A node refused an input (a message it cannot accept, a failed action report).
    Error {
        /// The participant reporting it.
        id: u32,
        /// What happened.
        message: String,
    },
    /// Participant: neither RELEASE nor ABORT of `gs` arrived before its deadline (the
    /// coordinator vanished); it stopped colouring by itself. Whether `gs` completed only
    /// the coordinator's catalog knows.
    ReleaseMissed {
        /// The participant.
        id: u32,
        /// The global snapshot whose colour was held.
        gs: u64,
    },
    /// Removing the rules failed three times; the host may still colour or drop traffic.
    /// Needs an operator.
    CleanupFailed {
        /// The participant.
        id: u32,
        /// The global snapshot whose rules could not be removed.
        gs: u64,
        /// The last failure.
        why: String,
    },
    /// Arming the idle drop rule failed; the next global snapshot tries again.
    IdleDropFailed {
        /// The participant.
        id: u32,
        /// Why.
        why: String,
    },
    /// The launcher was asked to stop (SIGINT/SIGTERM) before it was running, in `phase`
    /// (`building hosts`, `registering`, `waiting for the cluster to register`, `waiting
    /// for the coordinator's address`); every rule it installed is removed and a
    /// [`LauncherEvent::Summary`] per VM follows.
    Interrupted {
        /// What it was doing.
        phase: String,
    },
    /// A VM's host stopped; its rules were removed.
    Summary {
        /// The VM.
        vm: String,
        /// Its participant id (`null` when it stopped before it registered).
        id: Option<u32>,
        /// What the host reports.
        #[serde(flatten)]
        summary: HostSummary,
    },
}

/// The launcher event of node event `ev` of participant `id`, if it has one.
pub(super) fn translate(id: ParticipantId, ev: &NodeEvent) -> Option<LauncherEvent> {
    match ev {
        NodeEvent::Protocol(ProtocolEvent::GlobalSnapshotStarted { gs }) => {
            Some(LauncherEvent::GsStarted { gs: gs.0 })
        }
        NodeEvent::Protocol(ProtocolEvent::GlobalSnapshotCompleted {
            gs,
            local_times,
            global_time,
        }) => Some(LauncherEvent::GsCompleted {
            gs: gs.0,
            global_us: global_time.as_micros() as u64,
            local_us: local_times
                .iter()
                .map(|l| l.local_time.as_micros() as u64)
                .collect(),
        }),
        NodeEvent::Protocol(ProtocolEvent::GlobalSnapshotFailed { gs, who, why }) => {
            Some(LauncherEvent::GsFailed {
                gs: gs.0,
                who: who.iter().map(|p| p.0).collect(),
                why: why.to_string(),
            })
        }
        NodeEvent::Protocol(ProtocolEvent::TriggerRefused { reason }) => {
            Some(LauncherEvent::TriggerRefused {
                reason: reason.clone(),
            })
        }
        NodeEvent::Protocol(ProtocolEvent::ResumeStarted { gs, attempt }) => {
            Some(LauncherEvent::ResumeStarted {
                gs: gs.0,
                attempt: attempt.0,
            })
        }
        NodeEvent::Protocol(ProtocolEvent::PollCompleted { gs, rounds }) => {
            Some(LauncherEvent::PollCompleted {
                gs: gs.0,
                rounds: *rounds,
            })
        }
        NodeEvent::Protocol(ProtocolEvent::ResumeCompleted { gs }) => {
            Some(LauncherEvent::ResumeCompleted { gs: gs.0 })
        }
        NodeEvent::Protocol(ProtocolEvent::ResumeFailed { gs, who, why }) => {
            Some(LauncherEvent::ResumeFailed {
                gs: gs.0,
                who: who.iter().map(|p| p.0).collect(),
                why: why.to_string(),
            })
        }
        NodeEvent::Protocol(ProtocolEvent::Resumed { gs }) => {
            Some(LauncherEvent::Resumed { id: id.0, gs: gs.0 })
        }
        NodeEvent::Protocol(ProtocolEvent::LocalSnapshotAbandoned { gs, why }) => {
            Some(LauncherEvent::Abandoned {
                id: id.0,
                gs: gs.0,
                why: why.clone(),
            })
        }
        NodeEvent::Protocol(ProtocolEvent::ReleaseMissed { gs }) => {
            Some(LauncherEvent::ReleaseMissed { id: id.0, gs: gs.0 })
        }
        NodeEvent::Protocol(ProtocolEvent::CleanupFailed { gs, why }) => {
            Some(LauncherEvent::CleanupFailed {
                id: id.0,
                gs: gs.0,
                why: why.clone(),
            })
        }
        NodeEvent::Protocol(ProtocolEvent::IdleDropFailed { why }) => {
            Some(LauncherEvent::IdleDropFailed {
                id: id.0,
                why: why.clone(),
            })
        }
        NodeEvent::Connected(peer) => Some(LauncherEvent::Connected {
            id: id.0,
            peer: peer.0,
        }),
        NodeEvent::Disconnected { peer, reason } => Some(LauncherEvent::Disconnected {
            id: id.0,
            peer: peer.map(|p| p.0),
            reason: reason.clone(),
        }),
        NodeEvent::Error(message) => Some(LauncherEvent::Error {
            id: id.0,
            message: message.clone(),
        }),
        _ => None,
    }
}

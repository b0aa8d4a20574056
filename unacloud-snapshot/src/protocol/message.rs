//! Protocol messages and the envelope that carries them.
//!
//! Every message of the global-snapshot and resume protocols names the global snapshot it
//! belongs to (`gs`, the epoch); resume messages also carry the resume attempt. The JSON
//! encoding is described field by field in `PROTOCOL.md`.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::ids::{ClusterId, GlobalSnapshotId, ParticipantId, ResumeAttempt};
use crate::protocol::error::{Error, Result};

/// Serialises a [`Duration`] as whole microseconds (`u64`), the unit of every time field on
/// the wire.
pub(crate) mod micros {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

/// One frame's content: who sends what to whom, in which cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The cluster both ends belong to; other clusters' envelopes are rejected.
    pub cluster: ClusterId,
    /// Sender.
    pub from: ParticipantId,
    /// Recipient.
    pub to: ParticipantId,
    /// The message.
    pub message: Message,
}

impl Envelope {
    /// An envelope for `message` from `from` to `to` in `cluster`.
    pub fn new(
        cluster: ClusterId,
        from: ParticipantId,
        to: ParticipantId,
        message: Message,
    ) -> Self {
        Self {
            cluster,
            from,
            to,
            message,
        }
    }

    /// Checks that the envelope belongs to `cluster` and is addressed to `me`: fails with
    /// [`Error::ForeignCluster`] or [`Error::Misaddressed`] otherwise.
    pub(crate) fn check_addressed_to(&self, cluster: ClusterId, me: ParticipantId) -> Result<()> {
        if self.cluster != cluster {
            return Err(Error::ForeignCluster {
                expected: cluster,
                got: self.cluster,
            });
        }
        if self.to != me {
            return Err(Error::Misaddressed { to: self.to, me });
        }
        Ok(())
    }
}

/// A participant's registration at the metadata server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Assigned id (0 = coordinator).
    pub id: ParticipantId,
    /// The address the participant registered with (typically its IP address).
    pub addr: String,
    /// The port assigned to it: base port + id.
    pub port: u16,
    /// The VMs of its host.
    pub vms: Vec<String>,
}

/// A participant's local snapshot time within a global snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalTime {
    /// The participant.
    pub participant: ParticipantId,
    /// How long its local snapshot(s) took.
    #[serde(with = "micros", rename = "local_time_us")]
    pub local_time: Duration,
}

/// Every message of the protocol. On the wire a message is a JSON object whose `type`
/// field is the snake-case variant name (`"take_snapshot"`, `"done"`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Message {
    // ----- phase 1: pre-check ------------------------------------------------------
    /// Coordinator → participant: are all your VMs running? (`PRECHECK`)
    Precheck {
        /// The global snapshot being prepared.
        gs: GlobalSnapshotId,
    },
    /// Participant → coordinator: all my VMs run. (`PRECHECK_OK`)
    PrecheckOk {
        /// The global snapshot being prepared.
        gs: GlobalSnapshotId,
    },
    /// Participant → coordinator: not all my VMs run, or the check failed.
    PrecheckFailed {
        /// The global snapshot being prepared.
        gs: GlobalSnapshotId,
        /// Why (for the operator).
        reason: String,
    },

    // ----- phase 2: the six steps ------------------------------------------------------
    /// Coordinator → participant: run the six steps now. (`TAKE_SNAPSHOT`)
    TakeSnapshot {
        /// The global snapshot to take.
        gs: GlobalSnapshotId,
    },
    /// Participant → coordinator: my local snapshot is taken and durable, and I colour
    /// POST (steps 1–5 done, and — after a live snapshot's point — its state is on disk;
    /// step 6 waits for RELEASE). (`DONE`)
    Done {
        /// The global snapshot.
        gs: GlobalSnapshotId,
        /// How long the local snapshot(s) of my VMs took (step 3): up to the snapshot
        /// point, which for a driver answering `SnapshotTaken` is also durability.
        #[serde(with = "micros", rename = "local_time_us")]
        local_time: Duration,
    },
    /// Participant → coordinator: a step failed; I cleaned my host up.
    SnapshotFailed {
        /// The global snapshot.
        gs: GlobalSnapshotId,
        /// Why (for the operator).
        reason: String,
    },
    /// Coordinator → participant: the global snapshot is complete (every host has taken
    /// its local snapshot); stop colouring outgoing datagrams POST (step 6). Sent once to
    /// every participant at completion. (`RELEASE`; not in the thesis, see `PROTOCOL.md`)
    Release {
        /// The completed global snapshot.
        gs: GlobalSnapshotId,
    },
    /// Coordinator → participant: this global snapshot failed; stop and remove every
    /// colour and filter rule. (`ABORT`)
    Abort {
        /// The failed global snapshot.
        gs: GlobalSnapshotId,
        /// Why (for the operator).
        reason: String,
    },

    // ----- resume ----------------------------------------------------------------------
    /// Coordinator → participant: are you there? (`POLL`, repeated until answered)
    Poll {
        /// The global snapshot that will be restored.
        gs: GlobalSnapshotId,
        /// The resume attempt.
        attempt: ResumeAttempt,
    },
    /// Participant → coordinator: here. (`POLL_OK`)
    PollOk {
        /// Echoed from POLL.
        gs: GlobalSnapshotId,
        /// Echoed from POLL.
        attempt: ResumeAttempt,
    },
    /// Coordinator → participant: restore your VMs to this global snapshot. (`RESTORE`)
    Restore {
        /// The global snapshot to restore.
        gs: GlobalSnapshotId,
        /// The resume attempt.
        attempt: ResumeAttempt,
    },
    /// Participant → coordinator: restored. (`RESTORE_OK`)
    RestoreOk {
        /// Echoed from RESTORE.
        gs: GlobalSnapshotId,
        /// Echoed from RESTORE.
        attempt: ResumeAttempt,
    },
    /// Coordinator → participant: start your restored VMs. (`START`)
    Start {
        /// The restored global snapshot.
        gs: GlobalSnapshotId,
        /// The resume attempt.
        attempt: ResumeAttempt,
    },
    /// Participant → coordinator: started. (`START_OK`)
    StartOk {
        /// Echoed from START.
        gs: GlobalSnapshotId,
        /// Echoed from START.
        attempt: ResumeAttempt,
    },
    /// Coordinator → participant: resume attempt `attempt` failed; forget it (a START of
    /// it will not come, and one that arrives late is refused). Hosts that restored stay
    /// restored and stopped. (`RESUME_ABORT`, not in the thesis)
    ResumeAbort {
        /// The global snapshot that was being restored.
        gs: GlobalSnapshotId,
        /// The failed resume attempt.
        attempt: ResumeAttempt,
        /// Why (for the operator).
        reason: String,
    },
    /// Participant → coordinator: this request belongs to an epoch older than one I have
    /// already seen (a coordinator that lost its catalog, or a late duplicate). The
    /// coordinator fails the attempt it belongs to, if it is running, and continues its
    /// counters after `newest_gs` / `newest_attempt`. (`STALE`, not in the thesis)
    Stale {
        /// The `gs` of the stale request.
        gs: GlobalSnapshotId,
        /// The `attempt` of the stale request, for resume messages.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<ResumeAttempt>,
        /// The newest global snapshot id the participant has seen.
        newest_gs: GlobalSnapshotId,
        /// The newest resume attempt the participant has seen (0 = none).
        newest_attempt: ResumeAttempt,
    },
    /// Participant → coordinator: restoring or starting failed.
    ResumeFailed {
        /// The global snapshot.
        gs: GlobalSnapshotId,
        /// The resume attempt.
        attempt: ResumeAttempt,
        /// Why (for the operator).
        reason: String,
    },

    // ----- metadata server -------------------------------------------------------------
    /// Launcher → metadata server: register a host. (`INSERT <addr>`)
    Insert {
        /// The host's address (typically its IP address).
        addr: String,
        /// The VMs it runs.
        vms: Vec<String>,
    },
    /// Metadata server → launcher: your id and port.
    Inserted {
        /// Assigned id, from 0 in registration order; 0 coordinates.
        id: ParticipantId,
        /// Assigned port: base port + id.
        port: u16,
    },
    /// External source → metadata server, and metadata server → coordinator: take a
    /// global snapshot now. (`StartGS`)
    TriggerGlobalSnapshot,
    /// External source → metadata server, and metadata server → coordinator: resume the
    /// application from global snapshot `gs` now — POLL (repeated until every participant
    /// answered), RESTORE, START. Forwarded and answered like TRIGGER_GLOBAL_SNAPSHOT; a
    /// coordinator that cannot resume (busy, nothing restorable, `gs` not restorable)
    /// refuses it as it refuses a snapshot trigger.
    TriggerResume {
        /// The global snapshot to restore; absent (or `null`) = the latest completed one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gs: Option<GlobalSnapshotId>,
    },
    /// Metadata server → external source: the trigger was forwarded to the coordinator.
    TriggerForwarded,
    /// Anyone → metadata server: the address of participant `id`.
    QueryAddress {
        /// The participant asked about.
        id: ParticipantId,
    },
    /// Metadata server → asker: the registration asked for.
    Address {
        /// The registration.
        registration: Registration,
    },
    /// Anyone → metadata server: the registrations, one page at a time, ordered by id.
    QueryList {
        /// Only registrations with an id greater than this one (absent = from the first):
        /// the last id of the previous page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<ParticipantId>,
    },
    /// Metadata server → asker: one page of registrations, by id.
    List {
        /// The registrations, ordered by id.
        participants: Vec<Registration>,
        /// More registrations follow: ask again with `after` = the last id of this page.
        #[serde(default)]
        more: bool,
    },
    /// Anyone → metadata server: the number of registrations.
    QueryCount,
    /// Metadata server → asker: the number of registrations.
    Count {
        /// Number of registered participants.
        count: u32,
    },
    /// Coordinator → metadata server: the times of a completed global snapshot.
    SnapshotReport {
        /// The completed global snapshot.
        gs: GlobalSnapshotId,
        /// Time from TAKE_SNAPSHOT to completion at the coordinator.
        #[serde(with = "micros", rename = "global_time_us")]
        global_time: Duration,
        /// Every participant's local snapshot time, the coordinator's included.
        local_times: Vec<LocalTime>,
    },
    /// Metadata server → asker: the request was refused.
    Refused {
        /// Why.
        reason: String,
    },
}

impl Message {
    /// The message's name as used in `PROTOCOL.md` and in error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Precheck { .. } => "PRECHECK",
            Message::PrecheckOk { .. } => "PRECHECK_OK",
            Message::PrecheckFailed { .. } => "PRECHECK_FAILED",
            Message::TakeSnapshot { .. } => "TAKE_SNAPSHOT",
            Message::Done { .. } => "DONE",
            Message::SnapshotFailed { .. } => "SNAPSHOT_FAILED",
            Message::Release { .. } => "RELEASE",
            Message::Abort { .. } => "ABORT",
            Message::Poll { .. } => "POLL",
            Message::PollOk { .. } => "POLL_OK",
            Message::Restore { .. } => "RESTORE",
            Message::RestoreOk { .. } => "RESTORE_OK",
            Message::Start { .. } => "START",
            Message::StartOk { .. } => "START_OK",
            Message::ResumeFailed { .. } => "RESUME_FAILED",
            Message::ResumeAbort { .. } => "RESUME_ABORT",
            Message::Stale { .. } => "STALE",
            Message::Insert { .. } => "INSERT",
            Message::Inserted { .. } => "INSERTED",
            Message::TriggerGlobalSnapshot => "TRIGGER_GLOBAL_SNAPSHOT",
            Message::TriggerResume { .. } => "TRIGGER_RESUME",
            Message::TriggerForwarded => "TRIGGER_FORWARDED",
            Message::QueryAddress { .. } => "QUERY_ADDRESS",
            Message::Address { .. } => "ADDRESS",
            Message::QueryList { .. } => "QUERY_LIST",
            Message::List { .. } => "LIST",
            Message::QueryCount => "QUERY_COUNT",
            Message::Count { .. } => "COUNT",
            Message::SnapshotReport { .. } => "SNAPSHOT_REPORT",
            Message::Refused { .. } => "REFUSED",
        }
    }

    /// Whether the message is an operator's trigger that the metadata server forwards to
    /// the coordinator (TRIGGER_GLOBAL_SNAPSHOT, TRIGGER_RESUME).
    pub fn is_trigger(&self) -> bool {
        matches!(
            self,
            Message::TriggerGlobalSnapshot | Message::TriggerResume { .. }
        )
    }

    /// The global snapshot the message belongs to, if it is a snapshot or resume message
    /// (not for TRIGGER_RESUME: its `gs` is a request, not an epoch).
    pub fn gs(&self) -> Option<GlobalSnapshotId> {
        match self {
            Message::Precheck { gs }
            | Message::PrecheckOk { gs }
            | Message::PrecheckFailed { gs, .. }
            | Message::TakeSnapshot { gs }
            | Message::Done { gs, .. }
            | Message::SnapshotFailed { gs, .. }
            | Message::Release { gs }
            | Message::Abort { gs, .. }
            | Message::Poll { gs, .. }
            | Message::PollOk { gs, .. }
            | Message::Restore { gs, .. }
            | Message::RestoreOk { gs, .. }
            | Message::Start { gs, .. }
            | Message::StartOk { gs, .. }
            | Message::ResumeFailed { gs, .. }
            | Message::ResumeAbort { gs, .. }
            | Message::Stale { gs, .. }
            | Message::SnapshotReport { gs, .. } => Some(*gs),
            _ => None,
        }
    }
}

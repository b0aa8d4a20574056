//! Configuration of the coordinator and the participants.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::ids::{ClusterId, DscpConfig, ParticipantId};

/// Deadlines of the protocol. The defaults suit a LAN of lab PCs whose local snapshots take
/// seconds to tens of seconds (the thesis measured 2–31 s): generous, because a spurious
/// abort costs a whole global snapshot while a late one only delays the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// Phase 1: how long the coordinator waits for every PRECHECK_OK (and a participant
    /// for its own VM check). Default 10 s.
    pub precheck: Duration,
    /// Phase 2: how long the coordinator waits, from sending TAKE_SNAPSHOT, for every DONE
    /// and its own six steps; and how long a participant, from receiving TAKE_SNAPSHOT,
    /// lets its six steps run before it removes every rule by itself (ClearAll) and reports
    /// SNAPSHOT_FAILED. Default 120 s.
    pub snapshot: Duration,
    /// Resume: interval between POLL rounds to participants that have not answered.
    /// Default 1 s.
    pub poll_interval: Duration,
    /// Resume: give up polling after this long (`None`, the default, polls until every
    /// participant answers, as the thesis does).
    pub poll_give_up: Option<Duration>,
    /// Resume: how long the RESTORE phase and the START phase may each take. Default 300 s.
    pub resume_phase: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            precheck: Duration::from_secs(10),
            snapshot: Duration::from_secs(120),
            poll_interval: Duration::from_secs(1),
            poll_give_up: None,
            resume_phase: Duration::from_secs(300),
        }
    }
}

/// Configuration of a [`super::Coordinator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// The cluster.
    pub cluster: ClusterId,
    /// Every other participant (ids ≥ 1, unique); the coordinator is id 0.
    pub participants: Vec<ParticipantId>,
    /// The VMs of the coordinator's own host.
    pub vms: Vec<String>,
    /// Deadlines.
    pub timeouts: Timeouts,
    /// DSCP values (informative for the state machine; drivers apply them).
    pub dscp: DscpConfig,
    /// Send a SNAPSHOT_REPORT to the metadata server after every completed global
    /// snapshot. Default `false`.
    pub report_to_metadata_server: bool,
}

impl CoordinatorConfig {
    /// A configuration with default timeouts and DSCP values, without reports.
    pub fn new(cluster: ClusterId, participants: Vec<ParticipantId>, vms: Vec<String>) -> Self {
        Self {
            cluster,
            participants,
            vms,
            timeouts: Timeouts::default(),
            dscp: DscpConfig::default(),
            report_to_metadata_server: false,
        }
    }
}

/// Configuration of a [`super::Participant`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantConfig {
    /// The cluster.
    pub cluster: ClusterId,
    /// This participant's id (≥ 1).
    pub id: ParticipantId,
    /// The VMs of this host.
    pub vms: Vec<String>,
    /// Deadlines.
    pub timeouts: Timeouts,
    /// DSCP values (informative for the state machine; drivers apply them).
    pub dscp: DscpConfig,
}

impl ParticipantConfig {
    /// A configuration with default timeouts and DSCP values.
    pub fn new(cluster: ClusterId, id: ParticipantId, vms: Vec<String>) -> Self {
        Self {
            cluster,
            id,
            vms,
            timeouts: Timeouts::default(),
            dscp: DscpConfig::default(),
        }
    }
}

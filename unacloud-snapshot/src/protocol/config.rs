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
    /// and its own steps 1–5; and how long a participant, from receiving TAKE_SNAPSHOT,
    /// lets its steps run and then waits for RELEASE (or ABORT) before it removes every
    /// rule by itself (ClearAll) — reporting SNAPSHOT_FAILED if its steps had not finished.
    /// Default 120 s.
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

/// When a host performs step 6 (stop colouring its outgoing datagrams POST).
///
/// The thesis clears the colour right after the host's own local snapshot (steps 1–6 back
/// to back). That is only consistent if every host reaches its snapshot point at the same
/// time: a host that finished early sends uncoloured datagrams that a slower host, which
/// has not taken its local snapshot yet, accepts — orphan messages (SPEC Eq. 5.3) and TCP
/// ACKs "from the future" that make messages unrecoverable after a restore (Eq. 5.2). The
/// deterministic simulator shows it (`sim_controls.rs`; `PROTOCOL.md` §6.4). The default
/// therefore keeps the POST colour until the coordinator knows that every host has taken
/// its local snapshot and says so with RELEASE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClearColourPolicy {
    /// Step 6 runs when RELEASE (or ABORT, as ClearAll) arrives from the coordinator, or
    /// at the host's own snapshot deadline if the coordinator vanished; the coordinator
    /// clears its own colour when the global snapshot completes. DONE is sent after step 5.
    /// Consistent for any local snapshot times (the default).
    #[default]
    OnRelease,
    /// The thesis's literal order: step 6 right after step 5, DONE after step 6, RELEASE
    /// ignored. **Inconsistent** when local snapshot times differ between hosts; kept only
    /// as a negative control for tests and for comparison with the thesis.
    AfterOwnSnapshot,
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
    /// When the coordinator's own host stops colouring POST (default: at completion).
    pub clear_colour: ClearColourPolicy,
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
            clear_colour: ClearColourPolicy::default(),
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
    /// When this host stops colouring POST (default: on RELEASE).
    pub clear_colour: ClearColourPolicy,
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
            clear_colour: ClearColourPolicy::default(),
        }
    }
}

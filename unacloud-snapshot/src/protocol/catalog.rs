//! The catalog of completed global snapshots, kept by the coordinator.
//!
//! Pure data: the coordinator updates it in memory; the driver persists it (see
//! [`crate::catalog_store::CatalogStore`], which writes atomically) whenever the coordinator
//! reports [`ProtocolEvent::GlobalSnapshotStarted`], [`ProtocolEvent::GlobalSnapshotCompleted`]
//! or [`ProtocolEvent::ResumeStarted`], and hands it back to [`Coordinator::new`] after a
//! restart. Besides the completed snapshots it records the highest epoch and resume attempt
//! ever used, so that a restarted coordinator never reuses an id.
//!
//! [`ProtocolEvent::GlobalSnapshotStarted`]: super::ProtocolEvent::GlobalSnapshotStarted
//! [`ProtocolEvent::GlobalSnapshotCompleted`]: super::ProtocolEvent::GlobalSnapshotCompleted
//! [`ProtocolEvent::ResumeStarted`]: super::ProtocolEvent::ResumeStarted
//! [`Coordinator::new`]: super::Coordinator::new

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

use super::ids::{ClusterId, GlobalSnapshotId, ParticipantId, ResumeAttempt};
use super::message::LocalTime;

/// A completed, restorable global snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedSnapshot {
    /// Its id.
    pub gs: GlobalSnapshotId,
    /// The participants whose local snapshots form it (the coordinator included).
    pub participants: Vec<ParticipantId>,
    /// Local snapshot times, the coordinator's first.
    pub local_times: Vec<LocalTime>,
    /// Time from TAKE_SNAPSHOT to completion.
    #[serde(with = "super::message::micros", rename = "global_time_us")]
    pub global_time: Duration,
}

/// The catalog: completed global snapshots by id, and the epoch counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// Format version of the catalog file.
    pub format: u32,
    /// The cluster the catalog belongs to.
    pub cluster: ClusterId,
    /// The highest global snapshot id ever started (completed or not).
    pub last_started: Option<GlobalSnapshotId>,
    /// The highest resume attempt ever started.
    pub last_resume_attempt: Option<ResumeAttempt>,
    /// Completed global snapshots, by id. Only these may be restored.
    pub completed: BTreeMap<GlobalSnapshotId, CompletedSnapshot>,
}

impl Catalog {
    /// The catalog file format this implementation writes.
    pub const FORMAT: u32 = 1;

    /// An empty catalog for `cluster`.
    pub fn new(cluster: ClusterId) -> Self {
        Self {
            format: Self::FORMAT,
            cluster,
            last_started: None,
            last_resume_attempt: None,
            completed: BTreeMap::new(),
        }
    }

    /// The latest completed global snapshot, the default for a resume.
    pub fn latest(&self) -> Option<&CompletedSnapshot> {
        self.completed.values().next_back()
    }

    /// A completed global snapshot by id.
    pub fn get(&self, gs: GlobalSnapshotId) -> Option<&CompletedSnapshot> {
        self.completed.get(&gs)
    }

    /// Whether `gs` completed (and may therefore be restored).
    pub fn is_restorable(&self, gs: GlobalSnapshotId) -> bool {
        self.completed.contains_key(&gs)
    }

    /// Ids of the completed global snapshots, oldest first.
    pub fn completed_ids(&self) -> Vec<GlobalSnapshotId> {
        self.completed.keys().copied().collect()
    }

    /// The id the next global snapshot attempt gets.
    pub fn next_gs(&self) -> GlobalSnapshotId {
        match self.last_started {
            Some(gs) => gs.next(),
            None => GlobalSnapshotId(1),
        }
    }

    /// The number the next resume attempt gets.
    pub fn next_resume_attempt(&self) -> ResumeAttempt {
        match self.last_resume_attempt {
            Some(ResumeAttempt(n)) => ResumeAttempt(n.saturating_add(1)),
            None => ResumeAttempt(1),
        }
    }

    /// Serialises the catalog as pretty JSON.
    pub fn try_to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec_pretty(self)
    }

    /// Serialises the catalog as pretty JSON. A catalog has only integer map keys and
    /// plain fields, so this cannot fail in practice; should it ever, the result is empty
    /// (which [`Catalog::from_json`] rejects). Writers of files use
    /// [`Catalog::try_to_json`].
    pub fn to_json(&self) -> Vec<u8> {
        self.try_to_json().unwrap_or_default()
    }

    /// Parses a catalog serialised by [`Catalog::to_json`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

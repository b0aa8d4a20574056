//! The catalog of completed global snapshots, triggers and timing results, in etcd.
//!
//! [`EtcdCatalog`] is the coordinator's catalog store when the control plane is etcd. It
//! is written at the moments `PROTOCOL.md` §10 names (a global snapshot or a resume
//! starts, a global snapshot completes, the epoch jumps), each time in one transaction
//! that
//!
//! * is conditioned on the writer's leadership ([`super::election::Leadership::guard`]):
//!   a coordinator that lost its role writes nothing ([`ControlError::Fenced`]);
//! * creates the key of a newly completed global snapshot only if it does not exist
//!   (`version = 0`), so an id is never recorded twice, whoever tries.
//!
//! The coordinator driver persists the start of a global snapshot *before* it sends the
//! first message carrying the new id, and stops when the write fails: an id that goes out
//! on the wire is always one this leader reserved.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{from_json, gs_key, to_json, ControlError, Etcd, Result};
use crate::net::host::local_snapshot_name;
use crate::protocol::{
    Catalog, CompletedSnapshot, GlobalSnapshotId, ParticipantId, ResumeAttempt, SnapshotTimes,
};

/// The epoch counters (`catalog/epochs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epochs {
    /// The highest global snapshot id ever started.
    pub last_started: Option<GlobalSnapshotId>,
    /// The highest resume attempt ever started.
    pub last_resume_attempt: Option<ResumeAttempt>,
}

/// A completed global snapshot as recorded in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedSnapshot {
    /// What the coordinator recorded (participants, local and global times).
    #[serde(flatten)]
    pub snapshot: CompletedSnapshot,
    /// Wall-clock time of the record (milliseconds since the Unix epoch).
    pub recorded_at_ms: u64,
    /// The local snapshot each participant took for it, by participant id.
    pub local_snapshots: BTreeMap<u32, String>,
    /// The election revision of the coordinator that recorded it.
    pub leader_revision: i64,
}

/// The coordinator's catalog, in etcd.
#[derive(Debug)]
pub struct EtcdCatalog {
    etcd: Etcd,
    guard: Compare,
    guard_key: Vec<u8>,
    revision: i64,
    recorded: Mutex<BTreeSet<GlobalSnapshotId>>,
}

impl EtcdCatalog {
    /// The store of the leader whose fencing condition is `guard` (see
    /// [`super::election::Leadership`]); `revision` is the election revision, recorded
    /// with every completed global snapshot. `loaded` is the catalog [`load`] returned.
    pub fn new(etcd: Etcd, leadership: &super::election::Leadership, loaded: &Catalog) -> Self {
        Self {
            etcd,
            guard: leadership.guard(),
            guard_key: leadership.key_bytes().to_vec(),
            revision: leadership.revision(),
            recorded: Mutex::new(loaded.completed.keys().copied().collect()),
        }
    }

    /// Writes what changed in `catalog`: the epoch counters, and the global snapshots
    /// completed since the last write (create-only). Refused, with nothing written, when
    /// this coordinator is no longer the leader ([`ControlError::Fenced`]) or when one of
    /// those ids is already recorded ([`ControlError::AlreadyExists`]).
    pub async fn save(&self, catalog: &Catalog) -> Result<()> {
        let fresh: Vec<&CompletedSnapshot> = {
            let done = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
            catalog
                .completed
                .values()
                .filter(|c| !done.contains(&c.gs))
                .collect()
        };
        let epochs = Epochs {
            last_started: catalog.last_started,
            last_resume_attempt: catalog.last_resume_attempt,
        };
        let mut when = vec![self.guard.clone()];
        let mut ops = vec![TxnOp::put(
            self.etcd.key("catalog/epochs"),
            to_json(&epochs),
            None,
        )];
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for c in &fresh {
            let key = self.etcd.key(&format!("catalog/gs/{}", gs_key(c.gs.0)));
            when.push(Compare::version(key.clone(), CompareOp::Equal, 0));
            let rec = RecordedSnapshot {
                snapshot: (*c).clone(),
                recorded_at_ms: now_ms,
                local_snapshots: c
                    .participants
                    .iter()
                    .map(|p| (p.0, local_snapshot_name(c.gs)))
                    .collect(),
                leader_revision: self.revision,
            };
            ops.push(TxnOp::put(key, to_json(&rec), None));
        }
        let txn = Txn::new().when(when).and_then(ops);
        if self.etcd.txn("write the catalog", txn).await?.succeeded() {
            self.recorded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(fresh.iter().map(|c| c.gs));
            return Ok(());
        }
        // Why not: the leadership, or an id already there.
        if !self.still_leader().await? {
            return Err(ControlError::Fenced {
                what: "writing the catalog".to_string(),
            });
        }
        // A record there already: ours, if a repeated request found its own earlier
        // effect (same id, same leader, same content); anybody else's is refused.
        let mut ours = 0;
        for c in &fresh {
            let rel = format!("catalog/gs/{}", gs_key(c.gs.0));
            if let Some((bytes, _)) = self.etcd.get(&rel).await? {
                let there: RecordedSnapshot = from_json(&self.etcd.key(&rel), &bytes)?;
                if there.leader_revision == self.revision && there.snapshot == **c {
                    ours += 1;
                } else {
                    return Err(ControlError::AlreadyExists {
                        key: self.etcd.key(&rel),
                    });
                }
            }
        }
        if ours == fresh.len() && !fresh.is_empty() {
            // Everything new is in etcd already; write the counters (and nothing else).
            self.recorded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(fresh.iter().map(|c| c.gs));
            return Box::pin(self.save(catalog)).await;
        }
        Err(ControlError::Contended {
            op: "write the catalog".to_string(),
            attempts: 1,
        })
    }

    async fn still_leader(&self) -> Result<bool> {
        let key = self.guard_key.clone();
        let resp = self
            .etcd
            .call(
                || "read the leader key".to_string(),
                |mut c| {
                    let key = key.clone();
                    async move { c.get(key, None).await }
                },
            )
            .await?;
        Ok(resp
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == self.revision))
    }
}

/// Reads the catalog from etcd: the epoch counters and every recorded global snapshot.
/// The counters never lag behind a recorded id.
pub async fn load(etcd: &Etcd) -> Result<Catalog> {
    let mut cat = Catalog::new(etcd.cluster());
    if let Some((v, _)) = etcd.get("catalog/epochs").await? {
        let e: Epochs = from_json(&etcd.key("catalog/epochs"), &v)?;
        cat.last_started = e.last_started;
        cat.last_resume_attempt = e.last_resume_attempt;
    }
    for r in recorded(etcd).await? {
        cat.completed.insert(r.snapshot.gs, r.snapshot);
    }
    if let Some(max) = cat.completed.keys().next_back().copied() {
        if !matches!(cat.last_started, Some(l) if l >= max) {
            cat.last_started = Some(max);
        }
    }
    Ok(cat)
}

/// Every recorded global snapshot, by ascending id.
pub async fn recorded(etcd: &Etcd) -> Result<Vec<RecordedSnapshot>> {
    let mut v = Vec::new();
    for (k, bytes) in etcd.list("catalog/gs/").await? {
        let r: RecordedSnapshot = from_json(&etcd.key(&k), &bytes)?;
        if k != format!("catalog/gs/{}", gs_key(r.snapshot.gs.0)) {
            return Err(ControlError::Invalid {
                key: etcd.key(&k),
                reason: format!("records global snapshot {} under another id", r.snapshot.gs),
            });
        }
        v.push(r);
    }
    v.sort_by_key(|r| r.snapshot.gs);
    Ok(v)
}

/// The timing results of every recorded global snapshot as the thesis's CSV
/// (`global_snapshot,participant,local_time_s,global_time_s`).
pub async fn times_csv(etcd: &Etcd) -> Result<String> {
    let mut csv = SnapshotTimes::CSV_HEADER.to_string();
    for r in recorded(etcd).await? {
        SnapshotTimes {
            gs: r.snapshot.gs,
            global_time: r.snapshot.global_time,
            local_times: r.snapshot.local_times,
        }
        .write_csv_rows(&mut csv);
    }
    Ok(csv)
}

/// An operator's request, consumed by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Trigger {
    /// Take a global snapshot.
    GlobalSnapshot,
    /// Resume from a completed global snapshot (the latest when `gs` is `None`).
    Resume {
        /// What to restore.
        gs: Option<GlobalSnapshotId>,
    },
}

/// Queues a trigger for whoever leads now or next; returns its key.
pub async fn put_trigger(etcd: &Etcd, trigger: &Trigger) -> Result<String> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let rel = format!("triggers/{nanos:032}-{:016x}", rand::random::<u64>());
    let key = etcd.key(&rel);
    etcd.put(&key, &to_json(trigger), None).await?;
    Ok(key)
}

/// Takes the oldest queued trigger, as the leader: it is deleted in a transaction
/// conditioned on the leadership, so each trigger is taken once. `None` when none waits.
pub async fn take_trigger(etcd: &Etcd, guard: &Compare) -> Result<Option<Trigger>> {
    for (rel, bytes) in etcd.list("triggers/").await? {
        let key = etcd.key(&rel);
        let txn = Txn::new()
            .when([
                guard.clone(),
                Compare::version(key.clone(), CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::delete(key.clone(), None::<DeleteOptions>)]);
        if etcd.txn("take a trigger", txn).await?.succeeded() {
            // A trigger nobody can read is dropped (and said so), not retried forever.
            return match from_json::<Trigger>(&key, &bytes) {
                Ok(t) => Ok(Some(t)),
                Err(e) => Err(e),
            };
        }
    }
    Ok(None)
}

/// The participants of a cluster whose hosts registered in etcd (ids ≥ 1).
pub async fn participants(etcd: &Etcd) -> Result<Vec<ParticipantId>> {
    Ok(super::registry::hosts(etcd)
        .await?
        .into_iter()
        .map(|h| ParticipantId(h.id))
        .collect())
}

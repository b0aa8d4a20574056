//! The report of a ring run, computed from the final states and the checker's verdicts.

use serde::{Deserialize, Serialize};

use super::checker::check_durability;
use super::harness::Cluster;

/// What one ring run produced. Serialises to one JSON object with exactly these keys.
///
/// `lost`, `duplicated`, `orphan_messages`, `unrestorable_snapshots` and `violations` are
/// counted — from the final application states and by the checker over every completed
/// global snapshot — never assumed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RingReport {
    /// Peers in the ring.
    pub nodes: usize,
    /// Tokens the ring was configured to pass.
    pub tokens_expected: u64,
    /// Distinct tokens the ring's final application states processed.
    pub tokens_final: u64,
    /// Messages the final timeline sent that its receivers never got.
    pub lost: u64,
    /// Messages the final application states received twice (same message, or a token
    /// already seen).
    pub duplicated: u64,
    /// Global snapshots the coordinator started.
    pub global_snapshots_started: u64,
    /// Global snapshots that completed.
    pub global_snapshots_completed: u64,
    /// The global snapshot the run resumed from after a crash, if any.
    pub restored_from: Option<u64>,
    /// Orphan messages (SPEC Eq. 5.3) over every completed global snapshot.
    pub orphan_messages: u64,
    /// Completed global snapshots that cannot be restored: some host lost its local
    /// snapshot of it (powered off between the snapshot point and durability).
    #[serde(default)]
    pub unrestorable_snapshots: u64,
    /// Consistency violations: orphans and unrecoverable messages over every completed
    /// global snapshot, local snapshots of completed global snapshots lost before they
    /// were durable, datagrams of a replaced timeline delivered after a restore, and
    /// messages the final states received but their senders never sent.
    pub violations: u64,
    /// Virtual time of the run.
    pub sim_time_ms: f64,
    /// Application messages handed to a transport (all timelines).
    pub messages_sent: u64,
    /// Every global snapshot attempt.
    pub snapshots: Vec<SnapshotReport>,
    /// Costs of the protocol.
    pub overhead: Overhead,
}

/// One global snapshot attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// Global snapshot id.
    pub id: u64,
    /// `completed`, `failed` or `unfinished`.
    pub status: String,
    /// When the coordinator started it (ms from the start of the run).
    pub started_ms: Option<f64>,
    /// Local snapshot time of each host (step 3), host 0 first.
    pub local_ms: Vec<f64>,
    /// From the trigger to completion, pre-check included.
    pub global_ms: Option<f64>,
    /// The protocol's own figure: from TAKE_SNAPSHOT to completion.
    pub phase2_ms: Option<f64>,
    /// `global_ms` minus the slowest `local_ms`: what coordinating costs.
    pub coordination_overhead_ms: Option<f64>,
    /// Protocol messages of this attempt (pre-check and phase 2).
    pub protocol_messages: u64,
    /// Checker: orphan messages (Eq. 5.3).
    pub orphans: u64,
    /// Checker: sent, not received, not retransmittable (Eq. 5.2, TCP-like).
    pub unrecoverable: u64,
    /// Checker: in a channel, recovered by retransmission after a restore (TCP-like).
    pub recoverable_in_channel: u64,
    /// Checker: datagrams in a channel, lost after a restore (UDP-like, tolerated).
    pub datagrams_in_channel: u64,
    /// Checker: hosts whose local snapshot of this completed global snapshot was lost
    /// before it was durable — the catalog offers a global snapshot that cannot be
    /// restored.
    #[serde(default)]
    pub lost_before_durable: Vec<usize>,
    /// Why it failed.
    pub failure: Option<String>,
}

/// What the protocol cost the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Overhead {
    /// Protocol frames sent (snapshot and resume protocols).
    pub protocol_messages: u64,
    /// Of which resume protocol frames.
    pub resume_messages: u64,
    /// Application datagrams on the wire (data, ACKs, retransmissions).
    pub datagrams_sent: u64,
    /// Application datagrams dropped by a POST filter.
    pub dropped_by_filter: u64,
    /// TCP-like retransmissions.
    pub retransmissions: u64,
    /// Application datagrams lost by links.
    pub lost_by_link: u64,
    /// Datagrams of a replaced timeline delivered after a restore.
    pub stale_deliveries: u64,
    /// Mean coordination overhead of completed global snapshots.
    pub coordination_overhead_ms_mean: Option<f64>,
    /// Largest coordination overhead of completed global snapshots.
    pub coordination_overhead_ms_max: Option<f64>,
    /// Triggers the coordinator refused (one global snapshot at a time).
    pub triggers_refused: u64,
    /// Errors the state machines returned (a correct run has none).
    pub protocol_errors: u64,
    /// The ring restarted from its initial state (crash before any completed snapshot).
    pub restarted_from_scratch: bool,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl RingReport {
    /// Builds the report of a finished (or quiet) run.
    pub fn from_cluster(c: &Cluster) -> Self {
        let cfg = c.config();
        let base = c.now() - c.elapsed();
        let hosts = c.hosts();

        let (mut tokens_final, mut duplicated, mut lost, mut phantoms) = (0, 0, 0, 0);
        for h in hosts {
            let Some(vm) = &h.vm else { continue };
            tokens_final += vm.app.hellos;
            duplicated += vm.app.duplicates;
            let sent = hosts[vm.app.pred].vm.as_ref().map_or(0, |p| p.app.sent);
            lost += vm.app.received.missing_below(sent).count() as u64;
            phantoms += vm.app.received.count_at_or_above(sent);
        }

        let mut snapshots = Vec::new();
        let (mut started, mut completed, mut orphans, mut snapshot_violations) = (0, 0, 0, 0);
        let mut unrestorable = 0;
        let mut overheads = Vec::new();
        for r in c.records().values() {
            if r.started.is_none() {
                continue;
            }
            started += 1;
            let status = if r.completed.is_some() {
                completed += 1;
                "completed"
            } else if r.failure.is_some() {
                "failed"
            } else {
                "unfinished"
            };
            let local_ms: Vec<f64> = r.local_times.iter().copied().map(ms).collect();
            let global = r.started.zip(r.completed).map(|(s, e)| e - s);
            let slowest = r.local_times.iter().max().copied();
            let overhead = global.zip(slowest).map(|(g, l)| ms(g.saturating_sub(l)));
            overheads.extend(overhead);
            let v = r.verdict.clone().unwrap_or_default();
            orphans += v.orphans;
            snapshot_violations += v.violations();
            let lost_before_durable = if r.completed.is_some() {
                check_durability(hosts, r.id).lost
            } else {
                Vec::new()
            };
            if !lost_before_durable.is_empty() {
                unrestorable += 1;
                snapshot_violations += lost_before_durable.len() as u64;
            }
            snapshots.push(SnapshotReport {
                id: r.id,
                status: status.into(),
                started_ms: r.started.map(|s| ms(s - base)),
                local_ms,
                global_ms: global.map(ms),
                phase2_ms: r.phase2.map(ms),
                coordination_overhead_ms: overhead,
                protocol_messages: r.protocol_messages,
                orphans: v.orphans,
                unrecoverable: v.unrecoverable,
                recoverable_in_channel: v.recoverable,
                datagrams_in_channel: v.datagrams_in_channel,
                lost_before_durable,
                failure: r.failure.clone(),
            });
        }

        let s = c.stats();
        let mean =
            (!overheads.is_empty()).then(|| overheads.iter().sum::<f64>() / overheads.len() as f64);
        let max = overheads.iter().copied().reduce(f64::max);
        RingReport {
            nodes: cfg.nodes,
            tokens_expected: cfg.tokens,
            tokens_final,
            lost,
            duplicated,
            global_snapshots_started: started,
            global_snapshots_completed: completed,
            restored_from: c.restored_from(),
            orphan_messages: orphans,
            unrestorable_snapshots: unrestorable,
            violations: snapshot_violations + s.stale_deliveries + phantoms,
            sim_time_ms: ms(c.elapsed()),
            messages_sent: s.app_messages_sent,
            snapshots,
            overhead: Overhead {
                protocol_messages: s.protocol_messages,
                resume_messages: s.resume_messages,
                datagrams_sent: s.datagrams_sent,
                dropped_by_filter: s.dropped_by_filter,
                retransmissions: s.retransmissions,
                lost_by_link: s.lost_by_link,
                stale_deliveries: s.stale_deliveries,
                coordination_overhead_ms_mean: mean,
                coordination_overhead_ms_max: max,
                triggers_refused: s.triggers_refused,
                protocol_errors: s.protocol_errors.len() as u64,
                restarted_from_scratch: c.restarted_from_scratch(),
            },
        }
    }
}

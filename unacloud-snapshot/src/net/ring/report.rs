//! What a ring lab is asked to do (its configuration, the fault to inject) and what it
//! reports (tokens, times, drops, leftovers), with the sample statistics it uses.

use std::path::PathBuf;
use std::time::Duration;

use crate::net::daemon::BackendKind;

/// Fault injection: one participant's host powers off mid-snapshot.
#[derive(Debug, Clone, Copy)]
pub struct CrashSpec {
    /// Index of the namespace whose launcher crashes (1..P; 0 is the coordinator).
    pub namespace: usize,
    /// It crashes right after this step (1–6) of the first global snapshot.
    pub after_step: u8,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RingNetnsConfig {
    /// Ring peers = namespaces = VMs (2..=250).
    pub peers: u32,
    /// Tokens of the ring.
    pub tokens: u64,
    /// Global snapshots to take while the ring runs.
    pub snapshots: u32,
    /// How long each local snapshot freezes its ring peer.
    pub snapshot_delay: Duration,
    /// Colouring backend of the participants.
    pub backend: BackendKind,
    /// The program to re-execute for the launcher and RCPBT processes, and the arguments
    /// that make it run `net::cli::main` (feature `cli`) with the arguments that follow.
    pub program: PathBuf,
    /// See `program`.
    pub program_args: Vec<String>,
    /// Fault injection.
    pub crash: Option<CrashSpec>,
    /// Phase deadlines of the protocol (precheck and snapshot).
    pub snapshot_timeout: Duration,
    /// Pause between two global snapshots.
    pub gap: Duration,
    /// Bound on the whole run.
    pub deadline: Duration,
    /// Run the control plane on an etcd cluster of the lab's own (`--control etcd`)
    /// instead of a metadata server and a coordinator host.
    #[cfg(feature = "etcd")]
    pub etcd: Option<EtcdLabConfig>,
}

/// The lab's etcd control plane (`--control etcd`).
#[cfg(feature = "etcd")]
#[derive(Debug, Clone)]
pub struct EtcdLabConfig {
    /// Members of the lab's etcd cluster (on loopback; removed at the end).
    pub nodes: usize,
    /// SIGKILL the process holding the coordinator role after this many completed
    /// global snapshots.
    pub kill_coordinator_after: Option<u32>,
    /// SIGKILL the etcd leader after this many completed global snapshots.
    pub kill_etcd_leader_after: Option<u32>,
    /// Lease TTL of hosts and candidates.
    pub lease_ttl: Duration,
}

#[cfg(feature = "etcd")]
impl EtcdLabConfig {
    /// `nodes` members, no kills, 2 s leases.
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes,
            kill_coordinator_after: None,
            kill_etcd_leader_after: None,
            lease_ttl: Duration::from_secs(2),
        }
    }
}

/// What the etcd control plane did during a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EtcdLabReport {
    /// Members of the etcd cluster.
    pub etcd_nodes: usize,
    /// Times the coordinator's process was killed and another candidate took over.
    pub coordinator_failovers: u32,
    /// Times the etcd leader was killed.
    pub etcd_leader_kills: u32,
    /// Ids of the completed global snapshots, in order of completion (`ring_vms` reports
    /// them in its own field of that name).
    #[serde(skip)]
    pub completed_ids: Vec<u64>,
    /// Ids of the global snapshots recorded in etcd's catalog, read back at the end.
    pub catalog_in_etcd: Vec<u64>,
    /// Per failover: from the SIGKILL to the first global snapshot completed by the new
    /// coordinator (ms).
    pub failover_ms: Vec<f64>,
    /// etcd processes still running after teardown.
    pub etcd_processes_left: usize,
    /// Whether the etcd data directories are gone after teardown.
    pub etcd_dirs_removed: bool,
}

impl RingNetnsConfig {
    /// Defaults: nft-netlink backend (the fastest: no `nft` process), no crash, 3 s protocol deadlines, 20 ms gap, 120 s
    /// overall bound.
    pub fn new(
        peers: u32,
        tokens: u64,
        snapshots: u32,
        program: PathBuf,
        program_args: Vec<String>,
    ) -> Self {
        Self {
            peers,
            tokens,
            snapshots,
            snapshot_delay: Duration::ZERO,
            backend: BackendKind::NftNetlink,
            program,
            program_args,
            crash: None,
            snapshot_timeout: Duration::from_secs(3),
            gap: Duration::from_millis(20),
            deadline: Duration::from_secs(120),
            #[cfg(feature = "etcd")]
            etcd: None,
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RingNetnsReport {
    /// Ring peers.
    pub peers: u32,
    /// Tokens configured.
    pub tokens_expected: u64,
    /// Tokens the ring's peers counted (sum of `Hello` messages received).
    pub tokens_counted: u64,
    /// Global snapshots completed.
    pub global_snapshots_completed: u32,
    /// Global snapshots reported failed.
    pub global_snapshots_failed: u32,
    /// Per completed global snapshot: the slowest local snapshot time (ms).
    pub local_ms: Vec<f64>,
    /// Per completed global snapshot: the global time (ms).
    pub global_ms: Vec<f64>,
    /// Per completed global snapshot: global − slowest local (ms).
    pub overhead_ms: Vec<f64>,
    /// Packets dropped by the POST filters (kernel counters, all namespaces).
    pub post_packets_dropped: u64,
    /// Our netfilter objects left in the namespaces after every launcher stopped.
    pub rules_left: usize,
    /// Namespaces of this run left after teardown.
    pub namespaces_left: usize,
    /// Why snapshots failed.
    pub failures: Vec<String>,
    /// After a failure: whether every surviving host stopped colouring its traffic within
    /// the protocol deadline (a POST filter may stay armed while a host is idle, which
    /// drops nothing as nobody colours).
    pub survivors_cleared_in_time: Option<bool>,
    /// Ring duration as measured by the test manager (s).
    pub ring_duration_s: f64,
    /// With the control plane on etcd: what it did.
    pub etcd: Option<EtcdLabReport>,
}

impl RingNetnsReport {
    /// The JSON object of the `--json` output (exactly the documented keys).
    pub fn json_summary(&self) -> serde_json::Value {
        let mut v = self.embedded_json();
        if let (Some(e), Some(map)) = (&self.etcd, v.as_object_mut()) {
            map.insert("control".into(), "etcd".into());
            map.insert("etcd_nodes".into(), e.etcd_nodes.into());
            map.insert(
                "coordinator_failovers".into(),
                e.coordinator_failovers.into(),
            );
            map.insert("etcd_leader_kills".into(), e.etcd_leader_kills.into());
            map.insert("completed_ids".into(), e.completed_ids.clone().into());
            map.insert("catalog_in_etcd".into(), e.catalog_in_etcd.clone().into());
            map.insert("failover_ms".into(), e.failover_ms.clone().into());
            map.insert("etcd_processes_left".into(), e.etcd_processes_left.into());
            map.insert("etcd_dirs_removed".into(), e.etcd_dirs_removed.into());
        }
        v
    }

    fn embedded_json(&self) -> serde_json::Value {
        serde_json::json!({
            "peers": self.peers,
            "tokens_expected": self.tokens_expected,
            "tokens_counted": self.tokens_counted,
            "global_snapshots_completed": self.global_snapshots_completed,
            "local_ms": self.local_ms,
            "global_ms": self.global_ms,
            "overhead_ms": self.overhead_ms,
            "post_packets_dropped": self.post_packets_dropped,
            "rules_left": self.rules_left,
            "namespaces_left": self.namespaces_left,
        })
    }

    /// Counts a coordinator's `gs_completed` event (the launcher's JSON) and its times.
    pub(crate) fn record_completed(&mut self, ev: &serde_json::Value) {
        self.global_snapshots_completed += 1;
        let global_us = ev["global_us"].as_u64().unwrap_or(0);
        let local_us = ev["local_us"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64()).max().unwrap_or(0))
            .unwrap_or(0);
        let ms = |us: u64| us as f64 / 1000.0;
        self.global_ms.push(ms(global_us));
        self.local_ms.push(ms(local_us));
        self.overhead_ms
            .push(ms(global_us.saturating_sub(local_us)));
    }

    /// Counts a coordinator's `gs_failed` event and says why.
    pub(crate) fn record_failed(&mut self, ev: &serde_json::Value) {
        self.global_snapshots_failed += 1;
        self.failures.push(format!(
            "global snapshot {}: participants {} — {}",
            ev["gs"],
            ev["who"],
            ev["why"].as_str().unwrap_or("")
        ));
    }

    /// A short human summary.
    pub fn human_summary(&self) -> String {
        let med = |v: &[f64]| median(v).map_or("-".to_string(), |m| format!("{m:.2} ms"));
        let mut s = format!(
            "ring of {} peers: {} of {} tokens counted{}\n",
            self.peers,
            self.tokens_counted,
            self.tokens_expected,
            if self.tokens_counted == self.tokens_expected {
                " (nothing lost, nothing duplicated)"
            } else {
                " (MISMATCH)"
            }
        );
        s.push_str(&format!(
            "global snapshots: {} completed, {} failed\n",
            self.global_snapshots_completed, self.global_snapshots_failed
        ));
        s.push_str(&format!(
            "median times: local {}, global {}, overhead {}\n",
            med(&self.local_ms),
            med(&self.global_ms),
            med(&self.overhead_ms)
        ));
        s.push_str(&format!(
            "POSTSNAPSHOT packets dropped by the filters: {}{}\n",
            self.post_packets_dropped,
            if self.tokens_counted == self.tokens_expected && self.post_packets_dropped > 0 {
                " — TCP retransmitted them and the ring completed"
            } else {
                ""
            }
        ));
        s.push_str(&format!(
            "left behind: {} rules, {} namespaces",
            self.rules_left, self.namespaces_left
        ));
        for f in &self.failures {
            s.push_str(&format!("\nfailed: {f}"));
        }
        s
    }
}

/// Median of a sample (`None` when empty).
pub fn median(v: &[f64]) -> Option<f64> {
    percentile(v, 50.0)
}

/// Nearest-rank percentile of a sample (`None` when empty).
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

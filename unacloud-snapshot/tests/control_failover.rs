//! Coordinator failover on a real etcd cluster, with the coordinator candidates as real
//! processes (`unacloud-gs candidate`) that are SIGKILLed and SIGSTOPped.
//!
//! Three hosts (host agents in this process, whose local snapshots are recorded) and
//! five candidates. The coordinator is killed in the middle of phase 1, in the middle of
//! phase 2 and between two global snapshots; the etcd leader is killed; a coordinator is
//! paused past its lease and resumed. Afterwards: no global snapshot id is recorded
//! twice, every recorded one was really complete (every host took its local snapshot for
//! it), and the latest recorded one restores.
#![cfg(all(feature = "etcd", feature = "cli"))]
#![allow(clippy::unwrap_used)]

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use unacloud_snapshot::control::agent::{HostAgent, HostAgentConfig};
use unacloud_snapshot::control::catalog::{self, Trigger};
use unacloud_snapshot::control::cluster::{etcd_available, EtcdCluster, EtcdClusterConfig};
use unacloud_snapshot::control::election;
use unacloud_snapshot::control::{Etcd, EtcdConfig};
use unacloud_snapshot::net::conn::TransportConfig;
use unacloud_snapshot::net::host::{HostActions, HostSummary};
use unacloud_snapshot::protocol::{ActionOutcome, ClusterId, HostAction, Timeouts};

const BIN: &str = env!("CARGO_BIN_EXE_unacloud-gs");
const CLUSTER: ClusterId = ClusterId(11);
const TTL_MS: u64 = 1500;
const PHASE_MS: u64 = 3000;

/// What hosts did: (host, kind, gs).
type Log = Arc<Mutex<Vec<(String, &'static str, Option<u64>)>>>;

/// A host whose actions succeed, are recorded, and can be slowed down.
#[derive(Debug)]
struct RecordingHost {
    name: String,
    log: Log,
    /// Delay of (CheckVmsRunning, TakeLocalSnapshots).
    delays: Arc<Mutex<(Duration, Duration)>>,
    started: mpsc::UnboundedSender<(&'static str, Option<u64>)>,
}

impl HostActions for RecordingHost {
    fn perform(&self, action: HostAction) -> BoxFuture<'static, ActionOutcome> {
        let (check, snap) = *self.delays.lock().unwrap();
        let (kind, gs, delay, outcome) = match &action {
            HostAction::CheckVmsRunning { .. } => {
                ("check", None, check, ActionOutcome::VmsRunning(true))
            }
            HostAction::TakeLocalSnapshots { gs, .. } => (
                "snapshot",
                Some(gs.0),
                snap,
                ActionOutcome::SnapshotTaken { local_time: snap },
            ),
            HostAction::RestoreLocal { gs, .. } => {
                ("restore", Some(gs.0), Duration::ZERO, ActionOutcome::Done)
            }
            HostAction::StartVms { .. } => ("start", None, Duration::ZERO, ActionOutcome::Done),
            _ => ("other", None, Duration::ZERO, ActionOutcome::Done),
        };
        let _ = self.started.send((kind, gs));
        let (log, name) = (self.log.clone(), self.name.clone());
        async move {
            tokio::time::sleep(delay).await;
            if kind != "other" {
                log.lock().unwrap().push((name, kind, gs));
            }
            outcome
        }
        .boxed()
    }

    fn shutdown(&self) -> BoxFuture<'static, HostSummary> {
        async { HostSummary::default() }.boxed()
    }
}

/// The candidate processes; killed when dropped.
struct Candidates {
    children: Vec<Child>,
}

impl Drop for Candidates {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

type Events = mpsc::UnboundedReceiver<(usize, serde_json::Value)>;

async fn next_event(
    rx: &mut Events,
    bound: Duration,
    mut want: impl FnMut(usize, &serde_json::Value) -> bool,
) -> Option<(usize, serde_json::Value)> {
    let until = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some((i, v))) if want(i, &v) => return Some((i, v)),
            Ok(Some(_)) => {}
            _ => return None,
        }
    }
}

/// Triggers through etcd until a global snapshot completes (a failover may be under
/// way); returns (candidate, gs).
async fn snapshot(etcd: &Etcd, rx: &mut Events, bound: Duration) -> Option<(usize, u64)> {
    let until = Instant::now() + bound;
    while Instant::now() < until {
        catalog::put_trigger(etcd, &Trigger::GlobalSnapshot)
            .await
            .ok()?;
        let ev = next_event(rx, Duration::from_millis(PHASE_MS * 2 + 1000), |_, v| {
            v["event"] == "gs_completed" || v["event"] == "gs_failed"
        })
        .await;
        if let Some((i, v)) = ev {
            if v["event"] == "gs_completed" {
                return Some((i, v["gs"].as_u64().unwrap()));
            }
        }
    }
    None
}

/// The candidate index holding the role now.
async fn leader(etcd: &Etcd, pids: &[u32]) -> usize {
    for _ in 0..100 {
        if let Ok(Some(l)) = election::current_leader(etcd).await {
            if let Some(i) = pids.iter().position(|p| *p == l.pid) {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nobody holds the coordinator role");
}

/// Every recorded global snapshot really complete: each host took its local snapshot
/// for it. Returns the ids that are not.
fn incomplete(
    recorded: &[u64],
    log: &[(String, &'static str, Option<u64>)],
    hosts: &[String],
) -> Vec<u64> {
    let mut took: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    for (h, kind, gs) in log {
        if *kind == "snapshot" {
            if let Some(g) = gs {
                took.entry(*g).or_default().insert(h.as_str());
            }
        }
    }
    recorded
        .iter()
        .copied()
        .filter(|g| {
            let t = took.get(g);
            !hosts
                .iter()
                .all(|h| t.is_some_and(|s| s.contains(h.as_str())))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_die_and_pause_and_the_catalog_stays_consistent() {
    if !etcd_available() {
        skip::skipped("the etcd program is not installed (scripts/setup installs etcd-server)");
        return;
    }
    let cluster = EtcdCluster::start(EtcdClusterConfig::loopback(3))
        .await
        .unwrap();
    let cfg = EtcdConfig::new(cluster.endpoints(), CLUSTER);
    let etcd = Etcd::connect(&cfg).await.unwrap();
    let timeouts = Timeouts {
        precheck: Duration::from_millis(PHASE_MS),
        snapshot: Duration::from_millis(PHASE_MS),
        ..Timeouts::default()
    };
    let log: Log = Arc::default();
    let delays = Arc::new(Mutex::new((Duration::ZERO, Duration::ZERO)));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let mut hosts = Vec::new();
    let names: Vec<String> = (0..3).map(|i| format!("host-{i}")).collect();
    for name in &names {
        let host = RecordingHost {
            name: name.clone(),
            log: log.clone(),
            delays: delays.clone(),
            started: started_tx.clone(),
        };
        let hc = HostAgentConfig {
            etcd: cfg.clone(),
            addr: name.clone(),
            vms: vec![format!("{name}-vm")],
            lease_ttl: Duration::from_millis(TTL_MS),
            timeouts,
        };
        hosts.push(
            HostAgent::start(hc, TransportConfig::new(CLUSTER, None), Arc::new(host))
                .await
                .unwrap(),
        );
    }

    // Five candidates, each its own process.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut cands = Candidates {
        children: Vec::new(),
    };
    let mut pids = Vec::new();
    for i in 0..5 {
        let mut child = Command::new(BIN)
            .args(["candidate", "--etcd", &cluster.endpoints_arg()])
            .args(["--cluster", &CLUSTER.0.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--name", &format!("candidate-{i}")])
            .args(["--lease-ttl-ms", &TTL_MS.to_string()])
            .args(["--snapshot-timeout-ms", &PHASE_MS.to_string()])
            .args(["--precheck-timeout-ms", &PHASE_MS.to_string()])
            .arg("--events-json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        pids.push(child.id());
        let out = tokio::process::ChildStdout::from_std(child.stdout.take().unwrap()).unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                    let _ = tx.send((i, v));
                }
            }
        });
        cands.children.push(child);
    }
    let bound = Duration::from_secs(30);
    let mut completed = Vec::new();
    let (_, gs) = snapshot(&etcd, &mut rx, bound)
        .await
        .expect("a first global snapshot");
    completed.push(gs);
    let sigkill = |i: usize| kill(Pid::from_raw(pids[i] as i32), Signal::SIGKILL).unwrap();

    // 1. The coordinator dies in the middle of phase 1 (the hosts are checking their VMs).
    // 2. … in the middle of phase 2 (the hosts are taking their local snapshots).
    for (phase, slow) in [
        ("check", (Duration::from_secs(2), Duration::ZERO)),
        ("snapshot", (Duration::ZERO, Duration::from_secs(2))),
    ] {
        *delays.lock().unwrap() = slow;
        while started.try_recv().is_ok() {}
        let l = leader(&etcd, &pids).await;
        catalog::put_trigger(&etcd, &Trigger::GlobalSnapshot)
            .await
            .unwrap();
        loop {
            let (kind, _) = tokio::time::timeout(Duration::from_secs(10), started.recv())
                .await
                .expect("the hosts start the phase")
                .unwrap();
            if kind == phase {
                break;
            }
        }
        sigkill(l);
        let (_, elected) = next_event(&mut rx, Duration::from_secs(10), |i, v| {
            i != l && v["event"] == "elected"
        })
        .await
        .expect("another candidate takes over");
        assert!(
            elected["failed_in_flight"].as_u64().is_some(),
            "the global snapshot in flight is declared failed: {elected}"
        );
        *delays.lock().unwrap() = (Duration::ZERO, Duration::ZERO);
        let (by, gs) = snapshot(&etcd, &mut rx, bound)
            .await
            .expect("snapshots go on");
        assert_ne!(by, l);
        completed.push(gs);
    }

    // 3. … between two global snapshots.
    let l = leader(&etcd, &pids).await;
    sigkill(l);
    let (by, gs) = snapshot(&etcd, &mut rx, bound)
        .await
        .expect("snapshots go on");
    assert_ne!(by, l);
    completed.push(gs);

    // 4. The etcd leader dies.
    let el = cluster.leader().await.unwrap();
    cluster.kill(el).unwrap();
    let (_, gs) = snapshot(&etcd, &mut rx, bound)
        .await
        .expect("snapshots go on without the etcd leader");
    completed.push(gs);

    // 5. A coordinator is paused in phase 2 past its lease, another takes over and
    //    completes a global snapshot, then the paused one resumes: it is fenced.
    *delays.lock().unwrap() = (Duration::ZERO, Duration::from_millis(1500));
    while started.try_recv().is_ok() {}
    let stale = leader(&etcd, &pids).await;
    catalog::put_trigger(&etcd, &Trigger::GlobalSnapshot)
        .await
        .unwrap();
    let stale_gs = loop {
        let (kind, gs) = tokio::time::timeout(Duration::from_secs(10), started.recv())
            .await
            .unwrap()
            .unwrap();
        if kind == "snapshot" {
            break gs.unwrap();
        }
    };
    kill(Pid::from_raw(pids[stale] as i32), Signal::SIGSTOP).unwrap();
    next_event(&mut rx, Duration::from_secs(10), |i, v| {
        i != stale && v["event"] == "elected"
    })
    .await
    .expect("another candidate takes over from the paused one");
    *delays.lock().unwrap() = (Duration::ZERO, Duration::ZERO);
    let (by, gs) = snapshot(&etcd, &mut rx, bound)
        .await
        .expect("snapshots go on");
    assert_ne!(by, stale);
    completed.push(gs);
    kill(Pid::from_raw(pids[stale] as i32), Signal::SIGCONT).unwrap();
    let (_, lost) = next_event(&mut rx, Duration::from_secs(15), |i, v| {
        i == stale && v["event"] == "lost"
    })
    .await
    .expect("the resumed coordinator finds it lost its role");
    eprintln!("the paused coordinator: {lost}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The property.
    let recorded: Vec<u64> = catalog::recorded(&etcd)
        .await
        .unwrap()
        .iter()
        .map(|r| r.snapshot.gs.0)
        .collect();
    assert_eq!(
        recorded, completed,
        "exactly the completed ids, each once, in order"
    );
    assert!(
        !recorded.contains(&stale_gs),
        "the fenced coordinator's global snapshot was recorded"
    );
    let snapshot_log = log.lock().unwrap().clone();
    assert_eq!(
        incomplete(&recorded, &snapshot_log, &names),
        Vec::<u64>::new()
    );
    // Negative control: the checker does flag a global snapshot a host did not take.
    let mut partial = snapshot_log.clone();
    partial.retain(|(h, k, g)| !(h == "host-1" && *k == "snapshot" && *g == Some(recorded[0])));
    assert_eq!(incomplete(&recorded, &partial, &names), vec![recorded[0]]);

    // The operator's view, read from etcd: the catalog and the timing results.
    let out = Command::new(BIN)
        .args([
            "catalog",
            "--control",
            "etcd",
            "--etcd",
            &cluster.endpoints_arg(),
        ])
        .args(["--cluster", &CLUSTER.0.to_string(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<u64> = v["completed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["gs"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, recorded);
    let out = Command::new(BIN)
        .args([
            "catalog",
            "--control",
            "etcd",
            "--etcd",
            &cluster.endpoints_arg(),
        ])
        .args(["--cluster", &CLUSTER.0.to_string(), "--times-csv"])
        .output()
        .unwrap();
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.starts_with("global_snapshot,participant,local_time_s,global_time_s\n"));
    // One row per participant (the coordinator, id 0, and the three hosts) and snapshot.
    assert_eq!(csv.lines().count(), 1 + 4 * recorded.len(), "{csv}");

    // The latest recorded one restores, the resume started through etcd.
    catalog::put_trigger(&etcd, &Trigger::Resume { gs: None })
        .await
        .unwrap();
    next_event(&mut rx, Duration::from_secs(20), |_, v| {
        v["event"] == "resume_completed"
    })
    .await
    .expect("the resume completes");
    let latest = *recorded.last().unwrap();
    let restored: BTreeSet<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, k, g)| *k == "restore" && *g == Some(latest))
        .map(|(h, _, _)| h.clone())
        .collect();
    assert_eq!(
        restored.len(),
        3,
        "every host restored global snapshot {latest}"
    );

    drop(cands);
    for h in hosts {
        h.stop().await;
    }
}

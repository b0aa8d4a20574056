//! The etcd control plane against a real 3-member etcd cluster on loopback.
//!
//! Each test starts its own cluster (bounded start-up; killed and removed when the test
//! ends, also when it fails). Without the `etcd` program the tests say so and return.
#![allow(clippy::unwrap_used)]

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use unacloud_core::lifecycle::State;
use unacloud_snapshot::control::agent::{
    self, CandidateConfig, CandidateEvent, HostAgent, HostAgentConfig, NoVmsHost,
};
use unacloud_snapshot::control::catalog::{self, EtcdCatalog, Trigger};
use unacloud_snapshot::control::cluster::{etcd_available, EtcdCluster, EtcdClusterConfig};
use unacloud_snapshot::control::election::{self, CoordinatorInfo};
use unacloud_snapshot::control::monitor::{HostMonitor, LivenessTimeouts};
use unacloud_snapshot::control::registry::{self, Lease};
use unacloud_snapshot::control::{ControlError, Etcd, EtcdConfig};
use unacloud_snapshot::net::conn::TransportConfig;
use unacloud_snapshot::net::node::NodeEvent;
use unacloud_snapshot::protocol::{
    Catalog, ClusterId, CompletedSnapshot, GlobalSnapshotId, LocalTime, ParticipantId,
    ProtocolEvent, Timeouts,
};

const CLUSTER: ClusterId = ClusterId(7);

async fn cluster() -> Option<(EtcdCluster, EtcdConfig)> {
    if !etcd_available() {
        skip::skipped("the etcd program is not installed (scripts/setup installs etcd-server)");
        return None;
    }
    let c = EtcdCluster::start(EtcdClusterConfig::loopback(3))
        .await
        .expect("a 3-member etcd cluster starts");
    let cfg = EtcdConfig::new(c.endpoints(), CLUSTER);
    Some((c, cfg))
}

fn info(name: &str, port: u16) -> CoordinatorInfo {
    CoordinatorInfo {
        candidate: name.to_string(),
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        pid: std::process::id(),
    }
}

fn completed(gs: u64, participants: &[u32]) -> CompletedSnapshot {
    CompletedSnapshot {
        gs: GlobalSnapshotId(gs),
        participants: participants.iter().map(|&p| ParticipantId(p)).collect(),
        local_times: participants
            .iter()
            .map(|&p| LocalTime {
                participant: ParticipantId(p),
                local_time: Duration::from_millis(10),
            })
            .collect(),
        global_time: Duration::from_millis(30),
    }
}

/// Polls `f` every 50 ms until it returns `Some`, at most `bound`.
async fn eventually<T, F, Fut>(bound: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + bound;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_come_from_a_transaction_and_survive_re_registration() {
    let Some((_c, cfg)) = cluster().await else {
        return;
    };
    let etcd = Etcd::connect(&cfg).await.unwrap();
    // 24 hosts register at once: every id distinct, 1..=24, none reused.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let etcd = etcd.clone();
        tasks.push(tokio::spawn(async move {
            registry::register(&etcd, &format!("10.0.0.{i}"), &[format!("vm-{i}")])
                .await
                .unwrap()
        }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        assert!(ids.insert(t.await.unwrap().0), "an id was handed out twice");
    }
    assert_eq!(ids, (1..=24).collect());
    // The same host and VMs again (after a reboot): the same id.
    let again = registry::register(&etcd, "10.0.0.5", &["vm-5".to_string()])
        .await
        .unwrap();
    let hosts = registry::hosts(&etcd).await.unwrap();
    let h5 = hosts.iter().find(|h| h.addr == "10.0.0.5").unwrap();
    assert_eq!(again.0, h5.id);
    // Another VM set on that address is another registration, with a fresh id.
    let other = registry::register(&etcd, "10.0.0.5", &["vm-5".to_string(), "x".to_string()])
        .await
        .unwrap();
    assert_eq!(other.0, 25);
    assert_eq!(registry::hosts(&etcd).await.unwrap().len(), 25);
    // An empty VM list is refused.
    assert!(matches!(
        registry::register(&etcd, "10.0.0.9", &[]).await,
        Err(ControlError::InvalidConfig { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_makes_the_host_reconnecting_then_failed() {
    let Some((_c, cfg)) = cluster().await else {
        return;
    };
    let etcd = Etcd::connect(&cfg).await.unwrap();
    let a = registry::register(&etcd, "a", &["vm-a".into()])
        .await
        .unwrap();
    let b = registry::register(&etcd, "b", &["vm-b".into()])
        .await
        .unwrap();
    let ttl = Duration::from_secs(1);
    let la = Lease::start(
        &etcd,
        ttl,
        Some(&format!("alive/{}", a.0)),
        b"1".to_vec(),
        true,
    )
    .await
    .unwrap();
    let lb = Lease::start(
        &etcd,
        ttl,
        Some(&format!("alive/{}", b.0)),
        b"2".to_vec(),
        true,
    )
    .await
    .unwrap();
    let mut m = HostMonitor::new(LivenessTimeouts {
        silence: Duration::from_millis(600),
        failed_after: Duration::from_secs(2),
    });
    let registered = [a, b];
    let mut seen_b = Vec::new();
    // Host b is switched off: its lease is no longer renewed.
    lb.abandon();
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        let alive = registry::alive(&etcd).await.unwrap();
        for ch in m.observe(Instant::now(), &registered, &alive) {
            assert_eq!(ch.host, b, "the live host changed state: {ch:?}");
            seen_b.push(ch.state);
        }
        if m.state(b) == Some(State::Failed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(seen_b, [State::Reconnecting, State::Failed]);
    assert_eq!(
        m.state(a),
        Some(State::Deployed),
        "the live host stays Deployed"
    );
    la.revoke(&etcd).await;
    // Negative control: the monitor does report a live host as silent when nobody
    // observes it alive.
    let mut m2 = HostMonitor::new(LivenessTimeouts::default());
    let t0 = Instant::now();
    m2.observe(t0, &[a], &[a]);
    m2.observe(t0 + Duration::from_secs(5), &[a], &[]);
    assert_eq!(m2.state(a), Some(State::Reconnecting));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_lost_its_role_is_fenced_and_ids_are_never_recorded_twice() {
    let Some((_c, cfg)) = cluster().await else {
        return;
    };
    let etcd = Etcd::connect(&cfg).await.unwrap();
    let stop = CancellationToken::new();
    let ttl = Duration::from_secs(1);
    let a = election::campaign(&etcd, info("a", 9001), ttl, &stop)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        election::current_leader(&etcd)
            .await
            .unwrap()
            .unwrap()
            .candidate,
        "a"
    );
    // A reserves gs 1 and records it complete, then reserves gs 2 (in flight).
    let mut cat_a = Catalog::new(CLUSTER);
    let store_a = EtcdCatalog::new(etcd.clone(), &a, &cat_a);
    cat_a.last_started = Some(GlobalSnapshotId(1));
    store_a.save(&cat_a).await.unwrap();
    cat_a
        .completed
        .insert(GlobalSnapshotId(1), completed(1, &[0, 1, 2]));
    store_a.save(&cat_a).await.unwrap();
    cat_a.last_started = Some(GlobalSnapshotId(2));
    store_a.save(&cat_a).await.unwrap();

    // B campaigns; A's host freezes (its lease is no longer renewed): B wins after the TTL.
    let etcd_b = etcd.clone();
    let stop_b = stop.clone();
    let b = tokio::spawn(async move {
        election::campaign(&etcd_b, info("b", 9002), ttl, &stop_b)
            .await
            .unwrap()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_finished(), "B cannot win while A holds the role");
    let a_revision = a.revision();
    drop(a); // the lease keeper stops; the lease expires by itself
    let b = tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .expect("B is elected within the TTL and a bit")
        .unwrap();
    assert!(b.revision() > a_revision);
    // B reads the catalog: gs 1 complete, gs 2 was in flight and is failed.
    let cat_b = catalog::load(&etcd).await.unwrap();
    assert_eq!(
        cat_b.completed.keys().copied().collect::<Vec<_>>(),
        [GlobalSnapshotId(1)]
    );
    assert_eq!(cat_b.last_started, Some(GlobalSnapshotId(2)));
    assert_eq!(cat_b.next_gs(), GlobalSnapshotId(3));

    // A comes back and tries to record gs 2 as complete: fenced, nothing written.
    cat_a
        .completed
        .insert(GlobalSnapshotId(2), completed(2, &[0, 1, 2]));
    let err = store_a.save(&cat_a).await.unwrap_err();
    assert!(err.is_fenced(), "{err}");
    // … nor can it reserve a new id.
    cat_a.last_started = Some(GlobalSnapshotId(3));
    assert!(store_a.save(&cat_a).await.unwrap_err().is_fenced());
    assert_eq!(catalog::load(&etcd).await.unwrap(), cat_b);

    // B records gs 3.
    let store_b = EtcdCatalog::new(etcd.clone(), &b, &cat_b);
    let mut cb = cat_b.clone();
    cb.last_started = Some(GlobalSnapshotId(3));
    cb.completed
        .insert(GlobalSnapshotId(3), completed(3, &[0, 1]));
    store_b.save(&cb).await.unwrap();
    // A repeated write (a request retried after its answer was lost) finds its own
    // record and succeeds without writing it again …
    let forgetful = EtcdCatalog::new(etcd.clone(), &b, &cat_b);
    forgetful.save(&cb).await.unwrap();
    // … but a different record under that id is refused.
    let mut other = cat_b.clone();
    other.last_started = Some(GlobalSnapshotId(3));
    other
        .completed
        .insert(GlobalSnapshotId(3), completed(3, &[0, 1, 2]));
    let forgetful = EtcdCatalog::new(etcd.clone(), &b, &cat_b);
    assert!(matches!(
        forgetful.save(&other).await,
        Err(ControlError::AlreadyExists { .. })
    ));
    let ids: Vec<u64> = catalog::recorded(&etcd)
        .await
        .unwrap()
        .iter()
        .map(|r| r.snapshot.gs.0)
        .collect();
    assert_eq!(ids, [1, 3]);
    let csv = catalog::times_csv(&etcd).await.unwrap();
    assert!(csv.starts_with("global_snapshot,participant,local_time_s,global_time_s\n"));
    assert_eq!(csv.lines().count(), 1 + 3 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_survives_the_loss_of_the_etcd_leader() {
    let Some((c, cfg)) = cluster().await else {
        return;
    };
    let etcd = Etcd::connect(&cfg).await.unwrap();
    let id = registry::register(&etcd, "a", &["vm".into()])
        .await
        .unwrap();
    let lease = Lease::start(
        &etcd,
        Duration::from_secs(2),
        Some(&format!("alive/{}", id.0)),
        b"1".to_vec(),
        true,
    )
    .await
    .unwrap();
    let leader = c.leader().await.expect("a leader");
    assert!(c.kill(leader).is_some());
    // Registrations and reads go on through the other two members, within a bound.
    let id2 = eventually(Duration::from_secs(15), || {
        let etcd = etcd.clone();
        async move { registry::register(&etcd, "b", &["vm".into()]).await.ok() }
    })
    .await
    .expect("registration works again after the etcd leader died");
    assert_eq!(id2.0, id.0 + 1);
    let new_leader = eventually(Duration::from_secs(10), || c.leader()).await;
    assert!(new_leader.is_some_and(|l| l != leader));
    // The first host's lease was kept alive across the fail-over.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(registry::alive(&etcd).await.unwrap().contains(&id));
    lease.revoke(&etcd).await;
}

/// Waits for the next `CandidateEvent` satisfying `f`.
async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<(usize, CandidateEvent)>,
    bound: Duration,
    mut f: impl FnMut(usize, &CandidateEvent) -> bool,
) -> Option<(usize, CandidateEvent)> {
    let until = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some((i, e))) if f(i, &e) => return Some((i, e)),
            Ok(Some(_)) => {}
            _ => return None,
        }
    }
}

/// Triggers global snapshots through etcd until one completes (participants may still be
/// connecting, or the role moving): its id, or `None` after `bound`. With `from`, only a
/// completion by that candidate counts.
async fn snapshot_via_etcd(
    etcd: &Etcd,
    rx: &mut mpsc::UnboundedReceiver<(usize, CandidateEvent)>,
    from: Option<usize>,
    bound: Duration,
) -> Option<u64> {
    let until = Instant::now() + bound;
    while Instant::now() < until {
        catalog::put_trigger(etcd, &Trigger::GlobalSnapshot)
            .await
            .ok()?;
        let got = wait_for(rx, Duration::from_secs(6), |i, e| {
            (agent::completed_gs(e).is_some() && from.map_or(true, |f| f == i))
                || matches!(
                    e,
                    CandidateEvent::Node(NodeEvent::Protocol(
                        ProtocolEvent::GlobalSnapshotFailed { .. }
                    ))
                )
        })
        .await;
        if let Some(gs) = got.and_then(|(_, e)| agent::completed_gs(&e)) {
            return Some(gs.0);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_snapshots_continue_after_the_coordinator_dies() {
    let Some((_c, cfg)) = cluster().await else {
        return;
    };
    let etcd = Etcd::connect(&cfg).await.unwrap();
    let t = Timeouts {
        precheck: Duration::from_secs(3),
        snapshot: Duration::from_secs(3),
        ..Timeouts::default()
    };
    let transport = TransportConfig::new(CLUSTER, None);
    let mut hosts = Vec::new();
    for i in 0..3 {
        let hc = HostAgentConfig {
            etcd: cfg.clone(),
            addr: format!("host-{i}"),
            vms: vec![format!("vm-{i}")],
            lease_ttl: Duration::from_secs(1),
            timeouts: t,
        };
        hosts.push(
            HostAgent::start(hc, transport.clone(), Arc::new(NoVmsHost))
                .await
                .unwrap(),
        );
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut candidates = Vec::new();
    for i in 0..2usize {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = listener.local_addr().unwrap();
        drop(listener);
        let cc = CandidateConfig {
            etcd: cfg.clone(),
            name: format!("candidate-{i}"),
            listen,
            lease_ttl: Duration::from_secs(1),
            timeouts: t,
        };
        let (etx, mut erx) = mpsc::unbounded_channel();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(e) = erx.recv().await {
                let _ = tx.send((i, e));
            }
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(agent::run_candidate(
            cc,
            transport.clone(),
            stop.clone(),
            etx,
        ));
        candidates.push((task, stop));
    }
    let (first, _) = wait_for(&mut rx, Duration::from_secs(10), |_, e| {
        matches!(e, CandidateEvent::Elected { .. })
    })
    .await
    .expect("one candidate is elected");
    let mut done = Vec::new();
    for _ in 0..2 {
        let gs = snapshot_via_etcd(&etcd, &mut rx, None, Duration::from_secs(20))
            .await
            .expect("a global snapshot completes");
        done.push(gs);
    }
    // The coordinator dies (its task is gone; its lease expires by itself).
    candidates[first].0.abort();
    let (second, ev) = wait_for(&mut rx, Duration::from_secs(10), |_, e| {
        matches!(e, CandidateEvent::Elected { .. })
    })
    .await
    .expect("the other candidate takes over");
    assert_ne!(second, first);
    let CandidateEvent::Elected { participants, .. } = ev else {
        unreachable!()
    };
    assert_eq!(participants.len(), 3);
    let gs = snapshot_via_etcd(&etcd, &mut rx, Some(second), Duration::from_secs(30))
        .await
        .expect("the new coordinator completes a global snapshot");
    done.push(gs);
    let recorded: Vec<u64> = catalog::recorded(&etcd)
        .await
        .unwrap()
        .iter()
        .map(|r| r.snapshot.gs.0)
        .collect();
    assert_eq!(recorded, done, "every completed id recorded once, in order");
    assert!(done.windows(2).all(|w| w[0] < w[1]));
    for (task, stop) in candidates {
        stop.cancel();
        let _ = task.await;
    }
    for h in hosts {
        h.stop().await;
    }
}

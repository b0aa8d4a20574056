//! The RCPBT ring across network namespaces with real global snapshots: real TCP, real
//! netfilter rules, real SIGSTOP/SIGCONT. Needs root; skips with a printed reason
//! otherwise. The default backend (nft-netlink) runs every scenario; the nft session and
//! iptables backends run them too.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::path::PathBuf;
use std::time::Duration;

use unacloud_snapshot::net::daemon::BackendKind;
use unacloud_snapshot::net::ring::{run_ring_netns, CrashSpec, RingNetnsConfig};
use unacloud_snapshot::netns;

fn privileged() -> bool {
    match netns::probe() {
        Ok(()) => true,
        Err(e) => {
            skip::skipped(e);
            false
        }
    }
}

fn config(peers: u32, tokens: u64, snapshots: u32, delay_ms: u64) -> RingNetnsConfig {
    let mut c = RingNetnsConfig::new(
        peers,
        tokens,
        snapshots,
        PathBuf::from(env!("CARGO_BIN_EXE_unacloud-gs")),
        Vec::new(),
    );
    c.snapshot_delay = Duration::from_millis(delay_ms);
    c.snapshot_timeout = Duration::from_secs(2);
    c.deadline = Duration::from_secs(60);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_completes_with_snapshots_and_leaves_nothing() {
    if !privileged() {
        return;
    }
    let cfg = config(4, 20_000, 4, 40);
    assert_eq!(cfg.backend, BackendKind::NftNetlink, "the default");
    let r = run_ring_netns(cfg).await.unwrap();
    eprintln!("{}", r.human_summary());
    assert_eq!(r.tokens_counted, 20_000, "{r:?}");
    assert_eq!(r.global_snapshots_completed, 4, "{r:?}");
    assert_eq!(r.global_snapshots_failed, 0, "{r:?}");
    assert_eq!(r.rules_left, 0);
    assert_eq!(r.namespaces_left, 0);
    assert!(
        r.post_packets_dropped > 0,
        "no POST packet was dropped: {r:?}"
    );
    for (g, l) in r.global_ms.iter().zip(&r.local_ms) {
        assert!(g >= l, "global {g} < local {l}");
        assert!(*l >= 40.0, "local snapshot shorter than the freeze: {l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_dying_mid_snapshot_fails_it_cleanly() {
    if !privileged() {
        return;
    }
    let mut cfg = config(4, 20_000, 1, 20);
    cfg.crash = Some(CrashSpec {
        namespace: 2,
        after_step: 2,
    });
    let r = run_ring_netns(cfg).await.unwrap();
    eprintln!("{}", r.human_summary());
    assert_eq!(r.global_snapshots_completed, 0, "{r:?}");
    assert_eq!(r.global_snapshots_failed, 1, "{r:?}");
    assert!(r.failures[0].contains("no answer"), "{:?}", r.failures);
    assert_eq!(r.survivors_cleared_in_time, Some(true), "{r:?}");
    assert_eq!(r.tokens_counted, 20_000, "{r:?}");
    assert_eq!(r.rules_left, 0);
    assert_eq!(r.namespaces_left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_backend_runs_the_same_scenario() {
    if !privileged() {
        return;
    }
    let mut cfg = config(3, 20_000, 1, 20);
    cfg.backend = BackendKind::Iptables;
    let r = run_ring_netns(cfg).await.unwrap();
    eprintln!("{}", r.human_summary());
    assert_eq!(r.tokens_counted, 20_000, "{r:?}");
    assert_eq!(r.global_snapshots_completed, 1, "{r:?}");
    assert_eq!(r.rules_left, 0);
    assert_eq!(r.namespaces_left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_session_backend_runs_the_same_scenarios() {
    if !privileged() {
        return;
    }
    let mut cfg = config(4, 20_000, 4, 40);
    cfg.backend = BackendKind::NftSession;
    let r = run_ring_netns(cfg).await.unwrap();
    eprintln!("{}", r.human_summary());
    assert_eq!(r.tokens_counted, 20_000, "{r:?}");
    assert_eq!(r.global_snapshots_completed, 4, "{r:?}");
    assert_eq!(r.global_snapshots_failed, 0, "{r:?}");
    assert_eq!(r.rules_left, 0);
    assert_eq!(r.namespaces_left, 0);
    assert!(
        r.post_packets_dropped > 0,
        "no POST packet was dropped: {r:?}"
    );

    let mut cfg = config(4, 20_000, 1, 20);
    cfg.backend = BackendKind::NftSession;
    cfg.crash = Some(CrashSpec {
        namespace: 2,
        after_step: 2,
    });
    let r = run_ring_netns(cfg).await.unwrap();
    eprintln!("{}", r.human_summary());
    assert_eq!(r.global_snapshots_completed, 0, "{r:?}");
    assert_eq!(r.global_snapshots_failed, 1, "{r:?}");
    assert_eq!(r.survivors_cleared_in_time, Some(true), "{r:?}");
    assert_eq!(r.tokens_counted, 20_000, "{r:?}");
    assert_eq!(r.rules_left, 0);
    assert_eq!(r.namespaces_left, 0);
}

/// The control plane on etcd: the lab's own 3-member etcd cluster; the coordinator's
/// process is SIGKILLed after the first global snapshot and the etcd leader after the
/// second. The ring's tokens stay exact, snapshots go on, the catalog in etcd holds
/// exactly the completed ids, and nothing is left (etcd processes, data directories,
/// namespaces, rules).
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_control_plane_survives_the_coordinator_and_the_etcd_leader() {
    use unacloud_snapshot::net::ring::EtcdLabConfig;
    if !privileged() {
        return;
    }
    if !unacloud_snapshot::control::cluster::etcd_available() {
        skip::skipped("the etcd program is not installed (scripts/setup installs etcd-server)");
        return;
    }
    let mut cfg = config(4, 20_000, 4, 20);
    let mut e = EtcdLabConfig::new(3);
    e.kill_coordinator_after = Some(1);
    e.kill_etcd_leader_after = Some(2);
    cfg.etcd = Some(e);
    let r = run_ring_netns(cfg).await.unwrap();
    eprintln!("{}", r.json_summary());
    let e = r.etcd.clone().unwrap();
    assert_eq!(r.tokens_counted, 20_000, "{r:?}");
    assert_eq!(r.global_snapshots_completed, 4, "{r:?}");
    assert_eq!(e.coordinator_failovers, 1, "{e:?}");
    assert_eq!(e.etcd_leader_kills, 1, "{e:?}");
    assert_eq!(e.catalog_in_etcd, e.completed_ids, "{e:?}");
    assert!(e.completed_ids.windows(2).all(|w| w[0] < w[1]), "{e:?}");
    assert_eq!(e.etcd_processes_left, 0);
    assert!(e.etcd_dirs_removed);
    assert_eq!(r.rules_left, 0);
    assert_eq!(r.namespaces_left, 0);
    let json = r.json_summary();
    for k in [
        "coordinator_failovers",
        "etcd_leader_kills",
        "completed_ids",
        "catalog_in_etcd",
    ] {
        assert!(json.get(k).is_some(), "{k} missing from {json}");
    }
}

//! The resume protocol and coordinator restarts, driven by hand.
#![allow(clippy::unwrap_used)]

mod protocol_support;

use std::time::Duration;

use protocol_support::*;
use unacloud_snapshot::catalog_store::{self, CatalogStore};
use unacloud_snapshot::protocol::*;

fn p(id: u32) -> ParticipantId {
    ParticipantId(id)
}

fn resumed(c: &Cluster) -> Vec<GlobalSnapshotId> {
    c.coordinator_events()
        .into_iter()
        .filter_map(|e| match e {
            ProtocolEvent::ResumeCompleted { gs } => Some(gs),
            _ => None,
        })
        .collect()
}

#[test]
fn a_resume_costs_six_n_minus_one_messages_and_restores_the_latest_complete_snapshot() {
    for n in [1u32, 2, 4, 33] {
        let mut c = Cluster::new(n);
        c.coord.start_global_snapshot(c.now).unwrap();
        c.drive();
        let gs2 = c.coord.start_global_snapshot(c.now).unwrap();
        c.drive();
        let before = c.messages;
        let gs = c.coord.start_resume(c.now, None).unwrap();
        assert_eq!(gs, gs2, "default is the latest complete one");
        c.drive();
        let m = (n - 1) as usize;
        assert_eq!(c.messages - before, 6 * m, "n = {n}");
        for kind in [
            "POLL",
            "POLL_OK",
            "RESTORE",
            "RESTORE_OK",
            "START",
            "START_OK",
        ] {
            assert_eq!(c.count_kind(kind), m, "{kind}");
        }
        assert_eq!(resumed(&c), vec![gs2]);
        for h in 0..n {
            let acts = c.actions_of(p(h));
            let tail = &acts[acts.len() - 2..];
            assert_eq!(
                tail,
                &[
                    HostAction::RestoreLocal {
                        gs: gs2,
                        vms: vms_of(h)
                    },
                    HostAction::StartVms { vms: vms_of(h) }
                ],
                "host {h}"
            );
        }
    }
}

#[test]
fn resume_from_an_explicit_older_snapshot() {
    let mut c = Cluster::new(3);
    let gs1 = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    assert_eq!(c.coord.start_resume(c.now, Some(gs1)).unwrap(), gs1);
    c.drive();
    assert_eq!(resumed(&c), vec![gs1]);
    assert!(c
        .actions
        .iter()
        .any(|(_, a)| matches!(a, HostAction::RestoreLocal { gs, .. } if *gs == gs1)));
}

#[test]
fn poll_is_repeated_until_every_participant_answers() {
    let mut c = Cluster::new(4);
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    // Host 2 is powered off while the others come back.
    c.down.insert(p(2));
    c.coord.start_resume(c.now, None).unwrap();
    c.drive();
    assert_eq!(
        c.count_kind("RESTORE"),
        0,
        "RESTORE waits for every POLL_OK"
    );
    for _ in 0..3 {
        c.advance(Duration::from_secs(1));
        c.drive();
    }
    // 1 + 3 POLLs to host 2, one each to the others.
    let polls_to_2 = c
        .transmitted
        .iter()
        .filter(|e| e.to == p(2) && e.message.kind() == "POLL")
        .count();
    assert_eq!(polls_to_2, 4);
    assert_eq!(c.count_kind("POLL"), 6);
    c.down.clear();
    c.advance(Duration::from_secs(1));
    c.drive();
    assert_eq!(resumed(&c), vec![gs]);
    assert!(c
        .coordinator_events()
        .iter()
        .any(|e| matches!(e, ProtocolEvent::PollCompleted { rounds: 5, .. })));
}

#[test]
fn a_participant_that_cannot_restore_fails_the_resume() {
    let mut c = Cluster::new(3);
    c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    c.hold.insert(p(1));
    let gs = c.coord.start_resume(c.now, None).unwrap();
    c.drive();
    let a = c.take_pending(p(1));
    assert!(matches!(a.action, HostAction::RestoreLocal { .. }));
    c.complete(a, ActionOutcome::Failed("snapshot file missing".into()));
    c.drive();
    let failed: Vec<_> = c
        .coordinator_events()
        .into_iter()
        .filter_map(|e| match e {
            ProtocolEvent::ResumeFailed { gs, who, why } => Some((gs, who, why)),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0].0, failed[0].1.clone()), (gs, vec![p(1)]));
    assert_eq!(c.count_kind("START"), 0);
    assert!(c.coord.running().is_none());
}

#[test]
fn a_silent_participant_in_the_restore_phase_fails_the_resume_at_the_deadline() {
    let mut c = Cluster::new(3);
    c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    c.hold.insert(p(2));
    c.coord.start_resume(c.now, None).unwrap();
    c.drive();
    c.down.insert(p(2));
    c.advance(Duration::from_secs(301));
    c.drive();
    assert!(c.coordinator_events().iter().any(|e| matches!(
        e,
        ProtocolEvent::ResumeFailed { who, why: FailureReason::Timeout { phase, .. }, .. }
            if who == &vec![p(2)] && phase == "restore"
    )));
}

#[test]
fn late_answers_of_an_earlier_resume_attempt_are_ignored() {
    let mut c = Cluster::new(2);
    c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    c.down.insert(p(1));
    let gs = c.coord.start_resume(c.now, None).unwrap();
    c.collect();
    // Give up on attempt 1 by failing it from the participant side.
    let a1 = ResumeAttempt(1);
    c.deliver(Envelope::new(
        CLUSTER,
        p(1),
        p(0),
        Message::ResumeFailed {
            gs,
            attempt: a1,
            reason: "x".into(),
        },
    ));
    c.down.clear();
    c.coord.start_resume(c.now, None).unwrap();
    c.collect();
    // A late RESTORE_OK of attempt 1 does not count for attempt 2 (which is polling).
    c.deliver(Envelope::new(
        CLUSTER,
        p(1),
        p(0),
        Message::RestoreOk { gs, attempt: a1 },
    ));
    c.deliver(Envelope::new(
        CLUSTER,
        p(1),
        p(0),
        Message::StartOk { gs, attempt: a1 },
    ));
    c.drive();
    assert_eq!(resumed(&c), vec![gs]);
    assert_eq!(c.count_kind("RESTORE"), 1, "only attempt 2 restored");
}

#[test]
fn nothing_to_resume_is_a_typed_error() {
    let mut c = Cluster::new(2);
    assert!(matches!(
        c.coord.start_resume(c.now, None),
        Err(Error::NoRestorableSnapshot)
    ));
    let err = c
        .coord
        .start_resume(c.now, Some(GlobalSnapshotId(3)))
        .unwrap_err();
    assert!(matches!(
        err,
        Error::SnapshotNotRestorable {
            gs: GlobalSnapshotId(3),
            ..
        }
    ));
}

#[test]
fn a_restarted_coordinator_recovers_the_catalog_and_never_reuses_an_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let store = CatalogStore::new(dir.path().join("catalog.json"));
    let mut c = Cluster::with_catalog(3, store.load_or_new(CLUSTER).unwrap());
    let gs1 = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    store.save(c.coord.catalog()).unwrap();
    // gs2 starts (catalog saved on GlobalSnapshotStarted), then the coordinator crashes.
    let gs2 = c.coord.start_global_snapshot(c.now).unwrap();
    store.save(c.coord.catalog()).unwrap();
    drop(c);

    let catalog = store.load().unwrap().unwrap();
    assert_eq!(catalog.completed_ids(), vec![gs1]);
    assert_eq!(catalog.last_started, Some(gs2));
    let mut c = Cluster::with_catalog(3, catalog);
    // Participants of the new cluster value saw gs2's PRECHECK? They are fresh here; the new
    // coordinator's epoch is beyond gs2 anyway.
    let gs3 = c.coord.start_global_snapshot(c.now).unwrap();
    assert!(gs3 > gs2);
    c.drive();
    assert_eq!(c.completed(), vec![gs3]);
    assert_eq!(c.coord.start_resume(c.now, None).unwrap(), gs3);
    c.drive();
    assert!(matches!(
        c.coord.start_resume(c.now, Some(gs2)),
        Err(Error::SnapshotNotRestorable { .. })
    ));
}

#[test]
fn the_catalog_file_is_replaced_atomically_and_corruption_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.json");
    let store = CatalogStore::new(&path);
    assert!(store.load().unwrap().is_none());
    let mut cat = Catalog::new(CLUSTER);
    cat.last_started = Some(GlobalSnapshotId(9));
    store.save(&cat).unwrap();
    store.save(&cat).unwrap();
    assert_eq!(store.load().unwrap(), Some(cat.clone()));
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("catalog.json")]);
    // Another cluster's catalog is refused.
    assert!(matches!(
        store.load_or_new(ClusterId(1)),
        Err(catalog_store::Error::ForeignCluster { .. })
    ));
    // A torn or foreign file is a typed error naming the path.
    std::fs::write(&path, b"{\"format\": 1, \"clus").unwrap();
    let err = store.load().unwrap_err();
    assert!(matches!(&err, catalog_store::Error::Corrupt { path: p, .. } if p == &path));
    // Saving into a missing directory fails cleanly.
    let bad = CatalogStore::new(dir.path().join("missing/catalog.json"));
    assert!(matches!(
        bad.save(&cat),
        Err(catalog_store::Error::Io { .. })
    ));
}

#[test]
fn the_catalog_round_trips_through_json_with_completed_snapshots() {
    let mut c = Cluster::new(4);
    for _ in 0..3 {
        c.coord.start_global_snapshot(c.now).unwrap();
        c.drive();
    }
    let cat = c.coord.catalog().clone();
    let back = Catalog::from_json(&cat.to_json()).unwrap();
    assert_eq!(back, cat);
    assert_eq!(back.completed.len(), 3);
    assert_eq!(back.latest().unwrap().participants.len(), 4);
}

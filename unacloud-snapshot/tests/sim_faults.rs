//! Property 5: a host dies in the middle of a global snapshot. The snapshot fails cleanly,
//! every surviving host is back in the idle state (no colour, only POST datagrams dropped)
//! within the protocol's deadlines,
//! the ring resumes from the previous snapshot, and the next global snapshot succeeds.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proptest::prelude::*;
use unacloud_snapshot::protocol::{Colour, GlobalSnapshotId};
use unacloud_snapshot::sim::{Cluster, Host, RingConfig, RingReport};

/// How far the victim got in the six steps when it lost power.
fn reached(h: &Host, stage: u8) -> bool {
    match stage {
        0 => true,
        1 => h.outgoing == Some(Colour::Pre),
        // Step 2 re-installs the idle drop rule: indistinguishable from step 1.
        2 => h.outgoing == Some(Colour::Pre) && h.drop_incoming.is_some(),
        3 => h.frozen,
        _ => h.outgoing == Some(Colour::Post),
    }
}

/// The idle state: no colour, only POST dropped, the VM not paused.
fn clean(h: &Host) -> bool {
    h.outgoing.is_none() && h.drop_incoming == Some(Colour::Post) && !h.frozen
}

fn sent_by_initiator(c: &Cluster) -> u64 {
    c.hosts()[0].vm.as_ref().map_or(0, |vm| vm.app.sent)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn a_host_dying_mid_snapshot_fails_it_cleanly_and_the_next_one_succeeds(
        nodes in 3usize..=6,
        victim_pick in any::<usize>(),
        stage in 0u8..=4,
        seed in any::<u64>(),
        unequal in any::<bool>(),
    ) {
        let victim = victim_pick % nodes;
        let cfg = RingConfig {
            nodes,
            tokens: 3000,
            snapshot_every: 0,
            seed,
            local_snapshot_min: Duration::from_millis(2),
            local_snapshot_max: Duration::from_millis(if unequal { 5 } else { 2 }),
            ..RingConfig::default()
        };
        let timeouts = cfg.timeouts;
        let mut c = Cluster::new(cfg).unwrap();

        // A first, complete global snapshot to resume from.
        c.drive_until(50_000, |c| sent_by_initiator(c) >= 10).unwrap();
        let first = c.trigger_global_snapshot().unwrap();
        c.drive_until(50_000, |c| c.records()[&first.0].completed.is_some()).unwrap();

        // The second one loses a host.
        c.drive_until(50_000, |c| sent_by_initiator(c) >= 40).unwrap();
        let doomed = c.trigger_global_snapshot().unwrap();
        let triggered = c.now();
        c.drive_until(50_000, |c| reached(&c.hosts()[victim], stage)).unwrap();
        c.crash(victim);
        c.step().unwrap();
        prop_assert!(!c.hosts()[victim].up);

        // Every survivor removes its colour and filter within the protocol's deadlines.
        let deadline = timeouts.precheck + timeouts.snapshot + Duration::from_millis(5);
        c.drive_until(200_000, |c| {
            c.hosts().iter().filter(|h| h.id != victim).all(clean)
                && (victim == 0 || c.records()[&doomed.0].failure.is_some())
        })
        .unwrap();
        prop_assert!(c.now() - triggered <= deadline, "cleaned after {:?}", c.now() - triggered);
        let record = &c.records()[&doomed.0];
        prop_assert!(record.completed.is_none());
        if victim != 0 {
            let failure = record.failure.as_deref().unwrap();
            prop_assert!(failure.contains(&format!("#{victim}")), "{}", failure);
        }

        // The host comes back, everybody resumes from the first snapshot.
        c.power_on_after(victim, Duration::from_millis(1));
        c.request_resume(Some(first), Duration::from_millis(2));
        c.drive_until(200_000, |c| c.restored_from().is_some()).unwrap();
        prop_assert_eq!(c.restored_from(), Some(first.0));
        let catalog = c.catalog().unwrap();
        prop_assert!(!catalog.is_restorable(doomed), "a failed snapshot is never restorable");
        prop_assert!(catalog.is_restorable(first));

        // The next global snapshot succeeds and is consistent.
        c.drive_until(50_000, |c| sent_by_initiator(c) >= 30).unwrap();
        let next = c.trigger_global_snapshot().unwrap();
        prop_assert!(next > doomed);
        c.drive_until(50_000, |c| {
            let r = &c.records()[&next.0];
            r.completed.is_some() || r.failure.is_some()
        })
        .unwrap();
        let r = &c.records()[&next.0];
        prop_assert!(r.completed.is_some(), "{:?}", r.failure);
        prop_assert!(r.verdict.as_ref().unwrap().is_consistent());

        c.drive_bounded(500_000).unwrap();
        let report = RingReport::from_cluster(&c);
        prop_assert_eq!(report.tokens_final, 3000);
        prop_assert_eq!((report.lost, report.duplicated, report.violations), (0, 0, 0));
        prop_assert!(c.hosts().iter().all(clean));
    }
}

#[test]
fn a_second_trigger_while_one_runs_is_refused() {
    let mut c = Cluster::new(RingConfig {
        snapshot_every: 0,
        ..RingConfig::default()
    })
    .unwrap();
    c.drive_until(1_000, |c| sent_by_initiator(c) >= 5).unwrap();
    let gs = c.trigger_global_snapshot().unwrap();
    assert_eq!(c.trigger_global_snapshot(), None);
    assert_eq!(c.stats().triggers_refused, 1);
    c.drive_until(50_000, |c| c.records()[&gs.0].completed.is_some())
        .unwrap();
    assert_eq!(
        c.trigger_global_snapshot(),
        Some(GlobalSnapshotId(gs.0 + 1))
    );
}

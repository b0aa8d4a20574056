//! Live local snapshots have two moments: the snapshot point (the VMs' state is fixed, the
//! guests run on) and durability (the state is on disk). Steps 4 and 5 may follow the
//! point; DONE — and the coordinator's own part of completion — must wait for durability.
//! A driver that answers `SnapshotTaken` (point and durability together) never sees
//! `AwaitDurable`.
#![allow(clippy::unwrap_used)]

mod protocol_support;

use std::time::{Duration, Instant};

use proptest::prelude::*;
use protocol_support::*;
use unacloud_snapshot::protocol::*;

fn p(id: u32) -> ParticipantId {
    ParticipantId(id)
}

/// Completes `host`'s pending actions by rule until its next pending action is `until`
/// (left pending); panics if the cluster goes quiet first.
fn run_host_until(c: &mut Cluster, host: ParticipantId, until: &HostAction) {
    c.hold.insert(host);
    for _ in 0..100 {
        c.drive();
        let a = c.take_pending(host);
        if a.action == *until {
            c.pending.push_front(a);
            return;
        }
        let outcome = c.outcome_for(a.host, &a.action);
        c.complete(a, outcome);
    }
    panic!("{host:?} never reached {until:?}");
}

/// Replays a host's actions into the packet-filter state they leave behind:
/// (outgoing colour, dropping incoming POST). The idle state is `(None, true)`.
fn filter_state(actions: &[HostAction]) -> (Option<Colour>, bool) {
    let (mut colour, mut dropping) = (None, false);
    for a in actions {
        match a {
            HostAction::SetOutgoingColour(c) => colour = Some(*c),
            HostAction::DropIncoming(_) => dropping = true,
            HostAction::AcceptIncoming(_) => dropping = false,
            HostAction::ClearColour => colour = None,
            HostAction::ClearAll => (colour, dropping) = (None, false),
            _ => {}
        }
    }
    (colour, dropping)
}

fn done_from(c: &Cluster, host: ParticipantId) -> usize {
    c.transmitted
        .iter()
        .filter(|e| e.from == host && matches!(e.message, Message::Done { .. }))
        .count()
}

#[test]
fn a_driver_answering_snapshot_taken_never_sees_await_durable() {
    let mut c = Cluster::new(4);
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    assert_eq!(c.completed(), vec![gs]);
    assert!(c
        .actions
        .iter()
        .all(|(_, a)| !matches!(a, HostAction::AwaitDurable { .. })));
}

#[test]
fn after_the_point_steps_4_and_5_run_and_done_waits_for_durability() {
    let mut c = Cluster::new(3);
    c.live.insert(p(1));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.collect();
    run_host_until(&mut c, p(1), &await_durable(gs, 1));
    // The point is taken and POST colouring has started (steps 4 and 5), but DONE waits.
    let acts = c.actions_of(p(1));
    assert_eq!(
        &acts[acts.len() - 3..],
        &[
            HostAction::SetOutgoingColour(Colour::Post),
            HostAction::AcceptIncoming(Colour::Post),
            await_durable(gs, 1),
        ]
    );
    assert!(c.participant(p(1)).may_filter());
    assert_eq!(done_from(&c, p(1)), 0, "no DONE before durability");
    assert!(c.completed().is_empty());
    // Durable: DONE (with the point's time), then completion.
    let a = c.take_pending(p(1));
    c.complete(
        a,
        ActionOutcome::SnapshotDurable {
            total_time: Duration::from_millis(4000),
        },
    );
    c.hold.clear();
    c.drive();
    assert_eq!(done_from(&c, p(1)), 1);
    assert_eq!(c.completed(), vec![gs]);
    let done_time = c.transmitted.iter().find_map(|e| match e.message {
        Message::Done { local_time, .. } if e.from == p(1) => Some(local_time),
        _ => None,
    });
    assert_eq!(done_time, Some(Duration::from_millis(1001)));
    let ev = c.events.iter().find_map(|(h, e)| match e {
        ProtocolEvent::LocalSnapshotCompleted {
            gs: g,
            local_time,
            total_time,
        } if *h == p(1) && *g == gs => Some((*local_time, *total_time)),
        _ => None,
    });
    assert_eq!(
        ev,
        Some((Duration::from_millis(1001), Duration::from_millis(4000))),
        "the event reports both moments"
    );
    // A SnapshotTaken host's event: durability coincides with the point.
    let ev2 = c.events.iter().find_map(|(h, e)| match e {
        ProtocolEvent::LocalSnapshotCompleted {
            local_time,
            total_time,
            ..
        } if *h == p(2) => Some((*local_time, *total_time)),
        _ => None,
    });
    assert_eq!(
        ev2,
        Some((Duration::from_millis(1002), Duration::from_millis(1002)))
    );
}

#[test]
fn every_live_host_waits_for_durability_between_step_5_and_done_at_the_same_message_cost() {
    for n in [1u32, 2, 4, 9] {
        let mut c = Cluster::new(n);
        c.live = (0..n).map(ParticipantId).collect();
        let gs = c.coord.start_global_snapshot(c.now).unwrap();
        c.drive();
        assert_eq!(c.completed(), vec![gs], "n = {n}");
        // AwaitDurable is a host action, not a message: 5(N−1) as before.
        assert_eq!(c.messages, 5 * (n as usize - 1), "n = {n}");
        for h in 0..n {
            let mut expected = vec![idle_drop()];
            expected.extend(live_snapshot_actions(gs, h));
            assert_eq!(c.actions_of(p(h)), expected, "host {h}");
            if h > 0 {
                let log = log_of(&c, p(h));
                let durable = position(&log, "complete await durability").unwrap();
                let done = position(&log, "send DONE").unwrap();
                assert!(durable < done, "host {h}: {log:?}");
            }
        }
        // The catalog records the times of the points.
        let entry = c.coord.catalog().get(gs).unwrap();
        for lt in &entry.local_times {
            assert_eq!(
                lt.local_time,
                Duration::from_millis(1000 + u64::from(lt.participant.0))
            );
        }
    }
}

#[test]
fn completion_waits_for_the_coordinators_own_durability() {
    let mut c = Cluster::new(3);
    c.live.insert(p(0));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.collect();
    run_host_until(&mut c, p(0), &await_durable(gs, 0));
    c.drive();
    assert_eq!(c.count_kind("DONE"), 2, "every DONE is in");
    assert!(
        c.completed().is_empty(),
        "own local snapshot not durable yet"
    );
    assert_eq!(c.count_kind("RELEASE"), 0);
    c.hold.clear();
    c.drive();
    assert_eq!(c.completed(), vec![gs]);
    let log = log_of(&c, p(0));
    assert!(
        position(&log, "complete await durability").unwrap()
            < position(&log, "event GlobalSnapshotCompleted").unwrap()
    );
}

#[test]
fn a_participant_whose_snapshot_never_becomes_durable_fails_the_global_snapshot() {
    let mut c = Cluster::new(4);
    c.live = [p(1), p(2)].into();
    c.durable_fails.insert(p(2));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    assert!(c.completed().is_empty());
    let failed = c.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0].0, failed[0].1.clone()), (gs, vec![p(2)]));
    assert!(
        matches!(&failed[0].2, FailureReason::ActionFailed { detail } if detail.contains("durable") && detail.contains("write error")),
        "{:?}",
        failed[0].2
    );
    assert!(!c.coord.catalog().is_restorable(gs));
    assert_eq!(done_from(&c, p(2)), 0);
    assert_eq!(c.count_kind("SNAPSHOT_FAILED"), 1);
    assert_eq!(c.count_kind("ABORT"), 3);
    assert_eq!(c.count_kind("RELEASE"), 0);
    let p2 = c.actions_of(p(2));
    assert_eq!(p2[p2.len() - 2], HostAction::ClearAll);
    assert!(c.events.iter().any(|(h, e)| *h == p(2)
        && matches!(e, ProtocolEvent::LocalSnapshotAbandoned { gs: g, .. } if *g == gs)));
    for h in 0..4 {
        assert!(ends_idle(&c.actions_of(p(h))), "host {h}");
        if h > 0 {
            assert!(!c.participant(p(h)).may_filter());
        }
    }
    assert!(matches!(
        c.coord.start_resume(c.now, None),
        Err(unacloud_snapshot::protocol::Error::NoRestorableSnapshot)
    ));
}

#[test]
fn the_coordinators_own_failed_durability_aborts_and_clears_its_host() {
    let mut c = Cluster::new(3);
    c.live.insert(p(0));
    c.durable_fails.insert(p(0));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    let failed = c.failed();
    assert_eq!((failed[0].0, failed[0].1.clone()), (gs, vec![p(0)]));
    assert!(!c.coord.catalog().is_restorable(gs));
    let acts = c.actions_of(p(0));
    assert_eq!(acts[acts.len() - 2], HostAction::ClearAll);
    assert!(ends_idle(&acts));
    assert_eq!(c.count_kind("ABORT"), 2);
    // The next one, durable this time, completes.
    c.durable_fails.clear();
    let gs2 = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    assert_eq!(c.completed(), vec![gs2]);
}

#[test]
fn durability_that_never_comes_fails_the_global_snapshot_at_the_deadline() {
    let mut c = Cluster::new(3);
    c.live.insert(p(1));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.collect();
    run_host_until(&mut c, p(1), &await_durable(gs, 1));
    c.drive();
    assert!(c.completed().is_empty());
    c.advance(Timeouts::default().snapshot + Duration::from_secs(1));
    c.drive();
    let failed = c.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0].0, failed[0].1.clone()), (gs, vec![p(1)]));
    assert!(!c.coord.catalog().is_restorable(gs));
    // The participant gave up too: its wait is abandoned, every rule removed.
    let p1 = c.actions_of(p(1));
    assert!(p1.contains(&HostAction::ClearAll), "{p1:?}");
    assert_eq!(done_from(&c, p(1)), 0);
    // The late durability is ignored.
    let hung = c.take_pending(p(1));
    assert_eq!(hung.action, await_durable(gs, 1));
    c.complete(
        hung,
        ActionOutcome::SnapshotDurable {
            total_time: Duration::from_secs(200),
        },
    );
    c.hold.clear();
    c.drive();
    assert_eq!(done_from(&c, p(1)), 0);
    for h in 0..3 {
        assert!(ends_idle(&c.actions_of(p(h))), "host {h}");
    }
}

#[test]
fn a_participant_gives_up_waiting_for_durability_at_its_own_deadline() {
    let t0 = Instant::now();
    let gs = GlobalSnapshotId(3);
    let mut part = started_participant(p(1));
    part.handle_message(
        t0,
        Envelope::new(CLUSTER, p(0), p(1), Message::TakeSnapshot { gs }),
    )
    .unwrap();
    let mut issued = Vec::new();
    loop {
        let Some(Output::Action { id, action }) = part.poll_output() else {
            panic!("expected the next step")
        };
        issued.push(action.clone());
        if matches!(action, HostAction::AwaitDurable { .. }) {
            break;
        }
        let outcome = match action {
            HostAction::TakeLocalSnapshots { .. } => ActionOutcome::SnapshotPoint {
                local_time: Duration::from_millis(5),
            },
            _ => ActionOutcome::Done,
        };
        part.handle_action_complete(t0, id, outcome).unwrap();
    }
    assert_eq!(issued.len(), 6, "steps 1–5, then the wait: {issued:?}");
    assert_eq!(part.poll_timeout(), Some(t0 + Timeouts::default().snapshot));
    part.handle_timeout(t0 + Timeouts::default().snapshot);
    let outs: Vec<_> = std::iter::from_fn(|| part.poll_output()).collect();
    assert!(outs.iter().any(|o| matches!(
        o,
        Output::Action {
            action: HostAction::ClearAll,
            ..
        }
    )));
    let failed = outs.iter().find_map(|o| match o {
        Output::Transmit(e) => match &e.message {
            Message::SnapshotFailed { reason, .. } => Some(reason.clone()),
            _ => None,
        },
        _ => None,
    });
    assert!(
        failed.as_deref().is_some_and(|r| r.contains("durable")),
        "{outs:?}"
    );
    assert!(outs
        .iter()
        .all(|o| !matches!(o, Output::Transmit(e) if matches!(e.message, Message::Done { .. }))));
}

#[test]
fn an_abort_while_waiting_for_durability_clears_the_host_when_the_wait_ends() {
    let mut c = Cluster::new(3);
    c.live.insert(p(1));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.collect();
    run_host_until(&mut c, p(1), &await_durable(gs, 1));
    c.drive();
    // The coordinator aborts gs (say, another host failed) while p1 waits for durability.
    c.deliver(Envelope::new(
        CLUSTER,
        p(0),
        p(1),
        Message::Abort {
            gs,
            reason: "participant 2 failed".into(),
        },
    ));
    c.collect();
    let before = c.actions_of(p(1)).len();
    assert!(!c.actions_of(p(1)).contains(&HostAction::ClearAll));
    // The wait ends: no DONE, every rule removed, idle again.
    c.hold.clear();
    c.drive();
    let p1 = c.actions_of(p(1));
    assert_eq!(p1[before..], [HostAction::ClearAll, idle_drop()]);
    assert_eq!(done_from(&c, p(1)), 0);
    assert!(!c.participant(p(1)).may_filter());
}

#[test]
fn a_duplicated_take_snapshot_while_waiting_for_durability_sends_no_done() {
    let mut c = Cluster::new(2);
    c.live.insert(p(1));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.collect();
    run_host_until(&mut c, p(1), &await_durable(gs, 1));
    c.deliver(Envelope::new(
        CLUSTER,
        p(0),
        p(1),
        Message::TakeSnapshot { gs },
    ));
    c.collect();
    assert_eq!(done_from(&c, p(1)), 0);
    c.hold.clear();
    c.drive();
    assert_eq!(done_from(&c, p(1)), 1);
    assert_eq!(c.completed(), vec![gs]);
}

#[test]
fn the_thesis_order_waits_for_durability_after_step_6_and_the_idle_drop_rule() {
    let ids: Vec<_> = (1..3).map(ParticipantId).collect();
    let mut cfg = CoordinatorConfig::new(CLUSTER, ids, vms_of(0));
    cfg.clear_colour = ClearColourPolicy::AfterOwnSnapshot;
    let mut c = Cluster::new(3);
    c.coord = Coordinator::new(cfg, Catalog::new(CLUSTER)).unwrap();
    for h in 1..3 {
        let mut pc = ParticipantConfig::new(CLUSTER, p(h), vms_of(h));
        pc.clear_colour = ClearColourPolicy::AfterOwnSnapshot;
        c.parts[(h - 1) as usize] = Participant::new(pc).unwrap();
    }
    c.actions.clear();
    c.drive();
    c.live = (0..3).map(ParticipantId).collect();
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    assert_eq!(c.completed(), vec![gs]);
    for h in 0..3 {
        let mut expected = vec![idle_drop(), HostAction::CheckVmsRunning { vms: vms_of(h) }];
        expected.extend(six_steps(gs, h));
        expected.push(idle_drop());
        expected.push(await_durable(gs, h));
        assert_eq!(c.actions_of(p(h)), expected, "host {h}");
        if h > 0 {
            let log = log_of(&c, p(h));
            assert!(
                position(&log, "complete await durability").unwrap()
                    < position(&log, "send DONE").unwrap()
            );
        }
    }
}

#[test]
fn outcomes_and_the_action_have_stable_json_names() {
    let point = ActionOutcome::SnapshotPoint {
        local_time: Duration::from_micros(7),
    };
    let durable = ActionOutcome::SnapshotDurable {
        total_time: Duration::from_micros(9),
    };
    assert_eq!(
        serde_json::to_value(&point).unwrap(),
        serde_json::json!({"outcome": "snapshot_point", "local_time_us": 7})
    );
    assert_eq!(
        serde_json::to_value(&durable).unwrap(),
        serde_json::json!({"outcome": "snapshot_durable", "total_time_us": 9})
    );
    let action = HostAction::AwaitDurable {
        gs: GlobalSnapshotId(4),
        vms: vec!["a".into()],
    };
    assert_eq!(
        serde_json::to_value(&action).unwrap(),
        serde_json::json!({"action": "await_durable", "gs": 4, "vms": ["a"]})
    );
    assert_eq!(action.kind(), "await durability");
    for v in [point, durable] {
        let back: ActionOutcome =
            serde_json::from_value(serde_json::to_value(&v).unwrap()).unwrap();
        assert_eq!(back, v);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Whatever the order of deliveries and completions, and whichever hosts take live
    /// snapshots: every global snapshot completes exactly once at the usual message cost,
    /// every live host waits for durability between step 5 and DONE, and the coordinator
    /// completes only after its own durability.
    #[test]
    fn with_live_snapshots_done_and_completion_always_follow_durability(
        n in 1u32..10,
        seed in any::<u64>(),
        live_mask in any::<u16>(),
        rounds in 1usize..4,
    ) {
        let mut c = Cluster::new(n).shuffled(seed);
        c.live = (0..n).filter(|h| live_mask & (1 << h) != 0).map(ParticipantId).collect();
        let mut ids = Vec::new();
        for _ in 0..rounds {
            ids.push(c.coord.start_global_snapshot(c.now).unwrap());
            c.drive();
        }
        prop_assert_eq!(c.completed(), ids.clone());
        prop_assert_eq!(c.messages, rounds * 5 * (n as usize - 1));
        for h in 0..n {
            let id = ParticipantId(h);
            let mut expected = vec![idle_drop()];
            for &gs in &ids {
                if c.live.contains(&id) {
                    expected.extend(live_snapshot_actions(gs, h));
                } else {
                    expected.extend(snapshot_actions(gs, h));
                }
            }
            prop_assert_eq!(c.actions_of(id), expected, "host {}", h);
            // Per round: the wait's completion precedes DONE (or completion at host 0).
            let log = log_of(&c, id);
            let marker = if h == 0 { "event GlobalSnapshotCompleted" } else { "send DONE" };
            let durable: Vec<usize> = log.iter().enumerate()
                .filter(|(_, l)| *l == "complete await durability").map(|(i, _)| i).collect();
            let done: Vec<usize> = log.iter().enumerate()
                .filter(|(_, l)| *l == marker).map(|(i, _)| i).collect();
            prop_assert_eq!(done.len(), rounds);
            if c.live.contains(&id) {
                prop_assert_eq!(durable.len(), rounds);
                for (d, e) in durable.iter().zip(&done) {
                    prop_assert!(d < e, "host {}: {:?}", h, log);
                }
            } else {
                prop_assert!(durable.is_empty());
            }
        }
    }

    /// A live host whose local snapshot never becomes durable fails the global snapshot:
    /// it is never restorable, nobody sent DONE for it from that host, and every host ends
    /// idle; the next global snapshot (durable everywhere) completes.
    #[test]
    fn a_snapshot_that_does_not_become_durable_is_never_restorable(
        n in 1u32..8,
        seed in any::<u64>(),
        victim in 0u32..8,
    ) {
        let victim = ParticipantId(victim % n);
        let mut c = Cluster::new(n).shuffled(seed);
        c.live = (0..n).map(ParticipantId).collect();
        c.durable_fails.insert(victim);
        let gs = c.coord.start_global_snapshot(c.now).unwrap();
        c.drive();
        prop_assert!(c.completed().is_empty());
        let failed = c.failed();
        prop_assert_eq!(failed.len(), 1);
        prop_assert_eq!(failed[0].0, gs);
        prop_assert!(failed[0].1.contains(&victim));
        prop_assert!(!c.coord.catalog().is_restorable(gs));
        prop_assert_eq!(done_from(&c, victim), 0);
        for h in 0..n {
            prop_assert_eq!(filter_state(&c.actions_of(ParticipantId(h))), (None, true), "host {}", h);
        }
        c.durable_fails.clear();
        let gs2 = c.coord.start_global_snapshot(c.now).unwrap();
        c.drive();
        prop_assert_eq!(c.completed(), vec![gs2]);
        prop_assert!(c.coord.catalog().is_restorable(gs2));
    }
}

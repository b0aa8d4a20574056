//! The global-snapshot protocol (phases 1 and 2) driven by hand through the state machines.
#![allow(clippy::unwrap_used)]

mod protocol_support;

use std::time::Duration;

use proptest::prelude::*;
use protocol_support::*;
use unacloud_snapshot::protocol::*;

fn p(id: u32) -> ParticipantId {
    ParticipantId(id)
}

/// Starts a global snapshot, lets the coordinator's own VM check through by hand, then
/// holds the coordinator's own steps while the participants run.
fn start_holding_own_steps(c: &mut Cluster) -> GlobalSnapshotId {
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.collect();
    let check = c.take_pending(p(0));
    c.complete(check, ActionOutcome::VmsRunning(true));
    c.hold.insert(p(0));
    c.drive();
    gs
}

/// Participant 1, started, after the coordinator's TAKE_SNAPSHOT for `gs` reached it.
fn participant_taking(gs: GlobalSnapshotId, now: std::time::Instant) -> Participant {
    let mut part = started_participant(p(1));
    part.handle_message(
        now,
        Envelope::new(CLUSTER, p(0), p(1), Message::TakeSnapshot { gs }),
    )
    .unwrap();
    part
}

/// The participant's next output, which must be a host action.
fn next_action(part: &mut Participant) -> (ActionId, HostAction) {
    match part.poll_output() {
        Some(Output::Action { id, action }) => (id, action),
        other => panic!("expected a host action, got {other:?}"),
    }
}

/// The host actions among `outputs`, in order.
fn actions_in(outputs: &[Output]) -> Vec<HostAction> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Action { action, .. } => Some(action.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_global_snapshot_costs_two_n_minus_one_for_the_precheck_two_for_the_snapshot_and_n_minus_one_releases(
) {
    for n in [1u32, 2, 3, 5, 17, 64] {
        let mut c = Cluster::new(n);
        let gs = c.coord.start_global_snapshot(c.now).unwrap();
        c.drive();
        assert_eq!(c.completed(), vec![gs], "n = {n}");
        let m = (n - 1) as usize;
        assert_eq!(c.messages, 5 * m, "n = {n}");
        assert_eq!(c.count_kind("PRECHECK"), m);
        assert_eq!(c.count_kind("PRECHECK_OK"), m);
        assert_eq!(c.count_kind("TAKE_SNAPSHOT"), m);
        assert_eq!(c.count_kind("DONE"), m);
        assert_eq!(c.count_kind("RELEASE"), m);
        assert!(c.coord.running().is_none());
        assert!(c.coord.catalog().is_restorable(gs));
    }
}

#[test]
fn every_host_arms_the_idle_drop_then_runs_the_precheck_and_the_six_steps_in_the_thesis_order() {
    let mut c = Cluster::new(4);
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    for host in 0..4 {
        let mut expected = vec![idle_drop()];
        expected.extend(snapshot_actions(gs, host));
        assert_eq!(c.actions_of(p(host)), expected, "host {host}");
    }
}

#[test]
fn a_state_machine_arms_the_idle_drop_rule_before_anything_else() {
    let ids = vec![p(1)];
    let mut coord = Coordinator::new(
        CoordinatorConfig::new(CLUSTER, ids, vms_of(0)),
        Catalog::new(CLUSTER),
    )
    .unwrap();
    let mut part = Participant::new(ParticipantConfig::new(CLUSTER, p(1), vms_of(1))).unwrap();
    for out in [coord.poll_output(), part.poll_output()] {
        assert!(
            matches!(out, Some(Output::Action { ref action, .. }) if *action == idle_drop()),
            "{out:?}"
        );
    }
    assert!(coord.poll_output().is_none() && part.poll_output().is_none());
    // Work that arrives while the rule is being armed waits for it instead of being refused.
    let gs = coord
        .start_global_snapshot(std::time::Instant::now())
        .unwrap();
    let outs: Vec<_> = std::iter::from_fn(|| coord.poll_output()).collect();
    assert!(
        outs.iter().all(|o| !matches!(o, Output::Action { .. })),
        "the VM check waits for the idle drop rule: {outs:?}"
    );
    assert_eq!(coord.running(), Some((Operation::GlobalSnapshot, gs)));
}

#[test]
fn a_participant_holds_the_post_colour_until_release() {
    let mut c = Cluster::new(3);
    // Hold the coordinator's own steps: every participant sends DONE and waits.
    start_holding_own_steps(&mut c);
    assert_eq!(c.count_kind("DONE"), 2);
    for h in 1..3 {
        assert_eq!(
            c.actions_of(p(h)).last(),
            Some(&HostAction::AcceptIncoming(Colour::Post)),
            "host {h} still colours POST after step 5"
        );
        assert!(c.participant(p(h)).may_filter());
    }
    assert_eq!(c.count_kind("RELEASE"), 0);
    c.hold.clear();
    c.drive();
    assert_eq!(c.completed().len(), 1);
    assert_eq!(c.count_kind("RELEASE"), 2);
    for h in 0..3 {
        assert!(ends_idle(&c.actions_of(p(h))), "host {h}");
        if h > 0 {
            assert!(!c.participant(p(h)).may_filter());
        }
    }
}

#[test]
fn the_thesis_policy_clears_the_colour_right_after_the_own_snapshot() {
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
    c.drive(); // the new machines arm their idle drop rule

    // Participant 1's DONE comes after its step 6, before the coordinator completes.
    let gs = start_holding_own_steps(&mut c);
    let p1 = c.actions_of(p(1));
    assert!(ends_idle(&p1), "{p1:?}");
    assert!(c.completed().is_empty());
    c.hold.clear();
    c.drive();
    assert_eq!(c.completed(), vec![gs]);
    // RELEASE is still sent (same wire protocol) and ignored.
    assert_eq!(c.count_kind("RELEASE"), 2);
    for h in 0..3 {
        let mut expected = vec![idle_drop()];
        expected.extend(snapshot_actions(gs, h));
        assert_eq!(c.actions_of(p(h)), expected, "host {h}");
    }
}

#[test]
fn no_step_is_issued_before_the_previous_one_is_confirmed() {
    let mut c = Cluster::new(2);
    c.hold.insert(p(1));
    c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    // Participant 1 has exactly one action outstanding at every point (after its initial
    // idle drop: the check, steps 1–5, step 6 on RELEASE, the idle drop again).
    for expected_len in 2..=8 {
        assert_eq!(c.actions_of(p(1)).len(), expected_len);
        let pending: Vec<_> = c
            .pending
            .iter()
            .filter(|a| a.host == p(1))
            .cloned()
            .collect();
        assert_eq!(pending.len(), 1, "one outstanding action at a time");
        // Nothing else happens while the action is outstanding.
        c.drive();
        assert_eq!(c.actions_of(p(1)).len(), expected_len);
        let a = pending[0].clone();
        c.pending.retain(|x| x.id != a.id || x.host != a.host);
        let outcome = c.outcome_for(a.host, &a.action);
        c.complete(a, outcome);
        c.drive();
        if expected_len == 8 {
            break;
        }
    }
    assert_eq!(c.completed().len(), 1);
}

#[test]
fn several_vms_of_one_host_are_snapshotted_by_one_parallel_action() {
    let mut c = Cluster::new(2);
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    let takes: Vec<_> = c
        .actions_of(p(1))
        .into_iter()
        .filter(|a| matches!(a, HostAction::TakeLocalSnapshots { .. }))
        .collect();
    assert_eq!(
        takes,
        vec![HostAction::TakeLocalSnapshots {
            gs,
            vms: vec!["vm-1-a".into(), "vm-1-b".into()]
        }]
    );
}

#[test]
fn done_carries_the_local_time_and_completion_reports_every_local_time() {
    let mut c = Cluster::new(3);
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    let done: Vec<_> = c
        .transmitted
        .iter()
        .filter_map(|e| match e.message {
            Message::Done { local_time, .. } => Some((e.from, local_time)),
            _ => None,
        })
        .collect();
    assert_eq!(
        done,
        vec![
            (p(1), Duration::from_millis(1001)),
            (p(2), Duration::from_millis(1002))
        ]
    );
    let ev = c
        .coordinator_events()
        .into_iter()
        .find_map(|e| match e {
            ProtocolEvent::GlobalSnapshotCompleted {
                gs: g, local_times, ..
            } if g == gs => Some(local_times),
            _ => None,
        })
        .unwrap();
    let ids: Vec<_> = ev.iter().map(|l| (l.participant, l.local_time)).collect();
    assert_eq!(
        ids,
        vec![
            (p(0), Duration::from_millis(1000)),
            (p(1), Duration::from_millis(1001)),
            (p(2), Duration::from_millis(1002))
        ]
    );
}

#[test]
fn all_dones_before_the_coordinators_own_steps_complete_it_only_after_its_steps() {
    let mut c = Cluster::new(4);
    // Let the coordinator's own check through by hand, then hold its steps.
    let gs = start_holding_own_steps(&mut c);
    assert_eq!(c.count_kind("DONE"), 3, "every DONE arrived");
    assert!(c.completed().is_empty(), "own steps still running");
    c.hold.clear();
    c.drive();
    assert_eq!(c.completed(), vec![gs]);
}

#[test]
fn own_steps_before_the_dones_complete_it_only_after_the_last_done() {
    let mut c = Cluster::new(4);
    c.hold.insert(p(3));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    // p3 is stuck at its VM check: nothing completes.
    assert!(c.completed().is_empty());
    c.hold.clear();
    c.drive();
    assert_eq!(c.completed(), vec![gs]);
    assert_eq!(
        c.actions_of(p(0)).len(),
        9,
        "coordinator armed its idle drop, ran its check and six steps once, re-armed"
    );
}

#[test]
fn a_second_start_while_one_runs_is_refused_with_a_reason() {
    let mut c = Cluster::new(3);
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    let err = c.coord.start_global_snapshot(c.now).unwrap_err();
    assert!(matches!(
        err,
        Error::Busy {
            running: Operation::GlobalSnapshot,
            gs: g
        } if g == gs
    ));
    assert!(err.to_string().contains("still running"), "{err}");
    let err = c.coord.start_resume(c.now, None).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }));
    c.drive();
    // The refused attempts left no trace: one snapshot, normal message count.
    assert_eq!(c.completed(), vec![gs]);
    assert_eq!(c.messages, 10);
    // After completion the next one is accepted, with a higher epoch.
    let gs2 = c.coord.start_global_snapshot(c.now).unwrap();
    assert!(gs2 > gs);
}

#[test]
fn a_trigger_from_the_metadata_server_while_running_is_refused_as_an_event() {
    let mut c = Cluster::new(2);
    let trigger = || {
        Envelope::new(
            CLUSTER,
            ParticipantId::METADATA_SERVER,
            ParticipantId::COORDINATOR,
            Message::TriggerGlobalSnapshot,
        )
    };
    c.coord.handle_message(c.now, trigger()).unwrap();
    c.coord.handle_message(c.now, trigger()).unwrap();
    c.drive();
    assert_eq!(c.completed().len(), 1);
    assert!(c
        .coordinator_events()
        .iter()
        .any(|e| matches!(e, ProtocolEvent::TriggerRefused { reason } if reason.contains("still running"))));
}

#[test]
fn a_silent_participant_fails_the_snapshot_which_is_never_offered_for_restore() {
    let mut c = Cluster::new(4);
    c.down.insert(p(2));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    assert!(c.completed().is_empty());
    // Phase 2 was reached? No: p2 never answered PRECHECK.
    c.advance(Duration::from_secs(11));
    c.drive();
    let failed = c.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, gs);
    assert_eq!(failed[0].1, vec![p(2)]);
    assert!(matches!(&failed[0].2, FailureReason::Timeout { phase, .. } if phase == "precheck"));
    assert_eq!(c.count_kind("ABORT"), 3, "ABORT to every participant");
    assert!(!c.coord.catalog().is_restorable(gs));
    assert!(matches!(
        c.coord.start_resume(c.now, Some(gs)),
        Err(Error::SnapshotNotRestorable { .. })
    ));
    assert!(matches!(
        c.coord.start_resume(c.now, None),
        Err(Error::NoRestorableSnapshot)
    ));
}

#[test]
fn a_participant_silent_in_phase_two_fails_it_and_every_other_host_ends_unfiltered() {
    let mut c = Cluster::new(4);
    c.hold.insert(p(3));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    // p3 is stuck in its check: let it pass, then stick in step 3 (hold again).
    let a = c.take_pending(p(3));
    c.complete(a, ActionOutcome::VmsRunning(true));
    c.drive();
    for _ in 0..2 {
        let a = c.take_pending(p(3));
        c.complete(a, ActionOutcome::Done);
        c.drive();
    }
    assert!(matches!(
        c.pending.iter().find(|a| a.host == p(3)).unwrap().action,
        HostAction::TakeLocalSnapshots { .. }
    ));
    // p3's host goes silent (powered off).
    c.down.insert(p(3));
    c.advance(Duration::from_secs(121));
    c.drive();
    let failed = c.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0].0, failed[0].1.clone()), (gs, vec![p(3)]));
    assert!(!c.coord.catalog().is_restorable(gs));
    // Hosts 0..=2 held the POST colour until the failure, then removed every rule and
    // went back to the idle drop rule.
    for h in 0..3 {
        let acts = c.actions_of(p(h));
        assert!(ends_idle(&acts), "host {h}: {acts:?}");
        assert!(acts.contains(&HostAction::ClearAll), "host {h}: {acts:?}");
        if h > 0 {
            assert!(!c.participant(p(h)).may_filter());
        }
    }
    // The next global snapshot, with p3's host rebooted (a fresh participant), succeeds.
    c.down.clear();
    c.hold.clear();
    c.reboot(p(3));
    let gs2 = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    assert_eq!(c.completed(), vec![gs2]);
}

#[test]
fn vms_not_running_fail_the_precheck_and_phase_two_never_starts() {
    let mut c = Cluster::new(3);
    c.vms_stopped.insert(p(2));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    let failed = c.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].1, vec![p(2)]);
    assert!(matches!(failed[0].2, FailureReason::VmsNotRunning { .. }));
    assert_eq!(c.count_kind("TAKE_SNAPSHOT"), 0);
    assert!(c
        .actions
        .iter()
        .all(|(_, a)| matches!(a, HostAction::CheckVmsRunning { .. }) || *a == idle_drop()));
    assert!(!c.coord.catalog().is_restorable(gs));
}

#[test]
fn a_failed_local_snapshot_aborts_and_every_host_removes_its_rules() {
    let mut c = Cluster::new(3);
    c.snapshot_fails.insert(p(1));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    let failed = c.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0].0, failed[0].1.clone()), (gs, vec![p(1)]));
    let p1 = c.actions_of(p(1));
    assert_eq!(p1[p1.len() - 2], HostAction::ClearAll);
    assert!(ends_idle(&p1));
    assert!(!p1.contains(&HostAction::SetOutgoingColour(Colour::Post)));
    for h in [0, 2] {
        let acts = c.actions_of(p(h));
        assert!(ends_idle(&acts), "host {h} ended with {acts:?}");
    }
    assert!(c.pending.is_empty());
}

#[test]
fn the_coordinators_own_failed_step_aborts_and_clears_its_host() {
    let mut c = Cluster::new(3);
    c.snapshot_fails.insert(p(0));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    let failed = c.failed();
    assert_eq!((failed[0].0, failed[0].1.clone()), (gs, vec![p(0)]));
    let acts = c.actions_of(p(0));
    assert_eq!(acts[acts.len() - 2], HostAction::ClearAll);
    assert!(ends_idle(&acts));
    assert_eq!(c.count_kind("ABORT"), 2);
    assert_eq!(c.count_kind("RELEASE"), 0);
}

#[test]
fn abort_in_the_middle_of_a_step_clears_the_host_once_the_step_completes() {
    let now = std::time::Instant::now();
    let gs = GlobalSnapshotId(5);
    let mut part = participant_taking(gs, now);
    let to_me = |m| Envelope::new(CLUSTER, p(0), p(1), m);
    let (id, action) = next_action(&mut part);
    assert_eq!(action, HostAction::SetOutgoingColour(Colour::Pre));
    part.handle_message(
        now,
        to_me(Message::Abort {
            gs,
            reason: "test".into(),
        }),
    )
    .unwrap();
    // Not before the running step is confirmed.
    while let Some(o) = part.poll_output() {
        assert!(!matches!(o, Output::Action { .. }), "{o:?}");
    }
    part.handle_action_complete(now, id, ActionOutcome::Done)
        .unwrap();
    let outs: Vec<_> = std::iter::from_fn(|| part.poll_output()).collect();
    let actions = actions_in(&outs);
    assert_eq!(actions, vec![HostAction::ClearAll]);
}

#[test]
fn a_participant_whose_coordinator_vanished_clears_its_host_by_itself_after_the_deadline() {
    let t0 = std::time::Instant::now();
    let mut part = participant_taking(GlobalSnapshotId(1), t0);
    // Steps 1 and 2 complete; step 3 hangs; the coordinator is gone and never aborts.
    for _ in 0..2 {
        let (id, _) = next_action(&mut part);
        part.handle_action_complete(t0, id, ActionOutcome::Done)
            .unwrap();
    }
    let (hung, action) = next_action(&mut part);
    assert!(matches!(action, HostAction::TakeLocalSnapshots { .. }));
    assert!(part.may_filter());
    let deadline = part.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Timeouts::default().snapshot);
    part.handle_timeout(deadline - Duration::from_millis(1));
    assert!(part.poll_output().is_none(), "nothing before the deadline");
    part.handle_timeout(deadline);
    let outs: Vec<_> = std::iter::from_fn(|| part.poll_output()).collect();
    let clear = outs
        .iter()
        .find_map(|o| match o {
            Output::Action {
                id,
                action: HostAction::ClearAll,
            } => Some(*id),
            _ => None,
        })
        .expect("ClearAll issued by the participant itself");
    assert!(outs.iter().any(
        |o| matches!(o, Output::Transmit(e) if matches!(e.message, Message::SnapshotFailed { .. }))
    ));
    // The hung step's late completion is ignored; ClearAll completes; nothing is filtered.
    part.handle_action_complete(
        deadline,
        hung,
        ActionOutcome::SnapshotTaken {
            local_time: Duration::from_secs(200),
        },
    )
    .unwrap();
    part.handle_action_complete(deadline, clear, ActionOutcome::Done)
        .unwrap();
    assert!(!part.may_filter());
    assert!(part.poll_timeout().is_none());
    // Back to the idle state: only the idle drop rule is re-armed.
    let later: Vec<_> = std::iter::from_fn(|| part.poll_output()).collect();
    let actions = actions_in(&later);
    assert_eq!(actions, vec![idle_drop()], "{later:?}");
    assert!(
        later.iter().all(|o| !matches!(o, Output::Transmit(_))),
        "{later:?}"
    );
}

#[test]
fn a_participant_whose_coordinator_vanished_after_take_snapshot_stops_colouring_at_its_deadline() {
    // The coordinator vanishes right after TAKE_SNAPSHOT: the participant runs steps 1–5,
    // holds the POST colour waiting for RELEASE, and at its deadline removes every rule
    // by itself, without any further message.
    let mut c = Cluster::new(3);
    c.coord.start_global_snapshot(c.now).unwrap();
    // Run until TAKE_SNAPSHOT is in flight, then drop the coordinator.
    while c.count_kind("TAKE_SNAPSHOT") == 0 {
        assert!(c.step());
    }
    let t0 = c.now;
    c.down.insert(p(0));
    c.drive();
    for h in 1..3 {
        assert_eq!(
            c.actions_of(p(h)).last(),
            Some(&HostAction::AcceptIncoming(Colour::Post))
        );
        assert!(c.participant(p(h)).may_filter());
        assert_eq!(
            c.participant(p(h)).poll_timeout(),
            Some(t0 + Timeouts::default().snapshot)
        );
    }
    c.advance(Timeouts::default().snapshot);
    c.drive();
    for h in 1..3 {
        let acts = c.actions_of(p(h));
        assert_eq!(acts[acts.len() - 2], HostAction::ClearAll, "host {h}");
        assert!(ends_idle(&acts));
        assert!(!c.participant(p(h)).may_filter());
        assert!(c.participant(p(h)).poll_timeout().is_none());
    }
    assert!(c
        .events
        .iter()
        .any(|(h, e)| *h == p(1) && matches!(e, ProtocolEvent::ReleaseMissed { .. })));
}

#[test]
fn late_and_duplicated_messages_of_an_earlier_attempt_are_ignored() {
    let mut c = Cluster::new(3);
    let gs1 = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    let gs2 = c.coord.start_global_snapshot(c.now).unwrap();
    c.collect();
    // Late DONE / PRECHECK_OK of gs1 at the coordinator: ignored, no error.
    for m in [
        Message::Done {
            gs: gs1,
            local_time: Duration::from_secs(1),
        },
        Message::PrecheckOk { gs: gs1 },
        Message::PrecheckFailed {
            gs: gs1,
            reason: "late".into(),
        },
    ] {
        c.coord
            .handle_message(c.now, Envelope::new(CLUSTER, p(1), p(0), m))
            .unwrap();
    }
    // A duplicated PRECHECK_OK of gs2 counts once.
    c.drive();
    assert_eq!(c.completed(), vec![gs1, gs2]);
    // Late TAKE_SNAPSHOT / PRECHECK / ABORT of gs1 at a participant: no action; the two
    // requests are answered STALE (the coordinator ignores STALE of an attempt that is
    // not running), the ABORT not at all.
    let before = c.actions.len();
    let sent = c.messages;
    let stale_before = c.count_kind("STALE");
    for m in [
        Message::TakeSnapshot { gs: gs1 },
        Message::Precheck { gs: gs1 },
        Message::Abort {
            gs: gs1,
            reason: "late".into(),
        },
    ] {
        c.deliver(Envelope::new(CLUSTER, p(0), p(2), m));
    }
    c.drive();
    assert_eq!(c.actions.len(), before);
    assert_eq!(c.messages, sent + 2);
    assert_eq!(c.count_kind("STALE"), stale_before + 2);
    assert_eq!(c.completed(), vec![gs1, gs2]);
}

#[test]
fn a_duplicated_done_is_counted_once() {
    let mut c = Cluster::new(3);
    c.hold.insert(p(2));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    let a = c.take_pending(p(2));
    c.complete(a, ActionOutcome::VmsRunning(true));
    c.drive();
    // p1 and the coordinator are done; p2 is in its steps. Duplicate p1's DONE.
    let done = c
        .transmitted
        .iter()
        .find(|e| e.from == p(1) && matches!(e.message, Message::Done { .. }))
        .cloned()
        .unwrap();
    c.deliver(done.clone());
    c.deliver(done);
    c.collect();
    assert!(c.completed().is_empty(), "p2's DONE is still missing");
    c.hold.clear();
    c.drive();
    assert_eq!(c.completed(), vec![gs]);
}

#[test]
fn a_duplicated_take_snapshot_repeats_done_until_the_global_snapshot_is_decided() {
    let mut c = Cluster::new(3);
    c.hold.insert(p(2));
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    let a = c.take_pending(p(2));
    c.complete(a, ActionOutcome::VmsRunning(true));
    c.drive();
    // p1 sent DONE and holds its colour; gs is not decided yet: a duplicate of
    // TAKE_SNAPSHOT repeats DONE without re-running the steps.
    let steps = c.actions_of(p(1)).len();
    let take = Envelope::new(CLUSTER, p(0), p(1), Message::TakeSnapshot { gs });
    c.deliver(take.clone());
    c.collect();
    assert_eq!(c.actions_of(p(1)).len(), steps);
    assert_eq!(c.count_kind("DONE"), 2);
    c.hold.clear();
    c.drive();
    assert_eq!(c.completed(), vec![gs]);
    // After RELEASE the same request can only come from a coordinator that reuses gs
    // (one that lost its catalog): STALE, so that it cannot record this host's old local
    // snapshot as part of a new global snapshot.
    let steps = c.actions_of(p(1)).len();
    let dones = c.count_kind("DONE");
    c.deliver(take);
    c.drive();
    assert_eq!(c.actions_of(p(1)).len(), steps);
    assert_eq!(c.count_kind("DONE"), dones);
    assert!(c
        .transmitted
        .iter()
        .any(|e| e.from == p(1) && matches!(e.message, Message::Stale { gs: g, newest_gs, .. } if g == gs && newest_gs == gs)));
}

#[test]
fn foreign_misaddressed_and_unknown_envelopes_are_typed_errors() {
    let mut c = Cluster::new(3);
    let now = c.now;
    let err = c
        .coord
        .handle_message(
            now,
            Envelope::new(
                ClusterId(7),
                p(1),
                p(0),
                Message::PrecheckOk {
                    gs: GlobalSnapshotId(1),
                },
            ),
        )
        .unwrap_err();
    assert!(matches!(
        err,
        Error::ForeignCluster {
            expected: CLUSTER,
            got: ClusterId(7)
        }
    ));
    let err = c
        .coord
        .handle_message(
            now,
            Envelope::new(
                CLUSTER,
                p(1),
                p(2),
                Message::PrecheckOk {
                    gs: GlobalSnapshotId(1),
                },
            ),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Misaddressed { .. }));
    let err = c
        .coord
        .handle_message(
            now,
            Envelope::new(
                CLUSTER,
                p(9),
                p(0),
                Message::PrecheckOk {
                    gs: GlobalSnapshotId(1),
                },
            ),
        )
        .unwrap_err();
    assert!(matches!(err, Error::UnknownParticipant { id } if id == p(9)));
    let err = c
        .coord
        .handle_message(
            now,
            Envelope::new(
                CLUSTER,
                p(1),
                p(0),
                Message::TakeSnapshot {
                    gs: GlobalSnapshotId(1),
                },
            ),
        )
        .unwrap_err();
    assert!(matches!(
        err,
        Error::UnexpectedMessage {
            role: "coordinator",
            message: "TAKE_SNAPSHOT"
        }
    ));
    let err = c
        .participant(p(1))
        .handle_message(
            now,
            Envelope::new(
                CLUSTER,
                p(2),
                p(1),
                Message::TakeSnapshot {
                    gs: GlobalSnapshotId(1),
                },
            ),
        )
        .unwrap_err();
    assert!(matches!(err, Error::UnknownParticipant { .. }));
    let err = c
        .participant(p(1))
        .handle_action_complete(now, ActionId(99), ActionOutcome::Done)
        .unwrap_err();
    assert!(matches!(err, Error::UnknownAction { id: ActionId(99) }));
}

#[test]
fn invalid_configurations_are_rejected() {
    let bad = |ids: Vec<u32>| {
        Coordinator::new(
            CoordinatorConfig::new(
                CLUSTER,
                ids.into_iter().map(ParticipantId).collect(),
                vec![],
            ),
            Catalog::new(CLUSTER),
        )
    };
    assert!(matches!(bad(vec![0, 1]), Err(Error::InvalidConfig { .. })));
    assert!(matches!(
        bad(vec![1, 2, 1]),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(bad(vec![3, 1, 2]).is_ok());
    assert!(matches!(
        Coordinator::new(
            CoordinatorConfig::new(CLUSTER, vec![], vec![]),
            Catalog::new(ClusterId(1))
        ),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(Participant::new(ParticipantConfig::new(CLUSTER, p(0), vec![])).is_err());
    assert!(DscpConfig::new(0x10, 0x10).is_err());
    assert!(DscpConfig::new(0, 0x12).is_err());
    assert!(DscpConfig::new(0x40, 0x12).is_err());
    let d = DscpConfig::default();
    assert_eq!((d.pre(), d.post()), (0x10, 0x12));
    assert_eq!(d.colour_of(0x12), Some(Colour::Post));
}

#[test]
fn the_report_reaches_the_metadata_server_when_configured() {
    let ids: Vec<_> = (1..3).map(ParticipantId).collect();
    let mut cfg = CoordinatorConfig::new(CLUSTER, ids, vms_of(0));
    cfg.report_to_metadata_server = true;
    let mut c = Cluster::new(3);
    c.coord = Coordinator::new(cfg, Catalog::new(CLUSTER)).unwrap();
    c.drive(); // the new coordinator arms its idle drop rule
    let gs = c.coord.start_global_snapshot(c.now).unwrap();
    c.drive();
    assert_eq!(c.messages, 10, "the report is not a participant message");
    assert_eq!(c.to_metadata.len(), 1);
    assert!(
        matches!(&c.to_metadata[0].message, Message::SnapshotReport { gs: g, local_times, .. } if *g == gs && local_times.len() == 3)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the order of deliveries and action completions, a global snapshot
    /// completes exactly once, with the minimal message count, and every host runs the six
    /// steps in order.
    #[test]
    fn any_delivery_order_completes_exactly_once_with_steps_in_order(n in 1u32..12, seed in any::<u64>(), rounds in 1usize..4) {
        let mut c = Cluster::new(n).shuffled(seed);
        let mut ids = Vec::new();
        for _ in 0..rounds {
            ids.push(c.coord.start_global_snapshot(c.now).unwrap());
            c.drive();
        }
        prop_assert_eq!(c.completed(), ids.clone());
        prop_assert_eq!(c.messages, rounds * 5 * (n as usize - 1));
        for host in 0..n {
            let mut expected = vec![idle_drop()];
            for &gs in &ids {
                expected.extend(snapshot_actions(gs, host));
            }
            prop_assert_eq!(c.actions_of(ParticipantId(host)), expected);
        }
    }

    /// A global snapshot never completes while some participant's DONE is missing or the
    /// coordinator's own steps are unfinished.
    #[test]
    fn completion_needs_every_done_and_the_own_steps(n in 2u32..8, held in 0u32..8, seed in any::<u64>()) {
        let held = ParticipantId(held % n);
        let mut c = Cluster::new(n).shuffled(seed);
        c.hold.insert(held);
        c.coord.start_global_snapshot(c.now).unwrap();
        c.drive();
        prop_assert!(c.completed().is_empty());
        c.hold.clear();
        c.drive();
        prop_assert_eq!(c.completed().len(), 1);
    }
}

#[test]
fn an_abort_during_a_hung_step_clears_the_host_at_the_step_deadline() {
    let t0 = std::time::Instant::now();
    let gs = GlobalSnapshotId(2);
    let mut part = participant_taking(gs, t0);
    let to_me = |m| Envelope::new(CLUSTER, p(0), p(1), m);
    next_action(&mut part);
    part.handle_message(
        t0,
        to_me(Message::Abort {
            gs,
            reason: "participant 3 silent".into(),
        }),
    )
    .unwrap();
    let events: Vec<_> = std::iter::from_fn(|| part.poll_output()).collect();
    assert_eq!(events.len(), 1, "{events:?}");
    // The step never completes: at its deadline the host is cleared, without a second
    // failure report.
    let deadline = part.poll_timeout().unwrap();
    part.handle_timeout(deadline);
    let outs: Vec<_> = std::iter::from_fn(|| part.poll_output()).collect();
    assert_eq!(outs.len(), 1, "{outs:?}");
    assert!(matches!(
        outs[0],
        Output::Action {
            action: HostAction::ClearAll,
            ..
        }
    ));
}

#[test]
fn a_hung_own_step_fails_the_snapshot_and_clears_the_coordinators_host_at_the_deadline() {
    let mut c = Cluster::new(3);
    // Let the own check pass, then hold the own steps.
    start_holding_own_steps(&mut c);
    assert_eq!(c.count_kind("DONE"), 2);
    let deadline = c.coord.poll_timeout().unwrap();
    c.advance_to(deadline);
    let failed = c.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].1, vec![p(0)]);
    assert_eq!(c.actions_of(p(0)).last(), Some(&HostAction::ClearAll));
    assert_eq!(c.count_kind("ABORT"), 2);
    assert!(
        matches!(
            c.coord.start_global_snapshot(c.now),
            Err(Error::Busy { .. })
        ),
        "refused while the own host cleans up"
    );
    // The hung step's late completion is ignored; after ClearAll the next one may start.
    c.hold.clear();
    c.drive();
    assert!(c.coord.start_global_snapshot(c.now).is_ok());
    c.drive();
    assert_eq!(c.completed().len(), 1);
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A participant's host dies at a random point of a global snapshot: the snapshot
    /// either completes (the host had already answered) or fails cleanly and is never
    /// restorable; after the deadlines every surviving host is back in the idle state (no
    /// colour, only POST dropped); the next global snapshot, with the host rebooted,
    /// succeeds.
    #[test]
    fn a_host_dying_at_any_point_never_leaves_a_survivor_filtering(
        n in 2u32..8,
        seed in any::<u64>(),
        victim in 1u32..8,
        steps_before in 0usize..60,
    ) {
        let victim = ParticipantId(1 + (victim - 1) % (n - 1));
        let mut c = Cluster::new(n).shuffled(seed);
        let gs = c.coord.start_global_snapshot(c.now).unwrap();
        for _ in 0..steps_before {
            if !c.step() {
                break;
            }
        }
        c.down.insert(victim);
        c.drive();
        for _ in 0..3 {
            c.advance(Duration::from_secs(121));
            c.drive();
        }
        let completed = c.completed();
        let failed = c.failed();
        prop_assert_eq!(completed.len() + failed.len(), 1);
        if !failed.is_empty() {
            prop_assert!(!c.coord.catalog().is_restorable(gs));
            prop_assert!(failed[0].1.contains(&victim));
        }
        prop_assert!(c.coord.running().is_none());
        for h in 0..n {
            let id = ParticipantId(h);
            if id == victim {
                continue;
            }
            prop_assert_eq!(filter_state(&c.actions_of(id)), (None, true), "host {}", h);
            if h > 0 {
                prop_assert!(!c.participant(id).may_filter());
                prop_assert!(c.participant(id).poll_timeout().is_none());
            }
        }
        // Reboot the victim: a fresh participant, nothing pending.
        c.down.clear();
        c.reboot(victim);
        let gs2 = c.coord.start_global_snapshot(c.now).unwrap();
        c.drive();
        prop_assert!(c.completed().contains(&gs2));
    }
}

#[test]
fn a_clear_all_that_keeps_failing_is_retried_then_reported() {
    let now = std::time::Instant::now();
    let gs = GlobalSnapshotId(1);
    let mut part = participant_taking(gs, now);
    let (id, _) = next_action(&mut part);
    part.handle_action_complete(now, id, ActionOutcome::Failed("iptables missing".into()))
        .unwrap();
    let mut clear_alls = 0;
    let mut reported = None;
    for _ in 0..10 {
        let outs: Vec<_> = std::iter::from_fn(|| part.poll_output()).collect();
        let mut next = None;
        for o in outs {
            match o {
                Output::Action {
                    id,
                    action: HostAction::ClearAll,
                } => {
                    clear_alls += 1;
                    next = Some(id);
                }
                Output::Event(ProtocolEvent::CleanupFailed { gs: g, why }) => {
                    reported = Some((g, why))
                }
                _ => {}
            }
        }
        let Some(id) = next else { break };
        part.handle_action_complete(now, id, ActionOutcome::Failed("still missing".into()))
            .unwrap();
    }
    assert_eq!(clear_alls, 3);
    assert_eq!(reported, Some((gs, "still missing".to_string())));
}

//! One full global snapshot round (phase 1 pre-check + phase 2 six steps) through the
//! sans-IO state machines only: zero-latency in-memory delivery, every host action completed
//! immediately. Two measurements per cluster size N:
//!
//! * `coordinator_only` — the coordinator's CPU cost alone, fed pre-built PRECHECK_OK and
//!   DONE envelopes from N−1 participants (goal: linear, < 2 µs per participant);
//! * `full_round` — the coordinator and all N−1 participant state machines together.
//!
//! Run: `cargo bench --bench snapshot_round`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use unacloud::snapshot::protocol::{
    ActionOutcome, Catalog, ClusterId, Coordinator, CoordinatorConfig, Envelope, GlobalSnapshotId,
    HostAction, Message, Output, Participant, ParticipantConfig, ParticipantId, ProtocolEvent,
};

const CLUSTER: ClusterId = ClusterId(1);
const SIZES: [u32; 4] = [16, 256, 4_096, 10_000];

fn outcome(action: &HostAction) -> ActionOutcome {
    match action {
        HostAction::CheckVmsRunning { .. } => ActionOutcome::VmsRunning(true),
        HostAction::TakeLocalSnapshots { .. } => ActionOutcome::SnapshotTaken {
            local_time: Duration::from_millis(1),
        },
        _ => ActionOutcome::Done,
    }
}

fn coordinator(n: u32) -> Coordinator {
    let ids = (1..n).map(ParticipantId).collect();
    let config = CoordinatorConfig::new(CLUSTER, ids, vec!["vm-0".into()]);
    Coordinator::new(config, Catalog::new(CLUSTER)).expect("valid configuration")
}

/// Drains the coordinator: completes its own actions at once; counts transmissions; returns
/// whether the global snapshot completed.
fn drain_coordinator(c: &mut Coordinator, now: Instant, sent: &mut usize) -> bool {
    let mut completed = false;
    while let Some(o) = c.poll_output() {
        match o {
            Output::Transmit(_) => *sent += 1,
            Output::Action { id, action } => c
                .handle_action_complete(now, id, outcome(&action))
                .expect("own action"),
            Output::Event(ProtocolEvent::GlobalSnapshotCompleted { .. }) => completed = true,
            Output::Event(_) => {}
        }
    }
    completed
}

/// The coordinator alone, answers pre-built.
fn coordinator_round(mut c: Coordinator, replies: (Vec<Envelope>, Vec<Envelope>), now: Instant) {
    let (prechecks, dones) = replies;
    let mut sent = 0;
    c.start_global_snapshot(now).expect("idle");
    drain_coordinator(&mut c, now, &mut sent);
    for e in prechecks {
        c.handle_message(now, e).expect("precheck ok");
    }
    drain_coordinator(&mut c, now, &mut sent);
    for e in dones {
        c.handle_message(now, e).expect("done");
    }
    let completed = drain_coordinator(&mut c, now, &mut sent);
    // PRECHECK, TAKE_SNAPSHOT and RELEASE to every participant.
    assert!(completed && sent == 3 * (c.config().participants.len()));
}

fn replies(n: u32) -> (Vec<Envelope>, Vec<Envelope>) {
    let gs = GlobalSnapshotId(1);
    let to_coordinator = |p: u32, message| {
        Envelope::new(
            CLUSTER,
            ParticipantId(p),
            ParticipantId::COORDINATOR,
            message,
        )
    };
    let prechecks = (1..n)
        .map(|p| to_coordinator(p, Message::PrecheckOk { gs }))
        .collect();
    let dones = (1..n)
        .map(|p| {
            let local_time = Duration::from_millis(1);
            to_coordinator(p, Message::Done { gs, local_time })
        })
        .collect();
    (prechecks, dones)
}

/// Coordinator and participants together, FIFO delivery, actions completed at once.
fn full_round(mut c: Coordinator, mut parts: Vec<Participant>, now: Instant) {
    let mut queue: std::collections::VecDeque<Envelope> = std::collections::VecDeque::new();
    c.start_global_snapshot(now).expect("idle");
    let mut completed = false;
    loop {
        while let Some(o) = c.poll_output() {
            match o {
                Output::Transmit(e) => queue.push_back(e),
                Output::Action { id, action } => c
                    .handle_action_complete(now, id, outcome(&action))
                    .expect("own action"),
                Output::Event(ProtocolEvent::GlobalSnapshotCompleted { .. }) => completed = true,
                Output::Event(_) => {}
            }
        }
        let Some(e) = queue.pop_front() else { break };
        if e.to.is_coordinator() {
            c.handle_message(now, e).expect("reply");
            continue;
        }
        let p = &mut parts[(e.to.0 - 1) as usize];
        p.handle_message(now, e).expect("request");
        while let Some(o) = p.poll_output() {
            match o {
                Output::Transmit(e) => queue.push_back(e),
                Output::Action { id, action } => p
                    .handle_action_complete(now, id, outcome(&action))
                    .expect("action"),
                Output::Event(_) => {}
            }
        }
    }
    assert!(completed);
}

fn participants(n: u32) -> Vec<Participant> {
    (1..n)
        .map(|p| {
            Participant::new(ParticipantConfig::new(
                CLUSTER,
                ParticipantId(p),
                vec![format!("vm-{p}")],
            ))
            .expect("valid participant")
        })
        .collect()
}

fn bench(cr: &mut Criterion) {
    let now = Instant::now();
    let mut g = cr.benchmark_group("snapshot_round/coordinator_only");
    for n in SIZES {
        g.throughput(Throughput::Elements(u64::from(n)));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_batched(
                || (coordinator(n), replies(n)),
                |(c, r)| coordinator_round(c, r, now),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
    let mut g = cr.benchmark_group("snapshot_round/full_round");
    for n in SIZES {
        g.throughput(Throughput::Elements(u64::from(n)));
        if n >= 4_096 {
            g.sample_size(20);
        }
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_batched(
                || (coordinator(n), participants(n)),
                |(c, p)| full_round(c, p, now),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

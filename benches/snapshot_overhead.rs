//! Coordination overhead of a global snapshot in the deterministic simulator.
//!
//! The thesis measured 1.1–1.4 s between the slowest local snapshot and the global one for
//! 4–16 VMs. Over a 0.2 ms LAN the protocol itself should cost two round trips (pre-check,
//! then TAKE_SNAPSHOT → DONE) plus the hand-offs of the host actions before DONE (one VM
//! check and steps 1, 2, 4 and 5; step 6 waits for RELEASE, after completion): `4·L + 5·h`. This bench runs the RCPBT ring with global
//! snapshots for N = 4, 8 and 16 and prints the simulated overhead next to that figure;
//! criterion measures the simulator's CPU cost per run.
//!
//! Run: `cargo bench --bench snapshot_overhead`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use unacloud::snapshot::sim::{simulate_ring, LinkConfig, RingConfig};

const SIZES: [usize; 3] = [4, 8, 16];
const LATENCY: Duration = Duration::from_micros(200);
const HAND_OFF: Duration = Duration::from_micros(50);

fn config(nodes: usize, seed: u64) -> RingConfig {
    RingConfig {
        nodes,
        tokens: 600,
        snapshot_every: 30,
        seed,
        link: LinkConfig {
            latency: LATENCY,
            jitter: Duration::ZERO,
            ..LinkConfig::default()
        },
        action_latency: HAND_OFF,
        local_snapshot_min: Duration::from_millis(1),
        local_snapshot_max: Duration::from_millis(3),
        ..RingConfig::default()
    }
}

fn report_overhead() {
    let expected = (4 * LATENCY + 5 * HAND_OFF).as_secs_f64() * 1e3;
    println!(
        "coordination overhead = global − slowest local snapshot, LAN latency {:?}, hand-off {:?}",
        LATENCY, HAND_OFF
    );
    println!("expected 2 round trips + 5 hand-offs = {expected:.3} ms");
    for n in SIZES {
        let mut overheads = Vec::new();
        let mut globals = Vec::new();
        let mut messages = Vec::new();
        for seed in 0..5 {
            let r = simulate_ring(config(n, seed)).expect("simulation runs");
            for s in r.snapshots.iter().filter(|s| s.status == "completed") {
                overheads.extend(s.coordination_overhead_ms);
                globals.extend(s.global_ms);
                messages.push(s.protocol_messages);
            }
        }
        overheads.sort_by(f64::total_cmp);
        globals.sort_by(f64::total_cmp);
        let median = |v: &[f64]| v[v.len() / 2];
        println!(
            "N={n:>2}: {} global snapshots, overhead median {:.3} ms (min {:.3}, max {:.3}), global median {:.3} ms, {} protocol messages each",
            overheads.len(),
            median(&overheads),
            overheads[0],
            overheads[overheads.len() - 1],
            median(&globals),
            messages[0],
        );
    }
}

fn bench(c: &mut Criterion) {
    report_overhead();
    let mut group = c.benchmark_group("ring_600_tokens_snapshot_every_30");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for n in SIZES {
        group.throughput(Throughput::Elements(600));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| simulate_ring(config(n, 1)).expect("simulation runs"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

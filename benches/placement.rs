//! Placement of 10,000 VMs on 1,000 hosts with every algorithm (goal: a whole plan in
//! under 50 ms).
//!
//! Run with `cargo bench --bench placement`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use unacloud::cloud::model::{HardwareProfile, Host};
use unacloud::cloud::placement::{place_best_effort, Algorithm, VmRequest};

const HOSTS: usize = 1_000;
const VMS: usize = 10_000;
const GB: u64 = 1_000_000_000;

/// A lab-like cluster: 8–24 free cores, 16–64 GiB, 60 GB of disk per host (thesis §2.4.7),
/// a user logged in on 30% of them, the first template preloaded on half of them.
fn hosts(rng: &mut ChaCha8Rng) -> Vec<Host> {
    (0..HOSTS)
        .map(|i| {
            let mut h = Host::new(
                format!("pc-{i:04}"),
                rng.gen_range(8..=24),
                rng.gen_range(16..=64) * 1024,
                60 * GB,
            );
            h.user_logged_in = rng.gen_bool(0.3);
            if rng.gen_bool(0.5) {
                h.preloaded_templates.push("ubuntu1604".into());
            }
            h
        })
        .collect()
}

/// Mostly Small VMs (70% Small, 20% Medium, 8% Large, 2% ExtraLarge) over three
/// templates, each needing 0.29 GB for its differencing image (thesis §4.4).
fn vms(rng: &mut ChaCha8Rng) -> Vec<VmRequest> {
    let templates = [
        ("ubuntu1604", 3_510_000_000),
        ("centos7", 4_200_000_000),
        ("debian9", 2_900_000_000),
    ];
    (0..VMS)
        .map(|i| {
            let p = match rng.gen_range(0..100) {
                0..=69 => HardwareProfile::Small,
                70..=89 => HardwareProfile::Medium,
                90..=97 => HardwareProfile::Large,
                _ => HardwareProfile::ExtraLarge,
            };
            let (t, bytes) = templates[rng.gen_range(0..templates.len())];
            VmRequest::new(format!("vm-{i:05}"), t, p).with_disk(290_000_000, bytes)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let hosts = hosts(&mut rng);
    let vms = vms(&mut rng);
    let mut group = c.benchmark_group("place_10000_vms_on_1000_hosts");
    group.sample_size(20);
    for alg in Algorithm::ALL {
        group.bench_with_input(BenchmarkId::from_parameter(alg), &alg, |b, &alg| {
            b.iter(|| {
                let plan = place_best_effort(black_box(&hosts), black_box(&vms), alg, Some(1))
                    .expect("valid input");
                black_box(plan.assignments.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

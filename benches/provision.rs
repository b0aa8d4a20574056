//! Provisioning benchmarks.
//!
//! * `checksum/*`: streaming BLAKE3 vs SHA-256 over 64 MiB (the catalog's default
//!   algorithm is chosen from this);
//! * `plan/*`: disk-aware placement of 10,000 VMs on 1,000 hosts plus grouping it into a
//!   deployment plan (goal: < 50 ms), and the grouping alone;
//! * `provision_vm/*`: one VM from a multiattach template with the real `qemu-img`
//!   (create the VM, create its qcow2 overlay, record it), with durable and relaxed
//!   settings writes (goal: ≤ 50 ms per VM);
//! * `provision_concurrent/*`: eight VMs from one multiattach template on one backend,
//!   one after the other and all at once (eight tasks on a two-worker runtime), durable
//!   writes: operations on different VMs run concurrently, so "all at once" overlaps
//!   the `qemu-img` runs and `fsync`s of the eight VMs.
//!
//! Run with `cargo bench --bench provision`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use unacloud::cloud::hypervisor::{DiskRef, Hypervisor};
use unacloud::cloud::model::{HardwareProfile, Host, VmId, VmSpec};
use unacloud::cloud::placement::{place, Algorithm, VmRequest};
use unacloud::cloud::provision::catalog::{ChecksumAlgorithm, ContentHasher};
use unacloud::cloud::provision::deploy::DeploymentPlan;
use unacloud::cloud::provision::multiattach::MultiattachManager;
use unacloud::cloud::qemu::{QemuHypervisor, QemuImg};

fn checksum(c: &mut Criterion) {
    let mut data = vec![0u8; 64 << 20];
    ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut data);
    let mut g = c.benchmark_group("checksum");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    for alg in [ChecksumAlgorithm::Blake3, ChecksumAlgorithm::Sha256] {
        g.bench_function(alg.as_str(), |b| {
            b.iter(|| {
                let mut h = ContentHasher::new(alg);
                for chunk in data.chunks(1 << 20) {
                    h.update(chunk);
                }
                black_box(h.finish())
            })
        });
    }
    g.finish();
}

fn cluster() -> (Vec<Host>, Vec<VmRequest>) {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let hosts: Vec<Host> = (0..1_000)
        .map(|i| {
            let mut h = Host::new(
                format!("pc-{i:04}"),
                rng.gen_range(8..=24),
                rng.gen_range(16..=64) * 1024,
                60_000_000_000,
            );
            if rng.gen_bool(0.5) {
                h.preloaded_templates.push("ubuntu@1".into());
            }
            h
        })
        .collect();
    let vms: Vec<VmRequest> = (0..10_000)
        .map(|i| {
            VmRequest::new(format!("vm-{i:05}"), "ubuntu@1", HardwareProfile::Small)
                .with_disk(290_000_000, 3_510_000_000)
        })
        .collect();
    (hosts, vms)
}

fn plan(c: &mut Criterion) {
    let (hosts, vms) = cluster();
    let mut g = c.benchmark_group("plan");
    g.sample_size(20);
    g.bench_function("disk_aware_place_and_plan_10k_vms_1k_hosts", |b| {
        b.iter(|| {
            let placement = place(&hosts, &vms, Algorithm::DiskAware, None).expect("placeable");
            black_box(DeploymentPlan::from_placement(&placement, &vms).expect("plan"))
        })
    });
    let placement = place(&hosts, &vms, Algorithm::DiskAware, None).expect("placeable");
    g.bench_function("group_plan_10k_vms", |b| {
        b.iter(|| black_box(DeploymentPlan::from_placement(&placement, &vms).expect("plan")))
    });
    g.finish();
}

fn provision_vm(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (dir, template) = template_1g(&rt);
    let mut g = c.benchmark_group("provision_vm");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    for durable in [true, false] {
        let root = dir.path().join(if durable { "durable" } else { "relaxed" });
        let hv = rt
            .block_on(QemuHypervisor::open(&root))
            .expect("backend")
            .with_durable_writes(durable);
        let t = rt
            .block_on(MultiattachManager::new(&hv).register_template(&template))
            .expect("template");
        let tref = DiskRef::Uuid(t.uuid);
        let mut n = 0u64;
        let name = if durable {
            "qemu_img_durable"
        } else {
            "qemu_img_relaxed"
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let spec = VmSpec::new(format!("vm-{n}"), HardwareProfile::Small);
                    let start = Instant::now();
                    rt.block_on(MultiattachManager::new(&hv).create_vm(&spec, &tref))
                        .expect("create");
                    total += start.elapsed();
                    rt.block_on(hv.unregister_vm(&VmId::new(format!("vm-{n}")), true))
                        .expect("delete");
                }
                total
            })
        });
    }
    g.finish();
}

/// A temporary folder holding a 1 GiB qcow2 template made with the real qemu-img.
fn template_1g(rt: &tokio::runtime::Runtime) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let template = dir.path().join("base.qcow2");
    rt.block_on(QemuImg::new().create(&template, "qcow2", 1 << 30))
        .expect("qemu-img must be installed (qemu-utils)");
    (dir, template)
}

fn provision_concurrent(c: &mut Criterion) {
    const VMS: usize = 8;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (dir, template) = template_1g(&rt);
    let hv = Arc::new(
        rt.block_on(QemuHypervisor::open(dir.path().join("host")))
            .expect("backend"),
    );
    let t = rt
        .block_on(MultiattachManager::new(&*hv).register_template(&template))
        .expect("template");
    let mut g = c.benchmark_group("provision_concurrent");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    let mut round = 0u64;
    for concurrent in [false, true] {
        let name = if concurrent {
            "8_vms_at_once"
        } else {
            "8_vms_one_by_one"
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    round += 1;
                    let names: Vec<String> = (0..VMS).map(|i| format!("c{round}-{i}")).collect();
                    let start = Instant::now();
                    rt.block_on(async {
                        if concurrent {
                            let mut tasks = tokio::task::JoinSet::new();
                            for n in &names {
                                let (hv, t) = (Arc::clone(&hv), t.clone());
                                let spec = VmSpec::new(n.clone(), HardwareProfile::Small);
                                tasks.spawn(async move {
                                    MultiattachManager::new(&*hv)
                                        .create_vm_from(&spec, &t)
                                        .await
                                        .map(drop)
                                });
                            }
                            while let Some(done) = tasks.join_next().await {
                                done.expect("task").expect("create");
                            }
                        } else {
                            for n in &names {
                                let spec = VmSpec::new(n.clone(), HardwareProfile::Small);
                                MultiattachManager::new(&*hv)
                                    .create_vm_from(&spec, &t)
                                    .await
                                    .expect("create");
                            }
                        }
                    });
                    total += start.elapsed();
                    for n in &names {
                        rt.block_on(hv.unregister_vm(&VmId::new(n.clone()), true))
                            .expect("delete");
                    }
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, checksum, plan, provision_vm, provision_concurrent);
criterion_main!(benches);

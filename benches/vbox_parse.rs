//! VirtualBox settings benchmarks.
//!
//! * `vbox_parse/1000_snapshots_2_disks`: throughput of `MachineSettings::parse_str`
//!   on a generated `.vbox` with 1,000 snapshots (seeded branching tree) and 2 disks.
//! * `vbox_migration_set/10000_snapshots`: `Machine::migration_set` for the current
//!   snapshot (selected by uuid) of a 10,000-snapshot tree, without and with reading
//!   file sizes (the files do not exist, so each costs one failed `stat`).
//! * `vbox_extract/rust_vs_python`: the same parse + extraction (media registry,
//!   snapshot tree, migration set of the current state) timed in Rust and in a plain
//!   Python `xml.etree` script (`benches/python/vbox_extract.py`) run side by side;
//!   prints both medians and the ratio. Skipped with a note if `python3` is missing.
//!
//! Run: `cargo bench --bench vbox_parse`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use unacloud_vbox::settings::MachineSettings;
use unacloud_vbox::synth::{generate, SynthSpec, TreeShape};
use unacloud_vbox::tracker::{Machine, MigrationOptions};

fn spec(snapshots: usize) -> SynthSpec {
    SynthSpec {
        name: "TM".into(),
        snapshots,
        disks: 2,
        shape: TreeShape::Tree { branch_percent: 10 },
        saved_state_percent: 80,
        seed: 2024,
        ..SynthSpec::default()
    }
}

fn parse(c: &mut Criterion) {
    let machine = generate(&spec(1_000));
    let xml = machine.xml;
    let mut group = c.benchmark_group("vbox_parse");
    group.throughput(Throughput::Bytes(xml.len() as u64));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function(BenchmarkId::new("1000_snapshots_2_disks", xml.len()), |b| {
        b.iter(|| MachineSettings::parse_str(std::hint::black_box(&xml)).map(|m| m.snapshots.len()))
    });
    group.finish();
}

fn migration_set(c: &mut Criterion) {
    let g = generate(&spec(10_000));
    let current = g.current_snapshot.map(|i| g.snapshots[i].uuid.to_string());
    let selector = current.unwrap_or_else(|| "current".into());
    let settings = MachineSettings::parse_str(&g.xml).expect("generated settings parse");
    let dir = std::env::temp_dir().join("unacloud-bench-does-not-exist");
    let machine =
        Machine::from_settings(settings, dir.join("TM.vbox"), None).expect("machine builds");
    let mut group = c.benchmark_group("vbox_migration_set");
    group.sample_size(50);
    for (name, measure_sizes) in [("10000_snapshots", false), ("10000_snapshots_stat", true)] {
        let options = MigrationOptions {
            measure_sizes,
            ..MigrationOptions::default()
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                machine
                    .migration_set(std::hint::black_box(&selector), &options)
                    .map(|s| s.files.len())
            })
        });
    }
    group.finish();
}

/// Parse + extract, the work the Python script repeats.
fn rust_extract(xml: &str, path: &Path) -> (usize, usize, usize) {
    let settings = MachineSettings::parse_str(xml).expect("generated settings parse");
    let snapshots = settings.snapshots.len();
    let disks = settings.media.hard_disks.len();
    let machine = Machine::from_settings(settings, path, None).expect("machine builds");
    let options = MigrationOptions {
        measure_sizes: false,
        ..MigrationOptions::default()
    };
    let set = machine
        .migration_set("current", &options)
        .expect("current state has a migration set");
    (snapshots, disks, set.files.len())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn versus_python(c: &mut Criterion) {
    let g = generate(&spec(1_000));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("TM.vbox");
    std::fs::write(&path, &g.xml).expect("write generated settings");

    let mut group = c.benchmark_group("vbox_extract");
    group.throughput(Throughput::Bytes(g.xml.len() as u64));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("rust_parse_and_extract", |b| {
        b.iter(|| rust_extract(std::hint::black_box(&g.xml), &path))
    });
    group.finish();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/python/vbox_extract.py");
    let iterations = 15;
    let out = match Command::new("python3")
        .arg(&script)
        .arg(&path)
        .arg(iterations.to_string())
        .output()
    {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            eprintln!(
                "vbox_extract: python3 script failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        Err(e) => {
            eprintln!("vbox_extract: python3 not available ({e}); skipping the comparison");
            return;
        }
    };
    // Same protocol as the script, in the same run: median of `iterations` runs,
    // each reading the file as the script does.
    let mut times = Vec::with_capacity(iterations);
    let mut found = (0, 0, 0);
    for _ in 0..iterations {
        let start = Instant::now();
        let xml = std::fs::read_to_string(&path).expect("read generated settings");
        found = rust_extract(&xml, &path);
        times.push(start.elapsed().as_secs_f64());
    }
    let rust = median(times);
    let text = String::from_utf8_lossy(&out.stdout);
    let py: serde_json::Value = serde_json::from_str(text.trim()).expect("script prints JSON");
    let py_median = py["median_seconds"].as_f64().unwrap_or(f64::NAN);
    let same = py["snapshots"].as_u64() == Some(found.0 as u64)
        && py["hard_disks"].as_u64() == Some(found.1 as u64)
        && py["migration_files"].as_u64() == Some(found.2 as u64);
    println!(
        "vbox_extract: {} bytes, {} snapshots, {} hard disks, {} files in the migration set",
        g.xml.len(),
        found.0,
        found.1,
        found.2
    );
    println!(
        "vbox_extract: python {} xml.etree median {:.2} ms ({:.1} MB/s); rust median {:.2} ms ({:.1} MB/s); rust is {:.1}x faster{}",
        py["python"].as_str().unwrap_or("?"),
        py_median * 1e3,
        g.xml.len() as f64 / py_median / 1e6,
        rust * 1e3,
        g.xml.len() as f64 / rust / 1e6,
        py_median / rust,
        if same { "" } else { " (WARNING: the two extractions disagree)" }
    );
}

criterion_group!(benches, parse, migration_set, versus_python);
criterion_main!(benches);

//! VirtualBox settings benchmarks.
//!
//! * `vbox_parse/1000_snapshots_2_disks_{deep,bushy}`: throughput of
//!   `MachineSettings::parse_str` on a generated `.vbox` with 1,000 snapshots (seeded
//!   branching tree, two shapes: see [`SHAPES`]) and 2 disks.
//! * `vbox_migration_set/10000_snapshots`: `Machine::migration_set` for the current
//!   snapshot (selected by uuid) of a 10,000-snapshot tree, without and with reading
//!   file sizes (the files do not exist, so each costs one failed `stat`).
//! * `vbox_extract_parts/{quick_xml_alone,from_settings,drop_machine}_{deep,bushy}`:
//!   the parts of the extraction below, each timed alone.
//! * `vbox_extract/rust_vs_python`: the same parse + extraction (everything
//!   `MachineSettings` holds: machine identity, hardware of the current state and of
//!   every snapshot, media registry, snapshot tree; then the migration set of the
//!   current state) timed in Rust and in a plain
//!   Python `xml.etree` script (`benches/python/vbox_extract.py`) run side by side in
//!   alternating rounds; prints both times, the ratio, and whether both sides found
//!   the same counts. Skipped with a note if `python3` is missing. A third side,
//!   timed in the same rounds, reads the file and runs quick-xml alone (tokenize,
//!   dispatch on the event kind, keep the stack of element names, extract nothing):
//!   no parser built on quick-xml can be faster than that, so its ratio against
//!   Python is the ceiling for this crate's approach on the machine at hand.
//!
//! Run: `cargo bench --bench vbox_parse`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use unacloud_vbox::settings::MachineSettings;
use unacloud_vbox::synth::{generate, SynthSpec, TreeShape};
use unacloud_vbox::tracker::{Machine, MigrationOptions};

/// The two tree shapes measured: `deep` (10% of snapshots start a branch, so long
/// chains up to VirtualBox's depth limit of 250 and deeply indented XML) and `bushy`
/// (50%, a shallower tree).
const SHAPES: [(&str, u8); 2] = [("deep", 10), ("bushy", 50)];

fn spec(snapshots: usize) -> SynthSpec {
    spec_shaped(snapshots, SHAPES[0].1)
}

fn spec_shaped(snapshots: usize, branch_percent: u8) -> SynthSpec {
    SynthSpec {
        name: "TM".into(),
        snapshots,
        disks: 2,
        shape: TreeShape::Tree { branch_percent },
        saved_state_percent: 80,
        seed: 2024,
        ..SynthSpec::default()
    }
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("vbox_parse");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(8));
    for (label, branch) in SHAPES {
        let xml = generate(&spec_shaped(1_000, branch)).xml;
        group.throughput(Throughput::Bytes(xml.len() as u64));
        group.bench_function(
            BenchmarkId::new(format!("1000_snapshots_2_disks_{label}"), xml.len()),
            |b| {
                b.iter(|| {
                    MachineSettings::parse_str(std::hint::black_box(&xml))
                        .map(|m| m.snapshots.len())
                })
            },
        );
    }
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

/// What both sides report having found, so the bench can check they did the same work.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Found {
    snapshots: usize,
    hard_disks: usize,
    adapters: usize,
    controllers: usize,
    devices: usize,
    migration_files: usize,
}

impl Found {
    fn from_python(v: &serde_json::Value) -> Found {
        let n = |k: &str| v[k].as_u64().unwrap_or(u64::MAX) as usize;
        Found {
            snapshots: n("snapshots"),
            hard_disks: n("hard_disks"),
            adapters: n("adapters"),
            controllers: n("controllers"),
            devices: n("devices"),
            migration_files: n("migration_files"),
        }
    }
}

/// Parse + extract, the work the Python script repeats.
fn rust_extract(xml: &str, path: &Path) -> Found {
    let settings = MachineSettings::parse_str(xml).expect("generated settings parse");
    let states =
        std::iter::once(&settings.hardware).chain(settings.snapshots.iter().map(|s| &s.hardware));
    let (mut adapters, mut controllers, mut devices) = (0, 0, 0);
    for hw in states {
        adapters += hw.network_adapters.len();
        controllers += hw.storage_controllers.len();
        devices += hw
            .storage_controllers
            .iter()
            .map(|c| c.devices.len())
            .sum::<usize>();
    }
    let snapshots = settings.snapshots.len();
    let hard_disks = settings.media.hard_disks.len();
    let machine = Machine::from_settings(settings, path, None).expect("machine builds");
    let options = MigrationOptions {
        measure_sizes: false,
        ..MigrationOptions::default()
    };
    let set = machine
        .migration_set("current", &options)
        .expect("current state has a migration set");
    Found {
        snapshots,
        hard_disks,
        adapters,
        controllers,
        devices,
        migration_files: set.files.len(),
    }
}

/// The least work any parser built on quick-xml's event reader does: every event is
/// read and dispatched on its kind, start tags give their local name, and end tags
/// are checked against the open ones (as the real parser configures it). Returns the
/// number of elements, so the work cannot be optimised away.
fn quick_xml_alone(xml: &str) -> usize {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut open: Vec<usize> = Vec::with_capacity(64);
    let mut elements = 0;
    loop {
        match reader
            .read_event()
            .expect("generated settings are well-formed")
        {
            Event::Start(e) => {
                elements += 1;
                open.push(e.local_name().as_ref().len());
            }
            Event::Empty(e) => {
                elements += 1;
                std::hint::black_box(e.local_name());
            }
            Event::End(_) => {
                open.pop();
            }
            Event::Text(t) => {
                std::hint::black_box(t.len());
            }
            Event::Eof => return elements,
            _ => {}
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn versus_python(c: &mut Criterion) {
    for (label, branch) in SHAPES {
        versus_python_shaped(c, label, branch);
    }
}

fn versus_python_shaped(c: &mut Criterion, label: &str, branch: u8) {
    let g = generate(&spec_shaped(1_000, branch));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("TM.vbox");
    std::fs::write(&path, &g.xml).expect("write generated settings");

    let mut group = c.benchmark_group("vbox_extract");
    group.throughput(Throughput::Bytes(g.xml.len() as u64));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function(format!("rust_parse_and_extract_{label}"), |b| {
        b.iter(|| rust_extract(std::hint::black_box(&g.xml), &path))
    });
    group.finish();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/python/vbox_extract.py");
    // The machine may be shared and noisy: alternate the sides in rounds (each round:
    // the script times 5 runs of its own loop, then Rust and quick-xml alone take 5
    // turns each, every run reading the file) and compare each side's best run per
    // round.
    let rounds = 7;
    let per_round = 5;
    let mut py_best = Vec::with_capacity(rounds);
    let mut rust_best = Vec::with_capacity(rounds);
    let mut ratios = Vec::with_capacity(rounds);
    let mut floor_best = Vec::with_capacity(rounds);
    let mut floor_ratios = Vec::with_capacity(rounds);
    let mut py_version = String::new();
    let mut same = true;
    let mut found = Found::default();
    for _ in 0..rounds {
        let out = match Command::new("python3")
            .arg(&script)
            .arg(&path)
            .arg(per_round.to_string())
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
        let text = String::from_utf8_lossy(&out.stdout);
        let py: serde_json::Value = serde_json::from_str(text.trim()).expect("script prints JSON");
        let py_min = py["min_seconds"].as_f64().unwrap_or(f64::NAN);
        py_version = py["python"].as_str().unwrap_or("?").to_string();
        // Rust and quick-xml alone take turns, so both see the same conditions.
        let (mut best, mut floor) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..per_round {
            let start = Instant::now();
            let xml = std::fs::read_to_string(&path).expect("read generated settings");
            found = rust_extract(&xml, &path);
            drop(xml);
            best = best.min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            let xml = std::fs::read_to_string(&path).expect("read generated settings");
            std::hint::black_box(quick_xml_alone(&xml));
            drop(xml);
            floor = floor.min(start.elapsed().as_secs_f64());
        }
        same &= Found::from_python(&py) == found;
        py_best.push(py_min);
        rust_best.push(best);
        ratios.push(py_min / best);
        floor_best.push(floor);
        floor_ratios.push(py_min / floor);
    }
    let bytes = g.xml.len() as f64;
    let py_med = median(py_best);
    let rust_med = median(rust_best);
    println!(
        "vbox_extract[{label}]: {} bytes, {} snapshots, {} hard disks, {} network adapters, {} storage controllers, {} attached devices, {} files in the migration set",
        g.xml.len(),
        found.snapshots,
        found.hard_disks,
        found.adapters,
        found.controllers,
        found.devices,
        found.migration_files
    );
    println!(
        "vbox_extract[{label}]: python {py_version} xml.etree {:.2} ms ({:.1} MB/s); rust {:.2} ms ({:.1} MB/s); rust is {:.1}x faster (median of {rounds} alternating rounds; per-round ratios {:.1}..{:.1}){}",
        py_med * 1e3,
        bytes / py_med / 1e6,
        rust_med * 1e3,
        bytes / rust_med / 1e6,
        median(ratios.clone()),
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
        if same { "" } else { " (WARNING: the two extractions disagree)" }
    );
    let floor_med = median(floor_best);
    println!(
        "vbox_extract[{label}]: quick-xml alone (read + tokenize + dispatch, no extraction) {:.2} ms ({:.1} MB/s) = {:.1}x python, the ceiling for a quick-xml parser here; the parser's extraction adds {:.2} ms",
        floor_med * 1e3,
        bytes / floor_med / 1e6,
        median(floor_ratios),
        rust_med * 1e3 - floor_med * 1e3
    );
}

/// The parts of the extraction, to show where its time goes: quick-xml alone on the
/// input in memory (compare with `vbox_parse/…`), `Machine::from_settings` and freeing
/// the machine (setup and the other part are outside the timing).
fn extract_parts(c: &mut Criterion) {
    let mut group = c.benchmark_group("vbox_extract_parts");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    for (label, branch) in SHAPES {
        let xml = generate(&spec_shaped(1_000, branch)).xml;
        let settings = MachineSettings::parse_str(&xml).expect("generated settings parse");
        let path = std::env::temp_dir().join("unacloud-bench-does-not-exist/TM.vbox");
        let build = || Machine::from_settings(settings.clone(), &path, None);
        group.bench_function(format!("quick_xml_alone_{label}"), |b| {
            b.iter(|| quick_xml_alone(std::hint::black_box(&xml)))
        });
        group.bench_function(format!("from_settings_{label}"), |b| {
            b.iter_batched(
                || settings.clone(),
                |s| Machine::from_settings(s, &path, None),
                BatchSize::LargeInput,
            )
        });
        group.bench_function(format!("drop_machine_{label}"), |b| {
            b.iter_batched(build, drop, BatchSize::LargeInput)
        });
    }
    group.finish();
}

criterion_group!(benches, parse, migration_set, extract_parts, versus_python);
criterion_main!(benches);

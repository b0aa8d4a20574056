//! `vm_bench`: what running real VMs costs with the QEMU backend, on the reference guest
//! image (`scripts/guest-image`).
//!
//! ```text
//! cargo run --release --example vm_bench -- [--memory-mb 128] [--runs 5] [--accel tcg] [--json]
//! ```
//!
//! For one VM of `--memory-mb` it measures, `--runs` times each:
//! * boot to the guest's first heartbeat;
//! * a live snapshot (disk and memory at one instant): how long the guest was paused
//!   and the time until the state was durable, beside the time to write the same number
//!   of bytes once to the same disk with `fsync` (the floor for any memory snapshot);
//! * restore + start to the first heartbeat after a power-off;
//! * the bytes to copy to resume the snapshot on another host (the minimal set), beside
//!   the template's size, and that the moved VM really continues there.
//!
//! Needs `qemu-system-x86_64` and the guest image (`./scripts/guest-image`); the figures
//! are recorded in BENCHMARKS.md.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;
use unacloud::cloud::files::FileRole;
use unacloud::cloud::hypervisor::{AttachSpec, DiskRef, Hypervisor};
use unacloud::cloud::model::{DiskType, HardwareProfile, Uuid, VmId, VmSpec};
use unacloud::cloud::qemu::{
    kill_all_under, Accel, BootFiles, QemuHypervisor, QemuImg, QemuSystem, StartOptions,
};

#[derive(Debug, Parser)]
#[command(
    name = "vm_bench",
    about = "Boot, live snapshot, restore and move costs of real VMs"
)]
struct Cli {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory_mb: u64,
    /// Repetitions of each measurement.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, default_value = "tcg")]
    accel: Accel,
    /// Folder of the guest image (vmlinuz, initrd.img, rootfs.qcow2).
    #[arg(long, default_value = "target/guest")]
    guest: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
    samples: usize,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Stats {
        median: if n == 0 {
            0.0
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        },
        min: v.first().copied().unwrap_or(0.0),
        max: v.last().copied().unwrap_or(0.0),
        samples: n,
    }
}

#[derive(Debug, Serialize)]
struct Report {
    accel: String,
    memory_mb: u64,
    boot_to_heartbeat_ms: Stats,
    live_snapshot_downtime_ms: Stats,
    live_snapshot_total_ms: Stats,
    write_state_once_ms: Stats,
    state_bytes: u64,
    background_snapshot: bool,
    restore_start_to_heartbeat_ms: Stats,
    start_to_running_after_restore_ms: Stats,
    moved_bytes: u64,
    moved_disk_bytes: u64,
    template_bytes: u64,
    template_virtual_bytes: u64,
    moved_guest_continued: bool,
}

struct Reaper(PathBuf);
impl Drop for Reaper {
    fn drop(&mut self) {
        kill_all_under(&self.0);
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(r) => {
            if cli.json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                print_human(&r);
            }
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            let _ = writeln!(std::io::stderr(), "vm_bench: {msg}");
            std::process::exit(2);
        }
    }
}

async fn host(dir: &Path, name: &str, guest: &Path, accel: Accel) -> Res<(QemuHypervisor, Uuid)> {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("templates"))?;
    let t = root.join("templates/rootfs.qcow2");
    std::fs::copy(guest.join("rootfs.qcow2"), &t)?;
    let hv =
        QemuHypervisor::open_configured(&root, QemuImg::new(), QemuSystem::new().with_accel(accel))
            .await?;
    let d = hv.register_disk(&t).await?;
    hv.set_disk_type(&DiskRef::Uuid(d.uuid), DiskType::MultiAttach)
        .await?;
    hv.set_boot_files(
        &DiskRef::Uuid(d.uuid),
        BootFiles {
            kernel: guest.join("vmlinuz"),
            initrd: Some(guest.join("initrd.img")),
            cmdline: Some("quiet".into()),
        },
    )
    .await?;
    Ok((hv, d.uuid))
}

async fn run(cli: &Cli) -> Res<Report> {
    for f in ["vmlinuz", "initrd.img", "rootfs.qcow2"] {
        if !cli.guest.join(f).exists() {
            return Err(format!(
                "{} is missing; run ./scripts/guest-image",
                cli.guest.join(f).display()
            )
            .into());
        }
    }
    let base = std::env::current_dir()?.join("target");
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::tempdir_in(&base)?;
    let _reap = Reaper(dir.path().to_path_buf());
    let (a, t) = host(dir.path(), "a", &cli.guest, cli.accel).await?;
    let (b, _) = host(dir.path(), "b", &cli.guest, cli.accel).await?;
    let wait = StartOptions {
        wait_guest: Some(Duration::from_secs(180)),
    };
    let (mut boot, mut down, mut total, mut once) = (vec![], vec![], vec![], vec![]);
    let (mut restore, mut running) = (vec![], vec![]);
    let mut state_bytes = 0;
    let mut background = false;
    let mut accel = String::new();
    let mut last_set = None;
    for i in 0..cli.runs {
        let name = format!("bench-{i}");
        let spec = VmSpec::new(&name, HardwareProfile::Small)
            .with_memory_mb(cli.memory_mb)
            .with_cores(1);
        a.create_vm(&spec).await?;
        let vm = VmId::from(name.as_str());
        a.attach_disk(&vm, &AttachSpec::sata(DiskRef::Uuid(t)))
            .await?;
        let s = a.start_vm_with(&vm, wait).await?;
        accel = s.accel.clone();
        boot.push(s.boot_ms.unwrap_or(0) as f64);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = a.take_snapshot_with(&vm, "s1", None, true).await?;
        down.push(r.downtime_ms);
        total.push(r.total_ms);
        state_bytes = r.state_bytes;
        background = r.background;
        once.push(write_once(&dir.path().join("a"), r.state_bytes)?);
        a.power_off(&vm).await?;
        let t0 = Instant::now();
        a.restore_snapshot(&vm, "s1").await?;
        let s = a.start_vm_with(&vm, wait).await?;
        restore.push(t0.elapsed().as_secs_f64() * 1e3);
        running.push(s.running_ms as f64);
        a.power_off(&vm).await?;
        if i + 1 == cli.runs {
            last_set = Some((vm.clone(), a.snapshot_files(&vm, "s1").await?));
        } else {
            a.unregister_vm(&vm, true).await?;
        }
    }
    // Move the last VM's snapshot to host b and resume it there.
    let (vm, set) = last_set.ok_or("--runs must be at least 1")?;
    let src = dir.path().join("a/vms").join(vm.as_str());
    let dst = dir.path().join("b/vms").join(vm.as_str());
    let mut moved = 0;
    let mut settings = None;
    for f in &set.files {
        let to = dst.join(f.path.strip_prefix(&src)?);
        std::fs::create_dir_all(to.parent().ok_or("no parent")?)?;
        moved += std::fs::copy(&f.path, &to)?;
        if f.role == FileRole::Settings {
            settings = Some(to);
        }
    }
    b.register_vm(&settings.ok_or("no settings in the set")?)
        .await?;
    let there = b.start_vm_with(&vm, wait).await?;
    let continued = there.resumed_state && there.first_heartbeat.is_some_and(|h| h > 1);
    b.power_off(&vm).await?;
    let template = cli.guest.join("rootfs.qcow2");
    let info = QemuImg::new().info(&template).await?;
    Ok(Report {
        accel,
        memory_mb: cli.memory_mb,
        boot_to_heartbeat_ms: stats(boot),
        live_snapshot_downtime_ms: stats(down),
        live_snapshot_total_ms: stats(total),
        write_state_once_ms: stats(once),
        state_bytes,
        background_snapshot: background,
        restore_start_to_heartbeat_ms: stats(restore),
        start_to_running_after_restore_ms: stats(running),
        moved_bytes: moved,
        moved_disk_bytes: set
            .files
            .iter()
            .filter(|f| f.role == FileRole::Disk)
            .filter_map(|f| f.bytes)
            .sum(),
        template_bytes: std::fs::metadata(&template)?.len(),
        template_virtual_bytes: info.virtual_size,
        moved_guest_continued: continued,
    })
}

/// Writes `bytes` of incompressible data once to a new file in `dir` and fsyncs it.
fn write_once(dir: &Path, bytes: u64) -> Res<f64> {
    use rand::RngCore;
    let mut buf = vec![0u8; 1 << 20];
    rand::thread_rng().fill_bytes(&mut buf);
    let path = dir.join("write-once.bin");
    let t0 = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(ms)
}

fn print_human(r: &Report) {
    let row = |name: &str, s: &Stats| {
        println!(
            "{name:<40} median {:>8.1} ms  (min {:.1}, max {:.1}, n={})",
            s.median, s.min, s.max, s.samples
        )
    };
    println!("accelerator {}, guest memory {} MiB", r.accel, r.memory_mb);
    row("boot to first heartbeat", &r.boot_to_heartbeat_ms);
    row("live snapshot: guest paused", &r.live_snapshot_downtime_ms);
    row("live snapshot: until durable", &r.live_snapshot_total_ms);
    row("writing the state once (fsync)", &r.write_state_once_ms);
    row(
        "restore + start to first heartbeat",
        &r.restore_start_to_heartbeat_ms,
    );
    row(
        "start to running after restore (state loaded)",
        &r.start_to_running_after_restore_ms,
    );
    println!(
        "state file {} bytes (background-snapshot: {}); moved {} bytes ({} of disk) to resume elsewhere; template {} bytes ({} virtual); guest continued there: {}",
        r.state_bytes, r.background_snapshot, r.moved_bytes, r.moved_disk_bytes, r.template_bytes, r.template_virtual_bytes, r.moved_guest_continued
    );
}

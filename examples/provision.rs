//! Provision VMs from one multiattach template on simulated hosts, for real, with
//! `qemu-img`.
//!
//! ```text
//! cargo run --release --example provision -- --backend qemu --template-size 1GiB \
//!     --vms 200 --hosts 50 --out /tmp/provision-demo [--json]
//! ```
//!
//! Creates a qcow2 template filled with data under `<out>/templates` and adds it to a
//! template catalog (`<out>/templates/catalog.json`), registers it as a multiattach disk
//! on every simulated host `<out>/hosts/host-<i>` (or copies it there first with
//! `--preload`), places the VMs with the disk-aware placement, provisions them (each VM
//! gets its own qcow2 overlay of the template) and prints a report. With `--json` the
//! report is one JSON object:
//! `{"vms_created","vms_failed","template_bytes","vm_disk_bytes_on_disk":[…],"full_copy_bytes","elapsed_ms","per_vm_ms":[…]}`.
//! Sizes on disk are allocated blocks (`st_blocks × 512`), not apparent lengths;
//! `full_copy_bytes` is what full copies of the template would take (VMs × template);
//! `elapsed_ms` covers placement and provisioning (not creating the template).
//!
//! Run again on the same `--out` after a crash (or a Ctrl-C), it finishes the job: the
//! published template and the hosts are reused (each backend settles the operations
//! that were interrupted when it opens its root), VMs already complete are kept and
//! half-made ones are made again. Errors are printed with their whole cause chain;
//! output cut short by a closed pipe (`| head`) ends the program quietly.

use std::collections::HashMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;
use rand::{RngCore, SeedableRng};
use unacloud::cloud::hypervisor::{DiskRef, Hypervisor};
use unacloud::cloud::model::{DiskFormat, DiskInfo, DiskType, HardwareProfile, Host};
use unacloud::cloud::placement::{place, Algorithm, VmRequest};
use unacloud::cloud::provision::allocated_bytes;
use unacloud::cloud::provision::catalog::{Catalog, ImageSettings, NewTemplate};
use unacloud::cloud::provision::deploy::{
    deploy, CancellationToken, DeployOptions, DeploymentPlan, HostTarget, VmResult,
};
use unacloud::cloud::provision::multiattach::MultiattachManager;
use unacloud::cloud::provision::preload::preload;
use unacloud::cloud::qemu::{QemuHypervisor, QemuImg};

/// An error with every cause below it (`I/O error on <file>: <why>`).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    unacloud::cloud::error::chain(e)
}

/// Writes one line of the report; a closed pipe (`provision | head`) ends the program
/// quietly instead of panicking like `println!`.
fn out(line: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    let res = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    match res {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: writing the report: {e}");
            std::process::exit(2);
        }
    }
}

macro_rules! outln {
    ($($arg:tt)*) => { out(format_args!($($arg)*)) };
}

#[derive(Parser, Debug)]
#[command(about = "Provision VMs from a multiattach template on simulated hosts")]
struct Args {
    /// Hypervisor backend; `qemu` (real qemu-img) is the one that runs on this machine.
    #[arg(long, default_value = "qemu")]
    backend: String,
    /// Template size: bytes, or with a unit (KiB, MiB, GiB, TiB, KB, MB, GB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    template_size: u64,
    /// Percentage of the template filled with (incompressible) data.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    fill_percent: u8,
    /// Number of VMs.
    #[arg(long, default_value_t = 10)]
    vms: usize,
    /// Number of simulated hosts.
    #[arg(long, default_value_t = 2)]
    hosts: usize,
    /// Output folder: new or empty, or the folder of an earlier run of the same
    /// command, which is then finished (complete VMs are kept, half-made ones re-made).
    #[arg(long)]
    out: PathBuf,
    /// Copy the template into each host's own store first (with a progress bar) instead
    /// of sharing the one under `<out>/templates`.
    #[arg(long)]
    preload: bool,
    /// Hosts provisioned at the same time.
    #[arg(long, default_value_t = 8)]
    parallel_hosts: usize,
    /// Hardware profile of every VM.
    #[arg(long, default_value = "small")]
    profile: HardwareProfile,
    /// Skip the fsync after each settings/registry write (still atomic; a power cut may
    /// lose the latest changes).
    #[arg(long)]
    relaxed_writes: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?} must start with a number"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        u => {
            return Err(format!(
                "unknown size unit {u:?}; use KiB, MiB, GiB, TiB, KB, MB, GB"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("size {s:?} is zero or too large"))
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn bar(done: usize, total: usize, what: &str) {
    let width = 30;
    let filled = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r{what} [{}{}] {done}/{total}",
        "#".repeat(filled),
        ".".repeat(width - filled)
    );
    if done >= total {
        let _ = writeln!(err);
    }
    let _ = err.flush();
}

/// Writes a raw image with `fill` bytes of pseudo-random data, converts it to qcow2. On
/// any error (a full disk) neither the raw image nor a partial qcow2 is left behind.
async fn create_template(dir: &Path, size: u64, fill: u64, quiet: bool) -> Result<PathBuf, String> {
    let raw = dir.join(".base.raw");
    let qcow = dir.join("base.qcow2");
    let made = async {
        {
            let mut f =
                std::fs::File::create(&raw).map_err(|e| format!("{}: {e}", raw.display()))?;
            f.set_len(size)
                .map_err(|e| format!("{}: {e}", raw.display()))?;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1604);
            let mut buf = vec![0u8; 4 << 20];
            let mut written = 0u64;
            while written < fill {
                let n = (fill - written).min(buf.len() as u64) as usize;
                rng.fill_bytes(&mut buf[..n]);
                f.write_all(&buf[..n])
                    .map_err(|e| format!("{}: {e}", raw.display()))?;
                written += n as u64;
                if !quiet {
                    let mib = |b: u64| (b >> 20) as usize;
                    bar(mib(written), mib(fill).max(1), "template data (MiB)");
                }
            }
        }
        QemuImg::new()
            .convert(&raw, "raw", &qcow, "qcow2")
            .await
            .map_err(|e| chain(&e))
    }
    .await;
    let _ = std::fs::remove_file(&raw);
    if let Err(e) = made {
        let _ = std::fs::remove_file(&qcow);
        return Err(e);
    }
    Ok(qcow)
}

/// The published template of an earlier run whose image is in place, if any.
fn earlier_template(
    catalog: &Catalog,
    templates: &Path,
) -> Option<unacloud::cloud::provision::catalog::TemplateVersion> {
    let tv = catalog.latest_published("base").ok()?;
    let meta = std::fs::metadata(templates.join(&tv.file_name)).ok()?;
    (meta.len() == tv.size_bytes).then(|| tv.clone())
}

/// Registers the template on a host as multiattach, or finds it registered by an
/// earlier run (finishing a registration that stopped before the type change).
async fn host_template(hv: &QemuHypervisor, path: &Path) -> Result<DiskInfo, String> {
    let disks = hv.list_disks().await.map_err(|e| chain(&e))?;
    let canon = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(d) = disks.into_iter().find(|d| d.location == canon) {
        if d.disk_type != DiskType::MultiAttach {
            hv.set_disk_type(&DiskRef::Uuid(d.uuid), DiskType::MultiAttach)
                .await
                .map_err(|e| chain(&e))?;
        }
        return Ok(DiskInfo {
            disk_type: DiskType::MultiAttach,
            ..d
        });
    }
    MultiattachManager::new(hv)
        .register_template(path)
        .await
        .map_err(|e| chain(&e))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn run(args: Args) -> Result<bool, String> {
    if args.backend != "qemu" {
        return Err(format!(
            "backend {:?} cannot provision on this machine; use --backend qemu",
            args.backend
        ));
    }
    if args.hosts == 0 || args.vms == 0 {
        return Err("--vms and --hosts must be at least 1".into());
    }
    let quiet = args.json;
    let templates = args.out.join("templates");
    let catalog_path = templates.join("catalog.json");
    // A folder holding only what a run makes (`templates`, `hosts`) is an earlier run,
    // however early it stopped.
    let entries: Vec<String> = match std::fs::read_dir(&args.out) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("{}: {e}", args.out.display())),
    };
    let resume = !entries.is_empty();
    if entries.iter().any(|n| {
        !matches!(
            n.as_str(),
            "templates" | "hosts" | "plan.json" | ".plan.json.tmp"
        )
    }) {
        return Err(format!(
            "{} is not empty and is not the folder of an earlier run; choose a new --out folder",
            args.out.display()
        ));
    }
    std::fs::create_dir_all(&templates).map_err(|e| format!("{}: {e}", templates.display()))?;

    // 1. The template and its catalog entry (an earlier run's, when it got that far).
    let mut catalog = Catalog::open(&catalog_path).map_err(|e| chain(&e))?;
    let tv = match earlier_template(&catalog, &templates) {
        Some(tv) => {
            if !quiet {
                let _ = writeln!(
                    std::io::stderr(),
                    "resuming in {}: template {}",
                    args.out.display(),
                    tv.id()
                );
            }
            tv
        }
        None => {
            let fill = args.template_size / 100 * u64::from(args.fill_percent);
            let image = create_template(&templates, args.template_size, fill, quiet).await?;
            let mut new = NewTemplate::new("base", "Linux", DiskFormat::Qcow2, &image);
            new.settings = ImageSettings {
                os_type: Some("Linux_64".into()),
                bridged_adapter: Some(true),
                guest_additions_version: None,
            };
            let version = catalog.add_draft(new).map_err(|e| chain(&e))?;
            let tv = catalog.get("base", version).map_err(|e| chain(&e))?.clone();
            // In place before it is published: a published version's image is there.
            let path = templates.join(&tv.file_name);
            std::fs::rename(&image, &path).map_err(|e| format!("{}: {e}", image.display()))?;
            catalog.publish("base", version).map_err(|e| chain(&e))?;
            tv
        }
    };
    let template_path = templates.join(&tv.file_name);
    let template_bytes = allocated_bytes(&template_path).map_err(|e| chain(&e))?;
    let template_id = tv.id();

    // 2. Hosts: a backend each, the template registered as multiattach.
    let mut targets = HashMap::new();
    let mut hosts = Vec::new();
    let mut backends = HashMap::new();
    for i in 0..args.hosts {
        let name = format!("host-{i}");
        let root = args.out.join("hosts").join(&name);
        let hv = Arc::new(
            QemuHypervisor::open(&root)
                .await
                .map_err(|e| chain(&e))?
                .with_durable_writes(!args.relaxed_writes),
        );
        let disk = if args.preload {
            let store = root.join("templates");
            let mut last = 0;
            let label = format!("preload {name} (MiB)");
            preload(hv.as_ref(), &tv, &template_path, &store, &mut |p| {
                let mib = (p.copied >> 20) as usize;
                if !quiet && (mib != last || p.copied == p.total) {
                    last = mib;
                    bar(mib, (p.total >> 20) as usize, &label);
                }
                ControlFlow::Continue(())
            })
            .await
            .map_err(|e| chain(&e))?
            .disk()
            .clone()
        } else {
            host_template(&hv, &template_path).await?
        };
        let space = hv.host_disk_space(&root).await.map_err(|e| chain(&e))?;
        let per_host = args.vms.div_ceil(args.hosts) as u32;
        let mut host = Host::new(
            name.as_str(),
            per_host * args.profile.cores(),
            u64::from(per_host) * args.profile.memory_mb(),
            space.available,
        );
        host.preloaded_templates.push(template_id.clone());
        let mut target = HostTarget::new(hv.clone() as Arc<dyn Hypervisor>);
        target
            .templates
            .insert(template_id.clone(), DiskRef::Uuid(disk.uuid));
        targets.insert(host.id.clone(), target);
        backends.insert(host.id.clone(), hv);
        hosts.push(host);
    }

    // 3. Placement (disk-aware) and the deployment.
    let started = Instant::now();
    let requests: Vec<VmRequest> = (0..args.vms)
        .map(|i| {
            VmRequest::new(format!("vm-{i:05}"), template_id.clone(), args.profile)
                .with_disk(1 << 20, tv.size_bytes)
        })
        .collect();
    // The plan is kept in `<out>/plan.json` before anything is deployed, so a run that
    // finishes an earlier one puts every VM on the host it was first placed on.
    let plan_path = args.out.join("plan.json");
    let plan = match std::fs::read(&plan_path) {
        Ok(bytes) => {
            let plan: DeploymentPlan = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: {e}", plan_path.display()))?;
            if plan.len() != args.vms || plan.hosts.iter().any(|h| !targets.contains_key(&h.host)) {
                return Err(format!(
                    "the earlier run in {} planned {} VMs on other hosts; run it with the same --vms and --hosts, or choose a new --out folder",
                    args.out.display(),
                    plan.len()
                ));
            }
            plan
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let placement =
                place(&hosts, &requests, Algorithm::DiskAware, None).map_err(|e| chain(&e))?;
            let plan =
                DeploymentPlan::from_placement(&placement, &requests).map_err(|e| chain(&e))?;
            let bytes = serde_json::to_vec_pretty(&plan).map_err(|e| e.to_string())?;
            let tmp = args.out.join(".plan.json.tmp");
            let written = std::fs::File::create(&tmp)
                .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
                .and_then(|()| std::fs::rename(&tmp, &plan_path));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                return Err(format!("{}: {e}", plan_path.display()));
            }
            plan
        }
        Err(e) => return Err(format!("{}: {e}", plan_path.display())),
    };
    let done = Arc::new(Mutex::new(0usize));
    let total = plan.len();
    let cancel = CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = writeln!(
                    std::io::stderr(),
                    "\ncancelling: no new VMs; VMs in progress are rolled back"
                );
                cancel.cancel();
            }
        });
    }
    let callback = {
        let done = done.clone();
        Arc::new(move |_: &unacloud::cloud::provision::deploy::VmOutcome| {
            let mut d = done.lock().unwrap_or_else(|e| e.into_inner());
            *d += 1;
            if !quiet {
                bar(*d, total, "provisioning VMs");
            }
        })
    };
    let options = DeployOptions {
        max_parallel_hosts: args.parallel_hosts.max(1),
        resume,
        ..DeployOptions::default()
    };
    let report = deploy(&plan, &targets, &options, Some(cancel), Some(callback)).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    // A failed catalog write is reported (after the report), never skipped.
    let recorded = report.record_in(&mut catalog);

    // 4. Measure what is on disk.
    let mut vm_disk_bytes = Vec::new();
    let mut per_vm_ms = Vec::new();
    for o in report
        .outcomes
        .iter()
        .filter(|o| matches!(o.result, VmResult::Created | VmResult::Deployed))
    {
        let hv = &backends[&o.host];
        let set = hv
            .vm_files(&o.vm.as_str().into())
            .await
            .map_err(|e| chain(&e))?;
        let mut bytes = 0;
        for f in set
            .files
            .iter()
            .filter(|f| f.role == unacloud::cloud::files::FileRole::Disk)
        {
            bytes += allocated_bytes(&f.path).map_err(|e| chain(&e))?;
        }
        vm_disk_bytes.push(bytes);
        per_vm_ms.push(o.elapsed.as_millis() as u64);
    }
    let full_copy_bytes = template_bytes.saturating_mul(args.vms as u64);

    if args.json {
        let v = serde_json::json!({
            "vms_created": report.created(),
            "vms_failed": report.failed(),
            "template_bytes": template_bytes,
            "vm_disk_bytes_on_disk": vm_disk_bytes,
            "full_copy_bytes": full_copy_bytes,
            "elapsed_ms": elapsed_ms,
            "per_vm_ms": per_vm_ms,
        });
        outln!("{v}");
    } else {
        let mut d = vm_disk_bytes.clone();
        d.sort_unstable();
        let mut t = per_vm_ms.clone();
        t.sort_unstable();
        let sum: u64 = vm_disk_bytes.iter().sum();
        outln!(
            "template        {} ({}), {} on disk",
            tv.id(),
            tv.checksum,
            human(template_bytes)
        );
        outln!(
            "placement       disk-aware, {} VMs on {} hosts",
            plan.len(),
            args.hosts
        );
        outln!(
            "created         {} of {} ({} failed{})",
            report.created(),
            args.vms,
            report.failed(),
            if report.cancelled { ", cancelled" } else { "" }
        );
        outln!(
            "VM disks        {} in total; per VM median {}, max {}",
            human(sum),
            human(percentile(&d, 0.5)),
            human(d.last().copied().unwrap_or(0))
        );
        outln!(
            "full copies     would take {} ({}x more)",
            human(full_copy_bytes),
            if sum == 0 {
                0
            } else {
                full_copy_bytes / sum.max(1)
            }
        );
        outln!(
            "time            {elapsed_ms} ms in total; per VM median {} ms, p95 {} ms, max {} ms",
            percentile(&t, 0.5),
            percentile(&t, 0.95),
            t.last().copied().unwrap_or(0)
        );
        for o in report
            .outcomes
            .iter()
            .filter(|o| matches!(o.result, VmResult::Failed | VmResult::Cancelled))
        {
            outln!(
                "  {} on {}: {:?} ({}): {}",
                o.vm,
                o.host,
                o.result,
                o.state,
                o.error.as_deref().unwrap_or("")
            );
        }
    }
    if let Err(e) = recorded {
        return Err(format!(
            "the VMs were made but the template catalog {} could not record them: {}",
            catalog.path().display(),
            chain(&e)
        ));
    }
    Ok(report.failed() == 0 && !report.cancelled)
}

/// Runs the command with `argv` (the program name first, as `std::env::args_os`
/// gives it) and returns its exit code: 0 when every VM was made, 1 when some failed
/// or the run was cancelled, 2 on an error (printed with its whole cause chain).
pub async fn cli<I, T>(argv: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match run(Args::parse_from(argv)).await {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e}");
            2
        }
    }
}

#[tokio::main]
async fn main() {
    std::process::exit(cli(std::env::args_os()).await)
}

//! The thesis experiment for real (SPEC §5–§6): the RCPBT token ring runs inside QEMU
//! guests, one per emulated PC; consistent global snapshots are taken while it runs;
//! with `--power-off` every PC is then powered off (every QEMU process SIGKILLed) and
//! the ring resumes from the latest completed global snapshot with POLL/RESTORE/START
//! over the network, and finishes with an exact token count.
//!
//! ```text
//! cargo run --release --example ring_vms -- --vms 4 --hosts 4 --tokens 20000 \
//!     --snapshots 3 --power-off [--spare-hosts 1 --relocate 1] [--json]
//!     [--control embedded|etcd [--etcd-nodes 3] [--kill-coordinator-after K]
//!      [--kill-etcd-leader-after K] [--lease-ttl-ms 2000]]
//! ```
//!
//! With `--control etcd` the lab starts its own etcd cluster; the hosts register their
//! VMs in it, one coordinator candidate per PC campaigns, the catalog lives in etcd and
//! the resume after the power-off reads it from there. The protocol's nodes of this lab
//! run in one process, so `--kill-coordinator-after` aborts the elected candidate's task
//! (its lease then runs out as a dead PC's would; `ring_netns` kills a real process). The
//! JSON then adds `etcd_nodes`, `coordinator_failovers`, `etcd_leader_kills`,
//! `catalog_in_etcd`, `failover_ms`, `etcd_processes_left` and `etcd_dirs_removed`.
//!
//! Packet colouring happens at each PC on the VM's tap (nf_tables over netlink by
//! default), so neither the guest, nor the ring, nor QEMU changes. Needs root (network
//! namespaces, taps, netfilter) and `qemu-system-x86_64`; the guest image is built with
//! `scripts/guest-image` if it is missing. Run as an ordinary user it says why in one
//! line and runs the same scenario in the deterministic simulator instead. Everything it
//! creates (QEMU processes, namespaces, rules, files) is removed at the end, on error, on
//! Ctrl-C and on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[path = "support/control.rs"]
mod control;
#[path = "support/signals.rs"]
mod signals;

use clap::Parser;
use unacloud::snapshot::net::daemon::BackendKind;
use unacloud::snapshot::net::ring_vms::{run_ring_vms, GuestImage, RingVmsConfig};
use unacloud::snapshot::netns;

/// Hidden first argument that makes this program run the test manager instead.
const REEXEC: &str = "__gs";

#[derive(Parser, Debug)]
#[command(about = "RCPBT ring inside QEMU VMs with global snapshots, power-off and resume")]
struct Args {
    /// VMs (= ring peers), 2..=64.
    #[arg(long)]
    vms: u32,
    /// Emulated PCs that run them (one VM each, two each when vms > hosts).
    #[arg(long)]
    hosts: u32,
    /// Spare PCs (template preloaded) that relocated VMs resume on.
    #[arg(long, default_value_t = 0)]
    spare_hosts: u32,
    /// Tokens passed around the ring.
    #[arg(long)]
    tokens: u64,
    /// Global snapshots taken while the ring runs.
    #[arg(long)]
    snapshots: u32,
    /// Then power every PC off and resume from the latest completed global snapshot.
    #[arg(long)]
    power_off: bool,
    /// Resume this many VMs on spare PCs instead of their own (needs --power-off).
    #[arg(long, default_value_t = 0)]
    relocate: u32,
    /// Memory of each VM (MiB).
    #[arg(long, default_value_t = 128)]
    memory_mb: u64,
    /// Milliseconds between two global snapshots.
    #[arg(long, default_value_t = 1000)]
    gap_ms: u64,
    /// Packet-colouring backend: `nft-netlink`, `nft`, `nft-command` or `iptables`.
    #[arg(long, default_value = "nft-netlink")]
    backend: String,
    /// `auto` (probe KVM, else TCG), `kvm` or `tcg`.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// The guest image directory (default: target/guest, built if missing).
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    control: control::ControlArgs,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(REEXEC) {
        return unacloud::snapshot::net::cli::main(&argv[2..]);
    }
    let args = Args::parse();
    signals::init_tracing();
    let backend = match args.backend.parse::<BackendKind>() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: --backend: {e}");
            return ExitCode::from(2);
        }
    };
    let accel = match args.accel.parse::<unacloud::cloud::qemu::Accel>() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: --accel: {e}");
            return ExitCode::from(2);
        }
    };
    let why_not = netns::probe().err().map(|e| e.to_string()).or_else(|| {
        (!program_exists("qemu-system-x86_64"))
            .then(|| "qemu-system-x86_64 is not installed (scripts/setup installs it)".to_string())
    });
    match why_not {
        None => real(&args, backend, accel),
        Some(why) => {
            eprintln!(
                "ring_vms: cannot run VMs here ({}); running the same scenario in the deterministic simulator instead",
                why.replace('\n', " ")
            );
            simulated(&args)
        }
    }
}

fn program_exists(name: &str) -> bool {
    std::process::Command::new(name)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The guest image: `--guest-dir`, or `target/guest` built by `scripts/guest-image`.
fn guest_image(args: &Args) -> Result<GuestImage, String> {
    if let Some(dir) = &args.guest_dir {
        return GuestImage::in_dir(dir).map_err(|e| e.to_string());
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(repo.join("scripts/guest-image"))
        .arg("--json")
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run scripts/guest-image: {e}"))?;
    if !out.status.success() {
        return Err(format!("scripts/guest-image failed ({})", out.status));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("scripts/guest-image printed no JSON: {e}"))?;
    let path = |k: &str| v[k].as_str().map(PathBuf::from).ok_or(format!("no {k}"));
    Ok(GuestImage {
        kernel: path("kernel")?,
        initrd: path("initrd")?,
        template: path("template")?,
    })
}

fn real(args: &Args, backend: BackendKind, accel: unacloud::cloud::qemu::Accel) -> ExitCode {
    let guest = match guest_image(args) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: the guest image: {e}");
            return ExitCode::FAILURE;
        }
    };
    let program = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find this program's path to start the test manager: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cfg = RingVmsConfig::new(
        args.vms,
        args.hosts,
        args.tokens,
        args.snapshots,
        guest,
        program,
        vec![REEXEC.to_string()],
    );
    cfg.spare_hosts = args.spare_hosts;
    cfg.power_off = args.power_off;
    cfg.relocate = args.relocate;
    cfg.memory_mb = args.memory_mb;
    cfg.gap = Duration::from_millis(args.gap_ms);
    cfg.backend = backend;
    cfg.accel = accel;
    match args.control.etcd() {
        Ok(e) => cfg.etcd = e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let report = match signals::run_lab(
        run_ring_vms(cfg),
        "VMs, namespaces, rules and files removed",
    ) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if args.json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!("{}", report.human_summary());
    }
    let clean = report.tokens_counted == report.tokens_expected
        && report.rules_left == 0
        && report.namespaces_left == 0
        && report.vms_left == 0
        && (!args.power_off || report.restored_from.is_some());
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn simulated(args: &Args) -> ExitCode {
    use unacloud::snapshot::sim::{simulate_ring, RingConfig};
    let mut cfg = RingConfig {
        nodes: args.vms as usize,
        tokens: args.tokens,
        snapshot_every: (args.tokens / (u64::from(args.snapshots) + 2)).max(1),
        ..RingConfig::default()
    };
    if args.snapshots == 0 {
        cfg.snapshot_every = 0;
    }
    if args.power_off {
        // A host powers off late in the run; the ring resumes from the latest completed
        // global snapshot.
        cfg.crash_at = Some(args.tokens * 9 / 10);
    }
    let r = match simulate_ring(cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let completed: Vec<u64> = r
        .snapshots
        .iter()
        .filter(|s| s.status == "completed")
        .map(|s| s.id)
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "simulated": true,
                "vms": args.vms,
                "hosts": args.vms,
                "tokens_expected": r.tokens_expected,
                "tokens_counted": r.tokens_final,
                "global_snapshots_completed": r.global_snapshots_completed,
                "completed_ids": completed,
                "restored_from": r.restored_from,
                "powered_off": args.power_off,
                "post_packets_dropped": r.overhead.dropped_by_filter,
                "rules_left": 0,
                "namespaces_left": 0,
                "vms_left": 0,
            })
        );
    } else {
        println!(
            "simulated ring of {} VMs: {} of {} tokens counted ({} lost, {} duplicated); {} global snapshots completed {:?}, resumed from {}; checker: {} violations",
            args.vms,
            r.tokens_final,
            r.tokens_expected,
            r.lost,
            r.duplicated,
            r.global_snapshots_completed,
            completed,
            r.restored_from
                .map_or("none (no crash)".to_string(), |g| format!("global snapshot {g}")),
            r.violations
        );
    }
    if r.tokens_final == r.tokens_expected && r.violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

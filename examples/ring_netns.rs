//! Global snapshots of a running distributed application, for real: the RCPBT token ring
//! (SPEC §6) across Linux network namespaces, with real TCP, real DSCP colouring and
//! POSTSNAPSHOT filters in netfilter, and a local snapshot that freezes each ring peer's
//! process with SIGSTOP/SIGCONT as a live VM snapshot pauses a VM.
//!
//! ```text
//! cargo run --release --example ring_netns -- --peers 4 --tokens 20000 --snapshots 3 \
//!     [--snapshot-delay-ms 50] [--backend nft|nft-netlink|nft-command|iptables] [--json]
//!     [--control embedded|etcd [--etcd-nodes 3] [--kill-coordinator-after K]
//!      [--kill-etcd-leader-after K] [--lease-ttl-ms 2000]]
//! ```
//!
//! With `--control etcd` the lab starts its own etcd cluster on loopback; hosts register
//! in it, one coordinator candidate per namespace campaigns for the role, and the catalog
//! of completed global snapshots lives in etcd. The JSON output then adds `control`,
//! `etcd_nodes`, `coordinator_failovers`, `etcd_leader_kills`, `completed_ids`,
//! `catalog_in_etcd`, `failover_ms`, `etcd_processes_left` and `etcd_dirs_removed`.
//!
//! Needs root (network namespaces, netfilter). Run as an ordinary user it says why in one
//! line and runs the same scenario in the deterministic simulator instead.
//! Everything it creates (namespaces, rules, processes) is removed at the end, on error
//! and on Ctrl-C.

use std::process::ExitCode;
use std::time::Duration;

#[path = "support/control.rs"]
mod control;
#[path = "support/signals.rs"]
mod signals;

use clap::Parser;
use unacloud::snapshot::net::daemon::BackendKind;
use unacloud::snapshot::net::ring::{median, percentile, run_ring_netns, RingNetnsConfig};
use unacloud::snapshot::netns;

/// Hidden first argument that makes this program run one of the scenario's processes
/// (launcher, ring peer, test manager) instead of the scenario.
const REEXEC: &str = "__gs";

#[derive(Parser, Debug)]
#[command(about = "RCPBT ring across network namespaces with consistent global snapshots")]
struct Args {
    /// Ring peers (= namespaces = VMs), 2..=250.
    #[arg(long)]
    peers: u32,
    /// Tokens passed around the ring.
    #[arg(long)]
    tokens: u64,
    /// Global snapshots taken while the ring runs.
    #[arg(long)]
    snapshots: u32,
    /// How long each local snapshot freezes its ring peer (ms).
    #[arg(long, default_value_t = 0)]
    snapshot_delay_ms: u64,
    /// Packet-colouring backend: `nft-netlink` (netlink from each launcher, no nft
    /// process; the fastest), `nft` (long-lived nft session), `nft-command` (one nft per
    /// change) or `iptables`.
    #[arg(long, default_value = "nft-netlink")]
    backend: String,
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
            return ExitCode::FAILURE;
        }
    };
    match netns::probe() {
        Ok(()) => real(&args, backend),
        Err(e) => {
            eprintln!(
                "ring_netns: cannot use network namespaces ({}); running the same scenario in the deterministic simulator instead",
                e.to_string().replace('\n', " ")
            );
            simulated(&args)
        }
    }
}

fn real(args: &Args, backend: BackendKind) -> ExitCode {
    let program = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find this program's path to start the ring processes: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cfg = RingNetnsConfig::new(
        args.peers,
        args.tokens,
        args.snapshots,
        program,
        vec![REEXEC.to_string()],
    );
    cfg.snapshot_delay = Duration::from_millis(args.snapshot_delay_ms);
    cfg.backend = backend;
    cfg.snapshot_timeout = Duration::from_secs(5).max(cfg.snapshot_delay * 4);
    cfg.deadline = Duration::from_secs(600);
    match args.control.etcd() {
        Ok(e) => cfg.etcd = e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let report = match signals::run_lab(
        run_ring_netns(cfg),
        "namespaces, rules and processes removed",
    ) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if args.json {
        println!("{}", report.json_summary());
    } else {
        println!("{}", report.human_summary());
        if let (Some(m), Some(p)) = (
            median(&report.overhead_ms),
            percentile(&report.overhead_ms, 95.0),
        ) {
            println!("coordination overhead: median {m:.2} ms, p95 {p:.2} ms");
        }
    }
    let etcd_clean = report
        .etcd
        .as_ref()
        .map_or(true, |e| e.etcd_processes_left == 0 && e.etcd_dirs_removed);
    if report.tokens_counted == report.tokens_expected
        && report.rules_left == 0
        && report.namespaces_left == 0
        && etcd_clean
    {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn simulated(args: &Args) -> ExitCode {
    use unacloud::snapshot::sim::{simulate_ring, RingConfig};
    let mut cfg = RingConfig {
        nodes: args.peers as usize,
        tokens: args.tokens,
        snapshot_every: (args.tokens / (u64::from(args.snapshots) + 1)).max(1),
        ..RingConfig::default()
    };
    if args.snapshots == 0 {
        cfg.snapshot_every = 0;
    }
    if args.snapshot_delay_ms > 0 {
        cfg.local_snapshot_min = Duration::from_millis(args.snapshot_delay_ms);
        cfg.local_snapshot_max = Duration::from_millis(args.snapshot_delay_ms);
        cfg.timeouts.snapshot = cfg
            .timeouts
            .snapshot
            .max(Duration::from_millis(args.snapshot_delay_ms * 4));
    }
    let r = match simulate_ring(cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let done: Vec<_> = r
        .snapshots
        .iter()
        .filter(|s| s.status == "completed")
        .collect();
    let local_ms: Vec<f64> = done
        .iter()
        .map(|s| s.local_ms.iter().copied().fold(0.0, f64::max))
        .collect();
    let global_ms: Vec<f64> = done.iter().map(|s| s.phase2_ms.unwrap_or(0.0)).collect();
    let overhead_ms: Vec<f64> = global_ms
        .iter()
        .zip(&local_ms)
        .map(|(g, l)| g - l)
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "peers": args.peers,
                "tokens_expected": r.tokens_expected,
                "tokens_counted": r.tokens_final,
                "global_snapshots_completed": r.global_snapshots_completed,
                "local_ms": local_ms,
                "global_ms": global_ms,
                "overhead_ms": overhead_ms,
                "post_packets_dropped": r.overhead.dropped_by_filter,
                "rules_left": 0,
                "namespaces_left": 0,
            })
        );
    } else {
        let med = |v: &[f64]| median(v).map_or("-".to_string(), |m| format!("{m:.2} ms"));
        println!(
            "simulated ring of {} peers: {} of {} tokens counted ({} lost, {} duplicated)",
            args.peers, r.tokens_final, r.tokens_expected, r.lost, r.duplicated
        );
        println!(
            "global snapshots: {} completed of {} started; checker: {} orphan messages, {} violations",
            r.global_snapshots_completed, r.global_snapshots_started, r.orphan_messages, r.violations
        );
        println!(
            "median virtual times: local {}, global {}, overhead {}",
            med(&local_ms),
            med(&global_ms),
            med(&overhead_ms)
        );
        println!(
            "POSTSNAPSHOT datagrams dropped by the filters: {} ({} TCP retransmissions)",
            r.overhead.dropped_by_filter, r.overhead.retransmissions
        );
    }
    if r.tokens_final == r.tokens_expected && r.violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

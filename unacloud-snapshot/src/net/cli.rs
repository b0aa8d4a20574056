//! The command line of the daemons and of the RCPBT programs, shared by the
//! `unacloud-gs` binary and by programs that re-execute themselves (the `ring_netns` and
//! `ring_vms` examples run `__gs <subcommand> ...` through [`main`]).
//!
//! ```text
//! unacloud-gs metadata [--config F] [--cluster N] [--key-file F] [--listen ADDR]
//!                      [--base-port P] [--results-csv F] [--max-registrations N]
//! unacloud-gs launcher [--config F] [--cluster N] [--key-file F] [--ms ADDR] [--advertise IP]
//!                      [--cluster-size N] [--backend nft|nft-netlink|nft-command|iptables]
//!                      [--hypervisor qemu --hv-root DIR [--accel auto|kvm|tcg] [--margin-mb M]]
//!                      [--catalog F] [--run-dir DIR]
//!                      [--vm NAME [--netns NS] [--tap IF]
//!                                 [--freeze-pid PID [--hold-ms MS] | --lab-sleep-ms MS]]
//!                      [--snapshot-timeout-ms MS] [--precheck-timeout-ms MS]
//!                      [--registration-timeout-ms MS] [--events-json]
//! unacloud-gs trigger  [--config F] [--cluster N] [--key-file F] [--ms ADDR]
//! unacloud-gs resume   [--config F] [--cluster N] [--key-file F] [--ms ADDR] [--gs ID]
//! unacloud-gs catalog  [--config F] [--cluster N] [--catalog F] [--json]
//! ```
//!
//! `metadata` is also spelled `metadata-server`, `trigger` also `start`. Flags override
//! the configuration file (`--config`, TOML, see [`super::daemon`]). `launcher` and
//! `metadata` stop on SIGINT/SIGTERM, removing every rule first — in every phase of a
//! launcher's start too. `unacloud-gs --help` and `unacloud-gs <subcommand> --help`
//! describe every flag.
//!
//! `trigger` takes a global snapshot; `resume` restores the application from one (POLL
//! until every participant answers, RESTORE, START), by default the latest completed one,
//! or `--gs ID` (`7` or `gs-7`). Both return once the metadata server forwarded the
//! trigger to the coordinator (they fail when it refuses: nobody registered, coordinator
//! not connected); the coordinator's launcher reports the outcome or its refusal as
//! events. `catalog` lists the completed global snapshots of a coordinator's catalog file.
//!
//! Hidden subcommands, for the programs of the RCPBT test:
//!
//! ```text
//! unacloud-gs rcpbt-manager --listen ADDR --tokens T --base-port P --participants N
//!                           [--label L] [--csv F] [--deadline-s S]
//! unacloud-gs rcpbt-peer --manager ADDR --ip IP [--deadline-s S]
//! unacloud-gs ring-netns --peers P --tokens T --snapshots K [--snapshot-delay-ms D]
//!                        [--backend nft|nft-netlink|nft-command|iptables] [--json]   (root)
//! ```
//!
//! Errors are printed on standard error as one line starting with `error: `; the exit code
//! is 2 for a command line that does not parse, 1 for any other failure.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use super::daemon::{
    default_catalog_path, run_launcher, trigger_global_snapshot, trigger_resume, BackendKind,
    DaemonConfig, HypervisorSection, LauncherEvent, LauncherOptions, LauncherSection,
    MetadataSection, VmConfig,
};
use super::node::spawn_metadata_server;
use crate::catalog_store::CatalogStore;
use crate::net::{Error, Result};
use crate::protocol::{Catalog, ClusterId, GlobalSnapshotId, MetadataServerConfig};
use crate::rcpbt::{run_peer, PeerConfig, TestManager, TestManagerConfig};

/// Global snapshots of VMs on many hosts: the metadata server, one launcher per host, and
/// the operator's commands.
#[derive(Parser, Debug)]
#[command(
    name = "unacloud-gs",
    version,
    arg_required_else_help = true,
    after_help = "A deployment runs `unacloud-gs metadata` once, `unacloud-gs launcher` on every \
host (as root: it installs packet-colouring rules), then `unacloud-gs trigger` to take a \
global snapshot, `unacloud-gs catalog` to list them and `unacloud-gs resume` to restore one. \
Every command of a deployment takes the same --cluster and --key-file. \
Logs go to standard error; RUST_LOG sets their level (default: info)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the metadata server, once per deployment
    ///
    /// It registers the hosts' VMs (ids from 0; the VM with id 0 coordinates), forwards
    /// triggers to the coordinator and records the times of every global snapshot. Stops
    /// on SIGINT/SIGTERM.
    #[command(visible_alias = "metadata-server")]
    Metadata(MetadataArgs),
    /// Run a launcher, on every host (as root)
    ///
    /// It registers this host's VMs, runs their participants (the coordinator for the VM
    /// that gets id 0) and colours their traffic during global snapshots. A second launcher
    /// for the same VM on the same host is refused before it touches any rule. Stops on
    /// SIGINT/SIGTERM in any phase, removing every rule it installed.
    Launcher(Box<LauncherArgs>),
    /// Take a global snapshot now
    ///
    /// Asks the metadata server to forward the trigger to the coordinator; returns once it
    /// did. The coordinator's launcher reports the outcome (gs_started, gs_completed,
    /// gs_failed or trigger_refused).
    #[command(visible_alias = "start")]
    Trigger(TriggerArgs),
    /// Resume the application from a completed global snapshot
    ///
    /// The latest completed one by default, or --gs ID: the coordinator sends POLL until
    /// every host answers, then RESTORE, then START once every host restored. Returns once
    /// the metadata server forwarded the trigger; the coordinator's launcher reports the
    /// outcome (resume_started, poll_completed, resume_completed, resume_failed or
    /// trigger_refused).
    Resume(ResumeArgs),
    /// List the completed global snapshots of a coordinator's catalog
    ///
    /// One row per completed global snapshot: its id, its participants, its global time
    /// and every participant's local time. Only these can be resumed from.
    Catalog(CatalogArgs),
    /// RCPBT test manager (used by the ring scenarios).
    /// Run a coordinator candidate, on every host (control plane on etcd)
    ///
    /// It campaigns for the coordinator role in etcd; while elected it coordinates the
    /// global snapshots and resumes (triggered with `trigger --control etcd` / `resume
    /// --control etcd` from any host) and records them in etcd. When it dies another
    /// candidate takes over within its lease TTL. Stops on SIGINT/SIGTERM, resigning.
    Candidate(CandidateArgs),
    #[command(hide = true)]
    RcpbtManager(RcpbtManagerArgs),
    /// RCPBT ring peer (used by the ring scenarios).
    #[command(hide = true)]
    RcpbtPeer(RcpbtPeerArgs),
    /// The RCPBT ring across network namespaces with global snapshots (root).
    #[command(hide = true)]
    RingNetns(RingNetnsArgs),
    /// A lab's reaper: when the lab that started it dies (even by SIGKILL), kills the VMs
    /// under its run directory, deletes its namespaces and the directory.
    #[command(hide = true)]
    Reap(ReapArgs),
}

#[derive(Args, Debug)]
struct ReapArgs {
    /// The lab's run directory (its VMs live below it).
    #[arg(long)]
    dir: PathBuf,
    /// The lab's namespace prefix (`ucn-<pid>-<rand>-`).
    #[arg(long)]
    prefix: String,
}

/// `--config` and `--cluster`, taken by every daemon command.
#[derive(Args, Debug, Clone)]
struct ConfigArgs {
    /// TOML configuration file (see the documentation of unacloud_snapshot::net::daemon);
    /// flags override what it says.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The cluster id; every command of one deployment uses the same [default: the
    /// configuration file's, else 1].
    #[arg(long, value_name = "N")]
    cluster: Option<u64>,
}

/// `--key-file`.
#[derive(Args, Debug, Clone)]
struct KeyArgs {
    /// File holding the cluster key, hexadecimal
    ///
    /// The same file on every machine (make one with `head -c 32 /dev/urandom | xxd -p -c
    /// 64 > cluster.key`): every frame is then authenticated with HMAC-SHA256. Without it
    /// frames are not authenticated.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

/// `--ms`.
#[derive(Args, Debug, Clone)]
struct MsArgs {
    /// The metadata server's address, IP:PORT (or `metadata_server` in the configuration).
    #[arg(long, value_name = "ADDR")]
    ms: Option<SocketAddr>,
}

/// The control plane: where hosts register and the catalog lives.
#[derive(Args, Debug, Clone)]
struct ControlArgs {
    /// Control plane: embedded (a metadata server and a coordinator host) or etcd
    /// (registrations, the coordinator election and the catalog in an etcd cluster)
    #[arg(long, value_name = "KIND", default_value = "embedded", value_parser = ["embedded", "etcd"])]
    control: String,
    /// etcd client endpoints, comma-separated `host:port` or URLs (with --control etcd)
    #[arg(long, value_name = "ENDPOINTS")]
    etcd: Option<String>,
    /// Lease TTL in ms (with --control etcd): how long after a host or a coordinator dies
    /// it is reported unreachable or replaced [default: 5000]
    #[arg(long, value_name = "MS")]
    lease_ttl_ms: Option<u64>,
}

impl ControlArgs {
    fn is_etcd(&self) -> bool {
        self.control == "etcd"
    }
}

#[derive(Args, Debug)]
struct MetadataArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    key: KeyArgs,
    /// Address to listen on [default: 127.0.0.1:7000, or [metadata] listen].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Participant id N gets port base port + N [default: 7100, or [metadata] base_port].
    #[arg(long, value_name = "P")]
    base_port: Option<u16>,
    /// CSV file the times of every global snapshot are appended to
    /// (global_snapshot,participant,local_time_s,global_time_s).
    #[arg(long, value_name = "FILE")]
    results_csv: Option<PathBuf>,
    /// Refuse INSERTs beyond this many registrations [default: 1024].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_registrations: Option<u32>,
}

#[derive(Args, Debug)]
struct LauncherArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    key: KeyArgs,
    #[command(flatten)]
    ms: MsArgs,
    #[command(flatten)]
    control: ControlArgs,
    /// The address other hosts reach this host's participants at (required without a
    /// [launcher] section).
    #[arg(long, value_name = "IP")]
    advertise: Option<IpAddr>,
    /// Number of VMs in the whole deployment: the coordinator waits until that many
    /// registered (required without a [launcher] section).
    #[arg(long, value_name = "N")]
    cluster_size: Option<u32>,
    /// Packet-colouring backend: nft, nft-netlink, nft-command or iptables [default: nft]
    ///
    /// nft: a long-lived nft session; nft-netlink: netlink messages from the launcher
    /// itself, no nft process; nft-command: one nft process per change; iptables.
    #[arg(long, value_name = "NAME", value_parser = parse_backend)]
    backend: Option<BackendKind>,
    /// Take, restore and start the VMs' local snapshots with this hypervisor backend
    /// (`qemu`).
    #[arg(long, value_name = "NAME", requires = "hv_root")]
    hypervisor: Option<String>,
    /// The hypervisor backend's root folder on this host.
    #[arg(long, value_name = "DIR", requires = "hypervisor")]
    hv_root: Option<PathBuf>,
    /// QEMU accelerator: auto (KVM when a probe boot shows it works), kvm or tcg
    /// [default: auto].
    #[arg(long, value_name = "ACCEL", requires = "hypervisor")]
    accel: Option<String>,
    /// Free space required beyond each VM's memory, in MiB [default: 64].
    #[arg(long, value_name = "M", requires = "hypervisor")]
    margin_mb: Option<u64>,
    /// The coordinator's catalog file [default: /var/lib/unacloud/catalog-<cluster>.json]
    ///
    /// The catalog of completed global snapshots and of the epochs used, persisted whenever
    /// a global snapshot starts or completes and whenever a resume starts, so that a
    /// restarted coordinator never reuses an id and can resume. By default
    /// /var/lib/unacloud/catalog-<cluster>.json, the directory created with mode 0700 if
    /// missing; a launcher that may not create it stops and asks for --catalog.
    #[arg(long, value_name = "FILE")]
    catalog: Option<PathBuf>,
    /// Directory of the launchers' lock files [default: /run/unacloud, else the temporary
    /// directory]
    ///
    /// Each VM's colouring scope (its namespace and tap, or the host) is locked there
    /// before any rule is touched, so that a second launcher for the same VM fails instead
    /// of removing the running one's rules. Launchers of one host must use the same.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// A VM of this host, by name (more VMs: [[launcher.vm]] entries in the configuration
    /// file).
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// The network namespace of the VM's tap (its rules are applied there).
    #[arg(long, value_name = "NS", requires = "vm")]
    netns: Option<String>,
    /// Colour the VM's traffic on this host interface, its tap (forward path), instead of
    /// the host's own traffic.
    #[arg(long, value_name = "IF", requires = "vm")]
    tap: Option<String>,
    /// Lab method: the local snapshot freezes this process (SIGSTOP/SIGCONT).
    #[arg(
        long,
        value_name = "PID",
        requires = "vm",
        conflicts_with = "lab_sleep_ms"
    )]
    freeze_pid: Option<i32>,
    /// How long --freeze-pid keeps the process stopped, in ms [default: 0].
    #[arg(long, value_name = "MS", requires = "freeze_pid")]
    hold_ms: Option<u64>,
    /// Test method: the local snapshot only waits this long (captures nothing).
    #[arg(long, value_name = "MS", requires = "vm")]
    lab_sleep_ms: Option<u64>,
    /// Phase-2 deadline of a global snapshot, in ms [default: 120000].
    #[arg(long, value_name = "MS")]
    snapshot_timeout_ms: Option<u64>,
    /// Phase-1 (pre-check) deadline, in ms [default: 10000].
    #[arg(long, value_name = "MS")]
    precheck_timeout_ms: Option<u64>,
    /// Bound on registering and on waiting for the cluster and the coordinator, in ms
    /// [default: 60000].
    #[arg(long, value_name = "MS")]
    registration_timeout_ms: Option<u64>,
    /// Print events as JSON lines on standard output
    ///
    /// One object per line, its kind in "event": registered, ready, gs_started,
    /// gs_completed, gs_failed, trigger_refused, resume_started, poll_completed,
    /// resume_completed, resume_failed, resumed, abandoned, connected, disconnected, error,
    /// release_missed, cleanup_failed, idle_drop_failed, interrupted, summary. Without it
    /// events are printed on standard error as `name key=value ...` lines.
    #[arg(long)]
    events_json: bool,
    /// Fault injection for tests: kill this process right after step 1-6 of phase 2.
    #[arg(long, value_name = "STEP", hide = true)]
    crash_after_step: Option<u8>,
}

#[derive(Args, Debug)]
struct TriggerArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    key: KeyArgs,
    #[command(flatten)]
    ms: MsArgs,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Args, Debug)]
struct ResumeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    key: KeyArgs,
    #[command(flatten)]
    ms: MsArgs,
    #[command(flatten)]
    control: ControlArgs,
    /// The global snapshot to restore, `7` or `gs-7` [default: the latest completed one].
    #[arg(long, value_name = "ID", value_parser = parse_gs)]
    gs: Option<GlobalSnapshotId>,
}

#[derive(Args, Debug)]
struct CandidateArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    key: KeyArgs,
    /// etcd client endpoints, comma-separated `host:port` or URLs
    #[arg(long, value_name = "ENDPOINTS")]
    etcd: String,
    /// Lease TTL in ms: how long after this candidate dies another one takes over
    /// [default: 5000]
    #[arg(long, value_name = "MS")]
    lease_ttl_ms: Option<u64>,
    /// Where the coordinator listens when elected (participants dial it)
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// A name for people (the host) [default: the host name]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Phase-2 deadline of a global snapshot, in ms [default: 120000].
    #[arg(long, value_name = "MS")]
    snapshot_timeout_ms: Option<u64>,
    /// Phase-1 (pre-check) deadline, in ms [default: 10000].
    #[arg(long, value_name = "MS")]
    precheck_timeout_ms: Option<u64>,
    /// Print events as JSON lines on standard output: elected, lost, and the
    /// coordinator's gs_started, gs_completed, gs_failed, trigger_refused, resume_* …
    #[arg(long)]
    events_json: bool,
}

#[derive(Args, Debug)]
struct CatalogArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The coordinator's catalog file [default: the configuration's [launcher] catalog,
    /// else /var/lib/unacloud/catalog-<cluster>.json].
    #[arg(long, value_name = "FILE")]
    catalog: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    control: ControlArgs,
    /// With --control etcd: print the timing results of every recorded global snapshot
    /// as CSV (global_snapshot,participant,local_time_s,global_time_s) instead.
    #[arg(long)]
    times_csv: bool,
}

#[derive(Args, Debug)]
struct RcpbtManagerArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Tokens passed around the ring.
    #[arg(long)]
    tokens: u64,
    /// Ring peer i listens on base port + i.
    #[arg(long)]
    base_port: u16,
    /// Number of ring peers.
    #[arg(long)]
    participants: u32,
    /// Label of the results.
    #[arg(long, default_value = "rcpbt")]
    label: String,
    /// CSV file of the results.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    deadline_s: u64,
}

#[derive(Args, Debug)]
struct RcpbtPeerArgs {
    /// The test manager's address.
    #[arg(long)]
    manager: SocketAddr,
    /// This peer's address.
    #[arg(long)]
    ip: Ipv4Addr,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    deadline_s: u64,
}

#[derive(Args, Debug)]
struct RingNetnsArgs {
    /// Ring peers (= namespaces).
    #[arg(long)]
    peers: u32,
    /// Tokens passed around the ring.
    #[arg(long)]
    tokens: u64,
    /// Global snapshots taken while the ring runs.
    #[arg(long)]
    snapshots: u32,
    /// How long each local snapshot freezes its peer, in ms.
    #[arg(long, default_value_t = 0)]
    snapshot_delay_ms: u64,
    /// Packet-colouring backend.
    #[arg(long, value_parser = parse_backend)]
    backend: Option<BackendKind>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

fn parse_backend(v: &str) -> std::result::Result<BackendKind, String> {
    v.parse().map_err(|e: Error| match e {
        Error::InvalidConfig { reason } => reason,
        other => other.to_string(),
    })
}

/// A global snapshot id as the operator writes it: `7` or `gs-7`.
fn parse_gs(v: &str) -> std::result::Result<GlobalSnapshotId, String> {
    v.strip_prefix("gs-")
        .unwrap_or(v)
        .parse()
        .map(GlobalSnapshotId)
        .map_err(|_| format!("{v:?} is not a global snapshot id (e.g. 7 or gs-7)"))
}

fn metadata_server_of(cfg: &DaemonConfig) -> Result<SocketAddr> {
    cfg.metadata_server.ok_or_else(|| Error::InvalidConfig {
        reason: "no metadata server address: set `metadata_server` or pass --ms".to_string(),
    })
}

/// The configuration file (if any) with `--cluster`, `--key-file` and `--ms` applied.
fn base_config(c: &ConfigArgs, key: Option<&KeyArgs>, ms: Option<&MsArgs>) -> Result<DaemonConfig> {
    let mut cfg = match &c.config {
        Some(p) => DaemonConfig::from_file(p)?,
        None => DaemonConfig::new(c.cluster.unwrap_or(1)),
    };
    if let Some(n) = c.cluster {
        cfg.cluster = n;
    }
    if let Some(k) = key.and_then(|k| k.key_file.clone()) {
        cfg.key_file = Some(k);
    }
    if let Some(addr) = ms.and_then(|m| m.ms) {
        cfg.metadata_server = Some(addr);
    }
    Ok(cfg)
}

/// Installs the tracing subscriber of the command line — human-readable lines on
/// standard error, the level from `RUST_LOG` (default `info`) — unless the program
/// already installed one.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs the command line `args` (without the program name: `args[0]` is the subcommand)
/// and returns the process exit code. Help goes to standard output; errors go to standard
/// error as one line. Installs the tracing subscriber ([`init_tracing`]) unless the
/// program has one.
pub fn main(args: &[String]) -> ExitCode {
    let cli = match Cli::try_parse_from(
        std::iter::once("unacloud-gs".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e, args),
    };
    // A reaper must act when its lab is already gone; everything else a lab starts dies
    // with it.
    if !matches!(cli.command, Command::Reap(_)) {
        crate::netns::die_with_parent_if_asked();
    }
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::net::error::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Help and version to standard output (exit 0); a bad command line as one line on
/// standard error, pointing at the subcommand's `--help` (exit 2).
fn usage_error(e: &clap::Error, args: &[String]) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(2);
        }
        _ => {}
    }
    // clap's first paragraph says what is wrong (sometimes over several lines: the
    // missing arguments); the tips and the usage after it are left to --help.
    let text = e.to_string();
    let what: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let what = what.join(" ");
    let what = what.strip_prefix("error: ").unwrap_or(&what);
    let first = if what.is_empty() {
        "invalid command line"
    } else {
        what
    };
    let sub = args
        .first()
        .filter(|a| Cli::command().find_subcommand(a.as_str()).is_some())
        .map(|a| format!("{a} "))
        .unwrap_or_default();
    eprintln!("error: {first}; see `unacloud-gs {sub}--help`");
    ExitCode::from(2)
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().map_err(|source| Error::Network {
        peer: "tokio runtime".to_string(),
        action: "start",
        source,
    })
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).map_err(|source| Error::Network {
        peer: "SIGINT".to_string(),
        action: "install handler for",
        source,
    })?;
    let mut term = signal(SignalKind::terminate()).map_err(|source| Error::Network {
        peer: "SIGTERM".to_string(),
        action: "install handler for",
        source,
    })?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "stopping");
        token.cancel();
    });
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Metadata(a) => metadata(a),
        Command::Launcher(a) => launcher(*a),
        Command::Trigger(a) if a.control.is_etcd() => {
            let cfg = base_config(&a.config, Some(&a.key), None)?;
            etcd_trigger(&cfg, &a.control, etcd_trigger_global_snapshot())?;
            eprintln!("global snapshot requested (in etcd)");
            eprintln!("the elected coordinator's candidate reports its progress or why it refused");
            Ok(())
        }
        Command::Resume(a) if a.control.is_etcd() => {
            let cfg = base_config(&a.config, Some(&a.key), None)?;
            etcd_trigger(&cfg, &a.control, etcd_trigger_resume(a.gs))?;
            eprintln!("resume requested (in etcd)");
            eprintln!("the elected coordinator's candidate reports its progress or why it refused");
            Ok(())
        }
        Command::Candidate(a) => candidate(a),
        Command::Trigger(a) => {
            let cfg = base_config(&a.config, Some(&a.key), Some(&a.ms))?;
            let ms = metadata_server_of(&cfg)?;
            let transport = cfg.transport()?;
            runtime(1)?.block_on(trigger_global_snapshot(ms, &transport))?;
            eprintln!("global snapshot requested");
            eprintln!("the coordinator's launcher reports its progress or why it refused");
            Ok(())
        }
        Command::Resume(a) => {
            let cfg = base_config(&a.config, Some(&a.key), Some(&a.ms))?;
            let ms = metadata_server_of(&cfg)?;
            let transport = cfg.transport()?;
            runtime(1)?.block_on(trigger_resume(ms, &transport, a.gs))?;
            match a.gs {
                Some(gs) => eprintln!("resume from {gs} requested"),
                None => eprintln!("resume from the latest completed global snapshot requested"),
            }
            eprintln!("the coordinator's launcher reports its progress or why it refused");
            Ok(())
        }
        Command::Catalog(a) => catalog(a),
        Command::RcpbtManager(a) => {
            let cfg = TestManagerConfig {
                listen: a.listen,
                tokens: a.tokens,
                base_port: a.base_port,
                participants: a.participants,
                label: a.label,
                csv: a.csv,
                deadline: Duration::from_secs(a.deadline_s),
            };
            let outcome = runtime(1)?.block_on(async move {
                let tm = TestManager::bind(cfg).await?;
                tm.run().await
            })?;
            let line = serde_json::to_string(&outcome)
                .map_err(|source| crate::protocol::Error::MalformedPayload { source })?;
            println!("{line}");
            Ok(())
        }
        Command::RcpbtPeer(a) => {
            let cfg = PeerConfig {
                manager: a.manager,
                ip: a.ip,
                deadline: Duration::from_secs(a.deadline_s),
            };
            runtime(1)?.block_on(run_peer(cfg)).map(|_| ())
        }
        Command::RingNetns(a) => ring_netns(a),
        Command::Reap(a) => reap(a),
    }
}

/// Waits for the lab's death (SIGTERM from the kernel, [`crate::netns::DIE_WITH_PARENT_ENV`])
/// and removes what it left. A lab that ends normally kills its reaper with SIGKILL first,
/// so nothing is done twice.
fn reap(a: ReapArgs) -> Result<()> {
    let alive = crate::netns::arm_parent_death_signal().ok_or_else(|| Error::InvalidConfig {
        reason: format!(
            "reap is started by a lab, with {} set",
            crate::netns::DIE_WITH_PARENT_ENV
        ),
    })?;
    if alive {
        runtime(1)?.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).map_err(|source| Error::Network {
                peer: "SIGTERM".to_string(),
                action: "install handler for",
                source,
            })?;
            term.recv().await;
            Ok::<(), Error>(())
        })?;
    }
    #[cfg(feature = "hypervisor")]
    {
        let killed = unacloud_core::qemu::kill_all_under(&a.dir);
        if killed > 0 {
            tracing::warn!(vms = killed, dir = %a.dir.display(), "killed the VMs of a lab that died");
        }
    }
    let deleted = crate::netns::remove_lab(&a.prefix, &a.dir);
    tracing::warn!(namespaces = deleted.len(), prefix = %a.prefix, "removed what a lab that died left");
    Ok(())
}

fn metadata(a: MetadataArgs) -> Result<()> {
    let mut cfg = base_config(&a.config, Some(&a.key), None)?;
    let mut section = cfg.metadata.take().unwrap_or(MetadataSection {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 7000)),
        base_port: 7100,
        results_csv: None,
        max_registrations: None,
    });
    if let Some(l) = a.listen {
        section.listen = l;
    }
    if let Some(p) = a.base_port {
        section.base_port = p;
    }
    if let Some(p) = a.results_csv {
        section.results_csv = Some(p);
    }
    if let Some(n) = a.max_registrations {
        section.max_registrations = Some(n as usize);
    }
    let mut ms_cfg = MetadataServerConfig::new(ClusterId(cfg.cluster), section.base_port);
    if let Some(n) = section.max_registrations {
        ms_cfg.max_registrations = n;
    }
    let transport = cfg.transport()?;
    runtime(2)?.block_on(async move {
        let token = CancellationToken::new();
        cancel_on_signals(token.clone())?;
        let listener = tokio::net::TcpListener::bind(section.listen)
            .await
            .map_err(|source| Error::Network {
                peer: section.listen.to_string(),
                action: "listen",
                source,
            })?;
        let max = ms_cfg.max_registrations;
        let h = spawn_metadata_server(ms_cfg, listener, transport, section.results_csv.clone())?;
        tracing::info!(
            listen = %h.local_addr(),
            cluster = cfg.cluster,
            base_port = section.base_port,
            max_registrations = max,
            "metadata server listening"
        );
        eprintln!("metadata server listening on {}", h.local_addr());
        token.cancelled().await;
        h.stop().await;
        eprintln!("metadata server stopped");
        Ok(())
    })
}

fn launcher(a: LauncherArgs) -> Result<()> {
    let ms = (!a.control.is_etcd()).then_some(&a.ms);
    let mut cfg = base_config(&a.config, Some(&a.key), ms)?;
    if let Some(v) = a.snapshot_timeout_ms {
        cfg.snapshot_timeout_ms = Some(v);
    }
    if let Some(v) = a.precheck_timeout_ms {
        cfg.precheck_timeout_ms = Some(v);
    }
    let mut section = match cfg.launcher.take() {
        Some(s) => s,
        None => LauncherSection {
            advertise: a.advertise.ok_or_else(|| Error::InvalidConfig {
                reason: "--advertise IP is required (or a [launcher] section)".to_string(),
            })?,
            cluster_size: a.cluster_size.ok_or_else(|| Error::InvalidConfig {
                reason: "--cluster-size N is required (or a [launcher] section)".to_string(),
            })?,
            backend: BackendKind::default(),
            catalog: None,
            run_dir: None,
            hypervisor: None,
            vms: Vec::new(),
        },
    };
    if let Some(ip) = a.advertise {
        section.advertise = ip;
    }
    if let Some(n) = a.cluster_size {
        section.cluster_size = n;
    }
    if let Some(b) = a.backend {
        section.backend = b;
    }
    if let (Some(backend), Some(root)) = (a.hypervisor, a.hv_root) {
        section.hypervisor = Some(HypervisorSection {
            backend,
            root,
            live: true,
            margin_mb: a.margin_mb.unwrap_or(64),
            accel: a.accel,
        });
    }
    if let Some(p) = a.catalog {
        section.catalog = Some(p);
    }
    if let Some(d) = a.run_dir {
        section.run_dir = Some(d);
    }
    if let Some(name) = a.vm {
        section.vms.push(VmConfig {
            name,
            netns: a.netns,
            tap: a.tap,
            freeze_pid: a.freeze_pid,
            hold_ms: a.hold_ms.unwrap_or(0),
            lab_sleep_ms: a.lab_sleep_ms,
            ..VmConfig::default()
        });
    }
    cfg.launcher = Some(section);
    let opts = LauncherOptions {
        crash_after_step: a.crash_after_step,
        registration_timeout: a.registration_timeout_ms.map(Duration::from_millis),
    };
    let json = a.events_json;
    let mut stopped = StopSummary::default();
    runtime(1)?.block_on(async {
        let token = CancellationToken::new();
        cancel_on_signals(token.clone())?;
        let on_event = |ev: LauncherEvent| {
            stopped.note(&ev);
            print_event(&ev, json);
        };
        if a.control.is_etcd() {
            launcher_etcd(&cfg, &etcd_control(&a.control)?, opts, token, on_event).await
        } else {
            run_launcher(&cfg, opts, token, on_event).await
        }
    })?;
    eprintln!("{}", stopped.line());
    Ok(())
}

#[cfg(not(feature = "etcd"))]
fn no_etcd() -> Error {
    Error::InvalidConfig {
        reason: "--control etcd: this program was built without the `etcd` feature".to_string(),
    }
}

#[cfg(feature = "etcd")]
type EtcdControlArg = super::daemon::EtcdControl;
#[cfg(not(feature = "etcd"))]
type EtcdControlArg = ();

#[cfg(feature = "etcd")]
fn etcd_endpoints(list: &str) -> Result<Vec<String>> {
    crate::control::EtcdConfig::parse_endpoints(list).map_err(|e| match e {
        crate::control::ControlError::InvalidConfig { reason } => Error::InvalidConfig { reason },
        other => other.into(),
    })
}

#[cfg(feature = "etcd")]
fn etcd_control(c: &ControlArgs) -> Result<EtcdControlArg> {
    let list = c.etcd.as_deref().ok_or_else(|| Error::InvalidConfig {
        reason: "--control etcd needs --etcd ENDPOINTS".to_string(),
    })?;
    Ok(super::daemon::EtcdControl {
        endpoints: etcd_endpoints(list)?,
        lease_ttl: Duration::from_millis(c.lease_ttl_ms.unwrap_or(5000)),
    })
}

#[cfg(not(feature = "etcd"))]
fn etcd_control(_: &ControlArgs) -> Result<EtcdControlArg> {
    Err(no_etcd())
}

#[cfg(feature = "etcd")]
async fn launcher_etcd(
    cfg: &DaemonConfig,
    control: &EtcdControlArg,
    opts: LauncherOptions,
    token: CancellationToken,
    on_event: impl FnMut(LauncherEvent) + Send,
) -> Result<()> {
    super::daemon::run_launcher_etcd(cfg, control, opts, token, on_event).await
}

#[cfg(not(feature = "etcd"))]
async fn launcher_etcd(
    _: &DaemonConfig,
    _: &EtcdControlArg,
    _: LauncherOptions,
    _: CancellationToken,
    _: impl FnMut(LauncherEvent) + Send,
) -> Result<()> {
    Err(no_etcd())
}

#[cfg(feature = "etcd")]
type EtcdTrigger = crate::control::catalog::Trigger;
#[cfg(not(feature = "etcd"))]
type EtcdTrigger = ();

#[cfg(feature = "etcd")]
fn etcd_trigger_global_snapshot() -> EtcdTrigger {
    crate::control::catalog::Trigger::GlobalSnapshot
}
#[cfg(not(feature = "etcd"))]
fn etcd_trigger_global_snapshot() -> EtcdTrigger {}

#[cfg(feature = "etcd")]
fn etcd_trigger_resume(gs: Option<GlobalSnapshotId>) -> EtcdTrigger {
    crate::control::catalog::Trigger::Resume { gs }
}
#[cfg(not(feature = "etcd"))]
fn etcd_trigger_resume(_: Option<GlobalSnapshotId>) -> EtcdTrigger {}

/// Queues a trigger in etcd, for the elected coordinator (from any host).
#[cfg(feature = "etcd")]
fn etcd_trigger(cfg: &DaemonConfig, c: &ControlArgs, t: EtcdTrigger) -> Result<()> {
    let control = etcd_control(c)?;
    let ec = crate::control::EtcdConfig::new(control.endpoints, ClusterId(cfg.cluster));
    runtime(1)?
        .block_on(async move {
            let etcd = crate::control::Etcd::connect(&ec).await?;
            crate::control::catalog::put_trigger(&etcd, &t).await
        })
        .map(|_| ())
        .map_err(Error::from)
}

#[cfg(not(feature = "etcd"))]
fn etcd_trigger(_: &DaemonConfig, _: &ControlArgs, _: EtcdTrigger) -> Result<()> {
    Err(no_etcd())
}

#[cfg(feature = "etcd")]
fn candidate(a: CandidateArgs) -> Result<()> {
    let mut cfg = base_config(&a.config, Some(&a.key), None)?;
    if let Some(v) = a.snapshot_timeout_ms {
        cfg.snapshot_timeout_ms = Some(v);
    }
    if let Some(v) = a.precheck_timeout_ms {
        cfg.precheck_timeout_ms = Some(v);
    }
    let control = super::daemon::EtcdControl {
        endpoints: etcd_endpoints(&a.etcd)?,
        lease_ttl: Duration::from_millis(a.lease_ttl_ms.unwrap_or(5000)),
    };
    let name = a.name.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "candidate".to_string())
    });
    let json = a.events_json;
    runtime(1)?.block_on(async {
        let token = CancellationToken::new();
        cancel_on_signals(token.clone())?;
        super::daemon::run_candidate_daemon(&cfg, &control, name, a.listen, token, |r| {
            if json {
                if let Ok(line) = serde_json::to_string(&r) {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
            } else {
                eprintln!("{r:?}");
            }
        })
        .await
    })
}

#[cfg(not(feature = "etcd"))]
fn candidate(_: CandidateArgs) -> Result<()> {
    Err(no_etcd())
}

/// `catalog --control etcd`: the catalog as etcd holds it (the path shown is the key
/// prefix), or its timing results as CSV.
#[cfg(feature = "etcd")]
fn etcd_catalog(cfg: &DaemonConfig, a: &CatalogArgs) -> Result<()> {
    let control = etcd_control(&a.control)?;
    let ec = crate::control::EtcdConfig::new(control.endpoints, ClusterId(cfg.cluster));
    let times = a.times_csv;
    let (catalog, csv, prefix) = runtime(1)?.block_on(async move {
        let etcd = crate::control::Etcd::connect(&ec).await?;
        let cat = crate::control::catalog::load(&etcd).await?;
        let csv = if times {
            Some(crate::control::catalog::times_csv(&etcd).await?)
        } else {
            None
        };
        Ok::<_, crate::control::ControlError>((cat, csv, etcd.key("catalog/")))
    })?;
    if let Some(csv) = csv {
        print!("{csv}");
    } else if a.json {
        println!("{}", catalog_json(Path::new(&prefix), &catalog));
    } else {
        print!("{}", catalog_table(Path::new(&prefix), &catalog));
    }
    Ok(())
}

#[cfg(not(feature = "etcd"))]
fn etcd_catalog(_: &DaemonConfig, _: &CatalogArgs) -> Result<()> {
    Err(no_etcd())
}

/// What the launcher's last words say: how many VMs stopped, and whether any rule or
/// error was left.
#[derive(Debug, Default)]
struct StopSummary {
    vms: usize,
    leftovers: usize,
    errors: Vec<String>,
    interrupted: Option<String>,
}

impl StopSummary {
    fn note(&mut self, ev: &LauncherEvent) {
        match ev {
            LauncherEvent::Summary { vm, summary, .. } => {
                self.vms += 1;
                self.leftovers += summary.leftovers;
                if let Some(e) = &summary.error {
                    self.errors.push(format!("{vm}: {e}"));
                }
            }
            LauncherEvent::Interrupted { phase } => self.interrupted = Some(phase.clone()),
            _ => {}
        }
    }

    fn line(&self) -> String {
        let mut s = match &self.interrupted {
            Some(phase) => format!("launcher stopped while {phase}"),
            None => "launcher stopped".to_string(),
        };
        s.push_str(&format!(
            ": {} VM{}, ",
            self.vms,
            if self.vms == 1 { "" } else { "s" }
        ));
        if self.leftovers == 0 {
            s.push_str("every packet-colouring rule removed");
        } else {
            s.push_str(&format!(
                "{} packet-colouring objects left behind",
                self.leftovers
            ));
        }
        if !self.errors.is_empty() {
            s.push_str(&format!("; errors: {}", self.errors.join("; ")));
        }
        s
    }
}

/// One event: a JSON line on standard output, or a `name key=value …` line on standard
/// error.
fn print_event(ev: &LauncherEvent, json: bool) {
    let Ok(v) = serde_json::to_value(ev) else {
        return;
    };
    if json {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
        return;
    }
    let Some(obj) = v.as_object() else { return };
    let mut line = obj
        .get("event")
        .and_then(|e| e.as_str())
        .unwrap_or("event")
        .to_string();
    for (k, val) in obj.iter().filter(|(k, _)| *k != "event") {
        match val {
            serde_json::Value::String(s) => line.push_str(&format!(" {k}={s:?}")),
            other => line.push_str(&format!(" {k}={other}")),
        }
    }
    eprintln!("{line}");
}

fn catalog(a: CatalogArgs) -> Result<()> {
    let cfg = base_config(&a.config, None, None)?;
    if a.control.is_etcd() {
        return etcd_catalog(&cfg, &a);
    }
    if a.times_csv {
        return Err(Error::InvalidConfig {
            reason: "--times-csv reads the catalog in etcd: add --control etcd --etcd ENDPOINTS \
                     (with the embedded control plane the metadata server writes the CSV, \
                     its --results-csv)"
                .to_string(),
        });
    }
    let path = a
        .catalog
        .or_else(|| cfg.launcher.as_ref().and_then(|l| l.catalog.clone()))
        .unwrap_or_else(|| default_catalog_path(cfg.cluster));
    let store = CatalogStore::new(&path);
    let catalog = store.load()?.ok_or_else(|| Error::InvalidConfig {
        reason: format!(
            "there is no catalog file {}: a coordinator writes it when its first global \
             snapshot starts (its launcher's --catalog; default \
             /var/lib/unacloud/catalog-<cluster>.json); pass --catalog FILE",
            path.display()
        ),
    })?;
    if a.json {
        println!("{}", catalog_json(&path, &catalog));
    } else {
        print!("{}", catalog_table(&path, &catalog));
    }
    Ok(())
}

/// The catalog as one JSON object: `path`, `cluster`, `last_started`,
/// `last_resume_attempt` and `completed` (oldest first, each with `gs`, `participants`,
/// `global_time_us` and `local_times`).
fn catalog_json(path: &Path, c: &Catalog) -> serde_json::Value {
    serde_json::json!({
        "path": path.display().to_string(),
        "cluster": c.cluster.0,
        "last_started": c.last_started.map(|g| g.0),
        "last_resume_attempt": c.last_resume_attempt.map(|a| a.0),
        "completed": c.completed.values().collect::<Vec<_>>(),
    })
}

fn seconds(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// The catalog as a table, one completed global snapshot per row.
fn catalog_table(path: &Path, c: &Catalog) -> String {
    let mut out = format!(
        "catalog {} ({}): {} completed global snapshot{}",
        path.display(),
        c.cluster,
        c.completed.len(),
        if c.completed.len() == 1 { "" } else { "s" }
    );
    if let Some(gs) = c.last_started {
        out.push_str(&format!(", last started {gs}"));
    }
    if let Some(a) = c.last_resume_attempt {
        out.push_str(&format!(", last resume attempt {}", a.0));
    }
    out.push('\n');
    if c.completed.is_empty() {
        return out;
    }
    let header = ["GS", "PARTICIPANTS", "GLOBAL TIME", "LOCAL TIMES"];
    let rows: Vec<[String; 4]> = c
        .completed
        .values()
        .map(|s| {
            let participants: Vec<String> =
                s.participants.iter().map(|p| p.0.to_string()).collect();
            let locals: Vec<String> = s
                .local_times
                .iter()
                .map(|l| format!("{}: {}", l.participant.0, seconds(l.local_time)))
                .collect();
            [
                s.gs.to_string(),
                participants.join(","),
                seconds(s.global_time),
                locals.join(", "),
            ]
        })
        .collect();
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].len())
            .chain(std::iter::once(header[i].len()))
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2)];
    let mut line = |cells: [&str; 4]| {
        out.push_str(&format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        ));
    };
    line(header);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3]]);
    }
    out
}

fn ring_netns(a: RingNetnsArgs) -> Result<()> {
    let program = std::env::current_exe().map_err(|e| Error::InvalidConfig {
        reason: format!("cannot find this program's path: {e}"),
    })?;
    let mut cfg =
        super::ring::RingNetnsConfig::new(a.peers, a.tokens, a.snapshots, program, Vec::new());
    cfg.snapshot_delay = Duration::from_millis(a.snapshot_delay_ms);
    cfg.snapshot_timeout = Duration::from_secs(5).max(cfg.snapshot_delay * 4);
    cfg.deadline = Duration::from_secs(600);
    if let Some(b) = a.backend {
        cfg.backend = b;
    }
    crate::netns::probe()?;
    let report = runtime(2)?.block_on(async move {
        let token = CancellationToken::new();
        cancel_on_signals(token.clone())?;
        tokio::select! {
            r = super::ring::run_ring_netns(cfg) => r,
            _ = token.cancelled() => Err(Error::Rcpbt {
                reason: "interrupted; namespaces, rules and processes were removed".to_string(),
            }),
        }
    })?;
    if a.json {
        println!("{}", report.json_summary());
    } else {
        println!("{}", report.human_summary());
        if let (Some(m), Some(p)) = (
            super::ring::median(&report.overhead_ms),
            super::ring::percentile(&report.overhead_ms, 95.0),
        ) {
            println!("coordination overhead: median {m:.2} ms, p95 {p:.2} ms");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::{CompletedSnapshot, LocalTime, ParticipantId};

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("unacloud-gs").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn aliases_and_hidden_subcommands_parse() {
        for (args, want) in [
            (
                &["metadata-server", "--listen", "127.0.0.1:1"][..],
                "metadata",
            ),
            (&["metadata", "--max-registrations", "5"], "metadata"),
            (&["start", "--ms", "127.0.0.1:1"], "trigger"),
            (&["trigger"], "trigger"),
            (&["resume", "--gs", "gs-3"], "resume"),
            (&["catalog", "--json"], "catalog"),
            (
                &["rcpbt-peer", "--manager", "10.0.0.1:9", "--ip", "10.0.0.2"],
                "rcpbt-peer",
            ),
            (
                &[
                    "ring-netns",
                    "--peers",
                    "2",
                    "--tokens",
                    "1",
                    "--snapshots",
                    "1",
                ],
                "ring-netns",
            ),
        ] {
            let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let got = match cli.command {
                Command::Metadata(_) => "metadata",
                Command::Trigger(_) => "trigger",
                Command::Resume(ref r) => {
                    assert_eq!(r.gs, Some(GlobalSnapshotId(3)));
                    "resume"
                }
                Command::Catalog(_) => "catalog",
                Command::RcpbtPeer(_) => "rcpbt-peer",
                Command::RingNetns(_) => "ring-netns",
                _ => "other",
            };
            assert_eq!(got, want, "{args:?}");
        }
        let help = Cli::command().render_help().to_string();
        assert!(!help.contains("rcpbt"), "{help}");
        assert!(
            help.contains("metadata-server") && help.contains("start"),
            "{help}"
        );
    }

    #[test]
    fn launcher_flags_need_their_companions() {
        assert!(parse(&["launcher", "--netns", "x"]).is_err());
        assert!(parse(&["launcher", "--vm", "a", "--hold-ms", "5"]).is_err());
        assert!(parse(&[
            "launcher",
            "--vm",
            "a",
            "--freeze-pid",
            "1",
            "--lab-sleep-ms",
            "1"
        ])
        .is_err());
        assert!(parse(&["launcher", "--hypervisor", "qemu"]).is_err());
        assert!(parse(&["launcher", "--backend", "pf"]).is_err());
        let cli = parse(&[
            "launcher",
            "--vm",
            "a",
            "--freeze-pid",
            "1",
            "--hold-ms",
            "5",
            "--backend",
            "nft-netlink",
        ])
        .unwrap();
        let Command::Launcher(l) = cli.command else {
            panic!()
        };
        assert_eq!(l.backend, Some(BackendKind::NftNetlink));
        assert_eq!(l.hold_ms, Some(5));
    }

    fn sample() -> Catalog {
        let mut c = Catalog::new(ClusterId(42));
        c.last_started = Some(GlobalSnapshotId(3));
        for gs in [1u64, 3] {
            c.completed.insert(
                GlobalSnapshotId(gs),
                CompletedSnapshot {
                    gs: GlobalSnapshotId(gs),
                    participants: vec![ParticipantId(0), ParticipantId(1)],
                    local_times: vec![
                        LocalTime {
                            participant: ParticipantId(0),
                            local_time: Duration::from_millis(1_950),
                        },
                        LocalTime {
                            participant: ParticipantId(1),
                            local_time: Duration::from_millis(2_400),
                        },
                    ],
                    global_time: Duration::from_millis(3_060 + gs),
                },
            );
        }
        c
    }

    #[test]
    fn a_catalog_reads_as_a_table_and_as_json() {
        let t = catalog_table(Path::new("c.json"), &sample());
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].contains("cluster-42")
                && lines[0].contains("2 completed global snapshots")
                && lines[0].contains("last started gs-3"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("GS ") && lines[1].contains("LOCAL TIMES"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("gs-1 ")
                && lines[2].contains("0,1")
                && lines[2].contains("3.061 s")
                && lines[2].contains("0: 1.950 s, 1: 2.400 s"),
            "{t}"
        );
        assert!(lines[3].starts_with("gs-3 "), "{t}");
        let j = catalog_json(Path::new("c.json"), &sample());
        assert_eq!(j["cluster"], 42);
        assert_eq!(j["completed"][1]["gs"], 3);
        assert_eq!(j["completed"][0]["global_time_us"], 3_061_000);
        assert_eq!(j["completed"][0]["local_times"][1]["participant"], 1);
        let empty = catalog_table(Path::new("c.json"), &Catalog::new(ClusterId(1)));
        assert_eq!(empty.lines().count(), 1, "{empty}");
        assert!(empty.contains("0 completed global snapshots"), "{empty}");
    }
}

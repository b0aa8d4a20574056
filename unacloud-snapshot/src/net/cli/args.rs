//! The clap definitions of the `unacloud-gs` command line: the subcommands, their flags
//! and the parsers of flag values.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::net::daemon::BackendKind;
use crate::net::Error;
use crate::protocol::GlobalSnapshotId;

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
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Subcommand, Debug)]
pub(super) enum Command {
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
    /// Run a coordinator candidate, on every host (control plane on etcd)
    ///
    /// It campaigns for the coordinator role in etcd; while elected it coordinates the
    /// global snapshots and resumes (triggered with `trigger --control etcd` / `resume
    /// --control etcd` from any host) and records them in etcd. When it dies another
    /// candidate takes over within its lease TTL. Stops on SIGINT/SIGTERM, resigning.
    Candidate(CandidateArgs),
    /// RCPBT test manager (used by the ring scenarios).
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
pub(super) struct ReapArgs {
    /// The lab's run directory (its VMs live below it).
    #[arg(long)]
    pub(super) dir: PathBuf,
    /// The lab's namespace prefix (`ucn-<pid>-<rand>-`).
    #[arg(long)]
    pub(super) prefix: String,
}

/// `--config` and `--cluster`, taken by every daemon command.
#[derive(Args, Debug, Clone)]
pub(super) struct ConfigArgs {
    /// TOML configuration file (see the documentation of unacloud_snapshot::net::daemon);
    /// flags override what it says.
    #[arg(long, value_name = "FILE")]
    pub(super) config: Option<PathBuf>,
    /// The cluster id; every command of one deployment uses the same [default: the
    /// configuration file's, else 1].
    #[arg(long, value_name = "N")]
    pub(super) cluster: Option<u64>,
}

/// `--key-file`.
#[derive(Args, Debug, Clone)]
pub(super) struct KeyArgs {
    /// File holding the cluster key, hexadecimal
    ///
    /// The same file on every machine (make one with `head -c 32 /dev/urandom | xxd -p -c
    /// 64 > cluster.key`): every frame is then authenticated with HMAC-SHA256. Without it
    /// frames are not authenticated.
    #[arg(long, value_name = "FILE")]
    pub(super) key_file: Option<PathBuf>,
}

/// `--ms`.
#[derive(Args, Debug, Clone)]
pub(super) struct MsArgs {
    /// The metadata server's address, IP:PORT (or `metadata_server` in the configuration).
    #[arg(long, value_name = "ADDR")]
    pub(super) ms: Option<SocketAddr>,
}

/// The control plane: where hosts register and the catalog lives.
#[derive(Args, Debug, Clone)]
pub(super) struct ControlArgs {
    /// Control plane: embedded (a metadata server and a coordinator host) or etcd
    /// (registrations, the coordinator election and the catalog in an etcd cluster)
    #[arg(long, value_name = "KIND", default_value = "embedded", value_parser = ["embedded", "etcd"])]
    pub(super) control: String,
    /// etcd client endpoints, comma-separated `host:port` or URLs (with --control etcd)
    #[arg(long, value_name = "ENDPOINTS")]
    pub(super) etcd: Option<String>,
    /// Lease TTL in ms (with --control etcd): how long after a host or a coordinator dies
    /// it is reported unreachable or replaced [default: 5000]
    #[arg(long, value_name = "MS")]
    pub(super) lease_ttl_ms: Option<u64>,
}

impl ControlArgs {
    pub(super) fn is_etcd(&self) -> bool {
        self.control == "etcd"
    }
}

#[derive(Args, Debug)]
pub(super) struct MetadataArgs {
    #[command(flatten)]
    pub(super) config: ConfigArgs,
    #[command(flatten)]
    pub(super) key: KeyArgs,
    /// Address to listen on [default: 127.0.0.1:7000, or [metadata] listen].
    #[arg(long, value_name = "ADDR")]
    pub(super) listen: Option<SocketAddr>,
    /// Participant id N gets port base port + N [default: 7100, or [metadata] base_port].
    #[arg(long, value_name = "P")]
    pub(super) base_port: Option<u16>,
    /// CSV file the times of every global snapshot are appended to
    /// (global_snapshot,participant,local_time_s,global_time_s).
    #[arg(long, value_name = "FILE")]
    pub(super) results_csv: Option<PathBuf>,
    /// Refuse INSERTs beyond this many registrations [default: 1024].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(super) max_registrations: Option<u32>,
}

#[derive(Args, Debug)]
pub(super) struct LauncherArgs {
    #[command(flatten)]
    pub(super) config: ConfigArgs,
    #[command(flatten)]
    pub(super) key: KeyArgs,
    #[command(flatten)]
    pub(super) ms: MsArgs,
    #[command(flatten)]
    pub(super) control: ControlArgs,
    /// The address other hosts reach this host's participants at (required without a
    /// [launcher] section).
    #[arg(long, value_name = "IP")]
    pub(super) advertise: Option<IpAddr>,
    /// Number of VMs in the whole deployment: the coordinator waits until that many
    /// registered (required without a [launcher] section).
    #[arg(long, value_name = "N")]
    pub(super) cluster_size: Option<u32>,
    /// Packet-colouring backend: nft, nft-netlink, nft-command or iptables [default: nft]
    ///
    /// nft: a long-lived nft session; nft-netlink: netlink messages from the launcher
    /// itself, no nft process; nft-command: one nft process per change; iptables.
    #[arg(long, value_name = "NAME", value_parser = parse_backend)]
    pub(super) backend: Option<BackendKind>,
    /// Take, restore and start the VMs' local snapshots with this hypervisor backend
    /// (`qemu`).
    #[arg(long, value_name = "NAME", requires = "hv_root")]
    pub(super) hypervisor: Option<String>,
    /// The hypervisor backend's root folder on this host.
    #[arg(long, value_name = "DIR", requires = "hypervisor")]
    pub(super) hv_root: Option<PathBuf>,
    /// QEMU accelerator: auto (KVM when a probe boot shows it works), kvm or tcg
    /// [default: auto].
    #[arg(long, value_name = "ACCEL", requires = "hypervisor")]
    pub(super) accel: Option<String>,
    /// Free space required beyond each VM's memory, in MiB [default: 64].
    #[arg(long, value_name = "M", requires = "hypervisor")]
    pub(super) margin_mb: Option<u64>,
    /// The coordinator's catalog file [default: /var/lib/unacloud/catalog-<cluster>.json]
    ///
    /// The catalog of completed global snapshots and of the epochs used, persisted whenever
    /// a global snapshot starts or completes and whenever a resume starts, so that a
    /// restarted coordinator never reuses an id and can resume. By default
    /// /var/lib/unacloud/catalog-<cluster>.json, the directory created with mode 0700 if
    /// missing; a launcher that may not create it stops and asks for --catalog.
    #[arg(long, value_name = "FILE")]
    pub(super) catalog: Option<PathBuf>,
    /// Directory of the launchers' lock files [default: /run/unacloud, else the temporary
    /// directory]
    ///
    /// Each VM's colouring scope (its namespace and tap, or the host) is locked there
    /// before any rule is touched, so that a second launcher for the same VM fails instead
    /// of removing the running one's rules. Launchers of one host must use the same.
    #[arg(long, value_name = "DIR")]
    pub(super) run_dir: Option<PathBuf>,
    /// A VM of this host, by name (more VMs: [[launcher.vm]] entries in the configuration
    /// file).
    #[arg(long, value_name = "NAME")]
    pub(super) vm: Option<String>,
    /// The network namespace of the VM's tap (its rules are applied there).
    #[arg(long, value_name = "NS", requires = "vm")]
    pub(super) netns: Option<String>,
    /// Colour the VM's traffic on this host interface, its tap (forward path), instead of
    /// the host's own traffic.
    #[arg(long, value_name = "IF", requires = "vm")]
    pub(super) tap: Option<String>,
    /// Lab method: the local snapshot freezes this process (SIGSTOP/SIGCONT).
    #[arg(
        long,
        value_name = "PID",
        requires = "vm",
        conflicts_with = "lab_sleep_ms"
    )]
    pub(super) freeze_pid: Option<i32>,
    /// How long --freeze-pid keeps the process stopped, in ms [default: 0].
    #[arg(long, value_name = "MS", requires = "freeze_pid")]
    pub(super) hold_ms: Option<u64>,
    /// Test method: the local snapshot only waits this long (captures nothing).
    #[arg(long, value_name = "MS", requires = "vm")]
    pub(super) lab_sleep_ms: Option<u64>,
    /// Phase-2 deadline of a global snapshot, in ms [default: 120000].
    #[arg(long, value_name = "MS")]
    pub(super) snapshot_timeout_ms: Option<u64>,
    /// Phase-1 (pre-check) deadline, in ms [default: 10000].
    #[arg(long, value_name = "MS")]
    pub(super) precheck_timeout_ms: Option<u64>,
    /// Bound on registering and on waiting for the cluster and the coordinator, in ms
    /// [default: 60000].
    #[arg(long, value_name = "MS")]
    pub(super) registration_timeout_ms: Option<u64>,
    /// Print events as JSON lines on standard output
    ///
    /// One object per line, its kind in "event": registered, ready, gs_started,
    /// gs_completed, gs_failed, trigger_refused, resume_started, poll_completed,
    /// resume_completed, resume_failed, resumed, abandoned, connected, disconnected, error,
    /// release_missed, cleanup_failed, idle_drop_failed, interrupted, summary. Without it
    /// events are printed on standard error as `name key=value ...` lines.
    #[arg(long)]
    pub(super) events_json: bool,
    /// Fault injection for tests: kill this process right after step 1-6 of phase 2.
    #[arg(long, value_name = "STEP", hide = true)]
    pub(super) crash_after_step: Option<u8>,
}

#[derive(Args, Debug)]
pub(super) struct TriggerArgs {
    #[command(flatten)]
    pub(super) config: ConfigArgs,
    #[command(flatten)]
    pub(super) key: KeyArgs,
    #[command(flatten)]
    pub(super) ms: MsArgs,
    #[command(flatten)]
    pub(super) control: ControlArgs,
}

#[derive(Args, Debug)]
pub(super) struct ResumeArgs {
    #[command(flatten)]
    pub(super) config: ConfigArgs,
    #[command(flatten)]
    pub(super) key: KeyArgs,
    #[command(flatten)]
    pub(super) ms: MsArgs,
    #[command(flatten)]
    pub(super) control: ControlArgs,
    /// The global snapshot to restore, `7` or `gs-7` [default: the latest completed one].
    #[arg(long, value_name = "ID", value_parser = parse_gs)]
    pub(super) gs: Option<GlobalSnapshotId>,
}

#[derive(Args, Debug)]
pub(super) struct CandidateArgs {
    #[command(flatten)]
    pub(super) config: ConfigArgs,
    #[command(flatten)]
    pub(super) key: KeyArgs,
    /// etcd client endpoints, comma-separated `host:port` or URLs
    #[arg(long, value_name = "ENDPOINTS")]
    pub(super) etcd: String,
    /// Lease TTL in ms: how long after this candidate dies another one takes over
    /// [default: 5000]
    #[arg(long, value_name = "MS")]
    pub(super) lease_ttl_ms: Option<u64>,
    /// Where the coordinator listens when elected (participants dial it)
    #[arg(long, value_name = "ADDR")]
    pub(super) listen: SocketAddr,
    /// A name for people (the host) [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub(super) name: Option<String>,
    /// Phase-2 deadline of a global snapshot, in ms [default: 120000].
    #[arg(long, value_name = "MS")]
    pub(super) snapshot_timeout_ms: Option<u64>,
    /// Phase-1 (pre-check) deadline, in ms [default: 10000].
    #[arg(long, value_name = "MS")]
    pub(super) precheck_timeout_ms: Option<u64>,
    /// Print events as JSON lines on standard output: elected, lost, and the
    /// coordinator's gs_started, gs_completed, gs_failed, trigger_refused, resume_* …
    #[arg(long)]
    pub(super) events_json: bool,
}

#[derive(Args, Debug)]
pub(super) struct CatalogArgs {
    #[command(flatten)]
    pub(super) config: ConfigArgs,
    /// The coordinator's catalog file [default: the configuration's [launcher] catalog,
    /// else /var/lib/unacloud/catalog-<cluster>.json].
    #[arg(long, value_name = "FILE")]
    pub(super) catalog: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub(super) json: bool,
    #[command(flatten)]
    pub(super) control: ControlArgs,
    /// With --control etcd: print the timing results of every recorded global snapshot
    /// as CSV (global_snapshot,participant,local_time_s,global_time_s) instead.
    #[arg(long)]
    pub(super) times_csv: bool,
}

#[derive(Args, Debug)]
pub(super) struct RcpbtManagerArgs {
    /// Address to listen on.
    #[arg(long)]
    pub(super) listen: SocketAddr,
    /// Tokens passed around the ring.
    #[arg(long)]
    pub(super) tokens: u64,
    /// Ring peer i listens on base port + i.
    #[arg(long)]
    pub(super) base_port: u16,
    /// Number of ring peers.
    #[arg(long)]
    pub(super) participants: u32,
    /// Label of the results.
    #[arg(long, default_value = "rcpbt")]
    pub(super) label: String,
    /// CSV file of the results.
    #[arg(long)]
    pub(super) csv: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub(super) deadline_s: u64,
}

#[derive(Args, Debug)]
pub(super) struct RcpbtPeerArgs {
    /// The test manager's address.
    #[arg(long)]
    pub(super) manager: SocketAddr,
    /// This peer's address.
    #[arg(long)]
    pub(super) ip: Ipv4Addr,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub(super) deadline_s: u64,
}

#[derive(Args, Debug)]
pub(super) struct RingNetnsArgs {
    /// Ring peers (= namespaces).
    #[arg(long)]
    pub(super) peers: u32,
    /// Tokens passed around the ring.
    #[arg(long)]
    pub(super) tokens: u64,
    /// Global snapshots taken while the ring runs.
    #[arg(long)]
    pub(super) snapshots: u32,
    /// How long each local snapshot freezes its peer, in ms.
    #[arg(long, default_value_t = 0)]
    pub(super) snapshot_delay_ms: u64,
    /// Packet-colouring backend.
    #[arg(long, value_parser = parse_backend)]
    pub(super) backend: Option<BackendKind>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    pub(super) json: bool,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

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
}

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

mod args;
mod catalog;
mod daemons;
mod etcd;
mod labs;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use tokio_util::sync::CancellationToken;

use self::args::{Cli, Command, ConfigArgs, KeyArgs, MsArgs};
use self::catalog::catalog;
use self::daemons::{launcher, metadata};
use self::etcd::{candidate, etcd_trigger, etcd_trigger_global_snapshot, etcd_trigger_resume};
use self::labs::{reap, ring_netns};
use super::daemon::{trigger_global_snapshot, trigger_resume, DaemonConfig};
use crate::net::{Error, Result};
use crate::rcpbt::{run_peer, PeerConfig, TestManager, TestManagerConfig};

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

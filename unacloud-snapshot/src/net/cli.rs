//! The command line of the daemons and of the RCPBT programs, shared by the
//! `unacloud-gs` binary and by programs that re-execute themselves (the `ring_netns`
//! example).
//!
//! ```text
//! unacloud-gs metadata-server [--config F] [--cluster N] [--listen ADDR] [--base-port P]
//!                             [--results-csv F] [--key-file F]
//! unacloud-gs launcher [--config F] [--cluster N] [--ms ADDR] [--advertise IP]
//!                      [--cluster-size N] [--backend nft|nft-netlink|nft-command|iptables]
//!                      [--hypervisor qemu --hv-root DIR [--accel auto|kvm|tcg]] [--catalog F]
//!                      [--vm NAME [--netns NS] [--tap IF]
//!                                 [--freeze-pid PID [--hold-ms MS] | --lab-sleep-ms MS]]
//!                      [--snapshot-timeout-ms MS] [--precheck-timeout-ms MS]
//!                      [--key-file F] [--events-json]
//! unacloud-gs start [--config F] [--cluster N] [--ms ADDR] [--key-file F]
//! unacloud-gs resume [--config F] [--cluster N] [--ms ADDR] [--key-file F] [--gs ID]
//! unacloud-gs rcpbt-manager --listen ADDR --tokens T --base-port P --participants N
//!                           [--label L] [--csv F] [--deadline-s S]
//! unacloud-gs rcpbt-peer --manager ADDR --ip IP [--deadline-s S]
//! unacloud-gs ring-netns --peers P --tokens T --snapshots K [--snapshot-delay-ms D]
//!                        [--backend nft|nft-netlink|nft-command|iptables] [--json]      (root)
//! ```
//!
//! Flags override the configuration file. `launcher` and `metadata-server` stop on
//! SIGINT/SIGTERM, removing every rule first.
//!
//! `start` takes a global snapshot; `resume` restores the application from one (POLL until
//! every participant answers, RESTORE, START), by default the latest completed one, or
//! `--gs ID` (`7` or `gs-7`). Both return once the metadata server forwarded the trigger
//! to the coordinator (they fail when it refuses: nobody registered, coordinator not
//! connected); the coordinator's launcher reports the outcome or its refusal as events.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::daemon::{
    run_launcher, trigger_global_snapshot, trigger_resume, DaemonConfig, HypervisorSection,
    LauncherOptions, LauncherSection, MetadataSection, VmConfig,
};
use super::node::spawn_metadata_server;
use crate::error::{Error, Result};
use crate::protocol::{ClusterId, GlobalSnapshotId, MetadataServerConfig};
use crate::rcpbt::{run_peer, PeerConfig, TestManager, TestManagerConfig};

const SWITCHES: &[&str] = &["--events-json", "--help", "--json"];

/// Parsed `--flag value` pairs.
#[derive(Debug, Default)]
pub struct Flags {
    values: HashMap<String, String>,
    switches: Vec<String>,
}

impl Flags {
    /// Parses `args` (without the subcommand).
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut f = Flags::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if !a.starts_with("--") {
                return Err(Error::InvalidConfig {
                    reason: format!("unexpected argument {a:?}; flags look like --name value"),
                });
            }
            if SWITCHES.contains(&a.as_str()) {
                f.switches.push(a.clone());
                continue;
            }
            let (name, value) = match a.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => {
                    let v = it.next().ok_or_else(|| Error::InvalidConfig {
                        reason: format!("flag {a} needs a value"),
                    })?;
                    (a.clone(), v.clone())
                }
            };
            f.values.insert(name, value);
        }
        Ok(f)
    }

    /// A string flag.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// A parsed flag.
    pub fn parse_opt<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| Error::InvalidConfig {
                reason: format!("flag {name}: cannot parse {v:?}"),
            }),
        }
    }

    /// A required parsed flag.
    pub fn require<T: std::str::FromStr>(&self, name: &str) -> Result<T> {
        self.parse_opt(name)?.ok_or_else(|| Error::InvalidConfig {
            reason: format!("flag {name} is required"),
        })
    }

    /// Whether a switch was given.
    pub fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    /// Fails unless every flag given is one of `allowed` (`--help` always is), naming the
    /// flags `command` takes.
    pub fn only(&self, command: &str, allowed: &[&str]) -> Result<()> {
        let given = self.values.keys().chain(self.switches.iter());
        for flag in given {
            if flag != "--help" && !allowed.contains(&flag.as_str()) {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "{command} does not take {flag}; its flags are {}",
                        allowed.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The flags of `resume`.
const RESUME_FLAGS: &[&str] = &["--config", "--cluster", "--ms", "--key-file", "--gs"];

/// A global snapshot id as the operator writes it: `7` or `gs-7`.
fn parse_gs(v: &str) -> Result<GlobalSnapshotId> {
    v.strip_prefix("gs-")
        .unwrap_or(v)
        .parse()
        .map(GlobalSnapshotId)
        .map_err(|_| Error::InvalidConfig {
            reason: format!("flag --gs: {v:?} is not a global snapshot id (e.g. 7 or gs-7)"),
        })
}

fn metadata_server_of(cfg: &DaemonConfig) -> Result<SocketAddr> {
    cfg.metadata_server.ok_or_else(|| Error::InvalidConfig {
        reason: "no metadata server address: set `metadata_server` or pass --ms".to_string(),
    })
}

fn base_config(f: &Flags) -> Result<DaemonConfig> {
    let mut cfg = match f.get("--config") {
        Some(p) => DaemonConfig::from_file(std::path::Path::new(p))?,
        None => DaemonConfig::new(f.parse_opt("--cluster")?.unwrap_or(1)),
    };
    if let Some(c) = f.parse_opt("--cluster")? {
        cfg.cluster = c;
    }
    if let Some(k) = f.get("--key-file") {
        cfg.key_file = Some(PathBuf::from(k));
    }
    if let Some(ms) = f.parse_opt("--ms")? {
        cfg.metadata_server = Some(ms);
    }
    if let Some(v) = f.parse_opt("--snapshot-timeout-ms")? {
        cfg.snapshot_timeout_ms = Some(v);
    }
    if let Some(v) = f.parse_opt("--precheck-timeout-ms")? {
        cfg.precheck_timeout_ms = Some(v);
    }
    Ok(cfg)
}

fn usage() -> &'static str {
    "usage: unacloud-gs <metadata-server|launcher|start|resume|rcpbt-manager|rcpbt-peer|ring-netns> [flags]\n\
     \n\
     unacloud-gs metadata-server [--config F] [--cluster N] [--listen ADDR] [--base-port P]\n\
     \x20                           [--results-csv F] [--key-file F]\n\
     unacloud-gs launcher [--config F] [--cluster N] [--ms ADDR] [--advertise IP]\n\
     \x20                    [--cluster-size N] [--backend nft|nft-netlink|nft-command|iptables]\n\
     \x20                    [--hypervisor qemu --hv-root DIR [--accel auto|kvm|tcg]] [--catalog F]\n\
     \x20                    [--vm NAME [--netns NS] [--tap IF]\n\
     \x20                               [--freeze-pid PID [--hold-ms MS] | --lab-sleep-ms MS]]\n\
     \x20                    [--snapshot-timeout-ms MS] [--precheck-timeout-ms MS]\n\
     \x20                    [--key-file F] [--events-json]\n\
     unacloud-gs start [--config F] [--cluster N] [--ms ADDR] [--key-file F]\n\
     \x20   take a global snapshot now\n\
     unacloud-gs resume [--config F] [--cluster N] [--ms ADDR] [--key-file F] [--gs ID]\n\
     \x20   resume from global snapshot ID (7 or gs-7; default: the latest completed one)\n\
     unacloud-gs rcpbt-manager --listen ADDR --tokens T --base-port P --participants N\n\
     \x20                         [--label L] [--csv F] [--deadline-s S]\n\
     unacloud-gs rcpbt-peer --manager ADDR --ip IP [--deadline-s S]\n\
     unacloud-gs ring-netns --peers P --tokens T --snapshots K [--snapshot-delay-ms D]\n\
     \x20                      [--backend nft|nft-netlink|nft-command|iptables] [--json]   (root)\n\
     \n\
     see the documentation of unacloud_snapshot::net::cli for details"
}

/// Runs a subcommand (`args[0]`) and returns the process exit code. Errors are printed
/// on standard error as one line.
pub fn main(args: &[String]) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::error::error_chain(&e));
            ExitCode::FAILURE
        }
    }
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
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        token.cancel();
    });
    Ok(())
}

fn run(args: &[String]) -> Result<()> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(Error::InvalidConfig {
            reason: usage().to_string(),
        });
    };
    let f = Flags::parse(rest)?;
    if f.switch("--help") {
        println!("{}", usage());
        return Ok(());
    }
    match cmd.as_str() {
        "metadata-server" => {
            let mut cfg = base_config(&f)?;
            let mut section = cfg.metadata.take().unwrap_or(MetadataSection {
                listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 7000)),
                base_port: 7100,
                results_csv: None,
            });
            if let Some(l) = f.parse_opt("--listen")? {
                section.listen = l;
            }
            if let Some(p) = f.parse_opt("--base-port")? {
                section.base_port = p;
            }
            if let Some(p) = f.get("--results-csv") {
                section.results_csv = Some(PathBuf::from(p));
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
                let h = spawn_metadata_server(
                    MetadataServerConfig::new(ClusterId(cfg.cluster), section.base_port),
                    listener,
                    transport,
                    section.results_csv.clone(),
                )?;
                eprintln!("metadata server listening on {}", h.local_addr());
                token.cancelled().await;
                h.stop().await;
                Ok(())
            })
        }
        "launcher" => {
            let mut cfg = base_config(&f)?;
            let mut section = match cfg.launcher.take() {
                Some(s) => s,
                None => LauncherSection {
                    advertise: f.require("--advertise")?,
                    cluster_size: f.require("--cluster-size")?,
                    backend: Default::default(),
                    catalog: None,
                    hypervisor: None,
                    vms: Vec::new(),
                },
            };
            if let Some(a) = f.parse_opt("--advertise")? {
                section.advertise = a;
            }
            if let Some(n) = f.parse_opt("--cluster-size")? {
                section.cluster_size = n;
            }
            if let Some(b) = f.parse_opt("--backend")? {
                section.backend = b;
            }
            if let Some(backend) = f.get("--hypervisor") {
                section.hypervisor = Some(HypervisorSection {
                    backend: backend.to_string(),
                    root: f.require("--hv-root")?,
                    live: true,
                    margin_mb: f.parse_opt("--margin-mb")?.unwrap_or(64),
                    accel: f.get("--accel").map(str::to_string),
                });
            }
            if let Some(p) = f.get("--catalog") {
                section.catalog = Some(PathBuf::from(p));
            }
            if let Some(name) = f.get("--vm") {
                section.vms.push(VmConfig {
                    name: name.to_string(),
                    netns: f.get("--netns").map(str::to_string),
                    tap: f.get("--tap").map(str::to_string),
                    freeze_pid: f.parse_opt("--freeze-pid")?,
                    hold_ms: f.parse_opt("--hold-ms")?.unwrap_or(0),
                    lab_sleep_ms: f.parse_opt("--lab-sleep-ms")?,
                    ..VmConfig::default()
                });
            }
            cfg.launcher = Some(section);
            let opts = LauncherOptions {
                crash_after_step: f.parse_opt("--crash-after-step")?,
                registration_timeout: f
                    .parse_opt::<u64>("--registration-timeout-ms")?
                    .map(Duration::from_millis),
            };
            let json = f.switch("--events-json");
            runtime(1)?.block_on(async move {
                let token = CancellationToken::new();
                cancel_on_signals(token.clone())?;
                run_launcher(&cfg, opts, token, move |ev| {
                    if json {
                        if let Ok(line) = serde_json::to_string(&ev) {
                            let mut out = std::io::stdout().lock();
                            let _ = writeln!(out, "{line}");
                            let _ = out.flush();
                        }
                    } else {
                        eprintln!("{ev:?}");
                    }
                })
                .await
            })
        }
        "start" => {
            let cfg = base_config(&f)?;
            let ms = metadata_server_of(&cfg)?;
            let transport = cfg.transport()?;
            runtime(1)?.block_on(trigger_global_snapshot(ms, &transport))?;
            eprintln!("global snapshot requested");
            Ok(())
        }
        "resume" => {
            f.only("resume", RESUME_FLAGS)?;
            let gs = f.get("--gs").map(parse_gs).transpose()?;
            let cfg = base_config(&f)?;
            let ms = metadata_server_of(&cfg)?;
            let transport = cfg.transport()?;
            runtime(1)?.block_on(trigger_resume(ms, &transport, gs))?;
            match gs {
                Some(gs) => eprintln!("resume from {gs} requested"),
                None => eprintln!("resume from the latest completed global snapshot requested"),
            }
            eprintln!("the coordinator's launcher reports its progress or why it refused");
            Ok(())
        }
        "rcpbt-manager" => {
            let cfg = TestManagerConfig {
                listen: f.require("--listen")?,
                tokens: f.require("--tokens")?,
                base_port: f.require("--base-port")?,
                participants: f.require("--participants")?,
                label: f.get("--label").unwrap_or("rcpbt").to_string(),
                csv: f.get("--csv").map(PathBuf::from),
                deadline: Duration::from_secs(f.parse_opt("--deadline-s")?.unwrap_or(600)),
            };
            let outcome = runtime(1)?.block_on(async move {
                let tm = TestManager::bind(cfg).await?;
                tm.run().await
            })?;
            let line = serde_json::to_string(&outcome)
                .map_err(|source| Error::MalformedPayload { source })?;
            println!("{line}");
            Ok(())
        }
        "rcpbt-peer" => {
            let cfg = PeerConfig {
                manager: f.require("--manager")?,
                ip: f.require("--ip")?,
                deadline: Duration::from_secs(f.parse_opt("--deadline-s")?.unwrap_or(600)),
            };
            runtime(1)?.block_on(run_peer(cfg)).map(|_| ())
        }
        "ring-netns" => {
            let program = std::env::current_exe().map_err(|e| Error::InvalidConfig {
                reason: format!("cannot find this program's path: {e}"),
            })?;
            let mut cfg = super::ring::RingNetnsConfig::new(
                f.require("--peers")?,
                f.require("--tokens")?,
                f.require("--snapshots")?,
                program,
                Vec::new(),
            );
            cfg.snapshot_delay =
                Duration::from_millis(f.parse_opt("--snapshot-delay-ms")?.unwrap_or(0));
            cfg.snapshot_timeout = Duration::from_secs(5).max(cfg.snapshot_delay * 4);
            cfg.deadline = Duration::from_secs(600);
            if let Some(b) = f.parse_opt("--backend")? {
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
            if f.switch("--json") {
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
        other => Err(Error::InvalidConfig {
            reason: format!("unknown subcommand {other:?}\n{}", usage()),
        }),
    }
}

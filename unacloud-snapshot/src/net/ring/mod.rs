//! The RCPBT ring across network namespaces, with global snapshots taken for real.
//!
//! [`run_ring_netns`] builds a lab of `P` namespaces joined by a bridge
//! ([`crate::netns::NetnsLab`]), starts the RCPBT test manager in the hub namespace and one
//! ring peer per namespace (separate processes), runs a metadata server in this process
//! and one launcher process per namespace (one VM each; the first is the coordinator),
//! whose participant applies real netfilter rules inside its namespace and takes its
//! "local snapshot" by freezing the ring peer with SIGSTOP/SIGCONT. It triggers `K`
//! global snapshots while the ring runs and reports tokens, times, packets the POST
//! filters dropped, and what was left behind.
//!
//! Everything is torn down on success, on error, and when the returned future is dropped
//! (Ctrl-C): child processes are killed (after SIGCONT), namespaces deleted.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::conn::TransportConfig;
use super::daemon::{trigger_global_snapshot, BackendKind};
use super::frame::ClusterKey;
use super::node::spawn_metadata_server;
use crate::colour::exec::NetnsExec;
use crate::colour::iptables::Iptables;
use crate::colour::nft::{Nft, NftOneShot};
use crate::colour::ColourBackend;
use crate::net::{Error, Result};
use crate::netns::{NetnsLab, RunDir, DIE_WITH_PARENT_ENV, HUB_ADDR};
use crate::protocol::{ClusterId, DscpConfig, MetadataServerConfig};

#[cfg(feature = "etcd")]
mod etcd;
mod report;

#[cfg(feature = "etcd")]
pub use report::EtcdLabConfig;
pub use report::{median, percentile, CrashSpec, EtcdLabReport, RingNetnsConfig, RingNetnsReport};

/// Port of the RCPBT test manager on the hub's bridge address.
const TM_PORT: u16 = 7000;
/// Base port of the ring peers (each in its own namespace).
const PEER_BASE_PORT: u16 = 7100;

/// Child processes that are killed (after SIGCONT) when dropped.
#[derive(Default)]
pub(crate) struct Procs {
    list: Vec<(String, Child)>,
}

impl Procs {
    pub(crate) fn push(&mut self, name: String, child: Child) -> Option<i32> {
        let pid = child.id().map(|p| p as i32);
        self.list.push((name, child));
        pid
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in self.list.iter_mut() {
            if let Some(pid) = child.id() {
                let pid = nix::unistd::Pid::from_raw(pid as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            }
            let _ = child.start_kill();
        }
    }
}

fn spawn_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::CommandSpawn {
        program: what.to_string(),
        source,
    }
}

/// Starts the lab's reaper (`reap`, re-executing `program`): if this process dies, even
/// by SIGKILL, the kernel tells the reaper (PR_SET_PDEATHSIG), which kills the VMs under
/// `dir`, deletes the namespaces named `prefix…` and `dir`. Dropping the returned child
/// SIGKILLs the reaper, which then does nothing: a normal end cleans up by itself.
///
/// It is spawned from async code (a runtime thread that lives as long as the lab), never
/// from a blocking-pool thread: the parent-death signal follows the spawning thread.
pub(crate) fn spawn_reaper(
    program: &Path,
    program_args: &[String],
    dir: &Path,
    prefix: &str,
) -> Result<tokio::process::Child> {
    let mut c = Command::new(program);
    c.args(program_args)
        .arg("reap")
        .arg("--dir")
        .arg(dir)
        .args(["--prefix", prefix])
        .env(DIE_WITH_PARENT_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    c.spawn().map_err(spawn_err("reaper"))
}

fn command(cfg: &RingNetnsConfig, netns: Option<&str>, sub: &str, args: &[String]) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&cfg.program);
            c
        }
        None => Command::new(&cfg.program),
    };
    c.args(&cfg.program_args).arg(sub).args(args);
    // If this process is SIGKILLed, what it started gets SIGTERM from the kernel.
    c.env(DIE_WITH_PARENT_ENV, std::process::id().to_string());
    c.stdin(Stdio::null()).kill_on_drop(true);
    c
}

fn stderr_file(dir: &Path, name: &str) -> Result<Stdio> {
    let p = dir.join(format!("{name}.log"));
    std::fs::File::create(&p)
        .map(Stdio::from)
        .map_err(|source| Error::ResultsIo { path: p, source })
}

fn log_tail(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn free_base_port(n: u32) -> Result<u16> {
    for _ in 0..50 {
        let base: u16 = 20_000 + (rand::random::<u16>() % 30_000);
        let ok = (0..n)
            .all(|i| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, base + i as u16)).is_ok());
        if ok {
            return Ok(base);
        }
    }
    Err(Error::InvalidConfig {
        reason: format!("found no {n} free consecutive loopback ports"),
    })
}

/// Our objects in a namespace, for both rule languages.
fn leftovers_in(ns: &str) -> usize {
    let exec: Arc<dyn crate::colour::exec::CommandExecutor> = Arc::new(NetnsExec::new(ns));
    let mut n = 0;
    let mut nft = Nft::new(NftOneShot::new(exec.clone()), DscpConfig::default());
    n += nft.leftovers().unwrap_or(0);
    let mut ipt = Iptables::new(exec, DscpConfig::default());
    n += ipt.leftovers().unwrap_or(0);
    n
}

/// Our rules that colour outgoing traffic in a namespace, for both rule languages.
fn colouring_rules_in(ns: &str) -> usize {
    let exec: Arc<dyn crate::colour::exec::CommandExecutor> = Arc::new(NetnsExec::new(ns));
    let mut nft = Nft::new(NftOneShot::new(exec.clone()), DscpConfig::default());
    let mut ipt = Iptables::new(exec, DscpConfig::default());
    nft.colouring_rules().unwrap_or(0) + ipt.colouring_rules().unwrap_or(0)
}

/// Supervisor cleanup of a crashed host: reads its drop counter, removes its rules.
fn clean_crashed(ns: &str, backend: BackendKind) -> u64 {
    let exec: Arc<dyn crate::colour::exec::CommandExecutor> = Arc::new(NetnsExec::new(ns));
    let mut b: Box<dyn ColourBackend> = match backend {
        BackendKind::Iptables => Box::new(Iptables::new(exec, DscpConfig::default())),
        _ => Box::new(Nft::new(NftOneShot::new(exec), DscpConfig::default())),
    };
    let dropped = b.post_packets_dropped().unwrap_or(0);
    if let Err(e) = b.remove() {
        tracing::error!(namespace = ns, error = %e, "could not clean up after a crashed host");
    }
    dropped
}

/// Runs `f` on tokio's blocking threads (the labs' namespace and rule clean-ups).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Rcpbt {
            reason: format!("blocking task failed: {e}"),
        })
}

/// Runs the scenario. Needs root (see [`crate::netns::probe`]).
pub async fn run_ring_netns(cfg: RingNetnsConfig) -> Result<RingNetnsReport> {
    if cfg.peers < 2 || cfg.peers > 250 {
        return Err(Error::InvalidConfig {
            reason: format!("--peers {}: use 2 to 250", cfg.peers),
        });
    }
    if let Some(c) = cfg.crash {
        if c.namespace == 0 || c.namespace >= cfg.peers as usize || !(1..=6).contains(&c.after_step)
        {
            return Err(Error::InvalidConfig {
                reason: "the crashing host must be 1..peers-1 and the step 1..6".to_string(),
            });
        }
    }
    #[cfg(feature = "etcd")]
    if let Some(e) = cfg.etcd.clone() {
        if cfg.crash.is_some() {
            return Err(Error::InvalidConfig {
                reason: "crash injection runs with the embedded control plane only".to_string(),
            });
        }
        return etcd::run(cfg, e).await;
    }
    let started = Instant::now();
    let deadline = started + cfg.deadline;
    let left = || deadline.saturating_duration_since(Instant::now());
    let peers = cfg.peers as usize;
    let lab = blocking(move || NetnsLab::create(peers)).await??;
    let mut lab = scopeguard(lab);
    // Private (0700, unpredictable name); a later run removes it if this one is killed.
    let dir = RunDir::create()?;
    let _reaper = spawn_reaper(&cfg.program, &cfg.program_args, dir.path(), lab.0.prefix())?;

    // A fresh cluster key for this run: every protocol frame is authenticated.
    let key_bytes: [u8; 32] = rand::random();
    let key_hex = super::frame::hex_encode(&key_bytes);
    let key_file = dir.write_secret("cluster.key", key_hex.as_bytes())?;
    let cluster = ClusterId(u64::from(rand::random::<u32>()));
    let transport = TransportConfig::new(cluster, Some(ClusterKey::from_hex(&key_hex)?));

    let mut procs = Procs::default();
    let tm_addr = SocketAddr::from((HUB_ADDR, TM_PORT));
    let deadline_s = (cfg.deadline.as_secs() + 5).to_string();

    // 1. Ring peers (they retry until the test manager appears).
    let peer_pids = start_ring_peers(&cfg, &lab.0, dir.path(), &mut procs, tm_addr, &deadline_s)?;

    // 2. Metadata server in this process.
    let base_port = free_base_port(cfg.peers)?;
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|source| Error::Network {
            peer: "127.0.0.1:0".to_string(),
            action: "listen",
            source,
        })?;
    let ms = spawn_metadata_server(
        MetadataServerConfig::new(cluster, base_port),
        listener,
        transport.clone(),
        Some(dir.path().join("global-snapshots.csv")),
    )?;
    let ms_addr = ms.local_addr();

    // 3. Launchers, the coordinator's first.
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(usize, serde_json::Value)>();
    let mut launcher_idx = Vec::new();
    let mut readers = Vec::new();
    for (i, p) in lab.0.peers().iter().enumerate() {
        let mut args: Vec<String> = vec![
            "--cluster".into(),
            cluster.0.to_string(),
            "--ms".into(),
            ms_addr.to_string(),
            "--snapshot-timeout-ms".into(),
            cfg.snapshot_timeout.as_millis().to_string(),
            "--precheck-timeout-ms".into(),
            cfg.snapshot_timeout.as_millis().to_string(),
            "--key-file".into(),
            key_file.display().to_string(),
            "--catalog".into(),
            dir.path()
                .join(format!("catalog{i}.json"))
                .display()
                .to_string(),
            "--run-dir".into(),
            dir.path().display().to_string(),
            "--events-json".into(),
        ];
        args.extend(host_args(&cfg, i, &p.name, peer_pids[i]));
        if let Some(c) = cfg.crash {
            if c.namespace == i {
                args.push("--crash-after-step".into());
                args.push(c.after_step.to_string());
            }
        }
        let mut c = command(&cfg, None, "launcher", &args);
        c.stdout(Stdio::piped())
            .stderr(stderr_file(dir.path(), &format!("launcher{i}"))?);
        let mut child = c.spawn().map_err(spawn_err("launcher"))?;
        if let Some(out) = child.stdout.take() {
            readers.push(read_events(out, i, ev_tx.clone()));
        }
        procs.push(format!("launcher{i}"), child);
        launcher_idx.push(procs.list.len() - 1);
        if i == 0 {
            // Wait until it registered, so it gets id 0 and coordinates.
            wait_event(&mut ev_rx, Duration::from_secs(15), |_, v| {
                v["event"] == "registered"
            })
            .await
            .map_err(|e| with_log(e, dir.path(), "launcher0"))?;
        }
    }
    wait_event(&mut ev_rx, Duration::from_secs(30).min(left()), |i, v| {
        i == 0 && v["event"] == "ready"
    })
    .await
    .map_err(|e| with_log(e, dir.path(), "launcher0"))?;

    // 4. The test manager: the ring starts.
    let tm_reader = start_manager(&cfg, &lab.0, dir.path(), &mut procs, tm_addr, &deadline_s)?;

    // 5. Global snapshots while the ring runs.
    let mut report = RingNetnsReport {
        peers: cfg.peers,
        tokens_expected: cfg.tokens,
        ..RingNetnsReport::default()
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let crashed_ns = cfg.crash.map(|c| c.namespace);
    for _ in 0..cfg.snapshots {
        let mut attempt = 0;
        let triggered = loop {
            match trigger_global_snapshot(ms_addr, &transport).await {
                Ok(()) => break Ok(()),
                Err(e) if attempt < 50 && e.to_string().contains("not connected") => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = triggered {
            report.failures.push(format!("trigger: {e}"));
            break;
        }
        let wait = cfg.snapshot_timeout * 2 + Duration::from_secs(5);
        let (_, ev) = wait_event(&mut ev_rx, wait.min(left()), |i, v| {
            i == 0
                && (v["event"] == "gs_completed"
                    || v["event"] == "gs_failed"
                    || v["event"] == "trigger_refused")
        })
        .await
        .map_err(|e| with_log(e, dir.path(), "launcher0"))?;
        match ev["event"].as_str() {
            Some("gs_completed") => {
                report.record_completed(&ev);
            }
            Some("gs_failed") => {
                report.record_failed(&ev);
                // Every surviving host must stop colouring within the deadline.
                let names: Vec<String> = lab
                    .0
                    .peers()
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| Some(*i) != crashed_ns)
                    .map(|(_, p)| p.name.clone())
                    .collect();
                let until = Instant::now() + cfg.snapshot_timeout;
                let mut ok = false;
                while Instant::now() < until {
                    let names2 = names.clone();
                    let n = blocking(move || {
                        names2.iter().map(|n| colouring_rules_in(n)).sum::<usize>()
                    })
                    .await?;
                    if n == 0 {
                        ok = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                report.survivors_cleared_in_time =
                    Some(report.survivors_cleared_in_time.unwrap_or(true) && ok);
            }
            _ => {
                report.failures.push(format!(
                    "trigger refused: {}",
                    ev["reason"].as_str().unwrap_or("")
                ));
            }
        }
        tokio::time::sleep(cfg.gap).await;
    }

    // 6. The ring's own result.
    let (counted, duration) = ring_outcome(tm_reader, left(), cfg.deadline, dir.path()).await?;
    report.tokens_counted = counted;
    report.ring_duration_s = duration;

    // 7. Stop the launchers (SIGTERM: they remove their rules and report).
    terminate(&mut procs, &launcher_idx).await;
    // Collect the summaries (each reader ends when its launcher's stdout closes).
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
    }
    collect_summaries(&mut report, &mut ev_rx, &lab.0, &peer_pids, cfg.backend).await?;

    // 8. Teardown.
    drop(procs);
    ms.stop().await;
    let mut lab_inner = lab.take();
    report.namespaces_left = blocking(move || {
        let _ = lab_inner.teardown();
        lab_inner.namespaces_left().unwrap_or(usize::MAX)
    })
    .await?;
    Ok(report)
}

/// Forwards the JSON event lines a child prints, tagged with `i`.
fn read_events(
    out: tokio::process::ChildStdout,
    i: usize,
    tx: mpsc::UnboundedSender<(usize, serde_json::Value)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                if tx.send((i, v)).is_err() {
                    break;
                }
            }
        }
    })
}

/// Starts one ring peer per namespace; returns their process ids.
/// The launcher flags both control planes share: the host's address and cluster size,
/// the colouring backend, and the VM it runs (`vm<i>`, the ring peer `freeze_pid` in
/// namespace `netns`, frozen for the configured hold time).
fn host_args(cfg: &RingNetnsConfig, i: usize, netns: &str, freeze_pid: i32) -> [String; 14] {
    [
        "--advertise".into(),
        "127.0.0.1".into(),
        "--cluster-size".into(),
        cfg.peers.to_string(),
        "--backend".into(),
        cfg.backend.name().into(),
        "--vm".into(),
        format!("vm{i}"),
        "--netns".into(),
        netns.to_owned(),
        "--freeze-pid".into(),
        freeze_pid.to_string(),
        "--hold-ms".into(),
        cfg.snapshot_delay.as_millis().to_string(),
    ]
}

fn start_ring_peers(
    cfg: &RingNetnsConfig,
    lab: &NetnsLab,
    dir: &Path,
    procs: &mut Procs,
    tm_addr: SocketAddr,
    deadline_s: &str,
) -> Result<Vec<i32>> {
    let mut peer_pids = Vec::with_capacity(lab.peers().len());
    for (i, p) in lab.peers().iter().enumerate() {
        let mut c = command(
            cfg,
            Some(&p.name),
            "rcpbt-peer",
            &[
                "--manager".into(),
                tm_addr.to_string(),
                "--ip".into(),
                p.addr.to_string(),
                "--deadline-s".into(),
                deadline_s.to_string(),
            ],
        );
        c.stdout(Stdio::null())
            .stderr(stderr_file(dir, &format!("peer{i}"))?);
        let child = c.spawn().map_err(spawn_err("ip netns exec (ring peer)"))?;
        let pid = procs
            .push(format!("peer{i}"), child)
            .ok_or_else(|| Error::Rcpbt {
                reason: "a ring peer exited at once".to_string(),
            })?;
        peer_pids.push(pid);
    }
    Ok(peer_pids)
}

/// Starts the RCPBT test manager in the hub namespace (the ring starts); the task
/// returns its last output line (the outcome, JSON).
fn start_manager(
    cfg: &RingNetnsConfig,
    lab: &NetnsLab,
    dir: &Path,
    procs: &mut Procs,
    tm_addr: SocketAddr,
    deadline_s: &str,
) -> Result<tokio::task::JoinHandle<String>> {
    let mut tm = command(
        cfg,
        Some(lab.hub()),
        "rcpbt-manager",
        &[
            "--listen".into(),
            tm_addr.to_string(),
            "--tokens".into(),
            cfg.tokens.to_string(),
            "--base-port".into(),
            PEER_BASE_PORT.to_string(),
            "--participants".into(),
            cfg.peers.to_string(),
            "--label".into(),
            format!("ring_netns-{}peers", cfg.peers),
            "--csv".into(),
            dir.join("rcpbt.csv").display().to_string(),
            "--deadline-s".into(),
            deadline_s.to_string(),
        ],
    );
    tm.stdout(Stdio::piped())
        .stderr(stderr_file(dir, "manager")?);
    let mut tm_child = tm
        .spawn()
        .map_err(spawn_err("ip netns exec (test manager)"))?;
    let tm_out = tm_child.stdout.take();
    let tm_reader = tokio::spawn(async move {
        let mut s = String::new();
        if let Some(out) = tm_out {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                s = l;
            }
        }
        s
    });
    procs.push("manager".to_string(), tm_child);
    Ok(tm_reader)
}

/// Reads the test manager's outcome: (tokens counted, ring duration in s).
async fn ring_outcome(
    tm_reader: tokio::task::JoinHandle<String>,
    within: Duration,
    bound: Duration,
    dir: &Path,
) -> Result<(u64, f64)> {
    let line = tokio::time::timeout(within, tm_reader)
        .await
        .map_err(|_| Error::Timeout {
            what: "the ring to finish".to_string(),
            after: bound,
        })?
        .unwrap_or_default();
    let outcome: serde_json::Value = serde_json::from_str(&line).map_err(|_| Error::Rcpbt {
        reason: format!(
            "the test manager produced no result ({})",
            log_tail(dir, "manager")
        ),
    })?;
    Ok((
        outcome["tokens_counted"].as_u64().unwrap_or(0),
        outcome["duration_s"].as_f64().unwrap_or(0.0),
    ))
}

/// Sends SIGTERM to the children at `idx` and waits (bounded) for them to exit.
async fn terminate(procs: &mut Procs, idx: &[usize]) {
    for &i in idx {
        let (_, child) = &mut procs.list[i];
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for &i in idx {
        let (_, child) = &mut procs.list[i];
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
}

/// Adds up the launchers' summaries; cleans up after the hosts that left none (crashed
/// or killed): thaws their ring peer, reads their drop counter, removes their rules.
/// Then counts our rules left in every namespace.
async fn collect_summaries(
    report: &mut RingNetnsReport,
    ev_rx: &mut mpsc::UnboundedReceiver<(usize, serde_json::Value)>,
    lab: &NetnsLab,
    peer_pids: &[i32],
    backend: BackendKind,
) -> Result<()> {
    let peers = lab.peers().len();
    let mut summarized = vec![false; peers];
    while let Ok((i, v)) = ev_rx.try_recv() {
        if v["event"] == "summary" && i < peers {
            summarized[i] = true;
            report.post_packets_dropped += v["post_packets_dropped"].as_u64().unwrap_or(0);
        }
    }
    for (i, done) in summarized.iter().enumerate() {
        if !done {
            if let Some(pid) = peer_pids.get(i) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGCONT,
                );
            }
            let ns = lab.peers()[i].name.clone();
            report.post_packets_dropped += blocking(move || clean_crashed(&ns, backend)).await?;
        }
    }
    let names: Vec<String> = lab.peers().iter().map(|p| p.name.clone()).collect();
    report.rules_left = blocking(move || names.iter().map(|n| leftovers_in(n)).sum()).await?;
    Ok(())
}

/// Holds the lab; dropping it deletes the namespaces.
pub(crate) struct LabGuard(pub(crate) NetnsLab);

fn scopeguard(lab: NetnsLab) -> LabGuard {
    LabGuard(lab)
}

impl LabGuard {
    fn take(&mut self) -> NetnsLab {
        // Move the lab out, leaving an empty one that owns nothing.
        std::mem::replace(&mut self.0, NetnsLab::empty())
    }
}

fn with_log(e: Error, dir: &Path, name: &str) -> Error {
    let tail = log_tail(dir, name);
    if tail.is_empty() {
        e
    } else {
        Error::Rcpbt {
            reason: format!("{e} ({name} said: {tail})"),
        }
    }
}

async fn wait_event(
    rx: &mut mpsc::UnboundedReceiver<(usize, serde_json::Value)>,
    timeout: Duration,
    mut want: impl FnMut(usize, &serde_json::Value) -> bool,
) -> Result<(usize, serde_json::Value)> {
    let until = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Err(_) => {
                return Err(Error::Timeout {
                    what: "an event from the launchers".to_string(),
                    after: timeout,
                })
            }
            Ok(None) => {
                return Err(Error::Rcpbt {
                    reason: "every launcher exited".to_string(),
                })
            }
            Ok(Some((i, v))) => {
                if want(i, &v) {
                    return Ok((i, v));
                }
            }
        }
    }
}

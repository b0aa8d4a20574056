//! The `unacloud-gs` command line as an operator uses it: help for every subcommand,
//! one-line errors, the metadata server's limits and log level from the command line, the
//! catalog listing, and launchers — stopped by SIGTERM while they wait for their cluster
//! or for the metadata server (nothing left behind), refused when another launcher holds
//! their VM (its rules untouched), and a global snapshot persisted to `--catalog` and
//! listed by `unacloud-gs catalog`. The launcher tests need root and create their own
//! network namespaces; they skip with a printed reason otherwise.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use unacloud_snapshot::catalog_store::CatalogStore;
use unacloud_snapshot::colour::netlink::NftNetlink;
use unacloud_snapshot::colour::{ColourBackend, DscpConfig};
use unacloud_snapshot::net::conn::request;
use unacloud_snapshot::net::daemon::{scope_lock_path, VmConfig};
use unacloud_snapshot::net::{spawn_metadata_server, MetadataServerHandle, TransportConfig};
use unacloud_snapshot::netns::{self, NetnsLab};
use unacloud_snapshot::protocol::{
    Catalog, ClusterId, CompletedSnapshot, Envelope, GlobalSnapshotId, LocalTime, Message,
    MetadataServerConfig, ParticipantId,
};

const CLUSTER: u64 = 42;
const BIN: &str = env!("CARGO_BIN_EXE_unacloud-gs");

fn gs(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Root and network namespaces, or a printed reason to skip.
fn lab() -> Option<NetnsLab> {
    if let Err(e) = netns::probe() {
        skip::skipped(e);
        return None;
    }
    Some(NetnsLab::create(1).unwrap())
}

/// A port free right now on loopback.
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn transport() -> TransportConfig {
    TransportConfig::new(ClusterId(CLUSTER), None)
}

/// A tokio runtime running a metadata server of cluster 42 in the background.
struct Ms {
    rt: tokio::runtime::Runtime,
    handle: Option<MetadataServerHandle>,
}

impl Ms {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            spawn_metadata_server(
                MetadataServerConfig::new(ClusterId(CLUSTER), free_port()),
                listener,
                transport(),
                None,
            )
            .unwrap()
        });
        Ms {
            rt,
            handle: Some(handle),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.handle.as_ref().unwrap().local_addr()
    }

    fn ask(&self, from: ParticipantId, m: Message) -> Message {
        ask(&self.rt, self.addr(), from, m)
    }

    fn count(&self) -> u32 {
        match self.ask(ParticipantId::UNREGISTERED, Message::QueryCount) {
            Message::Count { count } => count,
            other => panic!("{other:?}"),
        }
    }
}

impl Drop for Ms {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.stop());
        }
    }
}

fn ask(rt: &tokio::runtime::Runtime, ms: SocketAddr, from: ParticipantId, m: Message) -> Message {
    let env = Envelope::new(ClusterId(CLUSTER), from, ParticipantId::METADATA_SERVER, m);
    rt.block_on(request(ms, &transport(), env, Duration::from_secs(5)))
        .unwrap()
        .message
}

/// Our rule objects in namespace `ns` (table, chains, rules, counter).
fn rules_in(ns: &str) -> usize {
    NftNetlink::open_in_netns(ns, DscpConfig::default())
        .unwrap()
        .leftovers()
        .unwrap()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A launcher process: its JSON events as they come, its standard error in a file.
struct Launcher {
    child: Child,
    events: mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
    stderr: PathBuf,
}

impl Launcher {
    /// `unacloud-gs launcher` for VM `vm` in namespace `ns` (lab local snapshots,
    /// nft-netlink colouring), with `extra` flags.
    fn spawn(dir: &Path, name: &str, ms: SocketAddr, ns: &str, extra: &[&str]) -> Self {
        let stderr = dir.join(format!("{name}.log"));
        let catalog = dir.join(format!("{name}-catalog.json"));
        let mut child = Command::new(BIN)
            .args([
                "launcher",
                "--cluster",
                &CLUSTER.to_string(),
                "--ms",
                &ms.to_string(),
                "--advertise",
                "127.0.0.1",
                "--backend",
                "nft-netlink",
                "--vm",
                "vm0",
                "--netns",
                ns,
                "--lab-sleep-ms",
                "1",
                "--catalog",
                catalog.to_str().unwrap(),
                "--run-dir",
                dir.to_str().unwrap(),
                "--events-json",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Launcher {
            child,
            events,
            seen: Vec::new(),
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the first event named `name`.
    fn wait_event(&mut self, name: &str, limit: Duration) -> serde_json::Value {
        if let Some(v) = self.seen.iter().find(|v| v["event"] == name) {
            return v.clone();
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == name {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "no {name} event within {limit:?}; events {:?}; log: {}",
                    self.seen,
                    self.log()
                ),
            }
        }
    }

    /// The remaining events, once the launcher exited.
    fn all_events(&mut self) -> Vec<serde_json::Value> {
        while let Ok(v) = self.events.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(v);
        }
        self.seen.clone()
    }

    fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    /// Waits at most `limit` for the process to exit; how long it took.
    fn wait_exit(&mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, t0.elapsed());
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "the launcher did not exit within {limit:?}; log: {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lock_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "lock"))
        .collect()
}

#[test]
fn help_documents_every_subcommand_and_flag() {
    let out = gs(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for needle in [
        "metadata",
        "metadata-server",
        "launcher",
        "trigger",
        "start",
        "resume",
        "catalog",
        "RUST_LOG",
    ] {
        assert!(help.contains(needle), "{needle}: {help}");
    }
    // The re-exec subcommands of the ring scenarios work but are not advertised.
    assert!(
        !help.contains("rcpbt") && !help.contains("ring-netns"),
        "{help}"
    );
    let out = gs(&["rcpbt-peer", "--help"]);
    assert!(out.status.success() && text(&out.stdout).contains("--manager"));

    let out = gs(&["launcher", "--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for flag in [
        "--config",
        "--cluster ",
        "--key-file",
        "--ms",
        "--advertise",
        "--cluster-size",
        "--backend",
        "--hypervisor",
        "--hv-root",
        "--accel",
        "--margin-mb",
        "--catalog",
        "--run-dir",
        "--vm",
        "--netns",
        "--tap",
        "--freeze-pid",
        "--hold-ms",
        "--lab-sleep-ms",
        "--snapshot-timeout-ms",
        "--precheck-timeout-ms",
        "--registration-timeout-ms",
        "--events-json",
        "/var/lib/unacloud/catalog-<cluster>.json",
        "0700",
        "release_missed",
        "disconnected",
    ] {
        assert!(help.contains(flag), "launcher --help lacks {flag}: {help}");
    }
    for (sub, flags) in [
        (
            "metadata-server",
            &[
                "--listen",
                "--base-port",
                "--results-csv",
                "--max-registrations",
                "--key-file",
            ][..],
        ),
        ("trigger", &["--ms", "--cluster", "--key-file", "--config"]),
        ("start", &["--ms"]),
        ("resume", &["--gs <ID>", "--ms"]),
        ("catalog", &["--catalog <FILE>", "--json", "--config"]),
    ] {
        let out = gs(&[sub, "--help"]);
        assert!(out.status.success(), "{sub}");
        let help = text(&out.stdout);
        for f in flags {
            assert!(help.contains(f), "{sub} --help lacks {f}: {help}");
        }
    }
    // Without a subcommand: the help, and a failure.
    let out = gs(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("Usage: unacloud-gs <COMMAND>"));
}

#[test]
fn bad_command_lines_fail_in_one_line() {
    for (args, needle) in [
        (&["launcher", "--netns", "x"][..], "--vm <NAME>"),
        (
            &["launcher", "--backend", "pf"],
            "unknown colouring backend \"pf\"",
        ),
        (
            &[
                "launcher",
                "--vm",
                "a",
                "--freeze-pid",
                "1",
                "--lab-sleep-ms",
                "2",
            ],
            "cannot be used with",
        ),
        (
            &["metadata", "--max-registrations", "0"],
            "--max-registrations",
        ),
        (&["catalog", "--bogus"], "unexpected argument '--bogus'"),
        (&["frobnicate"], "unrecognized subcommand 'frobnicate'"),
    ] {
        let out = gs(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains(needle) && err.contains("--help"),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    // Errors after parsing: one line too, exit 1.
    let out = gs(&["launcher", "--vm", "a", "--lab-sleep-ms", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("--advertise IP is required"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn catalog_lists_the_completed_global_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("catalog-42.json");
    let mut c = Catalog::new(ClusterId(CLUSTER));
    c.last_started = Some(GlobalSnapshotId(3));
    for (gs, ms) in [(1u64, 3_060u64), (3, 2_500)] {
        c.completed.insert(
            GlobalSnapshotId(gs),
            CompletedSnapshot {
                gs: GlobalSnapshotId(gs),
                participants: vec![ParticipantId(0), ParticipantId(1), ParticipantId(2)],
                local_times: (0..3)
                    .map(|p| LocalTime {
                        participant: ParticipantId(p),
                        local_time: Duration::from_millis(1_900 + 100 * p as u64),
                    })
                    .collect(),
                global_time: Duration::from_millis(ms),
            },
        );
    }
    CatalogStore::new(&file).save(&c).unwrap();
    let f = file.to_str().unwrap();

    let out = gs(&["catalog", "--catalog", f]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].contains("2 completed global snapshots"), "{table}");
    assert!(lines[0].contains("last started gs-3"), "{table}");
    for h in ["GS", "PARTICIPANTS", "GLOBAL TIME", "LOCAL TIMES"] {
        assert!(lines[1].contains(h), "{table}");
    }
    assert!(
        lines[2].starts_with("gs-1")
            && lines[2].contains("0,1,2")
            && lines[2].contains("3.060 s")
            && lines[2].contains("0: 1.900 s, 1: 2.000 s, 2: 2.100 s"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("gs-3") && lines[3].contains("2.500 s"),
        "{table}"
    );

    let out = gs(&["catalog", "--catalog", f, "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cluster"], CLUSTER);
    assert_eq!(v["last_started"], 3);
    let ids: Vec<u64> = v["completed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["gs"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 3]);
    assert_eq!(
        v["completed"][0]["participants"],
        serde_json::json!([0, 1, 2])
    );
    assert_eq!(v["completed"][0]["global_time_us"], 3_060_000);
    assert_eq!(
        v["completed"][1]["local_times"][2]["local_time_us"],
        2_100_000
    );

    // The launcher's catalog from a configuration file.
    let cfg = dir.path().join("gs.toml");
    std::fs::write(
        &cfg,
        format!(
            "cluster = 42\n[launcher]\nadvertise = \"127.0.0.1\"\ncluster_size = 3\ncatalog = {:?}\n",
            f
        ),
    )
    .unwrap();
    let out = gs(&["catalog", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("gs-3"));

    // No such file: a clear one-line error.
    let missing = dir.path().join("none.json");
    let out = gs(&["catalog", "--catalog", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("there is no catalog file") && err.contains("none.json"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// Standard error of a running process, line by line.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Starts `unacloud-gs metadata` on a free port with `extra` flags and `RUST_LOG`; returns
/// the process, its address and its standard error so far.
fn metadata_cli(
    extra: &[&str],
    rust_log: &str,
) -> (Child, SocketAddr, Vec<String>, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["metadata", "--cluster", "42", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = stderr_lines(&mut child);
    let mut lines = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("the metadata server did not start: {lines:?}"));
        lines.push(line.clone());
        if let Some(a) = line.strip_prefix("metadata server listening on ") {
            break a.trim().parse().unwrap();
        }
    };
    (child, addr, lines, rx)
}

fn stop(child: &mut Child, rx: &mpsc::Receiver<String>, lines: &mut Vec<String>) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "did not stop");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) {
        lines.push(l);
    }
}

#[test]
fn the_metadata_server_takes_its_limit_and_log_level_from_the_command_line() {
    let (mut child, addr, mut lines, rx) = metadata_cli(&["--max-registrations", "2"], "info");
    // Its log: tracing at info, on standard error.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("INFO") && l.contains("max_registrations=2")),
        "{lines:?}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let insert = |vm: &str| {
        ask(
            &rt,
            addr,
            ParticipantId::UNREGISTERED,
            Message::Insert {
                addr: "10.0.0.1".into(),
                vms: vec![vm.into()],
            },
        )
    };
    assert!(matches!(insert("a"), Message::Inserted { .. }));
    assert!(matches!(insert("b"), Message::Inserted { .. }));
    match insert("c") {
        Message::Refused { reason } => assert!(
            reason.contains("2 registrations") && reason.contains("--max-registrations"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    // Registered, but no coordinator connected: `trigger` (and its alias `start`) fail
    // with the metadata server's reason, in one line.
    for sub in ["trigger", "start"] {
        let out = gs(&[sub, "--cluster", "42", "--ms", &addr.to_string()]);
        assert_eq!(out.status.code(), Some(1), "{sub}");
        let err = text(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains("coordinator is not connected"),
            "{sub}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{sub}: {err}");
    }
    stop(&mut child, &rx, &mut lines);
    assert!(
        lines.iter().any(|l| l == "metadata server stopped"),
        "{lines:?}"
    );

    // RUST_LOG=warn silences the info lines (the operator's own lines stay).
    let (mut child, _, mut lines, rx) = metadata_cli(&[], "warn");
    stop(&mut child, &rx, &mut lines);
    assert!(!lines.iter().any(|l| l.contains("INFO")), "{lines:?}");
    assert!(
        lines.iter().any(|l| l == "metadata server stopped"),
        "{lines:?}"
    );
}

/// A launcher of a cluster of 2 whose other VM never comes waits as coordinator for the
/// cluster to register; SIGTERM stops it at once, rules removed, exit 0 with a summary.
#[test]
fn a_launcher_waiting_for_its_cluster_stops_on_sigterm_and_leaves_no_rules() {
    let Some(lab) = lab() else { return };
    let ns = lab.peers()[0].name.clone();
    let dir = tempfile::tempdir().unwrap();
    let ms = Ms::start();
    let mut l = Launcher::spawn(dir.path(), "l0", ms.addr(), &ns, &["--cluster-size", "2"]);
    let reg = l.wait_event("registered", Duration::from_secs(20));
    assert_eq!(reg["id"], 0, "{reg}");
    assert!(rules_in(&ns) > 0, "no rules were installed");
    assert_eq!(lock_files(dir.path()).len(), 1);
    // Still waiting (it will for the default 60 s).
    std::thread::sleep(Duration::from_millis(300));
    assert!(l.child.try_wait().unwrap().is_none(), "{}", l.log());
    l.sigterm();
    let (status, took) = l.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {}", l.log());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let events = l.all_events();
    let interrupted = events
        .iter()
        .find(|v| v["event"] == "interrupted")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(interrupted["phase"], "waiting for the cluster to register");
    let summary = events
        .iter()
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(summary["vm"], "vm0");
    assert_eq!(summary["id"], 0);
    assert_eq!(summary["leftovers"], 0);
    assert_eq!(rules_in(&ns), 0, "rules left in {ns}");
    assert!(lock_files(dir.path()).is_empty(), "lock file left");
    let log = l.log();
    assert!(
        log.contains(
            "launcher stopped while waiting for the cluster to register: 1 VM, every packet-colouring rule removed"
        ),
        "{log}"
    );
    assert!(log.contains("SIGTERM"), "{log}");
}

/// A metadata server that accepts connections and never answers: the launcher's INSERT
/// hangs, and SIGTERM stops it anyway, well before the request's own timeout.
#[test]
fn a_launcher_registering_with_a_silent_metadata_server_stops_on_sigterm() {
    let Some(lab) = lab() else { return };
    let ns = lab.peers()[0].name.clone();
    let dir = tempfile::tempdir().unwrap();
    let silent = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            match c {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
        }
    });
    let mut l = Launcher::spawn(dir.path(), "l0", addr, &ns, &["--cluster-size", "1"]);
    wait_until("the launcher's rules", Duration::from_secs(20), || {
        rules_in(&ns) > 0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(l.child.try_wait().unwrap().is_none(), "{}", l.log());
    l.sigterm();
    let (status, took) = l.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {}", l.log());
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let events = l.all_events();
    let phase = events
        .iter()
        .find(|v| v["event"] == "interrupted")
        .map(|v| v["phase"].clone())
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(phase, "registering");
    let summary = events
        .iter()
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert!(summary["id"].is_null(), "{summary}");
    assert_eq!(summary["leftovers"], 0);
    assert_eq!(rules_in(&ns), 0, "rules left in {ns}");
}

/// A second launcher for the same VM on the same host fails at once, naming the lock
/// file and the running launcher, and the running launcher's rules stay.
#[test]
fn a_second_launcher_for_the_same_vm_is_refused_and_leaves_the_first_alone() {
    let Some(lab) = lab() else { return };
    let ns = lab.peers()[0].name.clone();
    let dir = tempfile::tempdir().unwrap();
    let ms = Ms::start();
    let mut first = Launcher::spawn(
        dir.path(),
        "first",
        ms.addr(),
        &ns,
        &["--cluster-size", "2"],
    );
    first.wait_event("registered", Duration::from_secs(20));
    let rules = rules_in(&ns);
    assert!(rules > 0);

    let lock = scope_lock_path(
        dir.path(),
        &VmConfig {
            name: "vm0".into(),
            netns: Some(ns.clone()),
            ..VmConfig::default()
        },
    );
    assert!(lock.exists(), "{}", lock.display());
    let mut second = Launcher::spawn(
        dir.path(),
        "second",
        ms.addr(),
        &ns,
        &["--cluster-size", "2"],
    );
    let (status, _) = second.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    let err = second.log();
    assert!(
        err.contains(&lock.display().to_string())
            && err.contains(&format!("pid {}", first.child.id()))
            && err.contains("already run by another launcher"),
        "{err}"
    );
    assert!(
        err.lines().filter(|l| l.starts_with("error: ")).count() == 1,
        "{err}"
    );
    assert!(
        second.all_events().is_empty(),
        "the second launcher did something"
    );
    // The first one runs on, its rules intact, its registration the only one.
    assert!(first.child.try_wait().unwrap().is_none(), "{}", first.log());
    assert_eq!(rules_in(&ns), rules);
    assert_eq!(ms.count(), 1);
    assert!(lock.exists());

    first.sigterm();
    let (status, _) = first.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{}", first.log());
    assert_eq!(rules_in(&ns), 0);
    assert!(!lock.exists());
}

/// The whole operator's cycle on one host: a launcher, `unacloud-gs trigger`, the global
/// snapshot persisted to the launcher's `--catalog`, listed by `unacloud-gs catalog`.
#[test]
fn a_global_snapshot_triggered_from_the_command_line_is_listed_in_the_catalog() {
    let Some(lab) = lab() else { return };
    let ns = lab.peers()[0].name.clone();
    let dir = tempfile::tempdir().unwrap();
    let ms = Ms::start();
    let mut l = Launcher::spawn(dir.path(), "l0", ms.addr(), &ns, &["--cluster-size", "1"]);
    l.wait_event("ready", Duration::from_secs(20));
    let addr = ms.addr().to_string();
    let mut forwarded = false;
    for _ in 0..250 {
        let out = gs(&["trigger", "--cluster", "42", "--ms", &addr]);
        if out.status.success() {
            assert!(text(&out.stderr).contains("global snapshot requested"));
            forwarded = true;
            break;
        }
        // Until the coordinator's connection to the metadata server is up.
        assert!(
            text(&out.stderr).contains("not connected"),
            "{}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(forwarded, "the trigger was never forwarded");
    let done = l.wait_event("gs_completed", Duration::from_secs(30));
    assert_eq!(done["gs"], 1, "{done}");
    l.sigterm();
    let (status, _) = l.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{}", l.log());
    assert_eq!(rules_in(&ns), 0);

    let catalog = dir.path().join("l0-catalog.json");
    let out = gs(&["catalog", "--catalog", catalog.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["completed"][0]["gs"], 1, "{v}");
    assert_eq!(v["completed"][0]["participants"], serde_json::json!([0]));
    assert_eq!(v["last_started"], 1);
}

//! The clean-room participant (`interop/participant.py`) against the shipped daemons as
//! separate processes, as another project would run it: `unacloud-gs metadata`, a
//! coordinator's `unacloud-gs launcher` (in a network namespace of its own, lab local
//! snapshots), `unacloud-gs trigger`, `resume` and `catalog`, with a cluster key. Root
//! only (the launcher installs packet-colouring rules); skipped otherwise.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use unacloud_snapshot::colour::netlink::NftNetlink;
use unacloud_snapshot::colour::ColourBackend;
use unacloud_snapshot::netns::{self, NetnsLab};
use unacloud_snapshot::protocol::DscpConfig;

const BIN: &str = env!("CARGO_BIN_EXE_unacloud-gs");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process whose JSON stdout lines are collected; killed when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    events: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Self {
            name,
            child,
            events,
            seen: Vec::new(),
            log,
        }
    }

    /// The first event named `event` matching `pred` (bounded wait).
    fn wait(&mut self, event: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| v["event"] == event && pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == event && pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "{} reported no {event}: {:?}\nits log:\n{}",
                    self.name,
                    self.seen,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            }
        }
    }

    /// SIGTERM, then the exit status (bounded).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{} did not exit within 20 s of SIGTERM; its log:\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gs(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// An operator's `unacloud-gs trigger` or `resume`, which must succeed.
fn operator(command: &str, key: &str, ms: &str) {
    let out = gs(&[command, "--cluster", "42", "--key-file", key, "--ms", ms]);
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_python_participant_works_with_the_shipped_daemons() {
    if let Err(e) = netns::probe() {
        skip::skipped(e);
        return;
    }
    let lab = NetnsLab::create(1).unwrap();
    let ns = lab.peers()[0].name.clone();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    std::fs::write(&key, "c3".repeat(32) + "\n").unwrap();
    let key = key.to_str().unwrap().to_string();
    let catalog = dir.path().join("catalog.json");
    let ms_addr = format!("127.0.0.1:{}", free_port());
    let base = free_port().to_string();
    let common = ["--cluster", "42", "--key-file", &key];

    let mut ms = Command::new(BIN);
    ms.arg("metadata")
        .args(common)
        .args(["--listen", &ms_addr, "--base-port", &base]);
    let _ms = Proc::spawn("metadata", ms, dir.path());
    let mut launcher = Command::new(BIN);
    launcher
        .arg("launcher")
        .args(common)
        .args(["--ms", &ms_addr, "--advertise", "127.0.0.1"])
        .args(["--cluster-size", "2", "--backend", "nft-netlink"])
        .args(["--vm", "vm0", "--netns", &ns, "--lab-sleep-ms", "5"])
        .args(["--catalog", catalog.to_str().unwrap()])
        .args(["--run-dir", dir.path().to_str().unwrap(), "--events-json"]);
    // The metadata server must listen before the launcher registers.
    let t0 = Instant::now();
    while std::net::TcpStream::connect(&ms_addr).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no metadata server");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut coord = Proc::spawn("launcher", launcher, dir.path());
    coord.wait("registered", |v| v["id"] == 0);
    let mut py = Command::new("python3");
    py.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/participant.py"))
        .args(["--ms", &ms_addr, "--cluster", "42", "--key-file", &key])
        .args(["--vm", "py-vm", "--snapshot-ms", "20", "--deadline-s", "60"]);
    let mut py = Proc::spawn("participant.py", py, dir.path());
    py.wait("registered", |v| v["id"] == 1);
    coord.wait("ready", |_| true);

    // A global snapshot through the metadata server, as an operator triggers it.
    operator("trigger", &key, &ms_addr);
    let done = coord.wait("gs_completed", |_| true);
    assert_eq!(done["gs"], 1);
    let local: Vec<u64> = done["local_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(local.len(), 2, "{done}");
    assert!(
        local[1] >= 20_000,
        "the Python participant's local time: {done}"
    );
    py.wait("released", |v| v["gs"] == 1);
    let listed = gs(&["catalog", "--catalog", catalog.to_str().unwrap(), "--json"]);
    assert!(listed.status.success());
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("\"gs\":1")
            || String::from_utf8_lossy(&listed.stdout).contains("\"gs\": 1"),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );

    // A resume: a lab host cannot restore, so it fails at RESTORE, and RESUME_ABORT tells
    // the Python participant; nobody gets START.
    operator("resume", &key, &ms_addr);
    coord.wait("resume_failed", |_| true);
    py.wait("resume_aborted", |v| v["gs"] == 1);
    assert!(!py.seen.iter().any(|v| v["event"] == "started"));

    // Both stop cleanly on SIGTERM; no rule is left in the launcher's namespace.
    assert!(py.terminate().success());
    assert!(coord.terminate().success());
    let left = NftNetlink::open_in_netns(&ns, DscpConfig::default())
        .unwrap()
        .leftovers()
        .unwrap();
    assert_eq!(left, 0, "rules left in {ns}");
    let errors: Vec<&Value> = py
        .seen
        .iter()
        .filter(|v| v["event"] == "error" || v["event"] == "rejected")
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

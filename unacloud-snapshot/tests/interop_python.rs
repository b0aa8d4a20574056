//! The clean-room check of `PROTOCOL.md`: `interop/participant.py`, a participant written
//! from the specification alone in Python (standard library only), takes part in global
//! snapshots, failures and resumes run by the Rust coordinator and metadata server, next
//! to a Rust participant, keyed and unkeyed. Its own tests (`interop/test_vectors.py`)
//! check it against the byte-level test vectors.
#![cfg(feature = "hypervisor")]
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;
use unacloud_snapshot::net::conn::request;
use unacloud_snapshot::net::daemon::{trigger_global_snapshot, trigger_resume};
use unacloud_snapshot::net::{
    spawn_coordinator, spawn_metadata_server, spawn_participant, ClusterKey, LocalSnapshot,
    MetadataServerHandle, NodeEvent, NodeHandle, TransportConfig, VmHost,
};
use unacloud_snapshot::protocol::{
    ClusterId, CoordinatorConfig, Envelope, GlobalSnapshotId, Message, MetadataServerConfig,
    ParticipantConfig, ParticipantId, ProtocolEvent,
};

mod net_support;
use net_support::Recorder;

const CLUSTER: ClusterId = ClusterId(42);

fn interop() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

fn transport(key: Option<ClusterKey>) -> TransportConfig {
    let mut t = TransportConfig::new(CLUSTER, key);
    t.backoff_min = Duration::from_millis(5);
    t.backoff_max = Duration::from_millis(50);
    t
}

/// A host whose VM `name` runs in the in-memory hypervisor: live local snapshots that a
/// resume can restore.
async fn host(name: &str) -> Arc<VmHost> {
    use unacloud_core::hypervisor::{Hypervisor, StartMode};
    use unacloud_core::memory::InMemoryHypervisor;
    use unacloud_core::model::{HardwareProfile, VmId, VmSpec};
    let hv = Arc::new(InMemoryHypervisor::new());
    hv.create_vm(&VmSpec::new(name, HardwareProfile::Small).with_memory_mb(64))
        .await
        .unwrap();
    hv.start_vm(&VmId::from(name), StartMode::Headless)
        .await
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    Arc::new(
        VmHost::new(
            name,
            Box::new(Recorder::new(&log)),
            LocalSnapshot::Hypervisor {
                hv,
                live: true,
                margin: 1 << 20,
            },
        )
        .unwrap(),
    )
}

/// The Python participant as a child process; its JSON event lines are collected.
struct Py {
    child: tokio::process::Child,
    events: Arc<Mutex<Vec<Value>>>,
    log: PathBuf,
}

impl Py {
    /// Starts it; its log (standard error) goes to `log`, shown when a wait fails.
    fn spawn(ms: SocketAddr, key_file: Option<&Path>, extra: &[&str], log: PathBuf) -> Self {
        let mut cmd = tokio::process::Command::new("python3");
        cmd.arg(interop().join("participant.py"))
            .args(["--ms", &ms.to_string(), "--cluster", "42", "--vm", "py-vm"])
            .args(["--snapshot-ms", "20", "--deadline-s", "60"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true);
        if let Some(k) = key_file {
            cmd.arg("--key-file").arg(k);
        }
        let mut child = cmd.spawn().expect("python3 runs");
        let events = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let ev = events.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => ev.lock().unwrap().push(v),
                    Err(_) => eprintln!("participant.py: {line}"),
                }
            }
        });
        Self { child, events, log }
    }

    /// Waits (bounded) for an event named `name` matching `pred`.
    async fn wait(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..1000 {
            if let Some(v) = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find(|v| v["event"] == name && pred(v))
            {
                return v.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "participant.py never reported {name}; it reported {:?}; its log:\n{}",
            self.events.lock().unwrap(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .expect("participant.py exits on SIGTERM")
            .unwrap();
        assert!(status.success(), "participant.py exited with {status}");
    }
}

/// Metadata server, Python participant (id 1), Rust participant (id 2), coordinator (0).
struct Lab {
    ms: MetadataServerHandle,
    coord: NodeHandle,
    rust: NodeHandle,
    py: Py,
    key: Option<ClusterKey>,
    _dir: tempfile::TempDir,
}

impl Lab {
    async fn new(keyed: bool, py_flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = keyed.then(|| ClusterKey::from_hex(&"5a".repeat(32)).unwrap());
        let key_file = dir.path().join("cluster.key");
        std::fs::write(&key_file, "5a".repeat(32) + "\n").unwrap();
        // The coordinator's port is its registration's: base port + 0.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let ms = spawn_metadata_server(
            MetadataServerConfig::new(CLUSTER, port),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            transport(key.clone()),
            None,
        )
        .unwrap();
        let insert = |vm: &str| {
            Envelope::new(
                CLUSTER,
                ParticipantId::UNREGISTERED,
                ParticipantId::METADATA_SERVER,
                Message::Insert {
                    addr: "127.0.0.1".into(),
                    vms: vec![vm.into()],
                },
            )
        };
        let t = transport(key.clone());
        request(ms.local_addr(), &t, insert("vm0"), Duration::from_secs(5))
            .await
            .unwrap();
        let py = Py::spawn(
            ms.local_addr(),
            keyed.then_some(key_file.as_path()),
            py_flags,
            dir.path().join("participant.log"),
        );
        let reg = py.wait("registered", |_| true).await;
        assert_eq!(reg["id"], 1, "{reg}");
        request(ms.local_addr(), &t, insert("vm2"), Duration::from_secs(5))
            .await
            .unwrap();
        let mut cc = CoordinatorConfig::new(
            CLUSTER,
            vec![ParticipantId(1), ParticipantId(2)],
            vec!["vm0".into()],
        );
        cc.report_to_metadata_server = true;
        let coord = spawn_coordinator(
            cc,
            None,
            listener,
            Some(ms.local_addr()),
            transport(key.clone()),
            host("vm0").await,
        )
        .await
        .unwrap();
        let rust = spawn_participant(
            ParticipantConfig::new(CLUSTER, ParticipantId(2), vec!["vm2".into()]),
            SocketAddr::from(([127, 0, 0, 1], port)),
            transport(key.clone()),
            host("vm2").await,
        )
        .unwrap();
        let lab = Self {
            ms,
            coord,
            rust,
            py,
            key,
            _dir: dir,
        };
        for _ in 0..500 {
            if lab.coord.connected() == [ParticipantId(1), ParticipantId(2)] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(lab.coord.connected(), [ParticipantId(1), ParticipantId(2)]);
        lab.py.wait("connected", |_| true).await;
        lab
    }

    /// Triggers through the metadata server, as an operator does (retrying while the
    /// coordinator's own connection to it comes up).
    async fn trigger(&self, resume: bool) {
        let t = transport(self.key.clone());
        for _ in 0..100 {
            let r = if resume {
                trigger_resume(self.ms.local_addr(), &t, None).await
            } else {
                trigger_global_snapshot(self.ms.local_addr(), &t).await
            };
            match r {
                Ok(()) => return,
                Err(e) if e.to_string().contains("not connected") => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("the trigger was never forwarded");
    }

    async fn outcome(&mut self) -> ProtocolEvent {
        loop {
            let Ok(e) =
                tokio::time::timeout(Duration::from_secs(10), self.coord.events.recv()).await
            else {
                panic!(
                    "no outcome within 10 s; participant.py's log:\n{}",
                    std::fs::read_to_string(&self.py.log).unwrap_or_default()
                );
            };
            let e = e.unwrap();
            if let NodeEvent::Protocol(
                e @ (ProtocolEvent::GlobalSnapshotCompleted { .. }
                | ProtocolEvent::GlobalSnapshotFailed { .. }
                | ProtocolEvent::ResumeCompleted { .. }
                | ProtocolEvent::ResumeFailed { .. }
                | ProtocolEvent::TriggerRefused { .. }),
            ) = e
            {
                return e;
            }
        }
    }

    async fn stop(self) {
        self.py.stop().await;
        self.coord.stop().await;
        self.rust.stop().await;
        self.ms.stop().await;
    }
}

async fn snapshots_failures_and_a_resume(keyed: bool) {
    let mut lab = Lab::new(keyed, &["--fail-snapshot", "2"]).await;
    // gs-1 completes with the Python participant's DONE and its local time.
    lab.trigger(false).await;
    match lab.outcome().await {
        ProtocolEvent::GlobalSnapshotCompleted {
            gs, local_times, ..
        } => {
            assert_eq!(gs, GlobalSnapshotId(1));
            let py = local_times
                .iter()
                .find(|l| l.participant == ParticipantId(1))
                .unwrap();
            assert!(py.local_time >= Duration::from_millis(20), "{py:?}");
        }
        other => panic!("{other:?}"),
    }
    lab.py.wait("done", |v| v["gs"] == 1).await;
    lab.py.wait("released", |v| v["gs"] == 1).await;
    // gs-2: its local snapshot fails; the coordinator names it and aborts everybody.
    lab.trigger(false).await;
    match lab.outcome().await {
        ProtocolEvent::GlobalSnapshotFailed { gs, who, .. } => {
            assert_eq!(gs, GlobalSnapshotId(2));
            assert_eq!(who, vec![ParticipantId(1)]);
        }
        other => panic!("{other:?}"),
    }
    lab.py.wait("snapshot_failed", |v| v["gs"] == 2).await;
    // The next one completes again (a host still removing gs-2's rules answers "busy"
    // to a PRECHECK that comes too soon, which fails that attempt: retry, bounded).
    let mut done = None;
    for _ in 0..5 {
        lab.trigger(false).await;
        match lab.outcome().await {
            ProtocolEvent::GlobalSnapshotCompleted { gs, .. } => {
                done = Some(gs);
                break;
            }
            ProtocolEvent::GlobalSnapshotFailed { why, .. } if why.to_string().contains("busy") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The coordinator's own host may still be removing gs-2's rules.
            ProtocolEvent::TriggerRefused { reason } if reason.contains("refused") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    let last = done.expect("a global snapshot completed after the failed one");
    lab.py.wait("released", |v| v["gs"] == last.0).await;
    // A resume from the latest completed one: POLL, RESTORE, START reach Python too.
    lab.trigger(true).await;
    assert!(matches!(
        lab.outcome().await,
        ProtocolEvent::ResumeCompleted { gs } if gs == last
    ));
    lab.py.wait("restored", |v| v["gs"] == last.0).await;
    lab.py.wait("started", |v| v["gs"] == last.0).await;
    let errors: Vec<Value> = lab
        .py
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|v| v["event"] == "error" || v["event"] == "rejected")
        .cloned()
        .collect();
    assert!(
        errors.is_empty(),
        "participant.py refused something: {errors:?}"
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_participant_interoperates_unkeyed() {
    snapshots_failures_and_a_resume(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_participant_interoperates_keyed() {
    snapshots_failures_and_a_resume(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_in_python_aborts_the_resume_everywhere() {
    let mut lab = Lab::new(true, &["--fail-restore"]).await;
    lab.trigger(false).await;
    assert!(matches!(
        lab.outcome().await,
        ProtocolEvent::GlobalSnapshotCompleted { .. }
    ));
    lab.trigger(true).await;
    match lab.outcome().await {
        ProtocolEvent::ResumeFailed { who, .. } => assert_eq!(who, vec![ParticipantId(1)]),
        other => panic!("{other:?}"),
    }
    lab.py.wait("restore_failed", |_| true).await;
    lab.py.wait("resume_aborted", |v| v["gs"] == 1).await;
    lab.stop().await;
}

/// Its own unit tests against the test vectors run as part of this suite.
#[test]
fn the_python_participant_passes_the_test_vectors() {
    let out = std::process::Command::new("python3")
        .args(["-m", "unittest", "discover", "-s"])
        .arg(interop())
        .args(["-p", "test_*.py"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

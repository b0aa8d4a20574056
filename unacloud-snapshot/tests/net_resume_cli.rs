//! The resume protocol started from the command line: TRIGGER_RESUME through the metadata
//! server to the coordinator over real TCP on loopback (`trigger_resume` and
//! `unacloud-gs resume`), with the hosts' VMs in the in-memory hypervisor: a global
//! snapshot, a power cut, and every VM running again from the snapshot; refusals (nothing
//! restorable, a global snapshot that does not exist, no coordinator) with clear reasons;
//! and a resume whose RESTORE fails at one host leaves the others restored but stopped
//! until the operator retries.
#![cfg(feature = "hypervisor")]
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use unacloud_core::hypervisor::{Hypervisor, StartMode};
use unacloud_core::memory::InMemoryHypervisor;
use unacloud_core::model::{HardwareProfile, PowerState, VmId, VmSpec};
use unacloud_snapshot::net::conn::request;
use unacloud_snapshot::net::daemon::{trigger_global_snapshot, trigger_resume};
use unacloud_snapshot::net::Error;
use unacloud_snapshot::net::{
    spawn_coordinator, spawn_metadata_server, spawn_participant, LocalSnapshot,
    MetadataServerHandle, NodeEvent, NodeHandle, TransportConfig, VmHost,
};
use unacloud_snapshot::protocol::{
    ClusterId, CoordinatorConfig, Envelope, GlobalSnapshotId, Message, MetadataServerConfig,
    ParticipantConfig, ParticipantId, ProtocolEvent,
};

const CLUSTER: u64 = 42;
const WAIT: Duration = Duration::from_secs(20);

mod net_support;
use net_support::Recorder;

fn transport() -> TransportConfig {
    let mut t = TransportConfig::new(ClusterId(CLUSTER), None);
    t.backoff_min = Duration::from_millis(5);
    t.backoff_max = Duration::from_millis(50);
    t
}

async fn metadata_server() -> MetadataServerHandle {
    spawn_metadata_server(
        MetadataServerConfig::new(ClusterId(CLUSTER), 1),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        transport(),
        None,
    )
    .unwrap()
}

/// Registers VM `vm` at the metadata server as a launcher does; returns its id.
async fn register(ms: SocketAddr, vm: &str) -> ParticipantId {
    let env = Envelope::new(
        ClusterId(CLUSTER),
        ParticipantId::UNREGISTERED,
        ParticipantId::METADATA_SERVER,
        Message::Insert {
            addr: "127.0.0.1".into(),
            vms: vec![vm.to_string()],
        },
    );
    match request(ms, &transport(), env, Duration::from_secs(5))
        .await
        .unwrap()
        .message
    {
        Message::Inserted { id, .. } => id,
        other => panic!("INSERT answered {other:?}"),
    }
}

/// A metadata server, a coordinator (host 0) and two participants (hosts 1 and 2), each
/// host with one running VM `vm<i>` in its own in-memory hypervisor.
struct Cluster {
    ms: MetadataServerHandle,
    coord: NodeHandle,
    parts: Vec<NodeHandle>,
    hvs: Vec<Arc<InMemoryHypervisor>>,
}

impl Cluster {
    async fn start() -> Self {
        let ms = metadata_server().await;
        let mut hvs = Vec::new();
        let mut hosts = Vec::new();
        for i in 0..3u32 {
            let name = format!("vm{i}");
            assert_eq!(register(ms.local_addr(), &name).await, ParticipantId(i));
            let mem = Arc::new(InMemoryHypervisor::new());
            mem.create_vm(&VmSpec::new(&name, HardwareProfile::Small).with_memory_mb(64))
                .await
                .unwrap();
            mem.start_vm(&VmId::from(name.as_str()), StartMode::Headless)
                .await
                .unwrap();
            let hv: Arc<dyn Hypervisor> = mem.clone();
            hosts.push(Arc::new(
                VmHost::new(
                    &name,
                    Box::new(Recorder::default()),
                    LocalSnapshot::Hypervisor {
                        hv,
                        live: true,
                        margin: 1 << 20,
                    },
                )
                .unwrap(),
            ));
            hvs.push(mem);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cc = CoordinatorConfig::new(
            ClusterId(CLUSTER),
            vec![ParticipantId(1), ParticipantId(2)],
            vec!["vm0".into()],
        );
        cc.report_to_metadata_server = true;
        cc.timeouts.poll_interval = Duration::from_millis(50);
        let coord = spawn_coordinator(
            cc,
            None,
            listener,
            Some(ms.local_addr()),
            transport(),
            hosts[0].clone(),
        )
        .await
        .unwrap();
        let mut parts = Vec::new();
        for i in 1..3u32 {
            parts.push(
                spawn_participant(
                    ParticipantConfig::new(
                        ClusterId(CLUSTER),
                        ParticipantId(i),
                        vec![format!("vm{i}")],
                    ),
                    addr,
                    transport(),
                    hosts[i as usize].clone(),
                )
                .unwrap(),
            );
        }
        for _ in 0..500 {
            if coord.connected().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(coord.connected().len(), 2, "participants did not connect");
        Cluster {
            ms,
            coord,
            parts,
            hvs,
        }
    }

    fn ms(&self) -> SocketAddr {
        self.ms.local_addr()
    }

    async fn state(&self, i: usize) -> PowerState {
        self.hvs[i]
            .vm_info(&VmId::from(format!("vm{i}").as_str()))
            .await
            .unwrap()
            .state
    }

    async fn states(&self) -> Vec<PowerState> {
        let mut s = Vec::new();
        for i in 0..self.hvs.len() {
            s.push(self.state(i).await);
        }
        s
    }

    /// The power cut: host 0's VM is powered off, the others' QEMU died (`Aborted`).
    async fn power_cut(&self) {
        self.hvs[0].power_off(&VmId::from("vm0")).await.unwrap();
        for i in 1..self.hvs.len() {
            self.hvs[i]
                .force_state(&VmId::from(format!("vm{i}").as_str()), PowerState::Aborted)
                .unwrap();
        }
        assert!(self.states().await.iter().all(|s| !s.is_running()));
    }

    /// Takes one global snapshot through the metadata server and returns its id.
    async fn global_snapshot(&mut self) -> GlobalSnapshotId {
        trigger_global_snapshot(self.ms(), &transport())
            .await
            .unwrap();
        wait_for(&mut self.coord, "the global snapshot", |e| match e {
            ProtocolEvent::GlobalSnapshotCompleted { gs, .. } => Some(Ok(*gs)),
            ProtocolEvent::GlobalSnapshotFailed { why, .. } => Some(Err(why.to_string())),
            _ => None,
        })
        .await
        .unwrap()
    }

    async fn stop(self) {
        for p in self.parts {
            p.stop().await;
        }
        self.coord.stop().await;
        self.ms.stop().await;
    }
}

/// Waits for the first protocol event of `node` that `f` picks, skipping the others.
async fn wait_for<T>(
    node: &mut NodeHandle,
    what: &str,
    mut f: impl FnMut(&ProtocolEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, node.events.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap_or_else(|| panic!("the node stopped while waiting for {what}"));
        if let NodeEvent::Protocol(e) = ev {
            if let Some(t) = f(&e) {
                return t;
            }
        }
    }
}

/// The reason of the coordinator's next refused trigger (failing on a resume that
/// started instead).
async fn refusal(coord: &mut NodeHandle) -> String {
    wait_for(coord, "a refused trigger", |e| match e {
        ProtocolEvent::TriggerRefused { reason } => Some(reason.clone()),
        ProtocolEvent::ResumeStarted { gs, .. } => panic!("a resume from {gs} started"),
        _ => None,
    })
    .await
}

/// Participant events seen so far, without waiting.
fn drain(node: &mut NodeHandle) -> Vec<ProtocolEvent> {
    let mut v = Vec::new();
    while let Ok(e) = node.events.try_recv() {
        if let NodeEvent::Protocol(p) = e {
            v.push(p);
        }
    }
    v
}

/// The `unacloud-gs` binary with `args`, run to completion.
async fn cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_unacloud-gs"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_triggered_through_the_metadata_server_restarts_every_vm() {
    let mut c = Cluster::start().await;
    // Nothing completed yet: the coordinator refuses, saying so. (Retried until the
    // coordinator's connection to the metadata server is up: until then the metadata
    // server itself refuses.)
    let mut forwarded = false;
    for _ in 0..500 {
        if trigger_resume(c.ms(), &transport(), None).await.is_ok() {
            forwarded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(forwarded, "the metadata server never forwarded the trigger");
    let why = refusal(&mut c.coord).await;
    assert!(
        why.contains("cannot resume") && why.contains("no completed global snapshot"),
        "{why}"
    );

    let gs = c.global_snapshot().await;
    assert_eq!(gs, GlobalSnapshotId(1));
    assert!(c.states().await.iter().all(PowerState::is_running));

    // A global snapshot that does not exist is refused, naming it and the restorable
    // ones; nothing is touched.
    trigger_resume(c.ms(), &transport(), Some(GlobalSnapshotId(99)))
        .await
        .unwrap();
    let why = refusal(&mut c.coord).await;
    assert!(
        why.contains("cannot resume from gs-99")
            && why.contains("not a completed global snapshot")
            && why.contains("gs-1"),
        "{why}"
    );
    // The same through the command line (`--gs gs-99`).
    let ms = c.ms().to_string();
    let out = cli(&["resume", "--ms", &ms, "--cluster", "42", "--gs", "gs-99"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("resume from gs-99 requested"),
        "{}",
        stderr(&out)
    );
    let why = refusal(&mut c.coord).await;
    assert!(why.contains("cannot resume from gs-99"), "{why}");
    assert!(c.states().await.iter().all(PowerState::is_running));

    // Power cut, then resume from the latest completed global snapshot.
    c.power_cut().await;
    trigger_resume(c.ms(), &transport(), None).await.unwrap();
    let (started, attempt) = wait_for(&mut c.coord, "the resume to start", |e| match e {
        ProtocolEvent::ResumeStarted { gs, attempt } => Some((*gs, *attempt)),
        ProtocolEvent::TriggerRefused { reason } => panic!("resume refused: {reason}"),
        _ => None,
    })
    .await;
    assert_eq!(started, gs);
    assert_eq!(attempt.0, 1);
    let done = wait_for(&mut c.coord, "the resume", |e| match e {
        ProtocolEvent::ResumeCompleted { gs } => Some(Ok(*gs)),
        ProtocolEvent::ResumeFailed { who, why, .. } => Some(Err(format!("{who:?}: {why}"))),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(done, gs);
    assert_eq!(c.states().await, vec![PowerState::Running; 3]);
    for p in &mut c.parts {
        let resumed = wait_for(p, "the participant's resume", |e| match e {
            ProtocolEvent::Resumed { gs } => Some(*gs),
            _ => None,
        })
        .await;
        assert_eq!(resumed, gs);
    }
    // Each VM runs its local snapshot of gs-1.
    for (i, hv) in c.hvs.iter().enumerate() {
        let tree = hv
            .snapshot_tree(&VmId::from(format!("vm{i}").as_str()))
            .await
            .unwrap();
        let node = tree.resolve("gs-1").unwrap();
        assert_eq!(tree.current(), Some(node), "vm{i} is not on gs-1");
    }
    c.stop().await;
}

/// START is sent only when every RESTORE_OK arrived: when one host cannot restore, the
/// hosts that restored stay stopped (restored, not started), and the operator's retry
/// resumes everybody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_leaves_nobody_started_and_a_retry_resumes() {
    let mut c = Cluster::start().await;
    let mut ok = false;
    for _ in 0..500 {
        if trigger_global_snapshot(c.ms(), &transport()).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok);
    let gs = wait_for(&mut c.coord, "the global snapshot", |e| match e {
        ProtocolEvent::GlobalSnapshotCompleted { gs, .. } => Some(*gs),
        ProtocolEvent::GlobalSnapshotFailed { why, .. } => panic!("{why}"),
        _ => None,
    })
    .await;
    c.power_cut().await;
    // Host 2's hypervisor fails its next restore.
    c.hvs[2].fail_on("restore_snapshot", 0);
    trigger_resume(c.ms(), &transport(), Some(gs))
        .await
        .unwrap();
    let (who, why) = wait_for(&mut c.coord, "the resume to fail", |e| match e {
        ProtocolEvent::ResumeFailed { who, why, .. } => Some((who.clone(), why.to_string())),
        ProtocolEvent::ResumeCompleted { .. } => panic!("the resume completed"),
        ProtocolEvent::TriggerRefused { reason } => panic!("resume refused: {reason}"),
        _ => None,
    })
    .await;
    assert_eq!(who, vec![ParticipantId(2)], "{why}");
    // Host 1 restored (Saved: the snapshot's memory is loaded) and stays stopped; host 2
    // was never restored. The coordinator's own host restores concurrently with the
    // participants, so host 2's failure may come before or after it did: restored
    // (Saved) or untouched (still PoweredOff), but never started.
    for _ in 0..500 {
        if c.state(1).await == PowerState::Saved {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let states = c.states().await;
    assert!(
        matches!(states[0], PowerState::Saved | PowerState::PoweredOff),
        "{states:?}"
    );
    assert_eq!(states[1..], [PowerState::Saved, PowerState::Aborted]);
    for p in &mut c.parts {
        assert!(
            !drain(p)
                .iter()
                .any(|e| matches!(e, ProtocolEvent::Resumed { .. })),
            "a participant started after a failed restore"
        );
    }
    // The operator retries: a new attempt restores and starts everybody.
    trigger_resume(c.ms(), &transport(), None).await.unwrap();
    let attempt = wait_for(&mut c.coord, "the retry to start", |e| match e {
        ProtocolEvent::ResumeStarted { attempt, .. } => Some(*attempt),
        ProtocolEvent::TriggerRefused { reason } => panic!("retry refused: {reason}"),
        _ => None,
    })
    .await;
    assert_eq!(attempt.0, 2);
    let done = wait_for(&mut c.coord, "the retried resume", |e| match e {
        ProtocolEvent::ResumeCompleted { gs } => Some(Ok(*gs)),
        ProtocolEvent::ResumeFailed { who, why, .. } => Some(Err(format!("{who:?}: {why}"))),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(done, gs);
    assert_eq!(c.states().await, vec![PowerState::Running; 3]);
    c.stop().await;
}

#[tokio::test]
async fn without_a_coordinator_the_metadata_server_refuses_a_resume() {
    // Nobody registered.
    let ms = metadata_server().await;
    match trigger_resume(ms.local_addr(), &transport(), None).await {
        Err(Error::PeerRejected { reason, .. }) => {
            assert!(reason.contains("no participant registered"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Registered, but no coordinator connected to the metadata server.
    register(ms.local_addr(), "vm0").await;
    for gs in [None, Some(GlobalSnapshotId(1))] {
        match trigger_resume(ms.local_addr(), &transport(), gs).await {
            Err(Error::PeerRejected { reason, .. }) => {
                assert!(reason.contains("coordinator is not connected"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
    // The command line says so and fails.
    let addr = ms.local_addr().to_string();
    let out = cli(&["resume", "--ms", &addr, "--cluster", "42"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("coordinator is not connected"),
        "{}",
        stderr(&out)
    );
    ms.stop().await;
}

#[tokio::test]
async fn resume_on_the_command_line_explains_its_flags() {
    let out = cli(&["resume", "--help"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Usage: unacloud-gs resume [OPTIONS]")
            && ["--config", "--cluster", "--ms", "--key-file", "--gs <ID>"]
                .iter()
                .all(|f| help.contains(f)),
        "{help}"
    );
    for (args, needle) in [
        (
            &["resume", "--bogus", "1"][..],
            "unexpected argument '--bogus'",
        ),
        (
            &["resume", "--gs", "latest"],
            "\"latest\" is not a global snapshot id",
        ),
        (&["resume", "--gs"], "a value is required for '--gs <ID>'"),
        (&["resume", "7"], "unexpected argument '7'"),
        (&["resume", "--gs", "7"], "no metadata server address"),
        (
            &["resume", "--ms", "nowhere", "--gs", "7"],
            "invalid value 'nowhere' for '--ms <ADDR>'",
        ),
    ] {
        let out = cli(args).await;
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(
            err.starts_with("error: ") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}

/// TRIGGER_RESUME on the wire: `gs` is optional, and PROTOCOL.md documents it.
#[test]
fn trigger_resume_on_the_wire_and_in_protocol_md() {
    let m = Message::TriggerResume {
        gs: Some(GlobalSnapshotId(7)),
    };
    assert_eq!(
        serde_json::to_string(&m).unwrap(),
        r#"{"type":"trigger_resume","gs":7}"#
    );
    assert_eq!(m.kind(), "TRIGGER_RESUME");
    assert!(m.is_trigger() && m.gs().is_none());
    let latest = Message::TriggerResume { gs: None };
    assert_eq!(
        serde_json::to_string(&latest).unwrap(),
        r#"{"type":"trigger_resume"}"#
    );
    for text in [
        r#"{"type":"trigger_resume"}"#,
        r#"{"type":"trigger_resume","gs":null}"#,
    ] {
        assert_eq!(serde_json::from_str::<Message>(text).unwrap(), latest);
    }
    let md = include_str!("../PROTOCOL.md");
    let row = md
        .lines()
        .find(|l| l.starts_with("| `trigger_resume` |"))
        .expect("no table row for `trigger_resume` in PROTOCOL.md");
    assert!(row.contains("`gs`"), "{row}");
    assert!(md.contains("TRIGGER_RESUME"));
}

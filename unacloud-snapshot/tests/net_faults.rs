//! Faults over real TCP: a coordinator and two participants on loopback, each host
//! driving one VM of its own in-memory hypervisor (`LocalSnapshot::Hypervisor`, live), with
//! a recording colour backend. Local snapshots that fail, phase-1 refusals, a coordinator
//! that dies mid-snapshot, resumes with a silent participant or a failed restore, and a
//! guest held at its snapshot point that must never stay paused.
//!
//! Every protocol timeout is a few hundred milliseconds and every wait is bounded, so each
//! test runs in a few seconds (the one that waits for `POINT_HOLD_LIMIT` in about 5).
#![cfg(feature = "hypervisor")]
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use unacloud_core::hypervisor::{Hypervisor, StartMode};
use unacloud_core::memory::InMemoryHypervisor;
use unacloud_core::model::{DiskSpace, HardwareProfile, PowerState, VmId, VmSpec};
use unacloud_snapshot::net::conn::{Client, Inbound};
use unacloud_snapshot::net::host::POINT_HOLD_LIMIT;
use unacloud_snapshot::net::{
    spawn_coordinator, spawn_participant, HostActions, HostSummary, LocalSnapshot, NodeEvent,
    NodeHandle, TransportConfig, VmHost,
};
use unacloud_snapshot::protocol::{
    ActionOutcome, ClusterId, CoordinatorConfig, FailureReason, GlobalSnapshotId, HostAction,
    Message, ParticipantConfig, ParticipantId, ProtocolEvent, Timeouts,
};
use unacloud_snapshot::{net::Error, protocol};

mod net_support;
use net_support::{Log, Recorder};

/// The outgoing colour a recorded backend is left with (`remove` clears everything).
fn outgoing_colour(log: &Log) -> Option<String> {
    let mut colour = None;
    for e in log.lock().unwrap().iter() {
        if let Some(c) = e.strip_prefix("colour Some(") {
            colour = Some(c.trim_end_matches(')').to_string());
        } else if e == "colour None" || e == "remove" {
            colour = None;
        }
    }
    colour
}

/// Whether every rule was removed (`remove`, i.e. ClearAll or shutdown) after the last
/// time the backend coloured anything.
fn removed_after_last_colour(log: &Log) -> bool {
    let l = log.lock().unwrap();
    let last_colour = l.iter().rposition(|e| e.starts_with("colour Some("));
    let last_remove = l.iter().rposition(|e| e == "remove");
    match (last_colour, last_remove) {
        (Some(c), Some(r)) => r > c,
        (None, _) => true,
        (Some(_), None) => false,
    }
}

/// Wraps a host and reports the outcome of one kind of action only `delay` after it
/// completed: slow durability, seen from the protocol.
#[derive(Debug)]
struct SlowReport {
    inner: Arc<VmHost>,
    kind: &'static str,
    delay: Duration,
}

impl HostActions for SlowReport {
    fn perform(&self, action: HostAction) -> BoxFuture<'static, ActionOutcome> {
        let slow = action.kind() == self.kind;
        let delay = self.delay;
        let fut = self.inner.perform(action);
        Box::pin(async move {
            let out = fut.await;
            if slow {
                tokio::time::sleep(delay).await;
            }
            out
        })
    }
    fn shutdown(&self) -> BoxFuture<'static, HostSummary> {
        self.inner.shutdown()
    }
}

/// One emulated PC: its own hypervisor with one running VM, and its colour log.
struct Pc {
    name: String,
    vm: VmId,
    hv: Arc<InMemoryHypervisor>,
    log: Log,
}

impl Pc {
    async fn new(i: usize) -> Pc {
        let hv = Arc::new(InMemoryHypervisor::new());
        let name = format!("vm{i}");
        let spec = VmSpec::new(&name, HardwareProfile::Small).with_memory_mb(128);
        hv.create_vm(&spec).await.unwrap();
        let vm = VmId::from(name.as_str());
        hv.start_vm(&vm, StartMode::Headless).await.unwrap();
        Pc {
            name,
            vm,
            hv,
            log: Arc::default(),
        }
    }

    /// A host for this PC's VM (named `pc<i>` in refusals), live snapshots.
    fn host(&self, hang_post: Option<Duration>) -> Arc<VmHost> {
        let hv: Arc<dyn Hypervisor> = self.hv.clone();
        Arc::new(
            VmHost::on_host(
                format!("pc{}", &self.name[2..]),
                self.name.clone(),
                Box::new(Recorder {
                    hang_post,
                    ..Recorder::new(&self.log)
                }),
                LocalSnapshot::Hypervisor {
                    hv,
                    live: true,
                    margin: 1 << 20,
                },
            )
            .unwrap(),
        )
    }

    async fn state(&self) -> PowerState {
        self.hv.vm_info(&self.vm).await.unwrap().state
    }

    /// The name of the snapshot the VM's current state descends from.
    async fn current_snapshot(&self) -> Option<String> {
        let tree = self.hv.snapshot_tree(&self.vm).await.unwrap();
        tree.current()
            .and_then(|n| tree.get(n))
            .map(|s| s.name.clone())
    }

    async fn has_snapshot(&self, name: &str) -> bool {
        let tree = self.hv.snapshot_tree(&self.vm).await.unwrap();
        tree.resolve(name).is_ok()
    }

    fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Log entries from index `from` on.
    fn log_since(&self, from: usize) -> Vec<String> {
        self.log.lock().unwrap()[from..].to_vec()
    }
}

fn transport() -> TransportConfig {
    let mut t = TransportConfig::new(ClusterId(42), None);
    t.backoff_min = Duration::from_millis(5);
    t.backoff_max = Duration::from_millis(50);
    t
}

fn timeouts() -> Timeouts {
    Timeouts {
        precheck: Duration::from_millis(800),
        snapshot: Duration::from_millis(800),
        poll_interval: Duration::from_millis(100),
        poll_give_up: None,
        resume_phase: Duration::from_millis(800),
    }
}

/// A coordinator (pc0) and two participants (pc1, pc2) on loopback.
struct Cluster {
    pcs: Vec<Pc>,
    coord: Option<NodeHandle>,
    parts: Vec<Option<NodeHandle>>,
    addr: SocketAddr,
    catalog: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// With plain hosts.
    async fn new(t: Timeouts) -> Cluster {
        Self::with_hosts(t, |_, pc| pc.host(None)).await
    }

    /// With the host of PC `i` made by `host(i, pc)`.
    async fn with_hosts(t: Timeouts, host: impl Fn(usize, &Pc) -> Arc<dyn HostActions>) -> Cluster {
        let mut pcs = Vec::new();
        for i in 0..3 {
            pcs.push(Pc::new(i).await);
        }
        let dir = tempfile::tempdir().unwrap();
        let catalog = dir.path().join("catalog.json");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cc = CoordinatorConfig::new(
            ClusterId(42),
            vec![ParticipantId(1), ParticipantId(2)],
            vec![pcs[0].name.clone()],
        );
        cc.timeouts = t;
        let coord = spawn_coordinator(
            cc,
            Some(catalog.clone()),
            listener,
            None,
            transport(),
            host(0, &pcs[0]),
        )
        .await
        .unwrap();
        let mut parts = Vec::new();
        for (i, pc) in pcs.iter().enumerate().skip(1) {
            let mut pcfg = ParticipantConfig::new(
                ClusterId(42),
                ParticipantId(i as u32),
                vec![pc.name.clone()],
            );
            pcfg.timeouts = t;
            parts.push(Some(
                spawn_participant(pcfg, addr, transport(), host(i, pc)).unwrap(),
            ));
        }
        let c = Cluster {
            pcs,
            coord: Some(coord),
            parts,
            addr,
            catalog,
            _dir: dir,
        };
        c.wait_connected(&[ParticipantId(1), ParticipantId(2)])
            .await;
        c
    }

    fn coord(&mut self) -> &mut NodeHandle {
        self.coord.as_mut().unwrap()
    }

    /// Participant `i`'s node (1 or 2).
    fn part(&mut self, i: usize) -> &mut NodeHandle {
        self.parts[i - 1].as_mut().unwrap()
    }

    async fn wait_connected(&self, ids: &[ParticipantId]) {
        let coord = self.coord.as_ref().unwrap();
        let t0 = Instant::now();
        while !ids.iter().all(|p| coord.connected().contains(p)) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "participants {ids:?} did not connect: {:?}",
                coord.connected()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts a global snapshot, retrying while the coordinator's host still cleans up
    /// after the previous one.
    async fn start_gs(&mut self) -> GlobalSnapshotId {
        let t0 = Instant::now();
        loop {
            match self.coord().start_global_snapshot().await {
                Ok(gs) => return gs,
                Err(Error::Protocol(protocol::Error::Busy { .. }))
                    if t0.elapsed() < Duration::from_secs(3) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("global snapshot not started: {e}"),
            }
        }
    }

    /// Starts a resume, retrying while the coordinator's host still cleans up after a
    /// failed global snapshot (it answers `Busy` until its ClearAll is done).
    async fn start_resume(
        &mut self,
        gs: Option<GlobalSnapshotId>,
    ) -> unacloud_snapshot::net::Result<GlobalSnapshotId> {
        let t0 = Instant::now();
        loop {
            match self.coord().start_resume(gs).await {
                Err(Error::Protocol(protocol::Error::Busy { .. }))
                    if t0.elapsed() < Duration::from_secs(3) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Takes a global snapshot that must complete.
    async fn complete_gs(&mut self) -> GlobalSnapshotId {
        let gs = self.start_gs().await;
        match outcome_of_gs(self.coord(), gs).await {
            ProtocolEvent::GlobalSnapshotCompleted { .. } => gs,
            other => panic!("{gs} did not complete: {other:?}"),
        }
    }

    /// Stops everything still running.
    async fn stop(mut self) {
        for p in self.parts.iter_mut().filter_map(Option::take) {
            p.stop().await;
        }
        if let Some(c) = self.coord.take() {
            c.stop().await;
        }
    }
}

/// The next protocol event matching `pred` within `within`; panics with the events seen
/// on the way otherwise.
async fn wait_event(
    h: &mut NodeHandle,
    within: Duration,
    what: &str,
    pred: impl Fn(&ProtocolEvent) -> bool,
) -> ProtocolEvent {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, h.events.recv()).await {
            Ok(Some(NodeEvent::Protocol(e))) if pred(&e) => return e,
            Ok(Some(NodeEvent::Protocol(e))) => seen.push(format!("{e:?}")),
            Ok(Some(_)) => {}
            Ok(None) => panic!("event channel closed waiting for {what}; seen {seen:?}"),
            Err(_) => panic!("no {what} within {within:?}; seen {seen:?}"),
        }
    }
}

/// The protocol events already queued on `h`.
fn drain(h: &mut NodeHandle) -> Vec<ProtocolEvent> {
    let mut v = Vec::new();
    while let Ok(e) = h.events.try_recv() {
        if let NodeEvent::Protocol(e) = e {
            v.push(e);
        }
    }
    v
}

/// How global snapshot `gs` ended, at the coordinator.
async fn outcome_of_gs(coord: &mut NodeHandle, gs: GlobalSnapshotId) -> ProtocolEvent {
    wait_event(
        coord,
        Duration::from_secs(5),
        "end of the global snapshot",
        |e| {
            matches!(e,
            ProtocolEvent::GlobalSnapshotCompleted { gs: g, .. }
            | ProtocolEvent::GlobalSnapshotFailed { gs: g, .. } if *g == gs)
        },
    )
    .await
}

/// How the resume of `gs` ended, at the coordinator.
async fn outcome_of_resume(coord: &mut NodeHandle, within: Duration) -> ProtocolEvent {
    wait_event(coord, within, "end of the resume", |e| {
        matches!(
            e,
            ProtocolEvent::ResumeCompleted { .. } | ProtocolEvent::ResumeFailed { .. }
        )
    })
    .await
}

/// Waits (bounded) until `pc`'s VM is in state `want`.
async fn wait_state(pc: &Pc, want: PowerState, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let s = pc.state().await;
        if s == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "{}: still {s} after {within:?}, wanted {want}",
            pc.name
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until `cond` holds.
async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The global snapshots the persisted catalog lists as completed.
fn catalog_completed(path: &std::path::Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut ids: Vec<u64> = v["completed"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.parse().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

// ---- 1. a local snapshot that fails ------------------------------------------------------

/// Injects `operation`'s failure into participant 1's hypervisor during the second global
/// snapshot and checks the whole cluster's reaction.
async fn a_failed_local_snapshot(operation: &str) {
    let mut c = Cluster::new(timeouts()).await;
    let good = c.complete_gs().await;
    let marks: Vec<usize> = c.pcs.iter().map(Pc::log_len).collect();

    c.pcs[1].hv.fail_on(operation, 0);
    let bad = c.start_gs().await;
    match outcome_of_gs(c.coord(), bad).await {
        ProtocolEvent::GlobalSnapshotFailed { who, why, .. } => {
            assert_eq!(who, vec![ParticipantId(1)], "{why}");
            let text = why.to_string();
            assert!(
                text.contains(&format!("injected failure in {operation}")),
                "{text}"
            );
            assert!(text.contains("vm1"), "the failure names the VM: {text}");
        }
        other => panic!("{bad} with a failed local snapshot: {other:?}"),
    }
    // The failing participant reports it abandoned its local snapshot; the other one was
    // aborted (or had not started yet).
    wait_event(
        c.part(1),
        Duration::from_secs(2),
        "participant 1 abandoning its local snapshot",
        |e| matches!(e, ProtocolEvent::LocalSnapshotAbandoned { gs, .. } if *gs == bad),
    )
    .await;

    // Never in the catalog, in memory or on disk; the previous one stays restorable.
    match c.start_resume(Some(bad)).await {
        Err(Error::Protocol(protocol::Error::SnapshotNotRestorable { gs, completed })) => {
            assert_eq!(gs, bad);
            assert_eq!(completed, vec![good]);
        }
        other => panic!("resuming from the failed {bad}: {other:?}"),
    }
    assert_eq!(catalog_completed(&c.catalog), vec![good.0]);
    assert!(!c.pcs[1].has_snapshot(&format!("gs-{}", bad.0)).await);

    // Every host removed its rules after colouring for the failed one, and is idle.
    for pc in &c.pcs {
        wait_until(
            &format!("{}: rules removed after {bad}", pc.name),
            Duration::from_secs(2),
            || removed_after_last_colour(&pc.log),
        )
        .await;
        let since = pc.log_since(marks[pc.name[2..].parse::<usize>().unwrap()]);
        assert!(
            since.iter().any(|e| e == "colour Some(Pre)"),
            "{}: {bad} had started colouring: {since:?}",
            pc.name
        );
        assert_eq!(outgoing_colour(&pc.log), None, "{}: {since:?}", pc.name);
    }
    // No VM left paused at its snapshot point.
    for pc in &c.pcs {
        wait_state(pc, PowerState::Running, Duration::from_secs(2)).await;
    }

    // The previous global snapshot still restores and starts everywhere.
    for pc in &c.pcs {
        pc.hv.force_state(&pc.vm, PowerState::Aborted).unwrap();
    }
    assert_eq!(c.start_resume(None).await.unwrap(), good);
    match outcome_of_resume(c.coord(), Duration::from_secs(5)).await {
        ProtocolEvent::ResumeCompleted { gs } => assert_eq!(gs, good),
        other => panic!("resume from {good}: {other:?}"),
    }
    for pc in &c.pcs {
        assert_eq!(pc.state().await, PowerState::Running, "{}", pc.name);
        assert_eq!(
            pc.current_snapshot().await.as_deref(),
            Some(format!("gs-{}", good.0).as_str())
        );
    }
    c.stop().await;
}

#[tokio::test]
async fn a_local_snapshot_that_fails_fails_the_global_snapshot_and_cleans_every_host() {
    // Fails after the point: the guest was already held and released, durability fails.
    a_failed_local_snapshot("take_snapshot").await;
}

#[tokio::test]
async fn a_local_snapshot_that_fails_before_its_point_is_reported_the_same_way() {
    // The default `take_snapshot_at_point` pauses first: failing that fails step 3 itself.
    a_failed_local_snapshot("pause").await;
}

// ---- 2. phase 1 refusals -----------------------------------------------------------------

#[tokio::test]
async fn a_host_that_is_not_ready_refuses_before_anything_is_coloured() {
    let mut c = Cluster::new(timeouts()).await;

    // (a) participant 2's VM is off; (b) participant 1's host has no room for a snapshot
    // with memory (128 MiB + 1 MiB margin against 100 MiB free); (c) the coordinator's own
    // VM is off.
    for case in ["vm off", "no room", "own vm off"] {
        let (who, needles): (ParticipantId, Vec<String>) = match case {
            "vm off" => {
                c.pcs[2].hv.power_off(&c.pcs[2].vm).await.unwrap();
                (
                    ParticipantId(2),
                    vec!["host pc2".into(), "VM vm2 is".into()],
                )
            }
            "no room" => {
                c.pcs[1].hv.set_disk_space(DiskSpace {
                    available: 100 << 20,
                    total: 1 << 30,
                });
                (
                    ParticipantId(1),
                    vec![
                        "host pc1".into(),
                        "vm1".into(),
                        "needs 135266304 bytes, has 104857600".into(),
                    ],
                )
            }
            _ => {
                c.pcs[0].hv.power_off(&c.pcs[0].vm).await.unwrap();
                (
                    ParticipantId::COORDINATOR,
                    vec!["host pc0".into(), "VM vm0 is".into()],
                )
            }
        };
        let marks: Vec<usize> = c.pcs.iter().map(Pc::log_len).collect();
        let gs = c.start_gs().await;
        match outcome_of_gs(c.coord(), gs).await {
            ProtocolEvent::GlobalSnapshotFailed { who: w, why, .. } => {
                assert_eq!(w, vec![who], "{case}: {why}");
                let text = why.to_string();
                for n in &needles {
                    assert!(text.contains(n.as_str()), "{case}: {n:?} not in {text:?}");
                }
            }
            other => panic!("{case}: {gs} was not refused: {other:?}"),
        }
        // Give any stray colouring a chance to show, then: no host changed a colour or a
        // filter, and no VM took a snapshot.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (pc, mark) in c.pcs.iter().zip(&marks) {
            let since = pc.log_since(*mark);
            assert!(
                !since
                    .iter()
                    .any(|e| e.starts_with("colour") || e == "drop false"),
                "{case}: {} coloured for a refused {gs}: {since:?}",
                pc.name
            );
            assert!(!pc.has_snapshot(&format!("gs-{}", gs.0)).await, "{case}");
        }
        assert!(
            matches!(
                c.start_resume(Some(gs)).await,
                Err(Error::Protocol(
                    protocol::Error::SnapshotNotRestorable { .. }
                ))
            ),
            "{case}"
        );
        // Put the host right again.
        match case {
            "vm off" => {
                let pc = &c.pcs[2];
                pc.hv.start_vm(&pc.vm, StartMode::Headless).await.unwrap();
            }
            "no room" => c.pcs[1].hv.set_disk_space(DiskSpace {
                available: 1 << 40,
                total: 1 << 40,
            }),
            _ => {
                let pc = &c.pcs[0];
                pc.hv.start_vm(&pc.vm, StartMode::Headless).await.unwrap();
            }
        }
    }
    // Once every host is ready again, a global snapshot completes.
    let gs = c.complete_gs().await;
    assert_eq!(catalog_completed(&c.catalog), vec![gs.0]);
    c.stop().await;
}

// ---- 3. the coordinator dies mid-snapshot ------------------------------------------------

#[tokio::test]
async fn participants_clear_by_themselves_when_the_coordinator_dies_mid_snapshot() {
    // The coordinator's own durability, and participant 2's, take 3 s (far beyond the
    // 800 ms snapshot deadline): when the coordinator dies, participant 1 holds the POST
    // colour after DONE, participant 2 still waits for durability.
    let t = timeouts();
    let mut c = Cluster::with_hosts(t, |i, pc| -> Arc<dyn HostActions> {
        match i {
            0 | 2 => Arc::new(SlowReport {
                inner: pc.host(None),
                kind: "await durability",
                delay: Duration::from_secs(3),
            }),
            _ => pc.host(None),
        }
    })
    .await;
    let started = Instant::now();
    let gs = c.start_gs().await;
    wait_event(
        c.part(1),
        Duration::from_secs(2),
        "participant 1's DONE",
        |e| matches!(e, ProtocolEvent::LocalSnapshotCompleted { gs: g, .. } if *g == gs),
    )
    .await;
    {
        let pc2 = &c.pcs[2];
        wait_until("participant 2 past step 5", Duration::from_secs(2), || {
            pc2.log.lock().unwrap().iter().any(|e| e == "drop false")
        })
        .await;
    }
    assert_eq!(outgoing_colour(&c.pcs[1].log).as_deref(), Some("Post"));
    assert_eq!(outgoing_colour(&c.pcs[2].log).as_deref(), Some("Post"));
    assert!(
        started.elapsed() < t.snapshot / 2,
        "the setup took too long to test the deadline: {:?}",
        started.elapsed()
    );

    // The coordinator vanishes: no RELEASE, no ABORT.
    c.coord.take().unwrap().stop().await;

    // Participant 1 (holding): ReleaseMissed at its deadline, then ClearAll.
    wait_event(
        c.part(1),
        t.snapshot + Duration::from_secs(1),
        "participant 1's ReleaseMissed",
        |e| matches!(e, ProtocolEvent::ReleaseMissed { gs: g } if *g == gs),
    )
    .await;
    let at = started.elapsed();
    assert!(
        at >= t.snapshot - Duration::from_millis(100) && at <= t.snapshot + Duration::from_secs(1),
        "participant 1 cleared at {at:?}, deadline {:?}",
        t.snapshot
    );
    // Participant 2 (durability outstanding): abandons it at its deadline, ClearAll.
    match wait_event(
        c.part(2),
        t.snapshot + Duration::from_secs(1),
        "participant 2 abandoning",
        |e| matches!(e, ProtocolEvent::LocalSnapshotAbandoned { gs: g, .. } if *g == gs),
    )
    .await
    {
        ProtocolEvent::LocalSnapshotAbandoned { why, .. } => assert!(
            why.contains("waiting for the local snapshots to be durable did not complete"),
            "{why}"
        ),
        other => unreachable!("{other:?}"),
    }
    for pc in &c.pcs[1..] {
        wait_until(
            &format!("{}: rules removed", pc.name),
            Duration::from_secs(1),
            || removed_after_last_colour(&pc.log),
        )
        .await;
        assert_eq!(outgoing_colour(&pc.log), None);
        // The idle drop rule is armed again afterwards.
        wait_until(
            &format!("{}: idle drop rule re-armed", pc.name),
            Duration::from_secs(1),
            || {
                let log = pc.log.lock().unwrap();
                let r = log.iter().rposition(|e| e == "remove").unwrap_or(0);
                log[r..].iter().any(|e| e == "drop true")
            },
        )
        .await;
    }
    for pc in &c.pcs {
        assert_eq!(pc.state().await, PowerState::Running, "{}", pc.name);
    }
    assert!(started.elapsed() < t.snapshot + Duration::from_secs(2));
    c.stop().await;
}

// ---- 4. a participant that never answers POLL --------------------------------------------

#[tokio::test]
async fn a_resume_with_a_silent_participant_repeats_poll_then_gives_up_without_restoring() {
    let mut t = timeouts();
    t.poll_give_up = Some(Duration::from_millis(650));
    let mut c = Cluster::new(t).await;
    let first = c.complete_gs().await;
    let latest = c.complete_gs().await;

    // Participant 2's node goes; in its place a client that connects as participant 2,
    // receives, and never answers.
    c.parts[1].take().unwrap().stop().await;
    let (in_tx, mut in_rx) = mpsc::channel::<Inbound>(1024);
    let mute_stop = CancellationToken::new();
    let _mute = Client::spawn(
        c.addr,
        ParticipantId(2),
        ParticipantId::COORDINATOR,
        Arc::new(transport()),
        in_tx,
        mute_stop.clone(),
    );
    match tokio::time::timeout(Duration::from_secs(5), in_rx.recv()).await {
        Ok(Some(Inbound::Connected { .. })) => {}
        other => panic!("the silent participant did not connect: {other:?}"),
    }
    c.wait_connected(&[ParticipantId(1), ParticipantId(2)])
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    // Power cut: the VMs are down; a resume from the first global snapshot starts.
    for pc in &c.pcs {
        pc.hv.force_state(&pc.vm, PowerState::Aborted).unwrap();
    }
    let started = Instant::now();
    assert_eq!(c.start_resume(Some(first)).await.unwrap(), first);
    match outcome_of_resume(c.coord(), Duration::from_secs(3)).await {
        ProtocolEvent::ResumeFailed { gs, who, why } => {
            assert_eq!(gs, first);
            assert_eq!(who, vec![ParticipantId(2)], "{why}");
            assert!(
                matches!(&why, FailureReason::Timeout { phase, .. } if phase == "poll"),
                "{why:?}"
            );
        }
        other => panic!("a resume with a silent participant: {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(2),
        "gave up after {took:?}"
    );
    // Never past POLL.
    let events = drain(c.coord());
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ProtocolEvent::PollCompleted { .. })),
        "{events:?}"
    );

    // POLL was repeated every poll interval to the silent one (first POLL + about six
    // repeats in 650 ms), always for the same attempt; nothing else reached it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut polls = Vec::new();
    let mut others = Vec::new();
    while let Ok(item) = in_rx.try_recv() {
        if let Inbound::Envelope { envelope, .. } = item {
            match envelope.message {
                Message::Poll { gs, attempt } => polls.push((gs, attempt)),
                m => others.push(m),
            }
        }
    }
    assert!(
        (4..=9).contains(&polls.len()),
        "{} POLL rounds reached the silent participant: {polls:?}",
        polls.len()
    );
    assert!(
        polls.iter().all(|p| *p == polls[0] && p.0 == first),
        "{polls:?}"
    );
    // After giving up, the coordinator tells everybody that the attempt is over.
    assert!(
        matches!(others.as_slice(), [Message::ResumeAbort { gs, .. }] if *gs == first),
        "the silent participant got {others:?}"
    );

    // The hosts that did answer restored and started nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for pc in &c.pcs[..2] {
        assert_eq!(pc.state().await, PowerState::Aborted, "{}", pc.name);
        assert_eq!(
            pc.current_snapshot().await,
            Some(format!("gs-{}", latest.0)),
            "{}: restored",
            pc.name
        );
    }
    let p1 = drain(c.part(1));
    assert!(
        !p1.iter()
            .any(|e| matches!(e, ProtocolEvent::Resumed { .. })),
        "{p1:?}"
    );
    mute_stop.cancel();
    c.stop().await;
}

// ---- 5. a restore that fails -------------------------------------------------------------

#[tokio::test]
async fn a_resume_whose_restore_fails_on_one_host_never_starts_any_vm() {
    let mut c = Cluster::new(timeouts()).await;
    let gs = c.complete_gs().await;
    for pc in &c.pcs {
        pc.hv.force_state(&pc.vm, PowerState::Aborted).unwrap();
    }
    c.pcs[2].hv.fail_on("restore_snapshot", 0);

    assert_eq!(c.start_resume(None).await.unwrap(), gs);
    match outcome_of_resume(c.coord(), Duration::from_secs(3)).await {
        ProtocolEvent::ResumeFailed { gs: g, who, why } => {
            assert_eq!(g, gs);
            assert_eq!(who, vec![ParticipantId(2)], "{why}");
            assert!(
                why.to_string()
                    .contains("injected failure in restore_snapshot"),
                "{why}"
            );
        }
        other => panic!("a resume with a failed restore: {other:?}"),
    }
    // The others restored (a live snapshot restores to Saved), nobody started.
    for pc in &c.pcs[..2] {
        wait_state(pc, PowerState::Saved, Duration::from_secs(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for pc in &c.pcs {
        let s = pc.state().await;
        assert_ne!(s, PowerState::Running, "{} was started", pc.name);
    }
    assert_eq!(c.pcs[0].state().await, PowerState::Saved);
    assert_eq!(c.pcs[1].state().await, PowerState::Saved);
    assert_eq!(c.pcs[2].state().await, PowerState::Aborted);
    for i in 1..=2 {
        let ev = drain(c.part(i));
        assert!(
            !ev.iter()
                .any(|e| matches!(e, ProtocolEvent::Resumed { .. })),
            "participant {i}: {ev:?}"
        );
    }

    // The fault was one-off: the next attempt restores and starts everything.
    assert_eq!(c.start_resume(None).await.unwrap(), gs);
    match outcome_of_resume(c.coord(), Duration::from_secs(3)).await {
        ProtocolEvent::ResumeCompleted { gs: g } => assert_eq!(g, gs),
        other => panic!("second attempt: {other:?}"),
    }
    for pc in &c.pcs {
        assert_eq!(pc.state().await, PowerState::Running, "{}", pc.name);
    }
    c.stop().await;
}

// ---- 6. a guest is never left paused -----------------------------------------------------

/// Step 4 never comes: the host lets the guest run on after `POINT_HOLD_LIMIT`. The
/// hypervisor's snapshot is written, but the host refuses it as durable for the protocol:
/// the guest ran past its point uncoloured.
#[tokio::test]
async fn a_guest_held_at_its_point_runs_on_after_the_hold_limit() {
    let pc = Pc::new(1).await;
    let host = pc.host(None);
    let gs = GlobalSnapshotId(3);
    let vms = vec![pc.name.clone()];
    let t0 = Instant::now();
    let out = host
        .perform(HostAction::TakeLocalSnapshots {
            gs,
            vms: vms.clone(),
        })
        .await;
    assert!(
        matches!(out, ActionOutcome::SnapshotPoint { .. }),
        "{out:?}"
    );
    assert_eq!(pc.state().await, PowerState::Paused);
    let bound = POINT_HOLD_LIMIT + Duration::from_secs(1);
    wait_state(&pc, PowerState::Running, bound).await;
    let held = t0.elapsed();
    assert!(
        held >= POINT_HOLD_LIMIT - Duration::from_millis(200),
        "released early, after {held:?}"
    );
    match host.perform(HostAction::AwaitDurable { gs, vms }).await {
        ActionOutcome::Failed(why) => assert!(
            why.contains("before its traffic was coloured POSTSNAPSHOT"),
            "{why}"
        ),
        other => panic!("a guest that ran on uncoloured: {other:?}"),
    }
    assert!(pc.has_snapshot("gs-3").await);
    assert_eq!(pc.state().await, PowerState::Running);
    let summary = host.shutdown().await;
    assert_eq!(summary.leftovers, 0);
}

/// Over the network: participant 1's step 4 hangs in the colour backend, and the
/// coordinator dies as soon as that participant's guest is paused at its point. The guest
/// runs again well within `POINT_HOLD_LIMIT` (the participant's deadline clears the host,
/// which lets the guest go), and the rules go once the backend answers again.
#[tokio::test]
async fn a_guest_is_not_left_paused_when_step_4_hangs_and_the_coordinator_dies() {
    let t = timeouts();
    let hang = Duration::from_millis(2500);
    let mut c = Cluster::with_hosts(t, |i, pc| -> Arc<dyn HostActions> {
        pc.host((i == 1).then_some(hang))
    })
    .await;
    let gs = c.start_gs().await;
    let paused = wait_state(&c.pcs[1], PowerState::Paused, Duration::from_secs(2)).await;
    let at_point = Instant::now();
    c.coord.take().unwrap().stop().await;

    let ran = wait_state(&c.pcs[1], PowerState::Running, POINT_HOLD_LIMIT).await;
    assert!(
        ran < t.snapshot + Duration::from_millis(500),
        "the guest stayed paused {ran:?} (paused after {paused:?})"
    );
    match wait_event(
        c.part(1),
        Duration::from_secs(1),
        "participant 1 abandoning",
        |e| matches!(e, ProtocolEvent::LocalSnapshotAbandoned { gs: g, .. } if *g == gs),
    )
    .await
    {
        ProtocolEvent::LocalSnapshotAbandoned { why, .. } => {
            assert!(why.contains("step 4"), "{why}")
        }
        other => unreachable!("{other:?}"),
    }
    // ClearAll waits for the wedged call; then every rule goes.
    {
        let pc1 = &c.pcs[1];
        wait_until(
            "participant 1's rules removed",
            hang + Duration::from_secs(1),
            || removed_after_last_colour(&pc1.log) && outgoing_colour(&pc1.log).is_none(),
        )
        .await;
    }
    // Participant 2 held POST after DONE and cleared at its deadline.
    wait_event(
        c.part(2),
        Duration::from_secs(2),
        "participant 2's ReleaseMissed",
        |e| matches!(e, ProtocolEvent::ReleaseMissed { gs: g } if *g == gs),
    )
    .await;
    {
        let pc2 = &c.pcs[2];
        wait_until(
            "participant 2's rules removed",
            Duration::from_secs(1),
            || removed_after_last_colour(&pc2.log),
        )
        .await;
    }
    for pc in &c.pcs {
        assert_eq!(pc.state().await, PowerState::Running, "{}", pc.name);
    }
    assert!(at_point.elapsed() < hang + Duration::from_secs(2));
    c.stop().await;
}

/// Step 4 outlasts `POINT_HOLD_LIMIT` but not the snapshot deadline: the host lets the
/// guest run on while its traffic is still coloured PRESNAPSHOT, so datagrams it sends
/// after its snapshot point leave PRE and may be received into other hosts' snapshots
/// (orphans, SPEC Eq. 5.3). That local snapshot can no longer be part of a consistent
/// global snapshot: the global snapshot must fail, not complete.
#[tokio::test]
async fn a_guest_released_by_the_hold_limit_fails_its_global_snapshot() {
    let mut t = timeouts();
    t.snapshot = POINT_HOLD_LIMIT + Duration::from_secs(3);
    let hang = POINT_HOLD_LIMIT + Duration::from_millis(600);
    let mut c = Cluster::with_hosts(t, |i, pc| -> Arc<dyn HostActions> {
        pc.host((i == 1).then_some(hang))
    })
    .await;
    let gs = c.start_gs().await;
    wait_state(&c.pcs[1], PowerState::Paused, Duration::from_secs(2)).await;
    let held = wait_state(
        &c.pcs[1],
        PowerState::Running,
        POINT_HOLD_LIMIT + Duration::from_secs(1),
    )
    .await;
    // The window: the guest runs while its host still colours PRE.
    assert_eq!(
        outgoing_colour(&c.pcs[1].log).as_deref(),
        Some("Pre"),
        "released after {held:?}"
    );
    match outcome_of_gs(c.coord(), gs).await {
        ProtocolEvent::GlobalSnapshotFailed { who, why, .. } => {
            assert_eq!(who, vec![ParticipantId(1)], "{why}");
            let text = why.to_string();
            assert!(
                text.contains("before its traffic was coloured POSTSNAPSHOT"),
                "{text}"
            );
        }
        other => panic!("{gs}, whose guest ran on before step 4, ended with {other:?}"),
    }
    assert!(catalog_completed(&c.catalog).is_empty());
    for pc in &c.pcs {
        wait_until(
            &format!("{}: rules removed", pc.name),
            Duration::from_secs(2),
            || removed_after_last_colour(&pc.log),
        )
        .await;
        assert_eq!(pc.state().await, PowerState::Running, "{}", pc.name);
    }
    c.stop().await;
}

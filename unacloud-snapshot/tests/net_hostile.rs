//! Hostile clients against the real transport on loopback (`PROTOCOL.md` §2): spoofed
//! DONE, replayed handshakes, anonymous reports and triggers, oversize registrations,
//! forged epochs, a coordinator that lost its catalog, and a thousand connections that
//! never finish their handshake. Each case states what must happen: refused with a
//! reason, connection closed (or kept), and the next global snapshot still completes.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use unacloud_snapshot::net::conn::request;
use unacloud_snapshot::net::frame::*;
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

fn key() -> ClusterKey {
    ClusterKey::new(vec![7; 32]).unwrap()
}

fn transport(key: Option<ClusterKey>) -> TransportConfig {
    let mut t = TransportConfig::new(CLUSTER, key);
    t.backoff_min = Duration::from_millis(5);
    t.backoff_max = Duration::from_millis(50);
    t
}

fn host(snapshot: Duration) -> Arc<VmHost> {
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    Arc::new(
        VmHost::new(
            "vm",
            Box::new(Recorder::new(&log)),
            LocalSnapshot::Sleep(snapshot),
        )
        .unwrap(),
    )
}

/// A raw client speaking the wire format by hand, as an attacker (or another
/// implementation) would.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    dec: FrameDecoder,
    sent: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
            dec: FrameDecoder::new(1 << 20),
            sent: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.sent.extend_from_slice(bytes);
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next frame, or `None` once the server closed (bounded wait).
    async fn frame(&mut self) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some((f, used))) = self.dec.decode(&self.buf) {
                self.buf.drain(..used);
                return Some(f);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => panic!("the server neither answered nor closed"),
            }
        }
    }

    /// Reads until the server closes; returns the REJECT reason it sent, if any.
    async fn rejection(&mut self) -> Option<String> {
        let mut reason = None;
        while let Some(f) = self.frame().await {
            if f.kind == FrameKind::Reject {
                reason = Some(reject_reason(&f.body));
            }
        }
        reason
    }

    /// Connects to `addr` and completes the handshake as `me` towards `server` (which
    /// must succeed).
    async fn open(
        addr: SocketAddr,
        key: Option<ClusterKey>,
        me: ParticipantId,
        server: ParticipantId,
    ) -> (Self, Session) {
        let mut raw = Self::connect(addr).await;
        let session = raw.handshake(key, me, server).await.unwrap();
        (raw, session)
    }

    /// A full handshake as `me` towards `server`; the session on success.
    async fn handshake(
        &mut self,
        key: Option<ClusterKey>,
        me: ParticipantId,
        server: ParticipantId,
    ) -> Result<Session, String> {
        let keyed = key.is_some();
        let hs = ClientHandshake::new(CLUSTER, key, me, server, rand_nonce());
        self.send(&hs.hello()).await;
        let Some(w) = self.frame().await else {
            return Err("closed".into());
        };
        if w.kind == FrameKind::Reject {
            return Err(reject_reason(&w.body));
        }
        let (auth, session) = hs.on_welcome(&w).map_err(|e| e.to_string())?;
        self.send(&auth).await;
        self.dec.set_keyed(keyed);
        Ok(session)
    }

    async fn envelope(&mut self, s: &mut Session, from: u32, to: ParticipantId, m: Message) {
        let env = Envelope::new(CLUSTER, ParticipantId(from), to, m);
        let bytes = s.seal(FrameKind::Data, &serde_json::to_vec(&env).unwrap());
        self.send(&bytes).await;
    }
}

fn rand_nonce() -> [u8; 32] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed) ^ u64::from(std::process::id()) << 32;
    let mut out = [0u8; 32];
    out[..8].copy_from_slice(&n.to_be_bytes());
    out
}

/// A metadata server, a coordinator (id 0) and participants 1 and 2 on loopback; the
/// second participant's local snapshot takes `slow`.
struct Lab {
    ms: MetadataServerHandle,
    coord: NodeHandle,
    parts: Vec<NodeHandle>,
    addr: SocketAddr,
    key: Option<ClusterKey>,
    _dir: tempfile::TempDir,
}

impl Lab {
    async fn new(key: Option<ClusterKey>, slow: Duration, catalog: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ms = spawn_metadata_server(
            MetadataServerConfig::new(CLUSTER, 1),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            transport(key.clone()),
            None,
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cat = catalog.then(|| dir.path().join("catalog.json"));
        let coord = Self::coordinator(listener, &ms, key.clone(), cat).await;
        let mut parts = Vec::new();
        for (i, snap) in [(1u32, Duration::from_millis(2)), (2, slow)] {
            parts.push(
                spawn_participant(
                    ParticipantConfig::new(CLUSTER, ParticipantId(i), vec![format!("vm{i}")]),
                    addr,
                    transport(key.clone()),
                    host(snap),
                )
                .unwrap(),
            );
        }
        let lab = Self {
            ms,
            coord,
            parts,
            addr,
            key,
            _dir: dir,
        };
        lab.wait_connected().await;
        lab
    }

    async fn coordinator(
        listener: TcpListener,
        ms: &MetadataServerHandle,
        key: Option<ClusterKey>,
        catalog: Option<std::path::PathBuf>,
    ) -> NodeHandle {
        let mut cc = CoordinatorConfig::new(
            CLUSTER,
            vec![ParticipantId(1), ParticipantId(2)],
            vec!["vm0".into()],
        );
        cc.report_to_metadata_server = true;
        spawn_coordinator(
            cc,
            catalog,
            listener,
            Some(ms.local_addr()),
            transport(key),
            host(Duration::from_millis(2)),
        )
        .await
        .unwrap()
    }

    /// Stops the coordinator and starts a new one on the same address, with the catalog
    /// file of the first one (`keep_catalog`) or none; waits for the participants.
    async fn restart_coordinator(self, keep_catalog: bool) -> Self {
        let Lab {
            ms,
            coord,
            parts,
            addr,
            key,
            _dir,
        } = self;
        coord.stop().await;
        let listener = TcpListener::bind(addr).await.unwrap();
        let catalog = keep_catalog.then(|| _dir.path().join("catalog.json"));
        let coord = Self::coordinator(listener, &ms, key.clone(), catalog).await;
        let lab = Lab {
            ms,
            coord,
            parts,
            addr,
            key,
            _dir,
        };
        lab.wait_connected().await;
        lab
    }

    async fn wait_connected(&self) {
        for _ in 0..500 {
            if self.coord.connected() == [ParticipantId(1), ParticipantId(2)] {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("participants did not connect: {:?}", self.coord.connected());
    }

    /// Waits for the outcome of the running global snapshot.
    async fn outcome(&mut self) -> ProtocolEvent {
        loop {
            let e = tokio::time::timeout(Duration::from_secs(10), self.coord.events.recv())
                .await
                .expect("no outcome within 10 s")
                .unwrap();
            if let NodeEvent::Protocol(
                e @ (ProtocolEvent::GlobalSnapshotCompleted { .. }
                | ProtocolEvent::GlobalSnapshotFailed { .. }),
            ) = e
            {
                return e;
            }
        }
    }

    async fn complete_one(&mut self) -> GlobalSnapshotId {
        let gs = self.coord.start_global_snapshot().await.unwrap();
        match self.outcome().await {
            ProtocolEvent::GlobalSnapshotCompleted { gs: done, .. } => {
                assert_eq!(done, gs);
                gs
            }
            other => panic!("{other:?}"),
        }
    }

    async fn stop(self) {
        self.coord.stop().await;
        for p in self.parts {
            p.stop().await;
        }
        self.ms.stop().await;
    }
}

#[tokio::test]
async fn spoofed_done_is_refused_and_never_completes_a_global_snapshot() {
    let mut lab = Lab::new(None, Duration::from_millis(800), false).await;
    let gs = lab.coord.start_global_snapshot().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // 1. An unregistered connection is not admitted by a coordinator at all.
    let mut un = Raw::connect(lab.addr).await;
    let e = un
        .handshake(
            None,
            ParticipantId::UNREGISTERED,
            ParticipantId::COORDINATOR,
        )
        .await
        .unwrap_err();
    assert!(e.contains("not a participant of this coordinator"), "{e}");

    // 2. Participant 1's identity cannot speak for participant 2: the DONE is refused
    //    and that connection closed.
    let (mut p1, mut s) =
        Raw::open(lab.addr, None, ParticipantId(1), ParticipantId::COORDINATOR).await;
    let done = Message::Done {
        gs,
        local_time: Duration::from_millis(1),
    };
    p1.envelope(&mut s, 2, ParticipantId::COORDINATOR, done)
        .await;
    let reason = p1.rejection().await.unwrap();
    assert!(
        reason.contains("speaks only for the node that opened it"),
        "{reason}"
    );

    // The global snapshot completes only with participant 2's own DONE, after its
    // 800 ms local snapshot.
    match lab.outcome().await {
        ProtocolEvent::GlobalSnapshotCompleted { local_times, .. } => {
            let t2 = local_times
                .iter()
                .find(|l| l.participant == ParticipantId(2))
                .unwrap();
            assert!(t2.local_time >= Duration::from_millis(800), "{t2:?}");
        }
        other => panic!("{other:?}"),
    }
    lab.complete_one().await;
    lab.stop().await;
}

#[tokio::test]
async fn a_keyed_coordinator_admits_nobody_without_the_key() {
    let mut lab = Lab::new(Some(key()), Duration::from_millis(300), false).await;
    let gs = lab.coord.start_global_snapshot().await.unwrap();
    // No key, or another key: the handshake fails before any envelope is read.
    let mut nokey = Raw::connect(lab.addr).await;
    let e = nokey
        .handshake(None, ParticipantId(2), ParticipantId::COORDINATOR)
        .await
        .unwrap_err();
    assert!(e.contains("requires the cluster key"), "{e}");
    let mut other = Raw::connect(lab.addr).await;
    let e = other
        .handshake(
            Some(ClusterKey::new(vec![9; 32]).unwrap()),
            ParticipantId(2),
            ParticipantId::COORDINATOR,
        )
        .await
        .unwrap_err();
    assert!(e.contains("different cluster keys"), "{e}");
    // A frame before the handshake completed is never delivered.
    let mut early = Raw::connect(lab.addr).await;
    let hs = ClientHandshake::new(CLUSTER, None, ParticipantId(2), ParticipantId(0), [3; 32]);
    early.send(&hs.hello()).await;
    let env = Envelope::new(
        CLUSTER,
        ParticipantId(2),
        ParticipantId::COORDINATOR,
        Message::Done {
            gs,
            local_time: Duration::ZERO,
        },
    );
    early
        .send(&encode_frame(
            FrameKind::Data,
            1,
            &serde_json::to_vec(&env).unwrap(),
            None,
        ))
        .await;
    let reason = early.rejection().await.unwrap_or_default();
    assert!(!reason.is_empty());
    match lab.outcome().await {
        ProtocolEvent::GlobalSnapshotCompleted { local_times, .. } => {
            let t2 = local_times
                .iter()
                .find(|l| l.participant == ParticipantId(2))
                .unwrap();
            assert!(t2.local_time >= Duration::from_millis(300), "{t2:?}");
        }
        other => panic!("{other:?}"),
    }
    lab.stop().await;
}

#[tokio::test]
async fn a_replayed_handshake_cannot_take_a_live_participant_away() {
    let mut lab = Lab::new(Some(key()), Duration::from_millis(2), false).await;
    lab.complete_one().await;
    // A legitimate-looking handshake as participant 2 is recorded…
    let (first, _session) = Raw::open(
        lab.addr,
        lab.key.clone(),
        ParticipantId(2),
        ParticipantId::COORDINATOR,
    )
    .await;
    let recorded = first.sent.clone();
    drop(first);
    // …and replayed byte for byte on fresh connections, which are then closed.
    for _ in 0..3 {
        let mut replay = Raw::connect(lab.addr).await;
        replay.send(&recorded).await;
        let reason = replay.rejection().await.unwrap();
        assert!(reason.contains("proof does not verify"), "{reason}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(lab.coord.connected(), [ParticipantId(1), ParticipantId(2)]);
    // The real participant 2 is still reachable: the next global snapshot completes.
    lab.complete_one().await;
    lab.stop().await;
}

#[tokio::test]
async fn a_short_lived_duplicate_connection_does_not_make_the_real_one_unreachable() {
    // Without a key anyone can claim an id; still, a duplicate that comes and goes must
    // not remove the live connection's route.
    let mut lab = Lab::new(None, Duration::from_millis(2), false).await;
    for _ in 0..3 {
        let mut dup = Raw::connect(lab.addr).await;
        dup.handshake(None, ParticipantId(2), ParticipantId::COORDINATOR)
            .await
            .unwrap();
        drop(dup);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lab.coord.connected(), [ParticipantId(1), ParticipantId(2)]);
    lab.complete_one().await;
    lab.stop().await;
}

#[tokio::test]
async fn anonymous_reports_and_direct_triggers_are_refused() {
    let mut lab = Lab::new(Some(key()), Duration::from_millis(2), false).await;
    let ms = lab.ms.local_addr();
    // An unregistered client cannot write snapshot times.
    let (mut anon, mut s) = Raw::open(
        ms,
        lab.key.clone(),
        ParticipantId::UNREGISTERED,
        ParticipantId::METADATA_SERVER,
    )
    .await;
    anon.envelope(
        &mut s,
        ParticipantId::UNREGISTERED.0,
        ParticipantId::METADATA_SERVER,
        Message::SnapshotReport {
            gs: GlobalSnapshotId(99),
            global_time: Duration::from_secs(1),
            local_times: vec![],
        },
    )
    .await;
    let reason = anon.rejection().await.unwrap();
    assert!(reason.contains("may not send SNAPSHOT_REPORT"), "{reason}");
    // A participant cannot trigger the coordinator directly.
    let (mut p1, mut s) = Raw::open(
        lab.addr,
        lab.key.clone(),
        ParticipantId(1),
        ParticipantId::COORDINATOR,
    )
    .await;
    p1.envelope(
        &mut s,
        1,
        ParticipantId::COORDINATOR,
        Message::TriggerGlobalSnapshot,
    )
    .await;
    let reason = p1.rejection().await.unwrap();
    assert!(
        reason.contains("may not send TRIGGER_GLOBAL_SNAPSHOT"),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(lab.ms.times().is_empty(), "nothing recorded");
    // Nothing started: the first global snapshot is still gs-1.
    assert_eq!(lab.complete_one().await, GlobalSnapshotId(1));
    lab.stop().await;
}

#[tokio::test]
async fn a_captured_trigger_exchange_does_not_replay_on_a_keyed_cluster() {
    let mut lab = Lab::new(Some(key()), Duration::from_millis(2), false).await;
    let ms = lab.ms.local_addr();
    // The coordinator registers (the metadata server forwards triggers only then) and
    // its own connection to the metadata server comes up by itself.
    let insert = Envelope::new(
        CLUSTER,
        ParticipantId::UNREGISTERED,
        ParticipantId::METADATA_SERVER,
        Message::Insert {
            addr: "127.0.0.1".into(),
            vms: vec!["vm0".into()],
        },
    );
    request(
        ms,
        &transport(lab.key.clone()),
        insert,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A real operator's trigger, recorded on the wire.
    let (mut op, mut s) = Raw::open(
        ms,
        lab.key.clone(),
        ParticipantId::UNREGISTERED,
        ParticipantId::METADATA_SERVER,
    )
    .await;
    op.envelope(
        &mut s,
        ParticipantId::UNREGISTERED.0,
        ParticipantId::METADATA_SERVER,
        Message::TriggerGlobalSnapshot,
    )
    .await;
    let reply = op.frame().await.unwrap();
    let (_, body) = s.open(reply).unwrap();
    let env = s.check_envelope(CLUSTER, &body).unwrap();
    assert_eq!(env.message, Message::TriggerForwarded);
    let recorded = op.sent.clone();
    drop(op);
    let first = lab.outcome().await;
    let forwarded = matches!(first, ProtocolEvent::GlobalSnapshotCompleted { .. });
    assert!(forwarded, "{first:?}");
    // Replayed: refused at AUTH, nothing forwarded.
    let mut replay = Raw::connect(ms).await;
    replay.send(&recorded).await;
    let reason = replay.rejection().await.unwrap();
    assert!(reason.contains("proof does not verify"), "{reason}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(e) = lab.coord.events.try_recv() {
        assert!(
            !matches!(
                e,
                NodeEvent::Protocol(ProtocolEvent::GlobalSnapshotStarted { .. })
            ),
            "the replay started a global snapshot: {e:?}"
        );
    }
    lab.stop().await;
}

#[tokio::test]
async fn oversize_registrations_are_refused_before_they_are_buffered() {
    let lab = Lab::new(None, Duration::from_millis(2), false).await;
    let ms = lab.ms.local_addr();
    // Megabytes of VM names: the frame's length alone is above the limit.
    let (mut big, mut s) = Raw::open(
        ms,
        None,
        ParticipantId::UNREGISTERED,
        ParticipantId::METADATA_SERVER,
    )
    .await;
    let insert = Message::Insert {
        addr: "127.0.0.1".into(),
        vms: (0..40_000)
            .map(|i| format!("vm-with-a-long-name-{i:08}"))
            .collect(),
    };
    big.envelope(
        &mut s,
        ParticipantId::UNREGISTERED.0,
        ParticipantId::METADATA_SERVER,
        insert,
    )
    .await;
    let reason = big.rejection().await.unwrap();
    assert!(
        reason.contains("exceeds this connection's limit"),
        "{reason}"
    );
    // A frame length announced before the handshake is bounded even more tightly.
    let mut early = Raw::connect(ms).await;
    early.send(&[0x00, 0x40, 0x00, 0x00, 1]).await;
    let reason = early.rejection().await.unwrap();
    assert!(reason.contains("limit of 1024 bytes"), "{reason}");
    // The server still serves everybody else.
    let env = Envelope::new(
        CLUSTER,
        ParticipantId::UNREGISTERED,
        ParticipantId::METADATA_SERVER,
        Message::QueryCount,
    );
    let reply = request(ms, &transport(None), env, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(reply.message, Message::Count { .. }), "{reply:?}");
    lab.stop().await;
}

/// A coordinator that speaks the wire format by hand, for participants under attack.
async fn fake_coordinator_round(
    listener: &TcpListener,
    messages: &[Message],
) -> (Vec<Message>, Option<String>) {
    let (stream, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut raw = Raw {
        stream,
        buf: Vec::new(),
        dec: FrameDecoder::new(MAX_HANDSHAKE_LEN),
        sent: Vec::new(),
    };
    let hello = raw.frame().await.unwrap();
    let (pending, welcome) =
        ServerHandshake::new(CLUSTER, None, ParticipantId::COORDINATOR, [5; 32])
            .on_hello(&hello, |_| Ok(()))
            .unwrap();
    raw.send(&welcome).await;
    let auth = raw.frame().await.unwrap();
    let mut s = pending.on_auth(&auth).unwrap();
    raw.dec.set_max_len(1 << 20);
    for m in messages {
        raw.envelope(&mut s, 0, ParticipantId(1), m.clone()).await;
    }
    let mut answers = Vec::new();
    let mut rejected = None;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(f)) = tokio::time::timeout_at(deadline, raw.frame()).await {
        if f.kind == FrameKind::Reject {
            rejected = Some(reject_reason(&f.body));
            break;
        }
        if let Ok((FrameKind::Data, body)) = s.open(f) {
            answers.push(s.check_envelope(CLUSTER, &body).unwrap().message);
        }
    }
    (answers, rejected)
}

#[tokio::test]
async fn an_epoch_beyond_2_pow_53_is_refused_and_does_not_deafen_the_participant() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let part = spawn_participant(
        ParticipantConfig::new(CLUSTER, ParticipantId(1), vec!["vm1".into()]),
        listener.local_addr().unwrap(),
        transport(None),
        host(Duration::from_millis(1)),
    )
    .unwrap();
    let (answers, rejected) = fake_coordinator_round(
        &listener,
        &[Message::Precheck {
            gs: GlobalSnapshotId(u64::MAX),
        }],
    )
    .await;
    assert!(answers.is_empty(), "{answers:?}");
    assert!(rejected.unwrap().contains("above the largest"));
    // The participant reconnects and still answers ordinary epochs.
    let (answers, _) = fake_coordinator_round(
        &listener,
        &[Message::Precheck {
            gs: GlobalSnapshotId(5),
        }],
    )
    .await;
    assert!(
        answers.contains(&Message::PrecheckOk {
            gs: GlobalSnapshotId(5)
        }),
        "{answers:?}"
    );
    // A request older than what it has seen is answered STALE with its epochs.
    let (answers, _) = fake_coordinator_round(
        &listener,
        &[Message::Precheck {
            gs: GlobalSnapshotId(2),
        }],
    )
    .await;
    assert!(
        answers
            .iter()
            .any(|m| matches!(m, Message::Stale { gs, newest_gs, .. }
            if *gs == GlobalSnapshotId(2) && *newest_gs == GlobalSnapshotId(5))),
        "{answers:?}"
    );
    part.stop().await;
}

/// A coordinator restarted without its catalog after `before` completed global
/// snapshots: its first attempt (gs-1 again) fails with STALE — also when gs-1 is exactly
/// the participants' newest epoch, where answering it as a duplicate would record their
/// old local snapshots as a new global snapshot — and the next one continues after it.
async fn lost_catalog(before: u64) {
    let mut lab = Lab::new(None, Duration::from_millis(2), false).await;
    for _ in 0..before {
        lab.complete_one().await;
    }
    // The coordinator restarts without a catalog: it would start at gs-1 again.
    let mut lab = lab.restart_coordinator(false).await;
    let gs = lab.coord.start_global_snapshot().await.unwrap();
    assert_eq!(gs, GlobalSnapshotId(1));
    match lab.outcome().await {
        ProtocolEvent::GlobalSnapshotFailed { why, .. } => {
            assert!(
                why.to_string().contains(&format!("has seen gs-{before}")),
                "{why}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The next one continues after the participants' epoch and completes.
    let next = lab.complete_one().await;
    assert_eq!(next, GlobalSnapshotId(before + 1));
    lab.stop().await;
}

#[tokio::test]
async fn a_coordinator_that_lost_its_catalog_learns_the_epoch_from_stale() {
    lost_catalog(3).await;
}

#[tokio::test]
async fn a_coordinator_that_lost_its_catalog_cannot_reuse_the_newest_epoch() {
    lost_catalog(1).await;
}

#[tokio::test]
async fn a_persisted_catalog_keeps_the_epoch_across_a_restart() {
    let mut lab = Lab::new(None, Duration::from_millis(2), true).await;
    lab.complete_one().await;
    lab.complete_one().await;
    let mut lab = lab.restart_coordinator(true).await;
    assert_eq!(lab.complete_one().await, GlobalSnapshotId(3));
    lab.stop().await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The shipped metadata server under 1,000 connections that never finish their
/// handshake: its memory stays bounded, excess connections are refused at once, every
/// refusal is logged with its peer, and it serves a real client afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hostile_connections_cost_bounded_memory() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("ms.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_unacloud-gs"))
        .args(["metadata", "--cluster", "42", "--base-port", "7100"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .stderr(log)
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let ask = || async {
        let env = Envelope::new(
            CLUSTER,
            ParticipantId::UNREGISTERED,
            ParticipantId::METADATA_SERVER,
            Message::QueryCount,
        );
        request(addr, &transport(None), env, Duration::from_secs(2)).await
    };
    let mut up = false;
    for _ in 0..300 {
        if ask().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the metadata server did not start");
    let before = rss_kib(child.id());
    // 1,000 connections, each announcing a frame as large as allowed before the
    // handshake and sending almost all of it, then waiting.
    let mut conns = Vec::new();
    let mut refused_at_once = 0;
    for _ in 0..1000 {
        let Ok(mut c) = TcpStream::connect(addr).await else {
            refused_at_once += 1;
            continue;
        };
        let mut bytes = vec![0u8; 4 + 1000];
        bytes[..4].copy_from_slice(&1024u32.to_be_bytes());
        bytes[4] = 1;
        let _ = c.write_all(&bytes).await;
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss_kib(child.id());
    // Count the connections the server refused at once (it closed them).
    let mut closed = 0;
    for c in conns.iter_mut() {
        let mut b = [0u8; 256];
        // A REJECT or end of stream: refused. A timeout: still waiting in its handshake.
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(2), c.read(&mut b)).await {
            closed += 1;
        }
    }
    eprintln!(
        "RSS before {before} KiB, with 1000 hostile connections {during} KiB; {closed} closed by the server, {refused_at_once} failed to connect"
    );
    assert!(
        during < before + 16 * 1024,
        "memory grew from {before} KiB to {during} KiB"
    );
    assert!(closed >= 900, "only {closed} of 1000 were refused at once");
    drop(conns);
    // Still serving.
    let mut served = false;
    for _ in 0..100 {
        if ask().await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the metadata server stopped serving");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("ms.log")).unwrap();
    assert!(
        log.contains("too many connections in their handshake") && log.contains("127.0.0.1:"),
        "refusals are logged with their peer: {}",
        &log[..log.len().min(2000)]
    );
}

/// A connection that never finishes its handshake is closed at the handshake deadline;
/// an established one that goes silent is closed at the idle timeout, after the server's
/// keep-alive PINGs.
#[tokio::test]
async fn silent_connections_are_closed_and_established_ones_kept_alive() {
    let mut cfg = transport(None);
    cfg.handshake_timeout = Duration::from_millis(300);
    cfg.keepalive = Duration::from_millis(100);
    cfg.idle_timeout = Duration::from_millis(600);
    let ms = spawn_metadata_server(
        MetadataServerConfig::new(CLUSTER, 1),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        cfg,
        None,
    )
    .unwrap();
    let mut mute = Raw::connect(ms.local_addr()).await;
    let reason = mute.rejection().await.unwrap();
    assert!(reason.contains("handshake"), "{reason}");

    let (mut quiet, mut s) = Raw::open(
        ms.local_addr(),
        None,
        ParticipantId::UNREGISTERED,
        ParticipantId::METADATA_SERVER,
    )
    .await;
    let (mut pings, mut reason) = (0, None);
    while let Some(f) = quiet.frame().await {
        match s.open(f) {
            Ok((FrameKind::Ping, _)) => pings += 1,
            Err(unacloud_snapshot::net::Error::PeerRejected { reason: r, .. }) => reason = Some(r),
            other => panic!("{other:?}"),
        }
    }
    assert!(pings >= 2, "{pings} PINGs before the idle timeout");
    assert!(reason.unwrap().contains("idle"));
    ms.stop().await;
}

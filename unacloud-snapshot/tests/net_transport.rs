//! The tokio transport on loopback: a full global snapshot through real sockets, cluster
//! keys, foreign and malformed frames. No privileges needed.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
#[cfg(feature = "hypervisor")]
use unacloud_snapshot::colour::Colour;
use unacloud_snapshot::net::conn::request;
use unacloud_snapshot::net::daemon::trigger_global_snapshot;
use unacloud_snapshot::net::Error;
use unacloud_snapshot::net::{
    spawn_coordinator, spawn_metadata_server, spawn_participant, ClusterKey, LocalSnapshot,
    MetadataServerHandle, NodeEvent, TransportConfig, VmHost,
};
use unacloud_snapshot::protocol::{
    ClusterId, CoordinatorConfig, Envelope, Message, MetadataServerConfig, ParticipantConfig,
    ParticipantId, ProtocolEvent,
};

/// A colouring backend that records calls (the network test needs no netfilter).
mod net_support;
use net_support::Recorder;

fn host(log: &Arc<std::sync::Mutex<Vec<String>>>) -> Arc<VmHost> {
    Arc::new(
        VmHost::new(
            "vm",
            Box::new(Recorder::new(log)),
            LocalSnapshot::Sleep(Duration::from_millis(5)),
        )
        .unwrap(),
    )
}

fn transport(key: Option<u8>) -> TransportConfig {
    let mut t = TransportConfig::new(
        ClusterId(42),
        key.map(|b| ClusterKey::new(vec![b; 32]).unwrap()),
    );
    t.backoff_min = Duration::from_millis(5);
    t.backoff_max = Duration::from_millis(50);
    t
}

/// A metadata server of cluster 42 on a free loopback port, with the cluster key made
/// of byte `key` (if any), writing its results to `results_csv` (if any).
async fn metadata_server(
    key: Option<u8>,
    results_csv: Option<std::path::PathBuf>,
) -> MetadataServerHandle {
    spawn_metadata_server(
        MetadataServerConfig::new(ClusterId(42), 1),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        transport(key),
        results_csv,
    )
    .unwrap()
}

async fn next_protocol(h: &mut unacloud_snapshot::net::NodeHandle) -> ProtocolEvent {
    loop {
        if let NodeEvent::Protocol(
            e @ (ProtocolEvent::GlobalSnapshotCompleted { .. }
            | ProtocolEvent::GlobalSnapshotFailed { .. }),
        ) = tokio::time::timeout(Duration::from_secs(10), h.events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            return e;
        }
    }
}

#[tokio::test]
async fn global_snapshot_over_loopback_with_a_cluster_key() {
    let logs: Vec<_> = (0..3)
        .map(|_| Arc::new(std::sync::Mutex::new(Vec::new())))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("times.csv");
    let ms = metadata_server(Some(7), Some(csv.clone())).await;
    // Register the three VMs as launchers do.
    for i in 0..3 {
        let env = Envelope::new(
            ClusterId(42),
            ParticipantId::UNREGISTERED,
            ParticipantId::METADATA_SERVER,
            Message::Insert {
                addr: "127.0.0.1".into(),
                vms: vec![format!("vm{i}")],
            },
        );
        let reply = request(
            ms.local_addr(),
            &transport(Some(7)),
            env,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(matches!(reply.message, Message::Inserted { id, .. } if id == ParticipantId(i)));
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cc = CoordinatorConfig::new(
        ClusterId(42),
        vec![ParticipantId(1), ParticipantId(2)],
        vec!["vm0".into()],
    );
    cc.report_to_metadata_server = true;
    let mut coord = spawn_coordinator(
        cc,
        None,
        listener,
        Some(ms.local_addr()),
        transport(Some(7)),
        host(&logs[0]),
    )
    .await
    .unwrap();
    let mut parts = Vec::new();
    for i in 1..3u32 {
        parts.push(
            spawn_participant(
                ParticipantConfig::new(ClusterId(42), ParticipantId(i), vec![format!("vm{i}")]),
                addr,
                transport(Some(7)),
                host(&logs[i as usize]),
            )
            .unwrap(),
        );
    }
    // Wait for both participants to connect.
    for _ in 0..200 {
        if coord.connected().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(coord.connected().len(), 2);
    // Through the metadata server, as an operator's `start` would.
    let mut ok = false;
    for _ in 0..100 {
        if trigger_global_snapshot(ms.local_addr(), &transport(Some(7)))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok);
    match next_protocol(&mut coord).await {
        ProtocolEvent::GlobalSnapshotCompleted { local_times, .. } => {
            assert_eq!(local_times.len(), 3);
        }
        other => panic!("{other:?}"),
    }
    // The metadata server received the report.
    for _ in 0..100 {
        if !ms.times().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ms.times().len(), 1);
    // One CSV row per participant with its local time and the global time.
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(
        rows[0],
        "global_snapshot,participant,local_time_s,global_time_s"
    );
    assert_eq!(rows.len(), 4, "{text}");
    for (i, r) in rows[1..].iter().enumerate() {
        let f: Vec<&str> = r.split(',').collect();
        assert_eq!(f[1], i.to_string());
        let local: f64 = f[2].parse().unwrap();
        let global: f64 = f[3].parse().unwrap();
        assert!(local >= 0.005 && global >= local, "{r}");
    }
    // Every host ran the six steps in the thesis's order (the protocol may also arm or
    // re-arm an idle POST filter around them).
    for log in &logs {
        let l = log.lock().unwrap().clone();
        let steps = [
            "colour Some(Pre)",
            "drop true",
            "colour Some(Post)",
            "drop false",
            "colour None",
        ];
        let mut at = 0;
        for step in steps {
            let found = l[at..].iter().position(|x| x == step);
            assert!(found.is_some(), "{step} missing in order in {l:?}");
            at += found.unwrap_or(0) + 1;
        }
        assert_eq!(l[0], "install");
    }
    for p in parts {
        p.stop().await;
    }
    coord.stop().await;
    ms.stop().await;
    for log in &logs {
        assert_eq!(log.lock().unwrap().last().unwrap(), "remove");
    }
}

#[tokio::test]
async fn different_keys_are_refused_with_a_clear_error() {
    let ms = metadata_server(Some(1), None).await;
    for (key, needle) in [
        (Some(2), "different cluster keys"),
        (None, "requires the cluster key"),
    ] {
        let e = trigger_global_snapshot(ms.local_addr(), &transport(key))
            .await
            .unwrap_err();
        // The server's proof in WELCOME tells the client at once (and the client's
        // REJECT tells the server).
        assert!(matches!(e, Error::Authentication { .. }), "{e:?}");
        assert!(e.to_string().contains(needle), "{e}");
    }
    // A node without key talking to one with a key: this side says so itself.
    let plain = metadata_server(None, None).await;
    let e = trigger_global_snapshot(plain.local_addr(), &transport(Some(3)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("key"), "{e}");
    // The right key works (the refusal is only that no participant registered yet).
    let e = trigger_global_snapshot(ms.local_addr(), &transport(Some(1)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no participant registered"), "{e}");
    ms.stop().await;
    plain.stop().await;
}

#[tokio::test]
async fn foreign_and_malformed_connections_do_not_disturb_others() {
    let ms = metadata_server(None, None).await;
    // Garbage, an oversize length prefix, and a foreign cluster, each on its own connection.
    let mut garbage = TcpStream::connect(ms.local_addr()).await.unwrap();
    garbage.write_all(b"\x00\x00\x00\x05GET /").await.unwrap();
    let mut huge = TcpStream::connect(ms.local_addr()).await.unwrap();
    huge.write_all(&[0xff, 0xff, 0xff, 0xff, 0]).await.unwrap();
    let mut foreign = transport(None);
    foreign.cluster = ClusterId(43);
    let e = trigger_global_snapshot(ms.local_addr(), &foreign)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cluster"), "{e}");
    // A well-behaved request still gets served.
    let e = trigger_global_snapshot(ms.local_addr(), &transport(None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no participant registered"), "{e}");
    ms.stop().await;
}

/// The protocol's host actions performed through the `Hypervisor` trait (here the
/// in-memory double; `unacloud-core`'s QEMU tests run the same trait on real VMs):
/// phase 1 checks that the VM runs and that its host has room, the local snapshot is a
/// live hypervisor snapshot named after the global snapshot, a resume restores and
/// starts it.
#[cfg(feature = "hypervisor")]
#[tokio::test]
async fn host_actions_drive_the_hypervisor() {
    use unacloud_core::hypervisor::{Hypervisor, StartMode};
    use unacloud_core::memory::InMemoryHypervisor;
    use unacloud_core::model::{DiskSpace, HardwareProfile, PowerState, VmId, VmSpec};
    use unacloud_snapshot::net::HostActions;
    use unacloud_snapshot::protocol::{ActionOutcome, GlobalSnapshotId, HostAction};

    let mem = Arc::new(InMemoryHypervisor::new());
    let spec = VmSpec::new("tm", HardwareProfile::Small).with_memory_mb(128);
    mem.create_vm(&spec).await.unwrap();
    let vm = VmId::from("tm");
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hv: Arc<dyn Hypervisor> = mem.clone();
    let host = VmHost::new(
        "tm",
        Box::new(Recorder::new(&log)),
        LocalSnapshot::Hypervisor {
            hv,
            live: true,
            margin: 1 << 20,
        },
    )
    .unwrap();
    let vms = vec!["tm".to_owned()];
    let check = || HostAction::CheckVmsRunning { vms: vms.clone() };
    // Phase 1: a VM that is off, and a host without room, are both refused, saying
    // which host, and for room the bytes needed and the bytes free.
    match host.perform(check()).await {
        ActionOutcome::Failed(why) => assert!(why.contains("VM tm is"), "{why}"),
        other => panic!("a VM that is off passed the check: {other:?}"),
    }
    mem.start_vm(&vm, StartMode::Headless).await.unwrap();
    assert_eq!(host.perform(check()).await, ActionOutcome::VmsRunning(true));
    mem.set_disk_space(DiskSpace {
        available: 100 << 20,
        total: 1 << 30,
    });
    match host.perform(check()).await {
        ActionOutcome::Failed(why) => assert!(
            why.starts_with("host ") && why.contains("needs 135266304 bytes, has 104857600"),
            "{why}"
        ),
        other => panic!("a host without room passed the check: {other:?}"),
    }
    let why = unacloud_snapshot::net::host::hypervisor_ready(mem.as_ref(), "tm", 1 << 20)
        .await
        .unwrap_err();
    assert!(
        why.contains("needs 135266304 bytes, has 104857600"),
        "{why}"
    );
    mem.set_disk_space(DiskSpace {
        available: 1 << 30,
        total: 1 << 30,
    });

    // Step 3: a live snapshot named after the global snapshot, in two moments. At its
    // point the guest is held paused until step 4 colours its traffic POST (so nothing
    // it sends after the point leaves PRE), then runs on; DONE waits for durability.
    let gs = GlobalSnapshotId(7);
    let taken = host
        .perform(HostAction::TakeLocalSnapshots {
            gs,
            vms: vms.clone(),
        })
        .await;
    assert!(
        matches!(taken, ActionOutcome::SnapshotPoint { .. }),
        "{taken:?}"
    );
    assert_eq!(mem.vm_info(&vm).await.unwrap().state, PowerState::Paused);
    assert!(
        mem.snapshot_tree(&vm)
            .await
            .unwrap()
            .resolve("gs-7")
            .is_err(),
        "durable before the guest ran on"
    );
    assert_eq!(
        host.perform(HostAction::SetOutgoingColour(Colour::Post))
            .await,
        ActionOutcome::Done
    );
    match host
        .perform(HostAction::AwaitDurable {
            gs,
            vms: vms.clone(),
        })
        .await
    {
        ActionOutcome::SnapshotDurable { .. } => {}
        other => panic!("durability: {other:?}"),
    }
    // Waiting for a snapshot that is not being written is an error, not a hang.
    assert!(matches!(
        host.perform(HostAction::AwaitDurable {
            gs,
            vms: vms.clone()
        })
        .await,
        ActionOutcome::Failed(_)
    ));
    let tree = mem.snapshot_tree(&vm).await.unwrap();
    let node = tree.resolve("gs-7").unwrap();
    assert!(
        tree.get(node).unwrap().state_file.is_some(),
        "taken with memory"
    );
    assert_eq!(mem.vm_info(&vm).await.unwrap().state, PowerState::Running);

    // Resume after a power cut: restore (powering off what still runs) and start.
    let restored = host
        .perform(HostAction::RestoreLocal {
            gs,
            vms: vms.clone(),
        })
        .await;
    assert_eq!(restored, ActionOutcome::Done);
    assert_eq!(mem.vm_info(&vm).await.unwrap().state, PowerState::Saved);
    let started = host
        .perform(HostAction::StartVms { vms: vms.clone() })
        .await;
    assert_eq!(started, ActionOutcome::Done);
    assert_eq!(mem.vm_info(&vm).await.unwrap().state, PowerState::Running);
    // A retried START is harmless; restoring a global snapshot this VM never took fails.
    assert_eq!(
        host.perform(HostAction::StartVms { vms: vms.clone() })
            .await,
        ActionOutcome::Done
    );
    match host
        .perform(HostAction::RestoreLocal {
            gs: GlobalSnapshotId(8),
            vms,
        })
        .await
    {
        ActionOutcome::Failed(why) => assert!(why.contains("gs-8"), "{why}"),
        other => panic!("restoring a missing snapshot gave {other:?}"),
    }
}

/// With a backend that answers at once, the host colours the VM POST itself at the
/// snapshot point while the guest is paused, and lets it run on without waiting for the
/// state machine's step 4 (which then finds the colour set).
#[cfg(feature = "hypervisor")]
#[tokio::test]
async fn a_fast_backend_colours_post_at_the_point_and_the_guest_runs_on() {
    use unacloud_core::hypervisor::{Hypervisor, StartMode};
    use unacloud_core::memory::InMemoryHypervisor;
    use unacloud_core::model::{HardwareProfile, PowerState, VmId, VmSpec};
    use unacloud_snapshot::net::HostActions;
    use unacloud_snapshot::protocol::{ActionOutcome, GlobalSnapshotId, HostAction};

    let mem = Arc::new(InMemoryHypervisor::new());
    mem.create_vm(&VmSpec::new("f", HardwareProfile::Small).with_memory_mb(64))
        .await
        .unwrap();
    let vm = VmId::from("f");
    mem.start_vm(&vm, StartMode::Headless).await.unwrap();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hv: Arc<dyn Hypervisor> = mem.clone();
    let host = VmHost::new(
        "f",
        Box::new(Recorder {
            fast: true,
            ..Recorder::new(&log)
        }),
        LocalSnapshot::Hypervisor {
            hv,
            live: true,
            margin: 0,
        },
    )
    .unwrap();
    let gs = GlobalSnapshotId(3);
    let vms = vec!["f".to_owned()];
    let taken = host
        .perform(HostAction::TakeLocalSnapshots {
            gs,
            vms: vms.clone(),
        })
        .await;
    assert!(
        matches!(taken, ActionOutcome::SnapshotPoint { .. }),
        "{taken:?}"
    );
    assert_eq!(
        log.lock().unwrap().last().map(String::as_str),
        Some("colour Some(Post)"),
        "coloured POST at the point"
    );
    // Durable without any step 4, and the guest runs again.
    match host.perform(HostAction::AwaitDurable { gs, vms }).await {
        ActionOutcome::SnapshotDurable { .. } => {}
        other => panic!("durability: {other:?}"),
    }
    assert_eq!(mem.vm_info(&vm).await.unwrap().state, PowerState::Running);
    assert!(mem
        .snapshot_tree(&vm)
        .await
        .unwrap()
        .resolve("gs-3")
        .is_ok());
}

/// A host whose local snapshot does not capture state refuses to resume, saying why.
#[tokio::test]
async fn a_host_that_cannot_capture_state_refuses_to_resume() {
    use unacloud_snapshot::net::HostActions;
    use unacloud_snapshot::protocol::{ActionOutcome, HostAction};
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = host(&log);
    match h
        .perform(HostAction::StartVms {
            vms: vec!["vm".into()],
        })
        .await
    {
        ActionOutcome::Failed(why) => assert!(why.contains("cannot restore or start"), "{why}"),
        other => panic!("{other:?}"),
    }
}

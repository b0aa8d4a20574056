//! The daemons of a deployment (SPEC §5, "Implementation"): a metadata server, one
//! launcher per host that registers its VMs (one participant per VM; the VM registered
//! first gets id 0 and its participant is the coordinator) and the operator's triggers:
//! `start` (`StartGS`, [`trigger_global_snapshot`]) and `resume` (POLL, RESTORE, START from
//! a completed global snapshot, [`trigger_resume`]). Configuration comes from a TOML file
//! and/or command-line flags.
//!
//! ```toml
//! cluster = 7
//! key_file = "/etc/unacloud/cluster.key"   # hex; enables HMAC-SHA256 of every frame
//! metadata_server = "10.0.0.1:7000"        # where launchers, `start` and `resume` find it
//! dscp_pre = 0x10
//! dscp_post = 0x12
//! snapshot_timeout_ms = 120000
//! precheck_timeout_ms = 10000
//!
//! [metadata]                                # for `metadata-server`
//! listen = "0.0.0.0:7000"
//! base_port = 7100
//! results_csv = "global-snapshots.csv"
//! max_registrations = 1024                  # INSERTs beyond are refused
//!
//! [launcher]                                # for `launcher`
//! advertise = "10.0.0.5"                    # address participants are reached at
//! cluster_size = 16                         # VMs in the whole deployment
//! backend = "nft-netlink"                   # or "nft", "nft-command", "iptables"
//! catalog = "/var/lib/unacloud/catalog-7.json"   # the default: catalog-<cluster>.json there
//! run_dir = "/run/unacloud"                 # lock files (default; else the temp directory)
//!
//! [launcher.hypervisor]                     # the VMs' local snapshots, restores, starts
//! backend = "qemu"                          # unacloud-core's QEMU backend (feature `hypervisor`)
//! root = "/var/lib/unacloud/vms"            # its root folder on this host
//! live = true                               # live snapshots (the guest runs on)
//! margin_mb = 64                            # free space required beyond the VM's memory
//!
//! [[launcher.vm]]
//! name = "web-1"
//! tap = "uct-web-1"                         # colour at the host, on the VM's tap
//! netns = "pc-5"                            # where that tap lives (optional)
//! ```
//!
//! A VM's local snapshot is explicit: the launcher's hypervisor (`[launcher.hypervisor]`),
//! or one of the lab methods of a VM entry — `freeze_pid` (SIGSTOP a process standing in
//! for the VM), `snapshot_command` (an argv template) or `lab_sleep_ms` (only wait; tests).
//! A VM with none of them is a configuration error: nothing records a global snapshot
//! that holds no state.
//!
//! Packet colouring happens at the host. With `tap` the rules mark what the VM sends and
//! filter what it receives on that interface (forward path, see
//! [`crate::colour::Scope::Interface`]), so neither guest nor application nor hypervisor
//! changes; without it they apply to the host's (or namespace's) own traffic.
//!
//! A launcher first locks every VM's colouring scope (its namespace and tap, or the host):
//! an exclusive `flock` of `launcher-<netns>-<tap>.lock` in the run directory, taken
//! before any colouring backend is built, because building one removes the rules it finds
//! (a crashed predecessor's leftovers). A second launcher for the same VM on the same
//! host therefore fails at once, naming the lock file and the launcher holding it, and
//! leaves the running launcher's rules alone.
//!
//! The coordinator's catalog of completed global snapshots is always persisted: to
//! `catalog` when given, else to [`default_catalog_path`]
//! (`/var/lib/unacloud/catalog-<cluster>.json`, the directory created with mode 0700).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::conn::{request, TransportConfig};
use super::frame::ClusterKey;
use super::host::{HostActions, HostSummary, LocalSnapshot, VmHost};
use super::node::{spawn_coordinator, spawn_participant, NodeEvent, NodeHandle};
use crate::colour::exec::{CommandExecutor, LocalHost, NetnsExec};
use crate::colour::iptables::Iptables;
use crate::colour::netlink::NftNetlink;
use crate::colour::nft::{Nft, NftOneShot, NftSession};
use crate::colour::{ColourBackend, Scope};
use crate::net::{Error, Result};
use crate::protocol::{
    ClusterId, CoordinatorConfig, DscpConfig, Envelope, GlobalSnapshotId, Message,
    ParticipantConfig, ParticipantId, ProtocolEvent, Registration, Timeouts,
};

mod backends;
mod config;
#[cfg(feature = "etcd")]
mod etcd;
mod events;
mod fault;
mod launcher;
mod scope_lock;

pub use backends::*;
pub use config::*;
#[cfg(feature = "etcd")]
pub use etcd::*;
pub use events::*;
pub(crate) use fault::CrashAfterStep;
pub use launcher::*;
pub use scope_lock::*;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let text = r#"
cluster = 7
metadata_server = "10.0.0.1:7000"
dscp_pre = 0x10
dscp_post = 0x12
snapshot_timeout_ms = 120000

[metadata]
listen = "0.0.0.0:7000"
base_port = 7100
results_csv = "global-snapshots.csv"

[launcher]
advertise = "10.0.0.5"
cluster_size = 16
backend = "iptables"

[launcher.hypervisor]
backend = "qemu"
root = "/var/lib/unacloud/vms"

[[launcher.vm]]
name = "web-1"
tap = "uct-web-1"
netns = "pc-5"
"#;
        let c = DaemonConfig::from_toml(text, Path::new("x.toml")).unwrap();
        assert_eq!(c.cluster, 7);
        let l = c.launcher.as_ref().unwrap();
        assert_eq!(l.backend, BackendKind::Iptables);
        assert_eq!(l.vms[0].name, "web-1");
        assert_eq!(c.timeouts().snapshot, Duration::from_secs(120));
        assert_eq!(c.metadata.as_ref().unwrap().base_port, 7100);
        let exec = vm_executor(&l.vms[0]);
        assert_eq!(exec.place(), "netns pc-5");
        let h = l.hypervisor.as_ref().unwrap();
        assert!(h.live);
        assert_eq!(h.margin_mb, 64);
        assert_eq!(l.vms[0].tap.as_deref(), Some("uct-web-1"));
    }

    #[cfg(feature = "hypervisor")]
    #[tokio::test]
    async fn a_launcher_hypervisor_section_opens_the_qemu_backend_or_says_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let section = |backend: &str, accel: Option<&str>| HypervisorSection {
            backend: backend.to_string(),
            root: dir.path().join("vms"),
            live: true,
            margin_mb: 32,
            accel: accel.map(str::to_string),
        };
        let first = open_hypervisor(&section("qemu", Some("tcg")))
            .await
            .unwrap();
        match &first {
            LocalSnapshot::Hypervisor { live, margin, .. } => {
                assert!(*live);
                assert_eq!(*margin, 32 << 20);
            }
            other => panic!("{other:?}"),
        }
        let e = open_hypervisor(&section("vmware", None)).await.unwrap_err();
        assert!(e.to_string().contains("\"vmware\""), "{e}");
        let e = open_hypervisor(&section("qemu", Some("hvf")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("auto, kvm or tcg"), "{e}");
        // The first backend still holds the root: a second one is refused with the reason.
        let e = open_hypervisor(&section("qemu", Some("tcg")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        // A VM without a lab method takes the launcher's hypervisor.
        let vm = VmConfig {
            name: "web-1".to_string(),
            ..VmConfig::default()
        };
        assert!(matches!(
            local_snapshot(&vm, Some(&first)).unwrap(),
            LocalSnapshot::Hypervisor { .. }
        ));
    }

    #[test]
    fn a_vm_without_a_snapshot_method_is_a_configuration_error() {
        let vm = VmConfig {
            name: "web-1".to_string(),
            ..VmConfig::default()
        };
        let e = local_snapshot(&vm, None).unwrap_err();
        assert!(e.to_string().contains("no local-snapshot method"), "{e}");
        let lab = VmConfig {
            lab_sleep_ms: Some(3),
            ..vm.clone()
        };
        assert!(matches!(
            local_snapshot(&lab, None).unwrap(),
            LocalSnapshot::Sleep(d) if d == Duration::from_millis(3)
        ));
        let two = VmConfig {
            freeze_pid: Some(1),
            ..lab
        };
        assert!(local_snapshot(&two, None).is_err());
        let empty = VmConfig {
            snapshot_command: Some(Vec::new()),
            ..vm
        };
        assert!(local_snapshot(&empty, None).is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let e = DaemonConfig::from_toml("cluster = 1\nclustr_size = 3\n", Path::new("c.toml"))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("c.toml") && msg.contains("clustr_size"),
            "{msg}"
        );
        let e = DaemonConfig::from_toml("cluster = \"x\"\n", Path::new("c.toml")).unwrap_err();
        assert!(matches!(e, Error::ConfigFile { .. }));
        let mut c = DaemonConfig::new(1);
        c.dscp_pre = Some(0x12);
        assert!(c.dscp().is_err());
        assert!("pf".parse::<BackendKind>().is_err());
    }

    #[test]
    fn backend_names_round_trip() {
        for k in [
            BackendKind::NftSession,
            BackendKind::NftNetlink,
            BackendKind::Nft,
            BackendKind::Iptables,
        ] {
            assert_eq!(k.name().parse::<BackendKind>().unwrap(), k);
            let toml = format!("[[launcher]]\nbackend = \"{}\"\n", k.name());
            let v: toml::Value = toml::from_str(&toml).unwrap();
            let b: BackendKind = v["launcher"][0]["backend"].clone().try_into().unwrap();
            assert_eq!(b, k);
        }
        // A tap name the kernel would refuse is a configuration error.
        let vm = VmConfig {
            name: "web-1".to_string(),
            tap: Some("no/slash".to_string()),
            ..VmConfig::default()
        };
        let e = build_vm_backend(BackendKind::Iptables, &vm, DscpConfig::default()).unwrap_err();
        assert!(e.to_string().contains("interface name"), "{e}");
        let e = build_backend(
            BackendKind::NftNetlink,
            Arc::new(LocalHost),
            DscpConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("nft-netlink"), "{e}");
    }

    #[test]
    fn node_errors_disconnections_and_missed_releases_become_launcher_events() {
        let json = |ev: NodeEvent| {
            serde_json::to_value(translate(ParticipantId(3), &ev).unwrap()).unwrap()
        };
        let v = json(NodeEvent::Error("bad frame".into()));
        assert_eq!(v["event"], "error");
        assert_eq!(v["id"], 3);
        assert_eq!(v["message"], "bad frame");
        let v = json(NodeEvent::Disconnected {
            peer: Some(ParticipantId(0)),
            reason: Some("reset".into()),
        });
        assert_eq!(v["event"], "disconnected");
        assert_eq!(
            (v["peer"].clone(), v["reason"].clone()),
            (0.into(), "reset".into())
        );
        let v = json(NodeEvent::Disconnected {
            peer: None,
            reason: None,
        });
        assert!(v["peer"].is_null() && v["reason"].is_null(), "{v}");
        let v = json(NodeEvent::Protocol(ProtocolEvent::ReleaseMissed {
            gs: GlobalSnapshotId(9),
        }));
        assert_eq!(v["event"], "release_missed");
        assert_eq!(v["gs"], 9);
        assert_eq!(v["id"], 3);
        let v = json(NodeEvent::Protocol(ProtocolEvent::CleanupFailed {
            gs: GlobalSnapshotId(2),
            why: "EBUSY".into(),
        }));
        assert_eq!(v["event"], "cleanup_failed");
        let v = json(NodeEvent::Protocol(ProtocolEvent::IdleDropFailed {
            why: "EPERM".into(),
        }));
        assert_eq!(v["event"], "idle_drop_failed");
        let v = json(NodeEvent::Connected(ParticipantId(0)));
        assert_eq!(
            (v["event"].clone(), v["peer"].clone()),
            ("connected".into(), 0.into())
        );
        // A summary of a VM that never registered has no id.
        let v = serde_json::to_value(LauncherEvent::Summary {
            vm: "web-1".into(),
            id: None,
            summary: HostSummary::default(),
        })
        .unwrap();
        assert!(v["id"].is_null() && v["leftovers"] == 0, "{v}");
    }

    #[test]
    fn each_colouring_scope_has_its_own_lock_file() {
        let dir = Path::new("/run/x");
        let vm = |netns: Option<&str>, tap: Option<&str>| VmConfig {
            name: "v".into(),
            netns: netns.map(str::to_string),
            tap: tap.map(str::to_string),
            ..VmConfig::default()
        };
        assert_eq!(
            scope_lock_path(dir, &vm(None, None)),
            Path::new("/run/x/launcher-host-all.lock")
        );
        assert_eq!(
            scope_lock_path(dir, &vm(Some("pc-5"), Some("uct-web-1"))),
            Path::new("/run/x/launcher-ns-pc%2D5-tap-uct%2Dweb%2D1.lock")
        );
        // Separators inside names cannot make two scopes share a file.
        assert_ne!(
            scope_lock_path(dir, &vm(Some("x-tap-y"), None)),
            scope_lock_path(dir, &vm(Some("x"), Some("y-all")))
        );
        assert_ne!(
            scope_lock_path(dir, &vm(Some("a/b"), None)),
            scope_lock_path(dir, &vm(Some("a_b"), None))
        );
    }

    #[test]
    fn a_held_scope_lock_names_its_holder_and_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let vms = vec![
            VmConfig {
                name: "web-1".into(),
                netns: Some("pc-5".into()),
                ..VmConfig::default()
            },
            // Same scope as web-1: one lock for both.
            VmConfig {
                name: "web-2".into(),
                netns: Some("pc-5".into()),
                ..VmConfig::default()
            },
        ];
        let held = lock_vm_scopes(dir.path(), &vms).unwrap();
        assert_eq!(held.len(), 1);
        let path = held[0].path().to_path_buf();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        // flock conflicts between two opens even within one process.
        let e = lock_vm_scopes(dir.path(), &vms[1..])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&path.display().to_string())
                && e.contains(&format!("pid {}", std::process::id()))
                && e.contains("web-2")
                && e.contains("another launcher"),
            "{e}"
        );
        // Another scope is free.
        let other = VmConfig {
            name: "db".into(),
            ..VmConfig::default()
        };
        let free = lock_vm_scopes(dir.path(), &[other]).unwrap();
        drop(free);
        drop(held);
        assert!(!path.exists(), "the lock file outlived its lock");
        let again = lock_vm_scopes(dir.path(), &vms).unwrap();
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn the_default_catalog_is_per_cluster_and_its_directory_is_created_private() {
        assert_eq!(
            default_catalog_path(7),
            Path::new("/var/lib/unacloud/catalog-7.json")
        );
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a/b/catalog-7.json");
        prepare_catalog_dir(&file).unwrap();
        let mode = std::fs::metadata(dir.path().join("a/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        prepare_catalog_dir(&file).unwrap();
        // A directory that cannot be created (a file is in the way): a clear error.
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let e = prepare_catalog_dir(&dir.path().join("f/catalog.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot create the catalog directory") && e.contains("--catalog"),
            "{e}"
        );
        // An explicit catalog is used as given.
        let mut cfg = DaemonConfig::new(7);
        cfg.launcher = Some(LauncherSection {
            advertise: "127.0.0.1".parse().unwrap(),
            cluster_size: 1,
            backend: BackendKind::default(),
            catalog: Some(file.clone()),
            run_dir: None,
            hypervisor: None,
            vms: Vec::new(),
        });
        assert_eq!(launcher_catalog(&cfg).unwrap(), file);
    }
}

//! Concurrency of the QEMU backend: operations on different VMs overlap, operations on
//! one VM run one after the other.
//!
//! A wrapper around the real `qemu-img` logs when each `create` starts and ends and
//! holds the creation of an overlay while a "hold" file named after it exists, so a
//! test can keep one operation inside `qemu-img` for as long as it likes. Nothing here
//! measures time: the order of events alone shows what ran while what was held.
#![allow(clippy::unwrap_used)]

mod provision_support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use provision_support::{make_template, require_qemu_img};
use unacloud_core::hypervisor::{AttachSpec, DiskRef, Hypervisor};
use unacloud_core::model::{DiskInfo, HardwareProfile, VmId, VmSpec};
use unacloud_core::provision::multiattach::MultiattachManager;
use unacloud_core::qemu::{QemuHypervisor, QemuImg};

/// Long enough for any unheld step on a loaded machine; reaching it means a deadlock.
const STUCK: Duration = Duration::from_secs(120);

/// A backend whose `qemu-img` is the logging, holding wrapper; its registered
/// multiattach template; the wrapper's log and the folder of hold files.
struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    hv: Arc<QemuHypervisor>,
    template: DiskInfo,
    log: PathBuf,
    holds: PathBuf,
}

async fn setup() -> Setup {
    require_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let template = make_template(dir.path(), "base", 16 << 20, 1 << 20).await;
    let (log, holds) = (dir.path().join("qemu-img.log"), dir.path().join("holds"));
    std::fs::create_dir(&holds).unwrap();
    let wrapper = dir.path().join("qemu-img-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            r#"#!/bin/sh
for a; do last="$a"; done
if [ "$1" = create ]; then
    name=$(basename "$last")
    echo "start $name" >> '{log}'
    while [ -e '{holds}'/"$name" ]; do sleep 0.02; done
    qemu-img "$@"; rc=$?
    echo "end $name" >> '{log}'
    exit $rc
fi
exec qemu-img "$@"
"#,
            log = log.display(),
            holds = holds.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = dir.path().join("host");
    let hv = QemuHypervisor::open_with(&root, QemuImg::new().with_program(&wrapper))
        .await
        .unwrap();
    let template = MultiattachManager::new(&hv)
        .register_template(&template)
        .await
        .unwrap();
    Setup {
        _dir: dir,
        root,
        hv: Arc::new(hv),
        template,
        log,
        holds,
    }
}

impl Setup {
    fn events(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the wrapper logged `event` (a deadlock fails the test).
    async fn wait_for(&self, event: &str) {
        let waited = tokio::time::timeout(STUCK, async {
            while !self.events().iter().any(|e| e == event) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "never saw {event:?}: {:?}", self.events());
    }

    fn hold(&self, overlay: &str) {
        std::fs::write(self.holds.join(overlay), b"").unwrap();
    }

    fn release(&self, overlay: &str) {
        std::fs::remove_file(self.holds.join(overlay)).unwrap();
    }
}

fn position(events: &[String], event: &str) -> usize {
    events
        .iter()
        .position(|e| e == event)
        .unwrap_or_else(|| panic!("no {event:?} in {events:?}"))
}

async fn has_disk(hv: &QemuHypervisor, name: &str) -> bool {
    hv.vm_info(&VmId::new(name)).await.unwrap().disks.len() == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_are_provisioned_while_another_vm_waits_for_qemu_img() {
    let s = setup().await;
    s.hold("a-SATA-0-0.qcow2");
    let a = {
        let (hv, t) = (Arc::clone(&s.hv), s.template.clone());
        tokio::spawn(async move {
            MultiattachManager::new(&*hv)
                .create_vm_from(&VmSpec::new("a", HardwareProfile::Small), &t)
                .await
        })
    };
    s.wait_for("start a-SATA-0-0.qcow2").await;
    // VM a is inside qemu-img and stays there: b and c are made from start to end
    // meanwhile, and so are the other operations on other VMs.
    for name in ["b", "c"] {
        let made = tokio::time::timeout(
            STUCK,
            MultiattachManager::new(&*s.hv)
                .create_vm_from(&VmSpec::new(name, HardwareProfile::Small), &s.template),
        )
        .await;
        assert!(
            made.is_ok(),
            "provisioning {name} waited for VM a: {:?}",
            s.events()
        );
        made.unwrap().unwrap();
    }
    let listed = tokio::time::timeout(STUCK, s.hv.list_vms()).await;
    assert_eq!(listed.unwrap().unwrap().len(), 3);
    let deleted = tokio::time::timeout(STUCK, s.hv.unregister_vm(&VmId::new("c"), true)).await;
    deleted.unwrap().unwrap();
    assert!(!a.is_finished(), "VM a was held in qemu-img");
    let events = s.events();
    assert!(
        position(&events, "end b-SATA-0-0.qcow2") > position(&events, "start a-SATA-0-0.qcow2")
    );
    assert!(!events.contains(&"end a-SATA-0-0.qcow2".to_owned()));

    s.release("a-SATA-0-0.qcow2");
    tokio::time::timeout(STUCK, a)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(has_disk(&s.hv, "a").await);
    assert!(has_disk(&s.hv, "b").await);

    // Every registry write of the overlapping operations is kept: a reopened root has
    // a and b, each on its own overlay, and not c.
    let Setup { _dir, root, hv, .. } = s;
    drop(Arc::into_inner(hv).unwrap());
    let again = QemuHypervisor::open(&root).await.unwrap();
    let mut names: Vec<String> = again
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    assert!(has_disk(&again, "a").await);
    assert!(has_disk(&again, "b").await);
    assert!(!root.join("vms").join("c").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_one_vm_run_one_after_the_other() {
    let s = setup().await;
    s.hv.create_vm(&VmSpec::new("s", HardwareProfile::Small))
        .await
        .unwrap();
    let attach = |port: u32| {
        let hv = Arc::clone(&s.hv);
        let spec = AttachSpec {
            port,
            ..AttachSpec::sata(DiskRef::Uuid(s.template.uuid))
        };
        tokio::spawn(async move { hv.attach_disk(&VmId::new("s"), &spec).await })
    };
    s.hold("s-SATA-0-0.qcow2");
    let first = attach(0);
    s.wait_for("start s-SATA-0-0.qcow2").await;
    let second = attach(1);
    let other_done = provision_other_vm(&s).await;
    // The second attachment to s had every chance to start (another VM was provisioned
    // from start to end meanwhile); it waits for the first.
    assert!(other_done, "another VM was provisioned meanwhile");
    assert!(!first.is_finished());
    assert!(!second.is_finished());
    assert!(!s.events().contains(&"start s-SATA-1-0.qcow2".to_owned()));

    s.release("s-SATA-0-0.qcow2");
    tokio::time::timeout(STUCK, first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(STUCK, second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let events: Vec<String> = s
        .events()
        .into_iter()
        .filter(|e| e.contains("s-SATA-"))
        .collect();
    assert_eq!(
        events,
        [
            "start s-SATA-0-0.qcow2",
            "end s-SATA-0-0.qcow2",
            "start s-SATA-1-0.qcow2",
            "end s-SATA-1-0.qcow2"
        ]
    );
    let info = s.hv.vm_info(&VmId::new("s")).await.unwrap();
    assert_eq!(info.disks.len(), 2, "neither attachment was lost: {info:?}");
}

/// Provisions VM `other` from start to end; whether it finished.
async fn provision_other_vm(s: &Setup) -> bool {
    let made = tokio::time::timeout(
        STUCK,
        MultiattachManager::new(&*s.hv)
            .create_vm_from(&VmSpec::new("other", HardwareProfile::Small), &s.template),
    )
    .await;
    matches!(made, Ok(Ok(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_vms_provisioned_at_once_are_all_registered() {
    let s = setup().await;
    for round in 0..3 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..8 {
            let (hv, t) = (Arc::clone(&s.hv), s.template.clone());
            tasks.spawn(async move {
                let spec = VmSpec::new(format!("r{round}-{i}"), HardwareProfile::Small);
                MultiattachManager::new(&*hv)
                    .create_vm_from(&spec, &t)
                    .await
            });
        }
        while let Some(done) = tasks.join_next().await {
            // Each operation reads the intents of the others while they come and go.
            done.unwrap().unwrap();
        }
        if round < 2 {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..8 {
                let hv = Arc::clone(&s.hv);
                tasks.spawn(async move {
                    hv.unregister_vm(&VmId::new(format!("r{round}-{i}")), true)
                        .await
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap().unwrap();
            }
        }
    }
    let Setup { _dir, root, hv, .. } = s;
    drop(Arc::into_inner(hv).unwrap());
    let again = QemuHypervisor::open(&root).await.unwrap();
    let vms = again.list_vms().await.unwrap();
    let mut names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    let expected: Vec<String> = (0..8).map(|i| format!("r2-{i}")).collect();
    assert_eq!(names, expected);
    assert!(vms.iter().all(|v| v.disks.len() == 1), "{vms:?}");
    // Nothing of the deleted rounds is left, and no operation's record either.
    let folders = std::fs::read_dir(root.join("vms")).unwrap().count();
    assert_eq!(folders, 8);
    let intents = std::fs::read_dir(root.join("intents")).unwrap().count();
    assert_eq!(intents, 0);
}

#![allow(clippy::unwrap_used)]
//! The in-memory hypervisor passes the conformance suite and models VirtualBox's
//! differencing-image semantics.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use unacloud_core::conformance::{run_all, ConformanceEnv};
use unacloud_core::hypervisor::{
    AttachSpec, CloneSpec, DiskRef, GuestCommand, GuestOutput, Hypervisor, SnapshotRef, StartMode,
    Timeouts, WithTimeouts,
};
use unacloud_core::memory::InMemoryHypervisor;
use unacloud_core::model::{DiskInfo, DiskType, HardwareProfile, VmId, VmInfo, VmSpec};
use unacloud_core::tree::SnapshotTree;
use unacloud_core::{Error, Result};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn in_memory_backend_passes_the_conformance_suite() {
    rt().block_on(async {
        let hv = InMemoryHypervisor::new();
        let report = run_all(&hv, &ConformanceEnv::new("/templates/base.vdi")).await;
        assert_eq!(
            report.passed,
            [
                "vm registry",
                "multiattach and snapshots",
                "delete snapshot",
                "vm files",
                "guest run",
                "register vm",
                "power cycle"
            ]
        );
        assert!(report.skipped.is_empty());
        // The suite cleans up after itself.
        assert!(hv.list_vms().await.unwrap().is_empty());
        assert!(hv.list_disks().await.unwrap().is_empty());
    });
}

#[test]
fn conformance_runs_through_an_arc_dyn_with_timeouts() {
    rt().block_on(async {
        let hv: Arc<dyn Hypervisor> = Arc::new(WithTimeouts::new(
            InMemoryHypervisor::new(),
            Timeouts::default(),
        ));
        let report = run_all(hv.as_ref(), &ConformanceEnv::new("/t/base.vdi")).await;
        assert_eq!(report.passed.len(), 7, "{report:?}");
    });
}

/// Creates a small VM `name` and attaches the registered image `disk` to it.
async fn vm_attached_to(
    hv: &InMemoryHypervisor,
    name: &str,
    disk: unacloud_core::model::Uuid,
) -> VmId {
    hv.create_vm(&VmSpec::new(name, HardwareProfile::Small))
        .await
        .unwrap();
    let id = VmId::from(name);
    hv.attach_disk(&id, &AttachSpec::sata(DiskRef::Uuid(disk)))
        .await
        .unwrap();
    id
}

async fn vm_with_disk(hv: &InMemoryHypervisor, name: &str) -> (VmId, DiskInfo) {
    let disk = hv
        .register_disk(Path::new(&format!("/vms/{name}/{name}.vdi")))
        .await
        .unwrap();
    let id = vm_attached_to(hv, name, disk.uuid).await;
    (id, disk)
}

/// Registers `/t/ubuntu.vdi` and makes it a multiattach template.
async fn multiattach_template(hv: &InMemoryHypervisor) -> DiskInfo {
    let t = hv.register_disk(Path::new("/t/ubuntu.vdi")).await.unwrap();
    hv.set_disk_type(&DiskRef::Uuid(t.uuid), DiskType::MultiAttach)
        .await
        .unwrap();
    t
}

fn chain(disks: &[DiskInfo], from: unacloud_core::model::Uuid) -> Vec<unacloud_core::model::Uuid> {
    let mut out = vec![from];
    let mut cur = from;
    while let Some(p) = disks.iter().find(|d| d.uuid == cur).and_then(|d| d.parent) {
        out.push(p);
        cur = p;
    }
    out
}

#[test]
fn each_snapshot_freezes_the_disk_and_adds_a_differencing_child() {
    rt().block_on(async {
        let hv = InMemoryHypervisor::new();
        let (vm, base) = vm_with_disk(&hv, "tm").await;
        hv.start_vm(&vm, StartMode::Headless).await.unwrap();
        for i in 1..=4 {
            hv.take_snapshot(&vm, &format!("Snapshot {i}"), None, true)
                .await
                .unwrap();
        }
        let info = hv.vm_info(&vm).await.unwrap();
        let disks = hv.list_disks().await.unwrap();
        // base + 4 differencing images, the newest attached (thesis Table 5.2).
        assert_eq!(disks.len(), 5);
        let c = chain(&disks, info.disks[0].disk);
        assert_eq!(c.len(), 5);
        assert_eq!(*c.last().unwrap(), base.uuid);
        let tree = hv.snapshot_tree(&vm).await.unwrap();
        assert_eq!(tree.len(), 4);
        assert!(tree
            .iter()
            .all(|(n, _)| tree.get(n).unwrap().state_file.is_some()));
    });
}

#[test]
fn restore_discards_the_current_state_image() {
    rt().block_on(async {
        let hv = InMemoryHypervisor::new();
        let (vm, _) = vm_with_disk(&hv, "tm").await;
        let s1 = hv.take_snapshot(&vm, "one", None, false).await.unwrap();
        hv.take_snapshot(&vm, "two", None, false).await.unwrap();
        let before = hv.list_disks().await.unwrap().len();
        hv.restore_snapshot(&vm, "one").await.unwrap();
        let after = hv.list_disks().await.unwrap();
        // the old current-state child is gone, a fresh child of s1's image replaces it
        assert_eq!(after.len(), before);
        let tree = hv.snapshot_tree(&vm).await.unwrap();
        assert_eq!(tree.get(tree.current().unwrap()).unwrap().id, s1.id);
    });
}

#[test]
fn deleting_a_snapshot_merges_and_reparents() {
    rt().block_on(async {
        let hv = InMemoryHypervisor::new();
        let (vm, _) = vm_with_disk(&hv, "tm").await;
        hv.take_snapshot(&vm, "one", None, false).await.unwrap();
        let s2 = hv.take_snapshot(&vm, "two", None, false).await.unwrap();
        hv.take_snapshot(&vm, "three", None, false).await.unwrap();
        let before = hv.list_disks().await.unwrap().len();
        hv.delete_snapshot(&vm, &s2.id).await.unwrap();
        let tree = hv.snapshot_tree(&vm).await.unwrap();
        assert_eq!(tree.len(), 2);
        let three = tree.resolve("three").unwrap();
        assert_eq!(tree.get(tree.parent(three).unwrap()).unwrap().name, "one");
        assert_eq!(hv.list_disks().await.unwrap().len(), before - 1);
    });
}

#[test]
fn ambiguous_snapshot_names_are_refused() {
    rt().block_on(async {
        let hv = InMemoryHypervisor::new();
        let (vm, _) = vm_with_disk(&hv, "tm").await;
        hv.take_snapshot(&vm, "same", None, false).await.unwrap();
        hv.take_snapshot(&vm, "same", None, false).await.unwrap();
        match hv.restore_snapshot(&vm, "same").await {
            Err(Error::AmbiguousName { candidates, .. }) => assert_eq!(candidates.len(), 2),
            other => panic!("expected AmbiguousName, got {other:?}"),
        }
    });
}

#[test]
fn a_normal_disk_runs_in_one_vm_at_a_time() {
    rt().block_on(async {
        let hv = InMemoryHypervisor::new();
        let (a, disk) = vm_with_disk(&hv, "a").await;
        let b = vm_attached_to(&hv, "b", disk.uuid).await;
        hv.start_vm(&a, StartMode::Headless).await.unwrap();
        assert!(matches!(
            hv.start_vm(&b, StartMode::Headless).await,
            Err(Error::InUse { .. })
        ));
    });
}

#[test]
fn deleting_a_vm_removes_its_own_images_only() {
    rt().block_on(async {
        let hv = InMemoryHypervisor::new();
        let t = multiattach_template(&hv).await;
        for name in ["a", "b"] {
            let vm = vm_attached_to(&hv, name, t.uuid).await;
            hv.take_snapshot(&vm, "s", None, false).await.unwrap();
        }
        assert_eq!(hv.list_disks().await.unwrap().len(), 5);
        hv.unregister_vm(&VmId::from("a"), true).await.unwrap();
        let left = hv.list_disks().await.unwrap();
        assert_eq!(left.len(), 3, "template + b's two images remain");
        assert!(left.iter().any(|d| d.uuid == t.uuid));
    });
}

#[test]
fn unregister_without_delete_can_be_registered_again() {
    rt().block_on(async {
        let hv = InMemoryHypervisor::new();
        let (vm, _) = vm_with_disk(&hv, "tm").await;
        let settings = hv.vm_info(&vm).await.unwrap().settings_file.unwrap();
        hv.unregister_vm(&vm, false).await.unwrap();
        assert!(matches!(hv.vm_info(&vm).await, Err(Error::NotFound { .. })));
        let back = hv.register_vm(&settings).await.unwrap();
        assert_eq!(back.name, "tm");
        assert!(matches!(
            hv.register_vm(Path::new("/nowhere.vbox")).await,
            Err(Error::NotFound { .. })
        ));
    });
}

#[test]
fn injected_failures_fire_once_at_the_requested_call() {
    rt().block_on(async {
        let hv = InMemoryHypervisor::new();
        hv.fail_on("create_vm", 1);
        hv.create_vm(&VmSpec::new("a", HardwareProfile::Small))
            .await
            .unwrap();
        assert!(matches!(
            hv.create_vm(&VmSpec::new("b", HardwareProfile::Small))
                .await,
            Err(Error::Backend { .. })
        ));
        hv.create_vm(&VmSpec::new("b", HardwareProfile::Small))
            .await
            .unwrap();
    });
}

#[test]
fn guest_commands_need_a_running_vm_and_passwords_stay_out_of_debug() {
    rt().block_on(async {
        let hv = InMemoryHypervisor::new();
        let (vm, _) = vm_with_disk(&hv, "tm").await;
        let cmd = GuestCommand {
            program: "/usr/sbin/iptables".into(),
            args: vec!["-L".into()],
            username: "root".into(),
            password: Some("hunter2".into()),
            timeout: None,
        };
        assert!(matches!(
            hv.guest_run(&vm, &cmd).await,
            Err(Error::InvalidState { .. })
        ));
        hv.start_vm(&vm, StartMode::Headless).await.unwrap();
        hv.guest_run(&vm, &cmd).await.unwrap();
        assert_eq!(hv.guest_log().len(), 1);
        assert!(!format!("{cmd:?}").contains("hunter2"));
    });
}

/// A backend whose `list_vms` never finishes, to prove the timeout wrapper bounds it.
#[derive(Debug)]
struct Hanging;

#[async_trait]
impl Hypervisor for Hanging {
    fn backend(&self) -> &str {
        "hanging"
    }
    async fn list_vms(&self) -> Result<Vec<VmInfo>> {
        std::future::pending().await
    }
    async fn vm_info(&self, _: &VmId) -> Result<VmInfo> {
        std::future::pending().await
    }
    async fn create_vm(&self, _: &VmSpec) -> Result<VmInfo> {
        std::future::pending().await
    }
    async fn register_vm(&self, _: &Path) -> Result<VmInfo> {
        std::future::pending().await
    }
    async fn unregister_vm(&self, _: &VmId, _: bool) -> Result<()> {
        std::future::pending().await
    }
    async fn clone_vm(&self, _: &VmId, _: &CloneSpec) -> Result<VmInfo> {
        std::future::pending().await
    }
    async fn start_vm(&self, _: &VmId, _: StartMode) -> Result<()> {
        std::future::pending().await
    }
    async fn power_off(&self, _: &VmId) -> Result<()> {
        std::future::pending().await
    }
    async fn save_state(&self, _: &VmId) -> Result<()> {
        std::future::pending().await
    }
    async fn pause(&self, _: &VmId) -> Result<()> {
        std::future::pending().await
    }
    async fn resume(&self, _: &VmId) -> Result<()> {
        std::future::pending().await
    }
    async fn take_snapshot(
        &self,
        _: &VmId,
        _: &str,
        _: Option<&str>,
        _: bool,
    ) -> Result<SnapshotRef> {
        std::future::pending().await
    }
    async fn restore_snapshot(&self, _: &VmId, _: &str) -> Result<()> {
        std::future::pending().await
    }
    async fn delete_snapshot(&self, _: &VmId, _: &str) -> Result<()> {
        std::future::pending().await
    }
    async fn snapshot_tree(&self, _: &VmId) -> Result<SnapshotTree> {
        std::future::pending().await
    }
    async fn list_disks(&self) -> Result<Vec<DiskInfo>> {
        std::future::pending().await
    }
    async fn register_disk(&self, _: &Path) -> Result<DiskInfo> {
        std::future::pending().await
    }
    async fn unregister_disk(&self, _: &DiskRef, _: bool) -> Result<()> {
        std::future::pending().await
    }
    async fn set_disk_type(&self, _: &DiskRef, _: DiskType) -> Result<()> {
        std::future::pending().await
    }
    async fn attach_disk(&self, _: &VmId, _: &AttachSpec) -> Result<DiskInfo> {
        std::future::pending().await
    }
    async fn guest_run(&self, _: &VmId, _: &GuestCommand) -> Result<GuestOutput> {
        std::future::pending().await
    }
}

#[test]
fn with_timeouts_turns_a_hang_into_a_typed_error() {
    rt().block_on(async {
        let limits = Timeouts {
            query: Duration::from_millis(20),
            ..Timeouts::default()
        };
        let hv = WithTimeouts::new(Hanging, limits);
        match hv.list_vms().await {
            Err(Error::Timeout { operation, after }) => {
                assert_eq!(operation, "list VMs");
                assert_eq!(after, Duration::from_millis(20));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    });
}

#[test]
fn vm_files_list_the_own_chain_and_expect_the_template() {
    rt().block_on(async {
        let hv = InMemoryHypervisor::new();
        let t = multiattach_template(&hv).await;
        let a = vm_attached_to(&hv, "a", t.uuid).await;
        hv.take_snapshot(&a, "s", None, false).await.unwrap();
        let set = hv.vm_files(&a).await.unwrap();
        // settings + the VM's child of the template + the child after the snapshot
        assert_eq!(set.files.len(), 3);
        assert_eq!(set.expected_at_destination.len(), 1);
        assert_eq!(set.expected_at_destination[0].uuid, t.uuid.to_string());
        assert!(set
            .files
            .iter()
            .all(|f| f.uuid.as_deref() != Some(&t.uuid.to_string())));
    });
}

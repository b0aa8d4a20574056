//! The Multiattach Manager's seven operations on real qcow2 images, across two hosts,
//! and their all-or-nothing behaviour under injected failures.
#![allow(clippy::unwrap_used)]

mod provision_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use provision_support::{files_below, make_template, require_qemu_img, Fault, Faulty};
use unacloud_core::hypervisor::{DiskRef, Hypervisor};
use unacloud_core::model::{DiskType, HardwareProfile, VmId, VmSpec};
use unacloud_core::provision::catalog::{checksum_file, Checksum, ChecksumAlgorithm};
use unacloud_core::provision::multiattach::{LocalTransfer, MultiattachManager};
use unacloud_core::qemu::QemuHypervisor;
use unacloud_core::Error;

struct Host {
    hv: Arc<QemuHypervisor>,
    faulty: Arc<Faulty>,
    vms: PathBuf,
    template: DiskRef,
}

struct Lab {
    _dir: tempfile::TempDir,
    template_src: PathBuf,
    checksum: Checksum,
    a: Host,
    b: Host,
}

async fn host(root: &Path, template_src: &Path) -> Host {
    // Each host has its own copy of the template in its own store (as after a preload).
    let store = root.join("templates");
    std::fs::create_dir_all(&store).unwrap();
    let t = store.join("ubuntu-1.qcow2");
    std::fs::copy(template_src, &t).unwrap();
    // These hosts provision only: starting a VM is refused as on a host without
    // qemu-system (the backend's VM tests boot real guests).
    let no_qemu = unacloud_core::qemu::QemuSystem::new()
        .with_program(root.join("no-qemu-system-here"))
        .with_accel(unacloud_core::qemu::Accel::Tcg);
    let hv = Arc::new(
        QemuHypervisor::open_configured(root, unacloud_core::qemu::QemuImg::new(), no_qemu)
            .await
            .unwrap(),
    );
    let disk = MultiattachManager::new(hv.as_ref())
        .register_template(&t)
        .await
        .unwrap();
    let faulty = Arc::new(Faulty::new(hv.clone()));
    Host {
        hv,
        faulty,
        vms: root.join("vms"),
        template: DiskRef::Uuid(disk.uuid),
    }
}

async fn lab() -> Lab {
    require_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let template_src = make_template(dir.path(), "src", 32 << 20, 2 << 20).await;
    let checksum = checksum_file(&template_src, ChecksumAlgorithm::Blake3).unwrap();
    let a = host(&dir.path().join("host-a"), &template_src).await;
    let b = host(&dir.path().join("host-b"), &template_src).await;
    Lab {
        _dir: dir,
        template_src,
        checksum,
        a,
        b,
    }
}

fn template_untouched(lab: &Lab) {
    for h in [&lab.a, &lab.b] {
        let p = h.hv.root().join("templates/ubuntu-1.qcow2");
        assert_eq!(
            checksum_file(&p, ChecksumAlgorithm::Blake3).unwrap(),
            lab.checksum,
            "template changed on {}",
            h.hv.root().display()
        );
    }
    assert_eq!(
        checksum_file(&lab.template_src, ChecksumAlgorithm::Blake3).unwrap(),
        lab.checksum
    );
}

fn small(name: &str) -> VmSpec {
    VmSpec::new(name, HardwareProfile::Small)
}

#[tokio::test]
async fn the_seven_operations_on_real_images() {
    let lab = lab().await;
    let (a, b) = (&lab.a, &lab.b);
    let ma = MultiattachManager::new(a.hv.as_ref());

    // (2) create
    let vm = ma.create_vm(&small("TM"), &a.template).await.unwrap();
    let id = VmId::new("TM");
    assert_eq!(vm.disks.len(), 1);
    a.hv.take_snapshot(&id, "configured", None, false)
        .await
        .unwrap();

    // (3) clone: a new differencing child of the template, not a copy of it.
    let clone = ma.clone_vm(&id, "TM-clone").await.unwrap();
    assert_ne!(clone.disks[0].disk, vm.disks[0].disk);
    let chains = a.hv.backing_chains(&VmId::new("TM-clone")).await.unwrap();
    assert_eq!(chains[0].len(), 2);
    assert!(
        chains[0][0].snapshots.is_empty(),
        "a clone starts without snapshots"
    );
    assert!(
        unacloud_core::provision::allocated_bytes(Path::new(&chains[0][0].filename)).unwrap()
            < 1 << 20
    );

    // (4) replicate to host b: only the VM's own files move; b's template is used.
    let copy = ma
        .replicate(&id, b.hv.as_ref(), &b.vms, &LocalTransfer)
        .await
        .unwrap();
    assert_eq!(copy.name, "TM");
    let chains = b.hv.backing_chains(&id).await.unwrap();
    assert_eq!(
        Path::new(&chains[0].last().unwrap().filename),
        std::fs::canonicalize(b.hv.root().join("templates/ubuntu-1.qcow2")).unwrap(),
        "the replica's chain was re-linked onto host b's template"
    );
    assert_eq!(
        chains[0].len(),
        3,
        "the snapshot's frozen image travels with the overlay"
    );
    let tree = b.hv.snapshot_tree(&id).await.unwrap();
    assert_eq!(tree.len(), 1);
    // Both hosts now have TM.
    assert!(a.hv.vm_info(&id).await.is_ok());
    // Replicating again is refused (the folder exists), and nothing is touched.
    assert!(matches!(
        ma.replicate(&id, b.hv.as_ref(), &b.vms, &LocalTransfer)
            .await,
        Err(Error::AlreadyExists { .. })
    ));

    // (5) migrate the clone to b: the source goes away once the copy is registered.
    let moved = ma
        .migrate(
            &VmId::new("TM-clone"),
            b.hv.as_ref(),
            &b.vms,
            &LocalTransfer,
            false,
        )
        .await
        .unwrap();
    assert_eq!(moved.name, "TM-clone");
    assert!(matches!(
        a.hv.vm_info(&VmId::new("TM-clone")).await,
        Err(Error::NotFound { .. })
    ));
    assert!(!a.vms.join("TM-clone").exists());

    // (7) refused while used, listing the VMs.
    let mb = MultiattachManager::new(b.hv.as_ref());
    match mb.unregister_template(&b.template, false).await {
        Err(Error::InUse { mut users, .. }) => {
            users.sort();
            assert_eq!(users, ["TM", "TM-clone"]);
        }
        other => panic!("expected InUse, got {other:?}"),
    }

    // (6) delete: own files only.
    ma.delete_vm(&id).await.unwrap();
    mb.delete_vm(&id).await.unwrap();
    mb.delete_vm(&VmId::new("TM-clone")).await.unwrap();
    assert!(files_below(&a.vms).is_empty());
    assert!(files_below(&b.vms).is_empty());
    template_untouched(&lab);

    // (7) now allowed.
    ma.unregister_template(&a.template, false).await.unwrap();
    mb.unregister_template(&b.template, false).await.unwrap();
    template_untouched(&lab);
}

#[tokio::test]
async fn replicate_refuses_a_destination_without_the_template() {
    let lab = lab().await;
    let ma = MultiattachManager::new(lab.a.hv.as_ref());
    ma.create_vm(&small("TM"), &lab.a.template).await.unwrap();
    MultiattachManager::new(lab.b.hv.as_ref())
        .unregister_template(&lab.b.template, false)
        .await
        .unwrap();
    match ma
        .replicate(
            &VmId::new("TM"),
            lab.b.hv.as_ref(),
            &lab.b.vms,
            &LocalTransfer,
        )
        .await
    {
        Err(Error::NotFound { kind, id }) => {
            assert!(kind.contains("template"), "{kind}");
            assert!(id.contains("preload"), "{id}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(files_below(&lab.b.vms).is_empty());
}

#[tokio::test]
async fn replicate_checks_free_space_first() {
    let lab = lab().await;
    let ma = MultiattachManager::new(lab.a.hv.as_ref());
    ma.create_vm(&small("TM"), &lab.a.template).await.unwrap();
    *lab.b.faulty.space.lock().unwrap() = Some(unacloud_core::model::DiskSpace {
        available: 1000,
        total: 1 << 30,
    });
    match ma
        .replicate(
            &VmId::new("TM"),
            lab.b.faulty.as_ref(),
            &lab.b.vms,
            &LocalTransfer,
        )
        .await
    {
        Err(e @ Error::InsufficientSpace { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("needs") && msg.contains("has 1000"), "{msg}");
        }
        other => panic!("expected InsufficientSpace, got {other:?}"),
    }
    assert!(files_below(&lab.b.vms).is_empty());
}

#[tokio::test]
async fn every_operation_is_all_or_nothing() {
    let lab = lab().await;
    let (a, b) = (&lab.a, &lab.b);
    let fa = MultiattachManager::new(a.faulty.as_ref());

    // (1) registering a template whose type change fails leaves nothing registered.
    let extra = a.hv.root().join("templates/extra.qcow2");
    std::fs::copy(&lab.template_src, &extra).unwrap();
    a.faulty.inject("set_disk_type", 0, Fault::Fail, 1);
    assert!(fa.register_template(&extra).await.is_err());
    let disks = a.hv.list_disks().await.unwrap();
    assert!(!disks.iter().any(|d| d.location.ends_with("extra.qcow2")));

    // (2) attach fails half-way: no VM, no files, template untouched.
    a.faulty.inject("attach_disk", 0, Fault::Fail, 1);
    assert!(fa.create_vm(&small("half"), &a.template).await.is_err());
    assert!(a.hv.list_vms().await.unwrap().is_empty());
    assert!(files_below(&a.vms).is_empty(), "{:?}", files_below(&a.vms));
    // vm_info after attach fails: the VM and its child are removed.
    a.faulty.inject("vm_info", 0, Fault::Fail, 1);
    assert!(fa.create_vm(&small("half"), &a.template).await.is_err());
    assert!(a.hv.list_vms().await.unwrap().is_empty());
    assert!(files_below(&a.vms).is_empty());
    let n_disks = a.hv.list_disks().await.unwrap().len();

    // A VM to work with.
    fa.create_vm(&small("TM"), &a.template).await.unwrap();
    let id = VmId::new("TM");

    // (3) clone whose check fails (list_disks) is removed again.
    a.faulty.inject("list_disks", 0, Fault::Fail, 1);
    assert!(fa.clone_vm(&id, "TM2").await.is_err());
    assert!(a.hv.vm_info(&VmId::new("TM2")).await.is_err());
    assert!(!a.vms.join("TM2").exists());

    // (4) replicate whose registration on the destination fails removes the copies.
    b.faulty.inject("register_vm", 0, Fault::Fail, 1);
    assert!(fa
        .replicate(&id, b.faulty.as_ref(), &b.vms, &LocalTransfer)
        .await
        .is_err());
    assert!(files_below(&b.vms).is_empty());
    assert!(b.hv.list_vms().await.unwrap().is_empty());

    // (5) migrate whose source removal fails removes the destination copy and keeps
    // the source.
    a.faulty.inject("unregister_vm", 0, Fault::Fail, 1);
    assert!(fa
        .migrate(&id, b.faulty.as_ref(), &b.vms, &LocalTransfer, false)
        .await
        .is_err());
    assert!(b.hv.list_vms().await.unwrap().is_empty());
    assert!(files_below(&b.vms).is_empty());
    assert!(a.hv.vm_info(&id).await.is_ok());
    // migrate with a start that is unsupported here: destination removed, source kept.
    match fa
        .migrate(&id, b.faulty.as_ref(), &b.vms, &LocalTransfer, true)
        .await
    {
        Err(Error::Unsupported { .. }) => {}
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert!(b.hv.list_vms().await.unwrap().is_empty());
    assert!(a.hv.vm_info(&id).await.is_ok());

    // (6) a failed delete keeps the VM whole.
    a.faulty.inject("unregister_vm", 0, Fault::Fail, 1);
    assert!(fa.delete_vm(&id).await.is_err());
    assert_eq!(a.hv.vm_info(&id).await.unwrap().disks.len(), 1);
    fa.delete_vm(&id).await.unwrap();

    // (7) and the template is still registered, still multiattach, unchanged.
    let disks = a.hv.list_disks().await.unwrap();
    assert_eq!(disks.len(), n_disks);
    let t = disks
        .iter()
        .find(|d| DiskRef::Uuid(d.uuid) == a.template)
        .unwrap();
    assert_eq!(t.disk_type, DiskType::MultiAttach);
    template_untouched(&lab);
}

//! Crash safety of the QEMU backend's multi-step operations, with the real `qemu-img`:
//! every side effect of every operation is made to fail (alone, or as if the process
//! died there), the root is opened again, and the invariant is checked: every
//! registered VM is complete, nothing under the root is orphaned, no intent is left,
//! and the same operation then succeeds.
#![allow(clippy::unwrap_used)]

#[path = "../../testsupport/skip.rs"]
mod skip;
#[path = "../../testsupport/tmpfs.rs"]
mod tmpfs;

mod provision_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use provision_support::{files_below, make_template, require_qemu_img};
use unacloud_core::error::{ImageFailure, ToolOutput};
use unacloud_core::hypervisor::{AttachSpec, CloneSpec, DiskRef, Hypervisor};
use unacloud_core::model::{DiskInfo, DiskType, HardwareProfile, VmId, VmSpec};
use unacloud_core::provision::multiattach::MultiattachManager;
use unacloud_core::qemu::{QemuHypervisor, QemuImg};
use unacloud_core::Error;

/// The invariant: no intent left, every registered VM complete (settings readable,
/// each disk's backing chain valid down to a registered multiattach template, every
/// file of its set present), and every file under the root is the registry, the lock,
/// the space reserve, or a file of a registered VM or disk.
async fn check_root(hv: &QemuHypervisor) -> Result<(), String> {
    let root = hv.root().to_path_buf();
    let intents: Vec<PathBuf> = files_below(&root.join("intents"));
    if !intents.is_empty() {
        return Err(format!("intents left: {intents:?}"));
    }
    let disks = hv.list_disks().await.map_err(|e| e.to_string())?;
    let templates: Vec<&DiskInfo> = disks
        .iter()
        .filter(|d| d.disk_type == DiskType::MultiAttach)
        .collect();
    let mut allowed: BTreeSet<PathBuf> = [
        root.join("registry.json"),
        root.join(".lock"),
        root.join(".reserve"),
    ]
    .into();
    allowed.extend(disks.iter().map(|d| d.location.clone()));
    for vm in hv.list_vms().await.map_err(|e| e.to_string())? {
        let id = VmId::from(vm.name.as_str());
        hv.vm_settings(&id)
            .await
            .map_err(|e| format!("{}: settings: {e}", vm.name))?;
        let chains = hv
            .backing_chains(&id)
            .await
            .map_err(|e| format!("{}: backing chain: {e}", vm.name))?;
        for chain in chains {
            let base = chain.last().map(|i| PathBuf::from(&i.filename));
            if !templates.iter().any(|t| Some(&t.location) == base.as_ref()) {
                return Err(format!("{}: chain ends at {base:?}", vm.name));
            }
        }
        let set = hv.vm_files(&id).await.map_err(|e| e.to_string())?;
        if !set.warnings.is_empty() {
            return Err(format!("{}: {:?}", vm.name, set.warnings));
        }
        allowed.extend(set.files.iter().map(|f| f.path.clone()));
    }
    let orphans: Vec<PathBuf> = files_below(&root)
        .into_iter()
        .filter(|f| !allowed.contains(f))
        .collect();
    if !orphans.is_empty() {
        return Err(format!("orphaned files: {orphans:?}"));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    CreateVm,
    /// The provisioning operation: a VM and its differencing disk.
    Provision,
    AttachDisk,
    DeleteVm,
    CloneVm,
}

const OPS: [Op; 5] = [
    Op::CreateVm,
    Op::Provision,
    Op::AttachDisk,
    Op::DeleteVm,
    Op::CloneVm,
];

struct Case {
    _dir: tempfile::TempDir,
    root: PathBuf,
    template: DiskInfo,
}

fn spec(name: &str) -> VmSpec {
    VmSpec::new(name, HardwareProfile::Small)
}

async fn setup(op: Op) -> (Case, QemuHypervisor) {
    let dir = tempfile::tempdir().unwrap();
    let image = make_template(dir.path(), "t", 4 << 20, 64 << 10).await;
    let root = dir.path().join("host");
    let hv = QemuHypervisor::open(&root).await.unwrap();
    let template = MultiattachManager::new(&hv)
        .register_template(&image)
        .await
        .unwrap();
    let m = MultiattachManager::new(&hv);
    match op {
        Op::CreateVm | Op::Provision => {}
        Op::AttachDisk => {
            hv.create_vm(&spec("v")).await.unwrap();
        }
        Op::DeleteVm | Op::CloneVm => {
            m.create_vm_from(&spec("v"), &template).await.unwrap();
        }
    }
    let root = hv.root().to_path_buf();
    (
        Case {
            _dir: dir,
            root,
            template,
        },
        hv,
    )
}

/// Runs the operation once.
async fn run(op: Op, hv: &QemuHypervisor, t: &DiskInfo) -> unacloud_core::Result<()> {
    let m = MultiattachManager::new(hv);
    match op {
        Op::CreateVm => hv.create_vm(&spec("v")).await.map(drop),
        Op::Provision => m.create_vm_from(&spec("v"), t).await.map(drop),
        Op::AttachDisk => hv
            .attach_disk(&"v".into(), &AttachSpec::sata(DiskRef::Uuid(t.uuid)))
            .await
            .map(drop),
        Op::DeleteVm => hv.unregister_vm(&"v".into(), true).await,
        Op::CloneVm => hv
            .clone_vm(
                &"v".into(),
                &CloneSpec {
                    name: "w".into(),
                    snapshot: None,
                    linked: false,
                },
            )
            .await
            .map(drop),
    }
}

/// The same operation after a restart: done already (it committed) or done now.
/// Provisioning resumes as `provision --out` does: a complete VM is kept, a half-made
/// one is removed and made again.
async fn retry(op: Op, hv: &QemuHypervisor, t: &DiskInfo) -> unacloud_core::Result<()> {
    let m = MultiattachManager::new(hv);
    let v = VmId::from("v");
    match op {
        Op::CreateVm if hv.vm_info(&v).await.is_ok() => Ok(()),
        Op::Provision if hv.vm_info(&v).await.is_ok() => {
            if m.is_complete_from(&v, t).await? {
                return Ok(());
            }
            hv.unregister_vm(&v, true).await?;
            run(op, hv, t).await
        }
        Op::AttachDisk if hv.vm_info(&v).await?.disks.len() == 1 => Ok(()),
        Op::DeleteVm if hv.vm_info(&v).await.is_err() => Ok(()),
        Op::CloneVm if hv.vm_info(&"w".into()).await.is_ok() => Ok(()),
        _ => run(op, hv, t).await,
    }
}

/// What the operation leaves when it is done.
async fn check_done(op: Op, hv: &QemuHypervisor, root: &Path) {
    let names: Vec<String> = hv
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    let disks = |n: &str| {
        let id = VmId::from(n);
        async move { hv.vm_info(&id).await.unwrap().disks.len() }
    };
    match op {
        Op::CreateVm => {
            assert_eq!(names, ["v"]);
            assert_eq!(disks("v").await, 0);
        }
        Op::Provision | Op::AttachDisk => {
            assert_eq!(names, ["v"]);
            assert_eq!(disks("v").await, 1);
        }
        Op::DeleteVm => {
            assert!(names.is_empty(), "{names:?}");
            assert!(!root.join("vms/v").exists(), "the VM's folder is left");
        }
        Op::CloneVm => {
            assert_eq!(names, ["v", "w"]);
            assert_eq!(disks("w").await, 1);
        }
    }
}

/// Side effects of one undisturbed run of `op`.
async fn steps_of(op: Op) -> u64 {
    let (case, hv) = setup(op).await;
    hv.__fault_at(0, false);
    run(op, &hv, &case.template).await.unwrap();
    let n = hv.__fault_steps();
    assert!(n >= 2, "{op:?} counted {n} side effects");
    n
}

/// Fails side effect `step` of `op` (`crash`: and everything after it), reopens the
/// root, checks the invariant, retries and checks again.
async fn fail_and_recover(op: Op, step: u64, n: u64, crash: bool) {
    let (case, hv) = setup(op).await;
    hv.__fault_at(step, crash);
    let result = run(op, &hv, &case.template).await;
    // A fault reported as success can only have hit the removal of an intent after
    // its commit: the operation is then done (checked after reopening).
    let reported_ok = result.is_ok();
    if step > n {
        assert!(reported_ok, "{op:?} failed with no fault: {result:?}");
    }
    drop(hv);
    let hv = QemuHypervisor::open(&case.root).await.unwrap();
    if let Err(e) = check_root(&hv).await {
        panic!("{op:?}, fault at side effect {step} (crash {crash}), after reopening: {e}");
    }
    if reported_ok {
        check_done(op, &hv, &case.root).await;
    }
    if let Err(e) = retry(op, &hv, &case.template).await {
        panic!("{op:?}, fault at side effect {step} (crash {crash}): the retry failed: {e}");
    }
    if let Err(e) = check_root(&hv).await {
        panic!("{op:?}, fault at side effect {step} (crash {crash}), after the retry: {e}");
    }
    check_done(op, &hv, &case.root).await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn every_side_effect_of_every_operation_can_fail_or_crash() {
    require_qemu_img();
    runtime().block_on(async {
        for op in OPS {
            let n = steps_of(op).await;
            for step in 1..=n + 1 {
                for crash in [true, false] {
                    fail_and_recover(op, step, n, crash).await;
                }
            }
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// The same property over random operations, fault positions and modes, with an
    /// earlier interrupted operation's leftovers in the root first.
    #[test]
    fn a_crash_at_any_side_effect_is_recovered(
        op in prop::sample::select(OPS.to_vec()),
        at in 0.0f64..1.0,
        crash in any::<bool>(),
    ) {
        require_qemu_img();
        runtime().block_on(async {
            let n = steps_of(op).await;
            let step = 1 + ((n as f64) * at) as u64;
            fail_and_recover(op, step, n, crash).await;
        });
    }
}

#[tokio::test]
async fn the_checker_detects_an_orphaned_file_and_an_incomplete_vm() {
    require_qemu_img();
    let (case, hv) = setup(Op::DeleteVm).await;
    check_root(&hv).await.unwrap();
    // An untracked file in a VM's folder.
    let stray = case.root.join("vms/v/stray.qcow2");
    std::fs::write(&stray, b"x").unwrap();
    let err = check_root(&hv).await.unwrap_err();
    assert!(
        err.contains("orphaned") && err.contains("stray.qcow2"),
        "{err}"
    );
    std::fs::remove_file(&stray).unwrap();
    // A left-over intent.
    std::fs::create_dir_all(case.root.join("intents")).unwrap();
    std::fs::write(case.root.join("intents/x.json"), b"{}").unwrap();
    assert!(check_root(&hv).await.unwrap_err().contains("intents"));
    std::fs::remove_file(case.root.join("intents/x.json")).unwrap();
    // A registered VM whose disk is gone.
    std::fs::remove_file(case.root.join("vms/v/v-SATA-0-0.qcow2")).unwrap();
    let err = check_root(&hv).await.unwrap_err();
    assert!(err.contains("v:"), "{err}");
}

/// The state the backend used to leave when `provision` was killed between the
/// overlay and the settings: a registered VM with no disk and an untracked overlay.
async fn half_registered(case: &Case, hv: &QemuHypervisor) -> PathBuf {
    hv.create_vm(&spec("v")).await.unwrap();
    let overlay = case.root.join("vms/v/v-SATA-0-0.qcow2");
    QemuImg::new()
        .create_overlay(&overlay, &case.template.location, "qcow2")
        .await
        .unwrap();
    overlay
}

#[tokio::test]
async fn deleting_a_half_registered_vm_removes_its_overlay_and_the_name_can_be_reused() {
    require_qemu_img();
    let (case, hv) = setup(Op::CreateVm).await;
    let overlay = half_registered(&case, &hv).await;
    hv.unregister_vm(&"v".into(), true).await.unwrap();
    assert!(!overlay.exists(), "delete_vm left the VM's overlay");
    assert!(!case.root.join("vms/v").exists());
    MultiattachManager::new(&hv)
        .create_vm_from(&spec("v"), &case.template)
        .await
        .unwrap();
    check_root(&hv).await.unwrap();
}

#[tokio::test]
async fn opening_a_root_adopts_an_overlay_left_beside_a_vm_without_disk() {
    require_qemu_img();
    let (case, hv) = setup(Op::CreateVm).await;
    let overlay = half_registered(&case, &hv).await;
    // And a temporary file of an interrupted settings write.
    std::fs::write(case.root.join("vms/v/.v.vm.json.tmp-1-2"), b"{").unwrap();
    drop(hv);
    let hv = QemuHypervisor::open(&case.root).await.unwrap();
    check_root(&hv).await.unwrap();
    let v = VmId::from("v");
    assert!(MultiattachManager::new(&hv)
        .is_complete_from(&v, &case.template)
        .await
        .unwrap());
    assert_eq!(
        hv.vm_files(&v).await.unwrap().files[1].path,
        overlay,
        "the overlay is the VM's disk"
    );
}

#[tokio::test]
async fn an_overlay_on_no_registered_template_is_removed_on_open() {
    require_qemu_img();
    let (case, hv) = setup(Op::CreateVm).await;
    hv.create_vm(&spec("v")).await.unwrap();
    let other = make_template(case.root.parent().unwrap(), "other", 1 << 20, 0).await;
    let overlay = case.root.join("vms/v/v-SATA-0-0.qcow2");
    QemuImg::new()
        .create_overlay(&overlay, &other, "qcow2")
        .await
        .unwrap();
    drop(hv);
    let hv = QemuHypervisor::open(&case.root).await.unwrap();
    assert!(!overlay.exists());
    check_root(&hv).await.unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

#[tokio::test]
async fn deleting_a_vm_on_a_copied_root_leaves_the_original_alone() {
    require_qemu_img();
    let (case, hv) = setup(Op::DeleteVm).await;
    drop(hv);
    let copy = case.root.with_file_name("copy");
    copy_dir(&case.root, &copy);
    let text = std::fs::read_to_string(case.root.join("registry.json")).unwrap();
    assert!(
        !text.contains(&*case.root.join("vms").to_string_lossy()),
        "the registry names files under its root by absolute path: {text}"
    );
    let b = QemuHypervisor::open(&copy).await.unwrap();
    b.unregister_vm(&"v".into(), true).await.unwrap();
    assert!(!copy.join("vms/v").exists());
    assert!(
        case.root.join("vms/v/v-SATA-0-0.qcow2").exists(),
        "deleting on the copy removed the original's overlay"
    );
    let a = QemuHypervisor::open(&case.root).await.unwrap();
    check_root(&a).await.unwrap();
}

#[tokio::test]
async fn an_old_registry_with_absolute_paths_is_read_and_outside_files_are_refused() {
    require_qemu_img();
    let (case, hv) = setup(Op::DeleteVm).await;
    drop(hv);
    let copy = case.root.with_file_name("copy");
    copy_dir(&case.root, &copy);
    // The previous format: every path absolute. The copy's registry still names the
    // original's files; the original's names its own.
    let legacy = |root: &Path, names: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("registry.json")).unwrap())
                .unwrap();
        v["format"] = "unacloud-qemu-registry/1".into();
        v["vms"] = serde_json::json!([names.join("vms/v/v.vm.json")]);
        v.as_object_mut().unwrap().remove("root");
        std::fs::write(root.join("registry.json"), v.to_string()).unwrap();
    };
    legacy(&copy, &case.root);
    legacy(&case.root, &case.root);
    let b = QemuHypervisor::open(&copy).await.unwrap();
    let refused = b.unregister_vm(&"v".into(), true).await;
    assert!(
        matches!(refused, Err(Error::OutsideRoot { .. })),
        "{refused:?}"
    );
    assert!(case.root.join("vms/v/v-SATA-0-0.qcow2").exists());
    drop(b);
    // Entries under the root are converted, and deleting works there.
    let a = QemuHypervisor::open(&case.root).await.unwrap();
    check_root(&a).await.unwrap();
    a.unregister_vm(&"v".into(), true).await.unwrap();
    assert!(!case.root.join("vms/v").exists());
    let text = std::fs::read_to_string(case.root.join("registry.json")).unwrap();
    assert!(text.contains("unacloud-qemu-registry/2"), "{text}");
}

#[tokio::test]
async fn qemu_img_failures_are_typed_with_their_reason() {
    require_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let img = QemuImg::new();
    let missing = dir.path().join("missing.qcow2");
    match img.info(&missing).await {
        Err(Error::QemuImg {
            kind: ImageFailure::NotFound,
            path,
            ..
        }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
    let garbage = dir.path().join("garbage.qcow2");
    std::fs::write(&garbage, vec![0x42u8; 4096]).unwrap();
    let e = img
        .create_overlay(&dir.path().join("o.qcow2"), &garbage, "qcow2")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::QemuImg {
                kind: ImageFailure::CorruptImage,
                ..
            }
        ),
        "{e:?}"
    );
    // The reason is in the error's source chain.
    let source = std::error::Error::source(&e).unwrap();
    assert!(source.downcast_ref::<ToolOutput>().is_some());
    assert!(
        unacloud_core::error::chain(&e).contains("qcow2"),
        "{}",
        unacloud_core::error::chain(&e)
    );
    for (stderr, kind) in [
        (
            "qemu-img: x.qcow2: Could not write: No space left on device",
            ImageFailure::NoSpace,
        ),
        (
            "qemu-img: Could not open 'x': Permission denied",
            ImageFailure::PermissionDenied,
        ),
        (
            "qemu-img: Could not open 'x': Could not open 'x': No such file or directory",
            ImageFailure::NotFound,
        ),
        (
            "qemu-img: Could not open 'x': Image is not in qcow2 format",
            ImageFailure::CorruptImage,
        ),
        ("qemu-img: something else", ImageFailure::Other),
    ] {
        assert_eq!(ImageFailure::classify(stderr), kind, "{stderr}");
    }
}

/// A small file system that is then filled (needs root for the mount).
#[tokio::test]
async fn a_full_disk_leaves_no_vm_without_disk_and_no_temporary_file() {
    require_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    let Some(_mount) = tmpfs::SmallFs::mount(&small, "2m") else {
        return;
    };
    let image = make_template(dir.path(), "t", 4 << 20, 64 << 10).await;
    let root = small.join("host");
    let hv = QemuHypervisor::open(&root).await.unwrap();
    let t = MultiattachManager::new(&hv)
        .register_template(&image)
        .await
        .unwrap();
    let filler = tmpfs::fill(&small);
    let m = MultiattachManager::new(&hv);
    let mut errors = Vec::new();
    for i in 0..3 {
        if let Err(e) = m.create_vm_from(&spec(&format!("v{i}")), &t).await {
            errors.push(unacloud_core::error::chain(&e));
        }
    }
    assert!(!errors.is_empty(), "nothing failed on a full disk");
    assert!(
        errors.iter().all(|e| e.contains("No space left")
            || e.contains("no space left")
            || e.contains("os error 28")),
        "the reason is not given: {errors:?}"
    );
    let temps: Vec<PathBuf> = files_below(&root)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
    std::fs::remove_file(&filler).unwrap();
    drop(hv);
    let hv = QemuHypervisor::open(&root).await.unwrap();
    check_root(&hv).await.unwrap();
    for vm in hv.list_vms().await.unwrap() {
        assert_eq!(vm.disks.len(), 1, "{} was left without a disk", vm.name);
    }
}

/// A deployment killed half-way (the backend "dies" at one side effect) is finished by
/// deploying the same plan again with `resume`: complete VMs are kept, the half-made
/// one is made again, nothing is orphaned. Without `resume` the VMs of the earlier run
/// fail the new one (they are never touched).
#[tokio::test]
async fn a_deployment_killed_half_way_is_finished_by_resuming_the_same_plan() {
    use std::collections::HashMap;
    use std::sync::Arc;
    use unacloud_core::model::HostId;
    use unacloud_core::provision::deploy::{
        deploy, DeployOptions, DeploymentPlan, HostPlan, HostTarget, PlannedVm,
    };
    require_qemu_img();
    let (case, hv) = setup(Op::CreateVm).await;
    let host = HostId::from("pc-1");
    let plan = DeploymentPlan {
        hosts: vec![HostPlan {
            host: host.clone(),
            vms: (0..4)
                .map(|i| PlannedVm {
                    spec: spec(&format!("vm-{i}")),
                    template: "base@1".into(),
                })
                .collect(),
        }],
    };
    let targets = |hv: Arc<QemuHypervisor>| {
        let mut t = HostTarget::new(hv as Arc<dyn Hypervisor>);
        t.templates
            .insert("base@1".into(), DiskRef::Uuid(case.template.uuid));
        HashMap::from([(host.clone(), t)])
    };
    // Dies in the middle of the third VM (each VM takes 9 side effects: 5 for the VM,
    // 4 for its disk), after its settings and before its overlay.
    let hv = Arc::new(hv);
    hv.__fault_at(2 * 9 + 6, true);
    let first = deploy(
        &plan,
        &targets(hv.clone()),
        &DeployOptions::default(),
        None,
        None,
    )
    .await;
    assert_eq!(first.created(), 2, "{first:?}");
    drop(first);
    drop(hv);

    let hv = Arc::new(QemuHypervisor::open(&case.root).await.unwrap());
    check_root(&hv).await.unwrap();
    let half = hv.vm_info(&"vm-2".into()).await.unwrap();
    assert!(
        half.disks.is_empty(),
        "the crash left vm-2 without its disk"
    );
    let again = deploy(
        &plan,
        &targets(hv.clone()),
        &DeployOptions::default(),
        None,
        None,
    )
    .await;
    assert_eq!(
        (again.created(), again.failed()),
        (1, 3),
        "without resume the earlier run's VMs fail (vm-3 is new)"
    );
    let resume = DeployOptions {
        resume: true,
        ..DeployOptions::default()
    };
    let done = deploy(&plan, &targets(hv.clone()), &resume, None, None).await;
    assert_eq!(done.created(), 4, "{done:?}");
    check_root(&hv).await.unwrap();
    for vm in hv.list_vms().await.unwrap() {
        assert_eq!(vm.disks.len(), 1, "{}", vm.name);
    }
}

/// The disk fills (another process) between a VM's creation and its disk: the attach
/// fails with a typed no-space error, and the roll-back (deleting the VM) still works
/// on the full disk, so no registered VM is left without its disk.
#[tokio::test]
async fn a_vm_whose_disk_cannot_be_made_on_a_full_disk_can_still_be_deleted() {
    require_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    let Some(_mount) = tmpfs::SmallFs::mount(&small, "2m") else {
        return;
    };
    let image = make_template(dir.path(), "t", 4 << 20, 64 << 10).await;
    let root = small.join("host");
    let hv = QemuHypervisor::open(&root).await.unwrap();
    let t = MultiattachManager::new(&hv)
        .register_template(&image)
        .await
        .unwrap();
    let v = VmId::from("v");
    hv.create_vm(&spec("v")).await.unwrap();
    let filler = tmpfs::fill(&small);
    let e = hv
        .attach_disk(&v, &AttachSpec::sata(DiskRef::Uuid(t.uuid)))
        .await
        .unwrap_err();
    assert!(
        unacloud_core::error::chain(&e).contains("No space left"),
        "{}",
        unacloud_core::error::chain(&e)
    );
    hv.unregister_vm(&v, true).await.unwrap();
    assert!(hv.list_vms().await.unwrap().is_empty());
    let temps: Vec<PathBuf> = files_below(&root)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
    std::fs::remove_file(&filler).unwrap();
    drop(hv);
    let hv = QemuHypervisor::open(&root).await.unwrap();
    check_root(&hv).await.unwrap();
    assert!(hv.list_vms().await.unwrap().is_empty());
}

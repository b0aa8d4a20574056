//! The QEMU backend against the real `qemu-img`.
#![allow(clippy::unwrap_used)]

mod provision_support;

use std::path::{Path, PathBuf};

use provision_support::{make_template, require_qemu_img};
use unacloud_core::conformance::{run_all, ConformanceEnv};
use unacloud_core::files::FileRole;
use unacloud_core::hypervisor::{DiskRef, Hypervisor, StartMode};
use unacloud_core::model::{DiskType, HardwareProfile, VmId, VmSpec};
use unacloud_core::provision::catalog::{checksum_file, ChecksumAlgorithm};
use unacloud_core::provision::multiattach::MultiattachManager;
use unacloud_core::qemu::{parse_info, QemuHypervisor};
use unacloud_core::Error;

#[test]
fn parses_real_backing_chain_json() {
    let text = include_str!("qemu_data/info-backing-chain.json");
    let chain = parse_info(text).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0].filename, "ov.qcow2");
    assert_eq!(chain[0].format, "qcow2");
    assert_eq!(chain[0].virtual_size, 64 << 20);
    assert_eq!(
        chain[0].full_backing_filename.as_deref(),
        Some("/srv/templates/base.qcow2")
    );
    assert_eq!(chain[0].backing_filename_format.as_deref(), Some("qcow2"));
    let names: Vec<&str> = chain[0].snapshots.iter().map(|s| s.name.as_str()).collect();
    // qemu-img accepts a tag twice (which is why the backend uses unique tags).
    assert_eq!(names, ["s1", "s2", "s1"]);
    assert_eq!(chain[0].snapshots[1].id, "2");
    assert_eq!(chain[0].snapshots[2].id, "3");
    assert!(chain[1].backing_filename.is_none());
    assert!(chain[1].snapshots.is_empty());
}

#[test]
fn garbage_json_is_a_typed_error() {
    assert!(matches!(parse_info("not json"), Err(Error::Backend { .. })));
    assert!(matches!(parse_info("42"), Err(Error::Backend { .. })));
    assert!(matches!(
        parse_info(r#"{"format": "qcow2"}"#),
        Err(Error::Backend { .. })
    ));
}

#[tokio::test]
async fn passes_the_conformance_suite() {
    require_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let template = make_template(dir.path(), "conf", 16 << 20, 1 << 20).await;
    let hv = QemuHypervisor::open(dir.path().join("host")).await.unwrap();
    let report = run_all(&hv, &ConformanceEnv::new(&template)).await;
    assert_eq!(
        report.passed,
        [
            "vm registry",
            "multiattach and snapshots",
            "delete snapshot",
            "vm files",
            "register vm"
        ]
    );
    // No guest agent, and no bootable template given here: both are reported, not faked.
    let skipped: Vec<_> = report.skipped.iter().map(|s| s.0).collect();
    assert_eq!(skipped, ["guest run", "power cycle"], "{report:?}");
}

#[tokio::test]
async fn fifty_vms_from_one_template_keep_it_unchanged() {
    require_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let template = make_template(dir.path(), "ubuntu-1", 64 << 20, 4 << 20).await;
    let before = checksum_file(&template, ChecksumAlgorithm::Blake3).unwrap();
    let hv = QemuHypervisor::open(dir.path().join("host")).await.unwrap();
    let m = MultiattachManager::new(&hv);
    let t = m.register_template(&template).await.unwrap();
    assert_eq!(t.disk_type, DiskType::MultiAttach);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&template).unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0, "a multiattach template is read-only");
    }
    let tref = DiskRef::Uuid(t.uuid);
    let canon_template = std::fs::canonicalize(&template).unwrap();

    for i in 0..50 {
        let vm = m
            .create_vm(
                &VmSpec::new(format!("vm-{i:02}"), HardwareProfile::Small),
                &tref,
            )
            .await
            .unwrap();
        assert_eq!(vm.disks.len(), 1);
    }
    assert_eq!(hv.list_vms().await.unwrap().len(), 50);

    // Snapshots of some VMs: a small tree, a restore and a delete.
    for i in (0..50).step_by(10) {
        let id = VmId::new(format!("vm-{i:02}"));
        let a = hv
            .take_snapshot(&id, "installed", None, false)
            .await
            .unwrap();
        let b = hv
            .take_snapshot(&id, "configured", Some("after a"), false)
            .await
            .unwrap();
        hv.restore_snapshot(&id, &a.id).await.unwrap();
        let c = hv.take_snapshot(&id, "branch", None, false).await.unwrap();
        let tree = hv.snapshot_tree(&id).await.unwrap();
        assert_eq!(tree.len(), 3);
        let (na, nb, nc) = (
            tree.find_by_id(&a.id).unwrap(),
            tree.find_by_id(&b.id).unwrap(),
            tree.find_by_id(&c.id).unwrap(),
        );
        assert_eq!(tree.children(na), &[nb, nc], "a has two children");
        assert_eq!(tree.current(), Some(nc));
        assert!(tree.get(na).unwrap().time_stamp.is_some());
        // VirtualBox's layout, really on disk: the VM runs on an overlay over c's frozen
        // image, which sits on a's, which sits on the template.
        let chains = hv.backing_chains(&id).await.unwrap();
        assert_eq!(chains[0].len(), 4, "{:?}", chains[0]);
        let settings = hv.vm_settings(&id).await.unwrap();
        let frozen = |tag: &str| {
            let m = settings.snapshots.iter().find(|m| m.tag == tag).unwrap();
            m.disks[0]
                .file
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        assert!(chains[0][1].filename.ends_with(&frozen(&c.id)));
        assert!(chains[0][2].filename.ends_with(&frozen(&a.id)));
        hv.delete_snapshot(&id, &b.id).await.unwrap();
        assert_eq!(hv.snapshot_tree(&id).await.unwrap().len(), 2);
        // Ambiguity and absence are typed errors.
        assert!(matches!(
            hv.restore_snapshot(&id, "nope").await,
            Err(Error::NotFound { .. })
        ));
    }

    // Every overlay's backing chain ends at the template; each VM's files are its own.
    for vm in hv.list_vms().await.unwrap() {
        let id = VmId::new(vm.name.clone());
        let chains = hv.backing_chains(&id).await.unwrap();
        assert_eq!(chains.len(), 1);
        let chain = &chains[0];
        // The first VM has snapshots: its overlay sits on their frozen images.
        let frozen = hv.vm_settings(&id).await.unwrap().snapshots.len().min(2);
        let expected = if frozen == 0 { 2 } else { 4 };
        assert_eq!(
            chain.len(),
            expected,
            "overlay (frozen images) then template"
        );
        assert_eq!(Path::new(&chain.last().unwrap().filename), canon_template);
        assert_eq!(chain[0].backing_filename_format.as_deref(), Some("qcow2"));
        let on_disk =
            unacloud_core::provision::allocated_bytes(Path::new(&chain[0].filename)).unwrap();
        assert!(
            on_disk < 1 << 20,
            "overlay of {} uses {on_disk} bytes",
            vm.name
        );
        let set = hv.vm_files(&id).await.unwrap();
        assert_eq!(
            set.files.len(),
            expected,
            "settings and the VM's own images"
        );
        assert_eq!(set.files[0].role, FileRole::Settings);
        assert!(set.files.iter().all(|f| f.path != canon_template));
        assert_eq!(set.expected_at_destination.len(), 1);
        assert_eq!(set.expected_at_destination[0].uuid, t.uuid.to_string());
    }

    // The template cannot go while VMs use it.
    match m.unregister_template(&tref, false).await {
        Err(Error::InUse { users, .. }) => assert_eq!(users.len(), 50),
        other => panic!("expected InUse, got {other:?}"),
    }

    // A VM whose disk has no boot loader and no kernel cannot boot; a GUI start is
    // refused by this headless backend.
    let id = VmId::new("vm-01");
    assert!(matches!(
        hv.start_vm(&id, StartMode::Gui).await,
        Err(Error::Unsupported { .. })
    ));

    // A reopened backend sees the same state.
    drop(hv);
    let hv = QemuHypervisor::open(dir.path().join("host")).await.unwrap();
    assert_eq!(hv.list_vms().await.unwrap().len(), 50);
    let m = MultiattachManager::new(&hv);
    for i in 0..50 {
        m.delete_vm(&VmId::new(format!("vm-{i:02}"))).await.unwrap();
    }
    assert!(hv.list_vms().await.unwrap().is_empty());
    let leftovers = provision_support::files_below(&dir.path().join("host/vms"));
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        checksum_file(&template, ChecksumAlgorithm::Blake3).unwrap(),
        before
    );
    m.unregister_template(&tref, false).await.unwrap();
    assert!(template.exists(), "unregistering keeps the file");
}

#[tokio::test]
async fn corrupt_registry_and_settings_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("registry.json"), b"{ not json").unwrap();
    match QemuHypervisor::open(&root).await {
        Err(Error::Corrupt { what, .. }) => assert_eq!(what, "QEMU backend registry"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let hv = QemuHypervisor::open(dir.path().join("other"))
        .await
        .unwrap();
    let bad = dir.path().join("bad.vm.json");
    std::fs::write(&bad, br#"{"format": "something else"}"#).unwrap();
    assert!(matches!(
        hv.register_vm(&bad).await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        hv.create_vm(&VmSpec::new("../escape", HardwareProfile::Small))
            .await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        hv.register_disk(&dir.path().join("missing.qcow2")).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn missing_qemu_img_is_reported_as_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let img = unacloud_core::qemu::QemuImg::new().with_program(dir.path().join("no-qemu-img"));
    match img.version().await {
        Err(Error::Unsupported { reason, .. }) => assert!(reason.contains("qemu-utils")),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

/// A QEMU host under `dir` with one small VM `name` on a fresh multiattach template
/// (`make_template(dir, "base", virtual_size, data_bytes)`); returns the host, the
/// template's file and the VM.
async fn host_with_vm_on_template(
    dir: &Path,
    name: &str,
    virtual_size: u64,
    data_bytes: usize,
) -> (QemuHypervisor, PathBuf, VmId) {
    let template = make_template(dir, "base", virtual_size, data_bytes).await;
    let hv = QemuHypervisor::open(dir.join("host")).await.unwrap();
    {
        let m = MultiattachManager::new(&hv);
        let t = m.register_template(&template).await.unwrap();
        m.create_vm(
            &VmSpec::new(name, HardwareProfile::Small),
            &DiskRef::Uuid(t.uuid),
        )
        .await
        .unwrap();
    }
    (hv, template, VmId::new(name))
}

#[tokio::test]
async fn vm_files_follow_the_real_backing_chain() {
    require_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let (hv, template, id) = host_with_vm_on_template(dir.path(), "TM", 8 << 20, 1 << 20).await;
    let set = hv.vm_files(&id).await.unwrap();
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    assert_eq!(set.files.len(), 2);
    assert_eq!(
        set.expected_at_destination[0].path.as_deref(),
        Some(std::fs::canonicalize(&template).unwrap().as_path())
    );

    // The template vanishes (a host lost its store): the chain cannot be opened; the
    // VM's own files are still listed and the problem is reported, not hidden.
    let moved = dir.path().join("moved.qcow2");
    std::fs::rename(&template, &moved).unwrap();
    let set = hv.vm_files(&id).await.unwrap();
    assert_eq!(set.files.len(), 2);
    assert!(
        set.warnings.iter().any(|w| w.contains("cannot inspect")),
        "{:?}",
        set.warnings
    );
    assert_eq!(set.expected_at_destination.len(), 1);
    std::fs::rename(&moved, &template).unwrap();
}

/// Number of qcow2 images below `dir`.
fn walk_qcow2(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += walk_qcow2(&p);
        } else if p.extension().is_some_and(|x| x == "qcow2") {
            n += 1;
        }
    }
    n
}

#[derive(Debug, Clone)]
enum SnapOp {
    Take,
    Restore(usize),
    Delete(usize),
}

fn snap_op() -> impl proptest::strategy::Strategy<Value = SnapOp> {
    use proptest::prelude::*;
    prop_oneof![
        3 => Just(SnapOp::Take),
        1 => (0usize..8).prop_map(SnapOp::Restore),
        1 => (0usize..8).prop_map(SnapOp::Delete),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

    /// Any sequence of take / restore / delete on a real qcow2 overlay keeps the tree
    /// the backend reports equal to a simple model, and the image's own snapshot list
    /// equal to the model's snapshots.
    #[test]
    fn snapshot_tree_matches_a_model(ops in proptest::collection::vec(snap_op(), 1..9)) {
        require_qemu_img();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (hv, _, id) = host_with_vm_on_template(dir.path(), "p", 4 << 20, 64 << 10).await;
            // Model: (tag, parent) in creation order, and the current snapshot.
            let mut model: Vec<(String, Option<String>)> = Vec::new();
            let mut current: Option<String> = None;
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    SnapOp::Take => {
                        let s = hv.take_snapshot(&id, &format!("s{i}"), None, false).await.unwrap();
                        model.push((s.id.clone(), current.clone()));
                        current = Some(s.id);
                    }
                    SnapOp::Restore(k) if !model.is_empty() => {
                        let tag = model[k % model.len()].0.clone();
                        hv.restore_snapshot(&id, &tag).await.unwrap();
                        current = Some(tag);
                    }
                    SnapOp::Delete(k) if !model.is_empty() => {
                        let (tag, parent) = model.remove(k % model.len());
                        hv.delete_snapshot(&id, &tag).await.unwrap();
                        for (_, p) in &mut model {
                            if p.as_deref() == Some(tag.as_str()) {
                                *p = parent.clone();
                            }
                        }
                        if current.as_deref() == Some(tag.as_str()) {
                            current = parent;
                        }
                    }
                    _ => {}
                }
                let tree = hv.snapshot_tree(&id).await.unwrap();
                assert_eq!(tree.len(), model.len());
                for (tag, parent) in &model {
                    let n = tree.find_by_id(tag).unwrap();
                    let got = tree.parent(n).and_then(|p| tree.get(p)).map(|s| s.id.clone());
                    assert_eq!(&got, parent, "parent of {tag}");
                }
                let cur = tree.current().and_then(|c| tree.get(c)).map(|s| s.id.clone());
                assert_eq!(cur, current);
                // On disk: the current overlay, then one frozen image per snapshot from
                // the current one up to its root, then the template; and exactly one
                // image per snapshot plus the current overlay in the VM's folder.
                let chains = hv.backing_chains(&id).await.unwrap();
                let mut depth = 0;
                let mut at = current.clone();
                while let Some(t) = at {
                    depth += 1;
                    at = model.iter().find(|(m, _)| *m == t).and_then(|(_, p)| p.clone());
                }
                assert_eq!(chains[0].len(), depth + 2, "{:?}", chains[0]);
                let folder = hv.vm_info(&id).await.unwrap().settings_file.unwrap().parent().unwrap().to_path_buf();
                let images = walk_qcow2(&folder);
                assert_eq!(images, model.len() + 1, "images in {}", folder.display());
            }
        });
    }
}

#[tokio::test]
async fn deleting_a_middle_snapshot_moves_its_children_up() {
    require_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let (hv, _, id) = host_with_vm_on_template(dir.path(), "p", 4 << 20, 64 << 10).await;
    let a = hv.take_snapshot(&id, "a", None, false).await.unwrap();
    let b = hv.take_snapshot(&id, "b", None, false).await.unwrap();
    let c = hv.take_snapshot(&id, "c", None, false).await.unwrap();
    hv.delete_snapshot(&id, "b").await.unwrap();
    let tree = hv.snapshot_tree(&id).await.unwrap();
    let (na, nc) = (
        tree.find_by_id(&a.id).unwrap(),
        tree.find_by_id(&c.id).unwrap(),
    );
    assert!(tree.find_by_id(&b.id).is_none());
    assert_eq!(tree.parent(nc), Some(na));
    assert_eq!(tree.current(), Some(nc));
    // Deleting the current snapshot moves the current state up to its parent.
    hv.delete_snapshot(&id, &c.id).await.unwrap();
    let tree = hv.snapshot_tree(&id).await.unwrap();
    assert_eq!(
        tree.current()
            .and_then(|n| tree.get(n))
            .map(|s| s.id.clone()),
        Some(a.id)
    );
}

#[tokio::test]
async fn image_requirements_are_read_from_real_settings() {
    use unacloud_core::provision::catalog::{
        check_requirements, ImageSettings, RequirementPolicy, RequirementStatus,
    };
    let dir = tempfile::tempdir().unwrap();
    let hv = QemuHypervisor::open(dir.path().join("host")).await.unwrap();
    let mut spec = VmSpec::new("bridged", HardwareProfile::Small);
    spec.os_type = Some("Ubuntu_64".into());
    spec.bridge_adapter = Some("eth0".into());
    let info = hv.create_vm(&spec).await.unwrap();
    let nat = hv
        .create_vm(&VmSpec::new("nat", HardwareProfile::Small))
        .await
        .unwrap();
    let policy = RequirementPolicy {
        supported_os: vec!["Ubuntu_64".into()],
        hypervisor_version: None,
    };
    let status = |file: &Path, name: &str| {
        let s = unacloud_core::qemu::VmSettings::load(file).unwrap();
        check_requirements(&ImageSettings::from_qemu_settings(&s), &policy)
            .into_iter()
            .find(|r| r.name == name)
            .unwrap()
            .status
    };
    let bridged_file = info.settings_file.unwrap();
    let nat_file = nat.settings_file.unwrap();
    assert_eq!(
        status(&bridged_file, "bridged-adapter"),
        RequirementStatus::Met
    );
    assert_eq!(
        status(&bridged_file, "supported-os"),
        RequirementStatus::Met
    );
    assert!(matches!(
        status(&nat_file, "bridged-adapter"),
        RequirementStatus::NotMet(_)
    ));
    assert!(matches!(
        status(&nat_file, "supported-os"),
        RequirementStatus::Unknown(_)
    ));
}

/// A caller killed between writing its intent and finishing (here: the intent of a
/// snapshot and the overlay it had created are on disk, nothing else): the next open
/// rolls it back, removes the half-made file and leaves the VM as it was.
#[tokio::test]
async fn an_interrupted_snapshot_is_rolled_back_on_the_next_open() {
    require_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let (hv, _template, id) = host_with_vm_on_template(dir.path(), "TM", 4 << 20, 64 << 10).await;
    let keep = hv.take_snapshot(&id, "kept", None, false).await.unwrap();
    let info = hv.vm_info(&id).await.unwrap();
    let settings_file = info.settings_file.unwrap();
    let folder = settings_file.parent().unwrap().to_path_buf();
    let before = hv.vm_settings(&id).await.unwrap();
    drop(hv);

    // What a killed take_snapshot leaves: the pending record and a new overlay.
    let half = std::path::PathBuf::from("Snapshots/{00000000-0000-4000-8000-00000000abcd}.qcow2");
    unacloud_core::qemu::QemuImg::new()
        .create(&folder.join(&half), "qcow2", 4 << 20)
        .await
        .unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&settings_file).unwrap()).unwrap();
    json["pending"] = serde_json::json!({"op": "snapshot", "tag": "uc-half", "new_files": [half]});
    std::fs::write(&settings_file, serde_json::to_vec(&json).unwrap()).unwrap();

    let hv = QemuHypervisor::open(dir.path().join("host")).await.unwrap();
    let after = hv.vm_settings(&id).await.unwrap();
    assert!(after.pending.is_none());
    assert!(
        !folder.join(&half).exists(),
        "the half-made overlay was left"
    );
    assert_eq!(after.disks, before.disks);
    assert_eq!(after.snapshots, before.snapshots);
    hv.restore_snapshot(&id, &keep.id).await.unwrap();

    // A settings file naming a file outside its folder is refused, never acted on.
    drop(hv);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&settings_file).unwrap()).unwrap();
    json["pending"] = serde_json::json!({"op": "snapshot", "new_files": ["../../../etc/passwd"]});
    std::fs::write(&settings_file, serde_json::to_vec(&json).unwrap()).unwrap();
    assert!(matches!(
        unacloud_core::qemu::VmSettings::load(&settings_file),
        Err(Error::Corrupt { .. })
    ));
}

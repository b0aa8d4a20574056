//! The template catalog: versions, life cycle, usage records, atomic persistence.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use proptest::prelude::*;
use unacloud_core::model::DiskFormat;
use unacloud_core::provision::catalog::{
    checksum_file, Catalog, ChecksumAlgorithm, ContentHasher, ImageSettings, NewTemplate,
    RequirementStatus, TemplateStatus,
};
use unacloud_core::Error;

fn image(dir: &Path, name: &str, content: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn bridged() -> ImageSettings {
    ImageSettings {
        os_type: Some("Ubuntu_64".into()),
        bridged_adapter: Some(true),
        guest_additions_version: None,
    }
}

fn new(name: &str, img: &Path) -> NewTemplate {
    let mut n = NewTemplate::new(name, "Ubuntu 16.04", DiskFormat::Qcow2, img);
    n.settings = bridged();
    n
}

#[test]
fn versions_statuses_and_usage() {
    let dir = tempfile::tempdir().unwrap();
    let img1 = image(dir.path(), "a.qcow2", b"version one");
    let img2 = image(dir.path(), "b.qcow2", b"version two");
    let path = dir.path().join("catalog.json");
    let mut c = Catalog::open(&path).unwrap();
    let v1 = c.add_draft(new("ubuntu", &img1)).unwrap();
    assert_eq!(v1, 1);
    let t1 = c.get("ubuntu", 1).unwrap().clone();
    assert_eq!(t1.status, TemplateStatus::Draft);
    assert_eq!(t1.size_bytes, 11);
    assert_eq!(t1.file_name, "ubuntu-1.qcow2");
    assert_eq!(
        t1.checksum,
        checksum_file(&img1, ChecksumAlgorithm::Blake3).unwrap()
    );
    // Drafts cannot be used.
    assert!(matches!(
        c.record_use("ubuntu", 1, "pc-1", "TM"),
        Err(Error::InvalidState { .. })
    ));
    c.publish("ubuntu", 1).unwrap();
    c.record_use("ubuntu", 1, "pc-1", "TM").unwrap();
    c.record_use("ubuntu", 1, "pc-2", "RTP").unwrap();

    // Publishing version 2 does not move the VMs built from version 1.
    let v2 = c.add_draft(new("ubuntu", &img2)).unwrap();
    assert_eq!(v2, 2);
    c.publish("ubuntu", 2).unwrap();
    assert_eq!(c.latest_published("ubuntu").unwrap().version, 2);
    assert_eq!(c.version_of("pc-1", "TM").unwrap().version, 1);
    assert_eq!(c.users("ubuntu", 1).len(), 2);
    assert!(c.users("ubuntu", 2).is_empty());
    // A VM is built from one version only.
    assert!(c.record_use("ubuntu", 2, "pc-1", "TM").is_err());

    // Removing a version in use is refused with the VMs.
    match c.remove_version("ubuntu", 1) {
        Err(Error::InUse { id, users }) => {
            assert_eq!(id, "ubuntu@1");
            assert_eq!(users, ["TM on pc-1", "RTP on pc-2"]);
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    // Deprecated: kept for its VMs, not for new ones.
    c.deprecate("ubuntu", 1).unwrap();
    assert!(c.record_use("ubuntu", 1, "pc-3", "new").is_err());
    c.release_use("pc-1", "TM").unwrap();
    c.release_use("pc-2", "RTP").unwrap();
    c.remove_version("ubuntu", 1).unwrap();
    assert!(matches!(c.get("ubuntu", 1), Err(Error::NotFound { .. })));

    // Everything survived on disk.
    let again = Catalog::open(&path).unwrap();
    assert_eq!(again.templates().len(), 1);
    assert_eq!(
        again.get("ubuntu", 2).unwrap().status,
        TemplateStatus::Published
    );
}

#[test]
fn requirements_block_publishing_when_known_to_fail() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "nat.qcow2", b"x");
    let mut c = Catalog::open(dir.path().join("c.json")).unwrap();
    let mut n = new("nat-only", &img);
    n.settings.bridged_adapter = Some(false);
    let v = c.add_draft(n).unwrap();
    let t = c.get("nat-only", v).unwrap();
    let bridged = t
        .requirements
        .iter()
        .find(|r| r.name == "bridged-adapter")
        .unwrap();
    assert!(matches!(bridged.status, RequirementStatus::NotMet(_)));
    // SSH and superuser cannot be known from settings: reported, not guessed.
    assert!(t
        .requirements
        .iter()
        .any(|r| r.name == "remote-access" && matches!(r.status, RequirementStatus::Unknown(_))));
    match c.publish("nat-only", v) {
        Err(e @ Error::InvalidState { .. }) => assert!(e.to_string().contains("bridged")),
        other => panic!("expected InvalidState, got {other:?}"),
    }
}

#[test]
fn corrupt_catalog_is_an_error_and_the_good_copy_survives() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.qcow2", b"abc");
    let path = dir.path().join("catalog.json");
    let mut c = Catalog::open(&path).unwrap();
    let v = c.add_draft(new("t", &img)).unwrap();
    c.publish("t", v).unwrap(); // second write: the first is now catalog.json.bak
    let good = std::fs::read(&path).unwrap();

    // Damage the file as a crash in a non-atomic writer would.
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    match Catalog::open(&path) {
        Err(Error::Corrupt { backup, what, .. }) => {
            assert_eq!(what, "template catalog");
            assert_eq!(backup.unwrap(), dir.path().join("catalog.json.bak"));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Opening did not touch anything.
    assert_eq!(std::fs::read(&path).unwrap().len(), good.len() / 2);

    // Recover from the backup: the draft is there (the publish was the lost write).
    let mut r = Catalog::recover(&path).unwrap();
    assert_eq!(r.get("t", v).unwrap().status, TemplateStatus::Draft);
    r.publish("t", v).unwrap();
    assert!(dir.path().join("catalog.json.corrupt").exists());
    let reopened = Catalog::open(&path).unwrap();
    assert_eq!(
        reopened.get("t", v).unwrap().status,
        TemplateStatus::Published
    );
}

#[test]
fn bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Catalog::open(dir.path().join("c.json")).unwrap();
    assert!(matches!(
        c.add_draft(new("a/b", &dir.path().join("x"))),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        c.add_draft(new("ok", &dir.path().join("missing"))),
        Err(Error::Io { .. })
    ));
    assert!(c.templates().is_empty());
    assert!(
        !dir.path().join("c.json").exists(),
        "failed adds write nothing"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The streaming hash does not depend on how the content is cut into chunks.
    #[test]
    fn streaming_checksum_ignores_chunking(data in proptest::collection::vec(any::<u8>(), 0..5000), cuts in proptest::collection::vec(0usize..5000, 0..8)) {
        for alg in [ChecksumAlgorithm::Blake3, ChecksumAlgorithm::Sha256] {
            let mut whole = ContentHasher::new(alg);
            whole.update(&data);
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
            cuts.sort_unstable();
            let mut parts = ContentHasher::new(alg);
            let mut last = 0;
            for c in cuts.into_iter().chain([data.len()]) {
                parts.update(&data[last..c]);
                last = c;
            }
            prop_assert_eq!(whole.finish(), parts.finish());
        }
    }

    /// Whatever sequence of uses and releases, a version can be removed exactly when no
    /// VM uses it, and the file on disk always reopens to the same state.
    #[test]
    fn removal_is_refused_exactly_while_used(ops in proptest::collection::vec((0u8..3, 0usize..4, 0usize..3), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), "i.qcow2", b"img");
        let path = dir.path().join("c.json");
        let mut c = Catalog::open(&path).unwrap();
        for _ in 0..2 {
            let v = c.add_draft(new("t", &img)).unwrap();
            c.publish("t", v).unwrap();
        }
        let mut model: std::collections::BTreeMap<String, u32> = Default::default();
        for (op, vm, ver) in ops {
            let vm_name = format!("vm{vm}");
            let version = (ver % 2) as u32 + 1;
            match op {
                0 => {
                    let r = c.record_use("t", version, "h", &vm_name);
                    match model.get(&vm_name) {
                        Some(v) if *v != version => prop_assert!(r.is_err()),
                        _ => { prop_assert!(r.is_ok()); model.insert(vm_name, version); }
                    }
                }
                1 => { c.release_use("h", &vm_name).unwrap(); model.remove(&vm_name); }
                _ => {
                    let used = model.values().any(|v| *v == version);
                    let exists = c.get("t", version).is_ok();
                    let r = c.remove_version("t", version);
                    prop_assert_eq!(r.is_ok(), exists && !used);
                    if r.is_ok() {
                        // Put it back as a new version number so later ops have targets.
                        let v = c.add_draft(new("t", &img)).unwrap();
                        c.publish("t", v).unwrap();
                        prop_assert!(v > 2);
                        break;
                    }
                }
            }
            let re = Catalog::open(&path).unwrap();
            prop_assert_eq!(re.templates(), c.templates());
        }
    }
}

//! `verify` and `copy_to`: a broken chain is found before anything is copied, copies
//! keep the machine folder's structure, and nothing lands outside the destination.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;

use unacloud_core::files::FileRole;
use unacloud_vbox::copy::CopyOptions;
use unacloud_vbox::synth::{generate, FileSizes, SettingsStyle, SynthSpec, TreeShape};
use unacloud_vbox::tracker::{Machine, MigrationOptions};
use unacloud_vbox::vdi::{ChainProblem, VdiHeader};
use unacloud_vbox::Error;

fn machine_on_disk(
    dir: &Path,
    style: SettingsStyle,
) -> (Machine, unacloud_vbox::synth::SynthMachine) {
    let spec = SynthSpec {
        snapshots: 6,
        disks: 2,
        shape: TreeShape::Tree { branch_percent: 30 },
        style,
        seed: 7,
        ..SynthSpec::default()
    };
    let synth = generate(&spec);
    let vbox = synth.write_files(dir, &FileSizes::default()).unwrap();
    (Machine::load(&vbox, None).unwrap(), synth)
}

fn list(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn verified_sets_copy_with_their_folder_structure() {
    for style in [SettingsStyle::V1_16, SettingsStyle::V1_19] {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let (m, synth) = machine_on_disk(src.path(), style);
        let last = synth.snapshots.last().unwrap();
        let set = m
            .migration_set(&last.uuid.to_string(), &MigrationOptions::default())
            .unwrap();
        assert!(set.warnings.is_empty(), "{:?}", set.warnings);
        let report = m.verify(&set);
        assert!(report.is_ok(), "{:?}", report);
        assert_eq!(
            report.chain.headers.len(),
            set.files
                .iter()
                .filter(|f| f.role == FileRole::Disk)
                .count()
        );

        let mut calls = 0;
        let copied = m
            .copy_to(
                &last.uuid.to_string(),
                &MigrationOptions::default(),
                &dst.path().join("TM"),
                &CopyOptions::default().checksum(true),
                |_| calls += 1,
            )
            .unwrap();
        assert_eq!(copied.files.len(), set.files.len());
        assert!(calls > 0);
        let mut expected: Vec<String> = set
            .files
            .iter()
            .map(|f| {
                f.path
                    .strip_prefix(src.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        expected.sort();
        assert_eq!(list(&dst.path().join("TM")), expected);
        // The copy is a machine again, and its chain still verifies.
        let copy = Machine::load(dst.path().join("TM").join(&synth.settings_file), None).unwrap();
        let set2 = copy
            .migration_set(&last.uuid.to_string(), &MigrationOptions::default())
            .unwrap();
        assert!(set2.warnings.is_empty());
        assert!(copy.verify(&set2).is_ok());
    }
}

#[test]
fn a_broken_chain_is_reported_before_any_copy() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let (m, synth) = machine_on_disk(src.path(), SettingsStyle::V1_19);
    let last = synth.snapshots.last().unwrap();
    let set = m
        .migration_set(&last.uuid.to_string(), &MigrationOptions::default())
        .unwrap();
    let diffs: Vec<_> = set
        .files
        .iter()
        .filter(|f| f.role == FileRole::Disk && f.path.to_string_lossy().contains("Snapshots"))
        .collect();
    assert!(diffs.len() >= 2);
    // One differencing image now names a stranger as parent; another is gone.
    let bad = &diffs[0];
    let h = VdiHeader::read(&bad.path).unwrap();
    let stranger = uuid::Uuid::from_u128(0x1234);
    let forged = VdiHeader::new_differencing(h.disk_size, h.uuid, stranger, uuid::Uuid::nil());
    let mut bytes = fs::read(&bad.path).unwrap();
    bytes[..512].copy_from_slice(&forged.encode());
    fs::write(&bad.path, bytes).unwrap();
    fs::remove_file(&diffs[1].path).unwrap();

    let report = m.verify(&set);
    assert_eq!(
        report.chain.problems.len(),
        2,
        "{:?}",
        report.chain.problems
    );
    assert!(report.chain.problems.iter().any(
        |p| matches!(p, ChainProblem::ParentMismatch { found: Some(f), .. } if *f == stranger)
    ));
    assert!(report
        .chain
        .problems
        .iter()
        .any(|p| matches!(p, ChainProblem::Missing { .. })));
    match m.copy_set_to(&set, dst.path(), &CopyOptions::default(), |_| {}) {
        Err(Error::BrokenChain { problems }) => assert_eq!(problems.len(), 2),
        other => panic!("expected a broken chain, got {other:?}"),
    }
    assert!(list(dst.path()).is_empty(), "nothing may be written");
}

#[test]
fn locations_outside_the_machine_folder_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let vmdir = tmp.path().join("vm");
    fs::create_dir_all(vmdir.join("Snapshots")).unwrap();
    let secret = tmp.path().join("secret.vdi");
    let base = uuid::Uuid::from_u128(0xb);
    VdiHeader::new_base(1 << 20, base)
        .write_empty_image(&secret)
        .unwrap();
    let xml = format!(
        r#"<VirtualBox version="1.19-linux"><Machine uuid="{{{}}}" name="H" OSType="Linux">
        <MediaRegistry><HardDisks><HardDisk uuid="{{{base}}}" location="../secret.vdi" format="VDI" type="Normal"/></HardDisks></MediaRegistry>
        <Hardware><StorageControllers><StorageController name="S" type="AHCI" PortCount="1">
        <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{{{base}}}"/></AttachedDevice>
        </StorageController></StorageControllers></Hardware></Machine></VirtualBox>"#,
        uuid::Uuid::from_u128(1)
    );
    let vbox = vmdir.join("H.vbox");
    fs::write(&vbox, xml).unwrap();
    let m = Machine::load(&vbox, None).unwrap();
    let dst = tmp.path().join("dst");
    let err = m
        .copy_to(
            "current",
            &MigrationOptions::default(),
            &dst,
            &CopyOptions::default(),
            |_| {},
        )
        .unwrap_err();
    assert!(matches!(err, Error::CopyRefused { .. }), "{err:?}");
    assert!(err.to_string().contains("secret.vdi"), "{err}");
    assert!(!dst.join("H.vbox").exists());
    // Preloading the image at the destination makes the copy possible.
    let pre = MigrationOptions::default().with_preloaded([base]);
    let r = m
        .copy_to("current", &pre, &dst, &CopyOptions::default(), |_| {})
        .unwrap();
    assert_eq!(r.files.len(), 1);
    assert!(dst.join("H.vbox").is_file());
}

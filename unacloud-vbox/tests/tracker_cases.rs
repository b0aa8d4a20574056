//! The file tracker on the thesis's worked example and on hand-built machines that
//! the real fixtures do not cover (multiattach, immutable, several disks with
//! snapshots, templates registered globally).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;

use common::{global_xml, thesis_example, uuid, Disk, Snap, VboxDoc};
use proptest::prelude::*;
use unacloud_core::files::FileRole;
use unacloud_vbox::settings::{GlobalRegistry, MachineSettings};
use unacloud_vbox::tracker::{Machine, MigrationOptions, TreeFormat};
use unacloud_vbox::Error;

const GB: u64 = 1_000_000_000;

/// Creates a sparse file of `len` bytes (and its folder).
fn sparse(path: &Path, len: u64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::File::create(path).unwrap().set_len(len).unwrap();
}

/// Rounds to hundredths of a GB, as the thesis's tables do.
fn gb2(bytes: u64) -> f64 {
    (bytes as f64 / GB as f64 * 100.0).round() / 100.0
}

/// A base image (no parent) of type `disk_type`.
fn base_disk(uuid: String, location: impl Into<String>, disk_type: &'static str) -> Disk {
    Disk {
        uuid,
        location: location.into(),
        disk_type: Some(disk_type),
        parent: None,
        auto_reset: false,
    }
}

/// A differencing image whose parent is disk number `parent` of the same registry.
fn diff_disk(uuid: String, location: impl Into<String>, parent: usize) -> Disk {
    Disk {
        uuid,
        location: location.into(),
        disk_type: None,
        parent: Some(parent),
        auto_reset: false,
    }
}

/// The machine `doc` describes, as if its settings file were at `path`, without a
/// global registry.
fn machine(doc: &VboxDoc, path: &str) -> Machine {
    Machine::from_settings(
        MachineSettings::parse_str(&doc.to_xml()).unwrap(),
        path,
        None,
    )
    .unwrap()
}

/// Options that list the files without measuring their sizes.
fn unmeasured() -> MigrationOptions {
    MigrationOptions {
        measure_sizes: false,
        ..Default::default()
    }
}

fn write_machine(dir: &Path, doc: &VboxDoc) -> std::path::PathBuf {
    let path = dir.join(format!("{}.vbox", doc.name));
    fs::create_dir_all(dir).unwrap();
    fs::write(&path, doc.to_xml()).unwrap();
    path
}

#[test]
fn the_thesis_worked_example_comes_out_right() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("TM");
    let doc = thesis_example();
    let vbox = write_machine(&dir, &doc);
    // Base 3.51 GB, each differencing image 0.125 GB, each .sav 0.25 GB, all sparse.
    for (i, d) in doc.disks.iter().enumerate() {
        sparse(
            &dir.join(&d.location),
            if i == 0 { 351 * GB / 100 } else { GB / 8 },
        );
    }
    for s in &doc.snaps {
        sparse(&dir.join(s.state_file.as_ref().unwrap()), GB / 4);
    }
    let m = Machine::load(&vbox, None).unwrap();

    let all = m.all_files();
    assert_eq!(all.files.len(), 10);
    assert_eq!(all.expected_count, 10, "Eq. 5.4 with d = 1, s = 4");
    assert_eq!(gb2(all.total_bytes()), 5.01);
    assert!(all.warnings.is_empty(), "{:?}", all.warnings);

    let s4 = m
        .migration_set("Snapshot 4", &MigrationOptions::default())
        .unwrap();
    assert_eq!(s4.files.len(), 6);
    assert_eq!(gb2(s4.total_bytes()), 4.14);
    let roles: Vec<_> = s4.files.iter().map(|f| f.role).collect();
    assert_eq!(
        roles,
        [
            FileRole::Settings,
            FileRole::Disk,
            FileRole::Disk,
            FileRole::Disk,
            FileRole::Disk,
            FileRole::SavedState
        ]
    );
    // Base first, up to the image snapshot 4 froze.
    let disk_uuids: Vec<_> = s4.files.iter().filter_map(|f| f.uuid.clone()).collect();
    assert_eq!(
        disk_uuids,
        (0..4).map(|i| uuid(0xd15c, i)).collect::<Vec<_>>()
    );
    assert!(s4.files[5]
        .path
        .ends_with(doc.snaps[3].state_file.as_ref().unwrap()));

    // The older .sav files and the current state's image are what it leaves behind.
    let left = m
        .files_not_needed_for("Snapshot 4", &MigrationOptions::default())
        .unwrap();
    assert_eq!(left.len(), 4);
    assert_eq!(gb2(left.iter().filter_map(|f| f.bytes).sum()), 0.88);

    // With the base preloaded as a multiattach template only 0.63 GB move.
    let base = doc.disks[0].uuid.parse().unwrap();
    let pre = MigrationOptions::default().with_preloaded([base]);
    let s4p = m.migration_set(&doc.snaps[3].uuid, &pre).unwrap();
    assert_eq!(s4p.files.len(), 5);
    assert_eq!(gb2(s4p.total_bytes()), 0.63);
    assert_eq!(s4p.expected_at_destination.len(), 1);
    assert_eq!(s4p.expected_at_destination[0].uuid, doc.disks[0].uuid);
    assert_eq!(
        s4p.expected_at_destination[0].path.as_deref(),
        Some(dir.join("TM.vdi").as_path())
    );
    // Nothing is orphaned in this machine.
    assert!(m.unneeded_files().is_empty());
}

#[test]
fn the_worked_example_parses_alike_in_every_layout() {
    for (version, ns) in [
        (
            "1.12-windows",
            Some("http://www.innotek.de/VirtualBox-settings"),
        ),
        ("1.15-linux", Some("http://www.virtualbox.org/")),
        ("1.16-windows", None),
        ("1.17-linux", Some("http://www.virtualbox.org/")),
        ("1.19-windows", None),
    ] {
        let doc = VboxDoc {
            version,
            namespace: ns,
            ..thesis_example()
        };
        let m = machine(&doc, "/vms/TM/TM.vbox");
        let set = m.migration_set("Snapshot 4", &unmeasured()).unwrap();
        assert_eq!(set.files.len(), 6, "{version}");
        assert!(set.warnings.is_empty());
        assert_eq!(m.settings().snapshots[3].hardware.cpu_count, 1);
        assert_eq!(
            m.settings().hardware.network_adapters[0].attachment.mode(),
            "bridged"
        );
    }
}

#[test]
fn missing_files_are_reported_one_by_one() {
    let tmp = tempfile::tempdir().unwrap();
    let doc = thesis_example();
    let vbox = write_machine(tmp.path(), &doc);
    sparse(&tmp.path().join("TM.vdi"), 1000);
    let m = Machine::load(&vbox, None).unwrap();
    let set = m
        .migration_set("Snapshot 2", &MigrationOptions::default())
        .unwrap();
    assert_eq!(set.files.len(), 4);
    assert_eq!(set.missing().count(), 2);
    assert_eq!(set.warnings.len(), 2);
    assert!(set.warnings.iter().all(|w| w.starts_with("missing file")));
    assert_eq!(set.total_bytes(), 1000 + fs::metadata(&vbox).unwrap().len());
}

/// A template made multiattach in the machine's own registry: the VM attaches its own
/// differencing child, snapshots nest below that child.
fn multiattach_doc() -> VboxDoc {
    let mut doc = VboxDoc::new("RTP");
    doc.disks = vec![
        base_disk(uuid(0x7e, 0), "../Templates/Ubuntu1604.vdi", "MultiAttach"),
        diff_disk(uuid(0x7e, 1), "RTP.vdi", 0),
        diff_disk(uuid(0x7e, 2), "Snapshots/{s1}.vdi", 1),
        diff_disk(uuid(0x7e, 3), "Snapshots/{s2}.vdi", 2),
    ];
    doc.snaps = vec![
        Snap {
            uuid: uuid(0x5, 1),
            name: "one".into(),
            state_file: Some("Snapshots/one.sav".into()),
            parent: None,
            attach: vec![("HardDisk", uuid(0x7e, 1))],
        },
        Snap {
            uuid: uuid(0x5, 2),
            name: "two".into(),
            state_file: Some("Snapshots/two.sav".into()),
            parent: Some(0),
            attach: vec![("HardDisk", uuid(0x7e, 2))],
        },
    ];
    doc.current = Some(1);
    doc.attach = vec![("HardDisk", uuid(0x7e, 3))];
    doc
}

#[test]
fn multiattach_templates_are_followed_or_expected_at_destination() {
    let doc = multiattach_doc();
    let m = machine(&doc, "/vms/RTP/RTP.vbox");
    let opts = unmeasured();
    let set = m.migration_set("two", &opts).unwrap();
    let paths: Vec<_> = set
        .files
        .iter()
        .map(|f| f.path.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        paths,
        [
            "/vms/RTP/RTP.vbox",
            "/vms/Templates/Ubuntu1604.vdi",
            "/vms/RTP/RTP.vdi",
            "/vms/RTP/Snapshots/{s1}.vdi",
            "/vms/RTP/Snapshots/two.sav"
        ]
    );
    assert_eq!(
        m.effective_disk_type(&uuid(0x7e, 3).parse().unwrap()),
        Some(unacloud_core::model::DiskType::MultiAttach)
    );
    let pre = MigrationOptions {
        preloaded: [uuid(0x7e, 0).parse().unwrap()].into(),
        ..opts.clone()
    };
    let set = m.migration_set("two", &pre).unwrap();
    assert_eq!(set.files.len(), 4);
    assert_eq!(set.expected_at_destination[0].uuid, uuid(0x7e, 0));
    // Preloading the VM's own child implies its ancestors are there too.
    let pre = MigrationOptions {
        preloaded: [uuid(0x7e, 1).parse().unwrap()].into(),
        ..opts
    };
    let set = m.migration_set("current", &pre).unwrap();
    let expected: Vec<_> = set
        .expected_at_destination
        .iter()
        .map(|e| e.uuid.clone())
        .collect();
    assert_eq!(expected, [uuid(0x7e, 0), uuid(0x7e, 1)]);
    assert_eq!(
        set.files.len(),
        3,
        "settings + two snapshot diffs; no saved state"
    );
}

#[test]
fn templates_registered_only_globally_need_the_global_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home/.config/VirtualBox");
    let vmdir = tmp.path().join("vms/TM");
    // The template and every differencing image below it live in VirtualBox.xml:
    // children are registered where their parent is.
    let global_disks = vec![
        base_disk(uuid(0x7e, 0), "Templates/Ubuntu1604.vdi", "MultiAttach"),
        diff_disk(
            uuid(0x7e, 1),
            vmdir.join("TM.vdi").to_string_lossy().into_owned(),
            0,
        ),
        diff_disk(
            uuid(0x7e, 2),
            vmdir
                .join("Snapshots/{a}.vdi")
                .to_string_lossy()
                .into_owned(),
            1,
        ),
    ];
    fs::create_dir_all(&home).unwrap();
    let gpath = home.join("VirtualBox.xml");
    fs::write(&gpath, global_xml(&global_disks)).unwrap();
    let mut doc = VboxDoc::new("TM");
    doc.snaps = vec![Snap {
        uuid: uuid(0x5, 1),
        name: "s1".into(),
        state_file: None,
        parent: None,
        attach: vec![("HardDisk", uuid(0x7e, 1))],
    }];
    doc.current = Some(0);
    doc.attach = vec![("HardDisk", uuid(0x7e, 2))];
    let vbox = write_machine(&vmdir, &doc);
    let opts = unmeasured();

    // Without the registry: reported, naming the uuid; strict makes it an error.
    let m = Machine::load(&vbox, None).unwrap();
    let set = m.migration_set("current", &opts).unwrap();
    assert_eq!(set.files.len(), 1);
    assert!(
        set.warnings[0].contains(&uuid(0x7e, 2)),
        "{:?}",
        set.warnings
    );
    assert!(set.external[0].contains(&uuid(0x7e, 2)));
    let strict = MigrationOptions {
        strict: true,
        ..opts.clone()
    };
    match m.migration_set("current", &strict) {
        Err(Error::UnresolvedDependency { uuid: u, .. }) => {
            assert_eq!(u.to_string(), uuid(0x7e, 2))
        }
        other => panic!("expected an unresolved dependency, got {other:?}"),
    }

    // With it: followed, and relative locations resolve against VirtualBox.xml's folder.
    let m = Machine::load(&vbox, Some(&gpath)).unwrap();
    let set = m.migration_set("current", &strict).unwrap();
    let paths: Vec<_> = set.files.iter().map(|f| f.path.clone()).collect();
    assert_eq!(
        paths,
        [
            vbox.clone(),
            home.join("Templates/Ubuntu1604.vdi"),
            vmdir.join("TM.vdi"),
            vmdir.join("Snapshots/{a}.vdi")
        ]
    );
    let pre = MigrationOptions {
        preloaded: [uuid(0x7e, 0).parse().unwrap()].into(),
        ..strict
    };
    let set = m.migration_set("s1", &pre).unwrap();
    assert_eq!(set.files.len(), 2);
    assert_eq!(
        set.expected_at_destination[0].path.as_deref(),
        Some(home.join("Templates/Ubuntu1604.vdi").as_path())
    );
    // all_files counts the global disks this machine uses, not the whole registry.
    assert_eq!(m.all_files().files.len(), 4);
}

#[test]
fn registries_that_disagree_are_refused() {
    // The machine says B is a child of A; the global registry says A is a child of B.
    let mut doc = VboxDoc::new("X");
    doc.disks = vec![
        base_disk(uuid(0xa, 0), "a.vdi", "Normal"),
        diff_disk(uuid(0xb, 0), "b.vdi", 0),
    ];
    doc.attach = vec![("HardDisk", uuid(0xb, 0))];
    let settings = MachineSettings::parse_str(&doc.to_xml()).unwrap();
    let g = GlobalRegistry::parse_str(
        &global_xml(&[
            base_disk(uuid(0xb, 0), "b.vdi", "Normal"),
            diff_disk(uuid(0xa, 0), "a.vdi", 0),
        ]),
        "/home/u/.config/VirtualBox",
    )
    .unwrap();
    match Machine::from_settings(settings.clone(), "/vms/X/X.vbox", Some(g)) {
        Err(Error::ParentCycle { uuid: u }) => {
            assert!([uuid(0xa, 0), uuid(0xb, 0)].contains(&u.to_string()))
        }
        other => panic!("expected a cycle, got {other:?}"),
    }
    // Same uuid under two different parents.
    let g = GlobalRegistry::parse_str(
        &global_xml(&[
            base_disk(uuid(0xc, 0), "c.vdi", "Normal"),
            diff_disk(uuid(0xb, 0), "b.vdi", 0),
        ]),
        "/g",
    )
    .unwrap();
    assert!(matches!(
        Machine::from_settings(settings, "/vms/X/X.vbox", Some(g)),
        Err(Error::DuplicateUuid { .. })
    ));
}

#[test]
fn immutable_disks_bring_their_base() {
    let mut doc = VboxDoc::new("I");
    doc.disks = vec![
        base_disk(uuid(0x1, 0), "base.vdi", "Immutable"),
        Disk {
            auto_reset: true,
            ..diff_disk(uuid(0x1, 1), "Snapshots/{r}.vdi", 0)
        },
    ];
    doc.attach = vec![("HardDisk", uuid(0x1, 1))];
    let s = MachineSettings::parse_str(&doc.to_xml()).unwrap();
    assert!(s.media.hard_disks[1].auto_reset);
    let m = Machine::from_settings(s, "/v/I/I.vbox", None).unwrap();
    let set = m.migration_set("current", &unmeasured()).unwrap();
    assert_eq!(set.files.len(), 3);
    assert_eq!(
        m.effective_disk_type(&uuid(0x1, 1).parse().unwrap()),
        Some(unacloud_core::model::DiskType::Immutable)
    );
}

/// Two disks, each with its own chain, two snapshots taken while running.
fn two_disk_doc() -> VboxDoc {
    let mut doc = VboxDoc::new("M");
    for disk in 0..2u32 {
        for gen in 0..3u32 {
            doc.disks.push(Disk {
                uuid: uuid(0xd0 + disk, gen),
                location: if gen == 0 {
                    format!("disk{disk}.vdi")
                } else {
                    format!("Snapshots/{{{}}}.vdi", uuid(0xd0 + disk, gen))
                },
                disk_type: (gen == 0).then_some("Normal"),
                parent: (gen > 0).then(|| (disk * 3 + gen - 1) as usize),
                auto_reset: false,
            });
        }
    }
    for s in 0..2u32 {
        doc.snaps.push(Snap {
            uuid: uuid(0x55, s),
            name: format!("s{s}"),
            state_file: Some(format!("Snapshots/s{s}.sav")),
            parent: s.checked_sub(1).map(|p| p as usize),
            attach: vec![
                ("HardDisk", uuid(0xd0, s)),
                ("HardDisk", uuid(0xd1, s)),
                ("DVD", uuid(0x150, 0)),
            ],
        });
    }
    doc.dvds = vec![(uuid(0x150, 0), "C:\\ISO\\ubuntu.iso".into())];
    doc.current = Some(1);
    doc.attach = vec![("HardDisk", uuid(0xd0, 2)), ("HardDisk", uuid(0xd1, 2))];
    doc
}

#[test]
fn several_disks_with_snapshots() {
    for version in ["1.16-linux", "1.18-windows"] {
        let doc = VboxDoc {
            version,
            ..two_disk_doc()
        };
        let m = machine(&doc, "/v/M/M.vbox");
        let all = m.all_files();
        assert_eq!((all.disks, all.snapshots), (2, 2));
        assert_eq!(
            all.files.len() as u64,
            all.expected_count,
            "Eq. 5.4: (2+1)(2+1) = 9"
        );
        let opts = unmeasured();
        let set = m.migration_set("s1", &opts).unwrap();
        let uuids: Vec<_> = set.files.iter().filter_map(|f| f.uuid.clone()).collect();
        assert_eq!(
            uuids,
            [uuid(0xd0, 0), uuid(0xd0, 1), uuid(0xd1, 0), uuid(0xd1, 1)]
        );
        assert_eq!(set.files.len(), 6);
        // The ISO is external by default, a file to copy on request.
        assert!(
            set.external[0].contains("C:/ISO/ubuntu.iso"),
            "{:?}",
            set.external
        );
        let with = MigrationOptions {
            include_removable: true,
            ..opts
        };
        let set = m.migration_set("s1", &with).unwrap();
        assert_eq!(set.files.len(), 7);
        assert!(set.external.is_empty());
    }
}

#[test]
fn orphaned_images_are_what_a_clean_up_may_delete() {
    let mut doc = thesis_example();
    doc.disks
        .push(base_disk(uuid(0x0f, 0), "old.vdi", "Normal"));
    doc.state_file = None;
    let m = machine(&doc, "/v/TM/TM.vbox");
    let unneeded = m.unneeded_files();
    assert_eq!(unneeded.len(), 1);
    assert_eq!(unneeded[0].uuid.as_deref(), Some(uuid(0x0f, 0).as_str()));
}

/// A random snapshot tree (`parents[i] < i`): snapshot `i` attaches image `i`, whose
/// parent image is that of the parent snapshot; image 0 is the base.
fn tree_doc(parents: &[usize], layout_old: bool) -> VboxDoc {
    let n = parents.len() + 1;
    let parent_of = |i: usize| (i > 0).then(|| parents[i - 1]);
    let mut doc = VboxDoc::new("P");
    if layout_old {
        doc.version = "1.15-windows";
        doc.namespace = Some("http://www.innotek.de/VirtualBox-settings");
    }
    for i in 0..n {
        doc.disks.push(Disk {
            uuid: uuid(0xd, i as u32),
            location: format!("Snapshots/{i}.vdi"),
            disk_type: (i == 0).then_some("Normal"),
            parent: parent_of(i),
            auto_reset: false,
        });
        doc.snaps.push(Snap {
            uuid: uuid(0x5, i as u32),
            name: format!("snap {}", i % 3), // names repeat on purpose
            state_file: (i % 2 == 0).then(|| format!("Snapshots/{i}.sav")),
            parent: parent_of(i),
            attach: vec![("HardDisk", uuid(0xd, i as u32))],
        });
    }
    // The current state: a differencing child of the last snapshot's image.
    doc.disks.push(Disk {
        uuid: uuid(0xd, n as u32),
        location: "Snapshots/now.vdi".into(),
        disk_type: None,
        parent: Some(n - 1),
        auto_reset: false,
    });
    doc.current = Some(n - 1);
    doc.attach = vec![("HardDisk", uuid(0xd, n as u32))];
    doc
}

fn arb_parents() -> impl Strategy<Value = Vec<usize>> {
    (0usize..40).prop_flat_map(|n| (0..n).map(|i| 0..=i).collect::<Vec<_>>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The migration set of snapshot k is exactly the settings, the images of the
    /// snapshots on k's path to the root (base first) and k's saved state.
    #[test]
    fn migration_set_is_exactly_the_chain(parents in arb_parents(), k_seed in any::<usize>(), old in any::<bool>()) {
        let doc = tree_doc(&parents, old);
        let m = machine(&doc, "/v/P/P.vbox");
        let n = parents.len() + 1;
        let k = k_seed % n;
        // Snapshot index k in `doc` corresponds to the snapshot with uuid(5, k).
        let set = m.migration_set(&uuid(0x5, k as u32), &unmeasured()).unwrap();
        let mut path = vec![k];
        while let Some(p) = (path[path.len() - 1] > 0).then(|| parents[path[path.len() - 1] - 1]) {
            path.push(p);
        }
        path.reverse();
        let expected: Vec<String> = path.iter().map(|&i| uuid(0xd, i as u32)).collect();
        let got: Vec<String> = set.files.iter().filter(|f| f.role == FileRole::Disk).filter_map(|f| f.uuid.clone()).collect();
        prop_assert_eq!(got, expected);
        prop_assert_eq!(set.files[0].role, FileRole::Settings);
        let savs: Vec<_> = set.files.iter().filter(|f| f.role == FileRole::SavedState).collect();
        prop_assert_eq!(savs.len(), usize::from(k % 2 == 0));
        // The snapshot tree has the same shape.
        let tree = m.snapshot_tree().unwrap();
        prop_assert_eq!(tree.len(), n);
        let node = tree.find_by_id(&uuid(0x5, k as u32)).unwrap();
        prop_assert_eq!(tree.depth(node) + 1, path.len());
        // Every file is needed by some state.
        prop_assert!(m.unneeded_files().is_empty());
        let all = m.all_files();
        prop_assert_eq!(all.files.len(), 1 + (n + 1) + n.div_ceil(2));
    }
}

#[test]
fn snapshot_tree_json_matches_the_core_shape_and_survives_deep_trees() {
    let doc = tree_doc(&[0, 1, 1, 0, 3], false);
    let m = machine(&doc, "/v/P/P.vbox");
    let ours: serde_json::Value =
        serde_json::from_str(&m.render_snapshot_tree(TreeFormat::Json).unwrap()).unwrap();
    let core = serde_json::to_value(m.snapshot_tree().unwrap().to_json()).unwrap();
    assert_eq!(ours, core);
    assert!(m
        .render_snapshot_tree(TreeFormat::Text)
        .unwrap()
        .contains(" *"));
    assert!(m
        .render_snapshot_tree(TreeFormat::Dot)
        .unwrap()
        .starts_with("digraph"));

    // 5,000 nested snapshots (20 times VirtualBox's own limit): parsing, the tree, the
    // set and the JSON need no recursion.
    let parents: Vec<usize> = (0..4_999).collect();
    let deep = tree_doc(&parents, false);
    let m = machine(&deep, "/v/P/P.vbox");
    assert_eq!(m.settings().snapshot_depth(), 5_000);
    let json = m.render_snapshot_tree(TreeFormat::Json).unwrap();
    assert!(json.ends_with(&"]}".repeat(5_001)));
    let set = m.migration_set("current", &unmeasured()).unwrap();
    assert_eq!(set.files.len(), 1 + 5_001);
    let mut opts = MigrationOptions::default();
    opts.preload(&format!("{{{}}}", uuid(0xd, 0).to_uppercase()))
        .unwrap();
    assert!(opts.preloaded.contains(&uuid(0xd, 0).parse().unwrap()));
    assert!(opts.preload("nope").is_err());
}

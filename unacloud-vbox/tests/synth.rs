#![allow(clippy::unwrap_used)]
//! The synthetic machine generator: its output has the structure of real VirtualBox
//! files, parses to what was generated, and works end to end (files on disk, migration
//! set, chain verification, copy).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use quick_xml::events::Event;
use unacloud_vbox::copy::{copy_files, CopyOptions};
use unacloud_vbox::settings::MachineSettings;
use unacloud_vbox::synth::{generate, FileSizes, SettingsStyle, SynthSpec, TreeShape};
use unacloud_vbox::tracker::{Machine, MigrationOptions};
use unacloud_vbox::vdi::{verify_chain, ChainLink};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures/vbox/");

/// Every `parent/child` element pair and `element@attribute` in a document.
fn shape(xml: &str) -> BTreeSet<String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<String> = Vec::new();
    let mut out = BTreeSet::new();
    loop {
        let event = reader.read_event().unwrap();
        let (e, opens) = match &event {
            Event::Start(e) => (e, true),
            Event::Empty(e) => (e, false),
            Event::End(_) => {
                stack.pop();
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
        let parent = stack.last().cloned().unwrap_or_default();
        out.insert(format!("{parent}/{name}"));
        for a in e.attributes() {
            let a = a.unwrap();
            let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
            out.insert(format!("{name}@{key}"));
        }
        if opens {
            stack.push(name);
        }
    }
    out
}

fn fixture_shapes(files: &[&str]) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(format!("{FIXTURES}{f}")).unwrap();
        all.extend(shape(&text));
    }
    all
}

#[test]
fn structure_matches_real_files() {
    // Every element nesting and attribute the generator writes also occurs in real
    // files VirtualBox wrote in that settings version.
    let real_119 = fixture_shapes(&[
        "Marvint-dev__Samba-AD__Debian.vbox",
        "joco-kad__teaching__kali-linux-2022.4-virtualbox-amd64.vbox",
        "joco-kad__teaching__Meta.vbox",
        "joco-kad__teaching__Win2012Server2.vbox",
    ]);
    let mut real_116 = fixture_shapes(&[
        "luiscidade17__VirtualBox__Ubuntu.vbox",
        "coderMaruf__arch-linux__Arch_Linux.vbox",
    ]);
    // The 1.16 files have a single snapshot; nesting is the same in every version
    // (XSD `TSnapshot`, and the 1.19 files).
    real_116.insert("Snapshot/Snapshots".into());
    real_116.insert("Snapshots/Snapshot".into());
    for (style, real) in [
        (SettingsStyle::V1_19, &real_119),
        (SettingsStyle::V1_16, &real_116),
    ] {
        let spec = SynthSpec {
            snapshots: 30,
            disks: 2,
            shape: TreeShape::Tree { branch_percent: 25 },
            machine_saved: true,
            style,
            ..SynthSpec::default()
        };
        let mut generated = shape(&generate(&spec).xml);
        // A snapshot description is written as a `<Description>` child (XSD
        // `TSnapshot`); none of the real files has one.
        assert!(generated.remove("Snapshot/Description"));
        let extra: Vec<_> = generated.difference(real).collect();
        assert!(extra.is_empty(), "{style:?}: not in real files: {extra:?}");
    }
}

#[test]
fn parses_to_what_was_generated() {
    for (shape, style, seed) in [
        (TreeShape::Chain, SettingsStyle::V1_19, 1),
        (
            TreeShape::Tree { branch_percent: 30 },
            SettingsStyle::V1_19,
            2,
        ),
        (
            TreeShape::Tree { branch_percent: 60 },
            SettingsStyle::V1_16,
            3,
        ),
    ] {
        let spec = SynthSpec {
            snapshots: 40,
            disks: 3,
            shape,
            style,
            seed,
            saved_state_percent: 70,
            machine_saved: seed == 2,
            ..SynthSpec::default()
        };
        let g = generate(&spec);
        let m = MachineSettings::parse_str(&g.xml).unwrap();
        assert_eq!(m.uuid, g.uuid);
        assert_eq!(m.snapshots.len(), 40);
        assert_eq!(m.media.hard_disks.len(), 3 * 41);
        assert_eq!(m.state_file, g.state_file);
        assert_eq!(
            m.current_snapshot,
            g.current_snapshot.map(|c| g.snapshots[c].uuid)
        );
        let max_depth = g.snapshots.iter().map(|s| s.depth).max().unwrap();
        assert_eq!(m.snapshot_depth(), max_depth);
        // Each snapshot attaches the generated images, in port order.
        for s in &m.snapshots {
            let gs = g.snapshots.iter().find(|x| x.uuid == s.uuid).unwrap();
            let attached: Vec<_> = s.hardware.hard_disk_uuids().collect();
            let expected: Vec<_> = gs.attached.iter().map(|&i| g.disks[i].uuid).collect();
            assert_eq!(attached, expected);
            assert_eq!(s.state_file, gs.state_file);
        }
        if shape == TreeShape::Chain {
            assert_eq!(m.media.max_chain_depth(), 41);
        }
    }
}

#[test]
fn end_to_end_files_migration_set_verify_and_copy() {
    let spec = SynthSpec {
        snapshots: 12,
        disks: 2,
        shape: TreeShape::Tree { branch_percent: 30 },
        seed: 42,
        ..SynthSpec::default()
    };
    let g = generate(&spec);
    let dir = tempfile::tempdir().unwrap();
    let vm_dir = dir.path().join("TM");
    let sizes = FileSizes {
        virtual_size: 1 << 30,
        base: 200 << 20,
        diff: 8 << 20,
        saved_state: 16 << 20,
    };
    let vbox = g.write_files(&vm_dir, &sizes).unwrap();
    let machine = Machine::load(&vbox, None).unwrap();
    let set = machine
        .migration_set("current", &MigrationOptions::default())
        .unwrap();
    assert_eq!(set.missing().count(), 0, "{:?}", set.warnings);
    let cur = g.current_snapshot.unwrap();
    let depth = g.snapshots[cur].depth;
    // settings + per disk the current image's whole chain (depth + 1 images).
    assert_eq!(set.files.len(), 1 + 2 * (depth + 1));
    // Verify the chains on disk against the registry.
    let links: Vec<ChainLink> = set
        .files
        .iter()
        .filter_map(|f| f.uuid.as_deref())
        .map(|u| {
            let uuid = uuid::Uuid::parse_str(u).unwrap();
            let medium = machine.medium(&uuid).unwrap();
            let parent = medium.parent.map(|p| machine.media()[p].uuid);
            let path = set
                .files
                .iter()
                .find(|f| f.uuid.as_deref() == Some(u))
                .unwrap()
                .path
                .clone();
            ChainLink::new(path, uuid, parent)
        })
        .collect();
    assert_eq!(links.len(), 2 * (depth + 1));
    let report = verify_chain(&links);
    assert!(report.is_ok(), "{:?}", report.problems);
    // Copy the set, keeping the layout relative to the machine folder.
    let files: Vec<(PathBuf, PathBuf)> = set
        .files
        .iter()
        .map(|f| {
            let rel = f.path.strip_prefix(&vm_dir).unwrap().to_path_buf();
            (f.path.clone(), Path::new("TM").join(rel))
        })
        .collect();
    let dest = tempfile::tempdir().unwrap();
    let report = copy_files(&files, dest.path(), &CopyOptions::default(), |_| {}).unwrap();
    assert_eq!(report.bytes, set.total_bytes());
    let copied = Machine::load(dest.path().join("TM/TM.vbox"), None).unwrap();
    let again = copied
        .migration_set("current", &MigrationOptions::default())
        .unwrap();
    assert_eq!(again.missing().count(), 0);
    assert_eq!(again.total_bytes(), set.total_bytes());
}

#[test]
fn deterministic_and_seed_dependent() {
    let spec = SynthSpec {
        snapshots: 25,
        shape: TreeShape::Tree { branch_percent: 40 },
        ..SynthSpec::default()
    };
    assert_eq!(generate(&spec), generate(&spec));
    let other = SynthSpec { seed: 2, ..spec };
    assert_ne!(
        generate(&other).xml,
        generate(&SynthSpec {
            seed: 1,
            ..other.clone()
        })
        .xml
    );
}

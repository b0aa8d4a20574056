//! Every real `.vbox` in `shared/fixtures/vbox` parses, and the facts its MANIFEST.md
//! lists (computed independently with Python's ElementTree) come out the same.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use unacloud_vbox::location::LocationKind;
use unacloud_vbox::settings::{DeviceType, MachineSettings};
use unacloud_vbox::tracker::{Machine, MigrationOptions, StateRef};
use unacloud_vbox::Error;

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/vbox"
    ))
    .to_path_buf()
}

const INNOTEK: &str = "http://www.innotek.de/VirtualBox-settings";
const VBOX_ORG: &str = "http://www.virtualbox.org/";

/// One row of MANIFEST.md's "Parsed features" table.
struct Facts {
    file: &'static str,
    version: &'static str,
    innotek: bool,
    snaps: usize,
    snap_depth: usize,
    snap_branch: usize,
    snap_sav: usize,
    machine_sav: bool,
    hard_disks: usize,
    roots: usize,
    diff_depth: usize,
    diff_branch: usize,
    dvd: usize,
    floppy: usize,
    unresolved: usize,
    /// StorageControllers beside Hardware (≤ 1.16) rather than inside it.
    sc_beside: bool,
}

#[rustfmt::skip]
const TABLE: &[Facts] = &[
    Facts { file: "Marvint-dev__Samba-AD__Debian.vbox", version: "1.19-windows", innotek: false, snaps: 19, snap_depth: 10, snap_branch: 3, snap_sav: 19, machine_sav: false, hard_disks: 20, roots: 1, diff_depth: 10, diff_branch: 3, dvd: 2, floppy: 0, unresolved: 1, sc_beside: false },
    Facts { file: "joco-kad__teaching__kali-linux-2022.4-virtualbox-amd64.vbox", version: "1.19-windows", innotek: false, snaps: 10, snap_depth: 7, snap_branch: 1, snap_sav: 9, machine_sav: false, hard_disks: 11, roots: 1, diff_depth: 7, diff_branch: 1, dvd: 0, floppy: 0, unresolved: 0, sc_beside: false },
    Facts { file: "joco-kad__teaching__Meta.vbox", version: "1.19-windows", innotek: false, snaps: 3, snap_depth: 2, snap_branch: 1, snap_sav: 3, machine_sav: false, hard_disks: 4, roots: 1, diff_depth: 3, diff_branch: 1, dvd: 0, floppy: 0, unresolved: 0, sc_beside: false },
    Facts { file: "joco-kad__teaching__Win2012Server2.vbox", version: "1.19-windows", innotek: false, snaps: 1, snap_depth: 1, snap_branch: 0, snap_sav: 0, machine_sav: true, hard_disks: 2, roots: 1, diff_depth: 2, diff_branch: 0, dvd: 1, floppy: 0, unresolved: 1, sc_beside: false },
    Facts { file: "joco-kad__teaching__Win2012Server2.vbox-prev", version: "1.19-windows", innotek: false, snaps: 1, snap_depth: 1, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 2, roots: 1, diff_depth: 2, diff_branch: 0, dvd: 1, floppy: 0, unresolved: 1, sc_beside: false },
    Facts { file: "luiscidade17__VirtualBox__Ubuntu.vbox", version: "1.16-linux", innotek: false, snaps: 1, snap_depth: 1, snap_branch: 0, snap_sav: 1, machine_sav: true, hard_disks: 2, roots: 1, diff_depth: 2, diff_branch: 0, dvd: 1, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "coderMaruf__arch-linux__Arch_Linux.vbox", version: "1.16-linux", innotek: false, snaps: 1, snap_depth: 1, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 2, roots: 1, diff_depth: 2, diff_branch: 0, dvd: 1, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "barkinet__barkim__barkim.vbox", version: "1.12-macosx", innotek: true, snaps: 1, snap_depth: 1, snap_branch: 0, snap_sav: 0, machine_sav: true, hard_disks: 2, roots: 1, diff_depth: 2, diff_branch: 0, dvd: 0, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "barkinet__barkim__barkim.vbox-prev", version: "1.12-macosx", innotek: true, snaps: 1, snap_depth: 1, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 2, roots: 1, diff_depth: 2, diff_branch: 0, dvd: 0, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "Gug888__B2B_ALL__Born2beroot-1.18-linux.vbox", version: "1.18-linux", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: true, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 1, floppy: 0, unresolved: 0, sc_beside: false },
    Facts { file: "Zenckoo__Born2BeRoot__Ilane.vbox", version: "1.16-macosx", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: true, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 1, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "gabrielsrd__Minix__Minix.vbox", version: "1.19-windows", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: true, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 1, floppy: 0, unresolved: 0, sc_beside: false },
    Facts { file: "Bayons__Minix__Minix.vbox", version: "1.15-windows", innotek: true, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 0, floppy: 1, unresolved: 0, sc_beside: true },
    Facts { file: "OskarKozaczka__DOS__MS-DOS.vbox", version: "1.12-windows", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 3, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "thebagmaster__WEB_Streambot__StreamBot.vdi.vbox", version: "1.12-windows", innotek: true, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 2, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "MattStackSizzle__TurnkeySiteTemplate__TURNKEY_WORDPRESS.vbox", version: "1.15-windows", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 1, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "UnknownUser1837__potential-telegram__Influenza.vbox", version: "1.15-windows", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 1, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "geezyboi__parselaprt2__Ubuntu_CyberEss_1.vbox", version: "1.14-windows", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 0, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "sofiagranda__examen__Complexivo.vbox", version: "1.19-windows", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 0, floppy: 0, unresolved: 0, sc_beside: false },
    Facts { file: "SwatejPatil__Linux-From-Scratch__LinuxFromScratch.vbox", version: "1.16-linux", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 3, roots: 3, diff_depth: 1, diff_branch: 0, dvd: 0, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "ocanaChris2__Malware-Development-Foundations---ITM-2023__Windows_10.vbox", version: "1.19-windows", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 2, floppy: 1, unresolved: 0, sc_beside: false },
    Facts { file: "ItsSchweetz__T-PotGrafana__Ubuntu.vbox", version: "1.19-windows", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 1, floppy: 0, unresolved: 0, sc_beside: false },
    Facts { file: "GarretsGitGathering__ai_os__AI_OS.vbox", version: "1.17-linux", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 1, floppy: 0, unresolved: 0, sc_beside: false },
    Facts { file: "hrmshandy__homestead-7__homestead-7.vbox", version: "1.15-windows", innotek: true, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 0, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "bwLehrpool__master-sync-shared__virtualbox_default-ubuntu_v1-15.vbox", version: "1.15-linux", innotek: true, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 0, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "bwLehrpool__master-sync-shared__virtualbox_default-windows-7_v1-16.vbox", version: "1.16-linux", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 0, floppy: 0, unresolved: 0, sc_beside: true },
    Facts { file: "bwLehrpool__master-sync-shared__virtualbox_default-windows-7_v1-18.vbox", version: "1.18-linux", innotek: false, snaps: 0, snap_depth: 0, snap_branch: 0, snap_sav: 0, machine_sav: false, hard_disks: 1, roots: 1, diff_depth: 1, diff_branch: 0, dvd: 0, floppy: 0, unresolved: 0, sc_beside: false },
];

fn load(file: &str) -> MachineSettings {
    let path = fixtures().join(file);
    MachineSettings::load(&path).unwrap_or_else(|e| panic!("{file}: {e:?}"))
}

fn machine(file: &str) -> Machine {
    Machine::load(fixtures().join(file), None).unwrap_or_else(|e| panic!("{file}: {e:?}"))
}

#[test]
fn the_table_covers_every_fixture() {
    let mut on_disk: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".vbox") || n.ends_with(".vbox-prev"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TABLE.iter().map(|f| f.file.to_owned()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
}

#[test]
fn every_fixture_matches_the_manifest() {
    for f in TABLE {
        let m = load(f.file);
        let ctx = f.file;
        assert_eq!(m.version.to_string(), f.version, "{ctx}: version");
        assert_eq!(
            m.namespace.as_deref(),
            Some(if f.innotek { INNOTEK } else { VBOX_ORG }),
            "{ctx}: namespace"
        );
        assert_eq!(m.snapshots.len(), f.snaps, "{ctx}: snapshots");
        assert_eq!(m.snapshot_depth(), f.snap_depth, "{ctx}: snapshot depth");
        let branching = m.snapshots.iter().filter(|s| s.children.len() > 1).count();
        assert_eq!(branching, f.snap_branch, "{ctx}: snapshot branch points");
        let sav = m
            .snapshots
            .iter()
            .filter(|s| s.state_file.is_some())
            .count();
        assert_eq!(sav, f.snap_sav, "{ctx}: snapshots with .sav");
        assert_eq!(m.state_file.is_some(), f.machine_sav, "{ctx}: machine .sav");
        assert_eq!(m.media.hard_disks.len(), f.hard_disks, "{ctx}: hard disks");
        let roots = m
            .media
            .hard_disks
            .iter()
            .filter(|d| d.parent.is_none())
            .count();
        assert_eq!(roots, f.roots, "{ctx}: base disks");
        assert_eq!(
            m.media.max_chain_depth(),
            f.diff_depth,
            "{ctx}: chain depth"
        );
        let forks = m
            .media
            .hard_disks
            .iter()
            .filter(|d| d.children.len() > 1)
            .count();
        assert_eq!(forks, f.diff_branch, "{ctx}: disk forks");
        // Only bases carry a type, and all real ones are Normal.
        for d in &m.media.hard_disks {
            assert_eq!(
                d.disk_type.is_some(),
                d.parent.is_none(),
                "{ctx}: type on {}",
                d.uuid
            );
        }
        assert_eq!(m.media.dvd_images.len(), f.dvd, "{ctx}: DVD images");
        assert_eq!(
            m.media.floppy_images.len(),
            f.floppy,
            "{ctx}: floppy images"
        );
        // Unresolved: attached image uuids not defined in this file's registry.
        let defined: HashSet<_> = m
            .media
            .hard_disks
            .iter()
            .map(|d| d.uuid)
            .chain(m.media.dvd_images.iter().map(|i| i.uuid))
            .chain(m.media.floppy_images.iter().map(|i| i.uuid))
            .collect();
        let attached: HashSet<_> = std::iter::once(&m.hardware)
            .chain(m.snapshots.iter().map(|s| &s.hardware))
            .flat_map(|h| h.attachments().filter_map(|(_, d)| d.image))
            .collect();
        assert_eq!(
            attached.difference(&defined).count(),
            f.unresolved,
            "{ctx}: unresolved"
        );
        // Every state has its controllers, wherever the version put them.
        assert!(
            !m.hardware.storage_controllers.is_empty(),
            "{ctx}: controllers"
        );
        for s in &m.snapshots {
            assert!(
                !s.hardware.storage_controllers.is_empty(),
                "{ctx}: snapshot controllers"
            );
        }
        assert_eq!(
            !m.version.controllers_inside_hardware(),
            f.sc_beside,
            "{ctx}: controller placement"
        );
        // The current snapshot exists and the tree converts.
        if f.snaps > 0 {
            assert!(
                m.current_snapshot_index().is_some(),
                "{ctx}: currentSnapshot"
            );
        }
        let tree = m.snapshot_tree().unwrap();
        assert_eq!(tree.len(), f.snaps);
        assert!(m.warnings.is_empty(), "{ctx}: {:?}", m.warnings);
    }
}

#[test]
fn the_current_snapshots_disk_is_the_parent_of_the_current_states_disk() {
    for file in [
        "Marvint-dev__Samba-AD__Debian.vbox",
        "joco-kad__teaching__kali-linux-2022.4-virtualbox-amd64.vbox",
        "joco-kad__teaching__Meta.vbox",
    ] {
        let m = machine(file);
        let cur = m.current_snapshot().unwrap();
        let snap_disk = cur.hardware.hard_disk_uuids().next().unwrap();
        let now_disk = m.settings().hardware.hard_disk_uuids().next().unwrap();
        let chain = m.chain(&now_disk).unwrap();
        let parent = m.media()[chain[chain.len() - 2]].uuid;
        assert_eq!(parent, snap_disk, "{file}");
    }
}

#[test]
fn migration_set_of_the_deepest_snapshot_follows_the_whole_chain() {
    let m = machine("Marvint-dev__Samba-AD__Debian.vbox");
    let opts = MigrationOptions::default();
    for (i, s) in m.snapshots().iter().enumerate() {
        let set = m.migration_set(&s.uuid.to_string(), &opts).unwrap();
        let disk = s.hardware.hard_disk_uuids().next().unwrap();
        let chain_len = m.chain(&disk).unwrap().len();
        // settings + chain + .sav; every file is missing here, reported per file.
        assert_eq!(set.files.len(), 1 + chain_len + 1, "snapshot #{i}");
        assert!(set.files[0].bytes.is_some(), "the .vbox itself exists");
        assert!(set.files[1..].iter().all(|f| f.bytes.is_none()));
        assert_eq!(set.warnings.len(), set.files.len() - 1);
        // The DVD is an external dependency, not a file to copy.
        assert!(set
            .files
            .iter()
            .all(|f| !f.path.to_string_lossy().ends_with(".iso")));
    }
    // The snapshot whose DVD is registered only globally reports it as external.
    let unresolved = m
        .snapshots()
        .iter()
        .find(|s| {
            s.hardware.attachments().any(|(_, d)| {
                d.device_type == DeviceType::Dvd && d.image.is_some_and(|u| m.medium(&u).is_none())
            })
        })
        .unwrap();
    let set = m
        .migration_set(&unresolved.uuid.to_string(), &opts)
        .unwrap();
    assert!(
        set.external.iter().any(|e| e.contains("in no registry")),
        "{:?}",
        set.external
    );
}

#[test]
fn shared_saved_states_are_listed_once_and_repeated_names_are_ambiguous() {
    let m = machine("joco-kad__teaching__kali-linux-2022.4-virtualbox-amd64.vbox");
    let all = m.all_files();
    // 1 settings + 11 disks + 8 distinct .sav (9 snapshots carry one, two share it).
    assert_eq!(all.files.len(), 1 + 11 + 8);
    let paths: HashSet<_> = all.files.iter().map(|f| &f.path).collect();
    assert_eq!(paths.len(), all.files.len());
    assert_eq!((all.disks, all.snapshots), (1, 10));
    assert_eq!(all.expected_count, 22);
    match m.migration_set("OpenVAS installed", &MigrationOptions::default()) {
        Err(Error::AmbiguousSnapshotName { candidates, .. }) => assert_eq!(
            candidates,
            [
                "7d607010-fed6-4401-8a09-cd97d44251d1",
                "25c45ef6-2b34-48bc-aa68-e0af958b52a4"
            ]
        ),
        other => panic!("expected ambiguity, got {other:?}"),
    }
    // A uuid (any case, braces or not) selects one of them.
    assert_eq!(
        m.select("{25C45EF6-2B34-48BC-AA68-E0AF958B52A4}").unwrap(),
        m.select("25c45ef6-2b34-48bc-aa68-e0af958b52a4").unwrap()
    );
    assert!(matches!(
        m.select("no such"),
        Err(Error::SnapshotNotFound { .. })
    ));
    assert_eq!(m.select("CURRENT").unwrap(), StateRef::Current);
    // Nothing is unneeded: every disk and .sav serves some state.
    assert!(m.unneeded_files().is_empty());
}

#[test]
fn locations_of_every_style_are_resolved_without_the_file_system() {
    let meta = machine("joco-kad__teaching__Meta.vbox");
    let base = meta.media().iter().find(|m| m.parent.is_none()).unwrap();
    assert_eq!(base.location.kind(), LocationKind::WindowsDrive);
    assert!(base.location.original().starts_with("C:/Users/"));
    let diff = meta.media().iter().find(|m| m.parent.is_some()).unwrap();
    assert_eq!(diff.location.kind(), LocationKind::Relative);
    let dir = unacloud_vbox::location::Location::resolve("", &fixtures());
    assert!(diff.location.path().starts_with(dir.path()));
    assert!(diff
        .location
        .strip_base(dir.path())
        .unwrap()
        .starts_with("Snapshots"));

    let sb = machine("thebagmaster__WEB_Streambot__StreamBot.vdi.vbox");
    let unc = sb
        .media()
        .iter()
        .find(|m| m.location.kind() == LocationKind::Unc)
        .unwrap();
    assert_eq!(
        unc.location.path(),
        Path::new("//UNKNOWN/Users/Public/TinyXP-Rev11.iso")
    );

    let lu = machine("luiscidade17__VirtualBox__Ubuntu.vbox");
    let iso = lu
        .media()
        .iter()
        .find(|m| m.location.kind() == LocationKind::UnixAbsolute)
        .unwrap();
    // The character reference &#xEA; was decoded.
    assert!(iso.location.original().contains("Transferências"));
}

#[test]
fn version_specific_details() {
    // 1.16: controllers beside <Hardware> in the snapshot too.
    let lu = load("luiscidade17__VirtualBox__Ubuntu.vbox");
    assert_eq!(lu.snapshots[0].hardware.storage_controllers[0].name, "IDE");
    assert_eq!(lu.snapshots[0].hardware.memory_mb, Some(3042));
    assert_eq!(lu.hardware.network_adapters[0].attachment.mode(), "nat");
    // Localized controller name.
    let dos = load("OskarKozaczka__DOS__MS-DOS.vbox");
    assert_eq!(dos.hardware.storage_controllers[0].name, "Kontroler IDE");
    // Newer versions omit <CPU count> for the default of 1.
    let w7 = load("bwLehrpool__master-sync-shared__virtualbox_default-windows-7_v1-18.vbox");
    assert_eq!(w7.hardware.cpu_count, 1);
    assert_eq!(
        w7.hardware.storage_controllers[0].controller_type,
        "VirtioSCSI"
    );
    // Host drive pass-through is an external dependency.
    let bk = machine("barkinet__barkim__barkim.vbox");
    let set = bk
        .migration_set("current", &MigrationOptions::default())
        .unwrap();
    assert!(
        set.external.iter().any(|e| e.contains("host drive")),
        "{:?}",
        set.external
    );
    // The machine's own saved state belongs to `current`.
    assert!(set.files.iter().any(|f| f.role.as_str() == "saved-state"));
    // Three bases on one VM, format spelled two ways.
    let lfs = load("SwatejPatil__Linux-From-Scratch__LinuxFromScratch.vbox");
    let formats: HashSet<_> = lfs
        .media
        .hard_disks
        .iter()
        .map(|d| d.format.as_str())
        .collect();
    assert!(formats.contains("VDI") && formats.contains("vdi"));
    assert!(lfs
        .media
        .hard_disks
        .iter()
        .all(|d| d.disk_format() == unacloud_core::model::DiskFormat::Vdi));
}

#[test]
fn bridged_and_internal_adapters_are_recognised() {
    let mut modes = HashSet::new();
    for f in TABLE {
        let m = load(f.file);
        for a in std::iter::once(&m.hardware)
            .chain(m.snapshots.iter().map(|s| &s.hardware))
            .flat_map(|h| h.network_adapters.iter())
        {
            modes.insert(a.attachment.mode().to_owned());
        }
    }
    for expected in ["nat", "bridged", "intnet", "natnetwork"] {
        assert!(modes.contains(expected), "{expected} not seen in {modes:?}");
    }
}

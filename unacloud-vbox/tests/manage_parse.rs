//! Every parser of `VBoxManage` output against the real samples in
//! `shared/fixtures/vboxmanage/` (see its MANIFEST.md for where each came from).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use unacloud_core::model::{DiskFormat, DiskType, PowerState, Uuid};
use unacloud_vbox::manage::failure::{parse_error_output, Failure, FailureKind};
use unacloud_vbox::manage::parse::{self, machinereadable, SlotMedium};

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/vboxmanage"
    ))
}

fn fixture(name: &str) -> String {
    let p = fixture_dir().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn u(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

/// Every fixture file is read by at least one test in this file.
#[test]
fn every_fixture_is_covered_by_a_test() {
    let this = include_str!("manage_parse.rs");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".txt") && !this.contains(&format!("\"{name}\"")) {
            missing.push(name);
        }
    }
    assert!(missing.is_empty(), "fixtures without a test: {missing:?}");
}

// ---- list vms / runningvms -------------------------------------------------------------

#[test]
fn list_vms_without_trailing_newline() {
    let vms = parse::parse_vm_list(&fixture("list-vms__go-virtualbox__1.txt"));
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0].name, "Ubuntu");
    assert_eq!(vms[1].name, "go-virtualbox");
    assert_eq!(vms[1].uuid, u("def44546-e3da-4902-8d15-b91c99c80cbc"));
}

#[test]
fn list_vms_marks_inaccessible_placeholder() {
    let vms = parse::parse_vm_list(&fixture("list-vms__sergueik-powershell-samples__1.txt"));
    assert_eq!(vms.len(), 2);
    assert!(!vms[0].is_inaccessible());
    assert!(vms[1].is_inaccessible());
    assert_eq!(vms[1].uuid, u("a30b7f86-d30a-41b8-9dbc-cb1ea02e55c4"));
}

#[test]
fn list_runningvms_names_with_spaces() {
    let vms = parse::parse_vm_list(&fixture(
        "list-runningvms__sergueik-powershell-samples__1.txt",
    ));
    let names: Vec<_> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "XPSP3",
            "Xubuntu 22.04",
            "default",
            "Windows 7",
            "Windows 10 x64 ru",
            "Xubuntu VS Code"
        ]
    );
}

#[test]
fn list_runningvms_empty_and_warning_only_outputs_have_no_vms() {
    assert!(parse::parse_vm_list(&fixture("list-runningvms-empty__d-moto__1.txt")).is_empty());
    assert!(
        parse::parse_vm_list(&fixture("list-runningvms__vagrant-tramp-issue16__1.txt")).is_empty()
    );
}

#[test]
fn list_vms_accepts_crlf_and_quotes_inside_names() {
    let text = "\"a \"quoted\" name\" {2e16b1fc-675d-4a7a-a9a1-e89a8bde7874}\r\n";
    let vms = parse::parse_vm_list(text);
    assert_eq!(vms[0].name, "a \"quoted\" name");
}

// ---- showvminfo --machinereadable -------------------------------------------------------

#[test]
fn showvminfo_chef_ohai_poweroff_with_one_snapshot_and_differencing_disk() {
    let d = parse::parse_vm_info(&fixture("showvminfo-machinereadable__chef-ohai__1.txt")).unwrap();
    assert_eq!(d.name, "ubuntu-18.04-amd64_1549746024485_35372");
    assert_eq!(d.state, PowerState::PoweredOff);
    assert_eq!((d.cpus, d.memory_mb), (Some(1), Some(1024)));
    assert_eq!(d.controllers.len(), 2);
    assert_eq!(d.controllers[1].name, "SATA Controller");
    let disks = d.disk_attachments();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].controller, "SATA Controller");
    assert_eq!((disks[0].port, disks[0].device), (0, 0));
    assert_eq!(disks[0].disk, u("1c182745-4b09-41a1-a147-d3ced46f72f6"));
    assert_eq!(d.snapshots.len(), 1);
    let cur = d.snapshots.current().unwrap();
    assert_eq!(d.snapshots.get(cur).unwrap().name, "base");
    assert_eq!(
        d.current_snapshot.as_deref(),
        Some("085cbbec-70cd-4864-9208-5d938dcabb71")
    );
    // Four empty IDE slots and one SATA slot were printed.
    assert_eq!(
        d.slots
            .iter()
            .filter(|s| s.medium == SlotMedium::Empty)
            .count(),
        4
    );
    let info = d.to_vm_info();
    assert_eq!(info.uuid, Some(u("6294f16b-4f05-4430-afb9-773bdb237aec")));
}

#[test]
fn showvminfo_bioinfo_running_with_multiline_escaped_description() {
    let d = parse::parse_vm_info(&fixture(
        "showvminfo-machinereadable__bioinfo-rio-vagrant__1.txt",
    ))
    .unwrap();
    assert_eq!(d.state, PowerState::Running);
    assert_eq!((d.cpus, d.memory_mb), (Some(4), Some(4096)));
    let desc = d.description.as_deref().unwrap();
    assert!(desc.starts_with("installed with:\nCentOS-7.0-1406-x86_64-NetInstall.iso\n"));
    assert!(
        desc.contains("# yum groupinstall \"GNOME Desktop\" \"Graphical Administration Tools\"\n")
    );
    assert!(desc.ends_with("centos / reverse\n"));
    // The description's continuation lines are not keys…
    assert!(d.raw.get("root / reverse").is_none());
    // …and the keys after it are still read.
    assert_eq!(d.raw.get("GuestOSType"), Some("Linux26_64"));
    assert_eq!(
        d.raw.get("GuestAdditionsFacility_VirtualBox Base Driver"),
        Some("50,1550641065785")
    );
    let vm = d.raw.entry("VideoMode").unwrap();
    assert_eq!(
        (vm.value.as_str(), vm.trailing.as_str()),
        ("720,400,0", "@0,0 1")
    );
    assert_eq!(d.raw.get("videocapres"), Some("1024x768"));
    assert_eq!(d.raw.get("videocapopts"), Some(""));
    // IDE 1-0 is an empty DVD drive, not a disk.
    let dvd = d
        .slots
        .iter()
        .find(|s| s.controller == "IDE" && s.port == 1 && s.device == 0)
        .unwrap();
    assert_eq!(dvd.medium, SlotMedium::EmptyDrive);
    assert!(dvd.removable);
    assert_eq!(d.disk_attachments().len(), 1);
    assert_eq!(d.nics.len(), 1);
    assert_eq!(d.nics[0].attachment, "nat");
    assert!(d.snapshots.is_empty());
    assert_eq!(
        d.raw.get("Forwarding(0)"),
        Some("ssh,tcp,127.0.0.1,2222,,22")
    );
}

#[test]
fn showvminfo_go_virtualbox_saved_state_and_not_set_values() {
    let d =
        parse::parse_vm_info(&fixture("showvminfo-machinereadable__go-virtualbox__1.txt")).unwrap();
    assert_eq!(d.state, PowerState::Saved);
    assert_eq!(
        d.state_file.as_deref().unwrap().to_str().unwrap(),
        "/Users/fix/VirtualBox VMs/go-virtualbox/Snapshots/2018-04-23T09-29-48-014952000Z.sav"
    );
    assert_eq!(d.raw.get("vrdeproperty[TCP/Ports]"), Some("5914"));
    assert_eq!(
        d.raw.get("vrdeproperty[Security/Method]"),
        Some("<not set>")
    );
    let disks = d.disk_attachments();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].controller, "SATA Controller");
    assert_eq!(disks[0].disk, u("32583b48-693e-45d4-882f-e9196d4f43c6"));
    assert!(d.skipped_is_empty());
}

trait Skipped {
    fn skipped_is_empty(&self) -> bool;
}
impl Skipped for parse::VmDetails {
    fn skipped_is_empty(&self) -> bool {
        self.raw.skipped.is_empty()
    }
}

#[test]
fn showvminfo_windows_mixes_escaped_and_raw_backslashes() {
    let d = parse::parse_vm_info(&fixture(
        "showvminfo-machinereadable__sergueik-powershell-samples__1.txt",
    ))
    .unwrap();
    assert_eq!(d.state, PowerState::Running);
    // Escaped in the output, unescaped here.
    assert_eq!(
        d.settings_file.as_deref().unwrap().to_str().unwrap(),
        r"C:\Users\kouzm\VirtualBox VMs\Xubuntu 22.04\Xubuntu 22.04.vbox"
    );
    // Printed raw, kept raw.
    let sata = d.slots.iter().find(|s| s.controller == "SATA").unwrap();
    assert_eq!(
        sata.medium,
        SlotMedium::Image {
            location: r"C:\Virtual Machines\xubuntu22.04-3.vdi".to_owned(),
            uuid: Some(u("e31692be-ff5c-424f-818d-07a377758041")),
        }
    );
    // The guest additions ISO is a DVD, not a disk.
    let disks = d.disk_attachments();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].disk, u("e31692be-ff5c-424f-818d-07a377758041"));
    assert_eq!(d.raw.get("videocapopts"), Some("ac_enabled=false"));
    assert_eq!(d.nics[0].attachment, "bridged");
    assert_eq!(
        d.nics[0].bridge_adapter.as_deref(),
        Some("Intel(R) Wi-Fi 6E AX211 160MHz")
    );
    // Printed raw in 5.x: single backslashes kept.
    assert_eq!(
        d.raw.get("videocapfile"),
        Some(r"C:\Users\kouzm\VirtualBox VMs\Xubuntu 22.04\Xubuntu 22.04.webm")
    );
}

#[test]
fn showvminfo_vedv_7_0_stray_lines_and_multiline_description() {
    let d = parse::parse_vm_info(&fixture("showvminfo-machinereadable__vedv__1.txt")).unwrap();
    assert_eq!(d.state, PowerState::PoweredOff);
    assert_eq!(d.description.as_deref(), Some("name1=value1\nname2=value2"));
    // The continuation line that looks like a key is not one.
    assert!(d.raw.get("name2").is_none());
    assert_eq!(d.raw.get("GuestMemoryBalloon"), Some("0"));
    assert!(d.raw.get("BIOS NVRAM File").unwrap().ends_with(".nvram"));
    let skipped: Vec<&str> = d.raw.skipped.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(skipped, ["Encryption:     disabled", " rec_screen0"]);
    // 7.0 numbers the IsEjected key: the empty drive is removable, the VDI is the disk.
    let ide = d
        .slots
        .iter()
        .find(|s| s.controller == "IDE" && s.port == 1 && s.device == 0)
        .unwrap();
    assert!(ide.removable);
    let disks = d.disk_attachments();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].disk, u("37a0bb6b-4292-464e-b766-1e8b7101ec94"));
    assert_eq!((d.cpus, d.memory_mb), (Some(4), Some(4096)));
}

#[test]
fn showvminfo_fragment_windows_saved_state_raw_path() {
    let d = parse::parse_vm_info(&fixture(
        "showvminfo-machinereadable-fragment__docker-machine-issue1768__1.txt",
    ))
    .unwrap();
    assert_eq!(d.name, "boot2docker-vm");
    assert_eq!(d.state, PowerState::Saved);
    assert_eq!(
        d.settings_file.as_deref().unwrap().to_str().unwrap(),
        r"C:\Users\rajesh.gotur\VirtualBox VMs\boot2docker-vm\boot2docker-vm.vbox"
    );
    assert_eq!(
        d.state_file.as_deref().unwrap().to_str().unwrap(),
        r"C:\Users\rajesh.gotur\VirtualBox VMs\boot2docker-vm\Snapshots\2015-08-27T04-35-20-397847700Z.sav"
    );
    assert_eq!((d.cpus, d.memory_mb), (Some(2), Some(2048)));
}

#[test]
fn showvminfo_every_sample_parses_with_crlf_too() {
    for name in [
        "showvminfo-machinereadable__bioinfo-rio-vagrant__1.txt",
        "showvminfo-machinereadable__chef-ohai__1.txt",
        "showvminfo-machinereadable__go-virtualbox__1.txt",
        "showvminfo-machinereadable__sergueik-powershell-samples__1.txt",
        "showvminfo-machinereadable__vedv__1.txt",
        "showvminfo-machinereadable-fragment__docker-machine-issue1768__1.txt",
    ] {
        let lf = fixture(name);
        let crlf = lf.replace('\n', "\r\n");
        let a = parse::parse_vm_info(&lf).unwrap();
        let b = parse::parse_vm_info(&crlf).unwrap();
        assert_eq!(a.to_vm_info(), b.to_vm_info(), "{name}");
        assert_eq!(a.description, b.description, "{name}");
    }
}

#[test]
fn inaccessible_vm_prints_only_name_and_uuid() {
    let d = parse::parse_vm_info(
        "name=\"<inaccessible>\"\nUUID=\"a30b7f86-d30a-41b8-9dbc-cb1ea02e55c4\"\n",
    )
    .unwrap();
    assert!(!d.accessible);
    assert_eq!(d.state, PowerState::Other("inaccessible".into()));
}

#[test]
fn not_machine_readable_output_is_refused() {
    assert!(parse::parse_vm_info(&fixture("startvm__d-moto__1.txt")).is_err());
}

#[test]
fn every_short_state_name_maps() {
    use PowerState::*;
    for (s, want) in [
        ("poweroff", PoweredOff),
        ("saved", Saved),
        ("aborted", Aborted),
        ("aborted-saved", Aborted),
        ("running", Running),
        ("paused", Paused),
        ("gurumeditation", Stuck),
        ("livesnapshotting", LiveSnapshotting),
        ("onlinesnapshotting", LiveSnapshotting),
        ("teleported", Other("teleported".into())),
    ] {
        assert_eq!(parse::power_state(s), want);
    }
}

// ---- machine-readable escaping ---------------------------------------------------------

#[test]
fn escaping_rules() {
    assert!(machinereadable::is_well_formed_escaped(r"C:\\Users\\x"));
    assert!(!machinereadable::is_well_formed_escaped(
        r"C:\Program Files\x"
    ));
    assert!(!machinereadable::is_well_formed_escaped(r"\\?\c:\Users"));
    assert_eq!(machinereadable::unescape(r#"a\"b\\c"#), r#"a"b\c"#);
    // A raw snapshot name with a backslash stays as printed.
    let doc = machinereadable::parse(
        "SnapshotName=\"a\\\\b\"\nSnapshotUUID=\"7e5b4165-91ec-4091-a74c-a5709d584530\"\n",
    );
    assert_eq!(doc.get("SnapshotName"), Some("a\\\\b"));
}

// ---- snapshot list --machinereadable ---------------------------------------------------

#[test]
fn snapshot_list_packer_branching_duplicate_names_current_mid_tree() {
    let doc = machinereadable::parse(&fixture(
        "snapshot-list-machinereadable__packer-plugin-virtualbox__1.txt",
    ));
    let t = parse::tree_from_machine_readable(&doc).unwrap();
    assert_eq!(t.len(), 11);
    let root = t.roots()[0];
    assert_eq!(t.get(root).unwrap().name, "Imported");
    let kids: Vec<_> = t
        .children(root)
        .iter()
        .map(|n| t.get(*n).unwrap().name.clone())
        .collect();
    assert_eq!(kids, ["Snapshot 1", "Snapshot 5", "Snapshot 7"]);
    let cur = t.current().unwrap();
    assert_eq!(
        t.get(cur).unwrap().id,
        "c857d1b8-4fd6-4044-9d2c-c6e465b3cdd4"
    );
    assert_eq!(t.depth(cur), 3);
    // Duplicate names are an ambiguity, uuids are not.
    assert!(matches!(
        t.resolve("Snapshot 2"),
        Err(unacloud_core::Error::AmbiguousName { .. })
    ));
    assert!(t.resolve("7b093686-2981-4ada-8b0f-4c03ae23cd1a").is_ok());
}

#[test]
fn snapshot_list_socbed_deep_chain_with_description() {
    let doc = machinereadable::parse(&fixture("snapshot-list-machinereadable__socbed__1.txt"));
    let t = parse::tree_from_machine_readable(&doc).unwrap();
    assert_eq!(t.len(), 16);
    let cur = t.current().unwrap();
    assert_eq!(t.depth(cur), 15);
    assert_eq!(t.get(cur).unwrap().name, "imdisk");
    let n = t
        .resolve("installed GuestAdditions with autologin")
        .unwrap();
    assert_eq!(
        t.get(n).unwrap().description.as_deref(),
        Some("VBoxWindowsAdditions /with_autologin")
    );
}

#[test]
fn snapshot_list_single_snapshot_also_with_crlf() {
    let text = fixture("snapshot-list-machinereadable__node-virtualbox-issue50__1.txt");
    for t in [text.clone(), text.replace('\n', "\r\n")] {
        let tree = parse::tree_from_machine_readable(&machinereadable::parse(&t)).unwrap();
        assert_eq!(tree.len(), 1);
        let cur = tree.current().unwrap();
        assert_eq!(tree.get(cur).unwrap().name, "Istantanea 1");
    }
}

#[test]
fn snapshot_render_round_trips_every_sample() {
    for name in [
        "snapshot-list-machinereadable__packer-plugin-virtualbox__1.txt",
        "snapshot-list-machinereadable__socbed__1.txt",
        "snapshot-list-machinereadable__node-virtualbox-issue50__1.txt",
    ] {
        let text = fixture(name);
        let t = parse::tree_from_machine_readable(&machinereadable::parse(&text)).unwrap();
        // The renderer reproduces VirtualBox's own output byte for byte.
        assert_eq!(parse::render_machine_readable(&t), text, "{name}");
    }
}

#[test]
fn snapshot_listing_errors_are_typed() {
    // A child before its parent, a name without uuid, a bad current uuid.
    for bad in [
        "SnapshotName-1=\"x\"\nSnapshotUUID-1=\"7e5b4165-91ec-4091-a74c-a5709d584530\"\n",
        "SnapshotName=\"x\"\n",
        "SnapshotName=\"x\"\nSnapshotUUID=\"7e5b4165-91ec-4091-a74c-a5709d584530\"\nCurrentSnapshotUUID=\"8e12833b-c6b5-4cbd-b42b-09eff8ffc173\"\n",
        "SnapshotName=\"x\"\nSnapshotUUID=\"not-a-uuid\"\n",
    ] {
        assert!(parse::tree_from_machine_readable(&machinereadable::parse(bad)).is_err(), "{bad}");
    }
}

#[test]
fn snapshot_list_human_form() {
    let t = parse::tree_from_human_list(&fixture("snapshot-list__boinc__1.txt")).unwrap();
    assert_eq!(t.len(), 3);
    let cur = t.current().unwrap();
    assert_eq!(t.get(cur).unwrap().name, "Snapshot 4");
    assert_eq!(t.depth(cur), 2);
}

// ---- list hdds / showmediuminfo --------------------------------------------------------

#[test]
fn list_hdds_chef_base_and_differencing_child() {
    let recs = parse::parse_media(&fixture("list-hdds__chef-ohai__1.txt"));
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].parent, None);
    assert_eq!(recs[0].state.as_deref(), Some("locked read"));
    assert_eq!(recs[0].disk_type(), Some(DiskType::Normal));
    assert!(!recs[0].is_differencing());
    assert_eq!(
        recs[1].parent,
        Some(u("ebb6dca0-879f-480b-a50e-9efe330bd021"))
    );
    assert!(recs[1].is_differencing());
    let info = recs[1].to_disk_info().unwrap();
    assert_eq!(info.format, DiskFormat::Vmdk);
    assert_eq!(info.logical_size, Some(65536 * 1024 * 1024));
    assert_eq!(info.uuid, u("1c182745-4b09-41a1-a147-d3ced46f72f6"));
}

#[test]
fn list_hdds_long_multiattach_base_with_user() {
    let recs = parse::parse_media(&fixture("list-hdds-long__vagrant-jamesdobson__1.txt"));
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].disk_type(), Some(DiskType::MultiAttach));
    assert_eq!(
        recs[0].children,
        vec![u("1616c5a2-929c-49c1-8f66-08ab44fbc091")]
    );
    assert_eq!(recs[0].variant.as_deref(), Some("dynamic streamOptimized"));
    assert_eq!(recs[0].size_on_disk_mb, Some(305));
    assert_eq!(recs[1].auto_reset, Some(false));
    assert_eq!(recs[1].in_use_by.len(), 1);
    assert_eq!(
        recs[1].in_use_by[0].vm,
        "vagrant_test02_1441657718454_69597"
    );
    assert_eq!(
        recs[1].in_use_by[0].uuid,
        Some(u("ad89e52f-8e2b-4df7-acc3-a5dacdb0459a"))
    );
}

#[test]
fn list_hdds_windows_location_is_raw() {
    let recs = parse::parse_media(&fixture("list-hdds__sergueik-powershell-samples__1.txt"));
    assert_eq!(recs.len(), 1);
    assert_eq!(
        recs[0].location.as_deref(),
        Some(r"C:\Virtual Machines\xubuntu22.04-3.vdi")
    );
    assert_eq!(recs[0].capacity_mb, Some(22528));
    assert_eq!(recs[0].format.as_deref(), Some("VDI"));
}

#[test]
fn showmediuminfo_long_form() {
    let recs = parse::parse_media(&fixture(
        "showmediuminfo__sergueik-powershell-samples__1.txt",
    ));
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.variant.as_deref(), Some("fixed default"));
    assert_eq!(r.size_on_disk_mb, Some(22530));
    assert_eq!(r.in_use_by[0].vm, "Xubuntu 22.04");
    assert_eq!(r.encryption.as_deref(), Some("disabled"));
}

#[test]
fn showhdinfo_multiattach_with_continuation_lines() {
    let recs = parse::parse_media(&fixture("showhdinfo__boinc__1.txt"));
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.disk_type(), Some(DiskType::MultiAttach));
    assert_eq!(
        r.location.as_deref(),
        Some("/path to/disk/parent_disk_name.vdi")
    );
    assert_eq!(
        r.properties,
        vec![("AllocationBlockSize".to_owned(), "1048576".to_owned())]
    );
    assert_eq!(
        r.children,
        vec![
            u("67e34269-e52e-4957-a813-c85f72084fba"),
            u("5fa7905e-72e4-4f85-8405-dc6401417720"),
            u("7262b5e5-2b32-482a-8c6e-2ef49548740b"),
        ]
    );
}

#[test]
fn showhdinfo_old_4_0_layout() {
    let recs = parse::parse_media(&fixture("showhdinfo__boinc__2.txt"));
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.accessible, Some(true));
    assert_eq!(r.capacity_mb, Some(10240));
    assert_eq!(r.size_on_disk_mb, Some(0));
    assert_eq!(
        r.location.as_deref(),
        Some(r"C:\Users\romw\VirtualBox VMs\test2\test2.vdi")
    );
    assert_eq!(
        r.in_use_by[0].uuid,
        Some(u("000ab2be-1254-4c6a-9fdc-1536a478f601"))
    );
    assert!(r.to_disk_info().is_some());
}

// ---- one-line results ------------------------------------------------------------------

#[test]
fn createvm_output() {
    let c = parse::parse_createvm(&fixture("createvm__ievms-issue3__1.txt")).unwrap();
    assert_eq!(c.name.as_deref(), Some("IE7"));
    assert_eq!(c.uuid, u("af538717-e19b-49c3-b135-1af50796dfc8"));
    assert_eq!(
        c.settings_file.unwrap().to_str().unwrap(),
        "/Users/Admin/VirtualBox VMs/IE7/IE7.vbox"
    );
}

#[test]
fn snapshot_take_output_after_progress_line() {
    let text = fixture("snapshot-take__unidentified-vbox-aliases-readme__1.txt");
    assert_eq!(
        parse::parse_snapshot_taken(&text),
        Some(u("947ad21d-2cad-4e64-80cc-2ff819d1be4e"))
    );
}

#[test]
fn clonevm_and_clonemedium_outputs() {
    assert_eq!(
        parse::parse_cloned(&fixture("clonevm__unidentified-k8s-notes__1.txt")).as_deref(),
        Some("k8s-node1")
    );
    assert_eq!(
        parse::parse_trailing_uuid(&fixture("clonehd__docker-toolbox-issue219__1.txt")),
        Some(u("dd2f3fdd-8016-416f-a646-55a9cbd4c1bd"))
    );
}

#[test]
fn startvm_output_has_no_machine_readable_content() {
    let text = fixture("startvm__d-moto__1.txt");
    assert!(text.contains("has been successfully started"));
    assert!(machinereadable::parse(&text).entries.is_empty());
}

#[test]
fn version_after_warning_block() {
    let v = parse::parse_version(&fixture("version__minikube-issue2522__1.txt")).unwrap();
    assert_eq!(
        (v.major, v.minor, v.build, v.revision),
        (5, 2, 6, Some(120293))
    );
    let v = parse::parse_version(&fixture("version__vagrant-pr846__1.txt")).unwrap();
    assert_eq!(
        (v.major, v.minor, v.build, v.revision),
        (4, 1, 2, Some(38459))
    );
    assert_eq!(v.tags, ["Ubuntu"]);
    let v = parse::parse_version("4.1.8r1234_OSE\n").unwrap();
    assert_eq!(
        (v.revision, v.tags.clone()),
        (Some(1234), vec!["OSE".to_owned()])
    );
    let v = parse::parse_version("4.1.8_MacPortsr1234").unwrap();
    assert_eq!(
        (v.revision, v.tags.clone()),
        (Some(1234), vec!["MacPorts".to_owned()])
    );
    assert!(parse::parse_version("WARNING: something\n").is_none());
}

// ---- errors ----------------------------------------------------------------------------

fn classify(
    name: &str,
    operation: &'static str,
    target: &str,
) -> (FailureKind, unacloud_core::Error) {
    use unacloud_vbox::manage::{CommandOutput, VBoxCommand};
    let stderr = fixture(name);
    let cmd = VBoxCommand::new(
        operation,
        Some(target),
        unacloud_vbox::manage::command::TimeClass::Query,
        ["x"],
    );
    let f = Failure::from_output(
        &cmd,
        &CommandOutput::failed(1, stderr),
        std::time::Duration::from_secs(1),
    );
    (f.kind.clone(), f.to_core(&cmd.shell_line()))
}

#[test]
fn error_not_found_by_name_linux_and_windows_and_old_layout() {
    for (name, id) in [
        (
            "error-showvminfo-not-found__cuckoo-issue1402__1.txt",
            "windows7",
        ),
        (
            "error-vm-not-found-windows__macos-virtualbox-issue9__1.txt",
            "Mojave",
        ),
        ("error-showvminfo-not-found__ievms-issue3__1.txt", "IE7"),
    ] {
        let r = parse_error_output(&fixture(name));
        assert_eq!(r.code.as_deref(), Some("VBOX_E_OBJECT_NOT_FOUND"), "{name}");
        assert_eq!(r.hresult, Some(0x80bb_0001));
        assert!(
            r.context.as_deref().unwrap().starts_with("\"FindMachine("),
            "{name}"
        );
        let (kind, core) = classify(name, "showvminfo", id);
        assert_eq!(
            kind,
            FailureKind::NotFound {
                kind: "vm",
                id: id.to_owned()
            }
        );
        assert!(
            matches!(core, unacloud_core::Error::NotFound { kind: "vm", id: ref i } if i == id)
        );
    }
}

#[test]
fn error_not_found_by_uuid_keeps_the_uuid_without_braces() {
    let (kind, _) = classify(
        "error-guestcontrol-run__sergueik-powershell-samples__3.txt",
        "guestcontrol run",
        "x",
    );
    assert_eq!(
        kind,
        FailureKind::NotFound {
            kind: "vm",
            id: "7e261a39-d356-4eb1-a8ed-75675b149241".to_owned()
        }
    );
}

#[test]
fn error_not_running_one_line_is_invalid_state() {
    let (kind, core) = classify(
        "error-guestcontrol-run__sergueik-powershell-samples__2.txt",
        "guestcontrol run",
        "{75a91c26-d044-423d-a438-9b72b7ab8af0}",
    );
    assert_eq!(
        kind,
        FailureKind::InvalidState {
            state: "powered off".to_owned()
        }
    );
    match core {
        unacloud_core::Error::InvalidState {
            operation, state, ..
        } => {
            assert_eq!(
                (operation, state.as_str()),
                ("guestcontrol run", "powered off")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn error_guest_logon_failure_is_access_denied() {
    let (kind, core) = classify(
        "error-guestcontrol-run__sergueik-powershell-samples__4.txt",
        "guestcontrol run",
        "vm",
    );
    assert_eq!(kind, FailureKind::AccessDenied);
    assert!(matches!(core, unacloud_core::Error::AccessDenied { .. }));
}

#[test]
fn error_other_keeps_raw_text() {
    for name in [
        "error-guestcontrol-run__sergueik-powershell-samples__1.txt",
        "error-closemedium__boinc__1.txt",
    ] {
        let (kind, core) = classify(name, "closemedium", "x");
        assert_eq!(kind, FailureKind::Other, "{name}");
        match core {
            unacloud_core::Error::Generic { backend, source } => {
                assert_eq!(backend, "virtualbox");
                match source.downcast_ref::<unacloud_vbox::Error>() {
                    Some(unacloud_vbox::Error::VBoxManage { failure, .. }) => {
                        assert_eq!(failure.kind, FailureKind::Other);
                        assert!(
                            failure.stderr.contains("Details: code VBOX_E_"),
                            "{}",
                            failure.stderr
                        );
                    }
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    }
    let r = parse_error_output(&fixture("error-closemedium__boinc__1.txt"));
    assert_eq!(r.code.as_deref(), Some("VBOX_E_FILE_ERROR"));
    assert_eq!(r.component.as_deref(), Some("MediumWrap"));
    assert_eq!(r.interface.as_deref(), Some("IMedium"));
}

#[test]
fn error_codes_built_from_the_documented_layout_map_to_their_kinds() {
    // Synthetic reports in the layout of the real samples above, one per code.
    let line = |code: &str, hex: &str| {
        format!("VBoxManage: error: message\nVBoxManage: error: Details: code {code} ({hex}), component X, interface Y, callee nsISupports\n")
    };
    for (code, hex, want) in [
        ("VBOX_E_OBJECT_IN_USE", "0x80bb000c", "in use"),
        ("VBOX_E_INVALID_VM_STATE", "0x80bb0002", "state"),
        ("VBOX_E_INVALID_OBJECT_STATE", "0x80bb0007", "state"),
        ("VBOX_E_PASSWORD_INCORRECT", "0x80bb000d", "denied"),
        ("E_ACCESSDENIED", "0x80070005", "denied"),
        ("VBOX_E_TIMEOUT", "0x80bb0010", "timeout"),
        ("NS_ERROR_FAILURE", "0x80004005", "other"),
    ] {
        let r = parse_error_output(&line(code, hex));
        let kind = Failure::classify("x", Some("t"), &r, "");
        let got = match kind {
            FailureKind::InUse => "in use",
            FailureKind::InvalidState { .. } => "state",
            FailureKind::AccessDenied => "denied",
            FailureKind::Timeout => "timeout",
            FailureKind::Other => "other",
            FailureKind::NotFound { .. } => "not found",
            FailureKind::AlreadyExists { .. } => "exists",
        };
        assert_eq!(got, want, "{code}");
    }
}

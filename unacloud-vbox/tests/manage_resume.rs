//! Snapshot trees from VBoxManage agree with the `.vbox` settings, and resuming a VM in
//! place or on another host runs the expected steps and commands.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use unacloud_core::hypervisor::Hypervisor;
use unacloud_core::model::{Uuid, VmId};
use unacloud_core::tree::SnapshotTree;
use unacloud_vbox::manage::parse::{self, machinereadable};
use unacloud_vbox::manage::resume::{self, ElsewhereOptions, ResumeAction};
use unacloud_vbox::manage::{ReplayRunner, VBoxManageHypervisor};
use unacloud_vbox::tracker::Machine;

fn shared(rel: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/"
    ))
    .join(rel)
}

fn data(name: &str) -> String {
    std::fs::read_to_string(
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data")).join(name),
    )
    .unwrap()
}

fn vboxmanage(name: &str) -> String {
    std::fs::read_to_string(shared("vboxmanage").join(name)).unwrap()
}

/// (id, name, parent id) in pre-order, and the current id: what both sources know.
type Shape = (Vec<(String, String, Option<String>)>, Option<String>);

fn shape(t: &SnapshotTree) -> Shape {
    let nodes = t
        .iter()
        .map(|(n, _)| {
            let s = t.get(n).unwrap();
            let parent = t
                .parent(n)
                .map(|p| t.get(p).unwrap().id.to_ascii_lowercase());
            (
                s.id.trim_matches(|c| c == '{' || c == '}')
                    .to_ascii_lowercase(),
                s.name.clone(),
                parent,
            )
        })
        .collect();
    let cur = t.current().map(|c| {
        t.get(c)
            .unwrap()
            .id
            .trim_matches(|c| c == '{' || c == '}')
            .to_ascii_lowercase()
    });
    (nodes, cur)
}

#[test]
fn vboxmanage_tree_agrees_with_the_settings_file() {
    for (vbox, listing, count) in [
        (
            "joco-kad__teaching__Meta.vbox",
            "joco-kad__teaching__Meta.snapshot-list.txt",
            3,
        ),
        (
            "joco-kad__teaching__kali-linux-2022.4-virtualbox-amd64.vbox",
            "joco-kad__teaching__kali-linux-2022.4-virtualbox-amd64.snapshot-list.txt",
            10,
        ),
        (
            "Marvint-dev__Samba-AD__Debian.vbox",
            "Marvint-dev__Samba-AD__Debian.snapshot-list.txt",
            19,
        ),
    ] {
        let from_settings = Machine::load(shared("vbox").join(vbox), None)
            .unwrap()
            .snapshot_tree()
            .unwrap();
        let from_vboxmanage =
            parse::tree_from_machine_readable(&machinereadable::parse(&data(listing))).unwrap();
        assert_eq!(from_vboxmanage.len(), count, "{vbox}");
        assert_eq!(shape(&from_settings), shape(&from_vboxmanage), "{vbox}");
        // Rendering and parsing again keeps the shape.
        let reparsed = parse::tree_from_machine_readable(&machinereadable::parse(
            &parse::render_machine_readable(&from_vboxmanage),
        ))
        .unwrap();
        assert_eq!(shape(&reparsed), shape(&from_settings), "{vbox}");
    }
}

#[test]
fn showvminfo_snapshot_keys_give_the_same_tree_as_snapshot_list() {
    // chef-ohai's showvminfo has one snapshot; the same keys form a snapshot listing.
    let info =
        parse::parse_vm_info(&vboxmanage("showvminfo-machinereadable__chef-ohai__1.txt")).unwrap();
    let listing: String = vboxmanage("showvminfo-machinereadable__chef-ohai__1.txt")
        .lines()
        .filter(|l| l.starts_with("Snapshot") || l.starts_with("CurrentSnapshot"))
        .map(|l| format!("{l}\n"))
        .collect();
    let from_list = parse::tree_from_machine_readable(&machinereadable::parse(&listing)).unwrap();
    assert_eq!(shape(&info.snapshots), shape(&from_list));
}

fn backend(r: ReplayRunner) -> (Arc<ReplayRunner>, VBoxManageHypervisor) {
    let r = Arc::new(r);
    (r.clone(), VBoxManageHypervisor::new(r))
}

#[tokio::test]
async fn resume_in_place_defaults_to_the_latest_snapshot_and_powers_off_first() {
    let listing = vboxmanage("snapshot-list-machinereadable__packer-plugin-virtualbox__1.txt");
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok(listing.clone())
            .then_ok(vboxmanage(
                "showvminfo-machinereadable__bioinfo-rio-vagrant__1.txt",
            ))
            .then_ok(vboxmanage(
                "showvminfo-machinereadable__bioinfo-rio-vagrant__1.txt",
            ))
            .then_ok("")
            .then_ok(listing)
            .then_ok("")
            .then_ok(vboxmanage("startvm__d-moto__1.txt")),
    );
    let report = resume::resume_in_place(&hv, &VmId::new("TM"), None)
        .await
        .unwrap();
    assert_eq!(
        r.lines(),
        [
            "VBoxManage snapshot TM list --machinereadable",
            "VBoxManage showvminfo TM --machinereadable",
            "VBoxManage showvminfo TM --machinereadable",
            "VBoxManage controlvm TM poweroff",
            "VBoxManage snapshot TM list --machinereadable",
            "VBoxManage snapshot TM restore c857d1b8-4fd6-4044-9d2c-c6e465b3cdd4",
            "VBoxManage startvm TM --type headless",
        ]
    );
    assert_eq!(
        report.actions(),
        [
            ResumeAction::SelectSnapshot,
            ResumeAction::PowerOff,
            ResumeAction::Restore,
            ResumeAction::Start
        ]
    );
    assert_eq!(report.snapshot_name, "Snapshot-Export");
}

#[tokio::test]
async fn restore_in_place_of_a_stopped_vm_by_name() {
    let listing = vboxmanage("snapshot-list-machinereadable__socbed__1.txt");
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok(listing.clone())
            .then_ok(vboxmanage("showvminfo-machinereadable__chef-ohai__1.txt"))
            .then_ok(vboxmanage("showvminfo-machinereadable__chef-ohai__1.txt"))
            .then_ok(listing)
            .then_ok(""),
    );
    let report = resume::restore_in_place(&hv, &VmId::new("w7"), Some("set autologin"))
        .await
        .unwrap();
    assert_eq!(
        r.lines()[4],
        "VBoxManage snapshot w7 restore 238006bc-a851-4b50-a151-3d9104d072c5"
    );
    assert_eq!(
        report.actions(),
        [ResumeAction::SelectSnapshot, ResumeAction::Restore]
    );
    // No snapshot to resume from is a typed error, and nothing else runs.
    let (r, hv) = backend(
        ReplayRunner::new().then(unacloud_vbox::manage::CommandOutput {
            exit_code: Some(1),
            stdout: "This machine does not have any snapshots\n".into(),
            stderr: String::new(),
        }),
    );
    let e = resume::resume_in_place(&hv, &VmId::new("w7"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            unacloud_core::Error::NotFound {
                kind: "snapshot",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(r.lines().len(), 1);
}

/// Lays out the Meta machine's folder as it is on its host: settings plus the files the
/// snapshot "Root. End Practice One" needs (the base disk is a template elsewhere).
fn meta_machine(root: &Path) -> PathBuf {
    let dir = root.join("Meta");
    std::fs::create_dir_all(dir.join("Snapshots")).unwrap();
    let vbox = dir.join("Meta.vbox");
    std::fs::copy(shared("vbox/joco-kad__teaching__Meta.vbox"), &vbox).unwrap();
    std::fs::write(
        dir.join("Snapshots/{3ff2d7f3-5f4c-49af-b1f2-43deef3e5743}.vmdk"),
        vec![7u8; 70_000],
    )
    .unwrap();
    std::fs::write(
        dir.join("Snapshots/2023-01-01T09-50-03-442257300Z.sav"),
        vec![1u8; 5_000],
    )
    .unwrap();
    vbox
}

#[tokio::test]
async fn resume_elsewhere_copies_the_minimal_set_registers_restores_and_starts() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let vbox = meta_machine(src.path());
    let listing = data("joco-kad__teaching__Meta.snapshot-list.txt");
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok("")
            .then_ok(vboxmanage("showvminfo-machinereadable__chef-ohai__1.txt"))
            .then_ok(listing)
            .then_ok("")
            .then_ok(""),
    );
    let options = ElsewhereOptions {
        preloaded: vec![Uuid::parse_str("785e73f9-b5f8-4bf2-b773-5742339ce359").unwrap()],
        ..Default::default()
    };
    let report = resume::resume_elsewhere(
        &hv,
        &vbox,
        Some("Root. End Practice One"),
        dest.path(),
        &options,
    )
    .await
    .unwrap();
    assert_eq!(
        report.actions(),
        [
            ResumeAction::SelectSnapshot,
            ResumeAction::ComputeFiles,
            ResumeAction::Copy,
            ResumeAction::Register,
            ResumeAction::Restore,
            ResumeAction::Start,
        ]
    );
    let copied = dest.path().join("Meta");
    assert!(copied.join("Meta.vbox").is_file());
    assert_eq!(
        std::fs::read(copied.join("Snapshots/{3ff2d7f3-5f4c-49af-b1f2-43deef3e5743}.vmdk"))
            .unwrap()
            .len(),
        70_000
    );
    assert!(copied
        .join("Snapshots/2023-01-01T09-50-03-442257300Z.sav")
        .is_file());
    // The other branch's files are not copied.
    assert!(!copied
        .join("Snapshots/{47ee5431-cd1b-4db2-9c81-0bdf843a52aa}.vmdk")
        .exists());
    let set = report.migration.as_ref().unwrap();
    assert_eq!(set.files.len(), 3);
    assert_eq!(set.expected_at_destination.len(), 1);
    let settings = report.registered_settings.clone().unwrap();
    let lines = r.lines();
    assert_eq!(
        lines[0],
        format!(
            "VBoxManage registervm {}",
            unacloud_vbox::manage::shell_quote(settings.to_str().unwrap())
        )
    );
    assert_eq!(
        lines[1..],
        [
            "VBoxManage showvminfo 9976cf7c-26c7-484f-88c7-e19d36c75596 --machinereadable",
            "VBoxManage snapshot 9976cf7c-26c7-484f-88c7-e19d36c75596 list --machinereadable",
            "VBoxManage snapshot 9976cf7c-26c7-484f-88c7-e19d36c75596 restore f92e4f98-f883-4a18-a20f-7d552eecc797",
            "VBoxManage startvm 9976cf7c-26c7-484f-88c7-e19d36c75596 --type headless",
        ]
    );
}

#[tokio::test]
async fn resume_elsewhere_refuses_files_outside_the_machine_folder_before_copying() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let vbox = meta_machine(src.path());
    let (r, hv) = backend(ReplayRunner::new());
    // Without the template preloaded, its absolute path outside the folder is refused.
    let e = resume::resume_elsewhere(
        &hv,
        &vbox,
        Some("Root. End Practice One"),
        dest.path(),
        &ElsewhereOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, unacloud_core::Error::InvalidInput(ref m) if m.contains("Metasploitable.vmdk")),
        "{e:?}"
    );
    assert!(r.lines().is_empty());
    assert_eq!(std::fs::read_dir(dest.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn in_memory_backend_resumes_too() {
    use unacloud_core::hypervisor::StartMode;
    use unacloud_core::memory::InMemoryHypervisor;
    use unacloud_core::model::{HardwareProfile, PowerState, VmSpec};
    let hv = InMemoryHypervisor::new();
    let vm = VmId::new("ring-1");
    hv.create_vm(&VmSpec::new("ring-1", HardwareProfile::Small))
        .await
        .unwrap();
    hv.start_vm(&vm, StartMode::Headless).await.unwrap();
    let s1 = hv.take_snapshot(&vm, "gs-1", None, true).await.unwrap();
    hv.take_snapshot(&vm, "gs-2", None, true).await.unwrap();
    let report = resume::resume_in_place(&hv, &vm, Some(&s1.id))
        .await
        .unwrap();
    assert_eq!(report.snapshot_name, "gs-1");
    assert_eq!(hv.vm_info(&vm).await.unwrap().state, PowerState::Running);
}

#[tokio::test]
async fn snapshot_tree_takes_state_files_and_time_stamps_from_the_settings_file() {
    let src = tempfile::tempdir().unwrap();
    let vbox = meta_machine(src.path());
    // The real chef-ohai sample, with its CfgFile pointed at a settings file on this host.
    let info: String = vboxmanage("showvminfo-machinereadable__chef-ohai__1.txt")
        .lines()
        .map(|l| {
            if l.starts_with("CfgFile=") {
                format!("CfgFile=\"{}\"\n", vbox.display())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok(data("joco-kad__teaching__Meta.snapshot-list.txt"))
            .then_ok(info),
    );
    let tree = hv.snapshot_tree(&VmId::new("Meta")).await.unwrap();
    assert_eq!(
        r.lines(),
        [
            "VBoxManage snapshot Meta list --machinereadable",
            "VBoxManage showvminfo Meta --machinereadable"
        ]
    );
    let n = tree.resolve("Root. End Practice One").unwrap();
    let s = tree.get(n).unwrap();
    assert_eq!(
        s.state_file.as_deref(),
        Some("Snapshots/2023-01-01T09-50-03-442257300Z.sav")
    );
    assert_eq!(s.time_stamp.as_deref(), Some("2023-01-01T09:50:03Z"));
    assert_eq!(
        tree.get(tree.current().unwrap()).unwrap().name,
        "Root Hacked - Student version"
    );
}

//! Each hypervisor operation of the VirtualBox backend runs exactly the expected
//! `VBoxManage` command lines (asserted through the replaying runner fed with real
//! outputs from `shared/fixtures/vboxmanage/`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use unacloud_core::hypervisor::{
    AttachSpec, CloneSpec, DiskRef, GuestCommand, Hypervisor, StartMode, Timeouts,
};
use unacloud_core::model::{DiskType, HardwareProfile, PowerState, Uuid, VmId, VmSpec};
use unacloud_vbox::manage::{
    CommandOutput, PasswordSource, ReplayRunner, Secret, VBoxManageHypervisor,
};

fn fixture(name: &str) -> String {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/vboxmanage"
    ))
    .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn backend(runner: ReplayRunner) -> (Arc<ReplayRunner>, VBoxManageHypervisor) {
    let r = Arc::new(runner);
    (r.clone(), VBoxManageHypervisor::new(r))
}

fn vm(s: &str) -> VmId {
    VmId::new(s)
}

#[tokio::test]
async fn list_vms_lists_then_shows_each_accessible_vm() {
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok(fixture("list-vms__sergueik-powershell-samples__1.txt"))
            .then_ok(fixture("showvminfo-machinereadable__go-virtualbox__1.txt")),
    );
    let vms = hv.list_vms().await.unwrap();
    assert_eq!(
        r.lines(),
        [
            "VBoxManage list vms",
            "VBoxManage showvminfo 93a38cd7-ef00-47aa-9868-d291d4ed5e0a --machinereadable",
        ]
    );
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0].state, PowerState::Saved);
    assert_eq!(vms[1].name, "<inaccessible>");
    assert_eq!(r.remaining(), 0);
}

#[tokio::test]
async fn vm_info_is_showvminfo_machinereadable() {
    let (r, hv) = backend(
        ReplayRunner::new().then_ok(fixture("showvminfo-machinereadable__chef-ohai__1.txt")),
    );
    let info = hv.vm_info(&vm("ubuntu")).await.unwrap();
    assert_eq!(
        r.lines(),
        ["VBoxManage showvminfo ubuntu --machinereadable"]
    );
    assert_eq!(
        info.current_snapshot.as_deref(),
        Some("085cbbec-70cd-4864-9208-5d938dcabb71")
    );
}

#[tokio::test]
async fn vm_not_found_is_a_typed_error() {
    let (_, hv) = backend(ReplayRunner::new().then_err(fixture(
        "error-showvminfo-not-found__cuckoo-issue1402__1.txt",
    )));
    let e = hv.vm_info(&vm("windows7")).await.unwrap_err();
    assert!(
        matches!(e, unacloud_core::Error::NotFound { kind: "vm", ref id } if id == "windows7"),
        "{e:?}"
    );
}

#[tokio::test]
async fn create_vm_registers_and_sets_profile_and_bridge() {
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok(fixture("createvm__ievms-issue3__1.txt"))
            .then_ok(""),
    );
    let mut spec = VmSpec::new("IE7", HardwareProfile::Large);
    spec.os_type = Some("WindowsXP".into());
    spec.bridge_adapter = Some("eth0".into());
    spec.base_folder = Some(PathBuf::from("/vms/lab 1"));
    let info = hv.create_vm(&spec).await.unwrap();
    assert_eq!(
        r.lines(),
        [
            "VBoxManage createvm --name IE7 --ostype WindowsXP --basefolder '/vms/lab 1' --register",
            "VBoxManage modifyvm IE7 --cpus 3 --memory 4096 --nic1 bridged --bridgeadapter1 eth0",
        ]
    );
    assert_eq!(
        info.uuid,
        Some(Uuid::parse_str("af538717-e19b-49c3-b135-1af50796dfc8").unwrap())
    );
    assert_eq!((info.cores, info.memory_mb), (3, 4096));
}

#[tokio::test]
async fn register_vm_reads_the_uuid_from_the_settings_file() {
    let vbox = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/vbox/joco-kad__teaching__Meta.vbox"
    ));
    let vbox = std::fs::canonicalize(vbox).unwrap();
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok("")
            .then_ok(fixture("showvminfo-machinereadable__chef-ohai__1.txt")),
    );
    hv.register_vm(&vbox).await.unwrap();
    let lines = r.lines();
    assert_eq!(
        lines[0],
        format!(
            "VBoxManage registervm {}",
            unacloud_vbox::manage::shell_quote(vbox.to_str().unwrap())
        )
    );
    assert_eq!(
        lines[1],
        "VBoxManage showvminfo 9976cf7c-26c7-484f-88c7-e19d36c75596 --machinereadable"
    );
    // A relative path is refused before anything runs.
    let (r, hv) = backend(ReplayRunner::new());
    assert!(hv.register_vm(Path::new("TM/TM.vbox")).await.is_err());
    assert!(r.lines().is_empty());
}

#[tokio::test]
async fn unregister_vm_with_and_without_delete() {
    let (r, hv) = backend(ReplayRunner::new().then_ok("").then_ok(""));
    hv.unregister_vm(&vm("TM"), false).await.unwrap();
    hv.unregister_vm(&vm("TM"), true).await.unwrap();
    assert_eq!(
        r.lines(),
        [
            "VBoxManage unregistervm TM",
            "VBoxManage unregistervm TM --delete"
        ]
    );
}

#[tokio::test]
async fn linked_clone_from_a_named_snapshot_uses_its_uuid() {
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok(fixture("snapshot-list-machinereadable__socbed__1.txt"))
            .then_ok(fixture("clonevm__unidentified-k8s-notes__1.txt"))
            .then_ok(fixture("showvminfo-machinereadable__chef-ohai__1.txt")),
    );
    let spec = CloneSpec {
        name: "k8s-node1".into(),
        snapshot: Some("imdisk".into()),
        linked: true,
    };
    hv.clone_vm(&vm("k8s-src"), &spec).await.unwrap();
    assert_eq!(
        r.lines(),
        [
            "VBoxManage snapshot k8s-src list --machinereadable",
            "VBoxManage clonevm k8s-src --name k8s-node1 --snapshot acf23d84-479c-4a4c-8c5e-ccd8f28b14c3 --options link --register",
            "VBoxManage showvminfo k8s-node1 --machinereadable",
        ]
    );
    // A linked clone without a snapshot is refused before anything runs.
    let (r, hv) = backend(ReplayRunner::new());
    let spec = CloneSpec {
        name: "c".into(),
        snapshot: None,
        linked: true,
    };
    assert!(matches!(
        hv.clone_vm(&vm("src"), &spec).await,
        Err(unacloud_core::Error::InvalidInput(_))
    ));
    assert!(r.lines().is_empty());
}

#[tokio::test]
async fn power_operations() {
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok(fixture("startvm__d-moto__1.txt"))
            .then_ok("")
            .then_ok("")
            .then_ok("")
            .then_ok("")
            .then_ok(""),
    );
    hv.start_vm(&vm("AlmaLinux9"), StartMode::Headless)
        .await
        .unwrap();
    hv.start_vm(&vm("AlmaLinux9"), StartMode::Gui)
        .await
        .unwrap();
    hv.pause(&vm("AlmaLinux9")).await.unwrap();
    hv.resume(&vm("AlmaLinux9")).await.unwrap();
    hv.save_state(&vm("AlmaLinux9")).await.unwrap();
    hv.power_off(&vm("AlmaLinux9")).await.unwrap();
    assert_eq!(
        r.lines(),
        [
            "VBoxManage startvm AlmaLinux9 --type headless",
            "VBoxManage startvm AlmaLinux9 --type gui",
            "VBoxManage controlvm AlmaLinux9 pause",
            "VBoxManage controlvm AlmaLinux9 resume",
            "VBoxManage controlvm AlmaLinux9 savestate",
            "VBoxManage controlvm AlmaLinux9 poweroff",
        ]
    );
    // Each class of command gets its own limit.
    let calls = r.calls();
    let limits = Timeouts::default();
    assert_eq!(calls[0].timeout, limits.power);
    assert_eq!(calls[4].timeout, limits.snapshot);
}

#[tokio::test]
async fn take_snapshot_live_with_description() {
    let (r, hv) = backend(
        ReplayRunner::new()
            .then(CommandOutput {
                exit_code: Some(0),
                stdout: "Snapshot taken. UUID: 947ad21d-2cad-4e64-80cc-2ff819d1be4e\n".into(),
                stderr: "0%...10%...20%...30%...40%...50%...60%...70%...80%...90%...100%\n".into(),
            })
            .then_ok(fixture(
                "snapshot-take__unidentified-vbox-aliases-readme__1.txt",
            )),
    );
    let s = hv
        .take_snapshot(&vm("TM"), "Snapshot 1", Some("before the run"), true)
        .await
        .unwrap();
    assert_eq!(s.id, "947ad21d-2cad-4e64-80cc-2ff819d1be4e");
    assert_eq!(s.name, "Snapshot 1");
    hv.take_snapshot(&vm("nginx1"), "plain", None, false)
        .await
        .unwrap();
    assert_eq!(
        r.lines(),
        [
            "VBoxManage snapshot TM take 'Snapshot 1' '--description=before the run' --live",
            "VBoxManage snapshot nginx1 take plain",
        ]
    );
}

#[tokio::test]
async fn restore_and_delete_resolve_names_to_uuids_first() {
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok(fixture(
                "snapshot-list-machinereadable__packer-plugin-virtualbox__1.txt",
            ))
            .then_ok("")
            .then_ok(fixture(
                "snapshot-list-machinereadable__packer-plugin-virtualbox__1.txt",
            ))
            .then_ok("")
            .then_ok("")
            .then_ok(fixture(
                "snapshot-list-machinereadable__packer-plugin-virtualbox__1.txt",
            )),
    );
    hv.restore_snapshot(&vm("packer"), "Snapshot-Export")
        .await
        .unwrap();
    hv.delete_snapshot(&vm("packer"), "Snapshot 9")
        .await
        .unwrap();
    hv.restore_current(&vm("packer")).await.unwrap();
    // An ambiguous name runs nothing after the listing.
    let e = hv
        .restore_snapshot(&vm("packer"), "Snapshot 2")
        .await
        .unwrap_err();
    assert!(
        matches!(e, unacloud_core::Error::AmbiguousName { .. }),
        "{e:?}"
    );
    assert_eq!(
        r.lines(),
        [
            "VBoxManage snapshot packer list --machinereadable",
            "VBoxManage snapshot packer restore c857d1b8-4fd6-4044-9d2c-c6e465b3cdd4",
            "VBoxManage snapshot packer list --machinereadable",
            "VBoxManage snapshot packer delete a5903505-9261-4bd3-9972-bacd0064d667",
            "VBoxManage snapshot packer restorecurrent",
            "VBoxManage snapshot packer list --machinereadable",
        ]
    );
}

#[tokio::test]
async fn snapshot_tree_of_a_vm_without_snapshots_is_empty() {
    // VBoxManageSnapshot.cpp prints a notice on stdout and exits 1 without an error line.
    let (r, hv) = backend(ReplayRunner::new().then(CommandOutput {
        exit_code: Some(1),
        stdout: "This machine does not have any snapshots\n".into(),
        stderr: String::new(),
    }));
    let t = hv.snapshot_tree(&vm("TM")).await.unwrap();
    assert!(t.is_empty());
    assert_eq!(r.lines(), ["VBoxManage snapshot TM list --machinereadable"]);
    // A real error is still an error.
    let (_, hv) = backend(ReplayRunner::new().then_err(fixture(
        "error-vm-not-found-windows__macos-virtualbox-issue9__1.txt",
    )));
    assert!(matches!(
        hv.snapshot_tree(&vm("Mojave")).await,
        Err(unacloud_core::Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn disks_list_register_type_close() {
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok(fixture("list-hdds__chef-ohai__1.txt"))
            .then_ok(fixture("showhdinfo__boinc__1.txt"))
            .then_ok("")
            .then_ok("")
            .then_ok(""),
    );
    let disks = hv.list_disks().await.unwrap();
    assert_eq!(disks.len(), 2);
    let d = hv
        .register_disk(Path::new("/path to/disk/parent_disk_name.vdi"))
        .await
        .unwrap();
    assert_eq!(d.disk_type, DiskType::MultiAttach);
    hv.set_disk_type(&DiskRef::Path("/t/base.vdi".into()), DiskType::MultiAttach)
        .await
        .unwrap();
    let u = Uuid::parse_str("1d9935fd-37c9-4c34-946b-f6d252c6a1af").unwrap();
    hv.unregister_disk(&DiskRef::Uuid(u), false).await.unwrap();
    hv.unregister_disk(&DiskRef::Path("/t/old.vdi".into()), true)
        .await
        .unwrap();
    assert_eq!(
        r.lines(),
        [
            "VBoxManage list hdds",
            "VBoxManage showmediuminfo disk '/path to/disk/parent_disk_name.vdi'",
            "VBoxManage modifymedium disk /t/base.vdi --type multiattach",
            "VBoxManage closemedium disk 1d9935fd-37c9-4c34-946b-f6d252c6a1af",
            "VBoxManage closemedium disk /t/old.vdi --delete",
        ]
    );
}

#[tokio::test]
async fn closemedium_in_use_maps_to_in_use() {
    // The layout of the real samples with the VBOX_E_OBJECT_IN_USE code.
    let stderr = "VBoxManage: error: Cannot close medium '/t/base.vdi' because it has 1 child media\n\
                  VBoxManage: error: Details: code VBOX_E_OBJECT_IN_USE (0x80bb000c), component MediumWrap, interface IMedium, callee nsISupports\n";
    let (_, hv) = backend(ReplayRunner::new().then_err(stderr));
    let e = hv
        .unregister_disk(&DiskRef::Path("/t/base.vdi".into()), false)
        .await
        .unwrap_err();
    assert!(
        matches!(e, unacloud_core::Error::InUse { ref id, .. } if id == "/t/base.vdi"),
        "{e:?}"
    );
}

#[tokio::test]
async fn attach_multiattach_template_creates_controller_and_reports_the_child() {
    let (r, hv) = backend(
        ReplayRunner::new()
            // No "SATA" controller yet (this VM names its controllers "… Controller").
            .then_ok(fixture("showvminfo-machinereadable__go-virtualbox__1.txt"))
            .then_ok("")
            .then_ok(fixture("showhdinfo__boinc__1.txt"))
            .then_ok("")
            // Afterwards the VM has a "SATA" controller with the differencing child.
            .then_ok(fixture("showvminfo-machinereadable__vedv__1.txt"))
            .then_ok(fixture(
                "showmediuminfo__sergueik-powershell-samples__1.txt",
            )),
    );
    let spec = AttachSpec::sata(DiskRef::Path("/path to/disk/parent_disk_name.vdi".into()));
    let d = hv.attach_disk(&vm("web1"), &spec).await.unwrap();
    assert_eq!(
        r.lines(),
        [
            "VBoxManage showvminfo web1 --machinereadable",
            "VBoxManage storagectl web1 --name SATA --add sata --controller IntelAhci",
            "VBoxManage showmediuminfo disk '/path to/disk/parent_disk_name.vdi'",
            "VBoxManage storageattach web1 --storagectl SATA --port 0 --device 0 --type hdd --medium '/path to/disk/parent_disk_name.vdi' --mtype multiattach",
            "VBoxManage showvminfo web1 --machinereadable",
            "VBoxManage showmediuminfo disk 37a0bb6b-4292-464e-b766-1e8b7101ec94",
        ]
    );
    assert_eq!(
        d.uuid,
        Uuid::parse_str("e31692be-ff5c-424f-818d-07a377758041").unwrap()
    );
}

#[tokio::test]
async fn attach_normal_disk_to_existing_controller() {
    let (r, hv) = backend(
        ReplayRunner::new()
            .then_ok(fixture("showvminfo-machinereadable__go-virtualbox__1.txt"))
            .then_ok(fixture("list-hdds__sergueik-powershell-samples__1.txt"))
            .then_ok(""),
    );
    let spec = AttachSpec {
        disk: DiskRef::Uuid(Uuid::parse_str("e31692be-ff5c-424f-818d-07a377758041").unwrap()),
        controller: "SATA Controller".into(),
        port: 1,
        device: 0,
    };
    hv.attach_disk(&vm("go-virtualbox"), &spec).await.unwrap();
    assert_eq!(
        r.lines()[1..],
        [
            "VBoxManage showmediuminfo disk e31692be-ff5c-424f-818d-07a377758041",
            "VBoxManage storageattach go-virtualbox --storagectl 'SATA Controller' --port 1 --device 0 --type hdd --medium e31692be-ff5c-424f-818d-07a377758041",
        ]
    );
}

fn guest_cmd(password: Option<&str>) -> GuestCommand {
    GuestCommand {
        program: "/usr/sbin/iptables".into(),
        args: vec!["-t".into(), "mangle".into(), "-L".into()],
        username: "root".into(),
        password: password.map(str::to_owned),
        timeout: Some(Duration::from_secs(5)),
    }
}

#[tokio::test]
async fn guest_run_passes_the_password_on_stdin_never_on_the_command_line() {
    let (r, hv) = backend(ReplayRunner::new().then(CommandOutput {
        exit_code: Some(32 + 3),
        stdout: "out\n".into(),
        stderr: String::new(),
    }));
    let out = hv
        .guest_run(&vm("TM"), &guest_cmd(Some("s3cr3t-pw")))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 3);
    let calls = r.calls();
    assert_eq!(
        calls[0].shell_line(),
        "VBoxManage guestcontrol TM run --username root --passwordfile stdin --exe /usr/sbin/iptables --timeout 5000 --wait-stdout --wait-stderr -- /usr/sbin/iptables -t mangle -L"
    );
    assert_eq!(calls[0].stdin_len, Some("s3cr3t-pw".len()));
    assert!(!calls[0].args.iter().any(|a| a.contains("s3cr3t-pw")));
    // Debug output of the command never shows it either.
    assert!(!format!("{:?}", guest_cmd(Some("s3cr3t-pw"))).contains("s3cr3t-pw"));
    let built =
        unacloud_vbox::manage::command::guest_run("TM", &guest_cmd(Some("s3cr3t-pw")), None)
            .unwrap();
    assert!(!format!("{built:?}").contains("s3cr3t-pw"));
    assert!(!built.shell_line().contains("s3cr3t-pw"));
}

#[tokio::test]
async fn guest_run_with_a_password_file_names_the_file() {
    let runner = Arc::new(ReplayRunner::new().then_ok(""));
    let hv = VBoxManageHypervisor::new(runner.clone()).with_guest_password(PasswordSource::File(
        PathBuf::from("/etc/unacloud/guest.pw"),
    ));
    let out = hv.guest_run(&vm("TM"), &guest_cmd(None)).await.unwrap();
    assert_eq!(out.exit_code, 0);
    let c = &runner.calls()[0];
    assert!(c
        .shell_line()
        .contains("--passwordfile /etc/unacloud/guest.pw --exe"));
    assert_eq!(c.stdin_len, None);
    let dbg = format!("{:?}", PasswordSource::Value(Secret::new("zzz-secret")));
    assert!(!dbg.contains("zzz-secret"));
}

#[tokio::test]
async fn guest_run_failures_are_classified() {
    let (_, hv) = backend(ReplayRunner::new().then_err(fixture(
        "error-guestcontrol-run__sergueik-powershell-samples__4.txt",
    )));
    assert!(matches!(
        hv.guest_run(&vm("TM"), &guest_cmd(Some("x"))).await,
        Err(unacloud_core::Error::AccessDenied { .. })
    ));
    let (_, hv) = backend(ReplayRunner::new().then_err(fixture(
        "error-guestcontrol-run__sergueik-powershell-samples__2.txt",
    )));
    assert!(matches!(
        hv.guest_run(&vm("TM"), &guest_cmd(Some("x"))).await,
        Err(unacloud_core::Error::InvalidState { .. })
    ));
    let (_, hv) = backend(ReplayRunner::new().then(CommandOutput::failed(20, "")));
    assert!(matches!(
        hv.guest_run(&vm("TM"), &guest_cmd(Some("x"))).await,
        Err(unacloud_core::Error::Timeout { .. })
    ));
}

#[test]
fn guest_exit_codes_follow_vboxmanage_mapping() {
    use unacloud_vbox::manage::{guest_exit, GuestExit};
    let e = |c| {
        guest_exit(&CommandOutput {
            exit_code: Some(c),
            ..Default::default()
        })
    };
    assert_eq!(e(0), GuestExit::Exited(0));
    assert_eq!(e(33), GuestExit::Exited(1));
    assert_eq!(e(125), GuestExit::Exited(93));
    assert_eq!(e(126), GuestExit::Exited(126));
    assert_eq!(e(18), GuestExit::Abnormal("was killed by a signal"));
    assert_eq!(e(1), GuestExit::Failed);
}

#[tokio::test]
async fn version_query() {
    let (r, hv) =
        backend(ReplayRunner::new().then_ok(fixture("version__minikube-issue2522__1.txt")));
    let v = hv.version().await.unwrap();
    assert_eq!((v.major, v.minor, v.build), (5, 2, 6));
    assert_eq!(r.lines(), ["VBoxManage --version"]);
}

#[tokio::test]
async fn exhausted_replay_script_is_an_error_not_a_panic() {
    let (_, hv) = backend(ReplayRunner::new());
    let e = hv
        .start_vm(&vm("TM"), StartMode::Headless)
        .await
        .unwrap_err();
    // The vbox error crosses into the core whole: its variant stays reachable.
    match &e {
        unacloud_core::Error::Generic { source, .. } => assert!(
            matches!(
                source.downcast_ref::<unacloud_vbox::Error>(),
                Some(unacloud_vbox::Error::UnexpectedOutput { .. })
            ),
            "{e:?}"
        ),
        other => panic!("{other:?}"),
    }
}

//! The QEMU backend running real VMs (TCG here): the reference guest image
//! (`scripts/guest-image`) boots, is snapshotted live with its memory, restored, moved to
//! another host root, saved, killed and found again. Guests print `heartbeat <n>` once a
//! second, which shows what state a restored guest continues from.
//!
//! These tests need `qemu-system-x86_64` and the guest image (`./scripts/test` builds
//! it). Without them each test says so and returns, except under CI (`CI` set), where a
//! missing prerequisite is a failure.

#![allow(clippy::unwrap_used)]

#[path = "../../testsupport/skip.rs"]
mod skip;
#[path = "../../testsupport/tmpfs.rs"]
mod tmpfs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use unacloud_core::hypervisor::{AttachSpec, DiskRef, Hypervisor};
use unacloud_core::model::{DiskType, HardwareProfile, PowerState, VmId, VmSpec};
use unacloud_core::qemu::{
    kill_all_under, last_heartbeat, Accel, BootFiles, NetConfig, QemuHypervisor, QemuImg,
    QemuSystem, StartOptions,
};
use unacloud_core::Error;

/// One VM test at a time: two cores emulate one guest well, several badly.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const BOOT: Duration = Duration::from_secs(90);

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    template: PathBuf,
}

fn guest() -> Option<Guest> {
    let dir = std::env::var_os("UNACLOUD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"));
    let g = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        template: dir.join("rootfs.qcow2"),
    };
    let have_qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let ok = have_qemu && g.kernel.exists() && g.initrd.exists() && g.template.exists();
    if ok {
        return Some(g);
    }
    let why = format!(
        "needs qemu-system-x86_64 and the guest image in {} (run ./scripts/guest-image)",
        dir.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    skip::skipped(why);
    None
}

/// Kills every VM under its root when dropped, also when a test fails.
struct Reaper(PathBuf);
impl Drop for Reaper {
    fn drop(&mut self) {
        kill_all_under(&self.0);
    }
}

fn tcg() -> QemuSystem {
    QemuSystem::new().with_accel(Accel::Tcg)
}

/// A host root with its own copy of the template (registered multiattach, with the
/// image's boot files).
async fn host(dir: &Path, name: &str, g: &Guest) -> (QemuHypervisor, uuid::Uuid) {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("templates")).unwrap();
    let t = root.join("templates").join("rootfs.qcow2");
    std::fs::copy(&g.template, &t).unwrap();
    let hv = QemuHypervisor::open_configured(&root, QemuImg::new(), tcg())
        .await
        .unwrap();
    let d = hv.register_disk(&t).await.unwrap();
    hv.set_disk_type(&DiskRef::Uuid(d.uuid), DiskType::MultiAttach)
        .await
        .unwrap();
    hv.set_boot_files(
        &DiskRef::Uuid(d.uuid),
        BootFiles {
            kernel: g.kernel.clone(),
            initrd: Some(g.initrd.clone()),
            cmdline: Some("quiet".into()),
        },
    )
    .await
    .unwrap();
    (hv, d.uuid)
}

async fn vm_on(hv: &QemuHypervisor, template: uuid::Uuid, name: &str) -> VmId {
    let spec = VmSpec::new(name, HardwareProfile::Small)
        .with_memory_mb(128)
        .with_cores(1);
    hv.create_vm(&spec).await.unwrap();
    let id = VmId::from(name);
    hv.attach_disk(&id, &AttachSpec::sata(DiskRef::Uuid(template)))
        .await
        .unwrap();
    id
}

async fn heartbeat(hv: &QemuHypervisor, vm: &VmId) -> Option<u64> {
    let (log, off) = hv.console(vm).await.unwrap();
    last_heartbeat(&log, off)
}

/// Waits until the guest's heartbeat reaches `at_least`; returns it.
async fn wait_heartbeat(hv: &QemuHypervisor, vm: &VmId, at_least: u64) -> u64 {
    let until = Instant::now() + BOOT;
    loop {
        if let Some(h) = heartbeat(hv, vm).await {
            if h >= at_least {
                return h;
            }
        }
        assert!(Instant::now() < until, "heartbeat {at_least} never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new host root `a` under `dir` with the VM `pc-1` booted to its first heartbeat.
async fn booted_pc1(dir: &Path, g: &Guest) -> (QemuHypervisor, PathBuf, VmId) {
    let (hv, t) = host(dir, "a", g).await;
    let vm = vm_on(&hv, t, "pc-1").await;
    hv.start_vm_with(&vm, wait_guest()).await.unwrap();
    (hv, dir.join("a"), vm)
}

/// Whether the settings file records an operation under way.
fn pending_in(settings_file: &Path) -> bool {
    std::fs::read_to_string(settings_file)
        .unwrap_or_default()
        .contains("\"pending\": {")
}

fn wait_guest() -> StartOptions {
    StartOptions {
        wait_guest: Some(BOOT),
    }
}

/// Copies every file of `set` from `src_folder` to the same relative place under
/// `dst_folder`; returns the copied settings file and the bytes copied.
fn copy_set(
    set: &unacloud_core::files::MigrationSet,
    src_folder: &Path,
    dst_folder: &Path,
) -> (PathBuf, u64) {
    let mut settings = None;
    let mut bytes = 0;
    for f in &set.files {
        let rel = f.path.strip_prefix(src_folder).unwrap();
        let to = dst_folder.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        bytes += std::fs::copy(&f.path, &to).unwrap();
        if f.role == unacloud_core::files::FileRole::Settings {
            settings = Some(to);
        }
    }
    (settings.unwrap(), bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_snapshot_restores_memory_here_and_on_another_host() {
    let Some(g) = guest() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _reap = Reaper(dir.path().to_path_buf());
    let (a, ta) = host(dir.path(), "a", &g).await;
    let (b, _tb) = host(dir.path(), "b", &g).await;
    let vm = vm_on(&a, ta, "ring-1").await;

    let started = a.start_vm_with(&vm, wait_guest()).await.unwrap();
    assert!(started.boot_ms.is_some() && started.first_heartbeat.is_some());
    assert_eq!(a.vm_info(&vm).await.unwrap().state, PowerState::Running);

    // Pause stops the guest: no heartbeat while paused.
    wait_heartbeat(&a, &vm, 2).await;
    a.pause(&vm).await.unwrap();
    assert_eq!(a.vm_info(&vm).await.unwrap().state, PowerState::Paused);
    let frozen = heartbeat(&a, &vm).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        heartbeat(&a, &vm).await.unwrap(),
        frozen,
        "a paused guest ran"
    );
    a.resume(&vm).await.unwrap();
    let h0 = wait_heartbeat(&a, &vm, frozen + 1).await;

    // A live snapshot: the guest keeps running.
    let before = heartbeat(&a, &vm).await.unwrap();
    let report = a.take_snapshot_with(&vm, "s1", None, true).await.unwrap();
    let after = heartbeat(&a, &vm).await.unwrap();
    assert!(report.with_memory && report.state_bytes > 0, "{report:?}");
    assert!(report.downtime_ms <= report.total_ms);
    assert_eq!(a.vm_info(&vm).await.unwrap().state, PowerState::Running);
    let later = wait_heartbeat(&a, &vm, after + 4).await;
    assert!(later >= h0 + 4);

    // The minimal set for s1: settings, the VM's own chain, s1's memory; the template
    // is expected at the destination.
    let set = a.snapshot_files(&vm, "s1").await.unwrap();
    let roles: Vec<&str> = set.files.iter().map(|f| f.role.as_str()).collect();
    assert_eq!(roles[0], "settings");
    assert_eq!(*roles.last().unwrap(), "saved-state");
    assert!(roles.iter().filter(|r| **r == "disk").count() >= 1);
    assert_eq!(set.expected_at_destination.len(), 1);
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    let template_bytes = std::fs::metadata(dir.path().join("a/templates/rootfs.qcow2"))
        .unwrap()
        .len();
    assert!(
        set.files.iter().all(|f| !f.path.ends_with("rootfs.qcow2")),
        "the template was listed"
    );

    // Pull the plug, restore s1, start: the guest continues from s1, not from 1 (a
    // reboot) and not from the latest value.
    a.power_off(&vm).await.unwrap();
    assert_eq!(a.vm_info(&vm).await.unwrap().state, PowerState::PoweredOff);
    a.restore_snapshot(&vm, "s1").await.unwrap();
    assert_eq!(a.vm_info(&vm).await.unwrap().state, PowerState::Saved);
    let resumed = a.start_vm_with(&vm, wait_guest()).await.unwrap();
    assert!(resumed.resumed_state);
    let h = resumed.first_heartbeat.unwrap();
    assert!(
        h >= before && h <= after + 2 && h < later,
        "restored guest printed heartbeat {h}; snapshot taken between {before} and {after}, latest before power-off {later}"
    );

    // Save state and start again: the guest continues from where it was saved.
    let at_save = wait_heartbeat(&a, &vm, h + 2).await;
    a.save_state(&vm).await.unwrap();
    assert_eq!(a.vm_info(&vm).await.unwrap().state, PowerState::Saved);
    let saved_file = a
        .vm_files(&vm)
        .await
        .unwrap()
        .files
        .into_iter()
        .find(|f| f.role.as_str() == "saved-state")
        .unwrap()
        .path;
    // A truncated state file is refused with a typed error and the VM stays Saved.
    let good = std::fs::read(&saved_file).unwrap();
    std::fs::write(&saved_file, &good[..good.len() / 3]).unwrap();
    match a.start_vm_with(&vm, wait_guest()).await {
        Err(Error::Corrupt { what, .. }) => assert_eq!(what, "saved VM state"),
        other => panic!("a truncated state started: {other:?}"),
    }
    assert_eq!(a.vm_info(&vm).await.unwrap().state, PowerState::Saved);
    assert_eq!(
        a.vm_pid(&vm).await.unwrap(),
        None,
        "a failed start left a process"
    );
    std::fs::write(&saved_file, &good).unwrap();
    let again = a.start_vm_with(&vm, wait_guest()).await.unwrap();
    let h2 = again.first_heartbeat.unwrap();
    assert!(
        h2 >= at_save && h2 <= at_save + 3,
        "saved at {at_save}, continued at {h2}"
    );
    assert!(!saved_file.exists(), "the used save-state file was kept");
    a.power_off(&vm).await.unwrap();

    // Move s1 to host b: copy the minimal set, register, the chain re-links to b's own
    // template, and the guest continues from s1 there too.
    let src_folder = a
        .vm_settings(&vm)
        .await
        .map(|_| dir.path().join("a/vms/ring-1"))
        .unwrap();
    let (settings, bytes) = copy_set(&set, &src_folder, &dir.path().join("b/vms/ring-1"));
    let disk_bytes: u64 = set
        .files
        .iter()
        .filter(|f| f.role.as_str() == "disk")
        .filter_map(|f| f.bytes)
        .sum();
    assert!(
        disk_bytes < template_bytes,
        "moved {disk_bytes} bytes of disk, template {template_bytes}"
    );
    assert_eq!(bytes, set.total_bytes());
    let info = b.register_vm(&settings).await.unwrap();
    assert_eq!(
        info.state,
        PowerState::Saved,
        "registered at s1 with its memory"
    );
    b.restore_snapshot(&vm, "s1").await.unwrap();
    let there = b.start_vm_with(&vm, wait_guest()).await.unwrap();
    let hb = there.first_heartbeat.unwrap();
    assert!(
        hb >= before && hb <= after + 2,
        "moved guest continued at {hb}"
    );
    let chain = b.backing_chains(&vm).await.unwrap();
    assert!(chain[0]
        .last()
        .unwrap()
        .filename
        .starts_with(&*dir.path().join("b/templates").to_string_lossy()));
    b.power_off(&vm).await.unwrap();

    // Deleting the snapshot merges it away; the VM still starts from its disk.
    a.delete_snapshot(&vm, "s1").await.unwrap();
    assert!(a.snapshot_tree(&vm).await.unwrap().is_empty());
    a.unregister_vm(&vm, true).await.unwrap();
    assert!(
        !dir.path().join("a/vms/ring-1").exists(),
        "files were left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_backend_finds_its_vms_and_a_killed_vm_is_aborted() {
    let Some(g) = guest() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _reap = Reaper(dir.path().to_path_buf());
    let (hv, root, vm) = booted_pc1(dir.path(), &g).await;
    let good = hv
        .take_snapshot_with(&vm, "good", None, true)
        .await
        .unwrap();
    assert!(good.with_memory);
    let pid = hv.vm_pid(&vm).await.unwrap().unwrap();
    drop(hv);

    // A new backend on the same root sees the VM running, and refuses a snapshot for
    // which the disk has no room, leaving the VM running and its snapshots as they were.
    let hv = QemuHypervisor::open_configured(&root, QemuImg::new(), tcg())
        .await
        .unwrap()
        .with_space_margin(u64::MAX / 4);
    assert_eq!(hv.vm_info(&vm).await.unwrap().state, PowerState::Running);
    assert_eq!(hv.vm_pid(&vm).await.unwrap(), Some(pid));
    match hv.take_snapshot_with(&vm, "too big", None, true).await {
        Err(Error::InsufficientSpace {
            needed, available, ..
        }) => assert!(needed > available),
        other => panic!("expected InsufficientSpace, got {other:?}"),
    }
    assert_eq!(hv.snapshot_tree(&vm).await.unwrap().len(), 1);
    assert_eq!(hv.vm_info(&vm).await.unwrap().state, PowerState::Running);
    drop(hv);
    let hv = QemuHypervisor::open_configured(&root, QemuImg::new(), tcg())
        .await
        .unwrap();

    // SIGKILL of QEMU in the middle of a snapshot: that snapshot fails, the VM is
    // Aborted, the last good snapshot restores and runs.
    let h = heartbeat(&hv, &vm).await.unwrap();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let r = hv.take_snapshot_with(&vm, "interrupted", None, false).await;
    killer.await.unwrap();
    let tree = hv.snapshot_tree(&vm).await.unwrap();
    let names: Vec<String> = tree
        .iter()
        .filter_map(|(n, _)| tree.get(n))
        .map(|s| s.name.clone())
        .collect();
    if r.is_err() {
        assert_eq!(names, ["good"]);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(hv.vm_info(&vm).await.unwrap().state, PowerState::Aborted);
    // Nothing of an unfinished snapshot is left but what the settings name.
    drop(hv);
    let hv = QemuHypervisor::open_configured(&root, QemuImg::new(), tcg())
        .await
        .unwrap();
    assert_eq!(hv.vm_info(&vm).await.unwrap().state, PowerState::Aborted);
    assert!(hv.vm_settings(&vm).await.unwrap().pending.is_none());
    hv.restore_snapshot(&vm, "good").await.unwrap();
    let back = hv.start_vm_with(&vm, wait_guest()).await.unwrap();
    assert!(back.first_heartbeat.unwrap() <= h + 2);
    hv.power_off(&vm).await.unwrap();
}

#[tokio::test]
async fn a_missing_qemu_system_names_its_package() {
    let dir = tempfile::tempdir().unwrap();
    let hv = QemuHypervisor::open_configured(
        dir.path().join("h"),
        QemuImg::new(),
        QemuSystem::new()
            .with_program(dir.path().join("no-qemu-system"))
            .with_accel(Accel::Tcg),
    )
    .await
    .unwrap();
    hv.create_vm(&VmSpec::new("x", HardwareProfile::Small))
        .await
        .unwrap();
    let img = dir.path().join("d.qcow2");
    QemuImg::new().create(&img, "qcow2", 1 << 20).await.unwrap();
    let d = hv.register_disk(&img).await.unwrap();
    hv.attach_disk(&VmId::from("x"), &AttachSpec::sata(DiskRef::Uuid(d.uuid)))
        .await
        .unwrap();
    match hv
        .start_vm_with(&VmId::from("x"), StartOptions::default())
        .await
    {
        Err(Error::Unsupported { reason, .. }) => {
            assert!(reason.contains("qemu-system-x86"), "{reason}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert_eq!(
        hv.vm_info(&VmId::from("x")).await.unwrap().state,
        PowerState::PoweredOff
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_in_a_namespace_reaches_the_guest_at_its_address() {
    let Some(g) = guest() else { return };
    if !nix::unistd::Uid::effective().is_root() {
        skip::skipped("creating a network namespace needs root");
        return;
    }
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _reap = Reaper(dir.path().to_path_buf());
    let ns = format!("ucvm{}", std::process::id());
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let ip = |args: &[&str]| {
        let st = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    };
    ip(&["netns", "add", &ns]);
    let _ns = Ns(ns.clone());
    let (hv, t) = host(dir.path(), "a", &g).await;
    let vm = vm_on(&hv, t, "net-1").await;
    let uuid = hv.vm_info(&vm).await.unwrap().uuid.unwrap();
    let mac = unacloud_core::qemu::mac_for(&uuid);
    let net = NetConfig::parse(&format!("tap:{ns}:tap0:10.77.0.2/24"), &mac).unwrap();
    hv.set_vm_network(&vm, net).await.unwrap();
    hv.start_vm_with(&vm, wait_guest()).await.unwrap();
    ip(&["-n", &ns, "addr", "add", "10.77.0.1/24", "dev", "tap0"]);
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    let ping = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "ping",
            "-c",
            "3",
            "-W",
            "3",
            "10.77.0.2",
        ])
        .output()
        .unwrap();
    hv.power_off(&vm).await.unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
}

#[tokio::test]
async fn an_auto_accelerator_is_chosen_by_a_probe_and_remembered() {
    let Some(g) = guest() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("h");
    let hv = QemuHypervisor::open_configured(
        &root,
        QemuImg::new(),
        QemuSystem::new().with_probe_deadline(Duration::from_secs(8)),
    )
    .await
    .unwrap();
    let img = dir.path().join("d.qcow2");
    QemuImg::new().create(&img, "qcow2", 1 << 20).await.unwrap();
    let d = hv.register_disk(&img).await.unwrap();
    hv.create_vm(&VmSpec::new("p", HardwareProfile::Small))
        .await
        .unwrap();
    hv.attach_disk(&VmId::from("p"), &AttachSpec::sata(DiskRef::Uuid(d.uuid)))
        .await
        .unwrap();
    hv.set_vm_boot(
        &VmId::from("p"),
        Some(BootFiles {
            kernel: g.kernel.clone(),
            initrd: Some(g.initrd.clone()),
            cmdline: None,
        }),
    )
    .await
    .unwrap();
    let chosen = hv.accelerator(Some(&VmId::from("p"))).await.unwrap();
    assert!(matches!(chosen, Accel::Kvm | Accel::Tcg));
    let record = std::fs::read_to_string(root.join("accel.json")).unwrap();
    assert!(record.contains(&chosen.to_string()), "{record}");
    // Remembered: a second backend does not probe again (the record is not rewritten).
    drop(hv);
    let written = std::fs::metadata(root.join("accel.json"))
        .unwrap()
        .modified()
        .unwrap();
    let hv = QemuHypervisor::open(&root).await.unwrap();
    assert_eq!(
        hv.accelerator(Some(&VmId::from("p"))).await.unwrap(),
        chosen
    );
    let now = std::fs::metadata(root.join("accel.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(written, now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_vm_contract_holds_for_real_vms() {
    let Some(g) = guest() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _reap = Reaper(dir.path().to_path_buf());
    let (hv, t) = host(dir.path(), "a", &g).await;
    // The registry part of the suite registers its own (non-bootable) image.
    let plain = dir.path().join("plain.qcow2");
    QemuImg::new()
        .create(&plain, "qcow2", 4 << 20)
        .await
        .unwrap();
    let env = unacloud_core::conformance::ConformanceEnv::new(&plain)
        .with_bootable(DiskRef::Uuid(t), 128);
    let report = unacloud_core::conformance::run_all(&hv, &env).await;
    // The guest has no agent: guests report on their console instead.
    let skipped: Vec<_> = report.skipped.iter().map(|s| s.0).collect();
    assert_eq!(skipped, ["guest run"], "{report:?}");
    assert!(report.passed.contains(&"power cycle"));
    assert!(report.passed.contains(&"register vm"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_during_a_snapshot_fails_it_and_keeps_the_vm() {
    let Some(g) = guest() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    let Some(_mount) = tmpfs::SmallFs::mount(&small, "320m") else {
        return;
    };
    let _reap = Reaper(dir.path().to_path_buf());
    let (hv, t) = host(dir.path(), "a", &g).await;
    let mut spec = VmSpec::new("full-1", HardwareProfile::Small)
        .with_memory_mb(128)
        .with_cores(1);
    spec.base_folder = Some(small.clone());
    hv.create_vm(&spec).await.unwrap();
    let vm = VmId::from("full-1");
    hv.attach_disk(&vm, &AttachSpec::sata(DiskRef::Uuid(t)))
        .await
        .unwrap();
    hv.start_vm_with(&vm, wait_guest()).await.unwrap();
    wait_heartbeat(&hv, &vm, 2).await;

    // The room check passes; the disk fills while the memory is being written.
    let settings = small.join("full-1/full-1.vm.json");
    let snapshot = hv.take_snapshot_with(&vm, "never", None, true);
    let filler = async {
        let until = Instant::now() + Duration::from_secs(30);
        while !pending_in(&settings) {
            assert!(Instant::now() < until, "the snapshot never began");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tmpfs::fill(&small)
    };
    let (result, filler) = tokio::join!(snapshot, filler);
    assert!(
        result.is_err(),
        "a snapshot succeeded on a full disk: {result:?}"
    );
    std::fs::remove_file(&filler).unwrap();

    // The VM runs on (a guest that QEMU paused on the full disk resumes once there is
    // room again), and the next snapshot works: it first completes the failed one's
    // roll-back, whose record could not be cleared on a full disk.
    if hv.vm_info(&vm).await.unwrap().state == PowerState::Paused {
        hv.resume(&vm).await.unwrap();
    }
    assert_eq!(hv.vm_info(&vm).await.unwrap().state, PowerState::Running);
    let h = heartbeat(&hv, &vm).await.unwrap();
    wait_heartbeat(&hv, &vm, h + 2).await;
    let ok = hv
        .take_snapshot_with(&vm, "after", None, true)
        .await
        .unwrap();
    assert!(ok.with_memory);
    // Nothing of the failed snapshot is left: one snapshot, one state file, no
    // pending record, a chain with every file present.
    let tree = hv.snapshot_tree(&vm).await.unwrap();
    assert_eq!(tree.len(), 1);
    assert!(hv.vm_settings(&vm).await.unwrap().pending.is_none());
    let set = hv.vm_files(&vm).await.unwrap();
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    let states: Vec<_> = std::fs::read_dir(small.join("full-1/Snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sav"))
        .collect();
    assert_eq!(states.len(), 1, "{states:?}");
    hv.power_off(&vm).await.unwrap();
}

const CHILD_ROOT: &str = "UNACLOUD_TEST_CHILD_ROOT";

/// The processes that hold `file` open, with their command lines.
fn holders_of(file: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == file))
        {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            out.push(format!(
                "{}: {}",
                p.file_name().to_string_lossy(),
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            ));
        }
    }
    out
}

/// Opens `root` again after its caller was killed. The kill may land while that caller
/// was starting a helper process (which inherits its descriptors until it execs), so
/// the root's lock may take a moment to be released; it must be within seconds.
async fn open_after_kill(root: &Path, i: usize) -> QemuHypervisor {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match QemuHypervisor::open_configured(root, QemuImg::new(), tcg()).await {
            Ok(hv) => return hv,
            Err(Error::InUse { .. }) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!(
                "kill {i}: the root does not open again: {e}; the lock is held by {:?}",
                holders_of(&root.join(".lock"))
            ),
        }
    }
}

/// Run as a separate process by `a_caller_killed_mid_operation_leaves_a_consistent_root`:
/// opens the root and takes snapshots until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of another test"]
async fn child_takes_snapshots_until_killed() {
    let root = PathBuf::from(std::env::var_os(CHILD_ROOT).expect("run by the parent test"));
    let live = std::env::var("UNACLOUD_TEST_CHILD_LIVE").is_ok_and(|v| v == "1");
    let hv = QemuHypervisor::open_configured(&root, QemuImg::new(), tcg())
        .await
        .unwrap();
    for i in 0..200 {
        hv.take_snapshot_with(&VmId::from("pc-1"), &format!("c{i}"), None, live)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_killed_mid_operation_leaves_a_consistent_root() {
    let Some(g) = guest() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _reap = Reaper(dir.path().to_path_buf());
    let (hv, root, vm) = booted_pc1(dir.path(), &g).await;
    let pid = hv.vm_pid(&vm).await.unwrap();
    let settings_file = hv.vm_info(&vm).await.unwrap().settings_file.unwrap();
    let folder = settings_file.parent().unwrap().to_path_buf();
    drop(hv);
    // Kill the caller at several moments after its operation began.
    for (i, delay_ms) in [0u64, 4, 25, 90, 200].into_iter().enumerate() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "child_takes_snapshots_until_killed",
                "--test-threads=1",
            ])
            .env(CHILD_ROOT, &root)
            .env(
                "UNACLOUD_TEST_CHILD_LIVE",
                if i % 2 == 0 { "1" } else { "0" },
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        while !pending_in(&settings_file) {
            assert!(Instant::now() < until, "the child never began an operation");
            assert!(child.try_wait().unwrap().is_none(), "the child ended early");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();

        // The next open is consistent: no operation half done, the VM runs on (a guest
        // the caller had paused runs again), every file belongs to the current state's
        // chain or to a snapshot, and every snapshot's files are there.
        let hv = open_after_kill(&root, i).await;
        let s = hv.vm_settings(&vm).await.unwrap();
        assert!(s.pending.is_none(), "kill {i}: {:?}", s.pending);
        assert_eq!(
            hv.vm_info(&vm).await.unwrap().state,
            PowerState::Running,
            "kill {i}"
        );
        assert_eq!(hv.vm_pid(&vm).await.unwrap(), pid);
        let current = hv.vm_files(&vm).await.unwrap();
        assert!(
            current.warnings.is_empty(),
            "kill {i}: {:?}",
            current.warnings
        );
        let mut known: Vec<PathBuf> = current.files.iter().map(|f| f.path.clone()).collect();
        for m in &s.snapshots {
            for d in &m.disks {
                assert!(
                    folder.join(&d.file).exists(),
                    "kill {i}: image of {} missing",
                    m.name
                );
                known.push(std::fs::canonicalize(folder.join(&d.file)).unwrap());
            }
            if let Some(f) = &m.state_file {
                assert!(
                    folder.join(f).exists(),
                    "kill {i}: state of {} missing",
                    m.name
                );
                known.push(std::fs::canonicalize(folder.join(f)).unwrap());
            }
        }
        for e in std::fs::read_dir(folder.join("Snapshots"))
            .unwrap()
            .flatten()
        {
            let p = std::fs::canonicalize(e.path()).unwrap();
            assert!(
                known.contains(&p),
                "kill {i}: {} belongs to nothing",
                p.display()
            );
        }
        let h = heartbeat(&hv, &vm).await.unwrap();
        wait_heartbeat(&hv, &vm, h + 1).await;
        drop(hv);
    }
    // The root still works end to end: a snapshot, a power cut, a restore, a start.
    let hv = QemuHypervisor::open_configured(&root, QemuImg::new(), tcg())
        .await
        .unwrap();
    hv.take_snapshot_with(&vm, "final", None, true)
        .await
        .unwrap();
    hv.power_off(&vm).await.unwrap();
    hv.restore_snapshot(&vm, "final").await.unwrap();
    hv.start_vm_with(&vm, wait_guest()).await.unwrap();
    hv.power_off(&vm).await.unwrap();
}

//! The `hv` example (Hypervisor Remote Control) without booting VMs: argument and
//! operation errors, provisioning and inspecting powered-off QEMU VMs on a small qcow2
//! made with the real `qemu-img`, and the VBoxManage commands of `--backend vbox`.
//!
//! The example's code is compiled into this test and driven through its `run` function
//! with the same arguments the binary gets, so the test needs no built example.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../examples/hv.rs"]
mod hv;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use unacloud::vbox::manage::{CommandRunner, ReplayRunner};

/// Runs `hv <args>`; `locate` stands in for looking VBoxManage up on `PATH`.
async fn hv_with(
    args: &[&str],
    locate: impl FnOnce() -> Option<Arc<dyn CommandRunner>>,
) -> (i32, String, String) {
    let mut argv = vec!["hv".to_owned()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = hv::run(&argv, locate, &mut out, &mut err).await;
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

/// Runs `hv <args>` where VBoxManage is not installed.
async fn hv(args: &[&str]) -> (i32, String, String) {
    hv_with(args, || None).await
}

/// Runs `hv --backend qemu --root <root> --json <args>`, expects success, parses the JSON.
async fn qemu_json(root: &Path, args: &[&str]) -> Value {
    let mut a = vec![
        "--backend",
        "qemu",
        "--root",
        root.to_str().unwrap(),
        "--json",
    ];
    a.extend_from_slice(args);
    let (code, out, err) = hv(&a).await;
    assert_eq!((code, err.as_str()), (0, ""), "{args:?}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Runs `hv --root <root> <args>` (text output), expects success.
async fn qemu_text(root: &Path, args: &[&str]) -> String {
    let mut a = vec!["--root", root.to_str().unwrap()];
    a.extend_from_slice(args);
    let (code, out, err) = hv(&a).await;
    assert_eq!((code, err.as_str()), (0, ""), "{args:?}");
    out
}

/// Expects exit code 2, nothing on stdout and one `hv: …` line on stderr; returns it.
fn one_line_failure((code, out, err): (i32, String, String), what: &str) -> String {
    assert_eq!(code, 2, "{what}: {out}{err}");
    assert_eq!(out, "", "{what}");
    assert_eq!(err.lines().count(), 1, "{what}: {err}");
    assert!(err.starts_with("hv: "), "{what}: {err}");
    err
}

fn require_qemu_img() {
    let ok = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "qemu-img is required for these tests; install qemu-utils"
    );
}

/// A small empty qcow2 image made with `qemu-img create`.
fn make_qcow2(dir: &Path, name: &str) -> PathBuf {
    require_qemu_img();
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    p
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

#[tokio::test]
async fn bad_input_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let r = root.to_str().unwrap();
    for args in [
        vec![],
        vec!["frobnicate"],
        vec!["vm"],
        vec!["--root", r, "vm", "frob"],
        vec!["--root", r, "--accel", "warp", "vm", "list"],
        vec!["--root", r, "--backend", "hyperv", "vm", "list"],
        vec!["--root", r, "vm", "create", "v1"],
        vec!["--root", r, "vm", "start", "v1", "--wait-secs", "soon"],
        vec!["--root", r, "snapshot", "take", "v1"],
        vec![
            "--root",
            r,
            "vm",
            "create",
            "v1",
            "--template",
            "x",
            "--profile",
            "huge",
        ],
    ] {
        one_line_failure(hv(&args).await, &format!("{args:?}"));
    }
    // Errors of the operations themselves.
    let err = one_line_failure(hv(&["vm", "list"]).await, "no root");
    assert!(err.contains("--root"), "{err}");
    let err = one_line_failure(hv(&["--root", r, "vm", "info", "nope"]).await, "no VM");
    assert_eq!(err, "hv: vm not found: nope\n");
    let err = one_line_failure(
        hv(&["--root", r, "--dry-run", "vm", "list"]).await,
        "dry run with qemu",
    );
    assert!(err.contains("--backend vbox"), "{err}");
    let err = one_line_failure(
        hv(&["--root", r, "template", "add", "/nonexistent/base.qcow2"]).await,
        "missing image",
    );
    assert!(err.contains("/nonexistent/base.qcow2"), "{err}");
    let err = one_line_failure(
        hv(&["--root", r, "vm", "register", "/nonexistent/v.vm.json"]).await,
        "missing settings",
    );
    // The cause is on the same line.
    assert!(err.contains("No such file or directory"), "{err}");
    // Help is not an error.
    let (code, out, _) = hv(&["--help"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("template"), "{out}");
}

#[tokio::test]
async fn template_add_finds_boot_files_beside_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    // The layout of scripts/guest-image: vmlinuz, initrd.img and the disk in one folder.
    let guest = dir.path().join("guest");
    let image = make_qcow2(&guest, "rootfs.qcow2");
    std::fs::write(guest.join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(guest.join("initrd.img"), b"initrd").unwrap();
    let t = qemu_json(
        &root,
        &["template", "add", image.to_str().unwrap(), "--multiattach"],
    )
    .await;
    let canon = |p: PathBuf| std::fs::canonicalize(p).unwrap();
    assert_eq!(Path::new(s(&t["path"])), canon(image.clone()));
    assert_eq!(Path::new(s(&t["kernel"])), canon(guest.join("vmlinuz")));
    assert_eq!(Path::new(s(&t["initrd"])), canon(guest.join("initrd.img")));
    assert_eq!(t["disk_type"], "multiattach");
    assert!(unacloud::cloud::model::Uuid::try_parse(s(&t["uuid"])).is_ok());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&image).unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0, "a multiattach template is read-only");
    }
    // Adding it twice is one clear error.
    let err = one_line_failure(
        hv(&[
            "--root",
            root.to_str().unwrap(),
            "template",
            "add",
            image.to_str().unwrap(),
            "--multiattach",
        ])
        .await,
        "twice",
    );
    assert!(err.contains("already exists"), "{err}");

    // Without boot files beside it the template has none; explicit ones win.
    let bare = make_qcow2(&dir.path().join("bare"), "disk.qcow2");
    let t = qemu_json(
        &root,
        &["template", "add", bare.to_str().unwrap(), "--multiattach"],
    )
    .await;
    assert_eq!((&t["kernel"], &t["initrd"]), (&Value::Null, &Value::Null));
    let other = make_qcow2(&dir.path().join("other"), "disk.qcow2");
    let t = qemu_json(
        &root,
        &[
            "template",
            "add",
            other.to_str().unwrap(),
            "--kernel",
            guest.join("vmlinuz").to_str().unwrap(),
            "--cmdline",
            "quiet loglevel=3",
        ],
    )
    .await;
    assert_eq!(t["disk_type"], "normal");
    assert_eq!(t["initrd"], Value::Null);
    assert_eq!(t["cmdline"], "quiet loglevel=3");
    // A command line without a kernel, or a missing kernel, is refused before anything
    // is registered.
    let fresh = make_qcow2(&dir.path().join("fresh"), "disk.qcow2");
    let r = root.to_str().unwrap();
    let f = fresh.to_str().unwrap();
    one_line_failure(
        hv(&["--root", r, "template", "add", f, "--cmdline", "quiet"]).await,
        "cmdline without kernel",
    );
    one_line_failure(
        hv(&[
            "--root",
            r,
            "template",
            "add",
            f,
            "--kernel",
            "/nonexistent/vmlinuz",
        ])
        .await,
        "missing kernel",
    );
    qemu_json(&root, &["template", "add", f, "--multiattach"]).await;
}

#[tokio::test]
async fn provision_and_inspect_a_powered_off_vm() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let image = make_qcow2(&dir.path().join("t"), "base.qcow2");
    let t = qemu_json(
        &root,
        &["template", "add", image.to_str().unwrap(), "--multiattach"],
    )
    .await;
    let template = s(&t["uuid"]).to_owned();
    let template_path = s(&t["path"]).to_owned();

    let vm = qemu_json(
        &root,
        &[
            "vm",
            "create",
            "v1",
            "--template",
            &template,
            "--memory-mb",
            "128",
            "--cpus",
            "1",
        ],
    )
    .await;
    assert_eq!(vm["name"], "v1");
    assert_eq!(vm["state"], "powered-off");
    assert_eq!((&vm["memory_mb"], &vm["cores"]), (&128.into(), &1.into()));
    assert_eq!(vm["pid"], Value::Null);
    assert_eq!(vm["net"]["mode"], "none");
    let settings = PathBuf::from(s(&vm["settings_file"]));
    assert!(settings.is_file());
    let disks = vm["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1);
    // The VM's own overlay on the template, in the VM's folder.
    assert_eq!(s(&disks[0]["base"]["uuid"]), template);
    let overlay = PathBuf::from(s(&disks[0]["file"]));
    assert!(overlay.is_file() && overlay.starts_with(settings.parent().unwrap()));

    // A tap network gets the VM's MAC; a bad network or template creates nothing.
    let v2 = qemu_json(
        &root,
        &[
            "vm",
            "create",
            "v2",
            "--template",
            &template_path,
            "--net",
            "tap:lab:tap-v2:10.77.0.2/24",
        ],
    )
    .await;
    let uuid2 = unacloud::cloud::model::Uuid::try_parse(s(&v2["uuid"])).unwrap();
    assert_eq!(v2["net"]["mode"], "tap");
    assert_eq!(v2["net"]["netns"], "lab");
    assert_eq!(v2["net"]["ip"], "10.77.0.2/24");
    assert_eq!(s(&v2["net"]["mac"]), unacloud::cloud::qemu::mac_for(&uuid2));
    let r = root.to_str().unwrap();
    one_line_failure(
        hv(&[
            "--root",
            r,
            "vm",
            "create",
            "v3",
            "--template",
            &template,
            "--net",
            "tap:x",
        ])
        .await,
        "bad net",
    );
    let err = one_line_failure(
        hv(&[
            "--root",
            r,
            "vm",
            "create",
            "v3",
            "--template",
            "00000000-0000-0000-0000-000000000001",
        ])
        .await,
        "unknown template",
    );
    assert!(err.contains("disk not found"), "{err}");
    assert!(
        !root.join("vms/v3").exists(),
        "a failed create leaves nothing"
    );

    // vm list and vm info.
    let list = qemu_json(&root, &["vm", "list"]).await;
    let rows = list.as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| s(&r["name"])).collect();
    assert_eq!(names, ["v1", "v2"]);
    for row in rows {
        assert_eq!(row["state"], "powered-off");
        assert_eq!(row["pid"], Value::Null);
        assert!(row["uuid"].is_string());
    }
    let text = qemu_text(&root, &["vm", "list"]).await;
    assert!(text.lines().nth(1).unwrap().starts_with("v1 "), "{text}");
    assert!(text.contains("powered off"), "{text}");
    let info = qemu_json(&root, &["vm", "info", "v1"]).await;
    assert_eq!(info["uuid"], vm["uuid"]);
    assert_eq!(info["snapshots"], 0);
    assert_eq!(info["current_snapshot"], Value::Null);
    assert_eq!(info["last_heartbeat"], Value::Null);
    assert!(info["console_log"].is_string());
    let text = qemu_text(&root, &["vm", "info", "v1"]).await;
    assert!(text.contains("state:      powered off"), "{text}");
    assert!(text.contains("memory:     128 MB"), "{text}");

    // Powered-off VMs refuse the verbs of running ones, in one line.
    for verb in ["poweroff", "pause", "resume", "save-state"] {
        let err = one_line_failure(hv(&["--root", r, "vm", verb, "v1"]).await, verb);
        assert!(err.contains("powered off"), "{err}");
    }

    // Files of the current state: settings and overlay; the template stays behind.
    let files = qemu_json(&root, &["vm", "files", "v1"]).await;
    assert_eq!(files["machine"]["name"], "v1");
    assert_eq!(files["snapshot"]["name"], "current");
    let roles: Vec<&str> = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| s(&f["role"]))
        .collect();
    assert_eq!(roles, ["settings", "disk"]);
    let sum: u64 = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(files["total_bytes"].as_u64().unwrap(), sum);
    let expected = files["expected_at_destination"].as_array().unwrap();
    assert_eq!(expected.len(), 1);
    assert_eq!(s(&expected[0]["uuid"]), template);
    assert_eq!(s(&expected[0]["path"]), template_path);
    assert!(files["warnings"].as_array().unwrap().is_empty());

    // A disk-only snapshot of the powered-off VM, its tree and its files.
    let snap = qemu_json(&root, &["snapshot", "take", "v1", "s1"]).await;
    assert_eq!(snap["name"], "s1");
    assert_eq!(snap["with_memory"], false);
    assert_eq!(snap["downtime_ms"], 0.0);
    assert!(snap["total_ms"].as_f64().unwrap() > 0.0);
    let id = s(&snap["id"]).to_owned();
    let tree = qemu_json(&root, &["snapshot", "tree", "v1"]).await;
    assert_eq!(tree["current"], id.as_str());
    assert_eq!(tree["snapshots"][0]["name"], "s1");
    assert_eq!(
        qemu_text(&root, &["snapshot", "tree", "v1"]).await,
        format!("s1 [{id}] *\n")
    );
    let dot = qemu_text(&root, &["snapshot", "tree", "v1", "--dot"]).await;
    assert!(dot.starts_with("digraph snapshots {"), "{dot}");
    assert!(dot.contains("s1\\n"), "{dot}");
    let at_s1 = qemu_json(&root, &["vm", "files", "v1", "--snapshot", "s1"]).await;
    assert_eq!(at_s1["snapshot"]["name"], "s1");
    assert_eq!(at_s1["snapshot"]["uuid"], id.as_str());
    let paths: Vec<&str> = at_s1["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| s(&f["path"]))
        .collect();
    // The snapshot's frozen image is the overlay the VM had when it was taken.
    assert_eq!(
        paths,
        [settings.to_str().unwrap(), overlay.to_str().unwrap()]
    );
    let table = qemu_text(&root, &["vm", "files", "v1", "--snapshot", "s1"]).await;
    assert!(table.contains("Snapshot: \"s1\""), "{table}");
    assert!(
        table.contains("Expected at destination (not copied):"),
        "{table}"
    );
    assert_eq!(
        qemu_json(&root, &["vm", "info", "v1"]).await["current_snapshot_name"],
        "s1"
    );

    // Restore and delete by name; an unknown snapshot is one line.
    let restored = qemu_json(&root, &["snapshot", "restore", "v1", "s1"]).await;
    assert_eq!(restored["state"], "powered-off");
    assert_eq!(restored["snapshot"]["id"], id.as_str());
    let err = one_line_failure(
        hv(&["--root", r, "snapshot", "restore", "v1", "nope"]).await,
        "unknown snapshot",
    );
    assert!(err.contains("nope"), "{err}");
    let deleted = qemu_json(&root, &["snapshot", "delete", "v1", "s1"]).await;
    assert_eq!(deleted["current_snapshot"], Value::Null);
    assert_eq!(
        qemu_text(&root, &["snapshot", "tree", "v1"]).await,
        "v1 has no snapshots\n"
    );
}

#[tokio::test]
async fn a_vm_registers_on_another_host_with_its_template() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let image = make_qcow2(&dir.path().join("ta"), "base.qcow2");
    let t = qemu_json(
        &a,
        &["template", "add", image.to_str().unwrap(), "--multiattach"],
    )
    .await;
    let vm = qemu_json(&a, &["vm", "create", "v1", "--template", s(&t["uuid"])]).await;
    // Host b has its own copy of the template and gets the VM's folder.
    let b = dir.path().join("b");
    let tb = dir.path().join("tb");
    std::fs::create_dir_all(&tb).unwrap();
    std::fs::copy(&image, tb.join("base.qcow2")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            tb.join("base.qcow2"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    let tb_json = qemu_json(
        &b,
        &[
            "template",
            "add",
            tb.join("base.qcow2").to_str().unwrap(),
            "--multiattach",
        ],
    )
    .await;
    let src = PathBuf::from(s(&vm["settings_file"]));
    let dst = dir.path().join("moved/v1");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(src.parent().unwrap()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let reg = qemu_json(
        &b,
        &["vm", "register", dst.join("v1.vm.json").to_str().unwrap()],
    )
    .await;
    assert_eq!(reg["name"], "v1");
    assert_eq!(reg["uuid"], vm["uuid"]);
    assert_eq!(reg["state"], "powered-off");
    let files = qemu_json(&b, &["vm", "files", "v1"]).await;
    assert_eq!(
        files["expected_at_destination"][0]["path"], tb_json["path"],
        "{files}"
    );
    // Registering it twice is refused.
    one_line_failure(
        hv(&[
            "--root",
            b.to_str().unwrap(),
            "vm",
            "register",
            dst.join("v1.vm.json").to_str().unwrap(),
        ])
        .await,
        "twice",
    );
}

async fn vbox_dry(args: &[&str]) -> String {
    let mut a = vec!["--backend", "vbox", "--dry-run"];
    a.extend_from_slice(args);
    let (code, out, err) = hv_with(&a, || panic!("a dry run must not look for VBoxManage")).await;
    assert_eq!((code, err.as_str()), (0, ""), "{args:?}");
    out
}

#[tokio::test]
async fn vbox_dry_run_prints_the_vboxmanage_commands() {
    for (args, line) in [
        (
            &["vm", "start", "TM"][..],
            "VBoxManage startvm TM --type headless",
        ),
        (
            &["vm", "poweroff", "TM"],
            "VBoxManage controlvm TM poweroff",
        ),
        (&["vm", "pause", "TM"], "VBoxManage controlvm TM pause"),
        (&["vm", "resume", "TM"], "VBoxManage controlvm TM resume"),
        (
            &["vm", "save-state", "TM"],
            "VBoxManage controlvm TM savestate",
        ),
        (
            &["snapshot", "take", "TM", "Snapshot 1", "--live"],
            "VBoxManage snapshot TM take 'Snapshot 1' --live",
        ),
        (
            &["snapshot", "take", "My VM", "s1"],
            "VBoxManage snapshot 'My VM' take s1",
        ),
        (
            &["snapshot", "restore", "TM", "Snapshot 1"],
            "VBoxManage snapshot TM restore 'Snapshot 1'",
        ),
        (
            &["snapshot", "delete", "TM", "it's"],
            "VBoxManage snapshot TM delete 'it'\\''s'",
        ),
        (
            &["vm", "info", "TM"],
            "VBoxManage showvminfo TM --machinereadable",
        ),
        (&["vm", "list"], "VBoxManage list vms"),
        (
            &["vm", "register", "/vms/TM/TM.vbox"],
            "VBoxManage registervm /vms/TM/TM.vbox",
        ),
    ] {
        assert_eq!(vbox_dry(args).await, format!("{line}\n"), "{args:?}");
    }
    // --json does not change a dry run, and global options may follow the verb.
    assert_eq!(
        hv_with(
            &[
                "vm",
                "poweroff",
                "TM",
                "--backend",
                "vbox",
                "--dry-run",
                "--json"
            ],
            || None
        )
        .await,
        (
            0,
            "VBoxManage controlvm TM poweroff\n".to_owned(),
            String::new()
        )
    );
}

#[tokio::test]
async fn vbox_refuses_verbs_it_does_not_have_and_a_missing_vboxmanage() {
    for args in [
        vec!["template", "add", "/t/base.vdi", "--multiattach"],
        vec!["vm", "create", "v1", "--template", "/t/base.vdi"],
        vec!["vm", "files", "TM"],
        vec!["snapshot", "tree", "TM"],
        vec!["vm", "start", "TM", "--wait-guest"],
    ] {
        let mut a = vec!["--backend", "vbox", "--dry-run"];
        a.extend(args.iter().copied());
        let err = one_line_failure(hv(&a).await, &format!("{args:?}"));
        assert!(err.contains("VBoxManage equivalent"), "{args:?}: {err}");
    }
    let err = one_line_failure(
        hv(&["--backend", "vbox", "vm", "start", "TM"]).await,
        "no VBoxManage",
    );
    assert!(err.contains("VBoxManage was not found"), "{err}");
    assert!(err.contains("--dry-run"), "{err}");
}

#[tokio::test]
async fn vbox_without_dry_run_runs_the_same_commands() {
    let runner = Arc::new(
        ReplayRunner::new()
            .then_ok("")
            .then_ok(
                "0%...10%...100%\nSnapshot taken. UUID: 947ad21d-2cad-4e64-80cc-2ff819d1be4e\n",
            )
            .then_ok("\"TM\" {2e16b1fc-675d-4a7a-a9a1-e89a8bde7874}\n")
            .then_err("VBoxManage: error: Could not find a registered machine named 'Nope'\n"),
    );
    let run = |args: &'static [&'static str]| {
        let r = runner.clone();
        async move {
            let mut a = vec!["--backend", "vbox"];
            a.extend_from_slice(args);
            hv_with(&a, move || Some(r as Arc<dyn CommandRunner>)).await
        }
    };
    assert_eq!(run(&["vm", "poweroff", "TM"]).await.0, 0);
    let (code, out, _) = run(&["--json", "snapshot", "take", "TM", "Snapshot 1", "--live"]).await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["id"], "947ad21d-2cad-4e64-80cc-2ff819d1be4e");
    let (code, out, _) = run(&["vm", "list"]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "2e16b1fc-675d-4a7a-a9a1-e89a8bde7874  TM\n")
    );
    let err = one_line_failure(run(&["vm", "start", "Nope"]).await, "VBoxManage error");
    assert!(
        err.contains("Could not find a registered machine named 'Nope'"),
        "{err}"
    );
    assert_eq!(
        runner.lines(),
        [
            "VBoxManage controlvm TM poweroff",
            "VBoxManage snapshot TM take 'Snapshot 1' --live",
            "VBoxManage list vms",
            "VBoxManage startvm Nope --type headless",
        ]
    );
}

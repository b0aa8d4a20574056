//! The `file_tracker` and `snapshot_tree` examples as a user runs them: copies with
//! `--copy-to`, refusals, escaping of hostile names and locations in human output,
//! the same answer from any current folder, and whole error chains.
//!
//! The examples' code is compiled into this test and driven through their `run`
//! functions with the arguments the binaries get; tests that depend on the current
//! folder re-run this test binary as a child process in that folder.
#![allow(clippy::unwrap_used)]

#[path = "../testsupport/vbox_machine.rs"]
mod vbox_machine;

#[allow(dead_code)]
#[path = "../examples/file_tracker.rs"]
mod file_tracker;

#[allow(dead_code)]
#[path = "../examples/snapshot_tree.rs"]
mod snapshot_tree;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use vbox_machine::{machine_folder, machine_xml, SNAP};

/// Runs `file_tracker <args>`: (exit code, stdout, stderr).
fn tracker(args: &[&str]) -> (u8, String, String) {
    let mut argv = vec!["file_tracker".to_owned()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = file_tracker::run(&argv, &mut out, &mut err, false);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(rel)
}

#[test]
fn copy_to_copies_the_set_and_reports_it_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    let vbox = machine_folder(&tmp.path().join("vm"));
    let dst = tmp.path().join("dst");
    let (code, out, err) = tracker(&[
        s(&vbox),
        "--snapshot",
        "installed",
        "--copy-to",
        s(&dst),
        "--verify",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "", "no progress bar when stderr is not a terminal");
    let v: Value = serde_json::from_str(&out).unwrap();
    let copied = &v["copied"];
    assert_eq!(copied["verified"], true, "{v}");
    let files = copied["files"].as_array().unwrap();
    assert_eq!(files.len(), 3, "{v}");
    let total: u64 = files.iter().map(|f| f["bytes"].as_u64().unwrap()).sum();
    assert_eq!(copied["bytes"].as_u64().unwrap(), total);
    assert!(files
        .iter()
        .all(|f| f["blake3"].as_str().unwrap().len() == 64));
    assert!(dst.join("TM.vbox").is_file());
    assert!(dst.join("Snapshots/s1.sav").is_file());
    // Human output says what was copied.
    let dst2 = tmp.path().join("dst2");
    let (code, out, err) = tracker(&[s(&vbox), "--snapshot", "installed", "--copy-to", s(&dst2)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Copied 3 files"), "{out}");
    assert!(dst2.join("TM.vdi").is_file());
}

#[test]
fn a_refused_copy_exits_2_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let vbox = machine_folder(&tmp.path().join("vm"));
    let secret = tmp.path().join("shadow");
    fs::write(&secret, b"secret").unwrap();
    let sav = tmp.path().join("vm/Snapshots/s1.sav");
    fs::remove_file(&sav).unwrap();
    symlink(&secret, &sav).unwrap();
    let dst = tmp.path().join("dst");
    let (code, out, err) = tracker(&[
        s(&vbox),
        "--snapshot",
        "installed",
        "--copy-to",
        s(&dst),
        "--json",
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(out, "");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("s1.sav") && err.contains("symbolic link"),
        "{err}"
    );
    assert!(!dst.join("TM.vbox").exists());
}

#[test]
fn errors_print_their_whole_chain() {
    let (code, _, err) = tracker(&["/nonexistent/TM.vbox", "--snapshot", "current"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("/nonexistent/TM.vbox: No such file or directory"),
        "{err}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.vbox");
    fs::write(
        &bad,
        "<VirtualBox version=\"1.19-linux\">\n<Machine name=\"&bogus;\"/>",
    )
    .unwrap();
    let (code, _, err) = tracker(&[s(&bad), "--snapshot", "current"]);
    assert_eq!(code, 2);
    // Outer (the file), cause (the line), root cause (the XML reader's diagnosis).
    assert!(err.contains("bad.vbox: malformed XML at line 2: "), "{err}");
    assert!(err.contains("bogus"), "{err}");
}

#[test]
fn hostile_names_and_locations_cannot_forge_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = tmp.path().join("vm");
    machine_folder(&vm);
    let vbox = vm.join("TM.vbox");
    let forged = "Snapshots/x&#10;saved-state        1 B  -  /etc/shadow\u{1b}[2K";
    fs::write(
        &vbox,
        machine_xml("ok&#10;Machine:  forged", "TM.vdi", forged),
    )
    .unwrap();
    let (code, out, err) = tracker(&[s(&vbox), "--snapshot", SNAP]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains('\u{1b}') && !err.contains('\u{1b}'),
        "{out:?}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("saved-state")).count(),
        1,
        "a location drew its own row: {out}"
    );
    assert!(out.contains("Snapshots/x\\nsaved-state"), "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("Machine:")).count(), 1);
    // JSON keeps the exact strings.
    let (code, out, _) = tracker(&[s(&vbox), "--snapshot", SNAP, "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["snapshot"]["name"], "ok\nMachine:  forged");
    let sav = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["role"] == "saved-state")
        .unwrap();
    assert!(
        sav["path"].as_str().unwrap().ends_with("\u{1b}[2K"),
        "{sav}"
    );

    // The snapshot tree's text output too.
    let argv: Vec<String> = ["snapshot_tree", s(&vbox)]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut out = Vec::new();
    let mut err = Vec::new();
    assert_eq!(snapshot_tree::run(&argv, &mut out, &mut err), 0);
    let out = String::from_utf8(out).unwrap();
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.contains("ok\\nMachine:  forged"), "{out}");
}

#[test]
fn outside_locations_are_listed_with_a_warning_and_exit_0() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = tmp.path().join("vm");
    machine_folder(&vm);
    let vbox = vm.join("TM.vbox");
    fs::write(
        &vbox,
        machine_xml("installed", "TM.vdi", "../../etc/cron.d/x.sav"),
    )
    .unwrap();
    let (code, out, err) = tracker(&[s(&vbox), "--snapshot", "installed"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Warnings:"), "{out}");
    assert!(out.contains("outside the machine folder"), "{out}");
    // And a copy refuses it, naming it.
    let (code, _, err) = tracker(&[
        s(&vbox),
        "--snapshot",
        "installed",
        "--copy-to",
        s(&tmp.path().join("dst")),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("x.sav"), "{err}");
}

// ----- the current folder -----------------------------------------------------------

fn is_child() -> bool {
    std::env::var_os("FILE_TRACKER_CHILD_ARGS").is_some()
}

/// In a child: runs `file_tracker` with the JSON array of arguments in
/// `FILE_TRACKER_CHILD_ARGS` and writes its stdout, stderr and exit code to the files
/// named by `FILE_TRACKER_CHILD_OUT` (`.out`, `.err`, `.code`).
fn child_main() {
    let args: Vec<String> =
        serde_json::from_str(&std::env::var("FILE_TRACKER_CHILD_ARGS").unwrap()).unwrap();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = tracker(&refs);
    let base = PathBuf::from(std::env::var_os("FILE_TRACKER_CHILD_OUT").unwrap());
    fs::write(base.with_extension("out"), out).unwrap();
    fs::write(base.with_extension("err"), err).unwrap();
    fs::write(base.with_extension("code"), code.to_string()).unwrap();
}

/// Runs `file_tracker <args>` in a child process whose current folder is `cwd`.
fn tracker_in(test: &str, cwd: &Path, args: &[&str]) -> (u8, String, String) {
    let outdir = tempfile::tempdir().unwrap();
    let base = outdir.path().join("result");
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .current_dir(cwd)
        .env(
            "FILE_TRACKER_CHILD_ARGS",
            serde_json::to_string(args).unwrap(),
        )
        .env("FILE_TRACKER_CHILD_OUT", &base)
        .status()
        .unwrap();
    assert!(status.success());
    let read = |ext| fs::read_to_string(base.with_extension(ext)).unwrap();
    (
        read("code").trim().parse().unwrap(),
        read("out"),
        read("err"),
    )
}

#[test]
fn windows_locations_give_the_same_output_from_any_folder() {
    if is_child() {
        return child_main();
    }
    const DISK: &str = "C:/Users/joerg/Downloads/metasploitable-linux-2.0.0/Metasploitable2-Linux/Metasploitable.vmdk";
    let decoy_dir = tempfile::tempdir().unwrap();
    let decoy = decoy_dir.path().join(DISK);
    fs::create_dir_all(decoy.parent().unwrap()).unwrap();
    fs::write(&decoy, vec![7u8; 4096]).unwrap();
    let meta = fs::canonicalize(fixture("vbox/joco-kad__teaching__Meta.vbox")).unwrap();
    let empty = tempfile::tempdir().unwrap();
    for extra in [&[][..], &["--json"][..]] {
        let mut args = vec![s(&meta), "--snapshot", "Root. End Practice One"];
        args.extend_from_slice(extra);
        let test = "windows_locations_give_the_same_output_from_any_folder";
        let a = tracker_in(test, decoy_dir.path(), &args);
        let b = tracker_in(test, empty.path(), &args);
        assert_eq!(a, b, "the output depends on the current folder");
        assert_eq!(a.0, 0, "{}", a.2);
        assert!(a.1.contains("foreign location"), "{}", a.1);
        assert!(!a.1.contains("4096"), "the decoy was measured: {}", a.1);
    }
}

#[test]
fn a_relative_machine_path_copies_to_the_right_place() {
    if is_child() {
        return child_main();
    }
    let tmp = tempfile::tempdir().unwrap();
    machine_folder(&tmp.path().join("src"));
    let (code, out, err) = tracker_in(
        "a_relative_machine_path_copies_to_the_right_place",
        tmp.path(),
        &[
            "src/TM.vbox",
            "--snapshot",
            "installed",
            "--copy-to",
            "dst",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(tmp.path().join("dst/TM.vbox").is_file());
    assert!(tmp.path().join("dst/Snapshots/s1.sav").is_file());
    assert!(!tmp.path().join("dst/src").exists());
}

#[test]
fn a_terminal_gets_a_progress_line() {
    let tmp = tempfile::tempdir().unwrap();
    let vbox = machine_folder(&tmp.path().join("vm"));
    let dst = tmp.path().join("dst");
    let argv: Vec<String> = [
        "file_tracker",
        s(&vbox),
        "--snapshot",
        "installed",
        "--copy-to",
        s(&dst),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut out = Vec::new();
    let mut err = Vec::new();
    assert_eq!(file_tracker::run(&argv, &mut out, &mut err, true), 0);
    let err = String::from_utf8(err).unwrap();
    assert!(err.starts_with('\r') && err.ends_with('\n'), "{err:?}");
    assert!(
        err.contains("100.0%") && err.contains("file 3/3"),
        "{err:?}"
    );
    // One line, redrawn in place.
    assert_eq!(err.matches('\n').count(), 1, "{err:?}");
}

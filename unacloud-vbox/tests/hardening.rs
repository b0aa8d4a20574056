//! Hostile machine folders and settings files: symbolic links and file modes in
//! copies, settings "files" that are FIFOs or devices, foreign and escaping locations,
//! and error lines.
#![allow(clippy::unwrap_used)]

#[path = "../../testsupport/vbox_machine.rs"]
mod vbox_machine;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use unacloud_vbox::copy::{copy_files, CopyOptions, CopyReport, RejectReason};
use unacloud_vbox::settings::{MachineSettings, ParseLimits};
use unacloud_vbox::tracker::{Machine, MigrationOptions};
use unacloud_vbox::Error;

use vbox_machine::{machine_folder, machine_xml};

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every entry under `dir` (files, folders, links), relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

/// The error and its causes on one line.
/// Copies the state "installed" of `m` into `dst` with default options.
fn copy_installed(m: &Machine, dst: &Path) -> unacloud_vbox::Result<CopyReport> {
    m.copy_to(
        "installed",
        &MigrationOptions::default(),
        dst,
        &CopyOptions::default(),
        |_| {},
    )
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

// ----- copies ---------------------------------------------------------------------

#[test]
fn a_symlinked_saved_state_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let vbox = machine_folder(&tmp.path().join("vm"));
    // The saved state is a link to a secret outside the machine folder.
    let secret = tmp.path().join("shadow");
    fs::write(&secret, b"root:$6$secret").unwrap();
    set_mode(&secret, 0o640);
    let sav = tmp.path().join("vm/Snapshots/s1.sav");
    fs::remove_file(&sav).unwrap();
    symlink(&secret, &sav).unwrap();

    let m = Machine::load(&vbox, None).unwrap();
    let dst = tmp.path().join("dst");
    let err = copy_installed(&m, &dst).unwrap_err();
    let text = chain(&err);
    assert!(matches!(err, Error::CopyRefused { .. }), "{err:?}");
    assert!(text.contains("s1.sav"), "{text}");
    assert!(text.contains("symbolic link"), "{text}");
    assert!(
        tree(&dst).is_empty(),
        "nothing may be written: {:?}",
        tree(&dst)
    );
    assert_eq!(mode(&secret), 0o640);
}

#[test]
fn copy_files_refuses_every_source_that_is_a_symlink() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let real = src.path().join("real.vdi");
    fs::write(&real, b"disk").unwrap();
    let link = src.path().join("link.sav");
    symlink(&real, &link).unwrap();
    let dangling = src.path().join("dangling.sav");
    symlink(src.path().join("nowhere"), &dangling).unwrap();
    let files = [
        (real.clone(), "TM/real.vdi"),
        (link.clone(), "TM/link.sav"),
        (dangling.clone(), "TM/dangling.sav"),
    ];
    let err = copy_files(&files, dst.path(), &CopyOptions::default(), |_| {}).unwrap_err();
    match &err {
        Error::CopyRefused { rejected, .. } => {
            let names: Vec<_> = rejected.iter().map(|r| r.relative.as_str()).collect();
            assert_eq!(names, ["TM/link.sav", "TM/dangling.sav"], "{err}");
            for r in rejected {
                assert!(r.to_string().contains("symbolic link"), "{r}");
                assert!(
                    matches!(r.reason, RejectReason::SourceSymlink { .. }),
                    "{r}"
                );
            }
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(tree(dst.path()).is_empty());
}

#[test]
fn copies_keep_the_source_mode_and_never_widen_it() {
    let tmp = tempfile::tempdir().unwrap();
    let vbox = machine_folder(&tmp.path().join("vm"));
    set_mode(&vbox, 0o644);
    set_mode(&tmp.path().join("vm/TM.vdi"), 0o640);
    set_mode(&tmp.path().join("vm/Snapshots/s1.sav"), 0o600);
    let m = Machine::load(&vbox, None).unwrap();
    let dst = tmp.path().join("dst");
    let report = m
        .copy_to(
            "installed",
            &MigrationOptions::default(),
            &dst,
            &CopyOptions::default().checksum(true),
            |_| {},
        )
        .unwrap();
    assert_eq!(report.files.len(), 3);
    assert_eq!(mode(&dst.join("TM.vbox")), 0o644);
    assert_eq!(mode(&dst.join("TM.vdi")), 0o640);
    assert_eq!(mode(&dst.join("Snapshots/s1.sav")), 0o600);
    // Special bits are not carried over either.
    let src = tmp.path().join("odd");
    fs::write(&src, b"x").unwrap();
    set_mode(&src, 0o4755);
    let out = tmp.path().join("out");
    copy_files(&[(&src, "odd")], &out, &CopyOptions::default(), |_| {}).unwrap();
    assert_eq!(mode(&out.join("odd")), 0o755);
}

#[test]
fn a_destination_root_that_is_a_symlink_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("a.vdi");
    fs::write(&src, b"disk").unwrap();
    let real = tmp.path().join("real");
    fs::create_dir(&real).unwrap();
    let root = tmp.path().join("root");
    symlink(&real, &root).unwrap();
    let err = copy_files(&[(&src, "a.vdi")], &root, &CopyOptions::default(), |_| {}).unwrap_err();
    let text = chain(&err);
    assert!(matches!(err, Error::DestinationIsSymlink { .. }), "{err:?}");
    assert!(text.contains("symbolic link"), "{text}");
    assert!(tree(&real).is_empty());
}

/// Re-runs one test of this binary in a child process with `cwd` as its current
/// folder and `UNACLOUD_HARDENING_CHILD` set.
fn run_child(test: &str, cwd: &Path, envs: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .current_dir(cwd)
        .env("UNACLOUD_HARDENING_CHILD", "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn is_child() -> bool {
    std::env::var_os("UNACLOUD_HARDENING_CHILD").is_some()
}

fn assert_child_ok(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("CHILD-OK"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn a_machine_given_by_a_relative_path_copies_to_its_own_layout() {
    if is_child() {
        // The current folder holds `src/TM.vbox`; the machine is given relatively.
        let m = Machine::load("src/TM.vbox", None).unwrap();
        copy_installed(&m, Path::new("dst")).unwrap();
        // A bare file name in the current folder works too.
        std::env::set_current_dir("src").unwrap();
        let m = Machine::load("TM.vbox", None).unwrap();
        copy_installed(&m, Path::new("../dst2")).unwrap();
        println!("CHILD-OK");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    machine_folder(&tmp.path().join("src"));
    let out = run_child(
        "a_machine_given_by_a_relative_path_copies_to_its_own_layout",
        tmp.path(),
        &[],
    );
    assert_child_ok(&out);
    let expected = ["Snapshots", "Snapshots/s1.sav", "TM.vbox", "TM.vdi"];
    assert_eq!(tree(&tmp.path().join("dst")), expected);
    assert_eq!(tree(&tmp.path().join("dst2")), expected);
}

// ----- settings files that are not files ------------------------------------------

/// Loads `path` on another thread; `None` if it did not finish within `secs`.
fn load_within(path: &Path, secs: u64) -> Option<Result<Machine, Error>> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Machine::load(&p, None));
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

#[test]
fn a_fifo_is_refused_without_waiting_for_a_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("TM.vbox");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let err = load_within(&fifo, 10)
        .expect("loading a FIFO must not block")
        .unwrap_err();
    assert!(
        matches!(
            err.innermost(),
            Error::NotRegularFile { kind: "a FIFO", .. }
        ),
        "{err:?}"
    );
    let text = chain(&err);
    assert!(text.contains("not a regular file"), "{text}");
    assert!(text.contains("TM.vbox"), "{text}");
    // Through a symbolic link (followed once) too.
    let link = tmp.path().join("link.vbox");
    symlink(&fifo, &link).unwrap();
    let text = chain(&load_within(&link, 10).unwrap().unwrap_err());
    assert!(text.contains("not a regular file"), "{text}");
}

#[test]
fn dev_zero_is_refused_without_reading_it() {
    let err = load_within(Path::new("/dev/zero"), 20)
        .expect("loading /dev/zero must not read it forever")
        .unwrap_err();
    assert!(
        matches!(err.innermost(), Error::NotRegularFile { .. }),
        "{err:?}"
    );
    let text = chain(&err);
    assert!(text.contains("not a regular file"), "{text}");
    assert!(text.contains("/dev/zero"), "{text}");
}

#[test]
fn a_sparse_file_larger_than_the_bound_is_refused_before_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("TM.vbox");
    let f = fs::File::create(&big).unwrap();
    f.set_len(65 << 20).unwrap(); // 65 MiB of holes, above the 64 MiB default
    drop(f);
    let err = Machine::load(&big, None).unwrap_err();
    assert!(
        matches!(err.innermost(), Error::InputTooLarge { len, max, .. } if *len == 65 << 20 && *max == 64 << 20),
        "{err:?}"
    );
    let text = chain(&err);
    assert!(text.contains("max_input_bytes"), "{text}");
    assert!(text.contains("TM.vbox"), "{text}");
    // The bound is configurable.
    let small = tmp.path().join("small.vbox");
    fs::write(&small, machine_xml("installed", "TM.vdi", "s.sav")).unwrap();
    let limits = ParseLimits {
        max_input_bytes: 100,
        ..ParseLimits::default()
    };
    let text = chain(&MachineSettings::load_with_limits(&small, &limits).unwrap_err());
    assert!(text.contains("max_input_bytes"), "{text}");
    assert!(MachineSettings::load(&small).is_ok());
}

// ----- locations ------------------------------------------------------------------

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures")
        .join(rel)
}

const META_DISK: &str =
    "C:/Users/joerg/Downloads/metasploitable-linux-2.0.0/Metasploitable2-Linux/Metasploitable.vmdk";

#[test]
fn windows_locations_are_foreign_whatever_the_current_folder() {
    if is_child() {
        let vbox = PathBuf::from(std::env::var_os("UNACLOUD_META").unwrap());
        let m = Machine::load(&vbox, None).unwrap();
        let set = m
            .migration_set("Root. End Practice One", &MigrationOptions::default())
            .unwrap();
        let disk = set
            .files
            .iter()
            .find(|f| f.path == Path::new(META_DISK))
            .unwrap();
        assert_eq!(disk.bytes, None, "a Windows path names no file here");
        let w: Vec<_> = set
            .warnings
            .iter()
            .filter(|w| w.contains("C:/Users/joerg"))
            .collect();
        assert_eq!(w.len(), 1, "{:?}", set.warnings);
        assert!(w[0].contains("foreign"), "{}", w[0]);
        let all = m.all_files();
        let f = all
            .files
            .iter()
            .find(|f| f.path == Path::new(META_DISK))
            .unwrap();
        assert_eq!(f.bytes, None);
        // Verification does not look for it in the current folder either.
        let report = m.verify(&set);
        assert!(report.chain.headers.is_empty());
        println!("CHILD-OK");
        return;
    }
    // A current folder that holds a file at the Windows path, read as relative.
    let tmp = tempfile::tempdir().unwrap();
    let decoy = tmp.path().join(META_DISK);
    fs::create_dir_all(decoy.parent().unwrap()).unwrap();
    fs::write(&decoy, b"decoy").unwrap();
    let meta = fs::canonicalize(fixture("vbox/joco-kad__teaching__Meta.vbox")).unwrap();
    for cwd in [tmp.path(), Path::new("/")] {
        let out = run_child(
            "windows_locations_are_foreign_whatever_the_current_folder",
            cwd,
            &[("UNACLOUD_META", &meta)],
        );
        assert_child_ok(&out);
    }
}

#[test]
fn locations_outside_the_machine_folder_are_listed_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = tmp.path().join("vm");
    fs::create_dir_all(&vm).unwrap();
    for (location, state) in [
        ("../other/x.vdi", "Snapshots/s.sav"),
        ("/opt/images/x.vdi", "Snapshots/s.sav"),
        ("//srv/share/x.vdi", "Snapshots/s.sav"),
        ("TM.vdi", "../../elsewhere/s.sav"),
    ] {
        let vbox = vm.join("TM.vbox");
        fs::write(&vbox, machine_xml("installed", location, state)).unwrap();
        let m = Machine::load(&vbox, None).unwrap();
        let set = m
            .migration_set("installed", &MigrationOptions::default())
            .unwrap();
        let odd = if location == "TM.vdi" {
            state
        } else {
            location
        };
        let w: Vec<_> = set
            .warnings
            .iter()
            .filter(|w| w.contains(&format!("{odd:?}")))
            .collect();
        assert_eq!(w.len(), 1, "{odd}: {:?}", set.warnings);
        assert!(w[0].contains("outside the machine folder"), "{}", w[0]);
        // And copies still refuse it.
        let err = copy_installed(&m, &tmp.path().join("dst")).unwrap_err();
        assert!(
            matches!(err, Error::CopyRefused { .. } | Error::BrokenChain { .. }),
            "{odd}: {err:?}"
        );
        assert!(tree(&tmp.path().join("dst")).is_empty());
    }
}

// ----- errors say why -------------------------------------------------------------

#[test]
fn entity_errors_report_their_own_line() {
    let good = machine_xml("installed", "TM.vdi", "Snapshots/s.sav");
    let lines: Vec<&str> = good.lines().collect();
    // An unknown entity in an attribute value on line 7 (the snapshot).
    let n = lines.iter().position(|l| l.contains("<Snapshot ")).unwrap();
    let mut bad: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    bad[n] = bad[n].replace("name=\"installed\"", "name=\"inst&bogus;alled\"");
    let err = MachineSettings::parse_str(&bad.join("\n")).unwrap_err();
    match err.innermost() {
        Error::Xml { line, .. } => assert_eq!(*line, n as u64 + 1, "{err}"),
        e => panic!("unexpected {e:?}"),
    }
    // A bad character reference in a description, many lines down.
    let mut bad: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let m = lines
        .iter()
        .position(|l| l.contains("</Snapshot>"))
        .unwrap();
    bad.insert(m, "      <Description>a".into());
    bad.insert(m + 1, "b &#xZZ; c</Description>".into());
    let err = MachineSettings::parse_str(&bad.join("\n")).unwrap_err();
    match err.innermost() {
        Error::Xml { line, .. } => assert_eq!(*line, m as u64 + 2, "{err}"),
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn a_symlinked_folder_inside_the_machine_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let vbox = machine_folder(&tmp.path().join("vm"));
    // `Snapshots` is a link to a folder elsewhere that holds the "saved state".
    let elsewhere = tmp.path().join("etc");
    fs::create_dir(&elsewhere).unwrap();
    fs::write(elsewhere.join("s1.sav"), b"secret").unwrap();
    fs::remove_dir_all(tmp.path().join("vm/Snapshots")).unwrap();
    symlink(&elsewhere, tmp.path().join("vm/Snapshots")).unwrap();
    let m = Machine::load(&vbox, None).unwrap();
    let dst = tmp.path().join("dst");
    let err = copy_installed(&m, &dst).unwrap_err();
    let text = chain(&err);
    assert!(matches!(err, Error::CopyRefused { .. }), "{err:?}");
    assert!(
        text.contains("Snapshots") && text.contains("symbolic link"),
        "{text}"
    );
    assert!(tree(&dst).is_empty());
}

#[test]
fn a_fifo_disk_does_not_block_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let vbox = machine_folder(&tmp.path().join("vm"));
    let vdi = tmp.path().join("vm/TM.vdi");
    fs::remove_file(&vdi).unwrap();
    nix::unistd::mkfifo(&vdi, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let m = Machine::load(&vbox, None).unwrap();
    let (tx, rx) = mpsc::channel();
    let dst = tmp.path().join("dst");
    let d = dst.clone();
    std::thread::spawn(move || {
        let r = copy_installed(&m, &d);
        let _ = tx.send(r.map(|_| ()).map_err(|e| chain(&e)));
    });
    let text = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a FIFO disk must not block the copy")
        .unwrap_err();
    assert!(text.contains("not a regular file"), "{text}");
    assert!(tree(&dst).is_empty());
}

/// A vbox error without a core equivalent keeps its variant and its causes when it
/// becomes a core error (`Hypervisor` callers see `Generic` with it as the source).
#[test]
fn errors_keep_their_variant_and_source_across_the_core_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.vbox");
    std::fs::write(&bad, "<VirtualBox>\n<Machine name='x'>\n&nope;\n").unwrap();
    let e = Machine::load(&bad, None).unwrap_err();
    let shown = e.to_string();
    let core: unacloud_core::Error = e.into();
    match &core {
        unacloud_core::Error::Generic { backend, source } => {
            assert_eq!(backend, &"virtualbox");
            let inner = source
                .downcast_ref::<unacloud_vbox::Error>()
                .expect("the vbox error itself");
            assert_eq!(inner.to_string(), shown);
            assert!(
                std::error::Error::source(inner).is_some(),
                "its cause is kept"
            );
        }
        other => panic!("{other:?}"),
    }
    let mut depth = 0;
    let mut cur: Option<&dyn std::error::Error> = Some(&core);
    while let Some(c) = cur {
        depth += 1;
        cur = c.source();
    }
    assert!(depth >= 3, "core → vbox → cause: {depth} levels");
}

#![allow(clippy::unwrap_used)]
//! Safe copy: escapes refused with nothing written, failures leave no partial files,
//! sparse files stay sparse.

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use unacloud_vbox::copy::{copy_files, safe_relative_path, CopyOptions, RejectReason};
use unacloud_vbox::Error;

/// Every path under `dir`, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

fn write(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

#[test]
fn copies_a_tree_with_checksums_and_progress() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let a = src.path().join("TM.vbox");
    let b = src.path().join("Snapshots/{0a}.vdi");
    let c = src.path().join("Snapshots/2024-01-01T00-00-00-000Z.sav");
    write(&a, b"<VirtualBox/>\n");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    write(&b, &big);
    write(&c, b"");
    let files = [
        (a.clone(), PathBuf::from("TM/TM.vbox")),
        (b.clone(), PathBuf::from("TM\\Snapshots\\{0a}.vdi")),
        (
            c.clone(),
            PathBuf::from("TM/Snapshots/2024-01-01T00-00-00-000Z.sav"),
        ),
    ];
    let mut calls = Vec::new();
    let options = CopyOptions::default().checksum(true).buffer_size(64 * 1024);
    let report = copy_files(&files, dest.path(), &options, |p| {
        calls.push((p.bytes_done, p.bytes_total, p.file_index, p.file_bytes_done))
    })
    .unwrap();
    let total = 14 + 3_000_000;
    assert_eq!(report.bytes, total);
    assert_eq!(report.files.len(), 3);
    assert_eq!(
        fs::read(dest.path().join("TM/TM.vbox")).unwrap(),
        b"<VirtualBox/>\n"
    );
    assert_eq!(
        fs::read(dest.path().join("TM/Snapshots/{0a}.vdi")).unwrap(),
        big
    );
    assert_eq!(
        fs::metadata(
            dest.path()
                .join("TM/Snapshots/2024-01-01T00-00-00-000Z.sav")
        )
        .unwrap()
        .len(),
        0
    );
    assert_eq!(
        report.files[1].blake3.as_deref(),
        Some(blake3::hash(&big).to_hex().as_str())
    );
    assert_eq!(
        report.created_dirs,
        vec![dest.path().join("TM"), dest.path().join("TM/Snapshots")]
    );
    // Progress: monotonic, ends at the total, every file reported.
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    assert!(calls.iter().all(|c| c.1 == total));
    assert_eq!(calls.last().unwrap().0, total);
    assert!(calls.len() > 3_000_000 / 65_536);
    for i in 0..3 {
        assert!(calls.iter().any(|c| c.2 == i));
    }
    // No temporary files left behind.
    assert!(tree(dest.path()).iter().all(|p| !p
        .file_name()
        .unwrap()
        .to_string_lossy()
        .contains(".part-")));
}

#[test]
fn escapes_are_all_refused_and_nothing_is_written() {
    let src = tempfile::tempdir().unwrap();
    let outer = tempfile::tempdir().unwrap();
    let dest = outer.path().join("dest");
    let good = src.path().join("good.vdi");
    write(&good, b"data");
    let hostile = [
        "../escape.vdi",
        "Snapshots/../../escape.vdi",
        "..\\..\\escape.vdi",
        "/etc/cron.d/evil",
        "\\Windows\\evil",
        "C:/Users/x/VirtualBox VMs/TM/TM.vdi",
        "c:evil",
        "//host/share/evil",
        "\\\\host\\share\\evil",
        "",
    ];
    let mut files: Vec<(PathBuf, PathBuf)> = vec![(good.clone(), "ok/good.vdi".into())];
    files.extend(hostile.iter().map(|h| (good.clone(), PathBuf::from(h))));
    let err = copy_files(&files, &dest, &CopyOptions::default(), |_| {}).unwrap_err();
    match &err {
        Error::CopyRefused {
            dest_root,
            rejected,
        } => {
            assert_eq!(dest_root, &dest);
            assert_eq!(rejected.len(), hostile.len(), "{rejected:#?}");
            for (r, h) in rejected.iter().zip(hostile) {
                assert_eq!(r.relative, h);
            }
            assert_eq!(rejected[0].reason, RejectReason::ParentComponent);
            assert_eq!(rejected[3].reason, RejectReason::Absolute);
            assert_eq!(rejected[5].reason, RejectReason::WindowsPrefix);
            assert_eq!(rejected[7].reason, RejectReason::WindowsPrefix);
            assert_eq!(rejected[9].reason, RejectReason::Empty);
        }
        e => panic!("unexpected {e:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("refusing to copy"), "{text}");
    assert!(text.contains("../escape.vdi"), "{text}");
    // Nothing written: not even the destination root, nor the valid file.
    assert!(!dest.exists());
    assert_eq!(tree(outer.path()), Vec::<PathBuf>::new());
}

#[test]
fn symlink_out_of_the_root_is_refused() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let f = src.path().join("x.vdi");
    write(&f, b"data");
    std::os::unix::fs::symlink(outside.path(), dest.path().join("Snapshots")).unwrap();
    fs::create_dir(dest.path().join("inner")).unwrap();
    std::os::unix::fs::symlink(dest.path().join("inner"), dest.path().join("alias")).unwrap();
    let files = [
        (f.clone(), "Snapshots/x.vdi"),
        (f.clone(), "alias/ok.vdi"), // a link inside the root is fine
    ];
    let err = copy_files(&files, dest.path(), &CopyOptions::default(), |_| {}).unwrap_err();
    match err {
        Error::CopyRefused { rejected, .. } => {
            assert_eq!(rejected.len(), 1);
            assert!(matches!(
                rejected[0].reason,
                RejectReason::SymlinkEscape { .. }
            ));
        }
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(tree(outside.path()), Vec::<PathBuf>::new());
    assert!(!dest.path().join("inner/ok.vdi").exists());
    // Without the escaping file the link inside the root is followed.
    copy_files(&files[1..], dest.path(), &CopyOptions::default(), |_| {}).unwrap();
    assert_eq!(fs::read(dest.path().join("inner/ok.vdi")).unwrap(), b"data");
}

#[test]
fn existing_files_duplicates_and_missing_sources() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let f = src.path().join("x.vdi");
    write(&f, b"new");
    write(&dest.path().join("x.vdi"), b"old");
    write(&dest.path().join("file"), b"not a folder");
    let files = [
        (f.clone(), "x.vdi"),
        (f.clone(), "y.vdi"),
        (f.clone(), "./y.vdi"),
        (src.path().join("missing.vdi"), "z.vdi"),
        (f.clone(), "file/below.vdi"),
    ];
    let err = copy_files(&files, dest.path(), &CopyOptions::default(), |_| {}).unwrap_err();
    let Error::CopyRefused { rejected, .. } = err else {
        panic!("unexpected {err:?}")
    };
    let reasons: Vec<_> = rejected.iter().map(|r| r.reason.clone()).collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert_eq!(reasons[0], RejectReason::Exists);
    assert_eq!(reasons[1], RejectReason::Duplicate);
    assert!(matches!(reasons[2], RejectReason::BadSource { .. }));
    assert!(matches!(reasons[3], RejectReason::NotADirectory { .. }));
    assert_eq!(fs::read(dest.path().join("x.vdi")).unwrap(), b"old");
    assert!(!dest.path().join("y.vdi").exists());
    // With overwrite the old file is replaced.
    let opts = CopyOptions::default().overwrite(true);
    copy_files(&files[..2], dest.path(), &opts, |_| {}).unwrap();
    assert_eq!(fs::read(dest.path().join("x.vdi")).unwrap(), b"new");
    // Copying a file onto itself is refused even with overwrite.
    let err = copy_files(
        &[(dest.path().join("x.vdi"), "x.vdi")],
        dest.path(),
        &opts,
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(
        err,
        Error::CopyRefused { ref rejected, .. } if rejected[0].reason == RejectReason::SameAsSource
    ));
    assert_eq!(fs::read(dest.path().join("x.vdi")).unwrap(), b"new");
}

#[test]
fn sparse_one_gigabyte_file_copies_correctly() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let path = src.path().join("base.vdi");
    let len: u64 = 1 << 30;
    let marks: [(u64, &[u8]); 4] = [
        (0, b"header"),
        (300 << 20, b"middle data"),
        ((700 << 20) + 12345, b"unaligned"),
        (len - 5, b"tail!"),
    ];
    {
        let mut f = fs::File::create(&path).unwrap();
        f.set_len(len).unwrap();
        for (off, data) in marks {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(data).unwrap();
        }
    }
    let src_blocks = fs::metadata(&path).unwrap().blocks();
    let opts = CopyOptions::default().checksum(true);
    let report = copy_files(&[(path.clone(), "TM/base.vdi")], dest.path(), &opts, |_| {}).unwrap();
    let out = dest.path().join("TM/base.vdi");
    let meta = fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), len);
    assert_eq!(report.files[0].bytes, len);
    assert!(report.files[0].sparse_bytes > len - (64 << 20));
    // Stays sparse (allowing for file systems that allocate more eagerly).
    assert!(
        meta.blocks() * 512 < 64 << 20,
        "destination allocates {} bytes (source {})",
        meta.blocks() * 512,
        src_blocks * 512
    );
    let mut f = fs::File::open(&out).unwrap();
    for (off, data) in marks {
        let mut buf = vec![0u8; data.len()];
        f.seek(SeekFrom::Start(off)).unwrap();
        std::io::Read::read_exact(&mut f, &mut buf).unwrap();
        assert_eq!(buf, data);
    }
    // Zeros around a mark.
    let mut buf = vec![1u8; 4096];
    f.seek(SeekFrom::Start((300 << 20) + 11)).unwrap();
    std::io::Read::read_exact(&mut f, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert!(report.files[0].blake3.is_some());
}

#[test]
fn dense_copy_of_sparse_source_has_same_content() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let path = src.path().join("s.sav");
    {
        let mut f = fs::File::create(&path).unwrap();
        f.set_len(5 << 20).unwrap();
        f.seek(SeekFrom::Start(2 << 20)).unwrap();
        f.write_all(&[7u8; 100_000]).unwrap();
    }
    let opts = CopyOptions::default().sparse(false).checksum(true);
    let report = copy_files(&[(path.clone(), "s.sav")], dest.path(), &opts, |_| {}).unwrap();
    assert_eq!(report.files[0].sparse_bytes, 0);
    assert_eq!(
        fs::read(dest.path().join("s.sav")).unwrap(),
        fs::read(&path).unwrap()
    );
}

/// Re-runs one test of this binary in a child process started through `sh -c
/// "<prelude>; exec <test binary> ..."`, with `UNACLOUD_COPY_CHILD=1`. Returns `None`
/// when the prelude itself fails (e.g. no permission to make a mount namespace).
fn run_child(test: &str, prelude: &str, src: &Path) -> Option<std::process::Output> {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{prelude} || exit 97; exec \"$0\" --exact {test} --nocapture --test-threads=1"
        ))
        .arg(exe)
        .env("UNACLOUD_COPY_CHILD", "1")
        .env("UNACLOUD_COPY_SRC", src)
        .output()
        .unwrap();
    if out.status.code() == Some(97) {
        return None;
    }
    Some(out)
}

fn is_child() -> bool {
    std::env::var_os("UNACLOUD_COPY_CHILD").is_some()
}

/// Sources for the failing copy, made by the parent (the child may not write them).
fn failing_copy_sources() -> tempfile::TempDir {
    let src = tempfile::tempdir().unwrap();
    write(&src.path().join("small.vbox"), b"<VirtualBox/>");
    write(&src.path().join("big.vdi"), &vec![0x5au8; 4 << 20]);
    src
}

/// The copy in the child: three files, the second one larger than the file-size limit.
fn failing_copy_scenario(dest_root: &Path) -> Error {
    let src = PathBuf::from(std::env::var("UNACLOUD_COPY_SRC").unwrap());
    let small = src.join("small.vbox");
    let big = src.join("big.vdi");
    let files = [
        (small.clone(), "TM/TM.vbox"),
        (big.clone(), "TM/Snapshots/big.vdi"),
        (small.clone(), "TM/after.vbox"),
    ];
    copy_files(&files, dest_root, &CopyOptions::default(), |_| {}).unwrap_err()
}

#[test]
fn write_failure_mid_file_leaves_nothing_behind() {
    if is_child() {
        let dest = PathBuf::from(std::env::var("UNACLOUD_COPY_DEST").unwrap());
        let err = failing_copy_scenario(&dest);
        match &err {
            Error::CopyFailed {
                step, source, to, ..
            } => {
                assert_eq!(*step, "writing the destination");
                assert!(to.ends_with("TM/Snapshots/big.vdi"));
                // EFBIG: the file-size limit acts like a full disk.
                assert_eq!(source.raw_os_error(), Some(27), "{source}");
            }
            e => panic!("unexpected {e:?}"),
        }
        println!("CHILD-OK: {err}");
        return;
    }
    let dest = tempfile::tempdir().unwrap();
    let src = failing_copy_sources();
    // Ignored signals stay ignored across exec; `ulimit -f` caps file size (1 MiB).
    let out = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 2048; exec \"$0\" --exact write_failure_mid_file_leaves_nothing_behind --nocapture --test-threads=1")
        .arg(std::env::current_exe().unwrap())
        .env("UNACLOUD_COPY_CHILD", "1")
        .env("UNACLOUD_COPY_DEST", dest.path())
        .env("UNACLOUD_COPY_SRC", src.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("CHILD-OK"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first file was put in place and then rolled back; no temp files, no folders.
    assert_eq!(tree(dest.path()), Vec::<PathBuf>::new());
}

#[test]
fn read_only_destination_gives_a_typed_error() {
    if is_child() {
        let dest = PathBuf::from(std::env::var("UNACLOUD_COPY_DEST").unwrap());
        let err = failing_copy_scenario(&dest);
        match &err {
            Error::CopyFailed { step, source, .. } => {
                assert!(
                    *step == "creating folders" || *step == "creating a temporary file",
                    "{step}"
                );
                // EROFS (read-only mount) or EACCES (permissions).
                assert!(
                    matches!(source.raw_os_error(), Some(30) | Some(13)),
                    "{source}"
                );
            }
            e => panic!("unexpected {e:?}"),
        }
        println!("CHILD-OK: {err}");
        return;
    }
    let dest = tempfile::tempdir().unwrap();
    let src = failing_copy_sources();
    let d = dest.path().display().to_string();
    let out = if nix::unistd::geteuid().is_root() {
        // Root ignores permission bits: make the folder a read-only mount in a
        // private mount namespace instead.
        let prelude = format!(
            "command -v unshare >/dev/null && export UNACLOUD_COPY_DEST='{d}' && \
             exec unshare -m sh -c 'mount --bind \"$UNACLOUD_COPY_DEST\" \"$UNACLOUD_COPY_DEST\" && \
             mount -o remount,bind,ro \"$UNACLOUD_COPY_DEST\" && exec \"$0\" --exact \
             read_only_destination_gives_a_typed_error --nocapture --test-threads=1' \"$0\""
        );
        run_child(
            "read_only_destination_gives_a_typed_error",
            &prelude,
            src.path(),
        )
    } else {
        let mut perms = fs::metadata(dest.path()).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
        fs::set_permissions(dest.path(), perms).unwrap();
        run_child(
            "read_only_destination_gives_a_typed_error",
            &format!("export UNACLOUD_COPY_DEST='{d}'"),
            src.path(),
        )
    };
    let Some(out) = out else {
        skip::skipped("a read-only mount cannot be made here (needs root)");
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unshare") {
        eprintln!(
            "note: mount namespaces unavailable; skipping ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return;
    }
    assert!(
        out.status.success() && stdout.contains("CHILD-OK"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut perms = fs::metadata(dest.path()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    fs::set_permissions(dest.path(), perms).unwrap();
    assert_eq!(tree(dest.path()), Vec::<PathBuf>::new());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the input, an accepted relative path has only plain components and
    /// stays below the root when joined.
    #[test]
    fn accepted_paths_stay_inside(s in "[a-zA-Z0-9./\\\\:{}~ -]{0,40}") {
        if let Ok(p) = safe_relative_path(Path::new(&s)) {
            prop_assert!(p.components().all(|c| matches!(c, Component::Normal(_))));
            prop_assert!(!p.components().any(|c| c.as_os_str() == ".."));
            let root = Path::new("/dest/root");
            prop_assert!(root.join(&p).starts_with(root));
            prop_assert!(!s.starts_with('/') && !s.starts_with('\\'));
        }
    }
}

//! Fuzz the copier's planning and its all-or-nothing guarantee with real files.
//!
//! Each input describes up to eight files to copy: for each, a source picked from a
//! fixed set (regular files with different modes, a symbolic link leading outside, a
//! link inside, a folder, a FIFO, a missing path) and arbitrary bytes as its relative
//! destination. The first byte's bits choose overwrite, checksum, sparse,
//! keep-completed and whether the destination starts with hostile contents (a link to
//! a folder outside, a file where a folder is expected, a file already in place).
//!
//! What must hold, whatever the input:
//! - `copy_files` returns `Ok` or a typed error, never panics;
//! - nothing outside the destination root is created, changed or removed (the
//!   sources and a sibling folder are compared before and after);
//! - on `Ok`, every reported destination is a regular file below the root, no wider
//!   in mode than its source, with its source's length;
//! - on `Err`, the destination holds no file it did not hold before (the default
//!   options remove what was completed);
//! - every relative path that [`safe_relative_path`] accepts has only normal
//!   components.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use unacloud_vbox::copy::{copy_files, safe_relative_path, CopyOptions};

struct Lab {
    base: PathBuf,
    sources: Vec<PathBuf>,
}

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("unacloud-fuzz-copy-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let src = base.join("src");
        let outside = base.join("outside");
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), b"not to be copied").unwrap();
        let regular = |name: &str, data: &[u8], mode: u32| {
            let p = src.join(name);
            fs::write(&p, data).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let mut sources = vec![
            regular("disk.vdi", &[7u8; 9000], 0o640),
            regular("empty.sav", b"", 0o600),
            regular("zeros.vdi", &[0u8; 70_000], 0o644),
        ];
        let link_out = src.join("link-out.sav");
        symlink(outside.join("secret"), &link_out).unwrap();
        sources.push(link_out);
        let link_in = src.join("link-in.vdi");
        symlink(src.join("disk.vdi"), &link_in).unwrap();
        sources.push(link_in);
        let folder = src.join("folder");
        fs::create_dir(&folder).unwrap();
        sources.push(folder);
        let fifo = src.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.map(|s| s.success()).unwrap_or(false) {
            sources.push(fifo);
        }
        sources.push(src.join("missing.vdi"));
        Lab { base, sources }
    })
}

/// Every entry below `root` (links not followed) with its kind, length and mode.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (char, u64, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            let kind = if meta.file_type().is_symlink() {
                'l'
            } else if meta.is_dir() {
                stack.push(path.clone());
                'd'
            } else if meta.is_file() {
                'f'
            } else {
                'o'
            };
            out.insert(path, (kind, meta.len(), meta.permissions().mode()));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let lab = lab();
    let dest = lab.base.join("dest");
    let _ = fs::remove_dir_all(&dest);
    if flags & 0x20 != 0 {
        fs::create_dir_all(&dest).unwrap();
        symlink(lab.base.join("outside"), dest.join("Snapshots")).unwrap();
        fs::write(dest.join("Logs"), b"a file where a folder may be wanted").unwrap();
        fs::write(dest.join("disk.vdi"), b"already here").unwrap();
    }

    let mut files: Vec<(PathBuf, PathBuf)> = Vec::new();
    for entry in rest.split(|&b| b == b'\n').take(8) {
        let Some((&pick, relative)) = entry.split_first() else { continue };
        let relative = Path::new(OsStr::from_bytes(relative));
        if let Ok(clean) = safe_relative_path(relative) {
            assert!(
                clean.components().all(|c| matches!(c, Component::Normal(_))),
                "accepted {relative:?} as {clean:?}"
            );
        }
        let source = lab.sources[pick as usize % lab.sources.len()].clone();
        files.push((source, relative.to_path_buf()));
    }

    let options = CopyOptions::default()
        .overwrite(flags & 0x01 != 0)
        .checksum(flags & 0x02 != 0)
        .sparse(flags & 0x04 != 0)
        .keep_completed_on_error(flags & 0x08 != 0)
        .sync(false)
        .buffer_size(4096);
    let outside_before = snapshot(&lab.base.join("outside"));
    let src_before = snapshot(&lab.base.join("src"));
    let dest_before = snapshot(&dest);

    let result = copy_files(&files, &dest, &options, |_| {});

    assert_eq!(snapshot(&lab.base.join("outside")), outside_before, "outside changed");
    assert_eq!(snapshot(&lab.base.join("src")), src_before, "sources changed");
    let top: Vec<_> = fs::read_dir(&lab.base)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "src" && n != "outside" && n != "dest")
        .collect();
    assert!(top.is_empty(), "written beside the destination: {top:?}");
    let dest_after = snapshot(&dest);
    match result {
        Ok(report) => {
            for copied in &report.files {
                assert!(copied.dest.starts_with(&dest), "{:?} outside", copied.dest);
                let meta = fs::symlink_metadata(&copied.dest).unwrap();
                assert!(meta.is_file(), "{:?} is not a regular file", copied.dest);
                let src_meta = fs::symlink_metadata(&copied.source).unwrap();
                assert!(src_meta.is_file(), "copied from non-file {:?}", copied.source);
                assert_eq!(meta.len(), src_meta.len());
                let (m, s) = (meta.permissions().mode() & 0o777, src_meta.permissions().mode() & 0o777);
                assert_eq!(m & !s, 0, "mode {m:o} wider than source {s:o}");
            }
        }
        Err(e) => {
            let _ = e.to_string();
            if flags & 0x08 == 0 {
                for (path, (kind, _, _)) in &dest_after {
                    if *kind == 'f' {
                        assert!(dest_before.contains_key(path), "failed copy left {path:?}");
                    }
                }
            }
        }
    }
});

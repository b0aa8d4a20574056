//! A small file system that a test can fill, for the full-disk paths.
//!
//! [`SmallFs::mount`] mounts a tmpfs of a given size (which needs root) and unmounts it
//! when dropped, also when the test fails; [`fill`] then takes all the room left on it.
//! Test binaries include this file, beside `skip.rs`, with
//! `#[path = "…/testsupport/tmpfs.rs"] mod tmpfs;`.
#![allow(dead_code)]

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::skip;

/// A mounted tmpfs, unmounted (lazily, so that a file still open does not stop it) on
/// drop.
pub struct SmallFs(PathBuf);

impl SmallFs {
    /// Mounts a tmpfs of `size` (in mount's syntax: `2m`, `320m`) at `dir`, which is
    /// made if missing. Without root, or where the mount fails, the test is reported as
    /// skipped ([`skip::skipped`]) and `None` is returned.
    pub fn mount(dir: &Path, size: &str) -> Option<SmallFs> {
        if !nix::unistd::geteuid().is_root() {
            skip::skipped("mounting a small file system needs root");
            return None;
        }
        if let Err(e) = std::fs::create_dir_all(dir) {
            skip::skipped(format_args!("{} cannot be made: {e}", dir.display()));
            return None;
        }
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status();
        match mounted {
            Ok(st) if st.success() => Some(SmallFs(dir.to_path_buf())),
            Ok(st) => {
                skip::skipped(format_args!("tmpfs cannot be mounted here ({st})"));
                None
            }
            Err(e) => {
                skip::skipped(format_args!("mount cannot be run: {e}"));
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system of `dir` as far as it goes, quickly (large allocations first,
/// then smaller ones, then single blocks and bytes); returns the filler file, whose
/// removal gives the room back.
///
/// # Panics
/// If the filler file cannot be created.
pub fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create the filler file");
    let mut chunk: i64 = 1 << 30;
    let mut at = 0i64;
    while chunk >= 4096 {
        match nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), at, chunk) {
            Ok(()) => at += chunk,
            Err(_) => chunk /= 2,
        }
    }
    // Allocation does not move the file position: write on from its end.
    f.seek(SeekFrom::Start(at as u64))
        .expect("seek in the filler file");
    let block = [0u8; 4096];
    while f.write_all(&block).is_ok() {}
    while f.write_all(&[0u8]).is_ok() {}
    let _ = f.sync_all();
    path
}

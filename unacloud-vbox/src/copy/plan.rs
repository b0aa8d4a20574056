//! Planning a copy: every source and destination checked before anything is written.

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{safe_relative_path, CopyOptions, RejectReason, RejectedPath};

/// A planned copy, after all checks.
pub(super) struct Plan {
    pub(super) source: PathBuf,
    pub(super) dest: PathBuf,
    pub(super) len: u64,
    /// Permission bits of the source (`mode & 0o777`).
    pub(super) mode: u32,
    /// Device and inode of the file checked, so the file copied is the same one.
    pub(super) id: (u64, u64),
}

/// Opens a source for reading without following a final symbolic link and without
/// blocking on a FIFO; the caller checks the opened file's metadata.
pub(super) fn open_source(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
}

/// Checks a source: not a symbolic link, a regular file; returns `(len, mode, id)`
/// from the opened file's own metadata.
pub(super) fn check_source(path: &Path) -> Result<(u64, u32, (u64, u64)), RejectReason> {
    let bad = |reason: String| RejectReason::BadSource { reason };
    // Look before opening so that device nodes are never opened at all.
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(RejectReason::SourceSymlink {
                path: path.to_path_buf(),
            })
        }
        Ok(m) if !m.is_file() => {
            return Err(bad(format!("{} is not a regular file", path.display())))
        }
        Ok(_) => {}
        Err(e) => return Err(bad(format!("{} cannot be read: {e}", path.display()))),
    }
    let file = match open_source(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(RejectReason::SourceSymlink {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(bad(format!("{} cannot be read: {e}", path.display()))),
    };
    match file.metadata() {
        Ok(m) if m.is_file() => Ok((m.len(), m.mode() & 0o777, (m.dev(), m.ino()))),
        Ok(_) => Err(bad(format!("{} is not a regular file", path.display()))),
        Err(e) => Err(bad(format!("{} cannot be read: {e}", path.display()))),
    }
}

pub(super) fn plan<S: AsRef<Path>, R: AsRef<Path>>(
    files: &[(S, R)],
    dest_root: &Path,
    options: &CopyOptions,
) -> Result<Vec<Plan>> {
    refuse_symlinked_root(dest_root)?;
    let canonical_root = fs::canonicalize(dest_root).ok();
    let mut rejected = Vec::new();
    let mut plans = Vec::with_capacity(files.len());
    let mut seen: HashSet<PathBuf> = HashSet::new();
    for (source, relative) in files {
        let source = source.as_ref();
        let relative = relative.as_ref();
        let mut reject = |reason| {
            rejected.push(RejectedPath {
                source: source.to_path_buf(),
                relative: relative.to_string_lossy().into_owned(),
                reason,
            })
        };
        let rel = match safe_relative_path(relative) {
            Ok(rel) => rel,
            Err(reason) => {
                reject(reason);
                continue;
            }
        };
        let dest = dest_root.join(&rel);
        if let Err(reason) = check_existing_parts(dest_root, canonical_root.as_deref(), &rel) {
            reject(reason);
            continue;
        }
        let (len, mode, id) = match check_source(source) {
            Ok(checked) => checked,
            Err(reason) => {
                reject(reason);
                continue;
            }
        };
        if !seen.insert(rel.clone()) {
            reject(RejectReason::Duplicate);
            continue;
        }
        match fs::symlink_metadata(&dest) {
            Ok(_) if !options.overwrite => {
                reject(RejectReason::Exists);
                continue;
            }
            Ok(m) if m.is_dir() => {
                reject(RejectReason::NotADirectory { path: dest.clone() });
                continue;
            }
            Ok(_) => {
                if let (Ok(a), Ok(b)) = (fs::canonicalize(source), fs::canonicalize(&dest)) {
                    if a == b {
                        reject(RejectReason::SameAsSource);
                        continue;
                    }
                }
            }
            Err(_) => {}
        }
        plans.push(Plan {
            source: source.to_path_buf(),
            dest,
            len,
            mode,
            id,
        });
    }
    if rejected.is_empty() {
        Ok(plans)
    } else {
        Err(Error::CopyRefused {
            dest_root: dest_root.to_path_buf(),
            rejected,
        })
    }
}

/// The destination root must not be a symbolic link (whatever it points to).
pub(super) fn refuse_symlinked_root(dest_root: &Path) -> Result<()> {
    match fs::symlink_metadata(dest_root) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::DestinationIsSymlink {
            dest_root: dest_root.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

/// Every existing folder on the way from `root` to `root/rel` must be a real folder
/// inside the root (a symbolic link is fine if it resolves inside the root).
pub(super) fn check_existing_parts(
    root: &Path,
    canonical_root: Option<&Path>,
    rel: &Path,
) -> Result<(), RejectReason> {
    let Some(canonical_root) = canonical_root else {
        return Ok(()); // the root does not exist yet: nothing below it exists either
    };
    let mut current = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        current.push(part);
        let is_last = i + 1 == parts.len();
        let meta = match fs::symlink_metadata(&current) {
            Ok(m) => m,
            Err(_) => return Ok(()), // does not exist: created fresh below
        };
        if meta.file_type().is_symlink() {
            if is_last {
                return Ok(()); // the rename replaces the link itself, never its target
            }
            match fs::canonicalize(&current) {
                Ok(target) if target.starts_with(canonical_root) && target.is_dir() => {}
                Ok(target) if target.starts_with(canonical_root) => {
                    return Err(RejectReason::NotADirectory { path: current })
                }
                _ => return Err(RejectReason::SymlinkEscape { link: current }),
            }
        } else if !is_last && !meta.is_dir() {
            return Err(RejectReason::NotADirectory { path: current });
        }
    }
    Ok(())
}

//! Executing a plan: folders, temporary files, sparse-aware copies with optional
//! checksums, and atomic installation.

use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::plan::{open_source, refuse_symlinked_root, Plan};
use super::{CopiedFile, CopyOptions, CopyProgress, CopyReport, RejectReason, RejectedPath};

pub(super) fn execute<F: FnMut(&CopyProgress<'_>)>(
    plans: &[Plan],
    dest_root: &Path,
    options: &CopyOptions,
    progress: &mut F,
    report: &mut CopyReport,
    completed: &mut Vec<PathBuf>,
) -> Result<()> {
    let total: u64 = plans.iter().map(|p| p.len).sum();
    let mut done_before = 0u64;
    create_dirs(dest_root, &mut report.created_dirs).map_err(|e| Error::io(dest_root, e))?;
    // Re-check now that it exists: a link put there since planning is refused too.
    refuse_symlinked_root(dest_root)?;
    let canonical_root = fs::canonicalize(dest_root).map_err(|e| Error::io(dest_root, e))?;
    let mut buf = vec![0u8; options.buffer_size.max(4096)];
    for (index, plan) in plans.iter().enumerate() {
        let fail = |step: &'static str| {
            let from = plan.source.clone();
            let to = plan.dest.clone();
            move |source: io::Error| Error::CopyFailed {
                from,
                to,
                step,
                source,
            }
        };
        let parent = plan.dest.parent().unwrap_or(dest_root);
        create_dirs(parent, &mut report.created_dirs).map_err(fail("creating folders"))?;
        // Re-check right before writing: a folder swapped for a link since planning
        // must not redirect the write.
        match fs::canonicalize(parent) {
            Ok(p) if p.starts_with(&canonical_root) => {}
            _ => {
                return Err(Error::CopyRefused {
                    dest_root: dest_root.to_path_buf(),
                    rejected: vec![RejectedPath {
                        source: plan.source.clone(),
                        relative: plan.dest.display().to_string(),
                        reason: RejectReason::SymlinkEscape {
                            link: parent.to_path_buf(),
                        },
                    }],
                })
            }
        }
        let (temp_path, mut temp) = create_temp(parent, &plan.dest, plan.mode)
            .map_err(fail("creating a temporary file"))?;
        let outcome = copy_one(plan, &mut temp, options, &mut buf, &mut |file_done| {
            progress(&CopyProgress {
                bytes_done: done_before + file_done,
                bytes_total: total,
                file_index: index,
                file_count: plans.len(),
                file_bytes_done: file_done,
                file_bytes_total: plan.len,
                source: &plan.source,
                dest: &plan.dest,
            })
        });
        drop(temp);
        let copied = match outcome {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_file(&temp_path);
                return Err(e);
            }
        };
        if let Err(e) = install(&temp_path, &plan.dest, options.overwrite) {
            let _ = fs::remove_file(&temp_path);
            return Err(fail("renaming into place")(e));
        }
        completed.push(plan.dest.clone());
        if options.sync {
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        done_before += plan.len;
        report.bytes += plan.len;
        report.files.push(copied);
    }
    Ok(())
}

/// `create_dir_all` that records what it created.
pub(super) fn create_dirs(dir: &Path, created: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut current = dir;
    loop {
        match fs::symlink_metadata(current) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(current.to_path_buf());
                match current.parent() {
                    Some(p) if !p.as_os_str().is_empty() => current = p,
                    _ => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    for d in missing.into_iter().rev() {
        match fs::create_dir(&d) {
            Ok(()) => created.push(d),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates a fresh temporary file next to `dest` with permission bits `mode` (set
/// explicitly after creation: the umask may only have narrowed them further).
pub(super) fn create_temp(dir: &Path, dest: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Keep the temporary name short enough for 255-byte file name limits.
    let short: String = name.chars().take(120).collect();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(".{short}.part-{}-{n}", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(mode & 0o777)
            .open(&temp)
        {
            Ok(f) => {
                if let Err(e) = f.set_permissions(fs::Permissions::from_mode(mode & 0o777)) {
                    let _ = fs::remove_file(&temp);
                    return Err(e);
                }
                return Ok((temp, f));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Put the finished temporary file in place. Without `overwrite`, a hard link makes
/// the step fail if the destination appeared meanwhile (rename would replace it).
pub(super) fn install(temp: &Path, dest: &Path, overwrite: bool) -> io::Result<()> {
    if overwrite {
        return fs::rename(temp, dest);
    }
    match fs::hard_link(temp, dest) {
        Ok(()) => fs::remove_file(temp),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
        Err(_) => {
            // File systems without hard links: check, then rename.
            if fs::symlink_metadata(dest).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "destination appeared during the copy",
                ));
            }
            fs::rename(temp, dest)
        }
    }
}

pub(super) fn copy_one(
    plan: &Plan,
    temp: &mut File,
    options: &CopyOptions,
    buf: &mut [u8],
    progress: &mut dyn FnMut(u64),
) -> Result<CopiedFile> {
    let fail = |step: &'static str| {
        move |source: io::Error| Error::CopyFailed {
            from: plan.source.clone(),
            to: plan.dest.clone(),
            step,
            source,
        }
    };
    // The file checked while planning, and nothing else: no link followed, the same
    // inode, still a regular file.
    let mut src = open_source(&plan.source).map_err(fail("opening the source"))?;
    let meta = src.metadata().map_err(fail("reading the source's size"))?;
    if !meta.is_file() || (meta.dev(), meta.ino()) != plan.id {
        return Err(fail("opening the source")(io::Error::other(
            "the source was replaced since it was checked",
        )));
    }
    let len = meta.len();
    if len != plan.len {
        return Err(fail("reading the source")(io::Error::other(format!(
            "source changed size during the copy ({} -> {len} bytes)",
            plan.len
        ))));
    }
    let mut hasher = options.checksum.then(blake3::Hasher::new);
    let mut sparse_bytes = 0u64;
    let mut pos = 0u64;
    progress(0);
    while pos < len {
        let (data_start, data_end) = if options.sparse {
            next_data(&src, pos, len).map_err(fail("looking for data in the source"))?
        } else {
            (pos, len)
        };
        if data_start > pos {
            // A hole: nothing to write; the final set_len covers it.
            let hole = data_start - pos;
            sparse_bytes += hole;
            if let Some(h) = hasher.as_mut() {
                hash_zeros(h, hole);
            }
            progress(data_start);
        }
        if data_start >= len {
            break;
        }
        src.seek(SeekFrom::Start(data_start))
            .map_err(fail("reading the source"))?;
        temp.seek(SeekFrom::Start(data_start))
            .map_err(fail("writing the destination"))?;
        let mut at = data_start;
        while at < data_end {
            let want = usize::try_from((data_end - at).min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = &mut buf[..want];
            src.read_exact(chunk).map_err(fail("reading the source"))?;
            if let Some(h) = hasher.as_mut() {
                h.update(chunk);
            }
            if options.sparse && is_zero(chunk) {
                temp.seek(SeekFrom::Current(want as i64))
                    .map_err(fail("writing the destination"))?;
                sparse_bytes += want as u64;
            } else {
                temp.write_all(chunk)
                    .map_err(fail("writing the destination"))?;
            }
            at += want as u64;
            progress(at);
        }
        pos = data_end;
    }
    temp.set_len(len).map_err(fail("writing the destination"))?;
    temp.flush().map_err(fail("writing the destination"))?;
    if options.sync {
        temp.sync_all()
            .map_err(fail("flushing the destination to disk"))?;
    }
    let written = temp
        .metadata()
        .map_err(fail("checking the destination"))?
        .len();
    if written != len {
        return Err(Error::CopySizeMismatch {
            from: plan.source.clone(),
            to: plan.dest.clone(),
            expected: len,
            actual: written,
        });
    }
    let blake3 = match hasher {
        None => None,
        Some(h) => {
            let expected = h.finalize();
            let actual = hash_file(temp, len, options.sparse, buf)
                .map_err(fail("reading the destination back"))?;
            if expected != actual {
                return Err(Error::ChecksumMismatch {
                    from: plan.source.clone(),
                    to: plan.dest.clone(),
                    source_hash: expected.to_hex().to_string(),
                    dest_hash: actual.to_hex().to_string(),
                });
            }
            Some(expected.to_hex().to_string())
        }
    };
    Ok(CopiedFile {
        source: plan.source.clone(),
        dest: plan.dest.clone(),
        bytes: len,
        sparse_bytes,
        blake3,
    })
}

/// The next data range at or after `pos`: `(start, end)`, with `start == len` when only
/// a hole remains. Falls back to "all data" where holes cannot be asked for.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
pub(super) fn next_data(file: &File, pos: u64, len: u64) -> io::Result<(u64, u64)> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let Ok(offset) = i64::try_from(pos) else {
        return Ok((pos, len));
    };
    let start = match lseek(file, offset, Whence::SeekData) {
        Ok(s) => u64::try_from(s).unwrap_or(pos),
        Err(Errno::ENXIO) => return Ok((len, len)), // only a hole up to the end
        Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => return Ok((pos, len)),
        Err(e) => return Err(io::Error::from(e)),
    };
    let start = start.clamp(pos, len);
    let end = match lseek(
        file,
        i64::try_from(start).unwrap_or(offset),
        Whence::SeekHole,
    ) {
        Ok(e) => u64::try_from(e).unwrap_or(len),
        Err(_) => len,
    };
    Ok((start, end.clamp(start, len)))
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
pub(super) fn next_data(_file: &File, pos: u64, len: u64) -> io::Result<(u64, u64)> {
    Ok((pos, len))
}

pub(super) fn is_zero(chunk: &[u8]) -> bool {
    // Compare in 16-byte words; the compiler vectorises this.
    let (words, rest) = chunk.split_at(chunk.len() - chunk.len() % 16);
    words
        .chunks_exact(16)
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && rest.iter().all(|&b| b == 0)
}

pub(super) fn hash_zeros(hasher: &mut blake3::Hasher, mut n: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Hashes the destination through its own descriptor (its mode may forbid reopening).
pub(super) fn hash_file(
    file: &mut File,
    len: u64,
    sparse: bool,
    buf: &mut [u8],
) -> io::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0u64;
    while pos < len {
        let (start, end) = if sparse {
            next_data(file, pos, len)?
        } else {
            (pos, len)
        };
        hash_zeros(&mut hasher, start - pos);
        if start >= len {
            break;
        }
        file.seek(SeekFrom::Start(start))?;
        let mut at = start;
        while at < end {
            let want = usize::try_from((end - at).min(buf.len() as u64)).unwrap_or(buf.len());
            file.read_exact(&mut buf[..want])?;
            hasher.update(&buf[..want]);
            at += want as u64;
        }
        pos = end;
    }
    Ok(hasher.finalize())
}

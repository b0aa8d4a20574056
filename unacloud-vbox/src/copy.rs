//! Copy a set of files into a destination tree, safely.
//!
//! [`copy_files`] takes `(source, relative destination)` pairs and a destination root
//! and guarantees:
//!
//! * **Nothing outside the root.** Every relative path is checked before anything is
//!   written: absolute paths, `..`, Windows drive and UNC prefixes, and existing
//!   symbolic links that lead out of the root are refused, all at once, in one
//!   [`Error::CopyRefused`] listing every offending path. Relative paths come from
//!   settings files, which may be hostile: they are data, not instructions. Both `/`
//!   and `\` count as separators (VirtualBox on Windows writes either).
//! * **No half-written file under a final name.** Each file is written to a
//!   temporary name in its destination folder, flushed, checked (size, and optionally
//!   a BLAKE3 checksum of source against destination), and only then renamed into
//!   place. On any failure the temporary file is removed, files this call already put
//!   in place are removed again (unless [`CopyOptions::keep_completed_on_error`]),
//!   and folders it created are removed if empty.
//! * **No links followed, no modes widened.** A source that is a symbolic link is
//!   refused ([`RejectReason::SourceSymlink`]) — never followed, whatever it points
//!   to — as is a source that is not a regular file (a FIFO, a device). Sources are
//!   opened with `O_NOFOLLOW` and the *opened* file is checked (`fstat`), so a file
//!   swapped for a link after the checks is not read either. The destination root
//!   itself must not be a symbolic link ([`Error::DestinationIsSymlink`]; give the
//!   folder it points to). Each copy gets the source's permission bits (`mode & 0o777`:
//!   no set-uid, set-gid or sticky bit), set explicitly so that neither the umask nor
//!   anything else makes it wider than the source; owner and group are not copied.
//! * **Sparse files stay sparse** where the file system reports holes
//!   (`SEEK_DATA`/`SEEK_HOLE`) and, optionally, all-zero blocks are not written either.
//! * **Progress** is reported through a callback (bytes done and total, current file).
//!
//! ```
//! use unacloud_vbox::copy::{copy_files, CopyOptions};
//!
//! let src = tempfile::tempdir().unwrap();
//! let dest = tempfile::tempdir().unwrap();
//! std::fs::write(src.path().join("TM.vbox"), b"<VirtualBox/>").unwrap();
//! let files = [(src.path().join("TM.vbox"), "TM/TM.vbox")];
//! let report = copy_files(&files, dest.path(), &CopyOptions::default(), |_| {}).unwrap();
//! assert_eq!(report.bytes, 13);
//! assert!(dest.path().join("TM/TM.vbox").is_file());
//!
//! // A hostile location is refused and nothing is written.
//! let files = [(src.path().join("TM.vbox"), "../../etc/cron.d/x")];
//! assert!(copy_files(&files, dest.path(), &CopyOptions::default(), |_| {}).is_err());
//! ```

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// How [`copy_files`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CopyOptions {
    /// Replace files that already exist at a destination (default `false`: an existing
    /// destination file refuses the whole copy before anything is written).
    pub overwrite: bool,
    /// After writing, hash source and destination with BLAKE3 and compare (default
    /// `false`; the size is always checked).
    pub checksum: bool,
    /// Keep holes: skip ranges the source file system reports as holes and blocks that
    /// are entirely zero (default `true`). The destination has the same length and
    /// content either way.
    pub sparse: bool,
    /// `fsync` each file before renaming it and its folder after (default `true`).
    pub sync: bool,
    /// When a later file fails, keep the files already put in place (default `false`:
    /// remove them, so a failed call leaves the destination as it found it, apart from
    /// files it overwrote).
    pub keep_completed_on_error: bool,
    /// Copy buffer size in bytes (default 1 MiB; at least 4 KiB is used).
    pub buffer_size: usize,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            overwrite: false,
            checksum: false,
            sparse: true,
            sync: true,
            keep_completed_on_error: false,
            buffer_size: 1 << 20,
        }
    }
}

impl CopyOptions {
    /// Set [`CopyOptions::overwrite`].
    pub fn overwrite(mut self, yes: bool) -> Self {
        self.overwrite = yes;
        self
    }

    /// Set [`CopyOptions::checksum`].
    pub fn checksum(mut self, yes: bool) -> Self {
        self.checksum = yes;
        self
    }

    /// Set [`CopyOptions::sparse`].
    pub fn sparse(mut self, yes: bool) -> Self {
        self.sparse = yes;
        self
    }

    /// Set [`CopyOptions::sync`].
    pub fn sync(mut self, yes: bool) -> Self {
        self.sync = yes;
        self
    }

    /// Set [`CopyOptions::keep_completed_on_error`].
    pub fn keep_completed_on_error(mut self, yes: bool) -> Self {
        self.keep_completed_on_error = yes;
        self
    }

    /// Set [`CopyOptions::buffer_size`].
    pub fn buffer_size(mut self, bytes: usize) -> Self {
        self.buffer_size = bytes;
        self
    }
}

/// Where a copy stands, passed to the progress callback.
#[derive(Debug, Clone, Copy)]
pub struct CopyProgress<'a> {
    /// Bytes of all files done so far (holes count as done).
    pub bytes_done: u64,
    /// Bytes of all files together.
    pub bytes_total: u64,
    /// Index of the current file in the input.
    pub file_index: usize,
    /// Number of files.
    pub file_count: usize,
    /// Bytes of the current file done.
    pub file_bytes_done: u64,
    /// Length of the current file.
    pub file_bytes_total: u64,
    /// The current source file.
    pub source: &'a Path,
    /// Its final destination.
    pub dest: &'a Path,
}

/// One file copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedFile {
    /// The source.
    pub source: PathBuf,
    /// The final destination.
    pub dest: PathBuf,
    /// Its length in bytes.
    pub bytes: u64,
    /// Bytes not written because they were holes or zero blocks.
    pub sparse_bytes: u64,
    /// The BLAKE3 hash (hex) of the content, when [`CopyOptions::checksum`] is set.
    pub blake3: Option<String>,
}

/// What [`copy_files`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// The files, in input order.
    pub files: Vec<CopiedFile>,
    /// Total bytes (file lengths).
    pub bytes: u64,
    /// Folders created, parents first.
    pub created_dirs: Vec<PathBuf>,
}

/// Why a file was refused before anything was written.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// The relative path is empty (or only `.` components).
    Empty,
    /// The relative path is absolute (starts with `/` or `\`).
    Absolute,
    /// The relative path has a `..` component.
    ParentComponent,
    /// The relative path starts with a Windows drive (`C:`) or is a UNC path (`\\host`).
    WindowsPrefix,
    /// The relative path holds a NUL byte.
    NulByte,
    /// The relative path is not valid UTF-8.
    NotUtf8,
    /// An existing part of the destination is a symbolic link leading outside the root.
    SymlinkEscape {
        /// The link.
        link: PathBuf,
    },
    /// An existing part of the destination that must be a folder is not one.
    NotADirectory {
        /// The offending path.
        path: PathBuf,
    },
    /// The destination file exists and [`CopyOptions::overwrite`] is off.
    Exists,
    /// Two inputs have the same destination.
    Duplicate,
    /// The destination resolves to the source itself.
    SameAsSource,
    /// The source is a symbolic link: copies never follow links (the link could point
    /// anywhere, e.g. at `/etc/shadow`). Copy the file it points to instead.
    SourceSymlink {
        /// The link.
        path: PathBuf,
    },
    /// The source is missing or not a regular file.
    BadSource {
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::Empty => f.write_str("empty path"),
            RejectReason::Absolute => f.write_str("absolute path"),
            RejectReason::ParentComponent => f.write_str("contains `..`"),
            RejectReason::WindowsPrefix => f.write_str("has a Windows drive or UNC prefix"),
            RejectReason::NulByte => f.write_str("contains a NUL byte"),
            RejectReason::NotUtf8 => f.write_str("is not valid UTF-8"),
            RejectReason::SymlinkEscape { link } => write!(
                f,
                "passes through symbolic link {} that leads outside the destination",
                link.display()
            ),
            RejectReason::NotADirectory { path } => {
                write!(f, "{} exists and is not a folder", path.display())
            }
            RejectReason::Exists => {
                f.write_str("destination file exists (enable CopyOptions::overwrite to replace it)")
            }
            RejectReason::Duplicate => f.write_str("another file has the same destination"),
            RejectReason::SameAsSource => f.write_str("destination is the source file itself"),
            RejectReason::SourceSymlink { path } => write!(
                f,
                "source {} is a symbolic link (copies never follow links)",
                path.display()
            ),
            RejectReason::BadSource { reason } => write!(f, "source {reason}"),
        }
    }
}

/// A file refused by [`copy_files`], with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedPath {
    /// The source as given.
    pub source: PathBuf,
    /// The relative destination as given (lossily decoded if not UTF-8).
    pub relative: String,
    /// Why it was refused.
    pub reason: RejectReason,
}

impl fmt::Display for RejectedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.relative, self.reason)
    }
}

/// Check a relative destination path and return it normalised (components joined
/// with the platform separator, `.` components dropped).
///
/// Both `/` and `\` are separators. Refused: empty paths, absolute paths, `..`
/// anywhere, a leading Windows drive (`C:`, `C:\`, `C:foo`), UNC and device paths
/// (`\\host\share`, `//host/share`, `\\?\`), NUL bytes, non-UTF-8 paths.
///
/// ```
/// use unacloud_vbox::copy::{safe_relative_path, RejectReason};
/// use std::path::{Path, PathBuf};
///
/// assert_eq!(
///     safe_relative_path(Path::new("Snapshots\\{1234}.vdi")).unwrap(),
///     PathBuf::from("Snapshots").join("{1234}.vdi"),
/// );
/// assert_eq!(safe_relative_path(Path::new("a/../../b")), Err(RejectReason::ParentComponent));
/// assert_eq!(safe_relative_path(Path::new("C:/Windows")), Err(RejectReason::WindowsPrefix));
/// ```
pub fn safe_relative_path(relative: &Path) -> Result<PathBuf, RejectReason> {
    let text = relative.to_str().ok_or(RejectReason::NotUtf8)?;
    if text.contains('\0') {
        return Err(RejectReason::NulByte);
    }
    let is_sep = |c: char| c == '/' || c == '\\';
    let mut chars = text.chars();
    let first = chars.next();
    let second = chars.next();
    if let (Some(a), Some(b)) = (first, second) {
        if is_sep(a) && is_sep(b) {
            return Err(RejectReason::WindowsPrefix);
        }
        if a.is_ascii_alphabetic() && b == ':' {
            return Err(RejectReason::WindowsPrefix);
        }
    }
    if first.is_some_and(is_sep) {
        return Err(RejectReason::Absolute);
    }
    let mut out = PathBuf::new();
    for part in text.split(is_sep) {
        match part {
            "" | "." => continue,
            ".." => return Err(RejectReason::ParentComponent),
            _ => {}
        }
        // `std` must see exactly one normal component, nothing it would interpret.
        let mut comps = Path::new(part).components();
        match (comps.next(), comps.next()) {
            (Some(Component::Normal(_)), None) => out.push(part),
            _ => return Err(RejectReason::WindowsPrefix),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(RejectReason::Empty);
    }
    Ok(out)
}

/// A planned copy, after all checks.
struct Plan {
    source: PathBuf,
    dest: PathBuf,
    len: u64,
    /// Permission bits of the source (`mode & 0o777`).
    mode: u32,
    /// Device and inode of the file checked, so the file copied is the same one.
    id: (u64, u64),
}

/// Opens a source for reading without following a final symbolic link and without
/// blocking on a FIFO; the caller checks the opened file's metadata.
fn open_source(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
}

/// Checks a source: not a symbolic link, a regular file; returns `(len, mode, id)`
/// from the opened file's own metadata.
fn check_source(path: &Path) -> Result<(u64, u32, (u64, u64)), RejectReason> {
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

/// Copy `files` (pairs of source path and destination path relative to `dest_root`)
/// into `dest_root`, calling `progress` as bytes are copied.
///
/// All files are checked before anything is written (see the [module docs](self));
/// any refusal returns [`Error::CopyRefused`] listing every refused file. I/O failures
/// while copying return [`Error::CopyFailed`] naming source, destination and the
/// step; verification failures return [`Error::CopySizeMismatch`] or
/// [`Error::ChecksumMismatch`]. `dest_root` is created if it does not exist.
pub fn copy_files<S, R, F>(
    files: &[(S, R)],
    dest_root: &Path,
    options: &CopyOptions,
    mut progress: F,
) -> Result<CopyReport>
where
    S: AsRef<Path>,
    R: AsRef<Path>,
    F: FnMut(&CopyProgress<'_>),
{
    let plans = plan(files, dest_root, options)?;
    let mut report = CopyReport::default();
    let mut completed: Vec<PathBuf> = Vec::new();
    let result = execute(
        &plans,
        dest_root,
        options,
        &mut progress,
        &mut report,
        &mut completed,
    );
    if let Err(e) = result {
        if !options.keep_completed_on_error {
            for path in completed.iter().rev() {
                let _ = fs::remove_file(path);
            }
        }
        for dir in report.created_dirs.iter().rev() {
            let _ = fs::remove_dir(dir); // only succeeds if empty
        }
        return Err(e);
    }
    Ok(report)
}

fn plan<S: AsRef<Path>, R: AsRef<Path>>(
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
fn refuse_symlinked_root(dest_root: &Path) -> Result<()> {
    match fs::symlink_metadata(dest_root) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::DestinationIsSymlink {
            dest_root: dest_root.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

/// Every existing folder on the way from `root` to `root/rel` must be a real folder
/// inside the root (a symbolic link is fine if it resolves inside the root).
fn check_existing_parts(
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

fn execute<F: FnMut(&CopyProgress<'_>)>(
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
fn create_dirs(dir: &Path, created: &mut Vec<PathBuf>) -> io::Result<()> {
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
fn create_temp(dir: &Path, dest: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
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
fn install(temp: &Path, dest: &Path, overwrite: bool) -> io::Result<()> {
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

fn copy_one(
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
fn next_data(file: &File, pos: u64, len: u64) -> io::Result<(u64, u64)> {
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
fn next_data(_file: &File, pos: u64, len: u64) -> io::Result<(u64, u64)> {
    Ok((pos, len))
}

fn is_zero(chunk: &[u8]) -> bool {
    // Compare in 16-byte words; the compiler vectorises this.
    let (words, rest) = chunk.split_at(chunk.len() - chunk.len() % 16);
    words
        .chunks_exact(16)
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && rest.iter().all(|&b| b == 0)
}

fn hash_zeros(hasher: &mut blake3::Hasher, mut n: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Hashes the destination through its own descriptor (its mode may forbid reopening).
fn hash_file(file: &mut File, len: u64, sparse: bool, buf: &mut [u8]) -> io::Result<blake3::Hash> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let ok = |s: &str| safe_relative_path(Path::new(s)).unwrap();
        assert_eq!(ok("a/b/c.vdi"), PathBuf::from("a").join("b").join("c.vdi"));
        assert_eq!(ok("./a//b\\c"), PathBuf::from("a").join("b").join("c"));
        assert_eq!(ok("{uuid}.vdi"), PathBuf::from("{uuid}.vdi"));
        assert_eq!(ok("a..b/..c"), PathBuf::from("a..b").join("..c"));
        let bad = |s: &str| safe_relative_path(Path::new(s)).unwrap_err();
        assert_eq!(bad(""), RejectReason::Empty);
        assert_eq!(bad("./."), RejectReason::Empty);
        assert_eq!(bad("/etc/passwd"), RejectReason::Absolute);
        assert_eq!(bad("\\Windows"), RejectReason::Absolute);
        assert_eq!(bad(".."), RejectReason::ParentComponent);
        assert_eq!(bad("a/../../b"), RejectReason::ParentComponent);
        assert_eq!(bad("a\\..\\b"), RejectReason::ParentComponent);
        assert_eq!(bad("C:/Users/x.vdi"), RejectReason::WindowsPrefix);
        assert_eq!(bad("c:x.vdi"), RejectReason::WindowsPrefix);
        assert_eq!(bad("\\\\host\\share\\x"), RejectReason::WindowsPrefix);
        assert_eq!(bad("//host/share/x"), RejectReason::WindowsPrefix);
        assert_eq!(bad("\\\\?\\C:\\x"), RejectReason::WindowsPrefix);
        assert_eq!(bad("a\0b"), RejectReason::NulByte);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 0]));
        assert!(is_zero(&[0u8; 33]));
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[17] = 1;
        assert!(!is_zero(&v));
    }
}

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

use std::fmt;
use std::fs;
use std::path::{Component, Path, PathBuf};

#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;

mod execute;
mod plan;

use execute::execute;
use plan::plan;

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::execute::is_zero;
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

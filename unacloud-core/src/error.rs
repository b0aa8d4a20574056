//! The crate's one error type.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in `unacloud-core`.
///
/// Messages describe this layer only; underlying causes are kept as
/// [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A VM, disk, snapshot or host does not exist.
    #[error("{kind} not found: {id}")]
    NotFound {
        /// What was looked up ("vm", "disk", "snapshot", "host", …).
        kind: &'static str,
        /// The name or uuid that was asked for.
        id: String,
    },
    /// A name matches several objects; the caller must use a uuid.
    #[error("{kind} name {name:?} is ambiguous; candidates: {}", candidates.join(", "))]
    AmbiguousName {
        /// What was looked up.
        kind: &'static str,
        /// The ambiguous name.
        name: String,
        /// Identifiers of every object with that name.
        candidates: Vec<String>,
    },
    /// An object with this identifier already exists.
    #[error("{kind} already exists: {id}")]
    AlreadyExists {
        /// What was being created.
        kind: &'static str,
        /// Its identifier.
        id: String,
    },
    /// The operation is not allowed in the object's current state.
    #[error("cannot {operation} {id}: it is {state}")]
    InvalidState {
        /// The operation that was refused.
        operation: &'static str,
        /// The object it was applied to.
        id: String,
        /// The state the object is in.
        state: String,
    },
    /// The object is used by others (a disk attached to VMs, a template with VMs).
    #[error("{id} is in use by {}", users.join(", "))]
    InUse {
        /// The object that is in use.
        id: String,
        /// Who uses it.
        users: Vec<String>,
    },
    /// The hypervisor or the operating system refused access.
    #[error("access denied: {message}")]
    AccessDenied {
        /// What the backend said.
        message: String,
    },
    /// An operation did not finish within its time limit.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation.
        operation: &'static str,
        /// The limit that was exceeded.
        after: Duration,
    },
    /// The backend does not implement this operation on this machine.
    #[error("{backend} does not support {operation}: {reason}")]
    Unsupported {
        /// The backend's name.
        backend: String,
        /// The operation.
        operation: &'static str,
        /// Why, and what to do instead.
        reason: String,
    },
    /// Not enough free disk space at a location (thesis anomaly A2).
    #[error("not enough disk space at {}: needs {needed} bytes, has {available}", path.display())]
    InsufficientSpace {
        /// Where the space was needed.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// An unknown hardware-profile name.
    #[error("unknown hardware profile {0:?}; expected one of small, medium, large, extra-large")]
    UnknownProfile(String),
    /// Invalid input to a function (empty host list, zero-sized request, …).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Some VMs could not be placed on any host.
    #[error("{} of the requested VMs could not be placed: {}", unplaced.len(), summarise_unplaced(unplaced))]
    Unplaceable {
        /// Every VM that found no host, with the reason.
        unplaced: Vec<crate::placement::Unplaced>,
    },
    /// A file-system operation failed.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stored file (a template catalog, a VM's settings) could not be parsed. The file
    /// is left as it is; `backup` names the last good copy when one exists.
    #[error("{what} at {} is corrupt: {reason}{}", path.display(), backup.as_ref().map(|b| format!("; the previous good copy is at {}", b.display())).unwrap_or_default())]
    Corrupt {
        /// What the file holds ("template catalog", "VM settings", …).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// The last good copy, if one was kept.
        backup: Option<PathBuf>,
    },
    /// A file's content does not match its recorded checksum.
    #[error("checksum mismatch for {}: expected {expected}, got {actual}", path.display())]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// The recorded checksum.
        expected: String,
        /// The checksum of the content found.
        actual: String,
    },
    /// The operation was cancelled by the caller before it finished.
    #[error("{operation} was cancelled")]
    Cancelled {
        /// What was cancelled.
        operation: String,
    },
    /// `qemu-img` failed; `kind` says why (read from its exit status and standard
    /// error, which is kept as the source).
    #[error("qemu-img could not {operation} {}: {kind}", path.display())]
    QemuImg {
        /// What was being done ("create overlay", "inspect image", …).
        operation: &'static str,
        /// The image the command was about.
        path: PathBuf,
        /// Why it failed.
        kind: ImageFailure,
        /// Its exit code (`None` when it was killed by a signal).
        exit_code: Option<i32>,
        /// What it printed on standard error.
        #[source]
        source: ToolOutput,
    },
    /// A file the backend was asked to change or delete lies outside the backend's root
    /// (a registry copied from another root still names the original's files).
    #[error("refusing to {operation} {}: it is outside the backend root {}", path.display(), root.display())]
    OutsideRoot {
        /// What was refused.
        operation: &'static str,
        /// The file.
        path: PathBuf,
        /// The backend's root.
        root: PathBuf,
    },
    /// A failure injected by a test's fault hook (never produced otherwise).
    #[doc(hidden)]
    #[error("fault injected at side effect {step} ({at})")]
    FaultInjected {
        /// The side effect's number, from 1.
        step: u64,
        /// What it was.
        at: String,
    },
    /// A backend's own error that has no core equivalent, kept whole: its variant and its
    /// sources stay reachable through [`std::error::Error::source`] (downcast it to the
    /// backend's error type).
    #[error("{backend}: {source}")]
    Generic {
        /// The backend's name.
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Any other backend failure, with the backend's raw message.
    #[error("{backend}: {message}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// Its message, verbatim.
        message: String,
    },
}

/// Why an image tool failed, as read from its exit status and standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImageFailure {
    /// The file system is full (or over quota).
    NoSpace,
    /// The operating system refused access (mode bits, read-only file system).
    PermissionDenied,
    /// A file it needed (the image, its backing file) does not exist.
    NotFound,
    /// The image is not a valid image of its format (bad header, wrong format).
    CorruptImage,
    /// Another process holds the image's lock (a running VM).
    Locked,
    /// Anything else; the tool's output says more.
    Other,
}

impl ImageFailure {
    /// Classifies a failed run from its standard error.
    pub fn classify(stderr: &str) -> ImageFailure {
        let s = stderr.to_ascii_lowercase();
        if s.contains("no space left") || s.contains("disk quota exceeded") {
            ImageFailure::NoSpace
        } else if s.contains("permission denied")
            || s.contains("read-only file system")
            || s.contains("operation not permitted")
        {
            ImageFailure::PermissionDenied
        } else if s.contains("no such file or directory") {
            ImageFailure::NotFound
        } else if s.contains("failed to get") && s.contains("lock") {
            ImageFailure::Locked
        } else if s.contains("image is corrupt")
            || s.contains("not in qcow2 format")
            || s.contains("unknown file format")
            || s.contains("could not open")
                && (s.contains("invalid") || s.contains("unsupported") || s.contains("corrupt"))
            || s.contains("image not in")
            || s.contains("unsupported qcow2 version")
        {
            ImageFailure::CorruptImage
        } else {
            ImageFailure::Other
        }
    }
}

impl std::fmt::Display for ImageFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFailure::NoSpace => "no space left on the device",
            ImageFailure::PermissionDenied => "permission denied",
            ImageFailure::NotFound => "a file it needs does not exist",
            ImageFailure::CorruptImage => "the image is corrupt or not of the expected format",
            ImageFailure::Locked => "the image is locked by another process",
            ImageFailure::Other => "it failed",
        })
    }
}

/// What an external tool printed on standard error, kept as an error's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    /// The tool's exit status, as the operating system describes it.
    pub status: String,
    /// Its standard error, trimmed.
    pub stderr: String,
}

impl std::fmt::Display for ToolOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.stderr.is_empty() {
            write!(f, "{} (nothing on standard error)", self.status)
        } else {
            write!(f, "{}: {}", self.status, self.stderr)
        }
    }
}

impl std::error::Error for ToolOutput {}

fn summarise_unplaced(unplaced: &[crate::placement::Unplaced]) -> String {
    let mut s: Vec<String> = unplaced
        .iter()
        .take(5)
        .map(|u| format!("{} ({})", u.vm, u.reason))
        .collect();
    if unplaced.len() > 5 {
        s.push(format!("and {} more", unplaced.len() - 5));
    }
    s.join(", ")
}

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// An error with every cause below it, outermost first, joined by `": "` (what a
/// one-line report should print: [`Error::Io`] alone names the file, its source says
/// why).
///
/// ```
/// let e = unacloud_core::Error::io("/x", std::io::Error::other("disk full"));
/// assert_eq!(unacloud_core::error::chain(&e), "I/O error on /x: disk full");
/// ```
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

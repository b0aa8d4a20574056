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
    /// Any other backend failure, with the backend's raw message.
    #[error("{backend}: {message}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// Its message, verbatim.
        message: String,
    },
}

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

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

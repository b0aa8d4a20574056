//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `unacloud-vbox`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file-system operation failed.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a VDI image (wrong signature at offset 0x40).
    #[error("{} is not a VDI image: signature is {found:#010x}, expected 0xbeda107f (check the medium's format)", crate::vdi::origin(path))]
    NotVdi {
        /// The file (`None` for an in-memory header).
        path: Option<PathBuf>,
        /// The value found where the signature belongs.
        found: u32,
    },
    /// The VDI file is shorter than its header says it must be.
    #[error("VDI image {} is truncated: {len} bytes, at least {needed} needed for the {what}", crate::vdi::origin(path))]
    VdiTruncated {
        /// The file (`None` for an in-memory header).
        path: Option<PathBuf>,
        /// Bytes available.
        len: u64,
        /// Bytes needed.
        needed: u64,
        /// What did not fit.
        what: &'static str,
    },
    /// The VDI header version is not 1.x or 0.2.
    #[error("VDI image {} has header version {major}.{minor}; only 1.x and 0.2 exist", crate::vdi::origin(path))]
    VdiUnsupportedVersion {
        /// The file (`None` for an in-memory header).
        path: Option<PathBuf>,
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
    /// A VDI header field holds an impossible value: the image is corrupt.
    #[error("VDI image {} is corrupt: {field} = {value}: {reason}", crate::vdi::origin(path))]
    VdiInvalidHeader {
        /// The file (`None` for an in-memory header).
        path: Option<PathBuf>,
        /// The field, in words.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A differencing chain on disk does not match the registry.
    #[error("disk chain is broken ({} problem(s)): {}", problems.len(), problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    BrokenChain {
        /// Every problem found.
        problems: Vec<crate::vdi::ChainProblem>,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

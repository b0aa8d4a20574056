//! The crate's one error type.
//!
//! Parse errors carry the 1-based line of the offending element and name the element,
//! attribute or uuid involved. Errors raised while loading a file are wrapped in
//! [`Error::InFile`], which names the file; [`Error::innermost`] peels that layer off.

use std::path::PathBuf;

use uuid::Uuid;

/// Everything that can go wrong in `unacloud-vbox`.
///
/// The `VBoxManage` variants ([`Error::ToolMissing`], [`Error::VBoxManage`],
/// [`Error::VBoxManageTimeout`], [`Error::UnexpectedOutput`]) exist with the `manage`
/// feature.
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
    /// An error found while reading a settings or registry file; the cause says what.
    #[error("in {}", path.display())]
    InFile {
        /// The file being read.
        path: PathBuf,
        /// What was wrong with it.
        #[source]
        source: Box<Error>,
    },
    /// A settings file, registry or disk image is not a regular file (a FIFO, a
    /// device, a folder…), so it is not read at all.
    #[error("{} is not a regular file but {kind}", path.display())]
    NotRegularFile {
        /// The path as given.
        path: PathBuf,
        /// What it is instead, in words.
        kind: &'static str,
    },
    /// A settings or registry file is larger than
    /// [`ParseLimits::max_input_bytes`](crate::settings::ParseLimits::max_input_bytes).
    #[error("{} has {len} bytes, more than the input size limit of {max}; raise ParseLimits::max_input_bytes if the file is genuine", path.display())]
    InputTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size, or the bytes read when it grew while being read.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The input is not well-formed XML.
    #[error("malformed XML at line {line}")]
    Xml {
        /// 1-based line where the reader stopped.
        line: u64,
        /// The XML reader's diagnosis.
        #[source]
        source: quick_xml::Error,
    },
    /// The input ended before the named element was closed.
    #[error("input ends inside <{element}> (line {line}): the file is truncated")]
    Truncated {
        /// The innermost element still open.
        element: String,
        /// 1-based line of the end of input.
        line: u64,
    },
    /// Elements or text follow the closing tag of the root element.
    #[error(
        "content after the root element at line {line}: the file was edited by hand or is corrupt"
    )]
    TrailingContent {
        /// 1-based line of the extra content.
        line: u64,
    },
    /// The document's root element is not what was expected.
    #[error("root element is <{found}>, expected <{expected}>{hint}")]
    WrongRoot {
        /// The local name of the element found.
        found: String,
        /// What the caller asked for (`VirtualBox/Machine` or `VirtualBox/Global`).
        expected: &'static str,
        /// A suggestion, possibly empty.
        hint: &'static str,
    },
    /// The settings format version is not one this crate reads.
    #[error("unsupported settings version {version:?}: {reason}")]
    UnsupportedVersion {
        /// The `version` attribute of `<VirtualBox>`.
        version: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A required element is absent or appears more often than allowed.
    #[error("<{parent}> {problem} <{element}>")]
    Structure {
        /// The element concerned.
        element: &'static str,
        /// Where it was expected.
        parent: &'static str,
        /// `has no` or `has more than one`.
        problem: &'static str,
    },
    /// A required attribute is absent.
    #[error("<{element}> at line {line} has no {attribute:?} attribute")]
    MissingAttribute {
        /// The element's local name.
        element: &'static str,
        /// The attribute's name.
        attribute: &'static str,
        /// 1-based line of the element.
        line: u64,
    },
    /// An attribute value cannot be understood.
    #[error(
        "<{element}> at line {line}: attribute {attribute:?} = {value:?} is invalid: {reason}"
    )]
    InvalidAttribute {
        /// The element's local name.
        element: &'static str,
        /// The attribute's name.
        attribute: &'static str,
        /// The value (shortened to 80 characters).
        value: String,
        /// What is wrong with it.
        reason: String,
        /// 1-based line of the element.
        line: u64,
    },
    /// A safety limit on the input was exceeded (see
    /// [`ParseLimits`](crate::settings::ParseLimits)).
    #[error("{limit} limit of {max} exceeded at <{element}> (line {line}); raise ParseLimits::{field} if the file is genuine")]
    LimitExceeded {
        /// Which limit, in words.
        limit: &'static str,
        /// The `ParseLimits` field that sets it.
        field: &'static str,
        /// The limit's value.
        max: u64,
        /// The element being read.
        element: String,
        /// 1-based line.
        line: u64,
    },
    /// Two snapshots or two media share one uuid.
    #[error("duplicate {kind} uuid {uuid}")]
    DuplicateUuid {
        /// `snapshot` or `medium`.
        kind: &'static str,
        /// The repeated uuid.
        uuid: Uuid,
    },
    /// A reference names a uuid that is defined nowhere it must be.
    #[error(
        "<{element}> attribute {attribute:?} refers to {uuid}, which does not exist in the file"
    )]
    DanglingReference {
        /// The referring element.
        element: &'static str,
        /// The referring attribute.
        attribute: &'static str,
        /// The uuid that was not found.
        uuid: Uuid,
    },
    /// Following differencing parents comes back to the same image (possible only when
    /// a machine registry and a global registry disagree).
    #[error("differencing-parent cycle through medium {uuid}")]
    ParentCycle {
        /// A medium on the cycle.
        uuid: Uuid,
    },
    /// No snapshot matches the selector.
    #[error("machine {machine:?} has no snapshot {selector:?} (use a uuid, a snapshot name or `current`)")]
    SnapshotNotFound {
        /// What the user asked for.
        selector: String,
        /// The machine's name.
        machine: String,
    },
    /// Several snapshots carry the requested name.
    #[error("snapshot name {name:?} is ambiguous; use one of the uuids: {}", candidates.join(", "))]
    AmbiguousSnapshotName {
        /// The ambiguous name.
        name: String,
        /// Uuids (without braces) of every snapshot with that name, in tree order.
        candidates: Vec<String>,
    },
    /// A disk the selected state needs is registered in no registry this crate was
    /// given (typically a template in the global `VirtualBox.xml`).
    #[error("unresolved dependency: medium {uuid} ({needed_by}) is not in the machine's media registry; pass the global VirtualBox.xml that registers it")]
    UnresolvedDependency {
        /// The medium's uuid.
        uuid: Uuid,
        /// Who needs it, in words.
        needed_by: String,
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
    #[error(
        "VDI image {} is truncated: {len} bytes, at least {needed} needed for the {what}",
        crate::vdi::origin(path)
    )]
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
    #[error(
        "VDI image {} has header version {major}.{minor}; only 1.x and 0.2 exist",
        crate::vdi::origin(path)
    )]
    VdiUnsupportedVersion {
        /// The file (`None` for an in-memory header).
        path: Option<PathBuf>,
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
    /// A VDI header field holds an impossible value: the image is corrupt.
    #[error(
        "VDI image {} is corrupt: {field} = {value}: {reason}",
        crate::vdi::origin(path)
    )]
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
    /// A copy was refused before anything was written.
    #[error("refusing to copy into {}: {}", dest_root.display(), rejected.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; "))]
    CopyRefused {
        /// The destination root.
        dest_root: PathBuf,
        /// Every refused file, with the reason.
        rejected: Vec<crate::copy::RejectedPath>,
    },
    /// The destination root is a symbolic link; copies refuse it, whatever it points
    /// to (give the folder it points to instead).
    #[error("refusing to copy into {}: it is a symbolic link (give the folder it points to)", dest_root.display())]
    DestinationIsSymlink {
        /// The destination root as given.
        dest_root: PathBuf,
    },
    /// Copying a file failed; temporary files were removed.
    #[error("copying {} to {} failed while {step}", from.display(), to.display())]
    CopyFailed {
        /// The source file.
        from: PathBuf,
        /// The final destination.
        to: PathBuf,
        /// The step that failed, in words.
        step: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The copied file does not have the source's size.
    #[error("copy of {} to {} has {actual} bytes, expected {expected}", from.display(), to.display())]
    CopySizeMismatch {
        /// The source file.
        from: PathBuf,
        /// The final destination.
        to: PathBuf,
        /// The source's size.
        expected: u64,
        /// The size written.
        actual: u64,
    },
    /// The copied file's BLAKE3 hash differs from the source's.
    #[error("copy of {} to {} is corrupt: BLAKE3 {dest_hash} differs from the source's {source_hash}", from.display(), to.display())]
    ChecksumMismatch {
        /// The source file.
        from: PathBuf,
        /// The final destination.
        to: PathBuf,
        /// The source's hash (hex).
        source_hash: String,
        /// The destination's hash (hex).
        dest_hash: String,
    },
    /// An error from the shared core (snapshot tree construction).
    #[error(transparent)]
    Core(#[from] unacloud_core::Error),
    /// `VBoxManage` could not be started (not installed, not on `PATH`, not executable).
    #[cfg(feature = "manage")]
    #[error("cannot start {}: install VirtualBox or give the full path of VBoxManage", program.display())]
    ToolMissing {
        /// The program that was looked for.
        program: PathBuf,
        /// Why it could not be started.
        #[source]
        source: std::io::Error,
    },
    /// A `VBoxManage` command exited with an error; the failure holds what it printed
    /// and how it was classified.
    #[cfg(feature = "manage")]
    #[error("`{command}` failed: {failure}")]
    VBoxManage {
        /// The command line, quoted for a POSIX shell (never contains a password).
        command: String,
        /// What `VBoxManage` reported.
        failure: Box<crate::manage::Failure>,
    },
    /// A `VBoxManage` command did not finish within its time limit and was killed.
    #[cfg(feature = "manage")]
    #[error("`{command}` did not finish within {after:?} and was killed")]
    VBoxManageTimeout {
        /// The command line, quoted for a POSIX shell.
        command: String,
        /// Short name of the operation (`snapshot take`, `startvm`, …).
        operation: &'static str,
        /// The limit.
        after: std::time::Duration,
    },
    /// `VBoxManage` printed something this library cannot interpret.
    #[cfg(feature = "manage")]
    #[error("unexpected output from `{command}`: {message}")]
    UnexpectedOutput {
        /// The command line, quoted for a POSIX shell.
        command: String,
        /// What was expected and what was found.
        message: String,
    },
}

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The error without any [`Error::InFile`] wrapper.
    pub fn innermost(&self) -> &Error {
        let mut e = self;
        while let Error::InFile { source, .. } = e {
            e = source;
        }
        e
    }

    /// [`Error::NotRegularFile`] for `path`, whose file type is `ft`.
    pub(crate) fn not_regular(path: impl Into<PathBuf>, ft: std::fs::FileType) -> Self {
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_dir() {
            "a folder"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_symlink() {
            "a symbolic link"
        } else {
            "something else"
        };
        Error::NotRegularFile {
            path: path.into(),
            kind,
        }
    }

    pub(crate) fn in_file(path: impl Into<PathBuf>, source: Error) -> Self {
        Error::InFile {
            path: path.into(),
            source: Box::new(source),
        }
    }
}

impl From<Error> for unacloud_core::Error {
    /// Maps this crate's errors onto the core's: VBoxManage failures by their
    /// classification, time-outs to [`unacloud_core::Error::Timeout`], file errors to
    /// [`unacloud_core::Error::Io`], and everything else to
    /// [`unacloud_core::Error::Generic`], which keeps this error whole as its source.
    fn from(e: Error) -> Self {
        match e {
            Error::Core(c) => c,
            Error::Io { path, source } => unacloud_core::Error::Io { path, source },
            #[cfg(feature = "manage")]
            Error::VBoxManage { command, failure } => failure.into_core(command),
            #[cfg(feature = "manage")]
            Error::VBoxManageTimeout {
                operation, after, ..
            } => unacloud_core::Error::Timeout { operation, after },
            other => unacloud_core::Error::Generic {
                backend: "virtualbox",
                source: Box::new(other),
            },
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

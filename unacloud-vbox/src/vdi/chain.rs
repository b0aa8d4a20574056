//! Checking a differencing chain on disk against what the registries expect.

use crate::error::{Error, Result};
use std::fmt;
use std::io;
use std::path::PathBuf;
use uuid::Uuid;

use super::{ImageType, VdiHeader};

/// One image a chain check expects: where it is, which UUID it must carry, and which
/// parent UUID it must name (`None` for a base image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    /// The image file.
    pub path: PathBuf,
    /// The image UUID the registry gives it.
    pub uuid: Uuid,
    /// The parent's image UUID per the registry (`None`: a base image).
    pub parent: Option<Uuid>,
}

impl ChainLink {
    /// A link.
    pub fn new(path: impl Into<PathBuf>, uuid: Uuid, parent: Option<Uuid>) -> Self {
        ChainLink {
            path: path.into(),
            uuid,
            parent,
        }
    }
}

/// One problem found by [`verify_chain`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainProblem {
    /// The file does not exist.
    Missing {
        /// The expected file.
        path: PathBuf,
        /// The UUID the registry gives it.
        uuid: Uuid,
    },
    /// The file exists but its header could not be read or is not a valid VDI header.
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The UUID the registry gives it.
        uuid: Uuid,
        /// Why (the error text of the header reader).
        reason: String,
    },
    /// The header's image UUID is not the one the registry gives.
    UuidMismatch {
        /// The file.
        path: PathBuf,
        /// The UUID the registry gives it.
        expected: Uuid,
        /// The UUID in the header.
        found: Uuid,
    },
    /// The header names another parent than the registry (or none, or one where the
    /// registry has a base image).
    ParentMismatch {
        /// The file.
        path: PathBuf,
        /// The image's UUID.
        uuid: Uuid,
        /// The parent per the registry.
        expected: Option<Uuid>,
        /// The parent per the header.
        found: Option<Uuid>,
    },
    /// The registry says base image but the header says differencing, or the reverse.
    TypeMismatch {
        /// The file.
        path: PathBuf,
        /// The image's UUID.
        uuid: Uuid,
        /// The header's image type.
        found: ImageType,
    },
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let braces = |u: &Option<Uuid>| match u {
            Some(u) => format!("{{{u}}}"),
            None => "none (base image)".to_string(),
        };
        match self {
            ChainProblem::Missing { path, uuid } => {
                write!(f, "image {{{uuid}}} is missing: {}", path.display())
            }
            ChainProblem::Unreadable { path, uuid, reason } => write!(
                f,
                "image {{{uuid}}} at {} is not a readable VDI: {reason}",
                path.display()
            ),
            ChainProblem::UuidMismatch {
                path,
                expected,
                found,
            } => write!(
                f,
                "{} carries UUID {{{found}}} but the registry expects {{{expected}}}",
                path.display()
            ),
            ChainProblem::ParentMismatch {
                path,
                uuid,
                expected,
                found,
            } => write!(
                f,
                "image {{{uuid}}} at {} names parent {} but the registry expects {}",
                path.display(),
                braces(found),
                braces(expected)
            ),
            ChainProblem::TypeMismatch { path, uuid, found } => write!(
                f,
                "image {{{uuid}}} at {} is a {found} image, which does not match its place \
                 in the registry",
                path.display()
            ),
        }
    }
}

/// The outcome of [`verify_chain`]: every problem found, in input order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainReport {
    /// The headers read, by input index (`None` where the file could not be read).
    pub headers: Vec<Option<VdiHeader>>,
    /// Every problem found.
    pub problems: Vec<ChainProblem>,
}

impl ChainReport {
    /// Whether the chain is intact.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// `Ok(())` if intact, otherwise [`Error::BrokenChain`] listing every problem.
    pub fn into_result(self) -> Result<()> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Error::BrokenChain {
                problems: self.problems,
            })
        }
    }
}

/// Check every image of a set against what a registry says about it: the file exists,
/// is a VDI, carries the expected image UUID, and names the expected parent.
///
/// All links are checked; the report lists every problem, not just the first.
/// A link whose registry parent is `None` must be a base image (normal, fixed or
/// undo) with no parent UUID; a link with a parent must be a differencing image
/// naming exactly that parent.
pub fn verify_chain(links: &[ChainLink]) -> ChainReport {
    let mut report = ChainReport::default();
    for link in links {
        let header = match std::fs::metadata(&link.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                report.problems.push(ChainProblem::Missing {
                    path: link.path.clone(),
                    uuid: link.uuid,
                });
                None
            }
            _ => match VdiHeader::read(&link.path) {
                Ok(h) => Some(h),
                Err(e) => {
                    report.problems.push(ChainProblem::Unreadable {
                        path: link.path.clone(),
                        uuid: link.uuid,
                        reason: crate::display::join_sources(&e),
                    });
                    None
                }
            },
        };
        if let Some(h) = &header {
            if h.uuid != link.uuid {
                report.problems.push(ChainProblem::UuidMismatch {
                    path: link.path.clone(),
                    expected: link.uuid,
                    found: h.uuid,
                });
            }
            if h.parent_uuid != link.parent {
                report.problems.push(ChainProblem::ParentMismatch {
                    path: link.path.clone(),
                    uuid: link.uuid,
                    expected: link.parent,
                    found: h.parent_uuid,
                });
            } else if h.is_differencing() != link.parent.is_some() {
                report.problems.push(ChainProblem::TypeMismatch {
                    path: link.path.clone(),
                    uuid: link.uuid,
                    found: h.image_type,
                });
            }
        }
        report.headers.push(header);
    }
    report
}

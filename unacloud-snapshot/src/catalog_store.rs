//! Persistence of the coordinator's [`Catalog`]: one JSON file, replaced atomically.
//!
//! This is the only module of the crate's protocol side that touches the file system; the
//! protocol core ([`crate::protocol`]) stays free of I/O. It has no tokio dependency (the
//! tokio driver calls it on the blocking pool), so it has its own small error type,
//! [`Error`]: the file's I/O, encoding and decoding, and a file of another cluster.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::protocol::{Catalog, ClusterId};

/// Result of the catalog file.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the catalog file. Each names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the catalog file failed.
    #[error("catalog file {path}: {action} failed")]
    Io {
        /// The catalog file.
        path: PathBuf,
        /// What was being done (`read`, `write temporary file`, `rename`, …).
        action: &'static str,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The catalog could not be serialised (nothing was written).
    #[error("catalog for {path} could not be serialised; the file was left unchanged")]
    Encode {
        /// The catalog file.
        path: PathBuf,
        /// Why serialisation failed.
        #[source]
        source: serde_json::Error,
    },
    /// The catalog file exists but is not a valid catalog.
    #[error("catalog file {path} is corrupt; restore it from a backup or move it away to start an empty catalog")]
    Corrupt {
        /// The catalog file.
        path: PathBuf,
        /// Why it could not be parsed.
        #[source]
        source: serde_json::Error,
    },
    /// The catalog file belongs to another cluster.
    #[error("catalog file {path} belongs to {got}, not {expected}; give each cluster its own catalog file")]
    ForeignCluster {
        /// The catalog file.
        path: PathBuf,
        /// The cluster the catalog was loaded for.
        expected: ClusterId,
        /// The cluster named in the file.
        got: ClusterId,
    },
}

/// A catalog file. Writes go to a temporary file in the same directory, are flushed to
/// disk, then renamed over the old file, so a crash leaves either the old or the new
/// catalog, never a torn one.
#[derive(Debug, Clone)]
pub struct CatalogStore {
    path: PathBuf,
}

impl CatalogStore {
    /// A store for the file at `path` (created on the first save).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The catalog file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the catalog, or `None` if the file does not exist yet.
    pub fn load(&self) -> Result<Option<Catalog>> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    path: self.path.clone(),
                    action: "read",
                    source,
                })
            }
        };
        Catalog::from_json(&bytes)
            .map(Some)
            .map_err(|source| Error::Corrupt {
                path: self.path.clone(),
                source,
            })
    }

    /// Loads the catalog, or an empty one for `cluster` if the file does not exist yet.
    /// A catalog of another cluster is rejected with [`Error::ForeignCluster`].
    pub fn load_or_new(&self, cluster: ClusterId) -> Result<Catalog> {
        match self.load()? {
            Some(c) if c.cluster == cluster => Ok(c),
            Some(c) => Err(Error::ForeignCluster {
                path: self.path.clone(),
                expected: cluster,
                got: c.cluster,
            }),
            None => Ok(Catalog::new(cluster)),
        }
    }

    /// Replaces the file with `catalog`, atomically.
    pub fn save(&self, catalog: &Catalog) -> Result<()> {
        let io = |action: &'static str| {
            let path = self.path.clone();
            move |source| Error::Io {
                path,
                action,
                source,
            }
        };
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "catalog".into());
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let json = catalog.try_to_json().map_err(|source| Error::Encode {
            path: self.path.clone(),
            source,
        })?;
        let result = (|| {
            let mut file = fs::File::create(&tmp).map_err(io("create temporary file"))?;
            file.write_all(&json).map_err(io("write temporary file"))?;
            file.sync_all().map_err(io("flush temporary file"))?;
            fs::rename(&tmp, &self.path).map_err(io("rename temporary file"))?;
            // Make the rename itself durable; not every platform can open a directory.
            if let Ok(d) = fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

//! Preloading a template onto a host's template store (thesis strategy 3), so that
//! provisioning later transfers no image at all.
//!
//! [`preload`] checks free space first (`statvfs` through
//! [`Hypervisor::host_disk_space`]; anomaly A2 becomes a clear "needs X, has Y"
//! [`Error::InsufficientSpace`]), copies the image to a hidden temporary name in the
//! store, verifies its checksum, renames it atomically to the template's file name and
//! registers it with the hypervisor as a multiattach disk. An interrupted copy keeps its
//! temporary file and the next call **resumes** from its length (mitigation M1); the
//! checksum of the whole file is still verified at the end. Preloading a template that is
//! already present, verified and registered does nothing.
//!
//! The source is a path readable from this process (a file-server mount, or a local
//! staging copy); the store is a folder of the host the hypervisor runs on.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::ops::ControlFlow;
//! use unacloud_core::memory::InMemoryHypervisor;
//! use unacloud_core::model::DiskFormat;
//! use unacloud_core::provision::catalog::{Catalog, NewTemplate};
//! use unacloud_core::provision::preload::{preload, PreloadOutcome};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let image = dir.path().join("base.qcow2");
//! std::fs::write(&image, vec![7u8; 3 << 20]).unwrap();
//! let mut catalog = Catalog::open(dir.path().join("catalog.json")).unwrap();
//! let v = catalog.add_draft(NewTemplate::new("base", "Linux", DiskFormat::Qcow2, &image)).unwrap();
//! let template = catalog.get("base", v).unwrap().clone();
//!
//! let hv = InMemoryHypervisor::new();
//! let store = dir.path().join("host-1/templates");
//! let mut seen = 0;
//! let first = preload(&hv, &template, &image, &store, &mut |p| { seen = p.copied; ControlFlow::Continue(()) }).await.unwrap();
//! assert!(matches!(first, PreloadOutcome::Copied { .. }));
//! assert_eq!(seen, 3 << 20);
//! let again = preload(&hv, &template, &image, &store, &mut |_| ControlFlow::Continue(())).await.unwrap();
//! assert!(matches!(again, PreloadOutcome::AlreadyPresent { .. }));
//! # });
//! ```

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::catalog::{ContentHasher, TemplateVersion};
use super::multiattach::MultiattachManager;
use crate::error::{Error, Result};
use crate::hypervisor::Hypervisor;
use crate::model::{DiskInfo, DiskType};

/// Where a copy stands, reported after every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreloadProgress {
    /// Bytes of the template now in the temporary file.
    pub copied: u64,
    /// The template's length.
    pub total: u64,
    /// Bytes that were already there from an interrupted copy.
    pub resumed_from: u64,
}

/// What [`preload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreloadOutcome {
    /// The template was already in the store, verified and registered: nothing done.
    AlreadyPresent {
        /// The registered multiattach disk.
        disk: DiskInfo,
    },
    /// The template was copied (or its copy completed) and registered.
    Copied {
        /// The registered multiattach disk.
        disk: DiskInfo,
        /// Bytes copied by this call.
        bytes_copied: u64,
        /// Bytes reused from an earlier interrupted copy.
        resumed_from: u64,
    },
    /// The file was present and verified but had to be registered.
    Registered {
        /// The registered multiattach disk.
        disk: DiskInfo,
    },
}

impl PreloadOutcome {
    /// The registered multiattach disk.
    pub fn disk(&self) -> &DiskInfo {
        match self {
            PreloadOutcome::AlreadyPresent { disk }
            | PreloadOutcome::Copied { disk, .. }
            | PreloadOutcome::Registered { disk } => disk,
        }
    }
}

/// The temporary file an interrupted copy of `template` into `store` leaves behind.
pub fn partial_path(store: &Path, template: &TemplateVersion) -> PathBuf {
    store.join(format!(".{}.partial", template.file_name))
}

const CHUNK: usize = 4 << 20;

/// Preloads `template` from `source` into the folder `store` and registers it with `hv`
/// as a multiattach disk. See the [module documentation](self).
///
/// `progress` is called after every chunk; returning [`ControlFlow::Break`] stops the
/// copy with [`Error::Cancelled`] and keeps the partial file for a later resume.
///
/// # Errors
/// [`Error::InsufficientSpace`] before anything is written; [`Error::ChecksumMismatch`]
/// when the copy (then deleted) or a file already in the store (left alone: remove it to
/// retry) does not match the catalog; I/O and hypervisor errors. If registering as
/// multiattach fails the disk is unregistered again.
pub async fn preload(
    hv: &dyn Hypervisor,
    template: &TemplateVersion,
    source: &Path,
    store: &Path,
    progress: &mut (dyn FnMut(&PreloadProgress) -> ControlFlow<()> + Send),
) -> Result<PreloadOutcome> {
    tokio::fs::create_dir_all(store)
        .await
        .map_err(|e| Error::io(store, e))?;
    let store = tokio::fs::canonicalize(store)
        .await
        .map_err(|e| Error::io(store, e))?;
    let dest = store.join(&template.file_name);

    if tokio::fs::try_exists(&dest)
        .await
        .map_err(|e| Error::io(&dest, e))?
    {
        verify(&dest, template).await?;
        let disks = hv.list_disks().await?;
        if let Some(d) = disks.iter().find(|d| d.location == dest) {
            if d.disk_type == DiskType::MultiAttach {
                return Ok(PreloadOutcome::AlreadyPresent { disk: d.clone() });
            }
            hv.set_disk_type(
                &crate::hypervisor::DiskRef::Uuid(d.uuid),
                DiskType::MultiAttach,
            )
            .await?;
            let mut d = d.clone();
            d.disk_type = DiskType::MultiAttach;
            return Ok(PreloadOutcome::Registered { disk: d });
        }
        let disk = MultiattachManager::new(hv).register_template(&dest).await?;
        return Ok(PreloadOutcome::Registered { disk });
    }

    let partial = partial_path(&store, template);
    let mut resumed_from = match tokio::fs::metadata(&partial).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io(&partial, e)),
    };
    if resumed_from > template.size_bytes {
        // Longer than the template: not a prefix of it. Start again.
        tokio::fs::remove_file(&partial)
            .await
            .map_err(|e| Error::io(&partial, e))?;
        resumed_from = 0;
    }

    let needed = template.size_bytes - resumed_from;
    let space = hv.host_disk_space(&store).await?;
    if space.available < needed {
        return Err(Error::InsufficientSpace {
            path: store,
            needed,
            available: space.available,
        });
    }

    let mut hasher = ContentHasher::new(template.checksum.algorithm);
    let mut buf = vec![0u8; CHUNK];
    if resumed_from > 0 {
        // Hash what the interrupted copy already wrote.
        let mut f = tokio::fs::File::open(&partial)
            .await
            .map_err(|e| Error::io(&partial, e))?;
        let mut left = resumed_from;
        while left > 0 {
            let want = left.min(CHUNK as u64) as usize;
            let n = f
                .read(&mut buf[..want])
                .await
                .map_err(|e| Error::io(&partial, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
    }

    let mut src = tokio::fs::File::open(source)
        .await
        .map_err(|e| Error::io(source, e))?;
    src.seek(std::io::SeekFrom::Start(resumed_from))
        .await
        .map_err(|e| Error::io(source, e))?;
    let mut out = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial)
        .await
        .map_err(|e| Error::io(&partial, e))?;
    let mut copied = resumed_from;
    loop {
        let n = src.read(&mut buf).await.map_err(|e| Error::io(source, e))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .await
            .map_err(|e| Error::io(&partial, e))?;
        hasher.update(&buf[..n]);
        copied += n as u64;
        let p = PreloadProgress {
            copied,
            total: template.size_bytes,
            resumed_from,
        };
        if progress(&p).is_break() {
            out.flush().await.map_err(|e| Error::io(&partial, e))?;
            out.sync_all().await.map_err(|e| Error::io(&partial, e))?;
            return Err(Error::Cancelled {
                operation: format!(
                    "preload of {} ({copied} of {} bytes kept in {})",
                    template.id(),
                    template.size_bytes,
                    partial.display()
                ),
            });
        }
    }
    out.flush().await.map_err(|e| Error::io(&partial, e))?;
    out.sync_all().await.map_err(|e| Error::io(&partial, e))?;
    drop(out);

    let actual = hasher.finish();
    if actual != template.checksum || copied != template.size_bytes {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(Error::ChecksumMismatch {
            path: source.to_owned(),
            expected: format!("{} ({} bytes)", template.checksum, template.size_bytes),
            actual: format!("{actual} ({copied} bytes)"),
        });
    }
    tokio::fs::rename(&partial, &dest)
        .await
        .map_err(|e| Error::io(&dest, e))?;
    let dir = store.clone();
    crate::hypervisor::run_blocking(move || crate::fsutil::sync_dir(&dir)).await?;
    let disk = MultiattachManager::new(hv).register_template(&dest).await?;
    Ok(PreloadOutcome::Copied {
        disk,
        bytes_copied: copied - resumed_from,
        resumed_from,
    })
}

/// Checks a stored template's length and checksum against the catalog.
pub async fn verify(path: &Path, template: &TemplateVersion) -> Result<()> {
    let len = tokio::fs::metadata(path)
        .await
        .map_err(|e| Error::io(path, e))?
        .len();
    let owned = path.to_owned();
    let algorithm = template.checksum.algorithm;
    let actual =
        tokio::task::spawn_blocking(move || super::catalog::checksum_file(&owned, algorithm))
            .await
            .map_err(|e| Error::Backend {
                backend: "provision".to_owned(),
                message: format!("checksum task failed: {e}"),
            })??;
    if len != template.size_bytes || actual != template.checksum {
        return Err(Error::ChecksumMismatch {
            path: path.to_owned(),
            expected: format!("{} ({} bytes)", template.checksum, template.size_bytes),
            actual: format!("{actual} ({len} bytes); remove the file to preload it again"),
        });
    }
    Ok(())
}

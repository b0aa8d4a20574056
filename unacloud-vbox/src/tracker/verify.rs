//! Checking a migration set's VDI chains against the registries, and copying it.

use std::path::{Path, PathBuf};

use unacloud_core::files::{FileRole, MigrationSet, VmFile};
use uuid::Uuid;

use super::{absolute_lexical, Machine, MediumKind, MigrationOptions};
use crate::error::{Error, Result};
use crate::location::Location;

impl Machine {
    // ----- verification and copy ---------------------------------------------------

    /// Checks every VDI image of `set` against the registries before anything is
    /// copied: the file exists, is a VDI, carries the registry's uuid, and names the
    /// registry's parent (for the image directly above a preloaded template too).
    /// Images in other formats (VMDK, VHD) cannot be checked this way and are listed
    /// in [`VerifyReport::not_checked`]. Every problem is reported, not just the first.
    pub fn verify(&self, set: &MigrationSet) -> VerifyReport {
        let mut links = Vec::new();
        let mut not_checked = Vec::new();
        let mut unknown = Vec::new();
        let mut foreign = Vec::new();
        for f in set.files.iter().filter(|f| f.role == FileRole::Disk) {
            let medium = f
                .uuid
                .as_deref()
                .and_then(|u| Uuid::try_parse(u).ok())
                .and_then(|u| self.medium(&u));
            match medium {
                // A foreign location names no file here: missing, never looked up.
                Some(m) if Location::kind_of_path(&f.path).is_foreign() => {
                    foreign.push(crate::vdi::ChainProblem::Missing {
                        path: f.path.clone(),
                        uuid: m.uuid,
                    });
                }
                Some(m) if m.kind == MediumKind::HardDisk && is_vdi(m.format.as_deref()) => {
                    let parent = m.parent.map(|p| self.media[p].uuid);
                    links.push(crate::vdi::ChainLink::new(f.path.clone(), m.uuid, parent));
                }
                Some(_) => not_checked.push(f.clone()),
                None => unknown.push(f.clone()),
            }
        }
        let mut chain = crate::vdi::verify_chain(&links);
        chain.problems.extend(foreign);
        VerifyReport {
            chain,
            not_checked,
            unknown,
        }
    }

    /// Computes the migration set of `selector` (unresolved dependencies are errors),
    /// verifies its VDI chain, and copies it with [`Machine::copy_set_to`].
    pub fn copy_to<F>(
        &self,
        selector: &str,
        options: &MigrationOptions,
        dest_root: &Path,
        copy_options: &crate::copy::CopyOptions,
        progress: F,
    ) -> Result<crate::copy::CopyReport>
    where
        F: FnMut(&crate::copy::CopyProgress<'_>),
    {
        let strict = MigrationOptions {
            strict: true,
            measure_sizes: false,
            ..options.clone()
        };
        let set = self.migration_set(selector, &strict)?;
        self.copy_set_to(&set, dest_root, copy_options, progress)
    }

    /// Verifies `set` ([`Machine::verify`]; a broken chain fails before anything is
    /// written) and copies its files into `dest_root`, which becomes the machine
    /// folder at the destination: every file keeps its path relative to this
    /// machine's folder. A file outside the machine folder (an absolute location, a
    /// `..` path, a template elsewhere) is refused together with every other
    /// offending file, before anything is written — preload such images and list them
    /// in [`MigrationOptions::preloaded`] instead. The layout is computed from the
    /// machine folder, made absolute, so a machine loaded from a relative path
    /// (`vms/TM.vbox`) copies to `dest_root/TM.vbox`, whatever the current folder.
    /// Foreign locations (`C:\…`, `//host/share/…` on a non-Windows host) are
    /// refused too. Copies go to temporary names, are checked and renamed into place
    /// (see [`crate::copy`]): a file of the set that is a symbolic link (simplest and
    /// safest: links are never followed, wherever they point) or not a regular file,
    /// and a `dest_root` that is itself a symbolic link, are refused before anything
    /// is written; every copy keeps its source's permission bits.
    pub fn copy_set_to<F>(
        &self,
        set: &MigrationSet,
        dest_root: &Path,
        copy_options: &crate::copy::CopyOptions,
        progress: F,
    ) -> Result<crate::copy::CopyReport>
    where
        F: FnMut(&crate::copy::CopyProgress<'_>),
    {
        self.refuse_linked_folders(set, dest_root)?;
        self.verify(set).into_result()?;
        let pairs: Vec<(PathBuf, PathBuf)> = set
            .files
            .iter()
            .map(|f| {
                let rel = self.relative_to_machine_dir(&f.path).unwrap_or_else(|| {
                    // Outside the machine folder: hand over an absolute form (or the
                    // foreign path as it is), so the copier refuses it and names it.
                    absolute_lexical(&f.path).unwrap_or_else(|| f.path.clone())
                });
                (f.path.clone(), rel)
            })
            .collect();
        crate::copy::copy_files(&pairs, dest_root, copy_options, progress)
    }

    /// Refuses (before anything is read or written) every file of `set` that lies
    /// below a symbolic link to a folder inside the machine folder (`Snapshots` ->
    /// `/etc`): the copier never follows a link as the file itself, and this closes
    /// the same hole one folder up. The machine folder itself may be a link.
    fn refuse_linked_folders(&self, set: &MigrationSet, dest_root: &Path) -> Result<()> {
        let Some(base) = absolute_lexical(&self.machine_dir) else {
            return Ok(());
        };
        let mut rejected = Vec::new();
        for f in &set.files {
            let Some(rel) = self.relative_to_machine_dir(&f.path) else {
                continue; // refused by the copier, naming it
            };
            let mut cur = base.clone();
            let parts: Vec<_> = rel.components().collect();
            for part in parts.iter().take(parts.len().saturating_sub(1)) {
                cur.push(part);
                if std::fs::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_symlink()) {
                    rejected.push(crate::copy::RejectedPath {
                        source: f.path.clone(),
                        relative: rel.to_string_lossy().into_owned(),
                        reason: crate::copy::RejectReason::SourceSymlink { path: cur.clone() },
                    });
                    break;
                }
            }
        }
        if rejected.is_empty() {
            Ok(())
        } else {
            Err(Error::CopyRefused {
                dest_root: dest_root.to_path_buf(),
                rejected,
            })
        }
    }
}

/// The outcome of [`Machine::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// The VDI chain check (every problem found).
    pub chain: crate::vdi::ChainReport,
    /// Disk images in formats whose headers are not checked (VMDK, VHD, …).
    pub not_checked: Vec<VmFile>,
    /// Disk files of the set whose uuid this machine does not know (the set was
    /// computed for another machine).
    pub unknown: Vec<VmFile>,
}

impl VerifyReport {
    /// Whether every checked image is intact and every disk is known.
    pub fn is_ok(&self) -> bool {
        self.chain.is_ok() && self.unknown.is_empty()
    }

    /// `Ok(())` when intact; [`Error::BrokenChain`] listing every problem otherwise,
    /// or [`Error::UnresolvedDependency`] for a disk this machine does not know.
    pub fn into_result(self) -> Result<()> {
        if let Some(f) = self.unknown.first() {
            return Err(Error::UnresolvedDependency {
                uuid: f
                    .uuid
                    .as_deref()
                    .and_then(|u| Uuid::try_parse(u).ok())
                    .unwrap_or_else(Uuid::nil),
                needed_by: format!("disk file {} of the migration set", f.path.display()),
            });
        }
        self.chain.into_result()
    }
}

fn is_vdi(format: Option<&str>) -> bool {
    format.is_some_and(|f| f.eq_ignore_ascii_case("vdi"))
}

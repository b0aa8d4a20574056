//! The minimal file set that resumes a snapshot on another host.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::files::{FileRole, MigrationSet, VmFile};
use crate::model::{DiskType, Uuid, VmId};

use super::{add_missing_warnings, len, snapshot_meta};
use crate::qemu::{find, QemuHypervisor};

impl QemuHypervisor {
    /// The minimal set of files to resume `snapshot` of `vm` on another host: the
    /// settings, each disk's chain of the VM's own images from the template up to the
    /// snapshot's frozen image, and the snapshot's state file; the multiattach template
    /// is expected at the destination.
    pub async fn snapshot_files(&self, vm: &VmId, snapshot: &str) -> Result<MigrationSet> {
        let (settings_file, folder, settings, registered) = {
            let st = self.state.lock().await;
            let e = find(&st, vm)?;
            (
                e.settings_file.clone(),
                e.folder(),
                e.settings.clone(),
                st.registry.disks.clone(),
            )
        };
        let meta = snapshot_meta(&settings, snapshot)?;
        let mut set = MigrationSet::default();
        set.push(VmFile::new(
            settings_file.clone(),
            FileRole::Settings,
            None,
            len(&settings_file),
        ));
        for frozen in &meta.disks {
            let top = folder.join(&frozen.file);
            let base = settings
                .disks
                .iter()
                .find(|d| frozen.is_of(d))
                .and_then(|d| d.base.as_ref());
            self.push_chain(
                &mut set,
                &top,
                Some(frozen.uuid),
                &folder,
                &registered,
                base,
            )
            .await;
        }
        if let Some(state) = &meta.state_file {
            let p = folder.join(state);
            set.push(VmFile::new(p.clone(), FileRole::SavedState, None, len(&p)));
        }
        add_missing_warnings(&mut set);
        Ok(set)
    }

    /// Adds `top` and the VM's own images below it (base first) to `set`, stopping at
    /// a registered multiattach template ("expected at destination").
    pub(crate) async fn push_chain(
        &self,
        set: &mut MigrationSet,
        top: &Path,
        top_uuid: Option<Uuid>,
        folder: &Path,
        registered: &[crate::model::DiskInfo],
        base: Option<&crate::qemu::settings::BaseRef>,
    ) {
        let chain = match self.img.info_chain(top).await {
            Ok(c) => c,
            Err(e) => {
                set.warnings
                    .push(format!("cannot inspect {}: {e}", top.display()));
                set.push(VmFile::new(
                    top.to_path_buf(),
                    FileRole::Disk,
                    top_uuid.map(|u| u.to_string()),
                    len(top),
                ));
                if let Some(b) = base {
                    set.expect(b.uuid, Some(b.path.clone()));
                }
                return;
            }
        };
        let mut own: Vec<PathBuf> = Vec::new();
        for image in &chain {
            let p = PathBuf::from(&image.filename);
            let p = if p.is_absolute() { p } else { folder.join(p) };
            let canon = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            if let Some(t) = registered.iter().find(|d| {
                (d.location == canon || d.location == p) && d.disk_type == DiskType::MultiAttach
            }) {
                set.expect(t.uuid, Some(t.location.clone()));
                break;
            }
            if canon.starts_with(folder) || p.starts_with(folder) {
                own.push(canon);
            } else {
                set.external.push(format!(
                    "backing image {} of {} is neither the VM's own nor a registered multiattach template; it is not copied",
                    p.display(),
                    top.display()
                ));
                break;
            }
        }
        for (i, p) in own.iter().enumerate().rev() {
            let uuid = if i == 0 {
                top_uuid.map(|u| u.to_string())
            } else {
                None
            };
            set.push(VmFile::new(p.clone(), FileRole::Disk, uuid, len(p)));
        }
    }
}

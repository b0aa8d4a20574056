//! The in-memory backend's state: VM records, disks, snapshot trees, the injected
//! failures, and the disk chains a migration set lists.

use super::*;

/// What a snapshot remembers: the images attached when it was taken.
#[derive(Debug, Clone)]
pub(super) struct SnapshotState {
    pub(super) attachments: Vec<DiskAttachment>,
    pub(super) had_state: bool,
}

#[derive(Debug, Clone)]
pub(super) struct VmRecord {
    pub(super) info: VmInfo,
    pub(super) folder: PathBuf,
    pub(super) tree: SnapshotTree,
    pub(super) snapshot_states: HashMap<String, SnapshotState>,
    /// Sequence number of the next snapshot (used for its time stamp).
    pub(super) next_snapshot: u64,
}

impl VmRecord {
    /// A VM with no snapshots yet.
    pub(super) fn new(info: VmInfo, folder: PathBuf) -> Self {
        VmRecord {
            info,
            folder,
            tree: SnapshotTree::new(),
            snapshot_states: HashMap::new(),
            next_snapshot: 1,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) vms: BTreeMap<String, VmRecord>,
    /// VMs unregistered without deleting their files, by settings path.
    pub(super) unregistered: HashMap<PathBuf, VmRecord>,
    pub(super) disks: BTreeMap<Uuid, DiskInfo>,
    pub(super) failures: Vec<(String, usize)>,
    pub(super) guest_log: Vec<(String, GuestCommand)>,
    pub(super) disk_space: Option<DiskSpace>,
    pub(super) uuid_counter: u128,
}

impl State {
    pub(super) fn new_uuid(&mut self) -> Uuid {
        self.uuid_counter += 1;
        // Deterministic, readable and distinct from real (random) uuids.
        Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0000 | self.uuid_counter)
    }

    pub(super) fn check_failure(&mut self, operation: &str) -> Result<()> {
        if let Some(pos) = self.failures.iter().position(|(op, _)| op == operation) {
            let (_, remaining) = &mut self.failures[pos];
            if *remaining == 0 {
                self.failures.remove(pos);
                return Err(Error::Backend {
                    backend: BACKEND.to_owned(),
                    message: format!("injected failure in {operation}"),
                });
            }
            *remaining -= 1;
        }
        Ok(())
    }

    pub(super) fn vm_key(&self, vm: &VmId) -> Result<String> {
        if self.vms.contains_key(vm.as_str()) {
            return Ok(vm.0.clone());
        }
        self.vms
            .iter()
            .find(|(_, r)| r.info.uuid.map(|u| u.to_string()) == Some(vm.0.to_ascii_lowercase()))
            .map(|(k, _)| k.clone())
            .ok_or_else(|| Error::NotFound {
                kind: "vm",
                id: vm.0.clone(),
            })
    }

    /// The VM's registry key and a copy of its record, to mutate and store back.
    pub(super) fn vm_snapshot(&self, vm: &VmId) -> Result<(String, VmRecord)> {
        let key = self.vm_key(vm)?;
        let record = self.vms.get(&key).cloned().ok_or_else(|| Error::NotFound {
            kind: "vm",
            id: key.clone(),
        })?;
        Ok((key, record))
    }

    pub(super) fn vm_mut(&mut self, vm: &VmId) -> Result<&mut VmRecord> {
        let key = self.vm_key(vm)?;
        self.vms.get_mut(&key).ok_or_else(|| Error::NotFound {
            kind: "vm",
            id: vm.0.clone(),
        })
    }

    pub(super) fn disk_uuid(&self, disk: &DiskRef) -> Result<Uuid> {
        match disk {
            DiskRef::Uuid(u) if self.disks.contains_key(u) => Ok(*u),
            DiskRef::Path(p) => self
                .disks
                .values()
                .find(|d| &d.location == p)
                .map(|d| d.uuid)
                .ok_or_else(|| Error::NotFound {
                    kind: "disk",
                    id: p.display().to_string(),
                }),
            DiskRef::Uuid(u) => Err(Error::NotFound {
                kind: "disk",
                id: u.to_string(),
            }),
        }
    }

    pub(super) fn children_of(&self, disk: Uuid) -> Vec<Uuid> {
        self.disks
            .values()
            .filter(|d| d.parent == Some(disk))
            .map(|d| d.uuid)
            .collect()
    }

    /// VMs whose current state or snapshots use `disk` directly.
    pub(super) fn users_of(&self, disk: Uuid) -> Vec<String> {
        self.vms
            .values()
            .filter(|r| {
                r.info.disks.iter().any(|a| a.disk == disk)
                    || r.snapshot_states
                        .values()
                        .any(|s| s.attachments.iter().any(|a| a.disk == disk))
            })
            .map(|r| r.info.name.clone())
            .collect()
    }

    pub(super) fn new_child(&mut self, parent: Uuid, folder: &Path) -> Result<DiskInfo> {
        let p = self
            .disks
            .get(&parent)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: "disk",
                id: parent.to_string(),
            })?;
        let uuid = self.new_uuid();
        let ext = match p.format {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Vhd => "vhd",
            _ => "vdi",
        };
        let child = DiskInfo {
            uuid,
            location: folder.join("Snapshots").join(format!("{{{uuid}}}.{ext}")),
            format: p.format.clone(),
            disk_type: DiskType::Normal,
            parent: Some(parent),
            logical_size: p.logical_size,
        };
        self.disks.insert(uuid, child.clone());
        Ok(child)
    }

    /// Removes a differencing image nobody refers to any more.
    pub(super) fn drop_if_orphan(&mut self, disk: Uuid) {
        let is_diff = self.disks.get(&disk).is_some_and(|d| d.parent.is_some());
        if is_diff && self.users_of(disk).is_empty() && self.children_of(disk).is_empty() {
            self.disks.remove(&disk);
        }
    }
}

/// Adds the chain of every attached image, base first, stopping at a multiattach
/// template, which the destination must already have.
pub(super) fn push_chains(s: &State, set: &mut MigrationSet, attachments: &[DiskAttachment]) {
    for a in attachments {
        let mut chain = Vec::new();
        let mut cur = Some(a.disk);
        while let Some(u) = cur {
            let Some(d) = s.disks.get(&u) else { break };
            if d.disk_type == DiskType::MultiAttach {
                set.expect(u, Some(d.location.clone()));
                break;
            }
            chain.push(d.clone());
            cur = d.parent;
        }
        for d in chain.into_iter().rev() {
            set.push(VmFile::new(
                d.location,
                FileRole::Disk,
                Some(d.uuid.to_string()),
                None,
            ));
        }
    }
}

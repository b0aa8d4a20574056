//! The in-memory backend's snapshots: taking (freezing every attached image), restoring
//! (fresh children of the snapshot's images), deleting (merging into the children) and
//! the files of one snapshot.

use super::*;

impl InMemoryHypervisor {
    pub(super) fn snapshot_take(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        live: bool,
    ) -> Result<SnapshotRef> {
        let mut s = self.lock();
        s.check_failure("take_snapshot")?;
        let (key, mut r) = s.vm_snapshot(vm)?;
        let running = matches!(r.info.state, PowerState::Running | PowerState::Paused);
        if !running && !r.info.state.is_startable() {
            return Err(invalid("take a snapshot of", &r));
        }
        let uuid = s.new_uuid();
        let id = uuid.to_string();
        let had_state = running || r.info.state == PowerState::Saved;
        let snapshot = Snapshot {
            id: id.clone(),
            name: name.to_owned(),
            description: description.map(str::to_owned),
            time_stamp: Some(format!("t{}", r.next_snapshot)),
            state_file: had_state.then(|| {
                r.folder
                    .join("Snapshots")
                    .join(format!("{{{uuid}}}.sav"))
                    .display()
                    .to_string()
            }),
        };
        let node = match r.tree.current() {
            Some(parent) => r.tree.add_child(parent, snapshot)?,
            None => r.tree.add_root(snapshot)?,
        };
        r.tree.set_current(Some(node));
        r.next_snapshot += 1;
        // Freeze the attached images; the VM continues on fresh differencing children
        // (write-through and shareable images are not part of snapshots).
        let frozen = r.info.disks.clone();
        let mut continued = Vec::new();
        for a in &frozen {
            let ty = s.disks.get(&a.disk).map(|d| d.disk_type);
            let disk = match ty {
                Some(DiskType::Writethrough | DiskType::Shareable | DiskType::Readonly) => a.disk,
                _ => s.new_child(a.disk, &r.folder)?.uuid,
            };
            continued.push(DiskAttachment { disk, ..a.clone() });
        }
        r.info.disks = continued;
        r.snapshot_states.insert(
            id.clone(),
            SnapshotState {
                attachments: frozen,
                had_state,
            },
        );
        r.info.current_snapshot = Some(id.clone());
        // A non-live snapshot of a running VM pauses it while the state is written; the
        // VM is running again afterwards either way.
        let _ = live;
        s.vms.insert(key, r);
        Ok(SnapshotRef {
            id,
            name: name.to_owned(),
        })
    }

    pub(super) fn snapshot_restore(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        let mut s = self.lock();
        s.check_failure("restore_snapshot")?;
        let (key, mut r) = s.vm_snapshot(vm)?;
        if !r.info.state.is_startable() {
            return Err(invalid("restore a snapshot of", &r));
        }
        let node = r.tree.resolve(snapshot)?;
        let id = r.tree.get(node).map(|n| n.id.clone()).unwrap_or_default();
        let st = r
            .snapshot_states
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: "snapshot",
                id: id.clone(),
            })?;
        let old = std::mem::take(&mut r.info.disks);
        let mut fresh = Vec::new();
        for a in &st.attachments {
            let ty = s.disks.get(&a.disk).map(|d| d.disk_type);
            let disk = match ty {
                Some(DiskType::Writethrough | DiskType::Shareable | DiskType::Readonly) => a.disk,
                _ => s.new_child(a.disk, &r.folder)?.uuid,
            };
            fresh.push(DiskAttachment { disk, ..a.clone() });
        }
        r.info.disks = fresh;
        r.tree.set_current(Some(node));
        r.info.current_snapshot = Some(id);
        r.info.state = if st.had_state {
            PowerState::Saved
        } else {
            PowerState::PoweredOff
        };
        s.vms.insert(key, r);
        for a in old {
            s.drop_if_orphan(a.disk);
        }
        Ok(())
    }

    pub(super) fn snapshot_delete(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        let mut s = self.lock();
        s.check_failure("delete_snapshot")?;
        let (key, r) = s.vm_snapshot(vm)?;
        let node = r.tree.resolve(snapshot)?;
        if r.tree.children(node).len() > 1 {
            return Err(Error::InvalidState {
                operation: "delete snapshot",
                id: snapshot.to_owned(),
                state: "it has more than one child snapshot".to_owned(),
            });
        }
        let id = r.tree.get(node).map(|n| n.id.clone()).unwrap_or_default();
        // Rebuild the tree without the node, its single child taking its place.
        let mut tree = SnapshotTree::new();
        let mut map = HashMap::new();
        for (n, _) in r.tree.iter() {
            if n == node {
                continue;
            }
            let mut parent = r.tree.parent(n);
            if parent == Some(node) {
                parent = r.tree.parent(node);
            }
            let snap = r.tree.get(n).cloned().unwrap_or_default();
            let new = match parent.and_then(|p| map.get(&p).copied()) {
                Some(p) => tree.add_child(p, snap)?,
                None => tree.add_root(snap)?,
            };
            map.insert(n, new);
        }
        let current = match r.tree.current() {
            Some(c) if c == node => r.tree.parent(node).and_then(|p| map.get(&p).copied()),
            Some(c) => map.get(&c).copied(),
            None => None,
        };
        tree.set_current(current);
        let mut r = r;
        r.info.current_snapshot = current.and_then(|c| tree.get(c)).map(|n| n.id.clone());
        r.tree = tree;
        let removed = r.snapshot_states.remove(&id);
        s.vms.insert(key, r);
        // Merge: a frozen image used by no one else is folded into its single child.
        if let Some(st) = removed {
            for a in st.attachments {
                let children = s.children_of(a.disk);
                let parent = s.disks.get(&a.disk).and_then(|d| d.parent);
                if children.len() == 1 && s.users_of(a.disk).is_empty() {
                    if let Some(parent) = parent {
                        if let Some(c) = s.disks.get_mut(&children[0]) {
                            c.parent = Some(parent);
                        }
                        s.disks.remove(&a.disk);
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn snapshot_file_set(&self, vm: &VmId, snapshot: &str) -> Result<MigrationSet> {
        let mut s = self.lock();
        s.check_failure("snapshot_files")?;
        let r = s.vm_mut(vm)?.clone();
        let node = r.tree.resolve(snapshot)?;
        let id = r.tree.get(node).map(|n| n.id.clone()).unwrap_or_default();
        let st = r
            .snapshot_states
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: "snapshot",
                id: id.clone(),
            })?;
        let mut set = MigrationSet::default();
        if let Some(settings) = &r.info.settings_file {
            set.push(VmFile::new(
                settings.clone(),
                FileRole::Settings,
                None,
                None,
            ));
        }
        push_chains(&s, &mut set, &st.attachments);
        if st.had_state {
            set.push(VmFile::new(
                r.folder.join("Snapshots").join(format!("{{{id}}}.sav")),
                FileRole::SavedState,
                None,
                None,
            ));
        }
        Ok(set)
    }
}

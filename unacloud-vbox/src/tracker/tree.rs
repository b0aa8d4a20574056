//! The snapshot tree of a machine, and its text, DOT and JSON renderings.

use unacloud_core::tree::SnapshotTree;

use super::{Machine, TreeFormat};
use crate::error::Result;
use crate::settings::MachineSettings;

impl Machine {
    /// The snapshot tree for `unacloud_core` (ids are uuids without braces).
    pub fn snapshot_tree(&self) -> Result<SnapshotTree> {
        self.settings.snapshot_tree()
    }

    /// The snapshot tree as text, DOT or JSON.
    ///
    /// Text is for people: control characters in names are escaped
    /// ([`crate::display::escape_control`]) so that a hostile name cannot forge rows.
    /// DOT escapes by its own rules and JSON holds the exact strings.
    ///
    /// JSON has the shape of [`unacloud_core::tree::TreeJson`]
    /// (`{"current": id|null, "snapshots": [{"id", "name", …, "current", "children"}]}`)
    /// and is written without recursion, in compact form, so trees of any depth are
    /// safe to render.
    pub fn render_snapshot_tree(&self, format: TreeFormat) -> Result<String> {
        Ok(match format {
            TreeFormat::Text => crate::display::render_tree_text(&self.snapshot_tree()?)?,
            TreeFormat::Dot => self.snapshot_tree()?.render_dot(),
            TreeFormat::Json => self.snapshot_tree()?.render_json()?,
        })
    }
}

impl MachineSettings {
    /// The snapshot tree for `unacloud_core` (ids are uuids without braces), with the
    /// current state's snapshot marked.
    pub fn snapshot_tree(&self) -> Result<SnapshotTree> {
        use unacloud_core::tree::{NodeId, Snapshot};
        let mut tree = SnapshotTree::new();
        let mut ids: Vec<NodeId> = Vec::with_capacity(self.snapshots.len());
        for s in &self.snapshots {
            let node = Snapshot {
                id: s.uuid.to_string(),
                name: s.name.clone(),
                description: s.description.clone(),
                time_stamp: s.time_stamp.clone(),
                state_file: s.state_file.clone(),
            };
            let id = match s.parent.and_then(|p| ids.get(p).copied()) {
                Some(p) => tree.add_child(p, node)?,
                None => tree.add_root(node)?,
            };
            ids.push(id);
        }
        if let Some(c) = self.current_snapshot_index() {
            tree.set_current(ids.get(c).copied());
        }
        Ok(tree)
    }
}

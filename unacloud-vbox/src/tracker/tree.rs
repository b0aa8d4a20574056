//! The snapshot tree of a machine, and its text, DOT and JSON renderings.

use unacloud_core::tree::SnapshotTree;

use super::{Machine, TreeFormat};
use crate::error::{Error, Result};
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
            TreeFormat::Json => self.snapshot_tree_json()?,
        })
    }

    fn snapshot_tree_json(&self) -> Result<String> {
        let snaps = &self.settings.snapshots;
        let cur = self.settings.current_snapshot_index();
        let mut out = String::from("{\"current\":");
        out.push_str(&match cur {
            Some(c) => format!("\"{}\"", snaps[c].uuid),
            None => "null".to_owned(),
        });
        out.push_str(",\"snapshots\":[");
        // Explicit stack of (snapshot, next child to visit).
        let roots: Vec<usize> = (0..snaps.len())
            .filter(|&i| snaps[i].parent.is_none())
            .collect();
        let mut stack: Vec<(usize, usize)> = Vec::new();
        let mut pending_roots = roots.into_iter();
        let mut first_root = true;
        loop {
            let Some(&mut (node, ref mut next)) = stack.last_mut() else {
                let Some(r) = pending_roots.next() else { break };
                if !first_root {
                    out.push(',');
                }
                first_root = false;
                self.open_json_node(&mut out, r, cur)?;
                stack.push((r, 0));
                continue;
            };
            let children = &snaps[node].children;
            if *next < children.len() {
                let c = children[*next];
                if *next > 0 {
                    out.push(',');
                }
                *next += 1;
                self.open_json_node(&mut out, c, cur)?;
                stack.push((c, 0));
            } else {
                out.push_str("]}");
                stack.pop();
            }
        }
        out.push_str("]}");
        Ok(out)
    }

    /// Writes `{"id":…,"name":…,…,"current":b,"children":[` for snapshot `i`.
    fn open_json_node(&self, out: &mut String, i: usize, cur: Option<usize>) -> Result<()> {
        let s = &self.settings.snapshots[i];
        let node = unacloud_core::tree::Snapshot {
            id: s.uuid.to_string(),
            name: s.name.clone(),
            description: s.description.clone(),
            time_stamp: s.time_stamp.clone(),
            state_file: s.state_file.clone(),
        };
        let body = serde_json::to_string(&node).map_err(|e| {
            Error::Core(unacloud_core::Error::InvalidInput(format!(
                "cannot serialise snapshot {}: {e}",
                s.uuid
            )))
        })?;
        // `body` is a JSON object; reopen it to append the tree fields.
        out.push_str(body.strip_suffix('}').unwrap_or(&body));
        out.push_str(if cur == Some(i) {
            ",\"current\":true,\"children\":["
        } else {
            ",\"current\":false,\"children\":["
        });
        Ok(())
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

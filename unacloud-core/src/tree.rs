//! A snapshot tree, shared by every backend.
//!
//! Snapshots form a forest kept in an arena: a node knows its parent and its children
//! in creation order, and the tree remembers below which snapshot the VM's *current
//! state* hangs (VirtualBox's `currentSnapshot`). Nodes are addressed by [`NodeId`]
//! (an index into the arena) and can be found by their backend identifier (a uuid for
//! VirtualBox, a numeric id for QEMU) or by name.
//!
//! ```
//! use unacloud_core::tree::{Snapshot, SnapshotTree};
//!
//! let mut tree = SnapshotTree::new();
//! let s1 = tree.add_root(Snapshot::new("a", "Snapshot 1")).unwrap();
//! let s2 = tree.add_child(s1, Snapshot::new("b", "Snapshot 2")).unwrap();
//! tree.set_current(Some(s2));
//! assert_eq!(tree.path_to_root(s2), vec![s2, s1]);
//! assert_eq!(tree.render_text(), "Snapshot 1 [a]\n  |\n  +- Snapshot 2 [b] *\n");
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Index of a node in a [`SnapshotTree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub usize);

/// What a backend knows about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Snapshot {
    /// The backend's identifier (uuid without braces for VirtualBox).
    pub id: String,
    /// The user-given name (not unique).
    pub name: String,
    /// Free-text description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// When it was taken, as the backend wrote it (ISO 8601 for VirtualBox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_stamp: Option<String>,
    /// The saved memory state, if the snapshot was taken while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_file: Option<String>,
}

impl Snapshot {
    /// A snapshot with only an id and a name.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        Snapshot {
            id: id.into(),
            name: name.into(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone)]
struct Node {
    snapshot: Snapshot,
    parent: Option<NodeId>,
    children: Vec<NodeId>,
}

/// An arena-backed forest of snapshots with a current-state position.
#[derive(Debug, Clone, Default)]
pub struct SnapshotTree {
    nodes: Vec<Node>,
    roots: Vec<NodeId>,
    current: Option<NodeId>,
    by_id: HashMap<String, NodeId>,
}

impl SnapshotTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of snapshots.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree has no snapshot.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn insert(&mut self, parent: Option<NodeId>, snapshot: Snapshot) -> Result<NodeId> {
        if self.by_id.contains_key(&snapshot.id) {
            return Err(Error::AlreadyExists {
                kind: "snapshot",
                id: snapshot.id,
            });
        }
        if let Some(p) = parent {
            self.check(p)?;
        }
        let id = NodeId(self.nodes.len());
        self.by_id.insert(snapshot.id.clone(), id);
        self.nodes.push(Node {
            snapshot,
            parent,
            children: Vec::new(),
        });
        match parent {
            Some(p) => self.nodes[p.0].children.push(id),
            None => self.roots.push(id),
        }
        Ok(id)
    }

    fn check(&self, id: NodeId) -> Result<()> {
        if id.0 < self.nodes.len() {
            Ok(())
        } else {
            Err(Error::NotFound {
                kind: "snapshot node",
                id: id.0.to_string(),
            })
        }
    }

    /// Adds a snapshot with no parent. Fails if its id is already in the tree.
    pub fn add_root(&mut self, snapshot: Snapshot) -> Result<NodeId> {
        self.insert(None, snapshot)
    }

    /// Adds a snapshot below `parent`. Fails if the id exists or `parent` is unknown.
    pub fn add_child(&mut self, parent: NodeId, snapshot: Snapshot) -> Result<NodeId> {
        self.insert(Some(parent), snapshot)
    }

    /// Sets the snapshot below which the current state hangs (`None`: no snapshot yet).
    ///
    /// # Panics
    /// Never; an out-of-range id is ignored and clears the position.
    pub fn set_current(&mut self, node: Option<NodeId>) {
        self.current = node.filter(|n| n.0 < self.nodes.len());
    }

    /// The snapshot below which the current state hangs.
    pub fn current(&self) -> Option<NodeId> {
        self.current
    }

    /// The snapshot stored at `node`, if it exists.
    pub fn get(&self, node: NodeId) -> Option<&Snapshot> {
        self.nodes.get(node.0).map(|n| &n.snapshot)
    }

    /// The parent of `node`.
    pub fn parent(&self, node: NodeId) -> Option<NodeId> {
        self.nodes.get(node.0).and_then(|n| n.parent)
    }

    /// The children of `node`, oldest first.
    pub fn children(&self, node: NodeId) -> &[NodeId] {
        self.nodes.get(node.0).map_or(&[], |n| &n.children)
    }

    /// Snapshots without a parent (VirtualBox has at most one).
    pub fn roots(&self) -> &[NodeId] {
        &self.roots
    }

    /// Finds a snapshot by its backend identifier (a uuid is matched with or without
    /// braces, case-insensitively).
    pub fn find_by_id(&self, id: &str) -> Option<NodeId> {
        if let Some(n) = self.by_id.get(id) {
            return Some(*n);
        }
        let norm = normalise_id(id);
        self.nodes
            .iter()
            .position(|n| normalise_id(&n.snapshot.id) == norm)
            .map(NodeId)
    }

    /// All snapshots with this exact name, in tree order.
    pub fn find_by_name(&self, name: &str) -> Vec<NodeId> {
        self.iter()
            .filter(|(n, _)| self.nodes[n.0].snapshot.name == name)
            .map(|(n, _)| n)
            .collect()
    }

    /// Resolves a user's selector: an identifier first, then a unique name.
    ///
    /// A name shared by several snapshots is an [`Error::AmbiguousName`] that lists the
    /// candidates' ids; nothing matching is [`Error::NotFound`].
    pub fn resolve(&self, selector: &str) -> Result<NodeId> {
        if let Some(n) = self.find_by_id(selector) {
            return Ok(n);
        }
        let by_name = self.find_by_name(selector);
        match by_name.len() {
            0 => Err(Error::NotFound {
                kind: "snapshot",
                id: selector.to_owned(),
            }),
            1 => Ok(by_name[0]),
            _ => Err(Error::AmbiguousName {
                kind: "snapshot",
                name: selector.to_owned(),
                candidates: by_name
                    .iter()
                    .map(|n| self.nodes[n.0].snapshot.id.clone())
                    .collect(),
            }),
        }
    }

    /// Ancestors of `node`, nearest first, excluding `node` itself.
    pub fn ancestors(&self, node: NodeId) -> Ancestors<'_> {
        Ancestors {
            tree: self,
            next: self.parent(node),
        }
    }

    /// `node` followed by its ancestors up to the root.
    pub fn path_to_root(&self, node: NodeId) -> Vec<NodeId> {
        if self.check(node).is_err() {
            return Vec::new();
        }
        std::iter::once(node).chain(self.ancestors(node)).collect()
    }

    /// Depth of `node` (a root has depth 0).
    pub fn depth(&self, node: NodeId) -> usize {
        self.ancestors(node).count()
    }

    /// Depth-first pre-order traversal yielding `(node, depth)`, children oldest first.
    /// Uses an explicit stack, so deep trees cannot overflow the call stack.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, usize)> + '_ {
        let mut stack: Vec<(NodeId, usize)> = self.roots.iter().rev().map(|r| (*r, 0)).collect();
        std::iter::from_fn(move || {
            let (n, d) = stack.pop()?;
            for c in self.nodes[n.0].children.iter().rev() {
                stack.push((*c, d + 1));
            }
            Some((n, d))
        })
    }

    /// An indented text tree in the style of `virsh snapshot-list --tree`; the snapshot
    /// the current state hangs below is marked with ` *`.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        // prefix stack: for each open ancestor, whether it has later siblings
        let mut stack: Vec<(NodeId, String, bool)> = Vec::new();
        for (i, r) in self.roots.iter().enumerate().rev() {
            stack.push((*r, String::new(), i + 1 < self.roots.len()));
        }
        let mut first = true;
        while let Some((n, prefix, _)) = stack.pop() {
            let node = &self.nodes[n.0];
            if !first && self.parent(n).is_some() {
                let _ = writeln!(out, "{prefix}|");
            }
            first = false;
            let connector = if node.parent.is_some() { "+- " } else { "" };
            let mark = if self.current == Some(n) { " *" } else { "" };
            let _ = writeln!(
                out,
                "{}{}{} [{}]{}",
                prefix, connector, node.snapshot.name, node.snapshot.id, mark
            );
            let child_base = if node.parent.is_some() {
                let has_later_sibling = self
                    .parent(n)
                    .map(|p| self.nodes[p.0].children.last() != Some(&n))
                    .unwrap_or(false);
                format!(
                    "{}{}",
                    prefix,
                    if has_later_sibling { "|   " } else { "    " }
                )
            } else {
                format!("{prefix}  ")
            };
            for c in node.children.iter().rev() {
                stack.push((*c, child_base.clone(), false));
            }
        }
        out
    }

    /// A Graphviz DOT digraph: one node per snapshot, edges parent → child, and a
    /// `current state` node below the current snapshot.
    pub fn render_dot(&self) -> String {
        let mut out = String::from("digraph snapshots {\n  node [shape=box];\n");
        for (n, _) in self.iter() {
            let s = &self.nodes[n.0].snapshot;
            let _ = writeln!(
                out,
                "  n{} [label=\"{}\\n{}\"];",
                n.0,
                dot_escape(&s.name),
                dot_escape(&s.id)
            );
            if let Some(p) = self.nodes[n.0].parent {
                let _ = writeln!(out, "  n{} -> n{};", p.0, n.0);
            }
        }
        out.push_str("  current [label=\"current state\", shape=ellipse, style=dashed];\n");
        if let Some(c) = self.current {
            let _ = writeln!(out, "  n{} -> current [style=dashed];", c.0);
        }
        out.push_str("}\n");
        out
    }

    /// The tree as nested JSON-friendly data (see [`TreeJson`]).
    pub fn to_json(&self) -> TreeJson {
        // Build bottom-up without recursion: process nodes in reverse pre-order.
        let order: Vec<NodeId> = self.iter().map(|(n, _)| n).collect();
        let mut built: HashMap<NodeId, SnapshotJson> = HashMap::new();
        for n in order.iter().rev() {
            let node = &self.nodes[n.0];
            let children = node
                .children
                .iter()
                .filter_map(|c| built.remove(c))
                .collect();
            built.insert(
                *n,
                SnapshotJson {
                    snapshot: node.snapshot.clone(),
                    current: self.current == Some(*n),
                    children,
                },
            );
        }
        TreeJson {
            current: self.current.map(|c| self.nodes[c.0].snapshot.id.clone()),
            snapshots: self.roots.iter().filter_map(|r| built.remove(r)).collect(),
        }
    }

    /// The tree as compact JSON text of the shape of [`TreeJson`], written without
    /// recursion: trees of any depth are safe to render (serialising [`TreeJson`] with
    /// serde recurses once per level).
    ///
    /// ```
    /// use unacloud_core::tree::{Snapshot, SnapshotTree, TreeJson};
    /// let mut t = SnapshotTree::new();
    /// let root = t.add_root(Snapshot::new("a", "base")).unwrap();
    /// let child = t.add_child(root, Snapshot::new("b", "patched")).unwrap();
    /// t.set_current(Some(child));
    /// let text = t.render_json().unwrap();
    /// let back: TreeJson = serde_json::from_str(&text).unwrap();
    /// assert_eq!(back, t.to_json());
    /// ```
    pub fn render_json(&self) -> Result<String> {
        let mut out = String::from("{\"current\":");
        match self.current {
            Some(c) => out.push_str(&json_text(&self.nodes[c.0].snapshot.id)?),
            None => out.push_str("null"),
        }
        out.push_str(",\"snapshots\":[");
        // Explicit stack of (node, next child to visit).
        let mut stack: Vec<(NodeId, usize)> = Vec::new();
        for (k, &root) in self.roots.iter().enumerate() {
            if k > 0 {
                out.push(',');
            }
            self.open_json_node(&mut out, root)?;
            stack.push((root, 0));
            while let Some(top) = stack.last_mut() {
                let (node, next) = *top;
                let children = &self.nodes[node.0].children;
                if let Some(&child) = children.get(next) {
                    top.1 += 1;
                    if next > 0 {
                        out.push(',');
                    }
                    self.open_json_node(&mut out, child)?;
                    stack.push((child, 0));
                } else {
                    out.push_str("]}");
                    stack.pop();
                }
            }
        }
        out.push_str("]}");
        Ok(out)
    }

    /// Writes `{"id":…,"name":…,…,"current":b,"children":[` for `node`.
    fn open_json_node(&self, out: &mut String, node: NodeId) -> Result<()> {
        let body = json_text(&self.nodes[node.0].snapshot)?;
        // `body` is a JSON object; reopen it to append the tree fields.
        out.push_str(body.strip_suffix('}').unwrap_or(&body));
        out.push_str(if self.current == Some(node) {
            ",\"current\":true,\"children\":["
        } else {
            ",\"current\":false,\"children\":["
        });
        Ok(())
    }

    /// Rebuilds a tree from its JSON form.
    pub fn from_json(json: &TreeJson) -> Result<Self> {
        let mut tree = SnapshotTree::new();
        let mut stack: Vec<(Option<NodeId>, &SnapshotJson)> =
            json.snapshots.iter().rev().map(|s| (None, s)).collect();
        while let Some((parent, s)) = stack.pop() {
            let id = tree.insert(parent, s.snapshot.clone())?;
            for c in s.children.iter().rev() {
                stack.push((Some(id), c));
            }
        }
        if let Some(c) = &json.current {
            let node = tree.find_by_id(c).ok_or_else(|| Error::NotFound {
                kind: "snapshot",
                id: c.clone(),
            })?;
            tree.set_current(Some(node));
        }
        Ok(tree)
    }
}

/// Iterator over a node's ancestors, see [`SnapshotTree::ancestors`].
#[derive(Debug)]
pub struct Ancestors<'a> {
    tree: &'a SnapshotTree,
    next: Option<NodeId>,
}

impl Iterator for Ancestors<'_> {
    type Item = NodeId;
    fn next(&mut self) -> Option<NodeId> {
        let n = self.next?;
        self.next = self.tree.parent(n);
        Some(n)
    }
}

/// JSON form of a tree: `{"current": id|null, "snapshots": [ … ]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeJson {
    /// Identifier of the snapshot below which the current state hangs.
    pub current: Option<String>,
    /// Root snapshots with their descendants.
    pub snapshots: Vec<SnapshotJson>,
}

/// One snapshot in [`TreeJson`], with its children nested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotJson {
    /// The snapshot's fields.
    #[serde(flatten)]
    pub snapshot: Snapshot,
    /// Whether the current state hangs directly below this snapshot.
    pub current: bool,
    /// Child snapshots, oldest first.
    pub children: Vec<SnapshotJson>,
}

impl Serialize for SnapshotTree {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for SnapshotTree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let json = TreeJson::deserialize(d)?;
        SnapshotTree::from_json(&json).map_err(serde::de::Error::custom)
    }
}

fn json_text<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::InvalidInput(format!("cannot write the snapshot tree as JSON: {e}")))
}

fn normalise_id(id: &str) -> String {
    id.trim_matches(|c| c == '{' || c == '}')
        .to_ascii_lowercase()
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> (SnapshotTree, Vec<NodeId>) {
        let mut t = SnapshotTree::new();
        let a = t.add_root(Snapshot::new("a", "base")).unwrap();
        let b = t.add_child(a, Snapshot::new("b", "left")).unwrap();
        let c = t.add_child(b, Snapshot::new("c", "deep")).unwrap();
        let d = t.add_child(a, Snapshot::new("d", "right")).unwrap();
        t.set_current(Some(c));
        (t, vec![a, b, c, d])
    }

    #[test]
    fn renders_branches_like_virsh() {
        let (t, _) = sample();
        let expected =
            "base [a]\n  |\n  +- left [b]\n  |   |\n  |   +- deep [c] *\n  |\n  +- right [d]\n";
        assert_eq!(t.render_text(), expected);
    }

    #[test]
    fn ancestors_and_iteration() {
        let (t, n) = sample();
        assert_eq!(t.ancestors(n[2]).collect::<Vec<_>>(), vec![n[1], n[0]]);
        assert_eq!(t.depth(n[2]), 2);
        let order: Vec<_> = t.iter().map(|(x, _)| x).collect();
        assert_eq!(order, vec![n[0], n[1], n[2], n[3]]);
    }

    #[test]
    fn duplicate_ids_are_refused_and_names_may_repeat() {
        let (mut t, n) = sample();
        assert!(matches!(
            t.add_child(n[0], Snapshot::new("b", "x")),
            Err(Error::AlreadyExists { .. })
        ));
        t.add_child(n[3], Snapshot::new("e", "left")).unwrap();
        match t.resolve("left") {
            Err(Error::AmbiguousName { candidates, .. }) => assert_eq!(candidates, vec!["b", "e"]),
            other => panic!("expected ambiguity, got {other:?}"),
        }
        assert_eq!(t.resolve("deep").unwrap(), n[2]);
        assert!(matches!(t.resolve("nope"), Err(Error::NotFound { .. })));
    }

    #[test]
    fn json_round_trip_keeps_shape_and_current() {
        let (t, _) = sample();
        let s = serde_json::to_string(&t).unwrap();
        let back: SnapshotTree = serde_json::from_str(&s).unwrap();
        assert_eq!(back.render_text(), t.render_text());
    }

    #[test]
    fn dot_marks_current_state() {
        let (t, n) = sample();
        let dot = t.render_dot();
        assert!(dot.contains(&format!("n{} -> current", n[2].0)));
        assert!(dot.starts_with("digraph"));
    }

    #[test]
    fn a_very_deep_chain_does_not_overflow() {
        let mut t = SnapshotTree::new();
        let mut last = t.add_root(Snapshot::new("0", "s")).unwrap();
        for i in 1..100_000 {
            last = t
                .add_child(last, Snapshot::new(i.to_string(), "s"))
                .unwrap();
        }
        assert_eq!(t.path_to_root(last).len(), 100_000);
        assert_eq!(t.iter().count(), 100_000);
        assert_eq!(t.ancestors(last).count(), 99_999);
    }
}

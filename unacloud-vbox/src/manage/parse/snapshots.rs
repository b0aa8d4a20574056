//! Snapshot trees from `snapshot <vm> list --machinereadable` and from the `Snapshot*`
//! keys of `showvminfo --machinereadable`, and from the human `snapshot <vm> list`.
//!
//! Numbering (VBoxManageSnapshot.cpp / VBoxManageInfo.cpp): a depth-first pre-order walk
//! from the root snapshot. The root's keys have no suffix (`SnapshotName`,
//! `SnapshotUUID`); a child gets its parent's suffix plus `-<i>`, `i` being its 1-based
//! position among its siblings (`SnapshotName-1-2`). `SnapshotDescription<sfx>` appears
//! only for non-empty descriptions. `CurrentSnapshotName`, `CurrentSnapshotUUID` and
//! `CurrentSnapshotNode="SnapshotName<sfx>"` follow the current node, wherever it is.
//! Names are not unique; uuids are.

use std::collections::HashMap;

use unacloud_core::tree::{NodeId, Snapshot, SnapshotTree};

use crate::manage::parse::machinereadable::MachineReadable;

/// Why a snapshot listing could not be turned into a tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", line_prefix(*line))]
pub struct SnapshotListError {
    /// 1-based line of the offending entry (0 when not tied to a line).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// `line <n>: `, or nothing when the error is not tied to a line.
fn line_prefix(line: usize) -> String {
    if line > 0 {
        format!("line {line}: ")
    } else {
        String::new()
    }
}

/// A valid suffix is empty or `(-<digits>)+`.
fn valid_suffix(sfx: &str) -> bool {
    sfx.is_empty()
        || (sfx.starts_with('-')
            && sfx[1..]
                .split('-')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
}

fn parent_suffix(sfx: &str) -> Option<&str> {
    if sfx.is_empty() {
        None
    } else {
        Some(sfx.rfind('-').map_or("", |i| &sfx[..i]))
    }
}

fn err(line: usize, message: impl Into<String>) -> SnapshotListError {
    SnapshotListError {
        line,
        message: message.into(),
    }
}

/// Builds the snapshot tree from the `Snapshot*` / `CurrentSnapshot*` keys of a
/// machine-readable document (either command). No `SnapshotName` key: an empty tree.
pub fn tree_from_machine_readable(
    doc: &MachineReadable,
) -> Result<SnapshotTree, SnapshotListError> {
    // Collect uuids and descriptions by suffix first: the uuid line follows its name line.
    let mut uuids: HashMap<&str, &str> = HashMap::new();
    let mut descriptions: HashMap<&str, &str> = HashMap::new();
    for e in &doc.entries {
        if let Some(sfx) = e.key.strip_prefix("SnapshotUUID") {
            if valid_suffix(sfx) {
                uuids.insert(sfx, e.value.as_str());
            }
        } else if let Some(sfx) = e.key.strip_prefix("SnapshotDescription") {
            if valid_suffix(sfx) {
                descriptions.insert(sfx, e.value.as_str());
            }
        }
    }
    let mut tree = SnapshotTree::new();
    let mut by_suffix: HashMap<&str, NodeId> = HashMap::new();
    for e in &doc.entries {
        let Some(sfx) = e.key.strip_prefix("SnapshotName") else {
            continue;
        };
        if !valid_suffix(sfx) {
            continue;
        }
        let uuid = uuids.get(sfx).ok_or_else(|| {
            err(
                e.line,
                format!("{} has no matching SnapshotUUID{sfx}", e.key),
            )
        })?;
        let id = normalise_uuid(uuid);
        if uuid::Uuid::parse_str(&id).is_err() {
            return Err(err(
                e.line,
                format!("SnapshotUUID{sfx} {uuid:?} is not a uuid"),
            ));
        }
        let mut snap = Snapshot::new(id, e.value.clone());
        snap.description = descriptions.get(sfx).map(|d| (*d).to_owned());
        let node = match parent_suffix(sfx) {
            None => {
                if !tree.roots().is_empty() {
                    return Err(err(e.line, "a second root snapshot (key without suffix)"));
                }
                tree.add_root(snap)
            }
            Some(p) => {
                let parent = by_suffix.get(p).ok_or_else(|| {
                    err(
                        e.line,
                        format!("{} appears before its parent SnapshotName{p}", e.key),
                    )
                })?;
                tree.add_child(*parent, snap)
            }
        }
        .map_err(|x| err(e.line, x.to_string()))?;
        by_suffix.insert(sfx, node);
    }
    if let Some(cur) = doc.get("CurrentSnapshotUUID") {
        let id = normalise_uuid(cur);
        let node = tree.find_by_id(&id).ok_or_else(|| {
            err(
                0,
                format!("CurrentSnapshotUUID {cur} is not in the listed snapshots"),
            )
        })?;
        if let Some(path) = doc.get("CurrentSnapshotNode") {
            if let Some(sfx) = path.strip_prefix("SnapshotName") {
                if by_suffix.get(sfx) != Some(&node) {
                    return Err(err(
                        0,
                        format!("CurrentSnapshotNode {path} does not name the snapshot {cur}"),
                    ));
                }
            }
        }
        tree.set_current(Some(node));
    }
    Ok(tree)
}

/// A uuid without braces, lower case.
pub fn normalise_uuid(s: &str) -> String {
    s.trim()
        .trim_matches(|c| c == '{' || c == '}')
        .to_ascii_lowercase()
}

/// Parses the human form of `snapshot <vm> list`: one line per snapshot,
/// `"   " + 3 spaces per depth + "Name: <name> (UUID: <uuid>)"`, with ` *` after the
/// current one. Description lines are skipped. Prefer `--machinereadable`: VirtualBox 7
/// translates this form.
pub fn tree_from_human_list(text: &str) -> Result<SnapshotTree, SnapshotListError> {
    let mut tree = SnapshotTree::new();
    // (depth, node) of the open path.
    let mut path: Vec<(usize, NodeId)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let trimmed = line.trim_start_matches(' ');
        let Some(rest) = trimmed.strip_prefix("Name: ") else {
            continue;
        };
        let indent = line.len() - trimmed.len();
        if indent < 3 || (indent - 3) % 3 != 0 {
            return Err(err(
                i + 1,
                format!("indentation of {indent} spaces is not 3 + 3 per level"),
            ));
        }
        let depth = (indent - 3) / 3;
        let (rest, current) = match rest.strip_suffix(" *") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let open = rest
            .rfind(" (UUID: ")
            .ok_or_else(|| err(i + 1, "no \"(UUID: …)\" after the name"))?;
        let name = &rest[..open];
        let uuid = rest[open + " (UUID: ".len()..].trim_end_matches(')');
        let snap = Snapshot::new(normalise_uuid(uuid), name);
        while path.last().is_some_and(|(d, _)| *d >= depth) {
            path.pop();
        }
        let node = match path.last() {
            None if tree.is_empty() || depth == 0 => tree.add_root(snap),
            None => return Err(err(i + 1, "a nested snapshot without a parent line")),
            Some((d, _)) if *d + 1 != depth => {
                return Err(err(i + 1, "indentation jumps more than one level"))
            }
            Some((_, p)) => tree.add_child(*p, snap),
        }
        .map_err(|x| err(i + 1, x.to_string()))?;
        path.push((depth, node));
        if current {
            tree.set_current(Some(node));
        }
    }
    Ok(tree)
}

/// Renders a tree as the `Snapshot*` lines of `--machinereadable` output (the numbering
/// above), for comparing trees and for tools that expect that format. Names and
/// descriptions are written raw, as VirtualBox does.
///
/// Unstable (feature `__testing`): a helper of this project's tests, not public API.
#[cfg(feature = "__testing")]
pub fn render_machine_readable(tree: &SnapshotTree) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // (node, suffix) in pre-order.
    let mut stack: Vec<(NodeId, String)> = tree
        .roots()
        .iter()
        .rev()
        .map(|r| (*r, String::new()))
        .collect();
    while let Some((n, sfx)) = stack.pop() {
        let Some(s) = tree.get(n) else { continue };
        let _ = writeln!(out, "SnapshotName{sfx}=\"{}\"", s.name);
        let _ = writeln!(out, "SnapshotUUID{sfx}=\"{}\"", s.id);
        if let Some(d) = s.description.as_deref().filter(|d| !d.is_empty()) {
            let _ = writeln!(out, "SnapshotDescription{sfx}=\"{d}\"");
        }
        if tree.current() == Some(n) {
            let _ = writeln!(out, "CurrentSnapshotName=\"{}\"", s.name);
            let _ = writeln!(out, "CurrentSnapshotUUID=\"{}\"", s.id);
            let _ = writeln!(out, "CurrentSnapshotNode=\"SnapshotName{sfx}\"");
        }
        for (i, c) in tree.children(n).iter().enumerate().rev() {
            stack.push((*c, format!("{sfx}-{}", i + 1)));
        }
    }
    out
}

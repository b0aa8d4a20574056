//! Text for terminals: settings files are data, and a hostile one must not be able to
//! forge lines or send escape sequences through a tool's human-readable output.
//!
//! [`escape_control`] is the one escaping function every human-readable output of
//! this crate and its command-line tools uses for names, paths and messages taken
//! from settings files or `VBoxManage`: newlines, carriage returns, tabs, `ESC` and
//! every other control character (C0, `DEL`, C1), plus the Unicode line separators
//! and bidirectional-override characters, become visible escapes (`\n`, `\r`, `\t`,
//! `\u{1b}`, …). Everything else, backslashes included (Windows paths stay
//! readable), is kept. JSON output is not escaped this way: serde writes the exact
//! strings, escaped by JSON's own rules.
//!
//! ```
//! use unacloud_vbox::display::escape_control;
//!
//! assert_eq!(escape_control("Snapshot 1"), "Snapshot 1");
//! assert_eq!(escape_control("a\nfake row\x1b[2J"), "a\\nfake row\\u{1b}[2J");
//! assert_eq!(escape_control(r"C:\Users\lab"), r"C:\Users\lab");
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use unacloud_core::tree::{NodeId, Snapshot, SnapshotTree};

/// Whether `c` must not reach a terminal as it is.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' // line and paragraph separators
            | '\u{200e}' | '\u{200f}' // directional marks
            | '\u{202a}'..='\u{202e}' // embeddings and overrides
            | '\u{2066}'..='\u{2069}' // isolates
        )
}

/// `s` with control characters escaped (see the [module docs](self)); borrowed when
/// nothing needed escaping.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A path for human-readable output: lossily decoded, then [`escape_control`].
pub fn escape_path(path: &Path) -> String {
    escape_control(&path.to_string_lossy()).into_owned()
}

/// An error and its causes on one line, outermost first (`outer: cause: root
/// cause`), escaped with [`escape_control`]. A cause whose text the message already
/// holds is not repeated.
///
/// ```
/// use unacloud_vbox::display::error_chain;
///
/// let e = unacloud_vbox::Error::io("/vms/TM.vbox", std::io::Error::other("disk on fire"));
/// assert_eq!(error_chain(&e), "I/O error on /vms/TM.vbox: disk on fire");
/// ```
pub fn error_chain(e: &dyn std::error::Error) -> String {
    escape_control(&join_sources(e)).into_owned()
}

/// An error and its causes joined by `: ` as they are, unescaped (a cause whose text the
/// message already holds is not repeated).
pub(crate) fn join_sources(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

/// [`SnapshotTree::render_text`] with every snapshot's name and id passed through
/// [`escape_control`] first, so that one name cannot draw extra rows of the tree.
pub fn render_tree_text(tree: &SnapshotTree) -> crate::Result<String> {
    if !tree
        .iter()
        .filter_map(|(n, _)| tree.get(n))
        .any(|s| s.name.chars().any(needs_escape) || s.id.chars().any(needs_escape))
    {
        return Ok(tree.render_text());
    }
    let mut copy = SnapshotTree::new();
    let mut ids: HashMap<NodeId, NodeId> = HashMap::with_capacity(tree.len());
    // Pre-order: every parent is copied before its children.
    for (n, _) in tree.iter() {
        let Some(s) = tree.get(n) else { continue };
        let mut e = Snapshot::new(escape_control(&s.id), escape_control(&s.name));
        e.time_stamp = s.time_stamp.clone();
        let id = match tree.parent(n).and_then(|p| ids.get(&p).copied()) {
            Some(p) => copy.add_child(p, e)?,
            None => copy.add_root(e)?,
        };
        ids.insert(n, id);
    }
    copy.set_current(tree.current().and_then(|c| ids.get(&c).copied()));
    Ok(copy.render_text())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_control_character() {
        for c in (0u32..0x20).chain(0x7f..0xa0) {
            let c = char::from_u32(c).unwrap_or('?');
            let s = format!("a{c}b");
            let e = escape_control(&s);
            assert!(!e.chars().any(|x| x.is_control()), "{c:?} -> {e:?}");
        }
        assert_eq!(escape_control("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(escape_control("tab\tcr\r"), "tab\\tcr\\r");
        assert!(matches!(escape_control("plain é ü"), Cow::Borrowed(_)));
    }
}

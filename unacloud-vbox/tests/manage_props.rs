//! Property tests of the VBoxManage layer: shell quoting survives a real shell, the
//! snapshot renderer and parser agree on any tree, and no parser panics on any input.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use unacloud_core::tree::{NodeId, Snapshot, SnapshotTree};
use unacloud_vbox::manage::parse::{self, machinereadable};
use unacloud_vbox::manage::shell_quote;

/// Undoes POSIX single-quote quoting as produced by `shell_quote`.
fn unquote(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, '\'') | (true, '\'') => quoted = !quoted,
            (false, '\\') => out.push(chars.next().unwrap()),
            (_, c) => out.push(c),
        }
    }
    out
}

fn tree_from(parents: &[usize], names: &[String], current: usize) -> SnapshotTree {
    let mut t = SnapshotTree::new();
    let mut ids: Vec<NodeId> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let id = format!("00000000-0000-4000-8000-{:012x}", i + 1);
        let snap = Snapshot::new(id, name.clone());
        let n = if i == 0 {
            t.add_root(snap)
        } else {
            t.add_child(ids[parents[i] % i], snap)
        };
        ids.push(n.unwrap());
    }
    if !ids.is_empty() {
        t.set_current(Some(ids[current % ids.len()]));
    }
    t
}

fn shape(t: &SnapshotTree) -> Vec<(String, String, Option<String>, bool)> {
    t.iter()
        .map(|(n, _)| {
            let s = t.get(n).unwrap();
            (
                s.id.clone(),
                s.name.clone(),
                t.parent(n).map(|p| t.get(p).unwrap().id.clone()),
                t.current() == Some(n),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn shell_quote_round_trips(s in "\\PC*") {
        prop_assert_eq!(unquote(&shell_quote(&s)), s);
    }

    #[test]
    fn rendered_snapshot_listing_parses_back_to_the_same_tree(
        parents in proptest::collection::vec(0usize..64, 1..40),
        names in proptest::collection::vec("[A-Za-z0-9 ._()'=-]{0,20}", 40),
        current in 0usize..64,
    ) {
        let names: Vec<String> = names.into_iter().take(parents.len()).collect();
        let t = tree_from(&parents, &names, current);
        let text = parse::render_machine_readable(&t);
        let back = parse::tree_from_machine_readable(&machinereadable::parse(&text)).unwrap();
        prop_assert_eq!(shape(&back), shape(&t));
    }

    #[test]
    fn parsers_never_panic(text in "(\\PC|\n|\"|=|-|\\\\|\\{|\\}|:| ){0,400}") {
        let doc = machinereadable::parse(&text);
        let _ = parse::tree_from_machine_readable(&doc);
        let _ = parse::parse_vm_info(&text);
        let _ = parse::parse_vm_list(&text);
        let _ = parse::parse_media(&text);
        let _ = parse::tree_from_human_list(&text);
        let _ = parse::parse_version(&text);
        let _ = parse::parse_createvm(&text);
        let _ = unacloud_vbox::manage::failure::parse_error_output(&text);
    }
}

#[cfg(unix)]
#[test]
fn shell_quote_survives_a_real_shell() {
    // A fixed set of awkward arguments, echoed back by /bin/sh one per line.
    let args = [
        "Snapshot 1",
        "it's",
        "",
        "a\"b",
        "$HOME",
        "`x`",
        "tab\there",
        "semi;colon",
        "star*",
        "~user",
        "--description=a b",
        "ünïcødé",
    ];
    let line: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    let script = format!(
        "for a in {}; do printf '%s\\n' \"$a\"; done",
        line.join(" ")
    );
    let out = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let got: Vec<&str> = std::str::from_utf8(&out.stdout)
        .unwrap()
        .split('\n')
        .collect();
    assert_eq!(&got[..args.len()], &args[..]);
}

//! The `key=value` format of `--machinereadable` output.
//!
//! Real output is messier than its name suggests (see the fixtures' manifest): values
//! may span several lines (VM and snapshot descriptions), some lines have text after the
//! closing quote (`VideoMode="720,400,0"@0,0 1`), some values are unquoted and contain `=`
//! (`videocapopts=ac_enabled=false`), some keys contain spaces (`BIOS NVRAM File`), and
//! VirtualBox 7.0 prints lines that are not `key=value` at all (`Encryption:     disabled`,
//! ` rec_screen0`). Escaping differs by key and by version: some values are printed with
//! `\\` and `\"` escapes, some raw — on Windows the same output mixes `C:\\Users\\…` and
//! `C:\Users\…`.
//!
//! The parser therefore:
//! * keeps every entry in order (duplicate keys occur before 7.0), and records lines it
//!   cannot read instead of failing;
//! * reads a quoted value up to the last `"` of its line, unless the key is one that can
//!   hold several lines (`description`, `SnapshotDescription…`), where the value ends
//!   only at a line ending in a closing quote;
//! * unescapes a value only when the key is not one VirtualBox prints raw and the value
//!   is a well-formed escaped string (every `\` starts `\\` or `\"`), which a raw Windows
//!   path never is.

use std::borrow::Cow;

/// One `key=value` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key, without quotes.
    pub key: String,
    /// Whether the key was quoted (storage attachment keys always are).
    pub quoted_key: bool,
    /// The value: unquoted and, where appropriate, unescaped.
    pub value: String,
    /// Whether the value was quoted.
    pub quoted_value: bool,
    /// Text after the closing quote (`@0,0 1` in `VideoMode="720,400,0"@0,0 1`).
    pub trailing: String,
    /// 1-based line where the entry starts.
    pub line: usize,
}

/// A parsed `--machinereadable` document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineReadable {
    /// Every entry, in output order.
    pub entries: Vec<Entry>,
    /// Lines that are not `key=value` (1-based line, text), kept for diagnostics.
    pub skipped: Vec<(usize, String)>,
}

impl MachineReadable {
    /// The value of the first entry with `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    }

    /// The first entry with `key`.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// The value of `key` parsed as a number.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.trim().parse().ok())
    }
}

/// Keys whose values VirtualBox prints with a raw `%ls`/`%s` in every version (never
/// escaped): snapshot names and descriptions, network attachment names, NAT rules.
pub fn is_raw_key(key: &str) -> bool {
    const RAW_PREFIXES: [&str; 9] = [
        "SnapshotName",
        "SnapshotDescription",
        "CurrentSnapshotName",
        "natnet",
        "bridgeadapter",
        "intnet",
        "hostonlyadapter",
        "generic",
        "Forwarding(",
    ];
    RAW_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Keys whose value may continue over several lines.
fn is_multiline_key(key: &str) -> bool {
    key == "description" || key.starts_with("SnapshotDescription")
}

/// Whether the quote at the end of `s` (which ends with `"`) is itself escaped, i.e.
/// preceded by an odd number of backslashes.
fn ends_with_escaped_quote(s: &str) -> bool {
    let body = &s[..s.len() - 1];
    body.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1
}

/// Whether `s` is a well-formed escaped string: every `\` starts `\\` or `\"`.
pub fn is_well_formed_escaped(s: &str) -> bool {
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' && !matches!(it.next(), Some('\\') | Some('"')) {
            return false;
        }
    }
    true
}

/// Undoes `\\` and `\"` escapes.
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some(n) => out.push(n),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn decode(key: &str, raw: &str) -> String {
    if !is_raw_key(key) && raw.contains('\\') && is_well_formed_escaped(raw) {
        unescape(raw)
    } else {
        raw.to_owned()
    }
}

/// Splits a line into key (unquoted), whether it was quoted, and the rest after `=`.
fn split_key(line: &str) -> Option<(String, bool, &str)> {
    if let Some(rest) = line.strip_prefix('"') {
        // A quoted key ends at `"=`.
        let end = rest.find("\"=")?;
        Some((rest[..end].to_owned(), true, &rest[end + 2..]))
    } else {
        let eq = line.find('=')?;
        let key = &line[..eq];
        if key.is_empty() || key.starts_with(' ') {
            return None;
        }
        Some((key.to_owned(), false, &line[eq + 1..]))
    }
}

/// Parses `--machinereadable` output. Never fails: unreadable lines are recorded in
/// [`MachineReadable::skipped`]. CRLF line endings are accepted.
pub fn parse(text: &str) -> MachineReadable {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let mut doc = MachineReadable::default();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let lineno = i + 1;
        i += 1;
        if line.is_empty() {
            continue;
        }
        let Some((key, quoted_key, rest)) = split_key(line) else {
            doc.skipped.push((lineno, line.to_owned()));
            continue;
        };
        let Some(body) = rest.strip_prefix('"') else {
            doc.entries.push(Entry {
                key,
                quoted_key,
                value: rest.to_owned(),
                quoted_value: false,
                trailing: String::new(),
                line: lineno,
            });
            continue;
        };
        // A quoted value: its raw text, and the text after the closing quote.
        let (raw, trailing): (Cow<'_, str>, &str) = if is_multiline_key(&key) {
            // The value ends at the first line (this one included) that ends with a
            // closing quote; for escaped keys that quote must not be escaped itself.
            let raw_key = is_raw_key(&key);
            let closes = |s: &str| s.ends_with('"') && (raw_key || !ends_with_escaped_quote(s));
            let mut value = String::new();
            let mut current = body;
            loop {
                if closes(current) {
                    value.push_str(&current[..current.len() - 1]);
                    break;
                }
                value.push_str(current);
                if i >= lines.len() {
                    // Unterminated at end of input: keep what there is.
                    break;
                }
                value.push('\n');
                current = lines[i];
                i += 1;
            }
            (Cow::Owned(value), "")
        } else if let Some(end) = body.rfind('"') {
            (Cow::Borrowed(&body[..end]), &body[end + 1..])
        } else {
            // An opening quote with no closing one on the line: a value spanning lines
            // under a key not known to do so. Join until a line ends with `"`.
            let mut value = body.to_owned();
            while i < lines.len() {
                let next = lines[i];
                i += 1;
                value.push('\n');
                if let Some(stripped) = next.strip_suffix('"') {
                    value.push_str(stripped);
                    break;
                }
                value.push_str(next);
            }
            (Cow::Owned(value), "")
        };
        doc.entries.push(Entry {
            value: decode(&key, &raw),
            key,
            quoted_key,
            quoted_value: true,
            trailing: trailing.to_owned(),
            line: lineno,
        });
    }
    doc
}

//! `list hdds`, `list -l hdds`, `showmediuminfo` and `showhdinfo`: records of
//! `Label:   value` lines.
//!
//! Labels are padded to 16 columns (22 in the VirtualBox 4.0 layout); multi-valued
//! fields (`Child UUIDs:`, `In use by VMs:`, `Property:`) continue on lines indented with
//! spaces; `list hdds` separates records with an empty line. Values are printed raw
//! (a Windows `Location:` keeps its single backslashes). CRLF is accepted.

use std::path::PathBuf;

use unacloud_core::model::{DiskFormat, DiskInfo, DiskType, Uuid};

use crate::manage::parse::snapshots::normalise_uuid;

/// A VM using a medium (`In use by VMs:` line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediumUser {
    /// The VM's name.
    pub vm: String,
    /// The VM's uuid.
    pub uuid: Option<Uuid>,
    /// Snapshots of that VM the medium is attached in (`[name (UUID: …)]`).
    pub snapshots: Vec<String>,
}

/// One medium record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MediumRecord {
    /// `UUID:`.
    pub uuid: Option<Uuid>,
    /// `Parent UUID:` (`None` for `base` or when absent).
    pub parent: Option<Uuid>,
    /// `State:` (`created`, `locked read`, `inaccessible`, …).
    pub state: Option<String>,
    /// `Type:` verbatim (`normal (base)`, `normal (differencing)`, `multiattach`, …).
    pub type_text: Option<String>,
    /// `Location:`.
    pub location: Option<String>,
    /// `Storage format:`.
    pub format: Option<String>,
    /// `Format variant:`.
    pub variant: Option<String>,
    /// `Capacity:` (or `Logical size:` in the 4.0 layout), MiB.
    pub capacity_mb: Option<u64>,
    /// `Size on disk:` (or `Current size on disk:`), MiB.
    pub size_on_disk_mb: Option<u64>,
    /// `Encryption:`.
    pub encryption: Option<String>,
    /// `Auto-Reset:`.
    pub auto_reset: Option<bool>,
    /// `Accessible:` (4.0 layout).
    pub accessible: Option<bool>,
    /// `Property:` lines (`name=value`).
    pub properties: Vec<(String, String)>,
    /// `In use by VMs:`.
    pub in_use_by: Vec<MediumUser>,
    /// `Child UUIDs:`.
    pub children: Vec<Uuid>,
    /// Labels this parser does not model, with their values.
    pub other: Vec<(String, String)>,
}

impl MediumRecord {
    /// The write mode from `Type:`.
    pub fn disk_type(&self) -> Option<DiskType> {
        let t = self.type_text.as_deref()?;
        let word = t.split_whitespace().next()?;
        word.parse().ok()
    }

    /// Whether `Type:` says the image is a differencing image.
    pub fn is_differencing(&self) -> bool {
        self.parent.is_some()
            || self
                .type_text
                .as_deref()
                .is_some_and(|t| t.contains("differencing"))
    }

    /// The record as the core model's [`DiskInfo`]; `None` without a uuid or location.
    pub fn to_disk_info(&self) -> Option<DiskInfo> {
        Some(DiskInfo {
            uuid: self.uuid?,
            location: PathBuf::from(self.location.as_deref()?),
            format: DiskFormat::parse(self.format.as_deref().unwrap_or("")),
            disk_type: self.disk_type().unwrap_or_default(),
            parent: self.parent,
            logical_size: self.capacity_mb.map(|m| m.saturating_mul(1024 * 1024)),
        })
    }
}

fn mbytes(v: &str) -> Option<u64> {
    v.split_whitespace().next()?.parse().ok()
}

fn yes_no(v: &str) -> Option<bool> {
    match v {
        "yes" | "on" => Some(true),
        "no" | "off" => Some(false),
        _ => None,
    }
}

fn parse_user(v: &str) -> MediumUser {
    // "<vm> (UUID: <uuid>)" optionally followed by " [<snap> (UUID: <uuid>)]…"
    let (head, snaps) = match v.find(") [") {
        Some(i) => (&v[..=i], &v[i + 2..]),
        None => (v, ""),
    };
    let (vm, uuid) = match head.rfind(" (UUID: ") {
        Some(i) => (
            head[..i].to_owned(),
            Uuid::parse_str(&normalise_uuid(
                head[i + " (UUID: ".len()..].trim_end_matches(')'),
            ))
            .ok(),
        ),
        None => (head.to_owned(), None),
    };
    let snapshots = snaps
        .split('[')
        .filter_map(|s| {
            let s = s.trim().trim_end_matches(']');
            let name = s.rfind(" (UUID: ").map_or(s, |i| &s[..i]);
            (!name.is_empty()).then(|| name.to_owned())
        })
        .collect();
    MediumUser {
        vm,
        uuid,
        snapshots,
    }
}

fn apply(rec: &mut MediumRecord, label: &str, value: &str) {
    let v = value.trim();
    match label {
        "UUID" => rec.uuid = Uuid::parse_str(&normalise_uuid(v)).ok(),
        "Parent UUID" => {
            rec.parent = if v == "base" {
                None
            } else {
                Uuid::parse_str(&normalise_uuid(v)).ok()
            }
        }
        "State" => rec.state = Some(v.to_owned()),
        "Type" => rec.type_text = Some(v.to_owned()),
        "Location" => rec.location = Some(v.to_owned()),
        "Storage format" => rec.format = Some(v.to_owned()),
        "Format variant" => rec.variant = Some(v.to_owned()),
        "Capacity" | "Logical size" => rec.capacity_mb = mbytes(v),
        "Size on disk" | "Current size on disk" => rec.size_on_disk_mb = mbytes(v),
        "Encryption" => rec.encryption = Some(v.to_owned()),
        "Auto-Reset" => rec.auto_reset = yes_no(v),
        "Accessible" => rec.accessible = yes_no(v),
        "Property" => {
            let (k, val) = v.split_once('=').unwrap_or((v, ""));
            rec.properties.push((k.to_owned(), val.to_owned()));
        }
        "In use by VMs" => rec.in_use_by.push(parse_user(v)),
        "Child UUIDs" => {
            if let Ok(u) = Uuid::parse_str(&normalise_uuid(v)) {
                rec.children.push(u);
            }
        }
        _ => rec.other.push((label.to_owned(), v.to_owned())),
    }
}

/// Parses one or more medium records. Records end at an empty line or where a new
/// `UUID:` line starts; continuation lines (indented) add values to the previous label.
pub fn parse_media(text: &str) -> Vec<MediumRecord> {
    let mut out = Vec::new();
    let mut cur: Option<MediumRecord> = None;
    let mut last_label: Option<String> = None;
    for raw in text.lines() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            if let Some(r) = cur.take() {
                out.push(r);
            }
            last_label = None;
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if let (Some(r), Some(label)) = (cur.as_mut(), last_label.as_deref()) {
                apply(r, label, line);
            }
            continue;
        }
        let Some((label, value)) = line.split_once(':') else {
            continue;
        };
        let label = label.trim();
        if label == "UUID" {
            if let Some(r) = cur.take() {
                out.push(r);
            }
        }
        let rec = cur.get_or_insert_with(MediumRecord::default);
        apply(rec, label, value);
        last_label = Some(label.to_owned());
    }
    if let Some(r) = cur {
        out.push(r);
    }
    out
}

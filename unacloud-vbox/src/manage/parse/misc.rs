//! The one-line results of `createvm`, `snapshot take`, `clonevm`, `clonemedium` and
//! `--version`.

use std::path::PathBuf;

use unacloud_core::model::Uuid;

use crate::manage::parse::snapshots::normalise_uuid;

/// What `createvm --register` printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedVm {
    /// The name from `Virtual machine '<name>' is created and registered.`
    pub name: Option<String>,
    /// `UUID: <uuid>`.
    pub uuid: Uuid,
    /// `Settings file: '<path>'`.
    pub settings_file: Option<PathBuf>,
}

/// Parses `createvm` output (three lines, unchanged from 4.0 to 7.x).
pub fn parse_createvm(text: &str) -> Option<CreatedVm> {
    let mut name = None;
    let mut uuid = None;
    let mut settings = None;
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("Virtual machine '") {
            name = rest.rfind("' is created").map(|i| rest[..i].to_owned());
        } else if let Some(rest) = line.strip_prefix("UUID: ") {
            uuid = Uuid::parse_str(&normalise_uuid(rest)).ok();
        } else if let Some(rest) = line.strip_prefix("Settings file: '") {
            settings = rest.strip_suffix('\'').map(PathBuf::from);
        }
    }
    Some(CreatedVm {
        name,
        uuid: uuid?,
        settings_file: settings,
    })
}

/// Finds the uuid in `… UUID: <uuid>` on the last line that has one: `Snapshot taken.
/// UUID: …` (`snapshot take`) or `Clone medium created in format 'VMDK'. UUID: …`.
pub fn parse_trailing_uuid(text: &str) -> Option<Uuid> {
    text.lines().rev().find_map(|l| {
        let l = l.trim_end_matches('\r');
        let i = l.rfind("UUID: ")?;
        Uuid::parse_str(&normalise_uuid(&l[i + "UUID: ".len()..])).ok()
    })
}

/// The uuid of a new snapshot from `snapshot take` output.
pub fn parse_snapshot_taken(text: &str) -> Option<Uuid> {
    text.lines()
        .filter(|l| l.contains("Snapshot taken."))
        .find_map(parse_trailing_uuid)
}

/// The clone's name from `Machine has been successfully cloned as "<name>"`.
pub fn parse_cloned(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l
            .trim_end_matches('\r')
            .split_once("successfully cloned as \"")?
            .1;
        rest.strip_suffix('"').map(str::to_owned)
    })
}

/// `<major>.<minor>.<build>[_<tag>]r<revision>[_<tag>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VBoxVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Build number.
    pub build: u32,
    /// Subversion revision.
    pub revision: Option<u32>,
    /// Distribution tags (`Ubuntu`, `OSE`, …).
    pub tags: Vec<String>,
    /// The line as printed.
    pub text: String,
}

/// Parses `VBoxManage --version`: the last non-empty line (a kernel-module `WARNING:`
/// block may precede it on standard output).
pub fn parse_version(text: &str) -> Option<VBoxVersion> {
    let line = text
        .lines()
        .map(|l| l.trim())
        .rfind(|l| !l.is_empty())?
        .to_owned();
    // Split "<ver>[_tag]r<rev>[_tag]".
    let mut tags = Vec::new();
    let digits_end = line
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(line.len());
    let mut nums = line[..digits_end].split('.');
    let major = nums.next()?.parse().ok()?;
    let minor = nums.next()?.parse().ok()?;
    let build = nums.next()?.parse().ok()?;
    let mut rest = &line[digits_end..];
    if let Some(t) = rest.strip_prefix('_') {
        let end = t
            .rfind('r')
            .filter(|i| t[i + 1..].starts_with(|c: char| c.is_ascii_digit()));
        let (tag, after) = match end {
            Some(i) => (&t[..i], &t[i..]),
            None => (t, ""),
        };
        tags.push(tag.to_owned());
        rest = after;
    }
    let mut revision = None;
    if let Some(r) = rest.strip_prefix('r') {
        let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
        revision = r[..end].parse().ok();
        if let Some(t) = r[end..].strip_prefix('_') {
            tags.push(t.to_owned());
        }
    }
    Some(VBoxVersion {
        major,
        minor,
        build,
        revision,
        tags,
        text: line,
    })
}

//! `list vms` / `list runningvms`: one `"<name>" {<uuid>}` line per VM.
//!
//! The name is printed without any escaping (a name containing `"` is ambiguous), so
//! the parser anchors on the trailing ` {uuid}`. Inaccessible VMs appear as
//! `"<inaccessible>" {uuid}`. Lines that do not match — kernel-module warnings are
//! printed on standard output with exit code 0 — are ignored.

use unacloud_core::model::Uuid;

/// One line of `list vms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmListEntry {
    /// The VM's name (`<inaccessible>` for an inaccessible VM).
    pub name: String,
    /// The VM's uuid.
    pub uuid: Uuid,
}

impl VmListEntry {
    /// Whether VirtualBox printed the placeholder name of an inaccessible VM.
    pub fn is_inaccessible(&self) -> bool {
        self.name == "<inaccessible>"
    }
}

/// Parses `list vms` or `list runningvms` output.
pub fn parse_vm_list(text: &str) -> Vec<VmListEntry> {
    text.lines()
        .filter_map(|raw| {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let rest = line.strip_prefix('"')?;
            let brace = rest.rfind(" {")?;
            let uuid_part = rest[brace + 2..].strip_suffix('}')?;
            let name = rest[..brace].strip_suffix('"')?;
            let uuid = Uuid::parse_str(uuid_part).ok()?;
            Some(VmListEntry {
                name: name.to_owned(),
                uuid,
            })
        })
        .collect()
}

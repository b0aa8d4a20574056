//! Writes `.vbox` documents for tests, following `VirtualBox-settings.xsd`: media
//! nested by differencing parent, the root snapshot under `<Machine>` and its
//! children in `<Snapshots>`, controllers beside `<Hardware>` before 1.17 and inside
//! it from 1.17 on.
#![allow(dead_code, clippy::unwrap_used)]

use std::fmt::Write as _;

/// A hard disk to register.
#[derive(Clone, Debug)]
pub struct Disk {
    pub uuid: String,
    pub location: String,
    pub disk_type: Option<&'static str>,
    pub parent: Option<usize>,
    pub auto_reset: bool,
}

/// A device attachment: (device type, image uuid).
pub type Attach = (&'static str, String);

/// A snapshot to write.
#[derive(Clone, Debug)]
pub struct Snap {
    pub uuid: String,
    pub name: String,
    pub state_file: Option<String>,
    pub parent: Option<usize>,
    pub attach: Vec<Attach>,
}

/// A machine document.
#[derive(Clone, Debug)]
pub struct VboxDoc {
    pub version: &'static str,
    pub namespace: Option<&'static str>,
    pub uuid: String,
    pub name: String,
    pub state_file: Option<String>,
    pub current: Option<usize>,
    pub disks: Vec<Disk>,
    pub dvds: Vec<(String, String)>,
    pub snaps: Vec<Snap>,
    pub attach: Vec<Attach>,
}

pub fn uuid(kind: u32, n: u32) -> String {
    format!("{kind:08x}-0000-4000-8000-{n:012x}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl VboxDoc {
    pub fn new(name: &str) -> Self {
        VboxDoc {
            version: "1.19-windows",
            namespace: Some("http://www.virtualbox.org/"),
            uuid: uuid(0xfeed, 1),
            name: name.to_owned(),
            state_file: None,
            current: None,
            disks: Vec::new(),
            dvds: Vec::new(),
            snaps: Vec::new(),
            attach: Vec::new(),
        }
    }

    fn inside(&self) -> bool {
        let minor: u32 = self.version[2..4].parse().unwrap();
        minor >= 17
    }

    fn controllers(&self, out: &mut String, attach: &[Attach], indent: &str) {
        let _ = writeln!(out, "{indent}<StorageControllers>");
        let _ = writeln!(
            out,
            "{indent}  <StorageController name=\"SATA\" type=\"AHCI\" PortCount=\"30\" useHostIOCache=\"false\" Bootable=\"true\">"
        );
        for (port, (ty, u)) in attach.iter().enumerate() {
            let _ = writeln!(
                out,
                "{indent}    <AttachedDevice type=\"{ty}\" hotpluggable=\"false\" port=\"{port}\" device=\"0\">\n{indent}      <Image uuid=\"{{{u}}}\"/>\n{indent}    </AttachedDevice>"
            );
        }
        let _ = writeln!(
            out,
            "{indent}  </StorageController>\n{indent}</StorageControllers>"
        );
    }

    fn hardware(&self, out: &mut String, attach: &[Attach], indent: &str) {
        let _ = writeln!(
            out,
            "{indent}<Hardware>\n{indent}  <CPU count=\"1\"/>\n{indent}  <Memory RAMSize=\"1024\"/>\n{indent}  <Network>\n{indent}    <Adapter slot=\"0\" enabled=\"true\" MACAddress=\"0800271A2B3C\" type=\"82540EM\">\n{indent}      <BridgedInterface name=\"eth0\"/>\n{indent}    </Adapter>\n{indent}  </Network>"
        );
        if self.inside() {
            self.controllers(out, attach, &format!("{indent}  "));
            let _ = writeln!(out, "{indent}</Hardware>");
        } else {
            let _ = writeln!(out, "{indent}</Hardware>");
            self.controllers(out, attach, indent);
        }
    }

    fn children_of(&self, parents: impl Iterator<Item = Option<usize>>) -> Vec<Vec<usize>> {
        let parents: Vec<_> = parents.collect();
        let mut ch = vec![Vec::new(); parents.len()];
        for (i, p) in parents.iter().enumerate() {
            if let Some(p) = p {
                ch[*p].push(i);
            }
        }
        ch
    }

    /// Writes the snapshot tree below `root` without recursion (deep trees are tested);
    /// indentation stops growing after 16 levels.
    fn snapshot(&self, out: &mut String, root: usize, depth: usize) {
        let children = self.children_of(self.snaps.iter().map(|s| s.parent));
        // (snapshot, depth, opened?)
        let mut stack = vec![(root, depth, false)];
        while let Some((i, d, opened)) = stack.pop() {
            let indent = "  ".repeat(d.min(16));
            let s = &self.snaps[i];
            if opened {
                if !children[i].is_empty() {
                    let _ = writeln!(out, "{indent}  </Snapshots>");
                }
                let _ = writeln!(out, "{indent}</Snapshot>");
                continue;
            }
            let _ = write!(
                out,
                "{indent}<Snapshot uuid=\"{{{}}}\" name=\"{}\" timeStamp=\"2024-01-0{}T00:00:00Z\"",
                s.uuid,
                esc(&s.name),
                1 + i % 9
            );
            if let Some(sf) = &s.state_file {
                let _ = write!(out, " stateFile=\"{}\"", esc(sf));
            }
            let _ = writeln!(out, ">");
            self.hardware(out, &s.attach, &format!("{indent}  "));
            stack.push((i, d, true));
            if !children[i].is_empty() {
                let _ = writeln!(out, "{indent}  <Snapshots>");
                for &c in children[i].iter().rev() {
                    stack.push((c, d + 2, false));
                }
            }
        }
    }

    /// Writes the disk tree below `root` without recursion.
    fn disk(&self, out: &mut String, root: usize, depth: usize) {
        let children = self.children_of(self.disks.iter().map(|d| d.parent));
        let mut stack = vec![(root, depth, false)];
        while let Some((i, dep, opened)) = stack.pop() {
            let indent = "  ".repeat(dep.min(16));
            if opened {
                let _ = writeln!(out, "{indent}</HardDisk>");
                continue;
            }
            let d = &self.disks[i];
            let _ = write!(
                out,
                "{indent}<HardDisk uuid=\"{{{}}}\" location=\"{}\" format=\"VDI\"",
                d.uuid,
                esc(&d.location)
            );
            if let Some(t) = d.disk_type {
                let _ = write!(out, " type=\"{t}\"");
            }
            if d.auto_reset {
                let _ = write!(out, " autoReset=\"true\"");
            }
            if children[i].is_empty() {
                let _ = writeln!(out, "/>");
            } else {
                let _ = writeln!(out, ">");
                stack.push((i, dep, true));
                for &c in children[i].iter().rev() {
                    stack.push((c, dep + 1, false));
                }
            }
        }
    }

    pub fn media_registry(&self, out: &mut String, depth: usize) {
        let indent = "  ".repeat(depth);
        let _ = writeln!(out, "{indent}<MediaRegistry>\n{indent}  <HardDisks>");
        for i in 0..self.disks.len() {
            if self.disks[i].parent.is_none() {
                self.disk(out, i, depth + 2);
            }
        }
        let _ = writeln!(out, "{indent}  </HardDisks>");
        if !self.dvds.is_empty() {
            let _ = writeln!(out, "{indent}  <DVDImages>");
            for (u, l) in &self.dvds {
                let _ = writeln!(
                    out,
                    "{indent}    <Image uuid=\"{{{u}}}\" location=\"{}\"/>",
                    esc(l)
                );
            }
            let _ = writeln!(out, "{indent}  </DVDImages>");
        }
        let _ = writeln!(out, "{indent}</MediaRegistry>");
    }

    pub fn to_xml(&self) -> String {
        let mut out = String::from("<?xml version=\"1.0\"?>\n<!-- DO NOT EDIT THIS FILE. -->\n");
        match self.namespace {
            Some(ns) => {
                let _ = writeln!(
                    out,
                    "<VirtualBox xmlns=\"{ns}\" version=\"{}\">",
                    self.version
                );
            }
            None => {
                let _ = writeln!(out, "<VirtualBox version=\"{}\">", self.version);
            }
        }
        let _ = write!(
            out,
            "  <Machine uuid=\"{{{}}}\" name=\"{}\" OSType=\"Ubuntu_64\" snapshotFolder=\"Snapshots\"",
            self.uuid,
            esc(&self.name)
        );
        if let Some(c) = self.current {
            let _ = write!(out, " currentSnapshot=\"{{{}}}\"", self.snaps[c].uuid);
        }
        if let Some(sf) = &self.state_file {
            let _ = write!(out, " stateFile=\"{}\"", esc(sf));
        }
        let _ = writeln!(out, ">");
        self.media_registry(&mut out, 2);
        if let Some(root) = (0..self.snaps.len()).find(|&i| self.snaps[i].parent.is_none()) {
            self.snapshot(&mut out, root, 2);
        }
        self.hardware(&mut out, &self.attach, "    ");
        out.push_str("  </Machine>\n</VirtualBox>\n");
        out
    }
}

/// A global registry (`VirtualBox.xml`) holding `disks`.
pub fn global_xml(disks: &[Disk]) -> String {
    let doc = VboxDoc {
        disks: disks.to_vec(),
        ..VboxDoc::new("unused")
    };
    let mut out = String::from(
        "<?xml version=\"1.0\"?>\n<VirtualBox xmlns=\"http://www.virtualbox.org/\" version=\"1.12-windows\">\n  <Global>\n    <MachineRegistry/>\n",
    );
    doc.media_registry(&mut out, 2);
    out.push_str("  </Global>\n</VirtualBox>\n");
    out
}

/// The thesis's worked example (Tables 5.2-5.4): one disk, four snapshots taken while
/// running. Disk `i` (0 = base) is attached in snapshot `i+1`; disk 4 is the current
/// state's.
pub fn thesis_example() -> VboxDoc {
    let mut doc = VboxDoc::new("TM");
    for i in 0..5u32 {
        doc.disks.push(Disk {
            uuid: uuid(0xd15c, i),
            location: if i == 0 {
                "TM.vdi".into()
            } else {
                format!("Snapshots/{{{}}}.vdi", uuid(0xd15c, i))
            },
            disk_type: (i == 0).then_some("Normal"),
            parent: (i > 0).then(|| i as usize - 1),
            auto_reset: false,
        });
    }
    for i in 0..4u32 {
        doc.snaps.push(Snap {
            uuid: uuid(0x5a95, i + 1),
            name: format!("Snapshot {}", i + 1),
            state_file: Some(format!(
                "Snapshots/2024-01-0{}T00-00-00-000000000Z.sav",
                i + 1
            )),
            parent: (i > 0).then(|| i as usize - 1),
            attach: vec![("HardDisk", uuid(0xd15c, i))],
        });
    }
    doc.current = Some(3);
    doc.attach = vec![("HardDisk", uuid(0xd15c, 4))];
    doc
}

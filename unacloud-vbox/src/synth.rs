//! Deterministic generator of realistic VirtualBox machines, for benchmarks, fuzz seeds
//! and end-to-end tests.
//!
//! Unstable (feature `__synth`): a helper of this project's tests and benchmarks, not
//! public API; it may change or go in any release.
//!
//! [`generate`] writes a `.vbox` document the way VirtualBox 6.1/7.x does (namespace
//! `http://www.virtualbox.org/`, two-space indentation, `DO NOT EDIT` banner, element
//! and attribute order as in real files) for a machine with `N` snapshots and `D` hard
//! disks:
//!
//! * the snapshot tree is a chain or a seeded branching tree; the root `<Snapshot>` is
//!   a child of `<Machine>` and children nest in `<Snapshots>`;
//! * every disk has a base image and one differencing image per non-root snapshot plus
//!   one for the current state, nested in the media registry exactly like the
//!   snapshot tree (the image a snapshot freezes is the child of the image its parent
//!   snapshot froze; the current state's image is the child of the current
//!   snapshot's), so every disk has `N + 1` images;
//! * snapshots taken while running carry a `.sav` `stateFile`, named by time stamp;
//! * settings 1.19 put `<StorageControllers>` inside `<Hardware>`, 1.16 beside it.
//!
//! Everything derives from [`SynthSpec::seed`]: the same spec gives the same bytes.
//! [`SynthMachine::write_files`] also creates the files on disk (sparse `.sav` files
//! and VDI images whose headers carry the registry's UUIDs and parent links).
//!
//! ```
//! use unacloud_vbox::synth::{generate, SynthSpec, TreeShape};
//! use unacloud_vbox::settings::MachineSettings;
//!
//! let spec = SynthSpec { snapshots: 20, disks: 2, shape: TreeShape::Tree { branch_percent: 20 }, ..SynthSpec::default() };
//! let machine = generate(&spec);
//! let parsed = MachineSettings::parse_str(&machine.xml).unwrap();
//! assert_eq!(parsed.snapshots.len(), 20);
//! assert_eq!(parsed.media.hard_disks.len(), 2 * 21);
//! assert_eq!(generate(&spec).xml, machine.xml); // deterministic
//! ```

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::vdi::VdiHeader;

/// VirtualBox refuses to take a snapshot deeper than this (`SETTINGS_SNAPSHOT_DEPTH_MAX`).
pub const VIRTUALBOX_MAX_SNAPSHOT_DEPTH: usize = 250;

/// Shape of the snapshot tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeShape {
    /// Each snapshot is the child of the previous one. Beyond
    /// [`VIRTUALBOX_MAX_SNAPSHOT_DEPTH`] snapshots this is deeper than VirtualBox
    /// itself allows; useful to test parsers, not realistic.
    Chain,
    /// Mostly a chain, but each new snapshot is, with probability `branch_percent`%,
    /// taken after restoring a random earlier snapshot (which starts a branch). Depth
    /// stays within [`VIRTUALBOX_MAX_SNAPSHOT_DEPTH`].
    Tree {
        /// Chance in percent (0–100) that a snapshot starts a new branch.
        branch_percent: u8,
    },
}

/// Settings-file layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingsStyle {
    /// `version="1.16-linux"`: `<StorageControllers>` beside `<Hardware>` (VirtualBox 6.0/6.1).
    V1_16,
    /// `version="1.19-windows"`: `<StorageControllers>` inside `<Hardware>` (VirtualBox 7.0).
    V1_19,
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSpec {
    /// Machine name (also the `.vbox` and base disk file names).
    pub name: String,
    /// Number of snapshots.
    pub snapshots: usize,
    /// Number of hard disks (0 gives a machine without disks).
    pub disks: usize,
    /// Tree shape.
    pub shape: TreeShape,
    /// Chance in percent that a snapshot was taken while running (has a `.sav`).
    pub saved_state_percent: u8,
    /// Whether the machine itself is in saved state (`<Machine stateFile=…>`).
    pub machine_saved: bool,
    /// Layout.
    pub style: SettingsStyle,
    /// Seed for uuids, branching, time stamps.
    pub seed: u64,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            name: "TM".into(),
            snapshots: 4,
            disks: 1,
            shape: TreeShape::Chain,
            saved_state_percent: 100,
            machine_saved: false,
            style: SettingsStyle::V1_19,
            seed: 1,
        }
    }
}

/// Role of a generated file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthRole {
    /// The `.vbox`.
    Settings,
    /// A base disk image.
    BaseDisk,
    /// A differencing disk image.
    DiffDisk,
    /// A saved state.
    SavedState,
}

/// One hard disk image of a generated machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthDisk {
    /// Its uuid.
    pub uuid: Uuid,
    /// Index of the parent image in [`SynthMachine::disks`].
    pub parent: Option<usize>,
    /// Which of the machine's disks (0-based) it belongs to.
    pub disk: usize,
    /// `location` as written (relative to the machine folder).
    pub location: String,
}

/// One snapshot of a generated machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSnapshot {
    /// Its uuid.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// Index of the parent snapshot.
    pub parent: Option<usize>,
    /// Depth (root = 1).
    pub depth: usize,
    /// `stateFile` as written, if taken while running.
    pub state_file: Option<String>,
    /// Index in [`SynthMachine::disks`] of the image attached per machine disk.
    pub attached: Vec<usize>,
}

/// A generated machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthMachine {
    /// The `.vbox` document.
    pub xml: String,
    /// File name of the `.vbox`.
    pub settings_file: String,
    /// Machine uuid.
    pub uuid: Uuid,
    /// Snapshots, in creation order (index 0 is the root).
    pub snapshots: Vec<SynthSnapshot>,
    /// Hard disk images, in creation order (bases first).
    pub disks: Vec<SynthDisk>,
    /// Index of the current snapshot (the most recent one).
    pub current_snapshot: Option<usize>,
    /// Images attached in the current state, per machine disk.
    pub current_attached: Vec<usize>,
    /// The machine's own `stateFile`, if saved.
    pub state_file: Option<String>,
}

/// Sizes of the files [`SynthMachine::write_files`] creates (all sparse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSizes {
    /// Virtual size of every disk.
    pub virtual_size: u64,
    /// File length of each base image (at least the VDI header and block map).
    pub base: u64,
    /// File length of each differencing image.
    pub diff: u64,
    /// File length of each `.sav`.
    pub saved_state: u64,
}

impl Default for FileSizes {
    fn default() -> Self {
        FileSizes {
            virtual_size: 64 << 20,
            base: 0,
            diff: 0,
            saved_state: 4096,
        }
    }
}

impl SynthMachine {
    /// Index chain of an image up to its base, base first.
    pub fn chain(&self, image: usize) -> Vec<usize> {
        let mut out = vec![image];
        let mut cur = image;
        while let Some(p) = self.disks.get(cur).and_then(|d| d.parent) {
            out.push(p);
            cur = p;
        }
        out.reverse();
        out
    }

    /// Every file of the machine as `(relative path, role)`: settings, images, saved
    /// states (de-duplicated).
    pub fn files(&self) -> Vec<(String, SynthRole)> {
        let mut out = vec![(self.settings_file.clone(), SynthRole::Settings)];
        for d in &self.disks {
            let role = if d.parent.is_some() {
                SynthRole::DiffDisk
            } else {
                SynthRole::BaseDisk
            };
            out.push((d.location.clone(), role));
        }
        let mut seen = std::collections::HashSet::new();
        for sav in self
            .snapshots
            .iter()
            .filter_map(|s| s.state_file.as_ref())
            .chain(self.state_file.as_ref())
        {
            if seen.insert(sav.clone()) {
                out.push((sav.clone(), SynthRole::SavedState));
            }
        }
        out
    }

    /// Write the `.vbox`, VDI images (headers with this machine's uuids and parent
    /// links, sparse to the given lengths) and sparse `.sav` files into `dir` (created
    /// if needed). Returns the `.vbox` path.
    pub fn write_files(&self, dir: &Path, sizes: &FileSizes) -> Result<PathBuf> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        fs::create_dir_all(dir.join("Snapshots")).map_err(io(dir))?;
        let settings = dir.join(&self.settings_file);
        fs::write(&settings, &self.xml).map_err(io(&settings))?;
        let mut headers: Vec<VdiHeader> = Vec::with_capacity(self.disks.len());
        for d in &self.disks {
            let header = match d.parent {
                None => VdiHeader::new_base(sizes.virtual_size, d.uuid),
                Some(p) => VdiHeader::new_differencing(
                    sizes.virtual_size,
                    d.uuid,
                    self.disks[p].uuid,
                    headers[p].modification_uuid,
                ),
            };
            let path = dir.join(&d.location);
            header.write_empty_image(&path)?;
            let want = if d.parent.is_some() {
                sizes.diff
            } else {
                sizes.base
            };
            let file = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            let len = file.metadata().map_err(io(&path))?.len();
            if want > len {
                file.set_len(want).map_err(io(&path))?;
            }
            headers.push(header);
        }
        for (rel, role) in self.files() {
            if role == SynthRole::SavedState {
                let path = dir.join(&rel);
                let file = fs::File::create(&path).map_err(io(&path))?;
                file.set_len(sizes.saved_state).map_err(io(&path))?;
            }
        }
        Ok(settings)
    }
}

/// SplitMix64: small, fast, good enough for test data, and stable across versions.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn percent(&mut self, p: u8) -> bool {
        self.below(100) < u64::from(p)
    }

    fn uuid(&mut self) -> Uuid {
        let bytes = (u128::from(self.next()) << 64 | u128::from(self.next())).to_be_bytes();
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }
}

/// Generate a machine.
pub fn generate(spec: &SynthSpec) -> SynthMachine {
    let mut rng = Rng(spec.seed ^ 0x756e_6163_6c6f_7564);
    let uuid = rng.uuid();
    // Snapshot tree.
    let mut snapshots: Vec<SynthSnapshot> = Vec::with_capacity(spec.snapshots);
    let mut time = 1_704_096_000u64 + rng.below(86_400 * 365); // during 2024
    let mut times = Vec::with_capacity(spec.snapshots);
    for i in 0..spec.snapshots {
        let parent = if i == 0 {
            None
        } else {
            match spec.shape {
                TreeShape::Chain => Some(i - 1),
                TreeShape::Tree { branch_percent } => {
                    let mut p = if rng.percent(branch_percent) {
                        rng.below(i as u64) as usize
                    } else {
                        i - 1
                    };
                    while snapshots[p].depth >= VIRTUALBOX_MAX_SNAPSHOT_DEPTH {
                        p = rng.below(i as u64) as usize;
                    }
                    Some(p)
                }
            }
        };
        time += 60 + rng.below(3 * 86_400);
        times.push(time);
        let state_file = rng
            .percent(spec.saved_state_percent)
            .then(|| format!("Snapshots/{}.sav", sav_stamp(time, &mut rng)));
        snapshots.push(SynthSnapshot {
            uuid: rng.uuid(),
            name: format!("Snapshot {}", i + 1),
            parent,
            depth: parent.map_or(1, |p| snapshots[p].depth + 1),
            state_file,
            attached: Vec::new(),
        });
    }
    // Disks: a base per machine disk, then one child per non-root snapshot, then the
    // current state's image.
    let mut disks: Vec<SynthDisk> = Vec::with_capacity(spec.disks * (spec.snapshots + 1));
    for d in 0..spec.disks {
        let location = if d == 0 {
            format!("{}.vdi", spec.name)
        } else {
            format!("{}_{d}.vdi", spec.name)
        };
        disks.push(SynthDisk {
            uuid: rng.uuid(),
            parent: None,
            disk: d,
            location,
        });
    }
    for i in 0..snapshots.len() {
        let parent = snapshots[i]
            .parent
            .map(|p| snapshots[p].attached.as_slice());
        snapshots[i].attached = attach_below(parent, spec.disks, &mut disks, &mut rng);
    }
    let current_snapshot = snapshots.len().checked_sub(1);
    let current_attached = attach_below(
        current_snapshot.map(|c| snapshots[c].attached.as_slice()),
        spec.disks,
        &mut disks,
        &mut rng,
    );
    let last_change = time + 60 + rng.below(86_400);
    let state_file = spec
        .machine_saved
        .then(|| format!("Snapshots/{}.sav", sav_stamp(last_change, &mut rng)));
    let mut m = SynthMachine {
        xml: String::new(),
        settings_file: format!("{}.vbox", spec.name),
        uuid,
        snapshots,
        disks,
        current_snapshot,
        current_attached,
        state_file,
    };
    m.xml = render(spec, &m, &times, last_change, &mut rng);
    m
}

/// The images a state sees: the `disk_count` base images when it hangs below no
/// snapshot, else a new differencing child of each image its parent snapshot saw
/// (`parent_attached`).
fn attach_below(
    parent_attached: Option<&[usize]>,
    disk_count: usize,
    disks: &mut Vec<SynthDisk>,
    rng: &mut Rng,
) -> Vec<usize> {
    let Some(parent_attached) = parent_attached else {
        return (0..disk_count).collect();
    };
    parent_attached
        .iter()
        .map(|&parent| {
            let u = rng.uuid();
            disks.push(SynthDisk {
                uuid: u,
                parent: Some(parent),
                disk: disks[parent].disk,
                location: format!("Snapshots/{{{u}}}.vdi"),
            });
            disks.len() - 1
        })
        .collect()
}

/// Writer with VirtualBox's indentation.
struct Out {
    s: String,
}

impl Out {
    fn line(&mut self, depth: usize, text: &str) {
        for _ in 0..depth {
            self.s.push_str("  ");
        }
        self.s.push_str(text);
        self.s.push('\n');
    }
}

fn render(
    spec: &SynthSpec,
    m: &SynthMachine,
    times: &[u64],
    last_change: u64,
    rng: &mut Rng,
) -> String {
    let per_snapshot = 2600 + 300 * spec.disks;
    let mut out = Out {
        s: String::with_capacity(4096 + per_snapshot * (m.snapshots.len() + 1)),
    };
    let (version, windows) = match spec.style {
        SettingsStyle::V1_16 => ("1.16-linux", false),
        SettingsStyle::V1_19 => ("1.19-windows", true),
    };
    out.s.push_str(concat!(
        "<?xml version=\"1.0\"?>\n",
        "<!--\n",
        "** DO NOT EDIT THIS FILE.\n",
        "** If you make changes to this file while any VirtualBox related application\n",
        "** is running, your changes will be overwritten later, without taking effect.\n",
        "** Use VBoxManage or the VirtualBox Manager GUI to make changes.\n",
        "-->\n"
    ));
    out.line(
        0,
        &format!("<VirtualBox xmlns=\"http://www.virtualbox.org/\" version=\"{version}\">"),
    );
    let mut machine = format!(
        "<Machine uuid=\"{{{}}}\" name=\"{}\" OSType=\"Ubuntu_64\"",
        m.uuid,
        escape(&spec.name)
    );
    if let Some(sf) = &m.state_file {
        let _ = write!(machine, " stateFile=\"{}\"", escape(sf));
    }
    if let Some(c) = m.current_snapshot {
        let _ = write!(machine, " currentSnapshot=\"{{{}}}\"", m.snapshots[c].uuid);
    }
    let _ = write!(
        machine,
        " snapshotFolder=\"Snapshots\" lastStateChange=\"{}\">",
        iso_time(last_change)
    );
    out.line(1, &machine);
    // Media registry: each base with its differencing descendants nested.
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); m.disks.len()];
    for (i, d) in m.disks.iter().enumerate() {
        if let Some(p) = d.parent {
            children[p].push(i);
        }
    }
    if !m.disks.is_empty() {
        out.line(2, "<MediaRegistry>");
        out.line(3, "<HardDisks>");
        for (i, d) in m.disks.iter().enumerate() {
            if d.parent.is_none() {
                render_disk(&mut out, m, &children, i, 4);
            }
        }
        out.line(3, "</HardDisks>");
        out.line(2, "</MediaRegistry>");
    }
    out.line(2, "<ExtraData>");
    out.line(
        3,
        "<ExtraDataItem name=\"GUI/LastCloseAction\" value=\"PowerOff\"/>",
    );
    out.line(
        3,
        "<ExtraDataItem name=\"GUI/LastNormalWindowPosition\" value=\"640,278,800,600\"/>",
    );
    out.line(2, "</ExtraData>");
    // Snapshots, depth-first, without recursion (trees may be thousands deep).
    let mut snap_children: Vec<Vec<usize>> = vec![Vec::new(); m.snapshots.len()];
    for (i, s) in m.snapshots.iter().enumerate() {
        if let Some(p) = s.parent {
            snap_children[p].push(i);
        }
    }
    let hw = HardwareText::new(spec, rng);
    if !m.snapshots.is_empty() {
        enum Step {
            Open(usize, usize),
            Close(usize, usize),
        }
        let mut stack = vec![Step::Open(0, 2)];
        while let Some(step) = stack.pop() {
            match step {
                Step::Open(i, depth) => {
                    let s = &m.snapshots[i];
                    let mut tag = format!(
                        "<Snapshot uuid=\"{{{}}}\" name=\"{}\" timeStamp=\"{}\"",
                        s.uuid,
                        escape(&s.name),
                        iso_time(times[i])
                    );
                    if let Some(sf) = &s.state_file {
                        let _ = write!(tag, " stateFile=\"{}\"", escape(sf));
                    }
                    tag.push('>');
                    out.line(depth, &tag);
                    if i % 10 == 9 {
                        out.line(
                            depth + 1,
                            &format!(
                                "<Description>Checkpoint {} &amp; notes: \"lab &lt;{}&gt;\"</Description>",
                                i + 1,
                                i % 7
                            ),
                        );
                    }
                    hw.render(&mut out, depth + 1, &s.attached, m, times[i], windows);
                    let kids = &snap_children[i];
                    stack.push(Step::Close(i, depth));
                    if !kids.is_empty() {
                        out.line(depth + 1, "<Snapshots>");
                        for &k in kids.iter().rev() {
                            stack.push(Step::Open(k, depth + 2));
                        }
                    }
                }
                Step::Close(i, depth) => {
                    if !snap_children[i].is_empty() {
                        out.line(depth + 1, "</Snapshots>");
                    }
                    out.line(depth, "</Snapshot>");
                }
            }
        }
    }
    hw.render(&mut out, 2, &m.current_attached, m, last_change, windows);
    out.line(1, "</Machine>");
    out.line(0, "</VirtualBox>");
    out.s
}

fn render_disk(
    out: &mut Out,
    m: &SynthMachine,
    children: &[Vec<usize>],
    root: usize,
    depth: usize,
) {
    enum Step {
        Open(usize, usize),
        Close(usize),
    }
    let mut stack = vec![Step::Open(root, depth)];
    while let Some(step) = stack.pop() {
        match step {
            Step::Open(i, depth) => {
                let d = &m.disks[i];
                let ty = if d.parent.is_none() {
                    " type=\"Normal\""
                } else {
                    ""
                };
                let head = format!(
                    "<HardDisk uuid=\"{{{}}}\" location=\"{}\" format=\"VDI\"{ty}",
                    d.uuid,
                    escape(&d.location)
                );
                if children[i].is_empty() {
                    out.line(depth, &format!("{head}/>"));
                } else {
                    out.line(depth, &format!("{head}>"));
                    stack.push(Step::Close(depth));
                    for &k in children[i].iter().rev() {
                        stack.push(Step::Open(k, depth + 1));
                    }
                }
            }
            Step::Close(depth) => out.line(depth, "</HardDisk>"),
        }
    }
}

/// The per-state `<Hardware>` block (same machine configuration in every snapshot,
/// as when nobody changes settings between snapshots).
struct HardwareText {
    mac: String,
    cpus: u32,
    ram: u32,
    language: &'static str,
    style: SettingsStyle,
    disks: usize,
}

impl HardwareText {
    fn new(spec: &SynthSpec, rng: &mut Rng) -> Self {
        let languages = ["en_US", "es_CO", "de_DE", "pt_BR"];
        HardwareText {
            mac: format!("080027{:06X}", rng.below(1 << 24)),
            cpus: 1 << rng.below(3),
            ram: 1024 << rng.below(3),
            language: languages[rng.below(languages.len() as u64) as usize],
            style: spec.style,
            disks: spec.disks,
        }
    }

    fn render(
        &self,
        out: &mut Out,
        d: usize,
        attached: &[usize],
        m: &SynthMachine,
        time: u64,
        windows: bool,
    ) {
        let stamp = time * 1_000_000_000 + 123_456_700;
        out.line(d, "<Hardware>");
        match self.style {
            SettingsStyle::V1_19 => out.line(d + 1, &format!("<CPU count=\"{}\">", self.cpus)),
            SettingsStyle::V1_16 => out.line(d + 1, "<CPU>"),
        }
        out.line(d + 2, "<PAE enabled=\"true\"/>");
        out.line(d + 2, "<LongMode enabled=\"true\"/>");
        out.line(d + 2, "<X2APIC enabled=\"true\"/>");
        out.line(d + 2, "<HardwareVirtExLargePages enabled=\"true\"/>");
        out.line(d + 1, "</CPU>");
        out.line(d + 1, &format!("<Memory RAMSize=\"{}\"/>", self.ram));
        out.line(d + 1, "<HID Pointing=\"USBTablet\"/>");
        out.line(d + 1, "<Display controller=\"VMSVGA\" VRAMSize=\"16\"/>");
        out.line(d + 1, "<BIOS>");
        out.line(d + 2, "<IOAPIC enabled=\"true\"/>");
        out.line(d + 2, "<SmbiosUuidLittleEndian enabled=\"true\"/>");
        out.line(d + 1, "</BIOS>");
        out.line(d + 1, "<USB>");
        out.line(d + 2, "<Controllers>");
        out.line(d + 3, "<Controller name=\"OHCI\" type=\"OHCI\"/>");
        out.line(d + 2, "</Controllers>");
        out.line(d + 1, "</USB>");
        out.line(d + 1, "<Network>");
        out.line(
            d + 2,
            &format!(
                "<Adapter slot=\"0\" enabled=\"true\" MACAddress=\"{}\" type=\"82540EM\">",
                self.mac
            ),
        );
        match self.style {
            SettingsStyle::V1_19 => out.line(d + 3, "<NAT localhost-reachable=\"true\"/>"),
            SettingsStyle::V1_16 => out.line(d + 3, "<NAT/>"),
        }
        out.line(d + 2, "</Adapter>");
        out.line(d + 1, "</Network>");
        if windows {
            out.line(
                d + 1,
                "<AudioAdapter codec=\"AD1980\" useDefault=\"true\" driver=\"WAS\" enabled=\"true\" enabledOut=\"true\"/>",
            );
        } else {
            out.line(
                d + 1,
                "<AudioAdapter driver=\"Pulse\" enabled=\"true\" enabledIn=\"false\"/>",
            );
        }
        out.line(d + 1, "<RTC localOrUTC=\"UTC\"/>");
        out.line(d + 1, "<Clipboard/>");
        out.line(d + 1, "<GuestProperties>");
        out.line(
            d + 2,
            &format!(
                "<GuestProperty name=\"/VirtualBox/HostInfo/GUI/LanguageID\" value=\"{}\" timestamp=\"{}\" flags=\"RDONLYGUEST\"/>",
                self.language, stamp
            ),
        );
        for (name, value, k) in [
            ("VBoxRev", "163906", 2),
            ("VBoxVer", "7.0.20", 0),
            ("VBoxVerExt", "7.0.20", 1),
        ] {
            out.line(
                d + 2,
                &format!(
                    "<GuestProperty name=\"/VirtualBox/HostInfo/{name}\" value=\"{value}\" timestamp=\"{}\" flags=\"TRANSIENT, RDONLYGUEST\"/>",
                    stamp - 400_000_000 + k
                ),
            );
        }
        out.line(d + 1, "</GuestProperties>");
        match self.style {
            SettingsStyle::V1_19 => {
                self.controllers(out, d + 1, attached, m);
                out.line(d, "</Hardware>");
            }
            SettingsStyle::V1_16 => {
                out.line(d, "</Hardware>");
                self.controllers(out, d, attached, m);
            }
        }
    }

    fn controllers(&self, out: &mut Out, d: usize, attached: &[usize], m: &SynthMachine) {
        out.line(d, "<StorageControllers>");
        out.line(
            d + 1,
            "<StorageController name=\"IDE\" type=\"PIIX4\" PortCount=\"2\" useHostIOCache=\"true\" Bootable=\"true\">",
        );
        out.line(
            d + 2,
            "<AttachedDevice passthrough=\"false\" type=\"DVD\" hotpluggable=\"false\" port=\"1\" device=\"0\"/>",
        );
        out.line(d + 1, "</StorageController>");
        if self.disks > 0 {
            out.line(
                d + 1,
                &format!(
                    "<StorageController name=\"SATA\" type=\"AHCI\" PortCount=\"{}\" useHostIOCache=\"false\" Bootable=\"true\" IDE0MasterEmulationPort=\"0\" IDE0SlaveEmulationPort=\"1\" IDE1MasterEmulationPort=\"2\" IDE1SlaveEmulationPort=\"3\">",
                    self.disks
                ),
            );
            for (port, &img) in attached.iter().enumerate() {
                out.line(
                    d + 2,
                    &format!(
                        "<AttachedDevice type=\"HardDisk\" hotpluggable=\"false\" port=\"{port}\" device=\"0\">"
                    ),
                );
                out.line(
                    d + 3,
                    &format!("<Image uuid=\"{{{}}}\"/>", m.disks[img].uuid),
                );
                out.line(d + 2, "</AttachedDevice>");
            }
            out.line(d + 1, "</StorageController>");
        }
        out.line(d, "</StorageControllers>");
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// `2024-05-01T12:34:56Z`
fn iso_time(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `2024-05-01T12-34-56-123456789Z`, the way VirtualBox names `.sav` files.
fn sav_stamp(secs: u64, rng: &mut Rng) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    let nanos = rng.below(1_000_000_000);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}-{mi:02}-{s:02}-{nanos:09}Z")
}

/// Seconds since 1970 to (year, month, day, hour, minute, second), UTC.
fn civil(secs: u64) -> (i64, u32, u32, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_time(1_704_096_000), "2024-01-01T08:00:00Z");
        assert_eq!(iso_time(1_709_208_000), "2024-02-29T12:00:00Z");
        assert_eq!(iso_time(1_735_689_599), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn tree_depth_is_capped() {
        let spec = SynthSpec {
            snapshots: 600,
            shape: TreeShape::Tree { branch_percent: 0 },
            saved_state_percent: 0,
            ..SynthSpec::default()
        };
        let m = generate(&spec);
        let max = m.snapshots.iter().map(|s| s.depth).max().unwrap();
        assert_eq!(max, VIRTUALBOX_MAX_SNAPSHOT_DEPTH);
        assert_eq!(m.disks.len(), 601);
    }

    #[test]
    fn chains_follow_the_snapshot_tree() {
        let spec = SynthSpec {
            snapshots: 50,
            disks: 2,
            shape: TreeShape::Tree { branch_percent: 30 },
            seed: 7,
            ..SynthSpec::default()
        };
        let m = generate(&spec);
        for s in &m.snapshots {
            for (d, &img) in s.attached.iter().enumerate() {
                assert_eq!(m.disks[img].disk, d);
                assert_eq!(m.chain(img).len(), s.depth);
            }
        }
        let cur = m.current_snapshot.unwrap();
        for (d, &img) in m.current_attached.iter().enumerate() {
            assert_eq!(m.disks[img].parent, Some(m.snapshots[cur].attached[d]));
        }
    }
}

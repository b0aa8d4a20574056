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

use std::fs;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::vdi::VdiHeader;

mod render;

use render::{render, sav_stamp};

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::render::iso_time;
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

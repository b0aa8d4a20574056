//! The cost model of VM snapshots (thesis §5.1.3 and §5.6.3): how many files a VM and a
//! system have, and how many bytes must move to resume a VM from a snapshot on another
//! host, with and without its base disk preloaded as a template.
//!
//! The model assumes every snapshot was taken while the VM was running (so each has a
//! `.sav` memory file) and that each snapshot adds one differencing image of the same size
//! per disk, as in the thesis. Sizes are bytes (`u64`); [`gb`] and [`gb_2dp`] convert to
//! decimal gigabytes (10⁹ bytes) as the thesis reports them.
//!
//! The thesis's worked example (Tables 5.2–5.4): one VM, one disk, four snapshots, a
//! 3.51 GB base, 0.125 GB per differencing image, 0.25 GB per `.sav`, a 10 KB `.vbox`:
//!
//! ```
//! use unacloud_core::cost::{gb_2dp, SystemStorage, VmStorage};
//!
//! let vm = VmStorage {
//!     disks: 1,
//!     snapshots: 4,
//!     settings_bytes: 10_000,
//!     base_bytes: 3_510_000_000,
//!     differencing_bytes: 125_000_000,
//!     saved_state_bytes: 250_000_000,
//! };
//! let all = vm.all_files().unwrap();
//! assert_eq!((all.files, gb_2dp(all.bytes)), (10, 5.01));
//!
//! let resume = vm.resume(4, false).unwrap();
//! assert_eq!((resume.files, gb_2dp(resume.bytes)), (6, 4.14));
//! let preloaded = vm.resume(4, true).unwrap();
//! assert_eq!((preloaded.files, gb_2dp(preloaded.bytes)), (5, 0.63));
//!
//! let system = SystemStorage { vms: 8, vm }.all_files().unwrap();
//! assert_eq!((system.files, gb_2dp(system.bytes)), (80, 40.08));
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Bytes in a decimal gigabyte.
pub const GB: u64 = 1_000_000_000;

/// `bytes` in decimal gigabytes.
pub fn gb(bytes: u64) -> f64 {
    bytes as f64 / GB as f64
}

/// `bytes` in decimal gigabytes rounded half up to two decimals, computed on integers so
/// that 4,135,010,000 bytes give exactly `4.14` (as the thesis rounds).
pub fn gb_2dp(bytes: u64) -> f64 {
    let hundredths = (u128::from(bytes) + 5_000_000) / 10_000_000;
    hundredths as f64 / 100.0
}

/// Number of files of one VM with `disks` disks and `snapshots` snapshots taken while it
/// ran (thesis Eq. 5.4): `d + 1` if `s = 0`, `(d + 1)(s + 1)` if `s ≥ 1`.
///
/// ```
/// assert_eq!(unacloud_core::cost::files_per_vm(1, 0), 2);
/// assert_eq!(unacloud_core::cost::files_per_vm(1, 4), 10);
/// ```
pub fn files_per_vm(disks: u32, snapshots: u32) -> u128 {
    let d = u128::from(disks);
    let s = u128::from(snapshots);
    if s == 0 {
        d + 1
    } else {
        (d + 1) * (s + 1)
    }
}

/// Number of files of `vms` VMs alike (thesis Eq. 5.5): `n` times [`files_per_vm`].
///
/// ```
/// assert_eq!(unacloud_core::cost::files_per_system(8, 1, 4), 80);
/// ```
pub fn files_per_system(vms: u32, disks: u32, snapshots: u32) -> u128 {
    u128::from(vms) * files_per_vm(disks, snapshots)
}

/// A number of files and their total size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FileSet {
    /// How many files.
    pub files: u64,
    /// Their total size in bytes.
    pub bytes: u64,
}

impl FileSet {
    /// The size in decimal gigabytes.
    pub fn gb(&self) -> f64 {
        gb(self.bytes)
    }

    /// The fraction of `whole`'s bytes that this set saves (`1 - self/whole`); 0 when
    /// `whole` is empty.
    pub fn saving_vs(&self, whole: &FileSet) -> f64 {
        if whole.bytes == 0 {
            0.0
        } else {
            1.0 - self.bytes as f64 / whole.bytes as f64
        }
    }
}

/// The storage of one VM: its disks, snapshots and the size of each kind of file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStorage {
    /// Virtual disks attached to the VM (`d`).
    pub disks: u32,
    /// Snapshots taken while it ran (`s`).
    pub snapshots: u32,
    /// Size of the settings file (`.vbox`).
    pub settings_bytes: u64,
    /// Size of each disk's base image (the template when it is multiattach).
    pub base_bytes: u64,
    /// Size of each differencing image (one per disk per snapshot).
    pub differencing_bytes: u64,
    /// Size of each saved memory state (`.sav`, one per snapshot).
    pub saved_state_bytes: u64,
}

/// What resuming a VM from one snapshot on another host costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeCost {
    /// The snapshot resumed from (0 = the initial state S0).
    pub snapshot: u32,
    /// All of the VM's files.
    pub all_files: FileSet,
    /// Files to copy when the base images must travel too.
    pub without_template: FileSet,
    /// Files to copy when the base images are preloaded on the destination.
    pub with_preloaded_template: FileSet,
}

fn overflow(what: &str) -> Error {
    Error::InvalidInput(format!("{what} does not fit in 64 bits"))
}

fn mul(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_mul(b).ok_or_else(|| overflow(what))
}

fn sum(parts: &[u64], what: &str) -> Result<u64> {
    parts
        .iter()
        .try_fold(0u64, |acc, &p| acc.checked_add(p))
        .ok_or_else(|| overflow(what))
}

impl VmStorage {
    /// Every file of the VM: the settings, each disk's base, `s` differencing images per
    /// disk (the last holds the current state) and `s` saved states. The count is
    /// [`files_per_vm`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if a count or size overflows 64 bits.
    pub fn all_files(&self) -> Result<FileSet> {
        let d = u64::from(self.disks);
        let s = u64::from(self.snapshots);
        let files = u64::try_from(files_per_vm(self.disks, self.snapshots))
            .map_err(|_| overflow("the file count"))?;
        let bases = mul(d, self.base_bytes, "the base images' size")?;
        let diffs = mul(
            mul(d, s, "the differencing image count")?,
            self.differencing_bytes,
            "the differencing images' size",
        )?;
        let savs = mul(s, self.saved_state_bytes, "the saved states' size")?;
        let bytes = sum(&[self.settings_bytes, bases, diffs, savs], "the VM's size")?;
        Ok(FileSet { files, bytes })
    }

    /// The files needed to resume from snapshot `k` (1-based; 0 is the initial state S0)
    /// on another host (thesis §5.6.2): the settings, each disk's base and its `k − 1`
    /// differencing images up to snapshot `k`, and snapshot `k`'s saved state. Older
    /// saved states and later differencing images stay behind. With
    /// `template_preloaded`, the base images are already on the destination and do not
    /// move.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if `k` is greater than the number of snapshots or a size
    /// overflows 64 bits.
    pub fn resume(&self, k: u32, template_preloaded: bool) -> Result<FileSet> {
        if k > self.snapshots {
            return Err(Error::InvalidInput(format!(
                "cannot resume from snapshot {k}: the VM has {} snapshots (use 0 for the \
                 initial state)",
                self.snapshots
            )));
        }
        let d = u64::from(self.disks);
        let chain = u64::from(k.saturating_sub(1));
        let sav = u64::from(k > 0);
        let base_files = if template_preloaded { 0 } else { d };
        let files = 1 + base_files + d * chain + sav;
        let bases = mul(base_files, self.base_bytes, "the base images' size")?;
        let diffs = mul(
            d * chain,
            self.differencing_bytes,
            "the differencing images' size",
        )?;
        let bytes = sum(
            &[
                self.settings_bytes,
                bases,
                diffs,
                sav * self.saved_state_bytes,
            ],
            "the transfer size",
        )?;
        Ok(FileSet { files, bytes })
    }

    /// [`VmStorage::resume`] with and without a preloaded template, beside all files.
    ///
    /// # Errors
    ///
    /// As [`VmStorage::resume`].
    pub fn resume_cost(&self, k: u32) -> Result<ResumeCost> {
        Ok(ResumeCost {
            snapshot: k,
            all_files: self.all_files()?,
            without_template: self.resume(k, false)?,
            with_preloaded_template: self.resume(k, true)?,
        })
    }
}

/// A distributed system of `vms` VMs with the same storage (a global snapshot takes one
/// snapshot of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemStorage {
    /// Number of VMs (`n`).
    pub vms: u32,
    /// Each VM's storage.
    pub vm: VmStorage,
}

impl SystemStorage {
    /// Every file of every VM (thesis Eq. 5.5): what external storage must hold to be
    /// able to resume any VM elsewhere.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if a count or size overflows 64 bits.
    pub fn all_files(&self) -> Result<FileSet> {
        let one = self.vm.all_files()?;
        let n = u64::from(self.vms);
        Ok(FileSet {
            files: mul(n, one.files, "the file count")?,
            bytes: mul(n, one.bytes, "the system's size")?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Tables 5.2–5.4 of the thesis.
    fn thesis_vm() -> VmStorage {
        VmStorage {
            disks: 1,
            snapshots: 4,
            settings_bytes: 10_000,
            base_bytes: 3_510_000_000,
            differencing_bytes: 125_000_000,
            saved_state_bytes: 250_000_000,
        }
    }

    #[test]
    fn thesis_worked_example() {
        let vm = thesis_vm();
        let cost = vm.resume_cost(4).unwrap();
        assert_eq!(cost.all_files.files, 10);
        assert_eq!(gb_2dp(cost.all_files.bytes), 5.01);
        assert_eq!(cost.without_template.files, 6);
        assert_eq!(gb_2dp(cost.without_template.bytes), 4.14);
        assert_eq!(cost.with_preloaded_template.files, 5);
        assert_eq!(gb_2dp(cost.with_preloaded_template.bytes), 0.63);
        // "the files left behind take 0.88 GB", "about 87% less".
        assert_eq!(
            gb_2dp(cost.all_files.bytes - cost.without_template.bytes),
            0.88
        );
        let saving = cost.with_preloaded_template.saving_vs(&cost.all_files);
        assert!((0.87..0.88).contains(&saving), "{saving}");

        let system = SystemStorage { vms: 8, vm }.all_files().unwrap();
        assert_eq!(system.files, 80);
        assert_eq!(gb_2dp(system.bytes), 40.08);
        // External storage plus one restore: 40.08 GB + 4.14 GB = 44.22 GB.
        assert_eq!(gb_2dp(system.bytes + cost.without_template.bytes), 44.22);
        assert_eq!(files_per_system(8, 1, 4), 80);
    }

    #[test]
    fn equation_5_4_matches_the_file_enumeration() {
        for d in 0..5 {
            for s in 0..7 {
                let vm = VmStorage {
                    disks: d,
                    snapshots: s,
                    ..thesis_vm()
                };
                let all = vm.all_files().unwrap();
                assert_eq!(u128::from(all.files), files_per_vm(d, s));
                // Resuming from the latest snapshot never needs more than everything,
                // and the preloaded variant saves exactly the bases.
                let r = vm.resume(s, false).unwrap();
                let p = vm.resume(s, true).unwrap();
                assert!(r.files <= all.files && r.bytes <= all.bytes);
                assert_eq!(r.files - p.files, u64::from(d));
                assert_eq!(r.bytes - p.bytes, u64::from(d) * vm.base_bytes);
            }
        }
        assert_eq!(files_per_vm(2, 0), 3);
        assert_eq!(files_per_vm(2, 3), 12);
    }

    #[test]
    fn initial_state_needs_settings_and_bases_only() {
        let r = thesis_vm().resume(0, false).unwrap();
        assert_eq!(
            r,
            FileSet {
                files: 2,
                bytes: 3_510_010_000
            }
        );
        let p = thesis_vm().resume(0, true).unwrap();
        assert_eq!(
            p,
            FileSet {
                files: 1,
                bytes: 10_000
            }
        );
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let e = thesis_vm().resume(5, false).unwrap_err();
        assert!(
            matches!(e, Error::InvalidInput(ref m) if m.contains("snapshot 5")),
            "{e}"
        );
        let huge = VmStorage {
            base_bytes: u64::MAX,
            ..thesis_vm()
        };
        assert!(matches!(huge.all_files(), Err(Error::InvalidInput(_))));
        assert!(matches!(huge.resume(1, false), Err(Error::InvalidInput(_))));
        assert!(huge.resume(1, true).is_ok());
        let many = SystemStorage {
            vms: u32::MAX,
            vm: VmStorage {
                saved_state_bytes: u64::MAX / 8,
                ..thesis_vm()
            },
        };
        assert!(matches!(many.all_files(), Err(Error::InvalidInput(_))));
        // Eq. 5.4 itself cannot overflow.
        assert_eq!(
            files_per_vm(u32::MAX, u32::MAX),
            (1u128 << 32) * (1u128 << 32)
        );
    }

    #[test]
    fn results_serialise() {
        let cost = thesis_vm().resume_cost(4).unwrap();
        let json = serde_json::to_value(cost).unwrap();
        assert_eq!(json["with_preloaded_template"]["files"], 5);
        let back: ResumeCost = serde_json::from_value(json).unwrap();
        assert_eq!(back, cost);
    }

    #[test]
    fn gb_rounding_is_half_up_on_integers() {
        assert_eq!(gb_2dp(4_135_000_000), 4.14);
        assert_eq!(gb_2dp(4_134_999_999), 4.13);
        assert_eq!(gb_2dp(0), 0.0);
        assert_eq!(gb(1_500_000_000), 1.5);
        assert_eq!(gb_2dp(u64::MAX), 18_446_744_073.71);
    }
}

//! Placement: which host runs each requested VM (thesis Table 2.4, plus disk awareness).
//!
//! A deployment asks for VMs, each with a template (image), a [`HardwareProfile`] and the
//! disk its own differencing image needs. [`place`] assigns every VM to a [`Host`] with one
//! of the [`Algorithm`]s of the thesis (Table 2.4) or with [`Algorithm::DiskAware`], the
//! disk-space-aware placement the thesis names as future work (mitigation M5):
//!
//! | algorithm | host chosen for each VM, in request order |
//! |---|---|
//! | [`Random`](Algorithm::Random) | uniformly at random among the hosts it fits on (seedable) |
//! | [`RoundRobin`](Algorithm::RoundRobin) | the next host after the previous VM's host that fits, wrapping around |
//! | [`FirstFit`](Algorithm::FirstFit) | the first host, in the given order, that fits |
//! | [`FirstFitDecreasing`](Algorithm::FirstFitDecreasing) | First Fit over the hosts sorted once by free resources, most first |
//! | [`BestFit`](Algorithm::BestFit) | the fitting host with the least free resources, re-sorted after every assignment |
//! | [`Sorting`](Algorithm::Sorting) | Best Fit among hosts where a user is logged in, then among the others |
//! | [`Singleton`](Algorithm::Singleton) | the first host, in the given order, that fits and has no VM yet |
//! | [`DiskAware`](Algorithm::DiskAware) | Best Fit among hosts that already hold the VM's template, then among hosts with room for the template too |
//!
//! "Fits" means the host's free cores, memory (MiB) and disk (bytes) cover the VM's
//! profile and [`VmRequest::disk_bytes`]; no algorithm ever over-commits them. The thesis's
//! algorithms decide on cores and RAM only (set `disk_bytes` to 0 to get exactly that) and
//! assume the template is preloaded (thesis ch. 4); only [`Algorithm::DiskAware`] also
//! reserves [`VmRequest::template_bytes`] on a host that does not hold the template yet
//! (once per host and template, however many VMs share it). Every plan lists the template
//! copies it implies in [`Placement::template_copies`].
//!
//! "Free resources" are ordered lexicographically: cores, then memory, then disk.
//!
//! ```
//! use unacloud_core::model::{HardwareProfile, Host};
//! use unacloud_core::placement::{place, Algorithm, VmRequest};
//!
//! let hosts = vec![
//!     Host::new("pc-01", 4, 8192, 60_000_000_000),
//!     Host::new("pc-02", 2, 4096, 60_000_000_000),
//! ];
//! let vms = vec![
//!     VmRequest::new("master", "ubuntu1604", HardwareProfile::Medium),
//!     VmRequest::new("worker", "ubuntu1604", HardwareProfile::Small),
//! ];
//! let plan = place(&hosts, &vms, "best-fit".parse().unwrap(), None).unwrap();
//! // Best Fit packs the tightest host first: pc-02 takes the master exactly.
//! assert_eq!(plan.host_of("master").unwrap().to_string(), "pc-02");
//! assert_eq!(plan.host_of("worker").unwrap().to_string(), "pc-01");
//! assert_eq!(plan.remaining[0].free_cores, 3);
//!
//! // Impossible requests are typed errors naming every VM that found no host.
//! let too_big = vec![VmRequest::new("huge", "ubuntu1604", HardwareProfile::ExtraLarge)];
//! let err = place(&hosts[1..], &too_big, Algorithm::FirstFit, None).unwrap_err();
//! assert!(err.to_string().contains("huge"));
//! ```
//!
//! # Cost
//!
//! First Fit, First Fit Decreasing, Round Robin, Singleton and Random search one segment
//! tree per hardware profile (per range, the most free disk among hosts with the profile's
//! cores and memory free), so finding the first fitting host is `O(log hosts)`; Best Fit,
//! Sorting and Disk-aware keep the hosts in an ordered index keyed by free resources. A plan for 10,000 VMs on 1,000 hosts therefore takes
//! milliseconds (see the `placement` bench).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{HardwareProfile, Host, HostId};

mod algorithms;
mod ledger;

use algorithms::*;
use ledger::Ledger;

/// A VM that no host could take, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    /// The VM's name.
    pub vm: String,
    /// Why it could not be placed (e.g. "needs 2 cores and 2048 MiB; largest host has 1
    /// core free").
    pub reason: String,
}

/// One VM a deployment asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmRequest {
    /// The VM's name, unique within one request.
    pub name: String,
    /// The template (image) it is built from.
    pub template: String,
    /// Its hardware profile (cores and memory).
    pub profile: HardwareProfile,
    /// Disk bytes the VM needs for itself (its differencing image) on the host.
    #[serde(default)]
    pub disk_bytes: u64,
    /// Size of the template in bytes; a host that does not hold the template yet needs
    /// this much more (counted by [`Algorithm::DiskAware`] only). Every VM of one
    /// template must give the same size.
    #[serde(default)]
    pub template_bytes: u64,
}

impl VmRequest {
    /// A request with no disk needs (the thesis's model).
    pub fn new(
        name: impl Into<String>,
        template: impl Into<String>,
        profile: HardwareProfile,
    ) -> Self {
        VmRequest {
            name: name.into(),
            template: template.into(),
            profile,
            disk_bytes: 0,
            template_bytes: 0,
        }
    }

    /// Sets the VM's own disk need and the size of its template.
    pub fn with_disk(mut self, disk_bytes: u64, template_bytes: u64) -> Self {
        self.disk_bytes = disk_bytes;
        self.template_bytes = template_bytes;
        self
    }
}

/// A placement algorithm (thesis Table 2.4, plus [`Algorithm::DiskAware`]).
///
/// Parsed from and displayed as kebab-case names: `random`, `round-robin`, `first-fit`,
/// `first-fit-decreasing`, `best-fit`, `sorting`, `singleton`, `disk-aware`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Algorithm {
    /// A uniformly random host among those the VM fits on.
    Random,
    /// One VM per host in turn, wrapping around after the last host.
    RoundRobin,
    /// The first host, in the order given, that fits.
    FirstFit,
    /// First Fit over hosts sorted once by free resources, most first.
    FirstFitDecreasing,
    /// The fitting host with the least free resources, re-evaluated after every VM.
    BestFit,
    /// Best Fit, preferring hosts where a user is logged in.
    Sorting,
    /// At most one VM per host.
    Singleton,
    /// Best Fit that also reserves disk for the template where it is not yet present,
    /// preferring hosts that already hold it.
    DiskAware,
}

impl Algorithm {
    /// Every algorithm, in the thesis's order, then the disk-aware one.
    pub const ALL: [Algorithm; 8] = [
        Algorithm::Random,
        Algorithm::RoundRobin,
        Algorithm::FirstFit,
        Algorithm::FirstFitDecreasing,
        Algorithm::BestFit,
        Algorithm::Sorting,
        Algorithm::Singleton,
        Algorithm::DiskAware,
    ];

    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::RoundRobin => "round-robin",
            Algorithm::FirstFit => "first-fit",
            Algorithm::FirstFitDecreasing => "first-fit-decreasing",
            Algorithm::BestFit => "best-fit",
            Algorithm::Sorting => "sorting",
            Algorithm::Singleton => "singleton",
            Algorithm::DiskAware => "disk-aware",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = Error;
    /// Case-insensitive; `_` and spaces may stand for `-`.
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_lowercase().replace(['_', ' '], "-");
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == norm)
            .ok_or_else(|| {
                let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.as_str()).collect();
                Error::InvalidInput(format!(
                    "unknown placement algorithm {s:?}; expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// One VM and the host chosen for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The VM's name.
    pub vm: String,
    /// The host it goes to.
    pub host: HostId,
}

/// A template that must be copied to a host before the VMs placed there can be created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateCopy {
    /// The destination host.
    pub host: HostId,
    /// The template id.
    pub template: String,
    /// Its size ([`VmRequest::template_bytes`]).
    pub bytes: u64,
}

/// The result of a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The algorithm that made the plan.
    pub algorithm: Algorithm,
    /// For [`Algorithm::Random`], the seed used (pass it back to reproduce the plan);
    /// `None` for the others.
    pub seed: Option<u64>,
    /// Placed VMs, in request order.
    pub assignments: Vec<Assignment>,
    /// The hosts, in the order given, with the resources left after the plan; templates
    /// the plan copies appear in their `preloaded_templates`.
    pub remaining: Vec<Host>,
    /// Templates the plan copies, in the order the first VM needing each was placed.
    pub template_copies: Vec<TemplateCopy>,
    /// VMs no host could take (always empty in a plan returned by [`place`]).
    pub unplaced: Vec<Unplaced>,
}

impl Placement {
    /// The host chosen for `vm`, if it was placed.
    pub fn host_of(&self, vm: &str) -> Option<&HostId> {
        self.assignments
            .iter()
            .find(|a| a.vm == vm)
            .map(|a| &a.host)
    }

    /// The VMs placed on `host`, in request order.
    pub fn vms_on<'a>(&'a self, host: &'a HostId) -> impl Iterator<Item = &'a str> + 'a {
        self.assignments
            .iter()
            .filter(move |a| &a.host == host)
            .map(|a| a.vm.as_str())
    }
}

/// Places every VM of `vms` on `hosts` with `algorithm`.
///
/// `seed` makes [`Algorithm::Random`] reproducible (the same inputs and seed give the same
/// plan); without one a fresh seed is drawn and reported in [`Placement::seed`]. Other
/// algorithms are deterministic and ignore it.
///
/// # Errors
///
/// * [`Error::InvalidInput`] for an empty host list, an empty or duplicate host id or VM
///   name, an empty template id, one template given different sizes, or a disk need that
///   overflows 64 bits;
/// * [`Error::Unplaceable`] listing every VM that found no host, each with the reason,
///   when not all VMs could be placed (use [`place_best_effort`] to keep the partial
///   plan).
pub fn place(
    hosts: &[Host],
    vms: &[VmRequest],
    algorithm: Algorithm,
    seed: Option<u64>,
) -> Result<Placement> {
    let plan = place_best_effort(hosts, vms, algorithm, seed)?;
    if plan.unplaced.is_empty() {
        Ok(plan)
    } else {
        Err(Error::Unplaceable {
            unplaced: plan.unplaced,
        })
    }
}

/// Like [`place`], but returns the partial plan with the VMs that found no host in
/// [`Placement::unplaced`] instead of failing (a desktop cloud is best effort).
///
/// # Errors
///
/// [`Error::InvalidInput`] as for [`place`].
pub fn place_best_effort(
    hosts: &[Host],
    vms: &[VmRequest],
    algorithm: Algorithm,
    seed: Option<u64>,
) -> Result<Placement> {
    let templates = validate(hosts, vms)?;
    let mut ledger = Ledger::new(hosts, vms, templates);
    let mut used_seed = None;
    match algorithm {
        Algorithm::Random => {
            let seed = seed.unwrap_or_else(|| rand::thread_rng().gen());
            used_seed = Some(seed);
            random(&mut ledger, seed);
        }
        Algorithm::RoundRobin => round_robin(&mut ledger),
        Algorithm::FirstFit => first_fit(&mut ledger, false, false),
        Algorithm::FirstFitDecreasing => first_fit(&mut ledger, true, false),
        Algorithm::Singleton => first_fit(&mut ledger, false, true),
        Algorithm::BestFit => best_fit(&mut ledger, false),
        Algorithm::Sorting => best_fit(&mut ledger, true),
        Algorithm::DiskAware => disk_aware(&mut ledger),
    }
    Ok(ledger.finish(algorithm, used_seed))
}

/// Checks the input; returns the interned template id of every VM and the number of
/// distinct templates.
fn validate(hosts: &[Host], vms: &[VmRequest]) -> Result<Templates> {
    if hosts.is_empty() {
        return Err(Error::InvalidInput(
            "no hosts to place on: the host list is empty".into(),
        ));
    }
    let mut ids = HashSet::with_capacity(hosts.len());
    for (i, h) in hosts.iter().enumerate() {
        if h.id.0.is_empty() {
            return Err(Error::InvalidInput(format!(
                "host #{i} has an empty id; give every host a unique id"
            )));
        }
        if !ids.insert(h.id.0.as_str()) {
            return Err(Error::InvalidInput(format!(
                "host id {:?} appears more than once in the host list",
                h.id.0
            )));
        }
    }
    let mut names = HashSet::with_capacity(vms.len());
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut sizes: Vec<u64> = Vec::new();
    let mut names_of: Vec<String> = Vec::new();
    let mut of_vm = Vec::with_capacity(vms.len());
    for (i, vm) in vms.iter().enumerate() {
        if vm.name.is_empty() {
            return Err(Error::InvalidInput(format!(
                "VM request #{i} has an empty name; give every VM a unique name"
            )));
        }
        if !names.insert(vm.name.as_str()) {
            return Err(Error::InvalidInput(format!(
                "VM name {:?} appears more than once in the request",
                vm.name
            )));
        }
        if vm.template.is_empty() {
            return Err(Error::InvalidInput(format!(
                "VM {:?} has an empty template id",
                vm.name
            )));
        }
        if vm.disk_bytes.checked_add(vm.template_bytes).is_none() {
            return Err(Error::InvalidInput(format!(
                "VM {:?}: disk_bytes + template_bytes exceeds 2^64 bytes",
                vm.name
            )));
        }
        let next = index.len();
        let t = *index.entry(vm.template.as_str()).or_insert(next);
        if t == next {
            sizes.push(vm.template_bytes);
            names_of.push(vm.template.clone());
        } else if sizes[t] != vm.template_bytes {
            return Err(Error::InvalidInput(format!(
                "template {:?} is given as {} bytes by an earlier VM and {} bytes by VM {:?}; \
                 every VM of a template must give the same size",
                vm.template, sizes[t], vm.template_bytes, vm.name
            )));
        }
        of_vm.push(t);
    }
    let present = hosts
        .iter()
        .map(|h| {
            let mut ts: Vec<usize> = h
                .preloaded_templates
                .iter()
                .filter_map(|t| index.get(t.as_str()).copied())
                .collect();
            ts.sort_unstable();
            ts.dedup();
            ts
        })
        .collect();
    Ok(Templates {
        of_vm,
        sizes,
        names: names_of,
        present,
    })
}

/// Interned templates.
struct Templates {
    /// Template index of each VM.
    of_vm: Vec<usize>,
    /// Bytes of each template.
    sizes: Vec<u64>,
    /// Id of each template.
    names: Vec<String>,
    /// Per host, the (sorted) templates it holds, preloaded or copied by the plan.
    present: Vec<Vec<usize>>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(a.to_string().parse::<Algorithm>().unwrap(), a);
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.as_str()));
        }
        assert_eq!(
            "First_Fit_Decreasing".parse::<Algorithm>().unwrap(),
            Algorithm::FirstFitDecreasing
        );
        let err = "worst-fit".parse::<Algorithm>().unwrap_err();
        assert!(matches!(err, Error::InvalidInput(ref m) if m.contains("best-fit")));
    }

    #[test]
    fn best_index_skips_runs_that_cannot_fit() {
        let mut idx = BestIndex::default();
        // (cores, mem, disk) per host.
        let hosts = [
            (2, 1024, 10),
            (2, 4096, 5),
            (2, 4096, 50),
            (3, 512, 99),
            (4, 8192, 1),
        ];
        for (h, &(c, m, d)) in hosts.iter().enumerate() {
            idx.set.insert((0, c, m, d, h));
        }
        assert_eq!(idx.best(0, (2, 2048, 10)), Some(2));
        assert_eq!(idx.best(0, (1, 100, 0)), Some(0));
        assert_eq!(idx.best(0, (3, 1024, 0)), Some(4));
        assert_eq!(idx.best(0, (3, 1024, 2)), None);
        assert_eq!(idx.best(1, (1, 1, 1)), None);
    }
}

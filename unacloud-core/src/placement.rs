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

/// Free resources and assignments while a plan is being made.
struct Ledger<'a> {
    hosts: &'a [Host],
    vms: &'a [VmRequest],
    templates: Templates,
    cores: Vec<u32>,
    mem: Vec<u64>,
    disk: Vec<u64>,
    host_of: Vec<Option<usize>>,
    copies: Vec<(usize, usize)>,
}

impl<'a> Ledger<'a> {
    fn new(hosts: &'a [Host], vms: &'a [VmRequest], templates: Templates) -> Self {
        Ledger {
            hosts,
            vms,
            templates,
            cores: hosts.iter().map(|h| h.free_cores).collect(),
            mem: hosts.iter().map(|h| h.free_memory_mb).collect(),
            disk: hosts.iter().map(|h| h.free_disk_bytes).collect(),
            host_of: vec![None; vms.len()],
            copies: Vec::new(),
        }
    }

    /// Cores, memory and own disk of VM `v`.
    fn need(&self, v: usize) -> (u32, u64, u64) {
        let vm = &self.vms[v];
        (vm.profile.cores(), vm.profile.memory_mb(), vm.disk_bytes)
    }

    fn fits(&self, h: usize, (c, m, d): (u32, u64, u64)) -> bool {
        self.cores[h] >= c && self.mem[h] >= m && self.disk[h] >= d
    }

    fn has_template(&self, h: usize, t: usize) -> bool {
        self.templates.present[h].binary_search(&t).is_ok()
    }

    /// Records VM `v` on host `h`, reserving `disk` bytes (the caller checked the fit).
    fn assign(&mut self, v: usize, h: usize, disk: u64) {
        let (c, m, _) = self.need(v);
        self.cores[h] -= c;
        self.mem[h] -= m;
        self.disk[h] -= disk;
        self.host_of[v] = Some(h);
        let t = self.templates.of_vm[v];
        if let Err(pos) = self.templates.present[h].binary_search(&t) {
            self.templates.present[h].insert(pos, t);
            self.copies.push((h, t));
        }
    }

    fn finish(self, algorithm: Algorithm, seed: Option<u64>) -> Placement {
        let mut remaining: Vec<Host> = self.hosts.to_vec();
        for (h, host) in remaining.iter_mut().enumerate() {
            host.free_cores = self.cores[h];
            host.free_memory_mb = self.mem[h];
            host.free_disk_bytes = self.disk[h];
        }
        let template_copies = self
            .copies
            .iter()
            .map(|&(h, t)| {
                remaining[h]
                    .preloaded_templates
                    .push(self.templates.names[t].clone());
                TemplateCopy {
                    host: self.hosts[h].id.clone(),
                    template: self.templates.names[t].clone(),
                    bytes: self.templates.sizes[t],
                }
            })
            .collect();
        let mut assignments = Vec::with_capacity(self.vms.len());
        let mut unplaced = Vec::new();
        let mut reasons: HashMap<(u32, u64, u64, usize), String> = HashMap::new();
        for (v, vm) in self.vms.iter().enumerate() {
            match self.host_of[v] {
                Some(h) => assignments.push(Assignment {
                    vm: vm.name.clone(),
                    host: self.hosts[h].id.clone(),
                }),
                None => {
                    let (c, m, d) = self.need(v);
                    let t = self.templates.of_vm[v];
                    let key = (
                        c,
                        m,
                        d,
                        if algorithm == Algorithm::DiskAware {
                            t
                        } else {
                            0
                        },
                    );
                    let reason = reasons
                        .entry(key)
                        .or_insert_with(|| self.reason(v, algorithm))
                        .clone();
                    unplaced.push(Unplaced {
                        vm: vm.name.clone(),
                        reason,
                    });
                }
            }
        }
        Placement {
            algorithm,
            seed,
            assignments,
            remaining,
            template_copies,
            unplaced,
        }
    }

    /// Why VM `v` found no host.
    fn reason(&self, v: usize, algorithm: Algorithm) -> String {
        let (c, m, d) = self.need(v);
        let vm = &self.vms[v];
        let t = self.templates.of_vm[v];
        let disk_aware = algorithm == Algorithm::DiskAware;
        let mut need = format!("needs {c} cores, {m} MiB of memory and {d} bytes of disk");
        if disk_aware && vm.template_bytes > 0 {
            need.push_str(&format!(
                " (plus {} bytes for template {:?} where it is not preloaded)",
                vm.template_bytes, vm.template
            ));
        }
        let preloaded = |h: usize| {
            self.hosts[h]
                .preloaded_templates
                .iter()
                .any(|p| p == &vm.template)
        };
        let fits_empty = self.hosts.iter().enumerate().any(|(h, host)| {
            let disk = if disk_aware && !preloaded(h) {
                d + vm.template_bytes
            } else {
                d
            };
            host.free_cores >= c && host.free_memory_mb >= m && host.free_disk_bytes >= disk
        });
        if !fits_empty {
            let max_c = self.hosts.iter().map(|h| h.free_cores).max().unwrap_or(0);
            let max_m = self
                .hosts
                .iter()
                .map(|h| h.free_memory_mb)
                .max()
                .unwrap_or(0);
            let max_d = self
                .hosts
                .iter()
                .map(|h| h.free_disk_bytes)
                .max()
                .unwrap_or(0);
            return format!(
                "{need}; no host has that much free even before placement (most free: \
                 {max_c} cores, {max_m} MiB, {max_d} bytes of disk, not necessarily on one host)"
            );
        }
        if algorithm == Algorithm::Singleton {
            return format!(
                "{need}; every host that could take it already runs a VM of this request \
                 (singleton places at most one VM per host)"
            );
        }
        let left = (0..self.hosts.len()).any(|h| {
            let disk = if disk_aware && !self.has_template(h, t) {
                d + vm.template_bytes
            } else {
                d
            };
            self.fits(h, (c, m, disk))
        });
        if left {
            // Only possible for algorithms that give up early; none of ours does.
            return format!("{need}; {algorithm} placement found no host for it");
        }
        format!("{need}; the hosts that could take it were filled by earlier VMs of this request")
    }
}

/// Segment trees over hosts, one per hardware profile: leaf `i` holds the free disk of
/// host `i` if it has the profile's cores and memory free, and -1 if not; inner nodes hold
/// the maximum. "The first host from a position that fits a VM" and "every host that
/// fits" are then exact `O(log n)` (resp. output-sized) searches.
struct FitTree {
    size: usize,
    layers: Vec<Vec<i128>>,
}

/// Index of `p` in [`HardwareProfile::ALL`].
fn profile_index(p: HardwareProfile) -> usize {
    HardwareProfile::ALL
        .iter()
        .position(|q| *q == p)
        .unwrap_or_default()
}

impl FitTree {
    /// A tree whose leaf `i` holds the free resources of host `order[i]`.
    fn new(ledger: &Ledger<'_>, order: &[usize]) -> Self {
        let size = order.len().next_power_of_two().max(1);
        let mut t = FitTree {
            size,
            layers: vec![vec![-1; 2 * size]; HardwareProfile::ALL.len()],
        };
        for (i, &h) in order.iter().enumerate() {
            t.set_leaf(i, (ledger.cores[h], ledger.mem[h], ledger.disk[h]));
        }
        for layer in &mut t.layers {
            for p in (1..size).rev() {
                layer[p] = layer[2 * p].max(layer[2 * p + 1]);
            }
        }
        t
    }

    fn set_leaf(&mut self, i: usize, (c, m, d): (u32, u64, u64)) {
        for (k, profile) in HardwareProfile::ALL.iter().enumerate() {
            let fits = c >= profile.cores() && m >= profile.memory_mb();
            self.layers[k][self.size + i] = if fits { i128::from(d) } else { -1 };
        }
    }

    /// Sets leaf `i` to the given free cores, memory and disk.
    fn set(&mut self, i: usize, free: (u32, u64, u64)) {
        self.set_leaf(i, free);
        for layer in &mut self.layers {
            let mut p = self.size + i;
            while p > 1 {
                p /= 2;
                layer[p] = layer[2 * p].max(layer[2 * p + 1]);
            }
        }
    }

    /// The first leaf `>= from` with room for `profile` and `disk` bytes.
    fn first_from(&self, from: usize, profile: HardwareProfile, disk: u64) -> Option<usize> {
        let layer = &self.layers[profile_index(profile)];
        self.search(layer, 1, 0, self.size, from, i128::from(disk))
    }

    fn search(
        &self,
        layer: &[i128],
        p: usize,
        lo: usize,
        hi: usize,
        from: usize,
        disk: i128,
    ) -> Option<usize> {
        if hi <= from || layer[p] < disk {
            return None;
        }
        if p >= self.size {
            return Some(lo);
        }
        let mid = (lo + hi) / 2;
        self.search(layer, 2 * p, lo, mid, from, disk)
            .or_else(|| self.search(layer, 2 * p + 1, mid, hi, from, disk))
    }

    /// Every leaf with room for `profile` and `disk` bytes, in order.
    fn all_fitting(&self, profile: HardwareProfile, disk: u64, out: &mut Vec<usize>) {
        let layer = &self.layers[profile_index(profile)];
        let disk = i128::from(disk);
        let mut stack = vec![(1usize, 0usize, self.size)];
        while let Some((p, lo, hi)) = stack.pop() {
            if layer[p] < disk {
                continue;
            }
            if p >= self.size {
                out.push(lo);
                continue;
            }
            let mid = (lo + hi) / 2;
            // Right first so that leaves come out in order.
            stack.push((2 * p + 1, mid, hi));
            stack.push((2 * p, lo, mid));
        }
    }
}

fn identity(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// First Fit (optionally over hosts sorted by free resources, most first), or Singleton.
fn first_fit(ledger: &mut Ledger<'_>, decreasing: bool, singleton: bool) {
    let mut order = identity(ledger.hosts.len());
    if decreasing {
        // Stable: ties keep the order given.
        order.sort_by(|&a, &b| {
            (ledger.cores[b], ledger.mem[b], ledger.disk[b]).cmp(&(
                ledger.cores[a],
                ledger.mem[a],
                ledger.disk[a],
            ))
        });
    }
    let mut tree = FitTree::new(ledger, &order);
    for v in 0..ledger.vms.len() {
        let need = ledger.need(v);
        if let Some(i) = tree.first_from(0, ledger.vms[v].profile, need.2) {
            let h = order[i];
            ledger.assign(v, h, need.2);
            let left = if singleton {
                (0, 0, 0)
            } else {
                (ledger.cores[h], ledger.mem[h], ledger.disk[h])
            };
            tree.set(i, left);
        }
    }
}

/// Round Robin: each VM goes to the next host after the previous VM's host that fits.
fn round_robin(ledger: &mut Ledger<'_>) {
    let n = ledger.hosts.len();
    let mut tree = FitTree::new(ledger, &identity(n));
    let mut cursor = 0;
    for v in 0..ledger.vms.len() {
        let need = ledger.need(v);
        let profile = ledger.vms[v].profile;
        let found = tree
            .first_from(cursor, profile, need.2)
            .or_else(|| tree.first_from(0, profile, need.2));
        if let Some(h) = found {
            ledger.assign(v, h, need.2);
            tree.set(h, (ledger.cores[h], ledger.mem[h], ledger.disk[h]));
            cursor = (h + 1) % n;
        }
    }
}

/// Random: a uniformly chosen host among those the VM fits on.
fn random(ledger: &mut Ledger<'_>, seed: u64) {
    const TRIES: usize = 8;
    let n = ledger.hosts.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tree = FitTree::new(ledger, &identity(n));
    // The smallest need of any VM: hosts below it in some dimension can take no VM and
    // leave the sampling pool.
    let min = (0..ledger.vms.len())
        .map(|v| ledger.need(v))
        .fold((u32::MAX, u64::MAX, u64::MAX), |(a, b, c), (x, y, z)| {
            (a.min(x), b.min(y), c.min(z))
        });
    let mut alive: Vec<usize> = (0..n).filter(|&h| ledger.fits(h, min)).collect();
    let mut pos: Vec<usize> = vec![usize::MAX; n];
    for (i, &h) in alive.iter().enumerate() {
        pos[h] = i;
    }
    let mut scratch = Vec::new();
    for v in 0..ledger.vms.len() {
        let need = ledger.need(v);
        // Rejection sampling over the live hosts is uniform over the fitting ones; when
        // it keeps missing, choose uniformly from the explicit list of fitting hosts.
        let mut pick = None;
        for _ in 0..TRIES {
            if alive.is_empty() {
                break;
            }
            let h = alive[rng.gen_range(0..alive.len() as u64) as usize];
            if ledger.fits(h, need) {
                pick = Some(h);
                break;
            }
        }
        if pick.is_none() && !alive.is_empty() {
            scratch.clear();
            tree.all_fitting(ledger.vms[v].profile, need.2, &mut scratch);
            if !scratch.is_empty() {
                pick = Some(scratch[rng.gen_range(0..scratch.len() as u64) as usize]);
            }
        }
        let Some(h) = pick else { continue };
        ledger.assign(v, h, need.2);
        tree.set(h, (ledger.cores[h], ledger.mem[h], ledger.disk[h]));
        if !ledger.fits(h, min) && pos[h] != usize::MAX {
            let i = pos[h];
            alive.swap_remove(i);
            if let Some(&moved) = alive.get(i) {
                pos[moved] = i;
            }
            pos[h] = usize::MAX;
        }
    }
}

/// Key of a host in a [`BestIndex`]: preference group, then free resources, then index.
type Key = (u8, u32, u64, u64, usize);

/// Hosts ordered by (group, free cores, free memory, free disk, index).
#[derive(Default)]
struct BestIndex {
    set: BTreeSet<Key>,
}

impl BestIndex {
    /// The smallest key in `group` whose host fits `need`.
    ///
    /// Walks the ordered set from the need upwards and jumps over runs that cannot fit
    /// (same cores with too little memory; same cores and memory with too little disk), so
    /// a query costs a few `O(log n)` seeks instead of a scan.
    fn best(&self, group: u8, (c, m, d): (u32, u64, u64)) -> Option<usize> {
        let mut cursor: Key = (group, c, m, d, 0);
        loop {
            let &(g, cc, mm, dd, h) = self.set.range(cursor..).next()?;
            if g != group {
                return None;
            }
            if mm < m {
                cursor = (g, cc, m, d, 0);
            } else if dd < d {
                cursor = (g, cc, mm, d, 0);
            } else {
                return Some(h);
            }
        }
    }
}

fn key(ledger: &Ledger<'_>, group: u8, h: usize) -> Key {
    (group, ledger.cores[h], ledger.mem[h], ledger.disk[h], h)
}

/// Best Fit; with `prefer_users` (Sorting), hosts with a user logged in come first.
fn best_fit(ledger: &mut Ledger<'_>, prefer_users: bool) {
    let group = |h: &Host| u8::from(prefer_users && !h.user_logged_in);
    let groups: &[u8] = if prefer_users { &[0, 1] } else { &[0] };
    let mut index = BestIndex::default();
    for (h, host) in ledger.hosts.iter().enumerate() {
        index.set.insert(key(ledger, group(host), h));
    }
    for v in 0..ledger.vms.len() {
        let need = ledger.need(v);
        let Some(h) = groups.iter().find_map(|&g| index.best(g, need)) else {
            continue;
        };
        let g = group(&ledger.hosts[h]);
        index.set.remove(&key(ledger, g, h));
        ledger.assign(v, h, need.2);
        index.set.insert(key(ledger, g, h));
    }
}

/// Disk-aware Best Fit: first among hosts holding the VM's template (no copy, no extra
/// disk), then among all hosts with room for the template and the VM's own disk.
fn disk_aware(ledger: &mut Ledger<'_>) {
    let mut all = BestIndex::default();
    let mut by_template: Vec<BestIndex> = (0..ledger.templates.sizes.len())
        .map(|_| BestIndex::default())
        .collect();
    for h in 0..ledger.hosts.len() {
        all.set.insert(key(ledger, 0, h));
        for &t in &ledger.templates.present[h] {
            by_template[t].set.insert(key(ledger, 0, h));
        }
    }
    for v in 0..ledger.vms.len() {
        let (c, m, d) = ledger.need(v);
        let t = ledger.templates.of_vm[v];
        let t_bytes = ledger.templates.sizes[t];
        let (h, disk) = if let Some(h) = by_template[t].best(0, (c, m, d)) {
            (h, d)
        } else {
            // A host holding the template that fits d + t_bytes would fit d and have been
            // found above, so whatever this finds lacks the template.
            let with_template = d.saturating_add(t_bytes);
            match all.best(0, (c, m, with_template)) {
                Some(h) => (h, with_template),
                None => continue,
            }
        };
        let old = key(ledger, 0, h);
        all.set.remove(&old);
        for &pt in &ledger.templates.present[h] {
            by_template[pt].set.remove(&old);
        }
        ledger.assign(v, h, disk);
        let new = key(ledger, 0, h);
        all.set.insert(new);
        for &pt in &ledger.templates.present[h] {
            by_template[pt].set.insert(new);
        }
    }
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

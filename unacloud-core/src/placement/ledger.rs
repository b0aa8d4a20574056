//! The ledger of one placement run: the hosts' free resources, the assignments and
//! template copies made so far, and what an unplaced VM is told.

use super::*;

/// Free resources and assignments while a plan is being made.
pub(super) struct Ledger<'a> {
    pub(super) hosts: &'a [Host],
    pub(super) vms: &'a [VmRequest],
    pub(super) templates: Templates,
    pub(super) cores: Vec<u32>,
    pub(super) mem: Vec<u64>,
    pub(super) disk: Vec<u64>,
    pub(super) host_of: Vec<Option<usize>>,
    pub(super) copies: Vec<(usize, usize)>,
}

impl<'a> Ledger<'a> {
    pub(super) fn new(hosts: &'a [Host], vms: &'a [VmRequest], templates: Templates) -> Self {
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
    pub(super) fn need(&self, v: usize) -> (u32, u64, u64) {
        let vm = &self.vms[v];
        (vm.profile.cores(), vm.profile.memory_mb(), vm.disk_bytes)
    }

    pub(super) fn fits(&self, h: usize, (c, m, d): (u32, u64, u64)) -> bool {
        self.cores[h] >= c && self.mem[h] >= m && self.disk[h] >= d
    }

    pub(super) fn has_template(&self, h: usize, t: usize) -> bool {
        self.templates.present[h].binary_search(&t).is_ok()
    }

    /// Records VM `v` on host `h`, reserving `disk` bytes (the caller checked the fit).
    pub(super) fn assign(&mut self, v: usize, h: usize, disk: u64) {
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

    pub(super) fn finish(self, algorithm: Algorithm, seed: Option<u64>) -> Placement {
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
    pub(super) fn reason(&self, v: usize, algorithm: Algorithm) -> String {
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

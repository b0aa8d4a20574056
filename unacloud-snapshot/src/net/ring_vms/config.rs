//! What a run is given (the guest image, the configuration) and what it reports.

use super::*;

/// The reference guest (`scripts/guest-image`).
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The root disk template (qcow2), copied to every PC as its multiattach template.
    pub template: PathBuf,
}

impl GuestImage {
    /// The files in `dir` (`vmlinuz`, `initrd.img`, `rootfs.qcow2`); an error names what
    /// is missing.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let g = Self {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            template: dir.join("rootfs.qcow2"),
        };
        for f in [&g.kernel, &g.initrd, &g.template] {
            if !f.is_file() {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "the guest image has no {} (build it with scripts/guest-image)",
                        f.display()
                    ),
                });
            }
        }
        Ok(g)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RingVmsConfig {
    /// VMs = ring peers (2..=64).
    pub vms: u32,
    /// PCs that run them (one VM each, two each when `vms > hosts`).
    pub hosts: u32,
    /// Spare PCs (with the template preloaded) that relocated VMs resume on.
    pub spare_hosts: u32,
    /// Tokens of the ring.
    pub tokens: u64,
    /// Global snapshots taken while the ring runs.
    pub snapshots: u32,
    /// After the snapshots, power every PC off and resume from the latest completed one.
    pub power_off: bool,
    /// Resume this many VMs on spare PCs instead of their own.
    pub relocate: u32,
    /// The guest.
    pub guest: GuestImage,
    /// Memory of each VM (MiB).
    pub memory_mb: u64,
    /// Accelerator (`Auto` probes KVM once and uses TCG if its guests do not run).
    pub accel: Accel,
    /// Colouring backend (`nft-netlink`, `nft`, `nft-command` or `iptables`).
    pub backend: BackendKind,
    /// The program to re-execute for the test manager, and the arguments that make it
    /// run `net::cli::main` (feature `cli`) with the arguments that follow.
    pub program: PathBuf,
    /// See `program`.
    pub program_args: Vec<String>,
    /// Pause between two global snapshots.
    pub gap: Duration,
    /// Bound on the whole run.
    pub deadline: Duration,
    /// Run the control plane on an etcd cluster of the lab's own (`--control etcd`).
    #[cfg(feature = "etcd")]
    pub etcd: Option<crate::net::ring::EtcdLabConfig>,
}

impl RingVmsConfig {
    /// Defaults: no spares, no power-off, 128 MiB guests, automatic accelerator,
    /// nft-netlink, 1 s between snapshots, 15 minutes overall.
    pub fn new(
        vms: u32,
        hosts: u32,
        tokens: u64,
        snapshots: u32,
        guest: GuestImage,
        program: PathBuf,
        program_args: Vec<String>,
    ) -> Self {
        Self {
            vms,
            hosts,
            spare_hosts: 0,
            tokens,
            snapshots,
            power_off: false,
            relocate: 0,
            guest,
            memory_mb: 128,
            accel: Accel::Auto,
            backend: BackendKind::NftNetlink,
            program,
            program_args,
            gap: Duration::from_secs(1),
            deadline: Duration::from_secs(900),
            #[cfg(feature = "etcd")]
            etcd: None,
        }
    }

    pub(super) fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidConfig { reason });
        if !(2..=64).contains(&self.vms) {
            return bad(format!("--vms {}: use 2 to 64", self.vms));
        }
        if self.hosts == 0 || self.vms > 2 * self.hosts {
            return bad(format!(
                "--hosts {}: {} VMs need at least {} hosts (at most two VMs per host)",
                self.hosts,
                self.vms,
                self.vms.div_ceil(2)
            ));
        }
        if self.hosts + self.spare_hosts > 200 {
            return bad("at most 200 hosts and spare hosts".to_string());
        }
        if self.relocate > 0 && !self.power_off {
            return bad("--relocate resumes VMs elsewhere: it needs --power-off".to_string());
        }
        if self.relocate > self.vms || (self.relocate > 0 && self.spare_hosts == 0) {
            return bad(format!(
                "--relocate {}: needs at least one spare host and at most {} VMs",
                self.relocate, self.vms
            ));
        }
        if self.relocate > 2 * self.spare_hosts {
            return bad(format!(
                "--relocate {}: {} spare hosts take at most {} VMs",
                self.relocate,
                self.spare_hosts,
                2 * self.spare_hosts
            ));
        }
        if self.power_off && self.snapshots == 0 {
            return bad("--power-off resumes from a global snapshot: take at least one".into());
        }
        if self.tokens == 0 {
            return bad("--tokens must be at least 1".to_string());
        }
        Ok(())
    }
}

/// A VM resumed on a spare PC.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Relocation {
    /// The VM.
    pub vm: String,
    /// The PC it ran on.
    pub from: String,
    /// The spare PC it resumed on.
    pub to: String,
    /// Bytes copied (its minimal file set for the global snapshot; the template was
    /// there already).
    pub bytes_copied: u64,
}

/// The outcome of a run (the `--json` object of the `ring_vms` example).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RingVmsReport {
    /// VMs.
    pub vms: u32,
    /// PCs (without spares).
    pub hosts: u32,
    /// Tokens configured.
    pub tokens_expected: u64,
    /// Tokens the ring's peers counted (sum of `Hello` messages received).
    pub tokens_counted: u64,
    /// Global snapshots completed.
    pub global_snapshots_completed: u32,
    /// Global snapshots that failed.
    pub global_snapshots_failed: u32,
    /// Ids of the completed global snapshots.
    pub completed_ids: Vec<u64>,
    /// The global snapshot the application resumed from (the latest completed one).
    pub restored_from: Option<u64>,
    /// Whether every PC was powered off.
    pub powered_off: bool,
    /// VMs that resumed on spare PCs.
    pub relocated: Vec<Relocation>,
    /// Per completed global snapshot: the slowest local snapshot (ms).
    pub local_ms: Vec<f64>,
    /// Per completed global snapshot: TAKE_SNAPSHOT to completion at the coordinator (ms).
    pub global_ms: Vec<f64>,
    /// Per completed global snapshot: global − slowest local (ms).
    pub overhead_ms: Vec<f64>,
    /// Per local snapshot of every completed global snapshot: how long the guest was
    /// paused (ms).
    pub vm_downtime_ms: Vec<f64>,
    /// From the resume's start to every VM running again (ms).
    pub resume_ms: Option<f64>,
    /// Boot of all VMs, to every guest's first heartbeat (ms).
    pub boot_ms: f64,
    /// The ring's own run time, from START to END, in seconds (the restore included).
    pub ring_duration_s: f64,
    /// The accelerator the VMs ran with.
    pub accel: String,
    /// Packets the POST filters dropped (kernel counters).
    pub post_packets_dropped: u64,
    /// Our rule objects still present at exit.
    pub rules_left: usize,
    /// Namespaces of this run still present at exit.
    pub namespaces_left: usize,
    /// QEMU processes still running at exit.
    pub vms_left: usize,
    /// What went wrong, for the operator (empty on a clean run).
    pub failures: Vec<String>,
    /// With the control plane on etcd: what it did (its fields join the JSON object).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<crate::net::ring::EtcdLabReport>,
}

impl RingVmsReport {
    /// The human summary of the main demo.
    pub fn human_summary(&self) -> String {
        use crate::net::ring::median;
        let med = |v: &[f64]| median(v).map_or("-".to_string(), |m| format!("{m:.1} ms"));
        let mut s = format!(
            "{} VMs on {} hosts ({}): {} of {} tokens counted — {}\n",
            self.vms,
            self.hosts,
            self.accel,
            self.tokens_counted,
            self.tokens_expected,
            if self.tokens_counted == self.tokens_expected {
                "no message lost or duplicated"
            } else {
                "TOKENS LOST OR DUPLICATED"
            }
        );
        s.push_str(&format!(
            "global snapshots: {} completed {:?}, {} failed; local {} · global {} · overhead {} · guest paused {} (medians)\n",
            self.global_snapshots_completed,
            self.completed_ids,
            self.global_snapshots_failed,
            med(&self.local_ms),
            med(&self.global_ms),
            med(&self.overhead_ms),
            med(&self.vm_downtime_ms),
        ));
        if self.powered_off {
            s.push_str(&format!(
                "every host powered off; resumed from global snapshot {} in {}{}\n",
                self.restored_from
                    .map_or("-".to_string(), |g| g.to_string()),
                self.resume_ms
                    .map_or("-".to_string(), |m| format!("{m:.0} ms")),
                if self.relocated.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} VM(s) on spare hosts ({} bytes copied)",
                        self.relocated.len(),
                        self.relocated.iter().map(|r| r.bytes_copied).sum::<u64>()
                    )
                }
            ));
        }
        s.push_str(&format!(
            "{} POST packets dropped; left behind: {} rules, {} namespaces, {} VMs",
            self.post_packets_dropped, self.rules_left, self.namespaces_left, self.vms_left
        ));
        for f in &self.failures {
            s.push_str(&format!("\nfailure: {f}"));
        }
        s
    }
}

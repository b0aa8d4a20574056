//! The thesis experiment with real VMs (SPEC §5–§6): the RCPBT token ring runs *inside*
//! QEMU guests, consistent global snapshots are taken while it runs, every PC is powered
//! off (every QEMU process SIGKILLed, every host agent gone), and the application resumes
//! from the latest completed global snapshot over the network (POLL, RESTORE, START) and
//! finishes with an exact token count.
//!
//! ```text
//!            lab bridge 10.213.0.0/24 (hub namespace; the test manager at .254)
//!        ┌──────────────┬──────────────┬──────────────┐
//!   pc-0 10.213.0.1  pc-1 10.213.0.2  …            spare hosts
//!     │ tap uct0        │ tap uct1
//!   vm0 10.214.0.1    vm1 10.214.0.2
//! ```
//!
//! Each emulated PC is a network namespace holding its VMs' taps, routed to the lab
//! bridge: a VM's address is a host route at its PC and at the hub, so a VM that resumes
//! on a spare PC keeps its address (its network state lives in its memory) and the lab's
//! route follows it. Packet colouring happens at the PC, on the VM's tap (forward hook,
//! [`crate::colour::Scope::Interface`]): neither the guest, nor the ring, nor QEMU
//! changes. Local snapshots are live QEMU snapshots with memory, taken through the
//! [`unacloud_core::hypervisor::Hypervisor`] trait ([`LocalSnapshot::Hypervisor`]).
//!
//! The protocol's nodes (a coordinator for `vm0`, one participant per other VM) run in
//! this process and talk over TCP on loopback — the lab's management network; the ring's
//! traffic only crosses the lab bridge. The test manager, which the thesis ran outside
//! the VMs, runs in the hub namespace and is never snapshotted: its count of the `Hello`
//! messages every peer received is the application's own proof that no message was lost
//! or duplicated.
//!
//! Everything (QEMU processes, namespaces, rules, files) is removed on success, on error
//! and when the future is dropped (Ctrl-C).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use unacloud_core::hypervisor::{AttachSpec, DiskRef, Hypervisor};
use unacloud_core::model::{DiskType, HardwareProfile, VmId, VmSpec};
use unacloud_core::qemu::{
    kill_all_under, mac_for, Accel, BootFiles, NetConfig, QemuHypervisor, QemuImg, QemuSystem,
    StartOptions,
};

use super::conn::TransportConfig;
use super::frame::ClusterKey;
use super::host::{local_snapshot_name, HostActions, LocalSnapshot, VmHost};
use super::node::{spawn_coordinator, spawn_participant, NodeEvent, NodeHandle};
use super::ring::{LabGuard, Procs};
use crate::colour::exec::{check, run_argv};
use crate::colour::netlink::NftNetlink;
use crate::colour::{ColourBackend, Scope};
use crate::error::{Error, Result};
use crate::netns::RunDir;
use crate::netns::{NetnsLab, HUB_ADDR};
use crate::protocol::{
    ClusterId, CoordinatorConfig, DscpConfig, GlobalSnapshotId, ParticipantConfig, ParticipantId,
    ProtocolEvent, Timeouts,
};

use super::daemon::BackendKind;

/// Port of the RCPBT test manager on the hub's bridge address.
const TM_PORT: u16 = 7000;
/// Base port of the ring peers (each in its own VM).
const PEER_BASE_PORT: u16 = 7100;
/// The VMs' subnet; VM `v` is `10.214.0.(v+1)`.
const VM_SUBNET: [u8; 3] = [10, 214, 0];
/// The gateway every VM sees: the address of its tap at its PC.
const VM_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 254);
/// Every tap has this MAC, so a guest's neighbour cache stays right on another PC.
const TAP_MAC: &str = "02:00:00:00:00:fe";
const IP_TIMEOUT: Duration = Duration::from_secs(10);

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
        }
    }

    fn validate(&self) -> Result<()> {
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
}

impl RingVmsReport {
    /// The human summary of the main demo.
    pub fn human_summary(&self) -> String {
        use super::ring::median;
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

fn ip(args: &[&str]) -> Result<()> {
    let argv: Vec<String> = std::iter::once("ip")
        .chain(args.iter().copied())
        .map(str::to_string)
        .collect();
    check(&argv, run_argv(&argv, IP_TIMEOUT)?).map(|_| ())
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    ip(&[
        "netns",
        "exec",
        ns,
        "sysctl",
        "-q",
        "-w",
        &format!("{key}={value}"),
    ])
}

fn vm_addr(v: usize) -> Ipv4Addr {
    Ipv4Addr::new(VM_SUBNET[0], VM_SUBNET[1], VM_SUBNET[2], (v + 1) as u8)
}

fn tap_name(v: usize) -> String {
    format!("uct{v}")
}

fn vm_name(v: usize) -> String {
    format!("vm{v}")
}

/// One emulated PC: its namespace, lab address, root folder and hypervisor.
struct Pc {
    name: String,
    ns: String,
    addr: Ipv4Addr,
    root: PathBuf,
    template: PathBuf,
    /// `None` only while the PC is powered off.
    hv: Option<Arc<QemuHypervisor>>,
}

impl Pc {
    fn hv(&self) -> Result<&Arc<QemuHypervisor>> {
        self.hv.as_ref().ok_or_else(|| Error::Rcpbt {
            reason: format!("{} is powered off", self.name),
        })
    }
}

/// Routes a PC's VMs to the lab bridge.
fn prepare_pc_network(ns: &str) -> Result<()> {
    sysctl(ns, "net.ipv4.ip_forward", "1")?;
    sysctl(ns, "net.ipv4.conf.all.rp_filter", "0")?;
    sysctl(ns, "net.ipv4.conf.default.rp_filter", "0")?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        &format!("{}.{}.{}.0/24", VM_SUBNET[0], VM_SUBNET[1], VM_SUBNET[2]),
        "via",
        &HUB_ADDR.to_string(),
    ])
}

/// The tap of VM `v` at a PC (persistent, so it and its route outlive a QEMU process),
/// and the hub's route to the VM through that PC.
fn plug_vm(pc_ns: &str, pc_addr: Ipv4Addr, hub: &str, v: usize) -> Result<()> {
    let tap = tap_name(v);
    ip(&["-n", pc_ns, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
    ip(&["-n", pc_ns, "link", "set", &tap, "address", TAP_MAC])?;
    ip(&[
        "-n",
        pc_ns,
        "addr",
        "add",
        &format!("{VM_GATEWAY}/32"),
        "dev",
        &tap,
    ])?;
    ip(&["-n", pc_ns, "link", "set", &tap, "up"])?;
    sysctl(pc_ns, &format!("net.ipv4.conf.{tap}.proxy_arp"), "1")?;
    sysctl(pc_ns, &format!("net.ipv4.conf.{tap}.rp_filter"), "0")?;
    ip(&[
        "-n",
        pc_ns,
        "route",
        "add",
        &format!("{}/32", vm_addr(v)),
        "dev",
        &tap,
    ])?;
    ip(&[
        "-n",
        hub,
        "route",
        "replace",
        &format!("{}/32", vm_addr(v)),
        "via",
        &pc_addr.to_string(),
    ])
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::ResultsIo {
        path: path.to_path_buf(),
        source,
    }
}

fn hv_err(what: String) -> impl FnOnce(unacloud_core::Error) -> Error {
    move |e| Error::Rcpbt {
        reason: format!("{what}: {}", crate::error::error_chain(&e)),
    }
}

/// Opens a PC's QEMU backend with its own copy of the template (registered
/// multiattach, with the guest's boot files).
async fn open_pc(
    name: String,
    ns: String,
    addr: Ipv4Addr,
    root: PathBuf,
    guest: &GuestImage,
    accel: Accel,
) -> Result<Pc> {
    let templates = root.join("templates");
    std::fs::create_dir_all(&templates).map_err(io_err(&templates))?;
    let template = templates.join("rootfs.qcow2");
    std::fs::copy(&guest.template, &template).map_err(io_err(&template))?;
    let hv =
        QemuHypervisor::open_configured(&root, QemuImg::new(), QemuSystem::new().with_accel(accel))
            .await
            .map_err(hv_err(format!("opening the QEMU backend of {name}")))?;
    let disk = hv
        .register_disk(&template)
        .await
        .map_err(hv_err(format!("registering the template on {name}")))?;
    let d = DiskRef::Uuid(disk.uuid);
    hv.set_disk_type(&d, DiskType::MultiAttach)
        .await
        .map_err(hv_err(format!("making the template multiattach on {name}")))?;
    Ok(Pc {
        name,
        ns,
        addr,
        root,
        template,
        hv: Some(Arc::new(hv)),
    })
}

/// Reopens a PC's backend after its power came back (it finds its VMs `Aborted`).
async fn reopen_pc(pc: &Pc, accel: Accel) -> Result<Arc<QemuHypervisor>> {
    debug_assert!(pc.hv.is_none());
    let hv = QemuHypervisor::open_configured(
        &pc.root,
        QemuImg::new(),
        QemuSystem::new().with_accel(accel),
    )
    .await
    .map_err(hv_err(format!("reopening the QEMU backend of {}", pc.name)))?;
    Ok(Arc::new(hv))
}

/// Creates VM `v` on `pc` from the template and boots it into the ring.
async fn provision_vm(pc: &Pc, guest: &GuestImage, v: usize, memory_mb: u64) -> Result<VmId> {
    let name = vm_name(v);
    let id = VmId::from(name.as_str());
    let fail = |what: &str| hv_err(format!("{what} {name} on {}", pc.name));
    let spec = VmSpec::new(&name, HardwareProfile::Small)
        .with_memory_mb(memory_mb)
        .with_cores(1);
    let hv = pc.hv()?;
    hv.create_vm(&spec).await.map_err(fail("creating"))?;
    hv.attach_disk(&id, &AttachSpec::sata(DiskRef::Path(pc.template.clone())))
        .await
        .map_err(fail("attaching the template to"))?;
    let uuid = hv
        .vm_info(&id)
        .await
        .map_err(fail("reading"))?
        .uuid
        .ok_or_else(|| Error::Rcpbt {
            reason: format!("VM {name} has no uuid"),
        })?;
    hv.set_vm_network(&id, tap_config(&pc.ns, v, &mac_for(&uuid)))
        .await
        .map_err(fail("connecting"))?;
    let cmd = format!(
        "unacloud-guest,ring-peer,--manager,{HUB_ADDR}:{TM_PORT},--ip,{}",
        vm_addr(v)
    );
    hv.set_vm_boot(
        &id,
        Some(BootFiles {
            kernel: guest.kernel.clone(),
            initrd: Some(guest.initrd.clone()),
            cmdline: Some(format!("quiet unacloud.cmd={cmd}")),
        }),
    )
    .await
    .map_err(fail("setting the kernel of"))?;
    Ok(id)
}

fn tap_config(ns: &str, v: usize, mac: &str) -> NetConfig {
    NetConfig::Tap {
        netns: Some(ns.to_string()),
        ifname: tap_name(v),
        ip: Some(format!("{}/24", vm_addr(v))),
        gateway: Some(VM_GATEWAY.to_string()),
        mac: mac.to_string(),
    }
}

/// The protocol's host for VM `v` on `pc`: colouring on its tap, local snapshots
/// through the PC's hypervisor.
fn vm_host(
    pc_name: &str,
    pc_ns: &str,
    hv: Arc<QemuHypervisor>,
    v: usize,
    backend: BackendKind,
) -> Result<Arc<dyn HostActions>> {
    let scope = Scope::interface(&tap_name(v))?;
    let dscp = DscpConfig::default();
    let vm = super::daemon::VmConfig {
        name: vm_name(v),
        netns: Some(pc_ns.to_string()),
        tap: Some(tap_name(v)),
        ..Default::default()
    };
    let colour: Box<dyn ColourBackend> = match backend {
        BackendKind::NftNetlink => Box::new(NftNetlink::open_in_netns(pc_ns, dscp)?.scope(scope)),
        other => super::daemon::build_vm_backend(other, &vm, dscp)?,
    };
    let hv: Arc<dyn Hypervisor> = hv;
    Ok(Arc::new(VmHost::on_host(
        pc_name,
        vm_name(v),
        colour,
        LocalSnapshot::Hypervisor {
            hv,
            live: true,
            margin: 64 << 20,
        },
    )?))
}

/// The protocol's hosts of every VM, VM `v` on PC `placement[v]`.
fn vm_hosts(
    pcs: &[Pc],
    placement: &[usize],
    backend: BackendKind,
) -> Result<Vec<Arc<dyn HostActions>>> {
    placement
        .iter()
        .enumerate()
        .map(|(v, &h)| vm_host(&pcs[h].name, &pcs[h].ns, pcs[h].hv()?.clone(), v, backend))
        .collect()
}

/// The protocol's nodes of one run (coordinator first), with their events merged.
struct Nodes {
    coordinator: NodeHandle,
    participants: Vec<NodeHandle>,
    events: mpsc::UnboundedReceiver<(usize, NodeEvent)>,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
}

impl Nodes {
    async fn spawn(
        hosts: Vec<Arc<dyn HostActions>>,
        cluster: ClusterId,
        transport: &TransportConfig,
        catalog: &Path,
        timeouts: Timeouts,
    ) -> Result<Self> {
        let n = hosts.len();
        let ids: Vec<ParticipantId> = (1..n as u32).map(ParticipantId).collect();
        let mut cc = CoordinatorConfig::new(cluster, ids, vec![vm_name(0)]);
        cc.timeouts = timeouts;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|source| Error::Network {
                peer: "127.0.0.1:0".to_string(),
                action: "listen",
                source,
            })?;
        let mut hosts = hosts.into_iter();
        let host0 = hosts.next().ok_or_else(|| Error::InvalidConfig {
            reason: "no VMs".to_string(),
        })?;
        let mut coordinator = spawn_coordinator(
            cc,
            Some(catalog.to_path_buf()),
            listener,
            None,
            transport.clone(),
            host0,
        )
        .await?;
        let addr = coordinator.local_addr().ok_or_else(|| Error::Rcpbt {
            reason: "the coordinator has no address".to_string(),
        })?;
        let mut participants = Vec::new();
        for (i, host) in hosts.enumerate() {
            let mut pc =
                ParticipantConfig::new(cluster, ParticipantId(i as u32 + 1), vec![vm_name(i + 1)]);
            pc.timeouts = timeouts;
            participants.push(spawn_participant(pc, addr, transport.clone(), host)?);
        }
        let (tx, events) = mpsc::unbounded_channel();
        let mut forwarders = Vec::new();
        let mut forward = |i: usize, node: &mut NodeHandle| {
            let mut rx = std::mem::replace(&mut node.events, mpsc::unbounded_channel().1);
            let tx = tx.clone();
            forwarders.push(tokio::spawn(async move {
                while let Some(e) = rx.recv().await {
                    if tx.send((i, e)).is_err() {
                        break;
                    }
                }
            }));
        };
        forward(0, &mut coordinator);
        for (i, p) in participants.iter_mut().enumerate() {
            forward(i + 1, p);
        }
        let nodes = Self {
            coordinator,
            participants,
            events,
            forwarders,
        };
        // Every participant connects before anything starts.
        let until = Instant::now() + Duration::from_secs(30);
        while nodes.coordinator.connected().len() < n - 1 {
            if Instant::now() > until {
                return Err(Error::Timeout {
                    what: format!("{} participants to connect", n - 1),
                    after: Duration::from_secs(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(nodes)
    }

    /// Waits for a coordinator event that `want` accepts.
    async fn wait(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&ProtocolEvent) -> bool,
    ) -> Result<ProtocolEvent> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(until, self.events.recv()).await {
                Err(_) => {
                    return Err(Error::Timeout {
                        what: "an event of the coordinator".to_string(),
                        after: timeout,
                    })
                }
                Ok(None) => {
                    return Err(Error::Rcpbt {
                        reason: "every protocol node stopped".to_string(),
                    })
                }
                Ok(Some((0, NodeEvent::Protocol(e)))) if want(&e) => return Ok(e),
                Ok(Some((i, NodeEvent::Error(e)))) => {
                    tracing::warn!(node = i, "protocol node error: {e}")
                }
                Ok(Some(_)) => {}
            }
        }
    }

    /// Stops every node gracefully; returns POST packets dropped and rule objects left.
    async fn stop(self) -> (u64, usize, Vec<String>) {
        let mut dropped = 0;
        let mut left = 0;
        let mut errors = Vec::new();
        for node in std::iter::once(self.coordinator).chain(self.participants) {
            let s = node.stop().await;
            dropped += s.post_packets_dropped;
            left += s.leftovers;
            if let Some(e) = s.error {
                errors.push(e);
            }
        }
        for f in self.forwarders {
            f.abort();
        }
        (dropped, left, errors)
    }
}

/// Whether the guest console of `vm` shows `needle` since its current run started.
async fn console_has(hv: &QemuHypervisor, vm: &VmId, needle: &str) -> bool {
    let Ok((log, off)) = hv.console(vm).await else {
        return false;
    };
    let Ok(bytes) = std::fs::read(&log) else {
        return false;
    };
    let from = usize::try_from(off).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).contains(needle)
}

/// The console tail of a VM, for errors.
async fn console_tail(hv: &QemuHypervisor, vm: &VmId) -> String {
    let Ok((log, _)) = hv.console(vm).await else {
        return String::new();
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(4).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Our nf_tables tables and iptables chains left in a namespace.
fn rules_in(ns: &str) -> usize {
    let argv: Vec<String> = ["ip", "netns", "exec", ns, "nft", "list", "tables"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let tables = run_argv(&argv, IP_TIMEOUT)
        .map(|o| {
            o.stdout
                .lines()
                .filter(|l| l.contains(crate::colour::nft::DEFAULT_TABLE))
                .count()
        })
        .unwrap_or(0);
    let argv: Vec<String> = ["ip", "netns", "exec", ns, "iptables-save"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let chains = run_argv(&argv, IP_TIMEOUT)
        .map(|o| o.stdout.lines().filter(|l| l.starts_with(":UC-")).count())
        .unwrap_or(0);
    tables + chains
}

/// QEMU processes still running under `root`.
fn qemu_processes_under(root: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let needle = root.as_os_str().as_encoded_bytes().to_vec();
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                c.starts_with(b"qemu-system")
                    && c.windows(needle.len().max(1))
                        .any(|w| w == needle.as_slice())
            })
        })
        .count()
}

/// Kills every QEMU process under the run's folder when dropped.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        kill_all_under(&self.0);
    }
}

/// Copies the minimal file set of `vm` for `snapshot` from `from` to `to`'s root and
/// registers it there, on `to_ns`'s tap; returns the bytes copied.
async fn relocate_vm(
    from: &QemuHypervisor,
    from_root: &Path,
    to: &QemuHypervisor,
    to_root: &Path,
    to_ns: &str,
    v: usize,
    snapshot: &str,
) -> Result<u64> {
    let name = vm_name(v);
    let id = VmId::from(name.as_str());
    let set = from
        .snapshot_files(&id, snapshot)
        .await
        .map_err(hv_err(format!(
            "listing the files of {name} for {snapshot}"
        )))?;
    let mut settings = None;
    let mut bytes = 0;
    for f in &set.files {
        let rel = f.path.strip_prefix(from_root).map_err(|_| Error::Rcpbt {
            reason: format!("{} is outside {}", f.path.display(), from_root.display()),
        })?;
        let dest = to_root.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        bytes += std::fs::copy(&f.path, &dest).map_err(io_err(&dest))?;
        if f.role == unacloud_core::files::FileRole::Settings {
            settings = Some(dest);
        }
    }
    let settings = settings.ok_or_else(|| Error::Rcpbt {
        reason: format!("the file set of {name} has no settings file"),
    })?;
    let info = to
        .register_vm(&settings)
        .await
        .map_err(hv_err(format!("registering {name} on the spare host")))?;
    let uuid = info.uuid.ok_or_else(|| Error::Rcpbt {
        reason: format!("VM {name} has no uuid"),
    })?;
    to.set_vm_network(&id, tap_config(to_ns, v, &mac_for(&uuid)))
        .await
        .map_err(hv_err(format!("connecting {name} on the spare host")))?;
    Ok(bytes)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Rcpbt {
            reason: format!("blocking task failed: {e}"),
        })
}

/// Runs the experiment. Needs root (see [`crate::netns::probe`]) and QEMU.
pub async fn run_ring_vms(cfg: RingVmsConfig) -> Result<RingVmsReport> {
    cfg.validate()?;
    let started = Instant::now();
    let deadline = started + cfg.deadline;
    let left = move || deadline.saturating_duration_since(Instant::now());
    let n_vms = cfg.vms as usize;
    let n_hosts = cfg.hosts as usize;
    let n_all = n_hosts + cfg.spare_hosts as usize;
    let mut report = RingVmsReport {
        vms: cfg.vms,
        hosts: cfg.hosts,
        tokens_expected: cfg.tokens,
        ..RingVmsReport::default()
    };

    // 1. The lab: one namespace per PC on the lab bridge.
    // The VMs of a run that was killed die first (their taps go with its namespaces).
    blocking(|| {
        for d in crate::netns::stale_run_dirs() {
            let n = kill_all_under(&d);
            if n > 0 {
                tracing::warn!(dir = %d.display(), vms = n, "killed the VMs of a killed run");
            }
        }
    })
    .await?;
    let lab = blocking(move || NetnsLab::create(n_all)).await??;
    let mut lab = LabGuard(lab);
    let hub = lab.0.hub().to_string();
    // Private (0700, unpredictable name); a later run kills the VMs of a killed run and
    // removes its directory.
    let dir = RunDir::create()?;
    let reaper = Reaper(dir.path().to_path_buf());
    // If this process is killed, its reaper kills the VMs and removes the lab.
    let _lab_reaper =
        super::ring::spawn_reaper(&cfg.program, &cfg.program_args, dir.path(), lab.0.prefix())?;
    {
        let hub = hub.clone();
        let pcs: Vec<String> = lab.0.peers().iter().map(|p| p.name.clone()).collect();
        blocking(move || -> Result<()> {
            sysctl(&hub, "net.ipv4.ip_forward", "1")?;
            sysctl(&hub, "net.ipv4.conf.all.send_redirects", "0")?;
            sysctl(&hub, "net.ipv4.conf.br0.send_redirects", "0")?;
            for ns in &pcs {
                prepare_pc_network(ns)?;
            }
            Ok(())
        })
        .await??;
    }

    // 2. PCs: each with its own copy of the template. The accelerator is probed once.
    let mut accel = cfg.accel;
    let mut pcs: Vec<Pc> = Vec::with_capacity(n_all);
    for (i, p) in lab.0.peers().iter().enumerate() {
        let name = if i < n_hosts {
            format!("pc-{i}")
        } else {
            format!("spare-{}", i - n_hosts)
        };
        let pc = open_pc(
            name,
            p.name.clone(),
            p.addr,
            dir.path().join(format!("pc{i}")),
            &cfg.guest,
            accel,
        )
        .await?;
        if i == 0 {
            accel = pc
                .hv()?
                .accelerator(None)
                .await
                .map_err(hv_err("choosing the accelerator".to_string()))?;
            report.accel = accel.to_string();
        }
        pcs.push(pc);
    }
    let host_of: Vec<usize> = (0..n_vms).map(|v| v % n_hosts).collect();

    // 3. VMs: one per PC (two when there are more VMs than PCs), booted in parallel.
    let mut vm_ids = Vec::with_capacity(n_vms);
    for (v, &h) in host_of.iter().enumerate() {
        let (ns, addr) = (pcs[h].ns.clone(), pcs[h].addr);
        let hub2 = hub.clone();
        blocking(move || plug_vm(&ns, addr, &hub2, v)).await??;
        vm_ids.push(provision_vm(&pcs[h], &cfg.guest, v, cfg.memory_mb).await?);
    }
    let boot_started = Instant::now();
    let mut boots = Vec::with_capacity(n_vms);
    for (v, &h) in host_of.iter().enumerate() {
        let hv = pcs[h].hv()?.clone();
        let id = vm_ids[v].clone();
        let boot = async move {
            hv.start_vm_with(
                &id,
                StartOptions {
                    wait_guest: Some(Duration::from_secs(180)),
                },
            )
            .await
            .map_err(hv_err(format!("booting {id}")))
        };
        boots.push(boot);
    }
    for r in futures::future::join_all(boots).await {
        r?;
    }
    report.boot_ms = boot_started.elapsed().as_secs_f64() * 1e3;

    // 4. The protocol's nodes, on the management network (loopback).
    let key_bytes: [u8; 32] = rand::random();
    let key_hex = super::frame::hex_encode(&key_bytes);
    let cluster = ClusterId(u64::from(rand::random::<u32>()));
    let transport = TransportConfig::new(cluster, Some(ClusterKey::from_hex(&key_hex)?));
    let catalog = dir.path().join("catalog.json");
    let timeouts = Timeouts {
        precheck: Duration::from_secs(10),
        snapshot: Duration::from_secs(120),
        poll_interval: Duration::from_secs(1),
        poll_give_up: Some(Duration::from_secs(120)),
        resume_phase: Duration::from_secs(300),
    };
    let hosts = vm_hosts(&pcs, &host_of, cfg.backend)?;
    let mut nodes = Some(Nodes::spawn(hosts, cluster, &transport, &catalog, timeouts).await?);

    // 5. The test manager in the hub: the ring starts once every guest registered.
    let mut procs = Procs::default();
    let deadline_s = (cfg.deadline.as_secs() + 5).to_string();
    let mut tm = Command::new("ip");
    tm.args(["netns", "exec", &hub])
        .arg(&cfg.program)
        .args(&cfg.program_args)
        .arg("rcpbt-manager")
        .args([
            "--listen",
            &SocketAddr::from((HUB_ADDR, TM_PORT)).to_string(),
            "--tokens",
            &cfg.tokens.to_string(),
            "--base-port",
            &PEER_BASE_PORT.to_string(),
            "--participants",
            &cfg.vms.to_string(),
            "--label",
            &format!("ring_vms-{}vms-{}hosts", cfg.vms, cfg.hosts),
            "--deadline-s",
            &deadline_s,
        ])
        .env(
            crate::netns::DIE_WITH_PARENT_ENV,
            std::process::id().to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("manager.log"))
                .map_err(io_err(&dir.path().join("manager.log")))?,
        ))
        .kill_on_drop(true);
    let mut tm_child = tm.spawn().map_err(|source| Error::CommandSpawn {
        program: "ip netns exec (test manager)".to_string(),
        source,
    })?;
    let tm_out = tm_child.stdout.take();
    let (tm_tx, mut tm_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let mut s = String::new();
        if let Some(out) = tm_out {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                s = l;
            }
        }
        let _ = tm_tx.send(s);
    });
    procs.push("manager".to_string(), tm_child);
    let until = Instant::now() + Duration::from_secs(120).min(left());
    'ring: loop {
        let mut all = true;
        for (v, &h) in host_of.iter().enumerate() {
            if !console_has(pcs[h].hv()?, &vm_ids[v], "ring-peer: ring closed").await {
                all = false;
                if Instant::now() > until {
                    return Err(Error::Rcpbt {
                        reason: format!(
                            "the ring did not form in the guests ({} said: {})",
                            vm_ids[v],
                            console_tail(pcs[h].hv()?, &vm_ids[v]).await
                        ),
                    });
                }
            }
        }
        if all {
            break 'ring;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 6. Global snapshots while the ring runs.
    // Whether the ring still runs. A result that has arrived is kept for step 8 (a
    // oneshot receiver must not be awaited again once it has given its value).
    let mut tm_finished: Option<String> = None;
    let ring_running = |rx: &mut tokio::sync::oneshot::Receiver<String>,
                        finished: &mut Option<String>| {
        if finished.is_some() {
            return false;
        }
        match rx.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => true,
            Ok(line) => {
                *finished = Some(line);
                false
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                *finished = Some(String::new());
                false
            }
        }
    };
    let mut last_completed: Option<GlobalSnapshotId> = None;
    for _ in 0..cfg.snapshots {
        tokio::time::sleep(cfg.gap).await;
        if !ring_running(&mut tm_rx, &mut tm_finished) {
            report.failures.push(
                "the ring finished before every global snapshot was taken; give it more tokens"
                    .to_string(),
            );
            break;
        }
        let Some(n) = nodes.as_mut() else { break };
        let gs = n.coordinator.start_global_snapshot().await?;
        let ev = n
            .wait(Duration::from_secs(240).min(left()), |e| {
                matches!(
                    e,
                    ProtocolEvent::GlobalSnapshotCompleted { gs: g, .. }
                        | ProtocolEvent::GlobalSnapshotFailed { gs: g, .. } if *g == gs
                )
            })
            .await?;
        match ev {
            ProtocolEvent::GlobalSnapshotCompleted {
                local_times,
                global_time,
                ..
            } => {
                report.global_snapshots_completed += 1;
                report.completed_ids.push(gs.0);
                last_completed = Some(gs);
                // Each VM's local snapshot as its hypervisor recorded it: how long the
                // guest was paused, and how long until the state was on disk.
                let snap = local_snapshot_name(gs);
                let mut slowest = local_times
                    .iter()
                    .map(|t| t.local_time)
                    .max()
                    .unwrap_or_default();
                for (v, &h) in host_of.iter().enumerate() {
                    if let Ok(s) = pcs[h].hv()?.vm_settings(&vm_ids[v]).await {
                        if let Some(m) = s.snapshots.iter().find(|m| m.name == snap) {
                            if let Some(us) = m.downtime_us {
                                report.vm_downtime_ms.push(us as f64 / 1e3);
                            }
                            if let Some(us) = m.took_us {
                                slowest = slowest.max(Duration::from_micros(us));
                            }
                        }
                    }
                }
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                report.local_ms.push(ms(slowest));
                report.global_ms.push(ms(global_time));
                report
                    .overhead_ms
                    .push(ms(global_time.saturating_sub(slowest)));
            }
            ProtocolEvent::GlobalSnapshotFailed { who, why, .. } => {
                report.global_snapshots_failed += 1;
                report.failures.push(format!(
                    "global snapshot {}: participants {who:?}: {why}",
                    gs.0
                ));
            }
            _ => {}
        }
    }

    // 7. Every PC powered off, then back on; the application resumes.
    if cfg.power_off {
        if !ring_running(&mut tm_rx, &mut tm_finished) {
            return Err(Error::Rcpbt {
                reason: "the ring finished before the power-off; give it more tokens".to_string(),
            });
        }
        let gs = last_completed.ok_or_else(|| Error::Rcpbt {
            reason: "no global snapshot completed: nothing to resume from".to_string(),
        })?;
        for pc in &pcs[..n_hosts] {
            let root = pc.root.clone();
            blocking(move || kill_all_under(&root)).await?;
        }
        if let Some(n) = nodes.take() {
            // The host agents die with their PCs (their rules with the PCs' kernels).
            let (dropped, _, _) = n.stop().await;
            report.post_packets_dropped += dropped;
        }
        for pc in pcs.iter_mut().take(n_hosts) {
            pc.hv = None;
        }
        report.powered_off = true;

        // Power back: every PC's backend is reopened from its files.
        for pc in pcs.iter_mut().take(n_hosts) {
            pc.hv = Some(reopen_pc(pc, accel).await?);
        }
        let mut placed = host_of.clone();
        let snap = local_snapshot_name(gs);
        for k in 0..cfg.relocate as usize {
            let v = n_vms - 1 - k;
            let from = host_of[v];
            let to = n_hosts + k % cfg.spare_hosts as usize;
            let bytes = relocate_vm(
                pcs[from].hv()?,
                &pcs[from].root,
                pcs[to].hv()?,
                &pcs[to].root,
                &pcs[to].ns,
                v,
                &snap,
            )
            .await?;
            let (old_ns, new_ns, new_addr, hub2) = (
                pcs[from].ns.clone(),
                pcs[to].ns.clone(),
                pcs[to].addr,
                hub.clone(),
            );
            blocking(move || -> Result<()> {
                ip(&["-n", &old_ns, "link", "del", &tap_name(v)])?;
                plug_vm(&new_ns, new_addr, &hub2, v)
            })
            .await??;
            report.relocated.push(Relocation {
                vm: vm_name(v),
                from: pcs[from].name.clone(),
                to: pcs[to].name.clone(),
                bytes_copied: bytes,
            });
            placed[v] = to;
        }
        let hosts = vm_hosts(&pcs, &placed, cfg.backend)?;
        let mut n = Nodes::spawn(hosts, cluster, &transport, &catalog, timeouts).await?;
        let resume_started = Instant::now();
        let restoring = n.coordinator.start_resume(None).await?;
        report.restored_from = Some(restoring.0);
        let ev = n
            .wait(Duration::from_secs(600).min(left()), |e| {
                matches!(
                    e,
                    ProtocolEvent::ResumeCompleted { .. } | ProtocolEvent::ResumeFailed { .. }
                )
            })
            .await?;
        if let ProtocolEvent::ResumeFailed { who, why, .. } = ev {
            return Err(Error::Rcpbt {
                reason: format!("the resume failed at participants {who:?}: {why}"),
            });
        }
        report.resume_ms = Some(resume_started.elapsed().as_secs_f64() * 1e3);
        nodes = Some(n);
    }

    // 8. The ring's own result.
    let line = match tm_finished {
        Some(line) => line,
        None => tokio::time::timeout(left(), &mut tm_rx)
            .await
            .map_err(|_| Error::Timeout {
                what: "the ring to finish".to_string(),
                after: cfg.deadline,
            })?
            .unwrap_or_default(),
    };
    match serde_json::from_str::<serde_json::Value>(&line) {
        Ok(outcome) => {
            report.tokens_counted = outcome["tokens_counted"].as_u64().unwrap_or(0);
            report.ring_duration_s = outcome["duration_s"].as_f64().unwrap_or(0.0);
        }
        Err(_) => {
            let log = std::fs::read_to_string(dir.path().join("manager.log")).unwrap_or_default();
            report.failures.push(format!(
                "the test manager produced no result: {}",
                log.lines().last().unwrap_or("")
            ));
        }
    }

    // 9. Teardown: nodes (rules), VMs, namespaces.
    if let Some(n) = nodes.take() {
        let (dropped, left_objs, errors) = n.stop().await;
        report.post_packets_dropped += dropped;
        report.rules_left += left_objs;
        report.failures.extend(errors);
    }
    let names: Vec<String> = lab.0.peers().iter().map(|p| p.name.clone()).collect();
    report.rules_left += blocking(move || names.iter().map(|n| rules_in(n)).sum::<usize>()).await?;
    for pc in &pcs {
        let Some(hv) = &pc.hv else { continue };
        for info in hv.list_vms().await.unwrap_or_default() {
            if info.state.is_running() {
                if let Err(e) = hv.power_off(&VmId::from(info.name.as_str())).await {
                    report
                        .failures
                        .push(format!("powering {} off on {}: {e}", info.name, pc.name));
                }
            }
        }
    }
    let root = dir.path().to_path_buf();
    report.vms_left = blocking(move || {
        let until = Instant::now() + Duration::from_secs(10);
        let mut n = qemu_processes_under(&root);
        while n > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
            n = qemu_processes_under(&root);
        }
        n
    })
    .await?;
    drop(procs);
    drop(reaper);
    let mut lab_inner = std::mem::replace(&mut lab.0, NetnsLab::empty());
    report.namespaces_left = blocking(move || {
        let _ = lab_inner.teardown();
        lab_inner.namespaces_left().unwrap_or(usize::MAX)
    })
    .await?;
    drop(pcs);
    drop(dir);
    Ok(report)
}

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
use super::ring::{blocking, LabGuard, Procs};
use crate::colour::exec::{check, run_argv};
use crate::colour::netlink::NftNetlink;
use crate::colour::{ColourBackend, Scope};
use crate::net::{Error, Result};
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

mod config;
#[cfg(feature = "etcd")]
mod etcd;
mod network;
mod nodes;
mod pcs;

pub use config::*;
use network::*;
use nodes::*;
use pcs::*;

/// Kills every QEMU process under the run's folder when dropped.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        kill_all_under(&self.0);
    }
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
    // With the control plane on etcd: the lab's own cluster, in the run directory.
    #[cfg(feature = "etcd")]
    let etcd_lab = match &cfg.etcd {
        Some(e) => Some(etcd_lab_start(e, dir.path(), cluster).await?),
        None => None,
    };
    #[cfg(feature = "etcd")]
    let mode = match (&cfg.etcd, &etcd_lab) {
        (Some(e), Some((c, _))) => NodesMode::Etcd {
            config: crate::control::EtcdConfig::new(c.endpoints(), cluster),
            lease_ttl: e.lease_ttl,
            candidates: n_hosts,
        },
        _ => NodesMode::Embedded,
    };
    #[cfg(not(feature = "etcd"))]
    let mode = NodesMode::Embedded;
    #[cfg(feature = "etcd")]
    let mut etcd_report = cfg.etcd.as_ref().map(|e| super::ring::EtcdLabReport {
        etcd_nodes: e.nodes,
        ..Default::default()
    });
    #[cfg(feature = "etcd")]
    let mut killed_at: Option<Instant> = None;
    let hosts = vm_hosts(&pcs, &host_of, cfg.backend)?;
    let mut nodes =
        Some(Nodes::spawn_mode(&mode, hosts, cluster, &transport, &catalog, timeouts).await?);

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
        let gs = n.start_global_snapshot().await?;
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
                #[cfg(feature = "etcd")]
                if let Some(t) = killed_at.take() {
                    if let Some(r) = etcd_report.as_mut() {
                        r.failover_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
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
        #[cfg(feature = "etcd")]
        if let (Some(e), Some(r), Some(n)) = (&cfg.etcd, etcd_report.as_mut(), nodes.as_mut()) {
            let done = report.global_snapshots_completed;
            if e.kill_coordinator_after == Some(done) && done < cfg.snapshots {
                if let Some(en) = n.etcd.as_mut() {
                    let who = en.kill_coordinator().await?;
                    tracing::info!(%who, "killed the coordinator");
                    killed_at = Some(Instant::now());
                    r.coordinator_failovers += 1;
                }
            }
            if e.kill_etcd_leader_after == Some(done) && done < cfg.snapshots {
                if let Some((c, pids)) = etcd_lab.as_ref() {
                    if let Some(l) = c.leader().await {
                        if let Some(pid) = c.kill(l) {
                            pids.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
                            r.etcd_leader_kills += 1;
                        }
                    }
                }
            }
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
        let mut n =
            Nodes::spawn_mode(&mode, hosts, cluster, &transport, &catalog, timeouts).await?;
        let resume_started = Instant::now();
        let restoring = n.start_resume(None).await?;
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
    #[cfg(feature = "etcd")]
    if let (Some(r), Some(n)) = (etcd_report.as_mut(), nodes.as_ref()) {
        if let Some(en) = n.etcd.as_ref() {
            r.catalog_in_etcd = en.recorded().await?;
        }
        r.completed_ids = report.completed_ids.clone();
    }
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
        let mut n = unacloud_core::qemu::vm_processes_under(&root).len();
        while n > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
            n = unacloud_core::qemu::vm_processes_under(&root).len();
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
    #[cfg(feature = "etcd")]
    if let Some((c, pids)) = etcd_lab {
        let n = cfg.etcd.as_ref().map_or(0, |e| e.nodes);
        let mut pids = pids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for i in 0..n {
            if let Some(pid) = c.kill(i) {
                pids.push(pid);
            }
        }
        let data = c.dir().to_path_buf();
        drop(c);
        if let Some(r) = etcd_report.as_mut() {
            r.etcd_processes_left = pids
                .iter()
                .filter(|p| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(**p as i32), None).is_ok()
                })
                .count();
            r.etcd_dirs_removed = !data.exists();
        }
        report.etcd = etcd_report;
    }
    drop(pcs);
    drop(dir);
    Ok(report)
}

/// Starts the lab's etcd cluster in the run directory; the list collects the process
/// ids of the members killed during the run.
#[cfg(feature = "etcd")]
async fn etcd_lab_start(
    e: &super::ring::EtcdLabConfig,
    dir: &Path,
    _cluster: ClusterId,
) -> Result<(
    crate::control::cluster::EtcdCluster,
    std::sync::Mutex<Vec<u32>>,
)> {
    let mut ec = crate::control::cluster::EtcdClusterConfig::loopback(e.nodes);
    ec.dir = Some(dir.join("etcd"));
    let c = crate::control::cluster::EtcdCluster::start(ec).await?;
    Ok((c, std::sync::Mutex::new(Vec::new())))
}

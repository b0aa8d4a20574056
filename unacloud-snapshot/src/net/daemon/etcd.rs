//! The launcher with the control plane on etcd (`--control etcd`), and the coordinator
//! candidate daemon.
//!
//! The launcher builds its hosts exactly as with the embedded control plane (the same
//! colouring backends, local-snapshot methods and scope locks), but registers each VM in
//! etcd ([`crate::control::agent::HostAgent`]) instead of with a metadata server, and its
//! participants follow the elected coordinator. Coordinating is the business of the
//! candidates ([`run_candidate_daemon`]), one per host, of which etcd elects one.

use super::*;
use crate::control::agent::{self, CandidateConfig, CandidateEvent, HostAgent, HostAgentConfig};
use crate::control::EtcdConfig;

/// etcd settings of a launcher or candidate.
#[derive(Debug, Clone)]
pub struct EtcdControl {
    /// etcd client endpoints.
    pub endpoints: Vec<String>,
    /// The lease TTL of the host (launcher) or of the candidate.
    pub lease_ttl: Duration,
}

impl EtcdControl {
    fn config(&self, cluster: ClusterId) -> EtcdConfig {
        EtcdConfig::new(self.endpoints.clone(), cluster)
    }
}

/// Runs a launcher whose VMs register in etcd, until `shutdown`; events as
/// [`run_launcher`]'s (`Registered` carries port 0: participants dial out, nobody dials
/// them).
pub async fn run_launcher_etcd(
    cfg: &DaemonConfig,
    control: &EtcdControl,
    opts: LauncherOptions,
    shutdown: CancellationToken,
    mut on_event: impl FnMut(LauncherEvent) + Send,
) -> Result<()> {
    let section = launcher_section(cfg)?;
    let transport = cfg.transport()?;
    let dscp = cfg.dscp()?;
    let timeouts = cfg.timeouts();
    let run_dir = section.run_dir.clone().unwrap_or_else(default_run_dir);
    let locks = lock_vm_scopes(&run_dir, &section.vms)?;
    let hv = match &section.hypervisor {
        Some(h) => Some(open_hypervisor(h).await?),
        None => None,
    };
    let mut agents: Vec<(String, HostAgent)> = Vec::new();
    let mut started = Ok(());
    for vm in &section.vms {
        if shutdown.is_cancelled() {
            break;
        }
        let method = local_snapshot(vm, hv.as_ref())?;
        let backend = build_vm_backend(section.backend, vm, dscp)?;
        let host: Arc<dyn HostActions> = Arc::new(VmHost::new(&vm.name, backend, method)?);
        let host: Arc<dyn HostActions> = match opts.crash_after_step {
            Some(step) => Arc::new(fault::CrashAfterStep::new(host, step)),
            None => host,
        };
        let hc = HostAgentConfig {
            etcd: control.config(transport.cluster),
            addr: section.advertise.to_string(),
            vms: vec![vm.name.clone()],
            lease_ttl: control.lease_ttl,
            timeouts,
        };
        match HostAgent::start(hc, transport.clone(), host.clone()).await {
            Ok(a) => {
                on_event(LauncherEvent::Registered {
                    vm: vm.name.clone(),
                    id: a.id.0,
                    port: 0,
                });
                agents.push((vm.name.clone(), a));
            }
            Err(e) => {
                let summary = host.shutdown().await;
                on_event(LauncherEvent::Summary {
                    vm: vm.name.clone(),
                    id: None,
                    summary,
                });
                started = Err(e.into());
                break;
            }
        }
    }
    if started.is_ok() && !shutdown.is_cancelled() {
        on_event(LauncherEvent::Ready {
            participants: agents.len(),
        });
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(ParticipantId, NodeEvent)>();
        let mut forwarders = Vec::new();
        for (_, a) in agents.iter_mut() {
            let mut rx = std::mem::replace(&mut a.node.events, mpsc::unbounded_channel().1);
            let tx = ev_tx.clone();
            let id = a.id;
            forwarders.push(tokio::spawn(async move {
                while let Some(e) = rx.recv().await {
                    if tx.send((id, e)).is_err() {
                        break;
                    }
                }
            }));
        }
        drop(ev_tx);
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => break,
                i = ev_rx.recv() => i,
            };
            let Some((id, ev)) = item else { break };
            if let Some(le) = translate(id, &ev) {
                on_event(le);
            }
        }
        for f in forwarders {
            f.abort();
        }
    }
    for (vm, a) in agents {
        let id = a.id;
        let summary = a.stop().await;
        on_event(LauncherEvent::Summary {
            vm,
            id: Some(id.0),
            summary,
        });
    }
    drop(locks);
    started
}

/// What a candidate daemon reports (one JSON object per line with `--events-json`).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum CandidateReport {
    /// This candidate holds the coordinator role.
    Elected {
        /// The election revision (increases with every leader).
        revision: i64,
        /// The global snapshot that was in flight under the previous coordinator, now
        /// failed.
        failed_in_flight: Option<u64>,
        /// The participants.
        participants: Vec<u32>,
        /// This process.
        pid: u32,
    },
    /// The role was lost; campaigning again.
    Lost {
        /// Why.
        reason: String,
    },
    /// A coordinator event, as a launcher reports it.
    #[serde(untagged)]
    Coordinator(LauncherEvent),
}

/// Runs a coordinator candidate until `shutdown` (resigning the role if held).
pub async fn run_candidate_daemon(
    cfg: &DaemonConfig,
    control: &EtcdControl,
    name: String,
    listen: SocketAddr,
    shutdown: CancellationToken,
    mut on_event: impl FnMut(CandidateReport) + Send,
) -> Result<()> {
    let transport = cfg.transport()?;
    let cc = CandidateConfig {
        etcd: control.config(transport.cluster),
        name,
        listen,
        lease_ttl: control.lease_ttl,
        timeouts: cfg.timeouts(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(agent::run_candidate(cc, transport, shutdown.clone(), tx));
    while let Some(e) = rx.recv().await {
        let report = match e {
            CandidateEvent::Elected {
                revision,
                failed_in_flight,
                participants,
            } => Some(CandidateReport::Elected {
                revision,
                failed_in_flight: failed_in_flight.map(|g| g.0),
                participants: participants.iter().map(|p| p.0).collect(),
                pid: std::process::id(),
            }),
            CandidateEvent::Lost { reason } => Some(CandidateReport::Lost { reason }),
            CandidateEvent::Node(ev) => {
                translate(ParticipantId::COORDINATOR, &ev).map(CandidateReport::Coordinator)
            }
            CandidateEvent::TriggerRefused { reason, .. } => Some(CandidateReport::Coordinator(
                LauncherEvent::TriggerRefused { reason },
            )),
        };
        if let Some(r) = report {
            on_event(r);
        }
    }
    match task.await {
        Ok(r) => Ok(r?),
        // The candidate task panicked or was cancelled: its coordinator node is gone.
        Err(e) => {
            tracing::error!(error = %e, "the candidate task failed");
            Err(Error::NodeStopped)
        }
    }
}

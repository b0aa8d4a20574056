//! `ring_vms --control etcd`: the hosts register their VMs in the lab's etcd cluster and
//! one coordinator candidate per PC campaigns for the role.
//!
//! As every protocol node of this lab, the host agents and the candidates run in this
//! process (the PCs' management network is loopback). "Killing the coordinator" aborts
//! the elected candidate's task without resigning: its connections drop at once and its
//! lease runs out as a dead PC's would; `ring_netns --control etcd` kills a real process.

use super::*;
use crate::control::agent::{self, CandidateConfig, CandidateEvent, HostAgent, HostAgentConfig};
use crate::control::catalog::{self, Trigger};
use crate::control::election;
use crate::control::{Etcd, EtcdConfig};
use crate::net::host::HostSummary;
use tokio_util::sync::CancellationToken;

type CandidateTask = tokio::task::JoinHandle<crate::control::Result<()>>;

/// The host agents and candidates of one run.
pub(super) struct EtcdNodes {
    etcd: Etcd,
    agents: Vec<HostAgent>,
    candidates: Vec<(String, CandidateTask, CancellationToken)>,
}

impl EtcdNodes {
    /// Queues a trigger (retrying while etcd elects a leader of its own).
    pub(super) async fn trigger(&self, t: Trigger) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match catalog::put_trigger(&self.etcd, &t).await {
                Ok(_) => return Ok(()),
                Err(_) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Aborts the task of the candidate holding the coordinator role (without
    /// resigning); returns its name.
    pub(super) async fn kill_coordinator(&mut self) -> Result<String> {
        let leader = election::current_leader(&self.etcd)
            .await?
            .ok_or_else(|| Error::Rcpbt {
                reason: "nobody holds the coordinator role".to_string(),
            })?;
        let (name, task, _) = self
            .candidates
            .iter()
            .find(|(n, _, _)| *n == leader.candidate)
            .ok_or_else(|| Error::Rcpbt {
                reason: format!("no candidate named {}", leader.candidate),
            })?;
        task.abort();
        Ok(name.clone())
    }

    /// The completed global snapshots recorded in etcd.
    pub(super) async fn recorded(&self) -> Result<Vec<u64>> {
        Ok(catalog::recorded(&self.etcd)
            .await?
            .iter()
            .map(|r| r.snapshot.gs.0)
            .collect())
    }

    /// Stops the candidates (resigning) and the host agents (revoking their leases).
    pub(super) async fn stop(self) -> Vec<HostSummary> {
        for (_, _, stop) in &self.candidates {
            stop.cancel();
        }
        for (_, task, _) in self.candidates {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let mut v = Vec::new();
        for a in self.agents {
            v.push(a.stop().await);
        }
        v
    }
}

impl Nodes {
    /// The nodes with the control plane on etcd: one host agent per VM (named after the
    /// VM, so a VM that resumes on another PC keeps its id) and `candidates` candidates.
    pub(super) async fn spawn_etcd(
        hosts: Vec<Arc<dyn HostActions>>,
        etcd_config: &EtcdConfig,
        lease_ttl: Duration,
        candidates: usize,
        transport: &TransportConfig,
        timeouts: Timeouts,
    ) -> Result<Self> {
        let etcd = Etcd::connect(etcd_config).await?;
        let (tx, events) = mpsc::unbounded_channel();
        let mut forwarders = Vec::new();
        let mut agents = Vec::new();
        for (i, host) in hosts.into_iter().enumerate() {
            let hc = HostAgentConfig {
                etcd: etcd_config.clone(),
                addr: vm_name(i),
                vms: vec![vm_name(i)],
                lease_ttl,
                timeouts,
            };
            let mut a = HostAgent::start(hc, transport.clone(), host).await?;
            let mut rx = std::mem::replace(&mut a.node.events, mpsc::unbounded_channel().1);
            let tx = tx.clone();
            let node = a.id.0 as usize;
            forwarders.push(tokio::spawn(async move {
                while let Some(e) = rx.recv().await {
                    if tx.send((node, e)).is_err() {
                        break;
                    }
                }
            }));
            agents.push(a);
        }
        let mut cands = Vec::new();
        for c in 0..candidates.max(1) {
            let listener =
                std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|source| {
                    Error::Network {
                        peer: "127.0.0.1:0".to_string(),
                        action: "listen",
                        source,
                    }
                })?;
            let listen = listener.local_addr().map_err(|source| Error::Network {
                peer: "127.0.0.1:0".to_string(),
                action: "listen",
                source,
            })?;
            drop(listener);
            let name = format!("candidate-pc-{c}");
            let cc = CandidateConfig {
                etcd: etcd_config.clone(),
                name: name.clone(),
                listen,
                lease_ttl,
                timeouts,
            };
            let (etx, mut erx) = mpsc::unbounded_channel();
            let tx = tx.clone();
            forwarders.push(tokio::spawn(async move {
                while let Some(e) = erx.recv().await {
                    let ev = match e {
                        CandidateEvent::Node(ev) => ev,
                        CandidateEvent::Elected { revision, .. } => {
                            tracing::info!(revision, "a coordinator was elected");
                            continue;
                        }
                        CandidateEvent::Lost { reason } => NodeEvent::Error(reason),
                        CandidateEvent::TriggerRefused { reason, .. } => NodeEvent::Error(reason),
                    };
                    if tx.send((0, ev)).is_err() {
                        break;
                    }
                }
            }));
            let stop = CancellationToken::new();
            let task = tokio::spawn(agent::run_candidate(
                cc,
                transport.clone(),
                stop.clone(),
                etx,
            ));
            cands.push((name, task, stop));
        }
        Ok(Self {
            coordinator: None,
            participants: Vec::new(),
            etcd: Some(EtcdNodes {
                etcd,
                agents,
                candidates: cands,
            }),
            events,
            forwarders,
        })
    }
}

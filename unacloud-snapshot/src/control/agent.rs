//! The daemons of the etcd control plane: host agents and coordinator candidates.
//!
//! * [`HostAgent`] registers a host's VMs ([`super::registry::register`]), keeps its
//!   liveness key alive under a lease, and runs the host's participant, which follows the
//!   elected coordinator's address: when the role moves, the participant drops its
//!   connection and dials the new coordinator.
//! * [`run_candidate`] campaigns for the coordinator role. When it wins it reads the
//!   catalog and the registrations from etcd, declares the global snapshot that was in
//!   flight failed (its id was reserved, it is not in the catalog, and the next id is
//!   higher), and runs a coordinator whose catalog writes are fenced by the leadership.
//!   It takes the operators' triggers from etcd. When the leadership is lost — the lease
//!   expired, or a fenced write halted the coordinator — it stops the coordinator and
//!   campaigns again.
//!
//! The elected coordinator is the protocol's id 0 and has no VMs of its own: it runs
//! beside a host agent, whose participant covers that host's VMs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::catalog::{self, EtcdCatalog, Trigger};
use super::election::{self, CoordinatorInfo};
use super::registry::{self, Lease};
use super::{ControlError, Etcd, EtcdConfig, Result};
use crate::net::conn::TransportConfig;
use crate::net::host::{HostActions, HostSummary};
use crate::net::node::{
    spawn_coordinator_with, spawn_participant_following, CatalogSink, NodeEvent, NodeHandle,
};
use crate::protocol::{
    ActionOutcome, CoordinatorConfig, GlobalSnapshotId, HostAction, ParticipantConfig,
    ParticipantId, ProtocolEvent, Timeouts,
};

/// How often agents poll etcd for the leader and candidates for triggers.
pub const POLL: Duration = Duration::from_millis(100);

/// A host agent's settings.
#[derive(Debug, Clone)]
pub struct HostAgentConfig {
    /// etcd.
    pub etcd: EtcdConfig,
    /// The host's address (recorded with the registration).
    pub addr: String,
    /// Its VMs.
    pub vms: Vec<String>,
    /// The lease TTL: how long after the host dies it is reported unreachable.
    pub lease_ttl: Duration,
    /// Participant timeouts.
    pub timeouts: Timeouts,
}

/// A running host agent.
#[derive(Debug)]
pub struct HostAgent {
    /// The host's id.
    pub id: ParticipantId,
    /// The participant node (its events).
    pub node: NodeHandle,
    etcd: Etcd,
    lease: Lease,
    stop: CancellationToken,
}

impl HostAgent {
    /// Registers, takes the lease and starts the participant with `host`'s actions.
    pub async fn start(
        config: HostAgentConfig,
        transport: TransportConfig,
        host: Arc<dyn HostActions>,
    ) -> Result<Self> {
        let etcd = Etcd::connect(&config.etcd).await?;
        let id = registry::register(&etcd, &config.addr, &config.vms).await?;
        let lease = Lease::start(
            &etcd,
            config.lease_ttl,
            Some(&format!("alive/{}", id.0)),
            std::process::id().to_string().into_bytes(),
            true,
        )
        .await?;
        let stop = CancellationToken::new();
        let leader = election::follow_leader(etcd.clone(), POLL, stop.clone());
        let addr = follow_addr(leader, stop.clone());
        let mut pc = ParticipantConfig::new(etcd.cluster(), id, config.vms.clone());
        pc.timeouts = config.timeouts;
        let node = spawn_participant_following(pc, addr, transport, host).map_err(|e| {
            ControlError::InvalidConfig {
                reason: format!("cannot start participant {id}: {e}"),
            }
        })?;
        Ok(Self {
            id,
            node,
            etcd,
            lease,
            stop,
        })
    }

    /// Stops the participant and revokes the lease (the host is reported gone at once).
    pub async fn stop(self) -> HostSummary {
        self.stop.cancel();
        let summary = self.node.stop().await;
        self.lease.revoke(&self.etcd).await;
        summary
    }
}

fn follow_addr(
    mut leader: watch::Receiver<Option<CoordinatorInfo>>,
    stop: CancellationToken,
) -> watch::Receiver<Option<SocketAddr>> {
    let (tx, rx) = watch::channel(leader.borrow().as_ref().map(|i| i.addr));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                c = leader.changed() => if c.is_err() { return },
            }
            let now = leader.borrow().as_ref().map(|i| i.addr);
            tx.send_if_modified(|cur| {
                let changed = *cur != now;
                *cur = now;
                changed
            });
        }
    });
    rx
}

/// The coordinator's own host when it has no VMs: every action succeeds at once and
/// touches nothing (the host's VMs belong to its agent's participant).
#[derive(Debug, Default)]
pub struct NoVmsHost;

impl HostActions for NoVmsHost {
    fn perform(&self, action: HostAction) -> BoxFuture<'static, ActionOutcome> {
        let outcome = match action {
            HostAction::CheckVmsRunning { .. } => ActionOutcome::VmsRunning(true),
            HostAction::TakeLocalSnapshots { .. } => ActionOutcome::SnapshotTaken {
                local_time: Duration::ZERO,
            },
            HostAction::AwaitDurable { .. } => ActionOutcome::SnapshotDurable {
                total_time: Duration::ZERO,
            },
            _ => ActionOutcome::Done,
        };
        async move { outcome }.boxed()
    }

    fn shutdown(&self) -> BoxFuture<'static, HostSummary> {
        async { HostSummary::default() }.boxed()
    }
}

/// A coordinator candidate's settings.
#[derive(Debug, Clone)]
pub struct CandidateConfig {
    /// etcd.
    pub etcd: EtcdConfig,
    /// A name for people (the host).
    pub name: String,
    /// Where the coordinator listens when elected (announced to participants).
    pub listen: SocketAddr,
    /// The candidate's lease TTL: how long after its death another one takes over.
    pub lease_ttl: Duration,
    /// Coordinator timeouts.
    pub timeouts: Timeouts,
}

/// What a candidate reports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum CandidateEvent {
    /// This candidate won the election.
    Elected {
        /// The election revision.
        revision: i64,
        /// The global snapshot that was in flight when the previous coordinator went and
        /// that is now failed (reserved, never recorded).
        failed_in_flight: Option<GlobalSnapshotId>,
        /// The participants (every registered host).
        participants: Vec<ParticipantId>,
    },
    /// An event of the coordinator.
    Node(NodeEvent),
    /// The role was lost (lease expired, or a write was fenced); campaigning again.
    Lost {
        /// Why.
        reason: String,
    },
    /// A trigger could not be carried out.
    TriggerRefused {
        /// The trigger.
        trigger: Trigger,
        /// Why.
        reason: String,
    },
}

/// Campaigns, coordinates while elected, campaigns again after losing the role; returns
/// when `stop` is cancelled (resigning the role, so the next candidate takes over at
/// once). Events go to `events` (dropped when nobody listens).
pub async fn run_candidate(
    config: CandidateConfig,
    transport: TransportConfig,
    stop: CancellationToken,
    events: mpsc::UnboundedSender<CandidateEvent>,
) -> Result<()> {
    let etcd = Etcd::connect(&config.etcd).await?;
    let info = CoordinatorInfo {
        candidate: config.name.clone(),
        addr: config.listen,
        pid: std::process::id(),
    };
    while !stop.is_cancelled() {
        let lead = match election::campaign(&etcd, info.clone(), config.lease_ttl, &stop).await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        let reason = match coordinate(&etcd, &config, &transport, &lead, &stop, &events).await {
            Ok(()) => {
                lead.resign(&etcd).await;
                break;
            }
            Err(reason) => reason,
        };
        tracing::warn!(%reason, "coordinator role lost");
        let _ = events.send(CandidateEvent::Lost { reason });
        lead.resign(&etcd).await;
    }
    Ok(())
}

/// Runs the coordinator while `lead` holds; `Ok` when stopped, `Err(reason)` when the
/// role was lost.
async fn coordinate(
    etcd: &Etcd,
    config: &CandidateConfig,
    transport: &TransportConfig,
    lead: &election::Leadership,
    stop: &CancellationToken,
    events: &mpsc::UnboundedSender<CandidateEvent>,
) -> std::result::Result<(), String> {
    let cat = catalog::load(etcd).await.map_err(|e| e.to_string())?;
    let participants = catalog::participants(etcd)
        .await
        .map_err(|e| e.to_string())?;
    let failed_in_flight = cat.last_started.filter(|g| !cat.completed.contains_key(g));
    let _ = events.send(CandidateEvent::Elected {
        revision: lead.revision(),
        failed_in_flight,
        participants: participants.clone(),
    });
    let store = Arc::new(EtcdCatalog::new(etcd.clone(), lead, &cat));
    let mut cc = CoordinatorConfig::new(etcd.cluster(), participants, Vec::new());
    cc.timeouts = config.timeouts;
    let listener = bind_retrying(config.listen, stop).await?;
    let mut node = spawn_coordinator_with(
        cc,
        cat,
        Some(CatalogSink::Etcd(store)),
        listener,
        None,
        transport.clone(),
        Arc::new(NoVmsHost),
    )
    .map_err(|e| format!("cannot start the coordinator: {e}"))?;
    let guard = lead.guard();
    let mut tick = tokio::time::interval(POLL);
    let mut busy = false;
    // Triggers wait until every live host's participant has connected (a global
    // snapshot started earlier would fail its pre-check), for one lease TTL at most.
    let ready_by = tokio::time::Instant::now() + config.lease_ttl;
    let mut ready = false;
    let result = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            _ = lead.lost() => break Err("the candidate's lease expired".to_string()),
            ev = node.events.recv() => match ev {
                None => break Err("the coordinator stopped".to_string()),
                Some(NodeEvent::Halted { reason }) => {
                    let _ = events.send(CandidateEvent::Node(NodeEvent::Halted { reason: reason.clone() }));
                    break Err(reason);
                }
                Some(e) => {
                    if let NodeEvent::Protocol(p) = &e {
                        match p {
                            ProtocolEvent::GlobalSnapshotStarted { .. }
                            | ProtocolEvent::ResumeStarted { .. } => busy = true,
                            ProtocolEvent::GlobalSnapshotCompleted { .. }
                            | ProtocolEvent::GlobalSnapshotFailed { .. }
                            | ProtocolEvent::ResumeCompleted { .. }
                            | ProtocolEvent::ResumeFailed { .. }
                            | ProtocolEvent::ResumeAborted { .. } => busy = false,
                            _ => {}
                        }
                    }
                    let _ = events.send(CandidateEvent::Node(e));
                }
            },
            _ = tick.tick(), if !busy => {
                if !ready {
                    let alive = registry::alive(etcd).await.unwrap_or_default();
                    let connected = node.connected();
                    ready = alive.iter().all(|a| connected.contains(a))
                        || tokio::time::Instant::now() >= ready_by;
                    if !ready {
                        continue;
                    }
                }
                match catalog::take_trigger(etcd, &guard).await {
                    Ok(Some(t)) => {
                        let r = match &t {
                            Trigger::GlobalSnapshot => node.start_global_snapshot().await,
                            Trigger::Resume { gs } => node.start_resume(*gs).await,
                        };
                        match r {
                            Ok(_) => busy = true,
                            Err(crate::net::Error::Protocol(crate::protocol::Error::Busy { .. })) => {
                                // Still cleaning up: queue it again for the next tick.
                                let _ = catalog::put_trigger(etcd, &t).await;
                            }
                            Err(e) => {
                                let _ = events.send(CandidateEvent::TriggerRefused {
                                    trigger: t,
                                    reason: e.to_string(),
                                });
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, "cannot read the triggers"),
                }
            }
        }
    };
    node.stop().await;
    result
}

async fn bind_retrying(
    addr: SocketAddr,
    stop: &CancellationToken,
) -> std::result::Result<TcpListener, String> {
    let mut last = String::new();
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = e.to_string(),
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    Err(format!("cannot listen on {addr}: {last}"))
}

/// Whether a completed global snapshot event is in `e` (for callers counting them).
pub fn completed_gs(e: &CandidateEvent) -> Option<GlobalSnapshotId> {
    match e {
        CandidateEvent::Node(NodeEvent::Protocol(ProtocolEvent::GlobalSnapshotCompleted {
            gs,
            ..
        })) => Some(*gs),
        _ => None,
    }
}

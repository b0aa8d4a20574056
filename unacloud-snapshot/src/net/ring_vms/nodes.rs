//! The protocol's nodes (the coordinator and one participant per PC) and waiting for their events.

use super::*;

/// The protocol's nodes of one run (coordinator first), with their events merged: the
/// coordinator's as node 0, participant `i`'s as node `i`.
pub(super) struct Nodes {
    /// The coordinator (embedded control plane); `None` with the control plane on etcd.
    pub(super) coordinator: Option<NodeHandle>,
    pub(super) participants: Vec<NodeHandle>,
    /// The host agents and coordinator candidates (control plane on etcd).
    #[cfg(feature = "etcd")]
    pub(super) etcd: Option<super::etcd::EtcdNodes>,
    pub(super) events: mpsc::UnboundedReceiver<(usize, NodeEvent)>,
    pub(super) forwarders: Vec<tokio::task::JoinHandle<()>>,
}

/// Which control plane the nodes use.
pub(super) enum NodesMode {
    /// A coordinator for `vm0` with its catalog in a file.
    Embedded,
    /// Host agents and candidates on the lab's etcd cluster.
    #[cfg(feature = "etcd")]
    Etcd {
        config: crate::control::EtcdConfig,
        lease_ttl: Duration,
        candidates: usize,
    },
}

impl Nodes {
    /// Spawns the nodes of `mode`.
    pub(super) async fn spawn_mode(
        mode: &NodesMode,
        hosts: Vec<Arc<dyn HostActions>>,
        cluster: ClusterId,
        transport: &TransportConfig,
        catalog: &Path,
        timeouts: Timeouts,
    ) -> Result<Self> {
        match mode {
            NodesMode::Embedded => Self::spawn(hosts, cluster, transport, catalog, timeouts).await,
            #[cfg(feature = "etcd")]
            NodesMode::Etcd {
                config,
                lease_ttl,
                candidates,
            } => {
                Self::spawn_etcd(hosts, config, *lease_ttl, *candidates, transport, timeouts).await
            }
        }
    }

    pub(super) async fn spawn(
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
            coordinator: Some(coordinator),
            participants,
            #[cfg(feature = "etcd")]
            etcd: None,
            events,
            forwarders,
        };
        // Every participant connects before anything starts.
        let until = Instant::now() + Duration::from_secs(30);
        while nodes
            .coordinator
            .as_ref()
            .map_or(0, |c| c.connected().len())
            < n - 1
        {
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

    /// Starts a global snapshot: at the coordinator, or through a trigger in etcd (then
    /// the id is the one the elected coordinator announces).
    pub(super) async fn start_global_snapshot(&mut self) -> Result<GlobalSnapshotId> {
        if let Some(c) = &self.coordinator {
            return c.start_global_snapshot().await;
        }
        #[cfg(feature = "etcd")]
        if let Some(e) = &self.etcd {
            e.trigger(crate::control::catalog::Trigger::GlobalSnapshot)
                .await?;
            let ev = self
                .wait(Duration::from_secs(60), |e| {
                    matches!(e, ProtocolEvent::GlobalSnapshotStarted { .. })
                })
                .await?;
            if let ProtocolEvent::GlobalSnapshotStarted { gs } = ev {
                return Ok(gs);
            }
        }
        Err(Error::NodeStopped)
    }

    /// Starts a resume from `gs` (the latest completed one when `None`).
    pub(super) async fn start_resume(
        &mut self,
        gs: Option<GlobalSnapshotId>,
    ) -> Result<GlobalSnapshotId> {
        if let Some(c) = &self.coordinator {
            return c.start_resume(gs).await;
        }
        #[cfg(feature = "etcd")]
        if let Some(e) = &self.etcd {
            e.trigger(crate::control::catalog::Trigger::Resume { gs })
                .await?;
            let ev = self
                .wait(Duration::from_secs(60), |e| {
                    matches!(e, ProtocolEvent::ResumeStarted { .. })
                })
                .await?;
            if let ProtocolEvent::ResumeStarted { gs, .. } = ev {
                return Ok(gs);
            }
        }
        Err(Error::NodeStopped)
    }

    /// Waits for a coordinator event that `want` accepts.
    pub(super) async fn wait(
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
                Ok(None) => return Err(Error::NodeStopped),
                Ok(Some((0, NodeEvent::Protocol(e)))) if want(&e) => return Ok(e),
                Ok(Some((i, NodeEvent::Error(e)))) => {
                    tracing::warn!(node = i, "protocol node error: {e}")
                }
                Ok(Some(_)) => {}
            }
        }
    }

    /// Stops every node gracefully; returns POST packets dropped and rule objects left.
    pub(super) async fn stop(self) -> (u64, usize, Vec<String>) {
        let mut dropped = 0;
        let mut left = 0;
        let mut errors = Vec::new();
        #[cfg(feature = "etcd")]
        let mut summaries = match self.etcd {
            Some(e) => e.stop().await,
            None => Vec::new(),
        };
        #[cfg(not(feature = "etcd"))]
        let mut summaries = Vec::new();
        for node in self.coordinator.into_iter().chain(self.participants) {
            summaries.push(node.stop().await);
        }
        for s in summaries {
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

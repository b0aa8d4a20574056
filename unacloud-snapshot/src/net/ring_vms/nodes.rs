//! The protocol's nodes (the coordinator and one participant per PC) and waiting for their events.

use super::*;

/// The protocol's nodes of one run (coordinator first), with their events merged.
pub(super) struct Nodes {
    pub(super) coordinator: NodeHandle,
    pub(super) participants: Vec<NodeHandle>,
    pub(super) events: mpsc::UnboundedReceiver<(usize, NodeEvent)>,
    pub(super) forwarders: Vec<tokio::task::JoinHandle<()>>,
}

impl Nodes {
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
    pub(super) async fn stop(self) -> (u64, usize, Vec<String>) {
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

//! Tokio drivers of the sans-IO state machines: a coordinator node, participant nodes and
//! a metadata-server node.
//!
//! Each driver is one task running the loop the protocol module prescribes: feed received
//! envelopes, completed host actions and due timers in; drain transmissions (to the
//! connection layer), host actions (each on its own task, so a `ClearAll` can run while a
//! hung action is still outstanding) and events (to the node's event channel) out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::conn::{serve, Admission, Client, ConnId, Inbound, Router, TransportConfig};
use super::host::{HostActions, HostSummary};
use crate::catalog_store::CatalogStore;
use crate::net::{Error, Result};
use crate::protocol::{
    self, ActionId, ActionOutcome, Catalog, Coordinator, CoordinatorConfig, Envelope,
    GlobalSnapshotId, Message, MetadataServer, MetadataServerConfig, Output, Participant,
    ParticipantConfig, ParticipantId, ProtocolEvent, SnapshotTimes,
};
use crate::rcpbt::append_results;

/// Something a node reports to its owner.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum NodeEvent {
    /// An event of the state machine.
    Protocol(ProtocolEvent),
    /// A peer connected (coordinator, metadata server) or this node connected to its
    /// server (participant: the coordinator's id).
    Connected(ParticipantId),
    /// A connection closed; `reason` is set when it was an error.
    Disconnected {
        /// The peer, when known.
        peer: Option<ParticipantId>,
        /// Why, for errors.
        reason: Option<String>,
    },
    /// The state machine refused an input (logged too).
    Error(String),
    /// Metadata server: the times of a global snapshot were recorded.
    TimesRecorded(SnapshotTimes),
    /// The node stopped by itself and sends nothing more: a coordinator whose catalog
    /// lives in etcd could not write it there (it lost its role, or etcd is unreachable),
    /// so it must not act on the id it was about to use.
    Halted {
        /// Why.
        reason: String,
    },
}

/// Where a coordinator keeps its catalog.
#[derive(Debug, Clone)]
pub(crate) enum CatalogSink {
    /// A file, replaced atomically; a failed write is reported and the node goes on.
    File(CatalogStore),
    /// etcd, under the leader's condition; a failed write halts the node before anything
    /// it would send after it.
    #[cfg(feature = "etcd")]
    Etcd(Arc<crate::control::catalog::EtcdCatalog>),
}

impl CatalogSink {
    /// Persists `catalog`; `Err(reason, halt)`.
    async fn save(&self, catalog: Catalog) -> std::result::Result<(), (String, bool)> {
        match self {
            CatalogSink::File(store) => {
                // The write and its fsync run on the blocking pool; the driver waits for
                // them (the catalog is on disk before the event is reported and before
                // any later output), without holding up the runtime's other tasks.
                let store = store.clone();
                match tokio::task::spawn_blocking(move || store.save(&catalog)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(err)) => Err((err.to_string(), false)),
                    Err(join) => Err((format!("the catalog writer failed: {join}"), false)),
                }
            }
            #[cfg(feature = "etcd")]
            CatalogSink::Etcd(store) => store
                .save(&catalog)
                .await
                .map_err(|e| (super::error::error_chain(&e), true)),
        }
    }
}

enum Control {
    StartGlobalSnapshot(oneshot::Sender<protocol::Result<GlobalSnapshotId>>),
    StartResume(
        Option<GlobalSnapshotId>,
        oneshot::Sender<protocol::Result<GlobalSnapshotId>>,
    ),
}

trait Machine: Send + 'static {
    fn handle_message(&mut self, now: Instant, envelope: Envelope) -> protocol::Result<()>;
    fn handle_action_complete(
        &mut self,
        now: Instant,
        id: ActionId,
        o: ActionOutcome,
    ) -> protocol::Result<()>;
    fn handle_timeout(&mut self, now: Instant);
    fn poll_output(&mut self) -> Option<Output>;
    fn poll_timeout(&self) -> Option<Instant>;
    fn start_global_snapshot(&mut self, _now: Instant) -> protocol::Result<GlobalSnapshotId> {
        Err(protocol::Error::InvalidConfig {
            reason: "only the coordinator starts global snapshots".to_string(),
        })
    }
    fn start_resume(
        &mut self,
        _now: Instant,
        _gs: Option<GlobalSnapshotId>,
    ) -> protocol::Result<GlobalSnapshotId> {
        Err(protocol::Error::InvalidConfig {
            reason: "only the coordinator starts a resume".to_string(),
        })
    }
    /// The catalog to persist (a copy, written off the driver task); `None` for
    /// machines that keep none.
    fn catalog_to_persist(&self) -> Option<crate::protocol::Catalog> {
        None
    }
}

impl Machine for Coordinator {
    fn handle_message(&mut self, now: Instant, envelope: Envelope) -> protocol::Result<()> {
        Coordinator::handle_message(self, now, envelope)
    }
    fn handle_action_complete(
        &mut self,
        now: Instant,
        id: ActionId,
        o: ActionOutcome,
    ) -> protocol::Result<()> {
        Coordinator::handle_action_complete(self, now, id, o)
    }
    fn handle_timeout(&mut self, now: Instant) {
        Coordinator::handle_timeout(self, now)
    }
    fn poll_output(&mut self) -> Option<Output> {
        Coordinator::poll_output(self)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Coordinator::poll_timeout(self)
    }
    fn start_global_snapshot(&mut self, now: Instant) -> protocol::Result<GlobalSnapshotId> {
        Coordinator::start_global_snapshot(self, now)
    }
    fn start_resume(
        &mut self,
        now: Instant,
        gs: Option<GlobalSnapshotId>,
    ) -> protocol::Result<GlobalSnapshotId> {
        Coordinator::start_resume(self, now, gs)
    }
    fn catalog_to_persist(&self) -> Option<crate::protocol::Catalog> {
        Some(self.catalog().clone())
    }
}

impl Machine for Participant {
    fn handle_message(&mut self, now: Instant, envelope: Envelope) -> protocol::Result<()> {
        Participant::handle_message(self, now, envelope)
    }
    fn handle_action_complete(
        &mut self,
        now: Instant,
        id: ActionId,
        o: ActionOutcome,
    ) -> protocol::Result<()> {
        Participant::handle_action_complete(self, now, id, o)
    }
    fn handle_timeout(&mut self, now: Instant) {
        Participant::handle_timeout(self, now)
    }
    fn poll_output(&mut self) -> Option<Output> {
        Participant::poll_output(self)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Participant::poll_timeout(self)
    }
}

enum Sink {
    Coordinator { router: Router, ms: Option<Client> },
    Participant { client: Client },
}

impl Sink {
    fn send(&self, envelope: Envelope) {
        match self {
            Sink::Coordinator { router, ms } => {
                if envelope.to == ParticipantId::METADATA_SERVER {
                    match ms {
                        Some(c) => {
                            c.send(envelope);
                        }
                        None => tracing::debug!("no metadata server configured; report dropped"),
                    }
                } else {
                    router.send(envelope);
                }
            }
            Sink::Participant { client } => {
                client.send(envelope);
            }
        }
    }
}

struct DriveArgs {
    host: Arc<dyn HostActions>,
    sink: Sink,
    inbound: mpsc::Receiver<Inbound>,
    control: mpsc::Receiver<Control>,
    events: mpsc::UnboundedSender<NodeEvent>,
    shutdown: CancellationToken,
    store: Option<CatalogSink>,
}

async fn drive<M: Machine>(mut m: M, mut a: DriveArgs) -> HostSummary {
    let (act_tx, mut act_rx) = mpsc::unbounded_channel::<(ActionId, ActionOutcome)>();
    loop {
        while let Some(o) = m.poll_output() {
            match o {
                Output::Transmit(env) => a.sink.send(env),
                Output::Action { id, action } => {
                    let fut = a.host.perform(action);
                    let tx = act_tx.clone();
                    tokio::spawn(async move {
                        let outcome = fut.await;
                        let _ = tx.send((id, outcome));
                    });
                }
                Output::Event(e) => {
                    if matches!(
                        e,
                        ProtocolEvent::GlobalSnapshotStarted { .. }
                            | ProtocolEvent::GlobalSnapshotCompleted { .. }
                            | ProtocolEvent::GlobalSnapshotFailed { .. }
                            | ProtocolEvent::ResumeStarted { .. }
                            | ProtocolEvent::EpochAdvanced { .. }
                    ) {
                        if let (Some(store), Some(catalog)) = (&a.store, m.catalog_to_persist()) {
                            if let Err((why, halt)) = store.save(catalog).await {
                                tracing::error!(error = %why, "could not persist the catalog");
                                if halt {
                                    // Nothing queued after this event may leave: the
                                    // machine is dropped with its outputs.
                                    let _ = a.events.send(NodeEvent::Halted {
                                        reason: format!("could not persist the catalog: {why}"),
                                    });
                                    return a.host.shutdown().await;
                                }
                                let _ = a.events.send(NodeEvent::Error(format!(
                                    "could not persist the catalog: {why}"
                                )));
                            }
                        }
                    }
                    let _ = a.events.send(NodeEvent::Protocol(e));
                }
            }
        }
        let next = m.poll_timeout();
        let timer = async move {
            match next {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = a.shutdown.cancelled() => break,
            item = a.inbound.recv() => match item {
                None => break,
                Some(Inbound::Envelope { envelope, .. }) => {
                    let (from, kind) = (envelope.from, envelope.message.kind());
                    if let Err(e) = m.handle_message(Instant::now(), envelope) {
                        tracing::warn!(%from, message = kind, error = %e, "envelope refused");
                        let _ = a.events.send(NodeEvent::Error(e.to_string()));
                    }
                }
                Some(Inbound::Connected { peer, .. }) => {
                    let _ = a.events.send(NodeEvent::Connected(peer));
                }
                Some(Inbound::Closed { peer, reason, .. }) => {
                    let _ = a.events.send(NodeEvent::Disconnected { peer, reason });
                }
            },
            Some((id, outcome)) = act_rx.recv() => {
                if let Err(e) = m.handle_action_complete(Instant::now(), id, outcome) {
                    tracing::warn!(error = %e, "action completion refused");
                    let _ = a.events.send(NodeEvent::Error(e.to_string()));
                }
            }
            Some(c) = a.control.recv() => match c {
                Control::StartGlobalSnapshot(reply) => {
                    let _ = reply.send(m.start_global_snapshot(Instant::now()));
                }
                Control::StartResume(gs, reply) => {
                    let _ = reply.send(m.start_resume(Instant::now(), gs));
                }
            },
            _ = timer => m.handle_timeout(Instant::now()),
        }
    }
    a.host.shutdown().await
}

/// A running coordinator or participant node.
#[derive(Debug)]
pub struct NodeHandle {
    /// The node's events.
    pub events: mpsc::UnboundedReceiver<NodeEvent>,
    control: mpsc::Sender<Control>,
    task: JoinHandle<HostSummary>,
    shutdown: CancellationToken,
    local_addr: Option<SocketAddr>,
    router: Option<Router>,
}

impl NodeHandle {
    /// Asks the coordinator to start a global snapshot now (as the metadata server's
    /// trigger would). Fails with [`protocol::Error::Busy`] (in [`Error::Protocol`]) while
    /// one runs.
    pub async fn start_global_snapshot(&self) -> Result<GlobalSnapshotId> {
        let (tx, rx) = oneshot::channel();
        let stopped = || Error::NodeStopped;
        self.control
            .send(Control::StartGlobalSnapshot(tx))
            .await
            .map_err(|_| stopped())?;
        Ok(rx.await.map_err(|_| stopped())??)
    }

    /// Asks the coordinator to resume the application from `gs` (by default the latest
    /// completed global snapshot): POLL, RESTORE and START over the network. Returns the
    /// global snapshot being restored; the outcome arrives as a protocol event. Fails with
    /// [`protocol::Error::Busy`] while something runs, and with
    /// [`protocol::Error::NoRestorableSnapshot`] or
    /// [`protocol::Error::SnapshotNotRestorable`] when nothing is restorable (all in
    /// [`Error::Protocol`]).
    pub async fn start_resume(&self, gs: Option<GlobalSnapshotId>) -> Result<GlobalSnapshotId> {
        let (tx, rx) = oneshot::channel();
        let stopped = || Error::NodeStopped;
        self.control
            .send(Control::StartResume(gs, tx))
            .await
            .map_err(|_| stopped())?;
        Ok(rx.await.map_err(|_| stopped())??)
    }

    /// The coordinator's listening address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Participants currently connected to the coordinator.
    pub fn connected(&self) -> Vec<ParticipantId> {
        self.router
            .as_ref()
            .map(Router::connected)
            .unwrap_or_default()
    }

    /// Stops the node gracefully: connections close, every rule is removed; returns the
    /// host's summary.
    pub async fn stop(self) -> HostSummary {
        self.shutdown.cancel();
        self.task.await.unwrap_or_else(|e| HostSummary {
            error: Some(format!("node task failed: {e}")),
            ..HostSummary::default()
        })
    }

    /// A token that stops the node when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Starts a coordinator listening on `listener`; with `metadata_server` it keeps a
/// connection there to receive triggers and send reports. With `catalog` the catalog is
/// loaded from / persisted to that file.
pub async fn spawn_coordinator(
    config: CoordinatorConfig,
    catalog: Option<PathBuf>,
    listener: TcpListener,
    metadata_server: Option<SocketAddr>,
    transport: TransportConfig,
    host: Arc<dyn HostActions>,
) -> Result<NodeHandle> {
    let store = catalog.map(CatalogStore::new);
    let cat = match &store {
        Some(s) => s.load_or_new(config.cluster)?,
        None => Catalog::new(config.cluster),
    };
    spawn_coordinator_with(
        config,
        cat,
        store.map(CatalogSink::File),
        listener,
        metadata_server,
        transport,
        host,
    )
}

/// Starts a coordinator whose catalog is `catalog`, persisted to `store`.
pub(crate) fn spawn_coordinator_with(
    config: CoordinatorConfig,
    cat: Catalog,
    store: Option<CatalogSink>,
    listener: TcpListener,
    metadata_server: Option<SocketAddr>,
    transport: TransportConfig,
    host: Arc<dyn HostActions>,
) -> Result<NodeHandle> {
    let admission = Admission::Participants(config.participants.clone());
    let machine = Coordinator::new(config, cat)?;
    let local_addr = listener.local_addr().ok();
    let transport = Arc::new(transport);
    let shutdown = CancellationToken::new();
    let (in_tx, in_rx) = mpsc::channel(1024);
    let router = Router::default();
    tokio::spawn(serve(
        listener,
        transport.clone(),
        ParticipantId::COORDINATOR,
        admission,
        router.clone(),
        in_tx.clone(),
        shutdown.clone(),
    ));
    let ms = metadata_server.map(|addr| {
        Client::spawn(
            addr,
            ParticipantId::COORDINATOR,
            ParticipantId::METADATA_SERVER,
            transport.clone(),
            in_tx.clone(),
            shutdown.clone(),
        )
    });
    let (ctl_tx, ctl_rx) = mpsc::channel(16);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(drive(
        machine,
        DriveArgs {
            host,
            sink: Sink::Coordinator {
                router: router.clone(),
                ms,
            },
            inbound: in_rx,
            control: ctl_rx,
            events: ev_tx,
            shutdown: shutdown.clone(),
            store,
        },
    ));
    Ok(NodeHandle {
        events: ev_rx,
        control: ctl_tx,
        task,
        shutdown,
        local_addr,
        router: Some(router),
    })
}

/// Starts a participant that connects (and reconnects) to the coordinator at
/// `coordinator`.
pub fn spawn_participant(
    config: ParticipantConfig,
    coordinator: SocketAddr,
    transport: TransportConfig,
    host: Arc<dyn HostActions>,
) -> Result<NodeHandle> {
    let (keep, rx) = tokio::sync::watch::channel(Some(coordinator));
    // The fixed address outlives the client: the receiver keeps the last value.
    drop(keep);
    spawn_participant_following(config, rx, transport, host)
}

/// Starts a participant that follows the coordinator's address as `coordinator` changes
/// (an elected coordinator, see [`crate::net::conn::Client::spawn_following`]).
pub fn spawn_participant_following(
    config: ParticipantConfig,
    coordinator: tokio::sync::watch::Receiver<Option<SocketAddr>>,
    transport: TransportConfig,
    host: Arc<dyn HostActions>,
) -> Result<NodeHandle> {
    let id = config.id;
    let machine = Participant::new(config)?;
    let transport = Arc::new(transport);
    let shutdown = CancellationToken::new();
    let (in_tx, in_rx) = mpsc::channel(1024);
    let client = Client::spawn_following(
        coordinator,
        id,
        ParticipantId::COORDINATOR,
        transport,
        in_tx,
        shutdown.clone(),
    );
    let (ctl_tx, ctl_rx) = mpsc::channel(1);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(drive(
        machine,
        DriveArgs {
            host,
            sink: Sink::Participant { client },
            inbound: in_rx,
            control: ctl_rx,
            events: ev_tx,
            shutdown: shutdown.clone(),
            store: None,
        },
    ));
    Ok(NodeHandle {
        events: ev_rx,
        control: ctl_tx,
        task,
        shutdown,
        local_addr: None,
        router: None,
    })
}

/// A running metadata server.
#[derive(Debug)]
pub struct MetadataServerHandle {
    /// The server's events (registrations are not events; times recorded are).
    pub events: mpsc::UnboundedReceiver<NodeEvent>,
    task: JoinHandle<()>,
    shutdown: CancellationToken,
    local_addr: SocketAddr,
    times: Arc<Mutex<Vec<SnapshotTimes>>>,
}

impl MetadataServerHandle {
    /// The listening address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every global snapshot's times recorded so far.
    pub fn times(&self) -> Vec<SnapshotTimes> {
        self.times.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Stops the server.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Appends the rows of one global snapshot to the results CSV
/// (`global_snapshot,participant,local_time_s,global_time_s`; header when new).
pub fn append_times_csv(path: &std::path::Path, t: &SnapshotTimes) -> Result<()> {
    let mut rows = String::new();
    t.write_csv_rows(&mut rows);
    append_results(path, SnapshotTimes::CSV_HEADER, &rows)
}

/// Starts a metadata server on `listener`. With `results_csv`, each reported global
/// snapshot's local and global times are appended to that file.
pub fn spawn_metadata_server(
    config: MetadataServerConfig,
    listener: TcpListener,
    transport: TransportConfig,
    results_csv: Option<PathBuf>,
) -> Result<MetadataServerHandle> {
    let local_addr = listener.local_addr().map_err(|source| Error::Network {
        peer: "metadata server".to_string(),
        action: "read local address",
        source,
    })?;
    let mut ms = MetadataServer::new(config);
    let transport = Arc::new(transport);
    let shutdown = CancellationToken::new();
    let (in_tx, mut in_rx) = mpsc::channel::<Inbound>(1024);
    let router = Router::default();
    tokio::spawn(serve(
        listener,
        transport,
        ParticipantId::METADATA_SERVER,
        Admission::MetadataServerClients,
        router.clone(),
        in_tx,
        shutdown.clone(),
    ));
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let times = Arc::new(Mutex::new(Vec::new()));
    let times2 = times.clone();
    let sd = shutdown.clone();
    let task = tokio::spawn(async move {
        let mut recorded = 0usize;
        loop {
            let item = tokio::select! {
                _ = sd.cancelled() => break,
                i = in_rx.recv() => i,
            };
            let Some(item) = item else { break };
            let (conn, envelope): (ConnId, Envelope) = match item {
                Inbound::Envelope { conn, envelope } => (conn, envelope),
                Inbound::Connected { .. } | Inbound::Closed { .. } => continue,
            };
            // A trigger (snapshot or resume) needs the coordinator's connection to be
            // forwarded on; refuse it rather than forward it into the void.
            if envelope.message.is_trigger()
                && !ms.registrations().is_empty()
                && !router.connected().contains(&ParticipantId::COORDINATOR)
            {
                router.send_on(
                    conn,
                    Envelope::new(
                        envelope.cluster,
                        ParticipantId::METADATA_SERVER,
                        envelope.from,
                        Message::Refused {
                            reason: "the coordinator is not connected to the metadata server yet; retry in a moment".to_string(),
                        },
                    ),
                );
                continue;
            }
            match ms.handle_request(Instant::now(), envelope) {
                Ok(Some(reply)) => {
                    if let Message::Refused { reason } = &reply.message {
                        tracing::info!(to = %reply.to, conn, %reason, "metadata server refused a request");
                    }
                    router.send_on(conn, reply);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "metadata server refused a request");
                    let _ = ev_tx.send(NodeEvent::Error(e.to_string()));
                }
            }
            while let Some(o) = ms.poll_output() {
                match o {
                    Output::Transmit(env) => {
                        router.send(env);
                    }
                    Output::Event(e) => {
                        let _ = ev_tx.send(NodeEvent::Protocol(e));
                    }
                    Output::Action { .. } => {}
                }
            }
            // Most requests record nothing: copy the times only when some were added.
            if ms.times().count() > recorded {
                let all: Vec<SnapshotTimes> = ms.times().cloned().collect();
                for t in &all[recorded..] {
                    if let Some(p) = &results_csv {
                        if let Err(e) = append_times_csv(p, t) {
                            tracing::error!(error = %e, "could not append snapshot times");
                        }
                    }
                    let _ = ev_tx.send(NodeEvent::TimesRecorded(t.clone()));
                }
                recorded = all.len();
                if let Ok(mut g) = times2.lock() {
                    *g = all;
                }
            }
        }
    });
    Ok(MetadataServerHandle {
        events: ev_rx,
        task,
        shutdown,
        local_addr,
        times,
    })
}

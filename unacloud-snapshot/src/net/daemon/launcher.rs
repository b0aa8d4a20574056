//! Running a launcher (its coordinator and participants) and sending it triggers.

use super::*;

/// Sends `StartGS` to the metadata server, which forwards it to the coordinator.
///
/// `Ok` means the trigger was forwarded; the coordinator reports the global snapshot (or
/// its refusal, e.g. while another one runs) as events of its launcher.
pub async fn trigger_global_snapshot(
    metadata_server: SocketAddr,
    transport: &TransportConfig,
) -> Result<()> {
    send_trigger(metadata_server, transport, Message::TriggerGlobalSnapshot).await
}

/// Sends TRIGGER_RESUME to the metadata server, which forwards it to the coordinator: the
/// coordinator resumes the application from `gs` (by default the latest completed global
/// snapshot) — POLL, repeated until every participant answers, then RESTORE and START.
///
/// `Ok` means the trigger was forwarded; the coordinator reports the resume
/// ([`LauncherEvent::ResumeStarted`], `ResumeCompleted`, `ResumeFailed`) or its refusal
/// ([`LauncherEvent::TriggerRefused`]: busy, nothing restorable, `gs` not restorable) as
/// events of its launcher. Fails with [`Error::PeerRejected`] when the metadata server
/// refuses it (nobody registered, or the coordinator is not connected to it).
pub async fn trigger_resume(
    metadata_server: SocketAddr,
    transport: &TransportConfig,
    gs: Option<GlobalSnapshotId>,
) -> Result<()> {
    send_trigger(metadata_server, transport, Message::TriggerResume { gs }).await
}

async fn send_trigger(
    metadata_server: SocketAddr,
    transport: &TransportConfig,
    trigger: Message,
) -> Result<()> {
    let kind = trigger.kind();
    let env = Envelope::new(
        transport.cluster,
        ParticipantId::UNREGISTERED,
        ParticipantId::METADATA_SERVER,
        trigger,
    );
    let reply = request(metadata_server, transport, env, Duration::from_secs(5)).await?;
    match reply.message {
        Message::TriggerForwarded => Ok(()),
        Message::Refused { reason } => Err(Error::PeerRejected {
            peer: format!("metadata server {metadata_server}"),
            reason,
        }),
        other => Err(Error::TransportFrame {
            peer: metadata_server.to_string(),
            reason: format!("answered {} to {kind}", other.kind()),
        }),
    }
}

/// Options of [`run_launcher`] that are not in the file.
#[derive(Debug, Clone, Default)]
pub struct LauncherOptions {
    /// Fault injection: crash after this step (1–6) of phase 2.
    pub crash_after_step: Option<u8>,
    /// Bound on registration and on waiting for the cluster (default 60 s).
    pub registration_timeout: Option<Duration>,
}

async fn ms_request(
    ms: SocketAddr,
    transport: &TransportConfig,
    from: ParticipantId,
    message: Message,
) -> Result<Message> {
    let env = Envelope::new(
        transport.cluster,
        from,
        ParticipantId::METADATA_SERVER,
        message,
    );
    Ok(request(ms, transport, env, Duration::from_secs(5))
        .await?
        .message)
}

/// Every registration at the metadata server `ms`, read page by page (`QUERY_LIST
/// {after}` until `more` is false), asking as participant `from`.
pub async fn query_registrations(
    ms: SocketAddr,
    transport: &TransportConfig,
    from: ParticipantId,
) -> Result<Vec<Registration>> {
    let mut all: Vec<Registration> = Vec::new();
    let mut after = None;
    loop {
        match ms_request(ms, transport, from, Message::QueryList { after }).await? {
            Message::List { participants, more } => {
                let last = participants.last().map(|r| r.id);
                all.extend(participants);
                if !more {
                    return Ok(all);
                }
                match last {
                    // Each page must move on, or a faulty server would keep us here.
                    Some(l) if after.map_or(true, |a| l > a) => after = Some(l),
                    _ => {
                        return Err(Error::TransportFrame {
                            peer: ms.to_string(),
                            reason: "answered QUERY_LIST with a page that says more follow \
                                     but does not advance"
                                .to_string(),
                        })
                    }
                }
            }
            other => return Err(unexpected_answer(ms, "QUERY_LIST", other)),
        }
    }
}

/// `fut`, unless `shutdown` comes first (`None`).
async fn unless_shutdown<T>(
    shutdown: &CancellationToken,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<Option<T>> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Ok(None),
        r = fut => r.map(Some),
    }
}

/// Sleeps `d`; `false` if `shutdown` came first.
async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// A host built (its empty chains installed) but not yet given to a node.
struct Pending {
    vm: String,
    id: Option<ParticipantId>,
    port: u16,
    host: Arc<dyn HostActions>,
}

/// What a launcher is made of while it starts: hosts without a node yet, and nodes.
#[derive(Default)]
struct Starting {
    pending: Vec<Pending>,
    nodes: Vec<(String, ParticipantId, NodeHandle)>,
}

impl Starting {
    /// Stops every node and shuts every pending host down (removing their rules),
    /// reporting each VM's summary.
    async fn tear_down(self, on_event: &mut (impl FnMut(LauncherEvent) + Send)) {
        for (vm, id, node) in self.nodes {
            let summary = node.stop().await;
            on_event(LauncherEvent::Summary {
                vm,
                id: Some(id.0),
                summary,
            });
        }
        for p in self.pending {
            let summary = p.host.shutdown().await;
            on_event(LauncherEvent::Summary {
                vm: p.vm,
                id: p.id.map(|i| i.0),
                summary,
            });
        }
    }
}

const BUILDING: &str = "building hosts";
const REGISTERING: &str = "registering";
const WAITING_FOR_CLUSTER: &str = "waiting for the cluster to register";
const WAITING_FOR_COORDINATOR: &str = "waiting for the coordinator's address";

/// Everything [`start_launcher`] needs besides the configuration.
struct StartParams<'a> {
    section: &'a LauncherSection,
    opts: &'a LauncherOptions,
    ms: SocketAddr,
    transport: &'a TransportConfig,
    dscp: DscpConfig,
    timeouts: Timeouts,
    catalog: PathBuf,
    shutdown: &'a CancellationToken,
}

/// Builds the hosts, registers them and starts their nodes, into `st`. `Break(phase)`
/// when `shutdown` came during `phase`.
async fn start_launcher(
    p: StartParams<'_>,
    st: &mut Starting,
    on_event: &mut (impl FnMut(LauncherEvent) + Send),
) -> Result<std::ops::ControlFlow<&'static str>> {
    use std::ops::ControlFlow::{Break, Continue};
    let StartParams {
        section,
        opts,
        ms,
        transport,
        dscp,
        timeouts,
        catalog,
        shutdown,
    } = p;
    let reg_timeout = opts.registration_timeout.unwrap_or(Duration::from_secs(60));
    let reg_deadline = Instant::now() + reg_timeout;

    // Build the hosts first (installing our empty chains), then register.
    let hv = match &section.hypervisor {
        Some(h) => match unless_shutdown(shutdown, open_hypervisor(h)).await? {
            Some(hv) => Some(hv),
            None => return Ok(Break(BUILDING)),
        },
        None => None,
    };
    for vm in &section.vms {
        // Let a pending signal be seen between two hosts.
        tokio::task::yield_now().await;
        if shutdown.is_cancelled() {
            return Ok(Break(BUILDING));
        }
        let method = local_snapshot(vm, hv.as_ref())?;
        let backend = build_vm_backend(section.backend, vm, dscp)?;
        let host: Arc<dyn HostActions> = Arc::new(VmHost::new(&vm.name, backend, method)?);
        let host: Arc<dyn HostActions> = match opts.crash_after_step {
            Some(step) => Arc::new(CrashAfterStep::new(host, step)),
            None => host,
        };
        st.pending.push(Pending {
            vm: vm.name.clone(),
            id: None,
            port: 0,
            host,
        });
    }
    for p in st.pending.iter_mut() {
        let insert = ms_request(
            ms,
            transport,
            ParticipantId::UNREGISTERED,
            Message::Insert {
                addr: section.advertise.to_string(),
                vms: vec![p.vm.clone()],
            },
        );
        let Some(reply) = unless_shutdown(shutdown, insert).await? else {
            return Ok(Break(REGISTERING));
        };
        let (id, port) = match reply {
            Message::Inserted { id, port } => (id, port),
            other => return Err(unexpected_answer(ms, "INSERT", other)),
        };
        p.id = Some(id);
        p.port = port;
        on_event(LauncherEvent::Registered {
            vm: p.vm.clone(),
            id: id.0,
            port,
        });
    }
    // Then start the nodes (the coordinator waits for the whole cluster, this host's
    // other VMs included).
    while let Some(first) = st.pending.first() {
        let (name, host, port) = (first.vm.clone(), first.host.clone(), first.port);
        let id = first.id.unwrap_or(ParticipantId::UNREGISTERED);
        let node = if id.is_coordinator() {
            let listen = SocketAddr::new(section.advertise, port);
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|source| Error::Network {
                    peer: listen.to_string(),
                    action: "listen",
                    source,
                })?;
            // Wait for the whole cluster to register, then learn the participant ids.
            let participants = loop {
                let Some(all) =
                    unless_shutdown(shutdown, query_registrations(ms, transport, id)).await?
                else {
                    return Ok(Break(WAITING_FOR_CLUSTER));
                };
                if all.len() >= section.cluster_size as usize {
                    break all;
                }
                if Instant::now() > reg_deadline {
                    return Err(Error::Timeout {
                        what: format!(
                            "{} VMs to register ({} did)",
                            section.cluster_size,
                            all.len()
                        ),
                        after: reg_timeout,
                    });
                }
                if !pause(shutdown, Duration::from_millis(20)).await {
                    return Ok(Break(WAITING_FOR_CLUSTER));
                }
            };
            let ids: Vec<ParticipantId> = participants
                .iter()
                .map(|r| r.id)
                .filter(|p| !p.is_coordinator())
                .collect();
            let mut cc = CoordinatorConfig::new(transport.cluster, ids, vec![name.clone()]);
            cc.timeouts = timeouts;
            cc.dscp = dscp;
            cc.report_to_metadata_server = true;
            spawn_coordinator(
                cc,
                Some(catalog.clone()),
                listener,
                Some(ms),
                transport.clone(),
                host,
            )
            .await?
        } else {
            let coord = loop {
                let ask = ms_request(
                    ms,
                    transport,
                    id,
                    Message::QueryAddress {
                        id: ParticipantId::COORDINATOR,
                    },
                );
                let Some(reply) = unless_shutdown(shutdown, ask).await? else {
                    return Ok(Break(WAITING_FOR_COORDINATOR));
                };
                match reply {
                    Message::Address { registration } => {
                        let ip: IpAddr =
                            registration
                                .addr
                                .parse()
                                .map_err(|_| Error::InvalidConfig {
                                    reason: format!(
                                        "the coordinator registered the address {:?}, which is not an IP address",
                                        registration.addr
                                    ),
                                })?;
                        break SocketAddr::new(ip, registration.port);
                    }
                    _ if Instant::now() > reg_deadline => {
                        return Err(Error::Timeout {
                            what: "the coordinator to register".to_string(),
                            after: reg_timeout,
                        })
                    }
                    _ => {
                        if !pause(shutdown, Duration::from_millis(20)).await {
                            return Ok(Break(WAITING_FOR_COORDINATOR));
                        }
                    }
                }
            };
            let mut pc = ParticipantConfig::new(transport.cluster, id, vec![name.clone()]);
            pc.timeouts = timeouts;
            pc.dscp = dscp;
            spawn_participant(pc, coord, transport.clone(), host)?
        };
        // The node owns the host now.
        st.pending.remove(0);
        st.nodes.push((name, id, node));
    }
    Ok(Continue(()))
}

/// The catalog file a launcher's coordinator persists to: `[launcher] catalog` /
/// `--catalog`, else [`default_catalog_path`] (its directory created if missing).
pub fn launcher_catalog(cfg: &DaemonConfig) -> Result<PathBuf> {
    match cfg.launcher.as_ref().and_then(|l| l.catalog.clone()) {
        Some(p) => Ok(p),
        None => {
            let p = default_catalog_path(cfg.cluster);
            prepare_catalog_dir(&p)?;
            Ok(p)
        }
    }
}

/// Runs a launcher until `shutdown`: locks the VMs' colouring scopes
/// ([`lock_vm_scopes`]), builds their hosts, registers every VM, runs one participant per
/// VM (the coordinator for id 0, its catalog persisted, see [`launcher_catalog`]),
/// reports events to `on_event`, and on shutdown removes every rule and reports each
/// VM's summary.
///
/// `shutdown` is honoured in every phase: while the hosts are built, while registering,
/// while the coordinator waits for the cluster to register and while a participant waits
/// for the coordinator's address. The launcher then reports
/// [`LauncherEvent::Interrupted`], removes the rules it installed (a
/// [`LauncherEvent::Summary`] per VM) and returns `Ok`. A failure while starting removes
/// them too before the error is returned.
pub async fn run_launcher(
    cfg: &DaemonConfig,
    opts: LauncherOptions,
    shutdown: CancellationToken,
    mut on_event: impl FnMut(LauncherEvent) + Send,
) -> Result<()> {
    let section = launcher_section(cfg)?;
    let ms = cfg.metadata_server()?;
    let transport = cfg.transport()?;
    let dscp = cfg.dscp()?;
    let timeouts = cfg.timeouts();
    let catalog = launcher_catalog(cfg)?;
    let run_dir = section.run_dir.clone().unwrap_or_else(default_run_dir);
    // Before any backend is built: building one removes the rules it finds.
    let locks = lock_vm_scopes(&run_dir, &section.vms)?;
    for l in &locks {
        tracing::debug!(lock = %l.path().display(), "locked a colouring scope");
    }

    let mut st = Starting::default();
    let params = StartParams {
        section,
        opts: &opts,
        ms,
        transport: &transport,
        dscp,
        timeouts,
        catalog,
        shutdown: &shutdown,
    };
    match start_launcher(params, &mut st, &mut on_event).await {
        Ok(std::ops::ControlFlow::Continue(())) => {}
        Ok(std::ops::ControlFlow::Break(phase)) => {
            tracing::info!(phase, "stopping: asked to stop while starting");
            on_event(LauncherEvent::Interrupted {
                phase: phase.to_string(),
            });
            st.tear_down(&mut on_event).await;
            drop(locks);
            return Ok(());
        }
        Err(e) => {
            st.tear_down(&mut on_event).await;
            drop(locks);
            return Err(e);
        }
    }
    let mut nodes = st.nodes;

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(ParticipantId, NodeEvent)>();
    // Forward every node's events to one channel.
    let mut forwarders = Vec::new();
    for (_, id, node) in nodes.iter_mut() {
        let mut rx = std::mem::replace(&mut node.events, mpsc::unbounded_channel().1);
        let tx = ev_tx.clone();
        let id = *id;
        forwarders.push(tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if tx.send((id, e)).is_err() {
                    break;
                }
            }
        }));
    }
    drop(ev_tx);
    let coordinator_peers = nodes
        .iter()
        .find(|(_, id, _)| id.is_coordinator())
        .map(|_| section.cluster_size.saturating_sub(1) as usize);
    let mut ready_sent = coordinator_peers.is_none();
    if coordinator_peers == Some(0) {
        on_event(LauncherEvent::Ready { participants: 0 });
        ready_sent = true;
    }
    loop {
        let item = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = ev_rx.recv() => i,
        };
        let Some((id, ev)) = item else { break };
        if !ready_sent && id.is_coordinator() {
            if let NodeEvent::Connected(_) = ev {
                let want = coordinator_peers.unwrap_or(0);
                let have = nodes
                    .iter()
                    .find(|(_, i, _)| i.is_coordinator())
                    .map(|(_, _, n)| n.connected().len())
                    .unwrap_or(0);
                if have >= want {
                    ready_sent = true;
                    on_event(LauncherEvent::Ready { participants: want });
                }
            }
        }
        if let Some(le) = translate(id, &ev) {
            on_event(le);
        }
    }
    Starting {
        pending: Vec::new(),
        nodes,
    }
    .tear_down(&mut on_event)
    .await;
    for f in forwarders {
        f.abort();
    }
    drop(locks);
    Ok(())
}

/// The configuration's launcher section, refused when it names no VM.
pub(super) fn launcher_section(cfg: &DaemonConfig) -> Result<&LauncherSection> {
    let section = cfg.launcher.as_ref().ok_or_else(|| Error::InvalidConfig {
        reason: "no [launcher] section and no --vm flags: nothing to launch".to_string(),
    })?;
    if section.vms.is_empty() {
        return Err(Error::InvalidConfig {
            reason: "the launcher has no VMs; add [[launcher.vm]] entries or --vm".to_string(),
        });
    }
    Ok(section)
}

/// The error for a metadata server's answer other than the one `request` expects: its
/// refusal (with its reason), or a message of the wrong kind.
fn unexpected_answer(ms: SocketAddr, request: &str, reply: Message) -> Error {
    match reply {
        Message::Refused { reason } => Error::PeerRejected {
            peer: format!("metadata server {ms}"),
            reason,
        },
        other => Error::TransportFrame {
            peer: ms.to_string(),
            reason: format!("answered {} to {request}", other.kind()),
        },
    }
}

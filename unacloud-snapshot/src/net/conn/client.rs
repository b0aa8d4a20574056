//! The client side: a connection to one server that reconnects with backoff, and
//! one-shot requests.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::net::frame::FrameKind;
use crate::net::{Error, Result};
use crate::protocol::{self, Envelope, ParticipantId};

use super::{dial, pump, ConnId, Inbound, TransportConfig, NEXT_CONN};

/// A connection to one server that reconnects with backoff until shutdown.
#[derive(Debug, Clone)]
pub struct Client {
    tx: mpsc::Sender<Envelope>,
    conn: ConnId,
}

impl Client {
    /// Starts connecting to the server `server` (its id: the coordinator, or
    /// [`ParticipantId::METADATA_SERVER`]) at `addr` as node `me`. Envelopes from the
    /// server go to `inbound`; queue envelopes with [`Client::send`].
    pub fn spawn(
        addr: SocketAddr,
        me: ParticipantId,
        server: ParticipantId,
        cfg: Arc<TransportConfig>,
        inbound: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
    ) -> Self {
        let (_keep, rx) = watch::channel(Some(addr));
        Self::spawn_following(rx, me, server, cfg, inbound, shutdown)
    }

    /// Like [`Client::spawn`], but the server's address may change (an elected
    /// coordinator, announced in etcd): the client dials the address `addr` holds, waits
    /// while it holds `None`, and when it changes drops the connection to the old address
    /// and dials the new one at once.
    pub fn spawn_following(
        mut addr: watch::Receiver<Option<SocketAddr>>,
        me: ParticipantId,
        server: ParticipantId,
        cfg: Arc<TransportConfig>,
        inbound: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel(cfg.queue);
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut backoff = cfg.backoff_min;
            loop {
                if shutdown.is_cancelled() || rx.is_closed() {
                    break;
                }
                let Some(current) = *addr.borrow_and_update() else {
                    // Nobody to dial yet: wait for an address (a sender that is gone
                    // keeps the last value, which was `None`: stop).
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        changed = addr.changed() => if changed.is_err() { break },
                    }
                    continue;
                };
                let moved = {
                    let mut a = addr.clone();
                    async move {
                        // Resolves when the address changes to something else.
                        loop {
                            if a.changed().await.is_err() {
                                return std::future::pending::<()>().await;
                            }
                            if *a.borrow() != Some(current) {
                                return;
                            }
                        }
                    }
                };
                tokio::pin!(moved);
                let mut relocated = false;
                let dialled = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = &mut moved => { backoff = cfg.backoff_min; continue }
                    w = dial(current, &cfg, me, server) => w,
                };
                match dialled {
                    Ok((wire, session)) => {
                        backoff = cfg.backoff_min;
                        let _ = inbound.send(Inbound::Connected { conn, peer: me }).await;
                        let reason = tokio::select! {
                            r = pump(wire, session, &cfg, conn, &mut rx, &inbound, &shutdown) => {
                                r.err().map(|e| {
                                    tracing::warn!(server = %current, reason = %e, "connection closed");
                                    e.to_string()
                                })
                            }
                            _ = &mut moved => {
                                relocated = true;
                                Some(format!("the server moved away from {current}"))
                            }
                        };
                        let _ = inbound
                            .send(Inbound::Closed {
                                conn,
                                peer: None,
                                reason,
                            })
                            .await;
                    }
                    Err(e) => {
                        tracing::debug!(server = %current, error = %e, "connect failed; retrying");
                    }
                }
                if shutdown.is_cancelled() {
                    break;
                }
                if relocated {
                    // `moved` has completed: dial the new address at once.
                    backoff = cfg.backoff_min;
                    continue;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = &mut moved => { backoff = cfg.backoff_min; continue }
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(cfg.backoff_max);
            }
        });
        Self { tx, conn }
    }

    /// Queues an envelope; `false` when the queue is full or the client stopped.
    pub fn send(&self, envelope: Envelope) -> bool {
        match self.tx.try_send(envelope) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "send queue full or closed; envelope dropped");
                false
            }
        }
    }

    /// The connection id used in [`Inbound`] items of this client.
    pub fn conn(&self) -> ConnId {
        self.conn
    }
}

/// One request/response exchange with a server on a fresh connection, bounded by
/// `timeout` (used by the triggers and by launchers asking the metadata server). The
/// connection opens as `envelope.from` to the server `envelope.to`. Returns the first
/// envelope the server sends back.
pub async fn request(
    addr: SocketAddr,
    cfg: &TransportConfig,
    envelope: Envelope,
    timeout: Duration,
) -> Result<Envelope> {
    let fut = async {
        let (mut wire, mut session) = dial(addr, cfg, envelope.from, envelope.to).await?;
        let body = serde_json::to_vec(&envelope)
            .map_err(|source| protocol::Error::MalformedPayload { source })?;
        wire.write(&session.seal(FrameKind::Data, &body)).await?;
        loop {
            let frame = wire.read().await?.ok_or_else(|| Error::TransportFrame {
                peer: addr.to_string(),
                reason: format!("closed without answering {}", envelope.message.kind()),
            })?;
            let (kind, body) = session.open(frame).map_err(|e| wire.name_errors(e))?;
            if kind == FrameKind::Data {
                let env = session
                    .check_envelope(cfg.cluster, &body)
                    .map_err(|e| wire.name_errors(e))?;
                let _ = tokio::time::timeout(Duration::from_millis(200), wire.wr.shutdown()).await;
                return Ok(env);
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: format!("an answer from {addr}"),
            after: timeout,
        }),
    }
}

//! The server side: the router that sends each peer's envelopes on its newest
//! connection, and the accept loop with its admission limits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::net::frame::{encode_frame, reject_body, FrameKind};
use crate::net::Error;
use crate::protocol::{Envelope, ParticipantId};

use super::{
    accept_handshake, bounded, pump, Admission, ConnId, Inbound, TransportConfig, Wire, NEXT_CONN,
};

/// Where a node's outgoing envelopes go: one bounded queue per connected peer.
///
/// Several connections may claim the same id (a participant that reconnected while its
/// old connection is not yet known dead, or — without a key — anyone). Envelopes for an
/// id go to its newest established connection; closing a connection removes only that
/// connection, so a short-lived duplicate never makes a live peer unreachable.
#[derive(Debug, Clone, Default)]
pub struct Router {
    inner: Arc<Mutex<RouterInner>>,
}

#[derive(Debug, Default)]
struct RouterInner {
    by_conn: HashMap<ConnId, (ParticipantId, mpsc::Sender<Envelope>)>,
    by_id: HashMap<ParticipantId, Vec<ConnId>>,
}

impl Router {
    fn add(&self, conn: ConnId, id: ParticipantId, tx: mpsc::Sender<Envelope>) {
        if let Ok(mut g) = self.inner.lock() {
            if id != ParticipantId::UNREGISTERED {
                g.by_id.entry(id).or_default().push(conn);
            }
            g.by_conn.insert(conn, (id, tx));
        }
    }

    fn remove(&self, conn: ConnId) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some((id, _)) = g.by_conn.remove(&conn) {
                if let Some(list) = g.by_id.get_mut(&id) {
                    list.retain(|c| *c != conn);
                    if list.is_empty() {
                        g.by_id.remove(&id);
                    }
                }
            }
        }
    }

    /// Queues `envelope` for the peer `envelope.to`. Returns `false` (and logs) when that
    /// peer has no connection or its queue is full.
    pub fn send(&self, envelope: Envelope) -> bool {
        let tx = self.inner.lock().ok().and_then(|g| {
            let conn = g.by_id.get(&envelope.to)?.last()?;
            g.by_conn.get(conn).map(|(_, tx)| tx.clone())
        });
        Self::push(tx, envelope)
    }

    /// Queues `envelope` on connection `conn` (replies to unregistered requesters).
    pub fn send_on(&self, conn: ConnId, envelope: Envelope) -> bool {
        let tx = self
            .inner
            .lock()
            .ok()
            .and_then(|g| g.by_conn.get(&conn).map(|(_, tx)| tx.clone()));
        Self::push(tx, envelope)
    }

    fn push(tx: Option<mpsc::Sender<Envelope>>, envelope: Envelope) -> bool {
        match tx {
            None => {
                tracing::warn!(to = %envelope.to, message = envelope.message.kind(), "no connection to the recipient; envelope dropped");
                false
            }
            Some(tx) => match tx.try_send(envelope) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "send queue full or closed; envelope dropped");
                    false
                }
            },
        }
    }

    /// Ids with a live connection.
    pub fn connected(&self) -> Vec<ParticipantId> {
        let mut v: Vec<ParticipantId> = self
            .inner
            .lock()
            .map(|g| g.by_id.keys().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }
}

/// Decrements a counter when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(counter.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts connections on `listener` as node `me` until shutdown, admitting the ids
/// `admission` allows. Each connection's envelopes go to `inbound`; the router learns how
/// to reach its peer.
pub async fn serve(
    listener: TcpListener,
    cfg: Arc<TransportConfig>,
    me: ParticipantId,
    admission: Admission,
    router: Router,
    inbound: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let pending = Arc::new(AtomicUsize::new(0));
    let admission = Arc::new(admission);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(open_slot) = Slot::take(&open, cfg.max_connections) else {
            tracing::warn!(peer = %addr, limit = cfg.max_connections, "refusing connection: too many open connections");
            refuse_now(stream, "too many open connections; retry later");
            continue;
        };
        let Some(pending_slot) = Slot::take(&pending, cfg.max_pending) else {
            tracing::warn!(peer = %addr, limit = cfg.max_pending, "refusing connection: too many connections in their handshake");
            refuse_now(
                stream,
                "too many connections in their handshake; retry later",
            );
            continue;
        };
        let cfg = cfg.clone();
        let router = router.clone();
        let inbound = inbound.clone();
        let shutdown = shutdown.clone();
        let admission = admission.clone();
        tokio::spawn(async move {
            let _open = open_slot;
            let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
            let mut wire = Wire::new(stream, addr.to_string(), cfg.write_timeout);
            let hs = bounded(
                || format!("the handshake of {addr}"),
                cfg.handshake_timeout,
                accept_handshake(&mut wire, &cfg, me, &admission),
            )
            .await;
            drop(pending_slot);
            let session = match hs {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(peer = %addr, reason = %e, "handshake refused; closing connection");
                    if !matches!(e, Error::PeerRejected { .. }) {
                        wire.reject(0, &e.to_string()).await;
                    }
                    return;
                }
            };
            let peer_id = session.peer();
            tracing::debug!(peer = %addr, id = %peer_id, keyed = session.is_keyed(), "connection established");
            wire.dec.set_keyed(session.is_keyed());
            wire.dec.set_max_len(cfg.max_frame_from_client);
            let (tx, mut rx) = mpsc::channel(cfg.queue);
            router.add(conn, peer_id, tx);
            let _ = inbound
                .send(Inbound::Connected {
                    conn,
                    peer: peer_id,
                })
                .await;
            let res = pump(wire, session, &cfg, conn, &mut rx, &inbound, &shutdown).await;
            router.remove(conn);
            let reason = res.err().map(|e| {
                tracing::warn!(peer = %addr, id = %peer_id, reason = %e, "connection closed");
                e.to_string()
            });
            let _ = inbound
                .send(Inbound::Closed {
                    conn,
                    peer: Some(peer_id),
                    reason,
                })
                .await;
        });
    }
}

/// Writes a REJECT without waiting (the socket buffer of a fresh connection has room)
/// and drops the connection.
fn refuse_now(stream: TcpStream, reason: &str) {
    let frame = encode_frame(FrameKind::Reject, 0, &reject_body(reason), None);
    let _ = stream.try_write(&frame);
}

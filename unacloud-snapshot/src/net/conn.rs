//! Connections: framing, hello, per-peer send queues, reconnect with backoff.
//!
//! A connection carries protocol envelopes both ways. The connecting side sends a
//! [`Hello`] first; the accepting side checks its cluster (and, with a key, its MAC) and
//! from then on only accepts envelopes whose sender is the one announced. A malformed,
//! unauthenticated or foreign-cluster frame closes that connection only, after a
//! [`FrameKind::Reject`] frame that tells the other side why; the reason is logged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::frame::{open, seal, ClusterKey, FrameKind, Hello, MAX_TRANSPORT_FRAME};
use crate::error::{Error, Result};
use crate::protocol::{decode_frame, encode_frame, ClusterId, Envelope, ParticipantId};

/// Transport settings shared by every connection of a node.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// The cluster; hellos and envelopes of other clusters are rejected.
    pub cluster: ClusterId,
    /// The cluster key; when set every frame carries an HMAC-SHA256 and frames without a
    /// valid one are rejected.
    pub key: Option<ClusterKey>,
    /// Bound on connecting (one attempt).
    pub connect_timeout: Duration,
    /// Bound on receiving the hello of a new connection.
    pub handshake_timeout: Duration,
    /// Bound on writing one frame.
    pub write_timeout: Duration,
    /// First reconnect delay; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Capacity of each peer's send queue (envelopes); when full, new envelopes are
    /// dropped with a warning (the protocol's deadlines handle the loss).
    pub queue: usize,
}

impl TransportConfig {
    /// Defaults for a LAN: connect 3 s, handshake 5 s, write 5 s, backoff 20 ms – 2 s,
    /// queue 1024.
    pub fn new(cluster: ClusterId, key: Option<ClusterKey>) -> Self {
        Self {
            cluster,
            key,
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_secs(2),
            queue: 1024,
        }
    }
}

/// Identifies one connection of a node.
pub type ConnId = u64;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// What the connections hand to the node that owns them.
#[derive(Debug)]
pub enum Inbound {
    /// An envelope arrived.
    Envelope {
        /// The connection it came on (replies to unregistered senders go back on it).
        conn: ConnId,
        /// The envelope (cluster and sender already checked against the hello).
        envelope: Envelope,
    },
    /// A connection was established and its peer identified.
    Connected {
        /// The connection.
        conn: ConnId,
        /// The peer's id from its hello (or the id this side connected as, for clients).
        peer: ParticipantId,
    },
    /// A connection closed (`reason` says why, `None` for an orderly close).
    Closed {
        /// The connection.
        conn: ConnId,
        /// The peer's id, when known.
        peer: Option<ParticipantId>,
        /// Why, if it was an error.
        reason: Option<String>,
    },
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_TRANSPORT_FRAME)
        .new_codec()
}

type Wire = Framed<TcpStream, LengthDelimitedCodec>;

async fn send_frame(
    wire: &mut Wire,
    cfg: &TransportConfig,
    kind: FrameKind,
    body: &[u8],
) -> Result<()> {
    let frame = seal(cfg.key.as_ref(), kind, body);
    match tokio::time::timeout(cfg.write_timeout, wire.send(Bytes::from(frame))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(Error::Network {
            peer: peer_name(wire),
            action: "send",
            source,
        }),
        Err(_) => Err(Error::Timeout {
            what: format!("sending a frame to {}", peer_name(wire)),
            after: cfg.write_timeout,
        }),
    }
}

fn peer_name(wire: &Wire) -> String {
    wire.get_ref()
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "peer".to_string())
}

/// Sends a reject notice (best effort, bounded) before the caller drops the connection.
async fn reject(wire: &mut Wire, reason: &str) {
    let frame = seal(None, FrameKind::Reject, reason.as_bytes());
    let _ = tokio::time::timeout(Duration::from_millis(200), wire.send(Bytes::from(frame))).await;
}

/// Runs an established, identified connection until it closes, the queue closes or
/// shutdown. Returns the reason for an abnormal end.
async fn pump(
    mut wire: Wire,
    cfg: &TransportConfig,
    conn: ConnId,
    expect_from: Option<ParticipantId>,
    outq: &mut mpsc::Receiver<Envelope>,
    inbound: &mpsc::Sender<Inbound>,
    shutdown: &CancellationToken,
) -> std::result::Result<(), Error> {
    let peer = peer_name(&wire);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_millis(200), SinkExt::<Bytes>::close(&mut wire)).await;
                return Ok(());
            }
            out = outq.recv() => {
                let Some(envelope) = out else {
                    let _ = tokio::time::timeout(Duration::from_millis(200), SinkExt::<Bytes>::close(&mut wire)).await;
                    return Ok(());
                };
                let body = encode_frame(&envelope)?;
                send_frame(&mut wire, cfg, FrameKind::Protocol, &body).await?;
            }
            frame = wire.next() => {
                let frame = match frame {
                    None => return Ok(()),
                    Some(Ok(f)) => f,
                    Some(Err(e)) => {
                        let err = Error::TransportFrame { peer: peer.clone(), reason: format!("unreadable frame: {e}") };
                        reject(&mut wire, &err.to_string()).await;
                        return Err(err);
                    }
                };
                match check_envelope(cfg, &frame, &peer, expect_from) {
                    Ok(Some(envelope)) => {
                        if inbound.send(Inbound::Envelope { conn, envelope }).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if !matches!(e, Error::PeerRejected { .. }) {
                            reject(&mut wire, &e.to_string()).await;
                        }
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// Checks one frame: MAC, kind, protocol decoding, cluster and sender.
fn check_envelope(
    cfg: &TransportConfig,
    frame: &[u8],
    peer: &str,
    expect_from: Option<ParticipantId>,
) -> Result<Option<Envelope>> {
    let (kind, body) = open(cfg.key.as_ref(), frame, peer)?;
    match kind {
        FrameKind::Reject => Err(Error::PeerRejected {
            peer: peer.to_string(),
            reason: String::from_utf8_lossy(body).into_owned(),
        }),
        FrameKind::Hello => Err(Error::TransportFrame {
            peer: peer.to_string(),
            reason: "a second hello on an established connection".to_string(),
        }),
        FrameKind::Protocol => {
            let envelope = decode_frame(body).map_err(|e| Error::TransportFrame {
                peer: peer.to_string(),
                reason: format!("malformed protocol frame: {e}"),
            })?;
            if envelope.cluster != cfg.cluster {
                return Err(Error::ForeignCluster {
                    expected: cfg.cluster,
                    got: envelope.cluster,
                });
            }
            if let Some(from) = expect_from {
                if from != ParticipantId::UNREGISTERED && envelope.from != from {
                    return Err(Error::TransportFrame {
                        peer: peer.to_string(),
                        reason: format!(
                            "envelope claims to come from {} but the connection belongs to {from}",
                            envelope.from
                        ),
                    });
                }
            }
            Ok(Some(envelope))
        }
    }
}

/// Where a node's outgoing envelopes go: one bounded queue per connected peer.
#[derive(Debug, Clone, Default)]
pub struct Router {
    inner: Arc<Mutex<RouterInner>>,
}

#[derive(Debug, Default)]
struct RouterInner {
    by_conn: HashMap<ConnId, (Option<ParticipantId>, mpsc::Sender<Envelope>)>,
    by_id: HashMap<ParticipantId, ConnId>,
}

impl Router {
    fn add(&self, conn: ConnId, id: Option<ParticipantId>, tx: mpsc::Sender<Envelope>) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some(id) = id {
                if id != ParticipantId::UNREGISTERED {
                    g.by_id.insert(id, conn);
                }
            }
            g.by_conn.insert(conn, (id, tx));
        }
    }

    fn remove(&self, conn: ConnId) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some((Some(id), _)) = g.by_conn.remove(&conn) {
                if g.by_id.get(&id) == Some(&conn) {
                    g.by_id.remove(&id);
                }
            }
        }
    }

    /// Queues `envelope` for the peer `envelope.to`. Returns `false` (and logs) when that
    /// peer has no connection or its queue is full.
    pub fn send(&self, envelope: Envelope) -> bool {
        let tx = self.inner.lock().ok().and_then(|g| {
            let conn = g.by_id.get(&envelope.to)?;
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

/// Accepts connections on `listener` until shutdown. Each connection's envelopes go to
/// `inbound`; the router learns how to reach its peer.
pub async fn serve(
    listener: TcpListener,
    cfg: Arc<TransportConfig>,
    router: Router,
    inbound: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
) {
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
        let cfg = cfg.clone();
        let router = router.clone();
        let inbound = inbound.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            let mut wire = Framed::new(stream, codec());
            let hello = match read_hello(&mut wire, &cfg, addr).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(peer = %addr, reason = %e, "closing connection");
                    reject(&mut wire, &e.to_string()).await;
                    return;
                }
            };
            let (tx, mut rx) = mpsc::channel(cfg.queue);
            router.add(conn, Some(hello.id), tx);
            let _ = inbound
                .send(Inbound::Connected {
                    conn,
                    peer: hello.id,
                })
                .await;
            let res = pump(
                wire,
                &cfg,
                conn,
                Some(hello.id),
                &mut rx,
                &inbound,
                &shutdown,
            )
            .await;
            router.remove(conn);
            let reason = res.err().map(|e| {
                tracing::warn!(peer = %addr, id = %hello.id, reason = %e, "connection closed");
                e.to_string()
            });
            let _ = inbound
                .send(Inbound::Closed {
                    conn,
                    peer: Some(hello.id),
                    reason,
                })
                .await;
        });
    }
}

async fn read_hello(wire: &mut Wire, cfg: &TransportConfig, addr: SocketAddr) -> Result<Hello> {
    let peer = addr.to_string();
    let frame = match tokio::time::timeout(cfg.handshake_timeout, wire.next()).await {
        Err(_) => {
            return Err(Error::Timeout {
                what: format!("the hello of {peer}"),
                after: cfg.handshake_timeout,
            })
        }
        Ok(None) => {
            return Err(Error::TransportFrame {
                peer,
                reason: "closed before its hello".to_string(),
            })
        }
        Ok(Some(Err(e))) => {
            return Err(Error::TransportFrame {
                peer,
                reason: format!("unreadable hello: {e}"),
            })
        }
        Ok(Some(Ok(f))) => f,
    };
    let (kind, body) = open(cfg.key.as_ref(), &frame, &peer)?;
    if kind != FrameKind::Hello {
        return Err(Error::TransportFrame {
            peer,
            reason: "the first frame is not a hello".to_string(),
        });
    }
    let hello: Hello = serde_json::from_slice(body).map_err(|e| Error::TransportFrame {
        peer: peer.clone(),
        reason: format!("malformed hello: {e}"),
    })?;
    if hello.cluster != cfg.cluster {
        return Err(Error::ForeignCluster {
            expected: cfg.cluster,
            got: hello.cluster,
        });
    }
    Ok(hello)
}

/// Connects once (bounded) and sends the hello.
async fn dial(addr: SocketAddr, cfg: &TransportConfig, me: ParticipantId) -> Result<Wire> {
    let stream = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(Error::Timeout {
                what: format!("connecting to {addr}"),
                after: cfg.connect_timeout,
            })
        }
        Ok(Err(source)) => {
            return Err(Error::Network {
                peer: addr.to_string(),
                action: "connect",
                source,
            })
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let mut wire = Framed::new(stream, codec());
    let hello = serde_json::to_vec(&Hello {
        cluster: cfg.cluster,
        id: me,
    })
    .map_err(|source| Error::MalformedPayload { source })?;
    send_frame(&mut wire, cfg, FrameKind::Hello, &hello).await?;
    Ok(wire)
}

/// A connection to one server that reconnects with backoff until shutdown.
#[derive(Debug, Clone)]
pub struct Client {
    tx: mpsc::Sender<Envelope>,
    conn: ConnId,
}

impl Client {
    /// Starts connecting to `addr` as node `me`. Envelopes from the server go to
    /// `inbound`; queue envelopes with [`Client::send`].
    pub fn spawn(
        addr: SocketAddr,
        me: ParticipantId,
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
                let wire = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    w = dial(addr, &cfg, me) => w,
                };
                match wire {
                    Ok(wire) => {
                        backoff = cfg.backoff_min;
                        let _ = inbound.send(Inbound::Connected { conn, peer: me }).await;
                        let res = pump(wire, &cfg, conn, None, &mut rx, &inbound, &shutdown).await;
                        let reason = res.err().map(|e| {
                            tracing::warn!(server = %addr, reason = %e, "connection closed");
                            e.to_string()
                        });
                        let _ = inbound
                            .send(Inbound::Closed {
                                conn,
                                peer: None,
                                reason,
                            })
                            .await;
                    }
                    Err(e) => {
                        tracing::debug!(server = %addr, error = %e, "connect failed; retrying");
                    }
                }
                if shutdown.is_cancelled() {
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
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
/// `timeout` (used by the `start` trigger and by participants looking up the
/// coordinator). Returns the first envelope the server sends back.
pub async fn request(
    addr: SocketAddr,
    cfg: &TransportConfig,
    envelope: Envelope,
    timeout: Duration,
) -> Result<Envelope> {
    let fut = async {
        let mut wire = dial(addr, cfg, envelope.from).await?;
        let body = encode_frame(&envelope)?;
        send_frame(&mut wire, cfg, FrameKind::Protocol, &body).await?;
        let peer = addr.to_string();
        loop {
            match wire.next().await {
                None => {
                    return Err(Error::TransportFrame {
                        peer,
                        reason: format!("closed without answering {}", envelope.message.kind()),
                    })
                }
                Some(Err(e)) => {
                    return Err(Error::TransportFrame {
                        peer,
                        reason: format!("unreadable answer: {e}"),
                    })
                }
                Some(Ok(f)) => {
                    if let Some(env) = check_envelope(cfg, &f, &peer, None)? {
                        let _ = tokio::time::timeout(
                            Duration::from_millis(200),
                            SinkExt::<Bytes>::close(&mut wire),
                        )
                        .await;
                        return Ok(env);
                    }
                }
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

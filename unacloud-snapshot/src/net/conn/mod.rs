//! Connections of protocol v1 over TCP: the handshake, authenticated frames, keep-alives,
//! per-peer send queues, limits, and reconnection with backoff (`PROTOCOL.md` §2).
//!
//! The dialling side says HELLO, the accepting side answers WELCOME, the dialling side
//! proves the key with AUTH ([`super::frame`]). From then on every envelope on the
//! connection must come from the node that opened it, be addressed to this node, and be a
//! message that role may send ([`super::frame::authorise`]). Anything else — a malformed or
//! unauthenticated frame, a sequence gap, an envelope speaking for someone else — closes
//! that connection only, after a REJECT frame that says why; the reason is logged with the
//! peer's address.
//!
//! Limits: before its handshake completes a connection may make this node buffer at most
//! [`MAX_HANDSHAKE_LEN`] bytes and must finish within `handshake_timeout`; at most
//! `max_pending` connections may be in their handshake and `max_connections` open at once;
//! an established connection that sends nothing (not even a PING) for `idle_timeout` is
//! closed, and each side sends a PING after `keepalive` without traffic.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::BytesMut;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::frame::{
    encode_frame, reject_body, ClientHandshake, ClusterKey, FrameDecoder, FrameKind, RawFrame,
    ServerHandshake, Session, MAX_HANDSHAKE_LEN, NONCE_LEN,
};
use crate::net::{Error, Result};
use crate::protocol::{self, ClusterId, Envelope, ParticipantId};

mod client;
mod router;
pub use client::{request, Client};
pub use router::{serve, Router};

/// Transport settings shared by every connection of a node.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// The cluster; hellos and envelopes of other clusters are rejected.
    pub cluster: ClusterId,
    /// The cluster key; when set the handshake proves it both ways and every frame after
    /// it carries an HMAC-SHA256 under a per-connection session key.
    pub key: Option<ClusterKey>,
    /// Bound on connecting (one attempt).
    pub connect_timeout: Duration,
    /// Bound on the whole handshake of a connection.
    pub handshake_timeout: Duration,
    /// Bound on writing one frame.
    pub write_timeout: Duration,
    /// A PING is sent after this long without sending anything.
    pub keepalive: Duration,
    /// An established connection that received nothing for this long is closed.
    pub idle_timeout: Duration,
    /// First reconnect delay; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Capacity of each peer's send queue (envelopes); when full, new envelopes are
    /// dropped with a warning (the protocol's deadlines handle the loss).
    pub queue: usize,
    /// Most connections a listener keeps open at once.
    pub max_connections: usize,
    /// Most connections a listener keeps in their handshake at once.
    pub max_pending: usize,
    /// Largest frame `length` a server accepts from its clients after the handshake.
    pub max_frame_from_client: usize,
    /// Largest frame `length` a client accepts from its server after the handshake.
    pub max_frame_from_server: usize,
}

impl TransportConfig {
    /// Defaults for a LAN: connect 3 s, handshake 5 s, write 5 s, keep-alive 5 s, idle
    /// 20 s, backoff 20 ms – 2 s, queue 1024, 512 connections of which 64 in their
    /// handshake, frames up to 256 KiB from clients and 1 MiB from servers.
    pub fn new(cluster: ClusterId, key: Option<ClusterKey>) -> Self {
        Self {
            cluster,
            key,
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_secs(2),
            queue: 1024,
            max_connections: 512,
            max_pending: 64,
            max_frame_from_client: 256 << 10,
            max_frame_from_server: 1 << 20,
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
        /// The envelope (cluster, sender, recipient and role already checked).
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

/// Who may connect to a listener, by the id their HELLO announces.
#[derive(Debug, Clone)]
pub enum Admission {
    /// A coordinator: only its participants.
    Participants(Vec<ParticipantId>),
    /// A metadata server: anyone but itself (unregistered clients, registered
    /// participants, the coordinator).
    MetadataServerClients,
}

impl Admission {
    fn admit(&self, id: ParticipantId) -> std::result::Result<(), String> {
        match self {
            Admission::Participants(ids) if ids.contains(&id) => Ok(()),
            Admission::Participants(_) => Err(format!(
                "{id} is not a participant of this coordinator; only its participants may connect (operators' triggers go to the metadata server)"
            )),
            Admission::MetadataServerClients if id == ParticipantId::METADATA_SERVER => {
                Err("a client may not connect as the metadata server".to_string())
            }
            Admission::MetadataServerClients => Ok(()),
        }
    }
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// One TCP connection split in halves, with its read buffer and decoder.
struct Wire {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    dec: FrameDecoder,
    peer: String,
    write_timeout: Duration,
}

impl Wire {
    fn new(stream: TcpStream, peer: String, write_timeout: Duration) -> Self {
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        Self {
            rd,
            wr,
            buf: BytesMut::with_capacity(512),
            dec: FrameDecoder::new(MAX_HANDSHAKE_LEN),
            peer,
            write_timeout,
        }
    }

    fn name_errors(&self, e: Error) -> Error {
        match e {
            Error::TransportFrame { reason, .. } => Error::TransportFrame {
                peer: self.peer.clone(),
                reason,
            },
            Error::PeerRejected { reason, .. } => Error::PeerRejected {
                peer: self.peer.clone(),
                reason,
            },
            Error::Authentication { reason, .. } => Error::Authentication {
                peer: self.peer.clone(),
                reason,
            },
            other => other,
        }
    }

    /// Reads the next frame; `Ok(None)` on an orderly close between frames.
    async fn read(&mut self) -> Result<Option<RawFrame>> {
        loop {
            match self.dec.decode(&self.buf) {
                Ok(Some((frame, used))) => {
                    let _ = self.buf.split_to(used);
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(e) => return Err(self.name_errors(e)),
            }
            if let Ok(Some(total)) = self.dec.frame_size(&self.buf) {
                self.buf.reserve(total.saturating_sub(self.buf.len()));
            }
            let n = self
                .rd
                .read_buf(&mut self.buf)
                .await
                .map_err(|source| Error::Network {
                    peer: self.peer.clone(),
                    action: "receive",
                    source,
                })?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(Error::TransportFrame {
                    peer: self.peer.clone(),
                    reason: format!("closed in the middle of a frame ({} bytes)", self.buf.len()),
                });
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match tokio::time::timeout(self.write_timeout, self.wr.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(Error::Network {
                peer: self.peer.clone(),
                action: "send",
                source,
            }),
            Err(_) => Err(Error::Timeout {
                what: format!("sending a frame to {}", self.peer),
                after: self.write_timeout,
            }),
        }
    }

    /// Sends a REJECT with sequence number `seq` (before a session exists).
    async fn reject(&mut self, seq: u64, reason: &str) {
        self.send_reject(encode_frame(
            FrameKind::Reject,
            seq,
            &reject_body(reason),
            None,
        ))
        .await;
    }

    /// Sends a REJECT frame (best effort, bounded) and closes the write side.
    async fn send_reject(&mut self, frame: Vec<u8>) {
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            let _ = self.wr.write_all(&frame).await;
            let _ = self.wr.shutdown().await;
        })
        .await;
    }
}

async fn bounded<T>(
    what: impl FnOnce() -> String,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: what(),
            after,
        }),
    }
}

async fn expect_frame(wire: &mut Wire, what: &str) -> Result<RawFrame> {
    wire.read().await?.ok_or_else(|| Error::TransportFrame {
        peer: wire.peer.clone(),
        reason: format!("closed before its {what}"),
    })
}

/// The accepting side's handshake: HELLO → WELCOME → AUTH.
async fn accept_handshake(
    wire: &mut Wire,
    cfg: &TransportConfig,
    me: ParticipantId,
    admission: &Admission,
) -> Result<Session> {
    let hello = expect_frame(wire, "HELLO").await?;
    let (pending, welcome) = ServerHandshake::new(cfg.cluster, cfg.key.clone(), me, nonce())
        .on_hello(&hello, |id| admission.admit(id))
        .map_err(|e| wire.name_errors(e))?;
    wire.write(&welcome).await?;
    let auth = expect_frame(wire, "AUTH").await?;
    pending.on_auth(&auth).map_err(|e| wire.name_errors(e))
}

/// The dialling side: connect, HELLO, WELCOME, AUTH.
async fn dial(
    addr: SocketAddr,
    cfg: &TransportConfig,
    me: ParticipantId,
    server: ParticipantId,
) -> Result<(Wire, Session)> {
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
    let mut wire = Wire::new(stream, addr.to_string(), cfg.write_timeout);
    let hs = ClientHandshake::new(cfg.cluster, cfg.key.clone(), me, server, nonce());
    let session = bounded(
        || format!("the handshake with {addr}"),
        cfg.handshake_timeout,
        async {
            wire.write(&hs.hello()).await?;
            let welcome = expect_frame(&mut wire, "WELCOME").await?;
            match hs.on_welcome(&welcome) {
                Ok((auth, session)) => {
                    wire.write(&auth).await?;
                    Ok(session)
                }
                Err(e) => {
                    let e = wire.name_errors(e);
                    if !matches!(e, Error::PeerRejected { .. }) {
                        wire.reject(1, &e.to_string()).await;
                    }
                    Err(e)
                }
            }
        },
    )
    .await?;
    wire.dec.set_keyed(session.is_keyed());
    wire.dec.set_max_len(cfg.max_frame_from_server);
    Ok((wire, session))
}

/// Runs an established connection until it closes, the queue closes or shutdown.
/// Returns the reason for an abnormal end.
async fn pump(
    mut wire: Wire,
    mut session: Session,
    cfg: &TransportConfig,
    conn: ConnId,
    outq: &mut mpsc::Receiver<Envelope>,
    inbound: &mpsc::Sender<Inbound>,
    stop: &CancellationToken,
) -> Result<()> {
    let mut last_in = Instant::now();
    let mut last_out = Instant::now();
    loop {
        let ping_at = last_out + cfg.keepalive;
        let idle_at = last_in + cfg.idle_timeout;
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_millis(200), wire.wr.shutdown()).await;
                return Ok(());
            }
            out = outq.recv() => {
                let Some(envelope) = out else {
                    let _ = tokio::time::timeout(Duration::from_millis(200), wire.wr.shutdown()).await;
                    return Ok(());
                };
                let body = serde_json::to_vec(&envelope).map_err(|source| protocol::Error::MalformedPayload { source })?;
                let frame = session.seal(FrameKind::Data, &body);
                wire.write(&frame).await?;
                last_out = Instant::now();
            }
            frame = wire.read() => {
                let frame = match frame {
                    Ok(None) => return Ok(()),
                    Ok(Some(f)) => f,
                    Err(e) => {
                        if matches!(e, Error::TransportFrame { .. }) {
                            wire.send_reject(session.seal(FrameKind::Reject, &reject_body(&e.to_string()))).await;
                        }
                        return Err(e);
                    }
                };
                last_in = Instant::now();
                let checked = session
                    .open(frame)
                    .and_then(|(kind, body)| match kind {
                        FrameKind::Data => session.check_envelope(cfg.cluster, &body).map(Some),
                        _ => Ok(None),
                    })
                    .map_err(|e| wire.name_errors(e));
                match checked {
                    Ok(Some(envelope)) => {
                        if inbound.send(Inbound::Envelope { conn, envelope }).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if !matches!(e, Error::PeerRejected { .. }) {
                            wire.send_reject(session.seal(FrameKind::Reject, &reject_body(&e.to_string()))).await;
                        }
                        return Err(e);
                    }
                }
            }
            _ = tokio::time::sleep_until(ping_at) => {
                let frame = session.seal(FrameKind::Ping, b"");
                wire.write(&frame).await?;
                last_out = Instant::now();
            }
            _ = tokio::time::sleep_until(idle_at) => {
                let e = Error::Timeout { what: format!("any frame from {} (idle connection)", wire.peer), after: cfg.idle_timeout };
                wire.send_reject(session.seal(FrameKind::Reject, &reject_body(&e.to_string()))).await;
                return Err(e);
            }
        }
    }
}

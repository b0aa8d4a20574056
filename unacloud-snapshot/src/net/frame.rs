//! The TCP transport of protocol v1, sans-IO: frames, the three-frame handshake, session
//! keys, sequence numbers and which messages each role may send (`PROTOCOL.md` §2).
//!
//! ```text
//! +--------------------+----------+----------------+-----------------+----------------+
//! | length: u32, BE    | kind: u8 | seq: u64, BE   | body            | mac: 32 bytes  |
//! | (bytes after it)   |          | (per direction)|                 | (keyed DATA    |
//! |                    |          |                |                 |  and PING only)|
//! +--------------------+----------+----------------+-----------------+----------------+
//! kind  1 HELLO    client → server, seq 0: JSON {"protocol","versions","cluster","id","nonce"}
//!       2 WELCOME  server → client, seq 0: JSON {"version","id","nonce","proof"}
//!       3 AUTH     client → server, seq 1: JSON {"proof"}
//!       4 DATA     one protocol envelope, JSON
//!       5 PING     empty body: keep-alive
//!       6 REJECT   UTF-8 reason; the sender closes the connection after it
//! session key Ks = HMAC-SHA256(K, "unacloud-gs/1 session" || version || cluster (u64 BE)
//!                  || client id (u32 BE) || server id (u32 BE) || client nonce || server nonce)
//! proofs         = HMAC-SHA256(Ks, "server") in WELCOME, HMAC-SHA256(Ks, "client") in AUTH
//! mac            = HMAC-SHA256(Ks, direction ('C' client→server, 'S' server→client)
//!                  || seq (u64 BE) || kind || body)
//! ```
//!
//! Nothing here performs I/O: [`ClientHandshake`], [`ServerHandshake`] and [`Session`]
//! take and return bytes, so the same code drives the tokio transport
//! ([`super::conn`]), the fuzz target and the byte-level test vectors of `PROTOCOL.md`.
//!
//! ```
//! use unacloud_snapshot::net::frame::*;
//! use unacloud_snapshot::protocol::{ClusterId, ParticipantId};
//! let key = ClusterKey::from_hex("000102030405060708090a0b0c0d0e0f")?;
//! let (cluster, me, server) = (ClusterId(42), ParticipantId(2), ParticipantId::COORDINATOR);
//! // The client says hello; the server answers with its nonce and its proof of the key.
//! let client = ClientHandshake::new(cluster, Some(key.clone()), me, server, [1; 32]);
//! let mut dec = FrameDecoder::new(MAX_HANDSHAKE_LEN);
//! let hello = dec.decode_one(&client.hello())?;
//! let (pending, welcome) =
//!     ServerHandshake::new(cluster, Some(key), server, [2; 32]).on_hello(&hello, |_| Ok(()))?;
//! // The client checks the proof and proves the key in turn: both sides hold a session.
//! let (auth, mut c) = client.on_welcome(&dec.decode_one(&welcome)?)?;
//! let mut s = pending.on_auth(&dec.decode_one(&auth)?)?;
//! let mut keyed = FrameDecoder::new(1 << 16).keyed(true);
//! let frame = c.seal(FrameKind::Data, b"{}");
//! assert_eq!(s.open(keyed.decode_one(&frame)?)?, (FrameKind::Data, b"{}".to_vec()));
//! // A replay of the same bytes is out of sequence: refused.
//! assert!(s.open(keyed.decode_one(&frame)?).is_err());
//! # Ok::<(), unacloud_snapshot::Error>(())
//! ```

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::protocol::{ClusterId, Envelope, Message, ParticipantId};

type HmacSha256 = Hmac<Sha256>;

/// The transport version this implementation speaks.
pub const TRANSPORT_VERSION: u8 = 1;
/// The `protocol` value of every HELLO.
pub const PROTOCOL_NAME: &str = "unacloud-gs";
/// Bytes of the length prefix.
pub const LENGTH_LEN: usize = 4;
/// Bytes of the header after the length prefix (kind and sequence number).
pub const HEADER_LEN: usize = 1 + 8;
/// Bytes of a MAC.
pub const MAC_LEN: usize = 32;
/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Largest `length` accepted before the handshake completed (HELLO, WELCOME, AUTH,
/// REJECT): a connection that has not proven anything can make its peer buffer at most
/// this much.
pub const MAX_HANDSHAKE_LEN: usize = 1024;
/// Largest REJECT reason sent (longer ones are cut at a character boundary).
pub const MAX_REJECT_REASON: usize = 512;
/// Largest global snapshot id or resume attempt accepted on the wire (2^53 − 1, exact in
/// every JSON implementation).
pub const MAX_EPOCH: u64 = (1 << 53) - 1;

/// A shared secret of one deployment. Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

impl ClusterKey {
    /// A key from raw bytes (at least 16).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = bytes.into();
        if bytes.len() < 16 {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "the cluster key has {} bytes; use at least 16 random bytes (for example `head -c 32 /dev/urandom | xxd -p -c 64`)",
                    bytes.len()
                ),
            });
        }
        Ok(Self(bytes))
    }

    /// A key from hexadecimal text (whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self> {
        let clean: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = hex_decode(&clean).map_err(|reason| Error::InvalidConfig {
            reason: format!("the cluster key {reason}; write it as hexadecimal digits"),
        })?;
        Self::new(bytes)
    }

    /// Reads a hexadecimal key from a file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ResultsIo {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hex(&text)
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail.
    let mut m = match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; MAC_LEN],
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Constant-time comparison of two MACs.
fn same_mac(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lower-case hexadecimal.
pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Decodes hexadecimal digits (either case).
pub fn hex_decode(text: &str) -> std::result::Result<Vec<u8>, String> {
    if text.len() % 2 != 0 {
        return Err("has an odd number of hexadecimal digits".to_string());
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err(format!("is not hexadecimal near position {}", 2 * i)),
        })
        .collect()
}

/// The kinds of transport frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Client → server, first frame: who is connecting.
    Hello = 1,
    /// Server → client, first frame: the server's nonce and proof.
    Welcome = 2,
    /// Client → server, second frame: the client's proof.
    Auth = 3,
    /// A protocol envelope.
    Data = 4,
    /// Keep-alive.
    Ping = 5,
    /// Why the sender is about to close the connection.
    Reject = 6,
}

impl FrameKind {
    /// The kind of a kind byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Auth,
            4 => Self::Data,
            5 => Self::Ping,
            6 => Self::Reject,
            _ => return None,
        })
    }

    /// Whether frames of this kind carry a MAC in a keyed session.
    pub fn is_authenticated(self) -> bool {
        matches!(self, Self::Data | Self::Ping)
    }

    /// The kind's name in `PROTOCOL.md`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "HELLO",
            Self::Welcome => "WELCOME",
            Self::Auth => "AUTH",
            Self::Data => "DATA",
            Self::Ping => "PING",
            Self::Reject => "REJECT",
        }
    }
}

/// One decoded frame, before its session checked its sequence number and MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The kind.
    pub kind: FrameKind,
    /// The sender's sequence number.
    pub seq: u64,
    /// The body.
    pub body: Vec<u8>,
    /// The MAC, for authenticated kinds of a keyed session.
    pub mac: Option<[u8; MAC_LEN]>,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::TransportFrame {
        peer: "peer".to_string(),
        reason: reason.into(),
    }
}

/// Encodes one frame (length prefix included).
pub fn encode_frame(
    kind: FrameKind,
    seq: u64,
    body: &[u8],
    mac: Option<&[u8; MAC_LEN]>,
) -> Vec<u8> {
    let len = HEADER_LEN + body.len() + mac.map_or(0, |_| MAC_LEN);
    let mut out = Vec::with_capacity(LENGTH_LEN + len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(body);
    if let Some(m) = mac {
        out.extend_from_slice(m);
    }
    out
}

/// Splits a byte stream into frames. Every defect is an error after which the stream
/// cannot be resynchronised: the connection must be closed.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_len: usize,
    keyed: bool,
}

impl FrameDecoder {
    /// A decoder that refuses frames whose `length` exceeds `max_len`, judged from the
    /// 4-byte prefix alone (before anything else is buffered).
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            keyed: false,
        }
    }

    /// After a keyed handshake, DATA and PING frames end with a MAC.
    pub fn keyed(mut self, keyed: bool) -> Self {
        self.keyed = keyed;
        self
    }

    /// Changes the largest accepted `length` (after the handshake).
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    /// Sets whether DATA and PING frames carry a MAC.
    pub fn set_keyed(&mut self, keyed: bool) {
        self.keyed = keyed;
    }

    /// How many bytes the frame at the start of `buf` needs in total, once its length
    /// prefix is there and valid.
    pub fn frame_size(&self, buf: &[u8]) -> Result<Option<usize>> {
        let Some(prefix) = buf.get(..LENGTH_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len < HEADER_LEN {
            return Err(bad(format!(
                "frame length {len} is shorter than a frame header ({HEADER_LEN} bytes)"
            )));
        }
        if len > self.max_len {
            return Err(bad(format!(
                "frame length {len} exceeds this connection's limit of {} bytes",
                self.max_len
            )));
        }
        Ok(Some(LENGTH_LEN + len))
    }

    /// Decodes the frame at the start of `buf`: `Ok(None)` while incomplete, else the
    /// frame and the bytes it used.
    pub fn decode(&self, buf: &[u8]) -> Result<Option<(RawFrame, usize)>> {
        let Some(total) = self.frame_size(buf)? else {
            return Ok(None);
        };
        if let Some(&k) = buf.get(LENGTH_LEN) {
            if FrameKind::from_u8(k).is_none() {
                return Err(bad(format!("unknown frame kind {k}")));
            }
        }
        let Some(frame) = buf.get(LENGTH_LEN..total) else {
            return Ok(None);
        };
        let kind = FrameKind::from_u8(frame[0]).ok_or_else(|| bad("unknown frame kind"))?;
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&frame[1..HEADER_LEN]);
        let seq = u64::from_be_bytes(seq);
        let rest = &frame[HEADER_LEN..];
        let (body, mac) = if self.keyed && kind.is_authenticated() {
            if rest.len() < MAC_LEN {
                return Err(bad(format!("{} frame shorter than its MAC", kind.name())));
            }
            let (b, m) = rest.split_at(rest.len() - MAC_LEN);
            let mut mac = [0u8; MAC_LEN];
            mac.copy_from_slice(m);
            (b, Some(mac))
        } else {
            (rest, None)
        };
        Ok(Some((
            RawFrame {
                kind,
                seq,
                body: body.to_vec(),
                mac,
            },
            total,
        )))
    }

    /// Decodes exactly one frame from `bytes` (tests, fuzzing, test vectors).
    pub fn decode_one(&self, bytes: &[u8]) -> Result<RawFrame> {
        match self.decode(bytes)? {
            Some((f, used)) if used == bytes.len() => Ok(f),
            Some((_, used)) => Err(bad(format!("{} bytes after the frame", bytes.len() - used))),
            None => Err(bad("truncated frame")),
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct HelloBody {
    protocol: String,
    versions: Vec<u8>,
    cluster: ClusterId,
    id: ParticipantId,
    nonce: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct WelcomeBody {
    version: u8,
    id: ParticipantId,
    nonce: String,
    proof: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct AuthBody {
    proof: Option<String>,
}

/// What a HELLO announced, as the server saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The client's cluster.
    pub cluster: ClusterId,
    /// The client's id ([`ParticipantId::UNREGISTERED`] for launchers before registration
    /// and for operators' triggers).
    pub id: ParticipantId,
}

fn nonce_of(text: &str, what: &str) -> Result<[u8; NONCE_LEN]> {
    let bytes = hex_decode(text).map_err(|e| bad(format!("the {what} nonce {e}")))?;
    bytes
        .try_into()
        .map_err(|_| bad(format!("the {what} nonce is not {NONCE_LEN} bytes")))
}

fn session_key(
    key: &ClusterKey,
    cluster: ClusterId,
    client: ParticipantId,
    server: ParticipantId,
    cn: &[u8; NONCE_LEN],
    sn: &[u8; NONCE_LEN],
) -> [u8; MAC_LEN] {
    hmac(
        &key.0,
        &[
            b"unacloud-gs/1 session",
            &[TRANSPORT_VERSION],
            &cluster.0.to_be_bytes(),
            &client.0.to_be_bytes(),
            &server.0.to_be_bytes(),
            cn,
            sn,
        ],
    )
}

fn check_first(frame: &RawFrame, kind: FrameKind, seq: u64) -> Result<()> {
    if frame.kind == FrameKind::Reject {
        return Err(Error::PeerRejected {
            peer: "peer".to_string(),
            reason: reject_reason(&frame.body),
        });
    }
    if frame.kind != kind {
        return Err(bad(format!(
            "expected {} but got {}",
            kind.name(),
            frame.kind.name()
        )));
    }
    if frame.seq != seq {
        return Err(bad(format!(
            "{} has sequence number {} instead of {seq}",
            kind.name(),
            frame.seq
        )));
    }
    Ok(())
}

/// Checks that `frame` is the handshake frame `kind` with sequence number `seq`, and
/// decodes its JSON body.
fn handshake_body<T: serde::de::DeserializeOwned>(
    frame: &RawFrame,
    kind: FrameKind,
    seq: u64,
) -> Result<T> {
    check_first(frame, kind, seq)?;
    serde_json::from_slice(&frame.body).map_err(|e| bad(format!("malformed {}: {e}", kind.name())))
}

/// The text of a REJECT body (invalid UTF-8 replaced).
pub fn reject_reason(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// The body of a REJECT frame: `reason` cut to [`MAX_REJECT_REASON`] bytes.
pub fn reject_body(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REJECT_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

/// The connecting side of a handshake.
#[derive(Debug)]
pub struct ClientHandshake {
    cluster: ClusterId,
    key: Option<ClusterKey>,
    me: ParticipantId,
    server: ParticipantId,
    nonce: [u8; NONCE_LEN],
}

impl ClientHandshake {
    /// A client `me` of `cluster` dialling the server `server` (the coordinator, or
    /// [`ParticipantId::METADATA_SERVER`]), with a fresh random `nonce`.
    pub fn new(
        cluster: ClusterId,
        key: Option<ClusterKey>,
        me: ParticipantId,
        server: ParticipantId,
        nonce: [u8; NONCE_LEN],
    ) -> Self {
        Self {
            cluster,
            key,
            me,
            server,
            nonce,
        }
    }

    /// The HELLO frame (sequence number 0).
    pub fn hello(&self) -> Vec<u8> {
        let body = HelloBody {
            protocol: PROTOCOL_NAME.to_string(),
            versions: vec![TRANSPORT_VERSION],
            cluster: self.cluster,
            id: self.me,
            nonce: hex_encode(&self.nonce),
        };
        encode_frame(
            FrameKind::Hello,
            0,
            &serde_json::to_vec(&body).unwrap_or_default(),
            None,
        )
    }

    /// Checks the server's WELCOME (its id, and with a key its proof) and returns the AUTH
    /// frame to send and the established session.
    pub fn on_welcome(self, frame: &RawFrame) -> Result<(Vec<u8>, Session)> {
        let w: WelcomeBody = handshake_body(frame, FrameKind::Welcome, 0)?;
        if w.version != TRANSPORT_VERSION {
            return Err(bad(format!(
                "the server chose transport version {}, which this client does not speak (it speaks {TRANSPORT_VERSION})",
                w.version
            )));
        }
        if w.id != self.server {
            return Err(bad(format!(
                "reached node {} instead of {}",
                w.id, self.server
            )));
        }
        let sn = nonce_of(&w.nonce, "server")?;
        let auth_err = |reason: &str| Error::Authentication {
            peer: "peer".to_string(),
            reason: reason.to_string(),
        };
        let (proof, ks) = match (&self.key, &w.proof) {
            (Some(key), Some(p)) => {
                let ks = session_key(key, self.cluster, self.me, self.server, &self.nonce, &sn);
                let got = hex_decode(p).map_err(|e| bad(format!("the server's proof {e}")))?;
                if !same_mac(&got, &hmac(&ks, &[b"server"])) {
                    return Err(auth_err("the server's proof does not verify: the two nodes have different cluster keys; configure the same key on both"));
                }
                (Some(hex_encode(&hmac(&ks, &[b"client"]))), Some(ks))
            }
            (Some(_), None) => return Err(auth_err("the server has no cluster key but this node has one; configure the same key on both (a keyed node never talks to an unkeyed one)")),
            (None, Some(_)) => return Err(auth_err("the server requires the cluster key but this node has none; configure the key here too")),
            (None, None) => (None, None),
        };
        let auth = encode_frame(
            FrameKind::Auth,
            1,
            &serde_json::to_vec(&AuthBody { proof }).unwrap_or_default(),
            None,
        );
        Ok((
            auth,
            Session {
                key: ks,
                out_dir: b'C',
                in_dir: b'S',
                next_out: 2,
                next_in: 1,
                me: self.me,
                peer: self.server,
            },
        ))
    }
}

/// The accepting side of a handshake, before HELLO.
#[derive(Debug)]
pub struct ServerHandshake {
    cluster: ClusterId,
    key: Option<ClusterKey>,
    me: ParticipantId,
    nonce: [u8; NONCE_LEN],
}

/// The accepting side after WELCOME, waiting for AUTH.
#[derive(Debug)]
pub struct PendingServer {
    hello: Hello,
    me: ParticipantId,
    keyed: Option<[u8; MAC_LEN]>,
    has_key: bool,
}

impl ServerHandshake {
    /// A server `me` of `cluster` with a fresh random `nonce`.
    pub fn new(
        cluster: ClusterId,
        key: Option<ClusterKey>,
        me: ParticipantId,
        nonce: [u8; NONCE_LEN],
    ) -> Self {
        Self {
            cluster,
            key,
            me,
            nonce,
        }
    }

    /// Checks a HELLO (protocol, versions, cluster, nonce) and whether `admit` lets its
    /// id connect here (`Err(reason)` refuses it). Returns the WELCOME to send.
    pub fn on_hello(
        self,
        frame: &RawFrame,
        admit: impl FnOnce(ParticipantId) -> std::result::Result<(), String>,
    ) -> Result<(PendingServer, Vec<u8>)> {
        let h: HelloBody = handshake_body(frame, FrameKind::Hello, 0)?;
        if h.protocol != PROTOCOL_NAME {
            return Err(bad(format!(
                "HELLO of protocol {:?}, not {PROTOCOL_NAME:?}",
                h.protocol
            )));
        }
        if !h.versions.contains(&TRANSPORT_VERSION) {
            return Err(bad(format!(
                "no common transport version: the client offers {:?}, this server speaks {TRANSPORT_VERSION}",
                h.versions
            )));
        }
        if h.cluster != self.cluster {
            return Err(Error::ForeignCluster {
                expected: self.cluster,
                got: h.cluster,
            });
        }
        let cn = nonce_of(&h.nonce, "client")?;
        admit(h.id).map_err(|reason| Error::Unauthorised {
            peer: format!("node {}", h.id),
            reason,
        })?;
        let ks = self
            .key
            .as_ref()
            .map(|k| session_key(k, self.cluster, h.id, self.me, &cn, &self.nonce));
        let body = WelcomeBody {
            version: TRANSPORT_VERSION,
            id: self.me,
            nonce: hex_encode(&self.nonce),
            proof: ks.map(|ks| hex_encode(&hmac(&ks, &[b"server"]))),
        };
        let welcome = encode_frame(
            FrameKind::Welcome,
            0,
            &serde_json::to_vec(&body).unwrap_or_default(),
            None,
        );
        Ok((
            PendingServer {
                hello: Hello {
                    cluster: h.cluster,
                    id: h.id,
                },
                me: self.me,
                keyed: ks,
                has_key: self.key.is_some(),
            },
            welcome,
        ))
    }
}

impl PendingServer {
    /// The HELLO this connection sent.
    pub fn hello(&self) -> Hello {
        self.hello
    }

    /// Checks AUTH; the session is established (the client proved the key, if there is
    /// one).
    pub fn on_auth(self, frame: &RawFrame) -> Result<Session> {
        let a: AuthBody = handshake_body(frame, FrameKind::Auth, 1)?;
        let auth_err = |reason: &str| Error::Authentication {
            peer: format!("node {}", self.hello.id),
            reason: reason.to_string(),
        };
        match (self.keyed, a.proof) {
            (Some(ks), Some(p)) => {
                let got = hex_decode(&p).map_err(|e| bad(format!("the client's proof {e}")))?;
                if !same_mac(&got, &hmac(&ks, &[b"client"])) {
                    return Err(auth_err("the client's proof does not verify: the two nodes have different cluster keys (or the HELLO was replayed); configure the same key on both"));
                }
            }
            (Some(_), None) => return Err(auth_err("the client sent no proof but this node requires the cluster key; configure the key on the client too")),
            (None, Some(_)) => return Err(auth_err("the client authenticates with a cluster key but this node has none; configure the same key here")),
            (None, None) => {}
        }
        debug_assert_eq!(self.keyed.is_some(), self.has_key);
        Ok(Session {
            key: self.keyed,
            out_dir: b'S',
            in_dir: b'C',
            next_out: 1,
            next_in: 2,
            me: self.me,
            peer: self.hello.id,
        })
    }
}

/// An established connection's framing state: sequence numbers both ways and, with a
/// cluster key, the session key that authenticates every DATA and PING frame.
#[derive(Debug)]
pub struct Session {
    key: Option<[u8; MAC_LEN]>,
    out_dir: u8,
    in_dir: u8,
    next_out: u64,
    next_in: u64,
    me: ParticipantId,
    peer: ParticipantId,
}

impl Session {
    /// Whether frames are authenticated.
    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// The other side's id (authenticated by the handshake with a key).
    pub fn peer(&self) -> ParticipantId {
        self.peer
    }

    /// This side's id.
    pub fn me(&self) -> ParticipantId {
        self.me
    }

    fn mac(&self, dir: u8, seq: u64, kind: FrameKind, body: &[u8]) -> Option<[u8; MAC_LEN]> {
        self.key
            .map(|ks| hmac(&ks, &[&[dir], &seq.to_be_bytes(), &[kind as u8], body]))
    }

    /// Encodes the next outgoing frame.
    pub fn seal(&mut self, kind: FrameKind, body: &[u8]) -> Vec<u8> {
        let seq = self.next_out;
        self.next_out += 1;
        let mac = if kind.is_authenticated() {
            self.mac(self.out_dir, seq, kind, body)
        } else {
            None
        };
        encode_frame(kind, seq, body, mac.as_ref())
    }

    /// Checks the next incoming frame: its sequence number and (keyed) its MAC. A REJECT
    /// is returned as [`Error::PeerRejected`]; a handshake frame is out of place.
    pub fn open(&mut self, frame: RawFrame) -> Result<(FrameKind, Vec<u8>)> {
        if frame.seq != self.next_in {
            return Err(bad(format!(
                "{} frame with sequence number {} where {} was due (replayed, lost or reordered)",
                frame.kind.name(),
                frame.seq,
                self.next_in
            )));
        }
        self.next_in += 1;
        match frame.kind {
            FrameKind::Reject => Err(Error::PeerRejected {
                peer: format!("node {}", self.peer),
                reason: reject_reason(&frame.body),
            }),
            FrameKind::Hello | FrameKind::Welcome | FrameKind::Auth => Err(bad(format!(
                "a {} on an established connection",
                frame.kind.name()
            ))),
            FrameKind::Data | FrameKind::Ping => {
                if let Some(expected) = self.mac(self.in_dir, frame.seq, frame.kind, &frame.body) {
                    let ok = frame.mac.is_some_and(|m| same_mac(&m, &expected));
                    if !ok {
                        return Err(Error::Authentication {
                            peer: format!("node {}", self.peer),
                            reason: format!(
                                "the MAC of {} frame {} does not verify (forged or corrupted)",
                                frame.kind.name(),
                                frame.seq
                            ),
                        });
                    }
                }
                Ok((frame.kind, frame.body))
            }
        }
    }

    /// Decodes a DATA body into an envelope and checks it against this connection: the
    /// cluster, the sender (the authenticated peer, never anyone else), the recipient
    /// (this node) and whether the sender's role may send that message to this one
    /// ([`authorise`]).
    pub fn check_envelope(&self, cluster: ClusterId, body: &[u8]) -> Result<Envelope> {
        let envelope: Envelope =
            serde_json::from_slice(body).map_err(|e| bad(format!("malformed envelope: {e}")))?;
        if envelope.cluster != cluster {
            return Err(Error::ForeignCluster {
                expected: cluster,
                got: envelope.cluster,
            });
        }
        let unauthorised = |reason: String| Error::Unauthorised {
            peer: format!("node {}", self.peer),
            reason,
        };
        if envelope.from != self.peer {
            return Err(unauthorised(format!(
                "an envelope from {} on the connection of {}: a connection speaks only for the node that opened it",
                envelope.from, self.peer
            )));
        }
        if envelope.to != self.me {
            return Err(unauthorised(format!(
                "an envelope to {} on a connection to {}",
                envelope.to, self.me
            )));
        }
        authorise(envelope.from, envelope.to, &envelope.message).map_err(unauthorised)?;
        Ok(envelope)
    }
}

/// Whether `from` may send `message` to `to` (`PROTOCOL.md` §3, "Who sends what"). Also
/// refuses epochs above [`MAX_EPOCH`].
pub fn authorise(
    from: ParticipantId,
    to: ParticipantId,
    message: &Message,
) -> std::result::Result<(), String> {
    use Message as M;
    let ms = ParticipantId::METADATA_SERVER;
    let c = ParticipantId::COORDINATOR;
    let un = ParticipantId::UNREGISTERED;
    let participant = |id: ParticipantId| id != c && id != ms && id != un;
    let ok = match message {
        M::Precheck { .. }
        | M::TakeSnapshot { .. }
        | M::Release { .. }
        | M::Abort { .. }
        | M::Poll { .. }
        | M::Restore { .. }
        | M::Start { .. }
        | M::ResumeAbort { .. } => from == c && participant(to),
        M::PrecheckOk { .. }
        | M::PrecheckFailed { .. }
        | M::Done { .. }
        | M::SnapshotFailed { .. }
        | M::PollOk { .. }
        | M::RestoreOk { .. }
        | M::StartOk { .. }
        | M::ResumeFailed { .. }
        | M::Stale { .. } => participant(from) && to == c,
        M::Insert { .. } => from == un && to == ms,
        M::SnapshotReport { .. } => from == c && to == ms,
        M::QueryAddress { .. } | M::QueryList { .. } | M::QueryCount => from != ms && to == ms,
        M::TriggerGlobalSnapshot | M::TriggerResume { .. } => {
            (from != ms && to == ms) || (from == ms && to == c)
        }
        M::Inserted { .. }
        | M::TriggerForwarded
        | M::Address { .. }
        | M::List { .. }
        | M::Count { .. }
        | M::Refused { .. } => from == ms,
    };
    if !ok {
        return Err(format!(
            "{} may not send {} to {}",
            role_name(from),
            message.kind(),
            role_name(to)
        ));
    }
    let epochs = [
        message.gs().map(|g| g.0),
        match message {
            M::Poll { attempt, .. }
            | M::PollOk { attempt, .. }
            | M::Restore { attempt, .. }
            | M::RestoreOk { attempt, .. }
            | M::Start { attempt, .. }
            | M::StartOk { attempt, .. }
            | M::ResumeFailed { attempt, .. }
            | M::ResumeAbort { attempt, .. } => Some(attempt.0),
            M::Stale {
                attempt,
                newest_gs,
                newest_attempt,
                ..
            } => Some(
                attempt
                    .map_or(0, |a| a.0)
                    .max(newest_gs.0)
                    .max(newest_attempt.0),
            ),
            _ => None,
        },
    ];
    if let Some(e) = epochs.into_iter().flatten().find(|e| *e > MAX_EPOCH) {
        return Err(format!(
            "{} carries epoch {e}, above the largest allowed ({MAX_EPOCH})",
            message.kind()
        ));
    }
    Ok(())
}

fn role_name(id: ParticipantId) -> String {
    if id == ParticipantId::METADATA_SERVER {
        "the metadata server".to_string()
    } else if id == ParticipantId::UNREGISTERED {
        "an unregistered client".to_string()
    } else if id == ParticipantId::COORDINATOR {
        "the coordinator".to_string()
    } else {
        format!("participant {}", id.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::GlobalSnapshotId;
    use proptest::prelude::*;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::new(vec![b; 32]).unwrap()
    }

    /// Runs a handshake between `ck` (client key) and `sk` (server key).
    fn handshake(ck: Option<ClusterKey>, sk: Option<ClusterKey>) -> Result<(Session, Session)> {
        let dec = FrameDecoder::new(MAX_HANDSHAKE_LEN);
        let c = ClientHandshake::new(
            ClusterId(1),
            ck,
            ParticipantId(3),
            ParticipantId(0),
            [7; 32],
        );
        let (p, w) = ServerHandshake::new(ClusterId(1), sk, ParticipantId(0), [9; 32])
            .on_hello(&dec.decode_one(&c.hello())?, |_| Ok(()))?;
        let (a, cs) = c.on_welcome(&dec.decode_one(&w)?)?;
        let ss = p.on_auth(&dec.decode_one(&a)?)?;
        Ok((cs, ss))
    }

    #[test]
    fn handshakes_with_same_keys_succeed_and_frames_flow_both_ways() {
        for k in [None, Some(key(1))] {
            let (mut c, mut s) = handshake(k.clone(), k.clone()).unwrap();
            let dec = FrameDecoder::new(1 << 16).keyed(k.is_some());
            for i in 0..3u8 {
                let f = c.seal(FrameKind::Data, &[i]);
                assert_eq!(s.open(dec.decode_one(&f).unwrap()).unwrap().1, vec![i]);
                let f = s.seal(FrameKind::Ping, b"");
                assert_eq!(
                    c.open(dec.decode_one(&f).unwrap()).unwrap().0,
                    FrameKind::Ping
                );
            }
        }
    }

    fn hello_frame(body: &str) -> RawFrame {
        FrameDecoder::new(MAX_HANDSHAKE_LEN)
            .decode_one(&encode_frame(FrameKind::Hello, 0, body.as_bytes(), None))
            .unwrap()
    }

    #[test]
    fn hellos_are_checked_field_by_field_and_unknown_fields_ignored() {
        let nonce = "ab".repeat(32);
        let server = || ServerHandshake::new(ClusterId(1), None, ParticipantId(0), [9; 32]);
        let ok = format!(
            r#"{{"protocol":"unacloud-gs","versions":[1,2],"cluster":1,"id":3,"nonce":"{nonce}","future":{{"x":1}}}}"#
        );
        let (p, _) = server().on_hello(&hello_frame(&ok), |_| Ok(())).unwrap();
        assert_eq!(p.hello().id, ParticipantId(3));
        for (body, needle) in [
            (ok.replace("unacloud-gs", "other"), "protocol"),
            (ok.replace("[1,2]", "[2,3]"), "no common transport version"),
            (ok.replace(r#""cluster":1"#, r#""cluster":2"#), "cluster"),
            (ok.replace(&nonce, "abcd"), "nonce"),
            (ok.replace(r#""id":3,"#, ""), "malformed HELLO"),
        ] {
            let e = server()
                .on_hello(&hello_frame(&body), |_| Ok(()))
                .unwrap_err();
            assert!(e.to_string().contains(needle), "{body}: {e}");
        }
        let e = server()
            .on_hello(&hello_frame(&ok), |id| Err(format!("{id} is not welcome")))
            .unwrap_err();
        assert!(matches!(e, Error::Unauthorised { .. }), "{e}");
        // A WELCOME from another node than the one dialled is refused by the client.
        let c = ClientHandshake::new(
            ClusterId(1),
            None,
            ParticipantId(3),
            ParticipantId(0),
            [7; 32],
        );
        let (_, w) = ServerHandshake::new(ClusterId(1), None, ParticipantId(5), [9; 32])
            .on_hello(&hello_frame(&ok), |_| Ok(()))
            .unwrap();
        let e = c
            .on_welcome(&FrameDecoder::new(MAX_HANDSHAKE_LEN).decode_one(&w).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("instead of"), "{e}");
    }

    #[test]
    fn key_mismatches_are_clear_errors() {
        let e = handshake(Some(key(1)), Some(key(2))).unwrap_err();
        assert!(e.to_string().contains("different cluster keys"), "{e}");
        let e = handshake(None, Some(key(2))).unwrap_err();
        assert!(e.to_string().contains("requires the cluster key"), "{e}");
        let e = handshake(Some(key(1)), None).unwrap_err();
        assert!(e.to_string().contains("no cluster key"), "{e}");
    }

    #[test]
    fn a_replayed_hello_cannot_finish_the_handshake() {
        // The attacker replays a HELLO and the AUTH it saw on another connection: the
        // server's nonce differs, so the old proof does not verify.
        let dec = FrameDecoder::new(MAX_HANDSHAKE_LEN);
        let c = ClientHandshake::new(
            ClusterId(1),
            Some(key(1)),
            ParticipantId(3),
            ParticipantId(0),
            [7; 32],
        );
        let hello = c.hello();
        let (p, w) = ServerHandshake::new(ClusterId(1), Some(key(1)), ParticipantId(0), [9; 32])
            .on_hello(&dec.decode_one(&hello).unwrap(), |_| Ok(()))
            .unwrap();
        let (auth, _) = c.on_welcome(&dec.decode_one(&w).unwrap()).unwrap();
        p.on_auth(&dec.decode_one(&auth).unwrap()).unwrap();
        let (p2, _) = ServerHandshake::new(ClusterId(1), Some(key(1)), ParticipantId(0), [10; 32])
            .on_hello(&dec.decode_one(&hello).unwrap(), |_| Ok(()))
            .unwrap();
        let e = p2.on_auth(&dec.decode_one(&auth).unwrap()).unwrap_err();
        assert!(matches!(e, Error::Authentication { .. }), "{e}");
    }

    #[test]
    fn tampering_reordering_and_replays_are_refused() {
        let (mut c, mut s) = handshake(Some(key(1)), Some(key(1))).unwrap();
        let dec = FrameDecoder::new(1 << 16).keyed(true);
        let mut f = c.seal(FrameKind::Data, b"take snapshot");
        let n = f.len();
        f[n - MAC_LEN - 1] ^= 1;
        assert!(matches!(
            s.open(dec.decode_one(&f).unwrap()),
            Err(Error::Authentication { .. })
        ));
        let (mut c, mut s) = handshake(Some(key(1)), Some(key(1))).unwrap();
        let a = c.seal(FrameKind::Data, b"a");
        let b = c.seal(FrameKind::Data, b"b");
        assert!(
            s.open(dec.decode_one(&b).unwrap()).is_err(),
            "skipped a frame"
        );
        let (mut c, mut s) = handshake(Some(key(1)), Some(key(1))).unwrap();
        let a2 = c.seal(FrameKind::Data, b"a");
        assert_eq!(a, a2, "same session inputs, same bytes");
        s.open(dec.decode_one(&a2).unwrap()).unwrap();
        assert!(s.open(dec.decode_one(&a2).unwrap()).is_err(), "replayed");
        // A frame of the server's direction reflected back to it does not verify.
        let (mut c, mut s) = handshake(Some(key(1)), Some(key(1))).unwrap();
        let _ = c.seal(FrameKind::Data, b"x");
        let from_server = s.seal(FrameKind::Data, b"x");
        assert!(s.open(dec.decode_one(&from_server).unwrap()).is_err());
    }

    #[test]
    fn envelopes_speak_only_for_their_connection() {
        let (_, s) = handshake(None, None).unwrap();
        let done = |from: u32| {
            serde_json::to_vec(&Envelope::new(
                ClusterId(1),
                ParticipantId(from),
                ParticipantId(0),
                Message::Done {
                    gs: GlobalSnapshotId(1),
                    local_time: std::time::Duration::from_millis(1),
                },
            ))
            .unwrap()
        };
        s.check_envelope(ClusterId(1), &done(3)).unwrap();
        let e = s.check_envelope(ClusterId(1), &done(4)).unwrap_err();
        assert!(e.to_string().contains("speaks only for"), "{e}");
        assert!(s.check_envelope(ClusterId(2), &done(3)).is_err());
    }

    #[test]
    fn roles_are_authorised() {
        let un = ParticipantId::UNREGISTERED;
        let ms = ParticipantId::METADATA_SERVER;
        let c = ParticipantId::COORDINATOR;
        let gs = GlobalSnapshotId(1);
        let done = Message::Done {
            gs,
            local_time: std::time::Duration::ZERO,
        };
        assert!(authorise(ParticipantId(2), c, &done).is_ok());
        assert!(authorise(un, c, &done).is_err());
        assert!(authorise(ms, c, &done).is_err());
        assert!(authorise(ParticipantId(2), c, &Message::TriggerGlobalSnapshot).is_err());
        assert!(authorise(ms, c, &Message::TriggerGlobalSnapshot).is_ok());
        assert!(authorise(un, ms, &Message::TriggerGlobalSnapshot).is_ok());
        let report = Message::SnapshotReport {
            gs,
            global_time: std::time::Duration::ZERO,
            local_times: vec![],
        };
        assert!(authorise(un, ms, &report).is_err());
        assert!(authorise(c, ms, &report).is_ok());
        let insert = Message::Insert {
            addr: "a".into(),
            vms: vec![],
        };
        assert!(authorise(un, ms, &insert).is_ok());
        assert!(authorise(ParticipantId(3), ms, &insert).is_err());
        let e = authorise(
            c,
            ParticipantId(1),
            &Message::Precheck {
                gs: GlobalSnapshotId(u64::MAX),
            },
        )
        .unwrap_err();
        assert!(e.contains("above the largest"), "{e}");
        assert!(authorise(
            c,
            ParticipantId(1),
            &Message::Precheck {
                gs: GlobalSnapshotId(MAX_EPOCH)
            }
        )
        .is_ok());
    }

    #[test]
    fn oversize_and_undersize_lengths_are_refused_from_the_prefix() {
        let d = FrameDecoder::new(100);
        assert!(d.decode(&[0, 0, 0, 101]).is_err());
        assert!(d.decode(&[0, 0, 0, 8]).is_err());
        assert!(d.decode(&[0, 0, 0, 9]).unwrap().is_none());
        assert!(d.decode(&[0, 0, 0, 9, 77]).is_err(), "unknown kind at once");
    }

    #[test]
    fn keys_are_validated_and_redacted() {
        assert!(ClusterKey::new(vec![0; 8]).is_err());
        assert!(ClusterKey::from_hex("zz").is_err());
        assert!(ClusterKey::from_hex("abc").is_err());
        let k = ClusterKey::from_hex("00112233445566778899aabbccddeeff").unwrap();
        assert_eq!(format!("{k:?}"), "ClusterKey(<redacted>)");
        assert_eq!(
            hex_decode(&hex_encode(&[0, 255, 16])).unwrap(),
            vec![0, 255, 16]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn decoding_and_handshakes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), keyed in any::<bool>()) {
            let d = FrameDecoder::new(MAX_HANDSHAKE_LEN).keyed(keyed);
            if let Ok(Some((f, _))) = d.decode(&bytes) {
                let k = if keyed { Some(key(7)) } else { None };
                let _ = ServerHandshake::new(ClusterId(1), k.clone(), ParticipantId(0), [1; 32]).on_hello(&f, |_| Ok(()));
                let _ = ClientHandshake::new(ClusterId(1), k, ParticipantId(1), ParticipantId(0), [1; 32]).on_welcome(&f);
            }
        }
    }
}

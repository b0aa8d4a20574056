//! Frames on the wire: kinds, encoding and the incremental decoder.

use super::*;

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

pub(super) fn bad(reason: impl Into<String>) -> Error {
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

//! Transport frames: the protocol's frames wrapped with an optional HMAC-SHA256 of a
//! cluster key, plus the connection hello and a rejection notice.
//!
//! ```text
//! +-------------------+-----------+---------------------+----------+-----------------+
//! | length: u32, BE   | flags: u8 | mac: 32 bytes       | kind: u8 | body            |
//! | (everything after)| bit0=MAC  | (only if bit0 set)  |          |                 |
//! +-------------------+-----------+---------------------+----------+-----------------+
//! mac  = HMAC-SHA256(cluster key, kind || body)
//! kind = 1 protocol frame (body = a complete frame of crate::protocol::encode_frame)
//!        2 hello          (body = JSON {"cluster": u64, "id": u32}, first frame of a
//!                          connection, from the connecting side)
//!        3 reject         (body = UTF-8 reason; sent, never authenticated, just before
//!                          the sender closes the connection)
//! ```
//!
//! A node with a key accepts only frames whose MAC verifies with it; a node without a key
//! accepts only frames without MAC. Either mismatch is reported with a message that says
//! the keys differ. The MAC authenticates frames but does not prevent the replay of a
//! recorded frame; the protocol's epochs make replays of old global snapshots harmless,
//! but a replayed trigger would start a new one.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::protocol::{ClusterId, ParticipantId, MAX_FRAME_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Largest transport frame body accepted (after the length prefix).
pub const MAX_TRANSPORT_FRAME: usize = MAX_FRAME_LEN + 4 + 1 + 32 + 1;

const FLAG_MAC: u8 = 1;
const MAC_LEN: usize = 32;

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
        if clean.len() % 2 != 0 {
            return Err(Error::InvalidConfig {
                reason: "the cluster key must be hexadecimal with an even number of digits"
                    .to_string(),
            });
        }
        let mut out = Vec::with_capacity(clean.len() / 2);
        for i in (0..clean.len()).step_by(2) {
            let byte = clean
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::InvalidConfig {
                    reason: format!(
                        "the cluster key is not hexadecimal near position {i}; write it as hex digits"
                    ),
                })?;
            out.push(byte);
        }
        Self::new(out)
    }

    /// Reads a hexadecimal key from a file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ResultsIo {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hex(&text)
    }

    fn mac(&self, kind: u8, body: &[u8]) -> [u8; MAC_LEN] {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut m = match <HmacSha256 as Mac>::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => return [0; MAC_LEN],
        };
        m.update(&[kind]);
        m.update(body);
        m.finalize().into_bytes().into()
    }

    fn verify(&self, kind: u8, body: &[u8], tag: &[u8]) -> bool {
        let Ok(mut m) = <HmacSha256 as Mac>::new_from_slice(&self.0) else {
            return false;
        };
        m.update(&[kind]);
        m.update(body);
        m.verify_slice(tag).is_ok()
    }
}

/// The kinds of transport frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A protocol frame.
    Protocol = 1,
    /// The first frame of a connection: who is connecting.
    Hello = 2,
    /// Why the sender is about to close the connection.
    Reject = 3,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Protocol),
            2 => Some(Self::Hello),
            3 => Some(Self::Reject),
            _ => None,
        }
    }
}

/// The hello of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    /// The connecting node's cluster.
    pub cluster: ClusterId,
    /// The connecting node's id ([`ParticipantId::UNREGISTERED`] for launchers before
    /// registration and for external triggers).
    pub id: ParticipantId,
}

/// Builds the frame body (what follows the length prefix) for `kind` and `body`.
///
/// ```
/// use unacloud_snapshot::net::frame::{open, seal, ClusterKey, FrameKind};
/// let key = ClusterKey::from_hex("000102030405060708090a0b0c0d0e0f")?;
/// let frame = seal(Some(&key), FrameKind::Protocol, b"payload");
/// assert_eq!(open(Some(&key), &frame, "peer")?, (FrameKind::Protocol, &b"payload"[..]));
/// let other = ClusterKey::from_hex("ffffffffffffffffffffffffffffffff")?;
/// assert!(open(Some(&other), &frame, "peer").is_err()); // keys differ: refused
/// # Ok::<(), unacloud_snapshot::Error>(())
/// ```
pub fn seal(key: Option<&ClusterKey>, kind: FrameKind, body: &[u8]) -> Vec<u8> {
    let k = kind as u8;
    let mut out = Vec::with_capacity(body.len() + 2 + MAC_LEN);
    match key {
        Some(key) if kind != FrameKind::Reject => {
            out.push(FLAG_MAC);
            out.extend_from_slice(&key.mac(k, body));
        }
        _ => out.push(0),
    }
    out.push(k);
    out.extend_from_slice(body);
    out
}

/// Checks and unwraps a frame body. `peer` names the other side in errors.
pub fn open<'a>(
    key: Option<&ClusterKey>,
    frame: &'a [u8],
    peer: &str,
) -> Result<(FrameKind, &'a [u8])> {
    let malformed = |reason: &str| Error::TransportFrame {
        peer: peer.to_string(),
        reason: reason.to_string(),
    };
    let (&flags, rest) = frame
        .split_first()
        .ok_or_else(|| malformed("empty frame"))?;
    if flags & !FLAG_MAC != 0 {
        return Err(malformed(
            "unknown flag bits (another protocol on this port?)",
        ));
    }
    let (tag, rest) = if flags & FLAG_MAC != 0 {
        if rest.len() < MAC_LEN {
            return Err(malformed("frame shorter than its MAC"));
        }
        let (t, r) = rest.split_at(MAC_LEN);
        (Some(t), r)
    } else {
        (None, rest)
    };
    let (&k, body) = rest
        .split_first()
        .ok_or_else(|| malformed("frame without kind byte"))?;
    let kind = FrameKind::from_u8(k).ok_or_else(|| malformed("unknown frame kind"))?;
    if kind == FrameKind::Reject {
        return Ok((kind, body));
    }
    match (key, tag) {
        (Some(key), Some(tag)) => {
            if !key.verify(k, body, tag) {
                return Err(Error::Authentication {
                    peer: peer.to_string(),
                    reason: "the frame's HMAC does not verify: the two nodes have different cluster keys; configure the same key on both".to_string(),
                });
            }
        }
        (Some(_), None) => {
            return Err(Error::Authentication {
                peer: peer.to_string(),
                reason: "the peer sent an unauthenticated frame but this node requires the cluster key; configure the key on the peer too".to_string(),
            })
        }
        (None, Some(_)) => {
            return Err(Error::Authentication {
                peer: peer.to_string(),
                reason: "the peer authenticates with a cluster key but this node has none; configure the same key here".to_string(),
            })
        }
        (None, None) => {}
    }
    Ok((kind, body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::new(vec![b; 32]).unwrap()
    }

    #[test]
    fn round_trip_with_and_without_key() {
        for k in [None, Some(key(1))] {
            let f = seal(k.as_ref(), FrameKind::Protocol, b"abc");
            let (kind, body) = open(k.as_ref(), &f, "p").unwrap();
            assert_eq!(kind, FrameKind::Protocol);
            assert_eq!(body, b"abc");
        }
    }

    #[test]
    fn different_keys_are_a_clear_error() {
        let f = seal(Some(&key(1)), FrameKind::Hello, b"x");
        let e = open(Some(&key(2)), &f, "10.0.0.1:5").unwrap_err();
        assert!(e.to_string().contains("different cluster keys"), "{e}");
        let e = open(None, &f, "p").unwrap_err();
        assert!(matches!(e, Error::Authentication { .. }));
        let plain = seal(None, FrameKind::Hello, b"x");
        let e = open(Some(&key(1)), &plain, "p").unwrap_err();
        assert!(matches!(e, Error::Authentication { .. }));
    }

    #[test]
    fn tampering_is_detected() {
        let mut f = seal(Some(&key(1)), FrameKind::Protocol, b"take snapshot");
        let last = f.len() - 1;
        f[last] ^= 1;
        assert!(open(Some(&key(1)), &f, "p").is_err());
    }

    #[test]
    fn reject_is_readable_without_key() {
        let f = seal(Some(&key(1)), FrameKind::Reject, b"why");
        assert_eq!(
            open(None, &f, "p").unwrap(),
            (FrameKind::Reject, &b"why"[..])
        );
    }

    #[test]
    fn keys_are_validated_and_redacted() {
        assert!(ClusterKey::new(vec![0; 8]).is_err());
        assert!(ClusterKey::from_hex("zz").is_err());
        assert!(ClusterKey::from_hex("abc").is_err());
        let k = ClusterKey::from_hex("00112233445566778899aabbccddeeff").unwrap();
        assert_eq!(format!("{k:?}"), "ClusterKey(<redacted>)");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80), with_key in any::<bool>()) {
            let k = key(7);
            let _ = open(if with_key { Some(&k) } else { None }, &bytes, "p");
        }
    }
}

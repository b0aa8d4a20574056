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
//! # Ok::<(), unacloud_snapshot::net::Error>(())
//! ```

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::net::{Error, Result};
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

mod codec;
mod handshake;
mod key;
mod session;

pub use codec::*;
pub use handshake::*;
pub use key::*;
pub use session::*;

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

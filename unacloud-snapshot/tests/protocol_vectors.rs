//! The byte-level test vectors of `PROTOCOL.md` (appendix A), kept in
//! `interop/vectors.json` for other implementations: every frame there is exactly what
//! this implementation sends given the same key and nonces, and decodes to the fields
//! listed next to it. Set `UNACLOUD_WRITE_VECTORS=1` to regenerate the file after a
//! deliberate change of the wire format (and say so in PROTOCOL.md).
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{json, Value};
use unacloud_snapshot::net::frame::*;
use unacloud_snapshot::protocol::{
    ClusterId, Envelope, GlobalSnapshotId, Message, ParticipantId, ResumeAttempt,
};

const CLUSTER: ClusterId = ClusterId(42);
const CLIENT: ParticipantId = ParticipantId(2);
const SERVER: ParticipantId = ParticipantId::COORDINATOR;

fn seq_bytes(from: u8) -> [u8; 32] {
    std::array::from_fn(|i| from + i as u8)
}

fn frame_json(name: &str, sender: &str, bytes: &[u8], keyed: bool) -> Value {
    let dec = FrameDecoder::new(1 << 20).keyed(keyed);
    let f = dec.decode_one(bytes).unwrap();
    json!({
        "name": name,
        "sender": sender,
        "hex": hex_encode(bytes),
        "kind": f.kind as u8,
        "kind_name": f.kind.name(),
        "seq": f.seq,
        "body": String::from_utf8(f.body.clone()).unwrap(),
        "mac": f.mac.map(|m| hex_encode(&m)),
    })
}

fn envelope(from: ParticipantId, to: ParticipantId, message: Message) -> Vec<u8> {
    serde_json::to_vec(&Envelope::new(CLUSTER, from, to, message)).unwrap()
}

/// One frame of an exchange after the handshake.
enum Step {
    /// An envelope from the client (`true`) or the server (`false`).
    Data(bool, &'static str, Message),
    /// A PING from the server.
    Ping(&'static str),
    /// A REJECT from the server (established session: numbered, never authenticated).
    Reject(&'static str, &'static str),
}

/// Runs the reference handshake between `client` and `server` with the fixed nonces, then
/// `steps`; every frame also opens on the receiving side. Returns the frames.
fn exchange(
    key: Option<ClusterKey>,
    client: ParticipantId,
    server: ParticipantId,
    steps: Vec<Step>,
) -> Value {
    let keyed = key.is_some();
    let dec = FrameDecoder::new(MAX_HANDSHAKE_LEN);
    let hs = ClientHandshake::new(CLUSTER, key.clone(), client, server, seq_bytes(0));
    let hello = hs.hello();
    let (pending, welcome) = ServerHandshake::new(CLUSTER, key, server, seq_bytes(0x20))
        .on_hello(&dec.decode_one(&hello).unwrap(), |_| Ok(()))
        .unwrap();
    let (auth, mut c) = hs.on_welcome(&dec.decode_one(&welcome).unwrap()).unwrap();
    let mut s = pending.on_auth(&dec.decode_one(&auth).unwrap()).unwrap();
    let mut frames = vec![
        frame_json("hello", "client", &hello, keyed),
        frame_json("welcome", "server", &welcome, keyed),
        frame_json("auth", "client", &auth, keyed),
    ];
    let post = FrameDecoder::new(1 << 20).keyed(keyed);
    for step in steps {
        let (name, sender, bytes) = match step {
            Step::Data(true, name, m) => {
                let b = c.seal(FrameKind::Data, &envelope(client, server, m));
                s.open(post.decode_one(&b).unwrap()).unwrap();
                (name, "client", b)
            }
            Step::Data(false, name, m) => {
                let b = s.seal(FrameKind::Data, &envelope(server, client, m));
                c.open(post.decode_one(&b).unwrap()).unwrap();
                (name, "server", b)
            }
            Step::Ping(name) => {
                let b = s.seal(FrameKind::Ping, b"");
                c.open(post.decode_one(&b).unwrap()).unwrap();
                (name, "server", b)
            }
            Step::Reject(name, reason) => {
                let b = s.seal(FrameKind::Reject, &reject_body(reason));
                assert!(c.open(post.decode_one(&b).unwrap()).is_err());
                (name, "server", b)
            }
        };
        frames.push(frame_json(name, sender, &bytes, keyed));
    }
    Value::Array(frames)
}

/// The participant ↔ coordinator exchange of the `keyed` and `unkeyed` sets.
fn session(key: Option<ClusterKey>) -> Value {
    let gs = GlobalSnapshotId(7);
    exchange(
        key,
        CLIENT,
        SERVER,
        vec![
            Step::Data(false, "precheck", Message::Precheck { gs }),
            Step::Data(true, "precheck_ok", Message::PrecheckOk { gs }),
            Step::Data(
                true,
                "done",
                Message::Done {
                    gs,
                    local_time: Duration::from_micros(1_500_000),
                },
            ),
            Step::Ping("ping"),
        ],
    )
}

/// A resume and the newer messages of v1, keyed.
fn resume(key: ClusterKey) -> Value {
    let (gs, attempt) = (GlobalSnapshotId(3), ResumeAttempt(2));
    exchange(
        Some(key),
        CLIENT,
        SERVER,
        vec![
            Step::Data(false, "poll", Message::Poll { gs, attempt }),
            Step::Data(true, "poll_ok", Message::PollOk { gs, attempt }),
            Step::Data(false, "restore", Message::Restore { gs, attempt }),
            Step::Data(true, "restore_ok", Message::RestoreOk { gs, attempt }),
            Step::Data(false, "start", Message::Start { gs, attempt }),
            Step::Data(true, "start_ok", Message::StartOk { gs, attempt }),
            Step::Data(
                false,
                "resume_abort",
                Message::ResumeAbort {
                    gs,
                    attempt,
                    reason: "restore of gs-3 failed at participant 4".into(),
                },
            ),
            Step::Data(
                true,
                "stale",
                Message::Stale {
                    gs: GlobalSnapshotId(1),
                    attempt: None,
                    newest_gs: GlobalSnapshotId(7),
                    newest_attempt: attempt,
                },
            ),
            Step::Reject(
                "reject",
                "participant 2 may not send TRIGGER_GLOBAL_SNAPSHOT to the coordinator",
            ),
        ],
    )
}

/// An unregistered launcher registering at the metadata server, keyed.
fn registration(key: ClusterKey) -> Value {
    exchange(
        Some(key),
        ParticipantId::UNREGISTERED,
        ParticipantId::METADATA_SERVER,
        vec![
            Step::Data(
                true,
                "insert",
                Message::Insert {
                    addr: "10.0.0.5".into(),
                    vms: vec!["web-1".into()],
                },
            ),
            Step::Data(
                false,
                "inserted",
                Message::Inserted {
                    id: ParticipantId(3),
                    port: 7103,
                },
            ),
        ],
    )
}

/// Frames a receiver must refuse, each with the state it meets them in.
fn negative(keyed_set: &Value) -> Value {
    let hex = |i: usize| hex_decode(keyed_set[i]["hex"].as_str().unwrap()).unwrap();
    let mut flipped = hex(5);
    flipped[20] ^= 1;
    let mut wrong_seq = hex(5);
    wrong_seq[12] = 4;
    let mut bad_mac = hex(5);
    let n = bad_mac.len();
    bad_mac[n - 1] ^= 0x80;
    let case = |name: &str, context: &str, bytes: &[u8], refused: &str| json!({"name": name, "context": context, "hex": hex_encode(bytes), "refused_because": refused});
    let after_ok = "keyed set: the coordinator after HELLO, WELCOME, AUTH, PRECHECK and PRECHECK_OK, instead of DONE";
    json!([
        case(
            "done_body_bit_flipped",
            after_ok,
            &flipped,
            "does not verify (forged or corrupted)"
        ),
        case(
            "done_mac_bit_flipped",
            after_ok,
            &bad_mac,
            "does not verify (forged or corrupted)"
        ),
        case(
            "done_wrong_seq",
            after_ok,
            &wrong_seq,
            "sequence number 4 where 3 was due"
        ),
        case(
            "replayed_precheck_ok",
            after_ok,
            &hex(4),
            "sequence number 2 where 3 was due"
        ),
        case(
            "length_below_header",
            "any",
            &[0, 0, 0, 8, 4, 0, 0, 0, 0, 0, 0, 0],
            "shorter than a frame header"
        ),
        case(
            "length_above_handshake_limit",
            "a server before HELLO",
            &[0, 0, 4, 1, 1],
            "exceeds this connection's limit of 1024 bytes"
        ),
        case(
            "unknown_kind",
            "any",
            &[0, 0, 0, 9, 9],
            "unknown frame kind 9"
        ),
    ])
}

fn vectors() -> Value {
    let key_hex = hex_encode(&std::array::from_fn::<u8, 32, _>(|i| 0x40 + i as u8));
    let key = ClusterKey::from_hex(&key_hex).unwrap();
    let keyed = session(Some(key.clone()));
    json!({
        "description": "unacloud-gs transport v1 test vectors (PROTOCOL.md appendix A)",
        "cluster": CLUSTER.0,
        "client_id": CLIENT.0,
        "server_id": SERVER.0,
        "client_nonce": hex_encode(&seq_bytes(0)),
        "server_nonce": hex_encode(&seq_bytes(0x20)),
        "key": key_hex,
        "keyed": keyed.clone(),
        "unkeyed": session(None),
        "keyed_resume": resume(key.clone()),
        "keyed_registration": registration(key),
        "negative": negative(&keyed),
        "reject": frame_json(
            "reject",
            "server",
            &encode_frame(FrameKind::Reject, 0, &reject_body("foreign cluster 43 (this node is of cluster 42)"), None),
            false,
        ),
    })
}

fn path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/vectors.json")
}

#[test]
fn the_published_vectors_are_what_this_implementation_sends() {
    let now = vectors();
    if std::env::var_os("UNACLOUD_WRITE_VECTORS").is_some() {
        std::fs::write(path(), serde_json::to_string_pretty(&now).unwrap() + "\n").unwrap();
    }
    let published: Value = serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap();
    assert_eq!(
        published, now,
        "interop/vectors.json differs from the wire format"
    );
}

#[test]
fn the_published_vectors_decode_to_their_fields_and_fail_when_altered() {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap();
    for (set, keyed) in [("keyed", true), ("unkeyed", false)] {
        for f in v[set].as_array().unwrap() {
            let bytes = hex_decode(f["hex"].as_str().unwrap()).unwrap();
            let raw = FrameDecoder::new(1 << 20)
                .keyed(keyed)
                .decode_one(&bytes)
                .unwrap();
            assert_eq!(u64::from(raw.kind as u8), f["kind"].as_u64().unwrap());
            assert_eq!(raw.seq, f["seq"].as_u64().unwrap());
            assert_eq!(raw.body, f["body"].as_str().unwrap().as_bytes());
            assert_eq!(
                raw.mac.map(|m| hex_encode(&m)).as_deref(),
                f["mac"].as_str()
            );
            // The length prefix counts everything after itself.
            let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            assert_eq!(len, bytes.len() - 4);
        }
    }
    // Negative control: one flipped bit in the keyed DONE's body fails its MAC.
    let key = ClusterKey::from_hex(v["key"].as_str().unwrap()).unwrap();
    let nonce = |k: &str| -> [u8; 32] {
        hex_decode(v[k].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap()
    };
    let dec = FrameDecoder::new(MAX_HANDSHAKE_LEN);
    let frames: Vec<Vec<u8>> = v["keyed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| hex_decode(f["hex"].as_str().unwrap()).unwrap())
        .collect();
    let (pending, _) = ServerHandshake::new(CLUSTER, Some(key), SERVER, nonce("server_nonce"))
        .on_hello(&dec.decode_one(&frames[0]).unwrap(), |_| Ok(()))
        .unwrap();
    let mut s = pending
        .on_auth(&dec.decode_one(&frames[2]).unwrap())
        .unwrap();
    let post = FrameDecoder::new(1 << 20).keyed(true);
    s.open(post.decode_one(&frames[4]).unwrap()).unwrap();
    let mut done = frames[5].clone();
    done[20] ^= 0x01;
    assert!(matches!(
        s.open(post.decode_one(&done).unwrap()),
        Err(unacloud_snapshot::net::Error::Authentication { .. })
    ));
}

#[test]
fn the_negative_vectors_are_refused_for_the_reason_given() {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap();
    let key = ClusterKey::from_hex(v["key"].as_str().unwrap()).unwrap();
    let frame = |set: &str, i: usize| hex_decode(v[set][i]["hex"].as_str().unwrap()).unwrap();
    let nonce: [u8; 32] = hex_decode(v["server_nonce"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let cases = v["negative"].as_array().unwrap();
    assert!(cases.len() >= 7);
    for case in cases {
        let bytes = hex_decode(case["hex"].as_str().unwrap()).unwrap();
        let why = case["refused_because"].as_str().unwrap();
        let err = if case["context"].as_str().unwrap().starts_with("keyed set") {
            // The coordinator's side of the keyed set, up to PRECHECK_OK.
            let dec = FrameDecoder::new(MAX_HANDSHAKE_LEN);
            let (pending, _) = ServerHandshake::new(CLUSTER, Some(key.clone()), SERVER, nonce)
                .on_hello(&dec.decode_one(&frame("keyed", 0)).unwrap(), |_| Ok(()))
                .unwrap();
            let mut s = pending
                .on_auth(&dec.decode_one(&frame("keyed", 2)).unwrap())
                .unwrap();
            let _ = s.seal(FrameKind::Data, b"precheck");
            let post = FrameDecoder::new(1 << 20).keyed(true);
            s.open(post.decode_one(&frame("keyed", 4)).unwrap())
                .unwrap();
            post.decode_one(&bytes)
                .and_then(|f| s.open(f))
                .unwrap_err()
                .to_string()
        } else {
            FrameDecoder::new(MAX_HANDSHAKE_LEN)
                .decode(&bytes)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        assert!(err.contains(why), "{}: {err}", case["name"]);
    }
}

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
use unacloud_snapshot::protocol::{ClusterId, Envelope, GlobalSnapshotId, Message, ParticipantId};

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

/// Runs the reference handshake and a few frames with fixed nonces; returns the vectors.
fn session(key: Option<ClusterKey>) -> Value {
    let keyed = key.is_some();
    let dec = FrameDecoder::new(MAX_HANDSHAKE_LEN);
    let client = ClientHandshake::new(CLUSTER, key.clone(), CLIENT, SERVER, seq_bytes(0));
    let hello = client.hello();
    let (pending, welcome) = ServerHandshake::new(CLUSTER, key, SERVER, seq_bytes(0x20))
        .on_hello(&dec.decode_one(&hello).unwrap(), |_| Ok(()))
        .unwrap();
    let (auth, mut c) = client
        .on_welcome(&dec.decode_one(&welcome).unwrap())
        .unwrap();
    let mut s = pending.on_auth(&dec.decode_one(&auth).unwrap()).unwrap();
    let precheck = s.seal(
        FrameKind::Data,
        &envelope(
            SERVER,
            CLIENT,
            Message::Precheck {
                gs: GlobalSnapshotId(7),
            },
        ),
    );
    let ok = c.seal(
        FrameKind::Data,
        &envelope(
            CLIENT,
            SERVER,
            Message::PrecheckOk {
                gs: GlobalSnapshotId(7),
            },
        ),
    );
    let done = c.seal(
        FrameKind::Data,
        &envelope(
            CLIENT,
            SERVER,
            Message::Done {
                gs: GlobalSnapshotId(7),
                local_time: Duration::from_micros(1_500_000),
            },
        ),
    );
    let ping = s.seal(FrameKind::Ping, b"");
    // Every frame also opens on the receiving side.
    let post = FrameDecoder::new(1 << 20).keyed(keyed);
    c.open(post.decode_one(&precheck).unwrap()).unwrap();
    s.open(post.decode_one(&ok).unwrap()).unwrap();
    s.open(post.decode_one(&done).unwrap()).unwrap();
    c.open(post.decode_one(&ping).unwrap()).unwrap();
    json!([
        frame_json("hello", "client", &hello, keyed),
        frame_json("welcome", "server", &welcome, keyed),
        frame_json("auth", "client", &auth, keyed),
        frame_json("precheck", "server", &precheck, keyed),
        frame_json("precheck_ok", "client", &ok, keyed),
        frame_json("done", "client", &done, keyed),
        frame_json("ping", "server", &ping, keyed),
    ])
}

fn vectors() -> Value {
    let key_hex = hex_encode(&std::array::from_fn::<u8, 32, _>(|i| 0x40 + i as u8));
    let key = ClusterKey::from_hex(&key_hex).unwrap();
    json!({
        "description": "unacloud-gs transport v1 test vectors (PROTOCOL.md appendix A)",
        "cluster": CLUSTER.0,
        "client_id": CLIENT.0,
        "server_id": SERVER.0,
        "client_nonce": hex_encode(&seq_bytes(0)),
        "server_nonce": hex_encode(&seq_bytes(0x20)),
        "key": key_hex,
        "keyed": session(Some(key)),
        "unkeyed": session(None),
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
        Err(unacloud_snapshot::Error::Authentication { .. })
    ));
}

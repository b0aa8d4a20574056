//! The wire format: round trips, typed rejections, and no panic on arbitrary bytes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proptest::prelude::*;
use unacloud_snapshot::protocol::*;

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,24}", "[a-z0-9.-]{0,16}"]
}

fn arb_registration() -> impl Strategy<Value = Registration> {
    (
        any::<u32>(),
        arb_text(),
        any::<u16>(),
        prop::collection::vec(arb_text(), 0..3),
    )
        .prop_map(|(id, addr, port, vms)| Registration {
            id: ParticipantId(id),
            addr,
            port,
            vms,
        })
}

fn arb_message() -> impl Strategy<Value = Message> {
    let gs = any::<u64>().prop_map(GlobalSnapshotId);
    let at = any::<u64>().prop_map(ResumeAttempt);
    let us = any::<u64>().prop_map(Duration::from_micros);
    prop_oneof![
        gs.clone().prop_map(|gs| Message::Precheck { gs }),
        gs.clone().prop_map(|gs| Message::PrecheckOk { gs }),
        (gs.clone(), arb_text()).prop_map(|(gs, reason)| Message::PrecheckFailed { gs, reason }),
        gs.clone().prop_map(|gs| Message::TakeSnapshot { gs }),
        (gs.clone(), us.clone()).prop_map(|(gs, local_time)| Message::Done { gs, local_time }),
        (gs.clone(), arb_text()).prop_map(|(gs, reason)| Message::SnapshotFailed { gs, reason }),
        gs.clone().prop_map(|gs| Message::Release { gs }),
        (gs.clone(), arb_text()).prop_map(|(gs, reason)| Message::Abort { gs, reason }),
        (gs.clone(), at.clone()).prop_map(|(gs, attempt)| Message::Poll { gs, attempt }),
        (gs.clone(), at.clone()).prop_map(|(gs, attempt)| Message::PollOk { gs, attempt }),
        (gs.clone(), at.clone()).prop_map(|(gs, attempt)| Message::Restore { gs, attempt }),
        (gs.clone(), at.clone()).prop_map(|(gs, attempt)| Message::RestoreOk { gs, attempt }),
        (gs.clone(), at.clone()).prop_map(|(gs, attempt)| Message::Start { gs, attempt }),
        (gs.clone(), at.clone()).prop_map(|(gs, attempt)| Message::StartOk { gs, attempt }),
        (gs.clone(), at.clone(), arb_text()).prop_map(|(gs, attempt, reason)| {
            Message::ResumeFailed {
                gs,
                attempt,
                reason,
            }
        }),
        (gs.clone(), at.clone(), arb_text()).prop_map(|(gs, attempt, reason)| {
            Message::ResumeAbort {
                gs,
                attempt,
                reason,
            }
        }),
        (gs.clone(), proptest::option::of(at.clone()), gs.clone(), at).prop_map(
            |(gs, attempt, newest_gs, newest_attempt)| Message::Stale {
                gs,
                attempt,
                newest_gs,
                newest_attempt,
            }
        ),
        (arb_text(), prop::collection::vec(arb_text(), 0..4))
            .prop_map(|(addr, vms)| Message::Insert { addr, vms }),
        (any::<u32>(), any::<u16>()).prop_map(|(id, port)| Message::Inserted {
            id: ParticipantId(id),
            port
        }),
        Just(Message::TriggerGlobalSnapshot),
        Just(Message::TriggerForwarded),
        any::<u32>().prop_map(|id| Message::QueryAddress {
            id: ParticipantId(id)
        }),
        arb_registration().prop_map(|registration| Message::Address { registration }),
        proptest::option::of(any::<u32>()).prop_map(|after| Message::QueryList {
            after: after.map(ParticipantId)
        }),
        (
            prop::collection::vec(arb_registration(), 0..4),
            any::<bool>()
        )
            .prop_map(|(participants, more)| Message::List { participants, more }),
        Just(Message::QueryCount),
        any::<u32>().prop_map(|count| Message::Count { count }),
        (
            gs,
            us.clone(),
            prop::collection::vec((any::<u32>(), us), 0..4)
        )
            .prop_map(|(gs, global_time, lt)| Message::SnapshotReport {
                gs,
                global_time,
                local_times: lt
                    .into_iter()
                    .map(|(p, local_time)| LocalTime {
                        participant: ParticipantId(p),
                        local_time
                    })
                    .collect()
            }),
        arb_text().prop_map(|reason| Message::Refused { reason }),
    ]
}

fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (any::<u64>(), any::<u32>(), any::<u32>(), arb_message())
        .prop_map(|(c, f, t, m)| Envelope::new(ClusterId(c), ParticipantId(f), ParticipantId(t), m))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_envelope_round_trips(env in arb_envelope()) {
        let frame = encode_frame(&env).unwrap();
        prop_assert_eq!(frame[4], WIRE_VERSION);
        let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        prop_assert_eq!(len + 4, frame.len());
        prop_assert_eq!(decode_frame(&frame).unwrap(), env);
    }

    #[test]
    fn a_stream_of_frames_split_anywhere_decodes_to_the_same_envelopes(
        envs in prop::collection::vec(arb_envelope(), 1..6),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut stream = Vec::new();
        for e in &envs {
            encode_frame_into(e, &mut stream).unwrap();
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for w in points.windows(2) {
            decoder.extend(&stream[w[0]..w[1]]);
            while let Some(e) = decoder.next_envelope().unwrap() {
                got.push(e);
            }
        }
        prop_assert_eq!(got, envs);
        prop_assert_eq!(decoder.buffered(), 0);
    }

    /// Robustness in the spirit of a fuzzer: arbitrary bytes never panic, and whatever
    /// decodes re-encodes to a frame that decodes to the same envelope.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(env) = decode_frame(&bytes) {
            prop_assert_eq!(decode_frame(&encode_frame(&env).unwrap()).unwrap(), env);
        }
        let mut d = FrameDecoder::new();
        d.extend(&bytes);
        for _ in 0..8 {
            if !matches!(d.next_envelope(), Ok(Some(_)) | Err(Error::MalformedPayload { .. })) {
                break;
            }
        }
    }

    /// Arbitrary payloads behind a valid header reach the JSON decoder: typed errors only.
    #[test]
    fn arbitrary_payloads_behind_a_valid_header_never_panic(payload in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut frame = (u32::try_from(payload.len() + 1).unwrap()).to_be_bytes().to_vec();
        frame.push(WIRE_VERSION);
        frame.extend_from_slice(&payload);
        match decode_frame(&frame) {
            Ok(env) => prop_assert_eq!(decode_frame(&encode_frame(&env).unwrap()).unwrap(), env),
            Err(e) => prop_assert!(matches!(e, Error::MalformedPayload { .. }), "{e}"),
        }
    }

    /// Mutated valid frames (a flipped byte, a truncation) never panic either.
    #[test]
    fn mutated_frames_never_panic(env in arb_envelope(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut frame = encode_frame(&env).unwrap();
        let i = at.index(frame.len());
        frame[i] = byte;
        let _ = decode_frame(&frame);
        let n = cut.index(frame.len());
        let _ = decode_frame(&frame[..n]);
        let _ = decode_frame_prefix(&frame[..n]);
    }

    /// A payload of valid JSON but the wrong shape is a typed error.
    #[test]
    fn json_of_the_wrong_shape_is_malformed(s in "[a-z{}\\[\\]:,\" 0-9]{0,40}") {
        let mut frame = Vec::new();
        frame.extend_from_slice(&(u32::try_from(s.len() + 1).unwrap()).to_be_bytes());
        frame.push(WIRE_VERSION);
        frame.extend_from_slice(s.as_bytes());
        let malformed = matches!(decode_frame(&frame), Err(Error::MalformedPayload { .. }));
        prop_assert!(malformed);
    }
}

fn sample() -> Envelope {
    Envelope::new(
        ClusterId(3),
        ParticipantId(2),
        ParticipantId(0),
        Message::Done {
            gs: GlobalSnapshotId(7),
            local_time: Duration::from_micros(1_500_000),
        },
    )
}

#[test]
fn the_payload_is_the_documented_json() {
    let frame = encode_frame(&sample()).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&frame[5..]).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "cluster": 3, "from": 2, "to": 0,
            "message": {"type": "done", "gs": 7, "local_time_us": 1_500_000}
        })
    );
}

#[test]
fn a_frame_written_by_another_implementation_is_accepted() {
    let payload =
        br#"{"cluster":1,"from":0,"to":4,"message":{"type":"restore","gs":12,"attempt":2}}"#;
    let mut frame = (u32::try_from(payload.len() + 1).unwrap())
        .to_be_bytes()
        .to_vec();
    frame.push(1);
    frame.extend_from_slice(payload);
    let env = decode_frame(&frame).unwrap();
    assert_eq!(
        env.message,
        Message::Restore {
            gs: GlobalSnapshotId(12),
            attempt: ResumeAttempt(2)
        }
    );
}

#[test]
fn an_unknown_version_is_rejected_before_the_payload_arrives() {
    let mut frame = encode_frame(&sample()).unwrap();
    frame[4] = 2;
    let err = decode_frame_prefix(&frame[..5]).unwrap_err();
    assert!(matches!(
        err,
        Error::UnsupportedVersion {
            version: 2,
            supported: 1
        }
    ));
    assert!(err.to_string().contains("version 2"));
    let mut d = FrameDecoder::new();
    d.extend(&frame);
    assert!(d.next_envelope().is_err());
    // The stream cannot be resynchronised: the error stays.
    d.extend(&encode_frame(&sample()).unwrap());
    assert!(matches!(
        d.next_envelope(),
        Err(Error::UnsupportedVersion { .. })
    ));
}

#[test]
fn an_oversize_length_is_rejected_from_the_prefix_alone() {
    let len = u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes();
    assert!(matches!(
        decode_frame_prefix(&len),
        Err(Error::FrameTooLarge { len, max: MAX_FRAME_LEN }) if len == MAX_FRAME_LEN + 1
    ));
    assert!(matches!(
        decode_frame(&[0xff, 0xff, 0xff, 0xff, 1]),
        Err(Error::FrameTooLarge { .. })
    ));
}

#[test]
fn an_oversize_envelope_is_refused_by_the_encoder() {
    let big = Envelope::new(
        ClusterId(1),
        ParticipantId(0),
        ParticipantId(1),
        Message::Abort {
            gs: GlobalSnapshotId(1),
            reason: "x".repeat(MAX_FRAME_LEN),
        },
    );
    let mut out = vec![9u8];
    assert!(matches!(
        encode_frame_into(&big, &mut out),
        Err(Error::FrameTooLarge { .. })
    ));
    assert_eq!(out, vec![9u8], "the buffer is left as it was");
}

#[test]
fn empty_truncated_and_trailing_frames_are_typed_errors() {
    assert!(matches!(
        decode_frame(&[0, 0, 0, 0]),
        Err(Error::EmptyFrame)
    ));
    let frame = encode_frame(&sample()).unwrap();
    assert!(matches!(
        decode_frame(&frame[..frame.len() - 1]),
        Err(Error::TruncatedFrame { needed, available }) if needed == frame.len() && available == frame.len() - 1
    ));
    assert!(matches!(
        decode_frame(&[]),
        Err(Error::TruncatedFrame { .. })
    ));
    let mut two = frame.clone();
    two.extend_from_slice(&[1, 2]);
    assert!(matches!(
        decode_frame(&two),
        Err(Error::TrailingBytes { extra: 2 })
    ));
}

#[test]
fn the_decoder_skips_a_malformed_frame_and_continues() {
    let mut stream = vec![0, 0, 0, 3, 1, b'{', b'}'];
    stream.extend_from_slice(&encode_frame(&sample()).unwrap());
    let mut d = FrameDecoder::new();
    d.extend(&stream);
    assert!(matches!(
        d.next_envelope(),
        Err(Error::MalformedPayload { .. })
    ));
    assert_eq!(d.next_envelope().unwrap(), Some(sample()));
    assert_eq!(d.next_envelope().unwrap(), None);
}

#[test]
fn a_foreign_cluster_frame_is_rejected_by_the_state_machine() {
    let mut part = Participant::new(ParticipantConfig::new(
        ClusterId(1),
        ParticipantId(1),
        vec![],
    ))
    .unwrap();
    // Its first output is the idle drop rule.
    assert!(matches!(part.poll_output(), Some(Output::Action { .. })));
    let env = Envelope::new(
        ClusterId(2),
        ParticipantId(0),
        ParticipantId(1),
        Message::TakeSnapshot {
            gs: GlobalSnapshotId(1),
        },
    );
    let frame = encode_frame(&env).unwrap();
    let err = part
        .handle_message(std::time::Instant::now(), decode_frame(&frame).unwrap())
        .unwrap_err();
    assert!(matches!(
        err,
        Error::ForeignCluster {
            expected: ClusterId(1),
            got: ClusterId(2)
        }
    ));
    assert!(part.poll_output().is_none());
}

const PROTOCOL_MD: &str = include_str!("../PROTOCOL.md");

fn one_of_each() -> Vec<Message> {
    let gs = GlobalSnapshotId(1);
    let attempt = ResumeAttempt(1);
    let reason = String::from("r");
    let registration = Registration {
        id: ParticipantId(1),
        addr: "10.0.0.1".into(),
        port: 9001,
        vms: vec!["vm".into()],
    };
    vec![
        Message::Precheck { gs },
        Message::PrecheckOk { gs },
        Message::PrecheckFailed {
            gs,
            reason: reason.clone(),
        },
        Message::TakeSnapshot { gs },
        Message::Done {
            gs,
            local_time: Duration::from_micros(5),
        },
        Message::SnapshotFailed {
            gs,
            reason: reason.clone(),
        },
        Message::Release { gs },
        Message::Abort {
            gs,
            reason: reason.clone(),
        },
        Message::Poll { gs, attempt },
        Message::PollOk { gs, attempt },
        Message::Restore { gs, attempt },
        Message::RestoreOk { gs, attempt },
        Message::Start { gs, attempt },
        Message::StartOk { gs, attempt },
        Message::ResumeFailed {
            gs,
            attempt,
            reason: reason.clone(),
        },
        Message::ResumeAbort {
            gs,
            attempt,
            reason: reason.clone(),
        },
        Message::Stale {
            gs,
            attempt: Some(attempt),
            newest_gs: gs,
            newest_attempt: attempt,
        },
        Message::Insert {
            addr: "10.0.0.1".into(),
            vms: vec![],
        },
        Message::Inserted {
            id: ParticipantId(1),
            port: 9001,
        },
        Message::TriggerGlobalSnapshot,
        Message::TriggerForwarded,
        Message::QueryAddress {
            id: ParticipantId(1),
        },
        Message::Address {
            registration: registration.clone(),
        },
        Message::QueryList { after: None },
        Message::QueryList {
            after: Some(ParticipantId(4)),
        },
        Message::List {
            participants: vec![registration],
            more: true,
        },
        Message::QueryCount,
        Message::Count { count: 2 },
        Message::SnapshotReport {
            gs,
            global_time: Duration::from_micros(9),
            local_times: vec![LocalTime {
                participant: ParticipantId(0),
                local_time: Duration::from_micros(3),
            }],
        },
        Message::Refused { reason },
    ]
}

/// PROTOCOL.md documents every message type and every field exactly as encoded.
#[test]
fn protocol_md_documents_every_message_type_and_field() {
    for m in one_of_each() {
        let json = serde_json::to_value(&m).unwrap();
        let obj = json.as_object().unwrap();
        let ty = obj["type"].as_str().unwrap();
        let row = PROTOCOL_MD
            .lines()
            .find(|l| l.starts_with(&format!("| `{ty}` |")))
            .unwrap_or_else(|| panic!("no table row for `{ty}` in PROTOCOL.md"));
        for field in obj.keys().filter(|k| *k != "type") {
            assert!(
                row.contains(&format!("`{field}`")),
                "field `{field}` of `{ty}` undocumented: {row}"
            );
        }
    }
}

#[test]
fn the_envelope_example_of_protocol_md_decodes() {
    let line = PROTOCOL_MD
        .lines()
        .find(|l| l.starts_with("{\"cluster\""))
        .unwrap();
    let payload = line.as_bytes();
    let mut frame = (u32::try_from(payload.len() + 1).unwrap())
        .to_be_bytes()
        .to_vec();
    frame.push(WIRE_VERSION);
    frame.extend_from_slice(payload);
    let env = decode_frame(&frame).unwrap();
    assert_eq!(
        env.message,
        Message::Done {
            gs: GlobalSnapshotId(7),
            local_time: Duration::from_micros(1_500_000)
        }
    );
}

/// PROTOCOL.md §2.1: duplicate fields and non-integer numbers are malformed.
#[test]
fn duplicate_fields_and_non_integer_numbers_are_malformed() {
    for text in [
        r#"{"cluster":1,"cluster":2,"from":0,"to":1,"message":{"type":"precheck","gs":1}}"#,
        r#"{"cluster":1,"from":0,"to":1,"message":{"type":"precheck","gs":1,"gs":2}}"#,
        r#"{"cluster":1,"from":0,"to":1,"message":{"type":"precheck","gs":7.0}}"#,
        r#"{"cluster":1,"from":0,"to":1,"message":{"type":"precheck","gs":7e0}}"#,
        r#"{"cluster":1,"from":0,"to":1,"message":{"type":"precheck","gs":-7}}"#,
        r#"{"cluster":1,"from":0,"to":1,"message":{"type":"precheck","gs":true}}"#,
    ] {
        assert!(
            serde_json::from_str::<Envelope>(text).is_err(),
            "accepted {text}"
        );
    }
    let ok = r#"{"cluster":1,"from":0,"to":1,"message":{"type":"precheck","gs":7,"new":1}}"#;
    assert!(
        serde_json::from_str::<Envelope>(ok).is_ok(),
        "unknown fields are ignored"
    );
}

//! The metadata server: registration, trigger, queries, times.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use unacloud_snapshot::protocol::*;
use unacloud_snapshot::Error;

const C: ClusterId = ClusterId(5);

fn ms() -> MetadataServer {
    MetadataServer::new(MetadataServerConfig {
        cluster: C,
        base_port: 9000,
    })
}

fn ask(ms: &mut MetadataServer, from: ParticipantId, m: Message) -> Message {
    ms.handle_request(
        Instant::now(),
        Envelope::new(C, from, ParticipantId::METADATA_SERVER, m),
    )
    .unwrap()
    .unwrap()
    .message
}

#[test]
fn insert_hands_out_ids_from_zero_and_ports_from_the_base_port() {
    let mut s = ms();
    for i in 0..4u32 {
        let reply = ask(
            &mut s,
            ParticipantId::UNREGISTERED,
            Message::Insert {
                addr: format!("10.0.0.{i}"),
                vms: vec![format!("vm{i}")],
            },
        );
        assert_eq!(
            reply,
            Message::Inserted {
                id: ParticipantId(i),
                port: 9000 + i as u16
            }
        );
    }
    assert_eq!(
        ask(&mut s, ParticipantId(1), Message::QueryCount),
        Message::Count { count: 4 }
    );
    let Message::Address { registration } = ask(
        &mut s,
        ParticipantId(1),
        Message::QueryAddress {
            id: ParticipantId(2),
        },
    ) else {
        panic!()
    };
    assert_eq!(registration.addr, "10.0.0.2");
    assert_eq!(registration.port, 9002);
    let Message::List { participants, .. } =
        ask(&mut s, ParticipantId(3), Message::QueryList { after: None })
    else {
        panic!()
    };
    assert_eq!(participants.len(), 4);
    assert_eq!(
        s.participant_ids(),
        vec![ParticipantId(1), ParticipantId(2), ParticipantId(3)]
    );
    assert!(matches!(
        ask(&mut s, ParticipantId(1), Message::QueryAddress { id: ParticipantId(9) }),
        Message::Refused { reason } if reason.contains("#9")
    ));
}

#[test]
fn the_port_range_is_never_exceeded() {
    let mut s = MetadataServer::new(MetadataServerConfig {
        cluster: C,
        base_port: 65534,
    });
    assert!(s.register("a".into(), vec![]).is_ok());
    assert!(s.register("b".into(), vec![]).is_ok());
    assert!(matches!(
        s.register("c".into(), vec![]),
        Err(Error::PortRangeExhausted { id: 2, .. })
    ));
}

#[test]
fn start_gs_is_forwarded_to_the_coordinator() {
    let mut s = ms();
    assert!(matches!(
        ask(
            &mut s,
            ParticipantId::UNREGISTERED,
            Message::TriggerGlobalSnapshot
        ),
        Message::Refused { .. }
    ));
    s.register("10.0.0.1".into(), vec![]).unwrap();
    assert_eq!(
        ask(
            &mut s,
            ParticipantId::UNREGISTERED,
            Message::TriggerGlobalSnapshot
        ),
        Message::TriggerForwarded
    );
    let Some(Output::Transmit(env)) = s.poll_output() else {
        panic!()
    };
    assert_eq!(env.to, ParticipantId::COORDINATOR);
    assert_eq!(env.message, Message::TriggerGlobalSnapshot);
    // The coordinator accepts it and starts a global snapshot.
    let mut coord =
        Coordinator::new(CoordinatorConfig::new(C, vec![], vec![]), Catalog::new(C)).unwrap();
    coord.handle_message(Instant::now(), env).unwrap();
    assert!(coord.running().is_some());
}

#[test]
fn snapshot_times_are_recorded_and_exported_as_csv() {
    let mut s = ms();
    let report = Message::SnapshotReport {
        gs: GlobalSnapshotId(3),
        global_time: Duration::from_millis(3_100),
        local_times: vec![
            LocalTime {
                participant: ParticipantId(0),
                local_time: Duration::from_millis(1_950),
            },
            LocalTime {
                participant: ParticipantId(1),
                local_time: Duration::from_micros(2_400_001),
            },
        ],
    };
    let reply = s
        .handle_request(
            Instant::now(),
            Envelope::new(C, ParticipantId(0), ParticipantId::METADATA_SERVER, report),
        )
        .unwrap();
    assert!(reply.is_none());
    assert_eq!(
        s.times_csv(),
        "global_snapshot,participant,local_time_s,global_time_s\n3,0,1.950000,3.100000\n3,1,2.400001,3.100000\n"
    );
}

#[test]
fn foreign_misaddressed_and_unexpected_requests_are_errors() {
    let mut s = ms();
    let now = Instant::now();
    assert!(matches!(
        s.handle_request(
            now,
            Envelope::new(
                ClusterId(6),
                ParticipantId(0),
                ParticipantId::METADATA_SERVER,
                Message::QueryCount
            )
        ),
        Err(Error::ForeignCluster { .. })
    ));
    assert!(matches!(
        s.handle_request(
            now,
            Envelope::new(C, ParticipantId(1), ParticipantId(0), Message::QueryCount)
        ),
        Err(Error::Misaddressed { .. })
    ));
    assert!(matches!(
        s.handle_request(
            now,
            Envelope::new(
                C,
                ParticipantId(1),
                ParticipantId::METADATA_SERVER,
                Message::Done {
                    gs: GlobalSnapshotId(1),
                    local_time: Duration::ZERO
                }
            )
        ),
        Err(Error::UnexpectedMessage {
            message: "DONE",
            ..
        })
    ));
}

#[test]
fn a_host_that_registers_again_keeps_its_id() {
    let mut s = ms();
    let a = s.register("10.0.0.1".into(), vec!["vm1".into()]).unwrap();
    let b = s.register("10.0.0.2".into(), vec!["vm2".into()]).unwrap();
    let again = s.register("10.0.0.1".into(), vec!["vm1".into()]).unwrap();
    assert_eq!(again, a);
    assert_ne!(a.id, b.id);
    // Another VM set on the same address is another participant.
    let c = s.register("10.0.0.1".into(), vec!["vm3".into()]).unwrap();
    assert_eq!(c.id, ParticipantId(2));
    assert_eq!(s.registrations().len(), 3);
}

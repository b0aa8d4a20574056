//! The metadata server: registration, trigger, queries, times.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use unacloud_snapshot::protocol::*;

const C: ClusterId = ClusterId(5);

fn ms() -> MetadataServer {
    MetadataServer::new(MetadataServerConfig::new(C, 9000))
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
    let mut s = MetadataServer::new(MetadataServerConfig::new(C, 65534));
    assert!(s.register("a".into(), vec!["vm".into()]).is_ok());
    assert!(s.register("b".into(), vec!["vm".into()]).is_ok());
    assert!(matches!(
        s.register("c".into(), vec!["vm".into()]),
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
    s.register("10.0.0.1".into(), vec!["vm".into()]).unwrap();
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

fn insert(s: &mut MetadataServer, from: ParticipantId, addr: &str, vms: &[&str]) -> Message {
    ask(
        s,
        from,
        Message::Insert {
            addr: addr.to_string(),
            vms: vms.iter().map(|v| v.to_string()).collect(),
        },
    )
}

/// The reason of a REFUSED reply (failing on any other reply).
fn refusal(m: Message) -> String {
    match m {
        Message::Refused { reason } => reason,
        other => panic!("expected REFUSED, got {other:?}"),
    }
}

#[test]
fn insert_is_accepted_only_from_an_unregistered_client() {
    let mut s = ms();
    for from in [
        ParticipantId(0),
        ParticipantId(7),
        ParticipantId::METADATA_SERVER,
    ] {
        let why = refusal(insert(&mut s, from, "10.0.0.1", &["vm"]));
        assert!(
            why.contains("INSERT refused") && why.contains("unregistered"),
            "{why}"
        );
    }
    assert!(s.registrations().is_empty());
    assert!(matches!(
        insert(&mut s, ParticipantId::UNREGISTERED, "10.0.0.1", &["vm"]),
        Message::Inserted { .. }
    ));
    // A registered participant cannot register again under its id either.
    let why = refusal(insert(&mut s, ParticipantId(0), "10.0.0.2", &["vm2"]));
    assert!(why.contains("#0"), "{why}");
    assert_eq!(s.registrations().len(), 1);
}

#[test]
fn an_address_has_at_most_255_bytes() {
    let mut s = ms();
    let u = ParticipantId::UNREGISTERED;
    let ok = "a".repeat(255);
    assert!(matches!(
        insert(&mut s, u, &ok, &["vm"]),
        Message::Inserted { .. }
    ));
    let why = refusal(insert(&mut s, u, &"a".repeat(256), &["vm"]));
    assert!(why.contains("256 bytes") && why.contains("255"), "{why}");
    assert_eq!(s.registrations().len(), 1);
}

#[test]
fn an_insert_names_1_to_64_vms() {
    let mut s = ms();
    let u = ParticipantId::UNREGISTERED;
    let why = refusal(insert(&mut s, u, "10.0.0.1", &[]));
    assert!(
        why.contains("1 to 64 VMs") && why.contains("names 0"),
        "{why}"
    );
    let names: Vec<String> = (0..65).map(|i| format!("vm{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    assert!(matches!(
        insert(&mut s, u, "10.0.0.1", &refs[..64]),
        Message::Inserted { .. }
    ));
    let why = refusal(insert(&mut s, u, "10.0.0.2", &refs));
    assert!(why.contains("64") && why.contains("names 65"), "{why}");
    assert_eq!(s.registrations().len(), 1);
}

#[test]
fn vm_names_have_1_to_128_bytes_and_no_control_characters() {
    let mut s = ms();
    let u = ParticipantId::UNREGISTERED;
    // Bytes, not characters: 64 two-byte characters are 128 bytes.
    let max_ascii = "v".repeat(128);
    let max_utf8 = "é".repeat(64);
    assert!(matches!(
        insert(&mut s, u, "10.0.0.1", &[&max_ascii, &max_utf8]),
        Message::Inserted { .. }
    ));
    for (name, needle) in [
        ("", "has 0 bytes"),
        (&*"v".repeat(129), "has 129 bytes"),
        (&*"é".repeat(65), "has 130 bytes"),
    ] {
        let why = refusal(insert(&mut s, u, "10.0.0.2", &["ok", name]));
        assert!(
            why.contains("VM name 2") && why.contains(needle) && why.contains("128"),
            "{why}"
        );
    }
    for name in ["web\n1", "web\u{0}", "tab\there", "del\u{7f}", "c1\u{85}"] {
        let why = refusal(insert(&mut s, u, "10.0.0.2", &[name]));
        assert!(why.contains("control character"), "{name:?}: {why}");
    }
    assert_eq!(s.registrations().len(), 1);
    // The direct API holds to the same bounds.
    assert!(matches!(
        s.register("10.0.0.3".into(), vec![]),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn registrations_are_bounded_by_max_registrations() {
    assert_eq!(
        MetadataServerConfig::new(C, 9000).max_registrations,
        MetadataServerConfig::DEFAULT_MAX_REGISTRATIONS
    );
    assert_eq!(MetadataServerConfig::DEFAULT_MAX_REGISTRATIONS, 1024);
    let mut cfg = MetadataServerConfig::new(C, 9000);
    cfg.max_registrations = 3;
    let mut s = MetadataServer::new(cfg);
    let u = ParticipantId::UNREGISTERED;
    for i in 0..3 {
        assert!(matches!(
            insert(&mut s, u, &format!("10.0.0.{i}"), &["vm"]),
            Message::Inserted { .. }
        ));
    }
    let why = refusal(insert(&mut s, u, "10.0.0.9", &["vm"]));
    assert!(
        why.contains("full")
            && why.contains("3 registrations")
            && why.contains("max-registrations"),
        "{why}"
    );
    // A host registering again keeps its id even when the registry is full.
    assert_eq!(
        insert(&mut s, u, "10.0.0.1", &["vm"]),
        Message::Inserted {
            id: ParticipantId(1),
            port: 9001
        }
    );
    assert_eq!(s.registrations().len(), 3);
}

fn report(gs: u64) -> Message {
    Message::SnapshotReport {
        gs: GlobalSnapshotId(gs),
        global_time: Duration::from_millis(10),
        local_times: vec![LocalTime {
            participant: ParticipantId(0),
            local_time: Duration::from_millis(5),
        }],
    }
}

#[test]
fn snapshot_reports_are_accepted_only_from_the_coordinator() {
    let mut s = ms();
    for from in [
        ParticipantId(1),
        ParticipantId(42),
        ParticipantId::UNREGISTERED,
    ] {
        let why = refusal(ask(&mut s, from, report(1)));
        assert!(
            why.contains("SNAPSHOT_REPORT refused") && why.contains("coordinator"),
            "{why}"
        );
    }
    assert_eq!(s.times().count(), 0, "a refused report was recorded");
    assert_eq!(s.times_csv().lines().count(), 1);
    assert!(s.poll_output().is_none());
    // From the coordinator: recorded, no reply.
    let reply = s
        .handle_request(
            Instant::now(),
            Envelope::new(
                C,
                ParticipantId(0),
                ParticipantId::METADATA_SERVER,
                report(2),
            ),
        )
        .unwrap();
    assert!(reply.is_none());
    let gs: Vec<_> = s.times().map(|t| t.gs).collect();
    assert_eq!(gs, vec![GlobalSnapshotId(2)]);
}

const PAGE: usize = MetadataServer::MAX_LIST_PAGE_BYTES;

fn json_len<T: serde::Serialize>(v: &T) -> usize {
    serde_json::to_string(v).unwrap().len()
}

fn page_len(participants: &[Registration], more: bool) -> usize {
    json_len(&Message::List {
        participants: participants.to_vec(),
        more,
    })
}

/// Reads every page and checks each: in id order after `after`, within the bound, and
/// as full as the bound allows. Returns the pages.
fn walk(s: &mut MetadataServer) -> Vec<Vec<Registration>> {
    let all = s.registrations().to_vec();
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let Message::List { participants, more } =
            ask(s, ParticipantId(1), Message::QueryList { after })
        else {
            panic!("QUERY_LIST not answered with LIST")
        };
        let start = after.map_or(0, |a: ParticipantId| a.0 as usize + 1);
        assert!(!participants.is_empty() || all.len() == start, "empty page");
        assert_eq!(participants[..], all[start..start + participants.len()]);
        let len = page_len(&participants, more);
        assert!(
            len <= PAGE || participants.len() == 1,
            "page of {len} bytes"
        );
        let end = start + participants.len();
        assert_eq!(more, end < all.len());
        if more {
            // The next registration would not have fitted (whatever `more` it carried).
            let mut bigger = participants.clone();
            bigger.push(all[end].clone());
            let last = end + 1 == all.len();
            assert!(
                page_len(&bigger, !last) > PAGE,
                "page {} not full",
                pages.len()
            );
        }
        pages.push(participants.clone());
        if !more {
            break;
        }
        after = participants.last().map(|r| r.id);
    }
    let flat: Vec<Registration> = pages.iter().flatten().cloned().collect();
    assert_eq!(flat, all, "pages lost or repeated registrations");
    pages
}

/// VMs and address for registration `id` whose JSON text has exactly `target` bytes.
fn crafted(id: u32, port: u16, target: usize) -> (String, Vec<String>) {
    let mut addr = "a".to_string();
    let mut vms = vec![format!("v{id}-")];
    loop {
        let len = json_len(&Registration {
            id: ParticipantId(id),
            addr: addr.clone(),
            port,
            vms: vms.clone(),
        });
        assert!(len <= target, "cannot craft {target} bytes (minimum {len})");
        let deficit = target - len;
        if deficit <= 200 {
            addr.push_str(&"a".repeat(deficit));
            return (addr, vms);
        }
        let last = vms.last_mut().unwrap();
        if last.len() < 128 {
            let grow = (128 - last.len()).min(deficit - 200);
            last.push_str(&"x".repeat(grow));
        } else {
            assert!(vms.len() < 64, "cannot craft {target} bytes");
            vms.push("y".to_string());
        }
    }
}

/// A registry whose first page ends with a registration that makes the page exactly
/// `PAGE + overshoot` bytes (with `more: true`); `tail` registrations follow it.
fn registry_filling_a_page(overshoot: usize, tail: u32) -> (MetadataServer, usize) {
    let mut s = ms();
    let base = page_len(&[], true);
    let mut used = base;
    let mut id = 0u32;
    while PAGE - used > 8_300 {
        let (addr, vms) = crafted(id, 9000 + id as u16, 8_000);
        let r = s.register(addr, vms).unwrap();
        used += json_len(&r) + usize::from(id > 0);
        id += 1;
    }
    // The comma before it, then exactly the rest of the page.
    let target = PAGE - used - 1 + overshoot;
    let (addr, vms) = crafted(id, 9000 + id as u16, target);
    s.register(addr, vms).unwrap();
    let fitting = id as usize + 1;
    for t in 0..tail {
        let n = id + 1 + t;
        s.register(format!("10.1.0.{n}"), vec![format!("tail{n}")])
            .unwrap();
    }
    (s, fitting)
}

#[test]
fn list_pages_end_exactly_at_256_kib() {
    // Exactly 256 KiB: the crafted registration still fits.
    let (mut s, fitting) = registry_filling_a_page(0, 3);
    let pages = walk(&mut s);
    assert_eq!(pages[0].len(), fitting);
    assert_eq!(page_len(&pages[0], true), PAGE);
    assert_eq!(pages.len(), 2);
    assert_eq!(pages[1].len(), 3);
    // One byte more: it starts the next page.
    let (mut s, fitting) = registry_filling_a_page(1, 3);
    let pages = walk(&mut s);
    assert_eq!(pages[0].len(), fitting - 1);
    assert!(page_len(&pages[0], true) < PAGE);
    assert_eq!(pages[1].len(), 4);
    // The last page says `"more":false`, one byte longer than `true`: a page that fits
    // only with `true` leaves its last registration to a page of its own.
    let (mut s, fitting) = registry_filling_a_page(0, 0);
    let pages = walk(&mut s);
    assert_eq!(pages.len(), 2);
    assert_eq!(pages[0].len(), fitting - 1);
    assert_eq!(pages[1].len(), 1);
    assert!(page_len(&pages[1], false) <= PAGE);
}

#[test]
fn list_pages_lose_and_repeat_nothing() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut s = ms();
    for i in 0..1000u32 {
        let n = rng.gen_range(1..=64);
        let vms: Vec<String> = (0..n)
            .map(|j| {
                let len = rng.gen_range(1..=128usize);
                let mut v = format!("{i}-{j}-");
                while v.len() < len {
                    v.push('q');
                }
                v
            })
            .collect();
        let addr = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
        s.register(addr, vms).unwrap();
    }
    let pages = walk(&mut s);
    assert!(pages.len() > 3, "{} pages", pages.len());
    // Asking after the last id, or far beyond it: an empty last page.
    for after in [999, 5_000, u32::MAX - 2] {
        assert_eq!(
            ask(
                &mut s,
                ParticipantId::UNREGISTERED,
                Message::QueryList {
                    after: Some(ParticipantId(after))
                }
            ),
            Message::List {
                participants: vec![],
                more: false
            }
        );
    }
    // An empty registry answers one empty page.
    let mut empty = ms();
    assert_eq!(walk(&mut empty), vec![Vec::<Registration>::new()]);
}

#[test]
fn a_small_registry_is_one_page() {
    let mut s = ms();
    for i in 0..5 {
        s.register(format!("10.0.0.{i}"), vec![format!("vm{i}")])
            .unwrap();
    }
    let pages = walk(&mut s);
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0].len(), 5);
    // From the middle.
    let Message::List { participants, more } = ask(
        &mut s,
        ParticipantId(2),
        Message::QueryList {
            after: Some(ParticipantId(2)),
        },
    ) else {
        panic!()
    };
    assert!(!more);
    let ids: Vec<u32> = participants.iter().map(|r| r.id.0).collect();
    assert_eq!(ids, vec![3, 4]);
}

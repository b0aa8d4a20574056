//! Malformed, truncated and hostile settings files give typed errors naming the
//! element or uuid — never a panic, never unbounded memory.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{thesis_example, uuid};
use proptest::prelude::*;
use unacloud_vbox::settings::{GlobalRegistry, MachineSettings, ParseLimits};
use unacloud_vbox::Error;

fn parse(xml: &str) -> Result<MachineSettings, Error> {
    MachineSettings::parse_str(xml)
}

const HEAD: &str = r#"<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-windows">"#;

fn machine(body: &str, attrs: &str) -> String {
    format!(
        r#"{HEAD}<Machine uuid="{{{}}}" name="M" OSType="Other"{attrs}>{body}<Hardware/></Machine></VirtualBox>"#,
        uuid(1, 1)
    )
}

#[test]
fn wrong_root_is_named() {
    match parse("<?xml version=\"1.0\"?><html><body/></html>") {
        Err(Error::WrongRoot { found, .. }) => assert_eq!(found, "html"),
        other => panic!("{other:?}"),
    }
    // A global registry is not a machine, and the reverse.
    let global = format!("{HEAD}<Global><MachineRegistry/></Global></VirtualBox>");
    assert!(matches!(parse(&global), Err(Error::WrongRoot { .. })));
    assert!(GlobalRegistry::parse_str(&global, "/g").is_ok());
    assert!(matches!(
        GlobalRegistry::parse_str(&machine("", ""), "/g"),
        Err(Error::WrongRoot { .. })
    ));
    assert!(matches!(
        parse(&format!("{HEAD}</VirtualBox>")),
        Err(Error::Structure {
            element: "Machine",
            ..
        })
    ));
    assert!(parse("").is_err());
}

#[test]
fn versions_outside_the_supported_range() {
    let old = machine("", "").replace("1.19-windows", "1.11-windows");
    assert!(matches!(parse(&old), Err(Error::UnsupportedVersion { .. })));
    let junk = machine("", "").replace("1.19-windows", "banana");
    assert!(matches!(
        parse(&junk),
        Err(Error::UnsupportedVersion { .. })
    ));
    let newer = parse(&machine("", "").replace("1.19-windows", "1.20-windows")).unwrap();
    assert_eq!(newer.warnings.len(), 1);
    let none = parse(&machine("", "").replace(" version=\"1.19-windows\"", ""));
    assert!(matches!(
        none,
        Err(Error::MissingAttribute {
            element: "VirtualBox",
            attribute: "version",
            ..
        })
    ));
}

#[test]
fn dangling_current_snapshot_names_the_uuid() {
    let xml = machine("", &format!(" currentSnapshot=\"{{{}}}\"", uuid(9, 9)));
    match parse(&xml) {
        Err(Error::DanglingReference {
            element,
            attribute,
            uuid: u,
        }) => {
            assert_eq!((element, attribute), ("Machine", "currentSnapshot"));
            assert_eq!(u.to_string(), uuid(9, 9));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicate_uuids_are_refused() {
    let mut doc = thesis_example();
    doc.snaps[2].uuid = doc.snaps[1].uuid.clone();
    match parse(&doc.to_xml()) {
        Err(Error::DuplicateUuid { kind, uuid: u }) => {
            assert_eq!(kind, "snapshot");
            assert_eq!(u.to_string(), doc.snaps[1].uuid);
        }
        other => panic!("{other:?}"),
    }
    let mut doc = thesis_example();
    doc.disks[3].uuid = doc.disks[1].uuid.clone();
    assert!(matches!(
        parse(&doc.to_xml()),
        Err(Error::DuplicateUuid { kind: "medium", .. })
    ));
    let mut doc = thesis_example();
    doc.dvds = vec![(doc.disks[0].uuid.clone(), "x.iso".into())];
    assert!(matches!(
        parse(&doc.to_xml()),
        Err(Error::DuplicateUuid { .. })
    ));
}

#[test]
fn missing_and_invalid_attributes_name_the_element() {
    let no_uuid = machine(
        r#"<Snapshot name="s" timeStamp="t"><Hardware/></Snapshot>"#,
        "",
    );
    assert!(matches!(
        parse(&no_uuid),
        Err(Error::MissingAttribute {
            element: "Snapshot",
            attribute: "uuid",
            ..
        })
    ));
    let bad_uuid = machine(
        r#"<MediaRegistry><HardDisks><HardDisk uuid="{not-a-uuid}" location="a.vdi" format="VDI" type="Normal"/></HardDisks></MediaRegistry>"#,
        "",
    );
    match parse(&bad_uuid) {
        Err(Error::InvalidAttribute {
            element: "HardDisk",
            attribute: "uuid",
            value,
            line,
            ..
        }) => {
            assert_eq!(value, "{not-a-uuid}");
            assert_eq!(line, 1);
        }
        other => panic!("{other:?}"),
    }
    let bad_type = bad_uuid
        .replace("{not-a-uuid}", &format!("{{{}}}", uuid(2, 2)))
        .replace("Normal", "Sticky");
    assert!(matches!(
        parse(&bad_type),
        Err(Error::InvalidAttribute {
            element: "HardDisk",
            attribute: "type",
            ..
        })
    ));
    let bad_ram = machine("", "").replace(
        "<Hardware/>",
        r#"<Hardware><Memory RAMSize="lots"/></Hardware>"#,
    );
    assert!(matches!(
        parse(&bad_ram),
        Err(Error::InvalidAttribute {
            element: "Memory",
            ..
        })
    ));
    let two_roots = machine(
        &format!(
            r#"<Snapshot uuid="{{{}}}" name="a" timeStamp="t"><Hardware/></Snapshot><Snapshot uuid="{{{}}}" name="b" timeStamp="t"><Hardware/></Snapshot>"#,
            uuid(3, 1),
            uuid(3, 2)
        ),
        "",
    );
    assert!(matches!(
        parse(&two_roots),
        Err(Error::Structure {
            element: "Snapshot",
            ..
        })
    ));
}

#[test]
fn a_100_mb_attribute_is_refused_without_being_copied() {
    let big = "x".repeat(100 << 20);
    let xml = machine("", "").replace("name=\"M\"", &format!("name=\"{big}\""));
    match parse(&xml) {
        Err(Error::LimitExceeded { field, element, .. }) => {
            assert_eq!(field, "max_tag_bytes");
            assert_eq!(element, "Machine");
        }
        other => panic!("{:?}", other.map(|m| m.name.len())),
    }
    // Also inside an element the parser otherwise skips.
    let xml = machine(
        &format!("<ExtraData><ExtraDataItem name=\"a\" value=\"{big}\"/></ExtraData>"),
        "",
    );
    assert!(matches!(parse(&xml), Err(Error::LimitExceeded { .. })));
    // A long description is bounded too.
    let xml = machine(
        &format!("<Description>{}</Description>", "d".repeat(2 << 20)),
        "",
    );
    assert!(matches!(
        parse(&xml),
        Err(Error::LimitExceeded {
            field: "max_text_bytes",
            ..
        })
    ));
}

#[test]
fn nesting_and_element_count_are_bounded() {
    let depth = 60_000;
    let deep = machine(
        &format!("{}{}", "<a>".repeat(depth), "</a>".repeat(depth)),
        "",
    );
    match parse(&deep) {
        Err(Error::LimitExceeded {
            field: "max_depth",
            element,
            ..
        }) => assert_eq!(element, "a"),
        other => panic!("{other:?}"),
    }
    // Deep snapshot chains are legitimate and fine below the limit.
    let limits = ParseLimits {
        max_depth: 10,
        ..ParseLimits::default()
    };
    assert!(matches!(
        MachineSettings::parse_str_with_limits(&thesis_example().to_xml(), &limits),
        Err(Error::LimitExceeded {
            field: "max_depth",
            ..
        })
    ));
    let limits = ParseLimits {
        max_elements: 50,
        ..ParseLimits::default()
    };
    assert!(matches!(
        MachineSettings::parse_str_with_limits(&thesis_example().to_xml(), &limits),
        Err(Error::LimitExceeded {
            field: "max_elements",
            ..
        })
    ));
}

#[test]
fn truncated_input_names_the_open_element() {
    let xml = thesis_example().to_xml();
    let cut = xml.find("<Snapshots>").unwrap() + "<Snapshots>".len();
    match parse(&xml[..cut]) {
        Err(Error::Truncated { element, .. }) => assert_eq!(element, "Snapshots"),
        other => panic!("{other:?}"),
    }
    // Every prefix of a real file fails cleanly.
    let real = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/vbox/joco-kad__teaching__Meta.vbox"
    ))
    .unwrap();
    let mut cut = 0;
    while cut < real.len() {
        if real.is_char_boundary(cut) {
            assert!(parse(&real[..cut]).is_err(), "prefix of {cut} bytes parsed");
        }
        cut += 13;
    }
    assert!(parse(&real).is_ok());
}

#[test]
fn content_after_the_root_is_refused() {
    let xml = format!("{}\nhello", machine("", ""));
    assert!(matches!(parse(&xml), Err(Error::TrailingContent { .. })));
    let xml = format!("{}<VirtualBox/>", machine("", ""));
    assert!(matches!(parse(&xml), Err(Error::TrailingContent { .. })));
    let xml = machine("", "").replace("</Machine>", "</Machin>");
    assert!(matches!(parse(&xml), Err(Error::Xml { .. })));
}

#[test]
fn malformed_attributes_are_xml_errors() {
    for bad in [
        r#"name=M"#,
        r#"name"#,
        r#"name="M"#,
        r#"name='M"#,
        r#"="M""#,
    ] {
        let xml = machine("", "").replace(r#"name="M""#, bad);
        assert!(
            matches!(parse(&xml), Err(Error::Xml { .. })),
            "{bad}: {:?}",
            parse(&xml)
        );
    }
    // A byte-order mark is accepted.
    assert!(parse(&format!("\u{feff}{}", machine("", ""))).is_ok());
    // Single quotes, spaces around `=`, prefixed and ignored attributes are fine.
    let ok = machine(
        "",
        r#" xmlns:vbox="urn:x" vbox:extra="1" lastStateChange = '2024'"#,
    )
    .replace(r#"name="M""#, "name = 'M &amp; N'");
    let m = parse(&ok).unwrap();
    assert_eq!(m.name, "M & N");
    assert_eq!(m.last_state_change.as_deref(), Some("2024"));
}

#[test]
fn load_wraps_errors_with_the_file_name() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.vbox");
    std::fs::write(&p, "<nope/>").unwrap();
    let e = MachineSettings::load(&p).unwrap_err();
    assert!(matches!(e, Error::InFile { .. }));
    assert!(matches!(e.innermost(), Error::WrongRoot { .. }));
    assert!(e.to_string().contains("bad.vbox"));
    std::fs::write(&p, [0xff, 0xfe, 0x00]).unwrap();
    assert!(matches!(MachineSettings::load(&p), Err(Error::Io { .. })));
    assert!(matches!(
        MachineSettings::load(Path::new("/nonexistent/x.vbox")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn entities_and_descriptions() {
    let xml = machine(
        r#"<Description>a &amp; b &#x3C; &#233; <![CDATA[<raw>]]></Description>"#,
        "",
    )
    .replace("name=\"M\"", "name=\"R&amp;D &#x2013; lab\"");
    let m = parse(&xml).unwrap();
    assert_eq!(m.name, "R&D \u{2013} lab");
    assert_eq!(m.description.as_deref(), Some("a & b < \u{e9} <raw>"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random byte edits of a real file never panic the parser.
    #[test]
    fn mutated_fixtures_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures/vbox/luiscidade17__VirtualBox__Ubuntu.vbox"
        )).unwrap();
        for (i, b) in edits {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        // Invalid UTF-8 becomes U+FFFD, so every case reaches the parsers (dropping
        // such cases would skip most of them: half of all bytes are >= 0x80).
        let s = String::from_utf8_lossy(&bytes);
        let _ = MachineSettings::parse_str(&s);
        let _ = GlobalRegistry::parse_str(&s, "/g");
    }
}

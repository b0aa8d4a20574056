#![allow(clippy::unwrap_used)]
//! VDI header reader: real images written by `qemu-img`, crafted differencing headers,
//! corrupt input, and the chain check.

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use unacloud_vbox::vdi::{verify_chain, ChainLink, ChainProblem, ImageType, VdiHeader};
use unacloud_vbox::Error;
use uuid::Uuid;

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

/// Runs `qemu-img create -f vdi`; `None` (with a note) when qemu-img is not installed.
fn qemu_img_create(path: &Path, size: &str, extra: &[&str]) -> Option<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "vdi"])
        .args(extra)
        .arg(path)
        .arg(size);
    match cmd.output() {
        Ok(out) => {
            assert!(
                out.status.success(),
                "qemu-img failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skip::skipped("qemu-img is not installed (scripts/setup installs qemu-utils)");
            None
        }
        Err(e) => panic!("cannot run qemu-img: {e}"),
    }
}

#[test]
fn reads_dynamic_image_written_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dyn.vdi");
    if qemu_img_create(&path, "100M", &[]).is_none() {
        return;
    }
    let h = VdiHeader::read(&path).unwrap();
    assert_eq!((h.version_major, h.version_minor), (1, 1));
    assert_eq!(h.image_type, ImageType::Normal);
    assert_eq!(h.disk_size, 100 << 20);
    assert_eq!(h.block_size, 1 << 20);
    assert_eq!(h.blocks, 100);
    assert_eq!(h.blocks_allocated, 0);
    assert_eq!(h.block_extra, 0);
    assert!(!h.uuid.is_nil());
    assert_eq!(h.parent_uuid, None);
    assert_eq!(h.parent_modification_uuid, None);
    assert!(!h.is_differencing());
    // The file holds exactly the header sector(s), the block map and no data.
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len >= h.min_file_len());
    assert!(h.data_offset >= h.block_map_offset + 400);
}

#[test]
fn reads_static_image_written_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("static.vdi");
    if qemu_img_create(&path, "8M", &["-o", "static=on"]).is_none() {
        return;
    }
    let h = VdiHeader::read(&path).unwrap();
    assert_eq!(h.image_type, ImageType::Fixed);
    assert_eq!(h.disk_size, 8 << 20);
    assert_eq!(h.blocks, 8);
    assert_eq!(h.blocks_allocated, 8);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        h.data_offset + 8 * (1 << 20)
    );
}

#[test]
fn two_qemu_images_have_distinct_uuids_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.vdi");
    let b = dir.path().join("b.vdi");
    if qemu_img_create(&a, "1M", &[]).is_none() || qemu_img_create(&b, "1M", &[]).is_none() {
        return;
    }
    let ha = VdiHeader::read(&a).unwrap();
    let hb = VdiHeader::read(&b).unwrap();
    assert_ne!(ha.uuid, hb.uuid);
    let report = verify_chain(&[
        ChainLink::new(&a, ha.uuid, None),
        ChainLink::new(&b, hb.uuid, None),
    ]);
    assert!(report.is_ok(), "{:?}", report.problems);
    // Negative control: swap the expected uuids.
    let report = verify_chain(&[ChainLink::new(&a, hb.uuid, None)]);
    assert!(matches!(
        report.problems.as_slice(),
        [ChainProblem::UuidMismatch { expected, found, .. }] if *expected == hb.uuid && *found == ha.uuid
    ));
}

#[test]
fn truncated_qemu_image_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.vdi");
    if qemu_img_create(&path, "64M", &[]).is_none() {
        return;
    }
    let full = std::fs::read(&path).unwrap();
    // Cut inside the header.
    std::fs::write(&path, &full[..300]).unwrap();
    match VdiHeader::read(&path).unwrap_err() {
        Error::VdiTruncated {
            path: Some(p),
            len: 300,
            needed,
            ..
        } => {
            assert_eq!(p, path);
            assert_eq!(needed, 0x48 + 0x180);
        }
        e => panic!("unexpected {e:?}"),
    }
    // Cut inside the block map.
    std::fs::write(&path, &full[..600]).unwrap();
    assert!(matches!(
        VdiHeader::read(&path).unwrap_err(),
        Error::VdiTruncated { len: 600, .. }
    ));
}

#[test]
fn crafted_differencing_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let base = uuid("6b60802b-0427-4b15-a2b1-bb86665e9b8c");
    let d1 = uuid("181848e3-2d39-4a96-8f70-7e81621cc465");
    let d2 = uuid("70806ad1-03a7-4f3a-8fa1-e8c3428c901e");
    let base_h = VdiHeader::new_base(32 << 20, base);
    let d1_h = VdiHeader::new_differencing(32 << 20, d1, base, base_h.modification_uuid);
    let d2_h = VdiHeader::new_differencing(32 << 20, d2, d1, d1_h.modification_uuid);
    let paths: Vec<PathBuf> = ["base.vdi", "d1.vdi", "d2.vdi"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    for (h, p) in [&base_h, &d1_h, &d2_h].iter().zip(&paths) {
        h.write_empty_image(p).unwrap();
    }
    let read = VdiHeader::read(&paths[2]).unwrap();
    assert_eq!(read.image_type, ImageType::Differencing);
    assert_eq!(read.parent_uuid, Some(d1));
    assert_eq!(read.parent_modification_uuid, Some(d1_h.modification_uuid));
    assert_eq!(read, d2_h);

    let links = vec![
        ChainLink::new(&paths[0], base, None),
        ChainLink::new(&paths[1], d1, Some(base)),
        ChainLink::new(&paths[2], d2, Some(d1)),
    ];
    let report = verify_chain(&links);
    assert!(report.is_ok(), "{:?}", report.problems);
    assert!(report.headers.iter().all(Option::is_some));
    report.into_result().unwrap();
}

#[test]
fn verify_chain_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let base = Uuid::from_u128(0x1000);
    let d1 = Uuid::from_u128(0x2000);
    let d2 = Uuid::from_u128(0x3000);
    let other = Uuid::from_u128(0x4000);
    let base_p = dir.path().join("base.vdi");
    let d1_p = dir.path().join("d1.vdi");
    let d2_p = dir.path().join("d2.vdi");
    let junk_p = dir.path().join("junk.vdi");
    let gone_p = dir.path().join("gone.vdi");
    // base carries the wrong uuid; d1 names the wrong parent; d2 is fine;
    // junk is not a VDI; gone does not exist.
    VdiHeader::new_base(1 << 20, other)
        .write_empty_image(&base_p)
        .unwrap();
    VdiHeader::new_differencing(1 << 20, d1, other, Uuid::nil())
        .write_empty_image(&d1_p)
        .unwrap();
    VdiHeader::new_differencing(1 << 20, d2, d1, Uuid::nil())
        .write_empty_image(&d2_p)
        .unwrap();
    std::fs::write(&junk_p, vec![b'x'; 4096]).unwrap();
    let links = vec![
        ChainLink::new(&base_p, base, None),
        ChainLink::new(&d1_p, d1, Some(base)),
        ChainLink::new(&d2_p, d2, Some(d1)),
        ChainLink::new(&junk_p, Uuid::from_u128(5), Some(d2)),
        ChainLink::new(&gone_p, Uuid::from_u128(6), Some(d2)),
    ];
    let report = verify_chain(&links);
    assert_eq!(report.problems.len(), 4, "{:#?}", report.problems);
    assert!(
        matches!(&report.problems[0], ChainProblem::UuidMismatch { path, found, .. } if *path == base_p && *found == other)
    );
    assert!(
        matches!(&report.problems[1], ChainProblem::ParentMismatch { path, expected: Some(e), found: Some(f), .. } if *path == d1_p && *e == base && *f == other)
    );
    assert!(
        matches!(&report.problems[2], ChainProblem::Unreadable { path, reason, .. } if *path == junk_p && reason.contains("not a VDI"))
    );
    assert!(matches!(&report.problems[3], ChainProblem::Missing { path, .. } if *path == gone_p));
    let err = report.into_result().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("4 problem(s)"), "{text}");
    assert!(text.contains("gone.vdi"), "{text}");
}

#[test]
fn base_where_registry_expects_differencing_is_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.vdi");
    let u = Uuid::from_u128(0x77);
    VdiHeader::new_base(1 << 20, u)
        .write_empty_image(&p)
        .unwrap();
    let report = verify_chain(&[ChainLink::new(&p, u, Some(Uuid::from_u128(1)))]);
    assert!(matches!(
        report.problems.as_slice(),
        [ChainProblem::ParentMismatch {
            expected: Some(_),
            found: None,
            ..
        }]
    ));
}

#[test]
fn not_a_vdi() {
    let mut bytes = VdiHeader::new_base(1 << 20, Uuid::from_u128(1)).encode();
    bytes[0x40] = 0x7e;
    match VdiHeader::parse(&bytes).unwrap_err() {
        e @ Error::NotVdi { path: None, found } => {
            assert_eq!(found, 0xBEDA_107E);
            assert!(e.to_string().contains("not a VDI"));
        }
        e => panic!("unexpected {e:?}"),
    }
    // A settings file is not a VDI either.
    let xml = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/vbox/joco-kad__teaching__Meta.vbox"
    ))
    .unwrap();
    assert!(matches!(
        VdiHeader::parse(&xml).unwrap_err(),
        Error::NotVdi { .. }
    ));
}

#[test]
fn unsupported_versions() {
    for (version, major, minor) in [
        (0x0002_0000u32, 2, 0),
        (0x0000_0001, 0, 1),
        (0xFFFF_FFFF, 0xFFFF, 0xFFFF),
    ] {
        let mut bytes = VdiHeader::new_base(1 << 20, Uuid::from_u128(1)).encode();
        bytes[0x44..0x48].copy_from_slice(&version.to_le_bytes());
        match VdiHeader::parse(&bytes).unwrap_err() {
            Error::VdiUnsupportedVersion {
                major: ma,
                minor: mi,
                ..
            } => assert_eq!((ma, mi), (major, minor)),
            e => panic!("unexpected {e:?}"),
        }
    }
    // Any 1.x is the v1 layout.
    let mut bytes = VdiHeader::new_base(1 << 20, Uuid::from_u128(1)).encode();
    bytes[0x44..0x48].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    assert_eq!(VdiHeader::parse(&bytes).unwrap().version_minor, 0);
}

fn field_error(mutate: impl FnOnce(&mut VdiHeader)) -> &'static str {
    let mut h = VdiHeader::new_base(16 << 20, Uuid::from_u128(9));
    mutate(&mut h);
    match VdiHeader::parse(&h.encode()).unwrap_err() {
        Error::VdiInvalidHeader { field, .. } => field,
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn absurd_values_are_rejected_with_the_field_named() {
    assert_eq!(field_error(|h| h.header_size = Some(100)), "header size");
    assert_eq!(
        field_error(|h| h.header_size = Some(u32::MAX)),
        "header size"
    );
    assert_eq!(
        field_error(|h| h.block_map_offset = 0x100),
        "block map offset"
    );
    assert_eq!(field_error(|h| h.block_size = 0), "block size");
    assert_eq!(field_error(|h| h.block_size = 3 << 20), "block size");
    assert_eq!(field_error(|h| h.blocks = 3), "block count");
    assert_eq!(field_error(|h| h.disk_size = u64::MAX), "block count");
    assert_eq!(
        field_error(|h| h.blocks_allocated = h.blocks + 1),
        "allocated block count"
    );
    assert_eq!(
        field_error(|h| h.data_offset = h.block_map_offset),
        "data offset"
    );
    assert_eq!(field_error(|h| h.uuid = Uuid::nil()), "image UUID");
    assert_eq!(
        field_error(|h| h.image_type = ImageType::Differencing),
        "parent UUID"
    );
    assert_eq!(field_error(|h| h.parent_uuid = Some(h.uuid)), "parent UUID");
    let mut bytes = VdiHeader::new_base(1 << 20, Uuid::from_u128(1)).encode();
    bytes[0x4C..0x50].copy_from_slice(&9u32.to_le_bytes());
    match VdiHeader::parse(&bytes).unwrap_err() {
        Error::VdiInvalidHeader { field, value, .. } => {
            assert_eq!((field, value), ("image type", 9));
        }
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn plain_1_1_header_has_no_lchs_geometry() {
    let mut h = VdiHeader::new_base(1 << 20, Uuid::from_u128(3));
    h.header_size = Some(0x180);
    h.lchs_geometry = None;
    let bytes = h.encode();
    // 456 bytes are enough for a 384-byte header.
    let parsed = VdiHeader::parse(&bytes[..456]).unwrap();
    assert_eq!(parsed, h);
    // A 1.1+ header needs 472.
    let plus = VdiHeader::new_base(1 << 20, Uuid::from_u128(3)).encode();
    assert!(matches!(
        VdiHeader::parse(&plus[..460]).unwrap_err(),
        Error::VdiTruncated { needed: 472, .. }
    ));
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let err = VdiHeader::read("/nonexistent/dir/x.vdi").unwrap_err();
    assert!(
        matches!(err, Error::Io { ref path, .. } if path == Path::new("/nonexistent/dir/x.vdi"))
    );
}

fn arb_header() -> impl Strategy<Value = VdiHeader> {
    (
        1u64..(1 << 40),
        any::<u128>(),
        any::<u128>(),
        any::<u128>(),
        prop_oneof![
            Just(ImageType::Normal),
            Just(ImageType::Fixed),
            Just(ImageType::Undo),
            Just(ImageType::Differencing)
        ],
        "[a-zA-Z0-9 é]{0,300}",
        any::<bool>(),
    )
        .prop_filter_map("valid uuids", |(size, u, p, m, ty, comment, plus)| {
            let u = Uuid::from_u128(u);
            let p = Uuid::from_u128(p);
            if u.is_nil() || p.is_nil() || u == p {
                return None;
            }
            let mut h = if ty == ImageType::Differencing {
                VdiHeader::new_differencing(size, u, p, Uuid::from_u128(m))
            } else {
                let mut h = VdiHeader::new_base(size, u);
                h.image_type = ty;
                h
            };
            if !plus {
                h.header_size = Some(0x180);
                h.lchs_geometry = None;
            }
            h.modification_uuid = Uuid::from_u128(m);
            h.comment = comment;
            Some(h)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_parse_round_trip(h in arb_header()) {
        let parsed = VdiHeader::parse(&h.encode()).unwrap();
        // The comment is cut at 255 bytes on a char boundary.
        let mut expected = h.clone();
        let mut end = expected.comment.len().min(255);
        while !expected.comment.is_char_boundary(end) { end -= 1; }
        expected.comment.truncate(end);
        prop_assert_eq!(parsed, expected);
    }

    #[test]
    fn parse_never_panics_on_mutated_headers(
        h in arb_header(),
        edits in proptest::collection::vec((0usize..512, any::<u8>()), 0..16),
        cut in 0usize..=512,
    ) {
        let mut bytes = h.encode().to_vec();
        for (i, v) in edits { bytes[i] = v; }
        bytes.truncate(cut);
        let _ = VdiHeader::parse(&bytes);
    }
}

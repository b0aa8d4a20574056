//! Decoding a header: the pre-header, the version 1.x and 0.2 layouts, and the checks
//! that refuse impossible values.

use crate::error::{Error, Result};
use std::path::Path;

use super::bytes::{get_comment, get_geometry, get_u32, get_u64, get_uuid, non_nil};
use super::{
    ImageType, VdiHeader, PRE_HEADER_LEN, SIGNATURE, V0_HEADER_END, V1_HEADER_MAX, V1_HEADER_MIN,
    V1_HEADER_PLUS, VERSION_0_2,
};

pub(super) fn parse_header(bytes: &[u8], path: Option<&Path>) -> Result<VdiHeader> {
    let owned_path = || path.map(Path::to_path_buf);
    let truncated = |needed: usize, what: &'static str| Error::VdiTruncated {
        path: owned_path(),
        len: bytes.len() as u64,
        needed: needed as u64,
        what,
    };
    if bytes.len() < PRE_HEADER_LEN {
        return Err(truncated(PRE_HEADER_LEN, "signature and version"));
    }
    let signature = get_u32(bytes, 0x40);
    if signature != SIGNATURE {
        return Err(Error::NotVdi {
            path: owned_path(),
            found: signature,
        });
    }
    let version = get_u32(bytes, 0x44);
    let major = (version >> 16) as u16;
    let minor = (version & 0xFFFF) as u16;
    let (header, raw_type) = match (major, version) {
        (1, _) => parse_v1(bytes, major, minor, &truncated)?,
        (_, VERSION_0_2) => parse_v0(bytes, major, minor, &truncated)?,
        _ => {
            return Err(Error::VdiUnsupportedVersion {
                path: owned_path(),
                major,
                minor,
            })
        }
    };
    if ImageType::from_raw(raw_type).is_none() {
        return Err(Error::VdiInvalidHeader {
            path: owned_path(),
            field: "image type",
            value: u64::from(raw_type),
            reason: "must be 1 (normal), 2 (fixed), 3 (undo) or 4 (differencing)".into(),
        });
    }
    validate(&header, path)?;
    Ok(header)
}

pub(super) fn parse_v1(
    bytes: &[u8],
    major: u16,
    minor: u16,
    truncated: &dyn Fn(usize, &'static str) -> Error,
) -> Result<(VdiHeader, u32)> {
    let header_end = PRE_HEADER_LEN + V1_HEADER_MIN as usize;
    if bytes.len() < header_end {
        return Err(truncated(header_end, "version 1 header"));
    }
    let header_size = get_u32(bytes, 0x48);
    let lchs_geometry = if header_size >= V1_HEADER_PLUS {
        let end = PRE_HEADER_LEN + V1_HEADER_PLUS as usize;
        if bytes.len() < end {
            return Err(truncated(end, "version 1.1+ header"));
        }
        Some(get_geometry(bytes, 0x1C8))
    } else {
        None
    };
    let raw_type = get_u32(bytes, 0x4C);
    let header = VdiHeader {
        version_major: major,
        version_minor: minor,
        header_size: Some(header_size),
        image_type: ImageType::from_raw(raw_type).unwrap_or(ImageType::Normal),
        flags: get_u32(bytes, 0x50),
        comment: get_comment(bytes, 0x54),
        block_map_offset: u64::from(get_u32(bytes, 0x154)),
        data_offset: u64::from(get_u32(bytes, 0x158)),
        legacy_geometry: get_geometry(bytes, 0x15C),
        lchs_geometry,
        disk_size: get_u64(bytes, 0x170),
        block_size: get_u32(bytes, 0x178),
        block_extra: get_u32(bytes, 0x17C),
        blocks: get_u32(bytes, 0x180),
        blocks_allocated: get_u32(bytes, 0x184),
        uuid: get_uuid(bytes, 0x188),
        modification_uuid: get_uuid(bytes, 0x198),
        parent_uuid: non_nil(get_uuid(bytes, 0x1A8)),
        parent_modification_uuid: non_nil(get_uuid(bytes, 0x1B8)),
    };
    Ok((header, raw_type))
}

pub(super) fn parse_v0(
    bytes: &[u8],
    major: u16,
    minor: u16,
    truncated: &dyn Fn(usize, &'static str) -> Error,
) -> Result<(VdiHeader, u32)> {
    if bytes.len() < V0_HEADER_END {
        return Err(truncated(V0_HEADER_END, "version 0 header"));
    }
    let raw_type = get_u32(bytes, 0x48);
    let blocks = get_u32(bytes, 0x16C);
    let block_map_offset = V0_HEADER_END as u64;
    let header = VdiHeader {
        version_major: major,
        version_minor: minor,
        header_size: None,
        image_type: ImageType::from_raw(raw_type).unwrap_or(ImageType::Normal),
        flags: get_u32(bytes, 0x4C),
        comment: get_comment(bytes, 0x50),
        block_map_offset,
        data_offset: block_map_offset + u64::from(blocks) * 4,
        legacy_geometry: get_geometry(bytes, 0x150),
        lchs_geometry: None,
        disk_size: get_u64(bytes, 0x160),
        block_size: get_u32(bytes, 0x168),
        block_extra: 0,
        blocks,
        blocks_allocated: get_u32(bytes, 0x170),
        uuid: get_uuid(bytes, 0x174),
        modification_uuid: get_uuid(bytes, 0x184),
        parent_uuid: non_nil(get_uuid(bytes, 0x194)),
        parent_modification_uuid: None,
    };
    Ok((header, raw_type))
}

/// VirtualBox's own consistency checks plus a few against absurd values.
pub(super) fn validate(h: &VdiHeader, path: Option<&Path>) -> Result<()> {
    let invalid = |field: &'static str, value: u64, reason: String| Error::VdiInvalidHeader {
        path: path.map(Path::to_path_buf),
        field,
        value,
        reason,
    };
    if let Some(size) = h.header_size {
        if size < V1_HEADER_MIN {
            return Err(invalid(
                "header size",
                u64::from(size),
                format!("smaller than the minimum of {V1_HEADER_MIN} bytes"),
            ));
        }
        if size > V1_HEADER_MAX {
            return Err(invalid(
                "header size",
                u64::from(size),
                format!("larger than {V1_HEADER_MAX} bytes"),
            ));
        }
        let header_end = PRE_HEADER_LEN as u64 + u64::from(size);
        if h.block_map_offset < header_end {
            return Err(invalid(
                "block map offset",
                h.block_map_offset,
                format!("points inside the header (which ends at {header_end})"),
            ));
        }
    }
    if h.block_size == 0 || !h.block_size.is_power_of_two() {
        return Err(invalid(
            "block size",
            u64::from(h.block_size),
            "must be a non-zero power of two".into(),
        ));
    }
    let capacity = u64::from(h.blocks) * u64::from(h.block_size);
    if capacity < h.disk_size {
        return Err(invalid(
            "block count",
            u64::from(h.blocks),
            format!(
                "{} blocks of {} bytes cannot hold a disk of {} bytes",
                h.blocks, h.block_size, h.disk_size
            ),
        ));
    }
    if h.blocks_allocated > h.blocks {
        return Err(invalid(
            "allocated block count",
            u64::from(h.blocks_allocated),
            format!("larger than the block count {}", h.blocks),
        ));
    }
    let map_end = h
        .block_map_offset
        .saturating_add(u64::from(h.blocks).saturating_mul(4));
    if h.data_offset < map_end {
        return Err(invalid(
            "data offset",
            h.data_offset,
            format!("points inside the block map (which ends at {map_end})"),
        ));
    }
    if h.uuid.is_nil() {
        return Err(invalid(
            "image UUID",
            0,
            "is all zeros; every image has a UUID".into(),
        ));
    }
    if h.image_type == ImageType::Differencing && h.parent_uuid.is_none() {
        return Err(invalid(
            "parent UUID",
            0,
            "is all zeros in a differencing image; the image cannot name its parent".into(),
        ));
    }
    if h.parent_uuid == Some(h.uuid) {
        return Err(invalid(
            "parent UUID",
            0,
            format!("equals the image's own UUID {}", h.uuid),
        ));
    }
    Ok(())
}

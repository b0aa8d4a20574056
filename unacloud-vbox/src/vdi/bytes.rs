//! Header arithmetic (blocks, alignment) and the fields of a header sector:
//! little-endian integers, mixed-endian UUIDs, geometry and the comment.

use uuid::Uuid;

use super::Geometry;

pub(super) fn blocks_for(disk_size: u64, block_size: u32) -> u32 {
    let bs = u64::from(block_size);
    u32::try_from(disk_size.div_ceil(bs)).unwrap_or(u32::MAX)
}

pub(super) fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

pub(super) fn saturating_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

pub(super) fn non_nil(u: Uuid) -> Option<Uuid> {
    Some(u).filter(|u| !u.is_nil())
}

// The callers check lengths first; these helpers are only used on in-range offsets
// and fall back to zero rather than panicking.
pub(super) fn get_array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(off..off + N) {
        out.copy_from_slice(src);
    }
    out
}

pub(super) fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(get_array(b, off))
}

pub(super) fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(get_array(b, off))
}

pub(super) fn get_uuid(b: &[u8], off: usize) -> Uuid {
    Uuid::from_bytes_le(get_array(b, off))
}

pub(super) fn get_geometry(b: &[u8], off: usize) -> Geometry {
    Geometry {
        cylinders: get_u32(b, off),
        heads: get_u32(b, off + 4),
        sectors: get_u32(b, off + 8),
        sector_size: get_u32(b, off + 12),
    }
}

pub(super) fn get_comment(b: &[u8], off: usize) -> String {
    let raw: [u8; 256] = get_array(b, off);
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

pub(super) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn put_uuid(b: &mut [u8], off: usize, u: Option<Uuid>) {
    b[off..off + 16].copy_from_slice(&u.unwrap_or_else(Uuid::nil).to_bytes_le());
}

pub(super) fn put_geometry(b: &mut [u8], off: usize, g: &Geometry) {
    put_u32(b, off, g.cylinders);
    put_u32(b, off + 4, g.heads);
    put_u32(b, off + 8, g.sectors);
    put_u32(b, off + 12, g.sector_size);
}

pub(super) fn put_comment(b: &mut [u8], off: usize, comment: &str) {
    // At most 255 bytes so the field stays NUL-terminated; cut on a char boundary.
    let mut end = comment.len().min(255);
    while !comment.is_char_boundary(end) {
        end -= 1;
    }
    b[off..off + end].copy_from_slice(&comment.as_bytes()[..end]);
}

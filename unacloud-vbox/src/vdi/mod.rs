//! VDI (VirtualBox Disk Image) headers: identify an image and its parent without
//! trusting the `.vbox` XML.
//!
//! A VDI file starts with a 64-byte text banner, a signature (`0xBEDA107F`) and a
//! version, followed by the header proper. Everything a migration needs sits in the
//! first 512 bytes: the image type (normal, fixed, undo, differencing), the virtual
//! size, the block geometry, and four UUIDs — the image's own UUID (the one a `.vbox`
//! media registry names), its last-modification UUID, and for differencing images
//! the parent's image UUID and the parent's modification UUID at the time the child
//! was created.
//!
//! Both header layouts VirtualBox accepts are read: major version 1 (the "1.1" and
//! "1.1+" headers every current VirtualBox and QEMU write) and the legacy version 0.2.
//! UUIDs are stored in the mixed-endian (GUID) byte order and are converted to the
//! text form used in settings files.
//!
//! [`verify_chain`] checks a whole list of images against what a registry says about
//! them and reports every problem at once, so that a broken differencing chain is
//! found before anything is copied.
//!
//! ```
//! use unacloud_vbox::vdi::{ImageType, VdiHeader};
//! use uuid::Uuid;
//!
//! let base = Uuid::parse_str("6b60802b-0427-4b15-a2b1-bb86665e9b8c").unwrap();
//! let child = Uuid::parse_str("181848e3-2d39-4a96-8f70-7e81621cc465").unwrap();
//! let header = VdiHeader::new_differencing(64 << 20, child, base, Uuid::nil());
//! let bytes = header.encode();
//! let parsed = VdiHeader::parse(&bytes).unwrap();
//! assert_eq!(parsed.image_type, ImageType::Differencing);
//! assert_eq!(parsed.uuid, child);
//! assert_eq!(parsed.parent_uuid, Some(base));
//! ```

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{Error, Result};

mod bytes;
mod chain;
mod decode;

use bytes::{
    align_up, blocks_for, put_comment, put_geometry, put_u32, put_u64, put_uuid, saturating_u32,
};
pub use chain::{verify_chain, ChainLink, ChainProblem, ChainReport};
use decode::parse_header;

/// The VDI signature at file offset 0x40.
pub const SIGNATURE: u32 = 0xBEDA_107F;

/// The header version current VirtualBox and QEMU write (1.1).
pub const VERSION_1_1: u32 = 0x0001_0001;

/// The legacy header version 0.2 (the "v0" layout).
pub const VERSION_0_2: u32 = 0x0000_0002;

/// Size of the region a reader needs: the whole fixed header fits in one sector.
pub const HEADER_SECTOR: usize = 512;

/// Block-map entry meaning "never allocated".
pub const BLOCK_FREE: u32 = 0xFFFF_FFFF;

/// Block-map entry meaning "zero / discarded block".
pub const BLOCK_ZERO: u32 = 0xFFFF_FFFE;

/// Offset of the header proper (after the 64-byte banner, signature and version).
const PRE_HEADER_LEN: usize = 0x48;

/// Smallest v1 header size VirtualBox accepts (the plain 1.1 header).
const V1_HEADER_MIN: u32 = 0x180;

/// Header size of a "1.1+" header (with the LCHS geometry).
const V1_HEADER_PLUS: u32 = 0x190;

/// End of a v0 header.
const V0_HEADER_END: usize = 0x1A4;

/// The banner this crate writes into headers it creates.
const BANNER: &[u8] = b"<<< unacloud VDI header >>>\n";

/// The largest header size accepted (anything bigger cannot fit in front of a sane
/// block map and is treated as corrupt).
const V1_HEADER_MAX: u32 = 1 << 20;

/// Kind of VDI image (u32 at 0x4C in a v1 header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageType {
    /// A dynamically growing base image (1).
    Normal,
    /// A preallocated base image (2).
    Fixed,
    /// A legacy undo/commit image (3); current VirtualBox never creates one.
    Undo,
    /// A differencing image (4); its parent is named by the linkage UUID.
    Differencing,
}

impl ImageType {
    /// The on-disk value.
    pub fn to_raw(self) -> u32 {
        match self {
            ImageType::Normal => 1,
            ImageType::Fixed => 2,
            ImageType::Undo => 3,
            ImageType::Differencing => 4,
        }
    }

    /// The type for an on-disk value, if known.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(ImageType::Normal),
            2 => Some(ImageType::Fixed),
            3 => Some(ImageType::Undo),
            4 => Some(ImageType::Differencing),
            _ => None,
        }
    }

    /// `normal`, `fixed`, `undo` or `differencing`.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageType::Normal => "normal",
            ImageType::Fixed => "fixed",
            ImageType::Undo => "undo",
            ImageType::Differencing => "differencing",
        }
    }
}

impl fmt::Display for ImageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A disk geometry as stored in the header (cylinders, heads, sectors, sector size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u32,
    /// Heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
    /// Bytes per sector (normally 512).
    pub sector_size: u32,
}

/// A parsed VDI header.
///
/// Fields that only exist in one layout are `Option`s: a v0 header has no header
/// size, no explicit offsets, no block-extra field and no parent-modification UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiHeader {
    /// Major header version (1 for every current image, 0 for the legacy 0.2 layout).
    pub version_major: u16,
    /// Minor header version.
    pub version_minor: u16,
    /// Header size in bytes counted from 0x48 (v1 only): 384 or 400.
    pub header_size: Option<u32>,
    /// Kind of image.
    pub image_type: ImageType,
    /// Image flags as stored.
    pub flags: u32,
    /// The comment/description (UTF-8, lossily decoded, up to the first NUL).
    pub comment: String,
    /// File offset of the block map.
    pub block_map_offset: u64,
    /// File offset of the data area.
    pub data_offset: u64,
    /// Legacy geometry.
    pub legacy_geometry: Geometry,
    /// Logical (LCHS) geometry, present in 400-byte "1.1+" headers.
    pub lchs_geometry: Option<Geometry>,
    /// Virtual disk size in bytes.
    pub disk_size: u64,
    /// Block size in bytes (1 MiB by default).
    pub block_size: u32,
    /// Extra bytes in front of each data block (normally 0).
    pub block_extra: u32,
    /// Number of blocks of the virtual disk.
    pub blocks: u32,
    /// Number of blocks allocated in this file.
    pub blocks_allocated: u32,
    /// The image UUID (what `<HardDisk uuid=…>` names).
    pub uuid: Uuid,
    /// The last-modification UUID.
    pub modification_uuid: Uuid,
    /// The parent's image UUID (differencing images); `None` when all zeros.
    pub parent_uuid: Option<Uuid>,
    /// The parent's modification UUID when this child was created (v1 only); `None`
    /// when all zeros or absent.
    pub parent_modification_uuid: Option<Uuid>,
}

impl VdiHeader {
    /// A 1.1+ header for an empty dynamically growing base image of `disk_size`
    /// bytes with 1 MiB blocks, laid out the way VirtualBox lays out a new image
    /// (block map and data area aligned to 1 MiB).
    ///
    /// Together with [`VdiHeader::encode`] and [`VdiHeader::write_empty_image`] this
    /// builds valid test images without VirtualBox.
    pub fn new_base(disk_size: u64, uuid: Uuid) -> Self {
        let block_size: u32 = 1 << 20;
        let blocks = blocks_for(disk_size, block_size);
        let block_map_offset: u64 = 1 << 20;
        let map_len = u64::from(blocks) * 4;
        let data_offset = align_up(block_map_offset + map_len, 1 << 20);
        VdiHeader {
            version_major: 1,
            version_minor: 1,
            header_size: Some(V1_HEADER_PLUS),
            image_type: ImageType::Normal,
            flags: 0,
            comment: String::new(),
            block_map_offset,
            data_offset,
            legacy_geometry: Geometry {
                sector_size: 512,
                ..Geometry::default()
            },
            lchs_geometry: Some(Geometry::default()),
            disk_size,
            block_size,
            block_extra: 0,
            blocks,
            blocks_allocated: 0,
            uuid,
            modification_uuid: Uuid::from_u128(uuid.as_u128() ^ 0x5a5a),
            parent_uuid: None,
            parent_modification_uuid: None,
        }
    }

    /// A 1.1+ header for an empty differencing image whose parent has image UUID
    /// `parent` and (at the time of creation) modification UUID `parent_modification`
    /// (pass [`Uuid::nil`] if unknown).
    pub fn new_differencing(
        disk_size: u64,
        uuid: Uuid,
        parent: Uuid,
        parent_modification: Uuid,
    ) -> Self {
        let mut header = VdiHeader::new_base(disk_size, uuid);
        header.image_type = ImageType::Differencing;
        header.parent_uuid = Some(parent);
        header.parent_modification_uuid = Some(parent_modification).filter(|u| !u.is_nil());
        header
    }

    /// Whether this is a differencing image.
    pub fn is_differencing(&self) -> bool {
        self.image_type == ImageType::Differencing
    }

    /// The smallest length a file holding this header can have: the end of the block
    /// map, and the end of the last allocated block.
    pub fn min_file_len(&self) -> u64 {
        // Saturating: the fields come from untrusted files.
        let map_end = self
            .block_map_offset
            .saturating_add(u64::from(self.blocks).saturating_mul(4));
        let data_end = self.data_offset.saturating_add(
            u64::from(self.blocks_allocated)
                .saturating_mul(u64::from(self.block_size) + u64::from(self.block_extra)),
        );
        map_end.max(data_end)
    }

    /// Parse a header from the first bytes of an image (512 are enough; fewer give
    /// [`Error::VdiTruncated`]).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        parse_header(bytes, None)
    }

    /// Read and check the header of the image at `path`.
    ///
    /// Besides the header checks of [`VdiHeader::parse`], the file must be at least
    /// [`VdiHeader::min_file_len`] bytes long, otherwise [`Error::VdiTruncated`].
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io_err = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        // Never wait for a FIFO's writer, and read only regular files (checked on
        // the opened file): a hostile registry may name a FIFO or a device.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)
            .map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(Error::not_regular(path, meta.file_type()));
        }
        let len = meta.len();
        let mut buf = [0u8; HEADER_SECTOR];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        let header = parse_header(&buf[..filled], Some(path))?;
        let needed = header.min_file_len();
        if len < needed {
            return Err(Error::VdiTruncated {
                path: Some(path.to_path_buf()),
                len,
                needed,
                what: "block map and allocated blocks",
            });
        }
        Ok(header)
    }

    /// Encode this header as the first 512 bytes of an image.
    ///
    /// Version 0.x headers are encoded in the v0 layout, everything else in the v1
    /// layout (with the LCHS geometry when `header_size` is at least 400). Fields that
    /// do not fit a layout are dropped. Encoding then parsing gives back the same
    /// header for any header [`VdiHeader::parse`] accepts.
    pub fn encode(&self) -> [u8; HEADER_SECTOR] {
        let mut b = [0u8; HEADER_SECTOR];
        b[..BANNER.len()].copy_from_slice(BANNER);
        put_u32(&mut b, 0x40, SIGNATURE);
        put_u32(
            &mut b,
            0x44,
            (u32::from(self.version_major) << 16) | u32::from(self.version_minor),
        );
        if self.version_major == 0 {
            put_u32(&mut b, 0x48, self.image_type.to_raw());
            put_u32(&mut b, 0x4C, self.flags);
            put_comment(&mut b, 0x50, &self.comment);
            put_geometry(&mut b, 0x150, &self.legacy_geometry);
            put_u64(&mut b, 0x160, self.disk_size);
            put_u32(&mut b, 0x168, self.block_size);
            put_u32(&mut b, 0x16C, self.blocks);
            put_u32(&mut b, 0x170, self.blocks_allocated);
            put_uuid(&mut b, 0x174, Some(self.uuid));
            put_uuid(&mut b, 0x184, Some(self.modification_uuid));
            put_uuid(&mut b, 0x194, self.parent_uuid);
            return b;
        }
        let header_size = self.header_size.unwrap_or(V1_HEADER_PLUS);
        put_u32(&mut b, 0x48, header_size);
        put_u32(&mut b, 0x4C, self.image_type.to_raw());
        put_u32(&mut b, 0x50, self.flags);
        put_comment(&mut b, 0x54, &self.comment);
        put_u32(&mut b, 0x154, saturating_u32(self.block_map_offset));
        put_u32(&mut b, 0x158, saturating_u32(self.data_offset));
        put_geometry(&mut b, 0x15C, &self.legacy_geometry);
        put_u64(&mut b, 0x170, self.disk_size);
        put_u32(&mut b, 0x178, self.block_size);
        put_u32(&mut b, 0x17C, self.block_extra);
        put_u32(&mut b, 0x180, self.blocks);
        put_u32(&mut b, 0x184, self.blocks_allocated);
        put_uuid(&mut b, 0x188, Some(self.uuid));
        put_uuid(&mut b, 0x198, Some(self.modification_uuid));
        put_uuid(&mut b, 0x1A8, self.parent_uuid);
        put_uuid(&mut b, 0x1B8, self.parent_modification_uuid);
        if header_size >= V1_HEADER_PLUS {
            put_geometry(&mut b, 0x1C8, &self.lchs_geometry.unwrap_or_default());
        }
        b
    }

    /// Write an image holding this header and an all-unallocated block map (an empty
    /// image of [`VdiHeader::min_file_len`] bytes) to `path`, replacing any file there.
    ///
    /// Meant for tests and fixtures (VirtualBox opens such a file as an empty disk).
    /// `blocks_allocated` should be 0; the data area is not written.
    pub fn write_empty_image(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io_err = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::create(path).map_err(io_err)?;
        file.write_all(&self.encode()).map_err(io_err)?;
        if self.version_major != 0 {
            file.set_len(self.block_map_offset).map_err(io_err)?;
            let mut w = io::BufWriter::new(&mut file);
            use io::Seek;
            w.seek(io::SeekFrom::Start(self.block_map_offset))
                .map_err(io_err)?;
            for _ in 0..self.blocks {
                w.write_all(&BLOCK_FREE.to_le_bytes()).map_err(io_err)?;
            }
            w.flush().map_err(io_err)?;
        } else {
            let mut w = io::BufWriter::new(&mut file);
            use io::Seek;
            w.seek(io::SeekFrom::Start(V0_HEADER_END as u64))
                .map_err(io_err)?;
            for _ in 0..self.blocks {
                w.write_all(&BLOCK_FREE.to_le_bytes()).map_err(io_err)?;
            }
            w.flush().map_err(io_err)?;
        }
        let len = file.metadata().map_err(io_err)?.len();
        if len < self.min_file_len() {
            file.set_len(self.min_file_len()).map_err(io_err)?;
        }
        Ok(())
    }
}

/// How a header names its origin in errors: the path, or "in-memory header".
pub(crate) fn origin(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => p.display().to_string(),
        None => "in-memory header".to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn uuid(s: &str) -> Uuid {
        Uuid::parse_str(s).unwrap()
    }

    #[test]
    fn uuid_bytes_are_mixed_endian() {
        let u = uuid("00112233-4455-6677-8899-aabbccddeeff");
        let h = VdiHeader::new_base(1 << 20, u);
        let b = h.encode();
        assert_eq!(
            &b[0x188..0x198],
            &[
                0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        assert_eq!(&b[0x40..0x44], &[0x7f, 0x10, 0xda, 0xbe]);
    }

    #[test]
    fn v0_round_trip() {
        let mut h = VdiHeader::new_differencing(
            10 << 20,
            uuid("181848e3-2d39-4a96-8f70-7e81621cc465"),
            uuid("6b60802b-0427-4b15-a2b1-bb86665e9b8c"),
            Uuid::nil(),
        );
        h.version_major = 0;
        h.version_minor = 2;
        h.header_size = None;
        h.lchs_geometry = None;
        h.block_map_offset = V0_HEADER_END as u64;
        h.data_offset = h.block_map_offset + u64::from(h.blocks) * 4;
        let parsed = VdiHeader::parse(&h.encode()).unwrap();
        assert_eq!(parsed, h);
    }

    #[test]
    fn comment_is_cut_on_char_boundary() {
        let mut h = VdiHeader::new_base(1 << 20, Uuid::from_u128(7));
        h.comment = "é".repeat(200);
        let parsed = VdiHeader::parse(&h.encode()).unwrap();
        assert_eq!(parsed.comment, "é".repeat(127));
    }
}

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

fn parse_header(bytes: &[u8], path: Option<&Path>) -> Result<VdiHeader> {
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

fn parse_v1(
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

fn parse_v0(
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
fn validate(h: &VdiHeader, path: Option<&Path>) -> Result<()> {
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

/// One image a chain check expects: where it is, which UUID it must carry, and which
/// parent UUID it must name (`None` for a base image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    /// The image file.
    pub path: PathBuf,
    /// The image UUID the registry gives it.
    pub uuid: Uuid,
    /// The parent's image UUID per the registry (`None`: a base image).
    pub parent: Option<Uuid>,
}

impl ChainLink {
    /// A link.
    pub fn new(path: impl Into<PathBuf>, uuid: Uuid, parent: Option<Uuid>) -> Self {
        ChainLink {
            path: path.into(),
            uuid,
            parent,
        }
    }
}

/// One problem found by [`verify_chain`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainProblem {
    /// The file does not exist.
    Missing {
        /// The expected file.
        path: PathBuf,
        /// The UUID the registry gives it.
        uuid: Uuid,
    },
    /// The file exists but its header could not be read or is not a valid VDI header.
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The UUID the registry gives it.
        uuid: Uuid,
        /// Why (the error text of the header reader).
        reason: String,
    },
    /// The header's image UUID is not the one the registry gives.
    UuidMismatch {
        /// The file.
        path: PathBuf,
        /// The UUID the registry gives it.
        expected: Uuid,
        /// The UUID in the header.
        found: Uuid,
    },
    /// The header names another parent than the registry (or none, or one where the
    /// registry has a base image).
    ParentMismatch {
        /// The file.
        path: PathBuf,
        /// The image's UUID.
        uuid: Uuid,
        /// The parent per the registry.
        expected: Option<Uuid>,
        /// The parent per the header.
        found: Option<Uuid>,
    },
    /// The registry says base image but the header says differencing, or the reverse.
    TypeMismatch {
        /// The file.
        path: PathBuf,
        /// The image's UUID.
        uuid: Uuid,
        /// The header's image type.
        found: ImageType,
    },
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let braces = |u: &Option<Uuid>| match u {
            Some(u) => format!("{{{u}}}"),
            None => "none (base image)".to_string(),
        };
        match self {
            ChainProblem::Missing { path, uuid } => {
                write!(f, "image {{{uuid}}} is missing: {}", path.display())
            }
            ChainProblem::Unreadable { path, uuid, reason } => write!(
                f,
                "image {{{uuid}}} at {} is not a readable VDI: {reason}",
                path.display()
            ),
            ChainProblem::UuidMismatch {
                path,
                expected,
                found,
            } => write!(
                f,
                "{} carries UUID {{{found}}} but the registry expects {{{expected}}}",
                path.display()
            ),
            ChainProblem::ParentMismatch {
                path,
                uuid,
                expected,
                found,
            } => write!(
                f,
                "image {{{uuid}}} at {} names parent {} but the registry expects {}",
                path.display(),
                braces(found),
                braces(expected)
            ),
            ChainProblem::TypeMismatch { path, uuid, found } => write!(
                f,
                "image {{{uuid}}} at {} is a {found} image, which does not match its place \
                 in the registry",
                path.display()
            ),
        }
    }
}

/// The outcome of [`verify_chain`]: every problem found, in input order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainReport {
    /// The headers read, by input index (`None` where the file could not be read).
    pub headers: Vec<Option<VdiHeader>>,
    /// Every problem found.
    pub problems: Vec<ChainProblem>,
}

impl ChainReport {
    /// Whether the chain is intact.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// `Ok(())` if intact, otherwise [`Error::BrokenChain`] listing every problem.
    pub fn into_result(self) -> Result<()> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Error::BrokenChain {
                problems: self.problems,
            })
        }
    }
}

/// Check every image of a set against what a registry says about it: the file exists,
/// is a VDI, carries the expected image UUID, and names the expected parent.
///
/// All links are checked; the report lists every problem, not just the first.
/// A link whose registry parent is `None` must be a base image (normal, fixed or
/// undo) with no parent UUID; a link with a parent must be a differencing image
/// naming exactly that parent.
pub fn verify_chain(links: &[ChainLink]) -> ChainReport {
    let mut report = ChainReport::default();
    for link in links {
        let header = match std::fs::metadata(&link.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                report.problems.push(ChainProblem::Missing {
                    path: link.path.clone(),
                    uuid: link.uuid,
                });
                None
            }
            _ => match VdiHeader::read(&link.path) {
                Ok(h) => Some(h),
                Err(e) => {
                    report.problems.push(ChainProblem::Unreadable {
                        path: link.path.clone(),
                        uuid: link.uuid,
                        reason: error_chain_text(&e),
                    });
                    None
                }
            },
        };
        if let Some(h) = &header {
            if h.uuid != link.uuid {
                report.problems.push(ChainProblem::UuidMismatch {
                    path: link.path.clone(),
                    expected: link.uuid,
                    found: h.uuid,
                });
            }
            if h.parent_uuid != link.parent {
                report.problems.push(ChainProblem::ParentMismatch {
                    path: link.path.clone(),
                    uuid: link.uuid,
                    expected: link.parent,
                    found: h.parent_uuid,
                });
            } else if h.is_differencing() != link.parent.is_some() {
                report.problems.push(ChainProblem::TypeMismatch {
                    path: link.path.clone(),
                    uuid: link.uuid,
                    found: h.image_type,
                });
            }
        }
        report.headers.push(header);
    }
    report
}

fn error_chain_text(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn blocks_for(disk_size: u64, block_size: u32) -> u32 {
    let bs = u64::from(block_size);
    u32::try_from(disk_size.div_ceil(bs)).unwrap_or(u32::MAX)
}

fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

fn saturating_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn non_nil(u: Uuid) -> Option<Uuid> {
    Some(u).filter(|u| !u.is_nil())
}

// The callers check lengths first; these helpers are only used on in-range offsets
// and fall back to zero rather than panicking.
fn get_array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(off..off + N) {
        out.copy_from_slice(src);
    }
    out
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(get_array(b, off))
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(get_array(b, off))
}

fn get_uuid(b: &[u8], off: usize) -> Uuid {
    Uuid::from_bytes_le(get_array(b, off))
}

fn get_geometry(b: &[u8], off: usize) -> Geometry {
    Geometry {
        cylinders: get_u32(b, off),
        heads: get_u32(b, off + 4),
        sectors: get_u32(b, off + 8),
        sector_size: get_u32(b, off + 12),
    }
}

fn get_comment(b: &[u8], off: usize) -> String {
    let raw: [u8; 256] = get_array(b, off);
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_uuid(b: &mut [u8], off: usize, u: Option<Uuid>) {
    b[off..off + 16].copy_from_slice(&u.unwrap_or_else(Uuid::nil).to_bytes_le());
}

fn put_geometry(b: &mut [u8], off: usize, g: &Geometry) {
    put_u32(b, off, g.cylinders);
    put_u32(b, off + 4, g.heads);
    put_u32(b, off + 8, g.sectors);
    put_u32(b, off + 12, g.sector_size);
}

fn put_comment(b: &mut [u8], off: usize, comment: &str) {
    // At most 255 bytes so the field stays NUL-terminated; cut on a char boundary.
    let mut end = comment.len().min(255);
    while !comment.is_char_boundary(end) {
        end -= 1;
    }
    b[off..off + end].copy_from_slice(&comment.as_bytes()[..end]);
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

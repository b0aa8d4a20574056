//! Small file-system helpers shared by the provisioning code and the QEMU backend:
//! atomic writes, allocated size, checksums.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A sibling temporary name for `path` that no other writer in this process uses.
pub(crate) fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}-{}-{n}", std::process::id()))
}

/// Flushes a directory's entry table so a rename inside it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    d.sync_all().map_err(|e| Error::io(dir, e))
}

/// Writes `bytes` to `path` through a temporary sibling, `fsync` and `rename`: readers
/// see the old content or the new one, never a mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, bytes, true)
}

/// [`write_atomic`]; with `durable` false the `fsync` calls are left out: readers still
/// never see a torn file, but a power cut may lose the latest write.
pub(crate) fn write_atomic_with(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let tmp = temp_sibling(path, "tmp");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        if durable {
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        if durable {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                sync_dir(dir)?;
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Bytes a file really occupies on disk (`st_blocks × 512`), not its apparent length.
#[cfg_attr(
    feature = "provision",
    doc = r#"
```
let dir = tempfile::tempdir().unwrap();
let p = dir.path().join("sparse");
let f = std::fs::File::create(&p).unwrap();
f.set_len(1 << 30).unwrap(); // 1 GiB hole
assert!(unacloud_core::provision::allocated_bytes(&p).unwrap() < 1 << 20);
```"#
)]
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    Ok(m.blocks().saturating_mul(512))
}

/// Reads `reader` to the end in 1 MiB chunks, feeding `update`.
pub(crate) fn stream(
    path: &Path,
    mut reader: impl Read,
    mut update: impl FnMut(&[u8]),
) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        update(&buf[..n]);
        total += n as u64;
    }
}

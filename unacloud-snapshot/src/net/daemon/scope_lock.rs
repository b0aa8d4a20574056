//! Per-VM scope locks, so that two launchers never drive the same VM's rules.

use super::*;

/// A name component of a lock file: letters, digits, `.` and `_` as they are, anything
/// else (`-` included, the separator) as `%XX`, so distinct scopes get distinct files.
fn lock_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The lock file of `vm`'s colouring scope in `run_dir`:
/// `launcher-<netns or "host">-<tap or "all">.lock`.
pub fn scope_lock_path(run_dir: &Path, vm: &VmConfig) -> PathBuf {
    let ns = vm
        .netns
        .as_deref()
        .map_or("host".to_string(), |n| format!("ns-{}", lock_component(n)));
    let tap = vm
        .tap
        .as_deref()
        .map_or("all".to_string(), |t| format!("tap-{}", lock_component(t)));
    run_dir.join(format!("launcher-{ns}-{tap}.lock"))
}

/// An exclusive lock on one VM colouring scope (a namespace and tap, or the host), held by
/// a running launcher: a non-blocking `flock` of a file in the run directory, which holds
/// the holder's description. Released, and the file removed, when dropped (or when the
/// process dies: the kernel releases the lock).
#[derive(Debug)]
pub struct ScopeLock {
    path: PathBuf,
    _file: nix::fcntl::Flock<std::fs::File>,
}

impl ScopeLock {
    /// Takes the lock at `path` for VM `vm`, without waiting. Fails with the holder's
    /// description when another process holds it.
    pub fn acquire(path: &Path, vm: &str) -> Result<Self> {
        use nix::fcntl::{Flock, FlockArg};
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let io_err = |what: &str, e: std::io::Error| Error::InvalidConfig {
            reason: format!(
                "VM {vm}: cannot {what} the lock file {} ({e}); pass --run-dir DIR \
                 (`run_dir` in [launcher]) in a writable directory",
                path.display()
            ),
        };
        // A holder removes its file while it still holds the lock; a file we locked but
        // that is no longer at `path` was such a file: open the new one and try again.
        for _ in 0..10 {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
                .map_err(|e| io_err("open", e))?;
            let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    let holder = if holder.is_empty() {
                        "a launcher that is starting".to_string()
                    } else {
                        holder.to_string()
                    };
                    return Err(Error::InvalidConfig {
                        reason: format!(
                            "VM {vm} is already run by another launcher on this host: the \
                             lock file {} is held by {holder}. Starting would remove its \
                             packet-colouring rules; stop that launcher first",
                            path.display()
                        ),
                    });
                }
                Err((_, errno)) => return Err(io_err("lock", errno.into())),
            };
            let same = match (file.metadata(), std::fs::metadata(path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let me = format!(
                "pid {} (unacloud-gs launcher, VM {vm}, since unix time {since})\n",
                std::process::id()
            );
            file.set_len(0).map_err(|e| io_err("write", e))?;
            file.rewind().map_err(|e| io_err("write", e))?;
            file.write_all(me.as_bytes())
                .map_err(|e| io_err("write", e))?;
            return Ok(Self {
                path: path.to_path_buf(),
                _file: file,
            });
        }
        Err(Error::InvalidConfig {
            reason: format!(
                "VM {vm}: the lock file {} keeps being replaced; is another launcher \
                 starting and stopping in a loop?",
                path.display()
            ),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScopeLock {
    fn drop(&mut self) {
        // Removed while still held, so that nobody locks a file that is going away.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Locks the colouring scope of every VM in `vms` (one lock per distinct scope) in
/// `run_dir`, creating the directory if needed. Fails, holding nothing, if any scope is
/// held by another process.
pub fn lock_vm_scopes(run_dir: &Path, vms: &[VmConfig]) -> Result<Vec<ScopeLock>> {
    if !run_dir.is_dir() {
        std::fs::create_dir_all(run_dir).map_err(|e| Error::InvalidConfig {
            reason: format!(
                "cannot create the run directory {} for the launchers' lock files ({e})",
                run_dir.display()
            ),
        })?;
    }
    let mut locks: Vec<ScopeLock> = Vec::new();
    for vm in vms {
        let path = scope_lock_path(run_dir, vm);
        if locks.iter().any(|l| l.path == path) {
            continue;
        }
        locks.push(ScopeLock::acquire(&path, &vm.name)?);
    }
    Ok(locks)
}

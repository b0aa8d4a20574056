//! Locations of media and saved states, as written in settings files.
//!
//! VirtualBox writes `location` and `stateFile` values relative to the folder of the
//! file that holds them (the machine folder for a `.vbox`, the folder of
//! `VirtualBox.xml` for the global registry), or as absolute paths of the host that
//! wrote them — on the lab hosts that is Windows: `C:\Users\…`, `C:/Users/…`, or shares
//! such as `//host/share/…`.
//!
//! [`Location::resolve`] classifies such a string and resolves it **lexically**: it
//! never touches the file system, never follows symbolic links, turns `\` into `/`,
//! drops `.` components and folds `..` into the preceding component. The original
//! string is kept for display and for writing settings back.
//!
//! ```
//! use std::path::Path;
//! use unacloud_vbox::location::{Location, LocationKind};
//!
//! let base = Path::new("/vms/TM");
//! let l = Location::resolve("Snapshots\\{0a1b}.vdi", base);
//! assert_eq!(l.kind(), LocationKind::Relative);
//! assert_eq!(l.path(), Path::new("/vms/TM/Snapshots/{0a1b}.vdi"));
//!
//! let w = Location::resolve(r"C:\Users\lab\VirtualBox VMs\TM\TM.vdi", base);
//! assert_eq!(w.kind(), LocationKind::WindowsDrive);
//! assert_eq!(w.path(), Path::new("C:/Users/lab/VirtualBox VMs/TM/TM.vdi"));
//! assert_eq!(w.original(), r"C:\Users\lab\VirtualBox VMs\TM\TM.vdi");
//!
//! let escape = Location::resolve("../../etc/passwd", base);
//! assert_eq!(escape.path(), Path::new("/etc/passwd"));
//! assert!(escape.strip_base(base).is_none());
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How a location string was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocationKind {
    /// Relative to the folder of the file that holds it.
    Relative,
    /// An absolute POSIX path (`/home/…`).
    UnixAbsolute,
    /// A Windows path with a drive letter (`C:\…` or `C:/…`).
    WindowsDrive,
    /// A network share (`//host/share/…` or `\\host\share\…`).
    Unc,
}

impl LocationKind {
    /// Whether the location does not depend on the folder it was read from.
    pub fn is_absolute(self) -> bool {
        !matches!(self, LocationKind::Relative)
    }

    /// Whether the location names a file of another host's file system that this
    /// host cannot look up: a Windows drive path or a network share, on a
    /// non-Windows host. Such a location is never resolved against anything else
    /// (not the machine folder, not the current folder): trackers report it as
    /// missing, with a warning naming it.
    pub fn is_foreign(self) -> bool {
        !cfg!(windows) && matches!(self, LocationKind::WindowsDrive | LocationKind::Unc)
    }
}

/// A location string together with its lexical resolution.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Location {
    original: String,
    kind: LocationKind,
    resolved: PathBuf,
}

impl Location {
    /// Classifies `original` and resolves it against `base` (the folder of the file
    /// the string was read from) without touching the file system.
    ///
    /// Windows locations keep their drive letter and get `/` separators
    /// (`C:/Users/…`); on a non-Windows host they name no local file, so size look-ups
    /// report them as missing. Shares keep their leading `//`.
    pub fn resolve(original: &str, base: &Path) -> Location {
        let (kind, resolved) = match join_plain(original, base) {
            Some(resolved) => (LocationKind::Relative, resolved),
            None => resolve_general(original, base),
        };
        Location {
            original: original.to_owned(),
            kind,
            resolved: PathBuf::from(resolved),
        }
    }

    /// How an already resolved path (for example a
    /// [`VmFile::path`](unacloud_core::files::VmFile::path)) was written: resolution
    /// keeps the drive letter and the leading `//` of shares, so the kind can be
    /// told from the path alone.
    ///
    /// ```
    /// use std::path::Path;
    /// use unacloud_vbox::location::{Location, LocationKind};
    ///
    /// assert_eq!(Location::kind_of_path(Path::new("C:/Users/a.vdi")), LocationKind::WindowsDrive);
    /// assert_eq!(Location::kind_of_path(Path::new("//srv/share/a.vdi")), LocationKind::Unc);
    /// assert_eq!(Location::kind_of_path(Path::new("/vms/a.vdi")), LocationKind::UnixAbsolute);
    /// assert_eq!(Location::kind_of_path(Path::new("vms/a.vdi")), LocationKind::Relative);
    /// ```
    pub fn kind_of_path(path: &Path) -> LocationKind {
        Location::resolve(&path.to_string_lossy(), Path::new("")).kind()
    }

    /// Whether the location is foreign to this host (see [`LocationKind::is_foreign`]).
    pub fn is_foreign(&self) -> bool {
        self.kind.is_foreign()
    }

    /// The string as written in the settings file.
    pub fn original(&self) -> &str {
        &self.original
    }

    /// How the string was written.
    pub fn kind(&self) -> LocationKind {
        self.kind
    }

    /// The lexically resolved path.
    pub fn path(&self) -> &Path {
        &self.resolved
    }

    /// The resolved path relative to `base`, or `None` if it lies outside `base`
    /// (compared lexically, component by component). Use this to keep a folder
    /// structure when copying and to refuse locations that escape a folder.
    pub fn strip_base(&self, base: &Path) -> Option<PathBuf> {
        let b = Location::resolve("", base);
        let rel = self.resolved.strip_prefix(b.path()).ok()?;
        if rel.as_os_str().is_empty() {
            return None;
        }
        Some(rel.to_path_buf())
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.resolved.to_string_lossy())
    }
}

/// Classifies and resolves any location string (see [`Location::resolve`]).
fn resolve_general(original: &str, base: &Path) -> (LocationKind, String) {
    let bytes = original.as_bytes();
    let is_sep = |b: u8| b == b'/' || b == b'\\';
    if bytes.len() >= 2 && is_sep(bytes[0]) && is_sep(bytes[1]) {
        let mut parts = Vec::new();
        push_components(&mut parts, &original[2..], 2);
        (LocationKind::Unc, format!("//{}", parts.join("/")))
    } else if bytes.len() >= 2
        && bytes[0].is_ascii_alphabetic()
        && bytes[1] == b':'
        && (bytes.len() == 2 || is_sep(bytes[2]))
    {
        let drive = &original[..2];
        let mut parts = Vec::new();
        push_components(&mut parts, &original[2..], 0);
        (
            LocationKind::WindowsDrive,
            format!("{}/{}", drive.to_ascii_uppercase(), parts.join("/")),
        )
    } else if bytes.first().copied().is_some_and(is_sep) {
        let mut parts = Vec::new();
        push_components(&mut parts, original, 0);
        (LocationKind::UnixAbsolute, format!("/{}", parts.join("/")))
    } else {
        let base_str = base.to_string_lossy().replace('\\', "/");
        let absolute_base = base_str.starts_with('/');
        let mut parts = Vec::new();
        let floor = if absolute_base { 0 } else { usize::MAX };
        if absolute_base {
            push_components(&mut parts, &base_str, 0);
        } else {
            push_relative(&mut parts, &base_str, floor);
        }
        push_relative(&mut parts, original, floor);
        let joined = parts.join("/");
        let s = if absolute_base {
            format!("/{joined}")
        } else if joined.is_empty() {
            ".".to_owned()
        } else {
            joined
        };
        (LocationKind::Relative, s)
    }
}

/// Whether every `/`- or `\`-separated component of `s` is a name: not empty, not `.`
/// and not `..` (so `s` neither starts nor ends with a separator nor doubles one).
fn plain_components(s: &str) -> bool {
    !s.is_empty()
        && s.split(['/', '\\'])
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The common case resolved with one allocation: a relative location whose components
/// are all names, under an absolute base whose components are all names (one trailing
/// `/` allowed). Folding and separator rules give the same result as the general path
/// (a property test holds them equal); `None` sends every other input there.
fn join_plain(original: &str, base: &Path) -> Option<String> {
    let first = *original.as_bytes().first()?;
    if first == b'/' || first == b'\\' || !plain_components(original) {
        return None;
    }
    // A drive letter (`C:` then a separator or nothing) is not relative.
    let b = original.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        return None;
    }
    let base = base.to_str()?;
    let rest = base.strip_prefix('/')?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('\\') || (!rest.is_empty() && !plain_components(rest)) {
        return None;
    }
    let mut out = String::with_capacity(rest.len() + original.len() + 2);
    out.push('/');
    out.push_str(rest);
    if !rest.is_empty() {
        out.push('/');
    }
    for (i, part) in original.split('\\').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(part);
    }
    Some(out)
}

/// Pushes the components of an absolute path, folding `.` and `..`; `..` never climbs
/// above the first `keep` components (the share's host and name for UNC paths).
fn push_components<'a>(parts: &mut Vec<&'a str>, s: &'a str, keep: usize) {
    for c in s.split(['/', '\\']) {
        match c {
            "" | "." => {}
            ".." => {
                if parts.len() > keep {
                    parts.pop();
                }
            }
            other => parts.push(other),
        }
    }
}

/// Pushes a relative path onto `parts`; with `floor == usize::MAX` (relative base)
/// leading `..` that cannot be folded are kept.
fn push_relative<'a>(parts: &mut Vec<&'a str>, s: &'a str, floor: usize) {
    for c in s.split(['/', '\\']) {
        match c {
            "" | "." => {}
            ".." => {
                let can_pop = parts.last().is_some_and(|l| *l != "..");
                if can_pop {
                    parts.pop();
                } else if floor == usize::MAX {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn r(s: &str, base: &str) -> (LocationKind, String) {
        let l = Location::resolve(s, Path::new(base));
        (l.kind(), l.path().to_string_lossy().into_owned())
    }

    #[test]
    fn classifies_and_resolves() {
        use LocationKind::*;
        assert_eq!(
            r("Ubuntu.vdi", "/vms/U"),
            (Relative, "/vms/U/Ubuntu.vdi".into())
        );
        assert_eq!(
            r("Snapshots/{1}.vdi", "/vms/U/"),
            (Relative, "/vms/U/Snapshots/{1}.vdi".into())
        );
        assert_eq!(r("./a/./b", "/x"), (Relative, "/x/a/b".into()));
        assert_eq!(
            r("/home/l/a.iso", "/x"),
            (UnixAbsolute, "/home/l/a.iso".into())
        );
        assert_eq!(
            r("C:/Users/a.vmdk", "/x"),
            (WindowsDrive, "C:/Users/a.vmdk".into())
        );
        assert_eq!(
            r("c:\\Users\\a.vdi", "/x"),
            (WindowsDrive, "C:/Users/a.vdi".into())
        );
        assert_eq!(
            r("F:/Datastore.vmdk", "/x"),
            (WindowsDrive, "F:/Datastore.vmdk".into())
        );
        assert_eq!(
            r("//UNKNOWN/Users/Public/T.iso", "/x"),
            (Unc, "//UNKNOWN/Users/Public/T.iso".into())
        );
        assert_eq!(
            r("\\\\srv\\share\\a.vdi", "/x"),
            (Unc, "//srv/share/a.vdi".into())
        );
        assert_eq!(
            r("//srv/share/../../a", "/x"),
            (Unc, "//srv/share/a".into())
        );
        assert_eq!(r("C:/../a", "/x"), (WindowsDrive, "C:/a".into()));
        assert_eq!(r("a/../../b", "rel/dir"), (Relative, "rel/b".into()));
        assert_eq!(r("../../../b", "rel"), (Relative, "../../b".into()));
        assert_eq!(r("../../../../b", "/a/b"), (Relative, "/b".into()));
        assert_eq!(r("a.vdi", ""), (Relative, "a.vdi".into()));
        assert_eq!(
            r("Snapshots/a.vdi", "../f/vbox"),
            (Relative, "../f/vbox/Snapshots/a.vdi".into())
        );
        assert_eq!(
            r("../../../a.vdi", "../f/vbox"),
            (Relative, "../../a.vdi".into())
        );
        assert_eq!(r("a.vdi", "./x/../y"), (Relative, "y/a.vdi".into()));
        // A relative path that happens to contain a colon later is still relative.
        assert_eq!(r("disk:1.vdi", "/x"), (Relative, "/x/disk:1.vdi".into()));
    }

    proptest::proptest! {
        /// The one-allocation path agrees with the general one wherever it applies.
        #[test]
        fn plain_join_agrees_with_general(
            original in proptest::collection::vec(
                proptest::sample::select(vec!["a", "Snap shots", "{1}.vdi", ".", "..", "", "C:", "d:x"]),
                0..5,
            ),
            seps in proptest::collection::vec(proptest::bool::ANY, 5),
            base in proptest::collection::vec(
                proptest::sample::select(vec!["vms", "TM", ".", "..", "", "x\\y"]),
                0..4,
            ),
            absolute in proptest::bool::ANY,
            trailing in proptest::bool::ANY,
        ) {
            let mut o = String::new();
            for (i, c) in original.iter().enumerate() {
                if i > 0 {
                    o.push(if seps[i] { '\\' } else { '/' });
                }
                o.push_str(c);
            }
            let mut b = if absolute { "/".to_owned() } else { String::new() };
            b.push_str(&base.join("/"));
            if trailing {
                b.push('/');
            }
            if let Some(fast) = join_plain(&o, Path::new(&b)) {
                proptest::prop_assert_eq!(
                    (LocationKind::Relative, fast),
                    resolve_general(&o, Path::new(&b))
                );
            }
        }
    }

    #[test]
    fn plain_join_takes_the_common_case() {
        assert_eq!(
            join_plain("Snapshots\\{1}.vdi", Path::new("/vms/TM/")).as_deref(),
            Some("/vms/TM/Snapshots/{1}.vdi")
        );
        assert_eq!(
            join_plain("a.vdi", Path::new("/")).as_deref(),
            Some("/a.vdi")
        );
        for (o, b) in [
            ("../a", "/x"),
            ("a", "rel"),
            ("C:/a", "/x"),
            ("a//b", "/x"),
            ("a", "/x/../y"),
        ] {
            assert_eq!(join_plain(o, Path::new(b)), None, "{o} under {b}");
        }
    }

    #[test]
    fn strip_base_refuses_escapes() {
        let base = Path::new("/vms/TM");
        let inside = Location::resolve("Snapshots/../TM.vdi", base);
        assert_eq!(inside.strip_base(base).unwrap(), PathBuf::from("TM.vdi"));
        assert!(Location::resolve("../Other/x.vdi", base)
            .strip_base(base)
            .is_none());
        assert!(Location::resolve("/etc/passwd", base)
            .strip_base(base)
            .is_none());
        // A sibling folder sharing a prefix is outside.
        assert!(Location::resolve("/vms/TM2/x.vdi", base)
            .strip_base(base)
            .is_none());
        assert!(Location::resolve(".", base).strip_base(base).is_none());
    }
}

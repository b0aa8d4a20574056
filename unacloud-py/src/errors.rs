//! Rust errors → the Python exception hierarchy of `unacloud.errors`.
//!
//! The classes are defined in Python (so that input errors can also subclass
//! `ValueError`, lookups `LookupError` and I/O `OSError`); this module only picks the
//! class for each Rust error kind and builds the message from the whole cause chain.

use std::collections::HashMap;
use std::path::Path;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyType;

/// Formats an error and every `source()` below it as `outer: inner: …`.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cur = s.source();
    }
    msg
}

/// Every class of `unacloud.errors` the extension raises.
const CLASSES: &[&str] = &[
    "UnacloudError",
    "ParseError",
    "InvalidInput",
    "NotFound",
    "AmbiguousName",
    "AlreadyExists",
    "UnresolvedDependency",
    "BrokenChain",
    "CopyError",
    "IoError",
    "FileNotFound",
    "InvalidState",
    "InUse",
    "AccessDenied",
    "Timeout",
    "Unsupported",
    "InsufficientSpace",
    "PlacementError",
    "HypervisorError",
    "ProtocolError",
    "SimulationError",
];

/// The classes, imported from `unacloud.errors` once per interpreter.
static TYPES: GILOnceCell<HashMap<&'static str, Py<PyType>>> = GILOnceCell::new();

fn load(py: Python<'_>) -> PyResult<HashMap<&'static str, Py<PyType>>> {
    let module = py.import("unacloud.errors")?;
    let mut map = HashMap::with_capacity(CLASSES.len());
    for &name in CLASSES {
        let ty = module.getattr(name)?.downcast_into::<PyType>()?;
        map.insert(name, ty.unbind());
    }
    Ok(map)
}

/// The class `unacloud.errors.<class>`, from the cache.
fn class<'py>(py: Python<'py>, class: &str) -> Option<Bound<'py, PyType>> {
    let map = TYPES.get_or_try_init(py, || load(py)).ok()?;
    map.get(class).map(|t| t.bind(py).clone())
}

/// Builds an instance of `unacloud.errors.<class>` with `message`.
pub fn raise(class_name: &str, message: String) -> PyErr {
    Python::with_gil(|py| match class(py, class_name) {
        Some(ty) => PyErr::from_type(ty, message),
        // Only if the pure-Python package is broken: still never a bare panic.
        None => PyRuntimeError::new_err(message),
    })
}

/// An I/O failure on `path` as an `OSError` subclass with `errno` and `filename` set:
/// `FileNotFound` (also a `FileNotFoundError`) for a missing file, `AccessDenied` (a
/// `PermissionError`) for refused access, `IoError` otherwise.
pub fn io_err(path: &Path, source: &std::io::Error, message: String) -> PyErr {
    use std::io::ErrorKind as K;
    let errno = source.raw_os_error().or(match source.kind() {
        K::NotFound => Some(ENOENT),
        K::PermissionDenied => Some(EACCES),
        K::AlreadyExists => Some(EEXIST),
        _ => None,
    });
    let name = match errno {
        Some(ENOENT) => "FileNotFound",
        Some(EACCES) | Some(EPERM) => "AccessDenied",
        _ => "IoError",
    };
    os_err(name, errno, message, path)
}

/// A missing file (`FileNotFound`, errno `ENOENT`).
pub fn missing_file(path: &Path, message: String) -> PyErr {
    os_err("FileNotFound", Some(ENOENT), message, path)
}

fn os_err(class_name: &str, errno: Option<i32>, message: String, path: &Path) -> PyErr {
    Python::with_gil(|py| match (class(py, class_name), errno) {
        // OSError(errno, strerror, filename) sets the three attributes.
        (Some(ty), Some(errno)) => {
            PyErr::from_type(ty, (errno, message, path.display().to_string()))
        }
        (Some(ty), None) => PyErr::from_type(ty, message),
        (None, _) => PyRuntimeError::new_err(message),
    })
}

const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const EACCES: i32 = 13;
const EEXIST: i32 = 17;

/// The Python class for a core error.
pub fn core_class(e: &unacloud_core::Error) -> &'static str {
    use unacloud_core::Error as E;
    match e {
        E::NotFound { .. } => "NotFound",
        E::AmbiguousName { .. } => "AmbiguousName",
        E::AlreadyExists { .. } => "AlreadyExists",
        E::InvalidState { .. } => "InvalidState",
        E::InUse { .. } => "InUse",
        E::AccessDenied { .. } => "AccessDenied",
        E::Timeout { .. } => "Timeout",
        E::Unsupported { .. } => "Unsupported",
        E::InsufficientSpace { .. } => "InsufficientSpace",
        E::UnknownProfile(_) | E::InvalidInput(_) => "InvalidInput",
        E::Unplaceable { .. } => "PlacementError",
        E::Io { .. } => "IoError",
        _ => "HypervisorError",
    }
}

/// Maps a core error.
pub fn core_err(e: unacloud_core::Error) -> PyErr {
    use unacloud_core::error::ImageFailure;
    use unacloud_core::Error as E;
    match &e {
        E::Io { path, source } => io_err(path, source, chain(&e)),
        E::QemuImg {
            path,
            kind: ImageFailure::NotFound,
            ..
        } => missing_file(path, chain(&e)),
        _ => raise(core_class(&e), chain(&e)),
    }
}

/// The Python class for a VirtualBox-crate error.
pub fn vbox_class(e: &unacloud_vbox::Error) -> &'static str {
    use unacloud_vbox::Error as E;
    match e {
        E::InFile { source, .. } => vbox_class(source),
        E::Io { .. } => "IoError",
        E::SnapshotNotFound { .. } => "NotFound",
        E::AmbiguousSnapshotName { .. } => "AmbiguousName",
        E::UnresolvedDependency { .. } => "UnresolvedDependency",
        E::BrokenChain { .. } => "BrokenChain",
        E::CopyRefused { .. }
        | E::CopyFailed { .. }
        | E::CopySizeMismatch { .. }
        | E::ChecksumMismatch { .. } => "CopyError",
        E::Core(c) => core_class(c),
        E::ToolMissing { .. } | E::VBoxManage { .. } | E::VBoxManageTimeout { .. } => {
            "HypervisorError"
        }
        // Everything else is something wrong with the input file: XML, structure,
        // limits, uuids, VDI headers.
        _ => "ParseError",
    }
}

/// Maps a VirtualBox-crate error.
pub fn vbox_err(e: unacloud_vbox::Error) -> PyErr {
    use unacloud_vbox::Error as E;
    match e.innermost() {
        E::Io { path, source } => io_err(path, source, chain(&e)),
        E::Core(unacloud_core::Error::Io { path, source }) => io_err(path, source, chain(&e)),
        _ => raise(vbox_class(&e), chain(&e)),
    }
}

/// Maps a bad argument from Python.
pub fn invalid(message: impl Into<String>) -> PyErr {
    raise("InvalidInput", message.into())
}

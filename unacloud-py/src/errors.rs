//! Rust errors → the Python exception hierarchy of `unacloud.errors`.
//!
//! The classes are defined in Python (so that input errors can also subclass
//! `ValueError`, lookups `LookupError` and I/O `OSError`); this module only picks the
//! class for each Rust error kind and builds the message from the whole cause chain.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
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

/// Builds an instance of `unacloud.errors.<class>` with `message`.
pub fn raise(class: &str, message: String) -> PyErr {
    Python::with_gil(|py| {
        let ty = py
            .import("unacloud.errors")
            .and_then(|m| m.getattr(class))
            .and_then(|c| c.downcast_into::<PyType>().map_err(PyErr::from));
        match ty {
            Ok(ty) => PyErr::from_type(ty, message),
            // Only if the pure-Python package is broken: still never a bare panic.
            Err(_) => PyRuntimeError::new_err(message),
        }
    })
}

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
    raise(core_class(&e), chain(&e))
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
    raise(vbox_class(&e), chain(&e))
}

/// Maps a bad argument from Python.
pub fn invalid(message: impl Into<String>) -> PyErr {
    raise("InvalidInput", message.into())
}

//! Checked arguments from Python: counts and sizes, so that a negative number is the
//! package's `InvalidInput` (a `ValueError`) naming the argument, not pyo3's
//! `OverflowError` in Rust's words, and a wrong type is a `TypeError` saying what was
//! expected.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt};

use crate::errors::invalid;

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".to_owned())
}

/// Unsigned integer types an argument can be converted to.
pub trait Unsigned: TryFrom<u64> {
    /// The largest value, for error messages.
    const MAX: u64;
}

impl Unsigned for u32 {
    const MAX: u64 = u32::MAX as u64;
}

impl Unsigned for u64 {
    const MAX: u64 = u64::MAX;
}

impl Unsigned for usize {
    const MAX: u64 = usize::MAX as u64;
}

/// A non-negative integer argument `name` that fits `T`.
pub fn uint<T: Unsigned>(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<T> {
    if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
        // pyo3 names the argument: "argument 'vms': expected an int, not str".
        return Err(PyTypeError::new_err(format!(
            "expected an int, not {}",
            type_name(obj)
        )));
    }
    let max = T::MAX;
    let value: i128 = obj
        .extract()
        .map_err(|_| invalid(format!("{name} is too large (at most {max})")))?;
    if value < 0 {
        return Err(invalid(format!(
            "{name} must be a non-negative integer, got {value}"
        )));
    }
    u64::try_from(value)
        .ok()
        .and_then(|v| T::try_from(v).ok())
        .ok_or_else(|| invalid(format!("{name} is too large (at most {max}), got {value}")))
}

/// Like [`uint`], with `None` allowed.
pub fn opt_uint<T: Unsigned>(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<T>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => uint(o, name).map(Some),
    }
}

/// A sequence of non-negative integers (`name[i]` in errors).
pub fn uints<T: Unsigned>(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<T>> {
    if obj.is_instance_of::<pyo3::types::PyString>() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a sequence of ints, not str"
        )));
    }
    let iter = obj.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a sequence of ints, not {}",
            type_name(obj)
        ))
    })?;
    iter.enumerate()
        .map(|(i, item)| {
            let item = item?;
            uint(&item, &format!("{name}[{i}]")).map_err(|e| {
                Python::with_gil(|py| {
                    if e.is_instance_of::<PyTypeError>(py) {
                        PyTypeError::new_err(format!("{name}[{i}]: {}", e.value(py)))
                    } else {
                        e
                    }
                })
            })
        })
        .collect()
}

/// A non-negative, finite number of seconds (an int or a float).
pub fn seconds(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<f64> {
    if obj.is_instance_of::<PyBool>()
        || !(obj.is_instance_of::<PyInt>() || obj.is_instance_of::<PyFloat>())
    {
        return Err(PyTypeError::new_err(format!(
            "expected a number of seconds, not {}",
            type_name(obj)
        )));
    }
    let v: f64 = obj.extract()?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(invalid(format!(
            "{name} must be a non-negative number of seconds, got {v}"
        )));
    }
    Ok(v)
}

/// Defines `pub fn $f(&Bound<PyAny>) -> PyResult<$t>` extractors (for pyo3's
/// `from_py_with`) that check the argument `$name`: `uint` for integers, `opt` for
/// integers or None, `secs` for seconds.
macro_rules! extractors {
    ($($kind:ident $f:ident: $t:ty = $name:literal;)*) => {
        $(extractors!(@one $kind $f $t, $name);)*
    };
    (@one uint $f:ident $t:ty, $name:literal) => {
        #[doc = concat!("`", $name, "`: a non-negative integer.")]
        pub fn $f(obj: &Bound<'_, PyAny>) -> PyResult<$t> {
            uint(obj, $name)
        }
    };
    (@one opt $f:ident $t:ty, $name:literal) => {
        #[doc = concat!("`", $name, "`: a non-negative integer or None.")]
        pub fn $f(obj: &Bound<'_, PyAny>) -> PyResult<Option<$t>> {
            opt_uint(Some(obj), $name)
        }
    };
    (@one list $f:ident $t:ty, $name:literal) => {
        #[doc = concat!("`", $name, "`: a sequence of non-negative integers.")]
        pub fn $f(obj: &Bound<'_, PyAny>) -> PyResult<Vec<$t>> {
            uints(obj, $name)
        }
    };
    (@one secs $f:ident $t:ty, $name:literal) => {
        #[doc = concat!("`", $name, "`: a non-negative number of seconds.")]
        pub fn $f(obj: &Bound<'_, PyAny>) -> PyResult<$t> {
            seconds(obj, $name)
        }
    };
}

extractors! {
    uint vms: u32 = "vms";
    uint hosts: u32 = "hosts";
    uint tokens: u64 = "tokens";
    uint snapshots: u32 = "snapshots";
    uint relocate: u32 = "relocate";
    opt spare_hosts: u32 = "spare_hosts";
    uint memory_mb: u64 = "memory_mb";
    opt opt_memory_mb: u64 = "memory_mb";
    opt cpus: u32 = "cpus";
    secs gap_s: f64 = "gap_s";
    uint disks: u32 = "disks";
    uint base_bytes: u64 = "base_bytes";
    uint differencing_bytes: u64 = "differencing_bytes";
    uint saved_state_bytes: u64 = "saved_state_bytes";
    uint settings_bytes: u64 = "settings_bytes";
    opt snapshot: u32 = "snapshot";
    opt opt_seed: u64 = "seed";
    uint seed: u64 = "seed";
    uint nodes: usize = "nodes";
    uint snapshot_every: u64 = "snapshot_every";
    opt crash_at: u64 = "crash_at";
    opt crash_host: usize = "crash_host";
    opt max_steps: u64 = "max_steps";
    uint cluster: u64 = "cluster";
    list participants: u32 = "participants";
    uint participant_id: u32 = "id";
    uint action_id: u64 = "action_id";
    opt gs: u64 = "gs";
    uint max_parallel_hosts: usize = "max_parallel_hosts";
    uint max_attempts: u32 = "max_attempts";
    secs backoff_s: f64 = "backoff_s";
}

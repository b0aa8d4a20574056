//! serde values ↔ plain Python objects (dicts, lists, str, int, float, bool, None).

use pyo3::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::errors::invalid;

/// Any serialisable value as plain Python data.
pub fn to_py<T: Serialize + ?Sized>(py: Python<'_>, value: &T) -> PyResult<PyObject> {
    pythonize::pythonize(py, value)
        .map(|b| b.unbind())
        .map_err(|e| invalid(format!("cannot convert result to Python: {e}")))
}

/// Plain Python data as a serde value; a mismatch is an `InvalidInput` naming `what`.
pub fn from_py<T: DeserializeOwned>(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<T> {
    pythonize::depythonize(obj).map_err(|e| invalid(format!("invalid {what}: {e}")))
}

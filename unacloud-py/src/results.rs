//! What the result classes share: records for pandas, and signal checks in long loops.

use std::time::{Duration, Instant};

use pyo3::exceptions::PyImportError;
use pyo3::prelude::*;

/// How often a long call running on this thread looks for signals.
pub const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// `pandas.DataFrame(records)`, importing pandas only now; `what` names the method for
/// the error when pandas is missing.
pub fn dataframe(py: Python<'_>, records: PyObject, what: &str) -> PyResult<PyObject> {
    let pandas = py.import("pandas").map_err(|e| {
        PyImportError::new_err(format!(
            "{what} needs pandas, which is not installed (pip install pandas): {e}"
        ))
    })?;
    Ok(pandas.getattr("DataFrame")?.call1((records,))?.unbind())
}

/// Rate-limits work done between pieces of a long computation running without the GIL:
/// `due()` is true at most once per [`SIGNAL_CHECK`], cheaply (the clock is read every
/// 256 calls only).
#[derive(Debug)]
pub struct Ticker {
    last: Instant,
    calls: u32,
}

impl Ticker {
    /// A ticker whose first tick is one period from now.
    pub fn new() -> Self {
        Ticker {
            last: Instant::now(),
            calls: 0,
        }
    }

    /// Whether a period has passed since the last tick (and starts the next one).
    pub fn due(&mut self) -> bool {
        self.calls = self.calls.wrapping_add(1);
        if self.calls % 256 != 0 || self.last.elapsed() < SIGNAL_CHECK {
            return false;
        }
        self.last = Instant::now();
        true
    }
}

//! Running the Rust crates' async calls from Python: on a tokio runtime the calling
//! object owns, with the GIL released, and interruptible by Ctrl-C.

use std::future::Future;
use std::time::Duration;

use pyo3::prelude::*;

use crate::errors::raise;

/// How often a running call looks for signals (Ctrl-C raises `KeyboardInterrupt` within
/// this long).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// A two-worker runtime (the machines this runs on are small; QEMU does the work).
pub fn new_runtime() -> PyResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("unacloud")
        .enable_all()
        .build()
        .map_err(|e| {
            raise(
                "UnacloudError",
                format!("cannot start the async runtime: {e}"),
            )
        })
}

/// Runs `fut` to completion on `rt` with the GIL released. Every 100 ms the GIL is
/// taken back briefly to run Python's signal handlers; if one raises (Ctrl-C:
/// `KeyboardInterrupt`), the future is dropped, which cancels the operation (the
/// crates' futures are cancellation-safe, and tear down what they started), and the
/// handler's exception is returned.
pub fn block_on<F>(py: Python<'_>, rt: &tokio::runtime::Runtime, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    py.allow_threads(|| {
        rt.block_on(async move {
            let mut fut = std::pin::pin!(fut);
            let mut tick = tokio::time::interval(SIGNAL_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    out = &mut fut => return Ok(out),
                    _ = tick.tick() => {
                        Python::with_gil(|py| py.check_signals())?;
                    }
                }
            }
        })
    })
}

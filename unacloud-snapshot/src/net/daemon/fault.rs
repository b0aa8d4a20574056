//! Fault injection for tests: a host that powers itself off after a given phase-2 step.

use super::*;

/// Fault injection for tests: the process kills itself with SIGKILL right after one
/// step (1–6) of phase 2 completed at this host, as a host powered off mid-snapshot.
/// Steps are recognised in sequence (colour PRE, drop POST, local snapshot, colour POST,
/// accept POST, clear colour), so actions outside phase 2 never trigger it.
#[derive(Debug)]
pub(crate) struct CrashAfterStep {
    inner: Arc<dyn HostActions>,
    step: u8,
    reached: Arc<std::sync::atomic::AtomicU8>,
}

impl CrashAfterStep {
    /// Wraps `inner`; `step` is 1–6 in the thesis's numbering.
    pub(crate) fn new(inner: Arc<dyn HostActions>, step: u8) -> Self {
        Self {
            inner,
            step,
            reached: Arc::new(std::sync::atomic::AtomicU8::new(0)),
        }
    }
}

impl HostActions for CrashAfterStep {
    fn perform(
        &self,
        action: crate::protocol::HostAction,
    ) -> futures::future::BoxFuture<'static, crate::protocol::ActionOutcome> {
        use crate::protocol::{Colour, HostAction};
        use futures::FutureExt;
        use std::sync::atomic::Ordering;
        let before = self.reached.load(Ordering::SeqCst);
        let n = match (&action, before) {
            (HostAction::SetOutgoingColour(Colour::Pre), _) => 1,
            (HostAction::DropIncoming(_), 1) => 2,
            (HostAction::TakeLocalSnapshots { .. }, 2) => 3,
            (HostAction::SetOutgoingColour(Colour::Post), 3) => 4,
            (HostAction::AcceptIncoming(_), 4) => 5,
            (HostAction::ClearColour, 5) => 6,
            _ => before,
        };
        self.reached.store(n, Ordering::SeqCst);
        let crash = n == self.step && before != n;
        let fut = self.inner.perform(action);
        async move {
            let out = fut.await;
            if crash {
                tracing::error!(step = n, "fault injection: this host powers off now");
                let _ = nix::sys::signal::kill(
                    nix::unistd::getpid(),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            out
        }
        .boxed()
    }

    fn shutdown(&self) -> futures::future::BoxFuture<'static, HostSummary> {
        self.inner.shutdown()
    }
}

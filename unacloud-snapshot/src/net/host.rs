//! Performing the protocol's host actions for one VM: packet colouring through a
//! [`ColourBackend`] and the local snapshot through a pluggable [`LocalSnapshot`].

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::colour::exec::run_argv;
use crate::colour::{Colour, ColourBackend};
use crate::net::{Error, Result};
use crate::protocol::{ActionOutcome, GlobalSnapshotId, HostAction};

/// Performs host actions for a state machine. Object safe; drivers hold an
/// `Arc<dyn HostActions>`.
pub trait HostActions: Send + Sync + fmt::Debug {
    /// Performs `action`; never panics, failures are [`ActionOutcome::Failed`].
    fn perform(&self, action: HostAction) -> BoxFuture<'static, ActionOutcome>;

    /// Final cleanup when the node stops: removes every rule and reports counters.
    fn shutdown(&self) -> BoxFuture<'static, HostSummary>;
}

/// What a host did, reported when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostSummary {
    /// Packets the POST filter dropped (kernel counters).
    pub post_packets_dropped: u64,
    /// Our rule objects still present after the final removal (0 unless it failed).
    pub leftovers: usize,
    /// Error text if the final removal failed.
    pub error: Option<String>,
}

/// How a VM's local snapshot is taken.
#[derive(Debug, Clone)]
pub enum LocalSnapshot {
    /// Lab method: freeze a process with SIGSTOP for `hold`, then SIGCONT — as a live VM
    /// snapshot pauses the VM (it captures no state, so hosts of this kind cannot
    /// restore). SIGCONT is sent even if the action is cancelled.
    Freeze {
        /// The process standing in for the VM.
        pid: i32,
        /// How long it stays frozen.
        hold: Duration,
    },
    /// Lab method: run a command; `{vm}` and `{gs}` in its arguments are replaced by the
    /// VM name and the global snapshot number (for a hypervisor without a backend
    /// of its own; restoring and starting need [`LocalSnapshot::Hypervisor`]).
    Command {
        /// The argv template.
        argv: Vec<String>,
        /// Bound on its run time.
        timeout: Duration,
    },
    /// Test method: only wait (tests and dry runs; captures nothing).
    Sleep(Duration),
    /// Through a hypervisor (feature `hypervisor`): the phase-1 check asks whether the
    /// VM runs and whether its host has room for the snapshot (the VM's memory plus
    /// `margin` bytes free where its settings live); the local snapshot is a snapshot
    /// named `gs-<n>` (live when `live`), `RestoreLocal` powers the VM off if needed and
    /// restores that snapshot, `StartVms` starts it headless.
    #[cfg(feature = "hypervisor")]
    Hypervisor {
        /// The backend that runs the VM.
        hv: Arc<dyn unacloud_core::hypervisor::Hypervisor>,
        /// Keep the VM running while its memory is written.
        live: bool,
        /// Free bytes required beyond the VM's memory.
        margin: u64,
    },
}

/// The name of the local snapshot that belongs to global snapshot `gs`.
pub fn local_snapshot_name(gs: GlobalSnapshotId) -> String {
    format!("gs-{}", gs.0)
}

/// Sends SIGCONT when dropped, so a frozen process is never left stopped.
struct Thaw(Pid);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// The host of one VM: colouring backend plus local-snapshot method.
pub struct VmHost {
    inner: Arc<Inner>,
    fast: bool,
}

struct Inner {
    vm: String,
    host: String,
    colour: Mutex<Box<dyn ColourBackend>>,
    installed: AtomicBool,
    dropped_before: AtomicU64,
    snapshot: LocalSnapshot,
    /// A live snapshot past its point whose guest waits for the POST colour, or whose
    /// state is still being written.
    staged: Mutex<Option<Staged>>,
}

/// A live local snapshot between its point and its durability.
struct Staged {
    gs: GlobalSnapshotId,
    /// Lets the paused guest run on (sent once the VM's traffic is coloured POST).
    release: Option<tokio::sync::oneshot::Sender<()>>,
    /// The snapshot call, which ends when the state is on disk.
    done: tokio::task::JoinHandle<std::result::Result<(), String>>,
    started: Instant,
    /// Set when the guest ran on because [`POINT_HOLD_LIMIT`] passed before step 4: it
    /// ran past its point with its traffic not yet coloured POST, so this local snapshot
    /// cannot be part of a consistent global snapshot.
    ran_on_uncoloured: Arc<AtomicBool>,
}

/// How long a guest paused at its snapshot point waits for the POST colour before it
/// runs on anyway (a protocol that stalls never keeps a VM paused). A guest that ran on
/// this way sent traffic past its point uncoloured, so `AwaitDurable` then fails.
pub const POINT_HOLD_LIMIT: Duration = Duration::from_secs(5);

impl Inner {
    fn lock_staged(&self) -> Result<MutexGuard<'_, Option<Staged>>> {
        self.staged.lock().map_err(|_| Error::LocalSnapshot {
            vm: self.vm.clone(),
            reason: "snapshot state lock poisoned by an earlier panic".to_string(),
        })
    }

    /// Colours the VM's traffic POST now if the backend is fast and installed; whether it
    /// did.
    #[cfg(feature = "hypervisor")]
    fn colour_post_now(&self) -> bool {
        if !self.installed.load(Ordering::SeqCst) {
            return false;
        }
        let Ok(mut backend) = self.lock_colour() else {
            return false;
        };
        if !backend.is_fast() {
            return false;
        }
        match backend.set_outgoing(Some(Colour::Post)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(vm = %self.vm, error = %e, "colouring POST at the snapshot point failed; the guest waits for step 4");
                false
            }
        }
    }

    /// Lets a guest paused at its snapshot point run on.
    fn release_guest(&self) {
        let mut guard = match self.staged.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(r) = guard.as_mut().and_then(|s| s.release.take()) {
            let _ = r.send(());
        }
    }

    fn lock_colour(&self) -> Result<MutexGuard<'_, Box<dyn ColourBackend>>> {
        self.colour.lock().map_err(|_| Error::NftSession {
            place: self.vm.clone(),
            reason: "colour backend lock poisoned by an earlier panic".to_string(),
        })
    }
}

/// Runs a backend call on a blocking thread.
async fn on_blocking_thread<T: Send + 'static>(
    call: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| Error::NftSession {
            place: "colour backend".to_string(),
            reason: format!("blocking task failed: {e}"),
        })?
}

impl fmt::Debug for VmHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmHost")
            .field("vm", &self.inner.vm)
            .field("snapshot", &self.inner.snapshot)
            .finish()
    }
}

impl VmHost {
    /// A host for VM `vm`. The backend's chains/table are installed now (idle state), so
    /// the first step of a global snapshot only changes one rule.
    pub fn new(
        vm: impl Into<String>,
        colour: Box<dyn ColourBackend>,
        snapshot: LocalSnapshot,
    ) -> Result<Self> {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "this host".to_string());
        Self::on_host(host, vm, colour, snapshot)
    }

    /// Like [`VmHost::new`], naming the host (as refusals and errors show it) instead of
    /// using this machine's host name — for several emulated PCs on one machine.
    pub fn on_host(
        host: impl Into<String>,
        vm: impl Into<String>,
        mut colour: Box<dyn ColourBackend>,
        snapshot: LocalSnapshot,
    ) -> Result<Self> {
        colour.install()?;
        let fast = colour.is_fast();
        Ok(Self {
            fast,
            inner: Arc::new(Inner {
                vm: vm.into(),
                host: host.into(),
                colour: Mutex::new(colour),
                installed: AtomicBool::new(true),
                dropped_before: AtomicU64::new(0),
                snapshot,
                staged: Mutex::new(None),
            }),
        })
    }

    /// Runs `f` on the backend on a blocking thread, installing first if needed.
    async fn with_colour<T: Send + 'static>(
        inner: &Arc<Inner>,
        fast: bool,
        f: impl FnOnce(&mut dyn ColourBackend) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = inner.clone();
        let call = move || {
            let mut guard = inner.lock_colour()?;
            if !inner.installed.load(Ordering::SeqCst) {
                guard.install()?;
                inner.installed.store(true, Ordering::SeqCst);
            }
            f(guard.as_mut())
        };
        if fast {
            // A session answers in a fraction of a millisecond: two thread hops would
            // cost more than the call.
            return call();
        }
        on_blocking_thread(call).await
    }

    async fn clear_all(inner: &Arc<Inner>) -> Result<()> {
        let inner = inner.clone();
        on_blocking_thread(move || {
            let mut guard = inner.lock_colour()?;
            if inner.installed.load(Ordering::SeqCst) {
                let dropped = guard.post_packets_dropped().unwrap_or(0);
                inner.dropped_before.fetch_add(dropped, Ordering::SeqCst);
            }
            guard.remove()?;
            inner.installed.store(false, Ordering::SeqCst);
            Ok(())
        })
        .await
    }

    async fn take_snapshot(inner: Arc<Inner>, gs: GlobalSnapshotId) -> Result<ActionOutcome> {
        let start = Instant::now();
        #[cfg(feature = "hypervisor")]
        if let LocalSnapshot::Hypervisor { hv, live: true, .. } = &inner.snapshot {
            return Self::take_staged(&inner, hv.clone(), gs, start).await;
        }
        match &inner.snapshot {
            LocalSnapshot::Freeze { pid, hold } => {
                let pid = Pid::from_raw(*pid);
                kill(pid, Signal::SIGSTOP).map_err(|e| Error::LocalSnapshot {
                    vm: inner.vm.clone(),
                    reason: format!("cannot stop process {pid}: {e}"),
                })?;
                let thaw = Thaw(pid);
                tokio::time::sleep(*hold).await;
                drop(thaw);
            }
            LocalSnapshot::Sleep(d) => tokio::time::sleep(*d).await,
            #[cfg(feature = "hypervisor")]
            LocalSnapshot::Hypervisor { hv, live, .. } => {
                hv.take_snapshot(
                    &inner.vm.as_str().into(),
                    &local_snapshot_name(gs),
                    None,
                    *live,
                )
                .await
                .map_err(|e| Error::LocalSnapshot {
                    vm: inner.vm.clone(),
                    reason: chain(&e),
                })?;
            }
            LocalSnapshot::Command { argv, timeout } => {
                let argv: Vec<String> = argv
                    .iter()
                    .map(|a| {
                        a.replace("{vm}", &inner.vm)
                            .replace("{gs}", &gs.0.to_string())
                    })
                    .collect();
                let timeout = *timeout;
                let vm = inner.vm.clone();
                let out = tokio::task::spawn_blocking(move || run_argv(&argv, timeout))
                    .await
                    .map_err(|e| Error::LocalSnapshot {
                        vm: vm.clone(),
                        reason: format!("snapshot task failed: {e}"),
                    })??;
                if !out.success() {
                    return Err(Error::LocalSnapshot {
                        vm,
                        reason: format!(
                            "snapshot command exited with {:?}: {}",
                            out.code,
                            out.stderr.trim()
                        ),
                    });
                }
            }
        }
        Ok(ActionOutcome::SnapshotTaken {
            local_time: start.elapsed(),
        })
    }

    /// A live snapshot through the hypervisor in its two moments: answers
    /// `SnapshotPoint` while the guest is paused at the point; the guest runs on once
    /// step 4 coloured its traffic POST ([`Inner::release_guest`]); `AwaitDurable` waits
    /// for the rest.
    #[cfg(feature = "hypervisor")]
    async fn take_staged(
        inner: &Arc<Inner>,
        hv: Arc<dyn unacloud_core::hypervisor::Hypervisor>,
        gs: GlobalSnapshotId,
        start: Instant,
    ) -> Result<ActionOutcome> {
        let (point_tx, point_rx) = tokio::sync::oneshot::channel::<Instant>();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let ran_on_uncoloured = Arc::new(AtomicBool::new(false));
        let hold_expired = ran_on_uncoloured.clone();
        let at_point = inner.clone();
        let hook: unacloud_core::hypervisor::AtPoint = Box::pin(async move {
            // Step 4 at the point itself, while the guest is paused, when the backend
            // answers in well under a millisecond: the guest's pause is then the point
            // plus one rule change, without a round trip through the state machine (whose
            // own step 4 finds the colour already set). Otherwise the guest waits for it.
            let coloured = at_point.colour_post_now();
            let _ = point_tx.send(Instant::now());
            if coloured {
                return;
            }
            if tokio::time::timeout(POINT_HOLD_LIMIT, release_rx)
                .await
                .is_err()
            {
                hold_expired.store(true, Ordering::SeqCst);
            }
        });
        let vm = inner.vm.clone();
        let name = local_snapshot_name(gs);
        let done = tokio::spawn(async move {
            hv.take_snapshot_at_point(&vm.as_str().into(), &name, None, hook)
                .await
                .map(drop)
                .map_err(|e| chain(&e))
        });
        match point_rx.await {
            Ok(at) => {
                let previous = inner.lock_staged()?.replace(Staged {
                    gs,
                    release: Some(release_tx),
                    done,
                    started: start,
                    ran_on_uncoloured,
                });
                if let Some(mut p) = previous {
                    // An abandoned earlier one: let its guest run, let it finish alone.
                    if let Some(r) = p.release.take() {
                        let _ = r.send(());
                    }
                }
                Ok(ActionOutcome::SnapshotPoint {
                    local_time: at.saturating_duration_since(start),
                })
            }
            // The snapshot failed before its point: report why.
            Err(_) => {
                let reason = match done.await {
                    Ok(Err(reason)) => reason,
                    Ok(Ok(())) => "the snapshot ended without reaching its point".to_string(),
                    Err(e) => format!("snapshot task failed: {e}"),
                };
                Err(Error::LocalSnapshot {
                    vm: inner.vm.clone(),
                    reason,
                })
            }
        }
    }

    /// Waits until the staged snapshot of `gs` is on disk.
    async fn await_durable(inner: &Arc<Inner>, gs: GlobalSnapshotId) -> Result<ActionOutcome> {
        let staged = inner.lock_staged()?.take();
        let Some(mut staged) = staged.filter(|s| s.gs == gs) else {
            return Err(Error::LocalSnapshot {
                vm: inner.vm.clone(),
                reason: format!(
                    "no local snapshot of global snapshot {} is being written",
                    gs.0
                ),
            });
        };
        if let Some(r) = staged.release.take() {
            let _ = r.send(());
        }
        match staged.done.await {
            Ok(Ok(())) if staged.ran_on_uncoloured.load(Ordering::SeqCst) => {
                Err(Error::LocalSnapshot {
                    vm: inner.vm.clone(),
                    reason: format!(
                        "the guest ran on after {POINT_HOLD_LIMIT:?} at its snapshot point \
                         before its traffic was coloured POSTSNAPSHOT (step 4 too slow); \
                         the local snapshot of global snapshot {} is not consistent",
                        gs.0
                    ),
                })
            }
            Ok(Ok(())) => Ok(ActionOutcome::SnapshotDurable {
                total_time: staged.started.elapsed(),
            }),
            Ok(Err(reason)) => Err(Error::LocalSnapshot {
                vm: inner.vm.clone(),
                reason,
            }),
            Err(e) => Err(Error::LocalSnapshot {
                vm: inner.vm.clone(),
                reason: format!("snapshot task failed: {e}"),
            }),
        }
    }

    /// The phase-1 answer: whether the VM runs (and, through a hypervisor, whether its
    /// host has room for the snapshot). A refusal carries its reason, so the coordinator's
    /// failure names the VM, the bytes needed and the bytes free.
    async fn check(inner: &Inner) -> ActionOutcome {
        match &inner.snapshot {
            LocalSnapshot::Freeze { pid, .. } => {
                if kill(Pid::from_raw(*pid), None).is_ok() {
                    ActionOutcome::VmsRunning(true)
                } else {
                    ActionOutcome::Failed(format!(
                        "host {}: VM {}: process {pid} does not exist",
                        inner.host, inner.vm
                    ))
                }
            }
            #[cfg(feature = "hypervisor")]
            LocalSnapshot::Hypervisor { hv, margin, .. } => {
                match hypervisor_ready(hv.as_ref(), &inner.vm, *margin).await {
                    Ok(()) => ActionOutcome::VmsRunning(true),
                    Err(why) => {
                        tracing::warn!(vm = %inner.vm, "not ready for a global snapshot: {why}");
                        ActionOutcome::Failed(format!("host {}: {why}", inner.host))
                    }
                }
            }
            _ => ActionOutcome::VmsRunning(true),
        }
    }

    #[cfg(feature = "hypervisor")]
    async fn restore(inner: &Inner, gs: GlobalSnapshotId) -> Result<()> {
        use unacloud_core::hypervisor::Hypervisor as _;
        let LocalSnapshot::Hypervisor { hv, .. } = &inner.snapshot else {
            return Err(cannot_resume(inner));
        };
        let id = inner.vm.as_str().into();
        let fail = |e: unacloud_core::Error| Error::LocalSnapshot {
            vm: inner.vm.clone(),
            reason: chain(&e),
        };
        let state = hv.vm_info(&id).await.map_err(fail)?.state;
        if !state.is_startable() {
            hv.power_off(&id).await.map_err(fail)?;
        }
        hv.restore_snapshot(&id, &local_snapshot_name(gs))
            .await
            .map_err(fail)
    }

    #[cfg(feature = "hypervisor")]
    async fn start(inner: &Inner) -> Result<()> {
        let LocalSnapshot::Hypervisor { hv, .. } = &inner.snapshot else {
            return Err(cannot_resume(inner));
        };
        let id = inner.vm.as_str().into();
        let state = hv
            .vm_info(&id)
            .await
            .map_err(|e| Error::LocalSnapshot {
                vm: inner.vm.clone(),
                reason: chain(&e),
            })?
            .state;
        if state.is_running() {
            // Started already (a retried START): nothing to do.
            return Ok(());
        }
        hv.start_vm(&id, unacloud_core::hypervisor::StartMode::Headless)
            .await
            .map_err(|e| Error::LocalSnapshot {
                vm: inner.vm.clone(),
                reason: chain(&e),
            })
    }
}

/// Restoring and starting need a local snapshot that captures the VM's state.
fn cannot_resume(inner: &Inner) -> Error {
    Error::LocalSnapshot {
        vm: inner.vm.clone(),
        reason: "this host cannot restore or start VMs (its local snapshot does not capture \
                 state; use LocalSnapshot::Hypervisor)"
            .to_string(),
    }
}

#[cfg(feature = "hypervisor")]
use crate::net::error::error_chain as chain;

/// Whether `vm` runs and its host has room for a snapshot with memory; the reason
/// when not (naming the VM, the bytes needed and the bytes free).
#[cfg(feature = "hypervisor")]
pub async fn hypervisor_ready(
    hv: &dyn unacloud_core::hypervisor::Hypervisor,
    vm: &str,
    margin: u64,
) -> std::result::Result<(), String> {
    let info = hv.vm_info(&vm.into()).await.map_err(|e| chain(&e))?;
    if !info.state.is_running() {
        return Err(format!("VM {vm} is {}", info.state));
    }
    let place = info
        .settings_file
        .as_ref()
        .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    let space = hv.host_disk_space(&place).await.map_err(|e| chain(&e))?;
    let needed = info
        .memory_mb
        .saturating_mul(1 << 20)
        .saturating_add(margin);
    if space.available < needed {
        return Err(format!(
            "no room for the local snapshot of VM {vm} at {}: needs {needed} bytes, has {}",
            place.display(),
            space.available
        ));
    }
    Ok(())
}

fn failed(e: Error) -> ActionOutcome {
    ActionOutcome::Failed(e.to_string())
}

impl HostActions for VmHost {
    fn perform(&self, action: HostAction) -> BoxFuture<'static, ActionOutcome> {
        let inner = self.inner.clone();
        let fast = self.fast;
        let kind = action.kind();
        async move {
            let t0 = Instant::now();
            let res: Result<ActionOutcome> = match action {
                HostAction::CheckVmsRunning { .. } => Ok(Self::check(&inner).await),
                HostAction::SetOutgoingColour(c) => {
                    let res = Self::with_colour(&inner, fast, move |b| b.set_outgoing(Some(c)))
                        .await
                        .map(|()| ActionOutcome::Done);
                    if c == Colour::Post {
                        // Step 4 done: a guest paused at its snapshot point runs on, its
                        // traffic already POST.
                        inner.release_guest();
                    }
                    res
                }
                HostAction::DropIncoming(Colour::Post) => {
                    Self::with_colour(&inner, fast, |b| b.set_drop_post(true))
                        .await
                        .map(|()| ActionOutcome::Done)
                }
                HostAction::AcceptIncoming(Colour::Post) => {
                    Self::with_colour(&inner, fast, |b| b.set_drop_post(false))
                        .await
                        .map(|()| ActionOutcome::Done)
                }
                HostAction::DropIncoming(Colour::Pre) | HostAction::AcceptIncoming(Colour::Pre) => {
                    Ok(ActionOutcome::Failed(
                        "filtering PRESNAPSHOT traffic is not part of the protocol".to_string(),
                    ))
                }
                HostAction::ClearColour => Self::with_colour(&inner, fast, |b| b.set_outgoing(None))
                    .await
                    .map(|()| ActionOutcome::Done),
                HostAction::ClearAll => {
                    inner.release_guest();
                    Self::clear_all(&inner).await.map(|()| ActionOutcome::Done)
                }
                HostAction::TakeLocalSnapshots { gs, .. } => {
                    Self::take_snapshot(inner.clone(), gs).await
                }
                // Only issued after `SnapshotPoint` (a live snapshot through a hypervisor).
                HostAction::AwaitDurable { gs, .. } => Self::await_durable(&inner, gs).await,
                #[cfg(feature = "hypervisor")]
                HostAction::RestoreLocal { gs, .. } => {
                    Self::restore(&inner, gs).await.map(|()| ActionOutcome::Done)
                }
                #[cfg(feature = "hypervisor")]
                HostAction::StartVms { .. } => {
                    Self::start(&inner).await.map(|()| ActionOutcome::Done)
                }
                #[cfg(not(feature = "hypervisor"))]
                HostAction::RestoreLocal { .. } | HostAction::StartVms { .. } => {
                    Err(cannot_resume(&inner))
                }
            };
            let out = res.unwrap_or_else(failed);
            tracing::debug!(vm = %inner.vm, action = kind, took_us = t0.elapsed().as_micros() as u64, "host action done");
            out
        }
        .boxed()
    }

    fn shutdown(&self) -> BoxFuture<'static, HostSummary> {
        let inner = self.inner.clone();
        inner.release_guest();
        async move {
            let res = tokio::task::spawn_blocking(move || {
                let mut guard = match inner.colour.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                let mut summary = HostSummary::default();
                let now = if inner.installed.load(Ordering::SeqCst) {
                    guard.post_packets_dropped().unwrap_or(0)
                } else {
                    0
                };
                summary.post_packets_dropped = inner.dropped_before.load(Ordering::SeqCst) + now;
                if let Err(e) = guard.remove() {
                    summary.error = Some(e.to_string());
                }
                inner.installed.store(false, Ordering::SeqCst);
                summary.leftovers = match guard.leftovers() {
                    Ok(n) => n,
                    Err(e) => {
                        summary.error.get_or_insert(e.to_string());
                        0
                    }
                };
                summary
            })
            .await;
            res.unwrap_or_else(|e| HostSummary {
                error: Some(format!("cleanup task failed: {e}")),
                ..HostSummary::default()
            })
        }
        .boxed()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last owner gone without `shutdown` (error path, panic, cancelled task): never leave
        // a host dropping traffic.
        if self.installed.load(Ordering::SeqCst) {
            let backend = match self.colour.get_mut() {
                Ok(b) => b,
                Err(p) => p.into_inner(),
            };
            if let Err(e) = backend.remove() {
                tracing::error!(vm = %self.vm, error = %e, "could not remove packet-colouring rules");
            }
        }
    }
}

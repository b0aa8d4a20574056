//! The hypervisor abstraction.
//!
//! [`Hypervisor`] is the one trait every backend implements (VirtualBox through
//! `VBoxManage`, QEMU/KVM through `qemu-img`, and the in-memory test double). It is
//! object-safe and `Send + Sync`, so services hold an `Arc<dyn Hypervisor>`.
//!
//! Backends may leave operations they cannot perform on a machine to the default
//! methods, which return [`Error::Unsupported`] naming the backend and the operation.
//!
//! Every future returned by the trait is cancellation-safe in the sense that dropping it
//! never leaves the *library* in an inconsistent state; the hypervisor itself may have
//! finished the operation. Wrap a backend in [`WithTimeouts`] to bound every call.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::MigrationSet;
use crate::model::{DiskInfo, DiskSpace, DiskType, Uuid, VmId, VmInfo, VmSpec};
use crate::tree::SnapshotTree;

/// What [`Hypervisor::take_snapshot_at_point`] awaits at a live snapshot's point, while
/// the guest is paused with its state fixed.
pub type AtPoint = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// How to start a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum StartMode {
    /// No window (`--type headless`): how a desktop cloud runs VMs beside students.
    #[default]
    Headless,
    /// With a window on the host's display.
    Gui,
}

/// Identifies a disk to a hypervisor: by uuid or by file path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskRef {
    /// By the image's uuid.
    Uuid(Uuid),
    /// By the image's location.
    Path(PathBuf),
}

impl fmt::Display for DiskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskRef::Uuid(u) => write!(f, "{u}"),
            DiskRef::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Where and how to attach a disk to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachSpec {
    /// The disk to attach. For a [`DiskType::MultiAttach`] disk the backend creates a
    /// differencing child for this VM and attaches that instead.
    pub disk: DiskRef,
    /// Storage controller name; created by the backend if missing.
    pub controller: String,
    /// Port on the controller.
    pub port: u32,
    /// Device on the port.
    pub device: u32,
}

impl AttachSpec {
    /// Attaches `disk` at port 0, device 0 of a controller named `SATA`.
    pub fn sata(disk: DiskRef) -> Self {
        AttachSpec {
            disk,
            controller: "SATA".to_owned(),
            port: 0,
            device: 0,
        }
    }
}

/// What a clone should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSpec {
    /// The new VM's name.
    pub name: String,
    /// Clone the state at this snapshot (id or name) instead of the current state.
    pub snapshot: Option<String>,
    /// A linked clone shares its source's disks through differencing images instead of
    /// copying them.
    pub linked: bool,
}

/// The result of taking a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    /// The backend's identifier of the new snapshot.
    pub id: String,
    /// Its name.
    pub name: String,
}

/// A command to run inside a guest (the thesis sets packet colours inside each VM this
/// way, through the guest additions).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCommand {
    /// Absolute path of the program inside the guest.
    pub program: String,
    /// Its arguments (argv\[1..\]).
    pub args: Vec<String>,
    /// Guest user name.
    pub username: String,
    /// Guest password; never logged, never printed by `Debug` and never serialized
    /// (it is read when deserializing, so a configuration file can carry it, but a
    /// JSON dump of a command never does).
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    /// Time limit inside the guest.
    pub timeout: Option<Duration>,
}

impl fmt::Debug for GuestCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestCommand")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What a guest command printed and returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestOutput {
    /// Exit status of the program.
    pub exit_code: i32,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// The abstraction over a hypervisor that the whole family is written against.
///
/// See the module documentation for the error and cancellation contract.
#[async_trait]
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// Short backend name used in errors ("virtualbox", "qemu", "in-memory").
    fn backend(&self) -> &str;

    // ---- VMs -------------------------------------------------------------------------

    /// Every VM registered with the hypervisor.
    async fn list_vms(&self) -> Result<Vec<VmInfo>>;
    /// One VM's details.
    async fn vm_info(&self, vm: &VmId) -> Result<VmInfo>;
    /// Creates and registers a VM with no disks.
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo>;
    /// Registers an existing VM from its settings file (after copying it from another
    /// host).
    async fn register_vm(&self, settings: &Path) -> Result<VmInfo>;
    /// Unregisters a VM; with `delete_files` also deletes its settings, its own disks and
    /// saved states (never a multiattach template it uses).
    async fn unregister_vm(&self, vm: &VmId, delete_files: bool) -> Result<()>;
    /// Clones a VM.
    async fn clone_vm(&self, source: &VmId, spec: &CloneSpec) -> Result<VmInfo>;

    // ---- power -----------------------------------------------------------------------

    /// Starts a VM (from its saved state if it has one).
    async fn start_vm(&self, vm: &VmId, mode: StartMode) -> Result<()>;
    /// Pulls the virtual power cord.
    async fn power_off(&self, vm: &VmId) -> Result<()>;
    /// Saves the VM's memory to disk and stops it.
    async fn save_state(&self, vm: &VmId) -> Result<()>;
    /// Pauses a running VM.
    async fn pause(&self, vm: &VmId) -> Result<()>;
    /// Resumes a paused VM.
    async fn resume(&self, vm: &VmId) -> Result<()>;

    // ---- snapshots -------------------------------------------------------------------

    /// Takes a snapshot; `live` keeps a running VM running while it is taken.
    async fn take_snapshot(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        live: bool,
    ) -> Result<SnapshotRef>;
    /// Takes a live snapshot of a running VM in its two moments: the *snapshot point*,
    /// when the state the snapshot holds is fixed, and *durability*, when it is on disk.
    /// `at_point` is awaited at the point, while the guest is still paused, before it
    /// runs on; the call returns once the snapshot is durable. A caller that must act
    /// before the guest executes past the point (a global snapshot switches the VM's
    /// packet colour there) does it in `at_point`. If the snapshot fails before its
    /// point, `at_point` is dropped without being awaited.
    ///
    /// The default pauses the VM, awaits `at_point`, takes the snapshot of the paused VM
    /// and resumes it: correct for every backend, but the guest stays paused until the
    /// snapshot is durable. Backends that can let the guest run while its memory is
    /// written (QEMU's background snapshot) override it.
    ///
    /// ```
    /// # async fn demo(hv: &dyn unacloud_core::hypervisor::Hypervisor) -> unacloud_core::Result<()> {
    /// let vm = unacloud_core::model::VmId::from("pc-1");
    /// let (tx, rx) = tokio::sync::oneshot::channel();
    /// let snap = hv
    ///     .take_snapshot_at_point(&vm, "gs-7", None, Box::pin(async move {
    ///         // The guest is paused with its state fixed: act, then let it run on.
    ///         let _ = tx.send(std::time::Instant::now());
    ///     }))
    ///     .await?;
    /// println!("{} durable; its point was at {:?}", snap.name, rx.await.ok());
    /// # Ok(()) }
    /// ```
    async fn take_snapshot_at_point(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        at_point: AtPoint,
    ) -> Result<SnapshotRef> {
        self.pause(vm).await?;
        at_point.await;
        let taken = self.take_snapshot(vm, name, description, true).await;
        let resumed = self.resume(vm).await;
        let snap = taken?;
        resumed?;
        Ok(snap)
    }
    /// Restores a snapshot (by id or unique name); the VM must not be running.
    async fn restore_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()>;
    /// Deletes a snapshot, merging its differencing images.
    async fn delete_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()>;
    /// The VM's snapshot tree with the current-state position.
    async fn snapshot_tree(&self, vm: &VmId) -> Result<SnapshotTree>;

    // ---- disks -----------------------------------------------------------------------

    /// Every registered disk.
    async fn list_disks(&self) -> Result<Vec<DiskInfo>>;
    /// Registers an existing image file in the media registry.
    async fn register_disk(&self, path: &Path) -> Result<DiskInfo>;
    /// Unregisters a disk; with `delete_file` also deletes the image. Refused with
    /// [`Error::InUse`] while VMs use it.
    async fn unregister_disk(&self, disk: &DiskRef, delete_file: bool) -> Result<()>;
    /// Changes a registered disk's write mode (e.g. to [`DiskType::MultiAttach`]).
    async fn set_disk_type(&self, disk: &DiskRef, disk_type: DiskType) -> Result<()>;
    /// Attaches a disk to a VM. For a multiattach disk a differencing child is created for
    /// this VM and attached; the returned [`DiskInfo`] is the disk actually attached.
    async fn attach_disk(&self, vm: &VmId, spec: &AttachSpec) -> Result<DiskInfo>;

    // ---- guest and host --------------------------------------------------------------

    /// Runs a program inside the guest (needs guest additions or an agent).
    async fn guest_run(&self, vm: &VmId, command: &GuestCommand) -> Result<GuestOutput>;
    /// Free space of the file system that holds `path` on the host.
    async fn host_disk_space(&self, path: &Path) -> Result<DiskSpace> {
        crate::model::disk_space(path)
    }
    /// The VM's own files (settings, its disks and differencing images, saved states)
    /// that must be copied to run it on another host in its current state. Multiattach
    /// templates it uses are listed in [`MigrationSet::expected_at_destination`], never
    /// in [`MigrationSet::files`].
    ///
    /// The default returns [`Error::Unsupported`].
    async fn vm_files(&self, vm: &VmId) -> Result<MigrationSet> {
        let _ = vm;
        Err(Error::Unsupported {
            backend: self.backend().to_owned(),
            operation: "list a VM's files",
            reason: "this backend cannot list the files of a VM".to_owned(),
        })
    }
    /// The minimal files to resume `snapshot` (id or unique name) of `vm` on another
    /// host: the settings, the VM's own images from the template up to the snapshot's,
    /// and the snapshot's saved state. Templates are "expected at destination".
    ///
    /// The default returns [`Error::Unsupported`].
    async fn snapshot_files(&self, vm: &VmId, snapshot: &str) -> Result<MigrationSet> {
        let _ = (vm, snapshot);
        Err(Error::Unsupported {
            backend: self.backend().to_owned(),
            operation: "list a snapshot's files",
            reason: "this backend cannot list the files of a snapshot".to_owned(),
        })
    }
}

/// Time limits per kind of operation, used by [`WithTimeouts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// Queries: list, info, snapshot tree, disk space.
    pub query: Duration,
    /// Power changes: start, power off, pause, resume.
    pub power: Duration,
    /// Saving state and snapshots (a live snapshot writes the VM's memory).
    pub snapshot: Duration,
    /// Creating, cloning, registering, attaching and deleting.
    pub provision: Duration,
    /// Commands inside the guest.
    pub guest: Duration,
}

impl Default for Timeouts {
    /// Generous defaults for lab PCs: queries 30 s, power 2 min, snapshots 10 min,
    /// provisioning 8 min (the thesis's Deploying timeout), guest commands 1 min.
    fn default() -> Self {
        Timeouts {
            query: Duration::from_secs(30),
            power: Duration::from_secs(120),
            snapshot: Duration::from_secs(600),
            provision: Duration::from_secs(480),
            guest: Duration::from_secs(60),
        }
    }
}

#[cfg(feature = "tokio")]
/// Wraps any [`Hypervisor`] so that every call is bounded by a [`Timeouts`] limit and
/// fails with [`Error::Timeout`] naming the operation.
///
/// ```
/// use std::sync::Arc;
/// use unacloud_core::hypervisor::{Hypervisor, Timeouts, WithTimeouts};
/// use unacloud_core::memory::InMemoryHypervisor;
///
/// let hv: Arc<dyn Hypervisor> = Arc::new(WithTimeouts::new(
///     InMemoryHypervisor::new(),
///     Timeouts::default(),
/// ));
/// assert_eq!(hv.backend(), "in-memory");
/// ```
#[derive(Debug)]
pub struct WithTimeouts<H> {
    inner: H,
    limits: Timeouts,
}

#[cfg(feature = "tokio")]
impl<H> WithTimeouts<H> {
    /// Wraps `inner`.
    pub fn new(inner: H, limits: Timeouts) -> Self {
        WithTimeouts { inner, limits }
    }
    /// The wrapped backend.
    pub fn inner(&self) -> &H {
        &self.inner
    }
    /// The limits in force.
    pub fn limits(&self) -> Timeouts {
        self.limits
    }
}

/// Runs blocking work (parsing a settings file, copying images, `fsync`) on tokio's
/// blocking threads and waits for it, so that an async [`Hypervisor`] method never holds
/// an executor thread on the disk. Every backend of this family uses it; a third-party
/// backend can too. The work runs to its end even when the waiting future is dropped; a
/// panic in `work` is passed on, and a runtime that is shutting down gives
/// [`Error::Cancelled`].
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use unacloud_core::hypervisor::run_blocking;
/// let len = run_blocking(|| Ok(std::fs::read_dir(".").map(|d| d.count()).unwrap_or(0))).await;
/// assert!(len.is_ok());
/// # });
/// ```
#[cfg(feature = "tokio")]
pub async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(Error::Cancelled {
            operation: "blocking work (the runtime is shutting down)".to_owned(),
        }),
    }
}

#[cfg(feature = "tokio")]
/// Runs `fut`, failing with [`Error::Timeout`] naming `operation` once `after` has passed.
pub(crate) async fn bounded<T>(
    operation: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout { operation, after }),
    }
}

#[cfg(feature = "tokio")]
#[async_trait]
impl<H: Hypervisor> Hypervisor for WithTimeouts<H> {
    fn backend(&self) -> &str {
        self.inner.backend()
    }
    async fn list_vms(&self) -> Result<Vec<VmInfo>> {
        bounded("list VMs", self.limits.query, self.inner.list_vms()).await
    }
    async fn vm_info(&self, vm: &VmId) -> Result<VmInfo> {
        bounded("show VM info", self.limits.query, self.inner.vm_info(vm)).await
    }
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        bounded(
            "create VM",
            self.limits.provision,
            self.inner.create_vm(spec),
        )
        .await
    }
    async fn register_vm(&self, settings: &Path) -> Result<VmInfo> {
        bounded(
            "register VM",
            self.limits.provision,
            self.inner.register_vm(settings),
        )
        .await
    }
    async fn unregister_vm(&self, vm: &VmId, delete_files: bool) -> Result<()> {
        bounded(
            "unregister VM",
            self.limits.provision,
            self.inner.unregister_vm(vm, delete_files),
        )
        .await
    }
    async fn clone_vm(&self, source: &VmId, spec: &CloneSpec) -> Result<VmInfo> {
        bounded(
            "clone VM",
            self.limits.provision,
            self.inner.clone_vm(source, spec),
        )
        .await
    }
    async fn start_vm(&self, vm: &VmId, mode: StartMode) -> Result<()> {
        bounded("start VM", self.limits.power, self.inner.start_vm(vm, mode)).await
    }
    async fn power_off(&self, vm: &VmId) -> Result<()> {
        bounded("power off VM", self.limits.power, self.inner.power_off(vm)).await
    }
    async fn save_state(&self, vm: &VmId) -> Result<()> {
        bounded(
            "save VM state",
            self.limits.snapshot,
            self.inner.save_state(vm),
        )
        .await
    }
    async fn pause(&self, vm: &VmId) -> Result<()> {
        bounded("pause VM", self.limits.power, self.inner.pause(vm)).await
    }
    async fn resume(&self, vm: &VmId) -> Result<()> {
        bounded("resume VM", self.limits.power, self.inner.resume(vm)).await
    }
    async fn take_snapshot_at_point(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        at_point: AtPoint,
    ) -> Result<SnapshotRef> {
        bounded(
            "take snapshot",
            self.limits.snapshot,
            self.inner
                .take_snapshot_at_point(vm, name, description, at_point),
        )
        .await
    }
    async fn take_snapshot(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        live: bool,
    ) -> Result<SnapshotRef> {
        bounded(
            "take snapshot",
            self.limits.snapshot,
            self.inner.take_snapshot(vm, name, description, live),
        )
        .await
    }
    async fn restore_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        bounded(
            "restore snapshot",
            self.limits.snapshot,
            self.inner.restore_snapshot(vm, snapshot),
        )
        .await
    }
    async fn delete_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        bounded(
            "delete snapshot",
            self.limits.snapshot,
            self.inner.delete_snapshot(vm, snapshot),
        )
        .await
    }
    async fn snapshot_tree(&self, vm: &VmId) -> Result<SnapshotTree> {
        bounded(
            "list snapshots",
            self.limits.query,
            self.inner.snapshot_tree(vm),
        )
        .await
    }
    async fn list_disks(&self) -> Result<Vec<DiskInfo>> {
        bounded("list disks", self.limits.query, self.inner.list_disks()).await
    }
    async fn register_disk(&self, path: &Path) -> Result<DiskInfo> {
        bounded(
            "register disk",
            self.limits.provision,
            self.inner.register_disk(path),
        )
        .await
    }
    async fn unregister_disk(&self, disk: &DiskRef, delete_file: bool) -> Result<()> {
        bounded(
            "unregister disk",
            self.limits.provision,
            self.inner.unregister_disk(disk, delete_file),
        )
        .await
    }
    async fn set_disk_type(&self, disk: &DiskRef, disk_type: DiskType) -> Result<()> {
        bounded(
            "set disk type",
            self.limits.provision,
            self.inner.set_disk_type(disk, disk_type),
        )
        .await
    }
    async fn attach_disk(&self, vm: &VmId, spec: &AttachSpec) -> Result<DiskInfo> {
        bounded(
            "attach disk",
            self.limits.provision,
            self.inner.attach_disk(vm, spec),
        )
        .await
    }
    async fn guest_run(&self, vm: &VmId, command: &GuestCommand) -> Result<GuestOutput> {
        bounded(
            "run guest command",
            self.limits.guest,
            self.inner.guest_run(vm, command),
        )
        .await
    }
    async fn host_disk_space(&self, path: &Path) -> Result<DiskSpace> {
        bounded(
            "query disk space",
            self.limits.query,
            self.inner.host_disk_space(path),
        )
        .await
    }
    async fn vm_files(&self, vm: &VmId) -> Result<MigrationSet> {
        bounded("list VM files", self.limits.query, self.inner.vm_files(vm)).await
    }
    async fn snapshot_files(&self, vm: &VmId, snapshot: &str) -> Result<MigrationSet> {
        bounded(
            "list snapshot files",
            self.limits.query,
            self.inner.snapshot_files(vm, snapshot),
        )
        .await
    }
}

#[async_trait]
impl<H: Hypervisor + ?Sized> Hypervisor for Arc<H> {
    fn backend(&self) -> &str {
        (**self).backend()
    }
    async fn list_vms(&self) -> Result<Vec<VmInfo>> {
        (**self).list_vms().await
    }
    async fn vm_info(&self, vm: &VmId) -> Result<VmInfo> {
        (**self).vm_info(vm).await
    }
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        (**self).create_vm(spec).await
    }
    async fn register_vm(&self, settings: &Path) -> Result<VmInfo> {
        (**self).register_vm(settings).await
    }
    async fn unregister_vm(&self, vm: &VmId, delete_files: bool) -> Result<()> {
        (**self).unregister_vm(vm, delete_files).await
    }
    async fn clone_vm(&self, source: &VmId, spec: &CloneSpec) -> Result<VmInfo> {
        (**self).clone_vm(source, spec).await
    }
    async fn start_vm(&self, vm: &VmId, mode: StartMode) -> Result<()> {
        (**self).start_vm(vm, mode).await
    }
    async fn power_off(&self, vm: &VmId) -> Result<()> {
        (**self).power_off(vm).await
    }
    async fn save_state(&self, vm: &VmId) -> Result<()> {
        (**self).save_state(vm).await
    }
    async fn pause(&self, vm: &VmId) -> Result<()> {
        (**self).pause(vm).await
    }
    async fn resume(&self, vm: &VmId) -> Result<()> {
        (**self).resume(vm).await
    }
    async fn take_snapshot(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        live: bool,
    ) -> Result<SnapshotRef> {
        (**self).take_snapshot(vm, name, description, live).await
    }
    async fn take_snapshot_at_point(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        at_point: AtPoint,
    ) -> Result<SnapshotRef> {
        (**self)
            .take_snapshot_at_point(vm, name, description, at_point)
            .await
    }
    async fn restore_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        (**self).restore_snapshot(vm, snapshot).await
    }
    async fn delete_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        (**self).delete_snapshot(vm, snapshot).await
    }
    async fn snapshot_tree(&self, vm: &VmId) -> Result<SnapshotTree> {
        (**self).snapshot_tree(vm).await
    }
    async fn list_disks(&self) -> Result<Vec<DiskInfo>> {
        (**self).list_disks().await
    }
    async fn register_disk(&self, path: &Path) -> Result<DiskInfo> {
        (**self).register_disk(path).await
    }
    async fn unregister_disk(&self, disk: &DiskRef, delete_file: bool) -> Result<()> {
        (**self).unregister_disk(disk, delete_file).await
    }
    async fn set_disk_type(&self, disk: &DiskRef, disk_type: DiskType) -> Result<()> {
        (**self).set_disk_type(disk, disk_type).await
    }
    async fn attach_disk(&self, vm: &VmId, spec: &AttachSpec) -> Result<DiskInfo> {
        (**self).attach_disk(vm, spec).await
    }
    async fn guest_run(&self, vm: &VmId, command: &GuestCommand) -> Result<GuestOutput> {
        (**self).guest_run(vm, command).await
    }
    async fn host_disk_space(&self, path: &Path) -> Result<DiskSpace> {
        (**self).host_disk_space(path).await
    }
    async fn vm_files(&self, vm: &VmId) -> Result<MigrationSet> {
        (**self).vm_files(vm).await
    }
    async fn snapshot_files(&self, vm: &VmId, snapshot: &str) -> Result<MigrationSet> {
        (**self).snapshot_files(vm, snapshot).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_password_never_leaves_through_debug_or_serialize() {
        let cmd = GuestCommand {
            program: "/sbin/ip".into(),
            args: vec!["link".into()],
            username: "root".into(),
            password: Some("hunter2-secret".into()),
            timeout: None,
        };
        let json = serde_json::to_string(&cmd).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
        assert!(!format!("{cmd:?}").contains("hunter2"));
        // A configuration may still carry it in.
        let read: GuestCommand = serde_json::from_str(
            r#"{"program":"/sbin/ip","args":[],"username":"root","password":"p","timeout":null}"#,
        )
        .unwrap();
        assert_eq!(read.password.as_deref(), Some("p"));
        let without: GuestCommand = serde_json::from_str(&json).unwrap();
        assert_eq!(without.password, None);
    }
}

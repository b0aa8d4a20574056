//! Shared helpers for the provisioning tests: a fault-injecting hypervisor wrapper and
//! real qemu-img templates.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use unacloud_core::files::MigrationSet;
use unacloud_core::hypervisor::{
    AttachSpec, CloneSpec, DiskRef, GuestCommand, GuestOutput, Hypervisor, SnapshotRef, StartMode,
};
use unacloud_core::model::{DiskInfo, DiskSpace, DiskType, VmId, VmInfo, VmSpec};
use unacloud_core::tree::SnapshotTree;
use unacloud_core::{Error, Result};

/// What to do to a call.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Fail with a permanent backend error.
    Fail,
    /// Fail with a (transient) time-out.
    Timeout,
    /// Wait this long before calling through.
    Delay(Duration),
}

/// Wraps a hypervisor and injects faults into named operations.
#[derive(Debug)]
pub struct Faulty {
    pub inner: Arc<dyn Hypervisor>,
    /// operation → (calls to let through first, fault, how many times).
    faults: Mutex<HashMap<&'static str, (usize, Fault, usize)>>,
    pub space: Mutex<Option<DiskSpace>>,
    pub calls: Mutex<HashMap<&'static str, usize>>,
    /// Counts `create_vm` calls in flight across every wrapper sharing it.
    pub tracker: Option<Arc<Tracker>>,
}

/// Concurrency of `create_vm` calls: now and at most.
#[derive(Debug, Default)]
pub struct Tracker {
    pub now: std::sync::atomic::AtomicUsize,
    pub max: std::sync::atomic::AtomicUsize,
}

impl Faulty {
    pub fn new(inner: Arc<dyn Hypervisor>) -> Self {
        Faulty {
            inner,
            faults: Mutex::new(HashMap::new()),
            space: Mutex::new(None),
            calls: Mutex::new(HashMap::new()),
            tracker: None,
        }
    }

    /// After `skip` successful calls of `op`, apply `fault` to the next `times` calls.
    pub fn inject(&self, op: &'static str, skip: usize, fault: Fault, times: usize) {
        self.faults.lock().unwrap().insert(op, (skip, fault, times));
    }

    pub fn calls(&self, op: &'static str) -> usize {
        self.calls.lock().unwrap().get(op).copied().unwrap_or(0)
    }

    async fn gate(&self, op: &'static str) -> Result<()> {
        *self.calls.lock().unwrap().entry(op).or_default() += 1;
        let fault = {
            let mut f = self.faults.lock().unwrap();
            match f.get_mut(op) {
                Some((skip, _, _)) if *skip > 0 => {
                    *skip -= 1;
                    None
                }
                Some((_, fault, times)) if *times > 0 => {
                    *times -= 1;
                    Some(fault.clone())
                }
                _ => None,
            }
        };
        match fault {
            None => Ok(()),
            Some(Fault::Fail) => Err(Error::Backend {
                backend: "faulty".into(),
                message: format!("injected failure in {op}"),
            }),
            Some(Fault::Timeout) => Err(Error::Timeout {
                operation: "injected",
                after: Duration::from_millis(1),
            }),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Hypervisor for Faulty {
    fn backend(&self) -> &str {
        self.inner.backend()
    }
    async fn list_vms(&self) -> Result<Vec<VmInfo>> {
        self.gate("list_vms").await?;
        self.inner.list_vms().await
    }
    async fn vm_info(&self, vm: &VmId) -> Result<VmInfo> {
        self.gate("vm_info").await?;
        self.inner.vm_info(vm).await
    }
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        use std::sync::atomic::Ordering;
        if let Some(t) = &self.tracker {
            let n = t.now.fetch_add(1, Ordering::SeqCst) + 1;
            t.max.fetch_max(n, Ordering::SeqCst);
        }
        let r = async {
            self.gate("create_vm").await?;
            self.inner.create_vm(spec).await
        }
        .await;
        if let Some(t) = &self.tracker {
            t.now.fetch_sub(1, Ordering::SeqCst);
        }
        r
    }
    async fn register_vm(&self, settings: &Path) -> Result<VmInfo> {
        self.gate("register_vm").await?;
        self.inner.register_vm(settings).await
    }
    async fn unregister_vm(&self, vm: &VmId, delete_files: bool) -> Result<()> {
        self.gate("unregister_vm").await?;
        self.inner.unregister_vm(vm, delete_files).await
    }
    async fn clone_vm(&self, source: &VmId, spec: &CloneSpec) -> Result<VmInfo> {
        self.gate("clone_vm").await?;
        self.inner.clone_vm(source, spec).await
    }
    async fn start_vm(&self, vm: &VmId, mode: StartMode) -> Result<()> {
        self.gate("start_vm").await?;
        self.inner.start_vm(vm, mode).await
    }
    async fn power_off(&self, vm: &VmId) -> Result<()> {
        self.gate("power_off").await?;
        self.inner.power_off(vm).await
    }
    async fn save_state(&self, vm: &VmId) -> Result<()> {
        self.gate("save_state").await?;
        self.inner.save_state(vm).await
    }
    async fn pause(&self, vm: &VmId) -> Result<()> {
        self.gate("pause").await?;
        self.inner.pause(vm).await
    }
    async fn resume(&self, vm: &VmId) -> Result<()> {
        self.gate("resume").await?;
        self.inner.resume(vm).await
    }
    async fn take_snapshot(
        &self,
        vm: &VmId,
        name: &str,
        description: Option<&str>,
        live: bool,
    ) -> Result<SnapshotRef> {
        self.gate("take_snapshot").await?;
        self.inner.take_snapshot(vm, name, description, live).await
    }
    async fn restore_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        self.gate("restore_snapshot").await?;
        self.inner.restore_snapshot(vm, snapshot).await
    }
    async fn delete_snapshot(&self, vm: &VmId, snapshot: &str) -> Result<()> {
        self.gate("delete_snapshot").await?;
        self.inner.delete_snapshot(vm, snapshot).await
    }
    async fn snapshot_tree(&self, vm: &VmId) -> Result<SnapshotTree> {
        self.gate("snapshot_tree").await?;
        self.inner.snapshot_tree(vm).await
    }
    async fn list_disks(&self) -> Result<Vec<DiskInfo>> {
        self.gate("list_disks").await?;
        self.inner.list_disks().await
    }
    async fn register_disk(&self, path: &Path) -> Result<DiskInfo> {
        self.gate("register_disk").await?;
        self.inner.register_disk(path).await
    }
    async fn unregister_disk(&self, disk: &DiskRef, delete_file: bool) -> Result<()> {
        self.gate("unregister_disk").await?;
        self.inner.unregister_disk(disk, delete_file).await
    }
    async fn set_disk_type(&self, disk: &DiskRef, disk_type: DiskType) -> Result<()> {
        self.gate("set_disk_type").await?;
        self.inner.set_disk_type(disk, disk_type).await
    }
    async fn attach_disk(&self, vm: &VmId, spec: &AttachSpec) -> Result<DiskInfo> {
        self.gate("attach_disk").await?;
        self.inner.attach_disk(vm, spec).await
    }
    async fn guest_run(&self, vm: &VmId, command: &GuestCommand) -> Result<GuestOutput> {
        self.gate("guest_run").await?;
        self.inner.guest_run(vm, command).await
    }
    async fn host_disk_space(&self, path: &Path) -> Result<DiskSpace> {
        self.gate("host_disk_space").await?;
        if let Some(s) = *self.space.lock().unwrap() {
            return Ok(s);
        }
        self.inner.host_disk_space(path).await
    }
    async fn vm_files(&self, vm: &VmId) -> Result<MigrationSet> {
        self.gate("vm_files").await?;
        self.inner.vm_files(vm).await
    }
}

/// Fails loudly when qemu-img is missing: these tests exist to exercise it for real.
pub fn require_qemu_img() {
    let ok = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "qemu-img is required for the QEMU backend tests; install qemu-utils"
    );
}

/// A real qcow2 template of `virtual_size` bytes whose first `data_bytes` hold
/// deterministic non-zero data (so that checksums and overlays mean something).
pub async fn make_template(
    dir: &Path,
    name: &str,
    virtual_size: u64,
    data_bytes: usize,
) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(virtual_size).unwrap();
    drop(f);
    let data: Vec<u8> = (0..data_bytes).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.write_all(&data).unwrap();
    drop(f);
    let out = dir.join(format!("{name}.qcow2"));
    unacloud_core::qemu::QemuImg::new()
        .convert(&raw, "raw", &out, "qcow2")
        .await
        .unwrap();
    std::fs::remove_file(&raw).unwrap();
    out
}

/// Every file below `dir`, sorted.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

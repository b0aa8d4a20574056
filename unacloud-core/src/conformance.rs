//! A conformance suite that every [`Hypervisor`] backend must pass.
//!
//! Like `object_store`'s integration tests, the checks are written once against the
//! trait and run against every backend: the in-memory double, the QEMU backend on real
//! images, and the VirtualBox backend with a replaying command runner. Users who write
//! their own backend can run it too.
//!
//! The functions **panic** with a message naming the broken rule when a backend does not
//! conform: they are meant to be called from tests. Operations a backend reports as
//! [`Error::Unsupported`] are skipped (and the skip is returned in the report).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use unacloud_core::conformance::{run_all, ConformanceEnv};
//! use unacloud_core::memory::InMemoryHypervisor;
//!
//! let report = run_all(&InMemoryHypervisor::new(), &ConformanceEnv::new("/templates/base.vdi")).await;
//! assert!(report.skipped.is_empty());
//! # });
//! ```

use std::path::PathBuf;

use crate::error::Error;
use crate::hypervisor::{AttachSpec, CloneSpec, DiskRef, Hypervisor, StartMode};
use crate::model::{DiskInfo, DiskType, HardwareProfile, PowerState, VmId, VmSpec};

/// What a backend needs to run the suite.
#[derive(Debug, Clone)]
pub struct ConformanceEnv {
    /// An existing disk image the suite may register, turn into a multiattach template
    /// and unregister again (it is never deleted).
    pub template: PathBuf,
    /// Folder for the VMs the suite creates (`None`: the backend's default).
    pub base_folder: Option<PathBuf>,
    /// Prefix of the VM names the suite creates, so runs do not collide.
    pub prefix: String,
    /// A registered multiattach template that VMs can boot from; the running-VM
    /// contract ([`power_cycle`]) attaches it to its VM. Without one, a backend that
    /// cannot start a VM without a disk skips that contract.
    pub bootable: Option<DiskRef>,
    /// Memory of the VM the running-VM contract boots (`None`: the Small profile's).
    pub memory_mb: Option<u64>,
}

impl ConformanceEnv {
    /// An environment with a template image and default folder and prefix.
    pub fn new(template: impl Into<PathBuf>) -> Self {
        ConformanceEnv {
            template: template.into(),
            base_folder: None,
            prefix: "conformance".to_owned(),
            bootable: None,
            memory_mb: None,
        }
    }

    /// Lets the running-VM contract boot VMs from `template` with `memory_mb` of memory.
    pub fn with_bootable(mut self, template: DiskRef, memory_mb: u64) -> Self {
        self.bootable = Some(template);
        self.memory_mb = Some(memory_mb);
        self
    }

    fn spec(&self, suffix: &str, profile: HardwareProfile) -> VmSpec {
        let mut spec = VmSpec::new(format!("{}-{suffix}", self.prefix), profile);
        spec.base_folder = self.base_folder.clone();
        spec
    }
}

/// Which checks ran and which were skipped as unsupported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConformanceReport {
    /// Checks that ran and passed.
    pub passed: Vec<&'static str>,
    /// Checks skipped, with the backend's reason.
    pub skipped: Vec<(&'static str, String)>,
}

fn unsupported(e: &Error) -> Option<String> {
    match e {
        Error::Unsupported { reason, .. } => Some(reason.clone()),
        _ => None,
    }
}

/// Runs every check in order and returns what ran.
pub async fn run_all(hv: &dyn Hypervisor, env: &ConformanceEnv) -> ConformanceReport {
    let mut report = ConformanceReport::default();
    vm_registry(hv, env).await;
    report.passed.push("vm registry");
    multiattach_and_snapshots(hv, env).await;
    report.passed.push("multiattach and snapshots");
    for (check, skipped) in files_and_registration(hv, env).await {
        match skipped {
            None => report.passed.push(check),
            Some(reason) => report.skipped.push((check, reason)),
        }
    }
    match power_cycle(hv, env).await {
        None => report.passed.push("power cycle"),
        Some(reason) => report.skipped.push(("power cycle", reason)),
    }
    report
}

/// A VM's files, deleting a snapshot, registering a VM again from its settings and
/// running a guest command on a stopped VM. Returns each check with `None` when it ran
/// and passed, or the backend's reason when it reported the operation unsupported:
///
/// * `delete_snapshot`: deleting the older of two snapshots leaves the newer one, still
///   current; an unknown snapshot fails with NotFound;
/// * `vm_files`: the VM's files list its own differencing disk and never the
///   multiattach template, which is listed as expected at the destination instead;
/// * `register_vm`: a VM unregistered without deleting its files comes back from its
///   settings file with its name and its disk;
/// * `guest_run`: on a powered-off VM it fails with a typed error, never `Ok`.
pub async fn files_and_registration(
    hv: &dyn Hypervisor,
    env: &ConformanceEnv,
) -> Vec<(&'static str, Option<String>)> {
    let mut out = Vec::new();
    let (template, tref) = register_template(hv, env).await;
    let spec = env.spec("files", HardwareProfile::Small);
    let id = VmId::new(spec.name.clone());
    hv.create_vm(&spec).await.expect("create_vm");
    hv.attach_disk(&id, &AttachSpec::sata(tref.clone()))
        .await
        .expect("attach_disk of a multiattach template must succeed");

    // delete_snapshot
    let s1 = hv
        .take_snapshot(&id, "older", None, false)
        .await
        .expect("take_snapshot");
    let s2 = hv
        .take_snapshot(&id, "newer", None, false)
        .await
        .expect("take_snapshot");
    match hv.delete_snapshot(&id, &s1.id).await {
        Ok(()) => {
            let tree = hv.snapshot_tree(&id).await.expect("snapshot_tree");
            assert_eq!(tree.len(), 1, "deleting one of two snapshots leaves one");
            let n2 = tree
                .find_by_id(&s2.id)
                .expect("the newer snapshot survives");
            assert!(
                tree.find_by_id(&s1.id).is_none(),
                "the deleted snapshot is gone"
            );
            assert_eq!(
                tree.current(),
                Some(n2),
                "deleting an older snapshot keeps the current position"
            );
            assert!(
                matches!(
                    hv.delete_snapshot(&id, "no such snapshot").await,
                    Err(Error::NotFound { .. })
                ),
                "deleting an unknown snapshot fails with NotFound"
            );
            out.push(("delete snapshot", None));
        }
        Err(e) => match unsupported(&e) {
            Some(reason) => out.push(("delete snapshot", Some(reason))),
            None => panic!("delete_snapshot failed: {e}"),
        },
    }

    // vm_files: the disks attached now (after snapshots, differencing images on top of
    // the VM's first child).
    let attached: Vec<_> = hv
        .vm_info(&id)
        .await
        .expect("vm_info")
        .disks
        .iter()
        .map(|a| a.disk)
        .collect();
    match hv.vm_files(&id).await {
        Ok(set) => {
            let has = |uuid: &str| {
                set.files.iter().any(|f| {
                    f.uuid
                        .as_deref()
                        .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
                })
            };
            for disk in &attached {
                assert!(
                    has(&disk.to_string()),
                    "vm_files lists the VM's attached differencing disk {disk}"
                );
            }
            assert!(
                !has(&template.uuid.to_string()),
                "vm_files never lists the multiattach template as a file to copy"
            );
            assert!(
                set.expected_at_destination
                    .iter()
                    .any(|e| e.uuid.eq_ignore_ascii_case(&template.uuid.to_string())),
                "the template is expected at the destination"
            );
            out.push(("vm files", None));
        }
        Err(e) => match unsupported(&e) {
            Some(reason) => out.push(("vm files", Some(reason))),
            None => panic!("vm_files failed: {e}"),
        },
    }

    // guest_run on a stopped VM
    let cmd = crate::hypervisor::GuestCommand {
        program: "/bin/true".into(),
        args: Vec::new(),
        username: "root".into(),
        password: None,
        timeout: Some(std::time::Duration::from_secs(5)),
    };
    match hv.guest_run(&id, &cmd).await {
        Ok(o) => panic!("guest_run on a powered-off VM must fail, got {o:?}"),
        Err(e) => out.push(("guest run", unsupported(&e))),
    }

    // register_vm
    let settings = hv.vm_info(&id).await.expect("vm_info").settings_file;
    match settings {
        None => out.push((
            "register vm",
            Some("the backend reports no settings file".to_string()),
        )),
        Some(settings) => {
            hv.unregister_vm(&id, false)
                .await
                .expect("unregister_vm without deleting files");
            match hv.register_vm(&settings).await {
                Ok(info) => {
                    assert_eq!(
                        info.name, spec.name,
                        "register_vm brings the VM back by name"
                    );
                    let again: Vec<_> = info.disks.iter().map(|a| a.disk).collect();
                    assert_eq!(again, attached, "a registered VM has its disks again");
                    out.push(("register vm", None));
                }
                Err(e) => match unsupported(&e) {
                    Some(reason) => out.push(("register vm", Some(reason))),
                    None => panic!("register_vm of {} failed: {e}", settings.display()),
                },
            }
        }
    }
    if hv.vm_info(&id).await.is_ok() {
        hv.unregister_vm(&id, true)
            .await
            .expect("unregister_vm with delete");
    }
    hv.unregister_disk(&tref, false)
        .await
        .expect("an unused template can be unregistered");
    out
}

/// Creating, listing, inspecting and deleting VMs; typed errors for unknown and
/// duplicate names.
pub async fn vm_registry(hv: &dyn Hypervisor, env: &ConformanceEnv) {
    let spec = env.spec("registry", HardwareProfile::Medium);
    let id = VmId::new(spec.name.clone());
    let created = hv.create_vm(&spec).await.expect("create_vm must succeed");
    assert_eq!(created.name, spec.name, "create_vm returns the VM's name");
    assert_eq!(created.cores, 2, "Medium profile means 2 cores");
    assert_eq!(created.memory_mb, 2048, "Medium profile means 2048 MiB");
    assert_eq!(
        created.state,
        PowerState::PoweredOff,
        "a new VM is powered off"
    );
    assert!(
        matches!(hv.create_vm(&spec).await, Err(Error::AlreadyExists { .. })),
        "creating a VM twice must fail with AlreadyExists"
    );
    let listed = hv.list_vms().await.expect("list_vms must succeed");
    assert!(
        listed.iter().any(|v| v.name == spec.name),
        "list_vms shows a new VM"
    );
    let info = hv.vm_info(&id).await.expect("vm_info must find a new VM");
    assert_eq!(info.cores, 2);
    assert!(
        matches!(
            hv.vm_info(&VmId::new(format!("{}-no-such-vm", env.prefix)))
                .await,
            Err(Error::NotFound { .. })
        ),
        "vm_info of an unknown VM must fail with NotFound"
    );
    hv.unregister_vm(&id, true)
        .await
        .expect("unregister_vm must succeed");
    assert!(
        !hv.list_vms()
            .await
            .expect("list_vms")
            .iter()
            .any(|v| v.name == spec.name),
        "an unregistered VM is no longer listed"
    );
}

/// The Multiattach Manager's semantics: one template, several VMs each with its own
/// differencing child; the template cannot be unregistered while used; snapshots of a
/// stopped VM form a tree with a current position; deleting VMs keeps the template.
pub async fn multiattach_and_snapshots(hv: &dyn Hypervisor, env: &ConformanceEnv) {
    let (template, tref) = register_template(hv, env).await;

    let mut children = Vec::new();
    let mut vms = Vec::new();
    for i in 0..3 {
        let spec = env.spec(&format!("ma{i}"), HardwareProfile::Small);
        hv.create_vm(&spec).await.expect("create_vm");
        let id = VmId::new(spec.name.clone());
        let child = hv
            .attach_disk(&id, &AttachSpec::sata(tref.clone()))
            .await
            .expect("attach_disk of a multiattach template must succeed");
        assert_ne!(
            child.uuid, template.uuid,
            "a VM never attaches the template itself"
        );
        assert_eq!(
            child.parent,
            Some(template.uuid),
            "each VM's child has the template as parent"
        );
        let info = hv.vm_info(&id).await.expect("vm_info");
        assert!(
            info.disks.iter().any(|a| a.disk == child.uuid),
            "the VM's attachment names its own child"
        );
        children.push(child.uuid);
        vms.push(id);
    }
    children.sort();
    children.dedup();
    assert_eq!(
        children.len(),
        3,
        "every VM gets a distinct differencing child"
    );

    match hv.unregister_disk(&tref, false).await {
        Err(Error::InUse { .. }) => {}
        other => panic!("unregistering a template in use must fail with InUse, got {other:?}"),
    }

    // Snapshots of a stopped VM.
    let vm = &vms[0];
    let s1 = hv
        .take_snapshot(vm, "first", None, false)
        .await
        .expect("take_snapshot");
    let s2 = hv
        .take_snapshot(vm, "second", Some("after s1"), false)
        .await
        .expect("take_snapshot");
    let tree = hv.snapshot_tree(vm).await.expect("snapshot_tree");
    assert_eq!(tree.len(), 2, "two snapshots taken");
    let n1 = tree.find_by_id(&s1.id).expect("first snapshot in tree");
    let n2 = tree.find_by_id(&s2.id).expect("second snapshot in tree");
    assert_eq!(
        tree.parent(n2),
        Some(n1),
        "the second snapshot hangs below the first"
    );
    assert_eq!(
        tree.current(),
        Some(n2),
        "the current state hangs below the newest snapshot"
    );
    hv.restore_snapshot(vm, &s1.id)
        .await
        .expect("restore_snapshot of a stopped VM");
    let tree = hv.snapshot_tree(vm).await.expect("snapshot_tree");
    assert_eq!(
        tree.current()
            .and_then(|c| tree.get(c))
            .map(|s| s.id.clone()),
        Some(s1.id.clone()),
        "after a restore the current state hangs below the restored snapshot"
    );
    assert!(
        matches!(
            hv.restore_snapshot(vm, "no such snapshot").await,
            Err(Error::NotFound { .. })
        ),
        "restoring an unknown snapshot fails with NotFound"
    );

    // A linked clone from a snapshot shares the chain through a new child.
    let clone_name = format!("{}-clone", env.prefix);
    let clone = hv
        .clone_vm(
            vm,
            &CloneSpec {
                name: clone_name.clone(),
                snapshot: Some(s1.id.clone()),
                linked: true,
            },
        )
        .await;
    match clone {
        Ok(info) => {
            assert_eq!(info.disks.len(), 1, "the clone has the source's disk");
            vms.push(VmId::new(clone_name));
        }
        Err(e) if unsupported(&e).is_some() => {}
        Err(e) => panic!("clone_vm failed: {e}"),
    }

    for vm in &vms {
        hv.unregister_vm(vm, true)
            .await
            .expect("unregister_vm with delete");
    }
    let disks = hv.list_disks().await.expect("list_disks");
    assert!(
        disks.iter().any(|d| d.uuid == template.uuid),
        "deleting VMs never deletes their multiattach template"
    );
    hv.unregister_disk(&tref, false)
        .await
        .expect("an unused template can be unregistered");
}

/// Registers the environment's image and makes it a multiattach template.
async fn register_template(hv: &dyn Hypervisor, env: &ConformanceEnv) -> (DiskInfo, DiskRef) {
    let template = hv
        .register_disk(&env.template)
        .await
        .expect("register_disk of the template must succeed");
    let tref = DiskRef::Uuid(template.uuid);
    hv.set_disk_type(&tref, DiskType::MultiAttach)
        .await
        .expect("set_disk_type multiattach must succeed on an unused base image");
    (template, tref)
}

async fn vm_state(hv: &dyn Hypervisor, id: &VmId) -> PowerState {
    hv.vm_info(id).await.expect("vm_info").state
}

/// The running-VM contract: start, pause, resume, a live snapshot the VM keeps running
/// through, power off, restore (the snapshot's memory makes the VM `Saved`), a start
/// that continues from it, save-state and its start, the minimal file set of a
/// snapshot, and the refusals of illegal transitions. Returns `Some(reason)` if the
/// backend cannot start VMs on this machine.
///
/// That the guest really continues from the snapshot's memory is backend-specific
/// (the QEMU backend's tests read the guest's console); moving a VM to another host
/// needs its files copied and is tested per backend too.
pub async fn power_cycle(hv: &dyn Hypervisor, env: &ConformanceEnv) -> Option<String> {
    let mut spec = env.spec("power", HardwareProfile::Small);
    spec.memory_mb = env.memory_mb;
    let id = VmId::new(spec.name.clone());
    hv.create_vm(&spec).await.expect("create_vm");
    if let Some(t) = &env.bootable {
        hv.attach_disk(&id, &AttachSpec::sata(t.clone()))
            .await
            .expect("attach_disk of the bootable template");
    }
    if let Err(e) = hv.start_vm(&id, StartMode::Headless).await {
        let reason = match (&e, &env.bootable) {
            (Error::InvalidState { state, .. }, None) => Some(format!(
                "no bootable template was given and the backend cannot start a VM {state}"
            )),
            _ => unsupported(&e),
        };
        hv.unregister_vm(&id, true).await.expect("unregister_vm");
        return Some(reason.unwrap_or_else(|| panic!("start_vm failed: {e}")));
    }
    assert_eq!(vm_state(hv, &id).await, PowerState::Running);
    assert!(
        matches!(
            hv.start_vm(&id, StartMode::Headless).await,
            Err(Error::InvalidState { .. })
        ),
        "starting a running VM fails with InvalidState"
    );
    assert!(
        matches!(
            hv.unregister_vm(&id, true).await,
            Err(Error::InvalidState { .. })
        ),
        "a running VM cannot be unregistered"
    );
    hv.pause(&id).await.expect("pause");
    assert_eq!(vm_state(hv, &id).await, PowerState::Paused);
    hv.resume(&id).await.expect("resume");
    assert_eq!(vm_state(hv, &id).await, PowerState::Running);
    let live = hv
        .take_snapshot(&id, "live", None, true)
        .await
        .expect("live snapshot");
    assert_eq!(
        vm_state(hv, &id).await,
        PowerState::Running,
        "a VM keeps running through a live snapshot"
    );
    let tree = hv.snapshot_tree(&id).await.expect("snapshot_tree");
    let node = tree.find_by_id(&live.id).expect("live snapshot in tree");
    assert_eq!(tree.current(), Some(node), "the live snapshot is current");
    assert!(
        tree.get(node).and_then(|s| s.state_file.clone()).is_some(),
        "a snapshot of a running VM has a saved-state file"
    );
    // The same in two moments: the hook runs once, at the point, and the VM runs after.
    let hooked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let at_point = hooked.clone();
    let staged = hv
        .take_snapshot_at_point(
            &id,
            "staged",
            None,
            Box::pin(async move {
                at_point.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        )
        .await
        .expect("a live snapshot in two moments");
    assert_eq!(
        hooked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the point hook ran exactly once"
    );
    assert_eq!(
        vm_state(hv, &id).await,
        PowerState::Running,
        "a VM runs on after a snapshot in two moments"
    );
    let tree = hv.snapshot_tree(&id).await.expect("snapshot_tree");
    let snode = tree
        .find_by_id(&staged.id)
        .expect("staged snapshot in tree");
    assert!(
        tree.get(snode).and_then(|s| s.state_file.clone()).is_some(),
        "a snapshot in two moments has a saved-state file"
    );
    assert!(
        matches!(
            hv.restore_snapshot(&id, &live.id).await,
            Err(Error::InvalidState { .. })
        ),
        "a running VM cannot restore a snapshot"
    );
    match hv.snapshot_files(&id, &live.id).await {
        Ok(set) => {
            assert_eq!(
                set.files.first().map(|f| f.role),
                Some(crate::files::FileRole::Settings),
                "a snapshot's file set starts with the settings"
            );
            assert!(
                set.files
                    .iter()
                    .any(|f| f.role == crate::files::FileRole::SavedState),
                "a live snapshot's file set holds its memory state"
            );
            if env.bootable.is_some() {
                assert!(
                    set.files
                        .iter()
                        .any(|f| f.role == crate::files::FileRole::Disk),
                    "a snapshot's file set holds the VM's own disk images"
                );
                assert_eq!(
                    set.expected_at_destination.len(),
                    1,
                    "the multiattach template is expected at the destination, not copied"
                );
            }
        }
        Err(e) if unsupported(&e).is_some() => {}
        Err(e) => panic!("snapshot_files failed: {e}"),
    }
    hv.power_off(&id).await.expect("power_off");
    assert_eq!(vm_state(hv, &id).await, PowerState::PoweredOff);
    hv.restore_snapshot(&id, &live.id)
        .await
        .expect("restore after power off");
    assert_eq!(
        vm_state(hv, &id).await,
        PowerState::Saved,
        "restoring a live snapshot brings back its saved state"
    );
    hv.start_vm(&id, StartMode::Headless)
        .await
        .expect("start continues from the snapshot's memory");
    assert_eq!(vm_state(hv, &id).await, PowerState::Running);
    hv.save_state(&id).await.expect("save_state");
    assert_eq!(vm_state(hv, &id).await, PowerState::Saved);
    hv.start_vm(&id, StartMode::Headless)
        .await
        .expect("start from saved state");
    assert_eq!(vm_state(hv, &id).await, PowerState::Running);
    hv.power_off(&id).await.expect("power_off");
    if env.bootable.is_some() {
        hv.delete_snapshot(&id, &staged.id)
            .await
            .expect("delete a snapshot of a powered-off VM");
        hv.delete_snapshot(&id, &live.id)
            .await
            .expect("delete a snapshot of a powered-off VM");
        let tree = hv.snapshot_tree(&id).await.expect("snapshot_tree");
        assert!(tree.is_empty(), "a deleted snapshot is gone");
    }
    hv.unregister_vm(&id, true).await.expect("unregister_vm");
    None
}

//! The backend's locks, so that operations on different VMs run concurrently while
//! those on one VM stay in order:
//!
//! * the **state** (registry and every VM's settings in memory) is held for short
//!   steps only, never across a `qemu-img` run; a registry write and the in-memory
//!   change it commits are one step ([`QemuHypervisor::commit_registry`]), run on a
//!   blocking thread;
//! * a **name lock** per VM name serialises what creates, registers, clones into or
//!   removes the VM of that name;
//! * the **runtime** lock per VM (see the `vm` module) serialises the operations on
//!   one existing VM that may involve its process;
//! * the **settings** lock per VM serialises the writes of one VM's settings: held
//!   for one write by the operations under the runtime lock, and for the whole
//!   operation by those that only change the settings and files (attaching a disk),
//!   so that they neither interleave with each other nor with a removal;
//! * an **in-flight** mark says that an operation is about to make a VM use a disk
//!   (an overlay on a template being created), so the disk cannot be unregistered or
//!   retyped meanwhile.
//!
//! Locks are taken in that order (name, runtime, settings, state), and a task holds at
//! most one of each kind.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::error::{Error, Result};
use crate::model::{Uuid, VmId};

use super::settings::{Registry, VmSettings};
use super::{find, QemuHypervisor, State};

/// The state, locked.
pub(crate) type StateGuard = OwnedMutexGuard<State>;

/// The settings lock of one VM, locked.
pub(crate) type SettingsGuard = OwnedMutexGuard<()>;

/// The settings locks of one backend, by VM uuid.
pub(crate) type SettingsLocks = std::sync::Mutex<HashMap<Uuid, Arc<Mutex<()>>>>;

/// The lock of one VM name, released (and forgotten when nobody waits) on drop.
#[derive(Debug)]
pub(crate) struct NameGuard<'a> {
    names: &'a NameLocks,
    name: String,
    guard: Option<OwnedMutexGuard<()>>,
}

/// The name locks of one backend.
pub(crate) type NameLocks = std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>;

impl Drop for NameGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.names.lock().unwrap_or_else(|p| p.into_inner());
        // Clones are only made under this lock: a count of one is the map's own.
        if map
            .get(&self.name)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.name);
        }
    }
}

/// Disks that operations under way are about to make a VM use: (disk, VM name).
pub(crate) type InFlight = std::sync::Mutex<Vec<(Uuid, String)>>;

/// One in-flight use of a disk, removed on drop.
#[derive(Debug)]
pub(crate) struct InUse<'a> {
    in_flight: &'a InFlight,
    disk: Uuid,
    vm: String,
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        let mut v = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = v.iter().position(|(d, n)| *d == self.disk && *n == self.vm) {
            v.swap_remove(i);
        }
    }
}

/// Applies `change` to a copy of the registry, saves it, and only then keeps it.
pub(crate) fn write_registry(
    root: &Path,
    durable: bool,
    st: &mut State,
    change: impl FnOnce(&mut Registry),
) -> Result<()> {
    let mut reg = st.registry.clone();
    change(&mut reg);
    reg.stored(root)
        .save(&root.join("registry.json"), durable)?;
    st.registry = reg;
    Ok(())
}

impl QemuHypervisor {
    /// Locks the state (briefly: never hold it across a program run or an `fsync`).
    pub(crate) async fn lock_state(&self) -> StateGuard {
        Arc::clone(&self.state).lock_owned().await
    }

    /// Locks the name `name` for an operation that creates, registers or removes the
    /// VM of that name.
    pub(crate) async fn lock_name(&self, name: &str) -> NameGuard<'_> {
        let m = {
            let mut map = self.names.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(name.to_owned()).or_default())
        };
        let guard = m.lock_owned().await;
        NameGuard {
            names: &self.names,
            name: name.to_owned(),
            guard: Some(guard),
        }
    }

    /// Locks the settings of the VM with `uuid`.
    pub(crate) async fn lock_settings_of(&self, uuid: Uuid) -> SettingsGuard {
        let m = {
            let mut map = self
                .settings_locks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(uuid).or_default())
        };
        m.lock_owned().await
    }

    /// Locks the settings of an existing VM; returns its name as of the lock.
    pub(crate) async fn lock_settings(&self, vm: &VmId) -> Result<(SettingsGuard, String)> {
        let uuid = find(&*self.state.lock().await, vm)?.settings.uuid;
        let guard = self.lock_settings_of(uuid).await;
        let name = find(&*self.state.lock().await, vm)?.settings.name.clone();
        Ok((guard, name))
    }

    /// Marks `disk` as about to be used by VM `vm` until the mark is dropped. Take it
    /// before checking (under the state lock) that the disk is still registered.
    pub(crate) fn mark_in_use(&self, disk: Uuid, vm: &str) -> InUse<'_> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((disk, vm.to_owned()));
        InUse {
            in_flight: &self.in_flight,
            disk,
            vm: vm.to_owned(),
        }
    }

    /// Names of the VMs that use `uuid` directly or as the base of their overlay, or
    /// are about to.
    pub(crate) fn users_of(&self, st: &State, uuid: Uuid) -> Vec<String> {
        let mut users = super::users_of(st, uuid);
        for (d, vm) in self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if *d == uuid && !users.contains(vm) {
                users.push(vm.clone());
            }
        }
        users
    }

    /// Writes the registry changed by `change` and then runs `then` on the state, as
    /// one step for every other task, on a blocking thread (the step finishes even when
    /// the caller's future is dropped). Counts one side effect.
    pub(crate) async fn commit_registry<T: Send + 'static>(
        &self,
        mut st: StateGuard,
        change: impl FnOnce(&mut Registry) + Send + 'static,
        then: impl FnOnce(&mut State) -> T + Send + 'static,
    ) -> Result<T> {
        self.fx("write registry")?;
        let (root, durable) = (self.root.clone(), self.durable);
        crate::hypervisor::run_blocking(move || {
            write_registry(&root, durable, &mut st, change)?;
            Ok(then(&mut st))
        })
        .await
    }

    /// [`QemuHypervisor::commit_registry`] with nothing more to do.
    pub(crate) async fn update_registry(
        &self,
        st: StateGuard,
        change: impl FnOnce(&mut Registry) + Send + 'static,
    ) -> Result<()> {
        self.commit_registry(st, change, |_| ()).await
    }

    /// Saves VM `name`'s settings (atomically; durably when the backend is) on a
    /// blocking thread and then keeps them in memory. The caller holds the VM's
    /// settings lock, so no other task changes them meanwhile.
    pub(crate) async fn store_settings(
        &self,
        name: &str,
        settings_file: &Path,
        settings: VmSettings,
    ) -> Result<VmSettings> {
        let (state, durable) = (Arc::clone(&self.state), self.durable);
        let (name, file) = (name.to_owned(), settings_file.to_path_buf());
        crate::hypervisor::run_blocking(move || {
            settings.save(&file, durable)?;
            let mut st = state.blocking_lock();
            match st.vms.get_mut(&name) {
                Some(e) => {
                    e.settings = settings.clone();
                    Ok(settings)
                }
                None => Err(Error::NotFound {
                    kind: "vm",
                    id: name,
                }),
            }
        })
        .await
    }

    /// Saves the settings of a VM that is not in the state yet (being created,
    /// registered or cloned), on a blocking thread.
    pub(crate) async fn save_new_settings(
        &self,
        settings: &VmSettings,
        settings_file: &Path,
    ) -> Result<()> {
        let (settings, file, durable) =
            (settings.clone(), settings_file.to_path_buf(), self.durable);
        crate::hypervisor::run_blocking(move || settings.save(&file, durable)).await
    }

    /// The registered VMs' settings files, as of now.
    pub(crate) async fn registered_vms(&self) -> Vec<std::path::PathBuf> {
        self.state.lock().await.registry.vms.clone()
    }
}

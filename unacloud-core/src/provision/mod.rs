//! Provisioning from multiattach templates (thesis ch. 4): a versioned template
//! [`catalog`], [`preload`]ing templates onto hosts ahead of time, the Multiattach
//! Manager's seven all-or-nothing operations ([`multiattach`]) and the execution of a
//! whole deployment ([`deploy`]).
//!
//! Everything here is written against `dyn` [`Hypervisor`](crate::hypervisor::Hypervisor),
//! so the same code provisions with VirtualBox, with the QEMU backend
//! (the QEMU backend, feature `qemu`) and with the in-memory double.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use unacloud_core::hypervisor::{DiskRef, Hypervisor};
//! use unacloud_core::memory::InMemoryHypervisor;
//! use unacloud_core::model::{HardwareProfile, VmSpec};
//! use unacloud_core::provision::multiattach::MultiattachManager;
//!
//! let hv = InMemoryHypervisor::new();
//! let manager = MultiattachManager::new(&hv);
//! let template = manager.register_template("/templates/ubuntu-1.vdi".as_ref()).await.unwrap();
//! let vm = manager
//!     .create_vm(&VmSpec::new("TM", HardwareProfile::Small), &DiskRef::Uuid(template.uuid))
//!     .await
//!     .unwrap();
//! assert_eq!(vm.disks.len(), 1);
//! assert_ne!(vm.disks[0].disk, template.uuid); // the VM's own differencing child
//! # });
//! ```

pub mod catalog;
pub mod deploy;
pub mod multiattach;
pub mod preload;

pub use crate::fsutil::allocated_bytes;

//! # unacloud-core
//!
//! The domain of a desktop cloud — VMs, disks, hardware profiles, lab hosts — and the
//! pieces every backend and service shares:
//!
//! * [`model`]: identifiers and serde-serialisable model types;
//! * [`tree`]: an arena-backed snapshot tree with text, DOT and JSON renderers;
//! * [`hypervisor`]: the object-safe async [`hypervisor::Hypervisor`] trait, and
//!   [`hypervisor::WithTimeouts`] to bound every call;
//! * [`memory`]: an in-memory reference implementation of the trait for tests, and
//!   [`conformance`], the suite every backend must pass;
//! * [`files`]: the files of a VM and the [`files::MigrationSet`] needed to resume it
//!   elsewhere;
//! * [`placement`]: the thesis's seven placement algorithms and a disk-aware one;
//! * [`provision`]: the template catalog, preloading, the Multiattach Manager's seven
//!   operations and deployments executed from a placement;
//! * `qemu` (feature `qemu`, on by default): a QEMU backend of the trait that runs VMs
//!   with `qemu-system-x86_64` over QMP and manages their disks with `qemu-img`;
//! * [`lifecycle`]: a VM's deployment life cycle (Requested … Finished) as a sans-IO
//!   state machine with the thesis's timeouts;
//! * [`cost`]: file counts (Eq. 5.4/5.5) and the bytes to move to resume a VM elsewhere.
//!
//! ```
//! use unacloud_core::model::HardwareProfile;
//! use unacloud_core::tree::{Snapshot, SnapshotTree};
//!
//! let profile: HardwareProfile = "large".parse().unwrap();
//! assert_eq!((profile.cores(), profile.memory_mb()), (3, 4096));
//!
//! let mut tree = SnapshotTree::new();
//! let root = tree.add_root(Snapshot::new("1", "installed")).unwrap();
//! tree.set_current(Some(root));
//! assert!(tree.render_text().contains("installed [1] *"));
//! ```
#![deny(missing_docs)]

pub mod conformance;
pub mod cost;
pub mod error;
pub mod files;
pub mod hypervisor;
pub mod lifecycle;
pub mod memory;
pub mod model;
pub mod placement;
pub mod provision;
#[cfg(feature = "qemu")]
pub mod qemu;
pub mod tree;

pub use error::{Error, Result};

//! # unacloud-core
//!
//! The shared heart of a desktop cloud: researchers' VMs run on the idle PCs of a
//! university lab, and any of those PCs may be powered off, rebooted or unplugged at
//! any moment. This crate holds what every part of such a cloud agrees on — the
//! domain, one abstraction of a hypervisor, and the services written against it.
//!
//! ## How the pieces fit
//!
//! Everything is built around one object-safe async trait,
//! [`Hypervisor`](hypervisor::Hypervisor): register disks, create, start, pause, save
//! and snapshot VMs, list a VM's files. Three kinds of code meet at it:
//!
//! * **Implementations.** [`memory::InMemoryHypervisor`] is the reference double for
//!   tests (yours too); the QEMU backend (`qemu`, feature `qemu`) really runs VMs with
//!   `qemu-system-x86_64` and `qemu-img`; the VirtualBox backend lives in the
//!   `unacloud-vbox` crate. The [`conformance`] suite (feature `conformance`) is what
//!   makes them interchangeable: every backend runs it and must pass.
//! * **Services over `Arc<dyn Hypervisor>`.** [`placement`] decides which PC gets
//!   which VM (the thesis's seven algorithms and a disk-aware one); [`provision`]
//!   (feature `provision`) keeps a versioned template catalog, preloads templates,
//!   creates VMs as differencing children of multiattach templates and executes whole
//!   deployments, each VM driven through the [`lifecycle`] state machine with the
//!   thesis's time limits. None of them knows which backend it drives.
//! * **The domain.** [`model`] (ids, hardware profiles, hosts, disks), [`tree`]
//!   (snapshot trees with text, DOT and JSON renderers), [`files`] (a VM's files and
//!   the [`files::MigrationSet`] needed to resume it elsewhere) and [`cost`] (file
//!   counts, Eq. 5.4/5.5, and bytes to move); [`time`] turns Unix time into calendar
//!   dates for settings and result files.
//!
//! In a picture: `model` ← `Hypervisor` ← { `memory`, `qemu`, `unacloud-vbox` } — all
//! checked by `conformance` — and `placement` → `provision::deploy` → `Arc<dyn Hypervisor>`.
//! The global-snapshot protocol (`unacloud-snapshot`) drives the same trait to take and
//! restore each VM's local snapshot.
//!
//! ## Features
//!
//! | feature | default | brings |
//! |---|---|---|
//! | `tokio` | yes | time limits on any backend (`hypervisor::WithTimeouts`) and `hypervisor::run_blocking`, on tokio |
//! | `qemu` | yes | the QEMU backend (QMP, qcow2 overlays, live snapshots with memory) |
//! | `provision` | yes | template catalog, preloading, Multiattach Manager, deployments (blake3, sha2, tokio-util) |
//! | `conformance` | yes | the conformance suite for `Hypervisor` implementations |
//! | `__testing` | no | **unstable**: the QEMU backend's fault-injection hooks for this project's crash tests |
//!
//! With `default-features = false` the crate is the domain, the trait, the in-memory
//! double, placement, the life cycle and the cost model, with no async runtime among
//! its dependencies (the trait is runtime-agnostic; `async-trait` only boxes futures).
//!
//! ## Example
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use unacloud_core::hypervisor::Hypervisor;
//! use unacloud_core::memory::InMemoryHypervisor;
//! use unacloud_core::model::{HardwareProfile, VmSpec};
//! use unacloud_core::placement::{place, Algorithm, VmRequest};
//! use unacloud_core::model::Host;
//!
//! // Where should two small VMs go on two lab PCs?
//! let hosts = vec![Host::new("pc-1", 4, 8192, 100 << 30), Host::new("pc-2", 4, 8192, 100 << 30)];
//! let requests: Vec<VmRequest> = (0..2)
//!     .map(|i| VmRequest::new(format!("vm-{i}"), "ubuntu-1", HardwareProfile::Small))
//!     .collect();
//! let placement = place(&hosts, &requests, Algorithm::RoundRobin, None).unwrap();
//! assert_eq!(placement.assignments.len(), 2);
//!
//! // Any backend, the same calls: here the in-memory double.
//! let hv = InMemoryHypervisor::new();
//! let disk = hv.register_disk("/templates/ubuntu-1.vdi".as_ref()).await.unwrap();
//! let vm = hv.create_vm(&VmSpec::new("vm-0", HardwareProfile::Small)).await.unwrap();
//! assert!(hv.list_disks().await.unwrap().iter().any(|d| d.uuid == disk.uuid));
//! assert_eq!(hv.list_vms().await.unwrap().len(), 1);
//! # });
//! ```
#![deny(missing_docs)]

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod cost;
pub mod error;
pub mod files;
// Atomic writes and allocated sizes, for provisioning and the QEMU backend.
#[cfg(any(feature = "qemu", feature = "provision"))]
#[cfg_attr(not(all(feature = "qemu", feature = "provision")), allow(dead_code))]
mod fsutil;
pub mod hypervisor;
pub mod lifecycle;
pub mod memory;
pub mod model;
pub mod placement;
#[cfg(feature = "provision")]
pub mod provision;
#[cfg(feature = "qemu")]
pub mod qemu;
pub mod time;
pub mod tree;

pub use error::{Error, Result};

/// The attribute macro the [`Hypervisor`](hypervisor::Hypervisor) trait is written
/// with, re-exported so that a third-party backend implements the trait with the same
/// version: `#[unacloud_core::async_trait] impl Hypervisor for MyBackend { … }`.
pub use async_trait::async_trait;

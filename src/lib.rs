//! # unacloud
//!
//! Reliable desktop clouds: run researchers' virtual machines on the idle PCs of a
//! university lab, where any host may be powered off, rebooted or unplugged at any moment.
//!
//! This facade re-exports the crate family so that one dependency brings all of it:
//!
//! * [`core`] — domain model, the hypervisor abstraction, placement, deployment life
//!   cycle and the cost model;
//! * [`vbox`] — the VirtualBox backend: `.vbox` settings, snapshot trees, VDI headers and
//!   the minimal file set needed to resume a VM from a snapshot on another host;
//! * [`snapshot`] — the transport-agnostic global-snapshot and resume protocol.
//!
//! ```
//! use unacloud::core::model::HardwareProfile;
//! assert_eq!(HardwareProfile::Medium.cores(), 2);
//! ```
#![deny(missing_docs)]

pub use unacloud_core as core;
pub use unacloud_snapshot as snapshot;
pub use unacloud_vbox as vbox;

//! # unacloud
//!
//! Reliable desktop clouds: run researchers' virtual machines on the idle PCs of a
//! university lab, where any host may be powered off, rebooted or unplugged at any
//! moment. One dependency brings the whole family:
//!
//! * [`cloud`] (the `unacloud-core` crate) — the domain, the async
//!   [`Hypervisor`](cloud::hypervisor::Hypervisor) trait with an in-memory double and a
//!   conformance suite, the QEMU backend that really runs VMs, placement, the
//!   deployment life cycle, provisioning from multiattach templates and the cost model;
//! * [`vbox`] (`unacloud-vbox`) — the VirtualBox backend: `.vbox` settings, snapshot
//!   trees, VDI headers, `VBoxManage`, and the minimal set of files needed to resume a
//!   VM from a snapshot on another PC;
//! * [`snapshot`] (`unacloud-snapshot`) — the global-snapshot and resume protocol: a
//!   sans-IO core specified in `PROTOCOL.md`, a deterministic simulator, and a tokio
//!   transport whose hosts take each VM's local snapshot through the `Hypervisor` trait.
//!
//! How they fit: a deployment places VMs on lab PCs ([`cloud::placement`]) and creates
//! them from templates ([`cloud::provision`]) through any `Hypervisor` — QEMU,
//! VirtualBox or the double. While they run, [`snapshot`] takes consistent global
//! snapshots of all of them (packets coloured and filtered so that no message is lost
//! or counted twice), and when PCs are switched off it resumes every VM from the latest
//! complete one, moving a VM to another PC with only the files [`vbox`] or the QEMU
//! backend say it needs.
//!
//! ```
//! use unacloud::cloud::model::{HardwareProfile, Host};
//! use unacloud::cloud::placement::{place, Algorithm, VmRequest};
//!
//! // Four small VMs on two lab PCs, with the thesis's round-robin placement.
//! let pcs = [Host::new("pc-1", 4, 8192, 50 << 30), Host::new("pc-2", 4, 8192, 50 << 30)];
//! let vms: Vec<VmRequest> = (0..4)
//!     .map(|i| VmRequest::new(format!("vm-{i}"), "ubuntu-1", HardwareProfile::Small))
//!     .collect();
//! let plan = place(&pcs, &vms, Algorithm::RoundRobin, None).unwrap();
//! assert_eq!(plan.assignments.len(), 4);
//! ```
#![deny(missing_docs)]

pub use unacloud_core as cloud;
pub use unacloud_snapshot as snapshot;
pub use unacloud_vbox as vbox;

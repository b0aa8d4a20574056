//! # unacloud-snapshot
//!
//! Consistent global snapshots — and a consistent resume from them — of a distributed
//! system whose processes run in virtual machines on many hosts, **without changing the
//! applications or the hypervisor**.
//!
//! (Crate documentation is being written; see `PROTOCOL.md`.)
#![deny(missing_docs)]

pub mod catalog_store;
pub mod error;
pub mod protocol;
pub mod sim;

#[cfg(feature = "tokio")]
pub mod colour;
#[cfg(feature = "tokio")]
pub mod net;
#[cfg(feature = "tokio")]
pub mod netns;
#[cfg(feature = "tokio")]
pub mod rcpbt;

pub use error::{Error, Operation, Result};

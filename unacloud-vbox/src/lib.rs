//! # unacloud-vbox
//!
//! The VirtualBox backend of unacloud.
#![deny(missing_docs)]

pub mod error;
pub mod vdi;

pub use error::{Error, Result};

//! # unacloud-vbox
//!
//! The VirtualBox backend of unacloud.
#![deny(missing_docs)]

pub mod copy;
pub mod error;
pub mod manage;
pub mod location;
pub mod settings;
pub mod synth;
pub mod tracker;
pub mod vdi;

pub use error::{Error, Result};

//! Python bindings for unacloud (the `unacloud._native` extension module).
//!
//! This crate only converts types and maps errors; every behaviour lives in the Rust
//! crates. The public Python package `unacloud` (in `python/unacloud/`) re-exports
//! these classes and functions under `unacloud.vbox`, `unacloud.core`,
//! `unacloud.snapshot`, `unacloud.hv` (hypervisors over unacloud-core's trait) and
//! `unacloud.provision` (template catalog, preloading, deployments),
//! `unacloud.experiment` (the real-VM ring experiment), and defines the exception
//! hierarchy in `unacloud.errors`.
#![deny(missing_docs)]

use pyo3::prelude::*;

mod args;
mod convert;
mod core;
mod errors;
mod experiment;
mod hv;
mod provision;
mod results;
mod runtime;
mod sim;
mod snapshot;
mod vbox;

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<vbox::Machine>()?;
    m.add_class::<vbox::Snapshot>()?;
    m.add_class::<vbox::MigrationSet>()?;
    m.add_function(wrap_pyfunction!(vbox::read_vdi_header, m)?)?;
    m.add_function(wrap_pyfunction!(core::hardware_profiles, m)?)?;
    m.add_function(wrap_pyfunction!(core::hardware_profile, m)?)?;
    m.add_function(wrap_pyfunction!(core::placement_algorithms, m)?)?;
    m.add_function(wrap_pyfunction!(core::place, m)?)?;
    m.add_class::<core::Placement>()?;
    m.add_function(wrap_pyfunction!(core::file_count, m)?)?;
    m.add_function(wrap_pyfunction!(core::transfer_estimate, m)?)?;
    m.add_function(wrap_pyfunction!(sim::simulate_ring, m)?)?;
    m.add_class::<sim::SimulationResult>()?;
    m.add_function(wrap_pyfunction!(snapshot::encode, m)?)?;
    m.add_function(wrap_pyfunction!(snapshot::decode, m)?)?;
    m.add_class::<snapshot::Coordinator>()?;
    m.add_class::<snapshot::Participant>()?;
    m.add_function(wrap_pyfunction!(hv::open, m)?)?;
    m.add_class::<hv::Hypervisor>()?;
    m.add_class::<hv::Disk>()?;
    m.add_class::<hv::VmInfo>()?;
    m.add_class::<hv::SnapshotTree>()?;
    m.add_class::<hv::SnapshotNode>()?;
    m.add_class::<provision::Catalog>()?;
    m.add_class::<provision::TemplateVersion>()?;
    m.add_class::<provision::HostTarget>()?;
    m.add_class::<provision::MultiattachManager>()?;
    m.add_class::<provision::VmOutcome>()?;
    m.add_class::<provision::DeploymentReport>()?;
    m.add_function(wrap_pyfunction!(provision::preload, m)?)?;
    m.add_function(wrap_pyfunction!(provision::deploy, m)?)?;
    m.add_function(wrap_pyfunction!(experiment::ring_vms, m)?)?;
    m.add_class::<experiment::RingVmsResult>()?;
    m.add_function(wrap_pyfunction!(experiment::_gs_main, m)?)?;
    Ok(())
}

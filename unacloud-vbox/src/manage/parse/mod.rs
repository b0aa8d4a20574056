//! Parsers of `VBoxManage` output, each tested against the real samples in
//! `shared/fixtures/vboxmanage/`.

pub mod lists;
pub mod machinereadable;
pub mod media;
pub mod misc;
pub mod snapshots;
pub mod vminfo;

pub use lists::{parse_vm_list, VmListEntry};
pub use machinereadable::MachineReadable;
pub use media::{parse_media, MediumRecord, MediumUser};
pub use misc::{
    parse_cloned, parse_createvm, parse_snapshot_taken, parse_trailing_uuid, parse_version,
    CreatedVm, VBoxVersion,
};
#[cfg(feature = "__testing")]
pub use snapshots::render_machine_readable;
pub use snapshots::{tree_from_human_list, tree_from_machine_readable, SnapshotListError};
pub use vminfo::{
    parse_vm_info, power_state, Nic, SlotMedium, StorageController, StorageSlot, VmDetails,
    VmInfoError,
};

//! The smallest VirtualBox machine the file tracker accepts, for tests that make one in
//! a temporary folder: one VDI base disk and one snapshot with a saved state.
//!
//! Test binaries include this file with `#[path = "…/testsupport/vbox_machine.rs"] mod
//! vbox_machine;`.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use unacloud_vbox::settings::Uuid;
use unacloud_vbox::vdi::VdiHeader;

/// The machine's uuid.
pub const MACHINE: &str = "11111111-1111-1111-1111-111111111111";
/// The uuid of its one snapshot, which is also its current one.
pub const SNAP: &str = "22222222-2222-2222-2222-222222222222";
/// The uuid of its one disk.
pub const DISK: &str = "aaaaaaaa-0000-0000-0000-000000000001";

/// The settings of machine "TM": its disk at `location` is attached to the SATA
/// controller of the machine and of its snapshot `snapshot_name`, whose saved state is
/// `state_file`. Both strings go into the XML as they are (escape them yourself).
pub fn machine_xml(snapshot_name: &str, location: &str, state_file: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Machine uuid="{{{MACHINE}}}" name="TM" OSType="Ubuntu_64" currentSnapshot="{{{SNAP}}}">
    <MediaRegistry><HardDisks>
      <HardDisk uuid="{{{DISK}}}" location="{location}" format="VDI" type="Normal"/>
    </HardDisks></MediaRegistry>
    <Snapshot uuid="{{{SNAP}}}" name="{snapshot_name}" timeStamp="2024-01-01T00:00:00Z" stateFile="{state_file}">
      <Hardware><StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">
        <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{{{DISK}}}"/></AttachedDevice>
      </StorageController></StorageControllers></Hardware>
    </Snapshot>
    <Hardware><StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">
      <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{{{DISK}}}"/></AttachedDevice>
    </StorageController></StorageControllers></Hardware>
  </Machine>
</VirtualBox>
"#
    )
}

/// Makes `dir/TM.vbox` (snapshot "installed"), `dir/TM.vdi` (a valid empty VDI) and
/// `dir/Snapshots/s1.sav`; returns the settings file's path.
///
/// # Panics
/// If a file cannot be written.
pub fn machine_folder(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir.join("Snapshots")).expect("make the Snapshots folder");
    let vbox = dir.join("TM.vbox");
    fs::write(
        &vbox,
        machine_xml("installed", "TM.vdi", "Snapshots/s1.sav"),
    )
    .expect("write TM.vbox");
    VdiHeader::new_base(1 << 20, Uuid::parse_str(DISK).expect("DISK is a uuid"))
        .write_empty_image(dir.join("TM.vdi"))
        .expect("write TM.vdi");
    fs::write(dir.join("Snapshots/s1.sav"), b"saved state").expect("write s1.sav");
    vbox
}

//! # unacloud-vbox
//!
//! The VirtualBox backend of unacloud: read a machine's settings, understand its
//! snapshot tree and disk chains, and say exactly which files resume it from a chosen
//! snapshot on another host — then prove the chain is intact and copy them.
//!
//! ```
//! use unacloud_vbox::tracker::{Machine, MigrationOptions, TreeFormat};
//! # fn main() -> unacloud_vbox::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let vbox = dir.path().join("TM.vbox");
//! # std::fs::write(&vbox, r#"<?xml version="1.0"?>
//! # <VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-windows">
//! #   <Machine uuid="{11111111-1111-1111-1111-111111111111}" name="TM" OSType="Ubuntu_64"
//! #            currentSnapshot="{22222222-2222-2222-2222-222222222222}">
//! #     <MediaRegistry><HardDisks>
//! #       <HardDisk uuid="{aaaaaaaa-0000-0000-0000-000000000001}" location="TM.vdi" format="VDI" type="Normal">
//! #         <HardDisk uuid="{aaaaaaaa-0000-0000-0000-000000000002}" location="Snapshots/{aaaaaaaa-0000-0000-0000-000000000002}.vdi" format="VDI"/>
//! #       </HardDisk>
//! #     </HardDisks></MediaRegistry>
//! #     <Snapshot uuid="{22222222-2222-2222-2222-222222222222}" name="installed"
//! #               timeStamp="2024-01-01T00:00:00Z" stateFile="Snapshots/s1.sav">
//! #       <Hardware><StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">
//! #         <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{aaaaaaaa-0000-0000-0000-000000000001}"/></AttachedDevice>
//! #       </StorageController></StorageControllers></Hardware>
//! #     </Snapshot>
//! #     <Hardware><StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">
//! #       <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{aaaaaaaa-0000-0000-0000-000000000002}"/></AttachedDevice>
//! #     </StorageController></StorageControllers></Hardware>
//! #   </Machine>
//! # </VirtualBox>"#).unwrap();
//! // A machine folder with TM.vbox, one disk and one snapshot "installed".
//! let machine = Machine::load(&vbox, None)?; // or Some(Path::new(".../VirtualBox.xml"))
//! assert_eq!(machine.name(), "TM");
//! assert_eq!(machine.current_snapshot().map(|s| s.name.as_str()), Some("installed"));
//! print!("{}", machine.render_snapshot_tree(TreeFormat::Text)?);
//!
//! // What another host needs to resume "installed": the settings, the image the
//! // snapshot froze with its ancestors, and the snapshot's saved state.
//! let set = machine.migration_set("installed", &MigrationOptions::default())?;
//! let roles: Vec<_> = set.files.iter().map(|f| f.role.as_str()).collect();
//! assert_eq!(roles, ["settings", "disk", "saved-state"]);
//! // Files that do not exist here are reported one by one, not as an error.
//! assert_eq!(set.missing().count(), 2);
//!
//! // Eq. 5.4 of the thesis: (d + 1)(s + 1) files for d disks and s snapshots.
//! assert_eq!(machine.all_files().expected_count, 4);
//! # Ok(())
//! # }
//! ```
//!
//! ## Design
//!
//! * [`settings`] — a streaming parser (quick-xml events, an explicit stack of
//!   contexts, no DOM, no recursion) for machine `.vbox` files and the global
//!   `VirtualBox.xml`, settings versions 1.12–1.19 in either namespace. The result is
//!   plain data: identity, hardware (CPU, memory, network adapters, storage controllers
//!   and attached media) for the current state and every snapshot, the media
//!   registry, and the snapshot tree — trees stored as flat arenas with parent
//!   indices. [`settings::ParseLimits`] bounds depth, tag size, text size and element
//!   count so hostile input cannot exhaust memory; malformed input gives a typed
//!   [`Error`] naming the element, attribute or uuid and the line.
//! * [`location`] — `location`/`stateFile` strings (relative, POSIX, `C:\…`, `C:/…`,
//!   `//host/share`) resolved lexically, never touching the file system, with the
//!   original string kept.
//! * [`tracker`] — the thesis's *Global Snapshot File Tracker*. A
//!   [`tracker::Machine`] indexes every medium (own and global registry) by uuid and
//!   precomputes path identities, so a migration set costs time proportional to its
//!   size, not to the machine's. It also lists all files (with the Eq. 5.4 count), the
//!   files no state needs, verifies VDI chains ([`tracker::Machine::verify`], via
//!   [`vdi`]) and copies a set ([`tracker::Machine::copy_to`], via [`copy`]) — a broken
//!   chain is reported before anything is written, and nothing is written outside the
//!   destination.
//! * [`vdi`] — VDI header reader and chain verification; [`copy`] — verified,
//!   atomic, sparse-aware copies confined to a destination root.
//! * [`display`] — the escaping every human-readable output uses, so that names and
//!   locations from a hostile settings file cannot forge lines or send terminal
//!   escape sequences.
//! * [`manage`] (feature `manage`, on by default) — driving a real VirtualBox through
//!   `VBoxManage`, implementing [`unacloud_core::hypervisor::Hypervisor`]. It is the
//!   only async part of the crate and the only one that needs tokio; without it the
//!   crate reads and copies files and nothing more.
//!
//! ## Features
//!
//! * `manage` (default) — the [`manage`] module and its tokio, async-trait and tracing
//!   dependencies.
//! * `__synth`, `__cli`, `__testing` — **unstable**, for this project's own tests,
//!   benchmarks and examples: the synthetic machine generator (`synth`), the logic of
//!   the `vbox` example (`manage::cli`) and `manage::parse::render_machine_readable`.
//!   They are not part of the public API and may change or go in any release.
//!
//! Snapshot trees convert to the shared [`unacloud_core::tree::SnapshotTree`] (ids are
//! uuids without braces) and file sets are [`unacloud_core::files::MigrationSet`]s, so
//! tools treat every backend alike.
#![deny(missing_docs)]

pub mod copy;
pub mod display;
pub mod error;
pub mod location;
#[cfg(feature = "manage")]
pub mod manage;
pub mod settings;
#[cfg(feature = "__synth")]
pub mod synth;
pub mod tracker;
pub mod vdi;

pub use error::{Error, Result};

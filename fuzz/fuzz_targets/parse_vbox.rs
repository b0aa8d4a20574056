//! Fuzz the settings parser and everything computed from a parsed machine.
//!
//! Any input must give `Ok` or a typed error, never a panic, a hang or unbounded
//! memory. When the input parses as a machine, the snapshot tree, the migration set of
//! every state and the file inventory are computed too (without touching the file
//! system), and every `Display` of an error is exercised.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unacloud_vbox::settings::{GlobalRegistry, MachineSettings, ParseLimits};
use unacloud_vbox::tracker::{Machine, MigrationOptions, StateRef, TreeFormat};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Tighter limits than the defaults keep each run fast; the limit checks are part
    // of what is being tested.
    let limits = ParseLimits {
        max_input_bytes: 1 << 20,
        max_depth: 2_000,
        max_tag_bytes: 64 << 10,
        max_text_bytes: 64 << 10,
        max_elements: 200_000,
        ..ParseLimits::default()
    };
    match MachineSettings::parse_str_with_limits(text, &limits) {
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(settings) => {
            let snapshots = settings.snapshots.len();
            let machine = match Machine::from_settings(settings, "/vms/TM/TM.vbox", None) {
                Ok(m) => m,
                Err(e) => {
                    let _ = e.to_string();
                    return;
                }
            };
            let options = MigrationOptions {
                measure_sizes: false,
                ..MigrationOptions::default()
            };
            let _ = machine.migration_set_for(StateRef::Current, &options);
            for i in 0..snapshots.min(64) {
                if let Err(e) = machine.migration_set_for(StateRef::Snapshot(i), &options) {
                    let _ = e.to_string();
                }
            }
            let _ = machine.all_files();
            for format in [TreeFormat::Text, TreeFormat::Dot, TreeFormat::Json] {
                let _ = machine.render_snapshot_tree(format);
            }
        }
    }
    if let Err(e) =
        GlobalRegistry::parse_str_with_limits(text, "/home/u/.config/VirtualBox", &limits)
    {
        let _ = e.to_string();
    }
});

//! The Global Snapshot File Tracker on the command line: which files resume a
//! VirtualBox machine from a snapshot on another host.
//!
//! ```text
//! cargo run --release --example file_tracker -- <machine.vbox> --snapshot <uuid|name|current>
//!     [--global-registry <VirtualBox.xml>] [--preloaded <uuid>]... [--include-removable] [--json]
//! ```
//!
//! Prints a table by default; with `--json` one object:
//! `{"machine":{"uuid","name"},"snapshot":{"uuid","name"},"files":[{"path","role","uuid","bytes"}],
//! "total_bytes","expected_at_destination":[{"uuid","path"}],"external":[…],"warnings":[…]}`.
//! Exit code 0 on success, 2 on bad input (the error on stderr).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde_json::json;
use unacloud::vbox::settings::Uuid;
use unacloud::vbox::tracker::{Machine, MigrationOptions, StateRef};
use unacloud::vbox::Error;

/// Which files resume a VirtualBox machine from a snapshot on another host.
#[derive(Debug, Parser)]
#[command(name = "file_tracker")]
struct Args {
    /// The machine's settings file (`.vbox`).
    machine: PathBuf,
    /// The state to resume: a snapshot uuid, a unique snapshot name, or `current`.
    #[arg(long)]
    snapshot: String,
    /// The global registry (`VirtualBox.xml`) that registers templates and their children.
    #[arg(long)]
    global_registry: Option<PathBuf>,
    /// Uuid of an image the destination already has (e.g. a preloaded multiattach template).
    #[arg(long)]
    preloaded: Vec<String>,
    /// Copy DVD and floppy images too instead of listing them as external.
    #[arg(long)]
    include_removable: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, outermost first.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn run(args: &Args) -> Result<(), String> {
    let mut preloaded = Vec::new();
    for p in &args.preloaded {
        let inner = p.trim().trim_start_matches('{').trim_end_matches('}');
        preloaded.push(
            Uuid::try_parse(inner).map_err(|e| format!("--preloaded {p:?} is not a uuid ({e})"))?,
        );
    }
    let m = Machine::load(&args.machine, args.global_registry.as_deref())
        .map_err(|e: Error| chain(&e))?;
    let options = MigrationOptions {
        include_removable: args.include_removable,
        ..MigrationOptions::default()
    }
    .with_preloaded(preloaded);
    let state = m.select(&args.snapshot).map_err(|e| chain(&e))?;
    let set = m
        .migration_set_for(state, &options)
        .map_err(|e| chain(&e))?;
    let (snap_uuid, snap_name) = match state {
        StateRef::Current => (None, "current".to_owned()),
        StateRef::Snapshot(i) => {
            let s = &m.snapshots()[i];
            (Some(s.uuid.to_string()), s.name.clone())
        }
    };
    if args.json {
        let json = json!({
            "machine": {"uuid": m.uuid().to_string(), "name": m.name()},
            "snapshot": {"uuid": snap_uuid, "name": snap_name},
            "files": set.files,
            "total_bytes": set.total_bytes(),
            "expected_at_destination": set.expected_at_destination,
            "external": set.external,
            "warnings": set.warnings,
        });
        let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
        emit(&format!("{text}\n"));
        return Ok(());
    }
    let mut out = String::new();
    let _ = writeln!(out, "Machine:  {} {{{}}}", m.name(), m.uuid());
    let _ = match &snap_uuid {
        Some(u) => writeln!(out, "Snapshot: {snap_name:?} {{{u}}}"),
        None => writeln!(out, "Snapshot: current state"),
    };
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<12} {:>12}  {:<36}  PATH", "ROLE", "SIZE", "UUID");
    for f in &set.files {
        let _ = writeln!(
            out,
            "{:<12} {:>12}  {:<36}  {}",
            f.role.as_str(),
            f.bytes.map_or_else(|| "missing".to_owned(), human),
            f.uuid.as_deref().unwrap_or("-"),
            f.path.display()
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Total: {} files, {:.2} GB ({} bytes)",
        set.files.len(),
        set.total_bytes() as f64 / 1e9,
        set.total_bytes()
    );
    if !set.expected_at_destination.is_empty() {
        let _ = writeln!(out, "\nExpected at destination (not copied):");
        for e in &set.expected_at_destination {
            let path = e
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let _ = writeln!(out, "  {}  {path}", e.uuid);
        }
    }
    if !set.external.is_empty() {
        let _ = writeln!(out, "\nExternal dependencies (not copied):");
        for e in &set.external {
            let _ = writeln!(out, "  {e}");
        }
    }
    if !set.warnings.is_empty() {
        let _ = writeln!(out, "\nWarnings:");
        for w in &set.warnings {
            let _ = writeln!(out, "  {w}");
        }
    }
    emit(&out);
    Ok(())
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn emit(s: &str) {
    let _ = std::io::stdout().lock().write_all(s.as_bytes());
}

/// Decimal units, as the thesis's tables use (1 GB = 10⁹ bytes).
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

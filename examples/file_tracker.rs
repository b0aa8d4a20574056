//! The Global Snapshot File Tracker on the command line: which files resume a
//! VirtualBox machine from a snapshot on another host, and copying them there.
//!
//! ```text
//! cargo run --release --example file_tracker -- <machine.vbox> --snapshot <uuid|name|current>
//!     [--global-registry <VirtualBox.xml>] [--preloaded <uuid>]... [--include-removable]
//!     [--copy-to <dir> [--verify]] [--json]
//! ```
//!
//! Prints a table by default; with `--json` one object:
//! `{"machine":{"uuid","name"},"snapshot":{"uuid","name"},"files":[{"path","role","uuid","bytes"}],
//! "total_bytes","expected_at_destination":[{"uuid","path"}],"external":[…],"warnings":[…]}`.
//!
//! With `--copy-to <dir>` the set is also copied: its disk chain is verified first,
//! then every file goes to `<dir>` at its place relative to the machine folder
//! (`<dir>/TM.vbox`, `<dir>/Snapshots/…`), whatever the current folder and however
//! the `.vbox` was given. `--verify` also compares BLAKE3 checksums of every copy
//! with its source. A file of the set that is a symbolic link, is not a regular
//! file, or lies outside the machine folder refuses the whole copy before anything
//! is written, as does a `<dir>` that is a symbolic link. Copies keep the sources'
//! permission bits. On a terminal a progress line is drawn on stderr. The JSON object
//! then also holds `"copied":{"dest","files":[{"source","dest","bytes","blake3"}],
//! "bytes","verified"}`.
//!
//! Names and locations from the settings file are printed with control characters
//! escaped (`\n`, `\u{1b}`, …) in the table; JSON holds the exact strings. Errors
//! are one line on stderr with their whole chain of causes; exit code 0 on success,
//! 2 on bad input or a refused or failed copy.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde_json::json;
use unacloud::vbox::copy::{CopyOptions, CopyProgress, CopyReport};
use unacloud::vbox::display::{error_chain, escape_control, escape_path};
use unacloud::vbox::settings::Uuid;
use unacloud::vbox::tracker::{Machine, MigrationOptions, StateRef};

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
    /// Copy the files into this folder (it becomes the machine folder there).
    #[arg(long, value_name = "DIR")]
    copy_to: Option<PathBuf>,
    /// With --copy-to: compare a BLAKE3 checksum of every copy with its source.
    #[arg(long, requires = "copy_to")]
    verify: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let tty = std::io::stderr().is_terminal();
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let code = run(&argv, &mut out, &mut err, tty);
    let _ = out.flush();
    ExitCode::from(code)
}

/// Parses `argv` (program name first), runs, and returns the exit code; `progress`
/// draws a progress line on `err` while copying (for a terminal).
pub fn run(
    argv: &[String],
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
    progress: bool,
) -> u8 {
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = write!(out, "{e}");
                return 0;
            }
            let _ = write!(err, "{e}");
            return 2;
        }
    };
    match run_args(&args, out, err, progress) {
        Ok(()) => 0,
        Err(msg) => {
            let _ = writeln!(err, "error: {msg}");
            2
        }
    }
}

fn run_args(
    args: &Args,
    stdout: &mut dyn std::io::Write,
    stderr: &mut dyn std::io::Write,
    progress: bool,
) -> Result<(), String> {
    let mut preloaded = Vec::new();
    for p in &args.preloaded {
        preloaded.push(
            Uuid::try_parse(p.trim())
                .map_err(|e| format!("--preloaded {:?} is not a uuid ({e})", escape_control(p)))?,
        );
    }
    let m = Machine::load(&args.machine, args.global_registry.as_deref())
        .map_err(|e| error_chain(&e))?;
    let options = MigrationOptions {
        include_removable: args.include_removable,
        ..MigrationOptions::default()
    }
    .with_preloaded(preloaded);
    let state = m.select(&args.snapshot).map_err(|e| error_chain(&e))?;
    let set = m
        .migration_set_for(state, &options)
        .map_err(|e| error_chain(&e))?;
    let (snap_uuid, snap_name) = match state {
        StateRef::Current => (None, "current".to_owned()),
        StateRef::Snapshot(i) => {
            let s = &m.snapshots()[i];
            (Some(s.uuid.to_string()), s.name.clone())
        }
    };
    let copied = match &args.copy_to {
        None => None,
        Some(dest) => {
            let copy_options = CopyOptions::default().checksum(args.verify);
            let mut bar = Progress::new(progress, stderr);
            let result = m.copy_set_to(&set, dest, &copy_options, |p: &CopyProgress<'_>| {
                bar.draw(p)
            });
            bar.finish();
            Some((dest, result.map_err(|e| error_chain(&e))?))
        }
    };
    if args.json {
        let mut json = json!({
            "machine": {"uuid": m.uuid().to_string(), "name": m.name()},
            "snapshot": {"uuid": snap_uuid, "name": snap_name},
            "files": set.files,
            "total_bytes": set.total_bytes(),
            "expected_at_destination": set.expected_at_destination,
            "external": set.external,
            "warnings": set.warnings,
        });
        if let Some((dest, report)) = &copied {
            json["copied"] = copied_json(dest, report, args.verify);
        }
        let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
        emit(stdout, &format!("{text}\n"));
        return Ok(());
    }
    let esc = |s: &str| escape_control(s).into_owned();
    let mut out = String::new();
    let _ = writeln!(out, "Machine:  {} {{{}}}", esc(m.name()), m.uuid());
    let _ = match &snap_uuid {
        Some(u) => writeln!(out, "Snapshot: {:?} {{{u}}}", snap_name),
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
            esc(f.uuid.as_deref().unwrap_or("-")),
            escape_path(&f.path)
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
            let path = e.path.as_deref().map(escape_path).unwrap_or_default();
            let _ = writeln!(out, "  {}  {path}", esc(&e.uuid));
        }
    }
    if !set.external.is_empty() {
        let _ = writeln!(out, "\nExternal dependencies (not copied):");
        for e in &set.external {
            let _ = writeln!(out, "  {}", esc(e));
        }
    }
    if !set.warnings.is_empty() {
        let _ = writeln!(out, "\nWarnings:");
        for w in &set.warnings {
            let _ = writeln!(out, "  {}", esc(w));
        }
    }
    if let Some((dest, report)) = &copied {
        let _ = writeln!(
            out,
            "\nCopied {} files, {} bytes to {}{}",
            report.files.len(),
            report.bytes,
            escape_path(dest),
            if args.verify {
                " (verified: BLAKE3 of every copy matches its source)"
            } else {
                ""
            }
        );
    }
    emit(stdout, &out);
    Ok(())
}

/// What `--json` reports about a copy.
fn copied_json(dest: &std::path::Path, report: &CopyReport, verified: bool) -> serde_json::Value {
    let files: Vec<_> = report
        .files
        .iter()
        .map(|f| {
            json!({
                "source": f.source,
                "dest": f.dest,
                "bytes": f.bytes,
                "blake3": f.blake3,
            })
        })
        .collect();
    json!({
        "dest": dest,
        "files": files,
        "bytes": report.bytes,
        "verified": verified,
    })
}

/// A one-line progress bar redrawn with a carriage return; silent unless enabled.
struct Progress<'w> {
    enabled: bool,
    out: &'w mut dyn std::io::Write,
    last: Option<(u64, usize)>,
}

impl<'w> Progress<'w> {
    fn new(enabled: bool, out: &'w mut dyn std::io::Write) -> Self {
        Progress {
            enabled,
            out,
            last: None,
        }
    }

    fn draw(&mut self, p: &CopyProgress<'_>) {
        if !self.enabled {
            return;
        }
        let permille = (p.bytes_done.saturating_mul(1000))
            .checked_div(p.bytes_total)
            .unwrap_or(1000)
            .min(1000);
        // Redraw only when the shown value changes.
        if self.last == Some((permille, p.file_index)) {
            return;
        }
        self.last = Some((permille, p.file_index));
        const WIDTH: u64 = 30;
        let filled = (permille * WIDTH / 1000) as usize;
        let name = p
            .dest
            .file_name()
            .map(|n| escape_control(&n.to_string_lossy()).into_owned())
            .unwrap_or_default();
        let name: String = name.chars().take(40).collect();
        let _ = write!(
            self.out,
            "\r[{}{}] {:>3}.{}%  file {}/{}  {:<40}",
            "#".repeat(filled),
            " ".repeat(WIDTH as usize - filled),
            permille / 10,
            permille % 10,
            p.file_index + 1,
            p.file_count,
            name
        );
        let _ = self.out.flush();
    }

    fn finish(&mut self) {
        if self.enabled && self.last.is_some() {
            let _ = writeln!(self.out);
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn emit(out: &mut dyn std::io::Write, s: &str) {
    let _ = out.write_all(s.as_bytes());
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

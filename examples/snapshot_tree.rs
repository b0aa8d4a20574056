//! Prints a VirtualBox machine's snapshot tree, the current state's position marked.
//!
//! ```text
//! cargo run --release --example snapshot_tree -- <machine.vbox> [--dot|--json]
//! ```
//!
//! Text (default) marks the snapshot the current state hangs below with `*`; DOT adds a
//! dashed `current state` node; JSON is `{"current": uuid|null, "snapshots": [...]}`
//! with children nested. Text output escapes control characters in names (`\n`,
//! `\u{1b}`, …) so that a hostile settings file cannot forge rows; DOT and JSON hold
//! the strings by their own escaping rules. Exit code 0 on success, 2 on bad input
//! (the error on stderr, with its whole chain of causes).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use unacloud::vbox::display::{error_chain, escape_control};
use unacloud::vbox::tracker::{Machine, TreeFormat};

/// Prints a VirtualBox machine's snapshot tree.
#[derive(Debug, Parser)]
#[command(name = "snapshot_tree")]
struct Args {
    /// The machine's settings file (`.vbox`).
    machine: PathBuf,
    /// Graphviz DOT output.
    #[arg(long, conflicts_with = "json")]
    dot: bool,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let code = run(&argv, &mut out, &mut err);
    let _ = out.flush();
    ExitCode::from(code)
}

/// Parses `argv` (program name first), prints the tree, and returns the exit code.
pub fn run(argv: &[String], out: &mut dyn std::io::Write, err: &mut dyn std::io::Write) -> u8 {
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
    let format = if args.dot {
        TreeFormat::Dot
    } else if args.json {
        TreeFormat::Json
    } else {
        TreeFormat::Text
    };
    let result = Machine::load(&args.machine, None).and_then(|m| {
        let out = m.render_snapshot_tree(format)?;
        Ok((m, out))
    });
    match result {
        Ok((m, tree)) => {
            let mut text = String::new();
            if format == TreeFormat::Text {
                text.push_str(&format!("{} {{{}}}\n", escape_control(m.name()), m.uuid()));
                if m.snapshots().is_empty() {
                    text.push_str("(no snapshots)\n");
                }
            }
            text.push_str(&tree);
            if format == TreeFormat::Json {
                text.push('\n');
            }
            // A closed pipe (`| head`) is not an error.
            let _ = out.write_all(text.as_bytes());
            0
        }
        Err(e) => {
            let _ = writeln!(err, "error: {}", error_chain(&e));
            2
        }
    }
}

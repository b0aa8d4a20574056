//! Prints a VirtualBox machine's snapshot tree, the current state's position marked.
//!
//! ```text
//! cargo run --release --example snapshot_tree -- <machine.vbox> [--dot|--json]
//! ```
//!
//! Text (default) marks the snapshot the current state hangs below with `*`; DOT adds a
//! dashed `current state` node; JSON is `{"current": uuid|null, "snapshots": [...]}`
//! with children nested. Exit code 0 on success, 2 on bad input (the error on stderr).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
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

fn main() -> ExitCode {
    let args = Args::parse();
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
        Ok((m, out)) => {
            let mut text = String::new();
            if format == TreeFormat::Text {
                text.push_str(&format!("{} {{{}}}\n", m.name(), m.uuid()));
                if m.snapshots().is_empty() {
                    text.push_str("(no snapshots)\n");
                }
            }
            text.push_str(&out);
            if format == TreeFormat::Json {
                text.push('\n');
            }
            // A closed pipe (`| head`) is not an error.
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::from(2)
        }
    }
}

//! `unacloud-gs`: the global-snapshot daemons (`metadata`, `launcher`), the operator's
//! commands (`trigger`: take a global snapshot; `resume`: restore the application from
//! one; `catalog`: list the completed ones) and the RCPBT test programs. `unacloud-gs
//! --help` describes every subcommand and flag; see also `unacloud_snapshot::net::cli`.
//!
//! Logs go to standard error, at the level `RUST_LOG` sets (default `info`).

fn main() -> std::process::ExitCode {
    unacloud_snapshot::net::cli::init_tracing();
    let args: Vec<String> = std::env::args().skip(1).collect();
    unacloud_snapshot::net::cli::main(&args)
}

//! `unacloud-gs`: the global-snapshot daemons (metadata server, launcher), the operator's
//! triggers (`start`: take a global snapshot; `resume`: restore the application from one)
//! and the RCPBT test programs. See `unacloud_snapshot::net::cli` for the flags.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    unacloud_snapshot::net::cli::main(&args)
}

//! Shared by the scenario examples: logging to stderr, and running a scenario until it
//! ends or the user stops it.

/// Logs to stderr; `RUST_LOG` chooses what (errors only by default).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs `scenario` on a two-worker tokio runtime until it finishes, or until SIGINT
/// (Ctrl-C) or SIGTERM arrives: then the scenario's future is dropped, which tears down
/// whatever it created, and `Ok(None)` is returned.
pub fn run_until_signal<F: std::future::Future>(scenario: F) -> std::io::Result<Option<F::Output>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    Ok(rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        let terminated = async move {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = scenario => Some(r),
            _ = tokio::signal::ctrl_c() => None,
            _ = terminated => None,
        }
    }))
}

/// Runs a lab with [`run_until_signal`] and turns how it ended into what the example
/// prints and exits with: its report, or the exit code after a line on stderr (1: the
/// runtime or the lab failed, 130: interrupted, after which `removed` says what the lab
/// tore down).
pub fn run_lab<T, E: std::fmt::Display>(
    lab: impl std::future::Future<Output = Result<T, E>>,
    removed: &str,
) -> Result<T, std::process::ExitCode> {
    match run_until_signal(lab) {
        Ok(Some(Ok(report))) => Ok(report),
        Ok(Some(Err(e))) => {
            eprintln!("error: {e}");
            Err(std::process::ExitCode::FAILURE)
        }
        Ok(None) => {
            eprintln!("interrupted: {removed}");
            Err(std::process::ExitCode::from(130))
        }
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            Err(std::process::ExitCode::FAILURE)
        }
    }
}

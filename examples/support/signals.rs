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

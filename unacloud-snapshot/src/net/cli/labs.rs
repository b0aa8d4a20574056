//! The labs' re-executed subcommands: a lab's reaper and the RCPBT ring across network
//! namespaces.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::args::{ReapArgs, RingNetnsArgs};
use super::{cancel_on_signals, runtime};
use crate::net::{Error, Result};

/// Waits for the lab's death (SIGTERM from the kernel, [`crate::netns::DIE_WITH_PARENT_ENV`])
/// and removes what it left. A lab that ends normally kills its reaper with SIGKILL first,
/// so nothing is done twice.
pub(super) fn reap(a: ReapArgs) -> Result<()> {
    let alive = crate::netns::arm_parent_death_signal().ok_or_else(|| Error::InvalidConfig {
        reason: format!(
            "reap is started by a lab, with {} set",
            crate::netns::DIE_WITH_PARENT_ENV
        ),
    })?;
    if alive {
        runtime(1)?.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).map_err(|source| Error::Network {
                peer: "SIGTERM".to_string(),
                action: "install handler for",
                source,
            })?;
            term.recv().await;
            Ok::<(), Error>(())
        })?;
    }
    #[cfg(feature = "hypervisor")]
    {
        let killed = unacloud_core::qemu::kill_all_under(&a.dir);
        if killed > 0 {
            tracing::warn!(vms = killed, dir = %a.dir.display(), "killed the VMs of a lab that died");
        }
    }
    let deleted = crate::netns::remove_lab(&a.prefix, &a.dir);
    tracing::warn!(namespaces = deleted.len(), prefix = %a.prefix, "removed what a lab that died left");
    Ok(())
}

pub(super) fn ring_netns(a: RingNetnsArgs) -> Result<()> {
    let program = std::env::current_exe().map_err(|e| Error::InvalidConfig {
        reason: format!("cannot find this program's path: {e}"),
    })?;
    let mut cfg =
        crate::net::ring::RingNetnsConfig::new(a.peers, a.tokens, a.snapshots, program, Vec::new());
    cfg.snapshot_delay = Duration::from_millis(a.snapshot_delay_ms);
    cfg.snapshot_timeout = Duration::from_secs(5).max(cfg.snapshot_delay * 4);
    cfg.deadline = Duration::from_secs(600);
    if let Some(b) = a.backend {
        cfg.backend = b;
    }
    crate::netns::probe()?;
    let report = runtime(2)?.block_on(async move {
        let token = CancellationToken::new();
        cancel_on_signals(token.clone())?;
        tokio::select! {
            r = crate::net::ring::run_ring_netns(cfg) => r,
            _ = token.cancelled() => Err(Error::Rcpbt {
                reason: "interrupted; namespaces, rules and processes were removed".to_string(),
            }),
        }
    })?;
    if a.json {
        println!("{}", report.json_summary());
    } else {
        println!("{}", report.human_summary());
        if let (Some(m), Some(p)) = (
            crate::net::ring::median(&report.overhead_ms),
            crate::net::ring::percentile(&report.overhead_ms, 95.0),
        ) {
            println!("coordination overhead: median {m:.2} ms, p95 {p:.2} ms");
        }
    }
    Ok(())
}

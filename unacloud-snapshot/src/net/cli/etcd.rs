//! The control plane on etcd: the `candidate` subcommand, `--control etcd` for the
//! launcher, `trigger` and `resume`, and their stand-ins that refuse when the program
//! was built without the `etcd` feature.

#[cfg(feature = "etcd")]
use std::io::Write;
#[cfg(feature = "etcd")]
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::args::{CandidateArgs, ControlArgs};
#[cfg(feature = "etcd")]
use super::{base_config, cancel_on_signals, runtime};
use crate::net::daemon::{DaemonConfig, LauncherEvent, LauncherOptions};
use crate::net::{Error, Result};
#[cfg(feature = "etcd")]
use crate::protocol::ClusterId;
use crate::protocol::GlobalSnapshotId;

#[cfg(not(feature = "etcd"))]
pub(super) fn no_etcd() -> Error {
    Error::InvalidConfig {
        reason: "--control etcd: this program was built without the `etcd` feature".to_string(),
    }
}

#[cfg(feature = "etcd")]
type EtcdControlArg = crate::net::daemon::EtcdControl;
#[cfg(not(feature = "etcd"))]
type EtcdControlArg = ();

#[cfg(feature = "etcd")]
fn etcd_endpoints(list: &str) -> Result<Vec<String>> {
    crate::control::EtcdConfig::parse_endpoints(list).map_err(|e| match e {
        crate::control::ControlError::InvalidConfig { reason } => Error::InvalidConfig { reason },
        other => other.into(),
    })
}

#[cfg(feature = "etcd")]
pub(super) fn etcd_control(c: &ControlArgs) -> Result<EtcdControlArg> {
    let list = c.etcd.as_deref().ok_or_else(|| Error::InvalidConfig {
        reason: "--control etcd needs --etcd ENDPOINTS".to_string(),
    })?;
    Ok(crate::net::daemon::EtcdControl {
        endpoints: etcd_endpoints(list)?,
        lease_ttl: Duration::from_millis(c.lease_ttl_ms.unwrap_or(5000)),
    })
}

#[cfg(not(feature = "etcd"))]
pub(super) fn etcd_control(_: &ControlArgs) -> Result<EtcdControlArg> {
    Err(no_etcd())
}

#[cfg(feature = "etcd")]
pub(super) async fn launcher_etcd(
    cfg: &DaemonConfig,
    control: &EtcdControlArg,
    opts: LauncherOptions,
    token: CancellationToken,
    on_event: impl FnMut(LauncherEvent) + Send,
) -> Result<()> {
    crate::net::daemon::run_launcher_etcd(cfg, control, opts, token, on_event).await
}

#[cfg(not(feature = "etcd"))]
pub(super) async fn launcher_etcd(
    _: &DaemonConfig,
    _: &EtcdControlArg,
    _: LauncherOptions,
    _: CancellationToken,
    _: impl FnMut(LauncherEvent) + Send,
) -> Result<()> {
    Err(no_etcd())
}

#[cfg(feature = "etcd")]
type EtcdTrigger = crate::control::catalog::Trigger;
#[cfg(not(feature = "etcd"))]
type EtcdTrigger = ();

#[cfg(feature = "etcd")]
pub(super) fn etcd_trigger_global_snapshot() -> EtcdTrigger {
    crate::control::catalog::Trigger::GlobalSnapshot
}
#[cfg(not(feature = "etcd"))]
pub(super) fn etcd_trigger_global_snapshot() -> EtcdTrigger {}

#[cfg(feature = "etcd")]
pub(super) fn etcd_trigger_resume(gs: Option<GlobalSnapshotId>) -> EtcdTrigger {
    crate::control::catalog::Trigger::Resume { gs }
}
#[cfg(not(feature = "etcd"))]
pub(super) fn etcd_trigger_resume(_: Option<GlobalSnapshotId>) -> EtcdTrigger {}

/// Queues a trigger in etcd, for the elected coordinator (from any host).
#[cfg(feature = "etcd")]
pub(super) fn etcd_trigger(cfg: &DaemonConfig, c: &ControlArgs, t: EtcdTrigger) -> Result<()> {
    let control = etcd_control(c)?;
    let ec = crate::control::EtcdConfig::new(control.endpoints, ClusterId(cfg.cluster));
    runtime(1)?
        .block_on(async move {
            let etcd = crate::control::Etcd::connect(&ec).await?;
            crate::control::catalog::put_trigger(&etcd, &t).await
        })
        .map(|_| ())
        .map_err(Error::from)
}

#[cfg(not(feature = "etcd"))]
pub(super) fn etcd_trigger(_: &DaemonConfig, _: &ControlArgs, _: EtcdTrigger) -> Result<()> {
    Err(no_etcd())
}

#[cfg(feature = "etcd")]
pub(super) fn candidate(a: CandidateArgs) -> Result<()> {
    let mut cfg = base_config(&a.config, Some(&a.key), None)?;
    if let Some(v) = a.snapshot_timeout_ms {
        cfg.snapshot_timeout_ms = Some(v);
    }
    if let Some(v) = a.precheck_timeout_ms {
        cfg.precheck_timeout_ms = Some(v);
    }
    let control = crate::net::daemon::EtcdControl {
        endpoints: etcd_endpoints(&a.etcd)?,
        lease_ttl: Duration::from_millis(a.lease_ttl_ms.unwrap_or(5000)),
    };
    let name = a.name.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "candidate".to_string())
    });
    let json = a.events_json;
    runtime(1)?.block_on(async {
        let token = CancellationToken::new();
        cancel_on_signals(token.clone())?;
        crate::net::daemon::run_candidate_daemon(&cfg, &control, name, a.listen, token, |r| {
            if json {
                if let Ok(line) = serde_json::to_string(&r) {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
            } else {
                eprintln!("{r:?}");
            }
        })
        .await
    })
}

#[cfg(not(feature = "etcd"))]
pub(super) fn candidate(_: CandidateArgs) -> Result<()> {
    Err(no_etcd())
}

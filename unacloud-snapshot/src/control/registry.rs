//! Host registration and liveness: ids from a transaction, a liveness key under a lease.
//!
//! [`register`] replaces the metadata server's INSERT. The id comes from the counter
//! `ids/next`, advanced in the same transaction that records the registration, so two
//! hosts registering at once never get the same id and an id is never handed out twice.
//! The registration itself (`reg/…`, `hosts/<id>`) is permanent; the host's *liveness*
//! is the key `alive/<id>`, attached to a lease that [`Lease`] keeps alive in the
//! background. When the host dies or is cut off, etcd deletes the key after the lease's
//! TTL.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{from_json, to_json, ControlError, Etcd, Result};
use crate::protocol::ParticipantId;

/// A registration as stored in `hosts/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host's id (≥ 1; id 0 is the protocol's coordinator role).
    pub id: u32,
    /// The host's address, as the agent gave it.
    pub addr: String,
    /// Its VMs.
    pub vms: Vec<String>,
}

/// Attempts of the id-allocation transaction before giving up ([`ControlError::Contended`]).
/// A lost race backs off for a random time that grows with the attempts (up to 100 ms),
/// so that a boot storm — a whole lab switched on at once — spreads out instead of
/// retrying in lock step.
const MAX_ATTEMPTS: u32 = 400;

fn registration_hash(addr: &str, vms: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(to_json(&(addr, vms)));
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Registers (`addr`, `vms`) and returns its id: a new one from the counter, or the id of
/// an identical earlier registration (a host coming back after a reboot keeps its id).
/// Does not make the host alive: see [`Lease::start`].
pub async fn register(etcd: &Etcd, addr: &str, vms: &[String]) -> Result<ParticipantId> {
    if vms.is_empty() {
        return Err(ControlError::InvalidConfig {
            reason: "a registration names at least one VM".to_string(),
        });
    }
    let reg_rel = format!("reg/{}", registration_hash(addr, vms));
    let reg_key = etcd.key(&reg_rel);
    let next_key = etcd.key("ids/next");
    for attempt in 0..MAX_ATTEMPTS {
        if let Some((v, _)) = etcd.get(&reg_rel).await? {
            return parse_id(&reg_key, &v).map(ParticipantId);
        }
        let (next, guard) = match etcd.get("ids/next").await? {
            Some((v, rev)) => (
                parse_id(&next_key, &v)?,
                Compare::mod_revision(next_key.clone(), CompareOp::Equal, rev),
            ),
            None => (1, Compare::version(next_key.clone(), CompareOp::Equal, 0)),
        };
        let Some(after) = next.checked_add(1) else {
            return Err(ControlError::Invalid {
                key: next_key,
                reason: "the id counter is exhausted".to_string(),
            });
        };
        let record = HostRecord {
            id: next,
            addr: addr.to_string(),
            vms: vms.to_vec(),
        };
        let txn = Txn::new()
            .when([
                guard,
                Compare::version(reg_key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(next_key.clone(), after.to_string(), None),
                TxnOp::put(reg_key.clone(), next.to_string(), None),
                TxnOp::put(etcd.key(&format!("hosts/{next}")), to_json(&record), None),
            ]);
        if etcd.txn("allocate a host id", txn).await?.succeeded() {
            return Ok(ParticipantId(next));
        }
        let cap_ms = 1u64 << attempt.min(7);
        let pause = rand::random::<u64>() % cap_ms.min(100) + 1;
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Err(ControlError::Contended {
        op: "allocate a host id".to_string(),
        attempts: MAX_ATTEMPTS,
    })
}

fn parse_id(key: &str, v: &[u8]) -> Result<u32> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or_else(|| ControlError::Invalid {
            key: key.to_string(),
            reason: format!("{:?} is not an id", String::from_utf8_lossy(v)),
        })
}

/// Every registration, by id.
pub async fn hosts(etcd: &Etcd) -> Result<Vec<HostRecord>> {
    let mut v = Vec::new();
    for (k, bytes) in etcd.list("hosts/").await? {
        v.push(from_json::<HostRecord>(&k, &bytes)?);
    }
    v.sort_by_key(|h| h.id);
    Ok(v)
}

/// The ids whose liveness key exists now (their lease is alive).
pub async fn alive(etcd: &Etcd) -> Result<Vec<ParticipantId>> {
    let mut v: Vec<ParticipantId> = etcd
        .list("alive/")
        .await?
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix("alive/")?.parse().ok().map(ParticipantId))
        .collect();
    v.sort();
    Ok(v)
}

/// What a [`Lease`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Kept alive; the value is the lease id.
    Alive(i64),
    /// The last renewal failed; retrying (etcd unreachable or electing a leader).
    Retrying,
    /// The lease expired before it could be renewed; a new one was granted and the key
    /// written again under it (the host was reported unreachable meanwhile).
    Renewed(i64),
    /// Stopped.
    Stopped,
}

/// A lease kept alive in the background, with keys attached to it.
#[derive(Debug)]
pub struct Lease {
    id: i64,
    state: watch::Receiver<LeaseState>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Lease {
    /// Grants a lease of `ttl` (whole seconds, at least 1), writes `key_rel` = `value`
    /// under it when given, and keeps it alive (renewing every third of the TTL). When a
    /// renewal finds the lease expired (etcd was unreachable for longer than the TTL), a
    /// new lease is granted and the key written again, unless `renew_after_expiry` is
    /// false: then the state becomes [`LeaseState::Stopped`] and the task ends.
    pub async fn start(
        etcd: &Etcd,
        ttl: Duration,
        key_rel: Option<&str>,
        value: Vec<u8>,
        renew_after_expiry: bool,
    ) -> Result<Self> {
        let secs = ttl.as_secs().max(1) as i64;
        let key = key_rel.map(|k| etcd.key(k));
        let id = grant_and_put(etcd, secs, key.as_deref(), &value).await?;
        let (tx, rx) = watch::channel(LeaseState::Alive(id));
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_alive(
            etcd.clone(),
            secs,
            key,
            value,
            id,
            tx,
            stop.clone(),
            renew_after_expiry,
        ));
        Ok(Self {
            id,
            state: rx,
            stop,
            task: Some(task),
        })
    }

    /// The lease id granted first.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Follows the lease's state.
    pub fn state(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Stops renewing and revokes the lease (its keys go at once). Best effort: if etcd
    /// is unreachable the lease just expires.
    pub async fn revoke(mut self, etcd: &Etcd) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let id = match *self.state.borrow() {
            LeaseState::Alive(id) | LeaseState::Renewed(id) => id,
            _ => self.id,
        };
        let revoke = etcd.call(
            || format!("revoke lease {id:#x}"),
            |mut c| async move { c.lease_revoke(id).await },
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), revoke).await;
    }

    /// Stops renewing without revoking: the keys disappear when the TTL runs out, as if
    /// the host had been switched off.
    pub fn abandon(self) {
        self.stop.cancel();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn grant_and_put(etcd: &Etcd, secs: i64, key: Option<&str>, value: &[u8]) -> Result<i64> {
    let id = etcd
        .call(
            || "grant a lease".to_string(),
            |mut c| async move { c.lease_grant(secs, None).await },
        )
        .await?
        .id();
    if let Some(key) = key {
        etcd.put(key, value, Some(id)).await?;
    }
    Ok(id)
}

/// Grants a new lease in place of the expired `id` and writes the key under it again;
/// whether that worked (the state says so either way).
async fn replace_expired(
    etcd: &Etcd,
    secs: i64,
    key: Option<&str>,
    value: &[u8],
    id: &mut i64,
    tx: &watch::Sender<LeaseState>,
) -> bool {
    match grant_and_put(etcd, secs, key, value).await {
        Ok(new) => {
            tracing::info!(old = *id, new, "the lease had expired; took a new one");
            *id = new;
            let _ = tx.send(LeaseState::Renewed(new));
            true
        }
        Err(e) => {
            tracing::debug!(lease = *id, error = %e, "the lease expired and no new one could be granted yet");
            let _ = tx.send(LeaseState::Retrying);
            false
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn keep_alive(
    etcd: Etcd,
    secs: i64,
    key: Option<String>,
    value: Vec<u8>,
    mut id: i64,
    tx: watch::Sender<LeaseState>,
    stop: CancellationToken,
    renew_after_expiry: bool,
) {
    let period = Duration::from_millis((secs as u64 * 1000 / 3).max(100));
    'outer: loop {
        // One keep-alive stream; reopened when it breaks (an etcd member died).
        let mut client = etcd.client();
        // Bounded: over a connection that silently died the request would wait.
        let opened = tokio::select! {
            _ = stop.cancelled() => break 'outer,
            r = tokio::time::timeout(period, client.lease_keep_alive(id)) => r,
        };
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(why))) => {
                // The lease is gone (it expired while etcd could not be reached).
                tracing::debug!(lease = id, %why, "the lease is gone");
                if !renew_after_expiry {
                    let _ = tx.send(LeaseState::Stopped);
                    return;
                }
                if !replace_expired(&etcd, secs, key.as_deref(), &value, &mut id, &tx).await {
                    tokio::select! {
                        _ = stop.cancelled() => break 'outer,
                        _ = tokio::time::sleep(period / 2) => {}
                    }
                }
                continue 'outer;
            }
            other => {
                tracing::debug!(
                    lease = id,
                    error = %other.map_or_else(|_| "timed out".to_string(), |r| r.err().map(|e| e.to_string()).unwrap_or_default()),
                    "cannot open the lease keep-alive; retrying"
                );
                let _ = tx.send(LeaseState::Retrying);
                etcd.rotate();
                tokio::select! {
                    _ = stop.cancelled() => break 'outer,
                    _ = tokio::time::sleep(period / 2) => continue 'outer,
                }
            }
        };
        loop {
            let renewed = async {
                keeper.keep_alive().await?;
                stream.message().await
            };
            let r = tokio::select! {
                _ = stop.cancelled() => break 'outer,
                r = tokio::time::timeout(period, renewed) => r,
            };
            match r {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                    if *tx.borrow() != LeaseState::Alive(id) {
                        let _ = tx.send(LeaseState::Alive(id));
                    }
                }
                Ok(Ok(Some(_))) => {
                    // TTL 0: the lease expired while we could not reach etcd.
                    if !renew_after_expiry {
                        let _ = tx.send(LeaseState::Stopped);
                        return;
                    }
                    replace_expired(&etcd, secs, key.as_deref(), &value, &mut id, &tx).await;
                    continue 'outer;
                }
                other => {
                    tracing::debug!(lease = id, outcome = ?other.map(|r| r.map(|_| ())), "lease renewal failed; retrying");
                    let _ = tx.send(LeaseState::Retrying);
                    etcd.rotate();
                    tokio::select! {
                        _ = stop.cancelled() => break 'outer,
                        _ = tokio::time::sleep(period / 4) => {}
                    }
                    continue 'outer;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break 'outer,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }
    let _ = tx.send(LeaseState::Stopped);
}

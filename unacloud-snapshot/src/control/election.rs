//! Coordinator election: every agent campaigns, the winner holds the coordinator role.
//!
//! Built on etcd's election service. A candidate campaigns with a lease; etcd makes the
//! candidate whose key is oldest the leader, and [`campaign`] returns when that is this
//! one. As long as this candidate's key exists with the creation revision it had when
//! it won, no other candidate can be leader (a key created later has a higher revision),
//! so [`Leadership::guard`] — "that key still has that revision" — is the condition every
//! write of the coordinator carries. When the candidate's lease expires (its host died,
//! was cut off, or the process was paused past the TTL), etcd deletes the key, the next
//! candidate wins, and the old one's writes fail ([`super::ControlError::Fenced`]).

use std::net::SocketAddr;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, LeaderKey};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::registry::{Lease, LeaseState};
use super::{from_json, to_json, ControlError, Etcd, Result};

/// What the leader announces: where participants reach the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorInfo {
    /// The candidate's name (its host, for people).
    pub candidate: String,
    /// The coordinator's protocol address (participants dial it).
    pub addr: SocketAddr,
    /// The process holding the role.
    pub pid: u32,
}

/// The election's name (key prefix).
pub fn election_name(etcd: &Etcd) -> String {
    etcd.key("election/coordinator")
}

/// The coordinator role, won.
#[derive(Debug)]
pub struct Leadership {
    key: LeaderKey,
    lease: Lease,
    info: CoordinatorInfo,
}

impl Leadership {
    /// The fencing condition: this leadership's key still exists with the revision it had
    /// when the election was won.
    pub fn guard(&self) -> Compare {
        Compare::create_revision(self.key.key().to_vec(), CompareOp::Equal, self.key.rev())
    }

    /// The leader key (deleted when the role is lost).
    pub fn key_bytes(&self) -> &[u8] {
        self.key.key()
    }

    /// The election revision (the creation revision of the leader key): increases with
    /// every new leader.
    pub fn revision(&self) -> i64 {
        self.key.rev()
    }

    /// What this leader announced.
    pub fn info(&self) -> &CoordinatorInfo {
        &self.info
    }

    /// Resolves when the role is lost for sure: the lease expired (it is not renewed
    /// after expiry) or it was stopped.
    pub async fn lost(&self) {
        let mut st = self.lease.state();
        loop {
            if matches!(*st.borrow(), LeaseState::Stopped) {
                return;
            }
            if st.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives the role up at once (the lease is revoked, the next candidate wins).
    pub async fn resign(self, etcd: &Etcd) {
        self.lease.revoke(etcd).await;
    }
}

/// Campaigns for the coordinator role with a lease of `ttl`; returns once elected, or
/// `None` when `stop` is cancelled first.
pub async fn campaign(
    etcd: &Etcd,
    info: CoordinatorInfo,
    ttl: Duration,
    stop: &CancellationToken,
) -> Result<Option<Leadership>> {
    let lease = Lease::start(etcd, ttl, None, Vec::new(), false).await?;
    let mut c = etcd.waiting_client();
    let won = tokio::select! {
        _ = stop.cancelled() => {
            lease.revoke(etcd).await;
            return Ok(None);
        }
        r = c.campaign(election_name(etcd), to_json(&info), lease.id()) => r,
    };
    let resp = match won {
        Ok(r) => r,
        Err(e) => {
            lease.revoke(etcd).await;
            // Next time, another member.
            etcd.rotate();
            return Err(ControlError::Etcd {
                op: "campaign for the coordinator role".to_string(),
                source: e,
            });
        }
    };
    let Some(key) = resp.leader().cloned() else {
        lease.revoke(etcd).await;
        return Err(ControlError::Invalid {
            key: election_name(etcd),
            reason: "the election answered without a leader key".to_string(),
        });
    };
    Ok(Some(Leadership { key, lease, info }))
}

/// The current leader's announcement, or `None` when nobody holds the role.
pub async fn current_leader(etcd: &Etcd) -> Result<Option<CoordinatorInfo>> {
    let name = election_name(etcd);
    // The leader is the candidate key with the lowest creation revision.
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_sort(
            etcd_client::SortTarget::Create,
            etcd_client::SortOrder::Ascend,
        )
        .with_limit(1);
    let prefix = format!("{name}/");
    let resp = etcd
        .call(
            || "read the election's leader".to_string(),
            |mut c| {
                let (prefix, opts) = (prefix.clone(), opts.clone());
                async move { c.get(prefix, Some(opts)).await }
            },
        )
        .await?;
    match resp.kvs().first() {
        None => Ok(None),
        Some(kv) => from_json(&name, kv.value()).map(Some),
    }
}

/// Follows the leader's announcement, polling every `period`: `None` while nobody leads;
/// while etcd cannot be reached the last answer stands. Stops with `stop`.
pub fn follow_leader(
    etcd: Etcd,
    period: Duration,
    stop: CancellationToken,
) -> watch::Receiver<Option<CoordinatorInfo>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            if let Ok(now) = current_leader(&etcd).await {
                tx.send_if_modified(|cur| {
                    if *cur != now {
                        *cur = now;
                        true
                    } else {
                        false
                    }
                });
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    });
    rx
}

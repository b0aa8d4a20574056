//! The control plane on etcd (feature `etcd`): no single point of failure.
//!
//! With the embedded control plane (the default) one metadata server registers the hosts
//! and one coordinator — the host with id 0 — keeps the catalog of completed global
//! snapshots in a file. Either PC can be switched off like any other desktop of the lab,
//! and global snapshots stop with it. This module moves that state to an etcd cluster
//! (Raft: it survives the loss of a minority of its members):
//!
//! * **Membership with leases** ([`registry`]): each host agent registers its VMs and
//!   keeps a *liveness key* alive under a lease. Ids are allocated by a transaction on a
//!   counter, so they are never reused; a host that registers again with the same address
//!   and VMs (after a reboot) gets its id back. Lease expiry means "host unreachable" and
//!   feeds the deployment life cycle ([`monitor`]: Reconnecting, then Failed).
//! * **Coordinator election** ([`election`]): every agent can be the coordinator; the role
//!   goes to the winner of an etcd election. The winner's leader key is the fencing token:
//!   every write of the coordinator is a transaction conditioned on that key still having
//!   the creation revision it had when the election was won.
//! * **The catalog** ([`catalog`]): the epoch counters and one key per completed global
//!   snapshot. A global snapshot id is reserved in etcd (under the leader condition)
//!   *before* any message carrying it leaves the coordinator, and a completed one is
//!   recorded with a create-only transaction under the same condition. So two
//!   coordinators can never both use or record an id, a coordinator that comes back
//!   after losing its role cannot act (its writes fail and its node stops), and the
//!   participants' epoch rules (`PROTOCOL.md` §6.3) refuse its late messages once the new
//!   coordinator has used a higher id.
//! * **Triggers and results**: operators' triggers are keys the leader consumes; the
//!   timing results (the thesis's CSV) are kept per global snapshot and exported from etcd.
//! * **A loopback cluster** ([`cluster`]) for labs and tests: `n` etcd members on
//!   127.0.0.1 (or an address of a lab namespace), each with its own data directory and
//!   ports, all removed when it is dropped.
//!
//! [`agent`] runs the two daemons: the host agent (registration, lease, a participant that
//! follows the elected coordinator) and the coordinator candidate.
//!
//! # Keys
//!
//! Everything lives under `/unacloud/<cluster>/`:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `ids/next` | the next host id (decimal) | none |
//! | `reg/<sha-256 of address and VMs>` | the id of that registration | none |
//! | `hosts/<id>` | [`registry::HostRecord`] (JSON) | none |
//! | `alive/<id>` | the agent's process id | the host's |
//! | `election/coordinator/…` | [`election::CoordinatorInfo`] (JSON), one key per candidate | the candidate's |
//! | `catalog/epochs` | [`catalog::Epochs`] (JSON) | none |
//! | `catalog/gs/<id, 20 digits>` | [`catalog::RecordedSnapshot`] (JSON): a completed global snapshot with its times | none |
//! | `triggers/<uuid>` | [`catalog::Trigger`] (JSON) | none |

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::ClusterId;

pub mod agent;
pub mod catalog;
pub mod cluster;
pub mod election;
pub mod monitor;
pub mod registry;

/// Result of the control plane.
pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// Errors of the control plane. Each names the operation and keeps its cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// An etcd request failed (unreachable cluster, no quorum, timeout …).
    #[error("etcd: cannot {op}")]
    Etcd {
        /// What was being done.
        op: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// This coordinator lost its role (its leader key is gone or was replaced): the write
    /// was refused and nothing it asked for happened.
    #[error("fenced: {what} refused, this coordinator is no longer the elected one")]
    Fenced {
        /// What was refused.
        what: String,
    },
    /// A key holds something this implementation cannot read.
    #[error("etcd key {key} holds an unreadable value")]
    Corrupt {
        /// The key.
        key: String,
        /// Why it could not be read.
        #[source]
        source: serde_json::Error,
    },
    /// A key holds a value of the wrong shape (not a number, a foreign cluster …).
    #[error("etcd key {key}: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A create-only write found the key already there (an id recorded twice would be
    /// the result): refused.
    #[error("etcd key {key} already exists; refusing to overwrite it")]
    AlreadyExists {
        /// The key.
        key: String,
    },
    /// A transaction kept losing races with other writers.
    #[error("{op}: still contended after {attempts} attempts")]
    Contended {
        /// What was being done.
        op: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The lease of this agent expired (etcd unreachable for longer than its TTL).
    #[error("the lease {lease:#x} expired")]
    LeaseExpired {
        /// The lease id.
        lease: i64,
    },
    /// A local cluster could not be started or controlled.
    #[error("etcd cluster: {what}")]
    Cluster {
        /// What failed.
        what: String,
        /// The I/O error, when there is one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// A configuration value is out of range.
    #[error("invalid control-plane configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
}

impl ControlError {
    pub(crate) fn etcd(op: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> Self {
        let op = op.into();
        move |source| ControlError::Etcd { op, source }
    }

    /// Whether the error means "this coordinator must stop acting".
    pub fn is_fenced(&self) -> bool {
        matches!(self, ControlError::Fenced { .. })
    }
}

/// How to reach etcd and how this cluster's keys are laid out.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client endpoints (`http://127.0.0.1:2379`, …); more than one for fail-over.
    pub endpoints: Vec<String>,
    /// The cluster whose keys to use (`/unacloud/<cluster>/`).
    pub cluster: ClusterId,
    /// Timeout of each request.
    pub request_timeout: Duration,
    /// Timeout of establishing a connection to an endpoint.
    pub connect_timeout: Duration,
}

impl EtcdConfig {
    /// A configuration with 2 s request and 1 s connect timeouts.
    pub fn new(endpoints: Vec<String>, cluster: ClusterId) -> Self {
        Self {
            endpoints,
            cluster,
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        }
    }

    /// Parses a comma-separated endpoint list (`host:port` or URLs).
    pub fn parse_endpoints(list: &str) -> Result<Vec<String>> {
        let v: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.to_string()
                } else {
                    format!("http://{s}")
                }
            })
            .collect();
        if v.is_empty() {
            return Err(ControlError::InvalidConfig {
                reason: format!("no etcd endpoint in {list:?}"),
            });
        }
        Ok(v)
    }
}

/// A connection to etcd for one cluster: one client per endpoint, and the key prefix.
///
/// Requests go to one member at a time. When a member does not answer (it died, or it
/// has no leader: requests ask for one), the request moves on to the next member and is
/// retried, a bounded number of times, so that the loss of a minority of the cluster is
/// invisible to callers. Every write of this module is safe to repeat: a repeated
/// compare-and-swap finds its own earlier effect and says so.
#[derive(Clone)]
pub struct Etcd {
    clients: Arc<Vec<etcd_client::Client>>,
    waiting: Arc<Vec<etcd_client::Client>>,
    current: Arc<AtomicUsize>,
    prefix: String,
    cluster: ClusterId,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("prefix", &self.prefix)
            .field("endpoints", &self.clients.len())
            .finish()
    }
}

/// Whether an error of the client means "this member cannot answer now".
fn transient(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) | E::EndpointError(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
        ),
        _ => false,
    }
}

impl Etcd {
    /// Connects to the cluster's endpoints (lazily: an endpoint that is down is tried
    /// when a request needs it).
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(ControlError::InvalidConfig {
                reason: "no etcd endpoint".to_string(),
            });
        }
        let base = etcd_client::ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
            .with_require_leader(true);
        let mut clients = Vec::new();
        let mut waiting = Vec::new();
        for ep in &config.endpoints {
            let op = || format!("connect to {ep}");
            clients.push(
                etcd_client::Client::connect(
                    [ep.as_str()],
                    Some(base.clone().with_timeout(config.request_timeout)),
                )
                .await
                .map_err(ControlError::etcd(op()))?,
            );
            // Campaigns wait as long as another candidate leads: no request timeout.
            waiting.push(
                etcd_client::Client::connect([ep.as_str()], Some(base.clone()))
                    .await
                    .map_err(ControlError::etcd(op()))?,
            );
        }
        Ok(Self {
            clients: Arc::new(clients),
            waiting: Arc::new(waiting),
            current: Arc::new(AtomicUsize::new(0)),
            prefix: format!("/unacloud/{}/", config.cluster.0),
            cluster: config.cluster,
        })
    }

    /// The cluster these keys belong to.
    pub fn cluster(&self) -> ClusterId {
        self.cluster
    }

    /// The full key for `rel` (relative to this cluster's prefix).
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    /// The client of the member requests go to now (cheap to clone).
    pub fn client(&self) -> etcd_client::Client {
        self.clients[self.current.load(Ordering::Relaxed) % self.clients.len()].clone()
    }

    /// The same member's client without a request timeout (for campaigns).
    pub(crate) fn waiting_client(&self) -> etcd_client::Client {
        self.waiting[self.current.load(Ordering::Relaxed) % self.waiting.len()].clone()
    }

    /// Moves requests on to the next member.
    pub(crate) fn rotate(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `f` against the current member, moving on to the next one and retrying (three
    /// rounds of the members at most) while the error is one of a member that cannot
    /// answer now.
    pub(crate) async fn call<T, F, Fut>(&self, op: impl Fn() -> String, f: F) -> Result<T>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let rounds = 3 * self.clients.len();
        let mut attempt = 0;
        loop {
            match f(self.client()).await {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) && attempt + 1 < rounds => {
                    attempt += 1;
                    self.rotate();
                    if attempt % self.clients.len() == 0 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                Err(source) => return Err(ControlError::Etcd { op: op(), source }),
            }
        }
    }

    /// Reads one key: its value and mod revision, or `None`.
    pub(crate) async fn get(&self, rel: &str) -> Result<Option<(Vec<u8>, i64)>> {
        let key = self.key(rel);
        let resp = self
            .call(
                || format!("read {key}"),
                |mut c| {
                    let key = key.clone();
                    async move { c.get(key, None).await }
                },
            )
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Reads every key under `rel` (a prefix), sorted by key.
    pub(crate) async fn list(&self, rel: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let key = self.key(rel);
        let resp = self
            .call(
                || format!("list {key}"),
                |mut c| {
                    let key = key.clone();
                    let opts = etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_sort(etcd_client::SortTarget::Key, etcd_client::SortOrder::Ascend);
                    async move { c.get(key, Some(opts)).await }
                },
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                let k = String::from_utf8_lossy(kv.key());
                let rel = k.strip_prefix(&self.prefix).unwrap_or(&k).to_string();
                (rel, kv.value().to_vec())
            })
            .collect())
    }

    /// Writes one key (under `lease` when given).
    pub(crate) async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<()> {
        self.call(
            || format!("write {key}"),
            |mut c| {
                let (key, value) = (key.to_string(), value.to_vec());
                let opts = lease.map(|l| etcd_client::PutOptions::new().with_lease(l));
                async move { c.put(key, value, opts).await }
            },
        )
        .await
        .map(|_| ())
    }

    /// Runs a transaction.
    pub(crate) async fn txn(
        &self,
        op: &str,
        txn: etcd_client::Txn,
    ) -> Result<etcd_client::TxnResponse> {
        self.call(
            || op.to_string(),
            |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            },
        )
        .await
    }
}

/// Parses a JSON value read from `key`.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| ControlError::Corrupt {
        key: key.to_string(),
        source,
    })
}

/// Serialises a value to be written (the types written here always serialise).
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// A global snapshot id as a key suffix that sorts numerically.
pub(crate) fn gs_key(gs: u64) -> String {
    format!("{gs:020}")
}

//! The protocol over a real network: a tokio TCP transport driving the sans-IO state
//! machines, and the daemons of a deployment.
//!
//! * [`frame`] — transport frames around the protocol's frames, with an optional
//!   HMAC-SHA256 of a cluster key;
//! * [`conn`] — connections: hello, per-peer send queues, reconnect with backoff, every
//!   wait bounded;
//! * [`host`] — performing host actions (packet colouring, local snapshots) for a VM;
//! * [`node`] — the coordinator, participant and metadata-server drivers;
//! * [`daemon`] — configuration (TOML and flags), the launcher, the metadata server and
//!   the `start` trigger;
//! * [`ring`] — the RCPBT ring across network namespaces with real packet colouring.

pub mod cli;
pub mod conn;
pub mod daemon;
pub mod frame;
pub mod host;
pub mod node;
pub mod ring;

pub use conn::TransportConfig;
pub use frame::ClusterKey;
pub use host::{HostActions, HostSummary, LocalSnapshot, VmHost};
pub use node::{
    spawn_coordinator, spawn_metadata_server, spawn_participant, MetadataServerHandle, NodeEvent,
    NodeHandle,
};

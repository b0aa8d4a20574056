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
//! * [`ring`] — the RCPBT ring across network namespaces with real packet colouring;
//! * `cli` (feature `cli`) — the command line shared by the `unacloud-gs` binary and
//!   the `ring_netns` example.
//!
//! A deployment runs `unacloud-gs metadata-server` once, `unacloud-gs launcher` on every
//! host (it registers the host's VMs, one participant per VM; the first registered VM's
//! participant coordinates) and `unacloud-gs start` to take a global snapshot. Each host
//! action of the protocol becomes a [`host::HostActions`] call: colour and filter changes
//! go to a [`crate::colour::ColourBackend`] (a long-lived `nft` session by default), the
//! local snapshot to a [`host::LocalSnapshot`] method. Rules are removed on completion,
//! abort, deadline, error, SIGINT/SIGTERM, and when a host object is dropped; a launcher
//! that starts again replaces rules a crashed predecessor left behind.
//!
//! Needs, at run time: `nftables` (or `iptables`) and, for namespaces, `iproute2`.

#[cfg(feature = "cli")]
pub mod cli;
pub mod conn;
pub mod daemon;
mod error;
pub mod frame;
pub mod host;
pub mod node;
pub mod ring;
#[cfg(feature = "hypervisor")]
pub mod ring_vms;

pub use conn::TransportConfig;
pub use error::{Error, Result};
pub use frame::ClusterKey;
pub use host::{HostActions, HostSummary, LocalSnapshot, VmHost};
pub use node::{
    spawn_coordinator, spawn_metadata_server, spawn_participant, MetadataServerHandle, NodeEvent,
    NodeHandle,
};

//! Errors of the real network: the tokio transport, the daemons, packet colouring,
//! network namespaces, the RCPBT ring and (feature `etcd`) the control plane.
//!
//! Every fallible function of [`crate::net`], [`crate::colour`], [`crate::netns`] and
//! [`crate::rcpbt`] returns [`Error`]. A state machine's refusal arrives unchanged as
//! [`Error::Protocol`] (so `Err(Error::Protocol(protocol::Error::Busy { .. }))` is a busy
//! coordinator), the catalog file's errors as [`Error::Catalog`]; the variants of this
//! layer describe what this layer did (the command, the peer, the file) and keep the
//! underlying error as their `source`.

use std::path::PathBuf;

/// Result of the real network.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the transport, the daemons, packet colouring, namespaces and the RCPBT ring.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ----- inner layers -------------------------------------------------------------
    /// A protocol state machine or the wire format refused something.
    #[error(transparent)]
    Protocol(#[from] crate::protocol::Error),
    /// The coordinator's catalog file could not be read or written.
    #[error(transparent)]
    Catalog(#[from] crate::catalog_store::Error),
    /// The control plane on etcd failed (unreachable, fenced, a corrupt key, …).
    #[cfg(feature = "etcd")]
    #[error("etcd control plane")]
    Control {
        /// What the control plane reported.
        #[from]
        source: crate::control::ControlError,
    },

    // ----- nodes and configuration --------------------------------------------------
    /// The node (its driver task) has stopped: it was shut down or its connections
    /// ended, so it takes no more requests.
    #[error("the node has stopped and takes no more requests")]
    NodeStopped,
    /// A daemon's, lab's or backend's configuration is invalid (flags, TOML values, names
    /// of chains and tables, …).
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong and how to fix it.
        reason: String,
    },

    // ----- commands, packet colouring, namespaces --------------------------------------
    /// An external command (`iptables`, `nft`, `ip`, …) could not be started.
    #[error("cannot run `{program}`; is it installed and on PATH? (packages: iptables, nftables, iproute2)")]
    CommandSpawn {
        /// The program.
        program: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An external command exited unsuccessfully.
    #[error("`{command}` failed (exit code {code:?}): {stderr}")]
    CommandFailed {
        /// The full command line.
        command: String,
        /// Its exit code (`None` if killed by a signal or not applicable).
        code: Option<i32>,
        /// What it printed on standard error.
        stderr: String,
    },
    /// An external command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    CommandTimeout {
        /// The full command line.
        command: String,
        /// The bound.
        timeout: std::time::Duration,
    },
    /// A long-lived `nft -i` session failed.
    #[error("nft session in {place}: {reason}")]
    NftSession {
        /// Where the session runs (`host`, `netns x`).
        place: String,
        /// What went wrong.
        reason: String,
    },
    /// An nf_tables request over netlink failed (or the netlink socket did).
    #[error("nftables netlink in {place}: {operation}: {reason}")]
    Netlink {
        /// Where the socket lives (`host`, `netns x`).
        place: String,
        /// What was asked (`install`, `set colour`, `read counter`, …).
        operation: String,
        /// What went wrong (the kernel's errno text, a timeout, a malformed answer).
        reason: String,
    },
    /// Taking a local snapshot failed.
    #[error("local snapshot of VM {vm} failed: {reason}")]
    LocalSnapshot {
        /// The VM.
        vm: String,
        /// What went wrong.
        reason: String,
    },
    /// This process lacks the privileges for namespaces or netfilter.
    #[error("not privileged: {reason}")]
    NotPrivileged {
        /// Why, and what to do.
        reason: String,
    },
    // ----- transport ------------------------------------------------------------------
    /// A network operation failed.
    #[error("{action} {peer} failed")]
    Network {
        /// The address or name of the other side.
        peer: String,
        /// What was being done (`connect`, `listen`, `send`, …).
        action: &'static str,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A bounded wait expired.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        after: std::time::Duration,
    },
    /// A transport frame was malformed or out of place; the connection was closed.
    #[error("bad frame from {peer}: {reason}")]
    TransportFrame {
        /// The other side.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// A frame failed authentication with the cluster key; the connection was closed.
    #[error("authentication with {peer} failed: {reason}")]
    Authentication {
        /// The other side.
        peer: String,
        /// Why (different keys, missing key on one side).
        reason: String,
    },
    /// A peer asked for something its role may not do (connect here under that id, speak
    /// for another node, send that message); it was refused and the connection closed.
    #[error("refused {peer}: {reason}")]
    Unauthorised {
        /// The other side.
        peer: String,
        /// What it tried.
        reason: String,
    },
    /// The other side closed the connection and said why.
    #[error("{peer} rejected this node: {reason}")]
    PeerRejected {
        /// The other side.
        peer: String,
        /// Its reason.
        reason: String,
    },
    // ----- files and the RCPBT ring -----------------------------------------------------
    /// A configuration file could not be read or parsed.
    #[error("configuration file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        reason: String,
    },
    /// A results file (CSV) or key file could not be read or written.
    #[error("file {path} could not be read or written")]
    ResultsIo {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The RCPBT ring application failed.
    #[error("RCPBT ring: {reason}")]
    Rcpbt {
        /// What went wrong.
        reason: String,
    },
}

/// An error and its sources on one line (`outer: cause: root cause`).
#[cfg_attr(
    not(any(feature = "cli", feature = "hypervisor", feature = "etcd")),
    allow(dead_code)
)]
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

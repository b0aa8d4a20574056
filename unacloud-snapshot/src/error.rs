//! The crate's single error type.
//!
//! Every fallible operation of `unacloud-snapshot` returns [`Error`]. Variants are grouped by
//! the layer that produces them — wire format, protocol state machines, metadata server,
//! catalog file — and carry structured fields so that a caller can react programmatically
//! (for example retry after [`Error::Busy`]) and a human gets a message that says what to do.

use std::path::PathBuf;

use crate::protocol::{ActionId, ClusterId, GlobalSnapshotId, ParticipantId};

/// Convenience alias for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a coordinator is busy with when it refuses a new operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// A global snapshot (phase 1 pre-check or phase 2).
    GlobalSnapshot,
    /// A resume (POLL, RESTORE or START phase).
    Resume,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Operation::GlobalSnapshot => f.write_str("global snapshot"),
            Operation::Resume => f.write_str("resume"),
        }
    }
}

/// Errors of the global-snapshot protocol, its wire format, the metadata server and the
/// catalog file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ----- wire format -------------------------------------------------------------
    /// The frame announces a wire-format version this implementation does not speak.
    #[error("unsupported wire-format version {version} (this implementation speaks version {supported}); upgrade the older side")]
    UnsupportedVersion {
        /// Version byte found in the frame.
        version: u8,
        /// The version this implementation speaks.
        supported: u8,
    },
    /// The frame's length prefix exceeds the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes; the peer is misbehaving or speaks another protocol")]
    FrameTooLarge {
        /// Announced length (version byte + payload).
        len: usize,
        /// Maximum accepted length.
        max: usize,
    },
    /// The buffer ends before the frame does.
    #[error("truncated frame: {needed} bytes needed, {available} available")]
    TruncatedFrame {
        /// Bytes the complete frame needs.
        needed: usize,
        /// Bytes that were available.
        available: usize,
    },
    /// Bytes follow the single frame given to [`crate::protocol::decode_frame`].
    #[error("{extra} unexpected bytes after the frame; use FrameDecoder for streams")]
    TrailingBytes {
        /// Number of extra bytes.
        extra: usize,
    },
    /// The length prefix announces an empty frame (no version byte).
    #[error(
        "empty frame: the length prefix is 0, but every frame carries at least a version byte"
    )]
    EmptyFrame,
    /// The payload is not a valid JSON-encoded envelope.
    #[error("malformed frame payload")]
    MalformedPayload {
        /// Why the payload could not be decoded.
        #[source]
        source: serde_json::Error,
    },

    // ----- protocol state machines -------------------------------------------------
    /// A message from another cluster reached this node.
    #[error("message for cluster {got} reached a node of cluster {expected}; check the peer's cluster configuration")]
    ForeignCluster {
        /// This node's cluster.
        expected: ClusterId,
        /// The cluster named in the envelope.
        got: ClusterId,
    },
    /// A message addressed to another node reached this one.
    #[error("message addressed to participant {to} reached participant {me}")]
    Misaddressed {
        /// Recipient named in the envelope.
        to: ParticipantId,
        /// This node's id.
        me: ParticipantId,
    },
    /// The sender is not a member of this global-snapshot group.
    #[error("participant {id} is not a member of this cluster's snapshot group")]
    UnknownParticipant {
        /// The unknown sender.
        id: ParticipantId,
    },
    /// A message that this role never receives (for example DONE at a participant).
    #[error("{role} does not accept {message} messages")]
    UnexpectedMessage {
        /// The receiving role (`coordinator`, `participant`, `metadata server`).
        role: &'static str,
        /// The message kind, as named in PROTOCOL.md.
        message: &'static str,
    },
    /// A completion for an action id this state machine never issued.
    #[error("action {id} was never issued by this state machine")]
    UnknownAction {
        /// The unknown action id.
        id: ActionId,
    },
    /// A new operation was requested while another one runs; only one at a time.
    #[error("refused: {running} {gs} is still running; wait for it to complete or fail")]
    Busy {
        /// The running operation.
        running: Operation,
        /// Its global snapshot id.
        gs: GlobalSnapshotId,
    },
    /// A resume was requested but no global snapshot has completed yet.
    #[error("no completed global snapshot to resume from")]
    NoRestorableSnapshot,
    /// A resume was requested from a global snapshot that did not complete.
    #[error("global snapshot {gs} did not complete and cannot be restored; completed ones: {completed:?}")]
    SnapshotNotRestorable {
        /// The requested global snapshot.
        gs: GlobalSnapshotId,
        /// The completed global snapshots, oldest first.
        completed: Vec<GlobalSnapshotId>,
    },
    /// The node (its driver task) has stopped: it was shut down or its connections
    /// ended, so it takes no more requests.
    #[error("the node has stopped and takes no more requests")]
    NodeStopped,
    /// The configuration of a state machine is invalid.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong and how to fix it.
        reason: String,
    },

    // ----- metadata server ---------------------------------------------------------
    /// No participant with this id is registered at the metadata server.
    #[error("participant {id} is not registered at the metadata server")]
    NotRegistered {
        /// The id asked about.
        id: ParticipantId,
    },
    /// Registering another participant would exceed the port range.
    #[error("cannot register participant {id}: base port {base_port} + {id} exceeds 65535; lower the base port")]
    PortRangeExhausted {
        /// The id that would have been assigned.
        id: u32,
        /// The configured base port.
        base_port: u16,
    },

    // ----- catalog file -------------------------------------------------------------
    /// Reading or writing the catalog file failed.
    #[error("catalog file {path}: {action} failed")]
    CatalogIo {
        /// The catalog file.
        path: PathBuf,
        /// What was being done (`read`, `write temporary file`, `rename`, …).
        action: &'static str,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The catalog could not be serialised (nothing was written).
    #[error("catalog for {path} could not be serialised; the file was left unchanged")]
    CatalogEncode {
        /// The catalog file.
        path: PathBuf,
        /// Why serialisation failed.
        #[source]
        source: serde_json::Error,
    },
    /// The catalog file exists but is not a valid catalog.
    #[error("catalog file {path} is corrupt; restore it from a backup or move it away to start an empty catalog")]
    CatalogCorrupt {
        /// The catalog file.
        path: PathBuf,
        /// Why it could not be parsed.
        #[source]
        source: serde_json::Error,
    },

    // ----- real network (feature `tokio`): transport, colouring, namespaces, RCPBT --
    #[cfg(feature = "tokio")]
    /// An external command (`iptables`, `nft`, `ip`, …) could not be started.
    #[error("cannot run `{program}`; is it installed and on PATH? (packages: iptables, nftables, iproute2)")]
    CommandSpawn {
        /// The program.
        program: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    #[cfg(feature = "tokio")]
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
    #[cfg(feature = "tokio")]
    /// An external command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    CommandTimeout {
        /// The full command line.
        command: String,
        /// The bound.
        timeout: std::time::Duration,
    },
    #[cfg(feature = "tokio")]
    /// A long-lived `nft -i` session failed.
    #[error("nft session in {place}: {reason}")]
    NftSession {
        /// Where the session runs (`host`, `netns x`).
        place: String,
        /// What went wrong.
        reason: String,
    },
    #[cfg(feature = "tokio")]
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
    #[cfg(feature = "tokio")]
    /// Taking a local snapshot failed.
    #[error("local snapshot of VM {vm} failed: {reason}")]
    LocalSnapshot {
        /// The VM.
        vm: String,
        /// What went wrong.
        reason: String,
    },
    #[cfg(feature = "tokio")]
    /// This process lacks the privileges for namespaces or netfilter.
    #[error("not privileged: {reason}")]
    NotPrivileged {
        /// Why, and what to do.
        reason: String,
    },
    #[cfg(feature = "tokio")]
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
    #[cfg(feature = "tokio")]
    /// A bounded wait expired.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        after: std::time::Duration,
    },
    #[cfg(feature = "tokio")]
    /// A transport frame was malformed or out of place; the connection was closed.
    #[error("bad frame from {peer}: {reason}")]
    TransportFrame {
        /// The other side.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    #[cfg(feature = "tokio")]
    /// A frame failed authentication with the cluster key; the connection was closed.
    #[error("authentication with {peer} failed: {reason}")]
    Authentication {
        /// The other side.
        peer: String,
        /// Why (different keys, missing key on one side).
        reason: String,
    },
    #[cfg(feature = "tokio")]
    /// A peer asked for something its role may not do (connect here under that id, speak
    /// for another node, send that message); it was refused and the connection closed.
    #[error("refused {peer}: {reason}")]
    Unauthorised {
        /// The other side.
        peer: String,
        /// What it tried.
        reason: String,
    },
    #[cfg(feature = "tokio")]
    /// The other side closed the connection and said why.
    #[error("{peer} rejected this node: {reason}")]
    PeerRejected {
        /// The other side.
        peer: String,
        /// Its reason.
        reason: String,
    },
    #[cfg(feature = "tokio")]
    /// A configuration file could not be read or parsed.
    #[error("configuration file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        reason: String,
    },
    #[cfg(feature = "tokio")]
    /// A results file (CSV) or key file could not be read or written.
    #[error("file {path} could not be read or written")]
    ResultsIo {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    #[cfg(feature = "tokio")]
    /// The RCPBT ring application failed.
    #[error("RCPBT ring: {reason}")]
    Rcpbt {
        /// What went wrong.
        reason: String,
    },

    // ----- simulator ----------------------------------------------------------------
    #[cfg(feature = "sim")]
    /// A simulated run did not settle within its step budget (a livelock, or a budget too
    /// small for the configured run).
    #[error("simulation did not settle after {steps} steps ({sim_time:?} of virtual time); a livelock, or raise max_steps")]
    Livelock {
        /// Steps taken.
        steps: u64,
        /// Virtual time reached.
        sim_time: std::time::Duration,
    },
}

/// An error and its sources on one line (`outer: cause: root cause`).
#[cfg_attr(not(any(feature = "cli", feature = "hypervisor")), allow(dead_code))]
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

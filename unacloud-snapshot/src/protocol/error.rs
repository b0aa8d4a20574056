//! Errors of the sans-IO protocol: its wire format, its state machines and their
//! configuration.
//!
//! Every fallible function of [`crate::protocol`] returns [`Error`]. Like the protocol
//! itself it knows nothing of sockets, files, processes or clocks: the drivers wrap it in
//! their own error types (`net::Error::Protocol`, `sim::Error::Protocol`) and add what
//! their layer knows, and the catalog file has its own, [`crate::catalog_store::Error`].
//! Variants carry structured fields so that a caller can react programmatically (for
//! example retry after [`Error::Busy`]) and a human gets a message that says what to do.

use super::{ActionId, ClusterId, GlobalSnapshotId, ParticipantId};

/// Result of the sans-IO protocol.
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

/// Errors of the protocol's wire format, state machines and metadata server.
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
}

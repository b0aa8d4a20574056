//! The sans-IO protocol core: messages, wire format and the state machines of the
//! coordinator, the participants and the metadata server.
//!
//! Nothing in this module performs I/O, spawns threads or reads a clock: time comes in as
//! `now: Instant` parameters, received messages and completed host actions come in through
//! `handle_*` methods, and everything the caller must do comes out of `poll_output()` (an
//! [`Output`]: transmit an [`Envelope`], perform a [`HostAction`], or note a
//! [`ProtocolEvent`]) and `poll_timeout()`.

mod catalog;
mod config;
mod coordinator;
mod error;
mod host;
mod ids;
mod message;
mod metadata;
mod output;
mod participant;
mod wire;

pub use catalog::{Catalog, CompletedSnapshot};
pub use config::{ClearColourPolicy, CoordinatorConfig, ParticipantConfig, Timeouts};
pub use coordinator::Coordinator;
pub use error::{Error, Operation, Result};
pub use ids::{
    ActionId, ClusterId, Colour, DscpConfig, GlobalSnapshotId, ParticipantId, ResumeAttempt,
};
#[cfg(feature = "sim")]
pub(crate) use message::micros;
pub use message::{Envelope, LocalTime, Message, Registration};
pub use metadata::{MetadataServer, MetadataServerConfig, SnapshotTimes};
pub use output::{ActionOutcome, FailureReason, HostAction, Output, ProtocolEvent};
pub use participant::Participant;
pub use wire::{
    decode_frame, decode_frame_prefix, encode_frame, encode_frame_into, FrameDecoder,
    LENGTH_PREFIX_LEN, MAX_FRAME_LEN, WIRE_VERSION,
};

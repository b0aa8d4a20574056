//! Errors of the simulator.
//!
//! The simulated hosts drive the real state machines, so a refusal of theirs (a resume
//! from a global snapshot that did not complete, a coordinator configuration out of
//! bounds) arrives unchanged as [`Error::Protocol`]; the simulator adds its own
//! configuration checks and the step budget.

/// Result of the simulator.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of a simulated run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A protocol state machine refused its configuration or a request.
    #[error(transparent)]
    Protocol(#[from] crate::protocol::Error),
    /// The run's configuration ([`super::RingConfig`], [`super::RestoreFrom`]) is invalid.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong, naming the field.
        reason: String,
    },
    /// The catalog the simulated coordinator wrote to its disk does not parse when it
    /// boots again.
    #[error("the simulated catalog file does not parse")]
    CatalogCorrupt {
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
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

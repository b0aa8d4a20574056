//! Placement: which host runs each requested VM (thesis Table 2.4, plus disk awareness).

use serde::{Deserialize, Serialize};

/// A VM that no host could take, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    /// The VM's name.
    pub vm: String,
    /// Why it could not be placed (e.g. "needs 2 cores and 2048 MiB; largest host has 1
    /// core free").
    pub reason: String,
}

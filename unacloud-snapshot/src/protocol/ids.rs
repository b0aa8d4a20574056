//! Identifiers, packet colours and their DSCP values.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::protocol::error::{Error, Result};

/// A node of the snapshot group. Ids are handed out by the metadata server from 0;
/// [`ParticipantId::COORDINATOR`] (0) coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ParticipantId(pub u32);

impl ParticipantId {
    /// The coordinator, always id 0.
    pub const COORDINATOR: ParticipantId = ParticipantId(0);
    /// The metadata server's address in envelopes (it is not a snapshot participant).
    pub const METADATA_SERVER: ParticipantId = ParticipantId(u32::MAX);
    /// The sender of a request that has no id yet (a launcher before `INSERT`, or an
    /// external trigger such as an operator's command line).
    pub const UNREGISTERED: ParticipantId = ParticipantId(u32::MAX - 1);

    /// Whether this is the coordinator.
    pub fn is_coordinator(self) -> bool {
        self == Self::COORDINATOR
    }
}

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::METADATA_SERVER => f.write_str("metadata-server"),
            Self::UNREGISTERED => f.write_str("unregistered"),
            ParticipantId(id) => write!(f, "#{id}"),
        }
    }
}

/// A global snapshot attempt, also the protocol's epoch: ids increase strictly with every
/// attempt the coordinator starts (completed or not), so late or duplicated messages of an
/// earlier attempt are recognised and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GlobalSnapshotId(pub u64);

impl GlobalSnapshotId {
    /// The id after this one.
    pub fn next(self) -> GlobalSnapshotId {
        GlobalSnapshotId(self.0.saturating_add(1))
    }
}

impl fmt::Display for GlobalSnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gs-{}", self.0)
    }
}

/// Identifies one cluster (one distributed system under snapshot). Every envelope carries
/// it; a node rejects envelopes of other clusters with [`Error::ForeignCluster`], so two
/// clusters sharing a network or a port range never disturb each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClusterId(pub u64);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cluster-{}", self.0)
    }
}

/// Numbers the resume attempts of a coordinator, so that late answers of an earlier resume
/// attempt are ignored. Persisted in the catalog with the global snapshot ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ResumeAttempt(pub u64);

impl fmt::Display for ResumeAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "resume-{}", self.0)
    }
}

/// Identifies one host action issued by a state machine; the driver hands it back with
/// the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ActionId(pub u64);

impl fmt::Display for ActionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "action-{}", self.0)
    }
}

/// The colour written into the DSCP field of a host's outgoing IPv4 datagrams while a
/// global snapshot runs (no colour when idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Colour {
    /// PRESNAPSHOT: the sender has not yet taken its local snapshot.
    Pre,
    /// POSTSNAPSHOT: the sender has taken its local snapshot.
    Post,
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Colour::Pre => f.write_str("PRESNAPSHOT"),
            Colour::Post => f.write_str("POSTSNAPSHOT"),
        }
    }
}

/// DSCP code points (6-bit values of the IPv4 DS field) used for the two colours.
///
/// Defaults: PRE = `0x10` (decimal 16, class selector CS2 — the thesis's example value)
/// and POST = `0x12` (decimal 18, AF21). Both are standard code points that desktop
/// applications rarely set themselves, they are distinct (the filter must tell them apart)
/// and neither is 0, the value of uncoloured traffic. A deployment whose applications use
/// these code points must pick others: traffic an application marks with the POST value
/// is dropped during the snapshot window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DscpConfig {
    pre: u8,
    post: u8,
}

impl DscpConfig {
    /// Default DSCP value of [`Colour::Pre`].
    pub const DEFAULT_PRE: u8 = 0x10;
    /// Default DSCP value of [`Colour::Post`].
    pub const DEFAULT_POST: u8 = 0x12;

    /// Validated DSCP values: each in `1..=63`, and distinct.
    pub fn new(pre: u8, post: u8) -> Result<Self> {
        for (name, v) in [("pre", pre), ("post", post)] {
            if v == 0 || v > 63 {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "DSCP value for {name} is {v:#04x}; it must be a 6-bit code point in 0x01..=0x3f (0 marks uncoloured traffic)"
                    ),
                });
            }
        }
        if pre == post {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "DSCP values for pre and post are both {pre:#04x}; they must differ so the filter can drop only POSTSNAPSHOT traffic"
                ),
            });
        }
        Ok(Self { pre, post })
    }

    /// The DSCP value of a colour.
    pub fn value(&self, colour: Colour) -> u8 {
        match colour {
            Colour::Pre => self.pre,
            Colour::Post => self.post,
        }
    }

    /// The DSCP value of [`Colour::Pre`].
    pub fn pre(&self) -> u8 {
        self.pre
    }

    /// The DSCP value of [`Colour::Post`].
    pub fn post(&self) -> u8 {
        self.post
    }

    /// The colour a DSCP value stands for, if any.
    pub fn colour_of(&self, dscp: u8) -> Option<Colour> {
        if dscp == self.pre {
            Some(Colour::Pre)
        } else if dscp == self.post {
            Some(Colour::Post)
        } else {
            None
        }
    }
}

impl Default for DscpConfig {
    fn default() -> Self {
        Self {
            pre: Self::DEFAULT_PRE,
            post: Self::DEFAULT_POST,
        }
    }
}

//! Durations in configurations serialise as whole microseconds (`u64`), so that a JSON
//! configuration (or a Python dict) reads `"latency_us": 200`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// `Duration` ↔ microseconds, as on the protocol's wire.
pub(crate) use crate::protocol::micros;

/// `Option<Duration>` ↔ microseconds or `null`.
pub(crate) mod opt_micros {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_micros))
    }
}

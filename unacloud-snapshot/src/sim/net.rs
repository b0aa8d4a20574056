//! Simulated links: latency, jitter, reordering and loss, drawn from the seeded RNG.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Characteristics of every link of the simulated LAN (one switch, symmetric links).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkConfig {
    /// One-way base latency. Default 0.2 ms (a lab LAN).
    #[serde(with = "super::serde_us::micros", rename = "latency_us")]
    pub latency: Duration,
    /// Uniform extra delay in `[0, jitter]`; packets overtake each other when it exceeds
    /// their spacing. Default 0.05 ms.
    #[serde(with = "super::serde_us::micros", rename = "jitter_us")]
    pub jitter: Duration,
    /// Probability that an application datagram is held back by an extra `[1, 4]` ×
    /// latency, reordering it behind later ones. Default 0.
    pub reorder: f64,
    /// Probability that an application datagram is lost. Protocol traffic rides a reliable
    /// connection and is never lost. Default 0.
    pub loss: f64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_micros(200),
            jitter: Duration::from_micros(50),
            reorder: 0.0,
            loss: 0.0,
        }
    }
}

impl LinkConfig {
    /// Checks that probabilities are probabilities.
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [("reorder", self.reorder), ("loss", self.loss)] {
            if !(0.0..=1.0).contains(&p) || p.is_nan() {
                return Err(format!("link {name} probability {p} is not in [0, 1]"));
            }
        }
        Ok(())
    }

    /// Delay of one application datagram, or `None` if the link loses it.
    pub fn datagram_delay(&self, rng: &mut impl Rng) -> Option<Duration> {
        if self.loss > 0.0 && rng.gen_bool(self.loss) {
            return None;
        }
        let mut delay = self.base_delay(rng);
        if self.reorder > 0.0 && rng.gen_bool(self.reorder) {
            delay += self.latency.mul_f64(rng.gen_range(1.0..=4.0));
        }
        Some(delay)
    }

    /// Delay of one segment of a reliable stream (it is never lost; order is kept by the
    /// caller).
    pub fn stream_delay(&self, rng: &mut impl Rng) -> Duration {
        self.base_delay(rng)
    }

    fn base_delay(&self, rng: &mut impl Rng) -> Duration {
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(rng.gen_range(0..=self.jitter.as_nanos() as u64))
        };
        self.latency + jitter
    }
}

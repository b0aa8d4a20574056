//! Host liveness from leases, fed into the deployment life cycle.
//!
//! A host whose lease expired is unreachable: [`HostMonitor`] keeps one
//! [`unacloud_core::lifecycle::Lifecycle`] per registered host, started as Deployed, and
//! feeds it a heartbeat at every observation in which the host's liveness key exists.
//! Without heartbeats the life cycle's own timers do the rest: Reconnecting once the host
//! has been silent for [`LivenessTimeouts::silence`], then Failed after
//! [`LivenessTimeouts::failed_after`] (thesis: 10 min). A host whose key comes back while
//! Reconnecting is Deployed again.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use unacloud_core::lifecycle::State;
//! use unacloud_snapshot::control::monitor::{HostMonitor, LivenessTimeouts};
//! use unacloud_snapshot::protocol::ParticipantId;
//!
//! let t0 = Instant::now();
//! let s = |x: u64| t0 + Duration::from_secs(x);
//! let mut m = HostMonitor::new(LivenessTimeouts {
//!     silence: Duration::from_secs(3),
//!     failed_after: Duration::from_secs(10),
//! });
//! let h = ParticipantId(1);
//! m.observe(s(0), &[h], &[h]);
//! assert_eq!(m.state(h), Some(State::Deployed));
//! m.observe(s(4), &[h], &[]); // the lease expired
//! assert_eq!(m.state(h), Some(State::Reconnecting));
//! m.observe(s(20), &[h], &[]);
//! assert_eq!(m.state(h), Some(State::Failed));
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use unacloud_core::lifecycle::{Event, Lifecycle, LifecycleTimeouts, State};

use crate::protocol::ParticipantId;

/// When an unreachable host is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessTimeouts {
    /// Silence (no liveness key) after which a host is Reconnecting. Observe at least
    /// three times per `silence`, so that a live host never looks silent.
    pub silence: Duration,
    /// Time in Reconnecting after which the host is Failed (thesis: 10 min).
    pub failed_after: Duration,
}

impl Default for LivenessTimeouts {
    /// 3 s of silence after the lease expired; Failed after the thesis's 10 minutes.
    fn default() -> Self {
        Self {
            silence: Duration::from_secs(3),
            failed_after: Duration::from_secs(600),
        }
    }
}

/// A host's state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostChange {
    /// The host.
    pub host: ParticipantId,
    /// Its new state.
    pub state: State,
}

/// The life cycles of every registered host.
#[derive(Debug)]
pub struct HostMonitor {
    timeouts: LivenessTimeouts,
    hosts: BTreeMap<ParticipantId, Lifecycle>,
}

impl HostMonitor {
    /// An empty monitor.
    pub fn new(timeouts: LivenessTimeouts) -> Self {
        Self {
            timeouts,
            hosts: BTreeMap::new(),
        }
    }

    /// Feeds one observation at `now`: the registered hosts and those whose liveness key
    /// exists. Returns the state changes, in host order.
    pub fn observe(
        &mut self,
        now: Instant,
        registered: &[ParticipantId],
        alive: &[ParticipantId],
    ) -> Vec<HostChange> {
        let lt = LifecycleTimeouts {
            transmitting: None,
            configuring: None,
            deploying: None,
            agent_silence: Some(self.timeouts.silence),
            reconnecting: Some(self.timeouts.failed_after),
        };
        let mut changes = Vec::new();
        for &id in registered {
            let vm = self.hosts.entry(id).or_insert_with(|| {
                let mut l = Lifecycle::new(format!("host-{}", id.0), now, lt);
                for e in [
                    Event::TransferCompleted,
                    Event::ConfigurationCompleted,
                    Event::Started,
                ] {
                    let _ = l.handle_event(now, e);
                }
                l
            });
            let before = vm.state();
            vm.handle_timeout(now);
            if alive.contains(&id) {
                let _ = vm.handle_event(now, Event::Heartbeat);
            }
            // Failed asks for a power-off; the monitor only reports it.
            while vm.poll_action().is_some() {}
            if vm.state() != before {
                changes.push(HostChange {
                    host: id,
                    state: vm.state(),
                });
            }
        }
        changes
    }

    /// A host's state, if it is known.
    pub fn state(&self, host: ParticipantId) -> Option<State> {
        self.hosts.get(&host).map(Lifecycle::state)
    }

    /// A host's life cycle (its history of states), if it is known.
    pub fn lifecycle(&self, host: ParticipantId) -> Option<&Lifecycle> {
        self.hosts.get(&host)
    }
}

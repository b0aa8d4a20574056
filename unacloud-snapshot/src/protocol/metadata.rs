//! The metadata server: registry of participants, external triggers, snapshot times.
//!
//! A request/response service: [`MetadataServer::handle_request`] returns the reply to
//! send back to the requester (on the same connection — the requester may not have an id
//! yet); the one unsolicited message, a trigger (TRIGGER_GLOBAL_SNAPSHOT or
//! TRIGGER_RESUME) forwarded to the coordinator, comes out of
//! [`MetadataServer::poll_output`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::ids::{ClusterId, GlobalSnapshotId, ParticipantId};
use super::message::{Envelope, LocalTime, Message, Registration};
use super::output::{Output, ProtocolEvent};
use crate::error::{Error, Result};

const ROLE: &str = "metadata server";

/// Configuration of a [`MetadataServer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataServerConfig {
    /// The cluster.
    pub cluster: ClusterId,
    /// Participant `id` gets port `base_port + id`.
    pub base_port: u16,
}

/// Times recorded for one global snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTimes {
    /// The global snapshot.
    pub gs: GlobalSnapshotId,
    /// From TAKE_SNAPSHOT to completion at the coordinator.
    pub global_time: Duration,
    /// Every participant's local snapshot time.
    pub local_times: Vec<LocalTime>,
}

impl SnapshotTimes {
    /// The header line of the times CSV.
    pub(crate) const CSV_HEADER: &'static str =
        "global_snapshot,participant,local_time_s,global_time_s\n";

    /// Appends this global snapshot's rows of the times CSV to `csv`, one per participant
    /// (seconds, microsecond precision).
    pub(crate) fn write_csv_rows(&self, csv: &mut String) {
        for l in &self.local_times {
            // Writing into a String cannot fail.
            let _ = writeln!(
                csv,
                "{},{},{:.6},{:.6}",
                self.gs.0,
                l.participant.0,
                l.local_time.as_secs_f64(),
                self.global_time.as_secs_f64()
            );
        }
    }
}

/// The metadata server's state machine.
#[derive(Debug)]
pub struct MetadataServer {
    config: MetadataServerConfig,
    registrations: Vec<Registration>,
    /// Indices into `registrations` by address (re-registration lookup).
    by_addr: HashMap<String, Vec<usize>>,
    times: BTreeMap<GlobalSnapshotId, SnapshotTimes>,
    out: VecDeque<Output>,
}

impl MetadataServer {
    /// An empty registry.
    pub fn new(config: MetadataServerConfig) -> Self {
        Self {
            config,
            registrations: Vec::new(),
            by_addr: HashMap::new(),
            times: BTreeMap::new(),
            out: VecDeque::new(),
        }
    }

    /// Every registration, by id (the id is the index).
    pub fn registrations(&self) -> &[Registration] {
        &self.registrations
    }

    /// Ids of every registered participant except the coordinator (what
    /// [`super::CoordinatorConfig::participants`] needs).
    pub fn participant_ids(&self) -> Vec<ParticipantId> {
        self.registrations.iter().skip(1).map(|r| r.id).collect()
    }

    /// Registers a host: ids from 0 in registration order, port = base port + id.
    ///
    /// Registering the same address with the same VMs again (a launcher restarted after a
    /// reboot) returns the existing registration, so a host keeps its id.
    pub fn register(&mut self, addr: String, vms: Vec<String>) -> Result<Registration> {
        let same_addr = self.by_addr.get(&addr).map_or(&[][..], Vec::as_slice);
        if let Some(existing) = same_addr
            .iter()
            .filter_map(|&i| self.registrations.get(i))
            .find(|r| r.vms == vms)
        {
            return Ok(existing.clone());
        }
        let id = u32::try_from(self.registrations.len()).unwrap_or(u32::MAX);
        let port = u16::try_from(id)
            .ok()
            .and_then(|offset| self.config.base_port.checked_add(offset))
            .filter(|_| id < ParticipantId::UNREGISTERED.0)
            .ok_or(Error::PortRangeExhausted {
                id,
                base_port: self.config.base_port,
            })?;
        let registration = Registration {
            id: ParticipantId(id),
            addr,
            port,
            vms,
        };
        self.by_addr
            .entry(registration.addr.clone())
            .or_default()
            .push(self.registrations.len());
        self.registrations.push(registration.clone());
        Ok(registration)
    }

    /// The registration of participant `id`.
    pub fn lookup(&self, id: ParticipantId) -> Result<&Registration> {
        self.registrations
            .get(id.0 as usize)
            .ok_or(Error::NotRegistered { id })
    }

    /// Records the times of a completed global snapshot (also done on SNAPSHOT_REPORT).
    pub fn record_times(&mut self, times: SnapshotTimes) {
        self.times.insert(times.gs, times);
    }

    /// The recorded times, by global snapshot id.
    pub fn times(&self) -> impl Iterator<Item = &SnapshotTimes> {
        self.times.values()
    }

    /// The recorded times as CSV, one row per participant and global snapshot:
    /// `global_snapshot,participant,local_time_s,global_time_s` (seconds, microsecond
    /// precision), ready for a spreadsheet or pandas.
    pub fn times_csv(&self) -> String {
        let mut csv = String::from(SnapshotTimes::CSV_HEADER);
        for t in self.times.values() {
            t.write_csv_rows(&mut csv);
        }
        csv
    }

    /// Handles one request and returns the reply for the requester (`None` for messages
    /// that need none, such as SNAPSHOT_REPORT).
    ///
    /// Errors: [`Error::ForeignCluster`], [`Error::Misaddressed`],
    /// [`Error::UnexpectedMessage`]. Requests that are well-formed but cannot be served
    /// (unknown id, port range exhausted) are answered with `REFUSED`, not an error.
    pub fn handle_request(
        &mut self,
        _now: Instant,
        envelope: Envelope,
    ) -> Result<Option<Envelope>> {
        envelope.check_addressed_to(self.config.cluster, ParticipantId::METADATA_SERVER)?;
        let reply = match envelope.message {
            Message::Insert { addr, vms } => match self.register(addr, vms) {
                Ok(r) => Message::Inserted {
                    id: r.id,
                    port: r.port,
                },
                Err(e) => Message::Refused {
                    reason: e.to_string(),
                },
            },
            trigger @ (Message::TriggerGlobalSnapshot | Message::TriggerResume { .. }) => {
                if self.registrations.is_empty() {
                    Message::Refused {
                        reason: "no participant registered yet, so there is no coordinator".into(),
                    }
                } else {
                    let requested = matches!(trigger, Message::TriggerGlobalSnapshot);
                    self.out.push_back(Output::Transmit(Envelope::new(
                        self.config.cluster,
                        ParticipantId::METADATA_SERVER,
                        ParticipantId::COORDINATOR,
                        trigger,
                    )));
                    if requested {
                        self.out
                            .push_back(Output::Event(ProtocolEvent::GlobalSnapshotRequested));
                    }
                    Message::TriggerForwarded
                }
            }
            Message::QueryAddress { id } => match self.lookup(id) {
                Ok(r) => Message::Address {
                    registration: r.clone(),
                },
                Err(e) => Message::Refused {
                    reason: e.to_string(),
                },
            },
            Message::QueryList { .. } => Message::List {
                participants: self.registrations.clone(),
                more: false,
            },
            Message::QueryCount => Message::Count {
                count: u32::try_from(self.registrations.len()).unwrap_or(u32::MAX),
            },
            Message::SnapshotReport {
                gs,
                global_time,
                local_times,
            } => {
                self.record_times(SnapshotTimes {
                    gs,
                    global_time,
                    local_times,
                });
                return Ok(None);
            }
            other => {
                return Err(Error::UnexpectedMessage {
                    role: ROLE,
                    message: other.kind(),
                })
            }
        };
        Ok(Some(Envelope::new(
            self.config.cluster,
            ParticipantId::METADATA_SERVER,
            envelope.from,
            reply,
        )))
    }

    /// The next unsolicited output (the trigger forwarded to the coordinator, events).
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const C: ClusterId = ClusterId(3);

    fn ask(s: &mut MetadataServer, message: Message) -> Message {
        let env = Envelope::new(
            C,
            ParticipantId::UNREGISTERED,
            ParticipantId::METADATA_SERVER,
            message,
        );
        s.handle_request(Instant::now(), env)
            .unwrap()
            .unwrap()
            .message
    }

    #[test]
    fn a_resume_trigger_is_forwarded_like_a_snapshot_trigger() {
        let mut s = MetadataServer::new(MetadataServerConfig {
            cluster: C,
            base_port: 9000,
        });
        let trigger = Message::TriggerResume {
            gs: Some(GlobalSnapshotId(4)),
        };
        assert!(matches!(
            ask(&mut s, trigger.clone()),
            Message::Refused { reason } if reason.contains("no participant registered")
        ));
        assert!(s.poll_output().is_none());
        s.register("10.0.0.1".into(), vec!["vm".into()]).unwrap();
        assert_eq!(ask(&mut s, trigger.clone()), Message::TriggerForwarded);
        match s.poll_output() {
            Some(Output::Transmit(env)) => {
                assert_eq!(env.from, ParticipantId::METADATA_SERVER);
                assert_eq!(env.to, ParticipantId::COORDINATOR);
                assert_eq!(env.message, trigger);
            }
            other => panic!("{other:?}"),
        }
        // Not a global snapshot request.
        assert!(s.poll_output().is_none());
    }
}

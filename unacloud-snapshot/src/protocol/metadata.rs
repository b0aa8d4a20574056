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
use crate::protocol::error::{Error, Result};

const ROLE: &str = "metadata server";

/// Configuration of a [`MetadataServer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataServerConfig {
    /// The cluster.
    pub cluster: ClusterId,
    /// Participant `id` gets port `base_port + id`.
    pub base_port: u16,
    /// At most this many registrations are held; an INSERT beyond them is refused
    /// (default [`MetadataServerConfig::DEFAULT_MAX_REGISTRATIONS`]). Bounds the memory a
    /// client can make the server use.
    pub max_registrations: usize,
}

impl MetadataServerConfig {
    /// The default of [`MetadataServerConfig::max_registrations`].
    pub const DEFAULT_MAX_REGISTRATIONS: usize = 1024;

    /// The configuration of cluster `cluster` with ports from `base_port` and the default
    /// limits.
    pub fn new(cluster: ClusterId, base_port: u16) -> Self {
        Self {
            cluster,
            base_port,
            max_registrations: Self::DEFAULT_MAX_REGISTRATIONS,
        }
    }
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
///
/// It serves any client of the cluster, so everything a request can make it hold is
/// bounded: an INSERT's address ([`MetadataServer::MAX_ADDR_BYTES`]), its VMs
/// ([`MetadataServer::MAX_VMS_PER_INSERT`], names of at most
/// [`MetadataServer::MAX_VM_NAME_BYTES`] without control characters), the number of
/// registrations ([`MetadataServerConfig::max_registrations`]) and the size of a LIST
/// reply ([`MetadataServer::MAX_LIST_PAGE_BYTES`], see [`MetadataServer::list_page`]).
/// Requests beyond a bound, INSERT from a node that already has an id and SNAPSHOT_REPORT
/// from anyone but the coordinator are answered `REFUSED` with a reason naming the rule.
#[derive(Debug)]
pub struct MetadataServer {
    config: MetadataServerConfig,
    registrations: Vec<Registration>,
    /// Indices into `registrations` by address (re-registration lookup).
    by_addr: HashMap<String, Vec<usize>>,
    times: BTreeMap<GlobalSnapshotId, SnapshotTimes>,
    out: VecDeque<Output>,
}

/// Counts the bytes of a JSON text without building it.
#[derive(Default)]
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of `value` as JSON text (`usize::MAX` should it not serialise, so that it
/// never fits a bound).
fn json_len<T: serde::Serialize>(value: &T) -> usize {
    let mut n = ByteCount::default();
    match serde_json::to_writer(&mut n, value) {
        Ok(()) => n.0,
        Err(_) => usize::MAX,
    }
}

impl MetadataServer {
    /// Longest address an INSERT may register, in bytes.
    pub const MAX_ADDR_BYTES: usize = 255;
    /// Most VMs one INSERT may name (at least one is required).
    pub const MAX_VMS_PER_INSERT: usize = 64;
    /// Longest VM name, in bytes (at least one byte; no control characters).
    pub const MAX_VM_NAME_BYTES: usize = 128;
    /// Largest LIST reply: the JSON text of the LIST message of one page stays within this
    /// many bytes (256 KiB), unless a single registration is larger.
    pub const MAX_LIST_PAGE_BYTES: usize = 256 * 1024;

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

    /// Why an INSERT of `addr` and `vms` breaks a bound, if it does.
    fn insert_refusal(addr: &str, vms: &[String]) -> Option<String> {
        if addr.len() > Self::MAX_ADDR_BYTES {
            return Some(format!(
                "the address has {} bytes; the limit is {} bytes",
                addr.len(),
                Self::MAX_ADDR_BYTES
            ));
        }
        if vms.is_empty() || vms.len() > Self::MAX_VMS_PER_INSERT {
            return Some(format!(
                "an INSERT names 1 to {} VMs (the limit per INSERT); this one names {}",
                Self::MAX_VMS_PER_INSERT,
                vms.len()
            ));
        }
        for (i, vm) in vms.iter().enumerate() {
            if vm.is_empty() || vm.len() > Self::MAX_VM_NAME_BYTES {
                return Some(format!(
                    "VM name {} has {} bytes; VM names have 1 to {} bytes (the limit)",
                    i + 1,
                    vm.len(),
                    Self::MAX_VM_NAME_BYTES
                ));
            }
            if vm.chars().any(char::is_control) {
                return Some(format!(
                    "VM name {} ({vm:?}) contains a control character; VM names may not",
                    i + 1
                ));
            }
        }
        None
    }

    /// Registers a host: ids from 0 in registration order, port = base port + id.
    ///
    /// Registering the same address with the same VMs again (a launcher restarted after a
    /// reboot) returns the existing registration, so a host keeps its id.
    ///
    /// Errors: [`Error::InvalidConfig`] when `addr` or `vms` break a bound of INSERT
    /// ([`MetadataServer::MAX_ADDR_BYTES`], [`MetadataServer::MAX_VMS_PER_INSERT`],
    /// [`MetadataServer::MAX_VM_NAME_BYTES`]) or the registry holds
    /// [`MetadataServerConfig::max_registrations`] already; [`Error::PortRangeExhausted`]
    /// when the port would exceed 65535.
    pub fn register(&mut self, addr: String, vms: Vec<String>) -> Result<Registration> {
        if let Some(reason) = Self::insert_refusal(&addr, &vms) {
            return Err(Error::InvalidConfig { reason });
        }
        let same_addr = self.by_addr.get(&addr).map_or(&[][..], Vec::as_slice);
        if let Some(existing) = same_addr
            .iter()
            .filter_map(|&i| self.registrations.get(i))
            .find(|r| r.vms == vms)
        {
            return Ok(existing.clone());
        }
        if self.registrations.len() >= self.config.max_registrations {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "the registry is full: it holds {} registrations, the limit \
                     (max_registrations, --max-registrations)",
                    self.config.max_registrations
                ),
            });
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

    /// One page of the registry, the answer to `QUERY_LIST {after}`: the registrations
    /// with an id greater than `after` (all of them for `None`), in id order, as many as
    /// fit in a LIST message whose JSON text has at most
    /// [`MetadataServer::MAX_LIST_PAGE_BYTES`] bytes — at least one, should a single
    /// registration be larger — with `more` set when registrations remain after the page.
    pub fn list_page(&self, after: Option<ParticipantId>) -> Message {
        let start = match after {
            None => 0,
            Some(id) => (id.0 as usize).saturating_add(1),
        };
        let rest = self.registrations.get(start..).unwrap_or(&[]);
        // `{"type":"list","participants":[],"more":true}`; `false` is one byte longer.
        let base = json_len(&Message::List {
            participants: Vec::new(),
            more: true,
        });
        let mut len = base;
        let mut n = 0;
        for r in rest {
            let item = json_len(r).saturating_add(usize::from(n > 0));
            if n > 0 && len.saturating_add(item) > Self::MAX_LIST_PAGE_BYTES {
                break;
            }
            len = len.saturating_add(item);
            n += 1;
        }
        // The last page says `"more":false`: if that byte does not fit, its last
        // registration goes to a page of its own.
        if n == rest.len() && n > 1 && len + 1 > Self::MAX_LIST_PAGE_BYTES {
            n -= 1;
        }
        Message::List {
            participants: rest[..n].to_vec(),
            more: n < rest.len(),
        }
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
    /// that need none, such as the coordinator's SNAPSHOT_REPORT).
    ///
    /// Errors: [`Error::ForeignCluster`], [`Error::Misaddressed`],
    /// [`Error::UnexpectedMessage`]. Requests that are well-formed but cannot be served
    /// (unknown id, port range exhausted, a bound exceeded, INSERT from a node that has an
    /// id, SNAPSHOT_REPORT from anyone but the coordinator) are answered with `REFUSED`,
    /// not an error.
    pub fn handle_request(
        &mut self,
        _now: Instant,
        envelope: Envelope,
    ) -> Result<Option<Envelope>> {
        envelope.check_addressed_to(self.config.cluster, ParticipantId::METADATA_SERVER)?;
        let from = envelope.from;
        let refused = |reason: String| Message::Refused { reason };
        let reply = match envelope.message {
            Message::Insert { .. } if from != ParticipantId::UNREGISTERED => refused(format!(
                "INSERT refused: only a client without an id (unregistered, {}) registers; \
                 this one is {from}",
                ParticipantId::UNREGISTERED.0
            )),
            Message::Insert { addr, vms } => match self.register(addr, vms) {
                Ok(r) => Message::Inserted {
                    id: r.id,
                    port: r.port,
                },
                Err(Error::InvalidConfig { reason }) => {
                    refused(format!("INSERT refused: {reason}"))
                }
                Err(e) => refused(e.to_string()),
            },
            trigger @ (Message::TriggerGlobalSnapshot | Message::TriggerResume { .. }) => {
                if self.registrations.is_empty() {
                    refused("no participant registered yet, so there is no coordinator".into())
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
                Err(e) => refused(e.to_string()),
            },
            Message::QueryList { after } => self.list_page(after),
            Message::QueryCount => Message::Count {
                count: u32::try_from(self.registrations.len()).unwrap_or(u32::MAX),
            },
            Message::SnapshotReport { gs, .. } if !from.is_coordinator() => {
                tracing::warn!(
                    %from, %gs,
                    "metadata server refused a SNAPSHOT_REPORT that did not come from the coordinator"
                );
                refused(format!(
                    "SNAPSHOT_REPORT refused: only the coordinator ({}) reports snapshot \
                     times; this one is {from}",
                    ParticipantId::COORDINATOR
                ))
            }
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
            from,
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
        let mut s = MetadataServer::new(MetadataServerConfig::new(C, 9000));
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

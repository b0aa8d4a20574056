//! The deterministic cluster harness: hosts, their VMs, the simulated LAN and the protocol
//! state machines, driven on a virtual clock.
//!
//! Shaped like quinn-proto's test `Pair`: [`Cluster::step`] advances the virtual clock to
//! the next thing that happens and handles everything due at that instant;
//! [`Cluster::drive_bounded`] steps until quiet and fails with [`Error::Livelock`] instead
//! of hanging. Every random choice comes from one seeded ChaCha RNG, and every collection
//! iterated is ordered, so a seed replays the same schedule.
//!
//! How a host carries out the protocol's actions (the host driver of the simulation):
//!
//! * `SetOutgoingColour(c)` writes `c` into the DSCP field of every application datagram
//!   the VM sends from then on (TCP data, ACKs and retransmissions alike);
//!   `DropIncoming(Post)` makes the host drop arriving application datagrams coloured POST
//!   (the state machines issue it first, and again after every `ClearColour` or `ClearAll`:
//!   the idle state); `AcceptIncoming`, `ClearColour` and `ClearAll` undo them. Protocol traffic travels on
//!   its own reliable connection, uncoloured and never filtered.
//! * `TakeLocalSnapshots` lasts a random time; the VM keeps running (a live snapshot) and
//!   its whole state is captured at the end, the snapshot's consistency point. From that
//!   point the VM stays paused until the host has applied the POST colour (step 4), so no
//!   datagram the VM sends after its snapshot leaves with the PRE colour. Datagrams that
//!   arrive meanwhile wait in the host's queue.
//! * With a durability delay (`RingConfig::durability_max` > 0) the captured state is
//!   first *volatile* ([`Host::volatile`]: being written) and reaches the host's disk a
//!   random time after the point; the host answers step 3 with `SnapshotPoint`, and
//!   `AwaitDurable` completes once the state is on disk. A power failure in between loses
//!   that local snapshot. Without a delay the state is on disk at the point
//!   (`SnapshotTaken`).
//! * `RestoreLocal` powers the VM off and replaces its state by the captured one;
//!   `StartVms` runs it again, with its timers as they were at the capture.
//! * A crash powers the host off: its VM, its rules, its protocol state machine and the
//!   local snapshots still being written are lost; the snapshots on its disk and the
//!   coordinator's catalog file survive.

mod driver;
mod events;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checker::{check_durability, DurabilityVerdict, SnapshotVerdict};
use super::config::RingConfig;
use super::transport::Segment;
use super::vm::Vm;
use crate::protocol::{
    self, ActionId, ActionOutcome, Catalog, ClusterId, Colour, Coordinator, CoordinatorConfig,
    Envelope, GlobalSnapshotId, HostAction, Output, Participant, ParticipantConfig, ParticipantId,
};
use crate::sim::error::{Error, Result};

/// A VM state captured by a local snapshot, as stored on its host's disk.
#[derive(Clone, Debug)]
pub struct LocalSnapshot {
    /// The whole guest state at the consistency point.
    pub vm: Vm,
    /// The consistency point.
    pub captured_at: Instant,
    /// How long step 3 took (to the point).
    pub took: Duration,
    /// When the state is (or was) on the host's disk: the point itself without a
    /// durability delay.
    pub durable_at: Instant,
}

/// The protocol state machine running on a host.
#[derive(Debug)]
enum Machine {
    Coordinator(Box<Coordinator>),
    Participant(Box<Participant>),
}

impl Machine {
    fn handle_message(&mut self, now: Instant, env: Envelope) -> protocol::Result<()> {
        match self {
            Machine::Coordinator(c) => c.handle_message(now, env),
            Machine::Participant(p) => p.handle_message(now, env),
        }
    }
    fn handle_action_complete(
        &mut self,
        now: Instant,
        id: ActionId,
        outcome: ActionOutcome,
    ) -> protocol::Result<()> {
        match self {
            Machine::Coordinator(c) => c.handle_action_complete(now, id, outcome),
            Machine::Participant(p) => p.handle_action_complete(now, id, outcome),
        }
    }
    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Machine::Coordinator(c) => c.handle_timeout(now),
            Machine::Participant(p) => p.handle_timeout(now),
        }
    }
    fn poll_output(&mut self) -> Option<Output> {
        match self {
            Machine::Coordinator(c) => c.poll_output(),
            Machine::Participant(p) => p.poll_output(),
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Machine::Coordinator(c) => c.poll_timeout(),
            Machine::Participant(p) => p.poll_timeout(),
        }
    }
}

/// One simulated physical machine with one VM.
#[derive(Debug)]
pub struct Host {
    /// Host index = ring position = participant id.
    pub id: usize,
    /// Powered on.
    pub up: bool,
    /// Incremented on every power-on; completions of actions from an earlier boot are lost.
    boot: u64,
    /// The VM's state, `None` while it does not exist (after a crash, before a restore).
    pub vm: Option<Vm>,
    /// Whether the VM executes.
    pub vm_running: bool,
    /// Paused between its snapshot's consistency point and the POST colour.
    pub frozen: bool,
    held: Vec<Datagram>,
    /// Colour written into outgoing application datagrams.
    pub outgoing: Option<Colour>,
    /// Colour of incoming application datagrams that are dropped.
    pub drop_incoming: Option<Colour>,
    machine: Option<Machine>,
    /// Local snapshots on the host's disk (durable), by global snapshot id.
    pub disk: BTreeMap<u64, LocalSnapshot>,
    /// Local snapshots past their point whose state is still being written (not yet
    /// durable), by global snapshot id: lost if the host powers off.
    pub volatile: BTreeMap<u64, LocalSnapshot>,
    /// When the running VM state was captured (to shift its timers at start).
    restored_capture: Option<Instant>,
    /// Changes whenever the VM's timeline is replaced (restore, crash).
    vm_epoch: u64,
}

#[derive(Clone, Debug)]
struct Datagram {
    from: usize,
    to: usize,
    dscp: Option<Colour>,
    seg: Segment,
    /// The receiver's VM epoch when the datagram was sent.
    rx_epoch: u64,
}

#[derive(Debug)]
enum Ev {
    Datagram(Datagram),
    Frame {
        from: usize,
        to: usize,
        bytes: Vec<u8>,
    },
    ActionDone {
        host: usize,
        boot: u64,
        id: ActionId,
        action: HostAction,
        took: Duration,
    },
    Crash {
        host: usize,
    },
    /// The state of a local snapshot reaches the host's disk.
    Durable {
        host: usize,
        boot: u64,
        gs: u64,
    },
    PowerOn {
        host: usize,
    },
}

#[derive(Debug)]
struct Scheduled {
    at: Instant,
    seq: u64,
    ev: Ev,
}
impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// What happened to one global snapshot attempt.
#[derive(Clone, Debug, Default)]
pub struct GsRecord {
    /// Global snapshot id.
    pub id: u64,
    /// When the coordinator started it.
    pub started: Option<Instant>,
    /// When it completed.
    pub completed: Option<Instant>,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// Local snapshot times reported by the protocol, coordinator first, then by id.
    pub local_times: Vec<Duration>,
    /// The protocol's phase-2 time (TAKE_SNAPSHOT to completion).
    pub phase2: Option<Duration>,
    /// Protocol messages of this attempt (pre-check and phase 2).
    pub protocol_messages: u64,
    /// The checker's verdict on the captured states, once complete.
    pub verdict: Option<SnapshotVerdict>,
}

/// Counters of a run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Application messages handed to a transport (every timeline).
    pub app_messages_sent: u64,
    /// Application datagrams put on the wire (data, ACKs, retransmissions).
    pub datagrams_sent: u64,
    /// Datagrams dropped by a host's POST filter.
    pub dropped_by_filter: u64,
    /// Datagrams lost by a link.
    pub lost_by_link: u64,
    /// Datagrams that reached a host that was off or a VM that was not running.
    pub dropped_at_dead_host: u64,
    /// Segments retransmitted by the TCP-like transport.
    pub retransmissions: u64,
    /// Protocol frames sent.
    pub protocol_messages: u64,
    /// Protocol frames of the resume protocol.
    pub resume_messages: u64,
    /// Datagrams of a replaced timeline delivered into a restored VM.
    pub stale_deliveries: u64,
    /// Errors the state machines returned for delivered frames or completions.
    pub protocol_errors: Vec<String>,
    /// Global snapshot triggers the coordinator refused.
    pub triggers_refused: u64,
    /// Resumes started / completed / failed.
    pub resumes_started: u64,
    /// Resumes that completed.
    pub resumes_completed: u64,
    /// Resumes that failed (and were retried).
    pub resumes_failed: u64,
}

#[derive(Debug, Default)]
struct ResumePlan {
    /// The operator wants a resume (target: `None` = latest).
    wanted: Option<Option<GlobalSnapshotId>>,
    /// Next time to (re)try starting it.
    retry_at: Option<Instant>,
    /// A resume runs.
    running: bool,
    restored_from: Option<u64>,
    restarted_from_scratch: bool,
    attempts: u32,
}

/// The simulated cluster.
#[derive(Debug)]
pub struct Cluster {
    cfg: RingConfig,
    base: Instant,
    now: Instant,
    rng: ChaCha8Rng,
    cluster_id: ClusterId,
    hosts: Vec<Host>,
    queue: BinaryHeap<Reverse<Scheduled>>,
    next_seq: u64,
    stream_tail: HashMap<(usize, usize), Instant>,
    catalog_file: Option<Vec<u8>>,
    steps: u64,
    records: BTreeMap<u64, GsRecord>,
    stats: Stats,
    resume: ResumePlan,
    crashed: Vec<(usize, Instant)>,
    crash_armed: bool,
    /// Global snapshot triggers waiting for the current instant's handling to finish.
    trigger_pending: bool,
}

impl Cluster {
    /// A cluster for `cfg`, with every VM booted and the ring not yet started.
    pub fn new(cfg: RingConfig) -> Result<Self> {
        cfg.validate()?;
        let base = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let cluster_id = ClusterId(rng.gen());
        let n = cfg.nodes;
        let mut hosts = Vec::with_capacity(n);
        for id in 0..n {
            let mut vm = Vm::new(id, n, cfg.tokens, cfg.think, cfg.transport);
            vm.start(base);
            hosts.push(Host {
                id,
                up: true,
                boot: 0,
                vm: Some(vm),
                vm_running: true,
                frozen: false,
                held: Vec::new(),
                outgoing: None,
                // No rules yet: the state machine arms the idle drop rule first.
                drop_incoming: None,
                machine: None,
                disk: BTreeMap::new(),
                volatile: BTreeMap::new(),
                restored_capture: None,
                vm_epoch: 0,
            });
        }
        let crash_armed = cfg.crash_at.is_some() || cfg.crash_at_time.is_some();
        let mut cluster = Self {
            base,
            now: base,
            rng,
            cluster_id,
            hosts,
            queue: BinaryHeap::new(),
            next_seq: 0,
            stream_tail: HashMap::new(),
            catalog_file: None,
            steps: 0,
            records: BTreeMap::new(),
            stats: Stats::default(),
            resume: ResumePlan::default(),
            crashed: Vec::new(),
            crash_armed,
            trigger_pending: false,
            cfg,
        };
        for id in 0..n {
            cluster.hosts[id].machine = Some(cluster.boot_machine(id)?);
        }
        if let Some(at) = cluster.cfg.crash_at_time {
            let host = cluster.pick_crash_host();
            cluster.schedule(base + at, Ev::Crash { host });
            cluster.crash_armed = false;
        }
        Ok(cluster)
    }

    fn boot_machine(&self, id: usize) -> Result<Machine> {
        if id == 0 {
            let catalog = match &self.catalog_file {
                Some(bytes) => {
                    Catalog::from_json(bytes).map_err(|source| Error::CatalogCorrupt { source })?
                }
                None => Catalog::new(self.cluster_id),
            };
            let mut config = CoordinatorConfig::new(
                self.cluster_id,
                (1..self.cfg.nodes)
                    .map(|p| ParticipantId(p as u32))
                    .collect(),
                vec![vm_name(0)],
            );
            config.timeouts = self.cfg.timeouts;
            config.clear_colour = self.cfg.clear_colour;
            Ok(Machine::Coordinator(Box::new(Coordinator::new(
                config, catalog,
            )?)))
        } else {
            let mut config = ParticipantConfig::new(
                self.cluster_id,
                ParticipantId(id as u32),
                vec![vm_name(id)],
            );
            config.timeouts = self.cfg.timeouts;
            config.clear_colour = self.cfg.clear_colour;
            Ok(Machine::Participant(Box::new(Participant::new(config)?)))
        }
    }

    fn pick_crash_host(&mut self) -> usize {
        match self.cfg.crash_host {
            Some(h) => h,
            None => self.rng.gen_range(0..self.cfg.nodes),
        }
    }

    // ----- observation ------------------------------------------------------------------

    /// The current virtual instant.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    /// The configuration.
    pub fn config(&self) -> &RingConfig {
        &self.cfg
    }

    /// The hosts.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Global snapshot attempts by id.
    pub fn records(&self) -> &BTreeMap<u64, GsRecord> {
        &self.records
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The global snapshot the run resumed from, if a resume completed.
    pub fn restored_from(&self) -> Option<u64> {
        self.resume.restored_from
    }

    /// Whether the ring had to restart from its initial state (crash before any completed
    /// global snapshot).
    pub fn restarted_from_scratch(&self) -> bool {
        self.resume.restarted_from_scratch
    }

    /// Hosts that crashed, with the instant.
    pub fn crashes(&self) -> &[(usize, Instant)] {
        &self.crashed
    }

    /// Where every host's local snapshot of global snapshot `gs` is: on disk, still being
    /// written, or lost ([`check_durability`]).
    pub fn durability(&self, gs: u64) -> DurabilityVerdict {
        check_durability(&self.hosts, gs)
    }

    /// Completed global snapshots whose local snapshots are not all durable now, with
    /// the verdict. Always empty under a correct protocol: a host answers DONE only after
    /// its local snapshot is on disk, and a disk survives a power failure.
    pub fn completed_not_durable(&self) -> Vec<(u64, DurabilityVerdict)> {
        self.records
            .values()
            .filter(|r| r.completed.is_some())
            .map(|r| (r.id, self.durability(r.id)))
            .filter(|(_, v)| !v.is_durable())
            .collect()
    }

    /// The coordinator's catalog of completed global snapshots (`None` while its host is
    /// off).
    pub fn catalog(&self) -> Option<&Catalog> {
        match &self.hosts[0].machine {
            Some(Machine::Coordinator(c)) => Some(c.catalog()),
            _ => None,
        }
    }

    /// Whether the coordinator runs an operation.
    pub fn coordinator_busy(&self) -> bool {
        match &self.hosts[0].machine {
            Some(Machine::Coordinator(c)) => c.running().is_some(),
            _ => false,
        }
    }

    /// Whether the ring finished: every peer left and the `Exit` came back.
    pub fn ring_complete(&self) -> bool {
        self.hosts
            .iter()
            .all(|h| h.vm.as_ref().is_some_and(|vm| vm.app.left_with.is_some()))
            && self
                .hosts
                .iter()
                .any(|h| h.vm.as_ref().is_some_and(|vm| vm.app.completed))
    }

    /// Whether the run is over: ring complete, no resume wanted, coordinator idle.
    pub fn is_finished(&self) -> bool {
        self.ring_complete()
            && self.resume.wanted.is_none()
            && !self.resume.running
            && !self.coordinator_busy()
    }

    // ----- external inputs --------------------------------------------------------------

    /// Asks the coordinator for a global snapshot now (the metadata server's `StartGS`).
    /// Returns the id, or `None` if refused or the coordinator's host is down.
    pub fn trigger_global_snapshot(&mut self) -> Option<GlobalSnapshotId> {
        let now = self.now;
        let result = match &mut self.hosts[0].machine {
            Some(Machine::Coordinator(c)) => c.start_global_snapshot(now).ok(),
            _ => None,
        };
        if result.is_none() {
            self.stats.triggers_refused += 1;
        }
        self.drain(0);
        result
    }

    /// Powers a host off now.
    pub fn crash(&mut self, host: usize) {
        self.schedule(self.now, Ev::Crash { host });
    }

    /// Powers a host off at `now + after`.
    pub fn crash_after(&mut self, host: usize, after: Duration) {
        self.schedule(self.now + after, Ev::Crash { host });
    }

    /// Powers a host on at `now + after` (its VM stays off until a restore).
    pub fn power_on_after(&mut self, host: usize, after: Duration) {
        self.schedule(self.now + after, Ev::PowerOn { host });
    }

    /// Asks for a resume from `gs` (`None` = latest), retried until the coordinator
    /// accepts it.
    pub fn request_resume(&mut self, gs: Option<GlobalSnapshotId>, after: Duration) {
        self.resume.wanted = Some(gs);
        self.resume.retry_at = Some(self.now + after);
    }
}

/// Name of the VM of host `id`.
pub fn vm_name(id: usize) -> String {
    format!("ring-{id}")
}

//! A hand-driven cluster for the protocol tests: one coordinator, N−1 participants,
//! in-memory delivery in a chosen order, host actions completed by rule or held back.
#![allow(clippy::unwrap_used, dead_code, missing_docs)]

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use unacloud_snapshot::protocol::*;

pub const CLUSTER: ClusterId = ClusterId(42);

/// One pending host action.
#[derive(Debug, Clone)]
pub struct PendingAction {
    pub host: ParticipantId,
    pub id: ActionId,
    pub action: HostAction,
}

pub struct Cluster {
    pub now: Instant,
    pub coord: Coordinator,
    pub parts: Vec<Participant>,
    pub in_flight: VecDeque<Envelope>,
    pub pending: VecDeque<PendingAction>,
    /// Envelopes between coordinator and participants that were transmitted.
    pub messages: usize,
    /// Envelopes sent to the metadata server.
    pub to_metadata: Vec<Envelope>,
    pub transmitted: Vec<Envelope>,
    pub events: Vec<(ParticipantId, ProtocolEvent)>,
    pub actions: Vec<(ParticipantId, HostAction)>,
    /// Hosts whose actions are not completed automatically.
    pub hold: BTreeSet<ParticipantId>,
    /// Hosts that are down: messages to them vanish, they send nothing.
    pub down: BTreeSet<ParticipantId>,
    /// Hosts whose VMs are not running.
    pub vms_stopped: BTreeSet<ParticipantId>,
    /// Hosts whose local snapshots fail.
    pub snapshot_fails: BTreeSet<ParticipantId>,
    /// Hosts that take live local snapshots: step 3 answers `SnapshotPoint`, and
    /// `AwaitDurable` answers `SnapshotDurable` (instead of `SnapshotTaken` at once).
    pub live: BTreeSet<ParticipantId>,
    /// Live hosts whose local snapshots never become durable (`AwaitDurable` fails).
    pub durable_fails: BTreeSet<ParticipantId>,
    /// Per host, in order: `issue <action kind>`, `complete <action kind>`,
    /// `send <message kind>` and `event <variant>`.
    pub log: Vec<(ParticipantId, String)>,
    pub rng: Option<ChaCha8Rng>,
}

pub fn vms_of(id: u32) -> Vec<String> {
    vec![format!("vm-{id}-a"), format!("vm-{id}-b")]
}

impl Cluster {
    /// A coordinator and `n - 1` participants with default timeouts.
    pub fn new(n: u32) -> Self {
        Self::with_catalog(n, Catalog::new(CLUSTER))
    }

    pub fn with_catalog(n: u32, catalog: Catalog) -> Self {
        let ids: Vec<ParticipantId> = (1..n).map(ParticipantId).collect();
        let coord = Coordinator::new(
            CoordinatorConfig::new(CLUSTER, ids.clone(), vms_of(0)),
            catalog,
        )
        .unwrap();
        let parts = ids
            .iter()
            .map(|&id| Participant::new(ParticipantConfig::new(CLUSTER, id, vms_of(id.0))).unwrap())
            .collect();
        let mut c = Self {
            now: Instant::now(),
            coord,
            parts,
            in_flight: VecDeque::new(),
            pending: VecDeque::new(),
            messages: 0,
            to_metadata: Vec::new(),
            transmitted: Vec::new(),
            events: Vec::new(),
            actions: Vec::new(),
            hold: BTreeSet::new(),
            down: BTreeSet::new(),
            vms_stopped: BTreeSet::new(),
            snapshot_fails: BTreeSet::new(),
            live: BTreeSet::new(),
            durable_fails: BTreeSet::new(),
            log: Vec::new(),
            rng: None,
        };
        // Every host starts by arming its idle drop rule (logged in `actions`).
        c.collect();
        while let Some(a) = c.pending.pop_front() {
            assert_eq!(a.action, idle_drop());
            c.complete(a, ActionOutcome::Done);
        }
        c
    }

    /// Deliver and complete in a random (seeded) order instead of FIFO.
    pub fn shuffled(mut self, seed: u64) -> Self {
        self.rng = Some(ChaCha8Rng::seed_from_u64(seed));
        self
    }

    pub fn participant(&mut self, id: ParticipantId) -> &mut Participant {
        &mut self.parts[(id.0 - 1) as usize]
    }

    /// Collects every output of every state machine.
    pub fn collect(&mut self) {
        let mut outputs = Vec::new();
        while let Some(o) = self.coord.poll_output() {
            outputs.push((ParticipantId::COORDINATOR, o));
        }
        for p in &mut self.parts {
            let id = p.id();
            while let Some(o) = p.poll_output() {
                outputs.push((id, o));
            }
        }
        for (host, o) in outputs {
            match o {
                Output::Transmit(env) => {
                    if env.to == ParticipantId::METADATA_SERVER {
                        self.to_metadata.push(env);
                        continue;
                    }
                    self.messages += 1;
                    self.log
                        .push((host, format!("send {}", env.message.kind())));
                    self.transmitted.push(env.clone());
                    if !self.down.contains(&env.to) && !self.down.contains(&host) {
                        self.in_flight.push_back(env);
                    }
                }
                Output::Action { id, action } => {
                    self.log.push((host, format!("issue {}", action.kind())));
                    self.actions.push((host, action.clone()));
                    self.pending.push_back(PendingAction { host, id, action });
                }
                Output::Event(e) => {
                    let name: String = format!("{e:?}")
                        .chars()
                        .take_while(|c| c.is_alphanumeric())
                        .collect();
                    self.log.push((host, format!("event {name}")));
                    self.events.push((host, e));
                }
            }
        }
    }

    pub fn outcome_for(&self, host: ParticipantId, action: &HostAction) -> ActionOutcome {
        match action {
            HostAction::CheckVmsRunning { .. } => {
                ActionOutcome::VmsRunning(!self.vms_stopped.contains(&host))
            }
            HostAction::TakeLocalSnapshots { .. } if self.snapshot_fails.contains(&host) => {
                ActionOutcome::Failed("disk full".into())
            }
            HostAction::TakeLocalSnapshots { .. } if self.live.contains(&host) => {
                ActionOutcome::SnapshotPoint {
                    local_time: Duration::from_millis(1000 + u64::from(host.0)),
                }
            }
            HostAction::TakeLocalSnapshots { .. } => ActionOutcome::SnapshotTaken {
                local_time: Duration::from_millis(1000 + u64::from(host.0)),
            },
            HostAction::AwaitDurable { .. } if self.durable_fails.contains(&host) => {
                ActionOutcome::Failed("write error".into())
            }
            HostAction::AwaitDurable { .. } => ActionOutcome::SnapshotDurable {
                total_time: Duration::from_millis(3000 + u64::from(host.0)),
            },
            _ => ActionOutcome::Done,
        }
    }

    pub fn complete(&mut self, a: PendingAction, outcome: ActionOutcome) {
        let now = self.now;
        self.log
            .push((a.host, format!("complete {}", a.action.kind())));
        if a.host.is_coordinator() {
            self.coord
                .handle_action_complete(now, a.id, outcome)
                .unwrap();
        } else {
            self.participant(a.host)
                .handle_action_complete(now, a.id, outcome)
                .unwrap();
        }
    }

    /// Removes the first pending action of `host` (panics when it has none), for a test
    /// to complete by hand.
    pub fn take_pending(&mut self, host: ParticipantId) -> PendingAction {
        let i = self
            .pending
            .iter()
            .position(|a| a.host == host)
            .unwrap_or_else(|| panic!("no pending action at {host:?}"));
        self.pending.remove(i).unwrap()
    }

    /// Reboots a participant's host: its pending actions vanish and a fresh participant
    /// (no snapshot running, idle drop not yet armed) takes its place.
    pub fn reboot(&mut self, id: ParticipantId) {
        self.pending.retain(|a| a.host != id);
        *self.participant(id) =
            Participant::new(ParticipantConfig::new(CLUSTER, id, vms_of(id.0))).unwrap();
    }

    pub fn deliver(&mut self, env: Envelope) {
        let now = self.now;
        if env.to.is_coordinator() {
            self.coord.handle_message(now, env).unwrap();
        } else {
            self.participant(env.to).handle_message(now, env).unwrap();
        }
    }

    /// One step: deliver one message or complete one action. False when quiet.
    pub fn step(&mut self) -> bool {
        self.collect();
        let completable: Vec<usize> = self
            .pending
            .iter()
            .enumerate()
            .filter(|(_, a)| !self.hold.contains(&a.host) && !self.down.contains(&a.host))
            .map(|(i, _)| i)
            .collect();
        let choices = self.in_flight.len() + completable.len();
        if choices == 0 {
            return false;
        }
        let pick = match &mut self.rng {
            Some(rng) => rng.gen_range(0..choices),
            None if !self.in_flight.is_empty() => 0,
            None => self.in_flight.len(),
        };
        if pick < self.in_flight.len() {
            let env = match &mut self.rng {
                // Reordering: any in-flight envelope may overtake the others.
                Some(_) => self.in_flight.remove(pick).unwrap(),
                None => self.in_flight.pop_front().unwrap(),
            };
            self.deliver(env);
        } else {
            let i = completable[pick - self.in_flight.len()];
            let a = self.pending.remove(i).unwrap();
            let outcome = self.outcome_for(a.host, &a.action);
            self.complete(a, outcome);
        }
        self.collect();
        true
    }

    /// Steps until quiet; panics on a livelock.
    pub fn drive(&mut self) {
        for _ in 0..10_000_000 {
            if !self.step() {
                return;
            }
        }
        panic!("cluster did not settle");
    }

    /// Advances the clock to `t` and fires every machine's due timeouts.
    pub fn advance_to(&mut self, t: Instant) {
        self.now = t;
        if self.coord.poll_timeout().is_some_and(|d| d <= t) {
            self.coord.handle_timeout(t);
        }
        for p in &mut self.parts {
            if p.poll_timeout().is_some_and(|d| d <= t) {
                p.handle_timeout(t);
            }
        }
        self.collect();
    }

    pub fn advance(&mut self, d: Duration) {
        let t = self.now + d;
        self.advance_to(t);
    }

    /// The actions issued to one host, in order.
    pub fn actions_of(&self, host: ParticipantId) -> Vec<HostAction> {
        self.actions
            .iter()
            .filter(|(h, _)| *h == host)
            .map(|(_, a)| a.clone())
            .collect()
    }

    pub fn coordinator_events(&self) -> Vec<ProtocolEvent> {
        self.events
            .iter()
            .filter(|(h, _)| h.is_coordinator())
            .map(|(_, e)| e.clone())
            .collect()
    }

    pub fn completed(&self) -> Vec<GlobalSnapshotId> {
        self.coordinator_events()
            .into_iter()
            .filter_map(|e| match e {
                ProtocolEvent::GlobalSnapshotCompleted { gs, .. } => Some(gs),
                _ => None,
            })
            .collect()
    }

    pub fn failed(&self) -> Vec<(GlobalSnapshotId, Vec<ParticipantId>, FailureReason)> {
        self.coordinator_events()
            .into_iter()
            .filter_map(|e| match e {
                ProtocolEvent::GlobalSnapshotFailed { gs, who, why } => Some((gs, who, why)),
                _ => None,
            })
            .collect()
    }

    pub fn count_kind(&self, kind: &str) -> usize {
        self.transmitted
            .iter()
            .filter(|e| e.message.kind() == kind)
            .count()
    }

    pub fn shuffle_in_flight(&mut self, seed: u64) {
        let mut v: Vec<_> = self.in_flight.drain(..).collect();
        v.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        self.in_flight = v.into();
    }
}

/// The idle state's rule, issued first and after every ClearColour or ClearAll.
pub fn idle_drop() -> HostAction {
    HostAction::DropIncoming(Colour::Post)
}

/// A participant whose initial idle-drop action was completed.
pub fn started_participant(id: ParticipantId) -> Participant {
    let mut part = Participant::new(ParticipantConfig::new(CLUSTER, id, vms_of(id.0))).unwrap();
    let Some(Output::Action { id: a, action }) = part.poll_output() else {
        panic!("a participant's first output is an action")
    };
    assert_eq!(action, idle_drop());
    part.handle_action_complete(Instant::now(), a, ActionOutcome::Done)
        .unwrap();
    assert!(part.poll_output().is_none());
    part
}

/// Whether a host's actions leave it in the idle state: the last is the idle drop rule,
/// right after a ClearColour or a ClearAll.
pub fn ends_idle(actions: &[HostAction]) -> bool {
    matches!(
        actions,
        [.., HostAction::ClearColour | HostAction::ClearAll, last] if *last == idle_drop()
    )
}

/// Every action of one global snapshot at a host, with the default policy: the VM check,
/// the six steps (step 6 on RELEASE), and re-arming the idle drop rule.
pub fn snapshot_actions(gs: GlobalSnapshotId, host: u32) -> Vec<HostAction> {
    let mut v = vec![HostAction::CheckVmsRunning { vms: vms_of(host) }];
    v.extend(six_steps(gs, host));
    v.push(idle_drop());
    v
}

/// Every action of one global snapshot at a host that takes live local snapshots: like
/// [`snapshot_actions`], with the wait for durability between step 5 and DONE.
pub fn live_snapshot_actions(gs: GlobalSnapshotId, host: u32) -> Vec<HostAction> {
    let mut v = snapshot_actions(gs, host);
    v.insert(6, await_durable(gs, host));
    v
}

/// The wait for durability of `host`'s local snapshots of `gs`.
pub fn await_durable(gs: GlobalSnapshotId, host: u32) -> HostAction {
    HostAction::AwaitDurable {
        gs,
        vms: vms_of(host),
    }
}

/// The log entries of one host, in order.
pub fn log_of(c: &Cluster, host: ParticipantId) -> Vec<String> {
    c.log
        .iter()
        .filter(|(h, _)| *h == host)
        .map(|(_, l)| l.clone())
        .collect()
}

/// Index of the first entry equal to `entry` in `log`.
pub fn position(log: &[String], entry: &str) -> Option<usize> {
    log.iter().position(|l| l == entry)
}

/// The six steps in the thesis's order, for `gs` and the VMs of `host`.
pub fn six_steps(gs: GlobalSnapshotId, host: u32) -> Vec<HostAction> {
    vec![
        HostAction::SetOutgoingColour(Colour::Pre),
        HostAction::DropIncoming(Colour::Post),
        HostAction::TakeLocalSnapshots {
            gs,
            vms: vms_of(host),
        },
        HostAction::SetOutgoingColour(Colour::Post),
        HostAction::AcceptIncoming(Colour::Post),
        HostAction::ClearColour,
    ]
}

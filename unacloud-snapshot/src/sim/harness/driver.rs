//! The host driver of the simulation: how a host carries out the protocol's actions,
//! power failures, the operator's resume requests and the protocol's events.

use std::time::Duration;

use rand::Rng;

use super::{vm_name, Cluster, Ev, LocalSnapshot, Machine};
use crate::protocol::Error as ProtocolError;
use crate::protocol::{
    ActionId, ActionOutcome, Colour, GlobalSnapshotId, HostAction, ProtocolEvent,
};
use crate::sim::checker::check_global_snapshot;
use crate::sim::config::RestoreFrom;
use crate::sim::error::Result;
use crate::sim::vm::Vm;

impl Cluster {
    pub(super) fn action_duration(&mut self, host: usize, action: &HostAction) -> Duration {
        match action {
            HostAction::TakeLocalSnapshots { .. } => {
                let (lo, hi) = (self.cfg.local_snapshot_min, self.cfg.local_snapshot_max);
                self.draw(lo, hi)
            }
            // Completes when the state is on disk, and no sooner than any other action.
            HostAction::AwaitDurable { gs, .. } => self.hosts[host]
                .volatile
                .get(&gs.0)
                .map_or(Duration::ZERO, |s| {
                    s.durable_at.saturating_duration_since(self.now)
                })
                .max(self.cfg.action_latency),
            HostAction::RestoreLocal { .. } => self.cfg.restore_time,
            _ => self.cfg.action_latency,
        }
    }

    /// A duration drawn uniformly from `lo..=hi` (no draw if they are equal).
    fn draw(&mut self, lo: Duration, hi: Duration) -> Duration {
        if lo == hi {
            lo
        } else {
            Duration::from_nanos(
                self.rng
                    .gen_range(lo.as_nanos() as u64..=hi.as_nanos() as u64),
            )
        }
    }

    /// The state of host `id`'s local snapshot of `gs` reached its disk (unless the host
    /// lost power meanwhile: then it is lost).
    pub(super) fn made_durable(&mut self, id: usize, boot: u64, gs: u64) {
        let host = &mut self.hosts[id];
        if !host.up || host.boot != boot {
            return;
        }
        if let Some(snap) = host.volatile.remove(&gs) {
            host.disk.insert(gs, snap);
        }
    }

    pub(super) fn action_done(
        &mut self,
        id: usize,
        boot: u64,
        action_id: ActionId,
        action: HostAction,
        took: Duration,
    ) -> Result<()> {
        if !self.hosts[id].up || self.hosts[id].boot != boot {
            return Ok(()); // the host lost power while acting
        }
        let now = self.now;
        let filter = self.cfg.filter;
        let reorder = self.cfg.colour_post_before_snapshot;
        let ignore_idle_drop = self.cfg.ignore_idle_drop;
        let done_before_durable = self.cfg.done_before_durable;
        // A live snapshot with a durability delay: drawn now (only then, so runs without
        // one replay the same random choices).
        let durability = match &action {
            HostAction::TakeLocalSnapshots { .. } if !self.cfg.durability_max.is_zero() => {
                let (lo, hi) = (self.cfg.durability_min, self.cfg.durability_max);
                Some(self.draw(lo, hi))
            }
            _ => None,
        };
        let mut durable_event = None;
        let host = &mut self.hosts[id];
        let mut unfreeze = false;
        let outcome = match action {
            HostAction::CheckVmsRunning { .. } => {
                ActionOutcome::VmsRunning(host.vm.is_some() && host.vm_running)
            }
            HostAction::SetOutgoingColour(c) => {
                let c = if reorder && c == Colour::Pre {
                    Colour::Post
                } else {
                    c
                };
                host.outgoing = Some(c);
                unfreeze = c == Colour::Post;
                ActionOutcome::Done
            }
            HostAction::DropIncoming(c) => {
                // The idle drop rule is the one issued while the host colours nothing.
                let idle = host.outgoing.is_none();
                if filter && !(ignore_idle_drop && idle) {
                    host.drop_incoming = Some(c);
                }
                ActionOutcome::Done
            }
            HostAction::AcceptIncoming(c) => {
                if host.drop_incoming == Some(c) {
                    host.drop_incoming = None;
                }
                ActionOutcome::Done
            }
            HostAction::ClearColour => {
                host.outgoing = None;
                unfreeze = true;
                ActionOutcome::Done
            }
            HostAction::ClearAll => {
                host.outgoing = None;
                host.drop_incoming = None;
                unfreeze = true;
                ActionOutcome::Done
            }
            HostAction::TakeLocalSnapshots { gs, .. } => match (&host.vm, host.vm_running) {
                (Some(vm), true) => {
                    let snap = LocalSnapshot {
                        vm: vm.clone(),
                        captured_at: now,
                        took,
                        durable_at: now + durability.unwrap_or_default(),
                    };
                    host.frozen = true;
                    match durability {
                        // Point and durability coincide.
                        None => {
                            host.disk.insert(gs.0, snap);
                            ActionOutcome::SnapshotTaken { local_time: took }
                        }
                        Some(_) => {
                            durable_event = Some((snap.durable_at, gs.0));
                            host.volatile.insert(gs.0, snap);
                            if done_before_durable {
                                // The negative control: durable claimed at the point.
                                ActionOutcome::SnapshotTaken { local_time: took }
                            } else {
                                ActionOutcome::SnapshotPoint { local_time: took }
                            }
                        }
                    }
                }
                _ => ActionOutcome::Failed(format!("VM {} is not running", vm_name(id))),
            },
            HostAction::AwaitDurable { gs, .. } => match host.disk.get(&gs.0) {
                Some(snap) => ActionOutcome::SnapshotDurable {
                    total_time: snap.took + (snap.durable_at - snap.captured_at),
                },
                None => ActionOutcome::Failed(format!(
                    "host {id} has no durable local snapshot of {gs}"
                )),
            },
            HostAction::RestoreLocal { gs, .. } => match host.disk.get(&gs.0) {
                Some(snap) => {
                    host.vm = Some(snap.vm.clone());
                    host.restored_capture = Some(snap.captured_at);
                    host.vm_running = false;
                    host.frozen = false;
                    host.held.clear();
                    host.vm_epoch += 1;
                    ActionOutcome::Done
                }
                None => ActionOutcome::Failed(format!(
                    "host {id} has no local snapshot of {gs} on its disk"
                )),
            },
            HostAction::StartVms { .. } => match &mut host.vm {
                Some(vm) => {
                    if let Some(captured) = host.restored_capture.take() {
                        vm.shift_timers(captured, now);
                    }
                    host.vm_running = true;
                    ActionOutcome::Done
                }
                None => ActionOutcome::Failed(format!("VM {} does not exist", vm_name(id))),
            },
        };
        if let Some((at, gs)) = durable_event {
            self.schedule(at, Ev::Durable { host: id, boot, gs });
        }
        let host = &mut self.hosts[id];
        if unfreeze && host.frozen {
            host.frozen = false;
            let held = std::mem::take(&mut host.held);
            for d in held {
                self.arrive(d);
            }
        }
        let result = match &mut self.hosts[id].machine {
            Some(m) => m.handle_action_complete(now, action_id, outcome),
            None => Ok(()),
        };
        if let Err(e) = result {
            self.stats
                .protocol_errors
                .push(format!("host {id} rejected an action completion: {e}"));
        }
        self.drain(id);
        Ok(())
    }

    pub(super) fn power_off(&mut self, id: usize) {
        let host = &mut self.hosts[id];
        if !host.up {
            return;
        }
        host.up = false;
        host.vm = None;
        host.vm_running = false;
        host.frozen = false;
        host.held.clear();
        host.outgoing = None;
        host.drop_incoming = None;
        host.machine = None;
        // Local snapshots not yet on disk are lost with the host's memory.
        host.volatile.clear();
        host.vm_epoch += 1;
        self.crashed.push((id, self.now));
        // The connections to the host break: frames still queued for it are lost.
        self.stream_tail.retain(|&(a, b), _| a != id && b != id);
        if self.cfg.crash_at.is_some() || self.cfg.crash_at_time.is_some() {
            let after = self.cfg.reboot_after;
            self.schedule(self.now + after, Ev::PowerOn { host: id });
            let target = match self.cfg.restore_from {
                RestoreFrom::Latest => None,
                RestoreFrom::Id(g) => Some(GlobalSnapshotId(g)),
            };
            // The operator asks for a resume; POLL is repeated until the crashed host
            // answers.
            self.request_resume(target, self.cfg.resume_after);
        }
    }

    pub(super) fn power_on(&mut self, id: usize) -> Result<()> {
        if self.hosts[id].up {
            return Ok(());
        }
        let machine = self.boot_machine(id)?;
        let host = &mut self.hosts[id];
        host.up = true;
        host.boot += 1;
        // A fresh host has no rules; its state machine arms the idle drop rule first.
        host.drop_incoming = None;
        host.machine = Some(machine);
        Ok(())
    }

    pub(super) fn try_resume(&mut self) -> Result<()> {
        self.resume.retry_at = None;
        let Some(target) = self.resume.wanted else {
            return Ok(());
        };
        let retry = self.now + self.cfg.timeouts.poll_interval;
        let now = self.now;
        let result = match &mut self.hosts[0].machine {
            Some(Machine::Coordinator(c)) => Some(c.start_resume(now, target)),
            _ => None,
        };
        match result {
            None => self.resume.retry_at = Some(retry), // coordinator host is down
            Some(Ok(_)) => {
                self.resume.wanted = None;
                self.resume.running = true;
                self.stats.resumes_started += 1;
            }
            Some(Err(ProtocolError::Busy { .. })) => self.resume.retry_at = Some(retry),
            Some(Err(ProtocolError::NoRestorableSnapshot)) => {
                if self.hosts.iter().all(|h| h.up) {
                    self.restart_from_scratch();
                } else {
                    self.resume.retry_at = Some(retry);
                }
            }
            Some(Err(e)) => return Err(e.into()),
        }
        self.drain(0);
        Ok(())
    }

    /// No global snapshot to resume from: every VM starts again from its initial state.
    pub(super) fn restart_from_scratch(&mut self) {
        self.resume.wanted = None;
        self.resume.restarted_from_scratch = true;
        let n = self.cfg.nodes;
        for id in 0..n {
            let mut vm = Vm::new(id, n, self.cfg.tokens, self.cfg.think, self.cfg.transport);
            vm.start(self.now);
            let host = &mut self.hosts[id];
            host.vm = Some(vm);
            host.vm_running = true;
            host.frozen = false;
            host.held.clear();
            host.vm_epoch += 1;
        }
    }

    pub(super) fn on_protocol_event(&mut self, ev: ProtocolEvent) {
        let now = self.now;
        match ev {
            ProtocolEvent::GlobalSnapshotStarted { gs } => {
                self.persist_catalog();
                let r = self.records.entry(gs.0).or_default();
                r.id = gs.0;
                r.started = Some(now);
            }
            ProtocolEvent::GlobalSnapshotCompleted {
                gs,
                local_times,
                global_time,
            } => {
                self.persist_catalog();
                // The captured states, durable or still being written; a host that lost
                // its local snapshot before durability leaves no verdict (the durability
                // check reports it).
                let states: Option<Vec<Vm>> = self
                    .hosts
                    .iter()
                    .map(|h| {
                        h.disk
                            .get(&gs.0)
                            .or_else(|| h.volatile.get(&gs.0))
                            .map(|s| s.vm.clone())
                    })
                    .collect();
                let verdict = states.as_deref().map(check_global_snapshot);
                let r = self.records.entry(gs.0).or_default();
                r.id = gs.0;
                r.completed = Some(now);
                r.local_times = local_times.iter().map(|t| t.local_time).collect();
                r.phase2 = Some(global_time);
                r.verdict = verdict;
            }
            ProtocolEvent::GlobalSnapshotFailed { gs, who, why } => {
                let r = self.records.entry(gs.0).or_default();
                r.id = gs.0;
                let who: Vec<String> = who.iter().map(ToString::to_string).collect();
                r.failure = Some(format!("{why} (participants {})", who.join(", ")));
            }
            ProtocolEvent::ResumeStarted { .. } => self.persist_catalog(),
            ProtocolEvent::ResumeCompleted { gs } => {
                self.resume.running = false;
                self.resume.restored_from = Some(gs.0);
                self.stats.resumes_completed += 1;
            }
            ProtocolEvent::ResumeFailed { gs, .. } => {
                self.resume.running = false;
                self.stats.resumes_failed += 1;
                self.resume.attempts += 1;
                if self.resume.attempts < 5 {
                    self.request_resume(Some(gs), self.cfg.timeouts.poll_interval);
                }
            }
            ProtocolEvent::TriggerRefused { .. } => self.stats.triggers_refused += 1,
            _ => {}
        }
    }

    pub(super) fn persist_catalog(&mut self) {
        if let Some(Machine::Coordinator(c)) = &self.hosts[0].machine {
            self.catalog_file = Some(c.catalog().to_json());
        }
    }
}

//! The event loop: advancing the virtual clock, delivering frames over the simulated
//! LAN, and draining each machine's outputs into the network and the host driver.

use std::cmp::Reverse;
use std::time::Instant;

use crate::protocol::{decode_frame, encode_frame, Envelope, HostAction, Message, Output};
use crate::sim::error::{Error, Result};
use crate::sim::vm::{Vm, VmOutput};

use super::{Cluster, Datagram, Ev, Machine, Scheduled};

impl Cluster {
    pub(super) fn next_wakeup(&self) -> Option<Instant> {
        let mut next = self.queue.peek().map(|Reverse(s)| s.at);
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        for h in &self.hosts {
            if !h.up {
                continue;
            }
            if h.vm_running && !h.frozen {
                consider(h.vm.as_ref().and_then(Vm::poll_timeout));
            }
            consider(h.machine.as_ref().and_then(Machine::poll_timeout));
        }
        consider(self.resume.retry_at);
        next
    }

    /// Advances the virtual clock to the next thing that happens and handles everything
    /// due then. Returns `Ok(false)` when nothing will ever happen again.
    pub fn step(&mut self) -> Result<bool> {
        let Some(next) = self.next_wakeup() else {
            return Ok(false);
        };
        self.steps += 1;
        if next > self.now {
            self.now = next;
        }
        let now = self.now;
        while self.queue.peek().is_some_and(|Reverse(s)| s.at <= now) {
            let Some(Reverse(s)) = self.queue.pop() else {
                break;
            };
            self.handle_event(s.ev)?;
        }
        for id in 0..self.hosts.len() {
            let h = &self.hosts[id];
            let vm_due = h.up
                && h.vm_running
                && !h.frozen
                && h.vm
                    .as_ref()
                    .and_then(Vm::poll_timeout)
                    .is_some_and(|t| t <= now);
            if vm_due {
                self.vm_timeout(id);
            }
            let h = &mut self.hosts[id];
            if h.up {
                if let Some(m) = &mut h.machine {
                    if m.poll_timeout().is_some_and(|t| t <= now) {
                        m.handle_timeout(now);
                    }
                }
                self.drain(id);
            }
        }
        if self.trigger_pending {
            self.trigger_pending = false;
            self.trigger_global_snapshot();
        }
        if self.resume.retry_at.is_some_and(|t| t <= now) {
            self.try_resume()?;
        }
        Ok(true)
    }

    /// Steps until nothing happens any more or `until` holds; fails with
    /// [`Error::Livelock`] after `max_steps` steps.
    pub fn drive_until(
        &mut self,
        max_steps: u64,
        mut until: impl FnMut(&Cluster) -> bool,
    ) -> Result<u64> {
        let start = self.steps;
        loop {
            if until(self) {
                return Ok(self.steps - start);
            }
            if self.steps - start >= max_steps {
                return Err(Error::Livelock {
                    steps: max_steps,
                    sim_time: self.elapsed(),
                });
            }
            if !self.step()? {
                return Ok(self.steps - start);
            }
        }
    }

    /// Steps until the run is finished or quiet; fails with [`Error::Livelock`] after
    /// `max_steps` steps.
    pub fn drive_bounded(&mut self, max_steps: u64) -> Result<u64> {
        self.drive_until(max_steps, Cluster::is_finished)
    }

    // ----- internals --------------------------------------------------------------------

    pub(super) fn schedule(&mut self, at: Instant, ev: Ev) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Reverse(Scheduled { at, seq, ev }));
    }

    pub(super) fn handle_event(&mut self, ev: Ev) -> Result<()> {
        match ev {
            Ev::Datagram(d) => self.arrive(d),
            Ev::Frame { from, to, bytes } => self.frame_arrives(from, to, &bytes),
            Ev::ActionDone {
                host,
                boot,
                id,
                action,
                took,
            } => self.action_done(host, boot, id, action, took)?,
            Ev::Crash { host } => self.power_off(host),
            Ev::Durable { host, boot, gs } => self.made_durable(host, boot, gs),
            Ev::PowerOn { host } => self.power_on(host)?,
        }
        Ok(())
    }

    pub(super) fn arrive(&mut self, d: Datagram) {
        let to = d.to;
        let host = &mut self.hosts[to];
        if !host.up || !host.vm_running || host.vm.is_none() {
            self.stats.dropped_at_dead_host += 1;
            return;
        }
        if host.frozen {
            host.held.push(d);
            return;
        }
        if d.dscp.is_some() && d.dscp == host.drop_incoming {
            self.stats.dropped_by_filter += 1;
            return;
        }
        if d.rx_epoch != host.vm_epoch {
            self.stats.stale_deliveries += 1;
        }
        let mut out = VmOutput::default();
        if let Some(vm) = &mut host.vm {
            vm.handle_segment(self.now, &self.cfg.tcp, d.from, d.seg, &mut out);
        }
        self.vm_output(to, out);
    }

    pub(super) fn vm_timeout(&mut self, id: usize) {
        let mut out = VmOutput::default();
        if let Some(vm) = &mut self.hosts[id].vm {
            vm.handle_timeout(self.now, &self.cfg.tcp, &mut out);
        }
        self.vm_output(id, out);
    }

    pub(super) fn vm_output(&mut self, from: usize, out: VmOutput) {
        self.stats.app_messages_sent += out.app_sent;
        self.stats.retransmissions += out.retransmitted;
        let dscp = self.hosts[from].outgoing;
        for (to, seg) in out.transmit {
            self.stats.datagrams_sent += 1;
            match self.cfg.link.datagram_delay(&mut self.rng) {
                None => self.stats.lost_by_link += 1,
                Some(delay) => {
                    let rx_epoch = self.hosts[to].vm_epoch;
                    self.schedule(
                        self.now + delay,
                        Ev::Datagram(Datagram {
                            from,
                            to,
                            dscp,
                            seg,
                            rx_epoch,
                        }),
                    );
                }
            }
        }
        for token in out.tokens {
            self.on_token(token);
        }
    }

    pub(super) fn on_token(&mut self, token: u64) {
        let k = self.cfg.snapshot_every;
        if k > 0 && token > 0 && token % k == 0 {
            self.trigger_pending = true;
        }
        if self.crash_armed && self.cfg.crash_at == Some(token) {
            self.crash_armed = false;
            let host = self.pick_crash_host();
            self.schedule(self.now, Ev::Crash { host });
        }
    }

    pub(super) fn frame_arrives(&mut self, from: usize, to: usize, bytes: &[u8]) {
        let now = self.now;
        let host = &mut self.hosts[to];
        if !host.up {
            return;
        }
        let result = decode_frame(bytes).and_then(|env| match &mut host.machine {
            Some(m) => m.handle_message(now, env),
            None => Ok(()),
        });
        if let Err(e) = result {
            self.stats
                .protocol_errors
                .push(format!("host {to} rejected a frame from host {from}: {e}"));
        }
        self.drain(to);
    }

    /// Moves a state machine's outputs into the world.
    pub(super) fn drain(&mut self, id: usize) {
        loop {
            let Some(out) = self.hosts[id]
                .machine
                .as_mut()
                .and_then(Machine::poll_output)
            else {
                return;
            };
            match out {
                Output::Transmit(env) => self.transmit(id, env),
                Output::Action {
                    id: action_id,
                    action,
                } => {
                    if self.cfg.accept_post_before_snapshot
                        && matches!(action, HostAction::TakeLocalSnapshots { .. })
                    {
                        self.hosts[id].drop_incoming = None;
                    }
                    let took = self.action_duration(id, &action);
                    let boot = self.hosts[id].boot;
                    self.schedule(
                        self.now + took,
                        Ev::ActionDone {
                            host: id,
                            boot,
                            id: action_id,
                            action,
                            took,
                        },
                    );
                }
                Output::Event(ev) => self.on_protocol_event(ev),
            }
        }
    }

    pub(super) fn transmit(&mut self, from: usize, env: Envelope) {
        let to = env.to.0 as usize;
        if to >= self.hosts.len() {
            self.stats.protocol_errors.push(format!(
                "host {from} addressed unknown participant {}",
                env.to
            ));
            return;
        }
        self.stats.protocol_messages += 1;
        if let Some(gs) = env.message.gs() {
            if is_resume_message(&env.message) {
                self.stats.resume_messages += 1;
            } else {
                self.records.entry(gs.0).or_default().protocol_messages += 1;
            }
        }
        let bytes = match encode_frame(&env) {
            Ok(b) => b,
            Err(e) => {
                self.stats
                    .protocol_errors
                    .push(format!("host {from} could not encode a frame: {e}"));
                return;
            }
        };
        // A reliable, ordered connection: never lost, never overtaken.
        let delay = self.cfg.link.stream_delay(&mut self.rng);
        let tail = self.stream_tail.entry((from, to)).or_insert(self.now);
        let at = (self.now + delay).max(*tail);
        *tail = at;
        self.schedule(at, Ev::Frame { from, to, bytes });
    }
}

fn is_resume_message(m: &Message) -> bool {
    matches!(
        m,
        Message::Poll { .. }
            | Message::PollOk { .. }
            | Message::Restore { .. }
            | Message::RestoreOk { .. }
            | Message::Start { .. }
            | Message::StartOk { .. }
            | Message::ResumeFailed { .. }
    )
}

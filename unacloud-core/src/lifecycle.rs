//! The deployment life cycle of one VM (thesis §2.4.6, Figs 2.6–2.8) as a sans-IO state
//! machine.
//!
//! [`Lifecycle`] does no I/O and reads no clock: the caller passes `now` into every call,
//! feeds what it observed with [`Lifecycle::handle_event`], calls
//! [`Lifecycle::handle_timeout`] when the instant from [`Lifecycle::poll_timeout`] has
//! come, and carries out the [`Action`]s it drains with [`Lifecycle::poll_action`].
//!
//! ```text
//! Requested ─► Transmitting ─► Configuring ─► Deploying ─► Deployed ◄──► Reconnecting
//!      │        (20 min)          (none)        (8 min)     │ 4 min silent   │ 10 min
//!      └─────────────── timeout / failure ──────────────────┴────► Failed ◄──┘
//!                          stop requested ─► Finishing            │
//!                                              └── powered off ──►┴──► Finished
//! ```
//!
//! | state | event | next state |
//! |---|---|---|
//! | Requested | [`TransferStarted`](Event::TransferStarted) | Transmitting |
//! | Requested, Transmitting | [`TransferCompleted`](Event::TransferCompleted) | Configuring (from Requested: nothing had to move, the template was preloaded) |
//! | Configuring | [`ConfigurationCompleted`](Event::ConfigurationCompleted) | Deploying |
//! | Deploying | [`Started`](Event::Started) | Deployed |
//! | Deployed | [`Heartbeat`](Event::Heartbeat) | Deployed (the silence timer restarts) |
//! | Reconnecting | [`Heartbeat`](Event::Heartbeat) | Deployed |
//! | Requested … Finishing, Failed | [`Heartbeat`](Event::Heartbeat) | unchanged (agents race with state changes) |
//! | Requested … Reconnecting | [`FailureReported`](Event::FailureReported) | Failed |
//! | Requested … Reconnecting | [`StopRequested`](Event::StopRequested) | Finishing |
//! | Finishing, Failed | [`PoweredOff`](Event::PoweredOff) | Finished |
//!
//! Any other pair is refused with [`Error::InvalidState`] and changes nothing; Finished
//! accepts nothing. Timers ([`LifecycleTimeouts`], thesis defaults): Transmitting 20 min
//! and Deploying 8 min → Failed; Deployed without a heartbeat for 4 min → Reconnecting;
//! Reconnecting for 10 min → Failed. On entering Failed or Finishing the machine asks for
//! [`Action::PowerOff`]; the caller confirms with [`Event::PoweredOff`].
//!
//! A timer fires at its deadline even when the caller notices late: a call with a later
//! `now` first fires every due timer (recorded at its deadline), then applies the event.
//! A `now` earlier than one already seen is treated as that one (time never runs back).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use unacloud_core::lifecycle::{Action, Event, Lifecycle, LifecycleTimeouts, State};
//!
//! let t0 = Instant::now();
//! let min = |m: u64| t0 + Duration::from_secs(60 * m);
//! let mut vm = Lifecycle::new("worker-3", t0, LifecycleTimeouts::default());
//! vm.handle_event(t0, Event::TransferStarted).unwrap();
//! assert_eq!(vm.poll_timeout(), Some(min(20)));
//! vm.handle_event(min(5), Event::TransferCompleted).unwrap();
//! vm.handle_event(min(6), Event::ConfigurationCompleted).unwrap();
//! vm.handle_event(min(7), Event::Started).unwrap();
//! assert_eq!(vm.state(), State::Deployed);
//!
//! // The agent falls silent: 4 minutes later Reconnecting, 10 more and Failed.
//! vm.handle_timeout(min(30));
//! assert_eq!(vm.state(), State::Failed);
//! assert_eq!(vm.poll_action(), Some(Action::PowerOff));
//! vm.handle_event(min(31), Event::PoweredOff).unwrap();
//! assert_eq!(vm.state(), State::Finished);
//! let states: Vec<State> = vm.history().iter().map(|t| t.to).collect();
//! assert_eq!(&states[3..], [State::Deployed, State::Reconnecting, State::Failed, State::Finished]);
//! assert_eq!(vm.history()[4].at, min(11));
//!
//! // Events that make no sense in the current state are typed errors.
//! assert!(vm.handle_event(min(32), Event::Started).is_err());
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A state of a VM's deployment (thesis Figs 2.6–2.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Placed, nothing done yet.
    Requested,
    /// The image is being copied to the host.
    Transmitting,
    /// The VM is being created and configured (IP, hostname, …).
    Configuring,
    /// The VM is starting.
    Deploying,
    /// Running, the agent reports in.
    Deployed,
    /// Running as far as known, but the agent has been silent.
    Reconnecting,
    /// Being powered off at the user's request.
    Finishing,
    /// Failed; being powered off.
    Failed,
    /// Powered off; terminal.
    Finished,
}

impl State {
    /// Every state, in life-cycle order.
    pub const ALL: [State; 9] = [
        State::Requested,
        State::Transmitting,
        State::Configuring,
        State::Deploying,
        State::Deployed,
        State::Reconnecting,
        State::Finishing,
        State::Failed,
        State::Finished,
    ];

    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Requested => "requested",
            State::Transmitting => "transmitting",
            State::Configuring => "configuring",
            State::Deploying => "deploying",
            State::Deployed => "deployed",
            State::Reconnecting => "reconnecting",
            State::Finishing => "finishing",
            State::Failed => "failed",
            State::Finished => "finished",
        }
    }

    /// Whether no event or timer can leave this state.
    pub fn is_terminal(self) -> bool {
        self == State::Finished
    }

    /// Whether the VM is still being provisioned (Requested to Deploying).
    pub fn is_provisioning(self) -> bool {
        matches!(
            self,
            State::Requested | State::Transmitting | State::Configuring | State::Deploying
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something the caller observed about the VM or its agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// Copying the image to the host has begun.
    TransferStarted,
    /// The files are on the host (from Requested: nothing had to be copied).
    TransferCompleted,
    /// The VM is created and configured.
    ConfigurationCompleted,
    /// The agent reports the VM running.
    Started,
    /// The agent on the host reported in.
    Heartbeat,
    /// The agent or the hypervisor reported a failure.
    FailureReported {
        /// What went wrong, verbatim.
        reason: String,
    },
    /// The user or the system asked to end the deployment.
    StopRequested,
    /// The VM is powered off.
    PoweredOff,
}

impl Event {
    /// What the event asks of the machine, for error messages.
    fn operation(&self) -> &'static str {
        match self {
            Event::TransferStarted => "start the transfer of",
            Event::TransferCompleted => "complete the transfer of",
            Event::ConfigurationCompleted => "complete the configuration of",
            Event::Started => "mark as started",
            Event::Heartbeat => "record a heartbeat for",
            Event::FailureReported { .. } => "report a failure of",
            Event::StopRequested => "stop",
            Event::PoweredOff => "mark as powered off",
        }
    }
}

/// The timers of the life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Timer {
    /// Transmitting took too long (→ Failed).
    Transmitting,
    /// Configuring took too long (→ Failed).
    Configuring,
    /// Deploying took too long (→ Failed).
    Deploying,
    /// Deployed without a heartbeat for too long (→ Reconnecting).
    AgentSilent,
    /// Reconnecting for too long (→ Failed).
    Reconnecting,
}

impl Timer {
    /// The state this timer runs in.
    pub fn state(self) -> State {
        match self {
            Timer::Transmitting => State::Transmitting,
            Timer::Configuring => State::Configuring,
            Timer::Deploying => State::Deploying,
            Timer::AgentSilent => State::Deployed,
            Timer::Reconnecting => State::Reconnecting,
        }
    }
}

/// How long each state may last; `None` disables a timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleTimeouts {
    /// Limit on Transmitting (thesis: 20 min).
    pub transmitting: Option<Duration>,
    /// Limit on Configuring (the thesis gives no figure: none by default).
    pub configuring: Option<Duration>,
    /// Limit on Deploying (thesis: 8 min).
    pub deploying: Option<Duration>,
    /// Silence of the agent after which Deployed becomes Reconnecting (thesis: 4 min).
    pub agent_silence: Option<Duration>,
    /// Limit on Reconnecting (thesis: 10 min).
    pub reconnecting: Option<Duration>,
}

impl Default for LifecycleTimeouts {
    /// The thesis's figures.
    fn default() -> Self {
        let min = |m: u64| Some(Duration::from_secs(60 * m));
        LifecycleTimeouts {
            transmitting: min(20),
            configuring: None,
            deploying: min(8),
            agent_silence: min(4),
            reconnecting: min(10),
        }
    }
}

impl LifecycleTimeouts {
    /// The limit of `timer`.
    pub fn get(&self, timer: Timer) -> Option<Duration> {
        match timer {
            Timer::Transmitting => self.transmitting,
            Timer::Configuring => self.configuring,
            Timer::Deploying => self.deploying,
            Timer::AgentSilent => self.agent_silence,
            Timer::Reconnecting => self.reconnecting,
        }
    }
}

/// Why a deployment failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// A timer expired.
    Timeout(Timer),
    /// Reported by the agent or the hypervisor.
    Reported(String),
}

/// What caused a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// An event passed to [`Lifecycle::handle_event`].
    Event(Event),
    /// A timer.
    Timeout(Timer),
}

/// One change of state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// When it happened (a timer's deadline for timeouts).
    pub at: Instant,
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
    /// Why.
    pub cause: Cause,
}

/// Something the caller must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Power the VM off, then report [`Event::PoweredOff`].
    PowerOff,
}

/// What an event does in a state.
enum Step {
    To(State),
    /// Accepted, nothing changes.
    Stay,
    /// Accepted in Deployed: restart the silence timer.
    Rearm,
}

fn step(state: State, event: &Event) -> Option<Step> {
    use State::*;
    Some(match (state, event) {
        (Requested, Event::TransferStarted) => Step::To(Transmitting),
        (Requested | Transmitting, Event::TransferCompleted) => Step::To(Configuring),
        (Configuring, Event::ConfigurationCompleted) => Step::To(Deploying),
        (Deploying, Event::Started) => Step::To(Deployed),
        (Deployed, Event::Heartbeat) => Step::Rearm,
        (Reconnecting, Event::Heartbeat) => Step::To(Deployed),
        (Finished, _) => return None,
        (_, Event::Heartbeat) => Step::Stay,
        (
            Requested | Transmitting | Configuring | Deploying | Deployed | Reconnecting,
            Event::FailureReported { .. },
        ) => Step::To(Failed),
        (
            Requested | Transmitting | Configuring | Deploying | Deployed | Reconnecting,
            Event::StopRequested,
        ) => Step::To(Finishing),
        (Finishing | Failed, Event::PoweredOff) => Step::To(Finished),
        _ => return None,
    })
}

/// The life cycle of one VM's deployment. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Lifecycle {
    id: String,
    timeouts: LifecycleTimeouts,
    state: State,
    entered: Instant,
    last: Instant,
    deadline: Option<(Instant, Timer)>,
    failure: Option<Failure>,
    history: Vec<Transition>,
    actions: VecDeque<Action>,
}

impl Lifecycle {
    /// A deployment of the VM `id` in state Requested at `now`.
    pub fn new(id: impl Into<String>, now: Instant, timeouts: LifecycleTimeouts) -> Self {
        Lifecycle {
            id: id.into(),
            timeouts,
            state: State::Requested,
            entered: now,
            last: now,
            deadline: None,
            failure: None,
            history: Vec::new(),
            actions: VecDeque::new(),
        }
    }

    /// The VM's identifier.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// When the current state was entered.
    pub fn entered_at(&self) -> Instant {
        self.entered
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> &LifecycleTimeouts {
        &self.timeouts
    }

    /// Why the deployment failed, once it has.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Every transition so far, oldest first.
    pub fn history(&self) -> &[Transition] {
        &self.history
    }

    /// When [`Lifecycle::handle_timeout`] must next be called, if a timer runs.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline.map(|(at, _)| at)
    }

    /// The timer that runs now and its deadline.
    #[must_use]
    pub fn pending_timer(&self) -> Option<(Instant, Timer)> {
        self.deadline
    }

    /// The next thing the caller must do, if any.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Fires every timer due at `now` (each recorded at its own deadline).
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = now.max(self.last);
        while let Some((at, timer)) = self.deadline {
            if at > now {
                break;
            }
            debug_assert_eq!(timer.state(), self.state);
            let to = match timer {
                Timer::AgentSilent => State::Reconnecting,
                Timer::Transmitting
                | Timer::Configuring
                | Timer::Deploying
                | Timer::Reconnecting => {
                    self.failure = Some(Failure::Timeout(timer));
                    State::Failed
                }
            };
            self.enter(at, to, Cause::Timeout(timer));
        }
        self.last = now;
    }

    /// Applies `event` observed at `now`, after firing any timer due by then. Returns the
    /// state afterwards.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] if the event is not allowed in the state reached (see the
    /// table in the [module docs](self)); the event then changes nothing, though timers
    /// due by `now` have fired.
    pub fn handle_event(&mut self, now: Instant, event: Event) -> Result<State> {
        self.handle_timeout(now);
        let now = self.last;
        match step(self.state, &event) {
            None => Err(Error::InvalidState {
                operation: event.operation(),
                id: self.id.clone(),
                state: self.state.to_string(),
            }),
            Some(Step::Stay) => Ok(self.state),
            Some(Step::Rearm) => {
                self.arm(now, Timer::AgentSilent);
                // A zero limit is due at once.
                self.handle_timeout(now);
                Ok(self.state)
            }
            Some(Step::To(to)) => {
                if let Event::FailureReported { reason } = &event {
                    self.failure = Some(Failure::Reported(reason.clone()));
                }
                self.enter(now, to, Cause::Event(event));
                // The state entered may have a zero limit: it is due at once, so no
                // timer is left overdue when the call returns.
                self.handle_timeout(now);
                Ok(self.state)
            }
        }
    }

    fn arm(&mut self, from: Instant, timer: Timer) {
        // A limit too large for the clock never fires.
        self.deadline = self
            .timeouts
            .get(timer)
            .and_then(|d| from.checked_add(d))
            .map(|at| (at, timer));
    }

    fn enter(&mut self, at: Instant, to: State, cause: Cause) {
        self.history.push(Transition {
            at,
            from: self.state,
            to,
            cause,
        });
        self.state = to;
        self.entered = at;
        self.deadline = None;
        match to {
            State::Transmitting => self.arm(at, Timer::Transmitting),
            State::Configuring => self.arm(at, Timer::Configuring),
            State::Deploying => self.arm(at, Timer::Deploying),
            State::Deployed => self.arm(at, Timer::AgentSilent),
            State::Reconnecting => self.arm(at, Timer::Reconnecting),
            State::Failed | State::Finishing => self.actions.push_back(Action::PowerOff),
            State::Requested | State::Finished => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mins(t0: Instant, m: u64) -> Instant {
        t0 + Duration::from_secs(60 * m)
    }

    fn deployed(t0: Instant) -> Lifecycle {
        let mut l = Lifecycle::new("vm", t0, LifecycleTimeouts::default());
        for e in [
            Event::TransferStarted,
            Event::TransferCompleted,
            Event::ConfigurationCompleted,
            Event::Started,
        ] {
            l.handle_event(t0, e).unwrap();
        }
        l
    }

    #[test]
    fn transmitting_times_out_after_20_minutes() {
        let t0 = Instant::now();
        let mut l = Lifecycle::new("vm", t0, LifecycleTimeouts::default());
        assert_eq!(l.poll_timeout(), None);
        l.handle_event(t0, Event::TransferStarted).unwrap();
        l.handle_timeout(mins(t0, 19));
        assert_eq!(l.state(), State::Transmitting);
        l.handle_timeout(mins(t0, 20));
        assert_eq!(l.state(), State::Failed);
        assert_eq!(l.failure(), Some(&Failure::Timeout(Timer::Transmitting)));
        assert_eq!(l.poll_action(), Some(Action::PowerOff));
        assert_eq!(l.poll_action(), None);
        assert_eq!(l.poll_timeout(), None);
    }

    #[test]
    fn deploying_times_out_after_8_minutes_and_late_events_are_refused() {
        let t0 = Instant::now();
        let mut l = Lifecycle::new("vm", t0, LifecycleTimeouts::default());
        l.handle_event(t0, Event::TransferCompleted).unwrap(); // preloaded template
        assert_eq!(l.poll_timeout(), None, "configuring has no thesis timeout");
        l.handle_event(mins(t0, 1), Event::ConfigurationCompleted)
            .unwrap();
        assert_eq!(l.poll_timeout(), Some(mins(t0, 9)));
        // The VM reports running 10 minutes later: too late.
        let e = l.handle_event(mins(t0, 11), Event::Started).unwrap_err();
        assert!(
            matches!(e, Error::InvalidState { ref state, .. } if state == "failed"),
            "{e}"
        );
        assert_eq!(l.history().last().unwrap().at, mins(t0, 9));
    }

    #[test]
    fn heartbeats_keep_a_deployed_vm_and_bring_back_a_reconnecting_one() {
        let t0 = Instant::now();
        let mut l = deployed(t0);
        l.handle_event(mins(t0, 3), Event::Heartbeat).unwrap();
        l.handle_timeout(mins(t0, 6));
        assert_eq!(l.state(), State::Deployed);
        assert_eq!(l.poll_timeout(), Some(mins(t0, 7)));
        l.handle_timeout(mins(t0, 7));
        assert_eq!(l.state(), State::Reconnecting);
        assert_eq!(l.poll_timeout(), Some(mins(t0, 17)));
        l.handle_event(mins(t0, 16), Event::Heartbeat).unwrap();
        assert_eq!(l.state(), State::Deployed);
        assert_eq!(l.poll_timeout(), Some(mins(t0, 20)));
    }

    #[test]
    fn normal_end_goes_through_finishing() {
        let t0 = Instant::now();
        let mut l = deployed(t0);
        l.handle_event(mins(t0, 1), Event::StopRequested).unwrap();
        assert_eq!(l.state(), State::Finishing);
        assert_eq!(l.poll_action(), Some(Action::PowerOff));
        l.handle_event(mins(t0, 2), Event::PoweredOff).unwrap();
        assert!(l.state().is_terminal());
        assert_eq!(l.failure(), None);
        for e in [Event::Heartbeat, Event::StopRequested, Event::PoweredOff] {
            assert!(l.handle_event(mins(t0, 3), e).is_err());
        }
    }

    #[test]
    fn reported_failure_keeps_the_reason() {
        let t0 = Instant::now();
        let mut l = Lifecycle::new("vm", t0, LifecycleTimeouts::default());
        l.handle_event(
            t0,
            Event::FailureReported {
                reason: "no space left on device".into(),
            },
        )
        .unwrap();
        assert_eq!(
            l.failure(),
            Some(&Failure::Reported("no space left on device".into()))
        );
    }

    #[test]
    fn time_never_runs_back_and_huge_limits_never_fire() {
        let t0 = Instant::now();
        let timeouts = LifecycleTimeouts {
            transmitting: Some(Duration::MAX),
            ..Default::default()
        };
        let mut l = Lifecycle::new("vm", mins(t0, 5), timeouts);
        l.handle_event(t0, Event::TransferStarted).unwrap();
        assert_eq!(l.history()[0].at, mins(t0, 5));
        assert_eq!(l.poll_timeout(), None);
    }

    #[test]
    fn events_serialise_with_a_tag() {
        let e = Event::FailureReported { reason: "x".into() };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, r#"{"event":"failure-reported","reason":"x"}"#);
        let t: LifecycleTimeouts =
            serde_json::from_str(&serde_json::to_string(&LifecycleTimeouts::default()).unwrap())
                .unwrap();
        assert_eq!(t, LifecycleTimeouts::default());
    }
}

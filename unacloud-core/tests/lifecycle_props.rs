//! Property tests of the deployment life cycle: random events and time advances never
//! reach an undefined transition, Finished is terminal, and every timer fires only in its
//! own state, exactly when it is due.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use proptest::prelude::*;
use unacloud_core::lifecycle::{Action, Cause, Event, Lifecycle, LifecycleTimeouts, State, Timer};
use unacloud_core::Error;

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Event(Event),
    Timeout,
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        Just(Event::TransferStarted),
        Just(Event::TransferCompleted),
        Just(Event::ConfigurationCompleted),
        Just(Event::Started),
        Just(Event::Heartbeat),
        Just(Event::Heartbeat),
        Just(Event::Heartbeat),
        "[a-z ]{0,8}".prop_map(|reason| Event::FailureReported { reason }),
        Just(Event::StopRequested),
        Just(Event::PoweredOff),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..1500).prop_map(Op::Advance),
        arb_event().prop_map(Op::Event),
        arb_event().prop_map(Op::Event),
        Just(Op::Timeout),
    ]
}

fn arb_limit() -> impl Strategy<Value = Option<Duration>> {
    prop_oneof![
        Just(None),
        (0u64..1800).prop_map(|s| Some(Duration::from_secs(s))),
    ]
}

fn arb_timeouts() -> impl Strategy<Value = LifecycleTimeouts> {
    prop_oneof![
        Just(LifecycleTimeouts::default()),
        (
            arb_limit(),
            arb_limit(),
            arb_limit(),
            arb_limit(),
            arb_limit()
        )
            .prop_map(
                |(transmitting, configuring, deploying, agent_silence, reconnecting)| {
                    LifecycleTimeouts {
                        transmitting,
                        configuring,
                        deploying,
                        agent_silence,
                        reconnecting,
                    }
                }
            ),
    ]
}

/// The documented transition table.
fn allowed(from: State, to: State, cause: &Cause) -> bool {
    use State::*;
    match cause {
        Cause::Timeout(t) => {
            t.state() == from
                && to
                    == match t {
                        Timer::AgentSilent => Reconnecting,
                        _ => Failed,
                    }
        }
        Cause::Event(e) => matches!(
            (from, e, to),
            (Requested, Event::TransferStarted, Transmitting)
                | (
                    Requested | Transmitting,
                    Event::TransferCompleted,
                    Configuring
                )
                | (Configuring, Event::ConfigurationCompleted, Deploying)
                | (Deploying, Event::Started, Deployed)
                | (Reconnecting, Event::Heartbeat, Deployed)
                | (
                    Requested | Transmitting | Configuring | Deploying | Deployed | Reconnecting,
                    Event::FailureReported { .. },
                    Failed
                )
                | (
                    Requested | Transmitting | Configuring | Deploying | Deployed | Reconnecting,
                    Event::StopRequested,
                    Finishing
                )
                | (Finishing | Failed, Event::PoweredOff, Finished)
        ),
    }
}

fn timer_of(state: State) -> Option<Timer> {
    match state {
        State::Transmitting => Some(Timer::Transmitting),
        State::Configuring => Some(Timer::Configuring),
        State::Deploying => Some(Timer::Deploying),
        State::Deployed => Some(Timer::AgentSilent),
        State::Reconnecting => Some(Timer::Reconnecting),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_schedules_follow_the_table(
        timeouts in arb_timeouts(),
        ops in proptest::collection::vec(arb_op(), 0..80),
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut l = Lifecycle::new("vm-1", t0, timeouts);
        // When the silence timer was last (re)started.
        let mut heard = t0;
        let mut power_offs = 0;
        for op in ops {
            let before_state = l.state();
            let before_len = l.history().len();
            let called = !matches!(op, Op::Advance(_));
            match op {
                Op::Advance(s) => now += Duration::from_secs(s),
                Op::Timeout => l.handle_timeout(now),
                Op::Event(e) => {
                    // Fire due timers first so a refusal can be checked to change nothing.
                    l.handle_timeout(now);
                    let (state, len) = (l.state(), l.history().len());
                    let heartbeat_in_deployed = e == Event::Heartbeat && state == State::Deployed;
                    match l.handle_event(now, e) {
                        Ok(s) => {
                            prop_assert_eq!(s, l.state());
                            if heartbeat_in_deployed {
                                heard = now;
                            }
                        }
                        Err(Error::InvalidState { id, state: shown, .. }) => {
                            prop_assert_eq!(id, "vm-1");
                            prop_assert_eq!(shown, state.to_string());
                            prop_assert_eq!(l.state(), state);
                            prop_assert_eq!(l.history().len(), len);
                        }
                        Err(other) => prop_assert!(false, "unexpected error {other}"),
                    }
                }
            }
            if before_state.is_terminal() {
                prop_assert_eq!(l.state(), State::Finished);
                prop_assert_eq!(l.history().len(), before_len);
            }
            // Check the new transitions.
            for w in l.history()[before_len.saturating_sub(1)..].windows(2) {
                prop_assert_eq!(w[0].to, w[1].from);
                prop_assert!(w[0].at <= w[1].at);
            }
            for (i, t) in l.history().iter().enumerate().skip(before_len) {
                prop_assert!(allowed(t.from, t.to, &t.cause), "{:?}", t);
                prop_assert!(t.at <= now);
                if let Cause::Timeout(timer) = t.cause {
                    // Fires exactly at its deadline, measured from entering its state (or
                    // from the last heartbeat for the silence timer).
                    let entered = if i == 0 { t0 } else { l.history()[i - 1].at };
                    let start = if timer == Timer::AgentSilent { heard.max(entered) } else { entered };
                    let limit = timeouts.get(timer);
                    prop_assert!(limit.is_some(), "disabled timer {:?} fired", timer);
                    prop_assert_eq!(t.at, start + limit.unwrap());
                }
                if t.to == State::Deployed {
                    heard = t.at;
                }
                if matches!(t.to, State::Failed | State::Finishing) {
                    power_offs += 1;
                }
            }
            // A timer runs exactly in the states that have an enabled one, and none is
            // left overdue after a call.
            let expect = timer_of(l.state()).filter(|t| timeouts.get(*t).is_some());
            prop_assert_eq!(l.pending_timer().map(|(_, t)| t), expect);
            if let Some((at, timer)) = l.pending_timer() {
                prop_assert_eq!(timer.state(), l.state());
                prop_assert!(at >= l.entered_at());
                if called {
                    prop_assert!(at > now, "timer {:?} overdue after a call", timer);
                }
            }
            while let Some(a) = l.poll_action() {
                prop_assert_eq!(a, Action::PowerOff);
                power_offs -= 1;
            }
            prop_assert_eq!(power_offs, 0);
        }
    }
}

#[test]
fn every_state_has_a_name_and_terminal_is_only_finished() {
    for s in State::ALL {
        assert_eq!(s.is_terminal(), s == State::Finished);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, format!("\"{s}\""));
    }
}

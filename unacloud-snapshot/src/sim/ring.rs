//! The RCPBT ring of SPEC §6 as the simulated application.
//!
//! Peer 0 (the initiator) sends `Hello 0` to its successor; every peer forwards the token
//! incremented by one. The peer that receives the last token `Hello T-1` sends `Exit T` and
//! leaves; each following peer forwards `Exit n+1` and leaves; the originator absorbs the
//! `Exit` that comes back. The application state counts what it saw, so the ring's own
//! final count — never an assumption — shows whether a message was lost or duplicated.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::idset::IdSet;

/// A message of the ring application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RingMsg {
    /// The token, carrying its count.
    Hello(u64),
    /// Shutdown, carrying the final count plus the number of peers that already left.
    Exit(u64),
}

/// An application message with its per-channel identity.
///
/// `id` is the sender's running count of messages it handed to its transport on this
/// channel. A deterministic sender that is restored from a snapshot re-creates the same ids,
/// which is what lets the checker compare a sender's and a receiver's snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppMsg {
    /// Position of the message in the sender's output on this channel (from 0).
    pub id: u64,
    /// The payload.
    pub body: RingMsg,
}

/// The whole application state of one ring peer.
#[derive(Clone, Debug)]
pub struct RingApp {
    /// This peer's position in the ring.
    pub id: usize,
    /// The successor this peer sends to.
    pub succ: usize,
    /// The predecessor this peer receives from.
    pub pred: usize,
    tokens: u64,
    think: Duration,
    /// Messages handed to the transport towards the successor (ids `0..sent`).
    pub sent: u64,
    /// Ids received from the predecessor.
    pub received: IdSet,
    /// Distinct `Hello` tokens processed.
    pub hellos: u64,
    /// Messages that arrived twice (same id) or carried a token already seen.
    pub duplicates: u64,
    last_hello: Option<u64>,
    /// The `Exit` value this peer forwarded, if it left.
    pub left_with: Option<u64>,
    /// The originator of `Exit` saw its `Exit` come back: the ring is complete.
    pub completed: bool,
    /// Messages decided but not yet sent (the application's "think" timer).
    pending: VecDeque<(Instant, RingMsg)>,
}

impl RingApp {
    /// A fresh peer `id` of an `n`-peer ring passing `tokens` tokens.
    pub fn new(id: usize, n: usize, tokens: u64, think: Duration) -> Self {
        Self {
            id,
            succ: (id + 1) % n,
            pred: (id + n - 1) % n,
            tokens,
            think,
            sent: 0,
            received: IdSet::new(),
            hellos: 0,
            duplicates: 0,
            last_hello: None,
            left_with: None,
            completed: false,
            pending: VecDeque::new(),
        }
    }

    /// The initiator's first action; other peers do nothing.
    pub fn start(&mut self, now: Instant) {
        if self.id == 0 && self.tokens > 0 {
            self.pending
                .push_back((now + self.think, RingMsg::Hello(0)));
        }
    }

    /// The last token this peer processed.
    pub fn last_hello(&self) -> Option<u64> {
        self.last_hello
    }

    /// Delivers a message from the predecessor. Returns the token count if it was a new
    /// `Hello` (the harness uses it to trigger global snapshots and crashes).
    pub fn deliver(&mut self, now: Instant, msg: AppMsg) -> Option<u64> {
        if !self.received.insert(msg.id) {
            self.duplicates += 1;
            return None;
        }
        match msg.body {
            RingMsg::Hello(n) => {
                if self.last_hello.is_some_and(|last| n <= last) {
                    self.duplicates += 1;
                    return None;
                }
                self.last_hello = Some(n);
                self.hellos += 1;
                if self.left_with.is_some() {
                    return Some(n);
                }
                let next = if n + 1 >= self.tokens {
                    RingMsg::Exit(n + 1)
                } else {
                    RingMsg::Hello(n + 1)
                };
                self.pending.push_back((now + self.think, next));
                Some(n)
            }
            RingMsg::Exit(m) => {
                if self.left_with.is_some() {
                    self.completed = true;
                } else {
                    self.pending
                        .push_back((now + self.think, RingMsg::Exit(m + 1)));
                    self.left_with = Some(m + 1);
                }
                None
            }
        }
    }

    /// The next instant the application wants to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.front().map(|&(at, _)| at)
    }

    /// Messages due at `now`, each with its channel id, in order.
    pub fn take_due(&mut self, now: Instant) -> Vec<AppMsg> {
        let mut out = Vec::new();
        while let Some(&(at, body)) = self.pending.front() {
            if at > now {
                break;
            }
            self.pending.pop_front();
            if let RingMsg::Exit(m) = body {
                self.left_with.get_or_insert(m);
            }
            out.push(AppMsg {
                id: self.sent,
                body,
            });
            self.sent += 1;
        }
        out
    }

    /// Shifts the application's timers by `by` (restore from a snapshot taken earlier).
    pub fn shift_timers(&mut self, from: Instant, to: Instant) {
        for (at, _) in &mut self.pending {
            *at = to + at.saturating_duration_since(from);
        }
    }
}

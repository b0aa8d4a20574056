//! The two application transports, modelled per message.
//!
//! * TCP-like: sequence numbers (one per message), cumulative ACKs, a retransmission timer
//!   with exponential back-off, an out-of-order buffer and duplicate discard by sequence
//!   number. Retransmission is what makes category-1 and category-2 messages of SPEC §5
//!   recoverable.
//! * UDP-like: one datagram per message, nothing else.
//!
//! All transport state (including timers, as absolute deadlines) lives in plain structs so
//! that a local snapshot captures it and a restore replaces it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::ring::AppMsg;

/// Which transport the application uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Reliable, ordered, TCP-like.
    #[default]
    Tcp,
    /// Unreliable datagrams, UDP-like.
    Udp,
}

impl std::str::FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            other => Err(format!("unknown transport {other:?}: expected tcp or udp")),
        }
    }
}

/// One application datagram on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// TCP-like data segment carrying one message.
    Data {
        /// Sequence number (one per message, from 0).
        seq: u64,
        /// The message.
        msg: AppMsg,
    },
    /// TCP-like cumulative acknowledgement: every `seq < ack` was received.
    Ack {
        /// Next sequence number the receiver expects.
        ack: u64,
    },
    /// UDP-like datagram.
    Datagram {
        /// The message.
        msg: AppMsg,
    },
}

/// Retransmission parameters of the TCP-like transport.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TcpParams {
    /// Initial retransmission timeout (Linux's minimum RTO is 200 ms).
    #[serde(with = "super::serde_us::micros", rename = "rto_us")]
    pub rto: Duration,
    /// Upper bound of the backed-off timeout.
    #[serde(with = "super::serde_us::micros", rename = "max_rto_us")]
    pub max_rto: Duration,
    /// Retransmissions of one segment before the connection gives up (Linux: 15).
    pub max_retries: u32,
}

impl Default for TcpParams {
    fn default() -> Self {
        Self {
            rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(10),
            max_retries: 15,
        }
    }
}

/// Sending half of a TCP-like connection.
#[derive(Clone, Debug, Default)]
pub struct TcpSender {
    /// Oldest unacknowledged sequence number.
    pub snd_una: u64,
    /// Next sequence number to use.
    pub snd_nxt: u64,
    /// Sent but unacknowledged messages, oldest first: the retransmission buffer.
    pub unacked: VecDeque<(u64, AppMsg)>,
    /// Retransmission deadline, when something is unacknowledged.
    pub rto_at: Option<Instant>,
    backoff: u32,
    /// The connection gave up after too many retransmissions.
    pub failed: bool,
}

/// Receiving half of a TCP-like connection.
#[derive(Clone, Debug, Default)]
pub struct TcpReceiver {
    /// Next in-order sequence number expected.
    pub rcv_nxt: u64,
    /// Segments received out of order, not yet delivered to the application.
    pub ooo: BTreeMap<u64, AppMsg>,
}

impl TcpSender {
    /// Queues `msg` and returns the segment to transmit.
    pub fn send(&mut self, now: Instant, params: &TcpParams, msg: AppMsg) -> Segment {
        let seq = self.snd_nxt;
        self.snd_nxt += 1;
        self.unacked.push_back((seq, msg));
        if self.rto_at.is_none() {
            self.backoff = 0;
            self.rto_at = Some(now + params.rto);
        }
        Segment::Data { seq, msg }
    }

    /// Processes a cumulative ACK.
    pub fn on_ack(&mut self, now: Instant, params: &TcpParams, ack: u64) {
        if ack <= self.snd_una || ack > self.snd_nxt {
            // Old or impossible (from another timeline) acknowledgements change nothing.
            return;
        }
        self.snd_una = ack;
        while self.unacked.front().is_some_and(|&(seq, _)| seq < ack) {
            self.unacked.pop_front();
        }
        self.backoff = 0;
        self.rto_at = (!self.unacked.is_empty()).then(|| now + params.rto);
    }

    /// Fires the retransmission timer if due: every unacknowledged segment is sent again.
    pub fn on_timeout(&mut self, now: Instant, params: &TcpParams) -> Vec<Segment> {
        match self.rto_at {
            Some(at) if at <= now => {}
            _ => return Vec::new(),
        }
        if self.failed || self.backoff >= params.max_retries {
            self.failed = true;
            self.rto_at = None;
            return Vec::new();
        }
        self.backoff += 1;
        let wait = params
            .rto
            .saturating_mul(1u32 << self.backoff.min(16))
            .min(params.max_rto);
        self.rto_at = Some(now + wait);
        self.unacked
            .iter()
            .map(|&(seq, msg)| Segment::Data { seq, msg })
            .collect()
    }
}

impl TcpReceiver {
    /// Processes a data segment: returns the messages now deliverable in order, and the
    /// ACK to send. Duplicates (by sequence number) are discarded and re-acknowledged.
    pub fn on_data(&mut self, seq: u64, msg: AppMsg) -> (Vec<AppMsg>, Segment) {
        let mut deliver = Vec::new();
        if seq == self.rcv_nxt {
            deliver.push(msg);
            self.rcv_nxt += 1;
            while let Some(next) = self.ooo.remove(&self.rcv_nxt) {
                deliver.push(next);
                self.rcv_nxt += 1;
            }
        } else if seq > self.rcv_nxt {
            self.ooo.entry(seq).or_insert(msg);
        }
        (deliver, Segment::Ack { ack: self.rcv_nxt })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sim::ring::RingMsg;

    fn msg(id: u64) -> AppMsg {
        AppMsg {
            id,
            body: RingMsg::Hello(id),
        }
    }

    #[test]
    fn the_receiver_discards_duplicates_and_buffers_out_of_order_segments() {
        let mut rx = TcpReceiver::default();
        let (d, ack) = rx.on_data(1, msg(1));
        assert!(d.is_empty());
        assert_eq!(ack, Segment::Ack { ack: 0 });
        let (d, ack) = rx.on_data(0, msg(0));
        assert_eq!(d, vec![msg(0), msg(1)]);
        assert_eq!(ack, Segment::Ack { ack: 2 });
        // A retransmission of something already delivered is re-acknowledged, not delivered.
        let (d, ack) = rx.on_data(0, msg(0));
        assert!(d.is_empty());
        assert_eq!(ack, Segment::Ack { ack: 2 });
    }

    #[test]
    fn the_sender_retransmits_with_back_off_and_gives_up() {
        let params = TcpParams {
            rto: Duration::from_millis(10),
            max_rto: Duration::from_millis(50),
            max_retries: 3,
        };
        let t0 = Instant::now();
        let mut tx = TcpSender::default();
        tx.send(t0, &params, msg(0));
        tx.send(t0, &params, msg(1));
        assert_eq!(tx.rto_at, Some(t0 + params.rto));
        assert!(tx.on_timeout(t0, &params).is_empty(), "not due yet");
        let mut at = t0 + params.rto;
        let mut waits = Vec::new();
        for _ in 0..3 {
            assert_eq!(tx.on_timeout(at, &params).len(), 2);
            let next = tx.rto_at.unwrap();
            waits.push(next - at);
            at = next;
        }
        assert_eq!(
            waits,
            [20, 40, 50].map(Duration::from_millis),
            "doubling, capped at max_rto"
        );
        assert!(tx.on_timeout(at, &params).is_empty());
        assert!(tx.failed);
    }

    #[test]
    fn acks_from_another_timeline_change_nothing() {
        let params = TcpParams::default();
        let t0 = Instant::now();
        let mut tx = TcpSender::default();
        tx.send(t0, &params, msg(0));
        tx.on_ack(t0, &params, 5); // acknowledges something never sent
        assert_eq!((tx.snd_una, tx.unacked.len()), (0, 1));
        tx.on_ack(t0, &params, 1);
        assert_eq!((tx.snd_una, tx.unacked.len(), tx.rto_at), (1, 0, None));
    }
}

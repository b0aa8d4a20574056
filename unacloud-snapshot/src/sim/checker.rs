//! The consistency checker: inspects a captured global snapshot (one local state per peer)
//! against SPEC §5's two conditions.
//!
//! * Eq. 5.3 — no orphan: a message in the receiver's state (delivered to its application
//!   or held in its transport's receive buffer) must be sent in the sender's state.
//! * Eq. 5.2 — nothing sent is lost: a message sent in the sender's state must be in the
//!   receiver's state, or recoverable. A VM snapshot holds no channel state, so for the
//!   TCP-like transport "recoverable" means the sender will retransmit it after a restore:
//!   it is in the sender's retransmission buffer. For the UDP-like transport a message in
//!   the channel is a lost datagram (SPEC §5, category 2), which UDP applications accept:
//!   it is counted, not reported as a violation.
//! * Durability — a global snapshot recorded complete is restorable: every host's local
//!   snapshot of it is on that host's disk ([`check_durability`]). A live local snapshot is
//!   fixed at its point but durable only later; a host that powers off in between loses
//!   it, and a global snapshot completed before that makes a restore fail.

use serde::Serialize;

use super::harness::Host;
use super::transport::TransportKind;
use super::vm::Vm;

/// The verdict on one channel `from → to` of a global snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChannelVerdict {
    /// Sending peer.
    pub from: usize,
    /// Receiving peer.
    pub to: usize,
    /// Messages the sender's state has sent on this channel.
    pub sent: u64,
    /// Messages received in the receiver's state but not sent in the sender's (Eq. 5.3).
    pub orphans: u64,
    /// Sent, not received, and not in the sender's retransmission buffer (Eq. 5.2, TCP).
    pub unrecoverable: u64,
    /// Sent, not received, and recoverable by retransmission (TCP, category 2).
    pub recoverable: u64,
    /// Sent, not received, UDP-like: lost datagrams the application must tolerate.
    pub datagrams_in_channel: u64,
}

/// The verdict on a whole global snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SnapshotVerdict {
    /// Orphan messages over every channel (Eq. 5.3).
    pub orphans: u64,
    /// Unrecoverable messages over every channel (Eq. 5.2, TCP-like).
    pub unrecoverable: u64,
    /// Messages in a channel that retransmission recovers (TCP-like).
    pub recoverable: u64,
    /// Datagrams in a channel, lost on restore (UDP-like).
    pub datagrams_in_channel: u64,
    /// Per channel.
    pub channels: Vec<ChannelVerdict>,
}

impl SnapshotVerdict {
    /// Violations of SPEC Eq. 5.2/5.3: orphans plus unrecoverable messages.
    pub fn violations(&self) -> u64 {
        self.orphans + self.unrecoverable
    }

    /// Whether the global snapshot is consistent.
    pub fn is_consistent(&self) -> bool {
        self.violations() == 0
    }
}

/// Whether the local snapshots of one global snapshot are durable on every host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DurabilityVerdict {
    /// Hosts whose local snapshot is past its point but still being written: not
    /// restorable yet, and lost if the host powers off now.
    pub pending: Vec<usize>,
    /// Hosts with no local snapshot at all: for a completed global snapshot, the host
    /// powered off between the point and durability. A restore from it fails.
    pub lost: Vec<usize>,
}

impl DurabilityVerdict {
    /// Whether every host's local snapshot is on its disk (a restore can succeed).
    pub fn is_durable(&self) -> bool {
        self.pending.is_empty() && self.lost.is_empty()
    }
}

/// Checks where every host's local snapshot of global snapshot `gs` is: on disk, still
/// being written ([`DurabilityVerdict::pending`]) or nowhere ([`DurabilityVerdict::lost`]).
/// A correct protocol records `gs` complete only when it is durable everywhere, so for a
/// completed global snapshot both lists stay empty at every instant.
pub fn check_durability(hosts: &[Host], gs: u64) -> DurabilityVerdict {
    let mut v = DurabilityVerdict::default();
    for h in hosts {
        if h.disk.contains_key(&gs) {
            continue;
        }
        if h.volatile.contains_key(&gs) {
            v.pending.push(h.id);
        } else {
            v.lost.push(h.id);
        }
    }
    v
}

/// Checks a global snapshot made of one captured [`Vm`] per ring peer (index = peer id).
pub fn check_global_snapshot(states: &[Vm]) -> SnapshotVerdict {
    let mut verdict = SnapshotVerdict::default();
    for receiver in states {
        let Some(sender) = states.get(receiver.app.pred) else {
            continue;
        };
        let ch = check_channel(sender, receiver);
        verdict.orphans += ch.orphans;
        verdict.unrecoverable += ch.unrecoverable;
        verdict.recoverable += ch.recoverable;
        verdict.datagrams_in_channel += ch.datagrams_in_channel;
        verdict.channels.push(ch);
    }
    verdict
}

fn check_channel(sender: &Vm, receiver: &Vm) -> ChannelVerdict {
    let sent = sender.app.sent;
    // Everything the receiver's state holds: delivered ids plus ids buffered out of order.
    let buffered: Vec<u64> = receiver.rx.ooo.values().map(|m| m.id).collect();
    let orphans = receiver.app.received.count_at_or_above(sent)
        + buffered.iter().filter(|&&id| id >= sent).count() as u64;

    let mut v = ChannelVerdict {
        from: sender.app.id,
        to: receiver.app.id,
        sent,
        orphans,
        ..ChannelVerdict::default()
    };
    for id in receiver.app.received.missing_below(sent) {
        if buffered.contains(&id) {
            continue;
        }
        match sender.transport {
            TransportKind::Udp => v.datagrams_in_channel += 1,
            TransportKind::Tcp => {
                let retransmittable =
                    !sender.tx.failed && sender.tx.unacked.iter().any(|&(_, m)| m.id == id);
                if retransmittable {
                    v.recoverable += 1;
                } else {
                    v.unrecoverable += 1;
                }
            }
        }
    }
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sim::ring::{AppMsg, RingMsg};
    use crate::sim::transport::TcpParams;
    use crate::sim::vm::VmOutput;
    use std::time::{Duration, Instant};

    fn ring(n: usize, transport: TransportKind) -> Vec<Vm> {
        (0..n)
            .map(|id| Vm::new(id, n, 10, Duration::ZERO, transport))
            .collect()
    }

    #[test]
    fn a_fresh_ring_is_consistent() {
        let v = check_global_snapshot(&ring(3, TransportKind::Tcp));
        assert!(v.is_consistent());
        assert_eq!(v.channels.len(), 3);
    }

    #[test]
    fn a_message_received_but_not_sent_is_an_orphan() {
        let now = Instant::now();
        let mut states = ring(2, TransportKind::Tcp);
        let mut out = VmOutput::default();
        let msg = AppMsg {
            id: 0,
            body: RingMsg::Hello(0),
        };
        // Peer 1 received message 0 of peer 0, but peer 0's state never sent it.
        states[1].handle_segment(
            now,
            &TcpParams::default(),
            0,
            crate::sim::transport::Segment::Data { seq: 0, msg },
            &mut out,
        );
        let v = check_global_snapshot(&states);
        assert_eq!(v.orphans, 1);
        assert!(!v.is_consistent());
    }

    #[test]
    fn unacked_messages_are_recoverable_and_acked_ones_are_not() {
        let now = Instant::now();
        let params = TcpParams::default();
        let mut states = ring(2, TransportKind::Tcp);
        states[0].start(now);
        let mut out = VmOutput::default();
        states[0].handle_timeout(now, &params, &mut out);
        assert_eq!(states[0].app.sent, 1);
        let v = check_global_snapshot(&states);
        assert_eq!((v.recoverable, v.unrecoverable), (1, 0));
        // The ACK arrived at the sender, but the receiver's state does not hold the message.
        states[0].tx.on_ack(now, &params, 1);
        let v = check_global_snapshot(&states);
        assert_eq!((v.recoverable, v.unrecoverable), (0, 1));
    }

    #[test]
    fn an_undelivered_datagram_is_a_tolerated_loss() {
        let now = Instant::now();
        let mut states = ring(2, TransportKind::Udp);
        states[0].start(now);
        let mut out = VmOutput::default();
        states[0].handle_timeout(now, &TcpParams::default(), &mut out);
        let v = check_global_snapshot(&states);
        assert_eq!(v.datagrams_in_channel, 1);
        assert!(v.is_consistent());
    }
}

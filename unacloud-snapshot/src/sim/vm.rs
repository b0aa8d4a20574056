//! One virtual machine: the ring application plus its transport, as one cloneable value.
//!
//! A local snapshot is a clone of [`Vm`] — application, transport buffers, sequence numbers,
//! unacknowledged segments and timers — and a restore replaces it, exactly like a hypervisor
//! snapshot captures a whole guest.

use std::time::{Duration, Instant};

use super::ring::{AppMsg, RingApp};
use super::transport::{Segment, TcpParams, TcpReceiver, TcpSender, TransportKind};

/// The whole state of one guest.
#[derive(Clone, Debug)]
pub struct Vm {
    /// The application.
    pub app: RingApp,
    /// Which transport the application uses.
    pub transport: TransportKind,
    /// TCP-like connection to the successor (unused for UDP).
    pub tx: TcpSender,
    /// TCP-like connection from the predecessor (unused for UDP).
    pub rx: TcpReceiver,
}

/// What a guest wants from the world after an input.
#[derive(Debug, Default)]
pub struct VmOutput {
    /// Datagrams to transmit: (destination peer, segment).
    pub transmit: Vec<(usize, Segment)>,
    /// `Hello n` tokens the application processed (for triggers and statistics).
    pub tokens: Vec<u64>,
    /// Application messages handed to the transport.
    pub app_sent: u64,
    /// Segments sent again by the retransmission timer.
    pub retransmitted: u64,
}

impl Vm {
    /// A fresh guest `id` of an `n`-peer ring.
    pub fn new(
        id: usize,
        n: usize,
        tokens: u64,
        think: Duration,
        transport: TransportKind,
    ) -> Self {
        Self {
            app: RingApp::new(id, n, tokens, think),
            transport,
            tx: TcpSender::default(),
            rx: TcpReceiver::default(),
        }
    }

    /// Boots the application.
    pub fn start(&mut self, now: Instant) {
        self.app.start(now);
    }

    /// The next instant this guest has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.app.poll_timeout(), self.tx.rto_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A datagram arrived from peer `from` (after the guest's packet filter accepted it).
    pub fn handle_segment(
        &mut self,
        now: Instant,
        params: &TcpParams,
        from: usize,
        seg: Segment,
        out: &mut VmOutput,
    ) {
        match seg {
            Segment::Data { seq, msg } if from == self.app.pred => {
                let (deliver, ack) = self.rx.on_data(seq, msg);
                out.transmit.push((from, ack));
                for msg in deliver {
                    self.deliver(now, msg, out);
                }
            }
            Segment::Ack { ack } if from == self.app.succ => self.tx.on_ack(now, params, ack),
            Segment::Datagram { msg } if from == self.app.pred => self.deliver(now, msg, out),
            _ => {}
        }
        self.handle_timeout(now, params, out);
    }

    fn deliver(&mut self, now: Instant, msg: AppMsg, out: &mut VmOutput) {
        if let Some(n) = self.app.deliver(now, msg) {
            out.tokens.push(n);
        }
    }

    /// Runs whatever is due at `now`: application sends and retransmissions.
    pub fn handle_timeout(&mut self, now: Instant, params: &TcpParams, out: &mut VmOutput) {
        let succ = self.app.succ;
        for msg in self.app.take_due(now) {
            out.app_sent += 1;
            let seg = match self.transport {
                TransportKind::Tcp => self.tx.send(now, params, msg),
                TransportKind::Udp => Segment::Datagram { msg },
            };
            out.transmit.push((succ, seg));
        }
        let again = self.tx.on_timeout(now, params);
        out.retransmitted += again.len() as u64;
        out.transmit
            .extend(again.into_iter().map(|seg| (succ, seg)));
    }

    /// Moves every timer from the capture clock to the restore clock: the guest resumes as
    /// if no time had passed since its snapshot.
    pub fn shift_timers(&mut self, captured_at: Instant, resumed_at: Instant) {
        self.app.shift_timers(captured_at, resumed_at);
        if let Some(at) = &mut self.tx.rto_at {
            *at = resumed_at + at.saturating_duration_since(captured_at);
        }
    }
}

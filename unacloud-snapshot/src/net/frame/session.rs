//! An established session (sequence numbers, MACs, sender binding) and who may send what.

use super::*;

/// An established connection's framing state: sequence numbers both ways and, with a
/// cluster key, the session key that authenticates every DATA and PING frame.
#[derive(Debug)]
pub struct Session {
    pub(super) key: Option<[u8; MAC_LEN]>,
    pub(super) out_dir: u8,
    pub(super) in_dir: u8,
    pub(super) next_out: u64,
    pub(super) next_in: u64,
    pub(super) me: ParticipantId,
    pub(super) peer: ParticipantId,
}

impl Session {
    /// Whether frames are authenticated.
    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// The other side's id (authenticated by the handshake with a key).
    pub fn peer(&self) -> ParticipantId {
        self.peer
    }

    /// This side's id.
    pub fn me(&self) -> ParticipantId {
        self.me
    }

    fn mac(&self, dir: u8, seq: u64, kind: FrameKind, body: &[u8]) -> Option<[u8; MAC_LEN]> {
        self.key
            .map(|ks| hmac(&ks, &[&[dir], &seq.to_be_bytes(), &[kind as u8], body]))
    }

    /// Encodes the next outgoing frame.
    pub fn seal(&mut self, kind: FrameKind, body: &[u8]) -> Vec<u8> {
        let seq = self.next_out;
        self.next_out += 1;
        let mac = if kind.is_authenticated() {
            self.mac(self.out_dir, seq, kind, body)
        } else {
            None
        };
        encode_frame(kind, seq, body, mac.as_ref())
    }

    /// Checks the next incoming frame: its sequence number and (keyed) its MAC. A REJECT
    /// is returned as [`Error::PeerRejected`]; a handshake frame is out of place.
    pub fn open(&mut self, frame: RawFrame) -> Result<(FrameKind, Vec<u8>)> {
        if frame.seq != self.next_in {
            return Err(bad(format!(
                "{} frame with sequence number {} where {} was due (replayed, lost or reordered)",
                frame.kind.name(),
                frame.seq,
                self.next_in
            )));
        }
        self.next_in += 1;
        match frame.kind {
            FrameKind::Reject => Err(Error::PeerRejected {
                peer: format!("node {}", self.peer),
                reason: reject_reason(&frame.body),
            }),
            FrameKind::Hello | FrameKind::Welcome | FrameKind::Auth => Err(bad(format!(
                "a {} on an established connection",
                frame.kind.name()
            ))),
            FrameKind::Data | FrameKind::Ping => {
                if let Some(expected) = self.mac(self.in_dir, frame.seq, frame.kind, &frame.body) {
                    let ok = frame.mac.is_some_and(|m| same_mac(&m, &expected));
                    if !ok {
                        return Err(Error::Authentication {
                            peer: format!("node {}", self.peer),
                            reason: format!(
                                "the MAC of {} frame {} does not verify (forged or corrupted)",
                                frame.kind.name(),
                                frame.seq
                            ),
                        });
                    }
                }
                Ok((frame.kind, frame.body))
            }
        }
    }

    /// Decodes a DATA body into an envelope and checks it against this connection: the
    /// cluster, the sender (the authenticated peer, never anyone else), the recipient
    /// (this node) and whether the sender's role may send that message to this one
    /// ([`authorise`]).
    pub fn check_envelope(&self, cluster: ClusterId, body: &[u8]) -> Result<Envelope> {
        let envelope: Envelope =
            serde_json::from_slice(body).map_err(|e| bad(format!("malformed envelope: {e}")))?;
        if envelope.cluster != cluster {
            return Err(crate::protocol::Error::ForeignCluster {
                expected: cluster,
                got: envelope.cluster,
            }
            .into());
        }
        let unauthorised = |reason: String| Error::Unauthorised {
            peer: format!("node {}", self.peer),
            reason,
        };
        if envelope.from != self.peer {
            return Err(unauthorised(format!(
                "an envelope from {} on the connection of {}: a connection speaks only for the node that opened it",
                envelope.from, self.peer
            )));
        }
        if envelope.to != self.me {
            return Err(unauthorised(format!(
                "an envelope to {} on a connection to {}",
                envelope.to, self.me
            )));
        }
        authorise(envelope.from, envelope.to, &envelope.message).map_err(unauthorised)?;
        Ok(envelope)
    }
}

/// Whether `from` may send `message` to `to` (`PROTOCOL.md` §3, "Who sends what"). Also
/// refuses epochs above [`MAX_EPOCH`].
pub fn authorise(
    from: ParticipantId,
    to: ParticipantId,
    message: &Message,
) -> std::result::Result<(), String> {
    use Message as M;
    let ms = ParticipantId::METADATA_SERVER;
    let c = ParticipantId::COORDINATOR;
    let un = ParticipantId::UNREGISTERED;
    let participant = |id: ParticipantId| id != c && id != ms && id != un;
    let ok = match message {
        M::Precheck { .. }
        | M::TakeSnapshot { .. }
        | M::Release { .. }
        | M::Abort { .. }
        | M::Poll { .. }
        | M::Restore { .. }
        | M::Start { .. }
        | M::ResumeAbort { .. } => from == c && participant(to),
        M::PrecheckOk { .. }
        | M::PrecheckFailed { .. }
        | M::Done { .. }
        | M::SnapshotFailed { .. }
        | M::PollOk { .. }
        | M::RestoreOk { .. }
        | M::StartOk { .. }
        | M::ResumeFailed { .. }
        | M::Stale { .. } => participant(from) && to == c,
        M::Insert { .. } => from == un && to == ms,
        M::SnapshotReport { .. } => from == c && to == ms,
        M::QueryAddress { .. } | M::QueryList { .. } | M::QueryCount => from != ms && to == ms,
        M::TriggerGlobalSnapshot | M::TriggerResume { .. } => {
            (from != ms && to == ms) || (from == ms && to == c)
        }
        M::Inserted { .. }
        | M::TriggerForwarded
        | M::Address { .. }
        | M::List { .. }
        | M::Count { .. }
        | M::Refused { .. } => from == ms,
    };
    if !ok {
        return Err(format!(
            "{} may not send {} to {}",
            role_name(from),
            message.kind(),
            role_name(to)
        ));
    }
    let epochs = [
        message.gs().map(|g| g.0),
        match message {
            M::Poll { attempt, .. }
            | M::PollOk { attempt, .. }
            | M::Restore { attempt, .. }
            | M::RestoreOk { attempt, .. }
            | M::Start { attempt, .. }
            | M::StartOk { attempt, .. }
            | M::ResumeFailed { attempt, .. }
            | M::ResumeAbort { attempt, .. } => Some(attempt.0),
            M::Stale {
                attempt,
                newest_gs,
                newest_attempt,
                ..
            } => Some(
                attempt
                    .map_or(0, |a| a.0)
                    .max(newest_gs.0)
                    .max(newest_attempt.0),
            ),
            _ => None,
        },
    ];
    if let Some(e) = epochs.into_iter().flatten().find(|e| *e > MAX_EPOCH) {
        return Err(format!(
            "{} carries epoch {e}, above the largest allowed ({MAX_EPOCH})",
            message.kind()
        ));
    }
    Ok(())
}

pub(super) fn role_name(id: ParticipantId) -> String {
    if id == ParticipantId::METADATA_SERVER {
        "the metadata server".to_string()
    } else if id == ParticipantId::UNREGISTERED {
        "an unregistered client".to_string()
    } else if id == ParticipantId::COORDINATOR {
        "the coordinator".to_string()
    } else {
        format!("participant {}", id.0)
    }
}

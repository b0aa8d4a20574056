//! The three-frame handshake (HELLO, WELCOME, AUTH) on both sides.

use super::*;

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct HelloBody {
    protocol: String,
    versions: Vec<u8>,
    cluster: ClusterId,
    id: ParticipantId,
    nonce: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct WelcomeBody {
    version: u8,
    id: ParticipantId,
    nonce: String,
    proof: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct AuthBody {
    proof: Option<String>,
}

/// What a HELLO announced, as the server saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The client's cluster.
    pub cluster: ClusterId,
    /// The client's id ([`ParticipantId::UNREGISTERED`] for launchers before registration
    /// and for operators' triggers).
    pub id: ParticipantId,
}

pub(super) fn nonce_of(text: &str, what: &str) -> Result<[u8; NONCE_LEN]> {
    let bytes = hex_decode(text).map_err(|e| bad(format!("the {what} nonce {e}")))?;
    bytes
        .try_into()
        .map_err(|_| bad(format!("the {what} nonce is not {NONCE_LEN} bytes")))
}

pub(super) fn session_key(
    key: &ClusterKey,
    cluster: ClusterId,
    client: ParticipantId,
    server: ParticipantId,
    cn: &[u8; NONCE_LEN],
    sn: &[u8; NONCE_LEN],
) -> [u8; MAC_LEN] {
    hmac(
        &key.0,
        &[
            b"unacloud-gs/1 session",
            &[TRANSPORT_VERSION],
            &cluster.0.to_be_bytes(),
            &client.0.to_be_bytes(),
            &server.0.to_be_bytes(),
            cn,
            sn,
        ],
    )
}

pub(super) fn check_first(frame: &RawFrame, kind: FrameKind, seq: u64) -> Result<()> {
    if frame.kind == FrameKind::Reject {
        return Err(Error::PeerRejected {
            peer: "peer".to_string(),
            reason: reject_reason(&frame.body),
        });
    }
    if frame.kind != kind {
        return Err(bad(format!(
            "expected {} but got {}",
            kind.name(),
            frame.kind.name()
        )));
    }
    if frame.seq != seq {
        return Err(bad(format!(
            "{} has sequence number {} instead of {seq}",
            kind.name(),
            frame.seq
        )));
    }
    Ok(())
}

/// Checks that `frame` is the handshake frame `kind` with sequence number `seq`, and
/// decodes its JSON body.
pub(super) fn handshake_body<T: serde::de::DeserializeOwned>(
    frame: &RawFrame,
    kind: FrameKind,
    seq: u64,
) -> Result<T> {
    check_first(frame, kind, seq)?;
    serde_json::from_slice(&frame.body).map_err(|e| bad(format!("malformed {}: {e}", kind.name())))
}

/// The text of a REJECT body (invalid UTF-8 replaced).
pub fn reject_reason(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// The body of a REJECT frame: `reason` cut to [`MAX_REJECT_REASON`] bytes.
pub fn reject_body(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REJECT_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

/// The connecting side of a handshake.
#[derive(Debug)]
pub struct ClientHandshake {
    cluster: ClusterId,
    key: Option<ClusterKey>,
    me: ParticipantId,
    server: ParticipantId,
    nonce: [u8; NONCE_LEN],
}

impl ClientHandshake {
    /// A client `me` of `cluster` dialling the server `server` (the coordinator, or
    /// [`ParticipantId::METADATA_SERVER`]), with a fresh random `nonce`.
    pub fn new(
        cluster: ClusterId,
        key: Option<ClusterKey>,
        me: ParticipantId,
        server: ParticipantId,
        nonce: [u8; NONCE_LEN],
    ) -> Self {
        Self {
            cluster,
            key,
            me,
            server,
            nonce,
        }
    }

    /// The HELLO frame (sequence number 0).
    pub fn hello(&self) -> Vec<u8> {
        let body = HelloBody {
            protocol: PROTOCOL_NAME.to_string(),
            versions: vec![TRANSPORT_VERSION],
            cluster: self.cluster,
            id: self.me,
            nonce: hex_encode(&self.nonce),
        };
        encode_frame(
            FrameKind::Hello,
            0,
            &serde_json::to_vec(&body).unwrap_or_default(),
            None,
        )
    }

    /// Checks the server's WELCOME (its id, and with a key its proof) and returns the AUTH
    /// frame to send and the established session.
    pub fn on_welcome(self, frame: &RawFrame) -> Result<(Vec<u8>, Session)> {
        let w: WelcomeBody = handshake_body(frame, FrameKind::Welcome, 0)?;
        if w.version != TRANSPORT_VERSION {
            return Err(bad(format!(
                "the server chose transport version {}, which this client does not speak (it speaks {TRANSPORT_VERSION})",
                w.version
            )));
        }
        if w.id != self.server {
            return Err(bad(format!(
                "reached node {} instead of {}",
                w.id, self.server
            )));
        }
        let sn = nonce_of(&w.nonce, "server")?;
        let auth_err = |reason: &str| Error::Authentication {
            peer: "peer".to_string(),
            reason: reason.to_string(),
        };
        let (proof, ks) = match (&self.key, &w.proof) {
            (Some(key), Some(p)) => {
                let ks = session_key(key, self.cluster, self.me, self.server, &self.nonce, &sn);
                let got = hex_decode(p).map_err(|e| bad(format!("the server's proof {e}")))?;
                if !same_mac(&got, &hmac(&ks, &[b"server"])) {
                    return Err(auth_err("the server's proof does not verify: the two nodes have different cluster keys; configure the same key on both"));
                }
                (Some(hex_encode(&hmac(&ks, &[b"client"]))), Some(ks))
            }
            (Some(_), None) => return Err(auth_err("the server has no cluster key but this node has one; configure the same key on both (a keyed node never talks to an unkeyed one)")),
            (None, Some(_)) => return Err(auth_err("the server requires the cluster key but this node has none; configure the key here too")),
            (None, None) => (None, None),
        };
        let auth = encode_frame(
            FrameKind::Auth,
            1,
            &serde_json::to_vec(&AuthBody { proof }).unwrap_or_default(),
            None,
        );
        Ok((
            auth,
            Session {
                key: ks,
                out_dir: b'C',
                in_dir: b'S',
                next_out: 2,
                next_in: 1,
                me: self.me,
                peer: self.server,
            },
        ))
    }
}

/// The accepting side of a handshake, before HELLO.
#[derive(Debug)]
pub struct ServerHandshake {
    cluster: ClusterId,
    key: Option<ClusterKey>,
    me: ParticipantId,
    nonce: [u8; NONCE_LEN],
}

/// The accepting side after WELCOME, waiting for AUTH.
#[derive(Debug)]
pub struct PendingServer {
    hello: Hello,
    me: ParticipantId,
    keyed: Option<[u8; MAC_LEN]>,
    has_key: bool,
}

impl ServerHandshake {
    /// A server `me` of `cluster` with a fresh random `nonce`.
    pub fn new(
        cluster: ClusterId,
        key: Option<ClusterKey>,
        me: ParticipantId,
        nonce: [u8; NONCE_LEN],
    ) -> Self {
        Self {
            cluster,
            key,
            me,
            nonce,
        }
    }

    /// Checks a HELLO (protocol, versions, cluster, nonce) and whether `admit` lets its
    /// id connect here (`Err(reason)` refuses it). Returns the WELCOME to send.
    pub fn on_hello(
        self,
        frame: &RawFrame,
        admit: impl FnOnce(ParticipantId) -> std::result::Result<(), String>,
    ) -> Result<(PendingServer, Vec<u8>)> {
        let h: HelloBody = handshake_body(frame, FrameKind::Hello, 0)?;
        if h.protocol != PROTOCOL_NAME {
            return Err(bad(format!(
                "HELLO of protocol {:?}, not {PROTOCOL_NAME:?}",
                h.protocol
            )));
        }
        if !h.versions.contains(&TRANSPORT_VERSION) {
            return Err(bad(format!(
                "no common transport version: the client offers {:?}, this server speaks {TRANSPORT_VERSION}",
                h.versions
            )));
        }
        if h.cluster != self.cluster {
            return Err(crate::protocol::Error::ForeignCluster {
                expected: self.cluster,
                got: h.cluster,
            }
            .into());
        }
        let cn = nonce_of(&h.nonce, "client")?;
        admit(h.id).map_err(|reason| Error::Unauthorised {
            peer: format!("node {}", h.id),
            reason,
        })?;
        let ks = self
            .key
            .as_ref()
            .map(|k| session_key(k, self.cluster, h.id, self.me, &cn, &self.nonce));
        let body = WelcomeBody {
            version: TRANSPORT_VERSION,
            id: self.me,
            nonce: hex_encode(&self.nonce),
            proof: ks.map(|ks| hex_encode(&hmac(&ks, &[b"server"]))),
        };
        let welcome = encode_frame(
            FrameKind::Welcome,
            0,
            &serde_json::to_vec(&body).unwrap_or_default(),
            None,
        );
        Ok((
            PendingServer {
                hello: Hello {
                    cluster: h.cluster,
                    id: h.id,
                },
                me: self.me,
                keyed: ks,
                has_key: self.key.is_some(),
            },
            welcome,
        ))
    }
}

impl PendingServer {
    /// The HELLO this connection sent.
    pub fn hello(&self) -> Hello {
        self.hello
    }

    /// Checks AUTH; the session is established (the client proved the key, if there is
    /// one).
    pub fn on_auth(self, frame: &RawFrame) -> Result<Session> {
        let a: AuthBody = handshake_body(frame, FrameKind::Auth, 1)?;
        let auth_err = |reason: &str| Error::Authentication {
            peer: format!("node {}", self.hello.id),
            reason: reason.to_string(),
        };
        match (self.keyed, a.proof) {
            (Some(ks), Some(p)) => {
                let got = hex_decode(&p).map_err(|e| bad(format!("the client's proof {e}")))?;
                if !same_mac(&got, &hmac(&ks, &[b"client"])) {
                    return Err(auth_err("the client's proof does not verify: the two nodes have different cluster keys (or the HELLO was replayed); configure the same key on both"));
                }
            }
            (Some(_), None) => return Err(auth_err("the client sent no proof but this node requires the cluster key; configure the key on the client too")),
            (None, Some(_)) => return Err(auth_err("the client authenticates with a cluster key but this node has none; configure the same key here")),
            (None, None) => {}
        }
        debug_assert_eq!(self.keyed.is_some(), self.has_key);
        Ok(Session {
            key: self.keyed,
            out_dir: b'S',
            in_dir: b'C',
            next_out: 1,
            next_in: 2,
            me: self.me,
            peer: self.hello.id,
        })
    }
}

#!/usr/bin/env python3
"""A participant of the unacloud global-snapshot protocol, version 1.

Written from PROTOCOL.md alone, with the Python standard library only. It registers at
the metadata server (INSERT), looks up the coordinator (QUERY_ADDRESS{id: 0}), dials it,
runs the v1 handshake (keyed with HMAC-SHA256 or unkeyed), checks every incoming frame,
keeps the connection alive with PING, reconnects with backoff, and runs the participant
state machine of PROTOCOL.md sections 6.2, 6.3 and 7 against a simulated host whose
actions are only logged (the local snapshot sleeps for --snapshot-ms).

Layers, from the bottom:

* frames: ``encode_frame``, ``FrameDecoder``, the key schedule (``session_key``,
  ``proof``, ``frame_mac``) and JSON helpers;
* ``ClientChannel``: one client connection without I/O (handshake, sequence numbers,
  MACs, envelope checks: sender binding, roles, cluster, message schema);
* ``ParticipantMachine``: the state machine, without I/O or clocks of its own;
* ``SimHost`` and ``Runtime``: the simulated host, the sockets and the event loop.

Events for a test harness go to stdout, one JSON object per line; logs go to stderr.
"""

import argparse
import collections
import errno
import hashlib
import hmac
import json
import logging
import os
import select
import signal
import socket
import sys
import time

# ---------------------------------------------------------------------------------------
# Constants (PROTOCOL.md sections 1, 2)

PROTOCOL_NAME = "unacloud-gs"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

COORDINATOR_ID = 0
MS_ID = 0xFFFFFFFF            # u32::MAX
UNREGISTERED_ID = 0xFFFFFFFE  # u32::MAX - 1

KIND_HELLO = 1
KIND_WELCOME = 2
KIND_AUTH = 3
KIND_DATA = 4
KIND_PING = 5
KIND_REJECT = 6
KIND_NAMES = {1: "HELLO", 2: "WELCOME", 3: "AUTH", 4: "DATA", 5: "PING", 6: "REJECT"}

HEADER_LEN = 13        # length (4) + kind (1) + seq (8)
MIN_LENGTH = 9         # kind + seq
MAC_LEN = 32
NONCE_LEN = 32
MIN_KEY_LEN = 16

LIMIT_HANDSHAKE = 1024             # length before the handshake completed
LIMIT_CLIENT_TO_SERVER = 256 * 1024
LIMIT_SERVER_TO_CLIENT = 1024 * 1024
REJECT_REASON_MAX = 512
SEND_QUEUE_MAX = 1024              # envelopes

HANDSHAKE_TIMEOUT_S = 5.0
KEEPALIVE_S = 4.0      # send a PING at least every 5 s without sending (margin kept)
IDLE_TIMEOUT_S = 20.0  # close after 20 s without receiving any frame
BACKOFF_MIN_S = 0.02
BACKOFF_MAX_S = 2.0

MAX_EPOCH = 2 ** 53 - 1
U16_MAX = 2 ** 16 - 1
U32_MAX = 2 ** 32 - 1
U64_MAX = 2 ** 64 - 1

# Participant timeouts (PROTOCOL.md section 8), seconds.
PRECHECK_TIMEOUT_S = 10.0
SNAPSHOT_TIMEOUT_S = 120.0
RESUME_PHASE_TIMEOUT_S = 300.0

SESSION_LABEL = b"unacloud-gs/1 session"
DIR_CLIENT = b"C"
DIR_SERVER = b"S"

log = logging.getLogger("participant")


class ProtocolError(Exception):
    """A defect that ends the connection (PROTOCOL.md 2.1): send REJECT, close."""

    def __init__(self, reason, category="TransportFrame"):
        super().__init__(reason)
        self.reason = reason
        self.category = category
        self.events = []


class PeerRejected(Exception):
    """The peer sent REJECT: log, close, act on nothing else (PROTOCOL.md 2.1)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------
# Key schedule (PROTOCOL.md 2.3)

def session_key(key, version, cluster, client_id, server_id, client_nonce, server_nonce):
    data = (SESSION_LABEL + bytes([version]) + cluster.to_bytes(8, "big")
            + client_id.to_bytes(4, "big") + server_id.to_bytes(4, "big")
            + client_nonce + server_nonce)
    return hmac.new(key, data, hashlib.sha256).digest()


def proof(ks, who):
    """who is "server" (WELCOME.proof) or "client" (AUTH.proof); returns hex text."""
    return hmac.new(ks, who.encode("ascii"), hashlib.sha256).hexdigest()


def frame_mac(ks, direction, seq, kind, body):
    data = direction + seq.to_bytes(8, "big") + bytes([kind]) + body
    return hmac.new(ks, data, hashlib.sha256).digest()


def read_key_file(path):
    with open(path, "r", encoding="ascii") as f:
        text = "".join(f.read().split())
    try:
        key = bytes.fromhex(text)
    except ValueError as e:
        raise ValueError("key file %s is not hexadecimal text: %s" % (path, e))
    if len(key) < MIN_KEY_LEN:
        raise ValueError("key file %s holds %d bytes; a cluster key has at least %d"
                         % (path, len(key), MIN_KEY_LEN))
    return key


# ---------------------------------------------------------------------------------------
# JSON

def json_bytes(obj):
    """Compact JSON in the field order of the dict (the reference's form, appendix A)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError("duplicate field %r" % k)
        obj[k] = v
    return obj


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def parse_json_object(body, what):
    try:
        text = body.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError("malformed %s body: %s" % (what, e))
    if not isinstance(obj, dict):
        raise ProtocolError("malformed %s body: not a JSON object" % what)
    return obj


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(obj, field, maximum, what, optional=False):
    if field not in obj or (optional and obj[field] is None):
        if optional:
            return None
        raise ProtocolError("malformed %s: missing %r" % (what, field))
    v = obj[field]
    if not _is_int(v) or v < 0 or v > maximum:
        raise ProtocolError("malformed %s: %r must be an integer in 0..=%d, got %r"
                            % (what, field, maximum, v))
    return v


def _check_str(obj, field, what):
    v = obj.get(field)
    if not isinstance(v, str):
        raise ProtocolError("malformed %s: %r must be a string" % (what, field))
    return v


def _check_bool(obj, field, what, default):
    if field not in obj:
        return default
    v = obj[field]
    if not isinstance(v, bool):
        raise ProtocolError("malformed %s: %r must be a boolean" % (what, field))
    return v


def _check_str_list(obj, field, what):
    v = obj.get(field)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ProtocolError("malformed %s: %r must be an array of strings" % (what, field))
    return v


def _check_registration(v, what):
    if not isinstance(v, dict):
        raise ProtocolError("malformed %s: a registration must be an object" % what)
    _check_int(v, "id", U32_MAX, what)
    _check_str(v, "addr", what)
    _check_int(v, "port", U16_MAX, what)
    _check_str_list(v, "vms", what)


# Message schemas (PROTOCOL.md 3): type -> a function that checks its fields


def _fields_gs(obj, what):
    _check_int(obj, "gs", MAX_EPOCH, what)


def _fields_gs_reason(obj, what):
    _check_int(obj, "gs", MAX_EPOCH, what)
    _check_str(obj, "reason", what)


def _fields_gs_attempt(obj, what):
    _check_int(obj, "gs", MAX_EPOCH, what)
    _check_int(obj, "attempt", MAX_EPOCH, what)


def _fields_gs_attempt_reason(obj, what):
    _fields_gs_attempt(obj, what)
    _check_str(obj, "reason", what)


def _fields_none(obj, what):
    pass


def _fields_done(obj, what):
    _check_int(obj, "gs", MAX_EPOCH, what)
    _check_int(obj, "local_time_us", U64_MAX, what)


def _fields_stale(obj, what):
    _check_int(obj, "gs", MAX_EPOCH, what)
    _check_int(obj, "attempt", MAX_EPOCH, what, optional=True)
    _check_int(obj, "newest_gs", MAX_EPOCH, what)
    _check_int(obj, "newest_attempt", MAX_EPOCH, what)


def _fields_insert(obj, what):
    _check_str(obj, "addr", what)
    _check_str_list(obj, "vms", what)


def _fields_inserted(obj, what):
    _check_int(obj, "id", U32_MAX, what)
    _check_int(obj, "port", U16_MAX, what)


def _fields_trigger_resume(obj, what):
    _check_int(obj, "gs", MAX_EPOCH, what, optional=True)


def _fields_query_address(obj, what):
    _check_int(obj, "id", U32_MAX, what)


def _fields_address(obj, what):
    if "registration" not in obj:
        raise ProtocolError("malformed %s: missing 'registration'" % what)
    _check_registration(obj["registration"], what)


def _fields_query_list(obj, what):
    _check_int(obj, "after", U32_MAX, what, optional=True)


def _fields_list(obj, what):
    v = obj.get("participants")
    if not isinstance(v, list):
        raise ProtocolError("malformed %s: 'participants' must be an array" % what)
    for r in v:
        _check_registration(r, what)
    _check_bool(obj, "more", what, False)


def _fields_count(obj, what):
    _check_int(obj, "count", U32_MAX, what)


def _fields_snapshot_report(obj, what):
    _check_int(obj, "gs", MAX_EPOCH, what)
    _check_int(obj, "global_time_us", U64_MAX, what)
    v = obj.get("local_times")
    if not isinstance(v, list):
        raise ProtocolError("malformed %s: 'local_times' must be an array" % what)
    for t in v:
        if not isinstance(t, dict):
            raise ProtocolError("malformed %s: a local time must be an object" % what)
        _check_int(t, "participant", U32_MAX, what)
        _check_int(t, "local_time_us", U64_MAX, what)


def _fields_refused(obj, what):
    _check_str(obj, "reason", what)


MESSAGE_FIELDS = {
    "precheck": _fields_gs,
    "precheck_ok": _fields_gs,
    "precheck_failed": _fields_gs_reason,
    "take_snapshot": _fields_gs,
    "done": _fields_done,
    "snapshot_failed": _fields_gs_reason,
    "release": _fields_gs,
    "abort": _fields_gs_reason,
    "poll": _fields_gs_attempt,
    "poll_ok": _fields_gs_attempt,
    "restore": _fields_gs_attempt,
    "restore_ok": _fields_gs_attempt,
    "start": _fields_gs_attempt,
    "start_ok": _fields_gs_attempt,
    "resume_failed": _fields_gs_attempt_reason,
    "resume_abort": _fields_gs_attempt_reason,
    "stale": _fields_stale,
    "insert": _fields_insert,
    "inserted": _fields_inserted,
    "trigger_global_snapshot": _fields_none,
    "trigger_resume": _fields_trigger_resume,
    "trigger_forwarded": _fields_none,
    "query_address": _fields_query_address,
    "address": _fields_address,
    "query_list": _fields_query_list,
    "list": _fields_list,
    "query_count": _fields_none,
    "count": _fields_count,
    "snapshot_report": _fields_snapshot_report,
    "refused": _fields_refused,
}

# Who may send what to a participant / an MS client (PROTOCOL.md 2.4).
FROM_COORDINATOR_TO_PARTICIPANT = frozenset(
    ["precheck", "take_snapshot", "release", "abort", "poll", "restore", "start",
     "resume_abort"])
FROM_MS_TO_REQUESTER = frozenset(
    ["inserted", "trigger_forwarded", "address", "list", "count", "refused"])


def validate_message(msg):
    if not isinstance(msg, dict):
        raise ProtocolError("malformed envelope: 'message' must be an object")
    t = msg.get("type")
    if not isinstance(t, str):
        raise ProtocolError("malformed message: 'type' must be a string")
    check = MESSAGE_FIELDS.get(t)
    if check is None:
        raise ProtocolError("malformed message: unknown type %r" % t)
    check(msg, t)
    return t


def make_envelope(cluster, from_id, to_id, message):
    return {"cluster": cluster, "from": from_id, "to": to_id, "message": message}


def check_envelope(env, cluster, expect_from, expect_to, allowed):
    """Checks a received envelope (PROTOCOL.md 2.4, 2.7); returns its message."""
    what = "envelope"
    _check_int(env, "cluster", U64_MAX, what)
    _check_int(env, "from", U32_MAX, what)
    _check_int(env, "to", U32_MAX, what)
    if "message" not in env:
        raise ProtocolError("malformed envelope: missing 'message'")
    t = validate_message(env["message"])
    if env["cluster"] != cluster:
        raise ProtocolError("foreign cluster %d (this node is of cluster %d)"
                            % (env["cluster"], cluster), "ForeignCluster")
    if env["from"] != expect_from:
        raise ProtocolError("envelope from %d on the connection of %d (sender binding)"
                            % (env["from"], expect_from), "Unauthorised")
    if env["to"] != expect_to:
        raise ProtocolError("envelope to %d received by %d" % (env["to"], expect_to),
                            "Unauthorised")
    if t not in allowed:
        raise ProtocolError("%d may not send %s to %d" % (expect_from, t, expect_to),
                            "Unauthorised")
    return env["message"]


# ---------------------------------------------------------------------------------------
# Frames (PROTOCOL.md 2.1)

def encode_frame(kind, seq, body, mac=b""):
    length = MIN_LENGTH + len(body) + len(mac)
    return (length.to_bytes(4, "big") + bytes([kind]) + seq.to_bytes(8, "big")
            + body + mac)


def decode_frame(data):
    """Splits one whole frame (for tests and tools): (kind, seq, content after seq)."""
    if len(data) < HEADER_LEN:
        raise ProtocolError("short frame")
    length = int.from_bytes(data[:4], "big")
    if length < MIN_LENGTH or len(data) != 4 + length:
        raise ProtocolError("frame length %d does not match %d bytes" % (length, len(data)))
    return data[4], int.from_bytes(data[5:13], "big"), bytes(data[13:])


class FrameDecoder:
    """Splits a byte stream into frames, refusing a bad length from the 4-byte prefix
    and an unknown kind from the 5th byte, before the rest is buffered."""

    def __init__(self, limit):
        self.limit = limit
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data

    def _check_head(self):
        if len(self.buf) >= 4:
            length = int.from_bytes(self.buf[:4], "big")
            if length < MIN_LENGTH:
                raise ProtocolError("frame length %d below %d" % (length, MIN_LENGTH))
            if length > self.limit:
                raise ProtocolError("frame length %d above the limit of %d"
                                    % (length, self.limit))
        if len(self.buf) >= 5 and self.buf[4] not in KIND_NAMES:
            raise ProtocolError("unknown frame kind %d" % self.buf[4])

    def next(self):
        """The next whole frame as (kind, seq, content), or None; raises ProtocolError."""
        self._check_head()
        if len(self.buf) < HEADER_LEN:
            return None
        length = int.from_bytes(self.buf[:4], "big")
        if len(self.buf) < 4 + length:
            return None
        kind = self.buf[4]
        seq = int.from_bytes(self.buf[5:13], "big")
        content = bytes(self.buf[13:4 + length])
        del self.buf[:4 + length]
        return kind, seq, content


def _truncate_utf8(text, limit):
    data = text.encode("utf-8")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


class ClientChannel:
    """The client side of one connection, without I/O (PROTOCOL.md 2.1-2.4, 2.7).

    ``hello_frame()`` starts it; ``feed(bytes)`` returns a list of events:
    ``("welcome", auth_frame)``, ``("data", message)``, ``("ping", None)``,
    ``("reject", reason)``; a defect raises ProtocolError (answer with
    ``reject_frame`` and close)."""

    def __init__(self, cluster, my_id, server_id, key=None, nonce=None,
                 versions=SUPPORTED_VERSIONS):
        self.cluster = cluster
        self.my_id = my_id
        self.server_id = server_id
        self.key = key
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
        if len(self.nonce) != NONCE_LEN:
            raise ValueError("a nonce is 32 bytes")
        self.versions = list(versions)
        self.version = None
        self.server_nonce = None
        self.ks = None
        self.send_seq = 0
        self.recv_seq = 0
        self.state = "new"  # new -> hello_sent -> established -> closed
        self.decoder = FrameDecoder(LIMIT_HANDSHAKE)
        if server_id == MS_ID:
            self.allowed = FROM_MS_TO_REQUESTER
        elif server_id == COORDINATOR_ID:
            self.allowed = FROM_COORDINATOR_TO_PARTICIPANT
        else:
            raise ValueError("a participant dials only the coordinator or the MS")

    # -- sending

    def _next_seq(self):
        seq = self.send_seq
        self.send_seq += 1
        return seq

    def hello_body(self):
        return json_bytes({"protocol": PROTOCOL_NAME, "versions": self.versions,
                           "cluster": self.cluster, "id": self.my_id,
                           "nonce": self.nonce.hex()})

    def hello_frame(self):
        if self.state != "new":
            raise RuntimeError("HELLO is the first frame")
        self.state = "hello_sent"
        return encode_frame(KIND_HELLO, self._next_seq(), self.hello_body())

    def _authed_frame(self, kind, body):
        seq = self._next_seq()
        mac = b""
        if self.ks is not None:
            mac = frame_mac(self.ks, DIR_CLIENT, seq, kind, body)
        return encode_frame(kind, seq, body, mac)

    def data_frame(self, message):
        if self.state != "established":
            raise RuntimeError("DATA before the handshake")
        env = make_envelope(self.cluster, self.my_id, self.server_id, message)
        body = json_bytes(env)
        if MIN_LENGTH + len(body) + (MAC_LEN if self.ks else 0) > LIMIT_CLIENT_TO_SERVER:
            raise ValueError("envelope too large for a frame")
        return self._authed_frame(KIND_DATA, body)

    def ping_frame(self):
        return self._authed_frame(KIND_PING, b"")

    def reject_frame(self, reason):
        self.state = "closed"
        return encode_frame(KIND_REJECT, self._next_seq(),
                            _truncate_utf8(reason, REJECT_REASON_MAX))

    # -- receiving

    def feed(self, data):
        events = []
        if self.state == "closed":
            return events
        self.decoder.feed(data)
        try:
            while self.state != "closed":
                frame = self.decoder.next()
                if frame is None:
                    break
                events.append(self._on_frame(*frame))
        except ProtocolError as e:
            self.state = "closed"
            e.events = events  # the frames before the defect were valid
            raise
        return events

    def _on_frame(self, kind, seq, content):
        if kind == KIND_REJECT:
            # Never authenticated: log and close, act on nothing else.
            self.state = "closed"
            reason = content.decode("utf-8", "replace")[:REJECT_REASON_MAX]
            if seq != self.recv_seq:
                reason += " (REJECT with seq %d, %d was due)" % (seq, self.recv_seq)
            return ("reject", reason)
        if seq != self.recv_seq:
            raise ProtocolError("sequence number %d, %d was due" % (seq, self.recv_seq))
        self.recv_seq += 1
        if self.state == "hello_sent":
            if kind != KIND_WELCOME:
                raise ProtocolError("%s before WELCOME" % KIND_NAMES[kind])
            return ("welcome", self._on_welcome(content))
        if kind == KIND_DATA or kind == KIND_PING:
            body = content
            if self.ks is not None:
                if len(content) < MAC_LEN:
                    raise ProtocolError("%s frame too short for its MAC" % KIND_NAMES[kind],
                                        "Authentication")
                body, mac = content[:-MAC_LEN], content[-MAC_LEN:]
                want = frame_mac(self.ks, DIR_SERVER, seq, kind, body)
                if not hmac.compare_digest(mac, want):
                    raise ProtocolError("bad MAC on %s seq %d" % (KIND_NAMES[kind], seq),
                                        "Authentication")
            if kind == KIND_PING:
                if body:
                    raise ProtocolError("PING with a body")
                return ("ping", None)
            env = parse_json_object(body, "DATA")
            msg = check_envelope(env, self.cluster, self.server_id, self.my_id, self.allowed)
            return ("data", msg)
        raise ProtocolError("unexpected %s frame from the server" % KIND_NAMES[kind])

    def _on_welcome(self, body):
        w = parse_json_object(body, "WELCOME")
        version = w.get("version")
        if not _is_int(version) or version not in self.versions:
            raise ProtocolError("WELCOME chose version %r, offered %r" % (version, self.versions))
        sid = w.get("id")
        if not _is_int(sid) or sid != self.server_id:
            raise ProtocolError("WELCOME from id %r, dialled %d" % (sid, self.server_id),
                                "Unauthorised")
        nonce = w.get("nonce")
        if not isinstance(nonce, str) or len(nonce) != 2 * NONCE_LEN:
            raise ProtocolError("WELCOME nonce is not 32 bytes of hex")
        try:
            server_nonce = bytes.fromhex(nonce)
        except ValueError:
            raise ProtocolError("WELCOME nonce is not hexadecimal")
        their_proof = w.get("proof")
        self.version = version
        self.server_nonce = server_nonce
        if self.key is None:
            if their_proof is not None:
                raise ProtocolError("keyed server, unkeyed client: refusing a proof",
                                    "Authentication")
            auth = {"proof": None}
        else:
            if not isinstance(their_proof, str):
                raise ProtocolError("unkeyed server, keyed client: WELCOME has no proof",
                                    "Authentication")
            self.ks = session_key(self.key, version, self.cluster, self.my_id,
                                  self.server_id, self.nonce, server_nonce)
            want = proof(self.ks, "server")
            if not hmac.compare_digest(their_proof.lower().encode("ascii", "replace"),
                                       want.encode("ascii")):
                raise ProtocolError("bad WELCOME proof (another cluster key?)",
                                    "Authentication")
            auth = {"proof": proof(self.ks, "client")}
        frame = encode_frame(KIND_AUTH, self._next_seq(), json_bytes(auth))
        self.state = "established"
        self.decoder.limit = LIMIT_SERVER_TO_CLIENT
        return frame


# ---------------------------------------------------------------------------------------
# The participant state machine (PROTOCOL.md 5, 6.2, 6.3, 7, 8), without I/O

def ok(outcome):
    return outcome.get("outcome") != "failed"


class _Snap:
    """What the participant knows of one global snapshot (one gs)."""

    def __init__(self, gs, phase):
        self.gs = gs
        self.phase = phase  # checking prechecked precheck_failed steps holding released
        #                     failed aborted unseen cleared release_missed
        self.aborted = False
        self.decided = False  # RELEASE or ABORT of this gs arrived
        self.precheck_answer = None
        self.snapshot_answer = None
        self.deadline = None
        self.local_time_us = None
        self.point_only = False


class _Resume:
    """What the participant knows of one resume attempt."""

    def __init__(self, gs, attempt, phase):
        self.gs = gs
        self.attempt = attempt
        self.phase = phase  # polled restoring restored restore_failed starting started
        #                     start_failed aborted
        self.aborted = False
        self.restore_answer = None
        self.start_answer = None


class ParticipantMachine:
    """Participant of PROTOCOL.md 6.2/6.3/7. The driver calls ``start()``, then
    ``on_message(msg)`` for every checked message from the coordinator,
    ``on_outcome(action_id, outcome)`` for every completed host action and ``tick()``
    whenever ``next_deadline()`` passes. ``host.issue(action, params)`` returns an
    action id; ``send(message)`` sends to the coordinator; ``emit(event)`` reports."""

    def __init__(self, my_id, vms, host, send, emit, clock=time.monotonic,
                 precheck_timeout=PRECHECK_TIMEOUT_S, snapshot_timeout=SNAPSHOT_TIMEOUT_S,
                 resume_timeout=RESUME_PHASE_TIMEOUT_S):
        self.my_id = my_id
        self.vms = list(vms)
        self.host = host
        self.send = send
        self.emit = emit
        self.clock = clock
        self.precheck_timeout = precheck_timeout
        self.snapshot_timeout = snapshot_timeout
        self.resume_timeout = resume_timeout
        self.newest_gs = 0
        self.newest_attempt = 0
        self.snap = None
        self.res = None
        self.current = None           # [aid, action, callback, work, deadline]
        self.queue = collections.deque()
        self.abandoned = set()
        self.clearing_all = False

    # -- host actions: one outstanding at a time (PROTOCOL.md 5)

    def _issue(self, action, params, callback, work, deadline=None):
        self.queue.append((action, params, callback, work, deadline))
        self._pump()

    def _after_host(self, fn):
        """Runs fn once the actions queued so far have completed."""
        self.queue.append((None, None, fn, False, None))
        self._pump()

    def _pump(self):
        while self.current is None and self.queue:
            action, params, callback, work, deadline = self.queue.popleft()
            if action is None:
                callback()
                continue
            aid = self.host.issue(action, params)
            self.current = [aid, action, callback, work, deadline]

    def _busy(self):
        if self.clearing_all:
            return True
        if self.current is not None and self.current[3]:
            return True
        return any(q[3] for q in self.queue)

    def on_outcome(self, aid, outcome):
        if self.current is None or self.current[0] != aid:
            if aid in self.abandoned:
                self.abandoned.discard(aid)
                log.info("completion of abandoned action #%d ignored", aid)
            else:
                log.error("completion of action #%d that was never issued (UnknownAction)", aid)
            return
        callback = self.current[2]
        self.current = None
        callback(outcome)
        self._pump()

    def next_deadline(self):
        times = []
        if self.current is not None and self.current[4] is not None:
            times.append(self.current[4])
        if self.snap is not None and self.snap.phase == "holding":
            times.append(self.snap.deadline)
        return min(times) if times else None

    def tick(self):
        now = self.clock()
        if self.current is not None and self.current[4] is not None and now >= self.current[4]:
            aid, action, callback, _, _ = self.current
            log.warning("host action #%d %s passed its deadline: abandoned", aid, action)
            self.abandoned.add(aid)
            self.host.abandon(aid)
            self.current = None
            callback({"outcome": "failed", "reason": "%s passed its deadline" % action})
            self._pump()
        s = self.snap
        if s is not None and s.phase == "holding" and now >= s.deadline:
            s.phase = "release_missed"
            log.warning("gs-%d: neither RELEASE nor ABORT before the deadline (ReleaseMissed)",
                        s.gs)
            self.emit({"event": "release_missed", "gs": s.gs})
            self._clear_all()

    def start(self):
        """The idle drop rule, before anything else."""
        self._drop_incoming()

    def _drop_incoming(self):
        self._issue("drop_incoming", {"colour": "post"}, lambda o: self._log_failure(o),
                    work=False)

    def _log_failure(self, outcome):
        if not ok(outcome):
            log.error("idle drop rule failed (IdleDropFailed): %s", outcome.get("reason"))

    def _clear_all(self, tries=3):
        self.clearing_all = True

        def done(outcome):
            if not ok(outcome) and tries > 1:
                self._clear_all(tries - 1)
                return
            if not ok(outcome):
                log.error("ClearAll failed 3 times (CleanupFailed): %s", outcome.get("reason"))
            self.clearing_all = False
            self._drop_incoming()

        self._issue("clear_all", {}, done, work=True)

    def _step6(self, s, phase):
        """ClearColour, then the idle drop rule; a failure or hang is followed by ClearAll."""
        s.phase = phase

        def done(outcome):
            if ok(outcome):
                self._drop_incoming()
            else:
                log.error("gs-%d: ClearColour failed: %s; ClearAll", s.gs, outcome.get("reason"))
                self._clear_all()

        self._issue("clear_colour", {}, done, work=False,
                    deadline=self.clock() + self.snapshot_timeout)

    def _leave_holding(self):
        """Holding and the coordinator has moved on: step 6 first (PROTOCOL.md 6.2)."""
        s = self.snap
        if s is not None and s.phase == "holding":
            log.info("gs-%d: leaving the POST colour before newer work", s.gs)
            self._step6(s, "cleared")
            return True
        return False

    def _busy_reason(self):
        return "participant %d is busy" % self.my_id

    # -- messages

    def on_message(self, msg):
        t = msg["type"]
        handler = getattr(self, "_on_" + t, None)
        if handler is None:  # cannot happen: check_envelope filters by role
            raise ProtocolError("unexpected %s" % t, "UnexpectedMessage")
        handler(msg)

    def _stale(self, gs, attempt=None):
        m = {"type": "stale", "gs": gs}
        if attempt is not None:
            m["attempt"] = attempt
        m["newest_gs"] = self.newest_gs
        m["newest_attempt"] = self.newest_attempt
        log.info("stale request gs-%d%s (newest gs-%d, attempt %d)", gs,
                 "" if attempt is None else " attempt %d" % attempt,
                 self.newest_gs, self.newest_attempt)
        self.send(m)
        ev = {"event": "stale", "gs": gs}
        if attempt is not None:
            ev["attempt"] = attempt
        self.emit(ev)

    def _decided(self, gs):
        """A request of a gs whose RELEASE or ABORT already arrived cannot be a live
        duplicate (the coordinator decided that gs): it comes from a coordinator that
        reuses the epoch (a lost catalog), so it is answered STALE, not DONE again."""
        s = self.snap
        return s is not None and s.gs == gs and s.decided

    def _new_snap(self, gs, phase):
        self.newest_gs = gs
        old = self.snap
        self.snap = _Snap(gs, phase)
        return old, self.snap

    # PRECHECK
    def _on_precheck(self, msg):
        gs = msg["gs"]
        s = self.snap
        if gs < self.newest_gs or self._decided(gs):
            return self._stale(gs)
        if s is not None and s.gs == gs:
            if s.precheck_answer is not None:
                self.send(s.precheck_answer)
            elif s.phase == "checking":
                pass  # answer pending
            elif s.phase in ("steps", "holding", "released"):
                # TAKE_SNAPSHOT came without a precheck: the VMs are in use, all is well.
                self.send({"type": "precheck_ok", "gs": gs})
            else:
                self.send({"type": "precheck_failed", "gs": gs,
                           "reason": "gs-%d is over at participant %d (%s)"
                                     % (gs, self.my_id, s.phase)})
            return
        old, s = self._new_snap(gs, "checking")
        if self._busy():
            return self._precheck_answer(s, False, self._busy_reason())
        self._step6_if_holding(old)
        s.deadline = self.clock() + self.precheck_timeout

        def done(outcome):
            if s is not self.snap or s.aborted:
                log.info("gs-%d: VM check finished after the coordinator moved on", s.gs)
                return
            if ok(outcome) and outcome.get("running"):
                self._precheck_answer(s, True)
            elif ok(outcome):
                self._precheck_answer(s, False, "VMs of participant %d are not running"
                                      % self.my_id)
            else:
                self._precheck_answer(s, False, "VM check failed at participant %d: %s"
                                      % (self.my_id, outcome.get("reason")))

        self._issue("check_vms_running", {"vms": self.vms}, done, work=True,
                    deadline=s.deadline)

    def _precheck_answer(self, s, success, reason=None):
        if success:
            s.phase = "prechecked"
            s.precheck_answer = {"type": "precheck_ok", "gs": s.gs}
            self.send(s.precheck_answer)
            self.emit({"event": "precheck", "gs": s.gs})
        else:
            s.phase = "precheck_failed"
            s.precheck_answer = {"type": "precheck_failed", "gs": s.gs, "reason": reason}
            log.warning("gs-%d: PRECHECK_FAILED: %s", s.gs, reason)
            self.send(s.precheck_answer)
            self.emit({"event": "precheck_failed", "gs": s.gs, "reason": reason})

    # TAKE_SNAPSHOT
    def _on_take_snapshot(self, msg):
        gs = msg["gs"]
        s = self.snap
        if gs < self.newest_gs or self._decided(gs):
            return self._stale(gs)
        if s is not None and s.gs == gs:
            if s.snapshot_answer is not None:
                self.send(s.snapshot_answer)  # a duplicate: DONE again, steps not re-run
            elif s.phase == "steps":
                pass  # answer pending
            elif s.phase == "prechecked":
                if self._busy():
                    self._snapshot_failed(s, self._busy_reason())
                else:
                    self._run_steps(s)
            else:
                self._snapshot_failed(s, "gs-%d was not prechecked at participant %d (%s)"
                                      % (gs, self.my_id, s.phase), keep_phase=True)
            return
        old, s = self._new_snap(gs, "new")
        if self._busy():
            return self._snapshot_failed(s, self._busy_reason())
        self._step6_if_holding(old)
        self._run_steps(s)

    def _step6_if_holding(self, old):
        if old is not None and old.phase == "holding":
            log.info("gs-%d: newer work arrived while holding POST: step 6 first", old.gs)
            self._step6(old, "cleared")

    def _snapshot_failed(self, s, reason, keep_phase=False):
        if not keep_phase:
            s.phase = "failed"
            s.snapshot_answer = {"type": "snapshot_failed", "gs": s.gs, "reason": reason}
        log.warning("gs-%d: SNAPSHOT_FAILED: %s", s.gs, reason)
        self.send({"type": "snapshot_failed", "gs": s.gs, "reason": reason})
        self.emit({"event": "snapshot_failed", "gs": s.gs})

    STEPS = (("set_outgoing_colour", {"colour": "pre"}),
             ("drop_incoming", {"colour": "post"}),
             ("take_local_snapshots", None),
             ("set_outgoing_colour", {"colour": "post"}),
             ("accept_incoming", {"colour": "post"}))

    def _run_steps(self, s):
        s.phase = "steps"
        s.deadline = self.clock() + self.snapshot_timeout
        self._step(s, 0)

    def _step(self, s, i):
        action, params = self.STEPS[i]
        if params is None:
            params = {"gs": s.gs, "vms": self.vms}
        self._issue(action, params, lambda o: self._step_done(s, i, o), work=True,
                    deadline=s.deadline)

    def _step_done(self, s, i, outcome):
        if s is not self.snap or s.aborted:
            log.info("gs-%d: step %d finished after an ABORT or a newer gs: ClearAll",
                     s.gs, i + 1)
            if s.phase == "steps":
                s.phase = "aborted"
            self._clear_all()
            return
        if not ok(outcome):
            reason = "step %d of gs-%d failed at participant %d: %s" % (
                i + 1, s.gs, self.my_id, outcome.get("reason"))
            self._clear_all()
            self._snapshot_failed(s, reason)
            return
        if i == 2:
            s.local_time_us = int(outcome.get("local_time_us", 0))
            s.point_only = outcome.get("outcome") == "snapshot_point"
        if i == 4:
            if s.point_only:
                self._issue("await_durable", {"gs": s.gs, "vms": self.vms},
                            lambda o: self._durable_done(s, o), work=True,
                            deadline=s.deadline)
            else:
                self._send_done(s)
            return
        self._step(s, i + 1)

    def _durable_done(self, s, outcome):
        if s is not self.snap or s.aborted:
            if s.phase == "steps":
                s.phase = "aborted"
            self._clear_all()
            return
        if not ok(outcome):
            self._clear_all()
            self._snapshot_failed(s, "local snapshot of gs-%d not durable at participant %d: %s"
                                  % (s.gs, self.my_id, outcome.get("reason")))
            return
        self._send_done(s)

    def _send_done(self, s):
        s.phase = "holding"
        s.snapshot_answer = {"type": "done", "gs": s.gs, "local_time_us": s.local_time_us}
        self.send(s.snapshot_answer)
        self.emit({"event": "done", "gs": s.gs, "local_time_us": s.local_time_us})

    # RELEASE
    def _on_release(self, msg):
        gs = msg["gs"]
        s = self.snap
        if gs < self.newest_gs:
            log.info("RELEASE of old gs-%d ignored", gs)
            return
        if s is not None and s.gs == gs:
            s.decided = True
            if s.phase == "holding":
                self._step6(s, "released")
                self.emit({"event": "released", "gs": gs})
            else:
                log.info("RELEASE of gs-%d in phase %s: nothing to do", gs, s.phase)
            return
        old, s = self._new_snap(gs, "unseen")
        s.decided = True
        log.info("RELEASE of unseen gs-%d: epoch advanced", gs)
        self._step6_if_holding(old)

    # ABORT
    def _on_abort(self, msg):
        gs = msg["gs"]
        reason = msg["reason"]
        s = self.snap
        if gs < self.newest_gs:
            log.info("ABORT of old gs-%d ignored", gs)
            return
        if s is not None and s.gs == gs:
            if s.decided:
                log.info("ABORT of gs-%d, already decided here (%s): ignored", gs, s.phase)
                return
            s.aborted = True
            s.decided = True
            log.info("gs-%d aborted by the coordinator: %s", gs, reason)
            if s.phase == "holding":
                self._clear_all()
            if s.phase != "steps":  # steps: ClearAll once the outstanding step completes
                s.phase = "aborted"
            self.emit({"event": "aborted", "gs": gs, "reason": reason})
            return
        old, s = self._new_snap(gs, "aborted")
        s.aborted = True
        s.decided = True
        log.info("ABORT of unseen gs-%d: %s", gs, reason)
        if old is not None and old.phase == "holding":
            old.phase = "cleared"
            self._clear_all()
        self.emit({"event": "aborted", "gs": gs, "reason": reason})

    # POLL
    def _on_poll(self, msg):
        gs, attempt = msg["gs"], msg["attempt"]
        r = self.res
        if attempt < self.newest_attempt:
            return self._stale(gs, attempt)
        if r is not None and r.attempt == attempt:
            if self._reused(r, gs):
                return self._stale(gs, attempt)
            self.send({"type": "poll_ok", "gs": gs, "attempt": attempt})
            return
        self.newest_attempt = attempt
        self.res = _Resume(gs, attempt, "polled")
        answer = {"type": "poll_ok", "gs": gs, "attempt": attempt}
        if self._leave_holding():
            self._after_host(lambda: self.send(answer))
        else:
            self.send(answer)

    def _reused(self, r, gs):
        """POLL or RESTORE of an attempt that is over here (aborted or started) or that
        names another gs: not a duplicate but a coordinator reusing the attempt number
        (a lost catalog), answered STALE so that it continues after ours."""
        return r.gs != gs or r.aborted or r.phase == "started"

    def _resume_failed_reply(self, gs, attempt, reason):
        log.warning("RESUME_FAILED gs-%d attempt %d: %s", gs, attempt, reason)
        m = {"type": "resume_failed", "gs": gs, "attempt": attempt, "reason": reason}
        self.send(m)
        return m

    # RESTORE
    def _on_restore(self, msg):
        gs, attempt = msg["gs"], msg["attempt"]
        r = self.res
        if attempt < self.newest_attempt:
            return self._stale(gs, attempt)
        if r is not None and r.attempt == attempt:
            if self._reused(r, gs):
                return self._stale(gs, attempt)
            if r.restore_answer is not None:
                self.send(r.restore_answer)
                return
            if r.phase == "restoring":
                return
        else:
            self.newest_attempt = attempt
            r = self.res = _Resume(gs, attempt, "polled")
        if self._busy():
            r.phase = "restore_failed"
            r.restore_answer = self._resume_failed_reply(gs, attempt, self._busy_reason())
            self.emit({"event": "restore_failed", "gs": gs, "attempt": attempt})
            return
        self._leave_holding()
        r.phase = "restoring"

        def done(outcome):
            if r is not self.res or r.aborted:
                log.info("restore of gs-%d attempt %d finished after the attempt ended: ignored",
                         gs, attempt)
                return
            if ok(outcome):
                r.phase = "restored"
                r.restore_answer = {"type": "restore_ok", "gs": gs, "attempt": attempt}
                self.send(r.restore_answer)
                self.emit({"event": "restored", "gs": gs, "attempt": attempt})
            else:
                r.phase = "restore_failed"
                r.restore_answer = self._resume_failed_reply(
                    gs, attempt, "restore of gs-%d failed at participant %d: %s"
                    % (gs, self.my_id, outcome.get("reason")))
                self.emit({"event": "restore_failed", "gs": gs, "attempt": attempt})

        self._issue("restore_local", {"gs": gs, "vms": self.vms}, done, work=True,
                    deadline=self.clock() + self.resume_timeout)

    # START
    def _on_start(self, msg):
        gs, attempt = msg["gs"], msg["attempt"]
        r = self.res
        if attempt < self.newest_attempt:
            return self._stale(gs, attempt)
        if r is None or r.attempt != attempt:
            self.newest_attempt = attempt
            self.res = _Resume(gs, attempt, "start_failed")
            return self._start_failed(gs, attempt, "START of attempt %d without its restore"
                                      % attempt)
        if r.gs != gs:
            return self._stale(gs, attempt)
        if r.aborted:
            return self._start_failed(gs, attempt, "attempt %d was aborted" % attempt)
        if r.start_answer is not None:
            self.send(r.start_answer)
            return
        if r.phase == "starting":
            return
        if r.phase != "restored":
            return self._start_failed(gs, attempt, "START of attempt %d before a successful "
                                      "restore (%s)" % (attempt, r.phase))
        if self._busy():
            return self._start_failed(gs, attempt, self._busy_reason())
        r.phase = "starting"

        def done(outcome):
            if r is not self.res or r.aborted:
                log.info("start of gs-%d attempt %d finished after the attempt ended: ignored",
                         gs, attempt)
                return
            if ok(outcome):
                r.phase = "started"
                r.start_answer = {"type": "start_ok", "gs": gs, "attempt": attempt}
                self.send(r.start_answer)
                self.emit({"event": "started", "gs": gs, "attempt": attempt})
            else:
                r.phase = "start_failed"
                r.start_answer = self._start_failed(
                    gs, attempt, "start of the VMs failed at participant %d: %s"
                    % (self.my_id, outcome.get("reason")))

        self._issue("start_vms", {"vms": self.vms}, done, work=True,
                    deadline=self.clock() + self.resume_timeout)

    def _start_failed(self, gs, attempt, reason):
        m = self._resume_failed_reply(gs, attempt, reason)
        self.emit({"event": "start_failed", "gs": gs, "attempt": attempt, "reason": reason})
        return m

    # RESUME_ABORT
    def _on_resume_abort(self, msg):
        gs, attempt, reason = msg["gs"], msg["attempt"], msg["reason"]
        r = self.res
        if attempt < self.newest_attempt:
            log.info("RESUME_ABORT of old attempt %d ignored", attempt)
            return
        if r is not None and r.attempt == attempt:
            if r.aborted:
                return
        else:
            self.newest_attempt = attempt
            r = self.res = _Resume(gs, attempt, "aborted")
        r.aborted = True
        log.warning("resume of gs-%d attempt %d aborted: %s (ResumeAborted)", gs, attempt, reason)
        self.emit({"event": "resume_aborted", "gs": gs, "attempt": attempt, "reason": reason})


# ---------------------------------------------------------------------------------------
# The simulated host

class SimHost:
    """Host actions that only log (PROTOCOL.md 5); the local snapshot sleeps."""

    def __init__(self, clock, snapshot_ms=0, fail_snapshot_gs=None, fail_restore=False):
        self.clock = clock
        self.snapshot_s = max(0, snapshot_ms) / 1000.0
        self.fail_snapshot_gs = fail_snapshot_gs
        self.fail_restore = fail_restore
        self.next_id = 1
        self.pending = {}   # aid -> (due, action, params, issued)

    def issue(self, action, params):
        aid = self.next_id
        self.next_id += 1
        now = self.clock()
        duration = self.snapshot_s if action == "take_local_snapshots" else 0.0
        self.pending[aid] = (now + duration, action, params, now)
        log.info("host action #%d: %s %s", aid, action, json.dumps(params, sort_keys=True))
        return aid

    def abandon(self, aid):
        self.pending.pop(aid, None)

    def next_due(self):
        return min((p[0] for p in self.pending.values()), default=None)

    def due(self, now):
        ready = sorted(aid for aid, p in self.pending.items() if p[0] <= now)
        out = []
        for aid in ready:
            _, action, params, issued = self.pending.pop(aid)
            outcome = self._outcome(action, params, now - issued)
            log.info("host action #%d %s: %s", aid, action, json.dumps(outcome, sort_keys=True))
            out.append((aid, outcome))
        return out

    def _outcome(self, action, params, elapsed):
        if action == "check_vms_running":
            return {"outcome": "vms_running", "running": True}
        if action == "take_local_snapshots":
            if self.fail_snapshot_gs is not None and params["gs"] == self.fail_snapshot_gs:
                return {"outcome": "failed", "reason": "simulated failure of the local "
                                                       "snapshot of gs-%d" % params["gs"]}
            return {"outcome": "snapshot_taken", "local_time_us": int(round(elapsed * 1e6))}
        if action == "restore_local" and self.fail_restore:
            return {"outcome": "failed", "reason": "simulated restore failure"}
        return {"outcome": "done"}


# ---------------------------------------------------------------------------------------
# I/O

class Terminate(BaseException):
    """Raised by the SIGTERM/SIGINT handler. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way (the logging module's own error handling
    included) can swallow it when the signal lands inside a call."""


def emit_event(event):
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def parse_hostport(text):
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("%r is not HOST:PORT" % text)
    port = int(port)
    if not 0 < port <= U16_MAX:
        raise ValueError("port %d out of range" % port)
    return host, port


class _Conn:
    def __init__(self, sock, channel, started):
        self.sock = sock
        self.channel = channel
        self.state = "connecting"   # connecting -> handshaking -> established
        self.started = started
        self.out = collections.deque()
        self.out_partial = b""
        self.last_sent = started
        self.last_recv = started
        self.announced = False
        self.verified = False       # a frame after the handshake arrived


class Runtime:
    def __init__(self, args, key):
        self.args = args
        self.key = key
        self.clock = time.monotonic
        self.exit_at = self.clock() + args.deadline_s
        self.ms_addr = parse_hostport(args.ms)
        self.my_id = None
        self.coordinator = None
        self.conn = None
        self.next_dial = 0.0
        self.backoff = BACKOFF_MIN_S
        self.host = SimHost(self.clock, args.snapshot_ms, args.fail_snapshot, args.fail_restore)
        self.machine = None

    # -- MS requests: one connection per request (PROTOCOL.md 1)

    def ms_request(self, my_id, message, timeout=10.0):
        deadline = min(self.clock() + timeout, self.exit_at)
        channel = ClientChannel(self.args.cluster, my_id, MS_ID, self.key)
        sock = socket.create_connection(self.ms_addr, timeout=max(0.1, deadline - self.clock()))
        try:
            sock.sendall(channel.hello_frame())
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise TimeoutError("no reply from the MS")
                sock.settimeout(remaining)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("the MS closed the connection")
                try:
                    events = channel.feed(data)
                except ProtocolError as e:
                    emit_event({"event": "error", "reason": "MS: " + e.reason})
                    try:
                        sock.sendall(channel.reject_frame(e.reason))
                    except OSError:
                        pass
                    raise
                for kind, value in events:
                    if kind == "welcome":
                        sock.sendall(value)
                        sock.sendall(channel.data_frame(message))
                    elif kind == "reject":
                        emit_event({"event": "rejected", "reason": value})
                        raise PeerRejected(value)
                    elif kind == "data":
                        return value
        finally:
            sock.close()

    def _retry(self, what, fn):
        backoff = BACKOFF_MIN_S
        while True:
            if self.clock() >= self.exit_at:
                self.deadline_exit()
            try:
                result = fn()
                if result is not None:
                    return result
            except (OSError, ProtocolError, PeerRejected) as e:
                log.info("%s: %s; retrying in %.2f s", what, e, backoff)
            time.sleep(min(backoff, max(0.0, self.exit_at - self.clock())))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def register(self):
        insert = {"type": "insert", "addr": self.args.addr, "vms": [self.args.vm]}

        def attempt():
            reply = self.ms_request(UNREGISTERED_ID, insert)
            if reply["type"] == "refused":
                emit_event({"event": "error", "reason": "INSERT refused: " + reply["reason"]})
                log.error("INSERT refused: %s", reply["reason"])
                sys.exit(1)
            if reply["type"] != "inserted":
                raise ProtocolError("INSERT answered by %s" % reply["type"])
            return reply

        reply = self._retry("INSERT", attempt)
        self.my_id = reply["id"]
        emit_event({"event": "registered", "id": reply["id"], "port": reply["port"]})
        log.info("registered as participant %d (port %d)", reply["id"], reply["port"])
        if self.my_id == COORDINATOR_ID:
            emit_event({"event": "error", "reason": "registered as id 0: the coordinator "
                                                    "must register first"})
            sys.exit(1)

    def find_coordinator(self):
        def attempt():
            reply = self.ms_request(self.my_id, {"type": "query_address", "id": COORDINATOR_ID})
            if reply["type"] == "refused":
                log.info("QUERY_ADDRESS{0} refused: %s", reply["reason"])
                return None
            if reply["type"] != "address":
                raise ProtocolError("QUERY_ADDRESS answered by %s" % reply["type"])
            return reply["registration"]

        reg = self._retry("QUERY_ADDRESS", attempt)
        self.coordinator = (reg["addr"], reg["port"])
        log.info("coordinator at %s:%d", reg["addr"], reg["port"])

    # -- the coordinator connection

    def send_message(self, message):
        c = self.conn
        if c is None or c.state != "established":
            log.warning("no connection to the coordinator: %s lost", message["type"])
            return
        if len(c.out) >= SEND_QUEUE_MAX:
            log.warning("send queue full: %s dropped", message["type"])
            return
        log.info("-> %s", json.dumps(message))
        c.out.append(c.channel.data_frame(message))

    def dial(self, now):
        host, port = self.coordinator
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(info[0], info[1], info[2])
        except OSError as e:
            log.info("cannot dial the coordinator: %s", e)
            self.schedule_redial(now)
            return
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        err = sock.connect_ex(info[4])
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            sock.close()
            log.info("dialling the coordinator failed: %s", os.strerror(err))
            self.schedule_redial(now)
            return
        channel = ClientChannel(self.args.cluster, self.my_id, COORDINATOR_ID, self.key)
        self.conn = _Conn(sock, channel, now)

    def schedule_redial(self, now):
        self.next_dial = now + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)

    def disconnect(self, reason, reject=None):
        c = self.conn
        if c is None:
            return
        self.conn = None
        if reject is not None and c.state != "connecting":
            try:
                c.sock.setblocking(True)
                c.sock.settimeout(0.2)
                c.sock.sendall(c.out_partial + c.channel.reject_frame(reject))
            except OSError:
                pass
        try:
            c.sock.close()
        except OSError:
            pass
        if c.announced:
            emit_event({"event": "disconnected", "reason": reason})
            log.warning("disconnected from the coordinator: %s", reason)
        else:
            log.info("connection attempt failed: %s", reason)
        self.schedule_redial(self.clock())

    def on_connected(self, now):
        c = self.conn
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err != 0:
            return self.disconnect("connect: %s" % os.strerror(err))
        c.state = "handshaking"
        c.out.append(c.channel.hello_frame())

    def on_readable(self, now):
        c = self.conn
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self.disconnect("receive: %s" % e)
        if not data:
            return self.disconnect("closed by the coordinator")
        c.last_recv = now
        defect = None
        try:
            events = c.channel.feed(data)
        except ProtocolError as e:
            defect = e
            events = e.events  # the valid frames before the defect are handled first
        self.handle_events(c, events)
        if defect is not None and self.conn is c:
            emit_event({"event": "error", "reason": defect.reason})
            log.error("refused from the coordinator (%s): %s", defect.category, defect.reason)
            self.disconnect(defect.reason, reject=defect.reason)

    def handle_events(self, c, events):
        for kind, value in events:
            if self.conn is not c:
                break
            if kind == "welcome":
                c.out.append(value)
                c.state = "established"
                c.announced = True
                host, port = self.coordinator
                emit_event({"event": "connected", "coordinator": "%s:%d" % (host, port)})
                log.info("connected to the coordinator (version %d, %s)",
                         c.channel.version, "keyed" if self.key else "unkeyed")
            elif kind == "reject":
                emit_event({"event": "rejected", "reason": value})
                log.warning("REJECT from the coordinator: %s", value)
                self.disconnect("rejected: %s" % value)
            else:
                if not c.verified:
                    c.verified = True
                    self.backoff = BACKOFF_MIN_S
                if kind == "data":
                    log.info("<- %s", json.dumps(value))
                    self.machine.on_message(value)

    def flush(self, now):
        c = self.conn
        while c.out_partial or c.out:
            if not c.out_partial:
                c.out_partial = c.out.popleft()
            try:
                n = c.sock.send(c.out_partial)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                return self.disconnect("send: %s" % e)
            c.out_partial = c.out_partial[n:]
            c.last_sent = now

    def conn_timers(self, now):
        c = self.conn
        if c is None:
            if now >= self.next_dial:
                self.dial(now)
            return
        if c.state != "established" and now - c.started >= HANDSHAKE_TIMEOUT_S:
            return self.disconnect("handshake timeout",
                                   reject="handshake timeout" if c.state != "connecting" else None)
        if c.state == "established":
            if now - c.last_recv >= IDLE_TIMEOUT_S:
                emit_event({"event": "error", "reason": "idle timeout"})
                return self.disconnect("idle timeout (%.0f s without a frame)" % IDLE_TIMEOUT_S,
                                       reject="idle timeout")
            if now - c.last_sent >= KEEPALIVE_S and not c.out and not c.out_partial:
                c.out.append(c.channel.ping_frame())

    def conn_deadline(self):
        c = self.conn
        if c is None:
            return self.next_dial
        if c.state != "established":
            return c.started + HANDSHAKE_TIMEOUT_S
        if c.out or c.out_partial:  # waiting for the socket to be writable, not for a PING
            return c.last_recv + IDLE_TIMEOUT_S
        return min(c.last_recv + IDLE_TIMEOUT_S, c.last_sent + KEEPALIVE_S)

    def deadline_exit(self):
        log.error("deadline of %.1f s passed: exiting", self.args.deadline_s)
        self.close()
        sys.exit(1)

    def close(self):
        if self.conn is not None:
            try:
                self.conn.sock.close()
            except OSError:
                pass
            self.conn = None

    def serve(self):
        self.machine = ParticipantMachine(self.my_id, [self.args.vm], self.host,
                                          self.send_message, emit_event, self.clock)
        self.machine.start()
        while True:
            now = self.clock()
            if now >= self.exit_at:
                self.deadline_exit()
            for aid, outcome in self.host.due(now):
                self.machine.on_outcome(aid, outcome)
            self.machine.tick()
            self.conn_timers(now)
            if self.conn is not None and self.conn.state != "connecting":
                self.flush(now)
            times = [self.exit_at, self.conn_deadline()]
            for t in (self.host.next_due(), self.machine.next_deadline()):
                if t is not None:
                    times.append(t)
            timeout = max(0.0, min(times) - self.clock())
            c = self.conn
            rlist, wlist = [], []
            if c is not None:
                if c.state == "connecting":
                    wlist.append(c.sock)
                else:
                    rlist.append(c.sock)
                    if c.out or c.out_partial:
                        wlist.append(c.sock)
            r, w, _ = select.select(rlist, wlist, [], timeout)
            now = self.clock()
            if c is not None and self.conn is c:
                if c.state == "connecting" and w:
                    self.on_connected(now)
                elif r:
                    self.on_readable(now)

    def run(self):
        try:
            self.register()
            self.find_coordinator()
            self.serve()
        except Terminate:
            log.info("terminated: closing the connection; host: ClearAll (simulated)")
            self.close()
            sys.exit(0)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="A participant of the unacloud global-snapshot protocol v1 "
                    "(simulated host).")
    p.add_argument("--ms", required=True, help="metadata server HOST:PORT")
    p.add_argument("--cluster", required=True, type=int)
    p.add_argument("--vm", required=True, help="the VM this participant registers")
    p.add_argument("--addr", default="127.0.0.1", help="address sent in INSERT")
    p.add_argument("--key-file", help="cluster key, hexadecimal text")
    p.add_argument("--snapshot-ms", type=int, default=0,
                   help="duration of the simulated local snapshot")
    p.add_argument("--fail-snapshot", type=int, metavar="GS",
                   help="make the local snapshot of this global snapshot fail")
    p.add_argument("--fail-restore", action="store_true", help="make every restore fail")
    p.add_argument("--deadline-s", type=float, default=120.0,
                   help="exit with status 1 after this long")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s participant[" + args.vm + "] %(levelname)s "
                               "%(message)s")
    if not 0 <= args.cluster <= U64_MAX:
        p.error("--cluster must be a u64")
    try:
        parse_hostport(args.ms)
    except ValueError as e:
        p.error(str(e))
    key = None
    if args.key_file:
        try:
            key = read_key_file(args.key_file)
        except (OSError, ValueError) as e:
            p.error(str(e))

    def on_signal(signum, frame):
        raise Terminate()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Runtime(args, key).run()


if __name__ == "__main__":
    main()

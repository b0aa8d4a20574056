"""Checks participant.py against the test vectors of PROTOCOL.md appendix A.

Run from the repository root:
    python3 -m unittest discover -s unacloud-snapshot/interop -p 'test_*.py'
"""

import hashlib
import hmac
import json
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import participant as p  # noqa: E402
import logging  # noqa: E402

logging.getLogger("participant").addHandler(logging.NullHandler())
logging.getLogger("participant").propagate = False

with open(os.path.join(HERE, "vectors.json"), encoding="utf-8") as f:
    V = json.load(f)

CLUSTER = V["cluster"]
CLIENT_ID = V["client_id"]
SERVER_ID = V["server_id"]
NC = bytes.fromhex(V["client_nonce"])
NS = bytes.fromhex(V["server_nonce"])
KEY = bytes.fromhex(V["key"])


def frames(set_name):
    return {fr["name"]: fr for fr in V[set_name]}


def raw(fr):
    return bytes.fromhex(fr["hex"])


def session(key=KEY):
    return p.session_key(key, 1, CLUSTER, CLIENT_ID, SERVER_ID, NC, NS)


def new_channel(key):
    return p.ClientChannel(CLUSTER, CLIENT_ID, SERVER_ID, key=key, nonce=NC)


def handshaken(key):
    """A client channel that has sent HELLO and processed the vector's WELCOME."""
    fs = frames("keyed" if key else "unkeyed")
    ch = new_channel(key)
    ch.hello_frame()
    events = ch.feed(raw(fs["welcome"]))
    return ch, events


class Inputs(unittest.TestCase):
    def test_inputs_are_those_of_appendix_a(self):
        self.assertEqual(CLUSTER, 42)
        self.assertEqual(CLIENT_ID, 2)
        self.assertEqual(SERVER_ID, 0)
        self.assertEqual(NC, bytes(range(0x00, 0x20)))
        self.assertEqual(NS, bytes(range(0x20, 0x40)))
        self.assertEqual(KEY, bytes(range(0x40, 0x60)))

    def test_appendix_a_prints_the_same_hello_and_done(self):
        fs = frames("keyed")
        hello = ("00 00 00 91 01 00 00 00 00 00 00 00 00 7b 22 70 72 6f 74 6f 63 6f 6c 22 3a 22 "
                 "75 6e 61 63 6c 6f")
        self.assertTrue(raw(fs["hello"]).startswith(bytes.fromhex(hello.replace(" ", ""))))
        self.assertTrue(raw(fs["done"]).endswith(bytes.fromhex(
            "2b902cb9249fe533e6ecabbd40ed25c1c37be1b9b2ac2048eee224f93f71b6a8")))


class FrameLayout(unittest.TestCase):
    """Every vector decodes: length, kind, seq, body, MAC as listed."""

    def check_set(self, name, keyed):
        for fr in V[name]:
            with self.subTest(frame=fr["name"]):
                data = raw(fr)
                kind, seq, content = p.decode_frame(data)
                self.assertEqual(kind, fr["kind"])
                self.assertEqual(p.KIND_NAMES[kind], fr["kind_name"])
                self.assertEqual(seq, fr["seq"])
                has_mac = keyed and kind in (p.KIND_DATA, p.KIND_PING)
                self.assertEqual(has_mac, fr["mac"] is not None)
                body = content[:-p.MAC_LEN] if has_mac else content
                self.assertEqual(body.decode("utf-8"), fr["body"])
                if has_mac:
                    self.assertEqual(content[-p.MAC_LEN:].hex(), fr["mac"])
                # length covers kind, seq, body and MAC
                self.assertEqual(int.from_bytes(data[:4], "big"),
                                 9 + len(body) + (32 if has_mac else 0))
                # the frame layer reproduces the vector from its parts
                mac = bytes.fromhex(fr["mac"]) if has_mac else b""
                self.assertEqual(p.encode_frame(kind, seq, body, mac), data)

    def test_keyed_frames_decode(self):
        self.check_set("keyed", True)

    def test_unkeyed_frames_decode(self):
        self.check_set("unkeyed", False)

    def test_reject_decodes(self):
        fr = V["reject"]
        kind, seq, content = p.decode_frame(raw(fr))
        self.assertEqual((kind, seq), (p.KIND_REJECT, 0))
        self.assertEqual(content.decode("utf-8"), fr["body"])
        self.assertEqual(p.encode_frame(kind, seq, content), raw(fr))

    def test_bodies_are_json_objects_that_the_schema_accepts(self):
        for set_name in ("keyed", "unkeyed"):
            for fr in V[set_name]:
                if fr["kind"] in (p.KIND_HELLO, p.KIND_WELCOME, p.KIND_AUTH, p.KIND_DATA):
                    obj = p.parse_json_object(fr["body"].encode(), fr["kind_name"])
                    if fr["kind"] == p.KIND_DATA:
                        p.validate_message(obj["message"])


class KeySchedule(unittest.TestCase):
    def test_session_key_is_hmac_of_the_documented_input(self):
        data = (b"unacloud-gs/1 session" + b"\x01" + (42).to_bytes(8, "big")
                + (2).to_bytes(4, "big") + (0).to_bytes(4, "big") + NC + NS)
        self.assertEqual(session(), hmac.new(KEY, data, hashlib.sha256).digest())

    def test_proofs_match_the_vectors(self):
        fs = frames("keyed")
        ks = session()
        welcome = json.loads(fs["welcome"]["body"])
        auth = json.loads(fs["auth"]["body"])
        self.assertEqual(p.proof(ks, "server"), welcome["proof"])
        self.assertEqual(p.proof(ks, "client"), auth["proof"])

    def test_macs_over_the_vector_bytes(self):
        ks = session()
        for fr in V["keyed"]:
            if fr["mac"] is None:
                continue
            with self.subTest(frame=fr["name"]):
                kind, seq, content = p.decode_frame(raw(fr))
                body = content[:-p.MAC_LEN]
                d = p.DIR_CLIENT if fr["sender"] == "client" else p.DIR_SERVER
                self.assertEqual(p.frame_mac(ks, d, seq, kind, body).hex(), fr["mac"])

    def test_key_file_format(self):
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".key", delete=False) as f:
            f.write(V["key"][:30] + "\n  " + V["key"][30:].upper() + "\n")
        try:
            self.assertEqual(p.read_key_file(f.name), KEY)
        finally:
            os.unlink(f.name)
        with tempfile.NamedTemporaryFile("w", suffix=".key", delete=False) as f:
            f.write("00" * 15)
        try:
            with self.assertRaises(ValueError):
                p.read_key_file(f.name)
        finally:
            os.unlink(f.name)


class ClientFrames(unittest.TestCase):
    """The client's frames reproduced from the given nonces."""

    def check(self, key):
        self._keyed = key is not None
        fs = frames("keyed" if key else "unkeyed")
        ch = new_channel(key)
        hello = ch.hello_frame()
        self.assert_same_frame(hello, raw(fs["hello"]))
        events = ch.feed(raw(fs["welcome"]))
        self.assertEqual([e[0] for e in events], ["welcome"])
        self.assert_same_frame(events[0][1], raw(fs["auth"]))
        events = ch.feed(raw(fs["precheck"]))
        self.assertEqual(events, [("data", {"type": "precheck", "gs": 7})])
        self.assert_same_frame(ch.data_frame({"type": "precheck_ok", "gs": 7}),
                               raw(fs["precheck_ok"]))
        self.assert_same_frame(ch.data_frame({"type": "done", "gs": 7, "local_time_us": 1500000}),
                               raw(fs["done"]))
        self.assertEqual(ch.feed(raw(fs["ping"])), [("ping", None)])

    def assert_same_frame(self, mine, theirs):
        """Same kind, seq and decoded body. The spec does not fix the JSON text, but our
        encoder writes the reference's compact form in its field order, so the frames
        (and with them the MACs, computed over the bytes as sent) are equal byte for
        byte as well."""
        k1, s1, c1 = p.decode_frame(mine)
        k2, s2, c2 = p.decode_frame(theirs)
        self.assertEqual((k1, s1), (k2, s2))
        n = p.MAC_LEN if len(c2) >= p.MAC_LEN and k2 in (p.KIND_DATA, p.KIND_PING) \
            and len(c1) == len(c2) and self._keyed else 0
        b1, b2 = c1[:len(c1) - n], c2[:len(c2) - n]
        if b2:
            self.assertEqual(json.loads(b1), json.loads(b2))
        self.assertEqual(mine, theirs)

    def test_keyed_client_frames_byte_for_byte(self):
        self.check(KEY)

    def test_unkeyed_client_frames_byte_for_byte(self):
        self.check(None)

    def test_decoded_structure_of_client_bodies(self):
        # Independent of the JSON text: the structures are what section 2.2/2.7 says.
        fs = frames("keyed")
        hello = json.loads(fs["hello"]["body"])
        self.assertEqual(hello, {"protocol": "unacloud-gs", "versions": [1], "cluster": 42,
                                 "id": 2, "nonce": NC.hex()})
        done = json.loads(fs["done"]["body"])
        self.assertEqual(done, {"cluster": 42, "from": 2, "to": 0,
                                "message": {"type": "done", "gs": 7,
                                            "local_time_us": 1500000}})

    def test_server_frames_reproduced_with_its_mac(self):
        # A check of our MAC function in the other direction, over the vector's bytes.
        ks = session()
        fs = frames("keyed")
        for name in ("precheck", "ping"):
            fr = fs[name]
            body = fr["body"].encode()
            mac = p.frame_mac(ks, p.DIR_SERVER, fr["seq"], fr["kind"], body)
            self.assertEqual(p.encode_frame(fr["kind"], fr["seq"], body, mac), raw(fr))

    def test_reject_frame_is_reproduced(self):
        fr = V["reject"]
        self.assertEqual(p.encode_frame(p.KIND_REJECT, 0, fr["body"].encode()), raw(fr))


class ReceivingTheVectors(unittest.TestCase):
    def test_whole_server_stream_in_one_chunk_and_byte_by_byte(self):
        for key in (KEY, None):
            fs = frames("keyed" if key else "unkeyed")
            stream = raw(fs["welcome"]) + raw(fs["precheck"]) + raw(fs["ping"])
            ch = new_channel(key)
            ch.hello_frame()
            kinds = [e[0] for e in ch.feed(stream)]
            self.assertEqual(kinds, ["welcome", "data", "ping"])
            ch = new_channel(key)
            ch.hello_frame()
            kinds = []
            for i in range(len(stream)):
                kinds += [e[0] for e in ch.feed(stream[i:i + 1])]
            self.assertEqual(kinds, ["welcome", "data", "ping"])

    def test_reject_vector_is_reported_not_acted_upon(self):
        ch = new_channel(KEY)
        ch.hello_frame()
        events = ch.feed(raw(V["reject"]))
        self.assertEqual(events, [("reject", V["reject"]["body"])])
        self.assertEqual(ch.state, "closed")


class NegativeControls(unittest.TestCase):
    def test_flipped_bit_fails_the_mac(self):
        fs = frames("keyed")
        for name in ("precheck", "ping"):
            data = raw(fs[name])
            for pos in (13, len(data) - 1, len(data) - 32):
                with self.subTest(frame=name, byte=pos):
                    ch, _ = handshaken(KEY)
                    if name == "ping":
                        ch.feed(raw(fs["precheck"]))
                    bad = bytearray(data)
                    bad[pos] ^= 0x01
                    with self.assertRaises(p.ProtocolError) as cm:
                        ch.feed(bytes(bad))
                    self.assertEqual(cm.exception.category, "Authentication")

    def test_flipped_bit_in_the_seq_fails(self):
        fs = frames("keyed")
        ch, _ = handshaken(KEY)
        bad = bytearray(raw(fs["precheck"]))
        bad[12] ^= 0x01
        with self.assertRaises(p.ProtocolError):
            ch.feed(bytes(bad))

    def test_wrong_seq_is_refused(self):
        for key in (KEY, None):
            fs = frames("keyed" if key else "unkeyed")
            # skipping PRECHECK (seq 1): the PING (seq 2) is a gap
            ch, _ = handshaken(key)
            with self.assertRaises(p.ProtocolError) as cm:
                ch.feed(raw(fs["ping"]))
            self.assertIn("sequence", cm.exception.reason)
            # a replayed PRECHECK (seq 1 again)
            ch, _ = handshaken(key)
            ch.feed(raw(fs["precheck"]))
            with self.assertRaises(p.ProtocolError):
                ch.feed(raw(fs["precheck"]))

    def test_unkeyed_seq_rewrite_is_refused(self):
        fs = frames("unkeyed")
        ch, _ = handshaken(None)
        kind, seq, content = p.decode_frame(raw(fs["precheck"]))
        with self.assertRaises(p.ProtocolError):
            ch.feed(p.encode_frame(kind, 5, content))

    def test_wrong_key_fails_the_proof(self):
        fs = frames("keyed")
        wrong = bytes(range(0x41, 0x61))
        ch = new_channel(wrong)
        ch.hello_frame()
        with self.assertRaises(p.ProtocolError) as cm:
            ch.feed(raw(fs["welcome"]))
        self.assertEqual(cm.exception.category, "Authentication")
        self.assertNotEqual(p.proof(session(wrong), "server"),
                            json.loads(fs["welcome"]["body"])["proof"])

    def test_keyed_and_unkeyed_do_not_mix(self):
        ch = new_channel(KEY)
        ch.hello_frame()
        with self.assertRaises(p.ProtocolError):
            ch.feed(raw(frames("unkeyed")["welcome"]))
        ch = new_channel(None)
        ch.hello_frame()
        with self.assertRaises(p.ProtocolError):
            ch.feed(raw(frames("keyed")["welcome"]))

    def test_unkeyed_data_on_keyed_connection_fails(self):
        ch, _ = handshaken(KEY)
        with self.assertRaises(p.ProtocolError):
            ch.feed(raw(frames("unkeyed")["precheck"]))

    def test_mac_of_another_direction_fails(self):
        # The client's PRECHECK_OK reflected back to it: the direction byte differs
        # (and so do from/to); craft the server frame with a client-direction MAC.
        ks = session()
        fs = frames("keyed")
        body = fs["precheck"]["body"].encode()
        mac = p.frame_mac(ks, p.DIR_CLIENT, 1, p.KIND_DATA, body)
        ch, _ = handshaken(KEY)
        with self.assertRaises(p.ProtocolError):
            ch.feed(p.encode_frame(p.KIND_DATA, 1, body, mac))

    def test_bad_lengths_and_kinds_refused_from_the_prefix(self):
        ch = new_channel(None)
        ch.hello_frame()
        with self.assertRaises(p.ProtocolError):
            ch.feed((8).to_bytes(4, "big"))
        ch = new_channel(None)
        ch.hello_frame()
        with self.assertRaises(p.ProtocolError):
            ch.feed((1025).to_bytes(4, "big"))  # above 1024 before the handshake
        ch = new_channel(None)
        ch.hello_frame()
        with self.assertRaises(p.ProtocolError):
            ch.feed((20).to_bytes(4, "big") + b"\x07")
        ch, _ = handshaken(None)
        ch.feed((1024 * 1024).to_bytes(4, "big"))  # the limit after the handshake: fine
        ch, _ = handshaken(None)
        with self.assertRaises(p.ProtocolError):
            ch.feed((1024 * 1024 + 1).to_bytes(4, "big"))

    def test_wrong_frame_kinds_refused(self):
        fs = frames("unkeyed")
        ch = new_channel(None)
        ch.hello_frame()
        with self.assertRaises(p.ProtocolError):
            ch.feed(raw(fs["precheck"])[:5] + (0).to_bytes(8, "big")
                    + raw(fs["precheck"])[13:])  # DATA before WELCOME
        ch, _ = handshaken(None)
        with self.assertRaises(p.ProtocolError):
            ch.feed(p.encode_frame(p.KIND_WELCOME, 1, fs["welcome"]["body"].encode()))

    def _data(self, envelope, key=None):
        ch, _ = handshaken(key)
        body = json.dumps(envelope).encode() if not isinstance(envelope, bytes) else envelope
        mac = p.frame_mac(ch.ks, p.DIR_SERVER, 1, p.KIND_DATA, body) if key else b""
        return ch, p.encode_frame(p.KIND_DATA, 1, body, mac)

    def test_envelope_checks(self):
        good = {"cluster": 42, "from": 0, "to": 2, "message": {"type": "precheck", "gs": 7}}
        ch, fr = self._data(good)
        self.assertEqual(ch.feed(fr), [("data", {"type": "precheck", "gs": 7})])
        bad_cases = {
            "foreign cluster": dict(good, cluster=43),
            "sender binding": dict(good, **{"from": 1}),
            "misaddressed": dict(good, to=3),
            "role: a participant's message": dict(good, message={"type": "done", "gs": 7,
                                                                 "local_time_us": 1}),
            "role: the MS's message": dict(good, message={"type": "trigger_global_snapshot"}),
            "unknown type": dict(good, message={"type": "precheck2", "gs": 7}),
            "gs above 2^53-1": dict(good, message={"type": "precheck", "gs": 2 ** 53}),
            "gs negative": dict(good, message={"type": "precheck", "gs": -1}),
            "gs a float": dict(good, message={"type": "precheck", "gs": 7.0}),
            "gs a bool": dict(good, message={"type": "precheck", "gs": True}),
            "missing gs": dict(good, message={"type": "precheck"}),
            "abort without reason": dict(good, message={"type": "abort", "gs": 7}),
            "poll without attempt": dict(good, message={"type": "poll", "gs": 7}),
        }
        for name, env in bad_cases.items():
            with self.subTest(case=name):
                ch, fr = self._data(env)
                with self.assertRaises(p.ProtocolError):
                    ch.feed(fr)
        for name, body in {"not JSON": b"{", "an array": b"[]",
                           "bad UTF-8": b'{"cluster":42,"\xff":1}',
                           "duplicate field": b'{"cluster":42,"cluster":42,"from":0,"to":2,'
                                              b'"message":{"type":"precheck","gs":7}}'}.items():
            with self.subTest(case=name):
                ch, fr = self._data(body)
                with self.assertRaises(p.ProtocolError):
                    ch.feed(fr)

    def test_unknown_fields_are_ignored(self):
        env = {"cluster": 42, "from": 0, "to": 2, "extra": [1],
               "message": {"type": "abort", "gs": 7, "reason": "x", "new_field": {}}}
        ch, fr = self._data(env, KEY)
        self.assertEqual(ch.feed(fr)[0][0], "data")

    def test_welcome_checks(self):
        w = json.loads(frames("unkeyed")["welcome"]["body"])
        for name, bad in {"other id": dict(w, id=4294967295), "version 2": dict(w, version=2),
                          "short nonce": dict(w, nonce="00" * 31),
                          "non-hex nonce": dict(w, nonce="zz" * 32)}.items():
            with self.subTest(case=name):
                ch = new_channel(None)
                ch.hello_frame()
                with self.assertRaises(p.ProtocolError):
                    ch.feed(p.encode_frame(p.KIND_WELCOME, 0, json.dumps(bad).encode()))
        ch = new_channel(None)
        ch.hello_frame()
        upper = dict(w, nonce=w["nonce"].upper())  # receivers accept either case
        self.assertEqual(ch.feed(p.encode_frame(p.KIND_WELCOME, 0, json.dumps(upper).encode()))
                         [0][0], "welcome")


class FakeHost:
    def __init__(self):
        self.issued = []
        self.n = 0

    def issue(self, action, params):
        self.n += 1
        self.issued.append((self.n, action, params))
        return self.n

    def abandon(self, aid):
        pass


class Machine(unittest.TestCase):
    """A few state-machine paths of sections 6.2, 6.3 and 7 with a fake host."""

    def setUp(self):
        self.now = 0.0
        self.host = FakeHost()
        self.sent, self.events = [], []
        self.m = p.ParticipantMachine(2, ["vm"], self.host, self.sent.append,
                                      self.events.append, clock=lambda: self.now)
        self.m.start()
        self.complete_all()

    def complete_all(self, outcomes=None):
        outcomes = outcomes or {}
        while self.m.current is not None:
            aid, action = self.m.current[0], self.m.current[1]
            default = {"outcome": "done"}
            if action == "check_vms_running":
                default = {"outcome": "vms_running", "running": True}
            if action == "take_local_snapshots":
                default = {"outcome": "snapshot_taken", "local_time_us": 1500000}
            self.m.on_outcome(aid, outcomes.get(action, default))

    def actions(self):
        return [a for _, a, _ in self.host.issued]

    def test_snapshot_release(self):
        self.m.on_message({"type": "precheck", "gs": 7})
        self.complete_all()
        self.m.on_message({"type": "take_snapshot", "gs": 7})
        self.complete_all()
        self.assertEqual(self.sent, [{"type": "precheck_ok", "gs": 7},
                                     {"type": "done", "gs": 7, "local_time_us": 1500000}])
        self.m.on_message({"type": "take_snapshot", "gs": 7})  # duplicate: DONE again
        self.assertEqual(self.sent[-1]["type"], "done")
        self.m.on_message({"type": "release", "gs": 7})
        self.complete_all()
        self.assertEqual(self.actions(), [
            "drop_incoming", "check_vms_running", "set_outgoing_colour", "drop_incoming",
            "take_local_snapshots", "set_outgoing_colour", "accept_incoming", "clear_colour",
            "drop_incoming"])
        self.m.on_message({"type": "precheck", "gs": 6})
        self.assertEqual(self.sent[-1], {"type": "stale", "gs": 6, "newest_gs": 7,
                                         "newest_attempt": 0})

    def test_reused_epoch_after_release_is_stale(self):
        # A coordinator that lost its catalog starts again at gs 1: not a duplicate once
        # RELEASE of gs 1 arrived, so STALE rather than the old DONE (README, 6.3).
        self.m.on_message({"type": "precheck", "gs": 1})
        self.complete_all()
        self.m.on_message({"type": "take_snapshot", "gs": 1})
        self.complete_all()
        self.m.on_message({"type": "release", "gs": 1})
        self.complete_all()
        self.m.on_message({"type": "precheck", "gs": 1})
        self.assertEqual(self.sent[-1], {"type": "stale", "gs": 1, "newest_gs": 1,
                                         "newest_attempt": 0})
        self.m.on_message({"type": "take_snapshot", "gs": 1})
        self.assertEqual(self.sent[-1]["type"], "stale")

    def test_failed_step_and_busy(self):
        self.m.on_message({"type": "take_snapshot", "gs": 3})
        # step 3 outstanding: a newer PRECHECK is refused as busy
        while self.m.current[1] != "take_local_snapshots":
            self.m.on_outcome(self.m.current[0], {"outcome": "done"})
        self.m.on_message({"type": "precheck", "gs": 4})
        self.assertEqual(self.sent[-1]["type"], "precheck_failed")
        self.assertTrue(self.sent[-1]["reason"].startswith("participant 2 is busy"))

    def test_snapshot_failure(self):
        self.m.on_message({"type": "take_snapshot", "gs": 3})
        self.complete_all({"take_local_snapshots": {"outcome": "failed", "reason": "x"}})
        self.assertEqual(self.sent[-1]["type"], "snapshot_failed")
        self.assertIn("clear_all", self.actions())

    def test_snapshot_point_waits_for_durability(self):
        self.m.on_message({"type": "take_snapshot", "gs": 3})
        self.complete_all({"take_local_snapshots": {"outcome": "snapshot_point",
                                                    "local_time_us": 10}})
        self.assertEqual(self.actions()[-1], "await_durable")
        self.assertEqual(self.sent[-1], {"type": "done", "gs": 3, "local_time_us": 10})

    def test_resume_and_start_only_after_restore(self):
        self.m.on_message({"type": "start", "gs": 1, "attempt": 1})
        self.assertEqual(self.sent[-1]["type"], "resume_failed")
        self.m.on_message({"type": "poll", "gs": 1, "attempt": 2})
        self.m.on_message({"type": "restore", "gs": 1, "attempt": 2})
        self.complete_all()
        self.m.on_message({"type": "start", "gs": 1, "attempt": 2})
        self.complete_all()
        self.assertEqual([m["type"] for m in self.sent],
                         ["resume_failed", "poll_ok", "restore_ok", "start_ok"])
        self.m.on_message({"type": "poll", "gs": 1, "attempt": 1})
        self.assertEqual(self.sent[-1], {"type": "stale", "gs": 1, "attempt": 1,
                                         "newest_gs": 0, "newest_attempt": 2})

    def test_resume_abort_ends_the_attempt(self):
        self.m.on_message({"type": "restore", "gs": 1, "attempt": 1})
        self.m.on_message({"type": "resume_abort", "gs": 1, "attempt": 1, "reason": "r"})
        self.complete_all()
        self.assertEqual(self.sent, [])  # the late restore answers nothing
        self.m.on_message({"type": "start", "gs": 1, "attempt": 1})
        self.assertEqual(self.sent[-1]["type"], "resume_failed")
        self.assertIn({"event": "resume_aborted", "gs": 1, "attempt": 1, "reason": "r"},
                      self.events)

    def test_holding_deadline_clears_by_itself(self):
        self.m.on_message({"type": "take_snapshot", "gs": 3})
        self.complete_all()
        self.now += p.SNAPSHOT_TIMEOUT_S + 1
        self.m.tick()
        self.complete_all()
        self.assertEqual(self.actions()[-2:], ["clear_all", "drop_incoming"])


if __name__ == "__main__":
    unittest.main()

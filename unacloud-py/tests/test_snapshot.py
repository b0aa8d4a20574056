"""unacloud.snapshot: the simulator and the sans-IO state machines driven from Python."""

from __future__ import annotations

import pytest

import unacloud
from unacloud import snapshot

KEYS = {
    "nodes", "tokens_expected", "tokens_final", "lost", "duplicated",
    "global_snapshots_started", "global_snapshots_completed", "restored_from",
    "orphan_messages", "violations", "sim_time_ms", "messages_sent",
}


def test_ring_without_crash_is_exact_and_consistent() -> None:
    r = snapshot.simulate_ring(nodes=4, tokens=300, snapshot_every=60, seed=3)
    assert KEYS <= set(r)
    assert r["tokens_final"] == r["tokens_expected"] == 300
    assert (r["lost"], r["duplicated"], r["orphan_messages"], r["violations"]) == (0, 0, 0, 0)
    assert r["global_snapshots_completed"] == r["global_snapshots_started"] >= 1
    s = r["snapshots"][0]
    assert len(s["local_ms"]) == 4 and s["global_ms"] >= max(s["local_ms"])


def test_crash_and_restore_loses_and_duplicates_nothing() -> None:
    r = snapshot.simulate_ring(nodes=4, tokens=400, snapshot_every=50, crash_at=250, seed=5)
    assert r["restored_from"] is not None
    assert r["tokens_final"] == 400 and r["lost"] == 0 and r["duplicated"] == 0


def test_negative_control_without_filter_finds_orphans() -> None:
    found = sum(
        snapshot.simulate_ring(nodes=4, tokens=300, snapshot_every=30, seed=s, filter=False)["orphan_messages"]
        for s in range(10)
    )
    assert found > 0


def test_thesis_order_is_a_failing_control_and_the_default_is_not() -> None:
    runs = [
        snapshot.simulate_ring(nodes=4, tokens=300, snapshot_every=60, seed=s, thesis_order=True)
        for s in range(10)
    ]
    assert sum(r["violations"] for r in runs) > 0
    for s in range(10):
        assert snapshot.simulate_ring(nodes=4, tokens=300, snapshot_every=60, seed=s)["violations"] == 0


def test_bad_configuration_is_a_typed_error() -> None:
    with pytest.raises(ValueError):
        snapshot.simulate_ring(transport="carrier-pigeon")
    with pytest.raises(unacloud.UnacloudError):
        snapshot.simulate_ring(nodes=0)


def test_frames_round_trip_and_garbage_is_rejected() -> None:
    with pytest.raises(unacloud.ParseError):
        snapshot.decode(b"\x00\x00\x00\x05hello")
    with pytest.raises(unacloud.ParseError):
        snapshot.decode(b"")


def drive(
    coord: snapshot.Coordinator,
    parts: dict[int, snapshot.Participant],
    now: float,
    live: bool = False,
    actions: list[str] | None = None,
) -> list[dict]:
    """Delivers every frame and completes every host action at once; returns events.

    With `live` the local snapshot answers at its point and then reports durability.
    Every host action's name is appended to `actions` when given."""
    events: list[dict] = []
    machines: dict[int, object] = {0: coord, **parts}
    for _ in range(10_000):
        progressed = False
        for pid, m in machines.items():
            while (out := m.poll_output()) is not None:
                progressed = True
                if out["kind"] == "transmit":
                    frame = snapshot.encode(out["envelope"])
                    assert frame == out["frame"]
                    machines[out["to"]].handle_message(now, frame)
                elif out["kind"] == "action":
                    a = out["action"]["action"]
                    if actions is not None:
                        actions.append(a)
                    if a == "check_vms_running":
                        m.handle_action_complete(now, out["id"], "vms_running", running=True)
                    elif a == "take_local_snapshots" and live:
                        m.handle_action_complete(now, out["id"], "snapshot_point", local_time=0.01)
                    elif a == "take_local_snapshots":
                        m.handle_action_complete(now, out["id"], "snapshot_taken", local_time=0.5)
                    elif a == "await_durable":
                        m.handle_action_complete(now, out["id"], "snapshot_durable", local_time=0.7)
                    else:
                        m.handle_action_complete(now, out["id"])
                else:
                    events.append(out["event"])
        if not progressed:
            return events
    raise AssertionError("protocol did not settle")


def test_protocol_driven_from_python_completes_a_global_snapshot() -> None:
    coord = snapshot.Coordinator(cluster=7, participants=[1, 2, 3], vms=["vm0"])
    parts = {i: snapshot.Participant(cluster=7, id=i, vms=[f"vm{i}"]) for i in (1, 2, 3)}
    gs = coord.start_global_snapshot(100.0)
    with pytest.raises(unacloud.ProtocolError):
        coord.start_global_snapshot(100.0)  # one at a time
    events = drive(coord, parts, 100.0)
    done = [e for e in events if e["event"] == "global_snapshot_completed"]
    assert done and done[0]["gs"] == gs
    assert set(done[0]["local_times"]) >= {1, 2, 3}
    assert coord.completed() == [gs]
    coord.start_resume(101.0)
    events = drive(coord, parts, 101.0)
    assert any(e["event"] == "resume_completed" for e in events)


def test_a_live_snapshot_reports_its_point_then_its_durability() -> None:
    coord = snapshot.Coordinator(cluster=7, participants=[1, 2], vms=["vm0"])
    parts = {i: snapshot.Participant(cluster=7, id=i, vms=[f"vm{i}"]) for i in (1, 2)}
    gs = coord.start_global_snapshot(10.0)
    actions: list[str] = []
    events = drive(coord, parts, 10.0, live=True, actions=actions)
    assert any(e["event"] == "global_snapshot_completed" and e["gs"] == gs for e in events)
    # Every host (the coordinator's own included) waited for durability after its point.
    assert actions.count("await_durable") == 3
    with pytest.raises(ValueError):
        coord.handle_action_complete(10.0, 999, "snapshot_point")  # no local_time


def test_a_silent_participant_fails_the_snapshot_after_its_deadline() -> None:
    coord = snapshot.Coordinator(cluster=1, participants=[1], vms=[])
    coord.start_global_snapshot(0.0)
    while coord.poll_output() is not None:
        pass  # frames to participant 1 are lost
    deadline = coord.poll_timeout()
    assert deadline is not None and deadline > 0.0
    coord.handle_timeout(deadline + 1.0)
    outs = []
    while (o := coord.poll_output()) is not None:
        outs.append(o)
    assert any(o["kind"] == "event" and o["event"]["event"] == "global_snapshot_failed" for o in outs)
    assert coord.completed() == []

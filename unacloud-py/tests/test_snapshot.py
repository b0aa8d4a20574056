"""unacloud.snapshot: the simulator and the sans-IO state machines driven from Python."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

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
    t = r.to_dict()
    assert KEYS <= set(t) and "snapshots" not in t
    assert r.tokens_final == r.tokens_expected == t["tokens_final"] == 300
    assert (r.lost, r.duplicated, r.orphan_messages, r.violations) == (0, 0, 0, 0) and r.exact
    assert r.global_snapshots_completed == r.global_snapshots_started >= 1
    s = r.snapshots()[0]
    assert len(s["host_local_ms"]) == 4 and s["local_ms"] == max(s["host_local_ms"])
    assert s["global_ms"] >= s["local_ms"]
    assert s["overhead_ms"] == pytest.approx(s["global_ms"] - s["local_ms"])
    assert len(r) == len(r.snapshots()) == r.global_snapshots_started
    assert r.report()["snapshots"][0]["id"] == s["global_snapshot"]


def test_crash_and_restore_loses_and_duplicates_nothing() -> None:
    r = snapshot.simulate_ring(nodes=4, tokens=400, snapshot_every=50, crash_at=250, seed=5)
    assert r.restored_from is not None
    assert r.tokens_final == 400 and r.lost == 0 and r.duplicated == 0
    assert snapshot.simulate_ring(nodes=4, tokens=400, snapshot_every=50, crash_at=250, seed=5,
                                  restore_from=r.restored_from).restored_from == r.restored_from


def test_the_result_is_a_table_and_pickles() -> None:
    pd = pytest.importorskip("pandas")
    r = snapshot.simulate_ring(nodes=4, tokens=300, snapshot_every=60, seed=3)
    df = pd.DataFrame(r)
    assert len(df) == r.global_snapshots_started
    assert {"global_snapshot", "local_ms", "global_ms", "overhead_ms", "status"} <= set(df.columns)
    assert list(df["global_ms"]) == [s["global_ms"] for s in r.snapshots()]
    assert df.equals(r.to_pandas())
    back = pickle.loads(pickle.dumps(r))
    assert back == r and back.to_dict() == r.to_dict() and back.snapshots() == r.snapshots()
    assert snapshot.SimulationResult(r.report()) == r
    assert r != snapshot.simulate_ring(nodes=4, tokens=300, snapshot_every=60, seed=4)


def test_the_study_knobs_reach_the_simulator() -> None:
    fixed = snapshot.simulate_ring(nodes=3, tokens=200, snapshot_every=50, local_snapshot_ms=5.0)
    for s in fixed.snapshots():
        assert s["host_local_ms"] == pytest.approx([5.0, 5.0, 5.0])
    ranged = snapshot.simulate_ring(nodes=3, tokens=200, snapshot_every=50, local_snapshot_ms=(10, 20))
    lt = [t for s in ranged.snapshots() for t in s["host_local_ms"]]
    assert lt and all(10 <= t <= 20 for t in lt) and len(set(lt)) > 1
    cfg = ranged.config()
    assert cfg is not None and (cfg["local_snapshot_min_us"], cfg["local_snapshot_max_us"]) == (10_000, 20_000)
    slow = snapshot.simulate_ring(nodes=3, tokens=200, snapshot_every=0, latency_ms=2.0, jitter_ms=0.0)
    fast = snapshot.simulate_ring(nodes=3, tokens=200, snapshot_every=0, latency_ms=0.2, jitter_ms=0.0)
    assert slow.sim_time_ms > 5 * fast.sim_time_ms
    lossy = snapshot.simulate_ring(nodes=3, tokens=200, snapshot_every=50, loss=0.05, seed=2)
    assert lossy.to_dict()["overhead"]["lost_by_link"] > 0 and lossy.exact  # TCP retransmits
    crash = snapshot.simulate_ring(nodes=4, tokens=400, snapshot_every=50, crash_at_ms=60.0, crash_host=2,
                                   reboot_after_ms=5, restore_time_ms=7, seed=1)
    c = crash.config()
    assert c is not None and (c["crash_host"], c["crash_at_time_us"], c["restore_time_us"]) == (2, 60_000, 7_000)
    assert crash.restored_from is not None and crash.exact
    tight = snapshot.simulate_ring(nodes=4, tokens=300, snapshot_every=60, local_snapshot_ms=30,
                                   snapshot_timeout_ms=5)
    assert tight.global_snapshots_completed == 0 < tight.global_snapshots_started
    assert all(s["status"] == "failed" and s["failure"] for s in tight.snapshots())


def test_bad_knobs_are_typed_errors() -> None:
    with pytest.raises(unacloud.InvalidInput):
        snapshot.simulate_ring(loss=1.5)
    with pytest.raises(unacloud.InvalidInput):
        snapshot.simulate_ring(local_snapshot_ms=(5, 1))
    with pytest.raises(unacloud.InvalidInput):
        snapshot.simulate_ring(latency_ms=-1)
    with pytest.raises(TypeError):
        snapshot.simulate_ring(local_snapshot_ms="slow")  # type: ignore[arg-type]
    with pytest.raises(unacloud.InvalidInput):
        snapshot.simulate_ring(nodes=4, crash_host=9, crash_at=10)
    with pytest.raises(unacloud.InvalidInput):
        snapshot.simulate_ring(crash_at=10, crash_at_ms=3.0)
    with pytest.raises(TypeError):
        snapshot.simulate_ring(progress="yes")  # type: ignore[arg-type]
    with pytest.raises(unacloud.SimulationError):
        snapshot.simulate_ring(tokens=5000, max_steps=100)


def tokens_for(seconds: float) -> int:
    """Tokens of an 8-node ring that take about `seconds` with this build on this machine
    (a release build is ten times faster than a debug one)."""
    t0 = time.monotonic()
    snapshot.simulate_ring(nodes=8, tokens=50_000, snapshot_every=5000)
    per_token = max(time.monotonic() - t0, 1e-3) / 50_000
    return min(50_000_000, max(100_000, int(seconds / per_token)))


def test_progress_reports_during_a_long_run_and_an_exception_stops_it() -> None:
    events: list[dict[str, Any]] = []
    tokens = tokens_for(0.8)
    r = snapshot.simulate_ring(nodes=8, tokens=tokens, snapshot_every=20_000, progress=events.append)
    ticks = [e for e in events if e["event"] == "progress"]
    assert events[-1]["event"] == "finish" and events[-1]["result"] == r
    assert ticks, "a run of this size takes several progress periods"
    steps = [e["steps"] for e in ticks]
    assert steps == sorted(steps) and all(0 < s < e["step_budget"] for s, e in zip(steps, ticks))

    class Stop(Exception):
        pass

    def stop(event: dict[str, Any]) -> None:
        raise Stop(event["steps"])

    with pytest.raises(Stop):
        snapshot.simulate_ring(nodes=8, tokens=tokens, snapshot_every=20_000, progress=stop)


CHILD = textwrap.dedent("""
    import sys
    import unacloud
    last = {"steps": 0}
    def progress(e):
        if e["event"] == "progress":
            last["steps"] = e["steps"]
            print("running", flush=True)
    try:
        r = unacloud.snapshot.simulate_ring(nodes=8, tokens=int(sys.argv[1]), snapshot_every=5000,
                                            progress=progress)
    except KeyboardInterrupt:
        print("interrupted after", last["steps"], "steps", flush=True)
        sys.exit(3)
    print("finished after", last["steps"], "steps", flush=True)
""")


def test_ctrl_c_interrupts_a_long_simulation() -> None:
    # Long enough that an interrupt a progress period or two in leaves most of it undone.
    tokens = str(tokens_for(2.0))
    # The uninterrupted run first: how long the whole run takes and how far it gets.
    t0 = time.monotonic()
    full = subprocess.run([sys.executable, "-c", CHILD, tokens], capture_output=True, text=True, timeout=300)
    full_s = time.monotonic() - t0
    assert full.returncode == 0, full.stderr
    full_steps = int(full.stdout.split("finished after")[1].split()[0])
    # The same run, sent SIGINT as soon as it reports progress.
    t0 = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", CHILD, tokens], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "running"
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=300)
    interrupted_s = time.monotonic() - t0
    assert child.returncode == 3, (out, err)
    steps = int(out.split("interrupted after")[1].split()[0])
    assert 0 < steps < full_steps / 2
    assert interrupted_s < full_s / 2


def test_negative_control_without_filter_finds_orphans() -> None:
    found = sum(
        snapshot.simulate_ring(nodes=4, tokens=300, snapshot_every=30, seed=s, filter=False).orphan_messages
        for s in range(10)
    )
    assert found > 0


def test_thesis_order_is_a_failing_control_and_the_default_is_not() -> None:
    runs = [
        snapshot.simulate_ring(nodes=4, tokens=300, snapshot_every=60, seed=s, thesis_order=True)
        for s in range(10)
    ]
    assert sum(r.violations for r in runs) > 0
    for s in range(10):
        assert snapshot.simulate_ring(nodes=4, tokens=300, snapshot_every=60, seed=s).violations == 0


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

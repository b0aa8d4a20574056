"""unacloud.experiment: the real-VM ring from Python, its result object, and the checks
made before anything starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import unacloud
from unacloud.experiment import RingVmsResult, ring_vms

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benches" / "ring_vms" / "results.json"


def measured() -> list[dict[str, Any]]:
    if not RESULTS.exists():
        pytest.skip(f"no measurements at {RESULTS}")
    return [e["result"] for e in json.loads(RESULTS.read_text())]


def test_result_fields_are_the_json_fields_of_the_example() -> None:
    for r in measured():
        assert list(r) == RingVmsResult.FIELDS
        res = RingVmsResult.from_dict(r)
        assert res.to_dict() == r and list(res.to_dict()) == list(r)
        assert res.exact == (r["tokens_counted"] == r["tokens_expected"])
        assert res.completed_ids == r["completed_ids"] and res.failures == r["failures"]
        assert repr(res).startswith("<RingVmsResult ")


def test_to_pandas_has_one_row_per_global_snapshot() -> None:
    pd = pytest.importorskip("pandas")
    r = measured()[0]
    df = RingVmsResult.from_dict(r).to_pandas()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["global_snapshot", "local_ms", "global_ms", "overhead_ms", "downtime_ms"]
    assert list(df["global_snapshot"]) == r["completed_ids"]
    assert list(df["overhead_ms"]) == pytest.approx(r["overhead_ms"])
    n = r["vms"]
    want = [max(r["vm_downtime_ms"][i * n:(i + 1) * n]) for i in range(len(r["completed_ids"]))]
    assert list(df["downtime_ms"]) == pytest.approx(want)


def test_a_result_pickles() -> None:
    import pickle

    for r in measured():
        res = RingVmsResult.from_dict(r)
        back = pickle.loads(pickle.dumps(res))
        assert back.to_dict() == r and RingVmsResult(r).to_dict() == r


def test_to_pandas_without_pandas_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail
    res = RingVmsResult.from_dict(measured()[0])
    with pytest.raises(ImportError, match="pip install pandas"):
        res.to_pandas()
    assert res.to_dict()["vms"] == res.vms  # everything else works without it


def test_from_dict_refuses_other_objects() -> None:
    r = dict(measured()[0])
    with pytest.raises(unacloud.InvalidInput, match="unknown fields"):
        RingVmsResult.from_dict({**r, "surprise": 1})
    del r["vms"]
    with pytest.raises(unacloud.InvalidInput, match="missing fields"):
        RingVmsResult.from_dict(r)
    with pytest.raises(unacloud.InvalidInput):
        RingVmsResult.from_dict([1, 2])  # type: ignore[arg-type]


def test_arguments_are_checked_before_anything_starts() -> None:
    with pytest.raises(unacloud.InvalidInput, match="vms must be a non-negative integer"):
        ring_vms(vms=-2)
    with pytest.raises(ValueError) as e:
        ring_vms(tokens=-1)
    assert not isinstance(e.value, OverflowError)
    with pytest.raises(TypeError, match="vms"):
        ring_vms(vms="2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gap_s"):
        ring_vms(gap_s="1s")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="progress must be a callable"):
        ring_vms(progress=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ring_vms(backend="carrier-pigeon")
    with pytest.raises(ValueError):
        ring_vms(accel="warp")


NON_ROOT = textwrap.dedent(
    """
    import os, sys
    os.setgid(65534); os.setuid(65534)
    try:
        import unacloud
    except ImportError:
        print("cannot-import")
        sys.exit(0)
    try:
        unacloud.experiment.ring_vms(vms=2, hosts=2, tokens=100, snapshots=1)
    except PermissionError as e:
        print("refused", isinstance(e, unacloud.UnacloudError), e)
    """
)


def test_without_root_it_is_a_permission_error() -> None:
    if os.geteuid() != 0:
        with pytest.raises(PermissionError, match="root"):
            ring_vms(vms=2, hosts=2, tokens=100, snapshots=1)
        return
    # As root: the same call from a process that gave its privileges up.
    proc = subprocess.run([sys.executable, "-c", NON_ROOT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.startswith("cannot-import"):
        pytest.skip("Python or the package is not readable by an unprivileged user here")
    assert proc.stdout.startswith("refused True"), proc.stdout
    assert "root" in proc.stdout


def guest_dir() -> Path:
    return Path(os.environ.get("UNACLOUD_GUEST_DIR", REPO / "target" / "guest"))


def test_a_missing_guest_image_is_a_file_not_found_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the guest image is looked for after the root check")
    try:
        unacloud.snapshot.simulate_ring(nodes=2, tokens=1)  # the package works
        ring_vms(guest_dir=tmp_path)
    except PermissionError as e:
        pytest.skip(f"network namespaces are not available here: {e}")
    except FileNotFoundError as e:
        assert isinstance(e, unacloud.UnacloudError)
        assert e.filename == str(tmp_path / "vmlinuz") and "scripts/guest-image" in str(e)
    else:  # pragma: no cover
        raise AssertionError("ring_vms ran without a guest image")


def test_the_smallest_real_ring(tmp_path: Path) -> None:
    """2 VMs on 2 PCs, a few thousand tokens, one global snapshot (root, guest image)."""
    if os.geteuid() != 0:
        pytest.skip("the real-VM ring runs only as root (namespaces, taps, netfilter)")
    g = guest_dir()
    if not all((g / n).is_file() for n in ("vmlinuz", "initrd.img", "rootfs.qcow2")):
        pytest.skip(f"needs the guest image in {g} (run ./scripts/guest-image)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64")
    events: list[dict[str, Any]] = []
    # The snapshot is triggered `gap_s` after the ring has formed; a short gap and some
    # margin of tokens keep it inside the ring's run on a loaded machine too.
    r = ring_vms(
        vms=2, hosts=2, tokens=6000, snapshots=1, gap_s=0.2, progress=events.append, guest_dir=g
    )
    assert [e["event"] for e in events] == ["start", "finish"]
    assert events[0]["vms"] == 2 and events[1]["result"] is r
    assert r.exact and r.failures == [], r.to_dict()
    assert list(r.to_dict()) == RingVmsResult.FIELDS
    d = r.to_dict()
    assert (d["rules_left"], d["namespaces_left"], d["vms_left"]) == (0, 0, 0)
    assert len(r.completed_ids) == 1

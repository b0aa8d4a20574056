"""unacloud.core: profiles, placement and the cost model."""

from __future__ import annotations

import pickle

import pytest

import unacloud
from unacloud import core


def hosts(n: int, cores: int = 4, mem: int = 8192) -> list[dict]:
    return [
        {"id": f"pc{i}", "free_cores": cores, "free_memory_mb": mem, "free_disk_bytes": 60 * 10**9}
        for i in range(n)
    ]


def vms(n: int, profile: str = "small") -> list[dict]:
    return [{"name": f"vm{i}", "template": "ubuntu", "profile": profile} for i in range(n)]


def test_profiles_are_the_thesis_table() -> None:
    got = [(p["name"], p["cores"], p["memory_mb"]) for p in core.hardware_profiles()]
    assert got == [("small", 1, 1024), ("medium", 2, 2048), ("large", 3, 4096), ("extra-large", 4, 8192)]
    with pytest.raises(ValueError):
        core.hardware_profile("huge")


@pytest.mark.parametrize("algorithm", core.placement_algorithms())
def test_every_algorithm_places_without_overcommit(algorithm: str) -> None:
    plan = core.place(hosts(5), vms(5, "medium"), algorithm=algorithm, seed=7)
    assert isinstance(plan, core.Placement) and plan.algorithm == algorithm
    assert sorted(a["vm"] for a in plan.assignments) == sorted(f"vm{i}" for i in range(5))
    for h in plan.remaining:
        assert h["free_cores"] >= 0 and h["free_memory_mb"] >= 0
    used = {h["id"]: 4 - h["free_cores"] for h in plan.remaining}
    for h in used:
        assert used[h] == 2 * len(plan.vms_on(h))  # medium: 2 cores each
    assert all(plan.host_of(r["vm"]) == r["host"] for r in plan)
    assert (plan.seed is not None) == (algorithm == "random")


def test_random_is_deterministic_per_seed() -> None:
    a = core.place(hosts(10), vms(10), algorithm="random", seed=1)
    b = core.place(hosts(10), vms(10), algorithm="random", seed=1)
    assert a.assignments == b.assignments and a.seed == b.seed == 1
    drawn = core.place(hosts(10), vms(10), algorithm="random")
    assert drawn.seed is not None
    assert core.place(hosts(10), vms(10), algorithm="random", seed=drawn.seed) == drawn


def test_a_placement_is_a_table_and_pickles() -> None:
    pd = pytest.importorskip("pandas")
    plan = core.place(hosts(3), vms(4, "medium"), algorithm="round-robin")
    df = pd.DataFrame(plan)
    assert list(df.columns) == ["vm", "host", "template", "profile", "cores", "memory_mb", "disk_bytes"]
    assert list(df["vm"]) == ["vm0", "vm1", "vm2", "vm3"]
    assert list(df["host"]) == ["pc0", "pc1", "pc2", "pc0"]
    assert set(df["cores"]) == {2}
    assert df.equals(plan.to_pandas()) and len(plan) == 4
    back = pickle.loads(pickle.dumps(plan))
    assert back == plan and back.to_dict() == plan.to_dict()
    assert core.Placement(plan.to_dict()) == plan
    d = plan.to_dict()
    assert set(d) == {"algorithm", "seed", "assignments", "remaining", "template_copies", "unplaced", "vms"}


def test_best_effort_keeps_the_partial_plan() -> None:
    plan = core.place(hosts(2), vms(3), algorithm="singleton", best_effort=True)
    assert len(plan.assignments) == 2
    assert [u["vm"] for u in plan.unplaced] == ["vm2"] and plan.unplaced[0]["reason"]
    assert plan.host_of("vm2") is None


def test_disk_aware_counts_template_copies() -> None:
    hs = hosts(2)
    hs[1]["preloaded_templates"] = ["ubuntu"]
    reqs = [dict(r, disk_bytes=10**9, template_bytes=5 * 10**9) for r in vms(2)]
    plan = core.place(hs, reqs, algorithm="disk-aware")
    # the host that already holds the template is preferred: nothing to copy
    assert {a["host"] for a in plan.assignments} == {"pc1"} and plan.template_copies == []


def test_impossible_placement_names_the_vms() -> None:
    with pytest.raises(unacloud.PlacementError) as e:
        core.place(hosts(2), vms(3), algorithm="singleton")
    assert "vm2" in str(e.value)
    with pytest.raises(ValueError):
        core.place(hosts(1), vms(1), algorithm="worst-fit")
    with pytest.raises(unacloud.InvalidInput):
        core.place([{"id": "x"}], vms(1))


def test_cost_model_reproduces_the_thesis_example() -> None:
    assert core.file_count(disks=1, snapshots=4) == 10
    assert core.file_count(disks=1, snapshots=4, vms=8) == 80
    est = core.transfer_estimate(
        base_bytes=3_510_000_000, differencing_bytes=125_000_000, saved_state_bytes=250_000_000, snapshots=4,
        settings_bytes=10_000,
    )
    assert (est["all_files"]["files"], round(est["all_files"]["bytes"] / 1e9, 2)) == (10, 5.01)
    assert (est["without_template"]["files"], round(est["without_template"]["bytes"] / 1e9, 2)) == (6, 4.14)
    assert (est["with_preloaded_template"]["files"], round(est["with_preloaded_template"]["bytes"] / 1e9, 2)) == (5, 0.63)
    with pytest.raises(ValueError):
        core.transfer_estimate(1, 1, 1, snapshots=2, snapshot=5)

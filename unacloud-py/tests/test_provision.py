"""unacloud.provision: the template catalog, preloading and deployments, on the in-memory
double and on the QEMU backend (qemu-img only: no guest is started)."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import unacloud
from unacloud import core, hv, provision


def image(tmp_path: Path, name: str = "base.qcow2", size: int = 1 << 20) -> Path:
    p = tmp_path / name
    p.write_bytes(bytes(range(256)) * (size // 256))
    return p


def published(tmp_path: Path) -> tuple[provision.Catalog, provision.TemplateVersion]:
    cat = provision.Catalog(tmp_path / "catalog.json")
    tv = cat.add_draft("base", image(tmp_path), os_type="Linux_64", bridged_adapter=True)
    cat.publish("base", tv.version)
    return cat, cat.get("base", tv.version)


def host(i: int, cores: int = 4, mem: int = 8192) -> dict[str, Any]:
    return {"id": f"pc-{i}", "free_cores": cores, "free_memory_mb": mem, "free_disk_bytes": 10**12}


def requests(n: int, template: str) -> list[dict[str, Any]]:
    return [{"name": f"vm{i}", "template": template, "profile": "small"} for i in range(n)]


def test_catalog_versions_checksums_and_life_cycle(tmp_path: Path) -> None:
    cat = provision.Catalog(tmp_path / "catalog.json")
    assert len(cat) == 0 and cat.templates == []
    img = image(tmp_path)
    v1 = cat.add_draft("base", img, description="first")
    assert (v1.id, v1.status, v1.size_bytes, v1.format) == ("base@1", "draft", img.stat().st_size, "qcow2")
    assert v1.checksum.startswith("blake3:") and len(v1.checksum) == len("blake3:") + 64
    assert v1.file_name == "base-1.qcow2" and v1.description == "first"
    with pytest.raises(unacloud.NotFound):
        cat.latest_published("base")
    cat.publish("base", 1)
    v2 = cat.add_draft("base", img, checksum="sha256")
    assert v2.version == 2 and v2.checksum.startswith("sha256:")
    assert cat.latest_published("base").version == 1  # a draft is not offered
    # A requirement known not to hold blocks publishing.
    bad = cat.add_draft("nobridge", img, bridged_adapter=False)
    assert any(r["name"] == "bridged-adapter" and r["status"] == "not-met" for r in bad.requirements)
    with pytest.raises(unacloud.InvalidState):
        cat.publish("nobridge", bad.version)
    # The file is the catalog: reopening sees every change.
    again = provision.Catalog(cat.path)
    assert [t.id for t in again.templates] == ["base@1", "base@2", "nobridge@1"]
    assert again.get("base", 1) == cat.get("base", 1)
    assert pickle.loads(pickle.dumps(v1)) == v1 and v1.to_dict()["name"] == "base"
    with pytest.raises(unacloud.FileNotFound):
        cat.add_draft("ghost", tmp_path / "missing.qcow2")
    with pytest.raises(unacloud.InvalidInput):
        cat.add_draft("bad@name", img)
    with pytest.raises(unacloud.InvalidInput):
        cat.add_draft("x", img, checksum="md5")


def test_deploy_on_memory_hosts_with_every_algorithm(tmp_path: Path) -> None:
    cat, tv = published(tmp_path)
    pcs = {f"pc-{i}": hv.open("memory") for i in range(3)}
    targets = {}
    for name, pc in pcs.items():
        disk = pc.register_disk(f"/templates/{tv.file_name}")
        targets[name] = provision.HostTarget(pc, {tv.id: disk})
    assert set(targets["pc-0"].templates) == {tv.id}
    for algorithm in core.placement_algorithms():
        plan = core.place([host(i) for i in range(3)], requests(3, tv.id), algorithm=algorithm, seed=3)
        for pc in pcs.values():
            for vm in pc.list_vms():
                pc.unregister_vm(vm)
        report = provision.deploy(plan, targets)
        assert (report.created, report.failed, report.cancelled_vms) == (3, 0, 0), algorithm
        for o in report.outcomes:
            assert o.ok and o.result == "created" and o.host == plan.host_of(o.vm)
            assert o.history[0][0] == "requested" and o.attempts == 1 and o.error is None
            vm = pcs[o.host].vm_info(o.vm)
            # the VM's one disk is its own differencing child of the template
            assert len(vm.disks) == 1 and vm.disks[0]["disk"] != targets[o.host].templates[tv.id]
        if algorithm == "singleton":
            assert len({o.host for o in report.outcomes}) == 3


def test_deployment_report_is_a_table_and_pickles(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    cat, tv = published(tmp_path)
    pc = hv.open("memory")
    disk = pc.register_disk("/t/base-1.qcow2")
    plan = core.place([host(0)], requests(2, tv.id))
    events: list[dict[str, Any]] = []
    report = provision.deploy(plan, {"pc-0": provision.HostTarget(pc, {tv.id: disk.uuid})},
                              catalog=cat, progress=events.append)
    assert [e["done"] for e in events] == [1, 2] and all(e["total"] == 2 for e in events)
    assert {e["outcome"].vm for e in events} == {"vm0", "vm1"}
    df = pd.DataFrame(report)
    assert list(df["vm"]) == ["vm0", "vm1"] and set(df["result"]) == {"created"}
    assert df.equals(report.to_pandas()) and len(report) == 2
    back = pickle.loads(pickle.dumps(report))
    assert back.to_dict() == report.to_dict() and back.created == 2
    o = report.outcomes[0]
    assert pickle.loads(pickle.dumps(o)).to_dict() == o.to_dict() == report.to_dict()["outcomes"][0]
    # created VMs are recorded as users of the version, which then cannot go
    assert sorted(cat.users("base", tv.version)) == [("pc-0", "vm0"), ("pc-0", "vm1")]
    assert cat.version_of("pc-0", "vm1") == tv
    with pytest.raises(unacloud.InUse):
        cat.remove_version("base", tv.version)


def test_missing_template_or_host_fails_those_vms_with_the_reason(tmp_path: Path) -> None:
    pcs = [hv.open("memory"), hv.open("memory")]
    disk = pcs[0].register_disk("/t/base-1.qcow2")
    plan = core.place([host(0, cores=1), host(1, cores=1), host(2, cores=1)], requests(3, "base@1"),
                      algorithm="round-robin")
    targets = {"pc-0": provision.HostTarget(pcs[0], {"base@1": disk}),
               "pc-1": provision.HostTarget(pcs[1], {})}  # pc-2 has no target at all
    report = provision.deploy(plan, targets)
    by_host = {o.host: o for o in report.outcomes}
    assert by_host["pc-0"].result == "created"
    assert by_host["pc-1"].result == "failed" and "base@1" in (by_host["pc-1"].error or "")
    assert by_host["pc-2"].result == "failed" and by_host["pc-2"].error
    assert (report.created, report.failed) == (1, 2)
    assert pcs[1].list_vms() == []  # a failed VM leaves nothing behind


def test_an_exception_in_progress_is_raised(tmp_path: Path) -> None:
    pc = hv.open("memory")
    disk = pc.register_disk("/t/base-1.qcow2")
    plan = core.place([host(0)], requests(3, "base@1"))

    def stop(event: dict[str, Any]) -> None:
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        provision.deploy(plan, {"pc-0": provision.HostTarget(pc, {"base@1": disk})}, progress=stop)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_an_exception_in_progress_cancels_the_rest(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    pc = hv.open("qemu", tmp_path / "pc-0")
    disk = pc.register_disk(base)
    plan = core.place([host(0, cores=64, mem=10**6)], requests(20, "base@1"))
    seen: list[str] = []

    def stop(event: dict[str, Any]) -> None:
        seen.append(event["outcome"].vm)
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        provision.deploy(plan, {"pc-0": provision.HostTarget(pc, {"base@1": disk})}, progress=stop)
    assert len(seen) == 1  # progress is not called again once it raised
    # One qemu-img overlay per VM: the deployment stopped long before the 20th.
    assert 1 <= len(pc.list_vms()) < 20


def test_bad_arguments_are_typed_errors(tmp_path: Path) -> None:
    pc = hv.open("memory")
    plan = core.place([host(0)], requests(1, "base@1"))
    with pytest.raises(TypeError):
        provision.deploy(plan, {"pc-0": pc})  # type: ignore[dict-item]
    with pytest.raises(unacloud.InvalidInput):
        provision.HostTarget(pc, {"base@1": "not-a-uuid"})
    with pytest.raises(ValueError):
        provision.deploy(plan, {}, max_attempts=-1)
    with pytest.raises(TypeError):
        provision.deploy(plan, {}, progress=42)  # type: ignore[arg-type]


def test_preload_copies_verifies_and_registers_once(tmp_path: Path) -> None:
    cat, tv = published(tmp_path)
    source = tmp_path / "base.qcow2"
    pc = hv.open("memory")
    events: list[dict[str, Any]] = []
    first = provision.preload(pc, tv, source, tmp_path / "store", progress=events.append)
    assert first["outcome"] == "copied" and first["bytes_copied"] == tv.size_bytes
    assert events and events[-1]["copied"] == events[-1]["total"] == tv.size_bytes
    assert (tmp_path / "store" / tv.file_name).read_bytes() == source.read_bytes()
    assert first["disk"].disk_type == "multiattach"
    again = provision.preload(pc, tv, source, tmp_path / "store")
    assert again["outcome"] == "already-present" and again["disk"].uuid == first["disk"].uuid
    # A store copy that does not match the catalog is refused.
    other = hv.open("memory")
    (tmp_path / "store2").mkdir()
    (tmp_path / "store2" / tv.file_name).write_bytes(b"tampered")
    with pytest.raises(unacloud.UnacloudError):
        provision.preload(other, tv, source, tmp_path / "store2")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_qemu_hosts_get_one_overlay_per_vm(tmp_path: Path) -> None:
    raw = tmp_path / "base.raw"
    raw.write_bytes(bytes(range(256)) * (16 << 12))  # 4 MiB of data, so the overlays are smaller
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(base)], check=True)
    cat = provision.Catalog(tmp_path / "catalog.json")
    tv = cat.add_draft("base", base, bridged_adapter=True)
    cat.publish("base", tv.version)
    targets = {}
    for i in range(2):
        pc = hv.open("qemu", tmp_path / f"pc-{i}")
        disk = provision.preload(pc, tv, base, tmp_path / f"pc-{i}" / "templates")["disk"]
        targets[f"pc-{i}"] = provision.HostTarget(pc, {tv.id: disk})
    plan = core.place([host(0), host(1)], requests(4, tv.id), algorithm="round-robin")
    report = provision.deploy(plan, targets, catalog=cat)
    assert report.created == 4, [o.error for o in report.outcomes]
    for o in report.outcomes:
        pc = targets[o.host].hypervisor
        (disk,) = pc.vm_info(o.vm).disks
        overlay = next(d for d in pc.list_disks() if d.uuid == disk["disk"])
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", overlay.path],
                                         check=True, capture_output=True, text=True).stdout)
        assert Path(info["backing-filename"]).name == tv.file_name
        assert Path(overlay.path).stat().st_size < tv.size_bytes
    assert len(cat.users("base", tv.version)) == 4
    # Running the same plan again with resume keeps the complete VMs.
    again = provision.deploy(plan, targets, resume=True)
    assert again.created == 4


DEPLOY_CHILD = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    from unacloud import core, hv, provision
    root = Path(sys.argv[1])
    base = root / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    pc = hv.open("qemu", root / "pc-0")
    disk = pc.register_disk(base)
    lab = [{"id": "pc-0", "free_cores": 400, "free_memory_mb": 10**7, "free_disk_bytes": 10**12}]
    plan = core.place(lab, [{"name": f"vm{i}", "template": "base@1", "profile": "small"} for i in range(60)])
    try:
        provision.deploy(plan, {"pc-0": provision.HostTarget(pc, {"base@1": disk})},
                         progress=lambda e: print("vm", e["done"], flush=True))
    except KeyboardInterrupt:
        vms = pc.list_vms()
        print("interrupted with", len(vms), "VMs, disks per VM:", sorted({len(v.disks) for v in vms}), flush=True)
        sys.exit(3)
    print("finished", flush=True)
""")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_ctrl_c_cancels_a_deployment_and_rolls_back_what_was_in_progress(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", DEPLOY_CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    first = child.stdout.readline()
    assert first.startswith("vm 1"), first + (child.stderr.read() if child.stderr else "")
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 3, (out, err)
    line = out.strip().splitlines()[-1]
    count = int(line.split("interrupted with")[1].split()[0])
    assert 1 <= count < 60
    assert line.endswith("disks per VM: [1]")  # every VM left is complete; none half-made


def test_the_multiattach_manager_on_the_in_memory_double() -> None:
    pc = hv.open("memory")
    mm = provision.MultiattachManager(pc)
    t = mm.register_template("/t/base-1.qcow2")
    assert t.disk_type == "multiattach"
    vm = mm.create_vm("tm", t, profile="medium")
    assert (vm.cpus, vm.memory_mb) == (2, 2048) and vm.disks[0]["disk"] != t.uuid
    # The double refuses the manager's clone (a linked clone without a snapshot).
    with pytest.raises(unacloud.InvalidInput, match="snapshot"):
        mm.clone_vm("tm", "tm2")
    mm.create_vm("tm2", t)
    assert sorted(mm.template_users(t)) == ["tm", "tm2"]
    with pytest.raises(unacloud.InUse):
        mm.unregister_template(t)
    mm.delete_vm("tm")
    mm.delete_vm(pc.vm_info("tm2"))
    assert mm.template_users(t) == [] and pc.list_vms() == []
    mm.unregister_template(t.uuid)
    assert pc.list_disks() == []
    with pytest.raises(unacloud.NotFound):
        mm.delete_vm("tm")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_the_multiattach_manager_migrates_between_qemu_hosts(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    src, dst = hv.open("qemu", tmp_path / "pc-0"), hv.open("qemu", tmp_path / "pc-1")
    mm = provision.MultiattachManager(src)
    t = mm.register_template(base)
    provision.MultiattachManager(dst).register_template(base)  # preloaded at the destination
    vm = mm.create_vm("tm", t)
    clone = mm.clone_vm(vm, "tm2")
    assert clone.disks[0]["disk"] not in {t.uuid, vm.disks[0]["disk"]}
    assert sorted(mm.template_users(t)) == ["tm", "tm2"]
    mm.delete_vm("tm2")
    moved = mm.migrate("tm", dst, tmp_path / "pc-1" / "vms" / "tm")
    assert moved.name == "tm" and [v.name for v in dst.list_vms()] == ["tm"]
    assert src.list_vms() == []  # the source VM and its own files are gone
    files = dst.vm_files("tm")
    assert files.missing_count == 0 and files.expected_at_destination  # the template is not copied

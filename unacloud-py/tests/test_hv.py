"""unacloud.hv: the in-memory double end to end, QEMU on a blank disk (real processes,
no guest OS), and one real guest when running as root with the reference image."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import unacloud
from unacloud import hv as uhv

REPO = Path(__file__).resolve().parents[2]


# ---- the in-memory double ------------------------------------------------------------


@pytest.fixture()
def mem(tmp_path: Path) -> uhv.Hypervisor:
    return uhv.open("memory", tmp_path)


def test_memory_backend_end_to_end(mem: uhv.Hypervisor, tmp_path: Path) -> None:
    assert mem.backend == "memory" and repr(mem).startswith("<Hypervisor memory")
    base = mem.register_disk(Path("/templates/ubuntu.qcow2"))  # pathlib accepted
    assert base.disk_type == "multiattach" and base.format == "qcow2"
    assert base.to_dict()["uuid"] == base.uuid
    vm = mem.create_vm("web1", template=base, memory_mb=256, cpus=2)
    assert (vm.name, vm.state, vm.memory_mb, vm.cpus) == ("web1", "powered-off", 256, 2)
    # the VM writes to its own differencing child of the template
    assert len(vm.disks) == 1 and vm.disks[0]["disk"] != base.uuid
    assert vm.settings_file is not None and vm.settings_file.startswith(str(tmp_path))
    assert mem.start_vm("web1") is None  # no guest to wait for
    assert mem.vm_info("web1").state == "running"
    mem.pause(vm)
    assert mem.vm_info(vm).state == "paused"
    mem.resume("web1")

    s1 = mem.take_snapshot("web1", "s1", live=True, description="first")
    assert (s1.name, s1.description, s1.is_current, s1.report) == ("s1", "first", True, None)
    assert s1.state_file  # taken while running: with memory
    s2 = mem.take_snapshot("web1", "s2")
    tree = mem.snapshot_tree("web1")
    assert [s.name for s in tree.snapshots] == ["s1", "s2"] and len(tree) == 2
    assert [s.uuid for s in tree.snapshots] == [s1.uuid, s2.uuid]
    assert tree.current == s2 and tree.snapshots[1].parent == s1
    assert s1.uuid in tree.render("text") and tree.render("dot").startswith("digraph")
    assert tree.to_dict()["current"] == s2.uuid

    current = mem.vm_files("web1")
    at_s1 = mem.vm_files("web1", snapshot=s1)
    for files in (current, at_s1):
        assert files.files[0]["role"] == "settings"
        assert [e["uuid"] for e in files.expected_at_destination] == [base.uuid]
        assert base.uuid not in {f["uuid"] for f in files.files}
        assert files.total_bytes == 0  # the double has no files on disk
    assert any(f["role"] == "saved-state" for f in at_s1.files)

    mem.power_off("web1")
    mem.restore_snapshot("web1", s1.uuid)
    assert mem.vm_info("web1").current_snapshot == s1.uuid
    mem.delete_snapshot("web1", s2)
    assert [s.name for s in mem.snapshot_tree("web1").snapshots] == ["s1"]
    mem.start_vm("web1")
    mem.save_state("web1")
    assert mem.vm_info("web1").state == "saved"
    assert [v.name for v in mem.list_vms()] == ["web1"]
    assert base.uuid in {d.uuid for d in mem.list_disks()}
    mem.unregister_vm("web1", delete_files=True)
    assert mem.list_vms() == []


def test_memory_backend_errors_are_typed(mem: uhv.Hypervisor) -> None:
    mem.create_vm("a")
    with pytest.raises(unacloud.NotFound):
        mem.vm_info("nope")
    with pytest.raises(LookupError):
        mem.start_vm("nope")
    with pytest.raises(unacloud.AlreadyExists):
        mem.create_vm("a")
    with pytest.raises(unacloud.InvalidState):
        mem.pause("a")  # not running
    mem.start_vm("a")
    mem.take_snapshot("a", "same")
    mem.take_snapshot("a", "same")
    mem.power_off("a")
    with pytest.raises(unacloud.AmbiguousName) as e:
        mem.restore_snapshot("a", "same")
    assert all(s.uuid in str(e.value) for s in mem.snapshot_tree("a").snapshots)
    with pytest.raises(unacloud.NotFound):
        mem.vm_files("a", snapshot="no such snapshot")
    with pytest.raises(unacloud.InvalidInput):
        uhv.open("xen")
    with pytest.raises(unacloud.InvalidInput):
        uhv.open("qemu")  # needs a root
    with pytest.raises(unacloud.InvalidInput):
        mem.create_vm("b", profile="huge")
    with pytest.raises(ValueError):
        mem.create_vm("b", net="carrier-pigeon")
    assert [v.name for v in mem.list_vms()] == ["a"]  # nothing half-made


def test_a_failed_step_after_creation_removes_the_vm(mem: uhv.Hypervisor) -> None:
    with pytest.raises(unacloud.NotFound):
        mem.create_vm("c", template="4b2c6a1e-0000-4000-8000-000000000000")
    assert mem.list_vms() == []


def test_bad_arguments(mem: uhv.Hypervisor) -> None:
    with pytest.raises(unacloud.InvalidInput, match="memory_mb must be a non-negative integer, got -5"):
        mem.create_vm("x", memory_mb=-5)
    with pytest.raises(ValueError) as e:
        mem.create_vm("x", cpus=-1)
    assert not isinstance(e.value, OverflowError)
    with pytest.raises(TypeError, match="cpus"):
        mem.create_vm("x", cpus="2")
    with pytest.raises(TypeError, match="vm must be a name"):
        mem.start_vm(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="snapshot must be"):
        mem.restore_snapshot("x", 3.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mem.create_vm("x", template=12)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mem.start_vm("x", wait_guest="yes")  # type: ignore[arg-type]
    with pytest.raises(unacloud.InvalidInput):
        mem.start_vm("x", wait_guest=-1.0)
    assert mem.list_vms() == []


def test_virtualbox_is_refused_clearly_where_it_is_not_installed() -> None:
    if shutil.which("VBoxManage") or shutil.which("vboxmanage"):
        hv = uhv.open("virtualbox")
        assert hv.backend == "virtualbox"
        return
    with pytest.raises(unacloud.Unsupported, match="VirtualBox is not installed"):
        uhv.open("virtualbox")


# ---- QEMU on a blank disk: real processes, no guest OS --------------------------------

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
    reason="needs qemu-system-x86_64 and qemu-img",
)


def blank_disk(dir: Path) -> Path:
    img = dir / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    return img


@needs_qemu
def test_qemu_backend_on_a_blank_disk(tmp_path: Path) -> None:
    hv = uhv.open("qemu", tmp_path / "root", accel="tcg")
    assert hv.backend == "qemu" and hv.root == str((tmp_path / "root").resolve())
    with pytest.raises(FileNotFoundError) as e:
        hv.register_disk(tmp_path / "absent.qcow2")
    assert isinstance(e.value, unacloud.UnacloudError)
    assert e.value.errno == 2 and e.value.filename == str(tmp_path / "absent.qcow2")
    with pytest.raises(FileNotFoundError):
        hv.register_disk(blank_disk(tmp_path), kernel=tmp_path / "no-vmlinuz")
    base = hv.register_disk(tmp_path / "blank.qcow2", multiattach=True)
    assert base.disk_type == "multiattach"
    hv.create_vm("blank", template=base, memory_mb=64, cpus=1, net="none")
    try:
        report = hv.start_vm("blank", wait_guest=False)  # the firmware finds nothing to boot
        assert report is not None and report["accel"] == "tcg" and report["pid"] > 0
        assert hv.vm_info("blank").state == "running"
        snap = hv.take_snapshot("blank", "s1", live=True)
        assert snap.report is not None and snap.report["with_memory"]
        assert snap.report["downtime_ms"] >= 0 and snap.report["state_bytes"] > 0
        hv.power_off("blank")
        files = hv.vm_files("blank", snapshot=snap)
        roles = [f["role"] for f in files.files]
        assert roles[0] == "settings" and "disk" in roles and "saved-state" in roles
        assert files.total_bytes == sum(f["bytes"] for f in files.files)
        assert [e["uuid"] for e in files.expected_at_destination] == [base.uuid]
        hv.restore_snapshot("blank", snap)
        assert hv.vm_info("blank").state == "saved"
        assert hv.snapshot_tree("blank").current == snap
    finally:
        if hv.vm_info("blank").state in ("running", "paused"):
            hv.power_off("blank")


@needs_qemu
def test_a_long_call_releases_the_gil_and_ctrl_c_interrupts_it(tmp_path: Path) -> None:
    """start_vm waits for a heartbeat that never comes: other threads run meanwhile, and
    SIGINT raises KeyboardInterrupt within a second."""
    script = textwrap.dedent(
        f"""
        import threading, time, unacloud
        hv = unacloud.hv.open("qemu", {str(tmp_path / "root")!r}, accel="tcg")
        d = hv.register_disk({str(blank_disk(tmp_path))!r})
        hv.create_vm("blank", template=d, memory_mb=64, cpus=1)
        ticks = []
        def tick():
            while True:
                ticks.append(1)
                time.sleep(0.01)
        threading.Thread(target=tick, daemon=True).start()
        print("waiting", flush=True)
        try:
            hv.start_vm("blank", wait_guest=60)
        except KeyboardInterrupt:
            print("interrupted", time.monotonic(), len(ticks), flush=True)
        hv.power_off("blank")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(2.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline().split()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert line[0] == "interrupted", line
    assert float(line[1]) - sent < 1.0
    assert int(line[2]) > 50  # the ticker ran while the call waited


# ---- one real guest (root, reference image) ------------------------------------------


def guest_dir() -> Path:
    return Path(os.environ.get("UNACLOUD_GUEST_DIR", REPO / "target" / "guest"))


def guest_or_skip() -> Path:
    if os.geteuid() != 0:
        pytest.skip("booting the reference guest runs only as root")
    g = guest_dir()
    missing = [n for n in ("vmlinuz", "initrd.img", "rootfs.qcow2") if not (g / n).is_file()]
    if missing or shutil.which("qemu-system-x86_64") is None:
        pytest.skip(f"needs qemu-system-x86_64 and the guest image in {g} (run ./scripts/guest-image)")
    return g


def test_qemu_boots_one_reference_guest(tmp_path: Path) -> None:
    g = guest_or_skip()
    root = tmp_path / "host"
    (root / "templates").mkdir(parents=True)
    template = root / "templates" / "rootfs.qcow2"
    shutil.copy(g / "rootfs.qcow2", template)
    hv = uhv.open("qemu", root, accel="tcg")
    base = hv.register_disk(template, kernel=g / "vmlinuz", initrd=g / "initrd.img", cmdline="quiet")
    hv.create_vm("tm", template=base, memory_mb=128, cpus=1)
    try:
        started = hv.start_vm("tm", wait_guest=90.0)
        assert started is not None and started["boot_ms"] is not None
        assert started["first_heartbeat"] is not None
        snap = hv.take_snapshot("tm", "booted", live=True)
        assert snap.report is not None and snap.report["with_memory"]
        hv.power_off("tm")
        hv.restore_snapshot("tm", "booted")
        again = hv.start_vm("tm", wait_guest=90.0)
        assert again is not None and again["resumed_state"]
    finally:
        if hv.vm_info("tm").state in ("running", "paused"):
            hv.power_off("tm")


def test_calls_from_threads_share_one_hypervisor(mem: uhv.Hypervisor) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            mem.create_vm(f"vm{i}")
            mem.start_vm(f"vm{i}")
            mem.take_snapshot(f"vm{i}", "s")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v.name for v in mem.list_vms()) == sorted(f"vm{i}" for i in range(8))

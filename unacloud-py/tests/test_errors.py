"""Exceptions: typed, cached, OSError attributes for files, ValueError for negative
numbers, TypeError for wrong types, and pathlib paths wherever a path is taken."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import unacloud
from unacloud import core, snapshot


def test_a_missing_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    absent = tmp_path / "absent.vbox"
    with pytest.raises(FileNotFoundError) as e:
        unacloud.vbox.Machine.load(absent)  # a pathlib.Path
    assert isinstance(e.value, unacloud.UnacloudError) and isinstance(e.value, unacloud.IoError)
    assert isinstance(e.value, unacloud.FileNotFound)
    assert e.value.errno == errno.ENOENT and e.value.filename == str(absent)
    with pytest.raises(FileNotFoundError) as e2:
        unacloud.vbox.read_vdi_header(tmp_path / "absent.vdi")
    assert e2.value.filename == str(tmp_path / "absent.vdi")


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: core.file_count(-1, 2), "disks"),
        (lambda: core.file_count(1, -2), "snapshots"),
        (lambda: core.file_count(1, 2, vms=-3), "vms"),
        (lambda: core.transfer_estimate(-1, 1, 1, snapshots=1), "base_bytes"),
        (lambda: core.transfer_estimate(1, 1, 1, snapshots=2, snapshot=-1), "snapshot"),
        (lambda: core.place([], [], seed=-1), "seed"),
        (lambda: snapshot.simulate_ring(nodes=-4), "nodes"),
        (lambda: snapshot.simulate_ring(tokens=-1), "tokens"),
        (lambda: snapshot.simulate_ring(crash_at=-1), "crash_at"),
        (lambda: snapshot.Coordinator(cluster=-1, participants=[1]), "cluster"),
        (lambda: snapshot.Coordinator(cluster=1, participants=[1, -2]), "participants[1]"),
        (lambda: snapshot.Participant(cluster=1, id=-1), "id"),
        (lambda: snapshot.Coordinator(1, [1]).handle_action_complete(0.0, -1), "action_id"),
        (lambda: snapshot.Coordinator(1, [1]).start_resume(0.0, gs=-1), "gs"),
    ],
)
def test_negative_numbers_are_the_packages_value_error(call, name: str) -> None:
    with pytest.raises(unacloud.InvalidInput) as e:
        call()
    assert isinstance(e.value, ValueError) and not isinstance(e.value, OverflowError)
    assert str(e.value).startswith(f"{name} must be a non-negative integer"), str(e.value)


def test_too_large_numbers_say_the_limit() -> None:
    with pytest.raises(unacloud.InvalidInput, match="at most 4294967295"):
        core.file_count(2**40, 1)
    with pytest.raises(unacloud.InvalidInput, match="too large"):
        snapshot.simulate_ring(tokens=2**70)


@pytest.mark.parametrize(
    "call",
    [
        lambda: core.file_count("1", 2),
        lambda: core.file_count(1.5, 2),
        lambda: core.file_count(True, 2),
        lambda: snapshot.Coordinator(1, "12"),
        lambda: snapshot.Coordinator(1, [1, "2"]),
        lambda: snapshot.simulate_ring(nodes=None),
        lambda: unacloud.vbox.Machine.load(42),
    ],
)
def test_wrong_types_are_clear_type_errors(call) -> None:
    with pytest.raises(TypeError) as e:
        call()
    assert "expected" in str(e.value) or "must be" in str(e.value), str(e.value)


def test_exception_classes_are_looked_up_once() -> None:
    hv = unacloud.hv.open("memory")
    with pytest.raises(unacloud.NotFound):
        hv.vm_info("a")
    original = unacloud.errors.NotFound

    class Impostor(Exception):
        pass

    unacloud.errors.NotFound = Impostor  # type: ignore[misc]
    try:
        with pytest.raises(original):
            hv.vm_info("a")
    finally:
        unacloud.errors.NotFound = original  # type: ignore[misc]


def test_hierarchy() -> None:
    assert issubclass(unacloud.FileNotFound, FileNotFoundError)
    assert issubclass(unacloud.FileNotFound, unacloud.IoError)
    assert issubclass(unacloud.AccessDenied, PermissionError)
    assert issubclass(unacloud.InvalidInput, ValueError)
    assert "FileNotFound" in unacloud.__all__

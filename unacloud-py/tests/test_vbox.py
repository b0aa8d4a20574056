"""unacloud.vbox against the real VirtualBox files and hostile input."""

from __future__ import annotations

import json
import pickle
import shutil
import uuid
from pathlib import Path

import pytest

import unacloud
from unacloud.vbox import Machine


def test_every_real_fixture_loads(vbox_fixtures: list[Path]) -> None:
    for path in vbox_fixtures:
        m = Machine.load(str(path))
        assert m.name
        uuid.UUID(m.uuid)
        assert repr(m).startswith("<Machine ")
        tree = json.loads(m.snapshot_tree("json"))
        assert set(tree) == {"current", "snapshots"}
        assert m.snapshot_tree("dot").startswith("digraph")
        files = m.all_files()
        assert files[0]["role"] == "settings"
        # every snapshot's migration set is a subset of all files
        every = {f["path"] for f in files}
        for s in m.snapshots:
            for f in m.migration_set(s.uuid).files:
                assert f["path"] in every, (path.name, s.name, f["path"])


def test_acceptance_one_liner(kali: Path) -> None:
    m = unacloud.vbox.Machine.load(str(kali))
    total = m.migration_set("current").total_bytes
    assert isinstance(total, int) and total > 0  # the .vbox itself exists


def test_the_readme_one_liner_works_on_every_fixture(vbox_fixtures: list[Path]) -> None:
    without_snapshots = 0
    for path in vbox_fixtures:
        m = Machine.load(str(path))
        if m.current_snapshot is None:
            without_snapshots += 1
        ms = m.migration_set("current")  # what the READMEs show
        assert ms.files[0]["role"] == "settings"
        # total_bytes counts the files that are present; the others are counted apart
        present = [f for f in ms.files if f["bytes"] is not None]
        assert ms.total_bytes == sum(f["bytes"] for f in present)
        assert ms.missing_count == len(ms.files) - len(present) == len(ms.missing)
        assert ms.to_dict()["missing_count"] == ms.missing_count
    assert without_snapshots > 0, "the fixtures include machines without snapshots"


def test_missing_files_are_counted_not_hidden(kali: Path) -> None:
    m = Machine.load(str(kali))  # the fixture's disks are not there, only the .vbox
    ms = m.migration_set("current")
    assert ms.missing_count > 0 and len(ms.missing) == ms.missing_count
    assert ms.total_bytes == Path(ms.files[0]["path"]).stat().st_size
    assert "missing, not counted" in repr(ms)


def test_machine_and_migration_set_as_plain_data_tables_and_pickles(kali: Path) -> None:
    pd = pytest.importorskip("pandas")
    m = Machine.load(str(kali))
    d = m.to_dict()
    assert (d["name"], d["uuid"], d["expected_file_count"]) == (m.name, m.uuid, m.expected_file_count)
    assert [s["uuid"] for s in d["snapshots"]] == [s.uuid for s in m.snapshots]
    assert d["current_snapshot"] == m.current_snapshot.uuid
    json.dumps(d)
    ms = m.migration_set("current")
    df = pd.DataFrame(ms)
    assert list(df.columns) == ["path", "role", "uuid", "bytes"] and len(df) == len(ms)
    assert list(df["path"]) == [f["path"] for f in ms.files]
    assert df.equals(ms.to_pandas())
    assert pd.DataFrame(ms.to_dict()["files"]).equals(df)
    back = pickle.loads(pickle.dumps(ms))
    assert back == ms and back.to_dict() == ms.to_dict() and back.total_bytes == ms.total_bytes


def test_snapshot_nodes_form_the_tree(kali: Path) -> None:
    m = Machine.load(str(kali))
    snaps = m.snapshots
    assert len(snaps) == 10
    roots = [s for s in snaps if s.parent is None]
    assert len(roots) == 1
    for s in snaps:
        for c in s.children:
            assert c.parent == s
        assert s.to_dict()["uuid"] == s.uuid
    cur = m.current_snapshot
    assert cur is not None and cur in snaps
    assert "*" in m.snapshot_tree("text")


def test_migration_set_sizes_follow_the_files_on_disk(kali: Path, tmp_path: Path) -> None:
    vm = tmp_path / "kali"
    vm.mkdir()
    shutil.copy(kali, vm / kali.name)
    m = Machine.load(str(vm / kali.name))
    sizes = {}
    for i, f in enumerate(m.all_files()):
        p = Path(f["path"])
        if f["role"] == "settings":
            sizes[str(p)] = p.stat().st_size
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:  # sparse: only the length is set
            fh.truncate(1_000_000 * (i + 1))
        sizes[str(p)] = 1_000_000 * (i + 1)
    m = Machine.load(str(vm / kali.name))
    for s in m.snapshots + ["current"]:
        sel = s if isinstance(s, str) else s
        ms = m.migration_set(sel)
        assert ms.total_bytes == sum(sizes[f["path"]] for f in ms.files)
        assert all(f["bytes"] is not None for f in ms.files)
        d = ms.to_dict()
        assert d["total_bytes"] == ms.total_bytes and len(ms) == len(d["files"])
    # files no state needs are never in a migration set
    unneeded = {f["path"] for f in m.unneeded_files()}
    for s in m.snapshots:
        assert not unneeded & {f["path"] for f in m.migration_set(s).files}


def test_preloaded_base_is_expected_at_destination(kali: Path) -> None:
    m = Machine.load(str(kali))
    full = m.migration_set("current")
    base = next(f for f in reversed(full.files) if f["role"] == "disk")
    disks = [f for f in full.files if f["role"] == "disk"]
    # the base image is the chain's last ancestor: preloading it removes it from the set
    base_uuid = disks[0]["uuid"] if len(disks) else base["uuid"]
    pre = m.migration_set("current", preloaded=[base_uuid])
    assert base_uuid in {e["uuid"] for e in pre.expected_at_destination}
    assert base_uuid not in {f["uuid"] for f in pre.files}
    assert len(pre.files) < len(full.files)


def test_unknown_and_ambiguous_snapshots(kali: Path) -> None:
    m = Machine.load(str(kali))
    with pytest.raises(unacloud.NotFound):
        m.migration_set("no such snapshot")
    with pytest.raises(LookupError):
        m.migration_set(str(uuid.uuid4()))
    with pytest.raises(unacloud.InvalidInput):
        m.migration_set("current", preloaded=["not-a-uuid"])
    with pytest.raises(ValueError):
        m.snapshot_tree("svg")


def test_ambiguous_names_list_the_candidates(vbox_fixtures: list[Path]) -> None:
    found = False
    for path in vbox_fixtures:
        m = Machine.load(str(path))
        names = [s.name for s in m.snapshots]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is None:
            continue
        found = True
        with pytest.raises(unacloud.AmbiguousName) as e:
            m.migration_set(dup)
        for s in m.snapshots:
            if s.name == dup:
                assert s.uuid in str(e.value)
    assert found, "the fixtures include repeated snapshot names"


@pytest.mark.parametrize(
    "content, exc",
    [
        ("", unacloud.ParseError),
        ("<NotVirtualBox/>", unacloud.ParseError),
        ('<?xml version="1.0"?><VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux"><Machine', unacloud.ParseError),
        ("\x00\x01\x02binary", unacloud.ParseError),
    ],
)
def test_hostile_files_raise_typed_errors(tmp_path: Path, content: str, exc: type) -> None:
    p = tmp_path / "bad.vbox"
    p.write_text(content)
    with pytest.raises(exc):
        Machine.load(str(p))


def test_huge_attribute_is_refused_not_swallowed(tmp_path: Path) -> None:
    p = tmp_path / "huge.vbox"
    p.write_text(
        '<?xml version="1.0"?><VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">'
        f'<Machine uuid="{{{uuid.uuid4()}}}" name="{"x" * 20_000_000}" OSType="Linux"/></VirtualBox>'
    )
    with pytest.raises(unacloud.ParseError):
        Machine.load(str(p))


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Machine.load(str(tmp_path / "absent.vbox"))
    with pytest.raises(unacloud.UnacloudError):
        unacloud.vbox.read_vdi_header(str(tmp_path / "absent.vdi"))


def test_read_vdi_header_of_a_real_image(tmp_path: Path) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img is not installed")
    import subprocess

    img = tmp_path / "disk.vdi"
    subprocess.run([qemu_img, "create", "-q", "-f", "vdi", str(img), "64M"], check=True)
    h = unacloud.vbox.read_vdi_header(str(img))
    assert h["disk_size"] == 64 * 1024 * 1024
    assert h["parent_uuid"] is None
    uuid.UUID(h["uuid"])
    bad = tmp_path / "bad.vdi"
    bad.write_bytes(b"\0" * 1024)
    with pytest.raises(unacloud.ParseError):
        unacloud.vbox.read_vdi_header(str(bad))

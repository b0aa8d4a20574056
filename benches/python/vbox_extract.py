#!/usr/bin/env python3
"""Plain-Python baseline for the VirtualBox settings benchmark.

Parses a .vbox file with xml.etree.ElementTree and does the same extraction the Rust
bench times: the media registry (uuid, location, differencing parent), the snapshot
tree (uuid, name, parent, stateFile, attached hard disks; StorageControllers inside or
beside Hardware), and the migration set of the current state (settings file, the chain
of every attached hard disk up to its base, the machine's stateFile).

Usage: vbox_extract.py FILE [ITERATIONS]
Prints one JSON object: median and minimum seconds per parse+extract, bytes, and what was found
(so the caller can check both sides extracted the same thing).
"""
import json
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET


def local(tag):
    return tag.rsplit("}", 1)[-1]


def attached_disks(state):
    """Image uuids of hard disks attached in a Machine or Snapshot element."""
    out = []
    for child in state:
        name = local(child.tag)
        if name == "Hardware":
            controllers = [c for c in child if local(c.tag) == "StorageControllers"]
        elif name == "StorageControllers":
            controllers = [child]
        else:
            continue
        for scs in controllers:
            for sc in scs:
                for dev in sc:
                    if local(dev.tag) != "AttachedDevice" or dev.get("type") != "HardDisk":
                        continue
                    for img in dev:
                        if local(img.tag) == "Image":
                            out.append(img.get("uuid"))
    return out


def extract(path):
    root = ET.parse(path).getroot()
    machine = next(c for c in root if local(c.tag) == "Machine")
    disks = {}
    stack = []
    for c in machine:
        if local(c.tag) == "MediaRegistry":
            for hds in c:
                if local(hds.tag) == "HardDisks":
                    stack.extend((hd, None) for hd in hds if local(hd.tag) == "HardDisk")
    while stack:
        el, parent = stack.pop()
        uuid = el.get("uuid")
        disks[uuid] = (el.get("location"), parent)
        stack.extend((c, uuid) for c in el if local(c.tag) == "HardDisk")
    snapshots = {}
    stack = [(c, None) for c in machine if local(c.tag) == "Snapshot"]
    while stack:
        el, parent = stack.pop()
        uuid = el.get("uuid")
        snapshots[uuid] = {
            "name": el.get("name"),
            "parent": parent,
            "state_file": el.get("stateFile"),
            "disks": attached_disks(el),
        }
        for c in el:
            if local(c.tag) == "Snapshots":
                stack.extend((s, uuid) for s in c if local(s.tag) == "Snapshot")
    # Migration set of the current state.
    folder = os.path.dirname(os.path.abspath(path))
    files = [os.path.abspath(path)]
    for uuid in attached_disks(machine):
        chain = []
        while uuid is not None:
            location, parent = disks[uuid]
            chain.append(os.path.normpath(os.path.join(folder, location)))
            uuid = parent
        for f in reversed(chain):
            if f not in files:
                files.append(f)
    if machine.get("stateFile"):
        files.append(os.path.normpath(os.path.join(folder, machine.get("stateFile"))))
    return {"snapshots": len(snapshots), "hard_disks": len(disks), "migration_files": len(files)}


def main():
    path = sys.argv[1]
    iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    times = []
    found = None
    for _ in range(iterations):
        start = time.perf_counter()
        found = extract(path)
        times.append(time.perf_counter() - start)
    size = os.path.getsize(path)
    median = statistics.median(times)
    print(json.dumps({
        "python": sys.version.split()[0],
        "iterations": iterations,
        "median_seconds": median,
        "min_seconds": min(times),
        "bytes": size,
        "mb_per_s": size / median / 1e6,
        **found,
    }))


if __name__ == "__main__":
    main()

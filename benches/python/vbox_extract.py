#!/usr/bin/env python3
"""Plain-Python baseline for the VirtualBox settings benchmark.

Parses a .vbox file with xml.etree.ElementTree and extracts what the Rust parser
extracts: the machine's identity and attributes; for the current state and every
snapshot the CPU count, memory, network adapters (with their attachment) and storage
controllers with their attached devices (StorageControllers inside or beside
Hardware); the media registry (hard disks nested by differencing parent with format,
type and location; DVD and floppy images); the snapshot tree (uuid, name, time stamp,
description, stateFile, parent); then the migration set of the current state (settings
file, the chain of every attached hard disk up to its base, the machine's stateFile).

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


def flag(el, name):
    value = el.get(name)
    return None if value is None else value == "true"


def number(el, name):
    value = el.get(name)
    return None if value is None else int(value)


def description(el):
    for c in el:
        if local(c.tag) == "Description":
            return c.text or ""
    return None


NETWORK_MODES = {
    "NAT", "NATNetwork", "BridgedInterface", "HostInterface", "InternalNetwork",
    "HostOnlyInterface", "GenericInterface", "HostOnlyNetwork", "CloudNetwork",
}


def controllers(scs):
    out = []
    for sc in scs:
        if local(sc.tag) != "StorageController":
            continue
        devices = []
        for dev in sc:
            if local(dev.tag) != "AttachedDevice":
                continue
            image = None
            for img in dev:
                if local(img.tag) == "Image":
                    image = img.get("uuid")
            host_drive = None
            for drive in dev:
                if local(drive.tag) == "HostDrive":
                    host_drive = drive.get("src")
            devices.append({
                "type": dev.get("type"),
                "host_drive": host_drive,
                "port": number(dev, "port") or 0,
                "device": number(dev, "device") or 0,
                "image": image,
                "passthrough": flag(dev, "passthrough"),
                "nonrotational": flag(dev, "nonrotational"),
                "hotpluggable": flag(dev, "hotpluggable"),
            })
        out.append({
            "name": sc.get("name"),
            "type": sc.get("type"),
            "port_count": number(sc, "PortCount"),
            "bootable": flag(sc, "Bootable"),
            "devices": devices,
        })
    return out


def hardware(state):
    """CPU count, memory, network adapters and storage controllers of a Machine or
    Snapshot element (StorageControllers inside Hardware from 1.17, beside it before)."""
    hw = {"cpus": 1, "memory": None, "adapters": [], "controllers": []}
    for child in state:
        name = local(child.tag)
        if name == "StorageControllers":
            hw["controllers"].extend(controllers(child))
        if name != "Hardware":
            continue
        for part in child:
            kind = local(part.tag)
            if kind == "CPU":
                hw["cpus"] = number(part, "count") or 1
            elif kind == "Memory":
                hw["memory"] = number(part, "RAMSize")
            elif kind == "StorageControllers":
                hw["controllers"].extend(controllers(part))
            elif kind == "Network":
                for a in part:
                    if local(a.tag) != "Adapter":
                        continue
                    attachment = None
                    for mode in a:
                        if local(mode.tag) in NETWORK_MODES:
                            attachment = (local(mode.tag), mode.get("name") or mode.get("driver"))
                    hw["adapters"].append({
                        "slot": number(a, "slot"),
                        "enabled": flag(a, "enabled"),
                        "mac": a.get("MACAddress"),
                        "type": a.get("type"),
                        "cable": flag(a, "cable"),
                        "attachment": attachment,
                    })
    return hw


def attached_disks(hw):
    """Image uuids of the hard disks attached in a state's hardware."""
    return [d["image"] for c in hw["controllers"] for d in c["devices"]
            if d["type"] == "HardDisk" and d["image"] is not None]


def extract(path):
    root = ET.parse(path).getroot()
    machine = next(c for c in root if local(c.tag) == "Machine")
    info = {
        "version": root.get("version"),
        "namespace": root.tag[1:].split("}")[0] if root.tag.startswith("{") else None,
        "uuid": machine.get("uuid"),
        "name": machine.get("name"),
        "os_type": machine.get("OSType"),
        "current_snapshot": machine.get("currentSnapshot"),
        "snapshot_folder": machine.get("snapshotFolder"),
        "state_file": machine.get("stateFile"),
        "last_state_change": machine.get("lastStateChange"),
        "current_state_modified": flag(machine, "currentStateModified"),
        "aborted": flag(machine, "aborted"),
        "description": description(machine),
        "hardware": hardware(machine),
    }
    disks = {}
    images = []
    stack = []
    for c in machine:
        if local(c.tag) == "MediaRegistry":
            for group in c:
                kind = local(group.tag)
                if kind == "HardDisks":
                    stack.extend((hd, None) for hd in group if local(hd.tag) == "HardDisk")
                elif kind in ("DVDImages", "FloppyImages"):
                    images.extend((kind, i.get("uuid"), i.get("location"), i.get("format"))
                                  for i in group if local(i.tag) == "Image")
    while stack:
        el, parent = stack.pop()
        uuid = el.get("uuid")
        disks[uuid] = {
            "location": el.get("location"),
            "format": el.get("format"),
            "type": el.get("type"),
            "auto_reset": flag(el, "autoReset"),
            "description": description(el),
            "parent": parent,
        }
        stack.extend((c, uuid) for c in el if local(c.tag) == "HardDisk")
    snapshots = {}
    stack = [(c, None) for c in machine if local(c.tag) == "Snapshot"]
    while stack:
        el, parent = stack.pop()
        uuid = el.get("uuid")
        snapshots[uuid] = {
            "name": el.get("name"),
            "time_stamp": el.get("timeStamp"),
            "description": description(el),
            "parent": parent,
            "state_file": el.get("stateFile"),
            "hardware": hardware(el),
        }
        for c in el:
            if local(c.tag) == "Snapshots":
                stack.extend((s, uuid) for s in c if local(s.tag) == "Snapshot")
    # Migration set of the current state.
    folder = os.path.dirname(os.path.abspath(path))
    files = [os.path.abspath(path)]
    for uuid in attached_disks(info["hardware"]):
        chain = []
        while uuid is not None:
            disk = disks[uuid]
            chain.append(os.path.normpath(os.path.join(folder, disk["location"])))
            uuid = disk["parent"]
        for f in reversed(chain):
            if f not in files:
                files.append(f)
    if info["state_file"]:
        files.append(os.path.normpath(os.path.join(folder, info["state_file"])))
    states = [info["hardware"]] + [s["hardware"] for s in snapshots.values()]
    return {
        "snapshots": len(snapshots),
        "hard_disks": len(disks),
        "adapters": sum(len(h["adapters"]) for h in states),
        "controllers": sum(len(h["controllers"]) for h in states),
        "devices": sum(len(c["devices"]) for h in states for c in h["controllers"]),
        "migration_files": len(files),
    }


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

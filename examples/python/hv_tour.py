#!/usr/bin/env python3
"""A tour of unacloud.hv: a template, a VM on it, a live snapshot, a restore and the
files another host would need -- on the in-memory double by default, or on real QEMU
VMs with --qemu ROOT --guest DIR (the reference guest image from scripts/guest-image).

    python3 examples/python/hv_tour.py
    python3 examples/python/hv_tour.py --qemu /tmp/unacloud-host --guest target/guest
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import unacloud


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qemu", type=Path, metavar="ROOT", help="run real VMs under this host root")
    ap.add_argument("--guest", type=Path, metavar="DIR", help="the guest image (vmlinuz, initrd.img, rootfs.qcow2)")
    args = ap.parse_args()

    if args.qemu:
        if not args.guest:
            ap.error("--qemu needs --guest DIR")
        hv = unacloud.hv.open("qemu", args.qemu)
        (args.qemu / "templates").mkdir(parents=True, exist_ok=True)
        template = args.qemu / "templates" / "rootfs.qcow2"
        if not template.exists():
            shutil.copy(args.guest / "rootfs.qcow2", template)
        base = hv.register_disk(template, kernel=args.guest / "vmlinuz", initrd=args.guest / "initrd.img")
    else:
        hv = unacloud.hv.open("memory")
        base = hv.register_disk("/templates/ubuntu.qcow2")
    print(f"{hv!r}: template {base.uuid} ({base.disk_type})")

    vm = hv.create_vm("tour", template=base, memory_mb=128, cpus=1)
    try:
        started = hv.start_vm(vm)
        if started is not None:
            print(f"booted in {started['boot_ms']} ms with {started['accel']}")
        s1 = hv.take_snapshot(vm, "s1", live=True)
        if s1.report is not None:
            print(f"live snapshot: guest paused {s1.report['downtime_ms']:.1f} ms")
        hv.power_off(vm)
        hv.restore_snapshot(vm, s1)
        print(hv.snapshot_tree(vm).render("text"), end="")
        files = hv.vm_files(vm, snapshot=s1)
        for f in files.files:
            print(f"  {f['role']:<12} {f['bytes'] if f['bytes'] is not None else '-':>10}  {f['path']}")
        print(f"{len(files)} files, {files.total_bytes} bytes to copy; "
              f"{len(files.expected_at_destination)} template(s) expected at the destination")
    finally:
        if hv.vm_info(vm).state in ("running", "paused"):
            hv.power_off(vm)
        hv.unregister_vm(vm, delete_files=True)
    print("tour done")


if __name__ == "__main__":
    main()

"""Hypervisors from Python, over unacloud-core's ``Hypervisor`` trait.

:func:`open` returns a :class:`Hypervisor` for one backend:

* ``"qemu"`` runs real VMs (``qemu-system-x86_64``, KVM where it works, else TCG) under
  a host root folder;
* ``"memory"`` is the in-memory double: the reference semantics of the trait, no files,
  no guests -- for your own tests;
* ``"virtualbox"`` drives ``VBoxManage``; where VirtualBox is not installed,
  :func:`open` raises :class:`~unacloud.Unsupported` saying so.

Every call releases the GIL while the backend works and can be interrupted with
Ctrl-C (``KeyboardInterrupt`` within about 0.1 s; the operation is cancelled).

Python methods and the trait methods they call:

==========================================  ============================================
``register_disk(path, multiattach=True)``   ``register_disk`` + ``set_disk_type``
                                            (MultiAttach); qemu ``set_boot_files`` with
                                            ``kernel=``
``create_vm(name, template=, ...)``         ``create_vm`` + ``attach_disk`` (SATA 0:0);
                                            qemu ``set_vm_network`` with ``net=``
``start_vm(vm, wait_guest=True)``           qemu ``start_vm_with``; others ``start_vm``
                                            (headless)
``take_snapshot(vm, name, live=True)``      qemu ``take_snapshot_with``; others
                                            ``take_snapshot``
``vm_files(vm)`` / ``vm_files(vm, snapshot=)``  ``vm_files`` / ``snapshot_files``
``power_off``, ``pause``, ``resume``,       the trait methods of the same names
``save_state``, ``restore_snapshot``,
``delete_snapshot``, ``snapshot_tree``,
``list_vms``, ``vm_info``, ``list_disks``,
``unregister_vm``
==========================================  ============================================

>>> import unacloud
>>> hv = unacloud.hv.open("memory")
>>> base = hv.register_disk("/templates/ubuntu.qcow2")
>>> vm = hv.create_vm("web1", template=base, memory_mb=256, cpus=1)
>>> hv.start_vm("web1")
>>> s1 = hv.take_snapshot("web1", "s1")
>>> [s.name for s in hv.snapshot_tree("web1").snapshots]
['s1']
>>> hv.vm_files("web1", snapshot=s1).expected_at_destination[0]["uuid"] == base.uuid
True
"""

from __future__ import annotations

from ._native import Disk, Hypervisor, SnapshotNode, SnapshotTree, VmInfo, open

__all__ = ["Disk", "Hypervisor", "SnapshotNode", "SnapshotTree", "VmInfo", "open"]

"""Provisioning VMs from multiattach templates (thesis ch. 4).

* :class:`Catalog` -- the versioned template catalog (one JSON file): add a draft from
  an image, publish, deprecate, and track which VMs use which version;
* :func:`preload` -- copy a template's image onto a host ahead of time, verify it and
  register it there as a multiattach disk (resumable after an interruption);
* :class:`MultiattachManager` -- the Multiattach Manager's seven all-or-nothing
  operations on one host: register a template, create, clone, replicate, migrate and
  delete VMs built from it, unregister it (refused while VMs use it);
* :func:`deploy` -- execute a :class:`~unacloud.core.Placement` on hosts
  (:class:`HostTarget`: a hypervisor from :func:`unacloud.hv.open` plus its preloaded
  templates) and get a :class:`DeploymentReport` with one :class:`VmOutcome` per VM.

The same code provisions with the in-memory double (``unacloud.hv.open("memory")``),
with QEMU (``unacloud.hv.open("qemu", root)``: every VM gets its own qcow2 overlay of
the template, which needs only ``qemu-img``, no root) and with VirtualBox.

>>> import unacloud
>>> from unacloud import core, hv, provision
>>> pc = hv.open("memory")
>>> base = pc.register_disk("/templates/base-1.qcow2")
>>> target = provision.HostTarget(pc, {"base@1": base})
>>> plan = core.place(
...     [{"id": "pc-1", "free_cores": 4, "free_memory_mb": 8192, "free_disk_bytes": 10**12}],
...     [{"name": f"vm{i}", "template": "base@1", "profile": "small"} for i in range(3)],
... )
>>> report = provision.deploy(plan, {"pc-1": target})
>>> report.created, [o.result for o in report.outcomes]
(3, ['created', 'created', 'created'])
"""

from __future__ import annotations

from ._native import (
    Catalog,
    DeploymentReport,
    HostTarget,
    MultiattachManager,
    TemplateVersion,
    VmOutcome,
    deploy,
    preload,
)

__all__ = [
    "Catalog",
    "DeploymentReport",
    "HostTarget",
    "MultiattachManager",
    "TemplateVersion",
    "VmOutcome",
    "deploy",
    "preload",
]

"""The thesis experiment with real VMs, from Python.

:func:`ring_vms` runs the RCPBT token ring inside QEMU guests, one per emulated PC,
takes consistent global snapshots while it runs and, with ``power_off``, powers every
PC off and resumes the ring from the latest global snapshot -- what the ``ring_vms``
example does. It needs root (network namespaces, taps, netfilter; a
:class:`PermissionError` otherwise), ``qemu-system-x86_64`` and the reference guest
image (``guest_dir=`` or ``$UNACLOUD_GUEST_DIR``; ``scripts/guest-image`` builds it).

The result's :meth:`RingVmsResult.to_dict` is exactly the ``ring_vms --json`` object;
:meth:`RingVmsResult.to_pandas` gives one row per global snapshot (pandas is imported
only then). :meth:`RingVmsResult.from_dict` reads saved results, such as the entries of
``benches/ring_vms/results.json``.

``progress`` receives ``{"event": "start", ...}`` before the run and
``{"event": "finish", "result": ...}`` or ``{"event": "error", "error": ...}`` after
it; the Rust experiment offers no hook in between, so there are no intermediate events.

>>> import unacloud
>>> r = unacloud.experiment.ring_vms(vms=2, hosts=2, tokens=5000, snapshots=1)  # doctest: +SKIP
>>> r.exact, r.to_pandas()[["local_ms", "global_ms", "overhead_ms"]]          # doctest: +SKIP
"""

from __future__ import annotations

from ._native import RingVmsResult, ring_vms

__all__ = ["RingVmsResult", "ring_vms"]

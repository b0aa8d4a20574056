"""unacloud: reliable desktop clouds from Python.

* :mod:`unacloud.vbox` -- VirtualBox machines, snapshot trees and the minimal file set
  needed to resume a VM from a snapshot on another host;
* :mod:`unacloud.core` -- hardware profiles, placement algorithms and the cost model;
* :mod:`unacloud.snapshot` -- the global-snapshot protocol: a deterministic simulator
  and the sans-IO coordinator and participant state machines;
* :mod:`unacloud.hv` -- hypervisors (QEMU running real VMs, an in-memory double for
  tests, VirtualBox) over one interface;
* :mod:`unacloud.provision` -- the template catalog, preloading templates onto hosts and
  deployments with per-VM outcomes;
* :mod:`unacloud.experiment` -- the real-VM ring experiment with global snapshots.

Results are typed classes with ``to_dict()`` (plain data) and, where they are tables,
``records()``/``to_pandas()``; iterating a table-like result yields its records, so
``pandas.DataFrame(result)`` works directly. Results pickle.
"""

from __future__ import annotations

from . import core, experiment, hv, provision, snapshot, vbox
from ._native import __version__
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all

__all__ = ["core", "experiment", "hv", "provision", "snapshot", "vbox", "__version__", *_errors_all]

"""VirtualBox machines: settings, snapshot trees and migration sets.

>>> import unacloud
>>> m = unacloud.vbox.Machine.load("TM.vbox")                      # doctest: +SKIP
>>> ms = m.migration_set("current")  # or a snapshot's uuid or name  # doctest: +SKIP
>>> ms.total_bytes, ms.missing_count  # bytes of the present files, missing files  # doctest: +SKIP
"""

from __future__ import annotations

from ._native import Machine, MigrationSet, Snapshot, read_vdi_header

__all__ = ["Machine", "MigrationSet", "Snapshot", "read_vdi_header"]

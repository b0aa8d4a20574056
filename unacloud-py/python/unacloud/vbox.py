"""VirtualBox machines: settings, snapshot trees and migration sets.

>>> import unacloud
>>> m = unacloud.vbox.Machine.load("TM.vbox")                      # doctest: +SKIP
>>> m.migration_set(m.current_snapshot.uuid).total_bytes           # doctest: +SKIP
"""

from __future__ import annotations

from ._native import Machine, MigrationSet, Snapshot, read_vdi_header

__all__ = ["Machine", "MigrationSet", "Snapshot", "read_vdi_header"]

"""Hardware profiles, placement algorithms and the cost model.

:func:`place` runs one of the eight placement algorithms (:func:`placement_algorithms`)
and returns a :class:`Placement`: iterate it (or ``pandas.DataFrame(plan)``) for one
row per VM, ``to_dict()`` for plain data; :func:`unacloud.provision.deploy` executes it.

>>> import unacloud
>>> unacloud.core.hardware_profile("medium")
{'cores': 2, 'memory_mb': 2048, 'name': 'medium'}
>>> unacloud.core.file_count(disks=1, snapshots=4, vms=8)
80
"""

from __future__ import annotations

from ._native import (
    file_count,
    hardware_profile,
    hardware_profiles,
    Placement,
    place,
    placement_algorithms,
    transfer_estimate,
)

__all__ = [
    "file_count",
    "hardware_profile",
    "hardware_profiles",
    "Placement",
    "place",
    "placement_algorithms",
    "transfer_estimate",
]

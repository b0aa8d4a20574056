"""Consistent global snapshots of distributed systems running in VMs.

* :func:`simulate_ring` runs the RCPBT token ring with periodic global snapshots (and
  optionally a crash and a restore) in the deterministic simulator and returns a
  :class:`SimulationResult`: ``to_dict()`` the totals, ``snapshots()`` one record per
  global snapshot (local, global and overhead times), so ``pandas.DataFrame(result)``
  has a row per global snapshot. It exposes the local snapshot time distribution,
  restore time, latency, jitter, loss, which host crashes and when, the protocol's
  time-outs and the seed; Ctrl-C interrupts it and ``progress`` reports on it.
* :class:`Coordinator` and :class:`Participant` are the sans-IO protocol state
  machines, for driving the protocol over your own sockets: feed in received frames,
  completed host actions and timeouts; drain ``poll_output()``.
* :func:`encode` / :func:`decode` convert envelope dicts to and from wire frames.

>>> import unacloud
>>> r = unacloud.snapshot.simulate_ring(nodes=4, tokens=200, snapshot_every=50)
>>> (r.tokens_final, r.lost, r.duplicated, r.violations)
(200, 0, 0, 0)
>>> [s["status"] for s in r.snapshots()]
['completed', 'completed', 'completed']
"""

from __future__ import annotations

from ._native import Coordinator, Participant, SimulationResult, decode, encode, simulate_ring

__all__ = ["Coordinator", "Participant", "SimulationResult", "decode", "encode", "simulate_ring"]

"""``python -m unacloud._gs ARGS``: the ``unacloud-gs`` command line (the RCPBT test
manager that :func:`unacloud.experiment.ring_vms` starts in the lab's hub namespace)."""

from __future__ import annotations

import sys

from ._native import _gs_main

if __name__ == "__main__":
    sys.exit(_gs_main(sys.argv[1:]))

#!/usr/bin/env python3
"""Plots the real-VM global-snapshot measurements beside the thesis's figures.

Reads the runs ``benches/ring_vms/measure`` wrote (``results.json``: one object per run,
``label``, ``args`` and the ``ring_vms --json`` result) and draws, per configuration, the
median slowest local snapshot, the median global snapshot and the median guest pause
measured here (QEMU under TCG, 128 MiB guests, all PCs on one 2-core machine), next to
the thesis's local and global snapshot times (SPEC §5.5: VirtualBox, 650 MB guests, one
physical PC per host).

    python3 benches/ring_vms/plot.py [--results results.json] [--out ring_vms.png]

Needs matplotlib (``scripts/test-python`` installs it into ``target/py-venv``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The thesis's means of 5 runs (seconds): configuration -> (local, global).
THESIS = {
    "4 VMs / 4 PCs": (1.95, 3.06),
    "8 VMs / 8 PCs": (2.41, 3.8),
    "4 VMs / 2 PCs": (4.9, 5.81),
}


def summarize(rows: list[dict]) -> list[dict]:
    """Median figures per configuration label, in first-seen order."""
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row["result"])
    out = []
    for label, results in by_label.items():
        local = [x for r in results for x in r["local_ms"]]
        glob = [x for r in results for x in r["global_ms"]]
        over = [x for r in results for x in r["overhead_ms"]]
        down = [x for r in results for x in r["vm_downtime_ms"]]
        resume = [r["resume_ms"] for r in results if r.get("resume_ms") is not None]
        moved = [m["bytes_copied"] for r in results for m in r.get("relocated", [])]
        exact = all(r["tokens_counted"] == r["tokens_expected"] for r in results)
        out.append(
            {
                "label": label,
                "runs": len(results),
                "snapshots": len(glob),
                "local_ms": statistics.median(local) if local else None,
                "global_ms": statistics.median(glob) if glob else None,
                "overhead_ms": statistics.median(over) if over else None,
                "downtime_ms": statistics.median(down) if down else None,
                "resume_ms": statistics.median(resume) if resume else None,
                "bytes_moved": statistics.median(moved) if moved else None,
                "exact": exact,
            }
        )
    return out


def plot(summary: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary if s["global_ms"] is not None and "relocated" not in s["label"]]
    labels = [s["label"] for s in rows]
    x = list(range(len(rows)))
    w = 0.18
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar([i - 1.5 * w for i in x], [s["local_ms"] / 1e3 for s in rows], w, label="local (here)")
    a.bar([i - 0.5 * w for i in x], [s["global_ms"] / 1e3 for s in rows], w, label="global (here)")
    a.bar(
        [i + 0.5 * w for i in x],
        [THESIS.get(s["label"], (0, 0))[0] for s in rows],
        w,
        label="local (thesis)",
        hatch="//",
    )
    a.bar(
        [i + 1.5 * w for i in x],
        [THESIS.get(s["label"], (0, 0))[1] for s in rows],
        w,
        label="global (thesis)",
        hatch="//",
    )
    a.set_xticks(x, labels, rotation=15)
    a.set_ylabel("seconds (median)")
    a.set_title("Local vs global snapshot time")
    a.legend(fontsize=8)
    b.bar([i - w / 2 for i in x], [s["overhead_ms"] for s in rows], w, label="coordination overhead")
    b.bar([i + w / 2 for i in x], [s["downtime_ms"] for s in rows], w, label="guest pause per local snapshot")
    b.axhline(10, color="tab:red", linestyle="--", linewidth=1, label="overhead goal (10 ms)")
    b.axhline(20, color="tab:purple", linestyle=":", linewidth=1, label="pause goal (20 ms)")
    b.set_xticks(x, labels, rotation=15)
    b.set_ylabel("milliseconds (median)")
    b.set_title("What coordinating costs (QEMU/TCG, this machine)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=HERE / "results.json")
    ap.add_argument("--out", type=Path, default=HERE / "ring_vms.png")
    args = ap.parse_args()
    summary = summarize(json.loads(args.results.read_text()))
    for s in summary:
        fmt = lambda v, unit="ms": "-" if v is None else f"{v:.1f} {unit}"  # noqa: E731
        print(
            f"{s['label']:28} runs {s['runs']}  local {fmt(s['local_ms'])}  global {fmt(s['global_ms'])}"
            f"  overhead {fmt(s['overhead_ms'])}  pause {fmt(s['downtime_ms'])}  resume {fmt(s['resume_ms'])}"
            f"  moved {'-' if s['bytes_moved'] is None else int(s['bytes_moved'])} B  exact {s['exact']}"
        )
    plot(summary, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

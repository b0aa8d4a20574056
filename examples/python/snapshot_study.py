#!/usr/bin/env python3
"""A desktop-cloud snapshot study, the way a researcher would run it in a notebook.

1. Loads real VirtualBox machines and prints, for each, what resuming it on another
   host would copy (the migration table; missing files are counted, not hidden).
2. Runs simulated global snapshots of the RCPBT token ring for 4 to 64 nodes, several
   seeds each.
3. When run as root with the reference guest image (``scripts/guest-image``;
   ``$UNACLOUD_GUEST_DIR``) and QEMU, also runs the ring in real VMs
   (:func:`unacloud.experiment.ring_vms`) for a few node counts; otherwise it says the
   figure is simulated only.
4. Saves a figure: global vs slowest local snapshot time and the coordination overhead
   per number of nodes, as means with error bars (one standard deviation) and the
   number of global snapshots behind each point; every y axis starts at zero, so a
   small drift looks small. Real-VM series, when measured, are drawn in their own
   panel beside the simulated ones (real snapshots take seconds, the simulator's are
   scaled to milliseconds).

Run headless:  python examples/python/snapshot_study.py --out study.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
from pathlib import Path
from typing import Any, Optional

import unacloud

REPO = Path(__file__).resolve().parents[2]
DEFAULT_FIXTURES = REPO.parent / "shared" / "fixtures" / "vbox"

Row = dict[str, Any]


def migration_table(folder: Path, limit: int) -> list[Row]:
    """One row per machine: what resuming its current state elsewhere copies."""
    rows = []
    for path in sorted(folder.glob("*.vbox"))[:limit]:
        m = unacloud.vbox.Machine.load(str(path))
        ms = m.migration_set("current")
        rows.append(
            {
                "machine": m.name,
                "snapshots": len(m.snapshots),
                "files_total": len(m.all_files()),
                "eq_5_4": m.expected_file_count,
                "files_to_copy": len(ms.files),
                "bytes_present": ms.total_bytes,
                "missing": ms.missing_count,
            }
        )
    return rows


def summarise(nodes: int, records: list[Row], source: str) -> Row:
    """Mean, standard deviation and count of the completed global snapshots' times."""
    done = [r for r in records if r["global_ms"] is not None and r["local_ms"] is not None]
    row: Row = {"source": source, "nodes": nodes, "n": len(done)}
    for key in ("local_ms", "global_ms", "overhead_ms"):
        values = [float(r[key]) for r in done]
        row[key] = statistics.fmean(values) if values else float("nan")
        row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row


def study(node_counts: list[int], tokens: int, seeds: int) -> list[Row]:
    """Simulated global snapshots: one summary row per node count."""
    rows = []
    for n in node_counts:
        records: list[Row] = []
        for seed in range(seeds):
            r = unacloud.snapshot.simulate_ring(
                nodes=n, tokens=tokens, snapshot_every=max(1, tokens // 4), seed=seed
            )
            assert r.exact, r.to_dict()
            records.extend(r.snapshots())
        rows.append(summarise(n, records, "simulated"))
    return rows


def real_vms_available() -> Optional[str]:
    """None when the real-VM ring can run here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    guest = Path(os.environ.get("UNACLOUD_GUEST_DIR", REPO / "target" / "guest"))
    if not all((guest / f).is_file() for f in ("vmlinuz", "initrd.img", "rootfs.qcow2")):
        return f"no guest image in {guest} (scripts/guest-image builds it)"
    if shutil.which("qemu-system-x86_64") is None:
        return "no qemu-system-x86_64"
    return None


def real_study(node_counts: list[int], tokens: int, snapshots: int) -> list[Row]:
    """The ring in real QEMU VMs, one VM per emulated PC: one summary row per count."""
    guest = Path(os.environ.get("UNACLOUD_GUEST_DIR", REPO / "target" / "guest"))
    rows = []
    for n in node_counts:
        r = unacloud.experiment.ring_vms(vms=n, hosts=n, tokens=tokens, snapshots=snapshots, guest_dir=guest)
        if not r.exact:
            print(f"real VMs, {n} nodes: the ring was not exact: {r.failures}")
        records = r.to_pandas().to_dict("records")
        rows.append(summarise(n, records, "real VMs"))
    return rows


def plot(sim: list[Row], real: list[Row], out: Optional[Path] = None) -> Any:
    """The figure (returned; written to ``out`` when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("simulated", sim)] + ([("real VMs", real)] if real else [])
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 4 * len(series)), squeeze=False)
    for (title, rows), (a, b) in zip(series, axes):
        nodes = [r["nodes"] for r in rows]
        for key, label, fmt in (("global_ms", "global snapshot", "o-"), ("local_ms", "slowest local snapshot", "s--")):
            a.errorbar(nodes, [r[key] for r in rows], yerr=[r[key + "_sd"] for r in rows], fmt=fmt,
                       capsize=4, label=label)
        b.errorbar(nodes, [r["overhead_ms"] for r in rows], yerr=[r["overhead_ms_sd"] for r in rows],
                   fmt="o-", color="tab:red", capsize=4)
        for r in rows:  # how many global snapshots each point stands for
            b.annotate(f"n={r['n']}", (r["nodes"], r["overhead_ms"]), textcoords="offset points",
                       xytext=(0, 8), ha="center", fontsize=8)
        unit = "ms, simulated" if title == "simulated" else "ms, measured"
        for ax in (a, b):
            ax.set_xscale("log", base=2)
            ax.set_xticks(nodes, [str(n) for n in nodes])
            ax.set_xlabel("nodes")
            ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # from zero: never exaggerate a small drift
        a.set_ylabel(f"time ({unit})")
        a.set_title(f"{title}: global vs local snapshot time (mean ± sd)")
        a.legend()
        b.set_ylabel(f"coordination overhead ({unit})")
        b.set_title(f"{title}: overhead = global − slowest local")
    if not real:
        fig.suptitle("simulated only (no real-VM series measured)", fontsize=10)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=120)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES, help="folder of .vbox files")
    ap.add_argument("--machines", type=int, default=8, help="how many machines to tabulate")
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--real-nodes", type=int, nargs="*", default=[2],
                    help="node counts for the real-VM series (root and the guest image only)")
    ap.add_argument("--real-tokens", type=int, default=30000,
                    help="enough for the ring to outlast the global snapshots (one per --gap second)")
    ap.add_argument("--real-snapshots", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("snapshot_study.png"))
    args = ap.parse_args()

    if args.fixtures.is_dir():
        table = migration_table(args.fixtures, args.machines)
        print(f"{'machine':30} {'snaps':>5} {'files':>5} {'eq5.4':>5} {'copy':>5} {'missing':>7}")
        for r in table:
            print(
                f"{r['machine'][:30]:30} {r['snapshots']:5} {r['files_total']:5} {r['eq_5_4']:5} "
                f"{r['files_to_copy']:5} {r['missing']:7}"
            )
    rows = study(args.nodes, args.tokens, args.seeds)
    why_not = real_vms_available() if args.real_nodes else "no --real-nodes given"
    real = [] if why_not else real_study(args.real_nodes, args.real_tokens, args.real_snapshots)
    print(f"\n{'source':>9} {'nodes':>5} {'n':>4} {'local ms':>14} {'global ms':>14} {'overhead ms':>14}")
    for r in rows + real:
        print(
            f"{r['source']:>9} {r['nodes']:5} {r['n']:4} "
            + " ".join(f"{r[k]:8.2f} ±{r[k + '_sd']:5.2f}" for k in ("local_ms", "global_ms", "overhead_ms"))
        )
    if why_not:
        print(f"\nsimulated only: no real-VM series ({why_not})")
    else:
        print(f"\nreal VMs: {len(real)} series point(s) beside the simulated ones")
    plot(rows, real, args.out)
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()

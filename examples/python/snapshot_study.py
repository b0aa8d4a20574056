#!/usr/bin/env python3
"""A desktop-cloud snapshot study, the way a researcher would run it in a notebook.

1. Loads real VirtualBox machines and prints, for each, what resuming it on another
   host would copy (the migration table).
2. Runs simulated global snapshots of the RCPBT token ring for 4 to 64 nodes.
3. Saves a figure: global vs slowest local snapshot time, and the coordination overhead
   per number of nodes.

Run headless:  python examples/python/snapshot_study.py --out study.png
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import unacloud

REPO = Path(__file__).resolve().parents[2]
DEFAULT_FIXTURES = REPO.parent / "shared" / "fixtures" / "vbox"


def migration_table(folder: Path, limit: int) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.vbox"))[:limit]:
        m = unacloud.vbox.Machine.load(str(path))
        state = m.current_snapshot.uuid if m.current_snapshot else "current"
        ms = m.migration_set(state)
        rows.append(
            {
                "machine": m.name,
                "snapshots": len(m.snapshots),
                "files_total": len(m.all_files()),
                "eq_5_4": m.expected_file_count,
                "files_to_copy": len(ms.files),
                "missing": sum(1 for f in ms.files if f["bytes"] is None),
            }
        )
    return rows


def study(node_counts: list[int], tokens: int, seeds: int) -> list[dict]:
    rows = []
    for n in node_counts:
        local, glob, over = [], [], []
        for seed in range(seeds):
            r = unacloud.snapshot.simulate_ring(nodes=n, tokens=tokens, snapshot_every=max(1, tokens // 4), seed=seed)
            assert r["violations"] == 0 and r["tokens_final"] == tokens, r
            for s in r["snapshots"]:
                if s["global_ms"] is None:
                    continue
                local.append(max(s["local_ms"]))
                glob.append(s["global_ms"])
                over.append(s["global_ms"] - max(s["local_ms"]))
        rows.append(
            {
                "nodes": n,
                "local_ms": statistics.median(local),
                "global_ms": statistics.median(glob),
                "overhead_ms": statistics.median(over),
                "snapshots": len(glob),
            }
        )
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [r["nodes"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(nodes, [r["global_ms"] for r in rows], "o-", label="global snapshot")
    a.plot(nodes, [r["local_ms"] for r in rows], "s--", label="slowest local snapshot")
    a.set_xscale("log", base=2)
    a.set_xlabel("nodes")
    a.set_ylabel("time (ms, simulated)")
    a.set_title("Global vs local snapshot time")
    a.legend()
    b.plot(nodes, [r["overhead_ms"] for r in rows], "o-", color="tab:red")
    b.set_xscale("log", base=2)
    b.set_xlabel("nodes")
    b.set_ylabel("coordination overhead (ms)")
    b.set_title("Overhead = global - slowest local")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES, help="folder of .vbox files")
    ap.add_argument("--machines", type=int, default=8, help="how many machines to tabulate")
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=2)
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
    print(f"\n{'nodes':>5} {'local ms':>9} {'global ms':>9} {'overhead ms':>11}")
    for r in rows:
        print(f"{r['nodes']:5} {r['local_ms']:9.2f} {r['global_ms']:9.2f} {r['overhead_ms']:11.2f}")
    plot(rows, args.out)
    print(f"\nfigure written to {args.out}")


if __name__ == "__main__":
    main()

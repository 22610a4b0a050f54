"""Lesson 7: what a failure cost a run, in time, read from its run folder.

    python scripts/lessons/step_times.py runs/lesson7/{uninterrupted,worker,server,coordinator}

For every run folder it prints, from ``metrics.jsonl`` (worker 0 writes a line per step
with ``--log-interval 1``, as ``scripts/failures.py`` runs it) and ``server-S.json``:
- ``median ms``: the median time of one step (``elapsed_s`` from one line to the next,
  divided by the steps between them);
- ``longest ms`` and ``at step``: the longest step. A dead worker holds its step up to
  k·h seconds (k missed heartbeats of h seconds), until the coordinator drops it; a
  killed server holds it while it is started again and loads its checkpoint;
- ``saves`` and ``ms/save``: the checkpoints the servers wrote and the mean time of one
  (``checkpoint_s / checkpoints_written``, averaged over the servers): the C of the
  lesson's formula. A resumed server's file counts the saves since its restart;
- ``val loss``: the last validation loss.

A job resumed as a whole (``ps-local --resume``) keeps its clock: ``elapsed_s`` goes on
from the last line kept, so the time it was down is in no step.

Not here: plots (``ps-plot``), the loss curves side by side (``runs_table.py --curve``).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path


def row(run: Path) -> dict:
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    timed = [r for r in records if "elapsed_s" in r]
    per_step = [((b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]), b["step"])
                for a, b in zip(timed, timed[1:]) if b["step"] > a["step"]]
    servers = [json.loads(p.read_text()) for p in sorted(run.glob("server-*.json"))]
    saves = sum(s.get("checkpoints_written", 0) for s in servers)
    costs = [s["checkpoint_s"] / s["checkpoints_written"] for s in servers if s.get("checkpoints_written")
             and "checkpoint_s" in s]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    longest, at = max(per_step) if per_step else (float("nan"), "-")
    return {"run": run.name, "steps": str(records[-1].get("step", "-")),
            "median ms": f"{1e3 * statistics.median(t for t, _ in per_step):.1f}" if per_step else "-",
            "longest ms": f"{1e3 * longest:.0f}", "at step": str(at), "saves": str(saves),
            "ms/save": f"{1e3 * statistics.mean(costs):.1f}" if costs else "-",
            "val loss": f"{vals[-1]:.4f}" if vals else "-"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="What a failure cost a run: step times, the longest step, "
                                            "checkpoints and their cost (lesson 7).")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").exists()]
    if missing:
        p.error(f"no metrics.jsonl in {', '.join(missing)}: give run folders")
    rows = [row(r) for r in args.runs]
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) if c == "run" else c.rjust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(width[c]) if c == "run" else r[c].rjust(width[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())

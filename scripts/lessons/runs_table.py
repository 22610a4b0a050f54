"""Lessons 4, 5, 6 and 8: one line of figures per run folder, read from the files the run wrote.

    python scripts/lessons/runs_table.py runs/lesson4/fixed-*
    python scripts/lessons/runs_table.py --pushed runs/lesson6/*   # and the bytes pushed alone
    python scripts/lessons/runs_table.py --curve runs/lesson5/momentum-*   # every validation, side by side

For every folder (``ps-local``, ``ps-launch`` or Slurm run) it prints:
- ``mode``: the consistency model, from ``run_config.json`` (``ps-local``) or the first
  line of ``metrics.jsonl``;
- ``wall s``: the job's time from the first worker's first step to the last worker's
  last step (``t_start`` / ``t_end`` of every ``worker-R.json``; without them, the last
  ``elapsed_s`` of ``metrics.jsonl``): start-up and the final evaluation are not in it;
- ``val loss``: the last validation loss; ``gradients``: the gradients the servers
  applied (local SGD: the local steps of all workers); ``updates``: the servers'
  version (one per BSP step, per asp/ssp push, per local-SGD round);
- ``MB wire``: bytes pushed + pulled by all workers, in MB (with ``--pushed``, also
  ``MB pushed``: the pushes alone, which gradient compression shrinks);
- ``wait s``: mean over the workers of the time blocked in push/pull (``wait_s``);
- ``stale 0``: the share of applied updates computed on the newest parameters, and
  ``max stale``: the largest staleness in versions / in clocks (``server-S.json``; a
  ``-`` where the mode has none).

With ``--curve`` it prints instead the validation loss of every evaluation, one column
per run, to 6 decimals: enough to see two runs agree (or not) to float32's precision.

Not here: plots (``ps-plot``), anything a run did not write down.
"""
import argparse
import json
import sys
from pathlib import Path


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def describe(run: Path, first: dict) -> str:
    job = (load(run / "run_config.json") or {}).get("job") or {}
    mode = job.get("mode") or first.get("mode", "?")
    if mode == "ssp":
        return f"ssp(s={job.get('staleness', '?')})"
    if mode in ("local-sgd", "diloco"):
        return f"{mode}(H={job.get('local_steps', '?')})"
    return mode + (f"(backup={job['backup_workers']})" if job.get("backup_workers") else "")


def row(run: Path, pushed: bool = False) -> dict:
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    workers = [load(p) for p in sorted(run.glob("worker-*.json"))]
    servers = [load(p) for p in sorted(run.glob("server-*.json"))]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    last = records[-1]
    W = records[0].get("workers") or len(workers) or 1
    if workers and len(workers) == W:
        wall = max(w["t_end"] for w in workers) - min(w["t_start"] for w in workers)
    else:
        wall = last.get("elapsed_s", float("nan"))
    out = {"run": run.name, "mode": describe(run, records[0]), "wall s": f"{wall:.1f}",
           "val loss": f"{vals[-1]:.3f}" if vals else "-", "gradients": str(last.get("gradients", "-")),
           "updates": str(last.get("updates", "-")),
           **({"MB pushed": f"{last.get('bytes_pushed', 0) / 1e6:.1f}"} if pushed else {}),
           "MB wire": f"{(last.get('bytes_pushed', 0) + last.get('bytes_pulled', 0)) / 1e6:.1f}",
           "wait s": f"{sum(w['wait_s'] for w in workers) / len(workers):.1f}" if workers else "-"}
    if servers:
        hist, clock = {}, {}
        for s in servers:
            for k, n in s.get("staleness_hist", {}).items():
                hist[int(k)] = hist.get(int(k), 0) + n
            for k, n in s.get("clock_staleness_hist", {}).items():
                clock[int(k)] = clock.get(int(k), 0) + n
        total = sum(hist.values())
        out["stale 0"] = f"{hist.get(0, 0) / total:.0%}" if total else "-"
        out["max stale"] = f"{max(hist, default=0)} / {max(clock) if clock else '-'}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="One line of figures per run folder (lessons 4, 5, 6, 8).")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--curve", action="store_true", help="the validation loss of every evaluation, a column per run")
    p.add_argument("--pushed", action="store_true", help="also the MB pushed by the workers (without the pulls)")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").exists()]
    if missing:
        p.error(f"no metrics.jsonl in {', '.join(missing)}")
    if args.curve:
        curves = [{r["step"]: r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if r.get("val_loss") is not None} for run in args.runs]
        names = [r.name for r in args.runs]
        print("step  " + "  ".join(f"{n:>12}" for n in names))
        for step in sorted(set().union(*curves)):
            print(f"{step:4d}  " + "  ".join(f"{c[step]:12.6f}" if step in c else f"{'-':>12}" for c in curves))
        return 0
    rows = [row(r, args.pushed) for r in args.runs]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    width = {c: max(len(c), *(len(r.get(c, "-")) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) if i < 2 else c.rjust(width[c]) for i, c in enumerate(cols)))
    for r in rows:
        print("  ".join(r.get(c, "-").ljust(width[c]) if i < 2 else r.get(c, "-").rjust(width[c])
                        for i, c in enumerate(cols)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

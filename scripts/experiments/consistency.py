"""Experiment: one small GPT trained under each consistency model, with a slow worker.

    python scripts/experiments/consistency.py            # ~5 minutes on 2 cores
    python scripts/experiments/consistency.py --replot runs/consistency-X   # redraw only

Runs ``ps-local`` once per mode (bsp, asp, ssp(s=2), local-sgd(H=4), bsp with one
backup worker) and per scenario, on the same model, data, optimizer and number of
gradients (W x --steps). Two scenarios of slowness (``--straggler`` of the worker):
- ``fixed``: worker W-1 is slow at every step (``--straggler W-1:3x``: each of its
  steps takes 3x its own compute time): a persistently slow machine;
- ``moving``: at each step one worker, drawn at random, is slow (``any:3x``): the
  same amount of slowness, but transient and spread over the workers.
It then writes
- ``docs/img/consistency.png``: validation loss against wall-clock time and against
  the gradients the servers applied (divided by W: the axis of BSP steps), one row
  per scenario;
- ``docs/img/consistency_staleness_<scenario>.png``: the staleness histogram of asp
  and ssp (server version at apply - the version the gradient was computed on), their
  clock staleness, the pushes of each worker (dropped ones hatched) and where each
  worker's time went (computing, slowed, waiting for answers);
- ``results.json`` and the run folders (``runs/consistency-<time>/<scenario>/<mode>``),
  and a table per scenario on stdout: wall time, final losses, updates/s, waits, staleness.

Wall time is the job's: from the first worker's first step to the last worker's last
(each worker records both in ``worker-R.json``); start-up and the final evaluation
are not in it. Times on a shared 2-core machine move by 10-20% between runs.

Not here: the modes themselves (``paramserver/modes.py``, ``worker/mode_loops.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MODEL = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--block-size", "64", "--batch-size", "8",
         "--eval-batches", "4", "--sample-bytes", "0"]
# name -> (label, flags)
RUNS = {
    "bsp": ("BSP", ["--mode", "bsp"]),
    "asp": ("ASP", ["--mode", "asp"]),
    "ssp2": ("SSP (s=2)", ["--mode", "ssp", "--staleness", "2"]),
    "localsgd4": ("local SGD (H=4)", ["--mode", "local-sgd", "--local-steps", "4"]),
    "backup1": ("BSP, 1 backup worker", ["--mode", "bsp", "--backup-workers", "1"]),
}
SCENARIOS = {   # name -> (title, --straggler for W workers and a slowdown)
    "fixed": ("worker {last} slowed {slow:g}x at every step", lambda W, slow: f"{W - 1}:{slow:g}x"),
    "moving": ("one random worker slowed {slow:g}x at each step", lambda W, slow: f"any:{slow:g}x"),
}
COLORS = {"bsp": "black", "asp": "tab:red", "ssp2": "tab:blue", "localsgd4": "tab:green", "backup1": "tab:orange"}


def run_mode(name, scenario, out: Path, args) -> None:
    cmd = [sys.executable, "-m", "common.launch.local", "--servers", str(args.servers), "--workers", str(args.workers),
           "--steps", str(args.steps), "--out", str(out), "--no-progress", "--eval-interval", str(args.eval_interval),
           "--threads", "1", *MODEL, *RUNS[name][1]]
    if args.slow > 1:
        cmd += ["--straggler", SCENARIOS[scenario][1](args.workers, args.slow)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{scenario}/{name}: ps-local failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    print(f"  {scenario}/{name}: done in {time.monotonic() - t0:.0f} s (with start-up)", flush=True)


def collect(name, out: Path, W: int) -> dict:
    """The figures of one run folder."""
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    workers = [json.loads((out / f"worker-{r}.json").read_text()) for r in range(W)]
    servers = sorted(out.glob("server-*.json"))
    server = json.loads(servers[0].read_text())
    server.pop("log", None)
    vals = [r for r in records if r.get("val_loss") is not None]
    return {
        "name": name, "label": RUNS[name][0], "mode": records[0].get("mode"),
        "wall_s": max(w["t_end"] for w in workers) - min(w["t_start"] for w in workers),
        "final_val_loss": vals[-1]["val_loss"], "final_loss": records[-1].get("loss"),
        "curve": [{"elapsed_s": r["elapsed_s"], "val_loss": r["val_loss"], "bsp_steps": r["gradients"] / W,
                   "updates": r["updates"]} for r in vals],
        "updates": server["updates"], "updates_per_s": server["updates_per_s"], "applied": server["applied"],
        "applied_by_worker": server["applied_by_worker"], "dropped": server["dropped"],
        "staleness_hist": server["staleness_hist"], "clock_staleness_hist": server["clock_staleness_hist"],
        "max_staleness": server["max_staleness"], "max_clock_staleness": server["max_clock_staleness"],
        "wait_mean_s": sum(w["wait_s"] for w in workers) / W,
        "workers": [{k: w[k] for k in ("rank", "straggler", "iterations", "pushes", "dropped", "wait_s",
                                       "compute_s", "straggle_s", "wall_s")} for w in workers],
    }


def plot(results: dict, png: Path, args) -> list[str]:
    """Draw the figures; return the curves' labels (the legend entries of the first)."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("the figures need matplotlib: pip install -e '.[plots]' (the runs are kept in the out folder; "
                 "redraw them with --replot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(results)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.2 * rows), sharey=True, squeeze=False)
    labels = []
    for (scenario, runs), (a, b) in zip(results.items(), axes):
        for r in runs:
            xs_t = [p["elapsed_s"] for p in r["curve"]]
            xs_g = [p["bsp_steps"] for p in r["curve"]]
            ys = [p["val_loss"] for p in r["curve"]]
            style = dict(color=COLORS.get(r["name"]), marker="o", markersize=3, linewidth=1.5)
            a.plot(xs_t, ys, label=f"{r['label']}: {r['wall_s']:.0f} s", **style)
            b.plot(xs_g, ys, label=f"{r['label']}: {r['final_val_loss']:.3f}", **style)
        title = SCENARIOS[scenario][0].format(last=args.workers - 1, slow=args.slow) if args.slow > 1 else "no slow worker"
        a.set_xlabel("wall-clock time (s)")
        a.set_ylabel("validation loss (nats per byte)")
        a.set_title(f"{title}: against time", fontsize=10)
        a.legend(title="job wall time", fontsize=8)
        b.set_xlabel(f"gradients applied / W  (= BSP steps; W = {args.workers})")
        b.set_title(f"{title}: against updates", fontsize=10)
        b.legend(title="final validation loss", fontsize=8)
        for ax in (a, b):
            ax.grid(alpha=0.3)
            labels += [t.get_text() for t in ax.get_legend().get_texts()]
    fig.suptitle(f"The same GPT under each consistency model: {args.workers} workers, {args.steps} x "
                 f"{args.workers} gradients", fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    for scenario, runs in results.items():
        plot_costs(runs, png.with_name(f"{png.stem}_staleness_{scenario}.png"), args, plt)
    return labels


def plot_costs(results, png: Path, args, plt):
    """What each mode cost: staleness (versions, clocks), who contributed, who waited."""
    fig, ((a, b), (c, d)) = plt.subplots(2, 2, figsize=(11, 7.5))
    asyncs = [r for r in results if r["clock_staleness_hist"]]
    width = 0.8 / max(1, len(asyncs))
    for i, r in enumerate(asyncs):                   # (a) staleness in versions, as fractions
        hist = {int(k): v for k, v in r["staleness_hist"].items()}
        total = sum(hist.values())
        ks = sorted(hist)
        a.bar([k + (i - (len(asyncs) - 1) / 2) * width for k in ks], [hist[k] / total for k in ks], width=width,
              color=COLORS.get(r["name"]), label=f"{r['label']} (max {r['max_staleness']})")
    others = ", ".join(r["label"] for r in results if not r["clock_staleness_hist"])
    a.set_title(f"staleness of applied updates: server version at apply\n- version computed on "
                f"({others}: always 0)", fontsize=9)
    a.set_xlabel("staleness (versions)")
    a.set_ylabel("fraction of applied updates")
    a.legend(fontsize=8)
    for r in asyncs:                                 # (b) clock staleness, cumulative
        hist = {int(k): v for k, v in r["clock_staleness_hist"].items()}
        total, run, xs, ys = sum(hist.values()), 0, [], []
        for k in sorted(hist):
            run += hist[k]
            xs.append(k)
            ys.append(run / total)
        b.step(xs, ys, where="post", color=COLORS.get(r["name"]), linewidth=2,
               label=f"{r['label']} (max {r['max_clock_staleness']})")
    b.set_xscale("symlog", linthresh=4)
    b.set_title("clock staleness: the pusher's clock - the slowest worker's clock\nwhen it read "
                "(ssp bounds it by s; asp does not)", fontsize=9)
    b.set_xlabel("clock staleness (pushes)")
    b.set_ylabel("fraction of applied updates, cumulative")
    b.legend(fontsize=8)
    W, n = args.workers, len(results)                # (c) pushes per worker, (d) time per worker
    w, labelled = 0.8 / W, set()
    for i, r in enumerate(results):
        for j, wk in enumerate(r["workers"]):
            x = i + (j - (W - 1) / 2) * w
            applied = wk["pushes"] - wk["dropped"]
            c.bar(x, applied, width=w, color=COLORS.get(r["name"]), edgecolor="white",
                  alpha=0.45 if wk["straggler"] and not all(v["straggler"] for v in r["workers"]) else 1.0)
            if wk["dropped"]:
                c.bar(x, wk["dropped"], bottom=applied, width=w, color="white", edgecolor="gray", hatch="///")
            bottom = 0.0
            for key, color, text in (("compute_s", "tab:gray", "computing"), ("straggle_s", "tab:purple", "slowed"),
                                     ("wait_s", "gold", "waiting for answers")):
                d.bar(x, wk[key], bottom=bottom, width=w, color=color, edgecolor="white",
                      label=text if wk[key] > 0 and text not in labelled else None)
                labelled.add(text if wk[key] > 0 else "")
                bottom += wk[key]
    for ax in (c, d):
        ax.set_xticks(range(n), [r["label"].replace(", ", ",\n").replace(" (", "\n(") for r in results], fontsize=8)
    pale = f"pale: the slow worker {W - 1}; " if not all(v["straggler"] for v in results[0]["workers"]) else ""
    c.set_title(f"pushes per worker ({pale}hatched: dropped)", fontsize=9)
    c.set_ylabel("pushes")
    d.set_title("where each worker's time went (workers 0..W-1 left to right)", fontsize=9)
    d.set_ylabel("seconds")
    d.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def table(results) -> str:
    lines = ["| mode | wall time (s) | final val loss | final train loss | server updates | updates/s | "
             "pushes applied | dropped | mean wait per worker (s) | max staleness (versions / clocks) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['wall_s']:.1f} | {r['final_val_loss']:.3f} | {r['final_loss']:.3f} | "
                     f"{r['updates']} | {r['updates_per_s']:.1f} | {r['applied']} | {r['dropped']} | "
                     f"{r['wait_mean_s']:.1f} | {r['max_staleness']} / "
                     f"{r['max_clock_staleness'] if r['clock_staleness_hist'] else '-'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="steps of W gradients each run uses (default: 200)")
    ap.add_argument("--workers", type=int, default=3, help="workers W (default: 3)")
    ap.add_argument("--servers", type=int, default=1, help="servers (default: 1)")
    ap.add_argument("--slow", type=float, default=3.0, help="a slow step takes this many times its compute "
                    "time (default: 3; 1 = no slow worker)")
    ap.add_argument("--eval-interval", type=int, default=20, help="validation every this many BSP steps (default: 20)")
    ap.add_argument("--modes", default=",".join(RUNS), help=f"which runs, of {','.join(RUNS)} (default: all)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"of {','.join(SCENARIOS)} (default: all)")
    ap.add_argument("--out", default="", help="folder of the runs (default: runs/consistency-<time>)")
    ap.add_argument("--png", default=str(ROOT / "docs/img/consistency.png"), help="the figure (default: %(default)s)")
    ap.add_argument("--replot", default="", help="only redraw from the runs in this folder")
    args = ap.parse_args(argv)
    names = [n for n in args.modes.split(",") if n]
    scenarios = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in RUNS] + [n for n in scenarios if n not in SCENARIOS]
    if unknown or len(set(names)) < len(names) or len(set(scenarios)) < len(scenarios):
        ap.error(f"--modes: each of {', '.join(RUNS)} at most once; --scenarios: of {', '.join(SCENARIOS)}")
    out = Path(args.replot or args.out or time.strftime("runs/consistency-%Y%m%d-%H%M%S"))
    if args.replot:
        saved = json.loads((out / "results.json").read_text())
        for k in ("steps", "workers", "servers", "slow"):
            setattr(args, k, saved["settings"][k])
    else:
        print(f"{len(names) * len(scenarios)} runs of {args.workers} workers x {args.steps} steps; run folders in "
              f"{out}", flush=True)
        for scenario in scenarios:
            for name in names:
                run_mode(name, scenario, out / scenario / name, args)
    results = {sc: [collect(n, out / sc / n, args.workers) for n in names] for sc in scenarios}
    settings = {k: getattr(args, k) for k in ("steps", "workers", "servers", "slow", "eval_interval")}
    (out / "results.json").write_text(json.dumps({"settings": settings, "command": sys.argv,
                                                  "results": results}, indent=1) + "\n")
    labels = plot(results, Path(args.png), args)
    for scenario, runs in results.items():
        print(f"\n{scenario}: " + SCENARIOS[scenario][0].format(last=args.workers - 1, slow=args.slow))
        print(table(runs))
    png = Path(args.png)
    print(f"figures: {png}, {png.with_name(png.stem + '_staleness_<scenario>.png')}; results: {out / 'results.json'}")
    return results, labels


if __name__ == "__main__":
    main()

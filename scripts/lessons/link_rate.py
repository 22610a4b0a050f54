"""Lesson 8: the time of a BSP step against the bandwidth of one link, measured and as
the mathematics predicts it, for a worker's link and for the server's.

    python scripts/lessons/link_rate.py runs/lesson8 --out docs/img/lesson8_link_rate.png

It reads a folder written by lesson 8's commands. Each setting NAME is ``free`` (no
limit) or ``HOST-RATE`` (``psh3-8mbit``: the outgoing traffic of HOST limited to RATE
with ``tc``); ``NAME/`` is the ``ps-launch`` run folder of that setting and
``preflight-NAME.json`` what ``ps-preflight --json`` measured just before it. Per setting:
- the step time: the slowest worker's ``wall_s`` over its gradients (``worker-R.json``);
- the limited link's bandwidth as ps-preflight measured it: for a worker's host, its
  pushes toward the server (``up_mbit_s`` of its pair); for the server's host, the
  slowest pull from it (``down_mbit_s`` of the other hosts' pairs); for ``free``, the
  median push;
- the bytes a worker pushes and pulls per step (``metrics.jsonl``: 4 bytes a parameter);
and the prediction of lesson 8 for a limit on the OUTGOING traffic of a host:
``t = t_free + 8 * push_bytes / beta`` for a worker's host (its one push squeezed
through), ``t = t_free + 8 * W * pull_bytes / beta`` for the server's host (the W
answers, one per worker, all leave through its link). The figure: step time against
bandwidth with both predictions (log-log), and each run's validation loss against
wall time.

Not here: running anything (the lesson's commands do it), several servers.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path


def setting(folder: Path, name: str) -> dict:
    run = folder / name
    workers = [json.loads(p.read_text()) for p in sorted(run.glob("worker-*.json"))]
    if not workers:
        raise SystemExit(f"{run}: no worker-R.json (is it a ps-launch run folder?)")
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    last = records[-1]
    pairs = [r for r in json.loads((folder / f"preflight-{name}.json").read_text())["results"]
             if r.get("up_mbit_s") and r.get("source") != r.get("target_host")]      # between two hosts
    if not pairs:
        raise SystemExit(f"{folder}/preflight-{name}.json: no bandwidth measured between two hosts")
    host = name.split("-")[0] if name != "free" else None
    servers = {r["target_host"] for r in pairs}
    if host in servers:                                  # the server's answers leave through this link
        kind, beta = "server", min(r["down_mbit_s"] for r in pairs if r["target_host"] == host)
    elif host:
        mine = [r["up_mbit_s"] for r in pairs if r["source"] == host]
        if not mine:
            raise SystemExit(f"{folder}/preflight-{name}.json: no pair from {host}")
        kind, beta = "worker", mine[0]
    else:
        kind, beta = "free", statistics.median(r["up_mbit_s"] for r in pairs)
    return {"name": name, "kind": kind, "beta": beta, "W": records[0].get("workers", len(workers)),
            "step_ms": max(w["wall_s"] / max(1, w["iterations"]) for w in workers) * 1e3,
            "push": last["bytes_pushed"] / last["gradients"], "pull": last["bytes_pulled"] / last["gradients"],
            "curve": [(r.get("elapsed_s", 0.0), r["val_loss"]) for r in records if r.get("val_loss") is not None]}


def predict(base_ms: float, r: dict, kind: str, beta_mbit):
    """Lesson 8's lower bound on the step time with the limited link's bandwidth ``beta``."""
    sent = r["push"] if kind == "worker" else r["W"] * r["pull"]
    return base_ms + 8 * sent / (beta_mbit * 1e6) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="the lesson's run folder (runs/lesson8)")
    p.add_argument("--out", default="", help="the figure (default: FOLDER/link_rate.png)")
    args = p.parse_args(argv)
    names = [f.name[len("preflight-"):-len(".json")] for f in sorted(args.folder.glob("preflight-*.json"))]
    if "free" not in names:
        raise SystemExit(f"{args.folder}: no preflight-free.json (the run on free links is the baseline)")
    rows = sorted((setting(args.folder, n) for n in names), key=lambda r: (r["kind"] != "free", r["kind"], -r["beta"]))
    base = rows[0]["step_ms"]
    print(f"W = {rows[0]['W']} workers; a worker pushes {rows[0]['push']:,.0f} and pulls {rows[0]['pull']:,.0f} "
          f"bytes a step; {base:.1f} ms a step on free links")
    print(f"{'setting':>12}  {'limited link':>12}  {'Mbit/s (preflight)':>18}  {'step ms':>8}  {'predicted ms':>12}")
    for r in rows:
        r["predicted_ms"] = predict(base, r, r["kind"], r["beta"]) if r["kind"] != "free" else base
        print(f"{r['name']:>12}  {r['kind']:>12}  {r['beta']:18.1f}  {r['step_ms']:8.1f}  {r['predicted_ms']:12.1f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    beta = np.array([r["beta"] for r in rows])
    grid = np.geomspace(beta.min() / 1.5, beta.max() * 1.5, 200)
    for kind, style, text in (("worker", "-", "a worker's link: t_free + 8 x push / bandwidth"),
                              ("server", "--", "the server's link: t_free + 8 x W x pull / bandwidth")):
        if any(r["kind"] == kind for r in rows):
            a.plot(grid, [predict(base, rows[0], kind, g) for g in grid], style, color="grey", label=text)
    for r in rows:
        mark = {"free": "s", "worker": "o", "server": "^"}[r["kind"]]
        a.plot(r["beta"], r["step_ms"], mark, ms=8, label=f"{r['name']}: {r['step_ms']:.0f} ms")
        b.plot(*zip(*r["curve"]), marker=mark, ms=4, label=r["name"])
    a.set(xscale="log", yscale="log", xlabel="bandwidth of the limited link, measured by ps-preflight (Mbit/s)",
          ylabel="milliseconds per step", title="a BSP step waits for its slowest transfer")
    b.set(xlabel="wall time (s)", ylabel="validation loss", title="the same steps, stretched by the slow link")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out or args.folder / "link_rate.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

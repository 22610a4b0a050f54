"""``ps-plot``: pictures of runs, drawn from the files a run folder holds.

    ps-plot runs/A                        # runs/A/plot.png: loss, speed, bytes (and staleness)
    ps-plot runs/A runs/B --out cmp.png   # several runs overlaid, the legend names the folders
    ps-plot runs/A runs/B --against step,bytes   # the loss against steps and bytes on the wire
    ps-plot runs/A runs/B --against step,pushed  # ... and against the bytes pushed only (compression)
    ps-plot runs/A --timeline             # runs/A/timeline.png: a few steps of every process, from --trace

What it reads (and nothing else; it never imports the roles):
- ``metrics.jsonl``: ``step``, ``loss``, ``val_loss``, ``elapsed_s``, ``tokens_per_s``,
  ``bytes_pushed`` / ``bytes_pulled`` (cumulative, summed over the workers);
- ``server-*.json``, written by every server at the end (``Recorder.summary`` in
  ``paramserver/modes.py``): ``staleness_hist``, a map ``{"0": count, "1": count, ...}``
  from the staleness in versions of an applied update (server version at apply - the
  version its gradient was computed on) to the number of such updates, and
  ``clock_staleness_hist``, the same in clocks for asp/ssp (empty in the synchronous
  modes). Summed over the servers and drawn as the share of applied updates, so runs
  of different lengths compare; a run without these files has no staleness panel;
- ``trace.json`` or ``trace-*.json`` (``--timeline``), written by ``--trace``.

Panels are drawn only for what some run has: a ``ps-train`` run has no bytes on the wire,
and the staleness panels appear only when some run applied a stale update (BSP and
local SGD apply none). The backend is Agg, so it needs no display.

Not here: recording anything (``common/trace.py``, the trainers, the servers' ``Recorder``),
interactive plots.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy

from common.trace import read_trace


# --- reading --------------------------------------------------------------------------

def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; is {run} a run folder (ps-local, ps-train)?")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(xs, ys) of the records that hold both ``x`` and ``key`` (step 0 is at 0 s and 0 bytes)."""
    xs, ys = [], []
    for r in records:
        xv = r.get(x, 0.0 if x in ("elapsed_s", "wire_mb", "pushed_mb") and r.get("step") == 0 else None)
        if key in r and r[key] is not None and xv is not None:
            xs.append(xv)
            ys.append(r[key])
    return xs, ys


def with_wire(records: list[dict]) -> list[dict]:
    """The records, each with ``wire_mb`` = (bytes pushed + pulled) / 1e6 where it has both,
    and ``pushed_mb`` = bytes pushed / 1e6 (what gradient compression shrinks; the pulls
    stay float32)."""
    return [dict(r, wire_mb=(r["bytes_pushed"] + r["bytes_pulled"]) / 1e6, pushed_mb=r["bytes_pushed"] / 1e6)
            if r.get("bytes_pushed") is not None and r.get("bytes_pulled") is not None else r for r in records]


STALENESS = ("staleness_hist", "clock_staleness_hist")   # the keys of server-S.json that ps-plot draws


def read_staleness(run: Path, key: str = "staleness_hist") -> dict[int, int]:
    """Staleness -> applied updates, summed over the ``server-*.json`` files of a run
    (empty if there are none, or the mode has no such histogram)."""
    if key not in STALENESS:
        raise ValueError(f"{key!r}: ps-plot draws {' and '.join(STALENESS)}")
    total: dict[int, int] = {}
    for path in sorted(Path(run).glob("server-*.json")):
        hist = json.loads(path.read_text()).get(key) or {}
        if not isinstance(hist, dict):
            raise ValueError(f"{path}: {key} should map a staleness to a count, got {type(hist).__name__}")
        for k, n in hist.items():
            total[int(k)] = total.get(int(k), 0) + int(n)
    return total


def run_labels(runs: list[Path]) -> list[str]:
    """The folder names, or parent/name where two runs share a name."""
    names = [p.name for p in runs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in runs]


# --- the metrics figure -----------------------------------------------------------------

AGAINST = {"step": ("step", "step"), "time": ("elapsed_s", "wall time (s)"),
           "bytes": ("wire_mb", "bytes on the wire, pushed + pulled (MB)"),
           "pushed": ("pushed_mb", "bytes pushed by the workers (MB)")}
WIRE_AXES = ("bytes", "pushed")                # drawn on a log axis, validation loss only


PANEL_TITLES = {
    "loss_step": ("loss (nats per token)", "step"), "loss_time": ("loss (nats per token)", "wall time (s)"),
    "loss_bytes": ("validation loss (nats per token)", AGAINST["bytes"][1] + ", log scale"),
    "loss_pushed": ("validation loss (nats per token)", AGAINST["pushed"][1] + ", log scale"),
    "tokens": ("tokens per second (whole job)", "step"),
    "bytes": ("bytes on the wire, pushed + pulled (MB, cumulative)", "step"),
    "staleness_hist": ("staleness of the applied updates (share of updates)",
                       "server version at apply - version it was computed on"),
    "clock_staleness_hist": ("clock staleness, asp/ssp (share of updates)",
                             "pusher's clock - slowest worker's clock when it read")}


def _staleness(ax, hists: list, i: int, **style) -> bool:
    """Run ``i``'s staleness histogram (of ``hists``, one per run) on ``ax``: bars side by
    side for a few values, else the cumulative share of updates; True when cumulative."""
    hist = hists[i]
    n = sum(hist.values())
    ks = sorted(hist)
    top = max(max(h, default=0) for h in hists)
    if top <= 20:                              # a few values: bars side by side
        width = 0.8 / len(hists)
        ax.bar([k + (i - (len(hists) - 1) / 2) * width for k in ks], [hist[k] / n for k in ks], width=width, **style)
        ax.set_xticks(range(0, top + 1))
        return False
    xs = list(range(0, max(ks) + 1))           # a long tail (asp): the share of updates <= x, one line per run
    share = numpy.cumsum([hist.get(k, 0) for k in xs]) / n
    ax.step(xs, share, where="post", lw=1.5, **style)
    ax.set_ylim(0, 1.02)
    return True


def _label(axes, panels: list, cumulative: set):
    """Titles, axis labels, scales and legends of the panels; the grid's spare cells hidden."""
    titles = dict(PANEL_TITLES)
    for ax, panel in zip(axes.flat, panels):
        if panel in cumulative:
            ax.set_ylabel("share of updates <= x")
            titles[panel] = (titles[panel][0].replace("(share of updates)", "(cumulative share)"), titles[panel][1])
        if panel[5:] in WIRE_AXES:             # local SGD's H = 1 and H = 400 differ 400x in bytes
            ax.set_xscale("log")
        ax.set_title(titles[panel][0], fontsize=10)
        ax.set_xlabel(titles[panel][1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)


def plot_runs(runs: list, out, title: str = "", against: tuple[str, ...] = ("step", "time")) -> Path:
    """Draw the metrics of ``runs`` (run folders) into ``out`` (a PNG); returns its path.
    ``against``: one loss panel per x axis, of ``step``, ``time``, ``bytes``, ``pushed``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in runs]
    data = [with_wire(read_metrics(r)) for r in runs]
    hists = {key: [read_staleness(r, key) for r in runs] for key in STALENESS}
    has = lambda key: any(series(d, key)[0] for d in data)  # noqa: E731
    bad = [a for a in against if a not in AGAINST]
    if bad or not against:
        raise ValueError(f"--against {','.join(against)}: choose from {', '.join(AGAINST)}")
    for a in set(against) & set(WIRE_AXES):
        if not has("bytes_pushed"):
            raise ValueError(f"--against {a}: no run records bytes on the wire (a ps-train run has none)")
    panels = [f"loss_{a}" for a in against]
    panels += ["tokens"] if has("tokens_per_s") else []
    panels += ["bytes"] if has("bytes_pushed") else []
    # staleness only where some run has any (a synchronous run alone would draw one bar at 0)
    panels += [key for key in STALENESS if any(set(h) - {0} for h in hists[key])]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cumulative = set()                         # the staleness panels drawn as cumulative shares

    def line(ax, xy, **kw):                    # a run without this series adds no legend entry
        if xy[0]:
            ax.plot(*xy, **kw)

    for i, (records, label) in enumerate(zip(data, run_labels(runs))):
        c = colors[i % len(colors)]
        for ax, panel in zip(axes.flat, panels):
            if panel.startswith("loss_"):
                x = AGAINST[panel[5:]][0]
                if panel[5:] not in WIRE_AXES:
                    line(ax, series(records, "loss", x), color=c, lw=1, alpha=0.6, label=f"{label} train")
                    line(ax, series(records, "val_loss", x), color=c, lw=2, marker="o", ms=3, label=f"{label} val")
                else:                          # validation only (train lines are vertical between local-sgd
                    xs, ys = series(records, "val_loss", x)      # rounds), on a log axis: no point at 0 bytes
                    line(ax, ([a for a in xs if a > 0], [b for a, b in zip(xs, ys) if a > 0]), color=c, lw=2,
                         marker="o", ms=3, label=f"{label} val")
            elif panel == "tokens":
                line(ax, series(records, "tokens_per_s"), color=c, label=label)
            elif panel == "bytes":
                line(ax, series(records, "wire_mb"), color=c, label=label)
            elif panel in STALENESS and hists[panel][i]:
                if _staleness(ax, hists[panel], i, color=c, label=label):
                    cumulative.add(panel)
    _label(axes, panels, cumulative)
    fig.suptitle(title or ", ".join(run_labels(runs)), fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --- the timeline figure ----------------------------------------------------------------

# one colour per kind of span; computing warm, the wire red/purple, waiting grey, updating green
SPAN_COLORS = {"forward": "#f5a623", "backward": "#d0701b", "push": "#d62728", "wait": "#b0b0b0",
               "pull": "#1f77b4", "evaluate": "#e377c2", "init": "#7f7f7f",
               "wait for pushes": "#c8c8c8", "store push": "#8c564b", "average": "#bcbd22",
               "norm exchange": "#17becf", "update": "#2ca02c", "reply": "#9467bd"}

def trace_events(run: Path) -> list[dict]:
    """The spans of a run: its merged ``trace.json``, else every ``trace-*.json``."""
    run = Path(run)
    files = [run / "trace.json"] if (run / "trace.json").exists() else sorted(run.glob("trace-*.json"))
    if not files:
        raise FileNotFoundError(f"{run}: no trace.json or trace-*.json; run with --trace (ps-local --trace)")
    events = []
    for f in files:
        events += read_trace(f)
    return events


def span_summary(events: list[dict]) -> list[tuple[str, str, float]]:
    """(process, span, mean milliseconds per step) over the steps every process traced,
    the first and last 10% left out (start-up and the final evaluation)."""
    steps = sorted({e["args"]["step"] for e in events if e["name"] == "step"})
    lo, hi = steps[len(steps) // 10], steps[-1 - len(steps) // 10] if len(steps) > 2 else steps[-1]
    n = max(1, hi - lo + 1)
    total: dict[tuple[str, str], float] = {}
    for e in events:
        if lo <= e.get("args", {}).get("step", -1) <= hi:
            key = (e["process"], e["name"])
            total[key] = total.get(key, 0.0) + e["dur"] / 1e3 / n
    return sorted(((p, name, ms) for (p, name), ms in total.items()),
                  key=lambda r: (not r[0].startswith("server"), r[0], -r[2]))


def plot_timeline(run, out, steps: tuple[int, int] | None = None) -> Path:
    """Draw steps ``[a, b)`` (default: three steps in the middle of the run) of every process
    of a traced run, one lane per process, one colour per kind of span."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = trace_events(Path(run))
    step_spans = [e for e in events if e["name"] == "step"]
    if not step_spans:
        raise ValueError(f"{run}: the trace holds no worker 'step' span")
    last = max(e["args"]["step"] for e in step_spans)
    a, b = steps if steps else (max(0, last // 2 - 1), max(0, last // 2 - 1) + 3)
    window = [e for e in step_spans if a <= e["args"]["step"] < b]
    if not window:
        raise ValueError(f"{run}: no step in [{a}, {b}); the run has steps 0..{last}")
    t0 = min(e["ts"] for e in window)
    t1 = max(e["ts"] + e["dur"] for e in window)
    lanes = sorted({e["process"] for e in events}, key=lambda p: (not p.startswith("server"), p))
    names = sorted({e["name"] for e in events if e["name"] != "step"}, key=lambda n: (n not in SPAN_COLORS, n))
    others = iter(plt.get_cmap("Dark2").colors)
    color = {n: SPAN_COLORS.get(n) or next(others, "black") for n in names}
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(lanes) + 1.8))
    for lane, proc in enumerate(lanes):
        for e in events:
            if e["process"] != proc or e["name"] == "step" or e["ts"] + e["dur"] < t0 or e["ts"] > t1:
                continue
            waiting = e["name"].startswith("wait")        # waits sit under the work that happens meanwhile
            h = 0.8 if waiting else 0.5
            ax.broken_barh([((e["ts"] - t0) / 1e3, e["dur"] / 1e3)], (lane - h / 2, h), facecolors=color[e["name"]],
                           alpha=0.45 if waiting else 1.0, zorder=1 if waiting else 2)
        for e in window:
            if e["process"] == proc:
                ax.axvline((e["ts"] - t0) / 1e3, color="k", lw=0.5, alpha=0.4)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlim(0, (t1 - t0) / 1e3)
    ax.set_xlabel(f"milliseconds from the start of step {a} (thin lines: a worker starts a step)")
    ax.set_title(f"{Path(run).name}: steps {a} to {b - 1} of every process (from --trace)", fontsize=11)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[n], alpha=0.45 if n.startswith("wait") else 1) for n in names]
    ax.legend(handles, names, fontsize=7, ncol=min(6, len(names)), loc="upper center",
              bbox_to_anchor=(0.5, -0.18 - 0.25 / max(1, len(lanes))), frameon=False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


# --- the command ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-plot", description="Plot runs: loss and validation loss against steps and wall time (or bytes on "
        "the wire), tokens per second, bytes on the wire, the staleness of applied updates; several runs overlaid. "
        "With --timeline, where the time of a few steps goes in every process of a traced run (ps-local --trace).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (holding metrics.jsonl)")
    p.add_argument("--out", default="", help="PNG to write (default: RUN_DIR/plot.png, or RUN_DIR/timeline.png; "
                                             "plot.png here for several runs)")
    p.add_argument("--title", default="", help="title of the figure (default: the run names)")
    p.add_argument("--against", default="step,time", metavar="X[,X]",
                   help="the loss panels' x axes, of step, time (wall-clock seconds), bytes (on the wire, pushed + "
                        "pulled, all workers), pushed (bytes pushed, all workers) (default: step,time)")
    p.add_argument("--timeline", action="store_true", help="draw the trace of one run instead of its metrics")
    p.add_argument("--steps", default="", metavar="A:B",
                   help="with --timeline: the steps to draw, A included, B not (default: 3 in the middle)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not r.is_dir():
            parser.error(f"{r}: no such run folder")
    try:
        if args.timeline:
            if len(runs) != 1:
                parser.error("--timeline draws one run at a time")
            steps = None
            if args.steps:
                try:
                    a, b = (int(x) for x in args.steps.split(":"))
                except ValueError:
                    parser.error(f"--steps {args.steps!r}: expected A:B, e.g. 10:13")
                steps = (a, b)
            out = plot_timeline(runs[0], args.out or runs[0] / "timeline.png", steps)
            print("milliseconds per step (mean over the middle 80% of the steps):")
            for proc, name, ms in span_summary(trace_events(runs[0])):
                print(f"  {proc:10s} {name:16s} {ms:9.1f}")
        else:
            out = plot_runs(runs, args.out or (runs[0] / "plot.png" if len(runs) == 1 else Path("plot.png")),
                            args.title, tuple(a.strip() for a in args.against.split(",") if a.strip()))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"ps-plot: {e}", file=sys.stderr)
        return 1
    print(f"ps-plot: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

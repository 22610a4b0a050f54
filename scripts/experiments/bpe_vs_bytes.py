"""Experiment: a BPE against bytes, the default model through ps-local, for equal wall time.

    python scripts/experiments/bpe_vs_bytes.py                   # ~5 minutes on 2 cores
    python scripts/experiments/bpe_vs_bytes.py --seconds 30 --bpe-size 1024

Compares in bits per byte, the measure that is fair across tokenizers: a model's loss
per token (nats) times tokens per byte of text, over ln 2. Steps:

1. ``ps-prepare`` the built-in corpus twice: bytes, and a byte-level BPE of
   ``--bpe-size`` tokens trained on its training split (the same documents, the same split).
2. A short run of each (``--calibrate`` steps) measures its seconds per step.
3. ``ps-local`` (2 servers, 2 workers, BSP, the default model and optimizer; the
   vocabulary follows the tokenizer, the context is 64 TOKENS either way) runs each for
   the steps that fill ``--seconds`` of training at that pace; the validation loss is
   measured every ``--evals``-th of the run.
4. The table: each run's steps, training seconds (``elapsed_s`` in its metrics), final
   validation loss per token, bytes per token of the validation text, and bits per byte;
   and both curves' bits per byte at the times they were measured.

A token of the BPE carries about 3 bytes, so the same 64-token context sees 3x more
text, and a step learns from 3x more text; its logits are 2048 wide instead of 256,
so a step costs more. Which wins in bits per byte at equal time is what this measures.

Not here: the tokenizers (``worker/tokenizer.py``), the prepared files (``worker/tokenfiles.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list, env: dict):
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bpe_vs_bytes: {' '.join(map(str, cmd[:4]))} ... failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def ps_local(data: Path, steps: int, out: Path, eval_interval: int, env: dict) -> list:
    """Train through ps-local; its metrics records."""
    run([sys.executable, "-m", "common.launch.local", "--steps", str(steps), "--out", str(out), "--no-progress",
         "--data", str(data), "--eval-interval", str(eval_interval), "--sample-bytes", "0"], env)
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def seconds_per_step(records: list) -> float:
    timed = [r for r in records if r.get("step", 0) > 0 and "elapsed_s" in r]
    return (timed[-1]["elapsed_s"] - timed[0]["elapsed_s"]) / (timed[-1]["step"] - timed[0]["step"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--seconds", type=float, default=90.0, help="training time of each run (default: 90)")
    p.add_argument("--bpe-size", type=int, default=2048, help="the BPE's vocabulary (default: 2048)")
    p.add_argument("--calibrate", type=int, default=30, help="steps of the pace-measuring runs (default: 30)")
    p.add_argument("--evals", type=int, default=6, help="validation points per run (default: 6)")
    p.add_argument("--out", default="", help="folder for the data and the runs (default: runs/bpe-vs-bytes-<time>)")
    args = p.parse_args(argv)
    out = Path(args.out or time.strftime("runs/bpe-vs-bytes-%Y%m%d-%H%M%S"))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    kinds = {"bytes": "bytes", f"bpe-{args.bpe_size}": f"bpe:{args.bpe_size}"}
    results = {}
    for name, spec in kinds.items():
        data = out / "data" / name
        if not (data / "prepared.json").exists():
            print(run([sys.executable, "-m", "worker.prepare", "--tokenizer", spec, "--out", str(data)], env).strip())
        pace = seconds_per_step(ps_local(data, args.calibrate, out / f"calibrate-{name}", args.calibrate, env))
        steps = max(args.evals, round(args.seconds / pace))
        records = ps_local(data, steps, out / name, max(1, steps // args.evals), env)
        bpt = next(r["bytes_per_token"] for r in records if "bytes_per_token" in r)
        curve = [(r.get("elapsed_s", 0.0), r["step"], r["val_loss"] / math.log(2) / bpt)
                 for r in records if "val_loss" in r]
        results[name] = {"steps": steps, "seconds": records[-1]["elapsed_s"], "val_loss": records[-1]["val_loss"],
                         "bytes_per_token": bpt, "bits_per_byte": curve[-1][2], "curve": curve,
                         "s_per_step": pace}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'tokenizer':<12} {'steps':>6} {'seconds':>8} {'val loss/token':>15} {'bytes/token':>12} "
          f"{'bits/byte':>10}")
    for name, r in results.items():
        print(f"{name:<12} {r['steps']:>6} {r['seconds']:>8.1f} {r['val_loss']:>15.4f} {r['bytes_per_token']:>12.3f} "
              f"{r['bits_per_byte']:>10.4f}")
    for name, r in results.items():
        print(f"{name} curve (seconds: bits/byte): "
              + ", ".join(f"{t:.0f}: {b:.3f}" for t, _, b in r["curve"]))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

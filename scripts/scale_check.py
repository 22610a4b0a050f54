"""GPT-2's shape through the servers: every process's peak memory against a formula, and the speed.

    python scripts/scale_check.py                      # GPT-2 124M: 12 layers, 12 heads, n_embd 768, ctx 1024, V 50257
    python scripts/scale_check.py --shape mid          # n_embd 768, 2 layers, ctx 128, V 50257 (the CI test's)

Runs ``ps-local`` (2 servers, 2 workers, a few steps of batch 1 by default, AdamW) on
the built-in corpus as bytes with the model's vocabulary set to GPT-2's 50,257 (the
ids a byte never takes are rows no token uses: the same memory and compute as GPT-2's
own tokens), then prints for each process its peak resident memory (``ru_maxrss``,
reported at exit by a ``sitecustomize`` this script puts on the job's ``PYTHONPATH``),
what the formula below says it must hold, their ratio, and the job's seconds per step
and tokens per second. Goal: every ratio under 1.5.

The formula, in float32 elements (4 bytes each) plus the Python runtime R (the peak of
an interpreter that imported the same modules, measured here), for a model of P
parameters, batch B, context T, C channels, L layers, NH heads, V tokens:

  worker     R + 4 [ 2P                      params and grads (the wire sends and receives them in place)
                   + B T (L (24 C + NH T + 4) + 15 C + 2 V + 4)     activations and their gradients
                   + C V + 12 C^2 + B NH T^2 + 2 B T C + 2 G        the fast path's work buffers
                                                                    (G: GELU's slice, <= 2^17)
                   + 2P ]                    --shm auto (ps-local's default, servers on its host): its
                                             segment, which its pushes are copied into, and the
                                             servers' segments its answers are read from (the
                                             servers' own parameters: counted in both, held once)
  server s   R + 4 n_s [ 2 + k + W ]   n_s: its elements; params and the averaged gradient;
             k optimizer vectors (AdamW 2, momentum 1, sgd 0); the W workers' pushes of a
             step, held as received until the step's set is agreed

Saves and checkpoints write from the arrays (``common/stfile.py``) and add nothing;
nothing else may copy the whole vector: a ratio well above 1 would show one.

Not here: GPU memory (``scripts/bench_gpu.py``), the single-process trainer.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                  # run from a clone without installing
from common import placement  # noqa: E402
from worker.fastlayers import CHUNK_ELEMS  # noqa: E402
from worker.model import GPTConfig  # noqa: E402

SHAPES = {"gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
          "mid": dict(vocab_size=50257, block_size=128, n_layer=2, n_head=12, n_embd=768)}
OPTIMIZER_VECTORS = {"sgd": 0, "momentum": 1, "adamw": 2}
MiB = 1 << 20

# each process that imports this writes its peak RSS when it exits
SITECUSTOMIZE = '''import atexit, json, os, resource, sys
_dir = os.environ.get("PS_RSS_DIR")
if _dir:
    def _report():
        with open(os.path.join(_dir, f"{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.argv, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, f)
    atexit.register(_report)
'''
RUNTIME_IMPORTS = ("import numpy, zmq, msgpack, tokenizers, safetensors.numpy, worker.distributed, worker.tasks, "
                   "worker.__main__, paramserver.server, paramserver.__main__, common.launch.local")


def activation_elements(cfg: GPTConfig, B: int) -> int:
    """Activations and their gradients, and the fast path's work buffers, in elements (see the docstring)."""
    T, C, L, NH, V = cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size
    acts = B * T * (L * (24 * C + NH * T + 4) + 15 * C + 2 * V + 4)
    gelu = max(1, CHUNK_ELEMS // (4 * C)) * 4 * C                   # worker/fastlayers.py works in slices
    scratch = C * V + 12 * C * C + B * NH * T * T + 2 * B * T * C + 2 * gelu
    return acts + scratch


def formula(cfg: GPTConfig, B: int, S: int, W: int, optimizer: str, chunk_mb: float, shm: bool) -> dict:
    """process name -> {part: bytes}, the runtime left out."""
    P = cfg.layout().size
    out = {}
    for r in range(W):
        out[f"worker-{r}"] = {"params+grads": 8 * P, "activations": 4 * activation_elements(cfg, B)}
        if shm:
            out[f"worker-{r}"]["shm"] = 8 * P
    k = OPTIMIZER_VECTORS[optimizer]
    for s, n in enumerate(placement.loads(placement.place_chunks(cfg.layout(), S, chunk_mb), S)):
        out[f"server-{s}"] = {"params+avg": 8 * n, "optimizer": 4 * k * n, "pushes": 4 * W * n}
    return out


def measure_runtime(env: dict) -> int:
    """Peak RSS of an interpreter that imported what the roles import."""
    rss = Path(env["PS_RSS_DIR"])
    before = set(rss.iterdir())
    subprocess.run([sys.executable, "-c", RUNTIME_IMPORTS], env=env, check=True)
    new = [p for p in rss.iterdir() if p not in before]
    value = json.loads(new[0].read_text())["maxrss"]
    for p in new:
        p.unlink()
    return value


def role_of(argv: list) -> str | None:
    """``worker-R`` / ``server-S`` from a role's command line (None for other processes)."""
    if "--rank" not in argv:
        return None
    rank = argv[argv.index("--rank") + 1]
    return f"{'server' if 'paramserver' in argv[0] else 'worker'}-{rank}"


def run(args) -> tuple[dict, dict, float, dict]:
    """Run the job; return (peaks by process, formula, runtime bytes, figures)."""
    cfg = GPTConfig(**SHAPES[args.shape])
    out = Path(args.out or tempfile.mkdtemp(prefix="scale-check-"))
    hook = Path(tempfile.mkdtemp(prefix="scale-check-hook-"))
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (hook / "rss").mkdir()
    env = dict(os.environ, PS_RSS_DIR=str(hook / "rss"), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(hook), str(ROOT), os.environ.get("PYTHONPATH")])))
    runtime = measure_runtime(env)
    shape = [f"--{k.replace('_', '-')}={v}" for k, v in SHAPES[args.shape].items()]
    cmd = [sys.executable, "-m", "common.launch.local", "--servers", str(args.servers), "--workers",
           str(args.workers), "--steps", str(args.steps), "--out", str(out), "--no-progress", "--timeout",
           str(args.timeout), "--optimizer", args.optimizer, *shape, "--batch-size", str(args.batch_size),
           "--log-interval", "1", "--eval-interval", str(args.steps), "--eval-batches", "1", "--sample-bytes", "0",
           "--shm", args.shm]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"scale_check: ps-local failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    peaks = {}
    for p in (hook / "rss").iterdir():
        rec = json.loads(p.read_text())
        name = role_of(rec["argv"])
        if name:
            peaks[name] = rec["maxrss"]
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("step", 0) > 0 and "elapsed_s" in r]
    # seconds per step over the steps after the first (which also pays for starting up)
    per_step = ((steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / (steps[-1]["step"] - steps[0]["step"])
                if len(steps) > 1 else float("nan"))
    tokens = args.workers * args.batch_size * cfg.block_size
    figures = {"params": cfg.layout().size, "s_per_step": per_step, "tokens_per_s": tokens / per_step,
               "wall_s": wall, "out": str(out)}
    parts = formula(cfg, args.batch_size, args.servers, args.workers, args.optimizer, 4.0, args.shm == "auto")
    return peaks, parts, runtime, figures


def report(peaks, parts, runtime, figures, args) -> float:
    """Print the table; return the largest ratio."""
    cfg = SHAPES[args.shape]
    print(f"scale_check: {args.shape} shape {cfg}, {figures['params']:,} parameters; {args.servers} servers, "
          f"{args.workers} workers, batch {args.batch_size} x {cfg['block_size']} tokens each, {args.optimizer}, "
          f"{args.steps} steps; Python runtime R = {runtime / MiB:.0f} MiB")
    print(f"{'process':<10} {'peak RSS':>10} {'formula':>10} {'ratio':>6}   formula's parts (MiB, + R)")
    worst = 0.0
    for name in sorted(parts, key=lambda n: (n[0] != "s", n)):
        want = runtime + sum(parts[name].values())
        got = peaks.get(name)
        if got is None:
            print(f"{name:<10} {'(no report)':>10}")
            worst = float("inf")
            continue
        ratio = got / want
        worst = max(worst, ratio)
        detail = ", ".join(f"{k} {v / MiB:.0f}" for k, v in parts[name].items())
        print(f"{name:<10} {got / MiB:>7.0f} MiB {want / MiB:>6.0f} MiB {ratio:>6.2f}   {detail}")
    print(f"{figures['s_per_step']:.2f} s/step, {figures['tokens_per_s']:,.0f} tokens/s (the job's, steps 2..N); "
          f"whole run {figures['wall_s']:.0f} s; run folder {figures['out']}")
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt2", help="model shape (default: gpt2, 124M)")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1, help="sequences per worker per step (default: 1)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZER_VECTORS), default="adamw")
    p.add_argument("--timeout", type=float, default=600.0, help="ps-local's --timeout (default: 600 s)")
    p.add_argument("--shm", choices=("auto", "off"), default="auto",
                   help="ps-local's --shm: arrays through shared memory between the processes of this host "
                        "(default: auto)")
    p.add_argument("--out", default="", help="run folder (default: a temporary folder)")
    p.add_argument("--max-ratio", type=float, default=1.5,
                   help="exit 1 if a process's peak RSS passes this many times its formula (default: 1.5)")
    args = p.parse_args(argv)
    worst = report(*run(args), args)
    if worst > args.max_ratio:
        print(f"scale_check: a process holds {worst:.2f}x its formula (> {args.max_ratio})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

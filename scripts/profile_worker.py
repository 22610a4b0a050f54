"""Where a training step of the NumPy worker spends its time, layer function by layer function.

Wraps every layer function that ``worker/model.py`` calls with a CPU-time timer (thread
time, so that other processes on a shared machine do not inflate it), runs a few
training steps (zero_grad, forward, backward, AdamW), and prints the time per function
per step, sorted, with its share of the step. It is a profiling aid, not a benchmark
(see ``scripts/bench_worker.py`` for the ratio against PyTorch).

    PYTHONPATH=$PWD OPENBLAS_NUM_THREADS=1 python scripts/profile_worker.py --config B [--reference]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import worker.fastlayers as wfl  # noqa: E402
import worker.fastmodel as wfm  # noqa: E402
import worker.model as wm  # noqa: E402
from bench_worker import ADAMW, CONFIGS, _batch  # noqa: E402
from common.optim import OptimConfig, make_optimizer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=list(CONFIGS), default="A")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reference", action="store_true", help="profile the reference path (worker/layers.py)")
    args = ap.parse_args(argv)

    totals = collections.defaultdict(float)
    calls = collections.Counter()

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                totals[name] += time.thread_time() - t0
                calls[name] += 1
        return wrapper

    # the layer functions as the model's two paths see them: the reference path calls
    # the names imported into worker.model, the fast path worker.fastlayers.* and the
    # names imported into worker.fastmodel
    for mod, tag in ((wm, ""), (wfm, ""), (wfl, "fast.")):
        for name in dir(mod):
            obj = getattr(mod, name)
            if callable(obj) and name.endswith(("_forward", "_backward")):
                setattr(mod, name, timed(tag + name, obj))

    cfg = CONFIGS[args.config]
    model = wm.GPT(wm.GPTConfig(**{k: v for k, v in cfg.items() if k != "batch"}), seed=0,
                   reference=args.reference)
    opt = make_optimizer(OptimConfig(optimizer="adamw", **ADAMW), model.params.size, np.float32,
                         model.layout.decay_ranges())
    idx, targets = _batch(cfg)
    parts = {"zero_grad": model.zero_grad, "forward": lambda: model.forward(idx, targets),
             "backward": model.backward, "optimizer": lambda: opt.step(model.params, model.grads, ADAMW["lr"])}
    for _ in range(2):                                   # warm up, then forget
        for fn in parts.values():
            fn()
    totals.clear()
    calls.clear()
    step_total = 0.0
    for _ in range(args.steps):
        for name, fn in parts.items():
            t0 = time.thread_time()
            fn()
            dt = time.thread_time() - t0
            totals["[" + name + "]"] += dt
            step_total += dt
    n = args.steps
    print(f"config {args.config}: {1e3 * step_total / n:.1f} ms/step over {n} steps "
          f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')})")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:34s} {1e3 * t / n:8.2f} ms/step  {100 * t / step_total:5.1f}%  "
              f"{calls[name] // n if calls[name] else '':>4}")


if __name__ == "__main__":
    main()

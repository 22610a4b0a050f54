"""GFLOP/s of float32 matrix products in NumPy (OpenBLAS) and PyTorch, on the GPT's shapes.

Backs one claim of docs/benchmarks.md: on the linear layers of configs A and B (and on
attention's batched QK^T) PyTorch's CPU GEMM is about as fast as NumPy's, so the
worker cannot count on a BLAS advantage. Each library runs in its own subprocess with
its thread variables set before import; the libraries alternate over ``--rounds``
rounds and each figure is the best (shortest) call of all rounds: on a shared machine
the best call is the one that ran undisturbed, which is what a peak rate is about.

    PYTHONPATH=$PWD python scripts/bench_gemm.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = [  # (rows, in, out): x (rows, in) @ W (in, out); 2048 tokens per step
    (2048, 128, 384), (2048, 128, 512), (2048, 512, 128),       # config A
    (2048, 384, 1152), (2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384),   # config B
]
ATTN = (8, 6, 256, 64)      # config B's (batch, heads, T, head size) for QK^T


def _child(lib: str, threads: int) -> dict:
    import numpy as np

    def best_time(fn, n=15):         # the best of n calls, after one warm-up call
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    out = {}
    rng = np.random.default_rng(0)
    B, NH, T, hs = ATTN
    if lib == "torch":
        import torch
        torch.set_num_threads(threads)
        for m, k, n in SHAPES:
            a, w = torch.randn(m, k), torch.randn(k, n)
            o = torch.empty(m, n)
            out[f"{m}x{k}x{n}"] = 2 * m * k * n / best_time(lambda: torch.mm(a, w, out=o)) / 1e9
        q, kk = torch.randn(B, NH, T, hs), torch.randn(B, NH, T, hs)
        out["attn_qk"] = 2 * B * NH * T * T * hs / best_time(lambda: q @ kk.transpose(-2, -1)) / 1e9
    else:
        for m, k, n in SHAPES:
            a = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((k, n), dtype=np.float32)
            o = np.empty((m, n), np.float32)
            out[f"{m}x{k}x{n}"] = 2 * m * k * n / best_time(lambda: np.matmul(a, w, out=o)) / 1e9
        q = rng.standard_normal((B, NH, T, hs), dtype=np.float32)
        kk = rng.standard_normal((B, NH, T, hs), dtype=np.float32)
        out["attn_qk"] = 2 * B * NH * T * T * hs / best_time(lambda: q @ kk.transpose(0, 1, 3, 2)) / 1e9
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (default 1)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--_child", choices=["numpy", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(_child(args._child, args.threads)))
        return
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    res = {"numpy": {}, "torch": {}}
    for r in range(args.rounds):
        for lib in (("numpy", "torch") if r % 2 == 0 else ("torch", "numpy")):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", lib,
                                   "--threads", str(args.threads)], env=env, capture_output=True,
                                  text=True)
            if proc.returncode:
                raise SystemExit(f"{lib} failed:\n{proc.stderr[-2000:]}")
            for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                res[lib][k] = max(v, res[lib].get(k, 0.0))
    print(f"{'shape':>16s} {'numpy GF/s':>11s} {'torch GF/s':>11s}  ({args.threads} thread(s))")
    for key in res["numpy"]:
        print(f"{key:>16s} {res['numpy'][key]:11.0f} {res['torch'][key]:11.0f}")
    print(json.dumps({"threads": args.threads, **{lib: {k: round(v, 1) for k, v in r.items()}
                                                   for lib, r in res.items()}}))


if __name__ == "__main__":
    main()

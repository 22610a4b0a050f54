"""Training throughput of the CuPy worker against PyTorch eager on the same GPU, with MFU.

Target P6 of BASELINES.md: our GPT on a GPU (``GPT(device="cuda")``: the kernels of
worker/kernels/, cuBLAS matmuls, the fused AdamW kernel) >= 1.0x PyTorch eager
(scripts/torch_gpt.py, the same architecture written as PyTorch users write it, with
``torch.optim.AdamW``), on the GPT-2 124M shape (12 layers, 12 heads, d 768, ctx 1024,
vocab 50257 or 50304), the same batch, the same precision, measured in the same run.
Run it as ``python scripts/bench_worker.py --device cuda`` (or this file directly).

How it measures:
- each framework runs in its own subprocess (GPU memory and allocator caches are not
  shared), both from the same initial weights and the same batch (the first losses
  are printed side by side: they must agree, or the comparison is void);
- one timed step = zero_grad + forward + backward + AdamW step, then a device
  synchronisation; warmup steps (kernel compilation, cuBLAS heuristics, the memory
  pools) are excluded; the frameworks alternate in rounds and the figure is the
  median step time over every round;
- ours runs twice: ``ours`` with the memory-efficient attention (saves lse, never a
  T x T matrix) and ``ours-att`` keeping the T x T matrix with its products in cuBLAS,
  as torch eager does; each gets its ratio;
- precision: ``bf16`` (default) is our 16-bit activations with float32 master
  parameters against ``torch.autocast(bfloat16)`` with float32 parameters; ``fp32`` is
  float32 everywhere, TF32 off on both sides (ours: CUBLAS_COMPUTE_32F; torch:
  allow_tf32 False); ``fp16`` adds loss scaling on both sides (ours: worker/devicemodel.py;
  torch: GradScaler).

MFU (model FLOPs utilisation, as in the PaLM paper, Chowdhery et al. 2022, appendix B):
FLOPs per token = 6 N + 12 L T C, where N counts the parameters of the matmuls
(12 C^2 per block and the tied V x C output projection; embeddings' lookups, biases
and LayerNorms are left out) and 12 L T C is attention's q.k and att.v products over
the full T x T (the causal half is not subtracted, as in PaLM and nanoGPT); MFU =
tokens/s x FLOPs per token / the GPU's peak. The peak is the dense (no sparsity)
figure of NVIDIA's datasheet for the detected GPU and the precision: the tensor-core
bf16/fp16 figure for bf16 and fp16, the non-tensor fp32 figure for fp32 (TF32 is
off); ``--peak-tflops`` overrides it. The last line printed is one JSON object.

Not measured: the parameter server (push and pull: scripts/bench_sync.py), the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = {
    # name: GPT-2 shape and batch
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, batch=8),
    "gpt2-50304": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, batch=8),
    "small": dict(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=384, batch=8),   # config B
}
ADAMW = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
# ours: attention saving lse (memory-efficient kernels); ours-att: saving the T x T att,
# products in cuBLAS (as torch eager); torch-sdpa: flash attention, the stronger baseline
FRAMEWORKS = ("ours", "ours-att", "torch", "torch-sdpa")
PRECISIONS = ("bf16", "fp32", "fp16")

# Dense peak TFLOP/s from NVIDIA's datasheets: (bf16/fp16 tensor core, fp32 non-tensor).
# The order matters: the first key found in the device's name wins.
PEAK_TFLOPS = {
    "H200": (989.4, 66.9),          # H200 SXM
    "H100 PCIe": (756.5, 51.2),
    "H100 NVL": (835.5, 60.0),
    "H100": (989.4, 66.9),          # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    "A100": (312.0, 19.5),
}


def flops_per_token(vocab_size: int, block_size: int, n_layer: int, n_embd: int, **_) -> int:
    """Training FLOPs per token of our GPT at context ``block_size``: 6 N + 12 L T C
    (see the module's docstring for what N counts)."""
    matmul_params = n_layer * 12 * n_embd * n_embd + vocab_size * n_embd
    return 6 * matmul_params + 12 * n_layer * block_size * n_embd


def peak_tflops(gpu_name: str, precision: str):
    """(peak TFLOP/s, which entry) for a device name such as ``NVIDIA H100 80GB HBM3``;
    (None, None) for a GPU not in the table."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for key, (half, fp32) in PEAK_TFLOPS.items():
        if key.lower() in gpu_name.lower():
            which = "fp32 (non-tensor)" if precision == "fp32" else "bf16/fp16 dense tensor core"
            return (fp32 if precision == "fp32" else half), f"{key} {which}"
    return None, None


def mfu(tokens_per_s: float, flops_token: int, peak: float | None):
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (None if no peak)."""
    if not peak:
        return None
    return tokens_per_s * flops_token / (peak * 1e12)


# --- child: one framework -------------------------------------------------------------

def _child(framework: str, config: str, precision: str, warmup: int, steps: int,
           torch_device: str = "cuda") -> dict:
    """Build, warm up, time ``steps`` steps; a dict of figures. ``torch_device`` "cpu" is
    for the tests only (they check on a machine without a GPU that both sides start from
    the same weights and loss)."""
    import time

    import numpy as np

    from worker.model import GPT, GPTConfig
    cfg = CONFIGS[config]
    gcfg = GPTConfig(**{k: v for k, v in cfg.items() if k != "batch"})
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, gcfg.vocab_size, size=(cfg["batch"], gcfg.block_size + 1))
    idx, targets = tokens[:, :-1].copy(), tokens[:, 1:].copy()
    if framework.startswith("ours"):
        from common.optim import OptimConfig
        from worker import backend
        from worker.deviceoptim import DeviceOptimizer
        model = GPT(gcfg, seed=0, device="cuda", precision=precision,
                    attention="att" if framework == "ours-att" else "lse")
        xp = model.xp
        opt = DeviceOptimizer(xp, OptimConfig(optimizer="adamw", **ADAMW), model.num_params(),
                              model.dtype, model.layout.decay_ranges())
        device = backend.gpu_name(xp)

        def step():
            model.zero_grad()
            loss = model.forward(idx, targets)
            model.backward()
            opt.step(model.params, model.grads, ADAMW["lr"])
            xp.cuda.Device().synchronize()
            return loss

        def peak_mem():
            return xp.get_default_memory_pool().total_bytes()
    else:
        import torch
        sys.path.insert(0, HERE)
        from torch_gpt import TorchGPT
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        tmodel = TorchGPT.from_config(gcfg, sdpa=framework == "torch-sdpa")
        tmodel.load_flat(GPT(gcfg, seed=0).params)          # our initial weights
        tmodel = tmodel.to(torch_device)
        on_gpu = torch_device != "cpu"
        mats, vecs = tmodel.decay_params()
        topt = torch.optim.AdamW([{"params": mats, "weight_decay": ADAMW["weight_decay"]},
                                  {"params": vecs, "weight_decay": 0.0}],
                                 lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"])
        tidx, ttargets = torch.from_numpy(idx).to(torch_device), torch.from_numpy(targets).to(torch_device)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        scaler = torch.amp.GradScaler(torch_device) if precision == "fp16" else None
        device = torch.cuda.get_device_name() if on_gpu else "cpu"

        def step():
            topt.zero_grad(set_to_none=True)
            with torch.autocast(torch_device, dtype=amp, enabled=amp is not None):
                loss = tmodel(tidx, ttargets)
            if scaler is None:
                loss.backward()
                topt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(topt)
                scaler.update()
            if on_gpu:
                torch.cuda.synchronize()
            return loss.item()

        def peak_mem():
            return torch.cuda.max_memory_allocated() if on_gpu else 0
    first = step()
    for _ in range(max(0, warmup - 1)):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return dict(framework=framework, device=device, times=times, first_loss=float(first),
                loss=float(loss), peak_mem_gib=peak_mem() / 2 ** 30)


def run_child(framework, config, precision, warmup, steps) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", framework, "--config", config,
           "--precision", precision, "--warmup", str(warmup), "--steps", str(steps)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{framework} ({config}, {precision}) failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- parent ---------------------------------------------------------------------------

def summarise(config: str, precision: str, runs: dict, peak_override: float | None = None) -> dict:
    """The report from each framework's list of child results (one per round)."""
    cfg = CONFIGS[config]
    tokens = cfg["batch"] * cfg["block_size"]
    fpt = flops_per_token(**cfg)
    gpu = runs["ours"][0]["device"] if "ours" in runs else next(iter(runs.values()))[0]["device"]
    peak, source = (peak_override, "--peak-tflops") if peak_override else peak_tflops(gpu, precision)
    out = dict(device="cuda", gpu=gpu, config=config, shape=cfg, precision=precision,
               tokens_per_step=tokens, flops_per_token=fpt, peak_tflops=peak, peak_source=source)
    for f, results in runs.items():
        times = [t for r in results for t in r["times"]]
        ms = 1e3 * statistics.median(times)
        tps = tokens / ms * 1e3
        out[f] = dict(ms_per_step=round(ms, 2), tokens_per_s=round(tps, 1), steps_timed=len(times),
                      mfu=None if peak is None else round(mfu(tps, fpt, peak), 4),
                      first_loss=round(results[0]["first_loss"], 4), last_loss=round(results[-1]["loss"], 4),
                      peak_mem_gib=round(max(r["peak_mem_gib"] for r in results), 2))
    for o in (f for f in runs if f.startswith("ours")):
        for t in (f for f in runs if f.startswith("torch")):
            out[f"ratio_{o}_over_{t}".replace("-", "_")] = round(
                out[o]["tokens_per_s"] / out[t]["tokens_per_s"], 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="bench_worker.py --device cuda",
        description=__doc__.split("\n\n")[0] + " Prints tokens/s, ms/step, MFU and peak memory of each "
        "framework, the ratio ours/torch, and a last line of JSON.",
        epilog="configs:\n" + "\n".join(
            f"  {k}: vocab {c['vocab_size']}, ctx {c['block_size']}, {c['n_layer']} layers, "
            f"{c['n_head']} heads, d {c['n_embd']}, batch {c['batch']}" for k, c in CONFIGS.items())
        + "\n\nexample:  PYTHONPATH=$PWD python scripts/bench_worker.py --device cuda --precision bf16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda"], default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=list(CONFIGS), default="gpt2", help="model shape (default gpt2)")
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16", help="(default bf16)")
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (default: the config's, 8)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per framework per round (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed series (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--sdpa", action="store_true",
                    help="also time torch with F.scaled_dot_product_attention (flash attention: a stronger baseline)")
    ap.add_argument("--no-torch", action="store_true", help="time ours only (no ratio)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's peak for MFU (default: the table)")
    ap.add_argument("--_child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.batch:
        for c in CONFIGS.values():
            c["batch"] = args.batch
    if args.steps < 1 or args.rounds < 1 or args.warmup < 1:
        raise SystemExit("--steps, --rounds and --warmup must be >= 1")
    if args._child:
        print(json.dumps(_child(args._child, args.config, args.precision, args.warmup, args.steps)))
        return
    from worker import backend
    try:
        backend.probe("cuda")             # no GPU here: say why, before starting anything
    except backend.BackendError as e:
        raise SystemExit(f"bench_worker.py: {e}") from None
    frameworks = (["ours", "ours-att"] + ([] if args.no_torch else ["torch"])
                  + (["torch-sdpa"] if args.sdpa and not args.no_torch else []))
    runs = {f: [] for f in frameworks}
    print(f"config {args.config}: {CONFIGS[args.config]}, precision {args.precision}", flush=True)
    for r in range(args.rounds):
        for f in (frameworks if r % 2 == 0 else frameworks[::-1]):
            res = run_child(f, args.config, args.precision, args.warmup, args.steps)
            runs[f].append(res)
            print(f"  round {r + 1}/{args.rounds} {f:10s} median {1e3 * statistics.median(res['times']):8.1f} "
                  f"ms/step  first loss {res['first_loss']:.4f}", flush=True)
    out = summarise(args.config, args.precision, runs, args.peak_tflops or None)
    print(f"GPU: {out['gpu']}; {out['flops_per_token'] / 1e6:.1f} MFLOP per token; peak "
          + (f"{out['peak_tflops']:g} TFLOP/s ({out['peak_source']})" if out["peak_tflops"] else
             "unknown (not in the table: give --peak-tflops)"))
    for f in frameworks:
        o = out[f]
        print(f"{f:10s} {o['ms_per_step']:9.1f} ms/step {o['tokens_per_s']:10.0f} tokens/s  MFU "
              + (f"{100 * o['mfu']:5.1f}%" if o["mfu"] is not None else "  n/a")
              + f"  peak memory {o['peak_mem_gib']:.1f} GiB  first loss {o['first_loss']:.4f}")
    losses = [out[f]["first_loss"] for f in frameworks]
    if max(losses) - min(losses) > 0.05:
        print(f"WARNING: the first losses differ ({losses}): the models do not compute the same thing, "
              "so the ratio compares nothing")
    for k, v in out.items():
        if k.startswith("ratio_"):
            print(f"{k} = {v:.3f}  (target >= 1.0)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Everything owed to a GPU, in one run: ``scripts/gpu_check.sh [--emulated] [--quick] OUTDIR``.

On a machine with an NVIDIA GPU (the default mode) it runs, each under a deadline,
about 8 minutes in all:
  kernels       every kernel against its NumPy layer on the GPU, compiled for it by NVRTC
                (tests/test_kernels_compile.py, tests/test_kernels_gpu.py);
  model         the whole GPT on its CUDA path against the NumPy model (tests/test_gpu_model_gpu.py);
  job-fp32      ps-local: a CuPy worker beside two CPU workers, BSP; the loss must fall;
  job-bf16      ps-local: a bf16 CuPy worker beside a CPU worker;
  bench-bf16, bench-fp32
                ours against PyTorch eager at the GPT-2 124M shape: tokens/s, the ratio, MFU.
With ``--emulated`` the same list runs where it can on the CPU emulator of tests/cuda_emu
(the kernels with the race checker and at GPT-2 shapes, the whole model, an emulated
GPU worker beside a CPU worker in one BSP job, the benchmark's two children at a tiny
shape against torch on the CPU); what only a GPU can tell is reported "skipped: needs a
GPU", never passed. ``--quick`` runs one case of each check (the test suite runs
``--emulated --quick``, tests/test_gpu_check.py).

It writes OUTDIR/report.json and OUTDIR/report.md (each check: status, seconds,
figures, the command, the end of its output on failure; the GPU's name) and exits 1 if
any check failed. Nothing here claims a GPU check passed unless it ran on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PY = sys.executable


def _pytest(files, select=None):
    return [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files] + (["-k", select] if select else [])


def checks(emulated: bool, quick: bool, out: pathlib.Path):
    """[(name, what it shows, command or None (why not), deadline in seconds)]."""
    q = (lambda k: k if quick else None)        # noqa: E731
    if emulated:
        return [
            ("kernels", "every kernel vs NumPy on the emulator, race-checked; barriers mutation-tested",
             _pytest(["tests/test_kernels_emulated.py", "tests/test_emulator_races.py"],
                     q("gelu or report")), 900),
            ("kernels-gpt2", "each family at GPT-2 124M shapes (fp32, bf16) and the 124M launch geometry",
             _pytest(["tests/test_kernels_gpt2_shapes.py", "tests/test_kernels_geometry.py"],
                     q("(softmax_ce and bf16) or limits")), 900),
            ("model", "the whole GPT on its CUDA path vs the NumPy model",
             _pytest(["tests/test_gpu_model_emulated.py"], q("lse and float32-fp32")), 900),
            ("job-fp32", "an emulated GPU worker beside a CPU worker, BSP, vs an all-CPU job",
             _pytest(["tests/test_gpu_worker_emulated.py"], "beside" if quick else "beside or staging"), 900),
            ("job-bf16", "a bf16 GPU worker beside CPU workers in ps-local", "skipped: needs a GPU", 0),
            ("bench", "ours vs torch: the same first loss at a tiny shape (emulated; no timing)",
             _pytest(["tests/test_bench_gpu.py"], "same_loss"), 600),
            ("bench-timing", "tokens/s vs torch eager at GPT-2 124M, MFU", "skipped: needs a GPU", 0),
        ]
    runs = out / "runs"
    return [
        ("kernels", "every kernel vs NumPy on the GPU (NVRTC sm_80/sm_90 compile included)",
         _pytest(["tests/test_kernels_compile.py", "tests/test_kernels_gpu.py"]), 150),
        ("model", "the whole GPT on the GPU vs the NumPy model", _pytest(["tests/test_gpu_model_gpu.py"]), 90),
        ("job-fp32", "ps-local: a CuPy worker beside two CPU workers, BSP",
         [PY, "scripts/run_local.py", "--workers", "3", "--devices", "cuda:0,cpu,cpu", "--steps", "60",
          "--no-progress", "--out", str(runs / "gpu-cpu-cpu")], 60),
        ("job-bf16", "ps-local: a bf16 CuPy worker beside a CPU worker",
         [PY, "scripts/run_local.py", "--workers", "2", "--devices", "cuda:0,cpu", "--precision", "bf16",
          "--steps", "60", "--no-progress", "--out", str(runs / "gpu-bf16")], 60),
        ("bench-bf16", "ours vs torch eager, GPT-2 124M, bf16",
         [PY, "scripts/bench_worker.py", "--device", "cuda", "--precision", "bf16", "--rounds", "2",
          "--steps", "5", "--warmup", "2"], 60),
        ("bench-fp32", "ours vs torch eager, GPT-2 124M, fp32",
         [PY, "scripts/bench_worker.py", "--device", "cuda", "--precision", "fp32", "--rounds", "2",
          "--steps", "3", "--warmup", "1"], 60),
    ]


def figures(name, output):
    """The numbers a check's output carries: pytest's counts, a job's losses, a benchmark's JSON."""
    fig = {}
    m = re.search(r"(\d+) passed", output)
    if m:
        fig["passed"] = int(m.group(1))
    for key in ("failed", "skipped", "errors?"):
        m = re.search(rf"(\d+) {key}\b", output)
        if m:
            fig[key.rstrip("s?")] = int(m.group(1))
    m = re.search(r"mutation score: (\d+)/(\d+)", output)
    if m:
        fig["mutation_score"] = f"{m.group(1)}/{m.group(2)}"
    losses = [float(x) for x in re.findall(r"(?:val_loss|validation loss) ([0-9.]+)", output)]
    if losses:
        fig["val_loss_first"], fig["val_loss_last"] = losses[0], losses[-1]
    for line in reversed(output.strip().split("\n")):
        if name.startswith("bench-") and line.startswith("{"):
            bench = json.loads(line)
            fig.update({k: v for k, v in bench.items() if k.startswith("ratio_") or k == "gpu"})
            for f in ("ours", "ours-att", "torch"):
                if f in bench:
                    fig[f"{f}_tokens_per_s"] = bench[f]["tokens_per_s"]
                    fig[f"{f}_mfu"] = bench[f]["mfu"]
            break
    return fig


def run_check(name, what, cmd, deadline, env):
    if isinstance(cmd, str):
        return dict(name=name, what=what, status="skipped", reason=cmd, seconds=0.0, figures={}, command=None)
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=deadline)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output, code = output + f"\n(deadline of {deadline} s passed)", -1
    fig = figures(name, output)
    ok = code == 0 and not fig.get("failed") and not fig.get("error")
    if ok and "val_loss_first" in fig and fig["val_loss_last"] >= fig["val_loss_first"]:
        ok = False
        output += "\nthe validation loss did not fall"
    status = "pass" if ok else "fail"
    if ok and fig.get("skipped") and not fig.get("passed"):       # every test of it skipped: never a pass
        status = "skipped"
    result = dict(name=name, what=what, status=status, seconds=round(time.monotonic() - start, 1),
                  figures=fig, command=" ".join(cmd), exit_code=code, output_tail=None if ok else output[-3000:])
    if status == "skipped":
        reasons = [ln.split("] ", 1)[-1] for ln in output.splitlines() if ln.startswith("SKIPPED")]
        result["reason"] = "skipped: " + ("; ".join(reasons[:3]) or "every test of it skipped")
    return result


def gpu_name(env):
    code = ("from worker import backend; import cupy; backend.select('cuda'); print(backend.describe('cuda'))")
    done = subprocess.run([PY, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode:
        return None, (done.stderr.strip().split("\n") or ["?"])[-1]
    return done.stdout.strip(), None


def write_report(out, report):
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"# GPU check ({report['mode']})", "", f"GPU: {report['gpu']}", f"Verdict: **{report['verdict']}**", "",
             "| check | status | seconds | figures | what |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        fig = ", ".join(f"{k} {v}" for k, v in c["figures"].items()) or c.get("reason", "")
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']} | {fig} | {c['what']} |")
    for c in report["checks"]:
        if c["status"] == "fail":
            lines += ["", f"## {c['name']}: failed", "", f"`{c['command']}`", "", "```", c["output_tail"], "```"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", help="where report.md and report.json go")
    ap.add_argument("--emulated", action="store_true", help="run on the CPU emulator (no GPU)")
    ap.add_argument("--quick", action="store_true", help="one case of each check (what the test suite runs)")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    mode = "emulated" if args.emulated else "gpu"
    if args.emulated:
        gpu, why = "none: the CPU emulator of tests/cuda_emu (no GPU check is claimed)", None
    else:
        gpu, why = gpu_name(env)
    results = []
    for name, what, cmd, deadline in checks(args.emulated, args.quick, out):
        if why:                                   # no usable GPU: every check fails, saying why
            results.append(dict(name=name, what=what, status="fail", seconds=0.0, figures={}, command=None,
                                reason=f"no GPU: {why}", output_tail=f"no GPU: {why}"))
            continue
        print(f"[gpu_check] {name}: {what} ...", flush=True)
        results.append(run_check(name, what, cmd, deadline, env))
        print(f"[gpu_check] {name}: {results[-1]['status']} ({results[-1]['seconds']} s) "
              f"{results[-1]['figures'] or results[-1].get('reason', '')}", flush=True)
    failed = [c["name"] for c in results if c["status"] == "fail"]
    report = dict(mode=mode, quick=args.quick, gpu=gpu or f"none ({why})", checks=results,
                  verdict="FAIL: " + ", ".join(failed) if failed else "pass" + (
                      " (emulated: the GPU checks are still owed)" if args.emulated else ""))
    write_report(out, report)
    print(f"[gpu_check] {report['verdict']}; report: {out / 'report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

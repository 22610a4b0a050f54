"""Sample text from a checkpoint folder, one byte at a time.

    python scripts/generate.py runs/X --prompt "def " --bytes 300 --temperature 0.8 --top-k 40 --seed 0

The sampling itself is ``worker/sample.py``; this script loads a checkpoint folder
and prints the decoded text.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a clone without installing
from worker.model_checkpoint import load_model  # noqa: E402
from worker.sample import generate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample bytes from a GPT-2 checkpoint folder "
                                 "(model.safetensors + config.json, as ps-train writes).")
    ap.add_argument("checkpoint", help="checkpoint folder, e.g. runs/20250101-120000")
    ap.add_argument("--prompt", default="", help="text to continue (default: start at a line break)")
    ap.add_argument("--bytes", type=int, default=300, help="number of bytes to generate (default: 300)")
    ap.add_argument("--temperature", type=float, default=0.8,
                    help="divide the logits by this; 0 = greedy (default: 0.8)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest bytes only; 0 = all (default: 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")
    args = ap.parse_args(argv)
    model = load_model(args.checkpoint)
    out = generate(model, args.prompt.encode(), args.bytes, args.temperature, args.top_k, args.seed)
    sys.stdout.write(out.decode("utf-8", errors="replace") + "\n")


if __name__ == "__main__":
    main()

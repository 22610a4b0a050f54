"""Sample text from a checkpoint folder, one token at a time, decoded by the run's tokenizer.

    python scripts/generate.py runs/X --prompt "def " --tokens 300 --temperature 0.8 --top-k 40 --seed 0

The sampling itself is ``worker/sample.py``; this script loads a checkpoint folder
(``model.safetensors`` + ``config.json``) and its ``tokenizer.json`` (bytes where the
folder has none), encodes the prompt, and prints the decoded text.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a clone without installing
from worker.model_checkpoint import load_model  # noqa: E402
from worker.sample import generate  # noqa: E402
from worker.tokenizer import run_tokenizer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample text from a GPT-2 checkpoint folder "
                                 "(model.safetensors + config.json + tokenizer.json, as ps-train writes).")
    ap.add_argument("checkpoint", help="checkpoint folder, e.g. runs/20250101-120000")
    ap.add_argument("--prompt", default="", help="text to continue (default: start at a line break)")
    ap.add_argument("--tokens", "--bytes", dest="tokens", type=int, default=300,
                    help="number of tokens to generate (bytes, for a byte-level run) (default: 300)")
    ap.add_argument("--temperature", type=float, default=0.8,
                    help="divide the logits by this; 0 = greedy (default: 0.8)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens only; 0 = all (default: 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")
    args = ap.parse_args(argv)
    model = load_model(args.checkpoint)
    tokenizer = run_tokenizer(args.checkpoint)
    prompt = tokenizer.encode(args.prompt or "\n")
    ids = generate(model, prompt, args.tokens, args.temperature, args.top_k, args.seed)
    text = tokenizer.decode(ids)
    sys.stdout.write((text if args.prompt else text[1:]) + "\n")


if __name__ == "__main__":
    main()

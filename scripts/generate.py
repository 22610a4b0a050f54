"""Sample text from a checkpoint folder, one byte at a time.

    python scripts/generate.py runs/X --prompt "def " --bytes 300 --temperature 0.8 --top-k 40 --seed 0

Each new byte is drawn from the model's distribution for the last ``block_size``
bytes: logits divided by the temperature (0 means always the likeliest byte), cut
to the ``top_k`` likeliest when asked, softmax, one draw from a seeded generator, so
the same seed gives the same text. The bytes are decoded as UTF-8 with
``errors="replace"`` (a byte model can emit half a character).

Not here: a key-value cache (every byte reruns the whole window: simple and fast
enough for the small models this project trains), batched sampling, beam search.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a clone without installing
from worker.checkpoint import load_model  # noqa: E402


def generate(model, prompt: bytes, num_bytes: int, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0) -> bytes:
    """``prompt`` followed by ``num_bytes`` sampled bytes."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rng = numpy.random.default_rng(seed)
    tokens = list(prompt) or [ord("\n")]          # an empty prompt starts at a line break
    start = len(tokens)
    T = model.config.block_size
    for _ in range(num_bytes):
        window = numpy.asarray(tokens[-T:], dtype=numpy.int64)[None, :]   # (1, t)
        logits = model.forward(window)[0, -1].astype(numpy.float64)      # (V,)
        if temperature == 0:
            nxt = int(numpy.argmax(logits))
        else:
            logits = logits / temperature
            if 0 < top_k < logits.size:
                cut = numpy.partition(logits, -top_k)[-top_k]
                logits = numpy.where(logits < cut, -numpy.inf, logits)
            p = numpy.exp(logits - logits.max())
            nxt = int(rng.choice(p.size, p=p / p.sum()))
        tokens.append(nxt)
    return bytes(prompt) + bytes(tokens[start:])


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

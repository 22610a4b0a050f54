"""Sampling text from a model, one byte at a time.

Each new byte is drawn from the model's distribution for the last ``block_size``
bytes: logits divided by the temperature (0 means always the likeliest byte), cut
to the ``top_k`` likeliest when asked, softmax, one draw from a seeded generator, so
the same seed gives the same text. A byte model can emit half a UTF-8 character:
callers decode with ``errors="replace"``.

Not here: a key-value cache (every byte reruns the whole window: simple and fast
enough for the small models this project trains), batched sampling, beam search.
"""
from __future__ import annotations

import numpy


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

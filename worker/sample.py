"""Sampling text from a model, one token at a time.

Each new token is drawn from the model's distribution for the last ``block_size``
tokens: logits divided by the temperature (0 means always the likeliest token), cut
to the ``top_k`` likeliest when asked, softmax, one draw from a seeded generator, so
the same seed gives the same text. Tokens are ids: bytes for a byte-level run, the
ids of the run's tokenizer otherwise (``worker/tokenizer.py`` encodes the prompt and
decodes the result). A byte model can emit half a UTF-8 character: decoders replace it.

Not here: a key-value cache (every token reruns the whole window: simple and fast
enough for the small models this project trains), batched sampling, beam search.
"""
from __future__ import annotations

import numpy


def generate(model, prompt, num_tokens: int, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0):
    """``prompt`` (a sequence of token ids; ``bytes`` for a byte model) followed by
    ``num_tokens`` sampled ids: ``bytes`` when the prompt is ``bytes``, else an int64 array."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rng = numpy.random.default_rng(seed)
    tokens = [int(t) for t in prompt] or [ord("\n")]     # an empty prompt starts at a line break
    start = len(tokens)
    T = model.config.block_size
    for _ in range(num_tokens):
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
    if isinstance(prompt, (bytes, bytearray)):
        return bytes(prompt) + bytes(tokens[start:])
    return numpy.asarray([int(t) for t in prompt] + tokens[start:], dtype=numpy.int64)

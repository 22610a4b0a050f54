"""What a worker learns: the model, its batches, its checkpoint and its demonstration.

Two tasks share the loop of ``worker/distributed.py`` and the same servers (which see
only a flat vector either way):

- ``gpt``: ``worker.model.GPT`` (causal attention) predicts the next token (a byte, or
  a BPE token) at every position; checkpoint in GPT-2's form (HF-loadable);
  ``sample.txt`` holds sampled text, decoded by the run's tokenizer.
- ``bert``: ``worker.bert.BERT`` (bidirectional) fills in 15% of the bytes, masked;
  checkpoint by ``save_bert``; ``sample.txt`` shows masked text and the model's guesses.

Not here: the loop, the data pipeline (``worker/data.py``), the layers.
"""
from __future__ import annotations

import numpy

from worker import model_checkpoint as checkpoint
from worker.bert import BERT, MaskedBatches, fill_in, masked_validation, save_bert
from worker.model import GPT, GPTConfig
from worker.sample import generate

MODELS = ("gpt", "bert")


class NextByte:
    """GPT-2: predict every next byte (causal attention)."""

    def __init__(self, config: GPTConfig, seed: int = 0, dtype=None, threads: int = 1,
                 device: str = "cpu", precision: str = "fp32"):
        self.model = GPT(config, dtype=dtype or numpy.float32, seed=seed, threads=threads,
                         device=device, precision=precision)

    def batches(self, sampler, seed: int = 0):
        return sampler                                  # (idx, targets = the next bytes)

    def validation(self, batches):
        return batches

    def save(self, out, step: int):
        checkpoint.save_model(out, self.model, step)

    def demonstrate(self, val_tokens, num_tokens: int, tokenizer, seed: int = 0) -> str:
        prompt = tokenizer.encode("\n")
        ids = generate(self.model, prompt, num_tokens, temperature=0.8, top_k=40, seed=seed)
        return tokenizer.decode(ids)


class MaskedBytes:
    """The BERT-style encoder: fill in masked bytes (bidirectional attention)."""

    def __init__(self, config: GPTConfig, seed: int = 0, dtype=None, threads: int = 1,
                 device: str = "cpu", precision: str = "fp32"):
        if threads != 1:
            raise ValueError("--threads applies to --model gpt; the BERT-style encoder runs on one thread")
        if device != "cpu" or precision != "fp32":
            raise ValueError("--device / --precision apply to --model gpt; the BERT-style encoder "
                             "runs on the CPU in fp32")
        self.model = BERT(config, seed=seed) if dtype is None else BERT(config, dtype=dtype, seed=seed)

    def batches(self, sampler, seed: int = 0):
        return MaskedBatches(sampler, self.model.mask_id, seed)

    def validation(self, batches):
        return masked_validation(batches, self.model.mask_id)

    def save(self, out, step: int):
        save_bert(out, self.model, step)

    def demonstrate(self, val_tokens, num_bytes: int, tokenizer=None, seed: int = 0) -> str:
        return fill_in(self.model, val_tokens[:num_bytes], seed=seed)      # bytes only (checked at start)


def make_task(name: str, config: GPTConfig, seed: int = 0, dtype=None, threads: int = 1,
              device: str = "cpu", precision: str = "fp32"):
    """The task called ``name`` (one of ``MODELS``) with a fresh model drawn from ``seed``;
    ``threads`` > 1 runs slices of each batch in that many threads (worker/model.py);
    ``device`` and ``precision`` put the GPT on a GPU (worker/devicemodel.py)."""
    if name == "gpt":
        return NextByte(config, seed, dtype, threads, device, precision)
    if name == "bert":
        return MaskedBytes(config, seed, dtype, threads, device, precision)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")

"""Where a model's shape and first weights come from: the tokenizer, and ``--init-from``.

Two rules, applied to the parsed command line of every training command (``ps-train``,
``python -m worker``, hence ``ps-local``) before the configuration is built:

- ``--vocab-size`` 0 (the default) means the vocabulary of the data's tokenizer: 256 for
  bytes, the BPE's size for a prepared folder (``worker/tokenfiles.py``). A vocabulary
  given explicitly may be larger than the tokenizer's (rows no token uses, as nanoGPT
  pads GPT-2's 50,257 to 50,304), never smaller.
- ``--init-from DIR`` (a Hugging Face GPT-2 folder: ``config.json`` + ``model.safetensors``,
  the form our checkpoints have) sets the shape to DIR's; a shape flag given explicitly
  must agree with it, except ``--block-size``, which may be shorter than DIR's context
  (the position table is cut to it, as nanoGPT's ``crop_block_size``: a causal model's
  first T positions compute what they computed before). The weights are then read by
  ``load_init`` into the flat buffer (``worker/model_checkpoint.py`` checks every name, shape
  and dtype, and names the tensor that is missing or wrong; Conv1D weights are (in,
  out), as ours).

In a distributed job only worker 0 reads the weights; its INIT seeds the servers, and
every worker pulls them (``worker/distributed.py``).

Not here: the checkpoint format (``worker/model_checkpoint.py``), downloading a model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy

from worker import model_checkpoint as checkpoint

SHAPE = {"vocab_size": "vocab_size", "block_size": "n_positions", "n_layer": "n_layer", "n_head": "n_head",
         "n_embd": "n_embd"}


def checkpoint_shape(folder) -> dict:
    """The model shape (GPTConfig fields) of a GPT-2 folder's ``config.json``."""
    path = Path(folder) / checkpoint.CONFIG_FILE
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise checkpoint.CheckpointError(f"--init-from {folder}: no {checkpoint.CONFIG_FILE}; give a Hugging Face "
                                         "GPT-2 folder (config.json + model.safetensors)") from None
    except (OSError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{path}: cannot read it ({e})") from None
    cfg = checkpoint.gpt_config_from_hf(d, str(path))
    return {k: getattr(cfg, k) for k in SHAPE}


def resolve_shape(args, given: set, tokenizer_vocab: int):
    """Set ``args``' shape from ``--init-from`` and the tokenizer (see the module docstring);
    raise ValueError naming the flag that disagrees."""
    init_from = getattr(args, "init_from", "")
    if init_from:
        for field, value in checkpoint_shape(init_from).items():
            if field == "block_size" and field in given and 0 < args.block_size <= value:
                continue                                 # a shorter context: wpe is cut
            if field in given and getattr(args, field) != value:
                raise ValueError(f"--{field.replace('_', '-')} {getattr(args, field)} disagrees with --init-from "
                                 f"{init_from}, whose config.json says {SHAPE[field]} = {value}")
            setattr(args, field, value)
    if args.vocab_size == 0:
        args.vocab_size = tokenizer_vocab
    if args.vocab_size < tokenizer_vocab:
        raise ValueError(f"the model's vocabulary ({args.vocab_size}) is smaller than the tokenizer's "
                         f"({tokenizer_vocab}); leave --vocab-size at 0 to follow the tokenizer")


def load_init(model, folder) -> dict:
    """Copy the weights of GPT-2 folder ``folder`` into ``model`` (its context may be shorter
    than the folder's: the first rows of ``wpe``); return the file's metadata. Everything
    is checked before anything is copied."""
    cfg, tensors, metadata = checkpoint.read_model(folder)
    T = model.config.block_size
    if dataclasses.replace(cfg, block_size=T) != model.config or T > cfg.block_size:
        raise checkpoint.CheckpointError(f"{folder}: checkpoint config {cfg} does not fit the model's {model.config}")
    xp = getattr(model, "xp", numpy)                  # a GPU model's views are CuPy arrays
    for name, view in model.named_tensors().items():
        view[...] = xp.asarray(tensors[name][:T] if name == "wpe.weight" else tensors[name])
    return metadata

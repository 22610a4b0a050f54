"""Checkpoints in GPT-2's own form, and the trainer state beside them for exact resume.

A checkpoint folder holds:
- ``model.safetensors``: every tensor of ``common/layout.py`` under its GPT-2 name and
  shape (``wte.weight``, ``h.0.attn.c_attn.weight`` ...; linear weights ``(in, out)`` as
  GPT-2's Conv1D), which are the keys of HF's ``GPT2Model`` state dict, and of
  ``GPT2LMHeadModel``'s without the ``transformer.`` prefix (the tied ``lm_head`` is left
  out, as HF itself does). The header's metadata says ``format: pt`` (the tensor layout
  is PyTorch GPT-2's) and carries the layout hash and the step.
- ``config.json``: a configuration HF's ``GPT2Config`` reads (model_type gpt2, GELU tanh
  approximation, LayerNorm eps 1e-5, no dropout, tied embeddings).
- ``trainer_state.safetensors`` (training runs only): the optimizer's arrays as tensors,
  and as JSON in the metadata the step, the optimizer's scalars, the data sampler's
  state and whatever else the trainer needs to continue exactly.

Every file is written atomically: to a temporary file in the same folder, flushed and
fsynced, then renamed over the old one, so a crash leaves the old file or the new one,
never half of one. The two files of a save carry the step, and loading refuses a pair
whose steps differ (a save interrupted between the two renames).

Never pickle: safetensors holds raw arrays and a JSON header, nothing executable.
Not here: the server's shard checkpoints (``paramserver/shard_checkpoint.py``), downloading.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy
from safetensors.numpy import load as st_load

from common.files import atomic_write  # noqa: F401  (re-exported: checkpoint.atomic_write)
from common.stfile import safetensors_parts
from worker import backend
from worker.model import GPT, GPTConfig

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.safetensors"
FORMAT_VERSION = "1"
# buffers and tied weights that HF's own GPT-2 files may hold and that carry no parameters of ours
_HF_EXTRAS = (".attn.bias", ".attn.masked_bias")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with what was expected and what was found."""


# --- config.json ------------------------------------------------------------------------

def hf_config(cfg: GPTConfig) -> dict:
    """The ``config.json`` that HF's ``GPT2Config`` reads for this model."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,                      # None means 4 * n_embd
        "activation_function": "gelu_new",    # GPT-2's tanh approximation of GELU
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": None, "eos_token_id": None,   # bytes: no special tokens
        "torch_dtype": "float32",
    }


def gpt_config_from_hf(d: dict, where: str = CONFIG_FILE) -> GPTConfig:
    """The ``GPTConfig`` a GPT-2 ``config.json`` describes; refuses what this model cannot run."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if d.get("model_type") != "gpt2":
        raise CheckpointError(f"{where}: model_type must be 'gpt2', got {d.get('model_type')!r}")
    checks = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
              "tie_word_embeddings": (True,), "scale_attn_weights": (True,)}
    for key, ok in checks.items():
        if key in d and d[key] not in ok:
            raise CheckpointError(f"{where}: {key} = {d[key]!r} is not supported (expected {ok[0]!r})")
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if k not in d]
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {missing}")
    if d.get("n_inner") not in (None, 4 * d["n_embd"]):
        raise CheckpointError(f"{where}: n_inner = {d['n_inner']} is not supported (expected 4 * n_embd)")
    try:
        return GPTConfig(vocab_size=d["vocab_size"], block_size=d["n_positions"], n_layer=d["n_layer"],
                         n_head=d["n_head"], n_embd=d["n_embd"])
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; is {path.parent} a checkpoint folder?") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, with errors that name the file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; is {path.parent} a checkpoint folder?") from None
    try:
        tensors = st_load(raw)
        n = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8:8 + n]).get("__metadata__") or {}
    except Exception as e:                 # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    return tensors, metadata


def _read_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors header, without reading the tensors."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError(f"header length {n}")
            return json.loads(f.read(n)).get("__metadata__") or {}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; is {path.parent} a checkpoint folder?") from None
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors header ({e})") from None


# --- the model --------------------------------------------------------------------------

def save_model(directory, model: GPT, step: int | None = None):
    """Write ``model.safetensors`` and ``config.json`` of ``model`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = backend.to_host(model.params)          # one copy from a GPU; the vector itself on the CPU
    tensors = {name: numpy.ascontiguousarray(view, dtype=numpy.float32)
               for name, view in model.layout.views(params).items()}
    metadata = {"format": "pt", "paramserver_format": FORMAT_VERSION,
                "layout_hash": model.layout.hash()}
    if step is not None:
        metadata["step"] = str(int(step))
    atomic_write(directory / MODEL_FILE, safetensors_parts(tensors, metadata))     # no copy of the vector
    atomic_write(directory / CONFIG_FILE, (json.dumps(hf_config(model.config), indent=2) + "\n").encode())


def read_model(directory) -> tuple[GPTConfig, dict, dict]:
    """(config, name -> array, metadata) of a checkpoint folder, every tensor checked
    against the GPT-2 layout: names (HF's ``transformer.`` prefix accepted), shapes, dtypes."""
    directory = Path(directory)
    cfg = gpt_config_from_hf(_read_json(directory / CONFIG_FILE), str(directory / CONFIG_FILE))
    path = directory / MODEL_FILE
    raw, metadata = _read_safetensors(path)
    tensors = {}
    for name, arr in raw.items():
        short = name[len("transformer."):] if name.startswith("transformer.") else name
        if short.endswith(_HF_EXTRAS):
            continue
        tensors[short] = arr
    layout = cfg.layout()
    lm_head = tensors.pop("lm_head.weight", None)
    missing = [n for n in layout.names() if n not in tensors]
    unexpected = sorted(set(tensors) - set(layout.names()))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the GPT-2 layout of {CONFIG_FILE}: "
                              f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                              f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for e in layout:
        arr = tensors[e.name]
        if arr.dtype.kind != "f":
            raise CheckpointError(f"{path}: {e.name} has dtype {arr.dtype}, expected a float type")
        if tuple(arr.shape) != e.shape:
            raise CheckpointError(f"{path}: {e.name} has shape {tuple(arr.shape)}, expected {e.shape} "
                                  f"(from {CONFIG_FILE}: weights are (in, out) as GPT-2's Conv1D)")
        if not numpy.isfinite(arr).all():
            raise CheckpointError(f"{path}: {e.name} holds NaN or infinite values")
    if lm_head is not None and not numpy.array_equal(lm_head, tensors["wte.weight"]):
        raise CheckpointError(f"{path}: lm_head.weight differs from wte.weight; this model ties them")
    if "layout_hash" in metadata and metadata["layout_hash"] != layout.hash():
        raise CheckpointError(f"{path}: layout hash {metadata['layout_hash']} != {layout.hash()} of {CONFIG_FILE}")
    return cfg, tensors, metadata


def load_model_into(model: GPT, directory) -> dict:
    """Copy a checkpoint's tensors into ``model`` (same config required); return its metadata."""
    cfg, tensors, metadata = read_model(directory)
    if cfg != model.config:
        raise CheckpointError(f"{directory}: checkpoint config {cfg} differs from the model's {model.config}")
    xp = getattr(model, "xp", numpy)                # a GPU model's views are CuPy arrays
    for name, view in model.named_tensors().items():
        view[...] = xp.asarray(tensors[name])
    return metadata


def load_model(directory, dtype=numpy.float32) -> GPT:
    """A new ``GPT`` with the weights of a checkpoint folder."""
    cfg, _, _ = read_model(directory)
    model = GPT(cfg, dtype=dtype)
    load_model_into(model, directory)
    return model


# --- the trainer state ------------------------------------------------------------------

def save_trainer_state(directory, step: int, optimizer_state: dict, state: dict):
    """Write ``trainer_state.safetensors``: the arrays of ``optimizer_state`` as tensors,
    its other entries and ``state`` (JSON-able: sampler, elapsed time ...) in the metadata."""
    arrays = {f"optimizer.{k}": numpy.ascontiguousarray(v) for k, v in optimizer_state.items()
              if isinstance(v, numpy.ndarray)}
    scalars = {k: v for k, v in optimizer_state.items() if not isinstance(v, numpy.ndarray)}
    meta = {"paramserver_format": FORMAT_VERSION, "step": str(int(step)),
            "optimizer": json.dumps(scalars), "state": json.dumps(state)}
    if not arrays:                        # safetensors wants at least an empty dict; keep one marker
        arrays = {"_empty": numpy.zeros(0, dtype=numpy.float32)}
    atomic_write(Path(directory) / STATE_FILE, safetensors_parts(arrays, meta))


def load_trainer_state(directory, expected_size: int | None = None) -> dict:
    """``{"step", "optimizer": {...arrays and scalars}, "state": {...}}`` of a checkpoint folder.
    Refuses a state whose step differs from ``model.safetensors``'s, or whose optimizer
    arrays are not ``(expected_size,)``."""
    directory = Path(directory)
    path = directory / STATE_FILE
    tensors, meta = _read_safetensors(path)
    try:
        step = int(meta["step"])
        optimizer = json.loads(meta["optimizer"])
        state = json.loads(meta["state"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata lacks or garbles {e}; not a trainer state") from None
    for k, v in tensors.items():
        if k == "_empty":
            continue
        if not k.startswith("optimizer."):
            raise CheckpointError(f"{path}: unexpected tensor {k!r}")
        if expected_size is not None and tuple(v.shape) != (expected_size,):
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, expected ({expected_size},)")
        optimizer[k[len("optimizer."):]] = v
    model_meta = _read_metadata(directory / MODEL_FILE)
    if model_meta.get("step") != str(step):
        raise CheckpointError(f"{directory}: {MODEL_FILE} is from step {model_meta.get('step')} but "
                              f"{STATE_FILE} from step {step} (a save was interrupted?); cannot resume exactly")
    return {"step": step, "optimizer": optimizer, "state": state}

"""Server checkpoints: a shard, its optimizer state and what a restart needs, written atomically.

One file per save, ``server-S-vVERSION.safetensors`` in ``--checkpoint-dir``: the
shard's parameters and the optimizer's arrays as tensors, and as JSON in the header's
metadata everything else a restarted server needs to go on exactly where it stopped:
the version (optimizer steps applied, which also places the learning-rate schedule),
the optimizer's step count, the chunks of the flat vector the shard holds and the
layout hash (a checkpoint of another job or another placement is refused), the
server's addresses (a restarted server binds the same port, so the workers'
connections find it again), the view, the last step the servers agreed on
(``agreement.py``) and the table of applied pushes (``dedupe.py``).

A save goes to a temporary file, is flushed and fsynced, and is renamed over its name
(``common/files.py``): a crash during a save leaves the older checkpoints whole. The
last ``KEEP`` saves are kept, so that a job resumed as a whole can start from a
version that every server holds (``membership.resume_version``). A server writes one
every ``--checkpoint-every`` versions, before it answers the pushes of that version
(so no worker ever holds parameters newer than the newest checkpoint when the period
is 1), and one when it stops.

Never pickle: safetensors is raw arrays plus a JSON header; nothing in it executes.
Not here: when a restarted server may use its checkpoint (``coordinator.py``).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy
from safetensors import SafetensorError
from safetensors.numpy import load as st_load

from common.files import atomic_write
from common.stfile import safetensors_parts

FORMAT = 1
KEEP = 3
_NAME = re.compile(r"server-(\d+)-v(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the text says what differs."""


def path_of(folder, rank: int, version: int) -> Path:
    return Path(folder) / f"server-{rank}-v{version:08d}.safetensors"


def versions(folder, rank: int) -> list[int]:
    """The versions of server ``rank``'s checkpoints in ``folder``, oldest first."""
    if not folder or not Path(folder).is_dir():
        return []
    found = (_NAME.match(p.name) for p in Path(folder).iterdir())
    return sorted(int(m.group(2)) for m in found if m and int(m.group(1)) == rank)


def save(folder, rank: int, shard, layout_hash: str, extra: dict, keep: int = KEEP) -> Path:
    """Write the shard's checkpoint at its version; keep the newest ``keep`` files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    opt = shard.optimizer.state_dict()
    tensors = {"params": shard.params}
    tensors.update({f"optimizer.{k}": v for k, v in opt.items() if isinstance(v, numpy.ndarray)})
    state = {"format": FORMAT, "rank": rank, "version": shard.version, "initialized": shard.initialized,
             "chunks": [list(c) for c in shard.chunks], "dtype": shard.dtype.name, "layout_hash": layout_hash,
             "optimizer": shard.optim_cfg.optimizer, "optimizer_config": dataclasses.asdict(shard.optim_cfg),
             "optimizer_scalars": {k: v for k, v in opt.items() if not isinstance(v, numpy.ndarray)},
             "extra": extra}
    path = path_of(folder, rank, shard.version)
    atomic_write(path, safetensors_parts(tensors, {"state": json.dumps(state)}))    # no copy of the shard
    for old in versions(folder, rank)[:-keep]:
        path_of(folder, rank, old).unlink(missing_ok=True)
    return path


def load(folder, rank: int, version: int, shard, layout_hash: str) -> dict:
    """Restore ``shard`` (parameters, optimizer, version) from server ``rank``'s checkpoint
    of ``version``; returns its ``extra``. Refuses a checkpoint of another shape of job."""
    path = path_of(folder, rank, version)
    try:
        raw = path.read_bytes()
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        state = json.loads(json.loads(raw[8:8 + header_len])["__metadata__"]["state"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        older = [v for v in versions(folder, rank) if v < version]
        offer = (f"; this server's older checkpoints: versions {older} (move this file away to resume from "
                 f"version {older[-1]})" if older else "; this server has no older checkpoint")
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {e}{offer}") from None
    check_matches(path, state, rank, version, shard, layout_hash)
    check_arrays(path, tensors, shard)              # everything checked before anything is written
    shard.params[...] = tensors["params"]
    opt = dict(state["optimizer_scalars"])
    opt.update({k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")})
    shard.optimizer.load_state_dict(opt)
    shard.version = version
    shard.initialized = bool(state["initialized"])
    return state["extra"]


def check_matches(path, state: dict, rank: int, version: int, shard, layout_hash: str):
    """Refuse a checkpoint written by another shape of job, naming the field, both values and
    the file: the placement (number of servers, --chunk-mb), the model (layout hash), the
    dtype, the optimizer and each of its settings (a resume with other settings would not
    continue the same run)."""
    if state.get("format") != FORMAT or state.get("rank") != rank or state.get("version") != version:
        raise CheckpointError(f"{path}: not server {rank}'s checkpoint of version {version} (format {FORMAT})")
    if [tuple(c) for c in state["chunks"]] != list(shard.chunks):
        raise CheckpointError(f"{path}: chunks differ: the checkpoint holds {state['chunks'][:4]}, this server "
                              f"owns {shard.describe_chunks()}: another placement (number of servers, --chunk-mb?)")
    theirs = {"layout_hash": state["layout_hash"], "dtype": state["dtype"], "optimizer": state["optimizer"],
              **{f"optimizer {k}": v for k, v in state.get("optimizer_config", {}).items()}}
    ours = {"layout_hash": layout_hash, "dtype": shard.dtype.name, "optimizer": shard.optim_cfg.optimizer,
            **{f"optimizer {k}": v for k, v in dataclasses.asdict(shard.optim_cfg).items()}}
    differ = [f"{k}: {theirs[k]!r} in the checkpoint, {ours.get(k)!r} in this job" for k in theirs if theirs[k] != ours.get(k)]
    if differ:
        raise CheckpointError(f"{path} was written by another job: " + "; ".join(differ) +
                              ". Resume with the flags of the run that wrote it (its run_config.json)")


def check_arrays(path, tensors: dict, shard):
    """Refuse arrays of other shapes than this shard's parameters and optimizer state."""
    want = {"params": shard.params.shape}
    want.update({f"optimizer.{k}": v.shape for k, v in shard.optimizer.state_dict().items()
                 if isinstance(v, numpy.ndarray)})
    for name, shape in want.items():
        got = tensors.get(name)
        if got is None or got.shape != shape:
            raise CheckpointError(f"{path}: {name} of shape {None if got is None else got.shape}, expected {shape}")


def peek(folder, rank: int, version: int) -> dict:
    """The ``extra`` of a checkpoint without loading its arrays (e.g. the address to bind)."""
    path = path_of(folder, rank, version)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > 64 << 20:
            raise CheckpointError(f"{path}: header of {header_len} bytes")
        state = json.loads(json.loads(f.read(header_len))["__metadata__"]["state"])
    return state["extra"]

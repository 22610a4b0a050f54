"""common/stfile.py writes safetensors that the safetensors library reads back exactly,
without copying the arrays (the 124M model's save costs no extra gigabyte)."""
import json

import numpy as np
import pytest
from safetensors.numpy import load, load_file, save

from common.files import atomic_write
from common.stfile import safetensors_parts


def test_safetensors_reads_what_we_write(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"wte.weight": rng.normal(size=(7, 3)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
               "h.0.x": rng.normal(size=(2, 3, 4)), "empty": np.zeros((0, 4), dtype=np.float32),
               "half": rng.normal(size=9).astype(np.float16), "u": np.arange(3, dtype=np.uint16)}
    meta = {"format": "pt", "step": "3"}
    atomic_write(tmp_path / "a.safetensors", safetensors_parts(tensors, meta))
    back = load_file(tmp_path / "a.safetensors")
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
    raw = (tmp_path / "a.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == meta
    # the library's own writer and ours hold the same tensors
    theirs = load(save(tensors, metadata=meta))
    assert all(np.array_equal(theirs[k], back[k]) for k in tensors)


def test_the_pieces_are_views_not_copies():
    a = np.arange(10, dtype=np.float32)
    header, piece = safetensors_parts({"a": a})
    a[3] = 99.0                                    # the piece sees the array: it is the array's memory
    assert np.frombuffer(piece, dtype=np.float32)[3] == 99.0


def test_refuses_what_it_cannot_write():
    with pytest.raises(ValueError, match="C-contiguous"):
        safetensors_parts({"t": np.zeros((3, 4), dtype=np.float32).T})
    with pytest.raises(ValueError, match="dtype"):
        safetensors_parts({"t": np.zeros(3, dtype=">f4")})
    with pytest.raises(ValueError, match="strings"):
        safetensors_parts({"t": np.zeros(3)}, {"step": 3})

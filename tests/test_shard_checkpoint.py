"""A server's checkpoint (paramserver/shard_checkpoint.py) driven without processes: an
exact round trip, and every mismatch between a checkpoint and the job that resumes it
refused, naming the field, both values and the file, with the shard left as it was."""
import dataclasses

import numpy as np
import pytest

from common.optim import OptimConfig
from paramserver import shard_checkpoint as ck
from paramserver.shard import Shard

CHUNKS = [(0, 6), (6, 10)]
OPTIM = OptimConfig(optimizer="adamw", lr=0.01, weight_decay=0.1)
LAYOUT_HASH = "abc123"


def shard(chunks=CHUNKS, dtype="float32", optim=OPTIM) -> Shard:
    return Shard(chunks, dtype, optim, decay_ranges=[(0, 6)])


def written(folder, version=7) -> Shard:
    """A shard with non-trivial parameters and optimizer state, saved at ``version``."""
    s = shard()
    rng = np.random.default_rng(0)
    s.params[...] = rng.normal(size=s.params.shape)
    s.optimizer.m[...] = rng.normal(size=s.params.shape)
    s.optimizer.v[...] = rng.random(size=s.params.shape)
    s.optimizer.t = version
    s.version, s.initialized = version, True
    ck.save(folder, 1, s, LAYOUT_HASH, {"bind": "tcp://127.0.0.1:5000"})
    return s


def unchanged(s: Shard) -> bool:
    state = s.optimizer.state_dict()
    arrays = [v for v in state.values() if isinstance(v, np.ndarray)]
    return s.version == 0 and not s.params.any() and not any(a.any() for a in arrays) and state["t"] == 0


def test_round_trip_is_exact(tmp_path):
    want = written(tmp_path)
    got = shard()
    assert ck.load(tmp_path, 1, 7, got, LAYOUT_HASH) == {"bind": "tcp://127.0.0.1:5000"}
    assert got.version == 7 and got.initialized and got.optimizer.t == 7
    for a, b in [(got.params, want.params), (got.optimizer.m, want.optimizer.m), (got.optimizer.v, want.optimizer.v)]:
        assert np.array_equal(a, b)


MISMATCHES = {
    "servers": (dict(chunks=[(0, 6)]), "chunks differ"),
    "chunk size": (dict(chunks=[(0, 5), (5, 10)]), "chunks differ"),
    "model": (dict(layout_hash="other"), "layout_hash: 'abc123' in the checkpoint, 'other' in this job"),
    "dtype": (dict(dtype="float64"), "dtype: 'float32' in the checkpoint, 'float64' in this job"),
    "optimizer": (dict(optim=OptimConfig(optimizer="momentum", lr=0.01, weight_decay=0.1)),
                  "optimizer: 'adamw' in the checkpoint, 'momentum' in this job"),
    "learning rate": (dict(optim=dataclasses.replace(OPTIM, lr=0.02)),
                      "optimizer lr: 0.01 in the checkpoint, 0.02 in this job"),
    "weight decay": (dict(optim=dataclasses.replace(OPTIM, weight_decay=0.0)),
                     "optimizer weight_decay: 0.1 in the checkpoint, 0.0 in this job"),
    "beta2": (dict(optim=dataclasses.replace(OPTIM, beta2=0.999)),
              "optimizer beta2: 0.95 in the checkpoint, 0.999 in this job"),
}


@pytest.mark.parametrize("what", list(MISMATCHES))
def test_a_checkpoint_of_another_job_is_refused_naming_the_field_and_both_values(what, tmp_path):
    written(tmp_path)
    change, expected = MISMATCHES[what]
    layout_hash = change.pop("layout_hash", LAYOUT_HASH)
    target = shard(**change)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load(tmp_path, 1, 7, target, layout_hash)
    assert expected in str(e.value) and str(ck.path_of(tmp_path, 1, 7)) in str(e.value), str(e.value)
    assert unchanged(target)


def test_another_servers_or_versions_file_is_refused(tmp_path):
    written(tmp_path)
    path = ck.path_of(tmp_path, 1, 7)
    path.rename(ck.path_of(tmp_path, 2, 7))            # server 1's file where server 2 looks
    target = shard()
    with pytest.raises(ck.CheckpointError, match="not server 2's checkpoint of version 7"):
        ck.load(tmp_path, 2, 7, target, LAYOUT_HASH)
    assert unchanged(target)


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "empty"])
def test_a_corrupt_checkpoint_is_refused_and_the_last_good_version_offered(damage, tmp_path):
    written(tmp_path, version=5)
    written(tmp_path, version=7)
    path = ck.path_of(tmp_path, 1, 7)
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "garbage header": b"\xff" * 8 + raw[8:],
                      "empty": b""}[damage])
    target = shard()
    with pytest.raises(ck.CheckpointError) as e:
        ck.load(tmp_path, 1, 7, target, LAYOUT_HASH)
    text = str(e.value)
    assert f"cannot read {path}" in text and "versions [5]" in text and "resume from version 5" in text, text
    assert unchanged(target)
    ck.load(tmp_path, 1, 5, target, LAYOUT_HASH)        # the offered version is whole
    assert target.version == 5


def test_optimizer_state_of_another_size_is_refused_before_anything_is_written(tmp_path):
    """A checkpoint whose header agrees but whose arrays do not (written by a buggy or foreign
    tool): nothing of it reaches the shard."""
    from safetensors.numpy import load as st_load, save as st_save
    written(tmp_path)
    path = ck.path_of(tmp_path, 1, 7)
    raw = path.read_bytes()
    tensors = st_load(raw)
    meta = __import__("json").loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    tensors["optimizer.v"] = tensors["optimizer.v"][:4].copy()
    path.write_bytes(st_save(tensors, metadata=meta))
    target = shard()
    with pytest.raises(ck.CheckpointError, match=r"optimizer.v of shape \(4,\), expected \(10,\)"):
        ck.load(tmp_path, 1, 7, target, LAYOUT_HASH)
    assert unchanged(target)


def test_a_checkpoint_of_another_tokenizer_is_refused_naming_both_sha256(tmp_path):
    s = written(tmp_path)
    ck.save(tmp_path, 1, s, LAYOUT_HASH, {}, tokenizer="a" * 64)
    target = shard()
    with pytest.raises(ck.CheckpointError) as e:
        ck.load(tmp_path, 1, 7, target, LAYOUT_HASH, tokenizer="b" * 64)
    assert f"tokenizer sha256: {'a' * 64!r} in the checkpoint, {'b' * 64!r} in this job" in str(e.value)
    assert str(ck.path_of(tmp_path, 1, 7)) in str(e.value) and unchanged(target)
    ck.load(tmp_path, 1, 7, target, LAYOUT_HASH, tokenizer="a" * 64)
    assert target.version == 7


def test_newer_checkpoints_are_set_aside_not_deleted(tmp_path):
    for v in (5, 7, 9):
        written(tmp_path, version=v)
    moved = ck.set_aside_newer(tmp_path, 1, 5)
    assert [p.name for p in moved] == [ck.path_of(tmp_path, 1, v).name for v in (7, 9)]
    assert ck.versions(tmp_path, 1) == [5] and all(p.parent == tmp_path / "superseded" and p.exists() for p in moved)

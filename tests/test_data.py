"""Data: documents, the train/validation split, worker shards, the batch sampler."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from worker.data import (
    BatchSampler, DataConfig, Document, bigram_entropy, builtin_corpus_files, concat, load_corpus,
    load_data, shard_documents, split_train_val, unigram_entropy, validation_batches,
)


def make_docs(n=40, seed=0):
    """Documents of varied lengths (and two identical ones) with distinct names."""
    rng = np.random.default_rng(seed)
    docs = [Document(f"f{i}#0", rng.integers(0, 256, size=int(rng.integers(1, 300))).astype(np.uint8))
            for i in range(n)]
    docs.append(Document("dup#0", docs[3].tokens.copy()))
    return docs


def coverage(docs, shards):
    """How many times each byte of each document is dealt out, over all shards."""
    counts = [np.zeros(len(d.tokens), dtype=int) for d in docs]
    for shard in shards:
        for p in shard:
            assert 0 <= p.begin < p.end <= len(docs[p.doc].tokens), p
            counts[p.doc][p.begin:p.end] += 1
    return counts


@pytest.mark.parametrize("strategy", ["contiguous", "hash", "random"])
@pytest.mark.parametrize("W", [1, 2, 3, 5, 8])
def test_shards_disjoint_and_covering(strategy, W):
    docs = make_docs()
    shards = shard_documents(docs, W, strategy, seed=7)
    assert len(shards) == W
    for c in coverage(docs, shards):
        assert (c == 1).all()                           # every byte exactly once: disjoint and covering
    total = sum(len(concat(docs, s)) for s in shards)
    assert total == sum(len(d.tokens) for d in docs)
    assert shards == shard_documents(docs, W, strategy, seed=7)   # deterministic


def test_contiguous_shards_are_balanced_and_in_order():
    docs = make_docs()
    shards = shard_documents(docs, 4, "contiguous")
    lengths = [len(concat(docs, s)) for s in shards]
    assert max(lengths) - min(lengths) <= 1
    assert np.array_equal(np.concatenate([concat(docs, s) for s in shards]), concat(docs))


def test_hash_shards_stable_across_processes():
    """sha256, not Python's salted hash(): another process with another hash seed agrees."""
    docs = make_docs()
    here = [[p.doc for p in s] for s in shard_documents(docs, 3, "hash")]
    code = ("from tests.test_data import make_docs; from worker.data import shard_documents;"
            "print([[p.doc for p in s] for s in shard_documents(make_docs(), 3, 'hash')])")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(here)
    # identical documents always share a worker
    owner = {p.doc: r for r, s in enumerate(shard_documents(docs, 5, "hash")) for p in s}
    assert owner[3] == owner[len(docs) - 1]


def test_random_shards_depend_on_seed():
    docs = make_docs()
    a = shard_documents(docs, 3, "random", seed=1)
    b = shard_documents(docs, 3, "random", seed=2)
    assert a != b
    assert sorted(len(s) for s in a) == [13, 14, 14]      # dealt round robin


def test_bad_shard_arguments():
    with pytest.raises(ValueError, match="contiguous, hash, random"):
        shard_documents(make_docs(), 2, "striped")
    with pytest.raises(ValueError, match="num_workers"):
        shard_documents(make_docs(), 0)
    with pytest.raises(ValueError, match="contiguous, hash, random"):
        DataConfig(shard="nope")


def test_train_val_split_disjoint_deterministic():
    docs = make_docs(200)
    train, val = split_train_val(docs, 0.2)
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert len(train) + len(val) == len(docs)
    held = sum(len(d.tokens) for d in val) / sum(len(d.tokens) for d in docs)
    assert 0.2 <= held < 0.25
    assert [d.name for d in val] == [d.name for d in split_train_val(docs, 0.2)[1]]
    # identical documents land on the same side (no leak of a duplicate into validation)
    assert ("f3#0" in {d.name for d in val}) == ("dup#0" in {d.name for d in val})
    assert split_train_val(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match="nothing left to train"):
        split_train_val(docs[:1], 0.5)


def test_folder_corpus(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"x" * 25)
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_bytes(b"# title\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")            # binary: skipped
    (tmp_path / ".hidden").write_bytes(b"secret")                      # hidden: skipped
    (tmp_path / "empty.txt").write_bytes(b"")                          # empty: skipped
    corpus = load_corpus(DataConfig(data=str(tmp_path), doc_bytes=10))
    assert [d.name for d in corpus.documents] == ["a.txt#0", "b.txt#0", "b.txt#1", "b.txt#2", "sub/c.md#0"]
    assert corpus.documents[2].tokens.tobytes() == b"x" * 10
    assert corpus.fingerprint["files"] == 3 and corpus.fingerprint["bytes"] == 39
    assert "python" not in corpus.fingerprint
    single = load_corpus(DataConfig(data=str(tmp_path / "b.txt"), doc_bytes=10))
    assert [len(d.tokens) for d in single.documents] == [10, 10, 5]
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_corpus(DataConfig(data=str(tmp_path / "missing")))


def test_builtin_corpus_fingerprint():
    files = builtin_corpus_files()
    assert files == sorted(files) and all(not f.name.startswith("_") for f in files)
    corpus = load_corpus(DataConfig())
    fp = corpus.fingerprint
    assert fp["source"] == "python-stdlib" and fp["python"] == ".".join(map(str, sys.version_info[:3]))
    assert fp["bytes"] > 1_000_000 and len(fp["sha256"]) == 64
    assert load_corpus(DataConfig()).fingerprint == fp


def test_load_data_shards_cover_training_stream():
    cfg = DataConfig(val_fraction=0.1)
    whole = load_data(cfg)
    parts = [load_data(cfg, rank=r, num_workers=3) for r in range(3)]
    assert sum(len(p.train) for p in parts) == len(whole.train)
    assert np.array_equal(np.concatenate([p.train for p in parts]), whole.train)   # contiguous
    assert all(np.array_equal(p.val, whole.val) for p in parts)


def test_sampler_deterministic_and_windows_are_next_bytes():
    tokens = np.random.default_rng(0).integers(0, 256, size=1000).astype(np.uint8)
    a, b = BatchSampler(tokens, 4, 16, seed=3), BatchSampler(tokens, 4, 16, seed=3)
    for _ in range(40):                                  # several epochs of 62 windows
        (ia, ta), (ib, tb) = a.next_batch(), b.next_batch()
        assert ia.shape == ta.shape == (4, 16) and ia.dtype == np.int64
        assert np.array_equal(ia, ib) and np.array_equal(ta, tb)
        assert np.array_equal(ia[:, 1:], ta[:, :-1])     # targets are the next bytes
    c = BatchSampler(tokens, 4, 16, seed=4)
    assert not np.array_equal(BatchSampler(tokens, 4, 16, seed=3).next_batch()[0], c.next_batch()[0])


def test_sampler_epoch_visits_each_window_once():
    tokens = np.arange(500)                    # a token's value is its position
    s = BatchSampler(tokens, 1, 10, seed=0)
    for epoch in range(3):
        n = len(s._epoch_starts(epoch))
        starts = [int(s.next_batch()[0][0, 0]) for _ in range(n)]
        shift = starts[0] % 10
        assert sorted(starts) == list(range(shift, shift + 10 * n, 10))   # all windows, once each
        assert max(starts) + 11 <= 500 and n >= 48                       # each window + its next byte fits
        assert s.epoch == epoch + 1 and s.pos == 0


def test_sampler_state_round_trip():
    tokens = np.random.default_rng(1).integers(0, 256, size=700).astype(np.uint8)
    a = BatchSampler(tokens, 3, 8, seed=5)
    for _ in range(37):                                   # stop mid-epoch
        a.next_batch()
    state = a.state_dict()
    want = [a.next_batch() for _ in range(50)]
    b = BatchSampler(tokens, 3, 8, seed=5)
    b.load_state_dict(state)
    got = [b.next_batch() for _ in range(50)]
    for (wi, wt), (gi, gt) in zip(want, got):
        assert np.array_equal(wi, gi) and np.array_equal(wt, gt)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(tokens, 4, 8, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="num_tokens"):
        BatchSampler(tokens[:-1], 3, 8, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot fill one window"):
        BatchSampler(tokens[:8], 3, 8)


def test_validation_batches_fixed():
    tokens = np.random.default_rng(2).integers(0, 256, size=400).astype(np.uint8)
    a = validation_batches(tokens, 2, 16, 3)
    b = validation_batches(tokens, 2, 16, 3)
    assert len(a) == 3 and all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    assert a[0][0][0, 0] == tokens[0] and a[-1][1][-1, -1] == tokens[-1]   # spans the whole stream


def test_entropies():
    uniform = np.arange(256 * 4).astype(np.uint8)
    assert unigram_entropy(uniform) == pytest.approx(math.log(256))
    assert unigram_entropy(np.full(10, 7, dtype=np.uint8)) == 0.0
    assert bigram_entropy(uniform) == pytest.approx(0.0)              # next byte always known
    coin = np.random.default_rng(0).integers(0, 2, size=100_000).astype(np.uint8)
    assert bigram_entropy(coin) == pytest.approx(math.log(2), abs=1e-3)


def test_bigram_entropy_counts_only_the_pairs_that_occur():
    """Against the dense V x V table it replaced (the reference), and at GPT-2's
    vocabulary, where that table would take 20 GB."""
    rng = np.random.default_rng(0)
    t = rng.integers(0, 300, size=5000) % rng.integers(1, 300, size=5000)    # skewed, with gaps
    counts = np.zeros((300, 300))
    np.add.at(counts, (t[:-1], t[1:]), 1)
    cond = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    nz = counts > 0
    dense = -(counts[nz] * np.log(cond[nz])).sum() / counts.sum()
    assert bigram_entropy(t, 300) == pytest.approx(dense, rel=1e-12)
    big = rng.integers(0, 50257, size=20000).astype(np.uint16)
    assert 0 < bigram_entropy(big, 50257) < unigram_entropy(big, 50257)

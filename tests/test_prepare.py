"""ps-prepare: a corpus tokenized once into memory-mapped files that workers shard; the
bytes tokenizer's files equal the raw-text pipeline; every corrupt file or sidecar is
refused with its name; the vocabulary follows the tokenizer; sampling decodes with it."""
import json
import math
import os

import numpy as np
import pytest

from worker import prepare
from worker.data import DataConfig, data_tokenizer, load_corpus, load_data, split_train_val
from worker.tokenfiles import SIDECAR, DataError, read_prepared, token_dtype

LINES = [f"def function_{i}(value):\n    return value * {i}  # héllo {i % 7}\n" for i in range(400)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of text files and a .jsonl file."""
    root = tmp_path_factory.mktemp("corpus")
    for k in range(4):
        (root / f"f{k}.py").write_text("".join(LINES[k * 100:(k + 1) * 100]))
    with open(root / "docs.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"note {i}: " + LINES[i], "id": i}) + "\n")
    return root


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "bpe"
    assert prepare.main(["--data", str(corpus), "--tokenizer", "bpe:300", "--out", str(out),
                         "--doc-bytes", "700"]) == 0
    return out


def test_jsonl_lines_are_documents(corpus):
    docs = load_corpus(DataConfig(data=str(corpus))).documents
    notes = [d for d in docs if d.name.startswith("docs.jsonl:")]
    assert len(notes) == 30 and notes[0].name == "docs.jsonl:1#0"
    assert notes[0].tokens.tobytes().decode() == "note 0: " + LINES[0]
    bad = corpus.parent / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a 'text' field"):
        load_corpus(DataConfig(data=str(bad)))


def test_prepared_tokens_decode_to_the_documents(bpe, corpus):
    prep = read_prepared(bpe)
    meta = json.loads((bpe / SIDECAR).read_text())
    assert meta["dtype"] == "uint16" and prep.train.dtype == np.uint16 and isinstance(prep.train, np.memmap)
    assert meta["tokenizer"]["vocab_size"] == prep.tokenizer.vocab_size <= 300
    train_docs, val_docs = split_train_val(load_corpus(DataConfig(data=str(corpus), doc_bytes=700)).documents, 0.1)
    assert prep.tokenizer.decode(prep.val) == b"".join(d.tokens.tobytes() for d in val_docs).decode()
    for i in (0, 5, len(train_docs) - 1):                       # each document where the index says
        a, b = prep.train_offsets[i], prep.train_offsets[i + 1]
        assert prep.tokenizer.decode(prep.train[a:b]) == train_docs[i].tokens.tobytes().decode()
    assert meta["train"]["bytes"] == sum(len(d.tokens) for d in train_docs)
    assert prep.bytes_per_token > 2                             # the BPE merges pay off
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


@pytest.mark.parametrize("shard", ["contiguous", "hash", "random"])
def test_bytes_prepared_equals_the_raw_text_pipeline(shard, corpus, tmp_path):
    """Prepared with the bytes tokenizer, every worker's shard and the validation stream are
    the raw pipeline's, byte for byte: the split and the shards are the same functions."""
    assert prepare.main(["--data", str(corpus), "--out", str(tmp_path), "--doc-bytes", "700"]) == 0
    for r in range(3):
        raw = load_data(DataConfig(data=str(corpus), doc_bytes=700, shard=shard), rank=r, num_workers=3, seed=4)
        tok = load_data(DataConfig(data=str(tmp_path), shard=shard), rank=r, num_workers=3, seed=4)
        assert np.array_equal(raw.val, tok.val) and np.array_equal(raw.train, tok.train), (shard, r)
        assert tok.bytes_per_token == 1.0 and tok.tokenizer.kind == "bytes"


def test_a_contiguous_shard_is_a_view_of_the_memory_map(bpe):
    whole = read_prepared(bpe).train
    parts = [load_data(DataConfig(data=str(bpe)), rank=r, num_workers=2) for r in range(2)]
    for p in parts:
        assert isinstance(p.train, np.memmap) and not p.train.flags.owndata     # no copy of the corpus
    assert np.array_equal(np.concatenate([p.train for p in parts]), whole)
    assert parts[0].summary.startswith(f"data: {bpe} (prepared from") and "bytes/token" in parts[0].summary


def corrupt_copies(bpe, tmp_path):
    """(name, folder, the file the error must name) for each kind of damage."""
    import shutil

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(bpe, dst)
        return dst
    cases = []
    d = copy("truncated")
    with open(d / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(d / "train.bin") - 2)
    cases.append(("truncated", d, "train.bin"))
    d = copy("flipped")
    raw = bytearray((d / "val.bin").read_bytes())
    raw[10] ^= 1
    (d / "val.bin").write_bytes(bytes(raw))
    cases.append(("flipped", d, "val.bin"))
    d = copy("garbled-sidecar")
    (d / SIDECAR).write_text((bpe / SIDECAR).read_text()[:-20])
    cases.append(("garbled-sidecar", d, SIDECAR))
    d = copy("sidecar-field")
    meta = json.loads((bpe / SIDECAR).read_text())
    meta["train"]["tokens"] = "many"
    (d / SIDECAR).write_text(json.dumps(meta))
    cases.append(("sidecar-field", d, SIDECAR))
    d = copy("other-tokenizer")
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"
    (d / "tokenizer.json").write_text(json.dumps(tok))
    cases.append(("other-tokenizer", d, "tokenizer.json"))
    d = copy("index")
    (d / "train.idx").write_bytes((d / "train.idx").read_bytes()[:-8])
    cases.append(("index", d, "train.idx"))
    d = copy("digests")
    (d / "train.sha256").write_bytes(b"\0" * 31)
    cases.append(("digests", d, "train.sha256"))
    d = copy("id-too-large")
    ids = np.fromfile(d / "val.bin", dtype="<u2")
    ids[3] = 60000
    ids.tofile(d / "val.bin")
    meta = json.loads((bpe / SIDECAR).read_text())
    import hashlib
    meta["val"]["sha256"] = hashlib.sha256((d / "val.bin").read_bytes()).hexdigest()
    (d / SIDECAR).write_text(json.dumps(meta))
    cases.append(("id-too-large", d, "val.bin"))
    return cases


def test_corrupt_files_are_refused_with_their_name(bpe, tmp_path):
    for what, folder, name in corrupt_copies(bpe, tmp_path):
        with pytest.raises(DataError) as err:
            load_data(DataConfig(data=str(folder)))
        assert str(folder / name) in str(err.value), (what, str(err.value))
    assert "outside the vocabulary" in str(pytest.raises(DataError, load_data,
                                                         DataConfig(data=str(tmp_path / "id-too-large"))).value)


def test_a_worker_with_a_corrupt_file_stops_before_the_job_starts(bpe, tmp_path):
    """python -m worker checks its data when it resolves the vocabulary, before it registers:
    nothing starts half-way."""
    import subprocess
    import sys
    from tests.cluster import ENV
    for what, folder, name in corrupt_copies(bpe, tmp_path)[:2]:          # a token file, cut or changed
        out = subprocess.run([sys.executable, "-m", "worker", "--data", str(folder), "--dry-run"],
                             capture_output=True, text=True, env=ENV, timeout=120)
        assert out.returncode == 2 and str(folder / name) in out.stderr, (what, out.stderr)


def test_prepare_refuses_a_prepared_folder_and_bad_specs(bpe, corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare.main(["--data", str(bpe), "--out", str(tmp_path / "x")])
    assert "already a prepared folder" in capsys.readouterr().err
    assert prepare.main(["--data", str(corpus), "--tokenizer", "bpe:12", "--out", str(tmp_path / "y")]) == 2
    assert "at least 257" in capsys.readouterr().err
    assert not (tmp_path / "y" / SIDECAR).exists()


def test_the_vocabulary_follows_the_tokenizer(bpe, tmp_path, capsys):
    from worker import train
    V = data_tokenizer(DataConfig(data=str(bpe))).vocab_size
    tiny = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
            "--eval-batches", "2", "--no-progress", "--data", str(bpe)]
    assert train.parse_configs(tiny)["model"].vocab_size == V
    assert train.parse_configs(tiny + ["--vocab-size", str(V + 3)])["model"].vocab_size == V + 3
    with pytest.raises(SystemExit):
        train.parse_configs(tiny + ["--vocab-size", "256"])
    assert f"smaller than the tokenizer's ({V})" in capsys.readouterr().err
    assert train.parse_configs(tiny[:-2])["model"].vocab_size == 256          # bytes
    # a short run: the folder holds the tokenizer, and samples decode with it
    res = train.train(train.parse_configs(tiny + ["--steps", "3", "--out", str(tmp_path / "run")]))
    assert (tmp_path / "run" / "tokenizer.json").read_text() == (bpe / "tokenizer.json").read_text()
    assert res["val_loss"] < math.log(V) + 0.5
    import subprocess
    import sys
    from tests.cluster import ENV, ROOT
    out = subprocess.run([sys.executable, f"{ROOT}/scripts/generate.py", str(tmp_path / "run"), "--prompt",
                          "def function_", "--tokens", "12", "--seed", "1"], capture_output=True, text=True,
                         env=ENV, timeout=120, check=True).stdout
    assert out.startswith("def function_") and len(out) > len("def function_") + 12   # BPE tokens: several bytes each


def test_the_bert_task_refuses_bpe_tokens(bpe):
    """--model bert fills in masked bytes; given BPE tokens it stops before it registers."""
    import subprocess
    import sys
    from tests.cluster import ENV
    out = subprocess.run([sys.executable, "-m", "worker", "--model", "bert", "--data", str(bpe),
                          "--num-servers", "1", "--num-workers", "1", "--coordinator", "127.0.0.1:9",
                          "--timeout", "5", "--heartbeat", "0"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 1 and "--model bert fills in masked bytes" in out.stderr, out.stderr

"""Tokenizers: bytes (fast path) against its tokenizer.json run by the `tokenizers` library,
BPE trained / saved / loaded three ways, Hugging Face loading the saved folder, and a
worker whose tokenizer differs from the job's refused at registration."""
import json
import threading

import numpy as np
import pytest

from common.layout import Layout
from tests.cluster import Servers
from worker.client import DeadlineError, PSClient, RemoteError
from worker.tokenizer import (
    TokenizerError, byte_to_char, bytes_tokenizer, load_tokenizer, parse_spec, run_tokenizer, train_bpe,
)

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld ✓ — ünïcode\t\x00\x7f", "", " leading space", "日本語のテキスト"]
CORPUS = [f"def function_{i}(value, other):\n    return value * {i} + other  # comment {i}\n" for i in range(300)]


def test_bytes_tokenizer_is_the_utf8_bytes_and_its_json_agrees():
    """The fast path (numpy on the UTF-8 bytes) and the tokenizer.json it exports, run by
    `tokenizers`, give the same ids and the same text back: the exported file is faithful."""
    from tokenizers import Tokenizer as HF
    tok = bytes_tokenizer()
    reference = HF.from_str(tok.json)
    assert tok.vocab_size == reference.get_vocab_size() == 256
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.tolist() == list(text.encode()) == reference.encode(text).ids
        assert tok.decode(ids) == text == reference.decode(ids.tolist())
    assert tok.encode(b"\xff\xfe").tolist() == [255, 254]          # raw bytes pass as they are
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"                       # a cut character shows as U+FFFD


def test_byte_to_char_is_gpt2s_alphabet():
    from tokenizers.pre_tokenizers import ByteLevel
    m = byte_to_char()
    assert sorted(m) == list(range(256)) and len(set(m.values())) == 256
    assert set(m.values()) == set(ByteLevel.alphabet())
    assert m[ord("A")] == "A" and m[ord(" ")] == "\u0120" and m[ord("\n")] == "\u010a"   # Ġ and Ċ, as GPT-2


def test_trained_bpe_round_trips_and_compresses():
    tok = train_bpe(CORPUS, 400)
    assert tok.kind == "bpe" and 257 < tok.vocab_size <= 400
    text = "".join(CORPUS[:20])
    ids = tok.encode(text)
    assert tok.decode(ids) == text                                  # lossless for UTF-8 text
    assert len(ids) < len(text.encode()) / 2                        # the merges pay off on the training text
    for t in TEXTS:                                                 # anything encodes: bytes are the base
        assert tok.decode(tok.encode(t)) == t
    assert tok.sha256 != bytes_tokenizer().sha256
    assert train_bpe(CORPUS, 400).sha256 == tok.sha256              # training is deterministic
    with pytest.raises(TokenizerError, match="at least 257"):
        train_bpe(CORPUS, 200)


def test_bpe_loads_from_tokenizer_json_and_from_vocab_merges(tmp_path):
    tok = train_bpe(CORPUS, 350)
    tok.save(tmp_path / "run")
    again = load_tokenizer(tmp_path / "run")
    assert again.sha256 == tok.sha256 and run_tokenizer(tmp_path / "run").sha256 == tok.sha256
    # GPT-2's own form: vocab.json + merges.txt
    from tokenizers import Tokenizer as HF
    HF.from_str(tok.json).model.save(str(tmp_path))
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    gpt2_style = load_tokenizer(tmp_path)
    for t in TEXTS + CORPUS[:3]:
        assert gpt2_style.encode(t).tolist() == tok.encode(t).tolist()
    bytes_tokenizer().save(tmp_path / "b")
    assert load_tokenizer(tmp_path / "b").kind == "bytes"
    assert run_tokenizer(tmp_path / "nothing-here").kind == "bytes"    # a folder without one: bytes
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="neither"):
        load_tokenizer(tmp_path / "empty")


def test_spec():
    assert parse_spec("bytes") == ("bytes", None) and parse_spec("bpe:4096") == ("train", 4096)
    for bad in ("bpe4096", "bpe:", "no/such/file"):
        with pytest.raises(TokenizerError, match="--tokenizer"):
            parse_spec(bad)


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_hugging_face_loads_the_saved_tokenizer(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = train_bpe(CORPUS, 350) if kind == "bpe" else bytes_tokenizer()
    tok.save(tmp_path, model_max_length=64)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 64
    for hf in (transformers.AutoTokenizer.from_pretrained(tmp_path),
               transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        for t in TEXTS[:2] + CORPUS[:2]:
            assert hf(t)["input_ids"] == tok.encode(t).tolist()
            assert hf.decode(tok.encode(t).tolist()) == t


def test_a_worker_with_another_tokenizer_is_refused(tmp_path):
    """The coordinator keeps the first worker's tokenizer sha256 as the job's and refuses a
    worker whose differs, naming both; the refused worker is told why."""
    layout = Layout([("w", (6,)), ("b", (2,))])
    with Servers(1, 2, str(tmp_path), timeout=3.0) as servers:
        results = {}

        def register(rank, tokenizer):
            c = PSClient(servers.cluster(rank))
            try:
                c.register(layout, "float64", tokenizer)
                results[rank] = "ok"
            except (RemoteError, DeadlineError) as e:
                results[rank] = str(e)
            c.close()
        t0 = threading.Thread(target=register, args=(0, bytes_tokenizer().sha256))
        t0.start()
        register(1, "f" * 64)
        t0.join(10)
        refused = [r for r in results.values() if "tokenizer" in r]
        assert len(refused) == 1 and "give every worker the same --data" in refused[0], results
        assert bytes_tokenizer().sha256[:12] in refused[0] and "ffffffffffff" in refused[0]
        servers.wait()


def test_the_membership_refuses_another_tokenizer_and_keeps_its_book():
    from common.wire.protocol import ProtocolError
    from paramserver.membership import Membership
    layout = Layout([("w", (3,))])
    m = Membership(1, 3, {})
    meta = dict(role="worker", rank=-1, host="h", pid=1, layout=layout.table(), layout_hash=layout.hash(),
                dtype="float32", tokenizer="a" * 64)
    m.register(b"w0", meta)
    with pytest.raises(ProtocolError, match="tokenizer sha256 bbbbbbbbbbbb, but the job's is aaaaaaaaaaaa"):
        m.register(b"w1", dict(meta, pid=2, tokenizer="b" * 64))
    with pytest.raises(ProtocolError, match=r"\(none\)"):
        m.register(b"w2", {k: v for k, v in dict(meta, pid=3).items() if k != "tokenizer"})
    assert [w.identity for w in m.workers] == [b"w0"] and m.tokenizer == "a" * 64
    m.register(b"w1", dict(meta, pid=2))                              # the same tokenizer: welcome
    assert len(m.workers) == 2
    assert np.all([w.meta["tokenizer"] == "a" * 64 for w in m.workers])

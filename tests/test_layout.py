"""The flat-vector seam: offsets, views, the hash, and shard ranges."""
import numpy as np
import pytest

from common.layout import Layout, even_ranges, gpt_layout, intersect_ranges, merge_ranges


def test_gpt_layout_is_gpt2():
    lay = gpt_layout(vocab_size=50257, block_size=1024, n_layer=12, n_embd=768)
    assert lay.size == 124_439_808          # GPT-2 small, the published parameter count
    assert lay.names()[:3] == ["wte.weight", "wpe.weight", "h.0.ln_1.weight"]
    assert lay["h.11.mlp.c_proj.weight"].shape == (3072, 768)
    assert lay.entries[-1].name == "ln_f.bias" and lay.entries[-1].end == lay.size
    for a, b in zip(lay.entries, lay.entries[1:]):
        assert a.end == b.offset             # packed back to back


def test_views_share_memory():
    lay = Layout([("a", (2, 3)), ("b", (4,)), ("c", ())])
    buf = np.arange(lay.size, dtype=np.float32)
    v = lay.views(buf)
    assert v["a"].shape == (2, 3) and v["c"].shape == ()
    v["b"][...] = -1
    assert (buf[6:10] == -1).all()
    with pytest.raises(ValueError, match="flat buffer of 11"):
        lay.views(np.zeros(10))


def test_hash_is_stable_and_discriminating():
    a = gpt_layout(256, 128, 4, 128)
    assert a.hash() == gpt_layout(256, 128, 4, 128).hash()
    assert a.hash() == Layout.from_table(a.table()).hash()
    assert a.hash() != gpt_layout(256, 128, 4, 64).hash()
    assert a.hash() != gpt_layout(256, 128, 3, 128).hash()
    # pinned: a change of this value means every running job's peers disagree
    assert Layout([("w", (3,)), ("b", (1,))]).hash() == Layout([["w", [3]], ["b", [1]]]).hash()


@pytest.mark.parametrize("table", [
    "nope", [["a"]], [["a", "3"]], [[1, [3]]], [["a", [True]]], [["a", [2]], ["a", [3]]], [["a", [-1]]],
])
def test_bad_tables_are_refused(table):
    with pytest.raises(ValueError):
        Layout.from_table(table)


@pytest.mark.parametrize("size, parts, align", [(10, 3, 1), (1000, 3, 16), (7, 4, 16), (0, 2, 1),
                                                 (124_439_808, 5, 16)])
def test_even_ranges_cover_and_balance(size, parts, align):
    r = even_ranges(size, parts, align)
    assert len(r) == parts and r[0][0] == 0 and r[-1][1] == size
    for (b0, e0), (b1, e1) in zip(r, r[1:]):
        assert e0 == b1
    lengths = [e - b for b, e in r]
    if size >= parts * align:
        assert max(lengths) - min(lengths) <= align
        assert all(b % align == 0 for b, _ in r)


def test_shard_ranges_balanced_by_bytes():
    lay = gpt_layout(256, 256, 6, 384)
    r = lay.shard_ranges(3)
    lengths = [e - b for b, e in r]
    assert max(lengths) / (sum(lengths) / 3) < 1.001


def test_range_helpers():
    assert merge_ranges([(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]) == [(0, 3), (5, 9)]
    assert intersect_ranges([(0, 3), (5, 9)], 2, 6) == [(0, 1), (3, 4)]
    lay = gpt_layout(10, 4, 1, 4)
    decay = lay.decay_ranges()
    assert (lay["wte.weight"].offset, lay["wpe.weight"].end) == decay[0]
    assert all(lay[n].offset not in {b for b, _ in decay} for n in lay.names() if n.endswith("bias"))

"""Chunked placement: an exact cover, balanced bytes, chunks within the size asked for,
and the reassembly of a vector from its chunks exact for odd sizes."""
import numpy as np
import pytest

from common import placement as P
from common.layout import gpt_layout

CONFIGS = {"small": (256, 64, 3, 96), "A": (256, 128, 4, 128), "B": (256, 256, 6, 384)}


@pytest.mark.parametrize("size", [1, 2, 7, 15, 16, 17, 1000, 4097, 123457])
@pytest.mark.parametrize("S", [1, 2, 3, 5])
@pytest.mark.parametrize("chunk", [16, 1000, 1 << 20])
def test_chunks_cover_exactly_and_deal_evenly(size, S, chunk):
    ranges = P.chunk_ranges(size, S, chunk)
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(b < e for b, e in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    placement = P.assign_greedy(ranges, S)
    P.check(placement, size, S)
    if size >= 16 * S:                     # big enough for aligned chunks on every server
        assert len(ranges) % S == 0 and all(b % 16 == 0 for b, _ in ranges)
        lengths = [e - b for b, e in ranges]
        assert max(lengths) - min(lengths) <= 16
    if size >= S:
        assert set(s for _, _, s in placement) == set(range(S))      # every server owns a chunk


def test_chunks_respect_the_size_asked_for():
    size = 10_000_000
    for mb in (0.5, 1, 4, 16):
        ranges = P.chunk_ranges(size, 2, P.chunk_elements(mb))
        assert max(e - b for b, e in ranges) <= P.chunk_elements(mb) + 16
        assert len(ranges) >= 2 * P.MIN_CHUNKS_PER_SERVER
    assert len(P.chunk_ranges(1000, 1, 1 << 20)) == 1            # no chunk under MIN_CHUNK_BYTES ...
    assert len(P.chunk_ranges(1000, 1, 100)) == 10                # ... unless asked for


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("S", [1, 2, 3, 4, 8])
def test_gpt_configs_are_balanced(name, S):
    lay = gpt_layout(*CONFIGS[name])
    placement = P.place_chunks(lay, S)
    P.check(placement, lay.size, S)
    assert P.imbalance(placement, S) <= 1.1
    assert len(placement) >= min(P.MIN_CHUNKS_PER_SERVER * S, lay.size * 4 // P.MIN_CHUNK_BYTES)


def test_greedy_beats_the_contiguous_cut_on_uneven_chunks():
    ranges = [(0, 10), (10, 11), (11, 12), (12, 22), (22, 23)]
    placement = P.assign_greedy(ranges, 2)
    assert P.loads(placement, 2) == [12, 11]          # LPT: the two 10s apart, then the ones
    assert P.imbalance(placement, 2) < 1.05


@pytest.mark.parametrize("size", [1, 17, 4099, 65_537])
def test_reassembly_from_chunks_is_exact(size):
    rng = np.random.default_rng(size)
    x = rng.standard_normal(size).astype(np.float32)
    placement = P.assign_greedy(P.chunk_ranges(size, 3, 100), 3)
    # what each server stores, back to back, and what a client writes back chunk by chunk
    stored = {s: np.concatenate([x[b:e] for b, e, t in placement if t == s] or [np.empty(0, np.float32)])
              for s in range(3)}
    out = np.full(size, np.nan, np.float32)
    for s in range(3):
        off = 0
        for b, e, t in placement:
            if t == s:
                out[b:e] = stored[s][off:off + e - b]
                off += e - b
    assert out.tobytes() == x.tobytes()


def test_describe_names_tensors_and_balance():
    lay = gpt_layout(*CONFIGS["A"])
    text = P.describe(lay, P.place_chunks(lay, 2), 2)
    assert "wte.weight" in text and "ln_f.bias" in text and "max/mean = 1.0000" in text
    assert "server 1: 3 chunk(s)" in text

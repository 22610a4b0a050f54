"""The codec: exact round trips, and refusal of anything malformed."""
import msgpack
import numpy as np
import pytest

from common.wire import codec
from common.wire.protocol import MAX_HEADER_BYTES, PROTOCOL_VERSION, ProtocolError


def as_received(frames):
    """What a receiver sees: each frame as its own bytes buffer."""
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int8", "uint8", "int16",
                                   "uint16", "int32", "uint32", "int64"])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5), (2, 0, 4), ()])
def test_roundtrip_every_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(0)
    a = (rng.normal(size=shape) * 100).astype(dtype)
    arrays = [a, a[..., ::-1] if a.ndim else a]          # a non-contiguous view travels too
    msg = codec.decode(as_received(codec.encode("push", "worker:3", step=5, rid=9, arrays=arrays, loss=1.5)))
    assert (msg.cmd, msg.sender, msg.step, msg.rid, msg.meta) == ("push", "worker:3", 5, 9, {"loss": 1.5})
    for got, want in zip(msg.arrays, arrays):
        assert got.dtype == np.dtype(dtype) and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_ranges_travel_and_are_checked():
    a = np.arange(10, dtype=np.float32)
    msg = codec.decode(as_received(codec.encode("push", "worker:0", arrays=[a], ranges=[(100, 110)])))
    assert msg.ranges == [(100, 110)]
    frames = as_received(codec.encode("push", "worker:0", arrays=[a], ranges=[(100, 110)]))
    h = msgpack.unpackb(frames[0])
    h["arrays"][0]["range"] = [100, 111]
    with pytest.raises(ProtocolError, match="holds 11 elements"):
        codec.decode([msgpack.packb(h)] + frames[1:])


def test_bfloat16_travels_as_words():
    words = np.array([0x3F80, 0x4000], dtype=np.uint16)     # 1.0, 2.0 in bf16
    msg = codec.decode(as_received(codec.encode("push", "worker:0", arrays=[words], dtypes=["bfloat16"])))
    assert msg.dtypes == ["bfloat16"] and msg.arrays[0].tolist() == [0x3F80, 0x4000]


def test_arrays_are_views_not_copies():
    a = np.arange(1 << 16, dtype=np.float32)
    frames = codec.encode("push", "worker:0", arrays=[a])
    assert isinstance(frames[1], memoryview) and np.shares_memory(np.frombuffer(frames[1], np.float32), a)
    buf = bytearray(frames[1])
    got = codec.decode([bytes(frames[0]), buf]).arrays[0]
    assert np.shares_memory(got, np.frombuffer(buf, np.float32))


def good_header(**over):
    h = {"v": PROTOCOL_VERSION, "cmd": "push", "from": "worker:0", "step": 0, "rid": 1,
         "arrays": [{"dtype": "float32", "shape": [4]}], "meta": {}}
    h.update(over)
    return h


BAD = {
    "garbage": [b"\xc1\xff\x00garbage"],
    "empty": [],
    "not a map": [msgpack.packb([1, 2, 3])],
    "wrong version": [msgpack.packb(good_header(v=99)), bytes(16)],
    "unknown command": [msgpack.packb(good_header(cmd="rm -rf")), bytes(16)],
    "wrong dtype": [msgpack.packb(good_header(arrays=[{"dtype": "object", "shape": [4]}])), bytes(16)],
    "negative shape": [msgpack.packb(good_header(arrays=[{"dtype": "float32", "shape": [-4]}])), bytes(16)],
    "frame too short": [msgpack.packb(good_header()), bytes(15)],
    "frame too long": [msgpack.packb(good_header()), bytes(17)],
    "missing frame": [msgpack.packb(good_header())],
    "extra frame": [msgpack.packb(good_header()), bytes(16), bytes(4)],
    "truncated header": [msgpack.packb(good_header())[:-3], bytes(16)],
    "unknown field": [msgpack.packb(good_header(evil=1)), bytes(16)],
    "bad meta type": [msgpack.packb(good_header(meta={"loss": "high"})), bytes(16)],
    "unknown meta": [msgpack.packb(good_header(meta={"exec": "print"})), bytes(16)],
    "bool as int": [msgpack.packb(good_header(step=True)), bytes(16)],
    "huge shape": [msgpack.packb(good_header(arrays=[{"dtype": "float64", "shape": [1 << 39, 1 << 39]}])), bytes(16)],
    "huge header": [b"\x00" * (MAX_HEADER_BYTES + 1)],
    "bin in header": [msgpack.packb(good_header(meta={"loss": b"\x00" * 10}), use_bin_type=True), bytes(16)],
    "register without role": [msgpack.packb(good_header(cmd="register", arrays=[], meta={"rank": 0}))],
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_messages_are_refused(name):
    with pytest.raises(ProtocolError):
        codec.decode(BAD[name])


def test_encode_checks_its_own_header():
    with pytest.raises(ProtocolError, match="unknown field"):
        codec.encode("push", "worker:0", nonsense=1)
    with pytest.raises(ProtocolError, match="cannot travel"):
        codec.encode("push", "worker:0", arrays=[np.array(["a"], dtype=object)])

"""Receiving straight into reused buffers (recv_into) against the plain frame path.

The fast path (``recv_placed``) must give the same message as the reference path
(``recv``: zmq frames, decoded in place), write the arrays into the buffers it was
given, and turn a frame of the wrong size into one the codec refuses.
"""
import time

import numpy as np
import pytest

from common.wire import codec
from common.wire.protocol import ProtocolError
from common.wire.transport import Dealer, Router


@pytest.fixture
def pair():
    router = Router("tcp://127.0.0.1:*")
    dealer = Dealer(router.endpoint)
    yield router, dealer
    dealer.close(0)
    router.close(0)


def wait(sock):
    deadline = time.monotonic() + 10
    while not sock.poll(100):
        assert time.monotonic() < deadline, "nothing arrived"


def send_push(dealer, arrays, ranges):
    dealer.send(codec.encode("push", "worker:0", step=3, rid=9, arrays=arrays, ranges=ranges, loss=1.5))


def test_placed_receive_equals_the_frame_path(pair):
    router, dealer = pair
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (1, 4097, 300_000)]
    ranges = [(0, 1), (1, 4098), (4098, 304_098)]
    dest = np.zeros(304_098, np.float32)
    send_push(dealer, arrays, ranges)
    wait(router)
    ident, frames = router.recv()
    reference = codec.decode(frames)
    send_push(dealer, arrays, ranges)
    wait(router)
    seen = []

    def place(identity, head):
        seen.append(identity)
        h = codec.parse_header(head)
        return [memoryview(dest[b:e]).cast("B") if i != 1 else None     # the middle one as a frame
                for i, (b, e) in enumerate(tuple(d["range"]) for d in h["arrays"])]
    ident2, frames2, placed = router.recv_placed(place)
    msg = codec.decode(frames2, placed=placed)
    assert ident2 == ident == seen[0] and placed == [True, False, True] and msg.placed == placed
    assert (msg.cmd, msg.sender, msg.step, msg.rid, msg.meta, msg.ranges) == \
           (reference.cmd, reference.sender, reference.step, reference.rid, reference.meta, reference.ranges)
    for a, b in zip(msg.arrays, reference.arrays):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(dest[0:1], arrays[0])                  # landed where asked
    np.testing.assert_array_equal(dest[4098:], arrays[2])
    assert not dest[1:4098].any()                                         # the frame path wrote nothing


def test_a_frame_of_the_wrong_size_is_refused(pair):
    router, dealer = pair
    values = np.arange(100, dtype=np.float32)
    for size, ok in ((99, False), (101, True), (100, True)):
        send_push(dealer, [values], [(0, 100)])
        wait(router)
        buf = np.zeros(size, np.float32)
        _, frames, placed = router.recv_placed(lambda i, h: [memoryview(buf).cast("B")])
        assert placed == [{99: None, 100: True, 101: False}[size]]
        if not ok:                 # truncated into a buffer too small: refused
            with pytest.raises(ProtocolError, match="larger than the buffer"):
                codec.decode(frames, placed=placed)
            continue
        msg = codec.decode(frames, placed=placed)     # a bigger buffer: the frame is its first bytes
        np.testing.assert_array_equal(msg.arrays[0], values)


def test_the_dealer_places_answers_too(pair):
    router, dealer = pair
    dealer.send(codec.encode("pull", "worker:0", rid=4))
    wait(router)
    ident, _ = router.recv()
    values = np.arange(10, dtype=np.float64)
    router.send(ident, codec.encode("ok", "server:0", rid=4, arrays=[values], ranges=[(5, 15)], version=2))
    wait(dealer)
    params = np.zeros(20)
    frames, placed = dealer.recv_placed(lambda head: [memoryview(params[5:15]).cast("B")])
    msg = codec.decode(frames, placed=placed)
    assert placed == [True] and msg.meta == {"version": 2}
    np.testing.assert_array_equal(params[5:15], values)
    assert codec.frames_nbytes(frames) == len(frames[0]) + 80

"""The codec: the only code that knows the byte layout of a message.

A message is a list of frames: frame 0 is the msgpack header (``common/wire/protocol.py``),
frames 1..n are the raw bytes of the arrays, C-contiguous, little-endian, one frame
per array, in the order of the header's ``arrays`` list. Bulk bytes never go through
msgpack (it packs at 0.4 GB/s, docs/wire.md); the arrays are handed to the
transport as buffers and sent without a copy.

An array may instead lie in the sender's shared-memory segment (processes of one host,
``common/wire/shm.py``): then it has no frame, and its descriptor's ``at`` is its byte
offset there; ``decode`` takes it from the segment the receiver mapped for that sender,
checking the offset against the mapping.

``decode`` refuses (``ProtocolError``) anything that does not parse or does not match
its header: a header over the size limit, bad msgpack, a failed schema check, a frame
count or a frame size that differs from what the header announced. The arrays it
returns are read-only views of the received frames (no copy): a receiver copies what
it keeps, or, knowing from the header (``parse_header``) where the arrays belong, has
the transport receive them straight into their destinations (``Message.placed``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy

from common.wire.protocol import (
    DTYPES, MAX_ARRAYS, MAX_HEADER_BYTES, PROTOCOL_VERSION, ProtocolError, array_nbytes,
    validate_header,
)

_LE = {name: numpy.dtype(name).newbyteorder("<") for name in DTYPES if name != "bfloat16"}
_LE["bfloat16"] = numpy.dtype("<u2")          # bf16 words travel as uint16


@dataclass
class Message:
    """A decoded message: the header's fields, and the arrays as numpy views."""
    cmd: str
    sender: str
    step: int = 0
    rid: int = 0
    meta: dict = field(default_factory=dict)
    arrays: list = field(default_factory=list)
    ranges: list = field(default_factory=list)   # (begin, end) per array, or None
    dtypes: list = field(default_factory=list)   # the wire dtype name per array
    encs: list = field(default_factory=list)     # the part of a compressed chunk per array, or None
    placed: list = field(default_factory=list)   # True where the array was received straight into its destination
    at: list = field(default_factory=list)       # the byte offset in the sender's shared memory per array, or None


_NAMES = {numpy.dtype(name): name for name in DTYPES if name != "bfloat16"}     # (dtype.name is slow)


def dtype_name(a) -> str:
    """The wire name of an array's dtype (``float32``...), or ProtocolError if it may not travel."""
    name = _NAMES.get(a.dtype) or numpy.dtype(a.dtype).name
    if name not in _LE:
        raise ProtocolError(f"dtype {name} cannot travel; allowed: {', '.join(DTYPES)}")
    return name


def encode(cmd: str, sender: str, step: int = 0, rid: int = 0, arrays=(), ranges=None,
           dtypes=None, encs=None, at=None, **meta) -> list:
    """Frames for one message. ``arrays`` are sent as they are (no copy) when they are
    C-contiguous and little-endian; ``ranges`` gives each array's ``[begin, end)`` in
    the flat vector (or None); ``dtypes`` overrides the wire dtype name per array
    (e.g. "bfloat16" for uint16 words); ``encs`` names the part of a compressed chunk
    per array (or None); ``at`` the byte offset per array in the sender's shared-memory
    segment where the caller put its bytes (or None: a frame). The header is checked
    before it is sent, so a bug shows up at the sender, not at the receiver."""
    arrays = list(arrays)
    ranges = list(ranges) if ranges is not None else [None] * len(arrays)
    if len(ranges) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays but {len(ranges)} ranges")
    descs, frames = [], []
    for i, a in enumerate(arrays):
        name = dtypes[i] if dtypes is not None and dtypes[i] else dtype_name(a)
        if not a.flags.c_contiguous or a.dtype.byteorder == ">":
            a = numpy.ascontiguousarray(a, dtype=_LE[name])
        desc = {"dtype": name, "shape": list(a.shape)}
        if ranges[i] is not None:
            desc["range"] = [int(ranges[i][0]), int(ranges[i][1])]
        if encs is not None and encs[i]:
            desc["enc"] = encs[i]
        descs.append(desc)
        if at is not None and at[i] is not None:
            desc["at"] = int(at[i])
        else:
            frames.append(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
    header = {"v": PROTOCOL_VERSION, "cmd": cmd, "from": sender, "step": int(step),
              "rid": int(rid), "arrays": descs, "meta": meta}
    validate_header(header)
    return [msgpack.packb(header, use_bin_type=True)] + frames


def parse_header(head) -> dict:
    """The validated header of frame 0 (ProtocolError on anything malformed). A receiver
    that knows where a message's arrays belong reads this first, receives the array
    frames straight into their destinations (``common/wire/transport.py``), then ``decode``s."""
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head)} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(head, raw=False, strict_map_key=True, max_array_len=MAX_ARRAYS * 4,
                            max_map_len=1 << 16, max_str_len=1 << 20, max_bin_len=0,
                            max_ext_len=0)
    except Exception as e:                        # msgpack raises several types on garbage
        raise ProtocolError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    try:
        return validate_header(h)
    except ProtocolError:
        raise
    except Exception as e:                        # a check that met a type it did not expect: refuse too
        raise ProtocolError(f"malformed header: {type(e).__name__}: {e}") from None


def decode(frames, header: dict | None = None, placed=None, segment=None) -> Message:
    """A ``Message`` from received frames (bytes, memoryviews or zmq frames' buffers).
    ``header``: frame 0 already parsed by ``parse_header``; ``placed[i]``: True where
    frame i + 1 was received into its destination (recorded in ``Message.placed``),
    None where it did not fit there (the message is refused); ``segment``: the sender's
    shared-memory segment (``shm.Segment``) the arrays with ``at`` are read from."""
    if not frames:
        raise ProtocolError("empty message")
    h = header if header is not None else parse_header(frames[0])
    if placed is not None and None in placed:
        raise ProtocolError(f"array {list(placed).index(None)} is larger than the buffer its header promised "
                            "room for; the message is refused")
    descs = h["arrays"]
    framed = [d for d in descs if "at" not in d]
    if len(frames) != 1 + len(framed):
        raise ProtocolError(f"header announces {len(framed)} array frame(s), message has {len(frames) - 1}")
    if len(framed) < len(descs) and segment is None:
        raise ProtocolError("arrays in shared memory, but this receiver maps no segment of the sender")
    arrays, ranges, dtypes, encs, bufs = [], [], [], [], iter(frames[1:])
    for i, d in enumerate(descs):
        want = array_nbytes(d)
        if "at" in d:
            arr = segment.array(_LE[d["dtype"]], want // _LE[d["dtype"]].itemsize, d["at"])
        else:
            buf = next(bufs)
            if len(buf) != want:
                raise ProtocolError(f"array {i}: expected {d['dtype']} {tuple(d['shape'])} = {want} bytes, "
                                    f"got {len(buf)} bytes")
            arr = numpy.frombuffer(buf, dtype=_LE[d["dtype"]]) if want else numpy.empty(0, _LE[d["dtype"]])
        arrays.append(arr.reshape(d["shape"]))
        r, enc = d.get("range"), d.get("enc")
        if r is not None and enc is None and r[1] - r[0] != arr.size:
            raise ProtocolError(f"array {i}: range [{r[0]}, {r[1]}) holds {r[1] - r[0]} elements, "
                                f"the array has {arr.size}")
        ranges.append(tuple(r) if r is not None else None)
        dtypes.append(d["dtype"])
        encs.append(enc)
    placed = iter(placed if placed is not None else ())        # per frame: spread over the arrays
    placed = [False if "at" in d else next(placed, False) for d in descs]
    return Message(cmd=h["cmd"], sender=h["from"], step=h["step"], rid=h["rid"], meta=h["meta"],
                   arrays=arrays, ranges=ranges, dtypes=dtypes, encs=encs, placed=placed,
                   at=[d.get("at") for d in descs])


def frames_nbytes(frames) -> int:
    """Bytes of a message on the wire (every frame, header included)."""
    return sum(memoryview(f).nbytes for f in frames)

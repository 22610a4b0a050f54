"""The protocol: version, commands, and what a valid message header looks like.

Every message is frame 0, a msgpack map (the header), plus one raw frame per array.
The header is:

    {"v": PROTOCOL_VERSION, "cmd": "push", "from": "worker:1", "step": 12, "rid": 7,
     "arrays": [{"dtype": "float32", "shape": [4096], "range": [0, 4096]}, ...],
     "meta": {...command-specific fields...}}

A compressed chunk of a push travels as several arrays that all carry the chunk's
range and each name its part in ``enc`` (``{"dtype": "uint32", "shape": [41],
"range": [0, 4096], "enc": "idx"}``; the parts of each scheme: ``common/wire/compress.py``).
A push may carry any of the server's chunks: a worker that overlaps communication
with its backward pushes each chunk as soon as its gradient is final (``worker/client.py``).
An array in shared memory (processes of one host, ``common/wire/shm.py``) has no frame:
its descriptor gives the byte offset ``at`` in the segment ``meta.shm`` names
(``{"dtype": "float32", "shape": [4096], "range": [0, 4096], "at": 0}``).

``validate_header`` checks a decoded header against this module's schemas before any
handler sees it (STYLE habit 6: check at the door): the version, the command, the
types and bounds of every field, the array descriptors and the command's own fields.
An error names what was expected and what arrived. This module knows nothing about
bytes (``common/wire/codec.py``) or sockets (``common/wire/transport.py``).

The conversation, in order (see docs/ for the lesson that walks through it):

    server s>0 -> coordinator  register {role: server, rank, addr, optim}
    worker     -> coordinator  register {role: worker, rank, layout, layout_hash, dtype, tokenizer}
    coordinator -> everyone    job {rank, servers, placement, layout, ...}  (once all came)
    worker 0   -> each server  init  [its slice of the initial parameters]
    worker     -> each server  pull                     -> params [slice], version
    worker     -> each server  push  [gradient slice]   -> params [slice] after the update
                                                           (bsp: once every worker pushed the step;
                                                           asp: at once; ssp: once the slowest
                                                           worker is close enough, see consistency)
    server     -> peer servers norm {sumsq}             (global-norm clipping)
    worker     -> coordinator  done                     (finished its steps; asp/ssp: to every
                                                           server, so it stops counting as live)
    coordinator -> servers     shutdown                 (every worker is done)

and, all along (docs/failures.md):

    worker, server -> coordinator  heartbeat {session, version}  -> ok {view, member}
                                                           (servers also get the live workers,
                                                           workers the servers gone silent)
    coordinator -> servers     view {view, workers}     (a worker was dropped or rejoined)

A worker that resends a request (its connection to a server broke and came back)
sends the very same message again, request id included; the server applies a push at
most once (``paramserver/dedupe.py``).
"""
from __future__ import annotations

import math

PROTOCOL_VERSION = 1

# limits checked at the door; a message beyond them is refused before it is decoded
MAX_HEADER_BYTES = 4 << 20        # a header is small; a GPT-2 layout table is ~10 KiB
MAX_ARRAYS = 4096                 # arrays per message
MAX_DIMS = 8
MAX_SENDER_LEN = 64
MAX_ENC_LEN = 16

# dtypes that may travel; "bfloat16" travels as raw 16-bit words (numpy has no bf16)
DTYPES = ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "uint16",
          "int32", "uint32", "int64")

# requests
REGISTER = "register"      # a process joins the job (to the coordinator)
INIT = "init"              # worker 0 gives a server its slice of the initial parameters
PULL = "pull"              # a worker asks a server for its slice of the parameters
PUSH = "push"              # a worker sends a server its slice of the gradient
NORM = "norm"              # a server tells its peers its share of the squared gradient norm
DONE = "done"              # a worker finished its steps (to the coordinator)
BARRIER = "barrier"        # wait until every worker reached the same named barrier
SHUTDOWN = "shutdown"      # the coordinator tells a server to stop
STATUS = "status"          # anyone asks a server what it knows (a live view)
HEARTBEAT = "heartbeat"    # a worker or server is alive (to the coordinator, every --heartbeat s)
VIEW = "view"              # the coordinator tells a server which workers a step now waits for
# replies
JOB = "job"                # the coordinator's answer to register: ranks, addresses, layout
OK = "ok"                  # a request succeeded; may carry arrays (parameters) and meta
ERROR = "error"            # a request was refused; meta.message says why

REQUESTS = (REGISTER, INIT, PULL, PUSH, NORM, DONE, BARRIER, SHUTDOWN, STATUS, HEARTBEAT, VIEW)
REPLIES = (JOB, OK, ERROR)
COMMANDS = REQUESTS + REPLIES

ROLES = ("server", "worker", "tool")

_num = (int, float)
# cmd -> ({required field: type}, {optional field: type}) for the header's "meta" map
META = {
    # versions: a server started with --resume lists the versions of its checkpoints
    REGISTER: ({"role": str, "rank": int, "host": str, "pid": int},
               {"addr": str, "layout": list, "layout_hash": str, "dtype": str, "optim": dict,
                "job": dict, "versions": list, "ipc": str, "tokenizer": str}),
    INIT: ({}, {}),
    # held: the version of the parameters the worker holds of the chunks it asks for (-1: none;
    # --compress-pull answers with the change against them, common/wire/pull_compress.py)
    # shm: the name of the sender's shared-memory segment (common/wire/shm.py)
    PULL: ({}, {"min_version": int, "held": int, "shm": str}),
    # base_version: the server version the gradient was computed on (asp/ssp: staleness =
    # version at apply - base_version); grad_sumsq: |g|^2 of the worker's WHOLE gradient, so
    # a server that applies one worker's push alone can clip by the global norm
    # session: the worker's incarnation (the coordinator's JOB answer gives it): with the
    # request id it names a push uniquely, so a resent one is applied at most once
    PUSH: ({}, {"loss": _num, "tokens": int, "bytes_pushed": int, "bytes_pulled": int,
                "base_version": int, "grad_sumsq": _num, "session": int, "held": int, "bytes_sent": int,
                "bytes_received": int, "shm": str}),
    # workers: the set of workers whose gradients this server averages for the step (the
    # servers agree on it, paramserver/agreement.py); fresh: the sender restarted and may have
    # lost its peers' norms, answer with yours; echo: such an answer (never answered)
    NORM: ({"sumsq": _num}, {"workers": list, "fresh": bool, "echo": bool}),
    DONE: ({}, {}),
    BARRIER: ({"name": str}, {}),
    SHUTDOWN: ({}, {"reason": str, "failed": bool}),     # failed: the job stops with an error
    STATUS: ({}, {}),
    # error: a server that cannot go on tells the coordinator why (it stops the job)
    HEARTBEAT: ({}, {"session": int, "version": int, "error": str}),
    # workers: [[rank, session], ...] of the live workers
    VIEW: ({"view": int, "workers": list}, {"servers": list}),
    # session: the incarnation given to this process; version: the parameters' version the
    # job is at (a worker joining a running job, a server resuming from checkpoint ``version``);
    # view, workers: the membership view (see VIEW)
    JOB: ({"rank": int, "servers": list, "placement": list, "layout": list, "layout_hash": str,
           "num_workers": int, "num_servers": int, "dtype": str},
          {"optim": dict, "job": dict, "session": int, "version": int, "view": int, "workers": list,
           "rejoin": bool, "ipc": list, "tokenizer": str}),
    # dropped: this push came after its step was complete (backup workers) and was not applied
    # view, member, workers: a heartbeat's answer (member False: this worker was dropped; rejoin)
    # silent: [[rank, address, seconds]] of the servers the coordinator has not heard from;
    # servers: every server's address now (a server restarted on another host moved)
    OK: ({}, {"version": int, "message": str, "loss": _num, "stats": dict, "status": dict, "dropped": bool,
              "view": int, "member": bool, "workers": list, "silent": list, "servers": list, "shm": str}),
    ERROR: ({"message": str}, {}),
}


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says what was expected."""


def _check(cond, text):
    if not cond:
        raise ProtocolError(text)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def array_nbytes(desc: dict) -> int:
    """Bytes of the raw frame an array descriptor announces."""
    return math.prod(desc["shape"]) * dtype_itemsize(desc["dtype"])


def dtype_itemsize(name: str) -> int:
    return {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1,
            "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "int64": 8}[name]


_HEADER_KEYS = frozenset(("v", "cmd", "from", "step", "rid", "arrays", "meta"))
_ARRAY_KEYS = frozenset(("dtype", "shape", "range", "enc", "at"))
_DTYPES = frozenset(DTYPES)


def _fail(text):
    raise ProtocolError(text)


def session_list(value, limit: int, what: str) -> dict[int, int]:
    """``[[rank, session], ...]`` -> {rank: session}, or ProtocolError."""
    ok = (isinstance(value, list) and len(value) <= limit
          and all(isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and 0 <= p[0] < limit
                  and _is_int(p[1]) and 0 <= p[1] < 2 ** 63 for p in value))
    _check(ok, f"{what} must be a list of [rank, session] pairs, ranks in [0, {limit}), got {value!r}"[:300])
    out = {p[0]: p[1] for p in value}
    _check(len(out) == len(value), f"{what}: a rank appears twice")
    return out


def _check_array(i: int, a):
    """Array descriptor ``i`` of a header: dtype, shape, optional range, enc and at."""
    if not (isinstance(a, dict) and a.keys() <= _ARRAY_KEYS and "dtype" in a and "shape" in a):
        _fail(f"array {i}: expected a map with dtype, shape, optional range, enc and at, got {a!r}"[:300])
    if "enc" in a:
        enc = a["enc"]
        if not (isinstance(enc, str) and 0 < len(enc) <= MAX_ENC_LEN and "range" in a):
            _fail(f"array {i}: enc must be a part name of 1..{MAX_ENC_LEN} characters on an array with a "
                  f"range, got {enc!r}")
    if "at" in a and not (_is_int(a["at"]) and 0 <= a["at"] < 2 ** 48 and "enc" not in a):
        _fail(f"array {i}: at must be a byte offset >= 0 on a plain array, got {a['at']!r}"[:300])
    if not isinstance(a["dtype"], str) or a["dtype"] not in _DTYPES:
        _fail(f"array {i}: dtype must be one of {', '.join(DTYPES)}, got {a['dtype']!r}")
    shape = a["shape"]
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(_is_int(d) and 0 <= d < 2 ** 40 for d in shape)):
        _fail(f"array {i}: shape must be a list of at most {MAX_DIMS} non-negative ints, got {shape!r}")
    r = a.get("range")
    if r is not None and not (isinstance(r, list) and len(r) == 2 and _is_int(r[0]) and _is_int(r[1])
                              and 0 <= r[0] <= r[1]):
        _fail(f"array {i}: range must be [begin, end] with 0 <= begin <= end, got {r!r}")


def validate_header(h) -> dict:
    """Check a decoded header; return it unchanged or raise ``ProtocolError``. (Every
    message passes here twice, at its sender and at its receiver: the error texts are
    built only on failure.)"""
    if not isinstance(h, dict):
        _fail(f"header must be a map, got {type(h).__name__}")
    if h.get("v") != PROTOCOL_VERSION:
        _fail(f"protocol version {PROTOCOL_VERSION} expected, got {h.get('v')!r}")
    if not h.keys() <= _HEADER_KEYS:
        _fail(f"unknown header field(s) {sorted(map(str, set(h) - _HEADER_KEYS))}")
    cmd = h.get("cmd")
    if not isinstance(cmd, str) or cmd not in META:
        _fail(f"unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}")
    sender = h.get("from")
    if not (isinstance(sender, str) and 0 < len(sender) <= MAX_SENDER_LEN):
        _fail(f"'from' must be a string of 1..{MAX_SENDER_LEN} characters, got {sender!r}")
    step, rid = h.get("step"), h.get("rid")
    if not (_is_int(step) and -1 <= step < 2 ** 62):
        _fail(f"'step' must be an int >= -1, got {step!r}")
    if not (_is_int(rid) and 0 <= rid < 2 ** 63):
        _fail(f"'rid' must be an int >= 0, got {rid!r}")
    arrays = h.get("arrays")
    if not (isinstance(arrays, list) and len(arrays) <= MAX_ARRAYS):
        _fail(f"'arrays' must be a list of at most {MAX_ARRAYS} descriptors")
    for i, a in enumerate(arrays):
        _check_array(i, a)
    meta = h.get("meta")
    if not (isinstance(meta, dict) and all(isinstance(k, str) for k in meta)):
        _fail(f"'meta' must be a map with string keys, got {type(meta).__name__}")
    required, optional = META[cmd]
    for k in required:
        if k not in meta:
            _fail(f"{cmd}: missing field {k!r} (required: {sorted(required)})")
    for k, v in meta.items():
        typ = required.get(k) or optional.get(k)
        if typ is None:
            _fail(f"{cmd}: unknown field {k!r}; accepted: {sorted(required) + sorted(optional)}")
        if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, _num)):
            _fail(f"{cmd}: field {k!r} must be {getattr(typ, '__name__', 'a number')}, got {type(v).__name__}")
    if cmd == REGISTER:
        if meta["role"] not in ROLES:
            _fail(f"register: role must be one of {ROLES}, got {meta['role']!r}")
        if not -1 <= meta["rank"] < 1 << 20:
            _fail(f"register: rank out of range: {meta['rank']}")
    return h

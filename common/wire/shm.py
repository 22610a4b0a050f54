"""Shared memory between the processes of one host: array bytes without a socket.

A worker and a server of one host exchange the bytes of their arrays through files
under ``/dev/shm`` that both map (BytePS does the same for a co-located worker and
server). The ZeroMQ message still travels, with its msgpack header; an array in shared
memory has no frame, and its descriptor names the byte offset (``at``) in the segment
the header's ``meta.shm`` names (``common/wire/codec.py``). Each process owns one
segment, which only it writes:
- a worker's holds the gradient, laid out as the flat vector (byte offset = 4 x the
  element offset): a push copies ``grads[b:e]`` there and the server sums straight
  from it;
- a server's holds its shard's parameters (``Shard.params`` lives there): the server
  updates them in place and its answer names where each chunk is; the worker copies
  them into its ``params``.
Nobody writes a region while the other side may read it: in plain BSP a worker does not
touch its gradient until every server answered, and a server does not update until
every worker pushed again. Where an update can come before an answer is read (asp, ssp,
backup workers), answers go as frames.

A receiver maps a segment the first time a peer's message names it, and checks the
name (this job's prefix, the role and rank of the sender), that it is a regular file
of this user of exactly the size the job says, and then every offset against the
mapped size and the array's place in the flat vector: a header never makes a process
read outside what it mapped. Segments are named per job (the coordinator's address)
and process (role, rank, pid); a process removes its own at exit; one killed with -9
cannot, so every process removes this user's segments whose pid is gone before it
creates its own (``remove_stale_segments``), and ps-local removes its job's segments
when the job ends (``remove_job_segments``).

What a segment trusts is this user: a process of the same uid could shrink a file a
peer mapped (a read past its end is a SIGBUS), as it could kill the peer or take its
Unix socket. Not encrypted: with CurveZMQ (``--curve``) arrays travel as frames. Not here: when a
message uses a segment (``worker/client.py``, ``paramserver/replier.py``).
"""
from __future__ import annotations

import atexit
import mmap
import os
import re
import stat
from dataclasses import dataclass

import numpy

from common.wire import codec
from common.wire.protocol import ProtocolError

FOLDER = "/dev/shm"


def job_prefix(coordinator: str) -> str:
    """``paramserver-<uid>-<coordinator host_port>-``: every segment of one job starts so."""
    tag = re.sub(r"[^A-Za-z0-9.]", "_", coordinator.split("://")[-1])[:60]
    return f"paramserver-{os.getuid()}-{tag}-"


def segment_name(coordinator: str, role: str, rank: int, pid: int | None = None) -> str:
    return f"{job_prefix(coordinator)}{role}{rank}-{os.getpid() if pid is None else pid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_segments(coordinator: str) -> list[str]:
    """The names of this job's segments present under /dev/shm."""
    prefix = job_prefix(coordinator)
    try:
        return sorted(n for n in os.listdir(FOLDER) if n.startswith(prefix))
    except OSError:
        return []


def remove_job_segments(coordinator: str) -> list[str]:
    """Remove every segment of this job; returns the names removed (ps-local, when its
    job has ended: a process killed with -9 leaves its segment behind)."""
    return _remove(job_segments(coordinator))


def remove_stale_segments() -> list[str]:
    """Remove this user's segments whose process is gone, of any job; returns their
    names. Every process calls it before it creates its own segment, so a segment a
    kill -9 left behind lives until the next process of this user starts."""
    prefix = f"paramserver-{os.getuid()}-"
    try:
        names = [n for n in os.listdir(FOLDER) if n.startswith(prefix)]
    except OSError:
        return []
    pids = [n.rsplit("-", 1)[-1] for n in names]
    return _remove([n for n, pid in zip(names, pids) if pid.isdigit() and not _pid_alive(int(pid))])


def _remove(names) -> list[str]:
    removed = []
    for name in names:
        try:
            os.unlink(os.path.join(FOLDER, name))
            removed.append(name)
        except OSError:
            pass
    return removed


class Segment:
    """One mapped segment: ``create``d by its owner (read-write, removed at close and at
    exit) or ``attach``ed by a peer (read-only, after the checks above)."""

    def __init__(self, name: str, buf: mmap.mmap, owner: bool):
        self.name, self.buf, self.owner = name, buf, owner
        self.nbytes = len(buf)
        self.view = memoryview(buf)

    @classmethod
    def create(cls, coordinator: str, role: str, rank: int, nbytes: int) -> "Segment":
        remove_stale_segments()
        name = segment_name(coordinator, role, rank)
        path = os.path.join(FOLDER, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, max(nbytes, 1))
            buf = mmap.mmap(fd, max(nbytes, 1))
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        seg = cls(name, buf, owner=True)
        atexit.register(seg.close)
        return seg

    @classmethod
    def attach(cls, name: str, coordinator: str, role: str, rank: int, nbytes: int) -> "Segment":
        """Map a peer's segment read-only; ProtocolError unless its name is this job's
        ``role``+``rank``'s and it is a regular file of this user of ``nbytes`` bytes."""
        pattern = re.escape(job_prefix(coordinator) + f"{role}{rank}-") + r"[0-9]{1,10}"
        if not isinstance(name, str) or not re.fullmatch(pattern, name):
            raise ProtocolError(f"shared-memory segment {name!r} is not {role} {rank}'s of this job "
                                f"(expected {job_prefix(coordinator)}{role}{rank}-PID)"[:300])
        try:
            fd = os.open(os.path.join(FOLDER, name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            raise ProtocolError(f"cannot open shared-memory segment {name}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != max(nbytes, 1):
                raise ProtocolError(f"shared-memory segment {name}: expected a file of this user of "
                                    f"{nbytes} bytes, found {st.st_size} bytes, uid {st.st_uid}")
            buf = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(name, buf, owner=False)

    def array(self, dtype, count: int, at: int = 0) -> numpy.ndarray:
        """A numpy view of ``count`` elements at byte ``at`` (checked against the mapping)."""
        dtype = numpy.dtype(dtype)
        n = count * dtype.itemsize
        if not (0 <= at and at + n <= self.nbytes and at % dtype.itemsize == 0):
            raise ProtocolError(f"{n} bytes at offset {at} lie outside shared-memory segment {self.name} "
                                f"({self.nbytes} bytes) or are misaligned")
        return numpy.frombuffer(self.view, dtype=dtype, count=count, offset=at)

    def close(self):
        """The owner removes the file (the mapping itself lasts while an array uses it)."""
        if self.owner:
            try:
                os.unlink(os.path.join(FOLDER, self.name))
            except OSError:
                pass
            self.owner = False


class PeerSegments:
    """The segments of this process's peers, each mapped the first time a message of
    the peer names it (``meta.shm``), and the decoding of messages that use them.

    ``nbytes(role, rank)``: the size the job says that peer's segment has;
    ``offset(role, rank, begin, end)``: the byte offset where the array of range
    ``[begin, end)`` must lie in it. An array anywhere else is refused, whatever the
    header says. ``readers`` are the identities whose messages named a segment that
    mapped: the peers of this host, which may be answered through shared memory."""

    def __init__(self, coordinator: str, nbytes, offset):
        self.coordinator, self.nbytes, self.offset = coordinator, nbytes, offset
        self.mapped: dict[str, Segment] = {}          # sender ("worker:3") -> its segment
        self.readers: set[bytes] = set()

    def segment_for(self, header: dict, identity: bytes | None = None) -> Segment | None:
        """The sender's segment where the header names one (mapped now if it is new)."""
        name = header["meta"].get("shm")
        if not name:
            return None
        sender = header["from"]
        seg = self.mapped.get(sender)
        if seg is None or seg.name != name:
            role, _, k = sender.partition(":")
            if not k.isdigit():
                raise ProtocolError(f"a shared-memory segment from {sender!r}, which is not a ranked process")
            seg = self.mapped[sender] = Segment.attach(name, self.coordinator, role, int(k),
                                                       self.nbytes(role, int(k)))
        if identity is not None:
            self.readers.add(identity)
        return seg

    def decode(self, frames, header: dict | None = None, placed=None, identity: bytes | None = None):
        """``codec.decode``, with the arrays in shared memory read from the sender's segment
        and each checked to lie where its range belongs (ProtocolError otherwise)."""
        if header is None and frames:
            header = codec.parse_header(frames[0])
        seg = self.segment_for(header, identity) if header is not None else None
        msg = codec.decode(frames, header=header, placed=placed, segment=seg)
        role, _, k = msg.sender.partition(":")
        for i, at in enumerate(msg.at):
            if at is None:
                continue
            r = msg.ranges[i]
            if r is None or at != self.offset(role, int(k), *r):
                raise ProtocolError(f"array {i} of {msg.sender}: offset {at} in its shared memory is not where "
                                    f"range {r} lies")
        return msg


@dataclass
class SharedMemory:
    """What a process of a job shares: its own segment and its peers' (as they name them)."""
    segment: Segment
    peers: PeerSegments

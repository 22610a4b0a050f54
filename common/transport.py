"""The transport: the only module that imports zmq.

Two socket shapes, as in ps-lite and the ZeroMQ guide's asynchronous client/server:
- ``Router``: bound by a server; receives ``(peer identity, frames)`` from many peers
  and can answer any of them later (deferred replies are how a BSP server holds a
  worker's push until every worker's gradient for the step has arrived);
- ``Dealer``: connected by a client to one server; sends requests without waiting,
  so one process can keep requests to several servers in flight at once.
A ``Poller`` waits on several sockets with a timeout: every wait in this project is a
poll with a deadline, never a blocking receive.

Frames are received without a copy (``copy=False``): callers get memoryviews of the
bytes libzmq received and decode them in place (``common/codec.py``). Sends take
buffers (memoryviews of numpy arrays) and do not copy them either; a sender must not
modify an array until the message is on its way (``track=True`` says when).

Sockets close with a bounded linger (STYLE: the ZeroMQ guide's habits) so a process
never hangs on exit waiting for a peer that is gone.
"""
from __future__ import annotations

import socket as _pysocket

import zmq

LINGER_MS = 1000                 # at close, give queued messages this long to leave
MAX_MESSAGE_BYTES = 2 << 30      # a peer sending a bigger frame is disconnected by libzmq


class TransportError(RuntimeError):
    """A socket could not be bound or connected; the text names the address."""


def context() -> zmq.Context:
    return zmq.Context.instance()


def normalize(addr: str) -> str:
    """``host:port`` or ``tcp://host:port`` (or ``ipc://path``) -> a ZeroMQ endpoint."""
    if "://" in addr:
        return addr
    if ":" not in addr:
        raise TransportError(f"address {addr!r} has no port; expected HOST:PORT or tcp://HOST:PORT")
    return "tcp://" + addr


def host_port(endpoint: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port)."""
    rest = normalize(endpoint).split("://", 1)[1]
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for launchers that pick ports up front)."""
    with _pysocket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Socket:
    def __init__(self, kind, max_message_bytes=MAX_MESSAGE_BYTES):
        self.sock = context().socket(kind)
        self.sock.setsockopt(zmq.LINGER, LINGER_MS)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        self.sock.setsockopt(zmq.RCVHWM, 0)      # BSP holds at most one request per peer;
        self.sock.setsockopt(zmq.SNDHWM, 0)      # never drop or block on a full queue
        self.endpoint = None

    def poll(self, timeout_ms: float) -> bool:
        """True when a message is waiting (within ``timeout_ms``)."""
        return bool(self.sock.poll(max(0, int(timeout_ms)), zmq.POLLIN))

    def close(self, linger_ms: int = LINGER_MS):
        if not self.sock.closed:
            self.sock.close(linger=linger_ms)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _buffers(frames):
    return [f.buffer for f in frames]


class Router(_Socket):
    """A bound socket that talks to many peers, each known by its identity."""

    def __init__(self, bind: str, **kw):
        super().__init__(zmq.ROUTER, **kw)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)     # an unknown peer is an error, not a silent drop
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)      # a restarted peer takes over its identity
        endpoint = normalize(bind)
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as e:
            self.close(0)
            raise TransportError(f"cannot bind {endpoint}: {e.strerror}. Is the port in use, or the "
                                 f"address not one of this host's?") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)   # port 0/* -> the real port
        self.last_peer = ""            # the IP address the last message came from (for status views)

    def recv(self):
        """(identity, frames) of the next message; call after ``poll`` said one is waiting."""
        parts = self.sock.recv_multipart(copy=False)
        try:
            self.last_peer = parts[-1].get("Peer-Address") or ""
        except (zmq.ZMQError, AttributeError):
            self.last_peer = ""
        return parts[0].bytes, _buffers(parts[1:])

    def send(self, identity: bytes, frames, track=False) -> bool:
        """Send to one peer; False (not an exception) when that peer is gone."""
        try:
            tracker = self.sock.send_multipart([identity] + list(frames), copy=False, track=track)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            raise
        return tracker if track else True


class Dealer(_Socket):
    """A socket connected to one peer, for asynchronous requests."""

    def __init__(self, connect: str, identity: bytes | None = None, **kw):
        super().__init__(zmq.DEALER, **kw)
        if identity:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)          # reconnect with capped backoff
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.endpoint = normalize(connect)
        try:
            self.sock.connect(self.endpoint)
        except zmq.ZMQError as e:
            self.close(0)
            raise TransportError(f"cannot connect to {self.endpoint}: {e.strerror}") from None

    def send(self, frames, track=False):
        tracker = self.sock.send_multipart(list(frames), copy=False, track=track)
        return tracker if track else True

    def recv(self):
        """Frames of the next message; call after ``poll`` said one is waiting."""
        return _buffers(self.sock.recv_multipart(copy=False))


class Poller:
    """Wait on several sockets at once: ``poll(timeout_ms)`` -> the sockets with input."""

    def __init__(self, sockets=()):
        self._poller = zmq.Poller()
        self._by_zmq = {}
        for s in sockets:
            self.add(s)

    def add(self, s: _Socket):
        self._poller.register(s.sock, zmq.POLLIN)
        self._by_zmq[s.sock] = s

    def remove(self, s: _Socket):
        self._poller.unregister(s.sock)
        self._by_zmq.pop(s.sock, None)

    def poll(self, timeout_ms: float) -> list:
        events = self._poller.poll(max(0, int(timeout_ms)))
        return [self._by_zmq[z] for z, ev in events if ev & zmq.POLLIN]

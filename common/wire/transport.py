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
bytes libzmq received and decode them in place (``common/wire/codec.py``). Or, with
``recv_placed``, a caller that knows from a message's header where its arrays belong
has them received straight into those buffers (``recv_into``, pyzmq >= 26.4): one copy,
out of libzmq's message into memory reused step after step. Sends take
buffers (memoryviews of numpy arrays) and do not copy them either; a sender must not
modify an array until the message is on its way (``track=True`` says when).

Sockets close with a bounded linger (STYLE: the ZeroMQ guide's habits) so a process
never hangs on exit waiting for a peer that is gone.

CurveZMQ (RFC 26, with ZAP, RFC 27), when a job is given a key folder (``ps-keys``):
every Router is a CURVE server holding the job's server key pair and admits only the
client public keys in ``authorized/``; every Dealer is a CURVE client holding a client
key pair and the server's public key. Traffic is encrypted and authenticated; a peer
without an authorised key gets nothing. CURVE refusals are silent to the client, so
each Dealer watches its own handshake (a socket monitor) and ``diagnose()`` turns what
it saw into a sentence for the deadline error.
"""
from __future__ import annotations

import os
import socket as _pysocket
import tempfile
import threading
from pathlib import Path

import numpy
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from common.wire.addresses import explain_unreachable

LINGER_MS = 1000                 # at close, give queued messages this long to leave
MAX_MESSAGE_BYTES = 2 << 30      # a peer sending a bigger frame is disconnected by libzmq
QUEUE_MESSAGES = 100             # messages queued per connection and direction (high-water mark)
COPY_THRESHOLD = 256 << 10       # frames smaller than this are copied into libzmq rather than lent to it


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


def local_endpoint(tcp_endpoint: str, host: str) -> str:
    """The Unix-socket twin of a server's ``tcp://127.0.0.1:PORT`` (``ipc://``, in this
    user's folder of the temporary directory, named by ``host`` and the port), or '' where
    the endpoint is not on a loopback address. Processes of one host that reach a server
    through it skip the TCP stack: 1.5-1.8x the bulk throughput of TCP loopback here
    (docs/wire.md)."""
    if not tcp_endpoint.startswith("tcp://"):
        return ""
    h, port = host_port(tcp_endpoint)
    if not (h.startswith("127.") or h in ("localhost", "::1")):
        return ""
    folder = os.path.join(tempfile.gettempdir(), f"paramserver-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in host)[:40]
    return f"ipc://{folder}/{name}-{port}.ipc"


def reachable_locally(ipc_endpoint: str) -> bool:
    """True where a server's ``ipc://`` endpoint is a socket on this machine's filesystem."""
    return ipc_endpoint.startswith("ipc://") and os.path.exists(ipc_endpoint[len("ipc://"):])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for launchers that pick ports up front)."""
    with _pysocket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --- CurveZMQ keys ------------------------------------------------------------------------

SERVER_KEY, CLIENT_KEY, AUTHORIZED = "server", "client", "authorized"
ZAP_DOMAIN = b"paramserver"


class Curve:
    """The CurveZMQ keys of one process, read from a ``ps-keys`` folder:
    ``server.key_secret`` (servers), ``<name>.key_secret`` (this process as a client),
    ``server.key`` (every client), ``authorized/*.key`` (the clients servers admit)."""

    def __init__(self, folder, client_name: str = CLIENT_KEY):
        self.folder = Path(folder)
        self.client_name = client_name
        need = [self.folder / f"{SERVER_KEY}.key", self.folder / f"{client_name}.key_secret",
                self.folder / AUTHORIZED]
        missing = [str(p) for p in need if not p.exists()]
        if missing:
            raise TransportError(f"CurveZMQ key folder {self.folder} lacks {', '.join(missing)}; "
                                 f"create it with: ps-keys {self.folder}")
        self.server_public, _ = zmq.auth.load_certificate(str(self.folder / f"{SERVER_KEY}.key"))
        self.client_public, self.client_secret = zmq.auth.load_certificate(
            str(self.folder / f"{client_name}.key_secret"))

    def server_pair(self):
        path = self.folder / f"{SERVER_KEY}.key_secret"
        if not path.exists():
            raise TransportError(f"{path} is missing: this process cannot act as a CurveZMQ server")
        return zmq.auth.load_certificate(str(path))


def generate_keys(folder, clients=(CLIENT_KEY,)) -> list[Path]:
    """Write the job's server key pair and one authorised key pair per client name into
    ``folder`` (secret files readable by the owner only). Existing keys are kept."""
    folder = Path(folder)
    (folder / AUTHORIZED).mkdir(parents=True, exist_ok=True)
    written = []
    for name in (SERVER_KEY, *clients):
        if name == SERVER_KEY and (folder / f"{SERVER_KEY}.key").exists():
            continue            # a client-only folder holds the server's public key alone: keep it
        if not (folder / f"{name}.key_secret").exists():
            pub, sec = zmq.auth.create_certificates(str(folder), name)
            os.chmod(sec, 0o600)
            written += [Path(pub), Path(sec)]
        if name != SERVER_KEY:
            allowed = folder / AUTHORIZED / f"{name}.key"
            allowed.write_bytes((folder / f"{name}.key").read_bytes())
    return written


_auth_lock = threading.Lock()
_authenticators: dict = {}


def _zap(curve: Curve):
    """One ZAP authenticator per process and key folder: admits the authorised client keys."""
    from zmq.auth.thread import ThreadAuthenticator
    with _auth_lock:
        key = str(curve.folder.resolve())
        if key not in _authenticators:
            auth = ThreadAuthenticator(context())
            auth.start()
            auth.configure_curve(domain=ZAP_DOMAIN.decode(), location=str(curve.folder / AUTHORIZED))
            _authenticators[key] = auth
        return _authenticators[key]


# --- sockets -------------------------------------------------------------------------------

class _Socket:
    def __init__(self, kind, max_message_bytes=MAX_MESSAGE_BYTES):
        self.sock = context().socket(kind)
        self.sock.setsockopt(zmq.LINGER, LINGER_MS)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        # Bounded queues: a peer keeps a few requests in flight at most, so 100 messages per
        # connection is plenty; past it, libzmq stops reading that peer's TCP socket (the
        # sender waits), and a flood cannot grow this process's memory without bound.
        self.sock.setsockopt(zmq.RCVHWM, QUEUE_MESSAGES)
        self.sock.setsockopt(zmq.SNDHWM, QUEUE_MESSAGES)
        # a zero-copy send costs more than copying a small frame (measured: 39 us against 7 us
        # for 64 KiB, 9.5 us against 29 us for 1 MiB): frames below this are copied
        self.sock.copy_threshold = COPY_THRESHOLD
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


def _recv_rest(sock, head, place):
    """The frames after ``head`` of the message being received on ``sock``. ``place(head)``
    returns, per array frame, a writable buffer to receive it into (``recv_into``: the one
    copy out of libzmq's message, into memory the caller reuses step after step) or None
    (receive a frame, no copy); ``place`` returning None receives every frame as a frame.
    Returns (frames, placed): placed[i] is True where frame i + 1 filled its buffer; a
    frame smaller than its buffer comes back as the part it filled (False), a bigger
    one was truncated: None, and a stand-in of its length (``codec.decode`` refuses the
    message; the buffer holds part of it, so a caller counts nothing as received unless
    the message decodes and passes its checks)."""
    dests = place(head) if sock.getsockopt(zmq.RCVMORE) else None
    frames, placed, i = [head], [], 0
    while sock.getsockopt(zmq.RCVMORE):
        buf = dests[i] if dests is not None and i < len(dests) else None
        if buf is None:
            frames.append(sock.recv(copy=False).buffer)
            placed.append(False)
        else:
            n = sock.recv_into(buf)
            view = memoryview(buf).cast("B")
            if n <= view.nbytes:        # all of it arrived (placed only if it filled the buffer)
                frames.append(view[:n])
                placed.append(n == view.nbytes)
            else:                       # truncated: lost (None), a stand-in of its length
                frames.append(memoryview(_zeros(n)))
                placed.append(None)
        i += 1
    return frames, placed


def _zeros(n: int):
    """n zero bytes that take no memory (a broadcast view)."""
    return numpy.broadcast_to(numpy.zeros(1, numpy.uint8), (n,))


class Router(_Socket):
    """A bound socket that talks to many peers, each known by its identity."""

    def __init__(self, bind: str, curve: Curve | None = None, **kw):
        super().__init__(zmq.ROUTER, **kw)
        if curve is not None:
            _zap(curve)
            self.sock.curve_publickey, self.sock.curve_secretkey = curve.server_pair()
            self.sock.curve_server = True
            self.sock.zap_domain = ZAP_DOMAIN
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

    def bind_also(self, endpoint: str) -> bool:
        """Listen on a second endpoint too (the server's Unix socket); False if it cannot."""
        try:
            self.sock.bind(endpoint)
            return True
        except zmq.ZMQError:
            return False

    def recv(self):
        """(identity, frames) of the next message; call after ``poll`` said one is waiting."""
        parts = self.sock.recv_multipart(copy=False)
        try:
            self.last_peer = parts[-1].get("Peer-Address") or ""
        except (zmq.ZMQError, AttributeError):
            self.last_peer = ""
        return parts[0].bytes, _buffers(parts[1:])

    def recv_placed(self, place):
        """(identity, frames, placed) of the next message, its array frames received into
        the buffers ``place(identity, header)`` names (see ``_recv_rest``); ``place``
        must not raise."""
        identity = self.sock.recv()
        if not self.sock.getsockopt(zmq.RCVMORE):
            return identity, [], []
        head = self.sock.recv(copy=False)
        try:
            self.last_peer = head.get("Peer-Address") or ""
        except (zmq.ZMQError, AttributeError):
            self.last_peer = ""
        frames, placed = _recv_rest(self.sock, head.buffer, lambda h: place(identity, h))
        return identity, frames, placed

    def send(self, identity: bytes, frames, track=False) -> bool:
        """Send to one peer; False (not an exception) when that peer is gone or its queue
        is full because it does not read its answers."""
        try:
            tracker = self.sock.send_multipart([identity] + list(frames), copy=False, track=track,
                                               flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):   # gone, or not reading its answers
                return False
            raise
        return tracker if track else True


class Dealer(_Socket):
    """A socket connected to one peer, for asynchronous requests."""

    def __init__(self, connect: str, identity: bytes | None = None, curve: Curve | None = None, **kw):
        super().__init__(zmq.DEALER, **kw)
        self.curve = curve
        self._events: set[int] = set()        # every kind of monitor event seen so far
        self.handshakes = 0                   # connections made and handshaken (a reconnect adds one)
        self.disconnects = 0                  # connections lost
        self._up = False                      # the last of those two: a handshake (True) or a loss
        if curve is not None:
            self.sock.curve_serverkey = curve.server_public
            self.sock.curve_publickey, self.sock.curve_secretkey = curve.client_public, curve.client_secret
        # a monitor of our own handshakes, so a silent refusal can be explained at the deadline
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
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

    def send_now(self, frames) -> bool:
        """Queues ``frames`` without waiting: False when they cannot be queued now (the peer's
        queue is full: it has been gone for QUEUE_MESSAGES messages). For messages that another
        one soon replaces, such as heartbeats: a blocking send would wait forever for a peer
        that never comes back."""
        try:
            self.sock.send_multipart(list(frames), flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def move(self, connect: str) -> bool:
        """Connect to ``connect`` instead of the current peer (it moved: a server restarted
        on another host). What was queued for the old address is dropped; it counts as a
        lost connection, so a caller resends what it had sent (``connections``)."""
        new = normalize(connect)
        if new == self.endpoint:
            return False
        try:
            self.sock.disconnect(self.endpoint)
        except zmq.ZMQError:
            pass                                   # never connected there: nothing to undo
        self.sock.connect(new)
        self.endpoint, self._up = new, False
        self.disconnects += 1
        return True

    def recv(self):
        """Frames of the next message; call after ``poll`` said one is waiting."""
        return _buffers(self.sock.recv_multipart(copy=False))

    def recv_placed(self, place):
        """(frames, placed) of the next message, its array frames received into the
        buffers ``place(header)`` names (see ``_recv_rest``); ``place`` must not raise."""
        return _recv_rest(self.sock, self.sock.recv(copy=False).buffer, place)

    def refused(self) -> str | None:
        """A sentence when a handshake with the peer failed and none succeeded (the peer
        will never answer this socket), else None: callers stop waiting at once."""
        text = self.diagnose()
        failed = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                  zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}
        ev = self._events
        return text if ev & failed and zmq.EVENT_HANDSHAKE_SUCCEEDED not in ev else None

    def _drain(self):
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            self._events.add(event)
            if event in (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED):
                self._up = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1

    def connections(self) -> tuple[int, int]:
        """(handshakes, disconnects) so far. A request sent before a disconnect may be lost:
        a caller that saw ``handshakes`` grow since it sent resends (the peer dedupes)."""
        self._drain()
        return self.handshakes, self.disconnects

    def is_up(self) -> bool:
        """Whether the last connection event was a handshake (False: lost, or never made)."""
        self._drain()
        return self._up

    def diagnose(self) -> str:
        """What this socket's connection and handshakes did, in words, for deadline errors:
        a refused CurveZMQ handshake never produces a reply, only these events."""
        self._drain()
        ev = self._events
        if zmq.EVENT_HANDSHAKE_FAILED_AUTH in ev:
            return ("the server refused this process's CurveZMQ key (it is not in the server's "
                    "authorized/ folder)")
        if zmq.EVENT_HANDSHAKE_SUCCEEDED in ev and not self._up:
            why = explain_unreachable(self.endpoint)
            return (f"the connection was lost ({self.disconnects} time(s)) and has not come back"
                    + (f": {why}" if why else ""))
        if zmq.EVENT_HANDSHAKE_SUCCEEDED in ev:
            return "connected" + (" (CurveZMQ handshake succeeded)" if self.curve else "")
        if ev & {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}:
            return ("the handshake failed: the server uses another security mechanism "
                    + ("or another server key (check the --curve folder)" if self.curve
                       else "(does the job use --curve? then pass the same key folder)"))
        if zmq.EVENT_CONNECTED in ev:
            return ("TCP connected but no handshake completed: " +
                    ("wrong server public key, or the server does not use CurveZMQ" if self.curve
                     else "the server may be busy, or use CurveZMQ (--curve)"))
        if self.endpoint.startswith("ipc://"):
            return f"no connection to the Unix socket {self.endpoint[len('ipc://'):]}"
        why = explain_unreachable(self.endpoint)        # refused, timed out, no route: which one
        return "no TCP connection could be made" + (f" ({why})" if why else "")

    def close(self, linger_ms: int = LINGER_MS):
        if not self.monitor.closed:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
        super().close(linger_ms)


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

"""The coordinator's book of who is in the job (run by server 0).

Processes register with the coordinator, the one address known in advance (ps-lite's
scheduler). Once every server and every worker has registered, the coordinator
answers all of them at once with the job: ranks, the servers' addresses, the layout
of the flat vector and which server owns which chunk of it. It refuses, with an
error that says what differs, a process whose layout hash, dtype or optimizer
settings disagree with the job's, a rank taken twice, and a process too many.

The coordinator also counts the workers that are done, so that server 0 can shut the
servers down when the last one finishes. It knows nothing of sockets: it returns the
replies to send, and ``server.py`` sends them.

Once the job runs, the book keeps the VIEW: the workers the steps wait for, each with
its session (its incarnation: a number the coordinator gives at every registration,
increasing, so a push from a replaced process can be told apart), and a view number
bumped at every change. A worker silent for too long is dropped (``drop``); a worker
that registers into the running job takes a free rank, or its old rank back, with a
new session (``rejoin``); a server that comes back takes its old rank if it comes back
at its old address (``returning_server``). A job resumed from the servers'
checkpoints starts at the newest version that every server holds (``resume_version``).
docs/failures.md tells the whole story.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.layout import Layout
from common.wire.protocol import ProtocolError


@dataclass
class Member:
    role: str
    rank: int                  # -1 until assigned
    identity: bytes            # the transport's name for the peer, to answer it later
    host: str
    pid: int
    addr: str = ""             # servers: the address workers and peers connect to
    meta: dict = field(default_factory=dict)

    def describe(self) -> str:
        where = self.addr or f"{self.host} pid {self.pid}"
        return f"{self.role} {self.rank} ({where})"


class Membership:
    def __init__(self, num_servers: int, num_workers: int, optim: dict, job: dict | None = None):
        self.num_servers = num_servers
        self.num_workers = num_workers
        self.optim = optim                     # the coordinator's optimizer settings: the job's
        self.job_settings = job or {}          # job-wide settings every process must share
        self.servers: dict[int, Member] = {}
        self.workers: list[Member] = []        # in arrival order; ranks assigned at completion
        self.layout: Layout | None = None
        self.layout_hash = ""
        self.dtype = ""
        self.tokenizer = ""                    # sha256 of the workers' tokenizer ('' = one that sends none)
        self.first_layout_from = ""
        self.started = False
        self.done: set[int] = set()
        self.created = time.monotonic()
        self.view = 0                          # bumped at every change of ``live``
        self.live: dict[int, int] = {}         # worker rank -> session: the workers each step waits for
        self.sessions: dict[tuple, int] = {}   # (role, rank) -> the session of its latest registration
        self.versions: dict[int, list] = {}    # server rank -> versions of the checkpoints it can resume from
        self.dropped: list[dict] = []          # {"rank", "session", "why"} of every worker dropped
        self.rejoined: list[dict] = []         # {"rank", "session", "view"} of every worker that rejoined
        self._last_session = 0
        self.placement: list | None = None     # [begin, end, server] of every chunk, once started
        self.version = 0                       # the version the job started at (> 0: resumed)

    # --- registration ---------------------------------------------------------------
    def register(self, identity: bytes, meta: dict) -> None:
        """Record one registration or raise ``ProtocolError`` saying why it is refused."""
        role, rank = meta["role"], meta["rank"]
        if self.started:
            raise ProtocolError(f"the job has already started with {self.num_servers} server(s) and "
                                f"{self.num_workers} worker(s); a new {role} cannot join it")
        job = meta.get("job")
        if job is not None and job != self.job_settings:
            diff = sorted(k for k in set(job) | set(self.job_settings) if job.get(k) != self.job_settings.get(k))
            raise ProtocolError(f"{role} {rank}: job settings differ from the coordinator's in {diff}: "
                                + "; ".join(f"{k}: coordinator {self.job_settings.get(k)!r}, "
                                            f"this process {job.get(k)!r}" for k in diff))
        m = Member(role, rank, identity, meta["host"], meta["pid"], meta.get("addr", ""), meta)
        if role == "server":
            self._register_server(m, meta)
        elif role == "worker":
            self._register_worker(m, meta)
        else:
            raise ProtocolError(f"role {role!r} cannot register")

    def next_session(self) -> int:
        """A new session number: microseconds of the wall clock, strictly increasing."""
        self._last_session = max(self._last_session + 1, time.time_ns() // 1000)
        return self._last_session

    def _register_server(self, m: Member, meta: dict):
        if not 0 <= m.rank < self.num_servers:
            raise ProtocolError(f"server rank {m.rank} out of range: the job has {self.num_servers} "
                                f"server(s), ranks 0..{self.num_servers - 1}")
        old = self.servers.get(m.rank)
        if old is not None and old.identity != m.identity:
            raise ProtocolError(f"server rank {m.rank} is already taken by {old.describe()}")
        if not m.addr:
            raise ProtocolError(f"server {m.rank} registered without an address")
        optim = meta.get("optim")
        if optim is not None and optim != self.optim:
            diff = sorted(k for k in set(optim) | set(self.optim) if optim.get(k) != self.optim.get(k))
            raise ProtocolError(f"server {m.rank}: optimizer settings differ from server 0's in {diff}; "
                                "start every server with the same optimizer flags")
        versions = meta.get("versions")
        if versions is not None and not (len(versions) <= 64 and all(isinstance(v, int) and v >= 0 for v in versions)):
            raise ProtocolError(f"server {m.rank}: 'versions' must be at most 64 checkpoint versions >= 0")
        self.servers[m.rank] = m
        if versions is not None:
            self.versions[m.rank] = sorted(set(versions))

    def _check_worker_model(self, m: Member, meta: dict) -> Layout:
        """The worker's layout, checked against itself and (once known) against the job's."""
        for k in ("layout", "layout_hash", "dtype"):
            if k not in meta:
                raise ProtocolError(f"a worker registers with its '{k}'")
        try:
            layout = Layout.from_table(meta["layout"])
        except ValueError as e:
            raise ProtocolError(f"worker's layout table is malformed: {e}") from None
        if layout.hash() != meta["layout_hash"]:
            raise ProtocolError(f"worker's layout hash {meta['layout_hash']} does not match its own "
                                f"table ({layout.hash()})")
        if meta["dtype"] not in ("float32", "float64"):
            raise ProtocolError(f"parameters must be float32 or float64, got {meta['dtype']}")
        who = f"worker {m.rank if m.rank >= 0 else '(unranked)'} on {m.host} pid {m.pid}"
        if self.layout is None:
            pass                                     # the first worker's layout becomes the job's
        elif layout.hash() != self.layout_hash:
            raise ProtocolError(f"{who} has layout hash {layout.hash()}, but the job's is "
                                f"{self.layout_hash} (first registered by {self.first_layout_from}): "
                                "the workers' model configurations differ")
        elif meta["dtype"] != self.dtype:
            raise ProtocolError(f"{who} uses {meta['dtype']}, the job uses {self.dtype}")
        elif meta.get("tokenizer", "") != self.tokenizer:
            raise ProtocolError(f"{who} trains with tokenizer sha256 {meta.get('tokenizer', '')[:12] or '(none)'}, "
                                f"but the job's is {self.tokenizer[:12] or '(none)'} (first registered by "
                                f"{self.first_layout_from}): give every worker the same --data")
        return layout

    def _register_worker(self, m: Member, meta: dict):
        layout = self._check_worker_model(m, meta)
        who = f"worker {m.rank if m.rank >= 0 else '(unranked)'} on {m.host} pid {m.pid}"
        same = [w for w in self.workers if w.identity == m.identity]
        others = [w for w in self.workers if w.identity != m.identity]
        if m.rank >= self.num_workers:
            raise ProtocolError(f"worker rank {m.rank} out of range: the job has {self.num_workers} "
                                f"worker(s), ranks 0..{self.num_workers - 1}")
        if m.rank >= 0 and any(w.rank == m.rank for w in others):
            raise ProtocolError(f"worker rank {m.rank} is already taken")
        if len(others) >= self.num_workers:
            raise ProtocolError(f"the job already has its {self.num_workers} worker(s)")
        # every check passed: only now does the registration change the book
        if same:                                     # the same process asking again
            self.workers.remove(same[0])
        if self.layout is None:
            self.layout, self.layout_hash, self.dtype = layout, layout.hash(), meta["dtype"]
            self.tokenizer = meta.get("tokenizer", "")
            self.first_layout_from = who
        self.workers.append(m)

    def complete(self) -> bool:
        return len(self.servers) == self.num_servers and len(self.workers) == self.num_workers

    def missing(self) -> str:
        """Who has not registered yet, in words."""
        parts = []
        ms = [r for r in range(self.num_servers) if r not in self.servers]
        if ms:
            parts.append(f"server(s) {ms}")
        nw = self.num_workers - len(self.workers)
        if nw:
            taken = sorted(w.rank for w in self.workers if w.rank >= 0)
            free = [r for r in range(self.num_workers) if r not in taken]
            parts.append(f"{nw} worker(s) (ranks not yet claimed: {free})")
        return " and ".join(parts) or "nobody"

    # --- the job ----------------------------------------------------------------------
    def start(self, placement_fn):
        """Assign the remaining worker ranks and build each member's JOB reply.
        ``placement_fn(layout, num_servers)`` -> list of [begin, end, server].
        Returns [(identity, meta of the job reply)]."""
        version = self.resume_version()           # before anything changes: it may refuse
        taken = {w.rank for w in self.workers if w.rank >= 0}
        free = iter(r for r in range(self.num_workers) if r not in taken)
        for w in self.workers:
            if w.rank < 0:
                w.rank = next(free)
        self.started = True
        self.placement = placement_fn(self.layout, self.num_servers)
        self.version = version
        for m in [*self.servers.values(), *self.workers]:
            self.sessions[(m.role, m.rank)] = self.next_session()
        self.live = {w.rank: self.sessions[("worker", w.rank)] for w in self.workers}
        self.view = 1
        out = [(m.identity, self.job_reply(m.role, m.rank, version)) for m in self.servers.values()]
        out += [(w.identity, self.job_reply("worker", w.rank, version)) for w in self.workers]
        return out

    def job_reply(self, role: str, rank: int, version: int, **extra) -> dict:
        """The JOB answer for one member: the job, its rank and session, the view."""
        servers = [self.servers[r].addr for r in range(self.num_servers)]
        # servers' Unix sockets ('' where none): a process on the same host connects there
        ipc = [self.servers[r].meta.get("ipc", "") for r in range(self.num_servers)]
        return dict(servers=servers, placement=self.placement, layout=self.layout.table(), ipc=ipc,
                    layout_hash=self.layout_hash, num_workers=self.num_workers, num_servers=self.num_servers,
                    dtype=self.dtype, tokenizer=self.tokenizer, optim=self.optim, job=self.job_settings, rank=rank,
                    session=self.sessions[(role, rank)], version=version, view=self.view,
                    workers=self.view_pairs(), **extra)

    def view_pairs(self) -> list:
        return [[r, s] for r, s in sorted(self.live.items())]

    def resume_version(self) -> int:
        """The version the job starts at: 0 for a fresh job; for a job resumed from the
        servers' checkpoints (``--resume``), the newest version every server holds."""
        if not any(self.versions.values()):
            return 0
        have = {r: self.versions.get(r, []) for r in range(self.num_servers)}
        lacking = [r for r, v in have.items() if not v]
        if lacking:
            raise ProtocolError(f"server(s) {lacking} have no checkpoint to resume from, while "
                                + ", ".join(f"server {r} has versions {v}" for r, v in have.items() if v)
                                + "; resume every server from its --checkpoint-dir, or start a fresh job")
        common = set.intersection(*(set(v) for v in have.values()))
        if not common:
            raise ProtocolError("the servers hold no checkpoint of a common version ("
                                + "; ".join(f"server {r}: {v}" for r, v in have.items())
                                + "); each keeps its last few: were they written by the same job?")
        return max(common)

    # --- the running job: views, rejoins, returns --------------------------------------
    def drop(self, rank: int, why: str) -> bool:
        """Take worker ``rank`` out of the view (the steps stop waiting for it)."""
        if rank not in self.live:
            return False
        self.dropped.append({"rank": rank, "session": self.live.pop(rank), "why": why})
        self.view += 1
        return True

    def rejoin(self, identity: bytes, meta: dict, alive) -> dict:
        """A worker registers into the running job: check it, give it a rank (its own,
        or a free one) and a new session, add it to the view. ``alive(rank)`` says
        whether the rank's current process still sends heartbeats. Returns its JOB answer."""
        m = Member("worker", meta["rank"], identity, meta["host"], meta["pid"], "", meta)
        self._check_worker_model(m, meta)
        if m.rank >= self.num_workers:
            raise ProtocolError(f"worker rank {m.rank} out of range: the job has {self.num_workers} "
                                f"worker(s), ranks 0..{self.num_workers - 1}")
        if m.rank < 0:
            free = [r for r in range(self.num_workers) if r not in self.live and r not in self.done]
            if not free:
                raise ProtocolError(f"the job already has its {self.num_workers} worker(s), all alive")
            m.rank = free[0]
        elif m.rank in self.done:
            raise ProtocolError(f"worker {m.rank} has already finished this job")
        elif m.rank in self.live and alive(m.rank):
            old = next(w for w in self.workers if w.rank == m.rank)
            raise ProtocolError(f"worker rank {m.rank} is taken by a live process ({old.describe()}, "
                                "still sending heartbeats)")
        self.workers = [w for w in self.workers if w.rank != m.rank] + [m]
        session = self.sessions[("worker", m.rank)] = self.next_session()
        self.live[m.rank] = session
        self.view += 1
        self.rejoined.append({"rank": m.rank, "session": session, "view": self.view})
        return self.job_reply("worker", m.rank, self.version, rejoin=True)

    def returning_server(self, identity: bytes, meta: dict) -> Member:
        """A server registers into the running job again (restarted from its checkpoint), at
        its old address or at a new one (restarted on another host: the coordinator then
        tells the others, ``addresses``). Returns its member entry, updated."""
        rank, old = meta["rank"], self.servers.get(meta["rank"])
        if old is None:
            raise ProtocolError(f"server rank {rank} is not part of this job")
        addr = meta.get("addr")
        if not isinstance(addr, str) or not addr.startswith("tcp://"):
            raise ProtocolError(f"server {rank} came back without a tcp:// address (got {addr!r})")
        taken = [r for r, m in self.servers.items() if r != rank and m.addr == addr]
        if taken:
            raise ProtocolError(f"server {rank} came back at {addr}, the address of server {taken[0]}")
        optim = meta.get("optim")
        if optim is not None and optim != self.optim:
            raise ProtocolError(f"server {rank} came back with other optimizer settings")
        versions = meta.get("versions")
        if not versions:
            raise ProtocolError(f"server {rank} came back without a checkpoint (start it with --resume and "
                                "its --checkpoint-dir): its shard would restart from nothing")
        old.identity, old.host, old.pid, old.addr = identity, meta["host"], meta["pid"], addr
        old.meta = dict(old.meta, ipc=meta.get("ipc", ""))
        self.versions[rank] = sorted(set(versions))
        self.sessions[("server", rank)] = self.next_session()
        return old

    # --- a restarted coordinator ---------------------------------------------------------
    def snapshot(self) -> dict:
        """The book of a running job as plain JSON, for server 0's checkpoints: a coordinator
        restarted from it knows the job again (``restore``); the live processes then
        confirm or correct it with their heartbeats and registrations."""
        def member(m: Member) -> dict:
            return dict(rank=m.rank, identity=m.identity.hex(), host=m.host, pid=m.pid, addr=m.addr,
                        ipc=m.meta.get("ipc", ""))
        return dict(servers=[member(self.servers[r]) for r in sorted(self.servers)],
                    workers=[member(w) for w in self.workers], layout=self.layout.table(),
                    dtype=self.dtype, tokenizer=self.tokenizer, placement=self.placement, view=self.view,
                    live=self.view_pairs(), sessions=[[role, r, s] for (role, r), s in self.sessions.items()],
                    done=sorted(self.done), version=self.version, last_session=self._last_session)

    def restore(self, snap: dict):
        """Take the book of ``snapshot`` as this coordinator's: the job has started. The view
        number moves on by one, so the servers take the restored view over what they hold."""
        def member(role: str, d: dict) -> Member:
            return Member(role, d["rank"], bytes.fromhex(d["identity"]), d["host"], d["pid"], d["addr"],
                          {"ipc": d.get("ipc", "")})
        self.servers = {d["rank"]: member("server", d) for d in snap["servers"]}
        self.workers = [member("worker", d) for d in snap["workers"]]
        self.layout = Layout.from_table(snap["layout"])
        self.layout_hash, self.dtype, self.tokenizer = self.layout.hash(), snap["dtype"], snap["tokenizer"]
        self.first_layout_from = "the job before the coordinator restarted"
        self.placement, self.view, self.version = snap["placement"], snap["view"] + 1, snap["version"]
        self.live = {r: s for r, s in snap["live"]}
        self.sessions = {(role, r): s for role, r, s in snap["sessions"]}
        self.done = set(snap["done"])
        self._last_session = max(self._last_session, snap["last_session"])
        self.started = True

    def addresses(self) -> list[str]:
        """Every server's address, by rank (a server restarted on another host: its new one)."""
        return [self.servers[r].addr for r in range(self.num_servers)]

    def table(self) -> list[dict]:
        """The address table: every registered process (role, rank, host, pid, address)."""
        members = [self.servers[r] for r in sorted(self.servers)] + sorted(self.workers, key=lambda w: w.rank)
        return [dict(role=m.role, rank=m.rank, host=m.host, pid=m.pid, addr=m.addr) for m in members]

    def describe_table(self) -> str:
        return "\n".join(f"  {m['role']:<6} {m['rank']:>3}  {m['host']:<16} pid {m['pid']:<8} {m['addr'] or '-'}"
                         for m in self.table())

    def worker_names(self) -> dict[int, str]:
        return {w.rank: w.describe() for w in self.workers}

    def mark_done(self, rank: int) -> bool:
        """Record that worker ``rank`` finished; True when every worker of the view has."""
        self.done.add(rank)
        return self.all_done()

    def all_done(self) -> bool:
        return bool(self.live) and set(self.live) <= self.done

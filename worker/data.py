"""Training data: documents, a train/validation split, worker shards, batches.

Two sources. Raw text (the default): tokens are bytes (vocabulary 256), so there is no
tokenizer to ship or train and any file is data. A PREPARED folder (``--data FOLDER``
written by ``ps-prepare``, ``worker/tokenfiles.py``): token files made once by a
tokenizer (bytes or a BPE), memory-mapped; its split is the one it was prepared with,
the steps below from 3 on are the same, on tokens instead of bytes.
The pipeline for raw text, each step a small function:

1. ``load_corpus``: the documents. With no ``--data``, the BUILT-IN CORPUS: the
   ``*.py`` files directly in the running Python's standard-library folder whose names
   do not start with ``_`` (private modules, among them the machine-specific
   ``_sysconfigdata*``), sorted by name: about 4 MB on CPython 3.11, present on every
   machine with no download. Its fingerprint (sha256, Python version) goes into every
   run's records, since another Python version means other bytes. With ``--data PATH``:
   that file, or every text file under that folder (recursively, sorted by relative
   path; hidden entries skipped; a file is text when its first 8 KiB hold no NUL byte);
   a ``.jsonl`` file gives the ``text`` field of each of its lines.
   Every file is cut into consecutive pieces of at most ``doc_bytes`` bytes, and each
   piece is one DOCUMENT: so a single large file still gives many documents, and
   documents are of comparable size, which keeps the shards balanced.
2. ``split_train_val``: documents are ranked by sha256 of their bytes and the first of
   that ranking go to validation until they hold ``val_fraction`` of the bytes. The
   split depends only on the data (not on seeds or on the number of workers), and two
   identical documents always land on the same side.
3. ``shard_documents``: the training documents dealt to W workers, disjoint and
   covering, as lists of ``Piece`` (document, begin, end):
   - ``contiguous``: the training stream (documents in corpus order) cut into W
     contiguous ranges of equal length (a range may start or end inside a document);
   - ``hash``: document d goes to worker sha256(d) mod W (stable across processes and
     runs, unlike Python's salted ``hash()``);
   - ``random``: a permutation of the documents seeded by ``seed``, dealt round-robin.
4. ``BatchSampler``: (idx, targets) int64 arrays (B, T), targets the next bytes, from a
   worker's stream, epoch after epoch without replacement (see its docstring); its
   ``state_dict`` makes a resumed run see the same order. ``validation_batches``: a
   fixed set of evenly spaced windows of the validation stream.

Not here: tokenizing (``worker/prepare.py``), document
separators (windows may cross a document boundary, as in nanoGPT), data on a GPU.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from worker.tokenfiles import is_prepared, read_prepared
from worker.tokenizer import Tokenizer, bytes_tokenizer

VOCAB_SIZE = 256
SHARD_STRATEGIES = ("contiguous", "hash", "random")
BUILTIN = "python-stdlib"


@dataclass
class DataConfig:
    """Where the training text comes from and how it is split."""
    data: str = ""                # text file or folder of text files ('' = built-in corpus: this Python's stdlib sources)
    val_fraction: float = 0.1     # share of the bytes held out for validation (whole documents, chosen by sha256)
    doc_bytes: int = 16384        # files are cut into documents of at most this many bytes
    shard: str = "contiguous"     # how training data is dealt to workers: contiguous | hash | random

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.doc_bytes < 1:
            raise ValueError(f"doc_bytes must be >= 1, got {self.doc_bytes}")
        if self.shard not in SHARD_STRATEGIES:
            raise ValueError(f"shard must be one of {', '.join(SHARD_STRATEGIES)}; got {self.shard!r}")


@dataclass(frozen=True, eq=False)          # compared by identity: the bytes are an array
class Document:
    name: str                     # "<relative path>#<piece number>"
    tokens: numpy.ndarray = field(repr=False)   # uint8 bytes (or the tokens of a prepared document)
    text_sha256: bytes = b""      # a prepared document's: sha256 of its text, as it was before tokenizing

    @property
    def digest(self) -> bytes:
        """sha256 of the document's text: what the split and --shard hash rank it by."""
        return self.text_sha256 or hashlib.sha256(self.tokens.tobytes()).digest()


@dataclass(frozen=True)
class Piece:
    """Tokens ``[begin, end)`` of training document number ``doc``."""
    doc: int
    begin: int
    end: int


@dataclass
class Corpus:
    documents: list
    fingerprint: dict             # what a run records to say which bytes it trained on


# --- 1. documents -------------------------------------------------------------------------

def builtin_corpus_files() -> list[Path]:
    """The files of the built-in corpus (see the module docstring for the rule)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no standard-library sources under {root}; pass --data PATH")
    return files


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8192)
    return len(head) > 0 and b"\0" not in head


def text_files(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else its text files, recursively, sorted by relative path."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            if not name.startswith(".") and p.is_file() and _is_text(p):
                found.append(p)
    if not found:
        raise FileNotFoundError(f"--data {path}: the folder holds no text files")
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def _texts(path: Path, rel: str, raw: bytes) -> list:
    """(name, text bytes) of one file: the file itself, or for ``.jsonl`` the ``text``
    field of each line (line n named ``rel:n``)."""
    if path.suffix != ".jsonl":
        return [(rel, raw)]
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field ({e!r})") from None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{n}: 'text' must be a string, got {type(text).__name__}")
        out.append((f"{rel}:{n}", text.encode()))
    return out


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the files that ``cfg.data`` names (or the built-in corpus) and cut them into
    documents. The fingerprint's sha256 covers, file after file, the relative name, its
    length and its bytes."""
    if cfg.data:
        root = Path(cfg.data)
        files = text_files(root)
        base = root if root.is_dir() else root.parent
        source = str(root)
    else:
        files = builtin_corpus_files()
        base = files[0].parent
        source = BUILTIN
    h, docs, total = hashlib.sha256(), [], 0
    for path in files:
        raw = path.read_bytes()
        rel = path.relative_to(base).as_posix()
        h.update(f"{rel}\0{len(raw)}\0".encode())
        h.update(raw)
        total += len(raw)
        for name, text in _texts(path, rel, raw):
            tokens = numpy.frombuffer(text, dtype=numpy.uint8)
            for i, b in enumerate(range(0, len(text), cfg.doc_bytes)):
                docs.append(Document(f"{name}#{i}", tokens[b:b + cfg.doc_bytes]))
    fp = {"source": source, "files": len(files), "bytes": total, "sha256": h.hexdigest()}
    if source == BUILTIN:
        fp["python"] = platform.python_version()
        fp["stdlib"] = str(base)
    return Corpus(docs, fp)


# --- 2. train / validation ------------------------------------------------------------------

def split_train_val(docs: list, val_fraction: float) -> tuple[list, list]:
    """(train documents, validation documents), each in corpus order; see the module docstring."""
    if val_fraction <= 0:
        return list(docs), []
    total = sum(len(d.tokens) for d in docs)
    order = sorted(range(len(docs)), key=lambda i: (hashlib.sha256(b"val:" + docs[i].digest).digest(), i))
    val, held = set(), 0
    for i in order:
        if held >= val_fraction * total:
            break
        val.add(i)
        held += len(docs[i].tokens)
    if len(val) == len(docs):
        raise ValueError(f"only {len(docs)} document(s): nothing left to train on after the "
                         f"validation split; lower --doc-bytes or --val-fraction")
    return ([d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val])


# --- 3. shards ------------------------------------------------------------------------------

def shard_documents(docs: list, num_workers: int, strategy: str = "contiguous", seed: int = 0) -> list[list]:
    """For each of ``num_workers`` workers, the ``Piece`` list of ``docs`` it trains on."""
    W = int(num_workers)
    if W < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    whole = [Piece(i, 0, len(d.tokens)) for i, d in enumerate(docs)]
    if strategy == "contiguous":
        starts = numpy.cumsum([0] + [len(d.tokens) for d in docs])
        total = int(starts[-1])
        cuts = [total * r // W for r in range(W + 1)]
        shards = []
        for r in range(W):
            lo, hi = cuts[r], cuts[r + 1]
            shards.append([Piece(i, max(lo, int(starts[i])) - int(starts[i]), min(hi, int(starts[i + 1])) - int(starts[i]))
                           for i in range(len(docs)) if starts[i] < hi and starts[i + 1] > lo])
        return shards
    if strategy == "hash":
        owner = [int.from_bytes(hashlib.sha256(b"shard:" + d.digest).digest()[:8], "big") % W for d in docs]
        return [[p for p, o in zip(whole, owner) if o == r] for r in range(W)]
    if strategy == "random":
        perm = numpy.random.default_rng([int(seed), 0x5EED]).permutation(len(docs))
        return [[whole[int(i)] for i in perm[r::W]] for r in range(W)]
    raise ValueError(f"unknown shard strategy {strategy!r}; choose one of {', '.join(SHARD_STRATEGIES)}")


def concat(docs: list, pieces=None) -> numpy.ndarray:
    """One uint8 stream: the documents (or the given pieces of them) back to back."""
    parts = [d.tokens for d in docs] if pieces is None else [docs[p.doc].tokens[p.begin:p.end] for p in pieces]
    return numpy.concatenate(parts) if parts else numpy.zeros(0, dtype=numpy.uint8)


@dataclass
class Data:
    """What one worker trains and evaluates on."""
    train: numpy.ndarray          # token stream of this worker's shard (uint8 bytes; uint16/32 memmap when prepared)
    val: numpy.ndarray            # token stream of the validation documents (the same for every worker)
    fingerprint: dict
    summary: str                  # one line for the console
    tokenizer: Tokenizer = field(default_factory=bytes_tokenizer)
    bytes_per_token: float = 1.0  # text bytes per validation token: bits per byte = loss / ln 2 / this


def load_data(cfg: DataConfig, rank: int = 0, num_workers: int = 1, seed: int = 0) -> Data:
    """Corpus -> split -> this worker's shard, in one call."""
    if not 0 <= rank < num_workers:
        raise ValueError(f"rank {rank} outside [0, {num_workers})")
    if cfg.data and is_prepared(cfg.data):
        return load_prepared_data(cfg, rank, num_workers, seed)
    corpus = load_corpus(cfg)
    train_docs, val_docs = split_train_val(corpus.documents, cfg.val_fraction)
    shards = shard_documents(train_docs, num_workers, cfg.shard, seed)
    train = concat(train_docs, shards[rank])
    if len(train) == 0:
        raise ValueError(f"worker {rank} of {num_workers} got no training data with --shard {cfg.shard}; "
                         f"use fewer workers, a smaller --doc-bytes, or --shard contiguous")
    val = concat(val_docs)
    fp = dict(corpus.fingerprint, train_bytes=int(len(train)), val_bytes=int(len(val)),
              shard=cfg.shard, rank=rank, num_workers=num_workers)
    name = fp["source"] + (f" (Python {fp['python']})" if "python" in fp else "")
    summary = (f"data: {name}, {fp['files']} files, {fp['bytes'] / 1e6:.2f} MB, sha256 {fp['sha256'][:12]}; "
               f"{len(corpus.documents)} documents; train {len(train) / 1e6:.2f} MB"
               f"{f' (shard {rank + 1}/{num_workers}, {cfg.shard})' if num_workers > 1 else ''}, "
               f"val {len(val) / 1e6:.2f} MB")
    return Data(train, val, fp, summary)


def load_prepared_data(cfg: DataConfig, rank: int, num_workers: int, seed: int = 0) -> Data:
    """This worker's shard of a prepared folder (checked first: ``read_prepared``). The
    contiguous shard is a view of the memory map; hash and random ones are copied. A
    document goes to the worker it would go to as raw text (``--shard hash`` ranks the
    sha256 of its text, recorded by ps-prepare), whatever the tokenizer."""
    prep = _prepared(str(Path(cfg.data).resolve()))
    offsets = prep.train_offsets.astype(numpy.int64)
    docs = [Document(str(i), prep.train[offsets[i]:offsets[i + 1]], prep.train_digests[i].tobytes())
            for i in range(len(offsets) - 1)]
    docs = [d for d in docs if len(d.tokens)]
    if cfg.shard == "contiguous":
        total = len(prep.train)
        train = prep.train[total * rank // num_workers:total * (rank + 1) // num_workers]
    else:
        train = concat(docs, shard_documents(docs, num_workers, cfg.shard, seed)[rank])
    if len(train) == 0:
        raise ValueError(f"worker {rank} of {num_workers} got no training tokens from {cfg.data}")
    meta, tok = prep.meta, prep.tokenizer
    fp = dict(meta["source"], prepared=str(prep.folder), tokenizer=tok.sha256, vocab_size=tok.vocab_size,
              train_tokens=int(len(train)), val_tokens=int(len(prep.val)), bytes_per_token=prep.bytes_per_token,
              shard=cfg.shard, rank=rank, num_workers=num_workers)
    summary = (f"data: {prep.folder} (prepared from {meta['source']['source']}, {tok.describe()}); "
               f"train {len(train):,} tokens{f' (shard {rank + 1}/{num_workers}, {cfg.shard})' if num_workers > 1 else ''}, "
               f"val {len(prep.val):,} tokens, {prep.bytes_per_token:.2f} bytes/token")
    return Data(train, prep.val, fp, summary, tok, prep.bytes_per_token)


@functools.lru_cache(maxsize=4)
def _prepared(folder: str):
    """``read_prepared`` once per process and folder: the command line checks the folder
    (vocabulary, before registering), the worker then takes its shard of the same maps."""
    return read_prepared(folder)


def data_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer of the data ``cfg`` names: bytes for raw text; a prepared folder's,
    after the whole folder is checked (so a corrupt file stops a worker before it joins)."""
    if not (cfg.data and is_prepared(cfg.data)):
        return bytes_tokenizer()
    return _prepared(str(Path(cfg.data).resolve())).tokenizer


def unigram_entropy(tokens: numpy.ndarray, vocab_size: int = VOCAB_SIZE) -> float:
    """Entropy in nats of the byte frequencies of ``tokens``: the loss of the best model
    that ignores context, the mark a model must beat to show it learned anything."""
    counts = numpy.bincount(tokens, minlength=vocab_size).astype(numpy.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * numpy.log(p)).sum())


def bigram_entropy(tokens: numpy.ndarray, vocab_size: int = VOCAB_SIZE) -> float:
    """Conditional entropy in nats of a token given the one before it, measured on
    ``tokens`` themselves: the loss of the best model that looks one token back.
    Counts only the pairs that occur, so a 50k vocabulary costs no 50k x 50k table."""
    t = numpy.asarray(tokens).astype(numpy.int64)
    pairs, counts = numpy.unique(t[:-1] * vocab_size + t[1:], return_counts=True)
    rows = numpy.bincount(t[:-1], minlength=vocab_size)[pairs // vocab_size]
    return float(-(counts * numpy.log(counts / rows)).sum() / counts.sum())


# --- 4. batches -----------------------------------------------------------------------------

def _windows(tokens, starts, T):
    """(idx, targets), each (len(starts), T) int64: the bytes at starts + [0, T) and the next ones."""
    rows = tokens[numpy.asarray(starts, dtype=numpy.int64)[:, None] + numpy.arange(T + 1)]   # (B, T+1)
    rows = rows.astype(numpy.int64)
    return rows[:, :-1], rows[:, 1:]


class BatchSampler:
    """Batches of ``batch_size`` windows of ``block_size`` + 1 tokens from one stream.

    Epoch e cuts the stream into windows starting at ``shift_e + k * block_size``
    (``shift_e`` drawn in [0, block_size), so window boundaries move from epoch to
    epoch) and visits them in a random permutation; both come from ``(seed, e)`` alone.
    Batches run on across epoch boundaries. The whole state is (epoch, position), so
    ``load_state_dict`` resumes the exact sequence.
    """

    def __init__(self, tokens: numpy.ndarray, batch_size: int, block_size: int, seed: int = 0):
        self.tokens, self.B, self.T, self.seed = tokens, int(batch_size), int(block_size), int(seed)
        if self.B < 1 or self.T < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
        if len(tokens) < self.T + 1:
            raise ValueError(f"{len(tokens)} training tokens cannot fill one window of "
                             f"block_size + 1 = {self.T + 1}; use more data or a smaller block size")
        self.epoch, self.pos = 0, 0
        self._cache = None

    def _epoch_starts(self, epoch: int) -> numpy.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            rng = numpy.random.default_rng([self.seed, epoch])
            N, T = len(self.tokens), self.T
            shift = int(rng.integers(0, min(T, N - T)))      # keeps at least one full window
            n = (N - 1 - shift) // T
            self._cache = (epoch, shift + T * rng.permutation(n))
        return self._cache[1]

    def next_batch(self):
        """(idx, targets), both int64 (B, T)."""
        starts = []
        while len(starts) < self.B:
            epoch_starts = self._epoch_starts(self.epoch)
            take = epoch_starts[self.pos:self.pos + self.B - len(starts)]
            starts.extend(take.tolist())
            self.pos += len(take)
            if self.pos >= len(epoch_starts):
                self.epoch, self.pos = self.epoch + 1, 0
        return _windows(self.tokens, starts, self.T)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos, "batch_size": self.B,
                "block_size": self.T, "num_tokens": int(len(self.tokens))}

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        for k in ("seed", "batch_size", "block_size", "num_tokens"):
            if state.get(k) != mine[k]:
                raise ValueError(f"sampler state does not fit this data: {k} was {state.get(k)!r}, "
                                 f"now {mine[k]!r} (did the data or the batch shape change?)")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def validation_batches(tokens: numpy.ndarray, batch_size: int, block_size: int, num_batches: int) -> list:
    """A fixed list of ``num_batches`` (idx, targets) pairs: windows evenly spaced over the
    whole validation stream, so every evaluation sees the same bytes."""
    B, T = int(batch_size), int(block_size)
    if len(tokens) < T + 1:
        raise ValueError(f"{len(tokens)} validation tokens cannot fill one window of {T + 1}; "
                         f"raise --val-fraction or use more data")
    starts = numpy.linspace(0, len(tokens) - T - 1, num_batches * B).round().astype(numpy.int64)
    return [_windows(tokens, starts[i * B:(i + 1) * B], T) for i in range(num_batches)]


__all__ = ["VOCAB_SIZE", "SHARD_STRATEGIES", "DataConfig", "Document", "Piece", "Corpus", "Data",
           "builtin_corpus_files", "text_files", "load_corpus", "split_train_val", "shard_documents",
           "concat", "load_data", "load_prepared_data", "data_tokenizer", "unigram_entropy", "bigram_entropy", "BatchSampler", "validation_batches"]

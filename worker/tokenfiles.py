"""Prepared token files: a corpus tokenized once, memory-mapped by every worker.

A prepared folder (written by ``ps-prepare``, ``worker/prepare.py``) holds:

    prepared.json    the sidecar: format, tokenizer (kind, vocabulary, sha256), token dtype,
                     the source corpus's fingerprint, the split, and for each file its
                     token count, text bytes, documents and sha256
    tokenizer.json   the tokenizer (worker/tokenizer.py)
    train.bin        the training documents' tokens back to back, in corpus order
    train.idx        uint64: where each training document starts (and the end), for --shard
    train.sha256     32 bytes per training document: sha256 of its text (--shard hash ranks by it)
    val.bin          the validation documents' tokens

Token files are raw little-endian ``uint16`` (``uint32`` when the vocabulary passes
65,536 ids), as nanoGPT's ``prepare.py`` writes them: ``numpy.memmap`` reads them with
no copy, so a worker's memory does not grow with the corpus (the contiguous shard is a
view of the map; ``--shard hash`` / ``random`` copy the worker's documents).

Everything is checked before a worker trains on it, and a fault names the file: the
sidecar's fields and types; the tokenizer's sha256; each token file's size, sha256 and
largest id (streamed in 16 MiB reads, never memory-mapped whole, so the check adds no
resident memory); the index's order and ends.

Not here: tokenizing (``worker/prepare.py``), batches and shards (``worker/data.py``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy

from common.files import atomic_write
from worker.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError, load_tokenizer

SIDECAR = "prepared.json"
FORMAT = "paramserver-tokens/1"
READ_BYTES = 16 << 20
_SPLIT_FIELDS = {"file": str, "tokens": int, "bytes": int, "documents": int, "sha256": str}


class DataError(ValueError):
    """A prepared folder that cannot be used; the text names the file and the fault."""


def token_dtype(vocab_size: int) -> numpy.dtype:
    return numpy.dtype(numpy.uint16 if vocab_size <= 1 << 16 else numpy.uint32).newbyteorder("<")


def is_prepared(path) -> bool:
    return Path(path).is_dir() and (Path(path) / SIDECAR).is_file()


# --- writing ----------------------------------------------------------------------------

def write_split(folder: Path, name: str, docs_tokens: list, doc_bytes: list, dtype, digests=None) -> dict:
    """Write ``NAME.bin``: the documents' tokens back to back; with ``digests`` (each document's
    text sha256) also ``NAME.idx`` and ``NAME.sha256``. Return its sidecar entry."""
    lengths = numpy.array([len(t) for t in docs_tokens], dtype=numpy.uint64)
    stream = (numpy.concatenate(docs_tokens) if docs_tokens else numpy.zeros(0)).astype(dtype)
    data = stream.tobytes()
    atomic_write(folder / f"{name}.bin", data)
    entry = {"file": f"{name}.bin", "tokens": int(stream.size), "bytes": int(sum(doc_bytes)),
             "documents": len(docs_tokens), "sha256": hashlib.sha256(data).hexdigest()}
    if digests is not None:
        offsets = numpy.concatenate([[0], numpy.cumsum(lengths)]).astype("<u8")
        atomic_write(folder / f"{name}.idx", offsets.tobytes())
        atomic_write(folder / f"{name}.sha256", b"".join(digests))
        entry.update(index=f"{name}.idx", digests=f"{name}.sha256")
    return entry


def write_sidecar(folder: Path, meta: dict):
    atomic_write(folder / SIDECAR, (json.dumps(meta, indent=2) + "\n").encode())


# --- reading ----------------------------------------------------------------------------

@dataclass
class Prepared:
    """A checked prepared folder: memory maps of its token files, its tokenizer and sidecar."""
    folder: Path
    meta: dict
    tokenizer: Tokenizer
    train: numpy.ndarray              # memmap, (train tokens,)
    train_offsets: numpy.ndarray      # memmap, (documents + 1,) uint64
    train_digests: numpy.ndarray      # (documents, 32) uint8: each document's text sha256
    val: numpy.ndarray                # memmap, (val tokens,)

    @property
    def bytes_per_token(self) -> float:
        """Text bytes per token of the validation split: loss x tokens / bytes / ln 2 = bits per byte."""
        v = self.meta["val"]
        return v["bytes"] / max(v["tokens"], 1)


def _need(d, key, typ, where):
    if not isinstance(d, dict) or key not in d:
        raise DataError(f"{where}: missing field {key!r}; was this folder written by ps-prepare?")
    value = d[key]
    if not isinstance(value, typ) or isinstance(value, bool) or (typ is int and value < 0):
        raise DataError(f"{where}: field {key!r} must be a {'non-negative ' if typ is int else ''}"
                        f"{typ.__name__}, got {value!r}")
    return value


def read_sidecar(folder: Path) -> dict:
    path = folder / SIDECAR
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({e}); prepare the folder again with ps-prepare") from None
    if _need(meta, "format", str, path) != FORMAT:
        raise DataError(f"{path}: format {meta['format']!r}, expected {FORMAT!r}")
    tok = _need(meta, "tokenizer", dict, path)
    for key, typ in {"kind": str, "vocab_size": int, "sha256": str}.items():
        _need(tok, key, typ, f"{path} [tokenizer]")
    if _need(meta, "dtype", str, path) != token_dtype(tok["vocab_size"]).name:
        raise DataError(f"{path}: dtype {meta['dtype']!r} does not fit a vocabulary of {tok['vocab_size']}")
    for split in ("train", "val"):
        for key, typ in _SPLIT_FIELDS.items():
            _need(_need(meta, split, dict, path), key, typ, f"{path} [{split}]")
    _need(meta["train"], "index", str, f"{path} [train]")
    _need(meta["train"], "digests", str, f"{path} [train]")
    _need(meta, "source", dict, path)
    return meta


def _check_tokens(path: Path, entry: dict, dtype, vocab_size: int):
    """Size, sha256 and largest id of one token file, read in pieces."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: missing; prepare the folder again with ps-prepare") from None
    if size != entry["tokens"] * dtype.itemsize:
        raise DataError(f"{path}: {size} bytes, but {SIDECAR} says {entry['tokens']} tokens of "
                        f"{dtype.itemsize} bytes ({entry['tokens'] * dtype.itemsize}); the file is truncated "
                        "or another run's")
    h, top = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES - READ_BYTES % dtype.itemsize):
            h.update(chunk)
            ids = numpy.frombuffer(chunk, dtype=dtype)
            top = max(top, int(ids.max()) if ids.size else -1)
    if h.hexdigest() != entry["sha256"]:
        raise DataError(f"{path}: sha256 {h.hexdigest()[:12]}..., {SIDECAR} says {entry['sha256'][:12]}...: "
                        "the file is corrupt or was changed after ps-prepare")
    if top >= vocab_size:
        raise DataError(f"{path}: holds token id {top}, outside the vocabulary of {vocab_size}")


def _check_index(path: Path, entry: dict) -> numpy.ndarray:
    n = entry["documents"] + 1
    if not path.is_file() or path.stat().st_size != 8 * n:
        raise DataError(f"{path}: expected {n} uint64 document offsets ({8 * n} bytes), "
                        f"found {path.stat().st_size if path.is_file() else 'no file'}")
    offsets = numpy.memmap(path, dtype="<u8", mode="r", shape=(n,))
    if offsets[0] != 0 or offsets[-1] != entry["tokens"] or (numpy.diff(offsets.astype(numpy.int64)) < 0).any():
        raise DataError(f"{path}: document offsets must rise from 0 to {entry['tokens']}")
    return offsets


def _read_digests(path: Path, n: int) -> numpy.ndarray:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: missing; prepare the folder again with ps-prepare") from None
    if len(raw) != 32 * n:
        raise DataError(f"{path}: {len(raw)} bytes, expected 32 per document ({32 * n})")
    return numpy.frombuffer(raw, dtype=numpy.uint8).reshape(n, 32)


def read_prepared(folder) -> Prepared:
    """Check a prepared folder (see the module docstring) and memory-map its token files."""
    folder = Path(folder)
    meta = read_sidecar(folder)
    tok_path = folder / TOKENIZER_FILE
    try:
        tokenizer = load_tokenizer(tok_path)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    want = meta["tokenizer"]
    if tokenizer.sha256 != want["sha256"] or tokenizer.vocab_size != want["vocab_size"]:
        raise DataError(f"{tok_path}: sha256 {tokenizer.sha256[:12]}... and vocabulary {tokenizer.vocab_size}, "
                        f"but {SIDECAR} says {want['sha256'][:12]}... and {want['vocab_size']}: the tokens were "
                        "made by another tokenizer")
    dtype = token_dtype(tokenizer.vocab_size)
    maps = {}
    for split in ("train", "val"):
        entry = meta[split]
        path = folder / entry["file"]
        _check_tokens(path, entry, dtype, tokenizer.vocab_size)
        maps[split] = (numpy.memmap(path, dtype=dtype, mode="r", shape=(entry["tokens"],))
                       if entry["tokens"] else numpy.zeros(0, dtype=dtype))
    offsets = _check_index(folder / meta["train"]["index"], meta["train"])
    digests = _read_digests(folder / meta["train"]["digests"], meta["train"]["documents"])
    return Prepared(folder, meta, tokenizer, maps["train"], offsets, digests, maps["val"])

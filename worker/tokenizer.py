"""Tokenizers: bytes (the zero-set-up default) or a byte-level BPE from Hugging Face's ``tokenizers``.

A tokenizer turns text into token ids and back, and knows its vocabulary size, which
the model's ``vocab_size`` follows. Two kinds:

- ``bytes``: a text's UTF-8 bytes are its ids (vocabulary 256), nothing to train or ship.
- ``bpe``: a byte-level BPE (GPT-2's scheme: every byte is a base symbol, so any text
  encodes, and frequent sequences are merged into one token). It is trained on a corpus
  with the ``tokenizers`` library to the size the user picks, or loaded from a
  ``tokenizer.json`` or a GPT-2 style ``vocab.json`` + ``merges.txt``. BPE itself is never
  written here: ``tokenizers`` trains, encodes and decodes.

Both have the same form on disk, ``tokenizer.json`` (the ``tokenizers`` format, which
Hugging Face's ``PreTrainedTokenizerFast`` and ``AutoTokenizer`` load): for bytes, a BPE
with no merges whose 256 symbols are the bytes, in byte order, under GPT-2's
byte-to-character map. Its ``sha256`` (of that file's text) names the tokenizer: a run
records it, the prepared token files record it, and a worker registers with it (the
coordinator refuses a worker whose tokenizer differs).

``spec`` strings (the ``--tokenizer`` flag of ``ps-prepare``):
``bytes`` | ``bpe:SIZE`` (train on the corpus) | PATH (a ``tokenizer.json``, or a folder
holding one, or ``vocab.json`` + ``merges.txt``).

Not here: tokenizing a corpus into files (``worker/prepare.py``), reading them (``worker/data.py``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

import numpy

TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
END_OF_TEXT = "<|endoftext|>"        # GPT-2's document separator, kept as a special token of trained BPEs


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or loaded, with the file and the reason."""


def byte_to_char() -> dict:
    """GPT-2's map from a byte to the printable character that stands for it in a
    byte-level vocabulary: printable Latin-1 bytes stand for themselves, the other 68
    bytes for the characters from U+0100 on, in byte order."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _hf(tokenizer_json: str):
    from tokenizers import Tokenizer
    return Tokenizer.from_str(tokenizer_json)


class Tokenizer:
    """Text <-> ids. ``kind`` is ``bytes`` or ``bpe``; ``json`` the ``tokenizer.json`` text."""

    def __init__(self, kind: str, tokenizer_json: str):
        self.kind, self.json = kind, tokenizer_json
        self.sha256 = hashlib.sha256(tokenizer_json.encode()).hexdigest()
        self._tok = _hf(tokenizer_json) if kind == "bpe" else None
        self.vocab_size = 256 if kind == "bytes" else self._tok.get_vocab_size()

    def encode(self, text: str | bytes) -> numpy.ndarray:
        """The ids of ``text`` (bytes are decoded as UTF-8 first, unreadable bytes replaced,
        except by the bytes tokenizer, which takes them as they are)."""
        if self.kind == "bytes":
            raw = text.encode() if isinstance(text, str) else bytes(text)
            return numpy.frombuffer(raw, dtype=numpy.uint8).astype(numpy.int64)
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return numpy.asarray(self._tok.encode(text).ids, dtype=numpy.int64)

    def encode_many(self, texts: list) -> list:
        """``encode`` of each text (a BPE encodes them in parallel)."""
        if self.kind == "bytes":
            return [self.encode(t) for t in texts]
        texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
        return [numpy.asarray(e.ids, dtype=numpy.int64) for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        """The text of ``ids`` (a cut UTF-8 character shows as U+FFFD)."""
        ids = [int(i) for i in ids]
        if self.kind == "bytes":
            return bytes(ids).decode("utf-8", errors="replace")
        return self._tok.decode(ids, skip_special_tokens=False)

    def describe(self) -> str:
        return f"{self.kind} tokenizer, vocabulary {self.vocab_size:,}, sha256 {self.sha256[:12]}"

    def save(self, folder, model_max_length: int | None = None):
        """Write ``tokenizer.json`` and the ``tokenizer_config.json`` that lets
        ``AutoTokenizer.from_pretrained(folder)`` load it as a ``PreTrainedTokenizerFast``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        from common.files import atomic_write
        atomic_write(folder / TOKENIZER_FILE, self.json.encode())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "paramserver_tokenizer": self.kind,
                  "clean_up_tokenization_spaces": False}
        if model_max_length:
            config["model_max_length"] = int(model_max_length)
        if self.kind == "bpe" and self._tok.token_to_id(END_OF_TEXT) is not None:
            config.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)
        atomic_write(folder / HF_CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())


# --- building one ---------------------------------------------------------------------

def _byte_level(model):
    """A ``tokenizers.Tokenizer`` around ``model`` with GPT-2's byte-level pre-tokenizer and decoder."""
    from tokenizers import Tokenizer as HF, decoders, pre_tokenizers
    tok = HF(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@functools.lru_cache(maxsize=1)
def bytes_tokenizer() -> Tokenizer:
    """The bytes tokenizer (ids = UTF-8 bytes); its ``tokenizer.json`` is a merge-free
    byte-level BPE, so that Hugging Face tools read byte runs too."""
    from tokenizers import models
    vocab = {ch: b for b, ch in byte_to_char().items()}
    return Tokenizer("bytes", _byte_level(models.BPE(vocab=vocab, merges=[])).to_str())


def train_bpe(texts, vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens (256 bytes, ``<|endoftext|>`` and
    the merges), trained by ``tokenizers`` on the iterable ``texts`` (str or bytes)."""
    from tokenizers import models, pre_tokenizers, trainers
    if vocab_size < 257:
        raise TokenizerError(f"a BPE needs a vocabulary of at least 257 (256 bytes + {END_OF_TEXT}), "
                             f"got {vocab_size}")
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    as_text = (t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts)
    tok.train_from_iterator(as_text, trainer=trainer)
    return Tokenizer("bpe", tok.to_str())


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file, or a folder holding ``tokenizer.json`` or
    ``vocab.json`` + ``merges.txt`` (GPT-2's files). A file of ours for bytes loads as bytes."""
    path = Path(path)
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            path = path / TOKENIZER_FILE
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return _from_vocab_merges(path / "vocab.json", path / "merges.txt")
        else:
            raise TokenizerError(f"{path}: holds neither {TOKENIZER_FILE} nor vocab.json + merges.txt")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read it ({e})") from None
    if text == bytes_tokenizer().json:
        return bytes_tokenizer()
    try:
        tok = _hf(text)
    except Exception as e:                      # tokenizers raises its own exception type
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
    return Tokenizer("bpe", tok.to_str())


def _from_vocab_merges(vocab: Path, merges: Path) -> Tokenizer:
    from tokenizers import models
    try:
        model = models.BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        raise TokenizerError(f"{vocab.parent}: cannot read vocab.json + merges.txt ({e})") from None
    return Tokenizer("bpe", _byte_level(model).to_str())


def parse_spec(spec: str) -> tuple[str, object]:
    """``bytes`` -> ("bytes", None); ``bpe:SIZE`` -> ("train", SIZE); else ("load", PATH)."""
    if spec == "bytes":
        return "bytes", None
    m = re.fullmatch(r"bpe:(\d+)", spec)
    if m:
        return "train", int(m.group(1))
    if spec.startswith("bpe"):
        raise TokenizerError(f"--tokenizer {spec!r}: write bpe:SIZE, e.g. bpe:4096")
    if not Path(spec).exists():
        raise TokenizerError(f"--tokenizer {spec!r}: neither bytes, bpe:SIZE, nor an existing file or folder")
    return "load", Path(spec)


def run_tokenizer(folder) -> Tokenizer:
    """The tokenizer a run or checkpoint folder was trained with: its ``tokenizer.json``,
    or bytes where there is none (runs made before tokenizers existed)."""
    path = Path(folder) / TOKENIZER_FILE
    return load_tokenizer(path) if path.is_file() else bytes_tokenizer()

"""``ps-prepare``: tokenize a corpus once into memory-mapped token files (nanoGPT's prepare step).

    ps-prepare --tokenizer bpe:4096 --out data/stdlib-bpe4k          # the built-in corpus, a BPE trained on it
    ps-prepare --data notes/ --tokenizer gpt2/ --out data/notes       # GPT-2's own tokenizer (vocab.json + merges.txt)
    ps-local --data data/stdlib-bpe4k                                 # workers memory-map the files

The corpus is read and cut into documents and split into train and validation exactly
as ``worker/data.py`` does for raw text (same ``--data``, ``--val-fraction``,
``--doc-bytes``); ``.jsonl`` files contribute the ``text`` field of each line. The
tokenizer (``--tokenizer``: ``bytes``, ``bpe:SIZE`` trained on the TRAINING documents
only, or a ``tokenizer.json`` / ``vocab.json`` + ``merges.txt`` to load) encodes every
document; the folder then holds the files ``worker/tokenfiles.py`` describes.
Training commands given ``--data FOLDER`` read it with the split it was prepared with,
and the model's vocabulary follows its tokenizer.

Not here: sharding over workers (at load time, ``worker/data.py``), streaming corpora
larger than memory (the documents and their tokens are held in memory while preparing).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common.config import add_arguments, from_args
from worker.data import DataConfig, load_corpus, split_train_val
from worker.tokenfiles import FORMAT, SIDECAR, token_dtype, write_sidecar, write_split
from worker.tokenizer import TokenizerError, bytes_tokenizer, load_tokenizer, parse_spec, train_bpe


def make_tokenizer(spec: str, train_texts: list):
    kind, arg = parse_spec(spec)
    if kind == "bytes":
        return bytes_tokenizer()
    if kind == "train":
        return train_bpe(train_texts, arg)
    return load_tokenizer(arg)


def prepare(dc: DataConfig, spec: str, out) -> dict:
    """Tokenize the corpus ``dc`` names with tokenizer ``spec`` into folder ``out``; return the sidecar."""
    out = Path(out)
    t0 = time.perf_counter()
    corpus = load_corpus(dc)
    train_docs, val_docs = split_train_val(corpus.documents, dc.val_fraction)
    texts = {id(d): d.tokens.tobytes() for d in corpus.documents}
    tokenizer = make_tokenizer(spec, [texts[id(d)] for d in train_docs])
    dtype = token_dtype(tokenizer.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    meta = {"format": FORMAT, "dtype": dtype.name, "source": corpus.fingerprint,
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256,
                          "spec": spec},
            "split": {"val_fraction": dc.val_fraction, "doc_bytes": dc.doc_bytes}}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        encoded = tokenizer.encode_many([texts[id(d)] for d in docs])
        meta[name] = write_split(out, name, encoded, [len(d.tokens) for d in docs], dtype,
                                 [d.digest for d in docs] if name == "train" else None)
    write_sidecar(out, meta)            # last: a folder without it is not a prepared folder
    meta["seconds"] = time.perf_counter() - t0
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ps-prepare", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Then train with --data OUT (ps-train, ps-local, python -m worker).")
    p.add_argument("--tokenizer", default="bytes",
                   help="bytes | bpe:SIZE (a byte-level BPE trained on the corpus to SIZE tokens) | PATH "
                        "(a tokenizer.json, or a folder with tokenizer.json or vocab.json + merges.txt) "
                        "(default: bytes)")
    p.add_argument("--out", required=True, help="folder to write the token files into")
    add_arguments(p, DataConfig, "corpus and split", skip=("shard",))
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        dc = from_args(DataConfig, args)
        if (Path(dc.data) / SIDECAR).is_file():
            parser.error(f"--data {dc.data} is already a prepared folder")
        meta = prepare(dc, args.tokenizer, args.out)
    except (TokenizerError, ValueError, OSError) as e:
        print(f"ps-prepare: {e}", file=sys.stderr)
        return 2
    tr, va, tok = meta["train"], meta["val"], meta["tokenizer"]
    print(f"ps-prepare: {meta['source']['source']} ({meta['source']['bytes'] / 1e6:.2f} MB) -> {args.out}: "
          f"{tok['kind']} tokenizer, vocabulary {tok['vocab_size']:,}, sha256 {tok['sha256'][:12]}; "
          f"train {tr['tokens']:,} tokens ({tr['bytes'] / max(tr['tokens'], 1):.2f} bytes/token, "
          f"{tr['documents']} documents), val {va['tokens']:,} tokens, {meta['dtype']}; {meta['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

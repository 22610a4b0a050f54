"""safetensors files written from the arrays themselves, with no copy of the data.

``safetensors.numpy.save`` returns the whole file as one ``bytes`` object, and builds
it through a second copy of every tensor: saving a 124M-parameter vector costs about
1 GB of memory beyond the vector. This module writes the same format straight from
the arrays: an 8-byte little-endian header length, the JSON header (each tensor's
dtype, shape and byte range, then ``__metadata__``), padded with spaces to a multiple
of 8, then each tensor's bytes in header order. ``safetensors`` itself reads the files
(tests/test_stfile.py checks it), and the files go through ``common.files.atomic_write``.

Not here: reading (``safetensors.numpy.load`` does it), other frameworks' tensors.
"""
from __future__ import annotations

import json

import numpy

DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
          "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8",
          "bool": "BOOL"}


def safetensors_parts(tensors: dict, metadata: dict | None = None) -> list:
    """The pieces of a safetensors file for ``tensors`` (name -> C-contiguous little-endian
    array), in order: the header as ``bytes``, then a memoryview of each array (no copy)."""
    header, views, offset = {}, [], 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata maps strings to strings")
        header["__metadata__"] = dict(metadata)
    for name in sorted(tensors):
        arr = tensors[name]
        if not isinstance(arr, numpy.ndarray) or not arr.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous numpy array")
        if arr.dtype.name not in DTYPES or arr.dtype.byteorder == ">":
            raise ValueError(f"{name}: dtype {arr.dtype} cannot be written (little-endian {sorted(DTYPES)})")
        header[name] = {"dtype": DTYPES[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        views.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [len(text).to_bytes(8, "little") + text, *views]

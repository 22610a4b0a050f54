"""CUDA kernels for the worker, a drop-in ops module beside ``worker.layers``.

``from worker import kernels as ops`` gives the layer functions of ``worker/layers.py``
with the same names and signatures; on C-contiguous CuPy arrays of a compiled element
type (float32, float64, and for mixed precision bf16 and fp16) they run the kernels of
the ``.cu`` files here (compiled with NVRTC on first use) and cuBLAS, on anything else
the reference layers. See ``ops.py`` and ``attention_ops.py`` (launchers),
``optim_ops.py`` (AdamW), ``gemm.py`` (cuBLAS), ``halfs.py`` (16-bit types),
``loader.py`` (compilation), ``reference.py`` (the ``lse`` attention contract) and
docs/gpu.md.

Importing this package needs neither CuPy nor a GPU; a launcher handed CuPy arrays
needs both, and ``worker.backend.select("cuda")`` says clearly which one is missing.
"""
from worker.kernels.attention_ops import attention_backward, attention_forward  # noqa: F401
from worker.kernels.ops import (  # noqa: F401
    array_module, convert, embedding_backward, embedding_forward, gelu_backward, gelu_forward,
    layernorm_backward, layernorm_forward, matmul_backward, matmul_forward, residual_backward,
    residual_forward, softmax_crossentropy_backward, softmax_crossentropy_forward,
)
from worker.kernels.optim_ops import adamw_update, merge_ranges  # noqa: F401

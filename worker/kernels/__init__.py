"""CUDA kernels for the worker, a drop-in ops module beside ``worker.layers``.

``from worker import kernels as ops`` gives the layer functions of ``worker/layers.py``
with the same names and signatures; on C-contiguous CuPy float32/float64 arrays they
run the kernels of the ``.cu`` files here (compiled with NVRTC on first use), on
anything else the reference layers. See ``ops.py`` (launchers), ``loader.py``
(compilation), ``reference.py`` (the ``lse`` attention contract) and docs/gpu.md.

Importing this package needs neither CuPy nor a GPU; a launcher handed CuPy arrays
needs both, and ``worker.backend.select("cuda")`` says clearly which one is missing.
"""
from worker.kernels.ops import (  # noqa: F401
    adamw_update, array_module, attention_backward, attention_forward, embedding_backward,
    embedding_forward, gelu_backward, gelu_forward, layernorm_backward, layernorm_forward,
    matmul_backward, matmul_forward, merge_ranges, residual_backward, residual_forward,
    softmax_crossentropy_backward, softmax_crossentropy_forward,
)

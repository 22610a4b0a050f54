"""A PyTorch GPT-2 of exactly the worker's architecture: the reference for parity tests
and for the CPU throughput benchmark.

Same model as ``worker/model.py`` (Radford et al. 2019, as in nanoGPT): token + position
embedding, pre-LayerNorm blocks (LayerNorm eps 1e-5) of causal self-attention and a
tanh-GELU MLP, a final LayerNorm, and a logits projection tied to ``wte``. Linear weights
are stored as our ``(in, out)`` Conv1D layout (``y = x @ W + b``), so ``load_flat`` copies
the flat ``params`` vector into it name by name through ``common.layout`` with no
transposes, and ``flat_grads`` reads the gradients back in the same layout.

Attention is written the way PyTorch users write it in eager mode (scores, mask, softmax,
weighted sum: nanoGPT's "slow attention"); ``sdpa=True`` uses
``F.scaled_dot_product_attention`` instead, for a second benchmark figure.

Reference only: product code never imports this (PyTorch is not a dependency).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.layout import gpt_layout


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight (in, out), y = x @ W + b."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], self.weight.shape[1])


class Attention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, sdpa):
        super().__init__()
        self.n_head, self.sdpa = n_head, sdpa
        self.c_attn = Conv1D(n_embd, 3 * n_embd)
        self.c_proj = Conv1D(n_embd, n_embd)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size, dtype=torch.bool)),
                             persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
            att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v                                  # (B, NH, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = Conv1D(n_embd, 4 * n_embd)
        self.c_proj = Conv1D(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, sdpa):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = Attention(n_embd, n_head, block_size, sdpa)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """GPT-2 with parameter names equal to ``common.layout.gpt_layout``'s."""

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, sdpa=False):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, block_size, sdpa) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        self.layout = gpt_layout(vocab_size, block_size, n_layer, n_embd)

    @classmethod
    def from_config(cls, config, sdpa=False):
        """From a ``worker.model.GPTConfig`` (or anything with the same fields)."""
        return cls(config.vocab_size, config.block_size, config.n_layer, config.n_head,
                   config.n_embd, sdpa=sdpa)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe.weight[:T]
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()     # tied output projection
        if targets is None:
            return logits
        # mean over positions whose target is >= 0, like worker.model.GPT.forward
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1)

    # --- the flat vector of worker.model.GPT ----------------------------------------
    def _named(self):
        named = dict(self.named_parameters())
        missing = [e.name for e in self.layout if e.name not in named]
        extra = sorted(set(named) - set(self.layout.names()))
        if missing or extra:
            raise KeyError(f"torch model and layout disagree: missing {missing}, extra {extra}")
        return named

    @torch.no_grad()
    def load_flat(self, params: np.ndarray):
        """Copy our flat ``params`` vector into the parameters, by name through the layout,
        casting to this module's dtype."""
        if params.shape != (self.layout.size,):
            raise ValueError(f"expected a flat vector of {self.layout.size} elements, got {params.shape}")
        named = self._named()
        for e in self.layout:
            t = named[e.name]
            t.copy_(torch.from_numpy(np.ascontiguousarray(params[e.offset:e.end]).reshape(e.shape)))

    def flat_params(self) -> np.ndarray:
        named = self._named()
        return np.concatenate([named[e.name].detach().reshape(-1).numpy() for e in self.layout])

    def flat_grads(self) -> np.ndarray:
        """The gradients as one vector in our layout (zeros where a grad is None)."""
        named = self._named()
        return np.concatenate([
            (named[e.name].grad if named[e.name].grad is not None
             else torch.zeros(e.shape, dtype=named[e.name].dtype)).detach().reshape(-1).numpy()
            for e in self.layout])

    def decay_params(self):
        """(matrices, vectors): the groups that take / skip weight decay, as our layout's
        ``decay_ranges`` (ndim >= 2) does."""
        named = self._named()
        mats = [named[e.name] for e in self.layout if len(e.shape) >= 2]
        vecs = [named[e.name] for e in self.layout if len(e.shape) < 2]
        return mats, vecs

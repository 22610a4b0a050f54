"""The GPT's blocks, forward and backward, through ``worker/fastlayers.py`` (NumPy on CPU).

The same sequence of layers as ``GPT._forward_blocks_reference`` and
``GPT._backward_blocks_reference`` in ``worker/model.py``, which remain the readable
version; here each layer is the fast variant that keeps a little more of the forward
(LayerNorm's xhat, GELU's tanh) and works in reused scratch buffers
(``a.scratch``). ``tests/test_fastlayers.py`` checks that a model running this path and
one running the reference agree to rounding, and the whole model's gradient against
finite differences.

Not here: the embedding and the loss (shared with the reference path, in model.py).
"""
from __future__ import annotations

from worker import fastlayers as F
from worker.layers import matmul_forward, residual_forward


def _no_hook(begin, end):
    pass


def forward_blocks(model, a, before=_no_hook):
    """a.encoded (B,T,C) -> a.logits (B,T,V): the blocks, ln_f, the tied projection;
    ``before(b, e)``: the model's hook, called before params[b:e] is first used."""
    p, NH, S = model.param_views, model.config.n_head, a.scratch
    x = a.encoded
    for i, blk in enumerate(a.blocks):
        h = f"h.{i}."
        before(*model.spans["blocks"][i])
        F.layernorm_forward(blk["ln1"], blk["ln1_xhat"], blk["ln1_mean"], blk["ln1_rstd"], x,
                            p[h + "ln_1.weight"], p[h + "ln_1.bias"], S)
        matmul_forward(blk["qkv"], blk["ln1"], p[h + "attn.c_attn.weight"],
                       p[h + "attn.c_attn.bias"])                               # (B,T,3C)
        F.attention_forward(blk["atty"], blk["att"], blk["qkv"], NH, S)         # (B,T,C)
        matmul_forward(blk["attproj"], blk["atty"], p[h + "attn.c_proj.weight"],
                       p[h + "attn.c_proj.bias"])
        residual_forward(blk["res2"], x, blk["attproj"])
        F.layernorm_forward(blk["ln2"], blk["ln2_xhat"], blk["ln2_mean"], blk["ln2_rstd"],
                            blk["res2"], p[h + "ln_2.weight"], p[h + "ln_2.bias"], S)
        matmul_forward(blk["fch"], blk["ln2"], p[h + "mlp.c_fc.weight"],
                       p[h + "mlp.c_fc.bias"])                                  # (B,T,4C)
        F.gelu_forward(blk["fch_gelu"], blk["fch_tanh"], blk["fch"])
        matmul_forward(blk["fcproj"], blk["fch_gelu"], p[h + "mlp.c_proj.weight"],
                       p[h + "mlp.c_proj.bias"])                                # (B,T,C)
        residual_forward(blk["res3"], blk["res2"], blk["fcproj"])
        x = blk["res3"]
    before(*model.spans["ln_f"])
    F.layernorm_forward(a.lnf, a.lnf_xhat, a.lnf_mean, a.lnf_rstd, x, p["ln_f.weight"],
                        p["ln_f.bias"], S)
    matmul_forward(a.logits, a.lnf, p["wte.weight"].T)                          # (B,T,V), tied


def backward_blocks(model, a, idx, g, after=_no_hook):
    """From dlogits (in a.logits) down to the embeddings: accumulates into the gradient
    views ``g`` (name -> view, as model.named_grads()); ``after(b, e)``: the model's hook,
    called once grads[b:e] is final."""
    p, NH, S = model.param_views, model.config.n_head, a.scratch
    F.matmul_backward(a.dC, g["wte.weight"].T, None, a.logits, a.lnf, p["wte.weight"].T, S)
    a.dres[...] = 0
    F.layernorm_backward(a.dres, g["ln_f.weight"], g["ln_f.bias"], a.dC, a.lnf_xhat,
                         a.lnf_rstd, p["ln_f.weight"], S)
    after(*model.spans["ln_f"])
    # the residual stream's gradient a.dres is read by both branches in place, and the
    # LayerNorms add their share into it (see GPT._backward_blocks_reference)
    for i in reversed(range(model.config.n_layer)):
        h, blk = f"h.{i}.", a.blocks[i]
        F.matmul_backward(a.d4C_a, g[h + "mlp.c_proj.weight"], g[h + "mlp.c_proj.bias"],
                          a.dres, blk["fch_gelu"], p[h + "mlp.c_proj.weight"], S)
        F.gelu_backward(a.d4C_a, a.d4C_a, blk["fch"], blk["fch_tanh"], S)      # in place
        F.matmul_backward(a.dC, g[h + "mlp.c_fc.weight"], g[h + "mlp.c_fc.bias"],
                          a.d4C_a, blk["ln2"], p[h + "mlp.c_fc.weight"], S)
        F.layernorm_backward(a.dres, g[h + "ln_2.weight"], g[h + "ln_2.bias"], a.dC,
                             blk["ln2_xhat"], blk["ln2_rstd"], p[h + "ln_2.weight"], S)
        F.matmul_backward(a.dC, g[h + "attn.c_proj.weight"], g[h + "attn.c_proj.bias"],
                          a.dres, blk["atty"], p[h + "attn.c_proj.weight"], S)
        F.attention_backward(a.dqkv, a.dC, blk["qkv"], blk["att"], NH, S)
        F.matmul_backward(a.dC, g[h + "attn.c_attn.weight"], g[h + "attn.c_attn.bias"],
                          a.dqkv, blk["ln1"], p[h + "attn.c_attn.weight"], S)
        F.layernorm_backward(a.dres, g[h + "ln_1.weight"], g[h + "ln_1.bias"], a.dC,
                             blk["ln1_xhat"], blk["ln1_rstd"], p[h + "ln_1.weight"], S)
        after(*model.spans["blocks"][i])
    F.embedding_backward(g["wte.weight"], g["wpe.weight"], a.dres, idx)
    after(*model.spans["embed"])

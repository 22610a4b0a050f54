"""Weights that leave the system: a checkpoint of ours loads in Hugging Face's GPT-2 class
and gives the same logits. Skips unless ``transformers`` and ``torch`` are installed
(they are references, never imported by the product)."""
import numpy as np
import pytest

from worker import model_checkpoint as checkpoint
from worker.model import GPT, GPTConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 on both sides; the two compute the same sums in different orders, so the
# logits agree to a few ulps of their size (~1e-6 relative), far below this bound
ATOL = 1e-5


@pytest.mark.parametrize("cfg", [
    GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64),
    GPTConfig(vocab_size=61, block_size=16, n_layer=3, n_head=2, n_embd=24),
])
def test_hf_gpt2_loads_our_checkpoint_and_gives_the_same_logits(cfg, tmp_path):
    model = GPT(cfg, seed=7)
    # move every parameter away from its initial value (biases 0, gains 1) so a tensor
    # loaded in the wrong place or transposed cannot go unnoticed
    model.params += np.random.default_rng(1).normal(0, 0.05, size=model.params.shape).astype(np.float32)
    checkpoint.save_model(tmp_path, model, step=3)

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    hf.eval()
    idx = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(3, cfg.block_size))
    ours = model.forward(idx)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx)).logits.numpy()
    assert theirs.shape == ours.shape == (3, cfg.block_size, cfg.vocab_size)
    err = np.abs(theirs - ours).max()
    assert err < ATOL, f"max |logit difference| {err:.2e}"
    # the tied output layer is the embedding, as in our model
    assert torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    # HF's greedy continuation is our argmax
    assert (theirs[:, -1].argmax(-1) == ours[:, -1].argmax(-1)).all()


def test_hf_saved_weights_load_back_into_ours(tmp_path):
    """The way back: HF's save_pretrained (with HF's own names) reads into our GPT."""
    cfg = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg, seed=3)
    model.params += np.random.default_rng(4).normal(0, 0.05, size=model.params.shape).astype(np.float32)
    checkpoint.save_model(tmp_path / "ours", model)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    back = checkpoint.load_model(tmp_path / "hf")
    np.testing.assert_array_equal(back.params, model.params)

"""Load a run's weights in Hugging Face transformers and check they give our logits.

    python scripts/hf_check.py runs/X --prompt "def "

``model.safetensors`` + ``config.json`` of a GPT run folder (``ps-train``, ``ps-local``)
are a GPT-2 checkpoint: ``transformers.GPT2LMHeadModel.from_pretrained(folder)`` reads
them. This script loads the folder both ways, compares the logits on the prompt, and
continues the prompt greedily with each (``model.generate`` there, ``worker/sample.py``
here): the same tokens come out, decoded by the run's tokenizer.

Needs ``pip install transformers torch`` (CPU torch is enough); the project itself
never imports them.
"""
import argparse
import sys

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder with model.safetensors and config.json")
    p.add_argument("--prompt", default="def ", help="text to start from (default 'def ')")
    p.add_argument("--tokens", "--bytes", dest="tokens", type=int, default=40,
                   help="tokens (bytes, for a byte-level run) to continue greedily (default 40)")
    args = p.parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"hf_check: {e.name} is not installed; pip install transformers torch")
    from worker.model_checkpoint import load_model
    from worker.sample import generate
    from worker.tokenizer import run_tokenizer

    ours = load_model(args.run)
    hf = transformers.GPT2LMHeadModel.from_pretrained(args.run).eval()
    print(f"loaded {args.run} with transformers {transformers.__version__}: {type(hf).__name__}, "
          f"{sum(t.numel() for t in hf.parameters()):,} parameters (ours: {ours.num_params():,})")
    tokenizer = run_tokenizer(args.run)              # bytes where the folder has no tokenizer.json
    prompt = tokenizer.encode(args.prompt)
    room = ours.config.block_size - len(prompt)
    n = min(args.tokens, room)
    if n < args.tokens:
        print(f"(continuing {n} tokens: the model's context is {ours.config.block_size} tokens)")
    idx = prompt[None, :]
    a = ours.forward(idx)
    with torch.no_grad():
        b = hf(torch.from_numpy(idx)).logits.numpy()
    print(f"logits on {args.prompt!r}: max |ours - HF| = {np.abs(a - b).max():.1e} "
          f"(largest logit {np.abs(a).max():.1f})")
    mine = generate(ours, prompt, n, temperature=0)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(idx), max_new_tokens=n, do_sample=False, pad_token_id=0)[0]
    print(f"greedy, ours: {tokenizer.decode(mine)!r}")
    print(f"greedy, HF:   {tokenizer.decode(theirs.tolist())!r}")
    same = mine.tolist() == theirs.tolist()
    print("the same tokens" if same else "they differ (two nearly equal logits can swap the argmax in float32)")
    return 0 if np.abs(a - b).max() < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())

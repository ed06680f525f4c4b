"""Teacher generation speed: raykd's batched KV-cache sampling vs a per-prompt `model.generate` loop.

The real SmolLM2-135M-Instruct teacher, fp32, the machine's cores. Prompts: the first
`--prompt-tokens` (32) tokens of the first `--prompts` (16) SOTU training speeches, each continued
by `--new-tokens` (64) sampled tokens at temperature 1 from the whole distribution (top-p 1, no
top-k), EOS ignored so every arm writes exactly the same number of tokens. Arms, measured in this
process on the same prompts, alternated, each `--repeats` times (median):

* `raykd`: `raykd.sampling.sample`, what `raykd generate` runs: `--batch` (16) prompts at once,
  one forward of the new tokens per step against the KV cache;
* `plain`: `model.generate(do_sample=True, ...)` one prompt at a time (a per-request loop);
* `hf_batched`: `model.generate` on the same batches (context, no goal: what batching alone gives
  with Hugging Face's own loop).

Figures: tokens_per_s_raykd / _plain / _hf_batched, speedup (raykd / plain; goal >= 1.5 on 2
cores) and vs_hf_batched (raykd / hf_batched).

    .venv/bin/python bench/generate.py [--prompts 16] [--batch 16] [--new-tokens 64] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def sotu_prompts(tok, n: int, prompt_tokens: int):
    """LongTensor [n, prompt_tokens]: the start of the first n SOTU training speeches (cleaned)."""
    import torch

    from raykd.data.corpora import clean_text, fetch_corpus
    from raykd.generation import prompt_ids

    files = sorted((fetch_corpus("sotu", log=lambda m: print(m, flush=True)) / "train").glob("*.txt"))
    docs = (clean_text(f.read_text(encoding="utf-8")) for f in files)
    return torch.tensor(prompt_ids(docs, tok, prompt_tokens, n))


def arm_raykd(model, prompts, new_tokens: int, batch: int, seed: int) -> int:
    import torch

    from raykd.sampling import sample

    rng = torch.Generator().manual_seed(seed)
    n = 0
    for chunk in prompts.split(batch):
        out = sample(model, chunk, new_tokens, temperature=1.0, top_p=1.0, generator=rng, eos_id=None, pad_id=0)
        n += int(out.mask.sum())
    return n


def arm_hf(model, prompts, new_tokens: int, batch: int, seed: int) -> int:
    """model.generate on `batch` prompts at a time (batch 1: the per-prompt loop)."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    gc = GenerationConfig(do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                          eos_token_id=None, pad_token_id=0)
    n = 0
    for chunk in prompts.split(batch):
        with torch.no_grad():
            out = model.generate(input_ids=chunk, attention_mask=torch.ones_like(chunk), generation_config=gc)
        n += (out.shape[1] - chunk.shape[1]) * chunk.shape[0]
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    threads = max(1, os.cpu_count() or 1)
    C.header("teacher generation: raykd batched KV-cache sampling vs per-prompt model.generate", threads, "fp32", [
        f"same {a.prompts} prompts of {a.prompt_tokens} SOTU tokens, {a.new_tokens} new tokens each for every arm (EOS ignored)",
        "temperature 1, whole distribution (top-p 1, top-k off) in every arm; fp32; one process, arms alternated, median of repeats",
        f"raykd: raykd.sampling.sample, batch {a.batch}; plain: model.generate one prompt at a time; hf_batched: model.generate, batch {a.batch}",
    ])
    C.set_threads(threads)
    import torch

    from raykd import models

    d = C.teacher_dir()
    model = models.load_model(d, torch.float32, frozen=True)
    tok = models.load_tokenizer(d)
    prompts = sotu_prompts(tok, a.prompts, a.prompt_tokens)
    arms = {"raykd": lambda s: arm_raykd(model, prompts, a.new_tokens, a.batch, s),
            "plain": lambda s: arm_hf(model, prompts, a.new_tokens, 1, s),
            "hf_batched": lambda s: arm_hf(model, prompts, a.new_tokens, a.batch, s)}
    arm_raykd(model, prompts[:2], 4, 2, 0)  # warm-up (untimed)
    arm_hf(model, prompts[:2], 4, 2, 0)
    rates: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(a.repeats):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            t = time.perf_counter()
            n = arms[name](r)
            dt = time.perf_counter() - t
            if n != a.prompts * a.new_tokens:
                raise SystemExit(f"arm {name} wrote {n} tokens, expected {a.prompts * a.new_tokens}")
            rates[name].append(n / dt)
            C.progress(f"{name}: {n} tokens in {dt:.1f} s ({n / dt:.1f} tokens/s)")
    med = {k: C.median(v) for k, v in rates.items()}
    C.figures({"tokens_per_s_raykd": med["raykd"], "tokens_per_s_plain": med["plain"], "tokens_per_s_hf_batched": med["hf_batched"],
               "speedup": med["raykd"] / med["plain"], "vs_hf_batched": med["raykd"] / med["hf_batched"],
               "batch": a.batch, "prompts": a.prompts, "new_tokens": a.new_tokens, "precision": "fp32"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
